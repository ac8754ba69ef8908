"""Stages table: base, steered at several strengths, and each round's healed student, all paired.

    uv run python scripts/diag_stages.py out/<run> [--cs 1 2 3] [--n-vignettes 70]
        [--eval-vignettes PATH] [--out stages.json]

Every row is scored now, on the same vignettes, from the run's stored config: the base model, the base
model steered by the round-0 teacher vector at each c in --cs (plus the run's own round-0 eval strength),
and the student after each completed round (its adapters re-attached from the run directory, unsteered).
dTrait / dCoh are against the base row; retain = dTrait(healed) / dTrait(steered at the run's strength);
slope = 100 * dCoh / dTrait. Use --eval-vignettes to re-score a run on a held-out set.
"""

from __future__ import annotations

import sys
from pathlib import Path

from steer_heal import paired
from steer_heal.cli import ArgumentParser, cli, nonneg_float, positive_int


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--cs", nargs="+", type=nonneg_float, default=[1.0, 2.0, 3.0], help="steering strengths to score")
    ap.add_argument("--n-vignettes", type=positive_int, help="score only the first N vignettes (balanced order)")
    ap.add_argument("--eval-vignettes", help="score on these vignettes instead of the run's")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    run = paired.open_run(a.run_dir, a.eval_vignettes, a.n_vignettes)
    s, done = run.s, run.require_rounds()
    c_run, v0 = run.steered_c(0), run.rd.vectors(0)
    print(f"{run.rd.root.name}: {len(s.vigs)} vignettes from {s.vig_source}; rounds {done}", file=sys.stderr)

    base = s.evaluate(desc="eval base")
    rows = [paired.row("base", base, base, run, stage="base")]
    ref = None
    for c in sorted({*a.cs, c_run}):
        ev = s.evaluate(v0, c, desc=f"eval steered c={c:g}")
        label = f"steered c={c:g}" + (" (run)" if c == c_run else "")
        rows.append(paired.row(label, ev, base, run, stage="steered", c=c))
        ref = ev if c == c_run else ref
    rows += paired.healed_rows(run, base, ref)
    paired.report(rows, run, a.out)
    print(f"\nretain is against steered c={c_run:g} (the strength the run evaluated round 0 at)")
    return 0


if __name__ == "__main__":
    cli(main)
