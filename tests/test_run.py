"""The main job end to end: `bash run.sh --quick` writes a report with every method row."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [
    "vanilla SFT (sft_qa)",
    "EI-SFT (sft_ei)",
    "SFT + dialogue RL (rl_exgrpo_plain)",
    "SFT + dialogue RL + aux (rl_exgrpo_nobonus)",
    "EXGRPO (rl_exgrpo)",
    "RL cold start (rl_cold)",
    "SFT + GRPO (one turn) (rl_grpo)",
]


def test_run_sh_quick(tmp_path):
    out = tmp_path / "quick"
    result = subprocess.run(
        ["bash", "run.sh", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = (out / "report" / "report.md").read_text()
    for row in ROWS:
        assert f"| {row} |" in report
    for split in ("test_id", "ood_long", "ood_reverse", "ood_names"):
        assert split in report
    assert (out / "probe" / "probe_coin_state_event.png").stat().st_size > 0
    # one EXGRPO step up close (scripts/show_rl_step.py)
    assert "## One EXGRPO step, seen up close" in report and "Scenario A (full dialogue)" in report
