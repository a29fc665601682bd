"""Parity with the authors' PyTorch code on fixed inputs (../shared/parity).

Every fixture except unet.npz (tested with the U-Net) is loaded into the
project's Flax modules and pure functions, and outputs and intermediates
are compared at |ours - theirs| <= 1e-5 + 1e-4 |theirs|. Where a SPEC 8
deviation touches a quantity, the test first rebuilds the authors' variant
from the project's own building blocks (their soft attention masks, their
broadcast Wasserstein form, their head reuse, ...), matches it, and a
separate test shows that the project's own behaviour differs as the SPEC
says. Torch layouts: Linear weight (out, in) -> Flax kernel (in, out);
images NCHW -> NHWC.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amvlm_jax.losses.alignment import local_alignment_loss, variance_token_weights
from amvlm_jax.losses.contrastive import (
    MASKED_LOGIT,
    PDTOutputs,
    _diagonal_log_probs,
    _pairwise_squared_distances,
    clipped_token_weights,
    cross_modal_contexts,
    ita_loss,
    pdt_constraint,
    token_alignment_from_similarity,
    token_alignment_loss,
    token_similarity,
)
from amvlm_jax.losses.intra import icl_loss
from amvlm_jax.losses.segmentation import DICE_SMOOTH, dice_loss, weighted_bce
from amvlm_jax.losses.text_guided import text_guided_loss
from amvlm_jax.ops import l2_normalize
from amvlm_jax.models.pdt import PDTHead
from amvlm_jax.models.text_mask import KEY_POINT_SHARPNESS, KEY_POINT_THRESHOLD, KEY_POINT_WEIGHT, pamr, text_masks

ATOL, RTOL = 1e-5, 1e-4
# The authors' additive attention mask: (1 - keep) * MASK_SCALE (their get_extended_attention_mask).
MASK_SCALE = -10000.0


def close(ours, theirs, name=""):
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=ATOL, rtol=RTOL, err_msg=name)


def differs(ours, theirs, name="", margin=1e-3):
    """The project's value is clearly not the authors' (a SPEC 8 deviation)."""
    assert np.max(np.abs(np.asarray(ours) - theirs)) > margin, name


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


def pdt_params(arrays: dict, prefix: str) -> dict:
    """The authors' DisTrans state_dict (names under ``prefix``) as ``PDTHead`` params."""

    def dense(name, bias=True):
        params = {"kernel": arrays[f"{prefix}{name}.weight"].T}
        if bias:
            params["bias"] = arrays[f"{prefix}{name}.bias"]
        return params

    def norm(name):
        return {"scale": arrays[f"{prefix}{name}.weight"], "bias": arrays[f"{prefix}{name}.bias"]}

    return {
        "input_proj": dense("fc"),
        "input_norm": norm("norm1"),
        "attention": {"qkv": dense("attn.qkv", bias=False)},
        "mu_proj": dense("attn.mu_proj"),
        "logsigma_proj": dense("attn.logsig_proj"),
        "mu_norm": norm("norm2"),
        "logsigma_norm": norm("norm3"),
        "mu_mlp": {"fc_in": dense("mu_mlp.fc1"), "fc_out": dense("mu_mlp.fc2")},
        "logsigma_mlp": {"fc_in": dense("logsig_mlp.fc1"), "fc_out": dense("logsig_mlp.fc2")},
    }


@jax.jit
def apply_pdt(params, x, mask, attention_bias=None):
    """Eval-mode PDT head -> (mu, logsigma, attention probabilities (B, H, N, N))."""
    (mu, logsigma), state = PDTHead().apply(
        {"params": params}, x, mask, True, attention_bias, mutable=["intermediates"]
    )
    return mu, logsigma, state["intermediates"]["attention"]["attention"][0]


def broadcast_form(pairwise):
    """SPEC 8.8: the authors' value at (i, j) is the pairwise one at (j, j), for every row i."""
    diagonal = jnp.diagonal(pairwise, axis1=-2, axis2=-1)
    return jnp.broadcast_to(diagonal[..., None, :], pairwise.shape)


def pairwise_w2(pdt: PDTOutputs):
    """The project's pairwise (W2, semantic) terms of ``pdt_constraint``, each (B, N, N)."""
    semantic = _pairwise_squared_distances(pdt.token_mu, pdt.context_mu)
    return semantic + _pairwise_squared_distances(pdt.token_logsigma, pdt.context_logsigma), semantic


