"""The epoch loop shared by the segmentation jobs: steps, validation, checkpoints, logs."""

from __future__ import annotations

import pathlib
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
from tqdm import tqdm

from amvlm_jax import metrics, visualize
from amvlm_jax.data import pipeline
from amvlm_jax.data.folders import SplitArrays
from amvlm_jax.train import checkpoint, evaluate
from amvlm_jax.train.logging import MetricWriter


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss), described in one line."""


def fit(
    config,
    workdir: pathlib.Path,
    mesh,
    state: Any,
    train_step: Callable,
    make_batches: Callable[[int], Iterator[dict]],
    steps_per_epoch: int,
    val_split: Optional[SplitArrays],
    eval_step: Callable,
    extra_step_args: tuple = (),
    lr_schedule: Optional[Callable] = None,
    picture_panels: Optional[Callable] = None,
    refresh_batch_stats: Optional[Callable] = None,
) -> Any:
    """Runs config.train.epochs epochs, continuing from the workdir's latest checkpoint.

    `make_batches(start_step)` returns an iterator over this process's numpy
    share of each step's batch from `start_step` on. Because the stream is
    indexed by step, a run continues exactly where its checkpoint was taken,
    mid-epoch included. After every epoch the student is validated (every
    train.eval_every_epochs epochs), metrics go to JSONL/TensorBoard, and the
    latest (and, when validation Dice improved, the best) checkpoint is
    written; every train.picture_every_epochs epochs (and the last) overlays
    of a few validation images go to <workdir>/pictures/ (panels from
    `picture_panels(state, rows)` -> {name: (N, H, W) in [0, 1]}), and the curves to
    <workdir>/curves.png at the end. `refresh_batch_stats(state) -> state`, when
    given, recomputes the BatchNorm statistics at the end of every epoch, before
    validation and the checkpoint. A non-finite loss raises TrainingError before anything is saved,
    leaving the last good checkpoint; Ctrl-C saves the current state first.
    Returns the final state.
    """
    checkpoints = checkpoint.RunCheckpoints(workdir)
    state, meta = resume_point(checkpoints, state, workdir)
    writer = MetricWriter(workdir)
    start_step = int(state.step)
    batches = make_batches(start_step)
    current = {"state": state}  # The newest state, also when an epoch is cut short.
    try:
        for epoch in range(start_step // steps_per_epoch, config.train.epochs):
            _run_epoch(config, workdir, mesh, current, train_step, batches, steps_per_epoch, val_split,
                       eval_step, extra_step_args, lr_schedule, epoch, meta, checkpoints, writer, picture_panels,
                       refresh_batch_stats)
    except KeyboardInterrupt:
        state = current["state"]
        step = int(state.step)
        if checkpoints.latest.latest_step() != step:
            checkpoints.save(step, state, dict(meta), is_best=False)
        checkpoints.wait()
        raise KeyboardInterrupt(f"interrupted: saved {workdir}/checkpoints/latest/{step}; run the same command to resume")
    finally:
        checkpoints.wait()
        checkpoints.close()
        writer.close()
        if jax.process_index() == 0:
            visualize.save_curves(workdir)
    return current["state"]


def _run_epoch(config, workdir, mesh, current, train_step, batches, steps_per_epoch, val_split, eval_step,
               extra_step_args, lr_schedule, epoch, meta, checkpoints, writer, picture_panels, refresh_batch_stats):
    started = time.time()
    state = current["state"]
    first = int(state.step) - epoch * steps_per_epoch  # > 0 when resuming mid-epoch.
    progress = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{config.train.epochs}", leave=False)
    losses = []
    for index in progress:
        state, step_metrics = train_step(state, *extra_step_args, pipeline.to_global(mesh, next(batches)))
        current["state"] = state
        losses.append(step_metrics["loss"])
        # Counted on the host: reading state.step would wait for the device after every step.
        step = epoch * steps_per_epoch + index + 1
        if step % config.train.log_every_steps == 0:
            step_metrics = {f"train/{k}": v for k, v in jax.device_get(step_metrics).items()}
            check_finite(step_metrics["train/loss"], step, workdir)
            if lr_schedule is not None:
                step_metrics["train/lr"] = lr_schedule(step - 1)
            progress.set_postfix(loss=f"{float(step_metrics['train/loss']):.4f}")
            writer.write(step, step_metrics)
    epoch_loss = float(np.mean(jax.device_get(losses)))
    check_finite(epoch_loss, int(state.step), workdir)
    if refresh_batch_stats is not None:
        state = current["state"] = refresh_batch_stats(state)
    epoch_metrics = {"epoch": epoch + 1, "train/epoch_loss": epoch_loss}
    last = epoch + 1 == config.train.epochs
    is_best = val_split is None  # Without validation data the newest model is the one to keep.
    if val_split is not None and ((epoch + 1) % config.train.eval_every_epochs == 0 or last):
        dice, iou = evaluate.evaluate_split(
            eval_step, state.params, state.batch_stats, val_split, mesh, config.train.eval_batch_size
        )
        summary = metrics.summarize(dice, iou)
        epoch_metrics |= {"val/dice": summary["dice"], "val/miou": summary["miou"]}
        is_best = summary["dice"] > meta["best_val_dice"]
        if is_best:
            meta |= {"best_val_dice": summary["dice"], "best_epoch": epoch + 1}
    meta["epoch"] = epoch + 1
    epoch_metrics["epoch_seconds"] = time.time() - started
    writer.write(int(state.step), epoch_metrics)
    checkpoints.save(int(state.step), state, dict(meta), is_best)
    val_text = ""
    if "val/dice" in epoch_metrics:
        val_text = f" val Dice {epoch_metrics['val/dice']:.2f} (best {meta['best_val_dice']:.2f} @ {meta['best_epoch']})"
    tqdm.write(f"epoch {epoch + 1}: loss {epoch_loss:.4f}{val_text} [{epoch_metrics['epoch_seconds']:.1f}s]")
    every = config.train.picture_every_epochs
    if picture_panels is not None and val_split is not None and every and ((epoch + 1) % every == 0 or last):
        rows = np.arange(min(config.train.picture_images, len(val_split)))
        panels = picture_panels(state, rows)  # Collective in multi-process runs: every process computes.
        if jax.process_index() == 0:
            visualize.save_overlays(
                workdir / "pictures" / f"epoch_{epoch + 1:04d}.png", val_split.images[rows],
                {"truth": val_split.masks[rows], **panels}, names=[val_split.names[i] for i in rows],
                title=f"epoch {epoch + 1}",
            )


def check_finite(loss: float, step: int, workdir: pathlib.Path) -> None:
    """Raises TrainingError (one line, naming the checkpoint kept) when the loss is NaN or infinite."""
    if not np.isfinite(loss):
        raise TrainingError(
            f"loss is {loss} at step {step}; stopped without saving, {workdir}/checkpoints/latest keeps the last good state "
            "(lower the learning rate or check the data)"
        )


def resume_point(checkpoints: checkpoint.RunCheckpoints, state: Any, workdir: pathlib.Path) -> tuple[Any, dict]:
    """(state, meta) of the latest checkpoint, or the fresh state with meta of epoch 0."""
    state, meta = checkpoints.restore_latest(state)
    if meta is None:
        return state, {"epoch": 0, "best_val_dice": -1.0, "best_epoch": 0}
    print(f"resuming from {workdir}/checkpoints/latest at step {int(state.step)} (epoch {meta['epoch']} complete)")
    return state, meta

