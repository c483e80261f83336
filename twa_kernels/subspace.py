"""Subspaces of weight space: orthonormalising a basis.

orthonormalize runs CholQR2: a Gram matrix accumulated in float64 (one pass over P), a
Cholesky factor that also decides which rows are dependent, one pass that applies the
inverse factor, then the same once more on the result. Two passes of CholQR with a
float64 Gram keep max|QQ^T - I| at float32 rounding for condition numbers up to ~1e6,
where the classical Gram-Schmidt of the paper's code has lost orthogonality.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import Tensor

from twa_kernels._ops import combine_rows_op, gram_op

logger = logging.getLogger(__name__)


def _independent_rows(gram: Tensor, tol: float) -> tuple[list[int], Tensor]:
    """Cholesky of the Gram matrix row by row, skipping rows whose residual norm is below
    tol times their own norm. Returns the kept rows and the Cholesky factor of their Gram."""
    keep: list[int] = []
    factor = gram.new_zeros((0, 0))
    for i in range(gram.shape[0]):
        norm_sq = float(gram[i, i])
        if keep:
            cross = torch.linalg.solve_triangular(factor, gram[keep, i][:, None], upper=False)[:, 0]
        else:
            cross = gram.new_zeros(0)
        residual_sq = norm_sq - float(cross @ cross)
        if norm_sq <= 0 or residual_sq <= (tol * tol) * norm_sq:
            continue
        m = len(keep)
        grown = gram.new_zeros((m + 1, m + 1))
        grown[:m, :m] = factor
        grown[m, :m] = cross
        grown[m, m] = residual_sq**0.5
        factor = grown
        keep.append(i)
    return keep, factor


def _apply_inverse(factor: Tensor, p: Tensor) -> Tensor:
    eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    inverse = torch.linalg.solve_triangular(factor, eye, upper=False)
    return combine_rows_op(inverse, p)


def orthonormalize(P: Tensor, tol: float = 1e-6) -> Tensor:
    """Orthonormal rows Q [r, D] (float32) spanning the rows of P [k, D].

    Row i is dropped, with a warning, when its residual after removing the rows kept before
    it is below tol times its norm. Q[i] is Gram-Schmidt's i-th vector of the kept rows.
    """
    if not isinstance(P, Tensor) or P.dim() != 2 or not P.is_floating_point():
        raise ValueError(f"P must be a floating-point tensor [k, D], got {getattr(P, 'shape', type(P).__name__)}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if not bool(torch.isfinite(P).all()):
        raise ValueError("P has NaN or Inf values; orthonormalize needs finite rows")
    p = P.detach().to(torch.float32).contiguous()
    keep, factor = _independent_rows(gram_op(p), tol)
    dropped = sorted(set(range(P.shape[0])) - set(keep))
    if dropped:
        warnings.warn(
            f"orthonormalize dropped {len(dropped)} of {P.shape[0]} rows as linearly dependent "
            f"(residual below tol={tol:g} of the row norm): rows {dropped[:20]}",
            RuntimeWarning,
            stacklevel=2,
        )
    if not keep:
        return p.new_zeros((0, p.shape[1]))
    if len(keep) < p.shape[0]:
        p = p[keep].contiguous()
    q = _apply_inverse(factor, p)  # first CholQR pass: orthogonal up to ~cond(P)^2 * eps64
    second = torch.linalg.cholesky(gram_op(q))
    return _apply_inverse(second, q)  # second pass: orthogonal to float32 rounding
