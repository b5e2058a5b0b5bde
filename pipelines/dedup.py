"""Find duplicates and evaluation leaks in a scored output: `python -m pipelines.dedup`.

    python -m pipelines.dedup --scored runs/demo/scored --output runs/demo/dedup \\
        --eval_scored runs/demo/eval_scored

It reads the scored batches under --scored (either layout: it needs each row's `image_sha256` and
`image_thumbnail`, not the images) and writes, under --output, one Parquet file per scored file, row-aligned with
it, and `_DEDUP.json` last (`curation/shared/dedup_output.py`). It finds:

- **exact duplicates**: rows whose image bytes are identical (same `image_sha256`);
- **near-duplicates**: rows whose thumbnails have a pixel similarity of at least --near_threshold (the best
  correlation over the image, its mirror and crops of up to 5% a side: `pipelines/pixel_match.py`), among the
  candidates that share one of --bands SimHash bands of a coarse vector of the thumbnail
  (`pipelines/dedup_stages.py`: no pair is compared unless a bucket brings it together, and no worker holds the
  corpus);
- **evaluation leaks**: rows that are a byte copy of an image of the scored evaluation sets given with
  --eval_scored (scored by the same reference), or whose thumbnail is at least --leak_threshold similar to one.
  The evaluation sets are small: every worker holds them (a side input).

Each duplicate group keeps one row, its smallest id (the first scored file's first row); a leak is left out
whatever its group. `python -m curation.train --dedup DIR` leaves out what it marks. Beam's own flags pass through
(--runner, --direct_num_workers, --project, ...); without --runner the job runs in process.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import posixpath
import sys
import time
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
from apache_beam.pvalue import AsList, AsSingleton

from curation.shared import cli, dedup_output
from curation.shared.batches import write_atomically
from curation.shared.corpus_readers import match_shards
from curation.shared.scored_set import ScoredSet
from pipelines import corpus_io, options
from pipelines import dedup_stages as stages
from pipelines.dedup_checks import check_arguments, scored_files, settings_of

log = logging.getLogger("pipelines.dedup")

PROG = "python -m pipelines.dedup"
DESCRIPTION = "Find exact and near-duplicates and evaluation leaks in a scored output (docs: pipelines/dedup.py)."
REQUIRED = ("--scored", "--output")
# pixel similarities (`pipelines/pixel_match.py`), chosen on the demo corpus by bench/dedup.py: the highest at which
# every kind of planted copy is found at least 95% of the time (bench/RESULTS.md, docs/dedup.md)
NEAR_THRESHOLD = 0.94
LEAK_THRESHOLD = 0.94


def _similarity(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a similarity in (0, 1], got {text!r}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class DedupOptions(PipelineOptions):
    """The dedup job's own flags (--output is `options.CorpusJobOptions`'s). Required here: --scored."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--scored", help="the scored output to deduplicate (python -m pipelines.score's --output)")
        parser.add_argument(
            "--eval_scored",
            action="append",
            default=[],
            help="a scored output of evaluation images to protect (scored by the same reference); repeatable",
        )
        parser.add_argument(
            "--eval_data",
            action="append",
            default=[],
            help="glob of corpus shards of evaluation images to protect, read with --input_format and the field "
            "flags and decoded by the job itself (no scoring needed); repeatable",
        )
        parser.add_argument(
            "--near_threshold",
            type=_similarity,
            default=NEAR_THRESHOLD,
            help=f"pixel similarity of a near-duplicate ({NEAR_THRESHOLD})",
        )
        parser.add_argument(
            "--leak_threshold",
            type=_similarity,
            default=LEAK_THRESHOLD,
            help=f"pixel similarity of an evaluation leak ({LEAK_THRESHOLD})",
        )
        parser.add_argument("--bands", type=_positive, default=16, help="SimHash bands: more find more pairs (16)")
        parser.add_argument("--band_bits", type=_positive, default=12, help="bits per band: more, smaller buckets (12)")
        parser.add_argument("--rounds", type=_positive, default=8, help="label-propagation rounds for the groups (8)")
        parser.add_argument("--dedup_seed", type=int, default=0, help="seed of the SimHash hyperplanes (0)")
        parser.add_argument(
            "--incremental_from",
            default="",
            help="an earlier dedup output of this scored set, before new batches were added: its verdicts stand (a "
            "row kept there stays kept) and only the new rows are compared, with each other and with the earlier "
            "ones; the same settings are required",
        )


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, PipelineOptions]:
    return options.parse(
        argv, prog=PROG, description=DESCRIPTION, classes=(options.CorpusJobOptions, DedupOptions), required=REQUIRED
    )


