"""
Stages 2-3 of reinforcement distillation via Explanatory Inversion (Tan et al., ICLR 2026).

stage=sft  L_SFT = - sum_i log p(T_i | Q_i): teacher-forced NLL of the teacher's responses, prompts
           masked. data=qa is vanilla distillation (Q -> R_T, A); data=ei is EI-SFT: the EI probes
           too, with a share ei_mix of every batch still original questions.
stage=rl   one loop, three algorithms, on the questions the difficulty filter keeps (Eq. 2: keep Q
           when tau_hard <= L < N'_Q; N'_Q its EI probes, L those the starting student gets right):
  reinforce  one turn; A_g = R_g - mean(R), the group-mean baseline; gradient A * grad log pi.
  grpo       one turn, G samples per question; U_g = (R_g - mean(R)) / (std(R) + 1e-4) with the
             population std (a group of one or of equal rewards gets U = 0, not NaN); per token
             J = min(rho U, clip(rho, 1 - eps, 1 + eps) U) - beta * k3,  rho = pi_theta / pi_old,
             k3 = exp(r) - r - 1, r = log pi_ref - log pi_theta (an estimate of KL(pi_theta || pi_ref)).
  exgrpo     per question, k EI probes drawn without replacement. Scenario A: G rollouts of all k
             probes, then Q; Scenario B: G rollouts of the first k' < k, then Q (k' uniform in
             0..k-1). R = 1 if the final answer to Q is right. DSU bonus (Eqs. 5-6): when P_full >
             nu * P_partial (the accuracies of A and B), each correct Scenario A rollout gets R + delta.
             U is normalised over all 2G rollouts of the question, A and B together (adv_group=joint),
             and J (Eq. 7) trains Scenario A only. Why joint: if the group were A's G rollouts alone,
             a bonus paid to every correct one multiplies their 0/1 rewards by (1 + delta), and
             dividing by the group's std removes it (advantages moved < 3e-4, measured). Joint, the
             baseline is the question's overall success rate and a fired bonus lifts correct full
             dialogues above correct partial ones. Plus aux_coef * L_aux (Eq. 8): the NLL of the
             teacher's probe responses, teacher-forced in the dialogue.
Where the paper is silent we chose (the flags marked [ours]): one k' per question; the student writes
the probe answers, trained like the final answer; Scenario B gets no gradient; loss_agg=constant
(Dr. GRPO: the token sum over sequences x max_new_tokens), so a final-answer token weighs the same
in one-turn GRPO and in EXGRPO (a per-sequence mean would let the probe answers dilute it); EI-SFT
shows probes as teacher-forced dialogues ending in Q. Rollouts are sampled at `temperature`, no
top-k, and scored at it; EOS is trained, what follows masked; pi_ref is the starting checkpoint,
frozen. The loss starts near 0 by construction: watch the reward.

    python distill_rl.py config/cpu_tiny.py --stage=sft --data=ei
    python distill_rl.py config/cpu_tiny.py --stage=rl --algo=exgrpo --init=out/default/ckpt/sft_ei.pt
    torchrun --nproc_per_node=2 distill_rl.py ...   (DDP: gloo on CPU, nccl on GPU)
"""

