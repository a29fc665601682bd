"""Intra-modal contrastive learning (ICL), SPEC 3.4 (the momentum update is ops.ema_update)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from amvlm_jax.losses.contrastive import MASKED_LOGIT, as_float32


def icl_loss(
    online_cls: jnp.ndarray,
    momentum_cls: jnp.ndarray,
    momentum_tokens: jnp.ndarray,
    token_mask: Optional[jnp.ndarray] = None,
    temperature: float = 0.07,
) -> jnp.ndarray:
    """ICL term of one modality: (coarse + fine) / 2.

    coarse = -1/B sum_i log softmax_j(c_i . c'_j / tau)[i]
    fine   = -1/|R| sum_{(i, p) in R} log softmax_j(c_i . z'_{j, p} / tau)[i]

    where R is the set of real (sample, token) slots (all B S slots without a
    mask). For token slot p the candidates j are the samples whose slot p is
    real; a padded slot of sample i contributes no term. The caller averages
    the image and text terms.

    Args:
      online_cls: (B, D) unit-norm online CLS embeddings c.
      momentum_cls: (B, D) unit-norm momentum CLS embeddings c' of the other view.
      momentum_tokens: (B, S, D) unit-norm momentum token embeddings z'.
      token_mask: optional (B, S) binary mask of real tokens (words); None
        for patches.
      temperature: tau.

    Returns:
      Scalar loss. No gradient flows into the momentum inputs.
    """
    online_cls = as_float32(online_cls)
    momentum_cls = jax.lax.stop_gradient(as_float32(momentum_cls))
    momentum_tokens = jax.lax.stop_gradient(as_float32(momentum_tokens))
    batch, num_tokens, _ = momentum_tokens.shape

    coarse_log_probs = jax.nn.log_softmax(online_cls @ momentum_cls.T / temperature, axis=-1)
    coarse = -jnp.mean(jnp.diagonal(coarse_log_probs))

    if token_mask is None:
        is_real = jnp.ones((batch, num_tokens), bool)
    else:
        is_real = jnp.asarray(token_mask).astype(bool)
    # logits[i, p, j] = c_i . z'_{j, p} / tau; candidate j must be real at p.
    logits = jnp.einsum("id,jpd->ipj", online_cls, momentum_tokens) / temperature
    logits = jnp.where(is_real.T[None, :, :], logits, MASKED_LOGIT)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    own_index = jnp.broadcast_to(jnp.arange(batch)[:, None, None], (batch, num_tokens, 1))
    own_log_probs = jnp.take_along_axis(log_probs, own_index, axis=-1)[..., 0]  # (B, S)
    fine = -jnp.sum(jnp.where(is_real, own_log_probs, 0.0)) / jnp.maximum(jnp.sum(is_real), 1)
    return 0.5 * (coarse + fine)
