"""Weight-space geometry (tk.connectivity) on real data: scikit-learn's digits and a BatchNorm
MLP. Barriers of a model with itself, of nearby epochs of one run and of two independent
runs; BatchNorm modes against update_bn and the study's interpolated statistics; masks."""

import collections
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import twa_kernels as tk
from twa_kernels import connectivity as C
from twa_kernels.geometry.evaluation import checkpoint_labels

from tests.digits import digits_splits, evaluate, make_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def runs(digits_checkpoints):
    train, val, test = digits_splits()
    # two runs from independent initialisations; 8 epochs each
    return train, test, digits_checkpoints(epochs=8, lr=0.05, seed=0), digits_checkpoints(epochs=8, lr=0.05, seed=1)


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
    # a mask multiplies the weights: a NaN or a fraction would give every point silently wrong
    name = next(iter(masks))
    for value in (float("nan"), 0.5):
        with pytest.raises(tk.errors.InvalidArgumentError, match=f"mask for '{name}' holds values other than 0 and 1"):
            C.interpolate(model, ckpts[-1], other[-1], _data(test), steps=3, masks={name: torch.full_like(
                masks[name], value, dtype=torch.float32)})


def test_interpolate_named_errors(runs, tmp_path):
    train, test, ckpts, _ = runs
    model = make_model(3)
    with pytest.raises(ValueError, match="steps must be"):
        C.interpolate(model, ckpts[0], ckpts[1], _data(test), steps=1)
    # a line of 10**11 alphas was a list allocated before the first evaluation: the process was killed
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"steps=100000000000 asks for 100,000,000,000 points"):
        C.interpolate(model, ckpts[0], ckpts[1], _data(test), steps=10**11)
    with pytest.raises(ValueError, match="bn must be one of"):
        C.interpolate(model, ckpts[0], ckpts[1], _data(test), bn="average")
    bad = dict(ckpts[1])
    bad["0.weight"] = torch.zeros(40, 64)
    with pytest.raises(tk.CheckpointError, match=r"checkpoint #1: key '0.weight' has shape \(40, 64\)"):
        C.interpolate(model, ckpts[0], bad, _data(test))
    path = tk.save_state_dict({k: v for k, v in ckpts[1].items() if k != "3.bias"}, tmp_path / "b.pt")
    with pytest.raises(tk.CheckpointError, match=r"b.pt: missing key .3.bias."):
        C.interpolate(model, ckpts[0], path, _data(test))
    with pytest.raises(ValueError, match="mask for '0.weight' has shape"):
        C.interpolate(model, ckpts[0], ckpts[1], _data(test), masks={"0.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="no batches"):
        C.interpolate(model, ckpts[0], ckpts[1], iter([]), bn="none")


# ---- planes --------------------------------------------------------------------------------


def _flat(state, model):
    return torch.cat([state[n].reshape(-1).double() for n, _ in model.named_parameters()])


def _orthonormal_frame(a, b, c):
    u = b - a
    u = u / u.norm()
    v = (c - a) - ((c - a) @ u) * u
    return u, v / v.norm()


def _plain_state(flat, model, template):
    state, offset = dict(template), 0
    for name, p in model.named_parameters():
        state[name] = flat[offset:offset + p.numel()].view(p.shape).float()
        offset += p.numel()
    return state


@pytest.fixture(scope="module")
def dense_plane(runs):
    train, test, ckpts, _ = runs
    model = make_model(3)
    return C.plane(model, [ckpts[1], ckpts[4], ckpts[7]], _data(test), grid=(6, 5), bn_data=_data(train),
                   points={"SWA": tk.uniform_average([ckpts[1], ckpts[4], ckpts[7]]), "epoch 6": ckpts[5]})


def test_plane_through_reconstruct_matches_dense_weights_at_random_points(runs, dense_plane):
    train, test, ckpts, _ = runs
    model = make_model(3)
    a, b, c = (_flat(ckpts[i], model) for i in (1, 4, 7))
    u, v = _orthonormal_frame(a, b, c)
    p = dense_plane
    assert p.loss.shape == (5, 6) and p.bits is None
    # the anchors sit where the orthonormal frame puts them
    names = p.anchors
    assert p.points[names[0]][:2] == (0.0, 0.0)
    assert p.points[names[1]].x == pytest.approx(float((b - a).norm()), rel=1e-6)
    assert p.points[names[2]].x == pytest.approx(float((c - a) @ u), rel=1e-5)
    assert p.points[names[2]].y == pytest.approx(float((c - a) @ v), rel=1e-5)
    as_json = json.loads(json.dumps(p.to_dict()))
    assert as_json["points"][names[1]] == p.points[names[1]].to_dict() == p.points[names[1]]._asdict()
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        i, j = int(torch.randint(5, (1,), generator=generator)), int(torch.randint(6, (1,), generator=generator))
        dense = a + p.xs[j] * u + p.ys[i] * v
        got = torch.cat([t.reshape(-1) for t in p.state_dict_at(p.xs[j], p.ys[i]).values()]).double()
        torch.testing.assert_close(got, dense, rtol=0, atol=2e-6)
        plain = make_model(9)
        plain.load_state_dict(_plain_state(dense, model, ckpts[1]))
        torch.optim.swa_utils.update_bn(_data(train), plain)
        loss, acc = evaluate(plain, test)
        assert p.loss[i, j] == pytest.approx(loss, abs=1e-4) and p.error[i, j] == pytest.approx(1 - acc, abs=2e-3)


def test_extra_points_are_projected_with_their_distance(runs, dense_plane):
    _, _, ckpts, _ = runs
    model = make_model(3)
    p = dense_plane
    anchors = [p.points[n] for n in p.anchors]
    swa = p.points["SWA"]  # the mean of the three anchors lies in their plane
    assert swa.x == pytest.approx(sum(q.x for q in anchors) / 3, abs=1e-5)
    assert swa.y == pytest.approx(sum(q.y for q in anchors) / 3, abs=1e-5)
    assert swa.distance < 1e-4
    a, b, c, d = (_flat(ckpts[i], model) for i in (1, 4, 7, 5))
    u, v = _orthonormal_frame(a, b, c)
    off = d - a
    residual = off - (off @ u) * u - (off @ v) * v
    point = p.points["epoch 6"]
    print(f"\nepoch 6 in the plane of epochs 2, 5, 8: ({point.x:.4f}, {point.y:.4f}), distance {point.distance:.4f}")
    assert point.x == pytest.approx(float(off @ u), rel=1e-5) and point.y == pytest.approx(float(off @ v), rel=1e-5)
    assert point.distance == pytest.approx(float(residual.norm()), rel=1e-4) and point.distance > 0.05
    # the grid spans every point with the margin
    assert p.xs[0] < min(q.x for q in p.points.values()) and p.xs[-1] > max(q.x for q in p.points.values())


def test_four_bit_plane_is_the_dense_plane_of_its_dequantised_directions(runs, dense_plane):
    train, test, ckpts, _ = runs
    model = make_model(3)
    p = C.plane(model, [ckpts[1], ckpts[4], ckpts[7]], _data(test), grid=(3, 3), bits=4, bn_data=_data(train))
    a, b, c = (_flat(ckpts[i], model) for i in (1, 4, 7))
    rows = tk.dequantize(p.frame.basis).double()
    # the packed directions are b - a and c - a within the quantisation bound (half a step per group)
    for row, exact in zip(rows, (b - a, c - a)):
        step = (exact.view(-1)[: exact.numel() // 128 * 128].view(-1, 128).aminmax(dim=1))
        bound = ((step.max - step.min) / 15 / 2).repeat_interleave(128)
        assert bool(((row[: bound.numel()] - exact[: bound.numel()]).abs() <= bound + 1e-6).all())
    u, v = _orthonormal_frame(a, a + rows[0], a + rows[1])
    for i, j in ((0, 0), (1, 2), (2, 1), (2, 2), (0, 2)):
        got = torch.cat([t.reshape(-1) for t in p.state_dict_at(p.xs[j], p.ys[i]).values()]).double()
        torch.testing.assert_close(got, a + p.xs[j] * u + p.ys[i] * v, rtol=0, atol=2e-6)
    # at the middle grid point the 4-bit plane's loss is near that of the exact directions' point
    u, v = _orthonormal_frame(a, b, c)
    plain = make_model(9)
    plain.load_state_dict(_plain_state(a + p.xs[1] * u + p.ys[1] * v, model, ckpts[1]))
    torch.optim.swa_utils.update_bn(_data(train), plain)
    exact = evaluate(plain, test)[0]
    print(f"\nmiddle of the 4-bit plane: loss {float(p.loss[1, 1]):.4f}, with exact directions {exact:.4f}")
    assert abs(float(p.loss[1, 1]) - exact) < 0.02


def test_plane_through_a_subspace_slice(runs):
    train, test, ckpts, _ = runs
    model = make_model(3)
    sub = tk.Subspace.from_checkpoints(ckpts[2:7], bits=None, granularity="model", orthonormalize=True,
                                       parameter_names=[n for n, _ in model.named_parameters()])
    p = C.plane(model, sub, _data(test), grid=2, dims=(1, 3), bn_data=_data(train))
    q = tk.dequantize(sub.basis).double()
    for x, y in ((p.xs[0], p.ys[1]), (0.3, -0.2)):
        got = torch.cat([t.reshape(-1) for t in p.state_dict_at(x, y).values()]).double()
        torch.testing.assert_close(got, sub.center.double() + x * q[1] + y * q[3], rtol=0, atol=2e-6)
    assert p.anchors == ["center"] and p.loss.shape == (2, 2)
    # the grid spans the rows' tips either side of the center (it was one point, every loss the center's)
    tip = float(q[1].norm())
    assert p.xs[0] < -tip and p.xs[1] > tip and p.ys[0] < 0 < p.ys[1]
    assert float(p.loss[0, 0]) != float(p.loss[1, 1])


def test_plane_named_errors_and_the_figure(runs, dense_plane, tmp_path):
    _, test, ckpts, _ = runs
    model = make_model(3)
    with pytest.raises(ValueError, match="at least 2 points along each axis"):
        C.plane(model, ckpts[:3], _data(test), grid=(1, 5))
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"grid=\(100000, 100000\) asks for 10,000,000,000"):
        C.plane(model, ckpts[:3], _data(test), grid=100_000)
    with pytest.raises(ValueError, match="exactly 3 checkpoints"):
        C.plane(model, ckpts[:2], _data(test))
    collinear = {k: 2 * ckpts[1][k] - ckpts[0][k] if v.is_floating_point() else v for k, v in ckpts[0].items()}
    with pytest.raises(ValueError, match="collinear"):
        C.plane(model, [ckpts[0], ckpts[1], collinear], _data(test), grid=2)
    bad = dict(ckpts[2])
    bad["3.weight"] = torch.zeros(10, 40)
    with pytest.raises(tk.CheckpointError, match=r"checkpoint #2: key '3.weight' has shape \(10, 40\)"):
        C.plane(model, [ckpts[0], ckpts[1], bad], _data(test), grid=2)
    png = C.plot_plane(dense_plane, tmp_path / "plane.png", points={"epoch 7": ckpts[6]})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in tmp_path.iterdir()] == ["plane.png"]  # no temp file left behind
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"cannot write \.xyz figures"):
        C.plot_plane(dense_plane, tmp_path / "plane.xyz")  # named before drawing, not by matplotlib after
    with pytest.raises(tk.errors.InvalidArgumentError, match="at least one interpolation"):
        C.plot_interpolation({}, tmp_path / "empty.png")  # an empty figure was written
    anchor = dense_plane.anchors[0]  # its dot and label moved to the point's place
    with pytest.raises(tk.errors.InvalidArgumentError, match=f"points: '{anchor}' is already the name"):
        C.plot_plane(dense_plane, tmp_path / "clash.png", points={anchor: ckpts[6]})
    assert [f.name for f in tmp_path.iterdir()] == ["plane.png"]
    # a bad group_size without bits met a ZeroDivisionError; labels must be strings
    with pytest.raises(tk.errors.InvalidArgumentError, match="group_size must be a positive multiple of 8"):
        C.plane(model, ckpts[:3], _data(test), grid=2, group_size=0)
    with pytest.raises(tk.errors.InvalidArgumentError, match="labels must be a list of 3 strings"):
        C.plane(model, ckpts[:3], _data(test), grid=2, labels=[1, 2, 3])
    complex_mask = {"3.weight": torch.ones(10, 48, dtype=torch.complex64)}
    with pytest.raises(tk.errors.InvalidArgumentError, match="complex64; pass a bool mask"):
        C.plane(model, ckpts[:3], _data(test), grid=2, masks=complex_mask)


def test_a_plane_through_the_models_own_state_dict_stays_usable(runs):
    # measuring the plane writes the model's BatchNorm buffers in place, which the live
    # state_dict shares: the origin read as changed, on the next row or at locate()
    train, test, ckpts, _ = runs
    model = make_model(3)
    model.load_state_dict(ckpts[0])
    for bn in ("recompute", "none"):
        live = C.plane(model, [model.state_dict(), ckpts[1], ckpts[2]], _data(test), grid=2, bn=bn,
                       bn_data=_data(train))
        copied = C.plane(model, [copy.deepcopy(ckpts[0]), ckpts[1], ckpts[2]], _data(test), grid=2, bn=bn,
                         bn_data=_data(train))
        assert torch.equal(live.loss, copied.loss)
        assert live.locate(ckpts[3]) == copied.locate(ckpts[3])


@pytest.mark.parametrize("wrap", [torch.nn.DataParallel, lambda m: torch.compile(m, backend="eager")],
                         ids=["DataParallel", "compiled"])
def test_a_wrapped_model_reads_checkpoints_of_the_module_it_wraps(runs, wrap):
    train, test, ckpts, _ = runs
    plain = C.interpolate(make_model(3), ckpts[0], ckpts[1], _data(test), steps=3, bn_data=_data(train))
    wrapped = C.interpolate(wrap(make_model(3)), ckpts[0], ckpts[1], _data(test), steps=3, bn_data=_data(train))
    assert wrapped.loss == plain.loss


def test_a_figure_without_matplotlib_names_the_extra(dense_plane, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.startswith("matplotlib")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(tk.errors.MissingDependencyError, match=r"plot_plane\(\) needs matplotlib.*twa-kernels\[demo\]"):
        C.plot_plane(dense_plane, tmp_path / "plane.png")
    assert not list(tmp_path.iterdir())


def _same_frame(got, want):
    # the same origin and packed bytes; the Gram matrix summed in other chunks, to float64 rounding
    assert torch.equal(got.center(), want.center())
    torch.testing.assert_close(got.chol, want.chol, rtol=1e-12, atol=0)
    for key, value in want.basis.state_dict().items():
        assert torch.equal(got.basis.state_dict()[key], value), key
    for mine, theirs in zip(got.buffers or [], want.buffers or []):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("release", ["madvise", "reopen"])
@pytest.mark.parametrize("bits", [None, 4])
def test_a_plane_from_files_reads_them_in_bounded_chunks(runs, tmp_path, monkeypatch, bits, release):
    """Building a plane and placing a point read each file a chunk of columns at a time, never
    whole, give every mapped page back after its chunk (madvise, or where that is not
    possible by reopening the file), and give the frame built from the state_dicts in
    memory: the same bytes."""
    from safetensors.torch import save_file

    from twa_kernels import builder, columns
    from twa_kernels.geometry import evaluation, planes

    train, test, ckpts, _ = runs
    model = make_model(3)
    files = []
    for i, fmt in ((1, "pt"), (4, "safetensors"), (7, "pt"), (5, "safetensors")):
        files.append(tmp_path / f"e{i}.{fmt}")
        torch.save(ckpts[i], files[-1]) if fmt == "pt" else save_file(ckpts[i], files[-1])
    want, _ = planes._frame_from_checkpoints(model, [ckpts[1], ckpts[4], ckpts[7]], bits, 8, True)
    want_point = want.locate(ckpts[5], "epoch 6")
    # tiny chunks (quantised in 32 columns, read in 96) so that every tensor is cut somewhere,
    # and a mapping budget of 1 KB (a file is ~15 KB) for when pages cannot be given back
    for module in (planes, builder):  # the plane's own passes, and the builder that packs its directions
        monkeypatch.setattr(module, "_CHUNK_GROUPS", 4)
        monkeypatch.setattr(module, "_READ_COLUMNS", 100)
    spans, loads, dropped = [], [], []

    class Spy(columns.ColumnReader):
        def __init__(self, spec, **kwargs):
            super().__init__(spec, **kwargs, resident_bytes=1024)

        def _slice(self, name, a, b):
            spans.append(b - a)
            return super()._slice(name, a, b)

    real_load, real_drop = torch.load, columns._drop_pages

    def load(path, *args, **kwargs):
        loads.append((str(path), kwargs.get("mmap")))
        return real_load(path, *args, **kwargs)

    def drop(view):  # madvise, or as if it were not available
        if release == "reopen" or not real_drop(view):
            return False
        dropped.append(view.numel() * view.element_size())
        return True

    def whole(*args):
        raise AssertionError("a whole checkpoint was loaded")

    monkeypatch.setattr(planes, "ColumnReader", Spy)
    monkeypatch.setattr(evaluation, "load_state_dict", whole)
    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(columns, "_drop_pages", drop)
    got, _ = planes._frame_from_checkpoints(model, files[:3], bits, 8, True)
    point = got.locate(files[3], "epoch 6")
    numel = sum(p.numel() for p in model.parameters())
    print(f"\n{len(spans)} reads of at most {max(spans)} elements ({numel} per checkpoint); "
          f"{len(loads)} mappings of the 2 .pt files, {sum(dropped)} bytes of them given back")
    assert max(spans) <= 96 and sum(spans) >= 4 * numel  # everything read, in chunks
    assert all(mmap for _, mmap in loads)
    mappings = [sum(p == str(f) for p, _ in loads) for f in (files[0], files[2])]
    if release == "madvise":  # each .pt file mapped once, and every range read from it handed back
        assert mappings == [1, 1] and sum(dropped) >= 2 * 4 * numel
    else:  # mapped again and again
        assert min(mappings) >= 5
    _same_frame(got, want)
    assert point == pytest.approx(want_point, rel=1e-9)
    # the public call, end to end, reads the files the same way
    plane = C.plane(model, files[:3], _data(test), grid=2, bits=bits, group_size=8, bn_data=_data(train),
                    points={"epoch 6": files[3]})
    assert plane.points["epoch 6"] == pytest.approx(want_point, rel=1e-9) and max(spans) <= 96


def test_a_checkpoint_plane_reads_its_origin_back_and_steps_along_rows(runs, tmp_path):
    """A plane through checkpoints holds no copy of its origin: it is read back from
    checkpoint a (file, state_dict or DCP directory) for each row, and refused if a changed
    since. Each next point of a row is one in-place reconstruct step; n steps stay within a
    few float32 roundings of the point reconstructed directly."""
    import torch.distributed.checkpoint as dcp

    train, test, ckpts, _ = runs
    model = make_model(3)
    a = {k: v.clone() for k, v in ckpts[1].items()}
    files = [tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"]
    for f, state in zip(files, (a, ckpts[4], ckpts[7])):
        torch.save(state, f)
    dcp.save({"model": a}, checkpoint_id=tmp_path / "a_dcp", no_dist=True)
    planes = []
    for source in (files, [a, ckpts[4], ckpts[7]], [tmp_path / "a_dcp", files[1], files[2]]):
        p = C.plane(model, source, _data(test), grid=(4, 2), bits=4, group_size=8, bn_data=_data(train))
        planes.append(p)
        assert p.frame.origin.tensor is None
        assert torch.equal(p.loss, planes[0].loss)  # a file, a state_dict or a DCP directory: one plane
        direct, start = p.frame.weights((p.xs[3], p.ys[1])), p.frame.weights((p.xs[0], p.ys[1]))
        walked = start.clone()
        for j in range(1, 4):
            p.frame.step(walked, (p.xs[j] - p.xs[j - 1], 0.0))
        # a norm-wise measure: the drift in units of one rounding of the row's largest weight
        scale = torch.finfo(torch.float32).eps * float(torch.maximum(start.abs(), direct.abs()).max())
        drift = float((walked - direct).abs().max()) / scale
        print(f"\nthree steps along a row: within {drift:.2f} roundings (of the largest weight) of the direct sum")
        assert drift <= 8
        torch.testing.assert_close(torch.cat([t.reshape(-1) for t in p.state_dict_at(p.xs[3], p.ys[1]).values()]),
                                   direct, rtol=0, atol=0)
    # a changed origin is refused, not silently used: on disk, and in memory
    torch.save({k: v + 1 for k, v in a.items()}, files[0])
    with pytest.raises(tk.CheckpointError, match="changed since the plane was built"):
        planes[0].state_dict_at(0.0, 0.0)
    files[0].unlink()
    with pytest.raises(tk.CheckpointError, match="can no longer be read"):
        planes[0].state_dict_at(0.0, 0.0)
    next(iter(a.values())).add_(1.0)
    with pytest.raises(tk.CheckpointError, match="changed since the plane was built"):
        planes[1].state_dict_at(0.0, 0.0)  # the plane whose origin is the state_dict a
    with torch.inference_mode():  # tensors made there have no version counter: still a plane
        frozen = {k: v.clone() for k, v in ckpts[1].items()}
    C.plane(model, [frozen, ckpts[4], ckpts[7]], _data(test), grid=2, bn_data=_data(train)).state_dict_at(0.0, 0.0)


def test_column_reader_reads_every_format_alike(tmp_path, caplog):
    """columns.ColumnReader, which planes and sharded subspaces stream checkpoints through: one
    answer from a state_dict, a .pt file, a legacy (non-zip) .pt file, a .safetensors file
    and a torch.distributed.checkpoint directory; tied names and named errors."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from twa_kernels.columns import ColumnReader

    generator = torch.Generator().manual_seed(0)
    state = {"module.a": torch.randn(5, 7, generator=generator), "b": torch.randn(3, generator=generator).double(),
             "s": torch.tensor(2.5), "steps": torch.arange(4), "t": torch.randn(4, 3, generator=generator).T}
    torch.save(state, tmp_path / "x.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "x.safetensors")
    dcp.save({"model": state}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    names, shapes = ["a", "b", "s", "t"], [(5, 7), (3,), (), (3, 4)]  # t: stored non-contiguous in a .pt file
    want = torch.cat([state["module.a"].reshape(-1), state["b"].float(), state["s"].reshape(1), state["t"].reshape(-1)])
    specs = [state, tmp_path / "x.pt", tmp_path / "legacy.pt", tmp_path / "x.safetensors", tmp_path / "dcp"]
    for spec in specs:
        reader = ColumnReader(spec, 2, resident_bytes=16)
        assert sorted(reader.keys()) == ["a", "b", "s", "steps", "t"] and reader.shape("a") == (5, 7)
        # ranges across tensors, read again after their pages were given back
        for start, stop in ((0, 51), (3, 17), (30, 45), (35, 36), (38, 39), (0, 51)):
            assert torch.equal(reader.columns(names, shapes, start, stop), want[start:stop]), (spec, start, stop)
        total = torch.ones(51, dtype=torch.float64)
        reader.columns(names, shapes, 0, 51, out=total, add=True)
        assert torch.equal(total, want.double() + 1)
        assert torch.equal(reader.tensor("b"), state["b"]) and reader.tensor("s").shape == ()
        # a tied weight saved under another of its names
        assert torch.equal(reader.columns(["tied"], [(3,)], 0, 3, {"tied": ["b"]}), want[35:38])
    assert "legacy.pt: not a zip-format torch file" in caplog.text
    assert ColumnReader(state).source == "checkpoint #0"
    bad = dict(state, b=torch.tensor([1.0, float("nan"), float("inf")]).double())
    save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / "bad.safetensors")
    for call in (lambda r: r.columns(names, shapes, 30, 39), lambda r: r.check_finite()):
        with pytest.raises(tk.CheckpointError, match=r"bad.safetensors: key 'b' holds 2 NaN or Inf value\(s\) of 3"):
            call(ColumnReader(tmp_path / "bad.safetensors"))
    with pytest.raises(tk.CheckpointError, match="nope.pt: no such checkpoint file"):
        ColumnReader(tmp_path / "nope.pt")
    with pytest.raises(tk.CheckpointError, match="x.pt: missing key 'q'"):
        ColumnReader(tmp_path / "x.pt").columns(["a", "q"], [(5, 7), (2,)], 0, 37)
    with pytest.raises(tk.CheckpointError, match=r"x.pt: key 'a' has shape \(5, 7\) but the model has \(7, 5\)"):
        ColumnReader(tmp_path / "x.pt").columns(["a"], [(7, 5)], 0, 35)
    with pytest.raises(tk.CheckpointError, match="key 'steps' is torch.int64, not a floating-point weight"):
        ColumnReader(tmp_path / "x.safetensors").columns(["steps"], [(4,)], 0, 4)
    torch.save({"a": torch.ones(2), "why": _NotATensor()}, tmp_path / "objects.pt")
    with pytest.raises(tk.CheckpointError, match="objects.pt: refused"):
        ColumnReader(tmp_path / "objects.pt")


class _NotATensor:
    """A Python object in a checkpoint, which weights_only loading refuses."""


# ---- sharpness -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """A 2,110-parameter tanh MLP in float64 trained to a minimum on digits, its loss on 128
    samples in two batches of unequal size, and the exact Hessian of that loss."""
    import math

    import torch.nn.functional as F
    from torch import nn
    from torch.func import functional_call

    train, _, _ = digits_splits()
    x, y = train.tensors[0].double(), train.tensors[1]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 28), nn.Tanh(), nn.Linear(28, 10)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    data = [(x[:80], y[:80]), (x[80:128], y[80:128])]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(flat):
        params = {n: t.view(s) for n, t, s in zip(names, flat.split([math.prod(s) for s in shapes]), shapes)}
        return F.cross_entropy(functional_call(model, params, (x[:128],)), y[:128])

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return model, data, torch.func.hessian(loss)(flat)


def test_hutchinson_diagonal_matches_the_exact_hessian(tiny):
    import torch.nn.functional as F

    model, data, hessian = tiny
    exact = hessian.diagonal()
    probes = 30000
    estimate = C.hessian_diagonal(model, F.cross_entropy, data, samples=probes, chunk=500, seed=0)
    assert [tuple(t.shape) for t in estimate.values()] == [tuple(p.shape) for p in model.parameters()]
    got = torch.cat([t.reshape(-1) for t in estimate.values()])
    significant = exact.abs() > 1e-3 * exact.abs().mean()  # the rest are zero (pixels that are always 0) or nearly
    relative = ((got - exact).abs() / exact.abs())[significant]
    weighted = float((got - exact).abs().sum() / exact.abs().sum())
    print(f"\nHutchinson, {probes} Rademacher probes, {exact.numel()} parameters: mean relative error per entry "
          f"{float(relative.mean()):.3f} over {int(significant.sum())} entries (median {float(relative.median()):.3f}), "
          f"magnitude-weighted {weighted:.3f}; the other entries within {float((got - exact)[~significant].abs().max()):.1e}")
    assert float(relative.mean()) < 0.10
    assert float((got - exact)[~significant].abs().max()) < 1e-2 * float(exact.abs().mean())


def test_hutchinson_probes_of_one_seed_do_not_depend_on_the_chunk(tiny):
    # the probes were drawn chunk by chunk and tensor by tensor: chunk, documented as a memory
    # setting, changed the estimate of a given seed
    import torch.nn.functional as F

    model, data, _ = tiny
    runs = [C.hessian_diagonal(model, F.cross_entropy, data, samples=12, chunk=chunk, seed=1) for chunk in (12, 5, 1)]
    for run in runs[1:]:
        for key, value in runs[0].items():
            torch.testing.assert_close(run[key], value, rtol=1e-5, atol=1e-7)


def test_top_eigenvalue_names_a_loss_that_is_not_callable_and_data_that_is_a_tensor(tiny):
    import torch.nn.functional as F

    model, data, _ = tiny
    with pytest.raises(tk.errors.InvalidTypeError, match="top_eigenvalue's loss_fn must be a callable"):
        C.top_eigenvalue(model, "cross_entropy", data)
    with pytest.raises(tk.errors.TWAKernelsError, match="top_eigenvalue's data"):
        C.top_eigenvalue(model, F.cross_entropy, torch.randn(4, 64))


def test_power_iteration_finds_the_top_eigenvalue(tiny):
    import torch.nn.functional as F

    model, data, hessian = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = C.top_eigenvalue(model, F.cross_entropy, data, iters=200, tol=1e-6, seed=0)
    top = float(torch.linalg.eigvalsh(hessian)[-1])
    print(f"\npower iteration: {result.value:.6f} after {len(result.trace)} products; eigvalsh: {top:.6f}")
    assert result.converged and result.value == pytest.approx(top, rel=1e-2)
    assert result.trace[-1] == result.value and len(result.trace) > 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_power_iteration_on_a_bfloat16_model_settles_within_its_rounding():
    # the default tol (1e-4) lies below bfloat16's step (2^-7): every run used all its products
    import torch.nn.functional as F

    for seed in (0, 1):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
        x = torch.randn(64, 4)
        data = [(x, (x[:, 0] > 0).long())]
        exact = C.top_eigenvalue(net, F.cross_entropy, data, seed=seed)
        low = C.top_eigenvalue(copy.deepcopy(net).bfloat16(), lambda out, y: F.cross_entropy(out.float(), y),
                               [(x.bfloat16(), data[0][1])], seed=seed)
        assert exact.converged and low.converged, (seed, len(low.trace))
        assert low.value == pytest.approx(exact.value, rel=0.05)


def test_an_integer_parameter_stays_fixed_outside_the_hessian(tiny):
    # requires_grad on it raised torch's "only Tensors of floating point dtype can require gradients"
    import torch.nn.functional as F

    model, data, _ = tiny
    indexed = copy.deepcopy(model)
    indexed.register_parameter("index", torch.nn.Parameter(torch.arange(3), requires_grad=False))
    want = C.top_eigenvalue(model, F.cross_entropy, data, iters=5, seed=0)
    assert C.top_eigenvalue(indexed, F.cross_entropy, data, iters=5, seed=0).value == want.value
    diagonal = C.hessian_diagonal(indexed, F.cross_entropy, data, samples=2, seed=0)
    assert "index" not in diagonal and len(diagonal) == len(list(model.parameters()))


def test_power_iteration_on_a_plus_minus_pair_is_not_called_converged():
    # a zero-initialised deep linear net sits at a saddle whose Hessian has eigenvalues -2 and
    # +2: v swings between them and the Rayleigh quotient stands still at a value in between
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False))
    for p in model.parameters():
        p.data.zero_()
    data = [(torch.ones(4, 1), torch.ones(4, 1))]
    for seed in range(3):
        result = C.top_eigenvalue(model, lambda out, y: ((out - y) ** 2).mean(), data, iters=20, seed=seed)
        assert not result.converged and len(result.trace) == 20, (seed, result.value)


def test_sharpness_seeds_reproduce_and_leave_the_global_rng_alone(tiny):
    import torch.nn.functional as F

    model, data, _ = tiny
    state = torch.get_rng_state()
    diag = C.hessian_diagonal(model, F.cross_entropy, data, samples=4, seed=1)
    top = C.top_eigenvalue(model, F.cross_entropy, data, iters=3, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in
               zip(diag.values(), C.hessian_diagonal(model, F.cross_entropy, data, samples=4, seed=1).values()))
    assert C.top_eigenvalue(model, F.cross_entropy, data, iters=3, seed=1).trace == top.trace
    assert json.loads(json.dumps(top.to_dict())) == dict(value=top.value, trace=top.trace, converged=top.converged)
    torch.manual_seed(3)
    unseeded = C.hessian_diagonal(model, F.cross_entropy, data, samples=4)
    again = C.hessian_diagonal(model, F.cross_entropy, data, samples=4)  # None draws from the global RNG, moving it
    assert not all(torch.equal(a, b) for a, b in zip(unseeded.values(), again.values()))
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in
               zip(unseeded.values(), C.hessian_diagonal(model, F.cross_entropy, data, samples=4).values()))


def test_sharpness_of_a_zero_hessian_and_bad_chunks():
    model = torch.nn.Linear(3, 1)
    data = [(torch.randn(4, 3), torch.zeros(4))]
    linear = lambda out, y: out.sum()  # linear in the parameters: H = 0
    result = C.top_eigenvalue(model, linear, data, iters=5, seed=0)
    assert result.value == 0.0 and result.converged and result.trace == [0.0]
    for chunk in (0, -1, 1.5, True):
        # a non-int is an InvalidTypeError, a small int an InvalidArgumentError: both in the one family
        message = rf"chunk must be an int >= 1 \(probes per vmapped.*{chunk!r}"
        with pytest.raises(tk.errors.TWAKernelsError, match=message):
            C.hessian_diagonal(model, linear, data, samples=4, chunk=chunk)
    with pytest.raises(tk.errors.InvalidTypeError, match="samples must be an int >= 1 .*got bool True"):
        C.hessian_diagonal(model, linear, data, samples=True)
    with pytest.raises(tk.errors.InvalidTypeError, match="iters must be an int >= 1 .*got bool True"):
        C.top_eigenvalue(model, linear, data, iters=True)
    # x = 0: the loss is 4 b^2, a diagonal Hessian that Hutchinson gets exactly, over chunks of 2 and 1
    zeros = [(torch.zeros(4, 3), torch.zeros(4))]
    diag = C.hessian_diagonal(model, lambda out, y: out.square().sum(), zeros, samples=3, chunk=2, seed=0)
    assert float(diag["bias"]) == pytest.approx(8.0) and not diag["weight"].any()
    # a loss that does not depend on the weights read as a zero Hessian, converged
    for loss_fn in (lambda out, y: out.detach().square().sum(), lambda out, y: (out > 0).sum()):
        with pytest.raises(tk.errors.InvalidArgumentError, match="does not depend on the model's weights"):
            C.top_eigenvalue(model, loss_fn, data, iters=5, seed=0)
        with pytest.raises(tk.errors.InvalidArgumentError, match="does not depend on the model's weights"):
            C.hessian_diagonal(model, loss_fn, data, samples=2)


def test_a_constant_plane_of_large_values_is_drawn(dense_plane, tmp_path):
    plane = copy.copy(dense_plane)
    plane.loss = torch.full_like(dense_plane.loss, 1e5)  # its top level plus 1e-12 was no level above it
    assert C.plot_plane(plane, tmp_path / "flat.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kwargs, message", [
    (dict(grid=2.0), "grid must be an int or a pair of ints"),
    (dict(grid=(2, 2, 2)), "grid must be an int or a pair of ints"),
    (dict(grid=2, bits=4, group_size=0), "group_size must be a positive multiple of 8"),
    (dict(grid=2, bits=4, group_size=7), "group_size must be a positive multiple of 8"),
])
def test_plane_names_a_bad_grid_or_group_size(kwargs, message):
    model = torch.nn.Linear(3, 2)
    states = [model.state_dict(), _nudged(model.state_dict(), 1), _nudged(model.state_dict(), 2)]
    with pytest.raises(tk.errors.InvalidArgumentError, match=message):
        C.plane(model, states, [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))], bn="none", **kwargs)



def test_sharpness_names_a_loss_that_is_not_a_scalar_and_stops_at_a_non_finite_product(caplog):
    model = torch.nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))]
    for loss_fn, got in ((lambda out, y: out.square(), r"shape \(4, 2\)"), (lambda out, y: 1.0, "float")):
        with pytest.raises(tk.errors.InvalidArgumentError, match=f"must return the batch's mean loss as a 0-dim "
                                                                 f"tensor, got {got}"):
            C.top_eigenvalue(model, loss_fn, data, iters=3, seed=0)
        with pytest.raises(tk.errors.InvalidArgumentError, match="0-dim tensor"):
            C.hessian_diagonal(model, loss_fn, data, samples=2, seed=0)
    nan_loss = lambda out, y: out.square().sum() * float("nan")
    with caplog.at_level("WARNING", logger="twa_kernels"):
        result = C.top_eigenvalue(model, nan_loss, data, iters=50, seed=0)
    assert math.isnan(result.value) and not result.converged and len(result.trace) == 1  # not 50 products of NaN
    assert "Hessian-vector product is not finite" in caplog.text

@pytest.mark.parametrize("margin, error", [(float("inf"), tk.errors.InvalidArgumentError),
                                           (float("nan"), tk.errors.InvalidArgumentError),
                                           (-0.1, tk.errors.InvalidArgumentError), ("0.2", tk.errors.InvalidTypeError)])
def test_plane_margin_must_be_finite_and_non_negative(margin, error):
    model = make_model(0)
    state = model.state_dict()
    with pytest.raises(error, match=r"margin \(the share of the span .*\) must be a"):
        C.plane(model, [state, state, state], [], margin=margin)


def _small_plane_setup():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    states = [model.state_dict(), _nudged(model.state_dict(), 1), _nudged(model.state_dict(), 2)]
    data = [(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 3)]
    return model, states, data


def test_numpy_numbers_are_taken_for_counts_and_margins():
    np = pytest.importorskip("numpy")
    model, states, data = _small_plane_setup()
    plain = C.plane(model, states, data, grid=2, bn="none", margin=0.2)
    numpy = C.plane(model, states, data, grid=np.int64(2), bn="none", margin=np.float32(0.2))
    torch.testing.assert_close(numpy.loss, plain.loss)
    line = C.interpolate(model, states[0], states[1], data, steps=np.int64(3), bn="none")
    assert line.alphas == [0.0, 0.5, 1.0]
    for steps in (2.0, True, "3"):
        with pytest.raises(tk.errors.InvalidTypeError, match="steps must be an int >= 2"):
            C.interpolate(model, states[0], states[1], data, steps=steps, bn="none")


def test_plane_dims_are_two_integer_rows_of_a_subspace_and_only_of_one():
    model, states, data = _small_plane_setup()
    sub = tk.Subspace.from_checkpoints(states, bits=None, granularity="model", orthonormalize=True)
    for dims, error, message in (((0, 1.7), tk.errors.InvalidTypeError, r"dims\[1\] must be an int"),
                                 ((False, True), tk.errors.InvalidTypeError, r"dims\[0\] must be an int"),
                                 (1, tk.errors.InvalidTypeError, "dims must be a pair of basis rows"),
                                 ((0, 0), tk.errors.InvalidArgumentError, "two different basis rows"),
                                 ((0, 9), tk.errors.InvalidArgumentError, "two different basis rows")):
        with pytest.raises(error, match=message):
            C.plane(model, sub, data, grid=2, bn="none", dims=dims)
    for dims in (torch.tensor([1, 0]), (1, 0)):  # an array of two rows too
        assert C.plane(model, sub, data, grid=2, bn="none", dims=dims).frame.rows == (1, 0)
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"dims=\(1, 2\) picks two rows of a Subspace's basis"):
        C.plane(model, states, data, grid=2, bn="none", dims=(1, 2))


def test_plane_state_dict_at_a_coordinate_float32_cannot_hold_is_named():
    model, states, data = _small_plane_setup()
    p = C.plane(model, states, data, grid=2, bn="none")
    with pytest.raises(tk.errors.InvalidArgumentError, match="a coordinate beyond float32's range"):
        p.state_dict_at(1e39, 0.0)


def test_int32_labels_are_class_ids_like_int64_ones():
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 2])
    expected = C.classification_metric(logits, labels)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        got = C.classification_metric(logits, labels.to(dtype))
        torch.testing.assert_close(got, expected)


def test_lazy_layers_are_named_before_anything_runs():
    model, states, data = _small_plane_setup()
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(6), torch.nn.LazyBatchNorm1d(), torch.nn.ReLU(),
                               torch.nn.Linear(6, 3))
    loss = torch.nn.functional.cross_entropy
    calls = (lambda: C.interpolate(lazy, states[0], states[1], data, steps=2),
             lambda: C.plane(lazy, states, data, grid=2),
             lambda: C.hessian_diagonal(lazy, loss, data, samples=1, seed=0),
             lambda: C.top_eigenvalue(lazy, loss, data, iters=1, seed=0))
    for call in calls:
        with pytest.raises(tk.errors.InvalidArgumentError, match="'0.weight' belongs to a lazy layer.*run one forward"):
            call()


def test_the_statistics_pass_feeds_batches_on_the_models_device():
    """The BatchNorm pass of a line or a plane moves each batch's inputs to the model's
    device, as the evaluation after it does (a GPU model takes a loader's CPU batches)."""
    from twa_kernels.geometry.evaluation import fed_on

    seen = []
    record = lambda *args, **kwargs: seen.append([t.device.type for v in (*args, *kwargs.values())
                                                  for t in (v.values() if isinstance(v, dict) else [v])
                                                  if isinstance(t, torch.Tensor)])
    feed = fed_on(torch.device("meta"))
    x, y = torch.randn(2, 3), torch.zeros(2, dtype=torch.long)
    feed(record, (x, y))
    feed(record, [{"pixels": x, "mask": None}, y])
    feed(record, {"input_ids": x, "labels": y})
    feed(record, x)
    assert seen == [["meta"], ["meta"], ["meta", "meta"], ["meta"]]
    assert x.device.type == "cpu"  # the loader's own batch is not changed

    class Encoding(collections.UserDict):  # a mapping read by attribute, as transformers' BatchEncoding is
        def __getattr__(self, name):
            try:
                return self.data[name]
            except KeyError:
                raise AttributeError(name) from None

    kinds = []
    fed_on(torch.device("cpu"))(lambda inputs: kinds.append((type(inputs), inputs.pixels)), (Encoding(pixels=x), y))
    assert kinds[0][0] is Encoding and kinds[0][1] is x  # on its device already: passed as it is


# ---- transformers models, checkpoint formats and batches --------------------------------------


def _tiny_llama(seed: int = 0):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=50, max_position_embeddings=32)).eval()


def _tiny_gpt2(seed: int = 0, head: str = "GPT2LMHeadModel", **config):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    return getattr(transformers, head)(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50,
                                                               n_positions=32, **config)).eval()


def _lm_metric(outputs, targets):
    return outputs.loss, torch.zeros(())  # the model's own causal-LM loss; no error rate


def _token_batches(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, 50, (2, 3, 8), generator=gen)]


