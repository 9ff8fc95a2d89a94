"""
Linear probes on the student's hidden states. The question: does explanatory training (EI-SFT,
EXGRPO) make the reasoning state more linearly readable inside the student than plain imitation?

For each problem of a split we run the student's single-turn prompt ("Q: <question>\nA:", the
inference format) and read the residual stream at named token positions, at every layer
(0 = embeddings, l = after block l, the last before ln_f):
    positions=event   the last token of event sentence i ("... flips the coin."), one row per event
    positions=last    the last question token, just before "\nA:" (the query's "?"; swap: the "."
                      after its options)
    positions=prompt  the last prompt token (the ":" of "A:"), where the answer is produced
Targets come from the records' latent states (worlds.py: arith the last digit of the count, coin
the side up, date the month, swap what the asked-about person holds): target=state is the state
after event i at event rows, the final state at last/prompt rows; target=answer is the answer.
Per layer we fit a softmax logistic-regression probe (full batch, AdamW, fixed iterations) and the
mean-difference estimator (closed form), split by problem, and report test accuracy beside the
majority baseline and a shuffled-label control trained the same way (a probe that fits shuffled
labels as well as real ones measures the probe, not the model).

Selectivity (Hewitt & Liang 2019). A probe may score by memorising which token it sits on. The
control task gives every token *type* a fixed random label, with the real target's classes and
class balance, and trains the same probe on it: selectivity = task accuracy - control accuracy.
The probed token is always the sentence's "." or the "?", so the type is the word that names the
event there: the actor's name in coin ("Tom flips the coin."), the first trader's name in swap,
the whole event sentence in arith and date (whose event sentences all open alike); last/prompt
rows take the type of the last event.

The causal test (coin and swap, event positions, target=state): does the student *use* the
state it encodes? At hidden layer l and the last event's token of a test problem we add
alpha * (mu_other - mu_state) to the residual stream, mu the class means of the train rows at
that layer (alpha = 1 moves the average row of its state onto the other's; coin: the other side,
swap: another of the problem's options, seeded), let the student answer greedily (single turn)
and count the problems whose final answer is the one the other state implies. Baselines: alpha = 0
(no edit) and an edit of the same norm along a random direction. The edit is a forward hook on the
block, applied to generate()'s prefill; generated tokens see it through the KV cache.

    python probe.py \
        --checkpoints=vanilla=out/default/ckpt/sft_qa.pt,exgrpo=out/default/ckpt/rl_exgrpo.pt \
        --world=coin --target=state --positions=event --seed=1
        # -> out/default/probe/probe_coin_state_event*

Names: a *linear probe* is a classifier on hidden states; an *EI probe* is a question made by
Explanatory Inversion (invert.py). This file only has the first kind.
"""

import bisect
import json
import os
import random
import re
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from tqdm import tqdm

from configurator import atomic_write, cli, parse_config, pick_device, set_threads
from model import GPT, load_model, pad_rows
from tasks import is_correct, load_records, prompt_ids, read_split
from tokenizer import decode_generated


@dataclass
class Config:
    # [label=]path, comma-separated
    checkpoints: str = (
        "vanilla=out/default/ckpt/sft_qa.pt,ei_sft=out/default/ckpt/sft_ei.pt,"
        "exgrpo=out/default/ckpt/rl_exgrpo.pt"
    )
    # a run's data folder (reads {data}/{split}.jsonl) or a .jsonl file
    data: str = "out/default/data"
    # which split's problems to probe (never the ones the students trained on)
    split: str = "test_id"
    world: str = "coin"  # arith | coin | date | swap
    # state (latent state after each event / final) | answer (final answer class)
    target: str = "state"
    positions: str = "event"  # event | last (last question token) | prompt (last prompt token)
    out_dir: str = "out/default/probe"
    max_problems: int = 1000  # 0 = all problems of the world in the split
    train_frac: float = 0.7  # fraction of problems (not rows) whose rows train the probe
    # the split, controls, untrained reference ('init:') and edits: pass the run's seed
    seed: int = 1337
    batch_size: int = 32
    iters: int = 500  # full-batch AdamW steps per probe (fixed: no early stopping on test)
    controls: int = 5  # shuffled-label controls per layer, averaged (one shuffle is noisy)
    lr: float = 0.01
    weight_decay: float = 0.1
    # the causal test, where it applies (coin and swap, positions=event, target=state)
    intervene: bool = True
    # hidden layers to edit, comma-separated; "" = 1..n_layer-1 (after the last block an edit at a
    # prompt token reaches no later token)
    intervene_layers: str = ""
    alphas: str = "0,1,2,4,8"  # edit sizes in units of the class-mean gap at that layer
    # test problems edited (each answered once per layer, alpha and direction)
    intervene_problems: int = 60
    max_new_tokens: int = 64
    device: str = "auto"
    threads: int = 0  # 0 = torch's default


