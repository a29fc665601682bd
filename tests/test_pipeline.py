"""Augmentation, splits and the grain training stream."""

import numpy as np
import pytest

from amvlm_jax.data import pipeline, splits
from amvlm_jax.data.folders import SplitArrays


def _split(n=10, size=8):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    masks = (images[..., 0] > 128).astype(np.uint8)  # Mask tied to the image so transforms can be checked.
    return SplitArrays([f"x{i}" for i in range(n)], images, masks, [f"report {i}" for i in range(n)])


def test_augment_applies_one_transform_to_image_and_mask():
    split = _split()
    seen = set()
    for seed in range(60):
        image, mask = pipeline.augment([split.images[0], split.masks[0]], np.random.default_rng(seed))
        assert image.shape == split.images[0].shape and mask.shape == split.masks[0].shape
        # Nearest-neighbour transforms move pixels without mixing them: the mask still follows the image.
        np.testing.assert_array_equal(mask.astype(bool), image[..., 0] > 128)
        seen.add(image.tobytes())
    assert len(seen) > 8  # rot90/flip combinations, rotations and the identity all occur.


def test_augment_rot_flip_is_a_dihedral_transform():
    square = np.arange(16).reshape(4, 4)
    dihedral = {np.ascontiguousarray(np.flip(np.rot90(square, k), axis=a)).tobytes() for k in range(4) for a in range(2)}
    outputs = [pipeline.augment([square], np.random.default_rng(s))[0] for s in range(200)]
    kinds = {o.tobytes() for o in outputs}
    assert len(dihedral) == 4 and dihedral <= kinds  # A rotation then a flip is one of the square's 4 reflections.
    assert square.tobytes() in kinds


def test_augment_draws_follow_the_spec_probabilities():
    """Exact counts of each transform over many draws, told apart by comparing with references built from
    SPEC 1's wording: each of the 4 reflections 1/8 (a rot90 then a flip), each integer angle in [-20, 20)
    1/160, the identity the remaining 1/4 (+ the angle 0); a plain rot90 never."""
    from scipy import ndimage, stats

    image = np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)
    references = {"identity": image, "flip rows": image[::-1], "flip columns": image[:, ::-1],
                  "transpose": image.T, "anti-transpose": image.T[::-1, ::-1]}
    references |= {f"rot90 k={k}": np.rot90(image, k) for k in (1, 2, 3)}
    references |= {f"angle {a}": ndimage.rotate(image, a, reshape=False, order=0) for a in range(-20, 21) if a}
    names = {r.tobytes(): name for name, r in references.items()}
    assert len(names) == len(references)  # Every transform gives a different image.
    draws = 3200
    counts = dict.fromkeys(references, 0)
    for seed in range(draws):
        counts[names[pipeline.augment([image], np.random.default_rng([11, seed]))[0].tobytes()]] += 1
    assert counts["angle 20"] == counts["rot90 k=1"] == counts["rot90 k=2"] == counts["rot90 k=3"] == 0
    expected = {"identity": 0.25 + 0.25 / 40} | {f"angle {a}": 0.25 / 40 for a in range(-20, 20) if a}
    expected |= {name: 0.125 for name in ("flip rows", "flip columns", "transpose", "anti-transpose")}
    observed = [counts[name] for name in expected]
    assert sum(observed) == draws
    assert stats.chisquare(observed, [draws * p for p in expected.values()]).pvalue > 1e-3


def test_random_resized_crop_resizes_a_box_of_the_image_back():
    height, width = 40, 60
    columns = np.broadcast_to(np.arange(width, dtype=np.uint8)[None, :, None] * 4, (height, width, 3)).copy()
    # The whole image at its own aspect is the identity.
    whole = pipeline.random_resized_crop(columns, np.random.default_rng(0), scale=(1, 1), ratio=(1.5, 1.5))
    np.testing.assert_array_equal(whole, columns)
    areas = []
    for seed in range(50):
        crop = pipeline.random_resized_crop(columns, np.random.default_rng(seed))
        assert crop.shape == columns.shape and crop.dtype == np.uint8
        assert np.all(crop == crop[:1])  # Rows stay alike: a box of the image, not a warp.
        row = crop[0, :, 0].astype(int)
        assert np.all(np.diff(row) >= 0)  # Columns keep their order and are only stretched.
        # The box's width from the values at its ends (4 per column): between 50% x 3/4 and the whole width.
        areas.append((row[-1] - row[0]) / 4 + 1)
    assert min(areas) >= 0.5 * width * np.sqrt(3 / 4) * 0.9 - 2 and max(areas) <= width
    assert max(areas) - min(areas) > 10  # Box sizes vary.
    with pytest.raises(ValueError, match="'crop' without masks"):
        pipeline.training_batches(_split(), 4, seed=0, augmentation="crop")


