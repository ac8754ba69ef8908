"""Out-of-memory during generation or heal: halve the batch and retry once, then fail naming the flag."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from steer_heal import heal as heal_mod
from steer_heal.config import HealConfig
from steer_heal.errors import OutOfMemory
from steer_heal.generate import Row, Sampling, generate
from steer_heal.heal import heal_with_retry
from steer_heal.student import Student
from steer_heal.tokens import chat_ids


def _rows(tok, n):
    return [Row(i, f"Tip {i}?", chat_ids(tok, f"Tip {i}?"), 1.0, 0.0) for i in range(n)]


SAMPLE4 = Sampling(4)


def _oom_above(limit, fn):
    """Wrap fn so that it raises torch.OutOfMemoryError when its batch has more than `limit` rows."""
    calls = []

    def wrapped(*args, **kw):
        rows = kw["input_ids"].shape[0] if "input_ids" in kw else args[1]["enc"]["input_ids"].shape[0]
        calls.append(rows)
        if rows > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return fn(*args, **kw)

    return wrapped, calls


def test_generate_halves_an_oom_batch_and_keeps_every_row(fresh_tiny, monkeypatch):
    model, tok = fresh_tiny
    wrapped, calls = _oom_above(2, model.generate)
    monkeypatch.setattr(model, "generate", wrapped)
    out = generate(model, tok, _rows(tok, 4), sampling=SAMPLE4, batch_size=4, seed=0)
    assert calls == [4, 2, 2]
    assert [c.prompt_idx for c in out] == [0, 1, 2, 3] and all(c.ids for c in out)


def test_generate_fails_clearly_when_half_still_ooms(fresh_tiny, monkeypatch):
    model, tok = fresh_tiny
    wrapped, _ = _oom_above(1, model.generate)
    monkeypatch.setattr(model, "generate", wrapped)
    with pytest.raises(OutOfMemory, match="batch of 4 and again on half.*--gen-batch-size"):
        generate(model, tok, _rows(tok, 4), sampling=SAMPLE4, batch_size=4, seed=0)


def _pairs(tok):
    p = chat_ids(tok, "Give me a tip.")
    return [(p, [100 + i, 200 + i, tok.eos_token_id]) for i in range(8)]


def test_heal_retries_with_half_the_batch_and_twice_the_accumulation(fresh_tiny, monkeypatch):
    model, tok = fresh_tiny
    wrapped, calls = _oom_above(2, heal_mod.selected_hidden)
    monkeypatch.setattr(heal_mod, "selected_hidden", wrapped)
    st = Student(model)
    cfg = HealConfig(reg="nll", epochs=1, heal_batch_size=4, lora_r=4)
    res = heal_with_retry(st, _pairs(tok), cfg, 0, 0, tok.pad_token_id, emit=lambda **kw: None)
    assert calls[0] == 4 and set(calls[1:]) == {2}
    assert (res.batch_size, res.grad_accum, res.steps) == (2, 2, 2)  # same 4 examples per optimiser step
    assert st.training is not None and len(st.trainable()) > 0


def test_heal_fails_clearly_when_half_still_ooms(fresh_tiny, monkeypatch):
    model, tok = fresh_tiny
    wrapped, _ = _oom_above(1, heal_mod.selected_hidden)
    monkeypatch.setattr(heal_mod, "selected_hidden", wrapped)
    st = Student(model)
    with pytest.raises(OutOfMemory, match="--heal-batch-size 4 and again at 2.*--heal-batch-size 1 --grad-accum 4"):
        heal_with_retry(st, _pairs(tok), HealConfig(reg="nll", heal_batch_size=4, lora_r=4), 0, 0, tok.pad_token_id,
                        emit=lambda **kw: None)  # fmt: skip
    assert st.training is None  # the failed adapter is gone; the student is as before the round


def test_the_orchestrator_is_handed_the_smaller_heal_batch_to_keep():
    """stages.heal changes no setting: it returns the result, and kept_heal_settings says what to keep."""
    from steer_heal import stages
    from steer_heal.heal import HealResult

    cfg = HealConfig(heal_batch_size=4, grad_accum=1)
    res = HealResult("a", 2, 3.0, 2.5, 0.1, 0.2, None, 1.0, batch_size=4, grad_accum=1)
    assert stages.kept_heal_settings(cfg, res) is None
    kept = stages.kept_heal_settings(cfg, dataclasses.replace(res, batch_size=2, grad_accum=2))
    assert (kept.heal_batch_size, kept.grad_accum) == (2, 2) and cfg.heal_batch_size == 4  # cfg is not changed
