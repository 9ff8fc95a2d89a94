"""
An LLM teacher behind an OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp,
Ollama, a hosted API, or scripts/serve.py for a checkpoint of ours), for Stage 1 on a user's own
questions: the prompts, the teacher (answers, EI probes, judgements) and the HTTP client with its
on-disk cache. Standard library only.

Every request and its answer is cached under the run folder, one file per request named by the
sha256 of the request body (model, messages, sampling settings), written atomically as soon as the
answer arrives: a rerun after a crash or a kill asks only what is not there yet. The API key, read
from OPENAI_API_KEY, goes into a request header and nowhere else.
"""

import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from http.client import HTTPException

from tqdm import tqdm

from configurator import UserError, atomic_write

# ---- the prompts: every word the teacher is sent ----

# the system message of every answer: Q (its rationale, tries until it reaches A), each EI probe,
# and the Eq. 1 dialogues, where earlier probes and their answers come as user and assistant turns
ANSWER_SYSTEM = (
    "Answer the question. Reason in a few short steps written on one line, then end with "
    '"The answer is X." where X is only the final answer: a number in digits without units or '
    "separators, or a few words."
)

# the paper's rule prompt is a preamble, then per rule a one-line instruction and an
# "Original -> Augmented" example from a general domain; ours, one rule per request
PROBE_PROMPT = (
    "Explanatory inversion rewrites a question into a new question that targets the reasoning "
    "behind its answer: a student who can answer the new question understands why the original "
    "answer holds, not only what it is.\n"
    "\n"
    "Rule ({rule}): {instruction}\n"
    "Example.\n"
    "Original: {original}\n"
    "Augmented: {augmented}\n"
    "\n"
    "Apply the rule to this question.\n"
    "Original question: {question}\n"
    "Its answer: {answer}\n"
    "Its solution: {rationale}\n"
    "\n"
    "The new question must make sense on its own (restate what it needs from the original) and "
    "have one short answer. Reply with one JSON object and nothing else:\n"
    '{{"probe": "<the new question>", "rationale": "<its solution on one line, ending with: The '
    'answer is X.>", "answer": "<X: a number or a few words>"}}'
)

# rule: (instruction, original, augmented); the keys are the EI rules of tasks.py
RULES = {
    "counterfactual": (
        "Change one given fact and ask the original question about the changed situation.",
        "Maya buys 3 packs of 6 pencils. How many pencils does she buy?",
        "Maya buys 3 packs of pencils, but each pack holds 8 pencils instead of 6. How many "
        "pencils does she buy?",
    ),
    "step_challenge": (
        "Pick one step of the solution and ask what that step alone contributes.",
        "A shop had 40 apples, sold 15 and then received 10. How many apples does it have now?",
        "A shop had 40 apples, sold 15 and then received 10. By how many apples did the sale "
        "lower the count?",
    ),
    "decompose": (
        "Ask for an intermediate result the solution passes through.",
        "A shop had 40 apples, sold 15 and then received 10. How many apples does it have now?",
        "A shop had 40 apples and sold 15. How many apples did it have right after the sale?",
    ),
    "verify": (
        "State a claim about an intermediate or final result, true or false, and ask whether it "
        "holds (answer yes or no).",
        "A shop had 40 apples, sold 15 and then received 10. How many apples does it have now?",
        "A shop had 40 apples, sold 15 and then received 10. Is it true that it had 25 apples just "
        "before the delivery?",
    ),
    "cause": (
        "Ask which given fact or step is responsible for a part of the answer.",
        "A ticket costs 12 dollars and a drink 3 dollars. Ben buys a ticket and two drinks. How "
        "much does he spend?",
        "A ticket costs 12 dollars and a drink 3 dollars. Ben buys a ticket and two drinks. Which "
        "costs him more in total, the ticket or the drinks?",
    ),
    "compare": (
        "Ask for a comparison between two quantities of the problem.",
        "Sam has 8 stickers and gets 5 more. Kim has 15 stickers. How many stickers does Sam have "
        "now?",
        "Sam has 8 stickers and gets 5 more. Kim has 15 stickers. Who has more stickers now?",
    ),
    "hypothesis": (
        "Remove or skip one step and ask whether the original answer would still hold (answer yes "
        "or no).",
        "A ticket costs 12 dollars and a drink 3 dollars. Ben buys a ticket and two drinks. How "
        "much does he spend?",
        "A ticket costs 12 dollars and a drink 3 dollars. If Ben bought a ticket and only one "
        "drink, would he still spend 18 dollars?",
    ),
    "process": (
        "Ask for the result after each step, in order, as a comma-separated list.",
        "A shop had 40 apples, sold 15 and then received 10. How many apples does it have now?",
        "A shop had 40 apples, sold 15 and then received 10. List the number of apples after each "
        "of the two steps.",
    ),
    "premise": (
        "Ask which of two given facts does not affect the answer.",
        "Ana is 30 years old and has 4 boxes of 12 eggs. How many eggs does she have?",
        "Ana is 30 years old and has 4 boxes of 12 eggs. Which number does not affect how many "
        "eggs she has: 30 or 12?",
    ),
    "analogy": (
        "Write a new problem with the same reasoning but other objects, names and numbers.",
        "Maya buys 3 packs of 6 pencils. How many pencils does she buy?",
        "A farmer plants 5 rows of 7 trees. How many trees does he plant?",
    ),
    "inverse": (
        "Give the original answer as a fact and ask for one of the given numbers instead.",
        "A shop had 40 apples, sold 15 and then received 10. How many apples does it have now?",
        "A shop sold 15 apples, then received 10, and ended with 35 apples. How many apples did it "
        "have at first?",
    ),
}

