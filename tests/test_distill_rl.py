"""Stage 2-3 tests: hand-computed advantages and DSU bonus, loss masks, ratio/KL at the start,
gradient accumulation, golden losses, resume, the NaN guard, DDP, and RL raising the reward."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import distill_rl
from configurator import mixed_precision
from distill_rl import (
    Config,
    RolloutBatch,
    dsu_bonus,
    exgrpo_objective,
    group_advantages,
    masked_logprobs,
    policy_terms,
    policy_update,
)
from model import GPT, GPTConfig, KVCache, load_checkpoint
from tasks import prompt_ids
from tokenizer import CompactTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rl_loss(logp, old_logp, ref_logp, mask, adv, cfg, n_seqs, n_tokens):
    """Eq. 7 alone (no aux rows) through the objective, and what the log reads of it."""
    terms = policy_terms(logp, old_logp, ref_logp, mask, adv, cfg, n_seqs, n_tokens)
    return exgrpo_objective(terms, 0.0, cfg), (terms.kl_sum, terms.n_clipped)


def nano(vocab=40, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab, block_size=64)).eval()


# ---------------------------------------------------------------------------------------------
# advantages and the DSU bonus, by hand


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.5, 0.0, 0.0, 0.0]])
    adv = group_advantages(rewards, "group")
    # group 1: mean 0.5, population std 0.5 -> +-0.5 / (0.5 + 1e-4)
    assert torch.allclose(adv[0], torch.tensor([1, -1, -1, 1]) * 0.5 / 0.5001)
    assert torch.equal(adv[1], torch.zeros(4))  # all-equal group: no signal, no NaN
    # group 3: mean 0.375, deviations (1.125, -0.375 x3), population std sqrt(0.421875)
    std = (0.421875) ** 0.5
    assert torch.allclose(adv[2], torch.tensor([1.125, -0.375, -0.375, -0.375]) / (std + 1e-4))
    assert torch.equal(group_advantages(rewards, "none")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_group_of_one_is_zero_not_nan():
    adv = group_advantages(torch.tensor([[1.0], [0.0]]), "group")
    assert torch.equal(adv, torch.zeros(2, 1))


def test_dsu_bonus_by_hand():
    full = torch.tensor(
        [
            [1.0, 0.0, 1.0, 0.0],  # P_full 0.5 > P_partial 0.25: fires
            [1.0, 0.0, 0.0, 0.0],  # 0.25 = 0.25: does not fire (strict >)
            [1.0, 1.0, 0.0, 0.0],  # P_partial 0: fires
            [0.0, 0.0, 0.0, 0.0],  # 0 > 0 is false
        ]
    )
    partial = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4])
    bonus, fired = dsu_bonus(full, partial, delta=0.5, nu=1.0)
    assert fired.tolist() == [True, False, True, False]
    # paid only to the correct Scenario A rollouts of questions where it fired
    assert bonus.tolist() == [[0.5, 0, 0.5, 0], [0, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 0]]
    _, fired = dsu_bonus(full, partial, delta=0.5, nu=3.0)  # 0.5 > 0.75 fails; 0.5 > 0 holds
    assert fired.tolist() == [False, False, True, False]


def test_difficulty_filter_semantics():
    def rec(i, n):
        return {
            "id": str(i),
            "world": "arith",
            "question": f"q{i}",
            "answer": "1",
            "rationale": "The answer is 1.",
            "probes": [
                {
                    "rule": "verify",
                    "question": f"q{i}-{k}",
                    "rationale": "The answer is 5.",
                    "answer": "5",
                }
                for k in range(n)
            ],
        }

    # (probes N', how many the student gets right L)
    cases = [(3, 1), (3, 2), (3, 3), (3, 0), (0, 0), (1, 1), (1, 0)]
    recs = [rec(i, n) for i, (n, _) in enumerate(cases)]
    right = {f"q{i}-{k}" for i, (n, L) in enumerate(cases) for k in range(L)}
    calls = []

    def answer_fn(qs):
        calls.append(len(qs))
        return ["so 5. The answer is 5." if q in right else "The answer is 6." for q in qs]

    kept, counts = distill_rl.difficulty_filter(recs, answer_fn, tau_hard=1)
    assert [r["id"] for r in kept] == ["0", "1"] and calls == [sum(n for n, _ in cases)]
    assert counts == {
        "kept": 2,
        "dropped_all_correct": 2,
        "dropped_too_few": 2,
        "dropped_no_probes": 1,
    }
    kept, counts = distill_rl.difficulty_filter(recs, answer_fn, tau_hard=2)
    assert [r["id"] for r in kept] == ["1"] and counts["dropped_too_few"] == 3
    assert distill_rl.difficulty_filter([], answer_fn) == (
        [],
        {"kept": 0, "dropped_all_correct": 0, "dropped_too_few": 0, "dropped_no_probes": 0},
    )


# ---------------------------------------------------------------------------------------------
# the loss: masks, ratio, KL


def rollout_rows():
    """Two rollouts: prompt (0) and student-written (1) tokens; the second is shorter, so it is
    right-padded after its EOS (id 39)."""
    rows = [[5, 6, 7, 8, 9, 39, 3, 4, 11, 12, 39], [5, 6, 7, 20, 39]]
    masks = [[0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    return rows, masks


def test_ratio_one_and_kl_zero_before_the_first_update():
    model = nano()
    ref = nano()
    rows, masks = rollout_rows()
    with torch.no_grad():
        old, _, _ = masked_logprobs(model, rows, masks, "cpu", 1.0)
        ref_logp, _, _ = masked_logprobs(ref, rows, masks, "cpu", 1.0)
    logp, mask, _ = masked_logprobs(model, rows, masks, "cpu", 1.0)
    assert torch.equal(torch.exp(logp - old), torch.ones_like(logp))
    cfg = Config(algo="grpo", beta=0.04)
    _, (kl, clipped) = rl_loss(
        logp, old, ref_logp, mask, torch.tensor([1.0, -1.0]), cfg, 2, float(mask.sum())
    )
    assert kl == 0.0 and clipped == 0.0


def test_kl_positive_and_finite_after_one_update():
    model, ref = nano(), nano()
    rows, masks = rollout_rows()
    cfg = Config(algo="grpo", beta=0.04, rl_lr=1e-2, micro_batch=8, ppo_epochs=1, aux_coef=0.0)
    optimizer = model.configure_optimizer(cfg.rl_lr, 0.0)
    batch = RolloutBatch(rows=rows, masks=masks, adv=torch.tensor([1.0, -1.0]))
    first = policy_update(model, ref, optimizer, batch, cfg, 1, "in the test")
    assert first.kl == 0.0
    second = policy_update(model, ref, optimizer, batch, cfg, 1, "in the test")
    assert 0 < second.kl < float("inf")


def kept_gradient(model, ref, batch, cfg):
    """policy_update's gradient, the optimizer step switched off."""
    optimizer = model.configure_optimizer(0.0, 0.0)
    optimizer.step = lambda: None
    optimizer.zero_grad = lambda set_to_none=True: None
    policy_update(model, ref, optimizer, batch, cfg, 1, "in the test")
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("beta", [0.04, 0.0])
def test_one_epoch_reuses_the_update_forward_and_beta_zero_skips_the_reference(beta):
    """ppo_epochs = 1: pi_old's log-probs are the update's own, detached (no separate pass), and
    the gradient is the one from a separately scored pi_old. beta = 0: pi_ref is never scored
    (None would fail), and the gradient is the one with a reference scored and weighted by 0."""
    rows, masks = rollout_rows()
    batch = RolloutBatch(rows=rows, masks=masks, adv=torch.tensor([1.0, -1.0]))
    cfg = Config(algo="grpo", beta=beta, micro_batch=8, aux_coef=0.0, grad_clip=1e9)
    got = kept_gradient(nano(), nano(seed=1) if beta else None, batch, cfg)
    model, ref = nano(), nano(seed=1)
    with torch.no_grad():
        old, _, _ = masked_logprobs(model, rows, masks, "cpu", 1.0)
        ref_logp, _, _ = masked_logprobs(ref, rows, masks, "cpu", 1.0)
    logp, mask, _ = masked_logprobs(model, rows, masks, "cpu", 1.0)
    rl_loss(logp, old, ref_logp, mask, batch.adv, cfg, 2, float(mask.sum()))[0].backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_masked_tokens_get_exactly_zero_gradient():
    """Prompt, probe-question and post-EOS padding positions: d loss / d logp == 0 exactly."""
    model = nano()
    rows, masks = rollout_rows()
    logp, mask, _ = masked_logprobs(model, rows, masks, "cpu", 1.0)
    # targets are shifted: mask[:, t] says whether token t+1 was written by the student
    assert mask.tolist() == [[0, 0, 1, 1, 1, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]]
    leaf = logp.detach().clone().requires_grad_(True)
    for agg in ("seq", "token", "constant"):
        cfg = Config(algo="grpo", beta=0.04, loss_agg=agg)
        leaf.grad = None
        loss, _ = rl_loss(
            leaf,
            leaf.detach() + 0.05,
            leaf.detach() - 0.1,
            mask,
            torch.tensor([1.0, -2.0]),
            cfg,
            2,
            float(mask.sum()),
        )
        loss.backward()
        assert torch.all(leaf.grad[mask == 0] == 0)
        assert torch.all(leaf.grad[mask == 1] != 0)