def test_random_resized_crop_boxes_follow_their_scale_ratio_and_place():
    """The box read back from the crop of an image whose channels hold each pixel's column, row and a 0/255
    column stripe: with scale (0.2, 0.3), never clipped on a square, its area is that fraction of the image,
    log(width / height) is uniform on [log 3/4, log 4/3] (a uniform aspect would put 43% below 0, not 50%),
    it lies anywhere in the image (left / (W - width) spread over [0, 1]), and the stripes come back blended
    (bilinear, not nearest). With the default scale (0.5, 1) the area stays in [0.5, 1]."""
    from scipy import stats

    size = 120
    columns = np.broadcast_to(np.arange(size)[None, :], (size, size))
    image = np.stack([columns, columns.T, columns % 2 * 255], axis=-1).astype(np.uint8)

    def box(crop):  # Bilinear sample j of a box [left, left + w) sits at left + (j + 0.5) w / S - 0.5: within 1 px.
        crop = crop.astype(float)
        width, height = ((crop[0, -1, 0] - crop[0, 0, 0]) * size / (size - 1),
                         (crop[-1, 0, 1] - crop[0, 0, 1]) * size / (size - 1))
        return width, height, crop[0, 0, 0] + 0.5 - 0.5 * width / size

    boxes, blended = [], False
    for seed in range(1200):
        crop = pipeline.random_resized_crop(image, np.random.default_rng(seed), scale=(0.2, 0.3))
        boxes.append(box(crop))
        blended |= bool(np.any((crop[..., 2] > 30) & (crop[..., 2] < 225)))
    width, height, left = np.array(boxes).T
    area = width * height / size**2
    assert 0.2 - 0.02 < area.min() and area.max() < 0.3 + 0.02 and abs(area.mean() - 0.25) < 0.005
    log_aspect = np.log(width / height)
    assert np.log(3 / 4) - 0.04 < log_aspect.min() and log_aspect.max() < np.log(4 / 3) + 0.04
    assert stats.kstest(log_aspect, stats.uniform(np.log(3 / 4), np.log(16 / 9)).cdf).pvalue > 1e-3
    place = left / (size - width)
    assert place.min() < 0.05 and place.max() > 0.95 and abs(place.mean() - 0.5) < 0.05
    assert blended
    defaults = [box(pipeline.random_resized_crop(image, np.random.default_rng(seed))) for seed in range(200)]
    default_area = np.array([w * h for w, h, _ in defaults]) / size**2
    assert default_area.min() > 0.5 - 0.02 and default_area.max() <= 1.0


def test_crop_stream_is_deterministic_and_changes_the_images():
    split = _split(n=8, size=16)
    first = _take(pipeline.training_batches(split, 4, seed=7, with_mask=False, augmentation="crop"), 2)
    again = _take(pipeline.training_batches(split, 4, seed=7, start_step=1, with_mask=False, augmentation="crop"), 1)
    np.testing.assert_array_equal(first[1]["image"], again[0]["image"])
    assert not np.array_equal(first[0]["image"], split.images[first[0]["index"]])


def test_labeled_indices_are_seeded_and_sized():
    picked = splits.labeled_indices(24, 0.25, seed=3)
    assert len(picked) == 6 and np.all(np.diff(picked) > 0)
    np.testing.assert_array_equal(picked, splits.labeled_indices(24, 0.25, seed=3))
    assert not np.array_equal(picked, splits.labeled_indices(24, 0.25, seed=4))
    assert len(splits.labeled_indices(30, 0.1, seed=0)) == 3
    assert len(splits.labeled_indices(30, 0.01, seed=0)) == 1  # ceil(0.3)
    # Fractional counts round up (SPEC 1: ceil(f N)), also where rounding to nearest would go down.
    # And products that float arithmetic puts just above a whole number (0.07 * 100 = 7.000000000000001) stay
    # that number; a fraction too small for one image still labels one.
    for n, fraction, count in ((9, 0.25, 3), (10, 0.25, 3), (101, 0.1, 11), (230, 0.01, 3), (100, 0.07, 7),
                               (10, 1e-12, 1), (5, 1.0, 5)):
        assert len(splits.labeled_indices(n, fraction, seed=0)) == count, (n, fraction)
    assert set(splits.unlabeled_indices(24, 0.25, 3)) == set(range(24)) - set(picked)
    for fraction in (0.0, True):  # True is no fraction, though Python takes it for 1.
        with pytest.raises(ValueError, match="labeled_fraction must be a number in"):
            splits.labeled_indices(10, fraction, 0)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_training_stream_covers_each_epoch_once_and_resumes():
    split = _split(n=10)
    batches = _take(pipeline.training_batches(split, 5, seed=1, augmentation="none"), 6)
    epoch0 = np.concatenate([b["index"] for b in batches[:2]])
    epoch1 = np.concatenate([b["index"] for b in batches[2:4]])
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert not np.array_equal(epoch0, epoch1)  # Reshuffled every epoch.
    for b in batches:
        np.testing.assert_array_equal(b["image"], split.images[b["index"]])
    resumed = _take(pipeline.training_batches(split, 5, seed=1, start_step=3, augmentation="none"), 3)
    for a, b in zip(batches[3:], resumed):
        np.testing.assert_array_equal(a["index"], b["index"])


