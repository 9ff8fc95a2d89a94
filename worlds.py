"""The synthetic reasoning worlds: problems as structured records, their exact solver, the splits.

Five state-tracking worlds, each problem a structured record (initial state, ordered events,
distractor facts, template choices) rendered to one line of text, solved exactly and explained by a
short rationale ending "The answer is X.":
  arith  a quantity changes by events (buys, gives, loses, doubles); X is an integer 0..99
  coin   people flip or do not flip a coin; X is yes/no ("is it still heads up?")
  light  people press or do not press a button that steps a light red -> green -> blue;
         X is a colour
  date   a date moves by days, weeks or months (a 365-day year, no year written); X is "April 5"
  swap   three people trade objects; X is an option letter
         ("Who has the ball now? Options: (A) Tom ...")
Splits. train, val and test_id are in distribution. Three splits test out of distribution, each
built so that a student can reach it, every position and token it needs being trained:
  ood_long     more events than any training question, with fewer distractor facts: training
               questions carry a block of 1..8 distractor facts (most 1 or 2, a few up to 8), so
               the longest ones reach every position ood_long needs (its longest question plus
               rationale), for every method alike.
  ood_reverse  the final state is given and the initial one asked (GSM8K-Reversal's analogue).
               A skill no one can infer from nothing, so it is a rare skill: a small share of the
               training questions (invert.py's reverse_share, the same for every method) is asked
               backwards, the test asks only backwards. No default EI rule asks backwards.
  ood_names    names, items and objects of the 'ood' pools in the asked roles (who acts, what is
               counted or held). They occur in training text, but only in distractor facts.
val_ood_long, val_ood_reverse and val_ood_names are validation copies of the three (own seeds, no
question shared with any other split), for choosing settings without looking at a test split.
Generation is seeded and deterministic. The EI rules over these problems live in tasks.py.
"""

import random
import re
from dataclasses import dataclass, field, replace

# 'train' entities fill the asked roles (who acts, what is counted or held) of every split but
# ood_names, 'ood' ones those of ood_names; distractor facts draw from both pools, so every entity
# is in training text
NAMES = {
    "train": ("Tom", "Ann", "Bob", "Eve", "Sam", "Max", "Amy", "Joe", "Kim", "Dan", "Liz", "Ben"),
    "ood": ("Ivan", "Hans", "Raj", "Rosa", "Omar", "Nina", "Hugo", "Lena", "Igor", "Leo"),
}
ITEMS = {
    "train": ("apples", "marbles", "stickers", "cards", "pencils", "cookies"),
    "ood": ("shells", "stamps", "buttons", "beads"),
}
THINGS = ("party", "trip", "meeting", "exam")  # date: no distractor names them, so no OOD pool
OBJECTS = {
    "train": ("ball", "hat", "pen", "book", "cup", "key", "bag", "box"),
    "ood": ("bell", "drum", "lamp", "mug", "fork", "ring"),
}
# test splits, then the validation copies of the OOD ones (own seeds; made last, so adding them
# never changes a test file)
OOD_SPLITS = ("ood_long", "ood_reverse", "ood_names")
SPLITS = ("train", "val", "test_id") + OOD_SPLITS + tuple(f"val_{s}" for s in OOD_SPLITS)
ORD = (
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "sixth",
    "seventh",
    "eighth",
    "ninth",
    "tenth",
)
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# the distractor facts' templates: they never change the state
FACTS = ("{name} is {n} years old.", "{name} has {n} {item}.", "{name} wants a {item}.")
WHEN = ("now", "at the end")


@dataclass
class Problem:
    id: str
    world: str
    split: str
    ctx: dict  # the entities the templates name (hero, item, people, options...)
    init: object  # the state before any event
    events: list  # tuples (kind, ...)
    # (slot, template, name, number, item): slot = events before it
    facts: list = field(default_factory=list)
    tpl: list = field(default_factory=list)  # template choice per sentence: init, each event, query
    reverse: bool = False  # ood_reverse: the final state is given, the initial asked


def plural(n, unit):
    return f"{n} {unit}" + ("" if n == 1 else "s")


def after(i, n):
    if i == n:
        return "at the end"
    return "after the first event" if i == 1 else f"after the first {i} events"


def others(pool, used):
    return [x for x in pool if x not in used]


