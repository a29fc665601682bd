"""Times the real jitted step of a job on synthetic in-memory batches (no dataset needed), or the
pre-training input pipeline on an image-report corpus streamed from disk (mode loader).

    python tools/benchmark.py --config=experiments/synthetic.py[:variant] \
        [--mode=pretrain|ssl|supervised|evaluate] [--steps=N] [--warmup=N] [--json] [--config.a.b=value ...]
    python tools/benchmark.py --config=experiments/medpix.py:cpu --mode=loader \
        [--corpus_size=10000] [--corpus_dir=DIR] [--workers=0,2,4] [--batches=N] [--warmup=N] [--json]

Builds the state and step through the job's own code (``initial_state`` and
the step factory: the same placement on the mesh; the text-mask encoders of
mode ssl are freshly initialised, which changes values, not cost), compiles it, runs
--warmup untimed steps, then --steps steps each waited for with
block_until_ready (the step latency), then --steps steps back to back with
one wait at the end, as the training loops run them (the step time behind
steps/s, images/s and MFU). Also reports compile seconds, peak memory
(device.memory_stats() peak where the backend keeps it, else the process's
maximum resident set size, labelled so), model FLOPs per step from XLA's
cost analysis of the lowered step, and model FLOPs utilisation (MFU)
against a matmul peak measured in the same run: a large square matmul in
the compute dtype (config.dtype), timed on one device; and the host's page
faults and system time per step of the back-to-back steps (the tool, like
main, runs with malloc on huge pages where the kernel offers them:
GLIBC_TUNABLES, see amvlm_jax.main.malloc_in_huge_pages; set it empty to
time without).

Images per step: pretrain B image-report pairs (plus the momentum view,
not counted); ssl B labeled + B unlabeled images; supervised B;
evaluate config.train.eval_batch_size.

Mode loader times no step: it writes a generated corpus of --corpus_size
(S, S + 8) PNGs (S = --corpus_image_size) with a JSONL file in --corpus_dir
(reused when it already holds that corpus; default a temporary folder
deleted after), or with --corpus_size=0 reads the config's own
data.corpus files, and loads the train split with
data.corpus.in_memory_bytes=0 (every image decoded when read, as for a
corpus too large for memory). For each worker count in --workers it streams
pipeline.training_batches at pretrain.batch_size and the pre-training image
size, as pre-training does (no augmentation; worker count = data.worker_count):
--warmup batches untimed (the workers start), --batches batches timed as the
pipeline yields them, then --batches more each passed through
pretrain.host_batch (tokenising the reports, plus the momentum view's
augmentation when the objective has momentum encoders), as the training
loop's main thread does. It reports images/s of both, and peak memory
(Linux: VmHWM) of this process during the stream (its peak reset first)
and of each worker process, read before the workers stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import resource
import sys
import tempfile
import time

from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from amvlm_jax.train.logging import json_text  # noqa: E402 (after the path above)

MODES = ("pretrain", "ssl", "supervised", "evaluate", "loader")
SYNTHETIC_REPORTS = [
    "Two lesions in the upper left and lower right cells.",
    "one lesion, centre",
    "Bilateral pulmonary infection, two infected areas, upper left and upper right.",
    "The nuclei density in the lower left is high.",
    "no lesion",
    "Three lesions: upper right, lower left and centre.",
]


# ---------------------------------------------------------------------------
# Synthetic inputs
# ---------------------------------------------------------------------------


def synthetic_images(rng, count: int, size: int):
    """(count, size, size, 3) uint8."""
    import numpy as np

    return rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def synthetic_masked_batch(rng, count: int, size: int) -> dict:
    """{'image' (count, size, size, 3) uint8, 'mask' (count, size, size) 0/1}: a segmentation batch."""
    import numpy as np

    images = synthetic_images(rng, count, size)
    return {"image": images, "mask": (images[..., 0] > 128).astype(np.uint8)}


def synthetic_tokens(config, count: int) -> dict:
    """The ReportTokenizer arrays of `count` report-like sentences: each (count, max_length) or (count, W)."""
    from amvlm_jax.data.tokenize import ReportTokenizer
    from amvlm_jax.train import build

    tokenizer = ReportTokenizer(build.text_encoder_dir(config), config.pretrain.max_length)
    return tokenizer([SYNTHETIC_REPORTS[i % len(SYNTHETIC_REPORTS)] for i in range(count)])


# ---------------------------------------------------------------------------
# Steps per mode: (jitted step, argument tuple, images per step, argument index of the carried state or None)
# ---------------------------------------------------------------------------


def process_rows(batch_size: int) -> int:
    """This process's rows of a global batch of `batch_size`: ``pipeline.to_global`` joins every process's
    rows into the global batch, as each process of a training run feeds its share of it."""
    import jax

    return batch_size // jax.process_count()


def build_pretrain(config, rng):
    from amvlm_jax.data import pipeline
    from amvlm_jax.train import build, parallel, pretrain

    size = build.pretrain_image_size(config)
    batch_size = config.pretrain.batch_size
    model = build.build_model(config, build.text_encoder_config(config))
    mesh = parallel.make_mesh(config, batch_size=batch_size, field="config.pretrain.batch_size")
    state = pretrain.initial_state(config, model, mesh, steps_per_epoch=1000)  # The job's state and placement.
    rows = process_rows(batch_size)
    batch = {"image": synthetic_images(rng, rows, size), **synthetic_tokens(config, rows)}
    if build.uses_momentum(config):
        batch["image_aug"] = synthetic_images(rng, rows, size)
    step = pretrain.make_train_step(model, config)
    return step, (state, pipeline.to_global(mesh, batch)), batch_size, 0, mesh


def in_memory_guidance(config, mesh):
    """ssl.TextGuidance with freshly initialised (not pre-trained) encoders: same cost, no checkpoint."""
    from amvlm_jax.train import build, parallel, pretrain, ssl

    model = build.build_model(config, build.text_encoder_config(config))
    state = pretrain.create_state(config, model, build.pretrain_image_size(config))
    variables = parallel.replicate(mesh, {"params": state.params, "batch_stats": state.batch_stats})  # As restored.
    return ssl.TextGuidance.from_variables(config, model, variables)


def build_ssl(config, rng):
    from amvlm_jax.data import pipeline
    from amvlm_jax.train import parallel, ssl, supervised

    size, batch_size = config.data.image_size, config.train.batch_size
    mesh = parallel.make_mesh(config)
    guidance = in_memory_guidance(config, mesh) if ssl.text_guidance_enabled(config) else None
    model = supervised.build_unet(config)
    # As the job; a text head (config.ssl.text_head) keeps its initial params: fitting it precedes training.
    state, decoder_tx = ssl.initial_state(config, model, guidance, mesh, steps_per_epoch=1000, resuming=True)
    rows = process_rows(batch_size)
    batch = synthetic_masked_batch(rng, rows, size) | {"unlabeled_image": synthetic_images(rng, rows, size)}
    if guidance is not None:
        batch |= {f"report_{k}": v for k, v in synthetic_tokens(config, rows).items()}
    step = ssl.make_ssl_step(config, model, guidance, decoder_tx)
    frozen = guidance.variables if guidance else None
    return step, (state, frozen, pipeline.to_global(mesh, batch)), 2 * batch_size, 0, mesh


def build_supervised(config, rng):
    from amvlm_jax.data import pipeline
    from amvlm_jax.train import parallel, supervised

    size, batch_size = config.data.image_size, config.train.batch_size
    mesh = parallel.make_mesh(config)
    model = supervised.build_unet(config)
    state = supervised.initial_state(config, model, mesh, steps_per_epoch=1000)  # As the job.
    batch = synthetic_masked_batch(rng, process_rows(batch_size), size)
    step = supervised.make_train_step(model, config.data.num_classes)
    return step, (state, pipeline.to_global(mesh, batch)), batch_size, 0, mesh


def build_evaluate(config, rng):
    from amvlm_jax.data import pipeline
    from amvlm_jax.train import evaluate, parallel, supervised

    size, batch_size = config.data.image_size, config.train.eval_batch_size
    mesh = parallel.make_mesh(config, batch_size=batch_size, field="config.train.eval_batch_size")
    model = supervised.build_unet(config)
    variables = parallel.replicate(mesh, supervised.init_variables(config, model))  # As evaluate_checkpoint.
    batch = synthetic_masked_batch(rng, process_rows(batch_size), size)
    step = evaluate.make_eval_step(model, config.data.num_classes)
    args = (variables["params"], variables["batch_stats"], pipeline.to_global(mesh, batch))
    return step, args, batch_size, None, mesh


BUILDERS = {"pretrain": build_pretrain, "ssl": build_ssl, "supervised": build_supervised, "evaluate": build_evaluate}


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def matmul_peak_flops(dtype) -> tuple[float, int]:
    """(FLOP/s of the best of 5 size x size matmuls on the default device, size: 2048 on CPUs, else 8192)."""
    import jax
    import jax.numpy as jnp

    size = 2048 if jax.default_backend() == "cpu" else 8192
    # Random operands: constant data can run faster than real data on some accelerators.
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(key_b, (size, size), jnp.float32).astype(dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best, size


def model_flops(lowered, compiled, num_devices: int) -> tuple[float | None, str]:
    """(FLOPs of one step of the whole (global) program from XLA's cost analysis, or None; their source).

    The analysis of the lowered, not yet optimised program counts every
    matmul and convolution as written, on any backend (custom calls such as
    cuDNN's fused attention count zero). Where the device's backend does not
    analyse lowered programs (jax 0.11 on GPUs: no 'flops'), the same
    program is analysed by the CPU backend. The compiled program's analysis
    is per device and, on GPUs, misses the matmuls that became library calls,
    so it is only the last resort, and the source says so.
    """

    def flops_of(analysis):
        if isinstance(analysis, (list, tuple)):
            analysis = analysis[0] if analysis else None
        return float(analysis["flops"]) if analysis and "flops" in analysis else None

    try:
        flops = flops_of(lowered.cost_analysis())
        source = "lowered program" if flops is not None else "lowered program: no 'flops' in its analysis"
    except Exception as error:  # Not every jax version or backend analyses lowered programs.
        flops, source = None, f"lowered program: {type(error).__name__}: {str(error)[:200]}"
    if flops is None:
        try:  # Private jax API (what Lowered.cost_analysis calls), hence guarded.
            from jax._src import xla_bridge
            from jax._src.lib import _jax

            analysis = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"),
                                                     lowered._lowering.hlo().as_hlo_module())
            flops = flops_of(analysis)
            source = "lowered program, analysed by the CPU backend" if flops is not None else source
        except Exception as error:
            source += f"; CPU analysis: {type(error).__name__}: {str(error)[:200]}"
    if flops is None:
        per_device = flops_of(compiled.cost_analysis())
        flops = None if per_device is None else per_device * num_devices
        source = f"compiled program (misses library calls on GPUs); {source}"
    return flops, source


def peak_memory(devices) -> tuple[float, str]:
    """(bytes, what was measured): the devices' summed peak allocation, else this process's max RSS."""
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # Backends without allocator statistics raise or return None.
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    if peaks:
        return float(sum(peaks)), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "process max RSS (no device statistics)"


def wait_for_turn(queue_dir: str, name: str, size: int, timeout: float = 240.0):
    """Blocks until `size` benchmarks have compiled (at most `timeout` s), then until this one holds the queue's lock.

    Several benchmark processes can then compile side by side (compilation is
    host work) and still time their steps one at a time, on an idle device and
    idle host. Each process marks `queue_dir/name.compiled`; a driver marks a
    process that died before compiling the same way so the others go on.
    Returns the open lock file (closing it releases the turn).
    """
    import fcntl

    folder = pathlib.Path(queue_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.compiled").touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.glob("*.compiled"))) < size and time.monotonic() < deadline:
        time.sleep(0.2)
    lock = open(folder / "lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def run_benchmark(config, mode: str, steps: int, warmup: int, profile_dir: str = "", queue=None) -> dict:
    """Compiles and times `mode`'s step; returns the measurements as a dict.

    With `profile_dir`, PROFILED_STEPS more steps are traced there
    (jax.profiler, with a Perfetto JSON trace) and summarised under 'profile'.
    `queue` = (folder, name, size): wait_for_turn between compiling and timing.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from amvlm_jax.config import validate

    validate(config)
    rng = np.random.default_rng(config.seed)
    step, args, images_per_step, state_index, mesh = BUILDERS[mode](config, rng)

    started = time.perf_counter()
    lowered = step.lower(*args)
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - started
    flops_per_step, flops_source = model_flops(lowered, compiled, mesh.size)
    turn = wait_for_turn(*queue) if queue else None

    def dispatch(args):
        """(outputs, the arguments of the next call), without waiting for the device."""
        outputs = compiled(*args)
        if state_index is None:
            return outputs, args
        # Train steps donate their state: carry the new one into the next call.
        return outputs, args[:state_index] + (outputs[0],) + args[state_index + 1:]

    def run_once(args):
        outputs, args = dispatch(args)
        jax.block_until_ready(outputs)
        return args

    first_outputs, args = dispatch(args)
    jax.block_until_ready(first_outputs)
    # The first step's loss: a check that bfloat16 and float32 runs compute the same thing.
    first_loss = None
    if state_index is not None and isinstance(first_outputs[1], dict) and "loss" in first_outputs[1]:
        first_loss = float(jax.device_get(first_outputs[1]["loss"]))
    for _ in range(max(0, warmup - 1)):
        args = run_once(args)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        args = run_once(args)
        times.append(time.perf_counter() - t0)
    step_latency = float(np.median(times))
    # Back to back, as the training loops run: the host dispatches step n + 1
    # while the device still computes step n; one wait at the end.
    started, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    outputs = None
    for _ in range(steps):
        outputs, args = dispatch(args)
    jax.block_until_ready(outputs)
    seconds_per_step_back_to_back = (time.perf_counter() - started) / steps
    # The host's page faults and system time over those steps (docs/benchmarks.md: malloc on huge pages).
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    page_faults_per_step = (usage_after.ru_minflt - usage.ru_minflt) / steps
    system_seconds_per_step = (usage_after.ru_stime - usage.ru_stime) / steps
    profile = None
    if profile_dir:
        import jax.profiler

        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(PROFILED_STEPS):
                args = run_once(args)
        profile = summarize_trace(profile_dir, PROFILED_STEPS)
    peak_bytes, peak_kind = peak_memory(mesh.devices.flat)
    peak_flops, matmul_size = matmul_peak_flops(jnp.dtype(config.dtype))
    if turn is not None:
        turn.close()

    result = {
        "mode": mode,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": int(mesh.size),
        "mesh": dict(mesh.shape),
        "dtype": config.dtype,
        "images_per_step": images_per_step,
        "steps": steps,
        "warmup": warmup,
        "compile_seconds": compile_seconds,
        "seconds_per_step": seconds_per_step_back_to_back,
        "step_latency_seconds": step_latency,
        "step_latency_seconds_min": float(np.min(times)),
        "steps_per_second": 1.0 / seconds_per_step_back_to_back,
        "images_per_second": images_per_step / seconds_per_step_back_to_back,
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": peak_kind,
        "matmul_peak_flops_per_device": peak_flops,
        "matmul_size": matmul_size,
        "first_step_loss": first_loss,
        "page_faults_per_step": page_faults_per_step,
        "system_seconds_per_step": system_seconds_per_step,
        "malloc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    if profile is not None:
        result["profile"] = profile
    if flops_per_step is not None:
        result["model_flops_per_step"] = flops_per_step
        result["model_flops_source"] = flops_source
        result["achieved_flops"] = flops_per_step / seconds_per_step_back_to_back
        result["mfu"] = result["achieved_flops"] / (peak_flops * mesh.size)
    return result


PROFILED_STEPS = 3


def summarize_trace(profile_dir: str, steps: int) -> dict:
    """Device time per operation from the Perfetto trace that jax.profiler wrote under profile_dir.

    Returns {thread name: {'busy_ms_per_step', 'span_ms_per_step',
    'events_per_step', 'ops': [{'name', 'ms_per_step', 'calls_per_step'}]}}
    for every timeline ('XLA Ops', 'XLA Modules', CUDA streams, ...) of the
    processes whose name mentions a GPU/TPU device, its 25 most
    expensive operations first; {} when the trace has no device events (CPU).
    """
    import collections
    import gzip

    paths = sorted(pathlib.Path(profile_dir).glob("**/perfetto_trace.json.gz"))
    if not paths:
        return {}
    events = json.load(gzip.open(paths[-1]))["traceEvents"]
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and any(k in str(e["args"].get("name", "")).lower() for k in ("gpu", "tpu"))}
    thread_names = {(e["pid"], e.get("tid")): str(e["args"].get("name", e.get("tid")))
                    for e in events if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in device_pids}
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids and e.get("dur"):
            by_thread[thread_names.get((e["pid"], e.get("tid")), str(e.get("tid")))].append(e)
    summary = {}
    for thread, thread_events in by_thread.items():
        totals, calls = collections.Counter(), collections.Counter()
        for event in thread_events:
            totals[event["name"]] += event["dur"]
            calls[event["name"]] += 1
        start = min(e["ts"] for e in thread_events)
        end = max(e["ts"] + e["dur"] for e in thread_events)
        summary[thread] = {
            "busy_ms_per_step": sum(totals.values()) / 1e3 / steps,
            "span_ms_per_step": (end - start) / 1e3 / steps,
            "events_per_step": len(thread_events) / steps,
            "ops": [{"name": name[:160], "ms_per_step": total / 1e3 / steps, "calls_per_step": calls[name] / steps}
                    for name, total in totals.most_common(25)],
        }
    return summary


# ---------------------------------------------------------------------------
# Loader: an image-report corpus streamed through the pre-training input pipeline
# ---------------------------------------------------------------------------


def generated_corpus(folder: pathlib.Path, count: int, size: int) -> pathlib.Path:
    """folder/corpus.jsonl of ``synthetic.write_corpus``'s `count` (size, size + 8) PNGs; written unless the
    folder already holds that corpus (as many rows, its last image there at that size)."""
    from PIL import Image

    from amvlm_jax.data import synthetic

    path, last = folder / "corpus.jsonl", folder / "images" / f"{count - 1}.png"
    if path.is_file() and last.is_file():
        with open(path, "rb") as f:
            rows = sum(1 for _ in f)
        with Image.open(last) as image:
            if rows == count and image.size == (size + 8, size):
                return path
    return synthetic.write_corpus(folder, count, size)


def generated_corpus_config(config, path: pathlib.Path):
    """A copy of `config` whose data.corpus reads the generated corpus at `path` (all rows train; the
    modality read as a label, as an evaluation's label field would be)."""
    import ml_collections

    config = config.copy_and_resolve_references()
    config.data.root = ""
    config.data.corpus.update(dict(train=str(path), val="", test="", split_field="", image_field="file",
                                   image_path="{}", text_fields=("findings", "impression"), missing_images="error"))
    config.eval.zero_shot = ml_collections.ConfigDict()
    config.eval.probe_fields = ("meta.modality",)
    return config


def process_memory(pid="self") -> dict:
    """{'rss', 'peak'} bytes of a process (Linux /proc VmRSS and VmHWM, the peak resident set size since
    its start or its last reset_peak_rss); {} where /proc is unavailable or the process is gone."""
    keys = {"VmRSS": "rss", "VmHWM": "peak"}
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    return {keys[k]: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines) if k in keys}


def reset_peak_rss() -> bool:
    """Sets this process's VmHWM back to its current RSS (Linux: clear_refs 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_processes() -> dict:
    """{pid: command line} of this process's descendants (psutil when installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        found = {}
        for child in psutil.Process().children(recursive=True):
            try:
                found[child.pid] = " ".join(child.cmdline())
            except psutil.Error:
                pass
        return found
    pids, found = [os.getpid()], {}
    while pids:
        pid = pids.pop()
        for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            for child in children:
                try:
                    found[child] = pathlib.Path(f"/proc/{child}/cmdline").read_text().replace("\0", " ").strip()
                except OSError:
                    found[child] = ""
                pids.append(child)
    return found


def row_metadata_bytes(split, labels: dict) -> int:
    """Bytes of the per-row data a streamed split keeps: the paths array, and names, reports and labels
    (strings and their lists). Each worker process holds the paths (the pickled images)."""
    lists = [split.names, split.reports, *labels.values()]
    return split.images.paths.nbytes + sum(sys.getsizeof(items) + sum(sys.getsizeof(item) for item in items)
                                           for items in lists)


def time_stream(split, batch_size: int, seed: int, workers: int, batches: int, warmup: int, host) -> dict:
    """Streams `split` as pre-training does with `workers` worker processes; see the module docstring."""
    from amvlm_jax.data import pipeline

    resettable = reset_peak_rss()
    earlier = set(child_processes())
    main_start = process_memory()
    started = time.perf_counter()
    stream = pipeline.training_batches(split, batch_size, seed, with_mask=False, augmentation="none",
                                       worker_count=workers, process_index=0, process_count=1)
    try:
        for _ in range(warmup):
            next(stream)
        warmup_seconds = time.perf_counter() - started
        started = time.perf_counter()
        rows = 0
        for _ in range(batches):
            rows += len(next(stream)["image"])
        loader_seconds = time.perf_counter() - started
        host_seconds, started = 0.0, time.perf_counter()
        for step in range(batches):
            raw = next(stream)
            host_started = time.perf_counter()
            host(raw, step)
            host_seconds += time.perf_counter() - host_started
        with_host_seconds = time.perf_counter() - started
        # Read while the workers run: their peaks go with them.
        children = {pid: (command, process_memory(pid)) for pid, command in child_processes().items()
                    if pid not in earlier}
        main = process_memory()
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    worker_peaks = [memory.get("peak", 0) for command, memory in children.values() if "resource_tracker" not in command]
    return {
        "workers": workers,
        "warmup_seconds": warmup_seconds,
        "images_per_second": rows / loader_seconds,
        "images_per_second_with_host_batch": rows / with_host_seconds,
        "host_batch_ms": 1e3 * host_seconds / batches,
        "main_rss_at_start_bytes": main_start.get("rss"),
        "main_peak_rss_bytes": main.get("peak") if resettable else None,
        "worker_processes": len(worker_peaks),
        "worker_peak_rss_bytes": worker_peaks,
        "worker_peak_rss_total_bytes": sum(worker_peaks),
    }


def run_loader_benchmark(config, corpus_size: int, corpus_dir: str, corpus_image_size: int,
                         workers: list[int], batches: int, warmup: int) -> dict:
    """Streams a generated (or the config's) corpus through the pre-training input pipeline for each worker
    count; returns the measurements as a dict (see the module docstring)."""
    import jax

    from amvlm_jax.config import ConfigError, validate
    from amvlm_jax.data import corpus
    from amvlm_jax.data.tokenize import ReportTokenizer
    from amvlm_jax.train import build, pretrain

    load_before = list(os.getloadavg())
    temporary, generate_seconds, source = None, None, "the config's data.corpus"
    if corpus_size > 0:
        if not corpus_dir:
            temporary = tempfile.TemporaryDirectory(prefix="amvlm_loader_")
        folder = pathlib.Path(corpus_dir or temporary.name)
        started = time.perf_counter()
        path = generated_corpus(folder, corpus_size, corpus_image_size)
        generate_seconds = time.perf_counter() - started
        config = generated_corpus_config(config, path)
        source = f"{corpus_size} generated {corpus_image_size}x{corpus_image_size + 8} PNGs"
    elif not corpus.is_configured(config):
        raise ConfigError("--corpus_size=0 reads the config's corpus, but data.corpus.train is not set")
    else:
        config = config.copy_and_resolve_references()
    config.data.corpus.in_memory_bytes = 0  # Streamed: every image decoded when read.
    validate(config)
    try:
        size = build.pretrain_image_size(config)
        jax.devices()  # The backend's memory is in place before anything is measured.
        reset_peak_rss()
        started = time.perf_counter()
        split, labels, line = corpus.load(config, "train", size, threads=config.data.read_threads)
        load_seconds = time.perf_counter() - started
        after_load = process_memory()
        batch_size = pretrain.capped_batch_size(config.pretrain.batch_size, len(split), 1)
        tokenizer = ReportTokenizer(build.text_encoder_dir(config), config.pretrain.max_length)
        with_view = build.uses_momentum(config)

        def host(raw, step):
            return pretrain.host_batch(raw, tokenizer, split.reports, step, config.seed, with_view)

        runs = [time_stream(split, batch_size, config.seed, count, batches, warmup, host) for count in workers]
    finally:
        if temporary is not None:
            temporary.cleanup()
    return {
        "mode": "loader",
        "corpus": source,
        "corpus_line": line,
        "rows": len(split),
        "generate_seconds": generate_seconds,
        "load_seconds": load_seconds,
        "main_rss_after_load_bytes": after_load.get("rss"),
        "main_peak_rss_while_loading_bytes": after_load.get("peak"),
        "row_metadata_bytes": row_metadata_bytes(split, labels),
        "batch_size": batch_size,
        "image_size": size,
        "host_batch_includes": "tokenisation" + (" + momentum-view augmentation" if with_view else ""),
        "batches": batches,
        "warmup": warmup,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "runs": runs,
    }


def format_result(result: dict) -> str:
    lines = [
        f"mode {result['mode']} on {result['devices']} x {result['device_kind']} ({result['backend']}), "
        f"mesh {result['mesh']}, dtype {result['dtype']}",
        f"  compile             {result['compile_seconds']:.1f} s",
        f"  step                {result['seconds_per_step']:.4f} s back to back ({result['steps']} steps after "
        f"{result['warmup']} warm-up); latency {result['step_latency_seconds']:.4f} s (median, each step waited for)",
        f"  steps/s             {result['steps_per_second']:.3f}",
        f"  images/s            {result['images_per_second']:.2f}  ({result['images_per_step']} per step)",
        f"  peak memory         {result['peak_memory_bytes'] / 2**30:.2f} GiB  [{result['peak_memory_kind']}]",
        f"  host per step       {result['page_faults_per_step']:.0f} page faults, {result['system_seconds_per_step']:.3f} s "
        f"system time (GLIBC_TUNABLES={result['malloc_tunables'] or ''})",
        f"  matmul peak         {result['matmul_peak_flops_per_device'] / 1e9:.1f} GFLOP/s per device "
        f"({result['matmul_size']}^2, {result['dtype']})",
    ]
    if result.get("first_step_loss") is not None:
        lines.append(f"  first-step loss     {result['first_step_loss']:.4f}")
    if "model_flops_per_step" in result:
        lines += [
            f"  model FLOPs/step    {result['model_flops_per_step'] / 1e9:.1f} GFLOP (XLA cost analysis)",
            f"  achieved            {result['achieved_flops'] / 1e9:.1f} GFLOP/s",
            f"  MFU                 {100 * result['mfu']:.1f} %",
        ]
    else:
        lines.append("  model FLOPs/step    unavailable (no XLA cost analysis on this backend)")
    for thread, profile in (result.get("profile") or {}).items():
        lines.append(f"  profile [{thread}]: busy {profile['busy_ms_per_step']:.2f} ms of a {profile['span_ms_per_step']:.2f} ms "
                     f"span per step, {profile['events_per_step']:.0f} events")
        lines += [f"    {op['ms_per_step']:8.3f} ms  x{op['calls_per_step']:<5.0f} {op['name']}" for op in profile["ops"][:12]]
    return "\n".join(lines)


def format_loader_result(result: dict) -> str:
    mib = lambda value: "-" if value is None else f"{value / 2**20:.0f} MiB"  # noqa: E731
    loads = lambda values: " ".join(f"{x:.1f}" for x in values)  # noqa: E731
    generated = "" if result["generate_seconds"] is None else f"; corpus ready in {result['generate_seconds']:.1f} s"
    lines = [
        f"mode loader: {result['corpus']}, streamed (data.corpus.in_memory_bytes=0), batch {result['batch_size']} "
        f"at {result['image_size']}x{result['image_size']}{generated}",
        f"  {result['corpus_line']}",
        f"  read in {result['load_seconds']:.1f} s; main RSS after {mib(result['main_rss_after_load_bytes'])}, "
        f"peak while reading {mib(result['main_peak_rss_while_loading_bytes'])}; "
        f"per-row metadata {result['row_metadata_bytes'] / 2**20:.1f} MiB",
        f"  {result['batches']} batches timed after {result['warmup']} warm-up; "
        f"host_batch = {result['host_batch_includes']}; load average {loads(result['load_average_before'])} before, "
        f"{loads(result['load_average_after'])} after",
        "  workers   images/s   + host_batch   host_batch ms   warm-up s   main peak RSS   workers' peak RSS",
    ]
    for run in result["runs"]:
        each = ", ".join(mib(peak) for peak in run["worker_peak_rss_bytes"])
        workers = f"{mib(run['worker_peak_rss_total_bytes'])} ({each})" if run["worker_processes"] else "-"
        lines.append(f"  {run['workers']:>7}   {run['images_per_second']:8.1f}   "
                     f"{run['images_per_second_with_host_batch']:12.1f}   {run['host_batch_ms']:13.1f}   "
                     f"{run['warmup_seconds']:9.1f}   {mib(run['main_peak_rss_bytes']):>13}   {workers}")
    return "\n".join(lines)


def report(measure, as_json: bool, text) -> str:
    """measure()'s result as JSON (as_json) or as ``text`` formats it. With as_json, what measuring prints (the
    jobs' notes, e.g. a ViT starting from random weights) goes to stderr: stdout is to hold the JSON alone."""
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        result = measure()
    return json_text(result, indent=2) if as_json else text(result)


def main(config):
    import jax

    from amvlm_jax.train.parallel import initialize_distributed

    jax.config.update("jax_enable_compilation_cache", False)  # The compile time reported must be a compilation.
    mode = flags.FLAGS.mode or config.mode
    if mode not in MODES:
        sys.exit(f"error: --mode must be one of {', '.join(MODES)}, got '{mode}'")
    initialize_distributed(config)
    if mode == "loader":
        workers = [int(count) for count in flags.FLAGS.workers.split(",") if count.strip()]
        print(report(lambda: run_loader_benchmark(config, flags.FLAGS.corpus_size, flags.FLAGS.corpus_dir,
                                                  flags.FLAGS.corpus_image_size, workers, flags.FLAGS.batches,
                                                  flags.FLAGS.warmup), flags.FLAGS.json, format_loader_result))
        return
    queue = None
    if flags.FLAGS.queue:
        folder, name, size = flags.FLAGS.queue.rsplit(":", 2)
        queue = (folder, name, int(size))
    print(report(lambda: run_benchmark(config, mode, flags.FLAGS.steps, flags.FLAGS.warmup, flags.FLAGS.profile, queue),
                 flags.FLAGS.json, format_result))


def define_flags():
    flags.DEFINE_enum("mode", None, list(MODES), "Step to time, or loader (default: config.mode).")
    flags.DEFINE_integer("steps", 5, "Timed steps.", lower_bound=1)
    flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation (at least one is run); loader: untimed batches.",
                         lower_bound=0)
    flags.DEFINE_bool("json", False, "Print the measurements as JSON.")
    flags.DEFINE_string("profile", "", "Trace a few more steps into this folder and summarise device time per op.")
    flags.DEFINE_string("queue", "", "FOLDER:NAME:SIZE: compile beside SIZE - 1 other benchmarks sharing FOLDER, "
                        "then time the steps one benchmark at a time (see wait_for_turn).")
    flags.DEFINE_integer("corpus_size", 10000, "loader: rows of the generated corpus; 0 = the config's data.corpus.")
    flags.DEFINE_string("corpus_dir", "", "loader: folder of the generated corpus, reused when it holds one of "
                        "--corpus_size rows (default: a temporary folder, deleted after).")
    flags.DEFINE_integer("corpus_image_size", 32, "loader: the generated PNGs are S x (S + 8).")
    flags.DEFINE_string("workers", "0,2,4", "loader: worker counts (data.worker_count) to time, comma-separated.")
    flags.DEFINE_integer("batches", 50, "loader: batches timed per worker count (then as many through host_batch).",
                         lower_bound=1)


if __name__ == "__main__":
    from amvlm_jax.main import start as start_command

    start_command(main, define_flags)
