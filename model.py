"""
The GPT-2 model: architecture, KV-cache sampling, per-token log-probs, GPT-2 weight import without
transformers (the files are read by gpt2_files.py) and the compact checkpoints every stage writes.

    python model.py --init=gpt2 --prompt="Hello, my name is"          # needs the GPT-2 file
    python model.py --init=out/default/ckpt/sft_ei.pt --prompt="Q: ..."  # one of our checkpoints

Reference: Radford et al. 2019 (GPT-2); the layout and short names follow nanoGPT so weight keys
line up with OpenAI's checkpoint.
"""

import dataclasses
import io
import math
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import UserError, atomic_write, cli, parse_config, pick_device
from gpt2_files import CONV1D_WEIGHTS, read_gpt2
from logprobs import TargetLogprobs
from tokenizer import decode_generated, get_tokenizer, tokenizer_from_state


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
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=512),  # the CPU student
    "nano": dict(n_layer=2, n_head=2, n_embd=32, block_size=128),  # tests
}

# --- the blocks ------------------------------------------------------------------------------


def attention_mask(keys, q_slots):
    """(B, 1, T, Tk) bool mask for queries at slots q_slots (T,) of Tk: a query sees the real keys
    at or before it. keys (B, Tk) marks the real slots. A pad query may see no real key, and SDPA
    returns NaN for an empty row, so every query also sees itself (pad outputs are never used)."""
    k_slot = torch.arange(keys.size(1), device=keys.device)[None, :]
    q_slot = q_slots[:, None]
    return (((k_slot <= q_slot)[None] & keys[:, None, :]) | (k_slot == q_slot)[None])[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x, mask, cache, layer):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        hs = C // self.n_head
        # (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.write(layer, k, v)  # the keys and values of every slot the queries see
        drop = self.dropout if self.training else 0.0
        # mask None: plain causal self-attention (training); else an explicit (B, 1, Tq, Tk) mask,
        # because SDPA's is_causal aligns the triangle top-left when Tq != Tk (a cached step is
        # wrong)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=drop, is_causal=mask is None
        )
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


