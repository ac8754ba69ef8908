"""Aggregate the results ledger into a markdown table per arm (reg x barrier_ref x lam x kl_agg by
default), mean ± standard deviation over seeds.

    uv run python scripts/results.py [--ledger out/results.jsonl] [--by reg barrier_ref]
"""

from __future__ import annotations

import argparse
import statistics

from tabulate import tabulate

from steer_heal import ledger
from steer_heal.cli import cli
from steer_heal.errors import UserError

METRICS = ("final_dtrait", "final_coh", "final_retain", "best_dtrait", "n_rounds_done")


def mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if isinstance(x, (int, float))]
    if not xs:
        return ""
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):+.3f} ± {sd:.3f}"


def table(rows: list[dict], by: list[str]) -> str:
    arms: dict[tuple, list[dict]] = {}
    for r in rows:
        arms.setdefault(tuple(r.get(k) for k in by), []).append(r)
    out = []
    for key, rs in sorted(arms.items(), key=lambda kv: str(kv[0])):
        out.append(
            {
                **dict(zip(by, key)),
                "runs": len(rs),
                "seeds": sorted({r.get("seed") for r in rs}, key=str),
                **{m: mean_sd([r.get(m) for r in rs]) for m in METRICS},
            }
        )
    return tabulate(out, headers="keys", tablefmt="github")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ledger", default="out/results.jsonl")
    ap.add_argument("--by", nargs="+", default=["preset", "reg", "barrier_ref", "lam", "kl_agg"])
    a = ap.parse_args(argv)
    rows = ledger.read(a.ledger)
    if not rows:
        raise UserError(f"no rows in {a.ledger}; a finished run appends one to <out-dir>/results.jsonl")
    print(table(rows, a.by))
    return 0


if __name__ == "__main__":
    cli(main)
