"""The report's PNG plots: the learning curves (with each task against its chance level) and the selection
diagnostics, from each run's curves."""

from __future__ import annotations

from typing import TYPE_CHECKING

from curation.trainer.metrics import task_label

if TYPE_CHECKING:
    from curation.trainer.report import RunCurves


def plot_curves(runs: list[RunCurves], path: str, reference: RunCurves | None = None) -> None:
    """Zero-shot (mean of tasks) and retrieval against examples, online FLOPs and wall-clock; below, each task
    against examples with its chance level (the runs that logged them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [name for name in runs[0].task_curves if all(name in run.task_curves for run in runs)]
    rows = 3 if tasks else 2
    figure, axes = plt.subplots(rows, 3, figsize=(15, 4 * rows), constrained_layout=True, squeeze=False)
    for row, (metric, label) in enumerate(
        [("zeroshot", "zero-shot top-1 (mean of tasks)"), ("recall", "retrieval R@1 (mean i→t, t→i)")]
    ):
        for column, (axis, xlabel) in enumerate(
            [
                ("examples", "examples trained on"),
                ("online_flops", "online FLOPs (learner updates and scoring)"),
                ("wall_s", "wall-clock (s)"),
            ]
        ):
            ax = axes[row, column]
            for run in runs:
                ax.plot(getattr(run, axis), getattr(run, metric), marker="o", markersize=3, label=run.name)
            if reference:
                ax.axhline(reference.final[metric], color="grey", linestyle="--", label="reference")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0, 0].legend()
    for index, ax in enumerate(axes[2] if tasks else []):
        if index >= len(tasks):  # more panels than tasks
            ax.set_visible(False)
            continue
        _plot_task(ax, runs, tasks[index], reference)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_task(ax, runs: list[RunCurves], name: str, reference: RunCurves | None) -> None:
    """One task's accuracy against examples trained on, each run a line, with its chance level."""
    for run in runs:
        ax.plot(run.examples, run.task_curves[name], marker="o", markersize=3, label=run.name)
    if reference is not None and name in reference.task_curves:
        ax.axhline(reference.tasks[name], color="grey", linestyle="--", label="reference")
    chance = next((run.chance[name] for run in [*runs, reference] if run and name in run.chance), None)
    if chance is not None:
        ax.axhline(chance, color="black", linestyle=":", label=f"chance ({chance:.3f})")
    label = task_label(name)
    ax.set(xlabel="examples trained on", ylabel=f"{label} accuracy", title=label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


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
        if "selected_learnability" in run.train_rows[-1]:  # runs whose score needs no learner pass have none
            (line,) = left.plot(
                steps, [row["selected_learnability"] for row in run.train_rows], label=f"{run.name}: selected"
            )
            left.plot(
                steps,
                [row["random_learnability"] for row in run.train_rows],
                color=line.get_color(),
                linestyle=":",
                label=f"{run.name}: random sub-batch",
            )
        (line,) = right.plot(steps, [row["selected_clean"] for row in run.train_rows], label=f"{run.name}: selected")
        right.plot(
            steps,
            [row["superbatch_clean"] for row in run.train_rows],
            color=line.get_color(),
            linestyle=":",
            label=f"{run.name}: super-batch",
        )
    left.set(
        xlabel="step",
        ylabel="learnability per example (learner − reference loss)",
        title="learnability of the sub-batch",
    )
    right.set(xlabel="step", ylabel="share of clean examples (hidden truth)", title="cleanliness", ylim=(0, 1))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
