"""Make the demo corpus: a web-like image-text corpus rendered on the spot, with hidden ground truth.

    python -m demo.make_corpus --out /tmp/demo_corpus --size 10000 --format wds --seed 0

Writes, under --out (a local directory or gs:// prefix):

    web/             --size examples, mostly noisy (see NoiseRates), the corpus to curate
    curated/         ~10% of --size clean examples, disjoint from web: the reference model's training data
    eval/zeroshot/   clean examples balanced over shape x colour, for zero-shot classification
    eval/retrieval/  clean examples with detailed captions, for image<->text retrieval
    eval/classes.json  class names and prompt templates of the two zero-shot tasks (shape, colour)
    _SPLITS.json     what was made: settings, splits with their shards and counts per ground-truth kind

Every example's metadata holds its ground truth: `truth` ("clean" or the noise kind), the image's `shape`,
`colour`, `size`, `background` and `position`, `related_key` (whose caption a misaligned example carries, or whose
image a near-duplicate copies) and `detail` (which degradation or kind of non-image bytes). It is for analysis
only; curation must never read it. Output is a pure function of the settings: the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import multiprocessing.pool
import os
import posixpath
import time
from collections import Counter
from typing import Callable, Iterator, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems
from tqdm import tqdm

from curation.shared.corpus import CorpusRecord, check_format
from curation.shared.corpus_writers import SHARD_SUFFIXES, open_shard_writer
from demo import scenes
from demo.noise import NOISE_KINDS, NoiseRates, apply_noise

SCHEMA_VERSION = 1
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


def scene_of(settings: CorpusSettings, split: str, index: int) -> scenes.Scene:
    """The scene of example `index` of `split`; zero-shot examples cycle through every shape x colour."""
    rng = _rng(settings, split, index, SCENE)
    if split == "eval/zeroshot":
        colours = list(scenes.COLOURS)
        shape, colour = scenes.SHAPES[index % len(scenes.SHAPES)], colours[(index // len(scenes.SHAPES)) % len(colours)]
        return scenes.sample_scene(rng, shape=shape, colour=colour, accent_rate=0.0)
    return scenes.sample_scene(rng)


def caption_of(settings: CorpusSettings, split: str, index: int) -> str:
    """The clean caption of example `index` (detailed for retrieval)."""
    scene = scene_of(settings, split, index)
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
    settings: CorpusSettings, split: str, index: int, kind: str = "clean", related: int | None = None
) -> CorpusRecord:
    """Example `index` of `split`, with the noise of `kind` applied (see NoiseRates), as a CorpusRecord."""
    noise_rng = _rng(settings, split, index, NOISE) if kind != "clean" else None
    image_index = related if kind == "near_duplicate" and related is not None else index
    scene = scene_of(settings, split, image_index)
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
        "truth": kind,
        "shape": scene.shape,
        "colour": scene.colour,
        "size": scene.size,
        "background": scene.background,
        "position": scene.position,
        "related_key": example_key(split, related) if related is not None else "",
        "detail": detail,
    }
    return CorpusRecord(example_key(split, index), image_bytes, caption, "", metadata)


def _make_task(settings: CorpusSettings, task: tuple[str, int, str, int | None]) -> CorpusRecord:
    return make_example(settings, *task)


def split_counts(
    format: str,
    size: int,
    seed: int,
    shard_size: int,
    image_format: str,
    curated_size: int | None,
    eval_size: int | None,
) -> dict[str, int]:
    """Check the settings every corpus maker shares (ValueError) and return each split's count: --size web
    examples, curated_size (default 10% of size), eval_size per eval split (default size // 10 within [48, 1000])."""
    check_format(format)
    if size < 1 or shard_size < 1 or seed < 0:
        raise ValueError(f"need size >= 1, shard_size >= 1 and seed >= 0; got {size}, {shard_size}, {seed}")
    if image_format not in scenes.IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {scenes.IMAGE_FORMATS}, got {image_format!r}")
    counts = {
        "web": size,
        "curated": max(1, round(0.1 * size)) if curated_size is None else curated_size,
        "eval/zeroshot": min(1000, max(48, size // 10)) if eval_size is None else eval_size,
    }
    counts["eval/retrieval"] = counts["eval/zeroshot"]
    return counts


def write_splits(
    out: str,
    counts: dict[str, int],
    format: str,
    shard_size: int,
    overwrite: bool,
    tasks: Callable[[str, int], list[tuple]],
    make: Callable[[tuple], CorpusRecord],
    *,
    pool: multiprocessing.pool.Pool | None = None,
    pooled: Callable[[tuple], CorpusRecord] | None = None,
    descriptions: dict[str, str] = SPLIT_DESCRIPTIONS,
    progress: bool = False,
    desc: str = "make_corpus",
) -> dict[str, dict]:
    """Write each split of `counts` under `out` (refusing an earlier corpus there unless `overwrite`): the records
    `make(task)` for the `tasks(split, count)` of its examples, made by `pool` (with `pooled`, default `make`) when
    given, which is closed here. Returns _SPLITS.json's "splits": description, pattern, count, shards, truth."""
    suffix = SHARD_SUFFIXES[format]
    splits: dict[str, dict] = {}
    bar = tqdm(total=sum(counts.values()), unit="ex", disable=not progress, desc=desc)
    try:
        _clear_output(out, overwrite)
        for split, count in counts.items():
            split_tasks = tasks(split, count)
            records = pool.imap(pooled or make, split_tasks, chunksize=32) if pool else map(make, split_tasks)
            shards, truth = _write_split(out, split, suffix, format, shard_size, records, bar)
            splits[split] = {
                "description": descriptions[split],
                "pattern": f"{split}/*{suffix}",
                "count": count,
                "shards": shards,
                "truth": dict(sorted(truth.items())),
            }
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return splits


def _split_tasks(settings: CorpusSettings, split: str, count: int, rates: NoiseRates) -> list[tuple]:
    if split == "web":
        plan = plan_noise(settings, count, rates)
        return [(split, index, kind, related) for index, (kind, related) in enumerate(plan)]
    return [(split, index, "clean", None) for index in range(count)]


def _clear_output(out: str, overwrite: bool) -> None:
    """Refuse to mix with an earlier corpus in `out`, or delete its files when `overwrite`."""
    patterns = [posixpath.join(out, split, "*") for split in ("web", "curated", "eval/zeroshot", "eval/retrieval")]
    patterns += [posixpath.join(out, name) for name in ("_SPLITS.json", "eval/classes.json")]
    existing = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a corpus ({existing[0]}, ...); pass overwrite=True / --overwrite")
    if existing:
        FileSystems.delete(existing)


def _write_json(path: str, value: object) -> None:
    with FileSystems.create(path) as f:
        f.write((json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


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
    counts = split_counts(format, size, seed, shard_size, image_format, curated_size, eval_size)
    settings = CorpusSettings(seed=seed, image_size=image_size, image_format=image_format)
    make = functools.partial(_make_task, settings)
    # spawn, not fork: forking a process that already runs JAX (the demo's) can deadlock.
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    out = out.rstrip("/")
    splits = write_splits(
        out,
        counts,
        format,
        shard_size,
        overwrite,
        functools.partial(_split_tasks, settings, rates=noise),
        make,
        pool=pool,
        progress=progress,
    )
    colours = list(scenes.COLOURS)
    classes = {
        "shape": {"metadata_field": "shape", "classes": list(scenes.SHAPES), "templates": ZEROSHOT_TEMPLATES["shape"]},
        "colour": {"metadata_field": "colour", "classes": colours, "templates": ZEROSHOT_TEMPLATES["colour"]},
    }
    _write_json(posixpath.join(out, "eval", "classes.json"), classes)
    splits["eval/zeroshot"]["classes"] = "eval/classes.json"
    summary = {
        "schema_version": SCHEMA_VERSION,
        "format": format,
        **dataclasses.asdict(settings),
        "noise_rates": noise.as_dict(),
        "vocabulary": {
            "shapes": list(scenes.SHAPES),
            "colours": colours,
            "sizes": list(scenes.SIZES),
            "backgrounds": list(scenes.BACKGROUNDS),
        },
        "splits": splits,
    }
    _write_json(posixpath.join(out, "_SPLITS.json"), summary)  # last: its presence means the corpus is complete
    return summary


def _write_split(
    out: str, split: str, suffix: str, format: str, shard_size: int, records: Iterator[CorpusRecord], bar: tqdm
) -> tuple[list[str], Counter]:
    """Write a split's records in shards of `shard_size`; return the shard paths (relative to `out`) and counts of
    ground-truth kinds."""
    shards: list[str] = []
    truth: Counter = Counter()
    writer = None
    try:
        for index, record in enumerate(records):
            if index % shard_size == 0:
                if writer is not None:
                    writer.close()
                shards.append(f"{split}/{index // shard_size:05d}{suffix}")
                writer = open_shard_writer(posixpath.join(out, shards[-1]), format)
            writer.write(record)
            truth[record.metadata["truth"]] += 1
            bar.update(1)
    finally:
        if writer is not None:
            writer.close()
    return shards, truth


def add_corpus_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `write_corpus`'s settings, which every corpus maker takes, with one rate flag per noise kind."""
    parser.add_argument("--out", required=True, help="output directory or gs:// prefix (new or empty, or --overwrite)")
    parser.add_argument("--size", type=int, default=10_000, help="examples in the web split")
    parser.add_argument("--format", choices=("wds", "parquet", "tfrecord"), default="wds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--curated_size", type=int, default=None, help="default: 10%% of --size")
    parser.add_argument("--eval_size", type=int, default=None, help="per eval split; default size/10 in [48, 1000]")
    parser.add_argument("--shard_size", type=int, default=1000, help="examples per shard file")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--image_format", choices=scenes.IMAGE_FORMATS, default="jpeg")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="rendering processes")
    parser.add_argument("--overwrite", action="store_true", help="replace a corpus already in --out")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    for kind, rate in NoiseRates().as_dict().items():
        text = f"share of web examples with noise '{kind}' (default %(default)s)"
        parser.add_argument(f"--{kind}_rate", type=float, default=rate, help=text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_corpus_flags(parser)
    return parser.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    noise = NoiseRates(**{kind: getattr(args, f"{kind}_rate") for kind in NOISE_KINDS})
    start = time.perf_counter()
    summary = write_corpus(
        args.out,
        args.size,
        args.format,
        args.seed,
        noise=noise,
        curated_size=args.curated_size,
        eval_size=args.eval_size,
        shard_size=args.shard_size,
        image_size=args.image_size,
        image_format=args.image_format,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    counts = ", ".join(f"{split} {info['count']}" for split, info in summary["splits"].items())
    print(f"wrote {counts} examples ({args.format}) to {args.out} in {time.perf_counter() - start:.1f} s")
    return summary


if __name__ == "__main__":
    run()