import copy
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, replace

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
    all_reduce_sum,
    check_config,
    evaluate_sft,
    get_lr,
    init_student,
    load_data,
    optimizer_step,
    rl_metrics,
    run_lock,
    setup_ddp,
    summed_nll,
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
    compile: bool = (
        False  # torch.compile the training forward and the decode step (scoring stays eager)
    )
    # from-scratch student
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # residual width
    block_size: int = 512  # context length in tokens
    # SFT (stage 2)
    data: str = "qa"  # qa = vanilla distillation | ei = EI-SFT (probes too)
    ei_mix: float = 0.5  # share of single original questions in each EI-SFT batch [ours]
    ei_format: str = (
        "dialogue"  # EI-SFT examples: dialogue (1..k probes, then Q) | single (one probe) [ours]
    )
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
    # RL (stage 3)
    algo: str = "exgrpo"  # reinforce | grpo | exgrpo
    rl_steps: int = 40  # RL steps, each one batch of rollouts
    rl_lr: float = 2e-5  # an SFT student broke at 1e-4 (measured); 1e-5..3e-5 is stable
    rl_warmup: int = 5  # linear warmup steps, then constant
    rl_batch_size: int = 8  # questions per RL step
    group_size: int = 8  # G rollouts per scenario per question [ours]
    k: int = 3  # EI probes per dialogue (paper: 5)
    probe_answers: str = (
        "student"  # who writes the probe answers in a rollout: student | teacher [ours]
    )
    grad_probe_answers: bool = (
        True  # policy gradient through the student's probe answers too [ours]
    )
    partial_gradient: bool = False  # Scenario B rollouts get gradient too (own advantages) [ours]
    dsu_bonus: bool = True  # Dialogue Structure Utility bonus, Eqs. 5-6
    adv_group: str = (
        "joint"  # Eq. 7's group: joint (Scenario A and B, 2G) | scenario (A alone, G) [ours]
    )
    delta: float = 0.5  # bonus size [ours]
    nu: float = 1.0  # fire when P_full > nu * P_partial [ours]
    aux_coef: float = 0.1  # lambda of the auxiliary SFT loss, Eq. 8 [ours]
    beta: float = 0.04  # KL(pi_theta || pi_ref) weight, k3 estimator; 0 allowed
    clip_eps: float = 0.2  # eps of the clipped ratio, Eq. 7
    ppo_epochs: int = 1  # optimizer passes over each batch of rollouts
    temperature: float = 1.0  # sampling and scoring temperature (no top-k in RL)
    max_new_tokens: int = 48  # per answer turn
    loss_agg: str = (
        "constant"  # constant (token sum / (sequences x max_new_tokens)) | seq | token [ours]
    )
    scale_rewards: str = "group"  # group (divide by group std) | none [ours]
    difficulty: bool = True  # Eq. 2 with the starting student chooses the RL questions
    tau_hard: int = 1  # Eq. 2: the fewest probes the student must get right
    rl_candidates: int = 512  # train questions (seeded draw) the difficulty filter examines
    micro_batch: int = 64  # rows per forward/backward in the RL update
    # bookkeeping
    ckpt_interval: int = 0  # also checkpoint every N steps (0: only at the end)
    resume: bool = (
        False  # continue from ckpt/<name>.pt (none there: start from step 0, with a note)
    )
    overwrite: bool = False  # a fresh run may replace the checkpoint and log of an earlier one


# --- Eq. 2: the difficulty filter ------------------------------------------------------------


def difficulty_filter(records, answer_fn, tau_hard=1):
    """Eq. 2: keep Q when tau_hard <= L < N'_Q, where N'_Q is the number of Q's EI probes and L the
    number the student answers right; drop Q when N'_Q = 0. answer_fn(probe questions) -> response
    texts. Returns (kept records, counts of kept and of each kind dropped)."""
    flat = [(i, pr) for i, r in enumerate(records) for pr in r["probes"]]
    said = answer_fn([pr["question"] for _, pr in flat]) if flat else []
    assert len(said) == len(flat), (
        f"answer_fn gave {len(said)} responses for {len(flat)} probe questions"
    )
    right = Counter()
    for (i, pr), t in zip(flat, said):
        right[i] += is_correct(records[i]["world"], t, pr["answer"], pr["question"])
    counts = dict(kept=0, dropped_all_correct=0, dropped_too_few=0, dropped_no_probes=0)
    keys = [
        (
            "dropped_no_probes"
            if not r["probes"]
            else "dropped_all_correct"
            if right[i] == len(r["probes"])
            else "dropped_too_few"
            if right[i] < tau_hard
            else "kept"
        )
        for i, r in enumerate(records)
    ]
    counts.update(Counter(keys))
    return [r for r, key in zip(records, keys) if key == "kept"], counts


# --- dialogues (Scenarios A and B), then rollouts --------------------------------------------

CONTEXT, PROBE_ANSWER, FINAL_ANSWER = (
    "context",
    "probe answer",
    "final answer",
)  # who wrote each token


def make_dialogues(records, cfg, rng):
    """Per question, the turns of Scenario A (k probes, then Q) and of Scenario B (the first k' of
    them, then Q). A turn is (question, the teacher's response to force, or None: the student's)."""
    full, partial = [], []
    for r in records:
        probes = rng.sample(r["probes"], min(cfg.k, len(r["probes"])))
        turns = [
            (p["question"], p["rationale"] if cfg.probe_answers == "teacher" else None)
            for p in probes
        ]
        kp = rng.randrange(len(turns)) if turns else 0
        full.append(turns + [(r["question"], None)])
        partial.append(turns[:kp] + [(r["question"], None)])
    return full, partial


