"""The helpers the benchmark scripts under bench/ rely on: the derived corpus of the "repeated" setting, the dense
selection the memory bench compares against, and the seed statistics of the ablation tables."""

import dataclasses
import json
import os
import sys

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.shared import scored_set
from curation.trainer import report, scored_input
from curation.trainer.selection import Embeddings, select
from curation.trainer.truth import BUCKETS, NOISE_KINDS
from demo import run as demo

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import ablations  # noqa: E402
import gates  # noqa: E402
import loss_parameters  # noqa: E402
import protocol  # noqa: E402
import selection_memory  # noqa: E402


def rows_of(output):
    return pq.read_table(scored_set.open_scored(output).shard_paths()).to_pylist()


def test_repeated_setting_adds_copies_of_the_easiest_clean_rows(scored_tiny_corpus, tmp_path):
    out = ablations.make_repeated(scored_tiny_corpus, str(tmp_path / "repeated"), distinct=4, share=0.5)
    original, derived = rows_of(scored_tiny_corpus), rows_of(out)
    source = scored_set.open_scored(scored_tiny_corpus)
    assert scored_set.open_scored(out).manifests[0].reference_fingerprint == source.manifests[0].reference_fingerprint

    copies = [row for row in derived if "#copy" in row["key"]]
    assert len(copies) == len(original) and len(derived) == 2 * len(original)
    assert len({row["key"] for row in derived}) == len(derived)
    assert {row["key"] for row in derived if "#copy" not in row["key"]} == {row["key"] for row in original}

    clean = sorted(
        (row for row in original if json.loads(row["metadata"])["truth"] == "clean"), key=lambda row: row["ref_loss"]
    )
    easiest = {row["key"]: row for row in clean[:4]}
    assert {row["key"].split("#copy")[0] for row in copies} == set(easiest)
    for row in copies:
        twin = easiest[row["key"].split("#copy")[0]]
        assert row["image"] == twin["image"] and row["ref_image_embedding"] == twin["ref_image_embedding"]
        assert json.loads(row["metadata"])["truth"] == "repeat"
    # Copies do not count as clean in the selection diagnostics; the original rows still do.
    flags = {
        e.key: e.clean
        for path in scored_set.open_scored(out).shard_paths()
        for e in scored_input.read_scored_examples(path)
    }
    assert all(flags[row["key"]] == 0 for row in copies)
    assert all(flags[key] == 1 for key in easiest)
    # A second call keeps what is there.
    assert ablations.make_repeated(scored_tiny_corpus, out, distinct=4, share=0.5) == out
    assert len(rows_of(out)) == len(derived)


def test_the_oracles_scored_set_is_the_rows_whose_hidden_truth_is_clean(scored_tiny_corpus, tmp_path):
    out = ablations.make_clean(scored_tiny_corpus, str(tmp_path / "clean"))
    original, derived = rows_of(scored_tiny_corpus), rows_of(out)
    clean = [row for row in original if json.loads(row["metadata"])["truth"] == "clean"]
    assert 0 < len(clean) < len(original)  # the tiny corpus has noise to leave out
    assert [row["key"] for row in derived] == [row["key"] for row in clean]
    assert derived[0]["image"] == clean[0]["image"] and derived[0]["ref_loss"] == clean[0]["ref_loss"]
    source = scored_set.open_scored(scored_tiny_corpus).manifests[-1]
    made = scored_set.open_scored(out).manifests[-1]
    assert made.reference_fingerprint == source.reference_fingerprint and made.counts.scored == len(clean)
    assert ablations.make_clean(scored_tiny_corpus, out) == out  # kept for the same reference's scores


