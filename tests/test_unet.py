"""The U-Nets: the authors' against their PyTorch module's outputs (parity fixture),
the upsampling against flax's transposed convolution, shapes and parameter names."""

import zlib

import flax.linen as nn
from flax.traverse_util import flatten_dict
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amvlm_jax.models import unet as unet_module
from amvlm_jax.models.unet import (BatchNormReLU, ConvBlock, UNet, UpConv2x2, batch_norm_relu, conv_1x1_as_matmul, conv_3x3_same,
                                   max_pool_2x2)
from amvlm_jax.ops import BATCH_NORM_EPSILON, BATCH_NORM_MOMENTUM, running_batch_statistics


def _authors_tensor(name: str, shape: list) -> np.ndarray:
    """The fixture's recipe (meta 'weights'): every torch tensor from a generator seeded by its name."""
    rng = np.random.default_rng(zlib.crc32(name.encode("utf-8")))
    if name.endswith("running_var"):
        value = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("running_mean"):
        value = rng.normal(0, 0.1, shape)
    elif name.endswith("norm.weight"):
        value = rng.normal(1, 0.1, shape)
    elif name.endswith("bias"):
        value = rng.normal(0, 0.1, shape)
    else:
        value = rng.normal(0, 1, shape) * np.sqrt(2 / np.prod(shape[1:]))
    return value.astype(np.float32)


def _flax_path(torch_name: str) -> tuple[str, tuple[str, ...], str]:
    """torch state_dict name -> (collection, module path, leaf) of the authors' flax U-Net."""
    *modules, leaf = torch_name.split(".")
    top = modules[0]
    if leaf == "weight" and not modules[-1] == "norm":
        leaf = "kernel"
    if top == "outc":
        return "params", ("outc",), leaf
    if modules[1] == "up":  # up4.up.weight -> up4/kernel
        return "params", (top,), leaf
    if top == "inc":  # inc.{conv,norm}
        block, index = ("inc",), 0
        layer = modules[1]
    else:  # down1.nConvs.0.conv / up4.nConvs.1.norm
        block = (top if top.startswith("down") else f"{top}_convs",)
        index, layer = int(modules[2]), modules[3]
    if layer == "conv":
        return "params", block + (f"Conv_{index}",), leaf
    collection = "batch_stats" if leaf.startswith("running") else "params"
    leaf = {"weight": "scale", "running_mean": "mean", "running_var": "var"}.get(leaf, leaf)
    return collection, block + (f"BatchNorm_{index}",), leaf


def _to_flax(name: str, value: np.ndarray) -> np.ndarray:
    if value.ndim == 4 and name.endswith("up.weight"):  # ConvTranspose2d (I, O, 2, 2): UpConv2x2's flipped HWIO.
        return value.transpose(2, 3, 0, 1)[::-1, ::-1]
    if value.ndim == 4:  # Conv2d OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    return value


