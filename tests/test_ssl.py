"""Mean-teacher SSMIS: the step's teacher, pseudo-labels and losses; text guidance end to end."""

import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amvlm_jax import main
from amvlm_jax.config import ConfigError
from amvlm_jax.data import datasets, pipeline
from amvlm_jax.losses.segmentation import segmentation_loss
from amvlm_jax.train import checkpoint, ssl, supervised
from amvlm_jax.train.parallel import make_mesh, replicate

from conftest import repo_module, tiny_pretrain_config, tiny_synthetic_config, with_fields



def _batch(config, seed):
    rng = np.random.default_rng(seed)
    size, b = config.data.image_size, config.train.batch_size
    images = rng.integers(0, 256, size=(b, size, size, 3), dtype=np.uint8)
    return {
        "image": images,
        "mask": (images[..., 0] > 128).astype(np.uint8),
        "unlabeled_image": rng.integers(0, 256, size=(b, size, size, 3), dtype=np.uint8),
    }


@functools.partial(jax.jit, static_argnums=0)
def _train_mode_logits(model, variables, x):
    """model.apply in training mode (BatchNorm over the batch ``x``), the logits: one program per model and
    shape, shared by the tests that recompute a step's forward passes (op by op, the U-Net compiles slower)."""
    return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]


@pytest.fixture(scope="module")
def vision_only():
    config = tiny_synthetic_config(**{"mode": "ssl", "ssl.w_text": 0.0, "ssl.train_decoder": False})
    model = supervised.build_unet(config)
    return config, model, ssl.make_ssl_step(config, model, None, None)


def test_vision_only_step_uses_teacher_pseudo_labels_and_moves_teacher_by_ema(vision_only):
    config, model, step = vision_only
    assert not ssl.text_guidance_enabled(config)
    # w_text = 0 alone still trains the decoder on L_tg (its masks scored, not fused): the encoders are needed.
    assert ssl.text_guidance_enabled(tiny_synthetic_config(**{"mode": "ssl", "ssl.w_text": 0.0}))
    assert ssl.text_guidance_enabled(tiny_synthetic_config(**{"mode": "ssl", "ssl.w_text": 0.0, "ssl.train_decoder": False,
                                                              "ssl.text_head": "words"}))
    mesh = make_mesh(config, jax.devices()[:1])
    state, _ = ssl.create_state(config, model, None, steps_per_epoch=2)
    # The teacher starts as a copy of the student: its first pseudo-labels are the initial student's.
    for t, s in zip(jax.tree.leaves(state.teacher), jax.tree.leaves({"params": state.params, "batch_stats": state.batch_stats})):
        np.testing.assert_array_equal(np.asarray(t), np.asarray(s))
    state = replicate(mesh, state)
    batch = _batch(config, 0)

    # The loss the step reports, recomputed independently from the initial variables.
    x_l = batch["image"].astype(np.float32) / 255
    x_u = batch["unlabeled_image"].astype(np.float32) / 255
    # The teacher normalises with the statistics of the unlabeled batch (ssl.teacher_norm = 'batch').
    pseudo = jax.nn.sigmoid(_train_mode_logits(model, jax.device_get(state.teacher), x_u)[..., 0])
    student_logits = _train_mode_logits(model, {"params": state.params, "batch_stats": state.batch_stats},
                                        np.concatenate([x_l, x_u]))
    expected = segmentation_loss(student_logits, jnp.concatenate([batch["mask"].astype(np.float32), pseudo]))

    state, metrics1 = step(state, None, pipeline.to_global(mesh, batch))
    assert float(metrics1["loss"]) == pytest.approx(float(expected), rel=1e-5)
    # alpha_0 = 0: after the first update the teacher is the student.
    for t, s in zip(jax.tree.leaves(state.teacher["params"]), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(t), np.asarray(s))

    teacher_before = jax.device_get(state.teacher)
    state, _ = step(state, None, pipeline.to_global(mesh, _batch(config, 1)))
    student = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    alpha = 0.5  # min(1 - 1/(1 + 1), 0.99)
    for before, after, s in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(jax.device_get(state.teacher)), jax.tree.leaves(student)):
        np.testing.assert_allclose(after, alpha * before + (1 - alpha) * s, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def ramped_and_capped():
    """One vision-only step with a ramp-up of the unlabeled weight and a low EMA cap, shared by two tests."""
    config = tiny_synthetic_config(**{
        "mode": "ssl", "ssl.w_text": 0.0, "ssl.train_decoder": False, "ssl.rampup_epochs": 2.0, "ssl.ema_max_alpha": 0.25,
    })
    model = supervised.build_unet(config)
    return config, model, ssl.make_ssl_step(config, model, None, None, steps_per_epoch=3)


def test_teacher_ema_rate_is_capped_by_config(ramped_and_capped):
    # ssl.ema_max_alpha = 0.25: the second update (t = 1) moves the teacher by min(1 - 1/2, 0.25) = 0.25.
    config, model, step = ramped_and_capped
    mesh = make_mesh(config, jax.devices()[:1])
    state = replicate(mesh, ssl.create_state(config, model, None, steps_per_epoch=3)[0])
    state, _ = step(state, None, pipeline.to_global(mesh, _batch(config, 0)))
    teacher_before = jax.device_get(state.teacher)
    state, _ = step(state, None, pipeline.to_global(mesh, _batch(config, 1)))
    student = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    for before, after, s in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(jax.device_get(state.teacher)), jax.tree.leaves(student)):
        np.testing.assert_allclose(after, 0.25 * before + 0.75 * s, rtol=1e-6, atol=1e-7)
    bad = tiny_synthetic_config(**{"mode": "ssl", "ssl.ema_max_alpha": 1.0})
    with pytest.raises(ConfigError, match="ema_max_alpha"):
        main.run(bad, "unused")


def test_unlabeled_weight_ramps_up_and_splits_the_student_loss(ramped_and_capped):
    from amvlm_jax.losses.text_guided import unlabeled_weight

    assert float(unlabeled_weight(0, 0.5, 0)) == 0.5  # No ramp-up: the weight itself.
    assert float(unlabeled_weight(0, 0.5, 10)) == pytest.approx(0.5 * np.exp(-5.0))
    assert float(unlabeled_weight(5, 0.5, 10)) == pytest.approx(0.5 * np.exp(-1.25))
    assert float(unlabeled_weight(30, 0.5, 10)) == pytest.approx(0.5)

    # rampup_epochs = 2 at 3 steps per epoch: the first update weighs the unlabeled half by exp(-5).
    config, model, step = ramped_and_capped
    mesh = make_mesh(config, jax.devices()[:1])
    state = replicate(mesh, ssl.create_state(config, model, None, steps_per_epoch=3)[0])
    batch = _batch(config, 0)
    x_l = batch["image"].astype(np.float32) / 255
    x_u = batch["unlabeled_image"].astype(np.float32) / 255
    teacher_logits = _train_mode_logits(model, jax.device_get(state.teacher), x_u)
    logits = _train_mode_logits(model, {"params": state.params, "batch_stats": state.batch_stats},
                                np.concatenate([x_l, x_u]))
    n = x_l.shape[0]
    labeled_loss = segmentation_loss(logits[:n], batch["mask"].astype(np.float32))
    unlabeled_loss = segmentation_loss(logits[n:], jax.nn.sigmoid(teacher_logits[..., 0]))
    host = jax.device_get(state)  # A copy placed like the state: the step donates its state.
    later = replicate(mesh, host.replace(step=host.step + 1))
    _, metrics = step(state, None, pipeline.to_global(mesh, batch))
    assert float(metrics["loss"]) == pytest.approx(float(labeled_loss + np.exp(-5.0) * unlabeled_loss), rel=1e-5)
    # The same inputs at update 1: the ramp runs over 2 epochs x 3 steps = 6 updates, exp(-5 (1 - 1/6)^2)
    # (over 2 updates, as if rampup_epochs counted steps, it would be exp(-5 / 4)).
    _, metrics = step(later, None, pipeline.to_global(mesh, batch))
    expected = labeled_loss + np.exp(-5.0 * (5 / 6) ** 2) * unlabeled_loss
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)


def test_decoder_adam_rate_defaults_to_the_training_rate():
    # SPEC 6: the decoder's own Adam runs at the step's rate unless ssl.decoder_lr is set. Adam's first
    # step moves every parameter by the rate (times the gradient's sign).
    for decoder_lr, expected in ((0.0, 3e-4), (1e-2, 1e-2)):
        config = tiny_synthetic_config(**{"mode": "ssl", "train.lr": 3e-4, "ssl.decoder_lr": decoder_lr})
        _, decoder_tx = ssl.create_state(config, supervised.build_unet(config), None, steps_per_epoch=1)
        params = {"w": jnp.zeros(3)}
        updates, _ = decoder_tx.update({"w": jnp.array([1.0, -2.0, 0.5])}, decoder_tx.init(params), params)
        np.testing.assert_allclose(updates["w"], [-expected, expected, -expected], rtol=1e-4)


def test_the_step_moves_only_the_decoder_and_its_scale_by_adam_on_l_tg_alone(all_run):
    """SPEC 5/6 and 8.14: the generator's update is one Adam step (its first: the rate times the sign of
    the gradient) on the gradient of L_tg alone, recomputed here: the student's loss adds nothing to it. With
    s = exp(l) above its clamp at 100, l gets no gradient and stays."""
    config, tmp_path, _ = all_run
    mesh = make_mesh(config, jax.devices()[:1])
    guidance = ssl.TextGuidance(config, tmp_path, mesh)
    model = supervised.build_unet(config)
    fresh, decoder_tx = ssl.create_state(config, model, guidance, steps_per_epoch=1)
    fresh = jax.device_get(fresh)  # On the host: each step donates the device state it is given.
    step = ssl.make_ssl_step(config, model, guidance, decoder_tx)
    batch = _batch(config, 0)
    tokens = guidance.tokenizer([f"report {i}: a lesion in the upper left" if i % 2 else "no finding"
                                 for i in range(config.train.batch_size)])
    batch |= {f"report_{k}": v for k, v in tokens.items()}
    x_u = batch["unlabeled_image"].astype(np.float32) / 255

    def l_tg(trained):
        loss, masks = ssl.text_mask_outputs(guidance, trained, guidance.variables, x_u, tokens)
        return loss, masks["p_text"]

    # The student learns the unlabelled images from SPEC 6's pseudo-labels: the teacher's probability and the
    # text mask (the decoder's before its step) summed in logit space, each clipped at 1e-4 (text_clip).
    p_teacher = jax.nn.sigmoid(_train_mode_logits(model, fresh.teacher, x_u)[..., 0])

    for log_scale in (fresh.generator["log_scale"], jnp.log(200.0)):
        state = fresh.replace(generator={**fresh.generator, "log_scale": jnp.asarray(log_scale, jnp.float32)})
        before = jax.device_get(ssl.generator_params(guidance, state.generator))
        grads, p_text = jax.device_get(jax.jit(jax.grad(l_tg, has_aux=True))(before))
        clipped = [np.clip(np.asarray(p, np.float64), 1e-4, 1 - 1e-4) for p in (p_teacher, p_text)]
        logits = [np.log(p) - np.log1p(-p) for p in clipped]
        fused = 1 / (1 + np.exp(-(logits[0] + config.ssl.w_text * logits[1])))
        assert abs(fused.mean() - float(np.mean(p_teacher))) > 0.01  # The text masks move them.
        state, step_metrics = step(replicate(mesh, state), guidance.variables, pipeline.to_global(mesh, batch))
        assert float(step_metrics["pseudo_label_mean"]) == pytest.approx(fused.mean(), rel=1e-5)
        after = jax.device_get(ssl.generator_params(guidance, state.generator))
        for g, b, a in zip(jax.tree.leaves(grads), jax.tree.leaves(before), jax.tree.leaves(after)):
            np.testing.assert_allclose(a, b - config.ssl.decoder_lr * g / (np.abs(g) + 1e-8), rtol=0, atol=1e-6)
        # The step's sign alone would not see another term; Adam's first moment (1 - 0.9) g holds the gradient.
        moment = jax.device_get(state.generator["opt_state"][0].mu)
        for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(moment)):
            np.testing.assert_allclose(m, 0.1 * g, rtol=1e-4, atol=1e-9)
    assert float(grads["log_scale"]) == 0.0 and float(after["log_scale"]) == pytest.approx(np.log(200.0))


def test_ssl_needs_pretrained_encoders_for_text(tmp_path):
    config = tiny_pretrain_config(**{"mode": "ssl", "data.labeled_fraction": 0.5})
    with pytest.raises(ConfigError, match="no pre-trained encoders"):
        ssl.train(config, tmp_path)


