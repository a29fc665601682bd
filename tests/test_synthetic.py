"""Tests for the synthetic image-report-mask dataset."""

import csv
import filecmp
import itertools
import json
import pathlib
import re

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from amvlm_jax.data import synthetic
from amvlm_jax.data.synthetic import (
    GRID_NAMES,
    describe,
    location_phrase,
    main,
    render_sample,
    write_synthetic_dataset,
)

SMALL = dict(num_train=12, num_val=6, num_test=6, image_size=64, seed=3)
SPLIT_FOLDERS = {"Train_Folder": "Train", "Val_Folder": "Val", "Test_Folder": "Test"}
COUNT_WORDS = {"one": 1, "two": 2, "three": 3}
# "middle left" must match before the bare centre name "middle".
LOCATION_PATTERN = re.compile(r"\b(?:(upper|middle|lower) (left|center|right)|middle)\b")
ROWS = ("upper", "middle", "lower")
COLUMNS = ("left", "center", "right")


def parse_report(report):
    """(count, cells in order of mention) read independently of the generator's templates."""
    text = report.lower()
    counts = [COUNT_WORDS[w] for w in re.findall(r"\b(one|two|three)\b", text)]
    cells = []
    for match in LOCATION_PATTERN.finditer(text):
        if match.group(1) is None:
            cells.append((1, 1))
        else:
            cells.append((ROWS.index(match.group(1)), COLUMNS.index(match.group(2))))
    return counts, cells


def cell_edges(size):
    return np.round(np.linspace(0, size, 4)).astype(int)


def cells_touched(component, size):
    edges = cell_edges(size)
    return {
        (row, col)
        for row in range(3)
        for col in range(3)
        if component[edges[row] : edges[row + 1], edges[col] : edges[col + 1]].any()
    }


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def tree_files(root):
    return sorted(p.relative_to(root) for p in pathlib.Path(root).rglob("*") if p.is_file())


def assert_same_tree(first, second):
    first_files, second_files = tree_files(first), tree_files(second)
    assert first_files == second_files
    for relative in first_files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), **SMALL)


def test_grid_names():
    assert location_phrase(0, 0) == "upper left"
    assert location_phrase(0, 1) == "upper center"
    assert location_phrase(1, 0) == "middle left"
    assert location_phrase(1, 1) == "middle"
    assert location_phrase(1, 2) == "middle right"
    assert location_phrase(2, 1) == "lower center"
    assert location_phrase(2, 2) == "lower right"
    assert len({name for row in GRID_NAMES for name in row}) == 9
    with pytest.raises(ValueError):
        location_phrase(3, 0)


def test_describe_states_count_and_all_locations_in_reading_order():
    rng = np.random.default_rng(0)
    all_cells = [(r, c) for r in range(3) for c in range(3)]
    seen_reports = set()
    for count in (1, 2, 3):
        for cells in itertools.combinations(all_cells, count):
            shuffled = list(cells)[::-1]
            for _ in range(3):
                report = describe(shuffled, rng)
                seen_reports.add(report.split(" ")[0])
                counts, mentioned = parse_report(report)
                assert counts == [count], report
                assert mentioned == sorted(cells), report
                assert report.endswith(".")
    assert len(seen_reports) > 1, "phrasing should vary"
    with pytest.raises(ValueError):
        describe([(0, 0), (0, 0)], rng)


def test_layout_and_csv(dataset):
    marker = json.loads((dataset / "synthetic.json").read_text())
    assert marker["seed"] == SMALL["seed"] and marker["image_size"] == SMALL["image_size"]
    assert "format_version" in marker
    expected_counts = {"Train_Folder": 12, "Val_Folder": 6, "Test_Folder": 6}
    for folder, stem in SPLIT_FOLDERS.items():
        split_dir = dataset / folder
        rows = read_csv(split_dir / f"{stem}_text.csv")
        assert rows[0] == ["Image", "Description"]
        assert all(len(row) == 2 for row in rows)
        names = [row[0] for row in rows[1:]]
        images = sorted(p.name for p in (split_dir / "img").iterdir())
        masks = sorted(p.name for p in (split_dir / "labelcol").iterdir())
        assert len(images) == expected_counts[folder]
        assert sorted(names) == images == masks
        assert len(set(names)) == len(names)
        assert all(re.fullmatch(r"syn_\d{5}\.png", name) for name in names)
        for name in images[:3]:
            with Image.open(split_dir / "img" / name) as image:
                assert image.mode == "RGB" and image.size == (64, 64)
            with Image.open(split_dir / "labelcol" / name) as mask:
                assert mask.mode == "L" and mask.size == (64, 64)