def _nudged(state, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in state.items()}


class _ComplexLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.cfloat))
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head((x.cfloat() @ self.w).abs())


def test_complex_weights_are_mixed_along_a_line_and_named_by_a_plane():
    # interpolate and plane took a complex parameter for an integer one and refused to mix it
    torch.manual_seed(0)
    model, ends = _ComplexLayer(), [_ComplexLayer().state_dict(), _ComplexLayer().state_dict()]
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0])
    r = C.interpolate(model, *ends, [(x, y)], steps=3, bn="none")
    for alpha, loss in zip(r.alphas, r.loss):
        mixed = {k: torch.lerp(ends[0][k], ends[1][k], alpha) for k in ends[0]}
        want = torch.nn.functional.cross_entropy(torch.func.functional_call(model, mixed, (x,)), y)
        assert loss == pytest.approx(float(want), rel=1e-6)
    assert r.loss[1] not in (r.loss[0], r.loss[2])  # the middle point is neither end
    with pytest.raises(tk.errors.CheckpointError, match="complex parameter 'w' differs .*a plane's basis holds real"):
        C.plane(model, [*ends, _ComplexLayer().state_dict()], [(x, y)], grid=2, bn="none")
    # one complex value in every checkpoint (a fixed filter bank) is taken as it is
    alike = [{**end, "w": ends[0]["w"]} for end in (*ends, _ComplexLayer().state_dict())]
    p = C.plane(model, alike, [(x, y)], grid=2, bn="none")
    assert torch.isfinite(p.loss).all()


