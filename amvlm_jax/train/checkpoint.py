"""Orbax checkpoints: the latest state of a run, and its best by validation Dice.

Layout: <workdir>/checkpoints/{latest,best}/<step>/{state,meta}. `meta` is
JSON: the job's name, its resolved config, the epoch, the best metric so
far and the loop's bookkeeping (train/loop.py). A checkpoint interrupted while
being written is never visible: Orbax writes to a temporary folder and
renames it when complete. A step folder damaged later (an item or file
deleted, a file cut short) is named in a one-line CheckpointError.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import pathlib
import re
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from amvlm_jax.train.logging import finite_or_null, json_text, write_atomically


class CheckpointError(ValueError):
    """A checkpoint path that holds no usable checkpoint, in one line."""


class DamagedCheckpoint(CheckpointError):
    """A step folder that cannot be read as written: an item missing, its data or meta unreadable."""



def _manager(directory: pathlib.Path, read_only: bool = False) -> ocp.CheckpointManager:
    # Each manager's own barrier names: Orbax names them by the operation only, so in a multi-process run
    # the 'latest' manager's save finishing in its thread met the 'best' manager's next save in another
    # process at the same barrier, and the run stopped ("Barrier ... is already ongoing").
    processes = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="read-only" if read_only else directory.name)
    # A training's managers (it holds the workdir's lock) delete the <step>.orbax-checkpoint-tmp folders that a
    # save cut short by a kill left: no reader takes them for a step, and each was a whole state's size on disk.
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=not read_only, read_only=read_only,
                                           multiprocessing_options=processes, cleanup_tmp_directories=not read_only)
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

    def save(self, step: int, state: Any, meta: dict, is_best: bool, latest_meta: Optional[dict] = None,
             latest: bool = True) -> None:
        """Saves `state` as the latest (unless not `latest`: a best epoch between two due saves) and, when
        `is_best`, as the best checkpoint.

        The best one is written completely before the latest one starts: a
        run killed in between resumes from the previous latest step and
        writes this best again (a run killed after the latest save would
        otherwise resume past an epoch whose best checkpoint never landed).
        A best step that an interrupted run already completed is kept. When
        the latest checkpoint is already at `step` (a run stopped before
        finishing the epoch it was saved in, resumed and finishing it: the
        same state), only its meta is replaced, by `latest_meta` when given.
        """
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(finite_or_null(meta)))
        if is_best and self.best.latest_step() != step:
            with _writing(self.best):
                self.best.save(step, args=args)
                self.best.wait_until_finished()
        if not latest:
            return
        if self.latest.latest_step() == step:
            self.replace_latest_meta(step, latest_meta or meta)
        else:
            with _writing(self.latest):
                self.latest.save(step, args=args)

    def discard_orphaned_best(self) -> Optional[int]:
        """Deletes the best checkpoint when there is no latest one, and returns its step (None: nothing deleted).

        A run killed after its first best save but before its first latest save landed (the latest one
        is written in the background while training goes on), or whose latest step was deleted, leaves a
        best step that no resumable state belongs to: the next run in the workdir starts from step 0, with
        no recorded config to compare its own with, and Orbax silently skips saving a step at or below the
        one it holds, so the best of that other run would stay the one evaluated.
        """
        step = self.best.latest_step()
        if step is None or self.latest.latest_step() is not None:
            return None
        for saved in self.best.all_steps():
            self.best.delete(saved)
        return step

    def replace_latest_meta(self, step: int, meta: dict) -> None:
        """Replaces the meta of the latest checkpoint, at `step`, in one rename (Orbax skips a step that
        exists); its state stays."""
        with _writing(self.latest):
            self.latest.wait_until_finished()
            if jax.process_index() == 0:
                write_atomically(_step_folder(self.latest, step) / "meta" / "metadata", json_text(meta))
        if jax.process_count() > 1:  # Every process reads it when the run resumes.
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("replace_latest_meta")

    def restore_latest(self, state: Any) -> tuple[Any, Optional[dict]]:
        """(restored state, meta) from the latest checkpoint, or (state, None) when there is none."""
        step = self.latest.latest_step()
        if step is None:
            return state, None
        return _restore(self.latest, step, state)

    def latest_meta(self) -> Optional[dict]:
        """The latest checkpoint's meta, without its state; None when there is none."""
        step = self.latest.latest_step()
        return None if step is None else _read_meta(_step_folder(self.latest, step))

    def wait(self) -> None:
        for manager in (self.latest, self.best):
            with _writing(manager):
                manager.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


