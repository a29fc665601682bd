"""Meshes, parameter sharding, multi-process training and checkpoints across device counts."""

import json
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from amvlm_jax.config import ConfigError
from amvlm_jax.data import pipeline
from amvlm_jax.data.tokenize import ReportTokenizer
from amvlm_jax.train import build, checkpoint, parallel, pretrain
from amvlm_jax.train.logging import json_text

import distributed_worker
from conftest import SAMPLE_REPORTS, one_device_env, repo_module, tiny_pretrain_config, tiny_synthetic_config, write_corpus

TESTS_DIR = pathlib.Path(__file__).resolve().parent


def test_mesh_shape_from_config():
    config = tiny_synthetic_config(**{"mesh.data": -1, "mesh.fsdp": 2})
    mesh = parallel.make_mesh(config)
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 4, "fsdp": 2}
    # Each row of the mesh holds consecutive devices (in a multi-process run: one process's).
    assert [d.id for d in mesh.devices[1]] == [jax.devices()[2].id, jax.devices()[3].id]
    config = tiny_synthetic_config(**{"mesh.data": 2, "mesh.fsdp": -1})
    assert dict(parallel.make_mesh(config).shape) == {"data": 2, "fsdp": 4}
    assert dict(parallel.make_mesh(config, jax.devices()[:2], batch_size=2).shape) == {"data": 2, "fsdp": 1}
    # A mesh smaller than the devices takes the first ones (in a multi-process run, process 0's).
    small = parallel.make_mesh(tiny_synthetic_config(**{"mesh.data": 2, "mesh.fsdp": 1}), batch_size=2)
    assert [d.id for d in small.devices.ravel()] == [d.id for d in jax.devices()[:2]]
    with pytest.raises(ConfigError, match="not divisible"):
        parallel.make_mesh(config, batch_size=4)
    with pytest.raises(ConfigError, match="does not fit"):
        parallel.make_mesh(tiny_synthetic_config(**{"mesh.data": 4, "mesh.fsdp": 4}))
    with pytest.raises(ConfigError, match="both be -1"):
        parallel.make_mesh(tiny_synthetic_config(**{"mesh.data": -1, "mesh.fsdp": -1}))


def test_fsdp_partition_rule():
    assert parallel.fsdp_partition((768, 3072), 4, 1024) == PartitionSpec(None, "fsdp")
    assert parallel.fsdp_partition((3072, 768), 4, 1024) == PartitionSpec("fsdp")
    assert parallel.fsdp_partition((3, 3, 64, 64), 4, 1024) == PartitionSpec(None, None, None, "fsdp")
    assert parallel.fsdp_partition((30522, 384), 4, 1024) == PartitionSpec(None, "fsdp")  # 30522 % 4 != 0
    assert parallel.fsdp_partition((768,), 4, 1024) == PartitionSpec()  # Below the size threshold.
    assert parallel.fsdp_partition((32, 32), 4, 1024) == PartitionSpec(None, "fsdp")  # At it: split.
    assert parallel.fsdp_partition((7, 333), 4, 1) == PartitionSpec()  # No dimension divides.
    assert parallel.fsdp_partition((768, 768), 1, 1) == PartitionSpec()
    assert parallel.fsdp_partition((), 4, 0) == PartitionSpec()