POSITIONS, TARGETS = ("event", "last", "prompt"), ("state", "answer")
LIMITS = dict(
    target=TARGETS,
    positions=POSITIONS,
    train_frac="(0, 1)",
    lr="(0, inf)",
    **dict.fromkeys(
        ("batch_size", "iters", "controls", "intervene_problems", "max_new_tokens"), "[1, inf)"
    ),
    **dict.fromkeys(("max_problems", "seed", "weight_decay", "threads"), "[0, inf)"),
)
# where a latent state implies one answer (arith's last digit and date's month do not)
INTERVENE_WORLDS = ("coin", "swap")

# ---------------------------------------------------------------------------------------------
# which token, which label


def token_char_ends(tok, ids):
    """ends[j] = characters of text covered by tokens 0..j. Decoding prefixes (not single tokens)
    stays exact even where one character spans two tokens."""
    return [len(tok.decode(ids[: j + 1])) for j in range(len(ids))]


def probe_rows(tok, record, positions, target):
    """(prompt ids, [(token index, label)], tokens that end past their sentence's last character).
    A position is the token holding the sentence's last character; when BPE merged it with the
    next character the token also sees a little of what follows, which we count, not hide."""
    latent = record.get("latent")
    if not latent:
        raise SystemExit(
            f"record {record['id']} has no latent states: linear probes need the latent field "
            f"that invert.py writes for worlds.py's worlds"
        )
    states, ends = latent["states"], latent["event_ends"]
    if len(states) != len(ends) + 1:
        raise SystemExit(
            f"record {record['id']}: {len(states)} latent states for {len(ends)} events "
            "(want events + 1)"
        )
    ids = prompt_ids(tok, record["question"])
    char_ends = token_char_ends(tok, ids)
    q0 = tok.decode(ids).index(record["question"])  # where the question starts inside the prompt

    def at(char_end):  # the token that holds character char_end - 1
        return bisect.bisect_left(char_ends, q0 + char_end)

    final = states[-1] if target == "state" else record["answer"]
    if positions == "event":
        cuts = list(ends)
        rows = [(at(c), states[i + 1] if target == "state" else final) for i, c in enumerate(cuts)]
    elif positions == "last":
        cuts = [len(record["question"])]
        rows = [(at(cuts[0]), final)]
    else:
        cuts, rows = [], [(len(ids) - 1, final)]
    merged = sum(char_ends[at(c)] != q0 + c for c in cuts)
    return ids, rows, merged


def control_types(record, positions):
    """The token type of each row of probe_rows, on which the control label hangs (see the top)."""
    q, ends = record["question"], record["latent"]["event_ends"]
    types = []
    for end in ends:
        # where the sentence before ends; -1: the event opens the question
        start = q.rfind(". ", 0, end - 1)
        sentence = q[start + 2 if start >= 0 else 0 : end]
        types.append(sentence.split()[0] if record["world"] in ("coin", "swap") else sentence)
    return types if positions == "event" else types[-1:]


def control_labels(types, labels, seed):
    """Hewitt & Liang's control task: a fixed random class per token type, the classes shared out so
    that their row counts follow the real labels'. Types are visited in a seeded random order and
    each joins the class furthest below its real row count."""
    want, rows_of = Counter(labels), Counter(types)
    order = sorted(rows_of)
    random.Random(seed).shuffle(order)
    got, label_of = Counter(), {}
    for t in order:
        label_of[t] = max(sorted(want), key=lambda c: want[c] - got[c])
        got[label_of[t]] += rows_of[t]
    return [label_of[t] for t in types]


