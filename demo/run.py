"""The end-to-end demo: `python -m demo --out runs/demo` (what `make demo` runs).

1. make the demo corpus (web split with hidden noise, a clean curated split, eval splits);
2. train the reference model on the curated split;
3. score the web split with the Beam job (in-process runner);
4. train a uniform learner and a JEST learner on the scored web split for the same number of steps;
5. write `OUT/report.md` with the comparison table and PNG plots.

Each stage is skipped when its output is already complete, and a training run that was interrupted resumes, so
running the command again after a crash picks up where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Callable, Sequence

from curation.shared import cli, scored_set
from curation.trainer import configs, report
from curation.trainer.loop import train
from curation.trainer.workdir import other_config
from demo import corpus_files, make_corpus
from pipelines import score

log = logging.getLogger("demo.run")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.OneLineErrorParser(prog="python -m demo", description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--web_size", type=int, default=10000)
    parser.add_argument("--curated_size", type=int, default=8000)
    parser.add_argument("--eval_size", type=int, default=500, help="examples per eval split")
    parser.add_argument(
        "--reference_steps",
        type=int,
        default=1000,
        help="steps of the reference (1,000 under the constant schedule: the fewest that pass its gate on shape)",
    )
    parser.add_argument(
        "--reference_schedule",
        default="constant",
        choices=configs.SCHEDULES,
        help="the reference's learning-rate schedule after warm-up",
    )
    parser.add_argument(
        "--learner_steps",
        type=int,
        default=600,
        help="steps of each learner (the learning benchmark's headline part runs the same)",
    )
    parser.add_argument("--learner_batch_size", type=int, default=64, help="the sub-batch b each learner trains on")
    parser.add_argument(
        "--learner_schedule",
        default="constant",
        choices=configs.SCHEDULES,
        help="the learners' learning-rate schedule after warm-up (the benchmark's: constant)",
    )
    parser.add_argument("--learner_evals", type=int, default=10, help="evaluations per learner run")
    parser.add_argument(
        "--jest_config",
        default="jest_flexi",
        choices=["jest", "jest_flexi"],
        help="the JEST learner's config (Flexi scores the super-batch at 4x fewer tokens)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a tiny version in about a minute (tests)")
    cli.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    corpus_files.check_out(parser, args.out)
    if args.learner_batch_size < 1:
        parser.error(f"--learner_batch_size {args.learner_batch_size}: need at least 1")
    if not 1 <= args.learner_evals <= args.learner_steps:
        parser.error(
            f"--learner_evals {args.learner_evals} with --learner_steps {args.learner_steps}: need 1 ≤ evals ≤ steps"
        )
    return args


def stage(number: int, text: str) -> float:
    log.info("[%d/5] %s", number, text)
    return time.perf_counter()


def config_for(
    name: str,
    steps: int,
    seed: int,
    smoke: bool = False,
    batch_size: int = 0,
    evals: int = 4,
    schedule: str = "cosine",
) -> configs.TrainConfig:
    """Config `name` shortened to `steps`, evaluated `evals` times and checkpointed four times, at sub-batch
    `batch_size` (0: the config's own) under learning-rate `schedule`, or its smoke version."""
    base = configs.get_config(name, smoke=smoke)
    if smoke:
        return base
    return dataclasses.replace(
        base,
        total_steps=steps,
        warmup_steps=min(base.warmup_steps, steps // 10),
        batch_size=batch_size or base.batch_size,
        eval_every=max(steps // evals, 1),
        checkpoint_every=max(steps // 4, 1),
        seed=seed,
        schedule=schedule,
    )


def reference_config(args: argparse.Namespace) -> configs.TrainConfig:
    return config_for("reference", args.reference_steps, args.seed, args.smoke, schedule=args.reference_schedule)


def learner_configs(args: argparse.Namespace) -> dict[str, configs.TrainConfig]:
    return {
        name: config_for(
            name,
            args.learner_steps,
            args.seed,
            args.smoke,
            args.learner_batch_size,
            args.learner_evals,
            args.learner_schedule,
        )
        for name in ("uniform", args.jest_config)
    }


def refuse_other_settings(args: argparse.Namespace) -> None:
    """Stop, in one line and before any work, when `args.out` holds a demo's runs made with other settings (the
    trainer would refuse them midway)."""
    runs = {"reference": (reference_config(args), None)}
    runs.update({name: (config, os.path.join(args.out, "scored")) for name, config in learner_configs(args).items()})
    for name, (config, scored) in runs.items():
        named = other_config(config, os.path.join(args.out, name), scored)
        if named:
            print(
                f"python -m demo: error: {args.out} holds a demo made with other settings ({name}: {named}); "
                f"give another --out, or delete {os.path.join(args.out, name)}",
                file=sys.stderr,
            )
            sys.exit(2)


def prepare(
    args: argparse.Namespace,
    timings: dict[str, float] | None = None,
    noise: make_corpus.NoiseRates | None = None,
    maker: Callable[..., dict] = make_corpus.write_corpus,
) -> tuple[str, str, str]:
    """Stages 1-3 (corpus, reference, scoring) under `args.out`; returns (corpus, reference workdir, scored).
    `noise`: the web split's noise mix (default the demo's own); `maker`: what writes the corpus (the demo
    generator's `write_corpus`, or another with its signature, e.g. `demo.emoji_corpus.write_corpus`)."""
    timings = {} if timings is None else timings
    corpus, scored = os.path.join(args.out, "corpus"), os.path.join(args.out, "scored")
    reference_workdir = os.path.join(args.out, "reference")

    start = stage(1, f"demo corpus: {args.web_size} web, {args.curated_size} curated examples -> {corpus}")
    if not os.path.exists(os.path.join(corpus, "_SPLITS.json")):
        maker(
            corpus,
            size=args.web_size,
            curated_size=args.curated_size,
            eval_size=args.eval_size,
            seed=args.seed,
            shard_size=1000,
            noise=noise or make_corpus.NoiseRates(),
            workers=min(2, os.cpu_count() or 1),
            progress=True,
            overwrite=True,
        )
    timings["corpus"] = time.perf_counter() - start

    start = stage(2, f"reference model on the curated split ({args.reference_steps} steps)")
    train(reference_config(args), corpus, reference_workdir)
    timings["reference"] = time.perf_counter() - start

    start = stage(3, "score the web split with the Beam job")
    score.run(
        [
            f"--input={corpus}/web/*.tar",
            f"--output={scored}",
            f"--reference={os.path.join(reference_workdir, 'model')}",
            "--incremental",
        ]
    )
    timings["scoring"] = time.perf_counter() - start
    return corpus, reference_workdir, scored


def run(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    refuse_other_settings(args)
    timings: dict[str, float] = {}
    corpus, reference_workdir, scored = prepare(args, timings)
    workdirs = {name: os.path.join(args.out, name) for name in ("uniform", args.jest_config)}
    workdirs["reference"] = reference_workdir

    learners = learner_configs(args)
    for name, config in learners.items():
        start = stage(4, f"{name} learner on the scored web split ({args.learner_steps} steps)")
        train(config, corpus, workdirs[name], scored_dir=scored)
        timings[name] = time.perf_counter() - start

    stage(5, "report")
    opened = scored_set.open_scored(scored)
    manifest = opened.manifests[-1]
    jest_config = learners[args.jest_config]
    counts = manifest.counts
    notes = "\n".join(
        [
            "## Settings",
            "",
            f"- corpus: {args.web_size} web examples (hidden noise: misaligned captions, boilerplate, "
            f"near-duplicates, degraded and broken images), {args.curated_size} curated, {args.eval_size} per eval "
            f"split; seed {args.seed}",
            f"- scoring job: read {counts.read}, scored {counts.scored}, dead-lettered {counts.dead_lettered} "
            f"({', '.join(f'{k} {v}' for k, v in counts.dead_letter.items())})",
            f"- learners: {args.learner_steps} steps of b = {jest_config.batch_size}; {args.jest_config} draws "
            f"super-batches of B = {jest_config.superbatch_size} (f = {jest_config.filter_ratio}) and selects "
            f"jointly by learnability in {jest_config.n_chunks} chunks"
            + (
                f", scoring them at patch {jest_config.coarse_patch_size} and training a random half of each sub-batch "
                f"at patch {jest_config.patch_size} and the other half at {jest_config.coarse_patch_size}"
                if jest_config.flexi
                else ""
            ),
            "- FLOPs: online is the learner's updates plus, for JEST, its scoring passes over the super-batches; "
            f"offline scoring is the reference's forward once per example scored ({opened.scored:,} examples), spent "
            "once for every run on these scores; the reference's training is its own row",
            "- stage wall-clock: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()),
        ]
    )
    path = report.write_report(
        {"uniform": workdirs["uniform"], args.jest_config: workdirs[args.jest_config]},
        args.out,
        workdirs["reference"],
        title="JEST demo: uniform vs JEST on the noisy web split",
        notes=notes,
    )
    log.info("report: %s", path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    cli.quiet_logging(parse_args(argv).verbose)
    print(run(argv))


if __name__ == "__main__":
    main()
