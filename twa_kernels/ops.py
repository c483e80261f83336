"""The public ops: thin, documented wrappers that check their inputs and call _ops."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters  # imported by torch already

from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, UsageError
from twa_kernels._ops import ReconstructInto, ReconstructPieces, project_int8_op, project_op, reconstruct_op
from twa_kernels._ops import _check_vector as _check_operand
from twa_kernels.quant import QuantizedBasis, _is_traced

_FLOAT_INPUTS = (torch.float32, torch.bfloat16)


def _check_basis(qb: QuantizedBasis) -> None:
    if not isinstance(qb, QuantizedBasis):
        raise InvalidTypeError(f"the basis must be a tk.QuantizedBasis, got {type(qb).__name__}; make one with "
                               "tk.quantize(P, bits) (bits=None keeps it dense)")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (qb.codes, qb.scales, qb.mins)):
        # the ops differentiate in g, x and the center only: a basis tensor left requiring grad
        # would silently get none
        raise InvalidArgumentError("the basis's tensors require grad, but these ops give the basis no gradient "
                                   "(only g, x and the center get one); build it from detached tensors, or train "
                                   "a dense basis with plain torch on tk.dequantize(qb)")


def _check_dense(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise InvalidTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:  # the kernels read a dense array of values
        raise InvalidArgumentError(f"{name} is a {t.layout} tensor; the kernels take dense ones: pass "
                                   f"{name}.to_dense()")


def _check_vector(name: str, t: Tensor, qb: QuantizedBasis) -> None:
    _check_dense(name, t)
    if t.dim() != 1 or t.numel() != qb.num_cols:
        raise InvalidArgumentError(f"{name} must be 1-D with {qb.num_cols} elements (the basis columns), got shape "
                         f"{tuple(t.shape)}; flatten it with .reshape(-1)")
    _check_operand(name, t, qb.codes)  # dtype and device, as the raw ops check them


@contextlib.contextmanager
def _named_reverse_func_transform(op: str) -> Iterator[None]:
    """A UsageError for an op differentiated by torch.func.grad (vjp, jacrev, hessian): the
    custom ops' reverse-mode formula is registered for autograd, which functorch's reverse
    transforms do not use, and torch's own error there speaks of autograd.Function's
    setup_context. (Inside such a transform, a call whose inputs it does not differentiate
    runs as before.)"""
    try:
        yield
    except RuntimeError as exc:
        if "setup_context" not in str(exc):
            raise
        raise UsageError(f"tk.{op} has no rule for torch.func's reverse-mode transforms (grad, vjp, jacrev, "
                         "hessian): take its gradient with loss.backward() or torch.autograd.grad; torch.func.jvp, "
                         "jacfwd and vmap work") from None


def _dual(t: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(primal, tangent) of a forward-mode AD input; (t, None) outside forward mode.

    The custom ops have a reverse-mode formula only, and torch gives a custom op without a
    forward-mode one a zero tangent without a word (torch.func.jvp, forward_ad). Both ops are
    linear in their inputs, so the wrappers carry tangents themselves: the tangent of the
    output is the op applied to the inputs' tangents."""
    if t is None:
        return None, None
    if _forward_mode_levels() > 1:
        raise UsageError("the twa_kernels ops carry one level of forward-mode tangents, and this call is inside "
                         "nested forward-mode transforms (jvp of jvp, jacfwd of jacfwd), whose outer tangents "
                         "they would drop; take the second derivative with reverse mode over one forward-mode "
                         "level (torch.autograd.grad with create_graph=True, or "
                         "torch.autograd.functional.hessian)")
    try:
        unpacked = fwAD.unpack_dual(t)
    except RuntimeError as exc:
        if "_unpack_dual" not in str(exc):
            raise
        raise UsageError("the twa_kernels ops cannot take tangents through vmap inside a forward-mode transform "
                         "(jvp or jacfwd of a vmapped function): put vmap outside, vmap(jvp(f)) or "
                         "vmap(jacfwd(f))") from None
    return unpacked.primal, unpacked.tangent