def sample_rollouts(model, tok, dialogues, cfg, seed):
    """Sample every dialogue turn by turn with one KV cache. Turns are right-aligned, so dialogues
    with fewer probes join later and every row answers Q in the last round. A turn with a teacher
    response is forced (context); the student writes the others. Returns, per dialogue, its tokens,
    who wrote each (CONTEXT, PROBE_ANSWER, FINAL_ANSWER) and the final answer's text."""
    device = model.transformer.wte.weight.device
    n_turns = max(len(d) for d in dialogues)
    tokens, writer, final = [[] for _ in dialogues], [[] for _ in dialogues], [""] * len(dialogues)
    cache = KVCache(model.config, len(dialogues), 128, device, model.transformer.wte.weight.dtype)
    pending = [[] for _ in dialogues]  # forced tokens not yet in the cache
    for t in range(n_turns):
        prompts = []
        for i, d in enumerate(dialogues):
            j = t - (n_turns - len(d))
            if j < 0:  # this dialogue has fewer turns: it starts later
                prompts.append([])
                continue
            q, forced = d[j]
            p = prompt_ids(tok, q)
            if tokens[i] and tokens[i][-1] != tok.eot:
                p = [tok.eot] + p  # a turn cut at max_new_tokens still ends with EOS
            if forced is not None:
                p = p + response_ids(tok, forced)
                pending[i] += p
                prompts.append([])
            else:
                prompts.append(pending[i] + p)
                pending[i] = []
            tokens[i] += p
            writer[i] += [CONTEXT] * len(p)
        if not any(prompts):
            continue  # a round of forced turns only
        out, mask = model.generate(
            prompts,
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=seed + t,
            eot=tok.eot,
            kv_cache=cache,
        )
        for i, (row, m) in enumerate(zip(out.tolist(), mask.tolist())):
            new = [x for x, keep in zip(row, m) if keep]
            tokens[i] += new
            writer[i] += [FINAL_ANSWER if t == n_turns - 1 else PROBE_ANSWER] * len(new)
            if t == n_turns - 1:
                final[i] = tok.decode([x for x in new if x != tok.eot])
    return tokens, writer, final


# --- rewards and the DSU bonus (Eqs. 5-6), then advantages -----------------------------------


def dsu_bonus(correct_full, correct_partial, delta, nu):
    """Eqs. 5-6. correct_full (Q, G) and correct_partial (Q, G') are 0/1 outcome rewards of the
    Scenario A and B rollouts. Returns (bonus (Q, G), fired (Q,)): delta for each correct
    Scenario A rollout of a question whose full dialogue beats the partial one."""
    p_full, p_partial = correct_full.mean(1), correct_partial.mean(1)
    fired = p_full > nu * p_partial
    return delta * correct_full * fired[:, None].float(), fired


def group_advantages(rewards, scale_rewards="group", eps=1e-4):
    """rewards (Q, G) -> advantages (Q, G). Population std, so a single rollout or an all-equal
    group gets advantage 0 (no signal), never NaN."""
    centred = rewards - rewards.mean(1, keepdim=True)
    if scale_rewards == "group":
        return centred / (rewards.std(1, unbiased=False, keepdim=True) + eps)
    return centred


def scenario_advantages(correct_full, correct_partial, cfg, scale):
    """EXGRPO's rewards and advantages from the 0/1 outcomes (Q, G) of Scenarios A and B: the DSU
    bonus on A (Eqs. 5-6 when dsu_bonus), then U over each question's group (Eq. 7): A and B
    together (adv_group=joint, 2G rollouts) or each scenario alone (scenario). Returns (A's rewards,
    the groups as normalised, A's advantages, B's advantages, where the bonus fired)."""
    rewards, fired = (
        correct_full,
        torch.zeros(correct_full.size(0), dtype=torch.bool, device=correct_full.device),
    )
    if cfg.dsu_bonus:
        bonus, fired = dsu_bonus(correct_full, correct_partial, cfg.delta, cfg.nu)
        rewards = rewards + bonus
    if cfg.adv_group == "joint":
        groups = torch.cat([rewards, correct_partial], dim=1)
        adv_a, adv_b = group_advantages(groups, scale).split(correct_full.size(1), dim=1)
        return rewards, groups, adv_a, adv_b, fired
    return (
        rewards,
        rewards,
        group_advantages(rewards, scale),
        group_advantages(correct_partial, scale),
        fired,
    )


