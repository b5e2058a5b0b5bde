import glob
import os
import posixpath

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.shared import batches, scored_set
from curation.shared.corpus import CorpusRecord
from curation.shared.corpus_readers import iter_corpus
from curation.shared.manifest import DONE, FAILED, MANIFEST_NAME, Manifest, ScoredShardsError
from curation.shared.validation import ValidationOptions, decode_image
from models import checkpoint
from models.preprocessing import ImagePreprocessing
from models.two_towers import TwoTower, init_params
from pipelines import references, score
from pipelines.jax_inference import DualEncoderHandler, PreparedExample

SUFFIX = {"wds": "tar", "parquet": "parquet", "tfrecord": "tfrecord"}


def expected_reason(record: CorpusRecord) -> str | None:
    """The dead-letter reason the demo corpus's hidden truth calls for, or None for an example to be scored."""
    truth, detail = record.metadata["truth"], record.metadata.get("detail", "")
    if truth == "non_image":
        return "empty_image" if detail == "empty" else "not_an_image"
    return {
        "truncated_image": "corrupt_image",
        "empty_caption": "empty_caption",
        "long_caption": "caption_too_long",
        "bad_utf8": "caption_not_utf8",
    }.get(truth)


def run_score(corpus: str, format: str, output: str, checkpoint_dir: str, *extra: str, shards: str = "*") -> dict:
    # The test corpus has 32 px images, so its "degraded: crop" examples are 4-6 px: scored, as in the 64 px demo.
    return score.run(
        [
            f"--input={corpus}/web/{shards}.{SUFFIX[format]}",
            f"--input_format={format}",
            f"--output={output}",
            f"--reference_checkpoint={checkpoint_dir}",
            "--min_image_size=4",
            *extra,
        ]
    )


def batch_manifest(summary: dict) -> Manifest:
    return next(
        m
        for m in batches.read_manifests(posixpath.dirname(summary["batch_dir"]))
        if m.batch_dir == summary["batch_dir"]
    )


@pytest.fixture(scope="module")
def wds_run(web_corpora, reference_checkpoint, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("scored") / "out")
    summary = run_score(web_corpora["wds"], "wds", output, reference_checkpoint, "--output_format=parquet,tfrecord")
    return summary, batch_manifest(summary)


def check_run_against_truth(corpus: str, format: str, manifest: Manifest) -> None:
    records = [item for item in iter_corpus(f"{corpus}/web/*.{SUFFIX[format]}", format)]
    assert all(isinstance(item, CorpusRecord) for item in records)
    expected = {record.key: expected_reason(record) for record in records}
    injected = set(expected.values()) - {None}
    assert injected == {
        "empty_image",
        "not_an_image",
        "corrupt_image",
        "empty_caption",
        "caption_too_long",
        "caption_not_utf8",
    }, "the corpus should carry every broken kind"

    dead = pq.read_table(os.path.join(manifest.batch_dir, manifest.dead_letter_shards[0])).to_pylist()
    scored = [row for path in manifest.shard_paths("parquet") for row in pq.read_table(path).to_pylist()]
    assert {row["key"]: row["reason"] for row in dead} == {k: r for k, r in expected.items() if r is not None}
    assert sorted(row["key"] for row in scored) == sorted(k for k, r in expected.items() if r is None)
    assert all(row["stage"] in ("decode", "caption") and row["message"] and row["source"] for row in dead)

    counts = manifest.counts
    assert counts.read == len(records) == counts.scored + counts.dead_lettered
    assert counts.scored == len(scored)
    assert counts.dead_letter == {reason: list(expected.values()).count(reason) for reason in injected}
    # The manifest lists exactly the shards present (besides itself).
    present = sorted(os.listdir(manifest.batch_dir))
    assert present == sorted(manifest.shards + manifest.dead_letter_shards + [MANIFEST_NAME])
    assert sorted(os.path.basename(shard.path) for shard in manifest.input_shards) == sorted(
        os.path.basename(p) for p in glob.glob(f"{corpus}/web/*.{SUFFIX[format]}")
    )
    # Each input shard is done, with its size, and names the scored files holding its records (and only those).
    holders = {}
    for name in manifest.shards:
        for source in scored_set.sources_of(os.path.join(manifest.batch_dir, name)):
            holders.setdefault(source, set()).add(name)
    for shard in manifest.input_shards:
        assert shard.status == DONE and shard.size_bytes == os.path.getsize(shard.path)
        assert set(shard.outputs) == holders[shard.path] and shard.outputs
    assert (counts.shards, counts.shards_done, counts.shards_failed) == (len(manifest.input_shards),) * 2 + (0,)


