"""project_int8: project of g rounded to int8 per basis group, against its spec.

The spec is quant.round_groups_int8 followed by the reference project; the C++ kernels
(VNNI where the CPU has it, the 8-lane path under TWA_KERNELS_CPU_ISA=avx2: AVX2's byte dots
or the float kernels on q) must match it
on awkward shapes, and stay within the documented distance of the float project.
"""

import pytest
import torch

import twa_kernels as tk
from twa_kernels import _ops
from twa_kernels._build import cpu_kernels_available
from twa_kernels.backends import reference
from twa_kernels.errors import InvalidArgumentError
from twa_kernels import project_int8
from twa_kernels.quant import round_groups_int8, unround_groups_int8

from tests.helpers import random_basis
from tests.test_ops_isa import ISAS, SHAPES, _cpu_has_avx512, _threads

needs_cpp = pytest.mark.skipif(not cpu_kernels_available(), reason="the C++ CPU kernels could not be built")


def _reference(qb, g):
    return reference.project_int8(qb.codes, qb.scales, qb.mins, qb.block_offsets, [g], qb.bits, qb.group_size)


# -- the rounding itself --------------------------------------------------------------------


def test_rounding_is_within_half_a_step_and_uses_the_full_range():
    g = torch.randn(1000) * torch.logspace(-3, 3, 1000)
    q, scales = round_groups_int8(g, 128)
    assert q.dtype == torch.int8 and scales.shape == (8,)
    g_hat = unround_groups_int8(q, scales, 128)
    step = scales.repeat_interleave(128)[:1000]
    assert torch.all((g_hat - g).abs() <= step / 2 * (1 + 1e-6))
    assert torch.equal(q.view(-1)[:896].view(7, 128).abs().amax(1), torch.full((7,), 127, dtype=torch.int8))


def test_rounding_flushes_tiny_groups_and_poisons_non_finite_ones():
    g = torch.randn(4 * 16)
    g[16:32] = 1e-40  # below the smallest normal float
    g[0:16] *= 1e-37 / g[0:16].abs().max()  # normal, but 127 / 1e-37 overflows float32
    g[35] = float("nan")
    g[60] = float("inf")
    q, scales = round_groups_int8(g, 16)
    assert scales[1] == 0 and torch.all(q[16:32] == 0) and scales[0] == 0 and torch.all(q[0:16] == 0)
    assert scales[2].isnan() and scales[3].isnan()
    assert torch.all(q[32:] == 0)


# -- the kernels against the spec -------------------------------------------------------------


@pytest.fixture
def isa(request, monkeypatch):
    monkeypatch.setenv("TWA_KERNELS_BACKEND", "cpp")
    monkeypatch.setenv("TWA_KERNELS_CPU_ISA", request.param)
    return request.param


