"""evaluate.py: accuracies equal hand counts (answers fixed by a stub, and by a tiny real model that
always answers "yes"), seeds aggregate to the hand-computed mean ± std, the report lists every
split and method, the figures are written, --reuse skips unchanged checkpoints, and missing
inputs stop with one sentence."""

import json
import os
import shutil

import matplotlib.image
import numpy as np
import pytest
import torch

import evaluate
from model import GPT, PRESETS, GPTConfig, save_checkpoint
from tasks import prompt_ids, response_ids
from tokenizer import CompactTokenizer

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
        run, name = (
            os.path.basename(os.path.dirname(os.path.dirname(loaded[-1]))),
            os.path.basename(loaded[-1])[:-3],
        )
        return [
            f"Because. The answer is {GOLD[items[q][1]][0 if items[q][0] in RIGHT[run, name] else 1]}."
            for q in questions
        ]

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


def cells(report, section, first):
    """The cells after `first` in the row that starts with them, in the table under "## <section>"."""
    text = [part for part in report.split("\n## ") if part.startswith(section)][0]
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]
    found = [r[len(first) :] for r in rows if r[: len(first)] == first]
    assert len(found) == 1, (section, first, report)
    return found[0]


def test_accuracy_equals_hand_count_and_seeds_aggregate(stub_runs):
    tmp_path, _ = stub_runs
    report, results = run_main(tmp_path)
    # sft_qa, s1: test_id 3/4, ood_long 1/4, ood_reverse 0/4, ood_names 4/4 (split mean 0.5);
    #         s2: 1/4, 2/4, 1/4, 4/4 (mean 0.5). Mean ± sample std of two values a, b: |a - b| / sqrt(2).
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
    # per world, sft_qa coin: test_id 2/2 and 1/2; ood_long 1/2, 1/2; ood_reverse 0/2, 1/2; ood_names 2/2, 2/2
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
    assert diff[4].endswith("*") and not diff[1].endswith(
        "*"
    )  # 4 of 4 worse excludes 0; 1 of 4 better does not
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
        image = matplotlib.image.imread(str(folder / png))
        assert (
            image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0
        )  # a drawn figure, not blank


def test_reuse_evaluates_only_changed_checkpoints(stub_runs):
    tmp_path, loaded = stub_runs
    first, _ = run_main(tmp_path)
    assert len(loaded) == 4
    changed = tmp_path / "s2" / "ckpt" / "sft_qa.pt"
    os.utime(changed, (1, 1))
    second, _ = run_main(tmp_path, "--reuse=True")
    assert loaded[4:] == [str(changed)] and second == first
    os.utime(
        tmp_path / "s1" / "data" / "ood_names.jsonl", (1, 1)
    )  # regenerated data: s1's checkpoints again
    run_main(tmp_path, "--reuse=True")
    assert sorted(os.path.basename(p) for p in loaded[5:]) == [
        "rl_exgrpo.pt",
        "sft_qa.pt",
        "sft_qa_f25.pt",
    ]
    run_main(
        tmp_path, "--reuse=True", "--max_new_tokens=20"
    )  # other settings: every checkpoint again
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
    evaluate.main(
        [f"--out_dir={tmp_path / 'run'}", "--batch_size=4", "--device=cpu", "--max_new_tokens=48"]
    )  # block 128
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


def test_paired_bootstrap_by_hand():
    assert evaluate.paired_bootstrap(np.zeros((3, 5))) == (0.0, 0.0, 0.0)
    assert evaluate.paired_bootstrap(np.ones((2, 4))) == (1.0, 1.0, 1.0)
    d = np.array([[1, 0, 0, -1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 1, -1, 0]], dtype=float)  # mean 4/16
    mean, lo, hi = evaluate.paired_bootstrap(d)
    assert mean == 4 / 16 and -1 < lo < mean < hi < 1
    assert evaluate.paired_bootstrap(d) == (mean, lo, hi)  # seeded: the same interval every time
    wide = evaluate.paired_bootstrap(d[:, :4])
    assert wide[2] - wide[1] > hi - lo  # fewer problems, a wider interval


def test_rise_by_hand():
    step_up = [
        0,
        0,
        1,
        0,
        0,
        1,
        1,
        0,
        1,
        1,
    ]  # 20% of 10 steps = 2: first window (0, 0), last (1, 1)
    assert evaluate.rise([step_up]) == (0.0, 1.0, 1.0, 1.0, 1.0)
    flat = [0.5] * 10
    first, last, up, lo, hi = evaluate.rise([step_up, flat])
    assert (first, last, up) == (0.25, 0.75, 0.5)
    assert 0 <= lo < up < hi <= 1  # resampling the two run folders spreads the rise between 0 and 1
    noisy = [
        0,
        1,
        0,
        1,
        0,
        1,
        0,
        1,
        0,
        1,
        1,
        0,
        1,
        0,
        1,
        0,
        1,
        0,
        1,
        0,
    ]  # windows of 4: means 0.5 and 0.5
    assert (
        evaluate.rise([noisy])[2] == 0 and evaluate.rise([noisy])[3] < 0 < evaluate.rise([noisy])[4]
    )


