"""Aggregate the results ledger by arm: every headline figure with n, mean ± sd and a 95 % t-interval
across the arm's seeds (an arm = the whole config minus the seed, unless --by names ledger fields).

    uv run python scripts/results.py [--ledger out/results.jsonl] [--by reg lam] [--out FILE]

Headline figures: the last round's dTrait / coherence / retain / ref_nll, where its shift falls against
the random null (null_pct), the best round's dTrait, and the frontier advantages A_steer / A_prompt
wherever scripts/diag_frontier.py wrote <run>/frontier.json. An interval over fewer than 3 seeds is
flagged: it is not a claim.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tabulate import tabulate

from steer_heal import ledger
from steer_heal.cli import cli
from steer_heal.errors import UserError
from steer_heal.rundir import atomic_write_json


def cell(t: dict) -> str:
    """'-0.600 ± 0.141 [-1.871, +0.671]' (mean ± sd [95 % t-interval]); the mean alone for one run."""
    if not t or t["mean"] is None:
        return ""
    if t["sd"] is None:
        return f"{t['mean']:+.3f}"
    return f"{t['mean']:+.3f} ± {t['sd']:.3f} [{t['lo']:+.3f}, {t['hi']:+.3f}]"


def table(rows: list[dict], by: list[str] | None = None) -> str:
    agg = ledger.aggregate(rows, by)
    shown = [m for m in ledger.HEADLINE if any(a[m]["n"] for a in agg)]
    names = by or ["arm"]
    lines = [{**{k: a[k] for k in names}, "runs": a["runs"], "seeds": a["seeds"], **{m: cell(a[m]) for m in shown}}
             for a in agg]  # fmt: skip
    note = [f"{', '.join(str(a[k]) for k in names)}: n = {a['runs']} < 3 seeds, the interval is not a claim"
            for a in agg if a["runs"] < 3]  # fmt: skip
    return tabulate(lines, headers="keys", tablefmt="github") + ("\n\n" + "\n".join(note) if note else "")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ledger", type=Path, default=Path("out/results.jsonl"))
    ap.add_argument("--by", nargs="+", help="group by these ledger fields (default: the config minus the seed)")
    ap.add_argument("--out", type=Path, help="write the aggregate as JSON here")
    a = ap.parse_args(argv)
    rows = ledger.with_frontier(ledger.read(a.ledger), a.ledger)
    if not rows:
        raise UserError(f"no rows in {a.ledger}; a finished run appends one to <out-dir>/results.jsonl")
    print(table(rows, a.by))
    if a.out:
        atomic_write_json(a.out, {"ledger": str(a.ledger), "arms": ledger.aggregate(rows, a.by)})
    return 0


if __name__ == "__main__":
    cli(main)