# a probe's answer in other words than its writer's (more than a few words) is judged by the same
# teacher
JUDGE_PROMPT = (
    "Do these two answers to the question mean the same thing? Reply with yes or no only.\n"
    "Question: {question}\n"
    "Answer 1: {gold}\n"
    "Answer 2: {said}"
)


def answer_messages(turns, question):
    """The chat of an answer: earlier (question, response) turns of the dialogue, then the
    question."""
    messages = [{"role": "system", "content": ANSWER_SYSTEM}]
    for q, r in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    return messages + [{"role": "user", "content": question}]


def probe_messages(record, rule):
    instruction, original, augmented = RULES[rule]
    return [
        {
            "role": "user",
            "content": PROBE_PROMPT.format(
                rule=rule,
                instruction=instruction,
                original=original,
                augmented=augmented,
                question=record["question"],
                answer=record["answer"],
                rationale=record["rationale"],
            ),
        }
    ]


def parse_probe(text, rule):
    """The {probe, rationale, answer} object in a reply (a code fence or words around it are
    fine), as an EI probe record; None when there is none."""
    start, end = text.find("{"), text.rfind("}")
    try:
        got = json.loads(text[start : end + 1]) if 0 <= start < end else None
    except ValueError:
        return None
    if not isinstance(got, dict):
        return None
    fields = {
        k: str(got[k]).strip() if isinstance(got.get(k), (str, int, float)) else ""
        for k in ("probe", "rationale", "answer")
    }
    return (
        None
        if not all(fields.values())
        else {
            "rule": rule,
            "question": fields["probe"],
            "rationale": fields["rationale"],
            "answer": fields["answer"],
        }
    )


def is_long(answer):
    """More than three words and not a number: two wordings of it rarely match letter for letter."""
    return len(answer.split()) > 3 and not re.fullmatch(r"[-+$]?[\d,.]+%?", answer.strip())


