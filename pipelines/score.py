"""Score a web corpus with the reference model: `python -m pipelines.score`.

    python -m pipelines.score --input 'runs/demo/corpus/web/*.tar' --input_format wds \\
        --output runs/demo/scored --reference runs/demo/reference/model

--reference is one of this project's checkpoints, a keras-hub preset (`keras_hub:siglip2_base_patch16_224`), or
a keras-hub preset folder, local or on gs:// (see pipelines/references/).

The job, one named transform per stage:

    ReadCorpus → DecodeAndValidate → Preprocess → EmbedWithReference → Score → WriteScoredShards
         └──────────────┴──────────── errors ──────────────────────────┴──→ WriteDeadLetter
                                                          counts, files ──→ WriteManifest

With `--output_layout sidecar` the corpus is not copied: each input shard gets one score sidecar, row i for its
item i (scored, or dead-lettered with its reason), written as soon as the shard is done; a run that dies leaves
its finished sidecars, which the same command run again adopts (see curation/shared/manifest.py):

    ReadCorpus → DecodeAndValidate → Preprocess → EmbedWithReference → Score → WriteSidecars → WriteManifest

Every record read is either scored or dead-lettered with a reason (read errors, decode and caption rules, and
embeddings that are not finite), so read = scored + dead-lettered, per reason in the manifest's counts.

Each run writes one batch folder under --output (see curation/shared/manifest.py) whose `_MANIFEST.json` is written
last; a folder without one is unfinished and never read. `--incremental` scores only the input shards no earlier
batch of the same reference has done (a shard a batch marked failed, unreadable, is not done). A run that dies (or
is killed) is re-run as it was: its folder holds no manifest, so no reader sees its partial output and the re-run
scores its input shards again.

--max_bad_fraction fails the job when more than that fraction of the records read is dead-lettered. The check runs
in the manifest step, once the dead letter is written: the failed batch keeps its dead letter for inspection but
gets no manifest. --clean_unfinished deletes, before the run, the unfinished batch folders of earlier runs (and
temporary files in finished ones); use it only when no other run is writing to --output.

Beam's own flags (--runner, --project, --temp_location, --setup_file, ...) pass through; without --runner the job
runs in process (FnApiRunner). A disk that fills up (or another failed write) ends the job in one line naming the
file; the same command run again goes on from the finished sidecars.

The modules beside this one: `options` (the flags, read strictly), `preflight` (the checks before any work),
`planning` (which shards this run scores), `corpus_io`, `stages`, `jax_inference`, `scored_sinks` and
`manifest_sink` (the job's transforms).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import logging
import posixpath
import sys
import time
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import SetupOptions

from curation.shared import batches, cli, schema
from curation.shared.manifest import OUTPUT_FORMATS, Options, ReferenceInfo
from curation.shared.validation import ValidationOptions
from pipelines import options, planning, preflight, references
from pipelines.corpus_io import ReadCorpus, reader_options
from pipelines.jax_inference import DualEncoderHandler
from pipelines.manifest_sink import WriteManifest, WriteSidecarManifest
from pipelines.scored_sinks import SidecarWritten, WriteDeadLetter, WriteScoredShards, WriteSidecars
from pipelines.stages import DecodeAndValidate, EmbedWithReference, Preprocess, ReadLossParameters, Score

log = logging.getLogger("pipelines.score")


@dataclasses.dataclass(frozen=True)
class JobSettings:
    """What the job's transforms are built from, all decided before the pipeline is (one object for both layouts)."""

    batch_dir: str  # the batch folder this run writes, under --output
    reference: references.Reference  # a description; the workers load its weights
    handler: DualEncoderHandler
    reader: dict[str, Any]  # ReadCorpus's format, fields and batch_rows (corpus_io.reader_options)
    validation: ValidationOptions
    decoding: dict[str, Any]  # how DecodeAndValidate decodes (see `decoding`)
    template: dict[str, Any]  # the manifest's fields known before the run
    store_image: str
    stored_image_size: int
    num_output_shards: int
    max_bad_fraction: float
    allow_failed_shards: bool

    @property
    def info(self) -> ReferenceInfo:
        return self.reference.info

    @property
    def options(self) -> Options:
        return self.template["options"]

    @property
    def formats(self) -> list[str]:
        return self.template["output_formats"]


