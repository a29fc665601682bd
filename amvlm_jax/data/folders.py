"""Reader for the LViT folder layout (SPEC section 1).

    <root>/Train_Folder/{img/, labelcol/, Train_text.xlsx}
    <root>/Val_Folder/{img/, labelcol/, Val_text.xlsx}
    <root>/Test_Folder/{img/, labelcol/, Test_text.xlsx}

Reports come from the .xlsx sheet or a .csv with the same two columns
(Image, Description). Files are matched by stem, so a sheet naming `x.png`
finds `img/x.tif`, and a mask may carry a `mask_` prefix.

Every problem with the data raises `DataError` with a one-line message that
names the offending file; nothing is dropped silently.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import os
import pathlib
import sys
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

SPLIT_FOLDERS = {"train": "Train_Folder", "val": "Val_Folder", "test": "Test_Folder"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_PREFIX = "mask_"

LAYOUT_HELP = (
    "expected <root>/Train_Folder/{img/,labelcol/,Train_text.xlsx|.csv}, "
    "<root>/Val_Folder/{...,Val_text.xlsx}, optionally <root>/Test_Folder/{...,Test_text.xlsx}"
)


class DataError(ValueError):
    """A problem with the user's data, described in one line."""


def written_empty(text: str) -> bool:
    """Whether a cell's (stripped) text is an empty cell written out as text: 'nan', as pandas' astype(str) writes
    a missing value (it would train as the word). 'None' is not: MedPix-2.0 says 'None' for no treatment."""
    return text.lower() == "nan"


@dataclasses.dataclass(frozen=True)
class Example:
    """One image-report pair on disk; `mask_path` is None when the mask is absent."""

    name: str
    image_path: pathlib.Path
    mask_path: Optional[pathlib.Path]
    report: str


@dataclasses.dataclass
class SplitArrays:
    """A split decoded and resized in memory.

    images: (N, S, S, 3) uint8; masks: (N, S, S) uint8 class ids (0/1 when
    binary) or None when masks were not loaded; reports: N strings.
    """

    names: list
    images: np.ndarray
    masks: Optional[np.ndarray]
    reports: list

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, indices: Sequence[int]) -> "SplitArrays":
        indices = np.asarray(indices, dtype=np.int64)
        return SplitArrays(
            names=[self.names[i] for i in indices],
            images=self.images[indices],
            masks=None if self.masks is None else self.masks[indices],
            reports=[self.reports[i] for i in indices],
        )


def check_root(root: str) -> pathlib.Path:
    """Returns `root` as a path, or raises DataError saying what layout is expected."""
    if not root:
        raise DataError(f"data.root is not set: pass --config.data.root=DIR; {LAYOUT_HELP}")
    path = pathlib.Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: data root {'is a file, not a folder' if path.exists() else 'does not exist'}; "
                        f"{LAYOUT_HELP}")
    if not (path / SPLIT_FOLDERS["train"]).is_dir():
        raise DataError(f"{path}: no Train_Folder in the data root; {LAYOUT_HELP}")
    return path


def has_split(root: pathlib.Path, split: str) -> bool:
    return (pathlib.Path(root) / SPLIT_FOLDERS[split]).is_dir()


def csv_records(lines, path: pathlib.Path):
    """(line where the record starts, record) of csv.reader(lines) (a quoted field may span lines), with a
    malformed record (most often a quote left open, which swallows the rest of the file into one field) a
    DataError naming the file and that line."""
    reader = csv.reader(lines)
    while True:
        start = reader.line_num + 1
        try:
            yield start, next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            hint = " (a quote left open?)" if "field limit" in str(e) else ""
            raise DataError(f"{path}:{start}: not a valid CSV record: {e}{hint}") from None


