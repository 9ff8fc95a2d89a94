"""
Evaluation and the report. For each checkpoint: greedy single-turn accuracy on test_id and on every
OOD split, per world; accuracy on the EI probes of the test_id problems, per rule (explanatory
consistency: does the student answer the questions that explain its own answers?). Then tables with
the mean ± std over seeds, bar charts, training curves from the logs and, when runs with
data_fraction < 1 exist, a data-efficiency plot; and, for the comparisons that count, what the study
can resolve (variance components over seeds and problems, the minimum detectable effect). Inference
is single-turn, as in the paper: the student sees the question alone, no probes in context.

    python evaluate.py --out_dir=out/default                              # every checkpoint in out/default/ckpt
    python evaluate.py --runs=out/s1,out/s2,out/s3 --out_dir=out/seeds    # one run folder per seed
    python evaluate.py --out_dir=out/default --reuse=True                 # redraw from results.json

Writes <out_dir>/report/{report.md, results.json, *.png}. A method is a checkpoint name (sft_qa,
rl_exgrpo, ...): over several run folders its numbers are the mean ± sample std over the folders
that have it, and n counts them. A split's accuracy pools the problems of every world.
"""

import glob
import json
import os
import re
import shutil
import statistics
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from configurator import atomic_write, cli, parse_config, pick_device, set_threads
from model import load_model
from tasks import EI_RULES, greedy_answers, is_correct, read_split
from training import read_log


@dataclass
class Config:
    out_dir: str = "out/default"  # run folder; the report goes to out_dir/report
    runs: str = ""  # comma-separated run folders (one per seed) to aggregate; default out_dir
    ckpts: str = (
        ""  # comma-separated names (looked up in every run) or .pt paths (on out_dir's data)
    )
    splits: str = ""  # comma-separated; default every test split in the data (test_id, ood_*)
    worlds: str = ""  # comma-separated; default every world in the data
    max_problems: int = 0  # per world and split; 0 = all
    probe_problems: int = (
        0  # score the EI probes of the first n test_id problems per world; 0 = all
    )
    max_new_tokens: int = 96  # ood_long rationales reach ~90 GPT-2 tokens
    batch_size: int = 128
    reuse: bool = (
        False  # keep results.json entries whose checkpoint file and settings are unchanged
    )
    from_results: str = (
        ""  # comma-separated folders of saved results (results.json + logs/, one per
    )
    # seed, as a study commits them): the report from those, no checkpoint needed
    device: str = "auto"
    threads: int = 0  # torch threads; 0 = torch's default


LIMITS = dict(
    max_problems="[0, inf)",
    probe_problems="[0, inf)",
    max_new_tokens="[1, inf)",
    batch_size="[1, inf)",
    threads="[0, inf)",
)
TEST_SPLITS = ("test_id", "ood_long", "ood_reverse", "ood_names")

# the paper's ablation rows in the order a reader expects them; other names follow alphabetically
LABELS = {
    "sft_qa": "vanilla SFT",
    "sft_ei": "EI-SFT",
    "rl_exgrpo_plain": "SFT + dialogue RL",
    "rl_exgrpo_nobonus": "SFT + dialogue RL + aux",
    "rl_exgrpo": "EXGRPO",
    "rl_cold": "RL cold start",
    "rl_grpo": "SFT + GRPO (one turn)",
}
# the paired differences the report gives confidence intervals for: every row against both SFT
# baselines, and the DSU bonus on its own
BASELINES, PAIRS = (
    ("sft_qa", "sft_ei"),
    (("rl_exgrpo", "rl_exgrpo_nobonus"), ("rl_exgrpo_nobonus", "rl_exgrpo_plain")),
)
# the comparisons whose power the report states (README, "The RL study"): the whole method against its SFT student,
# the DSU bonus on its own, and the whole method against plain SFT
COMPARISONS = (("rl_exgrpo", "sft_ei"), ("rl_exgrpo", "rl_exgrpo_nobonus"), ("rl_exgrpo", "sft_qa"))
Z_POWER = statistics.NormalDist().inv_cdf(0.975) + statistics.NormalDist().inv_cdf(
    0.80
)  # 80% power, two-sided 5%
SEEDS_GRID, PROBLEMS_GRID = (5, 10, 20, 40), (1000, 4000)  # seeds; problems per split
MDE_TARGET = 2.0  # points: the detectable effect the study is sized for
SFT_CURVES = ("val_loss", "val_acc")
RL_CURVES = ("reward", "acc_full", "kl", "frac_zero_std", "dsu_fire_rate")


def find_checkpoints(cfg, runs):
    """[(run folder, method name, path)] for the names or paths in --ckpts, or every ckpt/*.pt."""
    found = []
    for c in [c for c in cfg.ckpts.split(",") if c] or [None]:
        if c and c.endswith(".pt"):
            if not os.path.isfile(c):
                raise SystemExit(f"checkpoint {c} does not exist")
            found.append((cfg.out_dir, os.path.basename(c)[:-3], c))
            continue
        paths = [
            p
            for run in runs
            for p in sorted(glob.glob(os.path.join(run, "ckpt", f"{c or '*'}.pt")))
        ]
        if not paths:
            what = f"checkpoint {c}.pt" if c else "checkpoints"
            raise SystemExit(
                f"no {what} in {', '.join(os.path.join(r, 'ckpt') for r in runs)}: "
                f"train with distill_rl.py first, or pick --ckpts from what is there"
            )
        found += [(os.path.dirname(os.path.dirname(p)), os.path.basename(p)[:-3], p) for p in paths]
    return found


