"""Image-report corpora in CSV / JSONL files: reading, errors, streaming, and what pre-training learned."""

import csv
import json
import os
import pathlib
import re

import numpy as np
import pytest
from scipy import optimize

from amvlm_jax import metrics
from amvlm_jax.data import corpus, folders, pipeline
from amvlm_jax.data.folders import DataError
from amvlm_jax.train import checkpoint

from conftest import SAMPLE_REPORTS, corpus_config, repo_module, tiny_synthetic_config, write_corpus


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> pathlib.Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), 24, splits=("train", "train", "val", "test"))


def test_one_file_with_a_split_field_nested_fields_and_joined_texts(generated):
    config = corpus_config(generated)
    rows = {split: corpus.read_split(config, split) for split in ("train", "val", "test")}
    assert [len(rows[s]["paths"]) for s in ("train", "val", "test")] == [12, 6, 6]
    # Row 2 (0-based) is the first val row: images/2.png, its findings and impression joined.
    assert rows["val"]["paths"][0] == str(generated.parent / "images" / "2.png")
    assert rows["val"]["reports"][0] == f"{SAMPLE_REPORTS[2]} CT image 2."
    # Row 3 is the first test row (the split field's third name), not another val row.
    assert rows["test"]["paths"][:2] == [str(generated.parent / "images" / f"{i}.png") for i in (3, 7)]
    config.eval.probe_fields = ("meta.modality",)
    labels = corpus.read_split(config, "train")["labels"]
    assert labels == {"meta.modality": ["MR" if i % 3 == 0 else "CT" for i in range(24) if i % 4 < 2]}


def test_csv_per_split_files_with_an_image_template_and_relative_to_data_root(tmp_path):
    write_corpus(tmp_path, 4)
    for split, rows in (("train", range(3)), ("test", range(3, 4))):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["stem", "Report.Text", "Type"])
            writer.writerows([[str(i), f"report {i}", "CT"] for i in rows])
    config = corpus_config(tmp_path / "train.csv")
    config.data.root = str(tmp_path)
    config.data.corpus.update(dict(train="train.csv", test="test.csv", split_field="", image_field="stem",
                                   image_path="images/{}.png", text_fields=("Report.Text",)))
    train = corpus.read_split(config, "train")
    assert train["reports"] == ["report 0", "report 1", "report 2"]
    assert train["paths"][1] == str(tmp_path / "images" / "1.png")
    assert corpus.read_split(config, "val") is None
    assert corpus.read_split(config, "test")["reports"] == ["report 3"]


def _error(config, split="train") -> str:
    with pytest.raises(DataError) as raised:
        corpus.read_split(config, split)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_bad_rows_are_one_line_errors_naming_file_and_row(tmp_path):
    path = write_corpus(tmp_path, 6)
    config = corpus_config(path)
    lines = path.read_text().splitlines()

    def rewrite(index: int, text: str):
        path.write_text("\n".join(lines[:index] + [text] + lines[index + 1:]) + "\n")

    rewrite(3, "{not json")
    assert _error(config).startswith(f"{path}:4: not a JSON object")
    row = json.loads(lines[4])
    del row["findings"]
    rewrite(4, json.dumps(row))
    assert _error(config).startswith(f"{path}:5: no field 'findings'")
    row = json.loads(lines[1]) | {"findings": "", "impression": " "}
    rewrite(1, json.dumps(row))
    assert _error(config) == f"{path}:2: empty report (fields findings, impression)"
    rewrite(1, json.dumps(row | {"findings": "nan"}))  # pandas' text for an empty cell: not a report
    assert _error(config) == (f"{path}:2: report field 'findings' is 'nan' (an empty cell written as text?); "
                              "leave it empty")
    for name, says in [("meta.modalty", "('meta' has 'split', 'modality')"), ("meta.split.x", "('meta.split' is no object)")]:
        with pytest.raises(DataError, match=rf"^f:1: no field '{re.escape(name)}' {re.escape(says)}$"):
            corpus.field({"meta": {"split": "train", "modality": "CT"}}, name, "f:1")
    row = json.loads(lines[0]) | {"file": "images"}
    rewrite(0, json.dumps(row))
    assert _error(config) == f"{path}:1: image {tmp_path / 'images'} is a folder, not an image file"
    row = json.loads(lines[0]) | {"file": "images/missing.png"}
    rewrite(0, json.dumps(row))
    assert "images/missing.png not found" in _error(config) and _error(config).startswith(f"{path}:1:")
    config.data.corpus.train = str(tmp_path / "absent.jsonl")
    assert _error(config) == f"{tmp_path / 'absent.jsonl'}: corpus file not found"
    (tmp_path / "list.txt").write_text("x")
    config.data.corpus.train = str(tmp_path / "list.txt")
    assert "must end in .csv, .jsonl or .json" in _error(config)