def test_masks_of_a_compiled_model_apply_to_the_model_it_wraps():
    # prune's masks of a compiled model are keyed "_orig_mod.<name>"; interpolate reads the
    # model unwrapped and refused them as masks of parameters it does not have
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 3))
    a, b = model.state_dict(), {k: v + 1 for k, v in model.state_dict().items()}
    masks = tk.prune.global_magnitude_masks(torch.compile(model), 0.5)
    assert set(masks) == {"_orig_mod.0.weight"}
    data = [(torch.randn(4, 10), torch.tensor([0, 1, 2, 0]))]
    got = C.interpolate(torch.compile(model), a, b, data, steps=2, bn="none", masks=masks)
    plain = {k.removeprefix("_orig_mod."): m for k, m in masks.items()}
    assert got.loss == C.interpolate(model, a, b, data, steps=2, bn="none", masks=plain).loss


def test_buffers_no_state_dict_holds_are_the_models_own():
    model = _tiny_llama()
    non_persistent = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    assert "model.rotary_emb.inv_freq" in non_persistent
    data = _token_batches()
    state = model.state_dict()
    with torch.no_grad():
        want = sum(float(model(**batch).loss) for batch in data) / len(data)
    for bn in ("interpolate", "recompute", "none"):
        r = C.interpolate(model, state, state, data, steps=2, bn=bn, metric=_lm_metric)
        assert r.loss == pytest.approx([want, want], abs=1e-6)
    p = C.plane(model, [state, _nudged(state, 1), _nudged(state, 2)], data, grid=2, bn="interpolate",
                metric=_lm_metric)
    assert torch.isfinite(p.loss).all()


