"""Orbax checkpoints: the latest state of a run, and its best by validation Dice.

Layout: <workdir>/checkpoints/{latest,best}/<step>/{state,meta}. `meta` is
JSON: the job's name, its resolved config, the epoch, the best metric so
far and the loop's bookkeeping (train/loop.py). A checkpoint interrupted while
being written is never visible: Orbax writes to a temporary folder and
renames it when complete.
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint path that holds no usable checkpoint, in one line."""


def _manager(directory: pathlib.Path, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def abstract_like(state: Any) -> Any:
    """Shape/dtype/sharding description of `state`, the target for a restore onto its mesh."""
    return jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x), state
    )


class RunCheckpoints:
    """The 'latest' and 'best' checkpoint managers of a workdir."""

    def __init__(self, workdir: str | pathlib.Path):
        root = pathlib.Path(workdir) / "checkpoints"
        self.latest = _manager(root / "latest")
        self.best = _manager(root / "best")

    def save(self, step: int, state: Any, meta: dict, is_best: bool) -> None:
        """Saves `state` as the latest and, when `is_best`, as the best checkpoint.

        The best one is written completely before the latest one starts: a
        run killed in between resumes from the previous latest step and
        writes this best again (a run killed after the latest save would
        otherwise resume past an epoch whose best checkpoint never landed).
        A best step that an interrupted run already completed is kept.
        """
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if is_best and self.best.latest_step() != step:
            self.best.save(step, args=args)
            self.best.wait_until_finished()
        self.latest.save(step, args=args)

    def restore_latest(self, state: Any) -> tuple[Any, Optional[dict]]:
        """(restored state, meta) from the latest checkpoint, or (state, None) when there is none."""
        step = self.latest.latest_step()
        if step is None:
            return state, None
        return _restore(self.latest, step, state)

    def latest_meta(self) -> Optional[dict]:
        """The latest checkpoint's meta, without its state; None when there is none."""
        step = self.latest.latest_step()
        return None if step is None else _read_meta(self.latest, step)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _restore(manager: ocp.CheckpointManager, step: int, state: Any) -> tuple[Any, dict]:
    step_dir = pathlib.Path(str(manager.directory)) / str(step)
    _check_params_fit(step_dir, state.params)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(state)), meta=ocp.args.JsonRestore())
    restored = manager.restore(step, args=args)
    return restored.state, restored.meta


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def read_meta(path: str | pathlib.Path) -> dict:
    """The meta of the checkpoint at ``path`` (resolved as in ``restore_variables``)."""
    manager, step, _ = _open_step(path)
    try:
        return _read_meta(manager, step)
    finally:
        manager.close()


def has_step(directory: pathlib.Path) -> bool:
    """Whether a manager folder holds a completed step (a save cut short leaves none)."""
    if not directory.is_dir():
        return False
    manager = _manager(directory, read_only=True)
    try:
        return manager.latest_step() is not None
    finally:
        manager.close()


def _open_step(path: str | pathlib.Path) -> tuple[ocp.CheckpointManager, int, pathlib.Path]:
    """(read-only manager, step, folder) of a step folder, a manager folder (newest step) or a workdir (best, else latest)."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if (path / "checkpoints").is_dir():  # A workdir: its best checkpoint, else its latest.
        best = path / "checkpoints" / "best"
        path = best if has_step(best) else path / "checkpoints" / "latest"
    if (path / "state").is_dir() and path.name.isdigit():
        return _manager(path.parent, read_only=True), int(path.name), path
    manager = _manager(path, read_only=True)
    step = manager.latest_step()
    if step is None:
        manager.close()
        raise CheckpointError(f"{path}: holds no checkpoint step")
    return manager, step, path


def _state_metadata(step_dir: pathlib.Path):
    """The metadata tree (shapes and dtypes, no values) of the train state saved in a step folder."""
    with ocp.StandardCheckpointer() as reader:
        return reader.metadata(step_dir.absolute() / "state").item_metadata


def _saved_tree(path: str | pathlib.Path):
    """The metadata tree of the train state saved at ``path`` (resolved as in ``restore_variables``)."""
    manager, step, path = _open_step(path)
    manager.close()
    return _state_metadata(path if path.name.isdigit() else path / str(step))


def saved_entries(path: str | pathlib.Path) -> set[str]:
    """Top-level entries of the train state saved at `path` (resolved as in ``restore_variables``) that hold values."""
    return {key for key, value in _saved_tree(path).items() if value is not None}


def param_shapes(params) -> dict[str, tuple]:
    """{path: shape} of a params tree (arrays, abstract arrays or a checkpoint's metadata)."""
    return {jax.tree_util.keystr(key): tuple(leaf.shape) for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _check_params_fit(step_dir: pathlib.Path, params) -> None:
    """Raises CheckpointError (one line) when the params saved in ``step_dir`` have other shapes than
    ``params``. Every restore checks this first: Orbax would fail deep inside its threads, whose
    tracebacks then show at exit."""
    saved, wanted = param_shapes(_state_metadata(step_dir)["params"]), param_shapes(params)
    if saved != wanted:
        key, shape = sorted(set(saved.items()) ^ set(wanted.items()))[0]
        raise CheckpointError(f"{step_dir}: checkpoint does not fit this model (other parameter shapes, e.g. "
                              f"{key} {shape}; was it trained with other model fields?)")


def restore_variables(path: str | pathlib.Path, variables: dict) -> tuple[dict, dict, pathlib.Path]:
    """Restores a model's variables from any job's checkpoint.

    path: a step folder, a manager folder (its newest step) or a workdir (its
    best, or its latest when it has no best yet). variables: {'params': ..., 'batch_stats': ...} giving structure,
    shapes and target shardings; only these entries of the saved train
    state are read (a mean-teacher checkpoint also holds the teacher and
    optimiser state). Returns (variables, meta, the step folder used).
    """
    manager, step, path = _open_step(path)
    step_dir = path if path.name.isdigit() else path / str(step)
    target = abstract_like(variables)
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        ),
        meta=ocp.args.JsonRestore(),
    )
    try:
        if "params" in variables:
            _check_params_fit(step_dir, variables["params"])
        restored = manager.restore(step, args=args)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: checkpoint does not fit this model ({str(e).splitlines()[0][:200]})") from None
    finally:
        manager.close()
    return restored.state, restored.meta, step_dir
