"""Deterministic synthetic image-report-mask dataset in the LViT folder layout.

Each image shows a smooth, tinted, grainy background with 1-3 faint lesions and
1-2 look-alike distractors, each blob in its own cell of a 3x3 grid. Lesions and
distractors share shape, size and brightness statistics and differ only in a subtle
texture, so vision alone needs many labels to tell them apart, while the report,
which names the grid cells holding lesions, resolves the ambiguity. The mask marks
lesions only.

Layout written by :func:`write_synthetic_dataset`::

    <root>/Train_Folder/img/syn_00000.png        RGB uint8
    <root>/Train_Folder/labelcol/syn_00000.png   single channel, values 0/255
    <root>/Train_Folder/Train_text.csv           header "Image,Description"
    <root>/Val_Folder/...   <root>/Test_Folder/...
    <root>/synthetic.json                        parameters; written last

Every sample is a pure function of (seed, split, index, image_size).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import pathlib
import time
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

FORMAT_VERSION = 2
MARKER_NAME = "synthetic.json"
GRID_SIZE = 3
MIN_IMAGE_SIZE = 64

ROW_NAMES = ("upper", "middle", "lower")
COLUMN_NAMES = ("left", "center", "right")
# GRID_NAMES[row][col]; the centre cell is plain "middle" rather than "middle center".
GRID_NAMES = tuple(
    tuple(
        "middle" if (row, col) == (1, 1) else f"{ROW_NAMES[row]} {COLUMN_NAMES[col]}"
        for col in range(GRID_SIZE)
    )
    for row in range(GRID_SIZE)
)

COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Split name -> (numeric id for seeding, folder name, csv stem).
SPLITS = {
    "train": (0, "Train_Folder", "Train"),
    "val": (1, "Val_Folder", "Val"),
    "test": (2, "Test_Folder", "Test"),
}
IMAGE_DIR = "img"
MASK_DIR = "labelcol"
FILE_PREFIX = "syn_"

# Sentence templates; {count} is a count word, {lesions} the matching noun.
_REPORT_TEMPLATES = (
    "{Count} {lesions} in the {locations}.",
    "{Count} faint {lesions} in the {locations}.",
    "{Count} {lesions} {are} seen: {locations}.",
    "There {are} {count} {lesions}, in the {locations}.",
    "Findings: {count} {lesions} located in the {locations}.",
)


def location_phrase(row: int, col: int) -> str:
    """Name of grid cell (row, col), e.g. (0, 0) -> "upper left", (1, 1) -> "middle"."""
    if not (0 <= row < GRID_SIZE and 0 <= col < GRID_SIZE):
        raise ValueError(f"grid cell ({row}, {col}) outside the {GRID_SIZE}x{GRID_SIZE} grid")
    return GRID_NAMES[row][col]


def _join_phrases(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe(lesion_cells: Sequence[tuple[int, int]], rng: np.random.Generator) -> str:
    """Report stating the lesion count as a word and every lesion cell in reading order."""
    cells = sorted({(int(r), int(c)) for r, c in lesion_cells})
    if len(cells) != len(lesion_cells):
        raise ValueError(f"lesion cells must be distinct, got {list(lesion_cells)}")
    if not cells:
        return "No lesion is seen."
    count = len(cells)
    count_word = COUNT_WORDS[count]
    template = _REPORT_TEMPLATES[int(rng.integers(len(_REPORT_TEMPLATES)))]
    return template.format(
        Count=count_word.capitalize(),
        count=count_word,
        lesions="lesion" if count == 1 else "lesions",
        are="is" if count == 1 else "are",
        locations=_join_phrases([location_phrase(r, c) for r, c in cells]),
    )


@dataclasses.dataclass(frozen=True)
class SyntheticSample:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8, 0 or 255, lesions only
    report: str
    lesion_cells: tuple[tuple[int, int], ...]  # reading order
    distractor_cells: tuple[tuple[int, int], ...]
    background: np.ndarray  # (H, W, 3) uint8, the image without any blob
    distractor_mask: np.ndarray  # (H, W) uint8, 0 or 255: the distractors' footprints


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # Keyed by (seed, split, index) so one split never shifts when another's size changes.
    split_id = SPLITS[split][0]
    return np.random.default_rng(np.random.SeedSequence([seed, split_id, index]))


def _unit_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to zero mean and unit std."""
    noise = rng.standard_normal(shape)
    if sigma > 4.0:
        # Wide kernels are cheaper as one periodic FFT than as long spatial convolutions.
        spectrum = ndimage.fourier_gaussian(np.fft.rfft2(noise), sigma, n=shape[-1])
        noise = np.fft.irfft2(spectrum, s=shape)
    else:
        noise = ndimage.gaussian_filter(noise, sigma, mode="wrap")
    noise -= noise.mean()
    return noise / (noise.std() + 1e-12)


