"""Bench: what decoding costs per example, and trainer step time reading the scored shards vs from memory.

    .venv/bin/python bench/input_pipeline.py     # about 30 min on 2 CPU cores (plus the demo's preparation)

1. Decoding: CPU milliseconds (all processes of the machine, from /proc/stat) and wall milliseconds per decoded
   example, for the demo's 64 px JPEGs (to the learner's 32 px) and for 512 × 384 web-sized JPEGs (to 224 px): the
   old pipeline (`prepare_image` per image on 1 or 2 threads, float32 per image) against the new one
   (`decode_pool.DecodePool`: 1 or 2 worker processes, uint8 back, a batch normalized at once). Worker start-up is
   left out (a pool is started, then timed).
2. Steps (`--rounds` interleaved rounds, each round's ratio to its own memory run): for each config (uniform:
   B = b = 128; jest: B = 640 → b = 128) the trainer runs `--steps` steps through
   the same train loop with its input read from the demo's copied-layout scored Parquet shards (decode, resize,
   tokenize, stored reference embeddings) on 2 threads and on `--input_processes` worker processes, and once
   replaying those very batches from a list in memory. Step times leave out the first logging interval
   (compilation).

Writes the "Input pipeline" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import io
import itertools
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import results  # bench/results.py, beside this script
from PIL import Image

from curation.shared.corpus import CorpusRecord
from curation.shared.corpus_readers import iter_corpus
from curation.shared.validation import ValidationOptions, prepare_image
from curation.trainer import configs, input_pipeline
from curation.trainer.decode_pool import DecodePool
from curation.trainer.loop import train
from curation.trainer.metrics import read_metrics
from curation.trainer.training_data import TrainingData, build_tokenizer
from demo import run as demo
from models.preprocessing import ImagePreprocessing

COMMAND = ".venv/bin/python bench/input_pipeline.py"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo", help="the demo's output: corpus and scored shards")
    parser.add_argument("--configs", default="uniform,jest")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--input_processes", type=int, default=2)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of (memory, threads, processes) runs per config, interleaved: the machine's "
        "speed drifts between runs, so each round's ratio is taken against its own memory run",
    )
    parser.add_argument("--decode_examples", type=int, default=4000, help="demo images decoded per measurement")
    parser.add_argument("--web_examples", type=int, default=400, help="512 px images decoded per measurement")
    parser.add_argument("--no_write", action="store_true")
    return parser.parse_args(argv)


def timed_run(config: configs.TrainConfig, corpus: str, scored: str, workdir: str, batches) -> dict:
    train(config, corpus, workdir, scored_dir=scored, batches=batches)
    rows = [row for row in read_metrics(workdir) if "loss" in row]
    first, last = rows[0], rows[-1]  # the first interval holds the compilation
    steps = last["step"] - first["step"]
    return {
        "step_s": (last["wall_s"] - first["wall_s"]) / steps,
        "data_s": float(np.mean([row["time/data"] for row in rows[1:]])),
    }


def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy (user, nice, system, irq, softirq), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(value) for value in f.readline().split()[1:8]]
    user, nice, system, _, _, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def web_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """512 × 384 JPEGs (quality 90) with smooth colour fields, shapes and sensor-like noise: about the bytes and
    decode work of a web photo of that size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:384, 0:512].astype(np.float32)
    images = []
    for _ in range(count):
        a, b, c = rng.uniform(0, 1, 3)
        field = np.stack(
            [
                128 + 100 * np.sin(x / (40 + 60 * a) + c),
                128 + 100 * np.cos(y / (30 + 50 * b)),
                128 + 80 * np.sin((x + y) / (50 + 40 * c)),
            ],
            axis=-1,
        )
        cy, cx, r = rng.uniform(80, 300), rng.uniform(80, 430), rng.uniform(30, 90)
        field[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=90)
        images.append(out.getvalue())
    return images


def demo_jpegs(corpus: str, count: int) -> list[bytes]:
    shards, format = input_pipeline.split_shards(corpus, "web")
    images = []
    for item in iter_corpus(shards, format):
        # images the decode rules accept (the corpus's broken ones are skipped by both pipelines alike)
        if isinstance(item, CorpusRecord) and prepare_image(item.image, ImagePreprocessing(32)) is not None:
            images.append(item.image)
            if len(images) == count:
                break
    return images


def time_decoding(
    images: list[bytes], preprocessing: ImagePreprocessing, mode: str, workers: int, batch: int = 256, repeats: int = 2
) -> tuple[float, float]:
    """(CPU ms, wall ms) per example decoding `images` `repeats` times, a batch of `batch` at a time. `mode` old:
    prepare_image per image on `workers` threads; new: DecodePool with `workers` processes."""
    validation = ValidationOptions()
    if mode == "old":
        pool = concurrent.futures.ThreadPoolExecutor(workers)

        def decode(group):
            return np.stack(list(pool.map(lambda data: prepare_image(data, preprocessing, validation), group)))
    else:
        pool = DecodePool(preprocessing, validation, processes=workers, cache_bytes=0)  # decoding, not its cache
        pool.map(images[:batch])  # the workers started and warm

        def decode(group):
            return preprocessing.normalize(np.stack(pool.map(group)))

    try:
        cpu, wall = busy_cpu_seconds(), time.perf_counter()
        for _ in range(repeats):
            for start in range(0, len(images), batch):
                decode(images[start : start + batch])
        count = repeats * len(images)
        return (busy_cpu_seconds() - cpu) * 1e3 / count, (time.perf_counter() - wall) * 1e3 / count
    finally:
        pool.shutdown() if mode == "old" else pool.close()