def test_masks_binary_and_reports_match_components(dataset):
    for folder, stem in SPLIT_FOLDERS.items():
        split_dir = dataset / folder
        for name, report in read_csv(split_dir / f"{stem}_text.csv")[1:]:
            mask = np.asarray(Image.open(split_dir / "labelcol" / name))
            assert set(np.unique(mask)) == {0, 255}, name
            labels, num_components = ndimage.label(mask > 0)
            component_cells = [cells_touched(labels == k, mask.shape[0]) for k in range(1, num_components + 1)]
            # One component per lesion, each inside a single grid cell, one lesion per cell.
            assert all(len(cells) == 1 for cells in component_cells), name
            lesion_cells = sorted(next(iter(cells)) for cells in component_cells)
            assert len(set(lesion_cells)) == num_components
            counts, mentioned = parse_report(report)
            assert counts == [num_components], report
            assert mentioned == lesion_cells, report


def test_files_match_render_sample(dataset):
    sample = render_sample(SMALL["seed"], "val", 2, SMALL["image_size"])
    image = np.asarray(Image.open(dataset / "Val_Folder" / "img" / "syn_00002.png"))
    mask = np.asarray(Image.open(dataset / "Val_Folder" / "labelcol" / "syn_00002.png"))
    np.testing.assert_array_equal(image, sample.image)
    np.testing.assert_array_equal(mask, sample.mask)
    assert read_csv(dataset / "Val_Folder" / "Val_text.csv")[3] == ["syn_00002.png", sample.report]


def test_distractors_present_and_lesion_like():
    size = 96
    edges = cell_edges(size)
    lesion_peaks, distractor_peaks = [], []
    for index in range(30):
        sample = render_sample(0, "train", index, size)
        assert 1 <= len(sample.lesion_cells) <= 3
        assert 1 <= len(sample.distractor_cells) <= 2
        assert not set(sample.lesion_cells) & set(sample.distractor_cells)
        deviation = np.abs(sample.image.astype(int) - sample.background.astype(int)).max(axis=-1)
        for row in range(3):
            for col in range(3):
                cell = deviation[edges[row] : edges[row + 1], edges[col] : edges[col + 1]]
                if (row, col) in sample.distractor_cells:
                    distractor_peaks.append(cell.max())
                elif (row, col) in sample.lesion_cells:
                    lesion_peaks.append(cell.max())
                else:
                    assert cell.max() == 0, (index, row, col)
        # Distractors alter the image outside the mask.
        assert deviation[sample.mask == 0].max() >= 8
    assert min(distractor_peaks) >= 8
    # Similar brightness change: vision cannot separate them by contrast alone.
    ratio = np.median(distractor_peaks) / np.median(lesion_peaks)
    assert 0.6 < ratio < 1.6, ratio


def test_lesions_carry_the_diagonal_stripes_and_distractors_do_not():
    """What tells a lesion from a distractor (module docstring): lesions have fine stripes near 45 degrees,
    which change the image along the diagonal (x + 1, y + 1) and hardly along the anti-diagonal; distractors
    are blotchy or striped the mirrored way. Measured on the blobs alone (image minus background) inside
    their eroded footprints, pooled over 12 samples: the diagonal differences' energy over the anti-diagonal
    ones is well above 1 for lesions (4.6 as written) and below 1 for distractors (0.46)."""
    def diagonal_ratio(samples, footprint):
        diagonal, anti_diagonal = [], []
        for sample in samples:
            blobs = sample.image.astype(np.float64).mean(-1) - sample.background.astype(np.float64).mean(-1)
            inside = ndimage.binary_erosion(footprint(sample) > 0, iterations=3)
            core = inside[1:, 1:] & inside[:-1, :-1] & inside[1:, :-1] & inside[:-1, 1:]
            diagonal.append((blobs[1:, 1:] - blobs[:-1, :-1])[core])
            anti_diagonal.append((blobs[1:, :-1] - blobs[:-1, 1:])[core])
        return np.mean(np.concatenate(diagonal) ** 2) / np.mean(np.concatenate(anti_diagonal) ** 2)

    samples = [render_sample(0, "train", index, 128) for index in range(12)]
    assert diagonal_ratio(samples, lambda sample: sample.mask) > 2.5
    assert diagonal_ratio(samples, lambda sample: sample.distractor_mask) < 1.0


