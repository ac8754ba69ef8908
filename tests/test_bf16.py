"""bf16 on the CPU: the identities that matter hold in bf16 as in fp32 (exactly where the maths is exact,
within a stated tolerance where bf16 rounds), and the whole fast pipeline runs in bf16."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from steer_heal import events, losses, models
from steer_heal.config import HealConfig, parse_args
from steer_heal.heal import lora_config
from steer_heal.hooks import steer
from steer_heal.run import run
from steer_heal.student import Student
from steer_heal.tokens import chat_ids, pad
from tests.conftest import fast_args

# bf16 keeps 8 bits of mantissa: logits of order 1-10 round at ~1e-2; a merged export rounds every weight.
BF16_LOGIT_TOL = 0.1


@pytest.fixture()
def bf16_tiny():
    torch.manual_seed(0)
    model, tok = models.load("tiny-random", dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    return model, tok


def _enc(tok):
    return pad([chat_ids(tok, "What is a good breakfast?"), chat_ids(tok, "hi")], tok.pad_token_id, "left")


@torch.no_grad()
def test_bf16_steering_with_c_zero_is_the_identity(bf16_tiny):
    model, tok = bf16_tiny
    enc = _enc(tok)
    ref = model(**enc).logits
    v = {1: torch.randn(model.config.hidden_size) * 3, 2: torch.randn(model.config.hidden_size) * 3}
    with steer(model, v, 0.0):
        assert torch.equal(model(**enc).logits, ref)
    with steer(model, v, torch.tensor([0.0, 0.0])):
        assert torch.equal(model(**enc).logits, ref)
    with steer(model, v, 2.0):
        assert not torch.equal(model(**enc).logits, ref)


@torch.no_grad()
def test_bf16_baked_equals_applied_base_recoverable_and_export_within_tolerance(bf16_tiny, tmp_path):
    model, tok = bf16_tiny
    enc = _enc(tok)
    base = model(**enc).logits.clone()
    st = Student(model)
    name = st.add_adapter(0, lora_config(st, HealConfig(lora_r=4)))
    assert torch.equal(st.model(**enc).logits, base)  # B = 0: the identity in bf16 too
    g = torch.Generator().manual_seed(7)
    for _A, B, _ in st.lora_factors(name):
        B.data.copy_(torch.randn(B.shape, generator=g) * 0.05)
    assert all(p.dtype == torch.float32 for n, p in st.model.named_parameters() if "lora_" in n)  # fp32 adapters
    applied = st.model(**enc).logits.clone()
    st.bake()
    assert torch.equal(st.model(**enc).logits, applied)  # baking is stacking: exactly what was trained
    with st.base():
        assert torch.equal(st.model(**enc).logits, base)  # the original is exactly recoverable
    st.export(tok, tmp_path / "export")
    assert st.export_rounding > 0  # the fp32 merge was rounded to bf16, and said so
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.bfloat16).eval()
    assert (plain(**enc).logits.float() - applied.float()).abs().max() < BF16_LOGIT_TOL


@torch.no_grad()
def test_bf16_kl_of_identical_logits_is_zero_and_chunked_equals_unchunked(bf16_tiny):
    model, tok = bf16_tiny
    pairs = [(chat_ids(tok, "hi"), [10, 11, 12, 13]), (chat_ids(tok, "Tip?"), [14, 15])]
    b = losses.completion_batch(pairs, tok.pad_token_id, "cpu")
    h = losses.selected_hidden(model, b)
    assert h.dtype == torch.bfloat16
    lp = torch.log_softmax(losses.lm_logits(model, h), -1)
    assert lp.dtype == torch.float32  # the LM head's output is taken to fp32 before any softmax
    assert torch.equal(losses.kl_rev(lp, lp), torch.zeros(len(lp))) and torch.equal(
        losses.kl_fwd(lp, lp), torch.zeros(len(lp))
    )
    whole = losses.completion_terms(model, h, b["targets"], h, losses.kl_rev, chunk=100)
    part = losses.completion_terms(model, h, b["targets"], h, losses.kl_rev, chunk=2)
    assert torch.allclose(whole.tok, part.tok, atol=1e-5) and torch.equal(part.kl, torch.zeros_like(part.kl))


def test_the_fast_pipeline_runs_in_bf16(tmp_path):
    argv = fast_args(tmp_path, "bf", "--dtype", "bfloat16", rounds=1)
    assert run(parse_args(argv), argv) == 0
    (rnd,) = events.read(tmp_path / "bf", "round")
    for k in ("steered_trait", "healed_trait", "healed_coh", "healed_ref_nll", "heal_nll"):
        assert rnd[k] is not None and abs(rnd[k]) < 1e3, k
    assert (tmp_path / "bf" / "export" / "model.safetensors").is_file()
