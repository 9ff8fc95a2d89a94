"""
The GPU check: the GPU preset's pipeline top to bottom with reduced steps, timed and measured, into
one JSON (docs/gpu.md compares it with its estimate).

    # one GPU: GPT-2 124M from OpenAI's weights, under 10 minutes
    bash scripts/gpu_check.sh
    # dry run: the same stages at a tiny shape, about a minute
    bash scripts/gpu_check.sh --device=cpu
    # the same at GPT-2 124M shapes from an HF folder
    bash scripts/gpu_check.sh --device=cpu --init=DIR

The arguments are config files and --key=value flags, as for every stage: the stages get the same
files (each takes the keys it knows) and --out_dir, --device, --init from here. The stages run in
this process one after another: invert, EI-SFT, EXGRPO from the EI-SFT student, a linear probe of
both, evaluate. So each stage's peak GPU memory is torch.cuda.max_memory_allocated() since it
began. SFT tokens/s and the RL step times come from the stages' logs; rollout tokens/s counts every
token the student wrote in sample_rollouts (both scenarios) over the seconds spent there. Last, the
decode step of the EI-SFT student, eager and compiled (CUDA graphs), in seconds per token.
"""

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distill_rl  # noqa: E402  (the repository root is on the path only now)
import evaluate  # noqa: E402
import invert  # noqa: E402
import probe  # noqa: E402
from configurator import atomic_write, parse_config  # noqa: E402


@dataclass
class Config:
    out_dir: str = "out/gpu_check"
    device: str = "cuda"
    init: str = "gpt2"  # the SFT student's start: gpt2, an HF folder, or scratch (tiny)
    result: str = ""  # default: results/gpu_check.json on CUDA, else out_dir/gpu_check.json
    # for probe.py
    probe_args: str = "--max_problems=200 --iters=200 --controls=1 --intervene_problems=20"
    evaluate_args: str = "--max_problems=20"  # for evaluate.py


