"""Interval, null and frontier maths on hand-made arms (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steer_heal import stats
from steer_heal.data import FOUNDATIONS


def _arm(seed: int, n: int = 40, shift: float = 0.0) -> stats.Arm:
    g = np.random.default_rng(seed)
    logits = g.normal(size=(n, 7))
    logits[:, FOUNDATIONS.index("Authority")] += shift
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return stats.Arm(p=p, mass=g.uniform(0.4, 0.9, n), labels=[FOUNDATIONS[i % 7] for i in range(n)],
                     ids=[str(i) for i in range(n)])  # fmt: skip


def test_identical_arms_have_a_zero_width_interval_at_zero():
    a, idx = _arm(0), stats.resamples(40, 1000, 0)
    d = stats.paired_deltas(a, a, "Authority", idx)
    assert d["dTrait"] == {"est": 0.0, "lo": 0.0, "hi": 0.0} and d["dCoh"] == {"est": 0.0, "lo": 0.0, "hi": 0.0}


def test_different_arms_have_an_interval_of_positive_width_around_the_estimate():
    base, arm, idx = _arm(0), _arm(0, shift=-0.5), stats.resamples(40, 1000, 0)
    arm.mass = arm.mass * 0.9
    d = stats.paired_deltas(arm, base, "Authority", idx)
    assert d["dTrait"]["lo"] < d["dTrait"]["est"] < d["dTrait"]["hi"] < 0  # a real, paired move down
    assert d["dCoh"]["hi"] - d["dCoh"]["lo"] > 0


def test_intervals_are_paired():
    """The same draws for both arms: a constant shift of every vignette's log p has no sampling noise."""
    base = _arm(1)
    arm = stats.Arm(base.p.copy(), base.mass.copy(), base.labels, base.ids)
    j = FOUNDATIONS.index("Authority")
    arm.p[:, j] *= 0.5  # halve every vignette's p(Authority): dTrait = log 0.5 on every resample
    d = stats.paired_deltas(arm, base, "Authority", stats.resamples(40, 500, 3))
    assert d["dTrait"]["lo"] == pytest.approx(math.log(0.5)) and d["dTrait"]["hi"] == pytest.approx(math.log(0.5))


def test_frontier_interpolation_is_exact_on_a_monotone_curve():
    xs = np.array([0.7, 0.6, 0.4, 0.2])
    ys = np.array([0.0, 1.0, 2.0, 4.0])  # y falls as x rises: every point is on the frontier
    assert stats.frontier_at(xs, ys, 0.5) == pytest.approx(1.5)
    assert stats.frontier_at(xs, ys, 0.3) == pytest.approx(3.0)
    assert stats.frontier_at(xs, ys, 0.9) == 0.0 and stats.frontier_at(xs, ys, 0.1) == 4.0  # held at the ends


def test_the_steering_curves_own_points_have_zero_advantage():
    xs, ys = np.array([0.71, 0.58, 0.35, 0.10]), np.array([0.0, 0.96, 2.0, 2.7])
    assert all(stats.advantage(x, y, xs, ys) == 0.0 for x, y in zip(xs, ys))
    assert stats.advantage(0.5, 2.0, xs, ys) > 0 and stats.advantage(0.5, 0.5, xs, ys) < 0


def test_frontier_drops_dominated_points():
    fx, fy = stats.frontier(np.array([0.7, 0.6, 0.5, 0.4]), np.array([0.0, 1.0, 0.5, 2.0]))
    assert fx.tolist() == [0.4, 0.6, 0.7] and fy.tolist() == [2.0, 1.0, 0.0]  # (0.5, 0.5) is beaten by (0.6, 1.0)


def test_null_percentile():
    null = [0.3, -0.1, 0.5, 0.0, -0.2, 0.1, 0.2, -0.3]
    assert stats.null_position(-1.0, null, sign=-1)["percentile"] == 1.0  # beyond every draw, persona's way
    assert stats.null_position(1.0, null, sign=-1)["percentile"] == 0.0
    assert stats.null_position(0.05, null, sign=+1)["percentile"] == pytest.approx(4 / 8)


def test_t_interval():
    t = stats.t_interval([1.0, 2.0, 3.0])
    assert t["mean"] == 2.0 and t["sd"] == 1.0
    assert t["hi"] - 2.0 == pytest.approx(4.303 / math.sqrt(3))
    assert stats.t_interval([1.0])["lo"] is None and stats.t975(40) == pytest.approx(2.021, abs=1e-3)


def test_specificity_and_anti_steerable():
    base = _arm(2)
    arm = stats.Arm(base.p.copy(), base.mass, base.labels, base.ids)
    arm.p[:, FOUNDATIONS.index("Authority")] *= 0.3  # only the target moves, the persona's way (sign -1)
    idx = stats.resamples(40, 200, 0)
    assert stats.specificity(arm, base, "Authority", -1, idx)["est"] == pytest.approx(-math.log(0.3))
    assert stats.anti_steerable(arm, base, "Authority", -1) == 0.0
    assert stats.anti_steerable(base, arm, "Authority", -1) == 1.0  # the reverse move is the wrong way everywhere