def test_rl_diagnostics_come_from_the_logs(stub_runs):
    tmp_path, _ = stub_runs
    report, _ = run_main(tmp_path)
    # stub log: 5 steps of acc_full 0.4, kl 0.01 * step, fire rate 0.3; 20% of 5 steps = 1 step per window
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
    assert (
        "vanilla SFT" not in report.split("## RL diagnostics")[1].split("\n## ")[0]
    )  # SFT logs hold no rollouts


def test_rows_without_the_bonus_show_no_fire_rate(tmp_path):
    write_jsonl(
        str(tmp_path / "logs" / "rl_exgrpo_plain.jsonl"),
        [{"step": 1, "acc_full": 0.5, "dsu_fire_rate": 0.0}],
    )
    entry = lambda bonus: {"run": str(tmp_path), "config": {"dsu_bonus": bonus}}
    assert evaluate.training_logs([entry(False)], "rl_exgrpo_plain")[0][0]["dsu_fire_rate"] is None
    assert evaluate.training_logs([entry(True)], "rl_exgrpo_plain")[0][0]["dsu_fire_rate"] == 0.0
    assert evaluate.training_logs([entry(True)], "rl_grpo") == []  # no log, no curve


def test_probe_problems_scores_the_probes_of_the_first_problems_only(stub_runs):
    tmp_path, _ = stub_runs
    report, saved = run_main(tmp_path, "--probe_problems=1")
    assert (
        "## EI-probe accuracy per rule (explanatory consistency, the first 1 test_id problems of each world)"
        in report
    )
    for e in saved[
        "checkpoints"
    ].values():  # one problem per world: each rule's cell counts 1 probe, not 2
        assert {w: c[1] for w, c in e["probes"]["decompose"].items()} == {"coin": 1, "arith": 1}
        assert (
            sum(len(c) for c in e["correct"].values()) == 16
        )  # every test problem is still scored


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
        dict(
            name=base(c) + ("_f25" if f < 1 else ""),
            run=run,
            config=dict(c, data_fraction=f),
            acc={"test_id": {"coin": [right.count("1"), 4]}},
            correct={"test_id": right},
        )
        for run, c, f, right in runs
    ]
    report = "\n" + "\n".join(evaluate.efficiency_section(entries, str(tmp_path)))
    assert "run folders r1, r2 only" in report
    assert cells(report, "Data efficiency", ["method"]) == ["25%", "100%"]
    # vanilla 25%: 1/4 and 2/4; 100%: 3/4 and 4/4 (r3's 0/4 left out). Std of two values: |a - b| / sqrt(2)
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
    assert (
        evaluate.efficiency_section(
            [e for e in entries if e["config"]["data_fraction"] == 1], str(tmp_path)
        )
        == []
    )
    # a study whose every row trains on one share names its rows plainly: they are its main rows
    plain = [dict(e, name=evaluate.split_name(e["name"])[0]) for e in entries]
    assert evaluate.efficiency_section(plain, str(tmp_path)) == []


def test_linear_probe_means_and_spread_over_run_folders_by_hand(tmp_path):
    """Two run folders' probe.py results: each cell is the mean ± sample std of the per-folder values,
    the control's mean in brackets; the first folder's figure is copied beside the report."""
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
    # layer 1: accuracy 0.7 and 0.9 (mean 0.8, sample std 0.2 / sqrt(2) = 0.14); selectivity 0.2 and 0.4
    rows = [line for line in report.splitlines() if line.startswith("| vanilla |")]
    assert rows[0] == "| vanilla | 0.50 ± 0.00 (0.50) | 0.80 ± 0.14 (0.40) |"
    assert rows[1] == "| vanilla | +0.00 ± 0.00 (0.50) | +0.30 ± 0.14 (0.60) |"
    assert "n = 2" in report and section in report
    assert (
        "](probe_coin_state_event.png)" in report
        and (report_dir / "probe_coin_state_event.png").read_bytes() == b"r1"
    )


