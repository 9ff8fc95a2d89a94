"""
The statistics of the report: what separates two rows, and what a study of S seeds and P problems
can resolve. Every comparison is paired: two checkpoints trained with the same seed and scored on
the same problems give one difference in correctness for each (seed, problem).

    spread               mean ± sample std of a value over seeds
    paired_diffs         the (seeds, problems) differences between two rows
    paired_bootstrap     their mean with a 95% interval, resampling seeds and problems
    rise                 how far a logged value rose over training, with a 95% interval
    variance_components  the two-way ANOVA of the differences: seed, problem and residual
    mde, power           the minimum detectable effect at 80% power, now and for other study sizes

numpy and the standard library only: the report (evaluate.py) calls these, never the reverse.
"""

import statistics
from dataclasses import dataclass

import numpy as np

# 80% power at two-sided 5%: a true difference of Z_POWER standard errors is found 80% of the time
Z_POWER = statistics.NormalDist().inv_cdf(0.975) + statistics.NormalDist().inv_cdf(0.80)
SEEDS_GRID, PROBLEMS_GRID = (5, 10, 20, 40), (1000, 4000)  # seeds; problems per split
MDE_TARGET = 2.0  # points: the detectable effect the study is sized for


@dataclass(frozen=True)
class Spread:
    """A value over the seeds that have it: mean, sample std (0 for one seed) and how many."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% percentile interval [lo, hi]."""

    mean: float
    lo: float
    hi: float

    def excludes_zero(self):
        return not self.lo <= 0 <= self.hi


@dataclass(frozen=True)
class Rise:
    """How far a logged value rose: the means of its first and last windows, and last - first with
    its interval."""

    first: float
    last: float
    change: Interval


@dataclass(frozen=True)
class VarianceComponents:
    """The two-way ANOVA of paired differences d[s, p] (see variance_components). differ counts the
    (seed, problem) pairs answered apart (one row right, the other wrong). The mean squares and the
    variances are None when S or P is 1: a component cannot be told from the residual then."""

    mean: float
    seeds: int
    problems: int
    differ: int
    ms_seed: float | None = None
    ms_problem: float | None = None
    ms_residual: float | None = None
    var_seed: float | None = None
    var_problem: float | None = None
    var_residual: float | None = None


@dataclass(frozen=True)
class Power(VarianceComponents):
    """The variance components with what they imply (see power): the MDE now, the MDE on the grid
    {seeds: {problems: MDE}}, and the fewest seeds that reach MDE_TARGET; None without the seed
    component."""

    mde: float | None = None
    grid: dict | None = None
    seeds_for_target: int | None = None


