"""Steering hooks and vector extraction on the tiny random model."""

from __future__ import annotations

import pytest
import torch

from steer_heal import extract
from steer_heal.data import Persona
from steer_heal.hooks import record, steer
from steer_heal.tokens import chat_ids, pad


def _batch(tok):
    seqs = [chat_ids(tok, "How do I boil an egg?"), chat_ids(tok, "Write a haiku about rain on a tin roof, please.")]
    return pad(seqs, tok.pad_token_id, "left")


def _vectors(model, scale=3.0):
    g = torch.Generator().manual_seed(1)
    h = model.config.hidden_size
    return {1: torch.randn(h, generator=g) * scale, 2: torch.randn(h, generator=g) * scale}


@torch.no_grad()
def test_c_zero_is_the_identity(tiny):
    model, tok = tiny
    enc = _batch(tok)
    ref = model(**enc).logits
    with steer(model, _vectors(model), 0.0):
        out = model(**enc).logits
    assert torch.equal(ref, out)
    with steer(model, _vectors(model), torch.zeros(2)):
        out = model(**enc).logits
    assert torch.equal(ref, out)


@torch.no_grad()
def test_per_row_coefficients_equal_rows_alone(tiny):
    model, tok = tiny
    enc = _batch(tok)
    v = _vectors(model)
    coeff = torch.tensor([0.5, 2.0])
    with steer(model, v, coeff):
        mixed = model(**enc).logits
    for i, c in enumerate(coeff.tolist()):
        row = {k: t[i : i + 1] for k, t in enc.items()}
        with steer(model, v, c):
            alone = model(**row).logits
        m = enc["attention_mask"][i].bool()
        assert torch.allclose(mixed[i][m], alone[0][m], atol=1e-4)
    # and steering really changes something
    assert not torch.allclose(mixed, model(**enc).logits, atol=1e-3)


def test_hooks_removed_after_exception(tiny):
    from steer_heal.models import decoder_layers

    model, tok = tiny
    enc = _batch(tok)
    # transformers installs its own output-capturing hook on each block the first time hidden states are
    # asked for, and keeps it; ours must leave the count as it found it
    before = [len(b._forward_hooks) for b in decoder_layers(model)]
    with torch.no_grad():
        ref = model(**enc).logits
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, _vectors(model), 5.0):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with record(model, [1]):
            raise RuntimeError("boom")
    assert [len(b._forward_hooks) for b in decoder_layers(model)] == before
    with torch.no_grad():
        assert torch.equal(ref, model(**enc).logits)


def test_unknown_layer_raises(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="layer 99 does not exist"):
        with steer(model, {99: torch.zeros(model.config.hidden_size)}, 1.0):
            pass


def test_vector_of_a_pair_against_itself_is_zero(tiny):
    model, tok = tiny
    same = Persona("same", "someone calm", "someone calm", "Authority", -1)
    v = extract.teacher_vector(model, tok, same, ["Hi there.", "What is 2 + 2?", "Tell me a joke."], [1, 2], 2)
    assert all(float(x.abs().max()) < 1e-5 for x in v.values())
    other = Persona("p", "someone calm and gentle", "someone loud and harsh", "Authority", -1)
    w = extract.teacher_vector(model, tok, other, ["Hi there.", "What is 2 + 2?"], [1, 2], 2)
    assert extract.norm(w) > 1e-3
