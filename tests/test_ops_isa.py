"""The C++ kernels' two instruction-set paths against the reference, on awkward shapes.

On a CPU with AVX-512 the packed-basis kernels run 16 lanes at a time; TWA_KERNELS_CPU_ISA=avx2
keeps them on the 8-lane path that an AVX2-only CPU runs. Both must match the reference
(the executable spec) within the op tests' tolerances, whichever path the machine picks.
"""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import twa_kernels as tk
from twa_kernels import _build
from twa_kernels._build import cpu_kernels_available
from twa_kernels.backends import reference

from tests.helpers import assert_one_rounding_of_the_weight, outlier_basis, random_basis, reconstruct_budget

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="the C++ CPU kernels could not be built")

AVX512_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


def _cpu_has_avx512() -> bool:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return AVX512_FLAGS <= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return False


ISAS = ["avx2", pytest.param("avx512", marks=pytest.mark.skipif(not _cpu_has_avx512(), reason="no AVX-512"))]

# (k, D, group_size, block sizes): k not a multiple of the row blocks (8, 4 and 1 rows in
# project, 16, 8, 4 and 1 in reconstruct: k = 29 takes every block size), D ending inside a
# group, block edges inside groups, one-column blocks, runs longer than 4096 columns and
# groups whose planes are 8 bytes (the 16-lane path leaves those to the 8-lane one).
SHAPES = [
    (1, 300, 128, None),
    (29, 30_000, 128, [10_000, 20_000]),
    (5, 9_000, 128, [4_100, 1, 4_899]),
    (7, 5_003, 64, [1, 2_000, 3_002]),
    (16, 20_000, 256, [64] * 10 + [19_360]),
    (3, 12_345, 32, [12_345]),
]


@pytest.fixture
def isa(request, monkeypatch):
    monkeypatch.setenv("TWA_KERNELS_BACKEND", "cpp")
    monkeypatch.setenv("TWA_KERNELS_CPU_ISA", request.param)
    return request.param