def authors_similarity(similarity, pdt: PDTOutputs):
    """S' = 1 - (1 - S) * c with their broadcast constraint (SPEC 8.8); also returns it."""
    constraint = broadcast_form(pdt_constraint(pdt))
    return 1.0 - (1.0 - similarity) * constraint, constraint


def direction_losses(similarity, weights):
    """Their loss_*_1 (rows: CE over contexts) and loss_*_2 (CE over tokens), each
    sum(weight * CE) / B, from the project's diagonal log-softmax."""
    batch = similarity.shape[0]
    forward = jnp.sum(weights * -_diagonal_log_probs(similarity, axis=-1)) / batch
    backward = jnp.sum(weights * -_diagonal_log_probs(similarity, axis=-2)) / batch
    return forward, backward


def authors_global_intra(mu1, sigma1, mu2, sigma2, a, temperature):
    """Their Wasserstein2_global_intra_modal_loss (SPEC 8.6): symmetric InfoNCE over
    logits (-a W2[i, j] + b) / temp with pairwise W2 of the two sets (b cancels in
    the softmax), from the project's pairwise distances and two-direction loss."""
    w2 = _pairwise_squared_distances(mu1[None], mu2[None]) + _pairwise_squared_distances(sigma1[None], sigma2[None])
    batch = mu1.shape[0]
    return token_alignment_from_similarity(-a * w2 / temperature, jnp.full((1, batch), 1.0 / batch))


def authors_local_side(tokens, globals_, temperature):
    """Their local alignment side: variance weights over every slot, padding
    included (SPEC 8.7), times the batch-mean cross-entropy of each token slot
    (SPEC 8.9); / (N B). Returns (loss, weights (B, N))."""
    similarity = jnp.einsum("bnd,jd->bnj", tokens, globals_)
    weights = variance_token_weights(similarity, None)
    # (N, B, B) logits of token slot n of sample b over globals j; CE read at j = b.
    cross_entropy = -_diagonal_log_probs(jnp.swapaxes(similarity, 0, 1) / temperature, axis=-1)  # (N, B)
    return jnp.sum(weights * jnp.mean(cross_entropy, axis=-1)[None, :]) / weights.size, weights


def authors_in_place_clip(attention):
    """Their clip of each sample's nonzero attention to its [10%, 90%] quantiles,
    left unnormalised (it is written into word_attn, which then builds the masks)."""
    clipped = attention.copy()
    for row in clipped:
        nonzero = row != 0
        low, high = np.quantile(row[nonzero], [0.1, 0.9])
        row[nonzero] = np.clip(row[nonzero], low, high)
    return clipped


# ---------------------------------------------------------------------------
# PDT head (distrans.npz)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distrans(parity):
    arrays, meta = parity("distrans.npz")
    assert (meta["dim"], meta["num_heads"], meta["qkv_bias"], meta["layernorm_eps"]) == (128, 8, False, 1e-5)
    return arrays, pdt_params(arrays, "param/")


def test_distrans_parameter_layout(distrans):
    """Their state_dict fills exactly the project's parameter tree: no output projection."""
    arrays, params = distrans
    init = jax.eval_shape(lambda x, keep: PDTHead().init(jax.random.PRNGKey(0), x, keep, True), arrays["in/x"],
                          arrays["in/keep"])
    assert "out_proj" not in init["params"]["attention"]
    assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(np.shape, init["params"])


@pytest.mark.parametrize("variant", ["", "_nomask"])
def test_distrans_binary_and_no_mask(distrans, variant):
    arrays, params = distrans
    keep = arrays["in/keep"] if variant == "" else np.ones_like(arrays["in/keep"])
    if variant == "":
        close((1.0 - keep) * MASK_SCALE, arrays["in/mask_additive"][:, 0, 0])
    mu, logsigma, attention = apply_pdt(params, arrays["in/x"], keep)
    close(mu, arrays[f"out/mu{variant}"], "mu")
    close(logsigma, arrays[f"out/logsigma{variant}"], "logsigma")
    close(attention, arrays[f"out/attn{variant}"], "attention")


