"""The one parser per input layout, shared by the Beam job and the trainer, and `read_shard` over them.

Three layouts, as img2dataset and Hugging Face datasets write them (see docs/corpus.md):

    wds       WebDataset tar: members `{key}.jpg|jpeg|png|webp`, `{key}.txt`, optional `{key}.json`
    parquet   rows with a key, an image (raw bytes or a `{bytes, path}` struct) and a caption column
    tfrecord  tf.train.Example records with `key`, `image/encoded` and `caption` features

`read_shard` parses one shard file and is the unit of work of the Beam source (`pipelines.corpus_io.ReadCorpus`),
so a runner parallelizes over shards; `iter_corpus` chains it over a glob for plain Python callers. Files are
opened through `apache_beam.io.filesystems.FileSystems`, so `gs://` paths work like local ones.

Nothing is decoded or validated here: an image is handed on as the bytes stored, and a caption as `str` when it is
valid UTF-8 or as the raw `bytes` otherwise, so the scoring job can dead-letter bad records with a reason. What
cannot become a record (an image without a caption, a truncated shard, a corrupt TFRecord frame) comes out as a
`CorpusError` in the same stream, never as an exception and never dropped.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Any, Callable, Iterator, Literal, Sequence

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from google.protobuf.message import DecodeError

from curation.shared import tfrecord
from curation.shared.corpus import (
    DEFAULT_FIELDS,
    CorpusItem,
    CorpusRecord,
    FieldNames,
    check_format,
    derived_key,
    match_shards,
    shard_stem,
    text_or_bytes,
    valid_unicode,
)
from curation.shared.errors import (
    CORRUPT_RECORD,
    DUPLICATE_KEY,
    MISSING_CAPTION,
    MISSING_IMAGE,
    TRUNCATED_SHARD,
    UNREADABLE_SHARD,
    CorpusError,
    CorpusReadError,
)
from curation.shared.streams import StreamGuard, TailRecorder


def _parse_error(path: str, key: str, reason: str, error: BaseException | str) -> CorpusError:
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return CorpusError(key=key, source=path, reason=reason, message=message)


# --- WebDataset tar -------------------------------------------------------------------------------------------


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name, the extension is the rest.

    "shard/000123.seg.png" -> ("shard/000123", "seg.png").
    """
    directory, base = posixpath.split(name)
    stem, dot, extension = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), (extension if dot else "")


def _wds_sample(path: str, key: str, members: dict[str, bytes], fields: FieldNames) -> CorpusItem:
    image_ext = next((ext for ext in fields.image if ext in members), None)
    caption_ext = next((ext for ext in fields.caption if ext in members), None)
    if image_ext is None or caption_ext is None:
        reason = MISSING_IMAGE if image_ext is None else MISSING_CAPTION
        return _parse_error(path, key, reason, f"sample has members {sorted(members)}")
    metadata: dict[str, Any] = {}
    for ext, data in members.items():
        if ext in (image_ext, caption_ext):
            continue
        if ext == "json":
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                metadata.update(parsed)
                continue
        metadata.setdefault(ext, text_or_bytes(data))
    return CorpusRecord(key, members[image_ext], text_or_bytes(members[caption_ext]), path, metadata)


def _tar_end_problem(tar: tarfile.TarFile, recorder: TailRecorder) -> str | None:
    """None when the archive ended on an end-of-archive (all-zero) block, else what was found instead."""
    block = recorder.bytes_at(tar.offset, tarfile.BLOCKSIZE)
    if block == tarfile.NUL * tarfile.BLOCKSIZE:
        return None
    if len(block) < tarfile.BLOCKSIZE:
        return f"file ends at byte {recorder.position} without an end-of-archive block"
    return f"invalid tar header at byte {tar.offset}"


