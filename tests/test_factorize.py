"""Deep weight factorization: the penalty it implies, its init, its dynamics, collapse and errors."""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import twa_kernels as tk
from twa_kernels.factorization import (
    EPS, FactorizationError, SparsityReport, check_optimizer, collapse, dwf_init_, factor_param_groups, factor_parameters,
    factorize, sparsity_report, truncated_std, truncation_bounds,
)

from tests.helpers import tiny_gpt2


def _regression(n=80, p=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    w = torch.tensor([2.0, -1.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.3], dtype=torch.float64)[:p]
    y = x @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def _ista(x, y, lam, iters=50_000):
    """Independent lasso solver: proximal gradient on (1/2n)||Xw - y||^2 + lam ||w||_1."""
    n = len(y)
    step = 1.0 / float(torch.linalg.eigvalsh(x.T @ x / n).max())
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(iters):
        z = w - step * (x.T @ (x @ w - y) / n)
        new = torch.sign(z) * (z.abs() - step * lam).clamp_min(0)
        if float((new - w).abs().max()) < 1e-13:
            return new
        w = new
    raise AssertionError("ISTA did not converge")


def _train_factorised(x, y, depth, weight_decay, lr, steps, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(x.shape[1], 1, bias=False).double()
    factorize(model, depth=depth, sigma_w=0.3)
    opt = torch.optim.SGD(factor_param_groups(model, weight_decay=weight_decay), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * F.mse_loss(model(x).squeeze(1), y)).backward()
        opt.step()
    return model


def test_depth2_reaches_the_lasso_solution():
    x, y = _regression()
    lam = 0.25
    # weight decay wd on D=2 factors is the penalty (wd * 2 / 2) ||w||_1 = wd ||w||_1
    model = _train_factorised(x, y, depth=2, weight_decay=lam, lr=0.1, steps=1500)
    w = collapse(model).weight.detach().squeeze(0)
    ref = _ista(x, y, lam)
    assert ((w != 0) == (ref != 0)).all(), (w, ref)
    assert 0 < int((ref != 0).sum()) < len(ref)  # a real sparse support, not all or nothing
    torch.testing.assert_close(w, ref, atol=1e-3, rtol=0)


def test_depth3_fixed_point_is_l23_stationary():
    x, y = _regression(seed=1)
    lam, depth = 0.1, 3
    model = _train_factorised(x, y, depth=depth, weight_decay=2 * lam / depth, lr=0.3, steps=1500)
    w = collapse(model).weight.detach().squeeze(0)
    support = w != 0
    assert 0 < int(support.sum()) < len(w)
    grad_loss = x.T @ (x @ w - y) / len(y)
    # d/dw [lam |w|^(2/3)] = lam (2/3) sign(w) |w|^(-1/3) on the support
    penalty_grad = lam * (2 / 3) * torch.sign(w[support]) * w[support].abs().pow(-1 / 3)
    torch.testing.assert_close(grad_loss[support], -penalty_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("depth, sigma", [(3, 0.05), (2, 1e16), (3, 1e300)])
def test_init_statistics_match_the_truncated_normal(depth, sigma):
    # a sigma far above 1 puts the band near 0: its std came out negative or complex, and
    # every factor was drawn at the band's lower end
    s, lo, hi = truncation_bounds(sigma, depth)
    factor = torch.empty(400_000, dtype=torch.float64)
    dwf_init_(factor, sigma, depth, seed=0)
    assert factor.abs().min() > lo and factor.abs().max() < hi
    assert int((factor.abs() == factor.abs().min()).sum()) < 10  # no pile-up at a clamped bound
    assert abs(float((factor > 0).double().mean()) - 0.5) < 0.01
    # the variance of N(0, s^2) restricted to lo < |x| < hi, by numerical integration
    grid = torch.linspace(lo, hi, 200_001, dtype=torch.float64)
    dens = torch.exp(-0.5 * (grid / s) ** 2)
    var = float(torch.trapezoid(grid ** 2 * dens, grid) / torch.trapezoid(dens, grid))
    assert float(factor.var()) == pytest.approx(var, rel=0.01)
    assert truncated_std(sigma, depth) == pytest.approx(var ** (depth / 2), rel=1e-4)


@pytest.mark.parametrize("bad", ["int64", "bool", "meta", "list", "expanded"])
def test_dwf_init_refuses_a_tensor_it_cannot_fill_with_values(bad):
    # an int64 tensor was filled with zeros, a bool one with True; the others raised torch's errors
    factor = {"int64": torch.zeros(4, dtype=torch.int64), "bool": torch.zeros(4, dtype=torch.bool),
              "meta": torch.empty(4, device="meta"), "list": [0.0] * 4,
              "expanded": torch.zeros(1).expand(4)}[bad]
    with pytest.raises(FactorizationError, match="dwf_init_"):
        dwf_init_(factor, 0.05, 3, seed=0)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_product_std_on_a_256x256_layer(depth):
    torch.manual_seed(depth)
    layer = nn.Linear(256, 256)
    sigma = float(layer.weight.detach().std())
    factorize(layer, depth=depth)
    measured = float(layer.weight.detach().std())
    assert measured == pytest.approx(truncated_std(sigma, depth), rel=0.05)
    assert measured < 0.6 * sigma  # truncation shrinks it: documented in docs/methods/factorization.md
    torch.manual_seed(depth)
    matched = factorize(nn.Linear(256, 256), depth=depth, init="dwf_matched")
    assert float(matched.weight.detach().std()) == pytest.approx(sigma, rel=0.05)


def test_imbalance_decays_like_one_minus_4_lambda_eta_over_d():
    torch.manual_seed(0)
    depth, lr, wd = 3, 0.01, 0.05
    lam = wd * depth / 2  # the L_{2/D} penalty's lambda that weight decay wd implies
    x, y = _regression(n=40, p=6)
    model = nn.Linear(6, 1, bias=False).double()
    factorize(model, depth=depth, sigma_w=0.3)
    f = model.parametrizations.weight
    opt = torch.optim.SGD(factor_param_groups(model, weight_decay=wd), lr=lr)

    def imbalance():
        return torch.linalg.norm(f.original0.detach() ** 2 - f.original1.detach() ** 2)

    start, steps = imbalance(), 1000
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * F.mse_loss(model(x).squeeze(1), y)).backward()
        opt.step()
    expected = (1 - 4 * lam * lr / depth) ** steps
    assert expected < 0.5  # it did decay measurably
    assert float(imbalance() / start) == pytest.approx(expected, rel=0.05)


def _cnn():
    return nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 20, 10))