@pytest.fixture(scope="module")
def all_run(tmp_path_factory):
    """A tiny 'all' run (pre-training, text-guided SSMIS, evaluation), shared by the tests below."""
    workdir = tmp_path_factory.mktemp("all_run")
    config = tiny_pretrain_config(**{
        "mode": "all", "pretrain.epochs": 1, "train.epochs": 2, "data.labeled_fraction": 0.5,
        "ssl.decoder_lr": 1e-2,
    })
    return config, workdir, main.run(config, workdir)


def test_all_mode_pretrains_then_trains_text_guided_and_resumes(all_run):
    config, tmp_path, results = all_run
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
    gates = [float(v) for path, v in jax.tree_util.tree_leaves_with_path(restored.generator["decoder"]) if "gate" in str(path)]
    assert gates and all(g != 0.0 for g in gates)
    # Running again resumes both stages and trains no further epoch.
    assert main.run(config, tmp_path) == results
    # Pictures of the last epoch (image, truth, prediction, pseudo-label, text mask) and the curves.
    assert (tmp_path / "pictures" / "epoch_0002.png").is_file() and (tmp_path / "curves.png").is_file()


def test_pseudo_label_scores_and_evaluation_round_trip(all_run, tmp_path):
    config, run_dir, results = all_run
    # How good are the pseudo-labels: text masks, teacher and fused labels on the 8 unlabeled images and on val.
    guidance = json.loads((run_dir / "guidance.json").read_text())
    assert guidance["unlabeled"]["images"] == 8 and guidance["val"]["images"] == 8
    for split in ("unlabeled", "val"):
        for name in ssl.GUIDANCE_MAPS:
            values = guidance[split][name]
            assert 0.0 <= values["dice"] <= 100.0 and 0.0 <= values["miou"] <= values["dice"] + 1e-6
            assert 0.0 <= values["auroc"] <= 100.0
    rows = (run_dir / "per_image_guidance_unlabeled.csv").read_text().splitlines()
    assert rows[0] == "file,text_mask_dice,teacher_dice,pseudo_label_dice,student_dice" and len(rows) == 9
    per_image = np.array([[float(x) for x in row.split(",")[1:]] for row in rows[1:]])
    np.testing.assert_allclose(per_image.mean(0), [guidance["unlabeled"][n]["dice"] for n in ssl.GUIDANCE_MAPS], atol=1e-3)

    # The student's column, recomputed: the best checkpoint's student on the 8 val images (one batch), with
    # BatchNorm over that batch as the teacher predicts (ssl.teacher_norm = 'batch'), thresholded at 0.5.
    model = supervised.build_unet(config)
    template, _ = ssl.create_state(config, model, None, steps_per_epoch=1)
    student, _, _ = checkpoint.restore_variables(
        run_dir / "checkpoints" / "best", {"params": template.params, "batch_stats": template.batch_stats}
    )
    val = datasets.load_eval_split(config, datasets.data_root(config, run_dir), "val")
    logits = _train_mode_logits(model, jax.device_get(student), val.images.astype(np.float32) / 255)
    predicted, truth = np.asarray(logits[..., 0]) > 0.0, val.masks > 0
    overlap = 2.0 * (predicted & truth).sum((1, 2))
    expected = np.where(predicted.sum((1, 2)) + truth.sum((1, 2)) == 0, 1.0, overlap / np.maximum(predicted.sum((1, 2)) + truth.sum((1, 2)), 1))
    rows = (run_dir / "per_image_guidance_val.csv").read_text().splitlines()
    np.testing.assert_allclose([float(row.split(",")[4]) for row in rows[1:]], 100 * expected, atol=1e-3)

    # Evaluating the checkpoint later gives the same numbers, pseudo-labels included.
    (run_dir / "guidance.json").unlink()
    evaluate_config = config.copy_and_resolve_references()
    evaluate_config.mode = "evaluate"
    assert main.run(evaluate_config, run_dir) == results
    assert json.loads((run_dir / "guidance.json").read_text()) == guidance

    # The teacher labelled train.batch_size (8) images at a time with their BatchNorm statistics (teacher_norm
    # 'batch'): a command with smaller batches (3, and 3 to score at) scores the run in its recorded batches.
    smaller = config.copy_and_resolve_references()
    smaller.train.batch_size = smaller.train.eval_batch_size = 3
    smaller.ssl.pretrained = str(run_dir / "pretrain")
    rescored = ssl.evaluate_guidance(smaller, tmp_path, str(run_dir / "checkpoints" / "best"),
                                     root=datasets.data_root(config, run_dir))
    assert rescored.keys() == guidance.keys()
    for split, scores in guidance.items():
        assert rescored[split]["images"] == scores["images"]
        for name in ssl.GUIDANCE_MAPS:
            assert rescored[split][name] == pytest.approx(scores[name], rel=1e-5, abs=1e-4), (split, name)



def test_evaluating_only_splits_the_data_lacks_is_one_line_and_writes_nothing(all_run, tmp_path):
    """A data root with a Train_Folder alone: evaluating its val and test (the mean teacher, or the pre-training's
    retrieval) scored nothing and rewrote results.json / retrieval.json with nulls, exit status 0."""
    config, run_dir, _ = all_run
    root = tmp_path / "train_only"
    root.mkdir()
    (root / "Train_Folder").symlink_to(datasets.data_root(config, run_dir) / "Train_Folder")
    for source, written in ((run_dir, "results.json"), (run_dir / "pretrain", "retrieval.json")):
        evaluate_config = with_fields(config.copy_and_resolve_references(), {
            "mode": "evaluate", "eval.splits": ("val", "test"), "data.name": "monuseg", "data.root": str(root),
            "eval.checkpoint": str(source)})
        with pytest.raises(ConfigError, match=r"^config.eval.splits=val,test: .*none of these splits"):
            main.run(evaluate_config, tmp_path / "evaluation")
        assert not (tmp_path / "evaluation" / written).exists()


def test_a_last_batch_short_of_the_recorded_batch_is_scored_without_copied_rows(all_run, tmp_path):
    """12 unlabelled images (a quarter labelled) in the run's batches of 8: the last batch holds 4 images, and
    BatchNorm's statistics of that batch are of those 4 (padded to 8 with copies of the last, it would weigh
    that image 5 times). The student's column by hand, batch by batch."""
    config, run_dir, _ = all_run
    root = datasets.data_root(config, run_dir)
    other = config.copy_and_resolve_references()
    other.data.labeled_fraction, other.ssl.pretrained = 0.25, str(run_dir / "pretrain")
    ssl.evaluate_guidance(other, tmp_path, str(run_dir / "checkpoints" / "best"), root=root)
    _, unlabeled = datasets.load_train_parts(other, root, unlabeled_masks=True)
    assert len(unlabeled) == 12 and config.train.batch_size == 8
    model = supervised.build_unet(config)
    template, _ = ssl.create_state(config, model, None, steps_per_epoch=1)
    student, _, _ = checkpoint.restore_variables(
        run_dir / "checkpoints" / "best", {"params": template.params, "batch_stats": template.batch_stats})
    expected = []
    for rows in (slice(0, 8), slice(8, 12)):
        logits = _train_mode_logits(model, jax.device_get(student), unlabeled.images[rows].astype(np.float32) / 255)
        predicted, truth = np.asarray(logits[..., 0]) > 0.0, unlabeled.masks[rows] > 0
        total = predicted.sum((1, 2)) + truth.sum((1, 2))
        expected += list(np.where(total == 0, 1.0, 2.0 * (predicted & truth).sum((1, 2)) / np.maximum(total, 1)))
    rows = (tmp_path / "per_image_guidance_unlabeled.csv").read_text().splitlines()
    np.testing.assert_allclose([float(row.split(",")[4]) for row in rows[1:]], 100 * np.array(expected), atol=1e-3)

def test_a_mean_teacher_keeps_the_pretraining_step_that_guided_it(all_run, tmp_path):
    """Pre-training that goes on after a mean teacher trained (a longer schedule, the same workdir) neither
    resumes nor re-scores that mean teacher with other encoders: the checkpoint names its guiding step."""
    import shutil

    config, original, results = all_run
    guided_by = checkpoint.resolve_step(original / "pretrain")
    guided_meta = checkpoint.read_meta(original / "checkpoints" / "best")
    run_id = checkpoint.read_meta(guided_by)["run_id"]
    assert guided_meta[ssl.GUIDANCE_STEP] == int(guided_by.name) and guided_meta[ssl.GUIDANCE_RUN] == run_id
    assert len(run_id) == 32 and guided_meta["run_id"] != run_id  # The mean teacher is a run of its own.
    scores = json.loads((original / "guidance.json").read_text())
    copy = tmp_path / "run"
    shutil.copytree(original, copy, symlinks=True)
    longer = config.copy_and_resolve_references()
    longer.pretrain.epochs = 2
    with pytest.raises(checkpoint.CheckpointError) as info:
        main.run(longer, copy)  # Pre-trains its second epoch, then meets the finished mean teacher.
    went_on = checkpoint.resolve_step(copy / "pretrain")
    assert int(went_on.name) == 2 * int(guided_by.name)
    assert checkpoint.read_meta(went_on)["run_id"] == run_id  # Resumed: the same run.
    assert str(info.value) == (
        f"{copy / 'checkpoints' / 'latest'}: a mean teacher guided by the encoders of pre-training step "
        f"{guided_by.name}, which {copy / 'pretrain'} no longer holds (pre-training went on to step {went_on.name}); "
        "train the mean teacher again in another workdir to guide it with these")
    # With that step back beside the newer one, evaluation scores the text masks of the encoders that guided.
    # (The copy's own pre-training named: the recorded one is the original's, which is still there.)
    shutil.copytree(guided_by, went_on.parent / guided_by.name)
    evaluate = config.copy_and_resolve_references()
    evaluate.mode, evaluate.ssl.pretrained = "evaluate", str(copy / "pretrain")
    assert main.run(evaluate, copy) == results
    assert json.loads((copy / "guidance.json").read_text()) == scores
    # Another pre-training run in that folder at the newest step (one started over, or another run copied in;
    # only its run_id tells it apart here): the mean teacher is not scored with its encoders. Before, a run with
    # the guiding step among its steps guided the evaluation or the resumed training without a word.
    meta_file = went_on / "meta" / "metadata"
    meta_file.write_text(json.dumps(json.loads(meta_file.read_text()) | {"run_id": "f" * 32}))
    (copy / "guidance.json").unlink()
    with pytest.raises(checkpoint.CheckpointError) as info:
        main.run(evaluate, copy)
    assert str(info.value) == (
        f"{copy}: a mean teacher guided by the encoders of pre-training run {run_id} (step "
        f"{guided_by.name}), and {copy / 'pretrain'} holds run {'f' * 32}: another pre-training run, or one started "
        "over; name the run that guided it (config.ssl.pretrained), or train the mean teacher again in another "
        "workdir to guide it with these")
    assert not (copy / "guidance.json").exists()


def test_encoders_of_a_run_that_never_reached_the_guiding_step_are_not_said_to_have_gone_on(tmp_path, monkeypatch):
    # Evaluating with --config.ssl.pretrained= another, shorter run said "pre-training went on to step 1" from step 2.
    source, guided = tmp_path / "other" / "pretrain", tmp_path / "run" / "checkpoints" / "best"
    (source / "checkpoints" / "best" / "1").mkdir(parents=True)
    monkeypatch.setattr(checkpoint, "read_meta", lambda path: {ssl.GUIDANCE_STEP: 2})
    monkeypatch.setattr(checkpoint, "resolve_step", lambda path: source / "checkpoints" / "best" / "1")
    with pytest.raises(checkpoint.CheckpointError) as raised:
        ssl.guiding_step(source, guided)
    assert str(raised.value) == (
        f"{guided}: a mean teacher guided by the encoders of pre-training step 2, which {source} does not hold (its "
        "newest step is 1: another pre-training run?); name the run that guided it (config.ssl.pretrained), or train "
        "the mean teacher again in another workdir to guide it with these")


