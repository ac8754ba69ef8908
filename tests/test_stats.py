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


def _calibrated(arm: stats.Arm, lodds: np.ndarray | None = None) -> stats.Arm:
    lo = np.log(arm.p) - np.log1p(-arm.p) if lodds is None else lodds
    return stats.Arm(arm.p, arm.mass, arm.labels, arm.ids, p_cal=arm.p.copy(), lodds=lo)


def test_discriminative_shift_is_the_difference_in_differences_of_log_odds():
    """Target log-odds up by 0.7 on the Authority-labelled vignettes only: disc = 0.7 exactly, on every resample
    holding one; up by 0.7 everywhere: disc = 0. Unlabelled vignettes count in neither group."""
    base = _calibrated(_arm(3, n=70))
    on = np.array([lab == "Authority" for lab in base.labels])
    j = FOUNDATIONS.index("Authority")
    only_on, everywhere = base.lodds.copy(), base.lodds.copy()
    only_on[on, j] += 0.7
    everywhere[:, j] += 0.7
    idx = stats.resamples(70, 300, 1)
    d = stats.shift("disc", _calibrated(base, only_on), base, "Authority", idx)
    assert d[0] == pytest.approx(0.7) and np.nanmax(np.abs(d[1] - 0.7)) < 1e-9
    d = stats.shift("disc", _calibrated(base, everywhere), base, "Authority", idx)
    assert d[0] == pytest.approx(0.0, abs=1e-12)
    assert stats.shift("disc", _arm(3, n=70), _arm(3, n=70), "Authority", idx) is None  # not calibrated: None
    # half the "rest" unlabelled and moved a lot: they do not enter the difference
    labels = [lab if lab == "Authority" or i % 2 else None for i, lab in enumerate(base.labels)]
    part = stats.Arm(base.p, base.mass, labels, base.ids, base.p, base.lodds)
    moved = base.lodds.copy()
    moved[[lab is None for lab in labels], j] += 5.0
    arm = stats.Arm(base.p, base.mass, labels, base.ids, base.p, moved)
    assert stats.shift("disc", arm, part, "Authority", idx)[0] == pytest.approx(0.0, abs=1e-12)
    unlabelled = stats.Arm(base.p, base.mass, [None] * 70, base.ids, base.p, base.lodds)
    assert stats.shift("disc", unlabelled, unlabelled, "Authority", idx) is None


def test_separation_is_the_item_discrimination_and_disc_is_its_change():
    """separation = mean target log-odds on target-labelled vignettes minus the rest: 0.9 where they sit 0.9
    higher, its interval excludes 0; the discriminative shift is the arm's separation minus base's."""
    base = _calibrated(_arm(6, n=70))
    on, j = np.array([lab == "Authority" for lab in base.labels]), FOUNDATIONS.index("Authority")
    flat = base.lodds.copy()
    flat[:, j] = 0.0
    sharp = flat.copy()
    sharp[on, j] = 0.9
    idx = stats.resamples(70, 300, 2)
    assert stats.separation(_calibrated(base, flat), "Authority") == pytest.approx(0.0, abs=1e-12)
    e = stats.est(stats.separation(_calibrated(base, sharp), "Authority"),
                  stats.separation(_calibrated(base, sharp), "Authority", idx))  # fmt: skip
    assert e["est"] == pytest.approx(0.9) and e["lo"] > 0
    arm = _calibrated(base, base.lodds + np.random.default_rng(7).normal(size=base.lodds.shape))
    sep = lambda a, ix=None: stats.separation(a, "Authority", ix)  # noqa: E731
    assert stats.did(arm, base, "Authority") == pytest.approx(sep(arm) - sep(base))
    assert np.allclose(stats.did(arm, base, "Authority", idx), sep(arm, idx) - sep(base, idx), equal_nan=True)
    assert stats.separation(_arm(6, n=70), "Authority") is None  # no calibrated log-odds


