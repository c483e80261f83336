"""Every op's schema, fake (meta) impl and autograd rule, and the backend dispatch.

The ops work on the tensors of a QuantizedBasis (codes, scales, mins, block_offsets) plus
integers: bits (0 for a dense float32 basis), group_size and, where no input carries it,
the number of columns. Backends (twa_kernels/backends/*) register one kernel per op and
backend name with `register_kernel`; the op's real impl picks the backend for the input's
device with `backend()`. Nothing here knows how a kernel is written.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from twa_kernels import _build
from twa_kernels.errors import BackendUnavailableError, InvalidArgumentError, InvalidTypeError, UsageError
from twa_kernels.quant import check_layout, round_groups_int8, unround_groups_int8

BACKENDS = ("reference", "cpp", "triton", "cuda")
_KERNELS: dict[str, dict[str, Callable]] = {}


def register_kernel(op: str, backend_name: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` computes `op` on backend `backend_name`."""

    def decorate(fn: Callable) -> Callable:
        _KERNELS.setdefault(op, {})[backend_name] = fn
        return fn

    return decorate


def _backend_usable(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether backend `name` can run on `device`, and if not, why."""
    if name == "reference":
        return True, ""
    if name == "cpp":
        if device.type != "cpu":
            return False, f"the cpp backend runs on CPU tensors only, not {device.type}"
        if not _build.cpu_kernels_available():
            return False, f"the C++ kernels failed to build: {_build.cpu_build_error()}"
        return True, ""
    if name == "triton":
        if device.type not in ("cpu", "cuda"):
            return False, f"Triton does not run on {device.type}"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False, ("Triton runs CPU tensors only under TRITON_INTERPRET=1, set before triton is first "
                           "imported (torch.compile and torch's error paths import it): best before the program starts")
        if importlib.util.find_spec("triton") is None:
            return False, "Triton is not installed (pip install triton)"
        if device.type == "cuda" and not torch.cuda.is_available():
            return False, "this torch build has no CUDA"
        return True, ""
    if name == "cuda":
        if device.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors only, not {device.type}"
        if not _build.cuda_kernels_available():
            return False, f"the CUDA kernels are not built: {_build.cuda_build_error()}"
        return True, ""
    return False, f"unknown backend {name!r}"


def kernels_in_use(device: torch.device) -> str:
    """The kernels that run the ops on `device`, in words: the backend, and for the C++ one
    the instruction-set paths it takes here (float and int8, as the CPU and
    TWA_KERNELS_CPU_ISA choose them) and torch's thread count (each thread sums its own
    columns, and the threads' sums are added in order: another count rounds otherwise)."""
    name = backend(device)
    if name != "cpp":
        return name
    lib = torch.ops.twa_kernels_cpu
    return f"cpp ({lib.isa()}, int8 {lib.int8_isa()}), {torch.get_num_threads()} threads"


def backend(device: torch.device | str = "cpu") -> str:
    """The backend that runs the ops on `device`: "cpp" | "triton" | "cuda" | "reference".

    TWA_KERNELS_BACKEND forces one; an unusable forced backend is an error, not a silent
    fallback. Otherwise the fastest usable backend is chosen (the C++ kernels for CPU
    tensors, built on first use; the reference when they cannot be built).
    """
    if not isinstance(device, (torch.device, str)):
        raise InvalidTypeError(f"device must be a torch.device or a string such as 'cpu', got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise InvalidArgumentError(f"{device!r} is not a device torch knows ({error}); pass e.g. 'cpu' or "
                                   "'cuda'") from None
    forced = os.environ.get("TWA_KERNELS_BACKEND", "").strip()
    if forced:
        if forced not in BACKENDS:
            raise InvalidArgumentError(f"TWA_KERNELS_BACKEND={forced!r} is not one of {BACKENDS}; unset it or pick one of those")
        usable, why = _backend_usable(forced, device)
        if not usable:
            raise BackendUnavailableError(f"TWA_KERNELS_BACKEND={forced} cannot run {device.type} tensors: {why}")
        return forced
    candidates = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}.get(device.type, ())
    for name in candidates:
        if _backend_usable(name, device)[0]:
            return name
    return "reference"


