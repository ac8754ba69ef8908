"""Analytic identities of the loss maths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from steer_heal import losses


def _logp(k=6, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.log_softmax(torch.randn(k, v, generator=g) * 2, -1)


@pytest.mark.parametrize("fn", [losses.kl_rev, losses.kl_fwd])
def test_kl_of_identical_logits_is_zero(fn):
    lp = _logp()
    assert torch.allclose(fn(lp, lp), torch.zeros(lp.shape[0]), atol=1e-6)


def test_kl_matches_torch_kl_div():
    s, r = _logp(seed=1), _logp(seed=2)
    # F.kl_div(input, target, log_target=True) = sum target.exp() * (target - input) = KL(target || input)
    ref_rev = F.kl_div(r, s, log_target=True, reduction="none").sum(-1)  # KL(s || r)
    ref_fwd = F.kl_div(s, r, log_target=True, reduction="none").sum(-1)  # KL(r || s)
    assert torch.allclose(losses.kl_rev(s, r), ref_rev, atol=1e-6)
    assert torch.allclose(losses.kl_fwd(s, r), ref_fwd, atol=1e-6)
    assert not torch.allclose(losses.kl_rev(s, r), losses.kl_fwd(s, r))  # the two directions differ


def test_rmse_has_finite_gradient_at_zero_kl():
    kl = torch.zeros(5, requires_grad=True)
    d = losses.aggregate(kl, torch.zeros(5, dtype=torch.long), 1, "rmse")
    d.sum().backward()
    assert torch.isfinite(kl.grad).all()


def test_aggregations_on_a_short_loop():
    # 60 positions, 4 of them looping at 6 nats: mean stays below tau = 0.5, the others do not.
    kl = torch.full((60,), 0.01)
    kl[30:34] = 6.0
    seg = torch.zeros(60, dtype=torch.long)
    agg = {h: float(losses.aggregate(kl, seg, 1, h)) for h in ("mean", "rmse", "p95", "max")}
    assert agg["mean"] < 0.5 < agg["rmse"]
    assert agg["max"] == pytest.approx(6.0)
    assert agg["p95"] > agg["mean"]
    with pytest.raises(ValueError, match="median"):
        losses.aggregate(kl, seg, 1, "median")


def test_aggregate_is_per_completion():
    kl = torch.tensor([1.0, 1.0, 3.0, 5.0])
    seg = torch.tensor([0, 0, 1, 1])
    assert losses.aggregate(kl, seg, 2, "mean").tolist() == [1.0, 4.0]


def test_hinge_and_round_schedule():
    d = torch.tensor([0.2, 0.9])
    assert float(losses.hinge(d, 0.5, 2.0)) == pytest.approx(2.0 * 0.4 / 2)
    assert float(losses.hinge(torch.tensor([0.1]), 0.5, 10.0)) == 0.0
    assert losses.lam_at_round(0.3, 0, -1.0) == pytest.approx(0.3)
    assert losses.lam_at_round(0.3, 3, -1.0) == pytest.approx(0.3 / 4)
    assert losses.lam_at_round(0.3, 5, 0.0) == pytest.approx(0.3)


def test_nll_is_mean_negative_target_logprob():
    lp = _logp()
    t = torch.tensor([0, 1, 2, 3, 4, 5])
    assert float(losses.nll(lp, t)) == pytest.approx(-float(sum(lp[i, t[i]] for i in range(6)) / 6), rel=1e-6)


def test_power_iteration_recovers_top_singular_value():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 20, generator=g), torch.randn(30, 4, generator=g)
    sigma = torch.linalg.matrix_norm(0.5 * B @ A, ord=2)
    assert float(losses.spectral_norm_lowrank(A, B, 0.5, iters=50)) == pytest.approx(float(sigma), rel=1e-4)


def test_completion_mask_is_exact():
    pairs = [([1, 2, 3], [7, 8]), ([4, 5], [9, 10, 11])]
    b = losses.completion_batch(pairs, pad_id=0, device="cpu")
    ids = b["enc"]["input_ids"]
    # Every selected position predicts the next token, and the targets are exactly the completions.
    assert b["targets"].tolist() == [7, 8, 9, 10, 11]
    assert ids[b["rows"], b["cols"] + 1].tolist() == b["targets"].tolist()
    assert b["seg"].tolist() == [0, 0, 1, 1, 1]


def test_cosine_warmup_schedule():
    lrs = [losses.cosine_warmup(s, 10, 2) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_completion_terms_equal_the_full_log_softmax(fresh_tiny, chunk):
    """Values and gradients of the chunked, checkpointed loss equal those of the [K, V] computation."""
    model, tok = fresh_tiny
    pairs = [([1, 5, 9, 12], [40, 41, 42]), ([3, 4], [50, 51, 52, 53, 54])]
    b = losses.completion_batch(pairs, tok.pad_token_id, "cpu")
    with torch.no_grad():
        ref = torch.randn(b["targets"].shape[0], model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    w = model.model.norm.weight.requires_grad_(True)  # a weight before the LM head: its grad flows through h

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return w.grad.clone()

    lp = losses.selected_logprobs(model, b)
    ref_lp = F.log_softmax(losses.lm_logits(model, ref), -1)
    full_tok, full_kl = losses.token_logprob(lp, b["targets"]), losses.kl_rev(lp, ref_lp)
    g_full = grads(-full_tok.mean() + full_kl.mean())
    h = losses.selected_hidden(model, b)
    tok_lp, kl, _ = losses.completion_terms(model, h, b["targets"], ref, losses.kl_rev, chunk)
    assert torch.allclose(tok_lp, full_tok.detach(), atol=1e-5) and torch.allclose(kl, full_kl.detach(), atol=1e-5)
    assert torch.allclose(grads(-tok_lp.mean() + kl.mean()), g_full, atol=1e-5)


def test_token_nlls_in_chunks_equal_the_full_log_softmax_per_pair(tiny):
    model, tok = tiny
    pairs = [([1, 5, 9], [4, 4, 7, 2]), ([3], [8, 6]), ([2, 2, 2, 2, 2], [5, 1, 1, 9, 3, 3])]
    b = losses.completion_batch(pairs, tok.pad_token_id, "cpu")
    with torch.no_grad():
        full = -losses.token_logprob(losses.naive_logprobs(model, b), b["targets"])
    got = losses.token_nlls(model, pairs, tok.pad_token_id, batch_size=2, desc="t", chunk=3)  # 3 < 12 positions
    assert [len(x) for x in got] == [4, 2, 6]  # one NLL per completion token, pairs in their given order
    for i, x in enumerate(got):
        assert torch.allclose(x, full[b["seg"] == i], atol=1e-5)


def test_top_k_with_k_equal_to_the_vocabulary_is_the_full_kl():
    s, t = _logp(seed=3), _logp(seed=4)
    idx, lp, tail = losses.topk_targets(t, t.shape[-1])
    assert torch.isneginf(tail).all()
    assert torch.allclose(losses.kl_topk(s, idx, lp, tail), losses.kl_fwd(s, t), atol=1e-6)  # KL(t || s)


def test_top_k_tail_bucket_is_a_proper_kl():
    """Merging the tokens outside the top-k into one bucket can only lose information: 0 <= KL_k <= KL."""
    s, t = _logp(seed=5), _logp(seed=6)
    full = losses.kl_fwd(s, t)
    for k in (1, 3, 8):
        part = losses.kl_topk(s, *losses.topk_targets(t, k))
        assert (part >= -1e-6).all() and (part <= full + 1e-5).all()
    same = losses.kl_topk(t, *losses.topk_targets(t, 3))
    assert torch.allclose(same, torch.zeros_like(same), atol=1e-6)  # teacher = student: 0 with any k


def test_distillation_terms_chunked_equal_unchunked(tiny):
    model, tok = tiny
    pairs = [([1, 2, 3, 4], [5, 6, 7, 8, 9]), ([10, 11], [12, 13, 14])]
    b = losses.completion_batch(pairs, tok.pad_token_id, "cpu")
    with torch.no_grad():
        h = losses.selected_hidden(model, b)
    g = torch.Generator().manual_seed(0)
    teacher = losses.Teacher(h=h + 0.5 * torch.randn(h.shape, generator=g))
    whole = losses.completion_terms(model, h, b["targets"], teacher=teacher, chunk=1000)
    for chunk in (1, 3):
        part = losses.completion_terms(model, h, b["targets"], teacher=teacher, chunk=chunk)
        assert torch.allclose(part.kd, whole.kd, atol=1e-5) and torch.allclose(part.tok, whole.tok, atol=1e-5)
    # the full-vocabulary teacher from hidden states equals its cached top-V targets
    with torch.no_grad():
        logp_t = torch.log_softmax(losses.lm_logits(model, teacher.h), -1)
    cached = losses.Teacher(*(None,), *losses.topk_targets(logp_t, logp_t.shape[-1]))
    assert torch.allclose(losses.completion_terms(model, h, b["targets"], teacher=cached).kd, whole.kd, atol=1e-5)
