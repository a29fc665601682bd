"""A non-finite loss stops training and keeps the last good checkpoint; Ctrl-C saves and resumes exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amvlm_jax.train import checkpoint, supervised
from amvlm_jax.train.loop import TrainingError
from amvlm_jax.train.parallel import make_mesh, replicate

from conftest import tiny_synthetic_config

# 16 training images, batch 8: 2 steps per epoch.
CONFIG = dict(**{"train.epochs": 3, "eval.splits": ("val",)})


@pytest.fixture(scope="module")
def real_step():
    config = tiny_synthetic_config(**CONFIG)
    return supervised.make_train_step(supervised.build_unet(config), 1)


def _latest(workdir):
    config = tiny_synthetic_config(**CONFIG)
    state = supervised.create_state(config, supervised.build_unet(config), steps_per_epoch=2)
    state = replicate(make_mesh(config, jax.devices()[:1]), state)
    manager = checkpoint.RunCheckpoints(workdir)
    restored, meta = manager.restore_latest(state)
    step = manager.latest.latest_step()
    manager.close()
    return step, jax.device_get(restored.params), meta


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, real_step):
    def step_with_nan(state, batch):
        state, metrics = real_step(state, batch)
        if int(state.step) == 3:
            metrics = dict(metrics, loss=jnp.float32(jnp.nan))
        return state, metrics

    monkeypatch.setattr(supervised, "make_train_step", lambda model, num_classes: step_with_nan)
    with pytest.raises(TrainingError, match="loss is nan at step 3") as info:
        supervised.train(tiny_synthetic_config(**CONFIG), tmp_path)
    assert "\n" not in str(info.value)
    step, _, meta = _latest(tmp_path)
    assert step == 2 and meta["epoch"] == 1  # The epoch-1 checkpoint, nothing after it.


def test_ctrl_c_saves_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch, real_step):
    supervised.train(tiny_synthetic_config(**CONFIG), tmp_path / "whole")

    def step_interrupted_at_3(state, batch):
        if int(state.step) == 3:
            raise KeyboardInterrupt
        return real_step(state, batch)

    monkeypatch.setattr(supervised, "make_train_step", lambda model, num_classes: step_interrupted_at_3)
    with pytest.raises(KeyboardInterrupt, match="saved .*latest/3"):
        supervised.train(tiny_synthetic_config(**CONFIG), tmp_path / "cut")
    assert _latest(tmp_path / "cut")[0] == 3  # Mid-epoch: saved by the interrupt.

    monkeypatch.setattr(supervised, "make_train_step", lambda model, num_classes: real_step)
    supervised.train(tiny_synthetic_config(**CONFIG), tmp_path / "cut")
    whole_step, whole_params, whole_meta = _latest(tmp_path / "whole")
    cut_step, cut_params, cut_meta = _latest(tmp_path / "cut")
    assert whole_step == cut_step == 6 and whole_meta == cut_meta
    for a, b in zip(jax.tree.leaves(whole_params), jax.tree.leaves(cut_params)):
        np.testing.assert_array_equal(a, b)


# Pre-training: 16 pairs, batch 8, 3 epochs of 2 steps, a checkpoint after each.
PRETRAIN = {"pretrain.checkpoint_every_epochs": 1}

@pytest.fixture(scope="module")
def pretrain_step():
    from amvlm_jax.train import pretrain

    from conftest import tiny_pretrain_config

    config = tiny_pretrain_config(**PRETRAIN)
    model = pretrain.build_model(config, pretrain.text_encoder_config(config))
    return pretrain.make_train_step(model, config, steps_per_epoch=2)


def _latest_pretrain(run_dir):
    from amvlm_jax.train import pretrain

    from conftest import tiny_pretrain_config

    config = tiny_pretrain_config(**PRETRAIN)
    model = pretrain.build_model(config, pretrain.text_encoder_config(config))
    abstract = jax.eval_shape(lambda: pretrain.create_state(config, model, config.pretrain.image_size))
    manager = checkpoint.RunCheckpoints(run_dir)
    restored, meta = manager.restore_latest(abstract)
    step = manager.latest.latest_step()
    manager.close()
    return step, jax.device_get(restored.params), meta


def test_pretraining_nan_guard_and_ctrl_c_resume(tmp_path, monkeypatch, pretrain_step):
    from amvlm_jax.train import pretrain

    from conftest import tiny_pretrain_config

    def patched(step_fn):
        monkeypatch.setattr(pretrain, "make_train_step", lambda model, config, steps_per_epoch: step_fn)

    def with_nan(state, batch):
        state, metrics = pretrain_step(state, batch)
        if int(state.step) == 3:
            metrics = dict(metrics, loss=jnp.float32(jnp.inf))
        return state, metrics

    patched(with_nan)
    with pytest.raises(TrainingError, match="loss is inf at step 3"):
        pretrain.train(tiny_pretrain_config(**PRETRAIN), tmp_path / "nan")
    step, _, meta = _latest_pretrain(tmp_path / "nan" / "pretrain")
    assert step == 2 and meta["epoch"] == 1

    patched(pretrain_step)
    pretrain.train(tiny_pretrain_config(**PRETRAIN), tmp_path / "whole")

    def interrupted_at_3(state, batch):
        if int(state.step) == 3:
            raise KeyboardInterrupt
        return pretrain_step(state, batch)

    patched(interrupted_at_3)
    with pytest.raises(KeyboardInterrupt, match="saved .*latest/3"):
        pretrain.train(tiny_pretrain_config(**PRETRAIN), tmp_path / "cut")
    assert _latest_pretrain(tmp_path / "cut" / "pretrain")[0] == 3  # Mid-epoch: saved by the interrupt.
    patched(pretrain_step)
    pretrain.train(tiny_pretrain_config(**PRETRAIN), tmp_path / "cut")
    whole_step, whole_params, _ = _latest_pretrain(tmp_path / "whole" / "pretrain")
    cut_step, cut_params, _ = _latest_pretrain(tmp_path / "cut" / "pretrain")
    assert whole_step == cut_step == 6
    for a, b in zip(jax.tree.leaves(whole_params), jax.tree.leaves(cut_params)):
        np.testing.assert_array_equal(a, b)