def test_distrans_soft_attention_weight_mask(distrans):
    """SPEC 8.13 undone: their additive mask (1 - w) * -10000 from attention
    weights w, passed as the head's attention bias with every key kept."""
    arrays, params = distrans
    bias = (1.0 - arrays["in/keep_soft"]) * MASK_SCALE
    close(bias, arrays["in/mask_additive_soft"][:, 0, 0])
    mu, logsigma, attention = apply_pdt(params, arrays["in/x"], np.ones_like(bias), bias)
    close(mu, arrays["out/mu_soft"], "mu")
    close(logsigma, arrays["out/logsigma_soft"], "logsigma")
    close(attention, arrays["out/attn_soft"], "attention")


def test_distrans_binary_mask_deviation(distrans):
    """SPEC 8.13: the project masks with the binary token mask; with their soft
    weights the attention is nearly one-hot and the outputs differ."""
    arrays, params = distrans
    keep = (arrays["in/keep_soft"] > 0).astype(np.float32)
    mu, logsigma, attention = apply_pdt(params, arrays["in/x"], keep)
    differs(mu, arrays["out/mu_soft"], "mu")
    differs(attention, arrays["out/attn_soft"], "attention", margin=0.1)
    assert np.max(arrays["out/attn_soft"]) > 0.99 > np.max(np.asarray(attention))


# ---------------------------------------------------------------------------
# Wasserstein constraint (wasserstein2.npz)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wasserstein(parity):
    arrays, _ = parity("wasserstein2.npz")
    pdt = PDTOutputs(*(jnp.asarray(arrays[f"in/{k}"]) for k in ("mu1", "sigma1", "mu2", "sigma2")))
    return arrays, pdt


def test_wasserstein2_broadcast_form(wasserstein):
    """SPEC 8.8 undone: their W2, its semantic part and the constraint are the
    project's pairwise values at (j, j), repeated along the rows."""
    arrays, pdt = wasserstein
    w2, semantic = pairwise_w2(pdt)
    close(broadcast_form(w2), arrays["out/w2"], "w2")
    close(broadcast_form(semantic), arrays["out/p1"], "p1")
    close(broadcast_form(pdt_constraint(pdt)), arrays["out/constraint"], "constraint")


def test_wasserstein2_pairwise_deviation(wasserstein):
    """SPEC 8.8: the project compares every token i with every context j; only
    the diagonal coincides with theirs, whose rows are all equal."""
    arrays, pdt = wasserstein
    constraint = np.asarray(pdt_constraint(pdt))
    theirs = arrays["out/constraint"]
    assert np.all(theirs == theirs[:, :1, :])
    close(np.diagonal(constraint, axis1=1, axis2=2), np.diagonal(theirs, axis1=1, axis2=2))
    differs(constraint, theirs, "constraint", margin=0.05)
    assert np.ptp(constraint, axis=1).max() > 0.05  # rows differ


# ---------------------------------------------------------------------------
# The authors' intra-modal losses (SPEC 8.6: reference only)
# ---------------------------------------------------------------------------


def test_wasserstein2_global_intra_reference(parity):
    """SPEC 8.6: the project's ICL follows the paper (online CLS against the
    momentum view, per modality) and has no Wasserstein score; their loss is
    rebuilt here from the project's pairwise distances and InfoNCE."""
    arrays, meta = parity("wasserstein2_global_intra.npz")
    inputs = (jnp.asarray(arrays[f"in/{k}"]) for k in ("mu1", "sigma1", "mu2", "sigma2"))
    close(authors_global_intra(*inputs, meta["a"], meta["temp"]), arrays["out/loss"])


def authors_local_intra_modal_loss(tokens, cls, temperature, token_mask=None):
    """Their CLS-to-token intra-modal loss (SPEC 8.6), restated: token p of sample n is scored against its
    own CLS, c_n . l_{n, p} / tau, and that against the CLS's scores with every real token of the other
    samples, c_n . l_{b, q} / tau (b != n); -log softmax of the own score, averaged over a sample's real
    tokens, then over samples. tokens (B, S, D), cls (B, D), token_mask (B, S) or None."""
    batch, slots, _ = tokens.shape
    is_real = jnp.ones((batch, slots), bool) if token_mask is None else token_mask.astype(bool)
    own = jnp.einsum("npd,nd->np", tokens, cls) / temperature  # (B, S)
    others = jnp.einsum("nd,bqd->nbq", cls, tokens) / temperature  # (B, B, S): CLS n against token (b, q).
    valid = ~jnp.eye(batch, dtype=bool)[:, :, None] & is_real[None]
    others = jnp.where(valid, others, MASKED_LOGIT).reshape(batch, 1, batch * slots)
    logits = jnp.concatenate([own[..., None], jnp.broadcast_to(others, (batch, slots, batch * slots))], axis=-1)
    own_log_probs = jax.nn.log_softmax(logits, axis=-1)[..., 0]
    per_sample = jnp.sum(jnp.where(is_real, -own_log_probs, 0.0), axis=1) / jnp.sum(is_real, axis=1)
    return jnp.mean(per_sample)


