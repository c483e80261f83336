"""Decorrelated backpropagation (tk.decor): the folded forward and its gradient, the R update
against an independent statement, decorrelation of correlated inputs, fold(), the MLP path,
resume, errors, and which form of the variance term descends the stated loss."""

import copy
import io
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

import twa_kernels as tk
from twa_kernels._passes import statistics_pass
from twa_kernels.decor import DecorrelationDivergedError
from twa_kernels.errors import InvalidArgumentError

from tests.digits import digits_splits
from tests.helpers import spawn, tiny_gpt2


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run thousands of tiny ops: one thread avoids the spin-wait of two
    threads on a shared 2-core runner (25x slower here), and changes no result."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_r(d, scale=0.1, dtype=torch.float64):
    return torch.eye(d, dtype=dtype) + scale * torch.randn(d, d, dtype=dtype)


# ---- the folded forward and the gradient ------------------------------------------------

def test_linear_forward_and_weight_gradient_float64():
    layer = nn.Linear(12, 7).double()
    tk.decor.decorrelate(layer)
    R = _random_r(12)
    layer.decor_R.copy_(R)
    x = torch.randn(5, 3, 12, dtype=torch.float64)  # any leading shape
    y = layer(x)
    z = x @ R.T
    assert _rel(y, z @ layer.weight.T + layer.bias) < 1e-10
    delta = torch.randn_like(y)
    y.backward(delta)
    assert _rel(layer.weight.grad, delta.reshape(-1, 7).T @ z.reshape(-1, 12)) < 1e-10
    assert _rel(layer.bias.grad, delta.reshape(-1, 7).sum(0)) < 1e-10


CONVS = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 3)),
    dict(kernel_size=1, stride=2),
]


@pytest.mark.parametrize("kw", CONVS)
def test_conv2d_forward_and_weight_gradient_float64(kw):
    conv = nn.Conv2d(3, 5, **kw).double()
    tk.decor.decorrelate(conv)
    d = conv.weight[0].numel()
    R = _random_r(d)
    conv.decor_R.copy_(R)
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64)
    y = conv(x)
    # the reference: every patch, z = R patch, then W z (+ b)
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    z = R @ patches  # [B, d, L]
    want = conv.weight.reshape(5, -1) @ z
    if conv.bias is not None:
        want = want + conv.bias[:, None]
    assert _rel(y.reshape(2, 5, -1), want) < 1e-10
    delta = torch.randn_like(y)
    y.backward(delta)
    grad = torch.einsum("bol,bdl->od", delta.reshape(2, 5, -1), z)
    assert _rel(conv.weight.grad.reshape(5, -1), grad) < 1e-10


def test_conv1d_forward_float64():
    conv = nn.Conv1d(4, 6, 5, stride=2, padding=2, dilation=1).double()
    tk.decor.decorrelate(conv)
    R = _random_r(20)
    conv.decor_R.copy_(R)
    x = torch.randn(3, 4, 17, dtype=torch.float64)
    folded = (conv.weight.reshape(6, -1) @ R).view(6, 4, 5)
    assert _rel(conv(x), F.conv1d(x, folded, conv.bias, stride=2, padding=2)) < 1e-10


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
def test_sampled_patches_are_the_real_patches(mode):
    """At sample_fraction=1 the accumulated S is exactly sum z z^T over every patch; at 0.25
    it has a quarter of them, each a real patch (S is a sum of their outer products)."""
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2, padding_mode=mode).double()
    tk.decor.decorrelate(conv, sample_fraction=1.0)
    R = _random_r(18)
    conv.decor_R.copy_(R)
    x = torch.randn(3, 2, 9, 8, dtype=torch.float64)
    conv(x)
    pad = conv._reversed_padding_repeated_twice
    xp = F.pad(x, pad, mode="constant" if mode == "zeros" else mode)
    z = R @ F.unfold(xp, 3, dilation=2, stride=2)
    z = z.transpose(1, 2).reshape(-1, 18)
    assert conv._decor_count == z.shape[0]
    assert _rel(conv.decor_dense_sum(), z.T @ z) < 1e-12
    conv.decor_reset()
    conv.decor_sample_fraction = 0.25
    conv(x)
    assert conv._decor_count == round(0.25 * z.shape[0])
    # every sampled z is one of the patches: S lies in the cone of their outer products,
    # checked as: S = sum over a subset, so S's trace equals the sum of that subset's norms
    # and S - z_i z_i^T stays PSD for a picked i. Simpler and exact: recompute with the picks.
    torch.manual_seed(3)
    conv.decor_reset()
    conv(x)
    torch.manual_seed(3)
    picks = torch.randperm(z.shape[0])[: conv._decor_count]
    assert _rel(conv.decor_dense_sum(), z[picks].T @ z[picks]) < 1e-12


def test_conv1d_sampled_patches_and_accumulation_over_forwards():
    """Conv1d patches at sample_fraction=1 are the unfolded ones; two forwards before one
    update (gradient accumulation) give the update of one forward on both halves."""
    conv = tk.decor.decorrelate(nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2).double(), sample_fraction=1.0)
    R = _random_r(9)
    conv.decor_R.copy_(R)
    x = torch.randn(4, 3, 12, dtype=torch.float64)
    conv(x)
    z = R @ F.unfold(F.pad(x, (1, 1))[:, :, None], (1, 3), dilation=(1, 2), stride=(1, 2))
    z = z.transpose(1, 2).reshape(-1, 9)
    assert _rel(conv.decor_dense_sum(), z.T @ z) < 1e-12
    conv.decor_reset()
    twin = tk.decor.decorrelate(nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2).double(), sample_fraction=1.0)
    twin.decor_R.copy_(R)
    for m in (conv, twin):
        m.decor_lr, m.decor_kappa = 0.05, 0.3
    conv(x[:2])
    conv(x[2:])
    twin(x)
    loss_a, loss_b = tk.decor.update(conv, check=False), tk.decor.update(twin)
    assert _rel(conv.decor_R, twin.decor_R) < 1e-12 and abs(float(loss_a - loss_b)) < 1e-12


def test_parameters_keep_names_and_objects():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    before = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tk.decor.decorrelate(model)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(before[k] is after[k] for k in before)  # an optimizer made before still fits
    assert {"0.decor_R", "3.decor_R"} <= set(model.state_dict())
    F.cross_entropy(model(torch.randn(2, 1, 8, 8)), torch.tensor([0, 1])).backward()
    opt.step()
    tk.decor.update(model)


