"""Shared fixtures: the tiny random model over SmolLM2's real tokenizer (built in-process, offline), one
finished fast run that the e2e, report and script tests read, and fault injection for the heal."""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    from steer_heal import models

    torch.manual_seed(0)
    model, tok = models.load("tiny-random")
    return model, tok


@pytest.fixture()
def fresh_tiny():
    """A tiny model of its own, for tests that wrap or modify it."""
    from steer_heal import models

    torch.manual_seed(0)
    return models.load("tiny-random")


def fast_args(tmp_path, name, *extra, rounds=2):
    return ["--fast-dev-run", "--n-rounds", str(rounds), "--out-dir", str(tmp_path), "--run-name", name, *extra]


@pytest.fixture(scope="session")
def fast_run(tmp_path_factory):
    """A finished 2-round fast run, <dir>/a, with its ledger at <dir>/results.jsonl."""
    from steer_heal.config import parse_args
    from steer_heal.run import run

    tmp = tmp_path_factory.mktemp("runs")
    argv = fast_args(tmp, "a")
    assert run(parse_args(argv), argv) == 0
    return tmp


def inject(monkeypatch, from_call: int = 0, nll=1.0, barrier=1.0, when=lambda student: True):
    """Wrap heal.loss_terms: from its `from_call`-th call on (counting calls where `when(student)` holds),
    multiply the NLL by `nll` (NaN = diverged weights) and the barrier by `barrier` (a runaway barrier)."""
    from steer_heal import heal

    real = getattr(heal.loss_terms, "__wrapped__", heal.loss_terms)  # a second inject replaces the first
    calls = itertools.count()

    def faulty(student, *args, **kw):
        t = real(student, *args, **kw)
        if when(student) and next(calls) >= from_call:
            t = dataclasses.replace(t, nll=t.nll * nll, barrier=t.barrier * barrier)
        return t

    faulty.__wrapped__ = real
    monkeypatch.setattr(heal, "loss_terms", faulty)
