"""tokenizer.py: the offline GPT-2 tokenizer against tiktoken's own gpt2 encoding, the compact task
vocabulary, and tokenizer state round trips."""

import hashlib
import json
import os
import shutil

import pytest
import torch

import tokenizer as T

GPT2_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Q: Tom has 15 apples. He eats 7.\nA: 15 - 7 = 8. The answer is 8.",
    "Café naïve résumé — Zürich, São Paulo, Ångström, Łódź",
    "日本語のテキスト、中文文本、한국어 텍스트",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "  leading spaces\n\n\ttabs   and   runs    \n   \r\n trailing   ",
    "def f(x):\n    return x**2 + 3  # square\n\nprint(f(4))\n",
    "3.14159 1,000,000 2024-01-31 12345678901234567890 -42 0x1F",
    "I'm sure we'll see they've gone, she'd say. DON'T SHOUT",
    "before<|endoftext|>after <|endoftext|>",
    "\u00a0nbsp, soft\u00adhyphen, controls \x00\x01\x7f, zero\u200bwidth",
    "",
]


@pytest.fixture(scope="module")
def reference_encoding(tmp_path_factory):
    """tiktoken's own gpt2 encoding, offline: its cache pre-seeded with the same two files under
    the names tiktoken looks for (sha1 of the URL)."""
    import tiktoken

    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for name, path in T.gpt2_bpe_files().items():
        shutil.copy(path, cache / hashlib.sha1(GPT2_URLS[name].encode()).hexdigest())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        yield tiktoken.get_encoding("gpt2")
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_tokenizer_matches_tiktoken(reference_encoding, text):
    tok = T.get_tokenizer()
    ids = tok.encode(text)
    assert ids == reference_encoding.encode_ordinary(text)
    assert tok.decode(ids) == text
    assert T.GPT2_EOT not in ids


def test_gpt2_tokenizer_specials():
    tok = T.get_tokenizer()
    assert (tok.eot, tok.n_vocab) == (50256, 50257)
    assert tok.decode([tok.eot]) == "<|endoftext|>"
    # plain text: <| end of text |>
    assert tok.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert tok.encode("Hello world") == [15496, 995]  # the ids every GPT-2 user knows
    assert T.tokenizer_from_state(json.loads(json.dumps(tok.state()))) is tok


def test_compact_tokenizer():
    corpus = [
        "Q: Ann has 3 coins. She flips one.\nA: The answer is yes.",
        "Q: Bob trades a hat.\nA: 12 - 4 = 8.",
    ]
    tok = T.CompactTokenizer.from_texts(corpus)
    gpt2 = T.get_tokenizer()
    used = sorted({t for text in corpus for t in gpt2.encode(text)} | {gpt2.eot})
    assert tok.n_vocab == len(used) and tok.ids == used  # dense ids over exactly the tokens used
    for text in corpus:
        ids = tok.encode(text)
        assert all(0 <= i < tok.n_vocab for i in ids) and tok.decode(ids) == text
        assert [used[i] for i in ids] == gpt2.encode(text)
    assert tok.eot == tok.n_vocab - 1 and tok.decode([tok.eot]) == "<|endoftext|>"
    assert tok.decode(tok.encode(corpus[0]) + [tok.eot]) == corpus[0] + "<|endoftext|>"
    with pytest.raises(
        ValueError,
        match=r"token ' z' \(GPT-2 id 1976\) of 'Q: Ann has a zebra' is not in this "
        r"compact vocabulary; rebuild it from texts that include it",
    ):
        tok.encode("Q: Ann has a zebra")
    back = T.tokenizer_from_state(json.loads(json.dumps(tok.state())))
    assert isinstance(back, T.CompactTokenizer) and back.ids == tok.ids and back.eot == tok.eot
    assert back.encode(corpus[1]) == tok.encode(corpus[1])
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'"):
        T.tokenizer_from_state({"kind": "bpe"})


def test_decode_generated_drops_padding_and_the_stopping_eot():
    tok = T.CompactTokenizer.from_texts(["yes no"])
    yes, no = tok.encode("yes")[0], tok.encode(" no")[0]
    tokens = torch.tensor([[yes, no, tok.eot], [no, tok.eot, tok.eot]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert T.decode_generated(tok, tokens, mask) == ["yes no", " no"]