def test_gates_fail_where_they_should():
    chance = {"zeroshot/colour": 0.125, "zeroshot/shape": 1 / 6, "retrieval_r1": 0.01}

    def run(colour, shape, recall=0.05):
        return {"tasks": {"zeroshot/colour": colour, "zeroshot/shape": shape, "retrieval_r1": recall}, "chance": chance}

    # the demo corpus's reference: colour solved, shape at chance
    gate = gates.reference_gate(run(0.998, 0.182)["tasks"], chance)
    assert gate.passed is False and "shape 0.182 against chance 0.167, normalised +0.02 (below)" in gate.detail
    assert gates.reference_gate(run(0.998, 0.45)["tasks"], chance).passed  # (0.45 − 1/6) / (5/6) = 0.34
    assert gates.reference_gate({}, {}).passed is None
    # an oracle 0.04 above uniform in mean normalised accuracy does not pass; 0.06 does; none is not measured
    uniform = [run(0.5, 0.4), run(0.52, 0.42)]
    level = [run(0.5 + 0.04 * 0.875, 0.4 + 0.04 * 5 / 6), run(0.52 + 0.04 * 0.875, 0.42 + 0.04 * 5 / 6)]
    assert gates.curation_gate(uniform, level).passed is False
    above = [run(0.5 + 0.06 * 0.875, 0.4 + 0.06 * 5 / 6), run(0.52 + 0.06 * 0.875, 0.42 + 0.06 * 5 / 6)]
    assert gates.curation_gate(uniform, above).passed and "+0.060" in gates.curation_gate(uniform, above).detail
    assert gates.curation_gate(uniform, []).passed is None
    # every method within 0.01 on both zero-shot tasks: nothing discriminates
    flat = {"uniform": [run(0.995, 0.18)], "jest": [run(1.0, 0.188)], "easy": [run(0.999, 0.179, 0.2)]}
    gate = gates.discrimination(flat)
    assert gate.passed is False and "colour 0.005 (does not discriminate)" in gate.detail
    assert "retrieval R@1 0.150" in gate.detail  # retrieval is shown but does not open the gate
    flat["jest"] = [run(1.0, 0.25)]
    assert gates.discrimination(flat).passed
    guard = [gates.reference_gate(run(0.998, 0.182)["tasks"], chance), gates.curation_gate(uniform, above), gate]
    assert gates.void_reason(guard) == "reference competent"


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
    return {
        "zeroshot": zeroshot,
        "examples_ratio": examples_ratio,
        "online_flops_ratio": flops_ratio,
        "total_flops_ratio": total,
        "wall_ratio": wall_ratio,
        # against uniform's first reach of its final (at half of its run), and with the reference's training
        "examples_ratio_first": None if examples_ratio is None else examples_ratio * 2,
        "total_flops_ratio_first": None if total is None else total * 2,
        "with_reference_ratio": None if total is None else total + 1.0,
    }


def test_verdicts_say_met_or_missed_with_bootstrap_intervals_over_seeds():
    summaries = {
        "learnability_f0.8": [summary(0.7, 0.1, 0.1, 0.5), summary(0.6, 0.2, 0.2, 0.7)],
        "easy_reference_f0.8": [summary(0.5, 0.5)] * 2,
        "hard_learner_f0.8": [summary(0.2, None)] * 2,
        "learnability_f0.8_flexi": [summary(0.6, 0.2, 0.5), summary(0.6, None, None)],
        "independent_f0.8": [summary(0.66, 0.3)] * 2,
        "learnability_f0.5": [summary(0.5, 0.3)] * 2,
        "independent_f0.5": [summary(0.45, 0.3)] * 2,
    }
    lines = ablations.verdicts(summaries, {"zeroshot": 0.64})
    # Two seeds: the bootstrap means are a, (a + b) / 2 or b, so the 95% interval runs from one seed to the other.
    assert "0.15x (95% CI 0.10 to 0.20) of uniform's examples (goal ≤ 0.2x: met;" in lines[0]
    assert (
        "0.40x (95% CI 0.35 to 0.45) of its total FLOPs, the reference's scoring pass included (goal ≤ 0.5x of "
        "the whole run: met; 0.15x (95% CI 0.10 to 0.20) online only; ÷ uniform's first reach 0.80x (95% CI 0.70 "
        "to 0.90); with the reference's training 1.40x (95% CI 1.35 to 1.45))"
    ) in lines[0]
    assert "(goal ≤ 0.2x: met; 0.30x (95% CI 0.20 to 0.40) of what uniform needed to first reach it)" in lines[0]
    assert "0.60x (95% CI 0.50 to 0.70) of its wall-clock (goal < 1x: met)" in lines[0]
    assert "ends +0.010 (95% CI -0.040 to +0.060) from its reference's 0.640 (goal: above it: met)" in lines[1]
    assert "0.75x (95% CI 0.75 to 0.75) (1/2 seeds reached) of uniform's total FLOPs" in lines[2]
    assert "(goal ≤ 0.33x of the whole run: missed" in lines[2]
    assert "learnability_f0.8 − easy_reference_f0.8 +0.150 (95% CI +0.100 to +0.200) over 2 seeds" in lines[3]
    assert "easy_reference_f0.8 − hard_learner_f0.8 +0.300 (95% CI +0.300 to +0.300) over 2 seeds" in lines[3]
    assert lines[3].endswith("learnability_f0.8 ≥ easy_reference_f0.8 ≥ hard_learner_f0.8: met).")
    # Joint leads by 0.05 at f = 0.5 but trails by 0.01 at f = 0.8.
    assert "+0.050 (95% CI +0.050 to +0.050) over 2 seeds at f = 0.5" in lines[4]
    assert "-0.010 (95% CI -0.060 to +0.040) over 2 seeds at f = 0.8" in lines[4]
    assert "joint ahead at every f: missed; the gap growing with f: missed" in lines[4]


