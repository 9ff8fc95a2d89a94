"""The repository's shape: stages talk through the run folder, never by importing each other;
no text names a file outside the repository; the whole tree is clean under ruff's formatter and
linter (pyproject.toml configures both)."""

import ast
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("invert", "distill_rl", "probe", "evaluate")


def imported_modules(name):
    """The top-level names of every module name.py imports, anywhere in the file."""
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_no_stage_imports_another_stage():
    scripts = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))]
    assert set(STAGES) <= set(scripts)
    # the shared files (model, worlds, tasks, the helpers) import no stage either
    for name in scripts:
        wrong = imported_modules(name) & (set(STAGES) - {name})
        assert not wrong, f"{name}.py imports the stage(s) {sorted(wrong)}"


def test_no_text_names_a_file_outside_the_repository():
    files = [
        p
        for pattern in ("*.py", "*.md", "*.sh", "config/*.py", "tests/*.py")
        for p in glob.glob(os.path.join(ROOT, pattern))
        if os.path.basename(p) != "test_layout.py"
    ]
    # the project's notes kept outside the repository
    outside = re.compile(r"\b(METHOD|DESIGN|PITFALL|STYLE)S?\b")
    for path in files:
        for n, line in enumerate(open(path, encoding="utf-8"), 1):
            assert not outside.search(line), (
                f"{os.path.relpath(path, ROOT)}:{n} names {outside.search(line)[0]}"
            )


# ---- LINT: ruff over the whole repository (python -m pytest -m lint runs only this) ----


@pytest.mark.lint
def test_ruff_format_and_check_are_clean_over_the_whole_repository():
    """`ruff format --check .` and `ruff check .` from the repository root (requirements-dev.txt
    pins ruff: the formatter's output changes between versions); a failure shows both commands'
    output."""
    failed = []
    for args in (["format", "--check", "."], ["check", "."]):
        run = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
        )
        if run.returncode != 0:
            failed.append(f"$ ruff {' '.join(args)}\n{run.stdout}{run.stderr}")
    if failed:
        pytest.fail("\n".join(failed), pytrace=False)