def test_distributed_initialisation_is_skipped_for_one_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.detected_cluster() is None
    assert parallel.initialize_distributed(tiny_synthetic_config()) == 1
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
    assert parallel.detected_cluster() == "slurm"
    assert parallel.initialize_distributed(tiny_synthetic_config(**{"distributed.mode": "off"})) == 1
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    assert parallel.detected_cluster() == "jax-env"
    with pytest.raises(ConfigError, match="process_id"):
        parallel.initialize_distributed(tiny_synthetic_config(**{"distributed.num_processes": 2}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_as_one_process_with_eight_devices(tmp_path):
    """2 processes x 4 CPU devices (gloo collectives) = 1 process x 8 devices: pre-training then text-guided SSMIS;
    and together the two processes read each example of a streamed corpus's epoch exactly once."""
    address = f"127.0.0.1:{_free_port()}"
    env = one_device_env()  # The workers set their own device count.
    corpus_file = write_corpus(tmp_path / "corpus", 24)
    expected = distributed_worker.run_all()  # The reference, first: the workers find its compiled programs cached.
    workers = [
        subprocess.Popen(
            [sys.executable, str(TESTS_DIR / "distributed_worker.py"), address, str(i), "2", str(tmp_path / f"{i}.npz"),
             str(corpus_file)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    try:
        # Generous: the suite runs two test files at a time on 2 cores (README), and this
        # test's 2 processes then share them with another file's tests.
        outputs = [w.communicate(timeout=900)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    for i in range(2):
        got = dict(np.load(tmp_path / f"{i}.npz"))
        assert set(got) == set(expected)
        # Exact where the computation is the same: both runs start from equal variables, and the
        # first pre-training step's loss agrees to float32 rounding.
        for name in (n for n in expected if n.startswith("initial/")):
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
        np.testing.assert_allclose(got["pretrain_losses"][0], expected["pretrain_losses"][0], rtol=1e-5)
        # Later steps follow parameters that differ by the order of the cross-process sums. The
        # losses amplify such differences in places (the local-alignment weights are a min-max of
        # reciprocal variances; the SSMIS steps read text masks of those encoders through a learned
        # logit scale), so single weights can land 1e-3 of their value apart. What summation order
        # cannot do is change an update as a whole: each tensor's difference between the runs is
        # bounded by 2% of how far the reference moved it (norm-wise). A wrong gradient (one
        # process's half of the batch, a mean over the wrong axis, a missing all-reduce) changes
        # updates by tens of percent; a tensor that did not move must agree to rounding. The losses
        # of later steps: 7e-4 apart (relative) were seen with other initial text weights, while the
        # loss falls by a quarter a step.
        for name in ("pretrain_losses", "ssl_losses", "ssl_tg_losses"):
            np.testing.assert_allclose(got[name], expected[name], rtol=2e-3, err_msg=name)
        for name, value in expected.items():
            initial = expected.get("initial/" + name)
            if initial is None:
                continue
            moved = np.linalg.norm(value - initial)
            difference = np.linalg.norm(got[name] - value)
            assert difference <= 0.02 * moved + 1e-6 * np.sqrt(value.size), (name, difference, moved)
    read = np.concatenate([np.load(tmp_path / f"{i}.npz.corpus.npy") for i in range(2)])
    assert sorted(read[:, 0]) == list(range(24))
    from amvlm_jax.data import folders

    for row, pixel_sum in read:  # The images read are the rows' files, decoded.
        assert folders.load_image(tmp_path / "corpus" / "images" / f"{row}.png", 32)[0].sum() == pixel_sum
    assert np.all(np.isfinite(expected["ssl_tg_losses"]))
    # The steps trained: the decoder moved away from its initialisation.
    assert any(np.abs(v).max() > 0 for k, v in expected.items() if k.startswith("ssl_decoder") and "gate" in k)


def test_a_signal_to_one_process_stops_every_process_at_one_step_and_the_run_resumes_exactly(tmp_path):
    """SIGTERM to process 1 alone, then Ctrl-C to process 0 alone (tests/stop_worker.py): every process stops
    at the same step, saves it and says so, and the resumed runs end where the uninterrupted one does, with its
    records. Before, the signalled process saved alone while the other waited in the next step's collective
    (the run hung), and two processes saving 'latest' and 'best' back to back met at each other's barriers."""
    import json

    address = f"127.0.0.1:{_free_port()}"
    workers = [subprocess.Popen([sys.executable, str(TESTS_DIR / "stop_worker.py"), address, str(i), "2",
                                 str(tmp_path / "runs"), str(tmp_path / f"{i}.json")],
                                env=one_device_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    try:
        outputs = [w.communicate(timeout=600)[0] for w in workers]  # About 10 s alone on 2 cores.
    finally:
        for w in workers:
            w.kill()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    whole = results[0]["whole"]
    for process, runs in enumerate(results):
        assert runs["whole"]["w"] == whole["w"] and runs["whole"]["latest_step"] == 12
        # The signal came while step 5 was taken (state.step 4 -> 5), the processes agree at the next logged
        # step (6; steps are logged every second); during step 9, the epoch's last: they agree at the next
        # epoch's start.
        for name, stopped in (("sigterm", 6), ("sigint", 9)):
            cut, resumed = runs[f"{name}_cut"], runs[f"{name}_resumed"]
            assert cut["latest_step"] == stopped, (process, name, cut)
            assert cut["message"] == (f"interrupted: saved {tmp_path}/runs/{name}/checkpoints/latest/"
                                      f"{stopped}; run the same command to resume")
            assert resumed["message"] is None and resumed["latest_step"] == 12
            assert resumed["w"] == whole["w"], (process, name)  # Exactly: the same sums in the same order.
            if process == 0:
                assert resumed["records"] == whole["records"], name
    assert outputs[1].count("SIGTERM: stopping where all processes agree") == 1
    assert outputs[0].count("SIGINT: stopping where all processes agree") == 1


def test_checkpoint_from_eight_devices_resumes_on_one_and_two(tmp_path, monkeypatch):
    """A pre-training state saved FSDP-sharded on 2 x 4 devices restores on 1 and on 1 x 2 devices."""
    monkeypatch.chdir(tmp_path)
    sizes = {"mesh.fsdp_min_size": 64, "pretrain.weights.css": 0.0, "pretrain.weights.icl": 0.0}  # Compile time.
    config = tiny_pretrain_config(**{"mesh.data": 2, "mesh.fsdp": 4}, **sizes)
    size = config.pretrain.image_size
    model = build.build_model(config, build.text_encoder_config(config))
    step = pretrain.make_train_step(model, config)
    tokenizer = ReportTokenizer(build.text_encoder_dir(config), config.pretrain.max_length)
    tokens = tokenizer(SAMPLE_REPORTS)

    def batch(seed):
        images = np.random.default_rng(seed).integers(0, 256, (2, 8, size, size, 3), dtype=np.uint8)
        return {"image": images[0], "image_aug": images[1], **tokens}

    mesh = parallel.make_mesh(config, batch_size=8)
    # Initialised in place (parallel.init_sharded, as the job does), text weights handed over as host
    # arrays as loaded ones are: the same values and placement as initialising it whole, then placing it.
    shapes = jax.eval_shape(lambda: pretrain.create_state(config, model, size)).params["text_encoder"]
    rng = np.random.default_rng(0)
    loaded = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype), shapes)

    def create(text):
        return pretrain.create_state(config, model, size, text, tx=optax.sgd(0.1))

    whole = create(loaded)  # Made whole, then placed: the eager path.
    whole = jax.device_put(whole, parallel.state_shardings(mesh, whole, parallel.fsdp_min_size(config)))
    state = parallel.init_sharded(mesh, config, create, loaded)
    assert jax.tree.structure(state.replace(tx=None)) == jax.tree.structure(whole.replace(tx=None))
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(whole)):
        assert got.sharding == want.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got, want in zip(jax.tree.leaves(state.params["text_encoder"]), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(got), want)
    sharded = [x for x in jax.tree.leaves(state.params) if x.sharding.spec != PartitionSpec()]
    assert sharded, "some leaves must be FSDP-sharded"
    placed = [x.sharding for x in jax.tree.leaves(state)]
    state, _ = step(state, pipeline.to_global(mesh, batch(1)))
    # The step hands the state back where init_sharded put it (XLA alone returns some replicated
    # leaves FSDP-sharded), so the second step below runs without compiling again.
    assert [x.sharding for x in jax.tree.leaves(state)] == placed
    saver = checkpoint.RunCheckpoints(tmp_path)
    saver.save(1, state, {"epoch": 1}, is_best=False)
    saver.wait()
    saver.close()
    saved = jax.device_get(state)  # The step below donates the state's buffers.
    _, metrics = step(state, pipeline.to_global(mesh, batch(2)))
    expected = float(metrics["loss"])
    assert [jitted._cache_size() for jitted in step._jitted.values()] == [1]

    abstract = jax.eval_shape(lambda: pretrain.create_state(config, model, size, tx=optax.sgd(0.1)))
    for devices, shape in ((jax.devices()[:1], (1, 1)), (jax.devices()[:2], (1, 2))):
        small = tiny_pretrain_config(**{"mesh.data": shape[0], "mesh.fsdp": shape[1]}, **sizes)
        small_mesh = parallel.make_mesh(small, devices, batch_size=8)
        target = parallel.abstract_sharded(small_mesh, abstract, small)
        loader = checkpoint.RunCheckpoints(tmp_path)
        restored, meta = loader.restore_latest(target)
        loader.close()
        assert meta == {"epoch": 1} and int(restored.step) == 1
        assert {d.id for x in jax.tree.leaves(restored) for d in x.devices()} == {d.id for d in devices}
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):  # The saved values, exactly.
            np.testing.assert_array_equal(np.asarray(got), want)
        # The same values placed on this mesh without the checkpoint take the same step to the bit; the
        # loss on 8 devices differs by the order of their sums only (2e-5 relative seen on one machine).
        placed_here = jax.tree.unflatten(jax.tree.structure(target), [
            jax.device_put(x, t.sharding) for x, t in zip(jax.tree.leaves(saved), jax.tree.leaves(target))])
        _, metrics = step(restored, pipeline.to_global(small_mesh, batch(2)))
        _, direct = step(placed_here, pipeline.to_global(small_mesh, batch(2)))
        assert float(metrics["loss"]) == float(direct["loss"]), shape
        assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4), shape


def test_bfloat16_compute_keeps_float32_parameters_and_losses():
    """config.dtype='bfloat16': the U-Net computes in bf16; its parameters, updates and loss stay float32."""
    from amvlm_jax.losses.segmentation import segmentation_loss
    from amvlm_jax.train import supervised

    config = tiny_synthetic_config(**{"dtype": "bfloat16", "data.image_size": 32})
    model = supervised.build_unet(config)
    mesh = parallel.make_mesh(config, jax.devices()[:1])
    state = parallel.replicate(mesh, supervised.create_state(config, model, steps_per_epoch=1))
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    masks = (images[..., 0] > 128).astype(np.uint8)
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})

    # The same initial variables in float32 compute: the training-mode loss of this batch.
    float32_model = supervised.build_unet(tiny_synthetic_config(**{"data.image_size": 32}))
    logits, _ = jax.jit(lambda v, x: float32_model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, images.astype(np.float32) / 255.0)
    float32_loss = float(segmentation_loss(logits, masks.astype(np.float32)))

    step = supervised.make_train_step(model, 1)
    state, metrics = step(state, pipeline.to_global(mesh, {"image": images, "mask": masks}))
    assert metrics["loss"].dtype == np.float32
    assert float(metrics["loss"]) == pytest.approx(float32_loss, rel=2e-2)
    assert {x.dtype for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))} <= {
        np.dtype(np.float32), np.dtype(np.int32)}
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))


