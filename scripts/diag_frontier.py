"""The frontier of a run: healed rounds against steering, prompting and random directions at matched coherence.

    uv run python scripts/diag_frontier.py out/<run> [--help]

The experiment lives in the package (steer_heal.frontier_run, also `python -m steer_heal.frontier_run`); this
script is its entry point from a checkout.
"""

from steer_heal.cli import cli
from steer_heal.frontier_run import main

if __name__ == "__main__":
    cli(main)
