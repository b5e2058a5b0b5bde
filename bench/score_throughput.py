"""Scoring-job throughput against the bare model: `python bench/score_throughput.py`.

For each reference, two runs of `pipelines.score` end to end (read, decode, validate, preprocess, RunInference,
score, write Parquet, dead letter, manifest) on the in-process runner, a small one and the full one, give
  start-up   seconds before the first example (launch, load, compile): the small run's time less its examples at
             the steady rate;
  steady     examples/s once running: (examples of the full run − of the small one) / (difference of their times);
  forward    examples/s of the same model's jitted forward alone, on the same images already decoded and resized,
             in batches of the job's inference batch size;
and the ratio steady / forward (goal ≥ 0.8). Weights are random: throughput does not depend on them. Besides our
own model sizes, `siglip-b16-224` is a keras-hub SigLIPBackbone at SigLIP B/16's real width and depth (768 wide,
12 + 12 layers, 224 px, 64 tokens), saved as a local preset and scored through `--reference PRESET_DIR`.
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
from pipelines import references, score  # noqa: E402

import results  # noqa: E402  (bench/results.py, beside this script)

COMMAND = ".venv/bin/python bench/score_throughput.py"
NOTE = ("Two runs of `python -m pipelines.score` per reference on the in-process runner (read, decode, validate, "
        "preprocess, RunInference, score, write Parquet, dead letter, manifest; images not stored): a small one "
        "and the full one. steady = (difference of their examples) / (difference of their times); start-up = the "
        "small run's time less its examples at the steady rate (launch, weights, compile). bare forward: the same "
        "jitted model on the same images already decoded and resized, in batches of the job's inference batch size. "
        "Goal: steady / bare forward >= 0.8.")
# name: (kind, examples in the full run, inference batch size, model settings)
MODELS = {
    "demo-xs": ("project", 10000, 256, dict(variant="xs", image_size=32, patch_size=4, embed_dim=128, text_length=16)),
    "ti-64px": ("project", 10000, 256, dict(variant="ti", image_size=64, patch_size=8, embed_dim=192, text_length=32)),
    "siglip-b16-224": ("keras_hub", 256, 32, dict(image_size=224, patch_size=16, width=768, depth=12, mlp=3072,
                                                  heads=12, text_length=64)),
}
SMALL_RUN = {"project": 1000, "keras_hub": 64}  # examples of the small run


def make_reference(kind: str, settings: dict, directory: str) -> str:
    """A random-weight reference of `settings` saved under `directory`; returns what --reference takes."""
    if kind == "project":
        config = ModelConfig(image_variant=settings["variant"], text_variant=settings["variant"],
                             image_size=settings["image_size"], patch_size=settings["patch_size"],
                             embed_dim=settings["embed_dim"], text_length=settings["text_length"],
                             vocab_size=ByteTokenizer().vocab_size)
        path = os.path.join(directory, "model")
        checkpoint.save(path, init_params(config, jax.random.key(0)), config, ByteTokenizer())
        return path
    return make_siglip_preset(os.path.join(directory, "preset"), **settings)


def make_siglip_preset(directory: str, image_size: int, patch_size: int, width: int, depth: int, mlp: int,
                       heads: int, text_length: int) -> str:
    """A keras-hub SigLIP preset with random weights and a SentencePiece tokenizer of the demo's words."""
    import io

    import keras_hub
    import sentencepiece

    from demo.scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES

    sentences = [f"a {size} {colour} {shape} on a {background} background" for shape in SHAPES for colour in COLOURS
                 for size in SIZES for background in BACKGROUNDS]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=proto, vocab_size=64,
                                             hard_vocab_limit=False, minloglevel=2, pad_id=-1, bos_id=-1, eos_id=1,
                                             unk_id=0, unk_piece="<unk>", eos_piece="</s>")
    tokenizer = keras_hub.tokenizers.SigLIPTokenizer(proto=proto.getvalue())
    converter = keras_hub.layers.SigLIPImageConverter(image_size=(image_size, image_size), scale=1 / 127.5,
                                                      offset=-1.0, crop_to_aspect_ratio=False)
    preprocessor = keras_hub.models.SigLIPPreprocessor(tokenizer=tokenizer, image_converter=converter,
                                                       sequence_length=text_length)
    vision = keras_hub.models.SigLIPVisionEncoder(patch_size=patch_size, hidden_dim=width, num_layers=depth,
                                                  num_heads=heads, intermediate_dim=mlp,
                                                  image_shape=(image_size, image_size, 3))
    text = keras_hub.models.SigLIPTextEncoder(vocabulary_size=tokenizer.vocabulary_size(), embedding_dim=width,
                                              hidden_dim=width, num_layers=depth, num_heads=heads,
                                              intermediate_dim=mlp, projection_dim=width,
                                              max_sequence_length=text_length)
    keras_hub.models.SigLIPBackbone(vision, text).save_to_preset(directory)
    preprocessor.save_to_preset(directory)
    return directory


