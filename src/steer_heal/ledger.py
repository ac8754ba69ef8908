"""The results ledger: one JSON line per run in <out-dir>/results.jsonl, read by scripts/results.py.

Rows are keyed by run name: a resumed run appends a newer row for the same run, and `read` keeps the
last row of each run, so no run is counted twice. Columns may change between versions; old rows still
read back. A torn line (a crash mid-append) is skipped with a warning instead of breaking the file.

`aggregate` groups rows into arms (by default: everything in the config but the seed) and gives each
headline figure n, mean, sd and a 95 % t-interval across the arm's seeds (distinct: a repeat is refused).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from loguru import logger
from tabulate import tabulate

from steer_heal import stats
from steer_heal.config import WHERE
from steer_heal.data import decoded
from steer_heal.errors import UserError
from steer_heal.events import ends_mid_line, finite
from steer_heal.records import RunInfo, isfinite

# What may differ between the seeds of one arm: the seed, and where / how the run was started (config.WHERE;
# fast_dev_run was one of these until it became an alias of --preset fast, and old runs still store it).
NOT_ARM = ("seed", *WHERE, "fast_dev_run")
HEADLINE = ("final_dtrait", "final_dtrait_cal", "final_dtrait_disc", "final_coh", "final_retain", "final_ref_nll",
            "final_null_pct", "final_null_pct_disc", "best_dtrait", "A_steer", "A_prompt", "A_steer_disc",
            "A_prompt_disc", "n_rounds_done")  # fmt: skip


def arm_config(config: dict) -> dict:
    """The run's config flattened (heal.reg -> reg; flags are flat), without what may differ between seeds."""
    flat = {}
    for k, v in config.items():
        if isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    return {k: v for k, v in sorted(flat.items()) if k not in NOT_ARM}


def row(info: RunInfo, verdict_line: str) -> dict:
    rounds, c = info.rounds, info.config
    heal = c.get("heal", {})
    last = rounds[-1] if rounds else None
    ok = [r for r in rounds if isfinite(r.get("healed_coh")) and r["healed_coh"] >= info.coh_floor
          and isfinite(r.get("dtrait_healed"))]  # fmt: skip
    best = max(ok, key=lambda r: info.sign * r["dtrait_healed"]) if ok else None
    base = info.base or {}

    def of(r, key):  # a field of a round that may not exist
        return r.get(key) if r is not None else None

    return {
        "run": info.root.name,
        "commit": info.meta.get("git_commit"),
        "argv": info.meta.get("argv"),
        "preset": c.get("preset"),
        "model": c.get("model"),
        "reg": heal.get("reg"),
        "lam": heal.get("lam"),
        "tau": heal.get("tau"),
        "kl_agg": heal.get("kl_agg"),
        "barrier_ref": heal.get("barrier_ref"),
        "seed": c.get("seed"),
        "trait_key": info.trait_key,
        "base_trait": base.get(info.trait_key),
        "base_coh": base.get("coherence"),
        "n_rounds_done": len(rounds),
        "final_dtrait": of(last, "dtrait_healed"),
        "final_coh": of(last, "healed_coh"),
        "final_retain": of(last, "retain"),
        "final_dtrait_ci": (last.ci.get("dtrait_healed") if last else None),
        "final_dtrait_cal": of(last, "dtrait_cal_healed"),
        "final_dtrait_disc": of(last, "dtrait_disc_healed"),
        "final_dtrait_disc_ci": (last.ci.get("dtrait_disc_healed") if last else None),
        "final_null_pct_disc": of(last, "null_pct_disc"),
        "final_ref_nll": of(last, "healed_ref_nll"),
        "final_null_pct": of(last, "null_pct"),
        "best_round": of(best, "round"),
        "best_dtrait": of(best, "dtrait_healed"),
        "best_coh": of(best, "healed_coh"),
        "verdict": verdict_line,
        "stop": (info.stop or {}).get("reason"),
        "config": arm_config(c),
    }


def append(path: Path, rec: dict) -> None:
    """Append one line in a single write + fsync. If the file ends mid-line (an earlier torn append),
    start on a fresh line so the torn row stays alone and this one reads back whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(finite(rec), ensure_ascii=False, allow_nan=False) + "\n"
    with path.open("ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # sweep cells append from many processes (on NFS, O_APPEND alone races)
        try:
            if ends_mid_line(path):
                line = "\n" + line
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read(path: Path) -> list[dict]:
    """The newest row of each run, in order of first appearance; torn lines skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    by_run: dict[str, dict] = {}
    for i, line in enumerate(decoded(path.read_bytes(), str(path)).splitlines(), 1):  # a bad byte: file and line
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logger.warning(f"{path}:{i}: skipping a torn ledger line ({line[:60]!r})")
            continue
        if isinstance(rec, dict):
            by_run[str(rec.get("run", f"<line {i}>"))] = rec
    return list(by_run.values())


def advantages_by_trait(doc: dict) -> dict[str, dict[str, list[dict]]]:
    """A frontier.json's advantages as {trait kind: {axis: [per healed round]}}; a frontier written before the
    trait kinds had only the raw trait's, on its --x axis."""
    if doc.get("advantage_by_trait"):
        return doc["advantage_by_trait"]
    return {"raw": {doc.get("x", "coherence"): doc.get("advantage") or []}}


