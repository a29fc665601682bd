"""Multi-process start-up, the device mesh, and the shardings of batches and parameters.

Mesh: two axes ('data', 'fsdp') of sizes config.mesh.data x config.mesh.fsdp
(-1 = all devices the other axis leaves). Every global batch is split over
both axes, so each device holds batch / (data * fsdp) rows; parameters are
replicated, except that leaves with at least config.mesh.fsdp_min_size
elements are split over 'fsdp' along their largest dimension divisible by
the fsdp size (fully sharded data parallelism: XLA all-gathers a weight
where it is used and reduce-scatters its gradient). Optimiser moments and
momentum-encoder copies have their parameters' shapes, so the same
shape-based rule shards them alike.

Multi-process runs (several hosts, or several processes on one host):
``initialize_distributed(config)`` must run before anything touches the
devices; see its docstring for how the processes are found.
"""

from __future__ import annotations

import os
import pathlib
import weakref
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from amvlm_jax.config import ConfigError

MESH_AXES = ("data", "fsdp")


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


def enable_compilation_cache(config) -> str | None:
    """Points jax's persistent compilation cache at config.compilation_cache; returns the folder in use.

    Left alone when $JAX_COMPILATION_CACHE_DIR (or an earlier call) already
    set one. Only compilations of a second or more are stored, so the cache
    holds the train, evaluation and initialisation steps, not small helpers.
    """
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if not config.compilation_cache:
        return None
    folder = os.path.expanduser(config.compilation_cache)
    if os.path.exists(folder) and not os.path.isdir(folder):  # jax would only warn at every entry it writes.
        raise ConfigError(f"config.compilation_cache={config.compilation_cache}: is a file, not a folder "
                          "('' turns the cache off)")
    above = next(p for p in pathlib.Path(folder).absolute().parents if p.exists())
    if not above.is_dir():  # A folder below a file: jax would warn at every entry it reads or writes.
        raise ConfigError(f"config.compilation_cache={config.compilation_cache}: {above} is a file, not a folder "
                          "('' turns the cache off)")
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder


def _int_env(name: str, default: int = 0) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else default


def detected_cluster() -> str | None:
    """The multi-process launcher seen in the environment, or None for a single process.

    'jax-env': JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES > 1, JAX_PROCESS_ID.
    'slurm': SLURM_NTASKS > 1 inside a job step (srun).
    'openmpi': OMPI_COMM_WORLD_SIZE > 1 (mpirun).
    'tpu-pod': TPU_WORKER_HOSTNAMES naming more than one host.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and _int_env("JAX_NUM_PROCESSES") > 1:
        return "jax-env"
    if _int_env("SLURM_NTASKS") > 1 and "SLURM_STEP_NODELIST" in os.environ:
        return "slurm"
    if _int_env("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "tpu-pod"
    return None


def initialize_distributed(config) -> int:
    """Connects this process to the others of a multi-process run; returns the process count.

    Call before the first use of jax devices. In order of precedence:
      1. config.distributed.num_processes > 1: explicit
         coordinator_address ('host:port' of process 0), num_processes and
         process_id (-1 = JAX_PROCESS_ID from the environment).
      2. config.distributed.mode == 'off': single process, environment ignored.
      3. mode 'on', or mode 'auto' and ``detected_cluster()`` finds a launcher:
         the JAX_* variables are passed explicitly; for SLURM, Open MPI and
         TPU pods ``jax.distributed.initialize()`` detects everything itself.
    CPU processes exchange collectives through gloo
    (config.distributed.cpu_collectives), without which a cross-process
    computation on CPU fails. A second call, or a call after an earlier
    initialisation, does nothing.
    """
    dist = config.distributed
    if dist.mode not in ("auto", "on", "off"):
        raise ConfigError(f"config.distributed.mode must be 'auto', 'on' or 'off', got '{dist.mode}'")
    if jax.distributed.is_initialized():
        return jax.process_count()
    kwargs: dict[str, Any] = {}
    if dist.num_processes > 1:
        process_id = dist.process_id if dist.process_id >= 0 else _int_env("JAX_PROCESS_ID", -1)
        if not dist.coordinator_address or not 0 <= process_id < dist.num_processes:
            raise ConfigError(
                "config.distributed.num_processes > 1 needs coordinator_address ('host:port') and a "
                f"process_id in [0, {dist.num_processes}) (got '{dist.coordinator_address}', {process_id})"
            )
        kwargs = dict(coordinator_address=dist.coordinator_address, num_processes=int(dist.num_processes),
                      process_id=int(process_id))
    elif dist.mode == "off":
        return 1
    else:
        cluster = detected_cluster()
        if cluster is None and dist.mode == "auto":
            return 1
        if cluster == "jax-env":
            count, process_id = _int_env("JAX_NUM_PROCESSES"), _int_env("JAX_PROCESS_ID", -1)
            if not 0 <= process_id < count:  # Read as 0, every process would claim process 0's place.
                raise ConfigError(f"$JAX_PROCESS_ID={os.environ.get('JAX_PROCESS_ID', '')!r}: a run of "
                                  f"$JAX_NUM_PROCESSES={count} processes needs each one's id in [0, {count})")
            kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=count,
                          process_id=process_id)
    if dist.cpu_collectives:
        # Only read by the CPU backend; must be set before that backend starts.
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
        # XLA's CPU scheduler for concurrency orders a program's independent collectives differently in
        # different processes, whose gloo exchanges then pair a tensor with another ("Received data size
        # doesn't match": the mean-teacher step failed within ten steps in five of five two-process runs,
        # and ran when it was off). Read when the first program compiles; a user's own setting is kept.
        if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
    # Its SIGTERM handler would replace the one train/loop.py's catching_interrupts installed, and a
    # preempted run would train on instead of saving (this project stops on SIGTERM itself).
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as error:  # Mode 'on' where jax finds no launcher either: no coordinator to reach.
        raise ConfigError(f"config.distributed.mode='{dist.mode}': no multi-process run to join "
                          f"({str(error).rstrip('.')}); start the processes under a launcher, set "
                          "config.distributed.coordinator_address, num_processes and process_id, or use mode 'auto'"
                          ) from None
    return jax.process_count()


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set on any process (collective: every process calls it, in the same order)."""
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


