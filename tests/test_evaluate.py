"""evaluate.py: accuracies equal hand counts (answers fixed by a stub, and by a tiny real model that
always answers "yes"), seeds aggregate to the hand-computed mean ± std, the report lists every
split and method, the figures are written, --reuse skips unchanged checkpoints, missing inputs
stop with one sentence, and the report drawn from the committed results (the RL study's seeds, the
first study's results.json) reads every field and log key they hold, with their numbers. The
statistics themselves are tested in tests/test_stats.py."""

import json
import os
import re
import shutil
from dataclasses import replace

import matplotlib.image
import pytest
import torch

import evaluate
import stats
from model import GPT, PRESETS, GPTConfig, save_checkpoint
from tasks import prompt_ids, response_ids
from tokenizer import CompactTokenizer
from training import read_log

SPLITS = ["test_id", "ood_long", "ood_reverse", "ood_names"]
GOLD = {"coin": ("no", "yes"), "arith": ("5", "6")}  # (gold answer, a wrong one)
RULES = ("counterfactual", "decompose")


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def record(rid, world, split, question, answer, probes=()):
    return {
        "id": rid,
        "world": world,
        "split": split,
        "question": question,
        "answer": answer,
        "rationale": f"The answer is {answer}.",
        "probes": list(probes),
    }


def stub_records(split):
    """Two coin and two arith problems per split; test_id problems carry one probe per rule.
    The text names the item, so a stub can answer each one as the test decides."""
    out = []
    for world in GOLD:
        for i in range(2):
            rid = f"{split}-{world}-{i}"
            probes = (
                [
                    {
                        "rule": r,
                        "question": f"Probe {r} of {rid}?",
                        "answer": GOLD[world][0],
                        "rationale": f"The answer is {GOLD[world][0]}.",
                    }
                    for r in RULES
                ]
                if split == "test_id"
                else []
            )
            out.append(record(rid, world, split, f"Problem {rid}?", GOLD[world][0], probes))
    return out


# which items each (run folder, checkpoint) answers right; everything else gets the wrong answer
TEST_ID = ["test_id-coin-0", "test_id-coin-1", "test_id-arith-0", "test_id-arith-1"]
RIGHT = {
    ("s1", "sft_qa"): {
        "test_id-coin-0",
        "test_id-coin-1",
        "test_id-arith-0",
        "ood_long-coin-0",
        "ood_names-coin-0",
        "ood_names-coin-1",
        "ood_names-arith-0",
        "ood_names-arith-1",
        "counterfactual of test_id-coin-0",
        "decompose of test_id-coin-0",
        "decompose of test_id-coin-1",
        "decompose of test_id-arith-0",
    },
    ("s2", "sft_qa"): {
        "test_id-coin-0",
        "ood_long-coin-0",
        "ood_long-arith-0",
        "ood_reverse-coin-0",
        "ood_names-coin-0",
        "ood_names-coin-1",
        "ood_names-arith-0",
        "ood_names-arith-1",
    },
    ("s1", "rl_exgrpo"): set(TEST_ID),
    ("s1", "sft_qa_f25"): {"test_id-coin-0", "ood_names-coin-0"},
}
CONFIGS = {
    "sft_qa": dict(stage="sft", data="qa", data_fraction=1.0),
    "sft_qa_f25": dict(stage="sft", data="qa", data_fraction=0.25),
    "rl_exgrpo": dict(
        stage="rl", algo="exgrpo", dsu_bonus=True, init="x/sft_qa.pt", data_fraction=1.0
    ),
}


def nano_checkpoint(path, tok, config, model=None):
    torch.manual_seed(0)
    model = model or GPT(GPTConfig(**PRESETS["nano"], vocab_size=tok.n_vocab))
    save_checkpoint(path, model, tok, step=7, extra={"stage": config["stage"], "config": config})


def scored(run, name, config, right=""):
    """An evaluate.Entry of one coin problem per character of `right` ("1" = answered right) on
    test_id, without probes."""
    correct = {"test_id": right} if right else {}
    acc = {"test_id": {"coin": [right.count("1"), len(right)]}} if right else {}
    return evaluate.Entry(
        run=run,
        path=os.path.join(run, "ckpt", f"{name}.pt"),
        step=0,
        config=config,
        acc=acc,
        probes={},
        correct=correct,
        stamp=[],
        name=name,
    )


def assert_drawn(path):
    """A drawn figure, not a blank one."""
    image = matplotlib.image.imread(str(path))
    assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0, path


