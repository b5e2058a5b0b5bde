"""Scoring-job throughput against its bound: `python bench/score_throughput.py`.

For each reference, two runs of `pipelines.score` end to end (read, decode, validate, preprocess, RunInference,
score, write, manifest) on the in-process runner, a small one and the full one, in each output layout, give
  start-up   seconds before the first example (launch, load, compile): the small run's time less its examples at
             the steady rate;
  steady     examples/s once running: (examples of the full run − of the small one) / (difference of their times);
and, measured apart on the same examples,
  forward    examples/s of the same model's jitted forward alone, on the images already decoded and resized, in
             batches of the job's inference batch size;
  decode     examples/s of decoding and resizing alone (no model), as the job does it, on one thread;
  bound      what the job could reach: on CPU, where decoding and the forward share the cores, 1 / (1/forward +
             1/decode); with an accelerator, the slower of the two;
the ratio steady / bound (goal ≥ 0.8), and the bytes each layout writes per example read. Weights are random:
throughput does not depend on them. Besides our own model sizes, `siglip-b16-224` is a keras-hub SigLIPBackbone at
SigLIP B/16's real width and depth (768 wide, 12 + 12 layers, 224 px, 64 tokens), saved as a local preset and scored
through `--reference PRESET_DIR`.
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
import results  # noqa: E402  (bench/results.py, beside this script)

from curation.shared.corpus import CorpusRecord
from curation.shared.corpus_readers import iter_corpus  # noqa: E402
from curation.shared.validation import ValidationOptions, decode_and_validate  # noqa: E402
from curation.trainer.input_pipeline import split_shards  # noqa: E402
from demo.make_corpus import write_corpus  # noqa: E402
from models import checkpoint  # noqa: E402
from models.tokenizer import ByteTokenizer  # noqa: E402
from models.two_towers import ModelConfig, init_params  # noqa: E402
from pipelines import references, score  # noqa: E402

COMMAND = ".venv/bin/python bench/score_throughput.py"
NOTE = (
    "Two runs of `python -m pipelines.score` per reference and output layout on the in-process runner (read, "
    "decode, validate, preprocess, RunInference, score, write, manifest; the copied layout stores the images as "
    "they are), a small one and the full one. steady = (difference of their examples) / (difference of their "
    "times), with the quicker of two full runs; "
    "start-up = the small run's time less its examples at the steady rate (launch, weights, compile). "
    "forward: the same jitted model on the same images already decoded and resized, in batches of the job's "
    "inference batch size (median of 3). decode: decoding and resizing alone as the job does them, one thread "
    "(median of 3). bound: on CPU "
    "1 / (1/forward + 1/decode) (they share the cores), on an accelerator min(forward, decode). Goal: steady / "
    "bound >= 0.8. bytes/example: all the files a layout writes (scored shards, dead letter, sidecars, "
    "manifest) over the examples read; the corpus itself is not counted."
)
# name: (kind, examples in the full run, inference batch size, model settings)
MODELS = {
    "demo-xs": ("project", 10000, 256, dict(variant="xs", image_size=32, patch_size=4, embed_dim=128, text_length=16)),
    "ti-64px": ("project", 10000, 256, dict(variant="ti", image_size=64, patch_size=8, embed_dim=192, text_length=32)),
    "siglip-b16-224": (
        "keras_hub",
        256,
        32,
        dict(image_size=224, patch_size=16, width=768, depth=12, mlp=3072, heads=12, text_length=64),
    ),
}
SMALL_RUN = {"project": 1000, "keras_hub": 64}  # examples of the small run


def make_reference(kind: str, settings: dict, directory: str) -> str:
    """A random-weight reference of `settings` saved under `directory`; returns what --reference takes."""
    if kind == "project":
        config = ModelConfig(
            image_variant=settings["variant"],
            text_variant=settings["variant"],
            image_size=settings["image_size"],
            patch_size=settings["patch_size"],
            embed_dim=settings["embed_dim"],
            text_length=settings["text_length"],
            vocab_size=ByteTokenizer().vocab_size,
        )
        path = os.path.join(directory, "model")
        checkpoint.save(path, init_params(config, jax.random.key(0)), config, ByteTokenizer())
        return path
    return make_siglip_preset(os.path.join(directory, "preset"), **settings)


def make_siglip_preset(
    directory: str, image_size: int, patch_size: int, width: int, depth: int, mlp: int, heads: int, text_length: int
) -> str:
    """A keras-hub SigLIP preset with random weights and a SentencePiece tokenizer of the demo's words."""
    import io

    import keras_hub
    import sentencepiece

    from demo.scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES

    sentences = [
        f"a {size} {colour} {shape} on a {background} background"
        for shape in SHAPES
        for colour in COLOURS
        for size in SIZES
        for background in BACKGROUNDS
    ]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=proto,
        vocab_size=64,
        hard_vocab_limit=False,
        minloglevel=2,
        pad_id=-1,
        bos_id=-1,
        eos_id=1,
        unk_id=0,
        unk_piece="<unk>",
        eos_piece="</s>",
    )
    tokenizer = keras_hub.tokenizers.SigLIPTokenizer(proto=proto.getvalue())
    converter = keras_hub.layers.SigLIPImageConverter(
        image_size=(image_size, image_size), scale=1 / 127.5, offset=-1.0, crop_to_aspect_ratio=False
    )
    preprocessor = keras_hub.models.SigLIPPreprocessor(
        tokenizer=tokenizer, image_converter=converter, sequence_length=text_length
    )
    vision = keras_hub.models.SigLIPVisionEncoder(
        patch_size=patch_size,
        hidden_dim=width,
        num_layers=depth,
        num_heads=heads,
        intermediate_dim=mlp,
        image_shape=(image_size, image_size, 3),
    )
    text = keras_hub.models.SigLIPTextEncoder(
        vocabulary_size=tokenizer.vocabulary_size(),
        embedding_dim=width,
        hidden_dim=width,
        num_layers=depth,
        num_heads=heads,
        intermediate_dim=mlp,
        projection_dim=width,
        max_sequence_length=text_length,
    )
    keras_hub.models.SigLIPBackbone(vision, text).save_to_preset(directory)
    preprocessor.save_to_preset(directory)
    return directory


