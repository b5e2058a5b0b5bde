import os

from demo import run as demo


def test_the_demo_runs_end_to_end_and_writes_the_report(tmp_path):
    out = str(tmp_path / "demo")
    path = demo.run(["--out", out, "--smoke", "--web_size", "160", "--curated_size", "64", "--eval_size", "48"])
    text = open(path).read()
    assert path == os.path.join(out, "report.md")
    for row in ("| uniform |", "| jest |", "| reference (curated split) |"):
        assert row in text
    assert "scoring job: read 160, scored" in text
    assert "| run | colour (chance 0.125) | shape (chance 0.167) |" in text  # each task beside its chance level
    assert "÷ uniform's whole run" in text and "÷ uniform's first reach" in text  # both FLOPs denominators
    for image in ("curves.png", "selection.png"):
        assert os.path.getsize(os.path.join(out, image)) > 10_000
    # A second run finds every stage done and only rewrites the report.
    assert demo.run(["--out", out, "--smoke", "--web_size", "160", "--curated_size", "64", "--eval_size", "48"]) == path
    assert len(os.listdir(os.path.join(out, "scored"))) == 1  # no second scoring batch


def test_the_learners_run_at_the_benchmarks_settings():
    args = demo.parse_args([])
    config = demo.config_for(
        "jest", args.learner_steps, 0, batch_size=args.learner_batch_size, evals=args.learner_evals
    )
    # the learning benchmark's headline part: 600 steps of b = 64, 20 evaluations, B = 5b
    assert (config.total_steps, config.batch_size, config.eval_every) == (600, 64, 30)
    assert config.superbatch_size == 320
    reference = demo.config_for("reference", args.reference_steps, 0, schedule=args.reference_schedule)
    assert (reference.total_steps, reference.batch_size, reference.schedule) == (300, 128, "cosine")
    # the benchmark's references: longer, and under the constant schedule
    args = demo.parse_args(["--reference_steps", "1000", "--reference_schedule", "constant"])
    reference = demo.config_for("reference", args.reference_steps, 0, schedule=args.reference_schedule)
    assert (reference.total_steps, reference.schedule, reference.warmup_steps) == (1000, "constant", 50)


def test_bad_learner_settings_stop_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "demo"
    for flags, words in (
        (["--learner_evals", "0"], "need 1 ≤ evals ≤ steps"),
        (["--learner_batch_size", "0"], "need at least 1"),
        (["--reference_schedule", "linear"], "--reference_schedule: invalid choice: 'linear'"),
        (["--reference_schedul", "constant"], "unrecognized arguments: --reference_schedul"),  # no abbreviations
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
        demo.run(["--out", str(out), "--reference_schedule", "constant"])
    except SystemExit as error:
        assert error.code == 2
    else:
        raise AssertionError("a reference made under another schedule was resumed")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(reference: schedule (saved 'cosine', now 'constant'))" in err
    assert err.endswith(f"give another --out, or delete {out / 'reference'}")
    assert sorted(os.listdir(out)) == ["reference"] and os.listdir(out / "reference") == ["config.json"]
