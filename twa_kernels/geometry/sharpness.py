"""Sharpness: Hutchinson's estimator of the Hessian diagonal and power iteration for the
dominant Hessian eigenvalue.

    diag = tk.connectivity.hessian_diagonal(model, loss_fn, data, samples=1000)
    value, trace, converged = tk.connectivity.top_eigenvalue(model, loss_fn, data)

Hutchinson's estimator is E[z * Hz] with Rademacher z. Both run on Hessian-vector products
by forward-over-reverse differentiation (torch.func.jvp of torch.func.grad), vectorised
over probes with vmap. The model runs in eval mode (fixed BatchNorm statistics), so the
loss is a deterministic function of the parameters.

`data` yields (inputs, targets) tuples, or mappings (Hugging Face batches) fed to the model
as keyword arguments, whose "labels" are the targets; loss_fn(outputs, targets) gets the
model's output as it is (for a transformers model its ModelOutput: read `.logits`, or
return `.loss`). Every op of the model needs a forward-mode derivative: transformers models
with their default fused attention (attn_implementation="sdpa") are refused, naming eager
attention as the way out.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from twa_kernels.errors import InvalidArgumentError, InvalidTypeError
from twa_kernels._progress import progress_bar
from twa_kernels._random import generator
from twa_kernels._checks import check_module, integer, real
from twa_kernels.batchnorm import layout_named
from twa_kernels.geometry.evaluation import (
    SPLIT_BATCH_FIX, check_data, finite_or_none, parameter_device, preserved, split_batch)
from twa_kernels.io import unwrap_model

logger = logging.getLogger(__name__)
# PyTorch's message for an op without a forward-mode derivative, which torch.func.jvp needs
_NO_FORWARD_AD = re.compile(r"Trying to use forward AD with (\S+)")


class EigenResult(NamedTuple):
    """The dominant Hessian eigenvalue, its Rayleigh quotient at each iteration, and whether
    the relative change fell below tol."""

    value: float
    trace: list[float]
    converged: bool

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-safe data."""
        # a diverged run's NaN or infinity as null, as Interpolation and Plane write them
        return dict(value=finite_or_none(float(self.value)), trace=finite_or_none([float(t) for t in self.trace]),
                    converged=bool(self.converged))


def _no_forward_ad(exc: NotImplementedError) -> InvalidArgumentError | None:
    """The named error for an op that has no forward-mode derivative, or None when `exc` is
    another NotImplementedError."""
    found = _NO_FORWARD_AD.search(str(exc))
    if found is None:
        return None
    op = found.group(1)
    if "attention" in op:
        remedy = ("it is a fused kernel of scaled_dot_product_attention (nn.MultiheadAttention's, and transformers "
                  "models' by default, attn_implementation='sdpa'): make the call inside "
                  "`with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):`, whose kernel has "
                  "one, or for a transformers model set model.config._attn_implementation = 'eager'")
    else:
        remedy = "compute that part of the model with ops that have one (or pass a model without it)"
    return InvalidArgumentError(f"the model calls {op}, which has no forward-mode derivative in PyTorch, and the "
                                f"Hessian-vector products are forward-over-reverse (torch.func.jvp of grad); {remedy}")


def _check_differentiable(model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], params: dict[str, Tensor],
                          batch: tuple[tuple, dict[str, Any], Tensor]) -> None:
    """Refuse a loss_fn whose value does not depend on the weights: torch.func.grad gives such
    a loss zero gradients, and the Hessian would read as exactly zero (a top eigenvalue of 0,
    converged). One plain autograd forward on the first batch tells."""
    args, kwargs, y = batch
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    with torch.enable_grad():
        with layout_named(model, args, kwargs, SPLIT_BATCH_FIX):
            outputs = functional_call(model, leaves, args, kwargs)
        value = loss_fn(outputs, y)
    if not isinstance(value, Tensor) or value.dim() != 0:
        return  # the Hessian's own check names what a loss must be
    if not (value.is_floating_point() and value.requires_grad):
        got = f"a {value.dtype} tensor" + ("" if value.requires_grad else " that does not require grad")
        raise InvalidArgumentError(f"loss_fn(outputs, targets) returned {got}: its value does not depend on the "
                                   "model's weights (detached, .item(), an argmax or a count of errors?), so its "
                                   "Hessian would read as zero; return a differentiable floating-point loss such as "
                                   "F.cross_entropy(outputs, targets)")


