"""Run metrics: one JSON object a line in `DIR/metrics.jsonl`, TensorBoard event files, a progress bar."""

from __future__ import annotations

import json
import os
import posixpath

import tensorflow as tf
from tqdm import tqdm


class MetricWriter:
    """Appends rows `{"step": s, **metrics}`; on resume, drops rows past the restored step (they will be redone)."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.path = posixpath.join(workdir, "metrics.jsonl")
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        self._file = open(self.path, "a")
        self._summary = tf.summary.create_file_writer(posixpath.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        with self._summary.as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar(name, value)
        self._summary.flush()

    def close(self) -> None:
        self._file.close()
        self._summary.close()


def read_metrics(workdir: str) -> list[dict]:
    with open(posixpath.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_bar(total: int, initial: int, name: str) -> tqdm:
    """Steps with steps/s and ETA."""
    return tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True, mininterval=1.0)