def test_local_intra_modal_loss_reference(parity):
    """SPEC 8.6: their GLoRIA-style CLS-to-token loss is rebuilt and matches; the project's ICL (the
    paper's fine term: online CLS c_i against momentum tokens z'_{j, p} of the same slot) runs on the
    same inputs (unmasked and masked) and gives another value."""
    arrays, meta = parity("local_intra_modal_loss.npz")
    tokens, cls, mask = (jnp.asarray(arrays[k]) for k in ("in/l", "in/m", "in/attention_mask"))
    assert not np.all(arrays["in/attention_mask"])  # The masked case has padding to leave out.
    theirs = np.array([arrays["out/loss"], arrays["out/loss_masked"]])
    rebuilt = [authors_local_intra_modal_loss(tokens, cls, meta["temp"], token_mask) for token_mask in (None, mask)]
    close(rebuilt, theirs, "their local intra-modal loss, unmasked and masked")
    ours = np.array([icl_loss(cls, cls, tokens, token_mask, meta["temp"]) for token_mask in (None, mask)])
    assert np.all(np.isfinite(ours)) and ours[0] != ours[1]
    differs(ours, theirs, "icl vs their local intra-modal loss")


# ---------------------------------------------------------------------------
# Pre-training forward: ITA, CSS (word and patch sides), local, intra
# ---------------------------------------------------------------------------


