"""Supervised U-Net training (the paper's 'U-Net' rows) and U-Net evaluation."""

from __future__ import annotations

import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from amvlm_jax import metrics
from amvlm_jax.data import datasets, pipeline
from amvlm_jax.losses.segmentation import mask_targets, segmentation_loss
from amvlm_jax.models.unet import UNet
from amvlm_jax.train import checkpoint, evaluate
from amvlm_jax.train.logging import MetricWriter
from amvlm_jax.train.parallel import make_mesh, replicate
from amvlm_jax.train.state import TrainState, cosine_restarts


def build_unet(config) -> UNet:
    return UNet(num_classes=config.data.num_classes, base_width=config.unet.base_width, dtype=jnp.dtype(config.dtype))


def create_state(config, model: UNet, steps_per_epoch: int) -> TrainState:
    """Initial U-Net state; the schedule needs steps_per_epoch."""
    size = config.data.image_size
    variables = jax.jit(model.init, static_argnames="train")(
        jax.random.PRNGKey(config.seed), jnp.zeros((1, size, size, 3), jnp.float32), train=False
    )
    schedule = cosine_restarts(config.train.lr, config.train.min_lr, config.train.restart_epochs, steps_per_epoch)
    return TrainState.create(variables["params"], variables["batch_stats"], optax.adam(schedule))


def make_train_step(model: UNet, num_classes: int):
    """jitted (state, batch) -> (state, metrics): one Adam step on Dice+BCE / Dice+CE."""

    def loss_fn(params, batch_stats, images, targets):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        return segmentation_loss(logits, targets), (updates["batch_stats"], logits)

    def train_step(state: TrainState, batch: dict):
        images = batch["image"].astype(jnp.float32) / 255.0
        targets = mask_targets(batch["mask"], num_classes)
        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, images, targets
        )
        state = state.apply_gradients(grads, batch_stats=batch_stats)
        dice, _ = metrics.dice_iou_per_image(metrics.predict_labels(logits), batch["mask"].astype(jnp.int32), num_classes)
        return state, {"loss": loss, "train_dice": jnp.mean(dice)}

    return jax.jit(train_step, donate_argnums=0)


def train(config, workdir: str | pathlib.Path) -> dict:
    """Trains on the labeled training images, validating every epoch; resumes from workdir.

    Ends by evaluating the best checkpoint on the validation and test splits;
    returns the results dict also written to <workdir>/results.json.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(config)
    root = datasets.data_root(config, workdir)
    train_split = datasets.load_labeled_train(config, root)
    val_split = datasets.load_eval_split(config, root, "val")
    batch_size = config.train.batch_size
    steps_per_epoch = max(1, math.ceil(len(train_split) / batch_size))
    print(f"training on {len(train_split)} labeled images, {steps_per_epoch} steps per epoch, {mesh.size} device(s)")

    model = build_unet(config)
    state = replicate(mesh, create_state(config, model, steps_per_epoch))
    checkpoints = checkpoint.RunCheckpoints(workdir)
    state, meta = checkpoints.restore_latest(state)
    meta = meta or {"epoch": 0, "best_val_dice": -1.0, "best_epoch": 0}
    if meta["epoch"]:
        print(f"resuming from {workdir}/checkpoints/latest after epoch {meta['epoch']}")

    train_step = make_train_step(model, config.data.num_classes)
    eval_step = evaluate.make_eval_step(model, config.data.num_classes)
    writer = MetricWriter(workdir)
    batches = pipeline.training_batches(
        train_split,
        batch_size,
        seed=config.seed,
        start_step=meta["epoch"] * steps_per_epoch,
        worker_count=config.data.worker_count,
    )
    schedule = cosine_restarts(config.train.lr, config.train.min_lr, config.train.restart_epochs, steps_per_epoch)
    for epoch in range(meta["epoch"], config.train.epochs):
        started = time.time()
        progress = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.train.epochs}", leave=False)
        losses = []
        for _ in progress:
            state, step_metrics = train_step(state, pipeline.to_global(mesh, next(batches)))
            losses.append(step_metrics["loss"])
            step = int(state.step)
            if step % config.train.log_every_steps == 0:
                step_metrics = jax.device_get(step_metrics)
                progress.set_postfix(loss=f"{float(step_metrics['loss']):.4f}")
                writer.write(step, {f"train/{k}": v for k, v in step_metrics.items()} | {"train/lr": schedule(step - 1)})
        epoch_metrics = {"epoch": epoch + 1, "train/epoch_loss": float(np.mean(jax.device_get(losses)))}
        is_best = False
        if val_split is not None and ((epoch + 1) % config.train.eval_every_epochs == 0 or epoch + 1 == config.train.epochs):
            dice, iou = evaluate.evaluate_split(eval_step, state.params, state.batch_stats, val_split, mesh, config.train.eval_batch_size)
            summary = metrics.summarize(dice, iou)
            epoch_metrics |= {"val/dice": summary["dice"], "val/miou": summary["miou"]}
            is_best = summary["dice"] > meta["best_val_dice"]
            if is_best:
                meta |= {"best_val_dice": summary["dice"], "best_epoch": epoch + 1}
        elif val_split is None:
            is_best = True  # Without a validation split the newest model is the one to keep.
        meta["epoch"] = epoch + 1
        epoch_metrics["epoch_seconds"] = time.time() - started
        writer.write(int(state.step), epoch_metrics)
        checkpoints.save(int(state.step), state, dict(meta), is_best)
        val_text = f" val Dice {epoch_metrics['val/dice']:.2f} (best {meta['best_val_dice']:.2f} @ {meta['best_epoch']})" if "val/dice" in epoch_metrics else ""
        tqdm.write(f"epoch {epoch + 1}: loss {epoch_metrics['train/epoch_loss']:.4f}{val_text} [{epoch_metrics['epoch_seconds']:.1f}s]")
    checkpoints.wait()
    checkpoints.close()
    writer.close()
    return evaluate_checkpoint(config, workdir, str(workdir / "checkpoints" / "best"), mesh=mesh, root=root)


def evaluate_checkpoint(config, workdir, checkpoint_path: str = "", mesh=None, root=None) -> dict:
    """Restores a U-Net checkpoint and evaluates it on config.eval.splits; writes results."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh or make_mesh(config)
    root = root or datasets.data_root(config, workdir)
    model = build_unet(config)
    state = replicate(mesh, create_state(config, model, steps_per_epoch=1))
    state, meta, used = checkpoint.restore_path(checkpoint_path or workdir, state)
    print(f"evaluating {used} (epoch {meta.get('epoch')})")
    eval_step = evaluate.make_eval_step(model, config.data.num_classes)
    per_split, names = {}, {}
    for split in config.eval.splits:
        data = datasets.load_eval_split(config, root, split)
        if data is None:
            per_split[split] = None
            continue
        per_split[split] = evaluate.evaluate_split(eval_step, state.params, state.batch_stats, data, mesh, config.train.eval_batch_size)
        names[split] = data.names
    results = evaluate.write_results(workdir, per_split, names)
    print(evaluate.format_table(results))
    return results
