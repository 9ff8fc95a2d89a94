"""probe.py: the linear probes recover a planted direction and nothing from noise; activations
are read at the right, padding-independent tokens; a briefly trained student's state is readable."""

import json
import random

import pytest
import torch

import probe
import tasks
import worlds
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


def control_task(types, y, seed=0):
    """Control-task class indices for token types (ints), as run_probes makes them."""
    labels = probe.control_labels(types.tolist(), y.tolist(), seed)
    return torch.tensor(labels)[:500], torch.tensor(labels)[500:]


@pytest.mark.parametrize("n_classes", [2, 3])
def test_planted_direction_is_found_and_controls_stay_at_chance(n_classes):
    x, y = synthetic(700, 32, n_classes, strength=4.0, seed=n_classes)
    types = torch.randint(12, (700,), generator=torch.Generator().manual_seed(1))  # unrelated to x
    r = probe.probe_layer(
        x[:500], y[:500], x[500:], y[500:], n_classes, CFG, seed=0, control=control_task(types, y)
    )
    assert r["lr_acc"] > 0.97 and r["mm_acc"] > 0.97
    assert abs(r["control_acc"] - 1 / n_classes) < 0.12
    assert abs(r["control_task_acc"] - 1 / n_classes) < 0.12
    assert r["selectivity"] > 0.8 - 1 / n_classes


def test_pure_noise_stays_at_chance():
    x, y = synthetic(700, 32, 2, strength=0.0, seed=7)
    types = torch.randint(12, (700,), generator=torch.Generator().manual_seed(1))
    r = probe.probe_layer(
        x[:500], y[:500], x[500:], y[500:], 2, CFG, seed=0, control=control_task(types, y)
    )
    for key in ("lr_acc", "mm_acc", "control_acc", "control_task_acc"):
        assert abs(r[key] - 0.5) < 0.12, (key, r)
    assert abs(r["selectivity"]) < 0.12
    assert r["lr_train_acc"] > r["lr_acc"]  # it does fit the train noise; it just cannot transfer


def test_control_task_catches_a_probe_that_memorises_token_types():
    """Features that only say which of 12 token types sits there, and a target that happens to be
    a function of the type: the probe scores ~1 and the shuffled-label control ~0.5, so the probe
    looks informative. The control task (another random function of the type) scores ~1 as well:
    selectivity ~0 says the probe read token identity, not a state."""
    g = torch.Generator().manual_seed(3)
    types = torch.randint(12, (700,), generator=g)
    x = torch.randn(12, 32, generator=g)[types] + 0.3 * torch.randn(700, 32, generator=g)
    y = torch.tensor([0, 1] * 6)[types]
    r = probe.probe_layer(
        x[:500], y[:500], x[500:], y[500:], 2, CFG, seed=0, control=control_task(types, y)
    )
    assert r["lr_acc"] > 0.97 and abs(r["control_acc"] - 0.5) < 0.15
    assert r["control_task_acc"] > 0.97 and abs(r["selectivity"]) < 0.05


