"""Projection heads mapping encoder features into the shared embedding space.

SPEC section 2: Linear(in, 2048) - BatchNorm - ReLU - Linear(2048, 128) -
BatchNorm(no scale/shift), then L2 normalisation. The global head embeds one
vector per sample (CLS / report feature); the local head applies the same
stack to every token, with BatchNorm statistics pooled over batch and tokens
(the 1x1-convolution formulation of the MGCA local head).

BatchNorm hyper-parameters follow the PyTorch defaults the published models
were trained with: epsilon 1e-5 and a running-average update of 0.1, i.e.
flax ``momentum=0.9``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from amvlm_jax.ops import BATCH_NORM_EPSILON, BATCH_NORM_MOMENTUM, l2_normalize


class _ProjectionStack(nn.Module):
    """Dense - BN - ReLU - Dense - BN(no affine) on rows of a (N, C) matrix."""

    hidden: int
    out: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool, mask: jnp.ndarray | None) -> jnp.ndarray:
        batch_norm_kwargs = dict(
            use_running_average=not train,
            momentum=BATCH_NORM_MOMENTUM,
            epsilon=BATCH_NORM_EPSILON,
            dtype=self.dtype,
        )
        x = nn.Dense(self.hidden, dtype=self.dtype, name="dense_hidden")(x)
        x = nn.BatchNorm(name="norm_hidden", **batch_norm_kwargs)(x, mask=mask)
        x = nn.relu(x)
        x = nn.Dense(self.out, dtype=self.dtype, name="dense_out")(x)
        x = nn.BatchNorm(use_scale=False, use_bias=False, name="norm_out", **batch_norm_kwargs)(x, mask=mask)
        # The embedding is used in dot products / softmaxes: keep it float32.
        return l2_normalize(x.astype(jnp.float32), axis=-1)


class GlobalHead(nn.Module):
    """Global projection head: (B, C) -> unit-norm (B, out).

    BatchNorm statistics are taken over the batch.
    """

    hidden: int = 2048
    out: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        return _ProjectionStack(self.hidden, self.out, self.dtype, name="projection")(x, train, None)


class LocalHead(nn.Module):
    """Token-wise projection head: (B, N, C) -> unit-norm (B, N, out).

    The same stack is applied to every token; BatchNorm statistics are pooled
    over batch and tokens. By default (``mask=None``) every token, padding
    slots included, enters the statistics, as SPEC section 2 states. A binary
    ``mask`` (B, N) can optionally restrict the training-time statistics to
    real tokens; it does not change which tokens are projected.
    """

    hidden: int = 2048
    out: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        batch, tokens, channels = x.shape
        rows = x.reshape(batch * tokens, channels)
        row_mask = None if mask is None else mask.reshape(batch * tokens, 1).astype(bool)
        y = _ProjectionStack(self.hidden, self.out, self.dtype, name="projection")(rows, train, row_mask)
        return y.reshape(batch, tokens, self.out)
