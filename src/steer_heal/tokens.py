"""Chat prompts -> token ids, and padded batches with correct position ids.

Prompts are tokenised exactly once, by the chat template itself (it writes its own special tokens, so
no second BOS is added). Generation, scoring and SFT all reuse these ids, and completions keep the
sampled ids, so the loss mask lines up with what was generated token for token.
"""

from __future__ import annotations

import torch


def chat_ids(tok, user: str, system: str | None = None, prefill: str = "") -> list[int]:
    """Token ids of [system] + user + assistant header (+ a prefilled start of the answer)."""
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # add_special_tokens=False: the template already wrote BOS/<|im_start|>; the tokenizer must not add more.
    return tok(text + prefill, add_special_tokens=False).input_ids


def answer_lead(tok) -> str:
    """What goes between the generation prompt and an answer's first word: a space when the prompt ends
    on a word (the qa format's "Answer:"), nothing when it ends a line (every chat template)."""
    head = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    return "" if head.endswith(("\n", " ")) else " "


def answer_ids(tok, answer: str) -> list[int]:
    """Token ids of a written answer as it continues the generation prompt (reference answers)."""
    return tok(answer_lead(tok) + answer, add_special_tokens=False).input_ids


def with_prefill(head: list[int], prefill: list[int]) -> list[int]:
    """`head` + `prefill`, unless the format's generation prompt already ends with it (qa's "Answer:")."""
    return head if head[len(head) - len(prefill) :] == prefill else head + prefill


def pad(seqs: list[list[int]], pad_id: int, side: str = "left", device=None) -> dict[str, torch.Tensor]:
    """Pad to a batch; returns input_ids, attention_mask and position_ids (0 at each row's first real token).

    Passing position_ids explicitly makes left and right padding give the same logits per real token."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def batches(items: list, size: int):
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield items[i : i + size]