def test_interpolate_reads_lightning_and_wrapped_checkpoints(tmp_path):
    train, test, _ = digits_splits()
    model = make_model(3)
    a, b = make_model(0).state_dict(), make_model(1).state_dict()
    want = C.interpolate(model, a, b, _data(test), steps=3, bn_data=_data(train))
    # a LightningModule holding the network as self.model saves it as model.<name>, beside its own entries
    lightning = tmp_path / "epoch=0-step=10.ckpt"
    torch.save({"epoch": 0, "global_step": 10, "state_dict": {f"model.{k}": v for k, v in a.items()}}, lightning)
    for first, second in ((lightning, {f"module.{k}": v for k, v in b.items()}),
                          ({f"_orig_mod.{k}": v for k, v in a.items()}, tk.save_state_dict(
                              {f"model.{k}": v for k, v in b.items()}, tmp_path / "b.pt"))):
        got = C.interpolate(model, first, second, _data(test), steps=3, bn_data=_data(train))
        assert got.loss == want.loss and got.error == want.error
    # the study's statistics come through the matching too
    got = C.interpolate(model, lightning, b, _data(test), steps=3, bn="interpolate")
    assert got.loss == C.interpolate(model, a, b, _data(test), steps=3, bn="interpolate").loss


def test_tied_weights_under_any_of_their_names_in_checkpoints_and_masks():
    model = _tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    data = _token_batches()
    a, b = model.state_dict(), _nudged(model.state_dict(), 1)
    b["lm_head.weight"] = b["transformer.wte.weight"]
    want = C.interpolate(model, a, b, data, steps=3, metric=_lm_metric)
    # safetensors writers keep one name of a tied weight, which need not be the model's first
    for dropped in ("lm_head.weight", "transformer.wte.weight"):
        one_name = {k: v for k, v in b.items() if k != dropped}
        assert C.interpolate(model, a, one_name, data, steps=3, metric=_lm_metric).loss == want.loss
    mask = torch.rand(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    masked = C.interpolate(model, a, b, data, steps=3, metric=_lm_metric, masks={"transformer.wte.weight": mask})
    assert abs(masked.loss[1] - want.loss[1]) > 1e-3
    for masks in ({"lm_head.weight": mask}, {"lm_head.weight": mask, "transformer.wte.weight": mask.clone()}):
        assert C.interpolate(model, a, b, data, steps=3, metric=_lm_metric, masks=masks).loss == masked.loss
    c = _nudged(a, 2)
    c["lm_head.weight"] = c["transformer.wte.weight"]
    p = C.plane(model, [a, b, c], data, grid=2, metric=_lm_metric, masks={"lm_head.weight": mask})
    assert torch.isfinite(p.loss).all()
    # two copies of one tied weight that differ: the plane read one of them and ignored the other
    untied = dict(b, **{"lm_head.weight": b["lm_head.weight"] + 5})
    for anchors, points in (([a, b, untied], None), ([a, b, c], {"untied": untied})):
        with pytest.raises(tk.errors.CheckpointError, match="one tied weight in the model but differ"):
            C.plane(model, anchors, data, grid=2, metric=_lm_metric, points=points)
    with pytest.raises(tk.errors.InvalidArgumentError, match="masks for 'lm_head.weight' and 'transformer.wte.weight' "
                                                             "differ.*one tied tensor"):
        C.interpolate(model, a, b, data, metric=_lm_metric,
                      masks={"lm_head.weight": mask, "transformer.wte.weight": ~mask})
    with pytest.raises(tk.errors.InvalidArgumentError, match="mask for 'lm_head.bias': the model has no such"):
        C.interpolate(model, a, b, data, metric=_lm_metric, masks={"lm_head.bias": mask[0]})


def test_hugging_face_batches_and_outputs():
    import torch.nn.functional as F

    model = _tiny_gpt2(head="GPT2ForSequenceClassification", num_labels=3, pad_token_id=0)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 50, (4, 8), generator=gen), "labels": torch.randint(0, 3, (4,), generator=gen)}
            for _ in range(2)]
    with torch.no_grad():
        outputs = [model(input_ids=batch["input_ids"]) for batch in data]
    loss = sum(float(F.cross_entropy(o.logits, d["labels"])) for o, d in zip(outputs, data)) / 2
    error = sum(float((o.logits.argmax(1) != d["labels"]).float().mean()) for o, d in zip(outputs, data)) / 2
    assert C.classification_metric(outputs[0], data[0]["labels"])[0] == F.cross_entropy(outputs[0].logits,
                                                                                         data[0]["labels"])
    r = C.interpolate(model, model.state_dict(), model.state_dict(), data, steps=2)
    assert r.loss == pytest.approx([loss, loss], abs=1e-6) and r.error == pytest.approx([error, error], abs=1e-6)
    state = model.state_dict()
    p = C.plane(model, [state, _nudged(state, 1), _nudged(state, 2)], data, grid=2)
    assert ((p.error >= 0) & (p.error <= 1)).all()
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"'labels' tensor is the targets.*\['input_ids'\]"):
        C.interpolate(model, state, state, [{"input_ids": data[0]["input_ids"]}])
    with pytest.raises(tk.errors.InvalidTypeError, match="classification_metric takes logits"):
        C.classification_metric((outputs[0].logits,), data[0]["labels"])
    # sharpness takes the same batches; its loss_fn gets the model's output
    model.config._attn_implementation = "eager"
    diag = C.hessian_diagonal(model, lambda out, y: F.cross_entropy(out.logits, y), data, samples=2, seed=0)
    assert set(diag) == {n for n, _ in model.named_parameters()}