def _cell_edges(image_size: int) -> np.ndarray:
    return np.round(np.linspace(0, image_size, GRID_SIZE + 1)).astype(int)


def _render_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey-level background in [0, 1] and the per-image RGB tint applied at the end."""
    coords = np.linspace(-1.0, 1.0, size)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    level = rng.uniform(0.42, 0.50)
    # Radial fall-off and a gentle tilt mimic exposure variation across a radiograph.
    vignette = -rng.uniform(0.08, 0.16) * (xx**2 + yy**2)
    tilt = rng.uniform(-0.05, 0.05) * xx + rng.uniform(-0.05, 0.05) * yy
    low_frequency = 0.012 * _unit_noise(rng, (size, size), size / 10)
    mid_frequency = 0.008 * _unit_noise(rng, (size, size), size / 40)
    grain = 0.012 * _unit_noise(rng, (size, size), 0.6)
    grey = level + vignette + tilt + low_frequency + mid_frequency + grain
    tint = np.array([1.0, 0.9, 0.82]) + rng.uniform(-0.01, 0.01, size=3)
    return grey, tint


def _render_blob(
    rng: np.random.Generator, cell_height: int, cell_width: int, image_size: int, is_lesion: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Intensity offset and binary footprint of one blob, both of the cell's shape."""
    cell_min = min(cell_height, cell_width)
    semi_major = rng.uniform(0.14, 0.26) * cell_min
    semi_minor = semi_major * rng.uniform(0.6, 1.0)
    rotation = rng.uniform(0.0, np.pi)
    harmonic_amplitudes = rng.uniform(0.0, 0.08, size=3)
    harmonic_phases = rng.uniform(0.0, 2 * np.pi, size=3)
    edge_width = rng.uniform(0.8, 1.6)
    max_radius = semi_major * (1.0 + harmonic_amplitudes.sum())
    # Keep the soft edge (about three widths) inside the cell so blobs never cross cells.
    margin = max_radius + 3.0 * edge_width + 1.0
    center_y = rng.uniform(margin, max(margin, cell_height - margin))
    center_x = rng.uniform(margin, max(margin, cell_width - margin))

    yy, xx = np.meshgrid(np.arange(cell_height) + 0.5, np.arange(cell_width) + 0.5, indexing="ij")
    dy, dx = yy - center_y, xx - center_x
    along = dx * np.cos(rotation) + dy * np.sin(rotation)
    across = -dx * np.sin(rotation) + dy * np.cos(rotation)
    radius = np.sqrt((along / semi_major) ** 2 + (across / semi_minor) ** 2)
    angle = np.arctan2(across / semi_minor, along / semi_major)
    # Low-order harmonics of the boundary radius give an irregular but star-shaped outline,
    # so the footprint stays one connected component.
    boundary = 1.0 + sum(
        amplitude * np.cos((order + 2) * angle + phase)
        for order, (amplitude, phase) in enumerate(zip(harmonic_amplitudes, harmonic_phases))
    )
    footprint = radius < boundary
    alpha = 1.0 / (1.0 + np.exp(-(boundary - radius) * semi_minor / edge_width))
    dome = np.clip(1.0 - 0.3 * (radius / boundary) ** 2, 0.0, 1.0)

    # Same brightness distribution for lesions and distractors: only texture tells them apart.
    contrast = rng.uniform(0.12, 0.22) * (1.0 if rng.random() < 0.75 else -1.0)
    # Texture amplitudes are absolute and close to the background grain (std 0.012), so the
    # texture is a weak cue next to the blob body itself.
    pixel_scale = image_size / 128.0
    if is_lesion:
        # Fine stripes oriented near 45 degrees plus fine speckle.
        orientation = np.deg2rad(45.0 + rng.uniform(-15.0, 15.0))
        period = max(2.5, rng.uniform(3.0, 4.2) * pixel_scale)
        stripe_amplitude = rng.uniform(0.012, 0.024)
        speckle_sigma, speckle_amplitude = 0.7, 0.006
    elif rng.random() < 0.5:
        # Smooth distractor: blotchy, no stripes.
        orientation, period, stripe_amplitude = 0.0, 1.0, 0.0
        speckle_sigma, speckle_amplitude = 2.0, 0.012
    else:
        # Slightly coarser stripes at the mirrored orientation.
        orientation = np.deg2rad(-45.0 + rng.uniform(-15.0, 15.0))
        period = max(3.0, rng.uniform(4.5, 6.5) * pixel_scale)
        stripe_amplitude = rng.uniform(0.012, 0.024)
        speckle_sigma, speckle_amplitude = 1.2, 0.006
    stripe_phase = rng.uniform(0.0, 2 * np.pi)
    stripes = np.sin(2 * np.pi * (xx * np.cos(orientation) + yy * np.sin(orientation)) / period + stripe_phase)
    speckle = _unit_noise(rng, (cell_height, cell_width), speckle_sigma)
    texture = stripe_amplitude * stripes + speckle_amplitude * speckle
    return alpha * dome * (contrast + texture), footprint


