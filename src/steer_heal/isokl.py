"""Iso-KL calibration: the steering strength c* at which the vector costs a chosen divergence.

    D(c) = p95 over completion tokens of KL(steered at c || unsteered), on the model's own steered samples

A raw vector's useful strength differs between models, layers and rounds; calibrating to D(c*) = target
(default 1 nat) makes "alpha = 2" mean the same dose everywhere. D rises with c (D(0) = 0 exactly), so
c* is found by bracketing (doubling / halving from c0) and bisecting in log c to a tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from steer_heal.generate import Row, Sampling, generate
from steer_heal.hooks import steer
from steer_heal.losses import KL, completion_batch, completion_terms, selected_hidden
from steer_heal.models import input_device
from steer_heal.tokens import batches


def solve_log(
    f: Callable[[float], float], target: float, c0: float = 1.0, tol: float = 0.05, max_evals: int = 24
) -> tuple[float, float, list[tuple[float, float]]]:
    """c with f(c) ~= target for an increasing f, by doubling/halving then bisection in log c.

    Stops when the bracket satisfies log(hi / lo) <= tol (c known to within ~tol relative) or after
    `max_evals` evaluations. Returns (c*, f(c*), every (c, f(c)) tried). c* is the bracket end whose
    value is closer to the target. Raises ValueError if no c below and no c above the target was found
    within `max_evals` (f levels off below the target, or is above it even at tiny c)."""
    if target <= 0 or c0 <= 0 or tol <= 0:
        raise ValueError(f"need target > 0, c0 > 0, tol > 0; got {target}, {c0}, {tol}")
    tried: list[tuple[float, float]] = []

    def ev(c: float) -> float:
        y = f(c)
        tried.append((c, y))
        return y

    lo = hi = c0
    y = ev(c0)
    if y < target:
        while y < target and len(tried) < max_evals:
            lo, hi = hi, hi * 2
            y = ev(hi)
    else:
        while y >= target and len(tried) < max_evals:
            hi, lo = lo, lo / 2
            y = ev(lo)
    while math.log(hi / lo) > tol and len(tried) < max_evals:
        mid = math.sqrt(lo * hi)
        if ev(mid) < target:
            lo = mid
        else:
            hi = mid
    values = dict(tried)
    if not (min(values.values()) < target <= max(values.values())):
        c_lo, c_hi = min(values), max(values)
        raise ValueError(
            f"could not bracket the target {target}: f ranged {min(values.values()):.3g}..{max(values.values()):.3g} "
            f"over c in [{c_lo:.3g}, {c_hi:.3g}] in {len(tried)} evaluations"
        )
    best = min((lo, hi), key=lambda c: abs(values[c] - target) if c in values else math.inf)
    return best, values[best], tried


@torch.no_grad()
def steered_kl_p95(
    model: nn.Module,
    tok,
    prompt_ids: list[list[int]],
    vectors: dict[int, torch.Tensor],
    c: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    q: float = 0.95,
    chunk: int = 256,
) -> float:
    """The q-quantile of per-token KL(steered || unsteered) over greedy completions steered at c.

    "Unsteered" is the same model without the hook (the current student, in round r > 0). The
    log-softmax runs in chunks of `chunk` positions from hidden states, so no [K, V] tensor is held."""
    if c == 0:
        return 0.0
    rows = [Row(i, "", ids, c, c) for i, ids in enumerate(prompt_ids)]
    greedy = Sampling(max_new_tokens, do_sample=False)
    comps = generate(
        model, tok, rows, vectors, sampling=greedy, batch_size=batch_size, seed=seed, desc=f"iso-KL c={c:.3g}"
    )
    pairs = [(x.prompt_ids, x.ids) for x in comps if x.ids]
    dev = input_device(model)
    kls = []
    for rows_b in batches(pairs, batch_size):
        b = completion_batch(rows_b, tok.pad_token_id, dev)
        with steer(model, vectors, c):
            h_s = selected_hidden(model, b)
        kl = completion_terms(model, h_s, b["targets"], selected_hidden(model, b), KL["kl_rev"], chunk).kl
        kls.append(kl.float().cpu())
    return float(torch.quantile(torch.cat(kls), q))
