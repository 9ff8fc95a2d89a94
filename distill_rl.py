"""
Stages 2-3 of reinforcement distillation via Explanatory Inversion (Tan et al., ICLR 2026, EXGRPO).

Stage 2, SFT (stage=sft). The teacher-forced NLL of the teacher's responses, prompts masked:

    L_SFT = - sum_i log p(T_i | Q_i)

data=qa is vanilla distillation (Q -> R_T, A); data=ei is EI-SFT: the EI probes too, with a share
ei_mix of every batch still original questions.

Stage 3, RL (stage=rl), on the questions the difficulty filter keeps:

    Eq. 2    keep Q when tau_hard <= L < N'_Q  (N'_Q: Q's EI probes, L: those the student answers)

For each question, k EI probes drawn without replacement make two dialogues:
    Scenario A (full):    the k probes in turn, then Q;           G rollouts
    Scenario B (partial): the first k' < k probes, then Q;        G rollouts, k' uniform in 0..k-1
    R        = 1 if the rollout's final answer to Q is right, else 0           (the outcome reward)
    Eq. 5-6  when P_full > nu * P_partial (the accuracies of A and B), the DSU bonus fires and
             every correct Scenario A rollout gets R + delta
    Eq. 7    U_g = (R_g - mean R) / (std R + 1e-4) over the question's 2G rollouts, A and B;
             J = sum over Scenario A's trained tokens (divided as loss_agg says) of
                 min(rho U, clip(rho, 1 - eps, 1 + eps) U) - beta * KL(pi_theta || pi_ref),
             rho = pi_theta / pi_old per token, KL by the k3 estimator exp(r) - r - 1,
             r = log pi_ref - log pi_theta
    Eq. 8    L_aux = - sum_j log pi_theta(teacher response_j | probe_j, context)
    loss     = -J + lambda * L_aux                                       (exgrpo_objective)

algo=grpo is the same objective on one-turn rollouts (G per question, no probes, no bonus);
algo=reinforce replaces the clipped term by rho * A with A = R - mean R (rho = 1 in value: the
gradient A * grad log pi). The loss starts near 0 by construction: watch the reward.

Where the paper is silent we decided, each a flag (docs/design.md lists them):
  1. U's group is both scenarios together (adv_group=joint). With A's G rollouts alone, a bonus
     paid to every correct one multiplies their 0/1 rewards by (1 + delta) and the group's std
     divides it out again (the advantages moved < 3e-4, measured).
  2. One k' per question; Scenario B only estimates P_partial and the baseline, no gradient.
  3. The student writes the probe answers (probe_answers=student), and they are trained like the
     final answer (grad_probe_answers); prompts and probe questions are masked.
  4. loss_agg=constant (Dr. GRPO): the token sum over (sequences x max_new_tokens), so a
     final-answer token weighs the same in one-turn GRPO and in EXGRPO.
  5. EI-SFT shows probes as teacher-forced dialogues ending in Q (ei_format=dialogue).
  6. Rollouts are sampled at `temperature` with no top-k and scored at it; EOS is trained, what
     follows masked; pi_ref is the starting checkpoint, frozen.

    python distill_rl.py config/cpu_tiny.py --stage=sft --data=ei
    python distill_rl.py config/cpu_tiny.py --stage=rl --init=out/default/ckpt/sft_ei.pt
    torchrun --nproc_per_node=2 distill_rl.py ...   (DDP: gloo on CPU, nccl on GPU)
"""

import copy
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from configurator import cli, mixed_precision, parse_config, pick_device, set_threads
from model import KVCache, pad_rows, token_logprobs
from tasks import (
    accuracy,
    greedy_answers,
    is_correct,
    prompt_ids,
    response_ids,
    sft_batch,
    sft_examples,
)
from training import (
    Run,
    all_reduce_named,
    check_config,
    get_lr,
    init_student,
    load_data,
    optimizer_step,
    progress,
    run_lock,
    setup_ddp,
    unwrap,
)


