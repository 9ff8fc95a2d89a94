"""invert.py: the teacher filters (Eq. 1 with a teacher that errs on purpose), the JSONL reader's
messages, the checkpoint teacher, and byte-identical reruns. (The difficulty filter, Eq. 2, is
distill_rl.py's: tests/test_distill_rl.py.)"""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

import invert
import tasks
import worlds
from model import GPT, GPTConfig, save_checkpoint
from tokenizer import CompactTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def records():
    out = []
    for world in ("arith", "swap"):
        for p in worlds.make_dataset(world, {"train": 6}, seed=5)["train"]:
            out.append(tasks.to_record(p, tasks.ei_probes(p, seed=5)))
    return out


class ErringTeacher(tasks.OracleTeacher):
    """The oracle, except that it answers Q wrong when one of the chosen probes is in front of it,
    and answers the chosen questions themselves wrong."""

    def __init__(self, records, distracting=(), wrong=()):
        super().__init__(records)
        self.distracting, self.wrong = set(distracting), set(wrong)

    def respond(self, dialogues):
        right = super().respond(dialogues)
        return [
            "The answer is 1234."
            if q in self.wrong or any(t[0] in self.distracting for t in turns)
            else r
            for (turns, q), r in zip(dialogues, right)
        ]


def test_consistency_filter_removes_exactly_the_distracting_probes(records):
    distracting = [
        r["probes"][i]["question"] for r in records for i in (1, 4) if len(r["probes"]) > 4
    ]
    kept, removed = invert.consistency_filter(ErringTeacher(records, distracting), records)
    questions = lambda recs: {pr["question"] for r in recs for pr in r["probes"]}
    assert questions(records) - questions(kept) == set(distracting)
    assert sum(removed.values()) == len(distracting) > 0
    assert removed == dict(
        Counter(pr["rule"] for r in records for pr in r["probes"] if pr["question"] in distracting)
    )
    # Eq. 1 removes probes, never questions
    assert [r["id"] for r in kept] == [r["id"] for r in records]
    same, none = invert.consistency_filter(tasks.OracleTeacher(records), records)
    assert same == records and none == {}


def test_teacher_answers_drop_what_the_teacher_gets_wrong(records):
    bad_q, bad_probe = records[2]["question"], records[0]["probes"][3]
    erring = ErringTeacher(records, wrong=[bad_q, bad_probe["question"]])
    kept, counts = invert.teacher_answers(erring, records)
    assert [r["id"] for r in kept] == [r["id"] for r in records if r["question"] != bad_q]
    assert counts == {"removed_teacher_wrong": 1, "removed_probe_wrong": {bad_probe["rule"]: 1}}
    assert bad_probe not in kept[0]["probes"]
    assert len(kept[0]["probes"]) == len(records[0]["probes"]) - 1


