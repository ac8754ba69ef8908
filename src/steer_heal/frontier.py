"""The frontier: trait against coherence for the simple alternatives, and how far each healed student lies
beyond them at its own coherence.

    arms = [Point("steer c=1", "steer", ev), Point("prompt 2", "prompt", ev), Point("healed r0", "healed", ev), ...]
    rows, adv = compare(arms, base, target="Authority", sign=-1, idx=stats.resamples(140))
    adv["disc"]["coherence"]   # each healed round's advantages on the discriminative trait at matched answer mass

Each arm is an eval on the same vignettes as `base`, except the random directions, which may be measured on a
subset of them (the run's null): their rows are paired with base on that subset. In the plane x = coherence
(answer mass; or x = -ref_nll, the capability tax with the sign flipped so that larger is better) and
y = sign * dTrait (trait moved in the persona's direction), a method's frontier is the upper-right envelope
of its points (stats.frontier). The advantage of a healed point over a method is

    A = y(healed) - frontier_method(x(healed))        (nats; > 0 = more trait than the method buys there)

computed for each trait kind (stats.TRAITS: raw, calibrated, discriminative; y is that kind's shift). Its
interval resamples the vignettes (and, on the ref_nll axis, the reference answers) once per draw and
recomputes every arm, the curves and A from the same draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from steer_heal import stats
from steer_heal.data import FOUNDATIONS
from steer_heal.evaluate import Scored

KINDS = ("base", "steer", "prompt", "random", "healed")
AXES = ("coherence", "ref_nll")


@dataclass
class Point:
    arm: str
    kind: str  # one of KINDS
    ev: Scored
    extra: dict = field(default_factory=dict)  # c, system prompt, seed, round ...


def ref_samples(ev: Scored, idx_r: np.ndarray) -> tuple[float, np.ndarray]:
    """ref_nll (mean NLL per token over the reference answers) and its value on each resample [B, R]."""
    items = np.array(ev.m["ref_items"], dtype=np.float64)  # [R, 2]: summed NLL, token count
    return float(items[:, 0].sum() / items[:, 1].sum()), items[idx_r, 0].sum(-1) / items[idx_r, 1].sum(-1)


def coords(p: Point, base: Scored, target: str, sign: int, idx: np.ndarray, idx_r: np.ndarray, x: str, kind: str):
    """(x, y) of an arm and their bootstrap draws: x = coherence or -ref_nll, y = sign * the `kind` shift
    (None when the arms cannot give that kind)."""
    sh = stats.shift(kind, p.ev.arm, base.arm, target, idx)
    if sh is None:
        return None
    y, y_b = sign * sh[0], sign * sh[1]
    if x == "coherence":
        return p.ev.arm.coherence(), p.ev.arm.coherence(idx), y, y_b
    r, r_b = ref_samples(p.ev, idx_r)
    return -r, -r_b, y, y_b


def _paired_base(p: Point, base: Scored, idx: np.ndarray, seed: int) -> tuple[stats.Arm, np.ndarray]:
    """The base arm an arm is paired with, and the resamples to use: base itself, or base on the arm's subset
    of the vignettes (a random direction of the run's null) with resamples of that subset."""
    if p.ev.arm.ids == base.arm.ids:
        return base.arm, idx
    return base.arm.take(p.ev.arm.ids), stats.resamples(len(p.ev.arm.ids), idx.shape[0], seed)


def row(p: Point, base: Scored, target: str, sign: int, idx: np.ndarray, null: dict[str, list[float]] | None,
        prior_key: str | None = None, seed: int = 0) -> dict:  # fmt: skip
    """The JSON row of one arm: the paired raw, calibrated and discriminative shifts with intervals, the shift
    of the target answer's content-free prior, the capability tax, where each shift falls against the null's
    shifts of its kind, the arm's own item discrimination (separation), how surgical the raw shift is, and
    the shift of every foundation."""
    b, ix = _paired_base(p, base, idx, seed)
    d = stats.paired_deltas(p.ev.arm, b, target, ix)
    out = {"arm": p.arm, "kind": p.kind, **p.extra, "n_vignettes": len(p.ev.arm.ids)}
    for k in ("dTrait", "dCoh", "dTrait_cal", "dTrait_disc"):
        out |= stats.flat(k, d[k]) if d[k] else {k: None}  # None: not measured (an eval without calibration)
    out["coherence"] = p.ev.m["coherence"]
    out["ref_nll"] = p.ev.m.get("ref_nll")
    # the content-free prior does not depend on which vignettes were scored: comparable for every arm
    pa, pb = (p.ev.m.get(prior_key), base.m.get(prior_key)) if prior_key else (None, None)
    out["dPrior"] = pa - pb if pa is not None and pb is not None else None
    for kind in stats.TRAITS:
        x, xs = out[f"dTrait{stats.SUFFIX[kind]}"], (null or {}).get(kind)
        pct = stats.null_position(x, xs, sign)["percentile"] if xs and x is not None else None
        out[f"null_pct{stats.SUFFIX[kind]}"] = pct
    sep = stats.separation(p.ev.arm, target)  # the arm's own item discrimination; disc = its change from base's
    out |= stats.flat("separation", stats.est(sep, stats.separation(p.ev.arm, target, ix))) if sep is not None else {}
    out |= stats.flat("specificity", stats.specificity(p.ev.arm, b, target, sign, ix))
    out["anti_steerable"] = stats.anti_steerable(p.ev.arm, b, target, sign)
    out["foundations"] = stats.foundation_shifts(p.ev.arm, b, ix)
    out["labelled_split"] = stats.labelled_split(p.ev.arm, b, target)
    if p.ev.arm.cal is not None and b.cal is not None:
        out["labelled_split_cal"] = stats.labelled_split(p.ev.arm.cal, b.cal, target)
    out["per_vignette"] = stats.per_vignette_shift(p.ev.arm, b, target).round(4).tolist()
    return out


def advantages(
    points: list[Point], base: Scored, target: str, sign: int, idx: np.ndarray, idx_r: np.ndarray, x: str,
    kind: str = "raw",
) -> list[dict]:  # fmt: skip
    """A_steer and A_prompt for every healed point on one trait kind, each {est, lo, hi}, with the curves
    recomputed per draw (None where a curve has fewer than two points or the kind is not measured)."""
    on_curves = [p for p in points if p.kind in ("base", "steer", "prompt", "healed")]
    xy = {id(p): coords(p, base, target, sign, idx, idx_r, x, kind) for p in on_curves}
    curves = {k: [p for p in on_curves if p.kind in (k, "base")] for k in ("steer", "prompt")}
    out = []
    for h in (p for p in points if p.kind == "healed"):
        rec = {"arm": h.arm, "round": h.extra.get("round")}
        for k, curve in curves.items():
            if len(curve) < 2 or xy[id(h)] is None or any(xy[id(p)] is None for p in curve):
                rec[k] = None
                continue
            hx, hx_b, hy, hy_b = xy[id(h)]
            cx = np.array([xy[id(p)][0] for p in curve])
            cy = np.array([xy[id(p)][2] for p in curve])
            a = stats.advantage(hx, hy, cx, cy)
            cxb = np.stack([xy[id(p)][1] for p in curve], axis=1)  # [B, points]
            cyb = np.stack([xy[id(p)][3] for p in curve], axis=1)
            ok = np.isfinite(hy_b) & np.isfinite(cyb).all(1)  # a draw with no target-labelled vignette: NaN (disc)
            a_b = np.array([stats.advantage(hx_b[b], hy_b[b], cxb[b], cyb[b]) if ok[b] else np.nan
                            for b in range(len(hx_b))])  # fmt: skip
            rec[k] = stats.est(a, a_b) | {"extrapolated": bool(hx < cx.min() or hx > cx.max())}
        out.append(rec)
    return out


def null_shifts(points: list[Point], base: Scored, target: str, idx: np.ndarray, seed: int) -> dict[str, list[float]]:
    """The random arms' shifts of every trait kind, each paired with base on the arm's own vignettes."""
    out: dict[str, list[float]] = {k: [] for k in stats.TRAITS}
    for p in (p for p in points if p.kind == "random"):
        b, ix = _paired_base(p, base, idx, seed)
        for kind in stats.TRAITS:
            sh = stats.shift(kind, p.ev.arm, b, target, ix[:1])
            if sh is not None:
                out[kind].append(sh[0])
    return {k: v for k, v in out.items() if v}


def compare(points: list[Point], base: Scored, target: str, sign: int, idx: np.ndarray, seed: int = 0,
            prior_key: str | None = None) -> tuple[list[dict], dict[str, dict[str, list[dict]]]]:  # fmt: skip
    """Every arm's row, and every healed arm's advantage over steering and over prompting for each trait kind
    on each coherence axis ({"raw": {"coherence": [...], "ref_nll": [...]}, "cal": ..., "disc": ...}; ref_nll
    only where every arm on a curve has its reference items)."""
    n_ref = len(base.m.get("ref_items") or [])
    null = null_shifts(points, base, target, idx, seed)
    rows = [row(p, base, target, sign, idx, null or None, prior_key, seed) for p in points]
    on_curves = [p for p in points if p.kind != "random"]
    axes = {"coherence": np.zeros((idx.shape[0], 0), int)}
    if n_ref and all(len(p.ev.m.get("ref_items") or []) == n_ref for p in on_curves):
        axes["ref_nll"] = stats.resamples(n_ref, idx.shape[0], seed + 1)
    adv = {kind: {axis: advantages(points, base, target, sign, idx, idx_r, axis, kind) for axis, idx_r in axes.items()}
           for kind in stats.TRAITS}  # fmt: skip
    return rows, adv


TRAIT_NAMES = {"raw": "", "cal": "calibrated ", "disc": "discriminative "}


def verdict_lines(adv: list[dict], trait_key: str, axis: str = "coherence", kind: str = "raw") -> list[str]:
    """Does the loop beat steering and prompting at matched coherence? One line per healed round."""
    lines, matched = [], "matched coherence" if axis == "coherence" else "matched capability tax (ref_nll)"
    what = f"{TRAIT_NAMES[kind]}{trait_key}"
    for a in adv:
        for k, name in (("steer", "steering"), ("prompt", "prompting")):
            e = a.get(k)
            if not e:
                lines.append(f"{a['arm']} vs {name}: no curve to compare with on the {what}")
                continue
            ci = f"{stats.Estimate.of(e).text()} nats"
            if e["lo"] > 0:
                word = "BEATS"
            elif e["hi"] < 0:
                word = "falls short of"
            else:
                word = "is not distinguishable from"
            ext = " (outside the measured curve: extrapolated)" if e.get("extrapolated") else ""
            lines.append(f"{a['arm']} {word} {name} at {matched}: A_{k} {ci} of {what}{ext}")
    return lines


def foundation_table(rows: list[dict]) -> list[dict]:
    """Per arm, the shift of every foundation (nats) with its interval, for the printed table."""
    return [
        {"arm": r["arm"], **{f: stats.Estimate.of(r["foundations"][f]).text("+.2f") for f in FOUNDATIONS}} for r in rows
    ]