def largest(deltas, noun):
    """cause: the event with the largest change (None on a tie), explained."""
    top = max(abs(d) for d in deltas)
    if [abs(d) for d in deltas].count(top) > 1:
        return None
    i = [abs(d) for d in deltas].index(top)
    return (
        f"The {noun} are {', '.join(f'{d:+d}' for d in deltas)}. The largest is the {ORD[i]}.",
        ORD[i],
    )


class World:
    """What the worlds share; each world says how its states, events and questions read."""

    def query(self, p, t):
        return self.ask(p, WHEN[t % 2])

    def value(self, p, s):
        return self.answer(p, s)  # the state in words, e.g. for a list of states

    def conclusion(self, p, s, past):
        return []  # a last rationale sentence before the answer

    def effect(self, p, e):
        return None  # step_challenge: what one event does

    def start(self, p, s):
        return []  # a first rationale sentence: the state the steps start from

    facts = (0, 1)  # which FACTS templates its distractors use


class Arith(World):
    name, latent_name = "arith", "last_digit"
    INIT = ("{h} has {c}.", "{h} starts with {c}.")
    EVENT = {
        "add": ("{h} buys {c}.", "{h} finds {c}.", "{o} gives {h} {c}."),
        "sub": ("{h} gives {c} to {o}.", "{h} loses {c}.", "{h} sells {c}."),
        "dbl": ("{h} doubles the {item}.", "{h} gets twice as many {item}."),
    }
    SIGN = {"add": "+", "sub": "-", "dbl": "*"}

    def sample(self, rng, n, pool, reverse):
        h, o = rng.sample(NAMES[pool], 2)
        v = rng.randint(2, 40)
        return (
            {"h": h, "o": o, "item": rng.choice(ITEMS[pool])},
            v,
            self.kinds_to_events(rng, v, [None] * n),
        )

    def kinds_to_events(self, rng, v, kinds):
        """Events with fresh amounts (kinds None = free), every state staying in 0..99;
        None if stuck."""
        events = []
        for kind in kinds:
            ok = [k for k, fits in (("add", v < 99), ("sub", v > 0), ("dbl", 0 < v <= 49)) if fits]
            kind = kind or rng.choices(ok, weights=[2 if k != "dbl" else 1 for k in ok])[0]
            if kind not in ok:
                return None
            # doubling is one fixed step; an amount keeps the state inside 0..99
            amount = 2 if kind == "dbl" else rng.randint(1, min(20, 99 - v if kind == "add" else v))
            e = (kind, amount)
            events.append(e)
            v = self.step(v, e)
        return events

    def step(self, v, e):
        kind, k = e
        w = v + k if kind == "add" else v - k if kind == "sub" else v * 2
        return w if 0 <= w <= 99 else None

    def count(self, p, n):
        return f"{n} {p.ctx['item'][:-1] if int(n) == 1 else p.ctx['item']}"  # 1 apple

    def people(self, p):
        return [p.ctx["h"], p.ctx["o"]]

    def init_text(self, p, v, t):
        return self.INIT[t % 2].format(c=self.count(p, v), **p.ctx)

    def event_text(self, p, e, t):
        return self.EVENT[e[0]][t % len(self.EVENT[e[0]])].format(c=self.count(p, e[1]), **p.ctx)

    def ask(self, p, when):
        return f"How many {p.ctx['item']} does {p.ctx['h']} have {when}?"

    def now_text(self, p, v):
        return f"Now {p.ctx['h']} has {self.count(p, v)}."

    def back_query(self, p):
        return f"How many {p.ctx['item']} did {p.ctx['h']} have at first?"

    def step_text(self, a, e, b, p):
        return f"{a} {self.SIGN[e[0]]} {e[1]} = {b}."

    def undo_text(self, b, e, a, p):
        return f"{b} {dict(add='-', sub='+', dbl='/')[e[0]]} {e[1]} = {a}."

    def answer(self, p, v):
        return str(v)

    def latent(self, p, v):
        return str(v % 10)

    def claim(self, p, v):
        return f"{p.ctx['h']} has {self.count(p, v)}"

    def what(self, p):
        return f"how many {p.ctx['item']} {p.ctx['h']} has"

    def wrong(self, p, v, rng):
        return str(v + rng.choice([1, 2, 3] if v < 4 else [-3, -2, -1, 1, 2, 3]))

    def effect(self, p, e):
        kind, k = e
        h = p.ctx["h"]
        reason, ans = {
            "add": (f"{h} gets {k} more.", f"add {k}"),
            "sub": (f"{h} has {k} fewer.", f"subtract {k}"),
            "dbl": (f"{h} gets twice as many.", "double"),
        }[kind]
        return f"What does it do to the number of {p.ctx['item']}?", reason, ans

    def compare(self, p, states):
        a, b = states[0], states[-1]
        ans = "more" if b > a else "fewer" if b < a else "same"
        return (
            f"Compared with before the events, does {p.ctx['h']} have more, fewer, or the same "
            f"number of {p.ctx['item']} now?",
            f"{p.ctx['h']} goes from {a} to {b}.",
            ans,
        )

    def cause(self, p, states):
        got = largest([b - a for a, b in zip(states, states[1:])], "changes")
        return got and (f"Which event changes the number of {p.ctx['item']} the most?",) + got

    def premise(self, p, states, rng):
        used = [p.init] + [k for kind, k in p.events if kind != "dbl"]
        return "number", str(rng.choice(used)), f"how many {p.ctx['item']} {p.ctx['h']} has now"

    def perturb(self, p, rng):
        for d in rng.sample([-9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9], 18):
            alt = replace(p, init=p.init + d)
            if 0 < alt.init <= 99 and chain(alt):
                return alt, self.init_text(p, alt.init, p.tpl[0])
        return None

    def analogue(self, p, rng):
        h, o = rng.sample(others(NAMES["train"], self.people(p)), 2)
        ctx = {"h": h, "o": o, "item": rng.choice(others(ITEMS["train"], [p.ctx["item"]]))}
        for _ in range(100):
            v = rng.randint(2, 40)
            events = self.kinds_to_events(rng, v, [e[0] for e in p.events])
            if events and (v, events) != (p.init, p.events):
                return replace(p, ctx=ctx, init=v, events=events)
        return None


