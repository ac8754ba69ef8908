"""Tokenisation on SmolLM2's real tokenizer: special tokens once, true last token, exact loss mask."""

from __future__ import annotations

import torch

from steer_heal import extract
from steer_heal.generate import Row, Sampling, cut, generate
from steer_heal.losses import completion_batch
from steer_heal.tokens import chat_ids, pad


def test_chat_prompt_has_one_bos(tiny):
    _, tok = tiny
    ids = chat_ids(tok, "Hello", system="You are kind.")
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids[1] != start  # the template's own start token, not doubled
    assert ids.count(start) == 3  # system, user, assistant header
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_last_prompt_token_under_left_padding(tiny):
    model, tok = tiny
    short, long = chat_ids(tok, "Hi"), chat_ids(tok, "Please explain, in detail, how tides work on Earth.")
    both = extract.last_token_acts(model, [short, long], [1], tok.pad_token_id, 2)
    alone = extract.last_token_acts(model, [short], [1], tok.pad_token_id, 1)
    assert torch.allclose(both[1][0], alone[1][0], atol=1e-4)
    enc = pad([short, long], tok.pad_token_id, "left")
    assert enc["input_ids"][0, -1].item() == short[-1]  # position -1 is the true last token of each row


def test_loss_mask_is_exactly_the_sampled_completion(tiny):
    model, tok = tiny
    p = chat_ids(tok, "Name a colour.")
    rows = [Row(0, "Name a colour.", p, 1.0, 0.0)]
    comp = generate(model, tok, rows, sampling=Sampling(6), batch_size=1)[0]
    b = completion_batch([(comp.prompt_ids, comp.ids)], tok.pad_token_id, "cpu")
    assert b["targets"].tolist() == comp.ids  # sampled ids, never re-tokenised text
    assert b["cols"].min().item() == len(p) - 1  # the first target is predicted from the last prompt token


def test_completion_cut_at_eos_and_cap_marked(tiny):
    _, tok = tiny
    eos = tok.eos_token_id
    assert cut([5, 6, eos, eos, eos], [eos]) == ([5, 6, eos], True)  # EOS kept as the training target
    assert cut([5, 6, 7], [eos]) == ([5, 6, 7], False)  # hit the cap: no stop target


def test_generation_records_eos_or_cap(tiny):
    model, tok = tiny
    p = chat_ids(tok, "Say hi.")
    comps = generate(model, tok, [Row(0, "", p, 1.0, 0.0)] * 3, sampling=Sampling(4), batch_size=3)
    for c in comps:
        assert c.hit_eos == (bool(c.ids) and c.ids[-1] == tok.eos_token_id)
        assert c.hit_cap == (not c.hit_eos)
        assert len(c.ids) <= 4