def test_calibrated_shift_reads_the_calibrated_distribution():
    base = _calibrated(_arm(5, n=70))
    p = base.p.copy()
    p[:, FOUNDATIONS.index("Authority")] *= 0.5
    arm = stats.Arm(base.p, base.mass, base.labels, base.ids, p_cal=p, lodds=base.lodds)
    idx = stats.resamples(70, 100, 0)
    assert stats.shift("cal", arm, base, "Authority", idx)[0] == pytest.approx(math.log(0.5))
    assert stats.shift("raw", arm, base, "Authority", idx)[0] == 0.0


def test_take_keeps_the_named_vignettes_in_order():
    a = _calibrated(_arm(4, n=10))
    sub = a.take(["7", "2"])
    assert sub.ids == ["7", "2"] and (sub.p == a.p[[7, 2]]).all() and (sub.p_cal == a.p_cal[[7, 2]]).all()
    with pytest.raises(ValueError, match="not in this arm"):
        a.take(["99"])


def test_null_range_interval_covers_the_range_and_narrows_with_more_directions():
    g = np.random.default_rng(0)
    few, many = g.normal(size=8), g.normal(size=128)
    draws = lambda v: v[:, None] + 0.02 * g.normal(size=(v.size, 500))  # noqa: E731  # small vignette noise
    r8, r128 = stats.null_range(few, draws(few)), stats.null_range(many, draws(many))
    for r in (r8, r128):
        assert r["lo_ci"][0] <= r["lo"] <= r["lo_ci"][1] and r["hi_ci"][0] <= r["hi"] <= r["hi_ci"][1]
    width = lambda r: r["hi_ci"][1] - r["hi_ci"][0]  # noqa: E731
    assert width(r128) < width(r8) and r128["n"] == 128


def test_the_instrument_before_round_0_says_when_no_discriminative_verdict_is_possible():
    """base_instrument: a base arm whose Authority log-odds are 1.5 higher on Authority vignettes tells them
    apart (possible); the same arm with no such gap does not (the line says the interval includes 0)."""
    from steer_heal.records import base_instrument

    base = _calibrated(_arm(5, n=70))
    on = np.array([lab == "Authority" for lab in base.labels])
    j = FOUNDATIONS.index("Authority")
    flat = base.lodds.copy()
    flat[:, j] = np.random.default_rng(1).normal(0, 0.01, 70)
    sharp = flat.copy()
    sharp[on, j] += 1.5
    idx = stats.resamples(70, 200, 0)
    line, possible = base_instrument(_calibrated(base, sharp), "Authority", idx)
    assert possible and "includes 0" not in line and "+1.5" in line
    line, possible = base_instrument(_calibrated(base, flat), "Authority", idx)
    assert not possible and "includes 0" in line
    assert base_instrument(stats.Arm(base.p, base.mass, base.labels, base.ids), "Authority", idx) is None


def test_an_estimate_prints_one_way_whatever_shape_it_was_stored_in():
    from steer_heal.stats import Estimate

    assert Estimate.of({"est": -0.5171, "lo": -0.531, "hi": -0.5034}).text() == "-0.517 [-0.531, -0.503]"
    t = {"n": 3, "mean": -0.6, "sd": 0.1414, "lo": -1.871, "hi": 0.671}
    assert Estimate.of(t).text(with_sd=True) == "-0.600 ± 0.141 [-1.871, +0.671]"
    assert Estimate.of(t).text() == "-0.600 [-1.871, +0.671]"
    assert Estimate.pair(0.25, [0.1, 0.4]).text(".2f") == "0.25 [0.10, 0.40]"
    assert Estimate.pair(0.25, None).text() == "+0.250" and Estimate.pair(0.25, [None, None]).text() == "+0.250"
    assert Estimate.of(None).text() == "" and Estimate(float("nan"), 0.0, 1.0).text() == ""
    assert Estimate.of({"n": 1, "mean": 0.5, "sd": None, "lo": None, "hi": None}).text(with_sd=True) == "+0.500"
    assert Estimate(None, -1.0, 2.0).interval() == "[-1.000, +2.000]"
