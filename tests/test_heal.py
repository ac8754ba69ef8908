"""The heal loop: what trains, what the barrier does, accumulation, checkpointing, and the safety check
under injected faults (a NaN loss, a runaway barrier) through a patched `heal.loss_terms`."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from steer_heal import heal as heal_mod
from steer_heal.config import HealConfig
from steer_heal.errors import NonFiniteLoss
from steer_heal.heal import heal, lora_config, plan
from steer_heal.student import Student
from steer_heal.tokens import chat_ids
from tests.conftest import inject


def _pairs(tok, n=6):
    p = chat_ids(tok, "Give me a tip.")
    return [(p, [100 + i, 200 + i, 300 + i, tok.eos_token_id]) for i in range(n)]


def _randomise_b(student, name, scale=0.05):
    g = torch.Generator().manual_seed(7)
    for _A, B, _ in student.lora_factors(name):
        B.data.copy_(torch.randn(B.shape, generator=g) * scale)


def test_plan_groups_micro_batches_across_epochs():
    cfg = HealConfig(epochs=3, heal_batch_size=2, grad_accum=4)
    groups = plan(5, cfg, __import__("random").Random(0))
    micro = [m for g in groups for m in g]
    assert len(micro) == 9 and [len(g) for g in groups] == [4, 4, 1]  # a short last group still steps
    for e in range(3):  # each epoch sees every example once
        assert sorted(i for m in micro[3 * e : 3 * e + 3] for i in m) == list(range(5))


def test_heal_trains_only_the_new_adapter_and_prev_reference(fresh_tiny):
    model, tok = fresh_tiny
    st = Student(model)
    name0 = st.add_adapter(0, lora_config(st, HealConfig(lora_r=4)))
    _randomise_b(st, name0)
    st.bake()
    frozen = {n: p.clone() for n, p in st.model.named_parameters() if ".r00." in n}
    p = chat_ids(tok, "Give me a tip.")
    pairs = [(p, [100 + i, 200 + i, tok.eos_token_id]) for i in range(6)]
    steps = []
    cfg = HealConfig(reg="kl_rev", barrier_ref="prev", lam=1.0, tau=0.0, epochs=2, heal_batch_size=3, lr=1e-2)
    res = heal(st, pairs, cfg, 1, 0, tok.pad_token_id, emit=lambda **kw: steps.append(kw), log_every=1)
    assert res.steps == 4 and res.nll_last < res.nll_first
    assert steps[0]["d"] < 1e-6  # B = 0 at step 0: the student equals the reference
    assert any(s["fired"] for s in steps[1:])  # tau = 0: the barrier fires once the student moves
    for n, q in st.model.named_parameters():
        if n in frozen:
            assert torch.equal(q, frozen[n]), f"baked adapter {n} changed during the next round's heal"
    assert all(q.dtype == torch.float32 for n, q in st.model.named_parameters() if "lora_" in n)


def test_short_last_accumulation_group_still_steps(fresh_tiny):
    model, tok = fresh_tiny
    st = Student(model)
    p = chat_ids(tok, "Tip?")
    pairs = [(p, [100 + i, tok.eos_token_id]) for i in range(6)]
    cfg = HealConfig(reg="nll", epochs=1, heal_batch_size=3, grad_accum=4, lr=1e-2)
    res = heal(st, pairs, cfg, 0, 0, tok.pad_token_id, emit=lambda **kw: None)
    assert res.steps == 1  # 2 micro-batches < grad_accum 4: one (rescaled) step, not zero
    assert any(float(B.detach().abs().max()) > 0 for _, B, _ in st.lora_factors("r00"))


def test_safety_check_drops_a_runaway_barrier_and_stays_finite(fresh_tiny, monkeypatch):
    model, tok = fresh_tiny
    st = Student(model)
    cfg = HealConfig(reg="kl_rev", lam=1.0, tau=0.0, epochs=3, heal_batch_size=3, lr=1e-2, lora_r=4)
    inject(monkeypatch, barrier=1e9)
    steps = []
    res = heal(st, _pairs(tok), cfg, 0, 0, tok.pad_token_id, emit=lambda **kw: steps.append(kw), log_every=1)
    assert res.barrier_skipped > 0 and res.steps_skipped == 0
    assert all(math.isfinite(s["nll"]) for s in steps) and math.isfinite(res.nll_last)
    # the boosted barrier was dropped on every step where D > 0, and kept (as 0) where D = 0 (step 0)
    assert all(s["barrier"] == 0 for s in steps) and any(s["d"] > 0 for s in steps)
    assert steps[-1]["barrier_skipped"] == res.barrier_skipped == sum(s["d"] > 0 for s in steps)
    assert all(torch.isfinite(p).all() for p in st.trainable())


def test_skipped_micro_batches_inside_an_accumulation_group(fresh_tiny, monkeypatch):
    """With 3 micro-batches per optimiser step, a group whose micro-batches are all non-finite makes no
    update (no division by zero, no NaN step) while the step count and schedule still advance."""
    model, tok = fresh_tiny
    st = Student(model)
    cfg = HealConfig(reg="nll", epochs=1, heal_batch_size=1, grad_accum=3, lr=1e-2, lora_r=4, max_bad_steps=5)
    inject(monkeypatch, from_call=3, nll=math.nan)  # every micro-batch of step 1 (the second group)
    steps = []
    res = heal(st, _pairs(tok), cfg, 0, 0, tok.pad_token_id, emit=lambda **kw: steps.append(kw), log_every=1)
    assert res.steps == 2 and res.steps_skipped == 3  # group 2 (micro-batches 4-6) was all NaN: no update
    assert all(torch.isfinite(p).all() for p in st.trainable())


def test_heal_with_gradient_checkpointing_matches_without(fresh_tiny):
    from steer_heal import models

    model, tok = fresh_tiny
    cfg = HealConfig(reg="kl_rev", lam=1.0, tau=0.0, epochs=1, heal_batch_size=3, lr=1e-2, lora_r=4)
    out = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m, _ = models.load("tiny-random")
        st = Student(m)
        steps = []
        heal(st, _pairs(tok), dataclasses.replace(cfg, grad_checkpoint=ckpt), 0, 0, tok.pad_token_id,
             emit=lambda steps=steps, **kw: steps.append(kw), log_every=1)  # fmt: skip
        assert not models.unwrap(st.model).is_gradient_checkpointing  # switched off again after the round
        out.append((steps, [p.detach().clone() for p in st.trainable()]))
    (s0, p0), (s1, p1) = out
    assert [s["nll"] for s in s0] == pytest.approx([s["nll"] for s in s1], abs=1e-5)
    assert s1[-1]["grad_ratio"] is not None or s0[-1]["grad_ratio"] is None
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(p0, p1))


def test_safety_check_skips_non_finite_steps_then_stops(fresh_tiny, monkeypatch):
    model, tok = fresh_tiny
    st = Student(model)
    cfg = HealConfig(reg="nll", epochs=3, heal_batch_size=3, lr=1e-2, lora_r=4, max_bad_steps=10)
    inject(monkeypatch, from_call=4, nll=math.nan)  # steps 4 and 5 of 6
    res = heal(st, _pairs(tok), cfg, 0, 0, tok.pad_token_id, emit=lambda **kw: None)
    assert res.steps_skipped == 2 and math.isfinite(res.nll_last)  # steps 4 and 5 of 6 were skipped
    assert all(torch.isfinite(p).all() for p in st.trainable())
    st.drop_training()
    inject(monkeypatch, from_call=4, nll=math.nan)
    with pytest.raises(NonFiniteLoss, match="step 5.*more than --max-bad-steps 1"):
        heal(st, _pairs(tok), HealConfig(reg="nll", epochs=3, heal_batch_size=3, lora_r=4, max_bad_steps=1), 0, 0,
             tok.pad_token_id, emit=lambda **kw: None)  # fmt: skip
    assert st.training is None  # the failed round's adapter is discarded: the student is as before


def test_lam_warmup_ramps_the_barrier_from_zero(fresh_tiny):
    model, tok = fresh_tiny
    st = Student(model)
    cfg = HealConfig(reg="kl_rev", lam=1.0, tau=0.0, epochs=3, heal_batch_size=3, lr=1e-2, lora_r=4,
                     lam_warmup_frac=1.0)  # fmt: skip
    steps = []
    heal(st, _pairs(tok), cfg, 0, 0, tok.pad_token_id, emit=lambda **kw: steps.append(kw), log_every=1)
    # barrier = ramp * lam * relu(D - 0) with ramp = step / total: strictly below the full-strength value
    for s in steps[1:]:
        assert s["barrier"] == pytest.approx(s["step"] / len(steps) * s["d"], rel=1e-4, abs=1e-9)


def test_loss_terms_at_init_are_sft_only(fresh_tiny):
    """A fresh adapter (B = 0) is the reference: D = 0, barrier 0, and the NLL equals plain SFT's."""
    from steer_heal.losses import completion_batch, nll, selected_logprobs

    model, tok = fresh_tiny
    st = Student(model)
    name = st.add_adapter(0, lora_config(st, HealConfig(lora_r=4)))
    b = completion_batch(_pairs(tok, 3), tok.pad_token_id, "cpu")
    t = heal_mod.loss_terms(st, name, b, HealConfig(reg="kl_fwd", tau=0.0, spectral_lam=1.0), lam=1.0)
    assert float(t.d.abs().max()) < 1e-6 and float(t.barrier) < 1e-6 and float(t.spectral) == 0.0
    assert float(t.nll) == pytest.approx(float(nll(selected_logprobs(st.model, b), b["targets"])), abs=1e-6)


