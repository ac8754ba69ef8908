"""The random-direction null's pure parts: its direction seeds and the per-kind shifts of its directions."""

from __future__ import annotations

import numpy as np
import pytest

from steer_heal import null
from steer_heal.config import parse_args
from steer_heal.data import FOUNDATIONS, SHORT
from steer_heal.evaluate import Scored


def _scored(p: np.ndarray, ids: list[str]) -> Scored:
    """An eval with only raw columns: p [N, 7] over FOUNDATIONS, answer mass 0.8, labels cycling."""
    rows = [{"id": i, "label": FOUNDATIONS[k % 7], "p_ans_any": 0.8, **{f"p_{SHORT[f]}": p[k, j] for j, f in
             enumerate(FOUNDATIONS)}} for k, i in enumerate(ids)]  # fmt: skip
    return Scored({}, rows)


def _p(n: int, seed: int, authority: float = 0.0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(n, 7))
    logits[:, FOUNDATIONS.index("Authority")] += authority
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def test_null_seeds_are_distinct_per_run_seed_and_a_prefix_is_the_smaller_null():
    cfg0, cfg1 = parse_args(["--seed", "0"]), parse_args(["--seed", "1"])
    s0 = null.null_seeds(cfg0, 32)
    assert len(set(s0)) == 32 and not set(s0) & set(null.null_seeds(cfg1, 32))
    assert null.null_seeds(cfg0, 8) == s0[:8]  # the frontier reuses the run's first n directions
    assert len(null.null_seeds(cfg0)) == cfg0.eval.null_vectors


def test_direction_shifts_pair_each_direction_with_base_on_the_directions_own_vignettes():
    ids = [str(i) for i in range(30)]
    p = _p(30, 0)
    base = _scored(p, ids)
    sub = ids[5:25]  # the null's subset: base is taken on it, in its order
    same = _scored(p[5:25], sub)
    lower = _scored(_p(30, 0, authority=-1.0)[5:25], sub)
    est, draws = null.direction_shifts([same, lower], base, "Authority", 200, 0)
    assert set(est) == {"raw"}  # no calibrated columns: the cal and disc kinds are not given
    assert est["raw"][0] == 0.0 and np.all(draws["raw"][0] == 0.0)  # the base itself: no shift on any resample
    assert est["raw"][1] < -0.3 and draws["raw"].shape == (2, 200)
    assert np.mean(draws["raw"][1]) == pytest.approx(est["raw"][1], abs=0.1)
