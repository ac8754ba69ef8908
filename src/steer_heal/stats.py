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

Three traits, each a shift against base (`shift`, TRAITS):
  raw    dTrait as above, on the raw choice distribution p
  cal    the same on the contextually calibrated distribution p_cal (evaluate.contextual_calibration): what is left once
         the answer words' content-free prior is divided out
  disc   the item-discriminative trait, a difference in differences of the calibrated log-odds of the
         target answer l[i] (evaluate.log_odds, per vignette): its shift on the vignettes labelled with the
         target minus its shift on the other labelled vignettes,
             disc = mean_{i in on} (l_arm[i] - l_base[i]) - mean_{i in rest} (l_arm[i] - l_base[i])
         A move of the answer word's prior (a bias on its logit) shifts every l[i] by the same amount, so
         disc = 0 exactly, also where the model is confident; a move of the judgement of target
         violations shifts the target-labelled vignettes more (or less) than the rest.
The same difference on one arm alone, mean_{on} l[i] - mean_{rest} l[i], is the eval's own item
discrimination (`separation`): disc is the arm's separation minus the base model's.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from steer_heal.data import FOUNDATIONS, SHORT

N_BOOT = 1000
LEVEL = 0.95
FLOOR = 1e-45  # the smallest profile probability a trait score is taken of (as in evaluate.metrics)
MIN_DTRAIT = 0.05  # nats: below this a ratio (slope, retain) is noise and is left blank, interval too


TRAITS = ("raw", "cal", "disc")
# The key suffix of each trait kind wherever one is stored: dTrait_cal, dtrait_disc_healed, null_pct_disc, ...
SUFFIX = {"raw": "", "cal": "_cal", "disc": "_disc"}


def cal_key(trait_key: str) -> str:
    """The eval metric of the calibrated trait: auth_nats -> auth_nats_cal."""
    return f"{trait_key}_cal"


@dataclass
class Arm:
    """One eval's per-vignette numbers (rows in the order of the vignettes, the same for every arm)."""

    p: np.ndarray  # [N, 7] choice distribution over FOUNDATIONS
    mass: np.ndarray  # [N] probability on the seven answer tokens
    labels: list[str | None]
    ids: list[str]
    p_cal: np.ndarray | None = None  # [N, 7] the calibrated choice distribution (evals before it: None)
    lodds: np.ndarray | None = None  # [N, 7] the calibrated log-odds of each answer (evaluate.log_odds)

    @classmethod
    def from_rows(cls, rows: list[dict]) -> Arm:
        """From an eval's per-vignette rows (evaluate.metrics / eval_<model>.jsonl)."""

        def cols(prefix):  # [N, 7], or None when the eval did not record these columns
            if not all(f"{prefix}{SHORT[FOUNDATIONS[0]]}" in r for r in rows):
                return None
            return np.array([[r[f"{prefix}{SHORT[f]}"] for f in FOUNDATIONS] for r in rows], dtype=np.float64)

        mass = np.array([r["p_ans_any"] for r in rows], dtype=np.float64)
        labels, ids = [r.get("label") for r in rows], [str(r["id"]) for r in rows]
        return cls(p=cols("p_"), mass=mass, labels=labels, ids=ids, p_cal=cols("pc_"), lodds=cols("lodds_"))

    @property
    def cal(self) -> Arm | None:
        """The same arm on its calibrated choice distribution (None when the eval has none)."""
        return None if self.p_cal is None else Arm(self.p_cal, self.mass, self.labels, self.ids, lodds=self.lodds)

    def trait(self, f: str, idx: np.ndarray | None = None) -> np.ndarray | float:
        """log mean p[:, f] over the vignettes (or over each resample's indices [B, N] -> [B]); floored at
        1e-45 as evaluate.metrics floors it, so a collapsed model's -inf is a large finite number in both."""
        col = self.p[:, FOUNDATIONS.index(f)]
        return math.log(max(col.mean(), FLOOR)) if idx is None else np.log(np.maximum(col[idx].mean(-1), FLOOR))

    def coherence(self, idx: np.ndarray | None = None) -> np.ndarray | float:
        return float(self.mass.mean()) if idx is None else self.mass[idx].mean(-1)

    def take(self, ids: list[str]) -> Arm:
        """The arm on a subset of its vignettes, in the order of `ids` (each must be one of this arm's)."""
        where = {x: i for i, x in enumerate(self.ids)}
        missing = [x for x in ids if x not in where]
        if missing:
            raise ValueError(f"{len(missing)} vignette(s) not in this arm, e.g. {missing[0]!r}")
        keep = np.array([where[x] for x in ids], dtype=int)
        sub = lambda x: None if x is None else x[keep]  # noqa: E731
        return Arm(self.p[keep], self.mass[keep], [self.labels[i] for i in keep], list(ids), sub(self.p_cal),
                   sub(self.lodds))  # fmt: skip


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