class Coin(World):
    name, latent_name = "coin", "side"
    # for the rules Light shares
    ACT, OBJECT, ASKED = "flip", "coin", "whether the coin is heads up"
    INIT = ("A coin is {s} up.", "The coin starts {s} up.")
    EVENT = {
        "flip": ("{n} flips the coin.", "{n} turns the coin over."),
        "keep": ("{n} does not flip the coin.", "{n} leaves the coin alone."),
    }

    def sample(self, rng, n, pool, reverse):
        init = rng.choice(["heads", "tails"]) if reverse else "heads"
        return (
            {},
            init,
            [(rng.choice(["flip", "keep"]), name) for name in rng.sample(NAMES[pool], n)],
        )

    def step(self, s, e):
        return s if e[0] == "keep" else {"heads": "tails", "tails": "heads"}[s]

    def people(self, p):
        return [e[1] for e in p.events]

    def init_text(self, p, s, t):
        return self.INIT[t % 2].format(s=s)

    def event_text(self, p, e, t):
        return self.EVENT[e[0]][t % 2].format(n=e[1])

    def query(self, p, t):
        return "Is the coin still heads up?" if t % 2 and p.init == "heads" else self.ask(p, "now")

    def ask(self, p, when):
        return f"Is the coin heads up {when}?"

    def now_text(self, p, s):
        return f"Now the coin is {s} up."

    def back_query(self, p):
        return "Was the coin heads up at first?"

    def step_text(self, a, e, b, p):
        return f"{e[1]} {'flips' if e[0] == 'flip' else 'does not flip'}, {b}."

    def undo_text(self, b, e, a, p):  # names the event it undoes, as every world's undo step does
        return f"Undo: {e[1]} {'flips' if e[0] == 'flip' else 'does not flip'}, {a}."

    def value(self, p, s):
        return s

    def answer(self, p, s):
        return "yes" if s == "heads" else "no"

    def latent(self, p, s):
        return s

    def claim(self, p, v):
        return f"the coin is {v} up"

    def what(self, p):
        return "which side is up"

    def wrong(self, p, s, rng):
        return self.step(s, ("flip", ""))

    def effect(self, p, e):
        if e[0] == "flip":
            return "Does it change which side is up?", "Flipping turns the coin over.", "yes"
        return "Does it change which side is up?", "Not flipping leaves the coin as it is.", "no"

    def compare(self, p, states):
        c = sum(e[0] == "flip" for e in p.events)
        verb = "is" if c == 1 else "are"
        parity = "odd" if c % 2 else "even"
        return (
            "Is the coin on the same side now as before the events?",
            f"There {verb} {plural(c, 'flip')}, and {c} is {parity}.",
            "no" if c % 2 else "yes",
        )

    def cause(self, p, states):
        acts = [i for i, e in enumerate(p.events) if e[0] == self.ACT]
        if not acts:
            return None
        i, who = acts[-1], p.events[acts[-1]][1]
        return (
            f"Who is the last person to {self.ACT} the {self.OBJECT}?",
            f"The last {self.ACT} is the {ORD[i]} event, by {who}.",
            who,
        )

    def premise(self, p, states, rng):
        actors = [e[1] for e in p.events if e[0] == self.ACT]
        return ("person", rng.choice(actors), self.ASKED) if actors else None

    def perturb(self, p, rng):
        i = rng.randrange(len(p.events))
        e = ({self.ACT: "keep", "keep": self.ACT}[p.events[i][0]], p.events[i][1])
        alt = replace(p, events=p.events[:i] + [e] + p.events[i + 1 :])
        return alt, self.event_text(p, e, p.tpl[i + 1])

    def analogue(self, p, rng):
        fresh = others(NAMES["train"], self.people(p))
        names = rng.sample(fresh if len(fresh) >= len(p.events) else NAMES["train"], len(p.events))
        alt = replace(p, events=[(e[0], name) for e, name in zip(p.events, names)])
        return alt if alt.events != p.events else None


