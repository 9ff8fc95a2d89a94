"""
Linear probes on the student's hidden states. The question: does explanatory training (EI-SFT,
EXGRPO) make the reasoning state more linearly readable inside the student than plain imitation?

For each problem of a split we run the student's single-turn prompt ("Q: <question>\nA:", the
inference format) and read the residual stream at named token positions, at every layer
(0 = embeddings, l = after block l, the last before ln_f):
    positions=event   the last token of event sentence i ("... flips the coin."), one row per event
    positions=last    the last question token, just before "\nA:" (the query's "?"; swap: the "." after its options)
    positions=prompt  the last prompt token (the ":" of "A:"), where the answer is produced
Targets come from the records' latent states (tasks.py: arith the last digit of the count, coin
the side up, date the month, swap what the asked-about person holds): target=state is the state
after event i at event rows, the final state at last/prompt rows; target=answer is the answer.
Per layer we fit a softmax logistic-regression probe (full batch, AdamW, fixed iterations) and the
mean-difference estimator (closed form), split by problem, and report test accuracy beside the
majority baseline and a shuffled-label control trained the same way (Hewitt & Liang 2019: a probe
that fits shuffled labels as well as real ones measures the probe, not the model).

    python probe.py --checkpoints=vanilla=out/default/ckpt/sft_qa.pt,exgrpo=out/default/ckpt/rl_exgrpo.pt \
        --world=coin --target=state --positions=event      # -> out/default/probe/probe_coin_state_event.*

Names: a *linear probe* is a classifier on hidden states; an *EI probe* is a question made by
Explanatory Inversion (invert.py). This file only has the first kind.
"""
import bisect
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from configurator import parse_config, pick_device, set_threads
from model import GPT, load_model, pad_rows
from tasks import load_records, prompt_ids


@dataclass
class Config:
    checkpoints: str = ("vanilla=out/default/ckpt/sft_qa.pt,ei_sft=out/default/ckpt/sft_ei.pt,"
                        "exgrpo=out/default/ckpt/rl_exgrpo.pt")  # [label=]path, comma-separated
    data: str = "out/default/data"  # a run's data folder (reads {data}/{split}.jsonl) or a .jsonl file
    split: str = "test_id"          # which split's problems to probe (never the ones the students trained on)
    world: str = "coin"             # arith | coin | date | swap
    target: str = "state"          # state (latent state after each event / final) | answer (final answer class)
    positions: str = "event"       # event | last (last question token) | prompt (last prompt token)
    out_dir: str = "out/default/probe"
    max_problems: int = 1000        # 0 = all problems of the world in the split
    train_frac: float = 0.7         # fraction of problems (not rows) whose rows train the probe
    seed: int = 1337
    batch_size: int = 32
    iters: int = 500                # full-batch AdamW steps per probe (fixed: no early stopping on test)
    controls: int = 5               # shuffled-label controls per layer, averaged (one shuffle is noisy)
    lr: float = 0.01
    weight_decay: float = 0.1
    device: str = "auto"
    threads: int = 0                # 0 = torch's default


POSITIONS, TARGETS = ("event", "last", "prompt"), ("state", "answer")

# ---------------------------------------------------------------------------------------------
# which token, which label


def token_char_ends(tok, ids):
    """ends[j] = characters of text covered by tokens 0..j. Decoding prefixes (not single tokens)
    stays exact even where one character spans two tokens."""
    return [len(tok.decode(ids[:j + 1])) for j in range(len(ids))]


def probe_rows(tok, record, positions, target):
    """(prompt ids, [(token index, label)], tokens that end past their sentence's last character).
    A position is the token holding the sentence's last character; when BPE merged it with the
    next character the token also sees a little of what follows, which we count, not hide."""
    latent = record.get("latent")
    if not latent:
        raise SystemExit(f"record {record['id']} has no latent states: linear probes need the latent field "
                         f"that invert.py writes for tasks.py's worlds")
    states, ends = latent["states"], latent["event_ends"]
    if len(states) != len(ends) + 1:
        raise SystemExit(f"record {record['id']}: {len(states)} latent states for {len(ends)} events (want events + 1)")
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
        batch = seqs[start:start + batch_size]
        _, _, hidden = model(pad_rows(batch, device), return_hidden=True)
        hidden = torch.stack(hidden)  # (L+1, B, T, C)
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
    """Softmax regression, full batch. Zero init: the loss is convex, so the fit is deterministic."""
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


def probe_layer(x_train, y_train, x_test, y_test, n_classes, cfg, seed):
    """Test accuracies of one layer. y_test is -1 for a class never seen in train: always wrong."""
    x_train, x_test = standardise(x_train, x_test)
    acc = lambda predict, x, y: (predict(x) == y).float().mean().item()
    linear = fit_linear_probe(x_train, y_train, n_classes, cfg.iters, cfg.lr, cfg.weight_decay)
    mean_diff = fit_mean_difference(x_train, y_train, n_classes)
    # control: the same probe on train labels shuffled across rows, scored on the true test labels.
    # Averaged over shuffles: where features take few distinct values (layer 0 is token + position)
    # one shuffle's predictions move together and its accuracy swings widely (measured 0.2-0.7)
    g, controls = torch.Generator().manual_seed(seed), []
    for _ in range(cfg.controls):
        shuffled = y_train[torch.randperm(len(y_train), generator=g)]
        control = fit_linear_probe(x_train, shuffled, n_classes, cfg.iters, cfg.lr, cfg.weight_decay)
        controls.append(acc(control, x_test, y_test))
    controls = torch.tensor(controls)
    return {"lr_acc": acc(linear, x_test, y_test), "lr_train_acc": acc(linear, x_train, y_train),
            "mm_acc": acc(mean_diff, x_test, y_test), "control_acc": controls.mean().item(),
            "control_std": controls.std(correction=0).item()}


