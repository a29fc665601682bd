"""Segmentation evaluation: per-image Dice/IoU, results.json and per-image CSVs."""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from amvlm_jax import metrics
from amvlm_jax.data import pipeline
from amvlm_jax.data.folders import SplitArrays
from amvlm_jax.train.parallel import gather_to_host


def make_eval_step(model, num_classes: int) -> Callable:
    """jitted (params, batch_stats, batch) -> (dice (B,), iou (B,)) with the model in inference mode."""

    @jax.jit
    def eval_step(params, batch_stats, batch):
        images = batch["image"].astype(jnp.float32) / 255.0
        logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
        predicted = metrics.predict_labels(logits)
        return metrics.dice_iou_per_image(predicted, batch["mask"].astype(jnp.int32), num_classes)

    return eval_step


def make_predict_step(model) -> Callable:
    """jitted (params, batch_stats, images uint8 (B, H, W, 3)) -> foreground probability or labels (B, H, W)."""

    @jax.jit
    def predict_step(params, batch_stats, images):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, images.astype(jnp.float32) / 255.0, train=False)
        if logits.shape[-1] == 1:
            return jax.nn.sigmoid(logits[..., 0])
        return metrics.predict_labels(logits)

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


def evaluate_split(eval_step, params, batch_stats, split: SplitArrays, mesh: Mesh, batch_size: int):
    """Per-image (dice, iou) numpy arrays over a whole split, in its order."""
    batch_size = -(-batch_size // mesh.size) * mesh.size  # Every device gets equal rows.
    dice, iou = [], []
    for batch, real in pipeline.evaluation_batches(split, batch_size):
        batch_dice, batch_iou = gather_to_host(eval_step(params, batch_stats, pipeline.replicated_to_global(mesh, batch)))
        dice.append(np.asarray(batch_dice)[:real])
        iou.append(np.asarray(batch_iou)[:real])
    return np.concatenate(dice), np.concatenate(iou)


def write_results(workdir: str | pathlib.Path, per_split: dict[str, Optional[tuple]], names: dict[str, list]) -> dict:
    """Writes <workdir>/results.json and per_image_<split>.csv; returns the results dict.

    per_split maps split -> (dice, iou) arrays in [0, 1], or None for a split
    the data does not have. results.json holds percentages.
    """
    workdir = pathlib.Path(workdir)
    results = {}
    for split, values in per_split.items():
        if values is None:
            results[split] = None
            continue
        dice, iou = values
        results[split] = metrics.summarize(dice, iou)
        if jax.process_index() == 0:
            with open(workdir / f"per_image_{split}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["file", "dice", "iou"])
                for name, d, i in zip(names[split], dice, iou):
                    writer.writerow([name, f"{d * 100:.4f}", f"{i * 100:.4f}"])
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict) -> str:
    """A small text table of Dice and mIoU (percent) per split."""
    lines = [f"{'split':<8}{'images':>8}{'Dice':>9}{'mIoU':>9}"]
    for split, values in results.items():
        if values is None:
            lines.append(f"{split:<8}{'(no data)':>8}")
        else:
            lines.append(f"{split:<8}{values['images']:>8}{values['dice']:>9.2f}{values['miou']:>9.2f}")
    return "\n".join(lines)