@torch.no_grad()
def collect_hidden(model, seqs, rows, batch_size, device):
    """Residual stream at each (sequence index, token index) of rows: (L+1, N, C) fp32 on CPU.
    Rows are right-padded: a causal model's real tokens never see the pads after them, so each
    real position is exactly what the row computes alone (we index it, never position -1)."""
    model.eval()
    L, C = model.config.n_layer, model.config.n_embd
    out = torch.empty(L + 1, len(rows), C)
    by_seq = {}
    for r, (s, t) in enumerate(rows):
        by_seq.setdefault(s, []).append((r, t))
    for start in tqdm(range(0, len(seqs), batch_size), desc="activations", leave=False):
        batch = seqs[start : start + batch_size]
        hidden = torch.stack(model.residual_stream(pad_rows(batch, device)))  # (L+1, B, T, C)
        picks = [(r, b, t) for b in range(len(batch)) for r, t in by_seq.get(start + b, [])]
        if picks:
            r, b, t = (torch.tensor(x) for x in zip(*picks))
            out[:, r] = hidden[:, b.to(device), t.to(device)].float().cpu()
    return out


# ---------------------------------------------------------------------------------------------
# the probes (torch only): logistic regression, mean difference, controls


def standardise(x_train, x_test):
    """Both with the train statistics only, so nothing about the test rows leaks into the probe."""
    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    return (x_train - mu) / sd, (x_test - mu) / sd


def fit_linear_probe(x, y, n_classes, iters, lr, weight_decay):
    """Softmax regression, full batch. Zero init: the loss is convex, so the fit is
    deterministic."""
    W = torch.zeros(x.size(1), n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.AdamW([W, b], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(iters):
            loss = F.cross_entropy(x @ W + b, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return lambda z: (z @ W + b).argmax(-1)


def fit_mean_difference(x, y, n_classes):
    """Closed form: the nearest class mean. With two classes this is the projection on the
    difference of the class means thresholded at their midpoint (Marks & Tegmark's mass-mean
    probe); with more it is the same rule for every pair."""
    means = torch.stack([x[y == k].mean(0) for k in range(n_classes)])  # (K, C)
    return lambda z: torch.cdist(z, means).argmin(-1)


def probe_layer(x_train, y_train, x_test, y_test, n_classes, cfg, seed, control):
    """Test accuracies of one layer. y_test is -1 for a class never seen in train: always wrong.
    control = (train, test) labels of the control task, probed the same way."""
    x_train, x_test = standardise(x_train, x_test)
    acc = lambda predict, x, y: (predict(x) == y).float().mean().item()
    linear = fit_linear_probe(x_train, y_train, n_classes, cfg.iters, cfg.lr, cfg.weight_decay)
    control_task = fit_linear_probe(
        x_train, control[0], n_classes, cfg.iters, cfg.lr, cfg.weight_decay
    )
    mean_diff = fit_mean_difference(x_train, y_train, n_classes)
    # control: the same probe on train labels shuffled across rows, scored on the true test labels.
    # Averaged over shuffles: where features take few distinct values (layer 0 is token + position)
    # one shuffle's predictions move together and its accuracy swings widely (measured 0.2-0.7)
    g, controls = torch.Generator().manual_seed(seed), []
    for _ in range(cfg.controls):
        shuffled = y_train[torch.randperm(len(y_train), generator=g)]
        fit = fit_linear_probe(x_train, shuffled, n_classes, cfg.iters, cfg.lr, cfg.weight_decay)
        controls.append(acc(fit, x_test, y_test))
    controls, task = torch.tensor(controls), acc(linear, x_test, y_test)
    control_task_acc = acc(control_task, x_test, control[1])
    return {
        "lr_acc": task,
        "lr_train_acc": acc(linear, x_train, y_train),
        "mm_acc": acc(mean_diff, x_test, y_test),
        "control_acc": controls.mean().item(),
        "control_std": controls.std(correction=0).item(),
        "control_task_acc": control_task_acc,
        "selectivity": task - control_task_acc,
    }


def split_by_problem(problem_of_row, train_frac, seed):
    """Boolean train mask over rows: whole problems go to one side, so the rows of one problem
    (which share a question prefix) never sit on both."""
    problems = sorted(set(problem_of_row))
    perm = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed)).tolist()
    train = {problems[i] for i in perm[: round(train_frac * len(problems))]}
    return torch.tensor([p in train for p in problem_of_row])


def encode_labels(labels, train_mask):
    classes = sorted({l for l, m in zip(labels, train_mask.tolist()) if m})
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index.get(l, -1) for l in labels]), classes