def test_deterministic_and_seed_dependent(dataset, tmp_path):
    again = write_synthetic_dataset(tmp_path / "again", **SMALL)
    assert_same_tree(dataset, again)
    other_seed = write_synthetic_dataset(tmp_path / "other", **{**SMALL, "seed": SMALL["seed"] + 1})
    name = "Train_Folder/img/syn_00000.png"
    assert (dataset / name).read_bytes() != (other_seed / name).read_bytes()


def test_val_and_test_independent_of_num_train(dataset, tmp_path):
    fewer_train = write_synthetic_dataset(tmp_path / "fewer", **{**SMALL, "num_train": 4})
    for folder in ("Val_Folder", "Test_Folder"):
        assert_same_tree(dataset / folder, fewer_train / folder)
    # Shared train indices are unchanged too.
    match, mismatch, errors = filecmp.cmpfiles(
        dataset / "Train_Folder" / "img",
        fewer_train / "Train_Folder" / "img",
        [f"syn_{i:05d}.png" for i in range(4)],
        shallow=False,
    )
    assert len(match) == 4 and not mismatch and not errors


def test_marker_skip_and_regeneration(tmp_path):
    params = dict(num_train=3, num_val=2, num_test=2, image_size=64, seed=1)
    root = write_synthetic_dataset(tmp_path, **params)
    image = root / "Train_Folder" / "img" / "syn_00000.png"
    original = image.read_bytes()

    # Same parameters: nothing is rewritten, so a tampered file stays tampered.
    image.write_bytes(b"tampered")
    write_synthetic_dataset(tmp_path, **params)
    assert image.read_bytes() == b"tampered"

    # No marker (as after a killed run): regenerated.
    (root / "synthetic.json").unlink()
    write_synthetic_dataset(tmp_path, **params)
    assert image.read_bytes() == original
    assert (root / "synthetic.json").is_file()

    # Marker present but a file missing: regenerated.
    (root / "Val_Folder" / "labelcol" / "syn_00001.png").unlink()
    write_synthetic_dataset(tmp_path, **params)
    assert (root / "Val_Folder" / "labelcol" / "syn_00001.png").is_file()

    # Different parameters over a complete set (another run's data): refused, the set left as it is.
    with pytest.raises(FileExistsError, match=r"holds complete synthetic data of other settings \(num_train 3 -> 2\)"):
        write_synthetic_dataset(tmp_path, **{**params, "num_train": 2})
    assert len(read_csv(root / "Train_Folder" / "Train_text.csv")) == 4
    # Over an incomplete one (a killed run's): regenerated without stale files.
    (root / "synthetic.json").unlink()
    write_synthetic_dataset(tmp_path, **{**params, "num_train": 2})
    assert sorted(p.name for p in (root / "Train_Folder" / "img").iterdir()) == ["syn_00000.png", "syn_00001.png"]
    assert len(read_csv(root / "Train_Folder" / "Train_text.csv")) == 3
    assert json.loads((root / "synthetic.json").read_text())["num_train"] == 2


def test_refuses_to_overwrite_foreign_files(tmp_path):
    foreign = tmp_path / "Train_Folder" / "img" / "patient_001.png"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"real data")
    with pytest.raises(FileExistsError):
        write_synthetic_dataset(tmp_path, num_train=1, num_val=1, num_test=1, image_size=64)
    assert foreign.read_bytes() == b"real data"


def test_main_writes_dataset(tmp_path, capsys):
    main(["--root", str(tmp_path), "--num_train", "2", "--num_val", "1", "--num_test", "1", "--image_size", "64"])
    assert len(list((tmp_path / "Train_Folder" / "img").iterdir())) == 2
    assert json.loads((tmp_path / "synthetic.json").read_text())["num_val"] == 1
    assert str(tmp_path) in capsys.readouterr().out


def test_rejects_too_small_images(tmp_path):
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path, image_size=synthetic.MIN_IMAGE_SIZE - 1)