def test_a_batch_of_one_and_one_row_per_process_stream_each_epoch_once():
    # An endless stream batched by 1 has a length grain cannot hold unless the (never reached) remainder is dropped.
    split = _split(n=4)
    single = _take(pipeline.training_batches(split, 1, seed=3, augmentation="none", start_step=2), 6)
    assert all(len(b["index"]) == 1 for b in single)
    shards = [_take(pipeline.training_batches(split, 2, seed=3, augmentation="none", process_index=p, process_count=2), 4)
              for p in range(2)]
    epoch = np.concatenate([shards[p][step]["index"] for step in range(2) for p in range(2)])
    assert sorted(epoch) == list(range(4))
    fresh = pipeline.fresh_synthetic_batches(0, 64, 32, 1, start_step=1)
    assert next(fresh)["image"].shape == (1, 32, 32, 3)


def test_augmented_stream_is_deterministic():
    split = _split()
    a = _take(pipeline.training_batches(split, 4, seed=7), 3)
    b = _take(pipeline.training_batches(split, 4, seed=7, start_step=0), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["mask"], y["mask"])


def test_training_stream_moves_each_mask_with_its_image_and_draws_anew_every_epoch():
    """With 'spec' augmentation every streamed (image, mask) pair is one SPEC 1 transform of the stored pair
    (a rotation then a flip, an integer angle in [-20, 20) or none), the mask the same transform of the mask
    (it still marks image[..., 0] > 128); and an example's transform is drawn again each epoch, not once."""
    from scipy import ndimage

    split = _split(n=6)

    def transforms(a):
        yield from (np.flip(np.rot90(a, k), axis) for k in range(4) for axis in range(2))
        yield from (ndimage.rotate(a, angle, reshape=False, order=0) for angle in range(-20, 20))

    versions = {i: set() for i in range(6)}
    for batch in _take(pipeline.training_batches(split, 3, seed=5), 8):  # 4 epochs.
        np.testing.assert_array_equal(batch["mask"].astype(bool), batch["image"][..., 0] > 128)
        for image, mask, index in zip(batch["image"], batch["mask"], batch["index"]):
            assert any(np.array_equal(image, t) for t in transforms(split.images[index]))
            assert any(np.array_equal(mask, t) for t in transforms(split.masks[index]))
            versions[int(index)].add(image.tobytes())
    assert sum(len(v) > 1 for v in versions.values()) >= 5


def test_a_batch_size_the_processes_cannot_share_is_refused():
    for stream in (lambda: pipeline.training_batches(_split(), 6, seed=0, process_index=0, process_count=4),
                   lambda: pipeline.fresh_synthetic_batches(0, 64, 64, 6, process_index=1, process_count=4)):
        with pytest.raises(ValueError, match="^batch size 6 is not divisible by the 4 processes$"):
            stream()


def test_process_shards_partition_each_global_batch():
    split = _split(n=12)
    single = _take(pipeline.training_batches(split, 6, seed=2, process_index=0, process_count=1), 4)
    shards = [_take(pipeline.training_batches(split, 6, seed=2, process_index=p, process_count=3), 4) for p in range(3)]
    for step in range(4):
        local = [shards[p][step] for p in range(3)]
        assert all(len(b["index"]) == 2 for b in local)
        merged = np.concatenate([b["index"] for b in local])
        assert sorted(merged) == sorted(single[step]["index"])
        # Same examples get the same augmentation whichever process reads them.
        for b in local:
            for row, index in enumerate(b["index"]):
                match = np.flatnonzero(single[step]["index"] == index)[0]
                np.testing.assert_array_equal(b["image"][row], single[step]["image"][match])


def test_evaluation_batches_pad_and_count():
    split = _split(n=7)
    batches = list(pipeline.evaluation_batches(split, 3))
    assert [real for _, real in batches] == [3, 3, 1]
    assert all(b["image"].shape[0] == 3 for b, _ in batches)
    np.testing.assert_array_equal(batches[-1][0]["index"], [6, 6, 6])
    for batch, _ in batches:  # Padding rows repeat the last real row's mask too.
        np.testing.assert_array_equal(batch["mask"], split.masks[batch["index"]])
    # Padded only to a multiple of 2 (devices): the last batch [6, 6], not three copies.
    batches = list(pipeline.evaluation_batches(split, 4, pad_multiple=2))
    assert [(b["index"].tolist(), real) for b, real in batches] == [([0, 1, 2, 3], 4), ([4, 5, 6, 6], 3)]
    batches = list(pipeline.evaluation_batches(_split(n=5), 4, pad_multiple=2))
    assert [(b["index"].tolist(), real) for b, real in batches] == [([0, 1, 2, 3], 4), ([4, 4], 1)]