def test_sharpness_names_an_op_without_forward_mode_derivatives():
    import torch.nn.functional as F

    def loss_fn(outputs, targets):
        return outputs.loss

    for model in (_tiny_gpt2(), _tiny_llama()):
        assert model.config._attn_implementation == "sdpa"
        data = _token_batches()[:1]
        with pytest.raises(tk.errors.InvalidArgumentError,
                           match=r"calls _scaled_dot_product_\w+, which has no forward-mode derivative.*"
                                 r"sdpa_kernel\(torch.nn.attention.SDPBackend.MATH\).*_attn_implementation = 'eager'"):
            C.hessian_diagonal(model, loss_fn, data, samples=2)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # the advice works
            assert all(torch.isfinite(d).all() for d in C.hessian_diagonal(model, loss_fn, data, samples=2).values())
        with pytest.raises(tk.errors.InvalidArgumentError, match="no forward-mode derivative"):
            C.top_eigenvalue(model, loss_fn, data, iters=2)
        model.config._attn_implementation = "eager"
        assert torch.isfinite(torch.tensor(C.top_eigenvalue(model, loss_fn, data, iters=2, seed=0).value))

    class Unfinished(torch.nn.Linear):
        def forward(self, x):
            raise NotImplementedError("not written yet")

    with pytest.raises(NotImplementedError, match="not written yet") as caught:  # other ones pass through
        C.hessian_diagonal(Unfinished(3, 2), F.cross_entropy, [(torch.randn(2, 3), torch.zeros(2).long())], samples=2)
    assert not isinstance(caught.value, tk.errors.TWAKernelsError)


# ---- the CLI: `twa connect` and `twa plane` ---------------------------------------------------

USER_PACKAGE = '''
from torch.utils.data import DataLoader
from tests.digits import digits_splits, make_model as _make

def make_model():
    return _make(0)

def train_loader():
    return DataLoader(digits_splits()[0], batch_size=512)

def test_loader():
    return DataLoader(digits_splits()[2], batch_size=512)
'''


@pytest.fixture(scope="module")
def project(runs, tmp_path_factory):
    """A user's package, a config without checkpoints, and checkpoint files."""
    import yaml

    _, _, ckpts, other = runs
    root = tmp_path_factory.mktemp("geometry")
    (root / "geomuser.py").write_text(USER_PACKAGE)
    (root / "config.yaml").write_text(yaml.safe_dump(dict(model="geomuser:make_model", data=dict(
        train="geomuser:train_loader", val="geomuser:test_loader"))))
    paths = {f"e{i + 1}": tk.save_state_dict(state, root / f"e{i + 1}.pt") for i, state in enumerate(ckpts)}
    paths["other"] = tk.save_state_dict(other[-1], root / "other.safetensors")
    return root, paths


def _run_cli(args, root, monkeypatch, capsys):
    from twa_kernels import cli

    monkeypatch.syspath_prepend(str(root))
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_connect_prints_barriers_and_writes_the_plot(project, runs, monkeypatch, capsys):
    root, paths = project
    train, test, ckpts, other = runs
    code, out, err = _run_cli(["connect", str(paths["e8"]), str(paths["other"]), "--config", str(root / "config.yaml"),
                               "--steps", "5", "--out", str(root / "connect.png")], root, monkeypatch, capsys)
    assert code == 0, err
    expected = C.interpolate(make_model(0), ckpts[-1], other[-1], _data(test), steps=5, bn_data=_data(train))
    assert f"barrier: loss {expected.loss_barrier:.4f}" in out and "data.val" in out
    assert (root / "connect.png").read_bytes()[:4] == b"\x89PNG"
    import json

    saved = json.loads((root / "connect.json").read_text())
    assert saved["loss_barrier"] == pytest.approx(expected.loss_barrier, abs=1e-6) and len(saved["alphas"]) == 5
    from twa_kernels._outdir import current_umask

    assert (root / "connect.json").stat().st_mode & 0o777 == 0o666 & ~current_umask()  # as open() gives it
    assert "interpolating" not in err  # no progress bar: standard error is not a terminal


def test_cli_plane_writes_the_contour_with_extra_points(project, monkeypatch, capsys):
    root, paths = project
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # as in a terminal: bars show
    code, out, err = _run_cli(["plane", str(paths["e2"]), str(paths["e5"]), str(paths["e8"]), "--config",
                               str(root / "config.yaml"), "--grid", "4", "3", "--bits", "4", "--point",
                               f"E7={paths['e7']}", "--out", str(root / "plane.png")], root, monkeypatch, capsys)
    assert code == 0, err
    assert "E7" in out and "lowest loss on the grid" in out and "4x3 grid" in out and "4-bit" in out
    assert (root / "plane.png").stat().st_size > 10_000
    assert "plane" in err  # the progress bar
    code, _, err = _run_cli(["plane", str(paths["e2"]), str(paths["e5"]), str(paths["e8"]), "--config",
                             str(root / "config.yaml"), "--grid", "2", "--no-progress", "--out", str(root / "p.png")],
                            root, monkeypatch, capsys)
    assert code == 0 and "plane" not in err


