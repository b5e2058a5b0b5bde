"""The learning benchmark's validity gates, computed from the committed curves: whether a comparison on a corpus can
mean anything at all. bench/ablations.py prints them above every comparison they guard.

- reference competent: at its end, the reference's normalised accuracy (acc − chance) / (1 − chance) is at least
  COMPETENT on every zero-shot task. A reference that cannot do a task cannot point selection at what teaches it.
- the task rewards curation: the oracle learner (trained on the examples whose hidden truth is clean, never a
  selection input) ends at least CURATION_GAIN above uniform in mean normalised zero-shot accuracy, seed by seed.
  Where even perfect curation gains nothing, no selection method can show a gain.
- a task can discriminate: a task on which every method's final (mean over seeds) lies within LEVEL of the others
  does not discriminate; a claim on a setting where no zero-shot task does is decided only by such tasks.

A comparison on a corpus whose reference or curation gate fails (or was not measured) is void: it is shown, but
neither as met nor as missed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import protocol  # bench/protocol.py, beside this script

from curation.trainer.metrics import task_label as label
from curation.trainer.report import COMPETENT, normalised

CURATION_GAIN = 0.05
LEVEL = 0.01
ORACLE = "oracle"


@dataclasses.dataclass(frozen=True)
class Gate:
    """One gate: `passed` True or False, None when its runs are missing (then it does not pass either)."""

    name: str
    passed: bool | None
    detail: str

    @property
    def line(self) -> str:
        verdict = {True: "passed", False: "**failed**", None: "**not measured**"}[self.passed]
        return f"- {self.name}: {verdict}. {self.detail}"


def zeroshot_tasks(chance: dict[str, float]) -> list[str]:
    """The zero-shot tasks whose chance level was logged."""
    return [name for name in chance if name.startswith("zeroshot/")]


def mean_normalised(tasks: dict[str, float], chance: dict[str, float]) -> float:
    """The mean over zero-shot tasks of the normalised final accuracy."""
    return float(np.mean([normalised(tasks[name], chance[name]) for name in zeroshot_tasks(chance)]))


def reference_gate(tasks: dict[str, float], chance: dict[str, float]) -> Gate:
    """The reference's final accuracy per task (`tasks`) against COMPETENT."""
    name = f"reference competent (normalised accuracy ≥ {COMPETENT} on every zero-shot task at its end)"
    names = zeroshot_tasks(chance)
    if not names:
        return Gate(name, None, "The reference's curve has no per-task accuracy with chance levels.")
    scores = {task: normalised(tasks[task], chance[task]) for task in names}
    failing = [task for task, score in scores.items() if score < COMPETENT]
    detail = ", ".join(
        f"{label(task)} {tasks[task]:.3f} against chance {chance[task]:.3f}, normalised {score:+.2f}"
        + (" (below)" if task in failing else "")
        for task, score in scores.items()
    )
    return Gate(name, not failing, detail + ".")


def curation_gate(uniform: list[dict], oracle: list[dict]) -> Gate:
    """The oracle's runs against uniform's, seed by seed (each a summary with `tasks` and `chance`)."""
    name = f"the task rewards curation (the oracle ends ≥ {CURATION_GAIN} above uniform in mean normalised zero-shot)"
    pairs = [(o, u) for o, u in zip(oracle, uniform) if zeroshot_tasks(o["chance"])]
    if not pairs:
        return Gate(name, None, f"No {ORACLE} run with per-task accuracy: run the gates part.")
    gains = [mean_normalised(o["tasks"], o["chance"]) - mean_normalised(u["tasks"], u["chance"]) for o, u in pairs]
    mean, low, high = protocol.bootstrap_interval(gains)
    seeds = f"{len(pairs)} seed" + ("s" if len(pairs) != 1 else "")
    detail = f"Oracle − uniform {mean:+.3f} (95% CI {low:+.3f} to {high:+.3f}) over {seeds}."
    return Gate(name, mean >= CURATION_GAIN, detail)


def discrimination(summaries: dict[str, list[dict]]) -> Gate:
    """Each task's spread of finals (mean over seeds) across the variants that ran; passes when at least one
    zero-shot task spreads more than LEVEL."""
    name = f"a task can discriminate (some zero-shot task's finals spread more than {LEVEL} across the variants)"
    chance = next((runs[0]["chance"] for runs in summaries.values() if runs[0]["chance"]), {})
    if len(summaries) < 2 or not zeroshot_tasks(chance):
        return Gate(name, None, "Needs two variants with per-task accuracy.")
    spreads = {}
    for task in [*zeroshot_tasks(chance), "retrieval_r1"]:
        finals = [np.mean([r["tasks"][task] for r in runs]) for runs in summaries.values()]
        spreads[task] = float(max(finals) - min(finals))
    flat = [task for task, spread in spreads.items() if spread <= LEVEL]
    detail = "Spread of the finals: " + ", ".join(
        f"{label(task)} {spread:.3f}" + (" (does not discriminate)" if task in flat else "")
        for task, spread in spreads.items()
    )
    return Gate(name, any(task not in flat for task in zeroshot_tasks(chance)), detail + ".")


def setting_gates(reference: dict, summaries: dict[str, list[dict]], web: dict[str, list[dict]]) -> list[Gate]:
    """The three gates of one setting: the corpus's reference (`reference`: its final `tasks` and `chance`), the
    oracle against uniform on the corpus's web split (`web`: its summaries), and the setting's own spread."""
    return [
        reference_gate(reference["tasks"], reference["chance"]),
        curation_gate(web.get("uniform", []), web.get(ORACLE, [])),
        discrimination(summaries),
    ]


def void_reason(gates: list[Gate]) -> str:
    """Why a comparison guarded by `gates` is void ("" when it is not): the reference or curation gate not passed."""
    failed = [gate.name.split(" (")[0] for gate in gates[:2] if not gate.passed]
    return "; ".join(failed)


def only_flat_tasks(gates: list[Gate]) -> bool:
    """Whether a claim guarded by `gates` is decided only by tasks that do not discriminate."""
    return gates[2].passed is False
