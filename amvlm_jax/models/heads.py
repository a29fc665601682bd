"""Projection heads mapping encoder features into the shared embedding space.

SPEC section 2: Linear(in, 2048) - BatchNorm - ReLU - Linear(2048, 128) -
BatchNorm(no scale/shift), then L2 normalisation. The global head embeds one
vector per sample (CLS / report feature); the local head applies the same
stack to every token, with BatchNorm statistics pooled over batch and tokens
(the 1x1-convolution formulation of the MGCA local head).

BatchNorm follows the PyTorch BatchNorm1d the published models were trained
with: epsilon 1e-5, a running-average update of 0.1 (flax ``momentum=0.9``),
and a running variance that averages the unbiased batch variance. The Dense
layers start as the authors' nn.Linear / nn.Conv1d do (torch's default
initialisation, which their code keeps), not with flax's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from amvlm_jax.ops import BATCH_NORM_EPSILON, l2_normalize, running_batch_statistics, torch_bias_init, torch_kernel_init


class RowBatchNorm(nn.Module):
    """BatchNorm over the rows of x (N, C), as torch's BatchNorm1d: in training it normalises with the
    mean and biased variance of the rows where ``mask`` (N, 1) is true (all rows without a mask) and
    moves the running statistics (``ops.running_batch_statistics``: the unbiased variance, over the
    rows counted); in evaluation it normalises with the running statistics. nn.BatchNorm's variables
    ('params': scale and bias when ``affine``; 'batch_stats': mean, var), and in training its outputs and
    gradients to the bit (the same operations in the same order). (N, C) -> (N, C) in ``dtype``.
    """

    affine: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        channels = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        # nn.BatchNorm's operations in its order, so that training takes the same rounding path as with it.
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if train:
            rows = None if mask is None else jnp.asarray(mask, bool)
            square = jnp.square(x)
            mean, mean_square = x.mean(0, where=rows), square.mean(0, where=rows)
            var = jnp.maximum(0.0, mean_square - jnp.square(mean))
            if not self.is_initializing():  # As nn.BatchNorm: initialisation leaves the statistics as they start.
                count = x.shape[0] if rows is None else jnp.sum(rows, dtype=jnp.float32)
                running_mean.value, running_var.value = running_batch_statistics(
                    running_mean.value, running_var.value, mean, var, count)
        else:
            mean, var = running_mean.value, running_var.value
        row = (1, channels)
        y = x - jnp.expand_dims(mean, 0)
        multiplier = jax.lax.rsqrt(jnp.expand_dims(var, 0) + BATCH_NORM_EPSILON)
        if self.affine:
            multiplier = multiplier * self.param("scale", nn.initializers.ones, (channels,), jnp.float32).reshape(row)
        y = y * multiplier
        if self.affine:
            y = y + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32).reshape(row)
        return y.astype(self.dtype)


class _ProjectionStack(nn.Module):
    """Dense - BN - ReLU - Dense - BN(no affine) on rows of a (N, C) matrix."""

    hidden: int
    out: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool, mask: jnp.ndarray | None) -> jnp.ndarray:
        x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=torch_kernel_init,
                     bias_init=torch_bias_init(x.shape[-1]), name="dense_hidden")(x)
        x = nn.relu(RowBatchNorm(dtype=self.dtype, name="norm_hidden")(x, train, mask))
        x = nn.Dense(self.out, dtype=self.dtype, kernel_init=torch_kernel_init,
                     bias_init=torch_bias_init(self.hidden), name="dense_out")(x)
        x = RowBatchNorm(affine=False, dtype=self.dtype, name="norm_out")(x, train, mask)
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
