"""Linear interpolation between two checkpoints, and its loss and error barriers.

    r = tk.connectivity.interpolate(model, a, b, data, steps=11, bn="recompute")
    r.alphas, r.loss, r.error, r.loss_barrier, r.error_barrier      # error in [0, 1]

Barriers (both for the loss and for the error): max over alpha of
E(alpha) - ((1 - alpha) E(0) + alpha E(1)), on the evaluated alphas, endpoints included.
Zero for a model with itself, and never negative: the endpoints lie on the chord, so a path
whose every interpolant beats the chord reads 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from twa_kernels._checks import check_module, integer
from twa_kernels._progress import progress_bar
from twa_kernels.errors import CheckpointError
from twa_kernels.geometry.evaluation import (
    Checkpoint,
    Metric,
    SameBatches,
    check_bn,
    check_data,
    check_masks,
    check_points,
    agreed_buffer,
    checked_entry,
    checkpoint_source,
    classification_metric,
    evaluate,
    finite_or_none,
    fixed_buffers,
    load_checkpoint,
    mixable,
    mixed_buffers,
    parameter_device,
    preserved,
)
from twa_kernels.io import unwrap_model

logger = logging.getLogger(__name__)


def _barrier(values: Sequence[float], alphas: Sequence[float]) -> float:
    """The largest rise of `values` above the straight line between its ends. The line is
    first + a * (last - first): exactly `first` at every alpha when the ends are equal (the
    form (1 - a) * first + a * last is not), so identical endpoints give a barrier of 0.
    A NaN anywhere on the path makes the barrier NaN: Python's max would skip it and report
    the rest of the path as if the diverged point were not there."""
    first, last = values[0], values[-1]
    rises = [v - (first + a * (last - first)) for v, a in zip(values, alphas)]
    return float("nan") if any(math.isnan(r) for r in rises) else max(rises)



def _float_entry(state: Mapping[str, Tensor], key: str, own: Tensor, source: str) -> Tensor:
    """checked_entry, and floating-point (or complex): an integer tensor where the model has a
    float one would be cast and mixed as if it were weights."""
    value = checked_entry(state, key, tuple(own.shape), source)
    if not mixable(value):
        raise CheckpointError(f"{source}: key {key!r} is {value.dtype}, not a floating-point weight")
    return value


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
        """Loss and error at each alpha, and the barriers, as printable text."""
        lines = [f"{'alpha':>6} {'loss':>9} {'error (%)':>10}"]
        lines += [f"{a:>6.2f} {l:>9.4f} {100 * e:>10.2f}" for a, l, e in zip(self.alphas, self.loss, self.error)]
        lines.append(f"barrier: loss {self.loss_barrier:.4f}, error {100 * self.error_barrier:.2f} points (bn={self.bn})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The interpolation as JSON-safe data (a NaN or infinite value as None)."""
        return dict(alphas=self.alphas, loss=finite_or_none(self.loss), error=finite_or_none(self.error),
                    loss_barrier=finite_or_none(self.loss_barrier), error_barrier=finite_or_none(self.error_barrier),
                    bn=self.bn)


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
    progress: bool | None = None,
) -> Interpolation:
    """Evaluate `model` at (1 - alpha) a + alpha b for `steps` evenly spaced alphas in [0, 1].

    a and b are state_dicts or checkpoint paths, their keys matched to the model's names
    (wrapper prefixes `module.` and `_orig_mod.`, a Lightning .ckpt of a LightningModule
    holding the network as `self.model`, tied weights saved under one name: see io.keys).
    data yields (inputs, targets) tuples, or mappings (Hugging Face batches) fed to the model
    as keyword arguments whose "labels" are the targets. metric(outputs, targets) returns
    the batch's (mean loss, error fraction) from the model's output as it is; the default is
    cross-entropy and top-1 error of the logits (a ModelOutput's `.logits`). masks
    ({parameter name: 0/1 or bool tensor}; a tied parameter under any of its names) multiply
    the weights at every alpha, so interpolants of sparse networks stay sparse. The
    checkpoints' floating-point buffers are mixed like the weights (BatchNorm statistics as
    `bn` says); their integer and bool ones (a channel permutation) must agree and are
    taken as they are. Buffers that a state_dict does not hold (non-persistent ones, such
    as a rotary embedding's inv_freq) are the model's own. See the module docstring for
    `bn` and the barriers. Parameters are mixed with torch.lerp, which is exact at alpha 0
    and 1 and when a and b agree.
    """
    check_module(model, "interpolate's model")
    model = unwrap_model(model)  # a compiled or DataParallel model: checkpoints name its module's keys
    check_bn(bn)
    check_data("interpolate's data", data)
    if bn_data is not None:
        check_data("interpolate's bn_data", bn_data)
    steps = integer("steps", steps, 2, "alpha 0 and 1 at least")
    check_points(f"steps={steps}", steps)
    device = parameter_device(model)  # before masks and checkpoints are read: a model without values is named first
    mask = check_masks(model, masks)
    params = dict(model.named_parameters())
    mixed = {**{k: p for k, p in params.items() if mixable(p)}, **mixed_buffers(model, bn)}
    fixed = {**{k: p for k, p in params.items() if not mixable(p)}, **fixed_buffers(model)}
    ends, kept, sources = [], [], []
    for i, ckpt in enumerate((a, b)):
        source = checkpoint_source(ckpt, i)
        state = load_checkpoint(ckpt, source, model)
        ends.append({k: _float_entry(state, k, own, source).to(device=device, dtype=own.dtype)
                     for k, own in mixed.items()})
        kept.append({k: checked_entry(state, k, tuple(own.shape), source).to(device=device, dtype=own.dtype)
                     for k, own in fixed.items()})
        sources.append(source)
    constant = {k: agreed_buffer(k, [kept[0][k], kept[1][k]], sources) for k in fixed}
    alphas = [i / (steps - 1) for i in range(steps)]
    losses, errors = [], []
    bn_batches = bn_data if bn_data is not None else data
    # one shuffle of the BatchNorm data, and one of the data, for every alpha
    same_batches, same_data = SameBatches(bn_batches), SameBatches(data)
    with preserved(model):
        for alpha in progress_bar(alphas, enabled=progress, desc="interpolating"):
            weights = {k: torch.lerp(ends[0][k], ends[1][k], alpha) for k in ends[0]}
            for name, m in mask.items():
                weights[name].mul_(m)
            weights.update(constant)
            loss, error = evaluate(model, weights, data, metric, bn, bn_batches, same_batches, same_data)
            losses.append(loss)
            errors.append(error)
    result = Interpolation(alphas, losses, errors, _barrier(losses, alphas), _barrier(errors, alphas), bn)
    logger.info("interpolation: loss barrier %.4f, error barrier %.4f", result.loss_barrier, result.error_barrier)
    return result
