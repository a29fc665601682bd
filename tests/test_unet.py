"""The U-Net's upsampling equals flax's transposed convolution; shapes and parameter names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amvlm_jax.models.unet import UNet, UpConv2x2


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


def test_unet_shapes_and_parameter_names():
    model = UNet(num_classes=3, base_width=4)
    # Shapes only: eval_shape compiles nothing.
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    assert jax.eval_shape(model.apply, variables, jnp.zeros((2, 32, 32, 3))).shape == (2, 32, 32, 3)
    up = {name: p["kernel"].shape for name, p in variables["params"].items() if name.startswith("ConvTranspose")}
    assert up == {"ConvTranspose_0": (2, 2, 64, 32), "ConvTranspose_1": (2, 2, 32, 16),
                  "ConvTranspose_2": (2, 2, 16, 8), "ConvTranspose_3": (2, 2, 8, 4)}