# ---- the update --------------------------------------------------------------------------

def _independent_update(R, Z, lr, kappa):
    """The rule in numpy float64, written out with explicit diagonal matrices."""
    R, Z = R.numpy(), Z.numpy()
    X = Z.T @ Z / Z.shape[0]
    C = X - np.diag(np.diag(X))
    v = np.diag(X) - 1.0
    new = R - lr * ((1 - kappa) * C @ R + kappa * np.diag(v) @ R)
    d = R.shape[0]
    loss = ((1 - kappa) * (C ** 2).sum() + kappa * (v ** 2).sum()) / d ** 2
    return torch.from_numpy(new), loss


@pytest.mark.parametrize("batch", [40, 3])
def test_one_update_matches_an_independent_statement(batch):
    """batch 40: X from S = Z^T Z; batch 3 (fewer rows than d): X R from the rows, Z^T (Z R)."""
    # two layers of d=10 (one bmm group) and one of d=6, each its own lr and kappa
    model = nn.Sequential(nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    tk.decor.decorrelate(model, sample_fraction=1.0)
    layers = [m for _, m in tk.decor.decorrelated_layers(model)]
    for i, m in enumerate(layers):
        m.decor_R.copy_(_random_r(m.decor_R.shape[0]))
        m.decor_lr, m.decor_kappa = 1e-2 * (i + 1), [0.0, 0.3, 1e-3][i]
    x = torch.randn(batch, 10, dtype=torch.float64)
    # the inputs each layer sees, hence its Z = x R^T, recorded with hooks
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, m in enumerate(layers)]
    model(x)
    for h in hooks:
        h.remove()
    want = [_independent_update(m.decor_R.clone(), inputs[i] @ m.decor_R.T, m.decor_lr, m.decor_kappa)
            for i, m in enumerate(layers)]
    loss = tk.decor.update(model)
    for m, (r, _) in zip(layers, want):
        assert _rel(m.decor_R, r) < 1e-6
    assert abs(float(loss) - np.mean([w[1] for w in want])) < 1e-6 * abs(float(loss))
    assert loss.dim() == 0


def _correlated(d, rho, n, gen=None):
    cov = (1 - rho) * torch.eye(d) + rho * torch.ones(d, d)
    return torch.randn(n, d, generator=gen) @ torch.linalg.cholesky(cov).T


def test_loss_falls_monotonically_at_small_lr():
    """Full batch of a fixed sample: the loss falls at every step; with a 10% subsample of a
    fresh batch each step it falls on average."""
    torch.manual_seed(0)
    x = _correlated(16, 0.5, 512)
    layer = tk.decor.decorrelate(nn.Linear(16, 2), lr=5e-3, kappa=0.2, sample_fraction=1.0)
    losses = []
    for _ in range(60):
        layer(x)
        losses.append(float(tk.decor.update(layer)))
    assert all(b < a for a, b in zip(losses, losses[1:]))
    layer = tk.decor.decorrelate(nn.Linear(16, 2), lr=5e-3, kappa=0.2, sample_fraction=0.1)
    losses = []
    for _ in range(200):
        layer(_correlated(16, 0.5, 512))
        losses.append(float(tk.decor.update(layer)))
    windows = np.array(losses).reshape(10, 20).mean(1)
    assert all(b < a for a, b in zip(windows, windows[1:]))



def _decor_run(seed, x):
    torch.manual_seed(2)  # the same initial weights for every run
    model = tk.decor.decorrelate(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 2)), lr=5e-3, sample_fraction=0.1,
                                 seed=seed)
    for _ in range(3):
        model(x)
        tk.decor.update(model)
    return [m.decor_R.clone() for _, m in tk.decor.decorrelated_layers(model)]


def test_a_seed_reproduces_the_subsamples_and_leaves_the_global_rng_alone():
    x = _correlated(16, 0.5, 256, torch.Generator().manual_seed(0))
    first = _decor_run(5, x)
    model = tk.decor.decorrelate(nn.Linear(16, 2), sample_fraction=0.1, seed=5)
    state = torch.get_rng_state()
    model(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, _decor_run(5, x)))
    assert not all(torch.equal(a, b) for a, b in zip(first, _decor_run(6, x)))


def test_no_seed_draws_the_subsamples_from_the_global_rng():
    x = _correlated(16, 0.5, 256, torch.Generator().manual_seed(0))
    model = tk.decor.decorrelate(nn.Linear(16, 2), sample_fraction=0.1)
    state = torch.get_rng_state()
    model(x)
    assert not torch.equal(torch.get_rng_state(), state)
    with pytest.raises(tk.errors.InvalidTypeError, match="seed"):
        tk.decor.decorrelate(nn.Linear(4, 2), seed=1.5)


def _offdiag_and_var(layer, d, gen):
    z = _correlated(d, 0.6, 20000, gen) @ layer.decor_R.T
    corr = torch.corrcoef(z.T)
    return float(corr[~torch.eye(d, dtype=torch.bool)].abs().mean()), z.var(0)


@pytest.mark.parametrize("kappa", [1e-3, 0.5])
def test_decorrelates_inputs_with_correlation_0_6(kappa):
    d, gen = 32, torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    layer = tk.decor.decorrelate(nn.Linear(d, 4), lr=0.02, kappa=kappa, sample_fraction=0.5)
    start, _ = _offdiag_and_var(layer, d, gen)
    assert start > 0.55
    for _ in range(1000):
        layer(_correlated(d, 0.6, 256))
        tk.decor.update(layer)
    off, var = _offdiag_and_var(layer, d, gen)
    assert off < 0.02, off
    if kappa == 0.5:  # the whitening term pulls every variance to 1
        assert float((var - 1).abs().max()) < 0.1, var
    else:  # decorrelation alone leaves the variances where the input put them (0.4 per direction)
        assert float(var.mean()) < 0.6


# ---- the variance term: diag(v) R (rows) vs the reference code's v * R (columns) -----------

def _loss_and_grad(R, cov, kappa):
    R = R.clone().requires_grad_(True)
    X = R @ cov @ R.T
    C = X - torch.diag(torch.diag(X))
    v = torch.diag(X) - 1
    d = R.shape[0]
    loss = ((1 - kappa) * C.square().sum() + kappa * v.square().sum()) / d ** 2
    (g,) = torch.autograd.grad(loss, R)
    return loss.detach(), g, C.detach(), v.detach()


