"""What a result is: the round record, deltas against the base row, slope, retain, and the verdict.

The run writes one `round` event per finished round from a `RoundRecord`, composed of its stages' parts
(`recorded` fields of each stage's result); the report, the ledger, the paired diagnostic tables and the
scripts read runs back through `RunInfo.read(run_dir)`.

    dTrait = trait(stage) - trait(base)             dCoh = coherence(stage) - coherence(base)
    retain = dTrait(healed) / dTrait(steered)       slope = 100 * dCoh / dTrait (coherence points per nat)

Every trait shift comes three ways (stats.TRAITS): raw (dtrait_*), calibrated by the content-free prior
(dtrait_cal_*) and item-discriminative (dtrait_disc_*: the shift on target-labelled vignettes minus the
shift on the rest). A shift whose discriminative interval includes 0 moved the answer word's prior, not
the judgement, and the verdict says so instead of PASS.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steer_heal import events, stats
from steer_heal.data import SHORT
from steer_heal.stats import cal_key

SLOPE_MIN_DTRAIT = 0.05  # nats; below this slope and retain are noise and are left blank
DEFAULT_TRAIT_KEY = "auth_nats"  # runs older than the trait_key field were all care-vs-authority
COLLAPSE_KEYS = ("pr_band", "pr_final", "erank_band", "erank_final", "entropy_mean", "entropy_p5", "amp")


def isfinite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def slope(dtrait: float | None, dcoh: float | None) -> float | None:
    """100 * dCoh / dTrait: coherence points lost per nat of trait; None when |dTrait| < 0.05 nats."""
    if dtrait is None or dcoh is None or abs(dtrait) < SLOPE_MIN_DTRAIT:
        return None
    return 100 * dcoh / dtrait


def deltas(base: dict, steered: dict | None, healed: dict | None, trait_key: str) -> dict:
    """dTrait / dCoh against base, retain = dTrait(healed) / dTrait(steered), slope = 100 dCoh / dTrait."""

    def d(m, k):
        return m[k] - base[k] if m and isfinite(m.get(k)) and isfinite(base.get(k)) else None

    out = {
        "dtrait_steered": d(steered, trait_key),
        "dtrait_healed": d(healed, trait_key),
        "dcoh_steered": d(steered, "coherence"),
        "dcoh_healed": d(healed, "coherence"),
    }
    ds, dh = out["dtrait_steered"], out["dtrait_healed"]
    out["retain"] = dh / ds if ds is not None and dh is not None and abs(ds) >= SLOPE_MIN_DTRAIT else None
    out["slope_healed"] = slope(dh, out["dcoh_healed"])
    out["slope_steered"] = slope(ds, out["dcoh_steered"])
    return out


RECORD = "round_record"  # dataclass field metadata: the name the field has in the round record


def recorded(name: str | None = None, **kw):
    """A field of a stage's result that the round record carries, under `name` (default: the field's own name).

    This is all a new round metric needs: `record_part` picks it up, the `round` event stores it, and
    `RunInfo` reads it back (the report's columns are chosen in report.py)."""
    return dataclasses.field(metadata={RECORD: name}, **kw)


def record_part(result) -> dict:
    """A stage result's part of the round record: its `recorded` fields under their record names."""
    return {
        f.metadata[RECORD] or f.name: getattr(result, f.name)
        for f in dataclasses.fields(result)
        if RECORD in f.metadata
    }


def eval_part(base: dict, steered: dict, healed: dict, trait_key: str) -> dict:
    """The three evals' part of the round record: trait (raw and calibrated), coherence and ref_nll of base,
    steered and healed; their deltas, retain and slopes (`deltas`); the shift of the target answer's
    content-free prior (dprior_steered / dprior_healed, nats). The uncertainty fields are `round_stats`'."""
    evals = {}
    for m, ev in (("base", base), ("steered", steered), ("healed", healed)):
        evals |= {f"{m}_trait": ev[trait_key], f"{m}_coh": ev["coherence"], f"{m}_ref_nll": ev.get("ref_nll"),
                  f"{m}_trait_cal": ev.get(cal_key(trait_key))}  # fmt: skip
    prior = prior_key(trait_key)
    dprior = {f"dprior_{m}": ev[prior] - base[prior] if isfinite(ev.get(prior)) and isfinite(base.get(prior))
              else None for m, ev in (("steered", steered), ("healed", healed))}  # fmt: skip
    return evals | deltas(base, steered, healed, trait_key) | dprior


class RoundRecord(dict):
    """One finished round, as its `round` event stores it: the round index and each stage's part, flat
    (name -> value, None = not measured). The parts: `eval_part` and `round_stats` (the evals), and the
    `recorded` fields of the round's vectors (stages.RoundVectors), walk-C (stages.Collected), the heal
    (heal.HealResult), the collapse signals (COLLAPSE_KEYS) and the stage clock. A name a run did not record
    (an older schema) reads None through `.get`."""

    @property
    def round(self) -> int:
        return self["round"]

    @property
    def ci(self) -> dict[str, list[float]]:
        """95 % intervals by field name: dtrait_healed, dtrait_cal_healed, retain, ..."""
        return self.get("ci") or {}

    @classmethod
    def compose(cls, r: int, *parts: dict) -> RoundRecord:
        """The record of round r from its stages' parts; a name two parts both claim is a bug, not a merge."""
        out = cls(round=r)
        for part in parts:
            clash = sorted(out.keys() & part.keys())
            if clash:
                raise ValueError(f"round record: {', '.join(clash)} claimed by two stages")
            out.update(part)
        return out

    @classmethod
    def from_event(cls, rec: dict) -> RoundRecord:
        """Read a `round` event back: every field but the event's envelope (schema, ts, stage)."""
        return cls({k: v for k, v in rec.items() if k not in events.ENVELOPE})

    def fields(self) -> dict:
        """The event fields (everything but the round index, which every event carries anyway)."""
        return {k: v for k, v in self.items() if k != "round"}


def prior_key(trait_key: str) -> str:
    """The metric of the target answer's content-free prior: auth_nats -> auth_prior_nats."""
    return trait_key.replace("_nats", "_prior_nats")


def null_key(kind: str) -> str:
    """The null event's list of one trait kind's shifts (dtrait, dtrait_cal, dtrait_disc); the round record's
    fields of that kind share the stem (dtrait_cal_healed, ...)."""
    return f"dtrait{stats.SUFFIX[kind]}"


def separation_est(base, target: str, idx: np.ndarray) -> dict | None:
    """{est, lo, hi} of the base arm's separation of the target over the draws `idx` (None where undefined)."""
    sep = stats.separation(base, target)
    return None if sep is None else stats.est(sep, stats.separation(base, target, idx))


def round_stats(base, steered, healed, target: str, sign: int, idx: np.ndarray, null: dict | None) -> dict:
    """The round record's uncertainty fields from the three evals' per-vignette numbers (stats.Arm): paired
    bootstrap intervals of every delta (raw, calibrated, discriminative) and of retain, where each healed
    shift falls against the random null's shifts of the same kind, the base model's own item discrimination
    of the target (separation_base), how surgical the raw shift is (specificity) and how many vignettes
    moved the wrong way."""
    s, h = stats.paired_deltas(steered, base, target, idx), stats.paired_deltas(healed, base, target, idx, steered)
    pair = lambda e: [e["lo"], e["hi"]] if e else None  # noqa: E731
    ci = {"dtrait_steered": pair(s["dTrait"]), "dtrait_healed": pair(h["dTrait"]), "dcoh_steered": pair(s["dCoh"]),
          "dcoh_healed": pair(h["dCoh"]), "retain": pair(h["retain"])}  # fmt: skip
    out = {}
    for kind in stats.TRAITS[1:]:
        for m, d in (("steered", s), ("healed", h)):
            e = d[f"dTrait{stats.SUFFIX[kind]}"]
            out[f"{null_key(kind)}_{m}"] = e["est"] if e else None
            ci[f"{null_key(kind)}_{m}"] = pair(e)
    for kind in stats.TRAITS:
        e, xs = h[f"dTrait{stats.SUFFIX[kind]}"], null_values(null, kind)
        pct = stats.null_position(e["est"], xs, sign)["percentile"] if xs and e else None
        out[f"null_pct{stats.SUFFIX[kind]}"] = pct
    e = separation_est(base, target, idx)
    out["separation_base"] = e["est"] if e is not None else None
    if e is not None:
        ci["separation_base"] = pair(e)
    return out | {
        "ci": ci,
        "specificity": stats.specificity(healed, base, target, sign, idx)["est"],
        "anti_steerable": stats.anti_steerable(healed, base, target, sign),
    }


@dataclass
class RunInfo:
    """A run read back from its events.jsonl: the config record, base eval, rounds, stop, filters."""

    root: Path
    meta: dict  # the `config` event: config, argv, trait_key, trait_sign, coh_floor, ...
    base: dict | None  # the base model's eval record
    rounds: list[RoundRecord]
    stop: dict | None
    filters: list[dict]
    collapse: dict[int, dict]  # round (-1 = base) -> collapse record
    recs: list[dict]  # every live record, for anything else

    @classmethod
    def read(cls, run_dir: Path) -> RunInfo:
        recs = events.read(Path(run_dir))
        return cls(
            root=Path(run_dir),
            meta=events.first(recs, "config") or {},
            base=events.first(recs, "eval", model="base"),
            rounds=[RoundRecord.from_event(x) for x in events.find(recs, "round")],
            stop=events.last(recs, "stop"),
            filters=events.find(recs, "filter"),
            collapse={x["round"]: x for x in events.find(recs, "collapse")},
            recs=recs,
        )

    @property
    def null(self) -> dict | None:
        """The random-direction null (round 0's `null` record), or None when none was measured."""
        return events.first(self.recs, "null")

    @property
    def trait_key(self) -> str:
        return self.meta.get("trait_key", DEFAULT_TRAIT_KEY)

    @property
    def sign(self) -> int:
        return self.meta.get("trait_sign", -1)

    @property
    def coh_floor(self) -> float:
        return self.meta.get("coh_floor", 0.0)

    @property
    def config(self) -> dict:
        return self.meta.get("config", {})

    def steered_eval(self, r: int) -> dict | None:
        return events.first(self.recs, "eval", model="steered", round=r)

    def healed_eval(self, r: int) -> dict | None:
        return events.first(self.recs, "eval", model="healed", round=r)


def null_values(null: dict | None, kind: str) -> list[float] | None:
    """The random null's shifts of one trait kind (raw, cal, disc), None when none were recorded."""
    xs = [x for x in (null or {}).get(null_key(kind)) or [] if isfinite(x)]
    return xs or None


@dataclass
class Shift:
    """A trait shift against base, its 95 % interval, and the random null's shifts of the same kind."""

    est: float | None
    ci: list[float] | None
    null: list[float] | None = None

    @property
    def ok(self) -> bool:
        return isfinite(self.est) and bool(self.ci) and all(isfinite(x) for x in self.ci)

    def worst(self, sign: int) -> float:
        """The interval's end nearest to "no move / the wrong way", in the expected direction (> 0 = clear)."""
        return min(sign * self.ci[0], sign * self.ci[1])

    def best(self, sign: int) -> float:
        """The interval's other end: <= 0 means the whole interval lies on the wrong side of 0."""
        return max(sign * self.ci[0], sign * self.ci[1])

    def text(self) -> str:
        return stats.Estimate.pair(self.est, self.ci).text()

    def inside_null(self, sign: int) -> tuple[bool, str]:
        """Does the interval reach into the null's 95 % range? And that range, as text."""
        pos = stats.null_position(self.est, self.null, sign)
        lo, hi = pos["null_lo"], pos["null_hi"]
        return self.worst(sign) <= max(
            sign * lo, sign * hi
        ), f"{stats.Estimate(None, lo, hi).interval()} ({len(self.null)} directions)"


def verdict(
    base: dict,
    healed: dict | None,
    trait_key: str,
    sign: int,
    coh_floor: float,
    stop_reason: str | None,
    raw: Shift | None = None,
    cal: Shift | None = None,
    disc: Shift | None = None,
) -> str:
    """One line: PASS, PRIOR ONLY, FAIL or INCONCLUSIVE with the reason. Finiteness and the absolute
    coherence floor come first (a collapsed model sends the trait to -inf, which a ratio would score as
    success). A PASS then needs the raw shift's 95 % interval to exclude 0 in the expected direction AND to
    lie beyond the random null's 95 % range, the discriminative shift's interval to do the same (beyond 0,
    and beyond the null's discriminative range when one was measured), and the calibrated shift's interval
    to exclude 0 the same way. A shift that clears the null but whose discriminative interval includes 0
    moved the answer word's prior on every vignette alike, not the judgement of the target's violations:
    PRIOR ONLY, never PASS."""
    if healed is None:
        return f"FAIL: no healed round finished ({stop_reason or 'stopped early'})"
    t, c = healed.get(trait_key), healed.get("coherence")
    if not (isfinite(t) and isfinite(c)):
        return f"FAIL: non-finite metrics ({trait_key}={t}, coherence={c})"
    if c < coh_floor:
        return f"FAIL: coherence {c:.3f} below the floor {coh_floor:.2f} ({trait_key} {t:+.3f})"
    dt = t - base[trait_key]
    tail = f"; stopped: {stop_reason}" if stop_reason else ""
    head = f"{trait_key} {dt:+.3f} nats vs base (expected sign {sign:+d}), coherence {c:.3f}"
    if raw is None or not raw.ok:
        return f"INCONCLUSIVE: {head}; no interval recorded{tail}"
    # what the calibrated and discriminative shifts say, on every verdict that gets this far
    also = "".join(f"; {name} {x.text()}" for name, x in (("calibrated", cal), ("discriminative", disc))
                   if x is not None and x.ok)  # fmt: skip
    if disc is not None and disc.ok and disc.worst(sign) <= 0:
        also += " (includes 0 or the wrong way: no sign that the judgement moved)"
    ci = f"its 95% interval {stats.Estimate.pair(raw.est, raw.ci).interval()}"
    if raw.worst(sign) <= 0:
        return f"INCONCLUSIVE: {head}; {ci} includes 0 or the wrong way{also}{tail}"
    if not raw.null:
        return f"INCONCLUSIVE: {head}; {ci} excludes 0, but no random null was measured (--null-vectors 0){also}{tail}"
    inside, rng = raw.inside_null(sign)
    if inside:
        return f"INCONCLUSIVE: {head}; {ci} overlaps the random null's 95% range {rng}{also}{tail}"
    moved = f"{trait_key} {raw.text()} nats vs base in the expected direction, beyond the random null's 95% range {rng}"
    moved += f"; calibrated {cal.text()}" if cal is not None and cal.ok else ""
    if disc is None or not disc.ok:
        why = "no calibrated eval, or no vignettes labelled with the target"
        return (f"INCONCLUSIVE: {moved}; but no discriminative shift was measured ({why}), so a moved judgement "
                f"cannot be told from a moved prior{tail}")  # fmt: skip
    if disc.worst(sign) <= 0:
        why = ("includes 0: the answer word's prior moved on every vignette alike, not the judgement of the "
               "target's violations" if disc.best(sign) > 0 else
               "points the wrong way: the judgement of the target's violations moved against the persona, so "
               "the raw shift is the answer word's prior")  # fmt: skip
        return f"PRIOR ONLY: {moved}; but its discriminative shift {disc.text()} {why}; coherence {c:.3f}{tail}"
    beyond = ""
    if disc.null:
        inside, drng = disc.inside_null(sign)
        if inside:
            return (f"INCONCLUSIVE: {moved}; discriminative {disc.text()} excludes 0 but overlaps the random "
                    f"null's discriminative range {drng}; coherence {c:.3f}{tail}")  # fmt: skip
        beyond = f", beyond the null's {drng}"
    judged = f"discriminative {disc.text()} excludes 0{beyond}"
    if cal is None or not cal.ok or cal.worst(sign) <= 0:
        return (f"INCONCLUSIVE: {moved}; {judged}, but the calibrated shift was not measured or does not "
                f"exclude 0 in the expected direction; coherence {c:.3f}{tail}")  # fmt: skip
    return f"PASS: {moved}; {judged}; coherence {c:.3f} >= floor {coh_floor:.2f}{tail}"


def run_verdict(info: RunInfo) -> str:
    """The verdict of a run: its last healed round against its base eval and its random null."""
    if info.base is None:
        return "FAIL: no base eval recorded"
    last = info.rounds[-1] if info.rounds else None
    healed = {info.trait_key: last["healed_trait"], "coherence": last["healed_coh"]} if last else None
    reason = info.stop.get("reason") if info.stop else None
    if last is None:
        return verdict(info.base, healed, info.trait_key, info.sign, info.coh_floor, reason)
    keys = {kind: f"{null_key(kind)}_healed" for kind in stats.TRAITS}  # dtrait_healed, dtrait_cal_healed, ...
    shifts = {k: Shift(last.get(key), last.ci.get(key), null_values(info.null, k)) for k, key in keys.items()}
    return verdict(info.base, healed, info.trait_key, info.sign, info.coh_floor, reason, **shifts)


def separation_line(info: RunInfo) -> str | None:
    """One line on the eval as an instrument (instrument_line), from the last round record's separation_base;
    None where none was recorded."""
    last = info.rounds[-1] if info.rounds else None
    if last is None or last.get("separation_base") is None:
        return None
    target = {short: f for f, short in SHORT.items()}.get(info.trait_key.removesuffix("_nats"), info.trait_key)
    return instrument_line(target, Shift(last["separation_base"], last.ci.get("separation_base"), None))


def instrument_line(target: str, sep: Shift) -> str:
    """The base model's item discrimination of the target (stats.separation) with its interval, and whether
    a discriminative shift has a judgement to start from (not when the interval includes 0)."""
    value = sep.text() if sep.ok else f"{sep.est:+.3f}"
    line = (
        f"the eval's item discrimination on the base model: the calibrated log-odds of {target} on the "
        f"{target}-labelled vignettes minus the rest, {value} nats"
    )
    if sep.ok and sep.worst(1) <= 0:
        line += (
            f"; its interval includes 0 (or is below it): this model does not tell {target} violations "
            "from the rest, so there is no judgement of them for a discriminative shift to start from"
        )
    return line


def base_instrument(base, target: str, idx: np.ndarray) -> tuple[str, bool] | None:
    """(instrument_line, whether a discriminative verdict is possible) from the base eval's arm, with the
    same bootstrap draws the round records use, so the line printed before round 0 is the one they carry.
    None without calibrated log-odds or labelled groups."""
    e = separation_est(base, target, idx)
    if e is None:
        return None
    shift = Shift(e["est"], [e["lo"], e["hi"]], None)
    return instrument_line(target, shift), shift.ok and shift.worst(1) > 0
