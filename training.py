"""
What distill_rl.py's loops need besides the method: DDP set up by one call, sums over the ranks,
an optimizer step that refuses NaN, a named run's JSONL log, checkpoints and resume, the data
(train and validation), the student's initialisation and the config checks.
"""
import glob
import itertools
import json
import math
import os
import random
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model import GPT, GPTConfig, load_checkpoint, load_model, save_checkpoint
from tasks import load_records, read_split
from tokenizer import CompactTokenizer


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


def unwrap(model):
    """The GPT inside torch.compile's and DDP's wrappers: what samples, scores and is saved (its
    state_dict keys carry neither wrapper's prefix)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


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


def load_data(cfg):
    """(train, val): the train split (a seeded data_fraction of it, in file order) and the first
    eval_problems val records round-robin over the worlds (the file is in world order)."""
    data_dir, worlds = os.path.join(cfg.out_dir, "data"), cfg.worlds.split(",")
    train = read_split(data_dir, "train", worlds)
    order = random.Random(cfg.seed).sample(range(len(train)), len(train))
    train = [train[i] for i in sorted(order[:max(1, round(cfg.data_fraction * len(train)))])]
    by_world = {}
    for r in read_split(data_dir, "val", worlds, required=False):  # a user's data may bring only train
        by_world.setdefault(r["world"], []).append(r)
    val = [r for group in itertools.zip_longest(*by_world.values()) for r in group if r is not None]
    return train, val[:cfg.eval_problems]


def init_student(cfg, device):
    """(model, tokenizer) for --init: one of our checkpoints, GPT-2 weights, or scratch: then the
    compact vocabulary of every text in the run's data (all splits, so test questions encode)."""
    if cfg.init != "scratch":
        return load_model(cfg.init, device)[:2]
    texts = []
    for path in sorted(glob.glob(os.path.join(cfg.out_dir, "data", "*.jsonl"))):
        for r in load_records(path):
            for q, resp in [(r["question"], r["rationale"])] + [(p["question"], p["rationale"]) for p in r["probes"]]:
                texts += ["Q: " + q + "\nA:", " " + resp]
    tok = CompactTokenizer.from_texts(texts)
    torch.manual_seed(cfg.seed)
    return GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=tok.n_vocab,
                         block_size=cfg.block_size)).to(device), tok


def check_config(cfg, world_size):
    choices = dict(stage=("sft", "rl"), data=("qa", "ei"), ei_format=("dialogue", "single"),
                   algo=("reinforce", "grpo", "exgrpo"), probe_answers=("student", "teacher"),
                   loss_agg=("constant", "seq", "token"), scale_rewards=("group", "none"),
                   adv_group=("joint", "scenario"))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key}={getattr(cfg, key)} is not one of {', '.join(allowed)}")
    for ok, message in [
            (0 < cfg.data_fraction <= 1, "--data_fraction must be in (0, 1]"),
            (0 <= cfg.ei_mix <= 1, "--ei_mix must be in [0, 1]"),
            (cfg.algo != "exgrpo" or cfg.k >= 1, "exgrpo needs --k >= 1 probes per dialogue"),
            (min(cfg.group_size, cfg.batch_size, cfg.rl_batch_size, cfg.grad_accum) >= 1,
             "--group_size, --batch_size, --rl_batch_size and --grad_accum must be at least 1"),
            (cfg.batch_size % cfg.grad_accum == 0,
             f"--batch_size={cfg.batch_size} must be divisible by --grad_accum={cfg.grad_accum}"),
            (cfg.batch_size % world_size == cfg.rl_batch_size % world_size == 0,
             f"--batch_size and --rl_batch_size must be divisible by the {world_size} DDP ranks")]:
        if not ok:
            raise SystemExit(message)
