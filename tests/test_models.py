"""models.load: a random model's weights come from its seed alone, and loading leaves the caller's RNGs alone."""

from __future__ import annotations

import torch

from steer_heal import models


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_random_model_is_its_seed_whatever_the_global_generator_holds():
    torch.manual_seed(123)
    a, _ = models.load(models.TINY, seed=7)
    after = torch.random.get_rng_state()
    torch.manual_seed(456)
    b, _ = models.load(models.TINY, seed=7)
    c, _ = models.load(models.TINY, seed=8)
    assert torch.equal(_weights(a), _weights(b)) and not torch.equal(_weights(a), _weights(c))
    torch.manual_seed(123)
    assert torch.equal(after, torch.random.get_rng_state())  # the build drew from a forked generator