@dataclass
class Config:
    out_dir: str = "out/default"  # run folder: reads data/, writes ckpt/ and logs/
    stage: str = "sft"  # sft | rl
    name: str = ""  # checkpoint/log name; default sft_<data> or rl_<algo>
    init: str = "scratch"  # scratch (compact vocab) | a checkpoint .pt | gpt2 | an HF folder
    worlds: str = ""  # comma-separated worlds of the data to use; "" = every world in it
    seed: int = 1337  # every draw (init, batches, rollouts) derives from it
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch threads; 0 = torch's default
    dtype: str = "auto"  # forwards: auto (bf16 autocast on CUDA, else fp32) | float32 | bfloat16
    # torch.compile the training forward and the decode step (scoring stays eager)
    compile: bool = False
    # from-scratch student
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # residual width
    block_size: int = 512  # context length in tokens
    # stage 2: SFT
    data: str = "qa"  # qa = vanilla distillation | ei = EI-SFT (probes too)
    ei_mix: float = 0.5  # share of single original questions in each EI-SFT batch [ours]
    # EI-SFT examples: dialogue (1..k probes, then Q) | single (one probe) [ours]
    ei_format: str = "dialogue"
    data_fraction: float = 1.0  # share of the training questions used (data-efficiency runs)
    epochs: float = 0.0  # > 0 sets max_iters to this many passes over the training examples
    max_iters: int = 2000  # SFT optimizer steps
    batch_size: int = 32  # SFT sequences per optimizer step
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # SFT peak learning rate
    warmup_iters: int = 100  # linear warmup steps of SFT
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1  # AdamW decay of SFT's matrices and embeddings (RL: none)
    grad_clip: float = 1.0  # global gradient-norm clip
    eval_interval: int = 500  # validation every N steps and at the last
    eval_problems: int = 200  # val questions for accuracy during training
    # stage 3: RL
    algo: str = "exgrpo"  # reinforce | grpo | exgrpo
    rl_steps: int = 40  # RL steps, each one batch of rollouts
    rl_lr: float = 2e-5  # an SFT student broke at 1e-4 (measured); 1e-5..3e-5 is stable
    rl_warmup: int = 5  # linear warmup steps, then constant
    rl_batch_size: int = 8  # questions per RL step
    difficulty: bool = True  # Eq. 2 with the starting student chooses the RL questions
    tau_hard: int = 1  # Eq. 2: the fewest probes the student must get right
    rl_candidates: int = 512  # train questions (seeded draw) the difficulty filter examines
    k: int = 3  # EI probes per dialogue (paper: 5)
    group_size: int = 8  # G rollouts per scenario per question [ours]
    # who writes the probe answers in a rollout: student | teacher [ours]
    probe_answers: str = "student"
    grad_probe_answers: bool = True  # policy gradient through the student's probe answers [ours]
    partial_gradient: bool = False  # Scenario B rollouts get gradient too (own advantages) [ours]
    dsu_bonus: bool = True  # Dialogue Structure Utility bonus, Eqs. 5-6
    delta: float = 0.5  # bonus size [ours]
    nu: float = 1.0  # fire when P_full > nu * P_partial [ours]
    # Eq. 7's group: joint (Scenario A and B, 2G) | scenario (A alone, G) [ours]
    adv_group: str = "joint"
    scale_rewards: str = "group"  # group (divide by group std) | none [ours]
    clip_eps: float = 0.2  # eps of the clipped ratio, Eq. 7
    beta: float = 0.04  # KL(pi_theta || pi_ref) weight, k3 estimator; 0 allowed
    aux_coef: float = 0.1  # lambda of the auxiliary SFT loss, Eq. 8 [ours]
    # constant (token sum / (sequences x max_new_tokens)) | seq | token [ours]
    loss_agg: str = "constant"
    ppo_epochs: int = 1  # optimizer passes over each batch of rollouts
    temperature: float = 1.0  # sampling and scoring temperature (no top-k in RL)
    max_new_tokens: int = 48  # per answer turn
    micro_batch: int = 64  # rows per forward/backward in the RL update
    # bookkeeping
    ckpt_interval: int = 0  # also checkpoint every N steps (0: only at the end)
    # continue from ckpt/<name>.pt (none there: start from step 0, with a note)
    resume: bool = False
    overwrite: bool = False  # a fresh run may replace the checkpoint and log of an earlier one


# =============================================================================================
# Stage 2: SFT
# =============================================================================================


def sft_loss(model, x, y):
    """L_SFT summed over the trained targets of (x, y) (-1: not trained); the caller divides by
    the step's token count."""
    return -token_logprobs(model, x, y)[0].sum()


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
    examples = [[question] for question, _ in sft_examples(tok, val)]
    nll = sum(
        sft_loss(model, *sft_batch(examples[i : i + cfg.batch_size], device)).item()
        for i in range(0, len(examples), cfg.batch_size)
    )
    result = {
        "val_loss": nll / sum(len(r) for [(_, r)] in examples),
        "val_acc": accuracy(model, tok, val, cfg.max_new_tokens),
    }
    model.train()
    return result


