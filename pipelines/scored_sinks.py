"""The scoring job's outputs: scored shards (Parquet and/or TFRecord), the dead letter, and the manifest step.

Each transform writes into one batch folder (see curation/shared/manifest.py) and returns the paths it wrote; the
manifest step runs once every file is final and is the only thing that makes a batch visible to readers.
"""

from __future__ import annotations

import dataclasses
import functools
import posixpath
from typing import Any, Iterator, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsDict, AsList, AsSingleton

from curation.shared import batches, schema, scored_set, sidecars, tfrecord
from curation.shared.errors import CorpusError
from curation.shared.manifest import (
    DEAD_LETTER_PREFIX,
    DONE,
    FAILED,
    PARQUET_COMPRESSION,
    ROW_GROUP_BYTES,
    SCORED_PREFIX,
    SIDECAR_DIR,
    Counts,
    InputShard,
    Manifest,
)
from pipelines import stages


def row_bytes(row: dict[str, Any], embed_dim: int) -> int:
    """About how many bytes a scored row takes in memory (to size the row groups)."""
    return len(row[schema.IMAGE]) + len(row[schema.CAPTION]) + len(row[schema.METADATA]) + 4 * embed_dim + 64


class WriteScoredShards(beam.PTransform):
    """Scored rows -> shards in each output format; returns (the PCollection of the file paths written, one of row
    counts that sums to the rows written: one element per written batch, not per row)."""

    def __init__(self, batch_dir: str, formats: Sequence[str], embed_dim: int, num_shards: int = 0):
        super().__init__()
        self._prefix = posixpath.join(batch_dir, SCORED_PREFIX)
        self._formats, self._embed_dim, self._num_shards = tuple(formats), embed_dim, num_shards

    def expand(self, rows):
        written = []
        if "parquet" in self._formats:
            # A table per ~64 MB of rows: each becomes one row group (zstd), large enough for fast scans.
            tables = (rows
                      | "BatchRows" >> beam.BatchElements(
                          min_batch_size=ROW_GROUP_BYTES, max_batch_size=ROW_GROUP_BYTES,
                          element_size_fn=functools.partial(row_bytes, embed_dim=self._embed_dim))
                      | "ToArrowTables" >> beam.Map(schema.rows_to_table, self._embed_dim))
            written.append(tables | "WriteParquet" >> beam.io.WriteToParquetBatched(
                self._prefix, schema.scored_schema(self._embed_dim), codec=PARQUET_COMPRESSION,
                file_name_suffix=".parquet", num_shards=self._num_shards))
            counts = tables | "CountRows" >> beam.Map(lambda table: table.num_rows)
        if "tfrecord" in self._formats:
            written.append(
                rows
                | "ToTFExamples" >> beam.Map(schema.encode_tfrecord_example)
                | "WriteTFRecord" >> beam.io.WriteToTFRecord(
                    self._prefix, file_name_suffix=".tfrecord", num_shards=self._num_shards))
            if "parquet" not in self._formats:
                counts = rows | "CountRows" >> beam.combiners.Count.Globally()
        return written | "AllScoredFiles" >> beam.Flatten(), counts


def sidecar_row(row: dict[str, Any] | CorpusError) -> dict[str, Any]:
    """A scored row or a dead-lettered item as a sidecar row (`schema.SIDECAR_COLUMNS`)."""
    if isinstance(row, CorpusError):
        return {schema.KEY: row.key, schema.STAGE: row.stage, schema.REASON: row.reason, schema.MESSAGE: row.message}
    return {name: row[name] for name in schema.SIDECAR_NAMES if name in row}


@dataclasses.dataclass(frozen=True)
class SidecarWritten:
    """What the sidecar writer reports of one input shard it wrote the sidecar of."""

    input_shard: str
    sidecar: str  # relative to the output folder
    read: int
    scored: int
    dead_letter: dict[str, int]


