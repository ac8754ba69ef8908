"""Shared fixtures: the tiny random model over SmolLM2's real tokenizer (built in-process, offline)."""

from __future__ import annotations

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
