"""LoRA identity at init, exact baking, base recoverability, HF export round trip."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from steer_heal.config import HealConfig
from steer_heal.heal import lora_config
from steer_heal.losses import completion_batch, kl_rev, selected_logprobs
from steer_heal.student import Student
from steer_heal.tokens import chat_ids, pad


def _enc(tok):
    return pad([chat_ids(tok, "What is a good breakfast?"), chat_ids(tok, "hi")], tok.pad_token_id, "left")


def _randomise_b(student, name, scale=0.05):
    g = torch.Generator().manual_seed(7)
    for _A, B, _ in student.lora_factors(name):
        B.data.copy_(torch.randn(B.shape, generator=g) * scale)


@torch.no_grad()
def test_zero_init_adapter_is_identity_and_d_is_zero(fresh_tiny):
    model, tok = fresh_tiny
    enc = _enc(tok)
    ref = model(**enc).logits
    st = Student(model)
    st.add_adapter(0, lora_config(st, HealConfig()))
    assert torch.equal(st.model(**enc).logits, ref)
    pairs = [(chat_ids(tok, "hi"), [10, 11, 12])]
    b = completion_batch(pairs, tok.pad_token_id, "cpu")
    lp = selected_logprobs(st.model, b)
    with st.base():
        lp_ref = selected_logprobs(st.model, b)
    assert float(kl_rev(lp, lp_ref).abs().max()) < 1e-6


@torch.no_grad()
def test_baked_equals_applied_and_base_is_recoverable(fresh_tiny, tmp_path):
    model, tok = fresh_tiny
    enc = _enc(tok)
    base_logits = model(**enc).logits.clone()
    st = Student(model)
    for r in range(2):  # two stacked rounds
        name = st.add_adapter(r, lora_config(st, HealConfig(lora_r=4)))
        _randomise_b(st, name)
        applied = st.model(**enc).logits.clone()
        st.bake()
        baked = st.model(**enc).logits
        assert torch.allclose(applied, baked, atol=1e-6)  # baking changes nothing the student computes
    assert not torch.allclose(baked, base_logits, atol=1e-3)
    with st.base():
        assert torch.allclose(st.model(**enc).logits, base_logits, atol=1e-6)
    # the student is intact after un-baking
    assert torch.allclose(st.model(**enc).logits, baked, atol=1e-6)
    # prev() with nothing in training is the student itself
    with st.prev():
        assert torch.allclose(st.model(**enc).logits, baked, atol=1e-6)

    st.export(tok, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert torch.allclose(plain(**enc).logits, baked, atol=1e-4)


def test_base_context_keeps_baked_adapters_frozen(fresh_tiny):
    model, tok = fresh_tiny
    st = Student(model)
    st.add_adapter(0, lora_config(st, HealConfig(lora_r=4)))
    st.bake()
    st.add_adapter(1, lora_config(st, HealConfig(lora_r=4)))
    with st.base():
        pass
    grads = {n: p.requires_grad for n, p in st.model.named_parameters() if "lora_" in n}
    assert not any(g for n, g in grads.items() if ".r00." in n)
    assert all(g for n, g in grads.items() if ".r01." in n)


@torch.no_grad()
def test_drop_training_restores_the_student(fresh_tiny):
    model, tok = fresh_tiny
    enc = _enc(tok)
    ref = model(**enc).logits.clone()
    st = Student(model)
    for _ in range(2):  # dropping the only adapter, then adding one again, must work
        name = st.add_adapter(0, lora_config(st, HealConfig(lora_r=4)))
        _randomise_b(st, name)
        st.drop_training()
        assert torch.equal(st.model(**enc).logits, ref)
        with st.base():
            assert torch.equal(st.model(**enc).logits, ref)
    st.add_adapter(0, lora_config(st, HealConfig(lora_r=4)))
    _randomise_b(st, "r00")
    st.bake()
    baked = st.model(**enc).logits.clone()
    st.add_adapter(1, lora_config(st, HealConfig(lora_r=4)))
    _randomise_b(st, "r01")
    st.drop_training()
    assert torch.allclose(st.model(**enc).logits, baked, atol=1e-6)
    with st.base():
        assert torch.allclose(st.model(**enc).logits, ref, atol=1e-6)
