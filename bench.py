"""
Throughput of a training step and of sampling, ours against Hugging Face transformers on the same
model, threads and shapes: ours should be at least as fast as transformers. Then one GRPO step of
distill_rl.py at shape S (the tiny preset with GPT-2's 50257 outputs: 16 coin questions x 8
rollouts x 64 new tokens, beta 0.04), its sampling time and peak memory, against TRL's
GRPOTrainer on the same model and sizes when trl is installed. Each RL run is its own process,
so its peak RSS is its own.

    python bench.py  # tiny (compact vocab), S and GPT-2 124M shapes, RL step
    python bench.py --shapes=S --threads=2 --iters=5 --rl=False  # sampling at shape S: 8, 64 rows
    python bench.py --shapes=tiny --threads=2 --iters=5 --rl=False
    python bench.py --shapes=nano --batch=2 --seq_len=16 --gen_batch=2 --new_tokens=4 --iters=1 \
        --warmup=0
    python bench.py --shapes= --rl_questions=2 --rl_group=2 --rl_new_tokens=4  # the RL rows, small

Weights are random (speed does not depend on them). Each number is the median of `iters` timed
repetitions after `warmup` untimed ones. On a shared machine other processes skew everything:
the header prints the load average and how busy the CPUs were just before the run; compare only
numbers from the same run.
"""

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from configurator import cli, parse_config, pick_device, set_threads
from gpt2_files import save_hf
from model import GPT, PRESETS, GPTConfig, sample_next
from tasks import is_correct, read_split
from tokenizer import gpt2_bpe_files


@dataclass
class BenchConfig:
    # comma-separated presets of model.PRESETS, or S: tiny with GPT-2's 50257 outputs
    shapes: str = "tiny,S,gpt2"
    # vocab of the other tiny presets (a compact task vocabulary); gpt2* and S use 50257
    compact_vocab: int = 200
    threads: int = 1  # torch threads; 0 keeps torch's default
    device: str = "cpu"  # cpu | cuda | auto
    batch: int = 4  # training batch
    seq_len: int = 128  # training sequence length
    # prompts sampled at once (one sample each), comma-separated: one row per count
    gen_batch: str = "8,64"
    prompt_len: int = 16  # tokens per prompt
    new_tokens: int = 64  # tokens sampled per prompt
    warmup: int = 1  # untimed repetitions first
    iters: int = 3  # timed repetitions (median)
    nocache: bool = True  # also time sampling without a KV cache
    hf: bool = True  # also time transformers' GPT2LMHeadModel, when installed
    rl: bool = True  # also one GRPO step at shape S, ours and (when installed) TRL's
    rl_questions: int = 16  # questions per GRPO step
    rl_group: int = 8  # rollouts per question
    # tokens per rollout (TRL is held to exactly this many; ours rarely stops early)
    rl_new_tokens: int = 64
    # instead: where a decode step spends its time, per op group, at each shape
    profile: bool = False
    trl_run: str = ""  # internal: the run folder of TRL's steps (bench.py starts itself with it)
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
        u = torch.rand(idx.size(0), 1, generator=gen, device=idx.device)
        idx = torch.cat([idx, sample_next(logits, 1.0, None, u)[:, None]], dim=1)
    return idx.size(0) * new_tokens


def hf_model(config):
    import transformers

    transformers.logging.set_verbosity_error()  # its config notes would break the table
    hf_config = transformers.GPT2Config(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=config.vocab_size - 1,
        eos_token_id=config.vocab_size - 1,
        attn_implementation="sdpa",
    )
    return transformers.GPT2LMHeadModel(hf_config)


def shape_config(name, cfg):
    """A preset of model.PRESETS, or S (the tiny preset with GPT-2's 50257 outputs); gpt2* and S get
    GPT-2's vocabulary, the other presets the compact one."""
    vocab = 50257 if name.startswith("gpt2") or name == "S" else cfg.compact_vocab
    return GPTConfig(**PRESETS["tiny" if name == "S" else name], vocab_size=vocab)


def bench_shape(name, cfg, device, with_hf):
    """[what, ours tok/s, (HF tok/s)] rows for one preset; with_hf adds transformers' numbers."""
    config = shape_config(name, cfg)
    vocab = config.vocab_size
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    x = torch.randint(0, vocab, (cfg.batch, cfg.seq_len + 1), device=device, generator=g)
    batches = [int(n) for n in cfg.gen_batch.split(",")]
    prompts = {
        n: torch.randint(0, vocab - 1, (n, cfg.prompt_len), device=device, generator=g)
        for n in batches
    }
    rows = our_rows(config, cfg, device, x, batches, prompts, g)
    if with_hf:  # the training row, then one per prompt count (no HF number without a cache)
        for row, rate in zip(rows, hf_rates(config, cfg, device, x, batches, prompts)):
            row.append(rate)
    return config, rows