def test_recorded_config_builds_the_models_of_evaluation_and_guidance(all_run, tmp_path):
    config, workdir, results = all_run
    recorded = json.loads((workdir / "config.json").read_text())  # The latest command's (an evaluation's, here).
    assert recorded["unet"]["base_width"] == config.unet.base_width
    assert recorded["data"]["root"] == str((workdir / "data").absolute())  # Resolved.
    meta = checkpoint.read_meta(workdir / "checkpoints" / "best")
    assert meta["job"] == "ssl" and meta["config"]["mode"] == "all"
    assert meta["config"]["pretrain"] == recorded["pretrain"] == config.pretrain.to_dict() | {
        name: list(config.pretrain[name]) for name in ("adam_betas", "vit_pixel_mean", "vit_pixel_std")}
    assert checkpoint.read_meta(workdir / "pretrain")["job"] == "pretrain"

    # Other model and encoder fields on the command line: the recorded ones build the models. Another
    # evaluation batch too: the teacher (batch statistics) still labels the run's training batches of 8 (at 3,
    # its statistics would come from batches of 3 and a padded one).
    other = tiny_pretrain_config(**{"mode": "evaluate", "eval.checkpoint": str(workdir), "unet.base_width": 8,
                                    "pretrain.embed_dim": 24, "pretrain.vit_depth": 2, "data.image_size": 96,
                                    "train.eval_batch_size": 3})
    assert main.run(other, tmp_path / "evaluation") == results  # Scored on the training run's data.
    assert json.loads((tmp_path / "evaluation" / "guidance.json").read_text()) == json.loads(
        (workdir / "guidance.json").read_text())
    mesh = make_mesh(config, jax.devices()[:1])
    guidance = ssl.TextGuidance(tiny_pretrain_config(**{"pretrain.embed_dim": 24}), workdir, mesh)
    assert guidance.model.embed_dim == config.pretrain.embed_dim

    # Resuming with a field that changes shapes names it; a checkpoint of another job is refused.
    with pytest.raises(checkpoint.CheckpointError, match=r"config\.unet\.base_width=4 -> 8") as error:
        ssl.train(tiny_pretrain_config(**{"mode": "ssl", "data.labeled_fraction": 0.5, "unet.base_width": 8,
                                          "train.epochs": 3, "ssl.decoder_lr": 1e-2}), workdir)
    assert "\n" not in str(error.value)
    # Evaluating a pre-training checkpoint scores its retrieval: on val, what the run's last epoch logged
    # (the pre-training batch and the evaluation batch differ; the metric does not depend on them).
    retrieval = main.run(tiny_pretrain_config(**{"mode": "evaluate", "eval.checkpoint": str(workdir / "pretrain"),
                                                 "eval.splits": ("train", "val"), "pretrain.embed_dim": 24}),
                         tmp_path / "evaluate_pretrain")
    summary = json.loads((workdir / "pretrain" / "summary.json").read_text())
    for split in ("train", "val"):
        assert retrieval[split]["pairs"] == summary["pairs"][split]
        for key in ("i2t_top1", "i2t_top5", "i2t_top10", "t2i_top1", "t2i_top5", "t2i_top10"):
            assert retrieval[split][key] == pytest.approx(summary["final_retrieval"][f"{split}/{key}"], abs=1e-6)
    assert json.loads((tmp_path / "evaluate_pretrain" / "retrieval.json").read_text()) == retrieval
    # Each query's rank, kept by the evaluation and by the run at its first and last evaluation: the
    # scores computed from them are those logged; one image-to-report query per pair, one report-to-image query
    # per distinct report.
    from amvlm_jax import metrics

    kept = {"evaluation": json.loads((tmp_path / "evaluate_pretrain" / "retrieval_ranks.json").read_text())}
    steps = sorted((workdir / "pretrain" / "ranks").glob("step_*.json"), key=lambda path: int(path.stem[5:]))
    assert steps[0].name == "step_0.json" and len(steps) == 1 + summary["epochs"]
    kept |= {"initial": json.loads(steps[0].read_text()), "final": json.loads(steps[-1].read_text())}
    logged = {"evaluation": {f"{split}/{k}": v for split in retrieval for k, v in retrieval[split].items()},
              "initial": summary["initial_retrieval"], "final": summary["final_retrieval"]}
    for name, ranks in kept.items():
        for split in ("train", "val"):
            assert len(ranks[split]["i2t"]) == summary["pairs"][split]
            assert len(ranks[split]["t2i"]) == len(ranks[split]["t2i_rows"]) <= summary["pairs"][split]
            scores = metrics.retrieval_scores({k: np.asarray(v) for k, v in ranks[split].items()})
            assert scores == {k: logged[name][f"{split}/{k}"] for k in scores}, name
    with pytest.raises(ConfigError) as error:  # eval.initial: only a pre-training run has initial encoders to score.
        main.run(tiny_pretrain_config(**{"mode": "evaluate", "eval.checkpoint": str(workdir), "eval.initial": True}),
                 tmp_path / "initial")
    assert str(error.value) == (f"{workdir}: config.eval.initial scores the encoders a pre-training run started "
                                "from; this is a 'ssl' checkpoint")
    import shutil

    shutil.copytree(workdir / "pretrain" / "checkpoints", tmp_path / "pretrain_copy" / "checkpoints")
    with pytest.raises(checkpoint.CheckpointError, match="a checkpoint of a 'pretrain' run, not 'supervised'"):
        supervised.train(tiny_synthetic_config(**{"data.root": str(workdir / "data")}), tmp_path / "pretrain_copy")


def test_predict_writes_each_reports_text_mask(all_run, tmp_path):
    from PIL import Image

    from amvlm_jax.data import folders

    config, workdir, _ = all_run
    val = workdir / "data" / "Val_Folder"
    summary = main.run(tiny_pretrain_config(**{
        "mode": "predict", "eval.checkpoint": str(workdir), "predict.input": str(val),
        "predict.output": str(tmp_path / "out")}), tmp_path / "run")
    assert summary["written"] == 8 and summary["failed"] == 0
    # The text masks written are the checkpoint's generator on each image with its own report.
    mesh = make_mesh(config, jax.devices()[:1])
    guidance = ssl.TextGuidance(config, workdir, mesh)
    template = {"generator": ssl.generator_params(guidance, guidance.init_generator(jax.random.PRNGKey(0)))}
    restored, _, _ = checkpoint.restore_variables(workdir / "checkpoints" / "best", replicate(mesh, template))
    examples = folders.list_split_folder(val, require_masks=False)
    size = config.data.image_size
    images = np.stack([folders.load_image(e.image_path, size)[0] for e in examples]).astype(np.float32) / 255.0
    _, masks = ssl.text_mask_outputs(guidance, restored["generator"], guidance.variables, images,
                                     guidance.tokenizer([e.report for e in examples]))
    for index, example in enumerate(examples):
        written = np.asarray(Image.open(tmp_path / "out" / f"{example.name}_text.png"), np.float32)
        expected = np.round(np.clip(masks["p_text"][index], 0, 1) * 255)
        np.testing.assert_allclose(written, expected, atol=1.0)  # A grey level where float rounding sits at .5,
        assert np.mean(written != expected) < 0.01  # and that rarely (a scale of 254 moved most pixels).
    # A plain folder with a report sheet (predict.reports): the same text masks.
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(val / "img", plain / "scans")
    import csv

    with open(tmp_path / "reports.csv", "w", newline="") as f:
        csv.writer(f).writerows([("Image", "Description")] + [(e.image_path.name, e.report) for e in examples])
    main.run(tiny_pretrain_config(**{
        "mode": "predict", "eval.checkpoint": str(workdir), "predict.input": str(plain),
        "predict.output": str(tmp_path / "plain_out"), "predict.reports": str(tmp_path / "reports.csv")}), tmp_path / "run3")
    for example in examples:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "plain_out" / "scans" / f"{example.name}_text.png")),
                                      np.asarray(Image.open(tmp_path / "out" / f"{example.name}_text.png")))
    with pytest.raises(ConfigError, match="pre-training checkpoint has no segmentation model"):
        main.run(tiny_pretrain_config(**{"mode": "predict", "eval.checkpoint": str(workdir / "pretrain"),
                                         "predict.input": str(val), "predict.output": str(tmp_path / "o2")}),
                 tmp_path / "run2")


def test_uncertainty_analysis_scores_match_the_model(all_run):
    config, tmp_path, _ = all_run
    tool = repo_module("tools/uncertainty.py")
    result = tool.analyse(config, tmp_path, "val", "", "", count=3)
    part1, part2 = result["image_vs_reports"], result["report_vs_images"]
    assert len(part1) == 3 and part1[0]["own"] and len({r["label"] for r in part1}) == 3
    assert part2[0]["label"] == result["image"] and part2[0]["own"]
    for row in part1 + part2:
        assert -1.0 <= row["global"] <= 1.0 and row["report_variance"] > 0 and row["image_variance"] > 0
        # c < 1 moves every token similarity towards 1: with PDT never below without.
        assert row["tokens_pdt"] >= row["tokens"] - 1e-6
        assert 0.73 <= row["pdt_factor"] <= 1.0 + 1e-6  # c = sigmoid(W2 / sem) with W2 >= sem.
    # The image's own pair, recomputed with the model and numpy.
    model, variables, tokenizer, size = tool.load_model(config, tmp_path)
    from amvlm_jax.data import folders
    split = folders.load_split(tmp_path / "data", "val", image_size=size, with_masks=False)
    row = split.names.index(result["image"])
    out = jax.device_get(model.apply(variables, split.images[row:row + 1] / 255.0, tokenizer([split.reports[row]]),
                                     train=False, with_pdt=True))
    assert part1[0]["global"] == pytest.approx(float(np.sum(out["v"] * out["t"])), abs=1e-5)
    mask = out["word_mask"][0] > 0
    word_cos = np.sum(out["T"][0] * out["word_context"][0], -1)[mask]
    attention = out["word_attention"][0][mask]
    low, high = np.quantile(attention, [0.1, 0.9])
    weights = np.clip(attention, low, high) / np.clip(attention, low, high).sum()
    patch_cos = np.sum(out["V"][0] * out["patch_context"][0], -1)
    attention = out["patch_attention"][0]
    low, high = np.quantile(attention, [0.1, 0.9])
    patch_weights = np.clip(attention, low, high) / np.clip(attention, low, high).sum()
    expected = 0.5 * (np.sum(weights * word_cos) + np.sum(patch_weights * patch_cos))
    assert part1[0]["tokens"] == pytest.approx(float(expected), abs=1e-4)
    # Part 2 of another image's report (--report): the images nearest to it, those with that report marked own.
    other = next(r for r in range(len(split.names)) if split.reports[r] != split.reports[row])
    asked = tool.analyse(config, tmp_path, "val", "", split.reports[other], count=3)
    report_of = dict(zip(split.names, split.reports))
    assert asked["report"] == split.reports[other] and asked["report_vs_images"][0]["label"] == split.names[other]
    assert [r["own"] for r in asked["report_vs_images"]] == [report_of[r["label"]] == split.reports[other]
                                                             for r in asked["report_vs_images"]]
    tool.plot(result, tmp_path / "uncertainty.png")
    assert (tmp_path / "uncertainty.png").stat().st_size > 10_000
    # The model is built as the pre-training run recorded it, whatever the command's pretrain fields say.
    changed = config.copy_and_resolve_references()
    changed.pretrain.objective, changed.pretrain.max_length = "mgca", config.pretrain.max_length + 8
    assert tool.analyse(changed, tmp_path, "val", "", "", count=3) == result


def test_uncertainty_analysis_leaves_out_pdt_heads_the_run_did_not_train(all_run, tmp_path):
    """A pre-training without PDT keeps its randomly initialised heads in the checkpoint: scoring '+PDT',
    c and the variances with them presented noise as the analysis with PDT."""
    import shutil

    config, workdir, _ = all_run
    tool = repo_module("tools/uncertainty.py")
    with_pdt = tool.analyse(config, workdir, "val", "", "", count=3)
    assert with_pdt["pdt"] and "tokens_pdt" in with_pdt["image_vs_reports"][0]
    # The same checkpoint, recorded as trained without PDT (what use_pdt=False or a CSS weight of 0 writes).
    copy = tmp_path / "run"
    shutil.copytree(workdir / "pretrain", copy / "pretrain")
    for meta_file in (copy / "pretrain" / "checkpoints").glob("*/*/meta/metadata"):
        meta = json.loads(meta_file.read_text())
        meta["config"]["pretrain"]["use_pdt"] = False
        meta_file.write_text(json.dumps(meta))
    without = tool.analyse(config, copy, "val", "", "", count=3)
    assert not without["pdt"]
    for part in ("image_vs_reports", "report_vs_images"):
        for plain, row in zip(with_pdt[part], without[part]):
            assert set(row) == {"label", "own", "global", "tokens"}
            assert row["tokens"] == pytest.approx(plain["tokens"], abs=1e-6)
    table = tool.format_tables(without)
    assert "   0." in table and "       -      -            -           -  *" in table
    tool.plot(without, tmp_path / "uncertainty.png")
    assert (tmp_path / "uncertainty.png").is_file()


