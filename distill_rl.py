"""
Stages 2-3 of reinforcement distillation via Explanatory Inversion (Tan et al., ICLR 2026).

stage=sft  Teacher-forced NLL on the teacher's responses, prompt tokens masked:
           L_SFT = - sum_i log p(T_i | Q_i). data=qa is vanilla distillation (Q -> R_T, A);
           data=ei is EI-SFT: the probes of D_EI too, with ei_mix of each batch original questions;
           ei_format=dialogue presents probes as teacher-forced dialogues ending in Q [ours].
stage=rl   One loop, three algorithms, on the questions the difficulty filter (Eq. 2) keeps:
  reinforce  single turn; sequence REINFORCE with the group-mean baseline: A_g = R_g - mean(R).
  grpo       single turn; G samples per question; U_g = (R_g - mean) / (std + 1e-4) (population
             std, so G = 1 gives U = 0, not NaN); per token
             J = min(rho U, clip(rho, 1 - eps, 1 + eps) U) - beta * k3(pi_theta, pi_ref),
             rho = pi_theta / pi_old, k3 = exp(r) - r - 1 with r = log pi_ref - log pi_theta.
  exgrpo     METHOD.md stage 3: per question, k EI probes drawn without replacement; G Scenario A
             rollouts (all k probes, then Q) and G Scenario B rollouts (the first k' < k probes,
             k' uniform in 0..k-1, one k' per question), the probe answers written by the student.
             R = 1 if the final answer to Q is right. DSU bonus (Eqs. 5-6): if P_full > nu *
             P_partial, each correct Scenario A rollout gets R + delta. Advantages and the
             clipped objective (Eq. 7) over Scenario A only; Scenario B only estimates P_partial.
             Gradient through every student-written token (probe answers and final answer).
             Plus aux_coef * L_aux (Eq. 8): NLL of the teacher's probe responses in dialogue context.
Our decisions where the paper is silent (METHOD.md [ours]); one k' per question is fixed, the
rest are flags: loss_agg=seq (per-sequence token mean, then batch mean; token = DAPO global
token mean); scale_rewards=group|none; probe_answers=student|teacher; grad_probe_answers (the
probe answers are actions too); partial_gradient (Scenario B trained too); ei_format. Rollouts are
sampled at `temperature` without top-k and scored at the same temperature; EOS is trained and
everything after it masked by position; pi_old is the policy that sampled (ppo_epochs passes per
batch); pi_ref is the starting checkpoint, frozen.
The loss value is not a progress signal (it starts near 0 by construction): watch the reward.

    python distill_rl.py config/cpu_tiny.py --stage=sft --data=ei
    python distill_rl.py config/cpu_tiny.py --stage=rl --algo=exgrpo --init=out/default/ckpt/sft_ei.pt
    torchrun --nproc_per_node=2 distill_rl.py ...   (DDP: gloo on CPU, nccl on GPU)
"""
import copy
import glob
import hashlib
import itertools
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from collections import Counter

from configurator import parse_config, pick_device, set_threads
from model import GPT, GPTConfig, KVCache, load_model, pad_rows, save_checkpoint, sequence_logprobs
from tasks import greedy_answers, is_correct, load_records, prompt_ids, response_ids
from tokenizer import CompactTokenizer


def difficulty_filter(records, answer_fn, tau_hard=1):
    """Eq. 2: keep Q when tau_hard <= L < N'_Q, where N'_Q is the number of Q's EI probes and L the number
    the student answers right; drop Q when N'_Q = 0. answer_fn(probe questions) -> response texts (e.g.
    the student's greedy generate). Returns (kept records, counts of kept and of each kind dropped)."""
    flat = [(i, pr) for i, r in enumerate(records) for pr in r["probes"]]
    said = answer_fn([pr["question"] for _, pr in flat]) if flat else []
    if len(said) != len(flat):
        raise ValueError(f"answer_fn gave {len(said)} responses for {len(flat)} probe questions")
    right = Counter()
    for (i, pr), t in zip(flat, said):
        right[i] += is_correct(records[i]["world"], t, pr["answer"], pr["question"])
    counts, kept = dict(kept=0, dropped_all_correct=0, dropped_too_few=0, dropped_no_probes=0), []
    for i, r in enumerate(records):
        n = len(r["probes"])
        key = ("dropped_no_probes" if n == 0 else "dropped_all_correct" if right[i] == n
               else "dropped_too_few" if right[i] < tau_hard else "kept")
        counts[key] += 1
        kept += [r] if key == "kept" else []
    return kept, counts


