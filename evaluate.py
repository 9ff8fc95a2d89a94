"""
Evaluation and the report. For each checkpoint: greedy single-turn accuracy on test_id and on every
OOD split, per world; accuracy on the EI probes of the test_id problems, per rule (explanatory
consistency: does the student answer the questions that explain its own answers?). Then tables with
the mean ± std over seeds, bar charts, training curves from the logs and, when runs with
data_fraction < 1 exist, a data-efficiency plot; paired bootstrap intervals for the differences
between rows and, for the comparisons that count, what the study can resolve (variance components
over seeds and problems, the minimum detectable effect), computed by stats.py. Inference is
single-turn, as in the paper: the student sees the question alone, no probes in context.

    python evaluate.py --out_dir=out/default                # every checkpoint in out/default/ckpt
    python evaluate.py --runs=out/s1,out/s2 --out_dir=out/seeds   # one run folder per seed
    python evaluate.py --out_dir=out/default --reuse=True   # redraw from results.json
    python evaluate.py --from_results=results/rl_study/seed1,results/rl_study/seed2 --out_dir=out/x

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
from dataclasses import asdict, dataclass, replace

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from configurator import atomic_write, cli, parse_config, pick_device, set_threads
from model import load_model
from stats import MDE_TARGET, Z_POWER, paired_diffs, paired_interval, power, rise, spread
from tasks import EI_RULES, greedy_answers, is_correct, read_split
from training import read_log


@dataclass
class Config:
    out_dir: str = "out/default"  # run folder; the report goes to out_dir/report
    runs: str = ""  # comma-separated run folders (one per seed) to aggregate; default out_dir
    # comma-separated names (looked up in every run) or .pt paths (on out_dir's data)
    ckpts: str = ""
    splits: str = ""  # comma-separated; default every test split in the data (test_id, ood_*)
    worlds: str = ""  # comma-separated; default every world in the data
    max_problems: int = 0  # per world and split; 0 = all
    # score the EI probes of the first n test_id problems per world; 0 = all
    probe_problems: int = 0
    max_new_tokens: int = 96  # ood_long rationales reach ~90 GPT-2 tokens
    batch_size: int = 128
    # keep results.json entries whose checkpoint file and settings are unchanged
    reuse: bool = False
    # comma-separated folders of saved results (results.json + logs/, one per seed, as a study
    # commits them): the report from those, no checkpoint needed
    from_results: str = ""
    # committed results.json of multi-seed studies: the report sets its differences beside theirs
    studies: str = ""
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
# baselines (vanilla SFT, the first, is never the row on the left), and the DSU bonus and the aux
# loss on their own
BASELINES = ("sft_qa", "sft_ei")
PAIRS = (("rl_exgrpo", "rl_exgrpo_nobonus"), ("rl_exgrpo_nobonus", "rl_exgrpo_plain"))
# the comparisons whose power the report states (results/README.md, "The RL study"): the whole
# method against its SFT student, the DSU bonus on its own, and the whole method against plain SFT
COMPARISONS = (("rl_exgrpo", "sft_ei"), ("rl_exgrpo", "rl_exgrpo_nobonus"), ("rl_exgrpo", "sft_qa"))
# the RL study's stopping rule (results/README.md): at least MIN_SEEDS seeds, and both of these
# comparisons resolved to an MDE of MDE_TARGET points, or MAX_SEEDS seeds
MIN_SEEDS, MAX_SEEDS = 5, 20
COUNTED = (("rl_exgrpo", "sft_ei"), ("rl_exgrpo", "rl_exgrpo_nobonus"))
SFT_CURVES = ("val_loss", "val_acc")
RL_CURVES = ("reward", "acc_full", "kl", "frac_zero_std", "dsu_fire_rate")
# the data-efficiency lines, baselines first
FAMILY_ORDER = {"vanilla SFT": 0, "EI-SFT": 1, "EXGRPO": 2}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint to score: the run folder whose data it is scored on, its method name and its
    file."""

    run: str
    name: str
    path: str


@dataclass
class Settings:
    """What the checkpoints were scored on and how. results.json keeps them, and --reuse trusts a
    saved entry only under the same settings."""

    splits: list
    worlds: list
    max_problems: int
    probe_problems: int
    max_new_tokens: int


@dataclass
class Entry:
    """One scored checkpoint, as results.json keeps it. acc: [correct, total] per split and world;
    probes: [correct, total] per EI rule and world; correct: each problem's correctness per split,
    in data order ("0110..."); stamp: the modification times it was scored at (see stamp)."""

    run: str
    path: str
    step: int
    config: dict  # the training Config the checkpoint was saved with
    acc: dict
    probes: dict
    correct: dict
    stamp: list
    name: str