# Backends whose module is imported (and its kernels registered) only when first chosen:
# Triton reads TRITON_INTERPRET when kernels are defined, and importing it costs a second.
_LAZY_MODULES = {"triton": "twa_kernels.backends.triton", "cuda": "twa_kernels.backends.cuda"}


def _kernel(op: str, device: torch.device, required: bool = True) -> Callable | None:
    """The chosen backend's kernel for `op`; None when it has none and not `required`."""
    name = backend(device)
    if name in _LAZY_MODULES and name not in _KERNELS.get(op, {}):
        importlib.import_module(_LAZY_MODULES[name])
    kernels = _KERNELS.get(op, {})
    if name not in kernels:
        if not required:
            return None
        raise BackendUnavailableError(f"backend {name!r} has no kernel for {op}")
    return kernels[name]


def _check_layout(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, bits: int, group_size: int,
                  num_cols: int, columns_of: str = "num_cols") -> None:
    """Refuse, before a kernel runs, raw basis tensors that do not fit their layout, with a
    BasisLayoutError: a basis edited in place after it was made (its offsets written
    through .data, a tensor resized) or tensors passed to torch.ops directly. The Triton
    kernels take what they are given, and the CUDA binding checks the tensors' layout but not
    block_offsets' values, so this and the operand checks below are their only checks of
    those (an offsets tensor on the GPU is read once per version, see
    quant._validate_offsets); the C++ binding checks its inputs again itself. Its cost per call: docs/design.md."""
    check_layout(codes, scales, mins, block_offsets, bits or None, group_size, num_cols, columns_of)


# what the kernels read as a gradient or a center and write as weights
_VECTOR_DTYPES = (torch.float32, torch.bfloat16)


def _check_vector(name: str, t: Tensor, codes: Tensor, numel: int | None = None) -> None:
    """The Triton and CUDA kernels index an operand by the basis's layout alone: one of
    another dtype, on another device (or another GPU) or with fewer elements would be read
    as garbage or out of bounds. Raw torch.ops calls get the library's errors here; the
    public wrappers in ops.py call it too, after their own checks of the tensor's kind."""
    if t.dtype not in _VECTOR_DTYPES:
        # a cast copies: a written buffer must be allocated in the right dtype instead
        fix = ("allocate it as float32 or bfloat16 (a cast would be a copy the result never reaches)"
               if name == "out" else "cast it with .float()")
        raise InvalidTypeError(f"{name} must be float32 or bfloat16, got {t.dtype}; {fix}")
    if t.device != codes.device:
        raise InvalidArgumentError(f"{name} is on {t.device} but the basis is on {codes.device}; move one with .to()")
    if t.dim() != 1:  # the reference would broadcast it against the basis's columns, the kernels read its elements
        raise InvalidArgumentError(f"{name} must be 1-D (one entry per basis column), got shape {tuple(t.shape)}; "
                                   "flatten it with .reshape(-1)")
    if numel is not None and t.numel() != numel:
        raise InvalidArgumentError(f"{name} has {t.numel()} elements but the basis has {numel} columns")


def _check_pieces(pieces: list[Tensor], codes: Tensor) -> None:
    """A gradient given as pieces: at least one, each 1-D, in one dtype, on the basis's device."""
    if not pieces:
        raise InvalidArgumentError("pieces is empty: pass the gradient as one or more 1-D tensors")
    for i, piece in enumerate(pieces):
        if piece.dim() != 1 or piece.dtype != pieces[0].dtype:
            raise InvalidArgumentError(f"pieces[{i}] is {tuple(piece.shape)} {piece.dtype}: every piece must be 1-D "
                                       f"and of one dtype ({pieces[0].dtype}); pass piece.reshape(-1)")
        _check_vector(f"pieces[{i}]", piece, codes)


def _check_coefficients(x: Tensor, codes: Tensor, block_offsets: Tensor) -> None:
    shape = (codes.shape[0], block_offsets.numel() - 1)
    if not x.is_floating_point():
        raise InvalidTypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise InvalidArgumentError(f"x has shape {tuple(x.shape)} but the basis needs {shape} (rows, blocks)")
    if x.device != codes.device:
        raise InvalidArgumentError(f"x is on {x.device} but the basis is on {codes.device}")


# ---- project: y[r, b] = sum_{j in block b} p^[r, j] * g[j] -------------------------------