def with_frontier(rows: list[dict], ledger_path: Path) -> list[dict]:
    """Add each run's A_steer / A_prompt (raw trait) and A_steer_disc / A_prompt_disc (discriminative trait)
    at matched answer mass from <run>/frontier.json for the run's last round, when that frontier covers that
    round (a frontier of an earlier, shorter state of a resumed run is not mixed in)."""
    out = []
    for r in rows:
        path = Path(ledger_path).parent / str(r.get("run")) / "frontier.json"
        extra = {}
        if path.is_file() and r.get("n_rounds_done"):
            doc = json.loads(path.read_text(encoding="utf-8"))
            last = r["n_rounds_done"] - 1
            by_trait = advantages_by_trait(doc)
            for kind, suffix in (("raw", ""), ("disc", "_disc")):
                adv = [a for a in (by_trait.get(kind) or {}).get("coherence") or [] if a.get("round") == last]
                if adv:
                    extra |= {f"A_{k}{suffix}": (adv[0].get(k) or {}).get("est") for k in ("steer", "prompt")}
        out.append(r | extra)
    return out


def arms(rows: list[dict], by: list[str] | None = None) -> dict[str, list[dict]]:
    """Rows grouped into arms: by the given ledger fields, or by the whole config minus the seed (rows
    written before the config was recorded fall back to preset / reg / barrier_ref / lam / kl_agg)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if by:
            key = json.dumps({k: r.get(k) for k in by}, sort_keys=True)
        elif "config" in r:
            key = json.dumps(r["config"], sort_keys=True)
        else:
            key = json.dumps({k: r.get(k) for k in ("preset", "reg", "barrier_ref", "lam", "kl_agg")}, sort_keys=True)
        groups.setdefault(key, []).append(r)
    return groups


def label(key: str, keys: list[str]) -> str:
    """An arm's name: the config values that differ between the arms being compared."""
    d = json.loads(key)
    differing = [k for k in sorted(d) if len({json.dumps(json.loads(x).get(k)) for x in keys}) > 1]
    shown = differing or [k for k in ("preset", "model", "reg") if k in d]  # one arm: say what it is
    return ", ".join(f"{k}={d[k]}" for k in shown) or "all runs"


def repeated_seed(runs: list[tuple[str, object]]) -> tuple[object, list[str]] | None:
    """The first seed that more than one of (run, seed) has, with those runs; None when every seed is distinct."""
    by_seed: dict[str, list[str]] = {}
    for run, seed in runs:
        by_seed.setdefault(json.dumps(seed), []).append(run)
    return next(((json.loads(k), rs) for k, rs in by_seed.items() if len(rs) > 1), None)


def one_run_per_seed(runs: list[tuple[str, object]], what: str, fix: str) -> None:
    """Refuse an interval 'across seeds' over repeated seeds: reruns of one seed are not independent draws (on
    CPU they are the same numbers), so n would count the reruns and the interval would shrink with them."""
    if (rep := repeated_seed(runs)) is not None:
        seed, names = rep
        raise UserError(
            f"{what}: runs {', '.join(names)} all have seed {seed}; an interval across seeds needs one run per "
            f"seed ({fix})"
        )


def aggregate(rows: list[dict], by: list[str] | None = None, metrics=HEADLINE) -> list[dict]:
    """One row per arm: runs, seeds, and per headline figure a t-interval {n, mean, sd, lo, hi} over the arm's
    runs, which must have distinct seeds (so n counts seeds)."""
    groups = arms(rows, by)
    out = []
    for key, rs in sorted(groups.items()):
        name = ", ".join(f"{k}={rs[0].get(k)}" for k in by) if by else label(key, list(groups))
        fix = "add a field they differ in to --by" if by else "keep one of them in the ledger"
        one_run_per_seed([(str(r.get("run")), r.get("seed")) for r in rs], f"arm {name}", fix)
        out.append({
            **({k: rs[0].get(k) for k in by} if by else {"arm": name}),
            "runs": len(rs),
            "seeds": sorted({r.get("seed") for r in rs}, key=str),
            **{m: stats.t_interval([r.get(m) for r in rs]) for m in metrics},
        })  # fmt: skip
    return out


def cell(t: dict) -> str:
    """'-0.600 ± 0.141 [-1.871, +0.671]' (mean ± sd [95 % t-interval]); the mean alone for one run."""
    return stats.Estimate.of(t).text(with_sd=True)


def table(rows: list[dict], by: list[str] | None = None) -> str:
    """The markdown table of `aggregate`, with a note for every arm of fewer than 3 seeds."""
    agg = aggregate(rows, by)
    shown = [m for m in HEADLINE if any(a[m]["n"] for a in agg)]
    names = by or ["arm"]
    lines = [{**{k: a[k] for k in names}, "runs": a["runs"], "seeds": a["seeds"], **{m: cell(a[m]) for m in shown}}
             for a in agg]  # fmt: skip
    note = [f"{', '.join(str(a[k]) for k in names)}: n = {a['runs']} < 3 seeds, the interval is not a claim"
            for a in agg if a["runs"] < 3]  # fmt: skip
    return tabulate(lines, headers="keys", tablefmt="github") + ("\n\n" + "\n".join(note) if note else "")