def test_fresh_synthetic_pairs_never_repeat_resume_by_step_and_split_over_processes():
    from PIL import Image

    from amvlm_jax.data import synthetic

    def batches(start_step, process_index=0, process_count=1, steps=2):
        stream = pipeline.fresh_synthetic_batches(3, 64, 32, 4, start_step=start_step,
                                                  process_index=process_index, process_count=process_count)
        return [next(stream) for _ in range(steps)]

    first, second = batches(0)
    # Batch s holds generator samples 4s .. 4s + 3, resized as a folder image would be.
    for offset, batch in ((0, first), (4, second)):
        for row in range(4):
            sample = synthetic.render_sample(3, "train", offset + row, 64)
            expected = np.asarray(Image.fromarray(sample.image).resize((32, 32), Image.BICUBIC))
            np.testing.assert_array_equal(batch["image"][row], expected)
            assert batch["report"][row] == sample.report
    assert not np.array_equal(first["image"], second["image"])
    # Resuming at step 1 reads what the uninterrupted stream read at step 1.
    resumed = batches(1, steps=1)[0]
    np.testing.assert_array_equal(resumed["image"], second["image"])
    # Two processes' shares together are the single-process batch.
    shares = [batches(1, process_index=p, process_count=2, steps=1)[0] for p in range(2)]
    merged = np.empty_like(second["image"])
    merged[0::2], merged[1::2] = shares[0]["image"], shares[1]["image"]
    np.testing.assert_array_equal(merged, second["image"])


def test_report_tokenizer_lower_cases_by_default_and_names_what_it_cannot_use(tmp_path):
    """ReportTokenizer from a vocab.txt folder: a tokenizer_config.json without do_lower_case lower-cases, as
    BERT's default does ('Left' becomes 'left', id 5); a vocabulary without [PAD], a tokenizer_config.json that
    is no JSON object, a max_length without room for [CLS] and [SEP] and one string for a list are one-line
    errors, not a silently wrong batch (one string would be tokenised letter by letter)."""
    from amvlm_jax.data.tokenize import ReportTokenizer
    from amvlm_jax.weights import WeightError

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "left", "Left", "lung"]
    folder = tmp_path / "vocab"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    tokenizer = ReportTokenizer(folder, max_length=5)
    assert tokenizer(["Left lung"])["input_ids"].tolist() == [[2, 5, 7, 3, 0]]
    with pytest.raises(TypeError, match="^ReportTokenizer expects a list of reports, not one string$"):
        tokenizer("Left lung")
    with pytest.raises(ValueError, match=r"^max_length must leave room for \[CLS\] and \[SEP\]$"):
        ReportTokenizer(folder, max_length=1)
    (folder / "tokenizer_config.json").write_text('["do_lower_case"]')
    with pytest.raises(WeightError, match=f"^{folder / 'tokenizer_config.json'}: not a JSON object"):
        ReportTokenizer(folder)
    (folder / "tokenizer_config.json").unlink()
    (folder / "vocab.txt").write_text("\n".join(vocab[1:]) + "\n")
    with pytest.raises(WeightError, match=rf"^{folder}: vocabulary has no \[PAD\] token$"):
        ReportTokenizer(folder)


def test_a_tokenizer_without_bert_special_tokens_is_refused(tmp_path):
    """A tokenizer.json without BERT's post-processor encodes a report with no [CLS] and [SEP]: every word
    would sit one slot early and the report end nowhere (SPEC 2); one without the [CLS] alone would still
    shift every word and hand BERT no [CLS] for t. One line names the folder instead."""
    import json
    import pathlib

    from amvlm_jax.data.tokenize import ReportTokenizer
    from amvlm_jax.weights import WeightError, default_text_encoder_dir

    settings = json.loads((pathlib.Path(default_text_encoder_dir()) / "tokenizer.json").read_text())
    assert ReportTokenizer(default_text_encoder_dir(), max_length=6)(["left lung"])["input_ids"][0, 0] == 101
    # Without a post-processor; with one that ends a report with [SEP] but opens it with no [CLS].
    only_sep = dict(settings["post_processor"], single=settings["post_processor"]["single"][1:])
    for processor in (None, only_sep):
        settings["post_processor"] = processor
        (tmp_path / "tokenizer.json").write_text(json.dumps(settings))
        with pytest.raises(WeightError, match=rf"^{tmp_path}: its tokenizer puts no \[CLS\] \.\.\. \[SEP\] around a report"):
            ReportTokenizer(tmp_path)
