"""model.py and gpt2_files.py: GPT-2 parity with Hugging Face, KV-cache sampling, log-probs,
safetensors and checkpoint I/O. Tiny random models, CPU, offline."""

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

import gpt2_files as G
import logprobs
import model as M
from model import GPT, GPTConfig
from tokenizer import CompactTokenizer, get_tokenizer

# ---------------------------------------------------------------------------------------------
# helpers


def tiny_gpt(vocab=100, block=64, n_layer=2, seed=0):
    """A random GPT whose every parameter (LN gains and biases too) is perturbed away from its
    init, so a mis-mapped or untransposed tensor changes the logits."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=32, vocab_size=vocab, block_size=block))
    perturb(model)
    return model.eval()


@torch.no_grad()
def perturb(model):
    """Large random matrices make greedy decoding of a random model vary instead of repeating
    one token; small random vectors make LN gains and biases matter."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * (0.5 if p.dim() == 2 else 0.05))


@pytest.fixture(scope="module")
def gpt():
    return tiny_gpt()


def prompts_of(lengths, vocab=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_nocache(model, prompt, n):
    """n greedy tokens, the whole prefix recomputed at every step (the reference)."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


def unused_token(rows, vocab):
    """A token id that none of the rows contains: used as eot so that no row stops early."""
    seen = {t for row in rows for t in row}
    return next(t for t in range(vocab - 1, -1, -1) if t not in seen)


def expected_length(row, eot, stops=()):
    """How many tokens a row keeps: up to and including the first eot or completed stop sequence."""
    for t, tok in enumerate(row):
        if tok == eot or any(
            t + 1 >= len(s) and row[t + 1 - len(s) : t + 1] == list(s) for s in stops
        ):
            return t + 1
    return len(row)


def check_rows(tokens, mask, refs, eot, stops=()):
    """Row i of (tokens, mask) is refs[i] cut at its stop, then eot padding under a False mask."""
    lengths = [expected_length(r, eot, stops) for r in refs]
    assert tokens.shape == mask.shape == (len(refs), max(lengths))
    for i, (ref, n) in enumerate(zip(refs, lengths)):
        assert tokens[i, :n].tolist() == ref[:n], f"row {i}"
        assert mask[i].tolist() == [True] * n + [False] * (tokens.size(1) - n), f"row {i}"
        assert (tokens[i, n:] == eot).all(), f"row {i}"
    return lengths


# ---------------------------------------------------------------------------------------------
# parity with Hugging Face GPT2LMHeadModel


def hf_gpt2(vocab, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=32,
        n_positions=64,
        vocab_size=vocab,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    hf = transformers.GPT2LMHeadModel(config)
    perturb(hf)
    return hf.eval()


@torch.no_grad()
def hf_greedy(hf, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def to_hub_layout(src, dst):
    """Rewrite a transformers-saved folder the way the hub's openai-community/gpt2 file is laid
    out: no "transformer." prefix, plus the attn.bias / attn.masked_bias buffers."""
    os.makedirs(dst)
    saved = G.read_safetensors(os.path.join(src, "model.safetensors"))
    tensors = {k.removeprefix("transformer."): v for k, v in saved.items()}
    assert not any(k.startswith("transformer.") for k in tensors)
    n_layer, n_pos = (
        json.load(open(os.path.join(src, "config.json")))["n_layer"],
        tensors["wpe.weight"].shape[0],
    )
    for i in range(n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    G.write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    shutil.copy(os.path.join(src, "config.json"), dst)
    return dst


@pytest.mark.parametrize("layout", ["transformers", "hub"])
@pytest.mark.parametrize("vocab", [100, 50257])
def test_from_pretrained_matches_hf(tmp_path, vocab, layout):
    hf = hf_gpt2(vocab)
    folder = str(tmp_path / "hf")
    hf.save_pretrained(folder, safe_serialization=True)
    if layout == "hub":
        folder = to_hub_layout(folder, str(tmp_path / "hub"))
    ours = GPT.from_pretrained(folder).eval()
    assert (
        ours.config.n_layer,
        ours.config.n_head,
        ours.config.n_embd,
        ours.config.vocab_size,
        ours.config.block_size,
    ) == (2, 4, 32, vocab, 64)
    idx = torch.randint(0, vocab, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)
    prompt = idx[0, :5].tolist()
    ref = hf_greedy(hf, prompt, 20)
    tokens, mask = ours.generate([prompt], 20, temperature=0, eot=unused_token([ref], vocab))
    assert tokens[0].tolist() == ref and mask.all()


def test_save_hf_round_trip(tmp_path, gpt):
    transformers = pytest.importorskip("transformers")
    folder = str(tmp_path / "export")
    G.save_hf(gpt, folder)
    files = os.listdir(folder)
    assert {"config.json", "model.safetensors"} <= set(files) and not any(
        f.endswith(".tmp") for f in files
    )
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    idx = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, gpt(idx)[0], atol=1e-5, rtol=0)
    back = GPT.from_pretrained(folder)
    assert back.config == gpt.config
    mine, theirs = gpt.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def test_save_hf_writes_compact_tokenizer_map(tmp_path, gpt):
    tok = CompactTokenizer.from_texts(["a b c"])
    G.save_hf(gpt, str(tmp_path), tokenizer=tok)
    assert json.load(open(tmp_path / "exgrpo_tokenizer.json")) == tok.state()


# ---------------------------------------------------------------------------------------------
# forward: padding, positions, hidden states


def left_pad(prompts, pad=0):
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad, dtype=torch.long)
    real = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, T - len(p) :], real[i, T - len(p) :] = torch.tensor(p), True
    return idx, real


@torch.no_grad()
def test_left_padded_forward_equals_rows_alone(gpt):
    prompts = prompts_of([3, 9, 6])
    idx, real = left_pad(prompts, pad=7)
    logits, _ = gpt(idx, attn_mask=real)
    hidden = gpt.residual_stream(idx, attn_mask=real)
    assert torch.isfinite(logits).all()  # pad queries too (SDPA gives NaN for a row with no key)
    for i, p in enumerate(prompts):
        alone, _ = gpt(torch.tensor([p]))
        alone_hidden = gpt.residual_stream(torch.tensor([p]))
        torch.testing.assert_close(logits[i, real[i]], alone[0], atol=1e-5, rtol=1e-5)
        # hidden[0] = wte + wpe: equal only if the default positions of the padded row are 0..n-1
        torch.testing.assert_close(hidden[0][i, real[i]], alone_hidden[0][0], atol=0, rtol=0)


@torch.no_grad()
def test_explicit_positions_override_default(gpt):
    idx = torch.tensor([prompts_of([6])[0]])
    shifted = torch.arange(3, 9)[None]
    h0 = gpt.residual_stream(idx, positions=shifted)[0]
    torch.testing.assert_close(
        h0, gpt.transformer.wte(idx) + gpt.transformer.wpe(shifted), atol=0, rtol=0
    )


@torch.no_grad()
def test_residual_stream_and_final_hidden_states(gpt):
    idx = torch.tensor(prompts_of([2, 2])).view(2, 2).repeat(1, 4)  # (2, 8)
    logits, loss = gpt(idx)
    hidden = gpt.residual_stream(idx)
    assert loss is None and len(hidden) == gpt.config.n_layer + 1
    assert all(h.shape == (2, 8, 32) for h in hidden)
    tr = gpt.transformer
    torch.testing.assert_close(hidden[0], tr.wte(idx) + tr.wpe(torch.arange(8)), atol=0, rtol=0)
    for layer, block in enumerate(tr.h):  # hidden[l] is the residual stream after block l
        torch.testing.assert_close(
            hidden[layer + 1], block(hidden[layer], None, None, layer), atol=1e-6, rtol=0
        )
    torch.testing.assert_close(gpt.lm_head(tr.ln_f(hidden[-1])), logits, atol=0, rtol=0)
    final, nothing = gpt(idx, head=False)
    assert nothing is None
    torch.testing.assert_close(final, tr.ln_f(hidden[-1]), atol=0, rtol=0)


def test_loss_ignores_minus_one(gpt):
    idx = torch.tensor([prompts_of([8])[0]])
    targets = torch.tensor([[5, 6, -1, 7, -1, -1, 8, 9]])
    logits, loss = gpt(idx, targets=targets)
    keep = targets[0] != -1
    expected = torch.nn.functional.cross_entropy(logits[0, keep], targets[0, keep])
    torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------------------------------------
# generation


def test_cached_equals_uncached_greedy(gpt):
    prompts = prompts_of([4, 11, 7, 1])
    refs = [greedy_nocache(gpt, p, 15) for p in prompts]
    eot = unused_token(refs, 100)
    tokens, mask = gpt.generate(prompts, 15, temperature=0, eot=eot)  # one left-padded batch
    assert torch.equal(tokens, torch.tensor(refs)) and mask.all()
    for p, ref in zip(prompts, refs):  # and each row alone
        alone, _ = gpt.generate([p], 15, temperature=0, eot=eot)
        assert torch.equal(alone[0], torch.tensor(ref))


def test_generate_restores_training_mode(gpt):
    gpt.train()
    try:
        gpt.generate(prompts_of([3]), 2, temperature=0)
        assert gpt.training
    finally:
        gpt.eval()


def test_sampling_reproducible_with_seed(gpt):
    prompts = prompts_of([3, 6])
    a = gpt.generate(prompts, 12, num_samples=3, temperature=1.0, seed=123)
    b = gpt.generate(prompts, 12, num_samples=3, temperature=1.0, seed=123)
    c = gpt.generate(prompts, 12, num_samples=3, temperature=1.0, seed=124)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_num_samples_rows_are_prompt_major(gpt):
    prompts = prompts_of([5, 8])
    refs = [greedy_nocache(gpt, p, 6) for p in prompts]
    assert refs[0] != refs[1]
    tokens, _ = gpt.generate(prompts, 6, num_samples=3, temperature=0, eot=unused_token(refs, 100))
    assert tokens.tolist() == [refs[0]] * 3 + [refs[1]] * 3
    # sampled: the 3 samples of a prompt differ from each other (each row has its own cache copy)
    sampled, _ = gpt.generate(
        prompts, 10, num_samples=3, temperature=2.0, seed=0, eot=unused_token(refs, 100)
    )
    assert len({tuple(r) for r in sampled[:3].tolist()}) > 1


def test_row_stops_at_eot(gpt):
    prompts = prompts_of([4, 6])
    refs = [greedy_nocache(gpt, p, 10) for p in prompts]
    # eot := row 0's 4th token (absent from its first 3): row 0 must stop there, mask through it
    eot = next(refs[0][t] for t in range(3, 10) if refs[0][t] not in refs[0][:t])
    tokens, mask = gpt.generate(prompts, 10, temperature=0, eot=eot)
    lengths = check_rows(tokens, mask, refs, eot)
    assert lengths[0] < 10


def test_all_rows_stop_early_trims_output(gpt):
    prompt = prompts_of([4])[0]
    ref = greedy_nocache(gpt, prompt, 10)
    eot = next(ref[t] for t in range(2, 10) if ref[t] not in ref[:t])
    tokens, mask = gpt.generate([prompt], 10, temperature=0, eot=eot)
    assert tokens.shape[1] == expected_length(ref, eot) < 10 and mask.all()


def test_stop_ids_stop_a_row(gpt):
    prompts = prompts_of([4, 6])
    refs = [greedy_nocache(gpt, p, 12) for p in prompts]
    eot = unused_token(refs, 100)
    stop = refs[0][5:7]  # a two-token stop sequence that first completes at row 0's 7th token
    assert expected_length(refs[0], eot, [stop]) == 7
    tokens, mask = gpt.generate(prompts, 12, temperature=0, stop_ids=[stop], eot=eot)
    check_rows(tokens, mask, refs, eot, [stop])
    single = [refs[1][2]]  # a one-token stop sequence
    tokens, mask = gpt.generate(prompts, 12, temperature=0, stop_ids=[stop, single], eot=eot)
    lengths = check_rows(tokens, mask, refs, eot, [stop, single])
    assert lengths[1] <= 3


def test_dialogue_continues_a_kv_cache(gpt):
    """Two turns through one cache (starting too small, so it must grow) equal greedy decoding of
    the whole history without a cache: the stop token is context for the next turn, the eot
    filler after it is not."""
    first, second = prompts_of([3, 6], seed=4), prompts_of([2, 4], seed=5)
    refs1 = [greedy_nocache(gpt, p, 8) for p in first]
    eot = next(refs1[0][t] for t in range(2, 8) if refs1[0][t] not in refs1[0][:t])
    cache = M.KVCache(gpt.config, 2, 4, "cpu", torch.float32)
    tokens, mask = gpt.generate(first, 8, temperature=0, eot=eot, kv_cache=cache)
    lengths = check_rows(tokens, mask, refs1, eot)
    assert lengths[0] < 8  # row 0 stopped early and carries eot filler
    history = [p + r[:n] + q for p, r, n, q in zip(first, refs1, lengths, second)]
    refs2 = [greedy_nocache(gpt, h, 6) for h in history]
    tokens, mask = gpt.generate(second, 6, temperature=0, eot=eot, kv_cache=cache)
    lengths2 = check_rows(tokens, mask, refs2, eot)
    assert cache.n_real.tolist() == [len(h) + n for h, n in zip(history, lengths2)]
    with pytest.raises(ValueError, match="one prompt per cached row and num_samples=1"):
        gpt.generate(second, 2, num_samples=2, kv_cache=cache)
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        gpt.generate(second, 64 - max(cache.n_real.tolist()) - 3, kv_cache=cache)


@torch.no_grad()
def sample_nocache(model, prompts, n, temperature, seed, eot, num_samples=1):
    """generate's sampling without a cache (the reference): every step runs each live row's whole
    history alone, unpadded, through the plain forward, and draws with the same uniforms (one per
    row per step, prompt-major rows). Returns each row's new tokens, up to and with its eot."""
    gen = torch.Generator().manual_seed(seed)
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    new, done = [[] for _ in rows], [not row for row in rows]
    for _ in range(n):
        u = torch.rand(len(rows), 1, generator=gen)
        for i, row in enumerate(rows):
            if not done[i]:
                row.append(
                    int(
                        M.sample_next(
                            model(torch.tensor([row]))[0][:, -1], temperature, None, u[i : i + 1]
                        )
                    )
                )
                new[i].append(row[-1])
                done[i] = row[-1] == eot
        if all(done):
            break
    return new


def generated(tokens, mask):
    return [row[keep].tolist() for row, keep in zip(tokens, mask)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_cached_equals_uncached(gpt, temperature):
    """Sampling through the static KV cache (left-padded prompts, an empty one, two samples each,
    rows that stop early while others go on) draws the tokens the uncached forward draws."""
    prompts = prompts_of([4, 11, 0, 7, 1])
    # eot -1: nobody stops
    free = sample_nocache(gpt, prompts, 12, temperature, seed=5, eot=-1, num_samples=2)
    eot = free[0][3]  # row 0 stops at its 4th token at the latest
    refs = sample_nocache(gpt, prompts, 12, temperature, seed=5, eot=eot, num_samples=2)
    assert 0 < min(len(r) for r in refs if r) < 12 == max(len(r) for r in refs)
    tokens, mask = gpt.generate(
        prompts, 12, num_samples=2, temperature=temperature, seed=5, eot=eot
    )
    assert generated(tokens, mask) == refs


def test_sampled_dialogue_equals_uncached(gpt):
    """Two sampled turns through one cache (too small at first, so it grows between the turns) draw
    what the uncached forward draws on the whole history: the dialogue sampler of the RL stage."""
    first, second = prompts_of([3, 6, 2], seed=4), prompts_of([2, 4, 5], seed=5)
    eot = sample_nocache(gpt, first, 8, 1.0, seed=1, eot=-1)[1][2]
    refs1 = sample_nocache(gpt, first, 8, 1.0, seed=1, eot=eot)
    cache = M.KVCache(gpt.config, 3, 4, "cpu", torch.float32)
    assert (
        generated(*gpt.generate(first, 8, temperature=1.0, seed=1, eot=eot, kv_cache=cache))
        == refs1
    )
    refs2 = sample_nocache(
        gpt, [p + r + q for p, r, q in zip(first, refs1, second)], 6, 1.0, seed=2, eot=eot
    )
    assert (
        generated(*gpt.generate(second, 6, temperature=1.0, seed=2, eot=eot, kv_cache=cache))
        == refs2
    )


def test_decode_steps_keep_their_shapes_and_storage(gpt, monkeypatch):
    """Within one call every decode step writes the same cache storage in place and advances the
    slot by one. Eager steps attend over the filled slots only; StaticDecode's step (what a captured
    CUDA graph replays) over all of them, with the same shapes at every step and the same tokens."""
    seen, real = [], M.GPT.decode

    def spy(self, idx, real_tokens, cache, every_slot=False):
        slot = int(cache.filled)
        h = real(self, idx, real_tokens, cache, every_slot)
        seen.append((tuple(idx.shape), tuple(cache.k.shape), cache.k.data_ptr(), cache.window))
        assert int(cache.filled) == slot + 1
        return h

    monkeypatch.setattr(M.GPT, "decode", spy)
    prompts, eot = prompts_of([3, 9]), unused_token([], 100)
    eager = gpt.generate(prompts, 10, num_samples=2, temperature=1.0, seed=0, eot=eot)
    # 9 prompt slots, then one per step
    assert len(seen) == 9 and [w for *_, w in seen] == list(range(10, 19))
    assert len({s[:3] for s in seen}) == 1  # the 10th token never goes through the model
    seen.clear()
    gpt.static_decode = M.StaticDecode(gpt)
    gpt.static_decode.step = gpt.static_decode.every_slot  # stands in for the compiled step
    try:
        static = gpt.generate(prompts, 10, num_samples=2, temperature=1.0, seed=0, eot=eot)
    finally:
        gpt.static_decode = None
    assert len(seen) == 9 and len(set(seen)) == 1 and seen[0][3] is None  # every slot, fixed shapes
    assert torch.equal(static[0], eager[0]) and torch.equal(static[1], eager[1])


def test_compiled_decode_traces_one_graph_and_matches_eager(gpt, monkeypatch, capsys):
    """StaticDecode: the step traces as one graph (fullgraph; dynamo with its eager backend here,
    inductor takes a minute on CPU) and samples the eager tokens; without torch.compile the step
    stays eager, with one note."""
    prompts = prompts_of([4, 11, 7])
    want = gpt.generate(prompts, 10, num_samples=2, temperature=1.0, seed=3)
    real = torch.compile
    monkeypatch.setattr(
        torch,
        "compile",
        lambda fn, mode=None, fullgraph=False: real(fn, backend="eager", fullgraph=fullgraph),
    )
    gpt.static_decode = M.StaticDecode(gpt)
    try:
        got = gpt.generate(prompts, 10, num_samples=2, temperature=1.0, seed=3)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

        def unavailable(*args, **kwargs):
            raise RuntimeError("no compiler")

        monkeypatch.setattr(torch, "compile", unavailable)
        gpt.static_decode = M.StaticDecode(gpt)
        got = gpt.generate(prompts, 10, num_samples=2, temperature=1.0, seed=3)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert gpt.static_decode.step == gpt.decode
        assert "decoding stays eager" in capsys.readouterr().out
    finally:
        gpt.static_decode = None


def test_compile_decode_leaves_the_cpu_step_eager(gpt, monkeypatch, capsys):
    """On CPU the compiled step, which attends over every slot, was measured slower than eager:
    compile_decode leaves generate on the eager step, says so, and compiles nothing."""
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: pytest.fail("compiled"))
    gpt.compile_decode()
    assert gpt.static_decode is None and "stays eager on CPU" in capsys.readouterr().out


def test_sampling_logits_stay_fp32_under_bf16_autocast(gpt, monkeypatch):
    """Under the bf16 autocast of the RL stage the head still runs in fp32 before each draw, as in
    the scoring path: the sampling policy is the scored one."""
    dtypes, real = [], M.sample_next
    monkeypatch.setattr(
        M, "sample_next", lambda logits, *a: dtypes.append(logits.dtype) or real(logits, *a)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gpt.generate(prompts_of([3, 5]), 4, temperature=1.0, seed=0)
    assert dtypes == [torch.float32] * 4


def test_overlong_prompt_is_an_error(gpt):
    prompt = list(range(60))
    gpt.generate([prompt], 4, temperature=0)  # 60 + 4 == block_size 64 fits
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        gpt.generate([prompt, [1]], 5, temperature=0)


def test_empty_prompt_generates_nothing(gpt):
    prompt = prompts_of([5])[0]
    ref = greedy_nocache(gpt, prompt, 6)
    eot = unused_token([ref], 100)
    tokens, mask = gpt.generate([[], prompt, []], 6, num_samples=2, temperature=0, eot=eot)
    assert tokens.tolist() == [[eot] * 6] * 2 + [ref] * 2 + [[eot] * 6] * 2
    assert mask.tolist() == [[False] * 6] * 2 + [[True] * 6] * 2 + [[False] * 6] * 2


def test_sample_next_follows_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5]).log_softmax(-1).repeat(40000, 1)
    gen = torch.Generator().manual_seed(0)
    for temperature, top_k in [(1.0, None), (0.5, None), (1.0, 2)]:
        draws = M.sample_next(logits, temperature, top_k, torch.rand(len(logits), 1, generator=gen))
        freq = torch.bincount(draws, minlength=5).float() / len(draws)
        p = (logits[0] / temperature).softmax(-1)
        if top_k:
            p = torch.where(p >= p.topk(top_k).values[-1], p, 0.0)
            p = p / p.sum()
            assert (freq[p == 0] == 0).all()
        torch.testing.assert_close(freq, p, atol=0.01, rtol=0)
    assert torch.equal(M.sample_next(logits[:3], 0, None, None), torch.tensor([2, 2, 2]))


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0**-24])  # the two ends of torch.rand's range
def test_sample_next_never_draws_a_zero_probability_token(u):
    """top_k gives tokens 0, 3 and 4 probability exactly 0. A uniform draw of exactly 0 (torch.rand
    returns it with probability 2^-24, i.e. a few times per million RL tokens) must not pick one."""
    logits = torch.tensor([[0.0, 3.0, 2.0, -1.0, 0.5]])
    assert int(M.sample_next(logits, 1.0, 2, torch.full((1, 1), u))) in (1, 2)


