"""Image-report corpora listed in CSV or JSONL files (pre-training beyond the LViT folders).

A corpus file has one row per image: a CSV with a header, or JSON lines
(nested objects allowed: a field 'Description.Caption' reads
row['Description']['Caption']). config.data.corpus names the files (one per
split, or one file with a split column), the image field (a path relative to
the file, formatted through ``image_path``, e.g. 'images/{}.jpg' when the
field holds a stem), the text fields joined into the report; the label
fields that zero-shot and linear-probe evaluation name are read too.

Images are not decoded here: ``CorpusImages`` decodes a row when it is
indexed, so the training pipeline's grain workers read from disk batch by
batch; ``load`` decodes a split into memory instead when its images fit in
data.corpus.in_memory_bytes (faster for small corpora). Every problem is a
``DataError`` naming the file and row.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import tempfile
import weakref
from typing import Iterator, Optional

import numpy as np

from amvlm_jax.data.folders import DataError, SplitArrays, csv_records, decode_all, load_image, written_empty

SPLITS = ("train", "val", "test")


class CorpusImages:
    """Images of a corpus split, decoded and resized to (S, S, 3) uint8 when indexed.

    ``images[i]`` -> (S, S, 3); ``images[rows]`` (an integer array) -> (len(rows), S, S, 3). The paths
    are one bytes array in a temporary .npy file, memory-mapped: a grain worker is sent the file's name
    (``__reduce__``) and maps the same pages, so neither the pickles nor the workers grow with the
    corpus. The instance that wrote the file deletes it when it is collected or the process ends.
    """

    def __init__(self, paths: list[str], size: int):
        fd, file = tempfile.mkstemp(prefix="amvlm_corpus_paths_", suffix=".npy")
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.array([os.fsencode(p) for p in paths]))
        weakref.finalize(self, _remove, file)
        self._map(file, size)

    def _map(self, file: str, size: int):
        self.file, self.size = file, size
        self.paths = np.load(file, mmap_mode="r")
        self.shape = (len(self.paths), size, size, 3)

    @classmethod
    def _mapped(cls, file: str, size: int) -> "CorpusImages":
        images = cls.__new__(cls)
        images._map(file, size)
        return images

    def __reduce__(self):
        return CorpusImages._mapped, (self.file, self.size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if np.ndim(index) == 0:
            return load_image(pathlib.Path(os.fsdecode(self.paths[int(index)])), self.size)[0]
        return np.stack([self[i] for i in np.asarray(index).reshape(-1)])


def _remove(file: str):
    try:
        os.unlink(file)
    except OSError:  # Already gone, or (Windows) still mapped: the temporary folder's cleaner takes it.
        pass


def is_configured(config) -> bool:
    """Whether pre-training reads a corpus file (data.corpus.train) rather than LViT folders."""
    return bool(config.data.corpus.train)


def _read_rows(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
    """Yields (number for messages, row) of a .csv file with a header (the line where the row starts: a quoted
    report may span lines), a .jsonl file (its line) or a .json list (its position, from 1), one row at a time
    (a large corpus is never held as row objects). A UTF-8 byte-order mark is allowed in each format."""
    if not path.is_file():
        raise DataError(f"{path}: {_not_a_file(path)}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            rows = ((line, cells) for line, cells in csv_records(f, path) if cells)  # Blank lines are skipped.
            header_line, header = next(rows, (1, []))
            _utf8(",".join(header), f"{path}:{header_line}")
            if repeated := sorted({name for name in header if name and header.count(name) > 1}):  # '': unnamed.
                raise DataError(f"{path}:{header_line}: column '{repeated[0]}' appears more than once in the header")
            for number, cells in rows:
                _utf8(",".join(cells), f"{path}:{number}")
                if len(cells) != len(header):
                    raise DataError(f"{path}:{number}: {len(cells)} fields, the header has {len(header)}")
                yield number, dict(zip(header, cells))
        return
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                            "save it as UTF-8") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: a .json corpus must hold a list of objects")
        yield from enumerate(rows, start=1)
        return
    if suffix != ".jsonl":
        raise DataError(f"{path}: corpus files must end in .csv, .jsonl or .json")
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(_utf8(line, f"{path}:{number}"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: not a JSON object")
            yield number, row


def _not_a_file(path: pathlib.Path) -> str:
    """Why a corpus file named in the config cannot be read: a folder (the images' or the dataset's), or nothing."""
    return "a folder, not a corpus file (.csv, .jsonl or .json)" if path.is_dir() else "corpus file not found"


def _utf8(text: str, where: str) -> str:
    """text (read with errors='surrogateescape'), or a DataError at its first byte that was not UTF-8."""
    if bad := re.search("[\udc80-\udcff]", text):
        raise DataError(f"{where}: not UTF-8 text (byte 0x{ord(bad[0]) - 0xdc00:02x} after "
                        f"{text[:bad.start()][-20:]!r}); save it as UTF-8")
    return text


def field(row: dict, name: str, where: str):
    """row[name] (a CSV column may hold dots), else the nested value of a JSON path written with dots or
    slashes ('a.b' or 'a/b': config keys such as eval.zero_shot's cannot hold dots)."""
    if name in row:
        return row[name]
    node, reached = row, []
    for part in re.split(r"[./]", name):
        if not isinstance(node, dict) or part not in node:
            holder = f"'{'.'.join(reached)}'" if reached else "the row"
            has = f"has {', '.join(repr(k) for k in list(node)[:8])}" if isinstance(node, dict) else "is no object"
            raise DataError(f"{where}: no field '{name}' ({holder} {has})")
        node = node[part]
        reached.append(part)
    return node


def labels_read(config) -> list[str]:
    """Label fields the evaluations need: eval.zero_shot's and eval.probe_fields, in order, once each."""
    return list(dict.fromkeys([*config.eval.zero_shot.keys(), *config.eval.probe_fields]))


def _text(value) -> str:
    return "" if value is None else str(value).strip()


_JSON_TYPES = {dict: "object", list: "array", bool: "boolean", int: "number", float: "number"}


def _report_text(row: dict, name: str, where: str) -> str:
    """The text of report field ``name``: a string, or null (no text); a DataError for any other JSON value
    and for an empty cell written as text ('nan')."""
    value = field(row, name, where)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: report field '{name}' is a JSON {_JSON_TYPES[type(value)]}, not a string")
    return _not_written_empty(_text(value), "report", name, where)


def _not_written_empty(text: str, kind: str, name: str, where: str) -> str:
    if written_empty(text):
        raise DataError(f"{where}: {kind} field '{name}' is '{text}' (an empty cell written as text?); leave it empty")
    return text


def _label_text(row: dict, name: str, where: str) -> str:
    """The class of label field ``name``: a string or a number as text; '' (no label) for null or an empty
    string; a DataError for an object, array or boolean."""
    value = field(row, name, where)
    if isinstance(value, (dict, list, bool)):
        raise DataError(f"{where}: label field '{name}' is a JSON {_JSON_TYPES[type(value)]}, not a string or number")
    return _not_written_empty(_text(value), "label", name, where)


def _file_path(config, file: str) -> pathlib.Path:
    """A corpus file's path: as given when absolute, else relative to data.root when that is set."""
    path = pathlib.Path(os.path.expanduser(file))
    if config.data.root and not path.is_absolute():
        path = pathlib.Path(os.path.expanduser(config.data.root)) / path
    return path


def check_files(config) -> None:
    """A one-line DataError for the first configured split file that does not exist: before any split is
    read or decoded, so a typo in the test split's name does not wait for the training split. Nothing to
    check when pre-training reads the LViT folders (``is_configured``)."""
    if not is_configured(config):
        return
    for split in SPLITS:
        if config.data.corpus[split] and not (path := _file_path(config, config.data.corpus[split])).is_file():
            where = "below config.data.root" if config.data.root else "config.data.root is not set"
            raise DataError(f"{path}: {_not_a_file(path)} (config.data.corpus.{split}; {where})")


def read_split(config, split: str) -> Optional[dict]:
    """The rows of ``split`` as {'source', 'paths', 'reports', 'labels' {field: [value]: '' for a row
    without one}, 'skipped'}, or None when the corpus has no such split.

    data.corpus.<split> names the split's file; without it (val, test) and with data.corpus.split_field
    set, the train file's rows whose split field equals data.corpus.split_names[split] are used; a split value
    that is none of split_names, a train file without training rows and a repeated (image, report) row of a
    split are errors.
    """
    corpus = config.data.corpus
    file, selected = corpus[split], None
    if not file:
        if not corpus.split_field:
            return None
        file, selected = corpus.train, corpus.split_names[SPLITS.index(split)]
    elif corpus.split_field and file == corpus.train:
        selected = corpus.split_names[SPLITS.index(split)]
    path = _file_path(config, file)
    label_fields = labels_read(config)
    paths, reports, labels, missing = [], [], {name: [] for name in label_fields}, []
    found, first = collections.Counter(), {}  # Rows of each split value; the first row of each (image, report).
    for number, row in _read_rows(path):
        where = f"{path}:{number}"
        if selected is not None:
            value = _text(field(row, corpus.split_field, where))
            if value not in corpus.split_names:
                raise DataError(f"{where}: {corpus.split_field} '{value}' is none of data.corpus.split_names "
                                f"({', '.join(corpus.split_names)})")
            found[value] += 1
            if value != selected:
                continue
        image = field(row, corpus.image_field, where)
        if isinstance(image, (dict, list, bool)):  # Its text ("['a.png']", 'True') would be looked for as a file.
            raise DataError(f"{where}: image field '{corpus.image_field}' is a JSON {_JSON_TYPES[type(image)]}, not a "
                            "path or a stem")
        if not (image := _text(image)):
            raise DataError(f"{where}: empty image field '{corpus.image_field}'")
        image_path = path.parent / os.path.expanduser(corpus.image_path.format(image))
        if not image_path.is_file():
            if image_path.is_dir():  # Not missing: the field names the wrong thing.
                raise DataError(f"{where}: image {image_path} is a folder, not an image file")
            if corpus.missing_images != "skip":
                raise DataError(f"{where}: image {image_path} not found (data.corpus.missing_images='skip' "
                                "skips such rows)")
            missing.append(number)
            continue
        report = " ".join(t for t in (_report_text(row, name, where) for name in corpus.text_fields) if t)
        if not report:
            raise DataError(f"{where}: empty report (fields {', '.join(corpus.text_fields)})")
        if (key := (str(image_path), report)) in first:
            raise DataError(f"{where}: the same image and report as row {first[key]}")
        first[key] = number
        paths.append(str(image_path))
        reports.append(report)
        for name in label_fields:
            labels[name].append(_label_text(row, name, where))
    if not paths and selected is not None and not found[selected]:
        if split != "train":
            return None
        values = ", ".join(f"{count} '{value}'" for value, count in found.items()) or "none"
        raise DataError(f"{path}: no training rows ({corpus.split_field} '{selected}'); split values found: {values}")
    if not paths:
        raise DataError(f"{path}: no rows" + (f" ({len(missing)} skipped: image missing)" if missing else ""))
    return {"source": str(path), "paths": paths, "reports": reports, "labels": labels, "skipped": len(missing)}


def load(config, split: str, image_size: int, threads: int = 4) -> Optional[tuple[SplitArrays, dict, str]]:
    """(the split as a ``SplitArrays`` without masks, its labels {field: [value]}, a line saying where it
    came from and how many rows were skipped), or None when the corpus has no such split.

    ``images`` is decoded in memory when N * S * S * 3 bytes <= data.corpus.in_memory_bytes, else a
    ``CorpusImages`` that decodes rows when they are read.
    """
    rows = read_split(config, split)
    if rows is None:
        return None
    paths = rows["paths"]
    names = [pathlib.Path(p).stem for p in paths]
    if len(paths) * image_size * image_size * 3 <= config.data.corpus.in_memory_bytes:
        images = np.stack(decode_all(lambda i: load_image(pathlib.Path(paths[i]), image_size)[0], len(paths), threads,
                                     f"reading {split}"))
        how = "in memory"
    else:
        images, how = CorpusImages(paths, image_size), "streamed from disk"
    skipped = f", {rows['skipped']} row(s) skipped: image missing" if rows["skipped"] else ""
    return (SplitArrays(names, images, None, rows["reports"]), rows["labels"],
            f"{split}: {len(names)} pairs from {rows['source']} ({how}{skipped})")
