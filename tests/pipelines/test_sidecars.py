"""The sidecar layout: scores beside the corpus, one file per input shard, row i for item i of the shard."""

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import posixpath
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from curation.shared import batches, schema, sidecars
from curation.shared.corpus import CorpusRecord
from curation.shared.corpus_readers import read_shard
from curation.shared.manifest import SIDECAR_DIR, ScoredShardsError
from curation.trainer import configs, scored_input
from curation.trainer.training_data import TrainingData
from pipelines import score
from tests.pipelines.test_score import batch_manifest, run_score

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def corpus(web_corpora, tmp_path_factory) -> str:
    """The wds test corpus (every broken kind) with read errors too: its first shard gains an image without a
    caption and a second sample of an earlier key, in the middle of the shard."""
    root = tmp_path_factory.mktemp("sidecar_corpus") / "corpus"
    shutil.copytree(web_corpora["wds"], root)
    first = sorted((root / "web").glob("*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar if member.isfile()]
    middle = len(members) // 2 - len(members) // 2 % 2
    while members[middle][0].name.split(".")[0] == members[middle - 1][0].name.split(".")[0]:
        middle += 1  # between two samples
    first_key = members[0][0].name.split(".")[0]
    again = [(member.name, data) for member, data in members if member.name.split(".")[0] == first_key]
    with tarfile.open(first, "w") as tar:
        for index, (member, data) in enumerate(members):
            if index == middle:  # an image without a caption, then the first sample again (a duplicate key)
                for name, payload in [("orphan-image.jpg", members[0][1]), *again]:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
            tar.addfile(member, io.BytesIO(data))
    return str(root)


@pytest.fixture(scope="module")
def copied_run(corpus, reference_checkpoint, tmp_path_factory):
    summary = run_score(corpus, "wds", str(tmp_path_factory.mktemp("copied") / "out"), reference_checkpoint)
    return batch_manifest(summary)


@pytest.fixture(scope="module")
def sidecar_run(corpus, reference_checkpoint, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("sidecar") / "out")
    summary = run_score(
        corpus, "wds", output, reference_checkpoint, "--output_layout=sidecar", "--output_format=parquet,tfrecord"
    )
    return batch_manifest(summary)


def test_copied_layout_parquet_is_zstd_in_large_row_groups(copied_run):
    for path in copied_run.shard_paths("parquet") + [
        os.path.join(copied_run.batch_dir, name) for name in copied_run.dead_letter_shards
    ]:
        metadata = pq.ParquetFile(path).metadata
        assert metadata.row_group(0).column(0).compression == "ZSTD"
        # Row groups hold ~64 MB or every row the writer had: this small batch is one group per file.
        assert metadata.num_row_groups == 1, (path, metadata.num_row_groups)


def test_one_sidecar_per_input_shard_lines_up_with_it_item_for_item(corpus, sidecar_run, copied_run):
    shards = sorted(str(path) for path in (pathlib.Path(corpus) / "web").glob("*.tar"))
    assert sorted(shard.path for shard in sidecar_run.input_shards) == shards
    copied = {row["key"]: row for path in copied_run.shard_paths("parquet") for row in pq.read_table(path).to_pylist()}
    dead = {
        row["key"]: row
        for name in copied_run.dead_letter_shards
        for row in pq.read_table(os.path.join(copied_run.batch_dir, name)).to_pylist()
        if row["stage"] != "read"
    }  # (a read error's key may be a record's too: the duplicate key)
    reasons_seen = set()
    for shard in sidecar_run.input_shards:
        sidecar = os.path.join(os.path.dirname(sidecar_run.batch_dir), shard.sidecar)
        assert os.path.dirname(sidecar) == os.path.join(sidecar_run.batch_dir, SIDECAR_DIR)
        rows = pq.read_table(sidecar).to_pylist()  # plain pyarrow
        items = list(read_shard(shard.path, "wds"))
        assert [row["key"] for row in rows] == [item.key for item in items]
        for row, item in zip(rows, items):
            if not isinstance(item, CorpusRecord):  # a read error, in its place
                assert (row["stage"], row["reason"]) == ("read", item.reason) and row["ref_cosine"] is None
                reasons_seen.add(item.reason)
            elif item.key in dead:
                assert (row["stage"], row["reason"], row["message"]) == tuple(
                    dead[item.key][name] for name in ("stage", "reason", "message")
                )
                assert row["ref_image_embedding"] is None and row["ref_loss"] is None and row["caption"] is None
                reasons_seen.add(row["reason"])
            else:
                expected = copied[item.key]
                assert row["reason"] is None and row["caption"] == expected["caption"]
                # the bytes' hash, as the corpus stores them, in both layouts
                assert row["image_sha256"] == expected["image_sha256"] == hashlib.sha256(item.image).hexdigest()
                assert row["image_thumbnail"] == expected["image_thumbnail"] and len(row["image_thumbnail"]) == 768
                for name in (*schema.EMBEDDINGS, *schema.SCORES):
                    np.testing.assert_array_equal(
                        np.asarray(row[name], np.float32), np.asarray(expected[name], np.float32)
                    )
        # The TFRecord sidecar beside it holds the same rows, read with plain tf.data.
        frames = list(tf.data.TFRecordDataset(sidecar.replace(".parquet", ".tfrecord")).as_numpy_iterator())
        assert [schema.decode_sidecar_example(frame)["key"] for frame in frames] == [row["key"] for row in rows]
    assert {"missing_caption", "duplicate_key", "corrupt_image", "not_an_image"} <= reasons_seen
    # Counts add up as in the copied layout, read errors included.
    counts, expected = sidecar_run.counts, copied_run.counts
    assert (counts.read, counts.scored, counts.dead_letter) == (expected.read, expected.scored, expected.dead_letter)
    assert counts.read == counts.scored + counts.dead_lettered
    assert sidecar_run.shards == [] and sidecar_run.dead_letter_shards == []  # nothing copied
    info = sidecars.read_sidecar_info(
        os.path.join(os.path.dirname(sidecar_run.batch_dir), sidecar_run.input_shards[0].sidecar)
    )
    assert (info.input_shard, info.size_bytes) == (
        sidecar_run.input_shards[0].path,
        os.path.getsize(sidecar_run.input_shards[0].path),
    )
    assert info.reference_fingerprint == sidecar_run.reference_fingerprint
    assert info.schema_version == schema.SCHEMA_VERSION == 4


def test_a_sidecar_of_an_earlier_schema_version_is_not_adopted(tmp_path):
    output = tmp_path / "out"
    folder = output / "batch-20260101T000000Z-abcdef" / SIDECAR_DIR  # a batch that never wrote its manifest
    folder.mkdir(parents=True)
    table = schema.sidecar_table([{"key": "k0", "reason": "empty_caption", "stage": "caption"}], 4)
    for version in (2, schema.SCHEMA_VERSION - 1, schema.SCHEMA_VERSION):
        info = sidecars.SidecarInfo(
            f"/corpus/{version}.tar", 1, 0.0, "f" * 64, {}, 1, 0, {"empty_caption": 1}, folder.parent.name, version
        )
        sidecars.write_sidecar(str(folder / f"{version}.parquet"), table, info)
        if version == 2:  # a footer written before versions were recorded reads as version 2
            assert dataclasses.replace(info, schema_version=2) == sidecars.SidecarInfo.from_json(
                json.dumps({k: v for k, v in dataclasses.asdict(info).items() if k != "schema_version"}), "x"
            )
    found = sidecars.resumable_sidecars(str(output), "f" * 64, {})
    assert sorted(found) == [f"/corpus/{schema.SCHEMA_VERSION}.tar"]


def test_the_trainer_reads_corpus_and_sidecar_as_the_copied_shards(sidecar_run, copied_run, tmp_path):
    data = TrainingData.open(configs.get_config("jest", smoke=True), "", os.path.dirname(sidecar_run.batch_dir))
    assert all(isinstance(shard, scored_input.SidecarShard) for shard in data.shards) and len(data.shards) == 3
    copied = {
        example.key: example
        for path in copied_run.shard_paths("parquet")
        for example in scored_input.read_scored_examples(path)
    }
    from_sidecars = [example for shard in data.shards for example in scored_input.read_sidecar_examples(shard)]
    assert sorted(example.key for example in from_sidecars if example) == sorted(copied)
    for example in filter(None, from_sidecars):
        expected = copied[example.key]
        assert (example.image, example.caption, example.clean) == (expected.image, expected.caption, expected.clean)
        np.testing.assert_array_equal(example.ref_zimg, expected.ref_zimg)
        assert example.difficulty == pytest.approx(expected.difficulty)
    # A shard that no longer matches its sidecar is refused, naming both.
    shard = data.shards[0]
    changed = dict(vars(shard), corpus=data.shards[1].corpus)
    with pytest.raises(ScoredShardsError, match="changed after it was scored"):
        scored_input.read_sidecar_examples(scored_input.SidecarShard(**changed))


_KILL_AFTER_ONE_SIDECAR = """
import os, sys
from curation.shared import batches, sidecars
from curation.shared.manifest import SIDECAR_DIR, ScoredShardsError
from pipelines import score

original = sidecars.write_sidecar

def write_then_die(*args, **kwargs):
    path = original(*args, **kwargs)
    os._exit(9)  # killed: no cleanup, no manifest

sidecars.write_sidecar = write_then_die
score.main(sys.argv[1:])
"""


def test_a_killed_run_resumes_with_the_shards_it_had_not_finished(corpus, reference_checkpoint, sidecar_run, tmp_path):
    output = str(tmp_path / "out")
    argv = [
        f"--input={corpus}/web/*.tar",
        f"--output={output}",
        f"--reference={reference_checkpoint}",
        "--min_image_size=4",
        "--output_layout=sidecar",
        "--output_format=parquet,tfrecord",
    ]
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_ONE_SIDECAR, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert batches.read_manifests(output) == []
    [unfinished] = batches.unfinished_batches(output)
    [finished] = [
        path
        for path in os.listdir(os.path.join(unfinished, SIDECAR_DIR))
        if path.endswith(".parquet") and not path.startswith(".")
    ]

    summary = score.run(argv)  # the same command again
    [resumed] = batches.read_manifests(output)
    written = sorted(
        name for name in os.listdir(os.path.join(summary["batch_dir"], SIDECAR_DIR)) if name.endswith(".parquet")
    )
    assert len(written) == 2 and finished not in written  # only the two shards the killed run had not finished
    adopted = [shard for shard in resumed.input_shards if shard.sidecar.endswith(finished)]
    assert len(adopted) == 1 and adopted[0].sidecar.startswith(posixpath.basename(unfinished))

    # The result equals the uninterrupted run: the same input shards, counts and sidecar contents.
    def contents(manifest):
        return {
            shard.path: pq.read_table(os.path.join(os.path.dirname(manifest.batch_dir), shard.sidecar))
            for shard in manifest.input_shards
        }

    assert resumed.counts == sidecar_run.counts
    assert [(s.path, s.status, s.size_bytes) for s in resumed.input_shards] == [
        (s.path, s.status, s.size_bytes) for s in sidecar_run.input_shards
    ]
    uninterrupted = contents(sidecar_run)
    for path, table in contents(resumed).items():
        assert table.equals(uninterrupted[path]), path

    # Cleaning unfinished batches keeps the sidecar the finished batch adopted, and nothing else of that folder.
    half_written = os.path.join(unfinished, SIDECAR_DIR, f".{finished}.0123.tmp")
    open(half_written, "wb").write(b"PAR1")  # as a kill mid-write leaves it
    removed = batches.remove_unfinished(output, before="batch-99991231T235959Z")
    assert removed == [half_written]
    assert sorted(os.listdir(os.path.join(unfinished, SIDECAR_DIR))) == [
        finished,
        finished.replace(".parquet", ".tfrecord"),
    ]  # with its TFRecord twin
    assert len(TrainingData.open(configs.get_config("jest", smoke=True), "", output).shards) == 3


def test_jest_smoke_trains_from_corpus_and_sidecars(corpus, sidecar_run, tmp_path):
    from curation import train

    workdir = str(tmp_path / "run")
    train.main(
        [
            "--config",
            "jest",
            "--smoke",
            "--data",
            corpus,
            "--scored",
            os.path.dirname(sidecar_run.batch_dir),
            "--workdir",
            workdir,
        ]
    )
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses and np.isfinite(losses).all() and rows[-1]["step"] > 1
    assert os.path.isdir(os.path.join(workdir, "model", "params"))