# ---------------------------------------------------------------------------------------------
# log-probs


@torch.no_grad()
def manual_logprobs(model, prompt, completion, temperature):
    out = []
    for k, tok in enumerate(completion):
        logits = model(torch.tensor([list(prompt) + list(completion[:k])]))[0][0, -1]
        out.append(float((logits / temperature).log_softmax(-1)[tok]))
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@torch.no_grad()
def test_token_logprobs_of_right_padded_rows_equal_token_by_token(gpt, temperature):
    """The way the RL loss scores rollouts: prompt + completion rows, right-padded, one forward,
    only the completion tokens targeted."""
    prompts, completions = prompts_of([4, 7, 1], seed=2), prompts_of([5, 2, 6], seed=3)
    # rows of 9, 9 and 7 tokens
    idx = M.pad_rows([p + c for p, c in zip(prompts, completions)], "cpu")
    targets = torch.full((3, 8), -1)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        targets[i, len(p) - 1 : len(p) - 1 + len(c)] = torch.tensor(c)
    logp, entropy = M.token_logprobs(gpt, idx[:, :-1], targets, temperature=temperature)
    assert logp.shape == (3, 8) and logp.dtype == torch.float32 and entropy is None
    assert torch.all(logp[targets == -1] == 0)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ref = torch.tensor(manual_logprobs(gpt, p, c, temperature))
        torch.testing.assert_close(
            logp[i, len(p) - 1 : len(p) - 1 + len(c)], ref, atol=1e-5, rtol=0
        )