def dsu_share(correct_full, correct_partial, adv_a, cfg, scale):
    """How far the DSU bonus moved Scenario A's advantages adv_a: sum |U - U without the bonus| / sum |U|.
    It is 0 for a fired question whose correct rollouts are all in Scenario A: paying them 1 + delta
    is undone by the group's std. The bonus acts only where Scenario B has correct rollouts too."""
    plain = scenario_advantages(
        correct_full, correct_partial, replace(cfg, dsu_bonus=False), scale
    )[2]
    return float((adv_a - plain).abs().sum() / adv_a.abs().sum().clamp(min=1e-9))


# --- Eq. 7: the clipped objective with the k3 KL ---------------------------------------------


def masked_logprobs(model, rows, masks, device, temperature, entropy=False):
    """(logp, mask, entropy or None) over the shifted targets: logp[:, t] scores token t+1 where
    mask[:, t] = 1 (token t+1 is trained), else 0. Right padding is masked by position, not by id."""
    idx, mask = pad_rows(rows, device), pad_rows(masks, device)[:, 1:]
    logp, ent = token_logprobs(
        model, idx[:, :-1], idx[:, 1:].masked_fill(mask == 0, -1), temperature, entropy
    )
    return logp, mask.float(), ent


def rl_loss(logp, old_logp, ref_logp, mask, adv, cfg, n_seqs, n_tokens):
    """Eq. 7 on one micro-batch, normalised by the whole step's sequence/token counts.
    Returns the loss and (kl sum, clipped-token count) for logging."""
    ratio = torch.exp(logp - old_logp)
    if cfg.algo == "reinforce":
        surrogate = ratio * adv[:, None]  # gradient A * grad log pi: plain REINFORCE
        clipped = torch.zeros_like(ratio)
    else:
        surrogate = torch.min(
            ratio * adv[:, None], ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv[:, None]
        )
        clipped = ((ratio - 1).abs() > cfg.clip_eps).float()
    r = ref_logp - logp
    kl = torch.exp(r) - r - 1  # k3: unbiased for KL(pi_theta || pi_ref), always >= 0
    per_token = -(surrogate - cfg.beta * kl) * mask
    if cfg.loss_agg == "seq":
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    elif cfg.loss_agg == "token":
        loss = per_token.sum() / n_tokens
    else:  # constant: every trained token weighs 1 / (sequences x max_new_tokens), whatever else it shares a row with
        loss = per_token.sum() / (n_seqs * cfg.max_new_tokens)
    return loss, ((kl * mask).sum().item(), (clipped * mask).sum().item())


# --- Eq. 8: the auxiliary SFT loss on the teacher's probe answers ----------------------------


def aux_rows(tok, records, dialogues):
    """Eq. 8 targets: each question's Scenario A probes as a teacher-forced dialogue, with a mask
    that is 1 on the teacher's response tokens only."""
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


def aux_loss(model, rows, masks, device, n_aux):
    """Eq. 8 on one micro-batch: the NLL of the teacher's response tokens over the step's count."""
    logp, mask, _ = masked_logprobs(model, rows, masks, device, 1.0)
    return -(logp * mask).sum() / n_aux


# --- one rollout step: sample, reward, advantage -> a named batch ----------------------------


