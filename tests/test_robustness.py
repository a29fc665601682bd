"""A non-finite loss stops training and keeps the last good checkpoint; Ctrl-C saves and resumes exactly.

Supervised training and pre-training (both through train/loop.py) go
through the same scenario: 3 epochs of 2 steps with a checkpoint after
each, a loss of nan or inf at step 3, a Ctrl-C at step 3.
"""

import dataclasses
import signal
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amvlm_jax.train import build, checkpoint, pretrain, supervised
from amvlm_jax.train.loop import TrainingError

from conftest import interrupt_inside_a_gc_callback, tiny_pretrain_config, tiny_synthetic_config


@dataclasses.dataclass
class Job:
    """One training mode as the scenario drives it."""

    train: Callable  # workdir -> None
    patch_step: Callable  # step function -> None: the next train() uses it
    real_step: Callable  # the real jitted step
    latest: Callable  # workdir -> (latest step, params as numpy, checkpoint metadata)
    latest_step: Callable  # workdir -> (the latest step, its checkpoint metadata), read without restoring it


def _latest_step(run_dir):
    manager = checkpoint.RunCheckpoints(run_dir)
    step, meta = manager.latest.latest_step(), manager.latest_meta()
    manager.close()
    return step, meta


def _restore_latest(run_dir, state):
    manager = checkpoint.RunCheckpoints(run_dir)
    restored, meta = manager.restore_latest(state)
    step = manager.latest.latest_step()
    manager.close()
    return step, jax.device_get(restored.params), meta


@pytest.fixture(scope="module")
def supervised_job():
    config = tiny_synthetic_config(**{"train.epochs": 3, "eval.splits": ("val",)})  # 16 images, batch 8.
    model = supervised.build_unet(config)
    abstract = jax.eval_shape(lambda: supervised.create_state(config, model, steps_per_epoch=2))
    with pytest.MonkeyPatch.context() as patch:
        yield Job(
            train=lambda workdir: supervised.train(config, workdir),
            patch_step=lambda fn: patch.setattr(supervised, "make_train_step", lambda model, num_classes: fn),
            real_step=supervised.make_train_step(model, 1),
            latest=lambda workdir: _restore_latest(workdir, abstract),
            latest_step=_latest_step,
        )


@pytest.fixture(scope="module")
def pretrain_job():
    config = tiny_pretrain_config(**{"pretrain.checkpoint_every_epochs": 1})  # 16 pairs, batch 8, 3 epochs.
    model = build.build_model(config, build.text_encoder_config(config))
    abstract = jax.eval_shape(lambda: pretrain.create_state(config, model, config.pretrain.image_size))
    with pytest.MonkeyPatch.context() as patch:
        yield Job(
            train=lambda workdir: pretrain.train(config, workdir),
            patch_step=lambda fn: patch.setattr(pretrain, "make_train_step", lambda model, config: fn),
            real_step=pretrain.make_train_step(model, config),
            latest=lambda workdir: _restore_latest(workdir / "pretrain", abstract),
            latest_step=lambda workdir: _latest_step(workdir / "pretrain"),
        )


@pytest.fixture(params=["supervised", "pretrain"])
def job(request):
    return request.getfixturevalue(f"{request.param}_job")


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, job, bad):
    def step_with_bad_loss(state, batch):
        state, metrics = job.real_step(state, batch)
        if int(state.step) == 3:
            metrics = dict(metrics, loss=jnp.float32(bad))
        return state, metrics

    job.patch_step(step_with_bad_loss)
    with pytest.raises(TrainingError, match=f"loss is {bad} at step 3") as info:
        job.train(tmp_path)
    assert "\n" not in str(info.value)
    step, _, meta = job.latest(tmp_path)
    assert step == 2 and meta["epoch"] == 1  # The epoch-1 checkpoint, nothing after it.


def test_ctrl_c_saves_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, job):
    job.patch_step(job.real_step)
    job.train(tmp_path / "whole")

    def step_interrupted_at_3(state, batch):
        if int(state.step) == 3:
            raise KeyboardInterrupt
        return job.real_step(state, batch)

    job.patch_step(step_interrupted_at_3)
    with pytest.raises(KeyboardInterrupt, match="saved .*latest/3"):
        job.train(tmp_path / "cut")
    # Mid-epoch: saved by the interrupt. Its step and meta only: the resumed run below restores it, and could
    # not match the whole run's parameters from anything else.
    cut_step, cut_at_3 = job.latest_step(tmp_path / "cut")
    assert cut_step == 3

    job.patch_step(job.real_step)
    job.train(tmp_path / "cut")
    whole_step, whole_params, whole_meta = job.latest(tmp_path / "whole")
    cut_step, cut_params, cut_meta = job.latest(tmp_path / "cut")
    assert whole_step == cut_step == 6
    # The resumed run is the run that was cut (its run_id); the same bookkeeping but for the time taken.
    assert cut_meta["run_id"] == cut_at_3["run_id"] != whole_meta["run_id"]
    kept = lambda meta: {k: v for k, v in meta.items() if k not in ("seconds", "run_id")}  # noqa: E731
    assert kept(whole_meta) == kept(cut_meta)
    for a, b in zip(jax.tree.leaves(whole_params), jax.tree.leaves(cut_params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # The dropped KeyboardInterrupt.
def test_a_ctrl_c_dropped_inside_a_garbage_collector_callback_still_stops_and_saves(tmp_path, supervised_job):
    def step_interrupted_in_gc_at_3(state, batch):
        if int(state.step) == 3:
            interrupt_inside_a_gc_callback()
        return supervised_job.real_step(state, batch)

    supervised_job.patch_step(step_interrupted_in_gc_at_3)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # A pytest-xdist worker ignores SIGINT.
    try:
        with pytest.raises(KeyboardInterrupt, match="saved .*latest/4"):
            supervised_job.train(tmp_path)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # The loop's own handler is gone.
    finally:
        signal.signal(signal.SIGINT, before)
    assert supervised_job.latest(tmp_path)[0] == 4  # Step 3 ran to its end; the loop stopped before step 5.