def test_control_labels_are_a_fixed_balanced_function_of_the_type():
    rng = random.Random(0)
    types = [rng.choice(NAMES * 2 + ["Gus", "Hal"]) for _ in range(600)]  # uneven type counts
    labels = [rng.choice(["heads", "heads", "tails"]) for _ in types]  # 2:1 real balance
    control = probe.control_labels(types, labels, seed=0)
    assert set(control) == {"heads", "tails"}
    assert len({(t, c) for t, c in zip(types, control)}) == len(set(types))  # one label per type
    biggest = max(types.count(t) for t in set(types))
    assert abs(control.count("heads") - labels.count("heads")) <= biggest
    assert control == probe.control_labels(types, labels, seed=0)
    assert control != probe.control_labels(types, labels, seed=1)


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
    return {
        "id": f"coin-{i}",
        "world": "coin",
        "split": "test_id",
        "question": question,
        "answer": answer,
        "rationale": f"The answer is {answer}.",
        "latent": {
            "name": "side",
            "states": states,
            "event_ends": ends,
            "query_start": ends[-1] + 1,
        },
        "probes": [],
    }


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
                assert tok.decode(ids[: t + 1]) == "Q: " + r["question"][:end]
        elif positions == "last":
            ((t, y),) = rows
            assert tok.decode(ids[t : t + 1]) == "?" and y == r["latent"]["states"][-1]
        else:
            assert rows == [(len(ids) - 1, r["latent"]["states"][-1])] and ids == tasks.prompt_ids(
                tok, r["question"]
            )


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
        hidden = model.residual_stream(torch.tensor([seqs[s]]))
    torch.testing.assert_close(batched[:, -1], torch.stack(hidden)[:, 0, t], rtol=1e-5, atol=1e-5)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_other_vocabulary_or_missing_latent_is_a_clear_error(hand_made, tmp_path):
    records, _, model = hand_made
    small = CompactTokenizer.from_texts(["Q: A coin is heads up.\nA:"])  # knows none of the names
    save_checkpoint(
        str(tmp_path / "other.pt"),
        GPT(GPTConfig(**PRESETS["nano"], vocab_size=small.n_vocab)),
        small,
    )
    write_jsonl(tmp_path / "test_id.jsonl", records)
    with pytest.raises(SystemExit, match="other.pt cannot encode the questions of .*test_id.jsonl"):
        probe.main(
            [
                f"--checkpoints={tmp_path / 'other.pt'}",
                f"--data={tmp_path}",
                f"--out_dir={tmp_path}",
            ]
        )
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
    problems = worlds.make_dataset(
        "coin", {"train": 400, "test_id": 400}, seed=0, events=(1, 3), n_facts=0
    )
    records = {s: [tasks.to_record(p) for p in ps] for s, ps in problems.items()}
    tok = CompactTokenizer.from_texts(
        [f"Q: {r['question']}\nA: {r['rationale']}" for rs in records.values() for r in rs]
    )
    rows = [
        tasks.prompt_ids(tok, r["question"]) + tasks.response_ids(tok, r["rationale"])
        for r in records["train"]
    ]
    x = torch.full((len(rows), max(map(len, rows))), tok.eot)
    y = torch.full_like(x, -1)
    for i, (r, ids) in enumerate(zip(records["train"], rows)):
        n_prompt = len(tasks.prompt_ids(tok, r["question"]))
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, n_prompt - 1 : len(ids) - 1] = x[i, n_prompt : len(ids)]  # loss on the response only
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

    probe.main(
        [
            f"--checkpoints=trained={tmp_path / 'trained.pt'},init:{tmp_path / 'trained.pt'}",
            f"--data={tmp_path}",
            f"--out_dir={tmp_path / 'probe'}",
            "--target=answer",
            "--positions=last",
            "--max_problems=0",
            "--iters=300",
        ]
    )
    result = json.loads((tmp_path / "probe" / "probe_coin_answer_last.json").read_text())
    assert (tmp_path / "probe" / "probe_coin_answer_last.png").stat().st_size > 0
    assert result["test_problems"] == result["test_rows"] == 120 and result["classes"] == [
        "no",
        "yes",
    ]
    trained, untrained = result["checkpoints"]["trained"], result["checkpoints"]["trained (init)"]
    assert len(trained["lr_acc"]) == config.n_layer + 1 and trained["merged_positions"] == 0
    assert len(untrained["lr_acc"]) == config.n_layer + 1
    assert trained["lr_acc"][-1] > result["majority_acc"] + 0.15, result
    assert abs(trained["control_acc"][-1] - 0.5) < 0.15, result
    assert "intervention" not in result  # the causal test needs event rows of the latent state

    probe.main(
        [
            f"--checkpoints=trained={tmp_path / 'trained.pt'}",
            f"--data={tmp_path}",
            f"--out_dir={tmp_path / 'probe'}",
            "--iters=50",
            "--controls=1",
            "--intervene_problems=10",
            "--alphas=0,2",
            "--intervene_layers=1",
        ]
    )
    result = json.loads((tmp_path / "probe" / "probe_coin_state_event.json").read_text())
    assert (tmp_path / "probe" / "probe_coin_state_event_intervention.png").stat().st_size > 0
    assert result["intervention"] == {
        "layers": [1],
        "alphas": [0.0, 2.0],
        "problems": 10,
        "position": "the last event's token of each test problem",
    }
    edits, sel = (
        result["checkpoints"]["trained"]["intervention"],
        result["checkpoints"]["trained"]["selectivity"],
    )
    assert (
        len(edits["toward"]) == len(edits["random"]) == 1
        and edits["toward"][0][0] == edits["random"][0][0]
    )
    assert len(sel) == config.n_layer + 1 and result["control_types"] == len(worlds.NAMES["train"])


