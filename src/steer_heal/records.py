"""What a result is: the round record, deltas against the base row, slope, retain, and the verdict.

The run writes one `round` event per finished round from a `RoundRecord`; the report, the ledger, the
paired diagnostic tables and the scripts read runs back through `RunInfo.read(run_dir)`. Nothing else
defines these keys.

    dTrait = trait(stage) - trait(base)             dCoh = coherence(stage) - coherence(base)
    retain = dTrait(healed) / dTrait(steered)       slope = 100 * dCoh / dTrait (coherence points per nat)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steer_heal import events, stats

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


@dataclass
class RoundRecord:
    """One finished round, as its `round` event stores it (None = not measured / not defined)."""

    round: int
    steered_trait: float | None = None
    healed_trait: float | None = None
    steered_coh: float | None = None
    healed_coh: float | None = None
    base_trait: float | None = None
    base_coh: float | None = None
    dtrait_steered: float | None = None
    dtrait_healed: float | None = None
    dcoh_steered: float | None = None
    dcoh_healed: float | None = None
    retain: float | None = None
    slope_healed: float | None = None
    slope_steered: float | None = None
    c_eval: float | None = None  # steered-eval strength on the raw vector
    c_star: float | None = None  # iso-KL unit (1.0 when off)
    cos_v0: float | None = None  # cos(teacher vector of this round, round 0's)
    cos_student_teacher: float | None = None  # cos(v_student, v_teacher)
    norm_v: float | None = None
    norm_student: float | None = None
    kappa: float | None = None  # walk-C dose multiplier
    n_generated: int | None = None
    n_kept: int | None = None
    heal_nll: float | None = None
    heal_d: float | None = None
    barrier_fired: float | None = None
    barrier_skipped: int | None = None
    steps_skipped: int | None = None
    pr_band: float | None = None
    pr_final: float | None = None
    erank_band: float | None = None
    erank_final: float | None = None
    entropy_mean: float | None = None
    entropy_p5: float | None = None
    amp: float | None = None
    base_ref_nll: float | None = None  # capability tax: reference answers' NLL per token, nats
    steered_ref_nll: float | None = None
    healed_ref_nll: float | None = None
    ci: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # 95 % intervals: dtrait_healed, ...
    null_pct: float | None = None  # share of the random null's shifts the healed shift beats (1 = all)
    specificity: float | None = None  # healed: sign * dTarget - max |dF| of the other six foundations
    anti_steerable: float | None = None  # healed: share of vignettes whose target score moved the wrong way
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    peak_mib: dict[str, float] = dataclasses.field(default_factory=dict)  # per stage, CUDA only

    @classmethod
    def build(cls, r: int, base: dict, steered: dict, healed: dict, trait_key: str, **fields) -> RoundRecord:
        """From the three evals (base, steered, healed) and the round's other measurements."""
        evals = dict(
            steered_trait=steered[trait_key],
            healed_trait=healed[trait_key],
            steered_coh=steered["coherence"],
            healed_coh=healed["coherence"],
            base_trait=base[trait_key],
            base_coh=base["coherence"],
            base_ref_nll=base.get("ref_nll"),
            steered_ref_nll=steered.get("ref_nll"),
            healed_ref_nll=healed.get("ref_nll"),
        )
        return cls(round=r, **evals, **deltas(base, steered, healed, trait_key), **fields)

    @classmethod
    def from_event(cls, rec: dict) -> RoundRecord:
        """Read a `round` event back (fields a run did not record stay None)."""
        return cls(**{f.name: rec[f.name] for f in dataclasses.fields(cls) if rec.get(f.name) is not None})

    def fields(self) -> dict:
        """The event fields (everything but the round index, which every event carries anyway)."""
        d = dataclasses.asdict(self)
        d.pop("round")
        return d


def round_stats(base, steered, healed, target: str, sign: int, idx: np.ndarray, null: dict | None) -> dict:
    """The round record's uncertainty fields from the three evals' per-vignette numbers (stats.Arm): paired
    bootstrap intervals of every delta and of retain, where the healed shift falls against the random
    null, how surgical it is (specificity) and how many vignettes moved the wrong way."""
    s, h = stats.paired_deltas(steered, base, target, idx), stats.paired_deltas(healed, base, target, idx, steered)
    pair = lambda e: [e["lo"], e["hi"]]  # noqa: E731
    ci = {"dtrait_steered": pair(s["dTrait"]), "dtrait_healed": pair(h["dTrait"]), "dcoh_steered": pair(s["dCoh"]),
          "dcoh_healed": pair(h["dCoh"]), "retain": pair(h["retain"])}  # fmt: skip
    pos = stats.null_position(h["dTrait"]["est"], null["dtrait"], sign) if null and null.get("dtrait") else None
    return {
        "ci": ci,
        "null_pct": pos["percentile"] if pos else None,
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


def verdict(
    base: dict,
    healed: dict | None,
    trait_key: str,
    sign: int,
    coh_floor: float,
    stop_reason: str | None,
    ci: list[float] | None = None,
    null: list[float] | None = None,
) -> str:
    """One line: PASS, FAIL or INCONCLUSIVE with the reason. Finiteness and the absolute coherence floor
    come first (a collapsed model sends the trait to -inf, which a ratio would score as success); a PASS
    then needs the shift's 95 % interval to exclude 0 in the expected direction AND to lie beyond the
    random null's 95 % range (shifts from random directions of the teacher's norms)."""
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
    if not ci or not all(isfinite(x) for x in ci):
        return f"INCONCLUSIVE: {head}; no interval recorded{tail}"
    lo, hi = ci
    worst = min(sign * lo, sign * hi)  # the interval's end nearest to "no move / wrong way"
    if worst <= 0:
        return f"INCONCLUSIVE: {head}; its 95% interval [{lo:+.3f}, {hi:+.3f}] includes 0 or the wrong way{tail}"
    if not null:
        return (
            f"INCONCLUSIVE: {head}; its 95% interval [{lo:+.3f}, {hi:+.3f}] excludes 0, but no random null was "
            f"measured (--null-vectors 0){tail}"
        )
    pos = stats.null_position(dt, null, sign)
    nlo, nhi = pos["null_lo"], pos["null_hi"]
    if worst <= max(sign * nlo, sign * nhi):
        return (
            f"INCONCLUSIVE: {head}; its 95% interval [{lo:+.3f}, {hi:+.3f}] overlaps the random null's 95% range "
            f"[{nlo:+.3f}, {nhi:+.3f}] ({len(null)} directions){tail}"
        )
    return (
        f"PASS: {trait_key} {dt:+.3f} nats [{lo:+.3f}, {hi:+.3f}] vs base in the expected direction, beyond the "
        f"random null's 95% range [{nlo:+.3f}, {nhi:+.3f}] ({len(null)} directions); coherence {c:.3f} >= floor "
        f"{coh_floor:.2f}{tail}"
    )


def run_verdict(info: RunInfo) -> str:
    """The verdict of a run: its last healed round against its base eval and its random null."""
    if info.base is None:
        return "FAIL: no base eval recorded"
    last = info.rounds[-1] if info.rounds else None
    healed = {info.trait_key: last.healed_trait, "coherence": last.healed_coh} if last else None
    reason = info.stop.get("reason") if info.stop else None
    ci = last.ci.get("dtrait_healed") if last else None
    null = (info.null or {}).get("dtrait")
    return verdict(info.base, healed, info.trait_key, info.sign, info.coh_floor, reason, ci, null)