@needs_cpp
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_int8_isa_reports_the_path_that_runs(isa):
    vnni = _cpu_has_avx512() and "avx512_vnni" in open("/proc/cpuinfo").read()
    compiled = "avx2" if "avx2" in open("/proc/cpuinfo").read().split() else "generic"  # -march=native
    assert torch.ops.twa_kernels_cpu.int8_isa() == ("avx512-vnni" if isa == "avx512" and vnni else compiled)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("k,d,group_size,blocks", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_project_int8_matches_its_spec(isa, bits, k, d, group_size, blocks, threads):
    qb = tk.quantize(random_basis(k, d, constant_groups=1, group_size=group_size), bits, group_size, blocks)
    g = torch.randn(d) * 3
    previous = _threads(threads)
    try:
        y, y_bf16 = project_int8(qb, g), project_int8(qb, g.bfloat16())
    finally:
        torch.set_num_threads(previous)
    budget = float((tk.dequantize(qb).abs() * g.abs()).sum(1).max()) * 1e-6  # float32 rounding of the sums
    torch.testing.assert_close(y, _reference(qb, g), rtol=1e-5, atol=budget)
    torch.testing.assert_close(y_bf16, _reference(qb, g.bfloat16()), rtol=1e-5, atol=budget)



@needs_cpp
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("d,block_sizes",
                         [(2**17 + 2**16, None), (2**18, None), (3 * 2**17 + 1000, [2**17 // 3, 1000])])
def test_8_bit_groups_too_wide_for_int32_sums_match_the_spec(isa, d, block_sizes):
    # a group's sum of code * q reaches columns * 255 * 127, past int32 beyond 66,311
    # columns: it wrapped around, and the result was off by a factor of thousands. Such
    # groups, and groups cut by a block edge, go row by row with exact integer sums; summed
    # as float32 values q * scale, g all positive on a centred basis came to 1.15 times
    # the budget at 2^18 columns
    torch.manual_seed(2)
    if block_sizes is not None:
        block_sizes = block_sizes + [d - sum(block_sizes)]
    qb = tk.quantize(torch.randn(3, d), 8, 2**17, block_sizes)
    g = torch.rand(d) + 0.5  # every q near +127
    p_hat = tk.dequantize(qb)
    edges = qb.block_offsets.tolist()
    budget = max(float((p_hat[:, a:b].abs() * g[a:b]).sum(1).max()) for a, b in zip(edges, edges[1:])) * 1e-6
    # the integer sums are exact: what is left is the float32 rounding of the spec's p^ and g^
    torch.testing.assert_close(project_int8(qb, g), _reference(qb, g), rtol=0, atol=budget / 4)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, 24])
def test_special_groups_anywhere_in_a_run_match_the_spec(isa, bits, group_size):
    # a zero group and one below the smallest normal float (block 0), an infinity (block 1)
    # and a NaN (block 2), each in a whole chunk of the grouped layout or in the groups left
    # over after a run's chunks (blocks of 7, 7 and 9 groups: chunks of 2 or 4 groups leave
    # some over); a non-finite value poisons its own block only
    n_groups = 23
    d = n_groups * group_size
    qb = tk.quantize(random_basis(3, d, group_size=group_size), bits, group_size,
                     [7 * group_size, 7 * group_size, 9 * group_size])
    g = torch.randn(d)
    for group, value in ((2, 0.0), (6, 1e-39), (4, 1e-37)):  # 127 / 1e-37 overflows float32 too
        g[group * group_size:(group + 1) * group_size] = value
    g[13 * group_size + 5] = float("inf")
    g[15 * group_size + 3] = float("nan")
    y, want = project_int8(qb, g), _reference(qb, g)
    assert torch.equal(y.isnan(), want.isnan()) and want[:, 1:].isnan().all() and want[:, 0].isfinite().all()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6, equal_nan=True)


@needs_cpp
@pytest.mark.skipif(not _cpu_has_avx512(), reason="no AVX-512")
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_both_paths_agree(monkeypatch, bits):
    """Integer dots are exact: the paths differ only in float64 rounding of the scaling."""
    monkeypatch.setenv("TWA_KERNELS_BACKEND", "cpp")
    qb = tk.quantize(random_basis(6, 70_001, group_size=128), bits, 128, [30_000, 5, 39_996])
    g = torch.randn(70_001)
    results = {}
    for isa in ("avx512", "avx2"):
        monkeypatch.setenv("TWA_KERNELS_CPU_ISA", isa)
        results[isa] = project_int8(qb, g)
    torch.testing.assert_close(results["avx512"], results["avx2"], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_distance_to_the_float_project_is_within_the_documented_bound(bits):
    """|project_int8 - project| <= sum over the block's groups of scale_t / 2 * sum_j |p^[r, j]|."""
    d, group_size = 5_000, 128
    qb = tk.quantize(random_basis(5, d, group_size=group_size), bits, group_size, [1_000, 4_000])
    g = torch.randn(d) * torch.logspace(-2, 2, d)
    _, scales = round_groups_int8(g, group_size)
    step = scales.repeat_interleave(group_size)[:d].double()
    terms = tk.dequantize(qb).abs().double() * step / 2
    bound = torch.stack([terms[:, :1_000].sum(1), terms[:, 1_000:].sum(1)], 1)
    gap = (project_int8(qb, g).double() - tk.project(qb, g).double()).abs()
    slack = (tk.dequantize(qb).abs().double() @ g.abs().double()).max() * 1e-6  # float32 sums
    assert torch.all(gap <= bound + slack)
    assert gap.max() > 0  # the rounding is real: the result is not the float project's


@pytest.mark.parametrize("backend_name", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_nan_or_inf_in_g_reaches_its_block(monkeypatch, backend_name):
    monkeypatch.setenv("TWA_KERNELS_BACKEND", backend_name)
    qb = tk.quantize(random_basis(3, 1_000, group_size=128), 4, 128, [500, 500])
    for bad in (float("nan"), float("inf")):
        g = torch.randn(1_000)
        g[700] = bad
        y = project_int8(qb, g)
        assert torch.all(y[:, 1].isnan()) and torch.all(y[:, 0].isfinite())


def test_a_backend_without_its_own_kernel_rounds_in_python(monkeypatch):
    """Triton and CUDA have no project_int8 kernel: the op rounds g with the spec and calls
    their project. Shown here on the reference backend with its kernel taken away."""
    monkeypatch.setenv("TWA_KERNELS_BACKEND", "reference")
    qb = tk.quantize(random_basis(4, 3_000, group_size=64), 2, 64, [1_000, 2_000])
    g = torch.randn(3_000)
    expected = _reference(qb, g)
    monkeypatch.setitem(_ops._KERNELS, "project_int8", {})
    torch.testing.assert_close(project_int8(qb, g), expected, rtol=1e-6, atol=1e-6)


def test_bad_input_is_refused_by_name():
    qb = tk.quantize(torch.randn(2, 300), 4, 64)
    with pytest.raises(InvalidArgumentError, match="packed basis"):
        project_int8(tk.quantize(torch.randn(2, 300), None), torch.randn(300))
    with pytest.raises(InvalidArgumentError, match="300 elements"):
        project_int8(qb, torch.randn(299))
    with pytest.raises(tk.errors.InvalidTypeError, match="float32 or bfloat16"):
        project_int8(qb, torch.randn(300).double())


def test_result_is_not_part_of_a_graph():
    qb = tk.quantize(torch.randn(2, 300), 4, 64)
    g = torch.randn(300, requires_grad=True)
    assert not project_int8(qb, g).requires_grad


@needs_cpp
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("blocks", ["groups", "columns"])
def test_kernel_rounds_g_bit_for_bit_as_the_spec(isa, blocks):
    """Row r of an 8-bit basis is the one-hot of column r of each group (scale 1, min 0), so
    y[r, b] is g^ at that column. Whole-group blocks take the integer path, one-column
    blocks the float one; both must give the spec's g^ exactly. bfloat16 values make ties
    at the rounding midpoints common."""
    group, n_groups = 64, 400
    d = group * n_groups
    codes = torch.zeros(group, d, dtype=torch.uint8)
    for t in range(n_groups):
        codes[torch.arange(group), t * group + torch.arange(group)] = 1
    offsets = torch.arange(0, d + 1, group if blocks == "groups" else 1)
    qb = tk.QuantizedBasis(codes, torch.ones(n_groups, group), torch.zeros(n_groups, group), offsets, 8, group, d)
    # g[j] = (m + 1/2) * max / 127 in bfloat16: many values sit at or next to a midpoint,
    # where a reciprocal rounded twice would round them the other way
    gen = torch.Generator().manual_seed(0)
    amax = torch.rand(n_groups, 1, generator=gen) * 10 + 0.1
    halves = torch.randint(-127, 127, (n_groups, group), generator=gen) + 0.5
    g = (halves * amax / 127).bfloat16().float()
    g[:, 0] = amax[:, 0].bfloat16().float()
    # magnitudes where 127 / max|g| overflows (a max of 1e-37) and where it just does not
    # (4e-37): the first rounds to zero, the second to codes of a subnormal scale
    g[5], g[6] = g[5] / amax[5] * 1e-37, g[6] / amax[6] * 4e-37
    g = g.reshape(-1)
    q, scales = round_groups_int8(g, group)
    assert scales[5] == 0 and not q[5 * group:6 * group].any() and q[6 * group:7 * group].abs().max() == 127
    g_hat = unround_groups_int8(q, scales, group)
    y = project_int8(qb, g)
    if blocks == "groups":
        assert torch.equal(y, g_hat.view(n_groups, group).T)
    else:
        assert torch.equal(y[torch.arange(d) % group, torch.arange(d)], g_hat)


def test_vmap_over_g_rounds_and_projects_each_g_as_one_call_does():
    # torch.vmap raised torch's "Batching rule not implemented for twa_kernels::project_int8"
    qb = tk.quantize(torch.randn(3, 256), bits=4, group_size=64, block_sizes=[100, 156])
    G = torch.randn(5, 256) * torch.logspace(-2, 2, 5)[:, None]  # another scale per g
    want = torch.stack([tk.project_int8(qb, g) for g in G])
    assert torch.equal(torch.vmap(lambda g: tk.project_int8(qb, g))(G), want)
    assert torch.equal(torch.vmap(lambda g: tk.project_int8(qb, g), in_dims=1)(G.T.contiguous()), want)
