"""Dice and IoU per image (SPEC section 7)."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def predict_labels(logits: jax.Array) -> jax.Array:
    """Logits (B, H, W, C) to labels (B, H, W): sigmoid > 0.5 when C = 1, argmax otherwise."""
    if logits.shape[-1] == 1:
        return (logits[..., 0] > 0).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def dice_iou_per_class(predicted: jax.Array, truth: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-image Dice and IoU of each foreground class, and whether the class is in the image.

    predicted, truth: (B, H, W) integer labels (0 = background). Returns (dice, iou, present), each (B, K),
    K = max(num_classes, 2) - 1 foreground classes: Dice = 2|P & Y| / (|P| + |Y|) and IoU = |P & Y| / |P | Y|
    (float32 in [0, 1]) where the class is in P or Y (present), 1 where it is in neither.
    """
    foreground = jnp.arange(1, max(num_classes, 2))
    p = predicted[..., None] == foreground  # (B, H, W, K)
    y = truth[..., None] == foreground
    intersection = jnp.sum(p & y, axis=(1, 2)).astype(jnp.float32)
    size_p = jnp.sum(p, axis=(1, 2)).astype(jnp.float32)
    size_y = jnp.sum(y, axis=(1, 2)).astype(jnp.float32)
    union = size_p + size_y - intersection
    present = (size_p + size_y) > 0
    dice = jnp.where(present, 2.0 * intersection / jnp.maximum(size_p + size_y, 1.0), 1.0)
    iou = jnp.where(present, intersection / jnp.maximum(union, 1.0), 1.0)
    return dice, iou, present


def mean_over_present(scores, present):
    """(B, K) per-class scores -> (B,): each image's mean over the classes in its prediction or truth, 1 for
    an image with neither (SPEC 7). A class in neither is left out rather than scored 1: with 19 classes, a
    slice showing one and predicted empty would score 18/19. Binary tasks (K = 1) are unchanged by it.
    numpy or jax arrays."""
    count = present.sum(-1)
    return (scores * present).sum(-1) / (count + (count == 0)) + (count == 0)


