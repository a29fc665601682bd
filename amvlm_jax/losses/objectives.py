"""The pre-training objectives: AMVLM's weighted sum of its four terms (SPEC 3.5) and MGCA's (SPEC 4),
pure functions of the model's outputs and the config's weights."""

from __future__ import annotations

import jax.numpy as jnp

from amvlm_jax.losses.alignment import local_alignment_loss
from amvlm_jax.losses.contrastive import clipped_token_weights, css_loss, cta_loss, ita_loss
from amvlm_jax.losses.intra import icl_loss
from amvlm_jax.losses.prototypes import cpa_loss


def token_weights(outputs: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Clipped, normalised word (B, W) and patch (B, P) weights from the CLS attentions."""
    word_weights = clipped_token_weights(outputs["word_attention"], outputs["word_mask"])
    patch_weights = clipped_token_weights(outputs["patch_attention"], jnp.ones_like(outputs["patch_attention"]))
    return word_weights, patch_weights


def _weighted_total(terms: dict, weights: dict) -> jnp.ndarray:
    return sum((weights[name] * value for name, value in terms.items()), jnp.zeros((), jnp.float32))


def amvlm_objective(outputs: dict, momentum_outputs: dict | None, config) -> tuple[jnp.ndarray, dict]:
    """L = w_ita L_ita + w_css L_css + w_local L_local + w_icl L_icl (SPEC 3.5).

    Args:
      outputs: ``AMVLM.__call__`` outputs of the online model (with word_pdt /
        patch_pdt when pretrain.use_pdt).
      momentum_outputs: ``encode_image`` (augmented view) | ``encode_text``
        outputs of the momentum encoders; needed only when the ICL weight is
        non-zero.
      config: reads pretrain.weights, temperature, use_pdt.

    Returns:
      (scalar loss, {term name: unweighted scalar}); a term whose weight is 0
      is neither computed nor returned.
    """
    pre = config.pretrain
    weights_ = dict(pre.weights)
    tau = pre.temperature
    terms = {}
    if weights_["ita"]:
        terms["ita"] = ita_loss(outputs["v"], outputs["t"], tau)
    if weights_["css"]:
        word_weights, patch_weights = token_weights(outputs)
        word_pdt = patch_pdt = None
        if pre.use_pdt:
            if "word_pdt" not in outputs:
                raise ValueError("pretrain.use_pdt is on but the outputs carry no PDT heads (call with with_pdt=True)")
            word_pdt, patch_pdt = outputs["word_pdt"], outputs["patch_pdt"]
        terms["css"] = css_loss(
            outputs["T"], outputs["word_context"], outputs["V"], outputs["patch_context"],
            word_weights, patch_weights, outputs["word_mask"], tau, word_pdt, patch_pdt,
        )
    if weights_["local"]:
        terms["local"] = local_alignment_loss(outputs["V"], outputs["t"], outputs["T"], outputs["v"], outputs["word_mask"], tau,
                                              pre.local_inversion)
    if weights_["icl"]:
        if momentum_outputs is None:
            raise ValueError("the ICL term needs the momentum encoders' outputs")
        image_term = icl_loss(outputs["v"], momentum_outputs["v"], momentum_outputs["V"], None, tau)
        text_term = icl_loss(outputs["t"], momentum_outputs["t"], momentum_outputs["T"], momentum_outputs["word_mask"], tau)
        terms["icl"] = 0.5 * (image_term + text_term)
    return _weighted_total(terms, weights_), terms


def mgca_objective(outputs: dict, momentum_outputs: dict | None, config) -> tuple[jnp.ndarray, dict]:
    """L = w_ita L_ita' + w_cta L_cta + w_cpa L_cpa (SPEC 4); momentum_outputs is unused.

    outputs: ``AMVLM(objective='mgca')`` outputs (with the prototype scores).
    Returns (scalar loss, {term: unweighted scalar}); zero-weight terms are skipped.
    """
    mgca = config.pretrain.mgca
    weights_ = {"ita": mgca.ita, "cta": mgca.cta, "cpa": mgca.cpa}
    terms = {}
    if weights_["ita"]:
        terms["ita"] = ita_loss(outputs["v"], outputs["t"], config.pretrain.temperature, reduce="sum")
    if weights_["cta"]:
        word_weights, patch_weights = token_weights(outputs)
        # MGCA's padding words are candidates with the embedding its head gives their zero feature.
        terms["cta"] = cta_loss(outputs["T_unmasked"], outputs["V"], word_weights, patch_weights, outputs["word_mask"],
                                mgca.cta_temperature)
    if weights_["cpa"]:
        terms["cpa"] = cpa_loss(
            outputs["image_prototype_scores"], outputs["text_prototype_scores"],
            mgca.sinkhorn_epsilon, mgca.sinkhorn_iterations, mgca.prototype_temperature,
        )
    return _weighted_total(terms, weights_), terms


def objective_fn(config):
    return amvlm_objective if config.pretrain.objective == "amvlm" else mgca_objective