def test_uncertainty_nearest_reports_by_hand():
    """Part 1's reports: the image's own first, then by falling cosine, one per distinct text and none with the
    own report's text; part 2's images (no text rule): by falling cosine."""
    nearest = repo_module("tools/uncertainty.py").nearest
    # Cosines with row 0: 1, 0, .8, .6, .7 (unit rows).
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8], [0.7, np.sqrt(0.51)]])
    assert nearest(embeddings, 0, 4) == [0, 2, 4, 3]
    assert nearest(embeddings, 0, 3, exclude_same_text=["a", "b", "c", "a", "c"]) == [0, 2, 1]
    assert nearest(embeddings, 0, 5, exclude_same_text=["a", "b", "c", "a", "c"]) == [0, 2, 1]  # Three texts in all.
    assert nearest(embeddings, 3, 2) == [3, 4]  # Row 3: cosines .6, .8, .96, 1, .99.


def test_uncertainty_tables_by_hand():
    """The printed tables: the six score columns under their headings (3 decimals, the variances 4), '-' for a
    score a row lacks (no trained PDT heads), and '*' on the own pair only."""
    tool = repo_module("tools/uncertainty.py")
    scores = {"global": 0.5, "tokens": 0.25, "tokens_pdt": 0.3, "pdt_factor": 0.9, "report_variance": 0.0123,
              "image_variance": 0.0456}
    result = {"image": "syn_00003", "report": "one lesion",
              "image_vs_reports": [{"label": "one lesion", "own": True, **scores},
                                   {"label": "no lesion", "own": False, **scores, "global": -0.125}],
              "report_vs_images": [{"label": "syn_00007", "own": False, "global": 0.1, "tokens": 0.2}]}
    assert tool.format_tables(result).splitlines() == [
        "image syn_00003 against reports (* = its own report)",
        "  global  tokens    +PDT      c  var(report)  var(image)  report",
        "   0.500   0.250   0.300  0.900       0.0123      0.0456  *one lesion",
        "  -0.125   0.250   0.300  0.900       0.0123      0.0456   no lesion",
        "",
        "report \"one lesion\" against images (* = the image of this report)",
        "  global  tokens    +PDT      c  var(report)  var(image)  image",
        "   0.100   0.200       -      -            -           -   syn_00007"]


def test_uncertainty_pairs_and_own_marks_by_hand(monkeypatch, tmp_path):
    """analyse on a fake model whose report embedding is fixed by the text (a = (1, 0), b = (.8, .6),
    c = (.6, .8)) over the reports a, b, a, c, b: part 1 holds image 0 against its own report and the nearest
    other texts (b, then c), only its own marked; part 2 holds its report against the images whose reports are
    nearest, duplicates included (images 0 and 2 both say a, both marked), or --report's nearest."""
    from amvlm_jax.data import folders
    from amvlm_jax.train import pretrain

    tool = repo_module("tools/uncertainty.py")
    texts = {"a": [1.0, 0.0], "b": [0.8, 0.6], "c": [0.6, 0.8]}
    reports = ["a", "b", "a", "c", "b"]
    names = [f"img{i}" for i in range(5)]

    def tokenizer(batch):
        return {"ids": np.array([list(texts).index(text) for text in batch])}

    def apply(variables, *args, method=None, train=None, with_pdt=None):
        if method is not None:  # encode_text(tokens)
            return {"t": jnp.asarray(list(texts.values()))[args[0]["ids"]]}
        count = args[0].shape[0]
        ones = jnp.ones((count, 2))
        tokens = jnp.ones((count, 2, 3)) / np.sqrt(3)
        return {"v": jnp.ones((count, 3)) / np.sqrt(3), "t": jnp.ones((count, 3)) / np.sqrt(3), "T": tokens,
                "word_context": tokens, "V": tokens, "patch_context": tokens, "word_attention": ones,
                "patch_attention": ones, "word_mask": ones}

    model = types.SimpleNamespace(apply=apply, encode_text="encode_text")
    monkeypatch.setattr(tool, "load_model", lambda config, workdir: (model, {}, tokenizer, 16))
    monkeypatch.setattr(checkpoint, "read_meta", lambda path: {})
    split = folders.SplitArrays(names=names, images=np.zeros((5, 16, 16, 3), np.uint8), masks=None, reports=reports)
    monkeypatch.setattr(pretrain, "load_pairs", lambda config, workdir, split_name, size: (split,))
    config = tiny_synthetic_config(**{"pretrain.use_pdt": False})
    result = tool.analyse(config, tmp_path, "val", "", "", count=3)
    assert [(r["label"], r["own"]) for r in result["image_vs_reports"]] == [("a", True), ("b", False), ("c", False)]
    assert [(r["label"], r["own"]) for r in result["report_vs_images"]] == [
        ("img0", True), ("img2", True), ("img1", False)]
    assert result["report"] == "a" and result["image"] == "img0" and not result["pdt"]
    # --report=c: cosines a .6, b .96, c 1: image 3 (c), then 1 and 4 (b).
    asked = tool.analyse(config, tmp_path, "val", "", "c", count=3)
    assert [(r["label"], r["own"]) for r in asked["report_vs_images"]] == [
        ("img3", True), ("img1", False), ("img4", False)]


def test_uncertainty_pair_scores_by_hand():
    """The per-pair scores of make_pair_scores against numpy on fixed model outputs: the CLS-weighted token
    similarity with and without the PDT factor c = sigmoid(W2 / sem), c's weighted mean, and the PDT heads'
    variances of the real words (padding left out) and of the patches."""
    from amvlm_jax.losses.contrastive import PDTOutputs

    rng = np.random.default_rng(3)
    b, words, patches, dims = 2, 4, 5, 3
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32)

    def unit(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    out = {"v": unit(b, dims), "t": unit(b, dims), "T": unit(b, words, dims), "word_context": unit(b, words, dims),
           "V": unit(b, patches, dims), "patch_context": unit(b, patches, dims), "word_mask": mask,
           "word_attention": rng.random((b, words)).astype(np.float32),
           "patch_attention": rng.random((b, patches)).astype(np.float32)}
    out["word_pdt"] = PDTOutputs(*(rng.standard_normal((b, words, dims)).astype(np.float32) for _ in range(4)))
    out["patch_pdt"] = PDTOutputs(*(rng.standard_normal((b, patches, dims)).astype(np.float32) for _ in range(4)))
    model = types.SimpleNamespace(apply=lambda variables, images, tokens, train, with_pdt: out)
    scores = jax.device_get(repo_module("tools/uncertainty.py").make_pair_scores(model, True)({}, np.zeros(b), {}))

    def weights(attention):  # Clipped to the real tokens' 10% and 90% quantiles, summing to 1.
        low, high = np.quantile(attention, [0.1, 0.9])
        clipped = np.clip(attention, low, high)
        return clipped / clipped.sum()

    for i in range(b):
        real = mask[i] > 0
        sides = []
        for tokens, contexts, pdt, attention, keep in (
                ("T", "word_context", "word_pdt", "word_attention", real), ("V", "patch_context", "patch_pdt",
                                                                            "patch_attention", slice(None))):
            cos = np.sum(out[tokens][i] * out[contexts][i], -1)[keep]
            gauss = out[pdt]
            semantic = np.sum((gauss.token_mu[i] - gauss.context_mu[i]) ** 2, -1)[keep]
            spread = np.sum((gauss.token_logsigma[i] - gauss.context_logsigma[i]) ** 2, -1)[keep]
            c = 1 / (1 + np.exp(-(semantic + spread) / (semantic + 1e-6)))
            w = weights(out[attention][i][keep])
            sides.append((np.sum(w * cos), np.sum(w * (1 - (1 - cos) * c)), np.sum(w * c)))
        (word_plain, word_pdt, word_c), (patch_plain, patch_pdt, patch_c) = sides
        assert scores["global"][i] == pytest.approx(float(out["v"][i] @ out["t"][i]), abs=1e-6)
        assert scores["tokens"][i] == pytest.approx(0.5 * (word_plain + patch_plain), abs=1e-5)
        assert scores["tokens_pdt"][i] == pytest.approx(0.5 * (word_pdt + patch_pdt), abs=1e-5)
        assert scores["pdt_factor"][i] == pytest.approx(0.5 * (word_c + patch_c), abs=1e-5)
        word_variance = np.exp(2 * out["word_pdt"].token_logsigma[i][real])
        assert scores["report_variance"][i] == pytest.approx(float(word_variance.mean()), rel=1e-5)
        patch_variance = np.exp(2 * out["patch_pdt"].token_logsigma[i])
        assert scores["image_variance"][i] == pytest.approx(float(patch_variance.mean()), rel=1e-5)


def test_teacher_norm_batch_uses_batch_statistics_and_ema_uses_running_ones(vision_only):
    config, model, _ = vision_only
    variables = supervised.init_variables(config, model)
    # Running statistics far from those of the batch, as early in training.
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree.map(lambda x: x + 3.0, variables["batch_stats"])}
    images = np.random.default_rng(0).random((4, 64, 64, 3)).astype(np.float32)
    # Under jit, as the steps call it (op by op, the U-Net compiles slower).
    teacher_probabilities = jax.jit(ssl.teacher_probabilities, static_argnums=(0, 3, 4))
    with_batch = teacher_probabilities(model, variables, images, 1, "batch")
    with_ema = teacher_probabilities(model, variables, images, 1, "ema")
    expected_batch = _train_mode_logits(model, variables, images)
    expected_ema = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    np.testing.assert_allclose(with_batch, jax.nn.sigmoid(expected_batch[..., 0]), rtol=1e-6)
    np.testing.assert_allclose(with_ema, jax.nn.sigmoid(expected_ema[..., 0]), rtol=1e-6)
    assert not np.allclose(with_batch, with_ema, atol=1e-3)


def test_missing_encoders_name_the_fix_that_fits_the_mode(tmp_path):
    config = tiny_pretrain_config(**{"mode": "evaluate", "ssl.pretrained": str(tmp_path / "moved")})
    mesh = make_mesh(config, jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"moved: the pre-trained encoders of the checkpoint's text guidance are not "
                                          r"there \(moved\?\); pass their folder as --config.ssl.pretrained=PATH$"):
        ssl.TextGuidance(config, tmp_path, mesh)
    config.mode = "ssl"
    with pytest.raises(ConfigError, match="no pre-trained encoders for text guidance; run mode 'pretrain'"):
        ssl.TextGuidance(config, tmp_path, mesh)
    # Resuming a mean teacher (its checkpoint given): the encoders it was trained with moved, not never made.
    with pytest.raises(ConfigError, match=r"are not there \(moved\?\); pass their folder as --config.ssl.pretrained"):
        ssl.TextGuidance(config, tmp_path, mesh, guided=tmp_path / "checkpoints" / "latest")