def test_rows_are_numbered_by_line_or_position_and_each_format_refuses_what_is_no_row(tmp_path):
    path = write_corpus(tmp_path, 3)
    config = corpus_config(path)
    lines = path.read_text().splitlines()
    # A blank line in JSON lines is no row, but counts as a line; a line holding an array is no row object.
    path.write_text("\n".join([lines[0], "", "  ", lines[1], lines[2]]) + "\n")
    assert len(corpus.read_split(config, "train")["paths"]) == 3
    path.write_text("\n".join([lines[0], "", '["images/1.png"]', lines[2]]) + "\n")
    assert _error(config) == f"{path}:3: not a JSON object"
    row = json.loads(lines[2]) | {"file": " "}
    path.write_text("\n".join([lines[0], "", lines[1], json.dumps(row)]) + "\n")
    assert _error(config) == f"{path}:4: empty image field 'file'"
    # A .json list: rows numbered by position from 1; anything but a list of objects is refused.
    whole = tmp_path / "rows.json"
    config.data.corpus.update(dict(train=str(whole), split_field="", text_fields=("report",)))
    whole.write_text(json.dumps([{"file": "images/0.png", "report": "a"}, {"file": "images/1.png", "report": ""}]))
    assert _error(config) == f"{whole}:2: empty report (fields report)"
    for text in ('{"file": "images/0.png", "report": "a"}', '[{"file": "images/0.png", "report": "a"}, 3]'):
        whole.write_text(text)
        assert _error(config) == f"{whole}: a .json corpus must hold a list of objects"
    # The suffix in capitals (a spreadsheet's export) is the same format.
    upper = tmp_path / "ROWS.CSV"
    upper.write_text("file,report\nimages/2.png,b\n")
    config.data.corpus.train = str(upper)
    assert corpus.read_split(config, "train")["reports"] == ["b"]


def test_corpus_files_below_home_and_below_data_root(tmp_path, monkeypatch):
    write_corpus(tmp_path, 3)
    monkeypatch.setenv("HOME", str(tmp_path))
    config = corpus_config(pathlib.Path("~/corpus.jsonl"))
    assert corpus.read_split(config, "train")["paths"][0] == str(tmp_path / "images" / "0.png")
    config.data.corpus.train, config.data.root = "corpus.jsonl", str(tmp_path)
    config.data.corpus.val = "val.jsonl"
    with pytest.raises(DataError) as raised:
        corpus.check_files(config)
    assert str(raised.value) == (f"{tmp_path / 'val.jsonl'}: corpus file not found (config.data.corpus.val; "
                                 "below config.data.root)")


def test_a_field_both_zero_shot_and_probed_is_read_once_per_row(generated):
    config = corpus_config(generated, **{"eval.zero_shot": {"meta/modality": {"CT": "a CT image", "MR": "an MR image"}},
                                         "eval.probe_fields": ("meta/modality", "findings")})
    assert corpus.labels_read(config) == ["meta/modality", "findings"]
    labels = corpus.read_split(config, "val")["labels"]
    # Val rows 2, 6, 10, ...: every third image is MR (6 and 18 here).
    assert labels["meta/modality"] == ["CT", "MR", "CT", "CT", "MR", "CT"]
    assert labels["findings"] == [SAMPLE_REPORTS[i % len(SAMPLE_REPORTS)] for i in range(2, 24, 4)]


def _csv(tmp_path, text: bytes) -> tuple[pathlib.Path, object]:
    """tmp_path/train.csv holding ``text`` (rows of file, report; images/0..3.png exist) and its config."""
    write_corpus(tmp_path, 4)
    path = tmp_path / "train.csv"
    path.write_bytes(text)
    config = corpus_config(path)
    config.data.corpus.update(dict(split_field="", text_fields=("report",)))
    return path, config


def test_text_that_is_not_utf8_is_an_error_naming_the_row(tmp_path):
    path, config = _csv(tmp_path, "file,report\nimages/0.png,a\nimages/1.png,café au lait\n".encode("latin-1"))
    assert _error(config) == f"{path}:3: not UTF-8 text (byte 0xe9 after 'images/1.png,caf'); save it as UTF-8"
    path.write_text("file,report\nimages/0.png,a\n", encoding="utf-16")
    assert _error(config) == f"{path}:1: not UTF-8 text (byte 0xff after ''); save it as UTF-8"
    jsonl = write_corpus(tmp_path, 4)
    lines = jsonl.read_bytes().splitlines(keepends=True)
    jsonl.write_bytes(b"".join([*lines[:1], lines[1].replace(b'"findings": "', b'"findings": "Caf\xe9 '), *lines[2:]]))
    assert re.fullmatch(rf"{re.escape(str(jsonl))}:2: not UTF-8 text \(byte 0xe9 after '.*Caf'\); save it as UTF-8",
                        _error(corpus_config(jsonl)))
    whole = tmp_path / "rows.json"
    whole.write_bytes(b'[{"file": "images/0.png", "report": "caf\xe9"}]')
    config.data.corpus.train = str(whole)
    assert _error(config) == f"{whole}: not UTF-8 text (byte 0xe9 at offset 40); save it as UTF-8"