# ---------------------------------------------------------------- steering baking (--heal-target)


def _teacher(model, n, c=0.0):
    from steer_heal.heal import SteeredTeacher

    g = torch.Generator().manual_seed(11)
    v = {
        1: torch.randn(model.config.hidden_size, generator=g) * 4,
        2: torch.randn(model.config.hidden_size, generator=g) * 4,
    }
    return SteeredTeacher(v, [c] * n)


def _distill_terms(st, tok, cfg, teacher, lam=1.0):
    from steer_heal.losses import completion_batch

    prep = heal_mod.prepare(st, _pairs(tok, 3), cfg, teacher, tok.pad_token_id)
    name = st.add_adapter(0, lora_config(st, cfg))
    b = completion_batch(_pairs(tok, 3), tok.pad_token_id, "cpu")
    distill = heal_mod.teacher_targets(st, b, [0, 1, 2], teacher, prep)
    return name, heal_mod.loss_terms(st, name, b, cfg, lam, distill)


@pytest.mark.parametrize("topk", [None, 50_000])
def test_distillation_loss_is_zero_with_zero_gradient_when_teacher_is_student(fresh_tiny, topk):
    """c = 0 and a fresh adapter (B = 0): the teacher is the student, so KL(teacher || student) = 0 and its
    gradient vanishes (full vocabulary, and top-k with k >= V)."""
    model, tok = fresh_tiny
    st = Student(model)
    cfg = HealConfig(reg="nll", heal_target="kl_teacher", teacher_topk=topk, lora_r=4)
    _, t = _distill_terms(st, tok, cfg, _teacher(model, 3, c=0.0))
    assert abs(float(t.kd)) < 1e-6 and t.main is t.kd
    t.total().backward()
    assert max(float(p.grad.abs().max()) for p in st.trainable() if p.grad is not None) < 1e-6


