"""U-Net segmentation network (SPEC section 6)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# Flax keeps this fraction of the old running statistics per step (torch's momentum 0.1).
BATCH_NORM_MOMENTUM = 0.9


class ConvBlock(nn.Module):
    """Two [Conv3x3, BatchNorm, ReLU] layers."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(2):
            x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM, epsilon=1e-5, dtype=self.dtype)(x)
            x = nn.relu(x)
        return x


class UpConv2x2(nn.Module):
    """Transposed convolution 2x2 with stride 2, as one matmul and a pixel shuffle.

    Same parameters (kernel (2, 2, C_in, C_out), bias) and outputs as
    ``nn.ConvTranspose(C_out, (2, 2), strides=(2, 2))``: output pixel
    (2i + a, 2j + b) is x[i, j] @ kernel[1 - a, 1 - b] + bias. XLA's CPU
    backend runs the input-dilated convolution that ConvTranspose lowers to
    several times slower than this matmul. (B, h, w, C_in) -> (B, 2h, 2w, C_out).
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        batch, height, width, _ = x.shape
        y = jnp.einsum("bhwc,xyco->bhxwyo", x.astype(self.dtype), kernel[::-1, ::-1].astype(self.dtype))
        return y.reshape(batch, 2 * height, 2 * width, self.features) + bias.astype(self.dtype)


class UNet(nn.Module):
    """4 down (maxpool + ConvBlock) and 4 up (transposed conv 2x2/2 + skip + ConvBlock) stages.

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
        for level, (width, skip) in enumerate(zip(reversed(widths[:-1]), reversed(skips))):
            # Named as nn.ConvTranspose would be: checkpoints keep their parameter names.
            x = UpConv2x2(width, self.dtype, name=f"ConvTranspose_{level}")(x)
            x = jnp.concatenate([x, skip], axis=-1)
            x = ConvBlock(width, self.dtype)(x, train)
        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x)
        return logits.astype(jnp.float32)
