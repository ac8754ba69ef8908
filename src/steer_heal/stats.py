"""Uncertainty and comparison maths: paired bootstrap intervals over vignettes, the random-vector null,
the steering / prompting frontier with the advantage at matched coherence, t-intervals across seeds.

An `Arm` is one eval's per-vignette numbers: the choice distribution over the seven foundations p[i, f]
(averaged over the two option orders) and the answer mass m[i]. Every arm of a comparison is scored on
the same vignettes, so resampling vignette indices once and applying them to every arm is a paired
bootstrap:

    trait_F(arm, idx) = log( mean_{i in idx} p[i, F] )          coherence(arm, idx) = mean_{i in idx} m[i]
    dTrait = trait_F(arm) - trait_F(base)                        dCoh = coherence(arm) - coherence(base)

The 95 % interval is the 2.5th and 97.5th percentile over >= 1000 resamples. It covers the choice of
vignettes only: seeds (t-interval over runs) and the null (random directions) are separate levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from steer_heal.data import FOUNDATIONS, SHORT

N_BOOT = 1000
LEVEL = 0.95
FLOOR = 1e-45  # the smallest profile probability a trait score is taken of (as in evaluate.metrics)
MIN_DTRAIT = 0.05  # nats: below this a ratio (slope, retain) is noise and is left blank, interval too


@dataclass
class Arm:
    """One eval's per-vignette numbers (rows in the order of the vignettes, the same for every arm)."""

    p: np.ndarray  # [N, 7] choice distribution over FOUNDATIONS
    mass: np.ndarray  # [N] probability on the seven answer tokens
    labels: list[str | None]
    ids: list[str]

    @classmethod
    def from_rows(cls, rows: list[dict]) -> Arm:
        """From an eval's per-vignette rows (evaluate.metrics / eval_<model>.jsonl)."""
        p = np.array([[r[f"p_{SHORT[f]}"] for f in FOUNDATIONS] for r in rows], dtype=np.float64)
        mass = np.array([r["p_ans_any"] for r in rows], dtype=np.float64)
        return cls(p=p, mass=mass, labels=[r.get("label") for r in rows], ids=[str(r["id"]) for r in rows])

    def trait(self, f: str, idx: np.ndarray | None = None) -> np.ndarray | float:
        """log mean p[:, f] over the vignettes (or over each resample's indices [B, N] -> [B]); floored at
        1e-45 as evaluate.metrics floors it, so a collapsed model's -inf is a large finite number in both."""
        col = self.p[:, FOUNDATIONS.index(f)]
        return math.log(max(col.mean(), FLOOR)) if idx is None else np.log(np.maximum(col[idx].mean(-1), FLOOR))

    def coherence(self, idx: np.ndarray | None = None) -> np.ndarray | float:
        return float(self.mass.mean()) if idx is None else self.mass[idx].mean(-1)


def resamples(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n] vignette indices drawn with replacement (seeded: the same draws for every arm)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (NaN draws, e.g. an undefined ratio, are left out)."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    return (float(np.quantile(s, a)), float(np.quantile(s, 1 - a)))


def est(value: float, samples: np.ndarray) -> dict:
    """{est, lo, hi}: a point estimate with the percentile interval of its bootstrap samples."""
    lo, hi = interval(samples)
    return {"est": float(value), "lo": lo, "hi": hi}


def check_paired(arm: Arm, base: Arm) -> None:
    if arm.ids != base.ids:
        raise ValueError(f"arms are not paired: {len(arm.ids)} vs {len(base.ids)} vignettes, or in another order")


def ratio(num: float, num_b: np.ndarray, den: float, den_b: np.ndarray, scale: float = 1.0) -> dict:
    """scale * num / den with its interval; blank ({est: None}) when |den| < MIN_DTRAIT nats, where the ratio
    and its draws are noise divided by noise."""
    if abs(den) < MIN_DTRAIT:
        return {"est": None, "lo": None, "hi": None}
    with np.errstate(divide="ignore", invalid="ignore"):
        return est(scale * num / den, scale * num_b / den_b)


def paired_deltas(arm: Arm, base: Arm, trait: str, idx: np.ndarray, steered: Arm | None = None) -> dict:
    """dTrait, dCoh (and retain against `steered`, slope = 100 dCoh / dTrait) with paired bootstrap intervals."""
    check_paired(arm, base)
    dt = arm.trait(trait) - base.trait(trait)
    dt_b = arm.trait(trait, idx) - base.trait(trait, idx)
    dc = arm.coherence() - base.coherence()
    dc_b = arm.coherence(idx) - base.coherence(idx)
    out = {"dTrait": est(dt, dt_b), "dCoh": est(dc, dc_b), "slope": ratio(dc, dc_b, dt, dt_b, 100)}
    if steered is not None:
        ds = steered.trait(trait) - base.trait(trait)
        out["retain"] = ratio(dt, dt_b, ds, steered.trait(trait, idx) - base.trait(trait, idx))
    return out


def flat(name: str, e: dict) -> dict:
    """{name: est, name_lo: lo, name_hi: hi}: an estimate as table / JSON columns."""
    return {name: e["est"], f"{name}_lo": e["lo"], f"{name}_hi": e["hi"]}


def foundation_shifts(arm: Arm, base: Arm, idx: np.ndarray) -> dict[str, dict]:
    """The shift of every foundation's trait score (nats) against base, with intervals: is a move surgical
    (only the target) or broad?"""
    return {f: est(arm.trait(f) - base.trait(f), arm.trait(f, idx) - base.trait(f, idx)) for f in FOUNDATIONS}