def dice_iou_per_image(predicted: jax.Array, truth: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Per-image Dice and IoU (B,) each, in [0, 1]: ``dice_iou_per_class`` averaged by ``mean_over_present``."""
    dice, iou, present = dice_iou_per_class(predicted, truth, num_classes)
    return mean_over_present(dice, present), mean_over_present(iou, present)


def class_summary(dice: np.ndarray, iou: np.ndarray, present: np.ndarray) -> dict:
    """{class id: {'dice', 'miou' (percent, means over the images holding the class in P or Y), 'images'}}
    from (N, K) per-class arrays; a class in no image has dice and miou None."""
    summary = {}
    for k in range(dice.shape[1]):
        rows = present[:, k]
        count = int(rows.sum())
        summary[str(k + 1)] = {"dice": float(np.mean(dice[rows, k]) * 100.0) if count else None,
                               "miou": float(np.mean(iou[rows, k]) * 100.0) if count else None, "images": count}
    return summary


def summarize(dice: np.ndarray, iou: np.ndarray) -> dict:
    """Mean Dice and mIoU in percent, as the paper's tables report them."""
    return {"dice": float(np.mean(dice) * 100.0), "miou": float(np.mean(iou) * 100.0), "images": int(len(dice))}


# The logits of float32 probabilities: the smallest positive one (1.4e-45) has a logit of -103.3, and
# 1 - p rounds to 0 above about 16.6.
HISTOGRAM_LOGIT_MIN, HISTOGRAM_LOGIT_MAX = -104.0, 17.0


def foreground_histograms(probability: jax.Array, truth: jax.Array, valid: jax.Array, bins: int) -> tuple[jax.Array, jax.Array]:
    """Pixel counts of foreground probabilities in `bins` equal bins of their logit over
    [HISTOGRAM_LOGIT_MIN, HISTOGRAM_LOGIT_MAX].

    Bins of the logit rather than of the probability, since the AUROC only
    ranks: equal bins over [0, 1] put every p < 1/bins in one bin, where a
    confident map keeps most of its pixels (a text mask's empty cells, below
    1e-7, tied with the lesion pixels it misses): such ties cost a text mask
    4-7 points of AUROC against its exact ranks.

    probability (B, H, W) in [0, 1]; truth (B, H, W) bool foreground; valid
    (B,) bool (padding rows count nowhere). Returns (positive counts,
    negative counts), each (bins,) float32: the sufficient statistics of a
    pixel AUROC that can be summed over batches and devices.
    """
    p = jnp.clip(probability.astype(jnp.float32), 0.0, 1.0)
    logit = jnp.clip(jnp.log(p) - jnp.log1p(-p), HISTOGRAM_LOGIT_MIN, HISTOGRAM_LOGIT_MAX)  # 0 and 1 give -inf and inf.
    position = (logit - HISTOGRAM_LOGIT_MIN) / (HISTOGRAM_LOGIT_MAX - HISTOGRAM_LOGIT_MIN)
    index = jnp.clip(jnp.floor(position * bins).astype(jnp.int32), 0, bins - 1).reshape(-1)
    weight = jnp.broadcast_to(valid[:, None, None], truth.shape).astype(jnp.float32)
    positive = (truth.astype(jnp.float32) * weight).reshape(-1)
    negative = ((1.0 - truth.astype(jnp.float32)) * weight).reshape(-1)
    zeros = jnp.zeros((bins,), jnp.float32)
    return zeros.at[index].add(positive), zeros.at[index].add(negative)


def auroc_from_histograms(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve from binned scores: P(pos > neg) + P(same bin) / 2; NaN without both classes."""
    positive = np.asarray(positive, np.float64)
    negative = np.asarray(negative, np.float64)
    total_pos, total_neg = positive.sum(), negative.sum()
    if total_pos == 0 or total_neg == 0:
        return float("nan")
    negatives_below = np.cumsum(negative) - negative
    return float(np.sum(positive * (negatives_below + 0.5 * negative)) / (total_pos * total_neg))


RETRIEVAL_KS = (1, 5, 10)


def retrieval_ranks(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                    groups: Optional[np.ndarray] = None) -> dict:
    """Each retrieval query's rank of its first right answer (0: found first), the per-query results that
    ``retrieval_scores`` summarises and that paired tests over queries need.

    image_embeddings, text_embeddings (N, D): row i of both is one pair. groups (N,) ints: pairs with
    equal values have the same report text, so any of them is a right answer (a corpus repeats reports:
    several images of one case, a normal study's one-line report); by default every pair is its own group.
    Returns {'i2t': (N,) ints, one query per image: its report's rank among the distinct reports, each
    group being one candidate scored by its best text (a report repeated for 12 images is one answer, not
    12 of the top-10 slots); 't2i': (G,) ints, one query per distinct report (its group's first text row,
    listed in 't2i_rows' (G,)): the rank of the best image of its group among the images (a report
    repeated for 12 images is one query, not 12 copies of one outcome)}. Rank = number of candidates
    outside the query's group scoring at least as high as the best one inside it: a tie counts against
    the right answer, since the encoders cannot tell the two apart (two captions that agree in their first
    pretrain.max_length tokens are one input to the text encoder, and score the same for every image).
    """
    scores = np.asarray(image_embeddings, np.float64) @ np.asarray(text_embeddings, np.float64).T
    groups = np.arange(len(scores)) if groups is None else np.asarray(groups)
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    group_best = np.maximum.reduceat(scores[:, order], starts, axis=1)  # (N, groups): best text of each
    own_group = np.searchsorted(sorted_groups[starts], groups)
    own_best = group_best[np.arange(len(scores)), own_group]
    other_groups = own_group[:, None] != np.arange(len(starts))[None, :]
    same = groups[:, None] == groups[None, :]
    inside = np.where(same, scores, -np.inf)
    queries = np.sort(order[starts])  # Each distinct report's first row, in row order.
    return {"i2t": np.sum((group_best >= own_best[:, None]) & other_groups, axis=1),
            "t2i": np.sum((scores >= inside.max(axis=0, keepdims=True)) & ~same, axis=0)[queries],
            "t2i_rows": queries}


def retrieval_scores(ranks: dict, ks=RETRIEVAL_KS) -> dict:
    """Retrieval scores, in [0, 1], from ``retrieval_ranks``, image-to-report (i2t) and report-to-image
    (t2i, one query per distinct report): top-k accuracy, the share of queries ranked below k (chance for
    i2t k / distinct reports), and the mean reciprocal rank (mrr, the mean of 1 / (rank + 1)), which
    also counts a right answer's move from rank 80 to 40 that no top-k sees."""
    scores = {}
    for k in ks:
        scores[f"i2t_top{k}"] = float(np.mean(ranks["i2t"] < k))
        scores[f"t2i_top{k}"] = float(np.mean(ranks["t2i"] < k))
    for direction in ("i2t", "t2i"):
        scores[f"{direction}_mrr"] = float(np.mean(1.0 / (ranks[direction] + 1)))
    return scores


def _accuracy(predicted: np.ndarray, labels: np.ndarray) -> dict:
    """accuracy, majority (the share of the most frequent label: what always answering it gets) and rows."""
    _, counts = np.unique(labels.astype(str), return_counts=True)
    return {"accuracy": float(np.mean(predicted == labels)), "majority": float(counts.max() / len(labels)),
            "rows": len(labels)}


def zero_shot_accuracy(image_embeddings: np.ndarray, prompt_embeddings: np.ndarray, labels, classes) -> dict:
    """Zero-shot classification by the nearest prompt, in [0, 1].

    image_embeddings (N, D) and prompt_embeddings (C, D), unit norm; labels: N class values (strings);
    classes: the C values the prompts stand for. Rows whose label is not among ``classes`` are not
    scored. Returns accuracy, majority (the share of the most frequent scored class: what always
    answering it gets) and rows (scored).
    """
    labels = np.asarray(labels, dtype=object)
    scored = np.isin(labels, np.asarray(classes, dtype=object))
    if not scored.any():
        return {"accuracy": float("nan"), "majority": float("nan"), "rows": 0}
    scores = np.asarray(image_embeddings, np.float64)[scored] @ np.asarray(prompt_embeddings, np.float64).T
    return _accuracy(np.asarray(classes, dtype=object)[np.argmax(scores, axis=1)], labels[scored])


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_logistic(x: jax.Array, y: jax.Array, l2: float, steps: int) -> dict:
    """{'w' (F, C), 'b' (C,)} minimising mean cross-entropy of one-hot y (N, C) + l2 |w|^2 by ``steps``
    L-BFGS steps from zero. Arguments, not a closure: one compilation per shape, not per call."""
    import optax

    def loss(params):
        logits = x @ params["w"] + params["b"]
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), -1)) + l2 * jnp.sum(params["w"] ** 2)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(_, carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.zeros((x.shape[1], y.shape[1])), "b": jnp.zeros((y.shape[1],))}
    return jax.lax.fori_loop(0, steps, step, (params, solver.init(params)))[0]