@pytest.fixture
def stub_runs(tmp_path, monkeypatch):
    """Run folders s1 (three checkpoints) and s2 (sft_qa only) with logs; the student's answers
    come from RIGHT, keyed on the checkpoint being evaluated."""
    data = {s: stub_records(s) for s in SPLITS}
    texts = [
        q
        for recs in data.values()
        for r in recs
        for q in [r["question"]] + [p["question"] for p in r["probes"]]
    ]
    tok = CompactTokenizer.from_texts(["Q: " + t + "\nA:" for t in texts])
    for run, name in RIGHT:
        for s in SPLITS:
            write_jsonl(str(tmp_path / run / "data" / f"{s}.jsonl"), data[s])
        nano_checkpoint(
            str(tmp_path / run / "ckpt" / f"{name}.pt"), tok, dict(CONFIGS[name], seed=int(run[1]))
        )
    write_jsonl(
        str(tmp_path / "s1" / "logs" / "sft_qa.jsonl"),
        [
            {"step": s, "loss": 2.0 / s, "val_loss": 2.5 / s, "val_acc": 0.1 * s}
            for s in range(1, 6)
        ],
    )
    write_jsonl(
        str(tmp_path / "s1" / "logs" / "rl_exgrpo.jsonl"),
        [
            {
                "step": s,
                "reward": 0.5,
                "acc_full": 0.4,
                "kl": 0.01 * s,
                "dsu_fire_rate": 0.3,
                "adv_bonus_share": 0.05,
            }
            for s in range(1, 6)
        ],
    )
    items = {r["question"]: (r["id"], r["world"]) for recs in data.values() for r in recs}
    items.update(
        {
            p["question"]: (f"{p['rule']} of {r['id']}", r["world"])
            for r in data["test_id"]
            for p in r["probes"]
        }
    )
    loaded = []
    real_load = evaluate.load_model

    def load(path, device):
        loaded.append(path)
        return real_load(path, device)

    def answers(model, tok, questions, max_new_tokens, batch_size):
        run = os.path.basename(os.path.dirname(os.path.dirname(loaded[-1])))
        right = RIGHT[run, os.path.basename(loaded[-1])[:-3]]
        gold_or_wrong = lambda q: GOLD[items[q][1]][0 if items[q][0] in right else 1]
        return [f"Because. The answer is {gold_or_wrong(q)}." for q in questions]

    monkeypatch.setattr(evaluate, "load_model", load)
    monkeypatch.setattr(evaluate, "greedy_answers", answers)
    return tmp_path, loaded


def run_main(tmp_path, *extra):
    runs = ",".join(str(tmp_path / r) for r in ("s1", "s2"))
    evaluate.main(
        [
            f"--out_dir={tmp_path / 'all'}",
            f"--runs={runs}",
            "--batch_size=3",
            "--device=cpu",
            *extra,
        ]
    )
    report = open(tmp_path / "all" / "report" / "report.md").read()
    return report, json.load(open(tmp_path / "all" / "report" / "results.json"))


def section(report, title):
    """The text of the section under "## <title...>"."""
    found = [part for part in report.split("\n## ") if part.startswith(title)]
    assert len(found) == 1, (title, report)
    return found[0]


def cells(report, title, first):
    """The cells after `first` in the row that starts with them, in the table under "## <title>"."""
    text = section(report, title)
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]
    found = [r[len(first) :] for r in rows if r[: len(first)] == first]
    assert len(found) == 1, (title, first, report)
    return found[0]


def test_accuracy_equals_hand_count_and_seeds_aggregate(stub_runs):
    tmp_path, _ = stub_runs
    report, results = run_main(tmp_path)
    # sft_qa, s1: test_id 3/4, ood_long 1/4, ood_reverse 0/4, ood_names 4/4 (split mean 0.5);
    #         s2: 1/4, 2/4, 1/4, 4/4 (mean 0.5).
    # Mean ± sample std of two values a, b: |a - b| / sqrt(2).
    split = "Accuracy per split"
    assert cells(report, split, ["vanilla SFT (sft_qa)"]) == [
        "50.0 ± 35.4",
        "37.5 ± 17.7",
        "12.5 ± 17.7",
        "100.0 ± 0.0",
        "50.0 ± 0.0",
        "2",
    ]
    assert cells(report, split, ["EXGRPO (rl_exgrpo)"]) == [
        "100.0",
        "0.0",
        "0.0",
        "0.0",
        "25.0",
        "1",
    ]
    assert cells(report, split, ["vanilla SFT, 25% of the data (sft_qa_f25)"]) == [
        "25.0",
        "0.0",
        "0.0",
        "25.0",
        "12.5",
        "1",
    ]
    # per world, sft_qa coin: test_id 2/2 and 1/2; ood_long 1/2, 1/2; ood_reverse 0/2, 1/2;
    # ood_names 2/2, 2/2
    world, sft = "Accuracy per world", "vanilla SFT (sft_qa)"
    assert cells(report, world, [sft, "coin"]) == [
        "75.0 ± 35.4",
        "50.0 ± 0.0",
        "25.0 ± 35.4",
        "100.0 ± 0.0",
    ]
    assert cells(report, world, [sft, "arith"]) == [
        "25.0 ± 35.4",
        "25.0 ± 35.4",
        "0.0 ± 0.0",
        "100.0 ± 0.0",
    ]
    # EI probes, sft_qa: counterfactual 1/4 and 0/4, decompose 3/4 and 0/4, all 4/8 and 0/8
    assert cells(report, "EI-probe", ["method"]) == ["counterfactual", "decompose", "all"]
    assert cells(report, "EI-probe", ["vanilla SFT (sft_qa)"]) == [
        "12.5 ± 17.7",
        "37.5 ± 53.0",
        "25.0 ± 35.4",
    ]
    # paired differences, s1 only (s2 has no rl_exgrpo): EXGRPO right on 4/4, 0/4, 0/4, 0/4 where
    # vanilla SFT is right on 3/4, 1/4, 0/4, 4/4, so +25, -25, 0, -100 and -25 over all 16 problems
    diff = cells(report, "Paired differences", ["EXGRPO (rl_exgrpo) − vanilla SFT (sft_qa)"])
    assert diff[0] == "1" and [c.split(" [")[0] for c in diff[1:]] == [
        "+25.0",
        "-25.0",
        "+0.0",
        "-100.0",
        "-25.0",
    ]
    # 4 of 4 worse excludes 0; 1 of 4 better does not
    assert diff[4].endswith("*") and not diff[1].endswith("*")
    s1 = results["checkpoints"][str(tmp_path / "s1" / "ckpt" / "sft_qa.pt")]
    assert s1["correct"]["test_id"].count("1") == 3 and len(s1["correct"]["ood_names"]) == 4
    assert s1["acc"]["test_id"] == {"coin": [2, 2], "arith": [1, 2]}
    assert s1["probes"]["decompose"] == {"coin": [2, 2], "arith": [1, 2]}


