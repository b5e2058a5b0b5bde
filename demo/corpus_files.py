"""Writing a corpus's splits, which every corpus maker shares (`demo.make_corpus`, `demo.emoji_corpus`): the
settings they all take, shards of a split from its records, and the JSON files beside them."""

from __future__ import annotations

import argparse
import json
import multiprocessing.pool
import os
import posixpath
import sys
from collections import Counter
from typing import Callable, Iterator

from apache_beam.io.filesystems import FileSystems
from tqdm import tqdm

from curation.shared.corpus import CorpusRecord, check_format
from curation.shared.corpus_writers import SHARD_SUFFIXES, open_shard_writer
from demo import scenes
from demo.noise import NoiseRates

SPLIT_FOLDERS = ("web", "curated", "eval/zeroshot", "eval/retrieval")


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
    descriptions: dict[str, str],
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


def _clear_output(out: str, overwrite: bool) -> None:
    """Refuse to mix with an earlier corpus in `out`, or delete its files when `overwrite`."""
    patterns = [posixpath.join(out, split, "*") for split in SPLIT_FOLDERS]
    patterns += [posixpath.join(out, name) for name in ("_SPLITS.json", "eval/classes.json")]
    existing = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a corpus ({existing[0]}, ...); pass overwrite=True / --overwrite")
    if existing:
        FileSystems.delete(existing)


def write_json(path: str, value: object) -> None:
    with FileSystems.create(path) as f:
        f.write((json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


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


def write_or_exit(prog: str, write: Callable[[], dict], errors: tuple[type[Exception], ...] = ()) -> dict:
    """`write()`'s summary; a ValueError, FileExistsError or one of `errors` it raises (a mistake in the command
    line or the output folder), or an output that cannot be written, becomes one line on stderr,
    `PROG: error: ...`, and exit status 2."""
    try:
        return write()
    except (ValueError, FileExistsError, *errors) as error:
        message = " ".join(str(error).split())
    except OSError as error:  # --out under a file, a missing or read-only place, a full disk
        message = f"cannot write {error.filename}: {error.strerror}: give --out a folder that can be written"
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_out(parser: argparse.ArgumentParser, out: str) -> None:
    """A local --out whose nearest existing folder cannot be written (or is a file) is refused by `parser.error`."""
    if "://" not in out:
        place = os.path.abspath(out)
        while not os.path.exists(place):
            place = os.path.dirname(place)
        if not os.path.isdir(place) or not os.access(place, os.W_OK):
            parser.error(f"--out {out}: {place} is not a folder that can be written: give another --out")


def check_corpus_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The mistakes in `add_corpus_flags`' flags, each refused by `parser.error` in one line before any work: sizes
    under 1, a negative seed, an --out that cannot be written, a non-empty one without --overwrite, noise rates
    that are no shares; sets `args.noise` (the NoiseRates)."""
    for flag in ("size", "curated_size", "eval_size", "shard_size", "image_size", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} {value}: need at least 1")
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: need at least 0")
    check_out(parser, args.out)
    held = FileSystems.match([posixpath.join(args.out.rstrip("/"), "*")])[0].metadata_list
    if held and not args.overwrite:
        parser.error(f"--out {args.out} is not empty ({held[0].path}, ...): give a new folder, or --overwrite")
    try:
        args.noise = NoiseRates(**{kind: getattr(args, f"{kind}_rate") for kind in NoiseRates().as_dict()})
    except ValueError as error:
        parser.error(str(error))


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
