"""Device placement, hooks, losses, eval and bake on every device this machine has (the CPU always; CUDA
where there is one: scripts/gpu_check.sh runs this file on the GPU machine), in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from steer_heal import evaluate, extract, losses, models
from steer_heal.config import HealConfig
from steer_heal.data import balanced, vignettes
from steer_heal.generate import Row, Sampling, generate
from steer_heal.heal import SteeredTeacher, heal, lora_config
from steer_heal.hooks import steer
from steer_heal.student import Student
from steer_heal.tokens import chat_ids, pad

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(d, t) for d in DEVICES for t in ("float32", "bfloat16")]
TOL = {"float32": 1e-4, "bfloat16": 0.1}  # logits: bf16 rounds at its 8-bit mantissa


@pytest.fixture(params=CASES, ids=[f"{d}-{t}" for d, t in CASES])
def model_on(request):
    device, dtype = request.param
    torch.manual_seed(0)
    model, tok = models.load("tiny-random", dtype=dtype, device=device)
    return model, tok, device, dtype


def test_the_model_and_its_inputs_share_a_device(model_on):
    model, tok, device, dtype = model_on
    assert models.input_device(model).type == device
    assert all(p.device.type == device for p in model.parameters())
    assert next(model.parameters()).dtype == getattr(torch, dtype)


@torch.no_grad()
def test_steering_hooks_on_the_device(model_on):
    model, tok, device, _ = model_on
    enc = pad([chat_ids(tok, "Hi there"), chat_ids(tok, "How are you?")], tok.pad_token_id, "left", device)
    ref = model(**enc).logits
    v = {1: torch.randn(model.config.hidden_size) * 3}  # a CPU fp32 vector: the hook moves and casts it
    with steer(model, v, torch.tensor([0.0, 0.0])):
        assert torch.equal(model(**enc).logits, ref)
    with steer(model, v, torch.tensor([0.0, 2.0])):  # per-row: row 0 unsteered, row 1 steered
        out = model(**enc).logits
    assert torch.equal(out[0], ref[0]) and not torch.equal(out[1], ref[1])


@torch.no_grad()
def test_the_random_null_follows_the_vector_to_its_device(model_on):
    model, tok, device, dtype = model_on
    v = {1: torch.randn(model.config.hidden_size, device=device, dtype=getattr(torch, dtype))}  # as extracted
    r = extract.random_like(v, seed=7)
    assert r[1].device.type == device and r[1].dtype == v[1].dtype
    cpu = extract.random_like({1: v[1].cpu()}, seed=7)  # the same direction for a seed on every device
    assert torch.allclose(r[1].cpu().float(), cpu[1].float(), rtol=0, atol=1e-6)
    enc = pad([chat_ids(tok, "Hi there")], tok.pad_token_id, "left", device)
    with steer(model, r, 2.0):
        assert torch.isfinite(model(**enc).logits).all()


def test_generate_eval_and_losses_on_the_device(model_on):
    model, tok, device, dtype = model_on
    v = {1: torch.randn(model.config.hidden_size)}
    rows = [Row(0, "Hi", chat_ids(tok, "Hi"), 1.0, 1.0), Row(1, "Tip?", chat_ids(tok, "Tip?"), 2.0, 2.0)]
    comps = generate(model, tok, rows, v, sampling=Sampling(4), batch_size=2)
    assert all(len(c.ids) >= 1 for c in comps)
    vigs = balanced(vignettes(None)[1], 4)
    tree = evaluate.answer_logprobs(model, tok, vigs, 4, shared_prefix=True)["logp"]
    plain = evaluate.answer_logprobs(model, tok, vigs, 4, shared_prefix=False)["logp"]
    assert tree.device.type == "cpu" and (tree - plain).abs().max() < TOL[dtype]
    b = losses.completion_batch([(c.prompt_ids, c.ids) for c in comps], tok.pad_token_id, device)
    with torch.no_grad():
        h = losses.selected_hidden(model, b)
        pos = losses.completion_terms(model, h, b["targets"], h, losses.kl_rev, chunk=2)
    assert pos.tok.dtype == torch.float32 and torch.equal(pos.kl, torch.zeros_like(pos.kl))


@torch.no_grad()
def test_bake_on_the_device(model_on):
    model, tok, device, dtype = model_on
    enc = pad([chat_ids(tok, "What is a good breakfast?")], tok.pad_token_id, "left", device)
    base = model(**enc).logits.clone()
    st = Student(model)
    name = st.add_adapter(0, lora_config(st, HealConfig(lora_r=4)))
    assert torch.equal(st.model(**enc).logits, base)  # B = 0
    for _A, B, _ in st.lora_factors(name):
        assert B.device.type == device and B.dtype == torch.float32
        B.data.normal_(0, 0.05)
    applied = st.model(**enc).logits.clone()
    st.bake()
    assert torch.equal(st.model(**enc).logits, applied)
    with st.base():
        assert torch.equal(st.model(**enc).logits, base)
    merged = st.merged_state_dict()
    assert all(t.device.type == device for t in merged.values())


def test_a_heal_step_on_the_device(model_on):
    model, tok, device, dtype = model_on
    st = Student(model)
    p = chat_ids(tok, "Give me a tip.")
    pairs = [(p, [100 + i, 200 + i, tok.eos_token_id]) for i in range(4)]
    teacher = SteeredTeacher({1: torch.randn(model.config.hidden_size)}, [1.0, 2.0, 1.0, 2.0])
    cfg = HealConfig(reg="kl_rev", tau=0.0, heal_target="mix", epochs=1, heal_batch_size=2, lr=1e-2, lora_r=4)
    res = heal(st, pairs, cfg, 0, 0, tok.pad_token_id, teacher=teacher)
    assert res.steps == 2 and res.kd_last is not None and all(torch.isfinite(q).all() for q in st.trainable())


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decode_on_the_device(device):
    """decode.py's compiled loop (aot_eager on the CPU, the CUDA default of inductor + CUDA graphs on a GPU)
    gives generate's greedy tokens on the tiny model in fp32, steered per row, twice with one graph."""
    from steer_heal import decode

    torch.manual_seed(0)
    model, tok = models.load("tiny-random", dtype="float32", device=device)
    dec = decode.decoder(model, backend="aot_eager") if device == "cpu" else decode.decoder(model)
    v = {1: torch.randn(model.config.hidden_size)}
    prompts = ["Hi", "Give me a tip for a rainy day.", "Why?"]
    rows = [Row(i, p, chat_ids(tok, p), c, c) for i, (p, c) in enumerate(zip(prompts, (0.0, 2.0, -1.0)))]
    for _ in range(2):
        kw = dict(sampling=Sampling(6, do_sample=False), batch_size=4)
        eager = [c.ids for c in generate(model, tok, rows, v, **kw)]
        assert [c.ids for c in generate(model, tok, rows, v, decode="compiled", **kw)] == eager
    assert dec.recompiles == 0