GOOD = {"question": "What is 2 + 2?", "answer": "4", "rationale": "2 + 2 = 4. The answer is 4."}


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"question": "x"', r"bad\.jsonl:2: not valid JSON .*expected one JSON object per line"),
        (
            "[1, 2]",
            r"bad\.jsonl:2: expected a JSON object with question, answer, rationale, got list",
        ),
        (
            json.dumps({k: v for k, v in GOOD.items() if k != "answer"}),
            r"bad\.jsonl:2: missing field 'answer' \(expected",
        ),
        (
            json.dumps({**GOOD, "answer": 4}),
            r"bad\.jsonl:2: field 'answer' must be a non-empty string, got 4",
        ),
        (
            json.dumps({**GOOD, "question": ""}),
            r"bad\.jsonl:2: field 'question' must be a non-empty string, got \"\"",
        ),
        (
            json.dumps({**GOOD, "rationale": "It is four."}),
            r"bad\.jsonl:2: the rationale must end with 'The answer is 4\.'",
        ),
        (
            json.dumps({**GOOD, "probes": {"question": "a"}}),
            r"bad\.jsonl:2: field 'probes' must be a list of objects",
        ),
        (json.dumps({**GOOD, "probes": ["a"]}), r"bad\.jsonl:2: probes\[0\] must be an object"),
        (
            json.dumps({**GOOD, "probes": [{"question": "a", "answer": "1"}]}),
            r"bad\.jsonl:2: probes\[0\]\.rationale must be a non-empty string, got null",
        ),
        (
            json.dumps(
                {
                    **GOOD,
                    "probes": [{"question": "a", "answer": 1, "rationale": "The answer is 1."}],
                }
            ),
            r"bad\.jsonl:2: probes\[0\]\.answer must be a non-empty string, got 1",
        ),
        (
            json.dumps(
                {
                    **GOOD,
                    "probes": [{"question": "a", "answer": "1", "rationale": "The answer is 2."}],
                }
            ),
            r"bad\.jsonl:2: probes\[0\]\.rationale must end with 'The answer is 1\.'",
        ),
    ],
)
def test_bad_jsonl_lines_stop_with_file_line_and_expectation(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(SystemExit, match=message):
        tasks.load_records(str(path))


def test_user_jsonl_becomes_train_split(tmp_path):
    path = tmp_path / "mine.jsonl"
    probe = {
        "question": "What is 1 + 1?",
        "answer": "2",
        "rationale": "1 + 1 = 2. The answer is 2.",
    }
    path.write_text(
        json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": "b", "probes": [probe]}) + "\n"
    )
    cfg = invert.Config(out_dir=str(tmp_path / "run"), input_jsonl=str(path))
    data, stats = invert.build(cfg)
    got = tasks.load_records(str(tmp_path / "run" / "data" / "train.jsonl"))
    assert [r["id"] for r in got] == [f"{path}:1", "b"]
    assert got[1]["probes"] == [{**probe, "rule": "user"}]
    assert all(r["world"] == "user" and r["split"] == "train" and r["latent"] is None for r in got)
    assert sorted(os.listdir(tmp_path / "run" / "data")) == ["stats.json", "train.jsonl"]


def test_load_records_filters_by_world(tmp_path, records):
    path = tmp_path / "r.jsonl"
    invert.write_jsonl(str(path), records)
    assert tasks.load_records(str(path)) == records
    swap = tasks.load_records(str(path), world="swap")
    assert [r["id"] for r in swap] == [r["id"] for r in records if r["world"] == "swap"] and swap


SMALL = dict(n_train=12, n_val=3, n_test=3, n_ood=3, worlds="coin,date")


def test_rerun_is_byte_identical_and_atomic(tmp_path):
    cfg = invert.Config(out_dir=str(tmp_path), **SMALL)
    invert.build(cfg)
    folder = tmp_path / "data"
    first = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    # no temp files left
    assert sorted(first) == sorted([f"{s}.jsonl" for s in worlds.SPLITS] + ["stats.json"])
    stamps = {f: os.path.getmtime(folder / f) for f in first if f.endswith(".jsonl")}
    os.utime(folder / "train.jsonl", (1, 1))  # an old stamp, to tell "left alone" from "rewritten"
    invert.build(cfg)
    assert first == {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    # same bytes: the split is left alone (evaluate --reuse)
    assert os.path.getmtime(folder / "train.jsonl") == 1
    assert all(os.path.getmtime(folder / f) == t for f, t in stamps.items() if f != "train.jsonl")
    stats = json.loads(first["stats.json"])
    assert stats["splits"]["train"] == {
        "coin": {"problems": 12, "probes": stats["splits"]["train"]["coin"]["probes"]},
        "date": {"problems": 12, "probes": stats["splits"]["train"]["date"]["probes"]},
    }
    assert stats["train_filters"]["coin"]["removed_inconsistent"] == {}
    assert set(stats["token_lengths_gpt2_train"]) >= {
        "question",
        "rationale",
        "probe_question",
        "probe_rationale",
    }


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown rule \['because'\]"):
        invert.build(invert.Config(out_dir=str(tmp_path), rules="verify,because", **SMALL))
    with pytest.raises(SystemExit, match="ood_long must be longer"):
        invert.build(invert.Config(out_dir=str(tmp_path), max_events=6, **SMALL))


def test_checkpoint_teacher_answers_through_the_prompt_format(tmp_path, records):
    texts = [t for r in records for t in ("Q: " + r["question"] + "\nA:", " " + r["rationale"])]
    tok = CompactTokenizer.from_texts(texts)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=tok.n_vocab, block_size=256))
    save_checkpoint(str(tmp_path / "t.pt"), model, tok)
    teacher = invert.CheckpointTeacher(str(tmp_path / "t.pt"), batch_size=3, max_new_tokens=8)
    too_long = [(records[0]["question"], records[0]["rationale"])] * 6
    assert len(tasks.dialogue_ids(tok, too_long, records[1]["question"])) + 8 > 256
    unreadable = [([], "Zebra quagga?"), (too_long, records[1]["question"])]
    dialogues = [([], r["question"]) for r in records[:4]] + unreadable
    said = teacher.respond(dialogues)
    assert len(said) == 6 and all(isinstance(s, str) for s in said)
    # unreadable: tokens outside the vocabulary / longer than the block
    assert said[4] == "" and said[5] == ""
    expect = []
    for _, q in dialogues[:4]:  # greedy, one prompt at a time, decoded the same way
        out, mask = model.generate([tasks.prompt_ids(tok, q)], 8, temperature=0, eot=tok.eot)
        generated = [t for t, m in zip(out[0].tolist(), mask[0].tolist()) if m and t != tok.eot]
        expect.append(tok.decode(generated).strip())
    assert said[:4] == expect
    kept, removed = invert.consistency_filter(teacher, records[:2])
    given = sum(len(r["probes"]) for r in records[:2])
    assert sum(len(r["probes"]) for r in kept) + sum(removed.values()) == given


def test_cli_writes_dataset_and_prints_stats(tmp_path):
    args = [f"--out_dir={tmp_path}"] + [f"--{k}={v}" for k, v in SMALL.items()]
    run = subprocess.run(
        [sys.executable, "invert.py"] + args,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr
    assert (
        "train" in run.stdout
        and "tokens question" in run.stdout
        and f"wrote {tmp_path}" in run.stdout
    )
    assert (tmp_path / "data" / "train.jsonl").stat().st_size > 0