class Light(Coin):
    """coin with three states: each press moves the light one colour along
    red -> green -> blue -> red. The same local update as coin (read the event, step the state),
    with three answers (chance 1/3) and a random first colour, so every answer is equally likely."""

    name, latent_name = "light", "colour"
    ACT, OBJECT, ASKED = "press", "button", "the colour of the light"
    COLOURS = ("red", "green", "blue")
    INIT = ("A light is {s}.", "The light starts {s}.")
    EVENT = {
        "press": ("{n} presses the button.", "{n} pushes the button."),
        "keep": ("{n} does not press the button.", "{n} leaves the button alone."),
    }

    query, value = World.query, World.value  # not coin's: its "still heads up?" and side names

    def sample(self, rng, n, pool, reverse):
        return (
            {},
            rng.choice(self.COLOURS),
            [(rng.choice(["press", "keep"]), name) for name in rng.sample(NAMES[pool], n)],
        )

    def step(self, s, e):
        return s if e[0] == "keep" else self.COLOURS[(self.COLOURS.index(s) + 1) % 3]

    def ask(self, p, when):
        return f"What colour is the light {when}?"

    def now_text(self, p, s):
        return f"Now the light is {s}."

    def back_query(self, p):
        return "What colour was the light at first?"

    def step_text(self, a, e, b, p):
        return f"{e[1]} {'presses' if e[0] == 'press' else 'does not press'}, {b}."

    def undo_text(self, b, e, a, p):
        return f"Undo: {e[1]} {'presses' if e[0] == 'press' else 'does not press'}, {a}."

    def answer(self, p, s):
        return s

    def claim(self, p, v):
        return f"the light is {v}"

    def what(self, p):
        return "the colour of the light"

    def wrong(self, p, s, rng):
        return rng.choice(others(self.COLOURS, [s]))

    def effect(self, p, e):
        if e[0] == "press":
            return (
                "Does it change the colour?",
                "Pressing moves the light to the next colour.",
                "yes",
            )
        return "Does it change the colour?", "Not pressing leaves the light as it is.", "no"

    def compare(self, p, states):
        c = sum(e[0] == "press" for e in p.events)
        same = c % 3 == 0  # every three presses bring the light back to its colour
        return (
            "Is the light the same colour now as before the events?",
            f"The button is pressed {plural(c, 'time')}, and {c} is "
            f"{'' if same else 'not '}a multiple of 3.",
            "yes" if same else "no",
        )

    def analogue(self, p, rng):
        fresh = others(NAMES["train"], self.people(p))
        names = rng.sample(fresh if len(fresh) >= len(p.events) else NAMES["train"], len(p.events))
        alt = replace(
            p,
            init=rng.choice(self.COLOURS),
            events=[(e[0], name) for e, name in zip(p.events, names)],
        )
        return alt if (alt.init, alt.events) != (p.init, p.events) else None


