"""Collapse early warning: per round, the collapse signals next to coherence, and whether each led the drop.

    uv run python scripts/diag_collapse.py out/<run> [--coh-drop 0.1] [--move 0.1] [--out FILE]

Reads only events.jsonl. A coherence drop is the first round whose healed coherence is at least
`--coh-drop` below the base model's. A signal "moves" in the first round where its change relative to
the base value reaches `--move` (10 % by default) in its warning direction (PR / effective rank /
entropy p5 falling, amplification rising, mean entropy either way). lead = drop round - move round:
positive means the signal warned that many rounds early, 0 means at the same round, negative late.
"""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from steer_heal import collapse, report
from steer_heal.cli import ArgumentParser, cli, nonneg_float
from steer_heal.errors import UserError
from steer_heal.records import RunInfo
from steer_heal.rundir import atomic_write_json


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--coh-drop", type=nonneg_float, default=0.1, help="coherence fall below base = a drop")
    ap.add_argument("--move", type=nonneg_float, default=0.1, help="relative change vs base = a move")
    ap.add_argument("--out", type=Path, help="write the tables as JSON here")
    a = ap.parse_args(argv)
    rows = report.collapse_rows(RunInfo.read(a.run_dir))
    if not rows or rows[0]["round"] != "base":
        raise UserError(f"{a.run_dir} has no collapse records (run made before events schema 1.1?)")
    base, rounds = rows[0], rows[1:]
    if base.get("coherence") is None:
        raise UserError(f"{a.run_dir} has no base eval record: no coherence to measure a drop against")
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3f", missingval=""))
    drop, lag = collapse.lead_lag(base, rounds, "coherence", collapse.SIGNALS, a.coh_drop, a.move)
    when = f"round {drop}" if drop is not None else f"none (no round fell {a.coh_drop} below base)"
    print(f"\ncoherence drop (>= {a.coh_drop} below base {base['coherence']:.3f}): {when}")
    print(f"signal moves (>= {a.move:.0%} vs base in the warning direction):\n")
    print(tabulate(lag, headers="keys", tablefmt="github", missingval=""))
    if a.out:
        atomic_write_json(a.out, {"run": a.run_dir.name, "rows": rows, "drop_round": drop, "lead_lag": lag})
        print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    cli(main)
