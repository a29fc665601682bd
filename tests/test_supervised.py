"""Supervised U-Net training: multi-device equivalence, resume, evaluation round trip."""

import inspect
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from amvlm_jax.config import ConfigError
from amvlm_jax.data import datasets, pipeline
from amvlm_jax.models.unet import BatchNormReLU
from amvlm_jax.train import checkpoint, evaluate, supervised
from amvlm_jax.train.parallel import make_mesh, replicate
from amvlm_jax.train.state import TrainState

from conftest import REPO_ROOT, SUITE_COMPILER_FLAGS, one_device_env, tiny_synthetic_config, xla_defaults_env


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    size = config.data.image_size
    images = rng.integers(0, 256, size=(config.train.batch_size, size, size, 3), dtype=np.uint8)
    masks = (images[..., 1] > 140).astype(np.uint8)
    return {"image": images, "mask": masks}


def test_student_rate_is_cosine_with_warm_restarts_stepped_once_per_epoch():
    """SPEC 6: Adam whose rate follows torch's CosineAnnealingWarmRestarts(T_0=restart_epochs, eta_min=min_lr)
    stepped after every epoch, here 25 epochs of 3 steps (two restarts, a last period cut at 5 of 10 epochs).
    Under a constant gradient Adam's step is the rate itself (to rounding), so the updates read the rate out."""
    config = tiny_synthetic_config(**{"train.lr": 1e-3, "train.min_lr": 1e-4, "train.restart_epochs": 10})
    steps_per_epoch, epochs = 3, 25
    tx = supervised.student_optimizer(config, steps_per_epoch)
    params = {"w": np.zeros(())}
    opt_state, update = tx.init(params), jax.jit(tx.update)
    rates = []
    for _ in range(epochs * steps_per_epoch):
        updates, opt_state = update({"w": np.ones(())}, opt_state, params)
        rates.append(-float(updates["w"]))
    epoch = np.arange(epochs * steps_per_epoch) // steps_per_epoch
    expected = 1e-4 + 9e-4 * 0.5 * (1 + np.cos(np.pi * (epoch % 10) / 10))
    np.testing.assert_allclose(rates, expected, rtol=1e-4)  # Float32 bias corrections; epochs differ by > 1%.
    torch = pytest.importorskip("torch")
    weight = torch.zeros(1, requires_grad=True)
    reference = torch.optim.Adam([weight], lr=1e-3)
    restarts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(reference, T_0=10, eta_min=1e-4)
    per_epoch = []
    for _ in range(epochs):
        per_epoch.append(reference.param_groups[0]["lr"])
        restarts.step()
    np.testing.assert_allclose(expected, np.repeat(per_epoch, steps_per_epoch), rtol=1e-12)