def valid_examples(corpus_shards: list[str], format: str, limit: int) -> list:
    """Up to `limit` records of the shards that pass the job's rules (read into memory)."""
    records = []
    for item in iter_corpus(corpus_shards, format):
        if isinstance(item, CorpusRecord) and hasattr(decode_and_validate(item, ValidationOptions()), "pixels"):
            records.append(item)
            if len(records) == limit:
                break
    return records


def decode_rate(reference: references.Reference, records: list) -> float:
    """Examples/s of decoding and resizing alone, as the job does them (one thread)."""
    preprocessing = reference.info.preprocessing

    def decode_all():
        for record in records:
            preprocessing.resize_pixels(decode_and_validate(record, ValidationOptions(), preprocessing.size).pixels)

    return float(np.median([len(records) / _seconds(decode_all) for _ in range(3)]))


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bare_forward_rate(reference: references.Reference, records: list, batch_size: int) -> float:
    """Examples/s of the jitted forward alone over the records (decoded and resized beforehand)."""
    model = reference.load(batch_size)
    preprocessing, text = reference.info.preprocessing, reference.text_encoder()
    valid = [decode_and_validate(record, ValidationOptions(), preprocessing.size) for record in records]
    pixels = np.stack([preprocessing.resize_pixels(example.pixels) for example in valid])
    tokens = np.stack([text.encode(example.caption) for example in valid])
    model.embed(pixels[:batch_size], tokens[:batch_size])  # compile
    rates = [len(pixels) / _seconds(model.embed, pixels, tokens)]
    while len(rates) < 3 and len(pixels) / rates[0] < 20:  # the median of 3 where a run is short
        rates.append(len(pixels) / _seconds(model.embed, pixels, tokens))
    return float(np.median(rates))


