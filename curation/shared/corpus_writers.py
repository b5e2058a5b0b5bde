"""Shard writers for the three corpus layouts, the inverse of the parsers in `curation.shared.corpus`.

Each writes `CorpusRecord`s to one shard file through `FileSystems.create` (so `gs://` works) in the layout the
matching parser reads with its default field names, and that the usual tools read without our code:

    wds       tar members {key}.{jpg|png|webp} (from the image's magic bytes), {key}.txt, {key}.json (metadata)
    parquet   columns key (string), image (binary), caption (binary: a caption may be invalid UTF-8), then one
              column per metadata field; row groups of `row_group_rows`
    tfrecord  tf.train.Example with key, image/encoded, caption (bytes features) and one feature per metadata field

Output is deterministic: the same records give the same bytes (fixed tar member times and owners).
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any, BinaryIO

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from curation.shared import tfrecord
from curation.shared.corpus import DEFAULT_FIELDS, CorpusRecord, check_format

SHARD_SUFFIXES = {"wds": ".tar", "parquet": ".parquet", "tfrecord": ".tfrecord"}


def image_extension(image: bytes) -> str:
    """File extension for encoded image bytes, from their magic number; "jpg" for anything unrecognized."""
    if image.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def _utf8(text: str | bytes) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


class ShardWriter:
    """Writes records to one shard file; use as a context manager (the file is complete only once closed)."""

    def __init__(self, path: str):
        self.path = path
        self.count = 0
        self._file: BinaryIO = FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)

    def write(self, record: CorpusRecord) -> None:
        self._write(record)
        self.count += 1

    def _write(self, record: CorpusRecord) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class WdsShardWriter(ShardWriter):
    def __init__(self, path: str):
        super().__init__(path)
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.PAX_FORMAT)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def _write(self, record: CorpusRecord) -> None:
        if "." in record.key.rsplit("/", 1)[-1]:
            raise ValueError(f"WebDataset keys cannot contain '.' (it starts the extension): {record.key!r}")
        self._add(f"{record.key}.{image_extension(record.image)}", record.image)
        self._add(f"{record.key}.txt", _utf8(record.caption))
        if record.metadata:
            self._add(f"{record.key}.json", json.dumps(record.metadata, sort_keys=True).encode("utf-8"))

    def close(self) -> None:
        self._tar.close()
        super().close()


class ParquetShardWriter(ShardWriter):
    """Buffers `row_group_rows` rows per row group; the schema (metadata columns) is fixed by the first group."""

    def __init__(self, path: str, row_group_rows: int = 512):
        super().__init__(path)
        self._row_group_rows = row_group_rows
        self._rows: list[dict[str, Any]] = []
        self._schema = None
        self._writer = None

    def _write(self, record: CorpusRecord) -> None:
        reserved = {"key", "image", "caption"} & set(record.metadata)
        if reserved:
            raise ValueError(f"metadata of {record.key!r} uses reserved column names {sorted(reserved)}")
        self._rows.append(
            {"key": record.key, "image": record.image, "caption": _utf8(record.caption), **record.metadata}
        )
        if len(self._rows) >= self._row_group_rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return
        if self._writer is None:
            table = pa.Table.from_pylist(self._rows)
            fixed = [pa.field("key", pa.string()), pa.field("image", pa.binary()), pa.field("caption", pa.binary())]
            extra = [field for field in table.schema if field.name not in ("key", "image", "caption")]
            self._schema = pa.schema(fixed + extra)
            self._writer = pq.ParquetWriter(self._file, self._schema)
        unknown = {name for row in self._rows for name in row} - set(self._schema.names)
        if unknown:
            raise ValueError(f"{self.path}: metadata fields {sorted(unknown)} not in the shard's first row group")
        self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
        self._rows = []

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
        super().close()


class TFRecordShardWriter(ShardWriter):
    def _write(self, record: CorpusRecord) -> None:
        fields = DEFAULT_FIELDS["tfrecord"]
        features = {fields.key: record.key, fields.image[0]: record.image, fields.caption[0]: _utf8(record.caption)}
        reserved = set(features) & set(record.metadata)
        if reserved:
            raise ValueError(f"metadata of {record.key!r} uses reserved feature names {sorted(reserved)}")
        tfrecord.write_frame(self._file, tfrecord.encode_example({**features, **record.metadata}))


def open_shard_writer(path: str, format: str, *, row_group_rows: int = 512) -> ShardWriter:
    """A writer for one shard of `format` ("wds", "parquet" or "tfrecord") at `path` (local or gs://)."""
    check_format(format)
    if format == "wds":
        return WdsShardWriter(path)
    if format == "parquet":
        return ParquetShardWriter(path, row_group_rows)
    return TFRecordShardWriter(path)