def render_sample(seed: int, split: str, index: int, image_size: int = 128) -> SyntheticSample:
    """Render one sample; a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    if image_size < MIN_IMAGE_SIZE:
        # Smaller cells cannot hold a blob and its soft edge without visible seams.
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    rng = _sample_rng(seed, split, index)
    grey, tint = _render_background(rng, image_size)

    num_lesions = int(rng.integers(1, 4))
    num_distractors = int(rng.integers(1, 3))
    cell_order = rng.permutation(GRID_SIZE * GRID_SIZE)
    lesion_cells = tuple(sorted(divmod(int(c), GRID_SIZE) for c in cell_order[:num_lesions]))
    distractor_cells = tuple(
        sorted(divmod(int(c), GRID_SIZE) for c in cell_order[num_lesions : num_lesions + num_distractors])
    )

    edges = _cell_edges(image_size)
    blobs = np.zeros_like(grey)
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    distractor_mask = np.zeros_like(mask)
    for cells, is_lesion in ((lesion_cells, True), (distractor_cells, False)):
        for row, col in cells:
            y0, y1, x0, x1 = edges[row], edges[row + 1], edges[col], edges[col + 1]
            offset, footprint = _render_blob(rng, y1 - y0, x1 - x0, image_size, is_lesion)
            blobs[y0:y1, x0:x1] += offset
            (mask if is_lesion else distractor_mask)[y0:y1, x0:x1][footprint] = 255

    report = describe(lesion_cells, rng)

    def to_rgb(grey_image: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(grey_image[..., None] * tint * 255.0), 0, 255).astype(np.uint8)

    return SyntheticSample(
        image=to_rgb(grey + blobs),
        mask=mask,
        report=report,
        lesion_cells=lesion_cells,
        distractor_cells=distractor_cells,
        background=to_rgb(grey),
        distractor_mask=distractor_mask,
    )


def file_name(index: int) -> str:
    return f"{FILE_PREFIX}{index:05d}.png"


def file_index(name: str) -> int:
    """Generator index of a file ``file_name`` wrote (syn_00012.png -> 12)."""
    return int(pathlib.Path(name).stem[len(FILE_PREFIX):])


def _split_sizes(num_train: int, num_val: int, num_test: int) -> dict[str, int]:
    return {"train": num_train, "val": num_val, "test": num_test}


def read_marker(root: pathlib.Path) -> dict | None:
    """The parameters a complete write recorded in root's marker, or None (no marker, or not a JSON object)."""
    try:
        written = json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return written if isinstance(written, dict) else None


def files_complete(root: pathlib.Path, parameters: dict) -> bool:
    """Whether root holds every file of the data that ``parameters`` (its marker's) describe."""
    sizes = _split_sizes(parameters["num_train"], parameters["num_val"], parameters["num_test"])
    for split, count in sizes.items():
        _, folder, csv_stem = SPLITS[split]
        split_dir = root / folder
        if not (split_dir / f"{csv_stem}_text.csv").is_file():
            return False
        for sub_dir in (IMAGE_DIR, MASK_DIR):
            try:
                names = os.listdir(split_dir / sub_dir)
            except OSError:
                return False
            if sum(name.startswith(FILE_PREFIX) for name in names) != count:
                return False
    return True


