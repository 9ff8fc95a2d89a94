"""
What a training loop needs besides its method: DDP set up by one call, sums over the ranks, an
optimizer step that refuses NaN, and a named run's JSONL log, checkpoints and resume.
"""
import json
import math
import os
from dataclasses import asdict

import torch
import torch.distributed as dist

from model import load_checkpoint, save_checkpoint


def setup_ddp(device):
    """(rank, world_size, device). Under torchrun (one process per rank) this joins the process
    group, nccl on GPUs (one per rank), gloo on CPU; alone it is (0, 1, device)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world_size, device


def all_reduce_sum(values, device):
    """Sum a list of floats over DDP ranks (identity when not distributed)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def optimizer_step(model, optimizer, grad_clip, loss_value, where):
    """Clip and step, unless the loss or the gradient is NaN/inf: then stop before the weights
    change, so the last checkpoint written stays the last good one."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        raise SystemExit(f"loss {loss_value} / grad norm {float(grad_norm)} {where}; stopping before the "
                         f"update. Lower the learning rate or check the data.")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


class Run:
    """One named run's JSONL log and checkpoint, both written by rank 0, and resume."""

    def __init__(self, cfg, rank):
        self.cfg, self.rank = cfg, rank
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt", f"{cfg.name}.pt")
        self.log_path = os.path.join(cfg.out_dir, "logs", f"{cfg.name}.jsonl")

    def start(self, model, optimizer):
        """The first step: 0, or where a resumed checkpoint left off (the log is cut there too)."""
        step = 0
        if self.cfg.resume and os.path.isfile(self.ckpt_path):
            ckpt = load_checkpoint(self.ckpt_path)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step = ckpt["step"]
        if self.rank == 0:
            os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
            kept = [line for line in open(self.log_path) if json.loads(line)["step"] <= step] \
                if step and os.path.isfile(self.log_path) else []
            with open(self.log_path, "w") as f:
                f.writelines(kept)
        return step

    def where(self, step):
        return f"at step {step + 1}; the last good checkpoint ({self.ckpt_path}) is intact"

    def log(self, record):
        if self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, model, tok, optimizer, step, extra):
        if self.rank == 0:
            save_checkpoint(self.ckpt_path, model, tok, optimizer, step, extra=dict(extra, config=asdict(self.cfg)))
