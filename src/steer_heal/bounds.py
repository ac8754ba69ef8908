"""Bounds a flag's meaning puts on it, beyond the range its type declares: values that type-check but cannot
give a meaningful run. Each function returns why a value is refused, with the bound and its reason, or None;
`config.validate` raises the first (and `stages.iso_kl` checks a strength once c* is known).

    strength_error("--alphas", (1e30,), 0.25)    a steering strength beyond float32's resolution of the residual
    lam_schedule_error(0.3, 2000.0, 2)           lambda_r = lambda (1 + r)^p beyond float32 within --n-rounds
    temperature_error(1e-40)                     sampling that is greedy decoding (or NaN)
    decay_error(2e-4, 1e4)                       AdamW decay that wipes the adapter every step
    walk_c_capacity_error(2, 4, 3, 2)            more completions needed than walk-C can generate
"""

from __future__ import annotations

import math
import sys

FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: the heal's losses and the steering run in float32
FLOAT32_EPS = 2.0**-24  # float32's relative resolution (24-bit significand)
# A steering strength c adds c·v to a block's output h. The vector v = mean(h_pos) - mean(h_neg) is at least
# float32's resolution of h (2^-24 |h|), or it is rounding noise and no persona; so at c > 2^48, |c v| exceeds
# 2^24 |h| and h falls below float32's resolution of h + c v: the prompt no longer reaches the steered blocks,
# every completion is the same text whatever its prompt, and no filter dose or iso-KL c* can make it coherent.
# Under --iso-kl a strength is a multiple of c*, itself a strength whose KL is non-zero, so the bound holds too.
STRENGTH_MAX = FLOAT32_EPS**-2


def _g(x: float) -> str:
    return f"{x:.3g}"


def strength_error(opt: str, values: tuple[float, ...], floor: float) -> str | None:
    """Why a steering strength is beyond any meaningful one: each value x `floor` must be <= 2^48 (the
    reason at STRENGTH_MAX). `floor` is the smallest dose multiplier applied to it (walk-C's --kappa-floor
    for --alphas; 1 for --eval-alpha, which is used as given)."""
    worst = max(values, default=0.0)
    if worst * floor <= STRENGTH_MAX:
        return None
    dose = f" (even at walk-C's lowest dose, x --kappa-floor {floor:g})" if floor < 1 else ""
    return (
        f"{opt} {_g(worst)} is beyond any meaningful strength: above 2^48 ({_g(STRENGTH_MAX)}) x the vector{dose}, "
        "the prompt's activations fall below float32's resolution of the steered sum (a vector is at least "
        "2^-24 of them, or it is rounding noise), so every completion would be the same text whatever its "
        f"prompt; valid: <= {_g(STRENGTH_MAX / floor)}"
    )


def lam_schedule_error(lam: float, power: float, n_rounds: int) -> str | None:
    """Why lambda_r = lam (1 + r)^power cannot be used in every round r < n_rounds: its largest value must be a
    float32 number (the barrier is computed in float32; an infinite weight makes every heal step's loss
    non-finite), and its factor (1 + r)^power a Python float (or computing it raises). Found in logs, so the
    check itself never overflows."""
    why = "the barrier is computed in float32: an infinite weight makes every heal step's loss non-finite"
    if lam > FLOAT32_MAX:
        return f"--lam {lam:g} is beyond float32's largest value {_g(FLOAT32_MAX)} ({why}); valid: --lam <= 3.4e38"
    if lam == 0 or n_rounds < 2 or power <= 0:
        return None  # no barrier at all, or (1 + r)^p <= 1 in every round: lambda_r <= lambda
    log_n = math.log(n_rounds)  # the largest factor is at the last round, r = n_rounds - 1
    p_max = min(math.log(sys.float_info.max), math.log(FLOAT32_MAX) - math.log(lam)) / log_n
    if power <= p_max:
        return None
    peak = (math.log(lam) + power * log_n) / math.log(10)
    return (
        f"--lam-round-pow {power:g}: lambda_r = --lam {lam:g} x (1 + r)^{power:g} reaches about 1e{peak:.0f} by "
        f"round {n_rounds - 1} of --n-rounds {n_rounds}, beyond float32's largest value {_g(FLOAT32_MAX)} ({why}); "
        f"valid: --lam-round-pow <= {math.floor(p_max * 100) / 100:g} for this --lam and --n-rounds"
    )


# Sampling divides the logits by T. Tokens whose logits differ by d get probabilities in the ratio exp(d / T),
# which passes float32's largest value (exp(88.7)) once d > 88.7 T: below T = 2^-24 every two logits more than
# 5.3e-6 nats apart are one-hot, i.e. the sampler is greedy decoding, and near T ~ 1e-38 the division itself
# overflows to inf and the probabilities to NaN (torch then refuses to sample).
TEMPERATURE_MIN = FLOAT32_EPS


def temperature_error(t: float) -> str | None:
    if t >= TEMPERATURE_MIN:
        return None
    gap = math.log(FLOAT32_MAX) * TEMPERATURE_MIN
    return (
        f"--temperature {_g(t)} is below 2^-24 ({_g(TEMPERATURE_MIN)}): sampling divides the logits by it, and any "
        f"two logits more than {_g(gap)} nats apart are then one-hot in float32, which is greedy decoding, not "
        "sampling (near 1e-38 the division overflows to NaN); valid: a temperature >= 2^-24"
    )


def decay_error(lr: float, weight_decay: float) -> str | None:
    """AdamW multiplies each adapter weight by (1 - lr x weight_decay) every step: at >= 1 the adapter is
    zeroed (or flipped and grown) at every step, whatever the gradient says."""
    if lr * weight_decay < 1:
        return None
    return (
        f"--lr {lr:g} x --weight-decay {weight_decay:g} = {_g(lr * weight_decay)} must be < 1: AdamW multiplies every "
        "adapter weight by 1 - lr x weight_decay each step, so at >= 1 the adapter is wiped (or flipped) every step"
    )


def walk_c_capacity_error(min_train: int, n_prompts: int, n_alphas: int, max_batches: int) -> str | None:
    """A round generates at most n_prompts x n_alphas rows per generate call and max_batches calls: fewer rows
    than --min-train means the round starves (exit 3) after generating all of them, whatever the filter keeps."""
    most = n_prompts * n_alphas * max_batches
    if min_train <= most:
        return None
    return (
        f"--min-train {min_train} is more than a round can ever generate: --n-prompts {n_prompts} x {n_alphas} "
        f"strength(s) (--alphas) x --max-collect-batches {max_batches} = {most} completions, so every round would "
        f"starve; valid: --min-train <= {most}, or more prompts, strengths or batches"
    )
