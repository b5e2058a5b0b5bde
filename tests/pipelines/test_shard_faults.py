"""A shard is done only when all of it was read: faults in the data (wrong format, truncated, zero bytes) and in the
environment (permission denied, a file that vanishes mid-read), and re-runs that complete exactly what is missing."""

import io
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from curation.shared import batches, schema, scored_set
from curation.shared.corpus import CorpusRecord
from curation.shared.corpus_writers import open_shard_writer
from curation.shared.manifest import DONE, FAILED
from pipelines import score

SHARDS, PER_SHARD = 4, 6
FAULTY = "00002.tar"


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    for shard in range(SHARDS):
        path = str(folder / f"{shard:05d}.tar")
        with open_shard_writer(path, "wds") as writer:
            for index in range(PER_SHARD):
                writer.write(CorpusRecord(f"s{shard}-{index}", jpeg(shard * 100 + index), f"caption {index}", path))
    return folder


def job(corpus, output, checkpoint, *extra):
    return score.run(
        [
            f"--input={corpus}/*.tar",
            f"--output={output}",
            f"--reference_checkpoint={checkpoint}",
            "--inference_batch_size=8",
            *extra,
        ]
    )


def readable_rows(output) -> list[dict]:
    scored = scored_set.open_scored(str(output))
    return [row for path in scored.shard_paths() for row in pq.read_table(path).to_pylist()]


def check_counts(output) -> None:
    for manifest in batches.read_manifests(str(output)):
        counts = manifest.counts
        assert counts.read == counts.scored + counts.dead_lettered
        assert counts.shards == counts.shards_done + counts.shards_failed == len(manifest.input_shards)
        done = {shard.path for shard in manifest.input_shards if shard.status == DONE}
        rows = [row for path in manifest.shard_paths() for row in pq.read_table(path).to_pylist()]
        assert {row[schema.SOURCE] for row in rows} <= done  # nothing of a shard it does not claim
        assert counts.scored == len(rows)


def check_complete(output) -> None:
    rows = readable_rows(output)
    keys = [row[schema.KEY] for row in rows]
    assert len(keys) == len(set(keys)) == SHARDS * PER_SHARD  # every record once, none twice across batches


DATA_FAULTS = {
    "wrong_format": lambda data: b"PAR1" + bytes(200) + b"PAR1",
    "truncated": lambda data: data[: len(data) // 2],
    "zero_bytes": lambda data: b"",
}


@pytest.mark.parametrize("fault", sorted(DATA_FAULTS))
def test_a_shard_with_bad_data_is_never_half_scored(corpus, reference_checkpoint, tmp_path, fault):
    output = tmp_path / "out"
    original = (corpus / FAULTY).read_bytes()
    (corpus / FAULTY).write_bytes(DATA_FAULTS[fault](original))
    with pytest.raises(Exception, match=f"could not be read whole.*{FAULTY}"):
        job(corpus, output, reference_checkpoint)
    assert batches.read_manifests(str(output)) == []  # no manifest claims anything

    allowed = job(corpus, output, reference_checkpoint, "--allow_failed_shards", "--clean_unfinished")
    (manifest,) = batches.read_manifests(str(output))
    failed = [shard for shard in manifest.input_shards if shard.status == FAILED]
    assert [os.path.basename(shard.path) for shard in failed] == [FAULTY] and failed[0].outputs == []
    assert allowed["read"] == allowed["scored"] == (SHARDS - 1) * PER_SHARD
    assert all(not row[schema.SOURCE].endswith(FAULTY) for row in readable_rows(output))
    check_counts(output)

    (corpus / FAULTY).write_bytes(original)
    again = job(corpus, output, reference_checkpoint, "--incremental")
    assert again["scored"] == PER_SHARD and again["input_shards"] == 1
    check_counts(output)
    check_complete(output)


def failing_open(real_open, fault: str):
    """FileSystems.open that fails on the faulty shard: at once (permission) or after its first bytes (vanished)."""

    class Vanishing:
        def __init__(self, raw):
            self._raw, self._read = raw, 0

        def read(self, size=-1):
            if self._read > 1024:
                raise FileNotFoundError(f"{FAULTY} was removed while it was read")
            data = self._raw.read(size if 0 <= size <= 1024 else 1024)
            self._read += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self._raw, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self._raw.close()

    def open_(path, *args, **kwargs):
        if path.endswith(FAULTY):
            if fault == "permission_denied":
                raise PermissionError(13, "Permission denied", path)
            return Vanishing(real_open(path, *args, **kwargs))
        return real_open(path, *args, **kwargs)

    return open_


@pytest.mark.parametrize("fault", ["permission_denied", "vanished"])
def test_an_unreadable_file_fails_the_job_naming_it_and_marks_nothing_done(
    corpus, reference_checkpoint, tmp_path, monkeypatch, fault
):
    output = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(FileSystems, "open", staticmethod(failing_open(FileSystems.open, fault)))
        with pytest.raises(Exception, match=f"cannot read input shard .*{FAULTY}"):
            job(corpus, output, reference_checkpoint)
    assert batches.read_manifests(str(output)) == []
    again = job(corpus, output, reference_checkpoint, "--incremental", "--clean_unfinished")
    assert again["scored"] == SHARDS * PER_SHARD
    check_counts(output)
    check_complete(output)
    shutil.rmtree(output)
