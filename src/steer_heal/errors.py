"""Exceptions the command line turns into one clear line and a non-zero exit (no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message names the value and what would be valid. Exit code 2."""


class Starved(Exception):
    """The dose controller could not bank enough coherent completions. Exit code 3."""


class NonFiniteLoss(Exception):
    """The heal loss became NaN/inf; the round stops, earlier rounds stay intact. Exit code 4."""


def cli(main) -> None:
    """Run `main(argv) -> exit code` as a command: a UserError becomes one 'error: ...' line and exit 2."""
    import sys

    try:
        code = main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)
