"""Bench: how far the sigmoid loss's temperature and bias move, and what that does, per learning-rate multiplier.

    .venv/bin/python bench/loss_parameters.py     # about 12 min on 2 CPU cores

Both towers start at SigLIP's large-batch values (t = 10, b = −10), and Adam moves a param by about the learning
rate a step: over a few hundred steps at 1e-3 they barely move. For each multiplier of their learning rate
(`--temperature_bias_lr_multiplier`), this trains the demo's reference config on the curated split and a JEST
learner on the demo's scored web split (the demo's reference scores), then reports t and b at the start and the
end, the final zero-shot, retrieval and held-out loss, and, for JEST, the off-diagonal share of the conditional
scores joint selection drew by (0: joint selection draws by each candidate's S_ii alone). Writes the "Temperature and
bias" section of bench/RESULTS.md; the trainer's default multiplier is chosen from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import results  # bench/results.py, beside this script

from curation.trainer.loop import train
from curation.trainer.metrics import read_metrics
from demo import run as demo

COMMAND = ".venv/bin/python bench/loss_parameters.py"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo", help="the demo's output: corpus and scored shards")
    parser.add_argument("--out", default="runs/loss_parameters")
    parser.add_argument("--multipliers", default="1,10,30,100")
    parser.add_argument("--reference_steps", type=int, default=300)
    parser.add_argument("--learner_steps", type=int, default=100)
    parser.add_argument("--no_write", action="store_true")
    return parser.parse_args(argv)


def summary(workdir: str) -> dict:
    rows = read_metrics(workdir)
    train_rows = [row for row in rows if "loss" in row]
    final = [row for row in rows if "zeroshot_top1" in row][-1]
    first, last = train_rows[0], train_rows[-1]
    share = [row["offdiag_share"] for row in train_rows if "offdiag_share" in row]
    return {
        "t": (first["t"], last["t"]),
        "b": (first["b"], last["b"]),
        "zeroshot": final["zeroshot_top1"],
        "recall": (final["i2t_r1"] + final["t2i_r1"]) / 2,
        "held_out_loss": final["held_out_loss"],
        "offdiag_share": (share[0], share[-1]) if share else None,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    corpus, _, scored = demo.prepare(demo.parse_args(["--out", args.demo]))
    lines = [
        "| run | multiplier | t: first → last logged | b: first → last logged | final zero-shot | R@1 | "
        "held-out loss | off-diagonal share: first → last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for multiplier in [float(m) for m in args.multipliers.split(",")]:
        for name, steps, scored_dir in (
            ("reference", args.reference_steps, None),
            ("jest", args.learner_steps, scored),
        ):
            config = dataclasses.replace(
                demo.config_for(name, steps, seed=0), temperature_bias_lr_multiplier=multiplier
            )
            workdir = os.path.join(args.out, f"{name}_x{multiplier:g}")
            train(config, corpus, workdir, scored_dir=scored_dir)
            s = summary(workdir)
            share = "—" if s["offdiag_share"] is None else "{:.3f} → {:.3f}".format(*s["offdiag_share"])
            lines.append(
                f"| {name} ({steps} steps) | {multiplier:g} | {s['t'][0]:.2f} → {s['t'][1]:.2f} | "
                f"{s['b'][0]:.2f} → {s['b'][1]:.2f} | {s['zeroshot']:.3f} | {s['recall']:.3f} | "
                f"{s['held_out_loss']:.3f} | {share} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        f"Reference: the demo's reference config on the curated split, {args.reference_steps} steps of "
        f"b = 128; jest: the demo's JEST config on its scored web split (scored by the demo's reference), "
        f"{args.learner_steps} steps. Both start at t = 10, b = −10; the multiplier scales the learning rate "
        "of t and b only. First → last: the first and the last logged training step (10 steps apart at the "
        "start).",
    ]
    results.publish("Temperature and bias", lines, COMMAND, write=not args.no_write)


if __name__ == "__main__":
    main()