# Where the job's own thread spends a full run (cProfile sees that thread only; the decoding and reading threads work
# beside it): category -> (file, function) pairs whose cumulative time it is.
PROFILE_PARTS = {
    "model forward (RunInference)": [("pipelines/jax_inference.py", "run_inference")],
    "waiting for decoded images": [("pipelines/stages.py", "process"), ("pipelines/stages.py", "finish_bundle")],
    "waiting for the next shard read": [("pipelines/corpus_io.py", "_emit")],
    "tokenize, score, rows": [
        ("pipelines/stages.py", "score_or_dead_letter"),
        ("pipelines/stages.py", "score_in_place"),
        ("models/tokenizer.py", "encode"),
    ],
    "writing (Arrow, Parquet, sidecars)": [
        ("curation/shared/schema.py", "rows_to_table"),
        ("pyarrow/parquet/core.py", "write_table"),
        ("pipelines/scored_sinks.py", "_write"),
    ],
}


def profile_breakdown(stats, total: float) -> list[tuple[str, float]]:
    """Seconds of the job's thread per PROFILE_PARTS category (a Future.result wait under the named caller), the
    rest as Beam's per-element work and start-up."""
    waits: dict[tuple[str, str], float] = {}
    for (filename, _, name), (_, _, _, _, callers) in stats.stats.items():
        if name == "result" and filename.endswith("concurrent/futures/_base.py"):
            for (caller_file, _, caller), (_, _, _, cumulative) in callers.items():
                waits[(caller_file, caller)] = waits.get((caller_file, caller), 0.0) + cumulative
    parts = []
    for label, functions in PROFILE_PARTS.items():
        seconds = 0.0
        for suffix, function in functions:
            if label.startswith("waiting"):
                seconds += sum(t for (f, n), t in waits.items() if f.endswith(suffix) and n == function)
                continue
            seconds += sum(row[3] for (f, _, n), row in stats.stats.items() if f.endswith(suffix) and n == function)
        parts.append((label, seconds))
    parts.append(("Beam's per-element work, start-up, the rest", max(total - sum(t for _, t in parts), 0.0)))
    return parts


def profiled_run(shards: list[str], format: str, spec: str, output: str, batch_size: int, layout: str):
    import cProfile
    import pstats

    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.runcall(run_job, shards, format, spec, output, batch_size, layout)
    total = time.perf_counter() - start
    return total, profile_breakdown(pstats.Stats(profile), total)


def written_bytes(summary: dict) -> int:
    """Bytes of every file under the run's output folder (one run each)."""
    output = os.path.dirname(summary["batch_dir"])
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(output) for name in names)


def run_job(shards: list[str], format: str, spec: str, output: str, batch_size: int, layout: str) -> dict:
    return score.run(
        [
            *[f"--input={shard}" for shard in shards],
            f"--input_format={format}",
            f"--output={output}",
            f"--reference={spec}",
            f"--inference_batch_size={batch_size}",
            f"--output_layout={layout}",
        ]
    )