def default_splits(runs):
    """The test splits the run folders' data holds. None at all: test_id, so that reading it says
    how to make it; a user's data with train only: stop with how to give it test records."""
    splits = [
        s
        for s in TEST_SPLITS
        if any(os.path.isfile(os.path.join(r, "data", f"{s}.jsonl")) for r in runs)
    ]
    trained_only = [r for r in runs if os.path.isfile(os.path.join(r, "data", "train.jsonl"))]
    if not splits and trained_only:
        raise SystemExit(
            f"{os.path.join(trained_only[0], 'data')} has no test split: give some records of your JSONL "
            f'"split": "test_id" and rerun invert.py, or name --splits (e.g. --splits=val)'
        )
    return splits or ["test_id"]


def load_data(run, splits, worlds, max_problems):
    """{split: records} of one run folder, restricted to the chosen worlds, the first max_problems
    of each world (the JSONL order is the generator's, so this is the same subset every time). A
    world or split that matches nothing stops: a report is never replaced by an empty one."""
    data = {}
    for split in splits:
        every, path = (
            read_split(os.path.join(run, "data"), split),
            os.path.join(run, "data", f"{split}.jsonl"),
        )
        present = sorted({r["world"] for r in every})
        if not every:
            raise SystemExit(f"{path} holds no problems")
        if not set(worlds) <= set(present):
            raise SystemExit(
                f"--worlds={','.join(worlds)}: {path} has no problems of "
                f"{', '.join(sorted(set(worlds) - set(present)))} (it has {', '.join(present)})"
            )
        data[split] = first_per_world(
            [r for r in every if not worlds or r["world"] in worlds], max_problems
        )
    return data


def first_per_world(records, n):
    """The first n records of each world, in order (all of them when n is 0)."""
    seen, out = {}, []
    for r in records:
        seen[r["world"]] = seen.get(r["world"], 0) + 1
        if not n or seen[r["world"]] <= n:
            out.append(r)
    return out


def evaluate_checkpoint(path, run, data, cfg, device):
    """Counts [correct, total] per split and world ("acc") and per EI rule and world ("probes")."""
    model, tok, ckpt = load_model(path, device)
    jobs = [
        ("acc", split, r["world"], r["question"], r["answer"], i)
        for split, recs in data.items()
        for i, r in enumerate(recs)
    ]
    jobs += [
        ("probes", p["rule"], r["world"], p["question"], p["answer"], None)
        for r in first_per_world(data.get("test_id", []), cfg.probe_problems)
        for p in r.get("probes", [])
    ]
    jobs.sort(
        key=lambda j: len(j[3])
    )  # similar lengths share a batch: less left padding to compute
    bs, answers = cfg.batch_size, []
    try:
        for i in tqdm(range(0, len(jobs), bs), desc=f"eval {path}"):
            answers += greedy_answers(
                model, tok, [j[3] for j in jobs[i : i + bs]], cfg.max_new_tokens, bs
            )
    except (
        ValueError
    ) as e:  # a token outside a compact vocabulary, or a prompt longer than block_size
        raise SystemExit(
            f"checkpoint {path} cannot be evaluated on {os.path.join(run, 'data')}: {e}"
        ) from None
    entry = {
        "run": run,
        "path": path,
        "step": ckpt["step"],
        "config": ckpt["extra"].get("config", {}),
        "acc": {s: {} for s in data},
        "probes": {},
    }
    correct = {split: ["0"] * len(recs) for split, recs in data.items()}
    for (group, key, world, question, gold, i), text in zip(jobs, answers):
        right = int(is_correct(world, text, gold, question))  # the question: swap options by letter
        cell = entry[group].setdefault(key, {}).setdefault(world, [0, 0])
        cell[0] += right
        cell[1] += 1
        if group == "acc":
            correct[key][i] = str(right)
    entry["correct"] = {
        split: "".join(c) for split, c in correct.items()
    }  # per problem, in data order
    return entry


def stamp(path, run, splits):
    """Modification times of a checkpoint and of the data it is scored on: --reuse trusts a cached
    entry only while both are unchanged (a retrained model, a regenerated dataset)."""
    files = [path] + [os.path.join(run, "data", f"{s}.jsonl") for s in splits]
    return [os.path.getmtime(f) if os.path.isfile(f) else None for f in files]


def pooled(cells):
    """Accuracy over {world: [correct, total]}; None when there are no problems."""
    n = sum(t for _, t in cells.values())
    return sum(c for c, _ in cells.values()) / n if n else None


def spread(values):
    """(mean, sample std, n) over the seeds that have a value; None when none does."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return (
        statistics.mean(values),
        statistics.stdev(values) if len(values) > 1 else 0.0,
        len(values),
    )


def fmt(s):
    if s is None:
        return "–"
    return f"{100 * s[0]:.1f}" + (f" ± {100 * s[1]:.1f}" if s[2] > 1 else "")


def md_table(header, rows):
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(row) + " |" for row in rows]
    )


def split_name(name):
    """The study's data-efficiency rows are named <row>_f<percent>: sft_qa_f10 is sft_qa on 10% of the data."""
    base, share = re.fullmatch(r"(.*?)(?:_f(\d+))?", name).groups()
    return (base, share) if base in LABELS else (name, None)


def label(name):
    base, share = split_name(name)
    return (
        f"{LABELS[base]}{f', {share}% of the data' if share else ''} ({name})"
        if base in LABELS
        else name
    )


def row_key(name):
    """Report order: the rows of LABELS as listed, each followed by its data-efficiency rows by share,
    then the other names alphabetically."""
    base, share = split_name(name)
    return (
        (list(LABELS).index(base), 0, int(share or 0)) if base in LABELS else (len(LABELS), 1, name)
    )


FAMILY_ORDER = {
    "vanilla SFT": 0,
    "EI-SFT": 1,
    "EXGRPO": 2,
}  # the data-efficiency lines, baselines first