def read_sheet(path: pathlib.Path) -> list[tuple[int, str, str]]:
    """Returns (row number, image name, description) for every non-empty row."""
    rows: list[tuple[int, str, str]] = []
    if path.suffix.lower() == ".csv":
        data = path.read_bytes()
        try:  # Decoded whole, so e.start is the position in the file.
            text = data.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at position {e.start}); "
                            "save it as UTF-8") from None
        table = [cells for _, cells in csv_records(io.StringIO(text, newline=""), path)]
    else:
        import openpyxl  # Imported lazily: only sheets need it.

        try:  # Read-only workbooks parse each sheet as it is iterated: a damaged sheet fails in the loop.
            book = openpyxl.load_workbook(path, read_only=True, data_only=True)
            try:
                table = [list(r) for r in book.worksheets[0].iter_rows(values_only=True)]
            finally:
                book.close()
        except Exception as e:  # openpyxl raises many types for damaged files.
            reason = " ".join(str(e).split())[:200]  # One line, whatever the file put in the message.
            raise DataError(f"{path}: cannot read the report sheet ({type(e).__name__}: {reason})") from None
    if not table:
        raise DataError(f"{path}: the report sheet is empty")
    header = [str(c).strip().lower() if c is not None else "" for c in table[0]]
    if "image" not in header or "description" not in header:
        raise DataError(f"{path}: the report sheet needs the columns Image and Description, found {table[0]}")
    image_col, text_col = header.index("image"), header.index("description")
    for row_number, row in enumerate(table[1:], start=2):
        cells = list(row) + [None] * (max(image_col, text_col) + 1 - len(row))
        image, text = cells[image_col], cells[text_col]
        if image is None or str(image).strip() == "":
            if text is not None and str(text).strip():
                raise DataError(f"{path}: row {row_number} has a description but no image name")
            continue
        description = "" if text is None else str(text).strip()
        if description == "":
            raise DataError(f"{path}: row {row_number} ({image}) has an empty description")
        if written_empty(description):
            raise DataError(f"{path}: row {row_number} ({image}) has the description '{description}' "
                            "(an empty cell written as text?)")
        rows.append((row_number, str(image).strip(), description))
    return rows


def sheet_reports(path: pathlib.Path, stem_of: Callable[[str], str]) -> dict[str, tuple[int, str, str]]:
    """{stem_of(image name): (row number, image name, description)} of a report sheet; a stem named twice is an
    error (which row holds the report would be a guess)."""
    reports: dict[str, tuple[int, str, str]] = {}
    for row_number, name, text in read_sheet(path):
        stem = stem_of(name)
        if stem in reports:
            raise DataError(f"{path}: row {row_number} repeats image '{name}' (row {reports[stem][0]})")
        reports[stem] = (row_number, name, text)
    return reports


def file_stem(name: str) -> str:
    base = os.path.basename(name)
    stem, suffix = os.path.splitext(base)
    return stem if suffix.lower() in IMAGE_SUFFIXES else base