def test_collapse_matches_and_loads_into_the_original_architecture(tmp_path):
    torch.manual_seed(0)
    model = factorize(_cnn(), depth=3).eval()
    with torch.no_grad():  # as training leaves them: some weights just below the eps threshold
        model[4].parametrizations.weight.original0[:, ::3] *= 1e-6
    x = torch.randn(16, 1, 20)
    plain = collapse(model)
    assert sparsity_report(plain).nonzero < sparsity_report(plain).total  # the threshold did bite
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(collapse(model, threshold=0)(x), model(x), atol=0, rtol=0)
    assert all(type(m) in (nn.Conv1d, nn.BatchNorm1d, nn.ReLU, nn.Flatten, nn.Linear) for m in plain)
    tk.save_state_dict(plain.state_dict(), tmp_path / "plain.pt")
    fresh = _cnn()
    fresh.load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True))  # strict
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), plain(x), atol=0, rtol=0)
    # the factorised model still works after collapse (collapse copies)
    assert model(x).shape == (16, 10)


def test_sparsity_report_counts_the_zeros():
    layer = nn.Linear(10, 10, bias=False)
    factorize(layer, depth=2, init="keep")
    with torch.no_grad():
        layer.parametrizations.weight.original0[:3] = 0
    rep = sparsity_report(layer)
    assert (rep.total, rep.nonzero) == (100, 70)
    assert rep.compression == pytest.approx(100 / 70)
    assert "overall" in str(rep) and rep.to_dict()["layers"][".weight"]["nonzero"] == 70
    json.dumps(rep.to_dict())
    with torch.no_grad():  # a diverged run's NaN weights are not zeros: they read as fully pruned
        layer.parametrizations.weight.original0[3:5] = float("nan")
    assert sparsity_report(layer).nonzero == 70
    with torch.no_grad():
        layer.parametrizations.weight.original0[:] = float("nan")
    assert sparsity_report(layer).nonzero == 100
    with pytest.warns(DeprecationWarning, match="to_dict"):
        assert rep.as_dict() == rep.to_dict()


def test_one_layer_name_or_type_given_alone_is_that_layer():
    # "10" was read as layers "1" and "0", and a bare type was refused by list()
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(11)])
    factorize(model, 2, layers="10")
    assert [n for n, _ in factor_parameters(model)] == [f"10.parametrizations.weight.original{i}" for i in range(2)]
    other = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(2, 2, 3))
    factorize(other, 2, layers=nn.Conv1d)
    assert {n.split(".")[0] for n, _ in factor_parameters(other)} == {"1"}


def test_sparsity_report_counts_a_weight_two_layers_share_once():
    # a Parameter held by two layers was counted under both names, skewing total and sparsity
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 100))
    model[2].weight = model[0].weight
    with torch.no_grad():
        model[0].weight.zero_()
    for report in (sparsity_report(model), sparsity_report(collapse(model))):
        assert [row[0] for row in report.rows] == ["0.weight", "3.weight"]
        assert (report.total, report.nonzero) == (416, 400) and report.sparsity == pytest.approx(16 / 416)


def _factors(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for _, p in factor_parameters(model)]