def test_variance_components_by_hand():
    d = np.array(
        [[3, 0, 1, 0], [3, 1, 2, 2], [3, 2, 0, 1]], dtype=float
    )  # S = 3 seeds, P = 4 problems
    # seed means 1, 2, 1.5; problem means 3, 1, 1, 1; grand mean 18/12 = 1.5
    # MS_S = 4 * (0.25 + 0.25 + 0) / 2 = 1;  MS_P = 3 * (2.25 + 3 * 0.25) / 3 = 3
    # residuals d - seed - problem + grand: rows (.5, -.5, .5, -.5), (-.5, -.5, .5, .5), (0, 1, -1, 0);
    # sum of squares 1 + 1 + 2 = 4 over (3 - 1)(4 - 1) = 6: MS_E = 2/3
    # var_seed = (1 - 2/3) / 4 = 1/12, var_problem = (3 - 2/3) / 3 = 7/9, var_residual = 2/3
    c = evaluate.variance_components(d)
    expected = dict(
        mean=1.5,
        ms_seed=1,
        ms_problem=3,
        ms_residual=2 / 3,
        var_seed=1 / 12,
        var_problem=7 / 9,
        var_residual=2 / 3,
    )
    assert c["seeds"] == 3 and c["problems"] == 4
    assert {k: c[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    # V(3, 4) = (1/12)/3 + (7/9)/4 + (2/3)/12 = (1 + 7 + 2)/36; z_0.975 + z_0.80 = 1.959964 + 0.841621
    assert evaluate.Z_POWER == pytest.approx(2.801585, abs=1e-6)
    assert evaluate.mde(c, 3, 4) == pytest.approx(evaluate.Z_POWER * (10 / 36) ** 0.5, abs=1e-12)
    # more seed than problem agreement: MS_S = MS_P = 0 < MS_E = 1 (residuals +-1/2 over 1 df); both clip to 0
    c = evaluate.variance_components(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert (c["var_seed"], c["var_problem"], c["var_residual"]) == (0.0, 0.0, 1.0)
    # one seed: no seed component, no MDE
    one = evaluate.power(np.ones((1, 5)), n_splits=1)
    assert one["var_seed"] is None and "mde" not in one and one["mean"] == 1.0


def test_variance_components_recover_a_known_truth():
    """0/1 answers of two rows on S = 200 seeds x P = 400 problems: row A right with probability
    0.5 + u_s + v_p (u_s = +-0.1: seed variance 0.01; v_p = +-0.2: problem variance 0.04), row B
    with probability 0.5 on its own. The residual is the coin flips' variance: E[pi (1 - pi)] for A,
    0.25 - 0.01 - 0.04 = 0.20, plus 0.25 for B = 0.45. Sampling error of each estimate is a few
    percent here (the seed component's, from the residual's noise over 200 seeds, about 3%): 10% holds."""
    rng = np.random.default_rng(0)
    u = rng.choice([-0.1, 0.1], size=(200, 1))
    v = rng.choice([-0.2, 0.2], size=(1, 400))
    y_a = rng.random((200, 400)) < 0.5 + u + v
    y_b = rng.random((200, 400)) < 0.5
    c = evaluate.power(y_a.astype(float) - y_b, n_splits=4)
    assert (c["var_seed"], c["var_problem"], c["var_residual"]) == pytest.approx(
        (0.01, 0.04, 0.45), rel=0.1
    )
    truth = evaluate.Z_POWER * (0.01 / 200 + 0.04 / 400 + 0.45 / (200 * 400)) ** 0.5
    assert c["mde"] == pytest.approx(truth, rel=0.05)


def test_seed_spread_sets_a_floor_that_more_problems_do_not_lower():
    # each seed shifts every problem alike: d[s, p] = u_s, u = (3, -1, 1, 1), sample variance
    # (4 + 4 + 0 + 0) / 3 = 8/3; nothing else varies. MDE(S', P') = Z sqrt(8/3 / S') for every P'
    seeds_only = evaluate.power(np.repeat([[3.0], [-1.0], [1.0], [1.0]], 6, axis=1), n_splits=1)
    assert (
        seeds_only["var_seed"] == pytest.approx(8 / 3, abs=1e-12)
        and seeds_only["var_residual"] == 0
    )
    for s, by_problems in seeds_only["grid"].items():
        assert list(by_problems) == [6, 1000, 4000]
        assert list(by_problems.values()) == pytest.approx(
            [evaluate.Z_POWER * (8 / 3 / s) ** 0.5] * 3, abs=1e-12
        )
    # MDE <= 2 needs 8/3 / S' <= (2 / Z)^2, S' >= 5.23: 6 seeds (5 give 2.05)
    assert seeds_only["seeds_for_target"] == 6
    # the mirror: each problem shifts every seed alike, v = (2, 0, 0, -2), variance 8/3; more seeds do nothing
    problems_only = evaluate.power(np.tile([2.0, 0.0, 0.0, -2.0], (3, 1)), n_splits=1)
    assert problems_only["var_seed"] == 0 and problems_only["var_problem"] == pytest.approx(
        8 / 3, abs=1e-12
    )
    assert problems_only["grid"][5] == pytest.approx(problems_only["grid"][40], abs=1e-12)
    assert problems_only["grid"][5][4] == pytest.approx(
        evaluate.Z_POWER * (8 / 3 / 4) ** 0.5, abs=1e-12
    )
    assert problems_only["seeds_for_target"] == 2


def test_power_section_in_the_report(stub_runs, monkeypatch):
    tmp_path, _ = stub_runs
    report, results = run_main(tmp_path)
    # only EXGRPO - vanilla SFT has both rows, on one seed (s1): the seed component cannot be estimated
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
    assert (
        list(results["power"]) == ["rl_exgrpo - sft_qa"]
        and results["power"]["rl_exgrpo - sft_qa"]["var_seed"] is None
    )
    # a second seed of EXGRPO that answers nothing right. d over the 16 problems (test_id, ood_long,
    # ood_reverse, ood_names): s1 0001 -1000 0000 -1-1-1-1 (mean -1/4), s2 -1000 -10-10 -1000 -1-1-1-1
    # (mean -1/2), grand mean -3/8. With two seeds the residual is +-(delta_p - mean delta)/2, delta = s1 - s2 =
    # 1001 0010 1000 0000 (mean 1/4, sample variance (4 - 16/16)/15 = 1/5): MS_E = (15/5)/2/15 = 1/10.
    # MS_S = 16 * 2 * (1/8)^2 = 1/2; problem means -.5 0 0 .5, -1 0 -.5 0, -.5 0 0 0, -1 -1 -1 -1:
    # sum of squares about -3/8 = 6 - 16 * 9/64 = 15/4, MS_P = 2 * (15/4) / 15 = 1/2.
    # var_seed = (1/2 - 1/10) / 16 = 1/40, var_problem = (1/2 - 1/10) / 2 = 1/5, var_residual = 1/10;
    # in points^2: 250, 2000, 1000 (sd 15.8, 44.7, 31.6).
    # MDE now: Z sqrt(250/2 + 2000/16 + 1000/32) = Z sqrt(281.25) = 47.0; S' = 5, P' = 16:
    # Z sqrt(50 + 125 + 12.5) = 38.4. At P' = 16000 the seed term alone needs S' >= 250 / (2/Z)^2 = 491
    (tmp_path / "s2" / "ckpt" / "rl_exgrpo.pt").write_bytes(
        (tmp_path / "s1" / "ckpt" / "rl_exgrpo.pt").read_bytes()
    )
    monkeypatch.setitem(RIGHT, ("s2", "rl_exgrpo"), set())
    report, results = run_main(tmp_path)
    assert cells(report, "Power", ["difference", "mean"])[-1] == "seeds for MDE ≤ 2 at P = 16000"
    assert cells(report, "Power", ["EXGRPO (rl_exgrpo) − vanilla SFT (sft_qa)", "-37.5"]) == [
        "14 / 32",
        "15.8",
        "44.7",
        "31.6",
        "2",
        "16",
        "47.0",
        "none up to 100",
    ]  # 6 + 8 nonzero d
    assert cells(report, "Power", ["difference", "S"]) == ["P = 16", "P = 4000", "P = 16000"]
    assert cells(report, "Power", ["EXGRPO (rl_exgrpo) − vanilla SFT (sft_qa)", "5"])[0] == "38.4"
    saved = results["power"]["rl_exgrpo - sft_qa"]
    assert (saved["var_seed"], saved["var_problem"], saved["var_residual"]) == pytest.approx(
        (250, 2000, 1000), abs=1e-9
    )
    assert (
        "EI-SFT" not in report.split("## Power")[1].split("\n## ")[0]
    )  # no sft_ei row: no comparison with it


def test_from_results_draws_the_report_without_checkpoints(stub_runs):
    """A study commits each seed's results.json and logs, not its checkpoints: --from_results on
    those folders gives the same accuracy, difference, power and RL sections as scoring the
    checkpoints, and loads no model."""
    tmp_path, loaded = stub_runs
    report, _ = run_main(tmp_path)
    committed = []
    for run in (
        "s1",
        "s2",
    ):  # one evaluation per seed, its JSON and logs copied: what a study commits
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
    section = lambda text, name: [p for p in text.split("\n## ") if p.startswith(name)][0]
    for name in ("Accuracy per split", "Paired differences", "Power", "RL diagnostics"):
        assert section(again, name) == section(report, name), name
    with pytest.raises(SystemExit, match="results.json does not exist"):
        evaluate.main([f"--out_dir={tmp_path / 'again'}", f"--from_results={tmp_path / 'nothing'}"])
