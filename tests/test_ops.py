"""project and reconstruct on every backend against the reference (the executable spec)."""

import math

import pytest
import torch

import twa_kernels as tk
from twa_kernels import _ops
from twa_kernels.backends import reference

from tests.conftest import BACKENDS, DEVICE
from tests.helpers import (BITS, SHAPES, assert_one_rounding_of_the_weight, assert_rounded_to_nearest_bfloat16,
                           random_basis, reconstruct_budget)


def _reference_project(qb, g):
    return reference.project(qb.codes, qb.scales, qb.mins, qb.block_offsets, g, qb.bits or 0, qb.group_size)


def _reference_reconstruct(qb, x, center):
    return reference.reconstruct(qb.codes, qb.scales, qb.mins, qb.block_offsets, x, center, qb.bits or 0,
                                 qb.group_size, qb.num_cols)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,d,group_size,blocks", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_matches_reference(backend_name, device, bits, k, d, group_size, blocks, dtype):
    qb = tk.quantize(random_basis(k, d, constant_groups=1, group_size=group_size), bits, group_size, blocks)
    qb = qb.to(device)
    g = torch.randn(d).to(device, dtype)
    y = tk.project(qb, g)
    expected = _reference_project(qb, g)
    assert y.dtype == torch.float32 and y.shape == (k, qb.num_blocks)
    scale = (tk.dequantize(qb).abs() * g.float().abs()).sum(1, keepdim=True)  # error budget per row
    # the spec's budget alone: a relative tolerance on y would hide errors up to 10x it
    torch.testing.assert_close(y, expected, rtol=0, atol=float(scale.max()) * 1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,d,group_size,blocks", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_center", [True, False])
def test_reconstruct_matches_reference(backend_name, device, bits, k, d, group_size, blocks, dtype, with_center):
    qb = tk.quantize(random_basis(k, d, constant_groups=1, group_size=group_size), bits, group_size, blocks)
    qb = qb.to(device)
    x = torch.randn(k, qb.num_blocks).to(device, dtype)
    center = torch.randn(d).to(device, dtype) if with_center else None
    w = tk.reconstruct(qb, x, center)
    expected = _reference_reconstruct(qb, x, center)
    assert w.dtype == (dtype if with_center else torch.float32) and w.shape == (d,)
    budget = reconstruct_budget(qb, x)
    if w.dtype == torch.bfloat16:  # the spec's float result, rounded to the nearest bfloat16
        assert_rounded_to_nearest_bfloat16(w, _reference_reconstruct(qb, x.float(), center.float()), budget)
    else:  # the budget plus one rounding of the weight, not a relative tolerance that hides more
        assert_one_rounding_of_the_weight(w, expected, budget)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,d,group_size,blocks", [SHAPES[1], SHAPES[3], SHAPES[5]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_pieces_is_project_of_the_concatenation(backend_name, device, bits, k, d, group_size, blocks, dtype):
    # pieces of every length, empty ones included, cutting groups and blocks anywhere
    qb = tk.quantize(random_basis(k, d, constant_groups=1, group_size=group_size), bits, group_size, blocks)
    qb = qb.to(device)
    g = torch.randn(d).to(device, dtype)
    gen = torch.Generator().manual_seed(d)
    cuts = sorted(torch.randint(0, d + 1, (6,), generator=gen).tolist())
    sizes = [b - a for a, b in zip([0, 0, *cuts], [0, *cuts, d])]
    args = (qb.codes, qb.scales, qb.mins, qb.block_offsets)
    y = _ops.project_pieces_op(*args, list(g.split(sizes)), qb.bits or 0, qb.group_size)
    torch.testing.assert_close(y, tk.project(qb, g), rtol=0, atol=0)  # the same sums in the same order
    # and gradients through it reach every piece
    pieces = [p.clone().requires_grad_() for p in g.float().split(sizes)]
    upstream = torch.randn(k, qb.num_blocks, device=device)
    _ops.project_pieces_op(*args, pieces, qb.bits or 0, qb.group_size).backward(upstream)
    torch.testing.assert_close(torch.cat([p.grad for p in pieces]), tk.reconstruct(qb, upstream), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,d,group_size,blocks", SHAPES[1::2])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_reconstruct_into_out_casts_as_it_stores(backend_name, device, bits, k, d, group_size, blocks, out_dtype):
    """out= writes the result in out's dtype from a float32 center (a bfloat16 model's weights)."""
    qb = tk.quantize(random_basis(k, d, constant_groups=1, group_size=group_size), bits, group_size, blocks)
    qb = qb.to(device)
    x, center = torch.randn(k, qb.num_blocks, device=device), torch.randn(d, device=device)
    out = torch.full((d,), float("nan"), dtype=out_dtype, device=device)
    w = tk.reconstruct(qb, x, center, out=out)
    assert w.data_ptr() == out.data_ptr() and w.dtype == out_dtype
    expected = _reference_reconstruct(qb, x, center)  # float32
    budget = reconstruct_budget(qb, x)
    if out_dtype == torch.bfloat16:  # one round-to-nearest of the float32 result
        assert_rounded_to_nearest_bfloat16(out, expected, budget)
    else:
        assert_one_rounding_of_the_weight(out, expected, budget)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [16, 40])