def test_a_seed_reproduces_the_init_and_leaves_the_global_rng_alone():
    torch.manual_seed(1)
    a, b = _cnn(), _cnn()
    b.load_state_dict(a.state_dict())
    state = torch.get_rng_state()
    factorize(a, depth=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    factorize(b, depth=3, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(_factors(a), _factors(b)))
    factor = torch.empty(1000, dtype=torch.float64)
    assert torch.equal(dwf_init_(factor.clone(), 0.05, 3, seed=3), dwf_init_(factor.clone(), 0.05, 3, seed=3))


def test_no_seed_draws_from_the_global_rng():
    factor = torch.empty(1000, dtype=torch.float64)
    torch.manual_seed(5)
    first = dwf_init_(factor.clone(), 0.05, 3)
    torch.manual_seed(5)
    assert torch.equal(dwf_init_(factor.clone(), 0.05, 3), first)
    assert not torch.equal(dwf_init_(factor.clone(), 0.05, 3), first)


def test_the_generator_argument_still_works_with_a_warning():
    factor = torch.empty(1000, dtype=torch.float64)
    expected = dwf_init_(factor.clone(), 0.05, 3, seed=0)
    with pytest.warns(DeprecationWarning, match="seed="):
        assert torch.equal(dwf_init_(factor.clone(), 0.05, 3, generator=torch.Generator().manual_seed(0)), expected)
    with pytest.warns(DeprecationWarning, match="seed="):  # the old positional place of generator
        assert torch.equal(dwf_init_(factor.clone(), 0.05, 3, EPS, torch.Generator().manual_seed(0)), expected)
    torch.manual_seed(1)
    a, b = _cnn(), _cnn()
    b.load_state_dict(a.state_dict())
    factorize(a, depth=2, seed=4)
    with pytest.warns(DeprecationWarning, match="seed="):
        factorize(b, depth=2, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(_factors(a), _factors(b)))
    with pytest.raises(tk.errors.InvalidArgumentError, match="not both"):
        factorize(_cnn(), depth=2, seed=1, generator=torch.Generator())


def _train_steps(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 20, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_save_and_resume_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = factorize(_cnn(), depth=3)
    opt = torch.optim.SGD(factor_param_groups(model, 1e-3, lr=0.05, momentum=0.9), lr=0.05)
    _train_steps(model, opt, 3, seed=1)
    torch.save(dict(model=model.state_dict(), opt=opt.state_dict()), tmp_path / "ckpt.pt")
    _train_steps(model, opt, 3, seed=2)

    resumed = factorize(_cnn(), depth=3)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(factor_param_groups(resumed, 1e-3, lr=0.05, momentum=0.9), lr=0.05)
    opt2.load_state_dict(ckpt["opt"])
    _train_steps(resumed, opt2, 3, seed=2)
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_names_groups_and_dense_biases_and_norms():
    model = factorize(_cnn(), depth=2)
    names = [n for n, _ in model.named_parameters()]
    assert "0.parametrizations.weight.original1" in names and "0.bias" in names
    assert "1.weight" in names and "1.bias" in names  # BatchNorm stays dense
    groups = factor_param_groups(model, weight_decay=1e-3, lr=0.1)
    assert [len(g["params"]) for g in groups] == [4, 4] and groups[1]["weight_decay"] == 0.0
    assert groups[0]["lr"] == 0.1 == groups[1]["lr"]
    with_bias = factorize(_cnn(), depth=2, biases=True)
    assert "0.parametrizations.bias.original0" in dict(with_bias.named_parameters())
    norm = factorize(_cnn(), depth=2, layers=["1"], init="keep")  # asked for: the norm layer
    assert [n for n, _ in factor_parameters(norm)] == ["1.parametrizations.weight.original0",
                                                       "1.parametrizations.weight.original1"]
    torch.testing.assert_close(norm[1].weight, torch.ones(8))  # "keep" is exact


def test_product_computed_once_per_forward_per_layer(monkeypatch):
    import twa_kernels.factorization as mod

    calls = []
    original = mod._Product.forward

    def counting(*factors):
        calls.append(len(factors))
        return original(*factors)

    monkeypatch.setattr(mod._Product, "forward", staticmethod(counting))
    model = factorize(_cnn(), depth=4)
    F.cross_entropy(model(torch.randn(4, 1, 20)), torch.zeros(4, dtype=torch.long)).backward()
    assert calls == [4, 4]  # two factorised layers, one product each, forward and backward included


def test_named_errors():
    with pytest.raises(FactorizationError, match="depth"):
        factorize(_cnn(), depth=1)
    with pytest.raises(FactorizationError, match="sigma_w"):
        factorize(_cnn(), depth=3, sigma_w=0.0)
    with pytest.raises(FactorizationError, match="sigma_w"):
        dwf_init_(torch.empty(3), -1.0, 2)
    with pytest.raises(FactorizationError, match=r"'2' \(ReLU\) has no `weight`"):
        factorize(_cnn(), depth=2, layers=["2"])
    with pytest.raises(FactorizationError, match=r"layer '1'.weight: sigma_w"):  # norm weights are all ones
        factorize(_cnn(), depth=2, layers=[nn.BatchNorm1d])
    with pytest.raises(FactorizationError, match="no module named"):
        factorize(_cnn(), depth=2, layers=["nope"])
    with pytest.raises(FactorizationError, match="already factorised"):
        factorize(factorize(_cnn(), depth=2), depth=2)
    with pytest.raises(FactorizationError, match="factorize"):
        factor_param_groups(_cnn(), 1e-3)
    # an optimizer built before factorising decays the dense weights the model no longer uses
    model = _cnn()
    stale = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
    factorize(model, depth=3)
    with pytest.raises(FactorizationError, match=r"holds the dense weight '0.weight'"):
        check_optimizer(model, stale)
    check_optimizer(model, torch.optim.SGD(factor_param_groups(model, 1e-4), lr=0.1))
    with pytest.raises(FactorizationError, match="does not hold the factors"):
        check_optimizer(model, torch.optim.SGD([p for n, p in model.named_parameters() if "bias" in n], lr=0.1))
    # a frozen layer's factors are trained by no optimizer: one built from the trainable
    # parameters only is whole
    model = _cnn()
    model[0].requires_grad_(False)
    factorize(model, depth=2, init="keep")
    check_optimizer(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    with pytest.raises(FactorizationError, match="does not hold the factors"):
        check_optimizer(model, torch.optim.SGD([model[1].weight], lr=0.1))


def test_tied_weights_are_refused_and_a_reused_layer_is_not():
    lm = nn.ModuleDict({"emb": nn.Embedding(5, 4), "out": nn.Linear(4, 5, bias=False)})
    lm["out"].weight = lm["emb"].weight
    for layers in (["out"], ["emb", "out"]):
        with pytest.raises(FactorizationError, match=r"'(out|emb)'.weight is one Parameter shared with "
                                                     r"\['(emb|out)'\].*Untie them first"):
            factorize(lm, depth=2, init="keep", layers=layers)
    with pytest.raises(FactorizationError, match=r"every layer to factorise shares its weight.*'out': \['emb'\]"):
        factorize(lm, depth=2, init="keep")
    assert factor_parameters(lm) == [] and lm["out"].weight is lm["emb"].weight  # refused before any change
    # by default a tied layer is left out, with a warning, and the others are factorised
    lm["hidden"] = nn.Linear(4, 4)
    with pytest.warns(UserWarning, match=r"factorize leaves out \['out'\]"):
        factorize(lm, depth=2, init="keep")
    assert [n for n, _ in factor_parameters(lm)] == [f"hidden.parametrizations.weight.original{i}" for i in range(2)]
    assert lm["out"].weight is lm["emb"].weight
    factorize(_tied_bias(), depth=2)  # a bias left dense may stay shared
    with pytest.raises(FactorizationError, match=r"'0'.bias is one Parameter shared with \['1'\]"):
        factorize(_tied_bias(), depth=2, biases=True)
    layer = nn.Linear(4, 4)
    reused = factorize(nn.Sequential(layer, nn.ReLU(), layer), depth=2, init="keep")
    assert len(factor_parameters(reused)) == 2


def _tied_bias():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].bias = model[0].bias
    return model


@pytest.mark.parametrize("eps", [-1e-7, float("nan"), float("inf")])
def test_eps_must_be_finite_and_non_negative(eps):
    with pytest.raises(FactorizationError, match=r"eps=.*finite eps >= 0"):
        factorize(_cnn(), depth=3, eps=eps)
    with pytest.raises(FactorizationError, match=r"eps=.*finite eps >= 0"):
        factorize(_cnn(), depth=3, eps=eps, init="keep")
    assert truncation_bounds(0.1, 2, eps=0.0)[1] == 0.0  # no lower bound is allowed


def test_truncation_bound_values():
    s, lo, hi = truncation_bounds(0.01, 2)
    assert (s, lo, hi) == pytest.approx((0.1, math.sqrt(EPS), math.sqrt(0.02)))
    assert truncation_bounds(0.9, 2)[2] == 1.0  # capped at 1


def test_dwf_lr_scales_a_positive_rate_and_names_anything_else():
    from twa_kernels.factorization import dwf_lr

    assert dwf_lr(0.1) == pytest.approx(0.3) and dwf_lr(0.1, 4) == pytest.approx(0.4)
    for bad in (dict(dense_lr=-0.1), dict(dense_lr=0.1, factor=0), dict(dense_lr=float("nan"))):
        with pytest.raises(tk.errors.InvalidArgumentError, match="must be"):
            dwf_lr(**bad)
    with pytest.raises(tk.errors.InvalidTypeError, match="factor must be a number"):
        dwf_lr(0.1, factor="3")


def test_the_module_is_not_shadowed_by_its_function_and_the_old_path_warns():
    import importlib

    import twa_kernels.factorization as module

    assert module.__name__ == "twa_kernels.factorization" and tk.factorize is module.factorize
    with pytest.warns(DeprecationWarning, match="twa_kernels.factorization"):
        from twa_kernels.factorize import dwf_lr
    assert dwf_lr is module.dwf_lr
    assert callable(tk.factorize) and importlib.import_module("twa_kernels.factorize").__name__ == "twa_kernels.factorize"
    assert tk.factorize is module.factorize  # importing the old path did not rebind the function


def test_gpt2_factorises_its_conv1d_layers_and_reports_them_once_collapsed():
    model = tiny_gpt2()
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    tokens = torch.randint(0, 30, (2, 8))
    model.eval()
    with torch.no_grad():
        before = model(tokens).logits
    with pytest.warns(UserWarning, match=r"factorize leaves out \['lm_head'\]"):
        factorize(model, depth=2, init="keep")
    assert sorted({n.split(".parametrizations")[0] for n, _ in factor_parameters(model)}) == sorted(conv1d)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before, rtol=1e-5, atol=1e-5)  # "keep" keeps the function
        layer = model.get_submodule(conv1d[0])
        layer.parametrizations.weight.original0[:, :8] = 0.0  # half of one layer's entries collapse to zero
    report = sparsity_report(model)
    plain = sparsity_report(collapse(model))
    # the lm_head tied to the embedding, which factorize left out, is left out of the count as
    # tk.prune leaves it out (counted, it held the compression down whatever the factors did)
    assert [row[0] for row in plain.rows] == [f"{n}.weight" for n in conv1d]
    assert plain.rows == report.rows  # the same zeros
    assert plain.nonzero < plain.total


@pytest.mark.parametrize("sigma_w", [float("inf"), float("nan"), "x", lambda module: float("inf")])
def test_an_init_scale_that_is_not_a_finite_number_is_named(sigma_w):
    # an infinite scale drew every factor as NaN
    model = nn.Linear(4, 8)
    with pytest.raises(tk.errors.TWAKernelsError, match="sigma_w"):
        tk.factorize(model, sigma_w=sigma_w, seed=0)


@pytest.mark.parametrize("weight_decay", [None, "x", -1.0, float("nan")])
def test_factor_param_groups_names_a_weight_decay_that_is_not_a_non_negative_number(weight_decay):
    model = nn.Linear(4, 8)
    tk.factorize(model, seed=0)
    with pytest.raises(tk.errors.TWAKernelsError, match="weight_decay"):
        tk.factor_param_groups(model, weight_decay)


@pytest.mark.parametrize("threshold", [float("nan"), None, "x", -1.0, float("inf")])
def test_sparsity_report_names_a_threshold_that_is_not_a_finite_non_negative_number(threshold):
    # a NaN threshold counted every weight of a dense layer as zero
    with pytest.raises(tk.errors.TWAKernelsError, match="threshold"):
        sparsity_report(nn.Linear(10, 10), threshold=threshold)


def test_sparsity_report_refuses_a_model_with_no_weights():
    # no weights read as sparsity 1.0, the same as a fully pruned model
    with pytest.raises(tk.errors.TWAKernelsError, match="no factorised layer"):
        sparsity_report(nn.Sequential(nn.ReLU()))


def test_a_report_that_counts_no_weights_has_no_sparsity_or_compression():
    with pytest.raises(FactorizationError, match="counts no weights"):
        SparsityReport().sparsity
    with pytest.raises(FactorizationError, match="counts no weights"):
        SparsityReport().compression
    assert str(SparsityReport()).endswith("no weights counted")  # printing it does not raise
    zeros = SparsityReport([("fc.weight", 12, 0)])
    assert zeros.sparsity == 1.0 and zeros.compression == 12  # all zero: counted as one nonzero, finite


@pytest.mark.parametrize("sigma_w", [None, 0.1])
def test_a_model_on_the_meta_device_is_factorised_with_a_warning_that_its_factors_are_not_drawn(sigma_w):
    # sigma_w= was asked for and then drew nothing: to_empty() left the factors uninitialised
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"\['0', '2'\] are on the meta device.*not drawn.*dwf_init_"):
        factorize(model, sigma_w=sigma_w, seed=0)
    assert model[0].parametrizations.weight.original0.is_meta
    with torch.device("meta"):
        other = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(FactorizationError, match=r"layer '0'.weight: .*sigma_w"):  # a number given is checked
        factorize(other, sigma_w=-1.0)
    model.to_empty(device="cpu")
    for _, factor in factor_parameters(model):
        dwf_init_(factor, 0.1, 3, seed=0)
    assert torch.isfinite(model[0].weight).all() and model[0].weight.abs().max() > 0