def _hvp(model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], data: Iterable):
    """(params, hvp): the detached parameters by name and v -> H v for the Hessian of the
    mean loss over `data` (batches weighted by their size), in eval mode. hvp accepts a
    leading probe dimension on every tensor of v (vmapped). Batches are fed as evaluation's
    split_batch reads them."""
    device = parameter_device(model)
    # an integer parameter (an index table) has no Hessian: it stays the module's own, fixed
    params = {name: p.detach() for name, p in model.named_parameters() if p.is_floating_point()}
    batches = [split_batch(batch, device) for batch in data]
    total = sum(len(y) for _, _, y in batches)
    if total == 0:
        raise InvalidArgumentError("data yielded no batches; pass a DataLoader or a list of (x, y) batches")
    _check_differentiable(model, loss_fn, params, batches[0])

    def loss_grad(args: tuple, kwargs: dict[str, Any], y: Tensor) -> Callable:
        def loss(p: dict[str, Tensor]) -> Tensor:
            value = loss_fn(functional_call(model, p, args, kwargs), y)
            if not isinstance(value, Tensor) or value.dim() != 0:  # torch.func's own error names neither
                got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise InvalidArgumentError(f"loss_fn(outputs, targets) must return the batch's mean loss as a "
                                           f"0-dim tensor, got {got}; reduce it (e.g. .mean())")
            return value

        return torch.func.grad(loss)

    def batch_hvp(args: tuple, kwargs: dict[str, Any], y: Tensor, v: dict[str, Tensor]) -> dict[str, Tensor]:
        return torch.func.jvp(loss_grad(args, kwargs, y), (params,), (v,))[1]  # forward-over-reverse

    def batch_hvp_reverse(args: tuple, kwargs: dict[str, Any], y: Tensor, v: dict[str, Tensor]) -> dict[str, Tensor]:
        return torch.func.vjp(loss_grad(args, kwargs, y), params)[1](v)[0]  # H is symmetric: v^T H = (H v)^T

    reverse = []  # set once forward-over-reverse failed as below: every later product goes reverse

    def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
        out = None
        for args, kwargs, y in batches:
            try:
                product = batch_hvp_reverse if reverse else batch_hvp
                part = torch.func.vmap(functools.partial(product, args, kwargs, y))(v)
            except NotImplementedError as exc:
                named = _no_forward_ad(exc)
                if named is None:
                    raise
                raise named from exc
            except RuntimeError as exc:
                # torch's forward-over-reverse of F.mse_loss writes into an immutable zero
                # tangent ("ZeroTensors are immutable"): reverse-over-reverse gives the same H v
                if reverse or "ZeroTensors are immutable" not in str(exc):
                    raise
                reverse.append(True)
                part = torch.func.vmap(functools.partial(batch_hvp_reverse, args, kwargs, y))(v)
            scale = len(y) / total
            out = {k: t * scale for k, t in part.items()} if out is None else \
                {k: out[k].add_(t, alpha=scale) for k, t in part.items()}
        return out

    return params, hvp


def hessian_diagonal(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Iterable,
    samples: int = 1000,
    *,
    chunk: int = 256,
    seed: int | None = None,
    progress: bool | None = None,
) -> dict[str, Tensor]:
    """Hutchinson's estimate of the diagonal of the Hessian of the mean loss over `data` with
    respect to the parameters: the mean over `samples` Rademacher probes z of z * (H z).

    Returns tensors shaped like the parameters, by name: one per floating-point parameter
    (a tied weight once, under its first name), frozen ones (requires_grad=False) included,
    as in the Hessian of the loss over every weight. Each probe costs one
    Hessian-vector product per batch (vmapped `chunk` probes at a time), where the exact
    diagonal costs one backward pass per parameter. Its variance for entry i is
    sum_{j != i} H_ij^2 / samples, so accuracy grows as sqrt(samples); on the tiny MLP of
    the tests 1000 probes give about 7% error weighted by magnitude. The model runs in eval
    mode (fixed BatchNorm statistics) and is returned as it was. An int `seed` draws the
    probes from a private generator (torch's global RNG untouched); None from the global RNG.
    chunk: a positive int. Batches and loss_fn's arguments as the module docstring says; a
    model with an op that has no forward-mode derivative (transformers' default SDPA
    attention: build it with attn_implementation="eager") raises InvalidArgumentError.
    """
    check_module(model, "hessian_diagonal's model")
    model = unwrap_model(model)  # a compiled or DataParallel model: checkpoints name its module's keys
    if not callable(loss_fn):
        raise InvalidTypeError(f"hessian_diagonal's loss_fn must be a callable(outputs, targets), got "
                               f"{type(loss_fn).__name__}")
    check_data("hessian_diagonal's data", data)
    integer("samples", samples, 1, "Hutchinson probes")
    integer("chunk", chunk, 1, "probes per vmapped batch; lower it to save memory")
    parameter_device(model)  # a model without values (meta, lazy) named before preserved() copies it
    gen = generator(seed)
    with preserved(model):
        model.eval()
        params, hvp = _hvp(model, loss_fn, data)
        acc = {k: torch.zeros_like(p) for k, p in params.items()}
        sizes = [min(chunk, samples - s) for s in range(0, samples, chunk)]
        numels = [p.numel() for p in params.values()]
        for m in progress_bar(sizes, enabled=progress, desc=f"Hutchinson probes, {min(chunk, samples)} a chunk",
                              unit="chunk"):
            # each probe is one draw over every weight in turn, so the probes, and the estimate,
            # do not depend on how many go into a chunk
            flat = torch.randint(0, 2, (m, sum(numels)), generator=gen, dtype=torch.int8).mul_(2).sub_(1)
            z = {k: piece.reshape(m, *p.shape).to(p)
                 for (k, p), piece in zip(params.items(), flat.split(numels, dim=1))}
            hz = hvp(z)
            for k in acc:
                acc[k] += (z[k] * hz[k]).sum(0)
    return {k: v / samples for k, v in acc.items()}


