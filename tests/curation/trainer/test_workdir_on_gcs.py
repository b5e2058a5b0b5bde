"""A training workdir on gs:// (the GCS emulator): the run's own files, orbax's checkpoints and the final model."""

import dataclasses
import json
import logging
import os
import time

import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems

from curation.trainer import configs, run_files
from curation.trainer.loop import train
from curation.trainer.metrics import read_metrics
from models import checkpoint
from tests.curation.trainer.test_loop import _killed_at_step_5, _params_bytes

SMOKE = dataclasses.replace(configs.get_config("uniform", smoke=True), eval_every=100, tokenizer="words")


def _objects(prefix: str) -> list[str]:
    return sorted(metadata.path[len(prefix) + 1 :] for metadata in FileSystems.match([prefix + "/**"])[0].metadata_list)


def test_an_ocdbt_database_on_the_emulator_revalidates_its_manifest_as_on_gcs(gcs_bucket):
    """Orbax's checkpoints are OCDBT databases; TensorStore revalidates the cached manifest with a generation
    condition before each later write. On GCS the answer is 304 (or the object with its `x-goog-generation`); an
    emulator that answers otherwise fails the next write ("Malformed StorageGeneration") and, under CPU load,
    orbax's saves with it."""
    import tensorstore as ts

    bucket = gcs_bucket[len("gs://") :]
    store = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "gcs", "bucket": bucket, "path": "ocdbt/"}}).result()
    store.write("a", b"1").result()
    assert store.read("a").result().value == b"1"
    store.write("b", b"2").result()
    assert store.read("b", staleness_bound=time.time() + 1).result().value == b"2"  # revalidated, not cached
    store.write("c", b"3").result()
    assert [store.read(key).result().value for key in ("a", "b", "c")] == [b"1", b"2", b"3"]


def test_a_run_killed_and_resumed_on_gcs_ends_as_an_uninterrupted_local_run(gcs_bucket, tiny_corpus, tmp_path, caplog):
    straight = train(SMOKE, tiny_corpus, str(tmp_path / "local"))
    workdir = f"{gcs_bucket}/runs/uniform"
    with caplog.at_level(logging.WARNING, logger="curation.trainer.metrics"):
        _killed_at_step_5(SMOKE, tiny_corpus, workdir)
    assert "not writing TensorBoard events" in caplog.text
    objects = _objects(workdir)
    assert {"config.json", "tokenizer.json", "metrics.jsonl"} <= set(objects)
    assert {name.split("/")[1] for name in objects if name.startswith("checkpoints/")} == {"2", "4"}
    assert not os.path.exists("gs:")  # nothing under a local folder named after the URL
    assert json.loads(run_files.read_text(f"{workdir}/config.json"))["tokenizer"] == "words"

    with caplog.at_level(logging.INFO, logger="curation.trainer"):
        resumed = train(SMOKE, tiny_corpus, workdir)
    assert "resumed from step 4" in caplog.text
    assert _params_bytes(resumed) == _params_bytes(straight)
    # metrics.jsonl rewritten whole (never appended): the killed run's rows up to step 4, then the resumed ones.
    local_rows = [row for row in read_metrics(str(tmp_path / "local")) if "loss" in row]
    remote_rows = [row for row in read_metrics(workdir) if "loss" in row]
    assert [row["step"] for row in remote_rows] == [row["step"] for row in local_rows] == [2, 4, 6]
    np.testing.assert_allclose([row["loss"] for row in remote_rows], [row["loss"] for row in local_rows], rtol=1e-6)
    assert run_files.read_json(f"{workdir}/tokenizer.json") == run_files.read_json(
        str(tmp_path / "local" / "tokenizer.json")
    )
    # The final model, saved on gs://, restores with its fingerprint checked.
    model = checkpoint.restore(f"{workdir}/model")
    assert _params_bytes(model.params) == _params_bytes(straight)


def test_a_workdir_on_gcs_of_another_config_is_refused_and_start_over_clears_it(gcs_bucket, tiny_corpus):
    workdir = f"{gcs_bucket}/runs/refused"
    short = dataclasses.replace(SMOKE, total_steps=2)
    first = train(short, tiny_corpus, workdir)
    other = dataclasses.replace(short, learning_rate=short.learning_rate * 2)
    with pytest.raises(ValueError, match="learning_rate"):
        train(other, tiny_corpus, workdir)
    params = train(other, tiny_corpus, workdir, start_over=True)
    assert run_files.read_json(f"{workdir}/config.json")["learning_rate"] == other.learning_rate
    assert [row["step"] for row in read_metrics(workdir) if "loss" in row] == [2]
    # The run started over (a resume of the first would have trained nothing): its model is the new params.
    assert _params_bytes(params) != _params_bytes(first)
    assert _params_bytes(checkpoint.restore(f"{workdir}/model").params) == _params_bytes(params)
