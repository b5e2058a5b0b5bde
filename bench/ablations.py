"""Bench: learning efficiency of the selection methods, run part by part under the protocol of bench/RESULTS.md.

    .venv/bin/python bench/ablations.py --corpus demo --part gates       # uniform and the oracle, 1 seed: first
    .venv/bin/python bench/ablations.py --corpus demo --part headline    # 7 variants x 5 seeds
    .venv/bin/python bench/ablations.py --corpus demo --part sweep       # f sweep and hard-learner, 3 seeds
    .venv/bin/python bench/ablations.py --corpus demo --part state       # the "repeated" setting, 3 seeds
    .venv/bin/python bench/ablations.py --corpus demo --part larger      # a larger reference, 3 seeds
    .venv/bin/python bench/ablations.py --corpus emoji --part headline   # the real-image corpus, and so on
    .venv/bin/python bench/ablations.py --corpus demo --part all --rebuild   # tables and plots from the curves
    .venv/bin/python bench/ablations.py --part headline --seeds 1 --steps 40 --evals 4 --out runs/quick \
        --curves runs/quick/curves --no_write --despite_gates             # a quick look

Each corpus (`--corpus`): the demo's generator (runs/bench/demo) or real images, emoji drawn by people
(demo/emoji_corpus.py, runs/bench/emoji; `make bench` installs its sources), each with its own reference (1,000
steps, constant schedule: long enough to pass its gate) and scored shards, made first when missing. Every
variant trains for the same steps and sub-batch size, once per seed:

  setting "web" (the corpus's noisy web split), parts "gates" (uniform and the oracle: what the validity gates
    read), "headline" (uniform; the oracle, trained on the rows whose hidden truth is clean; offline top-30% by
    stored reference loss; easy-reference, independent (RHO-style) and joint learnability at f = 0.8; joint
    learnability with Flexi) and "sweep" (independent and joint learnability at f = 0.5 and 0.9; hard-learner at
    f = 0.8).
  setting "repeated", part "state" (where the learner's state matters): the same scored web split plus copies of
    its 48 clean examples easiest for the reference, so that the copies are half of all rows. The reference keeps
    rating the copies easiest however often the learner has seen them; learnability should stop choosing them once
    the learner has learnt them. uniform vs easy-reference vs learnability (joint, f = 0.8).
  setting "larger_reference", part "larger": the web split scored by a reference larger than the learner (model
    size `sm` in both towers against the learner's `xs`; same curated split, steps and schedule), made first when
    missing. Easy-reference and joint learnability at f = 0.8 against the web setting's uniform runs, and joint
    learnability against itself with the learner-sized reference (ACID, arXiv 2411.18674: a larger reference turns
    selection towards distillation).

Each finished run leaves its raw curve, bench/curves/CORPUS/SETTING/VARIANT/seedK.json (committed: the tables and
plots rebuild from them with `--rebuild`); a run whose curve is there with the same settings is not run again, so a
part resumes where it stopped. Learners train under the protocol's constant learning-rate schedule. Above every
comparison, the validity gates of bench/gates.py (reference competent, the task rewards curation, a task can
discriminate); a comparison whose gates fail is void. For each variant: final zero-shot (each task beside its chance
level) and retrieval R@1, and the examples trained on and drawn, FLOPs (scoring included) and wall-clock to reach
the same seed's uniform run's final zero-shot (interpolated between evaluations), against uniform's whole run and
its own first reach, with paired bootstrap intervals over seeds. Writes the sections "Learning efficiency (CORPUS
corpus)" and "The learner's state (CORPUS corpus)" of bench/RESULTS.md and their plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import statistics
import sys
import time

import gates  # bench/gates.py, beside this script
import numpy as np
import protocol  # bench/protocol.py, beside this script
import results  # bench/results.py, beside this script

from curation.shared import batches, schema, scored_set
from curation.shared.manifest import Counts
from curation.trainer import configs, report
from curation.trainer.loop import train
from curation.trainer.truth import BUCKETS, NOISE_KINDS
from curation.trainer.workdir import OLDER_RUNS_HAD, read_run_config
from demo import emoji_corpus, emoji_sources, make_corpus
from demo import run as demo
from pipelines import score

log = logging.getLogger("bench.ablations")
COMMAND = ".venv/bin/python bench/ablations.py"
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))

# name -> (config, field overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "uniform": ("uniform", {}),
    "offline_top30": ("offline_filter", {}),
    "independent_f0.5": ("independent", {"filter_ratio": 0.5}),
    "independent_f0.8": ("independent", {"filter_ratio": 0.8}),
    "independent_f0.9": ("independent", {"filter_ratio": 0.9}),
    "hard_learner_f0.8": ("hard_learner", {}),
    "easy_reference_f0.8": ("easy_reference", {}),
    "learnability_f0.5": ("jest", {"filter_ratio": 0.5}),
    "learnability_f0.8": ("jest", {}),
    "learnability_f0.9": ("jest", {"filter_ratio": 0.9}),
    "learnability_f0.8_flexi": ("jest_flexi", {}),
    # bench only: uniform sampling from the examples whose hidden truth is clean (an upper bound on what curation can
    # gain here; the truth is never a selection input)
    gates.ORACLE: ("uniform", {}),
}
# the scored set a variant reads when it is not its setting's own
SOURCES = {gates.ORACLE: "clean"}
REPEATED_DISTINCT = 48  # distinct examples copied in the "repeated" setting
REPEATED_SHARE = 0.5  # share of the rows that are copies
# The corpora the protocol runs on: the demo's, and the emoji corpus of real drawings, not used for choosing any
# setting of the protocol. Each one's reference trains until it passes its gate: 1,000 steps under the constant
# schedule (300 under cosine left the demo corpus's at chance on shape; bench/RESULTS.md).
REFERENCE = {"reference_steps": 1000, "reference_schedule": "constant"}
# setting -> (plot title, image name before _CORPUS.png, RESULTS.md section before " (CORPUS corpus)")
SECTIONS = {
    "web": ("web split: selection methods", "ablations", "Learning efficiency"),
    "repeated": ("repeated easy examples", "repeated", "The learner's state"),
    "larger_reference": ("a reference larger than the learner", "larger", "A larger reference"),
}
CORPORA = {
    # the demo's generator, version 2 (long tail, graded difficulty; demo/make_corpus.py): a recipe of its own
    "demo": {"out": "runs/bench/demo", "seed": 0, "noise": {}, "generator": make_corpus.GENERATOR_VERSION, **REFERENCE},
    # real images: emoji drawn by people, two artworks (demo/emoji_corpus.py; `make bench` installs its sources)
    "emoji": {"out": "runs/bench/emoji", "seed": 0, "noise": {}, "maker": "emoji", **REFERENCE},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus",
        default="demo",
        choices=sorted(CORPORA),
        help="demo: the demo's corpus; emoji: real images (emoji drawn by people, demo/emoji_corpus.py), held out "
        "from every choice of settings",
    )
    parser.add_argument(
        "--part",
        default="headline",
        choices=[*protocol.PARTS, "all"],
        help="which runs: "
        + "; ".join(
            f"{name}: {len(part.variants)} variants x {part.seeds} seeds" for name, part in protocol.PARTS.items()
        ),
    )
    parser.add_argument("--demo", default="", help="the corpus's folder (default: runs/bench/demo or runs/bench/emoji)")
    parser.add_argument(
        "--out", default="runs/bench_ablations", help="the runs' workdirs (kept: a second call resumes)"
    )
    parser.add_argument("--curves", default=protocol.CURVES_DIR, help="where each finished run's curve is written")
    parser.add_argument("--seeds", type=int, default=0, help="seeds per variant (default: the part's own)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=64, help="the sub-batch b every variant trains on")
    parser.add_argument(
        "--repeated_steps",
        type=int,
        default=600,
        help="steps in the 'repeated' setting: long enough for the learner to learn the copies",
    )
    parser.add_argument("--evals", type=int, default=20, help="evaluations per run (the resolution of 'to reach')")
    parser.add_argument("--variants", default="", help="comma-separated subset of the part's variants")
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="train nothing: tables and plots from the curve files already under --curves",
    )
    parser.add_argument("--no_write", action="store_true", help="do not update bench/RESULTS.md or its plots")
    parser.add_argument(
        "--despite_gates",
        action="store_true",
        help="train the parts even when the corpus's reference or curation gate does not pass (their comparisons "
        "are void)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(filter(None, args.variants.split(","))) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {unknown}; known: {sorted(VARIANTS)}")
    if args.evals < 2 or args.steps < args.evals:
        parser.error(f"--evals {args.evals} with --steps {args.steps}: need 2 ≤ evals ≤ steps")
    return args


def variant_config(variant: str, seed: int, steps: int, batch_size: int, evals: int) -> configs.TrainConfig:
    name, overrides = VARIANTS[variant]
    base = configs.get_config(name)
    every = max(steps // evals, 1)
    return dataclasses.replace(
        base,
        **overrides,
        name=variant,
        seed=seed,
        total_steps=steps,
        batch_size=batch_size,
        warmup_steps=min(base.warmup_steps, steps // 10),
        schedule=protocol.SCHEDULE,
        eval_every=every,
        checkpoint_every=steps,
        log_every=max(every // 5, 1),
    )


def make_repeated(
    scored: str, out: str, distinct: int = REPEATED_DISTINCT, share: float = REPEATED_SHARE, seed: int = 0
) -> str:
    """A scored set with the scored rows of `scored` plus copies of its `distinct` clean rows of lowest stored
    reference loss, the copies being `share` of all rows, shuffled; copies are marked `truth: "repeat"` in their
    metadata (so the clean share counts only fresh clean examples). Same reference, same schema."""
    import pyarrow as pa

    made = _opened_again(scored, out)
    if made is None:
        return out
    opened, table = made
    truth = np.array([json.loads(m).get("truth") for m in table.column(schema.METADATA).to_pylist()])
    losses = table.column(schema.REF_LOSS).to_numpy()
    clean = np.nonzero(truth == "clean")[0]
    easiest = clean[np.argsort(losses[clean], kind="stable")[:distinct]]
    copies = int(round(table.num_rows * share / (1 - share)))
    picks = easiest[np.arange(copies) % distinct]
    rows = table.to_pylist() + [
        {
            **row,
            schema.KEY: f"{row[schema.KEY]}#copy{i}",
            schema.METADATA: json.dumps({**json.loads(row[schema.METADATA]), "truth": "repeat"}, sort_keys=True),
        }
        for i, row in enumerate(table.take(pa.array(picks)).to_pylist())
    ]
    rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    _write_rows(
        opened, rows, out, "batch-repeated", f"{scored} plus {copies} copies of its {distinct} easiest clean rows"
    )
    return out


def _opened_again(scored: str, out: str):
    """(the scored set `scored` opened, its rows as one table), or None when `out` was already made from the same
    reference's scores (a set made from another reference's is removed, to be made again)."""
    import pyarrow as pa

    opened = scored_set.open_scored(scored)
    existing = batches.read_manifests(out) if os.path.isdir(out) else []
    if existing:
        if existing[-1].reference_fingerprint == opened.manifests[-1].reference_fingerprint:
            return None
        shutil.rmtree(out)
    return opened, pa.concat_tables([scored_set.read_scored_parquet(path) for path in opened.shard_paths("parquet")])


def _write_rows(opened, rows: list[dict], out: str, name: str, note: str) -> None:
    """`rows` (dicts of the schema's columns) as one scored batch `name` under `out`, with `opened`'s manifest."""
    for row in rows:  # the writer takes embeddings as arrays
        for column in schema.EMBEDDINGS:
            row[column] = np.asarray(row[column], np.float16)
        row.setdefault(schema.IMAGE_SHA256, None)  # a row of a batch before schema version 3
        row.setdefault(schema.IMAGE_THUMBNAIL, None)  # ... before version 4
    manifest = opened.manifests[-1]
    batches.write_scored_batch(
        out,
        name,
        schema.rows_to_table(rows, opened.embed_dim),
        dataclasses.replace(
            manifest,
            schema_version=schema.SCHEMA_VERSION,
            counts=Counts(read=len(rows), scored=len(rows), dead_letter={}),
            options=dataclasses.replace(manifest.options, note=note),
        ),
    )


def make_clean(scored: str, out: str) -> str:
    """The oracle's scored set: the rows of `scored` whose hidden truth (metadata `truth`) is clean, in their order.
    Same reference, same schema; made again only for another reference's scores."""
    made = _opened_again(scored, out)
    if made is None:
        return out
    opened, table = made
    rows = [row for row in table.to_pylist() if json.loads(row[schema.METADATA]).get("truth") == "clean"]
    if not rows:
        raise SystemExit(f"{scored} has no row whose hidden truth is clean: the oracle has nothing to train on")
    _write_rows(opened, rows, out, "batch-clean", f"the {len(rows)} rows of {scored} whose hidden truth is clean")
    return out


def larger_reference(demo_args: argparse.Namespace, corpus: str) -> tuple[str, str]:
    """(workdir, scored set) of the larger-reference setting: a reference of model size protocol.LARGER_REFERENCE
    trained like the corpus's own (curated split, steps, schedule, seed), and the web split scored by it; each made
    when missing, under the corpus's folder."""
    workdir = os.path.join(demo_args.out, "reference_larger")
    scored = os.path.join(demo_args.out, "scored_larger")
    config = dataclasses.replace(demo.reference_config(demo_args), **protocol.LARGER_REFERENCE)
    log.info("larger reference %s (%d steps) -> %s", protocol.LARGER_REFERENCE, config.total_steps, workdir)
    train(config, corpus, workdir)
    score.run([f"--input={corpus}/web/*.tar", f"--output={scored}", f"--reference={workdir}/model", "--incremental"])
    return workdir, scored


def run_finished(workdir: str, steps: int) -> bool:
    if not os.path.isdir(os.path.join(workdir, "model")):
        return False
    try:
        return report.load_run("x", workdir).train_rows[-1]["step"] >= steps
    except (OSError, ValueError, IndexError):
        return False


def summarize(run: report.RunCurves, base: report.RunCurves, reference_flops: float = 0.0) -> dict:
    """A run against its seed's uniform run `base`: finals (the mean zero-shot and each task's, with chance levels),
    and examples, online FLOPs, online + offline scoring FLOPs and wall-clock to reach uniform's final zero-shot
    (interpolated); their ratios to uniform's whole run and (`_first`) to uniform's own first reach of its final; and,
    for a run that uses the reference's scores, its total FLOPs to reach it with the reference's training
    (`reference_flops`) included, against uniform's whole run."""
    uniform = base.final
    final, target = run.final, uniform["zeroshot"]
    drawn = run.examples if run.examples_drawn is None else run.examples_drawn
    axes = {
        "examples": run.examples,
        "examples_drawn": drawn,
        "online_flops": run.online_flops,
        "total_flops": run.total_flops,
        "wall_s": run.wall_s,
    }
    reach = {name: run.to_reach(target, axis) for name, axis in axes.items()}
    base_axes = {"examples": base.examples, "total_flops": base.total_flops}
    first = {name: base.to_reach(target, axis) for name, axis in base_axes.items()}
    uses_scores = run.offline_scoring_flops > 0

    def ratio(name: str, key: str) -> float | None:
        return None if reach[name] is None else reach[name] / uniform[key]

    def ratio_first(name: str) -> float | None:
        return None if reach[name] is None or not first[name] else reach[name] / first[name]

    return {
        "zeroshot": final["zeroshot"],
        "recall": final["recall"],
        "online_flops": final["online_flops"],
        "total_flops": final["total_flops"],
        "wall_s": final["wall_s"],
        "target": target,
        "examples_to_reach": reach["examples"],
        "online_flops_to_reach": reach["online_flops"],
        "total_flops_to_reach": reach["total_flops"],
        "wall_to_reach": reach["wall_s"],
        "examples_ratio": ratio("examples", "examples"),
        "examples_drawn_ratio": ratio("examples_drawn", "examples"),  # uniform draws what it trains on
        "online_flops_ratio": ratio("online_flops", "online_flops"),
        "total_flops_ratio": ratio("total_flops", "total_flops"),
        "wall_ratio": ratio("wall_s", "wall_s"),
        "examples_ratio_first": ratio_first("examples"),
        "total_flops_ratio_first": ratio_first("total_flops"),
        "with_reference_ratio": (
            (reach["total_flops"] + reference_flops) / uniform["total_flops"]
            if uses_scores and reference_flops and reach["total_flops"] is not None
            else None
        ),
        "uses_scores": uses_scores,
        "tasks": run.tasks,
        "chance": run.chance,
        "eval_spacing": run.eval_spacing,
        "selected_clean": (float(np.mean([r["selected_clean"] for r in run.train_rows])) if run.selecting else None),
        "curve": {
            "examples": run.examples.tolist(),
            "online_flops": run.online_flops.tolist(),
            "zeroshot": run.zeroshot.tolist(),
            "recall": run.recall.tolist(),
            "tasks": {name: values.tolist() for name, values in run.task_curves.items()},
        },
        "clean_curve": (
            [[r["step"], r["selected_clean"], r["superbatch_clean"]] for r in run.train_rows] if run.selecting else None
        ),
        "composition": composition(run.train_rows) if run.selecting else None,
        "buckets": bucket_composition(run.train_rows) if run.selecting else None,
    }


def composition(rows: list[dict]) -> dict[str, tuple[float, float]] | None:
    """{truth kind: (mean share selected, mean share in the super-batch)} over the logged rows; None for a run
    logged before the kinds were."""
    if not rows or "selected/misaligned" not in rows[0]:
        return None
    shares = {
        "clean": (
            float(np.mean([r["selected_clean"] for r in rows])),
            float(np.mean([r["superbatch_clean"] for r in rows])),
        )
    }
    for kind in NOISE_KINDS:
        picked = [r[f"selected/{kind}"] for r in rows]
        drawn = [r[f"superbatch/{kind}"] for r in rows]
        if max(picked + drawn) > 0:
            shares[kind] = (float(np.mean(picked)), float(np.mean(drawn)))
    return shares


def bucket_composition(rows: list[dict]) -> dict[str, tuple[float, float]] | None:
    """{"difficulty: hard", ...: (mean share selected, mean share in the super-batch)} over the logged rows that
    measured it; None for a corpus without buckets or a run logged before buckets were."""
    shares = {}
    for axis, names in BUCKETS.items():
        for name in names:
            measured = [r for r in rows if f"selected/{axis}/{name}" in r]
            if measured:
                shares[f"{axis}: {name}"] = (
                    float(np.mean([r[f"selected/{axis}/{name}"] for r in measured])),
                    float(np.mean([r[f"superbatch/{axis}/{name}"] for r in measured])),
                )
    return shares or None


def composition_table(summaries: dict[str, list[dict]], field: str = "composition") -> str:
    """What each selecting variant chose, by hidden truth: the share selected (mean over seeds) and, beside, the
    share in the super-batches it chose from."""
    selecting = {v: [r for r in runs if r.get(field)] for v, runs in summaries.items()}
    selecting = {v: runs for v, runs in selecting.items() if runs}
    if not selecting:
        return ""
    kinds = list(dict.fromkeys(k for runs in selecting.values() for r in runs for k in r[field]))
    lines = ["| variant | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for variant, runs in selecting.items():
        cells = []
        for kind in kinds:
            pairs = [r[field].get(kind, (0.0, 0.0)) for r in runs]
            cells.append(f"{np.mean([p for p, _ in pairs]):.2f} ({np.mean([d for _, d in pairs]):.2f})")
        seeds = "" if field == "composition" else f" ({len(runs)} seed{'s' * (len(runs) > 1)})"
        lines.append(f"| {variant}{seeds} | " + " | ".join(cells) + " |")
    what = (
        "each hidden-truth kind"
        if field == "composition"
        else "each difficulty and concept-frequency bucket (of the runs that logged them)"
    )
    return (
        f"Share of {what} among the examples selected, mean over seeds and steps (in brackets: its share of the "
        "super-batches drawn):\n\n" + "\n".join(lines)
    )


def mean_std(values: list[float | None]) -> tuple[float, float, int] | None:
    """(mean, std, n) over the values that are not None; None when all are."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return statistics.fmean(present), (statistics.stdev(present) if len(present) > 1 else 0.0), len(present)


def fmt(values: list[float | None], scale: float = 1.0, digits: int = 3, suffix: str = "") -> str:
    stats = mean_std(values)
    if stats is None:
        return "not reached"
    mean, std, n = stats
    text = f"{mean / scale:.{digits}f} ± {std / scale:.{digits}f}{suffix}"
    return text if n == len(values) else f"{text} ({n}/{len(values)} seeds reached)"


def table(summaries: dict[str, list[dict]], reference: dict | None) -> str:
    """Finals, and what each variant spent to reach uniform's final: against uniform's whole run (× uniform's),
    against uniform's own first reach of its final (÷ first reach), and with the reference's training."""
    lines = [
        "| variant | final zero-shot | R@1 | examples trained on to reach uniform's final (× uniform's) | "
        "÷ uniform's first reach | examples drawn to reach it (× uniform's) | "
        "online FLOPs to reach it (× uniform's) | online + offline scoring FLOPs to reach it (× uniform's) | "
        "÷ uniform's first reach | with the reference's training (× uniform's) | "
        "wall-clock to reach it (× uniform's) | clean share selected |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, runs in summaries.items():
        clean = [r["selected_clean"] for r in runs]
        lines.append(
            " | ".join(
                [
                    f"| {variant}",
                    fmt([r["zeroshot"] for r in runs]),
                    fmt([r["recall"] for r in runs]),
                    fmt([r["examples_ratio"] for r in runs], digits=2),
                    fmt([r["examples_ratio_first"] for r in runs], digits=2),
                    fmt([r.get("examples_drawn_ratio") for r in runs], digits=2),
                    fmt([r["online_flops_ratio"] for r in runs], digits=2),
                    fmt([r["total_flops_ratio"] for r in runs], digits=2),
                    fmt([r["total_flops_ratio_first"] for r in runs], digits=2),
                    fmt([r["with_reference_ratio"] for r in runs], digits=2) if runs[0]["uses_scores"] else "—",
                    fmt([r["wall_ratio"] for r in runs], digits=2),
                    fmt(clean, digits=2) if any(c is not None for c in clean) else "—",
                ]
            )
            + " |"
        )
    if reference:
        uniform = summaries.get("uniform")
        share = (
            f" ({fmt([reference['flops'] / r['total_flops'] for r in uniform], digits=2)} × uniform's whole run)"
            if uniform
            else ""
        )
        lines.append(
            f"| reference (curated split, one run) | {reference['zeroshot']:.3f} | {reference['recall']:.3f}"
            f" | — | — | — | its training: {reference['flops'] / 1e12:.2f} TFLOP{share} | — | — | — | — | — |"
        )
    lines += [
        "",
        "× uniform's: divided by the same seed's uniform run's whole run; ÷ uniform's first reach: divided by what "
        "uniform itself spent to first reach its final (an early plateau makes it small); with the reference's "
        "training: the runs that use the reference's scores charged all of its training, as if they were the only "
        "run on them.",
    ]
    return "\n".join(lines)


def task_table(summaries: dict[str, list[dict]], reference: dict | None) -> str:
    """Each task's final accuracy (mean ± std over seeds) beside its chance level, normalised in brackets."""
    chance = next((runs[0]["chance"] for runs in summaries.values() if runs[0]["chance"]), {})
    if not chance:
        return ""
    names = [*gates.zeroshot_tasks(chance), *[name for name in ["retrieval_r1"] if name in chance]]
    header = " | ".join(f"{gates.label(name)} (chance {chance[name]:.3f})" for name in names)
    lines = [f"| variant | {header} |", "|---|" + "---|" * len(names)]

    def cell(values: list[float], name: str) -> str:
        mean = float(np.mean(values))
        spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
        return f"{mean:.3f}{spread} ({report.normalised(mean, chance[name]):+.2f})"

    for variant, runs in summaries.items():
        lines.append(f"| {variant} | " + " | ".join(cell([r["tasks"][n] for r in runs], n) for n in names) + " |")
    if reference and all(name in reference["tasks"] for name in names):
        lines.append("| reference | " + " | ".join(cell([reference["tasks"][n]], n) for n in names) + " |")
    return (
        "Each task's final accuracy, mean ± std over seeds; in brackets, normalised: (accuracy − chance) / "
        "(1 − chance), 0 at chance, 1 when perfect. The mean zero-shot of the other tables averages the zero-shot "
        "tasks.\n\n" + "\n".join(lines)
    )


def interval_text(mean: float, low: float, high: float, digits: int = 2, suffix: str = "", sign: bool = False) -> str:
    spec = f"{'+' if sign else ''}.{digits}f"
    return f"{mean:{spec}}{suffix} (95% CI {low:{spec}} to {high:{spec}})"


def ratio_verdict(runs: list[dict], key: str, goal: float) -> tuple[str, bool, bool]:
    """A ratio to uniform's whole run (one per seed) with its bootstrap interval; whether the goal is met (every
    seed reached uniform's final, and the mean is at most `goal`); and whether that is decided (the interval lies
    on one side of the goal)."""
    values = [r[key] for r in runs]
    present = [v for v in values if v is not None]
    if not present:
        return "none (not reached)", False, True
    mean, low, high = protocol.bootstrap_interval(present)
    text = interval_text(mean, low, high, suffix="x")
    if len(present) < len(values):
        text += f" ({len(present)}/{len(values)} seeds reached)"
    return text, len(present) == len(values) and mean <= goal, not low <= goal < high


def status(ok: bool, decided: bool = True) -> str:
    """ "met" or "missed", marked undecided when the interval straddles the goal."""
    return ("met" if ok else "missed") + ("" if decided else ", undecided")


def paired_verdict(
    summaries: dict[str, list[dict]], first: str, second: str, key: str = "zeroshot"
) -> tuple[float, str, bool]:
    """(mean difference, text, whether its sign is decided) of first − second in `key`, over the seeds both ran,
    with its bootstrap interval."""
    pairs = list(zip(summaries[first], summaries[second]))
    mean, low, high = protocol.paired_interval([a[key] for a, _ in pairs], [b[key] for _, b in pairs])
    seeds = f"{len(pairs)} seed" + ("s" if len(pairs) != 1 else "")
    return mean, f"{interval_text(mean, low, high, digits=3, sign=True)} over {seeds}", not low < 0 < high


def all_legs(legs: list[tuple[bool, bool]]) -> tuple[bool, bool]:
    """(met, decided) of a claim that holds when each of its legs (holds, whether that is sure) does: met for sure
    when every leg surely holds, missed for sure when one leg surely fails."""
    met = all(holds for holds, _ in legs)
    decided = all(sure for _, sure in legs) if met else any(sure for holds, sure in legs if not holds)
    return met, decided


@dataclasses.dataclass(frozen=True)
class Target:
    """One of the paper's claims judged on a setting's runs: `value` its figure with the interval, `status` "met"
    or "missed", `line` the sentence the section prints."""

    name: str
    value: str
    status: str
    line: str


def targets(summaries: dict[str, list[dict]], reference: dict) -> list[Target]:
    """The setting against the targets, each met or missed with the mean over seeds and its 95% bootstrap interval
    (seeds resampled; comparisons taken seed by seed); a target whose variants did not run is left out."""
    found = []
    jest, flexi = "learnability_f0.8", "learnability_f0.8_flexi"
    if jest in summaries:
        examples, examples_ok, examples_decided = ratio_verdict(summaries[jest], "examples_ratio", 0.2)
        total, total_ok, total_decided = ratio_verdict(summaries[jest], "total_flops_ratio", 0.5)
        online, _, _ = ratio_verdict(summaries[jest], "online_flops_ratio", 0.5)
        wall, wall_ok, _ = ratio_verdict(summaries[jest], "wall_ratio", 1.0 - 1e-9)
        examples_first, _, _ = ratio_verdict(summaries[jest], "examples_ratio_first", 0.2)
        total_first, _, _ = ratio_verdict(summaries[jest], "total_flops_ratio_first", 0.5)
        with_reference, _, _ = ratio_verdict(summaries[jest], "with_reference_ratio", 0.5)
        others = f"÷ uniform's first reach {total_first}; with the reference's training {with_reference}"
        line = (
            f"- JEST ({jest}) reaches uniform's final zero-shot with {examples} of uniform's examples "
            f"(goal ≤ 0.2x: {status(examples_ok)}; {examples_first} of what uniform needed to first reach it) and "
            f"{total} of its total FLOPs, the reference's scoring pass included (goal ≤ 0.5x of the whole run: "
            f"{status(total_ok)}; {online} online only; {others}), in {wall} of its wall-clock (goal < 1x: "
            f"{status(wall_ok)})."
        )
        found.append(
            Target(
                "JEST's examples to reach uniform's final ≤ 0.2x", examples, status(examples_ok, examples_decided), line
            )
        )
        found.append(
            Target(
                "JEST's total FLOPs to reach it ≤ 0.5x (of uniform's whole run)",
                f"{total} ({others})",
                status(total_ok, total_decided),
                "",
            )
        )
        finals = [r["zeroshot"] for r in summaries[jest]]
        mean, low, high = protocol.bootstrap_interval(np.asarray(finals) - reference["zeroshot"])
        value = interval_text(mean, low, high, digits=3, sign=True)
        found.append(
            Target(
                "JEST's learner ends above its reference",
                value,
                status(mean > 0, not low <= 0 < high),
                f"- JEST's learner ends {value} from its reference's {reference['zeroshot']:.3f} "
                f"(goal: above it: {status(mean > 0)}).",
            )
        )
    if flexi in summaries:
        total, total_ok, total_decided = ratio_verdict(summaries[flexi], "total_flops_ratio", 1 / 3)
        online, _, _ = ratio_verdict(summaries[flexi], "online_flops_ratio", 1 / 3)
        total_first, _, _ = ratio_verdict(summaries[flexi], "total_flops_ratio_first", 1 / 3)
        with_reference, _, _ = ratio_verdict(summaries[flexi], "with_reference_ratio", 1 / 3)
        others = f"÷ uniform's first reach {total_first}; with the reference's training {with_reference}"
        found.append(
            Target(
                "Flexi-JEST's total FLOPs to reach it ≤ 0.33x (of uniform's whole run)",
                f"{total} ({others})",
                status(total_ok, total_decided),
                f"- Flexi-JEST: {total} of uniform's total FLOPs to reach its final (goal ≤ 0.33x of the whole run: "
                f"{status(total_ok)}; {online} online only; {others}).",
            )
        )
    order = ["learnability_f0.8", "easy_reference_f0.8", "hard_learner_f0.8"]
    present = [v for v in order if v in summaries]
    if len(present) >= 2:
        parts, legs = [], []
        for first, second in zip(present, present[1:]):
            mean, text, sure = paired_verdict(summaries, first, second)
            parts.append(f"{first} − {second} {text}")
            legs.append((mean >= 0, sure))
        ok, decided = all_legs(legs)
        goal = " ≥ ".join(v.removesuffix("_f0.8").replace("_", "-") for v in present)
        found.append(
            Target(
                f"final zero-shot {goal}",
                "; ".join(parts),
                status(ok, decided),
                "- Final zero-shot, " + "; ".join(parts) + f" (goal: {' ≥ '.join(present)}: {status(ok)}).",
            )
        )
    gaps = []
    for f in ("0.5", "0.8", "0.9"):
        joint, independent = f"learnability_f{f}", f"independent_f{f}"
        if joint in summaries and independent in summaries:
            gaps.append((f, *paired_verdict(summaries, joint, independent)))
    if gaps:
        ahead, ahead_decided = all_legs([(gap >= 0, sure) for _, gap, _, sure in gaps])
        value = "; ".join(f"{text} at f = {f}" for f, _, text, _ in gaps)
        growth = gap_growth(summaries, [f for f, *_ in gaps]) if len(gaps) > 1 else None
        trend = (
            f"the gap growing with f: {growth.status}"
            if growth
            else "the gap growing with f: not measured here, one f (the sweep part runs the others)"
        )
        found.append(
            Target(
                "joint ≥ independent at every f",
                value,
                status(ahead, ahead_decided),
                f"- Joint minus independent final zero-shot: {value} (goal: joint ahead at every f: "
                f"{status(ahead)}; {trend}).",
            )
        )
        if growth:
            found.append(growth)
    return found


def gap_growth(summaries: dict[str, list[dict]], fs: list[str]) -> Target:
    """Whether joint − independent grows with f: its seed-by-seed gap at each f over the seeds every f ran, met when
    the mean gap never falls from one f to the next, decided by the interval of the gap at the largest f minus the
    gap at the smallest (seed by seed)."""
    seeds = min(len(summaries[f"{kind}_f{f}"]) for f in fs for kind in ("learnability", "independent"))
    gaps = {
        f: np.asarray(
            [
                joint["zeroshot"] - independent["zeroshot"]
                for joint, independent in zip(
                    summaries[f"learnability_f{f}"][:seeds], summaries[f"independent_f{f}"][:seeds]
                )
            ]
        )
        for f in fs
    }
    means = [float(gaps[f].mean()) for f in fs]
    growing = all(b >= a for a, b in zip(means, means[1:]))
    mean, low, high = protocol.bootstrap_interval(gaps[fs[-1]] - gaps[fs[0]])
    decided = not low < 0 < high
    value = (
        ", ".join(f"{m:+.3f} at f = {f}" for f, m in zip(fs, means)) + f" over {seeds} seeds; f = {fs[-1]} "
        f"minus f = {fs[0]}: {interval_text(mean, low, high, digits=3, sign=True)}"
    )
    # the trend is decided only when the end-to-end change is sure and agrees with the means' steps
    return Target("joint − independent growing with f", value, status(growing, decided and (mean > 0) == growing), "")


def verdicts(summaries: dict[str, list[dict]], reference: dict) -> list[str]:
    """The sentences of `targets`, one per claim."""
    return [t.line for t in targets(summaries, reference) if t.line]


def guarded(verdict: str, guard: list[gates.Gate]) -> str:
    """A claim's status under its setting's gates: void (not met, not missed) when the reference or curation gate
    did not pass, and marked when only tasks that do not discriminate decide it."""
    reason = gates.void_reason(guard)
    if reason:
        return f"void (gate not passed: {reason}; as judged: {verdict})"
    return verdict + ("; decided only by tasks that do not discriminate" if gates.only_flat_tasks(guard) else "")


def targets_table(judged: dict[str, dict[str, tuple[list[Target], list[gates.Gate]]]]) -> str:
    """The gates, then one row per claim and setting, one column per corpus: {corpus: {setting: ([Target],
    [Gate])}}; a claim on a setting whose gates fail is void."""
    corpora = list(judged)
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for corpus, settings in judged.items():
        for setting, (found, guard) in settings.items():
            for gate in guard:
                verdict = {True: "passed", False: "failed", None: "not measured"}[gate.passed]
                rows.setdefault((setting, "gate: " + gate.name.split(" (")[0]), {})[corpus] = (
                    f"**{verdict}**: {gate.detail}"
                )
            for target in found:
                rows.setdefault((setting, target.name), {})[corpus] = (
                    f"**{guarded(target.status, guard)}**: {target.value}"
                )
    lines = [
        "| setting | claim | " + " | ".join(f"{c} corpus" for c in corpora) + " |",
        "|---|---|" + "---|" * len(corpora),
    ]
    for (setting, name), by_corpus in rows.items():
        cells = [by_corpus.get(c, "not run") for c in corpora]
        lines.append(f"| {setting} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(summaries: dict[str, list[dict]], first: str, second: str) -> str:
    """Seed-by-seed differences first − second in final zero-shot and R@1 (same seed: same init and data order)."""
    parts = []
    for key, label in (("zeroshot", "zero-shot"), ("recall", "R@1")):
        diffs = [a[key] - b[key] for a, b in zip(summaries[first], summaries[second])]
        wins = sum(diff > 0 for diff in diffs)
        parts.append(
            f"{label} {', '.join(f'{diff:+.3f}' for diff in diffs)} ({first} ahead in {wins} of {len(diffs)} seeds)"
        )
    return f"- {first} − {second}, seed by seed: " + "; ".join(parts) + "."


def paired_if_run(summaries: dict[str, list[dict]], first: str, second: str) -> list[str]:
    """[paired(...)] when both variants ran (a `--variants` subset may leave one out), else []."""
    return [paired(summaries, first, second)] if first in summaries and second in summaries else []


def smooth(values: np.ndarray, window: int = 5) -> np.ndarray:
    """Moving average over `window` logged rows (shorter at the ends)."""
    width = min(window, len(values))  # "same" would lengthen a curve shorter than the window
    kernel = np.ones(max(1, width - (1 - width % 2)))  # odd, so the window is centred
    return np.convolve(values, kernel, "same") / np.convolve(np.ones_like(values), kernel, "same")


def plot(
    summaries: dict[str, list[dict]],
    path: str,
    title: str,
    reference: dict | None,
    clean_label: str = "share of clean examples (mean over seeds)",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [v for v in summaries if "_f0." in v and "flexi" not in v]
    if len({v.rsplit("_f", 1)[1] for v in sweep}) < 2:
        sweep = []  # one filter ratio: the fourth panel shows what the selecting runs chose instead
    first = next(iter(summaries.values()))[0]
    chance = first.get("chance", {})
    tasks = [name for name in gates.zeroshot_tasks(chance) if name in first["curve"].get("tasks", {})][:2]
    figure, grid = plt.subplots(3 if tasks else 2, 2, figsize=(14, 14 if tasks else 9.5), constrained_layout=True)
    axes = grid.reshape(-1)
    figure.suptitle(title)
    curves = [v for v in summaries if "_f0.5" not in v and "_f0.9" not in v]  # the f sweep has its own panel
    colours = {variant: f"C{index % 10}" for index, variant in enumerate(curves)}
    for axis, (key, label) in zip(
        axes[:2], [("examples", "examples trained on"), ("online_flops", "online FLOPs (learner updates and scoring)")]
    ):
        for variant in curves:
            runs = summaries[variant]
            x = np.mean([r["curve"][key] for r in runs], axis=0)
            y = np.array([r["curve"]["zeroshot"] for r in runs])
            (line,) = axis.plot(x, y.mean(0), marker="o", markersize=3, label=variant, color=colours[variant])
            axis.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=line.get_color(), alpha=0.15)
        if reference:
            axis.axhline(reference["zeroshot"], color="grey", linestyle="--", label="reference")
        axis.set(xlabel=label, ylabel="zero-shot top-1 (mean ± std over seeds)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    names = list(summaries)
    means = [np.mean([r["zeroshot"] for r in summaries[v]]) for v in names]
    stds = [np.std([r["zeroshot"] for r in summaries[v]]) for v in names]
    axes[2].barh(names, means, xerr=stds, color="tab:blue", alpha=0.7)
    right = max(m + e for m, e in zip(means, stds)) + 0.02
    axes[2].set(xlabel="final zero-shot top-1", xlim=(min(means) - 0.1, right))
    axes[2].invert_yaxis()
    if sweep:
        for method in ("learnability", "independent"):
            points = sorted((float(v.rsplit("_f", 1)[1]), v) for v in sweep if v.startswith(method))
            if points:
                f = [p for p, _ in points]
                y = [np.mean([r["zeroshot"] for r in summaries[v]]) for _, v in points]
                e = [np.std([r["zeroshot"] for r in summaries[v]]) for _, v in points]
                axes[3].errorbar(
                    f,
                    y,
                    yerr=e,
                    marker="o",
                    capsize=3,
                    label="joint learnability" if method == "learnability" else "independent",
                )
        uniform = [r["zeroshot"] for r in summaries.get("uniform", [])]
        if uniform:
            axes[3].axhline(np.mean(uniform), color="black", linestyle=":", label="uniform")
        axes[3].set(xlabel="filter ratio f", ylabel="final zero-shot top-1")
        axes[3].legend(fontsize=8)
        axes[3].grid(alpha=0.3)
    else:
        for variant, runs in summaries.items():
            if runs[0]["clean_curve"] is None:
                continue
            curves = np.array([r["clean_curve"] for r in runs])  # [seeds, rows, (step, selected, super-batch)]
            (line,) = axes[3].plot(
                curves[0, :, 0],
                smooth(curves[:, :, 1].mean(0)),
                label=f"{variant}: selected",
                color=colours.get(variant),
            )
            axes[3].plot(
                curves[0, :, 0],
                smooth(curves[:, :, 2].mean(0)),
                color=line.get_color(),
                linestyle=":",
                label=f"{variant}: super-batch",
            )
        axes[3].set(xlabel="step", ylabel=clean_label + ", moving average", ylim=(0, 1))
        axes[3].grid(alpha=0.3)
        axes[3].legend(fontsize=8)
        axes[3].set_visible(any(runs[0]["clean_curve"] is not None for runs in summaries.values()))
    for axis, name in zip(axes[4:], tasks):  # each zero-shot task against its chance level
        for variant in colours:  # the variants of the first panels
            runs = summaries[variant]
            x = np.mean([r["curve"]["examples"] for r in runs], axis=0)
            y = np.array([r["curve"]["tasks"][name] for r in runs])
            (line,) = axis.plot(x, y.mean(0), marker="o", markersize=3, label=variant, color=colours[variant])
            axis.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=line.get_color(), alpha=0.15)
        if reference and name in reference.get("tasks", {}):
            axis.axhline(reference["tasks"][name], color="grey", linestyle="--", label="reference")
        axis.axhline(chance[name], color="black", linestyle=":", label=f"chance ({chance[name]:.3f})")
        axis.set(xlabel="examples trained on", ylabel=f"{gates.label(name)} top-1 (mean ± std over seeds)")
        axis.set_title(gates.label(name))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in axes[4 + len(tasks) :]:
        axis.set_visible(False)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def reference_recipe(reference_workdir: str, corpus: str) -> str:
    """What makes a corpus's reference, short of its bytes: its training config and the corpus generator's settings
    (sha256). Retrained from the same recipe on another machine, a reference differs in the last bits of its params,
    so its fingerprint differs; the demo's seed-0 runs made again that way repeat their committed evaluations to
    within 0.001 (bench/RESULTS.md, protocol), so curves are matched by recipe, and the fingerprint is kept beside.
    A field added to the config later is left out at the value runs before it had (`dedup`: None), so a reference
    trained by today's code has the recipe of one trained before the field existed."""
    saved = read_run_config(os.path.join(reference_workdir, "config.json"))
    config = {k: v for k, v in saved.items() if k not in OLDER_RUNS_HAD or v != OLDER_RUNS_HAD[k]}
    defaults = demo.parse_args([])
    spec = {
        "corpus": CORPORA[corpus],
        "web_size": defaults.web_size,
        "curated_size": defaults.curated_size,
        "eval_size": defaults.eval_size,
    }
    text = json.dumps({"reference": config, **spec}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def run_settings(args: argparse.Namespace, setting: str, reference: str, recipe: str) -> dict:
    """What a curve records of how its run was made (a curve made otherwise is run again); `reference`: the
    fingerprint of the reference whose scores the runs read, `recipe` how that reference was made."""
    steps = args.repeated_steps if setting == "repeated" else args.steps
    return {
        "steps": steps,
        "batch_size": args.batch_size,
        "evals": args.evals,
        "schedule": protocol.SCHEDULE,
        "reference": reference,
        "reference_recipe": recipe,
    }


def comparable(settings: dict) -> dict:
    """The settings two curves must share to be compared or reused: all but the reference's fingerprint."""
    return {key: value for key, value in settings.items() if key != "reference"}


def curve_matches(path: str, wanted: dict) -> bool:
    try:
        with open(path) as f:
            curve = json.load(f)
        return curve.get("version") == protocol.CURVE_VERSION and comparable(curve.get("config", {})) == comparable(
            wanted
        )
    except (OSError, ValueError):
        return False


def train_part(
    args: argparse.Namespace,
    name: str,
    part: protocol.Part,
    corpus: str,
    sources: dict[str, str],
    seeds: int,
    recipe: str,
) -> None:
    """Trains what the part's curve files lack, one run at a time, writing each curve as its run finishes."""
    variants = [v for v in part.variants if not args.variants or name == "gates" or v in args.variants.split(",")]
    wanted = run_settings(
        args, part.setting, scored_set.open_scored(sources[part.setting]).manifests[-1].reference_fingerprint, recipe
    )
    jobs = [
        (variant, seed)
        for seed in range(seeds)
        for variant in variants
        if not curve_matches(protocol.curve_path(args.corpus, part.setting, variant, seed, args.curves), wanted)
    ]
    started = time.perf_counter()
    for index, (variant, seed) in enumerate(jobs, 1):
        workdir = os.path.join(args.out, args.corpus, part.setting, variant, f"seed{seed}")
        log.info(
            "[%s %d/%d] %s / %s / seed %d (%.0f min so far)",
            name,
            index,
            len(jobs),
            part.setting,
            variant,
            seed,
            (time.perf_counter() - started) / 60,
        )
        if not run_finished(workdir, wanted["steps"]):
            if os.path.isdir(workdir):
                shutil.rmtree(workdir)  # unfinished, or made otherwise: start over
            train(
                variant_config(variant, seed, wanted["steps"], args.batch_size, args.evals),
                corpus,
                workdir,
                scored_dir=sources[SOURCES.get(variant, part.setting)],
            )
        protocol.write_curve(
            protocol.curve_path(args.corpus, part.setting, variant, seed, args.curves),
            protocol.curve_from_run(report.load_run(variant, workdir), wanted),
        )


def reference_of(args: argparse.Namespace, corpus: str, setting: str = "web") -> dict | None:
    """The reference whose scores `setting`'s runs read on `corpus`, from its curve: final zero-shot, R@1, each
    task's final and chance, its training FLOPs; None when it has no curve."""
    path = os.path.join(args.curves, corpus, protocol.REFERENCE_CURVES[setting])
    if not os.path.exists(path):
        return None
    run = protocol.read_curve(path)
    return {**run.final, "flops": run.final["online_flops"], "tasks": run.tasks, "chance": run.chance}


def borrowed(setting: str) -> set[str]:
    """The variants `setting` reads from the web setting's curves (runs that do not read its scores)."""
    return {v for part in protocol.PARTS.values() if part.setting == setting for v in part.borrows}


def has_setting(args: argparse.Namespace, setting: str, corpus: str) -> bool:
    own = next(v for v in setting_variants(setting) if v not in borrowed(setting))
    return os.path.exists(protocol.curve_path(corpus, setting, own, 0, args.curves))


def load_setting(args: argparse.Namespace, setting: str, variants: list[str], corpus: str = "") -> tuple[dict, dict]:
    """({variant: [summary per seed]}, the curves' settings) from the curve files of `corpus` (default
    --corpus): every seed whose uniform run is there too, in seed order."""
    corpus = corpus or args.corpus
    reference = reference_of(args, corpus, setting)
    reference_flops = reference["flops"] if reference else 0.0
    lent = borrowed(setting)

    def curves_of(variant: str) -> list[tuple[report.RunCurves, dict]]:
        found, seed, where = [], 0, "web" if variant in lent else setting
        while os.path.exists(path := protocol.curve_path(corpus, where, variant, seed, args.curves)):
            with open(path) as f:
                curve = json.load(f)
            found.append((protocol.curve_to_run(curve, path), curve["config"]))
            seed += 1
        return found

    uniform = curves_of("uniform")
    if not uniform:
        raise SystemExit(
            f"no uniform curve under {args.curves}/{corpus}/{'web' if 'uniform' in lent else setting}: run its part "
            "first (uniform's final is the target of 'to reach')"
        )
    summaries, made, made_lent = {}, set(), set()
    for variant in variants:
        runs = curves_of(variant)[: len(uniform)]
        if runs:
            for _, config in runs:
                (made_lent if variant in lent else made).add(json.dumps(comparable(config), sort_keys=True))
            summaries[variant] = [summarize(run, base, reference_flops) for (run, _), (base, _) in zip(runs, uniform)]
    made = made or made_lent

    def trained(text: str) -> dict:  # how a run trained, whichever reference scored its set
        return {k: v for k, v in json.loads(text).items() if k != "reference_recipe"}

    if any(trained(m) != trained(n) for m in made_lent for n in made):
        made |= made_lent  # a borrowed run trained otherwise: refused below
    if len(made) > 1:
        raise SystemExit(
            f"the curves of {corpus}/{setting} were made with different settings or references "
            f"({sorted(made)}): run the parts again with one set of --steps, --batch_size and --evals"
        )
    return summaries, json.loads(made.pop())


def setting_variants(setting: str) -> list[str]:
    """Every variant a setting's parts run or read, in the parts' order."""
    return list(
        dict.fromkeys(
            v
            for part in protocol.PARTS.values()
            if part.setting == setting
            for v in (*part.borrows, *part.needs, *part.variants)
        )
    )


def corpus_gates(args: argparse.Namespace, corpus: str, setting: str, summaries: dict[str, list[dict]]) -> list:
    """The three gates guarding `setting`'s comparisons on `corpus` (the curation gate from its web split)."""
    web = summaries if setting == "web" else {}
    if setting != "web" and has_setting(args, "web", corpus):
        web, _ = load_setting(args, "web", ["uniform", gates.ORACLE], corpus)
    return gates.setting_gates(reference_of(args, corpus, setting), summaries, web)


def judge_corpora(args: argparse.Namespace) -> dict[str, dict[str, tuple[list[Target], list[gates.Gate]]]]:
    """{corpus: {setting: ([Target], [Gate])}} for every corpus and setting with curves under --curves."""
    judged: dict[str, dict[str, tuple[list[Target], list[gates.Gate]]]] = {}
    for corpus in CORPORA:
        judged[corpus] = {}
        for setting in dict.fromkeys(part.setting for part in protocol.PARTS.values()):
            reference = reference_of(args, corpus, setting)
            if reference is not None and has_setting(args, setting, corpus):
                summaries, _ = load_setting(args, setting, setting_variants(setting), corpus)
                judged[corpus][setting] = (
                    targets(summaries, reference) + larger_reference_targets(args, setting, summaries, corpus),
                    corpus_gates(args, corpus, setting, summaries),
                )
    return judged


def larger_reference_targets(
    args: argparse.Namespace, setting: str, summaries: dict[str, list[dict]], corpus: str
) -> list[Target]:
    """In the larger-reference setting: joint learnability with the larger reference against the same learner with
    the learner-sized reference of the web setting, seed by seed (the seeds both ran)."""
    jest = "learnability_f0.8"
    if setting != "larger_reference" or jest not in summaries or not has_setting(args, "web", corpus):
        return []
    web, _ = load_setting(args, "web", [jest], corpus)
    if jest not in web:
        return []
    seeds = min(len(web[jest]), len(summaries[jest]))
    mean, text, sure = paired_verdict({"larger": summaries[jest][:seeds], "same": web[jest][:seeds]}, "larger", "same")
    return [
        Target(
            "JEST with the larger reference ≥ with the learner-sized one",
            text,
            status(mean >= 0, sure),
            f"- JEST's final zero-shot with the larger reference minus with the learner-sized one: {text} (goal: "
            f"not below: {status(mean >= 0)}).",
        )
    ]


def plateau_line(summaries: dict[str, list[dict]], schedule: str) -> str:
    gains = [protocol.plateau_gain(r["curve"]["zeroshot"]) for r in summaries["uniform"]]
    mean, low, high = protocol.bootstrap_interval(gains)
    judged = "plateaued" if high < protocol.PLATEAU_GAIN else "not plateaued"
    caveat = (
        ""
        if schedule == "constant"
        else " Under a decaying learning rate a plateau may be the schedule's, not the data's."
    )
    return (
        f"Uniform {judged} under the {schedule} learning-rate schedule: its last quarter of evaluations is "
        f"{interval_text(mean, low, high, 3, sign=True)} zero-shot above the quarter before (judged plateaued when "
        f"the interval's top is under {protocol.PLATEAU_GAIN}).{caveat}"
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    parts = dict(protocol.PARTS) if args.part == "all" else {args.part: protocol.PARTS[args.part]}
    reference_curve = os.path.join(args.curves, args.corpus, "reference.json")
    if not args.rebuild:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        corpus_spec = CORPORA[args.corpus]
        demo_args = demo.parse_args(
            ["--out", args.demo or corpus_spec["out"], "--seed", str(corpus_spec["seed"])]
            + [f"--{name}={corpus_spec[name]}" for name in REFERENCE]
        )
        noise = make_corpus.NoiseRates(**corpus_spec["noise"]) if corpus_spec["noise"] else None
        maker = emoji_corpus.write_corpus if corpus_spec.get("maker") == "emoji" else make_corpus.write_corpus
        try:
            corpus, reference_workdir, scored = demo.prepare(demo_args, noise=noise, maker=maker)
        except emoji_sources.MissingSource as missing:
            raise SystemExit(f"{COMMAND}: error: {missing}") from None
        protocol.write_curve(
            reference_curve,
            protocol.curve_from_run(report.load_run("reference", reference_workdir), {"workdir": reference_workdir}),
        )
        sources = {"web": scored}
        recipes = {"web": reference_recipe(reference_workdir, args.corpus)}
        recipes["repeated"] = recipes["web"]
        if any(part.setting == "larger_reference" for part in parts.values()):
            larger_workdir, sources["larger_reference"] = larger_reference(demo_args, corpus)
            recipes["larger_reference"] = reference_recipe(larger_workdir, args.corpus)
            protocol.write_curve(
                os.path.join(args.curves, args.corpus, protocol.REFERENCE_CURVES["larger_reference"]),
                protocol.curve_from_run(report.load_run("reference", larger_workdir), {"workdir": larger_workdir}),
            )
        if any(part.setting == "repeated" for part in parts.values()):
            sources["repeated"] = make_repeated(scored, os.path.join(args.out, args.corpus, "repeated_scored"))
        # the gates' runs come first: they decide whether the other parts' comparisons can mean anything
        parts = {"gates": protocol.PARTS["gates"], **parts}
        sources["clean"] = make_clean(scored, os.path.join(args.out, args.corpus, "clean_scored"))
        for name, part in parts.items():
            if name != "gates" and not args.despite_gates:
                web, _ = load_setting(args, "web", ["uniform", gates.ORACLE])
                void = gates.void_reason(corpus_gates(args, args.corpus, "web", web))
                if void:
                    print(
                        f"Not running the {', '.join(n for n in parts if n != 'gates')} part(s) of the {args.corpus} "
                        f"corpus: its gate(s) {void} did not pass, so their comparisons would be void (the gates: "
                        f"`{COMMAND} --corpus {args.corpus} --part gates --rebuild --no_write`; to run them anyway: "
                        "--despite_gates)."
                    )
                    break
            train_part(
                args,
                name,
                part,
                corpus,
                sources,
                args.seeds or part.seeds,
                recipes[part.setting],
            )

    if not os.path.exists(reference_curve):
        raise SystemExit(
            f"no curves of the {args.corpus} corpus under {args.curves} ({reference_curve} is missing): "
            "give --curves the folder the parts wrote, or run a part without --rebuild"
        )
    for setting in dict.fromkeys(part.setting for part in parts.values()):
        reference = reference_of(args, args.corpus, setting)
        if not has_setting(args, setting, args.corpus):
            print(f"No curves of the {setting} setting of the {args.corpus} corpus under {args.curves}: skipped.")
            continue
        summaries, made = load_setting(args, setting, setting_variants(setting))
        guard = corpus_gates(args, args.corpus, setting, summaries)
        seeds = {variant: len(runs) for variant, runs in summaries.items()}
        settings_line = (
            f"Corpus: {args.corpus}. {made['steps']} steps of b = {made['batch_size']} for every "
            f"variant, {made['evals']} evaluations per run on the corpus's eval splits; seeds per "
            "variant: " + ", ".join(f"{v} {n}" for v, n in seeds.items()) + " (model init, data order "
            "and selection noise; one reference model). Intervals: 95% percentile bootstrap over seeds, "
            "comparisons taken seed by seed."
        )
        if setting == "larger_reference":
            settings_line += (
                f" The runs read the web split scored by a reference of model size {protocol.LARGER_REFERENCE} "
                "trained on the same curated split, steps and schedule as the web setting's (which is the "
                "learner's size); uniform's runs are the web setting's."
            )
        if setting == "repeated":
            settings_line += (
                f" Corpus rows: the scored web split plus copies of its {REPEATED_DISTINCT} clean "
                f"examples easiest for the reference, the copies making {REPEATED_SHARE:.0%} of them."
            )
        title, image, section = SECTIONS[setting]
        image = f"{image}_{args.corpus}.png"
        path = os.path.join(args.out, args.corpus, image)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        plot(
            summaries,
            path,
            f"{args.corpus} corpus, {title} (mean ± std over seeds)",
            reference,
            clean_label="share of clean examples"
            if setting != "repeated"
            else "share of fresh clean examples (not copies, not noise)",
        )
        claims = (
            verdicts(summaries, reference)
            + paired_if_run(summaries, "learnability_f0.8", "easy_reference_f0.8")
            + [t.line for t in larger_reference_targets(args, setting, summaries, args.corpus)]
        )
        void = gates.void_reason(guard)
        against = (
            f"Against the targets (**void**: the gate(s) {void} did not pass, so nothing below is met or missed):"
            if void
            else "Against the targets"
            + (" (decided only by tasks that do not discriminate)" if gates.only_flat_tasks(guard) else "")
            + ":"
        )
        body = "\n\n".join(
            filter(
                None,
                [
                    settings_line,
                    "Validity gates (bench/gates.py), computed from these curves:\n\n"
                    + "\n".join(gate.line for gate in guard),
                    plateau_line(summaries, made.get("schedule", "cosine")),
                    table(summaries, reference),
                    task_table(summaries, reference),
                    composition_table(summaries),
                    composition_table(summaries, "buckets"),
                    f"{against}\n\n" + "\n".join(claims) if claims else "",
                    f"![{title}]({image})",
                ],
            )
        )
        if not args.no_write:
            shutil.copy(path, os.path.join(BENCH_DIR, image))
            results.write_section(f"{section} ({args.corpus} corpus)", body, COMMAND)
        print(body)
    summary = (
        f"Every claim judged on the committed curves of each corpus and setting, below its validity gates "
        "(bench/gates.py: where a corpus's reference or curation gate does not pass, its claims are void, neither "
        f"met nor missed; `{COMMAND} --corpus C --part all --rebuild` remakes this table with the sections; the "
        "figures are means over seeds with "
        'their 95% bootstrap intervals, differences taken seed by seed; "undecided": the interval straddles '
        'the goal; "web" is the noisy web split, "repeated" the learner\'s-state setting, "larger_reference" the '
        "web split scored by a reference larger than the learner):\n\n" + targets_table(judge_corpora(args))
    )
    if not args.no_write:
        results.write_section("The claims on both corpora", summary, COMMAND)
    print(summary)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for chatty in ("apache_beam", "absl", "jax", "orbax", "curation"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    sys.exit(main())