def _directions(R, C, v, kappa):
    rows = (1 - kappa) * C @ R + kappa * torch.diag(v) @ R
    cols = (1 - kappa) * C @ R + kappa * R * v  # the reference code's v * R: R diag(v)
    return rows, cols


def _permuting_r(d):
    """An R that sends each input coordinate to another output: the columns form then
    rescales the wrong coordinates (near the identity rows and columns nearly coincide)."""
    return torch.eye(d, dtype=torch.float64)[torch.randperm(d)] + 0.05 * torch.randn(d, d, dtype=torch.float64)


@pytest.mark.parametrize("kappa", [0.5, 1.0])
def test_rows_form_is_the_preconditioned_gradient_and_columns_form_is_not(kappa):
    """With Sigma = E[x x^T], dL/dR = (4/d^2) [(1-kappa) C R + kappa diag(v) R] Sigma: the
    rows form equals the autograd gradient times Sigma^{-1} d^2/4, so it always descends; the
    columns form differs and, for an R that permutes coordinates, often points uphill."""
    torch.manual_seed(0)
    d, uphill = 8, 0
    for trial in range(50):
        cov = torch.diag(torch.logspace(-1, 1, d, dtype=torch.float64)[torch.randperm(d)])
        a = torch.randn(d, d, dtype=torch.float64)
        cov = cov + 0.1 * a @ a.T / d
        R = _random_r(d, scale=0.5) if trial % 2 else _permuting_r(d)
        loss, g, C, v = _loss_and_grad(R, cov, kappa)
        rows, cols = _directions(R, C, v, kappa)
        assert _rel(rows, g @ torch.linalg.inv(cov) * d ** 2 / 4) < 1e-10
        assert float((g * rows).sum()) > 0
        uphill += float((g * cols).sum()) < 0
    assert uphill > 0, uphill  # v * R is not a descent direction in general (kappa=1: 6/50, kappa=0.5: 3/50)


def test_rows_form_decreases_the_loss_where_columns_form_increases_it():
    """Whitening alone (kappa=1) from an R that swaps two coordinates of unequal variance:
    following diag(v) R lowers the loss at every step; v * R raises it."""
    cov = torch.diag(torch.tensor([4.0, 0.25], dtype=torch.float64))
    R0 = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    traces = {}
    for form in ("rows", "cols"):
        R, trace = R0.clone(), []
        for _ in range(20):
            loss, g, C, v = _loss_and_grad(R, cov, 1.0)
            trace.append(float(loss))
            R = R - 0.01 * _directions(R, C, v, 1.0)[form == "cols"]
        traces[form] = trace
    assert all(b < a for a, b in zip(traces["rows"], traces["rows"][1:]))
    assert all(b > a for a, b in zip(traces["cols"], traces["cols"][1:])), traces["cols"]


# ---- fold, the MLP path, resume ----------------------------------------------------------

def _cnn():
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, stride=2, dilation=2, padding=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def _train(model, data, steps, seed=0, opt=None):
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    opt = opt or torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses, it = [], iter(loader)
    for _ in range(steps):
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        losses.append(tk.decor.update(model))
    return opt, torch.stack(losses)


@pytest.fixture(scope="module")
def digits_images():
    train, _, test = digits_splits()
    reshape = lambda ds: torch.utils.data.TensorDataset(ds.tensors[0].view(-1, 1, 8, 8), ds.tensors[1])
    return reshape(train), reshape(test)


def test_fold_equals_the_decorrelated_model_and_loads_into_the_original(digits_images):
    train, test = digits_images
    torch.manual_seed(0)
    model = tk.decor.decorrelate(_cnn(), lr=1e-2, kappa=0.1, sample_fraction=0.2)
    _train(model, train, 40)
    assert any(not torch.allclose(m.decor_R, torch.eye(m.decor_R.shape[0])) for _, m in
               tk.decor.decorrelated_layers(model))
    folded = tk.decor.fold(model)
    model.eval()
    folded.eval()
    x = test.tensors[0]
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-5)
        assert not tk.decor.decorrelated_layers(folded)
        plain = _cnn()
        plain.load_state_dict(folded.state_dict())  # strict: the original architecture
        plain.eval()
        torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)
    assert tk.decor.decorrelated_layers(model)  # the original is untouched


def test_mlp_path_trains_and_handles_any_leading_shape(digits_images):
    """The reference code's MLP path breaks on shapes; here a Linear sees [B, 64] after a
    Flatten and [B, T, 16] inside a token MLP, and the decorrelated MLP learns digits."""
    train, test = digits_images
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    tk.decor.decorrelate(mlp, lr=1e-3, kappa=1e-3, sample_fraction=0.1)
    _, losses = _train(mlp, train, 120)
    mlp.eval()
    with torch.no_grad():
        acc = float((mlp(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean())
    assert acc > 0.85
    assert bool(torch.isfinite(losses).all())
    tokens = tk.decor.decorrelate(nn.Linear(16, 8), sample_fraction=0.5)
    y = tokens(torch.randn(4, 7, 16))
    assert y.shape == (4, 7, 8) and tokens._decor_count == 14
    tk.decor.update(tokens)


def test_resume_is_bit_exact(digits_images):
    train, _ = digits_images
    torch.manual_seed(0)
    a = tk.decor.decorrelate(_cnn(), lr=1e-2, kappa=0.1, sample_fraction=0.2)
    opt_a, _ = _train(a, train, 10)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    torch.manual_seed(5)
    _train(a, train, 10, seed=1, opt=opt_a)

    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = tk.decor.decorrelate(_cnn(), lr=1e-2, kappa=0.1, sample_fraction=0.2)
    b.load_state_dict(state["model"])
    opt_b = torch.optim.Adam(b.parameters(), lr=3e-3)
    opt_b.load_state_dict(state["opt"])
    torch.manual_seed(5)
    _train(b, train, 10, seed=1, opt=opt_b)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k


# ---- errors ------------------------------------------------------------------------------

def test_unsupported_layers_are_named():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"'0'.*groups=2.*skip=\['0'\]"):
        tk.decor.decorrelate(model)
    tk.decor.decorrelate(model, skip=["0"])
    assert [n for n, _ in tk.decor.decorrelated_layers(model)] == ["1"]
    with pytest.raises(ValueError, match=r"'up'.*ConvTranspose2d.*skip"):
        tk.decor.decorrelate(nn.ModuleDict({"up": nn.ConvTranspose2d(2, 2, 2)}))
    with pytest.raises(RuntimeError, match="no decorrelated layer sampled an input since the last update"):
        tk.decor.update(model)
    with pytest.raises(ValueError, match="every supported layer of the model is decorrelated already"):
        tk.decor.decorrelate(model, skip=["0"])  # it was told the model has no Linear layer at all
    assert [n for n, _ in tk.decor.decorrelated_layers(tk.decor.decorrelate(tk.decor.fold(model), skip=["0"]))] == ["1"]


@pytest.mark.parametrize("settings, error", [
    (dict(max_norm=float("nan")), "max_norm must be a finite number"),  # no divergence check at all
    (dict(max_norm=-1.0), "max_norm must be a finite positive number"),  # every update "diverged"
    (dict(max_norm=None), "max_norm must be a number"),
    (dict(lr="fast"), "lr must be a number"),
])
def test_settings_are_checked_before_any_layer_changes(settings, error):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(tk.errors.TWAKernelsError, match=error):
        tk.decor.decorrelate(model, **settings)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]  # nothing half-converted