@dataclass
class Job:
    """One greedy answer to score: a test problem (its split and its index there) or an EI probe
    (its rule)."""

    question: str
    gold: str
    world: str
    split: str | None = None
    index: int | None = None
    rule: str | None = None


@dataclass
class Scores:
    """What the report is drawn from: the run folders, one entry per checkpoint, and the settings
    they were scored with."""

    runs: list
    entries: list
    settings: Settings


# ---- scoring checkpoints ----


def find_checkpoints(cfg, runs):
    """The Checkpoints named in --ckpts (names looked up in every run folder, or .pt paths), or
    every ckpt/*.pt of the run folders."""
    found = []
    for c in [c for c in cfg.ckpts.split(",") if c] or [None]:
        if c and c.endswith(".pt"):
            if not os.path.isfile(c):
                raise SystemExit(f"checkpoint {c} does not exist")
            found.append(Checkpoint(cfg.out_dir, os.path.basename(c)[:-3], c))
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
        found += [
            Checkpoint(os.path.dirname(os.path.dirname(p)), os.path.basename(p)[:-3], p)
            for p in paths
        ]
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
            f"{os.path.join(trained_only[0], 'data')} has no test split: give some records of "
            'your JSONL "split": "test_id" and rerun invert.py, or name --splits '
            "(e.g. --splits=val)"
        )
    return splits or ["test_id"]


def load_data(run, splits, worlds, max_problems):
    """{split: records} of one run folder, restricted to the chosen worlds, the first max_problems
    of each world (the JSONL order is the generator's, so this is the same subset every time). A
    world or split that matches nothing stops: a report is never replaced by an empty one."""
    data = {}
    for split in splits:
        every = read_split(os.path.join(run, "data"), split)
        path = os.path.join(run, "data", f"{split}.jsonl")
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


def evaluate_checkpoint(ckpt, data, cfg, device, mtimes):
    """The Entry of a Checkpoint: its greedy answers to every problem of data ({split: records})
    and to the EI probes of the first cfg.probe_problems test_id problems per world, counted;
    mtimes: its stamp."""
    model, tok, saved = load_model(ckpt.path, device)
    jobs = [
        Job(r["question"], r["answer"], r["world"], split=split, index=i)
        for split, recs in data.items()
        for i, r in enumerate(recs)
    ]
    jobs += [
        Job(p["question"], p["answer"], r["world"], rule=p["rule"])
        for r in first_per_world(data.get("test_id", []), cfg.probe_problems)
        for p in r.get("probes", [])
    ]
    # similar lengths share a batch: less left padding to compute
    jobs.sort(key=lambda job: len(job.question))
    bs, texts = cfg.batch_size, []
    try:
        for i in tqdm(range(0, len(jobs), bs), desc=f"eval {ckpt.path}"):
            questions = [job.question for job in jobs[i : i + bs]]
            texts += greedy_answers(model, tok, questions, cfg.max_new_tokens, bs)
    except ValueError as e:
        # a token outside a compact vocabulary, or a prompt longer than block_size
        raise SystemExit(
            f"checkpoint {ckpt.path} cannot be evaluated on {os.path.join(ckpt.run, 'data')}: {e}"
        ) from None
    acc, probes = {split: {} for split in data}, {}
    correct = {split: ["0"] * len(recs) for split, recs in data.items()}
    for job, text in zip(jobs, texts):
        # given the question, a swap world's option may be named by letter
        right = int(is_correct(job.world, text, job.gold, job.question))
        counts = acc[job.split] if job.rule is None else probes.setdefault(job.rule, {})
        cell = counts.setdefault(job.world, [0, 0])
        cell[0] += right
        cell[1] += 1
        if job.rule is None:
            correct[job.split][job.index] = str(right)
    return Entry(
        run=ckpt.run,
        path=ckpt.path,
        step=saved["step"],
        config=saved["extra"].get("config", {}),
        acc=acc,
        probes=probes,
        correct={split: "".join(c) for split, c in correct.items()},
        stamp=mtimes,
        name=ckpt.name,
    )


def stamp(path, run, splits):
    """Modification times of a checkpoint and of the data it is scored on: --reuse trusts a cached
    entry only while both are unchanged (a retrained model, a regenerated dataset)."""
    files = [path] + [os.path.join(run, "data", f"{s}.jsonl") for s in splits]
    return [os.path.getmtime(f) if os.path.isfile(f) else None for f in files]