def test_loss_aggregation_by_hand():
    """seq: per-sequence token mean, then mean over sequences; token: one global token mean;
    constant: the token sum over sequences x max_new_tokens (a final-answer token weighs the same
    whatever probe answers share its row)."""
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, 3.0])
    seq = rl_loss(logp, logp, logp, mask, adv, Config(algo="grpo", loss_agg="seq"), 2, 4)[0]
    tok = rl_loss(logp, logp, logp, mask, adv, Config(algo="grpo", loss_agg="token"), 2, 4)[0]
    const = rl_loss(
        logp,
        logp,
        logp,
        mask,
        adv,
        Config(algo="grpo", loss_agg="constant", max_new_tokens=5),
        2,
        4,
    )[0]
    assert seq.item() == pytest.approx(-(1.0 + 3.0) / 2)
    assert tok.item() == pytest.approx(-(3 * 1.0 + 3.0) / 4)
    assert const.item() == pytest.approx(-(3 * 1.0 + 3.0) / (2 * 5))  # 2 sequences x 5 new tokens


def test_the_objective_is_one_expression_by_hand():
    """-J + lambda * L_aux, with J = the clipped term - beta * KL: -(2 - 0.04 * 0.5) + 0.1 * 3."""
    terms = distill_rl.PolicyTerms(torch.tensor(2.0), torch.tensor(0.5), 0.0, 0.0)
    loss = exgrpo_objective(terms, torch.tensor(3.0), Config(beta=0.04, aux_coef=0.1))
    assert loss.item() == pytest.approx(-(2.0 - 0.04 * 0.5) + 0.1 * 3.0)
    no_aux = exgrpo_objective(terms, torch.tensor(3.0), Config(beta=0.0, aux_coef=0.0))
    assert no_aux.item() == pytest.approx(-2.0)


