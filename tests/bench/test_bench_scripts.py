"""The helpers the benchmark scripts under bench/ rely on: the derived corpus of the "repeated" setting, the dense
selection the memory bench compares against, and the seed statistics of the ablation tables."""

import json
import os
import sys

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from curation import scored_input, scored_shards
from curation.selection import Embeddings, select

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import ablations  # noqa: E402
import loss_parameters  # noqa: E402
import selection_memory  # noqa: E402


def rows_of(output):
    return pq.read_table(scored_shards.open_scored(output).shard_paths()).to_pylist()


def test_repeated_setting_adds_copies_of_the_easiest_clean_rows(scored_tiny_corpus, tmp_path):
    out = ablations.make_repeated(scored_tiny_corpus, str(tmp_path / "repeated"), distinct=4, share=0.5)
    original, derived = rows_of(scored_tiny_corpus), rows_of(out)
    source = scored_shards.open_scored(scored_tiny_corpus)
    assert scored_shards.open_scored(out).manifests[0].reference_fingerprint == \
        source.manifests[0].reference_fingerprint

    copies = [row for row in derived if "#copy" in row["key"]]
    assert len(copies) == len(original) and len(derived) == 2 * len(original)
    assert len({row["key"] for row in derived}) == len(derived)
    assert {row["key"] for row in derived if "#copy" not in row["key"]} == {row["key"] for row in original}

    clean = sorted((row for row in original if json.loads(row["metadata"])["truth"] == "clean"),
                   key=lambda row: row["ref_loss"])
    easiest = {row["key"]: row for row in clean[:4]}
    assert {row["key"].split("#copy")[0] for row in copies} == set(easiest)
    for row in copies:
        twin = easiest[row["key"].split("#copy")[0]]
        assert row["image"] == twin["image"] and row["ref_image_embedding"] == twin["ref_image_embedding"]
        assert json.loads(row["metadata"])["truth"] == "repeat"
    # Copies do not count as clean in the selection diagnostics; the original rows still do.
    flags = {e.key: e.clean for path in scored_shards.open_scored(out).shard_paths()
             for e in scored_input.read_scored_examples(path)}
    assert all(flags[row["key"]] == 0 for row in copies)
    assert all(flags[key] == 1 for key in easiest)
    # A second call keeps what is there.
    assert ablations.make_repeated(scored_tiny_corpus, out, distinct=4, share=0.5) == out
    assert len(rows_of(out)) == len(derived)


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_comparator_picks_what_the_blocked_selection_picks(seed):
    rng = np.random.default_rng(seed)

    def embeddings(dtype):
        x, y = (rng.normal(size=(160, 16)).astype(np.float32) for _ in range(2))
        unit = lambda v: (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(dtype)  # noqa: E731
        return Embeddings(unit(x), unit(y), np.float32(10.0), np.float32(-10.0))

    learner, reference = embeddings(np.float32), embeddings(np.float16)
    key = jax.random.key(seed)
    blocked = select(key, learner, reference, method="joint", n_select=32, n_chunks=4)
    dense = selection_memory.dense_select(key, learner, reference, n_select=32, n_chunks=4)
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(blocked))
    other = selection_memory.dense_select(jax.random.key(seed + 7), learner, reference, n_select=32, n_chunks=4)
    assert not np.array_equal(np.asarray(other), np.asarray(blocked))


def test_seed_statistics_say_when_a_target_was_not_reached():
    assert ablations.mean_std([None, None]) is None
    assert ablations.fmt([None, None, None]) == "not reached"
    mean, std, n = ablations.mean_std([0.2, None, 0.4])
    assert (round(mean, 9), round(std, 9), n) == (0.3, round(np.std([0.2, 0.4], ddof=1), 9), 2)
    assert ablations.fmt([0.2, None, 0.4], digits=2) == "0.30 ± 0.14 (2/3 seeds reached)"
    assert ablations.fmt([0.5, 0.5], digits=1) == "0.5 ± 0.0"


def test_moving_average_keeps_length_and_level():
    np.testing.assert_allclose(ablations.smooth(np.full(7, 0.4)), np.full(7, 0.4))
    np.testing.assert_allclose(ablations.smooth(np.arange(6.0), window=3), [0.5, 1, 2, 3, 4, 4.5])


def summary(zeroshot, examples_ratio, flops_ratio=1.0, wall_ratio=1.0):
    total = None if flops_ratio is None else flops_ratio + 0.25  # the reference's scoring pass on top
    return {"zeroshot": zeroshot, "examples_ratio": examples_ratio, "online_flops_ratio": flops_ratio,
            "total_flops_ratio": total, "wall_ratio": wall_ratio}