def test_eight_device_step_equals_one_device_step():
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    config = tiny_synthetic_config(**{"mesh.data": -1})
    model = supervised.build_unet(config)
    step = supervised.make_train_step(model, config.data.num_classes)
    results = []
    # One initialisation, on the host, for both meshes: both runs start from the same variables.
    initial = jax.device_get(supervised.init_variables(config, model))
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = make_mesh(config, devices)
        # Plain SGD: Adam's first steps are lr * sign(gradient), which turns
        # rounding noise in near-zero gradients into full-size steps.
        state = replicate(mesh, TrainState.create(initial["params"], initial["batch_stats"], optax.sgd(0.1)))
        for seed in range(2):
            state, step_metrics = step(state, pipeline.to_global(mesh, _batch(config, seed)))
        assert len(state.params["outc"]["kernel"].sharding.device_set) == len(devices)
        results.append((jax.device_get(state.params), jax.device_get(state.batch_stats), float(step_metrics["loss"])))
    (params1, stats1, loss1), (params8, stats8, loss8) = results
    assert loss1 == pytest.approx(loss8, rel=1e-5)
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # BatchNorm statistics come from the global batch, not per-device shards.
    for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(stats8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# Run with XLA's default CPU compiler settings (the job's), not the suite's (tests/conftest.py):
# two SGD steps from the variables and batches in argv[1], the losses and final variables to argv[2];
# argv[3:] names the suite's flags, none of which may be set here.
_STEPS_AT_XLA_DEFAULTS = """
import os, sys
assert not any(name in os.environ["XLA_FLAGS"] for name in sys.argv[3:])
import jax, numpy as np, optax
from amvlm_jax.models.unet import UNet
from amvlm_jax.train import supervised
from amvlm_jax.train.state import TrainState
data = np.load(sys.argv[1])
model = UNet(num_classes=1, base_width=int(data["base_width"]))
abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), data["image0"][:1] / 255.0, train=False))
leaves = [data[f"leaf{i}"] for i in range(len(jax.tree.leaves(abstract)))]
assert [x.shape for x in leaves] == [x.shape for x in jax.tree.leaves(abstract)]
variables = jax.tree.unflatten(jax.tree.structure(abstract), leaves)
state = TrainState.create(variables["params"], variables["batch_stats"], optax.sgd(0.1))
step = supervised.make_train_step(model, 1)
losses = []
for seed in range(2):
    state, metrics = step(state, {"image": data[f"image{seed}"], "mask": data[f"mask{seed}"]})
    losses.append(float(metrics["loss"]))
final = jax.tree.leaves({"params": state.params, "batch_stats": state.batch_stats})
np.savez(sys.argv[2], losses=np.array(losses), **{f"leaf{i}": np.asarray(x) for i, x in enumerate(final)})
"""


def test_the_jobs_compiler_settings_compute_what_the_suites_do(tmp_path):
    """The suite compiles without LLVM's optimisation passes and with the older fusion emitter
    (tests/conftest.py); the job with XLA's defaults. Two supervised steps agree between the two."""
    config = tiny_synthetic_config()
    model = supervised.build_unet(config)
    initial = supervised.create_state(config, model, steps_per_epoch=2)
    variables = jax.device_get({"params": initial.params, "batch_stats": initial.batch_stats})
    batches = {f"{k}{seed}": v for seed in range(2) for k, v in _batch(config, seed).items()}
    np.savez(tmp_path / "in.npz", base_width=config.unet.base_width, **batches,
             **{f"leaf{i}": x for i, x in enumerate(jax.tree.leaves(variables))})
    done = subprocess.run([sys.executable, "-c", _STEPS_AT_XLA_DEFAULTS, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"),
                           *SUITE_COMPILER_FLAGS], cwd=REPO_ROOT, env=xla_defaults_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")

    state = TrainState.create(variables["params"], variables["batch_stats"], optax.sgd(0.1))
    step = supervised.make_train_step(model, 1)
    losses = []
    for seed in range(2):
        state, step_metrics = step(state, _batch(config, seed))
        losses.append(float(step_metrics["loss"]))
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
    final = jax.tree.leaves(jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))
    # Different fusions round differently. All tensors together, the difference is within 2e-6 of how
    # far the two steps moved them (2e-7 is seen; a learning rate 0.1 % off gives 1.6e-5); each one
    # within 0.2 % (1.4e-4 seen; up to 2.7 % with that rate), or rounding where it hardly moves (a
    # bias ahead of a BatchNorm, whose gradient is zero).
    differences = [np.linalg.norm(got[f"leaf{i}"] - x) for i, x in enumerate(final)]
    moves = [np.linalg.norm(x - x0) for x, x0 in zip(final, jax.tree.leaves(variables))]
    assert np.linalg.norm(differences) <= 2e-6 * np.linalg.norm(moves), (np.linalg.norm(differences), np.linalg.norm(moves))
    for i, (difference, moved) in enumerate(zip(differences, moves)):
        assert difference <= 2e-3 * moved + 1e-8 * np.sqrt(final[i].size), (i, difference, moved)


def test_training_learns_and_evaluation_round_trips(tmp_path):
    config = tiny_synthetic_config(**{"train.epochs": 3, "unet.base_width": 8, "train.lr": 3e-3, "train.precise_bn_images": 64})
    results = supervised.train(config, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == results
    assert set(results) == {"val", "test"} and results["val"]["images"] == 8
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epoch_losses = [line["train/epoch_loss"] for line in lines if "train/epoch_loss" in line]
    assert len(epoch_losses) == 3 and epoch_losses[-1] < epoch_losses[0]
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "tensorboard"))
    # Pictures: overlays at the last epoch and the curves, as real PNG files.
    for picture in (tmp_path / "pictures" / "epoch_0003.png", tmp_path / "curves.png"):
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 5000
    csv_rows = (tmp_path / "per_image_test.csv").read_text().splitlines()
    assert csv_rows[0] == "file,dice,iou" and len(csv_rows) == 9
    per_image = np.array([float(row.split(",")[1]) for row in csv_rows[1:]])
    assert per_image.mean() == pytest.approx(results["test"]["dice"], abs=1e-3)

    # With precise_bn_images the saved statistics are those of the final weights over the training images.
    final, _ = _final_params(tmp_path, config)
    train_images = datasets.load_labeled_train(config, datasets.data_root(config, tmp_path)).images
    model = supervised.build_unet(config)
    mesh = make_mesh(config, jax.devices()[:1])
    expected = evaluate.make_batch_stats_refresh(model, train_images, mesh, config.train.batch_size)(final).batch_stats
    for saved, recomputed in zip(jax.tree.leaves(final.batch_stats), jax.tree.leaves(expected)):
        np.testing.assert_allclose(saved, recomputed, rtol=1e-5, atol=1e-6)

    # Evaluating the saved best checkpoint from another workdir gives the same numbers, also where the 8 devices
    # do not divide the command's training batch (evaluation pads its own batches): only that batch is named.
    config.mode = "evaluate"
    again = supervised.evaluate_checkpoint(config, tmp_path / "eval", str(tmp_path / "checkpoints" / "best"))
    assert again == results  # The masks' digest too: compare.py pairs the two runs.
    assert results["test"]["masks"] != results["val"]["masks"]
    config.train.batch_size, config.mesh.data = 4, -1
    assert jax.device_count() == 8
    on_eight = supervised.evaluate_checkpoint(config, tmp_path / "eval", str(tmp_path / "checkpoints" / "best"))
    for split, scores in results.items():
        assert on_eight[split] == pytest.approx(scores, abs=1e-3)
    with pytest.raises(ConfigError, match=r"^config.train.batch_size=4 is not divisible by the 8 devices of the 8x1 "):
        make_mesh(config)