class Date(World):
    name, latent_name = "date", "month"
    INIT = ("{h}'s {thing} is on {d}.", "{h} plans a {thing} for {d}.")
    EVENT = {
        1: ("The {thing} moves {n} later.", "The {thing} is delayed by {n}."),
        -1: ("The {thing} moves {n} earlier.", "The {thing} is moved {n} earlier."),
    }
    MAX_MOVE = {"day": 9, "week": 3, "month": 2}  # the largest move of each kind, in its unit

    @staticmethod
    def fmt(s):
        return f"{MONTHS[s[0] - 1]} {s[1]}"

    @staticmethod
    def doy(s):
        return sum(DAYS[: s[0] - 1]) + s[1] - 1

    def sample(self, rng, n, pool, reverse):
        ctx = {"h": rng.choice(NAMES[pool]), "thing": rng.choice(THINGS)}
        s = init = (rng.randint(1, 12), rng.randint(1, 28))
        events = []
        for _ in range(n):
            kind = rng.choices(["day", "week", "month"], weights=[5, 3, 2 if s[1] <= 28 else 0])[0]
            e = (kind, rng.choice([-1, 1]) * rng.randint(1, self.MAX_MOVE[kind]))
            events.append(e)
            s = self.step(s, e)
        return ctx, init, events

    def step(self, s, e):
        kind, k = e
        if kind == "month":
            m = (s[0] - 1 + k) % 12 + 1
            return (m, s[1]) if s[1] <= DAYS[m - 1] else None
        x = (self.doy(s) + k * (7 if kind == "week" else 1)) % 365
        m = 1
        while x >= DAYS[m - 1]:
            x, m = x - DAYS[m - 1], m + 1
        return m, x + 1

    def delta(self, a, b):
        return (self.doy(b) - self.doy(a) + 182) % 365 - 182

    def people(self, p):
        return [p.ctx["h"]]

    def init_text(self, p, s, t):
        return self.INIT[t % 2].format(d=self.fmt(s), **p.ctx)

    def event_text(self, p, e, t):
        return self.EVENT[1 if e[1] > 0 else -1][t % 2].format(n=plural(abs(e[1]), e[0]), **p.ctx)

    def ask(self, p, when):
        return f"On what date is the {p.ctx['thing']} {when}?"

    def now_text(self, p, s):
        return f"Now the {p.ctx['thing']} is on {self.fmt(s)}."

    def back_query(self, p):
        return f"On what date was the {p.ctx['thing']} at first?"

    def step_text(self, a, e, b, p):
        return (
            f"{self.fmt(a)} {'+' if e[1] > 0 else '-'} {plural(abs(e[1]), e[0])} = {self.fmt(b)}."
        )

    def undo_text(self, b, e, a, p):
        return (
            f"{self.fmt(b)} {'-' if e[1] > 0 else '+'} {plural(abs(e[1]), e[0])} = {self.fmt(a)}."
        )

    def answer(self, p, s):
        return self.fmt(s)

    def latent(self, p, s):
        return MONTHS[s[0] - 1]

    def claim(self, p, v):
        return f"the {p.ctx['thing']} is on {v}"

    def what(self, p):
        return f"the date of the {p.ctx['thing']}"

    def wrong(self, p, s, rng):
        return self.fmt(self.step(s, ("day", rng.choice([-3, -2, -1, 1, 2, 3]))))

    def effect(self, p, e):
        kind, k = e
        way = "later" if k > 0 else "earlier"
        if kind == "month":
            return (
                "What does it do to the date?",
                "The day stays, the month changes.",
                f"{plural(abs(k), kind)} {way}",
            )
        days = abs(k) * (7 if kind == "week" else 1)
        reason = (
            f"{plural(abs(k), kind)} is {days} days."
            if kind == "week"
            else f"It moves by {plural(days, kind)}."
        )
        return "What does it do to the date?", reason, f"{plural(days, 'day')} {way}"

    def compare(self, p, states):
        d = [self.delta(a, b) for a, b in zip(states, states[1:])]
        tot = sum(d)
        expr = str(d[0]) + "".join(f" {'+' if x > 0 else '-'} {abs(x)}" for x in d[1:])
        ans = "later" if tot > 0 else "earlier" if tot < 0 else "same"
        return (
            f"Is the {p.ctx['thing']} now later, earlier, or on the same date "
            "as before the events?",
            f"The moves add up to {expr} = {tot} days.",
            ans,
        )

    def cause(self, p, states):
        got = largest([self.delta(a, b) for a, b in zip(states, states[1:])], "moves in days")
        return got and (f"Which event moves the {p.ctx['thing']} the most?",) + got

    def premise(self, p, states, rng):
        return "number", str(rng.choice([p.init[1]] + [abs(e[1]) for e in p.events])), self.what(p)

    def perturb(self, p, rng):
        for d in rng.sample([-9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9], 18):
            alt = replace(p, init=self.step(p.init, ("day", d)))
            if chain(alt):
                return alt, self.init_text(p, alt.init, p.tpl[0])
        return None

    def analogue(self, p, rng):
        ctx = {
            "h": rng.choice(others(NAMES["train"], [p.ctx["h"]])),
            "thing": rng.choice(others(THINGS, [p.ctx["thing"]])),
        }
        for _ in range(100):
            init = (rng.randint(1, 12), rng.randint(1, 28))
            events = [
                (kind, (1 if k > 0 else -1) * rng.randint(1, self.MAX_MOVE[kind]))
                for kind, k in p.events
            ]
            alt = replace(p, ctx=ctx, init=init, events=events)
            if chain(alt) and (init, events) != (p.init, p.events):
                return alt
        return None