def test_authors_unet_matches_their_module(parity):
    """utils/UNet.py UNet(3, 1) in eval mode, weights rebuilt from the fixture's recipe."""
    arrays, meta = parity("unet.npz")
    model = UNet(num_classes=1, base_width=64, architecture="authors")
    x = jnp.asarray(arrays["in/x"].transpose(0, 2, 3, 1))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1]))
    variables = {"params": {}, "batch_stats": {}}
    for name, shape in meta["state_dict"]:
        if name.endswith("num_batches_tracked"):
            continue
        collection, path, leaf = _flax_path(name)
        node = variables[collection]
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(_to_flax(name, _authors_tensor(name, shape)))
    # Every flax variable came from exactly one torch tensor, with the right shape.
    assert ({k: v.shape for k, v in flatten_dict(variables).items()}
            == {k: v.shape for k, v in flatten_dict(shapes).items()})
    count = sum(int(np.prod(shape)) for name, shape in meta["state_dict"]
                if not any(name.endswith(s) for s in ("running_mean", "running_var", "num_batches_tracked")))
    assert count == meta["trainable_parameters"] == sum(p.size for p in jax.tree.leaves(variables["params"]))
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(logits, arrays["mid/logits"], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(logits)), arrays["out/y"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("architecture, expected", [("authors", 14_751_873), ("textbook", 31_037_633)])
def test_parameter_counts_at_width_64(architecture, expected):
    """SPEC 6's counts for one output channel."""
    shapes = jax.eval_shape(lambda: UNet(1, 64, architecture=architecture).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    assert sum(p.size for p in jax.tree.leaves(shapes["params"])) == expected


def test_authors_unet_initialisation_is_torch_default():
    """Conv weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as torch initialises the authors' layers."""
    # 64 classes: enough output biases to see their spread. One compile.
    params = jax.jit(UNet(64, 8).init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    conv, up, out = params["down2"]["Conv_0"], params["up4"], params["outc"]
    assert up["kernel"].shape == (2, 2, 64, 64)
    # down2: 16 -> 32 channels, fan_in 9 * 16; up4: 8w = 64 channels kept, fan_in 64 * 4; outc: fan_in w = 8.
    for value, fan_in in ((conv["kernel"], 144), (conv["bias"], 144), (up["kernel"], 256), (up["bias"], 256),
                          (out["kernel"], 8), (out["bias"], 8)):
        assert float(jnp.max(jnp.abs(value))) <= 1 / np.sqrt(fan_in) + 1e-7
        assert float(jnp.std(value)) == pytest.approx(1 / np.sqrt(fan_in) / np.sqrt(3), rel=0.2)


def test_max_pool_equals_flax_max_pool_in_values_and_gradients():
    """Random values, and ties (a constant image and repeated values), where the gradient goes to
    the first maximum of each window as in XLA's select-and-scatter."""
    random = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 6, 3))
    ties = jnp.round(random * 1.5)  # Many windows hold a repeated maximum.
    reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
    for x in (random, ties, jnp.zeros((1, 4, 4, 2))):
        np.testing.assert_array_equal(jax.jit(max_pool_2x2)(x), reference(x))
        weights = jax.random.normal(jax.random.PRNGKey(1), (x.shape[0], x.shape[1] // 2, x.shape[2] // 2, x.shape[3]))
        ours, theirs = (jax.jit(jax.grad(lambda x, f=f: jnp.sum(weights * f(x))))(x) for f in (max_pool_2x2, reference))
        np.testing.assert_array_equal(ours, theirs)


class _FlaxBatchNormReLU(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM,
                                    epsilon=BATCH_NORM_EPSILON, name="norm")(x))


class _OursBatchNormReLU(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return BatchNormReLU(name="norm")(x, train)


def _unbiased_running_var(old, flax_new, count):
    """The running variance torch keeps where nn.BatchNorm (which averages the biased one) moved old to flax_new."""
    biased = (flax_new - BATCH_NORM_MOMENTUM * old) / (1 - BATCH_NORM_MOMENTUM)
    return BATCH_NORM_MOMENTUM * old + (1 - BATCH_NORM_MOMENTUM) * biased * count / (count - 1)


def test_running_statistics_by_hand_and_finite_for_a_single_value():
    """torch's update with momentum 0.1: mean 0.9 * 1 + 0.1 * 3 = 1.2; variance from the unbiased one,
    0.9 * 2 + 0.1 * (0.6 * 4 / 3) = 1.88. One value per channel (a masked head with one real row) has no
    unbiased variance: its running variance decays by 0.9 instead of turning NaN for the whole run."""
    mean, var = running_batch_statistics(jnp.ones(2), jnp.full(2, 2.0), jnp.full(2, 3.0), jnp.full(2, 0.6), 4)
    np.testing.assert_allclose(mean, 1.2, rtol=1e-6)
    np.testing.assert_allclose(var, 1.88, rtol=1e-6)
    mean, var = running_batch_statistics(jnp.ones(2), jnp.full(2, 2.0), jnp.full(2, 3.0), jnp.zeros(2), jnp.float32(1))
    np.testing.assert_allclose(mean, 1.2, rtol=1e-6)
    np.testing.assert_allclose(var, 1.8, rtol=1e-6)


def test_batch_norm_relu_equals_flax_batch_norm_and_relu():
    """Same variables, outputs, running mean and gradients (input, scale, bias) as nn.BatchNorm
    followed by nn.relu, in training and evaluation, and the running variance torch keeps (unbiased);
    a channel that is all zeros, one with a constant and an offset mean included (the ReLU and the
    variance's clipping)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 5, 6)) * 2.0 + 0.7
    x = x.at[..., 0].set(0.0).at[..., 1].set(3.0).at[..., 2].add(40.0)
    theirs, ours = _FlaxBatchNormReLU(), _OursBatchNormReLU()
    variables = theirs.init(jax.random.PRNGKey(1), x, True)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x, True)) == jax.tree.map(jnp.shape, variables)
    variables = jax.tree.map(lambda v: v + jax.random.uniform(jax.random.PRNGKey(2), v.shape, minval=0.1, maxval=0.5), variables)
    weights = jax.random.normal(jax.random.PRNGKey(3), x.shape)

    def loss(module):
        def f(params, x):
            y, updates = module.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
            return jnp.sum(weights * y) + 0.1 * jnp.sum(y * y), (y, updates)
        return jax.jit(jax.grad(f, (0, 1), has_aux=True))

    (their_grads, (their_y, their_stats)), (our_grads, (our_y, our_stats)) = (
        loss(module)(variables["params"], x) for module in (theirs, ours))
    np.testing.assert_allclose(our_y, their_y, rtol=1e-6, atol=1e-6)
    ours_moved, theirs_moved = our_stats["batch_stats"]["norm"], their_stats["batch_stats"]["norm"]
    np.testing.assert_allclose(ours_moved["mean"], theirs_moved["mean"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours_moved["var"], _unbiased_running_var(variables["batch_stats"]["norm"]["var"],
                                                                       theirs_moved["var"], 3 * 6 * 5), rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(our_grads), jax.tree.leaves(their_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    np.testing.assert_array_equal(ours.apply(variables, x, False), theirs.apply(variables, x, False))


def test_batch_norm_relu_in_bfloat16_keeps_float32_statistics():
    """bfloat16 compute: the output and input gradient in bfloat16, statistics and parameter gradients in
    float32, and the values of nn.BatchNorm(dtype=bfloat16) followed by nn.relu to bfloat16 rounding."""
    x = (jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8)) * 3 + 1).astype(jnp.bfloat16)
    theirs = nn.BatchNorm(use_running_average=False, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON,
                          dtype=jnp.bfloat16)
    ours = BatchNormReLU(jnp.bfloat16)
    variables = theirs.init(jax.random.PRNGKey(1), x)
    (their_y, their_stats), (our_y, our_stats) = (
        theirs.apply(variables, x, mutable=["batch_stats"]), ours.apply(variables, x, True, mutable=["batch_stats"]))
    assert our_y.dtype == jnp.bfloat16 and our_stats["batch_stats"]["mean"].dtype == jnp.float32
    np.testing.assert_allclose(np.float32(our_y), np.float32(nn.relu(their_y)), rtol=2e-2, atol=2e-2)
    ours_moved, theirs_moved = our_stats["batch_stats"], their_stats["batch_stats"]
    np.testing.assert_allclose(ours_moved["mean"], theirs_moved["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours_moved["var"], _unbiased_running_var(variables["batch_stats"]["var"],
                                                                       theirs_moved["var"], 2 * 4 * 4), rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda params, x: jnp.sum(ours.apply({**variables, "params": params}, x, True,
                                                          mutable=["batch_stats"])[0].astype(jnp.float32)), (0, 1))
    param_grads, input_grad = grads(variables["params"], x)
    assert input_grad.dtype == jnp.bfloat16 and all(g.dtype == jnp.float32 for g in jax.tree.leaves(param_grads))


def test_batch_norm_relu_honours_the_statistics_cotangents():
    """A loss of the batch mean and variance too differentiates as the plain formula does."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3)) + 1.0
    scale, bias = jnp.array([1.5, -0.5, 1.0]), jnp.array([0.2, 0.1, -0.3])

    def plain(x, scale, bias, epsilon):
        mean = x.mean((0, 1, 2))
        var = jnp.maximum(0.0, (x * x).mean((0, 1, 2)) - mean * mean)
        return jax.nn.relu((x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias), mean, var

    def loss(f):
        def total(x, scale, bias):
            y, mean, var = f(x, scale, bias, BATCH_NORM_EPSILON)
            return jnp.sum(jnp.sin(y)) + jnp.sum(mean ** 3) + jnp.sum(jnp.cos(var))
        return jax.grad(total, (0, 1, 2))(x, scale, bias)

    for a, b in zip(loss(batch_norm_relu), loss(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_up_conv_equals_conv_transpose_in_values_and_gradients():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 4))
    reference = nn.ConvTranspose(6, (2, 2), strides=(2, 2))
    params = reference.init(jax.random.PRNGKey(1), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # A non-zero bias too.
    ours = UpConv2x2(6)
    # Same initial parameters from the same key: checkpoints and seeds carry over.
    for a, b in zip(jax.tree.leaves(reference.init(jax.random.PRNGKey(1), x)), jax.tree.leaves(ours.init(jax.random.PRNGKey(1), x))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5)
    assert ours.apply(params, x).shape == (2, 6, 10, 6)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

    for ours_grad, reference_grad in zip(jax.grad(loss(ours), (0, 1))(params, x), jax.grad(loss(reference), (0, 1))(params, x)):
        for a, b in zip(jax.tree.leaves(ours_grad), jax.tree.leaves(reference_grad)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _conv_call(conv, x, kernel, strides=(1, 1)):
    return conv(x, kernel, strides, "SAME", lhs_dilation=(1, 1), rhs_dilation=(1, 1),
                dimension_numbers=unet_module._NHWC_HWIO, feature_group_count=1, precision=None)


@pytest.mark.parametrize("in_channels, out_channels", [(64, 64), (16, 48), (48, 16)])
def test_conv_3x3_row_block_kernel_gradient_equals_xla(in_channels, out_channels):
    """Layers big enough for the CPU row-block kernel gradient (2 x 130 x 260 = 67,600 positions; 130
    rows are not a multiple of the 7 that fit a block, so blocks of 5), with the windows taken of the
    input (C_in < C_out) and of the output gradient (C_in >= C_out): same outputs and input gradients as
    XLA's convolution, the kernel gradient to float32 rounding."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 130, 260, in_channels))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, in_channels, out_channels)) * 0.05
    weights = jax.random.normal(jax.random.PRNGKey(2), (2, 130, 260, out_channels))
    losses = {name: (lambda x, kernel, conv=conv: jnp.sum(weights * jnp.tanh(_conv_call(conv, x, kernel))))
              for name, conv in (("ours", conv_3x3_same), ("xla", jax.lax.conv_general_dilated))}
    assert "scan" in str(jax.make_jaxpr(jax.grad(losses["ours"], 1))(x, kernel))
    ours, xla = (jax.jit(jax.grad(losses[name], (0, 1)))(x, kernel) for name in ("ours", "xla"))
    np.testing.assert_array_equal(ours[0], xla[0])
    assert float(jnp.max(jnp.abs(ours[1] - xla[1]))) <= 2e-5 * float(jnp.max(jnp.abs(xla[1])))


def test_conv_3x3_row_block_rule():
    """From 1,024 positions and 32 input or output channels; other strides stay XLA's."""
    for shape, out, strides, row_blocks in (((1, 64, 64, 32), 16, (1, 1), True), ((1, 64, 64, 16), 32, (1, 1), True),
                                            ((1, 32, 32, 64), 64, (1, 1), True), ((1, 32, 31, 64), 64, (1, 1), False),
                                            ((8, 224, 224, 16), 16, (1, 1), False), ((2, 256, 256, 64), 64, (2, 2), False),
                                            ((8, 14, 14, 512), 512, (1, 1), True)):
        jaxpr = jax.make_jaxpr(lambda x: _conv_call(conv_3x3_same, x, jnp.zeros((3, 3, shape[-1], out)), strides))
        assert ("custom_vjp" in str(jaxpr(jnp.zeros(shape)))) == row_blocks, (shape, out)


def test_conv_1x1_as_matmul_equals_xla():
    """An output layer big enough for the matmul (67,600 positions, 64 channels) to 1 and to 3 classes:
    outputs and both gradients equal XLA's convolution's to float32 rounding; small or narrow layers
    and other strides stay XLA's convolution."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 130, 260, 64))
    for out in (1, 3):
        kernel = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 64, out)) * 0.1
        jaxpr = str(jax.make_jaxpr(lambda x, k: _conv_call(conv_1x1_as_matmul, x, k))(x, kernel))
        assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr
        outputs = {name: _conv_call(conv, x, kernel) for name, conv in
                   (("ours", conv_1x1_as_matmul), ("xla", jax.lax.conv_general_dilated))}
        np.testing.assert_allclose(outputs["ours"], outputs["xla"], rtol=1e-5, atol=1e-5)
        weights = jax.random.normal(jax.random.PRNGKey(2), outputs["xla"].shape)
        ours, xla = (jax.jit(jax.grad(lambda x, k, conv=conv: jnp.sum(weights * jnp.tanh(_conv_call(conv, x, k))),
                                      (0, 1)))(x, kernel)
                     for conv in (conv_1x1_as_matmul, jax.lax.conv_general_dilated))
        for a, b in zip(ours, xla):
            assert float(jnp.max(jnp.abs(a - b))) <= 2e-5 * float(jnp.max(jnp.abs(b)))
    for shape, strides in (((2, 64, 64, 64), (1, 1)), ((2, 256, 256, 8), (1, 1)), ((2, 256, 256, 64), (2, 2))):
        jaxpr = jax.make_jaxpr(lambda x: _conv_call(conv_1x1_as_matmul, x, jnp.zeros((1, 1, shape[-1], 1)), strides))
        assert "dot_general" not in str(jaxpr(jnp.zeros(shape)))


def test_unet_convs_take_row_block_kernel_gradients(monkeypatch):
    """With the thresholds lowered, every 3x3 conv of the U-Net's gradient takes the row-block path and
    its output conv the matmul, and the gradients of a ConvBlock (both conv kinds, train-mode BatchNorm) equal XLA's."""
    model = UNet(num_classes=1, base_width=4)
    images = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(1), images))

    def unet_scans():
        def loss(params, batch_stats):
            logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                    mutable=["batch_stats"])
            return jnp.sum(logits)
        return str(jax.make_jaxpr(jax.grad(loss))(variables["params"], variables["batch_stats"])).count("scan[")

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    blocks = {torch_layers: ConvBlock(8, torch_layers=torch_layers) for torch_layers in (False, True)}
    block_variables = {key: block.init(jax.random.PRNGKey(1), x, train=False) for key, block in blocks.items()}

    def block_gradients(torch_layers):
        def loss(params, x):
            y, _ = blocks[torch_layers].apply({**block_variables[torch_layers], "params": params}, x, train=True,
                                              mutable=["batch_stats"])
            return jnp.mean(jnp.sin(3 * y))
        return jax.jit(jax.grad(loss, (0, 1)))(block_variables[torch_layers]["params"], x)

    def unet_convolutions():
        return str(jax.make_jaxpr(model.apply)(variables, images)).count("conv_general_dilated[")

    plain = [(unet_scans(), unet_convolutions())] + [block_gradients(torch_layers) for torch_layers in (False, True)]
    for threshold, value in (("_ROW_BLOCK_POSITIONS", 1), ("_ROW_BLOCK_MIN_POSITIONS", 0), ("_ROW_BLOCK_MIN_CHANNELS", 1),
                             ("_MATMUL_MIN_POSITIONS", 0), ("_MATMUL_MIN_CHANNELS", 1)):
        monkeypatch.setattr(unet_module, threshold, value)
    row_blocks = [(unet_scans(), unet_convolutions())] + [block_gradients(torch_layers) for torch_layers in (False, True)]
    # 17 3x3 convs (the input conv, 2 in each of 4 down and 4 up stages) take the row blocks; the output
    # 1x1 conv becomes a matmul (test_conv_1x1_as_matmul_equals_xla checks its values).
    assert (plain[0], row_blocks[0]) == ((0, 18), (17, 17))
    for ours, theirs in zip(row_blocks[1:], plain[1:]):
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("width, images, row_block_convs", [
    # Width 16: all but the input conv and the two 16 -> 16 convs ...
    (16, (8, 224, 224, 3), 14), (16, (16, 128, 128, 3), 14),
    (16, (4, 224, 224, 3), 12),  # ... and the 14² bottleneck (784 positions).
    (64, (8, 224, 224, 3), 17),  # Every 3x3 conv.
])
def test_which_unet_convs_take_row_block_kernel_gradients(width, images, row_block_convs):
    model = UNet(num_classes=1, base_width=width)
    images = jax.ShapeDtypeStruct(images, jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(1), x), images)

    def loss(params, batch_stats, x):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(logits)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"], variables["batch_stats"], images)
    assert str(jaxpr).count("scan[") == row_block_convs


@pytest.mark.parametrize("architecture, up_kernels", [
    ("authors", {"up4": (2, 2, 32, 32), "up3": (2, 2, 16, 16), "up2": (2, 2, 8, 8), "up1": (2, 2, 4, 4)}),
    ("textbook", {"ConvTranspose_0": (2, 2, 64, 32), "ConvTranspose_1": (2, 2, 32, 16),
                  "ConvTranspose_2": (2, 2, 16, 8), "ConvTranspose_3": (2, 2, 8, 4)}),
])
def test_unet_shapes_and_parameter_names(architecture, up_kernels):
    model = UNet(num_classes=3, base_width=4, architecture=architecture)
    # Shapes only: eval_shape compiles nothing.
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    assert jax.eval_shape(model.apply, variables, jnp.zeros((2, 32, 32, 3))).shape == (2, 32, 32, 3)
    # bfloat16 compute still returns float32 logits.
    bfloat16 = UNet(num_classes=3, base_width=4, architecture=architecture, dtype=jnp.bfloat16)
    assert jax.eval_shape(bfloat16.apply, variables, jnp.zeros((2, 32, 32, 3))).dtype == jnp.float32
    up = {name: p["kernel"].shape for name, p in variables["params"].items()
          if name.startswith("ConvTranspose") or name in ("up4", "up3", "up2", "up1")}
    assert up == up_kernels


def test_torch_timing_reference_trains_our_unet():
    """tools/torch_unet_reference.py (the PyTorch side of docs/benchmarks.md's U-Net comparisons) loaded with our
    variables gives our model's eval outputs and our training step's logits, loss, gradients and running
    BatchNorm statistics (torch's, whose running variance is unbiased), so both sides time one computation."""
    torch = pytest.importorskip("torch", reason="torch is needed for the PyTorch timing reference")
    from conftest import repo_module
    from amvlm_jax.losses.segmentation import dice_bce_loss

    reference = repo_module("tools/torch_unet_reference.py")
    model = UNet(num_classes=1, base_width=4)
    images = jax.random.uniform(jax.random.PRNGKey(3), (2, 32, 32, 3))
    targets = (images[..., 0] > 0.5).astype(jnp.float32)
    variables = model.init(jax.random.PRNGKey(4), images)
    # Stored statistics away from (0, 1), so that the eval-mode check reads them.
    stats = jax.tree.map(lambda s: s + 0.3 * jax.random.uniform(jax.random.PRNGKey(5), s.shape), variables["batch_stats"])
    torch_unet = reference.load_flax_variables(reference.AuthorsUNet(4), jax.device_get(variables["params"]),
                                               jax.device_get(stats))
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        eval_logits = torch_unet.eval()(x).numpy()[:, 0]
    np.testing.assert_allclose(eval_logits, np.asarray(model.apply({**variables, "batch_stats": stats}, images))[..., 0],
                               rtol=1e-4, atol=1e-5)

    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": stats}, images, train=True, mutable=["batch_stats"])
        return dice_bce_loss(logits, targets), (logits, updates["batch_stats"])
    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    torch_logits = torch_unet.train()(x)
    torch_loss = reference.dice_bce_loss(torch_logits, torch.from_numpy(np.array(targets)))
    torch_loss.backward()
    np.testing.assert_allclose(torch_logits.detach().numpy()[:, 0], np.asarray(logits)[..., 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(torch_loss.item(), float(loss), rtol=1e-5)
    # Read back in torch's layout through the same copy: our gradients, and our running statistics.
    ours = reference.load_flax_variables(reference.AuthorsUNet(4), jax.device_get(grads), jax.device_get(new_stats))
    for (name, theirs), mine in zip(torch_unet.named_parameters(), ours.parameters()):
        np.testing.assert_allclose(theirs.grad.numpy(), mine.detach().numpy(), rtol=1e-3, atol=1e-6, err_msg=name)
    buffers = [(name, b) for name, b in torch_unet.named_buffers() if name.endswith(("running_mean", "running_var"))]
    assert len(buffers) == 2 * 17
    for (name, theirs), mine in zip(buffers, [b for n, b in ours.named_buffers() if n.endswith(("mean", "var"))]):
        np.testing.assert_allclose(theirs.numpy(), mine.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


class _TextbookBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        for index in range(2):
            x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name=f"Conv_{index}")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-5, name=f"BatchNorm_{index}")(x))
        return x


class _TextbookReference(nn.Module):
    """The textbook U-Net from flax's own layers (eval mode), with the parameter names checkpoints keep."""

    @nn.compact
    def __call__(self, x):
        widths = (2, 4, 8, 16, 32)
        x = _TextbookBlock(widths[0], name="ConvBlock_0")(x)
        skips = []
        for level, width in enumerate(widths[1:], start=1):
            skips.append(x)
            x = _TextbookBlock(width, name=f"ConvBlock_{level}")(nn.max_pool(x, (2, 2), strides=(2, 2)))
        for level, width in enumerate((16, 8, 4, 2)):
            x = nn.ConvTranspose(width, (2, 2), strides=(2, 2), name=f"ConvTranspose_{level}")(x)
            x = _TextbookBlock(width, name=f"ConvBlock_{5 + level}")(jnp.concatenate([x, skips.pop()], axis=-1))
        return nn.Conv(2, (1, 1), name="Conv_0")(x)


def test_textbook_unet_matches_a_reference_from_flax_layers():
    """Max-pool, transposed convolutions, the up-sampled map ahead of its skip, bias-free 3x3 convs and
    eval-mode BatchNorm with stored statistics: the textbook U-Net (width 2, 2 classes) computes what
    flax's nn.Conv / nn.BatchNorm / nn.max_pool / nn.ConvTranspose compute with its variables."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
    model = UNet(num_classes=2, base_width=2, architecture="textbook")
    variables = model.init(jax.random.PRNGKey(1), x)
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    variables = jax.tree.unflatten(tree, [v + jax.random.uniform(k, v.shape, minval=0.1, maxval=0.5) for v, k in zip(leaves, keys)])
    reference = _TextbookReference()
    assert (jax.tree.map(jnp.shape, reference.init(jax.random.PRNGKey(1), x))
            == jax.tree.map(jnp.shape, variables))
    np.testing.assert_allclose(model.apply(variables, x), reference.apply(variables, x), rtol=1e-4, atol=1e-5)


def test_running_batch_statistics_by_hand():
    """SPEC 6's torch BatchNorm: eps 1e-5, momentum 0.1 (0.1 of the batch's statistics enter the running ones),
    the running variance fed the unbiased variance var * n / (n - 1); n = 1 (one value per channel: var 0)
    keeps the variance finite, as torch does. Traced counts give the same."""
    from amvlm_jax.ops import running_batch_statistics

    assert BATCH_NORM_EPSILON == 1e-5
    mean, var = running_batch_statistics(jnp.array([1.0, 0.0]), jnp.array([1.0, 2.0]), jnp.array([3.0, -2.0]),
                                         jnp.array([0.5, 0.0]), 5)
    np.testing.assert_allclose(mean, [0.9 * 1 + 0.1 * 3, 0.1 * -2], rtol=1e-6)
    np.testing.assert_allclose(var, [0.9 * 1 + 0.1 * 0.625, 0.9 * 2], rtol=1e-6)  # 0.5 * 5 / 4 = 0.625
    traced = jax.jit(running_batch_statistics)(jnp.ones(1), jnp.ones(1), jnp.ones(1), jnp.array([0.5]), 5.0)
    np.testing.assert_allclose(traced[1], [0.9625], rtol=1e-6)
    single = running_batch_statistics(jnp.ones(1), jnp.full(1, 2.0), jnp.full(1, 4.0), jnp.zeros(1), 1)
    np.testing.assert_allclose(np.concatenate(single), [1.3, 1.8], rtol=1e-6)
    pair = running_batch_statistics(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.array([0.25]), 2)  # Unbiased: 0.5.
    np.testing.assert_allclose(pair[1], [0.05], rtol=1e-6)
