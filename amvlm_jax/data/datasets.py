"""Finds (or generates) a run's data and loads its splits into memory."""

from __future__ import annotations

import pathlib

from amvlm_jax.config import ConfigError
from amvlm_jax.data import folders, splits
from amvlm_jax.data.folders import DataError, SplitArrays


def data_root(config, workdir: str | pathlib.Path) -> pathlib.Path:
    """The data root of a run; synthetic data is generated there first when needed.

    In a multi-process run only process 0 writes the synthetic data; the
    others wait for it at a barrier and then check that it is complete.
    """
    if config.data.name == "synthetic":
        return _synthetic_root(config, workdir)
    return folders.check_root(config.data.root)


def _synthetic_root(config, workdir) -> pathlib.Path:
    import jax

    from amvlm_jax.data.synthetic import MIN_IMAGE_SIZE, write_synthetic_dataset

    if config.data.image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"config.data.image_size must be >= {MIN_IMAGE_SIZE} for the synthetic data "
                          f"(data.name='synthetic'), got {config.data.image_size}")
    root = pathlib.Path(config.data.root) if config.data.root else pathlib.Path(workdir) / "data"
    syn = config.data.synthetic

    def write() -> pathlib.Path:
        try:
            return write_synthetic_dataset(
                root,
                num_train=syn.num_train,
                num_val=syn.num_val,
                num_test=syn.num_test,
                image_size=config.data.image_size,
                seed=syn.seed,
            )
        except FileExistsError as e:  # A folder with files the generator did not write (e.g. a real dataset).
            raise DataError(f"{e} (data.name='synthetic' writes into data.root)") from e

    if jax.process_count() == 1:
        return write()
    from jax.experimental import multihost_utils

    failure = None
    if jax.process_index() == 0:
        try:
            write()
        except Exception as e:  # Raised after the barrier, so that the other processes are not left waiting.
            failure = e
    multihost_utils.sync_global_devices("amvlm_jax synthetic data written")
    if failure is not None:
        raise failure
    if jax.process_index() != 0 and not _synthetic_complete(root, config):
        raise DataError(f"{root}: the synthetic data is missing or incomplete after process 0 wrote it (see its "
                        "error, if any): data.root (or the workdir) must be on a file system that every process shares")
    return root


def _synthetic_complete(root: pathlib.Path, config) -> bool:
    """Whether root holds the complete synthetic data of config.data (as its completion marker records it)."""
    from amvlm_jax.data import synthetic

    written = synthetic.read_marker(root)
    syn = config.data.synthetic
    wanted = dict(seed=syn.seed, num_train=syn.num_train, num_val=syn.num_val, num_test=syn.num_test,
                  image_size=config.data.image_size)
    return (written is not None and all(written.get(k) == v for k, v in wanted.items())
            and synthetic.files_complete(root, written))


def load_labeled_train(config, root: pathlib.Path) -> SplitArrays:
    """The training images that keep their masks (data.labeled_fraction, data.split_seed)."""
    return load_train_parts(config, root)[0]


def load_train_parts(config, root: pathlib.Path, unlabeled_masks: bool = False) -> tuple[SplitArrays, SplitArrays]:
    """(labelled, unlabelled) training images as data.labeled_fraction and data.split_seed split them.

    The unlabelled part carries no masks (their files are never opened, and
    need not exist) unless ``unlabeled_masks`` and every unlabelled image has
    one: the evaluation of pseudo-labels reads them, training never does.
    """
    examples = folders.list_split(root, "train", require_masks=False)
    labeled = splits.labeled_indices(len(examples), config.data.labeled_fraction, config.data.split_seed)
    unlabeled = splits.unlabeled_indices(len(examples), config.data.labeled_fraction, config.data.split_seed)
    unlabeled_masks = unlabeled_masks and all(examples[i].mask_path is not None for i in unlabeled)
    train = _load(config, root, "train", mask_indices=labeled if not unlabeled_masks else None)
    unlabeled_split = train.subset(unlabeled)
    if not unlabeled_masks:
        unlabeled_split.masks = None
    return train.subset(labeled), unlabeled_split


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
