"""
What distill_rl.py's loops need besides the method: DDP set up by one call, sums over the ranks,
an optimizer step that refuses NaN, a named run's JSONL log, checkpoints, resume and lock, the
data (train and validation), the student's initialisation and the config checks.

A run folder is never clobbered by accident: a fresh run whose checkpoint or log exists stops
unless --overwrite=True (--resume=True continues it instead); a run holds logs/<name>.lock while
it trains, so a second run of the same name stops; a fresh run replaces an old log only when it
logs its first step, a resumed one rewrites the kept lines atomically.
"""

import contextlib
import glob
import itertools
import json
import math
import os
import random
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from configurator import UserError, atomic_write, check_fields, file_lock
from model import (
    GPT,
    GPTConfig,
    load_checkpoint,
    load_model,
    load_state,
    save_checkpoint,
)
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


def all_reduce_named(values, device):
    """Sum named numbers over DDP ranks in one call: {name: number} -> {name: float} (identity
    when not distributed)."""
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def optimizer_step(model, optimizer, grad_clip, loss_value, where):
    """Clip and step, unless the loss or the gradient is NaN/inf: then stop before the weights
    change, so the last checkpoint written stays the last good one."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        raise SystemExit(
            f"loss {loss_value} / grad norm {float(grad_norm)} {where}; stopping before the "
            f"update. Lower the learning rate or check the data."
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def run_paths(cfg):
    """(checkpoint, log) of the run cfg.name in cfg.out_dir."""
    return (
        os.path.join(cfg.out_dir, "ckpt", f"{cfg.name}.pt"),
        os.path.join(cfg.out_dir, "logs", f"{cfg.name}.jsonl"),
    )


def check_fresh(cfg):
    """A fresh run (no --resume) stops before it would replace another run's checkpoint or log."""
    found = [p for p in run_paths(cfg) if os.path.exists(p)]
    if found and not (cfg.resume or cfg.overwrite):
        raise SystemExit(
            f"{' and '.join(found)} already exist: pass --resume=True to continue that run, "
            f"--overwrite=True to replace it, or choose another --name"
        )


@contextlib.contextmanager
def run_lock(cfg, rank):
    """Hold out_dir/logs/<name>.lock while the run trains (rank 0 for all ranks): two runs of one
    name would race for one checkpoint and interleave one log."""
    if rank != 0:
        yield
        return
    path = os.path.join(cfg.out_dir, "logs", f"{cfg.name}.lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with file_lock(path, f"run {cfg.name} in {cfg.out_dir}"):
        check_fresh(cfg)  # again, under the lock: a run of this name may have finished meanwhile
        yield


def read_log(path):
    """The records of a run's JSONL log ([] when there is none). A torn last line (the process died
    while writing it) is dropped with a note; a bad line before the last means damage and stops."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "step" in record:
            records.append(record)
        elif n < len(lines):
            raise UserError(
                f"{path}:{n} is not a step's JSON record: the log is damaged; "
                "move it away to start anew"
            )
        else:
            print(
                f"note: dropped the torn last line of {path} (the run stopped while writing it)",
                file=sys.stderr,
            )
    return records


class Run:
    """One named run's JSONL log and checkpoint, both written by rank 0, and resume."""

    def __init__(self, cfg, rank):
        self.cfg, self.rank = cfg, rank
        self.ckpt_path, self.log_path = run_paths(cfg)
        self.saved = None  # the step of the last checkpoint this run wrote or resumed from
        self.appending = False  # False until the log holds this run's lines

    def start(self, model, optimizer):
        """The first step: 0, or where a resumed checkpoint left off (the log is cut there too).
        Resume with nothing to resume starts from step 0, with a note."""
        step, cfg = 0, self.cfg
        limit, total = (
            ("max_iters", cfg.max_iters) if cfg.stage == "sft" else ("rl_steps", cfg.rl_steps)
        )
        if cfg.resume and os.path.isfile(self.ckpt_path):
            ckpt = load_checkpoint(self.ckpt_path)
            if ckpt["extra"].get("stage") != cfg.stage or ckpt["step"] > total:
                raise UserError(
                    f"{self.ckpt_path} is a {ckpt['extra'].get('stage')} checkpoint at step "
                    f"{ckpt['step']}: it cannot resume --stage={cfg.stage} --{limit}={total}; "
                    f"resume with the same stage and a limit of at least {ckpt['step']}, "
                    "or choose another --name"
                )
            load_state(model, ckpt["model"], self.ckpt_path)
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, TypeError, KeyError) as e:
                raise UserError(
                    f"{self.ckpt_path}: its optimizer state does not fit this run ({e})"
                ) from None
            step = self.saved = ckpt["step"]
        elif cfg.resume and self.rank == 0:
            print(
                f"note: nothing to resume at {self.ckpt_path}; starting {cfg.name} from step 0",
                file=sys.stderr,
            )
        if self.rank == 0:
            os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
            if step:
                kept = [r for r in read_log(self.log_path) if r["step"] <= step]
                atomic_write(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))
                self.appending = True
        return step

    def done(self, step, total):
        """Whether a resumed run had already finished: then nothing is trained again and its
        checkpoint is left as it is (run.sh --resume skips finished rows this way)."""
        if step < total:
            return False
        if self.rank == 0:
            print(
                f"note: {self.ckpt_path} already holds step {step} of {total}; nothing to train",
                file=sys.stderr,
            )
        return True

    def where(self, step):
        kept = (
            f"the last good checkpoint ({self.ckpt_path}) is intact (step {self.saved})"
            if self.saved is not None
            else "no checkpoint of this run was written yet"
        )
        return f"at step {step + 1}; {kept}"

    def log(self, record):
        if self.rank == 0:
            line = json.dumps(record) + "\n"
            if self.appending:
                with open(self.log_path, "a") as f:
                    f.write(line)
            else:  # the first step of a fresh run: only now does it replace an old log
                atomic_write(self.log_path, line)
                self.appending = True

    def save(self, model, tok, optimizer, step, extra):
        if self.rank == 0:
            save_checkpoint(
                self.ckpt_path,
                model,
                tok,
                optimizer,
                step,
                extra=dict(extra, config=asdict(self.cfg)),
            )
        self.saved = step


