"""Run comparison: the summary table and PNG plots of `report.md`, from each run's `metrics.jsonl`.

Reads each run's `metrics.jsonl` and writes `report.md` with a summary table and PNG plots (matplotlib):
  curves.png     zero-shot and retrieval against examples seen, online FLOPs and wall-clock; each task against
                 examples seen, with its chance level
  selection.png  learnability of selected vs random sub-batches, and the share of clean examples selected
FLOPs come in two figures, counted the same way for every method: online, the learner's
updates plus its scoring passes where the method's score uses them; and offline, the reference's forward once per
example scored, counted for the runs that use the scores. The reference's training is offline too, amortised over
every run on the same scores, and reported on its own row. "To reach" is interpolated linearly between the two
evaluations around the crossing, and the table states the evaluation spacing it resolves.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from curation.trainer.metrics import CHANCE, read_metrics, task_label
from curation.trainer.report_plots import plot_curves, plot_selection


@dataclasses.dataclass
class RunCurves:
    name: str
    examples: np.ndarray  # at each evaluation
    online_flops: np.ndarray
    offline_scoring_flops: float  # the reference's pass over the scored corpus, when the run uses its scores
    wall_s: np.ndarray
    zeroshot: np.ndarray
    recall: np.ndarray  # mean of image→text and text→image R@1
    train_rows: list[dict]
    selecting: bool
    examples_drawn: np.ndarray | None = None  # super-batch examples read at each evaluation (B per step)
    # each zero-shot task's accuracy (zeroshot/NAME), and retrieval_r1, at each evaluation (runs that logged them)
    task_curves: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    chance: dict[str, float] = dataclasses.field(default_factory=dict)  # their chance levels (runs that logged them)

    @property
    def tasks(self) -> dict[str, float]:
        """Each task's final accuracy."""
        return {name: float(values[-1]) for name, values in self.task_curves.items()}

    @property
    def total_flops(self) -> np.ndarray:
        return self.online_flops + self.offline_scoring_flops

    @property
    def final(self) -> dict[str, float]:
        return {
            "zeroshot": float(self.zeroshot[-1]),
            "recall": float(self.recall[-1]),
            "examples": float(self.examples[-1]),
            "online_flops": float(self.online_flops[-1]),
            "total_flops": float(self.total_flops[-1]),
            "wall_s": float(self.wall_s[-1]),
        }

    @property
    def eval_spacing(self) -> float:
        """Examples between two evaluations (the resolution of "to reach")."""
        return float(np.median(np.diff(self.examples))) if len(self.examples) > 1 else float(self.examples[0])

    def to_reach(self, zeroshot: float, axis: np.ndarray) -> float | None:
        """`axis` where zero-shot first reaches `zeroshot`, interpolated linearly between the evaluation before and
        the first one at or above it (the first evaluation's value when that one already is); None if never."""
        reached = np.nonzero(self.zeroshot >= zeroshot - 1e-9)[0]
        if not len(reached):
            return None
        i = int(reached[0])
        if i == 0:
            return float(axis[0])
        fraction = (zeroshot - self.zeroshot[i - 1]) / (self.zeroshot[i] - self.zeroshot[i - 1])
        return float(axis[i - 1] + fraction * (axis[i] - axis[i - 1]))


def _online_flops(row: dict) -> float:
    """The row's online FLOPs (older runs logged only its parts)."""
    return (
        row["online_flops"]
        if "online_flops" in row
        else row.get("train_flops", 0) + row.get("learner_scoring_flops", 0)
    )


def load_run(name: str, workdir: str) -> RunCurves:
    rows = read_metrics(workdir)
    train_rows = [row for row in rows if "loss" in row]
    eval_rows = [row for row in rows if "zeroshot_top1" in row]
    if not train_rows or not eval_rows:
        raise ValueError(f"{workdir}/metrics.jsonl has no training or no evaluation rows")
    selecting = any("selected_clean" in row for row in train_rows)
    steps = np.array([row["step"] for row in train_rows], float)

    def at_eval(values: list[float]) -> np.ndarray:  # training counters interpolated at the evaluation steps
        return np.interp([row["step"] for row in eval_rows], steps, values)

    return RunCurves(
        name=name,
        examples=np.array([row["examples_seen"] for row in eval_rows], float),
        online_flops=at_eval([_online_flops(row) for row in train_rows]),
        offline_scoring_flops=float(train_rows[-1].get("offline_scoring_flops", 0)),
        wall_s=at_eval([row["wall_s"] for row in train_rows]),
        zeroshot=np.array([row["zeroshot_top1"] for row in eval_rows]),
        recall=np.array([(row["i2t_r1"] + row["t2i_r1"]) / 2 for row in eval_rows]),
        train_rows=train_rows,
        selecting=selecting,
        examples_drawn=at_eval([row.get("superbatch_examples_seen", row["examples_seen"]) for row in train_rows]),
        task_curves=_task_curves(eval_rows),
        chance={name[len(CHANCE) :]: value for name, value in eval_rows[-1].items() if name.startswith(CHANCE)},
    )