def test_masked_positions_contribute_nothing(fresh_tiny):
    model, tok = fresh_tiny
    st = Student(model)
    cfg = HealConfig(reg="nll", heal_target="kl_teacher", teacher_topk=64, lora_r=4)
    teacher = _teacher(model, 3, c=3.0)
    prep = heal_mod.prepare(st, _pairs(tok, 3), cfg, teacher, tok.pad_token_id)
    from steer_heal.losses import completion_batch

    name = st.add_adapter(0, lora_config(st, cfg))
    b = completion_batch(_pairs(tok, 3), tok.pad_token_id, "cpu")
    targets, _ = heal_mod.teacher_targets(st, b, [0, 1, 2], teacher, prep)
    mask = torch.zeros(len(b["targets"]), dtype=torch.bool)
    mask[:5] = True
    kd = heal_mod.loss_terms(st, name, b, cfg, 1.0, (targets, mask)).kd
    scrambled = dataclasses.replace(targets, lp=targets.lp.clone())
    scrambled.lp[5:] = torch.log_softmax(torch.randn(scrambled.lp[5:].shape), -1)  # change only masked positions
    assert float(heal_mod.loss_terms(st, name, b, cfg, 1.0, (scrambled, mask)).kd) == pytest.approx(float(kd))
    scrambled.lp[:5] = torch.log_softmax(torch.randn(scrambled.lp[:5].shape), -1)
    assert float(heal_mod.loss_terms(st, name, b, cfg, 1.0, (scrambled, mask)).kd) != pytest.approx(float(kd))