class LLMTeacher:
    """The teacher of invert.py (respond, as the oracle and a checkpoint of ours) plus what only
    an LLM does: write EI probes and judge an answer. Every answer is greedy except the rationale
    re-tries."""

    def __init__(self, client, max_tokens=128, temperature=0.7, seed=0):
        self.client, self.max_tokens, self.temperature, self.seed = (
            client,
            max_tokens,
            temperature,
            seed,
        )
        self.judged = Counter()

    def ask(self, chats, desc, attempt=0):
        bodies = [
            {
                "messages": m,
                "max_tokens": self.max_tokens,
                "seed": self.seed + attempt,
                "temperature": self.temperature if attempt else 0.0,
            }
            for m in chats
        ]
        return [
            reply["content"].strip() if reply else ""
            for reply in self.client.complete(bodies, desc)
        ]

    def respond(self, dialogues, attempt=0):
        """dialogues: [(turns [(question, response)], question)] -> [response]; attempt > 0
        samples anew."""
        desc = f"teacher answers (try {attempt + 1})" if attempt else "teacher answers"
        return self.ask([answer_messages(turns, q) for turns, q in dialogues], desc, attempt)

    def write_probes(self, records, rules):
        """One request per record and rule -> (per record its parsed probes, per rule the replies
        that held no usable probe: no JSON object, a field missing, or the original question
        again)."""
        asked = [(r, rule) for r in records for rule in rules]
        said = self.ask([probe_messages(r, rule) for r, rule in asked], "teacher writes EI probes")
        probes, unusable = {id(r): [] for r in records}, Counter()
        for (r, rule), text in zip(asked, said):
            probe = parse_probe(text, rule)
            if probe is None or probe["question"] == r["question"]:
                unusable[rule] += 1
            else:
                probes[id(r)].append(probe)
        return [probes[id(r)] for r in records], dict(unusable)

    def judge(self, items):
        """items [(question, gold, said)] -> [whether the teacher calls them the same answer]."""
        said = self.ask(
            [
                [{"role": "user", "content": JUDGE_PROMPT.format(question=q, gold=g, said=s)}]
                for q, g, s in items
            ],
            "teacher judges",
        )
        same = [t.lower().lstrip("\"'* ").startswith("yes") for t in said]
        self.judged.update(asked=len(items), same=sum(same))
        return same


# ---- the client: a thread pool, retries with backoff, the cache ----


# How to ask a server that refuses one of our parameters, learnt from its first refusal: hosted
# reasoning models take the token limit only under its new name, max_completion_tokens, and
# sample at their own temperature; some servers take no seed. None: the parameter is left out.
INSTEAD = {"max_tokens": "max_completion_tokens", "temperature": None, "seed": None}
# what a server says of a parameter it does not take (OpenAI, Azure, vLLM's and llama.cpp's
# validators); a refusal without these words (e.g. a prompt too long) is about the request itself
UNSUPPORTED = re.compile(
    r"unsupported|not supported|does not support|unrecognized|unknown|not allowed|not permitted"
    r"|extra (inputs|fields)|only the default",
    re.IGNORECASE,
)


@dataclass
class Refusal:
    """An HTTP 400 answer: its message, and the parameter and code of an OpenAI error body."""

    message: str
    param: str | None = None
    code: str | None = None


def refused_parameter(refusal):
    """The parameter of ours (a key of INSTEAD) that a refusal says the server does not take, or
    None when it refuses the request for another reason. OpenAI names it in `param`; other servers
    only in the message, where the first one named is the one refused ("'max_tokens' is not
    supported with this model. Use 'max_completion_tokens' instead.")."""
    if refusal.code not in ("unsupported_parameter", "unsupported_value") and not (
        UNSUPPORTED.search(refusal.message)
    ):
        return None
    if refusal.param in INSTEAD:
        return refusal.param
    named = [(m.start(), p) for p in INSTEAD if (m := re.search(rf"\b{p}\b", refusal.message))]
    return min(named)[1] if named else None


