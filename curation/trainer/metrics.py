"""Run metrics: the rows (`train_row`, checked finite), one JSON object a line in `DIR/metrics.jsonl`, TensorBoard
event files, a progress bar."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from tqdm import tqdm

from curation.trainer import run_files

log = logging.getLogger(__name__)

CHANCE = "chance/"  # prefix of a metric's chance level: chance/zeroshot/colour beside zeroshot/colour


def task_label(name: str) -> str:
    """A task's metric name as tables and plots show it: zeroshot/colour -> colour, retrieval_r1 -> retrieval R@1."""
    return name.removeprefix("zeroshot/").replace("retrieval_r1", "retrieval R@1")


def _emulated_gcs(path: str) -> bool:
    """A gs:// path while STORAGE_EMULATOR_HOST points Google's Python clients at an emulator: TensorFlow's own GCS
    client has no endpoint setting, so it would try (and wait on) the real service."""
    return path.startswith("gs://") and bool(os.environ.get("STORAGE_EMULATOR_HOST"))


class MetricWriter:
    """Rows `{"step": s, **metrics}` in `metrics.jsonl` and as TensorBoard scalars. On resume, rows past the restored
    step are dropped (they will be redone). The file is rewritten whole at every write, never appended to, so it
    works on object stores (gs://) as on a disk; a run logs a few thousand rows at most."""

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
        self.path = run_files.join(workdir, "metrics.jsonl")
        self._rows: list[str] = []
        if run_files.exists(self.path):
            self._rows = [
                line
                for line in run_files.read_text(self.path).splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            self._rewrite()
        self._summary = None
        events = run_files.join(workdir, "tensorboard")
        if tensorboard and _emulated_gcs(events):
            log.warning(
                "not writing TensorBoard events to %s: TensorFlow's GCS client cannot be pointed at the "
                "emulator at STORAGE_EMULATOR_HOST (metrics.jsonl is written)",
                events,
            )
        elif tensorboard:
            import tensorflow as tf

            self._summary = tf.summary.create_file_writer(events)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._rows.append(json.dumps({"step": step, **metrics}))
        self._rewrite()
        if self._summary is not None:
            import tensorflow as tf

            with self._summary.as_default(step=step):
                for name, value in metrics.items():
                    tf.summary.scalar(name, value)
            self._summary.flush()

    def _rewrite(self) -> None:
        run_files.write_text(self.path, "".join(row + "\n" for row in self._rows))

    def close(self) -> None:
        if self._summary is not None:
            self._summary.close()


class NoMetrics:
    """What a process other than the primary writes: nothing."""

    def write(self, step: int, metrics: dict[str, float]) -> None:
        del step, metrics

    def close(self) -> None:
        pass


def read_metrics(workdir: str) -> list[dict]:
    return [
        json.loads(line)
        for line in run_files.read_text(run_files.join(workdir, "metrics.jsonl")).splitlines()
        if line.strip()
    ]


def progress_bar(total: int, initial: int, name: str, enabled: bool = True) -> tqdm:
    """Steps with steps/s and ETA."""
    return tqdm(
        total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True, mininterval=1.0, disable=not enabled
    )


def train_row(
    step: int,
    values: dict[str, float],
    progress: dict,
    flops: dict[str, int],
    timings: dict[str, float],
    steps_logged: int,
    raw_seen: int | None = None,
) -> dict[str, float]:
    """One metrics row: the logged steps' mean metrics, the run's counters and FLOPs (online: the learner's
    updates and scoring passes so far; offline: the reference's pass over the scored corpus), and the mean seconds
    per step of each timed part. `raw_seen`: records read by every process (default: this one's position)."""
    drawn = progress["superbatch_examples_seen"]
    raw_seen = progress["position"]["raw_seen"] if raw_seen is None else raw_seen
    train_flops, scoring_flops = step * flops["train"], step * flops["learner_scoring"]
    return {
        **values,
        "examples_seen": progress["examples_seen"],
        "superbatch_examples_seen": drawn,
        "train_flops": train_flops,
        "learner_scoring_flops": scoring_flops,
        "online_flops": train_flops + scoring_flops,
        "offline_scoring_flops": flops["offline_scoring"],
        "reference_flops_per_example": flops["reference_per_example"],
        "wall_s": progress["wall_s"],
        "skipped": max(raw_seen - drawn, 0),
        **{name: seconds / steps_logged for name, seconds in timings.items()},
    }


def check_finite(pending: list[tuple[int, dict]]) -> dict[str, float]:
    """Mean of each metric over the steps that measured it (not NaN; one measured at no step is left out); raises
    naming the step range if a loss is not finite."""
    fetched = [(step, jax.device_get(metrics)) for step, metrics in pending]
    for step, metrics in fetched:
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"non-finite loss {float(metrics['loss'])} at step {step} (steps {fetched[0][0]}-{fetched[-1][0]} "
                f"checked; the last checkpoint before step {fetched[0][0]} is good)"
            )
    means = {}
    for name in fetched[0][1]:
        values = np.asarray([m[name] for _, m in fetched], np.float64)
        measured = values[~np.isnan(values)]
        if measured.size:  # NaN where a step measures nothing (a bucket share on a corpus without buckets)
            means[name] = float(measured.mean())
    return means