def linear_probe_accuracy(train_features: np.ndarray, train_labels, tests: dict, steps: int = 200,
                          l2: float = 1e-3) -> dict:
    """{name: scores} of a multinomial logistic regression fitted once on (train_features (N, F), N labels)
    and scored on each of ``tests`` {name: (features (M, F), M labels)}; scores: accuracy in [0, 1],
    majority (the share of the most frequent scored test class) and rows (scored test rows).

    Features are standardised with the training rows' mean and deviation; the weights minimise the mean
    cross-entropy + l2 |W|^2 by ``steps`` full-batch L-BFGS steps from zero (deterministic). Rows labelled
    '' (none) are neither fitted nor scored; test rows of a class absent from training are not scored; with
    fewer than two training classes nothing is fitted and nothing scored (accuracy NaN, rows 0).
    """
    train_labels = np.asarray(train_labels).astype(str)
    labelled = train_labels != ""
    train_features, train_labels = train_features[labelled], train_labels[labelled]
    classes, train_y = np.unique(train_labels, return_inverse=True)
    params = None
    if len(classes) >= 2:
        mean, std = train_features.mean(0), train_features.std(0) + 1e-6
        params = _fit_logistic(jnp.asarray((train_features - mean) / std, jnp.float32),
                               jax.nn.one_hot(train_y, len(classes)), l2, steps)
    results = {}
    for name, (features, labels) in tests.items():
        labels = np.asarray(labels).astype(str)
        scored = np.isin(labels, classes)
        if params is None or not scored.any():  # Nothing fitted (one training class) or nothing to score.
            results[name] = {"accuracy": float("nan"), "majority": float("nan"), "rows": 0}
            continue
        logits = jnp.asarray((features[scored] - mean) / std, jnp.float32) @ params["w"] + params["b"]
        results[name] = _accuracy(classes[np.asarray(jnp.argmax(logits, -1))], labels[scored])
    return results
