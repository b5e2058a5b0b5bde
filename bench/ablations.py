"""Bench: learning efficiency of the selection methods on the demo corpus, over seeds (mean ± std).

    .venv/bin/python bench/ablations.py                      # the full grid, about 100 min on 2 CPU cores
    .venv/bin/python bench/ablations.py --seeds 1 --steps 30 --repeated_steps 30 --out runs/quick --no_write  # quick

Uses the demo's corpus, reference model and scored shards (`--demo runs/demo`, made first when missing), then
trains every variant for the same number of steps and sub-batch size, once per seed:

  setting "web" (the demo's noisy web split):
    uniform; offline top-30% by stored reference loss; independent (RHO-style) and joint learnability at
    f ∈ {0.5, 0.8, 0.9}; joint hard-learner and easy-reference at f = 0.8; joint learnability with Flexi.
  setting "repeated" (where the learner's state matters; --repeated_steps, longer): the same scored web split
    plus copies of its 48 clean examples easiest for the reference, so that the copies are half of all rows.
    The reference keeps rating the copies easiest however often the learner has seen them; learnability should
    stop choosing them once the learner has learnt them. uniform vs easy-reference vs learnability (joint, f = 0.8).

For each variant: final zero-shot and retrieval R@1, and the examples, FLOPs (scoring included) and wall-clock at
the first evaluation reaching the same seed's uniform run's final zero-shot. Writes `OUT/ablations.json`, the plots
`OUT/ablations.png` and `OUT/repeated.png` (copied next to bench/RESULTS.md), and the sections "Learning
efficiency" and "The learner's state" of bench/RESULTS.md. Finished runs are kept, so a second call resumes;
clear `--out` after the demo's reference changes, since finished runs are kept whatever they read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
import time

import numpy as np

import results  # bench/results.py, beside this script
from curation import configs, report, schema, scored_shards
from curation.train import train
from demo import run as demo

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
}
SETTINGS = {
    "web": list(VARIANTS),
    "repeated": ["uniform", "easy_reference_f0.8", "learnability_f0.8"],
}
REPEATED_DISTINCT = 48  # distinct examples copied in the "repeated" setting
REPEATED_SHARE = 0.5  # share of the rows that are copies


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo", help="the demo's output: corpus, reference, scored shards")
    parser.add_argument("--out", default="runs/bench_ablations")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=64, help="the sub-batch b every variant trains on")
    parser.add_argument("--repeated_steps", type=int, default=400,
                        help="steps in the 'repeated' setting: long enough for the learner to learn the copies")
    parser.add_argument("--evals", type=int, default=6, help="evaluations per run (the resolution of 'to reach')")
    parser.add_argument("--settings", default="web,repeated")
    parser.add_argument("--variants", default="", help="comma-separated subset of the variants (default: all)")
    parser.add_argument("--no_write", action="store_true", help="do not update bench/RESULTS.md")
    return parser.parse_args(argv)


def variant_config(variant: str, seed: int, steps: int, batch_size: int, evals: int) -> configs.TrainConfig:
    name, overrides = VARIANTS[variant]
    base = configs.get_config(name)
    every = max(steps // evals, 1)
    return dataclasses.replace(base, **overrides, name=variant, seed=seed, total_steps=steps, batch_size=batch_size,
                               warmup_steps=min(base.warmup_steps, steps // 10), eval_every=every,
                               checkpoint_every=steps, log_every=max(every // 5, 1))


def make_repeated(scored: str, out: str, distinct: int = REPEATED_DISTINCT, share: float = REPEATED_SHARE,
                  seed: int = 0) -> str:
    """A scored set with the scored rows of `scored` plus copies of its `distinct` clean rows of lowest stored
    reference loss, the copies being `share` of all rows, shuffled; copies are marked `truth: "repeat"` in their
    metadata (so the clean share counts only fresh clean examples). Same reference, same schema."""
    import pyarrow as pa

    scored_set = scored_shards.open_scored(scored)
    manifest = scored_set.manifests[-1]
    existing = scored_shards.read_manifests(out) if os.path.isdir(out) else []
    if existing:
        if existing[-1].reference_fingerprint == manifest.reference_fingerprint:
            return out
        shutil.rmtree(out)  # made from another reference's scores: make it again
    table = pa.concat_tables([scored_shards.read_scored_parquet(path) for path in scored_set.shard_paths("parquet")])
    truth = np.array([json.loads(m).get("truth") for m in table.column(schema.METADATA).to_pylist()])
    losses = table.column(schema.REF_LOSS).to_numpy()
    clean = np.nonzero(truth == "clean")[0]
    easiest = clean[np.argsort(losses[clean], kind="stable")[:distinct]]
    copies = int(round(table.num_rows * share / (1 - share)))
    picks = easiest[np.arange(copies) % distinct]
    rows = table.to_pylist() + [
        {**row, schema.KEY: f"{row[schema.KEY]}#copy{i}",
         schema.METADATA: json.dumps({**json.loads(row[schema.METADATA]), "truth": "repeat"}, sort_keys=True)}
        for i, row in enumerate(table.take(pa.array(picks)).to_pylist())]
    rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    for row in rows:  # the writer takes embeddings as arrays
        for name in schema.EMBEDDINGS:
            row[name] = np.asarray(row[name], np.float16)
    combined = schema.rows_to_table(rows, scored_set.embed_dim)
    scored_shards.write_scored_batch(out, "batch-repeated", combined, dataclasses.replace(
        manifest, counts=scored_shards.Counts(read=len(rows), scored=len(rows), dead_letter={}),
        options=dataclasses.replace(manifest.options,
                                    note=f"{scored} plus {copies} copies of its {distinct} easiest clean rows")))
    return out


def run_finished(workdir: str, steps: int) -> bool:
    if not os.path.isdir(os.path.join(workdir, "model")):
        return False
    try:
        return report.load_run("x", workdir).train_rows[-1]["step"] >= steps
    except (OSError, ValueError, IndexError):
        return False


def summarize(run: report.RunCurves, uniform: dict[str, float]) -> dict:
    """A run against its seed's uniform run (`uniform`: that run's `final`): finals, and examples, online FLOPs,
    online + offline scoring FLOPs and wall-clock to reach uniform's final zero-shot (interpolated), and their ratios
    to uniform's whole run."""
    final, target = run.final, uniform["zeroshot"]
    axes = {"examples": run.examples, "online_flops": run.online_flops, "total_flops": run.total_flops,
            "wall_s": run.wall_s}
    reach = {name: run.to_reach(target, axis) for name, axis in axes.items()}

    def ratio(name: str, key: str) -> float | None:
        return None if reach[name] is None else reach[name] / uniform[key]

    return {
        "zeroshot": final["zeroshot"], "recall": final["recall"], "online_flops": final["online_flops"],
        "total_flops": final["total_flops"], "wall_s": final["wall_s"], "target": target,
        "examples_to_reach": reach["examples"], "online_flops_to_reach": reach["online_flops"],
        "total_flops_to_reach": reach["total_flops"], "wall_to_reach": reach["wall_s"],
        "examples_ratio": ratio("examples", "examples"), "online_flops_ratio": ratio("online_flops", "online_flops"),
        "total_flops_ratio": ratio("total_flops", "total_flops"), "wall_ratio": ratio("wall_s", "wall_s"),
        "eval_spacing": run.eval_spacing,
        "selected_clean": (float(np.mean([r["selected_clean"] for r in run.train_rows]))
                           if run.selecting else None),
        "curve": {"examples": run.examples.tolist(), "online_flops": run.online_flops.tolist(),
                  "zeroshot": run.zeroshot.tolist(), "recall": run.recall.tolist()},
        "clean_curve": ([[r["step"], r["selected_clean"], r["superbatch_clean"]] for r in run.train_rows]
                        if run.selecting else None),
    }


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
    lines = ["| variant | final zero-shot | R@1 | examples to reach uniform's final (× uniform's) | "
             "online FLOPs to reach it (× uniform's) | online + offline scoring FLOPs to reach it (× uniform's) | "
             "wall-clock to reach it (× uniform's) | clean share selected |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, runs in summaries.items():
        clean = [r["selected_clean"] for r in runs]
        lines.append(" | ".join([
            f"| {variant}", fmt([r["zeroshot"] for r in runs]), fmt([r["recall"] for r in runs]),
            fmt([r["examples_ratio"] for r in runs], digits=2),
            fmt([r["online_flops_ratio"] for r in runs], digits=2),
            fmt([r["total_flops_ratio"] for r in runs], digits=2),
            fmt([r["wall_ratio"] for r in runs], digits=2),
            fmt(clean, digits=2) if any(c is not None for c in clean) else "—",
        ]) + " |")
    if reference:
        lines.append(f"| reference (curated split, one run) | {reference['zeroshot']:.3f} | {reference['recall']:.3f}"
                     " | — | — | — | — | — |")
    return "\n".join(lines)


def mean_of(summaries: dict[str, list[dict]], variant: str, key: str) -> float | None:
    stats = mean_std([r[key] for r in summaries.get(variant, [])])
    return None if stats is None else stats[0]


def verdicts(summaries: dict[str, list[dict]], reference: dict) -> list[str]:
    """The web setting against the targets, each line saying met or missed with the numbers (means over seeds)."""
    def check(ok: bool) -> str:
        return "met" if ok else "missed"

    def ratio(variant: str, key: str) -> str:
        values = [r[key] for r in summaries[variant]]
        stats = mean_std(values)
        if stats is None:
            return "none (not reached)"
        return f"{stats[0]:.2f}x" + ("" if stats[2] == len(values) else f" ({stats[2]}/{len(values)} seeds reached)")

    lines = []
    jest, flexi = "learnability_f0.8", "learnability_f0.8_flexi"
    if jest in summaries:
        examples = mean_of(summaries, jest, "examples_ratio")
        flops, wall = mean_of(summaries, jest, "online_flops_ratio"), mean_of(summaries, jest, "wall_ratio")
        lines.append(f"- JEST ({jest}) reaches uniform's final zero-shot with {ratio(jest, 'examples_ratio')} of "
                     f"uniform's examples (goal ≤ 0.2x: {check(examples is not None and examples <= 0.2)}) and "
                     f"{ratio(jest, 'online_flops_ratio')} of its online FLOPs (goal ≤ 0.5x: "
                     f"{check(flops is not None and flops <= 0.5)}; {ratio(jest, 'total_flops_ratio')} with the "
                     f"reference's scoring pass), in {ratio(jest, 'wall_ratio')} of its "
                     f"wall-clock (goal < 1x: {check(wall is not None and wall < 1)}).")
        final = mean_of(summaries, jest, "zeroshot")
        lines.append(f"- JEST's learner ends at {final:.3f} against its reference's {reference['zeroshot']:.3f} "
                     f"(goal: above it: {check(final > reference['zeroshot'])}).")
    if flexi in summaries:
        flops = mean_of(summaries, flexi, "online_flops_ratio")
        lines.append(f"- Flexi-JEST: {ratio(flexi, 'online_flops_ratio')} of uniform's online FLOPs to reach its "
                     f"final (goal ≤ 0.33x: {check(flops is not None and flops <= 1 / 3)}; "
                     f"{ratio(flexi, 'total_flops_ratio')} with the reference's scoring pass).")
    order = ["learnability_f0.8", "easy_reference_f0.8", "hard_learner_f0.8"]
    if all(v in summaries for v in order):
        finals = [mean_of(summaries, v, "zeroshot") for v in order]
        lines.append(f"- Final zero-shot, learnability {finals[0]:.3f}, easy-reference {finals[1]:.3f}, "
                     f"hard-learner {finals[2]:.3f} (goal: in this order: "
                     f"{check(finals[0] >= finals[1] >= finals[2])}).")
    gaps = []
    for f in ("0.5", "0.8", "0.9"):
        joint, independent = f"learnability_f{f}", f"independent_f{f}"
        if joint in summaries and independent in summaries:
            gaps.append((f, mean_of(summaries, joint, "zeroshot") - mean_of(summaries, independent, "zeroshot")))
    if gaps:
        growing = all(b >= a for (_, a), (_, b) in zip(gaps, gaps[1:]))
        lines.append("- Joint minus independent final zero-shot: " + ", ".join(f"{gap:+.3f} at f = {f}"
                                                                             for f, gap in gaps)
                     + f" (goal: joint ahead at every f: {check(all(gap >= 0 for _, gap in gaps))}; the gap "
                     f"growing with f: {check(growing)}).")
    return lines


def paired(summaries: dict[str, list[dict]], first: str, second: str) -> str:
    """Seed-by-seed differences first − second in final zero-shot and R@1 (same seed: same init and data order)."""
    parts = []
    for key, label in (("zeroshot", "zero-shot"), ("recall", "R@1")):
        diffs = [a[key] - b[key] for a, b in zip(summaries[first], summaries[second])]
        wins = sum(diff > 0 for diff in diffs)
        parts.append(f"{label} {', '.join(f'{diff:+.3f}' for diff in diffs)} ({first} ahead in {wins} of "
                     f"{len(diffs)} seeds)")
    return f"- {first} − {second}, seed by seed: " + "; ".join(parts) + "."


def paired_if_run(summaries: dict[str, list[dict]], first: str, second: str) -> list[str]:
    """[paired(...)] when both variants ran (a `--variants` subset may leave one out), else []."""
    return [paired(summaries, first, second)] if first in summaries and second in summaries else []


def smooth(values: np.ndarray, window: int = 5) -> np.ndarray:
    """Moving average over `window` logged rows (shorter at the ends)."""
    width = min(window, len(values))  # "same" would lengthen a curve shorter than the window
    kernel = np.ones(max(1, width - (1 - width % 2)))  # odd, so the window is centred
    return np.convolve(values, kernel, "same") / np.convolve(np.ones_like(values), kernel, "same")


def plot(summaries: dict[str, list[dict]], path: str, title: str, reference: dict | None,
         clean_label: str = "share of clean examples (mean over seeds)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [v for v in summaries if "_f0." in v and "flexi" not in v]
    if len({v.rsplit("_f", 1)[1] for v in sweep}) < 2:
        sweep = []  # one filter ratio: the fourth panel shows what the selecting runs chose instead
    figure, grid = plt.subplots(2, 2, figsize=(14, 9.5), constrained_layout=True)
    axes = grid.reshape(-1)
    figure.suptitle(title)
    curves = [v for v in summaries if "_f0.5" not in v and "_f0.9" not in v]  # the f sweep has its own panel
    colours = {variant: f"C{index % 10}" for index, variant in enumerate(curves)}
    for axis, (key, label) in zip(axes[:2], [("examples", "examples trained on"),
                                             ("online_flops", "online FLOPs (learner updates and scoring)")]):
        for variant in curves:
            runs = summaries[variant]
            x = np.mean([r["curve"][key] for r in runs], axis=0)
            y = np.array([r["curve"]["zeroshot"] for r in runs])
            line, = axis.plot(x, y.mean(0), marker="o", markersize=3, label=variant, color=colours[variant])
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
                axes[3].errorbar(f, y, yerr=e, marker="o", capsize=3,
                                 label="joint learnability" if method == "learnability" else "independent")
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
            line, = axes[3].plot(curves[0, :, 0], smooth(curves[:, :, 1].mean(0)), label=f"{variant}: selected",
                                 color=colours.get(variant))
            axes[3].plot(curves[0, :, 0], smooth(curves[:, :, 2].mean(0)), color=line.get_color(), linestyle=":",
                         label=f"{variant}: super-batch")
        axes[3].set(xlabel="step", ylabel=clean_label + ", moving average", ylim=(0, 1))
        axes[3].grid(alpha=0.3)
        axes[3].legend(fontsize=8)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for chatty in ("apache_beam", "absl", "jax", "orbax", "curation"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    demo_args = demo.parse_args(["--out", args.demo])
    corpus, reference_workdir, scored = demo.prepare(demo_args)
    settings = {s: [v for v in SETTINGS[s] if not args.variants or v in args.variants.split(",")]
                for s in args.settings.split(",")}
    sources = {"web": scored}
    if "repeated" in settings:
        sources["repeated"] = make_repeated(scored, os.path.join(args.out, "repeated_scored"))
    steps = {"web": args.steps, "repeated": args.repeated_steps}
    jobs = [(s, v, seed) for s, variants in settings.items() for seed in range(args.seeds) for v in variants]
    started = time.perf_counter()
    for index, (setting, variant, seed) in enumerate(jobs, 1):
        workdir = os.path.join(args.out, setting, variant, f"seed{seed}")
        if run_finished(workdir, steps[setting]):
            continue
        log.info("[%d/%d] %s / %s / seed %d (%.0f min so far)", index, len(jobs), setting, variant, seed,
                 (time.perf_counter() - started) / 60)
        if os.path.isdir(workdir):
            shutil.rmtree(workdir)  # a different or unfinished configuration: start over
        train(variant_config(variant, seed, steps[setting], args.batch_size, args.evals), corpus, workdir,
              scored_dir=sources[setting])

    ref = report.load_run("reference", reference_workdir)
    reference = {"zeroshot": ref.final["zeroshot"], "recall": ref.final["recall"]}
    summaries: dict[str, dict[str, list[dict]]] = {}
    for setting, variants in settings.items():
        if "uniform" not in variants:
            raise SystemExit("every setting needs its uniform runs (the target of 'to reach')")
        runs = {variant: [report.load_run(variant, os.path.join(args.out, setting, variant, f"seed{seed}"))
                          for seed in range(args.seeds)] for variant in variants}
        summaries[setting] = {}
        for variant in variants:
            summaries[setting][variant] = []
            for run, uniform in zip(runs[variant], runs["uniform"]):
                summaries[setting][variant].append(summarize(run, uniform.final))
    with open(os.path.join(args.out, "ablations.json"), "w") as f:
        json.dump({"args": vars(args), "reference": reference, "summaries": summaries}, f, indent=1)

    def settings_line(setting: str) -> str:
        return (f"{args.seeds} seeds (model init, data order and selection noise; one reference model), "
                f"{steps[setting]} steps of b = {args.batch_size} for every variant, {args.evals} evaluations per "
                f"run on the demo's eval splits; the reference is the demo's ({reference_workdir}).")
    if "web" in summaries:
        path = os.path.join(args.out, "ablations.png")
        plot(summaries["web"], path, "web split: selection methods (mean ± std over seeds)", reference)
        targets = "\n".join(verdicts(summaries["web"], reference)
                              + paired_if_run(summaries["web"], "learnability_f0.8", "easy_reference_f0.8"))
        body = "\n\n".join([settings_line("web"), table(summaries["web"], reference),
                              f"Against the targets (means over seeds):\n\n{targets}", "![ablations](ablations.png)"])
        if not args.no_write:
            shutil.copy(path, os.path.join(BENCH_DIR, "ablations.png"))
            results.write_section("Learning efficiency", body, COMMAND)
        print(body)
    if "repeated" in summaries:
        path = os.path.join(args.out, "repeated.png")
        plot(summaries["repeated"], path, "repeated easy examples: learnability vs easy-reference", reference,
             clean_label="share of fresh clean examples (not copies, not noise)")
        body = "\n\n".join([
            settings_line("repeated") + f" Corpus: the scored web split plus copies of its {REPEATED_DISTINCT} clean "
            f"examples easiest for the reference, the copies making {REPEATED_SHARE:.0%} of the rows.",
            table(summaries["repeated"], reference).replace("clean share selected", "fresh clean share selected"),
            *paired_if_run(summaries["repeated"], "learnability_f0.8", "easy_reference_f0.8"),
            "![repeated](repeated.png)"])
        if not args.no_write:
            shutil.copy(path, os.path.join(BENCH_DIR, "repeated.png"))
            results.write_section("The learner's state", body, COMMAND)
        print(body)


if __name__ == "__main__":
    sys.exit(main())
