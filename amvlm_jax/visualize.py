"""Pictures of a run: mask overlays and training curves (matplotlib, PNG)."""

from __future__ import annotations

import colorsys
import json
import pathlib

import numpy as np

OVERLAY_COLORS = {"truth": (0.1, 0.9, 0.1), "prediction": (1.0, 0.2, 0.2), "pseudo-label": (0.2, 0.5, 1.0),
                  "text mask": (1.0, 0.8, 0.0)}


def class_colours(num_classes: int) -> np.ndarray:
    """(max(num_classes, 2), 3) uint8 RGB: black for the background, red for a binary task's foreground,
    the foreground classes of a multi-class one spread around the hue circle (neighbours far apart)."""
    count = max(num_classes, 2) - 1
    hues = (np.arange(count) * 0.381966) % 1.0  # Steps of the golden ratio: successive ids contrast.
    rgb = [colorsys.hsv_to_rgb(h, 1.0, 1.0 if i % 2 == 0 else 0.7) for i, h in enumerate(hues)]
    return np.round(np.array([(0.0, 0.0, 0.0), *rgb]) * 255).astype(np.uint8)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # Files only: no display on training machines.
    import matplotlib.pyplot as plt

    return plt


def tint(image: np.ndarray, panel: np.ndarray, name: str, num_classes: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8 with ``panel`` blended in, as floats in [0, 1]; the panel's weight (H, W) in
    [0, 1]; its contour colour). A probability or 0/1 mask blends in the name's colour by its value; an
    integer panel of a multi-class task (``num_classes`` > 2, or ids above 1) each class in its
    ``class_colours``, so class 1 has one colour whether or not an image also holds higher ids."""
    ids = np.asarray(panel)
    value = np.clip(ids.astype(np.float32), 0.0, 1.0)
    colour = edge = np.array(OVERLAY_COLORS.get(name, (1.0, 0.0, 1.0)), np.float32)
    if np.issubdtype(ids.dtype, np.integer) and (num_classes > 2 or ids.max() > 1):
        colour, edge = class_colours(max(num_classes, int(ids.max()) + 1))[ids] / 255.0, np.ones(3, np.float32)
    tinted = image / 255.0 * (1 - 0.45 * value[..., None]) + 0.45 * value[..., None] * colour
    return np.clip(tinted, 0.0, 1.0), value, edge


def save_overlays(path: str | pathlib.Path, images: np.ndarray, panels: dict[str, np.ndarray], names=None,
                  title: str = "", num_classes: int = 1) -> pathlib.Path:
    """One row per image: the image, then each panel drawn over it.

    images: (N, H, W, 3) uint8. panels: name -> (N, H, W) masks, class ids or
    probabilities in [0, 1], drawn as ``tint`` blends them (``num_classes`` of
    the task), with the 0.5 contour.
    """
    plt = _pyplot()
    count, columns = len(images), 1 + len(panels)
    figure, axes = plt.subplots(count, columns, figsize=(2.4 * columns, 2.4 * count), squeeze=False)
    for row in range(count):
        axes[row, 0].imshow(images[row])
        axes[row, 0].set_title(names[row] if names is not None else "image", fontsize=7)
        for column, (name, values) in enumerate(panels.items(), start=1):
            tinted, value, edge = tint(images[row], values[row], name, num_classes)
            axes[row, column].imshow(tinted)
            if value.min() < 0.5 < value.max():  # contour needs both sides of the level
                axes[row, column].contour(value, levels=[0.5], colors=[edge], linewidths=0.6)
            axes[row, column].set_title(name, fontsize=7)
    for axis in axes.ravel():
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def curve_panels(rows: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Evaluation curves of metrics.jsonl's epoch rows, one panel per split: {split: {metric: [(epoch,
    value)]}}, from keys '<split>/<metric>'. Constants (a score's '/rows' and '/majority') and the
    training epoch means ('train/epoch_*', the loss panel's) are left out."""
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in rows:
        for key, value in row.items():
            if "/" in key and not key.startswith("train/epoch_") and not key.endswith(("/rows", "/majority")):
                split, metric = key.split("/", 1)
                panels.setdefault(split, {}).setdefault(metric, []).append((row["epoch"], value))
    return panels


def save_curves(workdir: str | pathlib.Path, path: str | pathlib.Path | None = None) -> pathlib.Path | None:
    """Training loss and every evaluator metric (validation Dice and mIoU; retrieval, zero-shot and probe
    accuracy) per epoch from <workdir>/metrics.jsonl, one panel per split, as <workdir>/curves.png."""
    workdir = pathlib.Path(workdir)
    metrics_path = workdir / "metrics.jsonl"
    if not metrics_path.is_file():
        return None
    from amvlm_jax.train.logging import null_as_nan

    # Every field is a number: a null was a NaN (json_text).
    rows = [null_as_nan(r) for r in map(json.loads, metrics_path.read_text().splitlines()) if "epoch" in r]
    trained = [r for r in rows if "train/epoch_loss" in r]
    if not trained:
        return None
    panels = curve_panels(rows)
    plt = _pyplot()
    figure, axes = plt.subplots(1, 1 + len(panels), figsize=(4.2 * (1 + len(panels)), 3.4), squeeze=False)
    loss_axis = axes[0, 0]
    loss_axis.plot([r["epoch"] for r in trained], [r["train/epoch_loss"] for r in trained], color="tab:blue")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss")
    order = {"train": 0, "val": 1, "test": 2}
    for axis, (split, curves) in zip(axes[0, 1:], sorted(panels.items(), key=lambda item: (order.get(item[0], 3), item[0]))):
        for metric, points in sorted(curves.items()):
            axis.plot(*zip(*points), marker=".", label=metric)
        axis.set_title(split, fontsize=9)
        axis.set_xlabel("epoch")
        # Below the panel: a pre-training run scores ten metrics per split.
        axis.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    figure.suptitle(workdir.name, fontsize=9)
    path = pathlib.Path(path) if path else workdir / "curves.png"
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
