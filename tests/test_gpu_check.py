"""scripts/gpu_check.sh on CPU: its dry run at a tiny shape, and the full-shape smoke: every stage
(invert, EI-SFT, EXGRPO with k = 5 probe turns, a linear probe, evaluate) at GPT-2 124M's shapes
from a Hugging Face folder of random weights, through the GPU preset."""

import json
import os
import subprocess

import pytest
import torch

from gpt2_files import save_hf
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["invert", "sft", "rl", "probe", "evaluate", "decode"]
SPLITS = ["test_id", "ood_long", "ood_reverse", "ood_names"]


def gpu_check(out, *extra):
    """Run the dry run into out; returns its JSON and the RL log."""
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--device=cpu", f"--out_dir={out}", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rl_log = [json.loads(line) for line in open(out / "logs" / "rl_exgrpo.jsonl")]
    return report, rl_log


def check_report(report, out):
    assert list(report["stages"]) == STAGES
    assert all(s["seconds"] > 0 for s in report["stages"].values())
    assert report["device"] == "cpu" and report["peak_memory_gb"] is None  # measured on CUDA only
    assert (
        report["sft_tokens_per_s"] > 0
        and report["rl_step_s"] > 0
        and report["rl_rollout_tokens_per_s"] > 0
    )
    assert set(report["rl_step_parts_s"]) == {"sample", "score", "update"}
    decode = report["decode"]
    assert decode["eager_s_per_step"] > 0 and decode["compiled_s_per_step"] is None  # GPU only
    assert {name: sorted(acc) for name, acc in report["accuracy"].items()} == {
        "sft_ei": sorted(SPLITS),
        "rl_exgrpo": sorted(SPLITS),
    }
    assert (out / "probe" / "probe_coin_state_event.json").is_file()
    assert (out / "report" / "report.md").is_file()


def test_dry_run_at_a_tiny_shape(tmp_path):
    report, _ = gpu_check(tmp_path)
    check_report(report, tmp_path)
    assert report["model"]["n_layer"] == 2 and report["configs"][-1] == "config/gpu_check_cpu.py"


@pytest.mark.slow
def test_full_shape_smoke_through_the_gpu_preset(tmp_path):
    torch.manual_seed(0)
    save_hf(GPT(GPTConfig()), str(tmp_path / "gpt2"))  # GPTConfig's defaults are GPT-2 124M
    report, rl_log = gpu_check(tmp_path / "run", f"--init={tmp_path / 'gpt2'}")
    check_report(report, tmp_path / "run")
    shape = {
        k: report["model"][k] for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
    }
    assert shape == dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)
    assert report["configs"][0] == "config/gpu_gpt2.py"
    # each rollout answered k = 5 probes and the question, max_new_tokens = 4 tokens each (random
    # weights all but never sample EOS early)
    assert rl_log[0]["resp_len_mean"] == 6 * 4
