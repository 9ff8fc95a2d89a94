"""The paper's EI rules over the worlds' problems, the oracle teacher, and what every stage shares:
the prompt format (EOT separates turns), answer extraction and checking, the JSONL record with its
checked reader, greedy answering and the SFT data format.

The EI rules are functions over the structured problem (worlds.py), so every EI probe comes with an
exact rationale and answer; a rule that does not fit a problem returns None. Probe questions restate
the story, because the student sees them alone.
"""

import json
import os
import random
import re
from dataclasses import asdict, dataclass, replace

from model import pad_rows
from tokenizer import decode_generated
from worlds import (
    FACTS,
    ORD,
    WORLDS,
    after,
    chain,
    explain,
    layout,
    make_facts,
    query,
    question,
    solve,
    story,
)

# ---- the EI rules: (forward problem, rng) -> Probe or None ----


@dataclass
class Probe:
    rule: str
    question: str
    rationale: str
    answer: str


def about(p, rule, tail, body, ans):
    """A probe that restates p's story, then asks tail; its rationale is body, then the answer."""
    return Probe(rule, f"{story(p)} {tail}", f"{body} The answer is {ans}.", ans)


def counterfactual(p, rng):
    got = WORLDS[p.world].perturb(p, rng)  # (the changed problem, its changed sentence) or None
    if got is None:
        return None
    alt, changed = got
    return Probe("counterfactual", f"{story(p)} Suppose instead: {changed} {query(p)}", *solve(alt))


def step_challenge(p, rng):
    w, i = WORLDS[p.world], rng.randrange(len(p.events))
    got = w.effect(p, p.events[i])  # (question, reason, answer) or None
    if got is None:
        return None
    ask, reason, ans = got
    event = w.event_text(p, p.events[i], p.tpl[i + 1])
    return about(p, "step_challenge", f"Consider the event: {event} {ask}", reason, ans)


def decompose(p, rng):
    w, n = WORLDS[p.world], len(p.events)
    if n < 2:
        return None
    i, states = rng.randint(1, n - 1), chain(p)
    steps = explain(p, states, p.events, i) + w.conclusion(p, states[i], False)
    return about(p, "decompose", w.ask(p, after(i, n)), " ".join(steps), w.answer(p, states[i]))


def verify(p, rng):
    w, n, states = WORLDS[p.world], len(p.events), chain(p)
    i = rng.randint(1, n)
    true = w.value(p, states[i])
    said = true if rng.random() < 0.5 else w.wrong(p, states[i], rng)
    steps = explain(p, states, p.events, i) + [f"{true} is {'' if said == true else 'not '}{said}."]
    return about(
        p,
        "verify",
        f"Is it true that {w.claim(p, said)} {after(i, n)}?",
        " ".join(steps),
        "yes" if said == true else "no",
    )


def cause(p, rng):
    got = WORLDS[p.world].cause(p, chain(p))
    return got and about(p, "cause", *got)


def compare(p, rng):
    return about(p, "compare", *WORLDS[p.world].compare(p, chain(p)))


def hypothesis(p, rng):
    w, n = WORLDS[p.world], len(p.events)
    ok = [i for i in range(n) if chain(p, p.events[:i] + p.events[i + 1 :])]
    if not ok:
        return None
    i = rng.choice(ok)
    events = p.events[:i] + p.events[i + 1 :]
    old, new = w.value(p, chain(p)[-1]), w.value(p, chain(p, events)[-1])
    steps = (
        [f"Without the {ORD[i]} event:"]
        + explain(p, chain(p, events), events)
        + [f"{new} is {'' if old == new else 'not '}{old}."]
    )
    return about(
        p,
        "hypothesis",
        f"Skip the {ORD[i]} event. Is it still true that {w.claim(p, old)} at the end?",
        " ".join(steps),
        "yes" if old == new else "no",
    )


def process(p, rng):
    w, states = WORLDS[p.world], chain(p)
    return about(
        p,
        "process",
        f"List {w.what(p)} after each event.",
        " ".join(explain(p, states, p.events)),
        ", ".join(w.value(p, s) for s in states[1:]),
    )


def premise(p, rng):
    got = p.facts and WORLDS[p.world].premise(p, chain(p), rng)
    if not got:
        return None
    kind, used, target = got
    _, t, name, n, item = p.facts[0]
    unused = str(n) if kind == "number" else name
    a, b = rng.sample([unused, used], 2)
    fact = FACTS[t].format(name=name, n=n, item=item)[:-1]
    return about(
        p,
        "premise",
        f"Which {kind} does not affect {target}: {a} or {b}?",
        f"The fact that {fact} is not used.",
        unused,
    )


def analogy(p, rng):
    alt = WORLDS[p.world].analogue(p, rng)
    if alt is None:
        return None
    alt.facts = make_facts(replace(alt, facts=[]), rng, [f[0] for f in p.facts])
    return Probe("analogy", question(alt), *solve(alt))


