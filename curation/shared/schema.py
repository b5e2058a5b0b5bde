"""The scored-shard schema, declared once: a table of columns from which everything else derives.

Each `Column` has a name, a kind and a meaning. From the table come the Parquet (Arrow) schema, the tf.data feature spec
of the TFRecord shards, the row encoders of both formats, the dead-letter schema and the schema table of
docs/scored_output.md (`markdown_table()`, checked against that page by a test). Every other module names a column
through the constants below, never by spelling it: a column renamed here is renamed everywhere.

Version 2 changed the manifest only (see `curation/shared/manifest.py`); version 3 added `image_sha256` to scored
shards and sidecars, version 4 `image_thumbnail`. Shards of the earlier versions read the same way, without those
columns (a TFRecord reader gets them as empty). `ref_loss` is null (a missing feature in TFRecord) for a softmax
(CLIP) reference, which has no per-example own-pair loss; rank such data by `ref_cosine`, as DataComp does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from curation.shared import tfrecord

SCHEMA_VERSION = 4
# batches a reader of this version opens (1 and 2 lack `image_sha256`, 1 to 3 `image_thumbnail`)
READABLE_VERSIONS = (1, 2, 3, 4)
SCHEMA_VERSION_KEY = b"schema_version"  # Parquet key-value metadata of every scored shard

# Column names. The reference's embeddings are L2-normalized before rounding to float16.
KEY = "key"
CAPTION = "caption"
IMAGE = "image"
IMAGE_SHA256 = "image_sha256"
IMAGE_THUMBNAIL = "image_thumbnail"
SOURCE = "source"
METADATA = "metadata"
REF_IMAGE_EMBEDDING = "ref_image_embedding"
REF_TEXT_EMBEDDING = "ref_text_embedding"
REF_COSINE = "ref_cosine"
REF_LOGIT = "ref_logit"
REF_LOSS = "ref_loss"
# ... and those of the dead letter only.
STAGE = "stage"
REASON = "reason"
MESSAGE = "message"

EMBEDDINGS = (REF_IMAGE_EMBEDDING, REF_TEXT_EMBEDDING)
SCORES = (REF_COSINE, REF_LOGIT, REF_LOSS)

# kind -> (Arrow type as the docs name it, TFRecord feature as the docs name it)
_KINDS = {
    "string": ("string", "bytes"),
    "binary": ("binary", "bytes"),
    "float32": ("float32", "float"),
    "embedding": ("fixed_size_list<float16>[d]", "float × d (the float16 values, widened)"),
    # A sidecar's embeddings: null for a dead-lettered row, which a fixed-size list cannot be in Parquet as pyarrow
    # reads it back (pyarrow 25 refuses a null fixed-size list on read).
    "embedding_or_null": ("list<float16>, d values", "float × d (the float16 values, widened)"),
}


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    kind: str  # a key of _KINDS
    meaning: str

    def arrow_type(self, embed_dim: int) -> pa.DataType:
        if self.kind == "embedding":
            return pa.list_(pa.float16(), embed_dim)
        if self.kind == "embedding_or_null":
            return pa.list_(pa.float16())
        return {"string": pa.string(), "binary": pa.binary(), "float32": pa.float32()}[self.kind]

    nullable: bool = False  # may be null (Parquet) / missing (TFRecord; parsed as NaN, or b"" for a string)

    def tf_feature(self, embed_dim: int):
        import tensorflow as tf  # only when a tf.data spec is asked for

        if self.kind == "embedding":
            return tf.io.FixedLenFeature([embed_dim], tf.float32)
        if self.nullable and self.kind == "float32":
            return tf.io.FixedLenFeature([], tf.float32, default_value=float("nan"))
        if self.nullable:
            return tf.io.FixedLenFeature([], tf.string, default_value="")
        return tf.io.FixedLenFeature([], tf.float32 if self.kind == "float32" else tf.string)

    def to_feature(self, value: Any) -> Any:
        """The value as a tf.train.Example feature (bytes, float, or a list of floats)."""
        if self.kind in ("embedding", "embedding_or_null"):
            return [float(v) for v in np.asarray(value, np.float32)]
        if self.kind == "float32":
            return float(value)
        return value

    def from_feature(self, values: list) -> Any:
        if self.kind in ("embedding", "embedding_or_null"):
            return np.asarray(values, np.float32)
        if self.kind == "string":
            return values[0].decode("utf-8")
        return values[0]


SCORED_COLUMNS: tuple[Column, ...] = (
    Column(KEY, "string", "the example's key in the input corpus"),
    Column(CAPTION, "string", "the cleaned caption (NFC, control characters dropped, whitespace collapsed)"),
    Column(IMAGE, "binary", "image bytes: as stored, re-encoded, or empty (`--store_image`)"),
    Column(
        IMAGE_SHA256,
        "string",
        "SHA-256 (hex) of the image bytes as the corpus stores them, whatever `--store_image` keeps: equal for "
        "byte-identical images; null in a row copied from a batch of schema version 1 or 2",
        nullable=True,
    ),
    Column(
        IMAGE_THUMBNAIL,
        "binary",
        "the decoded image squashed to 16 × 16 RGB by box averaging, 768 bytes, uint8, row-major "
        "(`curation/shared/thumbnails.py`): what near-duplicate detection compares; null in a row copied from a "
        "batch of schema version 1 to 3",
        nullable=True,
    ),
    Column(SOURCE, "string", "the input shard the example came from"),
    Column(METADATA, "string", "JSON of the input record's other fields (the demo corpus keeps its hidden truth here)"),
    Column(REF_IMAGE_EMBEDDING, "embedding", "the reference's image embedding, L2-normalized"),
    Column(REF_TEXT_EMBEDDING, "embedding", "the reference's text embedding, L2-normalized"),
    Column(REF_COSINE, "float32", "⟨image, text⟩ of the stored (float16) embeddings"),
    Column(
        REF_LOGIT,
        "float32",
        "`t*·ref_cosine + bias*`: the example's own pair logit under the reference (softmax "
        "references: `t*·ref_cosine`)",
    ),
    Column(
        REF_LOSS,
        "float32",
        "`softplus(−ref_logit)`, its own-pair sigmoid loss: low means easy for the reference; "
        "null for a softmax (CLIP) reference, which has no per-example loss",
        nullable=True,
    ),
)
DEAD_LETTER_COLUMNS: tuple[Column, ...] = (
    Column(KEY, "string", "the record's key, or the shard's stem for a shard-level problem"),
    Column(SOURCE, "string", "the input shard"),
    Column(STAGE, "string", "where it failed: `read`, `caption`, `decode` or `embed` (`curation/shared/errors.py`)"),
    Column(REASON, "string", "why, one word per rule (`curation/shared/errors.py`)"),
    Column(MESSAGE, "string", "details"),
)
# A score sidecar (`--output_layout sidecar`): one row per item its input shard gave (`corpus.read_shard`), in that
# order, without image bytes; a dead-lettered item has its reason and null scores.
SIDECAR_COLUMNS: tuple[Column, ...] = (
    Column(KEY, "string", "the item's key (a read error's: as the dead letter names it)"),
    Column(CAPTION, "string", "the cleaned caption", nullable=True),
    Column(IMAGE_SHA256, "string", "as in the copied layout (null when dead-lettered)", nullable=True),
    Column(IMAGE_THUMBNAIL, "binary", "as in the copied layout (null when dead-lettered)", nullable=True),
    Column(REF_IMAGE_EMBEDDING, "embedding_or_null", "the reference's image embedding, L2-normalized", nullable=True),
    Column(REF_TEXT_EMBEDDING, "embedding_or_null", "the reference's text embedding, L2-normalized", nullable=True),
    Column(REF_COSINE, "float32", "as in the copied layout", nullable=True),
    Column(REF_LOGIT, "float32", "as in the copied layout", nullable=True),
    Column(REF_LOSS, "float32", "as in the copied layout (null for a softmax reference)", nullable=True),
    Column(STAGE, "string", "where it failed, as in the dead letter (null when scored)", nullable=True),
    Column(REASON, "string", "why, as in the dead letter (null when scored)", nullable=True),
    Column(MESSAGE, "string", "details (null when scored)", nullable=True),
)
SCORED_NAMES = tuple(column.name for column in SCORED_COLUMNS)
SIDECAR_NAMES = tuple(column.name for column in SIDECAR_COLUMNS)
_BY_NAME = {column.name: column for column in SCORED_COLUMNS}
_SIDECAR_BY_NAME = {column.name: column for column in SIDECAR_COLUMNS}


def scored_schema(embed_dim: int) -> pa.Schema:
    """The Arrow schema of scored Parquet shards for reference embeddings of width `embed_dim`."""
    return pa.schema(
        [(column.name, column.arrow_type(embed_dim)) for column in SCORED_COLUMNS],
        metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION)},
    )


def sidecar_schema(embed_dim: int) -> pa.Schema:
    """The Arrow schema of score sidecars for reference embeddings of width `embed_dim`."""
    return pa.schema(
        [pa.field(column.name, column.arrow_type(embed_dim), nullable=column.nullable) for column in SIDECAR_COLUMNS],
        metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION)},
    )


def sidecar_table(rows: Sequence[dict[str, Any]], embed_dim: int) -> pa.Table:
    """Sidecar rows (dicts of the sidecar columns, absent or None for null; embeddings as [d] arrays) -> a table of
    `sidecar_schema`, in the order given."""
    schema = sidecar_schema(embed_dim)
    columns = {}
    for column in SIDECAR_COLUMNS:
        values = [row.get(column.name) for row in rows]
        if column.kind == "embedding_or_null":
            present = np.array([value is not None for value in values], bool)
            flat = (
                np.concatenate([value for value in values if value is not None]).astype(np.float16)
                if present.any()
                else np.zeros([0], np.float16)
            )
            offsets = np.concatenate([[0], np.cumsum(present * embed_dim)]).astype(np.int32)
            columns[column.name] = pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(flat, pa.float16()), mask=pa.array(~present)
            )
        else:
            columns[column.name] = pa.array(values, column.arrow_type(embed_dim))
    return pa.Table.from_pydict(columns, schema=schema)


def sidecar_embeddings(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """([n, d] float16 of a sidecar's embedding column, zeros where null; [n] bool, True where present)."""
    column = table.column(name).combine_chunks()
    present = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), bool)
    values = column.flatten().to_numpy(zero_copy_only=False)
    width = len(values) // max(int(present.sum()), 1)
    matrix = np.zeros([len(column), width], np.float16)
    matrix[present] = values.reshape(-1, width) if present.any() else matrix[present]
    return matrix, present