def _benchmark_tool():
    return repo_module("tools/benchmark.py")


def test_benchmark_flops_when_the_backend_does_not_analyse_lowered_programs():
    """jax 0.11 on GPUs returns no 'flops' for lowered programs: the CPU backend analyses the same program."""
    benchmark = _benchmark_tool()
    lowered = jax.jit(lambda a, b: jax.numpy.tanh(a @ b) @ b).lower(np.ones((64, 128), np.float32),
                                                                    np.ones((128, 128), np.float32))

    class WithoutAnalysis:
        _lowering = lowered._lowering

        def cost_analysis(self):
            return {}

    flops, source = benchmark.model_flops(WithoutAnalysis(), None, 1)
    assert flops == 2 * (2 * 64 * 128 * 128)  # Two matmuls; tanh counts as transcendentals, not FLOPs.
    assert "CPU backend" in source
    assert benchmark.model_flops(lowered, None, 1) == (flops, "lowered program")




def test_benchmark_builds_the_mean_teacher_step_with_a_text_head():
    """A text head is fitted before training, not in the step: the benchmark times the step with the head
    at its initialisation (it failed before, asking for labelled images it does not have)."""
    benchmark = _benchmark_tool()
    config = tiny_pretrain_config(**{"mode": "ssl", "ssl.text_head": "report", "data.image_size": 32})
    step, (state, frozen, batch), images, state_index, mesh = benchmark.build_ssl(config, np.random.default_rng(0))
    assert set(state.generator) == {"head"} and images == 2 * config.train.batch_size and state_index == 0


