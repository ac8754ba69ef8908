"""Is the null's vignette subset enough? The run's random directions scored again on every vignette.

    uv run python scripts/diag_null.py out/<run> [--n-null N] [--out FILE]

The run measures its random-vector null (--null-vectors directions of the teacher's per-layer norms, base
model, round-0 eval strength) on a fixed, seeded subset of the vignettes (--null-vignettes), because the
spread between directions is what the null is about and a subset costs a fraction of the full set. This
script scores the same directions (the first --n-null of them, default all) on the full vignette set and
compares, for each trait kind (raw, calibrated, discriminative):
  - per direction: the shift on the subset against the shift on every vignette (correlation, mean |diff|);
  - the null's 95 % range on the subset, with its two-level bootstrap interval (directions x vignettes),
    against the same directions' range on every vignette: the subset is good enough where each end of the
    full-set range lies inside the subset range's interval;
  - seconds per direction on the subset and on the full set (from this process's own evals);
  - for each healed round, on the footing question: the run compares its full-set shift with the subset's
    null; here also its shift on the subset against the subset's null (same vignettes, same noise) and its
    full-set shift against the full-set null, as the share of directions each beats.
Writes <run>/null_check.json unless --out names another path.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from tabulate import tabulate

from steer_heal import null as nulls
from steer_heal import paired, stats
from steer_heal.cli import ArgumentParser, cli, positive_int
from steer_heal.data import read_jsonl
from steer_heal.errors import UserError
from steer_heal.evaluate import Scored
from steer_heal.records import null_key
from steer_heal.rundir import atomic_write_json


def compare(sub: dict[str, np.ndarray], full: dict[str, np.ndarray], sub_draws, full_draws, n_boot: int, seed: int):
    """Per trait kind: agreement of the per-direction shifts, and both ranges with their intervals."""
    out = {}
    for kind in sub:
        s, f = sub[kind], full[kind]
        rs, rf = (stats.null_range(x, d, n_boot, seed) for x, d in ((s, sub_draws[kind]), (f, full_draws[kind])))
        inside = {end: rs[f"{end}_ci"][0] <= rf[end] <= rs[f"{end}_ci"][1] for end in ("lo", "hi")}
        out[kind] = {
            "subset": rs,
            "full": rf,
            "full_inside_subset_ci": inside,
            "corr": float(np.corrcoef(s, f)[0, 1]),
            "mean_abs_diff": float(np.abs(s - f).mean()),
            "max_abs_diff": float(np.abs(s - f).max()),
            "per_direction": {"subset": s.tolist(), "full": f.tolist()},
        }
    return out


def timed(s, v0, seeds: list[int], c: float, vigs, desc: str) -> tuple[list[Scored], float]:
    """Each direction's eval on `vigs` (the package's null loop), and the seconds per direction."""
    t0 = time.time()
    evs = nulls.direction_evals(s, v0, c, seeds, vigs, desc)
    return evs, (time.time() - t0) / len(seeds)


def footing(run: paired.OpenRun, base: Scored, ids: list[str], sub: dict, full: dict) -> list[dict]:
    """Per healed round and trait kind: its shift on every vignette and on the null's subset, and the share of
    the null's directions each beats (full-set shift vs subset null = what the run reports)."""
    target, sign, out = run.target, run.s.persona.sign, []
    one = lambda n: np.zeros((1, n), dtype=int)  # noqa: E731  # only the point estimates are needed here
    for r in run.require_rounds():
        healed = Scored(run.info.healed_eval(r), read_jsonl(run.rd.eval_rows(r, "healed")))
        for kind in sub:
            x_full = stats.shift(kind, healed.arm, base.arm, target, one(len(base.arm.ids)))
            x_sub = stats.shift(kind, healed.arm.take(ids), base.arm.take(ids), target, one(len(ids)))
            if x_full is None or x_sub is None:
                continue
            pct = lambda x, null: stats.null_position(x, null, sign)["percentile"]  # noqa: E731
            out.append({"round": r, "trait": kind, "shift (full)": x_full[0], "shift (subset)": x_sub[0],
                        "beats, full vs subset null (run)": pct(x_full[0], sub[kind]),
                        "beats, subset vs subset null": pct(x_sub[0], sub[kind]),
                        "beats, full vs full null": pct(x_full[0], full[kind])})  # fmt: skip
    return out


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--n-null", type=positive_int, help="score the first N of the run's directions (default all)")
    ap.add_argument("--out", type=Path, help="the JSON to write (default <run>/null_check.json)")
    a = ap.parse_args(argv)
    run = paired.open_run(a.run_dir)
    null, s, target = run.info.null, run.s, run.s.persona.trait
    if not null or "vignette_ids" not in null:
        raise UserError(f"{run.rd.root}: no random null measured on a vignette subset (events schema 1.3+); "
                        "run it with --null-vectors > 0")  # fmt: skip
    n = min(a.n_null or len(null["seeds"]), len(null["seeds"]))
    ids, seeds, c = null["vignette_ids"], null["seeds"][:n], null["c"]
    sub_vigs = nulls.null_vignettes(s)
    if ids != [v.id for v in sub_vigs]:
        raise UserError(f"{run.rd.root}: the null's vignette subset is not the one its config draws; re-run it")
    base = Scored(run.info.base, read_jsonl(run.rd.eval_rows(-1, "base")))
    v0, nb, seed = run.rd.vectors(0), s.cfg.eval.n_boot, s.bootstrap_seed
    print(f"{run.rd.root.name}: {n} directions at c={c:g}; subset {len(ids)} vignettes, full {len(s.vigs)}",
          file=sys.stderr)  # fmt: skip
    sub_evs, t_sub = timed(s, v0, seeds, c, sub_vigs, "subset")
    full_evs, t_full = timed(s, v0, seeds, c, s.vigs, "full")
    sub, sub_d = nulls.direction_shifts(sub_evs, base, target, nb, seed)
    saved = np.array(null[null_key("raw")][:n])
    if not np.allclose(sub["raw"], saved, atol=1e-4):
        raise UserError(f"{run.rd.root}: the directions re-scored on the subset do not reproduce the run's null "
                        f"(max diff {np.abs(sub['raw'] - saved).max():.2g}); another model state or code?")  # fmt: skip
    full, full_d = nulls.direction_shifts(full_evs, base, target, nb, seed)
    res = compare(sub, full, sub_d, full_d, nb, seed)
    fmt = lambda r, e: stats.Estimate.pair(r[e], r[f"{e}_ci"]).text()  # noqa: E731
    table = [{"trait": k, "subset lo [95% CI]": fmt(r["subset"], "lo"), "full lo [95% CI]": fmt(r["full"], "lo"),
              "subset hi [95% CI]": fmt(r["subset"], "hi"), "full hi [95% CI]": fmt(r["full"], "hi"),
              "full inside": "yes" if all(r["full_inside_subset_ci"].values()) else "NO", "corr": r["corr"],
              "mean |diff|": r["mean_abs_diff"], "max |diff|": r["max_abs_diff"]} for k, r in res.items()]  # fmt: skip
    print(tabulate(table, headers="keys", tablefmt="github", floatfmt=".3f"))
    foot = footing(run, base, ids, sub, full)
    print("\nhealed rounds against the null (share of directions beaten in the persona's direction):")
    print(tabulate(foot, headers="keys", tablefmt="github", floatfmt="+.3f"))
    print(f"\nseconds per direction: subset {t_sub:.1f} ({len(ids)} vignettes), full {t_full:.1f} ({len(s.vigs)}), "
          f"ratio {t_full / t_sub:.2f}; {n} directions")  # fmt: skip
    out = a.out or run.rd.root / "null_check.json"
    atomic_write_json(out, {"run": run.rd.root.name, "n_directions": n, "c": c, "n_subset": len(ids),
                            "n_full": len(s.vigs), "seconds_per_direction": {"subset": t_sub, "full": t_full},
                            "kinds": res, "healed": foot})  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    cli(main)
