"""Supervised U-Net training (the paper's 'U-Net' rows) and U-Net evaluation."""

from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
import optax

from amvlm_jax import metrics
from amvlm_jax.data import datasets, pipeline
from amvlm_jax.losses.segmentation import mask_targets, segmentation_loss
from amvlm_jax.models.unet import UNet
from amvlm_jax.train import checkpoint, evaluate, loop
from amvlm_jax.train.logging import info
from amvlm_jax.train.parallel import StepKeepingShardings, abstract_replicated, make_mesh, replicate
from amvlm_jax.train.state import TrainState, cosine_restarts, optimizer_telemetry


def build_unet(config) -> UNet:
    return UNet(num_classes=config.data.num_classes, base_width=config.unet.base_width, dtype=jnp.dtype(config.dtype),
                architecture=config.unet.architecture)


def init_variables(config, model: UNet) -> dict:
    """{'params', 'batch_stats'} of a fresh U-Net (seeded by config.seed)."""
    size = config.data.image_size
    return jax.jit(model.init, static_argnames="train")(
        jax.random.PRNGKey(config.seed), jnp.zeros((1, size, size, 3), jnp.float32), train=False
    )


def student_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam on the cosine schedule with restarts (SPEC 6); the schedule needs steps_per_epoch."""
    return optax.adam(cosine_restarts(config.train.lr, config.train.min_lr, config.train.restart_epochs, steps_per_epoch))


def create_state(config, model: UNet, steps_per_epoch: int) -> TrainState:
    """Initial U-Net state."""
    variables = init_variables(config, model)
    return TrainState.create(variables["params"], variables["batch_stats"], student_optimizer(config, steps_per_epoch))


def initial_state(config, model: UNet, mesh, steps_per_epoch: int) -> TrainState:
    """The job's state on ``mesh``: replicated (a U-Net is small; the batch is split over the devices)."""
    return replicate(mesh, create_state(config, model, steps_per_epoch))


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
        return state, {"loss": loss, "train_dice": jnp.mean(dice), **optimizer_telemetry(grads, state.params)}

    return StepKeepingShardings(train_step)


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
    info(f"training on {len(train_split)} labeled images, {steps_per_epoch} steps per epoch, {mesh.size} device(s)")

    model = build_unet(config)
    state = initial_state(config, model, mesh, steps_per_epoch)

    def batches(start_step):
        return pipeline.training_batches(
            train_split, batch_size, seed=config.seed, start_step=start_step, worker_count=config.data.worker_count
        )

    loop.run(segmentation_job(
        "supervised", config, workdir, mesh, model, state, make_train_step(model, config.data.num_classes), batches,
        steps_per_epoch, val_split, evaluate.make_prediction_panels(model, mesh, val_split) if val_split else None,
        train_split.images[: config.train.precise_bn_images], batch_size,
    ))
    return evaluate_checkpoint(config, workdir, str(workdir / "checkpoints" / "best"), mesh=mesh, root=root)


def segmentation_job(name, config, workdir, mesh, model, state, train_step, batches, steps_per_epoch, val_split,
                     panels, batch_stats_images, batch_stats_batch_size) -> loop.Job:
    """The loop's description of a job that trains a U-Net (supervised or mean teacher): validated on
    ``val_split`` (the best checkpoint by validation Dice; the newest without one), BatchNorm statistics
    recomputed on ``batch_stats_images`` after every epoch, overlays from ``panels`` (see
    ``evaluate.picture_writer``)."""
    eval_step = evaluate.make_eval_step(model, config.data.num_classes)
    if val_split is None:
        info(f"no validation split in {config.data.root}: the newest checkpoint is kept as the best")
    return loop.Job(
        name=name, workdir=workdir, mesh=mesh, config=config, state=state, train_step=train_step, batches=batches,
        steps_per_epoch=steps_per_epoch, epochs=config.train.epochs,
        evaluators=[evaluate.validation_evaluator(config, eval_step, val_split, mesh)] if val_split is not None else [],
        best_metric="val/dice" if val_split is not None else None,
        log_every_steps=config.train.log_every_steps, checkpoint_every_epochs=config.train.checkpoint_every_epochs,
        learning_rate=cosine_restarts(config.train.lr, config.train.min_lr, config.train.restart_epochs, steps_per_epoch),
        end_of_epoch=evaluate.make_batch_stats_refresh(model, batch_stats_images, mesh, batch_stats_batch_size),
        pictures=evaluate.picture_writer(config, workdir, val_split, panels) if panels is not None else None,
        picture_every_epochs=config.train.picture_every_epochs, batch_size=config.train.batch_size,
        unused_fields=("pretrain", "ssl") if name == "supervised" else (),  # The U-Net alone reads neither.
    )


def evaluate_checkpoint(config, workdir, checkpoint_path: str = "", mesh=None, root=None) -> dict:
    """Restores a U-Net checkpoint and evaluates it on config.eval.splits; writes results."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh or make_mesh(config, batch_size=0)  # evaluate_split pads its batches to a multiple of the devices.
    root = root or datasets.data_root(config, workdir)
    model = build_unet(config)
    variables = abstract_replicated(mesh, jax.eval_shape(lambda: init_variables(config, model)))
    variables, meta, used = checkpoint.restore_variables(checkpoint_path or workdir, variables)
    info(f"evaluating {used} (epoch {meta.get('epoch')})")
    eval_step = evaluate.make_eval_step(model, config.data.num_classes)
    per_split, evaluated = {}, {}
    for split in config.eval.splits:
        data = datasets.load_eval_split(config, root, split)
        if data is None:
            per_split[split] = None
            continue
        per_split[split] = evaluate.evaluate_split(
            eval_step, variables["params"], variables["batch_stats"], data, mesh, config.train.eval_batch_size
        )
        evaluated[split] = data
    results = evaluate.write_results(workdir, per_split, evaluated)
    info(evaluate.format_table(results))
    return results