def inverse(p, rng):
    """Off by default: RevThink's backward question, the exact format of ood_reverse."""
    back = replace(p, reverse=True)
    return Probe("inverse", question(back), *solve(back))


# every rule but inverse, which asks ood_reverse's exact question
DEFAULT_RULES = (
    "counterfactual",
    "step_challenge",
    "decompose",
    "verify",
    "cause",
    "compare",
    "hypothesis",
    "process",
    "premise",
    "analogy",
)
EI_RULES = {
    f.__name__: f
    for f in (
        counterfactual,
        step_challenge,
        decompose,
        verify,
        cause,
        compare,
        hypothesis,
        process,
        premise,
        analogy,
        inverse,
    )
}


def ei_probes(p, rules=DEFAULT_RULES, seed=0):
    """The EI probes of a problem, rules in order (a rule that does not fit gives none). The rules
    read the forward problem: an ood_reverse problem gets the same kind of probes as any other."""
    fwd, out = replace(p, reverse=False), []
    for name in rules:
        probe = EI_RULES[name](fwd, random.Random(f"{seed}|{p.id}|{name}"))
        if probe and probe.question != question(p):
            out.append(probe)
    return out


def to_record(p, probes=()):
    """The JSON record of a problem, with the oracle's rationale: id, world, split, question,
    answer, rationale (the whole response, ending "The answer is <answer>."), probes [{rule,
    question, rationale, answer}] and latent (for probe.py): name, states (a label after 0, 1, ...,
    n events), event_ends (offset in question just past event i's sentence), query_start (where the
    query begins). Latents: arith the count's last digit, coin the side up, light the colour, date
    the month, swap who holds the asked object (the variable the answer reads out)."""
    w, (q, ends, qstart), (rationale, answer) = WORLDS[p.world], layout(p), solve(p)
    return {
        "id": p.id,
        "world": p.world,
        "split": p.split,
        "question": q,
        "answer": answer,
        "rationale": rationale,
        "latent": {
            "name": w.latent_name,
            "states": [w.latent(p, s) for s in chain(p)],
            "event_ends": ends,
            "query_start": qstart,
        },
        "probes": [asdict(pr) for pr in probes],
    }


class OracleTeacher:
    """The exact solver as a teacher. It answers the questions worlds.py and the EI rules rendered
    (problems and probes, passed in as records) and ignores any dialogue in front: an exact solver
    cannot be distracted."""

    def __init__(self, records):
        self.known = {}
        for r in records:
            self.known[r["question"]] = r["rationale"]
            self.known.update((pr["question"], pr["rationale"]) for pr in r["probes"])

    def respond(self, dialogues):
        """dialogues: [(turns [(question, response)], question)] -> [response]."""
        missing = [q for _, q in dialogues if q not in self.known]
        if missing:
            raise ValueError(
                f"the oracle teacher only answers the generated questions, not {missing[0]!r}"
            )
        return [self.known[q] for _, q in dialogues]


# ---- prompt format (every stage) and answer checking ----


def prompt_ids(tok, question):
    return tok.encode("Q: " + question + "\nA:")


def response_ids(tok, response):
    return tok.encode(" " + response) + [tok.eot]


def dialogue_ids(tok, turns, question):
    """A multi-turn prompt: each earlier (question, response) turn, EOT-terminated, then the
    question."""
    ids = []
    for q, r in turns:
        ids += prompt_ids(tok, q) + response_ids(tok, r)
    return ids + prompt_ids(tok, question)


def extract_answer(text):
    """X of the last "The answer is X." in text, or None."""
    found = re.findall(r"The answer is ([^.\n]*)", text)
    return (found[-1].strip() or None) if found else None


def normalise(x):
    x = re.sub(r"\s+", " ", x.strip().rstrip(".").strip().lower())
    x = re.sub(r"\s*,\s*", ", ", re.sub(r"^\((\w)\)$", r"\1", x))
    return re.sub(r"\b0+(?=\d)", "", x)  # "07" -> "7", "march 05" -> "march 5"


def is_correct(world, text, gold, question=None):
    """Whether the last "The answer is X." in text matches gold ("7", "7." and "07" match 7;
    "seven" does not). In the swap world, given the question, an option may be named by letter or
    by object."""
    pred = extract_answer(text)
    if pred is None:
        return False
    pred, gold = normalise(pred), normalise(gold)
    if world == "swap" and question:
        letter = {o.lower(): L.lower() for L, o in re.findall(r"\(([A-Z])\) (\w+)", question)}
        pred, gold = letter.get(pred, pred), letter.get(gold, gold)
    return pred == gold


# ---- records on disk (invert.py writes them; every later stage reads them with load_records) ----


