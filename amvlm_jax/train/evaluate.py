"""Segmentation evaluation: per-image Dice/IoU, results.json and per-image CSVs."""

from __future__ import annotations

import hashlib
import pathlib
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from amvlm_jax import metrics, visualize
from amvlm_jax.data import pipeline
from amvlm_jax.data.folders import SplitArrays
from amvlm_jax.ops import BATCH_NORM_MOMENTUM
from amvlm_jax.train.logging import csv_text, json_text, write_atomically
from amvlm_jax.train.loop import Evaluator, stop_if_interrupted
from amvlm_jax.train.parallel import gather_to_host


def make_eval_step(model, num_classes: int) -> Callable:
    """jitted (params, batch_stats, batch) -> (dice, iou, present), (B, K) each (``metrics.dice_iou_per_class``),
    with the model in inference mode."""

    @jax.jit
    def eval_step(params, batch_stats, batch):
        images = batch["image"].astype(jnp.float32) / 255.0
        logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
        predicted = metrics.predict_labels(logits)
        return metrics.dice_iou_per_class(predicted, batch["mask"].astype(jnp.int32), num_classes)

    return eval_step


def make_predict_step(model, probabilities: bool = False) -> Callable:
    """jitted (params, batch_stats, images uint8 (B, H, W, 3)) -> the foreground probability (B, H, W) of a
    binary model; of a multi-class one its labels (B, H, W), or with ``probabilities`` its class
    probabilities (B, H, W, C)."""

    @jax.jit
    def predict_step(params, batch_stats, images):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, images.astype(jnp.float32) / 255.0, train=False)
        if logits.shape[-1] == 1:
            return jax.nn.sigmoid(logits[..., 0])
        return jax.nn.softmax(logits, axis=-1) if probabilities else metrics.predict_labels(logits)

    return predict_step


