"""worlds.py and tasks.py checked against an independent reading of the rendered text: every
question is parsed back with regexes, its events simulated here (datetime for dates), and every
answer re-derived."""

import collections
import dataclasses
import datetime
import itertools
import json
import re

import pytest

import invert
import model
import tasks
import worlds

WORLDS = ("arith", "coin", "light", "date", "swap")
COLOURS = ("red", "green", "blue")
SIZES = {
    "train": 200,
    "val": 10,
    "test_id": 10,
    "ood_long": 30,
    "ood_reverse": 30,
    "ood_names": 30,
    "val_ood_long": 10,
    "val_ood_reverse": 10,
    "val_ood_names": 10,
}
ORD = "first second third fourth fifth sixth seventh eighth ninth tenth".split()
FACT = [
    (r"(\w+) is (\d+) years old\.", lambda m: ("fact", (m[1], int(m[2]), None))),
    (r"(\w+) wants a (\w+)\.", lambda m: ("fact", (m[1], None, m[2]))),
]


# ---- an independent reader of the rendered text ----


def sentences(text):
    return re.split(r"(?<=[.?]) (?=[A-Z])", text)


def read_query(world, q):
    """(ctx, reverse) from a problem's query sentence."""
    opts = re.search(r" Options: \(A\) (\w+) \(B\) (\w+) \(C\) (\w+)\.$", q)
    q = q[: opts.start()] if opts else q
    pats = {
        "arith": [
            r"How many (?P<item>\w+) (?P<v>does|did) (?P<h>\w+) have (?:now|at the end|at first)\?"
        ],
        "coin": [
            r"Is the coin still heads up\?",
            r"Is the coin heads up (?:now|at the end)\?",
            r"(?P<v>Was) the coin heads up at first\?",
        ],
        "light": [r"What colour (?P<v>is|was) the light (?:now|at the end|at first)\?"],
        "date": [r"On what date (?P<v>is|was) the (?P<thing>\w+) (?:now|at the end|at first)\?"],
        "swap": [r"Who (?P<v>has|had) the (?P<obj>\w+) (?:now|at the end|at first)\?"],
    }[world]
    for pat in pats:
        m = re.fullmatch(pat, q)
        if m:
            ctx = {k: v for k, v in m.groupdict().items() if k != "v"}
            if opts:
                ctx["options"] = list(opts.groups())
            return ctx, m.groupdict().get("v") in ("did", "Was", "was", "had")
    raise AssertionError(f"unreadable {world} query: {q!r}")