@torch.library.custom_op("twa_kernels::project", mutates_args=())
def project_op(
    codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, g: Tensor, bits: int, group_size: int
) -> Tensor:
    _check_layout(codes, scales, mins, block_offsets, bits, group_size, g.numel(), "g has")
    _check_vector("g", g, codes)
    return _kernel("project", g.device)(codes, scales, mins, block_offsets, g, bits, group_size)


@project_op.register_fake
def _(codes, scales, mins, block_offsets, g, bits, group_size):
    return g.new_empty((codes.shape[0], block_offsets.shape[0] - 1), dtype=torch.float32)


def _project_setup(ctx, inputs, output):
    codes, scales, mins, block_offsets, g, bits, group_size = inputs
    ctx.save_for_backward(codes, scales, mins, block_offsets)
    ctx.bits, ctx.group_size, ctx.num_cols, ctx.g_dtype = bits, group_size, g.numel(), g.dtype


def _linear_in(grad: Tensor, apply: Callable[[Tensor], Tensor]) -> Tensor:
    """apply(grad), for an `apply` linear in grad, carrying the forward-mode tangent grad may
    hold: a create_graph=True backward under forward-mode AD (a forward-over-reverse Hessian)
    hands the formulas dual gradients, and the custom ops have no forward-mode rule."""
    return _linear_in_all([grad], lambda grads: apply(grads[0]))


def _linear_in_all(grads: list[Tensor], apply: Callable[[list[Tensor]], Tensor]) -> Tensor:
    """_linear_in for an `apply` linear in a list of gradients (a model's pieces)."""
    unpacked = [fwAD.unpack_dual(g) for g in grads]
    if all(u.tangent is None for u in unpacked):
        return apply(grads)
    tangents = [u.primal.new_zeros(()).expand_as(u.primal) if u.tangent is None else u.tangent for u in unpacked]
    return fwAD.make_dual(apply([u.primal for u in unpacked]), apply(tangents))


def _project_backward(ctx, grad_y):
    # project is linear in g; its transpose is reconstruct without a center.
    codes, scales, mins, block_offsets = ctx.saved_tensors
    grad_g = _linear_in(grad_y, lambda grad: reconstruct_op(
        codes, scales, mins, block_offsets, grad.contiguous(), None, ctx.bits, ctx.group_size, ctx.num_cols))
    return None, None, None, None, grad_g.to(ctx.g_dtype), None, None


project_op.register_autograd(_project_backward, setup_context=_project_setup)


# ---- project_pieces: project of a gradient given as its pieces, read in place ------------


@torch.library.custom_op("twa_kernels::project_pieces", mutates_args=())
def project_pieces_op(
    codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, pieces: list[Tensor], bits: int,
    group_size: int
) -> Tensor:
    """project of g = cat(pieces) (1-D, one dtype), without forming g: a model's per-tensor
    gradients are read where autograd left them. A backend without its own kernel gets
    the concatenation and its project kernel."""
    _check_pieces(pieces, codes)
    _check_layout(codes, scales, mins, block_offsets, bits, group_size, sum(p.numel() for p in pieces),
                  "the pieces have")
    return _project_pieces(codes, scales, mins, block_offsets, pieces, bits, group_size)


def _project_pieces(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, pieces: list[Tensor],
                    bits: int, group_size: int) -> Tensor:
    """project_pieces_op's kernel call, for inputs already checked; a piece of any shape is
    read as its flattening (the backends' project_pieces kernels read elements in order)."""
    device = pieces[0].device
    kernel = _kernel("project_pieces", device, required=False)
    if kernel is not None:
        return kernel(codes, scales, mins, block_offsets, pieces, bits, group_size)
    g = torch.cat([p.reshape(-1) for p in pieces])
    return _kernel("project", device)(codes, scales, mins, block_offsets, g, bits, group_size)


@project_pieces_op.register_fake
def _(codes, scales, mins, block_offsets, pieces, bits, group_size):
    return pieces[0].new_empty((codes.shape[0], block_offsets.shape[0] - 1), dtype=torch.float32)