def parse_formats(text: str) -> list[str]:
    formats = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in formats if name not in OUTPUT_FORMATS]
    if not formats or unknown:
        raise SystemExit(f"--output_format {text!r}: choose from {OUTPUT_FORMATS}")
    return formats


def decoding(args, reference: ReferenceInfo) -> dict[str, Any]:
    """How DecodeAndValidate decodes: JPEGs at the largest size needed (the reference's; the stored size too with
    --store_image=resized), resized for the reference on the decoding threads, two batches ahead."""
    preprocessing = reference.preprocessing
    size = max(preprocessing.size, args.stored_image_size if args.store_image == "resized" else 0)
    return dict(size=size, preprocessing=preprocessing, depth=2 * args.inference_batch_size)


def job_settings(args, reference: references.Reference) -> JobSettings:
    """The JobSettings of the job's flags `args` and its resolved reference."""
    created = datetime.datetime.now(datetime.timezone.utc)
    batch_dir = posixpath.join(args.output, batches.new_batch_name(created.strftime("%Y%m%dT%H%M%SZ")))
    reader = reader_options(args)
    fields = reader["fields"]
    manifest_options = Options(
        store_image=args.store_image if args.output_layout == "copied" else "none",
        stored_image_size=args.stored_image_size,
        input_format=args.input_format,
        max_caption_chars=args.max_caption_chars,
        min_image_size=args.min_image_size,
        max_image_pixels=args.max_image_pixels,
        inference_batch_size=args.inference_batch_size,
        output_layout=args.output_layout,
        key_field=fields.key,
        image_field=list(fields.image),
        caption_field=list(fields.caption),
    )
    template = {
        "schema_version": schema.SCHEMA_VERSION,
        "created": created.isoformat(),
        "reference": reference.info,
        "output_formats": parse_formats(args.output_format),
        "options": manifest_options,
    }
    return JobSettings(
        batch_dir=batch_dir,
        reference=reference,
        handler=DualEncoderHandler(
            reference, args.inference_batch_size, large_model=args.large_model, model_copies=args.model_copies or None
        ),
        reader=reader,
        validation=ValidationOptions(args.max_image_pixels, args.min_image_size, args.max_caption_chars),
        decoding=decoding(args, reference.info),
        template=template,
        store_image=args.store_image,
        stored_image_size=args.stored_image_size,
        num_output_shards=args.num_output_shards,
        max_bad_fraction=args.max_bad_fraction,
        allow_failed_shards=args.allow_failed_shards,
    )


def run(
    argv: Sequence[str] | None = None, test_pipeline: beam.Pipeline | None = None, wait: bool = True
) -> dict[str, Any]:
    """Build and run the job; returns the run summary (the manifest's counts, batch folder, examples/s).

    With wait=False (a Flex Template launcher) it returns once the job is submitted, with only the batch folder.
    """
    # Flags: the job's own and Beam's, each mistake refused in one line.
    args, pipeline_options = options.parse(sys.argv[1:] if argv is None else argv)
    pipeline_options.view_as(SetupOptions).save_main_session = False

    # Checks before any work: credentials, the reference, the paths; then the settings of the job.
    job = job_settings(args, preflight.check_arguments(args))

    # Plan: the input shards this batch scores, and the finished sidecars it adopts.
    plan = planning.plan_batch(args, job.info.fingerprint, job.options)
    if args.clean_unfinished:
        clean_unfinished(args.output, job.batch_dir, plan)
    log_plan(plan, args.output)
    if plan.nothing_to_score:
        return {"batch_dir": None, "read": 0, "scored": 0, "dead_letter": {}, "skipped_shards": len(plan.skipped)}

    # The job: one named transform per stage, in the layout asked for.
    pipeline = test_pipeline or beam.Pipeline(options=pipeline_options)
    build_job = build_sidecar_job if args.output_layout == "sidecar" else build_copied_job
    build_job(pipeline, job, plan)

    # Run it: its summary from the manifest, or one line for an output it could not write.
    return run_job(pipeline, job, wait)