def our_rows(config, cfg, device, x, batches, prompts, g):
    """[what, tok/s] of our model: the training step, sampling at each prompt count and, with
    nocache, sampling without the KV cache. The model is freed on return, before transformers' is
    built."""
    torch.manual_seed(cfg.seed)
    model = GPT(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    timed = lambda fn: tokens_per_s(fn, device, cfg.warmup, cfg.iters)
    rows = [["train", timed(lambda: train_step(model.train(), opt, x, False))]]

    def generate(n):
        tokens, _ = model.generate(
            prompts[n].tolist(), cfg.new_tokens, temperature=1.0, seed=cfg.seed
        )
        return tokens.numel()  # every row runs until the last row stops

    for n in batches:
        rows.append([f"sample {n} rows", timed(lambda: generate(n))])
    if cfg.nocache:
        model.eval()
        first = batches[0]
        nocache = lambda: sample_nocache(model, prompts[first], cfg.new_tokens, g)
        rows.append([f"sample {first}, no cache", timed(nocache)])
    return rows


def hf_rates(config, cfg, device, x, batches, prompts):
    """transformers' tok/s on the same shapes: the training step, then sampling at each prompt
    count."""
    torch.manual_seed(cfg.seed)
    hf = hf_model(config).to(device)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    timed = lambda fn: tokens_per_s(fn, device, cfg.warmup, cfg.iters)
    rates = [timed(lambda: train_step(hf.train(), opt, x[:, :-1], True))]
    hf.eval()
    for n in batches:
        kw = dict(
            do_sample=True,
            top_k=0,
            max_new_tokens=cfg.new_tokens,
            min_new_tokens=cfg.new_tokens,
            use_cache=True,
            pad_token_id=config.vocab_size - 1,
            attention_mask=torch.ones_like(prompts[n]),
        )
        rates.append(timed(lambda: (hf.generate(prompts[n], **kw).size(1) - cfg.prompt_len) * n))
    return rates


# groups of torch.profiler's aten ops in a decode step: what each one is for
OP_GROUPS = {
    "head (lm_head matmul)": ("aten::mm",),
    "block matmuls": ("aten::addmm",),
    "attention": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_efficient_attention_forward",
        "aten::_flash_attention_forward",
    ),
    "sampling": (
        "aten::_softmax",
        "aten::cumsum",
        "aten::searchsorted",
        "aten::uniform_",
        "aten::nonzero",
    ),
    "layer norm, GELU, residual adds": ("aten::native_layer_norm", "aten::gelu", "aten::add"),
    "cache writes, copies": (
        "aten::copy_",
        "aten::index_copy_",
        "aten::index_put_",
        "aten::index",
        "aten::index_fill_",
        "aten::fill_",
    ),
}


def profile_decode(name, cfg, device):
    """{group: ms per decode step} of one generate call (n rows x new_tokens, after a warm-up
    call), from torch.profiler's self time per aten op, beside the unprofiled wall time per step
    (median of iters calls); 'other ops' is every op not in OP_GROUPS (views, masks, embeddings);
    the gap to the wall time is Python and dispatch."""
    from torch.profiler import ProfilerActivity, profile

    model = GPT(shape_config(name, cfg)).to(device).eval()
    vocab = model.config.vocab_size
    n = int(cfg.gen_batch.split(",")[0])
    prompts = torch.randint(
        0, vocab - 1, (n, cfg.prompt_len), generator=torch.Generator().manual_seed(cfg.seed)
    ).tolist()
    walls = []
    for _ in range(cfg.warmup + cfg.iters):  # the wall time unprofiled: the profiler adds its own
        t0 = time.perf_counter()
        model.generate(prompts, cfg.new_tokens, temperature=1.0, seed=cfg.seed)
        walls.append((time.perf_counter() - t0) * 1e3 / cfg.new_tokens)
    wall = statistics.median(walls[cfg.warmup :])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.generate(prompts, cfg.new_tokens, temperature=1.0, seed=cfg.seed)
    self_ms = {e.key: e.self_cpu_time_total / 1e3 / cfg.new_tokens for e in prof.key_averages()}
    groups = {g: sum(self_ms.get(op, 0.0) for op in ops) for g, ops in OP_GROUPS.items()}
    groups["other ops"] = sum(self_ms.values()) - sum(groups.values())
    return n, wall, groups