def family(c):
    """The data-efficiency plot's line for a run config: the method regardless of data_fraction."""
    if c.get("stage") == "sft":
        return "EI-SFT" if c.get("data") == "ei" else "vanilla SFT"
    name = c.get("algo", "rl").upper()
    if c.get("algo") == "exgrpo" and not c.get("dsu_bonus", True):
        name += " w/o DSU bonus" + (" or aux loss" if c.get("aux_coef", 1) == 0 else "")
    return name + (
        "" if str(c.get("init", "")).endswith(".pt") else " cold start"
    )  # RL from the base model


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise


def bar_chart(path, title, groups, series):
    """groups along x, one bar per method in each (series: {method: [spread per group]}),
    error bars = std over seeds."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(series)) ** 0.5), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, stats) in enumerate(series.items()):
        x = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        ax.bar(
            x,
            [100 * s[0] if s else np.nan for s in stats],
            width,
            label=name,
            yerr=[100 * s[1] if s and s[2] > 1 else np.nan for s in stats],
            capsize=2,
        )
    crowded = len(groups) > 5  # rule names: slant them so they do not overlap
    ax.set_xticks(
        range(len(groups)),
        groups,
        rotation=30 if crowded else 0,
        ha="right" if crowded else "center",
    )
    ax.set(ylim=(0, 105), ylabel="accuracy (%)", title=title)
    ax.legend(fontsize=8)
    save(fig, path)


def curve_chart(path, title, logs, keys):
    """One panel per logged metric vs step, one line per method: the mean over its runs at each
    step, smoothed by a moving average over about a fifteenth of the steps (RL steps are noisy)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.3), squeeze=False)
    by_method = {}
    for method, records in logs:
        by_method.setdefault(method, []).append(records)
    for ax, key in zip(axes[0], keys):
        for i, (method, runs) in enumerate(by_method.items()):
            by_step = {}
            for r in (r for records in runs for r in records if r.get(key) is not None):
                by_step.setdefault(r["step"], []).append(r[key])
            if not by_step:
                continue
            steps = sorted(by_step)
            means = np.array([statistics.mean(by_step[s]) for s in steps])
            w = max(1, len(steps) // 15)
            smooth = np.convolve(means, np.ones(w) / w, mode="valid") if w > 1 else means
            ax.plot(
                steps[w - 1 :],
                smooth,
                color=f"C{i}",
                marker="." if len(steps) < 30 else None,
                label=f"{method} (n={len(runs)})" if len(runs) > 1 else method,
            )
        ax.set(title=key, xlabel="step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    save(fig, path)


def split_acc(e, split, world=None):
    """One checkpoint's accuracy on a split, pooled over its worlds or for one world."""
    return pooled({w: c for w, c in e["acc"].get(split, {}).items() if world in (None, w)})


def accuracy_sections(methods, order, splits, report_dir):
    """The main table (methods x splits + their mean) and the per-world table, with a bar chart."""

    def split_mean(e):
        values = [split_acc(e, s) for s in splits]
        return None if None in values else statistics.mean(values)

    main = {
        m: [spread([split_acc(e, s) for e in methods[m]]) for s in splits]
        + [spread(map(split_mean, methods[m]))]
        for m in order
    }
    bar_chart(
        os.path.join(report_dir, "accuracy.png"),
        "Greedy accuracy per split",
        splits + ["mean"],
        {label(m): main[m] for m in order},
    )
    worlds = sorted(
        {w for es in methods.values() for e in es for s in splits for w in e["acc"].get(s, {})}
    )
    per_world = [
        [label(m), w] + [fmt(spread([split_acc(e, s, w) for e in methods[m]])) for s in splits]
        for m in order
        for w in worlds
    ]
    return [
        "## Accuracy per split",
        "",
        md_table(
            ["method"] + splits + ["mean", "n"],
            [[label(m)] + [fmt(s) for s in main[m]] + [str(len(methods[m]))] for m in order],
        ),
        "",
        "![accuracy per split](accuracy.png)",
        "",
        "## Accuracy per world",
        "",
        md_table(["method", "world"] + splits, per_world),
        "",
    ]


def paired_bootstrap(diffs, n_boot=2000, seed=0):
    """diffs (seeds, problems): per-problem differences in correctness (-1, 0, 1) between two
    checkpoints trained with the same seed and scored on the same problems. Returns the mean and a
    95% percentile interval from resampling seeds and problems with replacement (both paired: a
    draw keeps each seed's two checkpoints and each problem's two answers together)."""
    rng = np.random.default_rng(seed)
    S, P = diffs.shape
    means = [diffs[rng.integers(0, S, S)][:, rng.integers(0, P, P)].mean() for _ in range(n_boot)]
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diffs.mean()), float(lo), float(hi)


def rise(curves, share=0.2, n_boot=2000, seed=0):
    """How far a logged value rose over training: the mean of its last `share` of steps minus the
    mean of its first, averaged over the run folders (one per-step series each). Returns
    (first, last, rise, lo, hi): the two window means, their difference and a 95% percentile interval
    from resampling run folders and, within each, the steps of both windows."""
    rng = np.random.default_rng(seed)
    windows = [
        (np.asarray(c[:w], float), np.asarray(c[-w:], float))
        for c in curves
        for w in [max(1, round(share * len(c)))]
    ]
    first, last = (float(np.mean([w[i].mean() for w in windows])) for i in (0, 1))
    draws = [
        np.mean(
            [
                b[rng.integers(0, len(b), len(b))].mean()
                - a[rng.integers(0, len(a), len(a))].mean()
                for a, b in (windows[i] for i in rng.integers(0, len(windows), len(windows)))
            ]
        )
        for _ in range(n_boot)
    ]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return first, last, last - first, float(lo), float(hi)


def rl_section(methods, order):
    """The diagnostics reported beside the accuracies, from each RL row's training logs (mean over its
    run folders): did the outcome reward rise, how far the policy moved from the reference, how many
    groups carried no signal, how often the DSU bonus fired, what was trained."""
    rows = []
    for m in order:
        logs = [
            log
            for log in ([r for r in log if "acc_full" in r] for log in training_logs(methods[m], m))
            if log
        ]
        if not logs:
            continue

        def mean(
            key, steps=slice(None)
        ):  # over every logged step of every run folder, or a slice of each
            values = [r[key] for log in logs for r in log[steps] if r.get(key) is not None]
            return statistics.mean(values) if values else None

        first, last, up, lo, hi = rise([[r["acc_full"] for r in log] for log in logs])
        rows.append(
            [
                label(m),
                str(len(logs)),
                str(max(map(len, logs))),
                f"{first:.3f} → {last:.3f}",
                f"{up:+.3f} [{lo:+.3f}, {hi:+.3f}]" + ("" if lo <= 0 <= hi else " *"),
                _num(mean("kl", slice(-5, None)), ".4f"),
                _num(mean("frac_zero_std"), ".2f"),
                _num(mean("dsu_fire_rate"), ".2f"),
                _num(mean("adv_bonus_share"), ".3f"),
                _num(mean("tokens_trained"), ".0f"),
                _num(
                    max(
                        (r["max_position"] for log in logs for r in log if "max_position" in r),
                        default=None,
                    ),
                    "d",
                ),
            ]
        )
    if not rows:
        return []
    return [
        "## RL diagnostics",
        "",
        "From the training logs, mean over the run folders. Outcome reward: Scenario A accuracy of the "
        "rollouts, mean of the first vs the last 20% of steps, and their difference with a 95% interval "
        "(resampling run folders and steps; * = excludes 0). Final KL: mean of the last 5 steps. "
        "Zero-std groups, DSU fire rate (– where the bonus is off), the bonus's share of the advantages "
        "(sum |U − U without the bonus| / sum |U| over Scenario A; logged since 2026-12-03) and tokens "
        "trained: mean per step; last position: the longest trained row.",
        "",
        md_table(
            [
                "method",
                "n",
                "steps",
                "outcome reward",
                "rise",
                "final KL",
                "zero-std groups",
                "DSU fire rate",
                "bonus share of U",
                "tokens trained / step",
                "last position",
            ],
            rows,
        ),
        "",
    ]


def _num(value, spec):
    return "–" if value is None else format(value, spec)


def share(e):
    """The share of the training questions a checkpoint was trained on (data_fraction; 1 = all)."""
    return e["config"].get("data_fraction", 1.0)


def partial(e):
    """A data-efficiency run: named with its share (<row>_f<percent>). A study whose every row trains
    on one share names them plainly, and they are its main rows."""
    return split_name(e["name"])[1] is not None


def paired_diffs(a, b, splits):
    """(seeds, problems): per-problem correctness of checkpoints a minus b (lists of entries), matched
    by run folder, over the problems of `splits` in data order, each split cut to the problems every
    matched checkpoint has (so seeds scored on more problems still line up); None when no run folder
    has both or no problem is left."""
    by_run = {e["run"]: e for e in b}
    both = [(e, by_run[e["run"]]) for e in a if e["run"] in by_run]
    n = (
        {s: min(len(e["correct"][s]) for pair in both for e in pair) for s in splits}
        if both
        else {}
    )
    rows = [
        [
            int(x) - int(y)
            for s in splits
            for x, y in zip(ea["correct"][s][: n[s]], eb["correct"][s][: n[s]])
        ]
        for ea, eb in both
    ]
    return np.array(rows, dtype=float) if rows and rows[0] else None


def paired_interval(a, b, splits):
    """paired_bootstrap of checkpoints a minus b over the problems of `splits` (paired_diffs); None
    when no run folder has both."""
    diffs = paired_diffs(a, b, splits)
    return None if diffs is None else paired_bootstrap(diffs)


def ci_cell(ci):
    if ci is None:
        return "–"
    mean, lo, hi = (100 * v for v in ci)
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]" + ("" if lo <= 0 <= hi else " *")


