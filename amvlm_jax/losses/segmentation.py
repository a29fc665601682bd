"""Segmentation losses (SPEC section 6), on probabilities or soft targets.

Shapes: logits (B, H, W, C) with C = 1 for binary tasks; targets (B, H, W)
for binary tasks (values in [0, 1], soft pseudo-labels allowed) or
(B, H, W, C) class probabilities (one-hot or soft) for multi-class tasks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# SPEC 6: the authors weight p and y by 0.5 (both classes' Dice weights) before a 1e-5
# smoothing; scaling both sums back by 4 leaves this smoothing on the unscaled sums.
DICE_SMOOTH = 4e-5


def dice_loss(probs: jax.Array, targets: jax.Array) -> jax.Array:
    """1 - (2 sum(p y) + s) / (sum p^2 + sum y^2 + s) per image (and channel), mean over them.

    probs, targets: (B, H, W) (binary) or (B, H, W, C), where every
    (image, class) pair is one term.
    """
    if probs.ndim == 4:  # (B, H, W, C) -> (B, C, H*W): each class of each image is one term.
        p = jnp.moveaxis(probs, -1, 1).reshape(probs.shape[0], probs.shape[-1], -1)
        y = jnp.moveaxis(targets, -1, 1).reshape(p.shape)
    else:
        p = probs.reshape(probs.shape[0], -1)
        y = targets.reshape(p.shape)
    intersection = jnp.sum(p * y, axis=-1)
    denominator = jnp.sum(p * p, axis=-1) + jnp.sum(y * y, axis=-1)
    return jnp.mean(1.0 - (2.0 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH))


def weighted_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """BCE with positives (y > 0.5) and negatives (y < 0.5) each averaged over their own count.

    logits, targets: same shape; returns 0.5 * mean_pos + 0.5 * mean_neg over
    the whole batch.
    """
    logits = logits.astype(jnp.float32)
    per_pixel = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    positive = (targets > 0.5).astype(jnp.float32)
    negative = (targets < 0.5).astype(jnp.float32)
    mean_pos = jnp.sum(per_pixel * positive) / (jnp.sum(positive) + 1e-12)
    mean_neg = jnp.sum(per_pixel * negative) / (jnp.sum(negative) + 1e-12)
    return 0.5 * mean_pos + 0.5 * mean_neg


def dice_bce_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """0.5 Dice + 0.5 weighted BCE for a binary task; logits (B, H, W, 1), targets (B, H, W)."""
    logits = logits[..., 0]
    return 0.5 * dice_loss(jax.nn.sigmoid(logits), targets) + 0.5 * weighted_bce(logits, targets)


def dice_ce_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """0.5 Dice (over foreground classes) + 0.5 cross-entropy; logits and targets (B, H, W, C)."""
    logits = logits.astype(jnp.float32)
    ce = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))
    probs = jax.nn.softmax(logits, axis=-1)
    return 0.5 * dice_loss(probs[..., 1:], targets[..., 1:]) + 0.5 * ce


def segmentation_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Dice+BCE when logits have one channel, Dice+CE otherwise (targets as in the module doc)."""
    return dice_bce_loss(logits, targets) if logits.shape[-1] == 1 else dice_ce_loss(logits, targets)


def mask_targets(masks: jax.Array, num_classes: int) -> jax.Array:
    """Integer masks (B, H, W) to loss targets: float (B, H, W) or one-hot (B, H, W, C)."""
    if num_classes == 1:
        return masks.astype(jnp.float32)
    return jax.nn.one_hot(masks, num_classes, dtype=jnp.float32)