def _multiclass_folders(root, classes: int, size: int, counts=(("Train", 16), ("Val", 4))):
    """LViT folders of images with one square per foreground class, masks of class ids, and reports naming the
    half of the image each square is in."""
    import csv

    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in counts:
        folder = root / f"{split}_Folder"
        (folder / "img").mkdir(parents=True)
        (folder / "labelcol").mkdir()
        rows = []
        for index in range(count):
            image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            words = []
            for label in range(1, classes):
                y, x = rng.integers(0, size - size // 4, 2)
                mask[y:y + size // 4, x:x + size // 4] = label
                image[y:y + size // 4, x:x + size // 4] = 70 * label
                words.append(f"class {label} in the {'upper' if y < size // 2 else 'lower'} half")
            Image.fromarray(image).save(folder / "img" / f"case{index}.png")
            Image.fromarray(mask).save(folder / "labelcol" / f"case{index}.png")
            rows.append([f"case{index}.png", ", ".join(words)])
        with open(folder / f"{split}_text.csv", "w", newline="") as f:
            csv.writer(f).writerows([["Image", "Description"], *rows])
    return root


def test_a_multiclass_text_guided_run_scores_and_predicts_the_same_class_masks(all_run, tmp_path):
    import csv

    from PIL import Image

    _, pretrained, _ = all_run
    root = _multiclass_folders(tmp_path / "data", classes=3, size=64)
    config = tiny_pretrain_config(**{
        "mode": "ssl", "data.name": "mrspineseg", "data.root": str(root), "data.num_classes": 3,
        "data.labeled_fraction": 0.5, "train.epochs": 1, "ssl.pretrained": str(pretrained / "pretrain")})
    results = main.run(config, tmp_path / "run")
    assert results["val"]["images"] == 4 and results["test"] is None
    guidance = json.loads((tmp_path / "run" / "guidance.json").read_text())
    assert set(guidance["val"]) == {"images", "text_mask", "teacher", "pseudo_label", "student"}
    assert guidance["unlabeled"]["images"] == 8
    assert sorted(path.name for path in (tmp_path / "run" / "pictures").iterdir()) == ["epoch_0001.png"]
    # The checkpoint's class masks, written by predict and scored here by hand, give evaluation's per-image Dice.
    main.run(tiny_synthetic_config(**{"mode": "predict", "eval.checkpoint": str(tmp_path / "run"),
                                      "predict.input": str(root / "Val_Folder"),
                                      "predict.output": str(tmp_path / "masks")}), tmp_path / "predict")
    with open(tmp_path / "run" / "per_image_val.csv") as f:
        rows = {row[0]: row for row in list(csv.reader(f))[1:]}
    scored = {name: float(row[1]) for name, row in rows.items()}
    assert len(scored) == 4
    for name, dice in scored.items():
        stem = name.rsplit(".", 1)[0]
        predicted = Image.open(tmp_path / "masks" / f"{stem}.png")
        assert predicted.mode == "P"
        predicted = np.asarray(predicted)
        truth = np.asarray(Image.open(root / "Val_Folder" / "labelcol" / f"{stem}.png"))
        per_class = []  # The classes in the prediction or the truth (none: 1).
        for label in (1, 2):
            p, y = predicted == label, truth == label
            if p.sum() + y.sum():
                per_class.append(2 * (p & y).sum() / (p.sum() + y.sum()))
        assert dice == pytest.approx(100 * (np.mean(per_class) if per_class else 1.0), abs=1e-3), name
        # The per-class columns: the same classes' scores, blank where a class is in neither.
        assert [float(v) if v else None for v in rows[name][3:]] == pytest.approx(
            [100 * 2 * ((predicted == c) & (truth == c)).sum() / ((predicted == c).sum() + (truth == c).sum())
             if ((predicted == c).sum() + (truth == c).sum()) else None for c in (1, 2)], abs=1e-3)
    summary = json.loads((tmp_path / "run" / "results.json").read_text())["val"]["classes"]
    assert set(summary) == {"1", "2"} and sum(1 for v in summary.values() if v["images"]) >= 1
    # The data moved: evaluating from the embedded default's command says to name it, and named, it is read as the
    # run's multi-class folders (not as a folder to generate the default's synthetic data into).
    moved = root.rename(tmp_path / "moved")
    evaluate = tiny_synthetic_config(**{"mode": "evaluate", "eval.checkpoint": str(tmp_path / "run"),
                                        "eval.guidance": False})
    with pytest.raises(ConfigError, match=f"^{root}: the data root that {tmp_path / 'run'} recorded does not exist"):
        main.run(evaluate, tmp_path / "evaluation")
    evaluate.data.root = str(moved)
    assert main.run(evaluate, tmp_path / "evaluation") == results
    # So do the analysis tools: the run's recorded data fields, at the folder named.
    scored = repo_module("tools/text_masks.py").run_config(tiny_synthetic_config(**{"data.root": str(moved)}),
                                                           tmp_path / "run", str(tmp_path / "run"))
    assert (scored.data.name, scored.data.num_classes, scored.data.root) == ("mrspineseg", 3, str(moved))


def test_text_mask_tool_scores_the_run_as_its_config_recorded_it(all_run):
    config, tmp_path, _ = all_run
    tool = repo_module("tools/text_masks.py")
    recorded = json.loads((tmp_path / "config.json").read_text())
    command = tiny_pretrain_config(**{"ssl.decoder_lr": 0.5, "ssl.text_veto_only": not config.ssl.text_veto_only,
                                      "data.labeled_fraction": 0.25})
    # The mean-teacher run's generator: its mask options and data, not the command's.
    scored = tool.run_config(command, tmp_path, str(tmp_path))
    assert (scored.ssl.decoder_lr, scored.ssl.text_veto_only) == (1e-2, config.ssl.text_veto_only)
    assert scored.data.root == recorded["data"]["root"] and scored.data.labeled_fraction == 0.5
    # The pre-trained encoders' masks: the pre-training run's data (the same here), the command's mask options.
    scored = tool.run_config(command, tmp_path, "")
    assert scored.data.root == recorded["data"]["root"] and scored.ssl.decoder_lr == 0.5
    # A word-attention head is fitted by a mean-teacher run: without its generator, the decoder's masks (the
    # embedded default sets the head).
    command.ssl.text_head, command.ssl.withhold_reports = "report", True
    scored = tool.run_config(command, tmp_path, "")
    assert (scored.ssl.text_head, scored.ssl.withhold_reports, scored.ssl.text_veto_only) == (
        "", False, command.ssl.text_veto_only)
    assert ssl.TextGuidance(scored, tmp_path, make_mesh(scored, jax.devices()[:1])).head is None
    # Other data named on the command stays.
    command.data.root = str(tmp_path / "elsewhere")
    assert tool.run_config(command, tmp_path, str(tmp_path)).data.root == str(tmp_path / "elsewhere")


def test_text_mask_tool_scores_pretrained_masks(all_run):
    from amvlm_jax.data import folders, synthetic

    config, tmp_path, _ = all_run
    tool = repo_module("tools/text_masks.py")
    mesh = make_mesh(config, jax.devices()[:1])
    guidance = ssl.TextGuidance(config, tmp_path, mesh)
    split = folders.load_split(tmp_path / "data", "val", image_size=config.data.image_size)
    result, features = tool.score_split(config, guidance, split, "val", batch_size=8)
    assert features["maps"].shape[0] == features["reports"].shape[0] == features["lesion"].shape[0] == 8
    assert result["images"] == 8 and 0.0 <= result["auroc"] <= 100.0 and 0.0 <= result["dice"] <= 100.0
    assert 0.0 <= result["p_text_lesion"] <= 1.0 and set(result["own_similarity_by_cell"]) <= {"lesion", "distractor", "empty"}
    assert result["auroc"] == pytest.approx(result["pixel_auroc"]["text_mask"]["lesion_vs_all"])  # Both exact ranks.
    # The mean text mask on lesion and on background pixels, from the generator's masks of the whole split.
    _, masks = ssl.text_mask_outputs(guidance, guidance.init_generator(jax.random.PRNGKey(0)), guidance.variables,
                                     split.images.astype(np.float32) / 255.0, guidance.tokenizer(split.reports))
    p_text, truth = np.asarray(masks["p_text"], np.float64), split.masks > 0
    assert truth.any() and (~truth).any()
    assert result["p_text_lesion"] == pytest.approx(p_text[truth].mean(), rel=1e-4)
    assert result["p_text_background"] == pytest.approx(p_text[~truth].mean(), rel=1e-4)
    # Batches of 3 (the last one padded with repeated images) score each image once, as one batch of 8 does.
    in_threes, three_features = tool.score_split(config, guidance, split, "val", batch_size=3)

    def flat(scores, prefix=""):
        return {k: v for key, value in scores.items() for k, v in (
            flat(value, f"{prefix}{key}/").items() if isinstance(value, dict) else [(prefix + key, value)])}

    assert flat(in_threes) == pytest.approx(flat(result), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(three_features["p_text_cells"], features["p_text_cells"], rtol=1e-5, atol=1e-6)
    # The named-cells reference marks every lesion pixel and no distractor (they hold cells of their own).
    named = result["pixel_auroc"]["named_cells"]
    assert named["lesion_vs_distractor"] == 100.0 and 80.0 < named["lesion_vs_all"] < 100.0

    # Cell grouping by hand: a 3x3 patch grid on a 96-pixel image puts one patch in each grid cell.
    names = ["syn_00000.png", "syn_00001.png"]
    maps = np.zeros((2, 3, 3, 2), np.float32)
    maps[..., 0] = np.arange(9, dtype=np.float32).reshape(3, 3)  # V . t = 3 * row + col with t = (1, 0).
    reports = np.tile(np.array([[1.0, 0.0]], np.float32), (2, 1))
    got = tool.cell_similarities(maps, reports, *tool.synthetic_cells(names, "val", 0, 96), image_size=96)
    expected = {"lesion": [], "distractor": [], "empty": []}
    for index in range(2):
        sample = synthetic.render_sample(0, "val", index, 96)
        for r in range(3):
            for c in range(3):
                kind = "lesion" if (r, c) in sample.lesion_cells else "distractor" if (r, c) in sample.distractor_cells else "empty"
                expected[kind].append(3 * r + c)
    assert got == pytest.approx({k: float(np.mean(v)) for k, v in expected.items()})
    # Similarity split by whether each report names the patch's cell, against a loop over (image, report, patch).
    rng_maps = np.random.default_rng(1)
    names4 = [f"syn_{i:05d}.png" for i in range(4)]
    lesion4, distractor4 = tool.synthetic_cells(names4, "val", 0, 96)
    maps4, reports4 = rng_maps.standard_normal((4, 3, 3, 5)), rng_maps.standard_normal((4, 5))
    sums = {}
    for b in range(4):
        for j in range(4):
            for cell in range(9):
                kind = "lesion" if lesion4[b, cell] else "distractor" if distractor4[b, cell] else "empty"
                key = (kind, "naming" if lesion4[j, cell] else "not_naming")
                value = float(maps4[b].reshape(9, 5)[cell] @ reports4[j])
                sums[key] = sums.get(key, []) + [value]
    contrast = tool.naming_contrast(maps4, reports4, lesion4, distractor4, image_size=96)
    assert contrast == {kind: pytest.approx({name: float(np.mean(sums[(kind, name)])) for name in ("naming", "not_naming")
                                              if (kind, name) in sums}) for kind in ("lesion", "distractor", "empty")}
    # Text-mask level per cell: a map equal to its cell's index averages to that index; edges 0, 32, 64, 96.
    cell_map = np.repeat(np.repeat(np.arange(9.0).reshape(3, 3), 32, 0), 32, 1)
    np.testing.assert_allclose(tool.cell_means(np.stack([cell_map, 2 * cell_map]), 96), [np.arange(9.0), 2 * np.arange(9.0)])
    uneven = tool.cell_means(np.ones((1, 128, 128)) * (np.arange(128) < 43)[:, None], 128)  # 128 / 3: rows 0-42 first.
    np.testing.assert_allclose(uneven, [[1, 1, 1, 0, 0, 0, 0, 0, 0]])
    lesion, distractor = np.array([[1, 0, 0], [0, 1, 1]]), np.array([[0, 1, 0], [1, 1, 0]])
    assert tool.group_cells(np.array([[1.0, 2, 3], [4, 5, 6]]), lesion, distractor) == {"lesion": 4.0, "distractor": 3.0, "empty": 3.0}
    # The decoder a mean-teacher run trained is read back from its checkpoint, and scored.
    trained = ssl.restore_generator(guidance, str(tmp_path), mesh)
    initial = guidance.init_generator(jax.random.PRNGKey(0))
    assert jax.tree.structure(trained) == jax.tree.structure(initial)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(trained["decoder"]), jax.tree.leaves(initial["decoder"])))
    trained_result, trained_features = tool.score_split(config, guidance, split, "val", batch_size=8, generator=trained)
    assert trained_features["p_text_cells"].shape == (8, 9) and np.all((0 <= trained_features["p_text_cells"]) & (trained_features["p_text_cells"] <= 1))
    assert trained_result["p_text_by_cell"] != result["p_text_by_cell"]
    with pytest.raises(checkpoint.CheckpointError, match="holds no text mask generator"):
        ssl.restore_generator(guidance, str(tmp_path / "pretrain"), mesh)  # Pre-training saves no decoder.
    # The pixel readouts: the text mask's AUROCs equal a direct rank computation on the maps.
    for name in ("text_mask", "v_dot_t"):
        assert set(result["pixel_auroc"][name]) == {"lesion_vs_all", "lesion_vs_distractor"}
    assert 0.0 <= result["word_attention"]["location_share_mean"] <= 1.0

    # Pixel AUROCs by hand: lesion pixels score 2, distractor pixels 1, the rest 0 or 1.5.
    lesion_px = np.zeros((1, 4, 4), bool); lesion_px[0, 0, :2] = True
    distractor_px = np.zeros((1, 4, 4), bool); distractor_px[0, 3, :2] = True
    scores = np.where(lesion_px, 2.0, np.where(distractor_px, 1.0, 0.0)); scores[0, 2, 3] = 2.5
    aurocs = tool.pixel_aurocs(scores, lesion_px, distractor_px)
    assert aurocs["lesion_vs_distractor"] == pytest.approx(100.0) and aurocs["lesion_vs_all"] == pytest.approx(100.0 * 13 / 14)
    np.testing.assert_array_equal(tool.patch_to_pixels(np.arange(4.0).reshape(1, 2, 2), 4)[0],
                                  [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    # Word attention on a 3x3 patch grid: "left" attends only to the left column, "upper" evenly to everything.
    maps = np.zeros((1, 3, 3, 2)); maps[0, :, 0, 0] = 1.0
    words = np.array([[[10.0, 0.0], [0.0, 0.0]]])
    lesion_rows, distractor_rows = np.zeros((1, 6, 6), bool), np.zeros((1, 6, 6), bool)
    lesion_rows[0, 0], distractor_rows[0, 5] = True, True
    readout = tool.word_attention_readouts(maps, words, np.ones((1, 2)), [["left", "upper"]], lesion_rows,
                                           distractor_rows, temperature=1.0, image_size=6)
    left_share = 3 * np.exp(10) / (3 * np.exp(10) + 6)
    assert readout["location_share"] == pytest.approx({"left": left_share, "upper": 1 / 3})
    assert readout["location_share_mean"] == pytest.approx((left_share + 1 / 3) / 2)
    assert tool.word_texts(guidance.tokenizer, guidance.tokenizer(["Two lesions in the upper left."]))[0][:5] == \
        ["two", "lesions", "in", "the", "upper"]

    # Linear probes: features that carry the cells are read out perfectly, pure noise is not.
    rng = np.random.default_rng(0)

    def fake(split_name, count):
        lesion, distractor = tool.synthetic_cells([f"syn_{i:05d}.png" for i in range(count)], split_name, 0, 96)
        cells = tool.patch_cells(6, 96)  # 6x6 patches, 2x2 per cell.
        maps = rng.standard_normal((count, 6, 6, 4))
        maps[..., 0] += 4 * lesion[:, cells].reshape(count, 6, 6)
        maps[..., 1] += 4 * np.clip(lesion + distractor, 0, 1)[:, cells].reshape(count, 6, 6)
        reports = np.concatenate([lesion, rng.standard_normal((count, 3))], axis=1)
        return {"maps": maps, "reports": reports, "lesion": lesion, "distractor": distractor}

    train, val = fake("train", 40), fake("val", 20)
    probes = tool.linear_probes(train, val, image_size=96)
    assert probes["report_names_cells"] == pytest.approx(100.0)
    assert probes["patch_in_lesion_cell"] > 97 and probes["patch_in_blob_cell"] > 97
    noise = {**val, "maps": rng.standard_normal(val["maps"].shape), "reports": rng.standard_normal(val["reports"].shape)}
    assert all(35 < v < 65 for v in tool.linear_probes(train, noise, image_size=96).values())
    # Ridge with a vanishing penalty is least squares with an intercept; AUROC on a hand case.
    x, y = rng.standard_normal((30, 3)), rng.standard_normal((30, 2))
    solution, *_ = np.linalg.lstsq(np.c_[x, np.ones(30)], y, rcond=None)
    np.testing.assert_allclose(tool.ridge_predictions(x, y, x[:5], 1e-9), np.c_[x[:5], np.ones(5)] @ solution, atol=1e-6)
    assert tool.rank_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_text_mask_tool_cells_ties_and_word_attention_by_hand():
    """Pure parts of tools/text_masks.py on hand cases: tied scores count half in the AUROC; a patch belongs to
    the grid cell holding its centre where patches and cells do not align (14 patches of 16 px, cell edges 0,
    75, 149, 224); the mean attention leaves out padding words; 'lower', 'right' and 'center' name their thirds."""
    tool = repo_module("tools/text_masks.py")
    # Positives .5, .9 against negatives .5, .2: pairs won 1 + 1 + 1, one tie: 3.5 of 4.
    assert tool.rank_auroc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    # Patch centres 8, 24, ..., 216: rows 0-4 (centre <= 72) in cell row 0, 5-8 (88-136) in 1, 9-13 (152-) in 2.
    bands = np.array([0] * 5 + [1] * 4 + [2] * 5)
    np.testing.assert_array_equal(tool.patch_cells(14, 224), (3 * bands[:, None] + bands[None, :]).ravel())
    # A 3x3 patch grid, 2x2 pixels each: feature 0 marks the bottom row, 1 the right column, 2 the top-left patch.
    maps = np.zeros((1, 3, 3, 3))
    maps[0, 2, :, 0], maps[0, :, 2, 1], maps[0, 0, 0, 2] = 1.0, 1.0, 1.0
    # Words lower, right, center (uniform) and a padding word that looks only at the top-left patch; at a
    # temperature of 2, lower's logits are 1 on the bottom row and 0 elsewhere.
    words = np.array([[[2.0, 0, 0], [0, 2.0, 0], [0, 0, 0], [0, 0, 60.0]]])
    lesion, distractor = np.zeros((1, 6, 6), bool), np.zeros((1, 6, 6), bool)
    lesion[0, 4:, 4:], distractor[0, :2, :2] = True, True  # The bottom-right patch, the top-left one.
    readout = tool.word_attention_readouts(maps, words, np.array([[1.0, 1, 1, 0]]), [["lower", "right", "center"]],
                                           lesion, distractor, temperature=2.0, image_size=6)
    share = 3 * np.e / (3 * np.e + 6)
    assert readout["location_share"] == pytest.approx({"lower": share, "right": share, "center": 1 / 3})
    # Real words' mean attention: (2 e / (3 e + 6) + 1/9) / 3 = .163 on the lesion's patch, at most .124 on any
    # other; with the padding word (nearly 1 on the distractor's patch) that patch would lead.
    assert readout["mean_attention"] == pytest.approx({"lesion_vs_all": 100.0, "lesion_vs_distractor": 100.0})


def test_text_mask_tool_location_words_name_the_cells_that_hold_the_patches():
    """A location word's share is its attention on the grid cells it names, each patch in the cell holding its
    centre (patch_cells): at 224 px with 16-px patches the cell edges are 0, 75, 149, 224, so patch columns 0-4,
    5-8 and 9-13 (centres 8-72, 88-136, 152-216) are left, center and right. Was index * 3 // 14 (5, 5, 4
    columns): patch column 9 counted as the center third."""
    tool = repo_module("tools/text_masks.py")
    maps = np.zeros((1, 14, 14, 2))
    maps[0, :, 9, 0], maps[0, :, 6, 1] = 1.0, 1.0  # Feature 0 marks patch column 9, feature 1 column 6.
    # 'right' looks only at column 9, 'center' only at column 6, 'upper' (twice) evenly at every patch.
    words = np.array([[[60.0, 0.0], [0.0, 60.0], [0.0, 0.0], [0.0, 0.0]]])
    pixels = np.zeros((1, 224, 224), bool)
    lesion, distractor = pixels.copy(), pixels.copy()
    lesion[0, :16, :16], distractor[0, -16:, -16:] = True, True
    readout = tool.word_attention_readouts(maps, words, np.ones((1, 4)), [["right", "center", "upper", "upper"]],
                                           lesion, distractor, temperature=1.0, image_size=224)
    assert readout["location_share"] == pytest.approx({"right": 1.0, "center": 1.0, "upper": 5 / 14})
    # The mean over the four occurrences, not over the three words.
    assert readout["location_share_mean"] == pytest.approx((2 + 2 * 5 / 14) / 4)
    # A centre on a cell edge is in the cell that starts there: at 32 px (edges 0, 11, 21, 32) the 2-px patches
    # 5 and 10 have centres 11 and 21.
    np.testing.assert_array_equal(tool.patch_cells(16, 32)[:16], [0] * 5 + [1] * 5 + [2] * 6)


def test_text_mask_tool_probes_read_train_fits_and_any_blob_by_hand():
    """The linear probes are fitted on the training split and scored on the other: features whose sign flips
    between the two score 0, not 100. A V that says only 'a blob is here' reads the blob cells perfectly and the
    lesion cells no better than a blob-detector can (distractor cells rank with lesion cells)."""
    tool = repo_module("tools/text_masks.py")
    rng = np.random.default_rng(5)

    def fake(split_name, count, sign):
        lesion, distractor = tool.synthetic_cells([f"syn_{i:05d}.png" for i in range(count)], split_name, 0, 96)
        cells = tool.patch_cells(3, 96)  # One patch per cell.
        maps = 0.01 * rng.standard_normal((count, 3, 3, 2))
        maps[..., 0] += sign * np.clip(lesion + distractor, 0, 1)[:, cells].reshape(count, 3, 3)
        reports = np.concatenate([sign * lesion, 0.01 * rng.standard_normal((count, 2))], axis=1)
        return {"maps": maps, "reports": reports, "lesion": lesion, "distractor": distractor}

    train, same, flipped = fake("train", 30, 1.0), fake("val", 20, 1.0), fake("val", 20, -1.0)
    probes = tool.linear_probes(train, same, image_size=96)
    assert probes["report_names_cells"] == pytest.approx(100.0) and probes["patch_in_blob_cell"] == pytest.approx(100.0)
    # Lesion cells against the rest: every lesion and distractor cell scores about 1, every empty one about 0:
    # a lesion beats each empty cell, and ties (at random) with each distractor.
    lesion, blob = same["lesion"] > 0, np.clip(same["lesion"] + same["distractor"], 0, 1) > 0
    negatives = (~lesion).sum()
    share_won = ((~blob).sum() + 0.5 * (blob & ~lesion).sum()) / negatives
    assert probes["patch_in_lesion_cell"] == pytest.approx(100 * share_won, abs=5.0) and share_won < 0.95
    assert tool.linear_probes(train, flipped, image_size=96) == pytest.approx(
        {"report_names_cells": 0.0, "patch_in_lesion_cell": 100 * (1 - share_won), "patch_in_blob_cell": 0.0}, abs=5.0)


class _FakeGuidance:
    """What score_split reads of a TextGuidance, on reports made of VOCABULARY's words: T a word's row of
    ``vectors``, t a report's mean word vector, V each 16-px patch's mean colour; the text mask (set by the test
    through ssl.text_mask_outputs) is the image's red channel."""

    VOCABULARY = ["[PAD]", "left", "upper", "right", "lower", "center"]

    def __init__(self, vectors, temperature):
        self.vectors, self.temperature, self.variables = jnp.asarray(vectors), temperature, {}
        self.model = types.SimpleNamespace(encode_text="encode_text", apply=self._apply)
        self.tokenizer = functools.partial(_FakeGuidance._tokenize, self)  # A callable that takes attributes.
        self.tokenizer._tokenizer = types.SimpleNamespace(id_to_token=lambda i: self.VOCABULARY[i])

    def _tokenize(self, reports):
        ids = np.zeros((len(reports), 3), np.int32)
        for row, report in enumerate(reports):
            words = [self.VOCABULARY.index(w) for w in report.split()]
            ids[row, :len(words)] = words
        return {"input_ids": ids, "word_index": np.tile(np.arange(3), (len(reports), 1)),
                "word_mask": (ids > 0).astype(np.float32)}

    def _apply(self, variables, tokens, train, method):
        return {"T": self.vectors[tokens["input_ids"]], "word_mask": tokens["word_mask"]}

    def encode(self, variables, x, tokens):
        count, size = x.shape[0], x.shape[1]
        patches = x.reshape(count, size // 16, 16, size // 16, 16, 3).mean((2, 4))
        words = self._apply(variables, tokens, False, None)
        return patches, (words["T"] * words["word_mask"][..., None]).sum(1) / words["word_mask"].sum(1, keepdims=True)

    def init_generator(self, key):
        return {}


def test_text_mask_tool_scores_per_image_dice_and_pooled_pixel_aurocs_by_hand(monkeypatch):
    """score_split on a fake guidance whose text mask is set pixel by pixel: Dice of p_text > 0.5 per image,
    averaged over images (an image with neither mask nor prediction scores 1), one pixel AUROC over every image's
    pixels (ties half), p_text's mean on lesion and on other pixels; batches of 2 with the last one padded."""
    from scipy import special, stats

    from amvlm_jax.data import folders, synthetic

    tool = repo_module("tools/text_masks.py")
    monkeypatch.setattr(ssl, "text_mask_outputs", lambda guidance, generator, variables, x, tokens: (
        None, {"p_text": x[..., 0]}))
    guidance = _FakeGuidance(np.eye(6, 3), temperature=1.0)
    levels, masks = np.full((3, 16, 16), 51, np.uint8), np.zeros((3, 16, 16), np.uint8)
    masks[0, 0, :4] = 1
    levels[0, 0, :4] = [153, 153, 153, 102]  # 3 of 4 lesion pixels above 0.5: Dice 6 / 7.
    masks[1, 1, :2] = 1
    levels[1, 1:3, :2] = 204  # Both lesion pixels and 2 others above 0.5: Dice 4 / 6.
    levels[2] = 25  # No lesion, nothing above 0.5: Dice 1.
    images = np.zeros((3, 16, 16, 3), np.uint8)
    images[..., 0] = levels
    split = folders.SplitArrays(names=["a", "b", "c"], images=images, masks=masks, reports=["left"] * 3)
    config = types.SimpleNamespace(data=types.SimpleNamespace(name="monuseg", image_size=16))
    result, _ = tool.score_split(config, guidance, split, "val", batch_size=2)
    assert result["images"] == 3 and result["dice"] == pytest.approx(100 * (6 / 7 + 4 / 6 + 1) / 3)
    # Lesion pixels 153 x 3, 102, 204 x 2 against 762 others, 2 of them 204 and the rest 51 or 25: each lesion
    # pixel beats every other pixel but the two at 204, which tie with the lesion's two at 204.
    others = 3 * 256 - 6
    assert result["auroc"] == pytest.approx(100 * (6 * others - 4 * 2 - 2 * 2 * 0.5) / (6 * others))
    assert result["p_text_lesion"] == pytest.approx((3 * 153 + 102 + 2 * 204) / 6 / 255)
    background = (252 * 51 + (2 * 204 + 252 * 51) + 256 * 25) / others / 255
    assert result["p_text_background"] == pytest.approx(background)

    # Synthetic data: V.t and the CSS words' mean attention at the guidance's temperature, as pixel AUROCs of the
    # lesion pixels against all others and against the distractor pixels of the split scored (val).
    rng = np.random.default_rng(2)
    samples = [synthetic.render_sample(0, "val", i, 64) for i in range(2)]
    images = np.stack([s.image for s in samples])
    images[..., 0] = rng.integers(0, 256, (2, 64, 64))
    reports = ["left upper", "lower center right"]
    split = folders.SplitArrays(names=["syn_00000", "syn_00001"], images=images,
                                masks=np.stack([s.mask > 0 for s in samples]).astype(np.uint8), reports=reports)
    vectors = rng.standard_normal((6, 3))
    guidance = _FakeGuidance(vectors, temperature=0.25)
    config = types.SimpleNamespace(data=types.SimpleNamespace(name="synthetic", image_size=64,
                                                              synthetic=types.SimpleNamespace(seed=0)))
    result, _ = tool.score_split(config, guidance, split, "val", batch_size=2)
    lesion = np.stack([s.mask > 0 for s in samples])
    distractor = np.stack([s.distractor_mask > 0 for s in samples])

    def aurocs(scores):  # Mann-Whitney U over (positive, negative) pairs, ties half.
        pair = lesion | distractor
        return [100 * stats.mannwhitneyu(scores[a & b], scores[~a & b]).statistic / ((a & b).sum() * (~a & b).sum())
                for a, b in ((lesion, np.ones_like(lesion)), (lesion, pair))]

    patches = (images / 255.0).reshape(2, 4, 16, 4, 16, 3).mean((2, 4))  # (2, 4, 4, 3): 16-px patches.
    words = [[vectors[guidance.VOCABULARY.index(w)] for w in report.split()] for report in reports]
    own = np.stack([patches[b] @ np.mean(words[b], 0) for b in range(2)])
    mean_attention = np.stack([np.mean([special.softmax(patches[b].reshape(16, 3) @ w / 0.25) for w in words[b]], 0)
                               .reshape(4, 4) for b in range(2)])

    def pixels(per_patch):
        return np.repeat(np.repeat(per_patch, 16, 1), 16, 2)

    for name, scores in (("v_dot_t", result["pixel_auroc"]["v_dot_t"]),
                         ("mean_attention", result["word_attention"]["mean_attention"])):
        expected = aurocs(pixels(own if name == "v_dot_t" else mean_attention))
        assert [scores["lesion_vs_all"], scores["lesion_vs_distractor"]] == pytest.approx(expected, abs=1e-6), name
    assert result["pixel_auroc"]["text_mask"]["lesion_vs_distractor"] == pytest.approx(
        aurocs(images[..., 0].astype(float))[1], abs=1e-6)


def test_constant_text_mask_control_keeps_l_tg_and_removes_location(all_run):
    config, tmp_path, _ = all_run
    mesh = make_mesh(config, jax.devices()[:1])
    guidance = ssl.TextGuidance(config, tmp_path, mesh)
    trained = {"decoder": guidance.init_decoder(jax.random.PRNGKey(0)), "log_scale": jnp.float32(2.0)}
    from amvlm_jax.data import folders
    split = folders.load_split(tmp_path / "data", "val", image_size=config.data.image_size)
    images = split.images[:4].astype(np.float32) / 255.0
    tokens = guidance.tokenizer(split.reports[:4])
    loss, masks = ssl.text_mask_outputs(guidance, trained, guidance.variables, images, tokens)
    guidance.constant = 0.4
    loss_c, masks_c = ssl.text_mask_outputs(guidance, trained, guidance.variables, images, tokens)
    assert float(loss_c) == pytest.approx(float(loss))
    np.testing.assert_array_equal(masks_c["p_text"], np.full(masks["p_text"].shape, 0.4, np.float32))
    np.testing.assert_array_equal(masks_c["soft"], masks["soft"])
    # ssl.text_logit_offset: every mask's logit moves by the offset; L_tg does not change.
    guidance.constant, guidance.logit_offset = 0.0, -2.7
    loss_o, masks_o = ssl.text_mask_outputs(guidance, trained, guidance.variables, images, tokens)
    p = np.clip(np.asarray(masks["p_text"], np.float64), 1e-6, 1 - 1e-6)
    shifted = 1 / (1 + np.exp(-(np.log(p / (1 - p)) - 2.7)))
    np.testing.assert_allclose(masks_o["p_text"], shifted, rtol=1e-4, atol=1e-6)
    assert float(loss_o) == pytest.approx(float(loss))
    # ssl.text_veto_only: after the offset, no mask exceeds 0.5 and every lower value is kept (here an
    # offset that moves the median mask to 0.5 puts masks on both sides of it).
    offset = -float(np.median(np.log(p / (1 - p))))
    guidance.logit_offset, guidance.veto_only = offset, True
    loss_v, masks_v = ssl.text_mask_outputs(guidance, trained, guidance.variables, images, tokens)
    raised = 1 / (1 + np.exp(-(np.log(p / (1 - p)) + offset)))
    assert (raised > 0.5).any() and (raised < 0.5).any()
    np.testing.assert_allclose(masks_v["p_text"], np.minimum(raised, 0.5), rtol=1e-4, atol=1e-6)
    assert float(loss_v) == pytest.approx(float(loss))


def test_student_batch_stats_images_mix_labeled_and_unlabeled():
    config = tiny_synthetic_config(**{"train.precise_bn_images": 6})
    labeled = types.SimpleNamespace(images=np.arange(2)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8))
    unlabeled = types.SimpleNamespace(images=(10 + np.arange(5))[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8))
    images = ssl.student_images(config, labeled, unlabeled)
    # Up to 3 of each, one to one while both last, then the rest of the longer split.
    assert images[:, 0, 0, 0].tolist() == [0, 10, 1, 11, 12]
    config.train.precise_bn_images = 0
    assert len(ssl.student_images(config, labeled, unlabeled)) == 0


def test_frozen_encoders_see_images_resized_as_in_pretraining(tmp_path):
    """Where the encoders were pre-trained at another size (the cpu variants: 96 against 224), the step
    resizes the segmentation images for them; pre-training read the files with the data reader's resize, so
    the two must agree: within 2 grey levels on average here (a bilinear resize is 5.8 off on this texture)."""
    from PIL import Image

    from amvlm_jax.data import folders

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (32, 32, 3)), np.ones((4, 4, 1)))  # 128x128, edges every 4 pixels.
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "x.png")
    read_for_segmentation = folders.load_image(tmp_path / "x.png", 128)[0]
    read_for_pretraining = folders.load_image(tmp_path / "x.png", 96)[0].astype(np.float32)
    resized = np.asarray(ssl.encoder_input(jnp.asarray(read_for_segmentation[None] / 255.0, jnp.float32), 96))[0]
    assert resized.shape == (96, 96, 3) and resized.min() >= 0.0 and resized.max() <= 1.0
    assert np.abs(resized * 255 - read_for_pretraining).mean() < 2.0
    same = jnp.asarray(rng.random((1, 96, 96, 3)), jnp.float32)
    assert ssl.encoder_input(same, 96) is same


def test_unlabeled_images_are_augmented_only_when_asked():
    from amvlm_jax.data import folders

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 16, 16, 3), np.uint8)
    labeled = folders.SplitArrays([f"l{i}" for i in range(4)], images[:4], (images[:4, ..., 0] > 127).astype(np.uint8),
                                  ["r"] * 4)
    unlabeled = folders.SplitArrays([f"u{i}" for i in range(4)], images[4:], None, [f"report {i}" for i in range(4)])
    tokens = {"input_ids": np.arange(4)[:, None] * np.ones((1, 3), np.int32)}
    streams = {}
    for augment in (False, True):
        config = tiny_synthetic_config(**{"train.batch_size": 2, "ssl.augment_unlabeled": augment})
        batches = ssl.training_batches(config, labeled, unlabeled, tokens, start_step=0)
        streams[augment] = [next(batches) for _ in range(6)]
    for plain, augmented in zip(streams[False], streams[True]):
        # The labeled half and the reports are the same either way; each report stays with its image.
        np.testing.assert_array_equal(plain["image"], augmented["image"])
        np.testing.assert_array_equal(plain["report_input_ids"], augmented["report_input_ids"])
        rows = plain["report_input_ids"][:, 0]
        np.testing.assert_array_equal(plain["unlabeled_image"], unlabeled.images[rows])
    moved = [not np.array_equal(a["unlabeled_image"], p["unlabeled_image"]) for p, a in zip(streams[False], streams[True])]
    assert any(moved)