@jax.jit
def authors_forward(x: dict, params: dict) -> dict:
    """Their pre-training forward (eval mode) from the project's functions,
    undoing SPEC 8.5, 8.6, 8.7, 8.8, 8.9 and 8.13; keys as the fixture's mid/."""
    tau, T, V, v, t = x["tau"], x["T"], x["V"], x["v"], x["t"]
    all_words, all_patches = jnp.ones(T.shape[:2]), jnp.ones(V.shape[:2])
    ours = {"loss_ori": ita_loss(v, t, tau)}
    word_context, patch_context = cross_modal_contexts(T, V, x["word_mask"], tau)
    ours |= {"word_atten_output": word_context, "patch_atten_output": patch_context}
    ours["word_atten_weights"] = clipped_token_weights(x["word_attention"], x["word_mask"])
    ours["patch_atten_weights"] = clipped_token_weights(x["patch_attention"], all_patches)

    # SPEC 8.13: their word heads' additive masks come from attention weights.
    text_mu, text_logsigma, _ = apply_pdt(params["text_gau_encoder"], T, all_words, x["text_bias"])
    ctx_mu, ctx_logsigma, _ = apply_pdt(params["text_gau_encoder_atten"], word_context, all_words, x["text_bias"])
    img_mu, img_logsigma, _ = apply_pdt(params["img_gau_encoder"], V, all_patches)
    # SPEC 8.5: their patch side reuses the word context head.
    img_ctx_mu, img_ctx_logsigma, _ = apply_pdt(params["text_gau_encoder_atten"], patch_context, all_patches)
    ours |= {"text_mu": text_mu, "text_logsigma": text_logsigma, "text_mu_atten": ctx_mu,
             "text_logsigma_atten": ctx_logsigma, "img_mu": img_mu, "img_logsigma": img_logsigma,
             "img_mu_atten": img_ctx_mu, "img_logsigma_atten": img_ctx_logsigma}

    for side, prefix, tokens, context, head in (
        ("word", "word", T, word_context, (text_mu, text_logsigma, ctx_mu, ctx_logsigma)),
        ("patch", "img", V, patch_context, (img_mu, img_logsigma, img_ctx_mu, img_ctx_logsigma)),
    ):
        pdt = PDTOutputs(*head)
        w2, semantic = pairwise_w2(pdt)
        similarity = token_similarity(tokens, context, tau)
        # SPEC 8.8: their constraint is the broadcast form.
        constrained, constraint = authors_similarity(similarity, pdt)
        n = similarity.shape[-1]
        ours |= {
            f"{side}_sim": similarity,
            f"{prefix}_uncertainty": broadcast_form(w2),
            f"{prefix}_semantic": broadcast_form(semantic),
            f"{side}_sim_1": constrained.reshape(-1, n),
            f"{side}_sim_2": jnp.swapaxes(constrained, 1, 2).reshape(-1, n),
        }
        if side == "word":  # the fixture keeps the constraint of the word side only
            ours["word_constraint_1"] = constraint.reshape(-1, n)
            ours["word_constraint_2"] = jnp.swapaxes(constraint, 1, 2).reshape(-1, n)
        weights = ours[f"{side}_atten_weights"]
        ours[f"loss_{side}_1"], ours[f"loss_{side}_2"] = direction_losses(constrained, weights)
        # SPEC 8.7: their word side keeps padding words as candidates (no token mask).
        ours[f"loss_{side}"] = token_alignment_from_similarity(constrained, weights, None)
    ours["loss_global"] = 0.5 * (ours["loss_word"] + ours["loss_patch"])

    # SPEC 8.7 and 8.9 undone in the local alignment.
    ours["loss_patch2report"], ours["l_patch_weight"] = authors_local_side(V, t, tau)
    ours["loss_word2img"], ours["l_word_weight"] = authors_local_side(T, v, tau)
    ours["loss_local"] = ours["loss_patch2report"] + ours["loss_word2img"]

    # SPEC 8.6 (reference): their intra-modal branch. The text view reuses
    # text_gau_encoder, with the soft mask of word_aug_attn_all (col 0 = CLS).
    ours["text_aug_mu"], ours["text_aug_logsigma"], _ = apply_pdt(
        params["text_gau_encoder"], x["aug_text"], jnp.ones(x["aug_text"].shape[:2]), x["aug_bias"])
    ours["img_aug_mu"], ours["img_aug_logsigma"], _ = apply_pdt(
        params["img_aug_gau_encoder"], x["aug_image"], jnp.ones(x["aug_image"].shape[:2]))
    ours["intra_global_loss"] = authors_global_intra(
        ours["img_aug_mu"][:, 0], ours["img_aug_logsigma"][:, 0],
        ours["text_aug_mu"][:, 0], ours["text_aug_logsigma"][:, 0], 1.0 / 200.0, tau)
    # Their CLS-to-token term on one N(0, 1) draw shared by every entry (no padding mask on either side).
    for side in ("img", "text"):
        sampled = ours[f"{side}_aug_mu"] + x["sample_value"] * ours[f"{side}_aug_logsigma"]
        ours[f"intra_local_loss_{side}"] = authors_local_intra_modal_loss(sampled[:, 1:], sampled[:, 0], tau)
    ours["loss_intra"] = 0.5 * (ours["intra_global_loss"]
                                + 0.5 * (ours["intra_local_loss_img"] + ours["intra_local_loss_text"]))
    return ours


@pytest.fixture(scope="module")
def css(parity):
    """(arrays, ours, inputs, params) of global_css_forward.npz; ours from ``authors_forward``."""
    arrays, meta = parity("global_css_forward.npz")
    assert "l_patch_sim variance uses cat(x[:, :b], x[:, b:]) = the whole row (positive not excluded)" in meta["quirks"]
    word_attention = arrays["in/word_attn_all"][:, 1:]
    # Their clip writes into word_attn, which then builds the word heads' masks.
    clipped = authors_in_place_clip(word_attention)
    inputs = {
        "tau": arrays["in/temperature"],
        "T": arrays["in/word_emb"],
        "V": arrays["in/patch_emb"],
        "v": arrays["in/img_emb"],
        "t": arrays["in/report_emb"],
        "word_mask": (~arrays["in/pad_mask"]).astype(np.float32),
        "word_attention": word_attention,
        "patch_attention": arrays["in/img_attn_map"][:, :, 0, 1:].mean(axis=1),  # CLS row, mean over heads
        "text_bias": (1.0 - clipped) * MASK_SCALE,
        "aug_bias": (1.0 - arrays["in/word_aug_attn_all"]) * MASK_SCALE,
        "aug_text": np.concatenate([arrays["in/report_aug_emb"][:, None], arrays["in/word_aug_emb"]], axis=1),
        "aug_image": np.concatenate([arrays["in/img_aug_emb"][:, None], arrays["in/patch_aug_emb"]], axis=1),
        "sample_value": arrays["in/sample_value"],
    }
    params = {name: pdt_params(arrays, f"param/{name}.") for name in (
        "text_gau_encoder", "text_gau_encoder_atten", "img_gau_encoder", "img_gau_encoder_atten",
        "img_aug_gau_encoder")}
    ours = dict(authors_forward(inputs, params))
    ours |= {
        "atten_weights": inputs["patch_attention"],
        "word_attn_after_inplace_clip": clipped,
        "extend_text_masks": inputs["text_bias"][:, None, None, :],
        "extend_text_masks_aug": inputs["aug_bias"][:, None, None, :],
    }
    return arrays, ours, inputs, params