def train_sft(cfg, model, tok, device, rank, world_size):
    raw_model = unwrap(model)
    train, val = load_data(cfg)
    encoded = sft_examples(tok, train)
    pool = [e for e in encoded if e[1]] if cfg.data == "ei" else []
    if cfg.data == "ei" and not pool:
        raise SystemExit(
            "data=ei but the training records hold no EI probes: rerun invert.py with rules"
        )
    if cfg.epochs > 0:  # passes over every training example of the chosen data
        n_examples = len(encoded) + sum(len(probes) for _, probes in pool)
        cfg.max_iters = math.ceil(cfg.epochs * n_examples / cfg.batch_size)
    n_q = round(cfg.ei_mix * cfg.batch_size) if pool else cfg.batch_size
    optimizer = raw_model.configure_optimizer(cfg.lr, cfg.weight_decay)
    run = Run(cfg, rank)
    step = run.start(raw_model, optimizer)
    if run.done(step, cfg.max_iters):
        return
    bar = progress(step, cfg.max_iters, f"sft {cfg.name}", rank)
    for step in bar:
        t0 = time.time()
        # per-step seed: the batch depends on (seed, step, rank) only, so a resumed run is identical
        g = random.Random(f"{cfg.seed}-{step}-{rank}")
        batch = [[encoded[g.randrange(len(encoded))][0]] for _ in range(n_q)]
        batch += [ei_example(g, pool, cfg) for _ in range(cfg.batch_size - n_q)]
        # sorted by length, micro-batches pad less (short questions apart from long dialogues);
        # the loss is normalised by the whole step's tokens, so the gradient is the same
        batch.sort(key=lambda ex: sum(len(p) + len(r) for p, r in ex))
        lr = get_lr(step, cfg, cfg.lr, cfg.max_iters, cfg.warmup_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        counts = {"tokens": sum(len(r) for ex in batch for _, r in ex)}
        n_tokens = all_reduce_named(counts, device)["tokens"]
        micro, loss_sum = cfg.batch_size // cfg.grad_accum, 0.0
        for m in range(cfg.grad_accum):
            # summed over tokens / tokens of the whole step (all micro-batches, all ranks):
            # accumulation and DDP's gradient averaging then give exactly the full-batch
            # token-mean gradient
            with mixed_precision(device, cfg.dtype):
                loss = sft_loss(model, *sft_batch(batch[m * micro : (m + 1) * micro], device))
            loss = loss * world_size / n_tokens
            loss.backward()
            loss_sum += loss.item() / world_size
        loss_sum = all_reduce_named({"loss": loss_sum}, device)["loss"]
        grad_norm = optimizer_step(raw_model, optimizer, cfg.grad_clip, loss_sum, run.where(step))
        lengths = [sum(len(p) + len(r) for p, r in ex) for ex in batch]
        record = {
            "step": step + 1,
            "loss": loss_sum,
            "lr": lr,
            "grad_norm": grad_norm,
            # every token through the model, all ranks
            "tokens_per_s": sum(lengths) * world_size / (time.time() - t0),
            # the last position whose output is trained
            "max_position": max(lengths) - 2,
        }
        if val and ((step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_iters):
            with mixed_precision(device, cfg.dtype):
                record.update(evaluate_sft(raw_model, tok, val, cfg, device))
        run.log(record)
        shown = {k: f"{record[k]:.3f}" for k in ("val_loss", "val_acc") if k in record}
        bar.set_postfix(loss=f"{loss_sum:.3f}", **shown)
        if cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0:
            run.save(raw_model, tok, optimizer, step + 1, {"stage": "sft"})
    run.save(raw_model, tok, optimizer, cfg.max_iters, {"stage": "sft"})


# =============================================================================================
# Stage 3: RL
# =============================================================================================

# --- Eq. 2: the difficulty filter ------------------------------------------------------------


def difficulty_filter(records, answer_fn, tau_hard=1):
    """Eq. 2: keep Q when tau_hard <= L < N'_Q, where N'_Q is the number of Q's EI probes and L the
    number the student answers right; drop Q when N'_Q = 0. answer_fn(probe questions) -> response
    texts. Returns (kept records, counts of kept and of each kind dropped)."""
    flat = [(i, probe) for i, r in enumerate(records) for probe in r["probes"]]
    said = answer_fn([probe["question"] for _, probe in flat]) if flat else []
    assert len(said) == len(flat), (
        f"answer_fn gave {len(said)} responses for {len(flat)} probe questions"
    )
    right = Counter()
    for (i, probe), text in zip(flat, said):
        right[i] += is_correct(records[i]["world"], text, probe["answer"], probe["question"])

    def verdict(i, record):
        if not record["probes"]:
            return "dropped_no_probes"
        if right[i] == len(record["probes"]):
            return "dropped_all_correct"
        if right[i] < tau_hard:
            return "dropped_too_few"
        return "kept"

    verdicts = [verdict(i, r) for i, r in enumerate(records)]
    counts = dict(kept=0, dropped_all_correct=0, dropped_too_few=0, dropped_no_probes=0)
    counts.update(Counter(verdicts))
    return [r for r, v in zip(records, verdicts) if v == "kept"], counts


def rl_questions(cfg, train, ref, tok, rank):
    """The RL question pool: data_fraction of train, then the difficulty filter (Eq. 2) run with
    the starting student (= pi_ref, so a resumed run picks the same questions)."""
    pool = [r for r in train if r["probes"] or cfg.algo != "exgrpo"]
    # Eq. 2 asks the student every probe of every question: examine a seeded draw, not all of train
    pool = random.Random(f"{cfg.seed}-candidates").sample(pool, min(len(pool), cfg.rl_candidates))
    counts = {"questions": len(pool)}
    if cfg.difficulty:
        answer_fn = lambda questions: greedy_answers(ref, tok, questions, cfg.max_new_tokens)
        pool, counts = difficulty_filter(pool, answer_fn, cfg.tau_hard)
        if rank == 0:
            tqdm.write(f"difficulty filter (tau_hard={cfg.tau_hard}): {counts}")
    if len(pool) < cfg.rl_batch_size:
        raise SystemExit(
            f"only {len(pool)} RL questions ({counts}) for --rl_batch_size={cfg.rl_batch_size}: "
            f"lower --tau_hard, set --difficulty=False or train the SFT student longer."
        )
    return pool, counts


# --- the dialogues of Scenarios A and B ------------------------------------------------------


def make_dialogues(records, cfg, rng):
    """Per question, the turns of Scenario A (k probes, then Q) and of Scenario B (the first k' of
    them, then Q). A turn is (question, the teacher's response to force, or None: the student's).
    Returns (Scenario A's dialogues, Scenario B's), one per record."""
    full, partial = [], []
    for r in records:
        probes = rng.sample(r["probes"], min(cfg.k, len(r["probes"])))
        forced = lambda probe: probe["rationale"] if cfg.probe_answers == "teacher" else None
        turns = [(probe["question"], forced(probe)) for probe in probes]
        k_partial = rng.randrange(len(turns)) if turns else 0
        full.append(turns + [(r["question"], None)])
        partial.append(turns[:k_partial] + [(r["question"], None)])
    return full, partial


# --- the rollouts ----------------------------------------------------------------------------

# who wrote each token of a rollout
CONTEXT, PROBE_ANSWER, FINAL_ANSWER = "context", "probe answer", "final answer"


@dataclass
class Rollouts:
    """Sampled dialogues, one row each."""

    tokens: list  # per row: every token of the dialogue
    writer: list  # per row and token: CONTEXT, PROBE_ANSWER or FINAL_ANSWER
    final: list  # per row: the text of the final answer to Q


def sample_rollouts(model, tok, dialogues, cfg, seed):
    """Sample every dialogue turn by turn with one KV cache. Turns are right-aligned, so dialogues
    with fewer probes join later and every row answers Q in the last round. A turn with a teacher
    response is forced (context); the student writes the others."""
    device = model.transformer.wte.weight.device
    n_turns = max(len(d) for d in dialogues)
    out = Rollouts([[] for _ in dialogues], [[] for _ in dialogues], [""] * len(dialogues))
    cache = KVCache(model.config, len(dialogues), 128, device, model.transformer.wte.weight.dtype)
    pending = [[] for _ in dialogues]  # forced tokens not yet in the cache
    for t in range(n_turns):
        prompts = []
        for i, d in enumerate(dialogues):
            j = t - (n_turns - len(d))
            if j < 0:  # this dialogue has fewer turns: it starts later
                prompts.append([])
                continue
            question, forced = d[j]
            p = prompt_ids(tok, question)
            if out.tokens[i] and out.tokens[i][-1] != tok.eot:
                p = [tok.eot] + p  # a turn cut at max_new_tokens still ends with EOS
            if forced is not None:
                p = p + response_ids(tok, forced)
                pending[i] += p
                prompts.append([])
            else:
                prompts.append(pending[i] + p)
                pending[i] = []
            out.tokens[i] += p
            out.writer[i] += [CONTEXT] * len(p)
        if not any(prompts):
            continue  # a round of forced turns only
        new_tokens, new_mask = model.generate(
            prompts,
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=seed + t,
            eot=tok.eot,
            kv_cache=cache,
        )
        last = t == n_turns - 1
        for i, (row, keep) in enumerate(zip(new_tokens.tolist(), new_mask.tolist())):
            new = [x for x, k in zip(row, keep) if k]
            out.tokens[i] += new
            out.writer[i] += [FINAL_ANSWER if last else PROBE_ANSWER] * len(new)
            if last:
                out.final[i] = tok.decode([x for x in new if x != tok.eot])
    return out


# --- the outcome reward and the DSU bonus (Eqs. 5-6) -----------------------------------------


def outcome_rewards(records, final_answers, G, device):
    """R = 1 when a rollout's final answer to Q is right, else 0: (Q, G) for G rollouts of each
    of the Q records, in order."""
    gold = [r for r in records for _ in range(G)]
    right = [
        float(is_correct(r["world"], text, r["answer"], r["question"]))
        for r, text in zip(gold, final_answers)
    ]
    return torch.tensor(right, device=device).view(-1, G)


def dsu_bonus(correct_full, correct_partial, delta, nu):
    """Eqs. 5-6. correct_full (Q, G) and correct_partial (Q, G') are 0/1 outcome rewards of the
    Scenario A and B rollouts. Returns (bonus (Q, G), fired (Q,)): delta for each correct
    Scenario A rollout of a question whose full dialogue beats the partial one."""
    p_full, p_partial = correct_full.mean(1), correct_partial.mean(1)
    fired = p_full > nu * p_partial
    return delta * correct_full * fired[:, None].float(), fired


# --- the advantages (Eq. 7's U) --------------------------------------------------------------


def group_advantages(rewards, scale_rewards="group", eps=1e-4):
    """rewards (Q, G) -> advantages (Q, G). Population std, so a single rollout or an all-equal
    group gets advantage 0 (no signal), never NaN."""
    centred = rewards - rewards.mean(1, keepdim=True)
    if scale_rewards == "group":
        return centred / (rewards.std(1, unbiased=False, keepdim=True) + eps)
    return centred


def reward_scale(cfg):
    """REINFORCE's baseline is the group mean alone; GRPO and EXGRPO also divide by the group's
    std unless scale_rewards=none."""
    return "none" if cfg.algo == "reinforce" else cfg.scale_rewards


@dataclass
class Advantages:
    """EXGRPO's rewards and advantages for Q questions of G rollouts per scenario."""

    rewards_full: torch.Tensor  # (Q, G) Scenario A's rewards, the DSU bonus included
    groups: torch.Tensor  # the reward groups U was normalised over: (Q, 2G) joint, else (Q, G)
    adv_full: torch.Tensor  # (Q, G) Scenario A's advantages
    adv_partial: torch.Tensor  # (Q, G) Scenario B's advantages
    fired: torch.Tensor  # (Q,) bool: where the DSU bonus fired


def scenario_advantages(correct_full, correct_partial, cfg, scale_rewards):
    """From the 0/1 outcomes (Q, G) of Scenarios A and B: the DSU bonus on A (Eqs. 5-6, when
    dsu_bonus), then U over each question's group (Eq. 7): A and B together (adv_group=joint, 2G
    rollouts) or each scenario alone (adv_group=scenario)."""
    rewards = correct_full
    fired = torch.zeros(correct_full.size(0), dtype=torch.bool, device=correct_full.device)
    if cfg.dsu_bonus:
        bonus, fired = dsu_bonus(correct_full, correct_partial, cfg.delta, cfg.nu)
        rewards = rewards + bonus
    if cfg.adv_group == "joint":
        groups = torch.cat([rewards, correct_partial], dim=1)
        adv_full, adv_partial = group_advantages(groups, scale_rewards).split(
            correct_full.size(1), dim=1
        )
        return Advantages(rewards, groups, adv_full, adv_partial, fired)
    adv_full = group_advantages(rewards, scale_rewards)
    adv_partial = group_advantages(correct_partial, scale_rewards)
    return Advantages(rewards, rewards, adv_full, adv_partial, fired)


def dsu_share(correct_full, correct_partial, adv_full, cfg, scale_rewards):
    """How far the DSU bonus moved Scenario A's advantages: sum |U - U without the bonus| / sum |U|.
    It is 0 for a fired question whose correct rollouts are all in Scenario A: paying them
    1 + delta is undone by the group's std. The bonus acts only where Scenario B has correct
    rollouts too."""
    no_bonus = replace(cfg, dsu_bonus=False)
    plain = scenario_advantages(correct_full, correct_partial, no_bonus, scale_rewards).adv_full
    return float((adv_full - plain).abs().sum() / adv_full.abs().sum().clamp(min=1e-9))


# --- one step's rollouts, rewarded: a RolloutBatch -------------------------------------------


@dataclass
class RolloutBatch:
    """What one RL step trains on, and what its log reads."""

    rows: list  # token lists that get the policy gradient (Scenario A; B too if partial_gradient)
    masks: list  # per row: 1 on its trained tokens
    adv: torch.Tensor  # (len(rows),) one advantage per row
    aux: list = field(default_factory=list)  # Eq. 8's teacher-forced dialogues
    aux_masks: list = field(default_factory=list)  # per aux row: 1 on the teacher's responses
    # for the log
    correct_full: torch.Tensor = None  # (Q, G) Scenario A's 0/1 outcomes
    correct_partial: torch.Tensor = None  # (Q, G) Scenario B's (empty for one-turn algorithms)
    rewards_full: torch.Tensor = None  # (Q, G) Scenario A's rewards, the bonus included
    groups: torch.Tensor = None  # the reward groups U was normalised over
    fired: torch.Tensor = None  # (Q,) where the bonus fired
    adv_bonus_share: float = None  # dsu_share (None without the bonus)
    lens: list = None  # per Scenario A row: the tokens the student wrote
    rollouts: Rollouts = None  # every sampled row, Scenario A's then B's (scripts/show_rl_step.py)


def aux_rows(tok, records, dialogues):
    """Eq. 8 targets: each question's Scenario A probes as a teacher-forced dialogue, with a mask
    that is 1 on the teacher's response tokens only."""
    rows, masks = [], []
    for r, d in zip(records, dialogues):
        teacher = {probe["question"]: probe["rationale"] for probe in r["probes"]}
        tokens, mask = [], []
        for question, _ in d[:-1]:
            p, response = prompt_ids(tok, question), response_ids(tok, teacher[question])
            tokens += p + response
            mask += [0] * len(p) + [1] * len(response)
        if tokens:
            rows.append(tokens)
            masks.append(mask)
    return rows, masks


def rollout_batch(model, tok, records, cfg, rng, device):
    """One step's rollouts: sample Scenarios A and B, reward them, and compute the advantages."""
    G, Q, exgrpo = cfg.group_size, len(records), cfg.algo == "exgrpo"
    if exgrpo:
        full, partial = make_dialogues(records, cfg, rng)
    else:  # one turn: the question alone
        full, partial = [[(r["question"], None)] for r in records], []
    scenario_a = [d for d in full for _ in range(G)]
    scenario_b = [d for d in partial for _ in range(G)]
    rollouts = sample_rollouts(model, tok, scenario_a + scenario_b, cfg, rng.randrange(2**31))
    n_a = len(scenario_a)
    correct_full = outcome_rewards(records, rollouts.final[:n_a], G, device)
    correct_partial = outcome_rewards(records if exgrpo else [], rollouts.final[n_a:], G, device)
    scale = reward_scale(cfg)
    if exgrpo:
        u = scenario_advantages(correct_full, correct_partial, cfg, scale)
        share = None
        if cfg.dsu_bonus:
            share = dsu_share(correct_full, correct_partial, u.adv_full, cfg, scale)
    else:  # one turn: the G samples of a question are its group
        no_bonus = torch.zeros(Q, dtype=torch.bool, device=device)
        adv = group_advantages(correct_full, scale)
        u = Advantages(correct_full, correct_full, adv, adv[:0], no_bonus)
        share = None
    # Scenario B only estimates P_partial and the baseline, unless it is trained too
    adv, n_rows = u.adv_full.reshape(-1), n_a
    if cfg.partial_gradient and exgrpo:
        adv, n_rows = torch.cat([adv, u.adv_partial.reshape(-1)]), len(rollouts.tokens)
    trained = {FINAL_ANSWER, PROBE_ANSWER} if cfg.grad_probe_answers else {FINAL_ANSWER}
    aux, aux_masks = aux_rows(tok, records, full) if exgrpo and cfg.aux_coef > 0 else ([], [])
    return RolloutBatch(
        rows=rollouts.tokens[:n_rows],
        masks=[[int(w in trained) for w in ws] for ws in rollouts.writer[:n_rows]],
        adv=adv,
        aux=aux,
        aux_masks=aux_masks,
        correct_full=correct_full,
        correct_partial=correct_partial,
        rewards_full=u.rewards_full,
        groups=u.groups,
        fired=u.fired,
        adv_bonus_share=share,
        lens=[sum(w != CONTEXT for w in ws) for ws in rollouts.writer[:n_a]],
        rollouts=rollouts,
    )


# --- the objective: Eq. 7's clipped term and KL, and lambda * Eq. 8 --------------------------


def masked_logprobs(model, rows, masks, device, temperature, entropy=False):
    """(logp, mask, entropy or None) over the shifted targets: logp[:, t] scores token t+1 where
    mask[:, t] = 1 (token t+1 is trained), else 0. Right padding is masked by position, not by
    id."""
    idx, mask = pad_rows(rows, device), pad_rows(masks, device)[:, 1:]
    targets = idx[:, 1:].masked_fill(mask == 0, -1)
    logp, ent = token_logprobs(model, idx[:, :-1], targets, temperature, entropy)
    return logp, mask.float(), ent


@dataclass
class PolicyTerms:
    """Eq. 7's two terms on one micro-batch, each summed over the trained tokens and divided as
    loss_agg says by the whole step's counts, and what the log reads."""

    clipped_term: torch.Tensor  # min(rho U, clip(rho, 1 - eps, 1 + eps) U), to maximise
    kl: torch.Tensor  # the k3 estimate of KL(pi_theta || pi_ref), aggregated the same way
    kl_sum: float  # for the log: the KL summed over the trained tokens
    n_clipped: float  # for the log: trained tokens whose ratio left [1 - eps, 1 + eps]


def aggregate(per_token, mask, cfg, n_seqs, n_tokens):
    """A per-token quantity (B, T) summed over the trained tokens, then divided as loss_agg says."""
    if cfg.loss_agg == "seq":  # the mean of each sequence, then the mean over sequences
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if cfg.loss_agg == "token":  # one mean over every trained token of the step
        return (per_token * mask).sum() / n_tokens
    # constant: every trained token weighs 1 / (sequences x max_new_tokens), whatever else shares
    # its row, so probe answers cannot dilute a final answer's weight
    return (per_token * mask).sum() / (n_seqs * cfg.max_new_tokens)


def policy_terms(logp, old_logp, ref_logp, mask, adv, cfg, n_seqs, n_tokens):
    """Eq. 7's clipped term and KL on one micro-batch: logp, old_logp, ref_logp and mask (B, T),
    adv (B,); n_seqs and n_tokens count the whole step (all micro-batches, all ranks)."""
    ratio = torch.exp(logp - old_logp)  # rho = pi_theta / pi_old per token
    if cfg.algo == "reinforce":
        surrogate = ratio * adv[:, None]  # gradient A * grad log pi: plain REINFORCE
        clipped = torch.zeros_like(ratio)
    else:
        clipped_ratio = ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)
        surrogate = torch.min(ratio * adv[:, None], clipped_ratio * adv[:, None])
        clipped = ((ratio - 1).abs() > cfg.clip_eps).float()
    r = ref_logp - logp
    kl = torch.exp(r) - r - 1  # k3: unbiased for KL(pi_theta || pi_ref), always >= 0
    return PolicyTerms(
        clipped_term=aggregate(surrogate, mask, cfg, n_seqs, n_tokens),
        kl=aggregate(kl, mask, cfg, n_seqs, n_tokens),
        kl_sum=(kl * mask).sum().item(),
        n_clipped=(clipped * mask).sum().item(),
    )


def aux_loss(model, rows, masks, device, n_aux):
    """Eq. 8 on one micro-batch: the NLL of the teacher's response tokens over the step's count."""
    logp, mask, _ = masked_logprobs(model, rows, masks, device, 1.0)
    return -(logp * mask).sum() / n_aux


def exgrpo_objective(terms, aux, cfg):
    """The loss the RL step minimises: -J (Eq. 7, the clipped term less beta * KL) plus
    lambda * L_aux (Eq. 8). grpo and reinforce are the same expression with aux = 0."""
    return -(terms.clipped_term - cfg.beta * terms.kl) + cfg.aux_coef * aux


# --- the loop --------------------------------------------------------------------------------


@dataclass
class UpdateStats:
    """One RL update, for the log: sums over this rank's trained tokens, and the step's loss."""

    n_tokens: float  # trained tokens of the step, all ranks
    time_score: float  # seconds spent scoring pi_old and pi_ref
    kl: float = 0.0  # k3 KL, summed
    clipped: float = 0.0  # tokens whose ratio left [1 - eps, 1 + eps]
    entropy: float = 0.0  # the policy's entropy, summed
    aux: float = 0.0  # Eq. 8's loss
    loss: float = 0.0  # the step's loss, all ranks
    grad_norm: float = 0.0  # before clipping


def policy_update(model, ref, optimizer, batch, cfg, world_size, where):
    """ppo_epochs optimizer steps on one RolloutBatch (Eq. 7 + aux_coef * Eq. 8). pi_ref is scored
    before any update (not at all when beta = 0: no KL term, none logged); so is pi_old when
    ppo_epochs > 1, else pi_old is pi_theta and its log-probs are the update's own, detached
    (ratio exactly 1, as TRL does). At the first pass the KL is exactly 0. Every loss term is
    normalised by the whole step's counts (all micro-batches, all ranks), so accumulation is
    exact."""
    raw_model = unwrap(model)
    rows, masks, adv = batch.rows, batch.masks, batch.adv
    device = adv.device
    counts = {
        "seqs": len(rows),
        "tokens": sum(map(sum, masks)),
        "aux_tokens": sum(map(sum, batch.aux_masks)),
    }
    counts = all_reduce_named(counts, device)
    chunks = [slice(i, i + cfg.micro_batch) for i in range(0, len(rows), cfg.micro_batch)]
    t0 = time.time()
    with torch.no_grad(), mixed_precision(device, cfg.dtype):

        def score(m, wanted):
            if not wanted:
                return [None] * len(chunks)
            return [
                masked_logprobs(m, rows[c], masks[c], device, cfg.temperature)[0] for c in chunks
            ]

        old, refs = score(raw_model, cfg.ppo_epochs > 1), score(ref, cfg.beta != 0)
    stats = UpdateStats(n_tokens=counts["tokens"], time_score=time.time() - t0)
    raw_model.train()
    # Eq. 8's rows (one per question) never outnumber the rollout rows (G per question): each
    # micro-batch of rollouts takes at most one of them, so every micro-batch's loss is the whole
    # objective on its share of the rows
    aux_chunks = [slice(i, i + cfg.micro_batch) for i in range(0, len(batch.aux), cfg.micro_batch)]
    aux_chunks += [None] * (len(chunks) - len(aux_chunks))
    n_aux = counts["aux_tokens"]
    for epoch in range(cfg.ppo_epochs):
        epoch_loss = 0.0
        for c, a, old_logp, ref_logp in zip(chunks, aux_chunks, old, refs):
            with mixed_precision(device, cfg.dtype):
                logp, mask, entropy = masked_logprobs(
                    model, rows[c], masks[c], device, cfg.temperature, epoch == 0
                )
                aux = 0.0
                if a is not None:
                    aux = aux_loss(model, batch.aux[a], batch.aux_masks[a], device, n_aux)
            old_logp = logp.detach() if old_logp is None else old_logp
            ref_logp = logp.detach() if ref_logp is None else ref_logp
            terms = policy_terms(
                logp, old_logp, ref_logp, mask, adv[c], cfg, counts["seqs"], counts["tokens"]
            )
            loss = exgrpo_objective(terms, aux, cfg)
            (loss * world_size).backward()  # DDP averages over ranks; the counts are already global
            epoch_loss += loss.item()
            if epoch == 0:  # KL, clip fraction, entropy and Eq. 8 beside the loss, for the log
                stats.kl += terms.kl_sum
                stats.clipped += terms.n_clipped
                stats.entropy += entropy.sum().item()
                stats.aux += float(aux.item() if torch.is_tensor(aux) else aux)
        stats.loss = all_reduce_named({"loss": epoch_loss}, device)["loss"]
        stats.grad_norm = optimizer_step(raw_model, optimizer, cfg.grad_clip, stats.loss, where)
    raw_model.eval()
    return stats


def train_rl(cfg, model, tok, device, rank, world_size):
    raw_model = unwrap(model)
    ref = copy.deepcopy(raw_model).eval().requires_grad_(False)  # pi_ref: the start, frozen
    train, val = load_data(cfg)
    optimizer = raw_model.configure_optimizer(cfg.rl_lr, 0.0)
    run = Run(cfg, rank)
    start = run.start(raw_model, optimizer)  # a resumed run: its weights now, pi_ref the start's
    if run.done(start, cfg.rl_steps):
        return
    with mixed_precision(device, cfg.dtype):  # the difficulty filter's greedy answers
        pool, counts = rl_questions(cfg, train, ref, tok, rank)
    raw_model.eval()  # dropout off for sampling and scoring
    bar = progress(start, cfg.rl_steps, f"rl {cfg.name}", rank)
    for step in bar:
        t0 = time.time()
        # per-step seeds, so a resumed run is exact; one draw of questions for all ranks, then
        # a shard each
        records = random.Random(f"{cfg.seed}-{step}").sample(pool, cfg.rl_batch_size)
        records = records[rank::world_size]
        rng = random.Random(f"{cfg.seed}-{step}-{rank}")
        with mixed_precision(device, cfg.dtype):
            batch = rollout_batch(raw_model, tok, records, cfg, rng, device)
        t_sample = time.time() - t0
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, cfg, cfg.rl_lr, cfg.rl_steps, cfg.rl_warmup)
        stats = policy_update(model, ref, optimizer, batch, cfg, world_size, run.where(step))
        record = rl_metrics(batch, stats, cfg, device)
        t_step = time.time() - t0
        record.update(
            step=step + 1,
            lr=optimizer.param_groups[0]["lr"],
            time_sample=t_sample,
            time_update=t_step - t_sample - stats.time_score,
            time_score=stats.time_score,
            time_step=t_step,
        )
        record["tokens_per_s"] = record.pop("gen_tokens") / record["time_step"]
        if val and ((step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.rl_steps):
            with mixed_precision(device, cfg.dtype):
                record["val_acc"] = accuracy(raw_model, tok, val, cfg.max_new_tokens)
        run.log(record)
        kl = f"{record['kl']:.4f}" if cfg.beta else "-"  # beta = 0: pi_ref is never scored
        bar.set_postfix(reward=f"{record['reward']:.2f}", acc=f"{record['acc_full']:.2f}", kl=kl)
        if cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0:
            run.save(raw_model, tok, optimizer, step + 1, {"stage": "rl", "filter": counts})
    run.save(raw_model, tok, optimizer, cfg.rl_steps, {"stage": "rl", "filter": counts})


# =============================================================================================
# Plumbing: the log line, main (the schedule, data, the student, logs: training.py)
# =============================================================================================


def rl_metrics(batch, stats, cfg, device):
    """An RL step's log line: rewards per component, both scenarios' accuracy, the DSU fire rate,
    KL, clip fraction, entropy, zero-std groups, lengths and tokens trained, summed over DDP ranks
    (TRL-style names where they exist)."""
    full, partial = batch.correct_full, batch.correct_partial
    s = all_reduce_named(
        {
            "correct_full": full.sum(),
            "rollouts_full": full.numel(),
            "correct_partial": partial.sum(),
            "rollouts_partial": partial.numel(),
            "reward": batch.rewards_full.sum(),
            "fired": batch.fired.sum(),
            "questions": full.size(0),
            "zero_std": (batch.groups.std(1, unbiased=False) == 0).sum(),
            "kl": stats.kl,
            "clipped": stats.clipped,
            "entropy": stats.entropy,
            "gen_tokens": sum(batch.lens),
            "aux": stats.aux,
        },
        device,
    )
    n_full, n_partial, n_tok = s["rollouts_full"], s["rollouts_partial"], stats.n_tokens
    acc_full = s["correct_full"] / n_full
    acc_partial = s["correct_partial"] / n_partial if n_partial else None
    return {
        "reward": s["reward"] / n_full,
        "reward_outcome": acc_full,
        "reward_dsu_bonus": (s["reward"] - s["correct_full"]) / n_full,
        "acc_full": acc_full,
        "acc_partial": acc_partial,
        "p_full_minus_partial": acc_full - acc_partial if n_partial else None,
        "dsu_fire_rate": (
            s["fired"] / s["questions"] if cfg.algo == "exgrpo" and cfg.dsu_bonus else None
        ),
        "kl": s["kl"] / n_tok if cfg.beta else None,
        "clip_frac": s["clipped"] / n_tok,
        "entropy": s["entropy"] / n_tok,
        "aux_loss": s["aux"] if batch.aux else None,
        "loss": stats.loss,
        "grad_norm": stats.grad_norm,
        "frac_zero_std": s["zero_std"] / s["questions"],
        "resp_len_mean": sum(batch.lens) / len(batch.lens),
        "resp_len_max": max(batch.lens),
        "gen_tokens": s["gen_tokens"],
        "tokens_trained": n_tok,
        "max_position": max(map(len, batch.rows)) - 2,
        # |U with the bonus - U without| / |U| (rank 0's)
        "adv_bonus_share": batch.adv_bonus_share,
    }


def compile_pays(device):
    """torch.compile pays on a GPU. On CPU an RL step of the default preset was measured slower
    compiled: 4.40 s against 4.20 s eager in steady state, after about 55 s of compiling
    (docs/speed.md)."""
    return not str(device).startswith("cpu")


def main(argv):
    """Train as the config says; returns the trained model (unwrapped from DDP)."""
    cfg = parse_config(Config(), argv)
    rank, world_size, device = setup_ddp(pick_device(cfg.device))
    # ranges, cross-field checks, the run's name, no fresh run over an old one
    check_config(cfg, world_size)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    raw_model, tok = init_student(cfg, device)
    if rank == 0:
        print(
            f"{cfg.stage} {cfg.name}: {raw_model.num_params() / 1e6:.2f}M parameters, "
            f"vocab {tok.n_vocab}, init {cfg.init}, device {device}, "
            f"{torch.get_num_threads()} threads"
        )
    model = DistributedDataParallel(raw_model) if world_size > 1 else raw_model
    if cfg.compile and not compile_pays(device):
        print(
            "note: --compile=True is ignored on CPU, where it was measured slower (docs/speed.md)"
        )
    elif cfg.compile:
        # what the gradient flows through (unwrap() undoes it); the rollouts' decode step gets
        # CUDA graphs (docs/speed.md)
        model = torch.compile(model)
        raw_model.compile_decode()
    with run_lock(cfg, rank):
        (train_sft if cfg.stage == "sft" else train_rl)(cfg, model, tok, device, rank, world_size)
    if world_size > 1:
        dist.destroy_process_group()
    return raw_model


if __name__ == "__main__":
    cli(main)