def specificity(arm: Arm, base: Arm, target: str, sign: int, idx: np.ndarray) -> dict:
    """margin = sign * dTarget - max over the other six |dF|: > 0 when the target moved, in the expected
    direction, by more than any other foundation moved either way."""
    others = [f for f in FOUNDATIONS if f != target]

    def margin(ix):
        t = sign * (arm.trait(target, ix) - base.trait(target, ix))
        o = np.max([np.abs(arm.trait(f, ix) - base.trait(f, ix)) for f in others], axis=0)
        return t - o

    return est(margin(None), margin(idx))


def per_vignette_shift(arm: Arm, base: Arm, target: str) -> np.ndarray:
    """log p[i, target](arm) - log p[i, target](base) for each vignette i."""
    j = FOUNDATIONS.index(target)
    return np.log(np.maximum(arm.p[:, j], 1e-45)) - np.log(np.maximum(base.p[:, j], 1e-45))


def anti_steerable(arm: Arm, base: Arm, target: str, sign: int) -> float:
    """Fraction of vignettes whose target score moved the wrong way (Tan et al. 2024's anti-steerable)."""
    return float(np.mean(sign * per_vignette_shift(arm, base, target) < 0))


def labelled_split(arm: Arm, base: Arm, target: str, idx_seed: int = 0) -> dict:
    """dTrait on the vignettes labelled with the target foundation against dTrait on the rest: does the
    model judge those violations differently, or only like the answer word less everywhere?"""
    on = np.array([lab == target for lab in base.labels])
    out = {}
    for name, mask in (("on_target", on), ("rest", ~on)):
        if mask.sum() < 2:
            out[name] = None
            continue
        sub_a, sub_b = _subset(arm, mask), _subset(base, mask)
        idx = resamples(int(mask.sum()), seed=idx_seed)
        out[name] = est(sub_a.trait(target) - sub_b.trait(target), sub_a.trait(target, idx) - sub_b.trait(target, idx))
        out[name]["n"] = int(mask.sum())
    return out


def _subset(arm: Arm, mask: np.ndarray) -> Arm:
    keep = np.flatnonzero(mask)
    return Arm(arm.p[keep], arm.mass[keep], [arm.labels[i] for i in keep], [arm.ids[i] for i in keep])


# ---------------------------------------------------------------- the random null


def null_position(value: float, null: list[float], sign: int) -> dict:
    """Where a shift falls against the null (shifts from random directions of the same norms):
    percentile = share of null draws it beats in the expected direction (1 = beyond every draw), z-score,
    and the null's 95 % range."""
    x = np.asarray(null, dtype=np.float64)
    sd = float(x.std(ddof=1)) if x.size > 1 else math.nan
    lo, hi = (float(np.quantile(x, 0.025)), float(np.quantile(x, 0.975))) if x.size else (math.nan, math.nan)
    return {
        "percentile": float(np.mean(sign * value > sign * x)) if x.size else math.nan,
        "z": float((value - x.mean()) / sd) if sd and sd > 0 else math.nan,
        "null_lo": lo,
        "null_hi": hi,
        "n_null": int(x.size),
    }


# ---------------------------------------------------------------- the frontier


def frontier(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The upper-right envelope of points (x = coherence, y = sign * dTrait, both better when larger): the
    points no other point beats on both axes, sorted by x. Along it y falls as x rises."""
    order = np.lexsort((-np.asarray(ys), -np.asarray(xs)))  # by x descending, ties: larger y first
    fx, fy, best = [], [], -math.inf
    for i in order:
        if ys[i] > best:
            fx.append(xs[i])
            fy.append(ys[i])
            best = ys[i]
    return np.array(fx[::-1]), np.array(fy[::-1])


def frontier_at(xs: np.ndarray, ys: np.ndarray, x: float) -> float:
    """The trait (sign * dTrait) a method reaches at coherence x: linear interpolation along its frontier,
    monotone by construction; beyond the frontier's ends it is held at the end point (the method is given
    the benefit of the doubt where it was not measured)."""
    fx, fy = frontier(xs, ys)
    return float(np.interp(x, fx, fy))


def advantage(point_x: float, point_y: float, xs: np.ndarray, ys: np.ndarray) -> float:
    """How far a point lies beyond a method's frontier at its own coherence: y - frontier(x). Positive = more
    trait than the method buys at that coherence; 0 for a point on the frontier."""
    return point_y - frontier_at(xs, ys, point_x)


# ---------------------------------------------------------------- across seeds

# Two-sided 95 % quantiles of Student's t, t_{0.975, df} for df = 1..30; beyond, a Cornish-Fisher
# expansion of the normal quantile (error < 1e-3 for df > 30).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)  # fmt: skip


def t975(df: int) -> float:
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(xs: list[float]) -> dict:
    """{n, mean, sd, lo, hi}: mean +- t_{0.975, n-1} * sd / sqrt(n) (None bounds for n < 2)."""
    x = [v for v in xs if isinstance(v, (int, float)) and math.isfinite(v)]
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "lo": None, "hi": None}
    mean = sum(x) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "lo": None, "hi": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    h = t975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - h, "hi": mean + h}


def fmt_ci(e: dict | None, spec: str = "+.3f") -> str:
    """'-0.517 [-0.531, -0.503]' (empty for a missing estimate)."""
    if not e or e.get("est") is None or not math.isfinite(e["est"]):
        return ""
    if e.get("lo") is None or not math.isfinite(e["lo"]):
        return format(e["est"], spec)
    return f"{e['est']:{spec}} [{e['lo']:{spec}}, {e['hi']:{spec}}]"
