"""Weight-space geometry (tk.connectivity) on real data: scikit-learn's digits and a BatchNorm
MLP. Barriers of a model with itself, of nearby epochs of one run and of two independent
runs; BatchNorm modes against update_bn and the study's interpolated statistics; masks."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader

import twa_kernels as tk
from twa_kernels import connectivity as C

from digits import digits_splits, evaluate, make_model, train_checkpoints


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # these models are tiny: a second thread only adds contention on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs():
    train, val, test = digits_splits()
    # two runs from independent initialisations; 8 epochs each
    return train, test, train_checkpoints(train, epochs=8, lr=0.05, seed=0), train_checkpoints(train, epochs=8,
                                                                                               lr=0.05, seed=1)


def _data(dataset):
    return DataLoader(dataset, batch_size=512)


def test_barrier_of_a_model_with_itself_is_zero(runs):
    train, test, ckpts, _ = runs
    for bn in C.BN_MODES:
        r = C.interpolate(make_model(3), ckpts[-1], ckpts[-1], _data(test), bn=bn, bn_data=_data(train))
        print(f"\nself, bn={bn}: loss barrier {r.loss_barrier:.3g}, error barrier {r.error_barrier:.3g}")
        assert r.loss_barrier == 0.0 and r.error_barrier == 0.0
        assert len(set(r.loss)) == 1 and len(r.alphas) == 11 and r.alphas[0] == 0.0 and r.alphas[-1] == 1.0


def test_nearby_epochs_small_and_independent_runs_clearly_positive(runs):
    train, test, ckpts, other = runs
    near = C.interpolate(make_model(3), ckpts[-2], ckpts[-1], _data(test), bn_data=_data(train))
    far = C.interpolate(make_model(3), ckpts[-1], other[-1], _data(test), bn_data=_data(train))
    print(f"\nepochs 7 and 8 of one run: loss barrier {near.loss_barrier:.4f}, error barrier {near.error_barrier:.4f}")
    print(f"two independent runs:      loss barrier {far.loss_barrier:.4f}, error barrier {far.error_barrier:.4f}")
    print(far.table())
    for r in (near, far):
        assert all(0.0 <= e <= 1.0 for e in r.error)
    assert near.loss_barrier < 0.02 and near.error_barrier < 0.015
    assert far.loss_barrier > 0.1 and far.error_barrier > 0.03
    assert far.loss_barrier > 5 * max(near.loss_barrier, 0.01)


def test_recompute_at_the_ends_reproduces_each_checkpoint_after_update_bn(runs):
    train, test, ckpts, other = runs
    model = make_model(3)
    before = copy.deepcopy(model.state_dict())
    r = C.interpolate(model, ckpts[-1], other[-1], _data(test), steps=3, bn="recompute", bn_data=_data(train))
    for alpha_index, state in ((0, ckpts[-1]), (-1, other[-1])):
        plain = make_model(9)
        plain.load_state_dict(state)
        torch.optim.swa_utils.update_bn(_data(train), plain)
        loss, acc = evaluate(plain, test)
        assert r.loss[alpha_index] == pytest.approx(loss, abs=1e-5)
        assert r.error[alpha_index] == pytest.approx(1 - acc, abs=1e-6)
    # the model passed in is untouched: parameters and BatchNorm statistics
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_interpolate_mode_is_the_studys_lerp_of_every_entry(runs):
    train, test, ckpts, other = runs
    a, b = ckpts[-1], other[-1]
    r = C.interpolate(make_model(3), a, b, _data(test), steps=5, bn="interpolate")
    for i, alpha in enumerate(r.alphas):
        plain = make_model(9)
        plain.load_state_dict({k: torch.lerp(v, b[k], alpha) if v.is_floating_point() else v for k, v in a.items()})
        loss, acc = evaluate(plain, test)
        assert r.loss[i] == pytest.approx(loss, abs=1e-5) and r.error[i] == pytest.approx(1 - acc, abs=1e-6)
    # at the ends it is each checkpoint with its own stored statistics
    plain = make_model(9)
    plain.load_state_dict(a)
    assert r.loss[0] == pytest.approx(evaluate(plain, test)[0], abs=1e-5)


def test_masks_are_applied_at_every_alpha(runs):
    train, test, ckpts, other = runs
    torch.manual_seed(0)
    model = make_model(3)
    masks = {name: torch.rand_like(p) > 0.5 for name, p in model.named_parameters() if p.dim() == 2}
    r = C.interpolate(model, ckpts[-1], other[-1], _data(test), steps=3, masks=masks, bn_data=_data(train))
    dense = C.interpolate(model, ckpts[-1], other[-1], _data(test), steps=3, bn_data=_data(train))
    alpha = r.alphas[1]
    state = {k: torch.lerp(v, other[-1][k], alpha) if v.is_floating_point() else v for k, v in ckpts[-1].items()}
    for name, m in masks.items():
        state[name] = state[name] * m
    plain = make_model(9)
    plain.load_state_dict(state)
    torch.optim.swa_utils.update_bn(_data(train), plain)
    loss, acc = evaluate(plain, test)
    assert r.loss[1] == pytest.approx(loss, abs=1e-5) and r.error[1] == pytest.approx(1 - acc, abs=1e-6)
    assert abs(r.loss[1] - dense.loss[1]) > 0.1  # half the weights gone: not the dense interpolant


def test_interpolate_named_errors(runs, tmp_path):
    train, test, ckpts, _ = runs
    model = make_model(3)
    with pytest.raises(ValueError, match="steps must be"):
        C.interpolate(model, ckpts[0], ckpts[1], _data(test), steps=1)
    with pytest.raises(ValueError, match="bn must be one of"):
        C.interpolate(model, ckpts[0], ckpts[1], _data(test), bn="average")
    bad = dict(ckpts[1])
    bad["0.weight"] = torch.zeros(40, 64)
    with pytest.raises(tk.CheckpointError, match=r"checkpoint #1: key '0.weight' has shape \(40, 64\)"):
        C.interpolate(model, ckpts[0], bad, _data(test))
    path = tk.save_state_dict({k: v for k, v in ckpts[1].items() if k != "3.bias"}, tmp_path / "b.pt")
    with pytest.raises(tk.CheckpointError, match=r"b: missing key '3.bias'"):
        C.interpolate(model, ckpts[0], path, _data(test))
    with pytest.raises(ValueError, match="mask for '0.weight' has shape"):
        C.interpolate(model, ckpts[0], ckpts[1], _data(test), masks={"0.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="no batches"):
        C.interpolate(model, ckpts[0], ckpts[1], iter([]), bn="none")