@contextlib.contextmanager
def _writing(manager: ocp.CheckpointManager):
    """Turns a save that the system refused (a full disk, a read-only or misplaced folder: an OSError, or
    TensorStore's RESOURCE_EXHAUSTED or PERMISSION_DENIED, raised from Orbax's threads) into a one-line
    CheckpointError. What was being written stays a temporary folder that no reader takes for a step."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        chain = [error]
        while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None:
            chain.append(cause)
        # The system's own words where a thread kept them (TensorStore's name a file deep in the temporary folder).
        reasons = [cause.strerror for cause in chain if isinstance(cause, OSError) and cause.strerror] + [
            first_line(cause) for cause in chain if str(cause).startswith(("RESOURCE_EXHAUSTED", "PERMISSION_DENIED"))]
        if not reasons:
            raise
        reason = reasons[0]
        raise CheckpointError(f"{manager.directory}: cannot write a checkpoint there ({reason}): free space, make "
                              "it writable or move what stands in its way, then run the same command again (it "
                              "resumes from the last checkpoint written)") from None


def _restore(manager: ocp.CheckpointManager, step: int, state: Any) -> tuple[Any, dict]:
    step_dir = _step_folder(manager, step)
    meta = _read_meta(step_dir)
    _check_params_fit(step_dir, state.params)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(state)))
    with _reading(step_dir):
        return manager.restore(step, args=args).state, meta


def _step_folder(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
    return pathlib.Path(str(manager.directory)) / str(step)


def _check_complete(step_dir: pathlib.Path) -> None:
    """Raises CheckpointError (one line) when a step folder lacks its meta or its state's metadata (an
    item deleted, an empty step folder). Every read checks this first: Orbax would fail with a KeyError
    or restore nothing."""
    if not (step_dir / "meta" / "metadata").is_file():
        missing = "meta"
    elif not all((step_dir / "state" / name).is_file() for name in ("_METADATA", "manifest.ocdbt")):
        missing = "state"
    else:
        return
    raise DamagedCheckpoint(f"{step_dir}: incomplete checkpoint (no {missing}); delete it or name another step")


def _read_meta(step_dir: pathlib.Path) -> dict:
    """The JSON meta of a step folder (what Orbax's JsonRestore reads), checked complete first."""
    _check_complete(step_dir)
    try:
        meta = json.loads((step_dir / "meta" / "metadata").read_text())
    except (OSError, ValueError) as error:
        raise DamagedCheckpoint(f"{step_dir / 'meta'}: unreadable checkpoint meta ({first_line(error)})") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(f"{step_dir / 'meta'}: unreadable checkpoint meta (not a JSON object)")
    return meta


def first_line(error: BaseException | str, limit: int = 200) -> str:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


class _SettlingLoop(asyncio.SelectorEventLoop):
    """An event loop that cancels and awaits its pending tasks before it closes. Orbax closes its
    loop as soon as one array read fails; the reads still in flight would then finish into the
    closed loop, each printing an 'Event loop is closed' traceback. Reads that TensorStore's threads
    finish after the close (they are no asyncio tasks yet, so close cannot wait for them) hand their
    results to a loop that nobody runs any more: they are dropped."""

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise

    def close(self) -> None:
        pending = [task for task in asyncio.all_tasks(self) if not task.done()]
        if pending and not self.is_running() and not self.is_closed():
            for task in pending:
                task.cancel()
            self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()


class _SettlingPolicy(asyncio.DefaultEventLoopPolicy):
    _loop_factory = _SettlingLoop


@contextlib.contextmanager
def _reading(step_dir: pathlib.Path):
    """Runs an Orbax restore from ``step_dir`` quietly: array data that cannot be read (files deleted
    or cut short) becomes a one-line CheckpointError; ValueError, KeyError and TypeError (a tree
    that does not fit) pass through."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_SettlingPolicy())
    try:
        yield
    except (ValueError, KeyError, TypeError):
        raise
    except Exception as error:  # Orbax raises a bare Exception from TensorStore's error.
        while error.__cause__ is not None:
            error = error.__cause__
        reason = re.sub(r' at local file "[^"]*"', "", str(error))  # The step folder, named first.
        raise DamagedCheckpoint(f"{step_dir}: checkpoint data is damaged ({first_line(reason)})") from None
    finally:
        asyncio.set_event_loop_policy(previous)


def read_meta(path: str | pathlib.Path) -> dict:
    """The meta of the checkpoint at ``path`` (resolved as in ``restore_variables``)."""
    return _read_meta(resolve_step(path))


def has_step(directory: pathlib.Path) -> bool:
    """Whether a manager folder holds a completed step (a save cut short leaves none)."""
    if not directory.is_dir():
        return False
    manager = _manager(directory, read_only=True)
    try:
        return manager.latest_step() is not None
    finally:
        manager.close()


def resolve_step(path: str | pathlib.Path) -> pathlib.Path:
    """The step folder of a step folder, a manager folder (newest step), or a workdir or its checkpoints/
    folder (best, else latest); a pre-training run's workdir (a pretrain/ and no checkpoints/): its pretrain/."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if (path / "checkpoints").is_dir():  # A workdir: its checkpoints/.
        path = path / "checkpoints"
    elif (path / "pretrain" / "checkpoints").is_dir():
        path = path / "pretrain" / "checkpoints"
    if (path / "best").is_dir() or (path / "latest").is_dir():  # A checkpoints/ folder: its best, else its latest.
        path = path / "best" if has_step(path / "best") else path / "latest"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    if path.name.isdigit() and not any(child.name.isdigit() for child in path.iterdir()):
        return path  # A step folder, complete or not (checked by its reader).
    manager = _manager(path, read_only=True)
    try:
        step = manager.latest_step()
    finally:
        manager.close()
    if step is None:
        raise CheckpointError(f"{path}: holds no checkpoint step")
    return path / str(step)


def _state_metadata(step_dir: pathlib.Path):
    """The metadata tree (shapes and dtypes, no values) of the train state saved in a step folder.

    Orbax opens every array's TensorStore to read it (half a second for a few hundred arrays, more than
    the restore that follows), and one job reads the same step several times (a mean teacher's guidance
    reads its pre-training's), so each tree read is kept, under the step folder and the identity of the
    two files Orbax reads it from: a step written again, or one of those files replaced or cut, is read
    afresh.
    """
    _check_complete(step_dir)
    state = step_dir.absolute() / "state"
    files = tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in (
        (state / name).stat() for name in ("_METADATA", "manifest.ocdbt")))
    return _read_state_metadata(step_dir, files)


