"""Scoring-job throughput against the bare model: `python bench/score_throughput.py`.

For each model size, one run measures
  pipeline   examples/s of `pipelines.score` end to end (read, decode, validate, preprocess, RunInference, score,
             write Parquet, dead letter, manifest) on the in-process runner, start-up included;
  forward    examples/s of the same model's jitted forward alone, on the same images already decoded and resized,
             in batches of the job's inference batch size;
and prints their ratio (goal ≥ 0.8). The weights are freshly initialized: throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from curation.corpus import CorpusRecord, iter_corpus  # noqa: E402
from curation.input_pipeline import split_shards  # noqa: E402
from curation.preprocess import ValidationOptions, decode_and_validate  # noqa: E402
from demo.make_corpus import write_corpus  # noqa: E402
from models import checkpoint  # noqa: E402
from models.tokenizer import ByteTokenizer  # noqa: E402
from models.two_towers import ModelConfig, init_params  # noqa: E402
from pipelines import score  # noqa: E402
from pipelines.jax_inference import LoadedModel  # noqa: E402

import results  # noqa: E402  (bench/results.py, beside this script)

COMMAND = ".venv/bin/python bench/score_throughput.py"
NOTE = ("pipeline: `python -m pipelines.score` end to end on the in-process runner (read, decode, validate, "
        "preprocess, RunInference, score, write Parquet, dead letter, manifest), start-up included, images not "
        "stored. bare forward: the same jitted model on the same images already decoded and resized, in batches of "
        "the job's inference batch size. Goal: ratio >= 0.8.")
MODELS = {
    # name: (image/text variant, image size, patch size, embed dim, text length)
    "demo-xs": ("xs", 32, 4, 128, 16),
    "ti-64px": ("ti", 64, 8, 192, 32),
}


def bare_forward_rate(checkpoint_dir: str, corpus_shards: list[str], format: str, batch_size: int,
                      limit: int) -> tuple[float, int]:
    """Examples/s of the jitted forward alone over the valid examples of the shards (decoded beforehand)."""
    model = LoadedModel(checkpoint_dir, batch_size)
    restored = checkpoint.restore(checkpoint_dir)
    size, length = restored.config.image_size, restored.config.text_length
    pixels, tokens = [], []
    for item in iter_corpus(corpus_shards, format):
        if not isinstance(item, CorpusRecord):
            continue
        valid = decode_and_validate(item, ValidationOptions())
        if hasattr(valid, "pixels"):
            pixels.append(restored.config.preprocessing().resize_pixels(valid.pixels))
            tokens.append(restored.tokenizer.encode(valid.caption, length))
        if len(pixels) == limit:
            break
    pixels, tokens = np.stack(pixels), np.stack(tokens)
    model.embed(pixels[:batch_size], tokens[:batch_size])  # compile
    start = time.perf_counter()
    model.embed(pixels, tokens)
    return len(pixels) / (time.perf_counter() - start), len(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="runs/bench/corpus", help="demo corpus (made here when missing)")
    parser.add_argument("--size", type=int, default=4000, help="web examples to make when the corpus is missing")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--shards", type=int, default=0, help="score only the first N web shards (0: all)")
    parser.add_argument("--no_write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()

    if not os.path.exists(os.path.join(args.corpus, "_SPLITS.json")):
        write_corpus(args.corpus, size=args.size, shard_size=1000, progress=True)
    shards, format = split_shards(args.corpus, "web")
    shards = shards[: args.shards] if args.shards else shards

    rows = []
    for name in args.models.split(","):
        variant, image_size, patch_size, embed_dim, text_length = MODELS[name]
        config = ModelConfig(image_variant=variant, text_variant=variant, image_size=image_size,
                             patch_size=patch_size, embed_dim=embed_dim, text_length=text_length,
                             vocab_size=ByteTokenizer().vocab_size)
        with tempfile.TemporaryDirectory() as work:
            checkpoint_dir = os.path.join(work, "model")
            checkpoint.save(checkpoint_dir, init_params(config, jax.random.key(0)), config, ByteTokenizer())
            summary = score.run([*[f"--input={shard}" for shard in shards], f"--input_format={format}",
                                 f"--output={work}/scored", f"--reference_checkpoint={checkpoint_dir}",
                                 f"--inference_batch_size={args.batch_size}", "--store_image=none"])
            pipeline_rate = summary["read"] / summary["seconds"]
            forward_rate, n = bare_forward_rate(checkpoint_dir, shards, format, args.batch_size, summary["scored"])
        rows.append((name, summary["read"], summary["seconds"], pipeline_rate, forward_rate))
        print(f"{name}: pipeline {summary['read']} examples in {summary['seconds']:.1f} s = {pipeline_rate:.0f}/s; "
              f"bare forward {forward_rate:.0f}/s over {n}; ratio {pipeline_rate / forward_rate:.2f}", flush=True)

    table = ["| model | examples read | pipeline s (start-up included) | pipeline ex/s | bare forward ex/s | ratio |",
             "|---|---|---|---|---|---|"]
    for name, read, seconds, pipeline_rate, forward_rate in rows:
        table.append(f"| {name} | {read} | {seconds:.1f} | {pipeline_rate:.0f} | {forward_rate:.0f} | "
                     f"{pipeline_rate / forward_rate:.2f} |")
    print("\n".join(table))
    if not args.no_write:
        results.write_section("Scoring throughput", "\n".join(table) + "\n\n" + NOTE, COMMAND)


if __name__ == "__main__":
    main()
