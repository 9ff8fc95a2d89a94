"""scripts/show_rl_step.py shows train_rl's first step through distill_rl.py's own functions: its
advantages, with the bonus and without it, are those of rollout_batch and scenario_advantages for
the same seed, and its text shows both scenarios, P_full and P_partial, and the trained tokens."""

import os
import random
import sys
from dataclasses import replace

import pytest
import torch

import distill_rl
import invert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import show_rl_step  # noqa: E402

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=768", "--threads=1"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("show"))
    invert.build(invert.Config(out_dir=out, worlds="coin", n_train=32, n_val=8, n_test=8, n_ood=8))
    distill_rl.main([f"--out_dir={out}", "--stage=sft", "--data=ei", "--max_iters=2", *TINY])
    return out


def test_the_view_is_the_rl_step(student, monkeypatch):
    # a reward that is a fixed function of the answer's text: mixed groups from a fresh student
    monkeypatch.setattr(
        distill_rl, "is_correct", lambda world, text, gold, q=None: sum(map(ord, text)) % 2 == 0
    )
    argv = [f"--out_dir={student}", f"--init={student}/ckpt/sft_ei.pt", "--rl_batch_size=4"]
    argv += ["--group_size=4", "--k=2", "--max_new_tokens=16", "--seed=1", *TINY]
    cfg = show_rl_step.parse_config(show_rl_step.Config(stage="rl"), argv)
    model, tok = show_rl_step.init_student(cfg, "cpu")
    torch.manual_seed(cfg.seed)
    view = show_rl_step.first_step(cfg, model.eval(), tok, "cpu")

    # the same step, from distill_rl.py directly: train_rl's draw and seeds for step 0
    train, _ = distill_rl.load_data(cfg)
    pool, _ = distill_rl.rl_questions(cfg, train, model, tok, rank=0)
    records = random.Random(f"{cfg.seed}-0").sample(pool, cfg.rl_batch_size)
    batch = distill_rl.rollout_batch(
        model, tok, records, cfg, random.Random(f"{cfg.seed}-0-0"), "cpu"
    )
    assert [r["id"] for r in view.records] == [r["id"] for r in records]
    assert torch.equal(view.adv_full.reshape(-1), batch.adv)
    no_bonus = replace(cfg, dsu_bonus=False)
    plain = distill_rl.scenario_advantages(
        batch.correct_full, batch.correct_partial, no_bonus, "group"
    )
    assert torch.equal(view.adv_full_no_bonus, plain.adv_full)
    # teeth: the bonus fired on this step and moved some advantage
    assert batch.fired.any() and not torch.equal(view.adv_full, view.adv_full_no_bonus)

    text = show_rl_step.show(view, replace(cfg, questions=4), tok)
    for shown in ("Scenario A (full dialogue)", "Scenario B (partial dialogue)", "P_full = "):
        assert shown in text
    assert "the DSU bonus fires" in text and "without the bonus" in text and "[[" in text
