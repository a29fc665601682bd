"""Mean-teacher SSMIS: the step's teacher, pseudo-labels and losses; text guidance end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amvlm_jax import main
from amvlm_jax.config import ConfigError
from amvlm_jax.data import pipeline
from amvlm_jax.losses.segmentation import segmentation_loss
from amvlm_jax.train import checkpoint, ssl, supervised
from amvlm_jax.train.parallel import make_mesh, replicate

from conftest import tiny_pretrain_config, tiny_synthetic_config


def _batch(config, seed):
    rng = np.random.default_rng(seed)
    size, b = config.data.image_size, config.train.batch_size
    images = rng.integers(0, 256, size=(b, size, size, 3), dtype=np.uint8)
    return {
        "image": images,
        "mask": (images[..., 0] > 128).astype(np.uint8),
        "unlabeled_image": rng.integers(0, 256, size=(b, size, size, 3), dtype=np.uint8),
    }


@pytest.fixture(scope="module")
def vision_only():
    config = tiny_synthetic_config(**{"mode": "ssl", "ssl.w_text": 0.0, "ssl.train_decoder": False})
    model = supervised.build_unet(config)
    return config, model, ssl.make_ssl_step(config, model, None, None)


def test_vision_only_step_uses_teacher_pseudo_labels_and_moves_teacher_by_ema(vision_only):
    config, model, step = vision_only
    assert not ssl.text_guidance_enabled(config)
    mesh = make_mesh(config, jax.devices()[:1])
    state, _ = ssl.create_state(config, model, None, steps_per_epoch=2)
    state = replicate(mesh, state)
    batch = _batch(config, 0)

    # The loss the step reports, recomputed independently from the initial variables.
    x_l = batch["image"].astype(np.float32) / 255
    x_u = batch["unlabeled_image"].astype(np.float32) / 255
    teacher_logits = model.apply(jax.device_get(state.ema), x_u, train=False)
    pseudo = jax.nn.sigmoid(teacher_logits[..., 0])
    student_logits, _ = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, np.concatenate([x_l, x_u]), train=True,
        mutable=["batch_stats"],
    )
    expected = segmentation_loss(student_logits, jnp.concatenate([batch["mask"].astype(np.float32), pseudo]))

    state, metrics1 = step(state, None, pipeline.to_global(mesh, batch))
    assert float(metrics1["loss"]) == pytest.approx(float(expected), rel=1e-5)
    # alpha_0 = 0: after the first update the teacher is the student.
    for t, s in zip(jax.tree.leaves(state.ema["params"]), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(t), np.asarray(s))

    teacher_before = jax.device_get(state.ema)
    state, _ = step(state, None, pipeline.to_global(mesh, _batch(config, 1)))
    student = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    alpha = 0.5  # min(1 - 1/(1 + 1), 0.99)
    for before, after, s in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(jax.device_get(state.ema)), jax.tree.leaves(student)):
        np.testing.assert_allclose(after, alpha * before + (1 - alpha) * s, rtol=1e-6, atol=1e-7)


def test_ssl_needs_pretrained_encoders_for_text(tmp_path):
    config = tiny_pretrain_config(**{"mode": "ssl", "data.labeled_fraction": 0.5})
    with pytest.raises(ConfigError, match="no pre-trained encoders"):
        ssl.train(config, tmp_path)


def test_all_mode_pretrains_then_trains_text_guided_and_resumes(tmp_path):
    config = tiny_pretrain_config(**{
        "mode": "all", "pretrain.epochs": 1, "train.epochs": 2, "data.labeled_fraction": 0.5,
        "ssl.decoder_lr": 1e-2,
    })
    results = main.run(config, tmp_path)
    assert (tmp_path / "pretrain" / "summary.json").is_file()
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert results["val"]["images"] == 8 and 0.0 <= results["val"]["dice"] <= 100.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tg = [r["train/tg_loss"] for r in records if "train/tg_loss" in r]
    assert len(tg) == 2 and all(np.isfinite(tg))  # 8 unlabeled images, batch 8: one step per epoch.
    # The decoder is trained on L_tg: its gates left their zero initialisation.
    model = supervised.build_unet(config)
    mesh = make_mesh(config, jax.devices()[:1])
    guidance = ssl.TextGuidance(config, tmp_path, mesh)
    state, _ = ssl.create_state(config, model, guidance, steps_per_epoch=1)
    manager = checkpoint.RunCheckpoints(tmp_path)
    restored, meta = manager.restore_latest(replicate(mesh, state))
    manager.close()
    assert meta["epoch"] == 2
    gates = [float(v) for path, v in jax.tree_util.tree_leaves_with_path(restored.extra["decoder"]) if "gate" in str(path)]
    assert gates and all(g != 0.0 for g in gates)
    # Running again resumes both stages and trains no further epoch.
    assert main.run(config, tmp_path) == results