def patterns(world, ctx):
    """(regex, meaning) for every sentence a story may hold, given what the query named."""
    if world == "arith":
        H, it = ctx["h"], r"(\w+)"  # the item word, checked in read_sentence: singular for 1
        return FACT + [
            (rf"Now {H} has (\d+) {it}\.", lambda m: ("now", int(m[1]), m[2], int(m[1]))),
            (
                rf"{H} (?:has|starts with) (\d+) {it}\.",
                lambda m: ("init", int(m[1]), m[2], int(m[1])),
            ),
            (
                rf"{H} (?:buys|finds) (\d+) {it}\.",
                lambda m: ("event", ("add", int(m[1])), m[2], int(m[1])),
            ),
            (
                rf"\w+ gives {H} (\d+) {it}\.",
                lambda m: ("event", ("add", int(m[1])), m[2], int(m[1])),
            ),
            (
                rf"{H} gives (\d+) {it} to \w+\.",
                lambda m: ("event", ("sub", int(m[1])), m[2], int(m[1])),
            ),
            (
                rf"{H} (?:loses|sells) (\d+) {it}\.",
                lambda m: ("event", ("sub", int(m[1])), m[2], int(m[1])),
            ),
            (
                rf"{H} (?:doubles the|gets twice as many) {it}\.",
                lambda m: ("event", ("dbl", 2), m[1], None),
            ),
            (r"(\w+) has (\d+) (\w+)\.", lambda m: ("fact", (m[1], int(m[2]), m[3]))),
        ]
    if world == "coin":
        return FACT + [
            (
                r"(?:A coin is|The coin starts) (heads|tails) up\.",
                lambda m: ("init", m[1] == "heads"),
            ),
            (r"Now the coin is (heads|tails) up\.", lambda m: ("now", m[1] == "heads")),
            (
                r"(\w+) (?:flips the coin|turns the coin over)\.",
                lambda m: ("event", ("flip", m[1])),
            ),
            (
                r"(\w+) (?:does not flip the coin|leaves the coin alone)\.",
                lambda m: ("event", ("keep", m[1])),
            ),
            (r"(\w+) has (\d+) (\w+)\.", lambda m: ("fact", (m[1], int(m[2]), m[3]))),
        ]
    if world == "light":
        return FACT + [
            (r"(?:A light is|The light starts) (red|green|blue)\.", lambda m: ("init", m[1])),
            (r"Now the light is (red|green|blue)\.", lambda m: ("now", m[1])),
            (r"(\w+) (?:presses|pushes) the button\.", lambda m: ("event", ("press", m[1]))),
            (
                r"(\w+) (?:does not press the button|leaves the button alone)\.",
                lambda m: ("event", ("keep", m[1])),
            ),
            (r"(\w+) has (\d+) (\w+)\.", lambda m: ("fact", (m[1], int(m[2]), m[3]))),
        ]
    if world == "date":
        T, unit = ctx["thing"], r"(\d+) (day|week|month)(s?)"
        month = lambda name: datetime.datetime.strptime(name, "%B").month
        day = lambda m, i: datetime.date(2023, month(m[i]), int(m[i + 1]))
        ev = lambda n, u, s, sign: ("event", (u, sign * int(n)), s == ("" if n == "1" else "s"))
        return FACT + [
            (rf"\w+'s {T} is on (\w+) (\d+)\.", lambda m: ("init", day(m, 1))),
            (rf"\w+ plans a {T} for (\w+) (\d+)\.", lambda m: ("init", day(m, 1))),
            (rf"Now the {T} is on (\w+) (\d+)\.", lambda m: ("now", day(m, 1))),
            (rf"The {T} moves {unit} later\.", lambda m: ev(m[1], m[2], m[3], 1)),
            (rf"The {T} is delayed by {unit}\.", lambda m: ev(m[1], m[2], m[3], 1)),
            (rf"The {T} (?:moves|is moved) {unit} earlier\.", lambda m: ev(m[1], m[2], m[3], -1)),
            (r"(\w+) has (\d+) (\w+)\.", lambda m: ("fact", (m[1], int(m[2]), m[3]))),
        ]
    one = r"(\w+) (?:has|holds) a (\w+)"
    held = rf"{one}, {one}, and {one}\."
    return FACT + [
        (r"Now " + held, lambda m: ("now", dict(zip(m.groups()[::2], m.groups()[1::2])))),
        (held, lambda m: ("init", dict(zip(m.groups()[::2], m.groups()[1::2])))),
        (r"(\w+) and (\w+) (?:swap|switch) items\.", lambda m: ("event", (m[1], m[2]))),
        (r"(\w+) trades items with (\w+)\.", lambda m: ("event", (m[1], m[2]))),
        (r"(\w+) has (\d+) (\w+)\.", lambda m: ("fact", (m[1], int(m[2]), m[3]))),
    ]


def read_sentence(world, ctx, s):
    for pat, meaning in patterns(world, ctx):
        m = re.fullmatch(pat, s)
        if m:
            got = meaning(m)
            if world == "arith" and got[0] != "fact":
                noun = ctx["item"][:-1] if got[3] == 1 else ctx["item"]
                assert got[2] == noun, f"singular/plural: {s}"
                got = got[:2]
            if world == "date" and got[0] == "event":
                assert got[2], f"singular/plural: {s}"
                got = got[:2]
            return got
    raise AssertionError(f"unreadable {world} sentence: {s!r}")


def read(world, question):
    """A problem read back from its text: {ctx, reverse, init, final, events, facts, sentences}."""
    sents = sentences(question)
    if world == "swap":
        sents = sents[:-2] + [sents[-2] + " " + sents[-1]]  # "Who has the ball now? Options: ..."
    ctx, reverse = read_query(world, sents[-1])
    out = {
        "ctx": ctx,
        "reverse": reverse,
        "init": None,
        "final": None,
        "events": [],
        "facts": [],
        "event_sents": [],
        "fact_sents": [],
    }
    for s in sents[:-1]:
        kind, what = read_sentence(world, ctx, s)
        if kind == "event":
            out["events"].append(what)
            out["event_sents"].append(s)
        elif kind == "fact":
            out["facts"].append(what)
            out["fact_sents"].append(s)
        else:
            out["init" if kind == "init" else "final"] = what
    return out


