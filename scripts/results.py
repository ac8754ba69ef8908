"""Aggregate the results ledger by arm: every headline figure with n, mean ± sd and a 95 % t-interval
across the arm's seeds (an arm = the whole config minus the seed, unless --by names ledger fields).

    uv run python scripts/results.py [--ledger out/results.jsonl] [--by reg lam] [--out FILE]

Headline figures: the last round's dTrait / coherence / retain / ref_nll, where its shift falls against
the random null (null_pct), the best round's dTrait, and the frontier advantages A_steer / A_prompt
wherever scripts/diag_frontier.py wrote <run>/frontier.json. An interval over fewer than 3 seeds is
flagged: it is not a claim. An arm's runs must have distinct seeds (reruns of one seed are refused: n counts
seeds).
"""

from __future__ import annotations

from pathlib import Path

from steer_heal import ledger
from steer_heal.cli import ArgumentParser, cli
from steer_heal.errors import UserError
from steer_heal.rundir import atomic_write_json


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--ledger", type=Path, default=Path("out/results.jsonl"))
    ap.add_argument("--by", nargs="+", help="group by these ledger fields (default: the config minus the seed)")
    ap.add_argument("--out", type=Path, help="write the aggregate as JSON here")
    a = ap.parse_args(argv)
    rows = ledger.with_frontier(ledger.read(a.ledger), a.ledger)
    if not rows:
        raise UserError(f"no rows in {a.ledger}; a finished run appends one to <out-dir>/results.jsonl")
    print(ledger.table(rows, a.by))
    if a.out:
        atomic_write_json(a.out, {"ledger": str(a.ledger), "arms": ledger.aggregate(rows, a.by)})
    return 0


if __name__ == "__main__":
    cli(main)