def parse_wds(path: str, fields: FieldNames, **_: Any) -> Iterator[CorpusItem]:
    """Samples of a WebDataset tar; members of one sample must be adjacent, as img2dataset writes them."""
    seen: set[str] = set()

    def sample(key: str, members: dict[str, bytes]) -> CorpusItem:
        if key in seen:
            return _parse_error(
                path,
                key,
                DUPLICATE_KEY,
                "key seen before in this shard: a second sample of it, or its members not adjacent",
            )
        seen.add(key)
        return _wds_sample(path, key, members, fields)

    with FileSystems.open(path) as raw:  # compression from the suffix: .tar.gz works too
        recorder = TailRecorder(raw)
        try:
            tar = tarfile.open(fileobj=recorder, mode="r|")
        except tarfile.TarError as error:
            yield _parse_error(path, shard_stem(path), UNREADABLE_SHARD, error)
            return
        key, members = None, {}  # the sample being collected
        member_key = None  # the key of the member being read
        try:
            with tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, ext = split_member_name(valid_unicode(member.name))
                    ext = ext.lower()
                    data = tar.extractfile(member).read()
                    if member_key != key or ext in members:  # a member seen again starts the key's next sample
                        if key is not None:
                            yield sample(key, members)
                        key, members = member_key, {}
                    members[ext] = data
                problem = _tar_end_problem(tar, recorder)
        except tarfile.TarError as error:
            problem = f"{error} near byte {recorder.position}"
            if key is not None and member_key != key:  # the break is in the next sample: this one is whole
                yield sample(key, members)
                key, members = member_key, {}
    if problem is None:
        if key is not None:
            yield sample(key, members)
        return
    pending = f"; sample {key!r} (members read: {sorted(members)}) is not emitted" if key else ""
    yield _parse_error(
        path,
        key or shard_stem(path),
        TRUNCATED_SHARD,
        f"tar shard is truncated or damaged after {len(seen)} samples: {problem}{pending}",
    )


# --- Parquet --------------------------------------------------------------------------------------------------


def _image_bytes(value: Any) -> bytes | str:
    """Image bytes of a Parquet cell (raw bytes or a Hugging Face `{bytes, path}` struct), or why there are none."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            return f"image struct has no bytes (path {value.get('path')!r})"
        value = data
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return "image cell is null" if value is None else f"image cell holds {type(value).__name__}, not bytes"


def parse_parquet(path: str, fields: FieldNames, *, batch_rows: int = 1024, **_: Any) -> Iterator[CorpusItem]:
    """Rows of a Parquet file, read `batch_rows` at a time; columns other than key/image/caption go to metadata.
    A file that is not Parquet, or is damaged, is an UNREADABLE_SHARD; an error of the stream itself is raised."""
    import pyarrow
    import pyarrow.parquet as pq

    data_errors = (pyarrow.ArrowException, OSError, ValueError)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
        f = StreamGuard(raw)
        try:
            parquet = pq.ParquetFile(f)
        except data_errors as error:
            if f.failed:
                raise
            yield _parse_error(path, shard_stem(path), UNREADABLE_SHARD, error)
            return
        columns = parquet.schema_arrow.names
        image_column = next((name for name in fields.image if name in columns), None)
        caption_column = next((name for name in fields.caption if name in columns), None)
        if image_column is None or caption_column is None:
            wanted = fields.image if image_column is None else fields.caption
            yield _parse_error(path, shard_stem(path), UNREADABLE_SHARD, f"no column {wanted} in {columns}")
            return
        skip = {fields.key, image_column, caption_column}
        row = 0
        try:
            for batch in parquet.iter_batches(batch_size=batch_rows):
                for values in batch.to_pylist():
                    yield _parquet_row(path, row, values, fields.key, image_column, caption_column, skip)
                    row += 1
        except data_errors as error:
            if f.failed:
                raise
            message = f"cannot read past row {row}: {type(error).__name__}: {error}"
            yield _parse_error(path, shard_stem(path), UNREADABLE_SHARD, message)


def _parquet_row(
    path: str,
    row: int,
    values: dict[str, Any],
    key_column: str,
    image_column: str,
    caption_column: str,
    skip: set[str],
) -> CorpusItem:
    key = values.get(key_column)
    if isinstance(key, bytes):
        key = key.decode("utf-8", errors="replace")
    key = derived_key(path, row) if key is None or key == "" else str(key)
    image = _image_bytes(values[image_column])
    if isinstance(image, str):
        return _parse_error(path, key, MISSING_IMAGE, image)
    caption = values[caption_column]
    if isinstance(caption, bytes):
        caption = text_or_bytes(caption)
    elif not isinstance(caption, str):
        return _parse_error(path, key, MISSING_CAPTION, f"caption cell is {caption!r}")
    metadata = {name: value for name, value in values.items() if name not in skip and value is not None}
    return CorpusRecord(key, image, caption, path, metadata)


# --- TFRecord -------------------------------------------------------------------------------------------------


def _feature_value(values: list[Any]) -> Any:
    """Metadata value of a feature: bytes as text where valid UTF-8, a single value unwrapped from its list."""
    values = [text_or_bytes(v) if isinstance(v, bytes) else v for v in values]
    return values[0] if len(values) == 1 else values


def parse_tfrecord(path: str, fields: FieldNames, **_: Any) -> Iterator[CorpusItem]:
    """tf.train.Example records of a TFRecord file (gzip from a .gz suffix), each frame's CRC checked."""
    with FileSystems.open(path) as f:
        for index, frame in enumerate(tfrecord.iter_frames(f)):
            if isinstance(frame, tfrecord.FrameError):
                # A fatal frame ends the file: the shard was not read whole (truncated, or its framing is lost).
                reason = (
                    (TRUNCATED_SHARD if frame.kind == "truncated" else UNREADABLE_SHARD)
                    if frame.fatal
                    else CORRUPT_RECORD
                )
                yield _parse_error(path, derived_key(path, index), reason, f"{frame.message} at byte {frame.offset}")
                continue
            try:
                features = tfrecord.decode_example(frame)
            except DecodeError as error:
                yield _parse_error(path, derived_key(path, index), CORRUPT_RECORD, error)
                continue
            yield _tfrecord_example(path, index, features, fields)


