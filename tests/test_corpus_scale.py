"""A streamed corpus's memory does not grow with its size (docs/benchmarks.md measures 10k and 100k rows).

At small scale and without timing: loading a streamed split decodes no image, streaming decodes only
the rows of the batches read (plus the pipeline's bounded look-ahead), streaming's allocations are
the same at 500 and 4,000 rows, and what a worker process receives (the pickled images) is a file
name, the same at any size.
"""

import gc
import os
import pathlib
import pickle
import tracemalloc

import numpy as np
import pytest

from amvlm_jax.data import corpus, pipeline

from conftest import corpus_config, repo_module, tiny_pretrain_config, write_corpus

SIZE = 32  # Generated images are 32x40, decoded to 32x32.
BATCH = 8
BATCHES = 12
LOOK_AHEAD = 10  # Batches the pipeline may decode ahead of the reader (its prefetch buffer and reading threads).
COUNTS = (500, 4000)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict:
    return {count: write_corpus(tmp_path_factory.mktemp(f"corpus_{count}"), count, size=SIZE) for count in COUNTS}


def _streamed(path):
    config = corpus_config(path)
    config.data.corpus.in_memory_bytes = 0
    split, _, _ = corpus.load(config, "train", SIZE)
    assert isinstance(split.images, corpus.CorpusImages)
    return split


def _stream(split):
    return pipeline.training_batches(split, BATCH, seed=0, with_mask=False, augmentation="none", worker_count=0,
                                     process_index=0, process_count=1)


def _read(split, batches: int) -> list:
    stream = _stream(split)
    try:
        return [next(stream) for _ in range(batches)]
    finally:
        stream.close()  # Stops the prefetching threads: nothing is decoded after this.


def _decoded_bytes(count: int) -> int:
    return count * SIZE * SIZE * 3


def test_streaming_decodes_only_the_rows_of_the_batches_read(corpora, monkeypatch):
    decoded = []
    load_image = corpus.load_image

    def counting(path, size):
        decoded.append(str(path))
        return load_image(path, size)

    monkeypatch.setattr(corpus, "load_image", counting)
    split = _streamed(corpora[4000])
    assert decoded == []  # Loading reads the corpus file only.
    batches = _read(split, BATCHES)
    rows = np.concatenate([batch["index"] for batch in batches])
    assert len(rows) == BATCHES * BATCH
    assert {os.fsdecode(split.images.paths[i]) for i in rows} <= set(decoded)
    assert len(decoded) <= (BATCHES + LOOK_AHEAD) * BATCH < len(split) // 10
    np.testing.assert_array_equal(batches[-1]["image"], split.images[batches[-1]["index"]])


def test_streaming_allocates_the_same_at_500_and_4000_rows(corpora):
    splits = {count: _streamed(corpora[count]) for count in COUNTS}
    _read(splits[COUNTS[0]], 2)  # Once untraced: lazy imports and first-use caches are not streaming's cost.
    peaks = {}
    for count, split in splits.items():
        tracemalloc.start()
        try:
            _read(split, BATCHES)
            peaks[count] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    small, large = COUNTS
    # Decoding the splits would take 1.5 and 12.3 MB: streaming's peak stays below a tenth of the larger
    # and grows by less than a tenth of the difference (a few batches in flight either way).
    assert peaks[large] < _decoded_bytes(large) / 10, peaks
    assert peaks[large] - peaks[small] < (_decoded_bytes(large) - _decoded_bytes(small)) / 10, peaks


def test_workers_receive_a_file_name_not_rows(corpora):
    """What the pipeline sends each worker (the split's images) pickles to the same few bytes at any size:
    the name of the memory-mapped paths file. The copy reads the same images; the file goes with its owner."""
    splits = {count: _streamed(corpora[count]) for count in COUNTS}
    sizes = {count: len(pickle.dumps(split.images)) for count, split in splits.items()}
    assert sizes[COUNTS[0]] == sizes[COUNTS[1]] < 1000, sizes
    images = splits[COUNTS[1]].images
    copy = pickle.loads(pickle.dumps(images))
    assert copy.file == images.file and len(copy) == len(images) == COUNTS[1]
    np.testing.assert_array_equal(copy[[3, 3999]], images[[3, 3999]])
    file = pathlib.Path(images.file)
    del copy
    gc.collect()
    assert file.is_file()  # A worker's copy does not own the file.
    del images, splits
    gc.collect()
    assert not file.exists()


def test_benchmark_loader_mode_streams_a_generated_corpus(tmp_path):
    benchmark = repo_module("tools/benchmark.py")
    result = benchmark.run_loader_benchmark(tiny_pretrain_config(), 40, str(tmp_path), 16, [0], batches=2, warmup=1)
    assert result["rows"] == 40 and "streamed from disk" in result["corpus_line"]
    (run,) = result["runs"]
    assert run["workers"] == 0 and run["images_per_second"] > 0 and run["images_per_second_with_host_batch"] > 0
    assert run["worker_processes"] == 0 and result["row_metadata_bytes"] > 0
    assert "images/s" in benchmark.format_loader_result(result)
    # The corpus stays in a given folder and is reused as it is.
    written = (tmp_path / "corpus.jsonl").stat().st_mtime_ns
    assert benchmark.generated_corpus(tmp_path, 40, 16).stat().st_mtime_ns == written


def test_benchmark_loader_rates_count_the_rows_streamed_over_the_time_they_took(monkeypatch):
    """time_stream on a stand-in stream of 4-row batches and a clock that doubles at each reading (2, 4, 8, ...
    s): warm-up 4 - 2 s; 2 batches in 16 - 8 s; then 2 batches more whose host_batch calls take 128 - 64
    and 512 - 256 s, in 1024 - 32 s all told."""
    import types

    benchmark = repo_module("tools/benchmark.py")
    clock = types.SimpleNamespace(calls=0)

    def perf_counter():
        clock.calls += 1
        return 2.0 ** clock.calls

    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(pipeline, "training_batches",
                        lambda *args, **kwargs: ({"image": np.zeros((4, 2, 2, 3), np.uint8)} for _ in range(100)))
    run = benchmark.time_stream(None, 4, 0, 0, batches=2, warmup=1, host=lambda raw, step: None)
    assert run["warmup_seconds"] == 2 and run["images_per_second"] == 8 / 8
    assert run["images_per_second_with_host_batch"] == 8 / 992 and run["host_batch_ms"] == 1e3 * (64 + 256) / 2
