"""Checkpoints and evaluation: what interpolation and planes share.

A checkpoint is a state_dict or a path (io.load_state_dict reads every format the package
does). Every model runs through torch.func.functional_call with the weights under study:
the model's own parameters are never written, and its buffers (BatchNorm statistics) are
restored when a call returns (`preserved`).

BatchNorm, the `bn` argument. A point between two networks needs BatchNorm statistics of
its own: "recompute" (the default) re-estimates them at every point with update_bn's
semantics (reset, momentum None, one pass in train mode over `bn_data`, which defaults to
`data`); "interpolate" mixes the checkpoints' running statistics with the weights'
coefficients, as the code of McDermott & Cummings (arXiv 2310.18769) does, for comparison;
"none" uses the model's buffers as they are.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from twa_kernels.batchnorm import update_bn
from twa_kernels.errors import InvalidArgumentError
from twa_kernels.io import CheckpointError, StateDict, check_finite, load_state_dict, unwrap_state_dict

Checkpoint = str | os.PathLike | Mapping[str, Tensor]
Metric = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
BN_MODES = ("recompute", "interpolate", "none")
_BN_STATS = ("running_mean", "running_var")


def classification_metric(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy, top-1 error fraction) of a batch of logits [N, C] and labels [N]."""
    return F.cross_entropy(outputs, targets), (outputs.argmax(dim=1) != targets).float().mean()


def load_checkpoint(checkpoint: Checkpoint, source: str) -> StateDict:
    """The whole state_dict. A NaN or Inf anywhere is refused, naming the checkpoint and the key."""
    state = unwrap_state_dict(checkpoint, source) if isinstance(checkpoint, Mapping) else load_state_dict(checkpoint)
    check_finite(state, source)
    return state


def checkpoint_label(checkpoint: Checkpoint, index: int) -> str:
    """A short label for plots: the file's stem, or the checkpoint's position."""
    return Path(checkpoint).stem if isinstance(checkpoint, (str, os.PathLike)) else f"checkpoint #{index}"


def checkpoint_source(checkpoint: Checkpoint, index: int) -> str:
    """The checkpoint's name in error messages: its path, or its position."""
    return str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else f"checkpoint #{index}"


def checked_entry(state: Mapping[str, Tensor], key: str, shape: tuple[int, ...], source: str) -> Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r} that the model has (it has {len(state)} keys, e.g. "
                              f"{list(state)[:3]}); was it saved from this model?")
    value = state[key]
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"{source}: key {key!r} has shape {tuple(value.shape)} but the model's is "
                              f"{tuple(shape)}; the checkpoints must come from one architecture")
    return value


def float_buffers(model: nn.Module, include_bn_stats: bool) -> dict[str, Tensor]:
    out = {}
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and (include_bn_stats or not name.endswith(_BN_STATS)):
            out[name] = buf
    return out


def check_bn(bn: str) -> None:
    if bn not in BN_MODES:
        raise InvalidArgumentError(f"bn must be one of {BN_MODES}, got {bn!r}")


def check_masks(model: nn.Module, masks: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    if masks is None:
        return {}
    params = dict(model.named_parameters())
    out = {}
    for name, mask in masks.items():
        if name not in params:
            raise InvalidArgumentError(f"mask for {name!r}: the model has no such parameter (e.g. {list(params)[:3]})")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise InvalidArgumentError(f"mask for {name!r} has shape {tuple(mask.shape)} but the parameter's is "
                             f"{tuple(params[name].shape)}")
        out[name] = mask.to(device=params[name].device, dtype=params[name].dtype)
    return out


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
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
def evaluate(model: nn.Module, weights: dict[str, Tensor], data: Iterable, metric: Metric, bn: str,
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
            raise InvalidArgumentError(f"data must yield (inputs, targets) batches, got {type(batch).__name__}")
        x, y = batch[0].to(device), batch[1].to(device)
        loss, error = metric(functional_call(model, weights, (x,)), y)
        n = len(y)
        loss_sum, error_sum, count = loss_sum + float(loss) * n, error_sum + float(error) * n, count + n
    if count == 0:
        raise InvalidArgumentError("data yielded no batches; pass a re-iterable (a DataLoader or a list of (x, y) batches), "
                         "not a generator, which is empty after its first pass")
    if not -1e-6 <= error_sum / count <= 1 + 1e-6:
        raise InvalidArgumentError(f"the metric's error is {error_sum / count:g}, outside [0, 1]: metric(outputs, targets) "
                         "must return (mean loss, error fraction)")
    return loss_sum / count, error_sum / count
