"""Batched steered sampling; one `generate` call may mix strengths (a per-row coefficient tensor).

    rows = [Row(i, text, ids, alpha=2.0, coeff=2.0 * kappa) for ...]
    comps = generate(model, tok, rows, vectors, sampling=Sampling(64, top_p=0.95), batch_size=48, seed=0)

We keep the sampled token ids (re-tokenising decoded text would shift BPE boundaries), whether each row
stopped at an end-of-turn token, and whether it hit the cap. Sampling follows the model card
(temperature, top-p) with no repetition penalty or n-gram blocking: those would hide over-steering
from the filter.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from steer_heal import decode as decoding
from steer_heal import formats, seeds
from steer_heal.errors import UserError, halve_and_retry
from steer_heal.hooks import steer
from steer_heal.models import input_device
from steer_heal.tokens import batches, pad


@dataclass(frozen=True)
class Row:
    """One prompt to complete, at one steering strength."""

    prompt_idx: int
    prompt: str  # the user message
    prompt_ids: list[int]  # its chat-template ids, tokenised once
    alpha: float = 0.0  # nominal strength from the sweep
    coeff: float = 0.0  # strength actually applied to the raw vector (alpha x kappa x c*)


@dataclass(frozen=True)
class Sampling:
    """How to decode: sampled at (temperature, top_p) or greedy, up to max_new_tokens."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True
    min_new_tokens: int = 0  # > 0 only in benchmarks, to compare equal token counts

    def greedy(self) -> Sampling:
        return dataclasses.replace(self, do_sample=False)

    def hf_kwargs(self) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens, repetition_penalty=1.0)
        if self.do_sample:
            return kw | dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0)
        return kw | dict(do_sample=False)


@dataclass
class Completion:
    prompt_idx: int
    prompt: str  # the user message
    alpha: float  # nominal strength from the sweep
    coeff: float  # strength actually applied
    prompt_ids: list[int]
    ids: list[int]  # sampled completion ids; ends with the end-of-turn id iff hit_eos
    text: str
    hit_eos: bool

    @property
    def hit_cap(self) -> bool:
        return not self.hit_eos


def stop_ids(model, tok) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS plus any the generation config lists (e.g. Gemma's <end_of_turn>)."""
    return sorted(set(formats.id_list(model.generation_config.eos_token_id)) | {tok.eos_token_id})


def cut(row: list[int], stops: list[int], tok=None, texts: list[str] = ()) -> tuple[list[int], bool]:
    """Completion ids up to and including the first stop id, or (if earlier) up to where one of the
    multi-token stop `texts` begins, which is dropped; (ids, hit_eos)."""
    first = next((i for i, t in enumerate(row) if t in stops), None)
    if first is not None:
        row = row[: first + 1]
    if texts:
        trimmed, hit = formats.trim_at_texts(row, tok, texts)
        if hit:
            return trimmed, True
    return row, first is not None


@torch.no_grad()
def generate(
    model,
    tok,
    rows: list[Row],
    vectors: dict[int, torch.Tensor] | None = None,
    *,
    sampling: Sampling,
    batch_size: int,
    seed: int = 0,
    desc: str = "generate",
    decode: str = "eager",
) -> list[Completion]:
    """One Completion per row, in order. Batch b is seeded with seeds.child(seed, b).

    `decode`: eager = transformers' generate (the reference); compiled = decode.py's compiled static-cache
    loop (same greedy tokens); auto = compiled on CUDA."""
    dev = input_device(model)
    stops = stop_ids(model, tok)
    texts = formats.stop_texts(model)
    kw = dict(eos_token_id=stops, pad_token_id=tok.pad_token_id, **sampling.hf_kwargs())
    compiled = decoding.resolve(decode, dev) == "compiled"
    if compiled and decoding.unsupported_kwargs(kw):
        raise UserError(f"compiled decoding does not apply {decoding.unsupported_kwargs(kw)}: use --decode eager")
    if texts and not compiled:  # a pretrained model's next-turn marker (formats.py): generate needs the tokenizer
        kw |= dict(stop_strings=texts, tokenizer=tok)  # the compiled loop runs on; `cut` drops the text all the same

    def run(chunk: list[Row], seed_b: int, width: int = batch_size) -> list[list[int]]:
        if compiled:  # a fixed batch width: one graph for every chunk, the last one padded
            torch.manual_seed(seed_b)
            return decoding.decoder(model).run(model, [r.prompt_ids for r in chunk], [r.coeff for r in chunk],
                                               vectors, sampling, stops, tok.pad_token_id, width)  # fmt: skip
        enc = pad([r.prompt_ids for r in chunk], tok.pad_token_id, "left", dev)
        enc.pop("position_ids")  # generate derives positions from the attention mask
        coeff = torch.tensor([r.coeff for r in chunk], dtype=torch.float32, device=dev)
        torch.manual_seed(seed_b)
        with steer(model, vectors, coeff) if vectors else nullcontext():
            seq = model.generate(**enc, **kw)
        return seq[:, enc["input_ids"].shape[1] :].tolist()

    out: list[Completion] = []
    for b, chunk in enumerate(tqdm(list(batches(rows, batch_size)), desc=desc, leave=False)):
        try:
            new = run(chunk, seeds.child(seed, b))
        except torch.OutOfMemoryError:
            new = None  # retry outside the except block, so the failed call's tensors can be freed
        if new is None:
            if compiled:
                decoding.decoder(model).release()  # its cache was sized for the batch that did not fit
            retry = lambda half, i, b=b: run(half, seeds.child(seed, b, i), len(half))  # noqa: E731
            new = halve_and_retry(chunk, retry, "--gen-batch-size")
        for r, row in zip(chunk, new):
            ids, eos = cut(row, stops, tok, texts)
            text = tok.decode(ids, skip_special_tokens=True)
            out.append(Completion(r.prompt_idx, r.prompt, r.alpha, r.coeff, list(r.prompt_ids), ids, text, eos))
    return out