def encode_sidecar_example(row: dict[str, Any]) -> bytes:
    """One sidecar row -> a serialized tf.train.Example (null columns absent)."""
    return tfrecord.encode_example(
        {
            column.name: column.to_feature(row[column.name])
            for column in SIDECAR_COLUMNS
            if row.get(column.name) is not None
        }
    )


def decode_sidecar_example(data: bytes) -> dict[str, Any]:
    """A serialized sidecar tf.train.Example -> the row (absent columns None)."""
    features = tfrecord.decode_example(data)
    row = {
        name: _SIDECAR_BY_NAME[name].from_feature(values)
        for name, values in features.items()
        if name in _SIDECAR_BY_NAME
    }
    return {**{name: None for name in SIDECAR_NAMES}, **row}


def dead_letter_schema() -> pa.Schema:
    return pa.schema([(column.name, column.arrow_type(0)) for column in DEAD_LETTER_COLUMNS])


def tfrecord_feature_spec(embed_dim: int) -> dict[str, Any]:
    """`tf.io.parse_single_example` spec of a scored TFRecord shard (TensorFlow imported only when called)."""
    return {column.name: column.tf_feature(embed_dim) for column in SCORED_COLUMNS}


def check_row(row: dict[str, Any]) -> dict[str, Any]:
    """`row` itself when it has exactly the scored columns; else raises naming the missing and unknown ones."""
    if set(row) != set(SCORED_NAMES):
        raise ValueError(
            f"a scored row needs the columns {list(SCORED_NAMES)}: missing "
            f"{sorted(set(SCORED_NAMES) - set(row))}, unknown {sorted(set(row) - set(SCORED_NAMES))}"
        )
    return row


