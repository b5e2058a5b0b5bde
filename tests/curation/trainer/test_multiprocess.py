"""Training under jax.distributed: 2 processes × 2 CPU devices on localhost (gloo), against 1 process × 4 devices."""

import dataclasses
import os

import numpy as np
import pytest

from curation.trainer import configs
from curation.trainer.metrics import read_metrics
from tests.processes import run_training

JEST = dataclasses.replace(configs.get_config("jest", smoke=True), eval_every=100)


def _run(config=JEST, **run):
    return dict(config=dataclasses.asdict(config), **run)


@pytest.fixture(scope="module")
def sidecars(tiny_corpus, reference_checkpoint, tmp_path_factory):
    """The tiny corpus's 3 web shards scored into sidecars beside it (the hosts read corpus + sidecars)."""
    from pipelines import score

    output = str(tmp_path_factory.mktemp("sidecars") / "scored")
    score.run(
        [
            f"--input={tiny_corpus}/web/*.tar",
            f"--output={output}",
            f"--reference_checkpoint={reference_checkpoint}",
            "--min_image_size=4",
            "--output_layout=sidecar",
        ]
    )
    return output


@pytest.fixture(scope="module")
def two_processes(tiny_corpus, sidecars, tmp_path_factory):
    """A 6-step JEST run in 2 processes × 2 devices, each process's local super-batches recorded."""
    root = tmp_path_factory.mktemp("two_processes")
    workdir = str(root / "run")
    results = run_training(
        2,
        2,
        str(root / "results"),
        **_run(data=tiny_corpus, scored=sidecars, workdir=workdir, record_batches_to=str(root / "batches")),
    )
    return {"results": results, "workdir": workdir, "batches": str(root / "batches"), "root": root}


def test_each_host_reads_its_own_shards_and_each_example_is_once_in_the_global_batch(two_processes):
    first, second = two_processes["results"]
    assert int(first["process_count"]) == 2 and int(first["device_count"]) == 4
    # The hosts' shards are disjoint and together every training shard.
    assert len(first["shards"]) and len(second["shards"])
    assert not set(first["shards"]) & set(second["shards"])
    steps = JEST.total_steps
    half = JEST.superbatch_size // 2
    assert first["local"].shape[:2] == second["local"].shape[:2] == (steps, half)
    for step in range(steps):
        # The global super-batch the step trained from is process 0's rows, then process 1's: each once.
        expected = np.concatenate([first["local"][step], second["local"][step]])
        np.testing.assert_array_equal(first["global_rows"][step], expected)
        np.testing.assert_array_equal(second["global_rows"][step], expected)
    # Each host read its own records in its stream's order, each once per pass: (epoch, shard, record) rises.
    for result in (first, second):
        read = [tuple(row[:3]) for row in result["positions"].reshape(-1, 4)]
        assert read == sorted(set(read))
    # Selection is global: both processes chose the same indices, from the whole super-batch.
    np.testing.assert_array_equal(first["indices"], second["indices"])
    assert first["indices"].max() >= half  # picks from the other host's rows too
    assert first["params"] == second["params"]


def test_only_process_0_writes_the_run_files(two_processes):
    workdir = two_processes["workdir"]
    rows = [row for row in read_metrics(workdir) if "loss" in row]
    assert [row["step"] for row in rows] == [2, 4, 6]  # each logged step once, not once per process
    events = [name for name in os.listdir(os.path.join(workdir, "tensorboard")) if "tfevents" in name]
    assert len(events) == 1
    assert rows[-1]["superbatch_examples_seen"] == JEST.total_steps * JEST.superbatch_size


def test_the_same_global_batches_select_and_learn_as_one_process_of_four_devices(two_processes, tiny_corpus, sidecars):
    root = two_processes["root"]
    combined = root / "combined"
    combined.mkdir()
    for step in range(1, JEST.total_steps + 1):
        parts = [
            np.load(os.path.join(two_processes["batches"], f"process_{index}", f"step_{step}.npz")) for index in (0, 1)
        ]
        np.savez(
            combined / f"step_{step}.npz",
            **{name: np.concatenate([part[name] for part in parts]) for name in parts[0].files},
        )
    workdir = str(root / "one_process")
    (single,) = run_training(
        1,
        4,
        str(root / "single"),
        **_run(data=tiny_corpus, scored=sidecars, workdir=workdir, batches_from=str(combined)),
    )
    assert int(single["device_count"]) == 4
    first = two_processes["results"][0]
    np.testing.assert_array_equal(single["indices"], first["indices"])
    two = [row for row in read_metrics(two_processes["workdir"]) if "loss" in row]
    one = [row for row in read_metrics(workdir) if "loss" in row]
    assert [row["step"] for row in one] == [row["step"] for row in two]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3, abs=1e-5)


def test_a_killed_two_process_run_resumes_to_exactly_the_uninterrupted_params(two_processes, tiny_corpus, sidecars):
    root = two_processes["root"]
    workdir = str(root / "killed")
    run = _run(data=tiny_corpus, scored=sidecars, workdir=workdir)
    killed = run_training(2, 2, str(root / "killed_results"), kill_at=5, **run)
    assert all(bool(result["killed"]) for result in killed)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    resumed = run_training(2, 2, str(root / "resumed_results"), **run)
    assert "resumed from step 4" in resumed[0]["log"]
    straight = two_processes["results"]
    assert resumed[0]["params"] == resumed[1]["params"] == straight[0]["params"]
    # Each process went on from its own data position: the resumed steps read what the straight run's did.
    np.testing.assert_array_equal(resumed[0]["local"], straight[0]["local"][4:])
    np.testing.assert_array_equal(resumed[1]["local"], straight[1]["local"][4:])


def test_data_positions_travel_between_processes_beyond_int32():
    from curation.trainer.distributed import from_halves, to_halves

    values = [0, 1, 2**31 - 1, 2**31, 12_345_678_901, 2**62 - 1]
    halves = to_halves(values)
    assert halves.dtype == np.int32
    assert from_halves(halves) == values