def test_verdicts_say_met_or_missed_from_the_seed_means():
    summaries = {
        "learnability_f0.8": [summary(0.7, 0.1, 0.4, 0.5), summary(0.6, 0.2, 0.5, 0.7)],
        "easy_reference_f0.8": [summary(0.5, 0.5)] * 2,
        "hard_learner_f0.8": [summary(0.2, None)] * 2,
        "learnability_f0.8_flexi": [summary(0.6, 0.2, 0.5), summary(0.6, None, None)],
        "independent_f0.8": [summary(0.66, 0.3)] * 2,
        "learnability_f0.5": [summary(0.5, 0.3)] * 2,
        "independent_f0.5": [summary(0.45, 0.3)] * 2,
    }
    lines = ablations.verdicts(summaries, {"zeroshot": 0.64})
    assert "0.15x of uniform's examples (goal ≤ 0.2x: met)" in lines[0]
    assert "0.45x of its online FLOPs (goal ≤ 0.5x: met; 0.70x with the reference's scoring pass)" in lines[0]
    assert "(goal < 1x: met)" in lines[0]
    assert "ends at 0.650 against its reference's 0.640 (goal: above it: met)" in lines[1]
    assert "0.50x (1/2 seeds reached) of uniform's online FLOPs" in lines[2] and "missed" in lines[2]
    assert "in this order: met" in lines[3]
    # Joint leads by 0.05 at f = 0.5 but trails by 0.01 at f = 0.8.
    assert "+0.050 at f = 0.5, -0.010 at f = 0.8" in lines[4]
    assert "joint ahead at every f: missed; the gap growing with f: missed" in lines[4]


def test_paired_differences_are_taken_seed_by_seed():
    summaries = {"a": [{"zeroshot": 0.5, "recall": 0.02}, {"zeroshot": 0.3, "recall": 0.01}],
                 "b": [{"zeroshot": 0.4, "recall": 0.03}, {"zeroshot": 0.35, "recall": 0.005}]}
    line = ablations.paired(summaries, "a", "b")
    assert "zero-shot +0.100, -0.050 (a ahead in 1 of 2 seeds)" in line
    assert "R@1 -0.010, +0.005 (a ahead in 1 of 2 seeds)" in line


@pytest.mark.parametrize("variants", [["uniform", "learnability_f0.5", "learnability_f0.8", "independent_f0.8"],
                                      ["uniform", "learnability_f0.5"]])
def test_ablation_plots_are_written_for_a_sweep_and_without_one(tmp_path, variants):
    def run(variant, seed):
        selecting = variant != "uniform"
        return {"zeroshot": 0.3 + 0.01 * seed, "recall": 0.01,
                "curve": {"examples": [100, 200], "online_flops": [1e9, 2e9], "zeroshot": [0.2, 0.3 + 0.01 * seed]},
                "clean_curve": [[10, 0.5, 0.3], [20, 0.6, 0.3]] if selecting else None}

    summaries = {variant: [run(variant, seed) for seed in range(2)] for variant in variants}
    path = tmp_path / "plot.png"
    ablations.plot(summaries, str(path), "test", {"zeroshot": 0.5, "recall": 0.02})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_moving_average_of_a_curve_shorter_than_the_window():
    np.testing.assert_allclose(ablations.smooth(np.array([1.0, 3.0, 5.0]), window=5), [2.0, 3.0, 4.0])
    np.testing.assert_allclose(ablations.smooth(np.array([1.0, 3.0]), window=5), [1.0, 3.0])


def test_repeated_setting_is_made_again_for_another_reference(scored_tiny_corpus, tmp_path):
    out = ablations.make_repeated(scored_tiny_corpus, str(tmp_path / "repeated"), distinct=4, share=0.5)
    manifest_path = os.path.join(out, "batch-repeated", "_MANIFEST.json")
    manifest = json.loads(open(manifest_path).read())
    manifest["reference"]["fingerprint"] = "0" * 64
    open(manifest_path, "w").write(json.dumps(manifest))
    ablations.make_repeated(scored_tiny_corpus, out, distinct=4, share=0.5)
    source = scored_shards.open_scored(scored_tiny_corpus).manifests[0].reference_fingerprint
    assert scored_shards.open_scored(out).manifests[0].reference_fingerprint == source


def test_loss_parameter_summary_reads_t_b_and_the_off_diagonal_share(tmp_path):
    rows = [{"step": 10, "loss": 1.0, "t": 10.1, "b": -9.9, "offdiag_share": 0.2},
            {"step": 20, "loss": 0.9, "t": 11.0, "b": -9.0, "offdiag_share": 0.3},
            {"step": 20, "zeroshot_top1": 0.5, "i2t_r1": 0.1, "t2i_r1": 0.3, "held_out_loss": 6.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = loss_parameters.summary(str(tmp_path))
    assert summary["t"] == (10.1, 11.0) and summary["b"] == (-9.9, -9.0) and summary["offdiag_share"] == (0.2, 0.3)
    assert summary["recall"] == pytest.approx(0.2) and summary["held_out_loss"] == 6.0