# ---------------------------------------------------------------------------------------------
# one GRPO step at shape S: ours (distill_rl.py) and TRL's GRPOTrainer, each in its own process


def measured(cmd, log):
    """Run cmd, its output to log; the peak RSS (GiB) of that process alone (os.wait4's usage)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed; its output is in {log}")
    return usage.ru_maxrss / 2**20  # Linux reports KiB


def bench_rl(cfg, device, with_trl):
    """Rows [what, step s, sampling s or None, peak RSS GiB]: the median step over the last `iters`
    of warmup + iters GRPO steps, on coin questions from invert.py and a random shape-S model."""
    run = tempfile.mkdtemp(prefix="bench_rl_")
    measured(
        [
            sys.executable,
            "invert.py",
            f"--out_dir={run}",
            "--worlds=coin",
            f"--n_train={4 * cfg.rl_questions}",
            "--n_val=1",
            "--n_test=1",
            "--n_ood=1",
            "--n_examples=0",
        ],
        os.path.join(run, "invert.log"),
    )
    torch.manual_seed(cfg.seed)
    save_hf(GPT(GPTConfig(**PRESETS["tiny"], vocab_size=50257)), os.path.join(run, "hf"))
    steps, median = cfg.warmup + cfg.iters, lambda xs: statistics.median(xs[cfg.warmup :])
    rss = measured(
        [
            sys.executable,
            "distill_rl.py",
            "--stage=rl",
            "--algo=grpo",
            f"--init={run}/hf",
            "--worlds=coin",
            f"--rl_batch_size={cfg.rl_questions}",
            f"--group_size={cfg.rl_group}",
            "--beta=0.04",
            f"--max_new_tokens={cfg.rl_new_tokens}",
            f"--out_dir={run}",
            "--difficulty=False",
            "--eval_problems=0",
            f"--rl_steps={steps}",
            f"--threads={cfg.threads}",
            f"--device={device}",
            f"--seed={cfg.seed}",
        ],
        os.path.join(run, "ours.log"),
    )
    log = [json.loads(line) for line in open(os.path.join(run, "logs", "rl_grpo.jsonl"))]
    step, sampling = median([r["time_step"] for r in log]), median([r["time_sample"] for r in log])
    rows = [["ours", step, sampling, rss]]
    if with_trl:
        argv = [f"--{k}={v}" for k, v in vars(cfg).items() if k not in ("trl_run", "device")]
        rss = measured(
            [sys.executable, "bench.py", *argv, f"--trl_run={run}", f"--device={device}"],
            os.path.join(run, "trl.log"),
        )
        trl_step = median(json.load(open(os.path.join(run, "trl_steps.json"))))
        rows.append(["TRL GRPOTrainer", trl_step, None, rss])
    shutil.rmtree(run)  # kept only when a run fails, for its log
    return rows


def trl_steps(cfg, run):
    """TRL's GRPO on the same model, questions and sizes: one generation per step, the sequence-mean
    loss (its "grpo", our loss_agg=seq), exactly rl_new_tokens per rollout; TRL's other defaults.
    Writes the step times (seconds) to run/trl_steps.json."""
    from datasets import Dataset
    from transformers import GPT2LMHeadModel, GPT2Tokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    records = read_split(os.path.join(run, "data"), "train")[: cfg.rl_questions]
    data = Dataset.from_dict(
        {
            "prompt": ["Q: " + r["question"] + "\nA:" for r in records],  # tasks.prompt_ids' format
            "answer": [r["answer"] for r in records],
            "world": [r["world"] for r in records],
        }
    )
    reward = lambda completions, answer, world, **_: [
        float(is_correct(w, c, a)) for c, a, w in zip(completions, answer, world)
    ]
    files = gpt2_bpe_files()
    # GPT-2's BPE, offline
    tok = GPT2Tokenizer(vocab=files["encoder.json"], merges=files["vocab.bpe"])
    tok.pad_token = tok.eos_token
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(
        output_dir=os.path.join(run, "trl"),
        per_device_train_batch_size=cfg.rl_questions * cfg.rl_group,
        num_generations=cfg.rl_group,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        max_completion_length=cfg.rl_new_tokens,
        generation_kwargs={"min_new_tokens": cfg.rl_new_tokens},
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.04,
        loss_type="grpo",
        learning_rate=2e-5,
        max_steps=cfg.warmup + cfg.iters,
        use_cpu=cfg.device == "cpu",
        seed=cfg.seed,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=GPT2LMHeadModel.from_pretrained(os.path.join(run, "hf")),
        reward_funcs=reward,
        args=args,
        train_dataset=data,
        processing_class=tok,
        callbacks=[StepTimer()],
    )
    trainer.train()
    with open(os.path.join(run, "trl_steps.json"), "w") as f:
        json.dump(times, f)


LIMITS = dict(
    **dict.fromkeys(("batch", "seq_len", "prompt_len", "new_tokens", "iters"), "[1, inf)"),
    compact_vocab="[2, inf)",
    threads="[0, inf)",
    warmup="[0, inf)",
    seed="[0, inf)",
    **dict.fromkeys(("rl_questions", "rl_group", "rl_new_tokens"), "[1, inf)"),
)


def main(argv):
    cfg = parse_config(BenchConfig(), argv, LIMITS)
    unknown = [
        name for name in cfg.shapes.split(",") if name and name not in PRESETS and name != "S"
    ]
    if unknown:
        raise SystemExit(
            f"--shapes: unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}, S"
        )
    if not all(n.isdigit() and int(n) > 0 for n in cfg.gen_batch.split(",")):
        raise SystemExit(f"--gen_batch={cfg.gen_batch}: give prompt counts such as 8 or 8,64")
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    if cfg.trl_run:  # the child bench_rl starts, so that TRL's peak memory is measured alone
        return trl_steps(cfg, cfg.trl_run)
    has_transformers = importlib.util.find_spec("transformers") is not None
    busy = cpu_busy()
    busy_text = "?" if busy is None else f"{100 * busy:.0f}%"
    if cfg.profile:
        print(
            f"a decode step, ms per step (torch.profiler self time; {cfg.prompt_len}-token "
            f"prompts + {cfg.new_tokens} new, {torch.get_num_threads()} threads, cpu busy before "
            f"{busy_text})"
        )
        for name in [name for name in cfg.shapes.split(",") if name]:
            n, wall, groups = profile_decode(name, cfg, device)
            print(
                f"{name}, {n} rows: {wall:.2f} ms a step (wall); "
                + "; ".join(f"{g} {ms:.2f} ({100 * ms / wall:.0f}%)" for g, ms in groups.items())
            )
        return
    print(
        f"torch {torch.__version__}, device {device}, torch threads {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} (1 min), "
        f"cpu busy before the run {busy_text}"
    )
    print(
        f"train: batch {cfg.batch} x {cfg.seq_len} tokens, fwd + bwd + AdamW step; "
        f"sample: {cfg.gen_batch} prompts x {cfg.prompt_len} tokens + {cfg.new_tokens} new, "
        "temperature 1, no top-k; "
        f"median of {cfg.iters} after {cfg.warmup} warm-up"
    )
    if cfg.hf and not has_transformers:
        print("transformers is not installed: no comparison")
    print(f"{'shape':<12} {'what':<20} {'ours tok/s':>11} {'HF tok/s':>10} {'ours/HF':>8}")
    for name in [name for name in cfg.shapes.split(",") if name]:
        config, rows = bench_shape(name, cfg, device, cfg.hf and has_transformers)
        label = f"{name} V={config.vocab_size}"
        for what, ours, *theirs in rows:
            hf = f"{theirs[0]:10.0f} {ours / theirs[0]:8.2f}" if theirs else f"{'-':>10} {'-':>8}"
            print(f"{label:<12} {what:<20} {ours:11.0f} {hf}")
        if cfg.nocache:
            print(f"{label:<12} {'KV cache speed-up':<20} {rows[1][1] / rows[-1][1]:11.2f}x")
    if cfg.rl:
        with_trl = importlib.util.find_spec("trl") is not None
        print(
            f"\nGRPO step at shape S (tiny preset, V=50257): {cfg.rl_questions} coin questions x "
            f"{cfg.rl_group} rollouts x {cfg.rl_new_tokens} new tokens, beta 0.04; median of "
            f"{cfg.iters} steps after {cfg.warmup}"
            + ("" if with_trl else "; trl is not installed: no comparison")
        )
        rows = bench_rl(cfg, device, with_trl)
        header = ("what", "step s", "sampling s", "step/sampling", "peak RSS GiB")
        print("{:<16} {:>7} {:>11} {:>14} {:>13}".format(*header))
        for what, step, sampling, rss in rows:
            share = f"{'-':>11} {'-':>14}"
            if sampling:
                share = f"{sampling:11.2f} {step / sampling:14.2f}"
            print(f"{what:<16} {step:7.2f} {share} {rss:13.2f}")
        if len(rows) > 1:
            print(
                f"ours vs TRL: {rows[1][1] / rows[0][1]:.2f}x faster, "
                f"{rows[0][3] / rows[1][3]:.2f}x the peak memory"
            )
    print(f"load average after the run {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    cli(main)