def scoring_case(vocab=100):
    """A standard-init model (log-probs of a few units, so fp32 resolves 1e-6), right-padded rows
    and a random target mask that never covers the padding."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=vocab, block_size=64))
    rows = prompts_of([9, 5, 12, 3], vocab=vocab, seed=4)
    idx = M.pad_rows(rows, "cpu", fill=7)
    real = torch.arange(idx.size(1) - 1)[None] < torch.tensor([len(r) - 1 for r in rows])[:, None]
    keep = (torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) < 0.6) & real
    return model, idx[:, :-1], idx[:, 1:].masked_fill(~keep, -1), keep


def full_logprobs(model, x, targets, temperature):
    """The reference: every position through the head, (B, T, V) log-softmax, then gather."""
    logp = (model(x)[0].float() / temperature).log_softmax(-1)
    chosen = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return chosen, -(logp.exp() * logp).sum(-1)


# one chunk; several of 3 rows (V = 100), the last one short
@pytest.mark.parametrize("chunk", [2**23, 300])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_the_full_sequence_ones(monkeypatch, chunk, temperature):
    monkeypatch.setattr(logprobs, "CHUNK_LOGITS", chunk)
    model, x, targets, keep = scoring_case()
    with torch.no_grad():
        logp, entropy = M.token_logprobs(model, x, targets, temperature, entropy=True)
        ref, ref_entropy = full_logprobs(model, x, targets, temperature)
    assert ref[keep].std() > 0.01  # the test could tell a shifted position apart
    torch.testing.assert_close(logp[keep], ref[keep], atol=1e-6, rtol=0)
    # a sum of V terms, reordered
    torch.testing.assert_close(entropy[keep], ref_entropy[keep], atol=1e-5, rtol=0)
    assert torch.all(logp[~keep] == 0) and torch.all(entropy[~keep] == 0)


# every chunk's logits recomputed; the first kept; all kept
@pytest.mark.parametrize("keep", [0, 300, 2**28])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_gradient_equals_the_full_paths(monkeypatch, temperature, keep):
    """The chunked backward gives every parameter the gradient that autograd through the full
    (B, T, V) log-softmax gives, whether a chunk's softmax was kept or is recomputed."""
    monkeypatch.setattr(logprobs, "CHUNK_LOGITS", 300)
    monkeypatch.setattr(logprobs, "KEEP_LOGITS", keep)
    model, x, targets, keep = scoring_case()
    weights = torch.randn(keep.shape, generator=torch.Generator().manual_seed(1)) * keep
    grads = []
    for score in (
        lambda: M.token_logprobs(model, x, targets, temperature)[0],
        lambda: full_logprobs(model, x, targets, temperature)[0],
    ):
        model.zero_grad()
        (score() * weights).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("keep", [0, 600])