class ChatClient:
    """POST {base}/chat/completions with a few requests in flight. 429, 5xx, timeouts and dropped
    connections are retried after backoff * 1, 2, 4, ... seconds; a 400 (e.g. a prompt longer than
    the model's context) fails that request alone (None, counted, not cached); anything else stops
    the run with one sentence. A 400 that refuses one of our parameters (INSTEAD) teaches the
    client how this server is asked, and the request goes again: the cache keys stay those of the
    bodies as written. `stats` counts what was sent, found in the cache, retried, failed and the
    tokens (cached answers included)."""

    def __init__(self, base, model, cache_dir, workers=4, timeout=120.0, retries=5, backoff=1.0):
        self.base, self.model, self.cache_dir = base.rstrip("/"), model, cache_dir
        self.workers, self.timeout, self.retries, self.backoff = workers, timeout, retries, backoff
        self.key = os.environ.get("OPENAI_API_KEY")
        self.stats, self.lock, self.reached = Counter(), threading.Lock(), False
        self.first_refusal = None
        self.instead = {}  # what this server has refused, as INSTEAD says to ask it instead

    def path(self, key):
        return os.path.join(self.cache_dir, key[:2], key + ".json")

    def complete(self, bodies, desc):
        """bodies [{messages, max_tokens, seed, temperature}] -> [{content, finish_reason} or
        None]."""
        if not bodies:
            return []
        bodies = [{"model": self.model, **b} for b in bodies]
        keys = [hashlib.sha256(json.dumps(b, sort_keys=True).encode()).hexdigest() for b in bodies]
        replies, todo = {}, {}
        for key, body in zip(keys, bodies):  # the same request twice is sent once
            if key not in replies and key not in todo:
                cached = self.read_cache(key)
                if cached is None:
                    todo[key] = body
                else:
                    replies[key] = cached
                    self.count(cached["usage"], cached=1)
        with (
            tqdm(
                total=len(replies) + len(todo), initial=len(replies), desc=desc, leave=False
            ) as bar,
            ThreadPoolExecutor(self.workers) as pool,
        ):
            futures = {pool.submit(self.request, key, body): key for key, body in todo.items()}
            try:
                for done in as_completed(futures):
                    replies[futures[done]] = done.result()
                    bar.update()
                    bar.set_postfix(
                        requests=self.stats["sent"],
                        cached=self.stats["cached"],
                        tokens=self.stats["prompt_tokens"] + self.stats["completion_tokens"],
                        failures=self.stats["retried"] + self.stats["refused"],
                    )
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the requests in flight finish and are cached
                raise
        # it never answered at all
        if todo and not self.reached and all(replies[k] is None for k in todo):
            raise UserError(
                f"the teacher at {self.base} refused every request ({self.first_refusal}); check "
                f"--teacher_model and --teacher_max_new_tokens against the model it serves"
            )
        return [replies[k] for k in keys]

    def read_cache(self, key):
        try:
            with open(self.path(key), encoding="utf-8") as f:
                return json.load(f)["reply"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"{self.path(key)} is not a cache entry of ours; delete it and rerun"
            ) from None

    def count(self, usage, **more):
        with self.lock:
            self.stats.update(
                prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0),
                **more,
            )

    def as_taken(self, body):
        """The body as this server takes it: refused parameters renamed or left out."""
        with self.lock:
            instead = dict(self.instead)
        sent = {}
        for name, value in body.items():
            if instead.get(name, name) is not None:
                sent[instead.get(name, name)] = value
        return sent

    def request(self, key, body):
        """The reply to one request, or None when the server refuses it. A refusal of a parameter
        it was sent with is learnt and the request goes again without it: each parameter is learnt
        once, so a request goes at most len(INSTEAD) + 1 times."""
        while True:
            sent = self.as_taken(body)
            reply = self.post(key, body, sent)
            if not isinstance(reply, Refusal):
                return reply
            param = refused_parameter(reply)
            if param is None or param not in sent:
                with self.lock:
                    self.first_refusal = self.first_refusal or f"HTTP 400: {reply.message}"
                self.count({}, refused=1)
                return None
            self.learn(param, reply.message)

    def learn(self, param, message):
        """Ask this server without `param` from now on, and say so once (the requests in flight
        when it refused may be refused too: they learn nothing new)."""
        with self.lock:
            if param in self.instead:
                return
            self.instead[param] = INSTEAD[param]
        then = (
            f"requests now send it as '{INSTEAD[param]}'"
            if INSTEAD[param]
            else "requests now leave it out"
        )
        tqdm.write(
            f"the teacher at {self.base} does not take '{param}' ({message.strip()[:160]}): "
            f"{then}, and the cache keys stay as they were"
        )

    def post(self, key, body, sent):
        """POST `sent` (body as this server takes it) until it is answered: the reply, cached
        under key, or the Refusal of an HTTP 400."""
        headers = {"Content-Type": "application/json"} | (
            {"Authorization": f"Bearer {self.key}"} if self.key else {}
        )
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.count({}, retried=1)
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(
                f"{self.base}/chat/completions", json.dumps(sent).encode(), headers
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                refusal = refusal_of(e)
                if e.code == 400:
                    return refusal
                last = f"HTTP {e.code}: {refusal.message}"
                if e.code != 429 and e.code < 500:
                    raise UserError(
                        f"the teacher at {self.base} answered {last}; check --teacher, "
                        f"--teacher_model and OPENAI_API_KEY"
                    ) from None
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException) as e:
                reason = getattr(e, "reason", e)
                last = (
                    "timed out"
                    if isinstance(reason, TimeoutError)
                    else f"{type(reason).__name__}: {reason}"
                )
                if not self.reached and isinstance(reason, ConnectionRefusedError):
                    raise UserError(
                        f"cannot reach the teacher at {self.base} (connection refused): start the "
                        f"server or fix --teacher"
                    ) from None
                continue
            self.reached = True
            reply = chat_reply(raw, self.base)
            if not reply["content"].strip() and reply["finish_reason"] == "length":
                # a reasoning model thinks in hidden tokens counted against the same limit
                raise UserError(
                    f"the teacher at {self.base} used all {body['max_tokens']} tokens of "
                    f"--teacher_max_new_tokens before it wrote any answer (a reasoning model "
                    f"spends its hidden reasoning from the same limit): raise "
                    f"--teacher_max_new_tokens, e.g. to {8 * body['max_tokens']}"
                )
            atomic_write_entry(self.path(key), {"request": body, "reply": reply})
            self.count(reply["usage"], sent=1, truncated=int(reply["finish_reason"] == "length"))
            return reply
        raise UserError(
            f"the teacher at {self.base} did not answer after {self.retries + 1} tries ({last}); "
            f"what it answered before is cached in {self.cache_dir}, so a rerun asks only the rest"
        )