def difference_section(methods, order, splits, report_dir):
    """Paired bootstrap CIs of accuracy differences (percentage points), per split and over all of
    them: each method against vanilla SFT and EI-SFT, and the bonus and aux rows against the row
    below them. Pairs are matched by run folder (seed). The all-splits intervals are also drawn."""
    order = [
        m for m in order if not any(partial(e) for e in methods[m])
    ]  # those: "Data efficiency"
    pairs = [
        (m, b) for b in BASELINES if b in order for m in order if m != b and m not in BASELINES[:1]
    ]
    pairs += [p for p in PAIRS if p[0] in order and p[1] in order]
    if not pairs or not all("correct" in e for es in methods.values() for e in es):
        return []
    interval = lambda a, b, chosen: paired_interval(methods[a], methods[b], chosen)
    seeds = lambda a, b: len({e["run"] for e in methods[a]} & {e["run"] for e in methods[b]})
    pooled_ci = {(a, b): interval(a, b, splits) for a, b in pairs}
    rows = [
        [f"{label(a)} − {label(b)}", str(seeds(a, b))]
        + [ci_cell(interval(a, b, [s])) for s in splits]
        + [ci_cell(pooled_ci[a, b])]
        for a, b in pairs
    ]
    drawn = [(f"{label(a)} − {label(b)}", ci) for (a, b), ci in pooled_ci.items() if ci is not None]
    if drawn:
        forest_chart(os.path.join(report_dir, "differences.png"), drawn)
    return [
        "## Paired differences with 95% bootstrap intervals",
        "",
        "Accuracy difference in percentage points, mean over seeds and problems, with a 95% interval "
        "from resampling seeds and problems (paired: same seed, same problems). * = the interval "
        "excludes 0; without it the two rows are not separable at this power.",
        "",
        md_table(["difference", "seeds"] + splits + ["all splits"], rows),
        "",
    ] + (["![paired differences over all splits](differences.png)", ""] if drawn else [])


