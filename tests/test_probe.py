"""probe.py: the linear probes recover a planted direction and nothing from noise; activations
are read at the right, padding-independent tokens; a briefly trained student's state is readable."""
import json
import random

import pytest
import torch

import probe
import tasks
from model import GPT, PRESETS, GPTConfig, save_checkpoint
from tokenizer import CompactTokenizer

CFG = probe.Config(iters=300)


def synthetic(n, d, n_classes, strength, seed):
    """Gaussian noise plus strength * (a class-specific direction); strength 0 = pure noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(n_classes, (n,), generator=g)
    directions = torch.randn(n_classes, d, generator=g)
    directions = directions / directions.norm(dim=1, keepdim=True)
    return torch.randn(n, d, generator=g) + strength * directions[y], y


@pytest.mark.parametrize("n_classes", [2, 3])
def test_planted_direction_is_found_and_control_stays_at_chance(n_classes):
    x, y = synthetic(700, 32, n_classes, strength=4.0, seed=n_classes)
    r = probe.probe_layer(x[:500], y[:500], x[500:], y[500:], n_classes, CFG, seed=0)
    assert r["lr_acc"] > 0.97 and r["mm_acc"] > 0.97
    assert abs(r["control_acc"] - 1 / n_classes) < 0.12


def test_pure_noise_stays_at_chance():
    x, y = synthetic(700, 32, 2, strength=0.0, seed=7)
    r = probe.probe_layer(x[:500], y[:500], x[500:], y[500:], 2, CFG, seed=0)
    for key in ("lr_acc", "mm_acc", "control_acc"):
        assert abs(r[key] - 0.5) < 0.12, (key, r)
    assert r["lr_train_acc"] > r["lr_acc"]  # it does fit the train noise; it just cannot transfer


def test_split_keeps_problems_whole_and_unseen_test_classes_count_as_wrong():
    problems = [p for p in range(20) for _ in range(3)]
    train = probe.split_by_problem(problems, 0.7, seed=0)
    assert int(train.sum()) == 14 * 3
    for p in range(20):
        assert len({bool(train[i]) for i, q in enumerate(problems) if q == p}) == 1
    y, classes = probe.encode_labels(["a", "b", "c"], torch.tensor([True, True, False]))
    assert classes == ["a", "b"] and y.tolist() == [0, 1, -1]


NAMES = ["Ann", "Bob", "Cleo", "Dmitri", "Eve", "Farouk"]


def coin_record(i, rng):
    """A record in the INTERFACES.md schema, built by hand: the positions test does not depend
    on how tasks.py words its worlds."""
    side, states, question = "heads", ["heads"], "A coin is heads up."
    ends = []
    for _ in range(rng.randint(1, 5)):
        name, flip = rng.choice(NAMES), rng.random() < 0.5
        question += f" {name} {'flips' if flip else 'does not flip'} the coin."
        side = {"heads": "tails", "tails": "heads"}[side] if flip else side
        states.append(side)
        ends.append(len(question))
    question += " Is the coin still heads up?"
    answer = "yes" if side == "heads" else "no"
    return {"id": f"coin-{i}", "world": "coin", "split": "test_id", "question": question,
            "answer": answer, "rationale": f"The answer is {answer}.",
            "latent": {"name": "side", "states": states, "event_ends": ends,
                       "query_start": ends[-1] + 1}, "probes": []}


@pytest.fixture(scope="module")
def hand_made():
    rng = random.Random(0)
    records = [coin_record(i, rng) for i in range(12)]
    tok = CompactTokenizer.from_texts(["Q: " + r["question"] + "\nA: yes no" for r in records])
    torch.manual_seed(0)
    model = GPT(GPTConfig(**PRESETS["nano"], vocab_size=tok.n_vocab)).eval()
    return records, tok, model


@pytest.mark.parametrize("positions", probe.POSITIONS)
def test_positions_are_the_named_tokens(hand_made, positions):
    records, tok, _ = hand_made
    for r in records:
        ids, rows, merged = probe.probe_rows(tok, r, positions, "state")
        assert merged == 0  # "." never merges with the " Name" that follows
        if positions == "event":
            assert [y for _, y in rows] == r["latent"]["states"][1:]
            for (t, _), end in zip(rows, r["latent"]["event_ends"]):
                # the prompt up to and including token t is "Q: " + the question up to event i
                assert tok.decode(ids[:t + 1]) == "Q: " + r["question"][:end]
        elif positions == "last":
            (t, y), = rows
            assert tok.decode(ids[t:t + 1]) == "?" and y == r["latent"]["states"][-1]
        else:
            assert rows == [(len(ids) - 1, r["latent"]["states"][-1])] and ids == tasks.prompt_ids(tok, r["question"])


def test_padded_batch_reads_what_each_row_computes_alone(hand_made):
    records, tok, model = hand_made
    seqs, rows = [], []
    for r in records:
        ids, pos, _ = probe.probe_rows(tok, r, "event", "state")
        rows += [(len(seqs), t) for t, _ in pos]
        seqs.append(ids)
    assert len({len(s) for s in seqs}) > 1  # the batch really is padded
    batched = probe.collect_hidden(model, seqs, rows, batch_size=len(seqs), device="cpu")
    alone = probe.collect_hidden(model, seqs, rows, batch_size=1, device="cpu")
    assert batched.shape == (model.config.n_layer + 1, len(rows), model.config.n_embd)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    # and each row alone, computed without probe.py, at its own token
    with torch.no_grad():
        s, t = rows[-1]
        _, _, hidden = model(torch.tensor([seqs[s]]), return_hidden=True)
    torch.testing.assert_close(batched[:, -1], torch.stack(hidden)[:, 0, t], rtol=1e-5, atol=1e-5)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_other_vocabulary_or_missing_latent_is_a_clear_error(hand_made, tmp_path):
    records, _, model = hand_made
    small = CompactTokenizer.from_texts(["Q: A coin is heads up.\nA:"])  # knows none of the names
    save_checkpoint(str(tmp_path / "other.pt"), GPT(GPTConfig(**PRESETS["nano"], vocab_size=small.n_vocab)), small)
    write_jsonl(tmp_path / "test_id.jsonl", records)
    with pytest.raises(SystemExit, match="other.pt cannot encode the questions of .*test_id.jsonl"):
        probe.main([f"--checkpoints={tmp_path / 'other.pt'}", f"--data={tmp_path}", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="no problems of world 'swap'"):
        probe.main([f"--checkpoints={tmp_path / 'other.pt'}", f"--data={tmp_path}", "--world=swap"])


def test_briefly_trained_student_carries_its_answer_at_the_last_layer(tmp_path):
    """The whole pipeline (checkpoints + JSONL -> JSON + PNG) on a nano student trained for 300
    steps on coin problems (prompt -> rationale): its last-layer linear probe reads the yes/no
    answer at the last question token well above the majority baseline. Beside it the same
    network freshly initialised ('init:'), as the CLI compares checkpoints. Not asserted: trained
    beats untrained. On this world the sequence length alone (layer 0) reads the answer at ~0.62
    against a majority of 0.48, and what brief training adds depends on the seed (last layer
    0.69-0.92 over 4 seeds)."""
    problems = tasks.make_dataset("coin", {"train": 400, "test_id": 400}, seed=0, events=(1, 3), n_facts=0)
    records = {s: [tasks.to_record(p) for p in ps] for s, ps in problems.items()}
    tok = CompactTokenizer.from_texts([f"Q: {r['question']}\nA: {r['rationale']}" for rs in records.values() for r in rs])
    rows = [tasks.prompt_ids(tok, r["question"]) + tasks.response_ids(tok, r["rationale"]) for r in records["train"]]
    x = torch.full((len(rows), max(map(len, rows))), tok.eot)
    y = torch.full_like(x, -1)
    for i, (r, ids) in enumerate(zip(records["train"], rows)):
        n_prompt = len(tasks.prompt_ids(tok, r["question"]))
        x[i, :len(ids)] = torch.tensor(ids)
        y[i, n_prompt - 1:len(ids) - 1] = x[i, n_prompt:len(ids)]  # loss on the response only
    torch.manual_seed(0)
    config = GPTConfig(**PRESETS["nano"], vocab_size=tok.n_vocab)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = torch.randint(len(rows), (32,), generator=g)
        _, loss = model(x[batch], y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(str(tmp_path / "trained.pt"), model, tok)
    write_jsonl(tmp_path / "test_id.jsonl", records["test_id"])

    probe.main([f"--checkpoints=trained={tmp_path / 'trained.pt'},init:{tmp_path / 'trained.pt'}", f"--data={tmp_path}",
                f"--out_dir={tmp_path / 'probe'}", "--target=answer", "--positions=last", "--max_problems=0",
                "--iters=300"])
    result = json.loads((tmp_path / "probe" / "probe_coin_answer_last.json").read_text())
    assert (tmp_path / "probe" / "probe_coin_answer_last.png").stat().st_size > 0
    assert result["test_problems"] == result["test_rows"] == 120 and result["classes"] == ["no", "yes"]
    trained, untrained = result["checkpoints"]["trained"], result["checkpoints"]["trained (init)"]
    assert len(trained["lr_acc"]) == config.n_layer + 1 and trained["merged_positions"] == 0
    assert len(untrained["lr_acc"]) == config.n_layer + 1
    assert trained["lr_acc"][-1] > result["majority_acc"] + 0.15, result
    assert abs(trained["control_acc"][-1] - 0.5) < 0.15, result
