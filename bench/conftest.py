"""Shared setup for the benchmarks: sizes, synthetic bases, and the run's machine info.

TWA_BENCH picks the size grid: "quick" (k=16, ResNet-18, 4-bit), "default" (k = 16 and 72,
ResNet-18, bits 1/2/4/8) or "full" (default plus CLIP ViT-B/32 at 88M weights, and
orthonormalize at k = 72).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from paper_baseline import PaperBasis  # noqa: E402
from shapes import MODELS  # noqa: E402
from stamp import stamp  # noqa: E402

from twa_kernels._memory import empty_huge  # noqa: E402
from twa_kernels.quant import QuantizedBasis, block_offsets_from_sizes, packed_row_bytes  # noqa: E402

GRIDS = {
    "quick": dict(models=["resnet18"], ks=[16], bits=[4], orthonormalize_ks=[16]),
    "default": dict(models=["resnet18"], ks=[16, 72], bits=[1, 2, 4, 8], orthonormalize_ks=[16]),
    # orthonormalize works on a dense float basis: k=72 x 88M would need 25 GB, so its
    # largest case is k=72 at ResNet-18 size
    "full": dict(models=["resnet18", "clip-vit-b32"], ks=[16, 72], bits=[1, 2, 4, 8], orthonormalize_ks=[16, 72]),
}
GRID = GRIDS[os.environ.get("TWA_BENCH", "default")]
GROUP_SIZE = 128


def cases() -> list[tuple[str, int, int]]:
    return [(m, k, b) for m in GRID["models"] for k in GRID["ks"] for b in GRID["bits"]]


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` on huge pages (empty_huge), touched. The kernels' basis, center and
    output live there, as tk.TWA's do: a copy, a peer or a plain read on 4 KiB pages would be
    slowed by TLB misses the kernels do not pay, and the kernels' fraction of it flattered."""
    return empty_huge(tuple(t.shape), t.dtype).copy_(t)


def random_packed_basis(k: int, sizes: list[int], bits: int) -> QuantizedBasis:
    """A packed basis with random codes: the kernels' cost does not depend on the values,
    and quantising a dense k x 88M float basis would not fit a 24 GiB machine's memory."""
    gen = torch.Generator().manual_seed(0)
    d = sum(sizes)
    n_groups = -(-d // GROUP_SIZE)
    # on huge pages, as the library's own bases are (quant.stack_rows)
    codes = torch.randint(0, 256, (k, packed_row_bytes(d, bits, GROUP_SIZE)), generator=gen,
                          out=empty_huge((k, packed_row_bytes(d, bits, GROUP_SIZE)), torch.uint8))
    scales = torch.rand(n_groups, k, generator=gen) * 1e-3
    mins = -scales * ((1 << bits) - 1) / 2
    return QuantizedBasis(codes, scales, mins, block_offsets_from_sizes(sizes, d), bits, GROUP_SIZE, d)


def random_paper_basis(k: int, sizes: list[int], bits: int) -> PaperBasis:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (k, sum(sizes)), dtype=torch.uint8, generator=gen)
    scales = torch.rand(len(sizes), generator=gen) * 1e-3
    return PaperBasis(codes, -scales * ((1 << bits) - 1) / 2, scales, list(sizes))


class _Cache:
    """Keeps only the most recent basis so that the large grids fit in memory."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, make):
        if key != self.key:
            self.key, self.value = None, None
            self.value, self.key = make(), key
        return self.value


_packed, _paper = _Cache(), _Cache()


@pytest.fixture
def bases():
    def get(model: str, k: int, bits: int):
        sizes = MODELS[model]()
        return (_packed.get((model, k, bits), lambda: random_packed_basis(k, sizes, bits)),
                _paper.get((model, k, bits), lambda: random_paper_basis(k, sizes, bits)))

    return get


@pytest.fixture(autouse=True)
def _fused_backend(monkeypatch):
    monkeypatch.setenv("TWA_KERNELS_BACKEND", "cpp")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["grid"] = os.environ.get("TWA_BENCH", "default")
    machine_info["node"] = None  # the host's name: the stamp says which machine ran it


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # machine, date, commit and software of the run, in the same form as every other results file
    output_json["stamp"] = stamp()