# ---------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------


def mesh_shape(config, device_count: int) -> tuple[int, int]:
    """(data, fsdp) sizes from config.mesh for `device_count` available devices."""
    data, fsdp = int(config.mesh.data), int(config.mesh.get("fsdp", 1))
    if data == -1 and fsdp == -1:
        raise ConfigError("config.mesh.data and config.mesh.fsdp cannot both be -1")
    if data == -1:
        data = device_count // fsdp if fsdp > 0 else 0
    if fsdp == -1:
        fsdp = device_count // data if data > 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp > device_count:
        raise ConfigError(
            f"config.mesh.data={config.mesh.data} x config.mesh.fsdp={config.mesh.get('fsdp', 1)} "
            f"does not fit the {device_count} available devices"
        )
    return data, fsdp


def make_mesh(config, devices=None, batch_size: int | None = None, field: str = "config.train.batch_size") -> Mesh:
    """The ('data', 'fsdp') mesh over the first data * fsdp of `devices` (default jax.devices()).

    batch_size (default config.train.batch_size; the config ``field`` that
    sets it, for the error) must divide over all data * fsdp devices, since
    the batch is split over both axes; 0: no batch to check (an evaluation
    that pads its own batches to a multiple of the devices).
    jax.devices() lists each process's devices together, so each process's
    devices form whole rows of the mesh and hold a contiguous block of the batch.
    """
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = mesh_shape(config, len(devices))
    batch_size = config.train.batch_size if batch_size is None else batch_size
    if batch_size % (data * fsdp):
        raise ConfigError(f"{field}={batch_size} is not divisible by the {data * fsdp} devices of the "
                          f"{data}x{fsdp} (data x fsdp) mesh")
    return Mesh(np.asarray(devices[: data * fsdp]).reshape(data, fsdp), MESH_AXES)


