"""U-Net segmentation networks (SPEC section 6).

Two architectures, chosen by ``UNet.architecture`` (``config.unet.architecture``):

- ``'authors'`` (default): the U-Net of the authors' code (the one LViT
  publishes), with which the paper's numbers were made. One [Conv3x3, BN,
  ReLU] at the input; four maxpool + 2 x [Conv3x3, BN, ReLU] stages to 2w,
  4w, 8w, 8w (the bottleneck stays at 8w); four stages of a 2x2/2 transposed
  convolution that keeps its channels, the skip concatenated, and
  2 x [Conv3x3, BN, ReLU] to 4w, 2w, w, w; a 1x1 output conv. Every conv has
  a bias and torch's default initialisation (the authors set none):
  14,751,873 parameters at w = 64 and one output channel.
- ``'textbook'``: the common U-Net (two convs at the input, a 16w
  bottleneck, transposed convolutions that halve the channels, decoder
  widths 8w, 4w, 2w, w, bias-free 3x3 convs, flax's initialisation):
  31,037,633 parameters at w = 64. Kept for comparison and for checkpoints
  made before the authors' U-Net became the default.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from amvlm_jax.ops import BATCH_NORM_EPSILON, running_batch_statistics, torch_bias_init, torch_kernel_init

ARCHITECTURES = ("authors", "textbook")


def _pool_windows(x: jnp.ndarray) -> jnp.ndarray:
    """(B, H, W, C) -> (B, H/2, W/2, 4, C): each 2x2 window's pixels in row-major order."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height // 2, width // 2, 4, channels)