def test_reconstruct_rounds_the_rows_terms_at_their_own_size_not_the_centers(backend_name, device, bits, k):
    """The spec sums center + sum_r p^ x and rounds once: a kernel that started from a large
    center rounded each row's term at the weight's size (k = 16 rows on a center near 100
    came to hundreds of times the terms' budget). Allowed: the terms' budget plus one
    rounding of the weight."""
    d, blocks = 4099, [1000, 3099]  # a cut group and a short last one take the row-by-row path
    qb = tk.quantize(random_basis(k, d, constant_groups=1, group_size=128), bits, 128, blocks).to(device)
    x = 1e-2 * torch.randn(k, qb.num_blocks, device=device)
    center = 100 * torch.randn(d, device=device)
    w = tk.reconstruct(qb, x, center)
    expected = _reference_reconstruct(qb, x, center)
    budget = reconstruct_budget(qb, x)
    assert_one_rounding_of_the_weight(w, expected, budget)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,d,group_size,blocks", SHAPES[1::2])
def test_reconstruct_in_place_on_its_own_center(backend_name, device, bits, k, d, group_size, blocks):
    """out may be center itself (every backend reads an element of center before it writes
    that element of out): what a loss plane's grid sweep relies on to step in place."""
    qb = tk.quantize(random_basis(k, d, constant_groups=1, group_size=group_size), bits, group_size, blocks)
    qb = qb.to(device)
    x, center = torch.randn(k, qb.num_blocks, device=device), torch.randn(d, device=device)
    expected = tk.reconstruct(qb, x, center)
    weights = center.clone()
    with torch.no_grad():
        got = tk.reconstruct(qb, x, weights, out=weights)
    assert got.data_ptr() == weights.data_ptr()
    assert torch.equal(weights, expected)


@pytest.mark.parametrize("int8_gradients", [False, True])
def test_reconstruct_pieces_gives_the_ops_views_and_gradient(backend_name, device, int8_gradients):
    """TWA's forward (ops.reconstruct_pieces) calls the kernels without the ops' dispatch on
    plain tensors: its views are out's consecutive elements in every shape, scalars and
    empty tensors included, wherever out starts in its storage, and its backward gives the
    coefficients what the public ops give."""
    shapes = [(3, 5), (), (0,), (7,), (2, 1, 3, 4), (0, 3), (129,)]
    sizes = [math.prod(shape) for shape in shapes]
    d = sum(sizes)
    qb = tk.quantize(random_basis(4, d, constant_groups=1, group_size=32), 4, 32, [20, 1, d - 21]).to(device)
    x = torch.randn(4, qb.num_blocks, device=device, requires_grad=True)
    center = torch.randn(d, device=device)
    storage = torch.full((d + 13,), float("nan"), device=device)
    out = storage[13:]  # starts 13 elements into its storage
    pieces = tk.ops.reconstruct_pieces(qb, x, center, out, shapes, int8_gradients=int8_gradients)
    assert [tuple(p.shape) for p in pieces] == shapes
    assert all(p.is_contiguous() and p.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
               for p in pieces)
    expected = tk.reconstruct(qb, x.detach(), center)
    assert torch.equal(out, expected)
    assert torch.equal(torch.cat([p.reshape(-1) for p in pieces]), expected)
    upstream = [torch.randn(shape, device=device) for shape in shapes]
    torch.autograd.backward([p for p in pieces if p.numel()], [u for u in upstream if u.numel()])
    g = torch.cat([u.reshape(-1) for u in upstream])
    want = tk.project_int8(qb, g) if int8_gradients else tk.project(qb, g)
    assert torch.equal(x.grad, want)


