"""The CUDA kernels (csrc/cuda) without a GPU: they compile with nvcc, and their run code,
executed on the host by the same templates (csrc/cuda/runs.cuh, through emulate.cu), agrees with the
reference. On a GPU, test_ops runs them for real (backend "cuda")."""

import ctypes
import shutil

import pytest
import torch

import twa_kernels as tk
from twa_kernels import _build
from twa_kernels.backends import reference

from tests.helpers import (BITS, SHAPES, assert_one_rounding_of_the_weight, outlier_basis, random_basis,
                           reconstruct_budget)

needs_nvcc = pytest.mark.skipif(_build.find_nvcc() is None, reason="nvcc not found: CUDA sources cannot compile here")


@pytest.fixture(scope="module")
def emulator():
    return ctypes.CDLL(str(_build.build_cuda_kernels()))


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _basis_args(qb):
    i64 = ctypes.c_int64
    return (_ptr(qb.codes), _ptr(qb.scales), _ptr(qb.mins), _ptr(qb.block_offsets), i64(qb.k), i64(qb.num_cols),
            i64(qb.codes.shape[1]), i64(qb.num_blocks), i64(qb.group_size), ctypes.c_int(qb.bits or 0))


DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}


@needs_nvcc
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,d,group_size,blocks", SHAPES + [(6, 40005, 64, [7000, 1, 33004])])
@pytest.mark.parametrize("deterministic", [False, True])
def test_emulated_project_matches_reference(emulator, bits, k, d, group_size, blocks, deterministic):
    qb = tk.quantize(random_basis(k, d, constant_groups=1, group_size=group_size), bits, group_size, blocks)
    g = torch.randn(d).bfloat16() if deterministic else torch.randn(d)
    _assert_project_matches_reference(emulator, qb, g, deterministic)


def _assert_project_matches_reference(emulator, qb, g, deterministic):
    y = torch.zeros(qb.k, qb.num_blocks, dtype=torch.float64)  # the kernels sum into float64
    partial = torch.full(((g.numel() + qb.num_blocks) * qb.k,), float("nan"))  # ample; unused pieces stay NaN
    emulator.twa_cuda_emulate_project(*_basis_args(qb), _ptr(g), DTYPE_CODE[g.dtype], _ptr(y), _ptr(partial),
                                      int(deterministic))
    expected = reference.project(qb.codes, qb.scales, qb.mins, qb.block_offsets, g, qb.bits or 0, qb.group_size)
    budget = float((tk.dequantize(qb).abs() * g.float().abs()).sum(1).max()) * 1e-6
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=budget)


@needs_nvcc
@pytest.mark.parametrize("bits", [1, 4, 8])
@pytest.mark.parametrize("deterministic", [False, True])
def test_emulated_project_of_groups_of_a_million_columns_keeps_the_spec_accuracy(emulator, bits, deterministic):
    # scale * sum(code * g) and min * sum(g) cancel within a group: summed in float32 over a
    # 2^20-column group they came to 2.7 times the tolerance at 4 bits
    d = 2**20 + 3_000  # one whole group and a short one
    torch.manual_seed(0)
    qb = tk.quantize(torch.randn(2, d), bits, 2**20)
    _assert_project_matches_reference(emulator, qb, torch.randn(d) + 1, deterministic)


@needs_nvcc
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("group_size", [128, 1024, 8192])
def test_emulated_project_of_an_outlier_group_keeps_the_spec_accuracy(emulator, bits, group_size):
    # one outlier sets a group's minimum far below its other values: summing code * g and g
    # apart and scaling after, the two terms cancelled to 200-2,000 times the tolerance
    qb, g = outlier_basis(bits, group_size)
    y = torch.zeros(qb.k, qb.num_blocks, dtype=torch.float64)
    emulator.twa_cuda_emulate_project(*_basis_args(qb), _ptr(g), DTYPE_CODE[g.dtype], _ptr(y), _ptr(torch.empty(0)),
                                      0)
    exact = tk.dequantize(qb).double() @ g.double()
    budget = float((tk.dequantize(qb).double().abs() @ g.double().abs()).max()) * 1e-6  # as test_ops measures it
    assert ((y[:, 0] - exact).abs() <= budget).all(), ((y[:, 0] - exact).abs() / budget).tolist()


@needs_nvcc
@pytest.mark.parametrize("deterministic", [False, True])
def test_emulated_project_over_a_block_of_many_runs_keeps_the_spec_accuracy(emulator, deterministic):
    # one block of 120,000 runs whose sums share a sign (g correlated with the row): added
    # into a float32 result each rounded by half an ulp of a large running sum, 1.5 times the
    # tolerance here and hundreds of times at millions of runs
    d = 16 * 8 * 120_000  # runs of 16 groups of 8 columns
    torch.manual_seed(0)
    row = torch.randn(1, d)
    g = 0.3 * row[0] + 0.95 * torch.randn(d)
    _assert_project_matches_reference(emulator, tk.quantize(row, 8, 8), g, deterministic)


