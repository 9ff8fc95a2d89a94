"""
See EXGRPO act: the first RL step a run of distill_rl.py would take from a checkpoint, shown for a
few of its questions, with no update. It calls distill_rl.py's own functions (the question draw,
rollout_batch, scenario_advantages): nothing here re-implements the method.

For each question it prints
  - P_full and P_partial (the accuracies of Scenarios A and B) and whether the DSU bonus fired;
  - every Scenario A and B rollout: the EI probes, the student's answers and its final answer,
    with the tokens that get gradient between [[ and ]];
  - each rollout's outcome reward R (plus delta where the bonus paid it) and its advantage U,
    with the bonus and without it.

    python scripts/show_rl_step.py --init=out/default/ckpt/sft_ei.pt --out_dir=out/default
    python scripts/show_rl_step.py --init=... --out_dir=... --questions=3 --dsu_bonus=False

Every distill_rl.py flag applies (--seed, --group_size, --k, --delta, --nu, ...); --difficulty=True
runs Eq. 2 first, as the RL stage does (slower: it answers every probe of the candidates).
"""

import os
import random
import sys
from dataclasses import dataclass, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distill_rl  # noqa: E402  (the repository root is on the path only from here on)
from configurator import cli, mixed_precision, parse_config, pick_device, set_threads  # noqa: E402
from training import init_student, load_data  # noqa: E402


@dataclass
class Config(distill_rl.Config):
    questions: int = 2  # questions of the step to show
    rollouts: int = 3  # rollouts shown per scenario (of group_size)
    difficulty: bool = False  # run Eq. 2 first, as the RL stage does (slower)


@dataclass
class StepView:
    """The first RL step, as train_rl would sample it, and what the bonus did to it."""

    records: list  # the step's questions
    batch: distill_rl.RolloutBatch  # rollout_batch's output
    adv_full: torch.Tensor  # (Q, G) Scenario A's advantages, as trained
    adv_partial: torch.Tensor  # (Q, G) Scenario B's advantages (no gradient by default)
    adv_full_no_bonus: torch.Tensor  # (Q, G) Scenario A's advantages had the bonus been off


def first_step(cfg, model, tok, device):
    """Step 0 of train_rl: the same question draw, the same rollout seed, the same functions."""
    train, _ = load_data(cfg)
    with mixed_precision(device, cfg.dtype):
        pool, _ = distill_rl.rl_questions(cfg, train, model, tok, rank=0)
        records = random.Random(f"{cfg.seed}-0").sample(pool, cfg.rl_batch_size)
        rng = random.Random(f"{cfg.seed}-0-0")
        batch = distill_rl.rollout_batch(model, tok, records, cfg, rng, device)
    scale = distill_rl.reward_scale(cfg)
    full, partial = batch.correct_full, batch.correct_partial
    with_bonus = distill_rl.scenario_advantages(full, partial, cfg, scale)
    no_bonus = distill_rl.scenario_advantages(full, partial, replace(cfg, dsu_bonus=False), scale)
    return StepView(records, batch, with_bonus.adv_full, with_bonus.adv_partial, no_bonus.adv_full)


def marked(tok, tokens, writer, trained):
    """A rollout's text, one turn a line, the tokens that get gradient between [[ and ]]."""
    out, span, span_trained = [], [], None

    def flush():
        if span:
            text = tok.decode([t for t in span if t != tok.eot])
            out.append(f"[[{text}]]" if span_trained else text)

    for token, who in zip(tokens, writer):
        is_trained = trained and who in trained
        if is_trained != span_trained:
            flush()
            span, span_trained = [], is_trained
        span.append(token)
        if token == tok.eot:  # one turn a line
            flush()
            out.append("\n")
            span = []
    flush()
    return "".join(out).replace("\n ", "\n").strip().replace("\n", "\n      ")


def show(view, cfg, tok):
    """The step as text."""
    b, G = view.batch, cfg.group_size
    trained = {distill_rl.FINAL_ANSWER}
    if cfg.grad_probe_answers:
        trained.add(distill_rl.PROBE_ANSWER)
    n_a = len(view.records) * G
    lines = [
        f"One RL step ({cfg.algo}, G = {G} rollouts per scenario, k = {cfg.k} EI probes, "
        f"DSU bonus {'on, delta = %g, nu = %g' % (cfg.delta, cfg.nu) if cfg.dsu_bonus else 'off'}, "
        "no update). [[...]]: the tokens that get gradient.",
    ]
    for q, record in enumerate(view.records[: cfg.questions]):
        p_full = b.correct_full[q].mean().item()
        p_partial = b.correct_partial[q].mean().item() if b.correct_partial.numel() else None
        lines += [
            "",
            f"== question {q + 1} ({record['world']}); the gold answer: {record['answer']}",
        ]
        if p_partial is not None:
            fired = bool(b.fired[q])
            verdict = "fires" if fired else "does not fire"
            if not cfg.dsu_bonus:
                verdict = "is off"
            lines.append(
                f"P_full = {p_full:.2f}, P_partial = {p_partial:.2f}: the DSU bonus {verdict}"
                + (f" (+{cfg.delta:g} to each correct Scenario A rollout)" if fired else "")
            )
        scenarios = [("Scenario A (full dialogue)", 0, view.adv_full, view.adv_full_no_bonus)]
        if p_partial is not None:
            scenarios.append(("Scenario B (partial dialogue)", n_a, view.adv_partial, None))
        for name, offset, adv, adv_plain in scenarios:
            is_a = offset == 0
            gets_gradient = is_a or cfg.partial_gradient
            note = "" if gets_gradient else ": no gradient, it estimates P_partial and the baseline"
            lines.append(f"-- {name}{note}")
            for g in range(min(cfg.rollouts, G)):
                row = offset + q * G + g
                correct = (b.correct_full if is_a else b.correct_partial)[q, g].item()
                reward = b.rewards_full[q, g].item() if is_a else correct
                u = f"U = {adv[q, g].item():+.3f}"
                if adv_plain is not None and cfg.dsu_bonus:
                    u += f" (without the bonus {adv_plain[q, g].item():+.3f})"
                rollout = b.rollouts
                text = marked(
                    tok,
                    rollout.tokens[row],
                    rollout.writer[row],
                    trained if gets_gradient else None,
                )
                lines.append(f"  {g + 1}. R = {reward:g}, {u}")
                lines.append(f"      {text}")
    return "\n".join(lines)


def main(argv):
    cfg = parse_config(Config(stage="rl"), argv)
    if cfg.init == "scratch":
        raise SystemExit("--init=<checkpoint.pt> is required: the step starts from a student")
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tok = init_student(cfg, device)
    model.eval()
    text = show(first_step(cfg, model, tok, device), cfg, tok)
    print(text)
    return text


if __name__ == "__main__":
    cli(main)
