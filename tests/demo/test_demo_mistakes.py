"""Mistakes on the demo's command lines (`python -m demo`, `python -m demo.make_corpus`): one line naming the fix,
before any work, nothing written."""

from __future__ import annotations

import os

import pytest

from demo import make_corpus
from demo import run as demo_run
from tests.test_mistakes import refused

ENTRIES = {"demo": (demo_run.main, "python -m demo"), "make_corpus": (make_corpus.run, "python -m demo.make_corpus")}


@pytest.mark.parametrize(
    "entry, flags, named",
    [
        ("demo", ["--web_sise", "300"], "unknown flag --web_sise (did you mean --web_size?)"),
        ("demo", ["--learner_steps", "5", "--learner_evals", "9"], "need 1 ≤ evals ≤ steps"),
        ("demo", ["--learner_batch_size", "0"], "--learner_batch_size 0: need at least 1"),
        ("demo", ["--jest_config", "jest_flex"], "invalid choice: 'jest_flex'"),
        ("make_corpus", ["--sise", "300"], "unknown flag --sise (did you mean --size?)"),
        ("make_corpus", ["--size", "0"], "--size 0: need at least 1"),
        ("make_corpus", ["--seed", "-1"], "--seed -1: need at least 0"),
        ("make_corpus", ["--misaligned_rate", "1.5"], "misaligned"),
        ("make_corpus", ["--format", "tar"], "invalid choice: 'tar'"),
    ],
)
def test_mistakes(capsys, tmp_path, entry, flags, named):
    main, prog = ENTRIES[entry]
    out = tmp_path / "out"
    line = refused(capsys, main, ["--out", str(out), *flags])
    assert line.startswith(f"{prog}: error: ") and named in line
    assert not out.exists()


def test_make_corpus_misspelt_out_and_a_corpus_already_there(capsys, tmp_path):
    line = refused(capsys, make_corpus.run, ["--ou", str(tmp_path / "corpus")])
    assert line == "python -m demo.make_corpus: error: unknown flag --ou (did you mean --out?)"
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "mine.txt").write_text("keep")
    line = refused(capsys, make_corpus.run, ["--out", str(tmp_path / "held"), "--size", "4"])
    assert "is not empty" in line and line.endswith("give a new folder, or --overwrite")
    assert os.listdir(tmp_path / "held") == ["mine.txt"]


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_an_out_that_cannot_be_written(capsys, tmp_path, entry):
    main, prog = ENTRIES[entry]
    (tmp_path / "a_file").write_text("keep")
    line = refused(capsys, main, ["--out", str(tmp_path / "a_file" / "corpus")])
    assert line.startswith(f"{prog}: error: --out ")
    assert line.endswith("a_file is not a folder that can be written: give another --out")
    assert (tmp_path / "a_file").read_text() == "keep"
