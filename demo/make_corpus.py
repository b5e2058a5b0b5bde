"""Make the demo corpus: a web-like image-text corpus rendered on the spot, with hidden ground truth.

    python -m demo.make_corpus --out /tmp/demo_corpus --size 10000 --format wds --seed 0

Writes, under --out (a local directory or gs:// prefix):

    web/             --size examples, mostly noisy (see NoiseRates), the corpus to curate
    curated/         ~10% of --size clean examples, disjoint from web: the reference model's training data
    eval/zeroshot/   clean examples balanced over shape x colour, for zero-shot classification
    eval/retrieval/  clean examples with detailed captions, for image<->text retrieval
    eval/classes.json  class names and prompt templates of the two zero-shot tasks (shape, colour)
    _SPLITS.json     what was made: settings, concepts by frequency, splits with their shards and counts per
                     ground-truth kind

The web split is built the way web data is: its concepts (shape x colour) are long-tailed (Zipf: a few head
concepts, which become redundant once learnt, and many rare ones); its clean examples are easy, medium or hard
(`scenes.DIFFICULTIES`: hard ones are tiny, tilted, cluttered and mildly degraded, but learnable); concepts that
look alike (square and diamond, star and cross, red, orange and pink, cyan and blue) give hard negatives; a
near-duplicate is a correctly captioned copy of a clean image, counted clean (redundant, not noisy); the noise kinds
(NoiseRates) come at fixed shares. No evaluation scene is a near copy of a web or curated one (`eval_attempts`).

Every example's metadata holds its ground truth: `truth` ("clean" or the noise kind), the image's `shape`,
`colour`, `size`, `background` and `position`, its `difficulty` ("easy", "medium", "hard") and its concept's
`frequency` bucket ("head", "torso", "tail"), `related_key` (whose caption a misaligned example carries, or whose
image a near copy copies) and `detail` (which degradation or kind of non-image bytes; "near_copy"). It is for
analysis only; curation must never read it. Output is a pure function of the settings: the same seed gives the
same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import multiprocessing
import multiprocessing.pool
import posixpath
import time
from collections import Counter
from typing import Callable, Sequence

import numpy as np

from curation.shared import cli
from curation.shared.corpus import CorpusRecord
from demo import corpus_files, scenes
from demo.noise import NOISE_KINDS, NoiseRates, apply_noise

SCHEMA_VERSION = 1
# 2: long-tailed concepts, clean examples of graded difficulty, near copies counted clean, no evaluation scene a
# near copy of a training scene. 1 (before): uniform concepts, one difficulty, near copies counted as noise.
GENERATOR_VERSION = 2
SPLIT_IDS = {"web": 0, "curated": 1, "eval/zeroshot": 2, "eval/retrieval": 3}  # also the split's folder
SPLIT_DESCRIPTIONS = {
    "web": "the noisy corpus to curate; metadata.truth says which noise each example carries",
    "curated": "clean, disjoint from web: training data of the reference model",
    "eval/zeroshot": "clean, balanced over shape x colour; labels in metadata, classes in eval/classes.json",
    "eval/retrieval": "clean, one detailed caption per image, for image<->text retrieval",
}
KEY_PREFIXES = {"web": "web", "curated": "curated", "eval/zeroshot": "zeroshot", "eval/retrieval": "retrieval"}
# Independent random streams per example, so that e.g. a misaligned caption is exactly its source's caption.
SCENE, CAPTION, RENDER, NOISE, PLAN = range(5)
CONCEPT_PLAN = 5  # the stream that ranks the concepts (beside the per-example ones)
# A concept is a (shape, colour) pair. The web split draws them with Zipf frequencies (p ~ 1/rank, in a seeded
# order), so a few are everywhere and most are rare; a concept's bucket: head while the mass of the concepts
# ranked before it is below 0.5, torso below 0.8, tail after. The curated split draws them uniformly (a reference's
# curated data covers its concepts evenly), and so do the evaluation splits.
FREQUENCIES = {"head": 0.5, "torso": 0.8, "tail": 1.0}
EVAL_ATTEMPTS = 100  # draws an evaluation scene gets to be no near copy of a training scene
ZEROSHOT_TEMPLATES = {
    "shape": ("a {}", "a photo of a {}", "a picture showing a {}", "a {} on a background"),
    "colour": ("something {}", "a photo of something {}", "a shape coloured {}", "an object painted {}"),
}


@dataclasses.dataclass(frozen=True)
class CorpusSettings:
    """What the examples look like; everything an example's bytes depend on."""

    seed: int = 0
    image_size: int = 64
    image_format: str = "jpeg"  # or "png"


