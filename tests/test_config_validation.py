"""Bad config values end in a one-line ConfigError naming the field; every experiment file and variant passes."""

import hashlib
import json
import pathlib
import re
import socket
import subprocess
import sys

import pytest

from amvlm_jax.config import ConfigError, base_config, validate
from amvlm_jax.data import datasets, splits
from amvlm_jax.data.folders import DataError

from conftest import REPO_ROOT, experiment_module as _experiment, one_device_env, with_fields

NAN, INF = float("nan"), float("inf")


def _config(**overrides):
    """The default experiment (experiments/synthetic.py) with `overrides` ('section.field': value)."""
    return with_fields(_experiment("synthetic").get_config(), overrides)


def _error(config) -> str:
    with pytest.raises(ConfigError) as info:
        validate(config)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# (field path below config, a value no run can use). The message must name config.<path> and show the value.
BAD_VALUES = [
    ("mode", "train"),
    ("seed", -1), ("seed", 2**31), ("seed", None), ("seed", True),
    ("data.name", None), ("data.root", None),
    ("data.image_size", 0), ("data.image_size", 100), ("data.image_size", -16), ("data.image_size", None),
    ("data.num_classes", 0), ("data.num_classes", 10**20), ("train.batch_size", 2**31),
    ("data.labeled_fraction", 0.0), ("data.labeled_fraction", 1.5), ("data.labeled_fraction", -0.25),
    ("data.labeled_fraction", NAN), ("data.labeled_fraction", None),
    ("data.split_seed", -1), ("data.worker_count", -1), ("data.read_threads", 0),
    ("data.synthetic.num_train", 0), ("data.synthetic.num_val", -1), ("data.synthetic.num_val", 0), ("data.synthetic.num_test", -1),
    ("data.synthetic.seed", -1), ("data.synthetic.fresh_pairs", None),
    ("data.corpus.train", None), ("data.corpus.val", None), ("data.corpus.test", None), ("data.corpus.split_field", None),
    ("data.corpus.image_field", None), ("data.corpus.split_names", ("train", "val")),
    ("data.corpus.split_names", ("train", "", "test")), ("data.corpus.split_names", ("train", "train", "test")),
    ("data.corpus.image_path", "images/x.png"), ("data.corpus.image_path", "{}{x}.png"),
    ("data.corpus.image_path", "{}}.png"), ("data.corpus.image_path", "{0}.png"),
    ("data.corpus.text_fields", ()), ("data.corpus.text_fields", ("report", 1)), ("data.corpus.missing_images", "drop"),
    ("data.corpus.in_memory_bytes", -1),
    ("unet.base_width", 0), ("unet.architecture", "resnet"),
    ("train.batch_size", 0), ("train.epochs", 0), ("train.epochs", None), ("train.epochs", False),
    ("train.lr", -1.0), ("train.lr", 0.0), ("train.lr", NAN), ("train.lr", INF), ("train.lr", None),
    ("train.min_lr", -1e-4), ("train.min_lr", NAN),
    ("train.restart_epochs", 0), ("train.eval_every_epochs", -1), ("train.eval_every_steps", -1), ("train.log_every_steps", 0),
    ("train.eval_batch_size", 0), ("train.precise_bn_images", -1), ("train.picture_every_epochs", -1),
    ("train.picture_images", -1),
    ("eval.checkpoint", None), ("eval.splits", ("val", "holdout")), ("eval.splits", ("(val,)",)),
    ("eval.splits", (1, 2)), ("eval.splits", None), ("eval.guidance", None),
    ("eval.retrieval_pairs", 1), ("eval.probe_fields", ("Type", None)), ("eval.probe_rows", 0), ("eval.probe_steps", 0),
    ("eval.initial", None),
    ("pretrain.objective", "clip"), ("pretrain.vit", "L/14"), ("pretrain.vit_weights", None),
    ("pretrain.vit_pixel_mean", (0.5,)), ("pretrain.vit_pixel_mean", (0.5, NAN, 0.5)), ("pretrain.vit_pixel_std", (0.5, 0.0, 0.5)),
    ("pretrain.text_encoder", None), ("pretrain.text_layers", 0), ("pretrain.max_length", 2),
    ("pretrain.image_size", 100), ("pretrain.image_size", -16), ("pretrain.embed_dim", 0),
    ("pretrain.batch_size", 0), ("pretrain.batch_size", 1), ("pretrain.epochs", 0),
    ("pretrain.lr", 0.0), ("pretrain.lr", -3e-5), ("pretrain.lr", INF),
    ("pretrain.optimizer", "sgd"), ("pretrain.adam_betas", (0.9,)), ("pretrain.adam_betas", (0.9, 1.0)),
    ("pretrain.weight_decay", -0.1), ("pretrain.schedule", "linear"), ("pretrain.augment", "flip"), ("pretrain.warmup_fraction", 1.5),
    ("pretrain.warmup_fraction", 1.0),
    ("pretrain.min_lr", -1.0), ("pretrain.image_lr", -1.0), ("pretrain.image_lr", NAN),
    ("pretrain.temperature", 0.0), ("pretrain.temperature", -0.07), ("pretrain.momentum", 1.5),
    ("pretrain.local_inversion", "log"), ("pretrain.use_pdt", None),
    ("pretrain.weights.ita", -1.0), ("pretrain.weights.css", NAN), ("pretrain.weights.local", -0.1),
    ("pretrain.weights.icl", None),
    ("pretrain.mgca.ita", -1.0), ("pretrain.mgca.cta", -1.0), ("pretrain.mgca.cpa", INF),
    ("pretrain.mgca.cta_temperature", 0.0), ("pretrain.mgca.num_prototypes", 0),
    ("pretrain.mgca.sinkhorn_epsilon", 0.0), ("pretrain.mgca.sinkhorn_iterations", -1),
    ("pretrain.mgca.prototype_temperature", 0.0), ("pretrain.mgca.freeze_prototypes_epochs", -1),
    ("pretrain.log_every_steps", 0), ("pretrain.checkpoint_every_epochs", 0), ("pretrain.eval_every_epochs", 0),
    ("train.checkpoint_every_epochs", 0),
    ("pretrain.vit_width", -1), ("pretrain.vit_depth", -1), ("pretrain.vit_heads", -1),
    ("pretrain.text_weights_init", "zeros"), ("pretrain.text_hidden", -1), ("pretrain.text_heads", -1),
    ("pretrain.head_hidden", 0), ("pretrain.pdt_heads", 0), ("pretrain.pdt_dropout", 1.0),
    ("pretrain.pdt_dropout", -0.1), ("pretrain.remat", None), ("pretrain.train_text_encoder", None),
    ("pretrain.vit_attention", "flash"), ("pretrain.text_embedding_grad", "dense"),
    ("ssl.w_text", -1.0), ("ssl.w_text", NAN), ("ssl.train_decoder", None), ("ssl.decoder_lr", -1.0),
    ("ssl.pretrained", None), ("ssl.teacher_norm", "none"), ("ssl.ema_max_alpha", 1.0),
    ("ssl.constant_text_mask", 1.0), ("ssl.constant_text_mask", -0.5), ("ssl.text_logit_offset", INF),
    ("ssl.text_head", "film"), ("ssl.text_head_steps", 0), ("ssl.text_head_lr", 0.0), ("ssl.text_head_lr", -1e-3),
    ("ssl.withhold_reports", None), ("ssl.text_veto_only", None), ("ssl.text_clip", 0.0), ("ssl.text_clip", 0.5), ("ssl.unlabeled_weight", -1.0),
    ("ssl.rampup_epochs", -1.0), ("ssl.augment_unlabeled", None),
    ("predict.input", None), ("predict.output", None), ("predict.reports", None), ("predict.probabilities", "tiff"),
    ("predict.overlays", None), ("predict.overwrite", None), ("predict.stop_on_error", None),
    ("mesh.data", 0), ("mesh.data", -2), ("mesh.fsdp", 0), ("mesh.fsdp_min_size", -1),
    ("distributed.mode", "maybe"), ("distributed.coordinator_address", "localhost"),
    ("distributed.coordinator_address", "host:port"), ("distributed.num_processes", -1),
    ("distributed.process_id", -2), ("distributed.cpu_collectives", "nccl"),
    ("dtype", "float16"), ("compilation_cache", None),
    # One past each edge that GOOD_VALUES admits.
    ("data.image_size", 40), ("pretrain.image_size", 8), ("data.corpus.split_names", ("train", "val", "test", "test")),
    ("data.corpus.text_fields", ("findings", "")), ("eval.probe_rows", 1),
    ("distributed.coordinator_address", "host:0"), ("distributed.coordinator_address", "host:65536"),
    ("distributed.coordinator_address", ":1234"), ("pretrain.adam_betas", (-0.1, 0.999)),
]


