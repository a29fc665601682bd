"""Small numerical building blocks that models, losses and training steps share.

Kept outside models/ and losses/ so that neither imports the other for them.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# Flax keeps this fraction of the old running BatchNorm statistics per step (torch's momentum 0.1).
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5


# torch's default weight initialisation of nn.Linear and nn.Conv*d, kaiming_uniform(a = sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = inputs x kernel taps. The authors' U-Net, projection heads
# and text-mask decoder keep it (they set none); flax's default (lecun_normal) has three times its variance.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """torch's default bias of nn.Linear and nn.Conv*d: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (flax's: zeros)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def running_batch_statistics(running_mean, running_var, mean, var, count):
    """The running BatchNorm statistics after a training step, as torch's BatchNorm keeps them.

    mean, var (C,): the batch's mean and biased variance, which training normalises with; count: the
    values per channel they were taken over (a scalar, traced or not). The running variance averages
    the unbiased variance var * count / (count - 1), as in the authors' torch modules (flax's
    nn.BatchNorm averages the biased one). Returns (mean, var), float32.
    """
    unbiased = var * (count / jnp.maximum(count - 1, 1))
    return (BATCH_NORM_MOMENTUM * running_mean + (1 - BATCH_NORM_MOMENTUM) * mean,
            BATCH_NORM_MOMENTUM * running_var + (1 - BATCH_NORM_MOMENTUM) * unbiased)


def l2_normalize(x: jnp.ndarray, axis: int = -1, eps: float = 1e-12) -> jnp.ndarray:
    """x / max(||x||, eps) with a gradient that stays finite at x = 0."""
    squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jnp.reciprocal(jnp.sqrt(jnp.maximum(squared_norm, eps * eps)))


def ema_update(online, averaged, momentum):
    """averaged <- momentum * averaged + (1 - momentum) * online, leaf by leaf, without gradient.

    Any matching pytrees (parameters, BatchNorm statistics): the mean
    teacher (momentum = alpha_t, SPEC 6) and the momentum encoders of ICL
    (SPEC 3.4). Computed in float32; each result keeps its averaged leaf's dtype.
    """

    def blend(new, old):  # A Python float momentum stays weakly typed: (1 - momentum) is exact in float64.
        mixed = momentum * old.astype(jnp.float32) + (1.0 - momentum) * jax.lax.stop_gradient(new).astype(jnp.float32)
        return mixed.astype(old.dtype)

    return jax.tree_util.tree_map(blend, online, averaged)
