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
batch of the same reference has done (a shard a batch marked failed, unreadable, is not done). A run that dies (or is killed) is re-run as it was: its folder holds no
manifest, so no reader sees its partial output and the re-run scores its input shards again.

--max_bad_fraction fails the job when more than that fraction of the records read is dead-lettered. The check runs
in the manifest step, once the dead letter is written: the failed batch keeps its dead letter for inspection but
gets no manifest. --clean_unfinished deletes, before the run, the unfinished batch folders of earlier runs (and
temporary files in finished ones); use it only when no other run is writing to --output.

Beam's own flags (--runner, --project, --temp_location, --setup_file, ...) pass through; without --runner the job
runs in process (FnApiRunner).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import logging
import os
import posixpath
import sys
import threading
import time
from typing import Any, Iterator, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, _BeamArgumentParser

from curation.shared import batches, cli, schema, sidecars
from curation.shared.manifest import DONE, FAILED, InputShard, LAYOUTS, OUTPUT_FORMATS, Options
from curation.shared.corpus import match_shards, valid_unicode
from curation.shared.validation import ValidationOptions
from pipelines import references
from pipelines.corpus_io import ReadCorpus, add_reader_arguments, reader_options
from pipelines.jax_inference import DualEncoderHandler
from pipelines.scored_sinks import (SidecarWritten, WriteDeadLetter, WriteManifest, WriteScoredShards,
                                    WriteSidecarManifest, WriteSidecars)
from pipelines.stages import (STORE_IMAGE, DecodeAndValidate, EmbedWithReference, Preprocess, ReadLossParameters,
                              Score)

log = logging.getLogger("pipelines.score")


# A boolean flag that also takes a value (`--incremental`, `--incremental=true`), as Flex Templates pass it.
_flag = cli.parse_bool


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = cli.OneLineErrorParser(prog="python -m pipelines.score", description=__doc__.split("\n")[0],
                                    formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False)
    parser.add_argument("--input", required=True, action="append",
                        help="glob(s) of input shards (local or gs://), comma-separated or repeated")
    add_reader_arguments(parser)
    parser.add_argument("--output", required=True, help="output directory; each run adds a batch folder to it")
    parser.add_argument("--reference", "--reference_checkpoint", dest="reference", required=True,
                        help="the reference model: a checkpoint folder of this project, keras_hub:PRESET, or a "
                             "keras-hub preset folder (local or gs://)")
    parser.add_argument("--output_format", default="parquet",
                        help="comma-separated: parquet, tfrecord (default parquet)")
    parser.add_argument("--output_layout", choices=LAYOUTS, default="copied",
                        help="copied: scored shards holding the examples (images too, --store_image); sidecar: one "
                             "score file per input shard, row i for its record i, beside a corpus that is not "
                             "copied (a run that dies resumes from the sidecars it finished)")
    parser.add_argument("--store_image", choices=STORE_IMAGE, default="as_stored",
                        help="image bytes in the scored shards: as stored, re-encoded JPEG, or none")
    parser.add_argument("--stored_image_size", type=int, default=64, help="side of re-encoded images (resized)")
    parser.add_argument("--incremental", type=_flag, nargs="?", const=True, default=False,
                        help="score only input shards no batch of the same reference under --output has done")
    parser.add_argument("--force_new_reference", type=_flag, nargs="?", const=True, default=False,
                        help="allow a batch scored by another reference than the batches already under --output")
    parser.add_argument("--inference_batch_size", type=int, default=256,
                        help="rows per forward; every batch is padded to it (one XLA compile)")
    parser.add_argument("--num_output_shards", type=int, default=0, help="scored shards per format (0: runner picks)")
    parser.add_argument("--max_image_pixels", type=int, default=ValidationOptions.max_image_pixels)
    parser.add_argument("--min_image_size", type=int, default=ValidationOptions.min_image_size)
    parser.add_argument("--max_caption_chars", type=int, default=ValidationOptions.max_caption_chars)
    parser.add_argument("--large_model", type=_flag, nargs="?", const=True, default=False,
                        help="one model copy per worker VM shared by its processes (accelerator workers)")
    parser.add_argument("--model_copies", type=int, default=0,
                        help="with an accelerator worker: that many model copies per VM shared by its processes, "
                             "e.g. one per GPU (implies sharing; 0: Beam's default)")
    parser.add_argument("--max_bad_fraction", type=_fraction, default=1.0,
                        help="fail, without a manifest, when more than this fraction of the records read is "
                             "dead-lettered (default 1.0: never fail; e.g. 0.05 fails above 5%%)")
    parser.add_argument("--allow_failed_shards", type=_flag, nargs="?", const=True, default=False,
                        help="write the manifest even when input shards could not be read whole (they are listed as "
                             "failed, none of their records is kept, and --incremental scores them again); default: "
                             "fail the job without a manifest")
    parser.add_argument("--skip_failed_shards", type=_flag, nargs="?", const=True, default=False,
                        help="with --incremental: do not retry shards an earlier batch listed as failed")
    parser.add_argument("--clean_unfinished", type=_flag, nargs="?", const=True, default=False,
                        help="first delete the unfinished batch folders of earlier runs under --output (only when "
                             "no other run is writing to it)")
    cli.add_verbose_flag(parser)
    return parser


