"""Score a web corpus with the reference model: `python -m pipelines.score`.

    python -m pipelines.score --input 'runs/demo/corpus/web/*.tar' --input_format wds \\
        --output runs/demo/scored --reference_checkpoint runs/demo/reference/model

The job, one named transform per stage:

    ReadCorpus → DecodeAndValidate → Preprocess → EmbedWithReference → Score → WriteScoredShards
         └──────────────┴──────────── errors ──────────────────────────┴──→ WriteDeadLetter
                                                          counts, files ──→ WriteManifest

Every record read is either scored or dead-lettered with a reason (read errors, decode and caption rules, and
embeddings that are not finite), so read = scored + dead-lettered, per reason in the manifest's counts.

Each run writes one batch folder under --output (see curation/scored_shards.py) whose `_MANIFEST.json` is written
last; a folder without one is unfinished and never read. `--incremental` scores only the input shards no earlier
batch of the same reference has done. A run that dies (or is killed) is re-run as it was: its folder holds no
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
import json
import logging
import posixpath
import time
from typing import Any, Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
from apache_beam.pvalue import TaggedOutput

from curation import scored_shards
from curation.corpus import (CorpusError, CorpusRecord, add_reader_arguments, match_shards, reader_options,
                             valid_unicode)
from models import checkpoint as model_checkpoint
from models.tokenizer import tokenizer_from_dict
from pipelines.corpus_io import ReadCorpus
from pipelines.scored_sinks import WriteDeadLetter, WriteManifest, WriteScoredShards
from pipelines.jax_inference import DualEncoderHandler, Embeddings, PreparedExample
from pipelines.validation import ValidationOptions, ValidExample, decode_and_validate, encode_jpeg, resize_pixels

log = logging.getLogger("pipelines.score")
NAMESPACE = "score"
STORE_IMAGE = ("as_stored", "resized", "none")
NON_FINITE_EMBEDDING = "non_finite_embedding"  # dead-letter reason of the "embed" stage: NaN or Inf from the model


def _flag(text: str) -> bool:
    """A boolean flag that also takes a value (`--incremental`, `--incremental=true`), as Flex Templates pass it."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--input", required=True, action="append",
                        help="glob(s) of input shards (local or gs://), comma-separated or repeated")
    add_reader_arguments(parser)
    parser.add_argument("--output", required=True, help="output directory; each run adds a batch folder to it")
    parser.add_argument("--reference_checkpoint", required=True, help="model checkpoint of the reference (#models)")
    parser.add_argument("--output_format", default="parquet",
                        help="comma-separated: parquet, tfrecord (default parquet)")
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
    parser.add_argument("--max_bad_fraction", type=_fraction, default=1.0,
                        help="fail, without a manifest, when more than this fraction of the records read is "
                             "dead-lettered (default 1: never)")
    parser.add_argument("--clean_unfinished", type=_flag, nargs="?", const=True, default=False,
                        help="first delete the unfinished batch folders of earlier runs under --output (only when "
                             "no other run is writing to it)")
    return parser


# --- stages -------------------------------------------------------------------------------------------------------


class _ValidateFn(beam.DoFn):
    def __init__(self, options: ValidationOptions):
        self._options = options

    def process(self, record: CorpusRecord) -> Iterator[ValidExample | TaggedOutput]:
        result = decode_and_validate(record, self._options)
        if isinstance(result, CorpusError):
            Metrics.counter(NAMESPACE, f"dead_letter_{result.reason}").inc()
            yield TaggedOutput(DecodeAndValidate.DEAD_LETTER, result)
        else:
            yield result


class DecodeAndValidate(beam.PTransform):
    """CorpusRecord -> ValidExample (main) | CorpusError (tagged `dead_letter`), one counter per reason."""

    DEAD_LETTER = "dead_letter"

    def __init__(self, options: ValidationOptions):
        super().__init__()
        self._options = options

    def expand(self, records):
        return records | "Validate" >> beam.ParDo(_ValidateFn(self._options)).with_outputs(
            self.DEAD_LETTER, main="valid")