def test_tied_weights_are_refused_and_a_reused_layer_is_not():
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"'0' shares its weight Parameter with \['2'\].*"
                                                             r"untie them.*skip=\['0', '2'\]"):
        tk.decor.decorrelate(tied)
    assert tk.decor.decorrelated_layers(tied) == []  # refused before any layer changed
    lm = nn.ModuleDict({"emb": nn.Embedding(5, 4), "out": nn.Linear(4, 5, bias=False)})
    lm["out"].weight = lm["emb"].weight
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"'out' shares its weight Parameter with \['emb'\]"):
        tk.decor.decorrelate(lm)
    # tied after decorrelate(): fold would write W R into the weight both read
    model = tk.decor.decorrelate(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    model[2].weight = model[0].weight
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"'0' shares its weight.*untie them"):
        tk.decor.fold(model)
    # one layer used twice is one module, not a tie: it folds to the same function
    layer = nn.Linear(4, 4)
    reused = tk.decor.decorrelate(nn.Sequential(layer, nn.ReLU(), layer), sample_fraction=1.0)
    x = torch.randn(16, 4)
    reused.train()(x)
    tk.decor.update(reused)
    reused.eval()
    torch.testing.assert_close(tk.decor.fold(reused)(x), reused(x))


def test_divergence_raises_with_the_layer_and_a_smaller_lr():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    tk.decor.decorrelate(model, lr=1e-3)
    model[2].decor_lr = 10.0
    before = [m.decor_R.clone() for _, m in tk.decor.decorrelated_layers(model)]
    model(100 * torch.randn(32, 8))
    with pytest.raises(DecorrelationDivergedError, match=r"layer '2'.*lr=10.*decor_lr = 1 .*update\(model\) again"):
        tk.decor.update(model)
    for b, (_, m) in zip(before, tk.decor.decorrelated_layers(model)):
        assert torch.equal(b, m.decor_R)  # nothing was applied
    # the samples were kept: at the lower rate the same update goes through (they were
    # dropped before the check, and the retry found nothing sampled)
    model[2].decor_lr = 1e-3
    assert torch.isfinite(tk.decor.update(model))
    assert not torch.equal(before[1], model[2].decor_R)


@pytest.mark.parametrize("sample_fraction", [1.0, 0.1])  # the sum of x x^T, and the few-rows path
def test_inputs_holding_nan_are_named_as_such_not_as_a_too_large_lr(sample_fraction):
    model = tk.decor.decorrelate(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), lr=1e-3,
                                 sample_fraction=sample_fraction)
    before = [m.decor_R.clone() for _, m in tk.decor.decorrelated_layers(model)]
    x = torch.randn(32, 8)
    x[:, 3] = float("nan")
    model(x)
    with pytest.raises(DecorrelationDivergedError, match=r"inputs layer '0' sampled .* hold NaN or Inf") as info:
        tk.decor.update(model)
    assert "lr=0.0001" not in str(info.value)
    for b, (_, m) in zip(before, tk.decor.decorrelated_layers(model)):
        assert torch.equal(b, m.decor_R)
        assert m._decor_count == 0  # samples holding NaN are dropped: kept, every later update would fail


def test_a_model_whose_supported_layers_are_all_frozen_is_named_as_frozen():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).requires_grad_(False)
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"every supported layer is frozen.*\['0', '2'\]"):
        tk.decor.decorrelate(model)


@pytest.mark.parametrize("layer, x", [(nn.Linear(4, 3), torch.randn(2, 8)), (nn.Conv2d(2, 3, 5), torch.randn(1, 2, 3, 3)),
                                      (nn.Conv1d(2, 3, 2), torch.randn(1, 4, 6))])
def test_an_input_of_the_wrong_shape_gets_the_plain_layers_error_and_is_not_sampled(layer, x):
    # a (2, 8) input was sampled as four rows of 4 before the matmul refused it
    model = tk.decor.decorrelate(nn.Sequential(layer), sample_fraction=1.0)
    with pytest.raises(RuntimeError) as info:
        model.train()(x)
    assert not isinstance(info.value, IndexError) and model[0]._decor_count == 0


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_layer_with_an_empty_weight_is_named_at_decorrelate():
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"layer '1' has a weight with no entries.*skip=\['1'\]"):
        tk.decor.decorrelate(nn.Sequential(nn.Linear(4, 4), nn.Linear(0, 3)))


# ---- DDP: 2 gloo processes ---------------------------------------------------------------

DDP_STEPS, DDP_BATCH = 20, 16


def _ddp_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(),
                          nn.Linear(8, 3)).double()
    # sample_fraction=1: every rank's subsample is its whole shard, so the global X is defined
    return tk.decor.decorrelate(model, lr=0.05, kappa=0.1, sample_fraction=1.0)


def _ddp_batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(DDP_BATCH, 2, 6, 6, generator=gen, dtype=torch.float64)
    x[:, 1] += 0.8 * x[:, 0]  # correlated channels: R has work to do
    return x, torch.randint(0, 3, (DDP_BATCH,), generator=gen)


def _train_rs(model, step_fn):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(DDP_STEPS):
        x, y = _ddp_batch(step)
        opt.zero_grad()
        step_fn(step, x, y)
        opt.step()
        tk.decor.update(model)
    return {n: m.decor_R.clone() for n, m in tk.decor.decorrelated_layers(model)}


