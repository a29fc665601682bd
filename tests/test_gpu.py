"""Checks that need a GPU (skipped elsewhere): the fused cuDNN ViT attention against the explicit one.

Run on a GPU machine with ``JAX_PLATFORMS=cuda python -m pytest tests/test_gpu.py``
(tests/conftest.py defaults to the CPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amvlm_jax.models.vit import ViT

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a CUDA GPU: run with JAX_PLATFORMS=cuda (tests/conftest.py defaults to the CPU)")


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def test_cudnn_vit_attention_is_as_accurate_as_the_explicit_softmax():
    """bfloat16 with the fused kernel vs bfloat16 with the explicit softmax, both against a float32
    reference (full-precision matmuls): outputs, loss and all parameter gradients (as one vector:
    a single leaf's gradient can be a sum that cancels to rounding noise) are no further off."""
    images = jax.random.uniform(jax.random.PRNGKey(1), (4, 64, 64, 3))  # 17 tokens: the padded path.
    shape = dict(width=128, depth=2, num_heads=2)
    models = {"reference": ViT(**shape), "explicit": ViT(**shape, dtype=jnp.bfloat16),
              "fused": ViT(**shape, dtype=jnp.bfloat16, attention="cudnn")}
    params = models["reference"].init(jax.random.PRNGKey(0), images)["params"]

    def loss(params, model):
        out = model.apply({"params": params}, images)
        return (out["patches"].astype(jnp.float32) ** 2).mean() + out["cls_attention"].std(), out

    results = {}
    for name, model in models.items():
        with jax.default_matmul_precision("highest" if name == "reference" else "default"):
            results[name] = jax.jit(jax.value_and_grad(lambda p, m=model: loss(p, m), has_aux=True))(params)
    (ref_loss, ref_out), ref_grads = results["reference"]
    errors = {}
    for name in ("explicit", "fused"):
        (value, out), grads = results[name]
        assert np.all(np.isfinite(_flat(grads)))
        errors[name] = {key: np.linalg.norm(np.asarray(out[key], np.float64) - np.asarray(ref_out[key], np.float64))
                        / np.linalg.norm(np.asarray(ref_out[key], np.float64)) for key in ("cls", "patches", "cls_attention")}
        errors[name]["loss"] = abs(float(value) - float(ref_loss)) / abs(float(ref_loss))
        errors[name]["grads"] = np.linalg.norm(_flat(grads) - _flat(ref_grads)) / np.linalg.norm(_flat(ref_grads))
    for key, fused_error in errors["fused"].items():
        assert fused_error < 3e-2, (key, errors)
        assert fused_error <= 2.0 * errors["explicit"][key] + 1e-3, (key, errors)
