"""
Serve a checkpoint of ours, or GPT-2 weights, on the OpenAI chat-completions API, so any OpenAI
client can chat with a distilled student, and invert.py can use one as its teacher.

    python scripts/serve.py --init=out/default/ckpt/sft_ei.pt          # http://127.0.0.1:8000/v1
    python scripts/serve.py --init=gpt2 --port=0                         # any free port (printed)

POST /v1/chat/completions takes model, messages (content a string or a list of text parts),
temperature (default 1; 0 is greedy), max_completion_tokens or its old name max_tokens (default:
the rest of the context), seed, n, stop (a string or up to 4), stream and
stream_options.include_usage; GET /v1/models lists the one model. The chat template is the
students' own prompt format (tasks.py): system and developer messages are dropped (no student was
trained with one), then every user message becomes "Q: <content>\\nA:" and every assistant
message " <content><|endoftext|>", so the messages must alternate user, assistant, ..., user. A
choice ends at the end-of-text token or a stop string (finish_reason stop) or at its token limit
(length).

One thread decodes; the requests that arrive while it decodes a batch wait, then decode together
as the rows of the next one (n rows per request), each row with its own temperature, seed, limit
and stop strings. Each seeded request draws from its own generator, so it writes the same text
alone or batched. A client that hangs up frees its rows at the next step. A bad request gets
HTTP 400 with an OpenAI error body that names the parameter at fault.
"""

import http.server
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the repository root is on the path only now, hence noqa: E402
from configurator import UserError, cli, parse_config, pick_device, set_threads  # noqa: E402
from model import KVCache, load_model, sample_next  # noqa: E402
from tasks import dialogue_ids  # noqa: E402


@dataclass
class Config:
    # a checkpoint .pt of ours, a GPT-2 name, an HF folder or a .safetensors file
    init: str = "gpt2"
    name: str = ""  # the model name clients ask for; default the file name without .pt
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    device: str = "auto"
    threads: int = 0  # torch threads; 0 = torch's default
    batch_rows: int = (
        32  # most rows decoded at once (a request is n rows); the rest wait their turn
    )


LIMITS = dict(port="[0, 65535]", threads="[0, inf)", batch_rows="[1, inf)")
MAX_STOPS = 4  # as OpenAI's API
MAX_BODY = 16 * 2**20  # bytes of a request body; a chat that long is far past any context here
POLL_S = 0.25  # how often a waiting handler looks whether its client is still there
# a batch starts once no request has come for QUIET_S, at most GATHER_S after its first one:
# clients that send together decode together (the later ones would otherwise wait for the whole
# batch that started without them), for QUIET_S more latency to a request that comes alone
QUIET_S, GATHER_S = 0.01, 0.05


class BadRequest(Exception):
    """A request we cannot answer: HTTP status, message, the parameter at fault and OpenAI's error
    code."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# ---- the request: every parameter checked before it waits for the model ----


def message_text(message, k):
    """A message's content: a string, or a list of text parts joined by newlines (as vLLM joins
    them). Image, audio and file parts are refused by name: the model reads text only."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        other = sorted({json.dumps(p.get("type")) for p in content} - {'"text"'})
        if other:
            raise BadRequest(
                400,
                f"messages[{k}].content has parts of type {', '.join(other)}: this model reads "
                f'text parts ({{"type": "text", "text": ...}}) only',
                "messages",
            )
        if all(isinstance(p.get("text"), str) for p in content):
            return "\n".join(p["text"] for p in content)
    raise BadRequest(
        400,
        f"messages[{k}].content must be a string or a non-empty list of text parts "
        f'({{"type": "text", "text": ...}})',
        "messages",
    )


def chat_turns(messages):
    """OpenAI messages -> (turns [(question, response)], question) of the prompt format."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest(
            400, "'messages' must be a non-empty list of {role, content} objects", "messages"
        )
    said = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in (
            "system",
            "developer",
            "user",
            "assistant",
        ):
            raise BadRequest(
                400,
                f"messages[{k}] must be an object with role system, developer, user or assistant",
                "messages",
            )
        text = message_text(m, k)
        if m["role"] in ("user", "assistant"):
            said.append((m["role"], text))
    roles = [role for role, _ in said]
    if not said or roles != ["user", "assistant"] * (len(said) // 2) + ["user"]:
        raise BadRequest(
            400,
            "after the system messages, messages must alternate user, assistant, ... and end "
            "with a user message",
            "messages",
        )
    texts = [text for _, text in said]
    return list(zip(texts[:-1:2], texts[1::2])), texts[-1]


def number(body, key, default, lo, hi=None, integer=False):
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < lo or (hi and value > hi):
        what = "an integer" if integer else "a number"
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise BadRequest(400, f"'{key}' must be {what} {bounds}, got {json.dumps(value)}", key)
    return value


def flag(body, key, param):
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(400, f"'{key}' must be true or false, got {json.dumps(value)}", param)
    return value


def stop_strings(stop):
    """'stop' -> a list of up to MAX_STOPS non-empty strings (a string alone is a list of one)."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise BadRequest(
            400,
            f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them, got "
            f"{json.dumps(stop)[:200]}",
            "stop",
        )
    return stops


