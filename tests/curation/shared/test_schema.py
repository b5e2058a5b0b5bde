import ast
import hashlib
import io
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.shared import schema
from curation.shared.errors import CorpusError

ROOT = pathlib.Path(__file__).resolve().parents[3]
SOURCE_FOLDERS = ("models", "curation", "pipelines", "demo", "bench")
# Modules that read or write scored shards: each must name the columns through curation.shared.schema.
SCORED_SHARD_MODULES = (
    "curation/shared/manifest.py",
    "curation/shared/scored_set.py",
    "curation/trainer/scored_input.py",
    "curation/trainer/training_data.py",
    "pipelines/stages.py",
    "pipelines/scored_sinks.py",
    "bench/ablations.py",
)
ALL_NAMES = {column.name for column in schema.SCORED_COLUMNS + schema.DEAD_LETTER_COLUMNS}
# Names no other data in the project uses: nothing but the schema module may spell them. (key, image, caption and
# source are also the corpus readers' field names and the trainer's batch keys, which are not scored columns.)
SCHEMA_ONLY_NAMES = {name for name in ALL_NAMES if name.startswith("ref_")}


def string_literals(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def imports_schema(path: pathlib.Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "curation.shared"
            and any(alias.name == "schema" for alias in node.names)
        ):
            return True
    return False


def test_column_names_are_spelled_only_in_the_schema_module():
    sources = [path for folder in SOURCE_FOLDERS for path in (ROOT / folder).rglob("*.py")]
    assert len(sources) > 30
    schema_module = ROOT / "curation" / "shared" / "schema.py"
    assert ALL_NAMES <= string_literals(schema_module)
    spelled_elsewhere = {
        str(path.relative_to(ROOT)): sorted(string_literals(path) & SCHEMA_ONLY_NAMES)
        for path in sources
        if path != schema_module
    }
    assert {path: names for path, names in spelled_elsewhere.items() if names} == {}
    for name in SCORED_SHARD_MODULES:
        path = ROOT / name
        assert imports_schema(path), f"{name} reads or writes scored shards without curation.shared.schema"
        assert string_literals(path) & ALL_NAMES == set(), f"{name} spells column names itself"


def test_scored_output_page_tables_are_the_schema():
    page = (ROOT / "docs" / "scored_output.md").read_text(encoding="utf-8")
    assert schema.markdown_table() in page
    assert schema.markdown_table(schema.SIDECAR_COLUMNS) in page
    assert f"schema version {schema.SCHEMA_VERSION}" in page


def row(i: int, d: int = 4) -> dict:
    zimg = np.linspace(-1, 1, d).astype(np.float16) * (i + 1) / 10
    return {
        schema.KEY: f"k{i}",
        schema.CAPTION: f"caption {i}",
        schema.IMAGE: bytes([i, 1, 2]),
        schema.IMAGE_SHA256: hashlib.sha256(bytes([i, 1, 2])).hexdigest(),
        schema.IMAGE_THUMBNAIL: bytes([i]) * 768,
        schema.SOURCE: "shard.tar",
        schema.METADATA: "{}",
        schema.REF_IMAGE_EMBEDDING: zimg,
        schema.REF_TEXT_EMBEDDING: -zimg,
        schema.REF_COSINE: 0.5 + i,
        schema.REF_LOGIT: -5.0,
        schema.REF_LOSS: 5.0,
    }


def test_parquet_rows_read_back_with_plain_pyarrow():
    rows = [row(i) for i in range(3)]
    buffer = io.BytesIO()
    pq.write_table(schema.rows_to_table(rows, 4), buffer)
    table = pq.read_table(io.BytesIO(buffer.getvalue()))
    expected = schema.scored_schema(4)
    assert table.schema.names == expected.names == list(schema.SCORED_NAMES)
    for field in table.schema:
        want = expected.field(field.name).type
        if field.name in schema.EMBEDDINGS:  # Parquet renames the list's child field; its type and size stay
            assert (field.type.value_type, field.type.list_size) == (want.value_type, want.list_size)
        else:
            assert field.type == want
    assert table.schema.metadata[schema.SCHEMA_VERSION_KEY] == str(schema.SCHEMA_VERSION).encode()
    np.testing.assert_array_equal(
        schema.embedding_matrix(table, schema.REF_TEXT_EMBEDDING),
        np.stack([r[schema.REF_TEXT_EMBEDDING] for r in rows]),
    )
    assert table.column(schema.KEY).to_pylist() == ["k0", "k1", "k2"]
    assert table.column(schema.REF_COSINE).to_pylist() == [0.5, 1.5, 2.5]


def test_tfrecord_rows_parse_with_plain_tf_data():
    import tensorflow as tf

    original = row(2)
    data = schema.encode_tfrecord_example(original)
    parsed = tf.io.parse_single_example(data, schema.tfrecord_feature_spec(4))
    assert parsed[schema.KEY].numpy() == b"k2" and parsed[schema.IMAGE].numpy() == bytes([2, 1, 2])
    assert parsed[schema.IMAGE_SHA256].numpy().decode() == original[schema.IMAGE_SHA256]
    np.testing.assert_array_equal(
        parsed[schema.REF_IMAGE_EMBEDDING].numpy(), original[schema.REF_IMAGE_EMBEDDING].astype(np.float32)
    )
    decoded = schema.decode_tfrecord_example(data)
    assert decoded[schema.CAPTION] == "caption 2" and decoded[schema.REF_LOSS] == 5.0
    # a row of a batch before schema version 3 has no hash: tf.data parses it as empty, our decoder as None
    older = schema.encode_tfrecord_example({**original, schema.IMAGE_SHA256: None})
    assert tf.io.parse_single_example(older, schema.tfrecord_feature_spec(4))[schema.IMAGE_SHA256].numpy() == b""
    assert schema.decode_tfrecord_example(older)[schema.IMAGE_SHA256] is None
    # ... nor one before version 4 a thumbnail
    older = schema.encode_tfrecord_example({**original, schema.IMAGE_THUMBNAIL: None})
    assert tf.io.parse_single_example(older, schema.tfrecord_feature_spec(4))[schema.IMAGE_THUMBNAIL].numpy() == b""
    assert schema.decode_tfrecord_example(older)[schema.IMAGE_THUMBNAIL] is None
    assert schema.decode_tfrecord_example(data)[schema.IMAGE_THUMBNAIL] == bytes([2]) * 768


def test_a_row_with_a_missing_or_unknown_column_is_refused():
    incomplete = row(0)
    del incomplete[schema.REF_LOSS]
    with pytest.raises(ValueError, match=r"missing \['ref_loss'\], unknown \[\]"):
        schema.rows_to_table([incomplete], 4)
    with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
        schema.encode_tfrecord_example({**row(0), "extra": 1})


def test_dead_letter_rows_follow_their_schema():
    error = CorpusError(key="k", source="s.tar", reason="empty_caption", message="m", stage="caption")
    rows = schema.dead_letter_rows([error])
    assert list(rows[0]) == schema.dead_letter_schema().names
    assert rows[0][schema.REASON] == "empty_caption" and rows[0][schema.STAGE] == "caption"