def test_text_head_is_fitted_on_labelled_masks_before_the_mean_teacher_and_kept_on_resume(all_run, tmp_path, capsys):
    from amvlm_jax.data import folders
    from amvlm_jax.models.text_mask import head_text_masks

    base, pre_dir, _ = all_run
    config = base.copy_and_resolve_references()
    config.mode, config.train.epochs = "ssl", 1
    config.ssl.text_head, config.ssl.text_head_steps = "words", 20
    config.ssl.pretrained, config.data.root = str(pre_dir / "pretrain"), str(pre_dir / "data")
    main.run(config, tmp_path)
    assert "text head fitted on 8 labelled images: 20 steps" in capsys.readouterr().out
    guidance_scores = json.loads((tmp_path / "guidance.json").read_text())
    assert 0.0 <= guidance_scores["unlabeled"]["text_mask"]["auroc"] <= 100.0

    # The checkpoint holds the head (no decoder), equal to a fit on the labelled split with the run's seed.
    mesh = make_mesh(config, jax.devices()[:1])
    guidance = ssl.TextGuidance(config, tmp_path, mesh)
    assert ssl.checkpoint.saved_entries(tmp_path / "checkpoints" / "latest")
    template = {"generator": guidance.init_generator(jax.random.PRNGKey(0))}
    restored, _, _ = checkpoint.restore_variables(tmp_path / "checkpoints" / "latest", replicate(mesh, template))
    assert set(restored["generator"]) == {"head"}
    labeled, _ = ssl.load_split_pair(config, pre_dir / "data")
    refit = ssl.fit_text_head(config, guidance, labeled, mesh,
                              guidance.init_generator(jax.random.PRNGKey(config.seed + 1))["head"])
    for a, b in zip(jax.tree.leaves(restored["generator"]["head"]), jax.tree.leaves(refit)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    # Its text masks are the sigmoid of its logits resized to the image; withheld reports change them.
    split = folders.load_split(pre_dir / "data", "val", image_size=config.data.image_size)
    images, tokens = split.images[:4].astype(np.float32) / 255.0, guidance.tokenizer(split.reports[:4])
    loss, masks = ssl.text_mask_outputs(guidance, restored["generator"], guidance.variables, images, tokens)
    logits = guidance.head_logits(restored["generator"]["head"], guidance.variables, images, tokens)
    assert loss is None
    np.testing.assert_allclose(masks["p_text"], head_text_masks(logits, images.shape[1])["p_text"], atol=1e-6)
    guidance.withhold_reports = True
    _, blind = ssl.text_mask_outputs(guidance, restored["generator"], guidance.variables, images, tokens)
    assert not np.allclose(blind["p_text"], masks["p_text"])

    # Running again resumes the finished run: no second fit.
    capsys.readouterr()
    main.run(config, tmp_path)
    assert "text head fitted" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"withhold_reports needs config.ssl.text_head \('words' or 'report'\)"):
        from amvlm_jax.config import validate

        other = config.copy_and_resolve_references()
        other.ssl.text_head, other.ssl.withhold_reports = "", True
        validate(other)
    with pytest.raises(ConfigError, match="config.ssl.text_head must be '' .*, 'words' or 'report', got 'film'"):
        other.ssl.text_head, other.ssl.withhold_reports = "film", False
        validate(other)