def test_recomputed_batch_stats_reproduce_training_mode_in_inference():
    config = tiny_synthetic_config(**{"mesh.data": -1})
    model = supervised.build_unet(config)
    variables = supervised.init_variables(config, model)
    rng = np.random.default_rng(3)
    # Perturbed weights, so that every layer's input statistics are far from BatchNorm's initial 0 / 1.
    params = jax.tree.map(lambda p: p + 0.2 * rng.standard_normal(p.shape).astype(p.dtype), variables["params"])
    state = TrainState.create(params, variables["batch_stats"], optax.sgd(0.1))
    images = rng.integers(0, 256, size=(20, 64, 64, 3), dtype=np.uint8)
    mesh = make_mesh(config)
    assert mesh.size == 8

    def recomputed(batch_images):
        return evaluate.make_batch_stats_refresh(model, batch_images, mesh, batch_size=8)(state).batch_stats

    first, second, both = recomputed(images[:8]), recomputed(images[8:16]), recomputed(images)
    x = images[:8].astype(np.float32) / 255.0
    training_mode, captured = model.apply(variables | {"params": params}, x, train=True, mutable=["batch_stats", "intermediates"],
                                          capture_intermediates=lambda module, _: isinstance(module, BatchNormReLU))

    def as_normalised(stats):
        """The statistics training mode normalises with: the stored variance is unbiased, the batch's biased."""
        def layer(path, stat):
            if path[-1].key == "mean":
                return stat
            output = captured["intermediates"]
            for key in path[:-1]:
                output = output[key.key]
            count = np.prod(output["__call__"][0].shape[:-1])  # The values per channel: B x H x W.
            return stat * (count - 1) / count
        return jax.tree_util.tree_map_with_path(layer, stats)

    inference = model.apply({"params": params, "batch_stats": as_normalised(first)}, x, train=False)
    np.testing.assert_allclose(inference, training_mode, rtol=1e-4, atol=1e-4)
    # Several batches: the mean of their statistics; the 4 images past the last full batch are left out.
    for a, b, mean in zip(jax.tree.leaves(first), jax.tree.leaves(second), jax.tree.leaves(both)):
        np.testing.assert_allclose(mean, (a + b) / 2, rtol=1e-5, atol=1e-6)
    # Fewer images than a batch: one batch of them, rounded down to the device count.
    inference = model.apply({"params": params, "batch_stats": as_normalised(recomputed(images[:9]))}, x, train=False)
    np.testing.assert_allclose(inference, training_mode, rtol=1e-4, atol=1e-4)
    assert evaluate.make_batch_stats_refresh(model, images[:0], mesh, 8) is None
    # A batch of 12 on 8 devices: rounded down to one batch of the first 8 images.
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(evaluate.make_batch_stats_refresh(
            model, images[:12], mesh, batch_size=12)(state).batch_stats)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_evaluate_split_keeps_each_image_once_in_order_and_drops_the_padding():
    """5 images in batches of 2: the last batch is padded with a copy of image 4, which must not count."""
    from amvlm_jax.data.folders import SplitArrays
    from amvlm_jax.train import parallel

    masks = np.arange(5, dtype=np.uint8)[:, None, None] * np.ones((5, 2, 2), np.uint8)
    split = SplitArrays([f"image_{i}" for i in range(5)], np.zeros((5, 2, 2, 3), np.uint8), masks, [""] * 5)

    def eval_step(params, batch_stats, batch):  # Each row's "Dice" is its image's mask value.
        value = batch["mask"][:, :1, 0].astype(np.float32)
        return value, value / 2, value > 0

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), parallel.MESH_AXES)
    dice, iou, present = evaluate.evaluate_split(eval_step, None, None, split, mesh, batch_size=2)
    np.testing.assert_array_equal(dice[:, 0], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(iou[:, 0], [0, 0.5, 1, 1.5, 2])
    np.testing.assert_array_equal(present[:, 0], [False, True, True, True, True])


def test_evaluation_reads_pixels_in_0_1_names_its_scores_and_pads_rows_to_the_devices(tmp_path):
    """A stub model whose logit is the pixel (in [0, 1]) less 0.999: 255 is foreground, 254 background. One 1x4
    image predicted [1, 1, 0, 0] against the truth [1, 0, 1, 0]: Dice 2*1/(2+2) = 50%, IoU 1/3."""
    import types

    from amvlm_jax.data.folders import SplitArrays

    class Threshold:
        def apply(self, variables, images, train):
            return images[..., :1] - 0.999

    image = np.array([255, 255, 254, 254], np.uint8)[None, None, :, None] * np.ones((1, 1, 1, 3), np.uint8)
    split = SplitArrays(["only"], image, np.array([[[1, 0, 1, 0]]], np.uint8), [""])
    mesh = make_mesh(tiny_synthetic_config())
    evaluator = evaluate.validation_evaluator(tiny_synthetic_config(), evaluate.make_eval_step(Threshold(), 1), split, mesh)
    scores = evaluator.run(types.SimpleNamespace(params={}, batch_stats={}))
    assert scores == {"val/dice": pytest.approx(50.0), "val/miou": pytest.approx(100 / 3)}
    probability = evaluate.make_predict_step(Threshold())({}, {}, image)
    logits = np.array([255, 255, 254, 254]) / 255 - 0.999
    np.testing.assert_allclose(probability[0, 0], 1 / (1 + np.exp(-logits)), rtol=1e-5)
    # results.json of a binary task has no per-class part; the table's columns by hand.
    dice, iou, present = (np.array([[0.5]]), np.array([[1 / 3]]), np.array([[True]]))
    results = evaluate.write_results(tmp_path, {"val": (dice, iou, present), "test": None}, {"val": split})
    assert set(results["val"]) == {"dice", "miou", "images", "masks"} and results["test"] is None
    assert evaluate.format_table(results) == ("split     images     Dice     mIoU\n"
                                              "val            1    50.00    33.33\n"
                                              "test    (no data)")
    # Multi-class rows keep the columns whatever the class id's digits: class 1 and class 19 by hand.
    both = {"val": {"dice": 40.0, "miou": 30.0, "images": 12,
                    "classes": {"1": {"dice": 50.0, "miou": 25.0, "images": 12},
                                "19": {"dice": None, "miou": None, "images": 0}}}}
    assert evaluate.format_table(both) == ("split     images     Dice     mIoU\n"
                                           "val           12    40.00    30.00\n"
                                           "  class 1     12    50.00    25.00\n"
                                           "  class 19     0        -        -")
    # The masks' digest tells one split's masks from the same bytes at another size.
    masks = np.zeros((1, 4, 4), np.uint8)
    assert evaluate.masks_fingerprint(["a"], masks) != evaluate.masks_fingerprint(["a"], masks.reshape(1, 2, 8))
    # Rows for 8 devices: 5 rows padded by repeating them from the first.
    eight = make_mesh(tiny_synthetic_config(**{"mesh.data": -1}))
    batch = evaluate.rows_batch(eight, {"x": np.arange(10)[:, None] * 10}, np.arange(5))
    np.testing.assert_array_equal(np.asarray(batch["x"])[:, 0], [0, 10, 20, 30, 40, 0, 10, 20])


def test_evaluate_rejects_a_path_without_checkpoint(tmp_path):
    config = tiny_synthetic_config()
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        supervised.evaluate_checkpoint(config, tmp_path, str(tmp_path / "missing"))


def _cli(workdir, epochs):
    return [
        sys.executable, "-m", "amvlm_jax.main", f"--workdir={workdir}",
        "--config.mode=supervised", "--config.data.labeled_fraction=1.0",
        "--config.data.image_size=64", "--config.data.synthetic.num_train=16",
        "--config.data.synthetic.num_val=8", "--config.data.synthetic.num_test=8",
        "--config.unet.base_width=4", "--config.train.batch_size=8", f"--config.train.epochs={epochs}",
        "--config.train.eval_batch_size=8", "--config.eval.splits=('val',)",
    ]


def _final_params(workdir, config=None):
    config = config or tiny_synthetic_config()
    model = supervised.build_unet(config)
    mesh = make_mesh(config, jax.devices()[:1])
    state = replicate(mesh, supervised.create_state(config, model, steps_per_epoch=2))
    manager = checkpoint.RunCheckpoints(workdir)
    state, meta = manager.restore_latest(state)
    manager.close()
    return jax.device_get(state), meta


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    env = one_device_env(JAX_PLATFORMS="cpu")
    epochs = 4
    subprocess.run(_cli(tmp_path / "whole", epochs), cwd=REPO_ROOT, env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_cli(killed, epochs), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir())):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps = [int(p.name) for p in latest.iterdir() if p.name.isdigit()]
    assert steps and max(steps) < epochs * 2, "the run was killed before it finished"
    killed_run = checkpoint.read_meta(latest / str(max(steps)))["run_id"]

    resumed = subprocess.run(_cli(killed, epochs), cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    whole_state, whole_meta = _final_params(tmp_path / "whole")
    resumed_state, resumed_meta = _final_params(killed)
    # The same bookkeeping, apart from the time taken, the run's id (the resumed run keeps the killed one's) and
    # the workdir's own data folder in the recorded config.
    assert resumed_meta["run_id"] == killed_run != whole_meta["run_id"]
    timeless = lambda meta: {k: v for k, v in meta.items() if k not in ("seconds", "run_id")}  # noqa: E731
    for meta, workdir in ((whole_meta, tmp_path / "whole"), (resumed_meta, killed)):
        assert meta["config"]["data"].pop("root") == str(workdir / "data")
    assert timeless(whole_meta) == timeless(resumed_meta) and whole_meta["epoch"] == epochs
    for a, b in zip(jax.tree.leaves(whole_state), jax.tree.leaves(resumed_state)):
        np.testing.assert_array_equal(a, b)

    # Resuming with a field that changes the model's shapes: one line naming it, and no asyncio noise of
    # checkpoint threads left running at exit.
    wider = subprocess.run(_cli(killed, epochs) + ["--config.unet.base_width=8"], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True)
    assert wider.returncode != 0
    assert "Traceback" not in wider.stderr and "Event loop is closed" not in wider.stderr, wider.stderr[-3000:]
    last = wider.stderr.strip().splitlines()[-1]  # After the progress bars of the data reading.
    assert last.startswith("error: ") and "config.unet.base_width=4 -> 8" in last



def test_multiclass_step_against_the_authors_unet_in_torch():
    """One 3-class supervised step against the authors' U-Net in torch (tools/torch_unet_reference.py) in
    training mode, on uint8 images / 255, with 0.5 Dice over classes 1-2 + 0.5 cross-entropy written here in
    torch: the loss, the gradients (SGD at rate 1e4, so the update reads them out), the running BatchNorm
    statistics it moves, and the training Dice of the argmax (per image, mean over classes 1-2, 1 where a
    class is in neither prediction nor mask)."""
    torch = pytest.importorskip("torch")
    from torch.nn import functional as F

    from amvlm_jax.models.unet import UNet
    from conftest import repo_module

    reference = repo_module("tools/torch_unet_reference.py")
    model = UNet(num_classes=3, base_width=4)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    masks = (images[..., 0] // 86).astype(np.uint8)  # Classes 0, 1, 2.
    variables = jax.device_get(model.init(jax.random.PRNGKey(1), np.zeros((1, 32, 32, 3), np.float32)))
    # Stored statistics away from (0, 1), so that the step's moving of them shows.
    stats = jax.tree.map(lambda s: s + np.float32(0.3) * rng.uniform(size=s.shape).astype(np.float32), variables["batch_stats"])
    rate = 1e4
    state = TrainState.create(variables["params"], stats, optax.sgd(rate))
    stepped, step_metrics = supervised.make_train_step(model, 3)(state, {"image": images, "mask": masks})

    torch_unet = reference.load_flax_variables(reference.AuthorsUNet(4, num_classes=3), variables["params"], stats).train()
    logits = torch_unet(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    labels = torch.from_numpy(masks).long()
    p = logits.softmax(1)[:, 1:].flatten(2)
    y = F.one_hot(labels, 3).permute(0, 3, 1, 2)[:, 1:].flatten(2).float()
    dice = 1 - (2 * (p * y).sum(-1) + 4e-5) / ((p * p).sum(-1) + (y * y).sum(-1) + 4e-5)
    loss = 0.5 * dice.mean() + 0.5 * F.cross_entropy(logits, labels)
    loss.backward()
    assert float(step_metrics["loss"]) == pytest.approx(loss.item(), rel=1e-5)

    grads = jax.tree.map(lambda before, after: (before - after) / rate, variables["params"], jax.device_get(stepped.params))
    ours = reference.load_flax_variables(reference.AuthorsUNet(4, num_classes=3), grads, jax.device_get(stepped.batch_stats))
    for (name, theirs), mine in zip(torch_unet.named_parameters(), ours.parameters()):
        np.testing.assert_allclose(mine.detach().numpy(), theirs.grad.numpy(), rtol=1e-3, atol=1e-6, err_msg=name)
    for (name, theirs), mine in zip(torch_unet.named_buffers(), ours.named_buffers()):
        if name.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(mine[1].numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)

    predicted = logits.argmax(1).numpy()
    scores = []
    for image in range(2):
        for c in (1, 2):
            shown, true = predicted[image] == c, masks[image] == c
            total = shown.sum() + true.sum()
            scores.append(1.0 if total == 0 else 2 * (shown & true).sum() / total)
    assert float(step_metrics["train_dice"]) == pytest.approx(np.mean(scores), rel=1e-5)


def test_the_jobs_model_seed_and_best_checkpoint_follow_the_config(tmp_path):
    """build_unet takes config.unet.architecture; the fresh weights come from config.seed (two seeds: two
    initialisations); the job keeps the best checkpoint by validation Dice (SPEC 6), and the newest where
    there is no validation split."""
    from amvlm_jax.data.folders import SplitArrays

    config = tiny_synthetic_config(**{"unet.architecture": "textbook", "seed": 3})
    assert supervised.build_unet(config).architecture == "textbook"
    config.unet.architecture = "authors"
    model = supervised.build_unet(config)
    variables = supervised.init_variables(config, model)
    config.seed = 4
    other = supervised.init_variables(config, model)
    kernel = lambda v: np.asarray(v["params"]["outc"]["kernel"])  # noqa: E731
    assert not np.allclose(kernel(variables), kernel(other))
    np.testing.assert_array_equal(kernel(variables), kernel(model.init(jax.random.PRNGKey(3), np.zeros((1, 64, 64, 3)))))
    mesh = make_mesh(config, jax.devices()[:1])
    val = SplitArrays(["a"], np.zeros((1, 64, 64, 3), np.uint8), np.zeros((1, 64, 64), np.uint8), [""])
    no_images = np.zeros((0, 64, 64, 3), np.uint8)
    for split, best in ((val, "val/dice"), (None, None)):
        job = supervised.segmentation_job("supervised", config, tmp_path, mesh, model, None, None, None, 2, split, None,
                                          no_images, 8)
        assert job.best_metric == best and len(job.evaluators) == (split is not None)


def test_an_epoch_is_ceil_of_the_images_over_the_batch_and_precise_bn_reads_the_first_training_images(tmp_path,
                                                                                                      monkeypatch):
    """16 training images in batches of 6: 3 steps an epoch (the last batch wraps; 2 would leave 4 images out
    of every epoch). precise_bn_images=5: BatchNorm statistics are refreshed over the first 5 training images
    in batches of train.batch_size (what a training step's BatchNorm sees)."""
    config = tiny_synthetic_config(**{"train.batch_size": 6, "train.precise_bn_images": 5})
    seen = {}
    signature = inspect.signature(supervised.segmentation_job)
    monkeypatch.setattr(supervised, "segmentation_job", lambda *args: seen.update(signature.bind(*args).arguments))
    monkeypatch.setattr(supervised.loop, "run", lambda job: None)
    monkeypatch.setattr(supervised, "initial_state", lambda *args: None)  # Read by no assertion here.
    monkeypatch.setattr(supervised, "evaluate_checkpoint", lambda *args, **kwargs: {})
    supervised.train(config, tmp_path)
    train_images = datasets.load_labeled_train(config, datasets.data_root(config, tmp_path)).images
    assert len(train_images) == 16 and seen["steps_per_epoch"] == 3 and seen["batch_stats_batch_size"] == 6
    np.testing.assert_array_equal(seen["batch_stats_images"], train_images[:5])
