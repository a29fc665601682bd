"""U-Net segmentation network (SPEC section 6)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class ConvBlock(nn.Module):
    """Two [Conv3x3, BatchNorm, ReLU] layers."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(2):
            x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)(x)
            x = nn.relu(x)
        return x


class UNet(nn.Module):
    """4 down (maxpool + ConvBlock) and 4 up (ConvTranspose 2x2/2 + skip + ConvBlock) stages.

    Input (B, H, W, 3) in [0, 1] with H, W divisible by 16; output logits
    (B, H, W, num_classes) in float32 (num_classes = 1 for binary tasks).
    Under jit with a batch sharded over devices, BatchNorm statistics are
    those of the global batch.
    """

    num_classes: int = 1
    base_width: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        widths = [self.base_width * 2**i for i in range(5)]
        x = ConvBlock(widths[0], self.dtype)(images.astype(self.dtype), train)
        skips = []
        for width in widths[1:]:
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = ConvBlock(width, self.dtype)(x, train)
        for width, skip in zip(reversed(widths[:-1]), reversed(skips)):
            x = nn.ConvTranspose(width, (2, 2), strides=(2, 2), dtype=self.dtype)(x)
            x = jnp.concatenate([x, skip], axis=-1)
            x = ConvBlock(width, self.dtype)(x, train)
        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x)
        return logits.astype(jnp.float32)