def test_clipping_by_hand():
    """rho = e^0.5 > 1.2 with positive advantage: the clipped term is taken, no gradient."""
    logp = torch.full((1, 2), 0.5, requires_grad=True)
    old = torch.zeros(1, 2)
    cfg = Config(algo="grpo", beta=0.0, clip_eps=0.2, loss_agg="token")
    loss, (_, clipped) = rl_loss(logp, old, old, torch.ones(1, 2), torch.tensor([2.0]), cfg, 1, 2)
    assert loss.item() == pytest.approx(-1.2 * 2.0)
    assert clipped == 2
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    cfg = Config(algo="grpo", beta=1.0, loss_agg="token")
    _, (kl, _) = rl_loss(logp, logp, ref, torch.ones(1, 1), torch.tensor([0.0]), cfg, 1, 1)
    r = -0.5
    assert kl == pytest.approx(torch.exp(torch.tensor(r)).item() - r - 1)


def test_gradient_accumulation_equals_full_batch():
    rows, masks = rollout_rows()
    rows, masks = rows * 3, masks * 3
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.5, 0.0])
    aux, aux_masks = [[5, 6, 7, 8, 39]] * 3, [[0, 0, 1, 1, 1]] * 3
    grads = []
    for micro in (6, 4, 1):
        cfg = Config(algo="exgrpo", beta=0.04, micro_batch=micro, aux_coef=0.1, rl_lr=0.0)
        batch = RolloutBatch(rows=rows, masks=masks, adv=adv, aux=aux, aux_masks=aux_masks)
        grads.append(kept_gradient(nano(), nano(seed=1), batch, cfg))
    assert torch.allclose(grads[0], grads[1], atol=1e-7) and torch.allclose(
        grads[0], grads[2], atol=1e-7
    )