def test_report_lists_every_split_and_method_in_order_and_writes_plots(stub_runs):
    tmp_path, _ = stub_runs
    report, _ = run_main(tmp_path)
    assert "One seed" not in report  # two seeds here; one seed is flagged as a demonstration
    evaluate.main([f"--out_dir={tmp_path / 's1'}", "--batch_size=3", "--device=cpu"])
    assert "One seed: a demonstration" in open(tmp_path / "s1" / "report" / "report.md").read()
    assert cells(report, "Accuracy per split", ["method"]) == SPLITS + ["mean", "n"]
    assert cells(report, "Accuracy per world", ["method", "world"]) == SPLITS
    # each row of the paper's order followed by its data-efficiency rows
    assert (
        report.index("vanilla SFT (sft_qa)")
        < report.index("| vanilla SFT, 25% of the data")
        < report.index("EXGRPO (rl_exgrpo)")
    )
    folder = tmp_path / "all" / "report"
    for png in (
        "accuracy.png",
        "ei_probes.png",
        "curves_sft.png",
        "curves_rl.png",
        "data_efficiency.png",
        "differences.png",
    ):
        assert f"]({png})" in report
        assert_drawn(folder / png)


def test_reuse_evaluates_only_changed_checkpoints(stub_runs):
    tmp_path, loaded = stub_runs
    first, _ = run_main(tmp_path)
    assert len(loaded) == 4
    changed = tmp_path / "s2" / "ckpt" / "sft_qa.pt"
    os.utime(changed, (1, 1))
    second, _ = run_main(tmp_path, "--reuse=True")
    assert loaded[4:] == [str(changed)] and second == first
    # regenerated data: s1's checkpoints again
    os.utime(tmp_path / "s1" / "data" / "ood_names.jsonl", (1, 1))
    run_main(tmp_path, "--reuse=True")
    assert sorted(os.path.basename(p) for p in loaded[5:]) == [
        "rl_exgrpo.pt",
        "sft_qa.pt",
        "sft_qa_f25.pt",
    ]
    run_main(tmp_path, "--reuse=True", "--max_new_tokens=20")  # other settings: every one again
    assert len(loaded) == 12


def coin_question(names, flips):
    q = "A coin is heads up."
    for name, flip in zip(names, flips):
        q += f" {name} {'flips' if flip else 'does not flip'} the coin."
    return q + " Is the coin still heads up?"