def is_event(world, ctx, s):
    try:
        return read_sentence(world, ctx, s)[0] == "event"
    except AssertionError:
        return False


def step(world, s, e):
    if world == "arith":
        s = s + e[1] if e[0] == "add" else s - e[1] if e[0] == "sub" else 2 * s
        assert 0 <= s <= 99
        return s
    if world == "coin":
        return s != (e[0] == "flip")
    if world == "light":
        return COLOURS[(COLOURS.index(s) + (e[0] == "press")) % 3]
    if world == "date":
        unit, k = e
        if unit == "month":
            return datetime.date(2023, (s.month - 1 + k) % 12 + 1, s.day)  # raises on April 31
        return (s + datetime.timedelta(days=k * (7 if unit == "week" else 1))).replace(year=2023)
    s = dict(s)
    s[e[0]], s[e[1]] = s[e[1]], s[e[0]]
    return s


def simulate(world, init, events):
    states = [init]
    for e in events:
        states.append(step(world, states[-1], e))
    return states


def value(world, ctx, s):
    return {
        "arith": lambda: str(s),
        "coin": lambda: "heads" if s else "tails",
        "light": lambda: s,
        "date": lambda: f"{s:%B} {s.day}",
        "swap": lambda: holder(ctx, s),
    }[world]()


def holder(ctx, s):
    return [person for person, obj in s.items() if obj == ctx["obj"]][0]


def answer(world, ctx, s):
    if world == "coin":
        return "yes" if s else "no"
    if world == "swap":
        return "ABC"[ctx["options"].index(holder(ctx, s))]
    return value(world, ctx, s)


def candidates(world, final):
    if world == "arith":
        return range(100)
    if world == "coin":
        return (True, False)
    if world == "light":
        return COLOURS
    if world == "date":
        return [datetime.date(2023, 1, 1) + datetime.timedelta(days=i) for i in range(365)]
    return [dict(zip(final, objs)) for objs in itertools.permutations(final.values())]


def solve(world, prob):
    """The answer, re-derived: forward by simulation, reverse by trying every initial state."""
    if not prob["reverse"]:
        return answer(world, prob["ctx"], simulate(world, prob["init"], prob["events"])[-1])
    fits = []
    for c in candidates(world, prob["final"]):
        try:
            if simulate(world, c, prob["events"])[-1] == prob["final"]:
                fits.append(c)
        except (AssertionError, ValueError):
            pass
    assert len(fits) == 1, "a reverse question must have exactly one answer"
    return answer(world, prob["ctx"], fits[0])


# ---- fixtures ----


@pytest.fixture(scope="module", params=WORLDS)
def data(request):
    """(world, {split: records with every rule's probes}) at invert.py's default design; a record
    asked backwards (ood_reverse, and the train share) also carries its problem asked forward
    ('forward'), whose story its probes restate."""
    world, out = request.param, {}
    for split, ps in worlds.make_dataset(world, SIZES, seed=7, **design()).items():
        out[split] = [tasks.to_record(p, tasks.ei_probes(p, tasks.EI_RULES, seed=7)) for p in ps]
        for r, p in zip(out[split], ps):
            if p.reverse:
                r["forward"] = tasks.to_record(dataclasses.replace(p, reverse=False))
    return world, out


def design():
    """make_dataset's keyword arguments as invert.py passes them by default."""
    c = invert.Config()
    return dict(
        events=(c.min_events, c.max_events),
        long_events=(c.long_min_events, c.long_max_events),
        n_facts=(c.min_facts, c.max_facts),
        long_facts=(c.long_min_facts, c.long_max_facts),
        reverse_share=c.reverse_share,
        facts_decay=c.facts_decay,
    )


ENTITIES = {
    pool: set(worlds.NAMES[pool] + worlds.ITEMS[pool] + worlds.OBJECTS[pool])
    for pool in ("train", "ood")
}


def words(text):
    return set(re.findall(r"\w+", text))


def roles(world, question):
    """(entities in the asked roles, entities in distractor facts) of a question: the entities of
    its state, event and query sentences, and those of its fact sentences."""
    prob, every = read(world, question), ENTITIES["train"] | ENTITIES["ood"]
    facts = " ".join(prob["fact_sents"])
    rest = " ".join(s for s in sentences(question) if s not in prob["fact_sents"])
    return words(rest) & every, words(facts) & every


# ---- worlds ----