def test_benchmark_feeds_each_process_its_share_of_the_batch_and_counts_the_global_batch(monkeypatch):
    """pipeline.to_global joins the processes' rows: each feeds B / processes rows, and images per step counts
    the global batch (pre-training B pairs, SSMIS B labeled + B unlabeled). Every process fed all B rows
    before, so a two-process run timed a step of 2B images and reported B. The states and steps are
    stand-ins: only the batches are looked at."""
    import types

    from amvlm_jax.train import ssl, supervised

    benchmark = _benchmark_tool()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(pretrain, "initial_state", lambda *args, **kwargs: None)
    monkeypatch.setattr(supervised, "initial_state", lambda *args, **kwargs: None)
    monkeypatch.setattr(supervised, "init_variables", lambda *args: {"params": {}, "batch_stats": {}})
    monkeypatch.setattr(ssl, "initial_state", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(ssl, "make_ssl_step", lambda *args: None)
    monkeypatch.setattr(benchmark, "in_memory_guidance", lambda *args: types.SimpleNamespace(variables=None))
    fed = []
    monkeypatch.setattr(pipeline, "to_global", lambda mesh, batch: fed.append(batch) or batch)
    sizes = {"mesh.data": 2, "pretrain.batch_size": 10, "train.batch_size": 6, "train.eval_batch_size": 4,
             "data.image_size": 32}
    # Pre-training with momentum encoders (AMVLM with ICL: a second view), SSMIS with text guidance (reports).
    cases = {"pretrain": (tiny_pretrain_config(**sizes), 10, 10),
             "ssl": (tiny_pretrain_config(**sizes, mode="ssl"), 6, 12),
             "supervised": (tiny_synthetic_config(**sizes), 6, 6),
             "evaluate": (tiny_synthetic_config(**sizes), 4, 4)}
    for mode, (config, batch_size, images) in cases.items():
        fed.clear()
        *_, images_per_step, _, mesh = benchmark.BUILDERS[mode](config, np.random.default_rng(0))
        assert images_per_step == images, mode
        (batch,) = fed
        assert {len(v) for v in batch.values()} == {batch_size // 2}, mode
        keys = {"pretrain": {"image", "image_aug", "input_ids"}, "ssl": {"image", "mask", "unlabeled_image",
                "report_input_ids"}, "supervised": {"image", "mask"}, "evaluate": {"image", "mask"}}[mode]
        assert keys <= set(batch), (mode, sorted(batch))


def test_benchmark_names_the_batch_size_that_does_not_divide_over_the_devices():
    benchmark = _benchmark_tool()
    config = tiny_pretrain_config(**{"mesh.data": -1, "pretrain.batch_size": 12})
    with pytest.raises(ConfigError, match=r"^config\.pretrain\.batch_size=12 is not divisible by the 8 devices"):
        benchmark.build_pretrain(config, np.random.default_rng(0))
    config = tiny_synthetic_config(**{"mesh.data": -1, "train.eval_batch_size": 12})
    with pytest.raises(ConfigError, match=r"^config\.train\.eval_batch_size=12 is not divisible by the 8 devices"):
        benchmark.build_evaluate(config, np.random.default_rng(0))


class _DoublingClock:
    """A stand-in for the benchmark's time module whose perf_counter doubles at every call (2, 4, 8, ...
    s): an interval between two consecutive calls is as long as all before it, so each timed step is 4x
    the one before and the median of three is 4x the shortest (the mean 7x)."""

    def __init__(self):
        import time

        self.calls, self.sleep, self.monotonic = 0, time.sleep, time.monotonic

    def perf_counter(self):
        self.calls += 1
        return 2.0 ** self.calls


def _cheap_peak_matmul(monkeypatch):
    """The matmul peak's operands made of ones and its matmul a product of two elements (the tests' compiler
    flags make 2048^2 random normals and a 2048^3 matmul seconds each); returns the operands (shape, dtype)
    the matmul was traced with."""
    seen = []
    monkeypatch.setattr(jax.random, "normal", lambda key, shape, dtype: jax.numpy.ones(shape, dtype))

    def matmul(a, b):
        seen.append((a.shape, a.dtype, b.shape, b.dtype))
        return a[0, 0] * b[0, 0]

    monkeypatch.setattr(jax.numpy, "matmul", matmul)
    return seen


def test_benchmark_matmul_peak_is_two_n_cubed_over_the_fastest_of_five_runs_in_the_compute_dtype(monkeypatch):
    benchmark = _benchmark_tool()
    seen = _cheap_peak_matmul(monkeypatch)
    monkeypatch.setattr(benchmark, "time", _DoublingClock())
    flops, size = benchmark.matmul_peak_flops(jax.numpy.bfloat16)
    assert size == 2048 and seen == [((2048, 2048), jax.numpy.bfloat16, (2048, 2048), jax.numpy.bfloat16)]
    # Runs timed 4 - 2, 16 - 8, ... s: the fastest took 2 s; a matmul of n x n by n x n is 2 n^3 FLOPs.
    assert flops == 2 * 2048**3 / 2


def test_benchmark_flops_of_the_compiled_program_are_per_device_as_the_last_resort():
    """Where neither the lowered program nor the CPU backend gives FLOPs, the compiled program's (one
    device's share, in a list as some backends return it) times the devices."""
    import types

    benchmark = _benchmark_tool()

    def unanalysable():
        raise NotImplementedError("no analysis")

    lowered = types.SimpleNamespace(cost_analysis=unanalysable)  # No _lowering either: the CPU analysis fails.
    compiled = types.SimpleNamespace(cost_analysis=lambda: [{"flops": 10.0}])
    flops, source = benchmark.model_flops(lowered, compiled, 4)
    assert flops == 40.0 and source.startswith("compiled program (misses library calls on GPUs); lowered program: "
                                               "NotImplementedError: no analysis; CPU analysis: ")
    assert benchmark.model_flops(lowered, types.SimpleNamespace(cost_analysis=lambda: {}), 4)[0] is None


def test_benchmark_peak_memory_sums_the_devices_that_keep_statistics():
    import types

    benchmark = _benchmark_tool()

    def no_statistics():
        raise RuntimeError("not kept")

    devices = [types.SimpleNamespace(memory_stats=lambda: {"peak_bytes_in_use": 5, "bytes_in_use": 1}),
               types.SimpleNamespace(memory_stats=no_statistics),
               types.SimpleNamespace(memory_stats=lambda: None),
               types.SimpleNamespace(memory_stats=lambda: {"peak_bytes_in_use": 7})]
    assert benchmark.peak_memory(devices) == (12.0, "device peak_bytes_in_use")
    assert benchmark.peak_memory(devices[1:3])[1] == "process max RSS (no device statistics)"


def test_benchmark_tool_times_a_step(monkeypatch):
    """steps/s, images/s and MFU come from the back-to-back step time; latency is the median step (timed on
    a clock that doubles at every reading)."""
    benchmark = _benchmark_tool()
    _cheap_peak_matmul(monkeypatch)
    monkeypatch.setattr(benchmark, "time", _DoublingClock())
    config = tiny_synthetic_config(**{"data.image_size": 32, "mesh.data": 2})
    result = benchmark.run_benchmark(config, "evaluate", steps=3, warmup=1)
    assert result["step_latency_seconds"] == 4 * result["step_latency_seconds_min"]
    seconds = result["seconds_per_step"]
    # Back to back: one reading before the 3 steps, one after: 2^(n+1) - 2^n over 3, where the latency steps
    # before took 2^(n-5), 2^(n-3) (the median) and 2^(n-1).
    assert seconds == 16 * result["step_latency_seconds"] / 3 and result["compile_seconds"] > 0
    assert result["steps_per_second"] == pytest.approx(1 / seconds)
    assert result["images_per_step"] == 8 and result["images_per_second"] == pytest.approx(8 / seconds)
    flops = result["model_flops_per_step"]
    assert flops > 0 and result["achieved_flops"] == pytest.approx(flops / seconds)
    # Against the peak of both devices of the mesh.
    assert result["devices"] == 2 and result["mesh"] == {"data": 2, "fsdp": 1}
    assert result["mfu"] == pytest.approx(flops / seconds / (2 * result["matmul_peak_flops_per_device"]))
    assert result["model_flops_source"] == "lowered program" and result["first_step_loss"] is None
    assert result["peak_memory_kind"] == "process max RSS (no device statistics)"  # CPUs keep none.
    with open("/proc/self/status") as f:  # In bytes: near what the process holds now (VmRSS, in kB).
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    assert result["peak_memory_bytes"] >= rss / 2
    assert set(json.loads(json_text(result))) == set(result)  # --json prints every measurement.
    assert "images/s" in benchmark.format_result(result)


def test_benchmark_json_output_is_the_json_alone_with_the_jobs_notes_on_stderr(capsys):
    """--json | json.load: a note the job's code prints while the step is built (pre-training's ViT starting from
    random weights) went to stdout above the JSON, which then did not parse (device_benchmarks.sh skipped it)."""
    from amvlm_jax.train.logging import info

    benchmark = _benchmark_tool()

    def measure():
        info("the ViT-Ti/16 starts from random weights")
        return {"mode": "pretrain", "seconds_per_step": 0.25}

    print(benchmark.report(measure, True, benchmark.format_result))
    out, err = capsys.readouterr()
    assert json.loads(out) == {"mode": "pretrain", "seconds_per_step": 0.25}
    assert err == "the ViT-Ti/16 starts from random weights\n"
    # The text report keeps the note on stdout, above the table.
    print(benchmark.report(measure, False, lambda result: f"step {result['seconds_per_step']} s"))
    assert capsys.readouterr() == ("the ViT-Ti/16 starts from random weights\nstep 0.25 s\n", "")


def test_benchmark_text_report_shows_each_measurement_on_its_line():
    benchmark = _benchmark_tool()
    result = {"mode": "ssl", "devices": 2, "device_kind": "cpu", "backend": "cpu", "mesh": {"data": 2, "fsdp": 1},
              "dtype": "float32", "compile_seconds": 12.34, "seconds_per_step": 0.5, "steps": 3, "warmup": 1,
              "step_latency_seconds": 0.25, "steps_per_second": 2.0, "images_per_second": 16.0, "images_per_step": 8,
              "peak_memory_bytes": 3 * 2**30, "peak_memory_kind": "device peak_bytes_in_use",
              "page_faults_per_step": 7.0, "system_seconds_per_step": 0.001, "malloc_tunables": None,
              "matmul_peak_flops_per_device": 5e10, "matmul_size": 2048, "first_step_loss": 0.5,
              "model_flops_per_step": 2e9, "achieved_flops": 4e9, "mfu": 0.04}
    lines = benchmark.format_result(result).splitlines()
    assert lines[0] == "mode ssl on 2 x cpu (cpu), mesh {'data': 2, 'fsdp': 1}, dtype float32"
    assert lines[1:] == [
        "  compile             12.3 s",
        "  step                0.5000 s back to back (3 steps after 1 warm-up); latency 0.2500 s (median, each step "
        "waited for)",
        "  steps/s             2.000",
        "  images/s            16.00  (8 per step)",
        "  peak memory         3.00 GiB  [device peak_bytes_in_use]",
        "  host per step       7 page faults, 0.001 s system time (GLIBC_TUNABLES=)",
        "  matmul peak         50.0 GFLOP/s per device (2048^2, float32)",
        "  first-step loss     0.5000",
        "  model FLOPs/step    2.0 GFLOP (XLA cost analysis)",
        "  achieved            4.0 GFLOP/s",
        "  MFU                 4.0 %",
    ]
    del result["model_flops_per_step"]
    assert benchmark.format_result(result).splitlines()[-1] == (
        "  model FLOPs/step    unavailable (no XLA cost analysis on this backend)")


def test_benchmark_profile_summary_counts_device_time_per_step(tmp_path):
    """A hand-written Perfetto trace of 2 steps: a GPU process (one timeline) and the host's (left out)."""
    import gzip

    benchmark = _benchmark_tool()
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "XLA Ops"}},
        {"ph": "X", "pid": 1, "tid": 7, "name": "fusion", "ts": 1000, "dur": 100},
        {"ph": "X", "pid": 1, "tid": 7, "name": "dot", "ts": 1150, "dur": 50},
        {"ph": "X", "pid": 1, "tid": 7, "name": "fusion", "ts": 1300, "dur": 100},
        {"ph": "X", "pid": 2, "tid": 3, "name": "host work", "ts": 0, "dur": 5000},
    ]
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert benchmark.summarize_trace(str(tmp_path), 2) == {"XLA Ops": {
        "busy_ms_per_step": 0.125, "span_ms_per_step": 0.2, "events_per_step": 1.5,
        "ops": [{"name": "fusion", "ms_per_step": 0.1, "calls_per_step": 1.0},
                {"name": "dot", "ms_per_step": 0.025, "calls_per_step": 0.5}]}}
    assert benchmark.summarize_trace(str(tmp_path / "plugins" / "none"), 2) == {}


