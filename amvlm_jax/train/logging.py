"""Metrics to JSONL and TensorBoard, messages to the terminal (only process 0 writes), and the strict JSON and
whole-file writes of every record the project leaves."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
import time
from typing import Callable


def finite_or_null(value):
    """``value`` (dicts, lists and tuples nested) with every NaN and infinity as None."""
    if isinstance(value, float):  # Also numpy's float64, a float subclass.
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def json_text(value, **options) -> str:
    """Strict JSON of ``value``: a NaN or infinity (a metric undefined on an empty split or class, a diverged
    loss) written as null. Python's json writes them as NaN and Infinity, which are no JSON: jq, JavaScript
    and strict parsers refuse the whole file. Readers take a null where they expect a number as NaN
    (``null_as_nan``). options: json.dumps's (indent, sort_keys)."""
    return json.dumps(finite_or_null(value), allow_nan=False, **options)


def null_as_nan(value):
    """``value`` (dicts and lists nested) with every None as NaN: the numbers of a file ``json_text`` wrote,
    read back as they were computed (a file written before, with NaN itself, reads the same)."""
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {key: null_as_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [null_as_nan(item) for item in value]
    return value


def write_atomically(path: pathlib.Path, text: str) -> None:
    """Writes a file whole or not at all: a kill or a full disk mid-write leaves the previous file (readers
    took a results row cut inside a number for a number) and a .tmp beside it."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def csv_text(rows: list[list]) -> str:
    """Rows as CSV text (the csv module's quoting and line ends)."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def info(message: str) -> None:
    """Prints a message from process 0 only (through tqdm, so that a progress bar stays intact)."""
    import jax
    from tqdm import tqdm

    if jax.process_index() == 0:
        tqdm.write(message)


TENSORBOARD_FLUSH_SECONDS = 1  # A record is in the event file about this long after it is written.


class MetricWriter:
    """Appends {'step', 'time', **metrics} lines to <workdir>/metrics.jsonl and TensorBoard events.

    A run that resumes at ``start_step`` first drops the records it will write again: those after
    ``start_step`` (logged before a kill that came after the last checkpoint), those at it for which
    ``rewritten`` is true (the evaluation of a step or epoch that the checkpoint's meta says is unfinished),
    all of them when it starts from step 0, and a last line that a kill cut short (appending to it would
    merge two records into one unreadable line). TensorBoard is told to hide every earlier event from
    ``start_step`` on (``purge_step``: it purges by step, not by record), and the records kept at
    ``start_step`` are written to TensorBoard again, so that it shows what metrics.jsonl holds.
    """

    def __init__(self, workdir: str | pathlib.Path, start_step: int,
                 rewritten: Callable[[dict], bool] = lambda record: False):
        import jax  # Here, not above: the tools that only read this project's JSON import this module.

        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            kept_at_start = self._drop_records_from(start_step, rewritten) if self.path.is_file() else []
            # An event file is named by the second it was opened in and is opened for writing, so a run
            # resumed within that second would erase its predecessor's file without a suffix of its own.
            # Its thread writes the queued events and flushes the file every flush_secs (flush() here reaches
            # only what the thread has written): at the default 120 s, TensorBoard showed a record 2 minutes late.
            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"), purge_step=start_step,
                                     filename_suffix=f".from-step-{start_step}", flush_secs=TENSORBOARD_FLUSH_SECONDS)
            for record in kept_at_start:
                record = null_as_nan(record)  # Every field is a number: a null was a NaN.
                scalars = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))}
                self._to_tensorboard(start_step, scalars, record.get("time"))

    def _drop_records_from(self, start_step: int, rewritten: Callable[[dict], bool]) -> list[dict]:
        """Rewrites metrics.jsonl without the records this run writes again; returns those kept at start_step."""
        # Line by line: a kill may leave any bytes at the end, and a line kept with bytes that are no UTF-8
        # would stop every later reader of the file (the curves at the end of this run).
        text = self.path.read_bytes()
        lines = text.splitlines()
        kept, kept_at_start, unreadable = [], [], 0
        for line in lines:
            try:
                record = json.loads(line.decode("utf-8"))
                step = int(record["step"])
            except (ValueError, TypeError, KeyError):  # Also a UnicodeDecodeError.
                unreadable += 1
                continue
            if start_step and (step < start_step or step == start_step and not rewritten(record)):
                kept.append(line.decode("utf-8"))
                if step == start_step:
                    kept_at_start.append(record)
        if len(kept) == len(lines) and (not text or text.endswith(b"\n")):  # Else the next line would merge.
            return kept_at_start
        write_atomically(self.path, "".join(line + "\n" for line in kept))
        dropped = len(lines) - len(kept) - unreadable
        info(f"{self.path}: dropped {dropped} records that this run writes again (its checkpoint is at step {start_step})"
             + (f", and {unreadable} lines that are no record with a step (cut short or damaged)" if unreadable else ""))
        return kept_at_start

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        now = time.time()
        with open(self.path, "a") as f:
            f.write(json_text({"step": int(step), "time": now, **scalars}) + "\n")
        self._to_tensorboard(step, scalars, now)

    def _to_tensorboard(self, step: int, scalars: dict, walltime: float | None) -> None:
        for name, value in scalars.items():
            self._tb.add_scalar(name, float(value), int(step), walltime=walltime)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
