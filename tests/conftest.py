import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tests import the top-level scripts (model.py, tasks.py, ...) as modules
sys.path.insert(0, ROOT)
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: minutes on 2 CPU cores (the full-shape GPT-2 smoke); "
        "python -m pytest -m 'not slow' skips it",
    )
    config.addinivalue_line(
        "markers", "lint: ruff format --check and ruff check over the whole repository"
    )


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One `bash run.sh --quick` run folder, shared by every test that needs the main job's
    checkpoints and report (the main job's own test, the workshop's exercises): it runs once."""
    out = tmp_path_factory.mktemp("run") / "quick"
    result = subprocess.run(
        ["bash", "run.sh", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out
