"""The vision-language model built from the config: its encoders, heads, attention kernel and token
shapes. Shared by pre-training, the SSMIS job's text guidance, the tools and the benchmark."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from amvlm_jax import hub, weights
from amvlm_jax.config import ConfigError
from amvlm_jax.models.amvlm import AMVLM, ENCODER_MODULES, TOKEN_KEYS
from amvlm_jax.models.bert import BertConfig
from amvlm_jax.models.vit import fused_attention, vit_from_name
from amvlm_jax.train.logging import info


def pretrain_image_size(config) -> int:
    return int(config.pretrain.image_size or config.data.image_size)


TEXT_ENCODER = "config.pretrain.text_encoder"


def text_encoder_dir(config) -> str:
    """The local folder of the text encoder: config.pretrain.text_encoder (a path, or a
    hub id resolved to its cache folder), or the bundled MiniLM when that is ''.
    A WeightError naming the field when it lacks config.json or the tokenizer's files."""
    name = config.pretrain.text_encoder
    folder = hub.resolve_text_encoder(name) if name else weights.default_text_encoder_dir()
    with weights.field_errors(TEXT_ENCODER):
        weights.check_bert_folder(folder)
    for wanted in (("config.json",), hub.TEXT_TOKENIZER):
        if not any(os.path.isfile(os.path.join(folder, file)) for file in wanted):
            raise weights.WeightError(f"{TEXT_ENCODER}: {folder} has no {' or '.join(wanted)}")
    return folder


def text_encoder_config(config) -> BertConfig:
    """The text encoder's BertConfig from its folder's config.json (no weights read).

    'pretrained' keeps the first ``text_layers`` layers; 'random' may also
    shrink the width with text_hidden/text_heads.
    """
    pre = config.pretrain
    with weights.field_errors(TEXT_ENCODER):
        folder = text_encoder_dir(config)
        full = weights.bert_config(folder)
    if pre.text_weights_init == "pretrained":
        if not 1 <= pre.text_layers <= full.num_hidden_layers:
            raise ConfigError(f"config.pretrain.text_layers={pre.text_layers}: the text encoder "
                              f"{os.path.join(folder, 'config.json')} has {full.num_hidden_layers} layers")
        return full.truncated(pre.text_layers)
    changes = dict(num_hidden_layers=int(pre.text_layers))
    if pre.text_hidden:
        heads = pre.text_heads or max(1, pre.text_hidden // 64)
        changes |= dict(hidden_size=pre.text_hidden, num_attention_heads=heads, intermediate_size=4 * pre.text_hidden)
    return dataclasses.replace(full, **changes)


def build_text_encoder(config) -> tuple[BertConfig, dict | None]:
    """(BertConfig, loaded params, or None for a random init) of the text encoder."""
    text_config = text_encoder_config(config)  # Its one-line errors (text_layers too) before any weight is read.
    if config.pretrain.text_weights_init != "pretrained":
        return text_config, None
    with weights.field_errors(TEXT_ENCODER):
        return weights.load_bert(text_encoder_dir(config), num_layers=config.pretrain.text_layers)


def build_model(config, text_config: BertConfig) -> AMVLM:
    pre = config.pretrain
    if pre.max_length > text_config.max_position_embeddings:
        raise ConfigError(f"config.pretrain.max_length={pre.max_length}: the text encoder has "
                          f"{text_config.max_position_embeddings} positions (max_position_embeddings)")
    dtype = jnp.dtype(config.dtype)
    overrides = {k: v for k, v in dict(width=pre.vit_width, depth=pre.vit_depth, num_heads=pre.vit_heads).items() if v}
    vit = vit_from_name(pre.vit, dtype=dtype, remat=pre.remat, attention=vit_attention(config),
                        pixel_mean=tuple(pre.vit_pixel_mean), pixel_std=tuple(pre.vit_pixel_std), **overrides)
    return AMVLM(
        image_encoder=vit,
        text_config=text_config,
        embed_dim=pre.embed_dim,
        head_hidden=pre.head_hidden,
        objective=pre.objective,
        num_prototypes=pre.mgca.num_prototypes,
        pdt_heads=pre.pdt_heads,
        pdt_dropout=pre.pdt_dropout,
        temperature=pre.temperature,
        dtype=dtype,
        remat=pre.remat,
        one_hot_embedding_grad=text_embedding_grad(config) == "one_hot",
    )


def text_embedding_grad(config) -> str:
    """config.pretrain.text_embedding_grad with 'auto' resolved: 'one_hot' on accelerators, 'scatter' on CPUs."""
    choice = config.pretrain.text_embedding_grad
    if choice == "auto":
        return "scatter" if jax.default_backend() == "cpu" else "one_hot"
    return choice


def vit_attention(config) -> str:
    """config.pretrain.vit_attention with 'auto' resolved: 'cudnn' for bfloat16 compute on a GPU
    whose cuDNN compiles the fused kernel, 'xla' otherwise."""
    choice = config.pretrain.vit_attention
    if choice != "auto":
        return choice
    if config.dtype != "bfloat16" or jax.default_backend() != "gpu":
        return "xla"
    return "cudnn" if cudnn_attention_compiles() else "xla"


@functools.cache
def cudnn_attention_compiles() -> bool:
    """Whether the fused attention's forward and backward compile here (bfloat16, an odd token count:
    the padded path a ViT takes). Older GPUs and cuDNN releases lack the kernel; they get 'xla'."""
    qkv = jax.ShapeDtypeStruct((2, 17, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        return fused_attention(q, k, v, 0.125).astype(jnp.float32).sum()

    try:
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv).compile()
    except Exception as error:  # jax raises several types for an unsupported device or cuDNN.
        info(f"cuDNN fused attention unavailable here ({type(error).__name__}); the ViT uses 'xla' attention")
        return False
    return True


def uses_momentum(config) -> bool:
    """Whether the run keeps momentum encoders (AMVLM with a non-zero ICL weight)."""
    return config.pretrain.objective == "amvlm" and bool(config.pretrain.weights.icl)


def uses_pdt(config) -> bool:
    pre = config.pretrain
    return pre.objective == "amvlm" and pre.use_pdt and bool(pre.weights.css)


def encoder_subset(tree: dict) -> dict:
    """The entries of a params / batch_stats dict that belong to the momentum encoders."""
    return {name: tree[name] for name in ENCODER_MODULES if name in tree}


def dummy_tokens(batch: int, max_length: int) -> dict:
    tokens = {k: np.zeros((batch, max_length), np.int32) for k in TOKEN_KEYS if k != "word_mask"}
    tokens["word_mask"] = np.zeros((batch, max_length - 1), np.float32)
    return tokens