def _project_pieces_setup(ctx, inputs, output):
    codes, scales, mins, block_offsets, pieces, bits, group_size = inputs
    ctx.save_for_backward(codes, scales, mins, block_offsets)
    ctx.bits, ctx.group_size = bits, group_size
    ctx.sizes, ctx.g_dtype = [p.numel() for p in pieces], pieces[0].dtype


def _project_pieces_backward(ctx, grad_y):
    codes, scales, mins, block_offsets = ctx.saved_tensors
    grad_g = _linear_in(grad_y, lambda grad: reconstruct_op(codes, scales, mins, block_offsets, grad.contiguous(),
                                                             None, ctx.bits, ctx.group_size, sum(ctx.sizes)))
    return None, None, None, None, list(grad_g.to(ctx.g_dtype).split(ctx.sizes)), None, None


project_pieces_op.register_autograd(_project_pieces_backward, setup_context=_project_pieces_setup)


# ---- project_int8: project of g rounded to int8 per basis group ---------------------------


@torch.library.custom_op("twa_kernels::project_int8", mutates_args=())
def project_int8_op(
    codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, pieces: list[Tensor], bits: int,
    group_size: int
) -> Tensor:
    """project of g^ = quant.round_groups_int8(cat(pieces)), for a packed basis. Not
    differentiable: it is the projection of a gradient, never part of a graph. A backend
    without its own kernel gets g^ rounded here and its project kernel."""
    _check_pieces(pieces, codes)
    _check_layout(codes, scales, mins, block_offsets, bits, group_size, sum(p.numel() for p in pieces),
                  "the pieces have")
    if bits == 0:
        raise InvalidArgumentError("project_int8 rounds g per quantisation group and needs a packed basis "
                                   "(bits 1, 2, 4 or 8), not a dense one (bits 0); call project")
    return _project_int8(codes, scales, mins, block_offsets, pieces, bits, group_size)


def _project_int8(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, pieces: list[Tensor],
                  bits: int, group_size: int) -> Tensor:
    """project_int8_op's kernel call, for inputs already checked (pieces of any shape, as
    _project_pieces)."""
    device = pieces[0].device
    kernel = _kernel("project_int8", device, required=False)
    if kernel is not None:
        return kernel(codes, scales, mins, block_offsets, pieces, bits, group_size)
    g = torch.cat([p.reshape(-1) for p in pieces])
    g_hat = unround_groups_int8(*round_groups_int8(g, group_size), group_size)
    return _kernel("project", device)(codes, scales, mins, block_offsets, g_hat, bits, group_size)


def _vmap_over_pieces(op: Any, name: str) -> Callable[..., tuple[Tensor, int]]:
    """A torch.vmap rule for an op over gradient pieces (project_pieces, project_int8): one
    call per mapped set of pieces (project_int8 rounds each over its own groups, as a call
    per g would). The kernels write into the pieces' layout, which vmap's own fallback
    cannot batch (a backward with is_grads_batched=True reaches them so)."""
    def rule(info, in_dims, codes, scales, mins, block_offsets, pieces, bits, group_size):
        if any(dim is not None for dim in in_dims[:4]):
            raise UsageError(f"{name} under torch.vmap maps over g only, not over the basis's tensors")
        dims = in_dims[4] if in_dims[4] is not None else [None] * len(pieces)
        rows = [op(codes, scales, mins, block_offsets,
                   [p if d is None else p.select(d, i) for p, d in zip(pieces, dims)], bits, group_size)
                for i in range(info.batch_size)]
        return torch.stack(rows), 0
    return rule


torch.library.register_vmap(project_int8_op, _vmap_over_pieces(project_int8_op, "project_int8"))
torch.library.register_vmap(project_pieces_op, _vmap_over_pieces(project_pieces_op, "project_pieces"))


@project_int8_op.register_fake
def _(codes, scales, mins, block_offsets, pieces, bits, group_size):
    return pieces[0].new_empty((codes.shape[0], block_offsets.shape[0] - 1), dtype=torch.float32)


# ---- reconstruct: w[j] = center[j] + sum_r p^[r, j] * x[r, block(j)] ---------------------