class _WriteSidecarsFn(beam.DoFn):
    """Collects each input shard's items as they come and writes its sidecar as soon as it has them all (every
    item knows how many its shard has), sorted by place. All items of a shard are in one bundle: the shard is one
    element of ReadCorpus, and everything from it to here runs fused in that bundle (no Flatten, no shuffle)."""

    def __init__(self, batch_dir: str, embed_dim: int, formats: Sequence[str], fingerprint: str,
                 scoring: dict[str, Any], identities: dict[str, tuple[int, float]]):
        self._batch_dir, self._embed_dim, self._formats = batch_dir, embed_dim, tuple(formats)
        self._fingerprint, self._scoring, self._identities = fingerprint, scoring, identities
        self._written = Metrics.counter(stages.NAMESPACE, "sidecars_written")

    def start_bundle(self) -> None:
        self._pending: dict[str, dict[int, Any]] = {}

    def process(self, element) -> Iterator[SidecarWritten]:
        item = stages.placed(element)
        rows = self._pending.setdefault(item.source, {})
        rows[item.index] = item.row
        if len(rows) == item.shard_items:
            yield self._write(item.source, self._pending.pop(item.source))

    def finish_bundle(self) -> None:
        if self._pending:
            partial = ", ".join(f"{source} ({len(rows)} items)" for source, rows in list(self._pending.items())[:3])
            raise RuntimeError(f"the runner split an input shard's items across bundles ({partial}): the sidecar "
                               "layout needs the stages from ReadCorpus on fused; use --output_layout copied")

    def _write(self, source: str, rows: dict[int, Any]) -> SidecarWritten:
        ordered = [sidecar_row(rows[index]) for index in range(len(rows))]
        errors = [row for row in rows.values() if isinstance(row, CorpusError)]
        dead_letter: dict[str, int] = {}
        for error in errors:
            dead_letter[error.reason] = dead_letter.get(error.reason, 0) + 1
        name = sidecars.sidecar_name(source)
        path = posixpath.join(self._batch_dir, SIDECAR_DIR, f"{name}.parquet")
        size, modified = self._identities.get(source, (-1, -1.0))
        info = sidecars.SidecarInfo(source, size, modified, self._fingerprint, self._scoring, len(ordered),
                                         len(ordered) - len(errors), dict(sorted(dead_letter.items())),
                                         posixpath.basename(self._batch_dir))
        if "tfrecord" in self._formats:  # first: the Parquet sidecar is the one that makes the shard done
            def frames(f):
                for row in ordered:
                    tfrecord.write_frame(f, schema.encode_sidecar_example(row))

            batches.write_atomically(posixpath.join(posixpath.dirname(path), f"{name}.tfrecord"), frames)
        sidecars.write_sidecar(path, schema.sidecar_table(ordered, self._embed_dim), info)
        self._written.inc()
        output = posixpath.dirname(self._batch_dir.rstrip("/"))
        return SidecarWritten(source, path[len(output) + 1:], info.read, info.scored, info.dead_letter)


class WriteSidecars(beam.PTransform):
    """The sidecar layout's sink: scored `Placed` rows and inline CorpusErrors -> one sidecar per input shard in
    `batch_dir/sidecars/` (Parquet; TFRecord beside it when asked), each written atomically as soon as its shard
    is complete; returns a `SidecarWritten` per shard."""

    def __init__(self, batch_dir: str, embed_dim: int, formats: Sequence[str], fingerprint: str,
                 scoring: dict[str, Any], input_shards: list[tuple[str, int, float]]):
        super().__init__()
        identities = {path: (size, modified) for path, size, modified in input_shards}
        self._fn = _WriteSidecarsFn(batch_dir, embed_dim, formats, fingerprint, scoring, identities)

    def expand(self, items):
        return items | "WriteEachShard" >> beam.ParDo(self._fn)


class WriteDeadLetter(beam.PTransform):
    """CorpusErrors -> Parquet dead-letter shard(s) in the batch folder; returns the file paths written."""

    def __init__(self, batch_dir: str):
        super().__init__()
        self._prefix = posixpath.join(batch_dir, DEAD_LETTER_PREFIX)

    def expand(self, errors):
        return (errors
                | "ToRows" >> beam.FlatMap(lambda error: schema.dead_letter_rows([error]))
                | "WriteParquet" >> beam.io.WriteToParquet(
                    self._prefix, schema.dead_letter_schema(), codec=PARQUET_COMPRESSION,
                    file_name_suffix=".parquet", num_shards=1))


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
                        shard_failures: list[Any]) -> list[InputShard]:
    """Each input shard's identity, status and the scored files holding its records (read back from their source
    column)."""
    holders: dict[str, list[str]] = {}
    for path in sorted(scored_files):
        for source in scored_set.sources_of(path):
            holders.setdefault(source, []).append(posixpath.basename(path))
    failures = {error.source: f"{error.reason}: {error.message}" for error in shard_failures}
    return [InputShard(path, FAILED if path in failures else DONE,
                                     failures.get(path, ""), size, holders.get(path, []), modified)
            for path, size, modified in input_shards]


