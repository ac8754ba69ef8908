"""Forward hooks on decoder blocks, only ever inside context managers that always remove them.

    with steer(model, {13: v13, 14: v14}, coeff):   # h <- h + coeff * v_L at every position
        model.generate(...)
    with record(model, [13, 14]) as acts:           # acts[L] = block L output, [B, T, H]
        model(...)

`coeff` is a float or a per-row tensor [B]: rows of one batch can carry different strengths.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from steer_heal.models import decoder_layers


def _resolve(model: nn.Module, layers) -> list[tuple[int, nn.Module]]:
    blocks = decoder_layers(model)
    out = []
    for L in layers:
        if not 0 <= int(L) < len(blocks):
            raise ValueError(f"layer {L} does not exist: the model has {len(blocks)} blocks (0..{len(blocks) - 1})")
        out.append((int(L), blocks[int(L)]))
    return out


def _hidden(output):
    """Decoder blocks return either a tensor or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, h):
    return (h, *output[1:]) if isinstance(output, tuple) else h


def add_steering(h: torch.Tensor, v: torch.Tensor, coeff: torch.Tensor | float) -> torch.Tensor:
    """h + c * v with h [B, T, H], v [H], c a scalar or [B]; c = 0 returns h unchanged (exactly).

    The sum is formed in fp32 and rounded to h's dtype once: in a bf16 residual, c * v rounded to bf16 first
    and then added would round twice (and bf16 -> fp32 -> bf16 is exact, so c = 0 stays the identity)."""
    if isinstance(coeff, torch.Tensor) and coeff.ndim == 1:
        if coeff.shape[0] != h.shape[0]:
            raise ValueError(f"per-row coefficients have {coeff.shape[0]} rows, the batch has {h.shape[0]}")
        coeff = coeff.to(h.device, torch.float32)[:, None, None]
    if h.dtype == torch.float32:
        return h + coeff * v.to(h.device, torch.float32)
    return (h.float() + coeff * v.to(h.device, torch.float32)).to(h.dtype)


@contextmanager
def steer(model: nn.Module, vectors: dict[int, torch.Tensor], coeff: torch.Tensor | float):
    handles = []
    try:
        for L, block in _resolve(model, vectors):
            v = vectors[L]

            def hook(_mod, _inp, output, v=v):
                return _replace_hidden(output, add_steering(_hidden(output), v, coeff))

            handles.append(block.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record(model: nn.Module, layers):
    acts: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for L, block in _resolve(model, layers):

            def hook(_mod, _inp, output, L=L):
                acts[L] = _hidden(output).detach()

            handles.append(block.register_forward_hook(hook))
        yield acts
    finally:
        for h in handles:
            h.remove()
