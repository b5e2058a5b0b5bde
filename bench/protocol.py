"""The learning benchmark's protocol, as code: which runs make each part, the raw curve every finished run leaves
under bench/curves/ (small JSON, committed, so tables and plots rebuild without rerunning), paired bootstrap
intervals over seeds, and how "uniform has plateaued" is judged. bench/ablations.py runs the parts; the protocol
itself is written out at the top of bench/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from curation.trainer import report

CURVES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "curves")
CURVE_VERSION = 3  # 3: each task's accuracy at each evaluation, and chance levels. Version 2 curves (before those)
# measured a degenerate task (bench/RESULTS.md, "Archived"); git keeps them, this script no longer reads them.
# What a logged training row keeps in a curve file: the selection diagnostics the tables and plots read.
TRAIN_KEYS = (
    "step",
    "selected_clean",
    "superbatch_clean",
    "selected_learnability",
    "random_learnability",
    "offdiag_share",
)

COMPOSITION = ("selected/", "superbatch/")  # and the share of each noise kind selected and in the super-batch

HEADLINE = [
    "uniform",
    "oracle",
    "offline_top30",
    "easy_reference_f0.8",
    "independent_f0.8",
    "learnability_f0.8",
    "learnability_f0.8_flexi",
]
SWEEP = ["independent_f0.5", "independent_f0.9", "learnability_f0.5", "learnability_f0.9", "hard_learner_f0.8"]
STATE = ["uniform", "easy_reference_f0.8", "learnability_f0.8"]
LARGER = ["easy_reference_f0.8", "learnability_f0.8"]


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of the benchmark: a setting, its variants and how many seeds (0 .. seeds-1) each runs."""

    setting: str
    variants: tuple[str, ...]
    seeds: int
    # what the part is compared against and does not run itself (it reads those runs' curves): other parts' runs
    needs: tuple[str, ...] = ()
    # runs it reads from the "web" setting, same seeds: runs that do not read its setting's scores (uniform)
    borrows: tuple[str, ...] = ()


PARTS = {
    # first and cheap: the reference, uniform and the oracle, whose curves the validity gates (bench/gates.py) read
    "gates": Part("web", ("uniform", "oracle"), 1),
    "headline": Part("web", tuple(HEADLINE), 5),
    "sweep": Part("web", tuple(SWEEP), 3, needs=("uniform", "independent_f0.8", "learnability_f0.8")),
    "state": Part("repeated", tuple(STATE), 3),
    # the same web split scored by a reference larger than the learner (LARGER_REFERENCE)
    "larger": Part("larger_reference", tuple(LARGER), 3, borrows=("uniform",)),
}
# The larger-reference setting's reference: the reference's recipe (curated split, steps, schedule) at model size
# `sm` in both towers (width 96, 3 layers: about 3.2x an `xs` learner's FLOPs per example). A reference larger than
# its learner turns selection towards distillation (ACID, arXiv 2411.18674).
LARGER_REFERENCE = {"image_variant": "sm", "text_variant": "sm"}
# Each setting's reference curve, under bench/curves/CORPUS/.
REFERENCE_CURVES = {"web": "reference.json", "repeated": "reference.json", "larger_reference": "reference_larger.json"}
PLATEAU_GAIN = 0.01  # uniform has plateaued when its last quarter of evaluations gains less than this zero-shot
# The learners' learning-rate schedule: constant after warm-up, so that a plateau means the data, not a decaying rate
# (the references' own is bench/ablations.py's REFERENCE).
SCHEDULE = "constant"


def curve_path(corpus: str, setting: str, variant: str, seed: int, root: str = CURVES_DIR) -> str:
    return os.path.join(root, corpus, setting, variant, f"seed{seed}.json")


