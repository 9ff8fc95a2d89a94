"""Stage 1 with an LLM teacher over the OpenAI chat-completions API, against real HTTP servers on
127.0.0.1: a scripted teacher in this process (it solves the word problems below exactly, and errs
where a test tells it to) for the filters and the faults, and scripts/serve.py with a small trained
checkpoint for the whole pipeline: serve, invert, SFT, evaluate."""

import http.server
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import torch

import invert
import llm_teacher
import tasks
from configurator import UserError
from model import GPT, GPTConfig, save_checkpoint
from tokenizer import CompactTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-7f3a9c1e-never-on-disk"
NAMES, THINGS = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay"), ("apples", "pens", "cards", "stamps")


def word_problem(k):
    """(question, rationale, answer) of a seeded two-step word problem."""
    g = random.Random(k)
    name, thing, a, b = g.choice(NAMES), g.choice(THINGS), g.randint(5, 30), g.randint(2, 9)
    c = g.randint(1, a + b - 1)
    q = (
        f"{name} has {a} {thing}. {name} gets {b} more and gives away {c}. How many {thing} does "
        f"{name} have now?"
    )
    return (
        q,
        f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}. The answer is {a + b - c}.",
        str(a + b - c),
    )


def solve(question):
    """The count a question of word_problem's form (or a probe the scripted teacher wrote) ends
    with."""
    got = re.search(r"has (\d+) \w+\. \w+ gets (\d+) more and gives away (\d+)", question)
    return got and int(got[1]) + int(got[2]) - int(got[3])


def write_jsonl(path, problems, test_from=None):
    """A user's JSONL of question and answer only; from index test_from on, split test_id."""
    with open(path, "w") as f:
        for k, (q, _, a) in enumerate(problems):
            f.write(
                json.dumps(
                    {"question": q, "answer": a}
                    | ({"split": "test_id"} if k >= (test_from or 1e9) else {})
                )
                + "\n"
            )


