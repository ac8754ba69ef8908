"""Every random stream of a run, seeded from one place: derive(run seed, stage, round, index).

    derive(cfg.seed, "generate", r, b)     # walk-C batch b of round r
    derive(cfg.seed, "null", -1, i)        # random direction i of the null (measured once, round -1 = the run)
    child(seed, b)                         # the b-th generation chunk inside one generate call

Round -1 is the run as a whole (the base stage, the null, the data order); index numbers the draws of one stage
in one round (batches, directions).

A seed is the first 63 bits of BLAKE2b over the draw's full name, so two draws share a seed only if they are the
same draw (or by a 2^-63 accident per pair; tests/test_seeds.py checks every round of every allowed --n-rounds
at the first indices of each stage, and 256 null directions). A run records the scheme (SCHEME) in config.json.
Arithmetic schemes (s*1000 + r*50 + b) collide as soon as one field outgrows its stride; a hash has no stride.
"""

from __future__ import annotations

import hashlib

STAGES = (
    "contexts",  # the extraction contexts' order
    "prompts",  # the generation prompts' order
    "global",  # the orchestrator's global generators (seed_globals), and a random model's weights (models.load)
    "calibrate",  # the base model's own samples that set the filter threshold
    "generate",  # walk-C's steered batches
    "on_policy",  # the student's own completions (--heal-data on_policy)
    "entropy",  # the collapse signal's samples (the same every round, so rounds compare)
    "amplification",  # the amplification gauge's random probe
    "null",  # the random directions
    "null_vignettes",  # the null's vignette subset
    "heal_init",  # the LoRA adapter's initial A
    "heal_order",  # the heal's minibatch order
    "bootstrap",  # the vignette resamples every interval shares
    "iso_kl",  # the iso-KL probe (greedy: the seed fixes nothing but is set all the same)
    "samples",  # the greedy samples a person reads
    "complete",  # one-off completions (scripts)
    "screen",  # diag_screen's random directions
)

BITS = 63  # torch, numpy and random all take a non-negative int64
SCHEME = "blake2b-63"  # recorded in a run's config.json: a resume refuses a run seeded by another scheme
LEGACY = "arithmetic"  # what a run without the field was seeded by (before 2026-12-08)


def _hash(*parts: object) -> int:
    """seed = int(BLAKE2b-64("part|part|...")) >> 1: uniform over [0, 2^63), the same on every platform."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - BITS)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"seed {name} {value!r}; valid: an integer >= {low}")


def derive(run_seed: int, stage: str, round: int = -1, index: int = 0) -> int:
    """The seed of draw `index` of `stage` in `round` (-1 = the run as a whole) of the run seeded `run_seed`."""
    if stage not in STAGES:
        raise ValueError(f"seed stage {stage!r}; valid: {', '.join(STAGES)}")
    _check_int("run seed", run_seed, 0)
    _check_int("round", round, -1)
    _check_int("index", index, 0)
    return _hash("derive", run_seed, stage, round, index)


def check_scheme(recorded: str | None, what: str) -> None:
    """Refuse to continue a run seeded by another scheme: its later rounds would draw from other seeds than
    its earlier ones (other contexts, prompts, sampling), so the rounds would not be one run."""
    got = recorded or LEGACY
    if got != SCHEME:
        from steer_heal.errors import UserError

        raise UserError(
            f"{what}: seeded by the {got!r} scheme (runs started before 2026-12-08), this code seeds by {SCHEME!r}; "
            "resume it with the commit that started it (its config.json names it), or start a new run"
        )


def seed_globals(run_seed: int) -> None:
    """Seed Python's and torch's global generators: the orchestrator does this once, before the Session. Nothing
    the numbers depend on should need it (each stage seeds its own draws); it makes whatever does reproducible."""
    import random

    import torch

    seed = derive(run_seed, "global")
    random.seed(seed)
    torch.manual_seed(seed)


def child(seed: int, index: int, retry: int | None = None) -> int:
    """The seed of chunk `index` inside one call seeded `seed` (of its `retry`-th half after out of memory)."""
    _check_int("parent", seed, 0)
    _check_int("chunk", index, 0)
    if retry is not None:
        _check_int("retry", retry, 0)
    return _hash("child", seed, index, "-" if retry is None else retry)
