"""Baselines and controls: does baking beat prompting, and is the shift specific to the vector?

    uv run python scripts/diag_prompt_baseline.py out/<run> [--n-random 3] [--n-vignettes 70]
        [--eval-vignettes PATH] [--out baseline.json]

Scored side by side on the same vignettes, from the run's stored config:
  base            the original model
  system prompt   the original model with the persona written into the system prompt (no weights changed)
  random vector   the original model steered by a random direction with the teacher vector's norm at every
                  band layer, at the run's round-0 strength (one row per seed, then their mean)
  steered         the original model steered by the round-0 teacher vector at that strength
  healed rN       the student after each completed round, unsteered
dTrait / dCoh are against base; retain = dTrait / dTrait(steered).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from steer_heal import extract, paired
from steer_heal.cli import ArgumentParser, cli, positive_int
from steer_heal.evaluate import Scored


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--n-random", type=positive_int, default=3, help="random vectors (seeds 0..N-1)")
    ap.add_argument("--n-vignettes", type=positive_int, help="score only the first N vignettes (balanced order)")
    ap.add_argument("--eval-vignettes", help="score on these vignettes instead of the run's")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    run = paired.open_run(a.run_dir, a.eval_vignettes, a.n_vignettes)
    s, tk, done = run.s, run.trait_key, run.require_rounds()
    c, v0 = run.steered_c(0), run.rd.vectors(0)
    print(f"{run.rd.root.name}: {len(s.vigs)} vignettes from {s.vig_source}; c = {c:g}; rounds {done}", file=sys.stderr)

    base = s.evaluate(desc="eval base")
    steered = s.evaluate(v0, c, desc="eval steered")
    rows = [paired.row("base", base, base, run)]
    system = s.persona.system(True)
    ev = s.evaluate(system=system, desc="eval system prompt")
    rows.append(paired.row("system prompt", ev, base, run, steered=steered, system=system))
    rand = []
    for seed in range(a.n_random):
        ev = s.evaluate(extract.random_like(v0, seed), c, desc=f"eval random {seed}")
        rand.append(paired.row(f"random vector s{seed}", ev, base, run, steered=steered, c=c, seed=seed))
    rows += rand
    if len(rand) > 1:
        mean = Scored({k: statistics.fmean(r[k] for r in rand) for k in (tk, "coherence", "ref_nll")}, None)
        rows.append(paired.row(f"random vector (mean of {len(rand)})", mean, base, run, steered=steered, c=c))
    rows.append(paired.row(f"steered c={c:g}", steered, base, run, steered=steered, c=c))
    rows += paired.healed_rows(run, base, steered)
    paired.report(rows, run, a.out)
    print(f"\nsystem prompt: {system!r}\nvector norm {extract.norm(v0):.3f}")
    return 0


if __name__ == "__main__":
    cli(main)