@dataclass
class Config:
    out_dir: str = "out/default"      # run folder: reads data/, writes ckpt/ and logs/
    stage: str = "sft"                # sft | rl
    name: str = ""                    # checkpoint/log name; default sft_<data> or rl_<algo>
    init: str = "scratch"             # scratch (compact vocab) | a checkpoint .pt | gpt2 | an HF folder
    worlds: str = "arith,coin,date,swap"
    seed: int = 1337
    device: str = "auto"
    threads: int = 0                  # torch threads; 0 = torch's default
    # from-scratch student
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 512
    # SFT (stage 2)
    data: str = "qa"                  # qa = vanilla distillation | ei = EI-SFT (probes too)
    ei_mix: float = 0.5               # share of single original questions in each EI-SFT batch [ours]
    ei_format: str = "dialogue"       # EI-SFT examples: dialogue (1..k probes, then Q) | single (one probe) [ours]
    data_fraction: float = 1.0        # share of the training questions used (data-efficiency runs)
    epochs: float = 0.0               # > 0 sets max_iters to this many passes over the training examples
    max_iters: int = 2000
    batch_size: int = 32              # SFT sequences per optimizer step
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 3e-3                  # SFT peak learning rate
    warmup_iters: int = 100
    min_lr_ratio: float = 0.1         # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 500
    eval_problems: int = 200          # val questions for accuracy during training
    # RL (stage 3)
    algo: str = "exgrpo"              # reinforce | grpo | exgrpo
    rl_steps: int = 40
    rl_lr: float = 2e-5               # an SFT student breaks at 1e-4 (DESIGN.md); 1e-5..3e-5 is stable
    rl_warmup: int = 5
    rl_batch_size: int = 8            # questions per RL step
    group_size: int = 8               # G rollouts per scenario per question [ours]
    k: int = 3                        # EI probes per dialogue (paper: 5)
    probe_answers: str = "student"    # who writes the probe answers in a rollout: student | teacher [ours]
    grad_probe_answers: bool = True   # policy gradient through the student's probe answers too [ours]
    partial_gradient: bool = False    # Scenario B rollouts get gradient too (own advantages) [ours]
    dsu_bonus: bool = True            # Dialogue Structure Utility bonus, Eqs. 5-6
    delta: float = 0.5                # bonus size [ours]
    nu: float = 1.0                   # fire when P_full > nu * P_partial [ours]
    aux_coef: float = 0.1             # lambda of the auxiliary SFT loss, Eq. 8 [ours]
    beta: float = 0.04                # KL(pi_theta || pi_ref) weight, k3 estimator; 0 allowed
    clip_eps: float = 0.2
    ppo_epochs: int = 1               # optimizer passes over each batch of rollouts
    temperature: float = 1.0          # sampling and scoring temperature (no top-k in RL)
    max_new_tokens: int = 48          # per answer turn
    loss_agg: str = "seq"             # seq (mean per sequence, then over sequences) | token (global token mean)
    scale_rewards: str = "group"      # group (divide by group std) | none
    difficulty: bool = True           # Eq. 2 with the starting student chooses the RL questions
    tau_hard: int = 1
    rl_candidates: int = 512          # train questions (seeded draw) the difficulty filter examines
    micro_batch: int = 64             # rows per forward/backward in the RL update
    # bookkeeping
    ckpt_interval: int = 0            # also checkpoint every N steps (0: only at the end)
    resume: bool = False


def check_config(cfg):
    choices = dict(stage=("sft", "rl"), data=("qa", "ei"), ei_format=("dialogue", "single"),
                   algo=("reinforce", "grpo", "exgrpo"), probe_answers=("student", "teacher"),
                   loss_agg=("seq", "token"), scale_rewards=("group", "none"))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key}={getattr(cfg, key)} is not one of {', '.join(allowed)}")
    if not 0 < cfg.data_fraction <= 1:
        raise SystemExit("--data_fraction must be in (0, 1]")
    if not 0 <= cfg.ei_mix <= 1:
        raise SystemExit("--ei_mix must be in [0, 1]")
    if cfg.algo == "exgrpo" and cfg.k < 1:
        raise SystemExit("exgrpo needs --k >= 1 probes per dialogue")
    if min(cfg.group_size, cfg.batch_size, cfg.rl_batch_size, cfg.grad_accum) < 1:
        raise SystemExit("--group_size, --batch_size, --rl_batch_size and --grad_accum must be at least 1")
    if cfg.batch_size % cfg.grad_accum:
        raise SystemExit(f"--batch_size={cfg.batch_size} must be divisible by --grad_accum={cfg.grad_accum}")


# ---------------------------------------------------------------------------------------------
# data