def test_solver_agrees_with_independent_simulation(data):
    world, splits = data
    for split, recs in splits.items():
        assert len(recs) == SIZES[split]
        for r in recs:
            prob = read(world, r["question"])
            assert solve(world, prob) == r["answer"], r["question"]
            assert r["rationale"].endswith(f"The answer is {r['answer']}.")
            assert tasks.extract_answer(r["rationale"]) == r["answer"]
            lat = r["latent"]
            # every event is said
            assert len(prob["events"]) == len(lat["event_ends"]) == len(lat["states"]) - 1
            for end, sent in zip(lat["event_ends"], prob["event_sents"]):
                assert r["question"][:end].endswith(sent)
            query = r["question"][lat["query_start"] :]
            assert query.startswith(("How", "Is", "Was", "On", "Who", "What"))
            init = prob["init"] if not prob["reverse"] else None
            if init is not None:
                labels = {
                    "arith": lambda s: str(s % 10),
                    "coin": lambda s: "heads" if s else "tails",
                    "light": str,
                    "date": lambda s: f"{s:%B}",
                    "swap": lambda s: holder(prob["ctx"], s),
                }[world]
                assert [labels(s) for s in simulate(world, init, prob["events"])] == lat["states"]
            for name, n, _ in prob["facts"]:  # a distractor's person and number appear nowhere else
                assert len(re.findall(rf"\b{name}\b", r["question"])) == 1
                assert n is None or len(re.findall(rf"\b{n}\b", r["question"])) == 1


@pytest.mark.parametrize("world", WORLDS)
def test_solver_on_many_seeds(world):
    for seed in range(8):
        for ps in worlds.make_dataset(world, {s: 15 for s in worlds.SPLITS}, seed).values():
            for p in ps:
                question, (_, ans) = worlds.question(p), worlds.solve(p)
                assert solve(world, read(world, question)) == ans, question


def test_ood_splits_are_out_of_distribution(data):
    """Each OOD split and its validation copy: longer chains, backward questions, or entities in
    asked roles that training never gives them (but does show, in distractor facts)."""
    world, splits = data
    read_all = {s: [read(world, r["question"]) for r in recs] for s, recs in splits.items()}
    in_dist = read_all["train"] + read_all["val"] + read_all["test_id"]
    longest_in_dist = max(len(p["events"]) for p in in_dist)
    for long in ("ood_long", "val_ood_long"):
        assert longest_in_dist < min(len(p["events"]) for p in read_all[long])
    for rev in ("ood_reverse", "val_ood_reverse"):
        assert all(
            p["reverse"] and p["final"] is not None and p["init"] is None for p in read_all[rev]
        )
    assert not any(
        p["reverse"] for s in read_all if "reverse" not in s and s != "train" for p in read_all[s]
    )
    train_roles = [roles(world, r["question"]) for r in splits["train"]]
    asked = set().union(*(a for a, _ in train_roles))
    in_facts = set().union(*(f for _, f in train_roles))
    assert asked <= ENTITIES["train"]
    for names in ("ood_names", "val_ood_names"):
        new = set().union(*(roles(world, r["question"])[0] for r in splits[names]))
        assert new and new <= ENTITIES["ood"] and not new & asked
        assert new <= in_facts  # every one of them is in training text, as a distractor
        others = [r["question"] for s in ("val", "test_id", "ood_long") for r in splits[s]]
        assert not new & set().union(*(roles(world, q)[0] for q in others))


@pytest.mark.parametrize("world", WORLDS)
def test_reverse_share_of_train(world):
    """The rare-skill regime: a few training questions, the same for every method, are asked
    backwards."""
    share = design()["reverse_share"]
    train = worlds.make_dataset(world, {"train": 2000}, seed=3, **design())["train"]
    got = sum(p.reverse for p in train) / len(train)
    assert 0 < share < 0.2 and abs(got - share) < 0.02
    assert not any(p.reverse for p in worlds.make_dataset(world, {"train": 300}, seed=3)["train"])


def test_distractor_counts_are_skewed_short():
    """Most questions carry one or two distractor facts (cheap to train on), a few every count up to
    the maximum (they train the late positions)."""
    c = invert.Config()
    train = worlds.make_dataset("coin", {"train": 2000}, seed=3, **design())["train"]
    counts = collections.Counter(len(p.facts) for p in train)
    assert set(counts) == set(range(c.min_facts, c.max_facts + 1))
    assert (counts[c.min_facts] + counts[c.min_facts + 1]) / len(train) > 0.5  # uniform: 0.25