def rollout_batch(model, tok, records, cfg, rng, device):
    """One step's rollouts as a dict: rows (token lists that get the policy gradient), masks (1 on
    each row's trained tokens), adv (one per row), aux and aux_masks (Eq. 8), and for the log the
    Scenario A rewards, the reward groups advantages were normalised over, the 0/1 outcomes of both
    scenarios, where the bonus fired, answer lengths."""
    G, Q, exgrpo = cfg.group_size, len(records), cfg.algo == "exgrpo"
    if exgrpo:
        full, partial = make_dialogues(records, cfg, rng)
    else:
        full, partial = [[(r["question"], None)] for r in records], []
    scenario_a, scenario_b = (
        [d for d in full for _ in range(G)],
        [d for d in partial for _ in range(G)],
    )
    tokens, writer, final = sample_rollouts(
        model, tok, scenario_a + scenario_b, cfg, seed=rng.randrange(2**31)
    )
    question = [r for r in records for _ in range(G)]  # the record of each rollout of a scenario
    outcome = lambda texts: torch.tensor(
        [
            float(is_correct(r["world"], text, r["answer"], r["question"]))
            for r, text in zip(question, texts)
        ],
        device=device,
    ).view(-1, G)
    n_a = len(scenario_a)
    correct_full, correct_partial = outcome(final[:n_a]), outcome(final[n_a:])
    scale = "none" if cfg.algo == "reinforce" else cfg.scale_rewards
    if exgrpo:
        rewards, groups, adv_a, adv_b, fired = scenario_advantages(
            correct_full, correct_partial, cfg, scale
        )
        bonus_share = (
            dsu_share(correct_full, correct_partial, adv_a, cfg, scale) if cfg.dsu_bonus else None
        )
    else:  # one turn: the G samples of a question are its group
        rewards = groups = correct_full
        adv_a, fired = (
            group_advantages(rewards, scale),
            torch.zeros(Q, dtype=torch.bool, device=device),
        )
        bonus_share = None
    adv, n_rows = adv_a.reshape(-1), n_a  # Scenario B only estimates P_partial and the baseline...
    if cfg.partial_gradient and exgrpo:  # ...unless it is trained too
        adv, n_rows = torch.cat([adv, adv_b.reshape(-1)]), len(tokens)
    trained = {FINAL_ANSWER, PROBE_ANSWER} if cfg.grad_probe_answers else {FINAL_ANSWER}
    aux, aux_masks = aux_rows(tok, records, full) if exgrpo and cfg.aux_coef > 0 else ([], [])
    return dict(
        rows=tokens[:n_rows],
        masks=[[int(w in trained) for w in ws] for ws in writer[:n_rows]],
        adv=adv,
        aux=aux,
        aux_masks=aux_masks,
        rewards=rewards,
        groups=groups,
        correct_full=correct_full,
        correct_partial=correct_partial,
        fired=fired,
        adv_bonus_share=bonus_share,
        lens=[sum(w != CONTEXT for w in ws) for ws in writer[:n_a]],
    )  # tokens the student wrote


# --- stage 2: SFT ----------------------------------------------------------------------------