def read_results(path, settings):
    """{path: Entry} of an earlier results.json made with the same Settings ({} otherwise)."""
    if not os.path.isfile(path):
        return {}
    try:
        saved = json.load(open(path, encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(
            f"{path} is not valid JSON ({e}): delete it, or run without --reuse"
        ) from None
    if saved.get("settings") != asdict(settings):
        return {}
    return {path: Entry(**e) for path, e in saved["checkpoints"].items()}


def scored(cfg, results_path):
    """The Scores of every checkpoint of the run folders, each scored now or taken from an earlier
    results_path with --reuse while its checkpoint, data and settings are unchanged."""
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    runs = [r for r in cfg.runs.split(",") if r] or [cfg.out_dir]
    found = find_checkpoints(cfg, runs)
    splits = [s for s in cfg.splits.split(",") if s] or default_splits(runs)
    worlds = [w for w in cfg.worlds.split(",") if w]
    data = {
        run: load_data(run, splits, worlds, cfg.max_problems)
        for run in dict.fromkeys(c.run for c in found)
    }
    settings = Settings(splits, worlds, cfg.max_problems, cfg.probe_problems, cfg.max_new_tokens)
    cached = read_results(results_path, settings) if cfg.reuse else {}
    entries = []
    for ckpt in found:
        now, entry = stamp(ckpt.path, ckpt.run, splits), cached.get(ckpt.path)
        if entry is None or entry.stamp != now:
            entry = evaluate_checkpoint(ckpt, data[ckpt.run], cfg, device, now)
        entries.append(entry)
    return Scores(runs, entries, settings)


def saved_scores(folders):
    """The Scores saved in folders that each hold a results.json and the logs of its run (a
    study's committed seeds): every entry's run becomes its folder, so the RL sections read the
    logs there."""
    entries, settings = [], []
    for folder in folders:
        path = os.path.join(folder, "results.json")
        if not os.path.isfile(path):
            raise SystemExit(
                f"{path} does not exist: --from_results takes folders of saved results"
            )
        saved = json.load(open(path, encoding="utf-8"))
        settings.append(Settings(**saved["settings"]))
        entries += [replace(Entry(**e), run=folder) for e in saved["checkpoints"].values()]
    if any(s.splits != settings[0].splits for s in settings):
        raise SystemExit(
            "--from_results: the folders were scored on different splits; pass folders of one study"
        )
    return Scores(folders, entries, settings[0])


# ---- the report ----


def pooled(cells):
    """Accuracy over {world: [correct, total]}; None when there are no problems."""
    n = sum(t for _, t in cells.values())
    return sum(c for c, _ in cells.values()) / n if n else None


def split_acc(e, split, world=None):
    """One checkpoint's accuracy on a split, pooled over its worlds or for one world."""
    return pooled({w: c for w, c in e.acc.get(split, {}).items() if world in (None, w)})


def answers(entries):
    """{run folder: {split: per-problem correctness}}: a row's answers as stats.paired_diffs
    pairs them."""
    return {e.run: e.correct for e in entries}


def fmt(s):
    """A Spread in %, ± the std when over more than one seed; – for none."""
    if s is None:
        return "–"
    return f"{100 * s.mean:.1f}" + (f" ± {100 * s.std:.1f}" if s.n > 1 else "")


def ci_cell(ci):
    """An Interval in points, * when it excludes 0; – for none."""
    if ci is None:
        return "–"
    mean, lo, hi = (100 * v for v in (ci.mean, ci.lo, ci.hi))
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]" + (" *" if ci.excludes_zero() else "")


def _num(value, spec):
    return "–" if value is None else format(value, spec)


def md_table(header, rows):
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(row) + " |" for row in rows]
    )


@dataclass(frozen=True)
class RowName:
    """A checkpoint name read as a row of the report: the study's data-efficiency rows are named
    <row>_f<percent> (sft_qa_f10 is sft_qa on 10% of the data); any other name is its own row."""

    row: str
    percent: str | None


def row_name(name):
    row, percent = re.fullmatch(r"(.*?)(?:_f(\d+))?", name).groups()
    return RowName(row, percent) if row in LABELS else RowName(name, None)


def label(name):
    n = row_name(name)
    if n.row not in LABELS:
        return name
    return f"{LABELS[n.row]}{f', {n.percent}% of the data' if n.percent else ''} ({name})"


def row_key(name):
    """Report order: the rows of LABELS as listed, each followed by its data-efficiency rows by
    share, then the other names alphabetically."""
    n = row_name(name)
    if n.row in LABELS:
        return (list(LABELS).index(n.row), 0, int(n.percent or 0))
    return (len(LABELS), 1, name)


def share(e):
    """The share of the training questions a checkpoint was trained on (data_fraction; 1 = all)."""
    return e.config.get("data_fraction", 1.0)


