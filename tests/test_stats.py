"""stats.py against hand computations: the spread over seeds, paired differences matched by run
folder, the paired bootstrap on draws whose distribution is known, the rise of a logged value, the
two-way ANOVA of the differences and the minimum detectable effect it implies."""

import numpy as np
import pytest

import stats
from stats import Interval, Rise, Spread


def test_spread_by_hand():
    # 0.5 and 1.0: mean 0.75, sample std |a - b| / sqrt(2); a seed without a value does not count
    s = stats.spread([0.5, None, 1.0])
    assert (s.mean, s.n) == (0.75, 2) and s.std == pytest.approx(0.5 / 2**0.5, abs=1e-15)
    assert stats.spread([0.3]) == Spread(0.3, 0.0, 1)  # one seed: no spread
    assert stats.spread([None, None]) is None


def test_paired_diffs_match_run_folders_and_cut_to_the_common_problems():
    a = {
        "s1": {"test_id": "110", "ood_long": "01"},
        "s2": {"test_id": "1111", "ood_long": "1"},
        "s3": {"test_id": "111", "ood_long": "11"},  # no s3 in b: left out
    }
    b = {"s2": {"test_id": "0000", "ood_long": "0"}, "s1": {"test_id": "010", "ood_long": "11"}}
    # test_id cut to 3 problems (s1 has 3), ood_long to 1 (s2 has 1); rows in a's order:
    # s1 1-0 1-1 0-0 | 0-1,  s2 1-0 1-0 1-0 | 1-0
    d = stats.paired_diffs(a, b, ["test_id", "ood_long"])
    assert d.tolist() == [[1, 0, 0, -1], [1, 1, 1, 1]]
    assert stats.paired_diffs(a, b, ["ood_long"]).tolist() == [[-1], [1]]
    assert stats.paired_diffs(a, {"s9": b["s1"]}, ["test_id"]) is None  # no common seed
    assert stats.paired_diffs(a, {"s1": {"test_id": ""}}, ["test_id"]) is None  # no problem left


