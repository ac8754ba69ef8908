"""Batched steered sampling; one `generate` call may mix strengths (a per-row coefficient tensor).

Rows are (prompt, coefficient) pairs. We keep the sampled token ids (re-tokenising decoded text would
shift BPE boundaries), whether each row stopped at an end-of-turn token, and whether it hit the cap.
Sampling follows the model card (temperature, top-p) with no repetition penalty or n-gram blocking:
those would hide over-steering from the filter.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from steer_heal.errors import halve_and_retry
from steer_heal.hooks import steer
from steer_heal.tokens import batches, pad


@dataclass
class Completion:
    prompt_idx: int
    prompt: str  # the user message
    alpha: float  # nominal strength from the sweep
    coeff: float  # strength actually applied (alpha * kappa)
    prompt_ids: list[int]
    ids: list[int]  # sampled completion ids; ends with the end-of-turn id iff hit_eos
    text: str
    hit_eos: bool

    @property
    def hit_cap(self) -> bool:
        return not self.hit_eos


def stop_ids(model, tok) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS plus any the generation config lists (e.g. Gemma's <end_of_turn>)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    return sorted(set(ids) | {tok.eos_token_id})


def cut(row: list[int], stops: list[int]) -> tuple[list[int], bool]:
    """Completion ids up to and including the first stop id; (ids, hit_eos)."""
    for i, t in enumerate(row):
        if t in stops:
            return row[: i + 1], True
    return row, False


@torch.no_grad()
def generate(
    model,
    tok,
    rows: list[tuple[int, str, list[int], float, float]],
    vectors: dict[int, torch.Tensor] | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    seed: int,
    do_sample: bool = True,
    desc: str = "generate",
    min_new_tokens: int = 0,
) -> list[Completion]:
    """rows = (prompt_idx, user text, prompt ids, alpha, coeff). Returns one Completion per row, in order."""
    dev = next(model.parameters()).device
    stops = stop_ids(model, tok)
    out: list[Completion] = []
    sampling = {"do_sample": False}
    if do_sample:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    kw = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tok.pad_token_id,
        repetition_penalty=1.0,
        min_new_tokens=min_new_tokens,  # > 0 only in benchmarks, to compare equal token counts
        **sampling,
    )

    def run(chunk, seed_b: int) -> list[list[int]]:
        enc = pad([r[2] for r in chunk], tok.pad_token_id, "left", dev)
        enc.pop("position_ids")  # generate derives positions from the attention mask
        coeff = torch.tensor([r[4] for r in chunk], dtype=torch.float32, device=dev)
        torch.manual_seed(seed_b)
        with steer(model, vectors, coeff) if vectors else nullcontext():
            seq = model.generate(**enc, **kw)
        return seq[:, enc["input_ids"].shape[1] :].tolist()

    for b, chunk in enumerate(tqdm(list(batches(rows, batch_size)), desc=desc, leave=False)):
        try:
            new = run(chunk, seed * 100_003 + b)
        except torch.OutOfMemoryError:
            new = None  # retry outside the except block, so the failed call's tensors can be freed
        if new is None:
            new = halve_and_retry(
                chunk, lambda half, i, b=b: run(half, seed * 100_003 + b + 7919 * (i + 1)), "--gen-batch-size"
            )
        for r, row in zip(chunk, new):
            ids, eos = cut(row, stops)
            text = tok.decode(ids, skip_special_tokens=True)
            out.append(Completion(r[0], r[1], r[3], r[4], list(r[2]), ids, text, eos))
    return out