@pytest.mark.parametrize("init", ["dwf", "dwf_matched"])
def test_an_embeddings_padding_row_stays_zero_through_random_factors_training_and_collapse(init):
    # the padding row gets no gradient, so random factors there stayed random for good
    embedding = nn.Embedding(10, 4, padding_idx=3)
    factorize(embedding, 3, layers=[nn.Embedding], init=init, seed=0)
    assert torch.equal(embedding.weight[3], torch.zeros(4)) and embedding.weight[4].abs().sum() > 0
    optimizer = torch.optim.SGD([p for _, p in factor_parameters(embedding)], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        embedding(torch.tensor([[3, 1, 3, 2]])).pow(2).sum().backward()
        optimizer.step()
    collapse(embedding)
    assert torch.equal(embedding.weight[3], torch.zeros(4))


def test_a_complex_layer_is_refused_by_name_and_the_model_left_as_it_was():
    # torch.sign has no complex factor: one `original` was registered, and the undo then failed
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note that complex modules are new
        model[1].to(torch.complex64)
    with pytest.raises(FactorizationError, match=r"layer '1'.weight is torch.complex64; DWF factorises real"):
        factorize(model, layers=[nn.Linear])
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize("layers, match", [(5, "layers must be None, module names and/or nn.Module types, got int"),
                                           ([], r"layers=\[\] names no layer"),
                                           ({"0": nn.Linear}, "got dict")])
def test_a_layers_argument_that_names_no_layer_is_refused_by_what_it_is(layers, match):
    with pytest.raises(FactorizationError, match=match):
        factorize(nn.Sequential(nn.Linear(3, 3)), layers=layers)


def test_numpy_numbers_are_taken_for_depth_and_eps():
    model = nn.Sequential(nn.Linear(8, 8))
    factorize(model, np.int64(4), eps=np.float32(1e-7), seed=0)
    assert model[0].parametrizations.weight[0].depth == 4 and len(factor_parameters(model)) == 4


def test_a_layer_whose_sigma_w_is_refused_leaves_every_layer_as_it_was():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FactorizationError, match="'2'.weight"):
        factorize(model, sigma_w=lambda m: 0.1 if m.out_features == 8 else float("nan"))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("init", ["dwf", "dwf_matched"])