def _task_curves(rows: list[dict]) -> dict[str, np.ndarray]:
    """Each zero-shot task's accuracy, and retrieval's R@1 (image→text and text→image averaged), at each evaluation:
    the tasks the last evaluation logged, NaN at an evaluation that did not log one."""
    names = [name for name in rows[-1] if name.startswith("zeroshot/")]
    curves = {name: np.array([row.get(name, np.nan) for row in rows], float) for name in names}
    return {**curves, "retrieval_r1": np.array([(row["i2t_r1"] + row["t2i_r1"]) / 2 for row in rows], float)}


# The reference must be competent on a task for a comparison on it to mean anything (normalised accuracy).
COMPETENT = 0.3


def normalised(accuracy: float, chance: float) -> float:
    """(accuracy − chance) / (1 − chance): 0 at chance, 1 when perfect."""
    return (accuracy - chance) / (1 - chance)


def task_table(runs: list[RunCurves], reference: RunCurves | None = None) -> list[str]:
    """Each task's final accuracy beside its chance level, per run and for the reference, and the tasks on which
    the reference is not competent (normalised accuracy below COMPETENT): a comparison there measures nothing."""
    everyone = ([reference] if reference else []) + runs
    names = [name for name in everyone[-1].tasks if all(name in run.tasks for run in everyone)]
    chance = {name: next((run.chance[name] for run in everyone if name in run.chance), None) for name in names}
    label = {name: task_label(name) for name in names}
    header = [f"{label[name]} (chance {chance[name]:.3f})" if chance[name] else label[name] for name in names]
    lines = ["| run | " + " | ".join(header) + " |", "|---|" + "---|" * len(names)]
    for run in everyone:
        cells = [
            f"{run.tasks[name]:.3f}"
            + (f" ({normalised(run.tasks[name], chance[name]):+.2f})" if chance[name] is not None else "")
            for name in names
        ]
        lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    if any(value is not None for value in chance.values()):
        lines += ["", "In brackets: normalised accuracy (accuracy − chance) / (1 − chance), 0 at chance."]
    if reference is not None:
        idle = [
            f"{label[name]} ({normalised(reference.tasks[name], chance[name]):+.2f})"
            for name in names
            if name.startswith("zeroshot/")
            and chance[name]
            and normalised(reference.tasks[name], chance[name]) < COMPETENT
        ]
        if idle:
            lines.append(
                f"The reference is not competent (normalised accuracy below {COMPETENT}) on: {', '.join(idle)}. "
                "A task the reference cannot do measures nothing; the mean zero-shot above includes it."
            )
    return lines


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
    lines = [
        f"| method | final zero-shot | retrieval R@1 | examples to reach {baseline.name}'s final zero-shot "
        f"({target:.3f}) | online FLOPs to reach it | online + offline scoring FLOPs to reach it | "
        "online FLOPs | offline scoring FLOPs | wall-clock |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        final = run.final
        lines.append(
            f"| {run.name} | {final['zeroshot']:.3f} | {final['recall']:.3f} | "
            f"{_fmt(run.to_reach(target, run.examples), 'examples')} | "
            f"{_fmt(run.to_reach(target, run.online_flops), 'flops')} | "
            f"{_fmt(run.to_reach(target, run.total_flops), 'flops')} | {_fmt(final['online_flops'], 'flops')} | "
            f"{_fmt(run.offline_scoring_flops, 'flops')} | {_fmt(final['wall_s'], 'wall')} |"
        )
    if reference:
        lines.append(
            f"| reference (curated split) | {reference['zeroshot']:.3f} | {reference['recall']:.3f} | "
            f"— | — | — | — | {_fmt(reference['flops'], 'flops')} (its training) | "
            f"{_fmt(reference['wall_s'], 'wall')} |"
        )
    spacing = ", ".join(f"{run.name} every {run.eval_spacing:,.0f}" for run in runs)
    lines += [
        "",
        f'"To reach" is interpolated between evaluations (examples between evaluations: {spacing}).'
        " Offline scoring is the reference's forward once per example scored, spent once per corpus and "
        "counted for the runs that use the scores; the reference's training (last row) is offline too, "
        "amortised over every run on the same scores.",
    ]
    return "\n".join(lines)


def flops_table(runs: list[RunCurves], reference: dict[str, float] | None = None) -> list[str]:
    """Each run's FLOPs to reach the baseline's final zero-shot (online + offline scoring) against two denominators:
    the baseline's whole run, and the baseline's own first reach of its final (a baseline that plateaus early makes
    the first small); and, for the runs that use the reference's scores, the total with the reference's training."""
    baseline = runs[0]
    target = baseline.final["zeroshot"]
    whole = baseline.final["total_flops"]
    first_reach = baseline.to_reach(target, baseline.total_flops)
    training = reference["flops"] if reference else None

    def ratio(value: float | None, denominator: float | None) -> str:
        return "—" if value is None or not denominator else f"{value / denominator:.2f}x"

    lines = [
        f"| method | to reach {baseline.name}'s final ({target:.3f}) | ÷ {baseline.name}'s whole run "
        f"({_fmt(whole, 'flops')}) | ÷ {baseline.name}'s first reach ({_fmt(first_reach, 'flops')}) | "
        "with the reference's training | ÷ whole run |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        reach = run.to_reach(target, run.total_flops)
        uses_scores = run.offline_scoring_flops > 0 and training is not None
        total = reach + training if reach is not None and uses_scores else None
        lines.append(
            f"| {run.name} | {_fmt(reach, 'flops')} | {ratio(reach, whole)} | {ratio(reach, first_reach)} | "
            f"{_fmt(total, 'flops') if uses_scores else '—'} | {ratio(total, whole) if uses_scores else '—'} |"
        )
    lines += [
        "",
        "The reference's training is spent once per corpus and shared by every run on its scores; a run that uses "
        "them is charged all of it here, as if it were the only one.",
    ]
    return lines


def loss_parameter_lines(runs: list[RunCurves], reference: RunCurves | None = None) -> list[str]:
    """Per run: the sigmoid loss's t and b at the first and last logged step, and the off-diagonal share of joint
    selection's conditional scores (how much the pair terms weighed against S_ii) at the first and last."""
    lines = [
        "| run | t: first → last logged | b: first → last logged | off-diagonal share of the conditional "
        "scores: first → last |",
        "|---|---|---|---|",
    ]
    for run in ([reference] if reference else []) + runs:
        first, last = run.train_rows[0], run.train_rows[-1]
        share = f"{first['offdiag_share']:.3f} → {last['offdiag_share']:.3f}" if "offdiag_share" in last else "—"
        lines.append(
            f"| {run.name} | {first['t']:.2f} → {last['t']:.2f} | {first['b']:.2f} → {last['b']:.2f} | {share} |"
        )
    return lines


def write_report(
    runs: dict[str, str],
    out_dir: str,
    reference_workdir: str | None = None,
    title: str = "Run comparison",
    notes: str = "",
) -> str:
    """Write `out_dir/report.md` and its plots; returns the report's path."""
    os.makedirs(out_dir, exist_ok=True)
    curves = [load_run(name, workdir) for name, workdir in runs.items()]
    reference = reference_run = None
    if reference_workdir:
        reference_run = load_run("reference", reference_workdir)
        reference = {**reference_run.final, "flops": float(reference_run.train_rows[-1]["train_flops"])}
    plot_curves(curves, os.path.join(out_dir, "curves.png"), reference_run)
    has_selection = plot_selection(curves, os.path.join(out_dir, "selection.png"))
    lines = [f"# {title}", "", summary_table(curves, reference), ""]
    lines += ["## FLOPs against two denominators", "", *flops_table(curves, reference), ""]
    lines += ["![curves](curves.png)", ""]
    if has_selection:
        lines += ["![selection](selection.png)", ""]
        for run in curves:
            if run.selecting:
                rows = run.train_rows
                learnability = (
                    f"selected learnability {np.mean([r['selected_learnability'] for r in rows]):.3f} "
                    f"vs random {np.mean([r['random_learnability'] for r in rows]):.3f} per example "
                    "(mean over training); "
                    if "selected_learnability" in rows[-1]
                    else ""
                )
                lines.append(
                    f"- {run.name}: {learnability}clean share selected "
                    f"{np.mean([r['selected_clean'] for r in rows]):.2f} vs "
                    f"{np.mean([r['superbatch_clean'] for r in rows]):.2f} in the super-batches."
                )
        lines.append("")
    lines += ["## Each task against its chance level", "", *task_table(curves, reference_run), ""]
    lines += ["## The loss's temperature and bias", "", *loss_parameter_lines(curves, reference_run), ""]
    if notes:
        lines += [notes, ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