def _refuse_failed_shards(shard_failures: list[Any], input_shards: list, batch_dir: str,
                          allow_failed_shards: bool) -> None:
    if shard_failures and not allow_failed_shards:
        named = "; ".join(f"{error.source} ({error.reason}: {error.message})" for error in shard_failures[:5])
        raise FailedShards(
            f"{len(shard_failures)} of {len(input_shards)} input shards could not be read whole, so no manifest was "
            f"written and none of {batch_dir} will be read: {named}. Fix or remove them and run again with "
            "--incremental, or pass --allow_failed_shards to keep the rest and list them as failed")


def _finish_manifest(batch_dir: str, template: dict[str, Any], shards: list[InputShard], read: int,
                     scored: int, dead_letter: dict[str, int], max_bad_fraction: float, loss_parameters,
                     files: list[str], dead_letter_files: list[str]) -> str:
    check_bad_fraction(read, sum(dead_letter.values()), max_bad_fraction, batch_dir)
    failed = sum(shard.status == FAILED for shard in shards)
    reference = dataclasses.replace(template["reference"], temperature=loss_parameters.temperature,
                                    bias=loss_parameters.bias)
    manifest = Manifest(
        **{**template, "reference": reference},
        counts=Counts(read=read, scored=scored, dead_letter=dict(sorted(dead_letter.items())),
                                    shards=len(shards), shards_done=len(shards) - failed, shards_failed=failed),
        input_shards=shards,
        shards=sorted(posixpath.basename(path) for path in files),
        dead_letter_shards=sorted(posixpath.basename(path) for path in dead_letter_files),
    )
    return batches.write_manifest(batch_dir, manifest)


def _write_manifest(_, scored_files, dead_letter_files, shard_failures, read, scored, dead_letter, loss_parameters, *,
                    batch_dir, template, input_shards, max_bad_fraction, allow_failed_shards):
    _refuse_failed_shards(shard_failures, input_shards, batch_dir, allow_failed_shards)
    shards = input_shard_records(input_shards, scored_files, shard_failures)
    return _finish_manifest(batch_dir, template, shards, read, scored, dict(dead_letter), max_bad_fraction,
                            loss_parameters, scored_files, dead_letter_files)


def _write_sidecar_manifest(_, written, shard_failures, loss_parameters, *, batch_dir, template, input_shards,
                            adopted, max_bad_fraction, allow_failed_shards):
    _refuse_failed_shards(shard_failures, input_shards, batch_dir, allow_failed_shards)
    failures = {error.source: f"{error.reason}: {error.message}" for error in shard_failures}
    by_shard = {summary.input_shard: summary for summary in written}
    shards, read, scored, dead_letter = [], 0, 0, {}
    for path, size, modified in input_shards:
        if path in failures:
            shards.append(InputShard(path, FAILED, failures[path], size, [], modified))
            continue
        summary = by_shard.get(path) or adopted.get(path)  # none: a shard without a single item
        shards.append(InputShard(path, DONE, "", size, [], modified,
                                               summary.sidecar if summary else ""))
        if summary:
            read, scored = read + summary.read, scored + summary.scored
            for reason, count in summary.dead_letter.items():
                dead_letter[reason] = dead_letter.get(reason, 0) + count
    return _finish_manifest(batch_dir, template, shards, read, scored, dead_letter, max_bad_fraction,
                            loss_parameters, [], [])


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
                                      AsDict(dead_letter), AsSingleton(loss_parameters), batch_dir=self._batch_dir,
                                      template=self._template, input_shards=self._input_shards,
                                      max_bad_fraction=self._max_bad_fraction,
                                      allow_failed_shards=self._allow_failed_shards))


class WriteSidecarManifest(beam.PTransform):
    """The sidecar layout's manifest step: once every sidecar is written, `_MANIFEST.json` mapping each input shard
    to its sidecar, with the counts summed from them; or the job fails, as `WriteManifest` does. `adopted` maps the
    input shards whose finished sidecars an earlier run left (a resumed run) to their `SidecarWritten`: they are
    listed, and counted, as this batch's."""

    def __init__(self, batch_dir: str, template: dict[str, Any], input_shards: list[tuple[str, int, float]],
                 adopted: dict[str, SidecarWritten], max_bad_fraction: float = 1.0, allow_failed_shards: bool = False):
        super().__init__()
        self._kwargs = dict(batch_dir=batch_dir, template=template, input_shards=input_shards, adopted=adopted,
                            max_bad_fraction=max_bad_fraction, allow_failed_shards=allow_failed_shards)

    def expand(self, inputs):
        written, shard_failures, loss_parameters = inputs
        return (written.pipeline
                | "Once" >> beam.Create([None])
                | "Write" >> beam.Map(_write_sidecar_manifest, AsList(written), AsList(shard_failures),
                                      AsSingleton(loss_parameters), **self._kwargs))
