"""BERT text encoder (SPEC section 2) and word aggregation.

The parameter tree mirrors the HuggingFace ``BertModel`` layout so that
``amvlm_jax.weights.load_bert`` maps tensor names mechanically
('.' -> '/', 'layer.N' -> 'layer_N', Linear weight -> transposed kernel):

    embeddings/{word_embeddings, position_embeddings, token_type_embeddings}/embedding
    embeddings/LayerNorm/{scale, bias}
    encoder/layer_{i}/attention/self/{query, key, value}/{kernel, bias}
    encoder/layer_{i}/attention/output/{dense, LayerNorm}
    encoder/layer_{i}/intermediate/dense
    encoder/layer_{i}/output/{dense, LayerNorm}
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Subset of a HuggingFace BERT config.json that the encoder needs."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_dict(cls, values: dict, num_layers: Optional[int] = None) -> "BertConfig":
        """Builds a config from a dict, ignoring unknown keys.

        ``num_layers`` keeps only the first layers of a deeper checkpoint.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in names})
        return config.truncated(num_layers)

    def truncated(self, num_layers: Optional[int]) -> "BertConfig":
        """This config restricted to its first ``num_layers`` layers (None: all)."""
        if num_layers is None:
            return self
        if not 1 <= num_layers <= self.num_hidden_layers:
            raise ValueError(f"num_layers={num_layers} must be in [1, {self.num_hidden_layers}]")
        return dataclasses.replace(self, num_hidden_layers=int(num_layers))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def activation(name: str):
    if name == "gelu":
        return lambda x: nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: nn.gelu(x, approximate=True)
    if name == "relu":
        return nn.relu
    raise ValueError(f"unsupported hidden_act {name!r}")


# Dense with BERT's N(0, 0.02) initialiser and float32 parameters.
_Dense = functools.partial(nn.Dense, kernel_init=nn.initializers.normal(stddev=0.02),
                           param_dtype=jnp.float32)


class BertSelfAttention(nn.Module):
    """Query/key/value projections and softmax attention.

    hidden (B, L, H), key_mask (B, L) bool -> context (B, L, H), probs (B, heads, L, L) float32.
    """

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, key_mask, deterministic: bool = True):
        cfg = self.config
        batch, length, _ = hidden.shape
        heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads

        def project(name):
            out = _Dense(cfg.hidden_size, dtype=self.dtype, name=name)(hidden)
            return out.reshape(batch, length, heads, head_dim)

        q, k, v = project("query"), project("key"), project("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
        # Masked keys get the most negative float (as the reference does), via
        # `where` so a fully padded row gives a uniform row instead of NaN.
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        dropped = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(self.dtype), v)
        return context.reshape(batch, length, cfg.hidden_size), probs


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): used after attention and after the MLP."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual, deterministic: bool = True):
        cfg = self.config
        x = _Dense(cfg.hidden_size, dtype=self.dtype, name="dense")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                            param_dtype=jnp.float32, name="LayerNorm")(x + residual)


class BertAttention(nn.Module):
    """Self-attention sub-layer: (B, L, H) -> ((B, L, H), probs (B, heads, L, L))."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, key_mask, deterministic: bool = True):
        context, probs = BertSelfAttention(self.config, self.dtype, name="self")(
            hidden, key_mask, deterministic)
        out = BertResidualOutput(self.config, self.dtype, name="output")(
            context, hidden, deterministic)
        return out, probs


class BertIntermediate(nn.Module):
    """First MLP projection and activation: (B, L, H) -> (B, L, intermediate_size)."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden):
        x = _Dense(self.config.intermediate_size, dtype=self.dtype, name="dense")(hidden)
        return activation(self.config.hidden_act)(x)


