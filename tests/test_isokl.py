"""Iso-KL calibration: the log-bisection on known monotone maps, D(0) = 0, and the run's record."""

from __future__ import annotations

import math

import pytest
import torch

from steer_heal import events, isokl
from steer_heal.config import parse_args
from steer_heal.errors import UserError
from steer_heal.run import run
from steer_heal.tokens import chat_ids


@pytest.mark.parametrize("c0", [1.0, 100.0, 0.001])
def test_solve_log_finds_the_crossing_from_either_side(c0):
    c, y, tried = isokl.solve_log(lambda c: c * c, 4.0, c0=c0, tol=0.01)
    assert c == pytest.approx(2.0, rel=0.01) and y == pytest.approx(4.0, rel=0.02)
    assert len(tried) <= 24


def test_solve_log_rejects_bad_targets():
    with pytest.raises(ValueError, match="target > 0"):
        isokl.solve_log(lambda c: c, 0.0)


def test_steered_kl_is_zero_at_c0_and_grows_with_c(fresh_tiny):
    model, tok = fresh_tiny
    g = torch.Generator().manual_seed(0)
    v = {L: torch.randn(model.config.hidden_size, generator=g) for L in (1, 2)}
    ids = [chat_ids(tok, "Tip?"), chat_ids(tok, "How are you today?")]
    d = [isokl.steered_kl_p95(model, tok, ids, v, c, 6, 2, 0) for c in (0.0, 0.5, 8.0)]
    assert d[0] == 0.0 and 0 < d[1] < d[2]


def _iso_run(tmp_path, name, target):
    argv = ["--fast-dev-run", "--n-rounds", "1", "--out-dir", str(tmp_path), "--run-name", name, "--iso-kl", target]
    return run(parse_args(argv), argv)


def test_run_records_c_star_and_steers_with_it(tmp_path):
    # The tiny random model's logits are nearly flat, so its KL saturates near 0.02 nats: target 0.01.
    assert _iso_run(tmp_path, "k", "0.01") == 0
    iso = events.read(tmp_path / "k", "isokl")
    assert len(iso) == 1 and iso[0]["target"] == 0.01 and iso[0]["c_star"] > 0
    ys = [y for _, y in iso[0]["tried"]]
    assert min(ys) < 0.01 <= max(ys) and math.isfinite(iso[0]["kl_p95"])  # the target was bracketed
    rnd = events.read(tmp_path / "k", "round")[0]
    steered = next(x for x in events.read(tmp_path / "k", "eval") if x["model"] == "steered")
    assert rnd["c_star"] == iso[0]["c_star"]
    assert steered["c"] == pytest.approx(2.0 * iso[0]["c_star"])  # median alpha 2 x kappa 1, in units of c*


def test_unreachable_target_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"--iso-kl 5.0: could not bracket the target 5.0"):
        _iso_run(tmp_path, "u", "5")