def rows_to_table(rows: Sequence[dict[str, Any]], embed_dim: int) -> pa.Table:
    """Scored rows (dicts of the scored columns; embeddings as [d] arrays) -> a table of `scored_schema`: the one
    row encoder of Parquet shards, beneath the Beam sink and any other writer."""
    schema = scored_schema(embed_dim)
    for row in rows:
        check_row(row)
    columns = {}
    for column in SCORED_COLUMNS:
        values = [row[column.name] for row in rows]
        if column.kind == "embedding":
            flat = pa.array(np.concatenate(values) if values else np.zeros([0], np.float16), pa.float16())
            columns[column.name] = pa.FixedSizeListArray.from_arrays(flat, embed_dim)
        else:
            columns[column.name] = pa.array(values, column.arrow_type(embed_dim))
    return pa.Table.from_pydict(columns, schema=schema)


def encode_tfrecord_example(row: dict[str, Any]) -> bytes:
    """One scored row -> a serialized tf.train.Example (embeddings as float32 lists of the float16 values)."""
    check_row(row)
    return tfrecord.encode_example(
        {column.name: column.to_feature(row[column.name]) for column in SCORED_COLUMNS if row[column.name] is not None}
    )


def decode_tfrecord_example(data: bytes) -> dict[str, Any]:
    """A serialized scored tf.train.Example -> the row (embeddings as float32 arrays, strings as str)."""
    features = tfrecord.decode_example(data)
    row = {name: _BY_NAME[name].from_feature(values) for name, values in features.items() if name in _BY_NAME}
    return {**{column.name: None for column in SCORED_COLUMNS if column.nullable}, **row}


def embedding_matrix(table: pa.Table, name: str) -> np.ndarray:
    """[n, d] float16 of an embedding column of a scored table."""
    column = table.column(name).combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def dead_letter_rows(errors: Iterable[Any]) -> list[dict[str, str]]:
    """CorpusErrors -> rows of the dead-letter schema."""
    return [{column.name: getattr(error, column.name) for column in DEAD_LETTER_COLUMNS} for error in errors]


def markdown_table(columns: Sequence[Column] = SCORED_COLUMNS) -> str:
    """The docs' table of the scored columns (or of the sidecar's, `SIDECAR_COLUMNS`)."""
    lines = ["| column | Parquet type | TFRecord feature | meaning |", "|---|---|---|---|"]
    for column in columns:
        arrow, feature = _KINDS[column.kind]
        arrow, feature = (
            (f"{arrow} (nullable)", f"{feature} (absent when null)") if column.nullable else (arrow, feature)
        )
        lines.append(f"| `{column.name}` | {arrow} | {feature} | {column.meaning} |")
    return "\n".join(lines)