def test_the_gap_growing_with_f_is_judged_seed_by_seed_over_the_seeds_every_f_ran():
    def runs(*finals):
        return [summary(final, 0.3) for final in finals]

    summaries = {
        "learnability_f0.5": runs(0.50, 0.53, 0.51),
        "independent_f0.5": runs(0.51, 0.51, 0.51),
        "learnability_f0.8": runs(0.53, 0.54, 0.55, 0.9, 0.9),
        "independent_f0.8": runs(0.51, 0.51, 0.52, 0.1, 0.1),
        "learnability_f0.9": runs(0.56, 0.57, 0.58),
        "independent_f0.9": runs(0.51, 0.52, 0.52),
    }
    found = {t.name: t for t in ablations.targets(summaries, {"zeroshot": 0.5})}
    growth = found["joint − independent growing with f"]
    # seeds 0-2 only (f = 0.8's seeds 3 and 4, with their +0.8 gaps, would break the trend's pairing)
    assert growth.value.startswith("+0.003 at f = 0.5, +0.027 at f = 0.8, +0.053 at f = 0.9 over 3 seeds")
    assert "f = 0.9 minus f = 0.5: +0.050 (95% CI +0.030 to +0.060)" in growth.value
    assert growth.status == "met"
    assert found["joint ≥ independent at every f"].status == "met, undecided"  # f = 0.5: -0.01 to +0.02
    # joint surely behind at one f: "at every f" is missed for sure; a gap that shrinks is missed
    summaries["learnability_f0.9"] = runs(0.49, 0.50, 0.50)
    found = {t.name: t for t in ablations.targets(summaries, {"zeroshot": 0.5})}
    assert found["joint ≥ independent at every f"].status == "missed"
    assert found["joint − independent growing with f"].status == "missed"


def test_a_target_whose_interval_straddles_the_goal_is_undecided():
    summaries = {
        "learnability_f0.8": [summary(0.7, 0.15, 0.1), summary(0.5, 0.25, 0.1)],
        "easy_reference_f0.8": [summary(0.6, 0.3), summary(0.6, 0.3)],
    }
    found = {t.name: t for t in ablations.targets(summaries, {"zeroshot": 0.55})}
    assert found["JEST's examples to reach uniform's final ≤ 0.2x"].status == "met, undecided"  # 0.15 to 0.25
    assert found["JEST's total FLOPs to reach it ≤ 0.5x (of uniform's whole run)"].status == "met"  # 0.35x, both
    assert found["JEST's learner ends above its reference"].status == "met, undecided"  # -0.05 to +0.15
    assert found["final zero-shot learnability ≥ easy-reference"].status == "met, undecided"  # -0.1 to +0.1
    # one step of the ordering surely fails: missed, whatever the other step's interval
    summaries["hard_learner_f0.8"] = [summary(0.3, None), summary(0.9, None)]
    summaries["easy_reference_f0.8"] = [summary(0.8, 0.3), summary(0.8, 0.3)]
    chain = {t.name: t for t in ablations.targets(summaries, {"zeroshot": 0.55})}
    assert chain["final zero-shot learnability ≥ easy-reference ≥ hard-learner"].status == "missed"
    passing = [gates.Gate("reference competent", True, "ok"), gates.Gate("curation", True, "ok")]
    flat = gates.Gate("a task can discriminate", False, "colour 0.004 (does not discriminate)")
    table = ablations.targets_table({"demo": {"web": (list(found.values()), [*passing, flat])}, "emoji": {}})
    assert (
        "| web | JEST's total FLOPs to reach it ≤ 0.5x (of uniform's whole run) | **met; decided only by tasks that "
        "do not discriminate**: 0.35x (95% CI 0.35 to 0.35) (÷ uniform's first reach 0.70x"
    ) in table
    assert table.splitlines()[2] == "| web | gate: reference competent | **passed**: ok | not run |"
    assert "| web | gate: a task can discriminate | **failed**: colour 0.004 (does not discriminate) |" in table
    # a failed reference gate voids every claim of the corpus: shown, neither met nor missed
    failing = [gates.Gate("reference competent (≥ 0.3)", False, "shape +0.02 (below)"), passing[1], flat]
    table = ablations.targets_table({"demo": {"web": (list(found.values()), failing)}})
    claims = [line for line in table.splitlines()[2:] if "| gate:" not in line]
    assert claims and all("**void (gate not passed: reference competent; as judged: " in line for line in claims)