class _PreprocessFn(beam.DoFn):
    def __init__(self, checkpoint_dir: str, store_image: str, stored_image_size: int):
        self._checkpoint_dir, self._store_image, self._stored_image_size = checkpoint_dir, store_image, stored_image_size

    def setup(self) -> None:
        meta = model_checkpoint.read_meta(self._checkpoint_dir)  # small JSON: config and tokenizer, no weights
        self._tokenizer = tokenizer_from_dict(meta["tokenizer"])
        self._image_size, self._text_length = meta["model"]["image_size"], meta["model"]["text_length"]

    def process(self, example: ValidExample) -> Iterator[tuple[str, PreparedExample]]:
        if self._store_image == "as_stored":
            image = example.image
        elif self._store_image == "resized":
            image = encode_jpeg(example.pixels, self._stored_image_size)
        else:
            image = b""
        yield example.key, PreparedExample(
            example.key, example.source, example.caption, image, resize_pixels(example.pixels, self._image_size),
            self._tokenizer.encode(example.caption, self._text_length), example.metadata)


class Preprocess(beam.PTransform):
    """ValidExample -> (key, PreparedExample): pixels at the model's size, token ids, the image bytes to store."""

    def __init__(self, checkpoint_dir: str, store_image: str, stored_image_size: int):
        super().__init__()
        self._fn = _PreprocessFn(checkpoint_dir, store_image, stored_image_size)

    def expand(self, valid):
        return valid | "ResizeAndTokenize" >> beam.ParDo(self._fn)


class EmbedWithReference(beam.PTransform):
    """(key, PreparedExample) -> (key, PredictionResult(example, Embeddings)) through Beam's RunInference."""

    def __init__(self, handler: DualEncoderHandler):
        super().__init__()
        self._handler = handler

    def expand(self, prepared):
        return prepared | "RunInference" >> RunInference(KeyedModelHandler(self._handler))


def score_row(example: PreparedExample, embeddings: Embeddings, t: float, c: float) -> dict[str, Any]:
    """A scored-shard row. Cosine, logit and loss are computed from the stored float16 embeddings, so a reader
    recomputing them from the shard gets the stored values."""
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is caught by score_or_dead_letter
        zimg = embeddings.image.astype(np.float16)
        ztxt = embeddings.text.astype(np.float16)
        cosine = np.float32(np.dot(zimg.astype(np.float32), ztxt.astype(np.float32)))
        logit = np.float32(t * cosine + c)
        loss = np.float32(np.logaddexp(0.0, -logit))  # softplus(−z·logit) with z = +1
    return {
        "key": example.key, "caption": example.caption, "image": example.image, "source": example.source,
        "metadata": json.dumps(example.metadata, sort_keys=True, default=str),
        "ref_image_embedding": zimg, "ref_text_embedding": ztxt,
        "ref_cosine": float(cosine), "ref_logit": float(logit), "ref_loss": float(loss),
    }


def score_or_dead_letter(example: PreparedExample, embeddings: Embeddings, t: float,
                         c: float) -> dict[str, Any] | CorpusError:
    """The scored row, or a CorpusError (stage "embed") when an embedding or score is NaN or infinite: a row like
    that would poison every loss the trainer computes from it."""
    row = score_row(example, embeddings, t, c)
    bad = [name for name in ("ref_image_embedding", "ref_text_embedding", "ref_cosine", "ref_logit", "ref_loss")
           if not np.isfinite(row[name]).all()]
    if not bad:
        return row
    return CorpusError(key=example.key, source=example.source, reason=NON_FINITE_EMBEDDING, stage="embed",
                       message=f"not finite: {', '.join(bad)}")


class _ScoreFn(beam.DoFn):
    def __init__(self, t: float, c: float):
        self._t, self._c = t, c

    def process(self, element) -> Iterator[dict[str, Any] | TaggedOutput]:
        _, result = element
        scored = score_or_dead_letter(result.example, result.inference, self._t, self._c)
        if isinstance(scored, CorpusError):
            Metrics.counter(NAMESPACE, f"dead_letter_{scored.reason}").inc()
            yield TaggedOutput(Score.DEAD_LETTER, scored)
        else:
            yield scored