def in_stage(name, fn, report):
    """Run fn, recording its wall time and (on CUDA) its peak allocated memory; returns fn's
    value."""
    cuda = torch.cuda.is_available() and report["device"] != "cpu"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    value = fn()
    if cuda:
        torch.cuda.synchronize()
    report["stages"][name] = {
        "seconds": round(time.time() - t0, 2),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    return value


def count_rollout_tokens(counter):
    """Wrap distill_rl.sample_rollouts (rollout_batch looks it up at each call) so that it adds
    the tokens the student wrote and the seconds it took to counter."""
    real = distill_rl.sample_rollouts

    def counted(model, tok, dialogues, cfg, seed):
        t0 = time.time()
        rollouts = real(model, tok, dialogues, cfg, seed)
        counter["seconds"] += time.time() - t0  # .tolist() inside has synchronised the GPU
        counter["tokens"] += sum(w != distill_rl.CONTEXT for ws in rollouts.writer for w in ws)
        return rollouts

    distill_rl.sample_rollouts = counted


def decode_timing(path, device):
    """Seconds per decode step (one token for every row), eager and, on a GPU, with compile_decode
    (CUDA graphs), medians of reps sampled calls after one warm-up (the compiled one's warm-up
    compiles), and whether the two sample the same tokens from the same seed (on CPU the dry run
    times a smaller call, eager only: compile_decode leaves the CPU step eager)."""
    from model import load_model

    cuda = device.startswith("cuda")
    rows, new_tokens, reps = (64, 64, 3) if cuda else (4, 8, 1)
    model, tok, _ = load_model(path, device)
    prompts = [tok.encode("Q: Is the coin heads up?")] * rows

    def timed():
        times = []
        for i in range(reps + 1):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.time()
            # eot -1: no row stops
            tokens, _ = model.generate(prompts, new_tokens, temperature=1.0, seed=0, eot=-1)
            if cuda:
                torch.cuda.synchronize()
            times.append((time.time() - t0) / new_tokens)
        return round(statistics.median(times[1:]), 6), tokens

    eager, tokens = timed()
    result = dict(
        rows=rows, new_tokens=new_tokens, eager_s_per_step=eager, compiled_s_per_step=None
    )
    if cuda:
        model.compile_decode()
        compiled, tokens_compiled = timed()
        result.update(
            compiled_s_per_step=compiled,
            compiled_tokens_per_s=round(rows / compiled, 1),
            same_tokens=bool(torch.equal(tokens, tokens_compiled)),
        )
    return result


def read_log(out_dir, name):
    with open(os.path.join(out_dir, "logs", f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


def steady(records, key):
    """Median of key over the steps after the first (the first pays for warm-up and
    compilation)."""
    values = [r[key] for r in records[1:] or records]
    return round(statistics.median(values), 4)


def accuracies(out_dir):
    """{checkpoint: {split: accuracy}} from evaluate.py's results.json, every world pooled."""
    with open(os.path.join(out_dir, "report", "results.json")) as f:
        entries = json.load(f)["checkpoints"].values()
    pooled = lambda e: {split: evaluate.pooled(cells) for split, cells in e["acc"].items()}
    return {
        os.path.basename(e["path"])[:-3]: {
            split: round(acc, 4) for split, acc in pooled(e).items() if acc is not None
        }
        for e in entries
    }


def run(cfg, files):
    """Every stage in order; returns the report."""
    out, ckpt = cfg.out_dir, os.path.join(cfg.out_dir, "ckpt")
    common = [f"--out_dir={out}", f"--device={cfg.device}"]
    report = {
        "device": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "configs": files,
        "init": cfg.init,
        "stages": {},
    }
    rollouts = {"tokens": 0, "seconds": 0.0}
    count_rollout_tokens(rollouts)
    t0 = time.time()
    in_stage("invert", lambda: invert.build(parse_config(invert.Config(), files + common)), report)
    sft = files + common + [f"--init={cfg.init}", "--stage=sft", "--data=ei"]
    student = in_stage("sft", lambda: distill_rl.main(sft), report)
    report["model"] = dict(params_m=round(student.num_params() / 1e6, 2), **vars(student.config))
    del student  # the RL stage loads the checkpoint: free the memory first
    rl = files + common + [f"--init={ckpt}/sft_ei.pt", "--stage=rl", "--algo=exgrpo"]
    in_stage("rl", lambda: distill_rl.main(rl), report)
    probes = [
        f"--checkpoints=ei_sft={ckpt}/sft_ei.pt,exgrpo={ckpt}/rl_exgrpo.pt",
        f"--data={out}/data",
        "--world=coin",
        f"--out_dir={out}/probe",
        f"--device={cfg.device}",
    ]
    in_stage("probe", lambda: probe.main(probes + cfg.probe_args.split()), report)
    in_stage("evaluate", lambda: evaluate.main(common + cfg.evaluate_args.split()), report)
    decode = lambda: decode_timing(f"{ckpt}/sft_ei.pt", cfg.device)
    report["decode"] = in_stage("decode", decode, report)
    sft_log, rl_log = read_log(out, "sft_ei"), read_log(out, "rl_exgrpo")
    report.update(
        total_seconds=round(time.time() - t0, 1),
        peak_memory_gb=max((s["peak_memory_gb"] or 0) for s in report["stages"].values()) or None,
        sft_steps=len(sft_log),
        sft_tokens_per_s=steady(sft_log, "tokens_per_s"),
        rl_steps=len(rl_log),
        rl_step_s=steady(rl_log, "time_step"),
        rl_step_parts_s={
            part: steady(rl_log, f"time_{part}") for part in ("sample", "score", "update")
        },
        rl_rollout_tokens_per_s=round(rollouts["tokens"] / max(rollouts["seconds"], 1e-9), 1),
        rl_final=dict(
            reward=rl_log[-1]["reward"],
            acc_full=rl_log[-1]["acc_full"],
            val_acc=rl_log[-1].get("val_acc"),
        ),
        sft_final_val_acc=sft_log[-1].get("val_acc"),
        accuracy=accuracies(out),
    )
    return report


def main(argv):
    cfg = parse_config(Config(), argv)
    files = [a for a in argv if not a.startswith("--")]
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device here: run on a GPU machine, or pass --device=cpu for the dry run"
        )
    report = run(cfg, files)
    path = cfg.result or (
        "results/gpu_check.json"
        if cfg.device.startswith("cuda")
        else os.path.join(cfg.out_dir, "gpu_check.json")
    )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, json.dumps(report, indent=1) + "\n")
    peak = f"{report['peak_memory_gb']} GB" if report["peak_memory_gb"] else "not measured on CPU"
    decode = report["decode"]
    print(
        f"wrote {path}: {report['total_seconds']} s, SFT {report['sft_tokens_per_s']:.0f} "
        f"tokens/s, RL step {report['rl_step_s']:.2f} s, rollouts "
        f"{report['rl_rollout_tokens_per_s']:.0f} tokens/s, decode step "
        f"{decode['eager_s_per_step']} s eager, {decode['compiled_s_per_step']} s compiled, "
        f"peak memory {peak}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
