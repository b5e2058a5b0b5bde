"""The layout's rules, checked so the picture cannot rot: imports point one way only, and no source file is long.

models/            imports nothing of ours
curation/shared/   what both halves share: models/ only
pipelines/         the Beam jobs: curation/shared/ and models/, never the trainer
curation/trainer/  the trainer: curation/shared/ and models/, never pipelines/
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WRONG_WAY = pathlib.Path(__file__).resolve().parent / "fixtures" / "wrong_way_imports"
OURS = ("models", "curation", "pipelines", "demo", "bench", "tests")
LINE_LIMIT = 400
LIMITED_PACKAGES = ("models", "curation", "pipelines", "demo")

# Package prefix -> the prefixes of our own modules it may import (besides itself). The longest prefix rules.
ALLOWED = {
    "models": ("models",),
    "curation.shared": ("curation.shared", "models"),
    "curation.trainer": ("curation.trainer", "curation.shared", "models"),
    "curation": ("curation", "models"),  # the entry points curation.train and curation.report, and the package
    "pipelines": ("pipelines", "curation.shared", "models"),
}


def module_name(root: pathlib.Path, path: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(root: pathlib.Path, path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth (inside functions too); `from a import b` gives
    `a.b`, since b may be a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(root, path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this file's package
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def rule_for(module: str) -> tuple[str, ...] | None:
    matching = [prefix for prefix in ALLOWED if module == prefix or module.startswith(prefix + ".")]
    return ALLOWED[max(matching, key=len)] if matching else None


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def wrong_way_imports(root: pathlib.Path) -> list[str]:
    """'path:line: module imports target' for every import of ours that the layout forbids."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(root, path)
        allowed = rule_for(module)
        if allowed is None:
            continue
        for line, target in imported_modules(root, path):
            if target.split(".")[0] in OURS and not within(target, allowed):
                # `from curation import train` names a module; `from curation.shared import schema` too.
                problems.append(f"{path.relative_to(root)}:{line}: {module} imports {target}")
    return problems


def long_files(root: pathlib.Path, packages=LIMITED_PACKAGES, limit: int = LINE_LIMIT) -> dict[str, int]:
    counts = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > limit:
                counts[str(path.relative_to(root))] = lines
    return counts


def test_imports_point_one_way():
    assert len(list((ROOT / "curation").rglob("*.py"))) > 20  # the walk sees the tree
    assert wrong_way_imports(ROOT) == []


def test_a_wrong_way_import_is_caught():
    problems = wrong_way_imports(WRONG_WAY)
    caught = {problem.split(":")[0] for problem in problems}
    assert caught == {
        "models/uses_ours.py",
        "curation/shared/uses_trainer.py",
        "pipelines/uses_trainer.py",
        "curation/trainer/uses_pipelines.py",
    }, problems
    # The function-level import is found, and an allowed import in the same file is not reported.
    assert any("curation.trainer.loop" in problem for problem in problems)
    assert not any("curation.shared.schema" in problem for problem in problems)


@pytest.mark.parametrize(
    "module, allowed",
    [
        ("curation.shared.schema", True),
        ("curation.trainer.loop", False),
        ("pipelines.stages", False),
        ("models.losses", True),
    ],
)
def test_what_the_shared_half_may_import(module, allowed):
    assert within(module, rule_for("curation.shared.manifest")) is allowed


def test_no_source_file_is_long():
    assert long_files(ROOT) == {}


def test_a_long_file_is_caught(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "short.py").write_text("x = 1\n" * LINE_LIMIT)
    (tmp_path / "models" / "long.py").write_text("x = 1\n" * (LINE_LIMIT + 1))
    assert long_files(tmp_path, packages=("models",)) == {"models/long.py": LINE_LIMIT + 1}