def test_sft_batch_trains_responses_only():
    """Two turns (probe, then Q): x drops the last token, y is shifted by one with -1 on every
    prompt token and on the padding of the shorter example."""
    probe, question = ([1, 2], [3, 9]), ([4], [5, 6, 9])
    x, y = distill_rl.sft_batch([[probe, question], [question]], "cpu")
    assert x.tolist() == [[1, 2, 3, 9, 4, 5, 6], [4, 5, 6, 9, 0, 0, 0]]
    assert y.tolist() == [[-1, 3, 9, -1, 5, 6, 9], [5, 6, 9, -1, -1, -1, -1]]


def test_ei_dialogue_examples():
    import random

    pool = [(("q", "Q"), [("p1", "P1"), ("p2", "P2"), ("p3", "P3")])]
    g = random.Random(0)
    for _ in range(20):
        ex = distill_rl.ei_example(g, pool, Config(k=2, ei_format="dialogue"))
        assert ex[-1] == ("q", "Q") and 2 <= len(ex) <= 3 and len(set(ex[:-1])) == len(ex) - 1
        assert distill_rl.ei_example(g, pool, Config(ei_format="single"))[0] in pool[0][1]


# ---------------------------------------------------------------------------------------------
# whole runs on a tiny dataset

NANO = [
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=768",
    "--threads=1",
    "--device=cpu",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import invert

    out = tmp_path_factory.mktemp("run")
    invert.build(
        invert.Config(out_dir=str(out), worlds="coin", n_train=64, n_val=16, n_test=8, n_ood=8)
    )
    return str(out)


def sft(out_dir, *extra):
    return distill_rl.main(
        [
            f"--out_dir={out_dir}",
            "--stage=sft",
            "--data=ei",
            "--batch_size=8",
            "--seed=1",
            "--eval_problems=8",
            "--max_new_tokens=24",
            *NANO,
            *extra,
        ]
    )


def rl(out_dir, *extra):
    distill_rl.main(
        [
            f"--out_dir={out_dir}",
            "--stage=rl",
            "--algo=exgrpo",
            "--rl_batch_size=2",
            "--group_size=2",
            "--k=2",
            "--seed=1",
            "--difficulty=False",
            "--eval_problems=4",
            "--max_new_tokens=24",
            "--rl_lr=1e-3",
            "--rl_warmup=1",
            *NANO,
            *extra,
        ]
    )


def log(out_dir, name):
    return [json.loads(line) for line in open(os.path.join(out_dir, "logs", f"{name}.jsonl"))]


def weights(out_dir, name):
    return load_checkpoint(os.path.join(out_dir, "ckpt", f"{name}.pt"))["model"]


def test_golden_sft_losses(data_dir):
    """llm.c-style: the first three losses of a seeded run, frozen. A change here is a change in
    the data, the model, the batching or the optimizer: look before updating the numbers."""
    sft(data_dir, "--max_iters=3", "--name=golden")
    losses = [r["loss"] for r in log(data_dir, "golden")]
    assert losses == pytest.approx(GOLDEN_SFT_LOSSES, rel=1e-4)


# re-derived when the data changed (skewed distractor counts, reverse share 0.1, coin's undo steps
# name their event): new data, new values
GOLDEN_SFT_LOSSES = [5.1791887283325195, 5.177648544311523, 5.183085918426514]


def test_bf16_autocast_path_on_cpu(data_dir):
    """dtype=bfloat16 forced on CPU (auto is fp32 here): one SFT step and one RL scoring pass are
    finite, close to fp32, and not bitwise fp32 (so autocast did run); logits and log-probs stay
    fp32, the KV cache is bf16, and the first update still has ratio 1 and KL 0."""
    sft(data_dir, "--max_iters=1", "--name=bf16", "--dtype=bfloat16")
    loss = log(data_dir, "bf16")[0]["loss"]
    assert loss == pytest.approx(GOLDEN_SFT_LOSSES[0], rel=1e-2) and loss != GOLDEN_SFT_LOSSES[0]
    model, rows, masks = nano(), *rollout_rows()
    fp32 = masked_logprobs(model, rows, masks, "cpu", 1.0)[0]
    with torch.no_grad(), mixed_precision("cpu", "bfloat16"):
        bf16, _, entropy = masked_logprobs(model, rows, masks, "cpu", 1.0, True)
        assert KVCache(model.config, 2, 8, "cpu", torch.float32).k.dtype == torch.bfloat16
    assert bf16.dtype == entropy.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert 0 < (bf16 - fp32).abs().max() < 0.05
    cfg = Config(algo="grpo", micro_batch=8, aux_coef=0.0, dtype="bfloat16")
    batch = RolloutBatch(rows=rows, masks=masks, adv=torch.tensor([1.0, -1.0]))
    stats = policy_update(
        model, nano(), model.configure_optimizer(1e-3, 0.0), batch, cfg, 1, "in the test"
    )
    assert stats.kl == 0.0 and stats.clipped == 0.0 and math.isfinite(stats.loss)


def test_compile_wraps_the_training_forward_and_the_decode_step(data_dir, monkeypatch, capsys):
    """compile=True where it pays (forced here; a GPU in use): the gradient's forward goes through
    torch.compile (dynamo with its eager backend here: inductor takes a minute on CPU), the losses
    stay the golden ones and the checkpoint's keys are the plain model's. On CPU, where it was
    measured slower, compile=True changes nothing and says so."""
    compiled, real = [], torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: compiled.append(fn) or real(fn, backend="eager")
    )
    sft(data_dir, "--max_iters=1", "--name=cpu_compile", "--compile=True", "--eval_interval=2")
    assert compiled == [] and "--compile=True is ignored on CPU" in capsys.readouterr().out
    monkeypatch.setattr(distill_rl, "compile_pays", lambda device: True)
    model = sft(data_dir, "--max_iters=2", "--name=compiled", "--compile=True", "--eval_interval=2")
    # the decode step stays eager on CPU (model.compile_decode), so only the forward is compiled
    assert compiled == [model] and model.static_decode is None
    assert [r["loss"] for r in log(data_dir, "compiled")] == pytest.approx(
        GOLDEN_SFT_LOSSES[:2], rel=1e-5
    )
    assert list(weights(data_dir, "compiled")) == list(model.state_dict())


