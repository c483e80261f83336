"""SubspaceOptimizer: the weights stay in center + span(P) whatever the wrapped optimizer
does, it is a torch Optimizer that schedulers take, and bad set-ups are named."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twa_kernels as tk
from tests.digits import make_model
from tests.helpers import noisy_checkpoints


def _subspace(model: nn.Module, n: int = 5, bits: int | None = None) -> tk.Subspace:
    torch.manual_seed(1)
    names = [name for name, _ in model.named_parameters()]
    return tk.Subspace.from_checkpoints(noisy_checkpoints(model, n), bits=bits, granularity="model",
                                        orthonormalize=True, parameter_names=names)


def _at_center(seed: int = 0) -> tuple[nn.Module, tk.Subspace]:
    model = make_model(seed)
    sub = _subspace(model)
    model.load_state_dict(sub.unflatten(sub.center), strict=False)
    return model, sub


def _train(opt: torch.optim.Optimizer, model: nn.Module, steps: int = 3) -> None:
    torch.manual_seed(2)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))

    def closure() -> torch.Tensor:  # the form every optimizer takes (LBFGS needs it)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


def _one_gradient(opt: torch.optim.Optimizer, model: nn.Module) -> None:
    """The gradient of one fixed batch, for a step to take."""
    torch.manual_seed(3)
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(8, 64)), torch.randint(0, 10, (8,))).backward()


def _outside_fraction(model: nn.Module, sub: tk.Subspace) -> tuple[float, float]:
    """(norm moved from the center, fraction of it outside the span)."""
    moved = sub.flatten(dict(model.named_parameters())).detach().double() - sub.center.double()
    basis = tk.dequantize(sub.basis).double()
    inside = basis.T @ (basis @ moved)
    return float(moved.norm()), float((moved - inside).norm() / moved.norm())


OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "sgd_weight_decay": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.5),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01),
    "lbfgs": lambda ps: torch.optim.LBFGS(ps, lr=0.1, max_iter=4),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_weights_stay_in_the_subspace_whatever_the_wrapped_optimizer(kind):
    model, sub = _at_center()
    _train(tk.SubspaceOptimizer(OPTIMIZERS[kind](model.parameters()), sub), model)
    moved, outside = _outside_fraction(model, sub)
    assert moved > 1e-3
    # float32 weights: rounding of three steps leaves ~1e-6 outside; Adam's per-entry scaling
    # unprojected leaves about half of the move outside the 4-dimensional span
    assert outside < 1e-4


@pytest.mark.parametrize("how", ["model", "named"])
def test_parameter_groups_are_matched_by_name_and_their_learning_rates_kept_in_the_span(how):
    # groups listed out of the model's order were projected with another layer's columns, and
    # SGD's step with per-group learning rates was taken as inside the span: both left it
    model, sub = _at_center()
    layers = [("3", model[3]), ("1", model[1]), ("0", model[0])]  # out of order, each with its own rate
    if how == "model":
        groups = [{"params": layer.parameters(), "lr": lr} for (_, layer), lr in zip(layers, (0.5, 0.05, 0.2))]
        opt = tk.SubspaceOptimizer(torch.optim.SGD(groups, lr=0.1, momentum=0.9), sub, model=model)
    else:
        groups = [{"params": [(f"{prefix}.{n}", p) for n, p in layer.named_parameters()], "lr": lr}
                  for (prefix, layer), lr in zip(layers, (0.5, 0.05, 0.2))]
        opt = tk.SubspaceOptimizer(torch.optim.SGD(groups, lr=0.1, momentum=0.9), sub)
    _train(opt, model)
    moved, outside = _outside_fraction(model, sub)
    assert moved > 1e-3 and outside < 1e-4
    unnamed = [{"params": layer.parameters()} for _, layer in layers]
    with pytest.raises(tk.errors.InvalidArgumentError, match="3 parameter groups, so which subspace weight"):
        tk.SubspaceOptimizer(torch.optim.SGD(unnamed, lr=0.1), sub)
    with pytest.raises(tk.errors.InvalidArgumentError, match="not parameters of `model`"):
        tk.SubspaceOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), sub, model=model)
    partial = [("0.weight", model[0].weight), ("0.bias", model[0].bias)]
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"missing: \['1.weight'"):
        tk.SubspaceOptimizer(torch.optim.SGD(partial, lr=0.1), sub)


@pytest.mark.parametrize("kind", ["sgd_momentum", "adamw"])
def test_steps_without_a_closure_stay_in_the_subspace_too(kind):
    model, sub = _at_center()
    opt = tk.SubspaceOptimizer(OPTIMIZERS[kind](model.parameters()), sub)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert opt.step() is None
    moved, outside = _outside_fraction(model, sub)
    assert moved > 1e-3 and outside < 1e-4


def test_an_adam_step_is_the_projection_of_the_step_adam_would_take():
    model, sub = _at_center()
    free = make_model()
    free.load_state_dict(model.state_dict())
    _train(tk.SubspaceOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), sub), model, steps=1)
    opt = torch.optim.Adam(free.parameters(), lr=0.01)
    torch.manual_seed(2)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    # by hand: Adam's step from the projected gradient, then that step projected
    flat_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        F.cross_entropy(free(x), y), list(free.parameters()))])
    basis = tk.dequantize(sub.basis).double()
    projected = (basis.T @ (basis @ flat_grad.double())).float()
    for p, g in zip(free.parameters(), sub.unflatten(projected).values()):
        p.grad = g.clone()
    before = sub.flatten(dict(free.named_parameters())).detach().double()
    opt.step()
    after = sub.flatten(dict(free.named_parameters())).detach().double()
    expected = before + basis.T @ (basis @ (after - before))
    got = sub.flatten(dict(model.named_parameters())).detach().double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_a_learning_rate_scheduler_drives_the_wrapped_optimizer():
    model, sub = _at_center()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = tk.SubspaceOptimizer(base, sub)
    assert isinstance(opt, torch.optim.Optimizer)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
        _train(opt, model, steps=1)
        schedule.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    state = opt.state_dict()
    assert state["state"], "momentum buffers are the wrapped optimizer's state"
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tk.SubspaceOptimizer(fresh, sub).load_state_dict(state)
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.05)



@pytest.mark.parametrize("loader", ["wrapper", "wrapped"])
def test_a_scheduler_still_drives_the_wrapped_optimizer_after_a_resume(loader):
    # torch's load_state_dict replaces the groups and state objects: a wrapper holding the old
    # ones took the scheduler's lr while the wrapped optimizer stepped on at the old one
    model, sub = _at_center()
    base = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    opt = tk.SubspaceOptimizer(base, sub)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    _train(opt, model, steps=1)
    saved = opt.state_dict()
    (opt if loader == "wrapper" else base).load_state_dict(saved)
    schedule.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.1) and opt.param_groups is base.param_groups
    assert opt.state is base.state and opt.state, "the momentum buffers are the loaded ones"
    copy = __import__("copy").deepcopy(opt)  # a pickled optimizer is a whole one
    assert copy.param_groups is copy.base_optimizer.param_groups and copy.param_groups[0]["lr"] == pytest.approx(0.1)

def test_a_closure_is_called_and_its_loss_returned():
    model, sub = _at_center()
    opt = tk.SubspaceOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), sub)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) > 0
    assert _outside_fraction(model, sub)[1] < 1e-4


def test_a_start_off_the_subspace_is_reported_and_one_on_it_is_not():
    model = make_model()
    sub = _subspace(model)  # leaves the model at its last checkpoint, inside the subspace
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    with pytest.warns(UserWarning, match="lies outside the subspace"):
        tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sub, model=model)
    # matched by position, with weights of one shape (a BatchNorm's weight and bias): it may
    # as well be a swap, so it is refused
    with pytest.raises(tk.errors.InvalidArgumentError, match="matched to the subspace's weights by position"):
        tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sub)
    model.load_state_dict(sub.unflatten(sub.center), strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sub)


def test_a_frozen_parameter_the_subspace_spans_is_refused():
    model, sub = _at_center()
    model[0].bias.requires_grad_(False)
    with pytest.raises(tk.errors.InvalidArgumentError, match="'0.bias'.*trainable parameters only"):
        tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sub)


def test_a_sparse_gradient_is_named():
    model = nn.Sequential(nn.Embedding(20, 8, sparse=True), nn.Flatten(), nn.Linear(24, 3))
    sub = _subspace(model)
    model.load_state_dict(sub.unflatten(sub.center), strict=False)
    opt = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sub)
    model(torch.randint(0, 20, (4, 3))).sum().backward()
    with pytest.raises(tk.errors.InvalidArgumentError, match="'0.weight' has a sparse gradient"):
        opt.step()


def test_set_ups_that_cannot_work_are_refused():
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    ckpts = noisy_checkpoints(model, 4)
    with pytest.raises(ValueError, match="orthonormal"):
        tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=1), tk.Subspace.from_checkpoints(ckpts))
    packed = tk.Subspace.from_checkpoints(ckpts, bits=4, granularity="model", orthonormalize=True,
                                          parameter_names=names)
    with pytest.warns(UserWarning, match="bits=None for the exact projection"):
        tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=1), packed)
    dense = _subspace(model)
    with pytest.raises(tk.errors.InvalidArgumentError, match="parameters do not match"):
        tk.SubspaceOptimizer(torch.optim.SGD(list(model.parameters())[:2], lr=1), dense)
    with pytest.raises(tk.errors.InvalidTypeError, match="wraps a torch.optim.Optimizer"):
        tk.SubspaceOptimizer(object(), dense)


def test_a_twa_over_an_orthonormal_subspace_hands_it_on_as_orthonormal():
    model, sub = _at_center()
    twa = tk.TWA(model, sub)
    assert twa.subspace.orthonormal and twa.subspace.basis.bits is None
    tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), twa.subspace)
    assert not tk.TWA(make_model(), noisy_checkpoints(make_model(), 3)).subspace.orthonormal


def test_lightning_trains_with_it_from_configure_optimizers(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    model, sub = _at_center()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, _):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            opt = tk.SubspaceOptimizer(torch.optim.AdamW(self.net.parameters(), lr=0.01, weight_decay=0.1), sub)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)]

    torch.manual_seed(3)
    data = TensorDataset(torch.randn(64, 64), torch.randint(0, 10, (64,)))
    module = Module()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(module, DataLoader(data, batch_size=16))
    moved, outside = _outside_fraction(model, sub)
    assert moved > 1e-3 and outside < 1e-4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0025)  # two epochs of StepLR


def test_weights_of_one_shape_given_out_of_order_by_position_are_refused():
    # two layers of one shape, handed over in the other order, passed the shape check: a
    # warning said so, and the steps moved each layer along the other's directions
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    model = Two()
    sub = _subspace(model)
    model.load_state_dict(sub.unflatten(sub.center), strict=False)
    swapped = [*model.b.parameters(), *model.a.parameters()]
    with pytest.raises(tk.errors.InvalidArgumentError, match="may be matched in another order.*Pass model=model"):
        tk.SubspaceOptimizer(torch.optim.SGD(swapped, lr=0.1), sub)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sub)  # the model's order: on the subspace
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.SubspaceOptimizer(torch.optim.SGD(swapped, lr=0.1), sub, model=model)  # matched by name: right


@pytest.mark.parametrize("match", ["position", "model", "names"])
def test_a_frozen_parameter_the_subspace_leaves_out_may_be_in_the_optimizer(match):
    # SGD(model.parameters()) over a model with a frozen layer was refused, with the advice to
    # pass model.parameters()
    model = make_model()
    frozen = next(p for p in model.parameters() if p.dim() == 1)
    frozen.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sub = tk.Subspace.from_checkpoints(noisy_checkpoints(model, 4), bits=None, granularity="model",
                                       orthonormalize=True, parameter_names=names)
    before = frozen.detach().clone()
    model.load_state_dict(sub.unflatten(sub.center), strict=False)
    given = model.named_parameters() if match == "names" else model.parameters()
    opt = tk.SubspaceOptimizer(torch.optim.SGD(given, lr=0.1), sub, model=model if match == "model" else None)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    moved, outside = _outside_fraction(model, sub)
    assert moved > 0 and outside < 1e-4
    assert torch.equal(frozen, before)


def test_momentum_that_left_the_span_is_projected_after_weight_decay_ends():
    # plain SGD's steps went unprojected once weight decay was 0, but its momentum buffers
    # still held the decay's w * p from before: 58-74% of each move left the span
    model, sub = _at_center()
    opt = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05), sub)
    _train(opt, model, steps=3)
    for group in opt.param_groups:
        group["weight_decay"] = 0.0  # a schedule that ends weight decay
    _train(opt, model, steps=3)
    assert _outside_fraction(model, sub)[1] < 1e-4


def test_momentum_an_optimizer_brings_along_is_projected():
    # an SGD that trained before, or a resumed one, holds buffers outside the span: 98.7% of
    # the moves left it
    model, sub = _at_center()
    trained = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(trained, model, steps=2)
    state = trained.state_dict()
    model.load_state_dict(sub.unflatten(sub.center), strict=False)
    opt = tk.SubspaceOptimizer(trained, sub)
    _train(opt, model, steps=2)
    assert _outside_fraction(model, sub)[1] < 1e-4
    model.load_state_dict(sub.unflatten(sub.center), strict=False)
    resumed = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sub)
    resumed.load_state_dict(state)
    _train(resumed, model, steps=2)
    assert _outside_fraction(model, sub)[1] < 1e-4


def test_a_resumed_sgd_whose_momentum_stayed_in_the_span_repeats_the_run_exactly():
    # a loaded state was always taken for outside the span: the resumed steps were projected,
    # which rounds differently (6e-8 apart after 4 steps), and cost a pass over the basis each
    import copy

    model, sub = _at_center()
    opt = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), sub)
    _train(opt, model, steps=4)
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(opt, model, steps=4)
    resumed_model = make_model(0)
    resumed_model.load_state_dict(weights)
    resumed = tk.SubspaceOptimizer(torch.optim.SGD(resumed_model.parameters(), lr=0.5, momentum=0.9), sub)
    resumed.load_state_dict(state)
    _train(resumed, resumed_model, steps=4)
    for name, value in model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[name]), name


def test_a_weight_frozen_or_a_group_added_after_wrapping_is_refused():
    model, sub = _at_center()
    opt = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sub)
    with pytest.raises(tk.errors.UsageError, match="a parameter group added now would train outside it"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    model[0].weight.requires_grad_(False)  # it still moved, with a projected gradient
    with pytest.raises(tk.errors.UsageError, match="parameter '0.weight' no longer requires grad"):
        _train(opt, model, steps=1)


def test_a_bfloat16_model_loaded_at_the_center_is_not_reported_off_the_subspace():
    # the center rounded to bfloat16 was measured as a distance outside the span
    model = make_model().to(torch.bfloat16)
    sub = _subspace(model)
    model.load_state_dict(sub.unflatten(sub.center), strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sub)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    with pytest.warns(UserWarning, match="lies outside the subspace"):
        tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sub, model=model)


def test_a_bfloat16_model_at_a_checkpoint_or_resumed_is_on_the_subspace():
    # its own rounding, measured against a short distance from the center, read as "off the
    # subspace": warned, and refused once parameters matched by position were refused there
    model = make_model(0)
    torch.manual_seed(1)
    checkpoints = noisy_checkpoints(model, 5)
    sub = tk.Subspace.from_checkpoints(checkpoints, bits=None, granularity="model", orthonormalize=True,
                                       parameter_names=[name for name, _ in model.named_parameters()])
    model.to(torch.bfloat16).load_state_dict(checkpoints[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sub)
        x, y = torch.randn(32, 64, dtype=torch.bfloat16), torch.randint(0, 10, (32,))
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(x).float(), y).backward()
            opt.step()
        assert _outside_fraction(model, sub)[0] > 0  # it moved
        resumed = make_model(0).to(torch.bfloat16)
        resumed.load_state_dict(model.state_dict())
        tk.SubspaceOptimizer(torch.optim.SGD(resumed.parameters(), lr=0.1), sub)


def test_a_swap_in_a_bfloat16_model_is_not_taken_for_rounding():
    # the rounding tolerance must not take a swap of two layers for rounding (its bound is
    # over all weights, so a swap of layers far smaller than an embedding this size's would hide)
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.a, self.b = nn.Embedding(5000, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    torch.manual_seed(0)
    model = Model()
    torch.manual_seed(1)
    checkpoints = noisy_checkpoints(model, 4)
    sub = tk.Subspace.from_checkpoints(checkpoints, bits=None, granularity="model", orthonormalize=True,
                                       parameter_names=[name for name, _ in model.named_parameters()])
    model.to(torch.bfloat16).load_state_dict(checkpoints[0])
    swapped = [model.embedding.weight, *model.b.parameters(), *model.a.parameters()]
    with pytest.raises(tk.errors.InvalidArgumentError, match="may be matched in another order"):
        tk.SubspaceOptimizer(torch.optim.SGD(swapped, lr=0.1), sub)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sub)  # in order: on the subspace


@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_a_bfloat16_model_stays_off_the_subspace_by_one_rounding_only(name):
    # each step was added to weights rounded before, and the roundings added up: Adam's weights
    # ended 7 roundings off the subspace after 200 steps, SGD's steps left it too
    model, sub = _at_center()
    model.to(torch.bfloat16)
    opt = tk.SubspaceOptimizer(OPTIMIZERS[name](model.parameters()), sub)
    torch.manual_seed(2)
    x, y = torch.randn(32, 64).bfloat16(), torch.randint(0, 10, (32,))
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
    moved = sub.flatten(dict(model.named_parameters())).detach().double() - sub.center.double()
    basis = tk.dequantize(sub.basis).double()
    inside = basis.T @ (basis @ moved)
    # the floor: the in-span point itself rounded to bfloat16 once
    rounded = (sub.center.double() + inside).to(torch.bfloat16).double() - sub.center.double()
    floor = float((rounded - basis.T @ (basis @ rounded)).norm())
    assert float(moved.norm()) > 0  # it trained
    assert float((moved - inside).norm()) <= 1.5 * floor


@pytest.mark.parametrize("mixed", [False, True])
def test_a_16_bit_step_projects_once_when_every_weight_is_16_bit(monkeypatch, mixed):
    # putting all-16-bit weights back onto the subspace is the projection of their step: the
    # step was projected first and then again, which tripled an SGD step's time
    from twa_kernels import optim

    model, sub = _at_center()
    model.to(torch.bfloat16)
    if mixed:
        model[-1].float()
    opt = tk.SubspaceOptimizer(OPTIMIZERS["adam"](model.parameters()), sub)
    calls = []
    monkeypatch.setattr(optim, "project", lambda *a: calls.append(1) or tk.ops.project(*a))
    x = torch.randn(8, 64)
    opt.zero_grad()
    F.cross_entropy(model[-1](model[:-1](x.bfloat16()).to(model[-1].weight.dtype)).float(),
                    torch.randint(0, 10, (8,))).backward()
    opt.step()
    assert len(calls) == (3 if mixed else 2)  # the gradient's, [the step's,] the weights'
    assert _outside_fraction(model, sub)[0] > 0  # it stepped (its rounding is pinned above)


def test_a_bfloat16_model_over_a_quantized_basis_is_not_scaled_by_its_steps():
    # with a 4-bit basis P^T P is not quite a projection: putting the weights back onto the
    # subspace with it at every step scaled their distance from the center, 2.0 to 51 in 200
    # steps of a zero learning rate
    model = make_model(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the packed basis's note
        sub = _subspace(model, bits=4)
        model.load_state_dict(sub.unflatten(sub.center), strict=False)
        model.to(torch.bfloat16)
        with torch.no_grad():
            model[0].weight.add_(0.01)
        opt = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), sub)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.randn(8, 64).bfloat16()
    for _ in range(50):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())


def test_a_float64_model_keeps_its_small_steps():
    # the projected step was added in float32 and rounded away with the weights: Adam at
    # lr 1e-9 moved by float32's rounding of the weights, not by its step
    import copy

    model = make_model(0).double()
    sub = _subspace(model)
    model.load_state_dict(sub.unflatten(sub.center), strict=False)
    plain = copy.deepcopy(model)
    basis = tk.dequantize(sub.basis).double()
    x, y = torch.randn(32, 64, dtype=torch.float64), torch.randint(0, 10, (32,))
    moves = []
    for net, wrap in ((plain, False), (model, True)):
        params = dict(net.named_parameters())

        def flat(values):  # in float64, as the model holds them
            return torch.cat([values[name].reshape(-1) for name in sub.names])

        start = flat({n: p.detach() for n, p in params.items()}).clone()
        adam = torch.optim.Adam(net.parameters(), lr=1e-9)
        opt = tk.SubspaceOptimizer(adam, sub) if wrap else adam
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if not wrap:  # the reference: the gradient and the step projected in float64
            inside = basis.T @ (basis @ flat({n: p.grad for n, p in params.items()}))
            for piece, (name, p) in zip(inside.split([p.numel() for p in params.values()]), params.items()):
                p.grad.copy_(piece.view_as(p))
        opt.step()
        move = flat({n: p.detach() for n, p in params.items()}) - start
        moves.append(basis.T @ (basis @ move) if not wrap else move)
    assert float((moves[1] - moves[0]).norm() / moves[0].norm()) < 1e-3


def test_a_subspace_or_optimizer_of_the_wrong_kind_and_a_meta_model_are_named():
    model, sub = _at_center()
    with pytest.raises(tk.errors.InvalidTypeError, match="needs a tk.Subspace"):
        tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sub.basis)
    with pytest.raises(tk.errors.InvalidTypeError, match="pass an instance"):
        tk.SubspaceOptimizer(torch.optim.SGD, sub)
    with torch.device("meta"):
        meta = make_model(0)
    with pytest.raises(tk.errors.InvalidArgumentError, match="is on meta but the subspace is on cpu"):
        tk.SubspaceOptimizer(torch.optim.SGD(meta.parameters(), lr=0.1), sub)


def test_a_step_cut_short_before_its_projection_leaves_the_weights_where_it_began(monkeypatch):
    # the wrapped step ran, the projection did not: the weights stayed off the subspace for good
    model, sub = _at_center()
    opt = tk.SubspaceOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), sub)
    _train(opt, model, steps=2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}

    calls, project = [], opt._in_span

    def interrupted(flat):  # the gradient's projection runs, the step's is cut short
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return project(flat)

    monkeypatch.setattr(opt, "_in_span", interrupted)
    _one_gradient(opt, model)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert len(calls) == 2
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())
    monkeypatch.undo()
    _train(opt, model, steps=1)  # it trains on, inside the subspace
    assert _outside_fraction(model, sub)[1] < 1e-4


@pytest.mark.parametrize("fused", [False, True])
def test_an_sgd_step_cut_short_part_way_leaves_the_weights_on_the_subspace(monkeypatch, fused):
    # plain SGD takes the path without a projection of its step, and on CPU it steps one
    # parameter after another: a Ctrl-C between two left some moved and the rest not, off the
    # subspace for good. Fused SGD's kernel changes no version counter, so a cut that moved
    # some weights looked like one that moved none.
    model, sub = _at_center()
    opt = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, fused=fused), sub)
    _train(opt, model, steps=2)
    assert opt._state_in_span
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    # the function that steps the parameters (torch.optim deletes its sgd module's name)
    owner, name = ((torch, "_fused_sgd_") if fused
                   else (importlib.import_module("torch.optim.sgd"), "_single_tensor_sgd"))
    whole_step = getattr(owner, name)

    def cut_short(params, grads, buffers, **settings):  # half the parameters step, then Ctrl-C
        half = len(params) // 2
        whole_step(params[:half], grads[:half], buffers[:half], **settings)
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, name, cut_short)
    _one_gradient(opt, model)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert any(not torch.equal(v, before[k]) for k, v in model.named_parameters())  # it moved
    assert _outside_fraction(model, sub)[1] < 1e-4 and not opt._state_in_span
    monkeypatch.undo()
    _train(opt, model, steps=2)  # it trains on, its steps now projected
    assert _outside_fraction(model, sub)[1] < 1e-4


@pytest.mark.parametrize("kind", ["float32", "float64", "bfloat16", "4-bit basis"])
def test_an_error_before_an_sgd_step_moved_anything_leaves_everything_exactly(monkeypatch, kind):
    sgd = importlib.import_module("torch.optim.sgd")
    model = make_model(0)
    sub = _subspace(model, bits=4 if kind == "4-bit basis" else None)
    model.load_state_dict(sub.unflatten(sub.center), strict=False)
    if kind in ("float64", "bfloat16"):
        model.to(getattr(torch, kind))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the packed basis's note
        opt = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), sub)
    x = torch.randn(32, 64, dtype=next(model.parameters()).dtype)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 10, (32,))).backward()
        opt.step()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}

    def fails(*args, **kwargs):
        raise RuntimeError("no step")

    monkeypatch.setattr(sgd, "_single_tensor_sgd", fails)
    with pytest.raises(RuntimeError, match="no step"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())
    if kind != "bfloat16":  # (a 16-bit model's steps are always projected and put back onto the subspace)
        assert opt._state_in_span  # its later steps keep the path without a copy of the weights


def test_the_iclr_codes_linear_span_holds_the_checkpoints_themselves_and_can_rescale_the_weights():
    # the ICLR code orthonormalises the checkpoints as they are; the affine hull around the
    # center has one direction fewer, the one that scales the whole weight vector
    model = make_model(0)
    names = [name for name, _ in model.named_parameters()]
    torch.manual_seed(1)
    ckpts = noisy_checkpoints(model, 4)
    build = lambda span: tk.Subspace.from_checkpoints(ckpts, bits=None, granularity="model",  # noqa: E731
                                                      orthonormalize=True, parameter_names=names, span=span)
    affine, linear = build("affine"), build("linear")
    assert (affine.basis.k, linear.basis.k) == (3, 4)
    P = linear.basis.codes.double()
    assert torch.allclose(P @ P.T, torch.eye(4, dtype=torch.float64), atol=1e-5)
    flat = torch.stack([torch.cat([c[n].reshape(-1) for n in names]) for c in ckpts]).double()
    for basis, offset in ((P, 0), (affine.basis.codes.double(), affine.center.double())):
        assert torch.allclose((flat - offset) @ basis.T @ basis, flat - offset, atol=1e-4)  # every checkpoint
    c = linear.center.double()  # the rescaling direction: in the linear span, not in the affine hull's
    A = affine.basis.codes.double()
    assert (c @ P.T @ P - c).norm() < 1e-4 * c.norm() < (c @ A.T @ A - c).norm()
    # projected SGD along g = w (what weight decay adds) shrinks the weights in the linear span only
    for sub, shrinks in ((affine, False), (linear, True)):
        model.load_state_dict(sub.unflatten(sub.center), strict=False)
        opt = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sub)
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm()
        for p in model.parameters():
            p.grad = p.detach().clone()
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm()
        assert (after < 0.95 * before) == shrinks
    with pytest.raises(tk.errors.InvalidArgumentError, match="span='linear' is the ICLR version's basis"):
        tk.Subspace.from_checkpoints(ckpts, granularity="model", parameter_names=names, span="linear")
    with pytest.raises(tk.errors.InvalidArgumentError, match="span must be 'affine'"):
        tk.Subspace.from_checkpoints(ckpts, granularity="model", parameter_names=names, span="convex")