def read_split(cfg, split, required=True):
    path = os.path.join(cfg.out_dir, "data", f"{split}.jsonl")
    if not os.path.isfile(path):
        if not required:
            return []  # e.g. a user's JSONL brings only train: no validation during training
        raise SystemExit(f"{path} does not exist: run `python invert.py --out_dir={cfg.out_dir}` first")
    worlds = cfg.worlds.split(",")
    return [r for r in load_records(path) if r["world"] in worlds]


def validation(cfg):
    """The first eval_problems val records, taken round-robin over the worlds (the file is in world
    order, and its first 200 lines would all be arith)."""
    by_world = {}
    for r in read_split(cfg, "val", required=False):
        by_world.setdefault(r["world"], []).append(r)
    mixed = [r for group in itertools.zip_longest(*by_world.values()) for r in group if r is not None]
    return mixed[:cfg.eval_problems]


def build_tokenizer(cfg):
    """A from-scratch student gets the compact vocabulary of every text the run's data holds
    (all splits, so test questions are encodable; unseen tokens keep untrained embeddings)."""
    texts = []
    for path in sorted(glob.glob(os.path.join(cfg.out_dir, "data", "*.jsonl"))):
        for r in load_records(path):
            for q, resp in [(r["question"], r["rationale"])] + [(p["question"], p["rationale"]) for p in r["probes"]]:
                texts += ["Q: " + q + "\nA:", " " + resp]
    return CompactTokenizer.from_texts(texts)


def init_student(cfg, device):
    """(model, tokenizer) for --init: scratch, one of our checkpoints, or GPT-2 weights."""
    if cfg.init == "scratch":
        tok = build_tokenizer(cfg)
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                              vocab_size=tok.n_vocab, block_size=cfg.block_size))
        return model.to(device), tok
    model, tok, _ = load_model(cfg.init, device)
    return model, tok


def sft_batch(examples, device):
    """(x, y) for teacher forcing. An example is a list of (prompt, response) turns; x is their
    concatenation without its last token, y the next tokens with -1 on prompts and on padding,
    so only responses (EOS included) are trained."""
    seqs = [[t for p, r in ex for t in p + r] for ex in examples]
    labels = [[t for p, r in ex for t in [-1] * len(p) + r] for ex in examples]
    x, y = pad_rows(seqs, device), pad_rows(labels, device, fill=-1)
    return x[:, :-1], y[:, 1:]


def accuracy(model, tok, records, max_new_tokens):
    answers = greedy_answers(model, tok, [r["question"] for r in records], max_new_tokens)
    right = sum(is_correct(r["world"], a, r["answer"], r["question"]) for r, a in zip(records, answers))
    return right / max(1, len(records))


# ---------------------------------------------------------------------------------------------
# shared training machinery


def lr_at(step, cfg, peak, total, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.stage == "rl":
        return peak  # RL: warmup, then constant
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def all_reduce_sum(values, device):
    """Sum a list of floats over DDP ranks (identity when not distributed)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def optimizer_step(model, optimizer, cfg, loss_value, where):
    """Clip and step, unless the loss or the gradient is NaN/inf: then stop before the weights
    change, so the last checkpoint written stays the last good one."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        raise SystemExit(f"loss {loss_value} / grad norm {float(grad_norm)} {where}; stopping before the "
                         f"update. Lower the learning rate or check the data.")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


class Run:
    """Paths, the JSONL log, checkpoints and resume for one named run."""

    def __init__(self, cfg, rank):
        self.cfg, self.rank = cfg, rank
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt", f"{cfg.name}.pt")
        self.log_path = os.path.join(cfg.out_dir, "logs", f"{cfg.name}.jsonl")

    def start(self, model, optimizer):
        """Returns the first step: 0, or where a resumed checkpoint left off."""
        step = 0
        if self.cfg.resume and os.path.isfile(self.ckpt_path):
            ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
            getattr(model, "module", model).load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step = ckpt["step"]
        if self.rank == 0:
            os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
            kept = []
            if step and os.path.isfile(self.log_path):  # drop log lines past the checkpoint
                kept = [l for l in open(self.log_path) if json.loads(l)["step"] <= step]
            with open(self.log_path, "w") as f:
                f.writelines(kept)
        return step

    def log(self, record):
        if self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, model, tok, optimizer, step, extra):
        if self.rank == 0:
            save_checkpoint(self.ckpt_path, model, tok, optimizer, step, extra=dict(extra, config=asdict(self.cfg)))


# ---------------------------------------------------------------------------------------------
# stage 2: SFT