def test_token_logprobs_never_builds_full_logits(monkeypatch, keep):
    """The head module is never called, no chunk of logits holds more than CHUNK_LOGITS, backward
    recomputes exactly the chunks beyond KEEP_LOGITS, and without grad every chunk is recomputed
    (nothing was kept)."""
    monkeypatch.setattr(logprobs, "CHUNK_LOGITS", 300)  # 3 rows of V = 100
    monkeypatch.setattr(logprobs, "KEEP_LOGITS", keep)
    model, x, targets, mask = scoring_case()
    model.lm_head.register_forward_hook(lambda *_: pytest.fail("token_logprobs ran the full head"))
    rows, chunk = [], logprobs.logits_chunk
    monkeypatch.setattr(logprobs, "logits_chunk", lambda h, *a: rows.append(len(h)) or chunk(h, *a))
    M.token_logprobs(model, x, targets, entropy=True)[0].sum().backward()
    n = int(mask.sum())
    # forward: every targeted position; backward: those not kept
    assert sum(rows) == 2 * n - keep // 100
    assert max(rows) == 3
    contexts, forward = [], logprobs.TargetLogprobs.forward
    monkeypatch.setattr(
        logprobs.TargetLogprobs,
        "forward",
        staticmethod(lambda ctx, *a: contexts.append(ctx) or forward(ctx, *a)),
    )
    with torch.no_grad():
        M.token_logprobs(model, x, targets)
    assert contexts[0].kept.numel() == 0


