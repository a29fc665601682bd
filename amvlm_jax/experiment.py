"""Helpers for experiment files: named variants selected after a colon.

`--config=experiments/monuseg.py:cpu` calls get_config('cpu'); several
variants combine with commas (`:cpu,labeled25`).
"""

from __future__ import annotations

from typing import Callable, Mapping

import ml_collections

from amvlm_jax.config import ConfigError

Variant = Callable[[ml_collections.ConfigDict], None]


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
    config.pretrain.objective = "mgca"


COMMON_VARIANTS = {"labeled25": labeled(0.25), "labeled50": labeled(0.5), "mgca": _mgca}