def test_cli_named_errors(project, monkeypatch, capsys):
    root, paths = project
    bad = dict(tk.load_state_dict(paths["e1"]))
    bad["0.weight"] = torch.zeros(40, 64)
    tk.save_state_dict(bad, root / "wrong.pt")
    config = str(root / "config.yaml")
    code, _, err = _run_cli(["connect", str(paths["e1"]), str(root / "wrong.pt"), "--config", config],
                            root, monkeypatch, capsys)
    assert code == 2 and "wrong.pt: key '0.weight' has shape (40, 64) but the model's is (48, 64)" in err
    code, _, err = _run_cli(["plane", str(paths["e1"]), str(paths["e2"]), str(paths["e3"]), "--config", config,
                             "--grid", "1"], root, monkeypatch, capsys)
    assert code == 2 and "at least 2 points along each axis" in err
    code, _, err = _run_cli(["plane", str(paths["e1"]), str(paths["e2"]), str(paths["e3"]), "--config", config,
                             "--point", "SWA"], root, monkeypatch, capsys)
    assert code == 2 and "NAME=PATH" in err
    code, _, err = _run_cli(["connect", str(paths["e1"]), str(root / "missing.pt"), "--config", config],
                            root, monkeypatch, capsys)
    assert code == 2 and "missing.pt: no such checkpoint file" in err


def test_cli_outputs_never_replace_an_input(project, monkeypatch, capsys):
    root, paths = project
    config = root / "config.yaml"
    bare = root / "e1-copy"  # a checkpoint without a suffix: an --out of that name is a PNG of that name
    bare.write_bytes(paths["e1"].read_bytes())
    json_config = root / "settings.json"  # the config, where the JSON beside the figure would go
    json_config.write_text(config.read_text())
    for args in (["connect", str(bare), str(paths["e2"]), "--config", str(config), "--out", str(bare)],
                 ["connect", str(paths["e1"]), str(paths["e2"]), "--config", str(json_config),
                  "--out", str(root / "settings.png")],
                 ["plane", str(paths["e1"]), str(paths["e2"]), str(paths["e3"]), "--config", str(config),
                  "--point", f"X={bare}", "--out", str(bare)]):
        code, _, err = _run_cli(args, root, monkeypatch, capsys)
        assert code == 2 and "which is the input" in err, err
    assert bare.read_bytes() == paths["e1"].read_bytes() and json_config.read_text() == config.read_text()


def test_cli_outputs_never_replace_another_commands_json(project, monkeypatch, capsys):
    # `--out demo/results.png` replaced the demo's results.json with the line's numbers
    root, paths = project
    results = root / "results.json"
    results.write_text('{"seeds": [3], "stamp": {"machine": "x"}}')
    args = ["connect", str(paths["e1"]), str(paths["e2"]), "--config", str(root / "config.yaml"), "--steps", "3"]
    code, _, err = _run_cli([*args, "--out", str(root / "results.png")], root, monkeypatch, capsys)
    assert code == 2 and "which is no record of twa connect or twa plane" in err, err
    assert results.read_text() == '{"seeds": [3], "stamp": {"machine": "x"}}'
    # an earlier line's own JSON is replaced, as the docs say, also one written without a stamp
    import json

    assert _run_cli([*args, "--out", str(root / "line.png")], root, monkeypatch, capsys)[0] == 0
    record = json.loads((root / "line.json").read_text())
    (root / "line.json").write_text(json.dumps({k: v for k, v in record.items() if k != "stamp"}))
    assert _run_cli([*args, "--out", str(root / "line.png")], root, monkeypatch, capsys)[0] == 0


def test_cli_plane_points_need_names_of_their_own(project, monkeypatch, capsys):
    root, paths = project
    common = [str(paths["e1"]), str(paths["e2"]), str(paths["e3"]), "--config", str(root / "config.yaml"),
              "--grid", "2", "--no-progress", "--out", str(root / "named.png")]
    # a point named like an anchor took its place: the origin was reported away from (0, 0)
    code, _, err = _run_cli(["plane", *common, "--point", f"e1={paths['e5']}"], root, monkeypatch, capsys)
    assert code == 2 and "'e1' is already the name of one of the plane's checkpoints" in err
    code, _, err = _run_cli(["plane", *common, "--point", f"A={paths['e5']}", "--point", f"A={paths['e6']}"],
                            root, monkeypatch, capsys)
    assert code == 2 and "--point A= is given twice" in err
    code, _, err = _run_cli(["plane", *common, "--margin", "1e100"], root, monkeypatch, capsys)
    assert code == 2 and "coordinates float32 cannot hold" in err
    assert not (root / "named.png").exists()


def test_cli_takes_a_file_name_that_is_not_utf8_and_names_the_file_system_refusal(project, monkeypatch, capsys):
    root, paths = project
    odd = root / os.fsdecode(b"run\xff.pt")
    odd.write_bytes(paths["e1"].read_bytes())
    code, out, err = _run_cli(["connect", str(odd), str(paths["e2"]), "--config", str(root / "config.yaml"),
                               "--steps", "3", "--no-progress", "--out", str(root / "odd.png")], root, monkeypatch, capsys)
    assert code == 0, err
    assert "run\ufffd -> e2" in out and json.loads((root / "odd.json").read_text())["a"].endswith("run\ufffd.pt")
    code, _, err = _run_cli(["connect", str(paths["e1"]), str(paths["e2"]), "--config", str(root / "config.yaml"),
                             "--out", str(root / ("x" * 300 + ".png"))], root, monkeypatch, capsys)
    assert code == 2 and err.startswith("twa: error: [Errno 36] File name too long")


def test_cli_output_to_a_closed_pipe_writes_the_files_and_ends_quietly(project):
    root, paths = project
    out = root / "piped.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tk.__file__).resolve().parents[1]), str(root)])}
    proc = subprocess.Popen([sys.executable, "-m", "twa_kernels", "connect", str(paths["e1"]), str(paths["e2"]),
                             "--config", str(root / "config.yaml"), "--steps", "3", "--no-progress", "--out",
                             str(out)], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `twa connect ... | head -0`: the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1 and "Traceback" not in err, err
    assert out.read_bytes()[:4] == b"\x89PNG" and json.loads(out.with_suffix(".json").read_text())["alphas"]


def test_plot_plane_leaves_diverged_points_blank_and_refuses_a_plane_with_none_finite(dense_plane, tmp_path):
    plane = copy.copy(dense_plane)
    plane.loss = dense_plane.loss.clone()
    plane.loss[0, 0], plane.loss[-1, -1] = float("nan"), float("inf")
    assert C.plot_plane(plane, tmp_path / "holes.png").read_bytes()[:4] == b"\x89PNG"
    plane.loss = torch.full_like(dense_plane.loss, float("nan"))
    with pytest.raises(tk.errors.InvalidArgumentError, match="every point of the plane has a NaN or infinite loss"):
        C.plot_plane(plane, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_a_diverged_point_is_null_in_the_json_and_named_on_the_command_line(project, monkeypatch, capsys):
    root, paths = project
    huge = {k: v.float() * 1e37 if v.is_floating_point() else v for k, v in tk.load_state_dict(paths["e1"]).items()}
    tk.save_state_dict(huge, root / "huge.pt")  # finite weights whose outputs overflow
    code, out, err = _run_cli(["connect", str(root / "huge.pt"), str(paths["e2"]), "--config",
                               str(root / "config.yaml"), "--steps", "3", "--no-progress", "--out",
                               str(root / "diverged.png")], root, monkeypatch, capsys)
    assert code == 0 and "twa: warning: the loss is NaN or infinite at" in err, err
    saved = (root / "diverged.json").read_text()
    assert "NaN" not in saved and "Infinity" not in saved and None in json.loads(saved)["loss"]
    code, _, err = _run_cli(["connect", str(paths["e1"]), str(paths["e2"]), "--config", str(root)], root,
                            monkeypatch, capsys)
    assert code == 2 and "is a directory, not a config file" in err


REGRESSION_PACKAGE = '''
import torch
from torch import nn

def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1))

def train_batches():
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    return [(x, x.sum(1, keepdim=True))]
'''


def test_a_regression_config_gets_its_loss_and_no_error(tmp_path, monkeypatch, capsys):
    # a custom loss for outputs that are no classifier's logits: every point was refused by
    # the top-1 error count, whose advice (pass a metric of your own) the command line cannot take
    import yaml

    (tmp_path / "regression.py").write_text(REGRESSION_PACKAGE)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(dict(
        model="regression:make_model", data=dict(train="regression:train_batches"),
        loss="torch.nn.functional:mse_loss")))
    monkeypatch.syspath_prepend(str(tmp_path))
    import regression

    paths = []
    for i in range(3):
        model = regression.make_model()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        paths.append(str(tk.save_state_dict(model.state_dict(), tmp_path / f"r{i}.safetensors")))
    config = str(tmp_path / "config.yaml")
    code, out, err = _run_cli(["connect", paths[0], paths[1], "--config", config, "--steps", "3", "--no-progress",
                               "--out", str(tmp_path / "connect.png")], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "the error is not measured, only the loss (classification_metric takes logits [N, C]" in err
    saved = json.loads((tmp_path / "connect.json").read_text())
    assert saved["error"] == [None] * 3 and saved["error_barrier"] is None
    x, y = regression.train_batches()[0]
    model = regression.make_model()
    model.load_state_dict(tk.load_state_dict(paths[0]))
    assert saved["loss"][0] == pytest.approx(float(torch.nn.functional.mse_loss(model(x), y).detach()), rel=1e-5)
    code, out, err = _run_cli(["plane", *paths, "--config", config, "--grid", "2", "--no-progress",
                               "--out", str(tmp_path / "plane.png")], tmp_path, monkeypatch, capsys)
    assert code == 0 and "the error is not measured" in err, err
    code, out, err = _run_cli(["plane", *paths, "--config", config, "--grid", "2", "--no-progress", "--value",
                               "error", "--out", str(tmp_path / "error.png")], tmp_path, monkeypatch, capsys)
    assert code == 2 and "--value error counts the top-1 errors of a classifier" in err and "--value loss" in err
    assert not (tmp_path / "error.png").exists()


def test_a_metric_that_counts_no_errors_says_so_at_every_batch_or_is_refused(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b, c = ({k: v + 0.1 * torch.randn_like(v) for k, v in a.items()} for _ in range(2))
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]

    def no_errors(outputs, targets):
        return torch.nn.functional.cross_entropy(outputs, targets), torch.tensor(float("nan"))

    r = C.interpolate(model, a, b, data, steps=3, bn="none", metric=no_errors)
    assert r.to_dict()["error"] == [None] * 3 and r.to_dict()["error_barrier"] is None
    assert all(math.isfinite(loss) for loss in r.loss)
    # NaN at one batch of three: the other two's errors were lost from the mean unseen
    calls = []

    def sometimes(outputs, targets):
        calls.append(None)
        return torch.nn.functional.cross_entropy(outputs, targets), torch.tensor(float("nan") if len(calls) % 3 == 0 else 0.5)

    with pytest.raises(tk.errors.InvalidArgumentError, match="error is NaN at 1 of 3 batches"):
        C.interpolate(model, a, b, data, steps=2, bn="none", metric=sometimes)
    plane = C.plane(model, [a, b, c], data, grid=2, bn="none", metric=no_errors)
    with pytest.raises(tk.errors.InvalidArgumentError, match="counts no errors .* draw value='loss'"):
        C.plot_plane(plane, tmp_path / "error.png", value="error")


def test_a_mismatched_extra_point_is_named_by_its_file(project, monkeypatch, capsys):
    root, paths = project
    bad = dict(tk.load_state_dict(paths["e1"]))
    bad["0.weight"] = torch.zeros(40, 64)
    tk.save_state_dict(bad, root / "wrong-point.pt")
    code, _, err = _run_cli(["plane", str(paths["e1"]), str(paths["e2"]), str(paths["e3"]), "--config",
                             str(root / "config.yaml"), "--grid", "2", "--no-progress", "--point",
                             f"SWA={root / 'wrong-point.pt'}", "--out", str(root / "wrong-point.png")],
                            root, monkeypatch, capsys)
    assert code == 2 and f"{root / 'wrong-point.pt'}: key '0.weight' has shape (40, 64)" in err, err


def test_a_row_of_logits_holding_nan_or_inf_counts_as_an_error():
    # argmax takes NaN for the largest value: a NaN at the label's index read as right
    logits = torch.tensor([[float("nan"), 0.0], [2.0, 1.0], [float("inf"), 0.0], [0.0, 1.0]])
    loss, error = C.classification_metric(logits, torch.tensor([0, 0, 0, 1]))
    assert error == 0.5 and torch.isnan(loss)



@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0, 3]), r"label 3 is not a class of these 3 logits; labels must lie in \[0, 2\]"),
    (torch.tensor([-100, 1]), r"label -100 is not a class"),
    (torch.tensor([0.0, 1.0]), "labels must be integer class ids, got torch.float32"),
    (torch.tensor([[0], [1]]), r"takes logits \[N, C\] and labels \[N\], got logits \(2, 3\) and labels \(2, 1\)"),
])
def test_labels_that_are_not_classes_of_the_logits_are_named(labels, message):
    # cross_entropy raised a bare IndexError, skipped -100 while argmax counted it wrong,
    # or read a float label as a probability
    with pytest.raises(tk.errors.InvalidArgumentError, match=message):
        C.classification_metric(torch.zeros(2, 3), labels)
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"logits \(2, 3, 4\)"):
        C.classification_metric(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))  # one per position
    model = torch.nn.Linear(4, 3)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.tensor([0, 1, 2, 3] * 2))
    with pytest.raises(tk.errors.InvalidArgumentError, match="label 3 is not a class of these 3 logits"):
        tk.prune.train_classifier(model, data, epochs=1)

