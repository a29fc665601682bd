"""Mode 'predict': masks of new images at their own size, the table, skipping, failures and errors."""

import csv
import pathlib

import numpy as np
import pytest
from PIL import Image

from amvlm_jax import main
from amvlm_jax.config import ConfigError
from amvlm_jax.data import folders

from conftest import tiny_synthetic_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny supervised run (its best checkpoint and per-image validation Dice)."""
    workdir = tmp_path_factory.mktemp("trained")
    config = tiny_synthetic_config(**{"train.epochs": 2, "eval.splits": ("val",)})
    main.run(config, workdir)
    return workdir


def _predict(workdir, input_dir, output_dir, run_dir=None, **fields):
    # Only the checkpoint and the folders: the model's fields come from the checkpoint's recorded config.
    config = tiny_synthetic_config(**{"mode": "predict", "unet.base_width": 8, "eval.checkpoint": str(workdir),
                                      "predict.input": str(input_dir), "predict.output": str(output_dir), **fields})
    return main.run(config, run_dir or pathlib.Path(str(output_dir) + "_workdir"))


def test_predicted_validation_masks_score_what_evaluate_reports(trained, tmp_path):
    val_folder = trained / "data" / "Val_Folder"
    summary = _predict(trained, val_folder, tmp_path / "out")
    assert summary["images"] == summary["written"] == 8 and summary["failed"] == summary["skipped"] == 0
    expected = {row["file"]: float(row["dice"]) for row in csv.DictReader(open(trained / "per_image_val.csv"))}
    for example in folders.list_split_folder(val_folder):
        predicted = np.asarray(Image.open(tmp_path / "out" / f"{example.name}.png"))
        assert set(np.unique(predicted)) <= {0, 255}
        truth = np.asarray(Image.open(example.mask_path)) > 0
        overlap, total = 2.0 * np.sum((predicted > 0) & truth), np.sum(predicted > 0) + np.sum(truth)
        dice = 100.0 * (overlap / total if total else 1.0)
        assert dice == pytest.approx(expected[example.name], abs=1e-3), example.name
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert len(rows) == 8 and all(0.0 <= float(r["foreground_fraction"]) <= 1.0 for r in rows)
    assert all(int(r["class_0_pixels"]) + int(r["class_1_pixels"]) == 64 * 64 for r in rows)
    # In batches of 3 (the next batch read and the last one's files written while one is segmented; the last
    # batch partial): the same files.
    _predict(trained, val_folder, tmp_path / "batched", **{"train.eval_batch_size": 3})
    for path in sorted((tmp_path / "out").iterdir()):
        assert (tmp_path / "batched" / path.name).read_bytes() == path.read_bytes(), path.name


def test_outputs_keep_each_images_size_and_name_skip_existing_and_count_failures(trained, tmp_path):
    source = trained / "data" / "Val_Folder" / "img"
    first, second = sorted(source.iterdir())[:2]
    inputs = tmp_path / "scans"
    (inputs / "nested").mkdir(parents=True)
    rgb = Image.open(first).convert("RGB")
    cases = {
        "wide.png": rgb.resize((90, 50)),
        "tall.jpg": rgb.resize((40, 72)),
        "gray.tif": Image.open(second).convert("L").resize((64, 64)),
        "nested/alpha.png": Image.open(second).convert("RGBA").resize((33, 47)),
        "nested/deep16.tiff": Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 200)),
    }
    for name, image in cases.items():
        image.save(inputs / name)
    (inputs / "broken.png").write_bytes(b"not a png")

    summary = _predict(trained, inputs, tmp_path / "masks", **{"predict.probabilities": "png16",
                                                                 "predict.overlays": True})
    assert summary == {"images": 6, "written": 5, "skipped": 0, "failed": 1, "csv": str(tmp_path / "masks" / "predictions.csv")}
    for name, image in cases.items():
        stem = pathlib.Path(name).with_suffix("")
        mask = Image.open(tmp_path / "masks" / stem.with_suffix(".png"))
        assert mask.size == image.size and mask.mode == "L", name
        probability = Image.open(tmp_path / "masks" / stem.parent / f"{stem.name}_probability.png")
        assert probability.size == image.size and np.asarray(probability).dtype in (np.uint16, np.int32)
        # The mask is the probability map thresholded at 0.5.
        np.testing.assert_array_equal(np.asarray(mask) > 0, np.asarray(probability) > 32767.5)
        assert Image.open(tmp_path / "masks" / stem.parent / f"{stem.name}_overlay.png").size == image.size
    assert not (tmp_path / "masks" / "broken.png").exists()
    rows = {r["file"]: r for r in csv.DictReader(open(tmp_path / "masks" / "predictions.csv"))}
    assert len(rows) == 5 and str(inputs / "nested" / "alpha.png") in rows
    assert rows[str(inputs / "wide.png")]["width"] == "90" and rows[str(inputs / "wide.png")]["height"] == "50"

    table = (tmp_path / "masks" / "predictions.csv").read_text()  # Counted from the masks as they were written.

    # Again: every mask exists, so nothing is redone (the broken file is tried again and fails again).
    again = _predict(trained, inputs, tmp_path / "masks")
    assert (again["written"], again["skipped"], again["failed"]) == (0, 5, 1)
    assert (tmp_path / "masks" / "predictions.csv").read_text() == table  # Counted from the files read back.
    redone = _predict(trained, inputs, tmp_path / "masks", **{"predict.overwrite": True, "predict.probabilities": "npy"})
    assert (redone["written"], redone["skipped"], redone["failed"]) == (5, 0, 1)
    for name, image in cases.items():  # The same probabilities as float32 .npy, beside the first run's png16.
        stem = pathlib.Path(name).with_suffix("")
        probability = np.load(tmp_path / "masks" / stem.parent / f"{stem.name}_probability.npy")
        assert probability.dtype == np.float32 and probability.shape == image.size[::-1], name
        assert 0.0 <= probability.min() < probability.max() <= 1.0, name  # A map, not a constant.
        # png16 holds the probability scaled to 0..65535 and rounded.
        png16 = np.asarray(Image.open(tmp_path / "masks" / stem.parent / f"{stem.name}_probability.png"))
        scaled = probability.astype(np.float64) * 65535  # Rounded: within 1, and equal but where float32 sits at .5.
        assert np.abs(png16 - np.round(scaled)).max() <= 1 and np.mean(png16 != np.round(scaled)) < 0.01, name
        mask = np.asarray(Image.open(tmp_path / "masks" / stem.with_suffix(".png")))
        np.testing.assert_array_equal(mask > 0, probability > 0.5, err_msg=name)
    with pytest.raises(folders.DataError, match="broken.png: unreadable image"):
        _predict(trained, inputs, tmp_path / "stop", **{"predict.stop_on_error": True})
    # In batches of 2, [gray.tif, nested/alpha.png] are segmented before [nested/deep16.tiff, nested/zz.png]
    # fails: they keep their masks, the rest is not written.
    (inputs / "broken.png").rename(inputs / "nested" / "zz.png")
    with pytest.raises(folders.DataError, match="zz.png: unreadable image"):
        _predict(trained, inputs, tmp_path / "stop2", **{"predict.stop_on_error": True, "train.eval_batch_size": 2})
    assert sorted(p.relative_to(tmp_path / "stop2").as_posix() for p in (tmp_path / "stop2").rglob("*.png")) == [
        "gray.png", "nested/alpha.png"]


def test_predict_input_errors(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        _predict(trained, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConfigError, match="is not a folder"):
        _predict(trained, tmp_path / "missing", tmp_path / "out")
    source = trained / "data" / "Val_Folder"
    with pytest.raises(ConfigError, match="inside the input folder"):
        _predict(trained, source, source / "masks", run_dir=tmp_path / "run")
    assert not (source / "masks").exists()


def test_predict_output_and_reports_errors_name_the_field_before_the_model_loads(trained, tmp_path, monkeypatch):
    from amvlm_jax.train import supervised

    source = trained / "data" / "Val_Folder" / "img"
    first, second = sorted(source.iterdir())[:2]
    inputs = tmp_path / "scans"
    inputs.mkdir()
    for image in (first, second):
        (inputs / image.name).write_bytes(image.read_bytes())
    monkeypatch.setattr(supervised, "build_unet", lambda config: pytest.fail("the model was built"))
    file = tmp_path / "file"
    file.write_text("not a folder")
    for output in (file, file / "sub"):
        with pytest.raises(ConfigError) as error:
            _predict(trained, inputs, output, run_dir=tmp_path / "run")
        assert str(error.value) == f"config.predict.output: {file} is a file, not a folder"
    missing = tmp_path / "missing.csv"
    with pytest.raises(ConfigError) as error:
        _predict(trained, inputs, tmp_path / "out", **{"predict.reports": str(missing)})
    assert str(error.value) == f"config.predict.reports: {missing} not found"
    sheet = tmp_path / "reports.csv"
    sheet.write_text("Image,Description\nother.png,A report.\n")
    with pytest.raises(ConfigError) as error:
        _predict(trained, inputs, tmp_path / "out", **{"predict.reports": str(sheet)})
    assert str(error.value).startswith(f"config.predict.reports: {sheet} names none of the 2 images in {inputs}")


def test_predict_counts_images_without_a_report(trained, tmp_path, capsys):
    inputs = tmp_path / "scans"
    inputs.mkdir()
    for image in sorted((trained / "data" / "Val_Folder" / "img").iterdir())[:2]:
        (inputs / image.name).write_bytes(image.read_bytes())
    sheet = tmp_path / "reports.csv"
    sheet.write_text(f"Image,Description\n{image.name},A report.\n")
    summary = _predict(trained, inputs, tmp_path / "out", **{"predict.reports": str(sheet)})
    assert summary["written"] == 2
    assert f"0 failed, 1 without a report in {sheet}" in capsys.readouterr().out


def test_a_report_sheet_replaces_an_lvit_split_folders_own_reports(trained, tmp_path):
    from amvlm_jax.train import predict

    val_folder = trained / "data" / "Val_Folder"
    config = tiny_synthetic_config(**{"predict.input": str(val_folder)})
    own = predict.list_inputs(config)
    assert len(own) == 8 and all(report for _, _, report in own)
    sheet = tmp_path / "reports.csv"
    sheet.write_text(f"Image,Description\n{own[3][1].name},A report from the sheet.\n")
    config.predict.reports = str(sheet)
    given = predict.list_inputs(config)
    assert [(name, path) for name, path, _ in given] == [(name, path) for name, path, _ in own]
    assert [report for _, _, report in given] == [None] * 3 + ["A report from the sheet."] + [None] * 4


def test_inputs_that_would_overwrite_a_mask_or_segment_masks_are_refused(trained, tmp_path):
    from amvlm_jax.train import predict

    val_image = next((trained / "data" / "Val_Folder" / "img").iterdir())
    scans = tmp_path / "scans"
    (scans / "a").mkdir(parents=True)
    for name in ("x.png", "a/x.png", "a/x.jpg"):
        Image.open(val_image).save(scans / name)
    config = tiny_synthetic_config(**{"predict.input": str(scans)})
    with pytest.raises(ConfigError) as raised:
        predict.list_inputs(config)
    assert str(raised.value) == (f"config.predict.input: {scans / 'a' / 'x.jpg'} and {scans / 'a' / 'x.png'} would "
                                 f"both be segmented into {pathlib.Path('a') / 'x'}.png; rename one")
    (scans / "a" / "x.jpg").unlink()
    assert [str(name) for name, _, _ in predict.list_inputs(config)] == ["a/x", "x"]
    sheet = tmp_path / "reports.csv"
    sheet.write_text("Image,Description\nx.png,One.\nx.png,Two.\n")
    config.predict.reports = str(sheet)
    with pytest.raises(folders.DataError) as raised:
        predict.list_inputs(config)
    assert str(raised.value) == f"{sheet}: row 3 repeats image 'x.png' (row 2)"
    config = tiny_synthetic_config(**{"predict.input": str(trained / "data")})  # The data root, masks and all.
    with pytest.raises(ConfigError) as raised:
        predict.list_inputs(config)
    assert str(raised.value).startswith(f"config.predict.input: {trained / 'data'} holds LViT split folders (Test_Folder")


def test_inputs_skip_hidden_files_and_folders_and_take_upper_case_suffixes(tmp_path):
    from amvlm_jax.train import predict

    scans = tmp_path / "scans"
    (scans / ".ipynb_checkpoints").mkdir(parents=True)
    (scans / "sub").mkdir()
    image = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    for name in ("a.PNG", "sub/b.Jpg", ".hidden.png", ".ipynb_checkpoints/a-checkpoint.png"):
        image.save(scans / name, format="PNG")
    (scans / "notes.txt").write_text("not an image")
    config = tiny_synthetic_config(**{"predict.input": str(scans)})
    assert [(str(name), path.name) for name, path, _ in predict.list_inputs(config)] == [("a", "a.PNG"), ("sub/b", "b.Jpg")]

def test_fields_the_checkpoint_replaces_are_named(trained, capsys):
    config = tiny_synthetic_config(**{"mode": "predict", "unet.base_width": 8, "eval.checkpoint": str(trained),
                                      "pretrain.epochs": 7, "ssl.w_text": 0.5})
    restored, job = main.checkpoint_config(config, trained)
    assert job == "supervised" and restored.unet.base_width == 4
    # Replaced too, but not named: a U-Net checkpoint's model reads neither section.
    recorded = tiny_synthetic_config()
    assert (restored.pretrain.epochs, restored.ssl.w_text) == (recorded.pretrain.epochs, recorded.ssl.w_text) != (7, 0.5)
    assert capsys.readouterr().out == (f"{trained}: the checkpoint's recorded fields replace the command's: "
                                       "config.unet.base_width=8 -> 4\n")


def test_restoring_into_other_shapes_is_one_line_before_any_read(trained):
    from amvlm_jax.train import checkpoint, supervised

    config = tiny_synthetic_config(**{"unet.base_width": 8})
    model = supervised.build_unet(config)
    with pytest.raises(checkpoint.CheckpointError, match="other parameter shapes") as error:
        checkpoint.restore_variables(trained, supervised.init_variables(config, model))
    assert "\n" not in str(error.value)


def test_multiclass_masks_are_palette_images_of_the_class_ids_that_the_reader_takes_back(tmp_path):
    from amvlm_jax import visualize
    from amvlm_jax.data import folders
    from amvlm_jax.train import predict

    labels = np.array([[0, 1, 2], [3, 19, 0]], np.uint8)
    predict.mask_image(labels, 20).save(tmp_path / "mask.png")
    saved = Image.open(tmp_path / "mask.png")
    assert saved.mode == "P"
    np.testing.assert_array_equal(np.asarray(saved), labels)  # Pixel values are the ids, colours only shown.
    shown = np.asarray(saved.convert("RGB"))
    assert (shown[0, 0] == 0).all() and (shown[1, 2] == 0).all()  # Background black.
    assert len({tuple(shown[0, 1]), tuple(shown[0, 2]), tuple(shown[1, 0]), tuple(shown[1, 1])}) == 4
    read, size = folders.load_mask(tmp_path / "mask.png", 2, num_classes=20)
    assert size == (3, 2) and set(np.unique(read)) <= set(labels.ravel())
    # Binary masks stay 0/255 grey, and their overlay red.
    binary = predict.mask_image(np.array([[0, 1]], np.uint8), 1)
    assert binary.mode == "L" and np.asarray(binary).tolist() == [[0, 255]]
    Image.fromarray(np.full((2, 3, 3), 100, np.uint8)).save(tmp_path / "image.png")
    red = np.asarray(predict.overlay(tmp_path / "image.png", np.array([[0, 1, 1], [0, 0, 1]], np.uint8)))
    np.testing.assert_array_equal(red[0, 1], [169, 55, 55])  # 0.55 * 100 + 0.45 * (255, 0, 0) = 169.75, truncated.
    np.testing.assert_array_equal(red[0, 0], [100, 100, 100])
    coloured = np.asarray(predict.overlay(tmp_path / "image.png", labels, 20))
    colours = visualize.class_colours(20).astype(np.float32)
    np.testing.assert_array_equal(coloured[1, 1], (0.55 * 100 + 0.45 * colours[19]).astype(np.uint8))
    # A 12-bit scan is shown stretched to 8 bits as the model reads it, not saturated at 255.
    Image.fromarray(np.array([[0, 1000, 4000]], np.uint16)).save(tmp_path / "scan.png")
    shown = np.asarray(predict.overlay(tmp_path / "scan.png", np.zeros((1, 3), np.uint8)))
    assert shown[0, :, 0].tolist() == [0, 63, 255]  # 1000 / 4000 * 255 = 63.75.


def test_table_counts_of_written_masks_match_the_files_read_back(tmp_path):
    from amvlm_jax.train import predict

    labels = np.array([[0, 1, 2], [3, 19, 0]], np.uint8)  # 6 pixels: 2 background, one each of 1, 2, 3, 19.
    for num_classes, name in ((20, "multi"), (1, "binary")):
        shown = labels if num_classes > 1 else (labels > 1).astype(np.uint8)
        predict.mask_image(shown, num_classes).save(tmp_path / f"{name}.png")
        items = [(pathlib.Path(name), tmp_path / "in" / f"{name}.jpg", None)]
        predict.write_table(tmp_path, items, num_classes, {pathlib.Path(name): predict.mask_counts(shown, num_classes)})
        from_memory = (tmp_path / "predictions.csv").read_text()
        predict.write_table(tmp_path, items, num_classes)
        assert (tmp_path / "predictions.csv").read_text() == from_memory
        row = list(csv.reader(from_memory.splitlines()))[1]
        if num_classes > 1:  # Width 3, height 2, 4 of 6 pixels foreground.
            assert row[2:5] == ["3", "2", "0.666667"] and row[5:] == ["2", "1", "1", "1"] + ["0"] * 15 + ["1"]
        else:  # Foreground: the values above 1 (2, 3, 19).
            assert row[2:] == ["3", "2", "0.500000", "3", "3"]
    # An empty binary mask still has both class columns the header names.
    assert predict.mask_counts(np.zeros((2, 3), np.uint8), 1) == [3, 2, "0.000000", 6, 0]


def test_multiclass_probabilities_become_class_ids_at_the_original_size():
    from amvlm_jax.train import predict

    # Class 2 on the left half, class 1 on the right, background nowhere, at 4x4; resized to 8 wide, 6 high.
    probabilities = np.zeros((4, 4, 3), np.float32)
    probabilities[:, :2, 2], probabilities[:, 2:, 1] = 0.9, 0.8
    probabilities[..., 0] = 1.0 - probabilities[..., 1:].sum(-1)
    labels, foreground = predict.to_original_size(probabilities, (8, 6))
    assert labels.shape == foreground.shape == (6, 8) and labels.dtype == np.uint8
    assert (labels[:, :3] == 2).all() and (labels[:, -3:] == 1).all()
    np.testing.assert_allclose(foreground[:, 0], 0.9, atol=1e-6)
    # Binary: the bilinearly resized probability, thresholded at 0.5.
    labels, foreground = predict.to_original_size(np.array([[0.2, 0.9], [0.2, 0.9]], np.float32), (4, 2))
    np.testing.assert_array_equal(labels, foreground > 0.5)
    assert labels[:, 0].sum() == 0 and labels[:, -1].all()
    # A probability of exactly 0.5 (logit 0) is background, as evaluation's metrics.predict_labels has it.
    labels, _ = predict.to_original_size(np.full((2, 2), 0.5, np.float32), (2, 2))
    assert not labels.any()


def test_probabilities_are_resized_bilinearly_and_the_foreground_is_one_minus_the_background():
    from amvlm_jax.train import predict

    # Bilinear between pixel centres: a 2-wide map stretched to 4 reads its input at x = (i + 0.5) / 2 - 0.5
    # = -0.25, 0.25, 0.75, 1.25, held at the edge pixels: [0, 1] becomes [0, 0.25, 0.75, 1] (nearest: [0, 0, 1, 1]).
    labels, foreground = predict.to_original_size(np.array([[0.0, 1.0], [0.0, 1.0]], np.float32), (4, 3))
    np.testing.assert_allclose(foreground, [[0.0, 0.25, 0.75, 1.0]] * 3, atol=1e-6)
    np.testing.assert_array_equal(labels, [[0, 0, 1, 1]] * 3)
    # Three classes, the right column's foreground split 0.6 / 0.4 between classes 1 and 2: the foreground
    # probability is 1 - p(background) = [0, .25, .75, 1], not the likeliest class's ([0, .15, .45, .6]).
    probabilities = np.zeros((2, 2, 3), np.float32)
    probabilities[:, 0, 0] = 1.0
    probabilities[:, 1, 1:] = 0.6, 0.4
    labels, foreground = predict.to_original_size(probabilities, (4, 3))
    np.testing.assert_allclose(foreground, [[0.0, 0.25, 0.75, 1.0]] * 3, atol=1e-6)
    np.testing.assert_array_equal(labels, [[0, 0, 1, 1]] * 3)

def test_the_table_counts_each_class_of_a_multiclass_mask(tmp_path):
    """predictions.csv: width, height, foreground fraction and the pixels of every class, read from the masks."""
    from amvlm_jax.train import predict

    labels = np.array([[0, 1, 1], [2, 2, 2]], np.uint8)
    predict.mask_image(labels, 3).save(tmp_path / "a.png")
    predict.write_table(tmp_path, [(pathlib.Path("a"), pathlib.Path("in/a.png"), None)], 3)
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"file": "in/a.png", "mask": "a.png", "width": "3", "height": "2", "foreground_fraction": "0.833333",
                     "class_0_pixels": "1", "class_1_pixels": "2", "class_2_pixels": "3"}]


def test_class_colours_and_overlay_figures_by_hand(tmp_path, monkeypatch):
    """The palette (HSV by hand: hue 0 red; hue 0.381966 (137.5 degrees) at value 0.7 = (0, 178.5, 52.1);
    hue 0.763932 (275 degrees) at value 1 = (148.8, 0, 255)); a two-class task draws a 0/1 panel in the panel's
    colour, a multi-class one its ids with white contours; save_overlays' grid, titles and 0.5 contours
    (only where a panel has both sides of 0.5), read from the figure it closes."""
    from amvlm_jax import visualize

    np.testing.assert_array_equal(visualize.class_colours(1), [[0, 0, 0], [255, 0, 0]])
    np.testing.assert_array_equal(visualize.class_colours(4), [[0, 0, 0], [255, 0, 0], [0, 178, 52], [149, 0, 255]])
    image = np.full((4, 4, 3), 100, np.uint8)
    mask = np.zeros((4, 4), np.uint8)
    mask[:2] = 1
    truth = np.array(visualize.OVERLAY_COLORS["truth"], np.float32)
    tinted, _, edge = visualize.tint(image, mask, "truth", num_classes=2)
    np.testing.assert_allclose(tinted[0, 0], 0.55 * 100 / 255 + 0.45 * truth, rtol=1e-6)
    np.testing.assert_array_equal(edge, truth)
    np.testing.assert_array_equal(visualize.tint(image, mask, "truth", num_classes=3)[2], [1, 1, 1])

    plt = visualize._pyplot()
    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    prediction = np.zeros((2, 4, 4), np.int32)
    prediction[0, 1:3], prediction[1] = 2, 1  # Image 1: one class everywhere, no contour.
    visualize.save_overlays(tmp_path / "multi.png", np.stack([image, image]),
                            {"truth": np.stack([mask, 0 * mask]), "prediction": prediction},
                            names=["a.png", "b.png"], title="epoch 3", num_classes=3)
    probability = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4)
    visualize.save_overlays(tmp_path / "binary.png", image[None], {"prediction": probability})
    multi, binary = closed
    assert multi.axes[0].get_subplotspec().get_gridspec().get_geometry() == (2, 3)
    assert [axis.get_title() for axis in multi.axes] == ["a.png", "truth", "prediction", "b.png", "truth", "prediction"]
    assert multi._suptitle.get_text() == "epoch 3" and binary._suptitle is None
    contours = [[c.get_edgecolor()[0, :3].tolist() for c in axis.collections] for axis in multi.axes]
    assert contours == [[], [[1, 1, 1]], [[1, 1, 1]], [], [], []]
    assert [axis.get_title() for axis in binary.axes] == ["image", "prediction"]
    np.testing.assert_allclose(binary.axes[1].collections[0].get_edgecolor()[0, :3], visualize.OVERLAY_COLORS["prediction"])


def test_batches_on_two_devices_are_padded_and_write_what_one_device_writes(trained, tmp_path):
    """Three images in batches of 2 over a 2-device mesh: the last batch (one image) is padded to a row per
    device, and every file equals the one-device run's."""
    inputs = tmp_path / "scans"
    inputs.mkdir()
    for image in sorted((trained / "data" / "Val_Folder" / "img").iterdir())[:3]:
        (inputs / image.name).write_bytes(image.read_bytes())
    one = _predict(trained, inputs, tmp_path / "one", **{"train.eval_batch_size": 2})
    two = _predict(trained, inputs, tmp_path / "two", **{"train.eval_batch_size": 2, "mesh.data": 2})
    assert one == dict(two, csv=one["csv"]) and two["written"] == 3
    written = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(written) == 4 and sorted(p.name for p in (tmp_path / "two").iterdir()) == written
    for name in written:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_each_images_probability_map_is_its_own_in_any_batching(trained, tmp_path):
    """The probability written for an image is the model's on that image, whatever batch it shares: batches
    of 8 and of 3 (the last one partial) write the same maps per name, and the maps of different images differ
    by far more than the batchings do (the tiny model's binary masks are alike, so only the maps can tell a
    row order reversed within a batch or one row's map written for every image)."""
    val_folder = trained / "data" / "Val_Folder"
    maps = {}
    for batch_size in (8, 3):
        output = tmp_path / f"batch_{batch_size}"
        _predict(trained, val_folder, output, **{"train.eval_batch_size": batch_size, "predict.probabilities": "npy"})
        maps[batch_size] = {path.name: np.load(path) for path in sorted(output.glob("*_probability.npy"))}
    assert len(maps[8]) == 8 and maps[8].keys() == maps[3].keys()
    for name, probability in maps[8].items():
        np.testing.assert_allclose(maps[3][name], probability, atol=1e-5, err_msg=name)
    stacked = np.stack(list(maps[8].values()))
    between = np.abs(stacked[:, None] - stacked[None]).max(axis=(2, 3))
    assert between[~np.eye(len(stacked), dtype=bool)].min() > 1e-4  # Ten times the tolerance above.
