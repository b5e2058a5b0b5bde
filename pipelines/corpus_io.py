"""Beam source for image-text corpora: WebDataset tar, Parquet or TFRecord shards, local or on gs://.

    records, errors = pipeline | ReadCorpus("gs://bucket/web/*.tar", "wds")

The parsing is `curation.corpus.read_shard`, the same code the trainer uses; this module only spreads the shards
over workers (one shard file per element, reshuffled so a runner can balance them) and counts what it read.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

from curation.corpus import CorpusError, CorpusRecord, FieldNames, check_format, match_shards, read_shard

METRICS_NAMESPACE = "corpus"


class _ReadShardFn(beam.DoFn):
    """Shard path -> its CorpusRecords (main output) and CorpusErrors (tagged ReadCorpus.ERRORS)."""

    def __init__(self, format: str, fields: FieldNames | None, batch_rows: int):
        self._format, self._fields, self._batch_rows = format, fields, batch_rows
        self._shards = Metrics.counter(METRICS_NAMESPACE, "shards_read")
        self._records = Metrics.counter(METRICS_NAMESPACE, "records_read")

    def process(self, path: str) -> Iterator[CorpusRecord | TaggedOutput]:
        self._shards.inc()
        for item in read_shard(path, self._format, self._fields, batch_rows=self._batch_rows):
            if isinstance(item, CorpusError):
                Metrics.counter(METRICS_NAMESPACE, f"errors_{item.reason}").inc()
                yield TaggedOutput(ReadCorpus.ERRORS, item)
            else:
                self._records.inc()
                yield item


class ReadCorpus(beam.PTransform):
    """Read every shard matching `file_patterns` (a glob or list of globs, matched when the pipeline runs).

    Returns a DoOutputsTuple: `.records` (the main output, `CorpusRecord`s) and `.errors` (`CorpusError`s: orphan
    members, truncated shards, corrupt frames...); it unpacks as `records, errors`. Counters in namespace "corpus":
    shards_read, records_read, and errors_<reason> per error reason.
    """

    RECORDS = "records"
    ERRORS = "errors"

    def __init__(
        self,
        file_patterns: str | Iterable[str],
        format: str,
        fields: FieldNames | None = None,
        *,
        batch_rows: int = 1024,
    ):
        super().__init__()
        self._patterns = (file_patterns,) if isinstance(file_patterns, str) else tuple(file_patterns)
        if not self._patterns:
            raise ValueError("ReadCorpus needs at least one file pattern")
        self._format = check_format(format)
        self._fields = fields
        self._batch_rows = batch_rows

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.pvalue.DoOutputsTuple:
        return (
            pbegin
            | "FilePatterns" >> beam.Create([self._patterns])
            | "MatchShards" >> beam.FlatMap(match_shards)
            | "SpreadShards" >> beam.Reshuffle()
            | "ParseShards"
            >> beam.ParDo(_ReadShardFn(self._format, self._fields, self._batch_rows)).with_outputs(
                self.ERRORS, main=self.RECORDS
            )
        )