def load_data(cfg):
    """(train, val): the train split (a seeded data_fraction of it, in file order) and the first
    eval_problems val records round-robin over the worlds (the file is in world order). --worlds=""
    means every world in the data; a world that is not there stops with the ones that are."""
    data_dir, worlds = (
        os.path.join(cfg.out_dir, "data"),
        [w for w in cfg.worlds.split(",") if w] or None,
    )
    train = read_split(data_dir, "train")
    present = sorted({r["world"] for r in train})
    if worlds and not set(worlds) <= set(present):
        raise SystemExit(
            f"--worlds={cfg.worlds}: {data_dir}/train.jsonl has no records of "
            f"{', '.join(sorted(set(worlds) - set(present)))} (it has {', '.join(present)})"
        )
    train = [r for r in train if worlds is None or r["world"] in worlds]
    order = random.Random(cfg.seed).sample(range(len(train)), len(train))
    train = [train[i] for i in sorted(order[: max(1, round(cfg.data_fraction * len(train)))])]
    by_world = {}
    # a user's data may bring only train
    for r in read_split(data_dir, "val", worlds, required=False):
        by_world.setdefault(r["world"], []).append(r)
    val = [r for group in itertools.zip_longest(*by_world.values()) for r in group if r is not None]
    return train, val[: cfg.eval_problems]


def init_student(cfg, device):
    """(model, tokenizer) for --init: one of our checkpoints, GPT-2 weights, or scratch: then the
    compact vocabulary of every text in the run's data (all splits, so test questions encode)."""
    if cfg.init != "scratch":
        model, tok = load_model(cfg.init, device)[:2]
    else:
        texts = []
        for path in sorted(glob.glob(os.path.join(cfg.out_dir, "data", "*.jsonl"))):
            for r in load_records(path):
                for q, resp in [(r["question"], r["rationale"])] + [
                    (p["question"], p["rationale"]) for p in r["probes"]
                ]:
                    texts += ["Q: " + q + "\nA:", " " + resp]
        tok = CompactTokenizer.from_texts(texts)
        torch.manual_seed(cfg.seed)
        model = GPT(
            GPTConfig(
                n_layer=cfg.n_layer,
                n_head=cfg.n_head,
                n_embd=cfg.n_embd,
                vocab_size=tok.n_vocab,
                block_size=cfg.block_size,
            )
        ).to(device)
    # the answers one rollout writes
    turns = cfg.k + 1 if cfg.stage == "rl" and cfg.algo == "exgrpo" else 1
    if turns * cfg.max_new_tokens >= model.config.block_size:
        raise SystemExit(
            f"{turns} answers of --max_new_tokens={cfg.max_new_tokens} do not fit the student's "
            f"block_size {model.config.block_size}: lower --max_new_tokens or --k"
        )
    return model, tok