def test_a_layer_whose_truncation_band_is_empty_is_named_before_any_layer_changes(init):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight.mul_(1e-9)  # its measured sigma_w lies below eps/2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FactorizationError, match=r"layer '1'\.weight: .*truncation band of depth 3 is empty"):
        tk.factorize(model, depth=3, init=init)
    assert not parametrize.is_parametrized(model[0]) and model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("threshold, error", [(float("nan"), "finite"), (-1.0, ">= 0"), (float("inf"), "finite"),
                                              ("x", "a number")])
def test_collapse_checks_its_threshold_as_sparsity_report_does(threshold, error):
    # NaN or -1 zeroed nothing and inf zeroed every weight, without a word
    model = tk.factorize(nn.Sequential(nn.Linear(4, 4)), depth=2, seed=0)
    with pytest.raises(tk.errors.TWAKernelsError, match=error):
        collapse(model, threshold)


@pytest.mark.parametrize("helper", ["truncated_std", "matched_sigma", "truncation_bounds"])
def test_the_init_helpers_refuse_an_empty_truncation_band(helper):
    # the band eps^(1/D) < |omega| < (2 sigma_w)^(1/D) is empty: truncated_std read 5.7e-9 > sigma_w
    from twa_kernels import factorization

    with pytest.raises(FactorizationError, match="truncation band of depth 3 is empty"):
        getattr(factorization, helper)(1e-9, 3)


