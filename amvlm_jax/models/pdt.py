"""Probabilistic distribution transform (PDT) head, SPEC section 3.2.

Maps a set of token embeddings X (B, N, D) to a diagonal Gaussian per token,
returned as (mu, logsigma), each (B, N, D):

    x'       = LayerNorm(GELU(Linear(X)))
    Y        = MultiHeadSelfAttention(x', key mask)        (B, N, D)
    mu       = X + Dropout(Linear(D/2 -> D)(Y[..., :D/2]))
    mu       = mu + MLP(LayerNorm(mu))
    logsigma = Dropout(Linear(D/2 -> D)(Y[..., D/2:]))
    logsigma = logsigma + MLP(LayerNorm(logsigma))

The attention is the usual pre-projection (no qkv bias), scaled dot product
form, but WITHOUT an output projection: the heads' concatenated outputs are
split into channel halves as they are (with 8 heads: heads 0-3 feed mu,
heads 4-7 logsigma), as in the authors' DisTrans. Dropout (0.1 by default)
is applied to the attention probabilities, after the mu / logsigma
projections and inside the MLPs (after the GELU and after the second
Linear). The binary token mask removes padding tokens as attention keys (a
large negative finite logit, so their values cannot leak into real tokens);
outputs at padding positions are computed but meaningless, and the losses
ignore them.

The attention probabilities (B, H, N, N) are sown into the 'intermediates'
collection as ``attention`` (apply with ``mutable=['intermediates']``).

Initialisation: Linear weights N(0, 0.02), biases 0, LayerNorm scale 1 and
bias 0.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import flax.linen as nn

LAYER_NORM_EPSILON = 1e-5
MASKED_LOGIT = -1e9

_weight_init = nn.initializers.normal(stddev=0.02)
_bias_init = nn.initializers.zeros


def _dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=_weight_init,
        bias_init=_bias_init,
        dtype=dtype,
        name=name,
    )


def _layer_norm(name: str) -> nn.LayerNorm:
    # Statistics in float32 regardless of the compute dtype.
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=jnp.float32, name=name)


class _MaskedSelfAttention(nn.Module):
    dim: int
    num_heads: int
    dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, deterministic: bool, attention_bias=None) -> jnp.ndarray:
        """x (B, N, D), mask (B, N), attention_bias None or (B, N) -> (B, N, D) float32."""
        batch, tokens, _ = x.shape
        head_dim = self.dim // self.num_heads
        qkv = _dense(3 * self.dim, "qkv", self.dtype, use_bias=False)(x)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim).astype(jnp.float32)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, Dh)
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) * (head_dim**-0.5)
        if attention_bias is not None:
            logits = logits + attention_bias.astype(jnp.float32)[:, None, None, :]
        key_is_real = mask.astype(bool)[:, None, None, :]
        logits = jnp.where(key_is_real, logits, MASKED_LOGIT)
        probs = nn.softmax(logits, axis=-1)
        self.sow("intermediates", "attention", probs)
        probs = nn.Dropout(self.dropout, name="attention_dropout")(probs, deterministic=deterministic)
        # No output projection: the caller splits the heads' channels directly.
        return jnp.einsum("bhqk,bkhd->bqhd", probs, value).reshape(batch, tokens, self.dim)


class _FeedForward(nn.Module):
    dim: int
    ratio: int
    dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        h = _dense(self.ratio * self.dim, "fc_in", self.dtype)(x)
        h = nn.gelu(h, approximate=False)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = _dense(self.dim, "fc_out", self.dtype)(h)
        return nn.Dropout(self.dropout)(h, deterministic=deterministic)


class PDTHead(nn.Module):
    """Gaussian (mu, logsigma) head over a token set.

    Attributes:
      dim: embedding size D (even; split in halves for mu / logsigma).
      num_heads: attention heads (D must be divisible by it).
      dropout: dropout rate of the attention probabilities, the mu / logsigma
        projections and the MLPs.
      mlp_ratio: hidden width of the refinement MLPs relative to D.
      dtype: compute dtype of the Dense layers; outputs are float32.

    Call:
      x: (B, N, D) token embeddings.
      mask: (B, N) binary, 1 for real tokens (attention keys), 0 for padding.
      deterministic: disable dropout (needs a 'dropout' rng when False).
      attention_bias: optional (B, N) float added to every query's attention
        logit of each key. The authors' additive mask (1 - w) * -10000 built
        from attention weights w (SPEC 8.13) is this with an all-ones mask;
        the model itself passes None.

    Returns:
      (mu, logsigma), each (B, N, D) float32.
    """

    dim: int = 128
    num_heads: int = 8
    dropout: float = 0.1
    mlp_ratio: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, deterministic: bool, attention_bias=None):
        if self.dim % 2 or self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be even and divisible by num_heads={self.num_heads}")
        x = x.astype(jnp.float32)
        h = _dense(self.dim, "input_proj", self.dtype)(x)
        h = _layer_norm("input_norm")(nn.gelu(h, approximate=False))
        y = _MaskedSelfAttention(self.dim, self.num_heads, self.dropout, self.dtype, name="attention")(
            h, mask, deterministic, attention_bias
        )
        half = self.dim // 2
        mu_update = _dense(self.dim, "mu_proj", self.dtype)(y[..., :half].astype(self.dtype))
        mu = x + nn.Dropout(self.dropout)(mu_update, deterministic=deterministic).astype(jnp.float32)
        mu = mu + _FeedForward(self.dim, self.mlp_ratio, self.dropout, self.dtype, name="mu_mlp")(
            _layer_norm("mu_norm")(mu), deterministic
        ).astype(jnp.float32)
        logsigma = _dense(self.dim, "logsigma_proj", self.dtype)(y[..., half:].astype(self.dtype))
        logsigma = nn.Dropout(self.dropout)(logsigma, deterministic=deterministic).astype(jnp.float32)
        logsigma = logsigma + _FeedForward(self.dim, self.mlp_ratio, self.dropout, self.dtype, name="logsigma_mlp")(
            _layer_norm("logsigma_norm")(logsigma), deterministic
        ).astype(jnp.float32)
        return mu, logsigma