@pytest.mark.parametrize("world", WORLDS)
def test_ood_long_fits_the_trained_lengths(world):
    """Learned positions are trained by every sequence that reaches them: training questions (padded
    by distractor facts) must reach the longest ood_long question plus rationale, and not just
    once."""
    tok = model.get_tokenizer()
    data = worlds.make_dataset(world, {"train": 2000, "ood_long": 300}, seed=5, **design())
    lengths = {
        s: [
            len(tasks.prompt_ids(tok, worlds.question(p)))
            + len(tasks.response_ids(tok, worlds.solve(p)[0]))
            for p in ps
        ]
        for s, ps in data.items()
    }
    longest_ood = max(lengths["ood_long"])
    reaching = sum(n >= longest_ood for n in lengths["train"])
    assert reaching >= 0.01 * len(lengths["train"])


def test_validation_copies_are_their_own_problems():
    """val_<split> comes from its own seed, shares no question with any test split, and adding it
    leaves the test splits as they were."""
    tests = {s: 20 for s in ("test_id",) + worlds.OOD_SPLITS}
    for world in WORLDS:
        alone = worlds.make_dataset(world, tests, seed=2, **design())
        both = worlds.make_dataset(
            world, {**tests, **{f"val_{s}": 20 for s in worlds.OOD_SPLITS}}, seed=2, **design()
        )
        assert all(
            list(map(worlds.question, alone[s])) == list(map(worlds.question, both[s]))
            for s in tests
        )
        test_qs = {worlds.question(p) for s in tests for p in both[s]}
        for s in worlds.OOD_SPLITS:
            assert len({worlds.question(p) for p in both[f"val_{s}"]} - test_qs) == 20


def test_generation_is_deterministic():
    def dump(seed):
        return json.dumps(
            {
                w: {
                    s: [tasks.to_record(p, tasks.ei_probes(p)) for p in ps]
                    for s, ps in worlds.make_dataset(w, {"train": 20, "ood_long": 5}, seed).items()
                }
                for w in WORLDS
            },
            sort_keys=True,
        )

    assert dump(3) == dump(3) != dump(4)


def test_no_question_repeats_across_splits():
    for w in WORLDS:
        qs = [
            worlds.question(p)
            for ps in worlds.make_dataset(w, {"train": 200, "test_id": 100}, 0).values()
            for p in ps
        ]
        assert len(qs) == len(set(qs))


# ---- the EI rules ----


def claim_value(world, ctx, claim):
    """The value a verify/hypothesis claim states."""
    pat = {
        "arith": rf"{ctx.get('h')} has (\d+) \w+",
        "coin": r"the coin is (heads|tails) up",
        "light": r"the light is (\w+)",
        "date": rf"the {ctx.get('thing')} is on (\w+ \d+)",
        "swap": rf"(\w+) has the {ctx.get('obj')}",
    }[world]
    return re.fullmatch(pat, claim)[1]


