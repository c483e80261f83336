"""One training step at ResNet-18 size (11.7M weights, k = 16, 4-bit basis, one coefficient
block per tensor, batch of 32 32x32 images): a plain SGD step, a TWA step through the fused
ops, and the paper's P_Step path (gradient vector, per-layer dequantise-and-matmul for the
projection and again for the weights, copied back into the model), timed in one run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import twa_kernels as tk

from conftest import random_packed_basis, random_paper_basis
from paper_baseline import paper_project, paper_reconstruct
from resnet import resnet18

K, BITS, BATCH = 16, 4, 32


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = resnet18()
    names = [n for n, _ in model.named_parameters()]
    shapes = [tuple(p.shape) for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    center = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    subspace = tk.Subspace(names, shapes, center, random_packed_basis(K, sizes, BITS))
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 1000, (BATCH,))
    return model, subspace, random_paper_basis(K, sizes, BITS), x, y


def _run(benchmark, impl, fn):
    benchmark.group = f"train_step resnet18 k={K} bits={BITS}"
    benchmark.extra_info.update(op="train_step", model="resnet18", k=K, bits=BITS, impl=impl)
    # SGD and the fused TWA step are timed in the steady state of a training loop, after the
    # warm-up the op benchmarks use (test_bench_ops.WARMUP); the paper's 2-3 s step after one.
    warmup = 1 if impl == "paper" else 10
    benchmark.pedantic(fn, rounds=5 if impl == "paper" else 10, iterations=1, warmup_rounds=warmup)


def _sgd_step(module, x, y):
    """One SGD-with-momentum step on `module`'s parameters (the weights, or TWA's coefficients)."""
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()

    return step


def test_sgd_step(benchmark, setup):
    model, _, _, x, y = setup
    _run(benchmark, "sgd", _sgd_step(model, x, y))


def test_twa_step_fused(benchmark, setup):
    model, subspace, _, x, y = setup
    _run(benchmark, "fused", _sgd_step(tk.TWA(model, subspace), x, y))


def test_twa_step_paper(benchmark, setup):
    model, subspace, pb, x, y = setup
    params = list(model.parameters())
    coeffs = torch.zeros(K, len(params))
    center = subspace.center

    def step():
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        coeffs.sub_(1e-3 * paper_project(pb, grad))
        flat = paper_reconstruct(pb, coeffs, center)
        with torch.no_grad():
            start = 0
            for p in params:
                p.copy_(flat[start : start + p.numel()].view_as(p))
                start += p.numel()

    _run(benchmark, "paper", step)