def interrupt_at(monkeypatch, step):
    real = distill_rl.Run.log

    def log_then_die(self, record):
        if record["step"] == step:
            raise KeyboardInterrupt
        real(self, record)

    monkeypatch.setattr(distill_rl.Run, "log", log_then_die)


def test_sft_resume_equals_uninterrupted_run(data_dir, monkeypatch):
    sft(data_dir, "--max_iters=6", "--name=straight")
    interrupt_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        sft(data_dir, "--max_iters=6", "--name=resumed", "--ckpt_interval=2")
    monkeypatch.undo()
    assert load_checkpoint(os.path.join(data_dir, "ckpt", "resumed.pt"))["step"] == 4
    sft(data_dir, "--max_iters=6", "--name=resumed", "--ckpt_interval=2", "--resume=True")
    a, b = weights(data_dir, "straight"), weights(data_dir, "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in log(data_dir, "resumed")] == [1, 2, 3, 4, 5, 6]
    stamp = os.path.getmtime(os.path.join(data_dir, "ckpt", "resumed.pt"))
    # finished: nothing trained, nothing written
    sft(data_dir, "--max_iters=6", "--name=resumed", "--resume=True")
    assert os.path.getmtime(os.path.join(data_dir, "ckpt", "resumed.pt")) == stamp


def test_rl_resume_equals_uninterrupted_run(data_dir, monkeypatch):
    sft(data_dir, "--max_iters=4", "--name=base")
    init = f"--init={os.path.join(data_dir, 'ckpt', 'base.pt')}"
    rl(data_dir, init, "--rl_steps=3", "--name=rl_straight")
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        rl(data_dir, init, "--rl_steps=3", "--name=rl_resumed", "--ckpt_interval=1")
    monkeypatch.undo()
    rl(data_dir, init, "--rl_steps=3", "--name=rl_resumed", "--ckpt_interval=1", "--resume=True")
    a, b = weights(data_dir, "rl_straight"), weights(data_dir, "rl_resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = log(data_dir, "rl_straight")[0]
    # pi_theta == pi_old == pi_ref at step 1
    assert first["kl"] == 0.0 and first["clip_frac"] == 0.0
    # resuming a finished run trains nothing: no difficulty filter, the checkpoint and log untouched
    path = os.path.join(data_dir, "ckpt", "rl_resumed.pt")
    before, stamp, lines = (
        open(path, "rb").read(),
        os.path.getmtime(path),
        log(data_dir, "rl_resumed"),
    )
    monkeypatch.setattr(
        distill_rl, "difficulty_filter", lambda *a, **k: pytest.fail("filtered again")
    )
    rl(data_dir, init, "--rl_steps=3", "--name=rl_resumed", "--resume=True")
    assert open(path, "rb").read() == before and os.path.getmtime(path) == stamp
    assert log(data_dir, "rl_resumed") == lines


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, monkeypatch):
    real, calls = distill_rl.sft_loss, []

    def nan_on_second_step(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(distill_rl, "sft_loss", nan_on_second_step)
    with pytest.raises(
        SystemExit,
        match=r"loss nan .* at step 2; the last good checkpoint .*nan_run.pt\) is intact",
    ):
        sft(data_dir, "--max_iters=4", "--name=nan_run", "--ckpt_interval=1", "--eval_interval=100")
    assert load_checkpoint(os.path.join(data_dir, "ckpt", "nan_run.pt"))["step"] == 1


def test_bad_config_is_refused(data_dir):
    with pytest.raises(SystemExit, match="--algo=ppo is not one of reinforce, grpo, exgrpo"):
        rl(data_dir, "--algo=ppo")
    with pytest.raises(SystemExit, match="data_fraction"):
        sft(data_dir, "--data_fraction=0")


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# run under torchrun: train, then each rank writes a digest of its final weights
DDP_SCRIPT = """
import hashlib, os, sys
sys.path.insert(0, {root!r})
import distill_rl
model = distill_rl.main(sys.argv[1:])
weights = b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())
digest = hashlib.sha256(weights).hexdigest()
open(os.path.join({out!r}, "digest_" + os.environ["RANK"]), "w").write(digest)
"""


def test_ddp_two_processes_agree(data_dir, tmp_path):
    """Each rank draws its own batches; DDP's gradient averaging must leave both with bitwise the
    same weights (without it they would drift apart)."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(root=ROOT, out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(script),
            f"--out_dir={data_dir}",
            "--stage=sft",
            "--data=ei",
            "--batch_size=8",
            "--max_iters=2",
            "--name=ddp",
            "--eval_interval=100",
            *NANO,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "digest_0").read_text() == (tmp_path / "digest_1").read_text()


def test_short_sft_then_exgrpo_raises_reward(tmp_path):
    """A barely trained student (80 SFT steps) on four coin questions: EXGRPO's outcome reward
    on those questions rises (mostly by learning to finish with "The answer is X.")."""
    import invert

    out = str(tmp_path)
    invert.build(
        invert.Config(out_dir=out, worlds="coin", n_train=256, n_val=16, n_test=8, n_ood=8)
    )
    nano = [
        "--n_layer=2",
        "--n_head=2",
        "--n_embd=48",
        "--block_size=768",
        "--threads=1",
        "--device=cpu",
        "--seed=1",
        "--max_new_tokens=32",
        "--eval_problems=16",
    ]
    distill_rl.main(
        [
            f"--out_dir={out}",
            "--stage=sft",
            "--data=ei",
            "--batch_size=16",
            "--max_iters=80",
            "--warmup_iters=10",
            "--eval_interval=1000",
            *nano,
        ]
    )
    distill_rl.main(
        [
            f"--out_dir={out}",
            "--stage=rl",
            "--algo=exgrpo",
            "--k=1",
            "--rl_batch_size=4",
            "--group_size=16",
            "--data_fraction=0.015625",
            "--difficulty=False",
            "--rl_lr=2e-3",
            "--rl_warmup=1",
            "--rl_steps=25",
            "--beta=0.0",
            f"--init={out}/ckpt/sft_ei.pt",
            *nano,
        ]
    )
    acc = [r["acc_full"] for r in log(out, "rl_exgrpo")]
    first, last = sum(acc[:5]) / 5, sum(acc[-10:]) / 10
    assert last > first + 0.05, (first, last)


def test_rollout_masks_and_scenario_b_flags():
    """grad_probe_answers=False trains only the final answer; partial_gradient=True adds the
    Scenario B rows with their own advantages. Masks never cover prompt tokens."""
    import random

    texts = [
        "Q: Is the coin heads up? Which side is up first?\nA:",
        " The answer is yes. no heads tails.",
    ]
    tok = CompactTokenizer.from_texts(texts)
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=tok.n_vocab, block_size=256)
    ).eval()
    probe = {
        "rule": "decompose",
        "question": "Which side is up first?",
        "rationale": "heads. The answer is heads.",
        "answer": "heads",
    }
    records = [
        {"world": "coin", "question": "Is the coin heads up?", "answer": "yes", "probes": [probe]}
    ] * 2
    Q, G = 2, 3
    for grad_probes, partial in ((True, False), (False, True)):
        cfg = Config(
            algo="exgrpo",
            k=1,
            group_size=G,
            max_new_tokens=6,
            grad_probe_answers=grad_probes,
            partial_gradient=partial,
        )
        batch = distill_rl.rollout_batch(model, tok, records, cfg, random.Random(0), "cpu")
        n_rows = 2 * Q * G if partial else Q * G
        assert len(batch.rows) == len(batch.masks) == len(batch.adv) == n_rows
        q_prompt = prompt_ids(tok, records[0]["question"])
        for row, mask in zip(batch.rows, batch.masks):
            assert len(row) == len(mask)
            start = max(
                i
                for i in range(len(row) - len(q_prompt) + 1)
                if row[i : i + len(q_prompt)] == q_prompt
            )
            end = start + len(q_prompt)  # the final answer starts after the last copy of Q's prompt
            assert not any(mask[start:end])
            if not grad_probes:
                assert not any(mask[:end]) and all(mask[end:])


# ---------------------------------------------------------------------------------------------
# the DSU bonus must act: Scenario A and B share one group


@pytest.mark.parametrize("algo", ["grpo", "reinforce"])
def test_scale_rewards_divides_by_the_group_std_or_not(algo, monkeypatch):
    """scale_rewards=group divides the centred rewards by the group's std, none leaves them
    centred; reinforce's baseline is the group mean alone, whatever the flag says."""
    import random

    monkeypatch.setattr(
        distill_rl, "is_correct", lambda world, text, gold, q=None: sum(map(ord, text)) % 2 == 0
    )
    tok = CompactTokenizer.from_texts(["Q: Is the coin heads up?\nA:", " The answer is yes."])
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=tok.n_vocab, block_size=64))
    records = [{"world": "coin", "question": "Is the coin heads up?", "answer": "yes"}] * 3
    advantages = {}
    for scale in ("group", "none"):
        cfg = Config(algo=algo, group_size=4, max_new_tokens=6, scale_rewards=scale)
        batch = distill_rl.rollout_batch(model.eval(), tok, records, cfg, random.Random(0), "cpu")
        centred = batch.correct_full - batch.correct_full.mean(1, keepdim=True)
        advantages[scale] = batch.adv.view(3, 4)
        assert centred.abs().sum() > 0  # mixed groups: the flag has something to act on
    std = batch.correct_full.std(1, unbiased=False, keepdim=True)
    assert torch.equal(advantages["none"], centred)
    expected = centred if algo == "reinforce" else centred / (std + 1e-4)
    torch.testing.assert_close(advantages["group"], expected, rtol=0, atol=1e-6)