def spread(values):
    """Spread over the seeds that have a value (None values are skipped); None when none does."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return Spread(
        statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)
    )


def paired_diffs(a, b, splits):
    """(seeds, problems): per-problem correctness of row a minus row b, each given as {run folder:
    {split: "0110..." (1 = right, in data order)}}, matched by run folder (seed), over the problems
    of `splits`, each split cut to the problems every matched folder has (so seeds scored on more
    problems still line up); None when no run folder has both rows or no problem is left."""
    both = [(a[run], b[run]) for run in a if run in b]
    n = (
        {s: min(len(answers[s]) for pair in both for answers in pair) for s in splits}
        if both
        else {}
    )
    rows = [
        [int(x) - int(y) for s in splits for x, y in zip(ra[s][: n[s]], rb[s][: n[s]])]
        for ra, rb in both
    ]
    return np.array(rows, dtype=float) if rows and rows[0] else None


def paired_bootstrap(diffs, n_boot=2000, seed=0):
    """diffs (seeds, problems): per-problem differences in correctness (-1, 0, 1) between two
    checkpoints trained with the same seed and scored on the same problems. Their mean and a 95%
    percentile Interval from resampling seeds and problems with replacement (both paired: a draw
    keeps each seed's two checkpoints and each problem's two answers together)."""
    rng = np.random.default_rng(seed)
    S, P = diffs.shape
    means = [diffs[rng.integers(0, S, S)][:, rng.integers(0, P, P)].mean() for _ in range(n_boot)]
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Interval(float(diffs.mean()), float(lo), float(hi))


def paired_interval(a, b, splits):
    """paired_bootstrap of row a minus row b over the problems of `splits` (the arguments of
    paired_diffs); None when no run folder has both."""
    diffs = paired_diffs(a, b, splits)
    return None if diffs is None else paired_bootstrap(diffs)


def rise(curves, share=0.2, n_boot=2000, seed=0):
    """How far a logged value rose over training: the mean of its last `share` of steps minus the
    mean of its first, averaged over the run folders (one per-step series each). The Rise's interval
    is the 95% percentile interval from resampling run folders and, within each, the steps of both
    windows."""
    rng = np.random.default_rng(seed)
    windows = [
        (np.asarray(c[:w], float), np.asarray(c[-w:], float))
        for c in curves
        for w in [max(1, round(share * len(c)))]
    ]
    first = float(np.mean([start.mean() for start, _ in windows]))
    last = float(np.mean([end.mean() for _, end in windows]))
    resample = lambda x: x[rng.integers(0, len(x), len(x))].mean()
    draws = [
        np.mean(
            [
                resample(end) - resample(start)
                for start, end in (windows[i] for i in rng.integers(0, len(windows), len(windows)))
            ]
        )
        for _ in range(n_boot)
    ]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return Rise(first, last, Interval(last - first, float(lo), float(hi)))


def variance_components(d):
    """d (S seeds, P problems): paired differences y_A[s, p] - y_B[s, p], modelled as two crossed
    random effects without replication, d = mu + a_s + b_p + e_sp: a_s what a seed does to the
    difference (its training run), b_p what a problem does (some are hard for one row only), e_sp
    the rest. The ANOVA (method of moments) estimates, with dbar_s, dbar_p, dbar the seed, problem
    and grand means:
        MS_S = P sum_s (dbar_s - dbar)^2 / (S - 1)
        MS_P = S sum_p (dbar_p - dbar)^2 / (P - 1)
        MS_E = sum_sp (d_sp - dbar_s - dbar_p + dbar)^2 / ((S - 1)(P - 1))
        var_residual = MS_E
        var_seed = max(0, (MS_S - MS_E) / P)
        var_problem = max(0, (MS_P - MS_E) / S)
    (E[MS_S] = sigma_e^2 + P sigma_s^2, E[MS_P] = sigma_e^2 + S sigma_p^2), in the units of d
    squared. With one seed (or one problem) a component cannot be told from the residual: the
    variances are None."""
    S, P = d.shape
    counts = dict(mean=float(d.mean()), seeds=S, problems=P, differ=int((d != 0).sum()))
    if S < 2 or P < 2:
        return VarianceComponents(**counts)
    grand, by_seed, by_problem = d.mean(), d.mean(axis=1), d.mean(axis=0)
    ms_seed = P * ((by_seed - grand) ** 2).sum() / (S - 1)
    ms_problem = S * ((by_problem - grand) ** 2).sum() / (P - 1)
    residuals = d - by_seed[:, None] - by_problem[None, :] + grand
    ms_residual = (residuals**2).sum() / ((S - 1) * (P - 1))
    return VarianceComponents(
        **counts,
        ms_seed=float(ms_seed),
        ms_problem=float(ms_problem),
        ms_residual=float(ms_residual),
        var_seed=max(0.0, float(ms_seed - ms_residual) / P),
        var_problem=max(0.0, float(ms_problem - ms_residual) / S),
        var_residual=float(ms_residual),
    )


def mde(c, seeds, problems):
    """The minimum detectable effect at 80% power and two-sided 5% of a study with `seeds` seeds
    and `problems` problems, from VarianceComponents c: (z_0.975 + z_0.80) sqrt(V), with
    V = var_seed/S' + var_problem/P' + var_residual/(S'P') the variance of the mean difference. More
    problems shrink only the last two terms: the seed term is a floor that only more seeds lower."""
    v = c.var_seed / seeds + c.var_problem / problems + c.var_residual / (seeds * problems)
    return Z_POWER * v**0.5


def power(d, n_splits):
    """The Power of d: variance_components with the MDE now, on a grid of seeds x problems (now,
    and PROBLEMS_GRID per split for each of SEEDS_GRID), and the fewest seeds (2 to 100: one seed
    cannot estimate its own spread) that reach MDE_TARGET with the most problems of the grid (None
    if none does)."""
    c = variance_components(d)
    if c.var_seed is None:
        return Power(**vars(c))
    problems = list(dict.fromkeys([c.problems] + [n * n_splits for n in PROBLEMS_GRID]))
    return Power(
        **vars(c),
        mde=mde(c, c.seeds, c.problems),
        grid={s: {p: mde(c, s, p) for p in problems} for s in SEEDS_GRID},
        seeds_for_target=next(
            (s for s in range(2, 101) if mde(c, s, problems[-1]) <= MDE_TARGET), None
        ),
    )