# every number of distill_rl.Config: an interval, or choices for the words
LIMITS = dict(
    stage=("sft", "rl"),
    data=("qa", "ei"),
    ei_format=("dialogue", "single"),
    algo=("reinforce", "grpo", "exgrpo"),
    probe_answers=("student", "teacher"),
    loss_agg=("constant", "seq", "token"),
    scale_rewards=("group", "none"),
    adv_group=("joint", "scenario"),
    dtype=("auto", "float32", "bfloat16"),
    **dict.fromkeys(
        (
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "max_iters",
            "batch_size",
            "grad_accum",
            "eval_interval",
            "rl_steps",
            "rl_batch_size",
            "group_size",
            "ppo_epochs",
            "max_new_tokens",
            "rl_candidates",
            "micro_batch",
        ),
        "[1, inf)",
    ),
    **dict.fromkeys(
        (
            "seed",
            "threads",
            "epochs",
            "warmup_iters",
            "weight_decay",
            "eval_problems",
            "rl_warmup",
            "k",
            "delta",
            "nu",
            "aux_coef",
            "beta",
            "tau_hard",
            "ckpt_interval",
        ),
        "[0, inf)",
    ),
    # temperature 0 would make every rollout of a group identical
    **dict.fromkeys(("lr", "rl_lr", "grad_clip", "temperature"), "(0, inf)"),
    data_fraction="(0, 1]",
    ei_mix="[0, 1]",
    min_lr_ratio="[0, 1]",
    clip_eps="(0, 1)",
)


def check_config(cfg, world_size):
    """Every field in its range, the checks across fields, the run's name (default sft_<data> or
    rl_<algo>), and no fresh run over an existing one (check_fresh)."""
    check_fields(cfg, LIMITS)
    cfg.name = cfg.name or (f"sft_{cfg.data}" if cfg.stage == "sft" else f"rl_{cfg.algo}")
    for ok, message in [
        (
            os.path.basename(cfg.name) == cfg.name and not cfg.name.startswith("."),
            f"--name={cfg.name} must be a plain file name (no folders)",
        ),
        (
            cfg.n_embd % cfg.n_head == 0,
            f"--n_embd={cfg.n_embd} must be divisible by --n_head={cfg.n_head}",
        ),
        (cfg.algo != "exgrpo" or cfg.k >= 1, "exgrpo needs --k >= 1 probes per dialogue"),
        (
            cfg.batch_size % cfg.grad_accum == 0,
            f"--batch_size={cfg.batch_size} must be divisible by --grad_accum={cfg.grad_accum}",
        ),
        (
            cfg.batch_size % world_size == cfg.rl_batch_size % world_size == 0,
            f"--batch_size and --rl_batch_size must be divisible by the {world_size} DDP ranks",
        ),
    ]:
        if not ok:
            raise SystemExit(message)
    check_fresh(cfg)


def progress(first, total, desc, rank):
    """The steps first..total-1 with a tqdm bar that starts at first (a resumed run), on rank 0."""
    return tqdm(range(first, total), desc=desc, disable=rank != 0, initial=first, total=total)


def get_lr(step, cfg, peak, total, warmup):
    """The learning rate of a step of SFT (warmup, cosine decay) or RL (warmup, constant)."""
    # 1) linear warmup to peak: AdamW's first updates rest on few gradients
    if step < warmup:
        return peak * (step + 1) / warmup
    # 2) RL: then constant
    if cfg.stage == "rl":
        return peak
    # 3) SFT: cosine decay from peak down to peak * min_lr_ratio at the last step
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )
