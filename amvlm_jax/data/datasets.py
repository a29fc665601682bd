"""Finds (or generates) a run's data and loads its splits into memory."""

from __future__ import annotations

import pathlib

from amvlm_jax.data import folders, splits
from amvlm_jax.data.folders import SplitArrays


def data_root(config, workdir: str | pathlib.Path) -> pathlib.Path:
    """The data root of a run; synthetic data is generated there first when needed."""
    if config.data.name == "synthetic":
        from amvlm_jax.data.synthetic import write_synthetic_dataset

        root = pathlib.Path(config.data.root) if config.data.root else pathlib.Path(workdir) / "data"
        syn = config.data.synthetic
        return write_synthetic_dataset(
            root,
            num_train=syn.num_train,
            num_val=syn.num_val,
            num_test=syn.num_test,
            image_size=config.data.image_size,
            seed=syn.seed,
        )
    return folders.check_root(config.data.root)


def load_labeled_train(config, root: pathlib.Path) -> SplitArrays:
    """The training images that keep their masks (data.labeled_fraction, data.split_seed).

    The masks of the other images are never opened.
    """
    count = len(folders.list_split(root, "train", require_masks=False))
    labeled = splits.labeled_indices(count, config.data.labeled_fraction, config.data.split_seed)
    train = _load(config, root, "train", mask_indices=labeled)
    return train.subset(labeled)


def load_eval_split(config, root: pathlib.Path, split: str) -> SplitArrays | None:
    """A validation/test split with all masks, or None when the folder is absent."""
    if not folders.has_split(root, split):
        return None
    return _load(config, root, split)


def _load(config, root, split, mask_indices=None) -> SplitArrays:
    return folders.load_split(
        root,
        split,
        image_size=config.data.image_size,
        num_classes=config.data.num_classes,
        mask_indices=mask_indices,
        threads=config.data.read_threads,
    )