def test_ei_mix_sets_the_share_of_original_questions(data_dir):
    """ei_mix = 1: every EI-SFT batch is original questions, drawn as vanilla SFT draws them, so
    the losses are vanilla SFT's; at 0.5 half the batch is EI dialogues and they differ."""
    losses = {}
    for name, flags in {
        "mix_qa": ["--data=qa"],
        "mix_one": ["--data=ei", "--ei_mix=1.0"],
        "mix_half": ["--data=ei", "--ei_mix=0.5"],
    }.items():
        sft(data_dir, "--max_iters=2", f"--name={name}", "--eval_interval=100", *flags)
        losses[name] = [r["loss"] for r in log(data_dir, name)]
    assert losses["mix_one"] == losses["mix_qa"]
    assert losses["mix_half"] != losses["mix_qa"]


def test_joint_group_lifts_correct_full_rollouts_when_the_bonus_fires():
    """P_full 0.5 > P_partial 0.25: the bonus fires. Joint group of 8 = A's [1, 1, 0, 0] and B's
    [1, 0, 0, 0]: without the bonus mean 0.375, std sqrt(0.375 * 0.625), so a correct A rollout gets
    0.625 / 0.4841 = 1.291; with it A is [1.5, 1.5, 0, 0], mean 0.5, std sqrt(0.4375), and it gets
    1.0 / 0.6614 = 1.512. With A alone as the group the bonus only rescales it and cancels."""
    full, partial = torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]])

    def adv_a(**flags):
        cfg = Config(delta=0.5, nu=1.0, **flags)
        return distill_rl.scenario_advantages(full, partial, cfg, "group").adv_full[0]

    plain, bonus = adv_a(dsu_bonus=False), adv_a(dsu_bonus=True)
    assert plain[0].item() == pytest.approx(0.625 / (0.375 * 0.625) ** 0.5, abs=1e-3)
    assert bonus[0].item() == pytest.approx(1.0 / 0.4375**0.5, abs=1e-3)
    assert bonus[2].item() == pytest.approx(-0.5 / 0.4375**0.5, abs=1e-3)  # wrong A rollouts: lower
    old_plain, old_bonus = (
        adv_a(dsu_bonus=False, adv_group="scenario"),
        adv_a(dsu_bonus=True, adv_group="scenario"),
    )
    assert (old_bonus - old_plain).abs().max() < 3e-4