def test_benchmark_queue_waits_for_the_others_to_compile_then_for_the_lock(tmp_path):
    import fcntl
    import time

    benchmark = _benchmark_tool()
    (tmp_path / "other.compiled").touch()
    started = time.monotonic()
    turn = benchmark.wait_for_turn(str(tmp_path), "me", 2, timeout=30)
    assert time.monotonic() - started < 5 and (tmp_path / "me.compiled").is_file()
    with open(tmp_path / "lock", "w") as other, pytest.raises(BlockingIOError):  # The turn is held.
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    turn.close()
    started = time.monotonic()
    benchmark.wait_for_turn(str(tmp_path), "third", 4, timeout=0.5).close()  # One of 4 never compiles.
    assert time.monotonic() - started >= 0.5


def test_benchmark_carries_the_state_of_a_train_step_and_runs_warmup_plus_twice_steps(monkeypatch):
    """A stand-in compiled train step counts its calls in its state: each call gets the state the one before
    returned (train steps donate it), the first loss is the first call's, warm-up 2 + 3 latency + 3 back to
    back steps run."""
    import types

    benchmark = _benchmark_tool()
    _cheap_peak_matmul(monkeypatch)
    seen = []

    def compiled(state, batch):
        seen.append(int(state))
        return jax.numpy.asarray(state + 1), {"loss": jax.numpy.asarray(10.0 * state + batch)}

    class Step:
        def lower(self, *args):
            return types.SimpleNamespace(cost_analysis=lambda: {"flops": 1e6},
                                         compile=lambda: Compiled())

    class Compiled:
        def __call__(self, *args):
            return compiled(*args)

        def cost_analysis(self):
            return {"flops": 1e6}

    config = tiny_synthetic_config()
    mesh = parallel.make_mesh(config, jax.devices()[:1])
    monkeypatch.setitem(benchmark.BUILDERS, "supervised",
                        lambda config, rng: (Step(), (jax.numpy.asarray(0), jax.numpy.asarray(0.5)), 8, 0, mesh))
    result = benchmark.run_benchmark(config, "supervised", steps=3, warmup=2)
    assert seen == list(range(2 + 3 + 3))
    assert result["first_step_loss"] == 0.5 and result["model_flops_per_step"] == 1e6
    assert result["model_flops_source"] == "lowered program" and result["devices"] == 1