def sft_examples(tok, records, cfg):
    """Per record, the token pairs (prompt, response) of Q and of each of its EI probes."""
    pair = lambda q, r: (prompt_ids(tok, q), response_ids(tok, r))
    return [(pair(r["question"], r["rationale"]), [pair(p["question"], p["rationale"]) for p in r["probes"]])
            for r in records]


def ei_example(g, pool, cfg):
    """One EI-SFT example. ei_format=single: one probe -> teacher response (the paper's D_EI pair).
    ei_format=dialogue [ours]: 1..k of a question's probes with the teacher's answers, then the
    question, every response trained: a from-scratch student otherwise never sees the turn format
    and the positions of EXGRPO's dialogues (its Scenario A accuracy starts near 0, measured)."""
    question, probes = pool[g.randrange(len(pool))]
    if cfg.ei_format == "single":
        return [probes[g.randrange(len(probes))]]
    return g.sample(probes, g.randint(1, min(cfg.k, len(probes)))) + [question]


@torch.no_grad()
def evaluate_sft(model, tok, val, cfg, device):
    """Validation loss (teacher-forced, original questions) and greedy accuracy."""
    model.eval()
    examples = [[question] for question, _ in sft_examples(tok, val, cfg)]
    n_tokens = sum(len(r) for [(_, r)] in examples)
    nll = 0.0
    for i in range(0, len(examples), cfg.batch_size):
        x, y = sft_batch(examples[i:i + cfg.batch_size], device)
        logits, _ = model(x)
        nll += F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-1,
                               reduction="sum").item()
    result = {"val_loss": nll / n_tokens, "val_acc": accuracy(model, tok, val, cfg.max_new_tokens)}
    model.train()
    return result


