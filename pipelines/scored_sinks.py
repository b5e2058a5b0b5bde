"""The scoring job's outputs: scored shards (Parquet and/or TFRecord), score sidecars, and the dead letter.

Each transform writes into one batch folder (see curation/shared/manifest.py) and returns the paths it wrote; the
manifest step (`pipelines/manifest_sink.py`) runs once every file is final and makes the batch visible to readers.
"""

from __future__ import annotations

import dataclasses
import functools
import posixpath
from typing import Any, Iterator, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from curation.shared import batches, schema, sidecars, tfrecord
from curation.shared.errors import CorpusError
from curation.shared.manifest import (
    DEAD_LETTER_PREFIX,
    PARQUET_COMPRESSION,
    ROW_GROUP_BYTES,
    SCORED_PREFIX,
    SIDECAR_DIR,
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
            tables = (
                rows
                | "BatchRows"
                >> beam.BatchElements(
                    min_batch_size=ROW_GROUP_BYTES,
                    max_batch_size=ROW_GROUP_BYTES,
                    element_size_fn=functools.partial(row_bytes, embed_dim=self._embed_dim),
                )
                | "ToArrowTables" >> beam.Map(schema.rows_to_table, self._embed_dim)
            )
            written.append(
                tables
                | "WriteParquet"
                >> beam.io.WriteToParquetBatched(
                    self._prefix,
                    schema.scored_schema(self._embed_dim),
                    codec=PARQUET_COMPRESSION,
                    file_name_suffix=".parquet",
                    num_shards=self._num_shards,
                )
            )
            counts = tables | "CountRows" >> beam.Map(lambda table: table.num_rows)
        if "tfrecord" in self._formats:
            written.append(
                rows
                | "ToTFExamples" >> beam.Map(schema.encode_tfrecord_example)
                | "WriteTFRecord"
                >> beam.io.WriteToTFRecord(self._prefix, file_name_suffix=".tfrecord", num_shards=self._num_shards)
            )
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

    def __init__(
        self,
        batch_dir: str,
        embed_dim: int,
        formats: Sequence[str],
        fingerprint: str,
        scoring: dict[str, Any],
        identities: dict[str, tuple[int, float]],
    ):
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
            raise RuntimeError(
                f"the runner split an input shard's items across bundles ({partial}): the sidecar "
                "layout needs the stages from ReadCorpus on fused; use --output_layout copied"
            )

    def _write(self, source: str, rows: dict[int, Any]) -> SidecarWritten:
        ordered = [sidecar_row(rows[index]) for index in range(len(rows))]
        errors = [row for row in rows.values() if isinstance(row, CorpusError)]
        dead_letter: dict[str, int] = {}
        for error in errors:
            dead_letter[error.reason] = dead_letter.get(error.reason, 0) + 1
        name = sidecars.sidecar_name(source)
        path = posixpath.join(self._batch_dir, SIDECAR_DIR, f"{name}.parquet")
        size, modified = self._identities.get(source, (-1, -1.0))
        info = sidecars.SidecarInfo(
            source,
            size,
            modified,
            self._fingerprint,
            self._scoring,
            len(ordered),
            len(ordered) - len(errors),
            dict(sorted(dead_letter.items())),
            posixpath.basename(self._batch_dir),
            schema.SCHEMA_VERSION,
        )
        if "tfrecord" in self._formats:  # first: the Parquet sidecar is the one that makes the shard done

            def frames(f):
                for row in ordered:
                    tfrecord.write_frame(f, schema.encode_sidecar_example(row))

            batches.write_atomically(posixpath.join(posixpath.dirname(path), f"{name}.tfrecord"), frames)
        sidecars.write_sidecar(path, schema.sidecar_table(ordered, self._embed_dim), info)
        self._written.inc()
        output = posixpath.dirname(self._batch_dir.rstrip("/"))
        return SidecarWritten(source, path[len(output) + 1 :], info.read, info.scored, info.dead_letter)


class WriteSidecars(beam.PTransform):
    """The sidecar layout's sink: scored `Placed` rows and inline CorpusErrors -> one sidecar per input shard in
    `batch_dir/sidecars/` (Parquet; TFRecord beside it when asked), each written atomically as soon as its shard
    is complete; returns a `SidecarWritten` per shard."""

    def __init__(
        self,
        batch_dir: str,
        embed_dim: int,
        formats: Sequence[str],
        fingerprint: str,
        scoring: dict[str, Any],
        input_shards: list[tuple[str, int, float]],
    ):
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
        return (
            errors
            | "ToRows" >> beam.FlatMap(lambda error: schema.dead_letter_rows([error]))
            | "WriteParquet"
            >> beam.io.WriteToParquet(
                self._prefix,
                schema.dead_letter_schema(),
                codec=PARQUET_COMPRESSION,
                file_name_suffix=".parquet",
                num_shards=1,
            )
        )
