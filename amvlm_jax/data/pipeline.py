"""grain input pipelines and the host-to-device step.

Training reads an endless stream of examples: epoch e is a permutation of the
split seeded by (seed, e), and every example's augmentation is seeded by its
position in that stream. Process p of P reads positions p, p + P, ... so the
P local batches of a step together hold exactly the examples a single process
would read for that step, whatever the number of hosts. Because the stream is
random access, resuming at step s just starts reading at batch s.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image
from scipy import ndimage

from amvlm_jax.data.folders import SplitArrays


def augment(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """SPEC section 1 augmentation, the same transform for every (H, W[, C]) array.

    With p=0.5 a rot90 by k in 0..3 then a flip along a random axis; otherwise
    with p=0.5 (0.25 overall) a rotation by an integer angle in [-20, 20)
    degrees with nearest interpolation.
    """
    if rng.random() < 0.5:
        k = int(rng.integers(0, 4))
        axis = int(rng.integers(0, 2))
        return [np.ascontiguousarray(np.flip(np.rot90(a, k, axes=(0, 1)), axis=axis)) for a in arrays]
    if rng.random() < 0.5:
        angle = int(rng.integers(-20, 20))
        return [ndimage.rotate(a, angle, axes=(1, 0), order=0, reshape=False, mode="constant") for a in arrays]
    return list(arrays)


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, scale=(0.5, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """A box of a random fraction `scale` of the (H, W, C) uint8 image's area and aspect `ratio` (log-uniform),
    at a random place inside it, resized back to (H, W) bilinearly."""
    height, width = image.shape[:2]
    area = height * width * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    box_height, box_width = min(height, np.sqrt(area / aspect)), min(width, np.sqrt(area * aspect))
    top, left = rng.uniform(0, height - box_height), rng.uniform(0, width - box_width)
    box = (left, top, left + box_width, top + box_height)
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR, box=box))


AUGMENTATIONS = ("spec", "crop", "none")


def _example_reader(split: SplitArrays, with_mask: bool, augmentation: str):
    images, masks = split.images, split.masks  # Only these go to the workers (not the names and reports).

    def read(index: int, rng: np.random.Generator) -> dict:
        arrays = [images[index]] + ([masks[index]] if with_mask else [])
        if augmentation == "spec":
            arrays = augment(arrays, rng)
        elif augmentation == "crop":
            arrays = [random_resized_crop(arrays[0], rng)]
        example = {"image": arrays[0], "index": np.int32(index)}
        if with_mask:
            example["mask"] = arrays[1]
        return example

    return read


def training_batches(
    split: SplitArrays,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    with_mask: bool = True,
    augmentation: str = "spec",
    worker_count: int = 0,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> Iterator[dict]:
    """Yields this process's share of every global batch from step `start_step` on.

    Each batch is a dict of numpy arrays: image (b, S, S, 3) uint8, index (b,)
    int32 (row in `split`), and mask (b, S, S) uint8 when `with_mask`, with
    b = global_batch / process_count. `augmentation`: 'spec' (``augment``), 'crop'
    (``random_resized_crop``, without masks) or 'none'.
    """
    if augmentation not in AUGMENTATIONS or (augmentation == "crop" and with_mask):
        raise ValueError(f"augmentation {augmentation!r} with_mask={with_mask}: expected one of {AUGMENTATIONS}, "
                         "'crop' without masks")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch % process_count:
        raise ValueError(f"batch size {global_batch} is not divisible by the {process_count} processes")
    local_batch = global_batch // process_count
    stream = grain.MapDataset.range(len(split)).shuffle(seed=seed).repeat(None)
    stream = stream.random_map(_example_reader(split, with_mask, augmentation), seed=seed + 1)
    # drop_remainder: the stream never ends, and grain cannot hold the length of an endless batch-1 stream.
    local = stream[process_index::process_count].batch(local_batch, drop_remainder=True)[start_step:]
    return _iterate(local, worker_count)


def fresh_synthetic_batches(
    seed: int,
    data_size: int,
    image_size: int,
    global_batch: int,
    start_step: int = 0,
    worker_count: int = 0,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> Iterator[dict]:
    """Yields this process's share of every global batch of never-repeating synthetic training pairs.

    Global batch s holds training samples s * global_batch ... (s + 1) * global_batch - 1 of the
    generator (``synthetic.render_sample(seed, 'train', i, data_size)``; the first num_train of them are
    the training folder's images), resized bicubically to ``image_size`` like a folder image. Each batch
    is a dict: image (b, S, S, 3) uint8 and report (b,) object array of strings. A pure function of
    the step: resuming at step s starts at batch s.
    """
    from amvlm_jax.data import synthetic

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch % process_count:
        raise ValueError(f"batch size {global_batch} is not divisible by the {process_count} processes")

    def render(index: int) -> dict:
        sample = synthetic.render_sample(seed, "train", int(index), data_size)
        image = sample.image
        if image_size != data_size:
            image = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BICUBIC))
        return {"image": image, "report": np.asarray(sample.report, dtype=object)}

    stream = grain.MapDataset.range(np.iinfo(np.int32).max).map(render)
    local = stream[process_index::process_count].batch(global_batch // process_count, drop_remainder=True)[start_step:]
    return _iterate(local, worker_count)


def _iterate(batches: grain.MapDataset, worker_count: int) -> Iterator[dict]:
    """Iterates ``batches`` with threads prefetching in this process, or in ``worker_count`` processes."""
    dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Used as a library (not under absl's app.run): grain reads its flags.
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count),
                                      worker_init_fn=_exit_with_parent)
    return iter(dataset)


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """In each data worker: exits once the process that started it is gone. A run killed with SIGKILL has no
    chance to stop its workers, which otherwise kept running (and the killed run's output pipe open)."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def evaluation_batches(split: SplitArrays, batch_size: int, pad_multiple: int = 0) -> Iterator[tuple[dict, int]]:
    """Yields (global batch padded to `batch_size`, number of real rows), in order; with `pad_multiple` the
    last batch is padded only to a multiple of it (its own shape, compiled once more): for a model whose
    outputs depend on the batch's statistics, copies of a row would count in them."""
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        size = -(-len(rows) // pad_multiple) * pad_multiple if pad_multiple else batch_size
        padded = np.concatenate([rows, np.full(size - len(rows), rows[-1])])
        batch = {"image": split.images[padded], "index": padded.astype(np.int32)}
        if split.masks is not None:
            batch["mask"] = split.masks[padded]
        yield batch, len(rows)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Batch dimension split over the mesh's data axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def to_global(mesh: Mesh, local_batch: dict) -> dict:
    """Assembles global jax.Arrays from each process's share of the batch."""
    sharding = data_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def replicated_to_global(mesh: Mesh, global_batch: dict) -> dict:
    """Shards a batch that every process holds in full (evaluation)."""
    sharding = data_sharding(mesh)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in global_batch.items()}