def clean_unfinished(output: str, batch_dir: str, plan: planning.Plan) -> None:
    """--clean_unfinished: earlier runs' unfinished batch folders and temporary files go, the sidecars adopted stay."""
    keep = [posixpath.join(output, relative) for relative, _ in plan.adopted.values()]
    for path in batches.remove_unfinished(output, before=posixpath.basename(batch_dir), keep=keep):
        log.info("removed unfinished or temporary %s", path)


def log_plan(plan: planning.Plan, output: str) -> None:
    if plan.skipped:
        log.info("skipping %d input shard(s) already scored by this reference", len(plan.skipped))
    if plan.adopted:
        batches_left = ", ".join(sorted({info.batch for _, info in plan.adopted.values()}))
        log.info(
            "resuming: %d input shard(s) have finished sidecars from a run that did not finish (%s); scoring "
            "the other %d",
            len(plan.adopted),
            batches_left,
            len(plan.todo),
        )
    if plan.nothing_to_score:
        log.info("nothing to score: every input shard is in a batch under %s", output)


def build_copied_job(pipeline: beam.Pipeline, job: JobSettings, plan: planning.Plan) -> None:
    """The copied layout: scored shards holding the examples, a dead letter, the manifest."""
    records, read_errors, failed_shards, shard_sizes = pipeline | "ReadCorpus" >> ReadCorpus(
        plan.paths, **job.reader, shard_sizes=True
    )
    valid, invalid = records | "DecodeAndValidate" >> DecodeAndValidate(job.validation, **job.decoding)
    loss_parameters = pipeline | "ReadLossParameters" >> ReadLossParameters(job.reference)
    rows, non_finite = (
        valid
        | "Preprocess" >> Preprocess(job.reference, job.store_image, job.stored_image_size)
        | "EmbedWithReference" >> EmbedWithReference(job.handler)
        | "Score" >> Score(job.info.loss, loss_parameters)
    )
    scored_files, scored_rows = rows | "WriteScoredShards" >> WriteScoredShards(
        job.batch_dir, job.formats, job.info.width, job.num_output_shards
    )
    errors = (read_errors, invalid, non_finite) | "AllErrors" >> beam.Flatten()
    dead_letter_files = errors | "WriteDeadLetter" >> WriteDeadLetter(job.batch_dir)
    # Counted a shard (read) or a written batch (scored) at a time, not per record.
    read = shard_sizes | "SumRead" >> beam.CombineGlobally(sum)
    scored = scored_rows | "SumScored" >> beam.CombineGlobally(sum)
    per_reason = (
        errors | "Reasons" >> beam.Map(lambda error: error.reason) | "PerReason" >> beam.combiners.Count.PerElement()
    )
    (
        (scored_files, dead_letter_files, failed_shards, read, scored, per_reason, loss_parameters)
        | "WriteManifest"
        >> WriteManifest(job.batch_dir, job.template, plan.todo, job.max_bad_fraction, job.allow_failed_shards)
    )


def build_sidecar_job(pipeline: beam.Pipeline, job: JobSettings, plan: planning.Plan) -> None:
    """The sidecar layout: every stage keeps its errors inline, in their place, so that one fused stage runs from a
    shard's read to its sidecar, written as soon as the shard is done."""
    adopted = {
        path: SidecarWritten(path, relative, info.read, info.scored, info.dead_letter)
        for path, (relative, info) in plan.adopted.items()
    }
    loss_parameters = pipeline | "ReadLossParameters" >> ReadLossParameters(job.reference)
    if plan.todo:
        records, _, failed_shards = pipeline | "ReadCorpus" >> ReadCorpus(plan.paths, **job.reader, errors_inline=True)
        valid, _ = records | "DecodeAndValidate" >> DecodeAndValidate(
            job.validation, errors_inline=True, **job.decoding
        )
        items, _ = (
            valid
            | "Preprocess" >> Preprocess(job.reference, "none", job.stored_image_size)
            | "EmbedWithReference" >> EmbedWithReference(job.handler)
            | "Score" >> Score(job.info.loss, loss_parameters, errors_inline=True)
        )
        written = items | "WriteSidecars" >> WriteSidecars(
            job.batch_dir, job.info.width, job.formats, job.info.fingerprint, job.options.scoring(), plan.todo
        )
    else:
        written = pipeline | "NothingToScore" >> beam.Create([])
        failed_shards = pipeline | "NoFailedShards" >> beam.Create([])
    (
        (written, failed_shards, loss_parameters)
        | "WriteManifest"
        >> WriteSidecarManifest(
            job.batch_dir, job.template, plan.identities, adopted, job.max_bad_fraction, job.allow_failed_shards
        )
    )