def _tfrecord_example(path: str, index: int, features: dict[str, list[Any]], fields: FieldNames) -> CorpusItem:
    key_values = features.get(fields.key) or []
    key = key_values[0].decode("utf-8", errors="replace") if key_values else ""
    key = key or derived_key(path, index)
    image_name = next((name for name in fields.image if features.get(name)), None)
    caption_name = next((name for name in fields.caption if features.get(name)), None)
    if image_name is None or caption_name is None:
        reason = MISSING_IMAGE if image_name is None else MISSING_CAPTION
        return _parse_error(path, key, reason, f"example has features {sorted(features)}")
    image, caption = features[image_name][0], features[caption_name][0]
    if not isinstance(image, bytes) or not isinstance(caption, bytes):
        return _parse_error(
            path,
            key,
            MISSING_IMAGE if not isinstance(image, bytes) else MISSING_CAPTION,
            f"features {image_name!r} and {caption_name!r} must be bytes lists",
        )
    skip = {fields.key, image_name, caption_name}
    metadata = {name: _feature_value(values) for name, values in features.items() if name not in skip}
    return CorpusRecord(key, image, text_or_bytes(caption), path, metadata)


# --- Shards and globs -----------------------------------------------------------------------------------------

_PARSERS: dict[str, Callable[..., Iterator[CorpusItem]]] = {
    "wds": parse_wds,
    "parquet": parse_parquet,
    "tfrecord": parse_tfrecord,
}


def read_shard(
    path: str, format: str, fields: FieldNames | None = None, *, batch_rows: int = 1024
) -> Iterator[CorpusItem]:
    """Records and errors of one shard file, in file order, each with its `index` in that order. Bad data never
    raises; a missing file does. (The order is what a score sidecar's rows follow.)"""
    fields = fields or DEFAULT_FIELDS[check_format(format)]
    seen: set[str] = set()
    for index, item in enumerate(_PARSERS[format](path, fields, batch_rows=batch_rows)):
        if isinstance(item, CorpusRecord):
            if item.key in seen:
                item = _parse_error(path, item.key, DUPLICATE_KEY, "key already read from this shard")
            else:
                seen.add(item.key)
        object.__setattr__(item, "index", index)  # frozen, and made here: set in place rather than copied
        yield item


def read_whole_shard(
    path: str, format: str, fields: FieldNames | None = None, *, batch_rows: int = 1024
) -> list[CorpusItem]:
    """`read_shard` as a list, each item also knowing how many the shard has (`shard_items`)."""
    items = list(read_shard(path, format, fields, batch_rows=batch_rows))
    for item in items:
        object.__setattr__(item, "shard_items", len(items))
    return items


def iter_corpus(
    patterns: str | Sequence[str],
    format: str,
    fields: FieldNames | None = None,
    *,
    batch_rows: int = 1024,
    errors: Literal["yield", "raise"] = "yield",
) -> Iterator[CorpusItem]:
    """Records (and `CorpusError`s, unless errors="raise") of every shard matching the glob(s), shard by shard."""
    if errors not in ("yield", "raise"):
        raise ValueError(f"errors must be 'yield' or 'raise', got {errors!r}")
    check_format(format)
    for path in match_shards(patterns):
        for item in read_shard(path, format, fields, batch_rows=batch_rows):
            if isinstance(item, CorpusError) and errors == "raise":
                raise CorpusReadError(item)
            yield item
