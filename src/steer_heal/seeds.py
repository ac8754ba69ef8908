"""Every random stream of a run, seeded from one place: derive(run seed, stage, round, index).

    derive(cfg.seed, "generate", r, b)     # walk-C batch b of round r
    derive(cfg.seed, "null", -1, i)        # random direction i of the null (measured once, round -1 = the run)
    child(seed, b)                         # the b-th generation chunk inside one generate call

Round -1 is the run as a whole (the base stage, the null, the data order); index numbers the draws of one stage
in one round (batches, directions).
"""

from __future__ import annotations

STAGES = (
    "contexts",  # the extraction contexts' order
    "prompts",  # the generation prompts' order
    "global",  # Python's and torch's global generators (the tiny random model's weights, LoRA dropout)
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


def derive(run_seed: int, stage: str, round: int = -1, index: int = 0) -> int:
    """The seed of draw `index` of `stage` in `round` of the run seeded `run_seed`.

    These are the formulas each stage used before they were gathered here, so the numbers of every run so far
    are unchanged; they collide (round 20 of seed s is round 0 of seed s+1; round 19's on-policy draw is the
    entropy seed), which the next change replaces."""
    if stage not in STAGES:
        raise ValueError(f"seed stage {stage!r}; valid: {', '.join(STAGES)}")
    s = run_seed
    legacy = {
        "prompts": s + 1,
        "generate": s * 1000 + round * 50 + index,
        "on_policy": s * 1000 + round * 50 + 49,
        "entropy": s * 1000 + 999,
        "null": s * 1000 + index,
        "heal_init": s * 7919 + round,
        "heal_order": s * 31 + round,
        "screen": 10**6 + 1000 * s + index,
    }
    return legacy.get(stage, s)


def child(seed: int, index: int, retry: int | None = None) -> int:
    """The seed of chunk `index` inside one call seeded `seed` (of its `retry`-th half after out of memory)."""
    base = seed * 100_003 + index
    return base if retry is None else base + 7919 * (retry + 1)
