"""bench.py's GRPO row on a few tokens: the subprocesses run and the table reads their numbers."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rl_row_reports_step_sampling_and_memory():
    out = subprocess.run(
        [
            sys.executable,
            "bench.py",
            "--shapes=",
            "--rl_questions=2",
            "--rl_group=2",
            "--rl_new_tokens=4",
            "--warmup=0",
            "--iters=1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = re.search(r"^ours +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)$", out.stdout, re.M)
    assert row, out.stdout
    step, sampling, ratio, rss = map(float, row.groups())
    # a process holding torch: 0.3 GiB and up
    assert 0 < sampling < step and ratio > 1 and 0.1 < rss < 8
