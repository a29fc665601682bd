"""Shared test setup: 8 simulated CPU devices, data locations, tiny configs."""

import os

# Must precede the first jax import: gives the process 8 CPU devices so that
# multi-device steps can be compared with single-device ones.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles hundreds of small programs, most of them run a few times: compiling is most of
# its time, and LLVM's optimisation passes are most of that (a tiny U-Net's initialisation: 23 s at
# the default level, 5.5 s without them, on 2 cores). Convolutions and matmuls call the same library
# kernels at either level. The training steps hold a few thousand small elementwise fusions (Adam,
# the EMAs and the norms, per parameter leaf), each of which the CPU backend's MLIR fusion emitter
# lowers through its own pass pipeline; its older emitter compiles them in 60 % of the time (a tiny
# pre-training step: 19.6 s -> 12.3 s). Left alone on other platforms (tests/test_gpu.py) and where
# the caller chose; the job and tools/benchmark.py compile with XLA's defaults, and a test in
# tests/test_supervised.py checks that both settings train alike.
SUITE_COMPILER_FLAGS = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false"}
if os.environ["JAX_PLATFORMS"] == "cpu":
    for _name, _value in SUITE_COMPILER_FLAGS.items():
        if _name not in os.environ["XLA_FLAGS"]:
            os.environ["XLA_FLAGS"] += f" --{_name}={_value}"

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache per test session, inherited by the
# subprocesses the tests start: the same U-Net initialisation and steps are
# compiled by many tests (10 s each on 2 cores). Fresh per session, so that
# the suite's time is what a clean machine sees.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="amvlm_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


# Put first on a job subprocess's path: an `import torch` there fails, as on a machine where only the project
# is installed (the job must not need torch), and tensorboardX, which imports torch where it can (2.5 s a
# process), does without.
WITHOUT_TORCH = REPO_ROOT / "tests" / "without_torch"


def one_device_env(**extra) -> dict:
    """os.environ for a job subprocess with one CPU device and no torch: XLA_FLAGS less the device count,
    WITHOUT_TORCH first on PYTHONPATH, plus ``extra``."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    path = os.pathsep.join(p for p in (str(WITHOUT_TORCH), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, XLA_FLAGS=" ".join(flags), PYTHONPATH=path, **extra)


def xla_defaults_env() -> dict:
    """``one_device_env()`` less SUITE_COMPILER_FLAGS: a subprocess that compiles as the job does."""
    env = one_device_env()
    env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if not any(n in f for n in SUITE_COMPILER_FLAGS))
    return env


PRETRAIN_IMAGE_SIZE = 32
PRETRAIN_BATCH = 8

# Reports with word pieces, commas and padding, shared by the pre-training tests.
SAMPLE_REPORTS = [
    "The nuclei density in the lower left is high.",
    "Bilateral pulmonary infection, two infected areas, upper left and upper right.",
    "one lesion",
    "Unremarkable.",
    "Two lesions in the upper right and lower left cells.",
    "Dense nuclei everywhere",
    "no lesion",
    "A faint lesion, centre.",
]


def _shared_folder(env_var: str, relative: str, marker: str) -> pathlib.Path | None:
    """$env_var, else ../shared/<relative> beside the repo: the first that holds ``marker``."""
    for candidate in (os.environ.get(env_var, ""), str(REPO_ROOT.parent / "shared" / relative)):
        if candidate and (pathlib.Path(candidate) / marker).exists():
            return pathlib.Path(candidate)
    return None


def _required_folder(env_var: str, relative: str, marker: str, what: str) -> pathlib.Path:
    """``_shared_folder``, else the test is skipped, saying where ``what`` should be."""
    root = _shared_folder(env_var, relative, marker)
    if root is None:
        pytest.skip(f"{what} not found: set {env_var} or place it at ../shared/{relative}")
    return root


@pytest.fixture(scope="session")
def monuseg():
    """The real MoNuSeg data: $AMVLM_MONUSEG_ROOT, else ../shared/datasets/MoNuSeg beside the repo."""
    return _required_folder("AMVLM_MONUSEG_ROOT", "datasets/MoNuSeg", "Train_Folder", "real MoNuSeg data")


@pytest.fixture(scope="session")
def medpix():
    """The real MedPix-2.0 corpus: $AMVLM_MEDPIX_ROOT, else ../shared/datasets/MedPix-2.0 beside the repo."""
    return _required_folder("AMVLM_MEDPIX_ROOT", "datasets/MedPix-2.0", "splits/descriptions_train.jsonl",
                            "real MedPix-2.0 data")


def repo_module(path: str):
    """A file of the repository (e.g. 'tools/compare.py') as a module: experiments/ and tools/ are no packages."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Where dataclasses look up the module of a class being defined.
    spec.loader.exec_module(module)
    return module


