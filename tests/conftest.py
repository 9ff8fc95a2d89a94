import os
import sys

import torch

# the tests import the top-level scripts (model.py, tasks.py, ...) as modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