# ---------------------------------------------------------------------------------------------
# the causal test: push the residual stream toward the other state, see whether the answer follows


def implied_answer(record, state):
    """The answer the problem would have if its final latent state were `state`."""
    if record["world"] == "coin":
        return "yes" if state == "heads" else "no"
    return {o: letter for letter, o in re.findall(r"\(([A-Z])\) (\w+)", record["question"])}[state]


def other_state(record, state, classes, rng):
    """The state the edit pushes toward: coin the other side, swap another option of the problem
    (one the probe's train rows have seen, so that it has a class mean)."""
    options = (
        ["heads", "tails"]
        if record["world"] == "coin"
        else re.findall(r"\([A-Z]\) (\w+)", record["question"])
    )
    return rng.choice(sorted(o for o in options if o != state and o in classes))


def intervention_cases(records, seqs, rows, y, classes, train, limit, seed):
    """The last event row of each of the first `limit` test problems: prompt, token index, the
    class index of its state and of the state the edit aims at, and the answer that one implies."""
    last = {}
    for i, (s, _) in enumerate(rows):
        if not train[i] and y[i] >= 0:
            last[s] = i
    rng, cases = random.Random(seed), []
    for i in sorted(last.values())[:limit]:
        s, t = rows[i]
        target = other_state(records[s], classes[y[i]], classes, rng)
        cases.append(
            {
                "record": records[s],
                "prompt": seqs[s],
                "token": t,
                "state": int(y[i]),
                "target": classes.index(target),
                "implied": implied_answer(records[s], target),
            }
        )
    return cases


@contextmanager
def residual_edit(model, layer, positions, delta):
    """Add delta[b] (B, C) to hidden layer `layer` (0 = embeddings, l = after block l) of row b at
    token positions[b], in the model's first forward call only: generate()'s prefill of the
    prompts, left-padded to the longest. The keys and values that later layers compute there go
    into the KV cache, so every generated token sees the edit."""
    module = model.transformer.drop if layer == 0 else model.transformer.h[layer - 1]
    calls = 0

    def hook(_, args, out):  # (B, T, C) -> the same, edited
        nonlocal calls
        calls += 1
        if calls > 1:
            return None
        if out.size(1) <= int(positions.max()):
            raise RuntimeError(
                "generate() no longer prefills the left-padded prompts in one call; "
                "residual_edit must learn where the prompt tokens are"
            )
        out = out.clone()
        rows = torch.arange(out.size(0), device=out.device)
        out[rows, positions.to(out.device)] += delta.to(out.device, out.dtype)
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def answers_under_edit(model, tok, cases, max_new_tokens, layer=None, delta=None):
    """Greedy single-turn answers, with the edit at each case's token (in padded coordinates) unless
    delta is None."""
    prompts = [c["prompt"] for c in cases]
    longest = max(map(len, prompts))
    # generate left-pads
    positions = torch.tensor([longest - len(p) + c["token"] for p, c in zip(prompts, cases)])
    with nullcontext() if delta is None else residual_edit(model, layer, positions, delta):
        tokens, mask = model.generate(prompts, max_new_tokens, temperature=0, eot=tok.eot)
    return decode_generated(tok, tokens, mask)