@pytest.mark.parametrize("path, value", BAD_VALUES, ids=[f"{p}={v!r}" for p, v in BAD_VALUES])
def test_bad_value_is_a_one_line_error_naming_the_field(path, value):
    message = _error(_config(**{path: value}))
    assert f"config.{path}" in message
    shown = f"'{value}'" if path == "mode" else repr(value)
    assert shown in message, message
    if path != "mode":
        assert " must be " in message  # ... and what is allowed.


def _leaves(node, prefix=""):
    for key in node:
        value = node[key]
        if hasattr(value, "keys"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_every_field_of_base_config_is_checked():
    """validate's table has an entry for each leaf of base_config() (sections expanded), and so has BAD_VALUES."""
    from amvlm_jax.config import _field_checks

    fields = set(_leaves(base_config()))
    checked = {path for path, _, _ in _field_checks()} | {"mode"}  # The mode: checked first, on its own.
    assert fields - checked == set(), "fields without a check in config._field_checks()"
    assert checked - fields == set(), "checks of fields that base_config() does not have"
    assert fields <= {path for path, _ in BAD_VALUES}


# Values of several fields that do not go together: (overrides, the field the message must name).
BAD_COMBINATIONS = [
    ({"train.lr": 1e-3, "train.min_lr": 2e-3}, "config.train.min_lr"),
    ({"pretrain.optimizer": "adamw", "pretrain.schedule": "warmup_cosine", "pretrain.lr": 1e-4,
      "pretrain.min_lr": 1e-3}, "config.pretrain.min_lr"),
    ({"pretrain.schedule": "warmup_cosine", "pretrain.lr": 1e-3, "pretrain.image_lr": 1e-5,
      "pretrain.min_lr": 1e-4}, "config.pretrain.image_lr"),
    ({f"pretrain.weights.{k}": 0.0 for k in ("ita", "css", "local", "icl")}, "config.pretrain.weights"),
    ({"pretrain.objective": "mgca", **{f"pretrain.mgca.{k}": 0.0 for k in ("ita", "cta", "cpa")}},
     "config.pretrain.mgca"),
    ({"pretrain.embed_dim": 132, "pretrain.pdt_heads": 8}, "config.pretrain.embed_dim"),
    ({"pretrain.embed_dim": 15, "pretrain.pdt_heads": 1}, "config.pretrain.embed_dim"),
    ({"pretrain.vit_width": 100}, "config.pretrain.vit_width"),  # Ti/16: 3 heads.
    ({"pretrain.text_weights_init": "random", "pretrain.text_hidden": 100, "pretrain.text_heads": 3},
     "config.pretrain.text_hidden"),
    # Ignored before: a pre-trained text encoder keeps its shape, and heads without a width kept the folder's.
    ({"pretrain.text_hidden": 64}, "config.pretrain.text_hidden / text_heads (64 / 0) shape a randomly initialised"),
    ({"pretrain.text_heads": 4}, "config.pretrain.text_hidden / text_heads (0 / 4) shape a randomly initialised"),
    ({"pretrain.text_weights_init": "random", "pretrain.text_heads": 4},
     "config.pretrain.text_heads=4 needs config.pretrain.text_hidden"),
    ({"train.picture_every_epochs": 5, "train.picture_images": 0}, "config.train.picture_images"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "config.mesh.data and config.mesh.fsdp cannot both be -1"),
    ({"distributed.num_processes": 2}, "config.distributed.coordinator_address"),
    ({"distributed.num_processes": 2, "distributed.coordinator_address": "10.0.0.1:1234",
      "distributed.process_id": 2}, "config.distributed.process_id"),
    ({"pretrain.weight_decay": 0.05}, "config.pretrain.weight_decay"),  # Optimizer 'adam'.
    ({"data.name": "monuseg", "data.synthetic.fresh_pairs": True}, "config.data.synthetic.fresh_pairs"),
    ({"data.synthetic.fresh_pairs": True, "pretrain.augment": "crop"}, "config.pretrain.augment"),
    ({"pretrain.vit_attention": "cudnn"}, "config.pretrain.vit_attention='cudnn' needs config.dtype='bfloat16'"),
    ({"ssl.withhold_reports": True}, "config.ssl.withhold_reports needs config.ssl.text_head ('words' or 'report')"),
    ({"eval.zero_shot": {"Type": {"CT": "a CT scan"}}}, "config.eval.zero_shot['Type'] must map two or more"),
    ({"eval.zero_shot": {"Type": "a CT scan"}}, "config.eval.zero_shot['Type'] must map two or more"),
    ({"eval.zero_shot": {"grade": {1: "grade one", 2: "grade two"}}},
     "config.eval.zero_shot['grade']: class 1 must be written as text, as labels are read ('1')"),
    ({"mode": "ssl", "ssl.rampup_epochs": 101.0}, "config.ssl.rampup_epochs=101.0 exceeds config.train.epochs="),
    ({"mode": "all", "data.labeled_fraction": 1.0}, "config.data.labeled_fraction=1.0 leaves no unlabeled image"),
    ({"mode": "all", "ssl.pretrained": "runs/other/pretrain"}, "config.ssl.pretrained='runs/other/pretrain': mode 'all'"),
    ({"mode": "evaluate", "eval.splits": ()}, "config.eval.splits is empty: mode 'evaluate' needs a split"),
    ({"data.corpus.val": "val.jsonl"}, "config.data.corpus.val is set but config.data.corpus.train is not"),
    ({"data.corpus.split_field": "split"}, "config.data.corpus.split_field is set but config.data.corpus.train is not"),
    ({"data.corpus.test": "test.jsonl"}, "config.data.corpus.test is set but config.data.corpus.train is not"),
    # Held-out scores of the training rows, without a word.
    ({"data.corpus.train": "pairs.csv", "data.corpus.val": "./pairs.csv"},
     "config.data.corpus.val='./pairs.csv' is the training file and no config.data.corpus.split_field splits it"),
    ({"data.corpus.train": "a/pairs.jsonl", "data.corpus.test": "a/pairs.jsonl"}, "config.data.corpus.test='a/pairs"),
    ({"eval.zero_shot": {"Type": {"CT": "a CT scan", "MR": ""}}}, "config.eval.zero_shot['Type'] must map two or more"),
    ({"eval.zero_shot": {"Type": {"CT": "a CT scan", "MR": "an MRI scan"}}},
     "config.eval.zero_shot needs the label fields of a corpus"),
    ({"eval.probe_fields": ("Type",)}, "config.eval.probe_fields needs the label fields of a corpus"),
    # An empty Test_Folder: the run trained to the end, then its final evaluation stopped on 'Test_Folder/img: no images'.
    ({"data.synthetic.num_test": 0}, "config.data.synthetic.num_test=0 leaves nothing for config.eval.splits"),
]


@pytest.mark.parametrize("overrides, field", BAD_COMBINATIONS, ids=[f for _, f in BAD_COMBINATIONS])
def test_values_that_do_not_go_together(overrides, field):
    assert field in _error(_config(**overrides))


def test_a_missing_section_is_a_config_error():
    config = _config()
    config.pretrain.weights = None
    assert _error(config) == "config.pretrain.weights.ita is missing: config.pretrain.weights is None, not a section"
    config = _config()
    del config.eval.retrieval_pairs
    assert _error(config) == "config.eval.retrieval_pairs is missing: config.eval has no such field"


# The whole line for rules whose wording is built from parts: what is allowed, and the values named.
MESSAGES = [
    ({"dtype": "float16"}, "config.dtype must be 'float32' or 'bfloat16', got 'float16'"),
    ({"seed": -1}, "config.seed must be an integer in [0, 2147483647], got -1"),
    ({"train.epochs": 0}, "config.train.epochs must be an integer >= 1 (below 2**31), got 0"),
    ({"mesh.fsdp": 0}, "config.mesh.fsdp must be -1 or an integer >= 1, got 0"),
    ({"ssl.text_logit_offset": INF}, "config.ssl.text_logit_offset must be a finite number, got inf"),
    ({"pretrain.warmup_fraction": 1.0}, "config.pretrain.warmup_fraction must be a number in [0, 1), got 1.0"),
    ({"mode": "ssl", "data.labeled_fraction": 0.5, "train.epochs": 10, "ssl.rampup_epochs": 12.0},
     "config.ssl.rampup_epochs=12.0 exceeds config.train.epochs=10: the unlabelled loss would never reach "
     "config.ssl.unlabeled_weight"),
    ({"distributed.num_processes": 4, "distributed.coordinator_address": "h:1", "distributed.process_id": 5},
     "config.distributed.process_id must be -1 ($JAX_PROCESS_ID) or in [0, 4) (config.distributed.num_processes), "
     "got 5"),
]


@pytest.mark.parametrize("overrides, message", MESSAGES, ids=[m.split(" ")[0] for _, m in MESSAGES])
def test_the_message_names_the_field_what_it_takes_and_the_value(overrides, message):
    assert _error(_config(**overrides)) == message


def test_comma_separated_names_become_tuples_of_names():
    """split_name_lists on what the command line hands over for each name-list field (one string)."""
    from amvlm_jax.config import split_name_lists

    config = _config(**{"eval.splits": ("[val, 'test']",), "eval.probe_fields": ("",),
                        "data.corpus.text_fields": ("findings, impression",),
                        "data.corpus.split_names": ("(a,b,c)",)})
    split_name_lists(config)
    assert (config.eval.splits, config.eval.probe_fields, config.data.corpus.text_fields,
            config.data.corpus.split_names) == (("val", "test"), (), ("findings", "impression"), ("a", "b", "c"))
    config = _config()
    config.eval = {}  # --config.eval={}: left for validate to name the missing field.
    split_name_lists(config)
    assert _error(config).startswith("config.eval.checkpoint is missing")


# Edge values a run can use: they must pass.
GOOD_VALUES = [
    {"data.labeled_fraction": 1.0, "mode": "supervised"}, {"data.labeled_fraction": 1.0, "mode": "pretrain"},
    {"data.labeled_fraction": 0.01}, {"seed": 2**31 - 1},
    {"train.min_lr": 1e-3, "train.lr": 1e-3}, {"train.min_lr": 0.0}, {"train.eval_every_epochs": 0},
    {"train.picture_every_epochs": 0, "train.picture_images": 0}, {"train.precise_bn_images": 0},
    {"pretrain.image_size": 0}, {"pretrain.image_lr": 0.0}, {"ssl.decoder_lr": 0.0}, {"ssl.w_text": 0.0},
    {"ssl.constant_text_mask": 0.5}, {"ssl.text_logit_offset": -3.0}, {"ssl.ema_max_alpha": 0.0},
    {"mesh.data": 1, "mesh.fsdp": -1}, {"mesh.data": -1, "mesh.fsdp": 2},
    {"distributed.num_processes": 2, "distributed.coordinator_address": "localhost:1234"},
    {"distributed.cpu_collectives": ""}, {"pretrain.mgca.sinkhorn_iterations": 0},
    {"eval.splits": ()}, {"eval.splits": ["test"]}, {"eval.splits": ("train", "val", "test")},
    {"pretrain.weights.css": 0.0, "pretrain.weights.icl": 0.0, "pretrain.weights.local": 0.0},
    {"pretrain.objective": "mgca", **{f"pretrain.weights.{k}": 0.0 for k in ("ita", "css", "local", "icl")}},
    {"pretrain.text_weights_init": "random", "pretrain.text_hidden": 96, "pretrain.text_heads": 3},
    {"pretrain.text_weights_init": "random", "pretrain.text_hidden": 64}, {"pretrain.text_weights_init": "random"},
    {"pretrain.vit_width": 96, "pretrain.vit_heads": 2}, {"data.root": "/somewhere", "data.name": "monuseg"},
    {"pretrain.vit_attention": "cudnn", "dtype": "bfloat16"},
    {"data.synthetic.num_test": 0, "eval.splits": ("val",)},
    {"data.image_size": 32},  # Below the synthetic generator's minimum: fine for tools/benchmark.py's batches.
    # The lowest (or highest) value each rule admits.
    {"data.image_size": 16, "pretrain.image_size": 16}, {"data.corpus.in_memory_bytes": 0}, {"train.restart_epochs": 1},
    {"eval.retrieval_pairs": 2, "eval.probe_rows": 2, "eval.probe_steps": 1}, {"pretrain.max_length": 3},
    {"pretrain.batch_size": 2}, {"pretrain.momentum": 0.0}, {"pretrain.momentum": 1.0},
    {"pretrain.mgca.freeze_prototypes_epochs": 0}, {"ssl.text_head_steps": 1}, {"mesh.fsdp_min_size": 0},
    {"distributed.num_processes": 2, "distributed.coordinator_address": "10.0.0.1:65535", "distributed.process_id": 1},
    {"distributed.num_processes": 1},  # A single process needs no coordinator.
    {"pretrain.schedule": "warmup_cosine", "pretrain.lr": 1e-4, "pretrain.min_lr": 1e-4, "pretrain.image_lr": 1e-4},
    {"mode": "ssl", "data.labeled_fraction": 0.5, "ssl.rampup_epochs": 100.0, "train.epochs": 100},
    {"mode": "supervised", "ssl.rampup_epochs": 500.0},  # Read by the mean teacher only.
    {"mode": "ssl", "data.labeled_fraction": 0.5, "ssl.pretrained": "runs/other/pretrain"},
    {"pretrain.objective": "mgca", "pretrain.embed_dim": 127},  # Even and split over heads: AMVLM's PDT only.
    {"pretrain.text_weights_init": "random", "pretrain.text_hidden": 100},  # 100 // 64 = 1 head.
    {"data.name": "monuseg", "data.synthetic.num_test": 0},  # The generator's count: real folders keep their test split.
    {"pretrain.vit_width": 64, "pretrain.vit_heads": 2},  # Ti/16's own 3 heads would not split 64.
]


@pytest.mark.parametrize("overrides", GOOD_VALUES, ids=[",".join(o) for o in GOOD_VALUES])
def test_usable_edge_values_pass(overrides):
    validate(_config(**overrides))


def _experiment_configs():
    for path in sorted((REPO_ROOT / "experiments").glob("*.py")):
        module = _experiment(path.stem)
        variants = [None, *module.VARIANTS]
        if "cpu" in module.VARIANTS:
            variants += [v for v in ("mgca,cpu", "cpu,labeled25", "cpu,text_head_blind", "cpu,vision")
                         if set(v.split(",")) <= set(module.VARIANTS)]
        else:
            variants += ["full,mgca", "fresh,labeled100", "text_head,labeled50"]
        for variant in variants:
            yield f"{path.stem}:{variant or ''}", module, variant


@pytest.mark.parametrize("name, module, variant", list(_experiment_configs()),
                         ids=[name for name, _, _ in _experiment_configs()])
def test_every_experiment_and_variant_is_valid(name, module, variant):
    config = module.get_config(variant)
    if config.mode in ("ssl", "all") and config.data.labeled_fraction == 1.0:
        # A mean-teacher variant (vision, ab_*, text_head...) of a dataset whose file keeps every mask: the
        # labelled fraction is the command's to choose, and is asked for.
        assert "leaves no unlabeled image for the mean teacher" in _error(config)
    else:
        validate(config)
    for mode in ("supervised", "evaluate", "pretrain", "ssl", "all", "predict"):
        config.mode = mode
        if mode in ("ssl", "all") and config.data.labeled_fraction == 1.0:  # No unlabeled image: said at once.
            assert "leaves no unlabeled image for the mean teacher" in _error(config)
        else:
            validate(config)


def _named_fields(text: str) -> set[str]:
    """The config fields a text names: every --config.a.b, and config.a.b or (in backticks) a.b whose first
    part is a section or field of base_config() (config.json, train/loop.py and the like are not fields)."""
    top = set(base_config().keys())
    names = set(re.findall(r"--config\.(\w+(?:\.\w+)*)", text)) - {"a.b"}  # Bar the generic --config.a.b=value.
    names |= {n for n in re.findall(r"(?<![\w/.-])config\.(\w+(?:\.\w+)*)", text) if n.split(".")[0] in top}
    for quoted in re.findall(r"`([^`\n]+)`", text):  # Within a line: a fence's ``` pairs no span.
        names |= {n for n in re.findall(r"(?<![\w/.-])(\w+(?:\.\w+)+)", quoted) if n.split(".")[0] in top}
    return names


def _missing_fields(names) -> list[str]:
    def exists(name):
        node = base_config()
        for part in name.split("."):
            if not hasattr(node, "keys") or part not in node:
                return False
            node = node[part]
        return True

    return sorted(name for name in names if not exists(name))


@pytest.mark.parametrize("document", ["README.md", *(f"experiments/{p.name}" for p in
                                                      sorted((REPO_ROOT / "experiments").glob("*.py")))])
def test_every_config_field_the_documentation_names_exists(document):
    names = _named_fields((REPO_ROOT / document).read_text())
    assert names, "the pattern finds the fields"
    assert _missing_fields(names) == [], f"{document} names fields that base_config() lacks"


def test_the_documentation_check_sees_each_way_of_naming_a_field():
    text = ("`--config.train.epochs=5` `config.ssl.w_tex` (`ssl.text_head=words`) `pretrain.augment` "
            "and --config.trian.lr=1 in prose; config.json, `amvlm_jax/train/loop.py`, `data.corpus.{train,val}`")
    assert _named_fields(text) == {"train.epochs", "ssl.w_tex", "ssl.text_head", "pretrain.augment", "trian.lr",
                                   "data.corpus"}
    assert _missing_fields(_named_fields(text)) == ["ssl.w_tex", "trian.lr"]


def test_every_variant_is_documented_and_every_documented_variant_exists():
    """Each experiment's docstring names each of its VARIANTS, and every experiments/<name>.py:<variants> in the
    README and the docstrings names variants the file has."""
    texts = [(REPO_ROOT / "README.md").read_text()]
    for path in sorted((REPO_ROOT / "experiments").glob("*.py")):
        module = _experiment(path.stem)
        texts.append(module.__doc__)
        words = set(re.findall(r"\w+", module.__doc__))
        assert sorted(set(module.VARIANTS) - words) == [], f"{path.name}: variants its docstring does not name"
    for text in texts:
        for name, variants in re.findall(r"experiments/(\w+)\.py:([\w,]+)", text):
            unknown = set(variants.split(",")) - set(_experiment(name).VARIANTS)
            assert unknown == set(), f"experiments/{name}.py:{variants}"


@pytest.mark.parametrize("fraction", [0.0, 1.5, -1.0, NAN, None])
def test_labeled_indices_reject_a_bad_fraction_in_one_line(fraction):
    with pytest.raises(ConfigError, match=r"config\.data\.labeled_fraction must be a number in \(0, 1\]") as info:
        splits.labeled_indices(10, fraction, 0)
    assert "\n" not in str(info.value)


def test_labeled_indices_reject_a_negative_seed():
    with pytest.raises(ConfigError, match="config.data.split_seed"):
        splits.unlabeled_indices(10, 0.5, -1)


def test_synthetic_data_over_a_foreign_folder_is_a_data_error(tmp_path):
    (tmp_path / "Train_Folder" / "img").mkdir(parents=True)
    (tmp_path / "Train_Folder" / "img" / "patient_1.png").write_bytes(b"not ours")
    config = _config(**{"data.root": str(tmp_path)})
    with pytest.raises(DataError, match="patient_1.png") as info:
        datasets.data_root(config, tmp_path / "unused")
    assert "\n" not in str(info.value)
    assert (tmp_path / "Train_Folder" / "img" / "patient_1.png").read_bytes() == b"not ours"


def test_synthetic_data_below_the_generators_minimum_size_is_a_config_error(tmp_path):
    config = _config(**{"data.image_size": 48, "data.root": str(tmp_path / "data")})
    with pytest.raises(ConfigError, match=r"config\.data\.image_size must be >= 64 .*got 48") as info:
        datasets.data_root(config, tmp_path)
    assert "\n" not in str(info.value) and not (tmp_path / "data").exists()


FRACTION = "config.data.labeled_fraction"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.data.labeled_fraction=0", f"error: {FRACTION} must be a number in (0, 1], got 0.0"),
        ("--config.data.labeled_fraction=1.5", f"error: {FRACTION} must be a number in (0, 1], got 1.5"),
        ("--config.train.lr=-1", "error: config.train.lr must be a finite number > 0, got -1.0"),
    ],
)
def test_command_line_gives_one_error_line_and_writes_nothing(override, expected, tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "amvlm_jax.main", override, f"--workdir={workdir}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [expected]
    assert not workdir.exists() and "config.json" not in result.stdout  # No promise of a file never written.


# ---------------------------------------------------------------------------
# Synthetic data in a multi-process run: process 0 writes, the others wait.
# ---------------------------------------------------------------------------

_WORKER = r"""
import json, pathlib, sys, time
address, process_id, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
from amvlm_jax.config import base_config
from amvlm_jax.data import datasets, synthetic
from amvlm_jax.train.parallel import initialize_distributed

config = base_config()
config.data.name, config.data.root, config.data.image_size = "synthetic", root, 64
config.data.synthetic.num_train, config.data.synthetic.num_val, config.data.synthetic.num_test = 4, 2, 2
config.distributed.num_processes, config.distributed.coordinator_address = 2, address
config.distributed.process_id = process_id
initialize_distributed(config)
calls = []
real_write = synthetic.write_synthetic_dataset

def slow_write(*args, **kwargs):
    calls.append(process_id)
    time.sleep(3)  # A process that did not wait would return before the data is there.
    return real_write(*args, **kwargs)

synthetic.write_synthetic_dataset = slow_write
returned = datasets.data_root(config, "unused")
marker = pathlib.Path(root) / synthetic.MARKER_NAME
print("RESULT " + json.dumps({"wrote": bool(calls), "returned": str(returned), "complete": marker.is_file()}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digests(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_only_process_0_writes_the_synthetic_data_and_the_others_wait(tmp_path):
    address, root = f"127.0.0.1:{_free_port()}", tmp_path / "shared_data"
    env = one_device_env()  # One CPU device a process.
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, address, str(i), str(root)], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [w.communicate(timeout=600)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    results = []
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
        results.append(json.loads(output.split("RESULT ", 1)[1]))
    assert [r["wrote"] for r in results] == [True, False]
    assert all(r["complete"] and r["returned"] == str(root) for r in results)
    # The same bytes as a single-process run writes.
    single = _config(**{"data.root": str(tmp_path / "single"), "data.image_size": 64, "data.synthetic.num_train": 4,
                        "data.synthetic.num_val": 2, "data.synthetic.num_test": 2})
    assert datasets.data_root(single, tmp_path) == tmp_path / "single"
    assert _digests(root) == _digests(tmp_path / "single")
    assert len(_digests(root)) == 2 * (4 + 2 + 2) + 3 + 1  # Images, masks, 3 report sheets, marker.


def test_medpix_locked_text_warms_amvlm_up_and_leaves_mgcas_schedule_alone():
    medpix = _experiment("medpix")
    amvlm, mgca = medpix.get_config("cpu,locked_text").pretrain, medpix.get_config("mgca,cpu,locked_text").pretrain
    assert (amvlm.schedule, amvlm.warmup_fraction, amvlm.lr, amvlm.train_text_encoder) == ("warmup_cosine", 0.1, 3e-4, False)
    assert (mgca.schedule, mgca.warmup_fraction, mgca.optimizer, mgca.batch_size) == ("warmup_cosine", 0.4, "adamw", 72)
    long = medpix.get_config("cpu,locked_text,long").pretrain
    assert (long.augment, long.epochs, long.eval_every_epochs, long.schedule) == ("crop", 30, 10, "warmup_cosine")


def test_a_recorded_config_fills_in_this_versions_fields_as_their_types():
    """A checkpoint's config as JSON: lists become the tuples the fields hold, fields this version lacks are
    left out, sections not asked for and a missing section keep the command's values."""
    from amvlm_jax.config import with_recorded

    config = base_config()
    recorded = {"pretrain": {"vit_pixel_mean": [0.5, 0.5, 0.5], "retired_field": 3},
                "unet": {"base_width": config.unet.base_width + 4}, "ssl": "not a section"}
    restored = with_recorded(config, recorded, sections=("pretrain", "ssl", "data"))
    assert restored.pretrain.vit_pixel_mean == (0.5, 0.5, 0.5) and "retired_field" not in restored.pretrain
    assert restored.unet.base_width == config.unet.base_width and restored.ssl == config.ssl
    validate(restored)


def test_recorded_data_reads_where_the_run_read_unless_the_command_names_a_root(tmp_path):
    """The command's default experiment ('synthetic') gives way to the recorded data name also when the command
    names a root; another name on the command stands."""
    from amvlm_jax.config import with_recorded_data

    config = _experiment("synthetic").get_config()
    assert with_recorded_data(config, None) is config  # Nothing recorded: the command's.
    recorded = {"data": {"name": "monuseg", "root": str(tmp_path / "run_data"), "image_size": 96}}
    restored = with_recorded_data(config, recorded)
    assert (restored.data.name, restored.data.root, restored.data.image_size) == ("monuseg", str(tmp_path / "run_data"), 96)
    config.data.root = str(tmp_path / "moved")
    restored = with_recorded_data(config, recorded)
    assert (restored.data.name, restored.data.root, restored.data.image_size) == ("monuseg", str(tmp_path / "moved"), 96)
    config.data.name = "covid"
    assert with_recorded_data(config, recorded).data.name == "covid"
