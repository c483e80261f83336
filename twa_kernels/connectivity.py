"""Weight-space geometry: linear interpolation and barriers, loss planes, sharpness.

    r = tk.connectivity.interpolate(model, a, b, data, steps=11, bn="recompute")
    r.alphas, r.loss, r.error, r.loss_barrier, r.error_barrier      # error in [0, 1]
    p = tk.connectivity.plane(model, [a, b, c], data, grid=(21, 21), bits=4)
    tk.connectivity.plot_plane(p, "plane.png", points={"SWA": swa_state, "TWA": "twa.pt"})
    diag = tk.connectivity.hessian_diagonal(model, loss_fn, data, samples=1000)
    value, trace, converged = tk.connectivity.top_eigenvalue(model, loss_fn, data)

`a`, `b`, `c` are state_dicts or checkpoint paths; `data` is a re-iterable of (x, y)
batches (a DataLoader or a list). Every model runs through torch.func.functional_call with
the weights under study: the model's own parameters are never written, and its buffers
(BatchNorm statistics) are restored when a call returns.

BatchNorm, the `bn` argument. A point between two networks needs BatchNorm statistics of
its own: "recompute" (the default) re-estimates them at every point with update_bn's
semantics (reset, momentum None, one pass in train mode over `bn_data`, which defaults to
`data`); "interpolate" mixes the checkpoints' running statistics with the weights'
coefficients, as the code of McDermott & Cummings (arXiv 2310.18769) does, for comparison;
"none" uses the model's buffers as they are.

Barriers (both for the loss and for the error): max over alpha of
E(alpha) - ((1 - alpha) E(0) + alpha E(1)), on the evaluated alphas. Zero for a model with
itself; it can be negative when every interpolant beats the chord.

The plane through a, b, c is a + x u + y v with (u, v) orthonormal: the rows b - a and
c - a are packed once into a QuantizedBasis (`bits`, default None = dense float32; 4
packs them to half a byte per weight) and every grid point is one call of the fused
`reconstruct` op, mapping orthonormal coordinates to the basis's coefficients through the
Cholesky factor of its Gram matrix (so the coordinates are exactly orthonormal for the
vectors the op reconstructs, quantised or not). Memory: the origin, the packed basis and
one reconstructed weight vector at a time; the construction streams the checkpoints.

Sharpness: Hutchinson's estimator of the Hessian diagonal, E[z * Hz] with Rademacher z,
and power iteration for the dominant Hessian eigenvalue, both on Hessian-vector products
by forward-over-reverse differentiation (torch.func.jvp of torch.func.grad), vectorised
over probes with vmap. The model runs in eval mode (fixed BatchNorm statistics), so the
loss is a deterministic function of the parameters.

State: interpolate is done and tested (tests/test_connectivity.py), its signature fixed;
plane, plot_plane, hessian_diagonal, top_eigenvalue and the CLI are in progress.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from twa_kernels.averaging import update_bn
from twa_kernels.io import CheckpointError, StateDict, load_state_dict, unwrap_state_dict
from twa_kernels.ops import project, reconstruct
from twa_kernels.quant import SUPPORTED_BITS, QuantizedBasis, _quantize_row, block_offsets_from_sizes, stack_rows
from twa_kernels.subspace import Subspace

logger = logging.getLogger(__name__)

Checkpoint = Union[str, os.PathLike, Mapping[str, Tensor]]
Metric = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
BN_MODES = ("recompute", "interpolate", "none")
_BN_STATS = ("running_mean", "running_var")


def classification_metric(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy, top-1 error fraction) of a batch of logits [N, C] and labels [N]."""
    return F.cross_entropy(outputs, targets), (outputs.argmax(dim=1) != targets).float().mean()


# ---- checkpoints and evaluation -----------------------------------------------------------


def _load(checkpoint: Checkpoint, source: str) -> tuple[StateDict, bool]:
    """(state_dict, owned): owned when it was read from a file, so entries may be freed."""
    if isinstance(checkpoint, Mapping):
        return unwrap_state_dict(checkpoint, source), False
    return load_state_dict(checkpoint), True


def _name(checkpoint: Checkpoint, index: int) -> str:
    return Path(checkpoint).stem if isinstance(checkpoint, (str, os.PathLike)) else f"checkpoint #{index}"


def _entry(state: Mapping[str, Tensor], key: str, shape: tuple[int, ...], source: str) -> Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r} that the model has (it has {len(state)} keys, e.g. "
                              f"{list(state)[:3]}); was it saved from this model?")
    value = state[key]
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"{source}: key {key!r} has shape {tuple(value.shape)} but the model's is "
                              f"{tuple(shape)}; the checkpoints must come from one architecture")
    return value


def _float_buffers(model: nn.Module, include_bn_stats: bool) -> dict[str, Tensor]:
    out = {}
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and (include_bn_stats or not name.endswith(_BN_STATS)):
            out[name] = buf
    return out


def _check_bn(bn: str) -> None:
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")


