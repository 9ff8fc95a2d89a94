"""
Serve a checkpoint of ours, or GPT-2 weights, on the OpenAI chat-completions API, so any OpenAI
client can chat with a distilled student, and invert.py can use one as its teacher.

    python scripts/serve.py --init=out/default/ckpt/sft_ei.pt          # http://127.0.0.1:8000/v1
    python scripts/serve.py --init=gpt2 --port=0                         # any free port (printed)

POST /v1/chat/completions takes model, messages, temperature (default 1; 0 is greedy), max_tokens
(default: the rest of the context) and seed; GET /v1/models lists the one model. The chat template
is the students' own prompt format (tasks.py): system messages are dropped (no student was trained
with one), then every user message becomes "Q: <content>\\nA:" and every assistant message
" <content><|endoftext|>", so the messages must alternate user, assistant, ..., user. The model
writes until its end-of-text token or max_tokens (finish_reason stop or length). One request is
answered at a time (the model is not shared between threads); a bad request gets HTTP 400 with an
OpenAI-style error body.
"""

import http.server
import json
import os
import sys
import threading
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the repository root is on the path only now, hence noqa: E402
from configurator import UserError, cli, parse_config, pick_device, set_threads  # noqa: E402
from model import load_model  # noqa: E402
from tasks import dialogue_ids  # noqa: E402
from tokenizer import decode_generated  # noqa: E402


@dataclass
class Config:
    init: str = (
        "gpt2"  # a checkpoint .pt of ours, a GPT-2 name, an HF folder or a .safetensors file
    )
    name: str = ""  # the model name clients ask for; default the file name without .pt
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    device: str = "auto"
    threads: int = 0  # torch threads; 0 = torch's default


LIMITS = dict(port="[0, 65535]", threads="[0, inf)")


class BadRequest(Exception):
    """A request we cannot answer: HTTP status, message, the parameter at fault, OpenAI's error code."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def chat_turns(messages):
    """OpenAI messages -> (turns [(question, response)], question) of the prompt format."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest(
            400, "'messages' must be a non-empty list of {role, content} objects", "messages"
        )
    said = []
    for k, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("system", "user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise BadRequest(
                400,
                f"messages[{k}] must be an object with role system, user or assistant and "
                f"string content",
                "messages",
            )
        if m["role"] != "system":
            said.append(m)
    roles = [m["role"] for m in said]
    if not said or roles != ["user", "assistant"] * (len(said) // 2) + ["user"]:
        raise BadRequest(
            400,
            "after the system messages, messages must alternate user, assistant, ... and end "
            "with a user message",
            "messages",
        )
    return [(said[i]["content"], said[i + 1]["content"]) for i in range(0, len(said) - 1, 2)], said[
        -1
    ]["content"]


def number(body, key, default, lo, integer=False):
    value = body.get(key, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int if integer else (int, float))
        or value < lo
    ):
        kind = "an integer" if integer else "a number"
        raise BadRequest(400, f"'{key}' must be {kind} >= {lo}, got {json.dumps(value)}", key)
    return value


class Server:
    """The model and the one lock around it."""

    def __init__(self, cfg):
        self.model, self.tok, _ = load_model(cfg.init, cfg.device)
        self.name = cfg.name or os.path.basename(cfg.init.rstrip("/")).removesuffix(".pt")
        self.lock, self.served = threading.Lock(), 0

    def complete(self, body):
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
        for key, ok in (("n", 1), ("stream", False)):
            if body.get(key, ok) not in (ok, None):
                raise BadRequest(400, f"'{key}' must be {json.dumps(ok)} (not supported here)", key)
        if body.get("stop"):
            raise BadRequest(
                400,
                "'stop' is not supported here: the model stops at its end-of-text token",
                "stop",
            )
        turns, question = chat_turns(body.get("messages"))
        temperature = number(body, "temperature", 1.0, 0)
        seed = number(body, "seed", None, 0, integer=True)
        try:
            prompt = dialogue_ids(self.tok, turns, question)
        except UserError as e:  # a compact vocabulary meets a token it does not have
            raise BadRequest(400, str(e), "messages") from None
        room = self.model.config.block_size - len(prompt)
        max_tokens = number(body, "max_tokens", room, 1, integer=True)
        if max_tokens > room or room < 1:
            raise BadRequest(
                400,
                f"this model has a context of {self.model.config.block_size} tokens: the prompt "
                f"takes {len(prompt)} and max_tokens asks for {max_tokens}",
                "max_tokens",
                "context_length_exceeded",
            )
        with self.lock:
            tokens, mask = self.model.generate(
                [prompt], max_tokens, temperature=temperature, seed=seed, eot=self.tok.eot
            )
            self.served += 1
            n = self.served
        written = tokens[0][mask[0]].tolist()
        return {
            "id": f"chatcmpl-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": decode_generated(self.tok, tokens, mask)[0].strip(),
                    },
                    "finish_reason": "stop"
                    if written and written[-1] == self.tok.eot
                    else "length",
                }
            ],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": len(written),
                "total_tokens": len(prompt) + len(written),
            },
        }


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.rstrip("/") != "/v1/models":
            return self.error(
                BadRequest(404, f"no route GET {self.path}; try GET /v1/models", None, "not_found")
            )
        self.reply(
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": self.server.app.name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "exgrpo",
                    }
                ],
            },
        )

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
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError as e:
            return self.error(BadRequest(400, f"the request body is not JSON ({e})"))
        try:
            self.reply(200, self.server.app.complete(body))
        except BadRequest as e:
            self.error(e)

    def error(self, e):
        self.reply(
            e.status,
            {
                "error": {
                    "message": e.message,
                    "type": "invalid_request_error",
                    "param": e.param,
                    "code": e.code,
                }
            },
        )

    def reply(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(
        self, fmt, *args
    ):  # one line per request on stderr, as http.server does, without the date
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")


def main(argv):
    cfg = parse_config(Config(), argv, LIMITS)
    cfg.device = pick_device(cfg.device)
    set_threads(cfg.threads)
    app = Server(cfg)
    try:
        httpd = http.server.ThreadingHTTPServer((cfg.host, cfg.port), Handler)
    except OSError as e:
        raise SystemExit(
            f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}): choose another --port, or 0 "
            f"for any free one"
        ) from None
    httpd.app = app
    print(
        f"serving {cfg.init} as model {app.name!r} on http://{cfg.host}:{httpd.server_port}/v1",
        flush=True,
    )
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


if __name__ == "__main__":
    cli(main)