def test_control_types_name_the_event(hand_made):
    records, _, _ = hand_made
    for r in records:
        # "Ann flips the coin" -> Ann
        actors = [s.split()[0] for s in r["question"].split(". ")[1:-1]]
        assert (
            probe.control_types(r, "event") == actors
            and probe.control_types(r, "last") == actors[-1:]
        )
    swap = tasks.to_record(
        worlds.make_dataset("swap", {"test_id": 1}, seed=0, n_facts=1)["test_id"][0]
    )
    p = worlds.make_dataset("swap", {"test_id": 1}, seed=0, n_facts=1)["test_id"][0]
    assert probe.control_types(swap, "event") == [p.ctx["people"][e[1]] for e in p.events]


# ---------------------------------------------------------------------------------------------
# the causal test


def prompts_and_tokens(records, tok):
    """Each hand-made record's prompt and the token index of its last event."""
    out = [
        (ids, rows[-1][0])
        for ids, rows, _ in (probe.probe_rows(tok, r, "event", "state") for r in records)
    ]
    # prompts of different lengths: generate() left-pads
    assert len({len(ids) for ids, _ in out}) > 1
    return out


def test_alpha_zero_leaves_outputs_bitwise_unchanged(hand_made):
    records, tok, model = hand_made
    cases = [{"prompt": ids, "token": t} for ids, t in prompts_and_tokens(records, tok)]
    zero = torch.zeros(len(cases), model.config.n_embd)
    plain = probe.answers_under_edit(model, tok, cases, 12)
    for layer in range(model.config.n_layer):
        assert (
            probe.answers_under_edit(model, tok, cases, 12, layer, 0.0 * torch.randn_like(zero))
            == plain
        )
    x = probe.pad_rows([c["prompt"] for c in cases], "cpu")
    positions = torch.tensor([c["token"] for c in cases])
    with torch.no_grad():
        logits, _ = model(x)
        with probe.residual_edit(model, 1, positions, zero):
            assert torch.equal(model(x)[0], logits)
        with probe.residual_edit(model, 1, positions, torch.randn_like(zero)):  # the hook is live
            assert not torch.equal(model(x)[0], logits)
        assert torch.equal(model(x)[0], logits)  # and gone after the block


def test_edit_lands_on_each_rows_token_inside_generate(hand_made):
    """generate() left-pads the prompts: the edit must hit row b's token t at padded position
    longest - len + t, in the prefill only. Read the block's output inside generate, with and
    without the edit: it differs exactly there, by delta, and what sits there is what row b
    computes alone at token t."""
    records, tok, model = hand_made
    cases = [{"prompt": ids, "token": t} for ids, t in prompts_and_tokens(records, tok)]
    longest, layer = max(len(c["prompt"]) for c in cases), 1
    delta = torch.randn(len(cases), model.config.n_embd)
    runs = []
    for edit in (None, delta):  # read the next block's input: the edited output of block `layer`
        seen = []
        handle = model.transformer.h[layer].register_forward_pre_hook(
            lambda _, args: seen.append(args[0])
        )
        probe.answers_under_edit(model, tok, cases, 3, layer, edit)
        handle.remove()
        runs.append(seen)
    (plain, *steps), (edited, *edited_steps) = runs
    assert plain.shape == (len(cases), longest, model.config.n_embd) and len(steps) == 2
    # one token per step: the edit was in the prefill
    assert all(s.size(1) == 1 for s in steps + edited_steps)
    diff = (edited - plain).abs().sum(-1) > 0
    for b, c in enumerate(cases):
        pos = longest - len(c["prompt"]) + c["token"]
        assert diff[b].nonzero().flatten().tolist() == [pos]
        torch.testing.assert_close(edited[b, pos] - plain[b, pos], delta[b])
        with torch.no_grad():
            hidden = model.residual_stream(torch.tensor([c["prompt"]]))
        torch.testing.assert_close(
            plain[b, pos], hidden[layer][0, c["token"]], rtol=1e-4, atol=1e-4
        )


class Planted(torch.nn.Module):
    """generate()'s contract (prompts left-padded to the longest, one prefill through transformer.h)
    around a planted rule: the answer is yes iff the residual stream after block 1, at the token
    holding the coin's side (H or T), has a positive first coordinate u."""

    WORDS = ["", "H", "T", "x", " The answer is yes.", " The answer is no."]

    def __init__(self, d, g):
        super().__init__()
        self.transformer = torch.nn.ModuleDict(
            dict(drop=torch.nn.Identity(), h=torch.nn.ModuleList([torch.nn.Identity()]))
        )
        self.emb = torch.randn(len(self.WORDS), d, generator=g)
        self.emb[1:3] = 0
        # H = +u, T = -u, fillers 0 along u
        self.emb[:, 0] = torch.tensor([0.0, 1.0, -1.0, 0.0, 0.0, 0.0])

    def generate(self, prompts, max_new_tokens, temperature, eot):
        longest = max(map(len, prompts))
        idx = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
        x = self.transformer.h[0](self.transformer.drop(self.emb[idx]))
        at = ((idx == 1) | (idx == 2)).float().argmax(1)
        yes = x[torch.arange(len(prompts)), at, 0] > 0
        return torch.where(yes, 4, 5)[:, None], torch.ones(len(prompts), 1, dtype=torch.bool)

    decode = lambda self, ids: "".join(self.WORDS[i] for i in ids)
    eot = 0


