"""The TWA papers' own code paths, re-implemented as the baselines benchmarks beat.

Not a backend and not part of the package: nothing dispatches here, and only the benchmarks
and the tests that check the baseline is fair import it. It follows what the public TWA code does, so
that speed and accuracy comparisons are against the method as published:

* journal version (P_Step): one uint8 per code whatever the bit width, one min and scale
  per layer shared by all k rows, and a Python loop over layers that materialises each
  dequantised [k, layer] block before a matmul, for both the projection of the gradient
  and the reconstruction of the weights;
* ICLR version: classical Gram-Schmidt in float32 to orthonormalise the basis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PaperBasis:
    codes: Tensor  # uint8 [k, D], one byte per code
    mins: Tensor  # float32 [n_layers], shared by all rows
    scales: Tensor  # float32 [n_layers]
    layer_sizes: list[int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.mins, self.scales))


def paper_quantize(P: Tensor, bits: int, layer_sizes: Sequence[int]) -> PaperBasis:
    """Per layer: one min/max over all rows, codes round((p - min) / scale) in one byte each."""
    levels = (1 << bits) - 1
    codes = torch.empty(P.shape, dtype=torch.uint8)
    mins, scales = [], []
    start = 0
    for size in layer_sizes:
        block = P[:, start : start + size].float()
        lo, hi = block.min(), block.max()
        scale = (hi - lo) / levels if hi > lo else torch.ones(())
        codes[:, start : start + size] = torch.round((block - lo) / scale).clamp(0, levels).to(torch.uint8)
        mins.append(lo)
        scales.append(scale)
        start += size
    return PaperBasis(codes, torch.stack(mins), torch.stack(scales), list(layer_sizes))


def _layers(pb: PaperBasis):
    start = 0
    for i, size in enumerate(pb.layer_sizes):
        yield i, start, size
        start += size


def paper_project(pb: PaperBasis, g: Tensor) -> Tensor:
    """y[:, i] = dequant(P[:, layer i]) @ g[layer i], one materialised block per layer."""
    y = torch.empty(pb.codes.shape[0], len(pb.layer_sizes), device=pb.codes.device)
    for i, start, size in _layers(pb):
        block = pb.mins[i] + pb.scales[i] * pb.codes[:, start : start + size].float()
        y[:, i] = torch.mm(block, g[start : start + size].reshape(-1, 1)).reshape(-1)
    return y


def paper_reconstruct(pb: PaperBasis, x: Tensor, center: Tensor) -> Tensor:
    """w[layer i] = center + dequant(P[:, layer i])^T @ x[:, i], one block per layer."""
    w = torch.empty_like(center)
    for i, start, size in _layers(pb):
        block = pb.mins[i] + pb.scales[i] * pb.codes[:, start : start + size].float()
        w[start : start + size] = center[start : start + size] + torch.mm(block.T, x[:, i : i + 1]).reshape(-1)
    return w


def paper_twa_step(pb: PaperBasis, g: Tensor, x: Tensor, center: Tensor, lr: float = 1e-3) -> Tensor:
    """One P_Step: project the gradient, take a coefficient step, rebuild the weights."""
    x = x - lr * paper_project(pb, g)
    return paper_reconstruct(pb, x, center)


def paper_gram_schmidt(P: Tensor) -> Tensor:
    """Classical Gram-Schmidt in float32, as in the ICLR code: coefficients against the
    original row, one pass, no re-orthogonalisation."""
    rows: list[Tensor] = []
    for p in P.float():
        v = p.clone()
        if rows:
            Q = torch.stack(rows)
            v = v - Q.T @ (Q @ p)
        rows.append(v / v.norm())
    return torch.stack(rows)