CSS_GROUPS = {
    "ita": ["loss_ori"],
    "contexts_and_weights": ["word_atten_output", "patch_atten_output", "atten_weights", "word_atten_weights",
                             "patch_atten_weights", "word_attn_after_inplace_clip", "extend_text_masks",
                             "word_sim", "patch_sim"],
    "pdt_heads": ["text_mu", "text_logsigma", "text_mu_atten", "text_logsigma_atten", "img_mu", "img_logsigma",
                  "img_mu_atten", "img_logsigma_atten"],
    "word_side": ["word_uncertainty", "word_semantic", "word_constraint_1", "word_constraint_2", "word_sim_1",
                  "word_sim_2", "loss_word_1", "loss_word_2", "loss_word"],
    "patch_side": ["img_uncertainty", "img_semantic", "patch_sim_1", "patch_sim_2", "loss_patch_1",
                   "loss_patch_2", "loss_patch", "loss_global"],
    "local": ["l_patch_weight", "loss_patch2report", "l_word_weight", "loss_word2img", "loss_local"],
    "intra": ["extend_text_masks_aug", "text_aug_mu", "text_aug_logsigma", "img_aug_mu", "img_aug_logsigma",
              "intra_global_loss", "intra_local_loss_img", "intra_local_loss_text", "loss_intra"],
}


@pytest.mark.parametrize("group", list(CSS_GROUPS))
def test_global_css_forward(css, group):
    arrays, ours, _, _ = css
    for name in CSS_GROUPS[group]:
        close(ours[name], arrays[f"mid/{name}"], name)


def test_global_css_forward_covers_every_intermediate(css):
    arrays, ours, _, _ = css
    checked = {name for names in CSS_GROUPS.values() for name in names}
    # Not rebuilt: their mask of padding words (the test's word_mask), an
    # all-zero image mask and the N(0, 1) draw (an input here).
    skipped = {"mask", "extend_image_masks", "sample_value"}
    assert {key[4:] for key in arrays if key.startswith("mid/")} == checked | skipped
    for name in ("loss_global", "loss_ori", "loss_local", "loss_word", "loss_patch", "loss_intra"):
        np.testing.assert_array_equal(arrays[f"out/{name}"], arrays[f"mid/{name}"], name)  # out/ repeats mid/
    np.testing.assert_array_equal(arrays["mid/mask"], arrays["in/pad_mask"])
    assert not np.any(arrays["mid/extend_image_masks"])
    np.testing.assert_array_equal(arrays["mid/sample_value"], arrays["in/sample_value"])


def test_patch_context_is_not_normalised(css):
    """SPEC 3.2: only the word side's context is normalised."""
    _, ours, _, _ = css
    norms = np.linalg.norm(np.asarray(ours["patch_atten_output"]), axis=-1)
    assert norms.max() < 0.99
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ours["word_atten_output"]), axis=-1), 1.0, rtol=1e-5)