def test_wds_end_to_end_counts_add_up_per_injected_reason(wds_run, web_corpora):
    summary, manifest = wds_run
    check_run_against_truth(web_corpora["wds"], "wds", manifest)
    assert summary["read"] == manifest.counts.read and summary["examples_per_second"] > 0


@pytest.mark.parametrize("format", ["parquet", "tfrecord"])
def test_parquet_and_tfrecord_inputs_end_to_end(web_corpora, reference_checkpoint, tmp_path, format):
    summary = run_score(web_corpora[format], format, str(tmp_path / "out"), reference_checkpoint)
    check_run_against_truth(web_corpora[format], format, batch_manifest(summary))


def direct_embeddings(checkpoint_dir: str, image_bytes: list[bytes], captions: list[str]):
    restored = checkpoint.restore(checkpoint_dir)
    length = restored.config.text_length
    preprocessing = restored.config.preprocessing()
    pixels = np.stack(
        [preprocessing.resize_pixels(decode_image(data, ValidationOptions(min_image_size=1))) for data in image_bytes]
    )
    tokens = restored.tokenizer.encode_batch(captions, length)
    zimg, ztxt, aux = TwoTower(restored.config).apply(
        {"params": restored.params}, preprocessing.normalize(pixels), tokens
    )
    return np.asarray(zimg), np.asarray(ztxt), float(aux["t"]), float(aux["b"])