class Scripted(http.server.BaseHTTPRequestHandler):
    """A chat-completions server answering as a correct teacher, except as server.script says:
    greedy_wrong (questions it gets wrong at temperature 0), always_wrong, and per rule malformed /
    wrong (the probe's written answer is off by one) / long (written in words) / distracting (Q
    answered wrong after it). Faults: server.faults is popped per request ('500', 'slow',
    'garbage'); server.die_after answered requests, the server shuts down. server.kind "old"
    refuses max_completion_tokens, as older vLLM and llama.cpp builds do; "reasoning" behaves like
    a hosted reasoning model: it refuses max_tokens, temperature and seed (REFUSALS) and spends
    server.reasoning hidden tokens of the limit before it answers. server.answered lists the bodies
    answered with 200, server.refused those refused."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        s = self.server
        with s.lock:
            s.auth.add(self.headers.get("Authorization"))
            fault = s.faults.pop(0) if s.faults else s.always
            dying = s.die_after is not None and len(s.answered) >= s.die_after
            if dying and not s.dying:
                s.dying = True
                threading.Thread(
                    target=lambda: (s.shutdown(), s.server_close())
                ).start()  # then refuses
        if dying:
            self.close_connection = True  # no answer: the connection just drops
            return
        if fault == "slow":  # longer than the client waits: it has gone when this would answer
            time.sleep(s.slow)
            self.close_connection = True
            return
        if fault == "500":
            return self.send(500, json.dumps({"error": {"message": "overloaded"}}))
        if fault == "garbage":
            return self.send(200, "<html>Bad gateway</html>")
        refused = next((e for kind, test, e in REFUSALS if kind == s.kind and test(body)), None)
        with s.lock:
            (s.refused if refused else s.answered).append(json.dumps(body, sort_keys=True))
        if refused:
            return self.send(400, json.dumps({"error": refused}))
        text, finish, spent = self.teacher(body), "stop", 0
        if s.kind == "reasoning":  # it thinks first, within the same limit, then answers
            spent = s.reasoning
            if spent + len(text.split()) > body["max_completion_tokens"]:
                text, finish, spent = None, "length", body["max_completion_tokens"]
        self.send(
            200,
            json.dumps(
                {
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": finish,
                        }
                    ],
                    "usage": {
                        "prompt_tokens": len(json.dumps(body["messages"]).split()),
                        "completion_tokens": spent + len((text or "").split()),
                    },
                }
            ),
        )

    def teacher(self, body):
        script, messages = self.server.script, body["messages"]
        last = messages[-1]["content"]
        if last.startswith(llm_teacher.JUDGE_PROMPT.split("\n")[0]):
            one, two = (re.search(rf"Answer {n}: \D*(\d+)", last) for n in (1, 2))
            return "yes" if one and two and one[1] == two[1] else "no"
        if "Original question:" in last:
            rule, q = (
                re.search(r"Rule \((\w+)\)", last)[1],
                re.search(r"Original question: (.*)", last)[1],
            )
            if rule in script.get("malformed", ()):
                return "Here is a good probe for you."
            n = int(re.search(r"has (\d+)", q)[1]) + len(rule)  # another start: a probe per rule
            probe = re.sub(r"has \d+", f"has {n}", q, count=1) + f" ({rule})"
            ans = solve(probe) + (rule in script.get("wrong", ()))
            thing = re.search(r"How many (\w+)", q)[1]
            answer = f"{ans} {thing} in all" if rule in script.get("long", ()) else str(ans)
            reply = {"probe": probe, "rationale": f"The answer is {ans}.", "answer": answer}
            return "```json\n" + json.dumps(reply) + "\n```"
        ans = solve(last)
        if ans is None:
            return "I cannot tell."
        before = [m["content"] for m in messages[:-1] if m["role"] == "user"]
        greedy_wrong = last in script.get("greedy_wrong", ()) and body.get("temperature") == 0
        if (
            last in script.get("always_wrong", ())
            or greedy_wrong
            or any(f"({rule})" in q for q in before for rule in script.get("distracting", ()))
        ):
            ans += 1
        return f"Counting up and down gives {ans}. The answer is {ans}."

    def send(self, status, text):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


# (kind of server, what it refuses, its error body), in the order it checks them: the words of
# OpenAI's reasoning models, and of a server that names the parameter in the message alone
REFUSALS = [
    (
        "old",
        lambda body: "max_completion_tokens" in body,
        {"message": "Unrecognized request argument supplied: max_completion_tokens", "param": None},
    ),
    (
        "reasoning",
        lambda body: "max_tokens" in body,
        {
            "message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
            "'max_completion_tokens' instead.",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": "unsupported_parameter",
        },
    ),
    (
        "reasoning",
        lambda body: body.get("temperature", 1) != 1,
        {
            "message": "Unsupported value: 'temperature' does not support 0.0 with this model. "
            "Only the default (1) value is supported.",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "unsupported_value",
        },
    ),
    (
        "reasoning",
        lambda body: "seed" in body,
        {"message": "Unrecognized request argument supplied: seed", "param": None, "code": None},
    ),
]


def start(
    script=None, faults=(), always=None, slow=0.0, die_after=None, port=0, kind=None, reasoning=0
):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Scripted)
    server.script, server.faults, server.always, server.slow = (
        script or {},
        list(faults),
        always,
        slow,
    )
    server.die_after, server.dying, server.answered, server.auth = die_after, False, [], set()
    server.kind, server.reasoning, server.refused = kind, reasoning, []
    server.lock = threading.Lock()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def scripted():
    servers = []
    yield lambda **kw: servers.append(start(**kw)) or servers[-1]
    for s in servers:
        if not s.dying:
            s.shutdown()
        s.server_close()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROBLEMS = [word_problem(k) for k in range(20)]
FAST = [
    "--teacher_backoff=0.01",
    "--teacher_retries=3",
    "--teacher_model=scripted",
    "--n_examples=0",
]


def invert_args(tmp_path, server_or_port, *extra, n=6, rules="verify,decompose,analogy", run="run"):
    """invert.py's arguments: tmp_path/mine.jsonl (the first n problems) -> tmp_path/run."""
    jsonl = tmp_path / "mine.jsonl"
    if not jsonl.exists():
        write_jsonl(jsonl, PROBLEMS[:n])
    port = server_or_port if isinstance(server_or_port, int) else server_or_port.server_port
    return [
        f"--input_jsonl={jsonl}",
        f"--out_dir={tmp_path / run}",
        f"--teacher=http://127.0.0.1:{port}/v1",
        f"--rules={rules}",
        *FAST,
        *extra,
    ]