def forest_chart(path, drawn):
    """One horizontal interval per difference (all splits pooled), top to bottom, a line at 0."""
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.4 * len(drawn) + 1.2)))
    y = np.arange(len(drawn))[::-1]
    means, los, his = (np.array([100 * ci[i] for _, ci in drawn]) for i in range(3))
    ax.errorbar(means, y, xerr=[means - los, his - means], fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(y, [name for name, _ in drawn], fontsize=7)
    ax.set(
        xlabel="accuracy difference over all splits (points; 95% interval)",
        title="Paired differences",
    )
    save(fig, path)


def variance_components(d):
    """d (S seeds, P problems): paired differences y_A[s, p] - y_B[s, p], modelled as two crossed random
    effects without replication, d = mu + a_s + b_p + e_sp: a_s what a seed does to the difference
    (its training run), b_p what a problem does (some are hard for one row only), e_sp the rest. The
    ANOVA (method of moments) estimates, with dbar_s, dbar_p, dbar the seed, problem and grand means:
        MS_S = P sum_s (dbar_s - dbar)^2 / (S - 1)
        MS_P = S sum_p (dbar_p - dbar)^2 / (P - 1)
        MS_E = sum_sp (d_sp - dbar_s - dbar_p + dbar)^2 / ((S - 1)(P - 1))
        var_residual = MS_E, var_seed = max(0, (MS_S - MS_E) / P), var_problem = max(0, (MS_P - MS_E) / S)
    (E[MS_S] = sigma_e^2 + P sigma_s^2, E[MS_P] = sigma_e^2 + S sigma_p^2), in the units of d squared.
    With one seed (or one problem) a component cannot be told from the residual: the variances are None."""
    S, P = d.shape
    out = dict(
        mean=float(d.mean()), seeds=S, problems=P, differ=int((d != 0).sum())
    )  # pairs answered apart
    if S < 2 or P < 2:
        return dict(out, var_seed=None, var_problem=None, var_residual=None)
    grand, by_seed, by_problem = d.mean(), d.mean(axis=1), d.mean(axis=0)
    ms_seed = P * ((by_seed - grand) ** 2).sum() / (S - 1)
    ms_problem = S * ((by_problem - grand) ** 2).sum() / (P - 1)
    ms_residual = ((d - by_seed[:, None] - by_problem[None, :] + grand) ** 2).sum() / (
        (S - 1) * (P - 1)
    )
    return dict(
        out,
        ms_seed=float(ms_seed),
        ms_problem=float(ms_problem),
        ms_residual=float(ms_residual),
        var_seed=max(0.0, float(ms_seed - ms_residual) / P),
        var_problem=max(0.0, float(ms_problem - ms_residual) / S),
        var_residual=float(ms_residual),
    )


def mde(c, seeds, problems):
    """The minimum detectable effect at 80% power and two-sided 5% of a study with `seeds` seeds and
    `problems` problems: (z_0.975 + z_0.80) sqrt(V), V = var_seed/S' + var_problem/P' + var_residual/(S'P')
    the variance of the mean difference. More problems shrink only the last two terms: the seed term
    is a floor that only more seeds lower."""
    v = c["var_seed"] / seeds + c["var_problem"] / problems + c["var_residual"] / (seeds * problems)
    return Z_POWER * v**0.5


def power(d, n_splits):
    """variance_components of d (points) with the MDE now, on a grid of seeds x problems (now, and
    PROBLEMS_GRID per split), and the fewest seeds (2 to 100: one seed cannot estimate its own
    spread) that reach MDE_TARGET with the most problems of the grid (None if none does)."""
    c = variance_components(d)
    if c["var_seed"] is None:
        return c
    problems = list(dict.fromkeys([c["problems"]] + [n * n_splits for n in PROBLEMS_GRID]))
    return dict(
        c,
        mde=mde(c, c["seeds"], c["problems"]),
        grid={s: {p: mde(c, s, p) for p in problems} for s in SEEDS_GRID},
        seeds_for_target=next(
            (s for s in range(2, 101) if mde(c, s, problems[-1]) <= MDE_TARGET), None
        ),
    )


def power_analysis(entries, splits):
    """power of each of COMPARISONS whose two rows were evaluated, on the paired differences (in
    points) of every split's problems pooled, matched as the paired bootstrap matches them."""
    rows = lambda name: [e for e in entries if e["name"] == name]
    if not all("correct" in e for e in entries):
        return {}
    found = {
        (a, b): paired_diffs(rows(a), rows(b), splits)
        for a, b in COMPARISONS
        if rows(a) and rows(b)
    }
    return {
        f"{a} - {b}": power(100 * d, len(splits)) for (a, b), d in found.items() if d is not None
    }


def power_section(analysis):
    """The power table and its MDE grid, one row per comparison of power_analysis."""
    if not analysis:
        return []
    name = lambda key: " − ".join(label(m) for m in key.split(" - "))
    sd = lambda var: f"{var**0.5:.1f}"
    rows, grid, columns = [], [], None
    for key, c in analysis.items():
        if c["var_seed"] is None:
            why = (
                "one seed: the seed component"
                if c["seeds"] < 2
                else "one problem: the problem component"
            )
            rows.append(
                [
                    name(key),
                    f"{c['mean']:+.1f}",
                    f"{c['differ']} / {c['seeds'] * c['problems']}",
                    "–",
                    "–",
                    "–",
                    str(c["seeds"]),
                    str(c["problems"]),
                    f"– ({why} cannot be estimated)",
                    "–",
                ]
            )
            continue
        columns = list(
            next(iter(c["grid"].values()))
        )  # the problem counts of the grid, the same for every row
        rows.append(
            [
                name(key),
                f"{c['mean']:+.1f}",
                f"{c['differ']} / {c['seeds'] * c['problems']}",
                sd(c["var_seed"]),
                sd(c["var_problem"]),
                sd(c["var_residual"]),
                str(c["seeds"]),
                str(c["problems"]),
                f"{c['mde']:.1f}",
                str(c["seeds_for_target"] or "none up to 100"),
            ]
        )
        grid += [
            [name(key), str(s)] + [f"{v:.1f}" for v in by_p.values()]
            for s, by_p in c["grid"].items()
        ]
    target = f"seeds for MDE ≤ {MDE_TARGET:g}" + (f" at P = {columns[-1]}" if columns else "")
    return [
        "## Power: what this study can resolve",
        "",
        "Paired differences d[s, p] in points (same seed, same problem, every split pooled) modelled as "
        "mu + a_s + b_p + e_sp; σ_s, σ_p, σ_e: the spread between seeds, between problems and left over "
        "(ANOVA estimates); pairs answered apart: (seed, problem) pairs where one row is right and the other "
        "wrong. MDE: the smallest true difference found with 80% power at two-sided 5%, "
        f"{Z_POWER:.2f} · sqrt(σ_s²/S + σ_p²/P + σ_e²/(S·P)) for S seeds and P problems; more problems do "
        "not lower the seed term. σ_s rests on S − 1 degrees of freedom: with few seeds the seeds needed "
        "are a rough guide, to be estimated again as seeds are added.",
        "",
        md_table(
            [
                "difference",
                "mean",
                "pairs answered apart",
                "σ_s",
                "σ_p",
                "σ_e",
                "S",
                "P",
                "MDE now",
                target,
            ],
            rows,
        ),
        "",
    ] + (
        [
            "MDE (points) with S seeds and P problems:",
            "",
            md_table(["difference", "S"] + [f"P = {p}" for p in columns], grid),
            "",
        ]
        if grid
        else []
    )


def probe_section(methods, order, report_dir, probe_problems=0):
    """Accuracy on the EI probes of the test_id problems, per rule (in tasks.EI_RULES' order) and pooled."""
    rules = sorted(
        {r for es in methods.values() for e in es for r in e["probes"]},
        key=lambda r: (list(EI_RULES) + [r]).index(r),
    )
    which = (
        f"the first {probe_problems} test_id problems of each world"
        if probe_problems
        else "test_id problems"
    )
    out = [f"## EI-probe accuracy per rule (explanatory consistency, {which})", ""]
    if not rules:
        return out + ["The test_id records hold no EI probes (or test_id was not evaluated).", ""]
    every_rule = lambda e: {(r, w): c for r, cells in e["probes"].items() for w, c in cells.items()}
    ei = {
        m: [spread([pooled(e["probes"].get(r, {})) for e in methods[m]]) for r in rules]
        + [spread([pooled(every_rule(e)) for e in methods[m]])]
        for m in order
    }
    bar_chart(
        os.path.join(report_dir, "ei_probes.png"),
        "Accuracy on the EI probes of test_id problems",
        rules + ["all"],
        {label(m): ei[m] for m in order},
    )
    return out + [
        md_table(
            ["method"] + rules + ["all"], [[label(m)] + [fmt(s) for s in ei[m]] for m in order]
        ),
        "",
        "![EI-probe accuracy per rule](ei_probes.png)",
        "",
    ]


def training_logs(entries, name):
    """The training logs of a method's checkpoints, one per run folder that has one. A row trained
    without the DSU bonus gets no fire rate (logs written before that rule recorded 0 there)."""
    logs = []
    for e in entries:
        path = os.path.join(e["run"], "logs", f"{name}.jsonl")
        if os.path.isfile(path):
            bonus = e.get("config", {}).get("dsu_bonus", True)
            logs.append([r if bonus else dict(r, dsu_fire_rate=None) for r in read_log(path)])
    return logs


def curve_section(methods, order, report_dir):
    """Training curves from every evaluated run's log: SFT and RL logs on separate figures."""
    logs = [(m, log) for m in order for log in training_logs(methods[m], m)]
    out = []
    for name, title, rl, keys in (
        ("curves_sft.png", "SFT training curves", False, SFT_CURVES),
        ("curves_rl.png", "RL training curves", True, RL_CURVES),
    ):
        chosen = [(m, records) for m, records in logs if records and ("reward" in records[0]) == rl]
        if chosen:
            curve_chart(os.path.join(report_dir, name), title, chosen, keys)
            out += [f"![{title}]({name})", ""]
    return ["## Training curves", ""] + out if out else []


def efficiency_section(entries, report_dir):
    """test_id accuracy vs the share of training questions, for each method (family) that was also
    trained on a share < 1: a table, a plot, and paired intervals between the methods at each share.
    Only the run folders (seeds) that hold such runs count, at 100% too, so every point of a line
    comes from the same seeds."""
    runs = {e["run"] for e in entries if partial(e)}
    grid = {}  # family -> share -> entries
    for e in entries:
        if e["run"] in runs and split_acc(e, "test_id") is not None:
            grid.setdefault(family(e["config"]), {}).setdefault(share(e), []).append(e)
    grid = {
        fam: by
        for fam, by in sorted(
            grid.items(), key=lambda kv: FAMILY_ORDER.get(kv[0], len(FAMILY_ORDER))
        )
        if min(by) < 1
    }
    if not grid:
        return []
    shares = sorted({f for by in grid.values() for f in by})
    stats = {
        fam: {f: spread([split_acc(e, "test_id") for e in by[f]]) for f in by}
        for fam, by in grid.items()
    }
    fig, ax = plt.subplots(figsize=(6, 4))
    for fam, st in stats.items():
        xs = sorted(st)
        ax.errorbar(
            xs,
            [100 * st[f][0] for f in xs],
            yerr=[100 * st[f][1] for f in xs],
            marker="o",
            capsize=3,
            label=fam,
        )
    ax.set(
        xscale="log",
        xlabel="share of the training questions",
        ylabel="test_id accuracy (%)",
        title="Data efficiency (mean ± std over seeds)",
        ylim=(0, 105),
    )
    ax.set_xticks(shares, [f"{100 * f:g}%" for f in shares])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    save(fig, os.path.join(report_dir, "data_efficiency.png"))
    head = ["method"] + [f"{100 * f:g}%" for f in shares]
    rows = [
        [fam] + [f"{fmt(st[f])} (n={st[f][2]})" if f in st else "–" for f in shares]
        for fam, st in stats.items()
    ]
    fams = list(grid)
    diffs = [
        [f"{a} − {b}"]
        + [
            ci_cell(paired_interval(grid[a][f], grid[b][f], ["test_id"]))
            if f in grid[a] and f in grid[b]
            else "–"
            for f in shares
        ]
        for i, b in enumerate(fams)
        for a in fams[i + 1 :]
    ]
    return (
        [
            "## Data efficiency",
            "",
            f"test_id accuracy (%) by share of the training questions, run folders "
            f"{', '.join(sorted(runs))} only; n = seeds.",
            "",
            md_table(head, rows),
            "",
        ]
        + (
            [
                "Paired differences on test_id (points, 95% bootstrap interval over seeds and problems; * = "
                "the interval excludes 0).",
                "",
                md_table(["difference"] + head[1:], diffs),
                "",
            ]
            if diffs
            else []
        )
        + ["![test_id accuracy vs share of training questions](data_efficiency.png)", ""]
    )


def linear_probe_section(runs, report_dir):
    """probe.py's results found in the run folders: test accuracy per layer of each checkpoint's linear
    probe (shuffled-label control in brackets) and its selectivity against the control task, as the
    mean ± sample std over the folders, and the causal test's flip rates (mean). The first folder's
    figures are copied beside the report."""
    found = {}
    for run in runs:
        for path in sorted(glob.glob(os.path.join(run, "probe", "probe_*.json"))):
            found.setdefault(os.path.basename(path), []).append(path)
    if not found:
        return []
    out = [
        "## Linear probes on hidden states",
        "",
        "Test accuracy of a logistic-regression probe per layer (0 = embeddings), the shuffled-label "
        "control in brackets; selectivity = probe accuracy - accuracy on the control task (each token "
        "type, e.g. the event's actor, gets a fixed random label), control-task accuracy in brackets: "
        "near 0 means the probe could score as well by memorising which token it sits on. Flip rate: "
        "share of test problems whose greedy answer becomes the one the other state implies after "
        "adding alpha class-mean gaps toward it at the last event's token (random: the same norm along "
        "a random direction; alpha = 0: no edit). Mean ± sample std over run folders (probe.py).",
        "",
    ]
    for name, paths in found.items():
        results = [json.load(open(p)) for p in paths]
        first = results[0]
        values = lambda label, key, *at: [_at(r["checkpoints"][label][key], at) for r in results]
        mean = lambda label, key, *at: statistics.mean(values(label, key, *at))

        def cell(
            label, key, layer, sign=""
        ):  # mean ± std over the folders, then the control's mean
            m, sd, n = spread(values(label, key, layer))
            control = "control_acc" if key == "lr_acc" else "control_task_acc"
            return f"{m:{sign}.2f}{f' ± {sd:.2f}' if n > 1 else ''} ({mean(label, control, layer):.2f})"

        n_layers = len(next(iter(first["checkpoints"].values()))["lr_acc"])
        layers = [f"layer {l}" for l in range(n_layers)]
        majority = statistics.mean(r["majority_acc"] for r in results)
        out += [
            f"**{first['world']}**, target {first['target']} at {first['positions']} positions "
            f"({first['latent']}; majority baseline {majority:.2f}, n = {len(results)})",
            "",
        ]
        out += [
            md_table(
                ["checkpoint"] + layers,
                [
                    [label] + [cell(label, "lr_acc", l) for l in range(n_layers)]
                    for label in first["checkpoints"]
                ],
            )
        ]
        if all("selectivity" in c for r in results for c in r["checkpoints"].values()):
            out += [
                "",
                "Selectivity (control-task accuracy):",
                "",
                md_table(
                    ["checkpoint"] + layers,
                    [
                        [label] + [cell(label, "selectivity", l, "+") for l in range(n_layers)]
                        for label in first["checkpoints"]
                    ],
                ),
            ]
        figures = [paths[0][:-5] + ".png"] + (
            [paths[0][:-5] + "_intervention.png"] if "intervention" in first else []
        )
        for fig in filter(os.path.exists, figures):
            shutil.copyfile(fig, os.path.join(report_dir, os.path.basename(fig)))
        where = (
            f" (run folder {os.path.dirname(os.path.dirname(paths[0]))})" if len(paths) > 1 else ""
        )
        out += ["", f"![{name}{where}]({os.path.basename(figures[0])})", ""]
        if all("intervention" in r for r in results):
            out += intervention_table(first, mean) + [
                f"![{name} flip rates{where}]({os.path.basename(figures[1])})",
                "",
            ]
    return out


def _at(value, index):
    """value[i][j]... for index (i, j, ...)."""
    for i in index:
        value = value[i]
    return value


def intervention_table(first, mean):
    plan = first["intervention"]
    rows = [
        [label, str(layer)]
        + [
            f"{mean(label, 'intervention', 'toward', j, a):.2f} / "
            f"{mean(label, 'intervention', 'random', j, a):.2f}"
            for a in range(len(plan["alphas"]))
        ]
        for label in first["checkpoints"]
        for j, layer in enumerate(plan["layers"])
    ]
    return [
        f"Flip rate toward the other state / along a random direction ({plan['problems']} test problems):",
        "",
        md_table(["checkpoint", "layer"] + [f"alpha {a:g}" for a in plan["alphas"]], rows),
        "",
    ]


def write_report(cfg, runs, splits, entries, report_dir, analysis):
    methods = {}
    for e in entries:
        methods.setdefault(e["name"], []).append(e)
    order = sorted(methods, key=row_key)
    totals = {
        s: sorted({sum(t for _, t in e["acc"].get(s, {}).values()) for e in entries})
        for s in splits
    }
    seeds = sorted({str(e["config"]["seed"]) for e in entries if "seed" in e["config"]})
    header = (
        f"{len(entries)} checkpoint(s) from {len(runs)} run folder(s) ({', '.join(runs)})"
        + (f", seed(s) {', '.join(seeds)}" if seeds else "")
        + f". Greedy single-turn answers of at most {cfg.max_new_tokens} new tokens. Problems per run folder: "
        + ", ".join(f"{s} {'/'.join(map(str, totals[s]))}" for s in splits)
        + ". Cells: accuracy in % (mean ± sample std over the n run folders when n > 1); a split pools "
        "its worlds; mean = the mean over the splits."
    )
    if (
        len(seeds) <= 1
    ):  # one training run per row: no spread over seeds, no interval that speaks for the method
        header += (
            " **One seed: a demonstration of the pipeline, not a result.** A study over seeds (the README's "
            "reproduction studies) is what can tell the rows apart."
        )
    out = (
        ["# Evaluation report", "", header, ""]
        + accuracy_sections(methods, order, splits, report_dir)
        + difference_section(methods, order, splits, report_dir)
        + power_section(analysis)
        + rl_section(methods, order)
        + probe_section(methods, order, report_dir, cfg.probe_problems)
        + linear_probe_section(runs, report_dir)
        + curve_section(methods, order, report_dir)
        + efficiency_section(entries, report_dir)
    )
    atomic_write(os.path.join(report_dir, "report.md"), "\n".join(out))


def read_results(path, settings):
    """The entries of an earlier results.json made with the same settings ({} otherwise)."""
    if not os.path.isfile(path):
        return {}
    try:
        saved = json.load(open(path, encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(
            f"{path} is not valid JSON ({e}): delete it, or run without --reuse"
        ) from None
    return saved.get("checkpoints", {}) if saved.get("settings") == settings else {}


def saved_entries(folders):
    """(entries, splits, max_new_tokens) from folders that each hold a results.json and the logs of
    its run: every entry's run becomes its folder, so the RL sections read the logs there."""
    entries, settings = [], []
    for folder in folders:
        path = os.path.join(folder, "results.json")
        if not os.path.isfile(path):
            raise SystemExit(
                f"{path} does not exist: --from_results takes folders of saved results"
            )
        saved = json.load(open(path, encoding="utf-8"))
        settings.append(saved["settings"])
        entries += [dict(e, run=folder) for e in saved["checkpoints"].values()]
    if any(s["splits"] != settings[0]["splits"] for s in settings):
        raise SystemExit(
            "--from_results: the folders were scored on different splits; pass folders of one study"
        )
    return entries, settings[0]["splits"], settings[0]["max_new_tokens"]


def scored_entries(cfg, results_path):
    """(runs, splits, entries, settings): every checkpoint of the run folders scored, or taken from
    an earlier results_path with --reuse while its checkpoint, data and settings are unchanged."""
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    runs = [r for r in cfg.runs.split(",") if r] or [cfg.out_dir]
    found = find_checkpoints(cfg, runs)
    splits = [s for s in cfg.splits.split(",") if s] or default_splits(runs)
    worlds = [w for w in cfg.worlds.split(",") if w]
    data = {
        run: load_data(run, splits, worlds, cfg.max_problems)
        for run in dict.fromkeys(r for r, _, _ in found)
    }
    settings = dict(
        splits=splits,
        worlds=worlds,
        max_problems=cfg.max_problems,
        probe_problems=cfg.probe_problems,
        max_new_tokens=cfg.max_new_tokens,
    )
    cached = read_results(results_path, settings) if cfg.reuse else {}
    entries = []
    for run, name, path in found:
        now, entry = stamp(path, run, splits), cached.get(path)
        if entry is None or entry["stamp"] != now:
            entry = dict(evaluate_checkpoint(path, run, data[run], cfg, device), stamp=now)
        entries.append(dict(entry, name=name))
    return runs, splits, entries, settings


def main(argv):
    cfg = parse_config(Config(), argv, LIMITS)
    report_dir = os.path.join(cfg.out_dir, "report")
    results_path = os.path.join(report_dir, "results.json")
    if cfg.from_results:  # a study's committed seeds: the report without checkpoints or models
        runs = [f for f in cfg.from_results.split(",") if f]
        entries, splits, cfg.max_new_tokens = saved_entries(runs)
        saved = {"from_results": runs}
    else:
        runs, splits, entries, settings = scored_entries(cfg, results_path)
        saved = {"settings": settings}
    os.makedirs(report_dir, exist_ok=True)
    analysis = power_analysis(entries, splits)
    atomic_write(
        results_path,
        json.dumps(
            {**saved, "checkpoints": {e["path"]: e for e in entries}, "power": analysis}, indent=1
        ),
    )
    write_report(cfg, runs, splits, entries, report_dir, analysis)
    print(
        f"wrote {os.path.join(report_dir, 'report.md')} ({len(entries)} checkpoints from {len(runs)} folder(s))"
    )


if __name__ == "__main__":
    cli(main)
