"""Beam source for image-text corpora: WebDataset tar, Parquet or TFRecord shards, local or on gs://.

    records, errors, failed_shards = pipeline | ReadCorpus("gs://bucket/web/*.tar", "wds")

The parsing is `curation.shared.corpus_readers.read_shard`, the same code the trainer uses; this module only spreads
the shards over workers (one shard file per element, reshuffled so a runner can balance them) and counts what it read.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
from typing import Any, Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindows

from curation.shared.corpus import (
    DEFAULT_FIELDS,
    FORMATS,
    CorpusRecord,
    FieldNames,
    check_format,
    is_shard_failure,
    match_shards,
)
from curation.shared.corpus_readers import read_whole_shard
from curation.shared.errors import CorpusError
from pipelines.progress import worker_progress

METRICS_NAMESPACE = "corpus"


class ShardReadError(OSError):
    """An input shard could not be read for a reason outside its data (permission, vanished file, network): raised,
    so that the runner retries the read, and named when it gives up."""


def in_global_window(outputs: Iterable[Any]) -> Iterator[Any]:
    """A DoFn's outputs (TaggedOutput or not) as finish_bundle must yield them: in the global window, where every
    element of the scoring job is (for the DoFns that emit elements of earlier process calls at the bundle's end)."""
    for output in outputs:
        if isinstance(output, TaggedOutput):
            yield TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
        else:
            yield GlobalWindows.windowed_value(output)


class _ReadShardFn(beam.DoFn):
    """Shard path -> its CorpusRecords (main output) and CorpusErrors (tagged ReadCorpus.ERRORS), or, for a shard
    that could not be read to the end, only the CorpusError saying why (tagged ReadCorpus.FAILED_SHARDS).

    A shard's items are held until its end has been read, so that no record of a partly read shard goes on; the
    next shard of the bundle is read meanwhile: two shards per worker thread are in memory at a time."""

    def __init__(
        self,
        format: str,
        fields: FieldNames | None,
        batch_rows: int,
        errors_inline: bool = False,
        total_shards: int = 0,
        shard_sizes: bool = False,
    ):
        self._format, self._fields, self._batch_rows = format, fields, batch_rows
        self._errors_inline, self._total_shards, self._shard_sizes = errors_inline, total_shards, shard_sizes
        self._shards = Metrics.counter(METRICS_NAMESPACE, "shards_read")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "shards_failed")
        self._records = Metrics.counter(METRICS_NAMESPACE, "records_read")

    def setup(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="read_shard")
        self._progress = worker_progress()
        self._progress.expect_shards(self._total_shards)

    def teardown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def start_bundle(self) -> None:
        self._pending: collections.deque = collections.deque()

    def process(self, path: str) -> Iterator[CorpusRecord | TaggedOutput]:
        # The next shard is read on a thread while this one's records go through the stages downstream, whose
        # model forward releases the Python lock: reading overlaps the forward.
        self._pending.append(
            (path, self._pool.submit(read_whole_shard, path, self._format, self._fields, batch_rows=self._batch_rows))
        )
        if len(self._pending) > 1:
            yield from self._emit(*self._pending.popleft())

    def finish_bundle(self) -> Iterator[Any]:
        while self._pending:
            yield from in_global_window(self._emit(*self._pending.popleft()))

    def _emit(self, path: str, future: concurrent.futures.Future) -> Iterator[CorpusRecord | TaggedOutput]:
        try:
            items = future.result()
        except OSError as error:
            raise ShardReadError(f"cannot read input shard {path}: {type(error).__name__}: {error}") from error
        failure = next((item for item in items if is_shard_failure(item)), None)
        if failure is not None:
            self._failed.inc()
            yield TaggedOutput(ReadCorpus.FAILED_SHARDS, failure)
            return
        self._shards.inc()
        if self._shard_sizes:
            yield TaggedOutput(ReadCorpus.SHARD_SIZES, len(items))
        self._progress.add("records", len(items))
        self._progress.add("shards")
        for item in items:
            if isinstance(item, CorpusError):
                Metrics.counter(METRICS_NAMESPACE, f"errors_{item.reason}").inc()
                yield item if self._errors_inline else TaggedOutput(ReadCorpus.ERRORS, item)
            else:
                self._records.inc()
                yield item