def _threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    return previous


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_isa_reports_the_path_that_runs(isa):
    expected = "avx512" if isa == "avx512" else ("avx2", "generic")
    assert torch.ops.twa_kernels_cpu.isa() in expected


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("k,d,group_size,blocks", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_project_matches_reference(isa, bits, k, d, group_size, blocks, threads):
    qb = tk.quantize(random_basis(k, d, constant_groups=1, group_size=group_size), bits, group_size, blocks)
    g = torch.randn(d)
    previous = _threads(threads)
    try:
        y, y_bf16 = tk.project(qb, g), tk.project(qb, g.bfloat16())
    finally:
        torch.set_num_threads(previous)
    args = (qb.codes, qb.scales, qb.mins, qb.block_offsets)
    scale = float((tk.dequantize(qb).abs() * g.abs()).sum(1).max())  # error budget per row
    torch.testing.assert_close(y, reference.project(*args, g, bits, group_size), rtol=0, atol=scale * 1e-6)
    torch.testing.assert_close(y_bf16, reference.project(*args, g.bfloat16(), bits, group_size), rtol=0,
                               atol=scale * 1e-6)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("k,d,group_size,blocks", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_reconstruct_matches_reference(isa, bits, k, d, group_size, blocks, threads):
    qb = tk.quantize(random_basis(k, d, constant_groups=1, group_size=group_size), bits, group_size, blocks)
    x, center = torch.randn(k, qb.num_blocks), torch.randn(d)
    out_bf16 = torch.empty(d, dtype=torch.bfloat16)
    previous = _threads(threads)
    try:
        w = tk.reconstruct(qb, x, center)
        w_none = tk.reconstruct(qb, x)
        tk.reconstruct(qb, x, center, out=out_bf16)
        in_place = center.clone()
        tk.reconstruct(qb, x, in_place, out=in_place)
    finally:
        torch.set_num_threads(previous)
    args = (qb.codes, qb.scales, qb.mins, qb.block_offsets)
    budget = reconstruct_budget(qb, x)
    expected = reference.reconstruct(*args, x, center, bits, group_size, d)
    assert_one_rounding_of_the_weight(w, expected, budget)
    assert_one_rounding_of_the_weight(w_none, reference.reconstruct(*args, x, None, bits, group_size, d), budget)
    torch.testing.assert_close(out_bf16.float(), expected, rtol=8e-3, atol=budget)  # one bfloat16 rounding
    assert torch.equal(in_place, w)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("k,d,group_size,blocks", SHAPES)
def test_reconstruct_adds_a_large_center_once_after_the_rows(isa, bits, k, d, group_size, blocks):
    """Every row block size (k = 29), cut groups and both paths: the rows' terms round at
    their own size, the center is added once (started from it, each row's add rounded at
    the weight's size)."""
    qb = tk.quantize(random_basis(k, d, constant_groups=1, group_size=group_size), bits, group_size, blocks)
    x, center = 1e-2 * torch.randn(k, qb.num_blocks), 100 * torch.randn(d)
    in_place = center.clone()
    w = tk.reconstruct(qb, x, center)
    tk.reconstruct(qb, x, in_place, out=in_place)
    budget = reconstruct_budget(qb, x)
    args = (qb.codes, qb.scales, qb.mins, qb.block_offsets)
    assert_one_rounding_of_the_weight(w, reference.reconstruct(*args, x, center, bits, group_size, d), budget)
    assert torch.equal(in_place, w)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("blocks", [None, [100, 412]])
def test_reconstruct_sums_the_group_minimums_of_many_rows_in_float64(isa, blocks):
    # constant groups dequantise to their minimums alone, so the weights are sum_r lo_r x_r.
    # Summed in float32, each of 288 terms of 10000.2 rounded the same way: 8 off, 2.8 times
    # the tolerance; the spec sums in float64 and rounds once
    k, d = 288, 512
    qb = tk.quantize(torch.full((k, d), 10000.2), 4, 128, blocks)
    x = torch.ones(k, qb.num_blocks)
    expected = reference.reconstruct(qb.codes, qb.scales, qb.mins, qb.block_offsets, x, None, 4, 128, d)
    assert torch.equal(tk.reconstruct(qb, x), expected)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", [1, 4, 8])
@pytest.mark.parametrize("blocks", [None, [500_000, 2**20 + 3_000 - 500_000]])
def test_project_of_groups_of_a_million_columns_keeps_the_spec_accuracy(isa, bits, blocks):
    # float32 sums over a whole group cancelled between lo * sum(g) and scale * sum(code * g):
    # 2^20-column groups were off by 10 times the tolerance (a block edge inside one took the
    # row-by-row path, which summed in float32 too)
    d = 2**20 + 3_000  # one whole group and a short one
    torch.manual_seed(0)
    qb = tk.quantize(torch.randn(2, d), bits, 2**20, blocks)
    g = torch.randn(d) + 1  # a gradient with a mean: large sums that cancel
    budget = float((tk.dequantize(qb).abs() * g.abs()).sum(1).max()) * 1e-6
    expected = reference.project(qb.codes, qb.scales, qb.mins, qb.block_offsets, g, bits, 2**20)
    torch.testing.assert_close(tk.project(qb, g), expected, rtol=1e-5, atol=budget)

@pytest.mark.skipif(not _cpu_has_avx512(), reason="no AVX-512")
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_both_paths_agree(monkeypatch, bits):
    """The 16- and 8-lane paths sum the same terms in a different order: equal to float32 rounding."""
    monkeypatch.setenv("TWA_KERNELS_BACKEND", "cpp")
    qb = tk.quantize(random_basis(6, 70_001, group_size=128), bits, 128, [30_000, 5, 39_996])
    g, x, center = torch.randn(70_001), torch.randn(6, 3), torch.randn(70_001)
    results = {}
    for isa in ("avx512", "avx2"):
        monkeypatch.setenv("TWA_KERNELS_CPU_ISA", isa)
        assert torch.ops.twa_kernels_cpu.isa() == isa
        results[isa] = tk.project(qb, g), tk.reconstruct(qb, x, center)
    torch.testing.assert_close(results["avx512"][0], results["avx2"][0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(results["avx512"][1], results["avx2"][1], rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 only")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "c++") is None, reason="no C++ compiler")
def test_kernels_compile_for_an_avx2_only_target(tmp_path):
    """The AVX-512 kernels are compiled through target attributes, so a compiler whose
    target is AVX2 alone (-march=haswell) builds the whole file."""
    source = _build.source_dir() / "cpu" / "kernels.cpp"
    done = subprocess.run([os.environ.get("CXX") or "c++", "-std=c++17", "-O1", "-march=haswell", "-fopenmp", "-c",
                           str(source), "-o", str(tmp_path / "kernels.o")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


_AVX2_BUILD_CHECK = """
import torch
from twa_kernels import _build
_build.CPU_CFLAGS = ["-O3", "-march=haswell", "-fopenmp"]  # no AVX-512 anywhere at build time
_build.build_cpu()
import twa_kernels as tk
from twa_kernels.backends import reference
from tests.helpers import random_basis
torch.manual_seed(0)
for isa in ("auto", "avx2"):
    import os
    os.environ["TWA_KERNELS_CPU_ISA"] = isa
    for bits in (1, 2, 4, 8):
        qb = tk.quantize(random_basis(27, 9_001, group_size=128), bits, 128, [4_000, 1, 5_000])
        args = (qb.codes, qb.scales, qb.mins, qb.block_offsets)
        g, x, center = torch.randn(9_001), torch.randn(27, 3), torch.randn(9_001)
        # the spec's budget: 1e-6 of a row's sum of |p^ g| (a fixed 1e-3 failed one draw in many)
        budget = float((tk.dequantize(qb).abs() * g.abs()).sum(1).max()) * 1e-6
        torch.testing.assert_close(tk.project(qb, g), reference.project(*args, g, bits, 128), rtol=0, atol=budget)
        torch.testing.assert_close(tk.reconstruct(qb, x, center),
                                   reference.reconstruct(*args, x, center, bits, 128, 9_001), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(tk.ops.project_int8(qb, g), reference.project_int8(*args, [g], bits, 128),
                                   rtol=0, atol=budget)
    print(isa, torch.ops.twa_kernels_cpu.isa())
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 only")
def test_a_build_for_an_avx2_only_target_runs_both_paths(tmp_path):
    """Built with -march=haswell (a compiler that targets AVX2 alone), the library still
    picks the AVX-512 kernels at run time where the CPU has them, and both paths match the
    reference: the 8-lane path here is the very code an AVX2-only CPU runs (project_int8's
    portable loops included)."""
    env = {**os.environ, "TWA_KERNELS_CACHE": str(tmp_path), "TWA_KERNELS_BACKEND": "cpp"}
    done = subprocess.run([sys.executable, "-c", _AVX2_BUILD_CHECK], env=env, cwd=_build.source_dir().parent,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["auto", "avx512" if _cpu_has_avx512() else "avx2", "avx2", "avx2"]


def _terms_budget(qb, g):
    """Per row, sum_j (|p^_j - lo| + |lo|) |g_j|: the sizes of the two terms the C++ project
    adds per group, scale * sum(code * g) and lo * sum(g), whose float32 rounding its error
    is relative to."""
    p = tk.dequantize(qb).double()
    lo = qb.mins.double().T.repeat_interleave(qb.group_size, 1)[:, :qb.num_cols]
    return (((p - lo).abs() + lo.abs()) * g.double().abs()).sum(1)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("group_size", [128, 1024, 4096])
def test_project_of_an_outlier_group_rounds_relative_to_the_terms_it_adds(isa, bits, group_size):
    # one outlier sets a group's minimum far below its other values: scale * sum(code * g) and
    # lo * sum(g) then nearly cancel, and float32 sums over 4,096 columns left 1.1e-6 of them
    # (9e-3 of sum |p^ g|, the spec's budget) on the AVX2 path
    qb, g = outlier_basis(bits, group_size)
    exact = (tk.dequantize(qb).double() @ g.double())
    error = (tk.project(qb, g)[:, 0].double() - exact).abs()
    assert (error <= 1e-6 * _terms_budget(qb, g)).all(), (error / _terms_budget(qb, g)).max()