@jax.custom_vjp
def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 max-pool with stride 2, (B, H, W, C) -> (B, H/2, W/2, C), H and W even.

    Same values and gradients as ``nn.max_pool(x, (2, 2), strides=(2, 2))``
    (the gradient goes to the first maximum of a window, as XLA's and torch's
    do); the backward pass reuses the argmax saved by the forward instead of
    XLA's select-and-scatter, which the CPU backend builds from four index
    tensors and a scatter per pool (about 7% of a U-Net step on 2 cores).
    """
    return jnp.max(_pool_windows(x), axis=3)


def _max_pool_forward(x):
    windows = _pool_windows(x)
    return jnp.max(windows, axis=3), jnp.argmax(windows, axis=3).astype(jnp.int8)


def _max_pool_backward(argmax, grad):
    batch, height, width, channels = grad.shape
    slot = jax.lax.broadcasted_iota(jnp.int8, (batch, height, width, 4, channels), 3)
    windows = jnp.where(slot == argmax[:, :, :, None], grad[:, :, :, None], jnp.zeros((), grad.dtype))
    windows = windows.reshape(batch, height, width, 2, 2, channels).transpose(0, 1, 3, 2, 4, 5)
    return (windows.reshape(batch, 2 * height, 2 * width, channels),)


max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)


# CPU weight gradients of 3x3 convolutions (conv_3x3_same below) come in row blocks of about
# _ROW_BLOCK_POSITIONS output positions (batch x height x width) where a layer has at least
# _ROW_BLOCK_MIN_POSITIONS and at least _ROW_BLOCK_MIN_CHANNELS input or output channels: at width 16,
# batch 4, 224², all but the input conv, the two 16 -> 16 convs and the 14² bottleneck; at width 64, batch
# 8, every layer. Chosen layer by layer and on whole U-Net steps on 2 cores (docs/benchmarks.md).
_ROW_BLOCK_POSITIONS = 4096
_ROW_BLOCK_MIN_POSITIONS = 1024
_ROW_BLOCK_MIN_CHANNELS = 32
# The 1x1 output conv is a matmul from this many positions and input channels.
_MATMUL_MIN_POSITIONS = 1 << 16
_MATMUL_MIN_CHANNELS = 16
_NHWC_HWIO = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _conv_3x3(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC_HWIO)


def _shifted_windows(padded: jnp.ndarray, rows: int, width: int, offsets) -> jnp.ndarray:
    """(B, rows + 2, width + 2, C) -> (B * rows * width, 9 C): the 3x3 windows' pixels, dy-major, at
    row and column offsets ``offsets[dy]``, ``offsets[dx]``."""
    windows = [padded[:, offsets[dy]:offsets[dy] + rows, offsets[dx]:offsets[dx] + width] for dy in range(3) for dx in range(3)]
    return jnp.concatenate(windows, -1).reshape(-1, 9 * padded.shape[-1])


def _kernel_grad_in_row_blocks(x: jnp.ndarray, grad: jnp.ndarray) -> jnp.ndarray:
    """dL/dkernel of ``_conv_3x3``: x (B, H, W, C_in), grad (B, H, W, C_out) -> (3, 3, C_in, C_out).

    dK[dy, dx] = sum over (b, i, j) of x_pad[b, i + dy, j + dx] (x) grad[b, i, j]
               = sum over (b, i, j) of x[b, i, j] (x) grad_pad[b, i + 2 - dy, j + 2 - dx]
    (x_pad, grad_pad: one zero pixel around). A loop over blocks of rows, each one im2col matmul summed
    in float32; the windows are taken of the narrower side (x's 9 C_in columns where C_in < C_out,
    else grad's 9 C_out), the cheaper matrix to write. XLA's CPU backend computes the weight gradient
    as a convolution whose input features are the batch, which its fast kernels (YNNPACK) refuse below
    17 features; its fallback reaches 30-50 GFLOP/s on the U-Net's layers, these blocks two to four
    times that (and, being small, they reuse one buffer where a whole-batch im2col would page-fault a
    new one every step).
    """
    batch, height, width, channels = x.shape
    out_channels = grad.shape[-1]
    rows = max(1, min(height, _ROW_BLOCK_POSITIONS // (batch * width)))
    while height % rows:
        rows -= 1
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    windows_of_x = channels < out_channels
    padded = jnp.pad(x if windows_of_x else grad, pad)

    def add_block(total, start):
        windows = _shifted_windows(jax.lax.dynamic_slice_in_dim(padded, start, rows + 2, axis=1), rows, width,
                                   (0, 1, 2) if windows_of_x else (2, 1, 0))
        if windows_of_x:  # (9 C_in, C_out)
            grad_block = jax.lax.dynamic_slice_in_dim(grad, start, rows, axis=1).reshape(-1, out_channels)
            block = jnp.einsum("pk,pc->kc", windows, grad_block, preferred_element_type=jnp.float32)
        else:  # (C_in, 9 C_out)
            x_block = jax.lax.dynamic_slice_in_dim(x, start, rows, axis=1).reshape(-1, channels)
            block = jnp.einsum("pc,pk->ck", x_block, windows, preferred_element_type=jnp.float32)
        return total + block, None

    shape = (9 * channels, out_channels) if windows_of_x else (channels, 9 * out_channels)
    total, _ = jax.lax.scan(add_block, jnp.zeros(shape, jnp.float32), jnp.arange(0, height, rows))
    if windows_of_x:
        return total.reshape(3, 3, channels, out_channels)
    return total.reshape(channels, 3, 3, out_channels).transpose(1, 2, 0, 3)


@jax.custom_vjp
def _conv_3x3_row_block_grad(x, kernel):
    """``_conv_3x3`` whose kernel gradient comes from ``_kernel_grad_in_row_blocks`` on CPU (XLA's elsewhere)."""
    return _conv_3x3(x, kernel)


def _conv_3x3_forward(x, kernel):
    return _conv_3x3(x, kernel), (x, kernel)


def _conv_3x3_backward(saved, grad):
    x, kernel = saved
    input_grad = jax.vjp(lambda x: _conv_3x3(x, kernel), x)[1](grad)[0]
    kernel_grad = jax.lax.platform_dependent(
        x, grad, cpu=lambda x, grad: _kernel_grad_in_row_blocks(x, grad).astype(kernel.dtype),
        default=lambda x, grad: jax.vjp(lambda kernel: _conv_3x3(x, kernel), kernel)[1](grad)[0])
    return input_grad, kernel_grad


_conv_3x3_row_block_grad.defvjp(_conv_3x3_forward, _conv_3x3_backward)


def _plain_nhwc(rhs, window: tuple, window_strides, padding_accepted: bool, options: dict) -> bool:
    """Whether a ``conv_general_dilated`` call from ``nn.Conv`` is a plain NHWC/HWIO convolution with a
    ``window`` kernel: stride 1, no dilation, one feature group, and the padding its caller accepts."""
    return (rhs.shape[:2] == window and tuple(window_strides) == (1, 1) and padding_accepted
            and tuple(options.get("lhs_dilation") or (1, 1)) == (1, 1)
            and tuple(options.get("rhs_dilation") or (1, 1)) == (1, 1)
            and options.get("dimension_numbers") == _NHWC_HWIO and options.get("feature_group_count", 1) == 1)


def conv_3x3_same(lhs, rhs, window_strides, padding, **options):
    """``lax.conv_general_dilated`` for ``nn.Conv(conv_general_dilated=...)``: a stride-1 'SAME' 3x3
    convolution with enough output positions and channels takes ``_conv_3x3_row_block_grad`` (same values, the
    kernel gradient summed in another order); any other call goes to XLA as it is."""
    if (_plain_nhwc(rhs, (3, 3), window_strides, padding == "SAME", options)
            and math.prod(lhs.shape[:3]) >= _ROW_BLOCK_MIN_POSITIONS and max(rhs.shape[2:]) >= _ROW_BLOCK_MIN_CHANNELS):
        return _conv_3x3_row_block_grad(lhs, rhs)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)


def conv_1x1_as_matmul(lhs, rhs, window_strides, padding, **options):
    """``lax.conv_general_dilated`` for ``nn.Conv(conv_general_dilated=...)``: a stride-1 unpadded 1x1
    convolution with _MATMUL_MIN_POSITIONS positions and _MATMUL_MIN_CHANNELS input channels is computed as
    the matmul it is, (B, H, W, C_in) @ (C_in, C_out); any other call goes to XLA as it is. On 2 CPU cores XLA's
    1x1 convolution to one output channel (the U-Net's output layer at width 64, 224², batch 8) took
    75 ms forward, the matmul 3.4; with its gradient 229 against 92 ms (XLA first transposes the whole
    input to put the batch last); at width 16, batch 4, 12.9 against 4.9 ms with the gradient."""
    batch, height, width, channels = lhs.shape
    if (_plain_nhwc(rhs, (1, 1), window_strides, padding in ("SAME", "VALID"), options)
            and batch * height * width >= _MATMUL_MIN_POSITIONS and channels >= _MATMUL_MIN_CHANNELS):
        return jnp.einsum("bhwc,co->bhwo", lhs, rhs[0, 0], precision=options.get("precision"))
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)


