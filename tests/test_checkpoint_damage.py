"""A damaged checkpoint (an item or file deleted, a file cut short, an empty step folder, another job's
checkpoint as pre-trained encoders) stops every reader with one line naming the folder and the problem."""

import gc
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amvlm_jax import main
from amvlm_jax.train import build, checkpoint, loop, pretrain, ssl, supervised
from amvlm_jax.train.checkpoint import CheckpointError
from amvlm_jax.train.parallel import make_mesh

from conftest import REPO_ROOT, tiny_pretrain_config, tiny_synthetic_config


def _save(workdir: pathlib.Path, config, abstract, job: str) -> None:
    """A checkpoint at step 1 (best and latest) of ``abstract``'s shapes, as the loop writes it, without training.
    Not zeros: Zarr does not write chunks that hold only its fill value, which a deleted file would not then miss."""
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(rng.uniform(1, 2, s.shape).astype(s.dtype)), abstract)
    saver = checkpoint.RunCheckpoints(workdir)
    saver.save(1, state, {"job": job, "epoch": 1, "config": loop.recorded_config(config)}, is_best=True)
    saver.wait()
    saver.close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{'supervised': workdir, 'pretrain': workdir} of tiny checkpoints, copied by each test before damaging them."""
    root = tmp_path_factory.mktemp("saved")
    config = tiny_synthetic_config(**{"eval.splits": ("val",)})
    model = supervised.build_unet(config)
    _save(root / "supervised", config, jax.eval_shape(lambda: supervised.create_state(config, model, 2)), "supervised")
    config = tiny_pretrain_config(**{"pretrain.epochs": 1})
    model = build.build_model(config, build.text_encoder_config(config))
    abstract = jax.eval_shape(lambda: pretrain.create_state(config, model, build.pretrain_image_size(config)))
    _save(root / "pretrain", config, abstract, "pretrain")
    return {"supervised": root / "supervised", "pretrain": root / "pretrain"}


def _copy(saved, job: str, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(saved[job], tmp_path / job))


def _damage(step: pathlib.Path, how: str) -> str:
    """Damages the step folder ``step`` as the shell commands in the comments do; the start of the one-line
    error expected."""
    data = step / "state" / "ocdbt.process_0"
    if how == "no meta":  # rm -rf <step>/meta
        shutil.rmtree(step / "meta")
        return f"{step}: incomplete checkpoint (no meta); delete it or name another step"
    if how == "empty newer step":  # mkdir <step>/../2
        (step.parent / "2").mkdir()
        return f"{step.parent / '2'}: incomplete checkpoint (no meta); delete it or name another step"
    if how == "empty meta":  # : > <step>/meta/metadata
        (step / "meta" / "metadata").write_text("")
        return f"{step / 'meta'}: unreadable checkpoint meta ("
    if how == "data deleted":  # rm -rf <step>/state/ocdbt.process_0
        shutil.rmtree(data)
        return f"{step}: checkpoint data is damaged ("
    if how == "data truncated":  # truncate -s 100 <each data file> (the largest may hold no variable a job reads)
        for file in (data / "d").iterdir():
            os.truncate(file, min(100, file.stat().st_size))
        return f"{step}: checkpoint data is damaged ("
    if how.startswith("empty "):  # : > <step>/state/{_METADATA,manifest.ocdbt}
        (step / "state" / how.split()[1]).write_text("")
        return f"{step}: incomplete checkpoint (state metadata unreadable); delete it or name another step"
    if how == "no state":  # rm -rf <step>/state
        shutil.rmtree(step / "state")
    else:  # rm <step>/state/{_METADATA,manifest.ocdbt}
        (step / "state" / how).unlink()
    return f"{step}: incomplete checkpoint (no state); delete it or name another step"


def _raises_one_line(expected: str, call) -> None:
    with pytest.raises(CheckpointError) as error:
        call()
    message = str(error.value)
    assert message.startswith(expected) and "\n" not in message, message


META_DAMAGE = ["no meta", "empty newer step", "empty meta"]
STATE_DAMAGE = ["no state", "_METADATA", "manifest.ocdbt", "empty _METADATA", "empty manifest.ocdbt"]
DATA_DAMAGE = ["data deleted", "data truncated"]


@pytest.mark.parametrize("how", META_DAMAGE + STATE_DAMAGE + DATA_DAMAGE)
def test_evaluating_a_damaged_checkpoint_names_its_step_folder(saved, tmp_path, how):
    workdir = _copy(saved, "supervised", tmp_path)
    expected = _damage(workdir / "checkpoints" / "best" / "1", how)
    config = tiny_synthetic_config(**{"mode": "evaluate", "eval.splits": ("val",)})
    _raises_one_line(expected, lambda: main.run(config, workdir))


@pytest.mark.parametrize("how", META_DAMAGE + STATE_DAMAGE + DATA_DAMAGE)
def test_resuming_from_a_damaged_latest_checkpoint_names_its_step_folder(saved, tmp_path, how):
    workdir = _copy(saved, "supervised", tmp_path)
    expected = _damage(workdir / "checkpoints" / "latest" / "1", how)
    config = tiny_synthetic_config()
    abstract = jax.eval_shape(lambda: supervised.create_state(config, supervised.build_unet(config), 2))
    checkpoints = checkpoint.RunCheckpoints(workdir)
    try:  # Data damage is found only when the arrays are read, after the meta was checked: not a misfit.
        job = loop.Job(name="supervised", workdir=workdir, mesh=None, config=config, state=abstract,
                       train_step=None, batches=None, steps_per_epoch=2, epochs=2)
        _raises_one_line(expected, lambda: loop.resume_point(checkpoints, job))
    finally:
        checkpoints.close()


def test_a_save_cut_short_by_a_kill_is_deleted_when_training_resumes(saved, tmp_path):
    """SIGKILL during a save leaves <step>.orbax-checkpoint-tmp folders (their items too end in -tmp), found so
    after killed runs: each resume left them beside the next steps, a whole state's size each. A training's
    managers delete them; the completed step stays and restores."""
    workdir = _copy(saved, "supervised", tmp_path)
    cut_short = []
    for manager in ("latest", "best"):
        folder = workdir / "checkpoints" / manager / "2.orbax-checkpoint-tmp"
        shutil.copytree(workdir / "checkpoints" / manager / "1" / "state", folder / "state.orbax-checkpoint-tmp")
        (folder / "meta.orbax-checkpoint-tmp").mkdir()
        (folder / "meta.orbax-checkpoint-tmp" / "metadata").write_text('{"job": "supervised"')
        cut_short.append(folder)
    assert checkpoint.has_step(workdir / "checkpoints" / "latest")  # Readers leave them.
    assert all(folder.is_dir() for folder in cut_short)
    config = tiny_synthetic_config()
    abstract = jax.eval_shape(lambda: supervised.create_state(config, supervised.build_unet(config), 2))
    checkpoints = checkpoint.RunCheckpoints(workdir)
    try:
        state, meta = checkpoints.restore_latest(abstract)
        assert checkpoints.latest.latest_step() == 1 and meta["epoch"] == 1
    finally:
        checkpoints.close()
    assert not any(folder.exists() for folder in cut_short)
    for manager in ("latest", "best"):
        assert sorted(p.name for p in (workdir / "checkpoints" / manager).iterdir()) == ["1"]


def _guidance(source: pathlib.Path, tmp_path):
    config = tiny_pretrain_config(**{"mode": "ssl", "data.labeled_fraction": 0.5, "ssl.pretrained": str(source)})
    return lambda: ssl.TextGuidance(config, tmp_path, make_mesh(config, jax.devices()[:1]))


@pytest.mark.parametrize("how", ["no meta", "empty meta", "no state", "data truncated"])
def test_damaged_pretrained_encoders_name_their_step_folder(saved, tmp_path, how):
    source = _copy(saved, "pretrain", tmp_path)
    expected = _damage(source / "checkpoints" / "best" / "1", how)
    _raises_one_line(expected, _guidance(source, tmp_path))


def test_pretrained_encoders_of_another_job_are_refused_by_name(saved, tmp_path):
    source = _copy(saved, "supervised", tmp_path)
    _raises_one_line(f"{source}: a checkpoint of a 'supervised' run, not a 'pretrain' one", _guidance(source, tmp_path))
    meta = source / "checkpoints" / "best" / "1" / "meta" / "metadata"
    meta.write_text(meta.read_text().replace('"job": "supervised"', '"job": "ssl"'))
    _raises_one_line(f"{source}: a checkpoint of a 'ssl' run, not a 'pretrain' one", _guidance(source, tmp_path))
    meta.write_text(meta.read_text().replace('"job": "ssl", ', ""))  # Written before jobs were recorded.
    _raises_one_line(f"{source / 'checkpoints' / 'best' / '1'}: checkpoint does not fit this model",
                     _guidance(source, tmp_path))


def test_a_failed_read_leaves_no_read_to_finish_into_a_closed_event_loop(tmp_path, monkeypatch):
    # Large enough (64 MB) that reads are still under way when the first one fails: without the settling
    # loop, each of them finishing into Orbax's closed event loop printed an 'Event loop is closed' traceback.
    rng = np.random.default_rng(0)
    params = {f"w{i}": jnp.asarray(rng.standard_normal(1 << 20, np.float32)) for i in range(16)}
    saver = checkpoint.RunCheckpoints(tmp_path)
    saver.save(1, {"params": params}, {"job": "toy"}, is_best=True)
    saver.wait()
    saver.close()
    # The smallest file of array data: its reads fail first, while those of the others are under way.
    data = tmp_path / "checkpoints" / "best" / "1" / "state" / "ocdbt.process_0" / "d"
    os.truncate(min((f for f in data.iterdir() if f.stat().st_size > 1 << 16), key=lambda f: f.stat().st_size), 100)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    _raises_one_line(f"{tmp_path / 'checkpoints' / 'best' / '1'}: checkpoint data is damaged (",
                     lambda: checkpoint.restore_variables(tmp_path, {"params": params}))
    time.sleep(0.3)
    gc.collect()
    assert [repr(u.exc_value) for u in unraisable] == []


def test_command_line_names_damaged_data_in_one_line(saved, tmp_path):
    workdir = _copy(saved, "supervised", tmp_path)
    expected = _damage(workdir / "checkpoints" / "best" / "1", "data truncated")
    result = subprocess.run([sys.executable, "-m", "amvlm_jax.main", f"--workdir={workdir}", "--config.mode=evaluate"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {expected}"), result.stderr[-3000:]