class Swap(World):
    """Three people trade objects; the question asks who holds one object. The rationale follows
    that object from holder to holder, one short step per event (a lookup of the current holder and
    the two traders), the way coin follows its side: a tiny student learns it. Asking what a person
    holds instead needs the whole assignment at every step, and a tiny student stayed at chance on
    it."""

    name, latent_name = "swap", "holder"
    INIT = (
        "{0} has a {1}, {2} has a {3}, and {4} has a {5}.",
        "{0} holds a {1}, {2} holds a {3}, and {4} holds a {5}.",
    )
    EVENT = ("{a} and {b} swap items.", "{a} trades items with {b}.", "{a} and {b} switch items.")
    facts = (0, 1, 2)  # 2: "Olga wants a kite.", so the OOD objects occur in training text too

    def sample(self, rng, n, pool, reverse):
        people, objects = rng.sample(NAMES[pool], 3), rng.sample(OBJECTS[pool], 3)
        ctx = {"people": people, "obj": rng.choice(objects), "options": rng.sample(people, 3)}
        return ctx, tuple(objects), [("swap", *rng.sample(range(3), 2)) for _ in range(n)]

    def step(self, s, e):
        s = list(s)
        s[e[1]], s[e[2]] = s[e[2]], s[e[1]]
        return tuple(s)

    def value(self, p, s):
        return p.ctx["people"][s.index(p.ctx["obj"])]  # who holds the asked object

    def holders(self, p, s):
        return [x for pair in zip(p.ctx["people"], s) for x in pair]

    def options(self, p):
        return " Options: " + " ".join(f"({L}) {o}" for L, o in zip("ABC", p.ctx["options"])) + "."

    def people(self, p):
        return list(p.ctx["people"])

    def init_text(self, p, s, t):
        return self.INIT[t % 2].format(*self.holders(p, s))

    def event_text(self, p, e, t):
        return self.EVENT[t % 3].format(a=p.ctx["people"][e[1]], b=p.ctx["people"][e[2]])

    def ask(self, p, when):
        return f"Who has the {p.ctx['obj']} {when}?" + self.options(p)

    def now_text(self, p, s):
        return "Now " + self.INIT[0].format(*self.holders(p, s))

    def back_query(self, p):
        return f"Who had the {p.ctx['obj']} at first?" + self.options(p)

    def start(self, p, s):
        return [f"{self.value(p, s)} has the {p.ctx['obj']}."]

    def step_text(self, a, e, b, p):
        P = p.ctx["people"]
        return f"{P[e[1]]} and {P[e[2]]} swap, {self.value(p, b)}."

    def undo_text(self, b, e, a, p):
        P = p.ctx["people"]
        return f"Undo {P[e[1]]} and {P[e[2]]}, {self.value(p, a)}."

    def answer(self, p, s):
        return "ABC"[p.ctx["options"].index(self.value(p, s))]

    def conclusion(self, p, s, past):
        who, verb = self.value(p, s), "had" if past else "has"
        return [f"{who} {verb} the {p.ctx['obj']}, option {self.answer(p, s)}."]

    def latent(self, p, s):
        return self.value(p, s)

    def claim(self, p, v):
        return f"{v} has the {p.ctx['obj']}"

    def what(self, p):
        return f"who has the {p.ctx['obj']}"

    def wrong(self, p, s, rng):
        return rng.choice(others(p.ctx["people"], [self.value(p, s)]))

    def last_move(self, p, states):
        """(event index, giver, taker) of the last event that moves the asked object;
        None if it never moves."""
        moves = [
            i
            for i in range(len(p.events))
            if self.value(p, states[i]) != self.value(p, states[i + 1])
        ]
        if not moves:
            return None
        return moves[-1], self.value(p, states[moves[-1]]), self.value(p, states[moves[-1] + 1])

    def compare(self, p, states):
        a, b, O = self.value(p, states[0]), self.value(p, states[-1]), p.ctx["obj"]
        return (
            f"Does the same person have the {O} now as before the events?",
            f"The {O} goes from {a} to {b}.",
            "yes" if a == b else "no",
        )

    def cause(self, p, states):
        got, O = self.last_move(p, states), p.ctx["obj"]
        return got and (
            f"Who last hands over the {O}?",
            f"The {O} last moves in the {ORD[got[0]]} event, from {got[1]} to {got[2]}.",
            got[1],
        )

    def premise(self, p, states, rng):
        got = self.last_move(p, states)
        return got and ("person", got[1], f"who has the {p.ctx['obj']} now")

    def perturb(self, p, rng):
        i, j = rng.sample(range(3), 2)
        alt = replace(p, init=self.step(p.init, ("swap", i, j)))
        return alt, self.init_text(p, alt.init, p.tpl[0])

    def analogue(self, p, rng):
        objects = rng.sample(others(OBJECTS["train"], p.init), 3)
        people = rng.sample(others(NAMES["train"], self.people(p)), 3)
        ctx = {
            "people": people,
            "obj": objects[p.init.index(p.ctx["obj"])],
            "options": [people[p.ctx["people"].index(o)] for o in p.ctx["options"]],
        }
        return replace(p, ctx=ctx, init=tuple(objects))