@dataclass
class Request:
    """A checked chat completion request: what the decoding thread needs of it."""

    prompt: list  # token ids of the chat in the prompt format
    n: int  # choices, decoded as n rows
    temperature: float
    seed: int | None
    limit: int  # tokens per choice
    stop: list  # strings that end a choice, matched on its decoded text
    stream: bool
    include_usage: bool


# ---- what the decoding thread tells a request's handler ----


@dataclass
class Piece:
    """More of choice `index`'s content, for a stream."""

    index: int
    text: str


@dataclass
class Finished:
    """Choice `index` is done: its whole content, why it ended, the tokens it took."""

    index: int
    content: str
    reason: str
    tokens: int


@dataclass
class Failed:
    """Decoding the batch raised: a bug of ours, answered as HTTP 500 (the traceback is logged)."""

    message: str


class Job:
    """A request from when it is checked until its handler has answered (or its client hung up)."""

    def __init__(self, number, request):
        self.id, self.request = f"chatcmpl-{number}", request
        self.events = queue.SimpleQueue()  # Piece / Finished / Failed, from the decoding thread
        self.hung_up = threading.Event()  # set by the handler: the decoding thread frees the rows


def releasable(text, stops):
    """The part of a row's text a stream may send before the row ends. Held back: a trailing
    replacement character (the first bytes of a character whose next token has not come), a tail
    that could begin a stop string (the stop string is never sent), and surrounding whitespace
    (the content is stripped: the prompt format puts a space before every response)."""
    end = len(text.rstrip("\ufffd"))
    for k in range(min(max(map(len, stops), default=1) - 1, end), 0, -1):
        if any(len(s) > k and s.startswith(text[end - k : end]) for s in stops):
            end -= k
            break
    return text[:end].strip()


class Row:
    """One choice being decoded: its tokens as text, and how much of that its stream has sent."""

    def __init__(self, job, index, tok):
        self.job, self.index, self.tok, self.request = job, index, tok, job.request
        self.tokens = 0  # generated so far, the one that stopped the row included
        # the text of the tokens whose bytes end on a character boundary, and the ids after them:
        # only those are decoded again at each step
        self.settled, self.unsettled = "", []
        self.sent = 0  # characters of the content its stream has sent
        self.reason = None  # the finish_reason once it is done ("hung up": freed, nobody reads it)

    def text(self):
        tail = self.tok.decode(self.unsettled)
        if not tail.endswith("\ufffd"):
            self.settled, self.unsettled, tail = self.settled + tail, [], ""
        return self.settled + tail

    def take(self, token):
        """The row's next token -> the events for its handler; ends the row at the end-of-text
        token, at a stop string or at its limit."""
        self.tokens += 1
        if token != self.tok.eot:
            self.unsettled.append(token)
        text, stops = self.text(), self.request.stop
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
        if token == self.tok.eot or cut is not None:
            self.reason = "stop"
        elif self.tokens == self.request.limit:
            self.reason = "length"
        content = text[:cut].strip() if self.reason else releasable(text, stops)
        events = []
        if self.request.stream and len(content) > self.sent:
            events.append(Piece(self.index, content[self.sent :]))
            self.sent = len(content)
        if self.reason:
            events.append(Finished(self.index, content, self.reason, self.tokens))
        return events


# ---- the model and its decoding thread ----