def curve_from_run(run: report.RunCurves, config: dict) -> dict:
    """What is kept of a finished run: its evaluation curve (examples trained on and drawn, FLOPs, wall-clock,
    zero-shot, R@1, each task's accuracy), the chance levels, the selection diagnostics of each logged row, and the
    run's settings."""
    keys = list(
        dict.fromkeys(key for row in run.train_rows for key in row if key in TRAIN_KEYS or key.startswith(COMPOSITION))
    )
    columns = {key: [_short(row.get(key)) for row in run.train_rows] for key in keys}  # one list a key: a few KB
    return {
        "version": CURVE_VERSION,
        "name": run.name,
        "config": config,
        "examples": run.examples.tolist(),
        "examples_drawn": run.examples_drawn.tolist(),
        "online_flops": run.online_flops.tolist(),
        "offline_scoring_flops": run.offline_scoring_flops,
        "wall_s": run.wall_s.tolist(),
        "zeroshot": run.zeroshot.tolist(),
        "recall": run.recall.tolist(),
        "tasks": {name: [_short(float(v)) for v in values] for name, values in run.task_curves.items()},
        "chance": run.chance,
        "train_columns": columns,
        "selecting": run.selecting,
    }


def _short(value):
    """A logged diagnostic to 4 significant digits (shares and scores: the curve files stay a few KB)."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def write_curve(path: str, curve: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as out:
        json.dump(curve, out, separators=(",", ":"))
    os.replace(path + ".tmp", path)


def read_curve(path: str) -> report.RunCurves:
    with open(path) as f:
        return curve_to_run(json.load(f), path)


def curve_to_run(curve: dict, path: str) -> report.RunCurves:
    """A curve file's contents (read from `path`, named in errors) as the RunCurves it was made from."""
    if curve.get("version") != CURVE_VERSION:
        raise ValueError(
            f"{path}: curve version {curve.get('version')}, this script reads {CURVE_VERSION}: run its part again"
        )
    arrays = {
        key: np.asarray(curve[key], float)
        for key in ("examples", "online_flops", "wall_s", "zeroshot", "recall", "examples_drawn")
    }
    columns = curve["train_columns"]
    length = max((len(values) for values in columns.values()), default=0)
    rows = [{key: values[i] for key, values in columns.items() if values[i] is not None} for i in range(length)]
    return report.RunCurves(
        name=curve["name"],
        offline_scoring_flops=float(curve["offline_scoring_flops"]),
        train_rows=rows,
        selecting=bool(curve["selecting"]),
        task_curves={name: np.asarray(values, float) for name, values in curve["tasks"].items()},
        chance={name: float(value) for name, value in curve["chance"].items()},
        **arrays,
    )


def bootstrap_interval(
    values, *, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` (one per seed; for a comparison, the seed-by-seed differences) and
    its percentile bootstrap interval, resampling seeds with replacement. One value: an interval of zero width."""
    values = np.asarray(values, float)
    if values.size == 0:
        raise ValueError("no values to take an interval of")
    mean = float(values.mean())
    if values.size == 1:
        return mean, mean, mean
    picks = np.random.default_rng(seed).integers(0, values.size, (resamples, values.size))
    means = values[picks].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return mean, float(low), float(high)


def paired_interval(first: list[float], second: list[float], **options) -> tuple[float, float, float]:
    """Mean and bootstrap interval of first − second, seed by seed (same seed: same init and data order)."""
    if len(first) != len(second):
        raise ValueError(f"paired values need one per seed on both sides, got {len(first)} and {len(second)}")
    return bootstrap_interval(np.asarray(first, float) - np.asarray(second, float), **options)


def plateau_gain(zeroshot) -> float:
    """How much a curve still gains at its end: the mean zero-shot over its last quarter of evaluations minus the
    mean over the quarter before (at least one evaluation each)."""
    zeroshot = np.asarray(zeroshot, float)
    quarter = max(1, len(zeroshot) // 4)
    if len(zeroshot) < 2 * quarter:
        raise ValueError(f"{len(zeroshot)} evaluations are too few to judge a plateau")
    return float(zeroshot[-quarter:].mean() - zeroshot[-2 * quarter : -quarter].mean())