def _ddp_rank(rank, world):
    from torch.nn.parallel import DistributedDataParallel

    model = _ddp_model()
    # broadcast_buffers=False: R must stay identical by the all-reduced update alone
    ddp = DistributedDataParallel(model, broadcast_buffers=False)

    def step_fn(step, x, y):
        F.cross_entropy(ddp(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()

    return _train_rs(model, step_fn)


def test_ddp_two_gloo_processes_keep_identical_r_equal_to_the_global_batch(tmp_path):
    ranks = spawn(_ddp_rank, 2, str(tmp_path), timeout=120)

    def whole(step, x, y):
        F.cross_entropy(model(x), y).backward()

    def half(step, x, y):
        F.cross_entropy(model(x[: DDP_BATCH // 2]), y[: DDP_BATCH // 2]).backward()

    model = _ddp_model()
    single = _train_rs(model, whole)
    model = _ddp_model()
    local = _train_rs(model, half)
    assert ranks[0].keys() == single.keys() and len(single) == 3
    for name in single:
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # bit-identical across ranks
        assert _rel(ranks[0][name], single[name]) < 1e-10, name  # = one process on the global batch
        assert _rel(local[name], single[name]) > 1e-4, name  # (without the all-reduce they would differ)


def _retry_rank(rank, world):
    torch.manual_seed(0)
    x = 3 * torch.randn(8, 4, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 2)).double()
    tk.decor.decorrelate(model, lr=1.0, kappa=0.5, sample_fraction=1.0, max_norm=1.5)
    model(x.chunk(world)[rank])
    step = tk.decor._group_step

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no memory for the step")

    tk.decor._group_step = out_of_memory  # an update stopped after the all-reduce by another error
    try:
        with pytest.raises(MemoryError):
            tk.decor.update(model)
    finally:
        tk.decor._group_step = step
    with pytest.raises(tk.decor.DecorrelationDivergedError, match="diverged"):
        tk.decor.update(model)
    model[0].decor_lr = 1e-3
    tk.decor.update(model)
    return model[0].decor_R.clone()


def test_a_retry_after_divergence_over_ranks_takes_the_global_batchs_step(tmp_path):
    # the refused update left each rank holding the sum over all ranks: the retry summed the
    # sums again, a step world_size times too large, equal on every rank and unnoticed; an
    # update stopped by another error (memory, an interrupt) after the all-reduce did the same
    ranks = spawn(_retry_rank, 2, str(tmp_path), timeout=120)
    torch.manual_seed(0)
    x = 3 * torch.randn(8, 4, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 2)).double()
    tk.decor.decorrelate(model, lr=1e-3, kappa=0.5, sample_fraction=1.0)
    model(x)
    tk.decor.update(model)
    assert torch.equal(ranks[0], ranks[1])
    assert _rel(ranks[0], model[0].decor_R) < 1e-10


def _other_layers_rank(rank, world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4))
    tk.decor.decorrelate(model, sample_fraction=1.0, skip=["0"] if rank == 1 else [])
    model(torch.randn(4, 6))
    try:
        tk.decor.update(model)
    except tk.errors.InvalidArgumentError as exc:
        return str(exc)
    return None


def _all_frozen_on_one_rank(rank, world):
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4))
    tk.decor.decorrelate(model, sample_fraction=1.0)
    if rank == 1:  # every decorrelated layer frozen here alone: it returned before the check, the other waited
        model.requires_grad_(False)
    model(torch.randn(4, 6))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tk.decor.update(model)
    except tk.errors.InvalidArgumentError as exc:
        return str(exc)
    return None


def _collectives_per_update_rank(rank, world):
    import torch.distributed as dist

    counts = {"all_gather": 0, "all_reduce": 0}
    originals = {name: getattr(dist, name) for name in counts}

    def counted(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4))
    tk.decor.decorrelate(model, sample_fraction=1.0)
    per_update = []
    for name in counts:
        setattr(dist, name, counted(name))
    try:
        for _ in range(3):
            model(torch.randn(4, 6))
            before = dict(counts)
            tk.decor.update(model, check=False)
            per_update.append({k: counts[k] - before[k] for k in counts})
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return per_update


def test_the_ranks_layers_are_compared_at_the_first_update_only(tmp_path):
    # every update paid four all-gathers for the check beside its one all-reduce
    for per_update in spawn(_collectives_per_update_rank, 2, str(tmp_path), timeout=120):
        assert per_update[0]["all_gather"] > 0 and per_update[0]["all_reduce"] == 1, per_update
        assert per_update[1:] == [{"all_gather": 0, "all_reduce": 1}] * 2, per_update


def test_ranks_with_other_decorrelated_layers_are_named_before_the_all_reduce(tmp_path):
    # rank 1 decorrelated one layer fewer: gloo aborted the process inside the all-reduce
    ranks = spawn(_other_layers_rank, 2, str(tmp_path), timeout=120)
    for rank, text in enumerate(ranks):
        assert text is not None and "decor.update: ranks [1] hold other decorrelated layers than rank 0" in text, text
    assert "(here ['0', '2'])" in ranks[0] and "(here ['2'])" in ranks[1]


def test_ranks_that_froze_other_decorrelated_layers_are_named_on_every_rank(tmp_path):
    ranks = spawn(_all_frozen_on_one_rank, 2, str(tmp_path), timeout=120)
    for text in ranks:
        assert text is not None and "ranks [1] hold other decorrelated layers than rank 0" in text, text
        assert "freeze the same layers" in text


def test_gpt2_conv1d_layers_decorrelate_and_fold_in_their_own_layout():
    model = tiny_gpt2(tie=False).double()
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    tk.decor.decorrelate(model, seed=0)
    assert [n for n, _ in tk.decor.decorrelated_layers(model)] == conv1d + ["lm_head"]
    layer = model.get_submodule(conv1d[0])  # c_attn: 16 inputs, 48 outputs, weight stored (16, 48)
    assert layer.decor_R.shape == (16, 16)
    R = _random_r(16)
    layer.decor_R.copy_(R)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    want = (x @ R.T) @ layer.weight + layer.bias  # z = R x per row, then the layer's own x W + b
    assert _rel(layer(x), want) < 1e-12
    tokens = torch.randint(0, 30, (2, 8))
    model.train()
    model(tokens, labels=tokens).loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (16, 48)
    tk.decor.update(model)
    assert not torch.equal(model.get_submodule(conv1d[1]).decor_R, torch.eye(16, dtype=torch.float64))  # R moved
    model.eval()
    folded = tk.decor.fold(model)
    assert type(folded.get_submodule(conv1d[0])).__name__ == "Conv1D"  # the plain layer again
    with torch.no_grad():
        assert _rel(folded(tokens).logits, model(tokens).logits) < 1e-10
    assert set(folded.state_dict()) == set(tiny_gpt2(tie=False).state_dict())