class _ScratchBeamParser(_BeamArgumentParser):
    def error(self, message: str):
        raise ValueError(message)


def _beam_option_classes() -> list[type]:
    found, todo = [], list(PipelineOptions.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return found


def _beam_parser() -> _ScratchBeamParser:
    """A parser that knows every flag of Beam's option classes (as PipelineOptions parses them)."""
    parser = _ScratchBeamParser(allow_abbrev=False, conflict_handler="resolve", add_help=False)
    for cls in _beam_option_classes():
        if "_add_argparse_args" in vars(cls):  # an inherited one would add its parent's flags again
            try:
                cls._add_argparse_args(parser)
            except (argparse.ArgumentError, TypeError, ValueError):
                pass
    return parser


_GCLOUD_HINT = "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"


def _check_gcs_credentials(paths: list[str], timeout_s: float = 10.0) -> None:
    """Refuse gs:// paths without Google credentials at once, not after a minute of retries (no check against a
    local emulator, STORAGE_EMULATOR_HOST)."""
    gcs = [path for path in paths if path.startswith("gs://")]
    if not gcs or os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    import google.auth

    result: dict[str, Any] = {}

    def probe():
        try:
            result["credentials"] = google.auth.default()
        except Exception as error:  # DefaultCredentialsError, or a transport error
            result["error"] = error

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "credentials" not in result:
        why = f"no Google credentials ({' '.join(str(result['error']).split())[:120]})" if "error" in result \
            else f"no Google credentials found within {timeout_s:.0f} s"
        raise SystemExit(f"{gcs[0]}: {why}; {_GCLOUD_HINT}")


def check_reference(spec: str) -> references.Reference:
    """--reference, resolved from its metadata and checked for damage where that is cheap."""
    try:
        reference = references.resolve(spec)
        reference.check_loadable()
        return reference
    except references.ReferenceSpecError as error:
        raise SystemExit(str(error)) from None
    except Exception as error:
        detail = " ".join(str(error).split())[:160]
        raise SystemExit(f"--reference {spec} is damaged or unreadable ({type(error).__name__}: {detail}); save it "
                         "again or point at another reference") from None


def check_arguments(args: argparse.Namespace, beam_args: list[str]) -> references.Reference:
    """Refuse, before any work, flags neither this job nor Beam knows, and inputs that cannot work."""
    beam_parser = _beam_parser()
    try:
        _, unknown = beam_parser.parse_known_args(list(beam_args))
    except ValueError as error:
        raise SystemExit(f"Beam option: {' '.join(str(error).split())}") from None
    if unknown:
        known = [*cli.parser_flags(build_parser()), *cli.parser_flags(beam_parser)]
        raise SystemExit(cli.unknown_flag_message(unknown, known))
    patterns = [pattern for value in args.input for pattern in value.split(",") if pattern]
    _check_gcs_credentials([*patterns, args.output, args.reference])
    for pattern in patterns:
        if "://" in pattern:
            continue
        directories = [path for path in sorted(glob.glob(pattern)) if os.path.isdir(path)]
        if directories:
            raise SystemExit(f"--input {pattern} matches the directory {directories[0]}, not shard files; give a "
                             f"glob of its shards, e.g. --input '{directories[0].rstrip('/')}/*'")
    if os.path.isfile(args.output):
        raise SystemExit(f"--output {args.output} is a file; give a directory")
    if args.output_layout == "sidecar" and (args.store_image != "as_stored" or args.num_output_shards):
        raise SystemExit("--store_image and --num_output_shards shape the copied layout; --output_layout sidecar "
                         "writes one sidecar per input shard and no image: drop them")
    if args.model_copies < 0:
        raise SystemExit(f"--model_copies {args.model_copies}: give a positive count (or 0 for Beam's default)")
    return check_reference(args.reference)


def canonical_path(path: str) -> str:
    """The one spelling of a shard's path: a local path absolute with links resolved, a URL as it is. (A relative
    path recorded by an earlier batch is resolved against the current directory.)"""
    return path if "://" in path else os.path.realpath(path)


def shard_identities(paths: list[str]) -> list[tuple[str, int, float]]:
    """(canonical path, size in bytes, modification time) of each shard, as the filesystem reports them."""
    canonical = sorted({canonical_path(path) for path in paths})
    identities = []
    for path, result in zip(canonical, FileSystems.match(canonical)):
        metadata = result.metadata_list[0]
        identities.append((path, metadata.size_in_bytes, float(metadata.last_updated_in_seconds or -1.0)))
    return identities


def _already_scored(shard: tuple[str, int, float], recorded: dict[str, InputShard]) -> bool:
    """Whether an earlier batch holds this very shard: the same canonical path, and the same size and
    modification time where it recorded them (a shard that changed is scored again)."""
    earlier = recorded.get(shard[0])
    if earlier is None:
        return False
    same_size = earlier.size_bytes < 0 or earlier.size_bytes == shard[1]
    same_time = earlier.modified < 0 or earlier.modified == shard[2]
    return same_size and same_time


def plan_batch(args: argparse.Namespace, fingerprint: str, options: Options | None = None
               ) -> tuple[list[tuple[str, int, float]], list[str], dict[str, Any]]:
    """(identities of the input shards to score now, paths skipped as already scored, input shard -> the finished
    sidecar of a run that died, to adopt). Refuses to mix references or to re-score into an output that already
    holds batches unless --incremental. A shard an earlier batch marked failed is scored again, unless
    --skip_failed_shards. Sidecars are adopted (sidecar layout) when they hold the very shard, scored by this
    reference under the same `options`."""
    try:
        shards = match_shards([pattern for value in args.input for pattern in value.split(",") if pattern])
    except FileNotFoundError as error:
        raise SystemExit(f"--input: {error}; check the path and the glob (quote it, so the shell leaves it alone)"
                         ) from None
    not_utf8 = [ascii(shard) for shard in shards if valid_unicode(shard) != shard]
    if not_utf8:  # a local file name; Beam carries paths as UTF-8 text and would fail on it mid-job
        raise SystemExit(f"input shard paths must be UTF-8; rename {', '.join(not_utf8[:5])}")
    existing = batches.read_manifests(args.output)
    if existing and not args.incremental:
        raise SystemExit(f"{args.output} already holds {len(existing)} scored batch(es); pass --incremental to "
                         "score only new input shards, or choose another --output")
    others = sorted({m.reference_fingerprint[:12] for m in existing if m.reference_fingerprint != fingerprint})
    if others and not args.force_new_reference:
        raise SystemExit(f"{args.output} holds batches scored by reference(s) {others}, not {fingerprint[:12]}; "
                         "pass --force_new_reference to add a batch of this reference beside them")
    counted = (DONE, FAILED) if args.skip_failed_shards else (DONE,)
    recorded = {canonical_path(shard.path): shard for m in existing if m.reference_fingerprint == fingerprint
                for shard in m.input_shards if shard.status in counted}
    identities = shard_identities(shards)
    todo = [shard for shard in identities if not _already_scored(shard, recorded)]
    skipped = [shard[0] for shard in identities if _already_scored(shard, recorded)]
    adopted: dict[str, Any] = {}
    if options is not None and options.output_layout == "sidecar":
        finished = sidecars.resumable_sidecars(args.output, fingerprint, options.scoring())
        for path, size, modified in todo:
            found = finished.get(path)
            if found is not None and (found[1].size_bytes, found[1].modified) == (size, modified):
                adopted[path] = found
    return [shard for shard in todo if shard[0] not in adopted], skipped, adopted


def parse_formats(text: str) -> list[str]:
    formats = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in formats if name not in OUTPUT_FORMATS]
    if not formats or unknown:
        raise SystemExit(f"--output_format {text!r}: choose from {OUTPUT_FORMATS}")
    return formats


