"""Bench: trainer step time reading the scored shards vs the same batches served from memory.

    .venv/bin/python bench/input_pipeline.py     # about 5 min on 2 CPU cores

For each config (uniform: B = b = 128; jest: B = 640 → b = 128) the trainer runs `--steps` steps twice through the
same train loop: once with its input read from the demo's scored Parquet shards (decode, resize, tokenize, stored
reference embeddings), once replaying those very batches from a list in memory. The difference is what the input
pipeline costs the trainer. Step times leave out the first logging interval (compilation). Writes the "Input
pipeline" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import shutil
import tempfile

import numpy as np

import results  # bench/results.py, beside this script
from curation import configs, input_pipeline
from curation.metrics import read_metrics
from curation.train import train
from curation.training_data import TrainingData, build_tokenizer
from demo import run as demo

COMMAND = ".venv/bin/python bench/input_pipeline.py"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo", help="the demo's output: corpus and scored shards")
    parser.add_argument("--configs", default="uniform,jest")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--no_write", action="store_true")
    return parser.parse_args(argv)


def timed_run(config: configs.TrainConfig, corpus: str, scored: str, workdir: str, batches) -> dict:
    train(config, corpus, workdir, scored_dir=scored, batches=batches)
    rows = [row for row in read_metrics(workdir) if "loss" in row]
    first, last = rows[0], rows[-1]  # the first interval holds the compilation
    steps = last["step"] - first["step"]
    return {"step_s": (last["wall_s"] - first["wall_s"]) / steps,
            "data_s": float(np.mean([row["time/data"] for row in rows[1:]]))}


def main(argv=None) -> None:
    args = parse_args(argv)
    corpus, _, scored = demo.prepare(demo.parse_args(["--out", args.demo]))
    lines = ["| config | examples read per step | step from scored shards | step from memory | input wait per step "
             "(shards) | input wait per step (memory) | cost of reading |", "|---|---|---|---|---|---|---|"]
    for name in args.configs.split(","):
        config = dataclasses.replace(configs.get_config(name), total_steps=args.steps, log_every=args.log_every,
                                     eval_every=10**9, checkpoint_every=args.steps)
        workdir = tempfile.mkdtemp(prefix=f"bench-input-{name}-")
        try:
            data = TrainingData.open(config, corpus, scored)
            tokenizer = build_tokenizer(config, data.captions, workdir)
            live = data.batches(tokenizer, config, input_pipeline.DataPosition())
            in_memory = list(itertools.islice(data.batches(tokenizer, config, input_pipeline.DataPosition()),
                                              args.steps))
            shards = timed_run(config, corpus, scored, os.path.join(workdir, "shards"), live)
            memory = timed_run(config, corpus, scored, os.path.join(workdir, "memory"),
                               (dict(batch) for batch in in_memory))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        cost = shards["step_s"] / memory["step_s"] - 1
        lines.append(f"| {name} | {config.superbatch_size} | {shards['step_s'] * 1e3:.0f} ms | "
                     f"{memory['step_s'] * 1e3:.0f} ms | {shards['data_s'] * 1e3:.0f} ms | "
                     f"{memory['data_s'] * 1e3:.1f} ms | {cost:+.1%} |")
        print(lines[-1], flush=True)
    lines += ["", f"{args.steps} steps each (the first {args.log_every} left out). The input pipeline decodes on a "
              "thread pool and prefetches while the step runs; 'input wait' is the time the loop blocks on `next()`. "
              "On 2 CPU cores decoding competes with the step's own compute, so some of the cost shows in the step "
              "rather than in the wait."]
    results.publish("Input pipeline", lines, COMMAND, write=not args.no_write)


if __name__ == "__main__":
    main()
