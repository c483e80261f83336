"""twa_kernels._random.seeded: the body draws from a seeded global RNG, and the caller's
generators, CUDA's included, are as they were afterwards."""

from __future__ import annotations

import torch

from twa_kernels._random import seeded


def test_seeded_draws_as_its_seed_says_and_restores_the_cpu_state():
    state = torch.get_rng_state()
    with seeded(5):
        inside = torch.randn(3)
    assert torch.equal(inside, torch.randn(3, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(torch.get_rng_state(), state)


def test_seeded_never_queues_a_seed_for_cuda_generators_it_cannot_restore(monkeypatch):
    # torch.manual_seed seeds CUDA too, lazily when CUDA is not initialised yet: the user's
    # first CUDA draws would then follow this library's seed
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    with seeded(7):
        torch.randn(2)
    assert calls == []