def _rng(settings: CorpusSettings, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([settings.seed, SPLIT_IDS[split], index, stream])


def example_key(split: str, index: int) -> str:
    return f"{KEY_PREFIXES[split]}-{index:08d}"


def zipf(count: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """([count] cumulative Zipf mass, p ~ 1/rank, up to and including each rank; each rank's FREQUENCIES bucket)."""
    mass = 1.0 / np.arange(1, count + 1)
    mass /= mass.sum()
    cumulative = np.cumsum(mass)
    buckets = tuple(
        next(name for name, bound in FREQUENCIES.items() if before < bound or name == "tail")
        for before in cumulative - mass
    )
    return cumulative, buckets


@functools.cache
def concept_plan(seed: int) -> tuple[tuple[tuple[str, str], ...], np.ndarray, dict[tuple[str, str], str]]:
    """(the concepts, most frequent first; their cumulative Zipf mass; each concept's frequency bucket)."""
    concepts = [(shape, colour) for shape in scenes.SHAPES for colour in scenes.COLOURS]
    order = np.random.default_rng([seed, CONCEPT_PLAN]).permutation(len(concepts))
    ranked = tuple(concepts[i] for i in order)
    cumulative, buckets = zipf(len(ranked))
    return ranked, cumulative, dict(zip(ranked, buckets))


def scene_of(settings: CorpusSettings, split: str, index: int, attempt: int = 0) -> scenes.Scene:
    """The scene of example `index` of `split` (its `attempt`-th draw: see `eval_attempts`). Zero-shot examples
    cycle through every shape x colour and retrieval ones draw any, both of medium difficulty; web examples draw
    their concept by its Zipf frequency, curated ones uniformly, both their difficulty by scenes.DIFFICULTIES."""
    rng = _rng(settings, split, index, SCENE)
    if attempt:
        rng = np.random.default_rng([settings.seed, SPLIT_IDS[split], index, SCENE, attempt])
    if split == "eval/zeroshot":
        colours = list(scenes.COLOURS)
        shape, colour = scenes.SHAPES[index % len(scenes.SHAPES)], colours[(index // len(scenes.SHAPES)) % len(colours)]
        return scenes.sample_scene(rng, shape=shape, colour=colour, accent_rate=0.0)
    if split == "eval/retrieval":
        return scenes.sample_scene(rng)
    difficulty = list(scenes.DIFFICULTIES)[rng.choice(len(scenes.DIFFICULTIES), p=list(scenes.DIFFICULTIES.values()))]
    shape = colour = None
    if split == "web":
        ranked, cumulative, _ = concept_plan(settings.seed)
        shape, colour = ranked[min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(ranked) - 1)]
    return scenes.sample_scene(rng, shape=shape, colour=colour, difficulty=difficulty)


def eval_attempts(settings: CorpusSettings, counts: dict[str, int]) -> dict[str, list[int]]:
    """For each evaluation example, its first draw (`scene_of`'s attempt) that is no near copy (`scenes.near_copy`)
    of the scene of any web or curated example: no evaluation image has a copy in the data a model trains on."""
    training: dict[tuple, list[scenes.Scene]] = {}
    for split in ("web", "curated"):
        for index in range(counts.get(split, 0)):
            scene = scene_of(settings, split, index)
            training.setdefault(scenes.near_copy_key(scene), []).append(scene)
    attempts: dict[str, list[int]] = {}
    for split in ("eval/zeroshot", "eval/retrieval"):
        attempts[split] = []
        for index in range(counts.get(split, 0)):
            for attempt in range(EVAL_ATTEMPTS):
                scene = scene_of(settings, split, index, attempt)
                near = training.get(scenes.near_copy_key(scene), ())
                if not any(scenes.near_copy(scene, other, settings.image_size) for other in near):
                    break
            else:
                raise RuntimeError(f"{split} example {index}: every draw is a near copy of a training scene")
            attempts[split].append(attempt)
    return attempts


def caption_of(settings: CorpusSettings, split: str, index: int, attempt: int = 0) -> str:
    """The clean caption of example `index` (detailed for retrieval)."""
    scene = scene_of(settings, split, index, attempt)
    return scenes.describe(scene, _rng(settings, split, index, CAPTION), detailed=split == "eval/retrieval")


def noise_kinds(settings: CorpusSettings, size: int, rates: NoiseRates) -> list[str]:
    """The truth kind of each of `size` web examples: each kind gets rate * size of them, rounded so that the counts
    add up (rounded cumulative shares), at seeded random positions; the rest are clean."""
    bounds = np.round(np.cumsum([0.0] + [getattr(rates, kind) for kind in NOISE_KINDS]) * size).astype(int)
    order = np.random.default_rng([settings.seed, SPLIT_IDS["web"], PLAN]).permutation(size)
    kinds = ["clean"] * size
    for kind, start, stop in zip(NOISE_KINDS, bounds[:-1], bounds[1:]):
        for index in order[start:stop]:
            kinds[index] = kind
    return kinds


def plan_noise(settings: CorpusSettings, size: int, rates: NoiseRates) -> list[tuple[str, int | None]]:
    """(truth kind, related example index or None) for each web example.

    The kinds are `noise_kinds`'. A misaligned example borrows the caption of an example whose image differs in shape or
    colour; a near-duplicate copies a clean example.
    """
    kinds = noise_kinds(settings, size, rates)
    clean = [i for i, kind in enumerate(kinds) if kind == "clean"] or list(range(size))
    looks = [(s.shape, s.colour) for s in (scene_of(settings, "web", i) for i in range(size))]
    plan: list[tuple[str, int | None]] = []
    for index, kind in enumerate(kinds):
        rng = _rng(settings, "web", index, PLAN) if kind in ("misaligned", "near_duplicate") else None
        related = None
        if kind == "misaligned":
            related = _pick(rng, range(size), lambda j: looks[j] != looks[index])
            if related is None:  # a corpus too small or too uniform to hold a different-looking example
                related = _pick(rng, range(size), lambda j: j != index)
        elif kind == "near_duplicate":
            related = _pick(rng, clean, lambda j: j != index)
        if rng is not None and related is None:  # a one-example corpus has no other example to borrow from
            kind = "clean"
        plan.append((kind, related))
    return plan


def _pick(
    rng: np.random.Generator, candidates: Sequence[int], accept: Callable[[int], bool], tries: int = 100
) -> int | None:
    """A random candidate that `accept`s, or None when `tries` draws found none."""
    for _ in range(tries if len(candidates) else 0):
        choice = int(candidates[rng.integers(len(candidates))])
        if accept(choice):
            return choice
    return None


def make_example(
    settings: CorpusSettings, split: str, index: int, kind: str = "clean", related: int | None = None, attempt: int = 0
) -> CorpusRecord:
    """Example `index` of `split` (its scene's `attempt`-th draw), with the noise of `kind` applied (see NoiseRates),
    as a CorpusRecord. A near-duplicate is a correctly captioned copy of a clean image: its truth is clean (it is
    redundant, not noisy), its detail "near_copy"."""
    noise_rng = _rng(settings, split, index, NOISE) if kind != "clean" else None
    image_index = related if kind == "near_duplicate" and related is not None else index
    scene = scene_of(settings, split, image_index, attempt)
    image = scenes.render_scene(scene, settings.image_size, _rng(settings, split, image_index, RENDER))
    caption = scenes.describe(scene, _rng(settings, split, index, CAPTION), detailed=split == "eval/retrieval")
    image_bytes, caption, detail = apply_noise(
        kind,
        image,
        caption,
        noise_rng,
        settings.image_format,
        near_copy=scenes.near_duplicate,
        borrowed_caption=lambda: None if related is None else caption_of(settings, split, related),
    )
    metadata = {
        "truth": "clean" if kind == "near_duplicate" else kind,
        "shape": scene.shape,
        "colour": scene.colour,
        "size": scene.size,
        "background": scene.background,
        "position": scene.position,
        "difficulty": scene.difficulty,
        "frequency": concept_plan(settings.seed)[2][scene.shape, scene.colour],
        "related_key": example_key(split, related) if related is not None else "",
        "detail": "near_copy" if kind == "near_duplicate" else detail,
    }
    return CorpusRecord(example_key(split, index), image_bytes, caption, "", metadata)


def _make_task(settings: CorpusSettings, task: tuple[str, int, str, int | None]) -> CorpusRecord:
    return make_example(settings, *task)


def _split_tasks(
    settings: CorpusSettings, split: str, count: int, rates: NoiseRates, attempts: dict[str, list[int]]
) -> list[tuple]:
    if split == "web":
        plan = plan_noise(settings, count, rates)
        return [(split, index, kind, related) for index, (kind, related) in enumerate(plan)]
    draws = attempts.get(split, [0] * count)
    return [(split, index, "clean", None, draws[index]) for index in range(count)]


def write_corpus(
    out: str,
    size: int,
    format: str = "wds",
    seed: int = 0,
    *,
    noise: NoiseRates = NoiseRates(),
    curated_size: int | None = None,
    eval_size: int | None = None,
    shard_size: int = 1000,
    image_size: int = 64,
    image_format: str = "jpeg",
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write the demo corpus under `out` (see the module docstring; split sizes: `split_counts`) and return what
    `_SPLITS.json` says. workers > 1 renders in that many processes; the output does not depend on it."""
    counts = corpus_files.split_counts(format, size, seed, shard_size, image_format, curated_size, eval_size)
    settings = CorpusSettings(seed=seed, image_size=image_size, image_format=image_format)
    make = functools.partial(_make_task, settings)
    # spawn, not fork: forking a process that already runs JAX (the demo's) can deadlock.
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    out = out.rstrip("/")
    splits = corpus_files.write_splits(
        out,
        counts,
        format,
        shard_size,
        overwrite,
        functools.partial(_split_tasks, settings, rates=noise, attempts=eval_attempts(settings, counts)),
        make,
        pool=pool,
        descriptions=SPLIT_DESCRIPTIONS,
        progress=progress,
    )
    colours = list(scenes.COLOURS)
    classes = {
        "shape": {"metadata_field": "shape", "classes": list(scenes.SHAPES), "templates": ZEROSHOT_TEMPLATES["shape"]},
        "colour": {"metadata_field": "colour", "classes": colours, "templates": ZEROSHOT_TEMPLATES["colour"]},
    }
    corpus_files.write_json(posixpath.join(out, "eval", "classes.json"), classes)
    splits["eval/zeroshot"]["classes"] = "eval/classes.json"
    ranked, _, frequency = concept_plan(seed)
    summary = {
        "schema_version": SCHEMA_VERSION,
        "generator_version": GENERATOR_VERSION,
        "format": format,
        **dataclasses.asdict(settings),
        "noise_rates": noise.as_dict(),
        "concepts": {
            "ranked": [f"{colour} {shape}" for shape, colour in ranked],
            "frequency": dict(Counter(frequency.values())),
        },
        "difficulties": scenes.DIFFICULTIES,
        "vocabulary": {
            "shapes": list(scenes.SHAPES),
            "colours": colours,
            "sizes": list(scenes.SIZES),
            "backgrounds": list(scenes.BACKGROUNDS),
        },
        "splits": splits,
    }
    # last: its presence means the corpus is complete
    corpus_files.write_json(posixpath.join(out, "_SPLITS.json"), summary)
    return summary


PROG = "python -m demo.make_corpus"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked: every mistake is one line on stderr, before any work."""
    parser = cli.OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    corpus_files.add_corpus_flags(parser)
    args = parser.parse_args(argv)
    corpus_files.check_corpus_flags(parser, args)
    return args


def run(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    names = ("curated_size", "eval_size", "shard_size", "image_size", "image_format", "workers", "overwrite")
    start = time.perf_counter()
    summary = corpus_files.write_or_exit(
        PROG,
        lambda: write_corpus(
            args.out,
            args.size,
            args.format,
            args.seed,
            noise=args.noise,
            progress=not args.no_progress,
            **{name: getattr(args, name) for name in names},
        ),
    )
    counts = ", ".join(f"{split} {info['count']}" for split, info in summary["splits"].items())
    print(f"wrote {counts} examples ({args.format}) to {args.out} in {time.perf_counter() - start:.1f} s")
    return summary


if __name__ == "__main__":
    run()