@torch.library.custom_op("twa_kernels::reconstruct", mutates_args=())
def reconstruct_op(
    codes: Tensor,
    scales: Tensor,
    mins: Tensor,
    block_offsets: Tensor,
    x: Tensor,
    center: Optional[Tensor],
    bits: int,
    group_size: int,
    num_cols: int,
) -> Tensor:
    _check_layout(codes, scales, mins, block_offsets, bits, group_size, num_cols)
    _check_coefficients(x, codes, block_offsets)
    if center is not None:
        _check_vector("center", center, codes, num_cols)
    return _kernel("reconstruct", x.device)(codes, scales, mins, block_offsets, x, center, bits, group_size, num_cols)


@reconstruct_op.register_fake
def _(codes, scales, mins, block_offsets, x, center, bits, group_size, num_cols):
    dtype = center.dtype if center is not None else torch.float32
    return x.new_empty((num_cols,), dtype=dtype)


def _reconstruct_setup(ctx, inputs, output):
    codes, scales, mins, block_offsets, x, center, bits, group_size, num_cols = inputs
    ctx.save_for_backward(codes, scales, mins, block_offsets)
    ctx.bits, ctx.group_size, ctx.x_dtype = bits, group_size, x.dtype
    ctx.center_dtype = center.dtype if center is not None else None


def _reconstruct_backward(ctx, grad_w):
    # dL/dx = project(basis, dL/dw); dL/dcenter = dL/dw.
    codes, scales, mins, block_offsets = ctx.saved_tensors
    grad_w = grad_w.contiguous()
    grad_x = grad_center = None
    if ctx.needs_input_grad[4]:
        grad_x = _linear_in(grad_w, lambda grad: project_op(codes, scales, mins, block_offsets, grad.contiguous(),
                                                            ctx.bits, ctx.group_size)).to(ctx.x_dtype)
    if ctx.center_dtype is not None and ctx.needs_input_grad[5]:
        grad_center = grad_w.to(ctx.center_dtype)
    return None, None, None, None, grad_x, grad_center, None, None, None


reconstruct_op.register_autograd(_reconstruct_backward, setup_context=_reconstruct_setup)


# ---- reconstruct into a caller's buffer (a training loop's reused workspace) ------------


@torch.library.custom_op("twa_kernels::reconstruct_into", mutates_args=("out",))
def reconstruct_into_op(
    codes: Tensor,
    scales: Tensor,
    mins: Tensor,
    block_offsets: Tensor,
    x: Tensor,
    center: Optional[Tensor],
    bits: int,
    group_size: int,
    out: Tensor,
) -> None:
    """reconstruct, written into `out` (float32 or bfloat16, whatever center's dtype)."""
    _reconstruct_into(codes, scales, mins, block_offsets, x, center, bits, group_size, out)


def _reconstruct_into(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, x: Tensor,
                      center: Optional[Tensor], bits: int, group_size: int, out: Tensor) -> None:
    """reconstruct_into_op's checks and kernel call, without the op's dispatch."""
    _check_layout(codes, scales, mins, block_offsets, bits, group_size, out.numel(), "out has")
    _check_coefficients(x, codes, block_offsets)
    _check_vector("out", out, codes)
    if not out.is_contiguous():
        raise InvalidArgumentError("out must be contiguous: the kernels write it as one block of memory")
    if center is not None:
        _check_vector("center", center, codes, out.numel())
    _check_out_aliasing(out, x, center, codes, scales, mins, block_offsets)
    _kernel("reconstruct_into", x.device)(codes, scales, mins, block_offsets, x, center, bits, group_size, out)


def _check_out_aliasing(out: Tensor, x: Tensor, center: Tensor | None, codes: Tensor, scales: Tensor, mins: Tensor,
                        block_offsets: Tensor) -> None:
    """out shares no memory with what the kernel reads while it writes out, except center as
    the very same elements (an in-place update). A write over the block offsets not yet
    read could send the kernel's column walk past its end."""
    # checked on every TWA step, so kept to a few attribute reads: spans from data_ptr and
    # nbytes where contiguous (out, x and the basis tensors are), devices compared once
    device, start = out.device, out.data_ptr()
    end = start + out.nbytes
    if center is not None and center.device == device:
        at = center.data_ptr()
        # the same elements: same start, dtype and (as out is) contiguous, not an expanded or strided view
        same = at == start and center.dtype == out.dtype and center.is_contiguous()
        if at < end and start < at + _extent(center) and not same:
            raise InvalidArgumentError("out overlaps center without being the same elements: element j of out "
                                       "would overwrite another element of center before it is read; pass "
                                       "out=center for an in-place update, or a separate buffer")
    same_device = codes.device == device
    for name, t in (("x", x), ("the basis codes", codes), ("the basis scales", scales), ("the basis mins", mins),
                    ("the basis block offsets", block_offsets)):
        at = t.data_ptr()
        if at < end and start < at + _extent(t) and t.numel() and (same_device if t is not x else x.device == device):
            raise InvalidArgumentError(f"out shares memory with {name}, which the kernel reads while it writes out; "
                                       "pass a separate buffer")