class Server:
    """The model, the requests waiting for it, and the one thread that decodes them in batches."""

    def __init__(self, cfg):
        self.model, self.tok, _ = load_model(cfg.init, cfg.device)
        self.model.eval()
        self.name = cfg.name or os.path.basename(cfg.init.rstrip("/")).removesuffix(".pt")
        self.batch_rows = cfg.batch_rows
        self.waiting = queue.SimpleQueue()
        # counts of the requests, batches, rows, tokens decoded and clients that hung up
        self.stats, self.lock = Counter(), threading.Lock()
        self.decoder = threading.Thread(target=self.decode_forever, daemon=True)
        self.decoder.start()

    def check(self, body):
        """A request body -> Request, or BadRequest naming what is wrong."""
        if not isinstance(body, dict):
            raise BadRequest(400, "the request body must be a JSON object")
        if body.get("model") != self.name:
            raise BadRequest(
                404,
                f"the model {body.get('model')!r} does not exist here; this server serves "
                f"{self.name!r}",
                "model",
                "model_not_found",
            )
        turns, question = chat_turns(body.get("messages"))
        temperature = number(body, "temperature", 1.0, 0)
        seed = number(body, "seed", None, 0, 2**63 - 1, integer=True)
        n = number(body, "n", 1, 1, integer=True)
        if n > self.batch_rows:
            raise BadRequest(
                400,
                f"'n' may be at most {self.batch_rows} here (the server's --batch_rows), got {n}",
                "n",
            )
        stream = flag(body, "stream", "stream")
        options = body.get("stream_options")
        if options is not None and not (stream and isinstance(options, dict)):
            raise BadRequest(
                400,
                "'stream_options' must be an object, and is allowed only with 'stream': true",
                "stream_options",
            )
        include_usage = flag(options or {}, "include_usage", "stream_options")
        stop = stop_strings(body.get("stop"))
        try:
            prompt = dialogue_ids(self.tok, turns, question)
        except UserError as e:  # a compact vocabulary meets a token it does not have
            raise BadRequest(400, str(e), "messages") from None
        # max_tokens is the deprecated name of max_completion_tokens; given both, they must agree
        room = self.model.config.block_size - len(prompt)
        limit = number(body, "max_completion_tokens", None, 1, integer=True)
        old = number(body, "max_tokens", None, 1, integer=True)
        if limit is not None and old is not None and old != limit:
            raise BadRequest(
                400,
                f"'max_tokens' is the old name of 'max_completion_tokens': give one, not "
                f"{old} and {limit}",
                "max_tokens",
            )
        name = "max_tokens" if limit is None and old is not None else "max_completion_tokens"
        limit = limit or old or room
        if limit > room or room < 1:
            raise BadRequest(
                400,
                f"this model has a context of {self.model.config.block_size} tokens: the prompt "
                f"takes {len(prompt)} and {name} asks for {limit}",
                name,
                "context_length_exceeded",
            )
        return Request(prompt, n, temperature, seed, limit, stop, stream, include_usage)

    def submit(self, request):
        with self.lock:
            self.stats["requests"] += 1
            job = Job(self.stats["requests"], request)
        self.waiting.put(job)
        return job

    def close(self):
        self.waiting.put(None)  # the decoding thread ends when it reaches it

    def decode_forever(self):
        later = []  # jobs that did not fit in the last batch: first in the next one
        while True:
            jobs = later or [self.waiting.get()]
            deadline = time.monotonic() + GATHER_S
            while time.monotonic() < deadline:
                try:
                    jobs.append(self.waiting.get(timeout=QUIET_S))
                except queue.Empty:
                    break
            if None in jobs:
                return
            batch, later, rows = [], [], 0
            for job in jobs:
                if later or rows + job.request.n > self.batch_rows:
                    later.append(job)
                elif not job.hung_up.is_set():
                    batch.append(job)
                    rows += job.request.n
            if not batch:
                continue
            try:
                self.decode(batch)
            except Exception as e:  # a bug of ours: its clients get a 500, the others are served
                traceback.print_exc()
                for job in batch:
                    job.events.put(Failed(f"{type(e).__name__}: {e}"))

    @torch.inference_mode()
    def decode(self, jobs):
        """Decode a batch of requests, one row per choice, until every row has ended: the loop of
        GPT.generate with a temperature, a random generator, a token limit and stop strings per
        row, the text decoded as it grows."""
        model, tok = self.model, self.tok
        rows = [Row(job, i, tok) for job in jobs for i in range(job.request.n)]
        device = model.lm_head.weight.device
        B, steps = len(rows), max(job.request.limit for job in jobs)
        lengths = [len(row.request.prompt) for row in rows]
        longest = max(lengths)
        idx = torch.full((B, longest), tok.eot, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            idx[i, longest - lengths[i] :] = torch.tensor(row.request.prompt, dtype=torch.long)
        starts = longest - torch.tensor(lengths, device=device)
        real = torch.arange(longest, device=device)[None, :] >= starts[:, None]  # left padding
        cache = KVCache(model.config, B, longest + steps, device, model.lm_head.weight.dtype)
        hidden, _ = model(idx, attn_mask=real, kv_cache=cache, head=False)
        h = hidden[:, -1]  # (B, C): the head runs on the last position only
        # a request's own generator draws its n uniforms per step, as GPT.generate draws a call's:
        # its text then depends on its seed alone, not on the requests batched with it
        gens = {}
        for job in jobs:
            if job.request.temperature > 0:
                gens[job] = gen = torch.Generator(device=device)
                if job.request.seed is None:
                    gen.seed()  # a fresh seed from the operating system
                else:
                    gen.manual_seed(job.request.seed)
        with self.lock:
            self.stats.update(batches=1, rows=B)
        for _ in range(steps):
            for row in rows:  # a hung-up client's rows stop here: no head, no draw, no decode
                if row.reason is None and row.job.hung_up.is_set():
                    row.reason = "hung up"
            was_done = torch.tensor([row.reason is not None for row in rows], device=device)
            live = (~was_done).nonzero().squeeze(1)
            if len(live) == 0:
                break
            draws = []
            for job in jobs:
                busy = any(r.reason is None for r in rows if r.job is job)
                gen = gens.get(job) if busy else None
                draws.append(
                    torch.zeros(job.request.n, 1, device=device)
                    if gen is None
                    else torch.rand(job.request.n, 1, generator=gen, device=device)
                )
            u = torch.cat(draws)[live]
            # fp32 logits, as GPT.generate has: the policy that samples is the one scored
            with torch.autocast(device.type, enabled=False):
                logits = model.lm_head(h[live])
            nxt = torch.full((B,), tok.eot, dtype=torch.long, device=device)
            # GPT.generate's sampler, called once per temperature on the rows that share it
            alike = {}
            for k, i in enumerate(live.tolist()):
                alike.setdefault(rows[i].request.temperature, []).append(k)
            for t, ks in alike.items():
                same = torch.tensor(ks, device=device)
                nxt[live[same]] = sample_next(logits[same], t, None, u[same] if t else None)
            for i, token in zip(live.tolist(), nxt[live].tolist()):
                for event in rows[i].take(token):
                    rows[i].job.events.put(event)
            with self.lock:
                self.stats["tokens"] += len(live)
            if all(row.reason is not None for row in rows):
                break
            # the token that ended a row goes in like any other; filler after it does not
            h = model.decode(nxt, ~was_done, cache)
        with self.lock:
            self.stats["hung_up"] += len({r.job for r in rows if r.reason == "hung up"})


# ---- HTTP ----


def completion(job, name, finished):
    """The chat.completion body of a finished job: finished[i] is choice i's Finished."""
    tokens = sum(f.tokens for f in finished)
    return {
        "id": job.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [
            {
                "index": f.index,
                "message": {"role": "assistant", "content": f.content},
                "finish_reason": f.reason,
            }
            for f in finished
        ],
        "usage": usage(job, tokens),
    }


def usage(job, completion_tokens):
    prompt = len(job.request.prompt)  # counted once, however many choices share it
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def error_body(message, kind="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Handler(http.server.BaseHTTPRequestHandler):
    # seconds a client may take to send its request: a stalled one does not pin a thread
    timeout = 60

    def do_GET(self):
        if self.path.rstrip("/") != "/v1/models":
            return self.error(
                BadRequest(404, f"no route GET {self.path}; try GET /v1/models", None, "not_found")
            )
        model = {"id": self.server.app.name, "object": "model", "created": 0, "owned_by": "exgrpo"}
        self.reply(200, {"object": "list", "data": [model]})

    def do_POST(self):
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self.error(
                BadRequest(
                    404,
                    f"no route POST {self.path}; try POST /v1/chat/completions",
                    None,
                    "not_found",
                )
            )
        app = self.server.app
        try:
            job = app.submit(app.check(self.read_json()))
        except BadRequest as e:
            return self.error(e)
        if job.request.stream:
            self.stream(job)
        else:
            self.answer(job)

    def read_json(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.unread()
            raise BadRequest(411, "send the request body with a Content-Length header, not chunked")
        try:
            size = int(length or 0)
            if size < 0:
                raise ValueError
        except ValueError:
            self.unread()
            raise BadRequest(
                400,
                f"the Content-Length header must be a whole number of bytes, got {length!r}",
            ) from None
        if size > MAX_BODY:
            self.unread()
            raise BadRequest(413, f"the request body is {size} bytes; at most {MAX_BODY} here")
        try:
            raw = self.rfile.read(size)
        except OSError:  # it stalled (timed out) or went away
            self.close_connection = True
            raise BadRequest(
                408, f"the request body did not come within {self.timeout} s"
            ) from None
        if len(raw) < size:
            raise BadRequest(400, f"the request body ended at {len(raw)} of its {size} bytes")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise BadRequest(400, f"the request body is not JSON ({e})") from None

    def unread(self):
        """The body cannot be read (no usable length): answer, then close the connection. Closing a
        socket with unread bytes resets it, and the client could lose the answer, so what has come
        is read first."""
        self.close_connection = True
        self.connection.settimeout(0.1)
        try:
            while self.connection.recv(65536):
                pass
        except OSError:  # nothing more for now (timed out), or the client has gone
            pass
        finally:
            self.connection.settimeout(self.timeout)

    def gone(self):
        """Whether the client has closed its end: its socket reads as end-of-file."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def next_event(self, job):
        """The next event of the job, or None once its client has hung up (its rows are freed)."""
        while True:
            try:
                event = job.events.get(timeout=POLL_S)
            except queue.Empty:
                event = None
            if self.gone():
                return self.hang_up(job)
            if event is not None:
                return event

    def hang_up(self, job):
        job.hung_up.set()
        self.close_connection = True
        self.log_message("client hung up: %s's rows are freed", job.id)

    def answer(self, job):
        finished = {}
        while len(finished) < job.request.n:
            event = self.next_event(job)
            if event is None:
                return
            if isinstance(event, Failed):
                return self.failed(event)
            if isinstance(event, Finished):
                finished[event.index] = event
        body = completion(job, self.server.app.name, [finished[i] for i in sorted(finished)])
        self.reply(200, body)

    def failed(self, event):
        message = f"the server failed while decoding ({event.message}); its log has the traceback"
        self.reply(500, error_body(message, "server_error"))

    def stream(self, job):
        """Server-sent events of chat.completion.chunk objects: each choice's role, its content as
        it is decoded, its finish_reason, then the usage when asked for, then [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True  # the stream ends when the connection does (HTTP/1.0)
        request, created = job.request, int(time.time())

        def chunk(choices, **more):
            head = {
                "id": job.id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.server.app.name,
            }
            extra = {"usage": None} if request.include_usage else {}
            self.send_event({**head, "choices": choices, **extra, **more})

        try:
            for i in range(request.n):
                chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                    ]
                )
            done, tokens = 0, 0
            while done < request.n:
                event = self.next_event(job)
                if event is None:
                    return
                if isinstance(event, Failed):
                    return self.send_event(error_body(event.message, "server_error"))
                if isinstance(event, Piece):
                    delta = {"content": event.text}
                    chunk([{"index": event.index, "delta": delta, "finish_reason": None}])
                else:
                    chunk([{"index": event.index, "delta": {}, "finish_reason": event.reason}])
                    done, tokens = done + 1, tokens + event.tokens
            if request.include_usage:
                chunk([], usage=usage(job, tokens))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # the client hung up between two events (a broken pipe, a reset)
            self.hang_up(job)

    def send_event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def error(self, e):
        self.reply(e.status, error_body(e.message, param=e.param, code=e.code))

    def reply(self, status, obj):
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client did not wait for its answer
            self.close_connection = True

    # one line per request on stderr, as http.server does, without the date
    def log_message(self, fmt, *args):
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")


def make_server(cfg):
    """The HTTP server of cfg, listening, with the model behind it (httpd.app); serve_forever()
    answers. cfg.device must be picked already (pick_device)."""
    app = Server(cfg)
    try:
        httpd = http.server.ThreadingHTTPServer((cfg.host, cfg.port), Handler)
    except OSError as e:
        app.close()
        raise SystemExit(
            f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}): choose another --port, or 0 "
            f"for any free one"
        ) from None
    httpd.daemon_threads = True  # a stalled client does not hold up shutting down
    httpd.app = app
    return httpd


def main(argv):
    cfg = parse_config(Config(), argv, LIMITS)
    cfg.device = pick_device(cfg.device)
    set_threads(cfg.threads)
    httpd = make_server(cfg)
    print(
        f"serving {cfg.init} as model {httpd.app.name!r} on "
        f"http://{cfg.host}:{httpd.server_port}/v1",
        flush=True,
    )
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        httpd.app.close()


if __name__ == "__main__":
    cli(main)
