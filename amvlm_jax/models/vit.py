"""Vision Transformer image encoder (SPEC section 2).

Pre-LayerNorm ViT with a CLS token, learned absolute position embeddings,
fused qkv projection with bias, exact-GELU MLP and a final LayerNorm. The
parameter names follow the common ViT/DeiT checkpoint layout closely so that
``amvlm_jax.weights.load_vit`` can map checkpoints mechanically:

    patch_embed/{kernel (p, p, 3, width), bias}
    cls_token (1, 1, width)
    pos_embed (1, 1 + P, width)
    blocks_{i}/norm1, attn/{qkv, proj}, norm2, mlp/{fc1, fc2}
    norm
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VIT_VARIANTS: Dict[str, Dict[str, int]] = {
    "Ti/16": dict(width=192, depth=12, num_heads=3),
    "S/16": dict(width=384, depth=12, num_heads=6),
    "B/16": dict(width=768, depth=12, num_heads=12),
}

_LN_EPS = 1e-6
_dense_init = nn.initializers.truncated_normal(stddev=0.02)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches, each projected linearly: (B, H, W, C) -> (B, P, width).

    The same function and parameters (kernel (p, p, C, width), bias) as a
    convolution with stride p, computed as one matmul over the flattened
    patches: the weight gradient of a stride-16 convolution over 3 input
    channels is a slow kernel on GPUs. P = (H / p) * (W / p), row-major.
    """

    width: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        batch, height, width_px, channels = images.shape
        p = self.patch_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, channels, self.width), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.width,), jnp.float32)
        rows, cols = height // p, width_px // p
        patches = images.reshape(batch, rows, p, cols, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, rows * cols, p * p * channels)
        out = patches @ kernel.reshape(p * p * channels, self.width).astype(self.dtype)
        return out + bias.astype(self.dtype)


def fused_attention(q, k, v, scale: float):
    """softmax(q k^T * scale) v through cuDNN's fused kernel: q, k, v (B, N, heads, d) -> (B, N, heads, d).

    Its training kernels need an even token count, and a ViT has 1 + P tokens
    (197 at 224 / 16): an odd count gets one padding token that no query
    attends to (key_value_seq_lengths) and whose output is dropped.
    """
    tokens = q.shape[1]
    if tokens % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    pad = [(0, 0), (0, 1), (0, 0), (0, 0)]
    lengths = jnp.full((q.shape[0],), tokens, jnp.int32)
    out = jax.nn.dot_product_attention(jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad), scale=scale,
                                       query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       implementation="cudnn")
    return out[:, :tokens]


class ViTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    Input (B, N, width); returns the output (B, N, width) and the CLS token's
    attention probabilities (B, heads, N) in float32.

    ``attention='cudnn'`` computes softmax(q k^T / sqrt(d)) v in one fused
    cuDNN kernel (GPUs, bfloat16 / float16 compute) instead of materialising
    the (B, heads, N, N) probabilities; the CLS row is then recomputed on its
    own (a (B, heads, N) softmax). Attention dropout needs the explicit
    probabilities, so training with dropout_rate > 0 always uses 'xla'. In
    training, dropout_rate drops the probabilities and the projected output.
    """

    width: int
    num_heads: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool = False):
        batch, tokens, _ = x.shape
        head_dim = self.width // self.num_heads
        qkv = nn.Dense(3 * self.width, dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=_dense_init, name="qkv")(x)
        # Channel order of the fused projection is (q|k|v, head, head_dim).
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scale = 1.0 / head_dim ** 0.5  # A Python float: it keeps the compute dtype.
        if self.attention == "cudnn" and not (train and self.dropout_rate > 0):
            out = fused_attention(q, k, v, scale)
            cls_logits = jnp.einsum("bhd,bkhd->bhk", q[:, 0], k) * scale
            cls_probs = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)
        else:
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
            # Softmax in float32 so bf16 compute keeps well-formed probabilities.
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            dropped = nn.Dropout(self.dropout_rate)(probs, deterministic=not train)
            out = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(self.dtype), v)
            cls_probs = probs[:, :, 0]
        out = out.reshape(batch, tokens, self.width)
        out = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=_dense_init, name="proj")(out)
        # The branch ends in a dropout, as the MLP's does (timm's proj_drop, HF's ViTSelfOutput).
        return nn.Dropout(self.dropout_rate)(out, deterministic=not train), cls_probs


class ViTMlp(nn.Module):
    """Two-layer MLP with exact (erf) GELU: (B, N, width) -> (B, N, width)."""

    width: int
    hidden: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=_dense_init, name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        x = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=_dense_init, name="fc2")(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=not train)


class ViTBlock(nn.Module):
    """Pre-LN transformer block: (B, N, width) -> ((B, N, width), CLS probs (B, heads, N))."""

    width: int
    num_heads: int
    mlp_ratio: int = 4
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool = False):
        ln = dict(epsilon=_LN_EPS, dtype=self.dtype, param_dtype=jnp.float32)
        h, probs = ViTAttention(self.width, self.num_heads, self.dropout_rate, self.dtype, self.attention,
                                name="attn")(nn.LayerNorm(name="norm1", **ln)(x), train)
        x = x + h
        x = x + ViTMlp(self.width, self.width * self.mlp_ratio, self.dropout_rate, self.dtype,
                       name="mlp")(nn.LayerNorm(name="norm2", **ln)(x), train)
        return x, probs


class ViT(nn.Module):
    """ViT image encoder.

    Input: images (B, H, W, 3) float in [0, 1]; H and W multiples of
    ``patch_size``. The module normalises with ``pixel_mean``/``pixel_std``.
    Output dict:
      ``cls``           (B, width)  CLS token after the final LayerNorm
      ``patches``       (B, P, width) patch tokens after the final LayerNorm,
                        P = (H / patch) * (W / patch), row-major grid order
      ``cls_attention`` (B, P) float32, last block's CLS-to-patch attention
                        probabilities averaged over heads (CLS->CLS excluded), before
                        their dropout
    The position-embedding table is sized from the image size seen at init.
    """

    width: int
    depth: int
    num_heads: int
    patch_size: int = 16
    mlp_ratio: int = 4
    dropout_rate: float = 0.0
    pixel_mean: Tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: Tuple[float, float, float] = IMAGENET_STD
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "xla"  # 'xla' or 'cudnn' (fused kernel, GPUs): see ViTAttention.

    @nn.compact
    def __call__(self, images, train: bool = False):
        batch, height, width_px, _ = images.shape
        if height % self.patch_size or width_px % self.patch_size:
            raise ValueError(f"image size {(height, width_px)} is not a multiple of "
                             f"patch size {self.patch_size}")
        mean = jnp.asarray(self.pixel_mean, jnp.float32)
        std = jnp.asarray(self.pixel_std, jnp.float32)
        x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)

        x = PatchEmbed(self.width, self.patch_size, self.dtype, name="patch_embed")(x)
        num_patches = x.shape[1]

        cls_token = self.param("cls_token", nn.initializers.truncated_normal(1e-6),
                               (1, 1, self.width), jnp.float32)
        pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                               (1, 1 + num_patches, self.width), jnp.float32)
        cls = jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1) + pos_embed.astype(self.dtype)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

        block_cls = nn.remat(ViTBlock, static_argnums=(2,)) if self.remat else ViTBlock
        probs = None
        for i in range(self.depth):
            x, probs = block_cls(self.width, self.num_heads, self.mlp_ratio,
                                 self.dropout_rate, self.dtype, self.attention, name=f"blocks_{i}")(x, train)

        x = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, param_dtype=jnp.float32,
                         name="norm")(x)
        return {
            "cls": x[:, 0],
            "patches": x[:, 1:],
            "cls_attention": probs[:, :, 1:].mean(axis=1),
        }


def vit_from_name(name: str, **overrides) -> ViT:
    """Builds a ViT from a variant name in ``VIT_VARIANTS`` ('Ti/16', 'S/16', 'B/16').

    Any ViT field (e.g. ``dtype``, ``remat``) can be overridden by keyword.
    """
    if name not in VIT_VARIANTS:
        raise ValueError(f"unknown ViT variant {name!r}; choose one of {sorted(VIT_VARIANTS)}")
    fields = dict(VIT_VARIANTS[name], patch_size=int(name.split("/")[1]))
    fields.update(overrides)
    return ViT(**fields)
