"""scripts/serve.py through the official openai client (a test-only dependency), served in this
process on 127.0.0.1 from a randomly initialised 2-layer model with GPT-2's vocabulary: it almost
never writes its end-of-text token (1 in 50257 a step), so a choice runs to its limit or its stop
string, and it writes long enough for a client to hang up in the middle."""

import importlib.util
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from model import GPT, GPTConfig, save_checkpoint
from tasks import dialogue_ids
from tokenizer import decode_generated, get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("serve", os.path.join(ROOT, "scripts", "serve.py"))
serve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve)

QUESTION = "Ann has 7 pens. Ann gets 3 more and gives away 4. How many pens does Ann have now?"
ASK = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("serve") / "random.pt")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=1024))
    save_checkpoint(path, model, get_tokenizer())
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    cfg = serve.Config(init=checkpoint, port=0, device="cpu", batch_rows=16)
    httpd = serve.make_server(cfg)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    httpd.app.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.server_port}/v1",
        api_key="unused",
        max_retries=0,
        timeout=60,
    )


def create(client, **kw):
    return client.chat.completions.create(model="random", **{"messages": ASK, **kw})


def text_of(stream):
    """A stream's chunks -> (content per choice, finish_reason per choice, usage, the chunks)."""
    chunks = list(stream)
    contents, reasons = {}, {}
    for c in chunks:
        for choice in c.choices:
            contents[choice.index] = contents.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return contents, reasons, chunks[-1].usage, chunks


def test_list_create_seed_usage_and_the_token_limit(server, client):
    assert [m.id for m in client.models.list().data] == ["random"]
    tok, model = server.app.tok, server.app.model
    prompt = dialogue_ids(tok, [], QUESTION)
    reply = create(client, seed=3, max_completion_tokens=12)
    # the decoding loop is GPT.generate's: a seeded request writes what generate writes
    tokens, mask = model.generate([prompt], 12, seed=3, eot=tok.eot)
    assert reply.choices[0].message.content == decode_generated(tok, tokens, mask)[0].strip()
    assert (
        reply.choices[0].finish_reason == "length" and reply.choices[0].message.role == "assistant"
    )
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), 12)
    assert reply.usage.total_tokens == len(prompt) + 12
    assert create(client, seed=3, max_completion_tokens=12).choices == reply.choices
    assert create(client, seed=4, max_completion_tokens=12).choices != reply.choices
    # max_tokens is the old name of the limit; greedy is temperature 0
    old = create(client, max_tokens=5, temperature=0)
    assert old.usage.completion_tokens == 5 and old.choices[0].finish_reason == "length"
    tokens, mask = model.generate([prompt], 5, temperature=0, eot=tok.eot)
    assert old.choices[0].message.content == decode_generated(tok, tokens, mask)[0].strip()


def test_content_as_a_list_of_text_parts(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    as_parts = create(client, messages=parts, seed=5, max_completion_tokens=6)
    assert as_parts.choices == create(client, seed=5, max_completion_tokens=6).choices
    # a system message in parts is dropped like any other
    system = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *parts]
    assert (
        create(client, messages=system, seed=5, max_completion_tokens=6).choices == as_parts.choices
    )