def files(folder):
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, names in os.walk(folder)
        for f in names
    }


def test_the_prompts_cover_every_rule_and_replies_parse():
    assert set(llm_teacher.RULES) == set(tasks.EI_RULES)
    for rule in llm_teacher.RULES:
        text = llm_teacher.probe_messages(
            {"question": "Q?", "answer": "7", "rationale": "R. The answer is 7."}, rule
        )[0]["content"]
        assert f"Rule ({rule}): " in text and "Original question: Q?" in text and '"probe"' in text
    want = {
        "rule": "verify",
        "question": "Is it 3?",
        "rationale": "Yes. The answer is yes.",
        "answer": "yes",
    }
    reply = (
        'Sure:\n```json\n{"probe": "Is it 3?", "rationale": "Yes. The answer is yes.", '
        '"answer": "yes"}\n```'
    )
    assert llm_teacher.parse_probe(reply, "verify") == want
    assert (
        llm_teacher.parse_probe('{"probe": "Is it 3?", "rationale": "x", "answer": 3}', "verify")[
            "answer"
        ]
        == "3"
    )
    for bad in (
        "no json here",
        '{"probe": "Is it 3?", "answer": "yes"}',
        '{"probe": "", "rationale": "r", "answer": "1"}',
        "[1, 2]",
        '{"probe": "a", "rationale": "b", "answer": {"x": 1}}',
    ):
        assert llm_teacher.parse_probe(bad, "verify") is None, bad
    assert [
        llm_teacher.is_long(a)
        for a in ("42", "1,250.5", "the red ball", "19 apples in all", "3, 5, 7, 9")
    ] == [False, False, False, True, True]


def test_the_example_is_a_user_jsonl_of_questions_and_answers():
    path = os.path.join(ROOT, "examples", "word_problems.jsonl")
    records = tasks.load_records(path, rationale=False)
    assert len(records) == 24 and all(
        r["rationale"] is None and r["answer"].isdigit() for r in records
    )
    assert Counter(r["split"] for r in records) == {"train": 20, "test_id": 4}
    with pytest.raises(SystemExit, match=r"word_problems\.jsonl:1: missing field 'rationale'"):
        tasks.load_records(path)  # without an LLM teacher every record brings its rationale