def experiment_module(name: str):
    """experiments/<name>.py as a module."""
    return repo_module(f"experiments/{name}.py")


@pytest.fixture(scope="session")
def parity():
    """Loads one parity fixture by file name: (arrays dict, meta dict). The authors' outputs on fixed
    inputs: $AMVLM_PARITY_ROOT, else ../shared/parity beside the repo."""
    import json

    import numpy as np

    root = _required_folder("AMVLM_PARITY_ROOT", "parity", "manifest.json", "the parity fixtures")

    def load(name: str):
        with np.load(root / name) as data:
            arrays = {key: data[key] for key in data.files if key != "meta"}
            meta = json.loads(str(data["meta"]))
        return arrays, meta

    return load


def interrupt_inside_a_gc_callback():
    """Ctrl-C whose handler runs inside a garbage-collector callback (as it can inside jax's), where
    Python reports the KeyboardInterrupt it raises and drops it. The caller sets a SIGINT handler first
    (a pytest-xdist worker ignores SIGINT).

    gc.collect() returns at once, calling no callback, while another thread's collection is under way
    (Orbax's and TensorBoard's threads collect too): it is called again until the callback has run in
    this thread, else the test would train on without a Ctrl-C now and then."""
    import gc
    import signal
    import threading
    import time

    fired = threading.Event()

    def callback(phase, info):
        if phase == "start" and threading.current_thread() is threading.main_thread() and not fired.is_set():
            fired.set()
            signal.raise_signal(signal.SIGINT)

    gc.callbacks.append(callback)
    try:
        deadline = time.monotonic() + 60
        while True:
            gc.collect()
            if fired.is_set():
                break
            assert time.monotonic() < deadline, "no garbage collection could start in 60 s"
            time.sleep(0.001)
    finally:
        gc.callbacks.remove(callback)


def with_fields(config, fields: dict):
    """``config`` with each dotted field of ``fields`` ('section.field': value) set; returns it."""
    for path, value in fields.items():
        node, (*sections, leaf) = config, path.split(".")
        for section in sections:
            node = node[section]
        node[leaf] = value
    return config


def tiny_synthetic_config(**overrides):
    """The synthetic experiment shrunk to seconds per epoch on 2 cores."""
    config = experiment_module("synthetic").get_config()
    config.mode = "supervised"
    config.data.labeled_fraction = 1.0
    config.data.image_size = 64
    config.data.synthetic.num_train = 16
    config.data.synthetic.num_val = 8
    config.data.synthetic.num_test = 8
    config.unet.base_width = 4
    config.train.batch_size = 8
    config.train.eval_batch_size = 8
    config.train.epochs = 2
    config.train.log_every_steps = 1
    config.mesh.data = 1  # Tests that need 8 devices build their meshes themselves.
    return with_fields(config, overrides)


def tiny_pretrain_config(**overrides):
    settings = {
        "mode": "pretrain",
        "pretrain.vit": "Ti/16",
        "pretrain.vit_width": 32,
        "pretrain.vit_depth": 1,
        "pretrain.vit_heads": 2,
        "pretrain.text_weights_init": "random",
        "pretrain.text_layers": 1,
        "pretrain.text_hidden": 32,
        "pretrain.text_heads": 2,
        "pretrain.embed_dim": 16,
        "pretrain.head_hidden": 32,
        "pretrain.pdt_heads": 4,
        "pretrain.pdt_dropout": 0.0,  # Dropout's random bits double the step's compile time.
        "pretrain.max_length": 12,
        "pretrain.image_size": PRETRAIN_IMAGE_SIZE,
        "pretrain.batch_size": PRETRAIN_BATCH,
        "pretrain.epochs": 3,
        "pretrain.lr": 1e-3,
        "pretrain.log_every_steps": 1,
        "pretrain.mgca.num_prototypes": 10,
    }
    settings.update(overrides)
    return tiny_synthetic_config(**settings)


def write_corpus(folder: pathlib.Path, count: int, size: int = 40, seed: int = 0, splits=("train",)) -> pathlib.Path:
    """synthetic.write_corpus with SAMPLE_REPORTS as the findings."""
    from amvlm_jax.data import synthetic

    return synthetic.write_corpus(folder, count, size, seed, splits, findings=SAMPLE_REPORTS)


def corpus_config(path: pathlib.Path, **overrides):
    """tiny_pretrain_config reading the corpus ``write_corpus`` made (one file; splits by its split field)."""
    config = tiny_pretrain_config(**overrides)
    corpus = config.data.corpus
    corpus.train = str(path)
    corpus.split_field = "meta.split"
    corpus.image_field = "file"
    corpus.text_fields = ("findings", "impression")
    config.data.name = "corpus"
    return config
