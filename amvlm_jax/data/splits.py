"""Seeded labeled/unlabeled split of a training set (SPEC section 1)."""

from __future__ import annotations

import math
import numbers

import numpy as np

from amvlm_jax.config import ConfigError


def labeled_indices(num_examples: int, fraction: float, seed: int) -> np.ndarray:
    """Returns the sorted indices of the ceil(fraction * N) examples that keep their masks."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < fraction <= 1.0:
        raise ConfigError(f"config.data.labeled_fraction must be a number in (0, 1], got {fraction}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"config.data.split_seed must be an integer >= 0, got {seed}")
    count = min(num_examples, math.ceil(fraction * num_examples - 1e-9))
    order = np.random.default_rng(seed).permutation(num_examples)
    return np.sort(order[: max(1, count)])


def unlabeled_indices(num_examples: int, fraction: float, seed: int) -> np.ndarray:
    """The complement of `labeled_indices`, sorted."""
    return np.setdiff1d(np.arange(num_examples), labeled_indices(num_examples, fraction, seed))