def test_the_llm_teacher_writes_and_filters_the_ei_data(tmp_path, scripted, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    qs = [q for q, _, _ in PROBLEMS[:6]]
    server = scripted(
        script={
            "greedy_wrong": [qs[1]],
            "always_wrong": [qs[2]],
            "malformed": ["verify"],
            "wrong": ["decompose"],
            "long": ["analogy", "cause"],
            "distracting": ["cause"],
        }
    )
    rules = "verify,decompose,analogy,cause,premise"
    invert.main(invert_args(tmp_path, server, rules=rules))
    # the schema every stage reads
    got = tasks.load_records(str(tmp_path / "run" / "data" / "train.jsonl"))
    assert [r["question"] for r in got] == [q for q in qs if q != qs[2]]
    # verify unparseable, decompose answered otherwise, cause distracting; and Eq. 1 removes
    # every probe of the Q the teacher gets wrong when greedy: it is greedy in the dialogues too
    for r in got:
        assert tasks.is_correct("user", r["rationale"], r["answer"]) and r["rationale"].startswith(
            "Counting"
        )
        assert [p["rule"] for p in r["probes"]] == (
            [] if r["question"] == qs[1] else ["analogy", "premise"]
        )
        for p in r["probes"]:
            assert p["answer"] == str(solve(p["question"])) and p["rationale"].endswith(
                f"The answer is {p['answer']}."
            )
    stats = json.loads((tmp_path / "run" / "data" / "stats.json").read_text())
    f = stats["train_filters"]["user"]
    assert f["rationale_tries"] == {"1": 4, "2": 1} and f["removed_teacher_wrong"] == 1
    assert f["probes_unusable"] == {"verify": 5} and f["removed_probe_wrong"] == {"decompose": 5}
    assert f["removed_inconsistent"] == {"cause": 5, "analogy": 1, "premise": 1}
    assert f["probes_kept"] == {"analogy": 4, "premise": 4}
    # the analogy and cause answers written in words
    assert f["judged"] == {"asked": 10, "same": 10}
    assert "judged by the teacher itself" in f["answer_check"]
    # every distinct request went out once: 6 greedy rationales, then 2, 1 and 1 sampled (the one
    # wrong only when greedy, the one it never gets right), 25 probes written, 20 answered, 10
    # judged, 15 Eq. 1 dialogues
    assert len(server.answered) == len(set(server.answered)) == 10 + 25 + 20 + 10 + 15
    assert server.auth == {f"Bearer {KEY}"}  # the key was sent ...
    written = files(tmp_path / "run")
    assert any(name.startswith("teacher_cache") for name in written)
    # ... and is in no file written
    assert not [name for name, data in written.items() if KEY.encode() in data]


def test_what_the_user_wrote_is_kept_and_only_eq1_asks_about_it(tmp_path, scripted):
    (q0, r0, a0), (q1, r1, a1) = PROBLEMS[:2]
    probe = {"question": q1, "rationale": r1, "answer": a1, "rule": "mine"}
    with open(tmp_path / "mine.jsonl", "w") as f:
        f.write(
            json.dumps(
                {
                    "question": q0,
                    "answer": a0,
                    "rationale": "By hand. The answer is " + a0 + ".",
                    "probes": [probe],
                }
            )
            + "\n"
        )
    server = scripted()
    invert.main(invert_args(tmp_path, server))
    got = tasks.load_records(str(tmp_path / "run" / "data" / "train.jsonl"))
    assert got[0]["rationale"].startswith("By hand.") and got[0]["probes"] == [probe]
    assert [
        json.loads(b)["messages"][1:] for b in server.answered
    ] == [  # one request: Eq. 1's dialogue
        [
            {"role": "user", "content": q1},
            {"role": "assistant", "content": r1},
            {"role": "user", "content": q0},
        ]
    ]


def test_a_500_and_a_timeout_are_retried(tmp_path, scripted):
    clean = scripted()
    invert.main(invert_args(tmp_path, clean, run="a"))
    faulty = scripted(faults=["500", "slow", "500"], slow=2.0)
    invert.main(invert_args(tmp_path, faulty, "--teacher_timeout=0.5", run="b"))
    data = lambda run: files(tmp_path / run / "data")["train.jsonl"]
    assert data("b") == data("a")
    # each asked again until it was answered
    assert sorted(faulty.answered) == sorted(clean.answered)


@pytest.mark.parametrize(
    "fault,says",
    [
        ("slow", "did not answer after 4 tries (timed out); what it answered before is cached in"),
        (
            "garbage",
            "answered with something that is not an OpenAI chat completion "
            "('<html>Bad gateway</html>'); is --teacher the /v1 address of an OpenAI-compatible "
            "server?",
        ),
        ("500", "did not answer after 4 tries (HTTP 500: overloaded)"),
    ],
)
def test_a_server_that_never_answers_well_is_one_sentence(tmp_path, scripted, fault, says):
    server = scripted(always=fault, slow=0.6)
    with pytest.raises(UserError) as e:
        invert.main(invert_args(tmp_path, server, "--teacher_timeout=0.2", n=1))
    assert says in str(e.value) and str(e.value).startswith(
        f"the teacher at http://127.0.0.1:{server.server_port}/v1 "
    )


def test_no_server_running_stops_the_cli_with_one_sentence(tmp_path):
    port = closed_port()
    run = subprocess.run(
        [sys.executable, "invert.py", *invert_args(tmp_path, port)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"cannot reach the teacher at http://127.0.0.1:{port}/v1 "
        f"(connection refused): start the server or fix --teacher"
    )
    with pytest.raises(SystemExit, match="name the model it serves with --teacher_model=NAME"):
        invert.main([a for a in invert_args(tmp_path, port) if not a.startswith("--teacher_model")])


def test_a_run_killed_mid_way_resumes_from_the_cache_without_asking_twice(tmp_path, scripted):
    clean = scripted()
    invert.main(invert_args(tmp_path, clean, run="a"))
    first = scripted(die_after=20)
    with pytest.raises(
        UserError,
        match="did not answer after 4 tries .*cached in .*teacher_cache, so a rerun asks "
        "only the rest",
    ):
        invert.main(invert_args(tmp_path, first, run="b"))
    assert len(first.answered) >= 20 and not (tmp_path / "b" / "data").exists()
    second = scripted(port=first.server_port)  # restarted where it was
    invert.main(invert_args(tmp_path, second, run="b"))
    assert not set(first.answered) & set(second.answered)  # nothing the cache held was asked again
    assert sorted(first.answered + second.answered) == sorted(clean.answered)
    data = lambda run: files(tmp_path / run / "data")["train.jsonl"]
    assert data("b") == data("a")
    second.answered.clear()
    invert.main(invert_args(tmp_path, second, run="b"))
    assert second.answered == []  # a finished run asks nothing at all


def test_a_refused_parameter_is_told_from_a_refusal_of_the_request():
    refusal, named = llm_teacher.Refusal, llm_teacher.refused_parameter
    told = [named(refusal(e["message"], e.get("param"), e.get("code"))) for _, _, e in REFUSALS]
    assert told == [None, "max_tokens", "temperature", "seed"]  # the old server's is not ours
    assert named(refusal("extra_forbidden: Extra inputs are not permitted (seed)")) == "seed"
    for other in (  # the request itself is refused: nothing to learn
        refusal(
            "This model's maximum context length is 2048 tokens. However, you requested 2100 "
            "tokens (1972 in the messages, 128 in the completion)."
        ),
        refusal(
            "this model has a context of 512 tokens: the prompt takes 500 and max_tokens asks "
            "for 128",
            "max_tokens",
            "context_length_exceeded",
        ),
        refusal("Unsupported value: 'logprobs' is not supported", "logprobs", "unsupported_value"),
    ):
        assert named(other) is None


def test_the_teacher_asks_each_kind_of_server_as_it_takes_it(tmp_path, scripted, capsys):
    old = scripted(kind="old")
    invert.main(invert_args(tmp_path, old, run="a"))
    assert old.refused == [] and "does not take" not in capsys.readouterr().out
    sent = [json.loads(b) for b in old.answered]
    assert all({"max_tokens", "temperature", "seed"} <= set(b) for b in sent)
    reasoning = scripted(kind="reasoning", reasoning=40)
    invert.main(invert_args(tmp_path, reasoning, run="b"))
    out = capsys.readouterr().out
    # it learnt each parameter from its first refusal, and said so once
    assert [line.split("'")[1] for line in out.splitlines() if "does not take" in line] == [
        "max_tokens",
        "temperature",
        "seed",
    ], out
    assert "requests now send it as 'max_completion_tokens'" in out
    assert "and the cache keys stay as they were" in out
    assert reasoning.refused  # the requests in flight were refused, and sent again: none is lost
    stats = json.loads((tmp_path / "b" / "data" / "stats.json").read_text())
    assert stats["teacher_requests"]["refused"] == 0 and ", 0 refused (HTTP 400)" in out
    answered = [json.loads(b) for b in reasoning.answered]
    assert all(set(b) == {"model", "messages", "max_completion_tokens"} for b in answered)
    assert sorted(json.dumps(b["messages"]) for b in answered) == sorted(
        json.dumps(b["messages"]) for b in sent
    )
    # the cache keys are those of the requests as written: the same entries in both runs
    cache = lambda run: sorted(n for n in files(tmp_path / run) if n.startswith("teacher_cache"))
    assert cache("b") == cache("a") and len(cache("a")) == len(sent)
    data = lambda run: files(tmp_path / run / "data")["train.jsonl"]
    assert data("b") == data("a")


def test_a_reasoning_model_that_thinks_past_the_limit_stops_the_run(tmp_path, scripted):
    server = scripted(kind="reasoning", reasoning=200)
    with pytest.raises(UserError) as e:
        invert.main(invert_args(tmp_path, server, "--teacher_max_new_tokens=128", n=1))
    said = str(e.value)
    assert said.startswith(
        f"the teacher at http://127.0.0.1:{server.server_port}/v1 used all 128 tokens of "
        "--teacher_max_new_tokens before it wrote any answer"
    )
    assert said.endswith("raise --teacher_max_new_tokens, e.g. to 1024") and "\n" not in said
    assert not (tmp_path / "run" / "data").exists()


# ---- the whole pipeline with scripts/serve.py and a real model behind it ----


def memorising_teacher(path, problems, rules):
    """A 2-layer checkpoint trained until it writes each problem's rationale, with a compact
    vocabulary that also reads the EI-probe prompts it will be sent: a real model that knows 20
    answers, and no more."""
    prompts = [
        llm_teacher.probe_messages({"question": q, "answer": a, "rationale": r}, rule)[0]["content"]
        for q, r, a in problems
        for rule in rules
    ]
    tok = CompactTokenizer.from_texts(
        [t for q, r, _ in problems for t in ("Q: " + q + "\nA:", " " + r)]
        + ["Q: " + p + "\nA:" for p in prompts]
    )
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=tok.n_vocab, block_size=512))
    opt = model.configure_optimizer(1e-2, 0.0)
    x, y = tasks.sft_batch(
        [[(tasks.prompt_ids(tok, q), tasks.response_ids(tok, r))] for q, r, _ in problems], "cpu"
    )
    for _ in range(120):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(path, model, tok)
    return model, tok