def check_record(r, where, rationale=True):
    """Fill a user's record up to our schema; stop with where (file:line) and what was expected.
    With rationale=False a record may leave its rationale out (None: an LLM teacher writes it,
    invert.py)."""
    if not isinstance(r, dict):
        raise SystemExit(
            f"{where}: expected a JSON object with question, answer, rationale, "
            f"got {type(r).__name__}"
        )
    fields = (
        ("question", str, None),
        ("answer", str, None),
        ("rationale", str, None),
        ("probes", list, []),
        ("id", str, where),
        ("world", str, "user"),
        ("split", str, "train"),
    )
    for key, typ, default in fields:
        if key == "rationale" and not rationale and r.get(key) is None:
            r[key] = None
            continue
        if key not in r and default is None:
            raise SystemExit(f"{where}: missing field '{key}' (expected a non-empty string)")
        r.setdefault(key, default)
        if not isinstance(r[key], typ) or (typ is str and not r[key]):
            expected = "a non-empty string" if typ is str else "a list of objects"
            raise SystemExit(f"{where}: field '{key}' must be {expected}, got {json.dumps(r[key])}")
    # a rationale left out (None) has nothing to check yet
    if r["rationale"] is not None:
        if not is_correct(r["world"], r["rationale"], r["answer"], r["question"]):
            raise SystemExit(
                f"{where}: the rationale must end with 'The answer is {r['answer']}.' "
                "(the record's answer)"
            )
    for k, pr in enumerate(r["probes"]):
        if not isinstance(pr, dict):
            raise SystemExit(
                f"{where}: probes[{k}] must be an object with question, rationale, answer"
            )
        pr.setdefault("rule", "user")
        for key in ("rule", "question", "rationale", "answer"):
            if not isinstance(pr.get(key), str) or not pr[key]:
                got = json.dumps(pr.get(key))
                raise SystemExit(
                    f"{where}: probes[{k}].{key} must be a non-empty string, got {got}"
                )
        if not is_correct(r["world"], pr["rationale"], pr["answer"], pr["question"]):
            raise SystemExit(
                f"{where}: probes[{k}].rationale must end with 'The answer is {pr['answer']}.'"
            )
    r.setdefault("latent", None)
    return r


def load_records(path, world=None, rationale=True):
    """The records of a JSONL file (ours, or a user's with question, answer, rationale and optional
    probes, id, world), checked line by line; optionally only one world's. rationale=False: see
    check_record."""
    if not os.path.isfile(path):
        raise SystemExit(
            f"{path} is not a file" if os.path.exists(path) else f"{path} does not exist"
        )
    out = []
    # bytes, decoded line by line: a bad encoding is named with its line
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SystemExit(f"{path}:{n}: not UTF-8 text; save the file as UTF-8") from None
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(
                        f"{path}:{n}: not valid JSON ({e.msg}); expected one JSON object per line"
                    ) from None
                r = check_record(r, f"{path}:{n}", rationale)
                if world is None or r["world"] == world:
                    out.append(r)
    return out


def read_split(data_dir, split, worlds=None, required=True):
    """The records of data_dir/{split}.jsonl, the file invert.py writes, optionally only the given
    worlds'. A missing file is [] when not required (a user's data may bring only train), else an
    error that says how to make it."""
    path = os.path.join(data_dir, f"{split}.jsonl")
    if not os.path.isfile(path):
        if not required:
            return []
        raise SystemExit(
            f"{path} does not exist: "
            f"run `python invert.py --out_dir={os.path.dirname(data_dir)}` first"
        )
    return [r for r in load_records(path) if worlds is None or r["world"] in worlds]


def greedy_answers(model, tok, questions, max_new_tokens, batch_size=128):
    """Greedy single-turn responses, the question alone in the prompt: how accuracy is measured."""
    texts = []
    for i in range(0, len(questions), batch_size):
        prompts = [prompt_ids(tok, q) for q in questions[i : i + batch_size]]
        texts += decode_generated(
            tok, *model.generate(prompts, max_new_tokens, temperature=0, eot=tok.eot)
        )
    return texts


def accuracy(model, tok, records, max_new_tokens):
    """The share of records answered right, greedily and single turn."""
    answers = greedy_answers(model, tok, [r["question"] for r in records], max_new_tokens)
    right = sum(
        is_correct(r["world"], a, r["answer"], r["question"]) for r, a in zip(records, answers)
    )
    return right / max(1, len(records))


def sft_examples(tok, records):
    """Per record, the token pairs (prompt, response) of Q and of each of its EI probes."""
    pair = lambda q, r: (prompt_ids(tok, q), response_ids(tok, r))
    return [
        (
            pair(r["question"], r["rationale"]),
            [pair(p["question"], p["rationale"]) for p in r["probes"]],
        )
        for r in records
    ]


def sft_batch(examples, device):
    """(x, y) for teacher forcing. An example is a list of (prompt, response) turns; x is their
    concatenation without its last token, y the next tokens with -1 on prompts and on padding,
    so only responses (EOS included) are trained."""
    seqs = [[t for p, r in ex for t in p + r] for ex in examples]
    labels = [[t for p, r in ex for t in [-1] * len(p) + r] for ex in examples]
    return pad_rows(seqs, device)[:, :-1], pad_rows(labels, device, fill=-1)[:, 1:]