def test_factor_param_groups_names_options_it_sets_itself():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    tk.factorize(model, depth=2, seed=0)
    with pytest.raises(FactorizationError, match="leave params= out"):
        tk.factor_param_groups(model, 1e-4, params=list(model.parameters()))


def test_the_hessian_tools_run_through_a_factorised_model_as_through_plain_products():
    import functools

    from twa_kernels import connectivity
    from twa_kernels.factorization import DeepFactorization

    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    tk.factorize(model, depth=3, seed=0)
    data = [(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))]
    loss = torch.nn.functional.cross_entropy
    fused_diag = connectivity.hessian_diagonal(model, loss, data, samples=8, seed=2)
    fused_top = connectivity.top_eigenvalue(model, loss, data, iters=30, seed=2)
    plain = lambda self, *factors: functools.reduce(torch.mul, factors)  # noqa: E731
    original = DeepFactorization.forward
    DeepFactorization.forward = plain
    try:
        plain_diag = connectivity.hessian_diagonal(model, loss, data, samples=8, seed=2)
        plain_top = connectivity.top_eigenvalue(model, loss, data, iters=30, seed=2)
    finally:
        DeepFactorization.forward = original
    for name, value in plain_diag.items():
        torch.testing.assert_close(fused_diag[name], value, rtol=1e-5, atol=1e-7, msg=name)
    assert fused_top.trace == pytest.approx(plain_top.trace, rel=1e-5)


def test_the_product_passes_gradcheck_in_both_modes():
    from twa_kernels.factorization import _Product

    for depth in (2, 3, 4):
        factors = tuple(torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(depth))
        assert torch.autograd.gradcheck(_Product.apply, factors, check_forward_ad=True)
        assert torch.autograd.gradgradcheck(_Product.apply, factors)


@pytest.mark.parametrize("biases", [False, True])
def test_sparsity_of_a_factorised_model_and_of_its_collapse_agree(biases):
    # counted factorised tensors on one side and Linear/Conv weights on the other: a partly
    # factorised model read 1.0 factorised and 0.571 collapsed
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    tk.factorize(model, depth=2, layers=["0"], init="keep", biases=biases)
    with torch.no_grad():
        model[0].parametrizations.weight.original0.zero_()
        if biases:
            model[0].parametrizations.bias.original0.zero_()
    factorised, collapsed = tk.sparsity_report(model), tk.sparsity_report(tk.collapse(model))
    assert factorised.rows == collapsed.rows
    assert [name for name, _, _ in factorised.rows] == ["0.weight", *(["0.bias"] if biases else []), "2.weight"]
    assert factorised.nonzero == 24 and factorised.total == 32 + 8 * biases + 24