@needs_nvcc
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,d,group_size,blocks", SHAPES)
# (center dtype, out dtype): None is no center; float32 -> bfloat16 is a bfloat16 model's forward
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.bfloat16,) * 2, (None, torch.float32),
                                    (torch.float32, torch.bfloat16)])
def test_emulated_reconstruct_matches_reference(emulator, bits, k, d, group_size, blocks, dtypes):
    center_dtype, out_dtype = dtypes
    qb = tk.quantize(random_basis(k, d, constant_groups=1, group_size=group_size), bits, group_size, blocks)
    x = torch.randn(k, qb.num_blocks)
    center = torch.randn(d).to(center_dtype) if center_dtype is not None else None
    out = torch.empty(d, dtype=out_dtype)
    center_code = DTYPE_CODE[center_dtype or out_dtype]
    emulator.twa_cuda_emulate_reconstruct(*_basis_args(qb), _ptr(x), _ptr(center), center_code, _ptr(out),
                                          DTYPE_CODE[out_dtype])
    expected = reference.reconstruct(qb.codes, qb.scales, qb.mins, qb.block_offsets, x, center, qb.bits or 0,
                                     group_size, d)
    budget = reconstruct_budget(qb, x)
    if out.dtype == torch.bfloat16:  # both round to bfloat16: one ulp apart at most
        torch.testing.assert_close(out.float(), expected.float(), rtol=8e-3, atol=budget)
    else:
        assert_one_rounding_of_the_weight(out, expected, budget)


@needs_nvcc
@pytest.mark.parametrize("bits", BITS)
def test_emulated_reconstruct_adds_a_large_center_once_after_the_rows(emulator, bits):
    k, d, blocks = 16, 4099, [1000, 3099]
    qb = tk.quantize(random_basis(k, d, constant_groups=1, group_size=128), bits, 128, blocks)
    x, center, out = 1e-2 * torch.randn(k, qb.num_blocks), 100 * torch.randn(d), torch.empty(d)
    emulator.twa_cuda_emulate_reconstruct(*_basis_args(qb), _ptr(x), _ptr(center), 0, _ptr(out), 0)
    expected = reference.reconstruct(qb.codes, qb.scales, qb.mins, qb.block_offsets, x, center, qb.bits or 0, 128, d)
    budget = reconstruct_budget(qb, x)
    assert_one_rounding_of_the_weight(out, expected, budget)


@needs_nvcc
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,d,group_size,blocks", SHAPES[1::2])
def test_emulated_reconstruct_in_place_on_its_own_center(emulator, bits, k, d, group_size, blocks):
    """out may be center itself (a loss plane's in-place steps): each column's center is
    read before that column is written."""
    qb = tk.quantize(random_basis(k, d, constant_groups=1, group_size=group_size), bits, group_size, blocks)
    x, weights = torch.randn(k, qb.num_blocks), torch.randn(d)
    expected = reference.reconstruct(qb.codes, qb.scales, qb.mins, qb.block_offsets, x, weights, qb.bits or 0,
                                     group_size, d)
    emulator.twa_cuda_emulate_reconstruct(*_basis_args(qb), _ptr(x), _ptr(weights), 0, _ptr(weights), 0)
    budget = reconstruct_budget(qb, x)
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=budget)


@needs_nvcc
def test_a_cuda_type_error_fails_the_build(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    shutil.copytree(_build.source_dir(), src)
    runs = src / "cuda" / "runs.cuh"  # the run code that kernels.cu compiles for the device
    code = runs.read_text()
    broken = code.replace("const uint32_t byte = row[", "const uint32_t* byte = row[")  # a uint8_t read as a pointer
    assert broken != code
    runs.write_text(broken)
    monkeypatch.setattr(_build, "source_dir", lambda: src)
    monkeypatch.setenv("TWA_KERNELS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(_build.BuildError, match="kernels.cu"):
        _build.build_cuda_kernels()
    assert not any((tmp_path / "cache").glob("cuda-kernels-*/*.so"))  # nothing half-built left behind


def test_arch_list_is_respected(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert _build.cuda_arch_flags() == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6+PTX 9.0a")
    assert _build.cuda_arch_flags() == ["-gencode", "arch=compute_86,code=sm_86", "-gencode",
                                        "arch=compute_86,code=compute_86", "-gencode", "arch=compute_90a,code=sm_90a"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Hopper")
    with pytest.raises(_build.BuildError, match="TORCH_CUDA_ARCH_LIST entry 'Hopper'"):
        _build.cuda_arch_flags()