def _extent(t: Tensor) -> int:
    """Bytes from a tensor's first element to just past its last (strides followed)."""
    if t.is_contiguous():
        return t.nbytes
    return (sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


@reconstruct_into_op.register_fake
def _(codes, scales, mins, block_offsets, x, center, bits, group_size, out):
    return None


def _queue_callback(callback: Callable[[], None]) -> None:
    torch.autograd.Variable._execution_engine.queue_callback(callback)


@functools.cache
def _untraced_queue_callback() -> Callable[[Callable[[], None]], None]:
    return torch.compiler.disable(_queue_callback)  # made at first use: disable imports torch._dynamo


def queue_after_backward(callback: Callable[[], None]) -> None:
    """Have the autograd engine call `callback` at the end of this backward pass. Never
    traced: compiled autograd refuses a callback queued while Dynamo traces a backward
    node, and takes one queued from a call it leaves to run eagerly. (Without Dynamo
    imported nothing traces, and importing it would cost the first backward a second.)"""
    if "torch._dynamo" not in sys.modules:
        _queue_callback(callback)
    else:
        _untraced_queue_callback()(callback)


def _when_graph_freed(ctx: Any) -> None:
    """Call ctx.on_backward at the end of this backward pass if the pass freed the graph
    (its saved tensors are gone then). A graph kept with retain_graph=True, or by
    autograd.grad(create_graph=True), may be backpropagated again: its buffer must not be
    handed to the next forward, whose write would spoil it."""
    if ctx.on_backward is None:
        return

    def check() -> None:
        try:
            ctx.saved_tensors
        except RuntimeError:  # released: no later pass reads this buffer
            ctx.on_backward()

    queue_after_backward(check)


class ReconstructInto(torch.autograd.Function):
    """reconstruct into `out` with reconstruct's gradients. `out` is marked dirty, so its
    version counter moves: a graph that saved views of an earlier result (a layer's weight)
    raises PyTorch's in-place error at backward instead of using the overwritten values.
    `on_backward`, when given, is called once a backward pass has freed the graph (the owner
    of a workspace learns that it may be reused; see _when_graph_freed)."""

    @staticmethod
    def forward(ctx, codes, scales, mins, block_offsets, x, center, bits, group_size, out, on_backward):
        reconstruct_into_op(codes, scales, mins, block_offsets, x, center, bits, group_size, out)
        ctx.mark_dirty(out)
        ctx.save_for_backward(codes, scales, mins, block_offsets)
        ctx.bits, ctx.group_size, ctx.x_dtype, ctx.on_backward = bits, group_size, x.dtype, on_backward
        ctx.center_dtype = center.dtype if center is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_w):
        grads = _reconstruct_backward(ctx, grad_w)  # inputs 0-7 are reconstruct's
        _when_graph_freed(ctx)
        return (*grads[:8], None, None)


_PLAIN_TENSOR_TYPES = frozenset((Tensor, torch.nn.Parameter))


