"""What the dedup job (`pipelines/dedup.py`) checks before any work: the scored set and the evaluation sets it is
given, the output folder, and an earlier dedup output given with --incremental_from; each mistake is a SystemExit
in one line naming the fix. And the order of the scored files, which fixes every example's id."""

from __future__ import annotations

import argparse
import posixpath
from typing import Any, Sequence

from apache_beam.io.filesystems import FileSystems

from curation.shared import dedup_output
from curation.shared.corpus_readers import match_shards
from curation.shared.manifest import ScoredShardsError
from curation.shared.scored_set import ScoredSet, open_scored
from pipelines import pixel_match


def open_checked(path: str, flag: str) -> ScoredSet:
    """A scored output whose every batch records `image_sha256` and `image_thumbnail` (schema version 4);
    SystemExit in one line else."""
    try:
        scored = open_scored(path)
    except ScoredShardsError as error:
        raise SystemExit(f"{flag} {path}: {error}") from None
    old = [posixpath.basename(m.batch_dir) for m in scored.manifests if m.schema_version < 4]
    if old:
        raise SystemExit(
            f"{flag} {path}: batch(es) {', '.join(old)} were scored before schema version 4 and record no "
            "image thumbnail; "
            "score the corpus again with this version of python -m pipelines.score"
        )
    return scored


def scored_files(scored: ScoredSet, first: Sequence[str] = ()) -> list[str]:
    """The scored set's files, in a fixed order: its Parquet shards (copied layout) or sidecars; the files named in
    `first` (relative to the scored output: an earlier dedup output's, in its order) come first."""
    if scored.layout == "sidecar":
        paths = [sidecar for _, sidecar, _ in scored.sidecar_pairs()]
    else:
        paths = scored.shard_paths("parquet")
    by_name = {dedup_output.scored_file_name(scored.manifests[0].output, path): path for path in paths}
    earlier = [by_name[name] for name in first]
    return earlier + [path for path in paths if path not in set(earlier)]


# What an --incremental_from run must share with the earlier output for its verdicts to stand.
SAME_SETTINGS = (
    "signal",
    "candidate_cosine",
    "colours_agree",
    "near_threshold",
    "leak_threshold",
    "bands",
    "band_bits",
    "seed",
    "eval_scored",
    "eval_data",
)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "signal": "pixels: pipelines/pixel_match.py",
        "candidate_cosine": pixel_match.CANDIDATE_COSINE,
        "colours_agree": [pixel_match.MEAN_SHARE, pixel_match.MEAN_SLACK, pixel_match.SPREAD_RATIO],
        "near_threshold": args.near_threshold,
        "leak_threshold": args.leak_threshold,
        "bands": args.bands,
        "band_bits": args.band_bits,
        "rounds": args.rounds,
        "seed": args.dedup_seed,
        "eval_scored": list(args.eval_scored),
        "eval_data": list(args.eval_data),
    }


def check_incremental(args: argparse.Namespace, scored: ScoredSet) -> dedup_output.DedupManifest | None:
    """The earlier dedup output of --incremental_from, checked against this run: SystemExit in one line naming the
    fix when it was made for another reference, layout, scored batches or settings."""
    if not args.incremental_from:
        return None
    flag = f"--incremental_from {args.incremental_from}"
    try:
        previous = dedup_output.read_dedup_manifest(args.incremental_from)
    except ScoredShardsError as error:
        raise SystemExit(f"{flag}: {error}") from None
    afresh = "run without --incremental_from to deduplicate the whole scored set afresh"
    if (previous.reference_fingerprint, previous.layout) != (scored.fingerprint, scored.layout):
        raise SystemExit(
            f"{flag} was made for a {previous.layout} scored set of reference {previous.reference_fingerprint[:12]}, "
            f"--scored is a {scored.layout} one of {scored.fingerprint[:12]}: {afresh}"
        )
    names = {posixpath.basename(m.batch_dir) for m in scored.manifests}
    gone = sorted(set(previous.batches) - names)
    if gone:
        raise SystemExit(f"{flag} covers batch(es) {', '.join(gone)}, which --scored no longer holds: {afresh}")
    now = settings_of(args)
    differ = [k for k in SAME_SETTINGS if previous.settings.get(k) != now[k]]
    if differ:
        first = differ[0]
        raise SystemExit(
            f"{flag} was made with {first} {previous.settings.get(first)!r}, this run has {now[first]!r}: give the "
            f"same {', '.join(differ)}, or {afresh}"
        )
    try:
        scored_files(scored, [entry.scored for entry in previous.files])
    except KeyError as missing:
        raise SystemExit(f"{flag} has verdicts on {missing}, which --scored no longer holds: {afresh}") from None
    return previous


def check_arguments(args: argparse.Namespace) -> tuple[ScoredSet, list[ScoredSet]]:
    """Everything refused before any work: the scored set and the evaluation sets, and the output folder."""
    scored = open_checked(args.scored, "--scored")
    evaluation = [open_checked(path, "--eval_scored") for path in args.eval_scored]
    for path, other in zip(args.eval_scored, evaluation):
        if other.fingerprint != scored.fingerprint:
            raise SystemExit(
                f"--eval_scored {path} is scored by reference {other.fingerprint[:12]}, --scored by "
                f"{scored.fingerprint[:12]}: score the evaluation images with the same reference"
            )
    if args.input:
        raise SystemExit("--input is the scoring job's: the dedup job reads a scored output, given with --scored")
    for pattern in args.eval_data:
        try:
            match_shards([pattern])
        except (FileNotFoundError, OSError):
            raise SystemExit(f"--eval_data {pattern} matches no file: give a glob of evaluation shards") from None
    if FileSystems.exists(posixpath.join(args.output, dedup_output.DEDUP_MANIFEST)):
        raise SystemExit(f"--output {args.output} already holds a dedup output: give another folder, or delete it")
    return scored, evaluation, check_incremental(args, scored)
