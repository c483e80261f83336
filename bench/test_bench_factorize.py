"""Deep weight factorization: the cost per training step of D = 2, 3, 4 against the dense model.

ResNet-18 (11.2M conv/linear weights, bench/resnet.py) trains one SGD step on an 8 x 3 x 64 x 64
batch: a small input, so that the weight-side work DWF adds (the product forward, D factor
gradients backward, D times the optimizer's parameters) is a visible share of the step rather
than hidden under the convolutions. Also timed in the same run:
  - the swap: the same factorisation by swapping in a forward pre-hook that writes the product
    into a plain `weight` attribute (the module-swap alternative to torch.nn.utils.parametrize);
  - the product and its gradient alone over all ResNet-18 weights: autograd's chain of
    multiplies, the library's one autograd Function (`_Product`), and torch.compile of the chain.

    python -m pytest bench/test_bench_factorize.py --benchmark-json=results/dwf/bench.json
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet import resnet18

import twa_kernels as tk
from twa_kernels.factorization import _Product

ROUNDS, WARMUP = 5, 2


def _swap_factorize(model: nn.Module, depth: int) -> nn.Module:
    """Module-swap alternative: factors in a ParameterList, product written by a pre-hook."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight.detach()
            del module.weight
            module.weight_factors = nn.ParameterList(
                [nn.Parameter(w.abs().pow(1 / depth) * (w.sign() if d == 0 else 1)) for d in range(depth)])

            def hook(mod, args):
                mod.weight = _Product.apply(*mod.weight_factors)
            module.register_forward_pre_hook(hook)
    return model


def _step_fn(model):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 1000, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


@pytest.mark.parametrize("variant", ["dense", "D=2", "D=3", "D=4", "swap D=3"])
def test_resnet18_step(benchmark, variant):
    torch.manual_seed(0)
    model = resnet18()
    if variant.startswith("swap"):
        _swap_factorize(model, 3)
    elif variant != "dense":
        tk.factorize(model, depth=int(variant[-1]))
    benchmark.group = "ResNet-18 SGD step, batch 8 x 3 x 64 x 64"
    benchmark.extra_info.update(variant=variant, params=sum(p.numel() for p in model.parameters()))
    benchmark.pedantic(_step_fn(model), rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)


def _chain(*factors):
    out = factors[0]
    for f in factors[1:]:
        out = out * f
    return out


_compiled = {}


@pytest.mark.parametrize("impl", ["autograd chain", "Function", "compile"])
@pytest.mark.parametrize("depth", [2, 3, 4])
def test_product_and_gradient(benchmark, depth, impl):
    n = sum(p.numel() for n, p in resnet18().named_parameters() if n.endswith("weight") and p.dim() > 1)
    factors = [torch.randn(n, requires_grad=True) for _ in range(depth)]
    grad = torch.randn(n)
    if impl == "compile":
        fn = _compiled.setdefault(depth, torch.compile(_chain, dynamic=False))
    else:
        fn = _Product.apply if impl == "Function" else _chain

    def run():
        for f in factors:
            f.grad = None
        fn(*factors).backward(grad)
    benchmark.group = f"product + gradient, D={depth}, {n / 1e6:.1f}M weights"
    benchmark.extra_info.update(impl=impl, depth=depth, n=n)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
