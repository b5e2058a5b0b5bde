import os

from demo import run as demo


def test_the_demo_runs_end_to_end_and_writes_the_report(tmp_path):
    out = str(tmp_path / "demo")
    path = demo.run(["--out", out, "--smoke", "--web_size", "160", "--curated_size", "64", "--eval_size", "48"])
    text = open(path).read()
    assert path == os.path.join(out, "report.md")
    for row in ("| uniform |", "| jest_flexi |", "| reference (curated split) |"):
        assert row in text
    assert "scoring job: read 160, scored" in text
    assert "| run | colour (chance 0.125) | shape (chance 0.167) |" in text  # each task beside its chance level
    assert "÷ uniform's whole run" in text and "÷ uniform's first reach" in text  # both FLOPs denominators
    for image in ("curves.png", "selection.png"):
        assert os.path.getsize(os.path.join(out, image)) > 10_000
    # A second run finds every stage done and only rewrites the report.
    assert demo.run(["--out", out, "--smoke", "--web_size", "160", "--curated_size", "64", "--eval_size", "48"]) == path
    assert len(os.listdir(os.path.join(out, "scored"))) == 1  # no second scoring batch


def test_the_learners_and_the_reference_run_at_the_benchmarks_settings():
    learners = demo.learner_configs(demo.parse_args([]))
    assert sorted(learners) == ["jest_flexi", "uniform"]  # Flexi-JEST: the demo's JEST learner
    # the learning benchmark's headline part: 600 steps of b = 64, B = 5b, under the constant schedule
    for config in learners.values():
        assert (config.total_steps, config.batch_size, config.schedule, config.warmup_steps) == (
            600,
            64,
            "constant",
            50,
        )
    assert learners["jest_flexi"].superbatch_size == 320 and learners["jest_flexi"].flexi
    # the benchmark's reference: 1,000 steps under the constant schedule, the fewest that pass its gate on shape
    reference = demo.reference_config(demo.parse_args([]))
    assert (reference.total_steps, reference.batch_size, reference.schedule) == (1000, 128, "constant")
    args = demo.parse_args(["--reference_steps", "300", "--reference_schedule", "cosine", "--jest_config", "jest"])
    reference = demo.reference_config(args)
    assert (reference.total_steps, reference.schedule, reference.warmup_steps) == (300, "cosine", 30)
    assert sorted(demo.learner_configs(args)) == ["jest", "uniform"]


def test_bad_learner_settings_stop_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "demo"
    for flags, words in (
        (["--learner_evals", "0"], "need 1 ≤ evals ≤ steps"),
        (["--learner_batch_size", "0"], "need at least 1"),
        (["--reference_schedule", "linear"], "--reference_schedule: invalid choice: 'linear'"),
        (["--reference_schedul", "constant"], "unknown flag --reference_schedul (did you mean --reference_schedule?)"),
    ):
        try:
            demo.run(["--out", str(out), *flags])
        except SystemExit as error:
            assert error.code == 2
        else:
            raise AssertionError(f"{flags} was accepted")
        assert words in capsys.readouterr().err
    assert not out.exists()


def test_an_out_made_with_other_settings_is_refused_before_any_work(tmp_path, capsys):
    from curation.trainer.workdir import write_run_config

    out = tmp_path / "demo"
    write_run_config(str(out / "reference"), demo.reference_config(demo.parse_args(["--out", str(out)])), None)
    try:
        demo.run(["--out", str(out), "--reference_schedule", "cosine"])
    except SystemExit as error:
        assert error.code == 2
    else:
        raise AssertionError("a reference made under another schedule was resumed")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(reference: schedule (saved 'constant', now 'cosine'))" in err
    assert err.endswith(f"give another --out, or delete {out / 'reference'}")
    assert sorted(os.listdir(out)) == ["reference"] and os.listdir(out / "reference") == ["config.json"]
