"""Instance and token-level cross-modal contrastive losses.

SPEC 3.1 (ITA), 3.2 (CSS with the PDT constraint) and the MGCA token-wise
alignment of SPEC 4 (CTA). Everything here is a pure function of arrays;
the model computes embeddings, calls ``cross_modal_contexts``, runs its PDT
heads on tokens and contexts and passes their (mu, logsigma) outputs in.

Contexts (SPEC 3.2 and 4): a word's image context O = normalise(A V) is
unit-norm, a patch's report context O_p = A_p T is NOT normalised (the
authors' code and MGCA's with a ViT normalise only the word side); the
patch-side similarity and the patch context PDT head see O_p as is.

Typical AMVLM use::

    word_ctx, patch_ctx = cross_modal_contexts(T, V, word_mask, 0.07)
    word_pdt = PDTOutputs(*pdt_word(T, word_mask), *pdt_word_ctx(word_ctx, word_mask))
    patch_pdt = PDTOutputs(*pdt_patch(V, ones), *pdt_patch_ctx(patch_ctx, ones))
    w_word = clipped_token_weights(word_attention, word_mask)
    w_patch = clipped_token_weights(cls_attention, ones)
    loss = css_loss(T, word_ctx, V, patch_ctx, w_word, w_patch, word_mask,
                    0.07, word_pdt, patch_pdt)

All computations run in float32 whatever the input dtype. Masked logits
use a large negative finite value (not -inf) and masked terms are removed
with ``where`` so that gradients stay finite in every edge case.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from amvlm_jax.ops import l2_normalize

MASKED_LOGIT = -1e9


def as_float32(x) -> jnp.ndarray:
    return jnp.asarray(x).astype(jnp.float32)


def _diagonal_log_probs(logits: jnp.ndarray, axis: int) -> jnp.ndarray:
    """log softmax of a (..., N, N) matrix along ``axis``, read at the diagonal (..., N)."""
    log_probs = jax.nn.log_softmax(logits, axis=axis)
    return jnp.diagonal(log_probs, axis1=-2, axis2=-1)


# ---------------------------------------------------------------------------
# 3.1 Instance alignment
# ---------------------------------------------------------------------------


def ita_loss(v: jnp.ndarray, t: jnp.ndarray, temperature: float = 0.07, reduce: str = "mean") -> jnp.ndarray:
    """Image-text instance alignment (symmetric InfoNCE).

    Args:
      v: (B, D) L2-normalised image embeddings.
      t: (B, D) L2-normalised report embeddings.
      temperature: softmax temperature tau.
      reduce: 'mean' averages the image->text and text->image cross-entropies
        (AMVLM, SPEC 3.1); 'sum' adds them (MGCA's L_ita', SPEC 4).

    Returns:
      Scalar loss. Each direction is the batch-mean cross-entropy of
      S = v t^T / tau (B, B) with diagonal targets.
    """
    v, t = as_float32(v), as_float32(t)
    logits = v @ t.T / temperature
    image_to_text = -jnp.mean(_diagonal_log_probs(logits, axis=-1))
    text_to_image = -jnp.mean(_diagonal_log_probs(logits, axis=-2))
    if reduce == "mean":
        return 0.5 * (image_to_text + text_to_image)
    if reduce == "sum":
        return image_to_text + text_to_image
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


# ---------------------------------------------------------------------------
# Token weights
# ---------------------------------------------------------------------------


def _masked_quantile(sorted_values: jnp.ndarray, counts: jnp.ndarray, q: float) -> jnp.ndarray:
    """Linear-interpolation quantile (numpy's default) of the first ``counts``
    entries of each ascending row of ``sorted_values`` (B, N) -> (B,)."""
    position = q * jnp.maximum(counts - 1, 0).astype(jnp.float32)
    below = jnp.floor(position).astype(jnp.int32)
    above = jnp.minimum(below + 1, jnp.maximum(counts - 1, 0))
    fraction = position - below.astype(jnp.float32)
    value_below = jnp.take_along_axis(sorted_values, below[:, None], axis=-1)[:, 0]
    value_above = jnp.take_along_axis(sorted_values, above[:, None], axis=-1)[:, 0]
    return value_below + fraction * (value_above - value_below)


def clipped_token_weights(
    attention: jnp.ndarray, mask: jnp.ndarray, lo: float = 0.1, hi: float = 0.9
) -> jnp.ndarray:
    """Per-token loss weights from CLS attention, SPEC 3.2.

    Within each sample, the attention of the real tokens is clipped to its own
    [lo, hi] quantiles (numpy's default linear interpolation, as
    ``torch.quantile``), padding gets weight 0, and the weights are divided by
    their sum. No gradient flows through the weights.

    Args:
      attention: (B, N) CLS-to-token attention (words or patches).
      mask: (B, N) binary, 1 for real tokens.
      lo, hi: quantile levels of the clipping range.

    Returns:
      (B, N) float32 weights summing to 1 over the real tokens of each sample
      (all zeros for a sample without real tokens).
    """
    attention = jax.lax.stop_gradient(as_float32(attention))
    is_real = jnp.asarray(mask).astype(bool)
    counts = jnp.sum(is_real, axis=-1)
    # Padding sorts to the end, so the first `counts` entries are the real ones.
    sorted_values = jnp.sort(jnp.where(is_real, attention, jnp.inf), axis=-1)
    sorted_values = jnp.where(jnp.isfinite(sorted_values), sorted_values, 0.0)
    low = _masked_quantile(sorted_values, counts, lo)
    high = _masked_quantile(sorted_values, counts, hi)
    clipped = jnp.clip(attention, low[:, None], high[:, None])
    weights = jnp.where(is_real, clipped, 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


# ---------------------------------------------------------------------------
# 3.2 Cross-modal token alignment (CSS / MGCA CTA)
# ---------------------------------------------------------------------------


class PDTOutputs(NamedTuple):
    """Gaussian parameters of the tokens and of their cross-modal contexts.

    Each field is (B, N, D): the PDT heads' mu and logsigma for the tokens
    (e.g. PDT_word(T)) and for their contexts (e.g. PDT_word_ctx(O)).
    """

    token_mu: jnp.ndarray
    token_logsigma: jnp.ndarray
    context_mu: jnp.ndarray
    context_logsigma: jnp.ndarray


def token_contexts(
    queries: jnp.ndarray,
    keys: jnp.ndarray,
    key_mask: Optional[jnp.ndarray] = None,
    temperature: float = 0.07,
    normalize: bool = True,
) -> jnp.ndarray:
    """Cross-modal context of every query token: O = softmax(Q K^T / tau) K,
    L2-normalised when ``normalize``.

    Args:
      queries: (B, N, D) tokens of one modality (words T or patches V).
      keys: (B, M, D) tokens of the other modality, also the values.
      key_mask: optional (B, M) binary; keys with 0 get no attention
        (padding words when patches attend over words).
      temperature: softmax temperature tau.
      normalize: L2-normalise the contexts (the word side, SPEC 3.2); the
        patch side keeps them unnormalised (SPEC 3.2 and 4).

    Returns:
      (B, N, D) float32 contexts, unit-norm when ``normalize``.
    """
    queries, keys = as_float32(queries), as_float32(keys)
    logits = jnp.einsum("bnd,bmd->bnm", queries, keys) / temperature
    if key_mask is not None:
        logits = jnp.where(jnp.asarray(key_mask).astype(bool)[:, None, :], logits, MASKED_LOGIT)
    attention = jax.nn.softmax(logits, axis=-1)
    contexts = jnp.einsum("bnm,bmd->bnd", attention, keys)
    return l2_normalize(contexts, axis=-1) if normalize else contexts


def cross_modal_contexts(
    words: jnp.ndarray,
    patches: jnp.ndarray,
    word_mask: jnp.ndarray,
    temperature: float = 0.07,
):
    """Word contexts (words attend over all patches, then L2-normalised) and
    patch contexts (patches attend over real words only, NOT normalised:
    SPEC 3.2 and 4).

    Args:
      words: (B, W, D) word embeddings T.
      patches: (B, P, D) patch embeddings V.
      word_mask: (B, W) binary, 1 for real words.
      temperature: softmax temperature tau.

    Returns:
      (word_contexts (B, W, D) unit-norm, patch_contexts (B, P, D) with
      norms <= 1), float32.
    """
    word_contexts = token_contexts(words, patches, None, temperature)
    patch_contexts = token_contexts(patches, words, word_mask, temperature, normalize=False)
    return word_contexts, patch_contexts


def _pairwise_squared_distances(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """||a[:, i] - b[:, j]||^2 for (B, N, D) inputs -> (B, N, N).

    Expanded form keeps memory at O(B N^2) instead of O(B N^2 D); clamped at
    0 against rounding.
    """
    a_sq = jnp.sum(jnp.square(a), axis=-1)
    b_sq = jnp.sum(jnp.square(b), axis=-1)
    cross = jnp.einsum("bid,bjd->bij", a, b)
    return jnp.maximum(a_sq[:, :, None] + b_sq[:, None, :] - 2.0 * cross, 0.0)


def pdt_constraint(pdt: PDTOutputs, eps: float = 1e-6) -> jnp.ndarray:
    """Pairwise distribution-disparity factor c (B, N, N), SPEC 3.2.

    For tokens i and contexts j of one sample:
      W2[i, j]  = ||mu_tok[i] - mu_ctx[j]||^2 + ||s_tok[i] - s_ctx[j]||^2
      sem[i, j] = ||mu_tok[i] - mu_ctx[j]||^2
      c[i, j]   = sigmoid(W2[i, j] / (sem[i, j] + eps))

    The logsigma outputs are compared as they are (the squared 2-Wasserstein
    distance between diagonal Gaussians would use exp(logsigma); SPEC follows
    the published code). W2 is symmetric in its pair, so the factor for the
    transposed direction is c^T.
    """
    token_mu, token_logsigma = as_float32(pdt.token_mu), as_float32(pdt.token_logsigma)
    context_mu, context_logsigma = as_float32(pdt.context_mu), as_float32(pdt.context_logsigma)
    semantic = _pairwise_squared_distances(token_mu, context_mu)
    spread = _pairwise_squared_distances(token_logsigma, context_logsigma)
    return jax.nn.sigmoid((semantic + spread) / (semantic + eps))


def token_similarity(
    tokens: jnp.ndarray,
    contexts: jnp.ndarray,
    temperature: float,
    pdt: Optional[PDTOutputs] = None,
) -> jnp.ndarray:
    """Token-to-context similarity S (B, N, N), optionally PDT-supervised.

    S[b, i, j] = tokens[b, i] . contexts[b, j] / tau; with ``pdt`` it becomes
    S' = 1 - (1 - S) * c (elementwise, c from ``pdt_constraint``).
    """
    tokens, contexts = as_float32(tokens), as_float32(contexts)
    similarity = jnp.einsum("bid,bjd->bij", tokens, contexts) / temperature
    if pdt is not None:
        similarity = 1.0 - (1.0 - similarity) * pdt_constraint(pdt)
    return similarity


def token_alignment_from_similarity(
    similarity: jnp.ndarray,
    weights: jnp.ndarray,
    token_mask: Optional[jnp.ndarray] = None,
) -> jnp.ndarray:
    """Weighted two-direction token-wise InfoNCE on a (B, N, N) similarity.

    Direction 1: row i (token) is a softmax over contexts j with target i.
    Direction 2: row j (context) is a softmax over tokens i with target j
    (the transposed matrix; for the PDT form S'^T is exactly the matrix
    built from c computed on the transposed pair, since W2 is symmetric).
    Each row's cross-entropy is multiplied by weights[b, row];
    loss = (sum dir1 + sum dir2) / (2 B).

    Args:
      similarity: (B, N, N) logits (S or S').
      weights: (B, N) per-token weights (no gradient flows through them).
      token_mask: optional (B, N) binary. Masked tokens are removed as
        candidates (columns) and their rows contribute nothing. With None
        every slot is a candidate (MGCA's behaviour); rows are still
        weighted by ``weights``.

    Returns:
      Scalar loss.
    """
    similarity = as_float32(similarity)
    batch = similarity.shape[0]
    weights = jax.lax.stop_gradient(as_float32(weights))
    if token_mask is None:
        is_real = jnp.ones(weights.shape, dtype=bool)
    else:
        is_real = jnp.asarray(token_mask).astype(bool)

    def one_direction(logits):
        logits = jnp.where(is_real[:, None, :], logits, MASKED_LOGIT)
        cross_entropy = -_diagonal_log_probs(logits, axis=-1)  # (B, N)
        return jnp.sum(jnp.where(is_real, weights * cross_entropy, 0.0)) / batch

    forward = one_direction(similarity)
    backward = one_direction(jnp.swapaxes(similarity, -1, -2))
    return 0.5 * (forward + backward)


def token_alignment_loss(
    tokens: jnp.ndarray,
    contexts: jnp.ndarray,
    weights: jnp.ndarray,
    token_mask: Optional[jnp.ndarray] = None,
    temperature: float = 0.07,
    pdt: Optional[PDTOutputs] = None,
) -> jnp.ndarray:
    """One side (word side or patch side) of the cross-modal token alignment.

    Args:
      tokens: (B, N, D) unit-norm tokens (words T for the word side, patches
        V for the patch side).
      contexts: (B, N, D) their cross-modal contexts O from
        ``token_contexts`` / ``cross_modal_contexts``.
      weights: (B, N) row weights, e.g. ``clipped_token_weights``.
      token_mask: optional (B, N) binary mask of real tokens (see
        ``token_alignment_from_similarity``).
      temperature: tau of S = tokens contexts^T / tau.
      pdt: optional Gaussian parameters of tokens and contexts; None is the
        MGCA form (c = 1).

    Returns:
      Scalar L_side = mean over the two directions of sum_rows(w * CE) / B.
    """
    similarity = token_similarity(tokens, contexts, temperature, pdt)
    return token_alignment_from_similarity(similarity, weights, token_mask)


def css_loss(
    words: jnp.ndarray,
    word_contexts: jnp.ndarray,
    patches: jnp.ndarray,
    patch_contexts: jnp.ndarray,
    word_weights: jnp.ndarray,
    patch_weights: jnp.ndarray,
    word_mask: jnp.ndarray,
    temperature: float = 0.07,
    word_pdt: Optional[PDTOutputs] = None,
    patch_pdt: Optional[PDTOutputs] = None,
) -> jnp.ndarray:
    """Cross-modal similarity supervision L_css = (L_word + L_patch) / 2, SPEC 3.2.

    Args:
      words: (B, W, D) word embeddings T.
      word_contexts: (B, W, D) image context of every word.
      patches: (B, P, D) patch embeddings V.
      patch_contexts: (B, P, D) report context of every patch (computed with
        padding words masked, not normalised).
      word_weights: (B, W) clipped, normalised word attention (0 at padding).
      patch_weights: (B, P) clipped, normalised CLS-to-patch attention.
      word_mask: (B, W) binary; padding words are excluded everywhere on the
        word side (rows and candidate columns).
      temperature: tau (0.07 in AMVLM).
      word_pdt, patch_pdt: PDT outputs for each side; None switches the
        constraint off for that side (MGCA's token-wise loss).

    Returns:
      Scalar loss.
    """
    word_side = token_alignment_loss(words, word_contexts, word_weights, word_mask, temperature, word_pdt)
    patch_side = token_alignment_loss(patches, patch_contexts, patch_weights, None, temperature, patch_pdt)
    return 0.5 * (word_side + patch_side)


def cta_loss(
    words: jnp.ndarray,
    patches: jnp.ndarray,
    word_weights: jnp.ndarray,
    patch_weights: jnp.ndarray,
    word_mask: jnp.ndarray,
    temperature: float = 0.1,
) -> jnp.ndarray:
    """MGCA cross-modal token alignment L_cta = L_word + L_patch, SPEC 4.

    No PDT constraint. As in MGCA, padding words are not removed from the
    word side's candidates (their rows still carry weight 0 through
    ``word_weights``), while patches attend over real words only and their
    contexts stay unnormalised (MGCA with a ViT image encoder).

    Args:
      words: (B, W, D) word embeddings, padding slots included as MGCA's head
        gives them (the model's ``T_unmasked``); patches: (B, P, D) patch embeddings.
      word_weights: (B, W) and patch_weights: (B, P) row weights.
      word_mask: (B, W) binary mask of real words.
      temperature: tau for both the context attention and the similarity.

    Returns:
      Scalar loss (a sum of the two sides).
    """
    word_contexts, patch_contexts = cross_modal_contexts(words, patches, word_mask, temperature)
    word_side = token_alignment_loss(words, word_contexts, word_weights, None, temperature)
    patch_side = token_alignment_loss(patches, patch_contexts, patch_weights, None, temperature)
    return word_side + patch_side