def test_explicit_processes_need_an_id_below_their_count_from_the_config_or_the_environment(monkeypatch):
    monkeypatch.setenv("JAX_PROCESS_ID", "5")  # process_id -1: read from the environment.
    config = tiny_synthetic_config(**{"distributed.num_processes": 2, "distributed.coordinator_address": "h:1"})
    with pytest.raises(ConfigError, match=r"process_id in \[0, 2\) \(got 'h:1', 5\)"):
        parallel.initialize_distributed(config)
    config.distributed.process_id = 2
    with pytest.raises(ConfigError, match=r"\(got 'h:1', 2\)"):
        parallel.initialize_distributed(config)


def test_fsdp_splits_leaves_from_the_configured_size():
    mesh = parallel.make_mesh(tiny_synthetic_config(**{"mesh.data": 1, "mesh.fsdp": 8}), batch_size=8)
    tree = {"w": jax.ShapeDtypeStruct((8, 8), np.float32), "b": jax.ShapeDtypeStruct((8,), np.float32)}
    for min_size, spec in ((64, PartitionSpec(None, "fsdp")), (65, PartitionSpec())):
        config = tiny_synthetic_config(**{"mesh.fsdp_min_size": min_size})
        placed = parallel.abstract_sharded(mesh, tree, config)
        assert placed["w"].sharding.spec == spec and placed["b"].sharding.spec == PartitionSpec()


