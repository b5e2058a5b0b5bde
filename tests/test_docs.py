"""The docs hold: the README stays short, every relative link and every module or file they name exists, and the
runnable example of docs/own_training_loop.md selects what it says on a scored set made here."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_LINE_LIMIT = 250
SOURCE_FOLDERS = ("models", "curation", "pipelines", "demo", "bench", "deploy", "docs", "tests")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
MODULE_COMMAND = re.compile(r"python -m ([\w.]+)")


def load_example():
    path = ROOT / "docs" / "examples" / "own_training_loop.py"
    spec = importlib.util.spec_from_file_location("own_training_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_LINE_LIMIT, f"README.md has {len(lines)} lines; move detail into docs/"


def test_pages_exist():
    names = {path.relative_to(ROOT).as_posix() for path in PAGES}
    assert {"README.md", "docs/own_training_loop.md", "docs/scored_output.md", "docs/trainer.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_relative_links_point_to_files(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address, or an anchor on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert broken == [], f"{page.relative_to(ROOT)} links to missing files"


def _named_paths(text: str) -> set[str]:
    """Paths of the repository the text names in backticks, e.g. `curation/trainer/selection.py`."""
    found = set()
    for code in CODE.findall(text):
        for token in code.split():
            token = token.strip(",;:()")
            if token.split("/")[0] in SOURCE_FOLDERS and "/" in token and re.search(r"\.(py|md|sh|json|txt)$", token):
                found.add(token)
    return found


def _named_modules(text: str) -> set[str]:
    """Dotted names of ours the text names in backticks or runs with `python -m` (`models.losses.own_pair_sigmoid`)."""
    found = set(MODULE_COMMAND.findall(text))
    for code in CODE.findall(text):
        if re.fullmatch(r"(models|curation|pipelines|demo)(\.\w+)+", code):
            found.add(code)
    return {name for name in found if name.split(".")[0] in ("models", "curation", "pipelines", "demo")}


def _resolves(dotted: str) -> bool:
    """Whether `dotted` is a module of ours, or an attribute of one (`models.losses.own_pair_sigmoid`)."""
    parts = dotted.split(".")
    value = importlib.import_module(parts[0])
    for index, part in enumerate(parts[1:], 2):
        if hasattr(value, part):
            value = getattr(value, part)
            continue
        try:  # a submodule not imported yet
            value = importlib.import_module(".".join(parts[:index]))
        except ModuleNotFoundError:
            return False
    return True


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_named_files_and_modules_exist(page):
    text = page.read_text(encoding="utf-8")
    missing_files = sorted(path for path in _named_paths(text) if not (ROOT / path).exists())
    missing_modules = sorted(name for name in _named_modules(text) if not _resolves(name))
    assert (missing_files, missing_modules) == ([], []), f"{page.relative_to(ROOT)} names what does not exist"


def test_the_checks_catch_a_stale_name():
    stale = "see `curation/scored_shards.py` and `curation.shared.scored_set.open_scoerd`; python -m curation.jest"
    assert _named_paths(stale) == {"curation/scored_shards.py"}
    assert not (ROOT / "curation/scored_shards.py").exists()
    unresolved = {name for name in _named_modules(stale) if not _resolves(name)}
    assert unresolved == {"curation.shared.scored_set.open_scoerd", "curation.jest"}


@pytest.fixture(scope="module")
def sidecar_tiny_corpus(tiny_corpus, reference_checkpoint, tmp_path_factory):
    """The tiny corpus's web split scored into sidecars (the other output layout)."""
    from pipelines import score

    output = str(tmp_path_factory.mktemp("sidecars") / "scored")
    flags = "--min_image_size=4 --output_layout=sidecar".split()
    score.run([f"--input={tiny_corpus}/web/*.tar", f"--output={output}", f"--reference={reference_checkpoint}", *flags])
    return output


@pytest.mark.parametrize("layout", ["copied", "sidecar"])
def test_own_training_loop_example_selects_learnable_subbatches(layout, tiny_corpus, request, capsys):
    from curation.shared.scored_set import open_scored

    scored = request.getfixturevalue("scored_tiny_corpus" if layout == "copied" else "sidecar_tiny_corpus")
    assert open_scored(scored).layout == layout
    b, superbatch = 16, 80  # f = 0.8
    flags = f"--steps 2 --batch_size {b} --filter_ratio 0.8 --n_chunks 4".split()
    history = load_example().main(["--scored", scored, "--corpus", f"{tiny_corpus}/web/*.tar", *flags])
    assert [row["step"] for row in history] == [0, 1]  # the tiny corpus's scored examples fill two super-batches
    for row in history:
        indices = row["indices"]
        assert indices.shape == (b,) and len(set(indices.tolist())) == b
        assert indices.min() >= 0 and indices.max() < superbatch
        assert np.isfinite(row["loss"]) and np.isfinite(row["selected_learnability"])
    # Selection samples, and a learner at its start scores every pair alike, so one step may pick below a random
    # sub-batch; over the run the selected sub-batches are the more learnable.
    assert np.mean([r["selected_learnability"] - r["random_learnability"] for r in history]) > 0
    assert "step 1: 16 of 80 selected" in capsys.readouterr().out
