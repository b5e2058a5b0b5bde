import json
import os

import pytest

from curation import report


def write_run(workdir, evals, selecting=False, flops_per_step=1e12, wall_per_step=1.0):
    os.makedirs(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in range(10, 101, 10):
            row = {"step": step, "loss": 1.0, "examples_seen": step * 4, "train_flops": step * flops_per_step,
                   "wall_s": step * wall_per_step}
            if selecting:
                row.update(learner_scoring_flops=step * 0.5 * flops_per_step, reference_scoring_flops=step * 0.1 * flops_per_step,
                           selected_learnability=0.5, random_learnability=0.1, selected_clean=0.9,
                           superbatch_clean=0.3)
            f.write(json.dumps(row) + "\n")
        for step, zeroshot in evals:
            f.write(json.dumps({"step": step, "examples_seen": step * 4, "zeroshot_top1": zeroshot, "i2t_r1": 0.1,
                                "t2i_r1": 0.3}) + "\n")


def test_report_table_counts_examples_and_flops_to_reach_the_baseline(tmp_path):
    write_run(tmp_path / "uniform", [(50, 0.3), (100, 0.5)])
    write_run(tmp_path / "jest", [(50, 0.55), (100, 0.7)], selecting=True)
    write_run(tmp_path / "ref", [(100, 0.6)])
    path = report.write_report({"uniform": str(tmp_path / "uniform"), "jest": str(tmp_path / "jest")},
                               str(tmp_path / "out"), str(tmp_path / "ref"))
    text = open(path).read()
    lines = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
             for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")}
    # uniform reaches its own final (0.5) at step 100 = 400 examples; JEST at step 50 = 200 examples.
    assert lines["uniform"][:3] == ["0.500", "0.200", "400"]
    assert lines["jest"][:3] == ["0.700", "0.200", "200"]
    # FLOPs to reach it: uniform 100 steps of 1 TFLOP; JEST's count its scoring, (1 + 0.5 + 0.1) x 50 steps.
    assert lines["uniform"][3] == "100.00 TFLOP"
    assert lines["jest"][3] == "80.00 TFLOP" and lines["jest"][4] == "160.00 TFLOP"
    assert lines["reference (curated split)"][0] == "0.600"
    assert "selected learnability 0.500 vs random 0.100" in text
    for image in ("curves.png", "selection.png"):
        with open(tmp_path / "out" / image, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_run_that_never_reaches_the_baseline_says_so(tmp_path):
    write_run(tmp_path / "uniform", [(100, 0.5)])
    write_run(tmp_path / "worse", [(100, 0.4)])
    curves = [report.load_run(name, str(tmp_path / name)) for name in ("uniform", "worse")]
    assert "not reached" in report.summary_table(curves)


def test_a_run_without_evaluations_is_refused(tmp_path):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no training or no evaluation rows"):
        report.load_run("empty", str(tmp_path / "empty"))


def test_offline_filtering_counts_the_reference_pass_over_every_example_read(tmp_path):
    write_run(tmp_path / "filtered", [(100, 0.5)])
    rows = [json.loads(line) for line in open(tmp_path / "filtered" / "metrics.jsonl")]
    with open(tmp_path / "filtered" / "metrics.jsonl", "w") as f:
        for row in rows:
            if "loss" in row:  # 4 examples trained per step, 6 more read and filtered out
                row.update(superbatch_examples_seen=row["step"] * 4, skipped=row["step"] * 6,
                           reference_flops_per_example=1e9)
            f.write(json.dumps(row) + "\n")
    unfiltered = report.load_run("filtered", str(tmp_path / "filtered")).flops[-1]
    assert unfiltered == 100 * 1e12  # no config.json: not known to be filtering
    (tmp_path / "filtered" / "config.json").write_text(json.dumps({"offline_keep": 0.4}))
    assert report.load_run("filtered", str(tmp_path / "filtered")).flops[-1] == 100 * 1e12 + 1000 * 1e9
