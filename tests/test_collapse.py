"""Collapse early-warning maths (PR, effective rank, entropy, power iteration), the amplification gauge
against an explicit Jacobian, and the lead/lag table."""

from __future__ import annotations

import math

import pytest
import torch

from steer_heal import collapse
from steer_heal.tokens import chat_ids


def test_participation_ratio_of_isotropic_gaussian_is_its_dimension():
    x = torch.randn(20_000, 16, generator=torch.Generator().manual_seed(0))
    assert collapse.participation_ratio(x) == pytest.approx(16, rel=0.02)
    assert collapse.effective_rank(x) == pytest.approx(16, rel=0.02)


def test_participation_ratio_of_rank_one_activations_is_one():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 1, generator=g) * torch.randn(1, 64, generator=g) + torch.randn(64, generator=g)
    assert collapse.participation_ratio(x) == pytest.approx(1.0, abs=1e-6)
    assert collapse.effective_rank(x) == pytest.approx(1.0, abs=1e-4)


def test_participation_ratio_counts_unequal_dimensions():
    """Two directions with variances 1 and 1/4: PR = (1.25)^2 / (1 + 1/16) = 1.4706."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50_000, 2, generator=g) * torch.tensor([1.0, 0.5])
    assert collapse.participation_ratio(x) == pytest.approx(1.25**2 / (1 + 1 / 16), rel=0.02)


def test_participation_ratio_rejects_one_sample():
    with pytest.raises(ValueError, match=r"\[N >= 2, d\]"):
        collapse.participation_ratio(torch.randn(1, 8))


def test_entropy_of_uniform_is_log_v_and_of_one_hot_is_zero():
    V = 1000
    uniform = torch.log_softmax(torch.zeros(3, V), -1)
    assert torch.allclose(collapse.token_entropy(uniform), torch.full((3,), math.log(V)), atol=1e-5)
    one_hot = torch.full((1, V), float("-inf"))
    one_hot[0, 7] = 0.0
    assert collapse.token_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-7)


def test_power_iteration_recovers_top_singular_value_of_known_map():
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    V, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))
    s = torch.tensor([5.0, 2.0, 1.5, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    W = U[:, :10] @ torch.diag(s) @ V.T  # 12 x 10, singular values s
    sigma = collapse.top_singular_value(lambda v: W @ v, lambda u: W.T @ u, 10, 30, g)
    assert sigma == pytest.approx(5.0, rel=1e-5)


def test_amplification_gauge_matches_the_explicit_jacobian(fresh_tiny):
    model, tok = fresh_tiny
    ids = chat_ids(tok, "How do I cook rice?")
    before = model.config._attn_implementation
    f = collapse.band_map(model, ids, 1, 2)
    J = torch.autograd.functional.jacobian(f, torch.zeros(model.config.hidden_size))
    top = float(torch.linalg.svdvals(J)[0])
    got = collapse.amplification(model, [ids], 1, 2, n_iter=40)
    assert got["amp"] == pytest.approx(top, rel=5e-3)
    assert model.config._attn_implementation == before  # the eager switch is undone


def test_band_map_at_zero_is_the_block_output(fresh_tiny):
    from steer_heal.hooks import record

    model, tok = fresh_tiny
    ids = chat_ids(tok, "Hello")
    with record(model, [2]) as acts:
        model(input_ids=torch.tensor([ids]))
    out = collapse.band_map(model, ids, 1, 2)(torch.zeros(model.config.hidden_size))
    assert torch.allclose(out, acts[2][0, -1], atol=1e-6)


def test_lead_lag_reports_which_signal_moved_first():
    base = {"coherence": 0.7, "pr_band": 20.0, "amp": 1.0}
    rounds = [
        {"round": 0, "coherence": 0.69, "pr_band": 17.0, "amp": 1.02},
        {"round": 1, "coherence": 0.65, "pr_band": 15.0, "amp": 1.05},
        {"round": 2, "coherence": 0.50, "pr_band": 12.0, "amp": 1.30},
    ]
    drop, rows = collapse.lead_lag(base, rounds, "coherence", {"pr_band": -1, "amp": 1}, 0.1, 0.1)
    assert drop == 2
    by = {r["signal"]: r for r in rows}
    assert by["pr_band"]["first_move"] == 0 and by["pr_band"]["lead"] == 2
    assert by["amp"]["first_move"] == 2 and by["amp"]["lead"] == 0