def top_eigenvalue(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Iterable,
    iters: int = 100,
    tol: float = 1e-4,
    *,
    seed: int | None = None,
    progress: bool | None = None,
) -> EigenResult:
    """The dominant eigenvalue of the Hessian of the mean loss over `data` (largest in
    magnitude: the sharpness at a minimum, where the largest eigenvalues are positive) by
    power iteration on Hessian-vector products. Stops when the Rayleigh quotient changes by
    less than tol relative to itself and v is an eigenvector to within sqrt(tol) (residual
    |Hv - theta v| relative to theta; tol is at least 4 eps of the weights' dtype, 0.03 for
    bfloat16), or after `iters` products, unconverged: a Hessian
    whose largest eigenvalues are +lambda and -lambda never converges. Eval mode and `seed` (the
    start vector) as hessian_diagonal. A zero Hessian (H v = 0) gives 0.0, converged; a product
    that is not finite (the loss overflows or is NaN at these weights) stops it at once with a
    warning, unconverged, its value the NaN or infinity."""
    check_module(model, "top_eigenvalue's model")
    model = unwrap_model(model)  # a compiled or DataParallel model: checkpoints name its module's keys
    if not callable(loss_fn):
        raise InvalidTypeError(f"top_eigenvalue's loss_fn must be a callable(outputs, targets), got "
                               f"{type(loss_fn).__name__}")
    check_data("top_eigenvalue's data", data)
    integer("iters", iters, 1, "power iterations")
    if not real("tol", tol) > 0:  # a NaN or negative tol would never count as converged
        raise InvalidArgumentError(f"tol must be positive (a relative change of the eigenvalue), got {tol}")
    parameter_device(model)  # a model without values (meta, lazy) named before preserved() copies it
    gen = generator(seed)
    trace: list[float] = []
    converged = False
    with preserved(model):
        model.eval()
        params, hvp = _hvp(model, loss_fn, data)
        # products in bfloat16 move by a few of its steps (eps 2^-7) from one to the next
        coarsest = max((p.dtype for p in params.values() if p.is_floating_point()),
                       key=lambda dtype: torch.finfo(dtype).eps, default=torch.float32)
        tol = max(tol, 4 * torch.finfo(coarsest).eps)
        v = {k: torch.randn(p.shape, generator=gen).to(p) for k, p in params.items()}
        for _ in progress_bar(range(iters), enabled=progress, desc="power iteration"):
            norm = torch.sqrt(sum((t * t).sum() for t in v.values()))
            if trace and float(norm) == 0.0:  # H v0 = 0 for a random v0: H = 0, whose top eigenvalue is 0
                converged = True
                break
            v = {k: t / norm for k, t in v.items()}
            hv = {k: t[0] for k, t in hvp({k: t[None] for k, t in v.items()}).items()}
            trace.append(float(sum((v[k] * hv[k]).sum() for k in v)))
            if not math.isfinite(trace[-1]):  # nothing after a NaN or an infinity would be finite either
                logger.warning("top_eigenvalue: the Hessian-vector product is not finite at these weights (the "
                               "loss or its gradient overflows, or is NaN); returning %s", trace[-1])
                return EigenResult(trace[-1], trace, False)
            # the Rayleigh quotient also stands still when v swings between the eigenvectors
            # of a +lambda/-lambda pair, so v must be an eigenvector too: its residual
            # |Hv - theta v| bounds the quotient's error by residual^2 / gap, hence sqrt(tol)
            residual = float(torch.sqrt(sum(((hv[k] - trace[-1] * v[k]) ** 2).sum() for k in v)))
            if (len(trace) > 1 and abs(trace[-1] - trace[-2]) <= tol * abs(trace[-1])
                    and residual <= tol**0.5 * abs(trace[-1])):
                converged = True
                break
            v = hv
    if not converged:
        coarse = (f"; the weights are {str(coarsest).removeprefix('torch.')}, whose rounding can keep the products "
                  "from settling: a float32 copy (copy.deepcopy(model).float()) converges further"
                  if torch.finfo(coarsest).bits < 32 else "")
        logger.warning("top_eigenvalue: no convergence in %d iterations (last relative change %.2g)%s", iters,
                       abs(trace[-1] - trace[-2]) / max(abs(trace[-1]), 1e-30) if len(trace) > 1 else float("nan"),
                       coarse)
    return EigenResult(trace[-1], trace, converged)