def ei_example(g, pool, cfg):
    """One EI-SFT example. ei_format=single: one probe -> teacher response (the paper's D_EI pair).
    ei_format=dialogue [ours]: 1..k of a question's probes with the teacher's answers, then the
    question, every response trained: a from-scratch student otherwise never sees the turn format
    and the positions of EXGRPO's dialogues (its Scenario A accuracy starts near 0, measured)."""
    question, probes = pool[g.randrange(len(pool))]
    if cfg.ei_format == "single":
        return [probes[g.randrange(len(probes))]]
    return g.sample(probes, g.randint(1, min(cfg.k, len(probes)))) + [question]


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
        cfg.max_iters = math.ceil(
            cfg.epochs * (len(encoded) + sum(len(probes) for _, probes in pool)) / cfg.batch_size
        )
    n_q = round(cfg.ei_mix * cfg.batch_size) if pool else cfg.batch_size
    optimizer = raw_model.configure_optimizer(cfg.lr, cfg.weight_decay)
    run = Run(cfg, rank)
    step = run.start(raw_model, optimizer)
    if run.done(step, cfg.max_iters):
        return
    bar = tqdm(
        range(step, cfg.max_iters),
        desc=f"sft {cfg.name}",
        disable=rank != 0,
        initial=step,
        total=cfg.max_iters,
    )
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
        n_tokens = all_reduce_sum([sum(len(r) for ex in batch for _, r in ex)], device)[0]
        micro, loss_sum = cfg.batch_size // cfg.grad_accum, 0.0
        for m in range(cfg.grad_accum):
            # summed over tokens / tokens of the whole step (all micro-batches, all ranks): accumulation
            # and DDP's gradient averaging then give exactly the full-batch token-mean gradient
            with mixed_precision(device, cfg.dtype):
                loss = summed_nll(model, *sft_batch(batch[m * micro : (m + 1) * micro], device))
            loss = loss * world_size / n_tokens
            loss.backward()
            loss_sum += loss.item() / world_size
        loss_sum = all_reduce_sum([loss_sum], device)[0]
        grad_norm = optimizer_step(raw_model, optimizer, cfg.grad_clip, loss_sum, run.where(step))
        seen = (
            sum(len(p) + len(r) for ex in batch for p, r in ex) * world_size
        )  # every token through the model
        record = {
            "step": step + 1,
            "loss": loss_sum,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": seen / (time.time() - t0),  # the last position whose output is trained:
            "max_position": max(sum(len(p) + len(r) for p, r in ex) for ex in batch) - 2,
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


# --- stage 3: RL -----------------------------------------------------------------------------


def policy_update(model, ref, optimizer, batch, cfg, world_size, where):
    """ppo_epochs optimizer steps on one batch (Eq. 7 + aux_coef * Eq. 8). pi_ref is scored before
    any update (not at all when beta = 0: no KL term, none logged); so is pi_old when ppo_epochs > 1,
    else pi_old is pi_theta and its log-probs are the update's own, detached (ratio exactly 1, as
    TRL does). At the first pass the KL is exactly 0. Every loss term is normalised by the whole step's
    counts (all micro-batches, all ranks), so accumulation is exact. Returns logging sums."""
    raw_model = unwrap(model)
    rows, masks, adv, aux, aux_masks = (
        batch[k] for k in ("rows", "masks", "adv", "aux", "aux_masks")
    )
    device = adv.device
    n_seqs, n_tokens, n_aux = all_reduce_sum(
        [len(rows), sum(map(sum, masks)), sum(map(sum, aux_masks))], device
    )
    chunks = [slice(i, i + cfg.micro_batch) for i in range(0, len(rows), cfg.micro_batch)]
    t0 = time.time()
    with torch.no_grad(), mixed_precision(device, cfg.dtype):
        score = lambda m, wanted: [
            masked_logprobs(m, rows[c], masks[c], device, cfg.temperature)[0] if wanted else None
            for c in chunks
        ]
        old, refs = score(raw_model, cfg.ppo_epochs > 1), score(ref, cfg.beta != 0)
    stats = dict(
        kl=0.0, clipped=0.0, entropy=0.0, aux=0.0, n_tokens=n_tokens, time_score=time.time() - t0
    )
    raw_model.train()
    for epoch in range(cfg.ppo_epochs):
        epoch_loss = 0.0
        for c, old_logp, ref_logp in zip(chunks, old, refs):
            with mixed_precision(device, cfg.dtype):
                logp, mask, entropy = masked_logprobs(
                    model, rows[c], masks[c], device, cfg.temperature, epoch == 0
                )
            old_logp, ref_logp = (logp.detach() if x is None else x for x in (old_logp, ref_logp))
            loss, (kl, clipped) = rl_loss(
                logp, old_logp, ref_logp, mask, adv[c], cfg, n_seqs, n_tokens
            )
            (loss * world_size).backward()  # DDP averages over ranks; the counts are already global
            epoch_loss += loss.item()
            if epoch == 0:  # KL, clip fraction and entropy beside the loss, for the log
                stats["kl"] += kl
                stats["clipped"] += clipped
                stats["entropy"] += entropy.sum().item()
        for i in range(0, len(aux), cfg.micro_batch):
            with mixed_precision(device, cfg.dtype):
                nll = aux_loss(
                    model,
                    aux[i : i + cfg.micro_batch],
                    aux_masks[i : i + cfg.micro_batch],
                    device,
                    n_aux,
                )
            (cfg.aux_coef * nll * world_size).backward()
            epoch_loss += cfg.aux_coef * nll.item()
            stats["aux"] += nll.item() if epoch == 0 else 0.0
        stats["loss"] = all_reduce_sum([epoch_loss], device)[0]
        stats["grad_norm"] = optimizer_step(
            raw_model, optimizer, cfg.grad_clip, stats["loss"], where
        )
    raw_model.eval()
    return stats


def rl_questions(cfg, train, ref, tok, rank):
    """The RL question pool: data_fraction of train, then the difficulty filter (Eq. 2) run with
    the starting student (= pi_ref, so a resumed run picks the same questions)."""
    pool = [r for r in train if r["probes"] or cfg.algo != "exgrpo"]
    # Eq. 2 asks the student every probe of every question: examine a seeded draw, not all of train
    pool = random.Random(f"{cfg.seed}-candidates").sample(pool, min(len(pool), cfg.rl_candidates))
    counts = {"questions": len(pool)}
    if cfg.difficulty:
        pool, counts = difficulty_filter(
            pool, lambda qs: greedy_answers(ref, tok, qs, cfg.max_new_tokens), cfg.tau_hard
        )
        if rank == 0:
            tqdm.write(f"difficulty filter (tau_hard={cfg.tau_hard}): {counts}")
    if len(pool) < cfg.rl_batch_size:
        raise SystemExit(
            f"only {len(pool)} RL questions ({counts}) for --rl_batch_size={cfg.rl_batch_size}: lower "
            f"--tau_hard, set --difficulty=False or train the SFT student longer."
        )
    return pool, counts


def train_rl(cfg, model, tok, device, rank, world_size):
    raw_model = unwrap(model)
    ref = (
        copy.deepcopy(raw_model).eval().requires_grad_(False)
    )  # pi_ref: the starting student, frozen
    train, val = load_data(cfg)
    optimizer = raw_model.configure_optimizer(cfg.rl_lr, 0.0)
    run = Run(cfg, rank)
    start = run.start(
        raw_model, optimizer
    )  # a resumed run: its weights now, pi_ref still the start's
    if run.done(start, cfg.rl_steps):
        return
    with mixed_precision(device, cfg.dtype):  # the difficulty filter's greedy answers
        pool, counts = rl_questions(cfg, train, ref, tok, rank)
    raw_model.eval()  # dropout off for sampling and scoring
    bar = tqdm(
        range(start, cfg.rl_steps),
        desc=f"rl {cfg.name}",
        disable=rank != 0,
        initial=start,
        total=cfg.rl_steps,
    )
    for step in bar:
        t0 = time.time()
        # per-step seeds, so a resumed run is exact; one draw of questions for all ranks, then shards
        records = random.Random(f"{cfg.seed}-{step}").sample(pool, cfg.rl_batch_size)[
            rank::world_size
        ]
        with mixed_precision(device, cfg.dtype):
            batch = rollout_batch(
                raw_model, tok, records, cfg, random.Random(f"{cfg.seed}-{step}-{rank}"), device
            )
        t_sample = time.time() - t0
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, cfg, cfg.rl_lr, cfg.rl_steps, cfg.rl_warmup)
        stats = policy_update(model, ref, optimizer, batch, cfg, world_size, run.where(step))
        record = rl_metrics(batch, stats, cfg, device)
        record.update(
            step=step + 1,
            lr=optimizer.param_groups[0]["lr"],
            time_sample=t_sample,
            time_update=time.time() - t0 - t_sample - stats["time_score"],
            time_score=stats["time_score"],
            time_step=time.time() - t0,
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


# --- plumbing: main (the schedule, data, the student, logs and metrics: training.py) ----------


def main(argv):
    """Train as the config says; returns the trained model (unwrapped from DDP)."""
    cfg = parse_config(Config(), argv)
    rank, world_size, device = setup_ddp(pick_device(cfg.device))
    check_config(
        cfg, world_size
    )  # ranges, cross-field checks, the run's name, no fresh run over an old one
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    raw_model, tok = init_student(cfg, device)
    if rank == 0:
        print(
            f"{cfg.stage} {cfg.name}: {raw_model.num_params() / 1e6:.2f}M parameters, vocab {tok.n_vocab}, "
            f"init {cfg.init}, device {device}, {torch.get_num_threads()} threads"
        )
    model = DistributedDataParallel(raw_model) if world_size > 1 else raw_model
    model = (
        torch.compile(model) if cfg.compile else model
    )  # what the gradient flows through; unwrap() undoes it
    if cfg.compile:
        raw_model.compile_decode()  # CUDA graphs for the rollouts' decode steps (README, "Speed")
    with run_lock(cfg, rank):
        (train_sft if cfg.stage == "sft" else train_rl)(cfg, model, tok, device, rank, world_size)
    if world_size > 1:
        dist.destroy_process_group()
    return raw_model


if __name__ == "__main__":
    cli(main)