def count_flips(cases, texts):
    """(share whose final answer is the one the target state implies, share with any final
    answer)"""
    flips = [
        is_correct(c["record"]["world"], t, c["implied"], c["record"]["question"])
        for c, t in zip(cases, texts)
    ]
    answered = ["The answer is" in t for t in texts]
    return sum(flips) / len(cases), sum(answered) / len(cases)


def intervene(model, tok, cases, x_train, y_train, layers, alphas, seed, max_new_tokens):
    """Flip rates per layer and alpha, toward the other state and along random directions of the
    same norm (one per case). x_train[l] (N, C): the probe's train rows at hidden layer l."""
    # alpha = 0: no hook at all
    plain = count_flips(cases, answers_under_edit(model, tok, cases, max_new_tokens))
    g = torch.Generator().manual_seed(seed)
    state = torch.tensor([c["state"] for c in cases])
    target = torch.tensor([c["target"] for c in cases])
    out = {"toward": [], "random": [], "answered": []}
    for layer in tqdm(layers, desc="interventions", leave=False):
        means = torch.stack(
            [x_train[layer][y_train == k].mean(0) for k in range(int(y_train.max()) + 1)]
        )
        # (B, C): alpha = 1 moves the state's mean onto the target's
        toward = means[target] - means[state]
        rand = torch.randn(toward.shape, generator=g)
        rand *= toward.norm(dim=1, keepdim=True) / rand.norm(dim=1, keepdim=True)
        for name, direction in (("toward", toward), ("random", rand)):
            rates = [
                count_flips(
                    cases,
                    answers_under_edit(model, tok, cases, max_new_tokens, layer, a * direction),
                )
                if a
                else plain
                for a in alphas
            ]
            out[name].append([f for f, _ in rates])
            if name == "toward":
                out["answered"].append([a for _, a in rates])
    return out


# ---------------------------------------------------------------------------------------------
# the pipeline


def parse_checkpoints(spec):
    """'a.pt,b.pt' or 'sft=a.pt,exgrpo=b.pt' -> [(label, path)]. 'init:a.pt' is a.pt's
    architecture and tokenizer at freshly initialised weights (see run_probes)."""
    out = []
    for item in filter(None, spec.split(",")):
        label, sep, path = item.partition("=")
        stem = os.path.splitext(os.path.basename(item.removeprefix("init:")))[0]
        out.append((label, path) if sep else (stem + " (init)" * item.startswith("init:"), item))
    return out


def select_records(cfg):
    path = cfg.data if cfg.data.endswith(".jsonl") else os.path.join(cfg.data, f"{cfg.split}.jsonl")
    records = load_records(path) if cfg.data.endswith(".jsonl") else read_split(cfg.data, cfg.split)
    worlds = sorted({r["world"] for r in records})
    records = [r for r in records if r["world"] == cfg.world]
    if not records:
        raise SystemExit(
            f"{path} has no problems of world {cfg.world!r} (it has {', '.join(worlds)})"
        )
    return path, records[: cfg.max_problems or None]


def tokenised_rows(tok, records, cfg, ckpt, path):
    """Prompts, (prompt index, token index) rows, their labels, control types and problem ids,
    merged positions."""
    seqs, rows, labels, types, problems, merged = [], [], [], [], [], 0
    for r in records:
        try:
            ids, pos, m = probe_rows(tok, r, cfg.positions, cfg.target)
        except ValueError as e:  # CompactTokenizer meets a token it was not built with
            raise SystemExit(
                f"checkpoint {ckpt} cannot encode the questions of {path} ({e}); "
                f"probe a checkpoint with data from its own run"
            ) from None
        rows += [(len(seqs), t) for t, _ in pos]
        labels += [y for _, y in pos]
        types += control_types(r, cfg.positions)
        problems += [r["id"]] * len(pos)
        seqs.append(ids)
        merged += m
    return seqs, rows, labels, types, problems, merged


def untrained(config, seed, device):
    """The checkpoint's architecture at fresh weights drawn from the run's seed: what a probe reads
    from token identity and position through random features alone (measured: coin's state at
    event positions 0.72, majority 0.47). One network per seed, as each seed trains its own
    students."""
    torch.manual_seed(seed)
    return GPT(config).to(device)