def test_sparsity_of_a_factorised_norm_and_embedding_agrees_with_their_collapse():
    # leaving out weights an embedding holds (a tied head) left out a collapsed Embedding's
    # and LayerNorm's own weights as well, so the two reports parted
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    tk.factorize(model, depth=2, layers=["0", "1", "2"], init="keep")
    factorised, collapsed = tk.sparsity_report(model), tk.sparsity_report(tk.collapse(model))
    assert [name for name, _, _ in factorised.rows] == ["0.weight", "1.weight", "2.weight"]
    assert factorised.rows == collapsed.rows


def test_collapse_keeps_a_frozen_layer_frozen():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    tk.factorize(model, depth=2, seed=0)
    for p in model[0].parameters():
        p.requires_grad_(False)
    plain = tk.collapse(model)
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == {
        "0.bias": False, "0.weight": False, "2.bias": True, "2.weight": True}


def test_a_module_used_under_two_names_is_found_by_either_and_factorised_once():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a  # the same module under a second name

        def forward(self, x):
            return self.b(self.a(x))

    for layers in (["b"], ["a", "b"], [nn.Linear]):
        model = Shared()
        tk.factorize(model, depth=2, layers=layers, seed=0)
        assert parametrize.is_parametrized(model.a) and len(tk.factorization.factor_parameters(model)) == 2


def test_frozen_parametrized_and_lazy_layers_are_left_out_or_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)  # pretrained and frozen: random factors would never train
    torch.nn.utils.parametrizations.weight_norm(model[2])
    frozen = model[0].weight.clone()
    with pytest.warns(UserWarning) as seen:
        tk.factorize(model, depth=2, seed=0)
    messages = " ".join(str(w.message) for w in seen)
    assert "leaves out the frozen layers ['0']" in messages and "leaves out ['2']: each weight is computed" in messages
    assert torch.equal(model[0].weight, frozen) and not parametrize.is_parametrized(model[0], "weight")
    assert parametrize.is_parametrized(model[4], "weight")
    again = nn.Sequential(nn.Linear(6, 8))
    again[0].weight.requires_grad_(False)
    with pytest.raises(FactorizationError, match="layer '0' is frozen.*init='keep'"):
        tk.factorize(again, depth=2, layers=["0"], seed=0)
    kept = again[0].weight.clone()
    tk.factorize(again, depth=2, layers=["0"], init="keep")  # exact, and its factors stay frozen
    torch.testing.assert_close(again[0].weight, kept)
    lazy = nn.Sequential(nn.Linear(6, 8), nn.LazyLinear(3))
    with pytest.raises(FactorizationError, match="layer '1' is lazy"):
        tk.factorize(lazy, depth=2, init="keep")
    assert not parametrize.is_parametrized(lazy[0], "weight")  # refused before the first layer changed


@pytest.mark.parametrize("depth", [2, 3])
def test_keep_factorises_zero_entries_exactly_into_factors_that_train(depth):
    # the balanced factors of 0 were all 0, whose gradients are all 0: a zero-initialised bias
    # (transformers', a norm layer's) or a zero weight entry never moved again
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    with torch.no_grad():
        model[0].bias.zero_()
        model[0].weight[1].zero_()
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    factorize(model, depth=depth, layers=[nn.Linear, nn.LayerNorm], init="keep", biases=True)
    for name, value in dense.items():  # a zero exactly (0 times the other factors), the rest to rounding
        layer, attr = name.split(".")
        got = getattr(model[int(layer)], attr)
        assert torch.equal(got[value == 0], value[value == 0]), name
        torch.testing.assert_close(got, value, rtol=1e-6, atol=0.0, msg=name)
    plist = model[0].parametrizations.weight
    assert torch.equal(plist.original0[1], torch.zeros(4))
    nonzero = dense["0.weight"][[0, 2]].abs().pow(1 / depth)
    for i in range(1, depth):  # the others get the magnitude the layer's nonzero entries' factors have
        torch.testing.assert_close(getattr(plist, f"original{i}")[1], nonzero.mean().expand(4))
        assert torch.equal(getattr(model[0].parametrizations.bias, f"original{i}"), torch.ones(3))  # none nonzero
    opt = torch.optim.SGD(factor_param_groups(model, 0.0), lr=0.1)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        (model(x) - 1).pow(2).mean().backward()
        opt.step()
    assert (model[0].bias != 0).all() and (model[1].bias != 0).all() and (model[0].weight[1] != 0).all()