def test_reconstruct_pieces_refuses_shapes_that_do_not_fill_out():
    # views cut with as_strided reached past out's end into the rest of its storage
    qb = tk.quantize(random_basis(2, 300, constant_groups=1, group_size=32), 4, 32)
    storage = torch.zeros(400)
    x = torch.zeros(2, 1, requires_grad=True)
    for shapes in ([(10, 31)], [(299,)], [(-1,)]):
        with pytest.raises(tk.errors.InvalidArgumentError, match="shapes hold .* elements but out has 300"):
            tk.ops.reconstruct_pieces(qb, x, torch.zeros(300), storage[:300], shapes)


def test_a_dispatch_mode_sees_twas_ops():
    """A TorchDispatchMode (a FLOP counter, make_fx, a logger) is shown TWA's custom ops, as
    tensor subclasses and tracing are, not the kernels they call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    checkpoints = [{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    twa = tk.TWA(model, checkpoints, bits=4)
    with Seen() as seen:
        twa(torch.randn(3, 6)).sum().backward()
    assert {"twa_kernels.reconstruct_into", "twa_kernels.project_pieces"} <= seen.ops
    assert not any(op.startswith("twa_kernels_cpu.") for op in seen.ops)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_runs_of_groups_match_reference(monkeypatch, bits, threads):
    """The C++ kernels visit whole groups in runs (of up to 4096 columns in reconstruct,
    32768 in project, which flushes its float32 lane sums every 32 groups): runs that reach
    the caps, that a block edge, a one-column block or the split between threads cuts short,
    must add up as the reference, and project's runs over g given in pieces (gathered where a
    run spans two) must give the same sums as over g in one piece."""
    monkeypatch.setenv("TWA_KERNELS_BACKEND", "cpp")
    # group 64: 203 whole groups, then an edge inside a group, a one-column block, and a block
    # of 1,203 groups (two whole project runs and a part at one thread)
    d, blocks = 90_000, [13_000, 1, 76_999]
    qb = tk.quantize(random_basis(5, d, constant_groups=1, group_size=64), bits, 64, blocks)
    g, center, x = torch.randn(d), torch.randn(d), torch.randn(5, qb.num_blocks)
    pieces = list(g.split([40_000, 1, 9_999, 33_000, 7_000]))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, w = tk.project(qb, g), tk.reconstruct(qb, x, center)
        y_pieces = _ops.project_pieces_op(qb.codes, qb.scales, qb.mins, qb.block_offsets, pieces, bits, 64)
        w_in_place = center.clone()
        tk.reconstruct(qb, x, w_in_place, out=w_in_place)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(y_pieces, y)
    torch.testing.assert_close(y, _reference_project(qb, g), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(w, _reference_reconstruct(qb, x, center), rtol=1e-5, atol=1e-4)
    assert torch.equal(w_in_place, w)


def _dense_reconstruct(P, offsets, x, center):
    """reconstruct written with plain differentiable torch ops."""
    blocks = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=offsets.device), offsets.diff())
    return center + (P * x[:, blocks]).sum(0)


@pytest.mark.parametrize("bits", [None, 4])
def test_gradients_equal_dense_autograd(backend_name, device, bits):
    qb = tk.quantize(torch.randn(5, 301), bits, 64, [100, 1, 200]).to(device)
    x = torch.randn(5, 3, device=device, requires_grad=True)
    center = torch.randn(301, device=device, requires_grad=True)
    upstream = torch.randn(301, device=device)
    tk.reconstruct(qb, x, center).backward(upstream)
    x_ref = x.detach().clone().requires_grad_()
    c_ref = center.detach().clone().requires_grad_()
    _dense_reconstruct(tk.dequantize(qb), qb.block_offsets, x_ref, c_ref).backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(center.grad, c_ref.grad)


def test_project_gradient_is_reconstruct(backend_name, device):
    qb = tk.quantize(torch.randn(3, 200), 2, 32, [50, 150]).to(device)
    g = torch.randn(200, device=device, requires_grad=True)
    upstream = torch.randn(3, 2, device=device)
    tk.project(qb, g).backward(upstream)
    torch.testing.assert_close(g.grad, tk.reconstruct(qb, upstream), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "vmap of grad", "grad of vmap", "grad into out"])
def test_torch_func_reverse_transforms_are_refused_naming_what_works(transform):
    # torch's own error spoke of autograd.Function's setup_context, which the user never wrote
    qb = tk.quantize(torch.randn(3, 64), bits=4, group_size=16)
    project = lambda g: tk.project(qb, g).sum()  # noqa: E731
    calls = {"grad": lambda: torch.func.grad(project)(torch.randn(64)),
             "jacrev": lambda: torch.func.jacrev(lambda x: tk.reconstruct(qb, x))(torch.randn(3, 1)),
             "grad into out": lambda: torch.func.grad(lambda x: tk.reconstruct(qb, x, out=torch.empty(64)).sum())(
                 torch.randn(3, 1)),
             "vmap of grad": lambda: torch.func.vmap(torch.func.grad(project))(torch.randn(2, 64)),
             "grad of vmap": lambda: torch.func.grad(lambda g: torch.func.vmap(project)(g).sum())(torch.randn(2, 64))}
    with pytest.raises(tk.errors.UsageError, match="reverse-mode transforms.*torch.autograd.grad"):
        calls[transform]()
    # a call whose inputs the transform does not differentiate runs inside it, as before
    w, g = torch.randn(3, 1), torch.randn(64)
    torch.testing.assert_close(torch.func.grad(lambda w: (w * tk.project(qb, g)).sum())(w), tk.project(qb, g))


@pytest.mark.parametrize("bits", [None, 4])
def test_forward_mode_tangents_equal_dense_forward_mode(backend_name, device, bits):
    # torch gives a custom op without a forward-mode formula a zero tangent without a word;
    # the wrappers carry the tangents of these linear ops themselves
    import torch.autograd.forward_ad as fwAD

    qb = tk.quantize(torch.randn(5, 301), bits, 64, [100, 1, 200]).to(device)
    P = tk.dequantize(qb)
    x, x_dot = torch.randn(5, 3, device=device), torch.randn(5, 3, device=device)
    c, c_dot = torch.randn(301, device=device), torch.randn(301, device=device)
    g, g_dot = torch.randn(301, device=device), torch.randn(301, device=device)
    spans = list(zip(qb.block_offsets[:-1].tolist(), qb.block_offsets[1:].tolist()))
    _, y_dot = torch.func.jvp(lambda g: tk.project(qb, g), (g,), (g_dot,))
    _, y_dot_dense = torch.func.jvp(lambda g: torch.stack([(P[:, a:b] * g[a:b]).sum(1) for a, b in spans], 1),
                                    (g,), (g_dot,))
    torch.testing.assert_close(y_dot, y_dot_dense, rtol=1e-5, atol=1e-5)
    for tangents in ((x_dot, c_dot), (x_dot, torch.zeros_like(c)), (torch.zeros_like(x), c_dot)):
        _, w_dot = torch.func.jvp(lambda x, c: tk.reconstruct(qb, x, c), (x, c), tangents)
        _, w_dot_dense = torch.func.jvp(lambda x, c: _dense_reconstruct(P, qb.block_offsets, x, c), (x, c), tangents)
        torch.testing.assert_close(w_dot, w_dot_dense, rtol=1e-5, atol=1e-5)
    _, w_dot_dense = torch.func.jvp(lambda x: _dense_reconstruct(P, qb.block_offsets, x, c), (x,), (x_dot,))
    with fwAD.dual_level():  # the other forward-mode API, a tangent on one input only
        w = tk.reconstruct(qb, fwAD.make_dual(x, x_dot), c)
        torch.testing.assert_close(fwAD.unpack_dual(w).tangent, w_dot_dense, rtol=1e-5, atol=1e-5)


def test_forward_mode_is_refused_where_no_tangent_is_carried():
    import torch.autograd.forward_ad as fwAD

    qb = tk.quantize(torch.randn(3, 64), 4, 8)
    with fwAD.dual_level():
        g = fwAD.make_dual(torch.randn(64), torch.randn(64))
        with pytest.raises(tk.errors.UsageError, match="not differentiable"):
            tk.project_int8(qb, g)
        x = fwAD.make_dual(torch.randn(3, 1), torch.randn(3, 1))
        with pytest.raises(tk.errors.UsageError, match="without out"):
            tk.reconstruct(qb, x, out=torch.empty(64))


def test_forward_over_reverse_gives_the_hessian_vector_product():
    # a create_graph=True backward under forward-mode AD handed the ops' backward formulas
    # dual gradients, and torch raised "You must implement the jvp function"
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    qb = tk.quantize(torch.randn(3, 64), 4, 8)
    P = tk.dequantize(qb)
    v, u = torch.randn(3, 1), torch.randn(64)
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(3, 1).requires_grad_(), v)
        (gx,) = torch.autograd.grad((tk.reconstruct(qb, x) ** 2).sum(), x, create_graph=True)
        torch.testing.assert_close(fwAD.unpack_dual(gx).tangent[:, 0], 2 * P @ P.T @ v[:, 0], rtol=1e-4, atol=1e-4)
        g = fwAD.make_dual(torch.randn(64).requires_grad_(), u)
        (gg,) = torch.autograd.grad((tk.project(qb, g) ** 2).sum(), g, create_graph=True)
        torch.testing.assert_close(fwAD.unpack_dual(gg).tangent, 2 * P.T @ (P @ u), rtol=1e-4, atol=1e-4)
    forward = torch.autograd.functional.hessian(lambda x: (tk.reconstruct(qb, x) ** 2).sum(), torch.randn(3, 1),
                                                vectorize=True, outer_jacobian_strategy="forward-mode")
    torch.testing.assert_close(forward.reshape(3, 3), 2 * P @ P.T, rtol=1e-4, atol=1e-4)


def test_nested_forward_mode_is_refused_rather_than_dropping_the_outer_tangent():
    # the wrappers unpacked the innermost level only: jacfwd(jacfwd(f)) gave a zero Hessian
    from torch.func import jacfwd, jvp, vmap

    qb = tk.quantize(torch.randn(3, 64), 4, 8)
    P = tk.dequantize(qb)
    x, t = torch.randn(3, 1), torch.randn(3, 1)
    with pytest.raises(tk.errors.UsageError, match="nested forward-mode transforms"):
        jacfwd(jacfwd(lambda x: (tk.reconstruct(qb, x) ** 2).sum()))(x)
    with pytest.raises(tk.errors.UsageError, match="nested forward-mode transforms"):
        jvp(lambda g: jvp(lambda g: tk.project(qb, g), (g,), (g,))[1], (P[0],), (P[1],))
    with pytest.raises(tk.errors.UsageError, match="put vmap outside"):
        jvp(vmap(lambda x: tk.reconstruct(qb, x)), (x[None],), (t[None],))
    with pytest.raises(tk.errors.UsageError, match=r"out=\.\.\.\) writes into out in place, which torch.vmap"):
        vmap(lambda x: tk.reconstruct(qb, x, out=torch.empty(64)))(x[None])
    # what the messages point to works: reverse over one level, and vmap outside
    hessian = torch.autograd.functional.hessian(lambda x: (tk.reconstruct(qb, x) ** 2).sum(), x)
    torch.testing.assert_close(hessian.reshape(3, 3), 2 * P @ P.T, rtol=1e-4, atol=1e-4)
    tangents = vmap(lambda x, t: jvp(lambda x: tk.reconstruct(qb, x), (x,), (t,))[1])(x[None], t[None])
    torch.testing.assert_close(tangents[0], P.T @ t[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [None, 1, 8])
def test_gradcheck_reconstruct(backend_name, device, bits):
    qb = tk.quantize(torch.randn(3, 45), bits, 16, [20, 25]).to(device)
    x = torch.randn(3, 2, device=device, requires_grad=True)
    center = torch.randn(45, device=device, requires_grad=True)
    # float32 ops: reconstruct is linear, so wide finite differences are exact up to rounding
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(lambda x, c: tk.reconstruct(qb, x, c), (x, center), eps=1e-2, atol=1e-3,
                                        rtol=1e-3)


def _op_samples(device):
    qb = tk.quantize(torch.randn(4, 130), 4, 64, [30, 100]).to(device)
    dense = tk.quantize(torch.randn(2, 70), None).to(device)
    g = torch.randn(130, device=device, requires_grad=True)
    x = torch.randn(4, 2, device=device, requires_grad=True)
    center = torch.randn(130, device=device, requires_grad=True)
    parts = (qb.codes, qb.scales, qb.mins, qb.block_offsets)
    dparts = (dense.codes, dense.scales, dense.mins, dense.block_offsets)
    return [
        (_ops.project_op, (*parts, g, 4, 64)),
        (_ops.project_op, (*dparts, torch.randn(70, device=device), 0, 128)),
        (_ops.reconstruct_op, (*parts, x, center, 4, 64, 130)),
        (_ops.reconstruct_op, (*parts, x, None, 4, 64, 130)),
        (_ops.reconstruct_op, (*dparts, torch.randn(2, 1, device=device),
                               torch.randn(70, device=device).bfloat16(), 0, 128, 70)),
        (_ops.gram_op, (torch.randn(3, 90, device=device),)),
        (_ops.combine_rows_op, (torch.randn(2, 3, dtype=torch.float64, device=device),
                                torch.randn(3, 90, device=device))),
        (_ops.reconstruct_into_op, (*parts, x.detach(), center.detach(), 4, 64,
                                    torch.empty(130, dtype=torch.bfloat16, device=device))),
        (_ops.project_pieces_op, (*parts, list(torch.randn(130, device=device).split([0, 50, 65, 15])), 4, 64)),
        (_ops.project_int8_op, (*parts, list(torch.randn(130, device=device).split([50, 80])), 4, 64)),
    ]


@pytest.mark.parametrize("case", range(10))
def test_opcheck(backend_name, device, case):
    op, args = _op_samples(device)[case]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_runs_project_and_reconstruct(backend_name, device):
    qb = tk.quantize(torch.randn(4, 300), 4, 64, [100, 200]).to(device)
    center = torch.randn(300, device=device)

    def step(x, g):
        return tk.reconstruct(qb, x - 0.1 * tk.project(qb, g), center)

    x, g = torch.randn(4, 2, device=device), torch.randn(300, device=device)
    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(x, g), step(x, g))


def test_bad_inputs_are_named():
    qb = tk.quantize(torch.randn(3, 50), 4, 16, [20, 30])
    with pytest.raises(ValueError, match="1-D with 50 elements"):
        tk.project(qb, torch.randn(5, 10))
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        tk.project(qb, torch.randn(50).half())
    with pytest.raises(ValueError, match=r"\[3, 2\]"):
        tk.reconstruct(qb, torch.randn(3, 1))
    with pytest.raises(ValueError, match="center must be 1-D"):
        tk.reconstruct(qb, torch.randn(3, 2), torch.randn(49))


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("TWA_KERNELS_BACKEND", raising=False)
    assert tk.backend("cpu") == "cpp"
    monkeypatch.setenv("TWA_KERNELS_BACKEND", "reference")
    assert tk.backend("cpu") == "reference"
    monkeypatch.setenv("TWA_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="not one of"):
        tk.backend("cpu")
    monkeypatch.setenv("TWA_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cannot run cpu tensors"):
        tk.backend("cpu")
    monkeypatch.setenv("TWA_KERNELS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tk.backend("cpu")


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for one test: selects two-pass reductions."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("bits", [None, 1, 4])
def test_deterministic_mode_is_reproducible_and_exact(backend_name, device, deterministic_algorithms, bits):
    # Many tiles per block, block edges inside tiles, and a short last group.
    qb = tk.quantize(random_basis(6, 20005), bits, 64, [7000, 1, 13004]).to(device)
    g = torch.randn(20005, device=device)
    first, second = tk.project(qb, g), tk.project(qb, g)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, _reference_project(qb, g), rtol=1e-5, atol=1e-4)
    P = random_basis(5, 20005).to(device)
    assert torch.equal(_ops.gram_op(P), _ops.gram_op(P))
    torch.testing.assert_close(_ops.gram_op(P), reference.gram(P), rtol=1e-12, atol=1e-9)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend does not run here")
def test_triton_names_a_group_wider_than_its_tiles(monkeypatch):
    # a group is one tile's row: wide ones failed deep in Triton's compiler, or compiled for minutes
    monkeypatch.setenv("TWA_KERNELS_BACKEND", "triton")
    qb = tk.quantize(torch.randn(2, 3 * 8192, device=DEVICE), bits=4, group_size=8192)
    with pytest.raises(tk.errors.InvalidArgumentError, match="group_size must be at most 4096, got 8192"):
        tk.project(qb, torch.randn(3 * 8192, device=DEVICE))