class _DivergesAtZero(torch.nn.Module):
    """Logits x * w / w: the inputs themselves, NaN where the weight passes through 0."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.norm = torch.nn.BatchNorm1d(2)

    def forward(self, x):
        return self.norm(x) * self.w / self.w


def test_a_nan_inside_the_path_makes_the_barrier_nan_not_the_rest_of_the_path():
    # Python's max skips NaN: the loss barrier read 0.0 over a diverged midpoint
    x = torch.tensor([[3.0, 0.0], [0.0, 3.0]] * 4)
    data = [(x, torch.tensor([0, 1] * 4)), (x[:0], torch.tensor([], dtype=torch.long))]  # and an empty batch
    model = _DivergesAtZero().eval()
    a = {**model.state_dict(), "w": torch.ones(2)}
    b = {**model.state_dict(), "w": -torch.ones(2)}
    r = C.interpolate(model, a, b, data, steps=3, bn="none")
    assert r.loss[0] == pytest.approx(r.loss[2]) and math.isnan(r.loss[1]) and r.error == [0.0, 1.0, 0.0]
    assert math.isnan(r.loss_barrier) and r.error_barrier == 1.0
    assert json.loads(json.dumps(r.to_dict()))["loss_barrier"] is None


def test_interpolate_leaves_each_submodule_in_the_mode_it_was_in():
    model = _DivergesAtZero().train()
    model.norm.eval()  # a frozen BatchNorm inside a model in train mode
    x = torch.randn(8, 2)
    a = {**model.state_dict(), "w": torch.ones(2)}
    C.interpolate(model, a, {**a, "w": 2 * torch.ones(2)}, [(x, torch.randint(0, 2, (8,)))], steps=2)
    assert model.training and not model.norm.training


def test_plane_and_interpolate_take_a_float64_model_and_refuse_a_meta_one():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ckpts = []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        ckpts.append({k: v.clone() for k, v in model.state_dict().items()})
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    single = C.plane(model, ckpts, [(x, y)], grid=3, bn="none")
    double = C.plane(model.double(), [{k: v.double() for k, v in c.items()} for c in ckpts],
                     [(x.double(), y)], grid=3, bn="none")
    torch.testing.assert_close(double.loss, single.loss, rtol=1e-4, atol=1e-5)
    meta = torch.nn.Sequential(torch.nn.Linear(4, 8, device="meta"), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3, device="meta"))
    with pytest.raises(tk.errors.InvalidArgumentError, match="meta device"):
        C.interpolate(meta, ckpts[0], ckpts[1], [(x, y)])


def test_sharpness_of_mse_loss_equals_that_of_the_same_loss_written_out():
    # torch's forward-over-reverse of F.mse_loss fails ("ZeroTensors are immutable")
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    data = [(torch.randn(8, 3), torch.randn(8, 2)), (torch.randn(4, 3), torch.randn(4, 2))]
    written_out = lambda out, y: ((out - y) ** 2).mean()  # noqa: E731
    got = C.hessian_diagonal(model, F.mse_loss, data, samples=16, seed=1)
    expected = C.hessian_diagonal(model, written_out, data, samples=16, seed=1)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    top = C.top_eigenvalue(model, F.mse_loss, data, seed=1)
    assert top.value == pytest.approx(C.top_eigenvalue(model, written_out, data, seed=1).value, rel=1e-5)


def test_a_batch_without_a_batch_dimension_is_named():
    model = torch.nn.Linear(3, 2)
    a, b = model.state_dict(), {k: v + 0.1 for k, v in model.state_dict().items()}
    with pytest.raises(tk.errors.InvalidArgumentError,
                       match="targets must be a tensor with a batch dimension, got a 0-d"):
        C.interpolate(model, a, b, [(torch.randn(3), torch.tensor(1))], steps=3, bn="none")
    with pytest.raises(tk.errors.InvalidArgumentError, match="got a 0-d"):
        C.hessian_diagonal(model, torch.nn.functional.cross_entropy, [(torch.randn(3), torch.tensor(1))], samples=2)


def test_arguments_of_the_wrong_kind_are_named_before_any_work():
    # data=None, masks as a list, points as a list and loss_fn=None raised bare TypeErrors or
    # AttributeErrors from deep inside
    model = torch.nn.Linear(3, 2)
    a, b, c = (model.state_dict(), {k: v + 0.1 for k, v in model.state_dict().items()},
               {k: v - 0.1 for k, v in model.state_dict().items()})
    data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(tk.errors.InvalidTypeError, match="interpolate's data must be an iterable of"):
        C.interpolate(model, a, b, None, steps=3, bn="none")
    with pytest.raises(tk.errors.InvalidTypeError, match="masks must map parameter names"):
        C.interpolate(model, a, b, data, steps=3, bn="none", masks=[torch.ones(2, 3)])
    with pytest.raises(tk.errors.InvalidTypeError, match="points must map a label to a checkpoint"):
        C.plane(model, [a, b, c], data, grid=2, bn="none", points=[a])
    with pytest.raises(tk.errors.InvalidTypeError, match="loss_fn must be a callable"):
        C.hessian_diagonal(model, None, data, samples=2)


@pytest.mark.parametrize("result", ["per example", "none", "one number"])
def test_a_metric_that_does_not_return_two_numbers_is_named(result):
    # a loss per example, or None, failed in float() with torch's or Python's words
    model = torch.nn.Linear(3, 2)
    a, b = model.state_dict(), {k: v + 0.1 for k, v in model.state_dict().items()}
    metric = {"per example": lambda out, y: (torch.nn.functional.cross_entropy(out, y, reduction="none"), 0.0),
              "none": lambda out, y: None, "one number": lambda out, y: 1.0}[result]
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"must return \(mean loss, error fraction\), two numbers"):
        C.interpolate(model, a, b, [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))], steps=3, bn="none",
                      metric=metric)


class _DictNet(torch.nn.Module):
    """A BatchNorm network whose one argument is a mapping of tensors."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                       torch.nn.Linear(8, 3))

    def forward(self, inputs):
        return self.net(inputs["features"])


def test_batches_whose_inputs_are_a_mapping_feed_it_as_one_argument():
    # ({"features": x}, y) batches failed on dict.to() in the metric pass; update_bn and
    # `twa fit` pass such inputs as one argument, and so does every pass here
    torch.manual_seed(0)
    model = _DictNet()
    a, b = model.state_dict(), {k: v + 0.1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    pairs = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    keyword = [({"features": xb}, yb) for xb, yb in pairs]
    inner = {k.removeprefix("net."): v for k, v in a.items()}, {k.removeprefix("net."): v for k, v in b.items()}
    positional = C.interpolate(model.net, *inner, pairs, steps=3)  # the same network, fed tensors
    by_name = C.interpolate(model, a, b, keyword, steps=3)
    assert by_name.loss == positional.loss and by_name.error == positional.error
    tk.batchnorm.update_bn(keyword, model)
    measured = model.net[1].running_mean.clone()
    tk.batchnorm.update_bn(pairs, model.net)
    assert torch.equal(model.net[1].running_mean, measured)
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"inputs are a list; data must yield \(inputs, targets\) "
                                                            r"batches whose inputs are a tensor or a mapping"):
        C.interpolate(model, a, b, [([1.0, 2.0], y[:2])], steps=3, bn="none")


def test_a_point_whose_batchnorm_statistics_overflow_is_scored_all_wrong_and_its_loss_null():
    # update_bn refuses NaN statistics; along a line such a point is diverged, its error the
    # classifier's at NaN outputs (every row wrong), not null
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {**a, "0.weight": torch.full_like(a["0.weight"], 1e38)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(8, 3) * 100, torch.randint(0, 2, (8,)))]
    result = C.interpolate(model, a, b, data, steps=3, bn="recompute").to_dict()
    assert result["error"][1:] == [1.0, 1.0] and result["loss"][1:] == [None, None]
    assert result["error_barrier"] is not None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_mapping_batch_the_forward_does_not_take_is_named_by_every_pass():
    # {"x": ..., "labels": ...} batches for a forward without `labels` gave a bare TypeError
    # in interpolate, the Hessian passes and train_classifier (update_bn named it)
    import torch.nn.functional as F

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x)

    model = Net()
    state = model.state_dict()
    data = [{"x": torch.randn(4, 3), "labels": torch.randint(0, 2, (4,))}]
    fed = r"fed to the model as keyword arguments \['labels', 'x'\], which its forward does not take"
    for run in (lambda: C.interpolate(model, state, state, data, steps=2),
                lambda: C.hessian_diagonal(model, F.cross_entropy, data, samples=2, seed=0),
                lambda: C.top_eigenvalue(model, F.cross_entropy, data, iters=2, seed=0),
                lambda: tk.prune.train_classifier(model, data, epochs=1)):
        with pytest.raises(tk.errors.InvalidArgumentError, match=fed + ".*yield \\(inputs, targets\\) batches"):
            run()

    class Raising(Net):  # a TypeError raised inside a forward that takes the batch is the model's own
        def forward(self, x, labels=None):
            raise TypeError("inside the forward")

    with pytest.raises(TypeError, match="^inside the forward$"):
        C.interpolate(Raising(), state, state, data, steps=2)