def test_paired_interval_is_the_bootstrap_of_the_paired_diffs():
    a, b = {"s1": {"t": "1100"}, "s2": {"t": "1110"}}, {"s1": {"t": "0100"}, "s2": {"t": "0110"}}
    d = np.array([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=float)
    assert stats.paired_interval(a, b, ["t"]) == stats.paired_bootstrap(d)
    assert stats.paired_interval(a, {"s3": b["s1"]}, ["t"]) is None


def test_paired_bootstrap_by_hand():
    assert stats.paired_bootstrap(np.zeros((3, 5))) == Interval(0.0, 0.0, 0.0)
    assert stats.paired_bootstrap(np.ones((2, 4))) == Interval(1.0, 1.0, 1.0)
    # one seed, two problems d = (1, 0): a resample of the problems has mean 0, 1/2 or 1 with
    # probabilities 1/4, 1/2, 1/4, so 2.5% of the draws lie at each end: the interval is [0, 1]
    assert stats.paired_bootstrap(np.array([[1.0, 0.0]])) == Interval(0.5, 0.0, 1.0)
    # the seeds are resampled as well: two seeds of one problem, d = +1 and -1, the same law
    assert stats.paired_bootstrap(np.array([[1.0], [-1.0]])) == Interval(0.0, -1.0, 1.0)
    d = np.array([[1, 0, 0, -1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 1, -1, 0]], dtype=float)  # mean 4/16
    ci = stats.paired_bootstrap(d)
    assert ci.mean == 4 / 16 and -1 < ci.lo < ci.mean < ci.hi < 1 and not ci.excludes_zero()
    assert stats.paired_bootstrap(d) == ci  # seeded: the same interval every time
    wide = stats.paired_bootstrap(d[:, :4])
    assert wide.hi - wide.lo > ci.hi - ci.lo  # fewer problems, a wider interval


def test_interval_excludes_zero():
    assert Interval(0.2, 0.1, 0.3).excludes_zero() and Interval(-0.2, -0.3, -0.1).excludes_zero()
    assert not Interval(0.1, 0.0, 0.2).excludes_zero()  # an end at 0 does not exclude it
    assert not Interval(0.0, -0.1, 0.1).excludes_zero()


def test_rise_by_hand():
    # 20% of 10 steps = 2: first window (0, 0), last (1, 1)
    step_up = [0, 0, 1, 0, 0, 1, 1, 0, 1, 1]
    assert stats.rise([step_up]) == Rise(0.0, 1.0, Interval(1.0, 1.0, 1.0))
    flat = [0.5] * 10
    up = stats.rise([step_up, flat])
    assert (up.first, up.last, up.change.mean) == (0.25, 0.75, 0.5)
    # resampling the two run folders spreads the rise between 0 and 1
    assert 0 <= up.change.lo < up.change.mean < up.change.hi <= 1
    # windows of 4: means 0.5 and 0.5, no rise, and the resampled steps straddle 0
    noisy = [0, 1] * 5 + [1, 0] * 5
    flat_noise = stats.rise([noisy]).change
    assert flat_noise.mean == 0 and flat_noise.lo < 0 < flat_noise.hi


def test_variance_components_by_hand():
    d = np.array([[3, 0, 1, 0], [3, 1, 2, 2], [3, 2, 0, 1]], dtype=float)  # S = 3, P = 4
    # seed means 1, 2, 1.5; problem means 3, 1, 1, 1; grand mean 18/12 = 1.5
    # MS_S = 4 * (0.25 + 0.25 + 0) / 2 = 1;  MS_P = 3 * (2.25 + 3 * 0.25) / 3 = 3
    # residuals d - seed - problem + grand: rows (.5, -.5, .5, -.5), (-.5, -.5, .5, .5),
    # (0, 1, -1, 0); sum of squares 1 + 1 + 2 = 4 over (3 - 1)(4 - 1) = 6: MS_E = 2/3
    # var_seed = (1 - 2/3) / 4 = 1/12, var_problem = (3 - 2/3) / 3 = 7/9, var_residual = 2/3;
    # 9 of the 12 (seed, problem) pairs are answered apart (d != 0: 2, 4 and 3 per seed)
    c = stats.variance_components(d)
    assert (c.seeds, c.problems, c.differ) == (3, 4, 9)
    mean_squares = (c.ms_seed, c.ms_problem, c.ms_residual)
    variances = (c.var_seed, c.var_problem, c.var_residual)
    assert c.mean == pytest.approx(1.5, abs=1e-12)
    assert mean_squares == pytest.approx((1, 3, 2 / 3), abs=1e-12)
    assert variances == pytest.approx((1 / 12, 7 / 9, 2 / 3), abs=1e-12)
    # V(3, 4) = (1/12)/3 + (7/9)/4 + (2/3)/12 = (1 + 7 + 2)/36;
    # z_0.975 + z_0.80 = 1.959964 + 0.841621
    assert stats.Z_POWER == pytest.approx(2.801585, abs=1e-6)
    assert stats.mde(c, 3, 4) == pytest.approx(stats.Z_POWER * (10 / 36) ** 0.5, abs=1e-12)
    # more seed than problem agreement: MS_S = MS_P = 0 < MS_E = 1 (residuals +-1/2 over 1 df);
    # both components clip to 0
    c = stats.variance_components(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert (c.var_seed, c.var_problem, c.var_residual) == (0.0, 0.0, 1.0)
    # one seed: no seed component, no MDE
    one = stats.power(np.ones((1, 5)), n_splits=1)
    assert one.var_seed is None and one.mde is None and one.grid is None and one.mean == 1.0


def test_variance_components_recover_a_known_truth():
    """0/1 answers of two rows on S = 200 seeds x P = 400 problems: row A right with probability
    0.5 + u_s + v_p (u_s = +-0.1: seed variance 0.01; v_p = +-0.2: problem variance 0.04), row B
    with probability 0.5 on its own. The residual is the coin flips' variance: E[pi (1 - pi)] for
    A, 0.25 - 0.01 - 0.04 = 0.20, plus 0.25 for B = 0.45. Sampling error of each estimate is a few
    percent here (the seed component's, from the residual's noise over 200 seeds, about 3%): 10%
    holds."""
    rng = np.random.default_rng(0)
    u = rng.choice([-0.1, 0.1], size=(200, 1))
    v = rng.choice([-0.2, 0.2], size=(1, 400))
    y_a = rng.random((200, 400)) < 0.5 + u + v
    y_b = rng.random((200, 400)) < 0.5
    c = stats.power(y_a.astype(float) - y_b, n_splits=4)
    assert (c.var_seed, c.var_problem, c.var_residual) == pytest.approx((0.01, 0.04, 0.45), rel=0.1)
    truth = stats.Z_POWER * (0.01 / 200 + 0.04 / 400 + 0.45 / (200 * 400)) ** 0.5
    assert c.mde == pytest.approx(truth, rel=0.05)


def test_seed_spread_sets_a_floor_that_more_problems_do_not_lower():
    # each seed shifts every problem alike: d[s, p] = u_s, u = (3, -1, 1, 1), sample variance
    # (4 + 4 + 0 + 0) / 3 = 8/3; nothing else varies. MDE(S', P') = Z sqrt(8/3 / S') for every P'
    seeds_only = stats.power(np.repeat([[3.0], [-1.0], [1.0], [1.0]], 6, axis=1), n_splits=1)
    assert seeds_only.var_seed == pytest.approx(8 / 3, abs=1e-12) and seeds_only.var_residual == 0
    assert list(seeds_only.grid) == list(stats.SEEDS_GRID)
    for s, by_problems in seeds_only.grid.items():
        assert list(by_problems) == [6, 1000, 4000]  # now, then PROBLEMS_GRID x 1 split
        assert list(by_problems.values()) == pytest.approx(
            [stats.Z_POWER * (8 / 3 / s) ** 0.5] * 3, abs=1e-12
        )
    # MDE <= 2 needs 8/3 / S' <= (2 / Z)^2, S' >= 5.23: 6 seeds (5 give 2.05)
    assert seeds_only.seeds_for_target == 6
    # the mirror: each problem shifts every seed alike, v = (2, 0, 0, -2), variance 8/3; more seeds
    # do nothing
    problems_only = stats.power(np.tile([2.0, 0.0, 0.0, -2.0], (3, 1)), n_splits=1)
    assert problems_only.var_seed == 0
    assert problems_only.var_problem == pytest.approx(8 / 3, abs=1e-12)
    assert problems_only.grid[5] == pytest.approx(problems_only.grid[40], abs=1e-12)
    assert problems_only.grid[5][4] == pytest.approx(stats.Z_POWER * (8 / 3 / 4) ** 0.5, abs=1e-12)
    assert problems_only.seeds_for_target == 2
    # a seed term too large for 100 seeds: none reaches the target
    wide = stats.power(np.repeat([[30.0], [-10.0], [10.0], [10.0]], 6, axis=1), n_splits=1)
    assert wide.seeds_for_target is None  # 800/3 / S' <= (2 / Z)^2 needs S' >= 524
