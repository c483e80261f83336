import warnings

import pytest
import torch

import twa_kernels as tk
from twa_kernels.backends import reference

from bench.paper_baseline import paper_gram_schmidt


def ill_conditioned(k: int, d: int, cond: float) -> torch.Tensor:
    """float32 rows with singular values spread log-evenly from 1 to 1/cond, built so the
    stored float32 matrix itself has that condition number (checked in float64)."""
    u, _ = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return ((u * s) @ v.T).float()


def nearly_collinear_checkpoints(k: int, d: int) -> torch.Tensor:
    """Checkpoints of one run: a shared weight vector plus small, shrinking steps."""
    w = torch.randn(d, dtype=torch.float64)
    steps = torch.randn(k, d, dtype=torch.float64) * torch.logspace(-2, -5, k, dtype=torch.float64)[:, None]
    return (w + steps.cumsum(0)).float()


def orthogonality_error(Q: torch.Tensor) -> float:
    Q = Q.double()
    return float((Q @ Q.T - torch.eye(Q.shape[0], dtype=torch.float64, device=Q.device)).abs().max())


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_orthonormal_for_ill_conditioned_rows_where_classical_gs_fails(backend_name, device, cond):
    P = ill_conditioned(16, 5000, cond).to(device)
    assert torch.linalg.cond(P.double()) > cond / 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row at the tolerance may be dropped
        Q = tk.orthonormalize(P, tol=2**-23)
    assert Q.shape == (16, 5000)
    assert orthogonality_error(Q) <= 1e-6
    # Q spans P: projecting P onto Q's rows reproduces it
    Pd, Qd = P.double(), Q.double()
    assert float((Pd - (Pd @ Qd.T) @ Qd).norm() / Pd.norm()) < 1e-6
    if cond >= 1e4:
        assert orthogonality_error(paper_gram_schmidt(P.cpu())) > 1e-3


def test_checkpoints_of_one_run(backend_name, device):
    P = nearly_collinear_checkpoints(12, 20000).to(device)
    Q = tk.orthonormalize(P)
    assert orthogonality_error(Q) <= 1e-6
    assert orthogonality_error(paper_gram_schmidt(P.cpu())) > 100 * orthogonality_error(Q)


def test_matches_reference_gram_schmidt(backend_name, device):
    P = torch.randn(6, 3001, device=device)
    Q = tk.orthonormalize(P)
    torch.testing.assert_close(Q, reference.orthonormalize(P), rtol=0, atol=2e-6)


def test_dependent_and_zero_rows_are_dropped_with_a_warning(backend_name, device):
    P = torch.randn(4, 100, device=device)
    P[2] = P[0] - 2 * P[1]
    P[3] = 0
    with pytest.warns(RuntimeWarning, match=r"dropped 2 of 4 rows .* \[2, 3\]"):
        Q = tk.orthonormalize(P)
    assert Q.shape == (2, 100)
    assert orthogonality_error(Q) <= 1e-6
    with pytest.warns(RuntimeWarning, match=r"\[2, 3\]"):
        expected = reference.orthonormalize(P)
    torch.testing.assert_close(Q, expected, rtol=0, atol=2e-6)


def test_single_row_is_normalised(backend_name, device):
    P = torch.randn(1, 77, device=device) * 3
    torch.testing.assert_close(tk.orthonormalize(P), P / P.norm())


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[k, D\]"):
        tk.orthonormalize(torch.randn(10))
    for tol in (0, 1e-8, 1, 2.5):  # below float32's resolution, or 1 or more, which would drop every row
        with pytest.raises(ValueError, match=r"tol must be in \[2\*\*-23, 1\)"):
            tk.orthonormalize(torch.randn(2, 10), tol=tol)


@pytest.mark.parametrize("seed", range(6))
def test_rows_dependent_up_to_rounding_are_dropped_at_the_smallest_tol(seed):
    # rows 2-4 are sums of rows 0 and 1 in float32: their residuals are rounding, which a tol
    # below 2**-23 kept as directions of their own (rows not orthonormal, or a failed Cholesky)
    torch.manual_seed(seed)
    A = torch.randn(5, 33)
    A[2] = A[0] + A[1]
    A[3] = A[0]
    A[4] = 3 * A[1] - A[2]
    with pytest.warns(RuntimeWarning, match="dropped 3 of 5 rows"):
        Q = tk.orthonormalize(A, tol=2**-23)
    assert Q.shape == (2, 33)
    assert orthogonality_error(Q) <= 1e-6


@pytest.mark.parametrize("seed", [39, 42, 69])
def test_more_rows_than_dimensions_keep_at_most_the_dimension(seed):
    # 12 ill-conditioned rows in 8 dimensions: rounding left a 9th row a residual above tol,
    # and the second Cholesky pass then refused the 9 rows as too close to dependent
    torch.manual_seed(seed)
    P = torch.randn(12, 8) @ torch.diag(torch.logspace(0, -4, 8))
    with pytest.warns(RuntimeWarning, match="dropped 4 of 12 rows"):
        Q = tk.orthonormalize(P)
    assert Q.shape == (8, 8)
    assert orthogonality_error(Q) <= 1e-5
