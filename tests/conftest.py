import pytest
import torch

# Backends that must agree with the reference on CPU tensors. The Triton backend joins
# this list when TRITON_INTERPRET=1 runs are added (issue: GPU kernels).
CPU_BACKENDS = ["cpp"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=CPU_BACKENDS)
def backend_name(request, monkeypatch):
    """Forces the backend under test for the duration of one test."""
    monkeypatch.setenv("TWA_KERNELS_BACKEND", request.param)
    return request.param


def random_basis(k: int, d: int, *, constant_groups: int = 0, group_size: int = 8) -> torch.Tensor:
    """Random rows on varied scales; the first `constant_groups` groups of each row are flat."""
    P = torch.randn(k, d) * torch.logspace(-2, 1, k)[:, None]
    for t in range(constant_groups):
        P[:, t * group_size : (t + 1) * group_size] = torch.randn(k, 1)
    return P