def test_a_model_with_itself_has_no_barrier_even_when_the_batchnorm_data_shuffles():
    # each point's BatchNorm pass drew a new shuffle, so statistics and losses moved along a
    # line from a model to itself
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))
    x, y = torch.randn(96, 6), torch.randint(0, 3, (96,))
    dataset = torch.utils.data.TensorDataset(x, y)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for shuffled in (DataLoader(dataset, batch_size=20, shuffle=True),
                     DataLoader(dataset, batch_size=20, shuffle=True, generator=torch.Generator().manual_seed(1))):
        result = C.interpolate(model, state, state, DataLoader(dataset, batch_size=32), steps=4, bn_data=shuffled)
        assert result.loss_barrier == 0.0 and len(set(result.loss)) == 1, result.loss
        # the evaluation data shuffling too: the same losses summed in another order differed in the last bits
        result = C.interpolate(model, state, state, shuffled, steps=4)
        assert result.loss_barrier == 0.0 and len(set(result.loss)) == 1, result.loss


class _BufferedNet(torch.nn.Module):
    """A net whose forward reads a persistent float buffer, an integer permutation, and a
    BatchNorm layer that its train() keeps in eval mode (a frozen backbone's, norm_eval)."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.frozen_bn = torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.BatchNorm1d(16)
        self.out = torch.nn.Linear(16, 3)
        self.register_buffer("scale", torch.ones(16))
        self.register_buffer("perm", torch.arange(16))

    def forward(self, x):
        h = self.frozen_bn(torch.relu(self.bn(self.fc(x))) * self.scale)
        return self.out(h[:, self.perm])

    def train(self, mode=True):
        super().train(mode)
        self.frozen_bn.eval()
        return self


def _buffered_checkpoint(seed):
    torch.manual_seed(seed)
    state = _BufferedNet().state_dict()
    state.update(scale=torch.rand(16) + 0.5, perm=torch.randperm(16, generator=torch.Generator().manual_seed(7)))
    state.update({"frozen_bn.running_mean": torch.randn(16), "frozen_bn.running_var": torch.rand(16) + 0.5})
    return state


def test_a_point_at_a_checkpoint_has_its_buffers_float_integer_and_frozen_batchnorm():
    # every point took the template model's own float buffers (planes), integer buffers and
    # frozen BatchNorm statistics (both): the point at a checkpoint was not that checkpoint
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    data = [(x[:32], y[:32]), (x[32:], y[32:])]
    a, b, c = (_buffered_checkpoint(seed) for seed in range(3))
    for state in (b, c):  # the same permutation and frozen statistics, as fine-tunes of one backbone keep them
        state.update({k: a[k] for k in ("perm", "frozen_bn.running_mean", "frozen_bn.running_var")})
    own = _BufferedNet()
    own.load_state_dict(a)
    tk.update_bn(data, own)
    own.eval()
    with torch.no_grad():
        want = sum(float(torch.nn.functional.cross_entropy(own(xb), yb)) for xb, yb in data) / 2
    line = C.interpolate(_BufferedNet(), a, b, data, steps=2)
    assert line.loss[0] == pytest.approx(want, abs=1e-6)
    grid = C.plane(_BufferedNet(), [a, b, c], data, grid=2, margin=0.0)
    at_a = [float(grid.loss[i, j]) for i, yv in enumerate(grid.ys) for j, xv in enumerate(grid.xs)
            if abs(xv) < 1e-9 and abs(yv) < 1e-9]
    assert at_a == [pytest.approx(want, abs=1e-5)]
    b["perm"] = torch.arange(16)  # integer buffers cannot be mixed: checkpoints that differ are named
    with pytest.raises(tk.CheckpointError, match=r"checkpoint #1: the integer entry 'perm' .* differs"):
        C.interpolate(_BufferedNet(), a, b, data, steps=2)
    with pytest.raises(tk.CheckpointError, match=r"the integer entry 'perm' .* differs"):
        C.plane(_BufferedNet(), [a, b, c], data, grid=2)


class _IndexedNet(torch.nn.Module):
    """A model with a frozen integer parameter (a column permutation) beside its weights."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)
        self.order = torch.nn.Parameter(torch.arange(5, -1, -1), requires_grad=False)

    def forward(self, x):
        return self.fc(x[:, self.order])


def test_a_plane_holds_an_integer_parameter_fixed_as_interpolate_does():
    # the plane spanned every parameter and refused the integer one as "not a floating-point
    # weight", blaming the checkpoint; interpolate holds it fixed, and now the plane does too
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    data = [(x, y)]
    states = [{k: v + 0.2 * torch.randn_like(v) if v.is_floating_point() else v.clone()
               for k, v in _IndexedNet().state_dict().items()} for _ in range(3)]
    own = _IndexedNet()
    own.load_state_dict(states[0])
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(own(x), y))
    grid = C.plane(_IndexedNet(), states, data, grid=2, margin=0.0, bn="none")
    at_a = [float(grid.loss[i, j]) for i, yv in enumerate(grid.ys) for j, xv in enumerate(grid.xs)
            if abs(xv) < 1e-9 and abs(yv) < 1e-9]
    assert at_a == [pytest.approx(want, abs=1e-5)]
    states[2]["order"] = torch.arange(6)  # an integer parameter cannot be mixed: a differing one is named
    with pytest.raises(tk.CheckpointError, match=r"checkpoint #2: the integer entry 'order' .* differs"):
        C.plane(_IndexedNet(), states, data, grid=2, bn="none")


def test_anchor_labels_are_distinct_and_weights_must_be_floating_point(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,)))]
    paths = []
    for i, run in enumerate(("run_a", "run_b", "run_a")):
        (tmp_path / run).mkdir(exist_ok=True)
        state = {k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}
        paths.append(tk.save_state_dict(state, tmp_path / run / ("final.pt" if i < 2 else "mid.pt")))
    # two runs' final.pt: one anchor took the other's place in the points, the JSON and the figure
    p = C.plane(model, paths, data, grid=2, bn="none")
    assert p.anchors == ["run_a/final", "run_b/final", "mid"] and set(p.points) == set(p.anchors)
    with pytest.raises(tk.errors.InvalidArgumentError, match="names two anchors alike"):
        C.plane(model, paths, data, grid=2, labels=["x", "x", "y"])
    same = [tmp_path / "run_a" / "final.pt"] * 2
    assert checkpoint_labels([*same, {}]) == ["run_a/final #0", "run_a/final #1", "checkpoint #2"]
    ints = {k: v.to(torch.int8) for k, v in model.state_dict().items()}
    with pytest.raises(tk.CheckpointError, match="checkpoint #1: key '0.weight' is torch.int8, not a floating-point"):
        C.interpolate(model, model.state_dict(), ints, data, steps=2)


def test_a_plane_that_extrapolates_variances_below_zero_says_so():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,)))]
    states = []
    for seed in range(3):
        state = {k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in model.state_dict().items()}
        state["1.running_var"] = torch.full((8,), 0.01 if seed else 1.0)
        states.append(state)
    with pytest.warns(UserWarning, match=r"points mix the checkpoints' BatchNorm variances to below zero.*"
                                         r"bn='interpolate' extrapolates"):
        p = C.plane(model, states, data, grid=5, margin=1.0, bn="interpolate")
    assert torch.isnan(p.loss).any() and torch.isfinite(p.loss).any()
    # under bn='recompute' only a layer the model keeps in eval mode is mixed: the warning
    # named bn='recompute' as the cure, already in use
    class FrozenNorm(torch.nn.BatchNorm1d):  # the model keeps it in eval mode, as in fine-tuning
        def train(self, mode: bool = True):
            return super().train(False)

    model[1] = FrozenNorm(8)
    with pytest.warns(UserWarning, match=r"the BatchNorm layers the model keeps in eval mode \(1\) keep statistics "
                                         r"mixed from the checkpoints"):
        C.plane(model, states, data, grid=5, margin=1.0, bn="recompute")


def test_the_state_dict_at_a_grid_point_is_masked_as_the_grids_weights_were():
    # the grid was evaluated with the masks applied, the state_dict_at its best point without them
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,)))]
    states = [{k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    mask = torch.rand(8, 6) > 0.7
    p = C.plane(model, states, data, grid=3, bn="none", masks={"0.weight": mask})
    best = divmod(int(p.loss.argmin()), len(p.xs))
    weights = p.state_dict_at(p.xs[best[1]], p.ys[best[0]])
    assert torch.equal(weights["0.weight"] == 0, ~mask | (weights["0.weight"] == 0))
    assert bool((weights["0.weight"][~mask] == 0).all())
    model.load_state_dict(weights)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(data[0][0]), data[0][1])
    torch.testing.assert_close(loss.double(), p.loss[best], rtol=1e-5, atol=1e-6)


def test_each_pass_replays_the_gpus_random_state_too(monkeypatch):
    # dropout on a GPU draws from the GPU's generator: each point's BatchNorm pass drew other
    # masks; the GPU's state is put back before every pass, as the CPU's is
    from twa_kernels.geometry.evaluation import SameBatches

    gpu = {"state": torch.tensor([1], dtype=torch.uint8)}
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=0: gpu["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=0: gpu.update(state=state.clone()))
    replay = SameBatches([])
    for caller in (5, 6):
        gpu["state"] = torch.tensor([caller], dtype=torch.uint8)  # the caller drew between points
        with replay.replayed():
            seen.append(int(gpu["state"]))
            gpu["state"] = torch.tensor([9], dtype=torch.uint8)  # the pass draws
        assert int(gpu["state"]) == caller  # and the caller's state is as it was
    assert seen == [1, 1]


def test_a_plane_through_save_pretrained_directories(tmp_path):
    # every directory was taken for a DCP one, whose .metadata a save_pretrained folder lacks
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,)))]
    folders = []
    for i in range(3):
        state = {k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()}
        tk.save_state_dict(state, tmp_path / f"finetune-{i}" / "model.safetensors")
        folders.append(tmp_path / f"finetune-{i}")
    from_folders = C.plane(model, folders, data, grid=2, bn="none")
    from_files = C.plane(model, [f / "model.safetensors" for f in folders], data, grid=2, bn="none")
    torch.testing.assert_close(from_folders.loss, from_files.loss)


def test_a_diverged_point_of_a_model_with_a_batchnorm_without_statistics_reads_nan():
    # filling the diverged point's statistics with NaN reached a BatchNorm that holds none
    def net() -> torch.nn.Module:
        torch.manual_seed(0)
        nn = torch.nn
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 4),
                             nn.BatchNorm1d(4), nn.Linear(4, 2))

    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(2)]
    a = net().state_dict()
    b = {k: v.clone() for k, v in a.items()}
    b["2.weight"] *= 1e25  # outputs that overflow: a diverged end
    line = C.interpolate(net(), a, b, data, steps=3)
    assert math.isfinite(line.loss[0]) and math.isnan(line.loss[1]) and math.isnan(line.loss[2])


def test_a_plane_takes_a_folder_of_its_three_checkpoints_and_names_none(tmp_path):
    # a folder's path was split into characters ("exactly 3 checkpoints, got 14"), None was a raw TypeError
    def net() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))

    torch.manual_seed(0)
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    states = [net().state_dict() for _ in range(3)]
    for i, state in enumerate(states):
        torch.save(state, tmp_path / f"epoch_{i}.pt")
    from_folder = C.plane(net(), tmp_path, data, grid=2, progress=False)
    from_list = C.plane(net(), [tmp_path / f"epoch_{i}.pt" for i in range(3)], data, grid=2, progress=False)
    assert torch.equal(from_folder.loss, from_list.loss)
    with pytest.raises(tk.errors.InvalidTypeError, match="checkpoints is None"):
        C.plane(net(), None, data, grid=2)