def update_gap(out_dir, init, adv_group, monkeypatch):
    """||w(bonus) - w(no bonus)|| / ||w(no bonus) - w(init)|| after 4 RL steps from one student.
    The reward is a fixed function of the answer's length, so groups are mixed from the start."""
    monkeypatch.setattr(
        distill_rl, "is_correct", lambda world, text, gold, q=None: len(text) % 3 == 0
    )
    ends = {}
    for bonus in (True, False):
        name = f"gap_{adv_group}_{bonus}"
        rl(
            out_dir,
            init,
            "--rl_steps=4",
            f"--name={name}",
            f"--dsu_bonus={bonus}",
            f"--adv_group={adv_group}",
            "--group_size=4",
            "--beta=0.0",
            "--aux_coef=0.0",
        )
        ends[bonus] = weights(out_dir, name)
        fire_rates = [r["dsu_fire_rate"] for r in log(out_dir, name)]
        assert sum(fire_rates) > 0 if bonus else fire_rates == [None] * 4  # no bonus: nothing fires
    start = load_checkpoint(init.removeprefix("--init="))["model"]
    norm = lambda d: sum(float((d[k] ** 2).sum()) for k in d) ** 0.5
    return norm({k: ends[True][k] - ends[False][k] for k in start}) / norm(
        {k: ends[False][k] - start[k] for k in start}
    )