def run(argv: Sequence[str] | None = None, test_pipeline: beam.Pipeline | None = None,
        wait: bool = True) -> dict[str, Any]:
    """Build and run the job; returns the run summary (the manifest's counts, batch folder, examples/s).

    With wait=False (a Flex Template launcher) it returns once the job is submitted, with only the batch folder.
    """
    args, beam_args = build_parser().parse_known_args(argv)
    reference_model = check_arguments(args, beam_args)
    reference = reference_model.info  # the workers load the weights
    formats = parse_formats(args.output_format)
    created = datetime.datetime.now(datetime.timezone.utc)
    batch_dir = posixpath.join(args.output, batches.new_batch_name(created.strftime("%Y%m%dT%H%M%SZ")))
    reader = reader_options(args)
    fields = reader["fields"]
    options = Options(
        store_image=args.store_image if args.output_layout == "copied" else "none",
        stored_image_size=args.stored_image_size, input_format=args.input_format,
        max_caption_chars=args.max_caption_chars, min_image_size=args.min_image_size,
        max_image_pixels=args.max_image_pixels, inference_batch_size=args.inference_batch_size,
        output_layout=args.output_layout, key_field=fields.key, image_field=list(fields.image),
        caption_field=list(fields.caption))
    todo, skipped, adopted = plan_batch(args, reference.fingerprint, options)
    if args.clean_unfinished:
        keep = [posixpath.join(args.output, relative) for relative, _ in adopted.values()]
        for path in batches.remove_unfinished(args.output, before=posixpath.basename(batch_dir), keep=keep):
            log.info("removed unfinished or temporary %s", path)
    if skipped:
        log.info("skipping %d input shard(s) already scored by this reference", len(skipped))
    if adopted:
        log.info("resuming: %d input shard(s) have finished sidecars from a run that did not finish (%s); scoring "
                 "the other %d", len(adopted), ", ".join(sorted({info.batch for _, info in adopted.values()})),
                 len(todo))
    if not todo and not adopted:
        log.info("nothing to score: every input shard is in a batch under %s", args.output)
        return {"batch_dir": None, "read": 0, "scored": 0, "dead_letter": {}, "skipped_shards": len(skipped)}

    template = {
        "schema_version": schema.SCHEMA_VERSION, "created": created.isoformat(), "reference": reference,
        "output_formats": formats, "options": options,
    }
    validation = ValidationOptions(args.max_image_pixels, args.min_image_size, args.max_caption_chars)
    handler = DualEncoderHandler(reference_model, args.inference_batch_size, large_model=args.large_model,
                                 model_copies=args.model_copies or None)
    beam_options = PipelineOptions(beam_args if any(a.startswith("--runner") for a in beam_args)
                                   else [*beam_args, "--runner=FnApiRunner"])
    beam_options.view_as(SetupOptions).save_main_session = False

    start = time.perf_counter()
    pipeline = test_pipeline or beam.Pipeline(options=beam_options)
    if args.output_layout == "sidecar":
        build_sidecar_job(pipeline, args, reference_model, handler, validation, batch_dir, template, todo, adopted,
                          formats)
    else:
        build_copied_job(pipeline, args, reference_model, handler, validation, batch_dir, template, todo, formats)
    result = pipeline.run()
    if not wait:
        log.info("submitted: the batch appears in %s when its _MANIFEST.json is written", batch_dir)
        return {"batch_dir": batch_dir}
    result.wait_until_finish()
    seconds = time.perf_counter() - start
    log_counters(result)
    return summarize(batch_dir, seconds)


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


