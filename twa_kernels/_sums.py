"""Float64 sums over tensors of any size, a chunk at a time: the fingerprints that tell
whether two copies of a weight (two ranks', or one before and after a forward) hold the
same values, without a float64 copy of the whole tensor (8 bytes per element: 56 GB for a
7B-parameter model's center)."""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 1 << 20  # elements cast to float64 at a time: 8 MB, whatever the tensor's size


@torch.no_grad()
def float64_sums(value: Tensor, period: int | None = None) -> Tensor:
    """[sum, sum of squares, position-weighted sum] of `value`'s elements in float64 (a
    complex tensor's as real pairs), on value's device. Positions count from 0; with
    `period`, the weights are position mod period + 1 (bounded, so that the weighted sum of
    a huge tensor keeps its precision)."""
    flat = (torch.view_as_real(value) if value.is_complex() else value).detach().reshape(-1)
    ramp = torch.arange(min(flat.numel(), CHUNK), dtype=torch.float64, device=flat.device)
    totals = torch.zeros(3, dtype=torch.float64, device=flat.device)
    for i, chunk in enumerate(flat.split(CHUNK)):
        part = chunk.to(torch.float64)
        position = ramp[:part.numel()] + i * CHUNK
        if period is not None:
            position = position.remainder_(period).add_(1)
        totals += torch.stack([part.sum(), part.square().sum(), (part * position).sum()])
    return totals