def build(
    pipeline: beam.Pipeline,
    args,
    scored: ScoredSet,
    files: list[str],
    evaluation: list[ScoredSet],
    previous: dedup_output.DedupManifest | None = None,
) -> None:
    """The job's graph. With `previous` (--incremental_from), `files` begin with its files: their rows (ids below
    `old_below`) keep its verdicts, and only pairs with a new row are compared."""
    settings = stages.Settings(
        args.near_threshold, args.leak_threshold, args.bands, args.band_bits, args.rounds, args.dedup_seed
    )
    earlier = previous.files if previous else []
    old_files = [(i, posixpath.join(args.incremental_from, f.dedup)) for i, f in enumerate(earlier)]
    old_below = dedup_output.example_id(len(old_files), 0)
    old = (
        pipeline
        | "EarlierFiles" >> beam.Create(old_files)
        | "ReadEarlierVerdicts" >> beam.FlatMap(stages.read_old_verdicts)
    )
    rows = (
        pipeline
        | "ScoredFiles" >> beam.Create(list(enumerate(files)))
        | "Reshuffle" >> beam.Reshuffle()
        | "ReadScoredFiles" >> beam.FlatMap(stages.read_rows)
    )
    embedded = rows | "Scored" >> beam.Filter(lambda row: row.thumbnail is not None)
    exact = (
        embedded
        | "ByContentHash" >> beam.Map(lambda row: (stages.exact_key(row), row))
        | "SameContent" >> beam.GroupByKey()
        | "ExactGroups" >> beam.FlatMap(stages.exact_group)
        | "Split" >> beam.Partition(lambda item, _: ("representative", "edge", "copy").index(item[0]), 3)
    )
    representatives, exact_edges, copies = (
        part | f"Unwrap{i}" >> beam.Map(lambda item: item[1]) for i, part in enumerate(exact)
    )
    near_edges = (
        representatives
        | "Bands" >> beam.ParDo(stages.BandsFn(settings))
        | "Buckets" >> beam.GroupByKey()
        | "NearPairs" >> beam.FlatMap(lambda b: stages.near_pairs(b[0][0], b[1], settings.near_threshold, old_below))
    )
    fixed = None
    if previous:  # the earlier groups of the earlier rows on a new edge: the only ones a new row can join
        ends = (near_edges, exact_edges) | "NewEdges" >> beam.Flatten()
        fixed = (
            {
                "group": old | "EarlierGroups" >> beam.Map(lambda item: (item[0], item[1][dedup_output.GROUP])),
                "touched": ends | "EarlierEnds" >> beam.FlatMap(lambda e: [(i, None) for i in set(e) if i < old_below]),
            }
            | "JoinTouched" >> beam.CoGroupByKey()
            | "TouchedGroups" >> beam.FlatMap(stages.touched_group)
        )
    near_labels, changed = near_edges | "Components" >> stages.Components(settings.rounds, old_below, fixed)
    labels = (
        {"label": near_labels, "copies": exact_edges, **({"fixed": fixed} if fixed is not None else {})}
        | "JoinCopies" >> beam.CoGroupByKey()
        | "CopiesFollow" >> beam.FlatMap(stages.with_copies)
    )
    evaluation_files = [(s.manifests[0].output, path) for s in evaluation for path in scored_files(s)]
    held_scored = (
        pipeline
        | "EvaluationFiles" >> beam.Create(evaluation_files)
        | "ReadEvaluation" >> beam.FlatMap(lambda item: ((item[0], row) for row in stages.read_rows((0, item[1]))))
    )
    held_data = (
        pipeline
        | "EvaluationShards" >> beam.Create(match_shards(args.eval_data) if args.eval_data else [])
        | "DecodeEvaluation" >> beam.FlatMap(stages.read_evaluation_shard, corpus_io.reader_options(args))
    )
    held_rows = (held_scored, held_data) | "BothEvaluations" >> beam.Flatten()
    held = (
        held_rows
        | "AllEvaluation" >> beam.combiners.ToList()
        | "EvaluationImages" >> beam.Map(stages.evaluation_images)
    )
    held_count = held | "CountEvaluation" >> beam.Map(lambda images: len(images["keys"]))
    leaks = (
        embedded
        | "New" >> beam.Filter(lambda row: row.id >= old_below)
        | "EvalLeaks" >> beam.FlatMap(stages.eval_leak, AsSingleton(held), settings.leak_threshold)
    )
    verdicts = (
        {
            "row": rows | "KeyById" >> beam.Map(lambda row: (row.id, row.key)),
            "label": labels,
            "leak": leaks,
            "copy": copies | "CopyById" >> beam.Map(lambda example: (example, True)),
            "old": old,
        }
        | "JoinVerdicts" >> beam.CoGroupByKey()
        | "Verdicts" >> beam.Map(stages.verdict)
    )
    names = [dedup_output.scored_file_name(args.scored, path) for path in files]
    written = verdicts | "WriteDedupFiles" >> stages.WriteDedupFiles(args.output, names)
    embedded_count = embedded | "CountEmbedded" >> beam.combiners.Count.Globally()
    group_count = (  # groups of two or more: the representatives some other row names
        verdicts
        | "Members" >> beam.FlatMap(stages.named_group)
        | "DistinctGroups" >> beam.Distinct()
        | "CountGroups" >> beam.combiners.Count.Globally()
    )
    template = {
        "version": dedup_output.DEDUP_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "scored": args.scored,
        "reference_fingerprint": scored.fingerprint,
        "layout": scored.layout,
        "batches": [posixpath.basename(m.batch_dir) for m in scored.manifests],
        "settings": {**settings_of(args), "incremental_from": args.incremental_from or None},
    }
    (
        pipeline
        | "Once" >> beam.Create([None])
        | "WriteDedupManifest"
        >> beam.Map(
            write_manifest,
            AsList(written),
            AsSingleton(embedded_count),
            AsSingleton(group_count),
            AsSingleton(changed, default_value=0),
            AsSingleton(held_count),
            folder=args.output,
            files=len(files),
            template=template,
        )
    )


