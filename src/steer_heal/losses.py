"""Pure loss maths, plus the one place that turns (prompt, completion) pairs into selected logits.

Memory: the LM head and log-softmax run only on completion positions. We take the final hidden state
[B, T, H], gather the K completion positions -> [K, H], and only then project to [K, V]. The full
[B, T, V] log-probability tensor is never built (at V = 262k that is what ran out of memory upstream).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from steer_heal.models import input_device, unwrap
from steer_heal.tokens import batches, pad

# ---------------------------------------------------------------- batches of (prompt, completion)


def completion_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows and the exact completion selection.

    Position t predicts token t+1, so completion token j of row b (at t = len(prompt)+j) is predicted at
    t - 1. Returns enc (input_ids, attention_mask, position_ids), `rows`/`cols` (the predicting positions),
    `targets` (the completion ids), `seg` (row index per selected position). Nothing else is selected:
    no prompt token and no padding is ever a target."""
    enc = pad([p + c for p, c in pairs], pad_id, "right", device)
    rows, cols, targets = [], [], []
    for b, (p, c) in enumerate(pairs):
        if not c:
            raise ValueError(f"row {b} has an empty completion")
        rows += [b] * len(c)
        cols += range(len(p) - 1, len(p) + len(c) - 1)
        targets += c
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return {"enc": enc, "rows": t(rows), "cols": t(cols), "targets": t(targets), "seg": t(rows)}


