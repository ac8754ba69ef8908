"""Collapse early-warning signals, measured per round on the unsteered student (and once on the base).

Upstream's loop failed by coherence collapse with no warning before the eval number fell. These are
cheap precursors, logged so a user can test whether they really lead the coherence drop:

- dimensional budget: participation ratio and effective rank of the residual-stream covariance at the
  last prompt token over neutral prompts (band layers and the final layer). Falling = lost dimensions.
- output entropy: next-token entropy along the student's own sampled completions (mean and 5th pct).
  Too low = mode collapse / loops; too high = noise.
- amplification gauge (optional): sigma_max of the Jacobian of the band's output with respect to its
  input at the last prompt token, by power iteration with torch.func jvp / vjp. Rising = brittle.

With N prompts the covariance has rank <= N - 1, so PR and effective rank are capped at N - 1: compare
them across rounds of one run (same prompts), not against the hidden size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from steer_heal.hooks import _hidden, _resolve
from steer_heal.losses import completion_batch, lm_logits, selected_hidden
from steer_heal.models import input_device, unwrap
from steer_heal.tokens import batches

# ---------------------------------------------------------------- pure maths


def covariance_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the sample covariance of rows x [N, d]: lambda_i = s_i^2 / (N - 1), s = svd(x - mean).

    Computed from the singular values of the centred data (float64), so no d x d matrix is formed."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need activations [N >= 2, d], got shape {tuple(x.shape)}")
    xc = x.double() - x.double().mean(0)
    return torch.linalg.svdvals(xc) ** 2 / (x.shape[0] - 1)


def participation_ratio(x: torch.Tensor) -> float:
    """PR = (sum_i lambda_i)^2 / sum_i lambda_i^2 of the covariance of x [N, d]; in [1, min(N - 1, d)]."""
    lam = covariance_spectrum(x)
    return float(lam.sum() ** 2 / (lam**2).sum().clamp_min(1e-300))


def effective_rank(x: torch.Tensor) -> float:
    """exp(H(p)) with p_i = lambda_i / sum_j lambda_j (Roy & Vetterli's effective rank)."""
    lam = covariance_spectrum(x)
    p = lam / lam.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def token_entropy(logp: torch.Tensor) -> torch.Tensor:
    """H_k = -sum_v p_kv log p_kv for log-probabilities [K, V] -> [K] nats (fp32, 0 log 0 = 0)."""
    logp = logp.float()
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


def top_singular_value(
    jvp: Callable[[torch.Tensor], torch.Tensor],
    vjp: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    n_iter: int,
    generator: torch.Generator | None = None,
    dtype=torch.float32,
    device=None,
) -> float:
    """sigma_max(J) by power iteration on J^T J: v <- J^T J v / |J^T J v|, sigma = |J v|.

    `jvp(v)` = J v and `vjp(u)` = J^T u; J is never built. Converges at rate (sigma_2 / sigma_1)^2."""
    v = torch.randn(dim, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(n_iter):
        u = jvp(v)
        sigma = float(u.float().norm())
        w = vjp(u)
        n = w.float().norm()
        if not torch.isfinite(n) or n == 0:
            break
        v = (w / n).to(dtype)
    return sigma


# ---------------------------------------------------------------- measurements on a model


@torch.no_grad()
def output_entropy(
    model: nn.Module, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, chunk: int = 256
) -> dict:
    """Next-token entropy of `model` at every completion position of its own (prompt, completion) pairs.

    The LM head and log-softmax run on `chunk` positions at a time (no [K, V] tensor for all of them)."""
    dev = input_device(model)
    hs = []
    for rows in batches([p for p in pairs if p[1]], batch_size):
        h = selected_hidden(model, completion_batch(rows, pad_id, dev))
        for i in range(0, h.shape[0], chunk):
            hs.append(token_entropy(F.log_softmax(lm_logits(model, h[i : i + chunk]), dim=-1)).cpu())
    if not hs:
        return {"entropy_mean": None, "entropy_p5": None, "entropy_tokens": 0}
    h = torch.cat(hs)
    return {
        "entropy_mean": float(h.mean()),
        "entropy_p5": float(torch.quantile(h, 0.05)),
        "entropy_tokens": int(h.numel()),
    }


class _Stop(Exception):
    """Raised by the output hook so the forward pass ends at the band's last block."""


def band_map(model: nn.Module, ids: list[int], lo: int, hi: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """f(delta) = output of block `hi` at the last token when `delta` is added to block `lo`'s input there.

    The Jacobian of f at delta = 0 is d h_hi[-1] / d h_lo-input[-1] (other positions held fixed). The
    forward pass stops at block `hi`; blocks after the band never run."""
    (_, first), (_, last) = _resolve(model, [lo, hi])
    dev = input_device(model)
    x = torch.tensor([ids], device=dev)

    def f(delta: torch.Tensor) -> torch.Tensor:
        out = {}

        def pre(_mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            h = torch.cat([h[:, :-1], h[:, -1:] + delta.to(h.dtype)], dim=1)
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        def post(_mod, _inp, output):
            out["h"] = _hidden(output)[0, -1]
            raise _Stop

        handles = [first.register_forward_pre_hook(pre, with_kwargs=True), last.register_forward_hook(post)]
        try:
            model(input_ids=x, use_cache=False)
        except _Stop:
            pass
        finally:
            for hd in handles:
                hd.remove()
        return out["h"]

    return f


def amplification(
    model: nn.Module, prompts: list[list[int]], lo: int, hi: int, n_iter: int, seed: int = 0
) -> dict[str, float | list[float]]:
    """sigma_max of d h_hi / d h_lo-input at the last prompt token, per prompt (torch.func jvp / vjp)."""
    from torch.func import jvp, vjp

    p0 = next(model.parameters())
    dim = int(_hidden_size(unwrap(model)))
    gen = torch.Generator().manual_seed(seed)
    sig = []
    with eager_attention(model):
        for ids in tqdm(prompts, desc="amplification", leave=False):
            f = band_map(model, ids, lo, hi)
            zero = torch.zeros(dim, device=p0.device, dtype=p0.dtype)
            _, vjp_fn = vjp(f, zero)  # one forward; reused for every J^T u
            sig.append(
                top_singular_value(
                    lambda v, f=f, zero=zero: jvp(f, (zero,), (v,))[1],
                    lambda u, vjp_fn=vjp_fn: vjp_fn(u.to(p0.dtype))[0],
                    dim,
                    n_iter,
                    gen,
                    p0.dtype,
                    p0.device,
                )
            )
    finite = [s for s in sig if math.isfinite(s)]
    return {"amp": sum(finite) / len(finite) if finite else None, "amp_per_prompt": sig}


@contextmanager
def eager_attention(model: nn.Module):
    """Plain-matmul attention for the duration: torch's fused SDPA kernels have no forward-mode AD."""
    m = unwrap(model)
    before = m.config._attn_implementation
    m.set_attn_implementation("eager")
    try:
        yield
    finally:
        m.set_attn_implementation(before)


def _hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "hidden_size", None) or cfg.text_config.hidden_size


def dimensional_budget(acts: dict[int, torch.Tensor], band: list[int], final: int) -> dict:
    """PR and effective rank at each band layer (mean over the band) and at the final layer."""
    pr = {L: participation_ratio(acts[L]) for L in [*band, final]}
    er = {L: effective_rank(acts[L]) for L in [*band, final]}
    return {
        "pr_band": sum(pr[L] for L in band) / len(band),
        "pr_final": pr[final],
        "erank_band": sum(er[L] for L in band) / len(band),
        "erank_final": er[final],
        "pr_per_layer": {str(L): v for L, v in pr.items()},
        "n_acts": int(acts[final].shape[0]),
    }


# Each signal and the direction in which it warns of collapse: +1 rising, -1 falling, 0 either way
# (mean entropy: too low is loops, too high is noise).
SIGNALS = {
    "pr_band": -1,
    "pr_final": -1,
    "erank_band": -1,
    "erank_final": -1,
    "entropy_mean": 0,
    "entropy_p5": -1,
    "amp": +1,
}


def lead_lag(
    base: dict, rounds: list[dict], coh_key: str, signals: dict[str, int], coh_drop: float, move: float
) -> tuple[int | None, list[dict]]:
    """For each signal, the first round its relative change vs base reaches `move` in its warning direction,
    and how many rounds that came before the first round whose coherence fell by >= `coh_drop` below base.

    Returns (drop round or None, rows of {signal, first_move, lead}); lead > 0 = the signal moved first."""
    drop = next(
        (r["round"] for r in rounds if r.get(coh_key) is not None and base[coh_key] - r[coh_key] >= coh_drop), None
    )
    rows = []
    for s, sign in signals.items():
        b = base.get(s)
        first = None
        if b:
            first = next(
                (r["round"] for r in rounds if r.get(s) is not None and _moved((r[s] - b) / abs(b), sign, move)),
                None,
            )
        lead = drop - first if drop is not None and first is not None else None
        warns = {1: "rises", -1: "falls", 0: "moves"}[sign]
        rows.append({"signal": s, "warns_when": warns, "first_move": first, "lead": lead})
    return drop, rows


def _moved(rel: float, sign: int, move: float) -> bool:
    return abs(rel) >= move if sign == 0 else sign * rel >= move