class Score(beam.PTransform):
    """(key, PredictionResult) -> scored row dicts (the columns of curation.scored_shards.SCORED_COLUMNS) (main) |
    CorpusError (tagged `dead_letter`: reason non_finite_embedding)."""

    DEAD_LETTER = "dead_letter"

    def __init__(self, t: float, c: float):
        super().__init__()
        self._t, self._c = t, c

    def expand(self, embedded):
        return embedded | "EasyReferenceScore" >> beam.ParDo(_ScoreFn(self._t, self._c)).with_outputs(
            self.DEAD_LETTER, main="scored")


def _count(pcoll, label: str):
    return pcoll | label >> beam.combiners.Count.Globally()


# --- the job --------------------------------------------------------------------------------------------------------


def plan_batch(args: argparse.Namespace, fingerprint: str) -> tuple[list[str], list[str]]:
    """(input shards to score now, input shards skipped as already scored). Refuses to mix references or to
    re-score into an output that already holds batches unless --incremental."""
    shards = match_shards([pattern for value in args.input for pattern in value.split(",") if pattern])
    not_utf8 = [ascii(shard) for shard in shards if valid_unicode(shard) != shard]
    if not_utf8:  # a local file name; Beam carries paths as UTF-8 text and would fail on it mid-job
        raise SystemExit(f"input shard paths must be UTF-8; rename {', '.join(not_utf8[:5])}")
    existing = scored_shards.read_manifests(args.output)
    if existing and not args.incremental:
        raise SystemExit(f"{args.output} already holds {len(existing)} scored batch(es); pass --incremental to "
                         "score only new input shards, or choose another --output")
    others = sorted({m.reference_fingerprint[:12] for m in existing if m.reference_fingerprint != fingerprint})
    if others and not args.force_new_reference:
        raise SystemExit(f"{args.output} holds batches scored by reference(s) {others}, not {fingerprint[:12]}; "
                         "pass --force_new_reference to add a batch of this reference beside them")
    done = {shard for m in existing if m.reference_fingerprint == fingerprint for shard in m.input_shards}
    return [shard for shard in shards if shard not in done], [shard for shard in shards if shard in done]


def parse_formats(text: str) -> list[str]:
    formats = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in formats if name not in scored_shards.OUTPUT_FORMATS]
    if not formats or unknown:
        raise SystemExit(f"--output_format {text!r}: choose from {scored_shards.OUTPUT_FORMATS}")
    return formats