def final_hidden(model: nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last-layer hidden state after the final norm, [B, T, H], from the decoder stack alone: no LM head,
    and no per-layer hidden states kept (asking the full model for output_hidden_states holds all nl + 1 of
    them, 3.8 GiB for a 64 x 355-token batch on gemma-3-4b) and no KV cache (another 3 GiB there). LoRA
    layers and hooks live inside the decoder, so they apply as in model(...)."""
    get = getattr(unwrap(model), "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None:
        return model(**enc, output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states[-1]
    return decoder(**enc, use_cache=False).last_hidden_state


def lm_logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """LM head (+ Gemma-style final soft-capping) on selected hidden states [K, H] -> fp32 logits [K, V]."""
    m = unwrap(model)
    logits = m.get_output_embeddings()(h).float()
    cap = getattr(m.config, "final_logit_softcapping", None) or getattr(
        getattr(m.config, "text_config", None), "final_logit_softcapping", None
    )
    return cap * torch.tanh(logits / cap) if cap else logits


def selected_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 log-probabilities [K, V] at the completion-predicting positions only."""
    h = final_hidden(model, batch["enc"])
    return F.log_softmax(lm_logits(model, h[batch["rows"], batch["cols"]]), dim=-1)


def selected_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states [K, H] at the completion-predicting positions (the LM head not yet applied)."""
    return final_hidden(model, batch["enc"])[batch["rows"], batch["cols"]]


class Positions(NamedTuple):
    """Per completion position: log p(target), the barrier's KL to the reference, the distillation KL to
    the teacher (None when not asked for)."""

    tok: torch.Tensor
    kl: torch.Tensor | None
    kd: torch.Tensor | None


@dataclass
class Teacher:
    """Distillation targets at the completion positions [K]: either the teacher's hidden states `h` [K, H]
    (the full next-token distribution is rebuilt per chunk), or its top-k log-probs `lp` [K, k] at token
    ids `idx` [K, k] with the log-mass of everything else `tail` [K] (-inf when k = V)."""

    h: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    lp: torch.Tensor | None = None
    tail: torch.Tensor | None = None

    def chunk(self, i: int, j: int) -> tuple:
        return tuple(None if x is None else x[i:j] for x in (self.h, self.idx, self.lp, self.tail))


def completion_terms(
    model: nn.Module,
    h: torch.Tensor,
    targets: torch.Tensor,
    h_ref: torch.Tensor | None = None,
    kl=None,
    chunk: int = 256,
    teacher: Teacher | None = None,
) -> Positions:
    """Per-position log p(target) [K]; with `h_ref`, kl(logp, logp_ref) [K]; with `teacher`, the
    distillation KL(teacher || student) [K]; all in chunks.

    Each chunk of `chunk` positions runs LM head -> log-softmax -> its terms under activation
    checkpointing: only the [chunk, V] tensors of one chunk exist at a time, in the forward and again in
    the backward (which recomputes them from h). So the heal step never holds a [K, V] tensor, let alone
    [B, T, V]; the price is recomputing the chunk's LM head(s) in the backward. Row-wise maths, so the
    values equal the unchunked ones. `h_ref` and `teacher.h` (no grad) are other models' hidden states at
    the same positions: their log-probs are rebuilt per chunk instead of being kept at [K, V]."""
    from torch.utils.checkpoint import checkpoint

    def terms(hc, tc, rc, th, ti, tl, tt):
        logp = F.log_softmax(lm_logits(model, hc), dim=-1)
        tok = token_logprob(logp, tc)
        k = d = None
        if rc is not None:  # one other [chunk, V] distribution at a time: built, used, released
            with torch.no_grad():
                logp_ref = F.log_softmax(lm_logits(model, rc), dim=-1)
            k = kl(logp, logp_ref)
            del logp_ref
        if th is not None:
            with torch.no_grad():
                logp_t = F.log_softmax(lm_logits(model, th), dim=-1)
            d = kl_fwd(logp, logp_t)  # KL(teacher || student): mass-covering, as in distillation
        elif ti is not None:
            d = kl_topk(logp, ti, tl, tt)
        return tok, k, d

    out = []
    for i in range(0, h.shape[0], chunk):
        rc = None if h_ref is None else h_ref[i : i + chunk]
        tch = teacher.chunk(i, i + chunk) if teacher is not None else (None,) * 4
        args = (h[i : i + chunk], targets[i : i + chunk], rc, *tch)
        out.append(checkpoint(terms, *args, use_reentrant=False) if torch.is_grad_enabled() else terms(*args))
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    return Positions(*(cat([o[j] for o in out]) for j in range(3)))


SCORE_CHUNK = 256  # positions per LM-head chunk when scoring without grad (filter, ref_nll); plan.py counts it


@torch.no_grad()
def token_nlls(
    model: nn.Module,
    pairs: list[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
    desc: str,
    chunk: int = SCORE_CHUNK,
) -> list[torch.Tensor]:
    """-log p(token) of every completion token of each (prompt ids, completion ids) pair, [n_i] on the CPU.

    Batched in length order (less padding); the LM head runs in chunks of `chunk` positions
    (completion_terms), so no [tokens, vocab] tensor is held: scoring 64 completions of 256 tokens under
    gemma's 262k vocabulary at once would otherwise need a 17 GB fp32 [K, V] log-softmax."""
    dev = input_device(model)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    for idx in tqdm(list(batches(order, batch_size)), desc=desc, leave=False):
        b = completion_batch([pairs[i] for i in idx], pad_id, dev)
        lp = completion_terms(model, selected_hidden(model, b), b["targets"], chunk=chunk).tok.cpu()
        seg = b["seg"].cpu()
        for j, i in enumerate(idx):
            out[i] = -lp[seg == j]
    return out


def naive_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The memory-hungry reference: full [B, T, V] log-softmax, then select. Only for tests and benchmarks."""
    logits = model(**batch["enc"]).logits.float()
    return F.log_softmax(logits, dim=-1)[batch["rows"], batch["cols"]]


# ---------------------------------------------------------------- pure maths on [K, V] / [K]


def token_logprob(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_k) for each selected position, [K]."""
    return logp.gather(-1, targets[:, None]).squeeze(-1)


def nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SFT loss: -(1/K) sum_k log p(target_k), over completion tokens only."""
    return -token_logprob(logp, targets).mean()


def kl_rev(logp_s: torch.Tensor, logp_r: torch.Tensor) -> torch.Tensor:
    """KL(student || ref) per position: sum_v p_s(v) (log p_s(v) - log p_r(v)), [K]. Zero iff equal.

    Mode-seeking: penalises the student for putting mass where the reference has little (e.g. loops)."""
    return (logp_s.exp() * (logp_s - logp_r)).sum(-1)


def kl_fwd(logp_s: torch.Tensor, logp_r: torch.Tensor) -> torch.Tensor:
    """KL(ref || student) per position: sum_v p_r(v) (log p_r(v) - log p_s(v)), [K]. Zero iff equal.

    Mass-covering: penalises the student for dropping mass the reference keeps."""
    return (logp_r.exp() * (logp_r - logp_s)).sum(-1)


KL = {"kl_rev": kl_rev, "kl_fwd": kl_fwd}


def kl_topk(logp_s: torch.Tensor, idx: torch.Tensor, lp_t: torch.Tensor, tail_t: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position when the teacher is kept only as its top-k tokens plus one tail
    bucket holding the rest of its mass, [K]:

        sum_{v in top-k} p_t(v) (log p_t(v) - log p_s(v)) + p_t(tail) (log p_t(tail) - log p_s(tail))

    with log p(tail) = logsumexp of the log-probs outside the top-k (exact, unlike log(1 - sum)). With k = V
    the tail is empty (p_t(tail) = 0, its
    term 0) and this is the full KL(teacher || student) = kl_fwd(logp_s, logp_t)."""
    lp_s = logp_s.gather(-1, idx)
    head = (lp_t.exp() * (lp_t - lp_s)).sum(-1)
    tail_s = torch.logsumexp(logp_s.scatter(-1, idx, -math.inf), -1)  # log of the student's mass elsewhere
    p_tail = tail_t.exp()
    tail = torch.where(p_tail > 0, p_tail * (tail_t - tail_s), torch.zeros_like(p_tail))
    return head + tail


def topk_targets(logp_t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx [K, k], log-probs [K, k], log tail mass [K]) of a teacher's log-probs [K, V] (k >= V: all of it)."""
    k = min(k, logp_t.shape[-1])
    lp, idx = logp_t.topk(k, dim=-1)
    return idx, lp, torch.logsumexp(logp_t.scatter(-1, idx, -math.inf), -1)  # -inf when k = V: no tail


def aggregate(kl: torch.Tensor, seg: torch.Tensor, n_seq: int, how: str) -> torch.Tensor:
    """Per-completion divergence D_i from per-position KL over that completion's positions, [n_seq].

    mean: (1/T) sum_t kl_t        rmse: sqrt((1/T) sum_t kl_t^2 + eps)
    p95:  95th percentile of kl_t max:  max_t kl_t
    A short loop inside a long completion barely moves `mean` but dominates the other three.
    eps = 1e-12 keeps the rmse gradient finite at kl = 0 (there d/dkl = kl / rmse = 0)."""
    out = []
    for i in range(n_seq):
        k = kl[seg == i]
        if how == "mean":
            out.append(k.mean())
        elif how == "rmse":
            out.append(torch.sqrt((k * k).mean() + 1e-12))
        elif how == "p95":
            out.append(torch.quantile(k, 0.95))
        elif how == "max":
            out.append(k.max())
        else:
            raise ValueError(f"unknown KL aggregation {how!r}; valid: mean, rmse, p95, max")
    return torch.stack(out)


def hinge(d: torch.Tensor, tau: float, lam: float) -> torch.Tensor:
    """Barrier lam * mean_i relu(D_i - tau): zero while every completion stays within tau nats."""
    return lam * F.relu(d - tau).mean()


def lam_at_round(lam: float, round: int, power: float) -> float:
    """lambda_r = lambda * (1 + round)^p (p < 0 decays the barrier over rounds; p = 0 keeps it fixed).
    lambda = 0 is no barrier whatever p (the factor alone may pass float range; bounds.lam_schedule_error keeps
    lambda_r within float32 otherwise)."""
    return lam * (1 + round) ** power if lam else 0.0


def spectral_norm_lowrank(A: torch.Tensor, B: torch.Tensor, scale: float, iters: int = 8) -> torch.Tensor:
    """sigma_max(scale * B @ A) by power iteration on the factors (Delta W is never formed).

    The singular vector is found without gradient; the returned value ||scale * B A v|| is differentiable
    in A and B (the usual spectral-norm trick)."""
    with torch.no_grad():
        v = torch.ones(A.shape[1], device=A.device, dtype=A.dtype) / math.sqrt(A.shape[1])
        for _ in range(iters):
            u = B @ (A @ v)
            v = A.T @ (B.T @ u)
            v = v / v.norm().clamp_min(1e-12)
    return (scale * (B @ (A @ v))).norm()


def cosine_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over `warmup` steps to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