def test_split_values_must_be_the_configured_names_and_the_train_file_must_hold_training_rows(tmp_path):
    path = write_corpus(tmp_path, 6, splits=("train", "val", "test"))
    config = corpus_config(path)
    lines = path.read_text().splitlines()
    for value in ("validation", "Train", ""):
        row = json.loads(lines[4])
        row["meta"]["split"] = value
        path.write_text("\n".join(lines[:4] + [json.dumps(row)] + lines[5:]) + "\n")
        for split in ("train", "val"):
            assert _error(config, split) == (f"{path}:5: meta.split '{value}' is none of data.corpus.split_names "
                                             "(train, val, test)")
    write_corpus(tmp_path, 4, splits=("val", "test"))
    assert _error(config) == f"{path}: no training rows (meta.split 'train'); split values found: 2 'val', 2 'test'"
    assert len(corpus.read_split(config, "val")["paths"]) == 2


def test_csv_rows_with_fewer_or_more_fields_than_the_header(tmp_path):
    path, config = _csv(tmp_path, b"file,report,note\nimages/0.png,a,x\nimages/1.png,b\n")
    assert _error(config) == f"{path}:3: 2 fields, the header has 3"
    path.write_bytes(b"file,report\nimages/0.png,a\n\nimages/1.png,b, c\n")  # The blank line is no row, but a line.
    assert _error(config) == f"{path}:4: 3 fields, the header has 2"
    path.write_bytes(b'file,report\nimages/0.png,a\nimages/1.png,"b, c"\n')
    assert corpus.read_split(config, "train")["reports"] == ["a", "b, c"]


def test_a_quote_left_open_is_an_error_naming_the_file_not_a_traceback(tmp_path):
    rows = "".join(f"images/{i}.png,report {i}\n" for i in range(1, 12_000))
    path, config = _csv(tmp_path, f'file,report\nimages/0.png,"a\n{rows}'.encode())
    # The reader gives up on line 4,763, where the open field passes csv's size limit of 131,072 characters.
    assert _error(config) == (f"{path}:2: not a valid CSV record: field larger than field limit (131072) "
                              "(a quote left open?)")


def test_a_repeated_image_and_report_in_a_split_is_an_error_naming_both_rows(tmp_path):
    path, config = _csv(tmp_path, b"file,report\nimages/0.png,a\nimages/1.png,a\nimages/0.png,b\nimages/0.png,a\n")
    assert _error(config) == f"{path}:5: the same image and report as row 2"
    path.write_bytes(b"file,report\nimages/0.png,a\nimages/1.png,a\nimages/0.png,b\n")
    assert len(corpus.read_split(config, "train")["paths"]) == 3  # The same report or the same image is no repeat.
    jsonl = write_corpus(tmp_path, 2, splits=("train", "val"))
    lines = jsonl.read_text().splitlines()
    row = json.loads(lines[0])
    row["meta"]["split"] = "val"
    jsonl.write_text("\n".join([*lines, json.dumps(row)]) + "\n")  # Row 1 again, in another split.
    assert [len(corpus.read_split(corpus_config(jsonl), split)["paths"]) for split in ("train", "val")] == [1, 2]


def test_a_jsonl_report_field_must_be_a_string(tmp_path):
    path = write_corpus(tmp_path, 3)
    config = corpus_config(path)
    lines = path.read_text().splitlines()
    for value, kind in ((["a", "b"], "array"), (12, "number"), ({"a": "b"}, "object"), (True, "boolean")):
        path.write_text("\n".join([lines[0], json.dumps(json.loads(lines[1]) | {"impression": value}), lines[2]]))
        assert _error(config) == f"{path}:2: report field 'impression' is a JSON {kind}, not a string"
    path.write_text("\n".join([lines[0], json.dumps(json.loads(lines[1]) | {"impression": None}), lines[2]]))
    assert corpus.read_split(config, "train")["reports"][1] == SAMPLE_REPORTS[1]  # null: no text.
    # The image field likewise: an array's or a boolean's text was looked for as a file ("['a.png'] not found").
    for value, kind in ((["images/1.png"], "array"), ({"path": "images/1.png"}, "object"), (True, "boolean")):
        path.write_text("\n".join([lines[0], json.dumps(json.loads(lines[1]) | {"file": value}), lines[2]]))
        assert _error(config) == f"{path}:2: image field 'file' is a JSON {kind}, not a path or a stem"
    config.data.corpus.image_path = "images/{}.png"  # A number is a stem.
    path.write_text("\n".join(json.dumps(json.loads(line) | {"file": i}) for i, line in enumerate(lines)))
    assert corpus.read_split(config, "train")["paths"][1] == str(tmp_path / "images" / "1.png")