def write_manifest(
    _,
    written: list[dict],
    examples: int,
    groups: int,
    changed: int,
    eval_images: int,
    folder: str,
    files: int,
    template: dict,
):
    if len(written) != files:
        raise RuntimeError(f"{len(written)} dedup files written of {files}: the job lost some")
    entries = sorted(written, key=lambda entry: entry["file"].dedup)
    counts = dedup_output.DedupCounts(
        examples=examples,
        groups=groups,
        removed_exact=sum(entry["removed_exact"] for entry in entries),
        removed_near=sum(entry["removed_near"] for entry in entries),
        leaks=sum(entry["leaks"] for entry in entries),
    )
    template = {**template, "settings": {**template["settings"], "eval_images": eval_images}}
    manifest = dedup_output.DedupManifest(
        **template, files=[entry["file"] for entry in entries], counts=counts, converged=changed == 0
    )
    write_atomically(
        posixpath.join(folder, dedup_output.DEDUP_MANIFEST), lambda f: f.write(manifest.to_json().encode("utf-8"))
    )
    return manifest


def run(argv: Sequence[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Build and run the job; returns its summary (the manifest's counts, settings and output folder)."""
    args, pipeline_options = parse(sys.argv[1:] if argv is None else argv)
    pipeline_options.view_as(SetupOptions).save_main_session = False
    scored, evaluation_sets, previous = check_arguments(args)
    files = scored_files(scored, [entry.scored for entry in previous.files] if previous else ())
    log.info(
        "deduplicating %d scored file(s) of %s against %d scored evaluation image(s) and the shards of %s",
        len(files),
        args.scored,
        sum(s.scored for s in evaluation_sets),
        args.eval_data or "no --eval_data",
    )
    if previous:
        log.info(
            "--incremental_from: the %d file(s) of %s keep their verdicts; %d new file(s) are compared with them",
            len(previous.files),
            args.incremental_from,
            len(files) - len(previous.files),
        )
    pipeline = test_pipeline or beam.Pipeline(options=pipeline_options)
    build(pipeline, args, scored, files, evaluation_sets, previous)
    start = time.perf_counter()
    pipeline.run().wait_until_finish()
    manifest = dedup_output.read_dedup_manifest(args.output)
    if not manifest.converged:
        log.warning("the groups had not settled after --rounds %d: run again with more rounds", args.rounds)
    counts = manifest.counts
    summary = {
        "output": args.output,
        "examples": counts.examples,
        "groups": counts.groups,
        "removed_exact": counts.removed_exact,
        "removed_near": counts.removed_near,
        "leaks": counts.leaks,
        "converged": manifest.converged,
        "seconds": round(time.perf_counter() - start, 2),
    }
    log.info(
        "%d examples: %d duplicate groups, %d exact and %d near-duplicates left out, %d evaluation leaks -> %s",
        counts.examples,
        counts.groups,
        counts.removed_exact,
        counts.removed_near,
        counts.leaks,
        args.output,
    )
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    cli.job_main(PROG, run, argv)


if __name__ == "__main__":
    main()
