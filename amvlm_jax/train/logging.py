"""Metrics to JSONL and TensorBoard, and messages to the terminal; only process 0 writes."""

from __future__ import annotations

import json
import pathlib
import time

import jax
from tqdm import tqdm


def info(message: str) -> None:
    """Prints a message from process 0 only (through tqdm, so that a progress bar stays intact)."""
    if jax.process_index() == 0:
        tqdm.write(message)


class MetricWriter:
    """Appends {'step', 'time', **metrics} lines to <workdir>/metrics.jsonl and TensorBoard events."""

    def __init__(self, workdir: str | pathlib.Path):
        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