def test_a_repeated_csv_column_and_rows_spanning_lines_are_named_by_their_first_line(tmp_path):
    path, config = _csv(tmp_path, b"file,report,report\nimages/0.png,a,b\n")
    assert _error(config) == f"{path}:1: column 'report' appears more than once in the header"
    path.write_bytes(b"file,report,,\nimages/0.png,a,,\n")  # Unnamed columns of a spreadsheet export: no repeat.
    assert corpus.read_split(config, "train")["reports"] == ["a"]
    path.write_bytes(b'file,report\nimages/0.png,"three\nline\nreport"\nimages/1.png,b\nimages/9.png,c\n')
    assert _error(config).startswith(f"{path}:6: image ")  # The third row starts on line 6, not 4.
    path.write_bytes(b'file,report\nimages/0.png,"two\nlines"\nimages/1.png,b\n')
    assert corpus.read_split(config, "train")["reports"] == ["two\nlines", "b"]


def test_a_byte_order_mark_is_read_in_every_format(tmp_path):
    jsonl = write_corpus(tmp_path, 3)
    jsonl.write_bytes(b"\xef\xbb\xbf" + jsonl.read_bytes())
    config = corpus_config(jsonl)
    assert len(corpus.read_split(config, "train")["paths"]) == 3
    whole = tmp_path / "rows.json"
    whole.write_bytes(b'\xef\xbb\xbf[{"file": "images/0.png", "report": "a"}]')
    config.data.corpus.update(dict(train=str(whole), split_field="", text_fields=("report",)))
    assert corpus.read_split(config, "train")["reports"] == ["a"]
    path, config = _csv(tmp_path, b"\xef\xbb\xbffile,report\nimages/0.png,a\n")
    assert corpus.read_split(config, "train")["reports"] == ["a"]


def test_label_fields_take_strings_and_numbers_and_an_empty_label_is_none(tmp_path):
    path = write_corpus(tmp_path, 3)
    config = corpus_config(path)
    config.eval.probe_fields = ("meta.modality",)
    lines = path.read_text().splitlines()

    def with_modality(value):
        row = json.loads(lines[1])
        row["meta"]["modality"] = value
        path.write_text("\n".join([lines[0], json.dumps(row), lines[2]]) + "\n")

    for value, kind in ((["CT"], "array"), ({"a": 1}, "object"), (True, "boolean")):
        with_modality(value)
        assert _error(config) == f"{path}:2: label field 'meta.modality' is a JSON {kind}, not a string or number"
    with_modality("nan")  # pandas' text for an empty cell: no class 'nan'
    assert _error(config) == (f"{path}:2: label field 'meta.modality' is 'nan' (an empty cell written as text?); "
                              "leave it empty")
    for value, read in ((3, "3"), (None, ""), ("  ", "")):
        with_modality(value)
        assert corpus.read_split(config, "train")["labels"]["meta.modality"] == ["MR", read, "CT"]


def _no_decoding(monkeypatch):
    def decode_all(*args, **kwargs):
        raise AssertionError("an image was decoded before the missing file was noticed")

    monkeypatch.setattr(corpus, "decode_all", decode_all)


def test_a_missing_split_file_stops_pretraining_before_any_image_is_decoded(generated, tmp_path, monkeypatch):
    from amvlm_jax import main

    _no_decoding(monkeypatch)
    config = corpus_config(generated, **{"data.corpus.test": str(tmp_path / "tset.jsonl")})
    with pytest.raises(DataError) as raised:
        main.run(config, tmp_path / "run")
    assert not config.data.root
    assert str(raised.value) == f"{tmp_path / 'tset.jsonl'}: corpus file not found (config.data.corpus.test; " \
        "config.data.root is not set)"
    config.data.corpus.test = str(tmp_path)  # The dataset's folder, not its file: not 'not found'.
    with pytest.raises(DataError) as raised:
        main.run(config, tmp_path / "run")
    assert str(raised.value) == f"{tmp_path}: a folder, not a corpus file (.csv, .jsonl or .json) " \
        "(config.data.corpus.test; config.data.root is not set)"


