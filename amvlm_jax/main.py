"""Entry point: `python -m amvlm_jax.main --config=experiments/<name>.py[:variant] [--workdir=DIR]`.

`--config.a.b=value` overrides any config field; an unknown field is an
error. No --config means experiments/synthetic.py:text_report (the synthetic
data with text masks that localise; experiments/synthetic.py alone uses the
paper's); --workdir defaults to runs/<experiment>[_<variant>]. config.mode
picks the job.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import sys
import threading
from typing import Callable

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = f"{REPO_ROOT / 'experiments' / 'synthetic.py'}:text_report"
# glibc's malloc on transparent huge pages, keeping what is freed for reuse rather than handing it back.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=137438953472"


def malloc_in_huge_pages() -> None:
    """Restarts this process (same interpreter, options and arguments) with GLIBC_TUNABLES=MALLOC_TUNABLES
    on Linux; a no-op elsewhere, after the restart, or when GLIBC_TUNABLES is set already (set it, even
    empty, to opt out).

    XLA's CPU runtime allocates a step's large temporaries anew at every step, and glibc hands out
    allocations above 32 MB as fresh mappings that it returns to the kernel on free, so each step
    faulted all their 4 KiB pages in again: 67,000 faults and 0.15 s of system time in a 0.4 s step of
    the width-16 U-Net at 224x224, batch 4; 710,000 faults and 2.2 s in the SSMIS step at the paper's
    size (docs/benchmarks.md). With freed memory kept by malloc (no mappings of its own, no trimming:
    the process keeps its peak) in huge pages (where the kernel gives them on request, its mode
    '[madvise]'), the faults drop to hundreds and 1,600. glibc reads the tunables only when a process
    starts (huge pages from 2.35; unknown tunables are ignored), hence the exec.
    """
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or not getattr(sys, "orig_argv", None):
        return
    os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:  # Cannot restart: run as started.
        del os.environ["GLIBC_TUNABLES"]


def thread_pool_for_simulated_devices() -> None:
    """With D > 1 simulated CPU devices (--xla_force_host_platform_device_count=D in XLA_FLAGS, or
    JAX_NUM_CPU_DEVICES), gives XLA's CPU thread pool one thread more than it would have, max(cores, D), by
    setting PJRT_NPROC (unless it is set already). Call before jax creates its CPU client.

    An in-process all-reduce holds one pool thread per device until every device has joined it. Once one
    device has started two independent all-reduces, the other devices may find no thread left to join
    either, and the step aborts after 40 s ('Termination timeout for all reduce'): on 2 cores, the
    supervised width-64 U-Net step at 224x224, batch 8, did so every time with D = 2 and D = 4, and ran
    with pools of 3 and 5 threads (docs/benchmarks.md).
    """
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    count = os.environ.get("JAX_NUM_CPU_DEVICES", "")  # jax's own setting; it overrides the XLA flag.
    devices = int(count) if count.isdigit() else int(match.group(1)) if match else 1
    if devices > 1 and "PJRT_NPROC" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["PJRT_NPROC"] = str(max(cores, devices) + 1)


def check_command_line(argv: list[str]) -> str | None:
    """The one-line problem with --config or its overrides, or None.

    Runs before absl parses the flags, whose own errors for a missing file,
    an unknown variant or an unknown key are multi-line tracebacks.
    """
    from amvlm_jax.experiment import load_config

    from ml_collections.config_flags import config_path

    arguments = []
    overrides = []
    for i, arg in enumerate(argv[1:], start=1):
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("--config="):
            arguments.append(arg.split("=", 1)[1])
        elif arg == "--config" and following is not None:
            arguments.append(following)
        elif arg.startswith("--config."):
            name, has_value, value = arg[2:].partition("=")
            overrides.append((name, value if has_value else None, following))
    if len(arguments) > 1:  # absl would read the overrides once per --config and fail on a field 'defined twice'.
        return (f"--config is given {len(arguments)} times ({', '.join(arguments)}): name one experiment file, its "
                "variants after ':' joined by ','")
    argument = arguments[0] if arguments else str(DEFAULT_CONFIG)
    path, _, variant = argument.partition(":")
    if not pathlib.Path(path).is_file():
        return f"{path}: no such experiment file (--config=experiments/<name>.py[:variant])"
    try:
        config = load_config(path, variant)
    except Exception as e:  # The user's experiment file: report, don't trace.
        return f"{path}: {type(e).__name__}: {e}"
    for override, value, following in overrides:
        node, parts = config, override.split(".")[1:]
        for depth, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a section)"
                where = ".".join(["config"] + parts[:depth]) or "config"
                return f"unknown config key '--{override}': {where} has no '{part}' (known: {known})"
            node = node[part]
        for depth in range(1, len(parts) + 1):
            try:
                config_path.split(".".join(parts[:depth]))
            except ValueError:  # A key the command line's parser cannot address (spaces, punctuation).
                section = ".".join(["config"] + parts[:depth - 1])
                return (f"--{override}: the key '{parts[depth - 1]}' holds spaces or punctuation, which the command "
                        f"line cannot address; set its section whole: --{section}=\"{{...}}\" (a Python dict)")
        if value is None and not isinstance(node, bool):
            # absl takes the argument after a field that is not a boolean as its value, also another flag.
            if following is None or following.startswith("--"):
                return f"--{override} needs a value: --{override}=VALUE"
            value = following
        if value is not None and (expected := _unparsable(value, node)):
            return f"--{override}={value}: {override} takes {expected}, got {value!r}"
    return None


def last_overrides(argv: list[str]) -> list[str]:
    """``argv`` with only the last of repeated ``--config.a.b=value`` overrides of one field.

    absl keeps the last value of a repeated flag, but adds up those of a tuple field: ``--config.eval.splits=val,test
    --config.eval.splits=test`` arrived as ('val,test', 'test'). So that a field set again (a copied command with
    one more override) takes its last value whatever its type. A field also given without '=' is left to absl.
    """
    names = [arg[2:].partition("=")[0] if arg.startswith("--config.") else None for arg in argv]
    bare = {arg[2:] for arg in argv if arg.startswith("--config.") and "=" not in arg}
    return [arg for i, (arg, name) in enumerate(zip(argv, names))
            if name is None or name in bare or name not in names[i + 1:]]


def _unparsable(text: str, current) -> str | None:
    """What a field holding `current` takes, when the command line's parser cannot read `text` as it; else None.

    The same parsers as the command line's (absl's for numbers and booleans, a Python dict for a section),
    whose own errors are two lines of Python terms.
    """
    import ast

    if isinstance(current, bool):
        parse, expected = flags.BooleanParser().parse, "true or false"
    elif isinstance(current, int):
        parse, expected = flags.IntegerParser().parse, "an integer"
    elif isinstance(current, float):
        parse, expected = flags.FloatParser().parse, "a number"
    elif isinstance(current, tuple):
        from ml_collections.config_flags import tuple_parser

        parse = tuple_parser.TupleParser().parse
        expected = ("a tuple: values joined by ',' without spaces, or a quoted Python tuple such as "
                    "\"('a b', 'c')\" for values holding spaces")
    elif isinstance(current, ml_collections.ConfigDict):
        def dotted(node: dict) -> list:
            """The keys holding a dot, at any depth (a config key cannot: the parser's own error speaks of ConfigDict)."""
            keys = []
            for key, value in node.items():
                keys += [key] if "." in str(key) else dotted(value) if isinstance(value, dict) else []
            return keys

        def parse(t):
            nonlocal expected
            if not isinstance(value := ast.literal_eval(t), dict):
                raise ValueError(t)
            if keys := [k for k in value if "." in str(k)]:  # eval.zero_shot's label fields.
                expected = (f"keys without dots; a nested corpus field is written with '/' "
                            f"('{str(keys[0]).replace('.', '/')}' for '{keys[0]}')")
                raise ValueError(t)
            if keys := dotted(value):
                expected = f"keys without dots (a config key cannot hold one: '{keys[0]}')"
                raise ValueError(t)
        expected = "a Python dict, e.g. '{\"key\": \"value\"}'"
    else:
        return None
    try:
        parse(text)
    except (ValueError, SyntaxError):
        return expected
    return None


def default_workdir(config_argument: str) -> pathlib.Path:
    path, _, variant = config_argument.partition(":")
    name = pathlib.Path(path).stem + (f"_{variant.replace(',', '_')}" if variant else "")
    return pathlib.Path("runs") / name


def run(config, workdir: str | pathlib.Path) -> dict:
    """Runs the job that config.mode names; returns its results dict.

    The resolved config (the synthetic data root and the pre-trained
    encoders' folder as absolute paths; for 'evaluate' and 'predict', the
    model, data and ssl fields recorded in the checkpoint) is written to
    <workdir>/config.json before the job starts (``config_file``). Evaluate and
    predict take config.eval.checkpoint, else the workdir's checkpoints, else
    its pre-training run's (<workdir>/pretrain).
    """
    from amvlm_jax.config import ConfigError, validate
    from amvlm_jax.train.logging import info

    validate(config)
    workdir = pathlib.Path(workdir).expanduser()  # --workdir=~/runs/x: the shell leaves a '~' after '=' alone.
    if config.mode in ("evaluate", "predict"):
        if not config.eval.checkpoint and not (workdir / "checkpoints").is_dir():
            if not (workdir / "pretrain" / "checkpoints").is_dir():
                raise ConfigError(f"--workdir={workdir}: holds no checkpoint to {config.mode} with; train there first "
                                  "or name one with --config.eval.checkpoint=PATH (a run's workdir, checkpoint or step "
                                  "folder)")
            config = config.copy_and_resolve_references()  # The caller's config stays as it was given.
            config.eval.checkpoint = str(workdir / "pretrain")  # A pre-training run's workdir: its checkpoint.
        config, job = checkpoint_config(config, workdir)
    config = resolve(config, workdir)
    info(f"{config.mode} in {workdir} (resolved config: {config_file(config, workdir)})")
    if config.mode == "supervised":
        from amvlm_jax.train import supervised

        return supervised.train(config, workdir)
    if config.mode == "evaluate" and job == "pretrain":
        from amvlm_jax.train import pretrain

        return pretrain.evaluate_checkpoint(config, workdir, config.eval.checkpoint or workdir)
    if config.mode == "evaluate":
        from amvlm_jax.data import datasets, folders
        from amvlm_jax.train import ssl, supervised

        root = datasets.data_root(config, workdir)
        if not any(folders.has_split(root, split) for split in config.eval.splits):  # Before results.json is rewritten.
            raise ConfigError(f"config.eval.splits={','.join(config.eval.splits)}: {root} holds none of these splits' "
                              f"folders ({', '.join(folders.SPLIT_FOLDERS[s] for s in config.eval.splits)}); nothing "
                              "to evaluate")
        results = supervised.evaluate_checkpoint(config, workdir, config.eval.checkpoint, root=root)
        if config.eval.guidance and job == "ssl":
            ssl.evaluate_guidance(config, workdir, config.eval.checkpoint or str(workdir), root=root)
        return results
    if config.mode == "predict":
        from amvlm_jax.train import predict

        return predict.predict(config, workdir)
    if config.mode == "pretrain":
        from amvlm_jax.train import pretrain

        return pretrain.train(config, workdir)
    if config.mode == "ssl":
        from amvlm_jax.train import ssl

        return ssl.train(config, workdir)
    if config.mode == "all":
        from amvlm_jax.data import folders
        from amvlm_jax.train import pretrain, ssl

        if config.data.name != "synthetic":  # The segmentation stage's folders, before the pre-training's hours.
            try:
                folders.check_root(config.data.root)
            except folders.DataError as error:
                raise folders.DataError(f"config.mode='all' segments after pre-training, on the LViT folders of "
                                        f"data.root: {error}") from None
        pretrain.train(config, workdir)
        return ssl.train(config, workdir)
    raise AssertionError(config.mode)  # validate() admits only known modes.


def checkpoint_config(config, workdir: pathlib.Path):
    """(config with the fields recorded in the checkpoint to evaluate, the job that wrote it).

    A pre-training checkpoint has no segmentation model to predict with: a one-line error (evaluate
    scores its retrieval). Evaluating one with neither eval.zero_shot nor eval.probe_fields set scores the
    labels its run scored (the recorded eval.zero_shot, probe_fields, probe_rows and probe_steps).
    Checkpoints written before configs were recorded keep the command's fields.
    """
    from amvlm_jax.config import RECORDED_SECTIONS, ConfigError, with_recorded
    from amvlm_jax.train import checkpoint

    source = config.eval.checkpoint or workdir
    meta = checkpoint.read_meta(source)
    job = meta.get("job") or ("ssl" if "teacher" in checkpoint.saved_entries(source) else "supervised")
    if job == "pretrain" and config.mode == "predict":
        raise ConfigError(f"{source}: a pre-training checkpoint has no segmentation model ({config.mode}); pass it as "
                          "config.ssl.pretrained of a mode 'ssl' run")
    if config.eval.initial and job != "pretrain":
        raise ConfigError(f"{source}: config.eval.initial scores the encoders a pre-training run started from; "
                          f"this is a '{job}' checkpoint")
    if "config" in meta:
        from amvlm_jax.train.loop import MOVABLE_FIELDS, config_changes, recorded_config
        from amvlm_jax.train.logging import info

        restored = with_recorded(config, meta["config"], keep_data_root=bool(config.data.root))
        moved = restored.data.root and not pathlib.Path(restored.data.root).expanduser().exists()
        if config.mode == "evaluate" and moved and not config.data.root and restored.data.name != "synthetic":
            raise ConfigError(f"{restored.data.root}: the data root that {source} recorded does not exist (moved?); "
                              "pass --config.data.root=DIR")
        # A command's ssl.pretrained stands (with_recorded); a recorded one that is gone gives way to the run's own.
        gone = restored.ssl.pretrained and not pathlib.Path(restored.ssl.pretrained).expanduser().exists()
        if gone and not config.ssl.pretrained:
            beside = checkpoint.resolve_step(source).parents[2] / "pretrain"
            if beside.is_dir():  # A workdir moved whole (mode 'all'): its own pre-training moved with it.
                info(f"{restored.ssl.pretrained}: not there (moved?); the text guidance's encoders are read from "
                     f"{beside}")
                restored.ssl.pretrained = str(beside)
        if moved and not config.data.root and restored.data.name == "synthetic":
            # Generated again in this workdir (``resolve``), not where the moved run once kept it: that path was
            # recreated outside the workdir, or could not be written at all (a run copied from another machine).
            restored.data.root = ""
        # Where the data and the encoders lie and how the data is read are filled in, not replaced: not named;
        # nor are the sections this job's model never reads (a U-Net checkpoint's pre-training fields).
        read = {"supervised": ("unet", "data"), "pretrain": ("pretrain", "data")}.get(job, RECORDED_SECTIONS)
        if changed := config_changes(recorded_config(config), recorded_config(restored), read,
                                     (*MOVABLE_FIELDS, "ssl.pretrained")):
            info(f"{source}: the checkpoint's recorded fields replace the command's: {changed}")
        config = restored
        evaluated = meta["config"].get("eval") or {}
        if job == "pretrain" and not (config.eval.zero_shot or config.eval.probe_fields) and (
                evaluated.get("zero_shot") or evaluated.get("probe_fields")):
            # The command asks for no label scores (e.g. only eval.checkpoint given): the run's own, not none.
            config.eval.zero_shot = ml_collections.ConfigDict(evaluated.get("zero_shot") or {})
            config.eval.probe_fields = tuple(evaluated.get("probe_fields") or ())
            config.eval.probe_rows = evaluated.get("probe_rows", config.eval.probe_rows)
            config.eval.probe_steps = evaluated.get("probe_steps", config.eval.probe_steps)
            info(f"{source}: scoring the labels the run scored (config.eval.zero_shot: "
                 f"{', '.join(config.eval.zero_shot.keys()) or 'none'}; config.eval.probe_fields: "
                 f"{', '.join(config.eval.probe_fields) or 'none'})")
        if config.eval.initial:  # The run's initialisation, not the command's seed.
            config.seed = meta["config"].get("seed", config.seed)
    return config, job


def config_file(config, workdir: pathlib.Path) -> pathlib.Path:
    """Where a run records its resolved config: <workdir>/config.json, but an evaluation or prediction in the
    workdir of a training run writes config_evaluate.json / config_predict.json beside that run's record."""
    path = workdir / "config.json"
    if config.mode in ("evaluate", "predict") and path.is_file():
        try:
            recorded_mode = json.loads(path.read_text()).get("mode")
        except (ValueError, AttributeError, OSError):  # Not a config this project wrote: replaced.
            recorded_mode = None
        if recorded_mode not in (None, "evaluate", "predict"):
            return workdir / f"config_{config.mode}.json"
    return path


def resolve(config, workdir: pathlib.Path):
    """The config as the run uses it, recorded in ``config_file`` (process 0)."""
    import jax

    config = ml_collections.ConfigDict(config.to_dict())
    # Absolute, so that the recorded config finds the data from any folder (evaluating a checkpoint). Corpus
    # files are relative to the current folder unless the user set data.root (not the synthetic data's folder).
    if not config.data.root:
        for split in ("train", "val", "test"):
            if config.data.corpus[split]:
                config.data.corpus[split] = str(pathlib.Path(config.data.corpus[split]).expanduser().absolute())
    if config.data.name == "synthetic" and not config.data.root:
        config.data.root = str((workdir / "data").absolute())
    if config.data.root:
        config.data.root = str(pathlib.Path(config.data.root).expanduser().absolute())
    if config.mode in ("ssl", "all") and not config.ssl.pretrained:
        config.ssl.pretrained = str((workdir / "pretrain").absolute())
    if config.ssl.pretrained:  # Recorded absolute too: the tools and evaluations read it from other folders.
        pretrained = pathlib.Path(config.ssl.pretrained).expanduser().absolute()
        if (pretrained / "pretrain" / "checkpoints").is_dir():  # A run's workdir (mode 'pretrain' or 'all'): its encoders.
            pretrained = pretrained / "pretrain"
        config.ssl.pretrained = str(pretrained)
    from amvlm_jax import hub

    for field in ("text_encoder", "vit_weights"):  # A local file or folder, absolute; a hub id as given.
        if local := hub.local_path(config.pretrain[field]):
            config.pretrain[field] = str(pathlib.Path(local).absolute())
    if jax.process_index() == 0:
        from amvlm_jax.config import ConfigError
        from amvlm_jax.train.logging import json_text
        from amvlm_jax.train.loop import recorded_config

        if workdir.exists() and not workdir.is_dir():
            raise ConfigError(f"--workdir={workdir}: is a file, not a folder")
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            if config.mode not in ("evaluate", "predict"):  # Before the record of the run it would replace.
                hold_for_training(workdir)
            config_file(config, workdir).write_text(json_text(recorded_config(config), indent=2, sort_keys=True) + "\n")
        except OSError as e:  # A file in the way, no permission, a read-only or full disk.
            raise ConfigError(f"--workdir={workdir}: cannot write the run folder there: "
                              f"{e.strerror or e} ({e.filename or workdir})") from None
    return config


# {workdir: its open .lock file}: this process's training locks, held until it ends (closing one releases it).
_held_workdirs: dict[pathlib.Path, object] = {}


def hold_for_training(workdir: pathlib.Path) -> None:
    """Locks <workdir>/.lock for the rest of this process, or raises ConfigError naming the process that holds it.

    Two trainings in one workdir (the same command started twice) both wrote checkpoints/, whose saves then
    collided, and appended every record to metrics.jsonl twice; with other settings the workdir would hold one
    run's latest and the other's best. The system releases the lock however the process ends, also killed, so
    the same command resumes. Workdirs held by this process already (mode 'all', a test) pass.
    """
    import fcntl

    from amvlm_jax.config import ConfigError

    if workdir.resolve() in _held_workdirs:
        return
    lock = open(workdir / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a process"
        lock.close()
        raise ConfigError(f"--workdir={workdir}: {holder} is training there; wait for it to end or stop it, or "
                          "choose another --workdir") from None
    lock.truncate(0)
    lock.write(f"process {os.getpid()}")
    lock.flush()
    _held_workdirs[workdir.resolve()] = lock


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that a run reports in one line (bad config, data, weights, checkpoint, diverged training)."""
    from amvlm_jax.config import ConfigError
    from amvlm_jax.data.folders import DataError
    from amvlm_jax.train.checkpoint import CheckpointError
    from amvlm_jax.train.loop import TrainingError
    from amvlm_jax.weights import WeightError

    return ConfigError, DataError, WeightError, CheckpointError, TrainingError


def file_problem(error: OSError) -> str:
    """The one line for a file or folder of the run that could not be written or read: its path, the
    system's reason and what to do about it."""
    remedies = {(errno.ENOSPC,): "free space on that disk", (errno.EDQUOT,): "free space under your quota",
                (errno.EROFS, errno.EACCES, errno.EPERM): "make it writable or choose another folder",
                (errno.ENOTDIR, errno.EEXIST): "a file stands where a folder belongs: move it away",
                (errno.EISDIR,): "a folder stands where a file belongs: move it away"}
    remedy = next((text for codes, text in remedies.items() if error.errno in codes), "fix it")
    path = pathlib.Path(error.filename)
    if error.errno == errno.ENOTDIR:  # The system names the file it wanted below the one in the way.
        path = next((above for above in reversed(path.parents) if above.exists() and not above.is_dir()), path)
    return f"{path}: {error.strerror or error}; {remedy}, then run the same command again"


def leave(message: str) -> None:
    """Ends the process with ``message`` on stderr (exit status 1), at once where threads are left that the
    interpreter would wait for: a save that the system refused leaves Orbax's save threads waiting 300 s for a
    step folder that never comes. Nothing completed is lost: the training loop waits for its saves before an
    error leaves it, and a save cut short stays a temporary folder that no reader takes for a step."""
    if any(thread.is_alive() and not thread.daemon for thread in threading.enumerate()
           if thread is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        os._exit(1)
    sys.exit(message)


def quiet_background_failures(record) -> bool:
    """A logging filter: False for Orbax's and asyncio's records. A save that the system refuses is logged by
    every one of Orbax's threads with a traceback (1,900 lines on a full disk); it reaches the run as one
    exception, which ends it in one line."""
    return not ("/orbax/" in record.pathname or record.name == "asyncio")


HELP_FLAGS = ("help", "?", "helpshort", "helpfull", "helpxml")  # absl's, each printing and exiting.


def start(job: Callable[[ml_collections.ConfigDict], None], define_job_flags: Callable[[], None] = lambda: None) -> None:
    """The command-line start of main and of the tools in tools/.

    Checks --config and its overrides first (one-line errors), defines
    --config plus the caller's flags, then runs job(config) with quiet
    logging (Orbax logs every file it writes and warns on every read-only
    restore; --verbosity brings it back) and the compilation cache on. A
    user error, a file or folder that the system refuses (in the way, read-only, a
    full disk) or Ctrl-C ends the process with one line; a Ctrl-C that
    Python drops inside a garbage-collector callback ends it at the next
    step or batch. On Linux the process first restarts itself with malloc
    on huge pages (malloc_in_huge_pages); with simulated CPU devices, XLA's
    thread pool gets a thread more (thread_pool_for_simulated_devices).
    """
    malloc_in_huge_pages()
    thread_pool_for_simulated_devices()
    problem = check_command_line(sys.argv)
    if problem:
        sys.exit(f"error: {problem}")
    sys.argv = last_overrides(sys.argv)
    # After the check: config_flags parses the overrides as soon as the flag is defined.
    config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Experiment file, optionally ':variant'.", lock_config=True)
    define_job_flags()

    def absl_main(argv):
        if len(argv) > 1:  # app.UsageError would print the module's docstring above it.
            sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])} (a field's value follows '=': "
                     "--config.a.b=value)")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.ERROR)
            logging.get_absl_handler().addFilter(quiet_background_failures)
        from amvlm_jax.config import split_name_lists
        from amvlm_jax.train.loop import catching_interrupts
        from amvlm_jax.train.parallel import enable_compilation_cache

        config = flags.FLAGS.config
        try:
            split_name_lists(config)  # --config.eval.splits=val,test
            enable_compilation_cache(config)
            with catching_interrupts():  # A Ctrl-C that Python drops still stops the next step or batch.
                job(config)
        except user_errors() as e:
            leave(f"error: {e}")
        except OSError as e:  # A file of the run's in the way, read-only, or a full disk, wherever it is written.
            if e.filename is None:
                raise
            leave(f"error: {file_problem(e)}")
        except KeyboardInterrupt as e:  # The loop's own message says what it saved; outside it nothing was.
            sys.exit(f"{e}" if str(e) else "interrupted before anything new was saved: the same command starts "
                     "again (or resumes from the last checkpoint, if there is one)")

    def parse_flags(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:  # absl's own report is two lines ('FATAL Flags parsing error', then a hint).
            sys.exit(f"error: {e}")
        except SystemExit as e:  # absl ends the help it printed with status 1: the help asked for is no failure.
            if e.code == 1 and any(arg.lstrip("-").partition("=")[0] in HELP_FLAGS for arg in argv[1:]):
                sys.exit(0)
            raise

    app.run(absl_main, flags_parser=parse_flags)


def main(config: ml_collections.ConfigDict) -> None:
    from amvlm_jax.train.parallel import initialize_distributed

    from amvlm_jax.config import ConfigError

    if flags.FLAGS["workdir"].present and not flags.FLAGS.workdir.strip():  # --workdir=$UNSET: not the default's run.
        raise ConfigError("--workdir is empty: name the run folder, or leave --workdir out for runs/<experiment>")
    workdir = flags.FLAGS.workdir or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    initialize_distributed(config)  # Before anything touches the devices.
    run(config, workdir)


if __name__ == "__main__":
    start(main, lambda: flags.DEFINE_string(
        "workdir", None, "Run folder for checkpoints, logs and results (default runs/<experiment>)."))