def _eager(codes: Tensor, others: Sequence[Tensor]) -> bool:
    """Whether an op's kernel may be called without the op: plain tensors with values,
    outside tracing, dispatch modes and torch.func transforms, with no graph to record. A fake tensor
    (torch.compile, export, compiled autograd), a subclass that intercepts ops, or a
    dispatch mode (FlopCounterMode, make_fx) must see the op itself, and a backward under
    create_graph=True needs the op's autograd rule for its own gradient. An op's tensors
    share codes' device."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not codes.is_meta
            and not is_in_torch_dispatch_mode() and {type(codes), *map(type, others)} <= _PLAIN_TENSOR_TYPES
            and torch._C._functorch.peek_interpreter_stack() is None)  # vmap's batched tensors pass as plain


class _PiecesLayout(NamedTuple):
    numel: int
    sizes: tuple[int, ...]
    views: tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...]  # as_strided's (shape, stride, offset)


@functools.lru_cache(maxsize=16)
def _pieces_layout(shapes: tuple[tuple[int, ...], ...]) -> _PiecesLayout:
    """Consecutive contiguous tensors of `shapes` in one flat buffer, computed once per
    model: one as_strided call per tensor takes about half the time of split and view."""
    sizes, views, offset = [], [], 0
    for shape in shapes:
        strides, step = [], 1
        for n in reversed(shape):
            strides.append(step)
            step *= n
        sizes.append(math.prod(shape))
        views.append((shape, tuple(reversed(strides)), offset))
        offset += sizes[-1]
    return _PiecesLayout(offset, tuple(sizes), tuple(views))


class _Int8GradientHasNoDerivative(torch.autograd.Function):
    """The coefficients' gradient of an int8_gradients backward under create_graph=True: the
    first-order value as it is, and a UsageError for a backward through it (a gradient
    penalty, a Hessian), since the rounding it went through has no useful derivative."""

    @staticmethod
    def forward(ctx, grad_x, *pieces):
        return grad_x.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise UsageError("a backward through the coefficients' gradient (a gradient penalty, a Hessian) of a TWA "
                         "built with int8_gradients=True: that gradient's rounding has no derivative; build the "
                         "TWA with int8_gradients=False for it")


class ReconstructPieces(torch.autograd.Function):
    """reconstruct into out_holder[0], returned as its pieces: consecutive views of it in
    `shapes`, a model's weights, one view per tensor (returned shaped, so that no view
    node per tensor joins the graph). The backward projects the pieces' gradients where
    autograd left them (project_pieces), so on the C++ backend no D-long gradient is
    gathered (the others concatenate them). The buffer is
    passed in a list so that it is not an input: the pieces are views of it, and the
    write bumps its version counter, so a retained graph that saved a piece of an earlier
    call raises PyTorch's in-place error at backward. `on_backward` as in ReconstructInto.
    With `int8_gradients` the backward is project_int8 (the gradient rounded to int8 per
    basis group, a packed basis only). `hold`, when given, receives the pieces' gradients
    once they are projected (the caller decides how long they live)."""

    @staticmethod
    def forward(ctx, codes, scales, mins, block_offsets, x, center, bits, group_size, out_holder, shapes,
                on_backward, int8_gradients=False, hold=None):
        out = out_holder[0]
        layout = _pieces_layout(tuple(map(tuple, shapes)))
        if layout.numel != out.numel():  # as_strided would not notice
            raise InvalidArgumentError(f"shapes hold {layout.numel} elements but out has {out.numel()}; pass the "
                                       "shapes of the tensors out holds, in order")
        # eager calls skip the op's dispatch (a tenth of a millisecond a step on a small model)
        if _eager(codes, (scales, mins, block_offsets, x, out, *(() if center is None else (center,)))):
            _reconstruct_into(codes, scales, mins, block_offsets, x, center, bits, group_size, out)
            # as the op does for an argument it mutates: a graph that saved an earlier
            # result's views raises PyTorch's in-place error instead of reading these values
            torch.autograd.graph.increment_version(out)
        else:
            reconstruct_into_op(codes, scales, mins, block_offsets, x, center, bits, group_size, out)
        ctx.save_for_backward(codes, scales, mins, block_offsets)
        ctx.bits, ctx.group_size, ctx.x_dtype, ctx.on_backward = bits, group_size, x.dtype, on_backward
        ctx.center_dtype = center.dtype if center is not None else None
        ctx.sizes, ctx.int8_gradients, ctx.hold = layout.sizes, int8_gradients, hold
        ctx.set_materialize_grads(False)
        base = out.storage_offset()  # as_strided's offset counts from the storage's start
        return tuple(out.as_strided(shape, stride, base + offset) for shape, stride, offset in layout.views)

    @staticmethod
    def backward(ctx, *grads):
        codes, scales, mins, block_offsets = ctx.saved_tensors
        grad_x = grad_center = None
        # an nn.Embedding(sparse=True) gives a sparse gradient: the kernels read dense ones
        grads = tuple(g.to_dense() if g is not None and g.layout != torch.strided else g for g in grads)
        like = next((g for g in grads if g is not None), None)
        if like is not None:
            # a piece no loss depends on (an unused layer) has no gradient: zeros
            pieces = [g if g is not None else like.new_zeros(n) for g, n in zip(grads, ctx.sizes)]
            if ctx.needs_input_grad[4]:
                # autograd hands over gradients of the outputs' shapes, dtype and device, and
                # the forward checked the basis (saved, so unchanged): eager calls skip the
                # op's checks and dispatch, and the flattening the op's schema asks for
                if _eager(codes, (scales, mins, block_offsets, *pieces)):
                    project = _project_int8 if ctx.int8_gradients else _project_pieces
                else:
                    pieces = [p.reshape(-1) for p in pieces]
                    project = project_int8_op if ctx.int8_gradients else project_pieces_op
                try:
                    grad_x = _linear_in_all(pieces, lambda grads: project(codes, scales, mins, block_offsets,
                                                                          grads, ctx.bits, ctx.group_size))
                except RuntimeError as exc:
                    if "Batching rule not implemented" not in str(exc):
                        raise
                    raise UsageError("a batched backward (torch.autograd.grad(..., is_grads_batched=True), or "
                                     "torch.autograd.functional.jacobian(..., vectorize=True)) cannot run through "
                                     "the TWA's kernels: call backward once per gradient, or use torch.func "
                                     "(vmap over grad or vjp), which the TWA runs in plain torch ops") from None
                grad_x = grad_x.to(ctx.x_dtype)
                if ctx.int8_gradients and any(p.requires_grad for p in pieces):  # create_graph=True
                    grad_x = _Int8GradientHasNoDerivative.apply(grad_x, *[p for p in pieces if p.requires_grad])
            if ctx.center_dtype is not None and ctx.needs_input_grad[5]:
                grad_center = torch.cat([p.reshape(-1) for p in pieces]).to(ctx.center_dtype)
            if ctx.hold is not None:
                ctx.hold(grads)
        _when_graph_freed(ctx)
        return None, None, None, None, grad_x, grad_center, None, None, None, None, None, None, None


# ---- the passes of orthonormalize ---------------------------------------------------------


@torch.library.custom_op("twa_kernels::gram", mutates_args=())
def gram_op(p: Tensor) -> Tensor:
    """p p^T for float32 p [k, d], accumulated in float64 -> float64 [k, k]."""
    if p.dim() != 2 or not p.is_floating_point():
        raise InvalidArgumentError(f"gram takes a floating-point [k, d] matrix, got {tuple(p.shape)} {p.dtype}")
    _check_float32_rows("gram", p)
    return _kernel("gram", p.device)(p)


def _check_float32_rows(op: str, p: Tensor) -> None:
    """The kernels read p as float32; the reference reads it as it is. A p of another dtype
    would give each its own answer (float64's digits rounded away by the kernels alone)."""
    if p.dtype != torch.float32:
        raise InvalidTypeError(f"{op} reads p as float32, got {p.dtype}; pass p.float()")


@gram_op.register_fake
def _(p):
    return p.new_empty((p.shape[0], p.shape[0]), dtype=torch.float64)


@torch.library.custom_op("twa_kernels::combine_rows", mutates_args=())
def combine_rows_op(t: Tensor, p: Tensor) -> Tensor:
    """t @ p for float64 t [r, k] and float32 p [k, d], accumulated in float64 -> float32 [r, d]."""
    if t.dim() != 2 or p.dim() != 2 or t.shape[1] != p.shape[0] or not (t.is_floating_point()
                                                                        and p.is_floating_point()):
        raise InvalidArgumentError(f"combine_rows takes floating-point t [r, k] and p [k, d], got "
                                   f"{tuple(t.shape)} {t.dtype} and {tuple(p.shape)} {p.dtype}")
    if t.device != p.device:
        raise InvalidArgumentError(f"t is on {t.device} but p is on {p.device}")
    _check_float32_rows("combine_rows", p)
    return _kernel("combine_rows", p.device)(t, p)


@combine_rows_op.register_fake
def _(t, p):
    return p.new_empty((t.shape[0], p.shape[1]), dtype=torch.float32)