def test_mode_all_on_a_corpus_without_lvit_folders_stops_before_pretraining(generated, tmp_path, monkeypatch):
    from amvlm_jax import main
    from amvlm_jax.train import pretrain

    monkeypatch.setattr(pretrain, "train", lambda *args: pytest.fail("pre-trained before the check"))
    for root, problem in (("", "data.root is not set"), (generated.parent, f"{generated.parent}: no Train_Folder")):
        config = corpus_config(generated, mode="all", **{"data.root": str(root), "data.labeled_fraction": 0.5})
        with pytest.raises(DataError) as raised:
            main.run(config, tmp_path / "run")
        assert str(raised.value).startswith("config.mode='all' segments after pre-training, on the LViT folders of "
                                            f"data.root: {problem}")


def test_missing_images_are_skipped_and_counted_only_when_asked(tmp_path):
    path = write_corpus(tmp_path, 8)
    (tmp_path / "images" / "3.png").unlink()
    (tmp_path / "images" / "5.png").unlink()
    config = corpus_config(path)
    assert "3.png not found" in _error(config)
    config.data.corpus.missing_images = "skip"
    rows = corpus.read_split(config, "train")
    assert rows["skipped"] == 2 and len(rows["paths"]) == 6
    split, _, line = corpus.load(config, "train", 32)
    assert "2 row(s) skipped: image missing" in line
    assert split.names == ["0", "1", "2", "4", "6", "7"]  # Image file stems, as tools' --image takes them.
    # A split whose every row's image is missing: no rows, said with the count, not an empty split.
    path = write_corpus(tmp_path, 4, splits=("train", "val"))
    (tmp_path / "images" / "1.png").unlink()
    (tmp_path / "images" / "3.png").unlink()
    for split in ("val", "train"):
        config.data.corpus.split_field = "meta.split" if split == "val" else ""
        if split == "train":
            path.write_text("".join(line for i, line in enumerate(path.read_text().splitlines(True)) if i % 2))
        assert _error(config, split) == f"{path}: no rows (2 skipped: image missing)"


def test_streamed_images_equal_decoded_ones_and_the_size_decides(generated):
    config = corpus_config(generated)
    in_memory, _, how = corpus.load(config, "train", 32)
    assert isinstance(in_memory.images, np.ndarray) and "in memory" in how
    config.data.corpus.in_memory_bytes = 12 * 32 * 32 * 3 - 1  # One byte short of the 12 images.
    streamed, _, how = corpus.load(config, "train", 32)
    assert isinstance(streamed.images, corpus.CorpusImages) and "streamed from disk" in how
    config.data.corpus.in_memory_bytes += 1  # Exactly the 12 images' bytes: they are decoded into memory.
    assert isinstance(corpus.load(config, "train", 32)[0].images, np.ndarray)
    np.testing.assert_array_equal(streamed.images[np.arange(12)], in_memory.images)
    assert streamed.images.shape == in_memory.images.shape == (12, 32, 32, 3)
    # Either way row k pairs file row k's image (its stem the name) with its report: rows 0, 1, 4, 5, ... train.
    for split in (in_memory, streamed):
        assert split.names == [str(i) for i in range(24) if i % 4 < 2]
        assert all(report.endswith(f" image {name}.") for name, report in zip(split.names, split.reports, strict=True))
    np.testing.assert_array_equal(streamed.images[5], folders.load_image(pathlib.Path(os.fsdecode(streamed.images.paths[5])), 32)[0])
    # The training stream reads the same examples either way, also from worker processes.
    batches = lambda split, workers: [b for _, b in zip(range(4), pipeline.training_batches(  # noqa: E731
        split, 8, seed=3, with_mask=False, augmentation="none", worker_count=workers))]
    for a, b in zip(batches(in_memory, 0), batches(streamed, 1)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["index"], b["index"])