def decoding(args: argparse.Namespace, reference) -> dict[str, Any]:
    """How DecodeAndValidate decodes: JPEGs at the largest size needed (the reference's; the stored size too with
    --store_image=resized), resized for the reference on the decoding threads, two batches ahead."""
    preprocessing = reference.preprocessing
    size = max(preprocessing.size, args.stored_image_size if args.store_image == "resized" else 0)
    return dict(size=size, preprocessing=preprocessing, depth=2 * args.inference_batch_size)


def build_copied_job(pipeline, args, reference_model, handler, validation, batch_dir, template, todo, formats):
    """The copied layout: scored shards holding the examples, a dead letter, the manifest."""
    reference = reference_model.info
    reader = reader_options(args)
    records, read_errors, failed_shards, shard_sizes = pipeline | "ReadCorpus" >> ReadCorpus(
        [path for path, _, _ in todo], reader["format"], reader["fields"], batch_rows=reader["batch_rows"],
        shard_sizes=True)
    valid, invalid = records | "DecodeAndValidate" >> DecodeAndValidate(validation, **decoding(args, reference))
    loss_parameters = pipeline | "ReadLossParameters" >> ReadLossParameters(reference_model)
    rows, non_finite = (valid
                        | "Preprocess" >> Preprocess(reference_model, args.store_image, args.stored_image_size)
                        | "EmbedWithReference" >> EmbedWithReference(handler)
                        | "Score" >> Score(reference.loss, loss_parameters))
    scored_files, scored_rows = rows | "WriteScoredShards" >> WriteScoredShards(batch_dir, formats, reference.width,
                                                                   args.num_output_shards)
    errors = (read_errors, invalid, non_finite) | "AllErrors" >> beam.Flatten()
    dead_letter_files = errors | "WriteDeadLetter" >> WriteDeadLetter(batch_dir)
    # Counted a shard (read) or a written batch (scored) at a time, not per record.
    read = shard_sizes | "SumRead" >> beam.CombineGlobally(sum)
    scored = scored_rows | "SumScored" >> beam.CombineGlobally(sum)
    per_reason = errors | "Reasons" >> beam.Map(lambda error: error.reason) | "PerReason" >> beam.combiners.Count.PerElement()
    ((scored_files, dead_letter_files, failed_shards, read, scored, per_reason, loss_parameters)
     | "WriteManifest" >> WriteManifest(batch_dir, template, todo, args.max_bad_fraction, args.allow_failed_shards))


