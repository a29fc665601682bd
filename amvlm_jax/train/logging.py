"""Metrics to JSONL and TensorBoard, and messages to the terminal; only process 0 writes."""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import time
from typing import Callable

import jax
from tqdm import tqdm


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
    if jax.process_index() == 0:
        tqdm.write(message)


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
        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            kept_at_start = self._drop_records_from(start_step, rewritten) if self.path.is_file() else []
            # An event file is named by the second it was opened in and is opened for writing, so a run
            # resumed within that second would erase its predecessor's file without a suffix of its own.
            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"), purge_step=start_step,
                                     filename_suffix=f".from-step-{start_step}")
            for record in kept_at_start:
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
            f.write(json.dumps({"step": int(step), "time": now, **scalars}) + "\n")
        self._to_tensorboard(step, scalars, now)

    def _to_tensorboard(self, step: int, scalars: dict, walltime: float | None) -> None:
        for name, value in scalars.items():
            self._tb.add_scalar(name, float(value), int(step), walltime=walltime)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