# ---------------------------------------------------------------------------------------------
# bad weight files


@pytest.fixture
def hf_folder(tmp_path, gpt):
    folder = tmp_path / "w"
    G.save_hf(gpt, str(folder))
    return folder


def rewrite(folder, edit):
    file = str(folder / "model.safetensors")
    tensors = G.read_safetensors(file)
    edit(tensors)
    G.write_safetensors(file, tensors)


def test_truncated_safetensors(hf_folder):
    file = hf_folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is truncated: tensor .* ends at byte"):
        GPT.from_pretrained(str(hf_folder))
    file.write_bytes(data[:100])  # cut inside the header
    with pytest.raises(ValueError, match="is truncated: header of"):
        GPT.from_pretrained(str(hf_folder))
    file.write_bytes(data[:5])
    with pytest.raises(ValueError, match="is truncated"):
        GPT.from_pretrained(str(hf_folder))


@pytest.mark.parametrize("header", [b"not json at all!", b"\xff\xfe\x00garbage"])
def test_header_that_does_not_parse(hf_folder, header):
    (hf_folder / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 64
    )
    with pytest.raises(ValueError, match="does not start with a safetensors JSON header"):
        GPT.from_pretrained(str(hf_folder))


def test_header_that_is_not_an_object(hf_folder):
    """Valid JSON but not a name -> tensor map is a wrong file too: a clear ValueError naming the
    file, not an AttributeError from inside the reader."""
    header = b"[1, 2, 3]"
    (hf_folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match="model.safetensors"):
        GPT.from_pretrained(str(hf_folder))


