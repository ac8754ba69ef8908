"""Rebuild summary.md and trajectory.png of a run from its events.jsonl alone (e.g. an interrupted run).

uv run python scripts/plot_run.py out/<run>
"""

from __future__ import annotations

import sys
from pathlib import Path

from steer_heal import report
from steer_heal.errors import cli


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    rep = report.build(Path(argv[0]))
    print(rep["table"] + "\n\n" + rep["q0"] + "\n\n" + rep["verdict"])
    print(f"wrote {Path(argv[0]) / 'trajectory.png'} and summary.md")
    return 0


if __name__ == "__main__":
    cli(main)