def run_job(pipeline: beam.Pipeline, job: JobSettings, wait: bool) -> dict[str, Any]:
    """Run the built job and wait for it (unless `wait` is False); its summary. A file it could not write ends it
    with SystemExit, one line naming the file and what to do."""
    start = time.perf_counter()
    try:
        result = pipeline.run()
        if not wait:
            log.info("submitted: the batch appears in %s when its _MANIFEST.json is written", job.batch_dir)
            return {"batch_dir": job.batch_dir}
        result.wait_until_finish()
    except Exception as error:
        failed_write = write_failure(error, job)
        if failed_write is None:
            raise
        raise SystemExit(failed_write) from None
    seconds = time.perf_counter() - start
    log_counters(result)
    return summarize(job.batch_dir, seconds)


def write_failure(error: BaseException, job: JobSettings) -> str | None:
    """One line for a job that failed writing its output (a full disk, a lost permission): which file, why, and what
    to do; None for any other failure. (Beam wraps a step's exception; the original is in its chain.)"""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    named = next((e for e in chain if isinstance(e, batches.OutputWriteError)), None)
    full = next((e for e in chain if isinstance(e, OSError) and e.errno == errno.ENOSPC), None)
    if named is None and full is None:
        return None
    what = str(named) if named is not None else f"cannot write under {posixpath.dirname(job.batch_dir)}: {full}"
    if job.options.output_layout == "sidecar":
        return (
            f"{what}; the job stopped, keeping its finished sidecars: make room, then run the same command "
            "again (it adopts them)"
        )
    return (
        f"{what}; the job stopped without a manifest: make room, then run the same command again "
        "(--clean_unfinished removes what this run left)"
    )


def log_counters(result) -> dict[str, int]:
    """Log every Beam counter of the finished job, summed over its steps (namespace:name value); returns them."""
    try:
        counters = result.metrics().query()["counters"]
    except Exception as error:  # a runner without metrics
        log.info("the runner reports no counters (%s)", type(error).__name__)
        return {}
    totals: dict[str, int] = {}
    for counter in counters:
        name = f"{counter.key.metric.namespace}:{counter.key.metric.name}"
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[name] = totals.get(name, 0) + int(value or 0)
    if totals:
        width = max(map(len, totals))
        lines = (f"  {name:<{width}}  {value:>12,}" for name, value in sorted(totals.items()))
        log.info("counters:\n%s", "\n".join(lines))
    return totals


def summarize(batch_dir: str, seconds: float) -> dict[str, Any]:
    """The run's counts from its manifest, logged as one summary line."""
    manifest = next((m for m in batches.read_manifests(posixpath.dirname(batch_dir)) if m.batch_dir == batch_dir), None)
    if manifest is None:
        raise RuntimeError(f"the job finished but wrote no manifest in {batch_dir}")
    counts = manifest.counts
    summary = {
        "batch_dir": batch_dir,
        "read": counts.read,
        "scored": counts.scored,
        "dead_letter": counts.dead_letter,
        "seconds": round(seconds, 2),
        "examples_per_second": round(counts.read / max(seconds, 1e-9), 1),
        "shards": len(manifest.shards),
        "input_shards": counts.shards,
        "failed_shards": counts.shards_failed,
        "sidecars": len(manifest.sidecars()),
    }
    reasons = ", ".join(f"{reason} {n}" for reason, n in counts.dead_letter.items()) or "none"
    log.info(
        "read %d, scored %d, dead-lettered %d (%s) in %.1f s: %.0f examples/s -> %s",
        counts.read,
        counts.scored,
        counts.dead_lettered,
        reasons,
        seconds,
        summary["examples_per_second"],
        batch_dir,
    )
    return summary


def main(argv: Sequence[str] | None = None, wait: bool = True) -> None:
    cli.job_main("python -m pipelines.score", lambda args: run(args, wait=wait), argv)


if __name__ == "__main__":
    main()
