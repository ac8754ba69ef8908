"""Exceptions the command line turns into one clear line and a non-zero exit (no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message names the value and what would be valid. Exit code 2."""


class Starved(Exception):
    """The dose controller could not bank enough coherent completions. Exit code 3."""


class NonFiniteLoss(Exception):
    """The heal loss became NaN/inf; the round stops, earlier rounds stay intact. Exit code 4."""


class OutOfMemory(UserError):
    """Out of memory even after halving the batch once; the message names the flag to lower. Exit code 2."""


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def halve_and_retry(items: list, fn, what: str) -> list:
    """After an out-of-memory error on `items`: free memory, run `fn(half, i)` on each half, concatenate.

    A second out-of-memory error is final: it raises OutOfMemory naming `what` (the flag to lower)."""
    import torch
    from loguru import logger

    free_memory()
    if len(items) < 2:
        raise OutOfMemory(f"out of memory on a single row; lower {what} or use a smaller model / shorter inputs")
    mid = len(items) // 2
    logger.warning(f"out of memory on a batch of {len(items)}; retrying as two batches of <= {len(items) - mid}")
    try:
        out = []
        for i, half in enumerate((items[:mid], items[mid:])):
            out += fn(half, i)
        return out
    except torch.OutOfMemoryError as e:
        free_memory()
        raise OutOfMemory(
            f"out of memory on a batch of {len(items)} and again on half of it; lower {what} "
            f"(to {max(1, mid // 2)} or less)"
        ) from e


def exit_code(e: BaseException) -> int:
    """The process exit code for an error that ends a run: 2 bad input / out of memory, 3 starved, 4 NaN."""
    for kind, code in ((UserError, 2), (Starved, 3), (NonFiniteLoss, 4)):
        if isinstance(e, kind):
            return code
    raise TypeError(f"no exit code for {type(e).__name__}") from e
