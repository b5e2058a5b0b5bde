import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.shared import batches, schema, scored_set
from curation.shared.manifest import MANIFEST_NAME, ScoredShardsError
from curation.trainer import scored_input, truth
from curation.trainer.input_pipeline import DataPosition
from models.tokenizer import ByteTokenizer


def stored_rows(output):
    scored = scored_set.open_scored(output)
    table = pq.read_table(scored.shard_paths())
    return scored, {row["key"]: row for row in table.to_pylist()}


def test_batches_carry_the_stored_reference_embeddings_and_truth(scored_tiny_corpus):
    scored, rows = stored_rows(scored_tiny_corpus)
    shards = scored.shard_paths()
    examples = [e for path in shards for e in scored_input.read_scored_examples(path)]
    assert sorted(e.key for e in examples) == sorted(rows)
    by_embedding = {np.asarray(row["ref_image_embedding"], np.float16).tobytes(): row for row in rows.values()}
    dataset = scored_input.make_scored_dataset(
        shards, ByteTokenizer(), batch_size=16, image_size=32, text_length=32, embed_dim=scored.embed_dim, seed=0
    )
    batch = next(dataset.as_numpy_iterator())
    assert batch["ref_zimg"].shape == (16, scored.embed_dim) and batch["image"].shape == (16, 32, 32, 3)
    for zimg, ztxt, code, bucket in zip(batch["ref_zimg"], batch["ref_ztxt"], batch["truth"], batch["bucket"]):
        row = by_embedding[zimg.astype(np.float16).tobytes()]  # float32 of the stored float16, exactly
        np.testing.assert_array_equal(ztxt, np.asarray(row["ref_text_embedding"], np.float32))
        assert truth.TRUTH_KINDS[code] == json.loads(row["metadata"])["truth"]
        assert bucket == truth.bucket_code(row["metadata"])
    assert set(batch["truth"]) <= set(range(len(truth.TRUTH_KINDS)))


def test_truth_codes_name_every_kind_and_mark_corpora_without_truth():
    assert [truth.truth_code({"truth": kind}) for kind in truth.TRUTH_KINDS] == list(range(len(truth.TRUTH_KINDS)))
    assert truth.truth_code('{"truth": "misaligned", "shape": "disc"}') == 1
    assert truth.truth_code({"truth": "truncated_image"}) == truth.OTHER
    assert truth.truth_code({}) == truth.truth_code("") == truth.truth_code("not json") == truth.UNKNOWN
    assert [truth.clean_flag(code) for code in (truth.CLEAN, 1, truth.OTHER, truth.UNKNOWN)] == [1, 0, 0, -1]


def test_offline_filter_keeps_the_easiest_fraction(scored_tiny_corpus):
    scored, rows = stored_rows(scored_tiny_corpus)
    losses = np.array([row["ref_loss"] for row in rows.values()])
    threshold = scored_input.difficulty_threshold(scored.shard_paths(), 0.25)
    assert (losses <= threshold).sum() == round(0.25 * len(losses))
    assert scored_input.difficulty_threshold(scored.shard_paths(), 1.0) == float("inf")
    dataset = scored_input.make_scored_dataset(
        scored.shard_paths(),
        ByteTokenizer(),
        batch_size=8,
        image_size=32,
        text_length=32,
        embed_dim=scored.embed_dim,
        seed=0,
        max_difficulty=threshold,
    )
    kept = {np.asarray(row["ref_image_embedding"], np.float16).tobytes(): row["ref_loss"] for row in rows.values()}
    batches = dataset.take(2).as_numpy_iterator()
    for batch in batches:
        assert all(kept[z.astype(np.float16).tobytes()] <= threshold for z in batch["ref_zimg"])
    # Skipped examples advance the position: raw records consumed exceed examples delivered.
    assert batch["position"][-1][3] > 16


def test_a_resumed_stream_continues_where_it_stopped(scored_tiny_corpus):
    scored, _ = stored_rows(scored_tiny_corpus)
    common = dict(batch_size=8, image_size=32, text_length=32, embed_dim=scored.embed_dim, seed=4)
    straight = list(
        scored_input.make_scored_dataset(scored.shard_paths(), ByteTokenizer(), **common).take(4).as_numpy_iterator()
    )
    position = DataPosition.from_array(straight[1]["position"][-1])
    resumed = list(
        scored_input.make_scored_dataset(scored.shard_paths(), ByteTokenizer(), start=position, **common)
        .take(2)
        .as_numpy_iterator()
    )
    for expected, got in zip(straight[2:], resumed):
        np.testing.assert_array_equal(expected["ref_zimg"], got["ref_zimg"])
        np.testing.assert_array_equal(expected["image"], got["image"])


def test_mixed_references_and_unknown_schema_versions_are_refused(scored_tiny_corpus, tmp_path):
    import dataclasses
    import shutil

    from apache_beam.io.filesystems import FileSystems

    output = tmp_path / "out"
    shutil.copytree(scored_tiny_corpus, output)
    batch = next(output.glob("batch-*"))
    manifest = batches.read_manifests(str(output))[0]
    other = dataclasses.replace(manifest, reference=dataclasses.replace(manifest.reference, fingerprint="f" * 64))
    for name, written, match in [
        ("batch-zz-other", other.to_json(), "different reference"),
        (
            "batch-zz-version",
            manifest.to_json().replace(f'"schema_version": {schema.SCHEMA_VERSION}', '"schema_version": 99'),
            "schema version 99",
        ),
    ]:
        shutil.copytree(batch, output / name)
        (output / name / MANIFEST_NAME).write_text(written)
        with pytest.raises(ScoredShardsError, match=match):
            scored_set.open_scored(str(output))
        shutil.rmtree(output / name)
    # A listed shard that is missing is named.
    FileSystems.delete([str(batch / manifest.shards[0])])
    with pytest.raises(ScoredShardsError, match="missing shards"):
        scored_set.open_scored(str(output))


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_scored_shard_raises_naming_the_file(scored_tiny_corpus, tmp_path, damage):
    import shutil

    output = tmp_path / "out"
    shutil.copytree(scored_tiny_corpus, output)
    scored = scored_set.open_scored(str(output))
    path = scored.shard_paths()[0]
    data = open(path, "rb").read()
    damaged = data[: len(data) // 2] if damage == "truncated" else data[:100] + bytes(200) + data[300:]
    with open(path, "wb") as f:
        f.write(damaged)
    with pytest.raises(ScoredShardsError, match=path):
        scored_input.read_scored_examples(path)
    dataset = scored_input.make_scored_dataset(
        scored.shard_paths(),
        ByteTokenizer(),
        batch_size=8,
        image_size=32,
        text_length=32,
        embed_dim=scored.embed_dim,
        seed=0,
    )
    with pytest.raises(Exception, match="cannot be read"):
        next(dataset.as_numpy_iterator())