def _check_masks(model: nn.Module, masks: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    if masks is None:
        return {}
    params = dict(model.named_parameters())
    out = {}
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"mask for {name!r}: the model has no such parameter (e.g. {list(params)[:3]})")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)} but the parameter's is "
                             f"{tuple(params[name].shape)}")
        out[name] = mask.to(device=params[name].device, dtype=params[name].dtype)
    return out


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Restore the model's buffers and train/eval mode on exit: BatchNorm recomputation
    writes the buffers, and callers must get their model back as it was."""
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    was_training = model.training
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])
        model.train(was_training)


@torch.no_grad()
def _evaluate(model: nn.Module, weights: dict[str, Tensor], data: Iterable, metric: Metric, bn: str,
              bn_data: Iterable) -> tuple[float, float]:
    """Mean loss and error over `data` at `weights` (parameters and perhaps buffers by name)."""
    if bn == "recompute":
        update_bn(bn_data, model, weights=weights)
    model.eval()
    device = next(iter(weights.values())).device
    loss_sum = error_sum = 0.0
    count = 0
    for batch in data:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError(f"data must yield (inputs, targets) batches, got {type(batch).__name__}")
        x, y = batch[0].to(device), batch[1].to(device)
        loss, error = metric(functional_call(model, weights, (x,)), y)
        n = len(y)
        loss_sum, error_sum, count = loss_sum + float(loss) * n, error_sum + float(error) * n, count + n
    if count == 0:
        raise ValueError("data yielded no batches; pass a re-iterable (a DataLoader or a list of (x, y) batches), "
                         "not a generator, which is empty after its first pass")
    if not -1e-6 <= error_sum / count <= 1 + 1e-6:
        raise ValueError(f"the metric's error is {error_sum / count:g}, outside [0, 1]: metric(outputs, targets) "
                         "must return (mean loss, error fraction)")
    return loss_sum / count, error_sum / count


def _barrier(values: Sequence[float], alphas: Sequence[float]) -> float:
    first, last = values[0], values[-1]
    return max(v - ((1.0 - a) * first + a * last) for v, a in zip(values, alphas))


def _progress(items, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, leave=False)


# ---- linear interpolation -----------------------------------------------------------------


@dataclass
class Interpolation:
    """Loss and error along (1 - alpha) a + alpha b, and their barriers."""

    alphas: list[float]
    loss: list[float]
    error: list[float]
    loss_barrier: float
    error_barrier: float
    bn: str = "recompute"

    def table(self) -> str:
        lines = [f"{'alpha':>6} {'loss':>9} {'error (%)':>10}"]
        lines += [f"{a:>6.2f} {l:>9.4f} {100 * e:>10.2f}" for a, l, e in zip(self.alphas, self.loss, self.error)]
        lines.append(f"barrier: loss {self.loss_barrier:.4f}, error {100 * self.error_barrier:.2f} points (bn={self.bn})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dict(alphas=self.alphas, loss=self.loss, error=self.error, loss_barrier=self.loss_barrier,
                    error_barrier=self.error_barrier, bn=self.bn)


def interpolate(
    model: nn.Module,
    a: Checkpoint,
    b: Checkpoint,
    data: Iterable,
    steps: int = 11,
    bn: str = "recompute",
    metric: Metric = classification_metric,
    masks: Mapping[str, Tensor] | None = None,
    *,
    bn_data: Iterable | None = None,
    progress: bool = False,
) -> Interpolation:
    """Evaluate `model` at (1 - alpha) a + alpha b for `steps` evenly spaced alphas in [0, 1].

    metric(outputs, targets) returns the batch's (mean loss, error fraction); the default is
    cross-entropy and top-1 error. masks ({parameter name: 0/1 or bool tensor}) multiply the
    weights at every alpha, so interpolants of sparse networks stay sparse. See the module
    docstring for `bn` and the barriers. Parameters are mixed with torch.lerp, which is exact
    at alpha 0 and 1 and when a and b agree.
    """
    _check_bn(bn)
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2 (alpha 0 and 1 at least), got {steps!r}")
    mask = _check_masks(model, masks)
    params = dict(model.named_parameters())
    buffers = _float_buffers(model, include_bn_stats=bn == "interpolate")
    ends = []
    for i, ckpt in enumerate((a, b)):
        source = _name(ckpt, i)
        state, _ = _load(ckpt, source)
        wanted = {**{k: p.shape for k, p in params.items()}, **{k: t.shape for k, t in buffers.items()}}
        device = next(iter(params.values())).device
        ends.append({k: _entry(state, k, tuple(s), source).to(device=device, dtype=(params.get(k) if k in params
                                                                                     else buffers[k]).dtype)
                     for k, s in wanted.items()})
    alphas = [i / (steps - 1) for i in range(steps)]
    losses, errors = [], []
    with _preserved(model):
        for alpha in _progress(alphas, progress, "interpolating"):
            weights = {k: torch.lerp(ends[0][k], ends[1][k], alpha) for k in ends[0]}
            for name, m in mask.items():
                weights[name].mul_(m)
            loss, error = _evaluate(model, weights, data, metric, bn, bn_data if bn_data is not None else data)
            losses.append(loss)
            errors.append(error)
    result = Interpolation(alphas, losses, errors, _barrier(losses, alphas), _barrier(errors, alphas), bn)
    logger.info("interpolation: loss barrier %.4f, error barrier %.4f", result.loss_barrier, result.error_barrier)
    return result
