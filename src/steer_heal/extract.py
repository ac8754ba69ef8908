"""Teacher and student steering vectors from residual-stream activations at the last prompt token.

    v_L       = mean_x h_L(pos persona, x) - mean_x h_L(neg persona, x)      (teacher, per band layer L)
    v_student = mean_x h_L^student(neutral, x) - mean_x h_L^base(neutral, x) (how much trait is in the weights)

h_L is the output of decoder block L, read at the last token of the chat prompt (the end of the
assistant generation header). Prompts are left-padded, so that token is at position -1 for every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from steer_heal.data import Persona
from steer_heal.hooks import record
from steer_heal.models import input_device
from steer_heal.tokens import batches, chat_ids, pad


@torch.no_grad()
def last_token_acts(
    model: nn.Module,
    prompts: list[list[int]],
    layers: list[int],
    pad_id: int,
    batch_size: int,
    desc: str = "activations",
) -> dict[int, torch.Tensor]:
    """Block outputs at each prompt's last token: {L: [N, H] float32}."""
    dev = input_device(model)
    out: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    for chunk in tqdm(list(batches(prompts, batch_size)), desc=desc, leave=False):
        with record(model, layers) as acts:
            model(**pad(chunk, pad_id, "left", dev), logits_to_keep=1)
        for L in layers:
            out[L].append(acts[L][:, -1].float())
    return {L: torch.cat(v) for L, v in out.items()}


def unit(v: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """v_L / |v_L| per layer (a zero vector stays zero)."""
    return {L: x / x.norm().clamp_min(1e-12) for L, x in v.items()}


def mean_diff(
    pos: dict[int, torch.Tensor], neg: dict[int, torch.Tensor], normalize: bool = False
) -> dict[int, torch.Tensor]:
    """v_L = mean(pos_L) - mean(neg_L); unit-normalised per layer when `normalize`."""
    v = {L: pos[L].mean(0) - neg[L].mean(0) for L in pos}
    return unit(v) if normalize else v


def teacher_vector(
    model, tok, persona: Persona, contexts: list[str], layers: list[int], batch_size: int, normalize: bool = False
) -> dict[int, torch.Tensor]:
    pos = [chat_ids(tok, x, persona.system(True)) for x in contexts]
    neg = [chat_ids(tok, x, persona.system(False)) for x in contexts]
    hp = last_token_acts(model, pos, layers, tok.pad_token_id, batch_size, "extract +")
    hn = last_token_acts(model, neg, layers, tok.pad_token_id, batch_size, "extract -")
    return mean_diff(hp, hn, normalize)


def flat(v: dict[int, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v[L].flatten().float().cpu() for L in sorted(v)])


def cosine(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> float:
    """cos of the band vectors concatenated over layers (the layers must match)."""
    if sorted(a) != sorted(b):
        raise ValueError(f"vectors on different layers: {sorted(a)} vs {sorted(b)}")
    return float(F.cosine_similarity(flat(a), flat(b), dim=0))


def norm(v: dict[int, torch.Tensor]) -> float:
    return float(flat(v).norm())


def random_like(v: dict[int, torch.Tensor], seed: int) -> dict[int, torch.Tensor]:
    """A Gaussian random direction per layer, scaled to that layer's norm in v: the null for v. Drawn on the
    CPU (the same directions for a seed on every device), returned on v's device and in its dtype."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for L in sorted(v):
        x = torch.randn(v[L].shape, generator=g, dtype=torch.float32)
        out[L] = (x / x.norm() * v[L].float().norm().cpu()).to(v[L])
    return out