def test_tensor_with_wrong_shape(hf_folder):
    def bad_ln(t):
        t["transformer.h.1.ln_2.weight"] = torch.ones(33)

    rewrite(hf_folder, bad_ln)
    with pytest.raises(
        ValueError, match=r"tensor h.1.ln_2.weight .* has shape \(33,\), expected \(32,\)"
    ):
        GPT.from_pretrained(str(hf_folder))

    def untransposed(t):  # a Conv1D weight stored the nn.Linear way round
        t["transformer.h.1.ln_2.weight"] = torch.ones(32)
        t["transformer.h.0.mlp.c_fc.weight"] = t["transformer.h.0.mlp.c_fc.weight"].t().contiguous()

    rewrite(hf_folder, untransposed)
    with pytest.raises(
        ValueError,
        match=r"tensor h.0.mlp.c_fc.weight .* has shape \(32, 128\), expected \(128, 32\)",
    ):
        GPT.from_pretrained(str(hf_folder))


def test_byte_count_that_does_not_fit_the_shape(hf_folder):
    file = hf_folder / "model.safetensors"
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["transformer.ln_f.bias"]["shape"] = [16]
    head = json.dumps(header).encode()
    file.write_bytes(len(head).to_bytes(8, "little") + head + data[8 + n :])
    with pytest.raises(ValueError, match=r"transformer.ln_f.bias .* do not hold shape \[16\]"):
        GPT.from_pretrained(str(hf_folder))