def build_sidecar_job(pipeline, args, reference_model, handler, validation, batch_dir, template, todo, adopted,
                      formats):
    """The sidecar layout: every stage keeps its errors inline, in their place, so that one fused stage runs from a
    shard's read to its sidecar, written as soon as the shard is done."""
    reference = reference_model.info
    reader = reader_options(args)
    adopted_written = {path: SidecarWritten(path, relative, info.read, info.scored, info.dead_letter)
                       for path, (relative, info) in adopted.items()}
    identities = sorted([*todo, *((path, info.size_bytes, info.modified) for path, (_, info) in adopted.items())])
    loss_parameters = pipeline | "ReadLossParameters" >> ReadLossParameters(reference_model)
    if todo:
        records, _, failed_shards = pipeline | "ReadCorpus" >> ReadCorpus(
            [path for path, _, _ in todo], reader["format"], reader["fields"], batch_rows=reader["batch_rows"],
            errors_inline=True)
        valid, _ = records | "DecodeAndValidate" >> DecodeAndValidate(validation, errors_inline=True,
                                                                      **decoding(args, reference))
        items, _ = (valid
                    | "Preprocess" >> Preprocess(reference_model, "none", args.stored_image_size)
                    | "EmbedWithReference" >> EmbedWithReference(handler)
                    | "Score" >> Score(reference.loss, loss_parameters, errors_inline=True))
        written = items | "WriteSidecars" >> WriteSidecars(batch_dir, reference.width, formats, reference.fingerprint,
                                                           template["options"].scoring(), todo)
    else:
        written = pipeline | "NothingToScore" >> beam.Create([])
        failed_shards = pipeline | "NoFailedShards" >> beam.Create([])
    ((written, failed_shards, loss_parameters)
     | "WriteManifest" >> WriteSidecarManifest(batch_dir, template, identities, adopted_written,
                                               args.max_bad_fraction, args.allow_failed_shards))


def summarize(batch_dir: str, seconds: float) -> dict[str, Any]:
    """The run's counts from its manifest, logged as one summary line."""
    manifest = next((m for m in batches.read_manifests(posixpath.dirname(batch_dir))
                     if m.batch_dir == batch_dir), None)
    if manifest is None:
        raise RuntimeError(f"the job finished but wrote no manifest in {batch_dir}")
    counts = manifest.counts
    summary = {"batch_dir": batch_dir, "read": counts.read, "scored": counts.scored,
               "dead_letter": counts.dead_letter, "seconds": round(seconds, 2),
               "examples_per_second": round(counts.read / max(seconds, 1e-9), 1),
               "shards": len(manifest.shards), "input_shards": counts.shards, "failed_shards": counts.shards_failed,
               "sidecars": len(manifest.sidecars())}
    reasons = ", ".join(f"{reason} {n}" for reason, n in counts.dead_letter.items()) or "none"
    log.info("read %d, scored %d, dead-lettered %d (%s) in %.1f s: %.0f examples/s -> %s", counts.read,
             counts.scored, counts.dead_lettered, reasons, seconds, summary["examples_per_second"], batch_dir)
    return summary


def main(argv: Sequence[str] | None = None, wait: bool = True) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    cli.quiet_logging("--verbose" in argv)
    try:
        summary = run(argv, wait=wait)
    except SystemExit as error:
        if error.code is None or isinstance(error.code, int):
            raise
        print(f"python -m pipelines.score: error: {' '.join(str(error.code).split())}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
