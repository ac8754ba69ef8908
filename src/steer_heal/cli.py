"""Command-line plumbing shared by `python -m steer_heal.run` and every script: logging set up for a
person skimming the tail, third-party noise quieted, and bad input turned into one line.

    if __name__ == "__main__":
        cli(main)          # main(argv) -> exit code
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

from loguru import logger

from steer_heal.errors import UserError


def setup_logging() -> None:
    """Short timestamped log lines on stderr; transformers' and peft's chatter off."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logger.remove()
    logger.add(sys.stderr, level="INFO", format="<green>{time:HH:mm:ss}</green> {level: <7} {message}")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def command(main, argv: list[str]) -> int:
    """Run `main(argv) -> exit code`. A UserError becomes one 'error: ...' line on stderr and exit 2,
    Ctrl-C one 'interrupted' line and exit 130, an I/O failure (e.g. a full disk) one line and exit 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


def cli(main) -> None:
    """The entry point of a script: logging set up, then `command(main, sys.argv[1:])` as the exit code."""
    setup_logging()
    sys.exit(command(main, sys.argv[1:]))


# ---------------------------------------------------------------- argparse value types for the scripts


def _number(kind, ok, what):
    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"{text} must be {what}")
        return x

    return parse


positive_int = _number(int, lambda x: x >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda x: x >= 0, "an integer >= 0")
nonneg_float = _number(float, lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0")