def replicate(mesh: Mesh, tree):
    """Places every leaf of `tree` on all devices of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


# ---------------------------------------------------------------------------
# Parameter sharding
# ---------------------------------------------------------------------------


def fsdp_partition(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> PartitionSpec:
    """Where a leaf of `shape` is split: its largest dimension divisible by fsdp_size, over 'fsdp'.

    Replicated (PartitionSpec()) when fsdp_size is 1, the leaf has fewer
    than min_size elements (gathering small leaves costs more than it
    saves), or no dimension divides. Ties go to the last dimension.
    """
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    candidates = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda i: (shape[i], i))
    return PartitionSpec(*([None] * axis + ["fsdp"]))


def state_shardings(mesh: Mesh, tree, min_size: int):
    """NamedSharding of every leaf of `tree` (arrays or ShapeDtypeStructs) under ``fsdp_partition``."""
    fsdp_size = mesh.shape.get("fsdp", 1)

    def sharding(leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, fsdp_partition(shape, fsdp_size, min_size))

    return jax.tree.map(sharding, tree)


def fsdp_min_size(config) -> int:
    return int(config.mesh.get("fsdp_min_size", 1 << 18))


def init_sharded(mesh: Mesh, config, create, *arguments):
    """``create(*arguments)`` placed on the mesh by ``state_shardings`` (large leaves FSDP-sharded, the rest
    replicated) without a whole state on any one device.

    ``create`` runs under jit with those shardings as its outputs' (shapes from ``jax.eval_shape``, then the
    initialisation compiled straight into place), so each device computes only its shards of the
    FSDP-sharded leaves, their optimiser moments and momentum copies included. ``arguments`` (loaded weights
    as host arrays, or None) go to the devices under the same shape rule first. Same values as the eager
    path (made whole, then placed; tested on the 2 x 4 mesh), except where XLA fuses arithmetic with the
    initialisers: MGCA's prototype normalisation rounds differently in the last bit or two, which puts an
    MGCA run on another trajectory than under the eager path (docs/results.md, MedPix).
    """
    abstract = jax.eval_shape(create, *arguments)
    min_size = fsdp_min_size(config)
    arguments = jax.device_put(arguments, state_shardings(mesh, arguments, min_size))
    # A flat list of outputs: a state's static fields (its optax transformation) would not match the
    # abstract tree's in an out_shardings pytree; the abstract tree's structure puts the leaves back.
    leaves = jax.jit(lambda *values: jax.tree.leaves(create(*values)),
                     out_shardings=jax.tree.leaves(state_shardings(mesh, abstract, min_size)))(*arguments)
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def abstract_sharded(mesh: Mesh, abstract_tree, config):
    """ShapeDtypeStructs of `abstract_tree` carrying ``state_shardings``: a checkpoint restore target."""
    shardings = state_shardings(mesh, abstract_tree, fsdp_min_size(config))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


class StepKeepingShardings:
    """``jax.jit(step, donate_argnums=0)`` for ``step(state, *args) -> (state, metrics)`` whose returned state
    keeps the shardings the state came in with (``init_sharded``'s, or a restored checkpoint's).

    Left to itself, XLA's sharding propagation may hand back small replicated leaves FSDP-sharded (24
    leaves of the tiny test model did so); the next call then meets new input shardings and compiles the
    whole step a second time, and the state no longer sits where ``init_sharded`` and the checkpoint
    restore put it. One compiled step per distinct placement of the state (a test may run the same step
    on several meshes); leaves not placed on a mesh are left to the compiler.
    """

    def __init__(self, step):
        self.step = step
        self._jitted = {}  # (treedef, shardings) -> jitted step
        self._last_output, self._last_jitted = None, None

    def _for(self, state):
        leaves, treedef = jax.tree.flatten(state)
        key = (treedef, tuple(getattr(x, "sharding", None) for x in leaves))
        if key not in self._jitted:
            pinned = [s if isinstance(s, NamedSharding) else None for s in key[1]]
            self._jitted[key] = jax.jit(self.step, donate_argnums=0,
                                        out_shardings=(jax.tree.unflatten(treedef, pinned), None))
        return self._jitted[key]

    def __call__(self, state, *args):
        # A training loop passes back the state the last call returned: its placement is known, and
        # looking it up (hashing hundreds of shardings) would cost a millisecond a step.
        if self._last_output is not None and self._last_output() is state:
            jitted = self._last_jitted
        else:
            jitted = self._for(state)
        new_state, metrics = jitted(state, *args)
        self._last_output, self._last_jitted = weakref.ref(new_state), jitted
        return new_state, metrics

    def lower(self, state, *args):
        """The AOT stage of the step for these arguments (``jax.jit(...).lower``)."""
        return self._for(state).lower(state, *args)


def abstract_replicated(mesh: Mesh, abstract_tree):
    """ShapeDtypeStructs of `abstract_tree` (e.g. ``jax.eval_shape`` of an initialisation) replicated on the
    mesh: a checkpoint restore target that costs no initialisation (a U-Net's compiles for 10 s on CPU)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_tree)


def gather_to_host(tree):
    """Numpy copies of every leaf, also of arrays spread over several processes (collective: call on all)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