def chat_reply(raw, base):
    """{content, finish_reason, usage} of a chat-completion body; anything else stops the run."""
    try:
        got = json.loads(raw)
        choice = got["choices"][0]
        reply = {
            # null when a reasoning model spent the whole limit thinking: no answer
            "content": choice["message"]["content"] or "",
            "finish_reason": choice.get("finish_reason"),
            "usage": {
                k: int(v)
                for k, v in (got.get("usage") or {}).items()
                if k in ("prompt_tokens", "completion_tokens")
            },
        }
        if isinstance(reply["content"], str):
            return reply
    except (ValueError, KeyError, IndexError, TypeError):
        pass
    shown = raw[:80].decode("utf-8", "replace")
    raise UserError(
        f"the teacher at {base} answered with something that is not an OpenAI chat completion "
        f"({shown!r}); is --teacher the /v1 address of an OpenAI-compatible server?"
    )


def refusal_of(error):
    """The message, param and code of an OpenAI-style error body; a body of another shape is its
    first characters as the message."""
    try:
        raw = error.read()
    except OSError:
        return Refusal(str(error.reason))
    try:
        got = json.loads(raw)["error"]
        param, code = got.get("param"), got.get("code")
        return Refusal(
            str(got["message"]),
            param if isinstance(param, str) else None,
            code if isinstance(code, str) else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return Refusal(raw[:200].decode("utf-8", "replace").strip() or str(error.reason))


def atomic_write_entry(path, entry):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, json.dumps(entry, sort_keys=True))
