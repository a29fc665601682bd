"""Pre-training losses, projection heads and the PDT head.

Each loss is checked against a straightforward NumPy re-derivation with
explicit Python loops (float64), plus invariance and gradient checks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from amvlm_jax.losses.alignment import local_alignment_loss, variance_token_weights
from amvlm_jax.losses.contrastive import (
    PDTOutputs,
    clipped_token_weights,
    cross_modal_contexts,
    css_loss,
    cta_loss,
    ita_loss,
    pdt_constraint,
    token_alignment_loss,
    token_contexts,
)
from amvlm_jax.config import base_config
from amvlm_jax.losses import objectives
from amvlm_jax.losses.intra import icl_loss
from amvlm_jax.ops import BATCH_NORM_EPSILON, BATCH_NORM_MOMENTUM, ema_update
from amvlm_jax.losses.prototypes import cpa_loss, normalize_prototypes, sinkhorn_knopp
from amvlm_jax.models.heads import GlobalHead, LocalHead, RowBatchNorm
from amvlm_jax.models.pdt import PDTHead

from conftest import with_fields

B, P, W, D = 3, 4, 5, 8
RTOL, ATOL = 2e-4, 2e-5


# ---------------------------------------------------------------------------
# Fixtures and NumPy helpers
# ---------------------------------------------------------------------------


def unit(x, axis=-1):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def np_log_softmax(row):
    row = np.asarray(row, np.float64)
    top = row.max()
    return row - top - math.log(np.exp(row - top).sum())


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    word_mask = np.array(
        [
            [1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0],
            [1, 0, 0, 0, 0],  # a single real word
        ],
        np.float32,
    )
    data = dict(
        v=unit(rng.normal(size=(B, D))).astype(np.float32),
        t=unit(rng.normal(size=(B, D))).astype(np.float32),
        V=unit(rng.normal(size=(B, P, D))).astype(np.float32),
        T=unit(rng.normal(size=(B, W, D))).astype(np.float32),
        word_mask=word_mask,
        word_attention=(rng.uniform(0.01, 1.0, size=(B, W)) * word_mask).astype(np.float32),
        patch_attention=rng.uniform(0.01, 1.0, size=(B, P)).astype(np.float32),
        pdt_word=[rng.normal(size=(B, W, D)).astype(np.float32) for _ in range(4)],
        pdt_patch=[rng.normal(size=(B, P, D)).astype(np.float32) for _ in range(4)],
    )
    return data


def np_contexts(queries, keys, key_mask, tau, normalize=True):
    """O[b, n] = sum_m softmax_m(q . k / tau) k[m] over real keys, L2-normalised
    when ``normalize`` (the word side; SPEC 3.2 leaves the patch side as is)."""
    nb, nq, _ = queries.shape
    out = np.zeros(queries.shape, np.float64)
    for b in range(nb):
        for n in range(nq):
            real = [m for m in range(keys.shape[1]) if key_mask is None or key_mask[b, m] > 0]
            logits = np.array([queries[b, n] @ keys[b, m] / tau for m in real], np.float64)
            attn = np.exp(np_log_softmax(logits))
            ctx = sum(a * keys[b, m].astype(np.float64) for a, m in zip(attn, real))
            out[b, n] = ctx / np.linalg.norm(ctx) if normalize else ctx
    return out


def np_clipped_weights(attention, mask, lo=0.1, hi=0.9):
    out = np.zeros(attention.shape, np.float64)
    for b in range(attention.shape[0]):
        real = [n for n in range(attention.shape[1]) if mask[b, n] > 0]
        values = attention[b, real].astype(np.float64)
        low, high = np.quantile(values, lo), np.quantile(values, hi)
        for n in real:
            out[b, n] = min(max(attention[b, n], low), high)
        out[b] /= out[b].sum()
    return out


def np_side_loss(tokens, contexts, weights, mask, tau, pdt=None):
    """One side of the token alignment, element by element."""
    nb, n, _ = tokens.shape
    real = np.ones((nb, n)) if mask is None else mask
    total = 0.0
    for b in range(nb):
        S = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                S[i, j] = tokens[b, i] @ contexts[b, j] / tau
                if pdt is not None:
                    mu_t, s_t, mu_c, s_c = (np.asarray(x[b], np.float64) for x in pdt)
                    sem = np.sum((mu_t[i] - mu_c[j]) ** 2)
                    w2 = sem + np.sum((s_t[i] - s_c[j]) ** 2)
                    c = 1.0 / (1.0 + math.exp(-w2 / (sem + 1e-6)))
                    S[i, j] = 1.0 - (1.0 - S[i, j]) * c
        cols = [j for j in range(n) if real[b, j] > 0]
        for matrix in (S, S.T):
            for i in cols:
                log_probs = np_log_softmax(matrix[i, cols])
                total += 0.5 * weights[b, i] * -log_probs[cols.index(i)]
    return total / nb


def as_jnp(*arrays):
    return [jnp.asarray(a) for a in arrays]


# ---------------------------------------------------------------------------
# ITA
# ---------------------------------------------------------------------------


def np_ita(v, t, tau, reduce):
    S = v.astype(np.float64) @ t.T.astype(np.float64) / tau
    rows = -np.mean([np_log_softmax(S[i])[i] for i in range(len(S))])
    cols = -np.mean([np_log_softmax(S[:, j])[j] for j in range(len(S))])
    return (rows + cols) / 2 if reduce == "mean" else rows + cols


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_ita_matches_reference(batch, reduce):
    got = ita_loss(jnp.asarray(batch["v"]), jnp.asarray(batch["t"]), 0.07, reduce)
    np.testing.assert_allclose(got, np_ita(batch["v"], batch["t"], 0.07, reduce), rtol=RTOL, atol=ATOL)


def test_ita_hand_computed():
    v = jnp.eye(2)
    t = jnp.eye(2)
    # logits = I / 1: each CE = log(1 + e^-1)... = -log(e / (e + 1))
    expected = math.log(1 + math.exp(-1.0))
    np.testing.assert_allclose(ita_loss(v, t, 1.0), expected, rtol=1e-6)
    np.testing.assert_allclose(ita_loss(v, t, 1.0, "sum"), 2 * expected, rtol=1e-6)
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'sum', got 'max'"):
        ita_loss(v, t, 1.0, "max")


def test_ita_aligned_lower_than_shuffled():
    rng = np.random.default_rng(1)
    v = unit(rng.normal(size=(8, D))).astype(np.float32)
    aligned = ita_loss(jnp.asarray(v), jnp.asarray(v))
    shuffled = ita_loss(jnp.asarray(v), jnp.asarray(v[np.roll(np.arange(8), 1)]))
    assert float(aligned) < float(shuffled)


# ---------------------------------------------------------------------------
# Token weights
# ---------------------------------------------------------------------------


def test_clipped_weights_match_numpy_quantile():
    rng = np.random.default_rng(2)
    attention = rng.uniform(size=(4, 11)).astype(np.float32)
    mask = np.ones((4, 11), np.float32)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    mask[3, 1:] = 0
    attention = attention * mask
    got = np.asarray(clipped_token_weights(jnp.asarray(attention), jnp.asarray(mask)))
    np.testing.assert_allclose(got, np_clipped_weights(attention, mask), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)
    assert np.all(got[mask == 0] == 0)


def test_clipped_weights_other_levels_and_empty_sample():
    rng = np.random.default_rng(3)
    attention = rng.uniform(size=(2, 7)).astype(np.float32)
    mask = np.ones((2, 7), np.float32)
    mask[1] = 0  # no real token at all
    got = np.asarray(clipped_token_weights(jnp.asarray(attention), jnp.asarray(mask), 0.25, 0.6))
    np.testing.assert_allclose(got[0], np_clipped_weights(attention[:1], mask[:1], 0.25, 0.6)[0], rtol=1e-5)
    assert np.all(got[1] == 0) and np.all(np.isfinite(got))


# ---------------------------------------------------------------------------
# CSS / CTA
# ---------------------------------------------------------------------------


def test_contexts_match_reference(batch):
    word_ctx, patch_ctx = cross_modal_contexts(*as_jnp(batch["T"], batch["V"], batch["word_mask"]), 0.07)
    np.testing.assert_allclose(word_ctx, np_contexts(batch["T"], batch["V"], None, 0.07), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        patch_ctx, np_contexts(batch["V"], batch["T"], batch["word_mask"], 0.07, False), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(jnp.linalg.norm(word_ctx, axis=-1), 1.0, rtol=1e-5)
    # A mix of several unit words is shorter; a single real word is its own context.
    patch_norms = np.linalg.norm(np.asarray(patch_ctx), axis=-1)
    assert np.all(patch_norms[:2] < 1.0 - 1e-5)
    np.testing.assert_allclose(patch_norms[2], 1.0, rtol=1e-5)


def test_pdt_constraint_matches_reference(batch):
    pdt = PDTOutputs(*as_jnp(*batch["pdt_word"]))
    got = np.asarray(pdt_constraint(pdt))
    mu_t, s_t, mu_c, s_c = (x.astype(np.float64) for x in batch["pdt_word"])
    for b in range(B):
        for i in range(W):
            for j in range(W):
                sem = np.sum((mu_t[b, i] - mu_c[b, j]) ** 2)
                w2 = sem + np.sum((s_t[b, i] - s_c[b, j]) ** 2)
                np.testing.assert_allclose(got[b, i, j], 1 / (1 + math.exp(-w2 / (sem + 1e-6))), rtol=1e-4)


@pytest.mark.parametrize("use_pdt", [False, True])
def test_css_matches_reference(batch, use_pdt):
    tau = 0.07
    T, V, mask = batch["T"], batch["V"], batch["word_mask"]
    word_w = np_clipped_weights(batch["word_attention"], mask)
    patch_w = np_clipped_weights(batch["patch_attention"], np.ones((B, P)))
    word_ctx_np = np_contexts(T, V, None, tau)
    patch_ctx_np = np_contexts(V, T, mask, tau, False)
    word_pdt_np = batch["pdt_word"] if use_pdt else None
    patch_pdt_np = batch["pdt_patch"] if use_pdt else None
    expected = 0.5 * (
        np_side_loss(T, word_ctx_np, word_w, mask, tau, word_pdt_np)
        + np_side_loss(V, patch_ctx_np, patch_w, None, tau, patch_pdt_np)
    )

    word_ctx, patch_ctx = cross_modal_contexts(*as_jnp(T, V, mask), tau)
    got = css_loss(
        jnp.asarray(T),
        word_ctx,
        jnp.asarray(V),
        patch_ctx,
        clipped_token_weights(*as_jnp(batch["word_attention"], mask)),
        clipped_token_weights(jnp.asarray(batch["patch_attention"]), jnp.ones((B, P))),
        jnp.asarray(mask),
        tau,
        PDTOutputs(*as_jnp(*batch["pdt_word"])) if use_pdt else None,
        PDTOutputs(*as_jnp(*batch["pdt_patch"])) if use_pdt else None,
    )
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_css_without_pdt_equals_mgca_token_loss(batch):
    """With PDT off and no padding, CSS is MGCA's token-wise loss (halved:
    CSS averages the two sides, CTA sums them)."""
    tau = 0.1
    full = jnp.ones((B, W))
    T, V = as_jnp(batch["T"], batch["V"])
    word_w = clipped_token_weights(jnp.asarray(batch["word_attention"]) + 0.05, full)
    patch_w = clipped_token_weights(jnp.asarray(batch["patch_attention"]), jnp.ones((B, P)))
    word_ctx, patch_ctx = cross_modal_contexts(T, V, full, tau)
    css = css_loss(T, word_ctx, V, patch_ctx, word_w, patch_w, full, tau)
    cta = cta_loss(T, V, word_w, patch_w, full, tau)
    np.testing.assert_allclose(2 * css, cta, rtol=1e-6)


def test_cta_matches_mgca_reference(batch):
    """MGCA: padding words stay candidates on the word side (weight-0 rows),
    patches attend over real words only and keep unnormalised contexts (ViT)."""
    tau = 0.1
    T, V, mask = batch["T"], batch["V"], batch["word_mask"]
    word_w = np_clipped_weights(batch["word_attention"], mask)
    patch_w = np_clipped_weights(batch["patch_attention"], np.ones((B, P)))
    expected = np_side_loss(T, np_contexts(T, V, None, tau), word_w, None, tau) + np_side_loss(
        V, np_contexts(V, T, mask, tau, False), patch_w, None, tau
    )
    got = cta_loss(*as_jnp(T, V, word_w, patch_w, mask), tau)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_pdt_constraint_changes_loss(batch):
    T, V, mask = as_jnp(batch["T"], batch["V"], batch["word_mask"])
    weights = clipped_token_weights(jnp.asarray(batch["word_attention"]), mask)
    word_ctx = token_contexts(T, V, None, 0.07)
    plain = token_alignment_loss(T, word_ctx, weights, mask, 0.07)
    constrained = token_alignment_loss(T, word_ctx, weights, mask, 0.07, PDTOutputs(*as_jnp(*batch["pdt_word"])))
    assert abs(float(plain) - float(constrained)) > 1e-3


# ---------------------------------------------------------------------------
# Local alignment
# ---------------------------------------------------------------------------


def np_local_side(tokens, globals_, mask, tau, invert=lambda x: 1.0 / x):
    nb, n, _ = tokens.shape
    real = np.ones((nb, n)) if mask is None else mask
    total, count = 0.0, 0
    for b in range(nb):
        idx = [k for k in range(n) if real[b, k] > 0]
        var = {}
        ce = {}
        for k in idx:
            sims = np.array([tokens[b, k].astype(np.float64) @ globals_[j] for j in range(nb)])
            var[k] = np.var(sims, ddof=1)
            ce[k] = -np_log_softmax(sims / tau)[b]
        norm = math.sqrt(sum(x * x for x in var.values()))
        inv = {k: invert(var[k] / norm) for k in idx}
        lo, hi = min(inv.values()), max(inv.values())
        for k in idx:
            weight = (inv[k] - lo) / (hi - lo) if hi > lo else 0.0
            total += weight * ce[k]
            count += 1
    return total, count


def test_local_alignment_matches_reference(batch):
    tau = 0.07
    p_sum, _ = np_local_side(batch["V"], batch["t"], None, tau)
    w_sum, w_count = np_local_side(batch["T"], batch["v"], batch["word_mask"], tau)
    expected = p_sum / (P * B) + w_sum / w_count
    got = local_alignment_loss(*as_jnp(batch["V"], batch["t"], batch["T"], batch["v"], batch["word_mask"]), tau)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def np_local_side_token_gradient(tokens, globals_, mask, tau, denominator):
    """d(sum of w CE) / denominator / d tokens with the weights w held constant (SPEC 3.3: no gradient
    through w): w[b, k] (softmax_j(tokens[b, k] . g_j / tau) - [j = b]) @ g / tau / denominator."""
    nb, n, _ = tokens.shape
    real = np.ones((nb, n)) if mask is None else mask
    gradient = np.zeros(tokens.shape)
    for b in range(nb):
        idx = [k for k in range(n) if real[b, k] > 0]
        sims = {k: np.array([tokens[b, k].astype(np.float64) @ globals_[j] for j in range(nb)]) for k in idx}
        var = {k: np.var(sims[k], ddof=1) for k in idx}
        norm = math.sqrt(sum(x * x for x in var.values()))
        inv = {k: norm / var[k] for k in idx}
        lo, hi = min(inv.values()), max(inv.values())
        for k in idx:
            weight = (inv[k] - lo) / (hi - lo) if hi > lo else 0.0
            probabilities = np.exp(np_log_softmax(sims[k] / tau))
            probabilities[b] -= 1.0
            gradient[b, k] = weight * (probabilities @ globals_.astype(np.float64)) / tau / denominator
    return gradient


def test_local_alignment_gradient_does_not_flow_through_the_weights(batch):
    tau = 0.07
    V, t, T, v, mask = as_jnp(batch["V"], batch["t"], batch["T"], batch["v"], batch["word_mask"])
    grad_V, grad_T = jax.grad(local_alignment_loss, argnums=(0, 2))(V, t, T, v, mask, tau)
    expected_V = np_local_side_token_gradient(batch["V"], batch["t"], None, tau, P * B)
    expected_T = np_local_side_token_gradient(batch["T"], batch["v"], batch["word_mask"], tau, batch["word_mask"].sum())
    np.testing.assert_allclose(grad_V, expected_V, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad_T, expected_T, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("inversion", ["reciprocal", "complement", "none"])
def test_variance_weights_of_each_inversion_min_max_scale_over_real_tokens(batch, inversion):
    """pretrain.local_inversion: x = var / ||var|| over a sample's real tokens, inverted as 1 / x, 1 - x or x,
    then min-max scaled over the real tokens only (padding weighs 0 and sets neither end)."""
    inverted = {"reciprocal": lambda x: 1.0 / x, "complement": lambda x: 1.0 - x, "none": lambda x: x}[inversion]
    sims = np.einsum("bnd,jd->bnj", batch["T"].astype(np.float64), batch["v"].astype(np.float64))
    expected = np.zeros((B, W))
    for b in range(B):
        real = batch["word_mask"][b] > 0
        variance = np.var(sims[b][real], axis=-1, ddof=1)
        values = inverted(variance / np.linalg.norm(variance))
        spread = values.max() - values.min()
        expected[b, real] = (values - values.min()) / spread if spread > 0 else 0.0
    got = variance_token_weights(jnp.asarray(sims, jnp.float32), jnp.asarray(batch["word_mask"]), inversion)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_variance_weights_min_max_scale_a_narrow_spread_in_full():
    """Min-max scaling stretches any spread of the (inverted) variances to [0, 1], however narrow: tokens whose
    similarities (0 and a_n over J = 2 samples) have unbiased variances 1, 1.0002 and 1.0004 get 0, 1/2 and 1
    with 'none', and 1, (1/1.0002 - 1/1.0004) / (1 - 1/1.0004) and 0 with 'reciprocal'."""
    variances = np.array([1.0, 1.0002, 1.0004])
    sims = np.stack([np.zeros(3), np.sqrt(2 * variances)], axis=-1)[None]  # (1, 3, 2)
    got = variance_token_weights(jnp.asarray(sims, jnp.float32), None, "none")
    np.testing.assert_allclose(got, [[0.0, 0.5, 1.0]], atol=2e-3)
    got = variance_token_weights(jnp.asarray(sims, jnp.float32), None, "reciprocal")
    np.testing.assert_allclose(got, [[1.0, (1 / 1.0002 - 1 / 1.0004) / (1 - 1 / 1.0004), 0.0]], atol=2e-3)


def test_variance_weights_range(batch):
    sims = jnp.einsum("bnd,jd->bnj", jnp.asarray(batch["T"]), jnp.asarray(batch["v"]))
    w = np.asarray(variance_token_weights(sims, jnp.asarray(batch["word_mask"])))
    assert w.min() >= 0 and w.max() <= 1 + 1e-6
    assert np.all(w[batch["word_mask"] == 0] == 0)
    np.testing.assert_allclose(w[0].max(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(w[0][batch["word_mask"][0] > 0].min(), 0.0, atol=1e-6)


# ---------------------------------------------------------------------------
# ICL and EMA
# ---------------------------------------------------------------------------


def np_icl(c, c_m, z_m, mask, tau):
    nb, ns, _ = z_m.shape
    real = np.ones((nb, ns)) if mask is None else mask
    coarse = -np.mean([np_log_softmax([c[i] @ c_m[j] / tau for j in range(nb)])[i] for i in range(nb)])
    terms = []
    for i in range(nb):
        for p in range(ns):
            if real[i, p] == 0:
                continue
            cands = [j for j in range(nb) if real[j, p] > 0]
            logits = [c[i].astype(np.float64) @ z_m[j, p] / tau for j in cands]
            terms.append(-np_log_softmax(logits)[cands.index(i)])
    return 0.5 * (coarse + np.mean(terms))


@pytest.mark.parametrize("masked", [False, True])
def test_icl_matches_reference(batch, masked):
    rng = np.random.default_rng(4)
    c_m = unit(rng.normal(size=(B, D))).astype(np.float32)
    mask = batch["word_mask"] if masked else None
    got = icl_loss(  # At the default temperature, SPEC 3's tau = 0.07.
        jnp.asarray(batch["t"]), jnp.asarray(c_m), jnp.asarray(batch["T"]), None if mask is None else jnp.asarray(mask),
    )
    np.testing.assert_allclose(got, np_icl(batch["t"], c_m, batch["T"], mask, 0.07), rtol=RTOL, atol=ATOL)


def test_icl_with_every_token_padded_is_half_the_coarse_term(batch):
    """A batch whose reports are all padding has no fine term (no (sample, token) slot is real): the loss is
    coarse / 2, finite, not 0 / 0."""
    c, c_m = batch["t"], batch["v"]
    logits = c.astype(np.float64) @ c_m.T.astype(np.float64) / 0.07
    coarse = -np.mean([np_log_softmax(logits[i])[i] for i in range(B)])
    got = icl_loss(*as_jnp(c, c_m, batch["T"]), jnp.zeros((B, W)), 0.07)
    np.testing.assert_allclose(got, 0.5 * coarse, rtol=RTOL, atol=ATOL)


def test_ema_update():
    online = {"a": jnp.ones((2,)), "b": {"c": jnp.full((3,), 2.0, jnp.bfloat16)}}
    momentum = {"a": jnp.zeros((2,)), "b": {"c": jnp.zeros((3,), jnp.bfloat16)}}
    out = ema_update(online, momentum, 0.9)
    np.testing.assert_allclose(out["a"], 0.1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["b"]["c"], np.float32), 0.2, rtol=1e-2)
    assert out["b"]["c"].dtype == jnp.bfloat16
    np.testing.assert_allclose(ema_update(online, momentum, 0.995)["a"], 0.005, rtol=1e-5)


# ---------------------------------------------------------------------------
# Prototypes (CPA)
# ---------------------------------------------------------------------------


def np_mgca_sinkhorn(scores, epsilon, iterations):
    """SwAV/MGCA multiplicative Sinkhorn on Q = exp(scores / eps)^T (K, B)."""
    Q = np.exp(scores.astype(np.float64) / epsilon).T
    Q /= Q.sum()
    K, nb = Q.shape
    r = np.ones(K) / K
    c = np.ones(nb) / nb
    for _ in range(iterations):
        Q *= (r / Q.sum(axis=1))[:, None]
        Q *= (c / Q.sum(axis=0))[None, :]
    return (Q / Q.sum(axis=0, keepdims=True)).T


def random_scores(seed, nb=6, K=10):
    rng = np.random.default_rng(seed)
    x = unit(rng.normal(size=(nb, D)))
    protos = unit(rng.normal(size=(K, D)))
    return (x @ protos.T).astype(np.float32)


def test_sinkhorn_matches_multiplicative_reference():
    scores = random_scores(5)
    for iterations in (1, 3, 7):
        got = sinkhorn_knopp(jnp.asarray(scores), 0.05, iterations)
        np.testing.assert_allclose(got, np_mgca_sinkhorn(scores, 0.05, iterations), rtol=1e-4, atol=1e-6)


def test_sinkhorn_marginals():
    scores = jnp.asarray(random_scores(6))
    nb, K = scores.shape

    def column_deviation(codes):
        return float(np.max(np.abs(np.asarray(codes).sum(0) * K / nb - 1.0)))

    converged = np.asarray(sinkhorn_knopp(scores, 0.05, 300))
    np.testing.assert_allclose(converged.sum(1), 1.0, rtol=1e-5)  # each sample's code sums to 1
    np.testing.assert_allclose(converged.sum(0), nb / K, rtol=1e-3)  # equal prototype mass
    three = sinkhorn_knopp(scores, 0.05, 3)
    np.testing.assert_allclose(np.asarray(three).sum(1), 1.0, rtol=1e-5)
    # Three iterations move the prototype marginal well towards uniform ...
    assert column_deviation(three) < 0.5 * column_deviation(jax.nn.softmax(scores / 0.05, axis=-1))
    # ... and are already close when the problem is well conditioned.
    assert column_deviation(sinkhorn_knopp(scores, 0.5, 3)) < 0.02
    # Large scores / epsilon do not overflow.
    assert np.all(np.isfinite(np.asarray(sinkhorn_knopp(scores * 100.0, 0.05, 3))))


def np_cpa(img, txt, epsilon, iterations, tau):
    """(CE(q_text, p_image) + CE(q_image, p_text)) / 2, each the batch mean of -sum_k q log p."""
    q_img, q_txt = np_mgca_sinkhorn(img, epsilon, iterations), np_mgca_sinkhorn(txt, epsilon, iterations)
    total_t2i = total_i2t = 0.0
    for b in range(img.shape[0]):
        log_p_img = np_log_softmax(img[b] / tau)
        log_p_txt = np_log_softmax(txt[b] / tau)
        total_t2i -= np.sum(q_txt[b] * log_p_img)
        total_i2t -= np.sum(q_img[b] * log_p_txt)
    return 0.5 * (total_t2i + total_i2t) / img.shape[0]


def test_cpa_matches_reference():
    img, txt = random_scores(7), random_scores(8)
    got = cpa_loss(jnp.asarray(img), jnp.asarray(txt), 0.05, 3, 0.2)
    np.testing.assert_allclose(got, np_cpa(img, txt, 0.05, 3, 0.2), rtol=1e-4)


def test_prototype_defaults_are_mgcas_constants():
    """SPEC 4: called without settings, the Sinkhorn codes are 3 iterations at epsilon 0.05 and the CPA
    predictions a softmax at temperature 0.2."""
    img, txt = random_scores(18), random_scores(19)
    np.testing.assert_allclose(sinkhorn_knopp(jnp.asarray(img)), np_mgca_sinkhorn(img, 0.05, 3), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cpa_loss(jnp.asarray(img), jnp.asarray(txt)), np_cpa(img, txt, 0.05, 3, 0.2), rtol=1e-4)


def test_normalize_prototypes():
    kernel = jnp.asarray(np.random.default_rng(9).normal(size=(D, 12)), jnp.float32)
    normed = normalize_prototypes({"kernel": kernel})
    np.testing.assert_allclose(jnp.linalg.norm(normed["kernel"], axis=0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(normalize_prototypes(kernel), normed["kernel"])


# ---------------------------------------------------------------------------
# Objectives: what they sum, with which weights and constants from the config, under which names
# ---------------------------------------------------------------------------


def _objective_config(**fields):
    return with_fields(base_config(), fields)


def test_amvlm_objective_reads_every_weight_and_constant_from_the_config(batch):
    """SPEC 3.5 with weights, tau and the local inversion away from their defaults: each term against its
    element-by-element reference at that tau, the total their weighted sum, the terms logged by name."""
    tau, weights = 0.1, {"ita": 0.3, "css": 0.7, "local": 0.2, "icl": 0.05}
    config = _objective_config(**{f"pretrain.weights.{k}": v for k, v in weights.items()},
                               **{"pretrain.temperature": tau, "pretrain.local_inversion": "complement"})
    rng = np.random.default_rng(11)
    T, V, mask = batch["T"], batch["V"], batch["word_mask"]
    word_ctx, patch_ctx = np_contexts(T, V, None, tau), np_contexts(V, T, mask, tau, False)
    outputs = dict(
        v=batch["v"], t=batch["t"], V=V, T=T, word_mask=mask, word_attention=batch["word_attention"],
        patch_attention=batch["patch_attention"], word_context=word_ctx.astype(np.float32),
        patch_context=patch_ctx.astype(np.float32), word_pdt=PDTOutputs(*batch["pdt_word"]),
        patch_pdt=PDTOutputs(*batch["pdt_patch"]),
    )
    momentum_mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.float32)
    momentum = dict(v=unit(rng.normal(size=(B, D))).astype(np.float32), V=unit(rng.normal(size=(B, P, D))).astype(np.float32),
                    t=unit(rng.normal(size=(B, D))).astype(np.float32), T=unit(rng.normal(size=(B, W, D))).astype(np.float32),
                    word_mask=momentum_mask)
    # One compiled call: op by op, the objective's many small operations take seconds to dispatch.
    loss, terms = jax.jit(lambda o, m: objectives.amvlm_objective(o, m, config))(outputs, momentum)

    word_w = np_clipped_weights(batch["word_attention"], mask)
    patch_w = np_clipped_weights(batch["patch_attention"], np.ones((B, P)))
    p_sum, _ = np_local_side(V, batch["t"], None, tau, lambda x: 1.0 - x)
    w_sum, w_count = np_local_side(T, batch["v"], mask, tau, lambda x: 1.0 - x)
    expected = {
        "ita": np_ita(batch["v"], batch["t"], tau, "mean"),
        "css": 0.5 * (np_side_loss(T, word_ctx, word_w, mask, tau, batch["pdt_word"])
                      + np_side_loss(V, patch_ctx, patch_w, None, tau, batch["pdt_patch"])),
        "local": p_sum / (P * B) + w_sum / w_count,
        "icl": 0.5 * (np_icl(batch["v"], momentum["v"], momentum["V"], None, tau)
                      + np_icl(batch["t"], momentum["t"], momentum["T"], momentum_mask, tau)),
    }
    assert sorted(terms) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(terms[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
    np.testing.assert_allclose(loss, sum(weights[k] * expected[k] for k in weights), rtol=RTOL, atol=ATOL)


def test_mgca_objective_reads_every_weight_and_constant_from_the_config(batch):
    """SPEC 4 with l1, l2, l3, both temperatures and the Sinkhorn settings away from their defaults; the word
    side's candidates are T_unmasked (padding slots included), the patches attend over real words only."""
    weights = {"ita": 0.4, "cta": 0.6, "cpa": 1.5}
    config = _objective_config(**{f"pretrain.mgca.{k}": v for k, v in weights.items()}, **{
        "pretrain.objective": "mgca", "pretrain.temperature": 0.1, "pretrain.mgca.cta_temperature": 0.2,
        "pretrain.mgca.sinkhorn_epsilon": 0.1, "pretrain.mgca.sinkhorn_iterations": 2,
        "pretrain.mgca.prototype_temperature": 0.3})
    rng = np.random.default_rng(12)
    mask = batch["word_mask"]
    T_unmasked = batch["T"].copy()
    T_unmasked[mask == 0] = unit(rng.normal(size=(int((mask == 0).sum()), D)))
    image_scores, text_scores = random_scores(13, nb=B), random_scores(14, nb=B)
    outputs = dict(v=batch["v"], t=batch["t"], V=batch["V"], T=batch["T"], T_unmasked=T_unmasked, word_mask=mask,
                   word_attention=batch["word_attention"], patch_attention=batch["patch_attention"],
                   image_prototype_scores=image_scores, text_prototype_scores=text_scores)
    loss, terms = jax.jit(lambda o: objectives.objective_fn(config)(o, None, config))(outputs)

    word_w = np_clipped_weights(batch["word_attention"], mask)
    patch_w = np_clipped_weights(batch["patch_attention"], np.ones((B, P)))
    expected = {
        "ita": np_ita(batch["v"], batch["t"], 0.1, "sum"),
        "cta": np_side_loss(T_unmasked, np_contexts(T_unmasked, batch["V"], None, 0.2), word_w, None, 0.2)
        + np_side_loss(batch["V"], np_contexts(batch["V"], T_unmasked, mask, 0.2, False), patch_w, None, 0.2),
        "cpa": np_cpa(image_scores, text_scores, 0.1, 2, 0.3),
    }
    assert sorted(terms) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(terms[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
    np.testing.assert_allclose(loss, sum(weights[k] * expected[k] for k in weights), rtol=RTOL, atol=ATOL)


def test_objectives_skip_zero_weight_terms_and_name_missing_inputs(batch):
    """A term weighted 0 is neither computed nor logged: with ITA alone the outputs need only v and t, and the
    loss is w_ita L_ita (for MGCA, with its summed ITA), MGCA's prototype term needs only the prototype
    scores, and AMVLM's ICL alone logs no ITA. AMVLM's ICL term without the momentum outputs, and PDT without its heads, each stop with
    a ValueError that says what is missing."""
    only = lambda **weights: {f"pretrain.weights.{k}": weights.get(k, 0.0) for k in ("ita", "css", "local", "icl")}  # noqa: E731
    loss, terms = objectives.amvlm_objective({"v": batch["v"], "t": batch["t"]}, None, _objective_config(**only(ita=0.5)))
    assert sorted(terms) == ["ita"]
    np.testing.assert_allclose(loss, 0.5 * np_ita(batch["v"], batch["t"], 0.07, "mean"), rtol=RTOL, atol=ATOL)
    mgca_ita = _objective_config(**{"pretrain.objective": "mgca", "pretrain.mgca.ita": 0.4, "pretrain.mgca.cta": 0.0,
                                    "pretrain.mgca.cpa": 0.0})
    loss, terms = objectives.objective_fn(mgca_ita)({"v": batch["v"], "t": batch["t"]}, None, mgca_ita)
    assert sorted(terms) == ["ita"]
    np.testing.assert_allclose(loss, 0.4 * np_ita(batch["v"], batch["t"], 0.07, "sum"), rtol=RTOL, atol=ATOL)
    mgca_cpa = _objective_config(**{"pretrain.objective": "mgca", "pretrain.mgca.ita": 0.0, "pretrain.mgca.cta": 0.0,
                                    "pretrain.mgca.cpa": 1.5})
    scores = {"image_prototype_scores": random_scores(13, nb=B), "text_prototype_scores": random_scores(14, nb=B)}
    loss, terms = objectives.mgca_objective(scores, None, mgca_cpa)
    assert sorted(terms) == ["cpa"]
    np.testing.assert_allclose(loss, 1.5 * np_cpa(*scores.values(), 0.05, 3, 0.2), rtol=RTOL, atol=ATOL)
    # ICL alone, with the momentum encoders' full outputs: AMVLM's own ITA (weight 0) is not logged either.
    rng = np.random.default_rng(21)
    momentum = dict(v=unit(rng.normal(size=(B, D))), V=unit(rng.normal(size=(B, P, D))),
                    t=unit(rng.normal(size=(B, D))), T=unit(rng.normal(size=(B, W, D))), word_mask=batch["word_mask"])
    momentum = {k: np.asarray(v, np.float32) for k, v in momentum.items()}
    loss, terms = objectives.amvlm_objective({"v": batch["v"], "t": batch["t"]}, momentum,
                                             _objective_config(**only(icl=0.3)))
    assert sorted(terms) == ["icl"]
    icl = 0.5 * (np_icl(batch["v"], momentum["v"], momentum["V"], None, 0.07)
                 + np_icl(batch["t"], momentum["t"], momentum["T"], batch["word_mask"], 0.07))
    np.testing.assert_allclose(loss, 0.3 * icl, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="momentum encoders"):
        objectives.amvlm_objective({"v": batch["v"], "t": batch["t"]}, None, _objective_config(**only(icl=1.0)))
    css_with_pdt = _objective_config(**only(css=1.0), **{"pretrain.use_pdt": True})
    no_heads = {k: batch[k] for k in ("v", "t", "word_attention", "patch_attention", "word_mask")}
    with pytest.raises(ValueError, match="no PDT heads"):
        objectives.amvlm_objective(no_heads, None, css_with_pdt)


def test_token_alignment_drops_padding_rows_whatever_their_weight(batch):
    """A padded row adds nothing even with a non-zero weight (its own column is masked, so its CE would be
    huge): uniform weights over every slot give the reference sum over the real rows only."""
    T, V, mask = batch["T"], batch["V"], batch["word_mask"]
    contexts = np_contexts(T, V, None, 0.07)
    uniform = np.full((B, W), 0.2, np.float32)
    got = token_alignment_loss(*as_jnp(T, contexts.astype(np.float32), uniform, mask), 0.07,
                               PDTOutputs(*as_jnp(*batch["pdt_word"])))
    np.testing.assert_allclose(got, np_side_loss(T, contexts, uniform, mask, 0.07, batch["pdt_word"]), rtol=RTOL, atol=ATOL)


def test_no_gradient_flows_through_the_token_weights(batch):
    """SPEC 3.2: the row weights are constants: no gradient into the CLS attention they come from, nor
    into the weights handed to the loss."""
    T, V, mask = as_jnp(batch["T"], batch["V"], batch["word_mask"])
    contexts = token_contexts(T, V, None, 0.07)

    def loss_of_attention(attention):  # Any use of the weights, not only the loss that stops their gradient too.
        return jnp.sum(clipped_token_weights(attention, mask) * jnp.arange(1.0, W + 1.0))

    def loss_of_weights(weights):
        return token_alignment_loss(T, contexts, weights, mask, 0.07)

    weights = clipped_token_weights(jnp.asarray(batch["word_attention"]), mask)
    assert float(loss_of_weights(weights)) > 0
    np.testing.assert_array_equal(jax.grad(loss_of_attention)(jnp.asarray(batch["word_attention"])), 0.0)
    np.testing.assert_array_equal(jax.grad(loss_of_weights)(weights), 0.0)


def test_cpa_gradient_treats_the_codes_as_targets():
    """SPEC 4: the Sinkhorn codes carry no gradient, so d L_cpa / d image_scores = (p_image - q_text) / (2 tau B)
    with p = softmax(scores / tau), and the same for the text scores with q_image."""
    img, txt = random_scores(15, nb=4, K=6), random_scores(16, nb=4, K=6)
    gradient = jax.jit(jax.grad(lambda a, b: cpa_loss(a, b, 0.05, 3, 0.2), argnums=(0, 1)))
    grad_img, grad_txt = gradient(jnp.asarray(img), jnp.asarray(txt))
    nb = img.shape[0]
    for scores, other, grad in ((img, txt, grad_img), (txt, img, grad_txt)):
        probabilities = np.exp([np_log_softmax(row / 0.2) for row in scores])
        expected = (probabilities - np_mgca_sinkhorn(other, 0.05, 3)) / (2 * 0.2 * nb)
        np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_icl_gradient_reaches_only_the_online_embedding(batch):
    """SPEC 3.4: the momentum encoders are never updated by gradient: nothing flows into their embeddings."""
    rng = np.random.default_rng(17)
    c_m = jnp.asarray(unit(rng.normal(size=(B, D))), jnp.float32)
    grads = jax.jit(jax.grad(icl_loss, argnums=(0, 1, 2)))(*as_jnp(batch["t"]), c_m, jnp.asarray(batch["T"]),
                                                           jnp.asarray(batch["word_mask"]), 0.07)
    assert float(jnp.abs(grads[0]).max()) > 0
    np.testing.assert_array_equal(grads[1], 0.0)
    np.testing.assert_array_equal(grads[2], 0.0)


# ---------------------------------------------------------------------------
# Padding invariance and gradients
# ---------------------------------------------------------------------------


def _all_amvlm_losses(T, V, v, t, pdt_w, pdt_p, batch):
    mask = jnp.asarray(batch["word_mask"])
    word_w = clipped_token_weights(jnp.asarray(batch["word_attention"]), mask)
    patch_w = clipped_token_weights(jnp.asarray(batch["patch_attention"]), jnp.ones((B, P)))
    word_ctx, patch_ctx = cross_modal_contexts(T, V, mask, 0.07)
    return dict(
        css=css_loss(T, word_ctx, V, patch_ctx, word_w, patch_w, mask, 0.07, PDTOutputs(*pdt_w), PDTOutputs(*pdt_p)),
        local=local_alignment_loss(V, t, T, v, mask, 0.07),
        icl_text=icl_loss(t, v, T, mask, 0.07),
    )


def test_padding_words_never_change_losses(batch):
    rng = np.random.default_rng(10)
    pad = batch["word_mask"] == 0
    args = as_jnp(batch["T"], batch["V"], batch["v"], batch["t"])
    pdt_p = as_jnp(*batch["pdt_patch"])
    reference = _all_amvlm_losses(*args, as_jnp(*batch["pdt_word"]), pdt_p, batch)

    T_junk = batch["T"].copy()
    T_junk[pad] = rng.normal(size=(pad.sum(), D)) * 5.0
    pdt_w_junk = []
    for x in batch["pdt_word"]:
        x = x.copy()
        x[pad] = rng.normal(size=(pad.sum(), D)) * 5.0
        pdt_w_junk.append(jnp.asarray(x))
    changed = _all_amvlm_losses(jnp.asarray(T_junk), *args[1:], pdt_w_junk, pdt_p, batch)
    for name in reference:
        np.testing.assert_allclose(changed[name], reference[name], rtol=1e-6, err_msg=name)


def test_gradients_finite(batch):
    mask = batch["word_mask"].copy()
    mask[1] = 0  # a sample with no real word at all, next to a single-word one
    batch = dict(batch, word_mask=mask, word_attention=batch["word_attention"] * mask)

    def total(T, V, v, t, pdt_w, pdt_p):
        losses = _all_amvlm_losses(T, V, v, t, pdt_w, pdt_p, batch)
        m = jnp.asarray(mask)
        word_w = clipped_token_weights(jnp.asarray(batch["word_attention"]), m)
        patch_w = clipped_token_weights(jnp.asarray(batch["patch_attention"]), jnp.ones((B, P)))
        extra = (
            ita_loss(v, t)
            + ita_loss(v, t, reduce="sum")
            + icl_loss(v, t, V, None)
            + cta_loss(T, V, word_w, patch_w, m)
            + cpa_loss(v @ jnp.ones((D, 4)), t @ jnp.ones((D, 4)))
        )
        return sum(losses.values()) + extra

    args = as_jnp(batch["T"], batch["V"], batch["v"], batch["t"])
    grads = jax.jit(jax.grad(total, argnums=(0, 1, 2, 3, 4, 5)))(
        *args, as_jnp(*batch["pdt_word"]), as_jnp(*batch["pdt_patch"])
    )
    for leaf in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert float(jnp.abs(grads[0]).sum()) > 0


def test_bfloat16_inputs_compute_in_float32(batch):
    v16, t16 = jnp.asarray(batch["v"], jnp.bfloat16), jnp.asarray(batch["t"], jnp.bfloat16)
    out = ita_loss(v16, t16)
    assert out.dtype == jnp.float32
    ref = ita_loss(v16.astype(jnp.float32), t16.astype(jnp.float32))
    np.testing.assert_allclose(out, ref, rtol=1e-6)


# ---------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------


def test_projection_heads_unit_norm():
    rng = np.random.default_rng(11)
    cls = jnp.asarray(rng.normal(size=(B, 16)), jnp.float32)
    tokens = jnp.asarray(rng.normal(size=(B, 6, 16)), jnp.float32)
    global_head = GlobalHead(hidden=32, out=D)
    local_head = LocalHead(hidden=32, out=D)
    g_vars = global_head.init(jax.random.PRNGKey(0), cls, train=False)
    l_vars = local_head.init(jax.random.PRNGKey(1), tokens, train=False)
    assert "norm_out" not in l_vars["params"]["projection"]  # no scale / shift
    # Initialising in training mode leaves the running statistics as a new torch BatchNorm1d's: mean 0, var 1.
    stats = local_head.init(jax.random.PRNGKey(1), tokens, train=True)["batch_stats"]["projection"]
    assert sorted(stats) == ["norm_hidden", "norm_out"]
    for norm in stats.values():
        np.testing.assert_array_equal(norm["mean"], 0.0)
        np.testing.assert_array_equal(norm["var"], 1.0)
    g_out, g_state = global_head.apply(g_vars, cls, train=True, mutable=["batch_stats"])
    l_out, l_state = local_head.apply(l_vars, tokens, train=True, mutable=["batch_stats"])
    assert g_out.shape == (B, D) and l_out.shape == (B, 6, D)
    np.testing.assert_allclose(jnp.linalg.norm(g_out, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(l_out, axis=-1), 1.0, rtol=1e-5)
    # BatchNorm statistics over batch and tokens: the pre-norm output has zero mean there.
    mean = l_state["batch_stats"]["projection"]["norm_out"]["mean"]
    assert mean.shape == (D,)
    eval_out = local_head.apply({**l_vars, **l_state}, tokens, train=False)
    np.testing.assert_allclose(jnp.linalg.norm(eval_out, axis=-1), 1.0, rtol=1e-5)
    masked_out, _ = local_head.apply(
        l_vars, tokens, train=True, mask=jnp.asarray(np.array([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5])),
        mutable=["batch_stats"],
    )
    np.testing.assert_allclose(jnp.linalg.norm(masked_out, axis=-1), 1.0, rtol=1e-5)


def test_projection_heads_batch_norm_as_torch_batch_norm_1d():
    """The heads' stack against torch's Linear - BatchNorm1d - ReLU - Linear - BatchNorm1d(affine=False) with the
    same weights: training outputs, the running statistics one step moves (torch's unbiased running variance)
    and evaluation outputs from them; with a token mask, the statistics of the masked rows alone. The global
    head is the same stack over a (N, C) batch, its train flag handed down as the local head's."""
    torch = pytest.importorskip("torch", reason="torch is needed for the reference BatchNorm1d")
    rng = np.random.default_rng(12)
    tokens = jnp.asarray(rng.normal(size=(B, 6, 16)) * 2 + 0.5, jnp.float32)
    rows = np.asarray(tokens, np.float64).reshape(-1, 16)
    head = LocalHead(hidden=32, out=D)
    variables = head.init(jax.random.PRNGKey(2), tokens, train=False)
    p = jax.device_get(variables["params"]["projection"])
    p = {**p, "norm_hidden": {"scale": 1 + rng.uniform(size=32), "bias": rng.normal(size=32)}}  # Not the init.
    variables = {**variables, "params": {"projection": p}}

    def torch_stack():
        stack = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, D), torch.nn.BatchNorm1d(D, affine=False)).double()
        with torch.no_grad():
            for index, name in ((0, "dense_hidden"), (3, "dense_out")):
                stack[index].weight.copy_(torch.from_numpy(np.array(p[name]["kernel"], np.float64).T))
                stack[index].bias.copy_(torch.from_numpy(np.array(p[name]["bias"], np.float64)))
            stack[1].weight.copy_(torch.from_numpy(p["norm_hidden"]["scale"]))
            stack[1].bias.copy_(torch.from_numpy(p["norm_hidden"]["bias"]))
        return stack

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    mask = np.ones((B, 6), np.int32)
    mask[1, 3:], mask[2, 2:] = 0, 0
    global_head, global_rows = GlobalHead(hidden=32, out=D), jnp.asarray(rows, jnp.float32)
    for module, inputs, token_mask in ((head, tokens, None), (head, tokens, mask), (global_head, global_rows, None)):
        counted = rows if token_mask is None else rows[mask.reshape(-1).astype(bool)]
        reference = torch_stack().train()
        with torch.no_grad():
            trained = reference(torch.from_numpy(counted)).numpy()  # Moves the running statistics once.
        masks = {} if token_mask is None else {"mask": jnp.asarray(token_mask)}
        out, moved = module.apply(variables, inputs, train=True, mutable=["batch_stats"], **masks)
        if token_mask is None:
            np.testing.assert_allclose(np.asarray(out).reshape(-1, D), unit(trained), atol=2e-5)
        else:
            np.testing.assert_allclose(np.asarray(out).reshape(-1, D)[mask.reshape(-1) == 1], unit(trained), atol=2e-5)
        for index, name in ((1, "norm_hidden"), (4, "norm_out")):
            for statistic in ("mean", "var"):
                np.testing.assert_allclose(moved["batch_stats"]["projection"][name][statistic],
                                           getattr(reference[index], f"running_{statistic}").numpy(),
                                           rtol=1e-5, atol=1e-6, err_msg=f"{name} {statistic}")
        with torch.no_grad():
            evaluated = reference.eval()(torch.from_numpy(rows)).numpy()
        np.testing.assert_allclose(np.asarray(module.apply({**variables, **moved}, inputs, train=False)).reshape(-1, D),
                                   unit(evaluated), atol=2e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_row_batch_norm_trains_as_flax_batch_norm_bit_for_bit(masked):
    """In training, RowBatchNorm's outputs, input and parameter gradients and running mean are nn.BatchNorm's to
    the bit (so runs made before it keep their rounding path); only the running variance differs."""
    x = jax.random.normal(jax.random.PRNGKey(0), (96, 24)) * 3 + 1
    weights = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    mask = (jax.random.uniform(jax.random.PRNGKey(2), (96, 1)) > 0.3) if masked else None
    ours = RowBatchNorm()
    theirs = nn.BatchNorm(use_running_average=False, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON)
    variables = theirs.init(jax.random.PRNGKey(3), x)
    variables = {**variables, "params": {"scale": 1 + weights[0], "bias": weights[1]}}

    def run(apply):
        def loss(params, x):
            y, moved = apply({**variables, "params": params}, x)
            return jnp.sum(weights * y), moved
        return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(variables["params"], x)

    (our_loss, our_moved), our_grads = run(lambda v, x: ours.apply(v, x, True, mask, mutable=["batch_stats"]))
    (their_loss, their_moved), their_grads = run(lambda v, x: theirs.apply(v, x, mask=mask, mutable=["batch_stats"]))
    assert our_loss == their_loss
    for a, b in zip(jax.tree.leaves(our_grads), jax.tree.leaves(their_grads)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(our_moved["batch_stats"]["mean"], their_moved["batch_stats"]["mean"])
    assert not np.array_equal(our_moved["batch_stats"]["var"], their_moved["batch_stats"]["var"])


# ---------------------------------------------------------------------------
# PDT head
# ---------------------------------------------------------------------------


def test_pdt_head_shapes_init_and_jit(batch):
    head = PDTHead(dim=D, num_heads=2, dropout=0.1)
    x = jnp.asarray(batch["T"])
    mask = jnp.asarray(batch["word_mask"])
    variables = jax.jit(lambda key: head.init(key, x, mask, deterministic=True))(jax.random.PRNGKey(0))
    params = variables["params"]
    assert "bias" not in params["attention"]["qkv"]  # no qkv bias
    assert set(params["attention"]) == {"qkv"}  # no output projection (SPEC 3.2)

    # Initialisation of the full-size head: weights N(0, 0.02), biases 0, LayerNorm (1, 0).
    full = PDTHead()
    full_params = jax.jit(lambda key: full.init(key, jnp.zeros((1, 2, 128)), jnp.ones((1, 2)), deterministic=True))(
        jax.random.PRNGKey(1)
    )["params"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(full_params):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            assert 0.018 < float(jnp.std(leaf)) < 0.022 and abs(float(jnp.mean(leaf))) < 0.002, name
        elif name.endswith("['bias']"):
            assert float(jnp.abs(leaf).max()) == 0.0, name
        else:
            assert name.endswith("['scale']") and np.all(np.asarray(leaf) == 1.0), name

    apply = jax.jit(lambda p, x, m: head.apply({"params": p}, x, m, deterministic=True))
    mu, logsigma = apply(params, x, mask)
    assert mu.shape == (B, W, D) and logsigma.shape == (B, W, D)
    assert np.all(np.isfinite(np.asarray(mu))) and np.all(np.isfinite(np.asarray(logsigma)))

    # Padding tokens are not attended to: junk there leaves real outputs unchanged.
    junk = np.asarray(x).copy()
    junk[batch["word_mask"] == 0] = 7.0
    mu2, logsigma2 = apply(params, jnp.asarray(junk), mask)
    real = batch["word_mask"] > 0
    np.testing.assert_allclose(np.asarray(mu2)[real], np.asarray(mu)[real], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(logsigma2)[real], np.asarray(logsigma)[real], rtol=1e-5, atol=1e-6)

    # Training mode uses dropout.
    apply_train = jax.jit(
        lambda p, key: head.apply({"params": p}, x, mask, deterministic=False, rngs={"dropout": key})
    )
    mu_train, _ = apply_train(params, jax.random.PRNGKey(3))
    assert not np.allclose(np.asarray(mu_train), np.asarray(mu))
    assert mu_train.shape == (B, W, D)


def _random_biases(params, scale=lambda path: 1.0):
    """``params`` with every bias drawn from N(0, 1) (times ``scale`` of its key path), the kernels kept."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree_util.tree_unflatten(jax.tree.structure(params), [
        scale(jax.tree_util.keystr(path)) * jax.random.normal(key, leaf.shape)
        if jax.tree_util.keystr(path).endswith("['bias']") else leaf for key, (path, leaf) in zip(keys, leaves)])


def test_pdt_head_drops_the_mu_and_logsigma_updates_in_training(batch):
    """SPEC 3.2's dropouts after the mu / logsigma projections and after each MLP's second Linear: with every
    unit dropped (rate 1) and non-zero biases, training mode leaves mu = X and logsigma = 0 exactly, while
    evaluation mode adds the biases' contributions."""
    head = PDTHead(dim=D, num_heads=2, dropout=1.0)
    x, mask = as_jnp(batch["T"], batch["word_mask"])
    params = head.init(jax.random.PRNGKey(0), x, mask, deterministic=True)["params"]
    params = _random_biases(params)
    apply = jax.jit(lambda p, deterministic: head.apply({"params": p}, x, mask, deterministic=deterministic,
                                                        rngs={"dropout": jax.random.PRNGKey(2)}), static_argnums=1)
    mu, logsigma = apply(params, False)
    np.testing.assert_array_equal(mu, x)
    np.testing.assert_array_equal(logsigma, 0.0)
    mu_eval, logsigma_eval = apply(params, True)
    assert float(jnp.abs(mu_eval - x).min()) > 0 and float(jnp.abs(logsigma_eval).min()) > 0


def test_pdt_head_gelus_are_exact(batch):
    """SPEC 3.2's GELUs (after the input projection and inside each MLP) are the exact x * Phi(x), as torch's
    nn.GELU() is, not the tanh approximation: with an input projection and MLP first layers of weights N(0, 1)
    the pre-activations span several units, where the two differ by a few 1e-4, and each GELU's output (the
    input LayerNorm's and the second Linears' inputs, recorded) is checked against math.erf."""
    head = PDTHead(dim=D, num_heads=2, dropout=0.0)
    x, mask = as_jnp(batch["T"], batch["word_mask"])
    params = head.init(jax.random.PRNGKey(0), x, mask, deterministic=True)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf * 50.0 if any(name in jax.tree_util.keystr(path) for name in ("input_proj", "fc_in"))
        else leaf, params)
    inputs = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = "/".join(context.module.scope.path)
        if context.method_name == "__call__" and path in (
                "input_proj", "input_norm", "mu_mlp/fc_in", "mu_mlp/fc_out", "logsigma_mlp/fc_in", "logsigma_mlp/fc_out"):
            inputs[path] = (np.asarray(args[0], np.float64), np.asarray(out, np.float64))
        return out

    with nn.intercept_methods(record):
        head.apply({"params": params}, x, mask, deterministic=True)
    exact = np.vectorize(lambda a: 0.5 * a * (1.0 + math.erf(a / math.sqrt(2.0))))
    for before, after in (("input_proj", "input_norm"), ("mu_mlp/fc_in", "mu_mlp/fc_out"),
                          ("logsigma_mlp/fc_in", "logsigma_mlp/fc_out")):
        pre_activation = inputs[before][1]
        assert np.abs(pre_activation).max() > 2.0, before
        np.testing.assert_allclose(inputs[after][0], exact(pre_activation), rtol=1e-5, atol=1e-6, err_msg=after)


def test_pdt_head_dropouts_act_on_the_attention_probabilities_and_inside_each_mlp(batch):
    """SPEC 3.2's other PDT dropouts, each replaced in turn (an intercepted Dropout returns its input times a
    chosen factor, the others pass their input on): the attention dropout receives the (B, H, N, N) softmax
    probabilities (each query's row sums to 1, padding keys 0), and zeroing it leaves the head as zeroing both
    projection dropouts does (projection biases 0: no attention output gives no mu / logsigma update). In each
    MLP the first dropout sits after the GELU and before the second Linear (zeroing it leaves that Linear's bias
    as the MLP's output, doubling it doubles the second Linear's weighted part: 2 * kept - zeroed) and the second
    one on the MLP's output (doubling it adds the MLP's output once more)."""
    head = PDTHead(dim=D, num_heads=2, dropout=0.5)
    x, mask = as_jnp(batch["T"], batch["word_mask"])
    params = head.init(jax.random.PRNGKey(0), x, mask, deterministic=True)["params"]
    params = _random_biases(params, scale=lambda path: 0.0 if "_proj']" in path else 1.0)
    assert float(jnp.abs(params["mu_mlp"]["fc_out"]["bias"]).min()) > 0

    paths = ["attention/attention_dropout", "Dropout_0", "Dropout_1"] + [
        f"{m}/Dropout_{i}" for m in ("mu_mlp", "logsigma_mlp") for i in (0, 1)]

    @jax.jit
    def forward(multipliers):
        seen = {}

        def replace(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
                path = "/".join(context.module.scope.path)
                seen[path] = args[0]
                return args[0] * multipliers[paths.index(path)]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(replace):
            (mu, logsigma), state = head.apply({"params": params}, x, mask, deterministic=False,
                                               mutable=["intermediates"])
        seen["sown"] = state["intermediates"]["attention"]["attention"][0]
        return mu, logsigma, seen

    def run(factors):
        """factors: {Dropout scope path: multiplier}, the others 1; returns (mu, logsigma, {path: input})."""
        mu, logsigma, seen = forward(jnp.asarray([factors.get(path, 1.0) for path in paths]))
        return np.asarray(mu), np.asarray(logsigma), seen

    mu, logsigma, seen = run({})
    assert sorted(seen) == sorted(paths + ["sown"])
    mu_eval, logsigma_eval = head.apply({"params": params}, x, mask, deterministic=True)
    np.testing.assert_allclose(mu, mu_eval, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logsigma, logsigma_eval, rtol=1e-5, atol=1e-6)

    probs = np.asarray(seen["attention/attention_dropout"])
    assert probs.shape == (B, 2, W, W)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(probs * (1 - np.asarray(batch["word_mask"]))[:, None, None, :], 0.0)
    np.testing.assert_array_equal(probs, seen["sown"])

    no_attention = run({"attention/attention_dropout": 0.0})
    no_updates = run({"Dropout_0": 0.0, "Dropout_1": 0.0})
    np.testing.assert_allclose(no_attention[0], no_updates[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(no_attention[1], no_updates[1], rtol=1e-6, atol=1e-6)
    assert np.abs(no_attention[0] - mu).max() > 1e-3 and np.abs(no_attention[1] - logsigma).max() > 1e-3

    for name, index in (("mu_mlp", 0), ("logsigma_mlp", 1)):
        other = 1 - index
        kept = (mu, logsigma)
        zero_hidden, double_hidden = run({f"{name}/Dropout_0": 0.0}), run({f"{name}/Dropout_0": 2.0})
        zero_out, double_out = run({f"{name}/Dropout_1": 0.0}), run({f"{name}/Dropout_1": 2.0})
        fc_out_bias = np.asarray(params[name]["fc_out"]["bias"])
        np.testing.assert_allclose(zero_hidden[index] - zero_out[index], np.broadcast_to(fc_out_bias, mu.shape),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(double_hidden[index], 2 * kept[index] - zero_hidden[index], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(double_out[index], 2 * kept[index] - zero_out[index], rtol=1e-5, atol=1e-5)
        assert np.abs(zero_out[index] - kept[index]).max() > 1e-3
        for result in (zero_hidden, double_hidden, zero_out, double_out):
            np.testing.assert_array_equal(result[other], kept[other])


def _ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs of a and b."""
    a, b = np.sort(np.ravel(a)), np.sort(np.ravel(b))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size)))


def test_heads_and_text_mask_decoder_start_as_the_authors_torch_layers():
    """The heads' Dense layers and the text-mask decoder's convs are initialised as the authors' nn.Linear,
    nn.Conv1d (the local head) and nn.Conv2d, which keep torch's default: the same distribution of
    weights and biases as torch's own layers of those shapes (two-sample KS distance below the 0.1 %
    critical value; flax's lecun-normal kernels and zero biases are far beyond it)."""
    torch = pytest.importorskip("torch")
    from amvlm_jax.models.text_mask import TextMaskDecoder

    torch.manual_seed(0)
    inputs, hidden, out, channels = 48, 256, 32, 24

    def critical(n, m):  # KS distance at p = 0.001.
        return 1.95 * math.sqrt((n + m) / (n * m))

    def check(ours, theirs):
        ours, theirs = np.asarray(ours), theirs.detach().numpy()
        assert _ks_distance(ours, theirs) < critical(ours.size, theirs.size), ours.shape

    for head, layer in ((GlobalHead(hidden=hidden, out=out), torch.nn.Linear),
                        (LocalHead(hidden=hidden, out=out), lambda i, o: torch.nn.Conv1d(i, o, 1))):
        x = jnp.zeros((2, inputs)) if isinstance(head, GlobalHead) else jnp.zeros((2, 3, inputs))
        params = head.init(jax.random.PRNGKey(1), x, train=False)["params"]["projection"]
        for name, (fan_in, width) in (("dense_hidden", (inputs, hidden)), ("dense_out", (hidden, out))):
            reference = layer(fan_in, width)
            check(params[name]["kernel"], reference.weight)
            check(params[name]["bias"], reference.bias)
    decoder = TextMaskDecoder().init(jax.random.PRNGKey(2), jnp.zeros((1, 2, 2, channels)))["params"]
    reference = torch.nn.Conv2d(channels, channels, 3, padding=1)
    for block in ("block_0", "block_1"):
        check(decoder[block]["conv"]["kernel"], reference.weight)
        check(decoder[block]["conv"]["bias"], reference.bias)
