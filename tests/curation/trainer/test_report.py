import json
import os

import numpy as np
import pytest

from curation.trainer import report


def write_run(workdir, evals, selecting=False, flops_per_step=1e12, wall_per_step=1.0, offline=0.0):
    os.makedirs(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in range(10, 101, 10):
            row = {
                "step": step,
                "loss": 1.0,
                "examples_seen": step * 4,
                "train_flops": step * flops_per_step,
                "online_flops": step * flops_per_step,
                "offline_scoring_flops": offline,
                "wall_s": step * wall_per_step,
                "t": 10.0 + step / 100,
                "b": -10.0 + step / 50,
            }
            if selecting:
                row.update(
                    learner_scoring_flops=step * 0.5 * flops_per_step,
                    online_flops=step * 1.5 * flops_per_step,
                    selected_learnability=0.5,
                    random_learnability=0.1,
                    selected_clean=0.9,
                    superbatch_clean=0.3,
                    offdiag_share=0.1 + step / 1000,
                )
            f.write(json.dumps(row) + "\n")
        for step, zeroshot in evals:
            f.write(
                json.dumps(
                    {"step": step, "examples_seen": step * 4, "zeroshot_top1": zeroshot, "i2t_r1": 0.1, "t2i_r1": 0.3}
                )
                + "\n"
            )


def table_rows(text):
    return {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith(("| method", "| run"))
    }


def test_report_table_gives_online_and_offline_flops_to_reach_the_baseline(tmp_path):
    write_run(tmp_path / "uniform", [(50, 0.3), (100, 0.5)])
    write_run(tmp_path / "jest", [(50, 0.55), (100, 0.7)], selecting=True, offline=20e12)
    write_run(tmp_path / "ref", [(100, 0.6)])
    path = report.write_report(
        {"uniform": str(tmp_path / "uniform"), "jest": str(tmp_path / "jest")},
        str(tmp_path / "out"),
        str(tmp_path / "ref"),
    )
    text = open(path).read()
    lines = table_rows(text.split("## FLOPs against")[0])
    # uniform reaches its own final (0.5) at step 100 = 400 examples; JEST at step 50 = 200 examples.
    assert lines["uniform"][:3] == ["0.500", "0.200", "400"]
    assert lines["jest"][:3] == ["0.700", "0.200", "200"]
    # Online FLOPs to reach it: uniform 100 steps of 1 TFLOP; JEST 50 steps of 1.5 (updates + its scoring pass);
    # with the reference's scoring of the corpus, once, JEST's adds 20 TFLOP whatever it drew.
    assert lines["uniform"][3:7] == ["100.00 TFLOP", "100.00 TFLOP", "100.00 TFLOP", "0.00 TFLOP"]
    assert lines["jest"][3:7] == ["75.00 TFLOP", "95.00 TFLOP", "150.00 TFLOP", "20.00 TFLOP"]
    assert lines["reference (curated split)"][0] == "0.600"
    assert "selected learnability 0.500 vs random 0.100" in text
    assert "uniform every 200, jest every 200" in text
    # t, b and the off-diagonal share from first to last logged step.
    loss_rows = table_rows(text.split("## The loss's")[1])
    assert loss_rows["jest"] == ["10.10 → 11.00", "-9.80 → -8.00", "0.110 → 0.200"]
    assert loss_rows["uniform"][2] == "—" and "reference" in loss_rows
    for image in ("curves.png", "selection.png"):
        with open(tmp_path / "out" / image, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_to_reach_is_interpolated_between_evaluations(tmp_path):
    write_run(tmp_path / "run", [(20, 0.1), (60, 0.3), (100, 0.7)])
    run = report.load_run("run", str(tmp_path / "run"))
    # 0.5 lies halfway between the evaluations at 240 and 400 examples.
    assert run.to_reach(0.5, run.examples) == pytest.approx(320)
    assert run.to_reach(0.3, run.examples) == pytest.approx(240)  # reached at an evaluation
    assert run.to_reach(0.05, run.examples) == pytest.approx(80)  # before the first: the first evaluation
    assert run.to_reach(0.8, run.examples) is None
    assert run.to_reach(0.5, run.online_flops) == pytest.approx(80e12)
    assert run.eval_spacing == 160
    np.testing.assert_allclose(run.total_flops, run.online_flops)


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


def test_runs_logged_before_the_online_offline_split_still_load(tmp_path):
    write_run(tmp_path / "old", [(100, 0.5)], selecting=True)
    rows = [json.loads(line) for line in open(tmp_path / "old" / "metrics.jsonl")]
    with open(tmp_path / "old" / "metrics.jsonl", "w") as f:
        for row in rows:
            row.pop("online_flops", None)
            row.pop("offline_scoring_flops", None)
            f.write(json.dumps(row) + "\n")
    run = report.load_run("old", str(tmp_path / "old"))
    assert run.online_flops[-1] == 100 * 1.5e12 and run.offline_scoring_flops == 0


def _with_tasks(workdir, colour, shape, chance=True):
    """Give a run's last evaluation per-task accuracies (colour: 8 classes, shape: 6) and, optionally, their
    chance levels."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)]
    rows[-1].update({"zeroshot/colour": colour, "zeroshot/shape": shape})
    if chance:
        rows[-1].update({"chance/zeroshot/colour": 1 / 8, "chance/zeroshot/shape": 1 / 6, "chance/retrieval_r1": 0.002})
    with open(path, "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("reference_shape, flagged", [(0.182, True), (0.9, False)])
def test_task_table_gives_chance_levels_and_names_a_task_the_reference_cannot_do(tmp_path, reference_shape, flagged):
    for name, colour, shape in [("uniform", 0.994, 0.188), ("jest", 1.0, 0.194), ("ref", 0.998, reference_shape)]:
        write_run(tmp_path / name, [(50, 0.3), (100, (colour + shape) / 2)])
        _with_tasks(tmp_path / name, colour, shape)
    runs = [report.load_run(name, str(tmp_path / name)) for name in ("uniform", "jest")]
    lines = report.task_table(runs, report.load_run("reference", str(tmp_path / "ref")))
    assert lines[0] == "| run | colour (chance 0.125) | shape (chance 0.167) | retrieval R@1 (chance 0.002) |"
    rows = table_rows("\n".join(lines))
    assert rows["uniform"][1] == "0.188 (+0.03)" and rows["jest"][0] == "1.000 (+1.00)"
    assert set(rows) == {"reference", "uniform", "jest"}
    not_competent = [line for line in lines if line.startswith("The reference is not competent")]
    assert bool(not_competent) is flagged
    if flagged:
        assert "shape (+0.02)" in not_competent[0] and "colour" not in not_competent[0]


def test_task_table_of_runs_that_logged_no_chance_levels(tmp_path):
    write_run(tmp_path / "old", [(100, 0.5)])
    _with_tasks(tmp_path / "old", 0.9, 0.1, chance=False)
    lines = report.task_table([report.load_run("old", str(tmp_path / "old"))])
    assert lines[0] == "| run | colour | shape | retrieval R@1 |"
    assert table_rows("\n".join(lines))["old"] == ["0.900", "0.100", "0.200"]


def test_flops_to_reach_against_the_baselines_whole_run_and_its_first_reach(tmp_path):
    write_run(tmp_path / "uniform", [(50, 0.5), (100, 0.5)])  # reaches its final at step 50: 50 of its 100 TFLOP
    write_run(tmp_path / "jest", [(50, 0.55), (100, 0.7)], selecting=True, offline=20e12)
    write_run(tmp_path / "ref", [(100, 0.6)])  # its training: 100 steps of 1 TFLOP
    runs = [report.load_run(name, str(tmp_path / name)) for name in ("uniform", "jest")]
    reference = report.load_run("reference", str(tmp_path / "ref"))
    lines = report.flops_table(runs, {**reference.final, "flops": reference.train_rows[-1]["train_flops"]})
    assert "whole run (100.00 TFLOP)" in lines[0] and "first reach (50.00 TFLOP)" in lines[0]
    rows = table_rows("\n".join(lines))
    assert rows["uniform"] == ["50.00 TFLOP", "0.50x", "1.00x", "—", "—"]
    # JEST reaches it at its first evaluation, step 50: 75 TFLOP online + 20 TFLOP of the reference's scoring.
    assert rows["jest"] == ["95.00 TFLOP", "0.95x", "1.90x", "195.00 TFLOP", "1.95x"]
    assert report.flops_table(runs)[2].split("|")[5].strip() == "—"  # no reference given: no total with it


def _png_size(path):
    with open(path, "rb") as f:
        header = f.read(24)
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_each_task_is_kept_at_every_evaluation_and_plotted_against_its_chance_level(tmp_path):
    write_run(tmp_path / "run", [(50, 0.3), (100, 0.5)])
    path = os.path.join(tmp_path / "run", "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)]
    for row, (colour, shape) in zip([r for r in rows if "zeroshot_top1" in r], [(0.4, 0.2), (0.8, 0.2)]):
        row.update({"zeroshot/colour": colour, "zeroshot/shape": shape})
        row.update({"chance/zeroshot/colour": 1 / 8, "chance/zeroshot/shape": 1 / 6, "chance/retrieval_r1": 0.002})
    with open(path, "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
    run = report.load_run("run", str(tmp_path / "run"))
    assert list(run.task_curves) == ["zeroshot/colour", "zeroshot/shape", "retrieval_r1"]
    np.testing.assert_allclose(run.task_curves["zeroshot/colour"], [0.4, 0.8])
    np.testing.assert_allclose(run.task_curves["retrieval_r1"], [0.2, 0.2])
    assert run.tasks == {"zeroshot/colour": 0.8, "zeroshot/shape": 0.2, "retrieval_r1": pytest.approx(0.2)}
    # a third row of panels, one per task, when the runs logged tasks; two rows when not
    report.plot_curves([run], str(tmp_path / "tasks.png"), run)
    write_run(tmp_path / "plain", [(50, 0.3), (100, 0.5)])
    plain = report.load_run("plain", str(tmp_path / "plain"))
    plain.task_curves = {}
    report.plot_curves([plain], str(tmp_path / "plain.png"))
    (width, height), (plain_width, plain_height) = _png_size(tmp_path / "tasks.png"), _png_size(tmp_path / "plain.png")
    assert width == plain_width and height == pytest.approx(plain_height * 3 / 2, rel=0.02)