def expected(world, rule, prob, tail, r):
    """The answer of an EI probe, derived here from the problem read back and the probe's own
    words."""
    ctx, init, events = prob["ctx"], prob["init"], prob["events"]
    states = simulate(world, init, events)
    vals = [value(world, ctx, s) for s in states]
    if rule == "counterfactual":
        m = re.fullmatch(r"Suppose instead: (.+?\.) (.+)", tail)
        assert m[2] == r["question"][r["latent"]["query_start"] :]
        kind, what = read_sentence(world, ctx, m[1])
        assert m[1] not in r["question"]
        if kind == "init":
            return answer(world, ctx, simulate(world, what, events)[-1])
        changed = [i for i, e in enumerate(events) if e[1] == what[1]]  # coin: one event per person
        assert kind == "event" and len(changed) == 1 and events[changed[0]] != what
        changed_events = events[: changed[0]] + [what] + events[changed[0] + 1 :]
        return answer(world, ctx, simulate(world, init, changed_events)[-1])
    if rule == "step_challenge":
        m = re.fullmatch(r"Consider the event: (.+?\.) (.+)", tail)
        assert m[1] in prob["event_sents"]
        kind, e = read_sentence(world, ctx, m[1])
        if world == "arith":
            return {"add": f"add {e[1]}", "sub": f"subtract {e[1]}", "dbl": "double"}[e[0]]
        if world in ("coin", "light"):
            return "yes" if e[0] in ("flip", "press") else "no"
        n = abs(e[1]) * (7 if e[0] == "week" else 1)
        unit = "month" if e[0] == "month" else "day"
        return f"{n} {unit}{'s' if n != 1 else ''} {'later' if e[1] > 0 else 'earlier'}"
    if rule == "decompose":
        m = re.search(r"after the first (\d+ events|event)\?", tail)
        i = 1 if m[1] == "event" else int(m[1].split()[0])
        assert 1 <= i < len(events)
        return answer(world, ctx, states[i])
    if rule == "verify":
        when = r"(after the first (\d+) events|after the first event|at the end)"
        m = re.fullmatch(rf"Is it true that (.+) {when}\?", tail)
        i = len(events) if m[2] == "at the end" else int(m[3] or 1)
        return "yes" if claim_value(world, ctx, m[1]) == vals[i] else "no"
    if rule == "cause":
        if world in ("arith", "date"):
            if world == "arith":
                deltas = [b - a for a, b in zip(states, states[1:])]
            else:
                deltas = [(b - a).days for a, b in zip(states, states[1:])]
                deltas = [d - 365 if d > 182 else d + 365 if d < -182 else d for d in deltas]
            top = max(map(abs, deltas))
            assert [abs(d) for d in deltas].count(top) == 1
            return ORD[[abs(d) for d in deltas].index(top)]
        if world in ("coin", "light"):
            return [e[1] for e in events if e[0] in ("flip", "press")][-1]
        moves = [i for i in range(len(events)) if vals[i] != vals[i + 1]]
        return vals[moves[-1]]  # the giver of the last move
    if rule == "compare":
        a, b = states[0], states[-1]
        if world == "arith":
            return "more" if b > a else "fewer" if b < a else "same"
        if world == "date":
            total = sum(
                e[1] * {"day": 1, "week": 7}[e[0]] if e[0] != "month" else 0 for e in events
            )
            for s0, s1, e in zip(states, states[1:], events):
                if e[0] == "month":
                    d = (s1 - s0).days
                    total += d - 365 if d > 182 else d + 365 if d < -182 else d
            return "later" if total > 0 else "earlier" if total < 0 else "same"
        return "yes" if vals[0] == vals[-1] else "no"
    if rule == "hypothesis":
        m = re.fullmatch(r"Skip the (\w+) event\. Is it still true that (.+) at the end\?", tail)
        i = ORD.index(m[1])
        assert claim_value(world, ctx, m[2]) == vals[-1]
        without = simulate(world, init, events[:i] + events[i + 1 :])[-1]
        return "yes" if value(world, ctx, without) == vals[-1] else "no"
    if rule == "process":
        assert re.fullmatch(r"List .+ after each event\.", tail)
        return ", ".join(vals[1:])
    if rule == "premise":
        m = re.fullmatch(r"Which (number|person) does not affect .+: (\w+) or (\w+)\?", tail)
        story_events = " ".join(prob["event_sents"])
        init_sent = sentences(r["question"])[0]
        used = [t for t in m.group(2, 3) if re.search(rf"\b{t}\b", story_events + " " + init_sent)]
        spare = [t for t in m.group(2, 3) if t not in used]
        fact_tokens = {str(f[1]) if m[1] == "number" else f[0] for f in prob["facts"]}
        assert len(used) == 1 and len(spare) == 1 and spare[0] in fact_tokens
        if world in ("coin", "light"):
            assert ("flip", used[0]) in events or ("press", used[0]) in events
        if world == "swap":  # the last person to hand the asked object over
            assert used[0] == expected(world, "cause", prob, "", r)
        return spare[0]
    if rule in ("analogy", "inverse"):
        alt = read(world, tail)
        assert alt["reverse"] == (rule == "inverse")
        assert len(alt["events"]) == len(events)
        if rule == "analogy":
            assert roles(world, tail)[0] != roles(world, r["question"])[0]
            assert roles(world, tail)[0] <= ENTITIES["train"]
        return solve(world, alt)
    raise AssertionError(rule)