def _batch_statistics(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mean and biased variance over (B, H, W) of x (B, H, W, C), in at least float32, as nn.BatchNorm
    computes them (E[x^2] - E[x]^2, clipped at 0)."""
    axes = tuple(range(x.ndim - 1))
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = x.mean(axes)
    return mean, jnp.maximum(0.0, (x * x).mean(axes) - mean * mean)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_relu(x, scale, bias, epsilon: float):
    """ReLU(BatchNorm(x)) with batch statistics: x (B, H, W, C), scale and bias (C,) ->
    (y (B, H, W, C) in x's dtype, batch mean (C,), batch variance (C,)).

    The values of ``nn.relu(nn.BatchNorm(use_running_average=False)(x))``; the gradient is written out
    (two passes over x and dy: the per-channel sums, then dx) where XLA's differentiation of the two
    modules takes more: on 2 CPU cores 37 against 52 ms for the 17 layers of a width-16 U-Net, forward
    and backward; whole supervised steps 0-3.5 % faster, SSMIS steps unchanged (docs/benchmarks.md).
    The mean and variance are outputs, for the running statistics, and their cotangents are honoured.
    """
    return _batch_norm_relu_forward(x, scale, bias, epsilon)[0]


def _batch_norm_relu_forward(x, scale, bias, epsilon):
    mean, var = _batch_statistics(x)
    inverse_std = jax.lax.rsqrt(var + epsilon)
    y = jnp.maximum((x - mean) * (inverse_std * scale) + bias, 0).astype(x.dtype)
    return (y, mean, var), (x, scale, bias, mean, inverse_std)


def _batch_norm_relu_backward(epsilon, saved, cotangents):
    del epsilon  # In inverse_std.
    x, scale, bias, mean, inverse_std = saved
    dy, dmean, dvar = cotangents
    axes, count = tuple(range(x.ndim - 1)), x.size // x.shape[-1]
    normalized = (x - mean) * inverse_std
    dy = jnp.where(normalized * scale + bias > 0, dy, 0).astype(normalized.dtype)  # Through the ReLU.
    dbias, dscale = dy.sum(axes), (dy * normalized).sum(axes)
    # dx = a dy + b x_hat + c per channel: the normalisation's own terms, then the mean's and variance's
    # cotangents (dmean / N and dvar 2 (x - mean) / N).
    a = scale * inverse_std
    b = (2 * dvar / inverse_std - a * dscale) / count
    c = (dmean - a * dbias) / count
    return (a * dy + b * normalized + c).astype(x.dtype), dscale, dbias


batch_norm_relu.defvjp(_batch_norm_relu_forward, _batch_norm_relu_backward)


class BatchNormReLU(nn.Module):
    """``nn.relu(nn.BatchNorm(momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON)(x))`` with the same
    variables ('params': scale, bias; 'batch_stats': mean, var) and outputs; in training its gradient
    comes from ``batch_norm_relu``, and the running variance averages the unbiased batch variance, as
    torch's BatchNorm2d in the authors' U-Net (``ops.running_batch_statistics``).
    (B, H, W, C) -> (B, H, W, C) in ``dtype``."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        channels = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        if not train:
            y = (x - running_mean.value) * (jax.lax.rsqrt(running_var.value + BATCH_NORM_EPSILON) * scale) + bias
            return nn.relu(y).astype(self.dtype)
        y, mean, var = batch_norm_relu(x, scale, bias, BATCH_NORM_EPSILON)
        if not self.is_initializing():  # As nn.BatchNorm: initialisation leaves the statistics as they start.
            running_mean.value, running_var.value = running_batch_statistics(
                running_mean.value, running_var.value, mean, var, x.size // channels)
        return y.astype(self.dtype)


class ConvBlock(nn.Module):
    """``num_convs`` x [Conv3x3, BatchNorm, ReLU]; with ``torch_layers`` the convs
    have biases and torch's default initialisation (the authors' U-Net)."""

    features: int
    dtype: Any = jnp.float32
    num_convs: int = 2
    torch_layers: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        for index in range(self.num_convs):
            if self.torch_layers:
                conv = nn.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype, kernel_init=torch_kernel_init,
                               bias_init=torch_bias_init(9 * x.shape[-1]), conv_general_dilated=conv_3x3_same)
            else:
                conv = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                               conv_general_dilated=conv_3x3_same)
            # Named as nn.BatchNorm would be: checkpoints keep their variable names.
            x = BatchNormReLU(self.dtype, name=f"BatchNorm_{index}")(conv(x), train)
        return x


class UpConv2x2(nn.Module):
    """Transposed convolution 2x2 with stride 2, as two matmuls and a row interleave.

    Same parameters (kernel (2, 2, C_in, C_out), bias) and outputs as
    ``nn.ConvTranspose(C_out, (2, 2), strides=(2, 2))``: output pixel
    (2i + a, 2j + b) is x[i, j] @ kernel[1 - a, 1 - b] + bias (torch's
    ConvTranspose2d weight W (C_in, C_out, 2, 2) is kernel[1 - a, 1 - b] =
    W[:, :, a, b]). One matmul per output row parity a gives the rows 2i + a
    already in their memory order, (B, h, w, 2, C_out), so neither the
    forward nor its gradients transpose the output; XLA's CPU backend runs
    the input-dilated convolution that ConvTranspose lowers to several times
    slower, and a single matmul to (B, h, w, 2, 2, C_out) then needs a
    transpose each way (2.4-3x the time of these two with the gradients, on 2 cores).
    (B, h, w, C_in) -> (B, 2h, 2w, C_out).
    """

    features: int
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (2, 2, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        batch, height, width, channels = x.shape
        pixels = x.astype(self.dtype).reshape(-1, channels)
        # kernel[1 - a] as (C_in, 2 C_out): the output columns 2j and 2j + 1 side by side.
        row_kernels = kernel[::-1, ::-1].transpose(0, 2, 1, 3).reshape(2, channels, 2 * self.features).astype(self.dtype)
        rows = [(pixels @ row_kernels[a]).reshape(batch, height, 2 * width * self.features) for a in range(2)]
        y = jnp.stack(rows, axis=2)  # (B, h, 2, 2w C_out): row 2i + a.
        return y.reshape(batch, 2 * height, 2 * width, self.features) + bias.astype(self.dtype)


class UNet(nn.Module):
    """Encoder-decoder with skips; ``architecture`` is 'authors' or 'textbook' (module docstring).

    Input (B, H, W, 3) in [0, 1] with H, W divisible by 16; output logits
    (B, H, W, num_classes) in float32 (num_classes = 1 for binary tasks).
    Under jit with a batch sharded over devices, BatchNorm statistics are
    those of the global batch.
    """

    num_classes: int = 1
    base_width: int = 64
    dtype: Any = jnp.float32
    architecture: str = "authors"

    @nn.compact
    def __call__(self, images, train: bool = False):
        images = images.astype(self.dtype)
        if self.architecture == "authors":
            x = self._authors(images, train)
        elif self.architecture == "textbook":
            x = self._textbook(images, train)
        else:
            raise ValueError(f"U-Net architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        return x.astype(jnp.float32)

    def _authors(self, x, train):
        w = self.base_width
        block = lambda features, name, num_convs=2: ConvBlock(  # noqa: E731
            features, self.dtype, num_convs, torch_layers=True, name=name)
        x = block(w, "inc", num_convs=1)(x, train)
        skips = []
        for level, features in enumerate((2 * w, 4 * w, 8 * w, 8 * w), start=1):
            skips.append(x)
            x = max_pool_2x2(x)
            x = block(features, f"down{level}")(x, train)
        for level, features in zip((4, 3, 2, 1), (4 * w, 2 * w, w, w)):
            channels = x.shape[-1]
            # torch's fan_in of a ConvTranspose2d weight (C_in, C_out, 2, 2) is C_out * 4.
            x = UpConv2x2(channels, self.dtype, torch_kernel_init, torch_bias_init(4 * channels), name=f"up{level}")(x)
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = block(features, f"up{level}_convs")(x, train)
        return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, kernel_init=torch_kernel_init,
                       bias_init=torch_bias_init(w), name="outc", conv_general_dilated=conv_1x1_as_matmul)(x)

    def _textbook(self, x, train):
        widths = [self.base_width * 2**i for i in range(5)]
        x = ConvBlock(widths[0], self.dtype)(x, train)
        skips = []
        for width in widths[1:]:
            skips.append(x)
            x = max_pool_2x2(x)
            x = ConvBlock(width, self.dtype)(x, train)
        for level, (width, skip) in enumerate(zip(reversed(widths[:-1]), reversed(skips))):
            # Named as nn.ConvTranspose would be: checkpoints keep their parameter names.
            x = UpConv2x2(width, self.dtype, name=f"ConvTranspose_{level}")(x)
            x = jnp.concatenate([x, skip], axis=-1)
            x = ConvBlock(width, self.dtype)(x, train)
        return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, conv_general_dilated=conv_1x1_as_matmul)(x)