def run(argv: Sequence[str] | None = None, test_pipeline: beam.Pipeline | None = None,
        wait: bool = True) -> dict[str, Any]:
    """Build and run the job; returns the run summary (the manifest's counts, batch folder, examples/s).

    With wait=False (a Flex Template launcher) it returns once the job is submitted, with only the batch folder.
    """
    args, beam_args = build_parser().parse_known_args(argv)
    formats = parse_formats(args.output_format)
    created = datetime.datetime.now(datetime.timezone.utc)
    batch_dir = posixpath.join(args.output, scored_shards.new_batch_name(created.strftime("%Y%m%dT%H%M%SZ")))
    reference = model_checkpoint.restore(args.reference_checkpoint)
    t = float(np.exp(np.asarray(reference.params["log_temperature"])[0]))
    c = float(np.asarray(reference.params["bias"])[0])
    if not (np.isfinite(t) and np.isfinite(c)):
        raise SystemExit(f"reference {args.reference_checkpoint} has a non-finite temperature or bias (t={t}, "
                         f"c={c}): every score would be NaN")
    if args.clean_unfinished:
        for path in scored_shards.remove_unfinished(args.output, before=posixpath.basename(batch_dir)):
            log.info("removed unfinished or temporary %s", path)
    todo, skipped = plan_batch(args, reference.fingerprint)
    if skipped:
        log.info("skipping %d input shard(s) already scored by this reference", len(skipped))
    if not todo:
        log.info("nothing to score: every input shard is in a batch under %s", args.output)
        return {"batch_dir": None, "read": 0, "scored": 0, "dead_letter": {}, "skipped_shards": len(skipped)}

    template = {
        "schema_version": scored_shards.SCHEMA_VERSION, "reference_fingerprint": reference.fingerprint,
        "reference": {"t": t, "c": c, "checkpoint": args.reference_checkpoint, "model": reference.config.to_dict()},
        "input_shards": todo, "output_formats": formats, "created": created.isoformat(),
        "options": {"store_image": args.store_image, "stored_image_size": args.stored_image_size,
                    "input_format": args.input_format, "max_caption_chars": args.max_caption_chars,
                    "min_image_size": args.min_image_size, "max_image_pixels": args.max_image_pixels,
                    # Embeddings are byte-identical between runs at the same inference batch size (see
                    # pipelines/jax_inference.py); another size changes some by a float16 rounding step.
                    "inference_batch_size": args.inference_batch_size},
    }
    del reference  # the workers restore it themselves; nothing of it goes into the graph
    validation = ValidationOptions(args.max_image_pixels, args.min_image_size, args.max_caption_chars)
    handler = DualEncoderHandler(args.reference_checkpoint, args.inference_batch_size, large_model=args.large_model)
    options = PipelineOptions(beam_args if any(a.startswith("--runner") for a in beam_args)
                              else [*beam_args, "--runner=FnApiRunner"])
    options.view_as(SetupOptions).save_main_session = False
    reader = reader_options(args)

    start = time.perf_counter()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    records, read_errors = pipeline | "ReadCorpus" >> ReadCorpus(todo, reader["format"], reader["fields"],
                                                                  batch_rows=reader["batch_rows"])
    valid, invalid = records | "DecodeAndValidate" >> DecodeAndValidate(validation)
    rows, non_finite = (valid
                        | "Preprocess" >> Preprocess(args.reference_checkpoint, args.store_image,
                                                     args.stored_image_size)
                        | "EmbedWithReference" >> EmbedWithReference(handler)
                        | "Score" >> Score(t, c))
    scored_files = rows | "WriteScoredShards" >> WriteScoredShards(batch_dir, formats, template["reference"]["model"]
                                                                   ["embed_dim"], args.num_output_shards)
    errors = (read_errors, invalid, non_finite) | "AllErrors" >> beam.Flatten()
    dead_letter_files = errors | "WriteDeadLetter" >> WriteDeadLetter(batch_dir)
    read = ((_count(records, "CountRecords"), _count(read_errors, "CountReadErrors"))
            | "ReadItems" >> beam.Flatten() | "SumRead" >> beam.CombineGlobally(sum))
    per_reason = errors | "Reasons" >> beam.Map(lambda error: error.reason) | "PerReason" >> beam.combiners.Count.PerElement()
    (scored_files, dead_letter_files, read, _count(rows, "CountScored"), per_reason) | "WriteManifest" >> WriteManifest(
        batch_dir, template, args.max_bad_fraction)
    result = pipeline.run()
    if not wait:
        log.info("submitted: the batch appears in %s when its _MANIFEST.json is written", batch_dir)
        return {"batch_dir": batch_dir}
    result.wait_until_finish()
    seconds = time.perf_counter() - start
    return summarize(batch_dir, seconds)


def summarize(batch_dir: str, seconds: float) -> dict[str, Any]:
    """The run's counts from its manifest, logged as one summary line."""
    manifest = next((m for m in scored_shards.read_manifests(posixpath.dirname(batch_dir))
                     if m.batch_dir == batch_dir), None)
    if manifest is None:
        raise RuntimeError(f"the job finished but wrote no manifest in {batch_dir}")
    counts = manifest.counts
    summary = {"batch_dir": batch_dir, "read": counts["read"], "scored": counts["scored"],
               "dead_letter": counts["dead_letter"], "seconds": round(seconds, 2),
               "examples_per_second": round(counts["read"] / max(seconds, 1e-9), 1),
               "shards": len(manifest.shards), "input_shards": len(manifest.input_shards)}
    reasons = ", ".join(f"{reason} {n}" for reason, n in counts["dead_letter"].items()) or "none"
    log.info("read %d, scored %d, dead-lettered %d (%s) in %.1f s: %.0f examples/s -> %s", counts["read"],
             counts["scored"], sum(counts["dead_letter"].values()), reasons, seconds,
             summary["examples_per_second"], batch_dir)
    return summary


def main(argv: Sequence[str] | None = None, wait: bool = True) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    summary = run(argv, wait=wait)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
