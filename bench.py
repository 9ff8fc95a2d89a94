"""
Throughput of a training step and of sampling, ours against Hugging Face transformers on the same
model, threads and shapes: ours should be at least as fast as transformers.

    python bench.py                                  # tiny (compact vocab) and GPT-2 124M shapes
    python bench.py --shapes=tiny --threads=2 --iters=5
    python bench.py --shapes=nano --batch=2 --seq_len=16 --gen_batch=2 --new_tokens=4 --iters=1 --warmup=0

Weights are random (speed does not depend on them). Each number is the median of `iters` timed
repetitions after `warmup` untimed ones. On a shared machine other processes skew everything:
the header prints the load average and how busy the CPUs were just before the run; compare only
numbers from the same run.
"""
import importlib.util
import os
import statistics
import time
from dataclasses import dataclass

import torch

from configurator import cli, parse_config, pick_device, set_threads
from model import GPT, PRESETS, GPTConfig, sample_next


@dataclass
class BenchConfig:
    shapes: str = "tiny,gpt2"  # comma-separated presets of model.PRESETS
    compact_vocab: int = 200   # vocab of the non-GPT-2 presets (a compact task vocabulary); gpt2* use 50257
    threads: int = 1           # torch threads; 0 keeps torch's default
    device: str = "cpu"        # cpu | cuda | auto
    batch: int = 4             # training batch
    seq_len: int = 128         # training sequence length
    gen_batch: int = 8         # prompts sampled at once
    prompt_len: int = 16       # tokens per prompt
    new_tokens: int = 64       # tokens sampled per prompt
    warmup: int = 1            # untimed repetitions first
    iters: int = 3             # timed repetitions (median)
    nocache: bool = True       # also time sampling without a KV cache
    hf: bool = True            # also time transformers' GPT2LMHeadModel, when installed
    seed: int = 0


def cpu_busy(seconds=1.0):
    """Fraction of all CPU time spent busy over `seconds`, from /proc/stat (None off Linux)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except OSError:
        return None
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def tokens_per_s(fn, device, warmup, iters):
    """Median over `iters` timed repetitions, after `warmup` untimed ones, of (tokens fn reports) /
    (seconds it took)."""
    rates = []
    for i in range(warmup + iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def train_step(model, opt, x, hf):
    """One fwd + bwd + AdamW step on x; returns the tokens fed in."""
    if hf:
        inputs, loss = x, model(input_ids=x, labels=x).loss  # HF shifts the labels itself
    else:
        inputs = x[:, :-1]
        loss = model(inputs, targets=x[:, 1:])[1]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return inputs.numel()


@torch.no_grad()
def sample_nocache(model, prompts, new_tokens, gen):
    """The same sampling as model.generate, but every step recomputes the whole prefix; only the
    last position goes through the head (as nanoGPT's generate does)."""
    tr, idx = model.transformer, prompts
    for _ in range(new_tokens):
        x = tr.wte(idx) + tr.wpe(torch.arange(idx.size(1), device=idx.device))
        for layer, block in enumerate(tr.h):
            x = block(x, None, None, layer)
        logits = model.lm_head(tr.ln_f(x[:, -1]))
        idx = torch.cat([idx, sample_next(logits, 1.0, None, gen)[:, None]], dim=1)
    return idx.size(0) * new_tokens


def hf_model(config):
    import transformers
    transformers.logging.set_verbosity_error()  # its config notes would break the table
    hf_config = transformers.GPT2Config(
        n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, vocab_size=config.vocab_size,
        n_positions=config.block_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(hf_config)


def bench_shape(name, cfg, device, with_hf):
    """[what, ours tok/s, (HF tok/s)] rows for one preset; with_hf adds transformers' numbers."""
    vocab = 50257 if name.startswith("gpt2") else cfg.compact_vocab
    config = GPTConfig(**PRESETS[name], vocab_size=vocab)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    x = torch.randint(0, vocab, (cfg.batch, cfg.seq_len + 1), device=device, generator=g)
    prompts = torch.randint(0, vocab, (cfg.gen_batch, cfg.prompt_len), device=device, generator=g)
    rows = []

    torch.manual_seed(cfg.seed)
    model = GPT(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    timed = lambda fn: tokens_per_s(fn, device, cfg.warmup, cfg.iters)
    rows.append(["train", timed(lambda: train_step(model.train(), opt, x, False))])

    def generate():
        tokens, _ = model.generate(prompts.tolist(), cfg.new_tokens, temperature=1.0, seed=cfg.seed)
        return tokens.numel()  # every row runs until the last row stops
    rows.append(["sample (KV cache)", timed(generate)])
    if cfg.nocache:
        model.eval()
        rows.append(["sample (no cache)", timed(lambda: sample_nocache(model, prompts, cfg.new_tokens, g))])
    del model, opt

    if with_hf:
        torch.manual_seed(cfg.seed)
        hf = hf_model(config).to(device)
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
        rows[0].append(timed(lambda: train_step(hf.train(), opt, x[:, :-1], True)))
        hf.eval()
        kw = dict(do_sample=True, top_k=0, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                  use_cache=True, pad_token_id=vocab - 1, attention_mask=torch.ones_like(prompts))
        rows[1].append(timed(lambda: (hf.generate(prompts, **kw).size(1) - cfg.prompt_len) * cfg.gen_batch))
        del hf, opt
    return config, rows


LIMITS = dict(**dict.fromkeys(("batch", "seq_len", "gen_batch", "prompt_len", "new_tokens", "iters"), "[1, inf)"),
              compact_vocab="[2, inf)", threads="[0, inf)", warmup="[0, inf)", seed="[0, inf)")


def main(argv):
    cfg = parse_config(BenchConfig(), argv, LIMITS)
    unknown = [name for name in cfg.shapes.split(",") if name not in PRESETS]
    if unknown:
        raise SystemExit(f"--shapes: unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    has_transformers = importlib.util.find_spec("transformers") is not None
    busy = cpu_busy()
    print(f"torch {torch.__version__}, device {device}, torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} (1 min), "
          f"cpu busy before the run {'?' if busy is None else f'{100 * busy:.0f}%'}")
    print(f"train: batch {cfg.batch} x {cfg.seq_len} tokens, fwd + bwd + AdamW step; sample: {cfg.gen_batch} "
          f"prompts x {cfg.prompt_len} tokens + {cfg.new_tokens} new, temperature 1, no top-k; "
          f"median of {cfg.iters} after {cfg.warmup} warm-up")
    if cfg.hf and not has_transformers:
        print("transformers is not installed: no comparison")
    print(f"{'shape':<12} {'what':<18} {'ours tok/s':>11} {'HF tok/s':>10} {'ours/HF':>8}")
    for name in cfg.shapes.split(","):
        config, rows = bench_shape(name, cfg, device, cfg.hf and has_transformers)
        label = f"{name} V={config.vocab_size}"
        for what, ours, *theirs in rows:
            hf = f"{theirs[0]:10.0f} {ours / theirs[0]:8.2f}" if theirs else f"{'-':>10} {'-':>8}"
            print(f"{label:<12} {what:<18} {ours:11.0f} {hf}")
        if cfg.nocache:
            print(f"{label:<12} {'KV cache speed-up':<18} {rows[1][1] / rows[2][1]:11.2f}x")
    print(f"load average after the run {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    cli(main)