def test_trust_mask_leaves_out_where_the_teacher_diverged(fresh_tiny):
    from steer_heal.errors import Starved

    model, tok = fresh_tiny
    st = Student(model)
    teacher = _teacher(model, 3, c=30.0)  # a strong push: far from the original model everywhere
    loose = heal_mod.prepare(st, _pairs(tok, 3), HealConfig(heal_target="kl_teacher", trust_kl_max=1e6), teacher,
                             tok.pad_token_id)  # fmt: skip
    assert loose.masked_share == 0.0 and [len(m) for m in loose.mask] == [4, 4, 4]
    with pytest.raises(Starved, match="--trust-kl-max 0.001: .* exceeds it at every one of the 12"):
        heal_mod.prepare(st, _pairs(tok, 3), HealConfig(heal_target="kl_teacher", trust_kl_max=1e-3), teacher,
                         tok.pad_token_id)  # fmt: skip


def test_a_micro_batch_with_nothing_trusted_teaches_nothing(fresh_tiny):
    """kl_teacher: no distillation term and no gradient (skipped, not an error); mix: the SFT part remains."""
    from steer_heal.losses import completion_batch

    model, tok = fresh_tiny
    st = Student(model)
    name = st.add_adapter(0, lora_config(st, HealConfig(lora_r=4)))
    b = completion_batch(_pairs(tok, 3), tok.pad_token_id, "cpu")
    prep = heal_mod.Prepared([3.0] * 3, None, None, None)
    targets, _ = heal_mod.teacher_targets(st, b, [0, 1, 2], _teacher(model, 3, 3.0), prep)
    none = torch.zeros(len(b["targets"]), dtype=torch.bool)
    t = heal_mod.loss_terms(st, name, b, HealConfig(reg="nll", heal_target="kl_teacher"), 1.0, (targets, none))
    assert t.empty and float(t.kd) == 0.0
    t = heal_mod.loss_terms(
        st, name, b, HealConfig(reg="nll", heal_target="mix", mix_weight=0.25), 1.0, (targets, none)
    )
    assert not t.empty and float(t.main) == pytest.approx(0.75 * float(t.nll))


def test_the_barrier_composes_with_distillation(fresh_tiny):
    model, tok = fresh_tiny
    st = Student(model)
    cfg = HealConfig(reg="kl_rev", tau=0.0, heal_target="mix", mix_weight=0.25, lora_r=4)
    name, _ = _distill_terms(st, tok, cfg, _teacher(model, 3, c=3.0))
    _randomise_b(st, name, scale=0.2)  # the student has moved: barrier and distillation both non-zero
    from steer_heal.losses import completion_batch

    b = completion_batch(_pairs(tok, 3), tok.pad_token_id, "cpu")
    prep = heal_mod.Prepared([3.0] * 3, None, None, None)
    t = heal_mod.loss_terms(
        st, name, b, cfg, 1.0, heal_mod.teacher_targets(st, b, [0, 1, 2], _teacher(model, 3, 3.0), prep)
    )
    assert float(t.barrier) > 0 and float(t.kd) > 0
    assert float(t.main) == pytest.approx(0.75 * float(t.nll) + 0.25 * float(t.kd), rel=1e-6)
    assert float(t.total()) == pytest.approx(float(t.main) + float(t.barrier), rel=1e-6)


def test_sft_target_needs_no_teacher_and_kl_teacher_refuses_none(fresh_tiny):
    model, tok = fresh_tiny
    st = Student(model)
    with pytest.raises(ValueError, match="--heal-target kl_teacher needs the round's steered teacher"):
        heal(st, _pairs(tok), HealConfig(heal_target="kl_teacher"), 0, 0, tok.pad_token_id)
    assert st.training is None