def test_every_probe_answer_rederived(data):
    world, splits = data
    seen = set()
    for split, recs in splits.items():
        for r in recs:
            probes, r = r["probes"], r.get("forward", r)  # the rules read a problem asked forward
            prob = read(world, r["question"])
            story = r["question"][: r["latent"]["query_start"] - 1]
            for pr in probes:
                seen.add(pr["rule"])
                assert pr["question"] != r["question"]
                assert pr["rationale"].endswith(f"The answer is {pr['answer']}.")
                assert tasks.extract_answer(pr["rationale"]) == pr["answer"]
                if pr["rule"] in ("analogy", "inverse"):
                    tail = pr["question"]
                else:
                    assert pr["question"].startswith(story + " ")
                    tail = pr["question"][len(story) + 1 :]
                got = expected(world, pr["rule"], prob, tail, r)
                assert got == pr["answer"], (pr, r["question"])
    assert seen == set(tasks.EI_RULES) - ({"step_challenge"} if world == "swap" else set())


def test_default_probes_stay_in_training_format():
    """No default rule asks for the initial state (not even of a training question asked backwards),
    makes a longer chain, or puts an OOD entity anywhere but in a distractor fact."""
    rule_worlds = {}
    for world in WORLDS:
        more_reversed = {**design(), "reverse_share": 0.3}
        train = worlds.make_dataset(world, {"train": 150}, seed=11, **more_reversed)["train"]
        assert any(p.reverse for p in train)
        for p in train:
            fwd = dataclasses.replace(p, reverse=False)
            ctx = read(world, worlds.question(fwd))["ctx"]
            for pr in tasks.ei_probes(p, seed=11):
                rule_worlds.setdefault(pr.rule, set()).add(world)
                q = pr.question
                assert "at first" not in q and not re.search(r"(^|\. )Now ", q)
                text = q if pr.rule == "analogy" else worlds.question(fwd)
                facts = read(world, text)["fact_sents"]
                assert words(q) & ENTITIES["ood"] <= words(" ".join(facts))
                if pr.rule == "analogy":
                    assert len(read(world, q)["events"]) == len(p.events)
                else:  # the problem's own story, then at most one restated event
                    assert q.startswith(worlds.story(fwd) + " ")
                    restated = sentences(q[len(worlds.story(fwd)) + 1 :])
                    assert sum(is_event(world, ctx, s) for s in restated) <= 1
    assert set(rule_worlds) == set(tasks.DEFAULT_RULES)
    assert all(len(ws) >= 2 for ws in rule_worlds.values())


# ---- answers and the prompt format ----


@pytest.mark.parametrize(
    "world,text,gold,q,ok",
    [
        ("arith", "so 7. The answer is 7.", "7", None, True),
        ("arith", "The answer is 7", "7", None, True),
        ("arith", "The answer is 07.", "7", None, True),
        ("arith", "The answer is seven.", "7", None, False),
        ("arith", "The answer is 8. The answer is 7.", "7", None, True),
        ("arith", "7", "7", None, False),
        ("coin", "The answer is Yes.", "yes", None, True),
        ("date", "The answer is april 5.", "April 5", None, True),
        ("date", "The answer is 04/05.", "April 5", None, False),
        ("swap", "The answer is (B).", "B", None, True),
        (
            "swap",
            "The answer is hat.",
            "B",
            "What does Tom have now? Options: (A) pen (B) hat (C) cup.",
            True,
        ),
        (
            "swap",
            "The answer is pen.",
            "B",
            "What does Tom have now? Options: (A) pen (B) hat (C) cup.",
            False,
        ),
        ("arith", "The answer is 44, 45.", "44,45", None, True),
    ],
)
def test_is_correct(world, text, gold, q, ok):
    assert tasks.is_correct(world, text, gold, q) is ok


class CharTok:
    eot = 0

    def encode(self, s):
        return [ord(c) for c in s]


def test_prompt_format_one_definition():
    tok = CharTok()
    assert tasks.prompt_ids(tok, "Hi?") == tok.encode("Q: Hi?\nA:")
    assert tasks.response_ids(tok, "The answer is 3.") == tok.encode(" The answer is 3.") + [0]
    turns = [("a?", "The answer is 1."), ("b?", "The answer is 2.")]
    want = (
        tasks.prompt_ids(tok, "a?")
        + tasks.response_ids(tok, turns[0][1])
        + tasks.prompt_ids(tok, "b?")
        + tasks.response_ids(tok, turns[1][1])
        + tasks.prompt_ids(tok, "c?")
    )
    assert tasks.dialogue_ids(tok, turns, "c?") == want
    assert tasks.dialogue_ids(tok, [], "c?") == tasks.prompt_ids(tok, "c?")
