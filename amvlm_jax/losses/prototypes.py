"""MGCA cross-modal prototype alignment (CPA), SPEC 4.

Written on global arrays: under jax.jit with a batch sharded over devices
the reductions below are already global, so the Sinkhorn marginals are over
the whole batch without explicit collectives.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from amvlm_jax.losses.contrastive import as_float32
from amvlm_jax.ops import l2_normalize


def sinkhorn_knopp(scores: jnp.ndarray, epsilon: float = 0.05, iterations: int = 3) -> jnp.ndarray:
    """Soft prototype assignments by Sinkhorn-Knopp on exp(scores / epsilon).

    Each iteration first scales every prototype's total mass to 1/K, then
    every sample's to 1/B (the SwAV/MGCA order); finally each sample's code
    is renormalised to sum to 1. Runs in the log domain, so large
    scores / epsilon cannot overflow.

    Args:
      scores: (B, K) sample-to-prototype scores (dot products of unit vectors).
      epsilon: entropic regularisation.
      iterations: number of alternating normalisations (3 in MGCA).

    Returns:
      (B, K) float32 codes, no gradient. Rows sum to 1 exactly; column sums
      tend to B / K (equal over prototypes) as iterations grow.
    """
    log_q = jax.lax.stop_gradient(as_float32(scores)) / epsilon
    batch, num_prototypes = log_q.shape
    for _ in range(iterations):
        log_q = log_q - logsumexp(log_q, axis=0, keepdims=True) - jnp.log(num_prototypes)
        log_q = log_q - logsumexp(log_q, axis=1, keepdims=True) - jnp.log(batch)
    return jnp.exp(log_q - logsumexp(log_q, axis=1, keepdims=True))


def normalize_prototypes(params):
    """L2-normalise every prototype of a bias-free Dense(D -> K).

    Accepts the (D, K) kernel itself or a mapping holding it under 'kernel'
    (the Dense layer's params); returns the same structure with each column
    (one prototype) of unit norm. Apply after every optimiser step.
    """
    if isinstance(params, Mapping):
        updated = {**params, "kernel": normalize_prototypes(params["kernel"])}
        return updated if isinstance(params, dict) else type(params)(updated)
    kernel = jnp.asarray(params)
    return l2_normalize(kernel.astype(jnp.float32), axis=0).astype(kernel.dtype)


def cpa_loss(
    image_scores: jnp.ndarray,
    text_scores: jnp.ndarray,
    epsilon: float = 0.05,
    iterations: int = 3,
    temperature: float = 0.2,
) -> jnp.ndarray:
    """Cross-modal prototype alignment.

    q = sinkhorn_knopp(scores) (targets, no gradient), p = softmax(scores / temperature);
    L_cpa = (CE(q_text, p_image) + CE(q_image, p_text)) / 2 with
    CE(q, p) = -1/B sum_b sum_k q[b, k] log p[b, k].

    Args:
      image_scores: (B, K) image embeddings times the prototype kernel.
      text_scores: (B, K) report embeddings times the prototype kernel.
      epsilon, iterations: Sinkhorn parameters.
      temperature: softmax temperature of the predictions.

    Returns:
      Scalar loss.
    """
    image_scores, text_scores = as_float32(image_scores), as_float32(text_scores)
    image_codes = sinkhorn_knopp(image_scores, epsilon, iterations)
    text_codes = sinkhorn_knopp(text_scores, epsilon, iterations)
    image_log_probs = jax.nn.log_softmax(image_scores / temperature, axis=-1)
    text_log_probs = jax.nn.log_softmax(text_scores / temperature, axis=-1)
    text_to_image = -jnp.mean(jnp.sum(text_codes * image_log_probs, axis=-1))
    image_to_text = -jnp.mean(jnp.sum(image_codes * text_log_probs, axis=-1))
    return 0.5 * (text_to_image + image_to_text)