def masked_mean(x: np.ndarray, mask: np.ndarray, idx: np.ndarray | None = None) -> float | np.ndarray:
    """mean of x[i] over the i that `mask` marks; with resamples idx [B, N], per resample -> [B] (NaN for a
    resample that drew no marked i)."""
    if idx is None:
        return float(x[mask].mean())
    w = mask[idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x[idx] * w).sum(-1) / w.sum(-1)


def separation(arm: Arm, target: str, idx: np.ndarray | None = None) -> float | np.ndarray | None:
    """The eval's own item discrimination on one arm: mean_{on} l[i] - mean_{rest} l[i], l[i] = the target
    answer's calibrated log-odds on vignette i; on = labelled with the target, rest = labelled with another
    foundation (unlabelled vignettes count in neither). > 0 when the model calls the target's violations the
    target more readily than the rest; ~0 on the base model means there is no judgement of the target for
    a discriminative shift to start from. None without log-odds or without both groups."""
    if arm.lodds is None:
        return None
    on = np.array([lab == target for lab in arm.labels])
    rest = np.array([lab is not None and lab != target for lab in arm.labels])
    if not on.any() or not rest.any():
        return None
    l = arm.lodds[:, FOUNDATIONS.index(target)]  # noqa: E741
    return masked_mean(l, on, idx) - masked_mean(l, rest, idx)


def did(arm: Arm, base: Arm, target: str, idx: np.ndarray | None = None) -> float | np.ndarray | None:
    """The discriminative shift: the change of `separation`, mean_{on} dl - mean_{rest} dl with
    dl[i] = l_arm[i] - l_base[i] (the same vignettes, so the difference of the two separations).
    None where either separation is."""
    a, b = separation(arm, target, idx), separation(base, target, idx)
    return None if a is None or b is None else a - b


def shift(kind: str, arm: Arm, base: Arm, target: str, idx: np.ndarray) -> tuple[float, np.ndarray] | None:
    """One of the TRAITS' shift against base and its value on each resample of `idx` ([B]; NaN where a
    resample holds no vignette of a group `disc` needs). None when the arms cannot give it: no calibrated
    eval recorded (cal, disc), or not both target-labelled and other labelled vignettes (disc)."""
    check_paired(arm, base)
    if kind not in TRAITS:
        raise ValueError(f"trait kind {kind!r}; valid: {', '.join(TRAITS)}")
    if kind == "disc":
        d = did(arm, base, target)
        return None if d is None else (d, did(arm, base, target, idx))
    a, b = (arm, base) if kind == "raw" else (arm.cal, base.cal)
    if a is None or b is None:
        return None
    return a.trait(target) - b.trait(target), a.trait(target, idx) - b.trait(target, idx)


def shift_est(kind: str, arm: Arm, base: Arm, target: str, idx: np.ndarray) -> dict | None:
    """`shift` as {est, lo, hi} (None when it is not defined for these arms)."""
    s = shift(kind, arm, base, target, idx)
    return None if s is None else est(*s)


