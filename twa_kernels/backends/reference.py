"""The executable spec: every op in plain torch, accumulated in float64.

Slow on purpose: it dequantises the basis (a column chunk at a time, so it still runs at
ResNet or ViT scale) and leaves nothing to cleverness. Every other backend is tested
against it. The formulas are those of docs/design.md ("Math of each op").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor

from twa_kernels._ops import register_kernel
from twa_kernels.errors import warn_at_caller
from twa_kernels.quant import QuantizedBasis, dequantize, round_groups_int8, unround_groups_int8

_CHUNK_ELEMENTS = 1 << 22  # basis elements dequantised at a time


def _basis(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, bits: int, group_size: int,
           num_cols: int) -> QuantizedBasis:
    return QuantizedBasis(codes, scales, mins, block_offsets, bits or None, group_size, num_cols)


def _column_chunks(qb: QuantizedBasis) -> Iterator[tuple[int, int, Tensor]]:
    """(start, stop, block index of each column) over column chunks aligned to groups."""
    step = max(1, _CHUNK_ELEMENTS // qb.k)
    step = -(-step // qb.group_size) * qb.group_size
    edges = qb.block_offsets[1:-1]
    for start in range(0, qb.num_cols, step):
        stop = min(start + step, qb.num_cols)
        cols = torch.arange(start, stop, device=qb.device)
        yield start, stop, torch.bucketize(cols, edges, right=True)


@register_kernel("project", "reference")
def project(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, g: Tensor, bits: int,
            group_size: int) -> Tensor:
    """y[r, b] = sum over the columns j of block b of p^[r, j] g[j], float32 [k, B]."""
    qb = _basis(codes, scales, mins, block_offsets, bits, group_size, g.numel())
    y = torch.zeros(qb.k, qb.num_blocks, dtype=torch.float64, device=g.device)
    for start, stop, blocks in _column_chunks(qb):
        terms = dequantize(qb, start, stop).double() * g[start:stop].double()
        y.index_add_(1, blocks, terms)
    return y.float()


@register_kernel("project_pieces", "reference")
def project_pieces(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, pieces: list[Tensor],
                   bits: int, group_size: int) -> Tensor:
    """project of the pieces concatenated (flattened) in order."""
    return project(codes, scales, mins, block_offsets, torch.cat([p.reshape(-1) for p in pieces]), bits, group_size)


@register_kernel("project_int8", "reference")
def project_int8(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, pieces: list[Tensor],
                 bits: int, group_size: int) -> Tensor:
    """project of the concatenated pieces rounded to int8 per basis group
    (quant.round_groups_int8) and scaled back."""
    g = torch.cat([p.reshape(-1) for p in pieces])
    g_hat = unround_groups_int8(*round_groups_int8(g, group_size), group_size)
    return project(codes, scales, mins, block_offsets, g_hat, bits, group_size)


@register_kernel("reconstruct_into", "reference")
def reconstruct_into(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, x: Tensor,
                     center: Optional[Tensor], bits: int, group_size: int, out: Tensor) -> None:
    """out[j] = center[j] + sum_r p^[r, j] x[r, block(j)] (no center: 0), summed in float64
    and rounded once to out's dtype; out may be the center itself."""
    qb = _basis(codes, scales, mins, block_offsets, bits, group_size, out.numel())
    x = x.double()
    for start, stop, blocks in _column_chunks(qb):
        w = (dequantize(qb, start, stop).double() * x[:, blocks]).sum(0)
        if center is not None:
            w += center[start:stop].double()
        out[start:stop] = w.to(out.dtype)


@register_kernel("reconstruct", "reference")
def reconstruct(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, x: Tensor,
                center: Optional[Tensor], bits: int, group_size: int, num_cols: int) -> Tensor:
    """reconstruct_into a new tensor of num_cols elements, in the center's dtype (else float32)."""
    out = torch.empty(num_cols, dtype=center.dtype if center is not None else torch.float32, device=x.device)
    reconstruct_into(codes, scales, mins, block_offsets, x, center, bits, group_size, out)
    return out


@register_kernel("gram", "reference")
def gram(p: Tensor) -> Tensor:
    """P P^T of a dense [k, D] basis, float64 [k, k]."""
    p64 = p.double()
    return p64 @ p64.T


@register_kernel("combine_rows", "reference")
def combine_rows(t: Tensor, p: Tensor) -> Tensor:
    """T P, accumulated in float64, returned as float32 [r, D]."""
    return (t @ p.double()).float()


def orthonormalize(P: Tensor, tol: float = 1e-6) -> Tensor:
    """Spec of tk.orthonormalize: Gram-Schmidt with re-orthogonalisation (CGS2) in float64.

    Row i is kept when its residual after removing the span of the kept rows before it is
    at least tol times its own norm; kept rows are normalised. Returns float32 [r, D].
    """
    basis: list[Tensor] = []
    dropped = []
    for i, row in enumerate(P.double()):
        norm = row.norm()
        v = row.clone()
        if basis:
            Q = torch.stack(basis)
            for _ in range(2):
                v -= Q.T @ (Q @ v)
        if norm == 0 or v.norm() < tol * norm:
            dropped.append(i)
            continue
        basis.append(v / v.norm())
    if dropped:
        warn_at_caller(f"orthonormalize dropped {len(dropped)} dependent row(s): {dropped}", RuntimeWarning)
    if not basis:
        return P.new_zeros((0, P.shape[1]), dtype=torch.float32)
    return torch.stack(basis).float()