# --- the model: forward and generate --------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.static_decode = None  # generate's decode step, when compiled: see compile_decode

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.95)):
        """AdamW with weight decay on 2-D weights (matrices, embeddings), none on biases and
        gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=next(self.parameters()).is_cuda)

    def forward(self, idx, targets=None, attn_mask=None, positions=None, kv_cache=None, head=True):
        """idx (B, T) token ids; targets (B, T) already shifted by the caller (logits[:, t] predicts
        targets[:, t]), -1 = ignored. Returns (logits (B, T, V), loss), the loss None without
        targets. The other arguments are those of embed (padding, positions, a KV cache).
        head=False leaves the head to the caller and returns (the final hidden states (B, T, C),
        after ln_f, None): token_logprobs meets the head on the scored positions only, generate on
        the last one. They call forward, not a method of their own, so that DDP and torch.compile
        see every use of the weights."""
        x, mask = self.embed(idx, attn_mask, positions, kv_cache)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, mask, kv_cache, layer)
        # fp32 under bf16 autocast: bf16 rounds GPT-2's logits (tens) to steps of 0.25
        with torch.autocast(idx.device.type, enabled=False):
            x = self.transformer.ln_f(x.float())
            if not head:
                return x, None
            logits = self.lm_head(x)
        if targets is None:
            return logits, None
        flat = logits.view(-1, logits.size(-1))  # fp32 already
        return logits, F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1)

    def residual_stream(self, idx, attn_mask=None, positions=None):
        """What the linear probes read: the residual stream, a list of n_layer + 1 tensors
        (B, T, C), [embeddings, after block 1, ..., after block L] (the last one before ln_f). The
        inputs are forward's; the head never runs."""
        x, mask = self.embed(idx, attn_mask, positions, None)
        stream = [x]
        for layer, block in enumerate(self.transformer.h):
            stream.append(block(stream[-1], mask, None, layer))
        return stream

    def embed(self, idx, attn_mask, positions, kv_cache):
        """The first block's input, token + position embeddings (B, T, C), and the attention mask.
        attn_mask (B, T) bool, True = real token (False = padding). positions (B, T) position ids;
        by default each row counts its own real tokens, so a left-padded row gets exactly the
        positions it would have alone. kv_cache: the forward continues what the cache holds and
        writes its keys and values there (generate's prefill). The mask is None on the fast path
        (training: every token real, no cache), plain causal attention; else (B, 1, T, Tk)."""
        B, T = idx.size()
        mask = None
        if attn_mask is not None or kv_cache is not None:
            real = attn_mask
            if real is None:
                real = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            if positions is None:
                past = 0 if kv_cache is None else kv_cache.n_real[:, None]
                positions = (past + real.long().cumsum(1) - 1).clamp(min=0)
            if kv_cache is None:
                keys, q_slots = real, torch.arange(T, device=idx.device)
            else:
                keys, q_slots = kv_cache.add(real)
            mask = attention_mask(keys, q_slots)
        elif positions is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        if positions.max() >= self.config.block_size:
            raise UserError(
                f"position {int(positions.max())} is past block_size {self.config.block_size}: "
                "shorten the input"
            )
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        return self.transformer.drop(x), mask

    @torch.inference_mode()
    def generate(
        self,
        prompts,
        max_new_tokens,
        num_samples=1,
        temperature=1.0,
        top_k=None,
        stop_ids=None,
        seed=None,
        eot=None,
        kv_cache=None,
    ):
        """Sample num_samples continuations of each prompt (token-id lists, any lengths;
        temperature 0 is greedy). A row stops at eot or when it ends with one of stop_ids; an empty
        prompt generates nothing. With kv_cache (one row per prompt, num_samples 1) the prompts
        continue what the cache holds and the cache keeps prompts and samples: a multi-turn
        dialogue without prefilling it again. Returns (tokens, mask), (len(prompts) * num_samples,
        T_new), prompt-major: new tokens right-padded with eot; mask True on every generated token
        up to the one that stopped the row."""
        device = self.transformer.wte.weight.device
        eot = self.config.vocab_size - 1 if eot is None else eot
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        longest = max(int(lengths.max()), 1)
        past = 0 if kv_cache is None else int(kv_cache.n_real.max())
        if past + longest + max_new_tokens > self.config.block_size:
            raise UserError(
                f"prompt of {past + longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                f"block_size {self.config.block_size}; shorten the prompt or max_new_tokens"
            )
        if kv_cache is not None and (num_samples != 1 or kv_cache.k.size(1) != len(prompts)):
            raise ValueError(
                "continuing a KV cache needs one prompt per cached row and num_samples=1"
            )
        was_training = self.training
        self.eval()
        gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        B, N = len(prompts), len(prompts) * num_samples

        # 1. prefill: the prompts, left-padded, in one forward; the cache is sized for the whole
        # call first, so that no decode step reallocates it; then one copy of it per sample
        idx = torch.full((B, longest), eot, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            idx[i, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
        real = torch.arange(longest, device=device)[None, :] >= (longest - lengths)[:, None]
        dtype = self.transformer.wte.weight.dtype
        cache = kv_cache or KVCache(self.config, B, longest + max_new_tokens, device, dtype)
        cache.reserve(longest + max_new_tokens)
        hidden, _ = self(idx, attn_mask=real, kv_cache=cache, head=False)
        h = hidden[:, -1].repeat_interleave(num_samples, dim=0)  # (N, C): the head meets it below
        if num_samples > 1:
            cache.repeat_interleave(num_samples)

        # 2. decode: draw one token per row, stop the rows that are done, feed the tokens back
        step = self.decode if self.static_decode is None else self.static_decode.start(cache)
        stops = [torch.tensor(s, device=device) for s in (stop_ids or [])]
        out = torch.full((N, max_new_tokens), eot, dtype=torch.long, device=device)
        mask = torch.zeros(N, max_new_tokens, dtype=torch.bool, device=device)
        done = (lengths == 0).repeat_interleave(num_samples)
        for t in range(max_new_tokens):
            # a finished row skips the head and the draw (the head is most of a step at GPT-2's
            # vocabulary); every row's uniform is drawn, so the stream does not depend on who
            # finished
            u = None if temperature == 0 else torch.rand(N, 1, generator=gen, device=device)
            live = (~done).nonzero().squeeze(1)
            nxt = torch.full((N,), eot, dtype=torch.long, device=device)
            # fp32 logits, as scoring has: the policy that samples is the one scored
            # (docs/gpu.md)
            with torch.autocast(device.type, enabled=False):
                logits = self.lm_head(h[live])
            nxt[live] = sample_next(logits, temperature, top_k, None if u is None else u[live])
            out[:, t], mask[:, t] = nxt, ~done
            was_done, done = done, done | (nxt == eot)
            for s in stops:
                if t + 1 >= len(s):
                    done = done | (out[:, t + 1 - len(s) : t + 1] == s).all(1) & mask[:, t]
            if (bool(done.all()) or t == max_new_tokens - 1) and kv_cache is None:
                break  # nobody will read the cache: the last tokens need not go through the model
            # the token that stopped a row is context for a later turn; filler after it is not
            h = step(nxt, ~was_done, cache)
            if bool(done.all()):
                break
        self.train(was_training)
        T_new = int(mask.sum(1).max())
        return out[:, :T_new], mask[:, :T_new]

    def decode(self, idx, real, cache, every_slot=False):
        """One token per row into the cache's next slot: idx (N,) ids, real (N,) bool (False: the
        filler of a finished row) -> the final hidden states (N, C), after ln_f. The query attends
        over the filled slots (a dialogue's cache is up to twice that); every_slot, the compiled
        step's (StaticDecode), over all of them through the mask, so that every tensor has the same
        shape at every step."""
        cache.slots = slot = cache.filled  # (1,)
        cache.window = None if every_slot else cache.length + 1
        # a real token's position: the real tokens before it
        positions = (cache.n_real + real - 1).clamp(min=0)
        cache.valid.index_fill_(1, slot, True)  # the query sees itself: a pad query must see a key
        x = (self.transformer.wte(idx) + self.transformer.wpe(positions))[:, None]  # (N, 1, C)
        mask = cache.valid[:, None, None, : cache.window]  # (N, 1, 1, window)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, layer)
        cache.valid.index_copy_(1, slot, real[:, None])  # a filler stays invisible to later queries
        cache.n_real += real
        cache.filled += 1
        with torch.autocast(idx.device.type, enabled=False):
            return self.transformer.ln_f(x[:, 0].float())

    def compile_decode(self):
        """Have generate decode through a compiled step (StaticDecode): on CUDA it is captured as a
        CUDA graph. On CPU the step stays eager, with one note: there the fixed-shape step, which
        attends over every slot, made an RL step of the default preset 3.7x slower (median 15.9 s
        against 4.3 s eager, sampling 12.8 s against 2.0 s; measured on 2 cores)."""
        if self.transformer.wte.weight.device.type == "cpu":
            print(
                "note: the decode step stays eager on CPU (compiled, at fixed shapes, it attends "
                "over every slot of the cache and was measured slower)"
            )
            return
        self.static_decode = StaticDecode(self)

    # --- GPT-2 weights -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path):
        """GPT-2 weights from a preset name (downloaded once to a cache folder), a Hugging Face
        folder (config.json + model.safetensors) or a model.safetensors file. No transformers."""
        config, tensors, file = read_gpt2(name_or_path)
        model = cls(GPTConfig(**config))
        ours = {
            k.removeprefix("transformer."): v
            for k, v in model.state_dict().items()
            if k != "lm_head.weight"
        }
        missing, extra = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
        if missing:
            raise UserError(f"{file} has no tensor {missing[0]} (of {len(missing)} missing)")
        if extra:
            raise UserError(f"{file} has tensor {extra[0]} that a GPT-2 model does not have")
        with torch.no_grad():
            for key, target in ours.items():
                t = tensors[key].t() if key.endswith(CONV1D_WEIGHTS) else tensors[key]
                if t.shape != target.shape:
                    raise UserError(
                        f"tensor {key} in {file} has shape {tuple(t.shape)}, "
                        f"expected {tuple(target.shape)}"
                    )
                target.copy_(t.float())
        return model


class KVCache:
    """Keys/values of every layer for a batch, preallocated to max_len slots and written in place.
    `valid` marks the real (non-pad) slots, `n_real` counts each row's real tokens (its next
    position id), `filled` the slots written so far (a tensor, so that a captured step can advance
    it). A forward writes `slots` and attends over the first `window` slots."""

    def __init__(self, config, batch, max_len, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch, config.n_head, max_len, hs)
        device_type = torch.device(device).type
        if torch.is_autocast_enabled(device_type):  # keys and values in bf16: half the memory
            dtype = torch.get_autocast_dtype(device_type)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch, dtype=torch.long, device=device)
        self.filled = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = None  # the slots the running forward writes, (T,)
        self.window = None  # the leading slots it attends over; None: all max_len (StaticDecode)

    @property
    def length(self):
        return int(self.filled)

    def reserve(self, n):
        """Room for n more slots, by doubling: a dialogue's later turns outgrow the first guess."""
        need, have = self.length + n, self.k.size(3)
        if need > have:
            grow = max(need, 2 * have) - have
            pad = lambda t: torch.cat([t, t.new_empty(*t.shape[:3], grow, t.size(4))], dim=3)
            self.k, self.v = pad(self.k), pad(self.v)
            self.valid = torch.cat(
                [self.valid, self.valid.new_zeros(self.valid.size(0), grow)], dim=1
            )

    def add(self, real):
        """Mark the next T slots' real tokens, (B, T) bool, and point the layers at them. Returns
        the real-key mask of the slots so far, (B, start + T), and the new slots, (T,)."""
        start, T = self.length, real.size(1)
        if start + T > self.k.size(3):
            raise ValueError(
                f"KV cache of {self.k.size(3)} slots cannot take {start + T}: allocate more"
            )
        self.slots = torch.arange(start, start + T, device=real.device)
        self.valid[:, start : start + T] = real
        self.n_real += real.sum(1)
        self.filled += T
        self.window = start + T
        return self.valid[:, : start + T], self.slots

    def write(self, layer, k, v):
        """Store one layer's keys and values of the running forward, (B, nh, T, hs), in its slots;
        returns the layer's keys and values over the window, (B, nh, window, hs)."""
        if self.window is None:  # StaticDecode's step: its slot is a tensor
            self.k[layer].index_copy_(2, self.slots, k.to(self.k.dtype))
            self.v[layer].index_copy_(2, self.slots, v.to(self.v.dtype))
        else:  # a slice copy is cheaper on CPU
            T = k.size(2)
            self.k[layer, :, :, self.window - T : self.window] = k
            self.v[layer, :, :, self.window - T : self.window] = v
        return self.k[layer, :, :, : self.window], self.v[layer, :, :, : self.window]

    def repeat_interleave(self, n):
        """Prefill once, then give each of the n samples of a prompt its own copy."""
        self.k, self.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)
        self.valid = self.valid.repeat_interleave(n, dim=0)
        self.n_real = self.n_real.repeat_interleave(n, dim=0)


