"""What the code before schema version 2 wrote still reads and restores (fixtures: tests/fixtures/before_v2)."""

import pathlib
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.shared import schema, scored_set
from curation.shared.manifest import DONE
from curation.trainer import scored_input
from models import checkpoint
from models.tokenizer import ByteTokenizer

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "before_v2"
REFERENCE = str(FIXTURES / "reference_v1")
SCORED = str(FIXTURES / "scored_v1")


def test_a_version_1_checkpoint_restores_and_yields_its_loss_parameters():
    restored = checkpoint.restore(REFERENCE)
    meta = checkpoint.read_meta(REFERENCE)
    assert meta["meta_version"] == 1 and restored.fingerprint == meta["fingerprint"]
    assert meta["temperature"] == pytest.approx(float(np.exp(restored.params["log_temperature"][0])))
    assert meta["bias"] == pytest.approx(float(restored.params["bias"][0])) == -10.0
    assert restored.config.embed_dim == 8


def test_a_version_1_batch_reads_as_a_typed_manifest():
    scored = scored_set.open_scored(SCORED)
    (manifest,) = scored.manifests
    assert manifest.schema_version == 1
    reference = manifest.reference
    assert (reference.width, reference.loss, reference.text_length) == (8, "sigmoid", 8)
    assert reference.fingerprint == checkpoint.read_meta(REFERENCE)["fingerprint"]
    assert (reference.temperature, reference.bias) == pytest.approx((10.0, -10.0))
    assert reference.preprocessing.size == 16 and reference.forward_flops_per_example > 0
    assert manifest.counts.read == manifest.counts.scored + manifest.counts.dead_lettered == 12
    assert manifest.counts.shards == manifest.counts.shards_done == len(manifest.input_shards) == 2
    assert all(shard.status == DONE and shard.outputs == manifest.shards for shard in manifest.input_shards)
    examples = [e for path in scored.shard_paths() for e in scored_input.read_scored_examples(path)]
    assert len(examples) == 12 and examples[0].ref_zimg.shape == (8,)
    (tfrecord,) = scored.shard_paths("tfrecord")
    assert sorted(r[schema.KEY] for r in scored_set.iter_scored_tfrecord(tfrecord)) == sorted(e.key for e in examples)
    batch = next(
        scored_input.make_scored_dataset(
            scored.shard_paths(), ByteTokenizer(), batch_size=4, image_size=16, text_length=8, embed_dim=8, seed=0
        ).as_numpy_iterator()
    )
    assert batch["ref_zimg"].shape == (4, 8)


def test_a_current_batch_of_the_same_reference_reads_beside_a_version_1_batch(tmp_path):
    """Scoring the same corpus again with the version-1 checkpoint adds a batch of the current version with the same
    embeddings, and a reader takes both batches together."""
    from pipelines import score

    output = tmp_path / "scored"
    shutil.copytree(SCORED, output)
    corpus = tmp_path / "corpus"
    shutil.copytree(FIXTURES / "corpus", corpus)
    summary = score.run(
        [
            f"--input={corpus}/web/*.tar",
            f"--output={output}",
            f"--reference_checkpoint={REFERENCE}",
            "--min_image_size=4",
            "--inference_batch_size=8",
            "--incremental",
        ]
    )
    assert summary["scored"] == 12
    scored = scored_set.open_scored(str(output))
    assert [m.schema_version for m in scored.manifests] == [1, schema.SCHEMA_VERSION]
    old, new = ({row[schema.KEY]: row for row in pq.read_table(m.shard_paths()).to_pylist()} for m in scored.manifests)
    assert sorted(old) == sorted(new)
    # Byte-identical within one environment; the fixture was made beside another tensorflow wheel, whose float32
    # rounding moves a few stored float16 values by one step (2**-10 relative).
    for key, row in new.items():
        for name in (schema.REF_IMAGE_EMBEDDING, schema.REF_TEXT_EMBEDDING):
            np.testing.assert_allclose(
                np.asarray(row[name], np.float32), np.asarray(old[key][name], np.float32), rtol=2**-10, atol=2**-24
            )
        assert row[schema.REF_LOSS] == pytest.approx(old[key][schema.REF_LOSS], rel=1e-6)
    assert scored.scored == 24
