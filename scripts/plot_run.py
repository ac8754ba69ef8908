"""Rebuild summary.md and trajectory.png of a run from its events.jsonl alone (e.g. an interrupted run).

uv run python scripts/plot_run.py out/<run>
"""

from __future__ import annotations

from pathlib import Path

from steer_heal import report
from steer_heal.cli import ArgumentParser, cli


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    a = ap.parse_args(argv)
    rep = report.build(a.run_dir)
    print(rep.table + "\n\n" + rep.q0 + "\n\n" + rep.verdict)
    print(f"wrote {a.run_dir / 'trajectory.png'} and summary.md")
    return 0


if __name__ == "__main__":
    cli(main)