def test_distractor_masks_lie_in_the_distractor_cells_and_the_pixel_tool_counts_them():
    import importlib.util

    sample = synthetic.render_sample(0, "val", 3, 96)
    edges = synthetic._cell_edges(96)
    cells = {(int(np.searchsorted(edges, y, side="right")) - 1, int(np.searchsorted(edges, x, side="right")) - 1)
             for y, x in np.argwhere(sample.distractor_mask > 0)}
    assert cells == set(sample.distractor_cells)
    assert not np.any((sample.distractor_mask > 0) & (sample.mask > 0))
    assert set(np.unique(sample.distractor_mask)) == {0, 255}
    assert synthetic.file_index(synthetic.file_name(12)) == 12 and synthetic.file_index("syn_00007.png") == 7

    spec = importlib.util.spec_from_file_location(
        "synthetic_pixels_tool", pathlib.Path(__file__).resolve().parent.parent / "tools" / "synthetic_pixels.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    lesion = np.zeros((1, 4, 4), bool); lesion[0, 0] = True  # 4 lesion pixels
    distractor = np.zeros((1, 4, 4), bool); distractor[0, 3, :2] = True  # 2 distractor pixels
    predicted = np.zeros((1, 4, 4), bool); predicted[0, 0, :3] = True; predicted[0, 3, 0] = True; predicted[0, 1, 1] = True
    assert tool.marked_fractions(predicted, lesion, distractor) == pytest.approx(
        {"lesion": 0.75, "distractor": 0.5, "other": 0.1})


def test_the_pixel_tool_takes_the_runs_recorded_fields_and_refuses_other_data(tmp_path, monkeypatch):
    from amvlm_jax.config import ConfigError
    from amvlm_jax.train import checkpoint
    from conftest import repo_module, tiny_synthetic_config

    tool = repo_module("tools/synthetic_pixels.py")
    command = tiny_synthetic_config()  # What the tool's command gives with no model or data flags.
    recorded = tiny_synthetic_config(**{"unet.base_width": command.unet.base_width * 2}).to_dict()
    monkeypatch.setattr(checkpoint, "read_meta", lambda path: {"job": "supervised", "config": recorded})
    assert tool.run_config(command, tmp_path).unet.base_width == 2 * command.unet.base_width
    # A MoNuSeg run's U-Net has the same shapes, so its checkpoint restores: the tool must refuse before.
    recorded["data"] |= {"name": "monuseg", "root": str(tmp_path / "MoNuSeg")}
    with pytest.raises(ConfigError, match=f"^{tmp_path}: a run on data.name='monuseg'; tools/synthetic_pixels.py needs"):
        tool.run_config(command, tmp_path)
    monkeypatch.setattr(checkpoint, "read_meta", lambda path: {"job": "pretrain", "config": recorded})
    with pytest.raises(ConfigError, match="a pre-training checkpoint has no U-Net"):
        tool.run_config(command, tmp_path)


def test_reports_read_as_english_for_one_lesion_and_for_several():
    """Every phrasing the generator draws, written out by hand: a singular noun and verb for one lesion, and
    two or three places joined by a comma and 'and'."""
    one = {"One lesion in the lower left.", "One faint lesion in the lower left.", "One lesion is seen: lower left.",
           "There is one lesion, in the lower left.", "Findings: one lesion located in the lower left."}
    places = "upper right, middle and lower center"
    three = {f"Three lesions in the {places}.", f"Three faint lesions in the {places}.",
             f"Three lesions are seen: {places}.", f"There are three lesions, in the {places}.",
             f"Findings: three lesions located in the {places}."}
    rng = np.random.default_rng(0)
    assert {describe([(2, 0)], rng) for _ in range(60)} == one
    assert {describe([(2, 1), (0, 2), (1, 1)], rng) for _ in range(60)} == three
    assert describe([(1, 0), (0, 0)], rng).endswith("upper left and middle left.")
    assert describe([], rng) == "No lesion is seen."


def test_the_splits_hold_different_images():
    # Sample i of train, val and test come from separate draws: no evaluation image is a training image.
    for index in range(3):
        images = [render_sample(0, split, index, 64).image for split in ("train", "val", "test")]
        assert not any(np.array_equal(a, b) for a, b in itertools.combinations(images, 2)), index


def test_blobs_leave_the_cell_borders_alone():
    """Each blob and its soft edge stay inside its cell: on the two pixel lines along every border between
    cells the image is its background to within one grey level (a blob cut off at a border would leave a
    seam of up to about 20 levels there)."""
    for size in (64, 96):
        edges = cell_edges(size)
        border = np.zeros((size, size), bool)
        for edge in edges[1:-1]:
            border[edge - 1 : edge + 1, :] = border[:, edge - 1 : edge + 1] = True
        for index in range(25):
            sample = render_sample(1, "train", index, size)
            change = np.abs(sample.image.astype(int) - sample.background.astype(int)).max(axis=-1)
            assert change[border].max() <= 1, (size, index)


def test_an_incomplete_or_unreadable_set_is_written_again(tmp_path):
    """What the marker and files_complete treat as not the complete set, each regenerated by the next write
    (rather than used, or a traceback): a missing report sheet, an extra image, a marker that is no JSON
    object, and a marker from an older format (its settings the same: regenerated, not refused as another
    run's data)."""
    params = dict(num_train=2, num_val=1, num_test=1, image_size=64, seed=2)
    root = write_synthetic_dataset(tmp_path, **params)
    sheet, marker = root / "Val_Folder" / "Val_text.csv", root / synthetic.MARKER_NAME
    expected = sheet.read_bytes()
    sheet.unlink()
    write_synthetic_dataset(tmp_path, **params)
    assert sheet.read_bytes() == expected
    extra = root / "Train_Folder" / "img" / synthetic.file_name(7)
    extra.write_bytes((root / "Train_Folder" / "img" / synthetic.file_name(0)).read_bytes())
    write_synthetic_dataset(tmp_path, **params)
    assert not extra.exists()
    marker.write_text("[1, 2]")
    write_synthetic_dataset(tmp_path, **params)
    assert json.loads(marker.read_text())["num_train"] == 2
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format_version": synthetic.FORMAT_VERSION - 1}))
    sheet.write_text("stale")
    write_synthetic_dataset(tmp_path, **params)
    assert sheet.read_bytes() == expected and json.loads(marker.read_text())["format_version"] == synthetic.FORMAT_VERSION


def test_a_write_killed_before_it_completes_leaves_no_marker(tmp_path, monkeypatch):
    """A regeneration killed just before it commits its marker (its last sheet perhaps cut short) must not
    leave the previous marker behind: with the same settings, the next write would take the set as complete."""
    params = dict(num_train=1, num_val=1, num_test=1, image_size=64, seed=0)
    root = write_synthetic_dataset(tmp_path, **params)
    (root / "Val_Folder" / "img" / synthetic.file_name(0)).unlink()  # Incomplete: the next write regenerates.

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(tmp_path, **params)
    monkeypatch.undo()
    sheet = root / "Test_Folder" / "Test_text.csv"
    sheet.write_text("Image,Description\n")  # Cut short by the kill.
    write_synthetic_dataset(tmp_path, **params)
    assert len(read_csv(sheet)) == 2


def test_bad_sizes_seed_and_file_numbers(tmp_path):
    from amvlm_jax.config import ConfigError
    from amvlm_jax.data import datasets

    from conftest import tiny_synthetic_config

    with pytest.raises(ValueError, match="^sizes and seed must be non-negative"):
        write_synthetic_dataset(tmp_path / "negative", num_train=1, num_val=1, num_test=1, image_size=64, seed=-1)
    assert not (tmp_path / "negative").exists()
    # The smallest size the generator refuses is a config error naming the field, not the generator's ValueError.
    config = tiny_synthetic_config(**{"data.image_size": synthetic.MIN_IMAGE_SIZE - 1, "data.root": str(tmp_path / "d")})
    with pytest.raises(ConfigError, match=r"^config\.data\.image_size must be >= 64"):
        datasets.data_root(config, tmp_path)
    assert synthetic.file_name(12345) == "syn_12345.png" and synthetic.file_index("syn_12345.png") == 12345


def test_a_process_other_than_0_checks_the_data_process_0_wrote(tmp_path, monkeypatch):
    """In a multi-process run process 1 writes nothing; after the barrier it takes the root only if the marker
    records this config's settings and every file is there, else one line names the root (data.root on a file
    system the processes do not share)."""
    import jax
    from jax.experimental import multihost_utils

    from amvlm_jax.data import datasets
    from amvlm_jax.data.folders import DataError

    from conftest import tiny_synthetic_config

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
    root = tmp_path / "data"
    config = tiny_synthetic_config(**{"data.root": str(root), "data.synthetic.num_train": 2,
                                      "data.synthetic.num_val": 1, "data.synthetic.num_test": 1})

    def refused():
        with pytest.raises(DataError, match=f"^{root}: the synthetic data is missing or incomplete after process 0"):
            datasets.data_root(config, tmp_path)

    refused()  # Nothing there, and process 1 wrote nothing.
    assert not root.exists()
    write_synthetic_dataset(root, num_train=2, num_val=1, num_test=1, image_size=64, seed=config.data.synthetic.seed)
    assert datasets.data_root(config, tmp_path) == root
    config.data.synthetic.num_train = 3  # Complete data, but of other settings.
    refused()
    config.data.synthetic.num_train = 2
    (root / "Test_Folder" / "img" / synthetic.file_name(0)).unlink()
    refused()