def decoding_table(corpus: str, args: argparse.Namespace) -> list[str]:
    sets = [
        ("demo 64 px JPEG → 32 px", demo_jpegs(corpus, args.decode_examples), ImagePreprocessing(32)),
        ("web 512 × 384 JPEG → 224 px", web_jpegs(args.web_examples), ImagePreprocessing(224)),
    ]
    lines = [
        "| images | mean bytes | pipeline | workers | CPU ms / example | wall ms / example |",
        "|---|---|---|---|---|---|",
    ]
    for label, images, preprocessing in sets:
        size = int(np.mean([len(image) for image in images]))
        for mode, kind in (("old", "threads"), ("new", "processes")):
            for workers in (1, 2):
                cpu, wall = time_decoding(images, preprocessing, mode, workers)
                lines.append(f"| {label} | {size:,} | {mode} ({kind}) | {workers} | {cpu:.3f} | {wall:.3f} |")
                print(lines[-1], flush=True)
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    corpus, _, scored = demo.prepare(demo.parse_args(["--out", args.demo]))
    decode_lines = decoding_table(corpus, args)
    lines = [
        "| config | examples read per step | input | step from scored shards | step from memory | input wait "
        "per step (shards) | input wait per step (memory) | cost of reading (median of rounds, range) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in args.configs.split(","):
        config = dataclasses.replace(
            configs.get_config(name),
            total_steps=args.steps,
            log_every=args.log_every,
            eval_every=10**9,
            checkpoint_every=args.steps,
        )
        workdir = tempfile.mkdtemp(prefix=f"bench-input-{name}-")
        try:
            data = TrainingData.open(config, corpus, scored)
            tokenizer = build_tokenizer(config, data.captions, workdir)
            in_memory = list(
                itertools.islice(data.batches(tokenizer, config, input_pipeline.DataPosition()), args.steps)
            )
            kinds = {0: "2 threads", args.input_processes: f"{args.input_processes} worker processes"}
            runs = {"memory": [], **{processes: [] for processes in kinds}}
            for round in range(args.rounds):
                runs["memory"].append(
                    timed_run(
                        config,
                        corpus,
                        scored,
                        os.path.join(workdir, f"memory-{round}"),
                        (dict(batch) for batch in in_memory),
                    )
                )
                for processes in kinds:
                    reading = dataclasses.replace(config, input_processes=processes)
                    live = data.batches(tokenizer, reading, input_pipeline.DataPosition())
                    runs[processes].append(
                        timed_run(reading, corpus, scored, os.path.join(workdir, f"shards-{processes}-{round}"), live)
                    )
            memory_step = statistics.median(run["step_s"] for run in runs["memory"])
            memory_wait = statistics.median(run["data_s"] for run in runs["memory"])
            for processes, kind in kinds.items():
                ratios = [run["step_s"] / base["step_s"] for run, base in zip(runs[processes], runs["memory"])]
                step = statistics.median(run["step_s"] for run in runs[processes])
                wait = statistics.median(run["data_s"] for run in runs[processes])
                lines.append(
                    f"| {name} | {config.superbatch_size} | {kind} | {step * 1e3:.0f} ms | "
                    f"{memory_step * 1e3:.0f} ms | {wait * 1e3:.0f} ms | {memory_wait * 1e3:.1f} ms | "
                    f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f}) |"
                )
                print(lines[-1], flush=True)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    lines = [
        "### Decoding",
        "",
        *decode_lines,
        "",
        "CPU ms counts every process of the machine (/proc/stat), so worker processes' time and the pickling "
        "of bytes and pixels between them are in it.",
        "",
        "### Steps",
        "",
        *lines,
        "",
        f"{args.steps} steps a run (the first {args.log_every} left out), {args.rounds} rounds of (memory, "
        "threads, processes) runs one after another; times are medians over rounds, and the cost of reading is "
        "the median of each round's ratio to its own memory run (the machine's speed drifts between runs by "
        "more than the effect measured: one memory run took 396 ms a step and another, minutes later, 441 ms). "
        "The same scored shards (copied layout, 64 px JPEGs). 'input wait' is the time the loop blocks on "
        "`next()`; tf.data prefetches 2 batches "
        "while the step runs. On 2 CPU cores decoding competes with the step's own compute, so some of its "
        "cost shows in the step rather than in the wait.",
    ]
    results.publish("Input pipeline", lines, COMMAND, write=not args.no_write)


if __name__ == "__main__":
    main()
