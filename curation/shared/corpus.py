"""Corpus records: what one image-text pair of a web corpus is, and how shards and keys are named.


The three input layouts and their parsers are in `curation/shared/corpus_readers.py` (see docs/corpus.md).
Nothing is decoded or validated here or there: an image is handed on as the bytes stored, and a caption as `str`
when it is valid UTF-8 or as the raw `bytes` otherwise, so the scoring job can dead-letter bad records with a
reason. What cannot become a record comes out as a `CorpusError` in the same stream, never as an exception.
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Any, Iterable

from apache_beam.io.filesystems import FileSystems

from curation.shared.errors import TRUNCATED_SHARD, UNREADABLE_SHARD, CorpusError

FORMATS = ("wds", "parquet", "tfrecord")


@dataclasses.dataclass(frozen=True)
class FieldNames:
    """Where a layout keeps key, image and caption; for image and caption the first name present wins.

    wds: `image` and `caption` are member extensions (`key` is unused: the member name is the key).
    parquet: column names. tfrecord: feature names.
    """

    key: str
    image: tuple[str, ...]
    caption: tuple[str, ...]


DEFAULT_FIELDS: dict[str, FieldNames] = {
    "wds": FieldNames(key="", image=("jpg", "jpeg", "png", "webp"), caption=("txt",)),
    "parquet": FieldNames(key="key", image=("image",), caption=("caption", "text")),
    "tfrecord": FieldNames(key="key", image=("image/encoded",), caption=("caption",)),
}


@dataclasses.dataclass(frozen=True)
class CorpusRecord:
    """One image-text pair as stored: nothing decoded, nothing validated."""

    key: str  # unique in the shard; derived as "{shard stem}-{index:08d}" when the corpus stores none
    image: bytes  # encoded image as stored (possibly empty or not an image at all)
    caption: str | bytes  # str when valid UTF-8, else the raw bytes
    source: str  # path of the shard file the record came from
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)  # json member / other columns
    # Its place in its shard's read order (`read_shard`) and the shard's item count; -1, 0: not known.
    index: int = dataclasses.field(default=-1, compare=False)
    shard_items: int = dataclasses.field(default=0, compare=False)


CorpusItem = CorpusRecord | CorpusError
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".deflate", ".lzma", ".xz")


def shard_stem(path: str) -> str:
    """File name without directory, compression suffix and extension: gs://b/web/00012.tfrecord.gz -> 00012."""
    name = posixpath.basename(path.rstrip("/"))
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return posixpath.splitext(name)[0] or name


def derived_key(path: str, index: int) -> str:
    """Key for the index-th record of a shard that stores none: unique as long as shard stems are."""
    return f"{shard_stem(path)}-{index:08d}"


def text_or_bytes(data: bytes) -> str | bytes:
    """str when `data` is valid UTF-8, else `data` itself (a bad caption is left for the scoring job to reject)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


def valid_unicode(text: str) -> str:
    """`text` with what is not encodable as UTF-8 replaced by U+FFFD. `tarfile` decodes member names that are not
    UTF-8 with "surrogateescape", and a key holding a lone surrogate cannot be written to Parquet or TFRecord."""
    try:
        data = text.encode("utf-8", errors="surrogateescape")  # back to the bytes tarfile read
    except UnicodeEncodeError:  # a surrogate that does not stand for a byte
        data = text.encode("utf-8", errors="surrogatepass")
    return data.decode("utf-8", errors="replace")


SHARD_FAILURES = (TRUNCATED_SHARD, UNREADABLE_SHARD)  # the shard was not read whole


def is_shard_failure(item: CorpusItem) -> bool:
    """Whether `item` says its shard could not be read to the end (its records are then not to be used)."""
    return isinstance(item, CorpusError) and item.reason in SHARD_FAILURES


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"unknown corpus format {format!r}; expected one of {FORMATS}")
    return format


def match_shards(patterns: str | Iterable[str]) -> list[str]:
    """Sorted, de-duplicated paths matching the glob(s). Raises FileNotFoundError naming a pattern matching none."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    paths: set[str] = set()
    for pattern, result in zip(patterns, FileSystems.match(patterns)):
        if not result.metadata_list:
            raise FileNotFoundError(f"no corpus shard matches {pattern!r}")
        paths.update(metadata.path for metadata in result.metadata_list)
    return sorted(paths)