WORLDS = {w.name: w for w in (Arith(), Coin(), Light(), Date(), Swap())}


def chain(p, events=None):
    """The states after 0, 1, ..., n events; None if an event is impossible (a derived problem may
    break a world's limits: a negative count, April 31)."""
    w, states = WORLDS[p.world], [p.init]
    for e in p.events if events is None else events:
        states.append(w.step(states[-1], e))
        if states[-1] is None:
            return None
    return states


def layout(p):
    """(question, event_ends, query_start): event_ends[i] is the offset just past event i+1's
    sentence."""
    w, sents, ends = WORLDS[p.world], [], []

    def add(s):  # -> the offset just past s
        sents.append(s)
        return len(" ".join(sents))

    if not p.reverse:
        add(w.init_text(p, p.init, p.tpl[0]))
    for i in range(len(p.events) + 1):
        for slot, t, name, n, item in p.facts:
            if slot == i:
                add(FACTS[t].format(name=name, n=n, item=item))
        if i < len(p.events):
            ends.append(add(w.event_text(p, p.events[i], p.tpl[i + 1])))
    if p.reverse:
        add(w.now_text(p, chain(p)[-1]))
    head = " ".join(sents)
    return (
        head + " " + (w.back_query(p) if p.reverse else w.query(p, p.tpl[-1])),
        ends,
        len(head) + 1,
    )


def question(p):
    return layout(p)[0]


def story(p):
    q, _, start = layout(p)
    return q[: start - 1]  # the problem without its query


def query(p):
    q, _, start = layout(p)
    return q[start:]


def explain(p, states, events, upto=None):
    """The world's opening sentence, then one rationale step per event, e.g. "15 + 6 = 21."
    (the first `upto` events)."""
    w = WORLDS[p.world]
    return w.start(p, states[0]) + [
        w.step_text(a, e, b, p) for a, e, b in list(zip(states, events, states[1:]))[:upto]
    ]


def solve(p):
    """The oracle: (rationale, answer) for a problem, exact."""
    w, states = WORLDS[p.world], chain(p)
    if p.reverse:
        steps = w.start(p, states[-1]) + [
            w.undo_text(b, e, a, p) for a, e, b in reversed(list(zip(states, p.events, states[1:])))
        ]
        s = states[0]
    else:
        steps, s = explain(p, states, p.events), states[-1]
    ans = w.answer(p, s)
    return " ".join(steps + w.conclusion(p, s, p.reverse) + [f"The answer is {ans}."]), ans


