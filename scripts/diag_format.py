"""Which prompt format suits a pretrained model? The same measurements under each format, side by side.

    uv run python scripts/diag_format.py --formats qa gemma-turn [--out formats.json] [run flags: --preset
        gemma270m, --n-vignettes, --alphas ...]

Per format, on the base model: the eval's answer mass (coherence), top-1 accuracy, and every foundation's
separation (its calibrated log-odds on its own vignettes minus the rest, stats.separation) with a 95 %
bootstrap interval; then the format's own teacher vector, the filter threshold calibrated under it, and one
collect batch of steered samples (--n-prompts prompts x --alphas) scored by the run's filter: kept
fraction, median and 90th-percentile tail perplexity under the original model, and the share that reached
the token cap, per strength. A greedy unsteered and a steered sample of the first prompt close each block.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from tabulate import tabulate

from steer_heal import filters, seeds, stats
from steer_heal.cli import ArgumentParser, cli
from steer_heal.data import FOUNDATIONS, SHORT
from steer_heal.filters import quantile
from steer_heal.formats import FORMATS
from steer_heal.rundir import atomic_write_json
from steer_heal.session import Session
from steer_heal.stages import filter_threshold, score


def separations(s: Session, arm: stats.Arm) -> dict[str, str]:
    """'est [lo, hi]' of every foundation's separation on one arm, over the run's bootstrap draws."""
    idx = s.resamples()
    out = {}
    for f in FOUNDATIONS:
        sep = stats.separation(arm, f)
        out[SHORT[f]] = (
            stats.Estimate.of(stats.est(sep, stats.separation(arm, f, idx))).text() if sep is not None else ""
        )
    return out


def steered_batch(s: Session, v, ppl_max: float) -> list[dict]:
    """One collect batch at the run's alphas (no dose control), each completion judged by the filter."""
    rows = s.prompt_rows(range(min(s.cfg.generate.n_prompts, len(s.prompts))), s.cfg.generate.alphas)
    comps = s.generate(rows, seeds.derive(s.cfg.seed, "complete"), "steered", v)
    return score(s, comps, filters.Thresholds.of(s.cfg.filter, ppl_max))


def per_alpha(scored: list[dict]) -> list[dict]:
    out = []
    for a in sorted({x["alpha"] for x in scored}):
        xs = [x for x in scored if x["alpha"] == a]
        ppl = [x["tail_ppl"] for x in xs if x["tail_ppl"] is not None]
        out.append({
            "alpha": a, "n": len(xs), "kept_frac": sum(x["keep"] for x in xs) / len(xs),
            "median_ppl": statistics.median(ppl) if ppl else None, "p90_ppl": quantile(ppl, 0.9) if ppl else None,
            "capped_frac": sum(x["hit_cap"] for x in xs) / len(xs),
        })  # fmt: skip
    return out


def measure(fmt: str, rest: list[str]) -> dict:
    t0 = time.time()
    s = Session.from_argv([*rest, "--prompt-format", fmt])
    base = s.evaluate(desc=f"eval {fmt}")
    cal = filter_threshold(s)
    v = s.teacher()
    scored = steered_batch(s, v, cal["ppl_max"])
    unsteered, steered = (s.complete(v, [c], s.prompts[0])[0].text for c in (0.0, max(s.cfg.generate.alphas)))
    return {
        "format": fmt, "coherence": base.m["coherence"], "acc": base.m["acc"], "acc_cal": base.m.get("acc_cal"),
        "separation": separations(s, base.arm), "ppl_max": cal["ppl_max"],
        "base_median_ppl": cal["base_median_ppl"], "alphas": per_alpha(scored),
        "sample_unsteered": unsteered, "sample_steered": steered, "seconds": time.time() - t0,
    }  # fmt: skip


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--formats", nargs="+", default=["qa", "gemma-turn"], choices=[f for f in FORMATS if f != "chat"])
    ap.add_argument("--out", type=Path, help="write the measurements as JSON here")
    args, rest = ap.parse_known_args(argv)
    recs = [measure(f, rest) for f in args.formats]
    cols = ["format", "coherence", "acc", "acc_cal", *SHORT.values(), "ppl_max"]
    rows = [[r["format"], r["coherence"], r["acc"], r["acc_cal"], *r["separation"].values(), r["ppl_max"]]
            for r in recs]  # fmt: skip
    print("\nBase model, per format (separation = calibrated log-odds on own vignettes minus the rest, 95% CI):")
    print(tabulate(rows, headers=cols, floatfmt=".3f", tablefmt="github"))
    print("\nOne steered batch per format, judged by the run's filter:")
    arows = [[r["format"], *a.values()] for r in recs for a in r["alphas"]]
    print(tabulate(arows, headers=["format", *recs[0]["alphas"][0]], floatfmt=".3g", tablefmt="github"))
    for r in recs:
        print(f"\n--- {r['format']} ({r['seconds']:.0f} s) unsteered ---\n{r['sample_unsteered'][:300]}")
        print(f"--- {r['format']} steered ---\n{r['sample_steered'][:300]}")
    if args.out:
        atomic_write_json(args.out, {"records": recs})
    return 0


if __name__ == "__main__":
    cli(main)
