"""The one training loop every job runs: steps, evaluators, checkpoints, logs, resume.

A job (supervised, mean teacher, pre-training) describes itself as a
``Job``: its state, its jitted step, its batches indexed by step, the
evaluators to call and at what cadence, and which of their metrics picks
the best checkpoint. ``run`` does the rest the same way for every job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import signal
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
from tqdm import tqdm

from amvlm_jax import visualize
from amvlm_jax.data import pipeline
from amvlm_jax.train import checkpoint, parallel
from amvlm_jax.train.logging import MetricWriter, info, null_as_nan

# Step metrics that describe the optimisation rather than the objective (not averaged into the
# job's loss terms).
TELEMETRY = ("grad_norm", "param_norm")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss), described in one line."""


@dataclasses.dataclass
class Evaluator:
    """A function of the state that returns {metric name: value}, and when the loop calls it.

    every_epochs: after every that many epochs (and the last; 0: only the
    last). every_steps > 0: also every that many steps. at_start: once
    before the first step of a fresh run, logged as epoch 0 (the untrained
    model's numbers).
    """

    run: Callable[[Any], dict]
    every_epochs: int = 1
    every_steps: int = 0
    at_start: bool = False

    def due(self, epoch: int, last: bool) -> bool:
        return last or (self.every_epochs > 0 and epoch % self.every_epochs == 0)

    def due_at_step(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0


@dataclasses.dataclass
class Job:
    """What ``run`` needs to train a model.

    name: recorded in every checkpoint's meta ('supervised', 'ssl', 'pretrain').
    workdir: where checkpoints/, metrics.jsonl, tensorboard/ and curves.png go.
    state: the initial state on the mesh, or its abstract shapes and
      shardings (``jax.ShapeDtypeStruct`` leaves) when the workdir holds a
      checkpoint to resume from.
    train_step: jitted (state, global batch) -> (state, metrics with 'loss').
    batches: start step -> iterator over this process's numpy share of each
      step's batch from that step on. Because the stream is indexed by
      step, a run continues exactly where its checkpoint was taken.
    best_metric: the evaluator metric whose maximum is the best checkpoint;
      None: the newest state is the best.
    end_of_epoch: state -> state after each epoch, before evaluation and the
      checkpoint (the BatchNorm statistics refresh).
    pictures: (state, epoch) -> None, called every picture_every_epochs epochs
      and at the last (overlays of a few validation images).
    unused_fields: config fields or sections that the job does not read
      (free to change when it resumes, and not named as changed).
    meta: entries of the job's own, recorded in every checkpoint's meta
      beside the loop's (the mean teacher's guiding pre-training step).
    batch_size: the global batch the stream is cut into (recorded; a run resumed with another is refused,
      since step s of the stream then holds other examples); 0: not recorded.
    """

    name: str
    workdir: pathlib.Path
    mesh: Any
    config: Any
    state: Any
    train_step: Callable
    batches: Callable[[int], Iterator[dict]]
    steps_per_epoch: int
    epochs: int
    evaluators: list[Evaluator] = dataclasses.field(default_factory=list)
    best_metric: Optional[str] = "val/dice"
    checkpoint_every_epochs: int = 1
    log_every_steps: int = 10
    learning_rate: Optional[Callable[[int], Any]] = None  # step -> the rate (train/lr), or {name: rate} (train/<name>).
    end_of_epoch: Optional[Callable[[Any], Any]] = None
    pictures: Optional[Callable[[Any, int], None]] = None
    picture_every_epochs: int = 0
    unused_fields: tuple[str, ...] = ()
    meta: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 0


def recorded_config(config) -> dict:
    """The resolved config as plain JSON values (what config.json and each checkpoint's meta hold)."""
    return json.loads(config.to_json_best_effort())


def fresh_meta(job: Job) -> dict:
    """The meta of a run at its start. run_id: drawn here and kept by every resume (``resume_point`` lays the
    saved meta over this), so that two runs in one folder, or a run started over, are told apart (a mean
    teacher records its pre-training's). Each process draws its own; only process 0's is written and read."""
    return {"job": job.name, "run_id": uuid.uuid4().hex, "steps_per_epoch": job.steps_per_epoch,
            "batch_size": job.batch_size, "epoch": 0, "best_metric": job.best_metric, "best": None, "best_epoch": 0,
            "seconds": 0.0, "initial_eval": {}, "last_eval": {}, "first_epoch": {}, "last_epoch": {}}


def run(job: Job) -> tuple[Any, dict]:
    """Trains ``job`` for its epochs, continuing from the workdir's latest checkpoint; (state, meta).

    After every epoch the epoch means of the step metrics and the due
    evaluators' metrics go to JSONL/TensorBoard and a checkpoint is written
    every checkpoint_every_epochs epochs and at the last; the state is also
    saved as the best whenever best_metric improved (at the last epoch when
    the job has none). Every
    log_every_steps steps: the step metrics, steps/s and the learning rate.
    A non-finite loss raises TrainingError before anything is saved, leaving
    the last good checkpoint; Ctrl-C saves the current state first, with
    what the resumed run needs to write the records an uninterrupted run
    writes: the epoch's step metrics so far, an evaluation or an epoch's end
    (end_of_epoch unless it had run, evaluation, record, best check,
    checkpoint) that was cut short. Every exit closes the checkpoint
    managers.
    """
    with catching_interrupts():
        return _run(job)


def _run(job: Job) -> tuple[Any, dict]:
    workdir = pathlib.Path(job.workdir)
    checkpoints = checkpoint.RunCheckpoints(workdir)
    writer = None
    current = {"state": job.state}  # The newest state, also when an epoch is cut short.
    meta, interrupted = None, False
    try:
        orphaned = checkpoints.discard_orphaned_best()
        if orphaned is not None:
            info(f"{workdir}/checkpoints/best/{orphaned}: deleted, a run without a latest checkpoint left it; this "
                 "run starts at step 0 and writes its own")
        state, meta = resume_point(checkpoints, job)
        current["state"] = state
        meta |= {"job": job.name, "config": recorded_config(job.config), **job.meta}
        start_step = int(state.step)
        epochs_trained = start_step // job.steps_per_epoch
        # Stopped after an epoch's last step, before its checkpoint; in a step's evaluation.
        unfinished_epoch = epochs_trained > meta["epoch"]
        unfinished_evaluation = meta.get("unfinished_step_evaluation") == start_step
        writer = MetricWriter(workdir, start_step, lambda record: (unfinished_epoch and "epoch" in record) or (
            unfinished_evaluation and "epoch" not in record and "train/loss" not in record))
        if start_step == 0:
            info(f"{job.name}: {parameter_count(state.params):,} trained parameters")
            starting = _evaluate(job, state, lambda evaluator: evaluator.at_start)
            if starting:
                meta["initial_eval"] = meta["last_eval"] = starting
                writer.write(0, {"epoch": 0, **starting})
                info("before training: " + format_metrics(starting))
        if unfinished_evaluation:
            info(f"evaluating step {start_step} first (its evaluation was cut short)")
            _evaluate_at_step(job, current["state"], start_step, meta, checkpoints, writer)
        if unfinished_epoch:
            unfinished = meta.get("unfinished_epoch") or {}
            taken = _saved_step_metrics(meta, job.steps_per_epoch)  # Taken out of meta either way.
            means = unfinished.get("means") or _means(taken)
            info(f"finishing epoch {epochs_trained} first (its end-of-epoch work was cut short)")
            _finish_epoch(job, current, epochs_trained - 1, means,
                          unfinished.get("seconds", 0.0), unfinished.get("refreshed", False), meta, checkpoints, writer)
        batches = job.batches(start_step)
        for epoch in range(epochs_trained, job.epochs):
            _run_epoch(job, current, batches, epoch, meta, checkpoints, writer)
        stop_if_interrupted()  # A Ctrl-C lost during the last epoch's evaluation: still an interrupted run.
    except KeyboardInterrupt:
        interrupted = True
        if meta is None:  # Interrupted while restoring: nothing new to save.
            raise
        if _forced.is_set():
            raise KeyboardInterrupt(f"interrupted without saving; {workdir}/checkpoints/latest keeps step "
                                    f"{checkpoints.latest.latest_step()}: run the same command to resume") from None
        step = int(current["state"].step)
        unsaved = checkpoints.latest.latest_step() != step
        if unsaved:
            _refresh_before_saving(job, current, meta, step)
        if current.get("step_metrics"):  # Stopped mid-epoch: the resumed run's epoch means need these too.
            meta["epoch_step_metrics"] = _step_metrics_for_meta(jax.device_get(current["step_metrics"]))
        if unsaved:
            checkpoints.save(step, current["state"], dict(meta), is_best=False)
        checkpoints.wait()
        raise KeyboardInterrupt(f"interrupted: saved {workdir}/checkpoints/latest/{step}; run the same command to resume")
    finally:
        checkpoints.wait()
        checkpoints.close()
        if writer is not None:
            writer.close()
            # Not after Ctrl-C: it may have cut plotting's first import short, which a second import would trip on.
            if jax.process_index() == 0 and not interrupted:
                visualize.save_curves(workdir)
    return current["state"], meta


def _refresh_before_saving(job: Job, current: dict, meta: dict, step: int) -> None:
    """Runs end_of_epoch on a state stopped between its epoch's last step and end_of_epoch, before it is saved,
    and records that in meta's ``unfinished_epoch`` (with the epoch's means), so that the checkpoint holds the
    state that the epoch's evaluation, record and best check see. Saved as it was, the checkpoint's state and
    meta disagreed once the resumed run finished the epoch: evaluating or predicting from that latest
    checkpoint (the fallback where no best exists yet) used BatchNorm statistics from before the refresh."""
    unfinished = meta.get("unfinished_epoch") or {}
    at_epoch_end = step % job.steps_per_epoch == 0 and step // job.steps_per_epoch > meta["epoch"]
    # A step evaluation still due at this step sees the state before end_of_epoch when the run resumes.
    pending = meta.get("unfinished_step_evaluation") == step
    if job.end_of_epoch is None or not at_epoch_end or unfinished.get("refreshed") or pending:
        return
    # Stopped before _finish_epoch took the means (they are in meta then): the epoch's steps are all in current.
    means = unfinished.get("means") or _means(jax.device_get(current.pop("step_metrics", None) or []))
    current["state"] = job.end_of_epoch(current["state"])  # A second Ctrl-C here stops without saving.
    meta["unfinished_epoch"] = {"means": means, "seconds": unfinished.get("seconds", 0.0), "refreshed": True}


# Set by catching_interrupts' handler on Ctrl-C; stop_if_interrupted raises on it.
_interrupted = threading.Event()
# Set inside interrupts_deferred: the handler only sets _interrupted, unless it already was.
_deferring = threading.Event()
# Set by a second Ctrl-C inside interrupts_deferred: the state may be half-updated, so nothing is saved.
_forced = threading.Event()


def _multiprocess() -> bool:
    # Not jax.process_count(): a signal handler must not be the first to start the backends.
    return jax.distributed.is_initialized()


@contextlib.contextmanager
def catching_interrupts():
    """While active, Ctrl-C (SIGINT) and SIGTERM (a scheduler's stop, a preemption notice) also set a flag
    on which ``stop_if_interrupted`` raises KeyboardInterrupt, so that training, evaluation and
    prediction stop at their next step or batch even when the first KeyboardInterrupt was lost.

    Python drops an exception raised inside a garbage-collector callback (jax registers one), and
    with it a KeyboardInterrupt that lands there: training went on after Ctrl-C in 3 of 6 tries.
    In a multi-process run a signal may reach one process only (Ctrl-C in one host's terminal), and a
    process that stopped alone would leave the others waiting in a collective: there the first signal
    only sets the flag, and the processes stop together at the first stop_if_interrupted after it; a
    second one stops its process at once, without saving.
    Only a signal's default handler is replaced (a process started with SIGINT ignored, as background
    jobs are, keeps ignoring it; an enclosing catching_interrupts keeps its own), and only from the
    main thread, where signal handlers can be set. The flags are cleared on entry and exit.
    """
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    caught = [number for number, default in defaults.items() if signal.getsignal(number) is default]
    if threading.current_thread() is not threading.main_thread() or not caught:
        yield
        return

    def on_interrupt(signum, frame):
        if _deferring.is_set() or _multiprocess():
            if not _interrupted.is_set():
                _interrupted.set()
                where = "where all processes agree" if _multiprocess() else "after this step"
                sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping {where} (again: stop now, without saving)\n")
                return
            _forced.set()
        _interrupted.set()
        raise KeyboardInterrupt

    _clear_interrupt_flags()
    previous = {number: signal.getsignal(number) for number in caught}
    try:
        for number in caught:  # Inside: a Ctrl-C right after it still restores the old one.
            signal.signal(number, on_interrupt)
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _clear_interrupt_flags()


def _clear_interrupt_flags() -> None:
    _interrupted.clear()
    _forced.clear()


def stop_if_interrupted(settle: Any = None) -> None:
    """Raises KeyboardInterrupt if Ctrl-C was pressed under ``catching_interrupts`` (called between steps
    and batches). In a multi-process run every process calls it at the same points, and it raises on
    all of them if any process's flag is set: a reduction over the processes, which waits for
    ``settle`` (arrays still being computed) first, since collectives of two computations that
    overlap can pair up wrongly across processes (CPU devices run them concurrently)."""
    if not _multiprocess():
        if _interrupted.is_set():
            raise KeyboardInterrupt
        return
    jax.block_until_ready(settle)
    if parallel.any_process(_interrupted.is_set()):
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_deferred():
    """Under ``catching_interrupts``, a Ctrl-C inside the block raises KeyboardInterrupt at its end:
    for changes that land together or not at all (a checkpoint and the record it goes with). A second
    Ctrl-C inside it stops at once (a first step's compilation can take minutes); the loop then saves
    nothing. In a multi-process run a first Ctrl-C waits for stop_if_interrupted, wherever it lands."""
    _deferring.set()
    try:
        yield
    finally:
        _deferring.clear()
    if not _multiprocess():
        stop_if_interrupted()


def _run_epoch(job: Job, current: dict, batches, epoch: int, meta: dict, checkpoints, writer) -> None:
    started = time.time()
    first = int(current["state"].step) - epoch * job.steps_per_epoch  # > 0 when resuming mid-epoch.
    progress = tqdm(range(first, job.steps_per_epoch), desc=f"{job.name} epoch {epoch + 1}/{job.epochs}",
                    initial=first, total=job.steps_per_epoch, leave=False, disable=jax.process_index() != 0)
    step_metrics = current["step_metrics"] = _saved_step_metrics(meta, first)
    logged_at, logged_step = time.time(), epoch * job.steps_per_epoch + first
    for index in progress:
        # A Ctrl-C whose KeyboardInterrupt was dropped. Processes agree where the device has caught up
        # anyway (a logged step is read back), so that no step waits for the agreement.
        if index == first or (epoch * job.steps_per_epoch + index) % job.log_every_steps == 0 or not _multiprocess():
            stop_if_interrupted(settle=current["state"])
        batch = next(batches)  # Outside: grain workers stop at a Ctrl-C to the process group.
        with interrupts_deferred():  # A step and its record (a stop between them lost the record).
            state, metrics_now = job.train_step(current["state"], pipeline.to_global(job.mesh, batch))
            current["state"] = state
            step_metrics.append(metrics_now)
            # Counted on the host: reading state.step would wait for the device after every step.
            step = epoch * job.steps_per_epoch + index + 1
            if step % job.log_every_steps == 0:
                logged = {f"train/{k}": v for k, v in jax.device_get(metrics_now).items()}
                check_finite(float(logged["train/loss"]), step, job.workdir)
                now = time.time()
                logged["train/steps_per_second"] = (step - logged_step) / max(now - logged_at, 1e-9)
                logged_at, logged_step = now, step
                if job.learning_rate is not None:
                    rates = job.learning_rate(step - 1)
                    logged |= {f"train/{name}": rate for name, rate in rates.items()} if isinstance(rates, dict) \
                        else {"train/lr": rates}
                progress.set_postfix(loss=f"{float(logged['train/loss']):.4f}")
                writer.write(step, logged)
            if any(evaluator.due_at_step(step) for evaluator in job.evaluators):
                meta["unfinished_step_evaluation"] = step
        if meta.get("unfinished_step_evaluation") == step:
            evaluating = time.time()
            _evaluate_at_step(job, state, step, meta, checkpoints, writer)
            logged_at += time.time() - evaluating  # Steps/s time the steps alone, as across an epoch's end.
    means = _means(jax.device_get(step_metrics))  # Kept in current until meta holds them (a Ctrl-C saves them).
    _finish_epoch(job, current, epoch, means, time.time() - started, False, meta, checkpoints, writer)


def _step_metrics_for_meta(step_metrics: list) -> dict:
    """The steps' metrics (host values) as JSON, with their dtypes: read back by ``_saved_step_metrics``."""
    return {"dtypes": {k: str(np.asarray(v).dtype) for k, v in step_metrics[0].items()},
            "values": [{k: np.asarray(v).item() for k, v in m.items()} for m in step_metrics]}


def _saved_step_metrics(meta: dict, count: int) -> list:
    """The metrics of an epoch's first ``count`` steps, as the checkpoint of a run stopped after them
    holds them (taken out of meta); [] when it holds no such list."""
    saved = meta.pop("epoch_step_metrics", None)
    if not saved or len(saved["values"]) != count:
        return []
    return [{k: np.asarray(v, saved["dtypes"][k]) for k, v in values.items()} for values in saved["values"]]


def _means(step_metrics: list) -> dict:
    """Epoch means over the steps' metrics (those this run took, when it resumed mid-epoch from a
    checkpoint without the earlier ones); {} for no steps."""
    return {k: float(np.mean([m[k] for m in step_metrics])) for k in (step_metrics[0] if step_metrics else ())}


def _evaluate_at_step(job: Job, state, step: int, meta: dict, checkpoints, writer) -> None:
    """The evaluators due every so many steps; until their record is written, meta carries
    ``unfinished_step_evaluation`` (a run stopped in between evaluates that step when it resumes)."""
    evaluated = _evaluate(job, state, lambda evaluator: evaluator.due_at_step(step))
    with interrupts_deferred():
        writer.write(step, evaluated)
        del meta["unfinished_step_evaluation"]
        if checkpoints.latest.latest_step() == step:  # Resumed to evaluate: its checkpoint says it is done.
            checkpoints.replace_latest_meta(step, dict(meta))


def _evaluate(job: Job, state, due: Callable[[Evaluator], bool]) -> dict:
    """The metrics of the due evaluators, run once the state is computed (their checks for Ctrl-C are
    collectives in a multi-process run: see stop_if_interrupted)."""
    jax.block_until_ready(state)
    evaluated = {}
    for evaluator in job.evaluators:
        if due(evaluator):
            evaluated |= evaluator.run(state)
    return evaluated


def _finish_epoch(job: Job, current: dict, epoch: int, means: dict, seconds: float, refreshed: bool, meta: dict,
                  checkpoints, writer) -> None:
    """An epoch's end: end_of_epoch, the due evaluators, the best check, the record and the checkpoint.

    Until its checkpoint is written, meta carries ``unfinished_epoch`` (the training means and seconds,
    whether end_of_epoch has run), so that a run stopped in between and resumed finishes it.
    """
    state = current["state"]
    step = int(state.step)
    if "loss" in means:  # Absent only when finishing the epoch of a checkpoint written before they were kept.
        check_finite(means["loss"], step, job.workdir)
    started = time.time() - seconds
    meta["unfinished_epoch"] = unfinished = {"means": means, "seconds": seconds, "refreshed": refreshed}
    current.pop("step_metrics", None)
    refresh = job.end_of_epoch is not None and not refreshed
    # Resumed to finish the epoch whose checkpoint was written before end_of_epoch ran (by code older than
    # _refresh_before_saving): that checkpoint keeps its state, and its meta says to run end_of_epoch after
    # restoring it.
    saved_before_end = refresh and checkpoints.latest.latest_step() == step
    if refresh:
        # Not cut short, so that a checkpoint written on Ctrl-C holds the state its meta describes.
        with interrupts_deferred():
            state = current["state"] = job.end_of_epoch(state)
            unfinished["refreshed"] = True
    last = epoch + 1 == job.epochs
    evaluated = _evaluate(job, state, lambda evaluator: evaluator.due(epoch + 1, last))
    if job.best_metric is None:
        is_best = True
    else:
        value = evaluated.get(job.best_metric)
        # A NaN best (a score undefined that epoch) is no best: checkpoint meta keeps it as null, a resume reads None.
        best = meta["best"]
        is_best = value is not None and (best is None or not np.isfinite(best) or value > best)
    seconds = time.time() - started
    with interrupts_deferred():  # Written again on resume unless all of it lands.
        del meta["unfinished_epoch"]
        if evaluated:
            meta["last_eval"] = evaluated
        if is_best and job.best_metric is not None:
            meta |= {"best": float(value), "best_epoch": epoch + 1}
        meta |= {"epoch": epoch + 1, "seconds": meta["seconds"] + seconds}
        if means:  # Empty when finishing the epoch of a checkpoint written before the means were kept.
            meta["last_epoch"] = means
            if epoch == 0:
                meta["first_epoch"] = means
        writer.write(step, {"epoch": epoch + 1, **{f"train/epoch_{k}": v for k, v in means.items()},
                            **evaluated, "epoch_seconds": seconds})
        due = last or (epoch + 1) % job.checkpoint_every_epochs == 0 or checkpoints.latest.latest_step() == step
        as_best = is_best and (last or job.best_metric is not None)
        if due or as_best:  # A best epoch between two due saves is saved as the best only.
            checkpoints.save(step, state, dict(meta), as_best, latest=due,
                             latest_meta=dict(meta, end_of_epoch_after_restore=True) if saved_before_end else None)
    best = ""
    if job.best_metric is not None and meta["best"] is not None:
        best = f"(best {job.best_metric} {meta['best']:.2f} @ {meta['best_epoch']})"
    loss = f"loss {means['loss']:.4f}" if "loss" in means else ""
    # Joined so that an epoch without evaluation reads 'loss 0.1234 (best ...)', not with two spaces.
    info(f"epoch {epoch + 1}: " + " ".join(part for part in (loss, format_metrics(evaluated), best) if part)
         + f" [{seconds:.1f}s]")
    every = job.picture_every_epochs
    if job.pictures is not None and every and ((epoch + 1) % every == 0 or last):
        job.pictures(state, epoch + 1)  # Collective in multi-process runs: every process computes.


def format_metrics(values: dict) -> str:
    """'name value' pairs to 2 decimals; the counts of scored rows ('.../rows') as whole numbers."""
    return " ".join(f"{k} {v:.0f}" if k.endswith("/rows") else f"{k} {v:.2f}" for k, v in values.items())


def parameter_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def check_finite(loss: float, step: int, workdir: pathlib.Path) -> None:
    """Raises TrainingError (one line, naming the checkpoint kept) when the loss is NaN or infinite."""
    if not np.isfinite(loss):
        raise TrainingError(
            f"loss is {loss} at step {step}; stopped without saving, {workdir}/checkpoints/latest keeps the last good state "
            "(lower the learning rate or check the data)"
        )


def resume_point(checkpoints: checkpoint.RunCheckpoints, job: Job) -> tuple[Any, dict]:
    """(state, meta) of the latest checkpoint, or the job's fresh state with a fresh meta.

    A checkpoint of another job, one written for other data (a changed
    DATA_FIELDS leaf, or training data that gives another number of steps
    per epoch: files moved with other rows), or one whose shapes differ from this run's (a changed
    model field) stops with a one-line CheckpointError naming the job or the
    fields that differ from the recorded config.
    """
    saved = checkpoints.latest_meta()
    if saved is None:
        return job.state, fresh_meta(job)
    where = f"{job.workdir}/checkpoints/latest"
    if saved.get("job", job.name) != job.name:
        raise checkpoint.CheckpointError(f"{where}: a checkpoint of a '{saved['job']}' run, not '{job.name}'; "
                                         "use another workdir")
    recorded = recorded_config(job.config)
    changed = config_changes(saved.get("config"), recorded, DATA_FIELDS,
                             MOVABLE_FIELDS + job.unused_fields)
    if changed:
        raise checkpoint.CheckpointError(f"{where}: written for other data ({changed}); resume with the same "
                                         "fields or use another workdir")
    if saved.get("steps_per_epoch", job.steps_per_epoch) != job.steps_per_epoch:  # Moved files, other rows.
        raise checkpoint.CheckpointError(f"{where}: written with {saved['steps_per_epoch']} steps per epoch, this "
                                         f"run's training data, batch size and devices give {job.steps_per_epoch}; "
                                         "resume as it was trained or use another workdir")
    if job.batch_size and saved.get("batch_size", job.batch_size) != job.batch_size:  # Same steps, other examples.
        raise checkpoint.CheckpointError(f"{where}: written with a global batch of {saved['batch_size']}, this run's "
                                         f"is {job.batch_size}; resume with the batch size it was trained with or use "
                                         "another workdir")

    def misfit(reason: str) -> checkpoint.CheckpointError:
        changed = config_changes(saved.get("config"), recorded, SHAPE_FIELDS)
        reason = f"fields changed since it was written: {changed}" if changed else reason
        return checkpoint.CheckpointError(f"{where}: does not fit this run's state ({reason}); "
                                          "restore them or use another workdir")

    try:  # Checks the parameter shapes before reading (checkpoint._check_params_fit).
        state, meta = checkpoints.restore_latest(job.state)
    except checkpoint.DamagedCheckpoint:
        raise
    except (ValueError, KeyError, TypeError) as error:  # CheckpointError is a ValueError.
        raise misfit(checkpoint.first_line(error)) from None
    meta = fresh_meta(job) | meta
    for key in ("initial_eval", "last_eval", "first_epoch", "last_epoch", "unfinished_epoch"):  # Metrics: null was NaN.
        if meta.get(key) is not None:
            meta[key] = null_as_nan(meta[key])
    if meta.pop("end_of_epoch_after_restore", False) and job.end_of_epoch is not None:
        state = job.end_of_epoch(state)  # Saved before it ran; its epoch was finished by a resumed run.
    if meta["best"] is None and meta.get("best_val_dice", -1.0) >= 0:  # Written before the loop was shared.
        meta["best"] = meta.pop("best_val_dice")
    info(f"resuming from {where} at step {int(state.step)} (epoch {meta['epoch']} complete)")
    saved_config = saved.get("config") or {}
    ignored = RESUME_FREE_FIELDS + MOVABLE_FIELDS + job.unused_fields
    was, now = (str((config.get("ssl") or {}).get("pretrained") or "") for config in (saved_config, recorded))
    if was and now == str((pathlib.Path(job.workdir) / "pretrain").absolute()) and not pathlib.Path(was).exists():
        ignored += ("ssl.pretrained",)  # The run's own pre-training, moved with its workdir: no change.
    changed = config_changes(saved_config, recorded, tuple(set(saved_config) | set(recorded)), ignored)
    if changed:  # A longer schedule or another rate may be meant; a loss weight or a flag rarely is.
        info(f"the rest of the run trains with fields changed since {where} was written: {changed}")
    return state, meta


# The fields that decide a state's shapes: a changed one is named when a checkpoint does not fit.
SHAPE_FIELDS = ("unet", "pretrain", "ssl", "data.num_classes", "dtype")
# The fields that decide what a job trains on and in which order: a resumed run keeps them (the
# synthetic data is regenerated, the labelled images drawn anew, the batches shuffled by the seed), but
# for where the files are and how they are read.
DATA_FIELDS = ("seed", "data")
# Fields that say how or where a run is carried out, not what it trains: a resume that changes them goes unmentioned.
RESUME_FREE_FIELDS = ("mode", "mesh", "distributed", "eval", "predict")
MOVABLE_FIELDS = ("data.root", "data.corpus.train", "data.corpus.val", "data.corpus.test", "data.corpus.in_memory_bytes",
                  "data.worker_count", "data.read_threads")


def config_changes(recorded: dict | None, current: dict, fields: tuple[str, ...], ignored: tuple[str, ...] = (),
                   prefix: str = "") -> str:
    """'config.a.b=old -> new, ...' for the leaves under ``fields`` and not under ``ignored`` that differ
    between two recorded configs ('' if none, or no config was recorded)."""
    if not recorded:
        return ""
    under = lambda name, roots: any(name == f or name.startswith(f + ".") for f in roots)  # noqa: E731
    changes = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            nested = config_changes(old, new, fields, ignored, f"{prefix}{key}.")
            if nested:
                changes.append(nested)
        elif old != new and under(f"{prefix}{key}", fields) and not under(f"{prefix}{key}", ignored):
            changes.append(f"config.{prefix}{key}={old!r} -> {new!r}")
    return ", ".join(changes)