def partial(e):
    """A data-efficiency run: named with its share (<row>_f<percent>). A study whose every row
    trains on one share names them plainly, and they are its main rows."""
    return row_name(e.name).percent is not None


def family(c):
    """The data-efficiency plot's line for a run config: the method regardless of data_fraction."""
    if c.get("stage") == "sft":
        return "EI-SFT" if c.get("data") == "ei" else "vanilla SFT"
    name = c.get("algo", "rl").upper()
    if c.get("algo") == "exgrpo" and not c.get("dsu_bonus", True):
        name += " w/o DSU bonus" + (" or aux loss" if c.get("aux_coef", 1) == 0 else "")
    # RL from the base model, not from an SFT student
    return name + ("" if str(c.get("init", "")).endswith(".pt") else " cold start")


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise


def bar_chart(path, title, groups, series):
    """groups along x, one bar per method in each (series: {method: [Spread per group]}),
    error bars = std over seeds."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(series)) ** 0.5), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, spreads) in enumerate(series.items()):
        x = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        ax.bar(
            x,
            [100 * s.mean if s else np.nan for s in spreads],
            width,
            label=name,
            yerr=[100 * s.std if s and s.n > 1 else np.nan for s in spreads],
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
    """One panel per logged metric vs step, one line per method (logs: {method: [one log per run
    folder]}): the mean over its runs at each step, smoothed by a moving average over about a
    fifteenth of the steps (RL steps are noisy)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (method, runs) in enumerate(logs.items()):
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