def _active_transforms() -> list[Any]:
    """The torch.func transforms this call runs inside, outermost first (their
    torch._C._functorch.TransformType); none seen while Dynamo traces, which handles them."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return []
    return [i.key() for i in retrieve_all_functorch_interpreters()]


def _forward_mode_levels() -> int:
    """How many torch.func forward-mode transforms (jvp, jacfwd) this call runs inside."""
    return _active_transforms().count(torch._C._functorch.TransformType.Jvp)


def project(qb: QuantizedBasis, g: Tensor) -> Tensor:
    """Project g [D] onto the basis, per block: y[r, b] = sum_{j in block b} p^[r, j] g[j].

    Returns float32 [k, B]. Differentiable in g (the transpose is `reconstruct`), in reverse
    and forward mode.
    """
    _check_basis(qb)
    _check_vector("g", g, qb)
    g, g_dot = _dual(g)
    with _named_reverse_func_transform("project"):
        y = project_op(qb.codes, qb.scales, qb.mins, qb.block_offsets, g.contiguous(), qb.bits or 0, qb.group_size)
    if g_dot is None:
        return y
    y_dot = project_op(qb.codes, qb.scales, qb.mins, qb.block_offsets, g_dot.contiguous(), qb.bits or 0,
                       qb.group_size)
    return fwAD.make_dual(y, y_dot)


def project_int8(qb: QuantizedBasis, g: Tensor) -> Tensor:
    """project(qb, g^), where g^ is g rounded to int8 per basis group, for a packed basis
    (bits 1, 2, 4 or 8): it sums bytes as integers (VNNI or AVX2 byte dots), which is faster
    than `project` on some CPUs and bit widths and slower on others (docs/benchmarks.md).

    g^[j] = q[j] * scale_t with scale_t = max|g| / 127 over group t (quant.round_groups_int8),
    so |g^[j] - g[j]| <= scale_t / 2 and each result moves from project(qb, g) by at most
    sum_t scale_t / 2 * sum_{j in t} |p^[r, j]| over the block's groups. A NaN or infinite
    entry of g gives NaN in every block that shares a quantisation group with it (the
    group's scale is NaN), not only in its own. Returns float32 [k, B], not differentiable: use
    it for a gradient's projection, where `project` would be called under no_grad.
    """
    _check_basis(qb)
    _check_vector("g", g, qb)
    if _dual(g)[1] is not None:
        raise UsageError("project_int8 is not differentiable, in forward mode either (its rounding has no useful "
                         "derivative): use tk.project for a tangent of the projection")
    if qb.bits is None:
        raise InvalidArgumentError("project_int8 needs a packed basis (bits 1, 2, 4 or 8): a dense basis has no "
                                   "groups to round g in; use project, or tk.quantize the basis")
    with torch.no_grad():
        return project_int8_op(qb.codes, qb.scales, qb.mins, qb.block_offsets, [g.detach().contiguous()], qb.bits,
                               qb.group_size)


def reconstruct(qb: QuantizedBasis, x: Tensor, center: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
    """Weights from coefficients: w[j] = center[j] + sum_r p^[r, j] x[r, block(j)].

    x is [k, B]; center [D] or None (zero). Returns [D] in center's dtype (float32 without
    a center). Differentiable in x (dL/dx = project(qb, dL/dw)) and in center, in reverse
    and (without `out`) forward mode.

    out: a [D] float32 or bfloat16 buffer to write into instead of a fresh tensor (a
    training loop that reuses one saves allocating and page-faulting D elements a step).
    The result is in out's dtype whatever center's (the kernels cast as they store) and
    shares out's memory. Writing bumps out's version counter, so a graph that still needs
    the values of an earlier call raises PyTorch's in-place error at backward rather than
    using the overwritten ones. out may be center itself, under torch.no_grad(): an
    in-place update (every backend reads an element of center before writing it); any
    other overlap of out with center, x or the basis is refused.
    """
    _check_basis(qb)
    _check_dense("x", x)
    if x.dim() != 2 or tuple(x.shape) != (qb.k, qb.num_blocks):
        raise InvalidArgumentError(f"x must be [k, B] = [{qb.k}, {qb.num_blocks}] (one coefficient per row and block), "
                         f"got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_INPUTS:
        raise InvalidTypeError(f"x must be float32 or bfloat16, got {x.dtype}; cast it with .float()")
    if x.device != qb.device:
        raise InvalidArgumentError(f"x is on {x.device} but the basis is on {qb.device}; move one with .to()")
    if center is not None:
        _check_vector("center", center, qb)
    (x, x_dot), (center, center_dot) = _dual(x), _dual(center)
    if center is not None:
        center = center.contiguous()
    if out is None:
        with _named_reverse_func_transform("reconstruct"):
            w = _reconstruct(qb, x, center)
        if x_dot is None and center_dot is None:
            return w
        if x_dot is None:
            return fwAD.make_dual(w, center_dot.to(w.dtype))
        return fwAD.make_dual(w, _reconstruct(qb, x_dot, center_dot).to(w.dtype))
    if x_dot is not None or center_dot is not None:
        raise UsageError("reconstruct(..., out=...) does not carry forward-mode tangents; call it without out")
    if torch._C._functorch.TransformType.Vmap in _active_transforms():
        raise UsageError("reconstruct(..., out=...) writes into out in place, which torch.vmap cannot batch; call "
                         "it without out inside vmap")
    _check_vector("out", out, qb)
    if not out.is_contiguous():
        raise InvalidArgumentError("out must be contiguous; allocate it with torch.empty(D, dtype=..., device=...)")
    # (out's overlaps with what the kernel reads are refused by the op, raw torch.ops calls included)
    if (center is not None and center.requires_grad and torch.is_grad_enabled() and not _is_traced(out)
            and out.data_ptr() == center.data_ptr()):
        raise InvalidArgumentError("out=center updates center in place, which autograd cannot differentiate: do it "
                                   "under torch.no_grad(), or pass a separate out")
    if out.requires_grad and torch.is_grad_enabled():
        raise InvalidArgumentError("out requires grad, and writing into it in place would change a tensor autograd "
                                   "tracks without its knowing: pass a buffer that does not require grad (the "
                                   "result carries the gradient to x and center), or write under torch.no_grad()")
    with _named_reverse_func_transform("reconstruct"):
        return reconstruct_into(qb, x, center, out)


def _reconstruct(qb: QuantizedBasis, x: Tensor, center: Tensor | None) -> Tensor:
    return reconstruct_op(qb.codes, qb.scales, qb.mins, qb.block_offsets, x.contiguous(),
                          None if center is None else center.contiguous(), qb.bits or 0, qb.group_size, qb.num_cols)


def reconstruct_into(qb: QuantizedBasis, x: Tensor, center: Tensor | None, out: Tensor,
                     on_backward: Callable[[], None] | None = None) -> Tensor:
    """reconstruct(qb, x, center, out=out) without the input checks, for callers that
    made the inputs themselves; on_backward() is called once a backward has freed the graph
    (not under retain_graph=True)."""
    # out.detach(): the result's history starts here, and a buffer reused from an earlier
    # call does not chain this graph to that call's (it shares storage and version counter)
    return ReconstructInto.apply(qb.codes, qb.scales, qb.mins, qb.block_offsets, x.contiguous(), center,
                                 qb.bits or 0, qb.group_size, out.detach(), on_backward)


def reconstruct_pieces(qb: QuantizedBasis, x: Tensor, center: Tensor | None, out: Tensor,
                       shapes: Sequence[tuple[int, ...]], on_backward: Callable[[], None] | None = None, *,
                       int8_gradients: bool = False,
                       hold: Callable[[Sequence[Tensor | None]], None] | None = None) -> tuple[Tensor, ...]:
    """reconstruct into `out`, returned as consecutive views of it in `shapes` (a model's
    tensors), without input checks; its backward projects the pieces' gradients in place
    (with project_int8's rounding when `int8_gradients`), without gathering them into one
    D-long vector on the C++ backend (the others concatenate them),
    then hands them to `hold`, when given."""
    if int8_gradients and not qb.bits:
        raise InvalidArgumentError("int8_gradients rounds gradients per basis group, which a dense basis does not "
                                   "have: pass int8_gradients=False, or a packed basis (bits 1, 2, 4 or 8)")
    return ReconstructPieces.apply(qb.codes, qb.scales, qb.mins, qb.block_offsets, x.contiguous(), center,
                                   qb.bits or 0, qb.group_size, [out.detach()], list(shapes), on_backward,
                                   int8_gradients, hold)