def test_total_flops_goal_is_missed_when_the_scoring_pass_tips_it_over():
    summaries = {"learnability_f0.8": [summary(0.7, 0.1, 0.3), summary(0.7, 0.1, 0.3)]}  # 0.55x with scoring
    line = ablations.verdicts(summaries, {"zeroshot": 0.5})[0]
    assert "0.55x (95% CI 0.55 to 0.55) of its total FLOPs" in line and "(goal ≤ 0.5x of the whole run: missed;" in line


def test_bootstrap_interval_resamples_seeds():
    assert protocol.bootstrap_interval([0.3]) == (0.3, 0.3, 0.3)
    values = [0.1, 0.4, 0.2, 0.5, 0.3]
    mean, low, high = protocol.bootstrap_interval(values)
    assert abs(mean - 0.3) < 1e-12 and 0.1 < low < mean < high < 0.5
    assert protocol.bootstrap_interval(values) == (mean, low, high)  # seeded
    # More seeds with the same spread: a narrower interval.
    _, wide_low, wide_high = protocol.bootstrap_interval(values * 4)
    assert wide_high - wide_low < high - low
    mean, low, high = protocol.paired_interval([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])
    assert abs(mean - 0.1) < 1e-12 and abs(low - 0.1) < 1e-12 and abs(high - 0.1) < 1e-12
    with pytest.raises(ValueError, match="one per seed"):
        protocol.paired_interval([0.5, 0.6], [0.4])


def test_plateau_gain_compares_the_last_quarter_with_the_one_before():
    assert protocol.plateau_gain([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5]) == 0.0
    assert abs(protocol.plateau_gain(np.linspace(0, 1, 20)) - 5 / 19) < 1e-12
    with pytest.raises(ValueError, match="too few"):
        protocol.plateau_gain([0.3])


def test_paired_differences_are_taken_seed_by_seed():
    summaries = {
        "a": [{"zeroshot": 0.5, "recall": 0.02}, {"zeroshot": 0.3, "recall": 0.01}],
        "b": [{"zeroshot": 0.4, "recall": 0.03}, {"zeroshot": 0.35, "recall": 0.005}],
    }
    line = ablations.paired(summaries, "a", "b")
    assert "zero-shot +0.100, -0.050 (a ahead in 1 of 2 seeds)" in line
    assert "R@1 -0.010, +0.005 (a ahead in 1 of 2 seeds)" in line


@pytest.mark.parametrize(
    "variants",
    [["uniform", "learnability_f0.5", "learnability_f0.8", "independent_f0.8"], ["uniform", "learnability_f0.5"]],
)
def test_ablation_plots_are_written_for_a_sweep_and_without_one(tmp_path, variants):
    def run(variant, seed):
        selecting = variant != "uniform"
        return {
            "zeroshot": 0.3 + 0.01 * seed,
            "recall": 0.01,
            "curve": {"examples": [100, 200], "online_flops": [1e9, 2e9], "zeroshot": [0.2, 0.3 + 0.01 * seed]},
            "clean_curve": [[10, 0.5, 0.3], [20, 0.6, 0.3]] if selecting else None,
        }

    summaries = {variant: [run(variant, seed) for seed in range(2)] for variant in variants}
    path = tmp_path / "plot.png"
    ablations.plot(summaries, str(path), "test", {"zeroshot": 0.5, "recall": 0.02})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # curves with each task: a third row, each zero-shot task against its chance level
    for runs in summaries.values():
        for r in runs:
            r["chance"] = {"zeroshot/colour": 0.125, "zeroshot/shape": 1 / 6, "retrieval_r1": 0.01}
            r["curve"]["tasks"] = {"zeroshot/colour": [0.3, 0.9], "zeroshot/shape": [0.17, 0.2]}
    ablations.plot(summaries, str(tmp_path / "tasks.png"), "test", {"zeroshot": 0.5, "recall": 0.02})
    height = int.from_bytes(path.read_bytes()[20:24], "big")
    assert int.from_bytes((tmp_path / "tasks.png").read_bytes()[20:24], "big") > height * 1.4


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
    source = scored_set.open_scored(scored_tiny_corpus).manifests[0].reference_fingerprint
    assert scored_set.open_scored(out).manifests[0].reference_fingerprint == source