def bare_forward_rate(spec: str, corpus_shards: list[str], format: str, batch_size: int,
                      limit: int) -> tuple[float, int]:
    """Examples/s of the jitted forward alone over the valid examples of the shards (decoded beforehand)."""
    reference = references.resolve(spec)
    model = reference.load(batch_size)
    preprocessing, text = reference.info.preprocessing, reference.text_encoder()
    pixels, tokens = [], []
    for item in iter_corpus(corpus_shards, format):
        if not isinstance(item, CorpusRecord):
            continue
        valid = decode_and_validate(item, ValidationOptions())
        if hasattr(valid, "pixels"):
            pixels.append(preprocessing.resize_pixels(valid.pixels))
            tokens.append(text.encode(valid.caption))
        if len(pixels) == limit:
            break
    pixels, tokens = np.stack(pixels), np.stack(tokens)
    model.embed(pixels[:batch_size], tokens[:batch_size])  # compile
    start = time.perf_counter()
    model.embed(pixels, tokens)
    return len(pixels) / (time.perf_counter() - start), len(pixels)


def run_job(shards: list[str], format: str, spec: str, output: str, batch_size: int) -> dict:
    return score.run([*[f"--input={shard}" for shard in shards], f"--input_format={format}", f"--output={output}",
                      f"--reference={spec}", f"--inference_batch_size={batch_size}", "--store_image=none"])


def corpus_of(root: str, size: int, shard_size: int) -> tuple[list[str], str]:
    """The web shards of a demo corpus of `size` examples under `root` (made when missing)."""
    if not os.path.exists(os.path.join(root, "_SPLITS.json")):
        write_corpus(root, size=size, shard_size=shard_size, progress=True)
    return split_shards(root, "web")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="runs/bench/throughput",
                        help="folder of the demo corpora scored (made there when missing, one per size)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--examples", type=int, default=0, help="examples of the full run (0: each model's own)")
    parser.add_argument("--no_write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()

    rows = []
    for name in args.models.split(","):
        kind, examples, batch_size, settings = MODELS[name]
        examples = args.examples or examples
        small = min(SMALL_RUN[kind], examples // 4)
        shards, format = corpus_of(os.path.join(args.corpus, f"{examples}"), examples, max(examples // 10, 16))
        small_shards, _ = corpus_of(os.path.join(args.corpus, f"{small}"), small, max(small // 4, 8))
        with tempfile.TemporaryDirectory() as work:
            spec = make_reference(kind, settings, work)
            first = run_job(small_shards, format, spec, f"{work}/scored_small", batch_size)
            full = run_job(shards, format, spec, f"{work}/scored", batch_size)
            steady = (full["read"] - first["read"]) / max(full["seconds"] - first["seconds"], 1e-9)
            startup = max(first["seconds"] - first["read"] / steady, 0.0)
            forward_rate, n = bare_forward_rate(spec, shards, format, batch_size, min(full["scored"], 2048))
        rows.append((name, full["read"], batch_size, full["seconds"], startup, steady, forward_rate))
        print(f"{name}: {full['read']} examples in {full['seconds']:.1f} s; start-up {startup:.1f} s, steady "
              f"{steady:.1f}/s; bare forward {forward_rate:.1f}/s over {n}; ratio {steady / forward_rate:.2f}",
              flush=True)

    table = ["| reference | examples read | batch | pipeline s (all) | start-up s | steady ex/s | bare forward ex/s | "
             "ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, read, batch_size, seconds, startup, steady, forward_rate in rows:
        table.append(f"| {name} | {read} | {batch_size} | {seconds:.1f} | {startup:.1f} | {steady:.1f} | "
                     f"{forward_rate:.1f} | {steady / forward_rate:.2f} |")
    print("\n".join(table))
    if not args.no_write:
        results.write_section("Scoring throughput", "\n".join(table) + "\n\n" + NOTE, COMMAND)


if __name__ == "__main__":
    main()
