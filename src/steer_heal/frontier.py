"""The frontier: trait against coherence for the simple alternatives, and how far each healed student lies
beyond them at its own coherence.

    arms = [Point("steer c=1", "steer", ev), Point("prompt 2", "prompt", ev), Point("healed r0", "healed", ev), ...]
    rows, adv = compare(arms, base, target="Authority", sign=-1, idx=stats.resamples(140), x="coherence")

Each arm is an eval on the same vignettes as `base`. In the plane x = coherence (answer mass; or
x = -ref_nll, the capability tax with the sign flipped so that larger is better) and y = sign * dTrait
(trait moved in the persona's direction), a method's frontier is the upper-right envelope of its points
(stats.frontier). The advantage of a healed point over a method is

    A = y(healed) - frontier_method(x(healed))        (nats; > 0 = more trait than the method buys there)

Its interval resamples the vignettes (and, on the ref_nll axis, the reference answers) once per draw
and recomputes every arm, the curves and A from the same draw.
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


def coords(p: Point, base: Scored, target: str, sign: int, idx: np.ndarray, idx_r: np.ndarray, x: str):
    """(x, y) of an arm and their bootstrap draws: x = coherence or -ref_nll, y = sign * dTrait."""
    y = sign * (p.ev.arm.trait(target) - base.arm.trait(target))
    y_b = sign * (p.ev.arm.trait(target, idx) - base.arm.trait(target, idx))
    if x == "coherence":
        return p.ev.arm.coherence(), p.ev.arm.coherence(idx), y, y_b
    r, r_b = ref_samples(p.ev, idx_r)
    return -r, -r_b, y, y_b


def row(p: Point, base: Scored, target: str, sign: int, idx: np.ndarray, null: list[float] | None) -> dict:
    """The JSON row of one arm: the paired deltas with intervals, the capability tax, where the shift falls
    against the null, how surgical it is, and the shift of every foundation."""
    d = stats.paired_deltas(p.ev.arm, base.arm, target, idx)
    out = {
        "arm": p.arm,
        "kind": p.kind,
        **p.extra,
        **stats.flat("dTrait", d["dTrait"]),
        **stats.flat("dCoh", d["dCoh"]),
    }
    out["coherence"] = p.ev.m["coherence"]
    out["ref_nll"] = p.ev.m.get("ref_nll")
    if null:
        out["null_pct"] = stats.null_position(out["dTrait"], null, sign)["percentile"]
    out |= stats.flat("specificity", stats.specificity(p.ev.arm, base.arm, target, sign, idx))
    out["anti_steerable"] = stats.anti_steerable(p.ev.arm, base.arm, target, sign)
    out["foundations"] = stats.foundation_shifts(p.ev.arm, base.arm, idx)
    out["labelled_split"] = stats.labelled_split(p.ev.arm, base.arm, target)
    out["per_vignette"] = stats.per_vignette_shift(p.ev.arm, base.arm, target).round(4).tolist()
    return out


def advantages(
    points: list[Point], base: Scored, target: str, sign: int, idx: np.ndarray, idx_r: np.ndarray, x: str
) -> list[dict]:
    """A_steer and A_prompt for every healed point, each {est, lo, hi}, with the curves recomputed per draw."""
    xy = {id(p): coords(p, base, target, sign, idx, idx_r, x) for p in points}
    curves = {k: [p for p in points if p.kind in (k, "base")] for k in ("steer", "prompt")}
    out = []
    for h in (p for p in points if p.kind == "healed"):
        hx, hx_b, hy, hy_b = xy[id(h)]
        rec = {"arm": h.arm, "round": h.extra.get("round")}
        for k, curve in curves.items():
            if len(curve) < 2:
                rec[k] = None
                continue
            cx = np.array([xy[id(p)][0] for p in curve])
            cy = np.array([xy[id(p)][2] for p in curve])
            a = stats.advantage(hx, hy, cx, cy)
            cxb = np.stack([xy[id(p)][1] for p in curve], axis=1)  # [B, points]
            cyb = np.stack([xy[id(p)][3] for p in curve], axis=1)
            a_b = np.array([stats.advantage(hx_b[b], hy_b[b], cxb[b], cyb[b]) for b in range(len(hx_b))])
            rec[k] = stats.est(a, a_b) | {"extrapolated": bool(hx < cx.min() or hx > cx.max())}
        out.append(rec)
    return out


def compare(points: list[Point], base: Scored, target: str, sign: int, idx: np.ndarray,
            n_ref_boot_seed: int = 0) -> tuple[list[dict], dict[str, list[dict]]]:  # fmt: skip
    """Every arm's row, and every healed arm's advantage over steering and over prompting on each coherence
    axis ({"coherence": [...], "ref_nll": [...]}; ref_nll only where every arm has its reference items)."""
    n_ref = len(base.m.get("ref_items") or [])
    null = [p.ev.arm.trait(target) - base.arm.trait(target) for p in points if p.kind == "random"]
    rows = [row(p, base, target, sign, idx, null or None) for p in points]
    adv = {"coherence": advantages(points, base, target, sign, idx, np.zeros((idx.shape[0], 0), int), "coherence")}
    if n_ref and all(len(p.ev.m.get("ref_items") or []) == n_ref for p in points):
        idx_r = stats.resamples(n_ref, idx.shape[0], n_ref_boot_seed + 1)
        adv["ref_nll"] = advantages(points, base, target, sign, idx, idx_r, "ref_nll")
    return rows, adv


def verdict_lines(adv: list[dict], trait_key: str, axis: str = "coherence") -> list[str]:
    """Does the loop beat steering and prompting at matched coherence? One line per healed round."""
    lines, matched = [], "matched coherence" if axis == "coherence" else "matched capability tax (ref_nll)"
    for a in adv:
        for k, name in (("steer", "steering"), ("prompt", "prompting")):
            e = a.get(k)
            if not e:
                lines.append(f"{a['arm']} vs {name}: no curve to compare with")
                continue
            ci = f"{e['est']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}] nats"
            if e["lo"] > 0:
                word = "BEATS"
            elif e["hi"] < 0:
                word = "falls short of"
            else:
                word = "is not distinguishable from"
            ext = " (outside the measured curve: extrapolated)" if e.get("extrapolated") else ""
            lines.append(f"{a['arm']} {word} {name} at {matched}: A_{k} {ci} of {trait_key}{ext}")
    return lines


def foundation_table(rows: list[dict]) -> list[dict]:
    """Per arm, the shift of every foundation (nats) with its interval, for the printed table."""
    return [{"arm": r["arm"], **{f: stats.fmt_ci(r["foundations"][f], "+.2f") for f in FOUNDATIONS}} for r in rows]