def _remove_previous_output(root: pathlib.Path) -> None:
    """Delete only files this module writes; refuse to touch anything else."""
    for _, folder, csv_stem in SPLITS.values():
        split_dir = root / folder
        for sub_dir in (IMAGE_DIR, MASK_DIR):
            directory = split_dir / sub_dir
            if not directory.is_dir():
                continue
            foreign = [p.name for p in directory.iterdir() if not p.name.startswith(FILE_PREFIX)]
            if foreign:
                # Guards against overwriting a real dataset that shares the layout.
                raise FileExistsError(
                    f"{directory} holds files not written by this generator (e.g. {foreign[0]}); "
                    "refusing to overwrite"
                )
        for sub_dir in (IMAGE_DIR, MASK_DIR):
            directory = split_dir / sub_dir
            if directory.is_dir():
                for path in directory.iterdir():
                    path.unlink()
        (split_dir / f"{csv_stem}_text.csv").unlink(missing_ok=True)


def write_synthetic_dataset(
    root: str | os.PathLike,
    *,
    num_train: int = 200,
    num_val: int = 50,
    num_test: int = 50,
    image_size: int = 128,
    seed: int = 0,
) -> pathlib.Path:
    """Write the dataset under ``root`` unless an identical complete one is already there."""
    root = pathlib.Path(root)
    parameters = {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_test": int(num_test),
        "image_size": int(image_size),
    }
    if min(num_train, num_val, num_test) < 0 or seed < 0:
        raise ValueError(f"sizes and seed must be non-negative, got {parameters}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if (written := read_marker(root)) is not None and files_complete(root, written):
        if written == parameters:
            return root
        # Another run's complete data: replacing it would change what that run's results were measured on.
        other = ", ".join(f"{k} {written.get(k)} -> {v}" for k, v in parameters.items()
                          if k != "format_version" and written.get(k) != v)
        if other:
            raise FileExistsError(f"{root} holds complete synthetic data of other settings ({other}); refusing to "
                                  "replace it: delete it or choose another folder")

    root.mkdir(parents=True, exist_ok=True)
    # Drop the marker first so an interrupted run is never mistaken for a complete one.
    (root / MARKER_NAME).unlink(missing_ok=True)
    _remove_previous_output(root)

    for split, count in _split_sizes(num_train, num_val, num_test).items():
        _, folder, csv_stem = SPLITS[split]
        split_dir = root / folder
        (split_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
        (split_dir / MASK_DIR).mkdir(parents=True, exist_ok=True)
        rows = []
        for index in range(count):
            sample = render_sample(seed, split, index, image_size)
            name = file_name(index)
            Image.fromarray(sample.image).save(split_dir / IMAGE_DIR / name, compress_level=1)
            Image.fromarray(sample.mask).save(split_dir / MASK_DIR / name, compress_level=1)
            rows.append((name, sample.report))
        with open(split_dir / f"{csv_stem}_text.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(("Image", "Description"))
            writer.writerows(rows)

    temporary_marker = root / (MARKER_NAME + ".tmp")
    temporary_marker.write_text(json.dumps(parameters, indent=2, sort_keys=True) + "\n")
    os.replace(temporary_marker, root / MARKER_NAME)
    return root


CORPUS_FINDINGS = ("No acute finding.", "A mass in the left lobe.", "Two lesions, upper right and centre.",
                   "Diffuse increased markings.")


def write_corpus(folder: pathlib.Path, count: int, size: int = 40, seed: int = 0, splits: Sequence[str] = ("train",),
                 findings: Sequence[str] = CORPUS_FINDINGS) -> pathlib.Path:
    """A generated image-report corpus (tests, loader benchmarks): ``count`` random (size, size + 8) RGB PNGs
    in folder/images/ and folder/corpus.jsonl with one row per image, {'file': 'images/<i>.png', 'meta':
    {'split': splits[i % len(splits)], 'modality': 'MR' when i % 3 == 0 else 'CT'}, 'findings':
    findings[i % len(findings)], 'impression': '<modality> image <i>.'}. Returns the JSONL's path."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for i in range(count):
            modality = "CT" if i % 3 else "MR"
            Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
            row = {"file": f"images/{i}.png", "meta": {"split": splits[i % len(splits)], "modality": modality},
                   "findings": findings[i % len(findings)], "impression": f"{modality} image {i}."}
            f.write(json.dumps(row) + "\n")
    return folder / "corpus.jsonl"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="output directory")
    parser.add_argument("--num_train", type=int, default=200)
    parser.add_argument("--num_val", type=int, default=50)
    parser.add_argument("--num_test", type=int, default=50)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = write_synthetic_dataset(
        args.root,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        image_size=args.image_size,
        seed=args.seed,
    )
    print(f"synthetic dataset ready at {root} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
