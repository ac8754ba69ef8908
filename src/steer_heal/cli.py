"""Command-line plumbing shared by `python -m steer_heal.run` and every script: logging set up for a
person skimming the tail, third-party noise quieted, and bad input turned into one line.

    ap = ArgumentParser(description=__doc__)   # a script's own arguments: a mistake is one error line too
    if __name__ == "__main__":
        cli(main)          # main(argv) -> exit code
"""

from __future__ import annotations

import argparse
import math
import os
import re
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


def one_line(text: str) -> str:
    """text as one printable line: line breaks (a library's message may hold some) become spaces, and bytes
    that were not UTF-8 (lone surrogates, from a file name) become escapes instead of an encoding error."""
    return re.sub(r"\s*\n\s*", " ", text).strip().encode("utf-8", "backslashreplace").decode("utf-8")


def command(main, argv: list[str]) -> int:
    """Run `main(argv) -> exit code`. A UserError becomes one 'error: ...' line on stderr and exit 2,
    Ctrl-C one 'interrupted' line and exit 130, an I/O failure (e.g. a full disk) one line and exit 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {one_line(f'{e.strerror or e}{where}')}", file=sys.stderr)
        return 2


def cli(main) -> None:
    """The entry point of a script: logging set up, then `command(main, sys.argv[1:])` as the exit code."""
    setup_logging()
    sys.exit(command(main, sys.argv[1:]))


# ---------------------------------------------------------------- argparse for the scripts


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: a mistake is a UserError, so `command` prints it as the run prints its own, in one
    `error:` line (argparse prints its usage and then the error, and exits itself). --help is unchanged."""

    def __init__(self, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kw)

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


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