def test_missing_tensor(hf_folder):
    rewrite(hf_folder, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"has no tensor h.1.mlp.c_fc.bias \(of 1 missing\)"):
        GPT.from_pretrained(str(hf_folder))


def test_extra_tensor(hf_folder):
    rewrite(hf_folder, lambda t: t.update({"transformer.h.0.attn.q_norm.weight": torch.ones(32)}))
    with pytest.raises(
        ValueError, match="has tensor h.0.attn.q_norm.weight that a GPT-2 model does not have"
    ):
        GPT.from_pretrained(str(hf_folder))


def test_missing_last_layer_is_an_error(hf_folder):
    """config.json says n_layer=2; a file without any h.1.* tensor must not load as a 1-layer
    model (a wrong file is a clear error, never a half-loaded model)."""
    rewrite(hf_folder, lambda t: [t.pop(k) for k in list(t) if k.startswith("transformer.h.1.")])
    with pytest.raises(ValueError, match="n_layer"):
        GPT.from_pretrained(str(hf_folder))


def test_bare_file_without_config_needs_n_head(hf_folder):
    (hf_folder / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json beside it to say n_head for n_embd=32"):
        GPT.from_pretrained(str(hf_folder / "model.safetensors"))


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GPT-2 weights at"):
        GPT.from_pretrained(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**M.PRESETS["nano"], vocab_size=40))
    tok = CompactTokenizer.from_texts(["the cat sat on the mat"])
    opt = model.configure_optimizer(lr=1e-2, weight_decay=0.1)
    idx = torch.randint(0, 40, (2, 8))
    model(idx, targets=idx)[1].backward()
    opt.step()
    path = str(tmp_path / "ckpt" / "last.pt")
    M.save_checkpoint(path, model, tok, optimizer=opt, step=7, extra={"note": "x"})
    after_save = (torch.rand(4), random.random(), np.random.rand(3))
    assert os.listdir(tmp_path / "ckpt") == ["last.pt"]  # written atomically, no .tmp left

    loaded, tok2, ckpt = M.load_model(path)
    random.setstate(ckpt["rng"]["python"])
    np.random.set_state(ckpt["rng"]["numpy"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    restored = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(after_save[0], restored[0]) and after_save[1] == restored[1]
    assert np.array_equal(after_save[2], restored[2])

    assert ckpt["step"] == 7 and ckpt["extra"] == {"note": "x"} and loaded.config == model.config
    assert isinstance(tok2, CompactTokenizer) and tok2.ids == tok.ids
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied after loading

    opt2 = loaded.configure_optimizer(lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(ckpt["optimizer"])
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"] and s1["state"].keys() == s2["state"].keys()
    for i in s1["state"]:
        for name, t in s1["state"][i].items():
            assert torch.equal(t, s2["state"][i][name]), (i, name)
    assert len(s1["state"]) == len(list(model.parameters()))  # every parameter had a step


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = GPT(GPTConfig(**M.PRESETS["nano"], vocab_size=40))
    tok = CompactTokenizer.from_texts(["a b"])
    path = str(tmp_path / "last.pt")
    M.save_checkpoint(path, model, tok, step=1)

    def crash(src, dst):  # the process dies after writing the temp file, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        M.save_checkpoint(path, model, tok, step=2)
    monkeypatch.undo()
    assert M.load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["last.pt"]


def test_wrong_architecture_is_an_error(tmp_path):
    small = GPT(GPTConfig(**M.PRESETS["nano"], vocab_size=40))
    wide = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=48, vocab_size=40, block_size=128))
    with pytest.raises(
        ValueError,
        match=r"src: tensor transformer.wte.weight has shape \(40, 32\), "
        r"this model expects \(40, 48\)",
    ):
        M.load_state(wide, small.state_dict(), "src")
    deep = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=40, block_size=128))
    with pytest.raises(ValueError, match=r"src has no tensor transformer.h.2"):
        M.load_state(deep, small.state_dict(), "src")
    with pytest.raises(ValueError, match=r"src has tensor transformer.h.2.*which this model"):
        M.load_state(small, deep.state_dict(), "src")

    path = str(tmp_path / "c.pt")
    M.save_checkpoint(path, small, CompactTokenizer.from_texts(["a"]))
    ckpt = torch.load(path, weights_only=False)
    ckpt["config"]["n_embd"] = 48  # a checkpoint whose config does not match its weights
    torch.save(ckpt, path)
    with pytest.raises(
        ValueError, match=rf"{path}: tensor transformer.wte.weight has shape \(40, 32\)"
    ):
        M.load_model(path)


def test_unreadable_checkpoint(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        M.load_model(str(path))
    torch.save({"weights": 1}, path)
    with pytest.raises(ValueError, match="is not a checkpoint written by save_checkpoint"):
        M.load_model(str(path))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        M.load_checkpoint(str(tmp_path / "none.pt"))


def test_load_model_reads_hf_folder(hf_folder, gpt):
    model, tok, ckpt = M.load_model(str(hf_folder))
    assert ckpt is None and tok is get_tokenizer()
    idx = torch.tensor([prompts_of([6])[0]])
    with torch.no_grad():
        assert torch.equal(model(idx)[0], gpt(idx)[0])


def test_offline_download_says_which_files_to_place_where(tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("EXGRPO_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)  # the default endpoint
    with pytest.raises(
        SystemExit,
        match=r"place config.json and model.safetensors from "
        r"https://huggingface.co/openai-community/gpt2 in .*gpt2 and rerun",
    ):
        M.GPT.from_pretrained("gpt2")
    assert not list((tmp_path / "gpt2").iterdir())  # nothing half-written