def _index_folder(folder: pathlib.Path, strip_prefix: str = "") -> dict[str, pathlib.Path]:
    """Maps file stem (without `strip_prefix`) to path for the image files of a folder."""
    index: dict[str, pathlib.Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = path.stem
        if strip_prefix and stem.startswith(strip_prefix):
            stem = stem[len(strip_prefix):]
        if stem in index:
            raise DataError(f"{path}: two files share the stem '{stem}' ({index[stem].name})")
        index[stem] = path
    return index


def list_split(root: str | os.PathLike, split: str, require_masks: bool = True) -> list[Example]:
    """Lists the examples of one split, matched by file stem, in image file name order."""
    return list_split_folder(pathlib.Path(root) / SPLIT_FOLDERS[split], require_masks)


def _sheets(folder: pathlib.Path) -> list[pathlib.Path]:
    prefix = folder.name.split("_")[0]
    return [folder / f"{prefix}_text{ext}" for ext in (".xlsx", ".csv")]


def is_split_folder(folder: pathlib.Path) -> bool:
    """Whether ``folder`` is one split of the LViT layout (img/ and its report sheet)."""
    return (folder / "img").is_dir() and any(s.is_file() for s in _sheets(folder))


def list_split_folder(folder: pathlib.Path, require_masks: bool = True) -> list[Example]:
    """The examples of one LViT split folder (img/, labelcol/, <Prefix>_text.xlsx|.csv)."""
    sheets = _sheets(folder)
    present = [s for s in sheets if s.is_file()]
    if not present:
        raise DataError(f"{folder}: no report sheet ({sheets[0].name} or {sheets[1].name})")
    if len(present) > 1:  # Which one was edited last is not ours to guess.
        raise DataError(f"{folder}: two report sheets ({sheets[0].name} and {sheets[1].name}); keep one")
    sheet = present[0]
    for sub in ("img", "labelcol") if require_masks else ("img",):
        if not (folder / sub).is_dir():
            raise DataError(f"{folder / sub}: folder missing; {LAYOUT_HELP}")
    images = _index_folder(folder / "img")
    masks = _index_folder(folder / "labelcol", MASK_PREFIX) if (folder / "labelcol").is_dir() else {}

    def sheet_stem(name: str) -> str:  # A row may name an image by its mask's name.
        stem = file_stem(name)
        return stem[len(MASK_PREFIX):] if stem.startswith(MASK_PREFIX) and stem not in images else stem

    reports: dict[str, str] = {}
    for stem, (row_number, image_name, text) in sheet_reports(sheet, sheet_stem).items():
        if stem not in images:
            if (folder / "img" / image_name).is_file():
                raise DataError(f"{sheet}: row {row_number} names '{image_name}', a file type the reader does not "
                                f"take ({', '.join(sorted(IMAGE_SUFFIXES))})")
            raise DataError(f"{sheet}: row {row_number} names '{image_name}' but {folder / 'img'} has no such image")
        reports[stem] = text

    examples = []
    for stem, image_path in images.items():
        if stem not in reports:
            raise DataError(f"{image_path}: no report row in {sheet.name}")
        mask_path = masks.get(stem)
        if require_masks and mask_path is None:
            raise DataError(f"{image_path}: no mask in {folder / 'labelcol'}")
        examples.append(Example(stem, image_path, mask_path, reports[stem]))
    if not examples:
        raise DataError(f"{folder / 'img'}: no images")
    return examples


def open_image(path: pathlib.Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        # Counting a TIFF's pages reads each page's directory: a damaged one fails here, not at load().
        frames = getattr(image, "n_frames", 1)
        # A file stored turned, with the turn recorded in its EXIF orientation (as cameras and some scanners write
        # them): viewers show it turned back, a mask is drawn on what they show, and the authors' reader (OpenCV's
        # imread) turns it back too. Read as stored, a square image would lie under its mask rotated or mirrored.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as e:  # PIL raises several types for damaged files.
        raise DataError(f"{path}: unreadable image ({type(e).__name__})") from None
    if frames > 1:  # A multi-page TIFF: only its first page would be read.
        raise DataError(f"{path}: holds {frames} frames (pages); give one image per file")
    return image


def rgb_image(path: pathlib.Path) -> Image.Image:
    """The image at its own size as 8-bit RGB, as the model sees it before resizing."""
    image = open_image(path)
    if image.mode in ("I;16", "I;16B", "I", "F"):
        # 16-bit and float scans: stretch to 8 bits (a plain conversion saturates everything above 255).
        array = np.asarray(image, dtype=np.float64)
        if not (finite := np.isfinite(array)).all():  # NaN would make the whole image one value (min and max NaN).
            raise DataError(f"{path}: float image holds {(~finite).sum()} NaN or infinite pixel(s); give them a "
                            "number (e.g. the background's)")
        lo, hi = float(array.min()), float(array.max())
        array = (array - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        image = Image.fromarray(array.astype(np.uint8))
    return image.convert("RGB")


def load_image(path: pathlib.Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Returns the image as (size, size, 3) uint8 (bicubic) and its original (width, height)."""
    image = rgb_image(path)
    return np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.uint8), image.size


def load_mask(path: pathlib.Path, size: int, num_classes: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Returns the mask as (size, size) uint8 class ids (nearest) and its original (width, height).

    Binary tasks (num_classes == 1) accept {0, 1} or {0, 255} masks; multi-class
    masks hold class ids below num_classes.
    """
    image = open_image(path)
    original = image.size
    if "A" in image.getbands() and (alpha := np.asarray(image.getchannel("A"))).min() < 255:
        # Converting to grey drops the alpha channel: fine where it only hides the background (a transparent black
        # one), not where the mask is drawn in it.
        if not np.array_equal(alpha > 0, np.asarray(image.convert("L")) > 0):
            raise DataError(f"{path}: mask's transparency and its grey values disagree on the foreground; save it "
                            "without transparency (0/255 grey or class ids)")
    if image.mode in ("RGB", "RGBA"):
        # Grey conversion weighs the channels (0.299 R + 0.587 G + 0.114 B): a colour mask's values would be
        # turned into other ones, silently where they fall in range (ids 1-19 in R alone become 0-6).
        rgb = np.asarray(image.convert("RGB"))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            colours = np.unique(rgb.reshape(-1, 3), axis=0)
            shown = ", ".join(str(tuple(c.tolist())) for c in colours[:4]) + (" ..." if len(colours) > 4 else "")
            raise DataError(f"{path}: colour mask (its RGB channels differ: {shown}); save it as grey values "
                            "(0/255 or 0/1) or class ids")
    if image.mode not in ("L", "1", "P", "I", "I;16", "I;16B", "F"):
        # Read as they are: grey conversion clips 16-bit ids above 255 and rounds or clips float values silently.
        image = image.convert("L")
    array = np.asarray(image)
    values = np.unique(array)
    if array.dtype.kind == "f" and not np.array_equal(values, np.round(values)):  # NaN included
        fraction = values[values != np.round(values)][0]
        raise DataError(f"{path}: mask holds the value {fraction:g}; a float mask must hold whole class ids "
                        "(or 0/255, 0/1)")
    # JPEG compression blurs a mask's edges into values in between: a binary mask then holds values it should
    # not (refused below, saying why), and a multi-class one holds other class ids there, in range or not.
    lossless = "save masks losslessly, e.g. as PNG"
    if num_classes == 1:
        if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
            shown = ", ".join(str(v) for v in values[:6]) + (" ..." if len(values) > 6 else "")
            why = f" (a JPEG: its compression blurs a mask's edges into other values; {lossless})" \
                if image.format == "JPEG" else ""
            raise DataError(f"{path}: mask of a binary task holds values {shown}; expected 0/255 or 0/1{why}")
        array = (array > 0).astype(np.uint8)
    elif image.format == "JPEG":
        raise DataError(f"{path}: a multi-class mask stored as JPEG (its compression turns the class ids at the "
                        f"edges into other ids); {lossless}")
    elif values.min() < 0:  # A 32-bit mask's negative id (an 'ignore' label) would wrap to 255 below.
        raise DataError(f"{path}: mask holds class id {int(values.min())}; class ids run from 0 to "
                        f"data.num_classes - 1 = {num_classes - 1}")
    elif values.max() >= num_classes:
        raise DataError(f"{path}: mask holds class id {int(values.max())}, but data.num_classes is {num_classes}")
    resized = Image.fromarray(array.astype(np.uint8)).resize((size, size), Image.NEAREST)
    return np.asarray(resized, dtype=np.uint8), original


def decode_all(decode: Callable[[int], object], count: int, threads: int, progress: Optional[str]) -> list:
    """[decode(0), ..., decode(count - 1)] from a pool of `threads` threads (PIL decodes without the GIL),
    with a progress bar titled `progress` unless it is None or this is not process 0 of a multi-process run."""
    jax = sys.modules.get("jax")  # The data modules do not import it (grain workers); a training process has.
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        results = pool.map(decode, range(count))
        if progress is not None and (jax is None or jax.process_index() == 0):
            from tqdm import tqdm

            results = tqdm(results, total=count, desc=progress, leave=False)
        return list(results)


def load_split(
    root: str | os.PathLike,
    split: str,
    image_size: int,
    num_classes: int = 1,
    with_masks: bool = True,
    mask_indices: Optional[Sequence[int]] = None,
    threads: int = 4,
    progress: bool = True,
) -> SplitArrays:
    """Decodes and resizes a whole split into memory, checking every file.

    `mask_indices` restricts which masks are read (the labeled subset of a
    semi-supervised run: the others are never opened and need not exist);
    other rows of `masks` are zero.
    """
    examples = list_split(root, split, require_masks=with_masks and mask_indices is None)
    wanted = set(range(len(examples)) if mask_indices is None else mask_indices) if with_masks else set()

    def decode(i: int):
        example = examples[i]
        image, image_size_orig = load_image(example.image_path, image_size)
        mask = None
        if i in wanted:
            if example.mask_path is None:
                raise DataError(f"{example.image_path}: no mask in {example.image_path.parent.parent / 'labelcol'}")
            mask, mask_size_orig = load_mask(example.mask_path, image_size, num_classes)
            if mask_size_orig != image_size_orig:
                raise DataError(
                    f"{example.mask_path}: mask is {mask_size_orig[0]}x{mask_size_orig[1]} but its image "
                    f"{example.image_path.name} is {image_size_orig[0]}x{image_size_orig[1]}"
                )
        return image, mask

    decoded = decode_all(decode, len(examples), threads, f"reading {split}" if progress else None)
    images = np.stack([d[0] for d in decoded])
    masks = None
    if with_masks:
        masks = np.zeros(images.shape[:3], np.uint8)
        for i, (_, mask) in enumerate(decoded):
            if mask is not None:
                masks[i] = mask
    return SplitArrays([e.name for e in examples], images, masks, [e.report for e in examples])