def rows_batch(mesh: Mesh, arrays: dict, rows: np.ndarray) -> dict:
    """Global batch of `rows` of each (N, ...) array, padded by repetition to a multiple of the mesh size."""
    padded = -(-len(rows) // mesh.size) * mesh.size
    return pipeline.replicated_to_global(mesh, {k: v[np.resize(rows, padded)] for k, v in arrays.items()})


def make_prediction_panels(model, mesh: Mesh, split: SplitArrays) -> Callable:
    """(state, rows) -> {'prediction': (N, H, W)}: the model's foreground probability (or labels) on split rows."""
    predict_step = make_predict_step(model)

    def panels(state, rows):
        batch = rows_batch(mesh, {"image": split.images}, rows)
        predicted = gather_to_host(predict_step(state.params, state.batch_stats, batch["image"]))
        return {"prediction": np.asarray(predicted)[: len(rows)]}

    return panels


def validation_evaluator(config, eval_step, split: SplitArrays, mesh: Mesh):
    """The loop's evaluator of a segmentation model on a labelled split: {'val/dice', 'val/miou'} (percent)."""

    def run(state) -> dict:
        dice, iou, present = evaluate_split(eval_step, state.params, state.batch_stats, split, mesh,
                                            config.train.eval_batch_size)
        summary = metrics.summarize(metrics.mean_over_present(dice, present), metrics.mean_over_present(iou, present))
        return {"val/dice": summary["dice"], "val/miou": summary["miou"]}

    return Evaluator(run, every_epochs=config.train.eval_every_epochs, every_steps=config.train.eval_every_steps)


def picture_writer(config, workdir: pathlib.Path, split: SplitArrays, panels: Callable) -> Callable:
    """(state, epoch) -> None: overlays of the first train.picture_images images of ``split`` with their
    true masks and ``panels(state, rows)`` -> {name: (N, H, W) in [0, 1], or class ids}, to <workdir>/pictures/."""
    rows = np.arange(min(config.train.picture_images, len(split)))

    def write(state, epoch: int) -> None:
        maps = panels(state, rows)  # Collective in multi-process runs: every process computes.
        if jax.process_index() == 0:
            visualize.save_overlays(
                pathlib.Path(workdir) / "pictures" / f"epoch_{epoch:04d}.png", split.images[rows],
                {"truth": split.masks[rows], **maps}, names=[split.names[i] for i in rows], title=f"epoch {epoch}",
                num_classes=config.data.num_classes,
            )

    return write


def make_batch_moments_step(model) -> Callable:
    """jitted (params, batch_stats, images uint8 (B, H, W, 3)) -> this batch's BatchNorm moments.

    The result has batch_stats' layout: every BatchNorm layer's mean and
    variance of its input over the batch and space, the variance unbiased as
    the running statistics keep it. The layer folds them into the running
    statistics as momentum * old + (1 - momentum) * batch
    (``ops.running_batch_statistics``), so starting from zeros and dividing
    by (1 - momentum) reads them out exactly.
    """

    @jax.jit
    def batch_moments(params, batch_stats, images):
        zeros = jax.tree.map(jnp.zeros_like, batch_stats)
        _, updates = model.apply(
            {"params": params, "batch_stats": zeros}, images.astype(jnp.float32) / 255.0, train=True, mutable=["batch_stats"]
        )
        return jax.tree.map(lambda folded: folded / (1.0 - BATCH_NORM_MOMENTUM), updates["batch_stats"])

    return batch_moments


def make_batch_stats_refresh(model, images: np.ndarray, mesh: Mesh, batch_size: int) -> Optional[Callable]:
    """state -> state whose batch_stats are recomputed for its params over `images` ("precise BatchNorm").

    images: (N, H, W, 3) uint8, split in order into full batches of
    batch_size (the batch BatchNorm sees in training; fewer images than that
    make one smaller batch, a multiple of the device count); the new
    statistics are the mean of the batches' moments. The running statistics
    that training keeps average the last ~10 steps, whose weights differ from
    the current ones: on the synthetic default their validation Dice jumped
    between 0 and 60 from one epoch to the next while recomputed statistics
    gave a smooth curve. Training itself never reads them (train-mode
    BatchNorm uses the batch's own), so only evaluation and checkpoint
    selection change. (Smooth is not always higher: in short runs the exact
    statistics expose the U-Net's over-segmentation, which stale ones happen
    to damp; docs/results.md.) Returns None without images.
    """
    batch_size = min(batch_size, len(images)) // mesh.size * mesh.size
    if batch_size == 0:
        return None
    batch_moments = make_batch_moments_step(model)
    # Placed on the devices once; every epoch's refresh reuses them.
    batches = [
        pipeline.replicated_to_global(mesh, {"image": images[start : start + batch_size]})["image"]
        for start in range(0, len(images) - batch_size + 1, batch_size)
    ]

    def refresh(state):
        total = None
        for batch in batches:
            moments = batch_moments(state.params, state.batch_stats, batch)
            total = moments if total is None else jax.tree.map(jnp.add, total, moments)
        return state.replace(batch_stats=jax.tree.map(lambda s: s / len(batches), total))

    return refresh


def evaluate_split(eval_step, params, batch_stats, split: SplitArrays, mesh: Mesh, batch_size: int):
    """(dice, iou, present) numpy arrays (N, K) over a whole split, in its order (``make_eval_step``)."""
    batch_size = -(-batch_size // mesh.size) * mesh.size  # Every device gets equal rows.
    parts = []
    for batch, real in pipeline.evaluation_batches(split, batch_size):
        stop_if_interrupted()
        values = gather_to_host(eval_step(params, batch_stats, pipeline.replicated_to_global(mesh, batch)))
        parts.append([np.asarray(v)[:real] for v in values])
    return tuple(np.concatenate(column) for column in zip(*parts))


def masks_fingerprint(names: list, masks: np.ndarray) -> str:
    """A digest of a split's true masks (N, H, W) taken in image-name order: two evaluations that agree on it
    scored the same images against the same masks at the same size (tools/compare.py pairs runs by name
    and checks it)."""
    digest = hashlib.sha256(str(masks.shape[1:]).encode())
    for row in np.argsort(np.asarray(names), kind="stable"):
        digest.update(np.ascontiguousarray(masks[row], np.uint8).tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def write_results(workdir: str | pathlib.Path, per_split: dict[str, Optional[tuple]],
                  data: dict[str, SplitArrays]) -> dict:
    """Writes <workdir>/results.json and per_image_<split>.csv; returns the results dict.

    per_split maps split -> (dice, iou, present) (N, K) arrays of ``evaluate_split``, or None for a split
    the data does not have; data maps each evaluated split to its SplitArrays. results.json holds
    percentages and each split's ``masks_fingerprint`` ('masks'); a multi-class task adds each class's scores
    ('classes', ``metrics.class_summary``) and the per-image CSV a Dice column per class (empty where
    the class is in neither the prediction nor the truth).
    """
    workdir = pathlib.Path(workdir)
    results = {}
    for split, values in per_split.items():
        if values is None:
            results[split] = None
            continue
        class_dice, class_iou, present = values
        dice, iou = metrics.mean_over_present(class_dice, present), metrics.mean_over_present(class_iou, present)
        names = data[split].names
        results[split] = metrics.summarize(dice, iou) | {"masks": masks_fingerprint(names, data[split].masks)}
        classes = class_dice.shape[1]
        if classes > 1:
            results[split]["classes"] = metrics.class_summary(class_dice, class_iou, present)
        if jax.process_index() == 0:
            rows = [["file", "dice", "iou"] + ([f"dice_class_{k}" for k in range(1, classes + 1)] if classes > 1 else [])]
            for row, (name, d, i) in enumerate(zip(names, dice, iou)):
                per_class = ([f"{class_dice[row, k] * 100:.4f}" if present[row, k] else "" for k in range(classes)]
                             if classes > 1 else [])
                rows.append([name, f"{d * 100:.4f}", f"{i * 100:.4f}"] + per_class)
            write_atomically(workdir / f"per_image_{split}.csv", csv_text(rows))
    if jax.process_index() == 0:
        write_atomically(workdir / "results.json", json_text(results, indent=2) + "\n")
    return results


def format_table(results: dict) -> str:
    """A small text table of Dice and mIoU (percent) per split."""
    lines = [f"{'split':<8}{'images':>8}{'Dice':>9}{'mIoU':>9}"]
    for split, values in results.items():
        if values is None:
            lines.append(f"{split:<8}{'(no data)':>8}")
        else:
            lines.append(f"{split:<8}{values['images']:>8}{values['dice']:>9.2f}{values['miou']:>9.2f}")
            for name, scores in (values.get("classes") or {}).items():  # Over the images holding the class.
                scores_text = (f"{scores['dice']:>9.2f}{scores['miou']:>9.2f}" if scores["images"] else
                               f"{'-':>9}{'-':>9}")
                # 11 + 5 = the split and images columns' 16, so that class ids up to 999 keep the columns.
                lines.append(f"{'  class ' + name:<11}{scores['images']:>5}{scores_text}")
    return "\n".join(lines)