def test_torch_transformer_encoder_layers_apply_r_on_their_fused_inference_path_too():
    # in eval mode under no_grad, nn.TransformerEncoderLayer (and the encoder's nested-tensor
    # path) read linear1/linear2's weights themselves: without R the outputs were off by 1.4
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    tk.decor.decorrelate(model, seed=0)
    assert len(tk.decor.decorrelated_layers(model)) == 4  # linear1 and linear2 of both layers
    for _, m in tk.decor.decorrelated_layers(model):
        m.decor_R.copy_(_random_r(m.decor_R.shape[0]).float())
    model.eval()
    folded = tk.decor.fold(model)
    assert not any(m._forward_pre_hooks for m in folded.modules())  # the plain copy takes torch's fast path
    x = torch.randn(3, 5, 8)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    with torch.no_grad():
        for kwargs in ({}, {"src_key_padding_mask": padding}):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's nested tensors are a prototype
                got, want = model(x, **kwargs), folded(x, **kwargs)
            kept = ~padding if kwargs else torch.ones_like(padding)
            torch.testing.assert_close(got[kept], want[kept], rtol=1e-5, atol=1e-5)
    with torch.enable_grad():
        torch.testing.assert_close(model.layers[0](x), folded.layers[0](x), rtol=1e-5, atol=1e-5)