def post(port, body):
    """(status, JSON reply) of POST /v1/chat/completions."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        body if isinstance(body, bytes) else json.dumps(body).encode(),
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_then_invert_sft_and_evaluate_end_to_end(tmp_path):
    rules = ("verify", "decompose", "analogy")
    model, tok = memorising_teacher(str(tmp_path / "teacher.pt"), PROBLEMS, rules)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENAI_API_KEY": KEY}
    server = subprocess.Popen(
        [
            sys.executable,
            "scripts/serve.py",
            f"--init={tmp_path / 'teacher.pt'}",
            "--port=0",
            "--device=cpu",
            "--threads=1",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = server.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1$", line.strip())[1])
        # the chat template: the students' prompt format, system messages dropped, turns
        # EOT-separated
        (q0, r0, _), (q1, _, a1) = PROBLEMS[:2]
        chat = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": q0},
            {"role": "assistant", "content": r0},
            {"role": "user", "content": q1},
        ]
        status, reply = post(
            port, {"model": "teacher", "messages": chat, "temperature": 0, "max_tokens": 40}
        )
        out, mask = model.generate(
            [tasks.dialogue_ids(tok, [(q0, r0)], q1)], 40, temperature=0, eot=tok.eot
        )
        assert status == 200 and reply["choices"][0]["message"] == {
            "role": "assistant",
            "content": tok.decode(
                [t for t, m in zip(out[0].tolist(), mask[0].tolist()) if m and t != tok.eot]
            ).strip(),
        }
        assert reply["usage"] == {
            "prompt_tokens": len(tasks.dialogue_ids(tok, [(q0, r0)], q1)),
            "completion_tokens": int(mask.sum()),
            "total_tokens": reply["usage"]["total_tokens"],
        }
        # max_tokens: the rest
        status, reply = post(port, {"model": "teacher", "messages": chat[3:], "temperature": 0})
        # the rationale it learnt, then end of text
        assert reply["choices"][0] == {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": PROBLEMS[1][1]},
        }
        sampled = [
            post(port, {"model": "teacher", "messages": chat[3:], "max_tokens": 5, "seed": 3})[1]
            for _ in range(2)
        ]
        assert (
            sampled[0]["choices"] == sampled[1]["choices"]
            and sampled[0]["choices"][0]["finish_reason"] == "length"
        )
        for body, code, says in (
            (b'{"model": ', 400, "not JSON"),
            ({"model": "gpt-4", "messages": chat}, 404, "'gpt-4'"),
            ({"model": "teacher", "messages": chat[:3]}, 400, "end with a user message"),
            ({"model": "teacher", "messages": chat, "max_tokens": 600}, 400, "context of 512"),
            ({"model": "teacher", "messages": chat, "temperature": "hot"}, 400, "'temperature'"),
        ):
            status, reply = post(port, body)
            assert status == code and says in reply["error"]["message"], reply
        # Stage 1 on 16 training questions and 4 test questions, question and answer only
        write_jsonl(tmp_path / "mine.jsonl", PROBLEMS, test_from=16)
        run = str(tmp_path / "run")
        inv = subprocess.run(
            [
                sys.executable,
                "invert.py",
                f"--input_jsonl={tmp_path / 'mine.jsonl'}",
                f"--out_dir={run}",
                f"--teacher=http://127.0.0.1:{port}/v1",
                "--teacher_model=teacher",
                f"--rules={','.join(rules)}",
                "--teacher_max_new_tokens=48",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert inv.returncode == 0, inv.stderr[-3000:]
    finally:
        server.kill()
        server.wait()
    train = tasks.load_records(os.path.join(run, "data", "train.jsonl"))
    test = tasks.load_records(os.path.join(run, "data", "test_id.jsonl"))
    assert [r["question"] for r in train] == [q for q, _, _ in PROBLEMS[:16]]  # it knows them all
    assert [r["rationale"] for r in train] == [r for _, r, _ in PROBLEMS[:16]]
    assert [r["rationale"] for r in test] == [f"The answer is {a}." for _, _, a in PROBLEMS[16:]]
    stats = json.loads(open(os.path.join(run, "data", "stats.json")).read())["train_filters"][
        "user"
    ]
    assert stats["rationale_tries"] == {"1": 16}
    # a 2-layer model is no writer of EI probes: what it wrote is counted, and nothing unparsed is
    # kept
    assert sum(stats["probes_unusable"].values()) + sum(
        stats["removed_probe_wrong"].values()
    ) + sum(stats["removed_inconsistent"].values()) + sum(
        stats["probes_kept"].values()
    ) == 16 * len(rules)
    assert re.search(
        r"teacher teacher at http://127.0.0.1:\d+/v1: \d+ requests sent, 0 answered from the cache",
        inv.stdout,
    ), inv.stdout
    assert not [name for name, data in files(run).items() if KEY.encode() in data]
    nano = [
        "--n_layer=1",
        "--n_head=2",
        "--n_embd=16",
        "--block_size=256",
        "--threads=1",
        "--device=cpu",
        "--batch_size=4",
        "--eval_problems=4",
        "--max_new_tokens=16",
        "--eval_interval=1000",
        "--seed=1",
    ]
    for args in (
        ["distill_rl.py", f"--out_dir={run}", "--stage=sft", "--data=qa", "--max_iters=4", *nano],
        ["evaluate.py", f"--out_dir={run}", "--max_new_tokens=16", "--device=cpu", "--threads=1"],
    ):
        done = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(open(os.path.join(run, "report", "results.json")).read())
    assert "sft_qa" in json.dumps(results) and os.path.isfile(
        os.path.join(run, "report", "report.md")
    )