def corpus_of(root: str, size: int, shard_size: int) -> tuple[list[str], str]:
    """The web shards of a demo corpus of `size` examples under `root` (made when missing)."""
    if not os.path.exists(os.path.join(root, "_SPLITS.json")):
        write_corpus(root, size=size, shard_size=shard_size, progress=True)
    return split_shards(root, "web")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--corpus",
        default="runs/bench/throughput",
        help="folder of the demo corpora scored (made there when missing, one per size)",
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--examples", type=int, default=0, help="examples of the full run (0: each model's own)")
    parser.add_argument("--layouts", default="copied,sidecar", help="comma-separated output layouts to run")
    parser.add_argument("--repeats", type=int, default=2, help="full runs per layout (the quickest counts)")
    parser.add_argument(
        "--profile",
        default="",
        help="comma-separated models to profile one more full run of per layout, reporting where "
        "its time goes (e.g. demo-xs,ti-64px)",
    )
    parser.add_argument("--no_write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()

    rows, profiles = [], []
    for name in args.models.split(","):
        kind, examples, batch_size, settings = MODELS[name]
        examples = args.examples or examples
        small = min(SMALL_RUN[kind], examples // 4)
        shards, format = corpus_of(os.path.join(args.corpus, f"{examples}"), examples, max(examples // 10, 16))
        small_shards, _ = corpus_of(os.path.join(args.corpus, f"{small}"), small, max(small // 4, 8))
        with tempfile.TemporaryDirectory() as work:
            spec = make_reference(kind, settings, work)
            reference = references.resolve(spec)
            records = valid_examples(shards, format, min(examples, 2048))
            forward, decode = bare_forward_rate(reference, records, batch_size), decode_rate(reference, records)
            on_cpu = jax.default_backend() == "cpu"
            bound = 1 / (1 / forward + 1 / decode) if on_cpu else min(forward, decode)
            for layout in args.layouts.split(","):
                first = run_job(small_shards, format, spec, f"{work}/{layout}_small", batch_size, layout)
                # The quicker of two full runs: this machine's speed wanders by ±10% between runs.
                full = min(
                    (
                        run_job(shards, format, spec, f"{work}/{layout}_{repeat}", batch_size, layout)
                        for repeat in range(args.repeats)
                    ),
                    key=lambda summary: summary["seconds"],
                )
                steady = (full["read"] - first["read"]) / max(full["seconds"] - first["seconds"], 1e-9)
                startup = max(first["seconds"] - first["read"] / steady, 0.0)
                per_example = written_bytes(full) / full["read"]
                rows.append(
                    (
                        name,
                        layout,
                        full["read"],
                        batch_size,
                        full["seconds"],
                        startup,
                        steady,
                        forward,
                        decode,
                        bound,
                        per_example,
                    )
                )
                print(
                    f"{name} {layout}: {full['read']} examples in {full['seconds']:.1f} s; start-up {startup:.1f} s, "
                    f"steady {steady:.1f}/s; forward {forward:.1f}/s, decode {decode:.1f}/s, bound {bound:.1f}/s; "
                    f"ratio {steady / bound:.2f}; {per_example:.0f} bytes/example",
                    flush=True,
                )
                if name in args.profile.split(","):
                    total, parts = profiled_run(shards, format, spec, f"{work}/{layout}_profiled", batch_size, layout)
                    profiles.append((name, layout, total, parts))

    table = [
        "| reference | layout | examples read | batch | pipeline s (all) | start-up s | steady ex/s | "
        "forward ex/s | decode ex/s | bound ex/s | steady / bound | bytes / example |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, layout, read, batch_size, seconds, startup, steady, forward, decode, bound, per_example in rows:
        table.append(
            f"| {name} | {layout} | {read} | {batch_size} | {seconds:.1f} | {startup:.1f} | {steady:.1f} | "
            f"{forward:.1f} | {decode:.0f} | {bound:.1f} | {steady / bound:.2f} | {per_example:,.0f} |"
        )
    device = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else f"CPU, {os.cpu_count()} cores"
    text = "\n".join(table) + f"\n\nDevice: {device}. " + NOTE
    if profiles:
        lines = [
            "",
            "",
            "Where the job's own thread spends a full run (cProfile, which slows Python code down; the "
            "decoding and reading threads work beside it, so a wait for them is time they did not hide):",
            "",
            "| reference | layout | profiled run s | " + " | ".join(label for label, _ in profiles[0][3]) + " |",
            "|---|---|---|" + "---|" * len(profiles[0][3]),
        ]
        for name, layout, total, parts in profiles:
            lines.append(
                f"| {name} | {layout} | {total:.1f} | "
                + " | ".join(f"{seconds:.1f} ({seconds / total:.0%})" for _, seconds in parts)
                + " |"
            )
        text += "\n".join(lines)
    print(text)
    if not args.no_write:
        results.write_section("Scoring throughput", text, COMMAND)


if __name__ == "__main__":
    main()