def test_a_decorrelated_gpt2_saved_whole_loads_in_a_new_process(tmp_path):
    # its Conv1D layers' class is made at run time; a new process must find it by name
    model = tiny_gpt2(tie=False)
    tk.decor.decorrelate(model, seed=0)
    for _, layer in tk.decor.decorrelated_layers(model):
        layer.decor_R.copy_(_random_r(layer.decor_R.shape[0]).float())
    model.eval()
    tokens = torch.randint(0, 30, (2, 8))
    with torch.no_grad():
        torch.save({"model": model, "tokens": tokens, "logits": model(tokens).logits}, tmp_path / "whole.pt")
    script = (
        "import sys, torch\n"
        "saved = torch.load(sys.argv[1], weights_only=False)\n"
        "model = saved['model']\n"
        "assert type(model.transformer.h[0].attn.c_attn).__name__ == 'DecorTransposedLinear'\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(model(saved['tokens']).logits, saved['logits'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "whole.pt")], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("first, second", [(5, 3), (3, 5), (2, 2)])
def test_forwards_of_any_size_before_one_update_add_up(first, second):
    """Rows sampled after an earlier forward's rows went into S (more than d of them) count
    too: the update equals one forward on all the rows."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(first + second, 4, generator=gen, dtype=torch.float64) * 2
    split, whole = nn.Linear(4, 2).double(), nn.Linear(4, 2).double()
    for model in (split, whole):
        tk.decor.decorrelate(model, lr=0.1, kappa=0.5, sample_fraction=1.0)
    split(x[:first])
    split(x[first:])
    whole(x)
    assert torch.allclose(tk.decor.update(split), tk.decor.update(whole), atol=1e-12)
    assert torch.allclose(split.decor_R, whole.decor_R, atol=1e-12)


def test_half_precision_layers_sum_their_inputs_in_float32():
    # 70,000 rows: a float16 count is inf and a float16 sum of squares overflows
    x = torch.full((70_000, 2), 10.0)
    x[:, 1] = -x[:, 1]
    reference, half = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    for model in (reference, half):
        tk.decor.decorrelate(model, lr=1e-3, kappa=0.5, sample_fraction=1.0)
    half.half()
    reference(x)
    half(x.half())
    expected = tk.decor.update(reference)
    with pytest.warns(UserWarning, match="R are stored in 16-bit floats"):
        loss = tk.decor.update(half)
    assert torch.isfinite(loss) and torch.allclose(loss.float(), expected, rtol=1e-3)
    assert torch.allclose(half.decor_R.float(), reference.decor_R, rtol=2e-3)


def test_a_layer_cast_between_its_forward_and_the_update_still_updates():
    model = tk.decor.decorrelate(nn.Linear(8, 2), sample_fraction=1.0)
    model(torch.randn(4, 8))
    model.double()
    tk.decor.update(model)
    assert model.decor_R.dtype == torch.float64 and not torch.equal(model.decor_R, torch.eye(8, dtype=torch.float64))


def test_skip_takes_one_name_as_a_string():
    model = nn.Sequential()
    model.fc, model.head = nn.Linear(4, 4), nn.Linear(4, 2)
    tk.decor.decorrelate(model, skip="head")
    assert [name for name, _ in tk.decor.decorrelated_layers(model)] == ["fc"]


def test_a_layer_used_twice_is_skipped_by_either_of_its_names():
    shared = nn.Linear(4, 4)
    for skip in ("1", "3", lambda name, module: name == "3"):
        model = nn.Sequential(nn.Linear(4, 4), shared, nn.ReLU(), shared)
        tk.decor.decorrelate(model, skip=skip)
        assert [name for name, _ in tk.decor.decorrelated_layers(model)] == ["0"], skip
        assert type(model[1]) is nn.Linear and model[1] is model[3]


def test_frozen_layers_are_left_alone():
    # R keeps moving while a frozen W cannot follow it: the layer's output would drift
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    model[0].requires_grad_(False)
    tk.decor.decorrelate(model)
    assert [name for name, _ in tk.decor.decorrelated_layers(model)] == ["2"]


def test_a_meta_model_and_a_non_module_are_named():
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(tk.errors.InvalidArgumentError, match="layer '0' is on the meta device"):
        tk.decor.decorrelate(meta)
    assert not tk.decor.decorrelated_layers(meta)
    for call in (tk.decor.decorrelate, tk.decor.update, tk.decor.fold):
        with pytest.raises(tk.errors.InvalidTypeError, match="'s model must be an nn.Module, got NoneType"):
            call(None)


def test_a_lazy_layer_is_named_and_a_load_forgets_inputs_sampled_under_the_old_r():
    with pytest.raises(tk.errors.InvalidArgumentError, match="layer '0' is lazy and not initialised yet"):
        tk.decor.decorrelate(nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2)))  # it was left plain
    torch.manual_seed(0)
    model = tk.decor.decorrelate(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), lr=0.1,
                                 sample_fraction=1.0)
    x = torch.randn(32, 6)
    model(x).sum().backward()
    tk.decor.update(model)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(32, 6) * 5)  # a forward, then the run stops and is resumed in this process
    model.load_state_dict(saved)
    resumed = {k: v.clone() for k, v in model.state_dict().items()}
    model(x)
    tk.decor.update(model)
    fresh = tk.decor.decorrelate(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), lr=0.1,
                                 sample_fraction=1.0)
    fresh.load_state_dict(resumed)
    fresh(x)
    tk.decor.update(fresh)
    for key, value in fresh.state_dict().items():  # the stale inputs were folded into the first update
        assert torch.equal(model.state_dict()[key], value), key


def test_a_skip_name_that_is_no_module_is_refused():
    # a misspelt name decorrelated the layer it meant to leave plain; factorize and prune refuse theirs
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    for skip in (["O"], "2.weight", iter(["0", "head"])):
        with pytest.raises(tk.errors.InvalidArgumentError, match=r"skip: no module named '(O|2.weight|head)'"):
            tk.decor.decorrelate(model, skip=skip)
        assert not tk.decor.decorrelated_layers(model)
    tk.decor.decorrelate(model, skip=iter(["0"]))  # a one-pass iterable is read once
    assert [name for name, _ in tk.decor.decorrelated_layers(model)] == ["2"]


@pytest.mark.parametrize("hook, source", [
    (torch.nn.utils.spectral_norm, "spectral_norm's hook"),
    (torch.nn.utils.weight_norm, "weight_norm's hook"),
    (torch.nn.utils.parametrizations.weight_norm, "a parametrization"),
])
@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_computed_weights_are_left_out_with_a_warning_and_fold_copies_them(hook, source):
    # the hook's weight was taken for a frozen one (or, after a forward, decorrelated, with fold
    # writing W R where the next forward overwrites it), and fold() failed in deepcopy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    hook(model[0])
    x = torch.randn(16, 4)
    model(x)  # the old hooks leave a weight with a history in the module, which deepcopy refuses
    with pytest.warns(UserWarning, match=rf"decorrelate leaves out \['0'\]: each weight is computed by .*{source}"):
        tk.decor.decorrelate(model, lr=0.1, sample_fraction=1.0)
    assert [name for name, _ in tk.decor.decorrelated_layers(model)] == ["2"]
    for _ in range(3):
        model(x)
        tk.decor.update(model)
    folded = tk.decor.fold(model)
    torch.testing.assert_close(folded.eval()(x), model.eval()(x))
    assert not tk.decor.decorrelated_layers(folded)


def test_update_bn_and_interpolate_leave_the_decorrelation_state_as_it_was():
    # their BatchNorm pass runs the model in train mode: the layers sampled its batches, and
    # the next update() moved R by them
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    tk.decor.decorrelate(model, sample_fraction=0.5, seed=0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    model(x[:24])  # inputs pending for the next update, and the sampler's generator advanced
    untouched = copy.deepcopy(model)

    def state(m):
        return [(layer.decor_R.clone(), [r.clone() for r in layer._decor_rows], layer.decor_dense_sum(),
                 layer._decor_count, layer._decor_sampler.generator(layer.decor_R.device).get_state())
                for _, layer in tk.decor.decorrelated_layers(m)]

    before = state(model)
    tk.batchnorm.update_bn(loader, model)
    tk.connectivity.interpolate(model, model.state_dict(), untouched.state_dict(), loader, steps=3)
    for (r, rows, s, n, g), (r2, rows2, s2, n2, g2) in zip(before, state(model)):
        assert torch.equal(r, r2) and torch.equal(s, s2) and n == n2 == 12 and torch.equal(g, g2)
        assert len(rows) == len(rows2) and all(torch.equal(a, b) for a, b in zip(rows, rows2))
    tk.decor.update(model)
    tk.decor.update(untouched)
    for (_, a), (_, b) in zip(tk.decor.decorrelated_layers(model), tk.decor.decorrelated_layers(untouched)):
        assert torch.equal(a.decor_R, b.decor_R)
    model(x[:24])  # sampling is back once the pass is over
    assert all(layer._decor_count == 12 for _, layer in tk.decor.decorrelated_layers(model))


def test_sampling_paused_pauses_the_models_layers_not_their_copies_and_blocks_end_in_any_order():
    # the pause lived on the layers: a copy made inside the block stayed paused for good
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    tk.decor.decorrelate(model, sample_fraction=1.0, seed=0)
    x = torch.randn(4, 8)

    def counts(m):
        return [layer._decor_count for _, layer in tk.decor.decorrelated_layers(m)]

    with tk.decor.sampling_paused(model):
        with tk.decor.sampling_paused(model):  # nested: the inner end leaves the outer pause
            model(x)
        model(x)
        copied = copy.deepcopy(model)
    assert counts(model) == [0, 0]  # none of the forwards in the block sampled
    copied(x)
    assert counts(copied) == [4, 4]  # a copy made inside the block samples as usual
    first, second = tk.decor.sampling_paused(model), tk.decor.sampling_paused(model)
    first.__enter__(), second.__enter__()
    first.__exit__(None, None, None)  # blocks that end out of order (two generators closed in turn)
    model(x)
    second.__exit__(None, None, None)
    model(x)
    assert counts(model) == [4, 4]  # paused until the last block ended, then sampling again


def test_a_compiled_decorrelated_model_samples_in_one_graph_and_honours_the_pauses():
    torch.manual_seed(0)
    model = tk.decor.decorrelate(nn.Sequential(nn.Linear(8, 4)), sample_fraction=1.0, seed=0)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # a graph break would raise
    x = torch.randn(4, 8)
    compiled(x)
    with tk.decor.sampling_paused(model):
        compiled(x)
    with statistics_pass():  # as update_bn runs its BatchNorm pass
        compiled(x)
    compiled(x)
    assert [layer._decor_count for _, layer in tk.decor.decorrelated_layers(model)] == [8]


def test_a_decorrelate_that_fails_part_way_leaves_every_layer_as_it_was(monkeypatch):
    # a MemoryError for R of the second layer left it of the decorrelated class without R:
    # every forward failed, and a retry passed it over as decorrelated already
    from twa_kernels import decor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(4, 8)
    plain, out = copy.deepcopy(model), model(x)
    init, calls = decor._Decor._decor_init, []

    def out_of_memory(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:
            raise MemoryError("R of the second layer")
        return init(self, *args, **kwargs)

    monkeypatch.setattr(decor._Decor, "_decor_init", out_of_memory)
    with pytest.raises(MemoryError):
        tk.decor.decorrelate(model, seed=0)
    monkeypatch.undo()
    assert [type(m) for m in model] == [type(m) for m in plain]
    assert list(model.state_dict()) == list(plain.state_dict())
    assert not any(n.startswith(("_decor", "decor_")) for m in model for n in vars(m))
    assert not any(m._forward_pre_hooks for m in model)
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    tk.decor.decorrelate(model, seed=0)  # a retry decorrelates every layer
    assert sum(isinstance(m, decor._Decor) for m in model) == 3


def test_pruning_or_factorizing_a_decorrelated_layer_is_named_and_folding_a_parametrized_one_too():
    # masks and factors of W left the layer computing with a dense W R (fold wrote that), and
    # fold of a masked or factorized decorrelated layer failed with a bare KeyError
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    tk.decor.decorrelate(model, lr=0.1, sample_fraction=1.0, skip=["2"])
    model(torch.randn(8, 4))
    tk.decor.update(model)
    with pytest.warns(UserWarning, match=r"pruning leaves out \['0.weight'\]: each is multiplied by the layer's "
                                         r"decorrelation matrix R .* tk.decor.fold"):
        masks = tk.prune.global_magnitude_masks(model, 0.5)
    assert list(masks) == ["2.weight"]
    with pytest.raises(tk.prune.PruningError, match=r"0.weight is multiplied by .*tk.decor.fold"):
        tk.prune.global_magnitude_masks(model, 0.5, layers=["0"])
    with pytest.raises(tk.factorization.FactorizationError, match=r"layer '0' .* multiplied by .*tk.decor.fold"):
        tk.factorize(model, 2, layers=["0"])
    parametrize.register_parametrization(model[0], "weight", _Scaled())
    with pytest.raises(InvalidArgumentError, match=r"decor.fold: the decorrelated layers \['0'\] compute their "
                                                  r"weight through a parametrization"):
        tk.decor.fold(model)
    parametrize.remove_parametrizations(model[0], "weight")
    folded = tk.decor.fold(model)
    x = torch.randn(5, 4)
    torch.testing.assert_close(folded(x), model(x))


class _Scaled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_decorrelating_a_factorized_or_masked_layer_names_this_packages_own_undo():
    # the message advised remove_parametrizations, which would leave a factorized layer's
    # weight at its factors' product without collapse's clean-up, and break apply_masks
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    tk.factorize(model, 2, init="keep", layers=["0"])
    with pytest.warns(UserWarning, match=r"decorrelate leaves out \['0'\]: each weight is the product of "
                                         r"tk.factorize's factors.*model = tk.collapse\(model\)"):
        tk.decor.decorrelate(model, lr=0.1)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = tk.prune.global_magnitude_masks(model, 0.5, layers=["0"])
    with tk.prune.apply_masks(model, masks):
        with pytest.warns(UserWarning, match=r"each weight is masked by tk.prune.apply_masks.*leave the "
                                             r"apply_masks block first"):
            tk.decor.decorrelate(model, lr=0.1)


def test_a_layer_frozen_after_decorrelate_keeps_its_r_and_what_it_computes():
    # update() went on moving R under a W that no longer trains: the layer's output drifted
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    tk.decor.decorrelate(model, lr=0.5, sample_fraction=1.0)
    x = torch.randn(32, 4) @ torch.randn(4, 4)  # correlated inputs: R has somewhere to go
    model(x)
    tk.decor.update(model)
    model[0].weight.requires_grad_(False)
    before = model[0].decor_R.clone()
    kept = model[0](x).detach()
    model(x)
    with pytest.warns(UserWarning, match=r"weights of decorrelated layers \['0'\] are frozen .* left as they are"):
        tk.decor.update(model)
    assert model[0]._decor_count == 0  # its samples were dropped, not kept to pile up
    assert torch.equal(model[0].decor_R, before) and torch.equal(model[0](x), kept)


def test_a_decorrelated_models_checkpoints_given_with_a_plain_model_are_refused():
    # their decor_R entries sat under modules the plain model has and were left out without
    # a word: every average, line and plane ran on W instead of W R
    def plain():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))

    decorrelated = tk.decor.decorrelate(plain())
    for _, layer in tk.decor.decorrelated_layers(decorrelated):
        layer.decor_R.add_(0.3 * torch.randn_like(layer.decor_R))
    a = copy.deepcopy(decorrelated.state_dict())
    b = copy.deepcopy(a)
    data = [(torch.randn(8, 10), torch.randint(0, 3, (8,)))]
    refused = "saved from a decorrelated model .*'0.decor_R'.*tk.decor.fold"
    for call in (lambda: tk.connectivity.interpolate(plain(), a, b, data, steps=2),
                 lambda: tk.connectivity.plane(plain(), [a, b, copy.deepcopy(a)], data, grid=2),
                 lambda: tk.uniform_average([a, b], model=plain()),
                 lambda: tk.TWA(plain(), [a, b], bits=4)):
        with pytest.raises(tk.errors.CheckpointError, match=refused):
            call()
    # a run decorrelated part way: its later checkpoints hold R, the first does not
    first = copy.deepcopy(plain().state_dict())
    for call in (lambda: tk.uniform_average([first, a], model=plain()),
                 lambda: tk.TWA(plain(), [first, a, b], bits=4)):
        with pytest.raises(tk.errors.CheckpointError, match=refused):
            call()
    # a decorrelated layer the model does not have at all is left out with the usual warning
    smaller = tk.decor.decorrelate(nn.Sequential(nn.Linear(10, 16)))
    with pytest.warns(UserWarning, match="no place for are left out"):
        tk.uniform_average([a, b], model=smaller)
    # given the decorrelated model, or folded first, they load
    tk.connectivity.interpolate(decorrelated, a, b, data, steps=2)
    folded = tk.decor.fold(decorrelated).state_dict()
    tk.uniform_average([folded, copy.deepcopy(folded)], model=plain())