# --- the compiled decode step (GPT.compile_decode) -------------------------------------------


class StaticDecode:
    """generate's decode step at fixed shapes, compiled at its first call: on CUDA captured as a
    CUDA graph, one replay per token in place of ~20 kernel launches per layer. A replay runs the
    same kernels on the same addresses, so the step attends over every slot of the cache (the mask
    hides the empty ones), writes its slot through a tensor index, and the cache's tensors are
    marked static. Where compiling fails (no C++ compiler, no Triton) the step stays eager, with
    one note: eager is correct, only slower."""

    def __init__(self, model):
        self.model = model
        self.step = None  # compiled at the first call

    def start(self, cache):
        """Ready a prefilled cache for the step; returns the step."""
        # the step reads every slot (masked, but 0 x garbage could be NaN) at fixed addresses
        cache.k[:, :, :, cache.length :] = 0
        cache.v[:, :, :, cache.length :] = 0
        for t in (cache.k, cache.v, cache.valid, cache.n_real, cache.filled):
            torch._dynamo.mark_static_address(t)
        return self

    def every_slot(self, idx, real, cache):
        return self.model.decode(idx, real, cache, every_slot=True)

    def __call__(self, idx, real, cache):
        if self.step is not None:
            return self.step(idx, real, cache)
        mode = "reduce-overhead" if idx.is_cuda else None  # reduce-overhead: CUDA graphs
        try:
            self.step = torch.compile(self.every_slot, mode=mode, fullgraph=True)
            return self.step(idx, real, cache)
        except Exception as e:  # compiling happens before the step runs: the cache is untouched
            print(
                f"note: torch.compile failed here ({type(e).__name__}: {str(e)[:80]}); "
                "decoding stays eager"
            )
            self.step = self.model.decode
            return self.step(idx, real, cache)