def paired_deltas(arm: Arm, base: Arm, trait: str, idx: np.ndarray, steered: Arm | None = None) -> dict:
    """dTrait, dCoh (and retain against `steered`, slope = 100 dCoh / dTrait) with paired bootstrap intervals,
    and the calibrated and discriminative shifts dTrait_cal, dTrait_disc (None where not defined)."""
    check_paired(arm, base)
    dt, dt_b = shift("raw", arm, base, trait, idx)
    dc = arm.coherence() - base.coherence()
    dc_b = arm.coherence(idx) - base.coherence(idx)
    out = {"dTrait": est(dt, dt_b), "dCoh": est(dc, dc_b), "slope": ratio(dc, dc_b, dt, dt_b, 100)}
    out |= {f"dTrait{SUFFIX[k]}": shift_est(k, arm, base, trait, idx) for k in TRAITS[1:]}
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
    rest = np.array([lab is not None and lab != target for lab in base.labels])
    out = {}
    for name, mask in (("on_target", on), ("rest", rest)):
        if mask.sum() < 2:
            out[name] = None
            continue
        ids = [x for x, m in zip(base.ids, mask) if m]
        sub_a, sub_b = arm.take(ids), base.take(ids)
        idx = resamples(int(mask.sum()), seed=idx_seed)
        out[name] = est(sub_a.trait(target) - sub_b.trait(target), sub_a.trait(target, idx) - sub_b.trait(target, idx))
        out[name]["n"] = int(mask.sum())
    return out


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


def null_range(values: np.ndarray, draws: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """The null's 95 % range (2.5th and 97.5th percentile of the directions' shifts `values` [D]) with an
    interval for each end, from a two-level bootstrap: every draw resamples the D directions with
    replacement and takes each chosen direction's shift on one shared vignette resample (`draws` [D, B]:
    direction d's shift on vignette resample b), so both the choice of directions and of vignettes count.
    With a few dozen directions these ends sit near the extreme order statistics, where a bootstrap
    interval is known to run narrow: read it as a lower bound on the range's uncertainty."""
    values, draws = np.asarray(values, dtype=np.float64), np.asarray(draws, dtype=np.float64)
    n_dir, n_res = draws.shape  # directions, vignette resamples
    a = (1 - LEVEL) / 2
    g = np.random.default_rng(seed)
    cols = g.integers(0, n_res, size=n_boot)
    picked = draws[g.integers(0, n_dir, size=(n_boot, n_dir)), cols[:, None]]  # [n_boot, D]
    with warnings.catch_warnings():  # a vignette resample without a target-labelled vignette: all NaN (disc)
        warnings.simplefilter("ignore", RuntimeWarning)
        lo_b, hi_b = np.nanquantile(picked, a, axis=1), np.nanquantile(picked, 1 - a, axis=1)
    return {"lo": float(np.quantile(values, a)), "hi": float(np.quantile(values, 1 - a)),
            "lo_ci": list(interval(lo_b)), "hi_ci": list(interval(hi_b)), "n": int(n_dir)}  # fmt: skip


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


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


@dataclass(frozen=True)
class Estimate:
    """A point estimate, its 95 % interval (lo, hi; None where there is none) and, for an across-seed
    t-interval, the sd. Every table, log and verdict line prints estimates through `text` / `interval`,
    whichever shape they were stored in ({est, lo, hi}, {mean, sd, lo, hi}, or a value and a [lo, hi] pair)."""

    est: float | None
    lo: float | None = None
    hi: float | None = None
    sd: float | None = None

    @classmethod
    def of(cls, d: dict | None) -> Estimate:
        """From a stored {est, lo, hi} (stats.est) or {n, mean, sd, lo, hi} (t_interval); None = no estimate."""
        d = d or {}
        return cls(d.get("est", d.get("mean")), d.get("lo"), d.get("hi"), d.get("sd"))

    @classmethod
    def pair(cls, x: float | None, ci: list[float] | tuple | None) -> Estimate:
        """From a value and its [lo, hi] (the round record keeps intervals apart from the values)."""
        lo, hi = ci if ci and None not in ci else (None, None)
        return cls(x, lo, hi)

    def text(self, spec: str = "+.3f", with_sd: bool = False) -> str:
        """'-0.517 [-0.531, -0.503]'; with_sd: '-0.600 ± 0.141 [-1.871, +0.671]'; the estimate alone without an
        interval, and '' without an estimate."""
        if not _finite(self.est):
            return ""
        sd = f" ± {self.sd:.3f}" if with_sd and _finite(self.sd) else ""
        if not (_finite(self.lo) and _finite(self.hi)):
            return format(self.est, spec) + sd
        return f"{self.est:{spec}}{sd} {self.interval(spec)}"

    def interval(self, spec: str = "+.3f") -> str:
        """'[-0.531, -0.503]'."""
        return f"[{self.lo:{spec}}, {self.hi:{spec}}]"
