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
    for image in ("curves.png", "selection.png"):
        assert os.path.getsize(os.path.join(out, image)) > 10_000
    # A second run finds every stage done and only rewrites the report.
    assert demo.run(["--out", out, "--smoke", "--web_size", "160", "--curated_size", "64", "--eval_size", "48"]) == path
    assert len(os.listdir(os.path.join(out, "scored"))) == 1  # no second scoring batch