def forest_chart(path, drawn):
    """One horizontal Interval per difference (drawn: {name: Interval}, all splits pooled), top to
    bottom, a line at 0."""
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.4 * len(drawn) + 1.2)))
    y = np.arange(len(drawn))[::-1]
    means = np.array([100 * ci.mean for ci in drawn.values()])
    los = np.array([100 * ci.lo for ci in drawn.values()])
    his = np.array([100 * ci.hi for ci in drawn.values()])
    ax.errorbar(means, y, xerr=[means - los, his - means], fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(y, list(drawn), fontsize=7)
    ax.set(
        xlabel="accuracy difference over all splits (points; 95% interval)",
        title="Paired differences",
    )
    save(fig, path)


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
        {w for es in methods.values() for e in es for s in splits for w in e.acc.get(s, {})}
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


def report_pairs(order):
    """The (a, b) pairs whose difference a − b the report gives: every row against both SFT
    baselines, then the bonus and the aux loss on their own."""
    pairs = [(m, b) for b in BASELINES if b in order for m in order if m not in (b, BASELINES[0])]
    return pairs + [(a, b) for a, b in PAIRS if a in order and b in order]


def difference_section(methods, order, splits, report_dir):
    """Paired bootstrap CIs of accuracy differences (percentage points), per split and over all of
    them: each method against vanilla SFT and EI-SFT, and the bonus and aux rows against the row
    below them. Pairs are matched by run folder (seed). The all-splits intervals are also drawn."""
    # the data-efficiency rows have their own section
    order = [m for m in order if not any(partial(e) for e in methods[m])]
    pairs = report_pairs(order)
    if not pairs:
        return []
    answered = {m: answers(methods[m]) for m in order}
    interval = lambda a, b, chosen: paired_interval(answered[a], answered[b], chosen)
    seeds = lambda a, b: len({e.run for e in methods[a]} & {e.run for e in methods[b]})
    pooled_ci = {(a, b): interval(a, b, splits) for a, b in pairs}
    rows = [
        [f"{label(a)} − {label(b)}", str(seeds(a, b))]
        + [ci_cell(interval(a, b, [s])) for s in splits]
        + [ci_cell(pooled_ci[a, b])]
        for a, b in pairs
    ]
    drawn = {f"{label(a)} − {label(b)}": ci for (a, b), ci in pooled_ci.items() if ci is not None}
    if drawn:
        forest_chart(os.path.join(report_dir, "differences.png"), drawn)
    return [
        "## Paired differences with 95% bootstrap intervals",
        "",
        "Accuracy difference in percentage points, mean over seeds and problems, with a 95% "
        "interval from resampling seeds and problems (paired: same seed, same problems). * = the "
        "interval excludes 0; without it the two rows are not separable at this power.",
        "",
        md_table(["difference", "seeds"] + splits + ["all splits"], rows),
        "",
    ] + (["![paired differences over all splits](differences.png)", ""] if drawn else [])


def power_analysis(entries, splits):
    """{(a, b): stats.Power} for each of COMPARISONS whose two rows were evaluated, on the paired
    differences (in points) of every split's problems pooled, matched as the paired bootstrap
    matches them."""
    row = lambda name: answers([e for e in entries if e.name == name])
    found = {
        (a, b): paired_diffs(row(a), row(b), splits) for a, b in COMPARISONS if row(a) and row(b)
    }
    return {pair: power(100 * d, len(splits)) for pair, d in found.items() if d is not None}


def power_section(analysis):
    """The power table and its MDE grid, one row per comparison of power_analysis."""
    if not analysis:
        return []
    sd = lambda var: f"{var**0.5:.1f}"
    rows, grid, columns = [], [], None
    for (a, b), c in analysis.items():
        name = f"{label(a)} − {label(b)}"
        if c.var_seed is None:
            why = "one seed: the seed" if c.seeds < 2 else "one problem: the problem"
            untold = f"– ({why} component cannot be estimated)"
            rows.append(
                [name, f"{c.mean:+.1f}", f"{c.differ} / {c.seeds * c.problems}"]
                + ["–"] * 3
                + [str(c.seeds), str(c.problems), untold, "–"]
            )
            continue
        # the problem counts of the grid, the same for every row
        columns = list(next(iter(c.grid.values())))
        rows.append(
            [
                name,
                f"{c.mean:+.1f}",
                f"{c.differ} / {c.seeds * c.problems}",
                sd(c.var_seed),
                sd(c.var_problem),
                sd(c.var_residual),
                str(c.seeds),
                str(c.problems),
                f"{c.mde:.1f}",
                str(c.seeds_for_target or "none up to 100"),
            ]
        )
        grid += [[name, str(s)] + [f"{v:.1f}" for v in by_p.values()] for s, by_p in c.grid.items()]
    target = f"seeds for MDE ≤ {MDE_TARGET:g}" + (f" at P = {columns[-1]}" if columns else "")
    header = ["difference", "mean", "pairs answered apart", "σ_s", "σ_p", "σ_e", "S", "P"]
    return [
        "## Power: what this study can resolve",
        "",
        "Paired differences d[s, p] in points (same seed, same problem, every split pooled) "
        "modelled as mu + a_s + b_p + e_sp; σ_s, σ_p, σ_e: the spread between seeds, between "
        "problems and left over (ANOVA estimates); pairs answered apart: (seed, problem) pairs "
        "where one row is right and the other wrong. MDE: the smallest true difference found with "
        f"80% power at two-sided 5%, {Z_POWER:.2f} · sqrt(σ_s²/S + σ_p²/P + σ_e²/(S·P)) "
        "for S seeds and P problems; more problems do not lower the seed term. σ_s rests on "
        "S − 1 degrees of freedom: with few seeds the seeds needed are a rough guide, to be "
        "estimated again as seeds are added.",
        "",
        md_table(header + ["MDE now", target], rows),
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


def interim(saved):
    """Whether a committed study is still short of its stopping rule. Only the RL study has one
    (its results.json has a power section); the first study's five seeds were fixed in advance."""
    if "power" not in saved:
        return False
    seeds = len({e["run"] for e in saved["checkpoints"].values()})
    rows = [saved["power"].get(f"{a} - {b}", {}) for a, b in COUNTED]
    small = all(r.get("mde") is not None and r["mde"] <= MDE_TARGET for r in rows)
    return seeds < MAX_SEEDS and not (seeds >= MIN_SEEDS and small)


def study_reading(mine, theirs, unfinished):
    """What a study's interval says of this report's difference of the same two rows."""
    if unfinished:
        return "interim: the study has not reached its stopping rule"
    if not theirs.excludes_zero():
        return "the study finds them not separable"
    if not mine.excludes_zero():
        return "inside the noise here; the study resolves it"
    if (mine.mean > 0) != (theirs.mean > 0):
        return "**the study resolves it the other way**"
    return "**confirmed** by the study"


def studies_section(methods, order, splits, paths, report_dir):
    """This report's differences over all splits beside the same two rows' difference in committed
    multi-seed studies (their results.json), where a study trained both rows on the same share of
    the training questions (its data-efficiency rows count: sft_ei_f10 is sft_ei at 10%). The
    study's interval pools every split it scored both rows on; its results.json is linked from
    the report."""
    rows = []
    mine = {m: answers(methods[m]) for m in order}
    studies = {}
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"--studies: {path} does not exist (a study's committed results.json)")
        saved = json.load(open(path, encoding="utf-8"))
        studies[path] = ([Entry(**e) for e in saved["checkpoints"].values()], interim(saved))
    for a, b in report_pairs(order):
        ci = paired_interval(mine[a], mine[b], splits)
        at = share(methods[a][0])
        for path, (entries, unfinished) in studies.items():
            row = lambda name: [
                e for e in entries if row_name(e.name).row == name and share(e) == at
            ]
            if ci is None or not row(a) or not row(b):
                continue  # no pair here, or none in this study at this share
            # in the study's own split order, so that its interval is the one its report gives
            scored = [s for s in row(a)[0].correct if all(s in e.correct for e in row(a) + row(b))]
            theirs = paired_interval(answers(row(a)), answers(row(b)), scored)
            if theirs is None:
                continue
            seeds = len({e.run for e in row(a)} & {e.run for e in row(b)})
            where = "every split" if set(scored) == set(splits) else ", ".join(scored)
            # the studies' RL budgets differ from a main job's: say which one the study ran
            c = row(a)[0].config
            budget = (
                f", {c['rl_steps']} RL steps of {c['rl_batch_size']}" if c["stage"] == "rl" else ""
            )
            link = os.path.relpath(path, report_dir)  # from the report to the committed file
            rows.append(
                [
                    f"{label(a)} − {label(b)}",
                    ci_cell(ci),
                    f"[{path}]({link}): {seeds} seeds, {where}{budget}",
                    ci_cell(theirs),
                    study_reading(ci, theirs, unfinished),
                ]
            )
    if not rows:
        return []
    header = ["difference", "this report", "study: seeds, splits", "in the study", "reading"]
    return [
        "## What the multi-seed studies say of these differences",
        "",
        "Each difference over all splits, in points with its 95% paired interval, beside the same "
        "two rows trained on the same share of the questions in the project's committed studies "
        "(results/README.md). One seed can rank rows by chance: a difference is confirmed only "
        "where a study resolves it with the same sign. The studies' RL rows trained longer than a "
        "main job's.",
        "",
        md_table(header, rows),
        "",
    ]


def training_logs(entries, name):
    """The training logs of a method's checkpoints, one per run folder that has one. A row trained
    without the DSU bonus gets no fire rate (logs written before that rule recorded 0 there)."""
    logs = []
    for e in entries:
        path = os.path.join(e.run, "logs", f"{name}.jsonl")
        if os.path.isfile(path):
            bonus = e.config.get("dsu_bonus", True)
            logs.append([r if bonus else dict(r, dsu_fire_rate=None) for r in read_log(path)])
    return logs


def rl_section(methods, order):
    """The diagnostics reported beside the accuracies, from each RL row's training logs (mean over
    its run folders): did the outcome reward rise, how far the policy moved from the reference, how
    many groups carried no signal, how often the DSU bonus fired, what was trained."""
    rows = []
    for m in order:
        # the steps that logged rollouts (Scenario A accuracy); an SFT log has none
        logs = [[r for r in log if "acc_full" in r] for log in training_logs(methods[m], m)]
        logs = [log for log in logs if log]
        if not logs:
            continue

        # over every logged step of every run folder, or a slice of each
        def mean(key, steps=slice(None)):
            values = [r[key] for log in logs for r in log[steps] if r.get(key) is not None]
            return statistics.mean(values) if values else None

        up = rise([[r["acc_full"] for r in log] for log in logs])
        ci = up.change
        last_position = max(
            (r["max_position"] for log in logs for r in log if "max_position" in r), default=None
        )
        rows.append(
            [
                label(m),
                str(len(logs)),
                str(max(map(len, logs))),
                f"{up.first:.3f} → {up.last:.3f}",
                f"{ci.mean:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}]"
                + (" *" if ci.excludes_zero() else ""),
                _num(mean("kl", slice(-5, None)), ".4f"),
                _num(mean("frac_zero_std"), ".2f"),
                _num(mean("dsu_fire_rate"), ".2f"),
                _num(mean("adv_bonus_share"), ".3f"),
                _num(mean("tokens_trained"), ".0f"),
                _num(last_position, "d"),
            ]
        )
    if not rows:
        return []
    header = ["method", "n", "steps", "outcome reward", "rise", "final KL", "zero-std groups"]
    header += ["DSU fire rate", "bonus share of U", "tokens trained / step", "last position"]
    return [
        "## RL diagnostics",
        "",
        "From the training logs, mean over the run folders. Outcome reward: Scenario A accuracy of "
        "the rollouts, mean of the first vs the last 20% of steps, and their difference with a 95% "
        "interval (resampling run folders and steps; * = excludes 0). Final KL: mean of the last 5 "
        "steps. Zero-std groups, DSU fire rate (– where the bonus is off), the bonus's share of "
        "the advantages (sum |U − U without the bonus| / sum |U| over Scenario A; logged since "
        "2026-12-03) and tokens trained: mean per step; last position: the longest trained row.",
        "",
        md_table(header, rows),
        "",
    ]


def probe_section(methods, order, report_dir, probe_problems):
    """Accuracy on the EI probes of the test_id problems, per rule (in tasks.EI_RULES' order) and
    pooled."""
    rules = sorted(
        {r for es in methods.values() for e in es for r in e.probes},
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
    every_rule = lambda e: {(r, w): c for r, cells in e.probes.items() for w, c in cells.items()}
    ei = {
        m: [spread([pooled(e.probes.get(r, {})) for e in methods[m]]) for r in rules]
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


def curve_section(methods, order, report_dir):
    """Training curves from every evaluated run's log: SFT and RL logs on separate figures."""
    logs = {m: training_logs(methods[m], m) for m in order}
    out = []
    for name, title, rl, keys in (
        ("curves_sft.png", "SFT training curves", False, SFT_CURVES),
        ("curves_rl.png", "RL training curves", True, RL_CURVES),
    ):
        # an RL log records rewards, an SFT log does not
        chosen = {
            m: [log for log in runs if log and ("reward" in log[0]) == rl]
            for m, runs in logs.items()
        }
        chosen = {m: runs for m, runs in chosen.items() if runs}
        if chosen:
            curve_chart(os.path.join(report_dir, name), title, chosen, keys)
            out += [f"![{title}]({name})", ""]
    return ["## Training curves", ""] + out if out else []


def efficiency_section(entries, report_dir):
    """test_id accuracy vs the share of training questions, for each method (family) that was also
    trained on a share < 1: a table, a plot, and paired intervals between the methods at each
    share. Only the run folders (seeds) that hold such runs count, at 100% too, so every point of a
    line comes from the same seeds."""
    runs = {e.run for e in entries if partial(e)}
    grid = {}  # family -> share -> entries
    for e in entries:
        if e.run in runs and split_acc(e, "test_id") is not None:
            grid.setdefault(family(e.config), {}).setdefault(share(e), []).append(e)
    ordered = sorted(grid, key=lambda fam: FAMILY_ORDER.get(fam, len(FAMILY_ORDER)))
    grid = {fam: grid[fam] for fam in ordered if min(grid[fam]) < 1}
    if not grid:
        return []
    shares = sorted({f for by in grid.values() for f in by})
    spreads = {
        fam: {f: spread([split_acc(e, "test_id") for e in by[f]]) for f in by}
        for fam, by in grid.items()
    }
    fig, ax = plt.subplots(figsize=(6, 4))
    for fam, st in spreads.items():
        xs = sorted(st)
        ax.errorbar(
            xs,
            [100 * st[f].mean for f in xs],
            yerr=[100 * st[f].std for f in xs],
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
        [fam] + [f"{fmt(st[f])} (n={st[f].n})" if f in st else "–" for f in shares]
        for fam, st in spreads.items()
    ]
    fams = list(grid)
    at_share = lambda fam, f: answers(grid[fam][f])
    interval = lambda a, b, f: paired_interval(at_share(a, f), at_share(b, f), ["test_id"])
    diffs = [
        [f"{a} − {b}"]
        + [ci_cell(interval(a, b, f)) if f in grid[a] and f in grid[b] else "–" for f in shares]
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
                "Paired differences on test_id (points, 95% bootstrap interval over seeds and "
                "problems; * = the interval excludes 0).",
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
    """probe.py's results found in the run folders: test accuracy per layer of each checkpoint's
    linear probe (shuffled-label control in brackets) and its selectivity against the control
    task, as the mean ± sample std over the folders, and the causal test's flip rates (mean). The
    first folder's figures are copied beside the report."""
    found = {}
    for run in runs:
        for path in sorted(glob.glob(os.path.join(run, "probe", "probe_*.json"))):
            found.setdefault(os.path.basename(path), []).append(path)
    if not found:
        return []
    out = [
        "## Linear probes on hidden states",
        "",
        "Test accuracy of a logistic-regression probe per layer (0 = embeddings), the "
        "shuffled-label control in brackets; selectivity = probe accuracy - accuracy on the "
        "control task (each token type, e.g. the event's actor, gets a fixed random label), "
        "control-task accuracy in brackets: near 0 means the probe could score as well by "
        "memorising which token it sits on. Flip rate: share of test problems whose greedy answer "
        "becomes the one the other state implies after adding alpha class-mean gaps toward it at "
        "the last event's token (random: the same norm along a random direction; alpha = 0: no "
        "edit). Mean ± sample std over run folders (probe.py).",
        "",
    ]
    for name, paths in found.items():
        results = [json.load(open(p)) for p in paths]
        first = results[0]
        values = lambda label, key, *at: [_at(r["checkpoints"][label][key], at) for r in results]
        mean = lambda label, key, *at: statistics.mean(values(label, key, *at))

        # mean ± std over the folders, then the control's mean
        def cell(label, key, layer, sign=""):
            s = spread(values(label, key, layer))
            control = "control_acc" if key == "lr_acc" else "control_task_acc"
            sd = f" ± {s.std:.2f}" if s.n > 1 else ""
            return f"{s.mean:{sign}.2f}{sd} ({mean(label, control, layer):.2f})"

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
        # the first folder's figures, beside its JSON
        figure, flips = paths[0][:-5] + ".png", paths[0][:-5] + "_intervention.png"
        for fig in filter(os.path.exists, [figure] + ([flips] if "intervention" in first else [])):
            shutil.copyfile(fig, os.path.join(report_dir, os.path.basename(fig)))
        where = (
            f" (run folder {os.path.dirname(os.path.dirname(paths[0]))})" if len(paths) > 1 else ""
        )
        out += ["", f"![{name}{where}]({os.path.basename(figure)})", ""]
        if all("intervention" in r for r in results):
            out += intervention_table(first, mean) + [
                f"![{name} flip rates{where}]({os.path.basename(flips)})",
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
        "Flip rate toward the other state / along a random direction "
        f"({plan['problems']} test problems):",
        "",
        md_table(["checkpoint", "layer"] + [f"alpha {a:g}" for a in plan["alphas"]], rows),
        "",
    ]


def write_report(scores, report_dir, analysis, studies=()):
    runs, entries, settings = scores.runs, scores.entries, scores.settings
    splits = settings.splits
    methods = {}
    for e in entries:
        methods.setdefault(e.name, []).append(e)
    order = sorted(methods, key=row_key)
    totals = {
        s: sorted({sum(t for _, t in e.acc.get(s, {}).values()) for e in entries}) for s in splits
    }
    seeds = sorted({str(e.config["seed"]) for e in entries if "seed" in e.config})
    header = (
        f"{len(entries)} checkpoint(s) from {len(runs)} run folder(s) ({', '.join(runs)})"
        + (f", seed(s) {', '.join(seeds)}" if seeds else "")
        + f". Greedy single-turn answers of at most {settings.max_new_tokens} new tokens. "
        "Problems per run folder: "
        + ", ".join(f"{s} {'/'.join(map(str, totals[s]))}" for s in splits)
        + ". Cells: accuracy in % (mean ± sample std over the n run folders when n > 1); a split "
        "pools its worlds; mean = the mean over the splits."
    )
    # one training run per row: no spread over seeds, no interval that speaks for the method
    if len(seeds) <= 1:
        header += (
            " **One seed: a demonstration of the pipeline, not a result.** A study over seeds "
            "(those of results/README.md) is what can tell the rows apart."
        )
    out = (
        ["# Evaluation report", "", header, ""]
        + accuracy_sections(methods, order, splits, report_dir)
        + difference_section(methods, order, splits, report_dir)
        + studies_section(methods, order, splits, studies, report_dir)
        + power_section(analysis)
        + rl_section(methods, order)
        + probe_section(methods, order, report_dir, settings.probe_problems)
        + linear_probe_section(runs, report_dir)
        + curve_section(methods, order, report_dir)
        + efficiency_section(entries, report_dir)
    )
    atomic_write(os.path.join(report_dir, "report.md"), "\n".join(out))


def main(argv):
    cfg = parse_config(Config(), argv, LIMITS)
    report_dir = os.path.join(cfg.out_dir, "report")
    results_path = os.path.join(report_dir, "results.json")
    if cfg.from_results:  # a study's committed seeds: the report without checkpoints or models
        folders = [f for f in cfg.from_results.split(",") if f]
        scores, source = saved_scores(folders), {"from_results": folders}
    else:
        scores = scored(cfg, results_path)
        source = {"settings": asdict(scores.settings)}
    os.makedirs(report_dir, exist_ok=True)
    analysis = power_analysis(scores.entries, scores.settings.splits)
    results = {
        **source,
        "checkpoints": {e.path: asdict(e) for e in scores.entries},
        "power": {f"{a} - {b}": asdict(c) for (a, b), c in analysis.items()},
    }
    atomic_write(results_path, json.dumps(results, indent=1))
    write_report(scores, report_dir, analysis, [p for p in cfg.studies.split(",") if p])
    print(
        f"wrote {os.path.join(report_dir, 'report.md')} "
        f"({len(scores.entries)} checkpoints from {len(scores.runs)} folder(s))"
    )


if __name__ == "__main__":
    cli(main)