def test_stored_embeddings_and_scores_equal_a_direct_model_call(wds_run, reference_checkpoint):
    _, manifest = wds_run
    table = pq.read_table(manifest.shard_paths("parquet"))
    rows = table.to_pylist()
    zimg, ztxt, t, c = direct_embeddings(reference_checkpoint, [r["image"] for r in rows], [r["caption"] for r in rows])
    stored_img = np.stack(table.column("ref_image_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    stored_txt = np.stack(table.column("ref_text_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert table.schema.field("ref_image_embedding").type.value_type == "halffloat"
    np.testing.assert_allclose(stored_img, zimg, atol=1e-3)
    np.testing.assert_allclose(stored_txt, ztxt, atol=1e-3)
    assert (manifest.reference.temperature, manifest.reference.bias) == pytest.approx((t, c))
    cosine = (stored_img * stored_txt).sum(axis=1)
    np.testing.assert_allclose(table.column("ref_cosine").to_numpy(), cosine, rtol=1e-5, atol=1e-6)
    logit = t * cosine + c
    np.testing.assert_allclose(table.column("ref_logit").to_numpy(), logit, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table.column("ref_loss").to_numpy(), np.logaddexp(0, -logit), rtol=1e-5)


def test_the_handler_gives_the_same_embeddings_whatever_the_batch(web_corpora, reference_checkpoint):
    records = [r for r in iter_corpus(f"{web_corpora['wds']}/web/00000.tar", "wds") if expected_reason(r) is None]
    restored = checkpoint.restore(reference_checkpoint)
    examples = [
        PreparedExample(
            r.key,
            r.source,
            r.caption,
            r.image,
            ImagePreprocessing(32).resize_pixels(decode_image(r.image, ValidationOptions(min_image_size=1))),
            restored.tokenizer.encode(r.caption, 32),
            {},
        )
        for r in records[:20]
    ]
    zimg, ztxt, _, _ = direct_embeddings(
        reference_checkpoint, [r.image for r in records[:20]], [r.caption for r in records[:20]]
    )
    handler = DualEncoderHandler(references.resolve(reference_checkpoint), batch_size=8)  # 20 run as 8 + 8 + 4 padded
    model = handler.load_model()
    for beam_batch in (1, 7, 20):
        results = [
            result
            for start in range(0, 20, beam_batch)
            for result in handler.run_inference(examples[start : start + beam_batch], model)
        ]
        assert [result.example.key for result in results] == [example.key for example in examples]
        got_img = np.stack([result.inference.image for result in results])
        got_txt = np.stack([result.inference.text for result in results])
        np.testing.assert_allclose(got_img, zimg, atol=1e-5, err_msg=f"Beam batch {beam_batch}")
        np.testing.assert_allclose(got_txt, ztxt, atol=1e-5, err_msg=f"Beam batch {beam_batch}")


def test_tfrecord_output_reads_with_plain_tf_data_and_matches_parquet(wds_run):
    import tensorflow as tf

    _, manifest = wds_run
    parquet = {row["key"]: row for row in pq.read_table(manifest.shard_paths("parquet")).to_pylist()}
    spec = {
        "key": tf.io.FixedLenFeature([], tf.string),
        "caption": tf.io.FixedLenFeature([], tf.string),
        "ref_image_embedding": tf.io.FixedLenFeature([32], tf.float32),
        "ref_loss": tf.io.FixedLenFeature([], tf.float32),
    }
    dataset = tf.data.TFRecordDataset(manifest.shard_paths("tfrecord")).map(
        lambda data: tf.io.parse_single_example(data, spec)
    )
    seen = 0
    for example in dataset.as_numpy_iterator():
        row = parquet[example["key"].decode()]
        assert example["caption"].decode() == row["caption"]
        np.testing.assert_array_equal(
            example["ref_image_embedding"], np.asarray(row["ref_image_embedding"], np.float16).astype(np.float32)
        )
        assert example["ref_loss"] == pytest.approx(row["ref_loss"])
        seen += 1
    assert seen == len(parquet) == manifest.counts.scored


def test_an_unreadable_shard_fails_the_job_or_is_listed_failed_and_scored_again(
    web_corpora, reference_checkpoint, tmp_path
):
    corpus, output = web_corpora["wds"], str(tmp_path / "out")
    wrong = [
        f"--input={corpus}/web/00000.tar",
        "--input_format=parquet",
        f"--output={output}",
        f"--reference_checkpoint={reference_checkpoint}",
    ]  # tar shards read as Parquet
    with pytest.raises(Exception, match="could not be read whole"):
        score.run(wrong)
    assert batches.read_manifests(output) == []
    allowed = score.run([*wrong, "--allow_failed_shards"])
    (shard,) = batch_manifest(allowed).input_shards
    assert shard.status == FAILED and shard.reason.startswith("unreadable_shard")
    assert shard.outputs == [] and batch_manifest(allowed).counts.shards_failed == 1
    assert allowed["read"] == allowed["scored"] == 0  # nothing of the shard was taken for records
    skipped = run_score(
        corpus, "wds", output, reference_checkpoint, "--incremental", "--skip_failed_shards", shards="00000"
    )
    assert skipped["batch_dir"] is None and skipped["skipped_shards"] == 1
    right = run_score(corpus, "wds", output, reference_checkpoint, "--incremental", shards="00000")
    assert right["scored"] > 0 and [s.status for s in batch_manifest(right).input_shards] == [DONE]


def test_incremental_with_another_spelling_of_the_same_shards_scores_nothing(
    web_corpora, reference_checkpoint, tmp_path, monkeypatch
):
    corpus, output = web_corpora["wds"], str(tmp_path / "out")
    first = run_score(corpus, "wds", output, reference_checkpoint, shards="0000[01]")
    assert first["scored"] > 0
    monkeypatch.chdir(os.path.join(corpus, "web"))
    again = score.run(
        [
            "--input=./00000.tar,../web/00001.tar",
            f"--output={output}",
            "--incremental",
            f"--reference_checkpoint={reference_checkpoint}",
            "--min_image_size=4",
        ]
    )
    assert again["batch_dir"] is None and again["skipped_shards"] == 2
    # A shard that changed since is scored again.
    path = os.path.join(corpus, "web", "00001.tar")
    os.utime(path, (1, 1))
    changed = score.run(
        [
            "--input=./00001.tar",
            f"--output={output}",
            "--incremental",
            f"--reference_checkpoint={reference_checkpoint}",
            "--min_image_size=4",
        ]
    )
    assert [shard.path for shard in batch_manifest(changed).input_shards] == [os.path.realpath(path)]


def test_incremental_run_scores_only_new_shards(web_corpora, reference_checkpoint, tmp_path):
    corpus, output = web_corpora["wds"], str(tmp_path / "out")
    first = run_score(corpus, "wds", output, reference_checkpoint, shards="0000[01]")
    with pytest.raises(SystemExit, match="--incremental"):
        run_score(corpus, "wds", output, reference_checkpoint)
    second = run_score(corpus, "wds", output, reference_checkpoint, "--incremental")
    assert [os.path.basename(shard.path) for shard in batch_manifest(second).input_shards] == ["00002.tar"]
    assert first["read"] + second["read"] == 120
    nothing = run_score(corpus, "wds", output, reference_checkpoint, "--incremental")
    assert nothing["batch_dir"] is None and nothing["skipped_shards"] == 3

    scored = scored_set.open_scored(output)
    keys = [
        key for path in scored.shard_paths() for key in pq.read_table(path, columns=["key"]).column("key").to_pylist()
    ]
    assert len(keys) == len(set(keys)) == scored.scored == first["scored"] + second["scored"]


def test_another_reference_is_refused_unless_forced(web_corpora, reference_checkpoint, tmp_path):
    corpus, output = web_corpora["wds"], str(tmp_path / "out")
    restored = checkpoint.restore(reference_checkpoint)
    other = str(tmp_path / "other")
    checkpoint.save(
        other, init_params(restored.config, __import__("jax").random.key(1)), restored.config, restored.tokenizer
    )
    run_score(corpus, "wds", output, reference_checkpoint, shards="00000")
    with pytest.raises(SystemExit, match="--force_new_reference"):
        run_score(corpus, "wds", output, other, "--incremental", shards="00001")
    run_score(corpus, "wds", output, other, "--incremental", "--force_new_reference", shards="00000")
    with pytest.raises(ScoredShardsError, match="different reference"):
        scored_set.open_scored(output)
    only_new = scored_set.open_scored(output, fingerprint=checkpoint.read_meta(other)["fingerprint"])
    assert len(only_new.manifests) == 1 and only_new.scored > 0


def test_gcs_input_to_gcs_output(gcs_bucket, web_corpora, reference_checkpoint):
    from apache_beam.io.filesystems import FileSystems

    corpus = web_corpora["tfrecord"]
    for path in sorted(glob.glob(f"{corpus}/web/*.tfrecord"))[:2]:
        with FileSystems.create(f"{gcs_bucket}/web/{os.path.basename(path)}") as upload, open(path, "rb") as f:
            upload.write(f.read())
    output = f"{gcs_bucket}/scored"
    summary = score.run(
        [
            f"--input={gcs_bucket}/web/*.tfrecord",
            "--input_format=tfrecord",
            f"--output={output}",
            "--min_image_size=4",
            f"--reference_checkpoint={reference_checkpoint}",
            "--output_format=parquet,tfrecord",
        ]
    )
    assert summary["batch_dir"].startswith(f"{output}/batch-")
    scored = scored_set.open_scored(output)  # checks every listed file exists in the bucket
    manifest = scored.manifests[0]
    assert all(shard.path.startswith("gs://") for shard in manifest.input_shards) and len(manifest.input_shards) == 2
    table = __import__("pyarrow").concat_tables(
        [scored_set.read_scored_parquet(path) for path in scored.shard_paths("parquet")]
    )
    tf_rows = [row for path in scored.shard_paths("tfrecord") for row in scored_set.iter_scored_tfrecord(path)]
    assert table.num_rows == len(tf_rows) == manifest.counts.scored > 0
    dead = scored_set.read_scored_parquet(posixpath.join(manifest.batch_dir, manifest.dead_letter_shards[0]))
    assert manifest.counts.read == 80 == table.num_rows + dead.num_rows


def test_two_multiprocessing_workers_score_the_same_as_one(web_corpora, reference_checkpoint, tmp_path, monkeypatch):
    import subprocess

    def scored_values(summary):
        table = pq.read_table(batch_manifest(summary).shard_paths("parquet"))
        return {
            row["key"]: (np.asarray(row["ref_image_embedding"], np.float32).tobytes(), row["ref_loss"])
            for row in table.to_pylist()
        }

    workers = []  # pids of the SDK worker processes the runner starts

    class RecordingPopen(subprocess.Popen):
        def __init__(self, args, *rest, **kwargs):
            super().__init__(args, *rest, **kwargs)
            if "sdk_worker_main" in str(args):
                workers.append(self.pid)

    one = run_score(web_corpora["wds"], "wds", str(tmp_path / "one"), reference_checkpoint)
    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    # FnApiRunner by name: DirectRunner would first try Prism (a download) and fall back to FnApiRunner on failing.
    two = run_score(
        web_corpora["wds"],
        "wds",
        str(tmp_path / "two"),
        reference_checkpoint,
        "--runner=FnApiRunner",
        "--direct_num_workers=2",
        "--direct_running_mode=multi_processing",
    )
    monkeypatch.undo()
    # Two SDK worker processes were started; the runner splits each stateless stage's input between them.
    assert len(set(workers)) == 2
    assert scored_values(one) == scored_values(two)
    assert len(scored_values(one)) == one["scored"] == two["scored"]
    assert one["dead_letter"] == two["dead_letter"]
