"""The MedPix-2.0 experiment on the real corpus (skipped without it): the data docs/results.md's numbers rest on."""

import collections

import numpy as np
import pytest

from amvlm_jax.data import corpus

from conftest import experiment_module

ROWS = {"train": 1653, "val": 197, "test": 200}  # The corpus's own train / dev / test files.


@pytest.fixture(scope="module")
def medpix_rows(medpix):
    module = experiment_module("medpix")
    config = module.get_config("cpu,locked_text")
    config.data.root = str(medpix)
    config.eval.probe_fields = (*config.eval.probe_fields, "U_id")  # The case id, read as one more label.
    return module, config, {split: corpus.read_split(config, split) for split in ROWS}


def test_every_row_has_its_image_a_report_and_a_label_the_zero_shot_prompts_cover(medpix_rows):
    module, _, rows = medpix_rows
    assert {split: len(split_rows["paths"]) for split, split_rows in rows.items()} == ROWS
    for split, split_rows in rows.items():
        assert split_rows["skipped"] == 0 and all(report.strip() for report in split_rows["reports"])
        for field, prompts in module.ZERO_SHOT.items():  # Every class present, none without a prompt.
            assert set(split_rows["labels"][field]) == set(prompts), (split, field)


def test_held_out_splits_share_no_case_with_training_and_repeat_captions_as_documented(medpix_rows):
    _, _, rows = medpix_rows
    cases = {split: set(split_rows["labels"]["U_id"]) for split, split_rows in rows.items()}
    assert not (cases["train"] & cases["val"] or cases["train"] & cases["test"] or cases["val"] & cases["test"])
    # Retrieval ranks distinct reports: 128 captions for the 200 test images, up to 12 images each.
    copies = collections.Counter(rows["test"]["reports"])
    assert (len(copies), max(copies.values())) == (128, 12)


def test_the_test_split_decodes_at_the_variants_size(medpix_rows):
    _, config, rows = medpix_rows
    split, labels, _ = corpus.load(config, "test", config.pretrain.image_size)
    assert split.images.shape == (200, 96, 96, 3) and split.images.dtype == np.uint8
    assert split.reports == rows["test"]["reports"] and labels["Type"] == rows["test"]["labels"]["Type"]
    assert 20 < split.images.mean() < 200 and split.images.std(axis=(1, 2, 3)).min() > 5  # No blank image.
