"""Text-guided loss, pseudo-label fusion and the mean-teacher EMA.

SPEC section 5 (L_tg, which trains only the text-mask decoder and its
log-scale) and section 6 (pseudo-labels fusing the teacher's prediction with
the text mask in logit space; the teacher as an EMA of the student).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from amvlm_jax.ops import l2_normalize

INITIAL_LOG_SCALE = math.log(1.0 / 0.07)
MAX_LOGIT_SCALE = 100.0
POOLING_EPS = 1e-6  # guards the masked average against an all-zero mask
EMA_MAX_ALPHA = 0.99


def logit_scale(log_scale) -> jnp.ndarray:
    """s = min(exp(log_scale), 100)."""
    return jnp.minimum(jnp.exp(jnp.asarray(log_scale, jnp.float32)), MAX_LOGIT_SCALE)


def masked_average_pool(dense: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """e[b, n] = sum_hw w[b, n] dense[b] / sum_hw w[b, n].

    dense (B, h, w, D), weights (B, N, h, w) -> (B, N, D).
    """
    weighted_sum = jnp.einsum("bnhw,bhwd->bnd", weights, dense, precision=jax.lax.Precision.HIGHEST)
    total = jnp.sum(weights, axis=(2, 3))[..., None]
    return weighted_sum / (total + POOLING_EPS)


def text_guided_loss(dense: jnp.ndarray, soft: jnp.ndarray, reports: jnp.ndarray, log_scale) -> jnp.ndarray:
    """L_tg: symmetric cross-entropy of pooled-region / report similarities.

    Args:
      dense: (B, h, w, D) decoder output.
      soft: (B, B, h, w) soft[b, n] = sigmoid(dense[b] . t[n]), pooling weights.
      reports: (B, D) unit-norm report embeddings t.
      log_scale: scalar l; the logit scale is min(exp(l), 100).

    Returns:
      scalar (CE over reports n for each image + CE over images b for each
      report) / 2, the positives being the diagonal pairs.
    """
    dense = dense.astype(jnp.float32)
    reports = reports.astype(jnp.float32)
    pooled = l2_normalize(masked_average_pool(dense, soft.astype(jnp.float32)), axis=-1)  # (B, B, D)
    logits = jnp.einsum("bnd,nd->bn", pooled, reports, precision=jax.lax.Precision.HIGHEST) * logit_scale(log_scale)
    image_to_report = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    report_to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    return 0.5 * (image_to_report + report_to_image)


def clipped_logit(p: jnp.ndarray, eps: float) -> jnp.ndarray:
    """logit(p) in float32 with p clipped to [eps, 1 - eps], so that certain probabilities stay finite."""
    p = jnp.clip(p.astype(jnp.float32), eps, 1.0 - eps)
    return jnp.log(p) - jnp.log1p(-p)


def fuse_pseudo_labels(p_teacher: jnp.ndarray, p_text: jnp.ndarray, w_text: float = 1.0, eps: float = 1e-4,
                       text_eps: float | None = None) -> jnp.ndarray:
    """p_fused = sigmoid(logit(p_teacher) + w_text * logit(p_text)), no gradient.

    Both probabilities (B, H, W) are clipped to [eps, 1 - eps] before the
    logit (p_text to [text_eps, 1 - text_eps] when given), so certain
    predictions (0 or 1) stay finite. With equal clips a certain "no" of the
    text only cancels a certain "yes" of the teacher (p_fused = 0.5); a
    smaller text_eps lets it win. w_text = 0 returns the (clipped) teacher
    probability.
    """
    text_eps = eps if text_eps is None else text_eps
    fused = jax.nn.sigmoid(clipped_logit(p_teacher, eps) + w_text * clipped_logit(p_text, text_eps))
    return jax.lax.stop_gradient(fused)


def fuse_multiclass(p_teacher: jnp.ndarray, p_text: jnp.ndarray, w_text: float = 1.0, eps: float = 1e-4,
                    text_eps: float | None = None) -> jnp.ndarray:
    """Multi-class pseudo-labels (B, H, W, C) from teacher softmax (B, H, W, C)
    with class 0 = background and a text foreground probability (B, H, W).

    The foreground probability 1 - p_background is fused as in
    ``fuse_pseudo_labels``; the teacher's foreground classes are rescaled to
    sum to it and background = 1 - fused, so every pixel sums to 1. Where the
    teacher gives the foreground no mass, the fused mass is split evenly.
    """
    p_teacher = p_teacher.astype(jnp.float32)
    num_foreground = p_teacher.shape[-1] - 1
    fused_foreground = fuse_pseudo_labels(1.0 - p_teacher[..., 0], p_text, w_text, eps, text_eps)[..., None]
    teacher_foreground = p_teacher[..., 1:]
    teacher_total = jnp.sum(teacher_foreground, axis=-1, keepdims=True)
    has_mass = teacher_total > 1e-12
    shares = jnp.where(has_mass, teacher_foreground / jnp.where(has_mass, teacher_total, 1.0), 1.0 / num_foreground)
    fused = jnp.concatenate([1.0 - fused_foreground, shares * fused_foreground], axis=-1)
    return jax.lax.stop_gradient(fused)


def ema_alpha(step, max_alpha: float = EMA_MAX_ALPHA) -> jnp.ndarray:
    """alpha_t = min(1 - 1 / (t + 1), max_alpha); step t counts from 0.

    The teacher averages roughly the last 1 / (1 - max_alpha) updates: 100
    with SPEC 6's 0.99.
    """
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(1.0 - 1.0 / (step + 1.0), max_alpha)


def unlabeled_weight(step, weight: float, rampup_steps: int) -> jnp.ndarray:
    """Weight of the unlabeled half of the student loss at update ``step`` (from 0).

    weight * exp(-5 (1 - min(step / rampup_steps, 1))^2): the sigmoid-shaped
    ramp-up of the original mean teacher; rampup_steps = 0 gives ``weight``.
    """
    if rampup_steps <= 0:
        return jnp.asarray(weight, jnp.float32)
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / rampup_steps, 0.0, 1.0)
    return weight * jnp.exp(-5.0 * (1.0 - progress) ** 2)
