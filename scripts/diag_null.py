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
  - seconds per direction on the subset and on the full set (from this process's own evals).
Writes <run>/null_check.json unless --out names another path.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tabulate import tabulate
from tqdm.auto import tqdm

from steer_heal import extract, paired, stages, stats
from steer_heal.cli import cli, positive_int
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


def shifts(evs: list[Scored], base: Scored, target: str, n_boot: int, seed: int):
    """Per kind: each direction's shift [D] and its draws over vignette resamples [D, B], paired with base
    on the directions' vignettes."""
    ids = evs[0].arm.ids
    b, idx = base.arm.take(ids), stats.resamples(len(ids), n_boot, seed)
    est, draws = {}, {}
    for kind in stats.TRAITS:
        sh = [stats.shift(kind, ev.arm, b, target, idx) for ev in evs]
        if all(x is not None for x in sh):
            est[kind], draws[kind] = np.array([x[0] for x in sh]), np.stack([x[1] for x in sh])
    return est, draws


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    if ids != [v.id for v in stages.null_vignettes(s)]:
        raise UserError(f"{run.rd.root}: the null's vignette subset is not the one its config draws; re-run it")
    base = Scored(run.info.base, read_jsonl(run.rd.eval_rows(-1, "base")))
    v0, nb, seed = run.rd.vectors(0), s.cfg.eval.n_boot, s.cfg.seed
    print(f"{run.rd.root.name}: {n} directions at c={c:g}; subset {len(ids)} vignettes, full {len(s.vigs)}",
          file=sys.stderr)  # fmt: skip
    sub_vigs = stages.null_vignettes(s)
    t = {}
    sub_evs, full_evs = [], []
    with s.as_model("base"):
        t0 = time.time()
        for sd in tqdm(seeds, desc="subset", leave=False):
            sub_evs.append(s.evaluate(extract.random_like(v0, sd), c, desc=f"subset {sd}", vigs=sub_vigs,
                                      references=False))  # fmt: skip
        t["subset"] = (time.time() - t0) / n
        t0 = time.time()
        for sd in tqdm(seeds, desc="full set", leave=False):
            full_evs.append(s.evaluate(extract.random_like(v0, sd), c, desc=f"full {sd}", references=False))
        t["full"] = (time.time() - t0) / n
    saved = null[null_key("raw")][:n]
    sub, sub_d = shifts(sub_evs, base, target, nb, seed)
    if not np.allclose(sub["raw"], saved, atol=1e-4):
        raise UserError(f"{run.rd.root}: the directions re-scored on the subset do not reproduce the run's null "
                        f"(max diff {np.abs(sub['raw'] - saved).max():.2g}); another model state or code?")  # fmt: skip
    full, full_d = shifts(full_evs, base, target, nb, seed)
    res = compare(sub, full, sub_d, full_d, nb, seed)
    fmt = lambda r, e: f"{r[e]:+.3f} [{r[f'{e}_ci'][0]:+.3f}, {r[f'{e}_ci'][1]:+.3f}]"  # noqa: E731
    table = [{"trait": k, "subset lo [95% CI]": fmt(r["subset"], "lo"), "full lo [95% CI]": fmt(r["full"], "lo"),
              "subset hi [95% CI]": fmt(r["subset"], "hi"), "full hi [95% CI]": fmt(r["full"], "hi"),
              "full inside": "yes" if all(r["full_inside_subset_ci"].values()) else "NO", "corr": r["corr"],
              "mean |diff|": r["mean_abs_diff"], "max |diff|": r["max_abs_diff"]} for k, r in res.items()]  # fmt: skip
    print(tabulate(table, headers="keys", tablefmt="github", floatfmt=".3f"))
    print(f"\nseconds per direction: subset {t['subset']:.1f} ({len(ids)} vignettes), full {t['full']:.1f} "
          f"({len(s.vigs)}); {n} directions")  # fmt: skip
    out = a.out or run.rd.root / "null_check.json"
    atomic_write_json(out, {"run": run.rd.root.name, "n_directions": n, "c": c, "n_subset": len(ids),
                            "n_full": len(s.vigs), "seconds_per_direction": t, "kinds": res})  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    cli(main)