@pytest.mark.parametrize(
    "kw,param,says",
    [
        (dict(temperature="hot"), "temperature", "'temperature' must be a number >= 0"),
        (dict(n=0), "n", "'n' must be an integer >= 1"),
        (dict(n=17), "n", "'n' may be at most 16"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop", "a list of up to 4"),
        (dict(stop=""), "stop", "'stop' must be a non-empty string"),
        (dict(max_completion_tokens=0), "max_completion_tokens", "an integer >= 1"),
        (dict(max_completion_tokens=5000), "max_completion_tokens", "a context of 1024 tokens"),
        (dict(max_tokens=5000), "max_tokens", "and max_tokens asks for 5000"),
        (dict(max_tokens=4, max_completion_tokens=5), "max_tokens", "give one, not 4 and 5"),
        (dict(stream="yes"), "stream", "'stream' must be true or false"),
        (dict(stream_options={"include_usage": True}), "stream_options", "only with 'stream'"),
        (dict(seed=-1), "seed", "'seed' must be an integer in [0, "),
        (
            dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages",
            'parts of type "image_url": this model reads text parts',
        ),
        (dict(messages=[{"role": "user", "content": []}]), "messages", "a non-empty list of text"),
        (dict(messages=[{"role": "assistant", "content": "Hi"}]), "messages", "end with a user"),
    ],
)
def test_a_bad_parameter_is_a_400_that_names_it(client, kw, param, says):
    with pytest.raises(openai.BadRequestError) as e:
        create(client, **kw)
    assert e.value.status_code == 400 and e.value.param == param and says in e.value.message


def test_an_unknown_model_and_a_bad_header_are_answered_not_dropped(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert e.value.code == "model_not_found" and "serves 'random'" in e.value.message
    for headers, status, says in (
        ("Content-Length: twelve\r\n", 400, "Content-Length header must be a whole number"),
        ("Content-Length: -5\r\n", 400, "got '-5'"),
        ("Transfer-Encoding: chunked\r\n", 411, "not chunked"),
        ("Content-Length: 11\r\n", 400, "is not JSON"),
        ("Content-Length: 100\r\n", 400, "the request body ended at 11 of its 100 bytes"),
    ):
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
            s.sendall(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
                + b"{not json!}"
            )
            if "100" in headers:  # the client sends no more: its body is short
                s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.split()[1] == str(status).encode(), got
        error = json.loads(body)["error"]
        assert says in error["message"] and error["type"] == "invalid_request_error"


def test_streaming_with_usage_sends_what_a_plain_request_returns(client):
    plain = create(client, seed=7, max_completion_tokens=30)
    stream = create(
        client,
        seed=7,
        max_completion_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    contents, reasons, usage, chunks = text_of(stream)
    assert contents == {0: plain.choices[0].message.content} and reasons == {0: "length"}
    assert usage == plain.usage and chunks[-1].choices == []  # the usage chunk comes last
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert len(chunks) > 5  # the content came token by token, not at the end
    # without include_usage there is no usage chunk
    _, _, usage, chunks = text_of(create(client, seed=7, max_completion_tokens=30, stream=True))
    assert usage is None and chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_end_a_choice_and_are_not_returned(client):
    whole = create(client, seed=11, max_completion_tokens=40).choices[0].message.content
    # a stretch of the text as a stop string: the first one with no incomplete character in it
    start = next(i for i in range(15, 30) if "\ufffd" not in whole[i : i + 3])
    stop = whole[start : start + 3]
    want = whole[: whole.index(stop)].rstrip()
    for given in (stop, ["never written", stop]):
        reply = create(client, seed=11, max_completion_tokens=40, stop=given)
        assert reply.choices[0].message.content == want and reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens < 40
        contents, reasons, _, _ = text_of(
            create(client, seed=11, max_completion_tokens=40, stop=given, stream=True)
        )
        assert contents == {0: want} and reasons == {0: "stop"}  # nothing past it was streamed
    assert serve.releasable(" the end is n", ["near", "\n\n"]) == "the end is"
    assert serve.releasable(" ab\ufffd", []) == "ab"  # the rest of a character comes next


def test_n_choices_are_rows_of_one_batch(server, client):
    before = server.app.stats["batches"]
    reply = create(client, n=3, seed=2, max_completion_tokens=10)
    assert server.app.stats["batches"] == before + 1
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) == 3  # three draws, not one thrice
    assert reply.usage.completion_tokens == 30
    assert create(client, n=3, seed=2, max_completion_tokens=10).choices == reply.choices
    contents, reasons, _, _ = text_of(
        create(client, n=3, seed=2, max_completion_tokens=10, stream=True)
    )
    assert contents == {c.index: c.message.content for c in reply.choices}
    assert reasons == {0: "length", 1: "length", 2: "length"}


def first_words(stream):
    """Read a stream up to its first content: its batch is decoding (its role chunk comes
    earlier)."""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            return


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_client_that_hangs_up_frees_its_row_and_the_others_are_served(server, client):
    other = dict(seed=13, max_completion_tokens=300, temperature=0.8)
    alone = create(client, **other).choices[0].message.content
    stats = server.app.stats
    hung_up, tokens = stats["hung_up"], stats["tokens"]
    with ThreadPoolExecutor(1) as pool:
        with create(client, seed=1, max_completion_tokens=990, stream=True) as stream:
            first_words(stream)  # then the client goes
            served = pool.submit(lambda: text_of(create(client, stream=True, **other)))
        wait_for(lambda: stats["hung_up"] == hung_up + 1)
        contents, reasons, _, _ = served.result(timeout=60)
    assert contents == {0: alone} and reasons == {0: "length"}
    assert stats["tokens"] - tokens < 990  # the hung-up row stopped long before its limit
    # a plain request whose client gives up is freed the same way
    with pytest.raises(openai.APITimeoutError):
        create(client, seed=1, max_completion_tokens=990, timeout=0.3)
    wait_for(lambda: stats["hung_up"] == hung_up + 2)


def test_concurrent_clients_join_one_batch_and_write_what_they_write_alone(server, client):
    requests = [
        dict(seed=21, max_completion_tokens=20),
        dict(seed=22, max_completion_tokens=35, temperature=0.7),
        dict(seed=23, max_completion_tokens=10, temperature=0),
        dict(seed=24, max_completion_tokens=25, n=2),
        dict(seed=25, max_completion_tokens=30, temperature=1.3, stop=["e", "a"]),
        dict(seed=26, max_completion_tokens=15, stream=True),
        dict(
            seed=27,
            max_completion_tokens=20,
            messages=[*ASK, {"role": "assistant", "content": "Six."}, *ASK],
        ),
    ]

    def answer(kw):
        reply = create(client, **kw)
        if kw.get("stream"):
            contents, reasons, _, _ = text_of(reply)
            return [(contents[0], reasons[0])]
        return [(c.message.content, c.finish_reason) for c in reply.choices]

    stats = server.app.stats
    batches, asked = stats["batches"], stats["requests"] + 1  # the blocker is one more
    with ThreadPoolExecutor(len(requests)) as pool:
        # a long request decodes while the others arrive: they wait, then go as one batch
        with create(client, seed=1, max_completion_tokens=990, stream=True) as blocker:
            first_words(blocker)
            futures = [pool.submit(answer, kw) for kw in requests]
            wait_for(lambda: stats["requests"] == asked + len(requests))
            for _ in blocker:
                pass
        together = [f.result(timeout=60) for f in futures]
    assert stats["batches"] == batches + 2
    assert together == [answer(kw) for kw in requests]  # each seeded request, alone
    assert together[4][0][1] == "stop" and together[2] == [together[2][0]]


def test_a_port_in_use_stops_with_one_sentence(checkpoint, server):
    cfg = serve.Config(init=checkpoint, port=server.server_port, device="cpu")
    with pytest.raises(SystemExit, match=rf"cannot listen on 127.0.0.1:{server.server_port} \("):
        serve.make_server(cfg)
