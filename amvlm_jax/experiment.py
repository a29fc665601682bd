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


LABELED_VARIANTS = {"labeled25": labeled(0.25), "labeled50": labeled(0.5)}