def train_sft(cfg, model, tok, device, rank, world_size):
    train = read_split(cfg, "train")
    order = random.Random(cfg.seed).sample(range(len(train)), len(train))
    train = [train[i] for i in sorted(order[:max(1, round(cfg.data_fraction * len(train)))])]
    val = validation(cfg)
    encoded = sft_examples(tok, train, cfg)
    pool = [e for e in encoded if e[1]] if cfg.data == "ei" else []
    if cfg.data == "ei" and not pool:
        raise SystemExit("data=ei but the training records hold no EI probes: rerun invert.py with rules")
    if cfg.epochs > 0:  # passes over every training example of the chosen data
        n_examples = len(encoded) + sum(len(probes) for _, probes in pool)
        cfg.max_iters = math.ceil(cfg.epochs * n_examples / cfg.batch_size)
    n_q = round(cfg.ei_mix * cfg.batch_size) if pool else cfg.batch_size
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay)
    ddp = DistributedDataParallel(model) if world_size > 1 else model
    run = Run(cfg, rank)
    step = run.start(model, optimizer)
    bar = tqdm(range(step, cfg.max_iters), desc=f"sft {cfg.name}", disable=rank != 0, initial=step, total=cfg.max_iters)
    for step in bar:
        t0 = time.time()
        # per-step seed: the batch depends on (seed, step, rank) only, so a resumed run is identical
        g = random.Random(f"{cfg.seed}-{step}-{rank}")
        batch = [[encoded[g.randrange(len(encoded))][0]] for _ in range(n_q)]
        batch += [ei_example(g, pool, cfg) for _ in range(cfg.batch_size - n_q)]
        # sorted by length, micro-batches pad less (short questions apart from long dialogues);
        # the loss is normalised by the whole step's tokens, so the gradient is the same
        batch.sort(key=lambda ex: sum(len(p) + len(r) for p, r in ex))
        lr = lr_at(step, cfg, cfg.lr, cfg.max_iters, cfg.warmup_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        n_tokens = all_reduce_sum([sum(len(r) for ex in batch for _, r in ex)], device)[0]
        micro = cfg.batch_size // cfg.grad_accum
        loss_sum = 0.0
        for m in range(cfg.grad_accum):
            x, y = sft_batch(batch[m * micro:(m + 1) * micro], device)
            logits, _ = ddp(x)
            # sum over tokens / tokens of the whole step (all micro-batches, all ranks): accumulation
            # and DDP's gradient averaging then give exactly the full-batch token-mean gradient
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-1,
                                   reduction="sum") * world_size / n_tokens
            loss.backward()
            loss_sum += loss.item() / world_size
        loss_sum = all_reduce_sum([loss_sum], device)[0]
        grad_norm = optimizer_step(model, optimizer, cfg, loss_sum,
                                   f"at step {step + 1}; the last good checkpoint ({run.ckpt_path}) is intact")
        seen = sum(len(p) + len(r) for ex in batch for p, r in ex) * world_size  # every token through the model
        record = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": seen / (time.time() - t0)}
        if val and ((step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_iters):
            record.update(evaluate_sft(model, tok, val, cfg, device))
        run.log(record)
        shown = {k: f"{record[k]:.3f}" for k in ("val_loss", "val_acc") if k in record}
        bar.set_postfix(loss=f"{loss_sum:.3f}", **shown)
        if cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0:
            run.save(model, tok, optimizer, step + 1, {"stage": "sft"})
    run.save(model, tok, optimizer, cfg.max_iters, {"stage": "sft"})


# ---------------------------------------------------------------------------------------------
# stage 3: RL


def group_advantages(rewards, scale_rewards="group", eps=1e-4):
    """rewards (Q, G) -> advantages (Q, G). Population std, so a single rollout or an all-equal
    group gets advantage 0 (no signal), never NaN."""
    centred = rewards - rewards.mean(1, keepdim=True)
    if scale_rewards == "group":
        return centred / (rewards.std(1, unbiased=False, keepdim=True) + eps)
    return centred


def dsu_bonus(correct_full, correct_partial, delta, nu):
    """Eqs. 5-6. correct_full (Q, G) and correct_partial (Q, G') are 0/1 outcome rewards of the
    Scenario A and B rollouts. Returns (bonus (Q, G), fired (Q,)): delta for each correct
    Scenario A rollout of a question whose full dialogue beats the partial one."""
    p_full, p_partial = correct_full.mean(1), correct_partial.mean(1)
    fired = p_full > nu * p_partial
    return delta * correct_full * fired[:, None].float(), fired


def sample_rollouts(model, tok, dialogues, cfg, seed):
    """Sample every dialogue turn by turn with one KV cache. dialogues: per row, a list of
    (question, teacher_response or None); the last turn is Q. Turns are right-aligned, so rows
    with fewer probes join later and every row answers Q in the last round. Probe turns with a
    teacher response are forced (context), the others sampled (student-written).
    Returns per row: tokens, a list marking student-written tokens (1 probe answers, 2 the final
    answer, 0 prompts and forced turns), and the final answer text."""
    device = model.transformer.wte.weight.device
    n_turns = max(len(d) for d in dialogues)
    tokens = [[] for _ in dialogues]
    written = [[] for _ in dialogues]
    final = [""] * len(dialogues)
    cache = KVCache(model.config, len(dialogues), 128, device, model.transformer.wte.weight.dtype)
    pending = [[] for _ in dialogues]  # forced tokens not yet in the cache
    for t in range(n_turns):
        prompts = []
        for i, d in enumerate(dialogues):
            j = t - (n_turns - len(d))
            if j < 0:
                prompts.append([])
                continue
            q, forced = d[j]
            p = prompt_ids(tok, q)
            if tokens[i] and tokens[i][-1] != tok.eot:
                p = [tok.eot] + p  # a turn cut at max_new_tokens still ends with EOS
            if forced is not None:  # a teacher-written probe answer: context, not sampled
                p = p + response_ids(tok, forced)
                pending[i] += p
                prompts.append([])
            else:
                prompts.append(pending[i] + p)
                pending[i] = []
            tokens[i] += p
            written[i] += [0] * len(p)
        if not any(prompts):
            continue  # a round of forced turns only
        out, mask = model.generate(prompts, cfg.max_new_tokens, temperature=cfg.temperature, seed=seed + t,
                                   eot=tok.eot, kv_cache=cache)
        for i, (row, m) in enumerate(zip(out.tolist(), mask.tolist())):
            new = [x for x, keep in zip(row, m) if keep]
            tokens[i] += new
            written[i] += [2 if t == n_turns - 1 else 1] * len(new)  # 2: the final answer to Q
            if t == n_turns - 1:
                final[i] = tok.decode([x for x in new if x != tok.eot])
    return tokens, written, final


def make_dialogues(records, cfg, rng):
    """Per question: the Scenario A and Scenario B turn lists."""
    full, partial = [], []
    for r in records:
        probes = rng.sample(r["probes"], min(cfg.k, len(r["probes"])))
        turns = [(p["question"], p["rationale"] if cfg.probe_answers == "teacher" else None) for p in probes]
        kp = rng.randrange(len(turns)) if turns else 0
        full.append(turns + [(r["question"], None)])
        partial.append(turns[:kp] + [(r["question"], None)])
    return full, partial


def aux_rows(tok, records, dialogues):
    """Eq. 8 targets: each question's Scenario A probes as a teacher-forced dialogue; only the
    teacher's responses are trained."""
    rows, masks = [], []
    for r, d in zip(records, dialogues):
        teacher = {p["question"]: p["rationale"] for p in r["probes"]}
        toks, mask = [], []
        for q, _ in d[:-1]:
            p, resp = prompt_ids(tok, q), response_ids(tok, teacher[q])
            toks += p + resp
            mask += [0] * len(p) + [1] * len(resp)
        if toks:
            rows.append(toks)
            masks.append(mask)
    return rows, masks


def masked_logprobs(model, rows, masks, device, temperature):
    """(logp, mask) over the shifted targets: logp[:, t] scores token t+1; mask[:, t] = 1 where
    token t+1 is trained. Padding is on the right and masked by position."""
    idx = pad_rows(rows, device)
    mask = pad_rows(masks, device)[:, 1:].float()
    logp, logits = sequence_logprobs(model, idx, temperature=temperature, return_logits=True)
    return logp, mask, logits


def rl_loss(logp, old_logp, ref_logp, mask, adv, cfg, n_seqs, n_tokens):
    """Eq. 7 on one micro-batch, normalised by the whole step's sequence/token counts.
    Returns the loss and (kl sum, clipped-token count) for logging."""
    ratio = torch.exp(logp - old_logp)
    if cfg.algo == "reinforce":
        surrogate = ratio * adv[:, None]  # gradient A * grad log pi: plain REINFORCE
        clipped = torch.zeros_like(ratio)
    else:
        surrogate = torch.min(ratio * adv[:, None], ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv[:, None])
        clipped = ((ratio - 1).abs() > cfg.clip_eps).float()
    r = ref_logp - logp
    kl = torch.exp(r) - r - 1  # k3: unbiased for KL(pi_theta || pi_ref), always >= 0
    per_token = -(surrogate - cfg.beta * kl) * mask
    if cfg.loss_agg == "seq":
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    else:
        loss = per_token.sum() / n_tokens
    return loss, ((kl * mask).sum().item(), (clipped * mask).sum().item())


def rollout_batch(model, tok, records, cfg, rng, device):
    """Sample, reward and advantage one batch of questions. Returns a dict with the Scenario A
    rows (tokens, student-written masks) that get gradient, their advantages, the Eq. 8 rows,
    and what the log needs."""
    G, Q, exgrpo = cfg.group_size, len(records), cfg.algo == "exgrpo"
    if exgrpo:
        full, partial = make_dialogues(records, cfg, rng)
    else:
        full, partial = [[(r["question"], None)] for r in records], []
    rows = [d for d in full for _ in range(G)] + [d for d in partial for _ in range(G)]
    tokens, written, final = sample_rollouts(model, tok, rows, cfg, seed=rng.randrange(2**31))
    owner = [records[(i // G) % Q] for i in range(len(rows))]  # Scenario A rows, then Scenario B rows
    correct = torch.tensor([float(is_correct(r["world"], text, r["answer"], r["question"]))
                            for r, text in zip(owner, final)], device=device)
    correct_full, correct_partial = correct[:Q * G].view(Q, G), correct[Q * G:].view(-1, G)
    rewards, fired = correct_full.clone(), torch.zeros(Q, dtype=torch.bool, device=device)
    if exgrpo and cfg.dsu_bonus:
        bonus, fired = dsu_bonus(correct_full, correct_partial, cfg.delta, cfg.nu)
        rewards = rewards + bonus
    scale = "none" if cfg.algo == "reinforce" else cfg.scale_rewards
    adv = group_advantages(rewards, scale).view(-1)
    aux, aux_masks = aux_rows(tok, records, full) if exgrpo and cfg.aux_coef > 0 else ([], [])
    # the actions: every student-written token (probe answers too, unless grad_probe_answers=False)
    actions = [[int(w == 2 or (w == 1 and cfg.grad_probe_answers)) for w in m] for m in written]
    n = Q * G  # Scenario A rows get gradient; Scenario B rows only estimate P_partial, unless...
    if cfg.partial_gradient:  # ...they get their own group-normalised outcome advantages
        n = len(rows)
        adv = torch.cat([adv, group_advantages(correct_partial, scale).view(-1)])
    return dict(rows=tokens[:n], masks=actions[:n], adv=adv, aux=aux, aux_masks=aux_masks,
                lens=[sum(w > 0 for w in m) for m in written[:Q * G]], rewards=rewards,
                correct_full=correct_full, correct_partial=correct_partial, fired=fired)


def policy_update(ddp, model, ref, optimizer, batch, cfg, world_size, on_bad_loss):
    """ppo_epochs optimizer steps on one batch (Eq. 7 + aux_coef * Eq. 8). pi_old and pi_ref are
    scored once, before any update, in the same way as pi_theta: at the first pass the ratio is
    exactly 1 and the KL exactly 0. Micro-batches of micro_batch rows; every loss term is
    normalised by the whole step's counts (all micro-batches, all ranks), so accumulation is
    exact. Returns logging sums."""
    device = batch["adv"].device
    rows, masks, adv, aux, aux_masks = (batch[k] for k in ("rows", "masks", "adv", "aux", "aux_masks"))
    n_seqs, n_tokens, n_aux = all_reduce_sum([len(rows), sum(map(sum, masks)), sum(map(sum, aux_masks))], device)
    chunks = [slice(i, i + cfg.micro_batch) for i in range(0, len(rows), cfg.micro_batch)]
    t0 = time.time()
    with torch.no_grad():
        old = [masked_logprobs(model, rows[c], masks[c], device, cfg.temperature)[0] for c in chunks]
        refs = [masked_logprobs(ref, rows[c], masks[c], device, cfg.temperature)[0] for c in chunks]
    stats = dict(kl=0.0, clipped=0.0, entropy=0.0, aux=0.0, n_tokens=n_tokens, time_score=time.time() - t0)
    model.train()
    for epoch in range(cfg.ppo_epochs):
        epoch_loss = 0.0
        for c, old_logp, ref_logp in zip(chunks, old, refs):
            logp, mask, logits = masked_logprobs(ddp, rows[c], masks[c], device, cfg.temperature)
            loss, (kl, clipped) = rl_loss(logp, old_logp, ref_logp, mask, adv[c], cfg, n_seqs, n_tokens)
            (loss * world_size).backward()  # DDP averages over ranks; the counts are already global
            epoch_loss += loss.item()
            if epoch == 0:
                with torch.no_grad():
                    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
                stats["kl"] += kl
                stats["clipped"] += clipped
                stats["entropy"] += (entropy * mask).sum().item()
        for i in range(0, len(aux), cfg.micro_batch):
            chunk = slice(i, i + cfg.micro_batch)
            logp, mask, _ = masked_logprobs(ddp, aux[chunk], aux_masks[chunk], device, 1.0)
            nll = -(logp * mask).sum() / n_aux  # Eq. 8, token mean over the step
            (cfg.aux_coef * nll * world_size).backward()
            epoch_loss += cfg.aux_coef * nll.item()
            stats["aux"] += nll.item() if epoch == 0 else 0.0
        stats["loss"] = all_reduce_sum([epoch_loss], device)[0]
        stats["grad_norm"] = optimizer_step(model, optimizer, cfg, stats["loss"], on_bad_loss)
    model.eval()
    return stats


def rl_questions(cfg, ref, tok, rank):
    """The RL question pool: data_fraction of train, then the difficulty filter (Eq. 2) run with
    the starting student (= pi_ref, so a resumed run picks the same questions)."""
    pool = read_split(cfg, "train")
    order = random.Random(cfg.seed).sample(range(len(pool)), len(pool))
    pool = [pool[i] for i in sorted(order[:max(1, round(cfg.data_fraction * len(pool)))])]
    if cfg.algo == "exgrpo":
        pool = [r for r in pool if r["probes"]]
    # Eq. 2 asks the student every probe of every question: examine a seeded draw, not all of train
    pool = random.Random(f"{cfg.seed}-candidates").sample(pool, min(len(pool), cfg.rl_candidates))
    counts = {"questions": len(pool)}
    if cfg.difficulty:
        answer_fn = lambda questions: greedy_answers(ref, tok, questions, cfg.max_new_tokens)
        pool, counts = difficulty_filter(pool, answer_fn, cfg.tau_hard)
        if rank == 0:
            tqdm.write(f"difficulty filter (tau_hard={cfg.tau_hard}): {counts}")
    if len(pool) < cfg.rl_batch_size:
        raise SystemExit(f"only {len(pool)} RL questions (difficulty filter: {counts}); need --rl_batch_size="
                         f"{cfg.rl_batch_size}. Lower --tau_hard, set --difficulty=False or train the SFT "
                         f"student longer.")
    return pool, counts


def train_rl(cfg, model, tok, device, rank, world_size):
    ref = copy.deepcopy(model).eval().requires_grad_(False)  # pi_ref: the starting student, frozen
    pool, counts = rl_questions(cfg, ref, tok, rank)
    val = validation(cfg)
    optimizer = model.configure_optimizer(cfg.rl_lr, 0.0)
    ddp = DistributedDataParallel(model) if world_size > 1 else model
    run = Run(cfg, rank)
    start = run.start(model, optimizer)
    model.eval()  # dropout off for sampling and scoring
    bar = tqdm(range(start, cfg.rl_steps), desc=f"rl {cfg.name}", disable=rank != 0, initial=start, total=cfg.rl_steps)
    for step in bar:
        t0 = time.time()
        # per-step seeds, so a resumed run is exact; one draw of questions for all ranks, then shards
        records = random.Random(f"{cfg.seed}-{step}").sample(pool, cfg.rl_batch_size)[rank::world_size]
        batch = rollout_batch(model, tok, records, cfg, random.Random(f"{cfg.seed}-{step}-{rank}"), device)
        t_sample = time.time() - t0
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, cfg.rl_lr, cfg.rl_steps, cfg.rl_warmup)
        stats = policy_update(ddp, model, ref, optimizer, batch, cfg, world_size,
                              f"at step {step + 1}; the last good checkpoint ({run.ckpt_path}) is intact")
        record = rl_record(batch, stats, cfg, device)
        record.update(step=step + 1, lr=optimizer.param_groups[0]["lr"], time_sample=t_sample,
                      time_update=time.time() - t0 - t_sample - stats["time_score"], time_score=stats["time_score"],
                      time_step=time.time() - t0)
        record["tokens_per_s"] = record.pop("gen_tokens") / record["time_step"]
        if val and ((step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.rl_steps):
            record["val_acc"] = accuracy(model, tok, val, cfg.max_new_tokens)
        run.log(record)
        bar.set_postfix(reward=f"{record['reward']:.2f}", acc=f"{record['acc_full']:.2f}", kl=f"{record['kl']:.4f}")
        if cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0:
            run.save(model, tok, optimizer, step + 1, {"stage": "rl", "filter": counts})
    run.save(model, tok, optimizer, cfg.rl_steps, {"stage": "rl", "filter": counts})


def rl_record(batch, stats, cfg, device):
    """The step's metrics, summed over DDP ranks (TRL-style names where they exist)."""
    cf, cp, rewards, lens = batch["correct_full"], batch["correct_partial"], batch["rewards"], batch["lens"]
    sums = all_reduce_sum([cf.sum(), cf.numel(), cp.sum(), cp.numel(), rewards.sum(), batch["fired"].sum(),
                           cf.size(0), (rewards.std(1, unbiased=False) == 0).sum(), stats["kl"], stats["clipped"],
                           stats["entropy"], sum(lens), stats["aux"]], device)
    ok_a, n_a, ok_b, n_b, rew, fired, n_q, zero_std, kl, clipped, ent, gen_tokens, aux = sums
    n_tok = stats["n_tokens"]
    return {"reward": rew / n_a, "reward_outcome": ok_a / n_a, "reward_dsu_bonus": (rew - ok_a) / n_a,
            "acc_full": ok_a / n_a, "acc_partial": ok_b / n_b if n_b else None,
            "p_full_minus_partial": ok_a / n_a - ok_b / n_b if n_b else None,
            "dsu_fire_rate": fired / n_q if cfg.algo == "exgrpo" else None, "kl": kl / n_tok,
            "clip_frac": clipped / n_tok, "entropy": ent / n_tok, "aux_loss": aux if batch["aux"] else None,
            "loss": stats["loss"], "grad_norm": stats["grad_norm"], "frac_zero_std": zero_std / n_q,
            "resp_len_mean": sum(lens) / len(lens), "resp_len_max": max(lens), "gen_tokens": gen_tokens}


def main(argv):
    cfg = parse_config(Config(), argv)
    check_config(cfg)
    cfg.name = cfg.name or (f"sft_{cfg.data}" if cfg.stage == "sft" else f"rl_{cfg.algo}")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(cfg.device)
    if world_size > 1:
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    for key in ("batch_size", "rl_batch_size"):
        if getattr(cfg, key) % world_size:
            raise SystemExit(f"--{key}={getattr(cfg, key)} must be divisible by the {world_size} DDP ranks")
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tok = init_student(cfg, device)
    if rank == 0:
        print(f"{cfg.stage} {cfg.name}: {model.num_params() / 1e6:.2f}M parameters, vocab {tok.n_vocab}, "
              f"init {cfg.init}, device {device}, {torch.get_num_threads()} threads")
    (train_sft if cfg.stage == "sft" else train_rl)(cfg, model, tok, device, rank, world_size)
    if world_size > 1:  # DDP's promise, checked: every rank ends with bitwise the same weights
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
        digests = [None] * world_size
        dist.all_gather_object(digests, digest)
        if rank == 0:
            print(f"DDP: {world_size} ranks {'agree' if len(set(digests)) == 1 else 'DISAGREE'} on the final weights")
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
