"""The scoring job's outputs: scored shards (Parquet and/or TFRecord), the dead letter, and the manifest step.

Each transform writes into one batch folder (see curation/scored_shards.py) and returns the paths it wrote; the
manifest step runs once every file is final and is the only thing that makes a batch visible to readers.
"""

from __future__ import annotations

import posixpath
from typing import Any, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.pvalue import AsDict, AsList, AsSingleton

from curation import scored_shards
from curation.corpus import CorpusError


def _rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    columns = {name: [row[name] for row in rows] for name in schema.names}
    for name in ("ref_image_embedding", "ref_text_embedding"):
        flat = pa.array(np.concatenate(columns[name]), pa.float16())
        columns[name] = pa.FixedSizeListArray.from_arrays(flat, schema.field(name).type.list_size)
    return pa.Table.from_pydict(columns, schema=schema)


class WriteScoredShards(beam.PTransform):
    """Scored rows -> shards in each output format; returns the PCollection of the file paths written."""

    def __init__(self, batch_dir: str, formats: Sequence[str], embed_dim: int, num_shards: int = 0):
        super().__init__()
        self._prefix = posixpath.join(batch_dir, scored_shards.SCORED_PREFIX)
        self._formats, self._embed_dim, self._num_shards = tuple(formats), embed_dim, num_shards

    def expand(self, rows):
        written = []
        if "parquet" in self._formats:
            schema = scored_shards.scored_schema(self._embed_dim)
            written.append(
                rows
                | "BatchRows" >> beam.BatchElements(min_batch_size=64, max_batch_size=2048)
                | "ToArrowTables" >> beam.Map(_rows_to_table, schema)
                | "WriteParquet" >> beam.io.WriteToParquetBatched(
                    self._prefix, schema, file_name_suffix=".parquet", num_shards=self._num_shards))
        if "tfrecord" in self._formats:
            written.append(
                rows
                | "ToTFExamples" >> beam.Map(scored_shards.encode_tfrecord_example)
                | "WriteTFRecord" >> beam.io.WriteToTFRecord(
                    self._prefix, file_name_suffix=".tfrecord", num_shards=self._num_shards))
        return written | "AllScoredFiles" >> beam.Flatten()


def dead_letter_row(error: CorpusError) -> dict[str, str]:
    return {"key": error.key, "source": error.source, "stage": error.stage, "reason": error.reason,
            "message": error.message}


class WriteDeadLetter(beam.PTransform):
    """CorpusErrors -> Parquet dead-letter shard(s) in the batch folder; returns the file paths written."""

    def __init__(self, batch_dir: str):
        super().__init__()
        self._prefix = posixpath.join(batch_dir, scored_shards.DEAD_LETTER_PREFIX)

    def expand(self, errors):
        return (errors
                | "ToRows" >> beam.Map(dead_letter_row)
                | "WriteParquet" >> beam.io.WriteToParquet(
                    self._prefix, scored_shards.DEAD_LETTER_SCHEMA, file_name_suffix=".parquet", num_shards=1))


class TooManyBadRecords(RuntimeError):
    """More of the records read were dead-lettered than --max_bad_fraction allows."""


def check_bad_fraction(read: int, dead_lettered: int, max_bad_fraction: float, batch_dir: str = "") -> None:
    """Raise TooManyBadRecords, naming both counts, when dead_lettered / read is over max_bad_fraction."""
    if read and dead_lettered / read > max_bad_fraction:
        raise TooManyBadRecords(
            f"{dead_lettered} of {read} records read were dead-lettered ({dead_lettered / read:.1%}), over "
            f"--max_bad_fraction={max_bad_fraction}; the dead letter is in {batch_dir or 'the batch folder'}, "
            "no manifest was written, so the batch will not be read")


def _write_manifest(_, scored_files, dead_letter_files, read, scored, dead_letter, *, batch_dir, template,
                    max_bad_fraction):
    check_bad_fraction(read, sum(dead_letter.values()), max_bad_fraction, batch_dir)
    manifest = scored_shards.Manifest(
        **template,
        counts={"read": read, "scored": scored, "dead_letter": dict(sorted(dead_letter.items()))},
        shards=sorted(posixpath.basename(path) for path in scored_files),
        dead_letter_shards=sorted(posixpath.basename(path) for path in dead_letter_files),
    )
    return scored_shards.write_manifest(batch_dir, manifest)


class WriteManifest(beam.PTransform):
    """Once every shard is final, write `_MANIFEST.json` (counts, input shards, output files) atomically; or, when
    more than `max_bad_fraction` of the records read was dead-lettered, fail the job instead."""

    def __init__(self, batch_dir: str, template: dict[str, Any], max_bad_fraction: float = 1.0):
        super().__init__()
        self._batch_dir, self._template, self._max_bad_fraction = batch_dir, template, max_bad_fraction

    def expand(self, inputs):
        scored_files, dead_letter_files, read, scored, dead_letter = inputs
        return (scored_files.pipeline
                | "Once" >> beam.Create([None])
                | "Write" >> beam.Map(_write_manifest, AsList(scored_files), AsList(dead_letter_files),
                                      AsSingleton(read), AsSingleton(scored), AsDict(dead_letter),
                                      batch_dir=self._batch_dir, template=self._template,
                                      max_bad_fraction=self._max_bad_fraction))