def test_loss_parameter_summary_reads_t_b_and_the_off_diagonal_share(tmp_path):
    rows = [
        {"step": 10, "loss": 1.0, "t": 10.1, "b": -9.9, "offdiag_share": 0.2},
        {"step": 20, "loss": 0.9, "t": 11.0, "b": -9.0, "offdiag_share": 0.3},
        {"step": 20, "zeroshot_top1": 0.5, "i2t_r1": 0.1, "t2i_r1": 0.3, "held_out_loss": 6.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = loss_parameters.summary(str(tmp_path))
    assert summary["t"] == (10.1, 11.0) and summary["b"] == (-9.9, -9.0) and summary["offdiag_share"] == (0.2, 0.3)
    assert summary["recall"] == pytest.approx(0.2) and summary["held_out_loss"] == 6.0


CHANCE = {"zeroshot/colour": 0.125, "zeroshot/shape": 1 / 6, "retrieval_r1": 0.01}


def fake_run(name, seed, speed, selecting=True, evals=8, shape=None):
    """A run whose zero-shot climbs to 0.3 + speed-dependent level over `evals` evaluations of 100 examples: colour
    0.05 above it, shape 0.05 below (or `shape` throughout), their mean the zero-shot when `shape` is None."""
    examples = np.arange(1, evals + 1) * 100.0
    zeroshot = np.minimum(0.1 + speed * examples / 800 + 0.01 * seed, 0.3 + 0.1 * speed)
    shapes = zeroshot - 0.05 if shape is None else np.full(evals, shape)
    shares = {
        "selected_clean": 0.6,
        "superbatch_clean": 0.4,
        **{f"{side}/{kind}": 0.0 for side in ("selected", "superbatch") for kind in NOISE_KINDS},
        "selected/misaligned": 0.1,
        "superbatch/misaligned": 0.3,
        "selected/boilerplate": 0.3,
        "superbatch/boilerplate": 0.3,
    }
    rows = [{"step": int(step), "loss": 1.0, **(shares if selecting else {})} for step in range(10, 10 * evals + 1, 10)]
    return report.RunCurves(
        name=name,
        examples=examples,
        examples_drawn=examples * (5 if selecting else 1),
        online_flops=examples * 1e9 * (2 if selecting else 1),
        offline_scoring_flops=5e10,
        wall_s=examples / 10,
        zeroshot=zeroshot,
        recall=zeroshot / 10,
        train_rows=rows,
        selecting=selecting,
        task_curves={"zeroshot/colour": zeroshot + 0.05, "zeroshot/shape": shapes, "retrieval_r1": zeroshot / 10},
        chance=dict(CHANCE),
    )


def test_curve_files_round_trip_and_keep_only_the_selection_diagnostics(tmp_path):
    run = fake_run("learnability_f0.8", 0, 1.0)
    run.train_rows[0]["grad_norm"] = 3.0  # not kept
    path = protocol.curve_path("demo", "web", "learnability_f0.8", 0, str(tmp_path))
    protocol.write_curve(path, protocol.curve_from_run(run, {"steps": 80}))
    assert path.endswith("demo/web/learnability_f0.8/seed0.json") and os.path.getsize(path) < 4000
    back = protocol.read_curve(path)
    for field in ("examples", "examples_drawn", "online_flops", "wall_s", "zeroshot", "recall"):
        np.testing.assert_array_equal(getattr(back, field), getattr(run, field))
    assert back.chance == CHANCE and set(back.task_curves) == set(run.task_curves)
    for name, values in run.task_curves.items():  # to 4 significant digits
        np.testing.assert_allclose(back.task_curves[name], values, rtol=1e-3)
    # a curve of the version before per-task accuracy is refused with what to do
    old = {**protocol.curve_from_run(run, {"steps": 80}), "version": 2}
    with pytest.raises(ValueError, match="curve version 2, this script reads 3: run its part again"):
        protocol.curve_to_run(old, "old.json")
    assert back.offline_scoring_flops == run.offline_scoring_flops and back.selecting
    assert back.train_rows[0] == {
        key: value for key, value in run.train_rows[0].items() if key not in ("loss", "grad_norm")
    }
    assert back.train_rows[0]["selected/misaligned"] == 0.1
    assert back.to_reach(0.2, back.examples) == run.to_reach(0.2, run.examples)


def test_tables_and_plots_rebuild_from_the_curve_files_alone(tmp_path, capsys):
    curves = str(tmp_path / "curves")
    settings = {"steps": 80, "batch_size": 64, "evals": 8, "reference": "f" * 64}
    speeds = {
        "uniform": 0.5,
        "offline_top30": 0.8,
        "easy_reference_f0.8": 1.0,
        "independent_f0.8": 1.1,
        "learnability_f0.8": 1.5,
        "learnability_f0.8_flexi": 1.4,
        "oracle": 3.0,
    }
    for variant, speed in speeds.items():
        for seed in range(3):
            run = fake_run(variant, seed, speed, selecting=variant not in ("uniform", "offline_top30", "oracle"))
            if variant == "learnability_f0.8" and seed == 0:  # one run logged difficulty and frequency buckets
                for row in run.train_rows:
                    row.update({f"superbatch/{axis}/{name}": 1 / 3 for axis in BUCKETS for name in BUCKETS[axis]})
                    row.update({f"selected/{axis}/{name}": 0.0 for axis in BUCKETS for name in BUCKETS[axis]})
                    row.update({"selected/difficulty/hard": 0.7, "selected/difficulty/easy": 0.3})
                    row.update({"selected/frequency/tail": 1.0})
            protocol.write_curve(
                protocol.curve_path("demo", "web", variant, seed, curves), protocol.curve_from_run(run, settings)
            )
    reference = fake_run("reference", 0, 4.0, selecting=False, shape=0.8)  # colour 0.75, shape 0.8
    protocol.write_curve(os.path.join(curves, "demo", "reference.json"), protocol.curve_from_run(reference, {}))

    out_dir = str(tmp_path / "out")
    ablations.main(
        ["--corpus", "demo", "--part", "headline", "--rebuild", "--curves", curves, "--out", out_dir, "--no_write"]
    )
    out = capsys.readouterr().out
    assert "80 steps of b = 64" in out and "uniform 3, oracle 3, offline_top30 3" in out
    assert "Uniform plateaued under the cosine learning-rate schedule" in out  # the curves' settings name none
    # The gates, above the tables: the reference's tasks, the oracle against uniform, the spread of the finals.
    gate_lines = [line for line in out.splitlines() if line.startswith("- ") and "competent" in line]
    assert gate_lines[0].startswith("- reference competent (normalised accuracy ≥ 0.3 on every zero-shot task at")
    assert "passed. colour 0.750 against chance 0.125, normalised +0.71, shape 0.800" in gate_lines[0]
    # oracle 0.6 and uniform 0.35 in mean zero-shot, seed by seed: +0.29 in mean normalised accuracy
    assert "rewards curation (the oracle ends ≥ 0.05 above uniform in mean normalised zero-shot): passed." in out
    assert "Oracle − uniform +0.293 (95% CI +0.293 to +0.293) over 3 seeds" in out
    assert "a task can discriminate" in out and "does not discriminate" not in out
    assert "Against the targets:" in out
    # uniform ends at its cap, 0.35, after 800 examples; learnability crosses 0.35 between its evaluations at 100
    # and 200 examples (where it is capped at 0.45): 138, 134 and 130 examples over the seeds, interpolated.
    row = next(line for line in out.splitlines() if line.startswith("| learnability_f0.8 |"))
    assert row.split(" | ")[3] == "0.17 ± 0.01"
    # uniform first reaches its cap at its 4th evaluation, 400 examples, in every seed: 138, 134, 130 / 400
    assert row.split(" | ")[4] == "0.34 ± 0.01"
    assert row.split(" | ")[5] == "0.84 ± 0.03"  # drawn: 5x what it trains on
    # Each task's final with its chance level: learnability's colour 0.5 (+0.43), shape 0.4 (+0.28), over seeds
    assert "| variant | colour (chance 0.125) | shape (chance 0.167) | retrieval R@1 (chance 0.010) |" in out
    tasks = next(line for line in out.splitlines() if line.startswith("| learnability_f0.8 | 0.5"))
    assert tasks.split(" | ")[1] == "0.500 ± 0.000 (+0.43)"
    # Composition by hidden truth: the kinds that occur, selected (super-batch).
    assert "| variant | clean | misaligned | boilerplate |" in out
    assert "| learnability_f0.8 | 0.60 (0.40) | 0.10 (0.30) | 0.30 (0.30) |" in out
    # ... and by difficulty and frequency bucket, over the runs that logged them
    assert "| variant | difficulty: easy | difficulty: medium | difficulty: hard | frequency: head |" in out
    assert "| learnability_f0.8 (1 seed) | 0.30 (0.33) | 0.00 (0.33) | 0.70 (0.33) | 0.00 (0.33) |" in out
    assert (tmp_path / "out" / "demo" / "ablations_demo.png").read_bytes()[:4] == b"\x89PNG"
    # The claims, one row each, a column per corpus; the emoji corpus has no curves here.
    claims = out[out.index("| setting | claim | demo corpus | emoji corpus |") :].splitlines()
    examples = next(line for line in claims if "JEST's examples to reach uniform's final ≤ 0.2x" in line)
    assert examples.startswith("| web |") and "**met**: 0.17x (95% CI" in examples
    assert examples.endswith("| not run |")
    assert any(line.startswith("| web | final zero-shot learnability ≥ easy-reference |") for line in claims)
    assert any(line.startswith("| web | gate: reference competent | **passed**:") for line in claims)

    # A reference at chance on shape fails its gate, and every comparison on the corpus is void.
    reference = fake_run("reference", 0, 4.0, selecting=False, shape=0.18)
    protocol.write_curve(os.path.join(curves, "demo", "reference.json"), protocol.curve_from_run(reference, {}))
    ablations.main(
        ["--corpus", "demo", "--part", "headline", "--rebuild", "--curves", curves, "--out", out_dir, "--no_write"]
    )
    out = capsys.readouterr().out
    assert "- reference competent" in out and "**failed**. colour 0.750" in out
    assert "shape 0.180 against chance 0.167, normalised +0.02 (below)" in out
    assert "Against the targets (**void**: the gate(s) reference competent did not pass" in out
    claims = out[out.index("| setting | claim | demo corpus | emoji corpus |") :].splitlines()
    examples = next(line for line in claims if "JEST's examples to reach uniform's final ≤ 0.2x" in line)
    assert "**void (gate not passed: reference competent; as judged: met)**: 0.17x" in examples

    # A curve made with other settings is refused rather than mixed in.
    other = protocol.curve_from_run(fake_run("uniform", 3, 0.5, selecting=False), {**settings, "steps": 40})
    protocol.write_curve(protocol.curve_path("demo", "web", "uniform", 3, curves), other)
    protocol.write_curve(protocol.curve_path("demo", "web", "learnability_f0.8", 3, curves), other)
    with pytest.raises(SystemExit, match="different settings"):
        ablations.main(
            ["--corpus", "demo", "--part", "headline", "--rebuild", "--curves", curves, "--out", out_dir, "--no_write"]
        )


def test_the_larger_reference_setting_reads_uniform_from_the_web_setting_and_compares_with_it(tmp_path, capsys):
    curves = str(tmp_path / "curves")
    trained = {"steps": 80, "batch_size": 64, "evals": 8, "schedule": "constant", "reference": "f" * 64}
    web, larger = {**trained, "reference_recipe": "w" * 64}, {**trained, "reference_recipe": "l" * 64}
    for seed in range(3):
        for variant, speed in {"uniform": 0.5, "oracle": 3.0, "learnability_f0.8": 1.0}.items():
            run = fake_run(variant, seed, speed, selecting=variant == "learnability_f0.8")
            protocol.write_curve(
                protocol.curve_path("demo", "web", variant, seed, curves), protocol.curve_from_run(run, web)
            )
        for variant, speed in {"learnability_f0.8": 1.5, "easy_reference_f0.8": 1.2}.items():
            run = fake_run(variant, seed, speed)
            path = protocol.curve_path("demo", "larger_reference", variant, seed, curves)
            protocol.write_curve(path, protocol.curve_from_run(run, larger))
    for name, shape in (("reference.json", 0.6), ("reference_larger.json", 0.8)):
        reference = fake_run("reference", 0, 4.0, selecting=False, shape=shape)
        protocol.write_curve(os.path.join(curves, "demo", name), protocol.curve_from_run(reference, {}))
    options = ["--corpus", "demo", "--rebuild", "--curves", curves, "--out", str(tmp_path / "out"), "--no_write"]

    ablations.main(["--part", "larger", *options])
    out = capsys.readouterr().out
    assert "variant: uniform 3, easy_reference_f0.8 3, learnability_f0.8 3" in out
    assert "scored by a reference of model size {'image_variant': 'sm', 'text_variant': 'sm'}" in out
    assert "shape 0.800 against chance 0.167" in out  # the gate reads the larger reference's curve
    # the same learner with each reference, seed by seed: capped at 0.45 and 0.40, so +0.05 at every seed
    assert "with the larger reference minus with the learner-sized one: +0.050 (95% CI +0.050 to +0.050)" in out
    claims = out[out.index("| setting | claim |") :].splitlines()
    row = next(line for line in claims if "JEST with the larger reference ≥ with the learner-sized one" in line)
    assert row.startswith("| larger_reference |") and "**met**: +0.050" in row
    assert (tmp_path / "out" / "demo" / "larger_demo.png").read_bytes()[:4] == b"\x89PNG"

    # a uniform run of the web setting trained otherwise is refused rather than compared
    other = protocol.curve_from_run(fake_run("uniform", 3, 0.5, selecting=False), {**web, "steps": 40})
    protocol.write_curve(protocol.curve_path("demo", "web", "uniform", 3, curves), other)
    for variant in ("learnability_f0.8", "easy_reference_f0.8"):
        path = protocol.curve_path("demo", "larger_reference", variant, 3, curves)
        protocol.write_curve(path, protocol.curve_from_run(fake_run(variant, 3, 1.5), larger))
    with pytest.raises(SystemExit, match="different settings"):
        ablations.main(["--part", "larger", *options])


def test_make_demo_trains_the_benchmarks_reference_and_seed_0_of_its_uniform_and_flexi_runs():
    args = demo.parse_args([])
    assert {name: getattr(args, name) for name in ablations.REFERENCE} == ablations.REFERENCE
    assert (args.seed, ablations.CORPORA["demo"]["seed"], ablations.CORPORA["demo"]["noise"]) == (0, 0, {})

    def training(config):  # what changes the params: not how often a run evaluates, logs or checkpoints
        return dataclasses.replace(config, name="", eval_every=1, log_every=1, checkpoint_every=1)

    learners = demo.learner_configs(args)
    for name, variant in (("uniform", "uniform"), ("jest_flexi", "learnability_f0.8_flexi")):
        bench = ablations.variant_config(variant, 0, 600, 64, 20)
        assert training(learners[name]) == training(bench)


def test_curves_are_matched_by_the_references_recipe_not_its_last_bits(tmp_path):
    path = str(tmp_path / "seed0.json")
    made = {"steps": 600, "batch_size": 64, "evals": 20, "reference": "a" * 64, "reference_recipe": "r" * 64}
    protocol.write_curve(path, protocol.curve_from_run(fake_run("uniform", 0, 0.5, selecting=False), made))
    # the same recipe retrained elsewhere: another fingerprint, the same runs
    assert ablations.curve_matches(path, {**made, "reference": "b" * 64})
    assert not ablations.curve_matches(path, {**made, "reference_recipe": "s" * 64})
    assert not ablations.curve_matches(path, {**made, "steps": 300})


def test_the_reference_recipe_is_its_training_config_and_the_corpus_settings(tmp_path):
    workdir = tmp_path / "reference"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"name": "reference", "total_steps": 300, "seed": 0}))
    recipe = ablations.reference_recipe(str(workdir), "demo")
    assert len(recipe) == 64 and recipe != ablations.reference_recipe(str(workdir), "emoji")
    (workdir / "config.json").write_text(json.dumps({"name": "reference", "total_steps": 301, "seed": 0}))
    assert ablations.reference_recipe(str(workdir), "demo") != recipe
    # a field added later, at the value earlier runs had, leaves the recipe as it was; another value changes it
    (workdir / "config.json").write_text(
        json.dumps({"name": "reference", "total_steps": 300, "seed": 0, "dedup": None})
    )
    assert ablations.reference_recipe(str(workdir), "demo") == recipe
    (workdir / "config.json").write_text(json.dumps({"name": "reference", "total_steps": 300, "seed": 0, "dedup": "d"}))
    assert ablations.reference_recipe(str(workdir), "demo") != recipe


def test_a_new_results_section_goes_before_the_archived_ones(tmp_path, monkeypatch):
    import results

    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmarks\n\n## Selection\n\nold\n\n## Archived: earlier runs\n\nkept\n")
    monkeypatch.setattr(results, "RESULTS", str(path))
    monkeypatch.setattr(results, "machine", lambda: "test machine")
    results.write_section("Learning efficiency (demo corpus)", "new", "cmd")
    results.write_section("Selection", "replaced", "cmd")
    titles = [line for line in path.read_text().splitlines() if line.startswith("## ")]
    assert titles == ["## Selection", "## Learning efficiency (demo corpus)", "## Archived: earlier runs"]
    text = path.read_text()
    assert "replaced" in text and "old" not in text and text.rstrip().endswith("kept")