class _LogitsModel:
    """A stand-in U-Net whose 'variables' are its logits (B, H, W, C): the maps a scoring test chooses."""

    def apply(self, variables, images, train=False, mutable=None):
        return (variables["logits"], {}) if mutable else variables["logits"]


def _rank_auroc(scores, positive):
    """P(score of a positive pixel > score of a negative one) + ties / 2, over every pair."""
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def _dice_iou(predicted, truth, classes):
    """SPEC 7 on one image: per foreground class present in P or Y, averaged (none present: 1)."""
    dice, iou = [], []
    for c in classes:
        p, y = predicted == c, truth == c
        if p.any() or y.any():
            dice.append(2 * (p & y).sum() / (p.sum() + y.sum()))
            iou.append((p & y).sum() / (p | y).sum())
    return (np.mean(dice), np.mean(iou)) if dice else (1.0, 1.0)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_guidance_scores_each_map_by_dice_and_pixel_auroc_by_hand(num_classes):
    """evaluate_guidance's step on chosen maps: the teacher and the student score their own logits, the
    text mask its p_text at 0.5 against any foreground, the pseudo-label SPEC 6's fusion (w_text 0.5 here) of
    the teacher with the text mask; the AUROC ranks each map's foreground probability over the pixels of the
    valid rows only (the third row is padding)."""
    from amvlm_jax import metrics

    rng = np.random.default_rng(3)
    b, size, w_text = 3, 4, 0.5
    config = tiny_synthetic_config(**{"mode": "ssl", "data.num_classes": num_classes, "ssl.w_text": w_text})
    # Logits on a grid of 0.25 (distinct histogram bins of 0.03), the text's at most 4: the 1e-4 clips never bind.
    # Odd multiples of 1/4 for the text: the fused logits (teacher + text / 2) are never 0.
    teacher, student = (rng.integers(-12, 13, (b, size, size, 1)) / 4.0 for _ in range(2))
    text = (2 * rng.integers(-8, 8, (b, size, size)) + 1) / 4.0
    if num_classes > 1:  # Background 0, the foreground classes l and l - 1 in either order: logit(1 - p_0) on a grid.
        first = rng.random((b, size, size, 1)) < 0.5
        teacher, student = (np.concatenate([0 * x, np.where(first, x, x - 1), np.where(first, x - 1, x)], -1)
                            for x in (teacher, student))
    truth = rng.integers(0, num_classes + 1 if num_classes > 1 else 2, (b, size, size))
    guidance = types.SimpleNamespace(head=True, head_logits=lambda params, frozen, images, tokens: params,
                                     logit_offset=0.0, veto_only=False, constant=0.0, text_clip=1e-4)
    step = ssl.make_guidance_eval_step(config, _LogitsModel(), guidance)
    valid = np.array([True, True, False])
    batch = {"image": np.zeros((b, size, size, 3), np.uint8), "mask": truth.astype(np.uint8), "valid": valid}
    out = jax.device_get(step({"logits": jnp.float32(teacher)}, {"logits": jnp.float32(student)},
                              {"head": jnp.float32(text)}, None, batch))

    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    p_text = sigmoid(text)
    if num_classes == 1:
        expected = {"teacher": (teacher[..., 0] > 0, sigmoid(teacher[..., 0])),
                    "student": (student[..., 0] > 0, sigmoid(student[..., 0])),
                    "pseudo_label": (teacher[..., 0] + w_text * text > 0, sigmoid(teacher[..., 0] + w_text * text))}
        classes = (1,)
    else:
        softmax = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)  # noqa: E731
        p_t, p_s = softmax(teacher), softmax(student)
        fused_foreground = sigmoid(np.log((1 - p_t[..., 0]) / p_t[..., 0]) + w_text * text)
        fused = np.concatenate([1 - fused_foreground[..., None],
                                p_t[..., 1:] / p_t[..., 1:].sum(-1, keepdims=True) * fused_foreground[..., None]], -1)
        expected = {"teacher": (p_t.argmax(-1), 1 - p_t[..., 0]), "student": (p_s.argmax(-1), 1 - p_s[..., 0]),
                    "pseudo_label": (fused.argmax(-1), fused_foreground)}
        classes = range(1, num_classes)
    expected["text_mask"] = (p_text > 0.5, p_text)
    assert set(out) == set(ssl.GUIDANCE_MAPS)
    for name, (labels, foreground) in expected.items():
        dice, iou, positive, negative = out[name]
        # The text mask is a binary map, scored against any foreground class.
        reference = (truth > 0) if (name == "text_mask" or num_classes == 1) else truth
        scores = [_dice_iou(np.asarray(labels, int)[i], np.asarray(reference, int)[i],
                            (1,) if name == "text_mask" or num_classes == 1 else classes) for i in range(b)]
        np.testing.assert_allclose(dice, [s[0] for s in scores], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(iou, [s[1] for s in scores], rtol=1e-6, err_msg=name)
        assert positive.sum() + negative.sum() == 2 * size * size, name
        assert metrics.auroc_from_histograms(positive, negative) == pytest.approx(
            _rank_auroc(foreground[valid], truth[valid] > 0), abs=1e-9), name


def test_veto_only_text_masks_mark_no_pixel_and_the_table_says_why():
    """ssl.text_veto_only caps p_text at 0.5, so at the 0.5 threshold a text mask marks nothing however sure the
    head is (logit 3 everywhere here): Dice 0 on every image with a lesion. The table then says so."""
    config = tiny_synthetic_config(**{"mode": "ssl"})
    guidance = types.SimpleNamespace(head=True, head_logits=lambda params, frozen, images, tokens: params,
                                     logit_offset=0.0, veto_only=True, constant=0.0, text_clip=1e-4)
    step = ssl.make_guidance_eval_step(config, _LogitsModel(), guidance)
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[:, 1:3, 1:3] = 1
    batch = {"image": np.zeros((2, 4, 4, 3), np.uint8), "mask": truth, "valid": np.array([True, True])}
    zeros = {"logits": jnp.zeros((2, 4, 4, 1))}
    dice, iou, _, _ = jax.device_get(step(zeros, zeros, {"head": jnp.full((2, 4, 4), 3.0)}, None, batch))["text_mask"]
    np.testing.assert_array_equal(dice, [0.0, 0.0])
    results = {"val": {name: {"dice": 0.0, "miou": 0.0, "auroc": 50.0} for name in ssl.GUIDANCE_MAPS}}
    table = ssl.format_guidance_table(results, veto_only=True).splitlines()
    assert len(table) == 1 + len(ssl.GUIDANCE_MAPS) + 1
    assert table[-1] == ("(text masks capped at 0.5, config.ssl.text_veto_only: none marks a pixel at 0.5, so their "
                         "Dice and mIoU are 0; their AUROC says how well they rank lesion pixels)")
    assert ssl.format_guidance_table(results).splitlines() == table[:-1]


class _AffineModel:
    """A stand-in U-Net of two parameters: logit = a * (red channel) + b; its 'batch statistic' is the mean image."""

    def apply(self, variables, images, train=False, mutable=None):
        logits = variables["params"]["a"] * images[..., :1] + variables["params"]["b"]
        return (logits, {"batch_stats": {"mean": jnp.mean(images)}}) if mutable else logits


def test_an_unlabeled_weight_without_ramp_up_weighs_the_unlabeled_half_from_the_first_step():
    """ssl.unlabeled_weight = 0.5 with rampup_epochs = 0: loss(labeled) + 0.5 loss(unlabeled) at every step, the
    pseudo-labels being the teacher's probabilities (not SPEC 6's loss over the concatenated batch)."""
    import optax

    from amvlm_jax.train.state import MeanTeacherState

    config = tiny_synthetic_config(**{"mode": "ssl", "ssl.w_text": 0.0, "ssl.train_decoder": False,
                                      "ssl.unlabeled_weight": 0.5})
    variables = {"params": {"a": jnp.float32(2.0), "b": jnp.float32(-1.0)}, "batch_stats": {"mean": jnp.float32(0.0)}}
    teacher = {"params": {"a": jnp.float32(-3.0), "b": jnp.float32(1.0)}, "batch_stats": {"mean": jnp.float32(0.0)}}
    state = MeanTeacherState.create(variables["params"], variables["batch_stats"], optax.sgd(0.0), teacher=teacher)
    step = ssl.make_ssl_step(config, _AffineModel(), None, None, steps_per_epoch=2)
    batch = _batch(config, 0)
    x_l, x_u = (batch[k].astype(np.float32) / 255 for k in ("image", "unlabeled_image"))
    pseudo = 1 / (1 + np.exp(-(-3.0 * x_u[..., :1] + 1.0)))[..., 0]
    labeled = segmentation_loss(2.0 * x_l[..., :1] - 1.0, batch["mask"].astype(np.float32))
    unlabeled = segmentation_loss(2.0 * x_u[..., :1] - 1.0, pseudo)
    _, step_metrics = jax.jit(step.step)(state, None, batch)
    assert float(step_metrics["loss"]) == pytest.approx(float(labeled + 0.5 * unlabeled), rel=1e-5)
    assert float(step_metrics["pseudo_label_mean"]) == pytest.approx(float(pseudo.mean()), rel=1e-5)


def test_an_epoch_is_ceil_of_the_longer_part_over_the_batch_and_precise_bn_mixes_the_first_images(tmp_path,
                                                                                                   monkeypatch):
    """16 training images, a quarter labelled: 4 labelled and 12 unlabelled, batches of 5 of each. An epoch is
    ceil(12 / 5) = 3 steps (over the longer part; 2 would leave unlabelled images out of every epoch, 1 is the
    shorter part's), also for the ramp-up's steps. precise_bn_images=6: the first 3 labelled and the first 3
    unlabelled images, one to one, in batches of 10 (a training step's labelled and unlabelled halves)."""
    import inspect

    config = tiny_synthetic_config(**{"mode": "ssl", "data.labeled_fraction": 0.25, "ssl.w_text": 0.0,
                                      "ssl.train_decoder": False, "train.batch_size": 5,
                                      "train.precise_bn_images": 6, "eval.guidance": False})
    seen = {}
    signature = inspect.signature(supervised.segmentation_job)
    monkeypatch.setattr(supervised, "segmentation_job", lambda *args: seen.update(signature.bind(*args).arguments))
    making = ssl.make_ssl_step
    monkeypatch.setattr(ssl, "make_ssl_step", lambda *args: seen.update(step_args=args) or making(*args))
    monkeypatch.setattr(ssl, "initial_state", lambda *args, **kwargs: (None, None))  # Read by no assertion here.
    monkeypatch.setattr(ssl.loop, "run", lambda job: None)
    monkeypatch.setattr(supervised, "evaluate_checkpoint", lambda *args, **kwargs: {})
    ssl.train(config, tmp_path)
    labeled, unlabeled = datasets.load_train_parts(config, datasets.data_root(config, tmp_path))
    assert (len(labeled), len(unlabeled)) == (4, 12)
    assert seen["steps_per_epoch"] == 3 and seen["step_args"][4] == 3 and seen["batch_stats_batch_size"] == 10
    expected = [labeled.images[0], unlabeled.images[0], labeled.images[1], unlabeled.images[1], labeled.images[2],
                unlabeled.images[2]]
    np.testing.assert_array_equal(seen["batch_stats_images"], np.stack(expected))


def test_encoders_recorded_at_the_data_size_are_rebuilt_at_that_size_not_the_commands():
    """A pre-training run recorded with pretrain.image_size 0 trained its encoders at its data.image_size
    (48 here): guidance rebuilds them at 48 whatever this command's sizes (64), and with the recorded
    pretrain fields (the ViT's width) over the command's."""
    config = tiny_pretrain_config(**{"mode": "ssl", "pretrain.image_size": 96, "pretrain.vit_width": 32})
    recorded = tiny_pretrain_config(**{"pretrain.image_size": 0, "pretrain.vit_width": 48, "data.image_size": 48})
    rebuilt = ssl.encoder_config(config, recorded.to_dict())
    assert (rebuilt.pretrain.image_size, rebuilt.pretrain.vit_width, rebuilt.data.image_size) == (48, 48, 64)
    assert ssl.encoder_config(config, None).pretrain.image_size == 96  # Nothing recorded: the command's.
