"""Helpers for experiment files: named variants selected after a colon.

`--config=experiments/monuseg.py:cpu` calls get_config('cpu'); several
variants combine with commas (`:cpu,labeled25`).
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Callable, Mapping

import ml_collections

from amvlm_jax.config import ConfigError, base_config

Variant = Callable[[ml_collections.ConfigDict], None]


def load_config(path: str | pathlib.Path, variant: str = "") -> ml_collections.ConfigDict:
    """``get_config(variant)`` of the experiment file at ``path`` (``get_config()`` without a variant).
    experiments/ is no package: the file is loaded by its path."""
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    if spec is None:  # Not a .py file.
        raise ConfigError("not a Python experiment file (experiments/<name>.py)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def apply_variants(config: ml_collections.ConfigDict, arg: str | None, variants: Mapping[str, Variant]):
    """Applies the comma-separated variants named in `arg` in order; returns the config."""
    for name in filter(None, (arg or "").split(",")):
        if name not in variants:
            raise ConfigError(f"unknown experiment variant '{name}'; known: {', '.join(sorted(variants))}")
        variants[name](config)
    return config


def labeled(fraction: float) -> Variant:
    """Variant keeping the masks of `fraction` of the training images."""

    def apply(config):
        config.data.labeled_fraction = fraction

    return apply


def small_unet(batch_size: int, epochs: int, eval_batch_size: int) -> Variant:
    """Variant for 2 CPU cores: U-Net width 16 and a small batch."""

    def apply(config):
        config.unet.base_width = 16
        config.train.batch_size = batch_size
        config.train.eval_batch_size = eval_batch_size
        config.train.epochs = epochs

    return apply


def small_pretrain(epochs: int) -> Variant:
    """Variant for 2 CPU cores: a 4-block ViT-Ti/16 from scratch at 96x96 with the real MiniLM.

    lr 1e-4 instead of the paper's 3e-5, which assumes an ImageNet-initialised ViT.
    """

    def apply(config):
        config.pretrain.vit = "Ti/16"
        config.pretrain.vit_depth = 4
        config.pretrain.image_size = 96
        config.pretrain.lr = 1e-4
        config.pretrain.epochs = epochs
        config.pretrain.checkpoint_every_epochs = 5

    return apply


def combine(*variants: Variant) -> Variant:
    """One variant applying several in order."""

    def apply(config):
        for variant in variants:
            variant(config)

    return apply


def _mgca(config):
    """MGCA's objective and the optimiser of its released run (SPEC 4): AdamW 2e-5, weight decay 0.05,
    40% linear warm-up then cosine to 1e-8, batch 72. Variants apply in order: `mgca,cpu` keeps the
    CPU variant's rate for encoders trained from scratch."""
    pre = config.pretrain
    pre.objective = "mgca"
    pre.optimizer = "adamw"
    pre.weight_decay = 0.05
    pre.schedule = "warmup_cosine"
    pre.warmup_fraction = 0.4
    pre.min_lr = 1e-8
    pre.lr = 2e-5
    pre.batch_size = 72


def text_head(kind: str = "words", withhold_reports: bool = False) -> Variant:
    """Text masks from the word-attention head fitted on the labelled images' masks with their reports
    (config.ssl.text_head=kind, beyond the paper); with ``withhold_reports`` the same head without the
    reports (the control: a second segmentation model on V, or a position prior). The 'report' head, from
    the words alone, is fused as a veto (config.ssl.text_veto_only). Mode 'all' (``MEAN_TEACHER_MODE``)."""

    def apply(config):
        config.mode = MEAN_TEACHER_MODE[True]
        config.ssl.text_head = kind
        config.ssl.withhold_reports = withhold_reports
        config.ssl.text_veto_only = kind == "report"

    return apply


def _textbook_unet(config):
    config.unet.architecture = "textbook"


# The mode of a mean-teacher variant, by whether text guides it: a variant of the mean teacher only sets
# fields that the supervised job (the real datasets' default mode) never reads, so it names its job too.
# Text guidance needs pre-trained encoders: 'all' pre-trains them in the workdir first (a command's
# --config.mode=ssl --config.ssl.pretrained=DIR reuses others); the vision-only teacher needs none.
MEAN_TEACHER_MODE = {True: "all", False: "ssl"}


def ablation(css: bool, icl: bool, text: bool, tg: bool) -> Variant:
    """An ablation row: which pre-training terms, and whether text guides SSMIS (and L_tg trains the
    decoder); the mode that runs it (``MEAN_TEACHER_MODE``)."""

    def apply(config):
        config.mode = MEAN_TEACHER_MODE[text]
        config.pretrain.weights.css = 0.5 if css else 0.0
        config.pretrain.weights.icl = 0.1 if icl else 0.0
        config.ssl.w_text = 1.0 if text else 0.0
        config.ssl.train_decoder = tg

    return apply


COMMON_VARIANTS = {
    "labeled25": labeled(0.25),
    "labeled50": labeled(0.5),
    "fewshot1": labeled(0.01),
    "fewshot10": labeled(0.10),
    "mgca": _mgca,
    # The common U-Net (16w bottleneck, 31M parameters at w = 64) instead of the authors' (SPEC 6).
    "textbook_unet": _textbook_unet,
    # Vision-only mean teacher ("Vision" of Vision vs Vision+Text; the "MT" ablation row).
    "vision": ablation(css=True, icl=True, text=False, tg=False),
    # Beyond the paper: text masks from a head that learned where the reports' words point, from the
    # labelled images; and the same head with the reports withheld.
    "text_head": text_head(),
    "text_head_blind": text_head(withhold_reports=True),
    # The same head from the report's words alone, fused only where it vetoes; and without the reports.
    "text_report": text_head("report"),
    "text_report_blind": text_head("report", withhold_reports=True),
    # The ablation rows on top of MT: pre-training terms, then L_tg.
    "ab_css": ablation(css=True, icl=False, text=True, tg=False),
    "ab_icl": ablation(css=False, icl=True, text=True, tg=False),
    "ab_css_icl": ablation(css=True, icl=True, text=True, tg=False),
    "ab_css_icl_tg": ablation(css=True, icl=True, text=True, tg=True),
}


def dataset_config(name: str, num_classes: int, lr: float, epochs: int) -> ml_collections.ConfigDict:
    """The paper's settings for a real dataset: 224x224, U-Net width 64, batch 16, Adam `lr`."""
    config = base_config()
    config.data.name = name
    config.data.image_size = 224
    config.data.num_classes = num_classes
    config.train.lr = lr
    config.train.batch_size = 16
    config.train.epochs = epochs
    return config


def dataset_variants(cpu_epochs: int, cpu_pretrain_epochs: int, cpu_eval_batch: int) -> dict:
    """`cpu` (2-core settings) and the COMMON_VARIANTS."""
    cpu = combine(small_unet(batch_size=4, epochs=cpu_epochs, eval_batch_size=cpu_eval_batch),
                  small_pretrain(epochs=cpu_pretrain_epochs))
    return {"cpu": cpu, **COMMON_VARIANTS}