def test_real_tiny_model_that_always_says_yes(tmp_path):
    """A nano student trained to answer "The answer is yes." to everything: its accuracy on each
    split is the share of problems whose gold answer is yes, counted here by hand."""
    flips = {
        "test_id": [[1], [0], [0]],
        "ood_long": [[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1]],
        "ood_reverse": [[1], [1]],
        "ood_names": [[0, 1], [1, 1], [0, 0]],
    }
    data = {}
    for split, patterns in flips.items():
        data[split] = []
        for i, f in enumerate(patterns):
            gold = "yes" if sum(f) % 2 == 0 else "no"
            ann = "yes" if f[0] else "no"
            probes = (
                [
                    {
                        "rule": "verify",
                        "question": f"Did Ann flip the coin {i}?",
                        "answer": ann,
                        "rationale": f"The answer is {ann}.",
                    }
                ]
                if split == "test_id"
                else []
            )
            question = coin_question(["Ann", "Bob", "Eve"], f)
            data[split].append(record(f"{split}-{i}", "coin", split, question, gold, probes))
        write_jsonl(str(tmp_path / "run" / "data" / f"{split}.jsonl"), data[split])
    questions = [
        q
        for recs in data.values()
        for r in recs
        for q in [r["question"]] + [p["question"] for p in r["probes"]]
    ]
    tok = CompactTokenizer.from_texts(
        ["Q: " + q + "\nA:" for q in questions] + [" The answer is yes. no"]
    )
    torch.manual_seed(0)
    model = GPT(GPTConfig(**PRESETS["nano"], vocab_size=tok.n_vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seqs = [prompt_ids(tok, q) + response_ids(tok, "The answer is yes.") for q in questions]
    starts = [len(prompt_ids(tok, q)) for q in questions]
    T = max(map(len, seqs))
    x = torch.tensor([s + [tok.eot] * (T - len(s)) for s in seqs])
    y = torch.tensor(
        [[-1] * (p - 1) + s[p:] + [-1] * (T - len(s) + 1) for s, p in zip(seqs, starts)]
    )
    for _ in range(150):
        loss = model(x[:, :-1], y[:, :-1])[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    nano_checkpoint(str(tmp_path / "run" / "ckpt" / "sft_qa.pt"), tok, CONFIGS["sft_qa"], model)
    # block 128
    evaluate.main(
        [f"--out_dir={tmp_path / 'run'}", "--batch_size=4", "--device=cpu", "--max_new_tokens=48"]
    )
    report = open(tmp_path / "run" / "report" / "report.md").read()
    # yes-golds (an even number of flips): test_id 2/3, ood_long 3/4 (flip counts 1, 2, 0, 2),
    # ood_reverse 0/2, ood_names 2/3; split mean (66.67 + 75 + 0 + 66.67) / 4 = 52.1;
    # probes: Ann flipped in 1 of the 3 test_id problems
    assert cells(report, "Accuracy per split", ["vanilla SFT (sft_qa)"]) == [
        "66.7",
        "75.0",
        "0.0",
        "66.7",
        "52.1",
        "1",
    ]
    assert cells(report, "EI-probe", ["vanilla SFT (sft_qa)"]) == ["33.3", "33.3"]

    # the same checkpoint on data with a word its compact vocabulary lacks: one sentence naming both
    write_jsonl(
        str(tmp_path / "other" / "data" / "test_id.jsonl"),
        [record("x", "coin", "test_id", coin_question(["Zoltan"], [1]), "no")],
    )
    with pytest.raises(
        SystemExit, match=r"sft_qa\.pt cannot be evaluated on .*other/data: .*not in this compact"
    ):
        evaluate.main(
            [
                f"--out_dir={tmp_path / 'other'}",
                f"--ckpts={tmp_path / 'run' / 'ckpt' / 'sft_qa.pt'}",
                "--splits=test_id",
                "--device=cpu",
            ]
        )


def test_missing_inputs_are_one_clear_sentence(tmp_path):
    with pytest.raises(
        SystemExit, match=r"no checkpoints in .*empty/ckpt: train with distill_rl\.py first"
    ):
        evaluate.main([f"--out_dir={tmp_path / 'empty'}"])
    tok = CompactTokenizer.from_texts(["Q: a\nA:"])
    nano_checkpoint(str(tmp_path / "run" / "ckpt" / "sft_qa.pt"), tok, CONFIGS["sft_qa"])
    with pytest.raises(SystemExit, match=r"no checkpoint rl_grpo\.pt in "):
        evaluate.main([f"--out_dir={tmp_path / 'run'}", "--ckpts=rl_grpo"])
    with pytest.raises(
        SystemExit, match=r"run/data/test_id\.jsonl does not exist: run `python invert\.py"
    ):
        evaluate.main([f"--out_dir={tmp_path / 'run'}"])


def test_rl_diagnostics_come_from_the_logs(stub_runs):
    tmp_path, _ = stub_runs
    report, _ = run_main(tmp_path)
    # stub log: 5 steps of acc_full 0.4, kl 0.01 * step, fire rate 0.3; 20% of 5 steps = 1 step
    # per window
    assert cells(report, "RL diagnostics", ["EXGRPO (rl_exgrpo)"]) == [
        "1",
        "5",
        "0.400 → 0.400",
        "+0.000 [+0.000, +0.000]",
        "0.0300",
        "–",
        "0.30",
        "0.050",
        "–",
        "–",
    ]
    # SFT logs hold no rollouts
    assert "vanilla SFT" not in section(report, "RL diagnostics")


def test_rows_without_the_bonus_show_no_fire_rate(tmp_path):
    write_jsonl(
        str(tmp_path / "logs" / "rl_exgrpo_plain.jsonl"),
        [{"step": 1, "acc_full": 0.5, "dsu_fire_rate": 0.0}],
    )
    entry = lambda bonus: scored(str(tmp_path), "rl_exgrpo_plain", dict(dsu_bonus=bonus))
    assert evaluate.training_logs([entry(False)], "rl_exgrpo_plain")[0][0]["dsu_fire_rate"] is None
    assert evaluate.training_logs([entry(True)], "rl_exgrpo_plain")[0][0]["dsu_fire_rate"] == 0.0
    assert evaluate.training_logs([entry(True)], "rl_grpo") == []  # no log, no curve


def test_probe_problems_scores_the_probes_of_the_first_problems_only(stub_runs):
    tmp_path, _ = stub_runs
    report, saved = run_main(tmp_path, "--probe_problems=1")
    title = "EI-probe accuracy per rule (explanatory consistency, the first 1 test_id problems"
    assert f"## {title} of each world)" in report
    # one problem per world: each rule's cell counts 1 probe, not 2
    for e in saved["checkpoints"].values():
        assert {w: c[1] for w, c in e["probes"]["decompose"].items()} == {"coin": 1, "arith": 1}
        # every test problem is still scored
        assert sum(len(c) for c in e["correct"].values()) == 16


def test_data_efficiency_by_hand(tmp_path):
    """Lines for the methods trained on a share < 1, on the seeds that hold such runs only (r3 has
    just a 100% run and must not count), with paired differences at each share."""
    sft = lambda data: dict(stage="sft", data=data)
    exgrpo = dict(stage="rl", algo="exgrpo", dsu_bonus=True, init="x/sft_ei.pt")
    grpo = dict(stage="rl", algo="grpo", init="x/sft_ei.pt")
    runs = [
        ("r1", sft("qa"), 0.25, "1000"),
        ("r2", sft("qa"), 0.25, "1100"),
        ("r1", sft("qa"), 1.0, "1110"),
        ("r2", sft("qa"), 1.0, "1111"),
        ("r3", sft("qa"), 1.0, "0000"),
        ("r1", sft("ei"), 0.25, "1100"),
        ("r2", sft("ei"), 0.25, "1110"),
        ("r1", sft("ei"), 1.0, "1111"),
        ("r2", sft("ei"), 1.0, "1111"),
        ("r1", exgrpo, 0.25, "1110"),
        ("r1", grpo, 1.0, "1111"),
    ]
    base = lambda c: "rl_" + c["algo"] if c["stage"] == "rl" else "sft_" + c["data"]
    entries = [
        scored(run, base(c) + ("_f25" if f < 1 else ""), dict(c, data_fraction=f), right)
        for run, c, f, right in runs
    ]
    report = "\n" + "\n".join(evaluate.efficiency_section(entries, str(tmp_path)))
    assert "run folders r1, r2 only" in report
    assert cells(report, "Data efficiency", ["method"]) == ["25%", "100%"]
    # vanilla 25%: 1/4 and 2/4; 100%: 3/4 and 4/4 (r3's 0/4 left out). Std of two values:
    # |a - b| / sqrt(2)
    assert cells(report, "Data efficiency", ["vanilla SFT"]) == [
        "37.5 ± 17.7 (n=2)",
        "87.5 ± 17.7 (n=2)",
    ]
    assert cells(report, "Data efficiency", ["EI-SFT"]) == [
        "62.5 ± 17.7 (n=2)",
        "100.0 ± 0.0 (n=2)",
    ]
    assert cells(report, "Data efficiency", ["EXGRPO"]) == ["75.0 (n=1)", "–"]
    assert "\n| GRPO |" not in report  # trained on all the data only: no line
    # paired: EI-SFT - vanilla at 25%: r1 +1 on one problem of 4, r2 +1 on one: 2/8; at 100%: 1/8
    mean = lambda first: [c.split(" [")[0] for c in cells(report, "Data efficiency", [first])]
    assert mean("EI-SFT − vanilla SFT") == ["+25.0", "+12.5"]
    assert mean("EXGRPO − vanilla SFT") == ["+50.0", "–"]  # r1 only: 1110 - 1000
    assert mean("EXGRPO − EI-SFT") == ["+25.0", "–"]
    assert (tmp_path / "data_efficiency.png").exists()
    all_data = [e for e in entries if e.config["data_fraction"] == 1]
    assert evaluate.efficiency_section(all_data, str(tmp_path)) == []
    # a study whose every row trains on one share names its rows plainly: they are its main rows
    plain = [replace(e, name=evaluate.row_name(e.name).row) for e in entries]
    assert evaluate.efficiency_section(plain, str(tmp_path)) == []


def test_linear_probe_means_and_spread_over_run_folders_by_hand(tmp_path):
    """Two run folders' probe.py results: each cell is the mean ± sample std of the per-folder
    values, the control's mean in brackets; the first folder's figure is copied beside the
    report."""
    for run, (acc, sel) in {"r1": ([0.5, 0.7], [0.0, 0.2]), "r2": ([0.5, 0.9], [0.0, 0.4])}.items():
        result = dict(
            world="coin",
            target="state",
            positions="event",
            latent="side",
            majority_acc=0.5,
            checkpoints={
                "vanilla": dict(
                    lr_acc=acc, control_acc=[0.5, 0.4], selectivity=sel, control_task_acc=[0.5, 0.6]
                )
            },
        )
        (tmp_path / run / "probe").mkdir(parents=True)
        (tmp_path / run / "probe" / "probe_coin_state_event.json").write_text(json.dumps(result))
        (tmp_path / run / "probe" / "probe_coin_state_event.png").write_bytes(run.encode())
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    report = "\n" + "\n".join(
        evaluate.linear_probe_section([str(tmp_path / "r1"), str(tmp_path / "r2")], str(report_dir))
    )
    section = "Linear probes"
    # layer 1: accuracy 0.7 and 0.9 (mean 0.8, sample std 0.2 / sqrt(2) = 0.14); selectivity 0.2
    # and 0.4
    rows = [line for line in report.splitlines() if line.startswith("| vanilla |")]
    assert rows[0] == "| vanilla | 0.50 ± 0.00 (0.50) | 0.80 ± 0.14 (0.40) |"
    assert rows[1] == "| vanilla | +0.00 ± 0.00 (0.50) | +0.30 ± 0.14 (0.60) |"
    assert "n = 2" in report and section in report
    assert (
        "](probe_coin_state_event.png)" in report
        and (report_dir / "probe_coin_state_event.png").read_bytes() == b"r1"
    )


def test_power_section_in_the_report(stub_runs, monkeypatch):
    tmp_path, _ = stub_runs
    report, results = run_main(tmp_path)
    # only EXGRPO - vanilla SFT has both rows, on one seed (s1): the seed component cannot be
    # estimated
    assert cells(report, "Power", ["EXGRPO (rl_exgrpo) − vanilla SFT (sft_qa)"]) == [
        "-25.0",
        "6 / 16",
        "–",
        "–",
        "–",
        "1",
        "16",
        "– (one seed: the seed component cannot be estimated)",
        "–",
    ]
    assert list(results["power"]) == ["rl_exgrpo - sft_qa"]
    assert results["power"]["rl_exgrpo - sft_qa"]["var_seed"] is None
    # a second seed of EXGRPO that answers nothing right. d over the 16 problems (test_id,
    # ood_long, ood_reverse, ood_names): s1 0001 -1000 0000 -1-1-1-1 (mean -1/4),
    # s2 -1000 -10-10 -1000 -1-1-1-1 (mean -1/2), grand mean -3/8. With two seeds the residual is
    # +-(delta_p - mean delta)/2, delta = s1 - s2 = 1001 0010 1000 0000 (mean 1/4, sample variance
    # (4 - 16/16)/15 = 1/5): MS_E = (15/5)/2/15 = 1/10.
    # MS_S = 16 * 2 * (1/8)^2 = 1/2; problem means -.5 0 0 .5, -1 0 -.5 0, -.5 0 0 0, -1 -1 -1 -1:
    # sum of squares about -3/8 = 6 - 16 * 9/64 = 15/4, MS_P = 2 * (15/4) / 15 = 1/2.
    # var_seed = (1/2 - 1/10) / 16 = 1/40, var_problem = (1/2 - 1/10) / 2 = 1/5,
    # var_residual = 1/10; in points^2: 250, 2000, 1000 (sd 15.8, 44.7, 31.6).
    # MDE now: Z sqrt(250/2 + 2000/16 + 1000/32) = Z sqrt(281.25) = 47.0; S' = 5, P' = 16:
    # Z sqrt(50 + 125 + 12.5) = 38.4. At P' = 16000 the seed term alone needs
    # S' >= 250 / (2/Z)^2 = 491
    (tmp_path / "s2" / "ckpt" / "rl_exgrpo.pt").write_bytes(
        (tmp_path / "s1" / "ckpt" / "rl_exgrpo.pt").read_bytes()
    )
    monkeypatch.setitem(RIGHT, ("s2", "rl_exgrpo"), set())
    report, results = run_main(tmp_path)
    assert cells(report, "Power", ["difference", "mean"])[-1] == "seeds for MDE ≤ 2 at P = 16000"
    # pairs answered apart: 6 + 8 nonzero d
    assert cells(report, "Power", ["EXGRPO (rl_exgrpo) − vanilla SFT (sft_qa)", "-37.5"]) == [
        "14 / 32",
        "15.8",
        "44.7",
        "31.6",
        "2",
        "16",
        "47.0",
        "none up to 100",
    ]
    assert cells(report, "Power", ["difference", "S"]) == ["P = 16", "P = 4000", "P = 16000"]
    assert cells(report, "Power", ["EXGRPO (rl_exgrpo) − vanilla SFT (sft_qa)", "5"])[0] == "38.4"
    saved = results["power"]["rl_exgrpo - sft_qa"]
    assert (saved["var_seed"], saved["var_problem"], saved["var_residual"]) == pytest.approx(
        (250, 2000, 1000), abs=1e-9
    )
    # no sft_ei row: no comparison with it
    assert "EI-SFT" not in section(report, "Power")


def test_from_results_draws_the_report_without_checkpoints(stub_runs):
    """A study commits each seed's results.json and logs, not its checkpoints: --from_results on
    those folders gives the same accuracy, difference, power and RL sections as scoring the
    checkpoints, and loads no model."""
    tmp_path, loaded = stub_runs
    report, _ = run_main(tmp_path)
    committed = []
    # one evaluation per seed, its JSON and logs copied: what a study commits
    for run in ("s1", "s2"):
        evaluate.main([f"--out_dir={tmp_path / run}", "--batch_size=3", "--device=cpu"])
        folder = tmp_path / "committed" / run
        folder.mkdir(parents=True)
        if (tmp_path / run / "logs").is_dir():  # s2 trained nothing with a log
            shutil.copytree(tmp_path / run / "logs", folder / "logs")
        shutil.copy(tmp_path / run / "report" / "results.json", folder / "results.json")
        committed.append(str(folder))
        shutil.rmtree(tmp_path / run / "ckpt")
    n_loaded = len(loaded)
    evaluate.main([f"--out_dir={tmp_path / 'again'}", f"--from_results={','.join(committed)}"])
    again = open(tmp_path / "again" / "report" / "report.md").read()
    assert len(loaded) == n_loaded  # no checkpoint was opened
    for name in ("Accuracy per split", "Paired differences", "Power", "RL diagnostics"):
        assert section(again, name) == section(report, name), name
    with pytest.raises(SystemExit, match="results.json does not exist"):
        evaluate.main([f"--out_dir={tmp_path / 'again'}", f"--from_results={tmp_path / 'nothing'}"])


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_no_section_empty(report, report_dir, titles):
    """The report has the sections `titles` (each given by its start), in order, and none of them
    is empty: each holds a table or a figure, every table has rows and a value (not –) somewhere
    in every column (a result field or log key the report stopped reading comes out as a column
    of –), and every figure is drawn."""
    parts = report.split("\n## ")[1:]
    found = [part.split("\n", 1)[0] for part in parts]
    assert len(found) == len(titles) and all(map(str.startswith, found, titles)), found
    for title, part in zip(found, parts):
        tables, table = [], []
        for line in part.splitlines() + [""]:
            if line.startswith("|"):
                table.append([c.strip() for c in line.strip("|").split("|")])
            elif table:
                tables.append(table)
                table = []
        figures = re.findall(r"\]\(([^)]+\.png)\)", part)
        assert tables or figures, title
        for header, _, *rows in tables:
            assert rows, (title, header)
            for j, column in enumerate(header):
                assert any(row[j] != "–" for row in rows), (title, column)
        for png in figures:
            assert_drawn(os.path.join(report_dir, png))


def test_the_rl_study_report_from_its_committed_seeds(tmp_path):
    """--from_results on the RL study's first two seeds as results/rl_study.sh commits them
    (results.json and the training logs) reads every result field and log key they hold: no
    section of the report is empty, and the numbers the README quotes over those seeds come out."""
    folders = [os.path.join(ROOT, "results", "rl_study", f"seed{s}") for s in (1, 2)]
    evaluate.main([f"--out_dir={tmp_path}", f"--from_results={','.join(folders)}"])
    report = open(tmp_path / "report" / "report.md").read()
    titles = ["Accuracy per split", "Accuracy per world", "Paired differences", "Power"]
    titles += ["RL diagnostics", "EI-probe accuracy", "Training curves"]
    assert_no_section_empty(report, tmp_path / "report", titles)
    # every key the training curves draw is in the committed logs: no panel is left blank
    for name, keys in (("sft_ei", evaluate.SFT_CURVES), ("rl_exgrpo", evaluate.RL_CURVES)):
        log = read_log(os.path.join(folders[0], "logs", f"{name}.jsonl"))
        assert [k for k in keys if not any(k in r for r in log)] == [], name
    # the probes of the first 60 test_id problems were scored (the seeds' settings)
    assert "(explanatory consistency, the first 60 test_id problems of each world)" in report
    exgrpo, bonus_off = "EXGRPO (rl_exgrpo)", "SFT + dialogue RL + aux (rl_exgrpo_nobonus)"
    differences = lambda b: cells(report, "Paired differences", [f"{exgrpo} − {b}", "2"])
    assert differences("EI-SFT (sft_ei)")[-1] == "+3.3 [+1.4, +5.2] *"
    assert differences(bonus_off)[-1] == "-0.1 [-1.8, +1.7]"
    # pairs answered apart, σ_s, σ_p, σ_e, S, P, the MDE now and the seeds it needs to reach 2
    power = lambda b, mean: " | ".join(cells(report, "Power", [f"{exgrpo} − {b}", mean]))
    assert power("EI-SFT (sft_ei)", "+3.3") == "1313 / 8000 | 1.4 | 0.0 | 40.5 | 2 | 4000 | 3.0 | 5"
    assert power(bonus_off, "-0.1") == "1007 / 8000 | 1.3 | 0.0 | 35.5 | 2 | 4000 | 2.8 | 4"
    # Scenario A accuracy of the rollouts (acc_full), KL, zero-std groups, the DSU fire rate, the
    # bonus's share of the advantages (adv_bonus_share), tokens trained and the last position
    assert " | ".join(cells(report, "RL diagnostics", [exgrpo])) == (
        "2 | 180 | 0.762 → 0.821 | +0.059 [+0.033, +0.085] * | 0.0128 | 0.25 | 0.21 | 0.115 | "
        "4658 | 418"
    )


def test_the_first_study_report_from_its_committed_results(tmp_path, monkeypatch):
    """The first study (results/study.sh) committed the results.json of one evaluation over its
    five seeds as results/study.json, and its report as results/report.md, not the run folders.
    Split back into one folder per seed, named as they were, --from_results draws every section
    those results hold (the RL diagnostics, the curves and the linear probes need logs and probe
    files that were not committed), none of them empty, with the committed report's numbers."""
    saved = json.load(open(os.path.join(ROOT, "results", "study.json")))
    by_run = {}
    for path, e in saved["checkpoints"].items():
        by_run.setdefault(e["run"], {})[path] = e
    monkeypatch.chdir(tmp_path)
    for run, checkpoints in by_run.items():
        os.makedirs(run)
        with open(os.path.join(run, "results.json"), "w") as f:
            json.dump({"settings": saved["settings"], "checkpoints": checkpoints}, f)
    evaluate.main(["--out_dir=again", f"--from_results={','.join(by_run)}"])
    report = open(os.path.join("again", "report", "report.md")).read()
    titles = ["Accuracy per split", "Accuracy per world", "Paired differences", "Power"]
    titles += ["EI-probe accuracy", "Data efficiency"]
    assert_no_section_empty(report, os.path.join("again", "report"), titles)
    committed = open(os.path.join(ROOT, "results", "report.md")).read()
    numbers = lambda text: re.findall(r"[-+]?\d+(?:\.\d+)?", text)
    for title in titles:
        if title != "Power":  # the power section came after the first study
            assert numbers(section(report, title)) == numbers(section(committed, title)), title


def test_study_reading_by_hand():
    """What a committed study's interval says of a one-seed difference, each case by hand."""
    ci = lambda mean, lo, hi: stats.Interval(mean, lo, hi)
    read = evaluate.study_reading
    assert read(ci(5, 1, 9), ci(3, 1, 5), unfinished=True).startswith("interim")
    assert read(ci(5, 1, 9), ci(1, -1, 3), unfinished=False).endswith("not separable")
    assert read(ci(5, -1, 9), ci(3, 1, 5), unfinished=False).startswith("inside the noise")
    assert read(ci(-5, -9, -1), ci(3, 1, 5), unfinished=False).endswith("the other way**")
    assert read(ci(5, 1, 9), ci(3, 1, 5), unfinished=False) == "**confirmed** by the study"


def test_studies_section_sets_the_report_beside_the_committed_studies(tmp_path):
    """--studies: each of the report's differences beside the same rows of a committed study
    trained on the same share of the questions, the study's interval equal to the one its own
    report gives (the RL study's EI-SFT − vanilla SFT over its committed seeds), the
    study linked from the report, and an unfinished study read as interim."""
    seed1 = os.path.join(ROOT, "results", "rl_study", "seed1")
    studies = ["results/study.json", "results/rl_study/report/results.json"]
    evaluate.main(
        [
            f"--out_dir={tmp_path}",
            f"--from_results={seed1}",
            "--studies=" + ",".join(os.path.join(ROOT, p) for p in studies),
        ]
    )
    report = open(tmp_path / "report" / "report.md").read()
    section = report.split("## What the multi-seed studies say")[1].split("\n## ")[0]
    rows = [r for r in section.splitlines() if r.startswith("| EI-SFT (sft_ei) − vanilla SFT")]
    rl_study = [r for r in rows if "rl_study" in r]
    assert len(rl_study) == 1, rows
    cells = [c.strip() for c in rl_study[0].strip("|").split("|")]
    # the same interval as the study's own report (its "Paired differences", all splits)
    own = open(os.path.join(ROOT, "results", "rl_study", "report", "report.md")).read()
    row = [r for r in own.splitlines() if r.startswith("| EI-SFT (sft_ei) − vanilla SFT")][0]
    assert cells[3] == row.strip("|").split("|")[-1].strip()
    assert cells[4] == "interim: the study has not reached its stopping rule"
    # the first study trained its 10% rows as sft_ei_f10 and sft_qa_f10: they count at 10%
    assert any("results/study.json" in r for r in rows)
    link = re.search(r"\]\(([^)]+rl_study[^)]+)\)", rl_study[0]).group(1)
    assert os.path.isfile(os.path.join(tmp_path, "report", link))


def test_a_missing_study_is_one_clear_sentence(tmp_path):
    seed1 = os.path.join(ROOT, "results", "rl_study", "seed1")
    with pytest.raises(SystemExit, match="--studies: .*nowhere.json does not exist"):
        evaluate.main(
            [f"--out_dir={tmp_path}", f"--from_results={seed1}", "--studies=nowhere.json"]
        )
