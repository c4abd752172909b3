"""The tree reads as a product: no development-history labels or references to documents outside the
repository in any tracked file, no measurement in a docstring (numbers live in benchmarks/RESULTS.md), a short
RESULTS.md, and no raw benchmark output in git."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess

import pytest

from tests.helpers import ROOT

ORDINALS = "first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|[0-9]+th"
# Spelled so that this file does not match its own patterns.
FORBIDDEN = "|".join(["DESIGN \u00a7", r"DESIGN\.md", r"\.\./shared", f"({ORDINALS}) " + "session"])
MEASUREMENT = re.compile(r"\d+(\.\d+)?\s?%|\d[\d,.]*\s*tok/s")
RESULTS_MAX_LINES = 200
# Files the check skips because their rewrite belongs to another change; the list is meant to be empty.


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def tracked() -> list[str]:
    if shutil.which("git") is None or git("rev-parse", "--is-inside-work-tree").returncode != 0:
        pytest.skip("not a git checkout")
    return git("ls-files").stdout.splitlines()


def test_no_history_labels_or_outside_references(tracked):
    hits = git("grep", "-nE", FORBIDDEN, "--", ".").stdout.strip()
    assert not hits, f"development-history labels or references outside the repository:\n{hits}"


def test_no_measurement_in_a_docstring(tracked):
    found = []
    for name in tracked:
        if not name.endswith(".py") or not (ROOT / name).is_file():
            continue
        tree = ast.parse((ROOT / name).read_text(), name)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False) or ""
                found += [f"{name}:{getattr(node, 'lineno', 1)}: {m.group(0)!r}" for m in MEASUREMENT.finditer(doc)]
    assert not found, "measurements belong in benchmarks/RESULTS.md, not in docstrings:\n" + "\n".join(found)


def test_results_is_a_short_record(tracked):
    lines = (ROOT / "benchmarks" / "RESULTS.md").read_text().count("\n")
    assert lines <= RESULTS_MAX_LINES, f"benchmarks/RESULTS.md has {lines} lines; at most {RESULTS_MAX_LINES}"
    assert not [n for n in tracked if n.startswith("benchmarks/results/")], "raw bench output is not tracked"