def test_keep_fills_zero_entries_without_overflow_in_half_precision():
    # the nonzero factors' mean was summed in float16: past 65504 it was inf, and 0 * inf NaN
    torch.manual_seed(0)
    layer = nn.Linear(2048, 2048).half()  # 4M factors of about 0.1: their float16 sum overflows
    with torch.no_grad():
        layer.weight[0, :4] = 0
    dense = layer.weight.detach().clone()
    factorize(nn.Sequential(layer), depth=2, init="keep")
    weight = layer.weight.detach()
    assert not weight.isnan().any()
    assert torch.equal(weight[0, :4], dense[0, :4])
    assert layer.parametrizations.weight.original1[0, :4].isfinite().all()


@pytest.mark.parametrize("hook, source, fix", [
    (torch.nn.utils.spectral_norm, "spectral_norm's hook from weight_orig", "remove_spectral_norm"),
    (torch.nn.utils.weight_norm, "weight_norm's hook from weight_g and weight_v", "remove_weight_norm"),
])
@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_weights_torchs_older_norm_hooks_compute_are_left_out_and_named_like_parametrized_ones(hook, source, fix):
    # the default choice refused them, telling the user to edit a layers= they never passed
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    hook(model[0])
    with pytest.warns(UserWarning, match=rf"factorize leaves out \['0'\]: each weight is computed by "
                                         rf"torch.nn.utils.{source}.*{fix}"):
        factorize(model, depth=2, seed=0)
    assert [n for n, _ in factor_parameters(model)] == ["2.parametrizations.weight.original0",
                                                        "2.parametrizations.weight.original1"]
    assert not parametrize.is_parametrized(model[0])
    named = nn.Sequential(nn.Linear(6, 8))
    hook(named[0])
    with pytest.raises(FactorizationError, match=rf"layer '0' \(Linear\): its weight is computed by torch.nn.utils."
                                                 rf"{source}.*leave it out of layers=, or remove the hook.*{fix}"):
        factorize(named, depth=2, layers=["0"], seed=0)


def test_a_frozen_bias_is_kept_as_it_is_unless_init_keeps_it():
    # only the weight's flag was read: a frozen bias became random factors that never train
    model = nn.Linear(3, 3)
    model.bias.requires_grad_(False)
    bias = model.bias.detach().clone()
    with pytest.warns(UserWarning, match=r"frozen biases of \['\(the model itself\)'\]"):
        tk.factorize(model, biases=True, seed=0)
    assert parametrize.is_parametrized(model, "weight") and not parametrize.is_parametrized(model, "bias")
    assert torch.equal(model.bias, bias)
    named = nn.Sequential(nn.Linear(3, 3))
    named[0].bias.requires_grad_(False)
    with pytest.raises(FactorizationError, match="bias of layer '0' is frozen"):
        tk.factorize(named, layers=["0"], biases=True, seed=0)
    kept = nn.Linear(3, 3)
    kept.bias.requires_grad_(False)
    tk.factorize(kept, biases=True, init="keep")
    assert parametrize.is_parametrized(kept, "bias")


def test_a_factorize_that_fails_part_way_leaves_every_layer_as_it_was(monkeypatch):
    # a Ctrl-C while the second layer's factors were drawn left the first factorised: a retry
    # was refused ("already factorised") and the state_dict had other keys
    from twa_kernels import factorization

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    params = [(name, p) for name, p in model.named_parameters()]
    x = torch.randn(4, 8)
    out = model(x)
    draw, calls = factorization._dwf_init, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second layer's weight (its first factor of 2)
            raise KeyboardInterrupt
        return draw(*args, **kwargs)

    monkeypatch.setattr(factorization, "_dwf_init", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tk.factorize(model, depth=2, seed=0)
    monkeypatch.undo()
    assert [(name, p) for name, p in model.named_parameters()] == params  # the same objects, in order
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    tk.factorize(model, depth=2, seed=0)  # a retry factorises every layer
    assert all(parametrize.is_parametrized(m) for m in (model[0], model[2]))


def test_a_one_element_bias_without_sigma_w_is_named_with_the_fix():
    # std() of one value has no spread: the error named sigma_w=0.0, which no one passed
    for model, name in ((nn.Linear(3, 1), "(the model itself)"), (nn.Sequential(nn.Linear(3, 1)), "0")):
        with pytest.raises(FactorizationError, match=rf"layer '{re.escape(name)}'.bias has 1 element\(s\), so "
                                                     r"sigma_w cannot be measured .*init='keep'"):
            tk.factorize(model, 3, biases=True)
        assert type(model.bias if isinstance(model, nn.Linear) else model[0].bias) is nn.Parameter  # left as it was
    assert tk.factorize(nn.Linear(3, 1), 3, biases=True, sigma_w=0.1) is not None


@pytest.mark.parametrize("depth", [2, 3])
def test_a_compiled_factorized_model_runs_under_no_grad_and_trains_as_eager(depth):
    # torch.compile failed on the product's Function in any no_grad forward (an evaluation)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    tk.factorize(model, depth, seed=0)
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # traced whole: the Function (it has a jvp, which Dynamo cannot trace) broke the graph at every layer
    assert torch._dynamo.explain(lambda x: model(x).square().sum())(x).graph_break_count == 0