def test_dsu_share_by_hand():
    """G = 2. Full [1, 0] vs partial [0, 0] fires, but the joint group [1.5, 0, 0, 0] normalises to
    the advantages of [1, 0, 0, 0]: share 0. Full [1, 1] vs partial [1, 0]: the group
    [1.5, 1.5, 1, 0] has mean 1 and std sqrt(0.375), so A's advantages are 0.5 / 0.6124 = 0.8165
    against 0.25 / 0.4330 = 0.5774 without the bonus: share 1 - 0.5774 / 0.8165 = 1 - 1/sqrt(2)."""
    cfg = Config(algo="exgrpo", delta=0.5, nu=1.0)
    for full, partial, share in (
        ([[1.0, 0.0]], [[0.0, 0.0]], 0.0),
        ([[1.0, 1.0]], [[1.0, 0.0]], 1 - 2**-0.5),
    ):
        full, partial = torch.tensor(full), torch.tensor(partial)
        adv_a = distill_rl.scenario_advantages(full, partial, cfg, "group").adv_full
        assert distill_rl.dsu_share(full, partial, adv_a, cfg, "group") == pytest.approx(
            share, abs=1e-3
        )


def test_two_runs_differing_only_in_the_bonus_end_apart(data_dir, monkeypatch):
    sft(data_dir, "--max_iters=4", "--name=gap_base")
    init = f"--init={os.path.join(data_dir, 'ckpt', 'gap_base.pt')}"
    joint, scenario = (
        update_gap(data_dir, init, "joint", monkeypatch),
        update_gap(data_dir, init, "scenario", monkeypatch),
    )
    assert joint > 0.05  # measured 0.094: the bonus moves the update
    # measured 2e-5: with A alone as the group it cancels, which is why it is joint
    assert scenario < 1e-3
