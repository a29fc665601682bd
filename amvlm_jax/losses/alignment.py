"""Local cross-modal alignment, SPEC 3.3.

Every patch is contrasted against all reports of the batch, every real word
against all images, and each token's cross-entropy is weighted by how
uniformly it matches the batch:

    sim[b, n, j] = tokens[b, n] . globals[j]                  (B, N, B)
    CE[b, n]     = -log softmax_j(sim[b, n, :] / tau)[b]
    var[b, n]    = unbiased variance over j of sim[b, n, j]
    w[b, n]      = minmax_n( 1 / (var[b, n] / ||var[b, :]||_2) )   (no gradient)

Reading of "inverted" (SPEC: "L2-normalised over p, inverted, then min-max
scaled"): the reciprocal of the L2-normalised variance, so tokens whose
similarity to the batch varies least get the largest weight (w = 1) and the
most discriminative ones w = 0. Min-max scaling is per sample, over its real
tokens; a sample whose real tokens all have equal weight (e.g. one real
word) gets w = 0 everywhere.

Min-max scaling is invariant to a positive factor, so neither the unbiased
(vs biased) variance nor the L2 normalisation changes w; both are kept to
mirror the SPEC's recipe.

Normalisation: L_p2r divides the weighted sum by P * B (all patches are
real); L_w2i divides by the number of real words in the batch, which is the
same mean-over-tokens with padding slots excluded.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from amvlm_jax.losses.contrastive import as_float32

_TINY = 1e-12


INVERSIONS = ("reciprocal", "complement", "none")


def variance_token_weights(similarity: jnp.ndarray, token_mask: Optional[jnp.ndarray] = None,
                           inversion: str = "reciprocal") -> jnp.ndarray:
    """Token weights from the batch variance of their similarities.

    Args:
      similarity: (B, N, B) raw dot products tokens[b, n] . globals[j]
        (B >= 2 for an unbiased variance).
      token_mask: optional (B, N) binary mask of real tokens.
      inversion: how the L2-normalised variance x is "inverted" before the
        min-max scaling: 'reciprocal' 1 / x, 'complement' 1 - x (weights
        fall linearly with the variance), 'none' x (the most discriminative
        tokens weigh most).

    Returns:
      (B, N) float32 weights in [0, 1], 0 at padding; no gradient.
    """
    if inversion not in INVERSIONS:
        raise ValueError(f"inversion must be one of {INVERSIONS}, got {inversion!r}")
    similarity = jax.lax.stop_gradient(as_float32(similarity))
    is_real = jnp.ones(similarity.shape[:2], bool) if token_mask is None else jnp.asarray(token_mask).astype(bool)
    variance = jnp.where(is_real, jnp.var(similarity, axis=-1, ddof=1), 0.0)
    norm = jnp.sqrt(jnp.sum(jnp.square(variance), axis=-1, keepdims=True))
    normalised = variance / jnp.maximum(norm, _TINY)
    if inversion == "reciprocal":
        inverted = 1.0 / jnp.maximum(normalised, _TINY)
    elif inversion == "complement":
        inverted = 1.0 - normalised
    else:
        inverted = normalised
    has_real = jnp.any(is_real, axis=-1, keepdims=True)
    low = jnp.min(jnp.where(is_real, inverted, jnp.inf), axis=-1, keepdims=True)
    high = jnp.max(jnp.where(is_real, inverted, -jnp.inf), axis=-1, keepdims=True)
    low = jnp.where(has_real, low, 0.0)
    high = jnp.where(has_real, high, 0.0)
    scaled = (inverted - low) / jnp.maximum(high - low, _TINY)
    return jnp.where(is_real, scaled, 0.0)


def _token_to_global_terms(tokens, globals_, token_mask, temperature, inversion):
    """Weighted per-token cross-entropies summed over the batch, and the mask."""
    tokens, globals_ = as_float32(tokens), as_float32(globals_)
    batch, num_tokens, _ = tokens.shape
    similarity = jnp.einsum("bnd,jd->bnj", tokens, globals_)
    log_probs = jax.nn.log_softmax(similarity / temperature, axis=-1)
    own_index = jnp.broadcast_to(jnp.arange(batch)[:, None, None], (batch, num_tokens, 1))
    cross_entropy = -jnp.take_along_axis(log_probs, own_index, axis=-1)[..., 0]  # (B, N)
    weights = variance_token_weights(similarity, token_mask, inversion)
    if token_mask is None:
        is_real = jnp.ones((batch, num_tokens), bool)
    else:
        is_real = jnp.asarray(token_mask).astype(bool)
    weighted_sum = jnp.sum(jnp.where(is_real, weights * cross_entropy, 0.0))
    return weighted_sum, is_real


def local_alignment_loss(
    V: jnp.ndarray,
    t: jnp.ndarray,
    T: jnp.ndarray,
    v: jnp.ndarray,
    word_mask: jnp.ndarray,
    temperature: float = 0.07,
    inversion: str = "reciprocal",
) -> jnp.ndarray:
    """L_local = L_p2r + L_w2i, SPEC 3.3.

    Args:
      V: (B, P, D) unit-norm patch embeddings.
      t: (B, D) unit-norm report embeddings.
      T: (B, W, D) unit-norm word embeddings.
      v: (B, D) unit-norm image embeddings.
      word_mask: (B, W) binary, 1 for real words; padding words never
        affect the loss.
      temperature: tau.
      inversion: see ``variance_token_weights``.

    Returns:
      Scalar loss. L_p2r = sum_{b,p} w CE / (P B);
      L_w2i = sum over real words of w CE / (number of real words).
    """
    batch, num_patches, _ = V.shape
    patch_sum, _ = _token_to_global_terms(V, t, None, temperature, inversion)
    patch_to_report = patch_sum / (batch * num_patches)
    word_sum, is_real_word = _token_to_global_terms(T, v, word_mask, temperature, inversion)
    word_to_image = word_sum / jnp.maximum(jnp.sum(is_real_word), 1)
    return patch_to_report + word_to_image
