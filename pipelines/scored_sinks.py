"""The scoring job's outputs: scored shards (Parquet and/or TFRecord), the dead letter, and the manifest step.

Each transform writes into one batch folder (see curation/scored_shards.py) and returns the paths it wrote; the
manifest step runs once every file is final and is the only thing that makes a batch visible to readers.
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.pvalue import AsDict, AsList, AsSingleton

from curation import schema, scored_shards


class WriteScoredShards(beam.PTransform):
    """Scored rows -> shards in each output format; returns the PCollection of the file paths written."""

    def __init__(self, batch_dir: str, formats: Sequence[str], embed_dim: int, num_shards: int = 0):
        super().__init__()
        self._prefix = posixpath.join(batch_dir, scored_shards.SCORED_PREFIX)
        self._formats, self._embed_dim, self._num_shards = tuple(formats), embed_dim, num_shards

    def expand(self, rows):
        written = []
        if "parquet" in self._formats:
            written.append(
                rows
                | "BatchRows" >> beam.BatchElements(min_batch_size=64, max_batch_size=2048)
                | "ToArrowTables" >> beam.Map(schema.rows_to_table, self._embed_dim)
                | "WriteParquet" >> beam.io.WriteToParquetBatched(
                    self._prefix, schema.scored_schema(self._embed_dim), file_name_suffix=".parquet",
                    num_shards=self._num_shards))
        if "tfrecord" in self._formats:
            written.append(
                rows
                | "ToTFExamples" >> beam.Map(schema.encode_tfrecord_example)
                | "WriteTFRecord" >> beam.io.WriteToTFRecord(
                    self._prefix, file_name_suffix=".tfrecord", num_shards=self._num_shards))
        return written | "AllScoredFiles" >> beam.Flatten()


class WriteDeadLetter(beam.PTransform):
    """CorpusErrors -> Parquet dead-letter shard(s) in the batch folder; returns the file paths written."""

    def __init__(self, batch_dir: str):
        super().__init__()
        self._prefix = posixpath.join(batch_dir, scored_shards.DEAD_LETTER_PREFIX)

    def expand(self, errors):
        return (errors
                | "ToRows" >> beam.FlatMap(lambda error: schema.dead_letter_rows([error]))
                | "WriteParquet" >> beam.io.WriteToParquet(
                    self._prefix, schema.dead_letter_schema(), file_name_suffix=".parquet", num_shards=1))


class TooManyBadRecords(RuntimeError):
    """More of the records read were dead-lettered than --max_bad_fraction allows."""


def check_bad_fraction(read: int, dead_lettered: int, max_bad_fraction: float, batch_dir: str = "") -> None:
    """Raise TooManyBadRecords, naming both counts, when dead_lettered / read is over max_bad_fraction."""
    if read and dead_lettered / read > max_bad_fraction:
        raise TooManyBadRecords(
            f"{dead_lettered} of {read} records read were dead-lettered ({dead_lettered / read:.1%}), over "
            f"--max_bad_fraction={max_bad_fraction}; the dead letter is in {batch_dir or 'the batch folder'}, "
            "no manifest was written, so the batch will not be read")


class FailedShards(RuntimeError):
    """Input shards could not be read whole, and --allow_failed_shards was not given."""


def input_shard_records(input_shards: list[tuple[str, int, float]], scored_files: list[str],
                        shard_failures: list[Any]) -> list[scored_shards.InputShard]:
    """Each input shard's identity, status and the scored files holding its records (read back from their source
    column)."""
    holders: dict[str, list[str]] = {}
    for path in sorted(scored_files):
        for source in scored_shards.sources_of(path):
            holders.setdefault(source, []).append(posixpath.basename(path))
    failures = {error.source: f"{error.reason}: {error.message}" for error in shard_failures}
    return [scored_shards.InputShard(path, scored_shards.FAILED if path in failures else scored_shards.DONE,
                                     failures.get(path, ""), size, holders.get(path, []), modified)
            for path, size, modified in input_shards]


def _write_manifest(_, scored_files, dead_letter_files, shard_failures, read, scored, dead_letter, loss_parameters, *,
                    batch_dir, template, input_shards, max_bad_fraction, allow_failed_shards):
    if shard_failures and not allow_failed_shards:
        named = "; ".join(f"{error.source} ({error.reason}: {error.message})" for error in shard_failures[:5])
        raise FailedShards(
            f"{len(shard_failures)} of {len(input_shards)} input shards could not be read whole, so no manifest was "
            f"written and none of {batch_dir} will be read: {named}. Fix or remove them and run again with "
            "--incremental, or pass --allow_failed_shards to keep the rest and list them as failed")
    check_bad_fraction(read, sum(dead_letter.values()), max_bad_fraction, batch_dir)
    shards = input_shard_records(input_shards, scored_files, shard_failures)
    failed = sum(shard.status == scored_shards.FAILED for shard in shards)
    reference = dataclasses.replace(template["reference"], temperature=loss_parameters.temperature,
                                    bias=loss_parameters.bias)
    manifest = scored_shards.Manifest(
        **{**template, "reference": reference},
        counts=scored_shards.Counts(read=read, scored=scored, dead_letter=dict(sorted(dead_letter.items())),
                                    shards=len(shards), shards_done=len(shards) - failed, shards_failed=failed),
        input_shards=shards,
        shards=sorted(posixpath.basename(path) for path in scored_files),
        dead_letter_shards=sorted(posixpath.basename(path) for path in dead_letter_files),
    )
    return scored_shards.write_manifest(batch_dir, manifest)


class WriteManifest(beam.PTransform):
    """Once every shard is final, write `_MANIFEST.json` (counts, input shards with their status and outputs, output
    files) atomically; or fail the job instead when an input shard could not be read whole (unless
    `allow_failed_shards`) or when more than `max_bad_fraction` of the records read was dead-lettered.

    `template` holds the manifest's fields known before the run (schema_version, created, reference,
    output_formats, options); `input_shards` the (path, size in bytes, modification time) of every input shard.
    The reference's t and bias come from the one-element `loss_parameters` input (`stages.ReadLossParameters`)."""

    def __init__(self, batch_dir: str, template: dict[str, Any], input_shards: list[tuple[str, int, float]],
                 max_bad_fraction: float = 1.0, allow_failed_shards: bool = False):
        super().__init__()
        self._batch_dir, self._template, self._input_shards = batch_dir, template, input_shards
        self._max_bad_fraction, self._allow_failed_shards = max_bad_fraction, allow_failed_shards

    def expand(self, inputs):
        scored_files, dead_letter_files, shard_failures, read, scored, dead_letter, loss_parameters = inputs
        return (scored_files.pipeline
                | "Once" >> beam.Create([None])
                | "Write" >> beam.Map(_write_manifest, AsList(scored_files), AsList(dead_letter_files),
                                      AsList(shard_failures), AsSingleton(read), AsSingleton(scored),
                                      AsDict(dead_letter), AsSingleton(loss_parameters), batch_dir=self._batch_dir, template=self._template,
                                      input_shards=self._input_shards, max_bad_fraction=self._max_bad_fraction,
                                      allow_failed_shards=self._allow_failed_shards))