def make_facts(p, rng, slots):
    """Distractor facts with a person and a number that appear nowhere else in the problem. Their
    names, items and objects come from the training and the OOD pools alike: every entity of
    ood_names occurs in training text, but only here, in a role that never changes the state or the
    answer."""
    w = WORLDS[p.world]
    used = set(re.findall(r"\d+", question(p) + question(replace(p, reverse=not p.reverse))))
    taken, facts = set(w.people(p)), []
    for slot in slots:
        name = rng.choice([x for x in NAMES["train"] + NAMES["ood"] if x not in taken])
        n = rng.choice([k for k in range(2, 60) if str(k) not in used])
        t = rng.choice(w.facts)
        pool, skip = (OBJECTS, p.init) if t == 2 else (ITEMS, [p.ctx.get("item")])
        taken.add(name)
        used.add(str(n))
        facts.append((slot, t, name, n, rng.choice(others(pool["train"] + pool["ood"], skip))))
    return facts


def make_problem(world, split, i, rng, n_events, pool="train", reverse=False, n_facts=1):
    ctx, init, events = WORLDS[world].sample(rng, n_events, pool, reverse)
    # a template choice per sentence (init, each event, query); 6: uniform over 2 or 3 templates
    tpl = [rng.randrange(6) for _ in range(n_events + 2)]
    p = Problem(f"{world}-{split}-{i:05d}", world, split, ctx, init, events, [], tpl, reverse)
    p.facts = make_facts(p, rng, [0] * n_facts)  # one block before the events: they stay contiguous
    return p


def span(n):
    """(lo, hi) from a count or a (lo, hi) range."""
    return (n, n) if isinstance(n, int) else tuple(n)


def draw_count(rng, lo, hi, decay=1.0):
    """A count in lo..hi, each one `decay` times as likely as the one before (1: uniform). With
    decay < 1 most questions are short and a few are long: the long ones still train the late
    positions."""
    if decay == 1.0:
        return rng.randint(lo, hi)
    return rng.choices(range(lo, hi + 1), weights=[decay ** (n - lo) for n in range(lo, hi + 1)])[0]


def make_dataset(
    world,
    sizes,
    seed,
    events=(2, 4),
    long_events=(6, 7),
    n_facts=1,
    long_facts=None,
    reverse_share=0.0,
    facts_decay=1.0,
):
    """{split: [Problem]} for the splits in `sizes` ({split: n}), each from its own seeded stream.
    Every split draws its event count from `events` and its number of distractor facts from
    `n_facts` (a count or a (lo, hi) range, each count `facts_decay` times as likely as the one
    before), except ood_long: `long_events` events and `long_facts` facts (default n_facts; fewer
    facts keep its longer chains inside the token lengths training covers). ood_reverse asks
    backwards, and a `reverse_share` of the train questions too (the rare-skill regime: every method
    sees the same few). ood_names fills the asked roles from the OOD pools. val_<split> is a
    validation copy of <split>, from its own seed. A question never repeats across splits."""
    seen, out = set(), {}
    for split in (s for s in SPLITS if sizes.get(s)):
        kind = split.removeprefix("val_") if split.startswith("val_") else split
        rng = random.Random(f"{seed}|{world}|{split}")
        lo, hi = long_events if kind == "ood_long" else events
        facts = span(long_facts if kind == "ood_long" and long_facts is not None else n_facts)
        out[split], tries = [], 0
        while len(out[split]) < sizes[split]:
            tries += 1
            if tries > 20 * sizes[split] + 1000:
                raise SystemExit(
                    f"cannot make {sizes[split]} distinct {world} problems for {split}: "
                    "ask for fewer"
                )
            reverse = kind == "ood_reverse" or (kind == "train" and rng.random() < reverse_share)
            p = make_problem(
                world,
                split,
                len(out[split]),
                rng,
                rng.randint(lo, hi),
                "ood" if kind == "ood_names" else "train",
                reverse,
                draw_count(rng, *facts, 1.0 if kind == "ood_long" else facts_decay),
            )
            if question(p) not in seen:
                seen.add(question(p))
                out[split].append(p)
    return out