def split_by_problem(problem_of_row, train_frac, seed):
    """Boolean train mask over rows: whole problems go to one side, so the rows of one problem
    (which share a question prefix) never sit on both."""
    problems = sorted(set(problem_of_row))
    perm = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed)).tolist()
    train = {problems[i] for i in perm[:round(train_frac * len(problems))]}
    return torch.tensor([p in train for p in problem_of_row])


def encode_labels(labels, train_mask):
    classes = sorted({l for l, m in zip(labels, train_mask.tolist()) if m})
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index.get(l, -1) for l in labels]), classes

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
    records = load_records(path)
    worlds = sorted({r["world"] for r in records})
    records = [r for r in records if r["world"] == cfg.world]
    if not records:
        raise SystemExit(f"{path} has no problems of world {cfg.world!r} (it has {', '.join(worlds)})")
    return path, records[:cfg.max_problems or None]


def tokenised_rows(tok, records, cfg, ckpt, path):
    """Prompts, (prompt index, token index) rows, their labels and problem ids, merged positions."""
    seqs, rows, labels, problems, merged = [], [], [], [], 0
    for r in records:
        try:
            ids, pos, m = probe_rows(tok, r, cfg.positions, cfg.target)
        except ValueError as e:  # CompactTokenizer meets a token it was not built with
            raise SystemExit(f"checkpoint {ckpt} cannot encode the questions of {path} ({e}); "
                             f"probe a checkpoint with data from its own run") from None
        rows += [(len(seqs), t) for t, _ in pos]
        labels += [y for _, y in pos]
        problems += [r["id"]] * len(pos)
        seqs.append(ids)
        merged += m
    return seqs, rows, labels, problems, merged


def run_probes(cfg, checkpoints, path, records):
    """All numbers of one (world, target, positions) sweep as a JSON-able dict."""
    if cfg.positions not in POSITIONS or cfg.target not in TARGETS:
        raise SystemExit(f"positions must be one of {POSITIONS} and target one of {TARGETS}")
    device = pick_device(cfg.device)
    result = {"world": cfg.world, "target": cfg.target, "positions": cfg.positions, "data": path,
              "config": asdict(cfg), "checkpoints": {}}
    for label, ckpt in checkpoints:
        model, tok, _ = load_model(ckpt.removeprefix("init:"), device)
        if ckpt.startswith("init:"):
            # the untrained network: what a probe reads from token identity and position through
            # random features alone (measured: coin's state at event positions 0.72, majority 0.47)
            torch.manual_seed(cfg.seed)
            model = GPT(model.config).to(device)
        seqs, rows, labels, problems, merged = tokenised_rows(tok, records, cfg, ckpt, path)
        if "classes" not in result:  # labels and problems depend on the records only: one split for all
            train = split_by_problem(problems, cfg.train_frac, cfg.seed)
            if train.all() or not train.any():
                raise SystemExit(f"{len(set(problems))} problems cannot be split into train and test: probe more")
            y, classes = encode_labels(labels, train)
            y_train, y_test = y[train], y[~train]
            majority = torch.bincount(y_train, minlength=len(classes)).argmax()
            result.update(latent=records[0]["latent"]["name"], classes=classes, rows=len(labels),
                          train_rows=int(train.sum()), test_rows=int((~train).sum()),
                          train_problems=len({p for p, m in zip(problems, train) if m}),
                          test_problems=len({p for p, m in zip(problems, train) if not m}),
                          majority_acc=(y_test == majority).float().mean().item())
        feats = collect_hidden(model, seqs, rows, cfg.batch_size, device)
        layers = [probe_layer(f[train], y_train, f[~train], y_test, len(classes), cfg, cfg.seed + l)
                  for l, f in enumerate(tqdm(feats, desc=f"probes {label}", leave=False))]
        result["checkpoints"][label] = {"path": ckpt, "merged_positions": merged,
                                        **{k: [d[k] for d in layers] for k in layers[0]}}
    return result


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, r) in enumerate(result["checkpoints"].items()):
        color, x = f"C{i}", range(len(r["lr_acc"]))
        ax.plot(x, r["lr_acc"], "-o", color=color, label=f"{label}: linear probe")
        ax.plot(x, r["control_acc"], "--", color=color, label=f"{label}: shuffled-label control")
    ax.axhline(result["majority_acc"], color="grey", linestyle=":", label="majority baseline")
    ax.set(xlabel="layer (0 = embeddings)", ylabel="test accuracy", ylim=(0, 1.02),
           title=f"{result['world']}: {result['target']} at {result['positions']} positions")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    cfg = parse_config(Config(), argv)
    set_threads(cfg.threads)
    path, records = select_records(cfg)
    result = run_probes(cfg, parse_checkpoints(cfg.checkpoints), path, records)
    os.makedirs(cfg.out_dir, exist_ok=True)
    stem = os.path.join(cfg.out_dir, f"probe_{cfg.world}_{cfg.target}_{cfg.positions}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, stem + ".png")
    print(f"majority baseline {result['majority_acc']:.3f} ({result['test_rows']} test rows, "
          f"{result['test_problems']} problems); wrote {stem}.json and .png")
    for label, r in result["checkpoints"].items():
        print(f"{label:>10}  linear probe " + " ".join(f"{a:.2f}" for a in r["lr_acc"]))
        print(f"{'':>10}  control      " + " ".join(f"{a:.2f}" for a in r["control_acc"]))


if __name__ == "__main__":
    main(sys.argv[1:])