def split_and_labels(result, labels, types, problems, cfg):
    """Train mask, task labels and control-task labels (class indices); fills the result's
    header."""
    train = split_by_problem(problems, cfg.train_frac, cfg.seed)
    if train.all() or not train.any():
        raise SystemExit(
            f"{len(set(problems))} problems cannot be split into train and test: probe more"
        )
    y, classes = encode_labels(labels, train)
    y_control, _ = encode_labels(control_labels(types, labels, cfg.seed), train)
    majority = torch.bincount(y[train], minlength=len(classes)).argmax()
    result.update(
        classes=classes,
        rows=len(labels),
        train_rows=int(train.sum()),
        test_rows=int((~train).sum()),
        train_problems=len({p for p, m in zip(problems, train) if m}),
        test_problems=len({p for p, m in zip(problems, train) if not m}),
        control_types=len(set(types)),
        majority_acc=(y[~train] == majority).float().mean().item(),
    )
    return train, y, y_control, classes


def edit_plan(cfg, n_layer):
    """(layers, alphas) of the causal test, or None where it does not apply."""
    if not (
        cfg.intervene
        and cfg.world in INTERVENE_WORLDS
        and cfg.positions == "event"
        and cfg.target == "state"
    ):
        return None
    layers = [int(l) for l in cfg.intervene_layers.split(",") if l] or list(range(1, n_layer))
    if not all(0 <= l <= n_layer for l in layers):
        raise SystemExit(
            f"intervene_layers must lie in 0..{n_layer} (0 = embeddings), "
            f"got {cfg.intervene_layers}"
        )
    return layers, [float(a) for a in cfg.alphas.split(",")]


def run_probes(cfg, checkpoints, path, records):
    """All numbers of one (world, target, positions) sweep as a JSON-able dict."""
    if cfg.positions not in POSITIONS or cfg.target not in TARGETS:
        raise SystemExit(f"positions must be one of {POSITIONS} and target one of {TARGETS}")
    device = pick_device(cfg.device)
    result = {
        "world": cfg.world,
        "target": cfg.target,
        "positions": cfg.positions,
        "data": path,
        "latent": records[0]["latent"]["name"],
        "config": asdict(cfg),
        "checkpoints": {},
    }
    for label, ckpt in checkpoints:
        model, tok, _ = load_model(ckpt.removeprefix("init:"), device)
        if ckpt.startswith("init:"):
            model = untrained(model.config, cfg.seed, device)
        seqs, rows, labels, types, problems, merged = tokenised_rows(tok, records, cfg, ckpt, path)
        # labels and problems depend on the records only: one split for all
        if "classes" not in result:
            train, y, y_control, classes = split_and_labels(result, labels, types, problems, cfg)
        feats = collect_hidden(model, seqs, rows, cfg.batch_size, device)
        layers = [
            probe_layer(
                f[train],
                y[train],
                f[~train],
                y[~train],
                len(classes),
                cfg,
                cfg.seed + l,
                control=(y_control[train], y_control[~train]),
            )
            for l, f in enumerate(tqdm(feats, desc=f"probes {label}", leave=False))
        ]
        entry = result["checkpoints"][label] = {
            "path": ckpt,
            "merged_positions": merged,
            **{k: [d[k] for d in layers] for k in layers[0]},
        }
        plan = edit_plan(cfg, model.config.n_layer)
        if plan:
            cases = intervention_cases(
                records, seqs, rows, y, classes, train, cfg.intervene_problems, cfg.seed
            )
            entry["intervention"] = intervene(
                model.eval(),
                tok,
                cases,
                feats[:, train],
                y[train],
                *plan,
                cfg.seed,
                cfg.max_new_tokens,
            )
            result["intervention"] = {
                "layers": plan[0],
                "alphas": plan[1],
                "problems": len(cases),
                "position": "the last event's token of each test problem",
            }
    return result