class BertLayer(nn.Module):
    """Post-LN transformer layer: (B, L, H) -> ((B, L, H), probs (B, heads, L, L))."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, key_mask, deterministic: bool = True):
        attended, probs = BertAttention(self.config, self.dtype, name="attention")(
            hidden, key_mask, deterministic)
        mlp = BertIntermediate(self.config, self.dtype, name="intermediate")(attended)
        out = BertResidualOutput(self.config, self.dtype, name="output")(
            mlp, attended, deterministic)
        return out, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lookup_one_hot_grad(table, ids, rows: int):
    """table[ids] (..., H) whose table gradient is a one-hot matmul instead of a scatter-add.

    A scatter-add serialises on repeated ids (every token type is 0; padding,
    [CLS] and [SEP] repeat in every report): one such kernel took 2.4 ms of a
    31 ms bf16 ViT-B + BERT step on an H100. The matmul accumulates in float32.
    """
    del rows
    return jnp.take(table, ids, axis=0)


def _lookup_fwd(table, ids, rows):
    return jnp.take(table, ids, axis=0), ids


def _lookup_bwd(rows, ids, grad):
    flat_ids, flat_grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
    one_hot = jax.nn.one_hot(flat_ids, rows, dtype=grad.dtype)  # (N, rows)
    table_grad = jnp.matmul(one_hot.T, flat_grad, preferred_element_type=jnp.float32)
    return table_grad.astype(grad.dtype), None


_lookup_one_hot_grad.defvjp(_lookup_fwd, _lookup_bwd)


class Embedding(nn.Module):
    """nn.Embed's parameter ('embedding' (rows, features), float32) and lookup: ids (...) -> (..., features).

    ``one_hot_grad`` computes the table's gradient as a one-hot matmul (see
    _lookup_one_hot_grad): the same values, faster on GPUs, slower on CPUs.
    """

    rows: int
    features: int
    dtype: Any = jnp.float32
    one_hot_grad: bool = False

    @nn.compact
    def __call__(self, ids):
        table = self.param("embedding", nn.initializers.normal(stddev=0.02), (self.rows, self.features),
                           jnp.float32).astype(self.dtype)
        if self.one_hot_grad:
            return _lookup_one_hot_grad(table, ids, self.rows)
        return jnp.take(table, ids, axis=0)


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout -> (B, L, H)."""

    config: BertConfig
    dtype: Any = jnp.float32
    one_hot_grad: bool = False

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool = True):
        cfg = self.config

        def embed(name, size):
            return Embedding(size, cfg.hidden_size, self.dtype, self.one_hot_grad, name=name)

        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        positions = jnp.arange(length)[None, :]
        x = (embed("word_embeddings", cfg.vocab_size)(input_ids)
             + embed("position_embeddings", cfg.max_position_embeddings)(positions)
             + embed("token_type_embeddings", cfg.type_vocab_size)(token_type_ids))
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                         name="LayerNorm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertEncoder(nn.Module):
    """Stack of ``num_hidden_layers`` layers; returns (B, L, H) and the last layer's probs."""

    config: BertConfig
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, hidden, key_mask, deterministic: bool = True):
        layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
        probs = None
        for i in range(self.config.num_hidden_layers):
            hidden, probs = layer_cls(self.config, self.dtype, name=f"layer_{i}")(
                hidden, key_mask, deterministic)
        return hidden, probs


class Bert(nn.Module):
    """BERT encoder.

    ``__call__(input_ids (B, L) int, attention_mask (B, L) {0,1},
    token_type_ids (B, L) int or None, deterministic=True)`` returns a dict:
      ``hidden``        (B, L, H) last hidden state (compute dtype)
      ``cls_attention`` (B, L) float32, last layer's attention probabilities of
                        the CLS token (query 0) to every token, averaged over heads,
                        taken before their dropout (in training HF's output_attentions,
                        which the authors' word weights read, are after it)
    Dropout (config's hidden/attention probabilities) is active only when
    ``deterministic=False`` (needs a 'dropout' rng).
    """

    config: BertConfig
    dtype: Any = jnp.float32
    remat: bool = False
    one_hot_embedding_grad: bool = False  # See Embedding.

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None,
                 deterministic: bool = True):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        hidden = BertEmbeddings(self.config, self.dtype, self.one_hot_embedding_grad, name="embeddings")(
            input_ids, token_type_ids, deterministic)
        hidden, probs = BertEncoder(self.config, self.dtype, self.remat, name="encoder")(
            hidden, attention_mask.astype(bool), deterministic)
        return {"hidden": hidden, "cls_attention": probs[:, :, 0, :].mean(axis=1)}


def aggregate_words(token_features, token_attention, word_index, num_words: int):
    """Sums word-piece features and attention into word slots.

    token_features (B, L, H), token_attention (B, L), word_index (B, L) int
    with values in [0, num_words] where ``num_words`` is a dump slot (CLS,
    padding) that is dropped. Returns word_features (B, W, H) and
    word_attention (B, W) with W = num_words; slots no token maps to are
    exactly zero.
    """
    def one_sample(features, attention, index):
        # Exact scatter-add (a one-hot matmul could run at reduced precision).
        words = jax.ops.segment_sum(features, index, num_segments=num_words + 1)
        weights = jax.ops.segment_sum(attention, index, num_segments=num_words + 1)
        return words[:num_words], weights[:num_words]

    return jax.vmap(one_sample)(token_features, token_attention, word_index)
