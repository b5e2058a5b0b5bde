"""A run comparison report: `python -m curation.report --run uniform=runs/uniform --run jest=runs/jest ...`.

Reads each run's `metrics.jsonl` and writes `report.md` with a summary table and PNG plots (matplotlib):
  curves.png     zero-shot and retrieval against examples seen, FLOPs and wall-clock
  selection.png  learnability of selected vs random sub-batches, and the share of clean examples selected
A run's FLOPs are its updates plus, for selection runs, the learner's scoring passes and the reference's offline
scoring of every example drawn (for offline filtering, of every example read). The first run given is the baseline
the others are measured against.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from curation.metrics import read_metrics


@dataclasses.dataclass
class RunCurves:
    name: str
    examples: np.ndarray  # at each evaluation
    flops: np.ndarray
    wall_s: np.ndarray
    zeroshot: np.ndarray
    recall: np.ndarray  # mean of image→text and text→image R@1
    train_rows: list[dict]
    selecting: bool

    @property
    def final(self) -> dict[str, float]:
        return {"zeroshot": float(self.zeroshot[-1]), "recall": float(self.recall[-1]),
                "examples": float(self.examples[-1]), "flops": float(self.flops[-1]), "wall_s": float(self.wall_s[-1])}

    def to_reach(self, zeroshot: float, axis: np.ndarray) -> float | None:
        """`axis` at the first evaluation reaching `zeroshot`, or None."""
        reached = np.nonzero(self.zeroshot >= zeroshot - 1e-9)[0]
        return float(axis[reached[0]]) if len(reached) else None


def load_run(name: str, workdir: str) -> RunCurves:
    rows = read_metrics(workdir)
    train_rows = [row for row in rows if "loss" in row]
    eval_rows = [row for row in rows if "zeroshot_top1" in row]
    if not train_rows or not eval_rows:
        raise ValueError(f"{workdir}/metrics.jsonl has no training or no evaluation rows")
    selecting = any("selected_learnability" in row for row in train_rows)
    steps = np.array([row["step"] for row in train_rows], float)

    def at_eval(values: list[float]) -> np.ndarray:  # training counters interpolated at the evaluation steps
        return np.interp([row["step"] for row in eval_rows], steps, values)

    config_path = os.path.join(workdir, "config.json")
    filtering = False
    if os.path.exists(config_path):
        with open(config_path) as f:
            filtering = json.load(f).get("offline_keep", 1.0) < 1.0

    def reference_flops(row: dict) -> float:
        if selecting:  # every example drawn into a super-batch was scored by the reference
            return row.get("reference_scoring_flops", 0)
        if filtering:  # every example read was scored, kept or filtered out
            return row.get("reference_flops_per_example", 0) * (row["superbatch_examples_seen"] + row["skipped"])
        return 0

    flops = [row.get("train_flops", 0) + row.get("learner_scoring_flops", 0) + reference_flops(row)
             for row in train_rows]
    return RunCurves(
        name=name,
        examples=np.array([row["examples_seen"] for row in eval_rows], float),
        flops=at_eval(flops),
        wall_s=at_eval([row["wall_s"] for row in train_rows]),
        zeroshot=np.array([row["zeroshot_top1"] for row in eval_rows]),
        recall=np.array([(row["i2t_r1"] + row["t2i_r1"]) / 2 for row in eval_rows]),
        train_rows=train_rows,
        selecting=selecting,
    )


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "not reached"
    if kind == "flops":
        return f"{value / 1e12:.2f} TFLOP"
    if kind == "examples":
        return f"{value:,.0f}"
    if kind == "wall":
        return f"{value / 60:.1f} min"
    return f"{value:.3f}"


def summary_table(runs: list[RunCurves], reference: dict[str, float] | None = None) -> str:
    baseline = runs[0]
    target = baseline.final["zeroshot"]
    lines = [f"| method | final zero-shot | retrieval R@1 | examples to reach {baseline.name}'s final zero-shot "
             f"({target:.3f}) | FLOPs to reach it | total FLOPs | wall-clock |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        final = run.final
        lines.append(f"| {run.name} | {final['zeroshot']:.3f} | {final['recall']:.3f} | "
                     f"{_fmt(run.to_reach(target, run.examples), 'examples')} | "
                     f"{_fmt(run.to_reach(target, run.flops), 'flops')} | {_fmt(final['flops'], 'flops')} | "
                     f"{_fmt(final['wall_s'], 'wall')} |")
    if reference:
        lines.append(f"| reference (curated split) | {reference['zeroshot']:.3f} | {reference['recall']:.3f} | "
                     f"— | — | {_fmt(reference['flops'], 'flops')} (training) | {_fmt(reference['wall_s'], 'wall')} |")
    return "\n".join(lines)


def plot_curves(runs: list[RunCurves], path: str, reference: dict[str, float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for row, (metric, label) in enumerate([("zeroshot", "zero-shot top-1 (mean of tasks)"),
                                           ("recall", "retrieval R@1 (mean i→t, t→i)")]):
        for column, (axis, xlabel) in enumerate([("examples", "examples trained on"),
                                                 ("flops", "FLOPs (scoring included)"),
                                                 ("wall_s", "wall-clock (s)")]):
            ax = axes[row, column]
            for run in runs:
                ax.plot(getattr(run, axis), getattr(run, metric), marker="o", markersize=3, label=run.name)
            if reference:
                ax.axhline(reference[metric], color="grey", linestyle="--", label="reference")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0, 0].legend()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_selection(runs: list[RunCurves], path: str) -> bool:
    """Selected vs random learnability and cleanliness over training; False when no run selects."""
    selecting = [run for run in runs if run.selecting]
    if not selecting:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    for run in selecting:
        steps = [row["step"] for row in run.train_rows]
        line, = left.plot(steps, [row["selected_learnability"] for row in run.train_rows], label=f"{run.name}: selected")
        left.plot(steps, [row["random_learnability"] for row in run.train_rows], color=line.get_color(),
                  linestyle=":", label=f"{run.name}: random sub-batch")
        line, = right.plot(steps, [row["selected_clean"] for row in run.train_rows], label=f"{run.name}: selected")
        right.plot(steps, [row["superbatch_clean"] for row in run.train_rows], color=line.get_color(),
                   linestyle=":", label=f"{run.name}: super-batch")
    left.set(xlabel="step", ylabel="learnability per example (learner − reference loss)",
             title="learnability of the sub-batch")
    right.set(xlabel="step", ylabel="share of clean examples (hidden truth)", title="cleanliness", ylim=(0, 1))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(runs: dict[str, str], out_dir: str, reference_workdir: str | None = None,
                 title: str = "Run comparison", notes: str = "") -> str:
    """Write `out_dir/report.md` and its plots; returns the report's path."""
    os.makedirs(out_dir, exist_ok=True)
    curves = [load_run(name, workdir) for name, workdir in runs.items()]
    reference = None
    if reference_workdir:
        ref = load_run("reference", reference_workdir)
        reference = {**ref.final, "flops": float(ref.train_rows[-1]["train_flops"])}
    plot_curves(curves, os.path.join(out_dir, "curves.png"), reference)
    has_selection = plot_selection(curves, os.path.join(out_dir, "selection.png"))
    lines = [f"# {title}", "", summary_table(curves, reference), "", "![curves](curves.png)", ""]
    if has_selection:
        lines += ["![selection](selection.png)", ""]
        for run in curves:
            if run.selecting:
                rows = run.train_rows
                lines.append(
                    f"- {run.name}: selected learnability {np.mean([r['selected_learnability'] for r in rows]):.3f} "
                    f"vs random {np.mean([r['random_learnability'] for r in rows]):.3f} per example (mean over "
                    f"training); clean share selected {np.mean([r['selected_clean'] for r in rows]):.2f} vs "
                    f"{np.mean([r['superbatch_clean'] for r in rows]):.2f} in the super-batches.")
        lines.append("")
    if notes:
        lines += [notes, ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=WORKDIR; the first is the baseline")
    parser.add_argument("--reference", default=None, help="workdir of the reference model's training run")
    parser.add_argument("--out", required=True, help="folder for report.md and the plots")
    args = parser.parse_args(argv)
    runs = dict(item.split("=", 1) for item in args.run)
    print(write_report(runs, args.out, args.reference))


if __name__ == "__main__":
    main()