class ReadCorpus(beam.PTransform):
    """Read every shard matching `file_patterns` (a glob or list of globs, matched when the pipeline runs).

    Returns a DoOutputsTuple that unpacks as `records, errors, failed_shards`: `CorpusRecord`s of the shards read
    whole; `CorpusError`s of their records (orphan members, duplicate keys, corrupt frames...); and one `CorpusError`
    per shard that could not be read to the end (not the declared format, truncated, framing lost), whose records
    are all held back. Counters in namespace "corpus": shards_read, shards_failed, records_read, and errors_<reason>.
    Every item knows its place in its shard (`index`, `shard_items`). With `errors_inline` the record errors stay
    in the records' stream, in their place (for score sidecars, which hold a row per item), and `errors` is empty.
    """

    RECORDS = "records"
    ERRORS = "errors"
    FAILED_SHARDS = "failed_shards"
    SHARD_SIZES = "shard_sizes"

    def __init__(
        self,
        file_patterns: str | Iterable[str],
        format: str,
        fields: FieldNames | None = None,
        *,
        batch_rows: int = 1024,
        errors_inline: bool = False,
        shard_sizes: bool = False,
    ):
        super().__init__()
        self._patterns = (file_patterns,) if isinstance(file_patterns, str) else tuple(file_patterns)
        if not self._patterns:
            raise ValueError("ReadCorpus needs at least one file pattern")
        self._format = check_format(format)
        self._fields = fields
        self._batch_rows = batch_rows
        self._errors_inline, self._shard_sizes = errors_inline, shard_sizes
        # Progress lines name the shards out of this many (when the patterns are the shard paths themselves).
        self._total_shards = len(self._patterns) if not any("*" in p or "?" in p for p in self._patterns) else 0

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.pvalue.DoOutputsTuple:
        return (
            pbegin
            | "FilePatterns" >> beam.Create([self._patterns])
            | "MatchShards" >> beam.FlatMap(match_shards)
            | "SpreadShards" >> beam.Reshuffle()
            | "ParseShards"
            >> beam.ParDo(
                _ReadShardFn(
                    self._format,
                    self._fields,
                    self._batch_rows,
                    self._errors_inline,
                    self._total_shards,
                    self._shard_sizes,
                )
            ).with_outputs(
                self.ERRORS, self.FAILED_SHARDS, *((self.SHARD_SIZES,) if self._shard_sizes else ()), main=self.RECORDS
            )
        )


def field_names(
    format: str, key: str | None = None, image: str | None = None, caption: str | None = None
) -> FieldNames:
    """The layout's default field names with overrides; `image` and `caption` take comma-separated candidates."""
    default = DEFAULT_FIELDS[check_format(format)]

    def candidates(names: str | None, fallback: tuple[str, ...], what: str) -> tuple[str, ...]:
        if names is None:
            return fallback
        parsed = tuple(name.strip() for name in names.split(",") if name.strip())
        if not parsed:
            raise ValueError(f"empty {what} field list {names!r}")
        return parsed

    return FieldNames(
        key=default.key if key is None else key,
        image=candidates(image, default.image, "image"),
        caption=candidates(caption, default.caption, "caption"),
    )


def add_reader_arguments(parser: argparse.ArgumentParser) -> None:
    """The corpus reader flags every entry point shares; `reader_options(args)` turns them into read_shard kwargs."""
    parser.add_argument("--input_format", choices=FORMATS, default="wds", help="layout of the input shards")
    parser.add_argument("--key_field", default=None, help="Parquet column / TFRecord feature of the key")
    parser.add_argument(
        "--image_field",
        default=None,
        help="image column / feature / tar extension(s), comma-separated, first present wins",
    )
    parser.add_argument("--caption_field", default=None, help="caption column / feature / tar extension(s)")
    parser.add_argument("--parquet_batch_rows", type=int, default=1024, help="Parquet rows read at a time")


def reader_options(args: argparse.Namespace) -> dict[str, Any]:
    """{"format", "fields", "batch_rows"} from the flags of `add_reader_arguments`."""
    fields = field_names(args.input_format, args.key_field, args.image_field, args.caption_field)
    return {"format": args.input_format, "fields": fields, "batch_rows": args.parquet_batch_rows}