# --- sampling and log-prob helpers -----------------------------------------------------------


def sample_next(logits, temperature, top_k, u):
    """One token per row: the argmax at temperature 0, else the inverse-CDF draw (cumsum +
    searchsorted) of the uniforms u (B, 1) in [0, 1). torch.multinomial over 50257 logits costs ~20x
    more on CPU at batch 128 (measured)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() if temperature == 1 else logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)
    # right=True: token i is drawn when cdf[i-1] <= u < cdf[i], never when its probability is 0
    drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return drawn.clamp(max=logits.size(-1) - 1)


def pad_rows(rows, device, fill=0):
    """Token lists -> a right-padded (len(rows), longest) long tensor. Right padding needs no mask
    in a causal model: real tokens never attend to the pads after them."""
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def token_logprobs(model, idx, targets, temperature=1.0, entropy=False):
    """log p(targets[b, t] | idx[b, :t+1]) in fp32, (B, T), 0 where targets is -1 (shifted by the
    caller: the logits at t score token t+1), and with entropy the policy's entropy there (else
    None). Only the targeted positions meet the head, a chunk at a time (logprobs.py): no (B, T, V)
    logits. Logits are divided by the sampling temperature (0, greedy: by 1): the scored policy is
    the one that sampled. Right padding needs no mask (causal)."""
    hidden, _ = model(idx, head=False)  # through forward, so DDP sees every use of the weights
    keep, weight = targets != -1, getattr(model, "module", model).lm_head.weight
    lp, ent = TargetLogprobs.apply(hidden[keep], weight, targets[keep], temperature or 1.0, entropy)

    def scatter(values):  # back to (B, T), 0 where nothing is scored
        return torch.zeros(targets.shape, device=idx.device).masked_scatter(keep, values)

    return scatter(lp), scatter(ent) if entropy else None


# --- checkpoints: one dict (config, weights, optimizer, step, RNG, tokenizer map, provenance) --


def save_checkpoint(path, model, tokenizer, optimizer=None, step=0, extra=None):
    model = getattr(model, "module", model)  # unwrap DDP
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    ckpt = {
        "config": dataclasses.asdict(model.config),
        "model": model.state_dict(),
        "rng": rng,
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "tokenizer": tokenizer.state(),
        "provenance": {"argv": sys.argv, "torch": torch.__version__},
        "extra": extra or {},
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    atomic_write(path, buffer.getbuffer())


def load_checkpoint(path, device="cpu"):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by save_checkpoint")
    return ckpt


def load_state(model, state, source):
    """load_state_dict that names the first tensor that does not fit, e.g. a checkpoint of
    another architecture."""
    ours = model.state_dict()
    for key in list(state) + sorted(set(ours) - set(state)):
        if key not in state:
            raise UserError(f"{source} has no tensor {key} that this model needs")
        if key not in ours:
            raise UserError(
                f"{source} has tensor {key}, which this model ({model.config}) does not"
            )
        if ours[key].shape != state[key].shape:
            raise UserError(
                f"{source}: tensor {key} has shape {tuple(state[key].shape)}, this model "
                f"expects {tuple(ours[key].shape)} ({model.config})"
            )
    model.load_state_dict(state)


def load_model(path_or_name, device="cpu"):
    """(model, tokenizer, checkpoint or None) from one of our .pt checkpoints, a GPT-2 preset
    name, a Hugging Face folder or a model.safetensors file."""
    if path_or_name.endswith(".pt"):  # ours: load_checkpoint says when it is missing
        ckpt = load_checkpoint(path_or_name, device)
        model = GPT(GPTConfig(**ckpt["config"]))
        load_state(model, ckpt["model"], path_or_name)
        return model.to(device), tokenizer_from_state(ckpt["tokenizer"]), ckpt
    return GPT.from_pretrained(path_or_name).to(device), get_tokenizer(), None


@dataclass
class SampleConfig:
    init: str = "gpt2"  # a checkpoint .pt, a GPT-2 name, an HF folder or a .safetensors file
    prompt: str = "Hello, I'm a language model,"
    num_samples: int = 3
    max_new_tokens: int = 40
    temperature: float = 0.8
    top_k: int = 200
    seed: int = 1337
    device: str = "auto"


LIMITS = dict(
    num_samples="[1, inf)",
    max_new_tokens="[1, inf)",
    temperature="[0, inf)",
    top_k="[0, inf)",
    seed="[0, inf)",
)


def main(argv):
    cfg = parse_config(SampleConfig(), argv, LIMITS)
    model, tok, ckpt = load_model(cfg.init, pick_device(cfg.device))
    source = f"checkpoint step {ckpt['step']}" if ckpt else "GPT-2 weights"
    print(
        f"loaded {cfg.init} ({source}): {model.num_params() / 1e6:.2f}M parameters, {model.config}"
    )
    # "\n" typed on the command line; any other text stays as typed
    text = cfg.prompt.replace("\\n", "\n")
    tokens, mask = model.generate(
        [tok.encode(text)],
        cfg.max_new_tokens,
        num_samples=cfg.num_samples,
        temperature=cfg.temperature,
        top_k=cfg.top_k or None,
        seed=cfg.seed,
        eot=tok.eot,
    )
    for sample in decode_generated(tok, tokens, mask):
        print("-" * 60 + "\n" + text + sample)


if __name__ == "__main__":
    cli(main)