@pytest.mark.parametrize("environment", [
    {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"},
    {"SLURM_NTASKS": "4"},  # A batch script outside srun: no job step, its tasks are not started yet.
    {"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "node1"},
    {"OMPI_COMM_WORLD_SIZE": "1"},
    {"TPU_WORKER_HOSTNAMES": "host0"},
    {"TPU_WORKER_HOSTNAMES": "host0,"},
])
def test_a_launcher_of_one_process_is_no_cluster(environment, monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                 "SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert parallel.detected_cluster() is None
    assert parallel.initialize_distributed(tiny_synthetic_config()) == 1


@pytest.mark.parametrize("process_id", [None, "", "2", "-1", "one"])
def test_a_jax_environment_without_this_process_id_is_named(process_id, monkeypatch):
    """JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES=2 with JAX_PROCESS_ID unset, empty or out of [0, 2): read
    as 0, both processes would claim process 0's place at the coordinator; a one-line error instead, before
    any connection is tried."""
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    if process_id is None:
        monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    else:
        monkeypatch.setenv("JAX_PROCESS_ID", process_id)
    assert parallel.detected_cluster() == "jax-env"
    shown = repr(process_id or "")
    with pytest.raises(ConfigError, match=re.escape(f"$JAX_PROCESS_ID={shown}: a run of $JAX_NUM_PROCESSES=2 "
                                                    "processes needs each one's id in [0, 2)") + "$"):
        parallel.initialize_distributed(tiny_synthetic_config())


def test_an_unknown_distributed_mode_is_named():
    with pytest.raises(ConfigError, match=r"^config\.distributed\.mode must be 'auto', 'on' or 'off', got 'maybe'$"):
        parallel.initialize_distributed(tiny_synthetic_config(**{"distributed.mode": "maybe"}))
