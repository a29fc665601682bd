"""The LViT folder reader on untidy and broken data."""

import csv
import io
import shutil
import struct
import zipfile

import numpy as np
import openpyxl
import pytest
from PIL import Image

from amvlm_jax.data import folders
from amvlm_jax.data.folders import DataError


def _write_image(path, size=(40, 30), mode="RGB", value=None, fmt=None):
    rng = np.random.default_rng(len(str(path)))
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    array = rng.integers(0, 256, size=shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=None).save(path, format=fmt)
    return array


def _write_mask(path, size=(40, 30), values=(0, 255)):
    array = np.full((size[1], size[0]), values[0], np.uint8)
    array[5:15, 10:20] = values[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def _write_xlsx(path, rows):
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Image", "Description"])
    for row in rows:
        sheet.append(list(row))
    book.save(path)


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image", "Description"])
        writer.writerows(rows)


@pytest.fixture
def untidy_root(tmp_path):
    """A train split with every untidy case the reader must accept."""
    train = tmp_path / "Train_Folder"
    _write_image(train / "img" / "a.png")
    _write_mask(train / "labelcol" / "mask_a.png")  # mask_ prefix (QaTa-COV19).
    _write_image(train / "img" / "b.tif", fmt="TIFF")  # Sheet says b.png, file is .tif.
    _write_mask(train / "labelcol" / "b.png", values=(0, 1))  # 0/1 mask.
    _write_image(train / "img" / "c.png", mode="L")  # Grayscale image.
    _write_mask(train / "labelcol" / "c.tif")
    (train / "img" / ".DS_Store").write_text("junk")  # Hidden clutter is ignored.
    _write_xlsx(train / "Train_text.xlsx", [("b.png", "Two areas, upper left."), ("a.png", "One area, middle."),
                                           ("c", "None."), (None, None)])
    val = tmp_path / "Val_Folder"
    _write_image(val / "img" / "v.png")
    _write_mask(val / "labelcol" / "v.png")
    _write_csv(val / "Val_text.csv", [("v.png", "A report, with a comma.")])
    return tmp_path


def test_untidy_layout_is_read_by_stem(untidy_root):
    examples = folders.list_split(untidy_root, "train")
    by_name = {e.name: e for e in examples}
    assert set(by_name) == {"a", "b", "c"}
    assert by_name["a"].mask_path.name == "mask_a.png"
    assert by_name["b"].image_path.name == "b.tif"
    assert by_name["b"].report == "Two areas, upper left."
    assert folders.list_split(untidy_root, "val")[0].report == "A report, with a comma."
    assert not folders.has_split(untidy_root, "test")


def test_load_split_resizes_and_binarises(untidy_root):
    split = folders.load_split(untidy_root, "train", image_size=16, progress=False)
    assert split.images.shape == (3, 16, 16, 3) and split.images.dtype == np.uint8
    assert split.masks.shape == (3, 16, 16)
    assert set(np.unique(split.masks)) == {0, 1}
    # Nearest resize of the 10x10 block at rows 5:15, cols 10:20 of a 30x40 mask.
    b = split.names.index("b")
    expected = np.asarray(Image.fromarray(_write_mask(untidy_root / "x.png", values=(0, 1))).resize((16, 16), Image.NEAREST))
    np.testing.assert_array_equal(split.masks[b], expected)
    # Grayscale becomes three equal channels.
    c = split.images[split.names.index("c")]
    np.testing.assert_array_equal(c[..., 0], c[..., 1])


def _cubic_weights(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of a centre-aligned cubic (Keys, a = -0.5) resize whose kernel is widened by
    the scale when shrinking (antialiased), each row summing to 1."""
    scale = size_in / size_out
    support = max(scale, 1.0)
    x = np.abs((np.arange(size_in)[None, :] + 0.5 - (np.arange(size_out)[:, None] + 0.5) * scale) / support)
    a = -0.5
    w = np.where(x < 1, (a + 2) * x**3 - (a + 3) * x**2 + 1, np.where(x < 2, a * (x**3 - 5 * x**2 + 8 * x - 4), 0.0))
    return w / w.sum(axis=1, keepdims=True)


def test_images_are_resized_cubically_with_antialiasing_and_masks_by_centre_aligned_nearest(tmp_path):
    """Against references written from the SPEC's wording, not from the reader's library: shrinking 100x90 to
    24x24, the image matches an antialiased cubic resize (a cubic without antialiasing differs by tens of
    grey levels on this noise) and each mask pixel is the source pixel under its centre, so the mask keeps
    the image's registration (a corner-aligned nearest shifts it by half an output pixel, 2 source pixels here)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 100, 3), dtype=np.uint8)
    mask = (rng.random((90, 100)) > 0.5).astype(np.uint8) * 255
    Image.fromarray(image).save(tmp_path / "x.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    resized, original = folders.load_image(tmp_path / "x.png", 24)
    assert original == (100, 90)
    expected = np.einsum("ih,hwc,jw->ijc", _cubic_weights(90, 24), image.astype(np.float64), _cubic_weights(100, 24))
    assert np.abs(resized - np.clip(np.rint(expected), 0, 255)).max() <= 2
    rows, columns = (np.floor((np.arange(24) + 0.5) * n / 24).astype(int) for n in (90, 100))
    np.testing.assert_array_equal(folders.load_mask(tmp_path / "m.png", 24, 1)[0], mask[np.ix_(rows, columns)] > 0)


def test_only_requested_masks_are_opened(untidy_root):
    (untidy_root / "Train_Folder" / "labelcol" / "c.tif").write_bytes(b"broken")  # Never opened.
    examples = folders.list_split(untidy_root, "train")
    keep = [i for i, e in enumerate(examples) if e.name != "c"]
    split = folders.load_split(untidy_root, "train", image_size=16, mask_indices=keep, progress=False)
    assert split.masks[[i for i, e in enumerate(examples) if e.name == "c"][0]].sum() == 0
    # An image that is never labelled needs no mask file at all; one that is, does.
    (untidy_root / "Train_Folder" / "labelcol" / "c.tif").unlink()
    split = folders.load_split(untidy_root, "train", image_size=16, mask_indices=keep, progress=False)
    assert len(split) == 3
    image = untidy_root / "Train_Folder" / "img" / "c.png"
    assert _error(folders.load_split, untidy_root, "train", image_size=16, mask_indices=[0, 1, 2], progress=False) == (
        f"{image}: no mask in {untidy_root / 'Train_Folder' / 'labelcol'}")
    assert _error(folders.load_split, untidy_root, "train", image_size=16, progress=False) == (
        f"{image}: no mask in {untidy_root / 'Train_Folder' / 'labelcol'}")


def test_unlabelled_training_images_may_lack_masks_and_then_their_pseudo_labels_go_unscored(tmp_path):
    from amvlm_jax.data import datasets, synthetic

    from conftest import tiny_synthetic_config

    config = tiny_synthetic_config(**{"data.labeled_fraction": 0.25, "data.root": str(tmp_path)})
    synthetic.write_synthetic_dataset(tmp_path, num_train=16, num_val=8, num_test=8, image_size=64)
    labeled, unlabeled = datasets.load_train_parts(config, tmp_path, unlabeled_masks=True)
    assert len(labeled) == 4 and unlabeled.masks is not None and unlabeled.masks.any()
    names = sorted(path.stem for path in (tmp_path / "Train_Folder" / "img").iterdir())
    assert sorted(labeled.names + unlabeled.names) == names  # Each image in one part only.
    (tmp_path / "Train_Folder" / "labelcol" / f"{unlabeled.names[0]}.png").unlink()
    again, unmasked = datasets.load_train_parts(config, tmp_path, unlabeled_masks=True)
    np.testing.assert_array_equal(again.masks, labeled.masks)
    assert unmasked.masks is None and unmasked.names == unlabeled.names
    # An absent evaluation split is None, not an error; a present one comes with every mask.
    shutil.rmtree(tmp_path / "Test_Folder")
    assert datasets.load_eval_split(config, tmp_path, "test") is None
    val = datasets.load_eval_split(config, tmp_path, "val")
    assert len(val) == 8 and all(mask.any() for mask in val.masks)


def _error(callable_, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        callable_(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_report_row(untidy_root):
    _write_image(untidy_root / "Train_Folder" / "img" / "d.png")
    message = _error(folders.list_split, untidy_root, "train")
    assert "d.png" in message and "no report row" in message


def test_sheet_row_without_image(untidy_root):
    _write_csv(untidy_root / "Val_Folder" / "Val_text.csv", [("v.png", "x"), ("ghost.png", "y")])
    message = _error(folders.list_split, untidy_root, "val")
    assert "ghost.png" in message and "row 3" in message


def test_sheet_naming_an_image_twice_also_by_its_mask_name(untidy_root):
    sheet = untidy_root / "Val_Folder" / "Val_text.csv"
    _write_csv(sheet, [("v.png", "x"), ("mask_v.png", "y")])
    assert _error(folders.list_split, untidy_root, "val") == f"{sheet}: row 3 repeats image 'mask_v.png' (row 2)"


def test_an_empty_cell_written_as_text_is_no_description(untidy_root):
    # A sheet that went through pandas' astype(str) holds 'nan' where a description was missing: not a report.
    sheet = untidy_root / "Val_Folder" / "Val_text.csv"
    for text in ("nan", " NaN "):
        _write_csv(sheet, [("v.png", text)])
        assert _error(folders.list_split, untidy_root, "val") == (
            f"{sheet}: row 2 (v.png) has the description '{text.strip()}' (an empty cell written as text?)")
    _write_csv(sheet, [("v.png", "nan in the left lung")])  # A word of a report is no empty cell.
    assert folders.list_split(untidy_root, "val")[0].report == "nan in the left lung"


def test_missing_mask(untidy_root):
    (untidy_root / "Val_Folder" / "labelcol" / "v.png").unlink()
    assert "no mask" in _error(folders.list_split, untidy_root, "val")


def test_unreadable_image(untidy_root):
    (untidy_root / "Train_Folder" / "img" / "a.png").write_bytes(b"\x89PNG not really")
    message = _error(folders.load_split, untidy_root, "train", image_size=16, progress=False)
    assert "a.png" in message and "unreadable" in message


def test_a_tiff_with_a_damaged_second_page_is_a_one_line_error(tmp_path):
    """A TIFF whose first page reads but whose next page directory is damaged (here: one without dimensions):
    counting its pages fails after the first page has loaded; the file is named in one line, image or mask."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    assert data[:4] == b"II*\x00"  # Little-endian: the first directory's offset, then its entry count.
    first = struct.unpack("<I", data[4:8])[0]
    next_pointer = first + 2 + 12 * struct.unpack("<H", data[first:first + 2])[0]
    data += b"\x00" * (len(data) % 2)
    data[next_pointer:next_pointer + 4] = struct.pack("<I", len(data))
    data += b"\x00" * 6  # A directory of no entries.
    path = tmp_path / "damaged.tif"
    path.write_bytes(bytes(data))
    for read in (lambda: folders.load_image(path, 8), lambda: folders.load_mask(path, 8, 1)):
        with pytest.raises(DataError) as info:
            read()
        assert str(info.value) == f"{path}: unreadable image (TypeError)"


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_a_file_stored_turned_is_read_as_its_exif_orientation_shows_it(tmp_path, suffix):
    """Orientation 6 (stored a quarter turn counter-clockwise; viewers turn it clockwise, as OpenCV's imread
    does): image and mask are read as shown, at the shown size, so a mask drawn on the shown image stays on it;
    a file without the tag is read as stored."""
    shown = np.zeros((30, 40), np.uint8)
    shown[:10, :20] = 255  # A bright block at the top left of a landscape picture.
    exif = Image.Exif()
    exif[0x0112] = 6
    for name, array in (("turned", np.rot90(shown)), ("plain", shown)):
        Image.fromarray(np.repeat(array[..., None], 3, -1)).save(tmp_path / f"{name}{suffix}", exif=exif.tobytes()
                                                                 if name == "turned" else b"")
        Image.fromarray(array).save(tmp_path / f"{name}_mask.png", exif=exif.tobytes() if name == "turned" else b"")
        image = np.asarray(folders.rgb_image(tmp_path / f"{name}{suffix}"))[..., 0]
        assert image.shape == (30, 40) and folders.load_image(tmp_path / f"{name}{suffix}", 8)[1] == (40, 30)
        assert np.abs(image.astype(int) - shown).max() <= (0 if suffix != ".jpg" else 64), name
        mask, size = folders.load_mask(tmp_path / f"{name}_mask.png", 40, 1)
        assert size == (40, 30) and mask[:8].mean() > mask[-8:].mean(), name  # 40x30 squashed to 40x40.


def test_mask_image_size_mismatch(untidy_root):
    _write_mask(untidy_root / "Val_Folder" / "labelcol" / "v.png", size=(20, 20))
    message = _error(folders.load_split, untidy_root, "val", image_size=16, progress=False)
    assert "v.png" in message and "20x20" in message and "40x30" in message


def test_non_binary_mask_in_binary_task(untidy_root):
    _write_mask(untidy_root / "Val_Folder" / "labelcol" / "v.png", values=(0, 128))
    message = _error(folders.load_split, untidy_root, "val", image_size=16, progress=False)
    assert "v.png" in message and "128" in message


def test_a_jpeg_mask_is_refused_saying_its_compression_changes_values_at_the_edges(tmp_path):
    """A binary JPEG mask holds values in between at its edges; a multi-class one other class ids there, within
    data.num_classes too (ids 0 and 2 here: 1 appears where they meet), so it is refused whatever it holds."""
    mask = np.zeros((64, 64), np.uint8)
    mask[10:40, 20:50] = 255
    Image.fromarray(mask).save(tmp_path / "binary.jpg", quality=90)
    assert _error(folders.load_mask, tmp_path / "binary.jpg", 32, 1).endswith(
        "expected 0/255 or 0/1 (a JPEG: its compression blurs a mask's edges into other values; save masks "
        "losslessly, e.g. as PNG)")
    Image.fromarray(mask).save(tmp_path / "binary.png")  # Lossless: read.
    assert set(np.unique(folders.load_mask(tmp_path / "binary.png", 32, 1)[0])) == {0, 1}
    Image.fromarray(mask // 255 * 2).save(tmp_path / "ids.jpg", quality=90)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "ids.jpg")))) <= {0, 1, 2, 3, 4}
    assert _error(folders.load_mask, tmp_path / "ids.jpg", 32, 5) == (
        f"{tmp_path / 'ids.jpg'}: a multi-class mask stored as JPEG (its compression turns the class ids at the edges "
        "into other ids); save masks losslessly, e.g. as PNG")
    Image.fromarray(mask // 255 * 2).save(tmp_path / "ids.png")
    assert set(np.unique(folders.load_mask(tmp_path / "ids.png", 32, 5)[0])) == {0, 2}


def test_multiclass_mask_ids_and_out_of_range(untidy_root):
    _write_mask(untidy_root / "Val_Folder" / "labelcol" / "v.png", values=(0, 3))
    split = folders.load_split(untidy_root, "val", image_size=16, num_classes=4, progress=False)
    assert set(np.unique(split.masks)) == {0, 3}
    from amvlm_jax.config import base_config
    from amvlm_jax.data import datasets

    config = base_config()  # A run reads its splits with data.num_classes.
    config.data.num_classes, config.data.image_size = 4, 16
    np.testing.assert_array_equal(datasets.load_eval_split(config, untidy_root, "val").masks, split.masks)
    message = _error(folders.load_split, untidy_root, "val", image_size=16, num_classes=3, progress=False)
    assert "class id 3" in message


def test_a_negative_class_id_in_a_32_bit_mask_is_an_error_not_class_255(untidy_root):
    ids = np.full((30, 40), 2, np.int32)
    ids[:10] = -1
    mask = untidy_root / "Val_Folder" / "labelcol" / "v.png"
    mask.unlink()
    Image.fromarray(ids, mode="I").save(mask.with_suffix(".tif"))
    message = _error(folders.load_split, untidy_root, "val", image_size=16, num_classes=4, progress=False)
    assert "v.tif" in message and "class id -1" in message


def test_missing_data_root(tmp_path):
    assert "not set" in _error(folders.check_root, "")
    message = _error(folders.check_root, str(tmp_path / "nowhere"))
    assert "does not exist" in message and "Train_Folder" in message
    message = _error(folders.check_root, str(tmp_path))
    assert "no Train_Folder" in message
    (tmp_path / "data.zip").write_bytes(b"")  # Not "does not exist": it does.
    assert _error(folders.check_root, str(tmp_path / "data.zip")).startswith(
        f"{tmp_path / 'data.zip'}: data root is a file, not a folder; expected <root>/Train_Folder/")


def test_missing_sheet(untidy_root):
    (untidy_root / "Val_Folder" / "Val_text.csv").unlink()
    assert "no report sheet" in _error(folders.list_split, untidy_root, "val")


def test_two_sheets_an_unsupported_image_type_and_a_multi_page_image(untidy_root):
    val = untidy_root / "Val_Folder"
    _write_xlsx(val / "Val_text.xlsx", [("v.png", "An older copy.")])
    assert _error(folders.list_split, untidy_root, "val") == (f"{val}: two report sheets (Val_text.xlsx and "
                                                              "Val_text.csv); keep one")
    (val / "Val_text.xlsx").unlink()
    (val / "img" / "w.webp").write_bytes(b"RIFF")
    _write_csv(val / "Val_text.csv", [("v.png", "x"), ("w.webp", "y")])
    assert _error(folders.list_split, untidy_root, "val").startswith(
        f"{val / 'Val_text.csv'}: row 3 names 'w.webp', a file type the reader does not take (")
    frames = [Image.fromarray(np.full((30, 40, 3), value, np.uint8)) for value in (0, 255)]
    frames[0].save(val / "img" / "v.png".replace(".png", ".tif"), save_all=True, append_images=frames[1:])
    (val / "img" / "v.png").unlink()
    _write_csv(val / "Val_text.csv", [("v.tif", "x")])
    assert _error(folders.load_split, untidy_root, "val", image_size=16, progress=False) == (
        f"{val / 'img' / 'v.tif'}: holds 2 frames (pages); give one image per file")


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_mask_drawn_in_transparency_is_an_error_and_one_that_agrees_with_its_grey_values_is_read(untidy_root, mode):
    path = untidy_root / "Val_Folder" / "labelcol" / "v.png"
    drawn = _write_mask(path)
    _write_mask(untidy_root / "grey.png")
    expected = folders.load_mask(untidy_root / "grey.png", 40, 1)[0]
    channels = 3 if mode == "RGBA" else 1

    def save(grey, alpha):
        Image.fromarray(np.concatenate([np.repeat(grey[..., None], channels, -1), alpha[..., None]], -1).squeeze(),
                        mode=mode).save(path)

    white, black, opaque = np.full_like(drawn, 255), np.zeros_like(drawn), np.full_like(drawn, 255)
    for grey in (white, black):  # Drawn in the alpha channel alone: grey conversion would give all or nothing.
        save(grey, drawn)
        assert _error(folders.load_split, untidy_root, "val", image_size=40, progress=False) == (
            f"{path}: mask's transparency and its grey values disagree on the foreground; save it without "
            "transparency (0/255 grey or class ids)")
    for alpha in (drawn, opaque):  # A transparent black background, or no transparency: read as grey.
        save(drawn, alpha)
        np.testing.assert_array_equal(folders.load_split(untidy_root, "val", image_size=40, progress=False).masks[0],
                                      expected)
    assert expected.any()


def test_real_monuseg(monuseg):
    train = folders.list_split(monuseg, "train")
    val = folders.list_split(monuseg, "val")
    assert len(train) == 24 and len(val) == 6
    assert all(len(e.report) > 10 for e in train + val)
    split = folders.load_split(monuseg, "val", image_size=224, progress=False)
    assert split.images.shape == (6, 224, 224, 3)
    fraction = split.masks.mean()
    assert 0.05 < fraction < 0.6  # Nuclei cover a real share of each tile.


def test_a_workbook_whose_sheet_is_damaged_is_a_one_line_error(tmp_path):
    """A read-only workbook parses its sheet only as the rows are read: a damaged sheet (cut off mid-row here)
    failed there with openpyxl's and the XML parser's own tracebacks; it is one line naming the file."""
    book = openpyxl.Workbook()
    book.active.append(["Image", "Description"])
    book.active.append(["a.png", "A lesion in the upper left."])
    whole = io.BytesIO()
    book.save(whole)
    path = tmp_path / "Train_text.xlsx"
    with zipfile.ZipFile(whole) as source, zipfile.ZipFile(path, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, data[: data.index(b"<row") + 10] if name == "xl/worksheets/sheet1.xml" else data)
    message = _error(folders.read_sheet, path)
    assert message.startswith(f"{path}: cannot read the report sheet (ParseError: ")


def test_sheet_that_is_not_utf8_names_the_byte(untidy_root):
    sheet = untidy_root / "Val_Folder" / "Val_text.csv"
    sheet.write_text("Image,Description\nv.png,Opacité basale\n", encoding="latin-1")
    position = sheet.read_bytes().index("é".encode("latin-1"))
    assert _error(folders.list_split, untidy_root, "val") == (
        f"{sheet}: not UTF-8 text (byte 0xe9 at position {position}); save it as UTF-8")
    sheet.write_text("Image,Description\nv.png,x\n", encoding="utf-16")
    assert _error(folders.read_sheet, sheet) == f"{sheet}: not UTF-8 text (byte 0xff at position 0); save it as UTF-8"
    sheet.write_text('Image,Description\nv.png,"x' + "y\n" * 70_000, encoding="utf-8")  # A quote left open.
    assert _error(folders.read_sheet, sheet) == (f"{sheet}:2: not a valid CSV record: field larger than "
                                                 "field limit (131072) (a quote left open?)")
    sheet.write_text("Image,Description\nv.png,\"Opacité,\r\nbasale\"\n", encoding="utf-8-sig")  # BOM, quoted newline
    assert folders.read_sheet(sheet) == [(2, "v.png", "Opacité,\r\nbasale")]


def test_the_decoding_progress_bar_shows_on_process_0_only(untidy_root, monkeypatch, capsys):
    import jax

    for index, shown in ((0, True), (1, False)):
        monkeypatch.setattr(jax, "process_index", lambda: index)
        folders.load_split(untidy_root, "train", image_size=32)
        assert ("reading train" in capsys.readouterr().err) == shown, index


@pytest.mark.parametrize("num_classes, red", [(1, 1), (20, 7)])
def test_a_colour_mask_is_an_error_not_grey_converted(untidy_root, num_classes, red):
    # Grey conversion turned R = 1 into 0 (an all-background binary mask) and R = 7 into class 2, silently.
    path = untidy_root / "Val_Folder" / "labelcol" / "v.png"
    drawn = _write_mask(path, values=(0, red))
    Image.fromarray(np.stack([drawn, np.zeros_like(drawn), np.zeros_like(drawn)], -1)).save(path)
    assert _error(folders.load_split, untidy_root, "val", image_size=16, num_classes=num_classes, progress=False) == (
        f"{path}: colour mask (its RGB channels differ: (0, 0, 0), ({red}, 0, 0)); save it as grey values "
        "(0/255 or 0/1) or class ids")
    Image.fromarray(np.repeat(drawn[..., None], 3, -1)).save(path)  # Grey values stored as RGB are read.
    assert set(np.unique(folders.load_split(untidy_root, "val", image_size=16, num_classes=num_classes,
                                            progress=False).masks)) == {0, 1 if num_classes == 1 else red}


def test_sheet_columns_are_found_by_header_in_any_order_case_and_padding(untidy_root):
    # Description before Image, an extra column, headers and the image name padded with spaces.
    val = untidy_root / "Val_Folder"
    (val / "Val_text.csv").unlink()
    book = openpyxl.Workbook()
    book.active.append(["Description ", "Notes", " IMAGE"])
    book.active.append(["The report of v.", "ignored", "  v.png "])
    book.save(val / "Val_text.xlsx")
    examples = folders.list_split(untidy_root, "val")
    assert [(e.name, e.report) for e in examples] == [("v", "The report of v.")]


def test_sheet_rows_missing_a_cell_an_image_name_or_a_description_are_named(untidy_root):
    sheet = untidy_root / "Val_Folder" / "Val_text.csv"
    sheet.write_text("Image,Description\nv.png\n")  # The row stops before its description.
    assert _error(folders.list_split, untidy_root, "val") == f"{sheet}: row 2 (v.png) has an empty description"
    _write_csv(sheet, [("v.png", "   ")])
    assert _error(folders.list_split, untidy_root, "val") == f"{sheet}: row 2 (v.png) has an empty description"
    _write_csv(sheet, [("v.png", "x"), ("", "A report without its image.")])
    assert _error(folders.list_split, untidy_root, "val") == f"{sheet}: row 3 has a description but no image name"
    sheet.write_bytes(b"")
    assert _error(folders.list_split, untidy_root, "val") == f"{sheet}: the report sheet is empty"
    sheet.write_text("Image,Report\nv.png,x\n")
    assert _error(folders.list_split, untidy_root, "val") == (
        f"{sheet}: the report sheet needs the columns Image and Description, found ['Image', 'Report']")


def test_sheet_names_match_by_stem_whatever_the_suffix_case_dots_in_the_stem_or_a_mask_like_name(untidy_root):
    val = untidy_root / "Val_Folder"
    sheet = val / "Val_text.csv"
    _write_image(val / "img" / "scan.01.png")  # A stem with a dot, named without its suffix.
    _write_image(val / "img" / "mask_w.png")  # An image whose own name starts like a mask's.
    _write_csv(sheet, [("v.PNG", "report v"), ("scan.01", "report scan"), ("mask_w.png", "report w")])
    examples = folders.list_split(untidy_root, "val", require_masks=False)
    assert {e.name: e.report for e in examples} == {"v": "report v", "scan.01": "report scan", "mask_w": "report w"}


def test_hidden_files_are_skipped_and_two_images_of_one_stem_or_none_at_all_are_errors(untidy_root):
    val = untidy_root / "Val_Folder"
    (val / "img" / "._v.png").write_bytes(b"\x00\x05\x16\x07")  # A copy's resource-fork file.
    (val / "labelcol" / "._v.png").write_bytes(b"\x00\x05\x16\x07")
    assert [e.name for e in folders.list_split(untidy_root, "val")] == ["v"]
    _write_image(val / "img" / "v.tif", fmt="TIFF")
    assert _error(folders.list_split, untidy_root, "val") == f"{val / 'img' / 'v.tif'}: two files share the stem 'v' (v.png)"
    for path in (val / "img" / "v.tif", val / "img" / "v.png"):
        path.unlink()
    _write_csv(val / "Val_text.csv", [])
    assert _error(folders.list_split, untidy_root, "val") == f"{val / 'img'}: no images"


def test_a_missing_labelcol_folder_is_named_and_reports_alone_need_none(untidy_root):
    val = untidy_root / "Val_Folder"
    for path in (val / "labelcol").iterdir():
        path.unlink()
    (val / "labelcol").rmdir()
    message = _error(folders.list_split, untidy_root, "val")
    assert message.startswith(f"{val / 'labelcol'}: folder missing; expected <root>/Train_Folder/")
    # Pre-training reads images and reports only: no mask is looked for.
    split = folders.load_split(untidy_root, "val", image_size=8, with_masks=False, progress=False)
    assert split.masks is None and split.reports == ["A report, with a comma."] and split.images.shape == (1, 8, 8, 3)


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", [[1000, 2000], [3000, 5000]], [[0, 63], [127, 255]]),  # (v - 1000) / 4000 * 255, truncated
    ("F", [[-1.0, 0.0], [1.0, 3.0]], [[0, 63], [127, 255]]),
    ("I;16", [[700, 700], [700, 700]], [[0, 0], [0, 0]]),  # No range to stretch: black, not NaN.
])
def test_16_bit_and_float_images_are_stretched_from_their_minimum_to_their_maximum(tmp_path, mode, values, expected):
    import warnings

    path = tmp_path / "x.tif"
    Image.fromarray(np.asarray(values, np.uint16 if mode == "I;16" else np.float32)).save(path)
    assert Image.open(path).mode == mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = np.asarray(folders.rgb_image(path))
    np.testing.assert_array_equal(rgb, np.repeat(np.asarray(expected, np.uint8)[..., None], 3, -1))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_float_image_with_a_nan_or_infinite_pixel_is_named_not_turned_black(tmp_path, bad):
    # One NaN made the stretch's minimum and maximum NaN, and the whole image decoded as zeros without a word.
    values = np.ones((4, 6), np.float32)
    values[1, 2] = bad
    path = tmp_path / "scan.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(DataError) as raised:
        folders.load_image(path, 16)
    assert str(raised.value) == f"{path}: float image holds 1 NaN or infinite pixel(s); give them a number (e.g. the background's)"


def test_16_bit_masks_keep_their_ids_and_binary_masks_take_no_third_value(untidy_root):
    path = untidy_root / "Val_Folder" / "labelcol" / "v.png"
    ids = np.zeros((30, 40), np.uint16)
    ids[:10] = 3
    Image.fromarray(ids).save(path)
    assert np.unique(folders.load_split(untidy_root, "val", image_size=16, num_classes=4, progress=False).masks).tolist() == [0, 3]
    ids[:5] = 300  # Named as it is, not as 8 bits would clip it.
    Image.fromarray(ids).save(path)
    assert _error(folders.load_mask, path, 16, 4) == f"{path}: mask holds class id 300, but data.num_classes is 4"
    grey = np.zeros((30, 40), np.uint8)
    grey[:, :8] = np.arange(8)[None, :] * 30 + 1  # 1, 31, ..., 211: seven values besides 0.
    Image.fromarray(grey).save(path)
    assert _error(folders.load_mask, path, 16, 1) == (
        f"{path}: mask of a binary task holds values 0, 1, 31, 61, 91, 121 ...; expected 0/255 or 0/1")
    grey[:] = 0
    grey[0, :3] = (0, 1, 255)  # Neither 0/1 nor 0/255.
    Image.fromarray(grey).save(path)
    assert _error(folders.load_mask, path, 16, 1) == (
        f"{path}: mask of a binary task holds values 0, 1, 255; expected 0/255 or 0/1")


def test_a_mask_of_another_height_only_is_named(untidy_root):
    _write_mask(untidy_root / "Val_Folder" / "labelcol" / "v.png", size=(40, 20))
    assert _error(folders.load_split, untidy_root, "val", image_size=16, progress=False) == (
        f"{untidy_root / 'Val_Folder' / 'labelcol' / 'v.png'}: mask is 40x20 but its image v.png is 40x30")


def test_a_partly_transparent_foreground_is_read_by_its_grey_values(untidy_root):
    # Antialiased edges: foreground pixels whose alpha is low but not zero still agree with their grey values.
    path = untidy_root / "Val_Folder" / "labelcol" / "v.png"
    drawn = _write_mask(path, size=(40, 40))
    alpha = np.where(drawn > 0, 60, 0).astype(np.uint8)
    Image.fromarray(np.stack([drawn, alpha], -1), mode="LA").save(path)
    np.testing.assert_array_equal(folders.load_mask(path, 40, 1)[0], drawn > 0)


def test_a_float_or_big_endian_mask_is_read_as_it_is_not_converted_to_8_bit_grey(untidy_root):
    # Grey conversion rounded or clipped a float mask's values silently (2.5 and 0.5 became whole ids, -1 became
    # background) and clipped a big-endian 16-bit id 300 to 255.
    (untidy_root / "Val_Folder" / "labelcol" / "v.png").unlink()
    path = untidy_root / "Val_Folder" / "labelcol" / "v.tif"
    ids = np.zeros((30, 40), np.float32)
    ids[:10] = 3.0
    Image.fromarray(ids).save(path)
    assert Image.open(path).mode == "F"
    expected = np.zeros((16, 16), np.uint8)
    expected[:5] = 3  # Output row i samples source row floor((i + 0.5) * 30 / 16): rows 0-4 rows 0-8, row 5 row 10.
    np.testing.assert_array_equal(folders.load_split(untidy_root, "val", image_size=16, num_classes=4,
                                                     progress=False).masks[0], expected)
    for value, num_classes, problem in ((2.5, 4, "holds the value 2.5; a float mask must hold whole class ids "
                                                 "(or 0/255, 0/1)"),
                                        (0.5, 1, "holds the value 0.5; a float mask must hold whole class ids "
                                                 "(or 0/255, 0/1)"),
                                        (-1.0, 4, "holds class id -1; class ids run from 0 to data.num_classes - 1 = 3")):
        ids[:10, :5] = value
        Image.fromarray(ids).save(path)
        assert _error(folders.load_mask, path, 16, num_classes) == f"{path}: mask {problem}", value
    ids[:10] = 1.0
    Image.fromarray(ids).save(path)  # A float 0/1 mask of a binary task is read.
    np.testing.assert_array_equal(folders.load_mask(path, 16, 1)[0], expected > 0)
    big_endian = np.zeros((30, 40), ">u2")
    big_endian[:10] = 300
    Image.fromarray(big_endian).save(path)
    assert Image.open(path).mode == "I;16B"
    assert _error(folders.load_mask, path, 16, 4) == f"{path}: mask holds class id 300, but data.num_classes is 4"