def test_planted_answer_flips_at_the_expected_alpha_and_not_along_random_directions():
    """H rows sit at u . x = +1 and T rows at -1, so the class means are 2 apart along u: an edit of
    alpha class-mean gaps moves a row to +-(1 - 2 alpha), and the answer flips once alpha > 0.5.
    A random direction of the same norm moves u . x by ~2 alpha / sqrt(d): never enough."""
    g, d, n = torch.Generator().manual_seed(0), 256, 60
    model = tok = Planted(d, g)
    rng = random.Random(0)
    prompts, rows, y = [], [], []
    for i in range(n):
        side, before, after = rng.randrange(2), rng.randrange(6), rng.randrange(6)
        prompts.append([3] * before + [1 + side] + [3] * after)
        rows.append((i, before))
        y.append(side)
    records = [{"world": "coin", "question": "Is the coin heads up now?"}] * n
    cases = probe.intervention_cases(
        records,
        prompts,
        rows,
        torch.tensor(y),
        ["heads", "tails"],
        torch.zeros(n, dtype=torch.bool),
        limit=n,
        seed=0,
    )
    assert [c["implied"] for c in cases] == ["no" if s == 0 else "yes" for s in y]
    y_train = torch.arange(200) % 2
    noise_off_u = 0.1 * torch.randn(200, d, generator=g) * (torch.arange(d) > 0)
    x_train = model.emb[1 + y_train] + noise_off_u
    alphas = [0, 0.25, 0.45, 0.55, 1, 2]
    out = probe.intervene(
        model, tok, cases, [None, x_train], y_train, [1], alphas, seed=0, max_new_tokens=1
    )
    assert out["toward"] == [[0, 0, 0, 1, 1, 1]]
    assert out["random"] == [[0] * len(alphas)] and out["answered"] == [[1] * len(alphas)]
    # the same edit one token off (on a filler) moves nothing: the position matters
    moved = [
        dict(c, token=c["token"] + 1 if c["token"] + 1 < len(c["prompt"]) else c["token"] - 1)
        for c in cases
    ]
    assert probe.intervene(model, tok, moved, [x_train, x_train], y_train, [0], [0, 2], 0, 1)[
        "toward"
    ] == [[0, 0]]


def test_flips_are_the_answers_the_other_state_implies():
    coin = {
        "world": "coin",
        "question": "A coin is heads up. Tom flips the coin. Is the coin heads up now?",
    }
    swap = {
        "world": "swap",
        "question": "Tom has a ball, Ann has a hat, and Bob has a pen. Tom and Ann swap items. "
        "What does Tom have now? Options: (A) pen (B) hat (C) ball.",
    }
    assert (
        probe.implied_answer(coin, "heads") == "yes" and probe.implied_answer(swap, "ball") == "C"
    )
    assert probe.other_state(coin, "tails", ["heads", "tails"], random.Random(0)) == "heads"
    assert {
        probe.other_state(swap, "hat", ["ball", "hat", "pen"], random.Random(s)) for s in range(20)
    } == {"ball", "pen"}
    # ball: no class mean
    assert probe.other_state(swap, "hat", ["hat", "pen"], random.Random(0)) == "pen"
    cases = [{"record": coin, "implied": "no"}] * 3 + [{"record": swap, "implied": "C"}] * 2
    texts = [
        "Tom flips, tails. The answer is no.",
        "The answer is yes.",
        "tails tails tails",
        "Tom ball. The answer is ball.",
        "The answer is (C). The answer is A.",
    ]
    assert probe.count_flips(cases, texts) == (2 / 5, 4 / 5)


def test_untrained_reference_is_drawn_from_the_run_seed():
    config = GPTConfig(**PRESETS["nano"], vocab_size=50)
    a, b, c = (probe.untrained(config, s, "cpu").transformer.wte.weight for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