def test_processes_read_each_example_of_an_epoch_once(generated):
    config = corpus_config(generated, **{"data.corpus.in_memory_bytes": 0})
    split = corpus.load(config, "train", 32)[0]
    read = []
    for process in range(2):
        stream = pipeline.training_batches(split, 4, seed=0, with_mask=False, augmentation="none",
                                           process_index=process, process_count=2)
        read += [i for _, batch in zip(range(len(split) // 4), stream) for i in batch["index"]]
    assert sorted(read) == list(range(len(split)))


def test_zero_shot_accuracy_by_hand():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
    prompts = np.array([[1.0, 0.0], [0.0, 1.0]])
    # Rows 0, 1: right; row 2 is nearer prompt B but labelled A; row 3's class has no prompt.
    scores = metrics.zero_shot_accuracy(images, prompts, ["A", "B", "A", "C"], ["A", "B"])
    assert scores == {"accuracy": pytest.approx(2 / 3), "majority": pytest.approx(2 / 3), "rows": 3}
    # No row of a prompted class (unlabelled, or of other classes): nothing scored, not an error.
    scores = metrics.zero_shot_accuracy(images[:2], prompts, ["", "C"], ["A", "B"])
    assert np.isnan(scores["accuracy"]) and np.isnan(scores["majority"]) and scores["rows"] == 0


def test_linear_probe_matches_an_independent_solver():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * np.array([1, 2, 3, 1, 1, 5]) + 4
    labels = np.array(["a", "b", "c"])[np.argmax(x[:, :3] @ rng.normal(size=(3, 3)) + rng.normal(size=(300, 3)), 1)]
    ours = metrics.linear_probe_accuracy(x[:200], labels[:200], {"test": (x[200:], labels[200:])}, steps=300,
                                         l2=1e-3)["test"]
    # The same objective (standardised features, mean cross-entropy + l2 |W|^2) by scipy's L-BFGS-B.
    mean, std = x[:200].mean(0), x[:200].std(0) + 1e-6
    z, y = (x[:200] - mean) / std, np.searchsorted(["a", "b", "c"], labels[:200])

    def objective(theta):
        w, b = theta[:18].reshape(6, 3), theta[18:]
        logits = z @ w + b
        log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
        return -log_p[np.arange(200), y].mean() + 1e-3 * np.sum(w ** 2)

    theta = optimize.minimize(objective, np.zeros(21), method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-10}).x
    predicted = np.array(["a", "b", "c"])[np.argmax(((x[200:] - mean) / std) @ theta[:18].reshape(6, 3) + theta[18:], 1)]
    assert ours["accuracy"] == pytest.approx(np.mean(predicted == labels[200:]))
    assert ours["accuracy"] > 0.8 and ours["rows"] == 100
    counts = np.unique(labels[200:], return_counts=True)[1]
    assert ours["majority"] == pytest.approx(counts.max() / 100)
    # Rows without a label ('') are neither fitted nor scored: the same probe as without those rows.
    unlabelled = labels.copy()
    unlabelled[::7] = ""
    kept = unlabelled != ""
    with_gaps = metrics.linear_probe_accuracy(x[:200], unlabelled[:200], {"test": (x[200:], unlabelled[200:])},
                                              steps=300)["test"]
    without = metrics.linear_probe_accuracy(x[:200][kept[:200]], labels[:200][kept[:200]],
                                            {"test": (x[200:][kept[200:]], labels[200:][kept[200:]])}, steps=300)["test"]
    assert with_gaps == pytest.approx(without) and with_gaps["rows"] == kept[200:].sum() < 100


def test_linear_probe_standardises_with_the_training_rows_deviation():
    """The class shows only in a feature of scale 1e-5, beside a noise feature of scale 1e3. Standardised, the
    feature separates the classes at a small weight; on the raw scale it needs a weight of order 1e5, whose l2 cost
    (1e-3 |w|^2, about 1e7) is far above what it saves, so the probe would guess. The deviation's guard against
    zero (1e-6) stays well below the feature's: one of 1e-2 would shrink it to the same effect."""
    rng = np.random.default_rng(3)
    signal = rng.choice([-1.0, 1.0], size=120) * rng.uniform(1.0, 2.0, size=120)
    x = np.stack([signal * 1e-5, rng.normal(size=120) * 1e3], axis=1)
    labels = np.where(signal > 0, "b", "a")
    scores = metrics.linear_probe_accuracy(x[:80], labels[:80], {"test": (x[80:], labels[80:])}, steps=100)["test"]
    assert scores["accuracy"] == 1.0 and scores["rows"] == 40


def test_a_probe_of_a_field_with_one_training_class_scores_no_rows():
    x = np.random.default_rng(0).normal(size=(12, 4))
    scores = metrics.linear_probe_accuracy(x[:8], ["CT"] * 8, {"val": (x[8:], ["CT", "CT", "MR", ""])})["val"]
    assert np.isnan(scores["accuracy"]) and scores["rows"] == 0
    # Two training classes: a held-out row of a third class (PET) is not scored, as no class could be right.
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    scores = metrics.linear_probe_accuracy(x, ["CT", "CT", "MR", "MR"], {"val": (-x[:3], ["MR", "CT", "PET"])})["val"]
    assert scores == {"accuracy": 0.5, "majority": 0.5, "rows": 2}


def test_rows_of_a_class_without_a_prompt_are_named_not_dropped_silently():
    from amvlm_jax.train.pretrain import unprompted_rows

    values = ["Head", "Thorax", "Abdomen", "", "Abdomen", "Spine"]
    assert unprompted_rows("loc", ["Head", "Thorax"], values, "val") == (
        "val: zero-shot 'loc' scores 2 of its 5 labelled rows: no prompt in config.eval.zero_shot['loc'] for "
        "'Abdomen' (2), 'Spine' (1)")
    assert unprompted_rows("loc", ["Head", "Thorax", "Abdomen", "Spine"], values, "val") is None


def test_prompts_for_values_the_field_never_takes_and_too_many_tokens_stop_before_training(generated, tmp_path):
    from amvlm_jax import main
    from amvlm_jax.config import ConfigError

    prompts = {"meta/modality": {"ct": "a CT image", "mr": "an MR image"}}
    with pytest.raises(ConfigError) as raised:
        main.run(corpus_config(generated, **{"eval.zero_shot": prompts}), tmp_path / "prompts")
    assert str(raised.value) == ("config.eval.zero_shot['meta/modality']: none of its classes (ct, mr) is a value of "
                                 "'meta/modality' in val (values: CT, MR)")
    with pytest.raises(ConfigError) as raised:
        main.run(corpus_config(generated, **{"pretrain.max_length": 513}), tmp_path / "tokens")
    assert str(raised.value) == "config.pretrain.max_length=513: the text encoder has 512 positions (max_position_embeddings)"


def test_pretraining_streams_a_corpus_as_it_reads_one_in_memory_and_scores_what_it_learned(generated, tmp_path,
                                                                                           monkeypatch):
    from amvlm_jax import main

    settings = {"pretrain.epochs": 1, "eval.probe_fields": ("meta.modality",), "eval.probe_steps": 20,
                "eval.zero_shot": {"meta/modality": {"CT": "a CT image", "MR": "an MR image"}}}
    in_memory = main.run(corpus_config(generated, **settings), tmp_path / "memory")
    streamed = main.run(corpus_config(generated, **settings, **{"data.corpus.in_memory_bytes": 0}), tmp_path / "disk")
    assert streamed["final_terms"] == in_memory["final_terms"]
    assert streamed["final_retrieval"] == in_memory["final_retrieval"]
    assert in_memory["pairs"] == {"train": 12, "val": 6, "test": 6}
    # 12 pairs at batch 8: an epoch is 2 steps (the second batch partly from the next shuffle), so its
    # evaluation's ranks are step 2's.
    assert sorted(p.name for p in (tmp_path / "memory" / "pretrain" / "ranks").iterdir()) == ["step_0.json",
                                                                                             "step_2.json"]
    scores = in_memory["final_retrieval"]
    for split in ("val", "test"):
        for key in ("zero_shot/meta/modality/accuracy", "probe/meta.modality/accuracy", "i2t_top1"):
            assert 0.0 <= scores[f"{split}/{key}"] <= 1.0
        # Rows 2, 6, 10, ... (val) and 3, 7, 11, ... (test): every third image is MR.
        assert scores[f"{split}/zero_shot/meta/modality/rows"] == 6
    assert "train/zero_shot/meta/modality/accuracy" not in scores  # Held-out splits only.
    # A held-out split left out of eval.splits (settings chosen on val) is neither read nor scored; training and
    # the other scores are unchanged.
    val_only = main.run(corpus_config(generated, **settings, **{"eval.splits": ("val",)}), tmp_path / "val_only")
    assert val_only["pairs"] == {"train": 12, "val": 6} and val_only["final_terms"] == in_memory["final_terms"]
    for summary in ("initial_retrieval", "final_retrieval"):
        assert val_only[summary] == {k: v for k, v in in_memory[summary].items() if not k.startswith("test/")}
    # Evaluating the checkpoint scores the same, from its recorded config (no repeated corpus flags).
    config = corpus_config(generated, **settings, **{"mode": "evaluate", "eval.splits": ("val", "test")})
    config.eval.checkpoint = str(tmp_path / "memory" / "pretrain")
    config.data.corpus.train = ""
    results = main.run(config, tmp_path / "evaluation")
    for split in ("val", "test"):
        # Every score the run gave the split (its probes, fitted on train, included), and the split's size.
        assert results[split].keys() == {k.split("/", 1)[1] for k in scores if k.startswith(f"{split}/")} | {"pairs"}
        assert results[split]["pairs"] == 6
        for key, value in results[split].items():
            if key != "pairs":
                assert value == pytest.approx(scores[f"{split}/{key}"], abs=1e-6), key
    # Neither prompts nor probe fields on the command (only the checkpoint named): the labels the run scored,
    # not retrieval alone.
    unlabelled = corpus_config(generated, **{"mode": "evaluate", "eval.splits": ("val", "test"),
                                             "eval.checkpoint": str(tmp_path / "memory" / "pretrain")})
    assert not unlabelled.eval.zero_shot and not unlabelled.eval.probe_fields
    assert main.run(unlabelled, tmp_path / "evaluation_unlabelled") == results
    # In the pre-training run's own workdir with no checkpoint named: its pre-training checkpoint, and the run's
    # record of how it was trained stays (the evaluation's goes beside it).
    trained_record = (tmp_path / "memory" / "config.json").read_text()
    in_place = corpus_config(generated, **{"mode": "evaluate", "eval.splits": ("val", "test")})
    assert main.run(in_place, tmp_path / "memory") == results
    assert in_place.eval.checkpoint == ""  # The caller's config is left as given.
    assert (tmp_path / "memory" / "config.json").read_text() == trained_record
    assert json.loads((tmp_path / "memory" / "config_evaluate.json").read_text())["mode"] == "evaluate"
    assert json.loads((tmp_path / "evaluation" / "config.json").read_text())["mode"] == "evaluate"
    # The uncertainty analysis with the embedded default's (synthetic) data fields reads the run's corpus pairs,
    # not synthetic data generated into its workdir.
    uncertainty = repo_module("tools/uncertainty.py").analyse(tiny_synthetic_config(), tmp_path / "memory", "val", "",
                                                              "", count=2)
    assert uncertainty["image"] == corpus.load(corpus_config(generated), "val", 32)[0].names[0]
    assert not (tmp_path / "memory" / "data").exists()
    from amvlm_jax.config import ConfigError
    with pytest.raises(ConfigError, match=f"^--image=nope: not an image of the val split of {re.escape(str(generated))}$"):
        repo_module("tools/uncertainty.py").analyse(tiny_synthetic_config(), tmp_path / "memory", "val", "nope", "", count=2)
    with pytest.raises(ConfigError, match=r"pretrain: trained on a corpus .*, which holds no masks to score text masks"):
        repo_module("tools/text_masks.py").run_config(tiny_synthetic_config(), tmp_path / "memory", "")
    lvit = repo_module("tools/text_masks.py").run_config(tiny_synthetic_config(**{"data.root": str(tmp_path / "lvit")}),
                                                         tmp_path / "memory", "")
    assert lvit.data.root == str(tmp_path / "lvit") and not corpus.is_configured(lvit)
    # eval.initial: the encoders as the run started them, so its epoch-0 scores, from its recorded seed
    # whatever the command's; the pre-trained ones score otherwise.
    config.eval.initial, config.seed = True, config.seed + 1
    initial = main.run(config, tmp_path / "initial")
    for split in ("val", "test"):
        for key, value in initial[split].items():
            if key != "pairs":
                assert value == pytest.approx(in_memory["initial_retrieval"][f"{split}/{key}"], abs=1e-6), key
    assert initial != results
    config.eval.initial = False
    # The recorded corpus file gone: one line, before the encoders are restored or any image decoded.
    _no_decoding(monkeypatch)
    monkeypatch.setattr(checkpoint, "restore_variables", lambda *args, **kwargs: pytest.fail("restored before the check"))
    moved = generated.rename(generated.with_suffix(".moved"))
    try:
        with pytest.raises(DataError) as raised:
            main.run(config, tmp_path / "evaluation2")
    finally:
        moved.rename(generated)
    assert str(raised.value) == f"{generated}: corpus file not found (config.data.corpus.train; config.data.root is not set)"


def test_data_workers_exit_when_their_run_is_killed(tmp_path):
    """A run killed with SIGKILL cannot stop its worker processes: they stop themselves (they kept running,
    holding the killed run's output pipe open)."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "run.py"
    script.write_text(
        "import os, signal, time, numpy as np\n"
        "from amvlm_jax.data import pipeline\n"
        "from amvlm_jax.data.folders import SplitArrays\n"
        "if __name__ == '__main__':  # The workers are spawned: they import this file.\n"
        "    split = SplitArrays([str(i) for i in range(16)], np.zeros((16, 8, 8, 3), np.uint8), None, [''] * 16)\n"
        "    batches = pipeline.training_batches(split, 4, seed=0, with_mask=False, augmentation='none', worker_count=2)\n"
        "    next(batches), next(batches)\n"
        "    me, children = str(os.getpid()), []\n"
        "    for _ in range(100):  # Both workers and the resource tracker.\n"
        "        children = [p for p in os.listdir('/proc') if p.isdigit() and\n"
        "                    open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1] == me]\n"
        "        if len(children) >= 3:\n"
        "            break\n"
        "        time.sleep(0.1)\n"
        "    print(' '.join(children), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=str(pathlib.Path(__file__).resolve().parent.parent))
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    children = [int(p) for p in done.stdout.split()]
    assert len(children) == 3  # The two workers and multiprocessing's resource tracker.
    deadline = time.time() + 30
    while time.time() < deadline and any(pathlib.Path(f"/proc/{p}").exists() for p in children):
        time.sleep(0.5)
    alive = [p for p in children if pathlib.Path(f"/proc/{p}").exists()]
    for p in alive:  # Do not leave them behind when the test fails.
        os.kill(p, signal.SIGKILL)
    assert not alive