def plot(result, stem):
    """stem.png: accuracy per layer beside its controls, and selectivity; stem_intervention.png:
    flip rate against alpha, one panel per checkpoint."""
    fig, (ax, sel) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, r) in enumerate(result["checkpoints"].items()):
        color, x = f"C{i}", range(len(r["lr_acc"]))
        ax.plot(x, r["lr_acc"], "-o", color=color, label=f"{label}: linear probe")
        ax.plot(x, r["control_task_acc"], "--", color=color, label=f"{label}: control task")
        ax.plot(x, r["control_acc"], ":", color=color, label=f"{label}: shuffled labels")
        sel.plot(x, r["selectivity"], "-o", color=color, label=label)
    ax.axhline(result["majority_acc"], color="grey", linestyle=":", label="majority baseline")
    ax.set(
        xlabel="layer (0 = embeddings)",
        ylabel="test accuracy",
        ylim=(0, 1.02),
        title=f"{result['world']}: {result['target']} at {result['positions']} positions",
    )
    sel.axhline(0, color="grey", linewidth=0.8)
    sel.set(
        xlabel="layer (0 = embeddings)", ylabel="probe - control task accuracy", title="selectivity"
    )
    for a in (ax, sel):
        a.xaxis.get_major_locator().set_params(integer=True)
        a.legend(fontsize=7)
    save(fig, stem + ".png")
    if "intervention" in result:
        plot_intervention(result, stem + "_intervention.png")


def plot_intervention(result, path):
    plan, ckpts = result["intervention"], result["checkpoints"]
    fig, axes = plt.subplots(
        1, len(ckpts), figsize=(3.4 * len(ckpts), 3.4), sharey=True, squeeze=False
    )
    for ax, (label, r) in zip(axes[0], ckpts.items()):
        for j, layer in enumerate(plan["layers"]):
            ax.plot(
                plan["alphas"],
                r["intervention"]["toward"][j],
                "-o",
                color=f"C{j}",
                label=f"layer {layer}",
            )
            ax.plot(
                plan["alphas"],
                r["intervention"]["random"][j],
                "--",
                color=f"C{j}",
                label=f"layer {layer}, random",
            )
        ax.set(title=label, xlabel="alpha (class-mean gaps)", ylim=(-0.02, 1.02))
    axes[0][0].set_ylabel("flip rate (answer of the other state)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(
        f"{result['world']}: edit toward the other state at the last event "
        f"({plan['problems']} problems)"
    )
    save(fig, path)


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise


def check_lists(cfg):
    """alphas and intervene_layers are comma-separated numbers."""
    for key, kind in (("alphas", float), ("intervene_layers", int)):
        try:
            [kind(x) for x in getattr(cfg, key).split(",") if x]
        except ValueError:
            raise SystemExit(
                f"--{key}={getattr(cfg, key)} must be comma-separated {kind.__name__}s"
            ) from None


def main(argv):
    cfg = parse_config(Config(), argv, LIMITS)
    check_lists(cfg)
    set_threads(cfg.threads)
    path, records = select_records(cfg)
    result = run_probes(cfg, parse_checkpoints(cfg.checkpoints), path, records)
    os.makedirs(cfg.out_dir, exist_ok=True)
    stem = os.path.join(cfg.out_dir, f"probe_{cfg.world}_{cfg.target}_{cfg.positions}")
    atomic_write(stem + ".json", json.dumps(result, indent=1))
    plot(result, stem)
    print(
        f"majority baseline {result['majority_acc']:.3f} ({result['test_rows']} test rows, "
        f"{result['test_problems']} problems); wrote {stem}*.json and .png"
    )
    for label, r in result["checkpoints"].items():
        for name, key in (
            ("linear probe", "lr_acc"),
            ("shuffled", "control_acc"),
            ("selectivity", "selectivity"),
        ):
            print(
                f"{label if key == 'lr_acc' else '':>10}  {name:<12} "
                + " ".join(f"{a:.2f}" for a in r[key])
            )
        for kind, rates in r.get(
            "intervention", {}
        ).items():  # per edited layer, one rate per alpha
            print(
                f"{'':>10}  flips {kind:<6} "
                + " | ".join(" ".join(f"{a:.2f}" for a in layer) for layer in rates)
            )


if __name__ == "__main__":
    cli(main)