@jax.jit
def project_forward(x: dict, params: dict) -> dict:
    """The project's own behaviour on the same inputs, one SPEC 8 item at a time."""
    tau, T, V, v, t, word_mask = x["tau"], x["T"], x["V"], x["v"], x["t"], x["word_mask"]
    all_words, all_patches = jnp.ones(T.shape[:2]), jnp.ones(V.shape[:2])
    word_context, patch_context = cross_modal_contexts(T, V, word_mask, tau)
    weights = clipped_token_weights(x["word_attention"], word_mask)
    ours = {}
    # SPEC 8.13: binary word mask; SPEC 8.5: the patch context head is its own
    # (the authors' unused img_gau_encoder_atten).
    ours["text_mu"], _, _ = apply_pdt(params["text_gau_encoder"], T, word_mask)
    ours["img_mu_atten"], _, _ = apply_pdt(params["img_gau_encoder_atten"], patch_context, all_patches)
    # SPEC 8.8 alone (their heads, no padding mask): pairwise constraint.
    text_mu, text_logsigma, _ = apply_pdt(params["text_gau_encoder"], T, all_words, x["text_bias"])
    ctx_mu, ctx_logsigma, _ = apply_pdt(params["text_gau_encoder_atten"], word_context, all_words, x["text_bias"])
    pdt = PDTOutputs(text_mu, text_logsigma, ctx_mu, ctx_logsigma)
    ours["word_sim_1"] = token_similarity(T, word_context, tau, pdt).reshape(-1, T.shape[1])
    ours["loss_word_pairwise"] = token_alignment_loss(T, word_context, weights, None, tau, pdt)
    # SPEC 8.7 alone (their broadcast constraint): padding words are no candidates.
    constrained, _ = authors_similarity(token_similarity(T, word_context, tau), pdt)
    ours["loss_word_masked"] = token_alignment_from_similarity(constrained, weights, word_mask)
    # SPEC 8.9 alone (every word slot real): each sample's own cross-entropy.
    ours["local_own"] = local_alignment_loss(V, t, T, v, all_words, tau)
    expected = 0.0
    for tokens, globals_ in ((V, t), (T, v)):
        similarity = jnp.einsum("bnd,jd->bnj", tokens, globals_)
        cross_entropy = -_diagonal_log_probs(jnp.swapaxes(similarity, 0, 1) / tau, axis=-1).T  # (B, N)
        expected += jnp.sum(variance_token_weights(similarity, None) * cross_entropy) / cross_entropy.size
    ours["local_own_expected"] = expected
    # SPEC 8.7 in the local alignment.
    ours["l_word_weight"] = variance_token_weights(jnp.einsum("bnd,jd->bnj", T, v), word_mask)
    ours["local_masked"] = local_alignment_loss(V, t, T, v, word_mask, tau)
    return ours


@pytest.fixture(scope="module")
def project_css(css):
    arrays, _, inputs, params = css
    return arrays, project_forward(inputs, params), inputs


def test_css_pdt_head_deviations(project_css):
    """SPEC 8.13: binary word masks change the word heads' outputs. SPEC 8.5:
    the project's patch context head is its own, not the word context head."""
    arrays, ours, _ = project_css
    differs(ours["text_mu"], arrays["mid/text_mu"], "8.13")
    differs(ours["img_mu_atten"], arrays["mid/img_mu_atten"], "8.5")


def test_css_word_side_deviations(project_css):
    """SPEC 8.8: the project's pairwise constraint; SPEC 8.7: padding words are
    no candidates. Each changes the word side on its own."""
    arrays, ours, _ = project_css
    differs(ours["word_sim_1"], arrays["mid/word_sim_1"], "8.8", margin=0.05)
    differs(ours["loss_word_pairwise"], arrays["mid/loss_word"], "8.8 loss", margin=1e-3)
    differs(ours["loss_word_masked"], arrays["mid/loss_word"], "8.7", margin=1e-2)


def test_local_alignment_deviations(project_css):
    """SPEC 8.9: the project weights each sample's own cross-entropy; SPEC 8.7:
    padding words get no weight and no term."""
    arrays, ours, inputs = project_css
    close(ours["local_own"], ours["local_own_expected"], "own cross-entropy")
    differs(ours["local_own"], arrays["mid/loss_local"], "8.9", margin=1e-2)
    padding = inputs["word_mask"] == 0
    assert np.all(np.asarray(ours["l_word_weight"])[padding] == 0)
    assert np.max(arrays["mid/l_word_weight"][padding]) > 0.999
    differs(ours["local_masked"], ours["local_own"], "8.7", margin=1e-2)


# ---------------------------------------------------------------------------
# Text mask generator: PAMR (pamr.npz) and L_tg (extended_infonce.npz)
# ---------------------------------------------------------------------------