@functools.lru_cache(maxsize=16)  # A long evaluation of many steps keeps the newest few.
def _read_state_metadata(step_dir: pathlib.Path, files: tuple):
    """``_state_metadata``'s Orbax read; ``files`` (the identity of its metadata files) is part of the key only."""
    with _reading(step_dir), ocp.StandardCheckpointer() as reader:  # Reads of a damaged manifest settle first.
        tree = reader.metadata(step_dir.absolute() / "state").item_metadata
    if tree is None:  # Orbax reads an emptied or cut _METADATA or manifest.ocdbt as no tree at all.
        raise DamagedCheckpoint(f"{step_dir}: incomplete checkpoint (state metadata unreadable); delete it or name "
                                "another step")
    return tree


def _saved_tree(path: str | pathlib.Path):
    """The metadata tree of the train state saved at ``path`` (resolved as in ``restore_variables``)."""
    return _state_metadata(resolve_step(path))


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


def restore_variables(path: str | pathlib.Path, variables: dict, job: str | None = None) -> tuple[dict, dict, pathlib.Path]:
    """Restores a model's variables from any job's checkpoint.

    path: a step folder, a manager folder (its newest step) or a workdir (its
    best, or its latest when it has no best yet). variables: {'params': ..., 'batch_stats': ...} giving structure,
    shapes and target shardings; only these entries of the saved train
    state are read (a mean-teacher checkpoint also holds the teacher and
    optimiser state). job: when given, a checkpoint whose meta names another
    job is refused in one line (one written before jobs were named passes).
    Returns (variables, meta, the step folder used).
    """
    step_dir = resolve_step(path)
    meta = _read_meta(step_dir)
    if job is not None and meta.get("job", job) != job:
        raise CheckpointError(f"{path}: a checkpoint of a '{meta['job']}' run, not a '{job}' one")
    manager = _manager(step_dir.parent, read_only=True)
    target = abstract_like(variables)
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    ))
    try:
        if "params" in variables:
            _check_params_fit(step_dir, variables["params"])
        with _reading(step_dir):
            restored = manager.restore(int(step_dir.name), args=args)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{step_dir}: checkpoint does not fit this model ({first_line(e)})") from None
    finally:
        manager.close()
    return restored.state, meta, step_dir