def test_pamr(parity):
    arrays, meta = parity("pamr.npz")
    image = np.transpose(arrays["in/image"], (0, 2, 3, 1))
    masks = np.transpose(arrays["in/mask"], (0, 2, 3, 1))
    refined = pamr(image, masks, meta["num_iter"], meta["dilations"])
    close(np.transpose(np.asarray(refined), (0, 3, 1, 2)), arrays["out/mask_refined"])
    # Their stencils: 8 centre-minus-neighbour kernels, 9 values for the std.
    assert np.all(arrays["param/aff_x.kernel"].sum(axis=(1, 2, 3)) == 0)
    assert arrays["param/aff_std.kernel"].shape[0] == 9


def test_text_mask_uses_refined_mask(parity):
    """SPEC 8.1: the text mask mixes the key points with PAMR's refined mask;
    their apply_pamr returns its input, so their mix uses the unrefined one."""
    arrays, _ = parity("pamr.npz")
    image = jnp.asarray(np.transpose(arrays["in/image"], (0, 2, 3, 1)))
    rng = np.random.default_rng(0)
    dense = l2_normalize(jnp.asarray(rng.normal(size=(1, 24, 24, 8)), jnp.float32), axis=-1)
    report = l2_normalize(jnp.asarray(rng.normal(size=(1, 8)), jnp.float32), axis=-1)
    out = text_masks(dense, report, image, image_size=24)  # 24 -> 24: the resizes are identities
    sim = out["sim"][:, 0]
    key_points = KEY_POINT_WEIGHT * jax.nn.sigmoid((sim - KEY_POINT_THRESHOLD) * KEY_POINT_SHARPNESS)
    refined = pamr(image, jax.nn.sigmoid(sim)[..., None])[..., 0]
    close(out["p_text"], key_points + (1.0 - KEY_POINT_WEIGHT) * refined, "refined mix")
    theirs = key_points + (1.0 - KEY_POINT_WEIGHT) * jax.nn.sigmoid(sim)
    differs(out["p_text"], np.asarray(theirs), "unrefined mix", margin=1e-2)


def test_extended_infonce(parity):
    """Their ExtendedInfoNCE takes pooled embeddings e[b, n]; the project pools
    inside L_tg, so each e[b, n] is laid out as pixel n of image b with a
    one-hot pooling weight (pooling then returns it up to a factor that the
    L2 normalisation removes). Reports are unit-norm in the project."""
    arrays, meta = parity("extended_infonce.npz")
    image_emb, text_emb = arrays["in/image_emb"], arrays["in/text_emb"]
    batch, num_reports, _ = image_emb.shape
    dense = jnp.asarray(image_emb[:, None])  # (B, 1, N, C)
    weights = jnp.broadcast_to(jnp.eye(num_reports)[None, :, None, :], (batch, num_reports, 1, num_reports))
    reports = l2_normalize(jnp.asarray(text_emb), axis=-1)
    np.testing.assert_allclose(arrays["param/logit_scale"], meta["logit_scale_init"], rtol=1e-6)
    close(text_guided_loss(dense, weights, reports, arrays["param/logit_scale"]), arrays["out/loss"])
    clamped = meta["logit_scale_clamped_case"]
    assert np.exp(clamped) > meta["clamp_max"]
    close(text_guided_loss(dense, weights, reports, clamped), arrays["out/loss_logit_scale_5"])


# ---------------------------------------------------------------------------
# Segmentation loss (weighted_dice_bce.npz)
# ---------------------------------------------------------------------------


def test_weighted_dice_bce(parity):
    """SPEC 6: their 0.5-weighted p and y with smoothing 1e-5 are the unscaled
    Dice with smoothing 4e-5; the project's BCE takes logits, so logit(p)."""
    arrays, meta = parity("weighted_dice_bce.npz")
    assert DICE_SMOOTH == pytest.approx(meta["dice_smooth"] / (meta["dice_weights"][0] * meta["dice_weights"][1]))
    probs, targets = jnp.asarray(arrays["in/probs"][:, 0]), jnp.asarray(arrays["in/targets"][:, 0])
    dice = dice_loss(probs, targets)
    bce = weighted_bce(jnp.log(probs) - jnp.log1p(-probs), targets)
    close(dice, arrays["out/dice"], "dice")
    close(bce, arrays["out/bce"], "bce")
    close(meta["dice_weight"] * dice + meta["BCE_weight"] * bce, arrays["out/loss"], "loss")
