"""Fused kernels vs the reference and the paper's P_Step path, timed in the same run.

Each benchmark records in extra_info the bytes its op must move at minimum (the packed or
paper-format basis once, plus the vectors it reads and writes); bench/report.py turns the
JSON of a run into the roofline table, against the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import pytest
import torch

import twa_kernels as tk
from twa_kernels._memory import empty_huge
from twa_kernels.backends import reference

from conftest import GRID, cases, on_huge_pages
from paper_baseline import paper_gram_schmidt, paper_project, paper_reconstruct, paper_twa_step

IMPLS = ["fused", "reference", "paper"]
ROUNDS = {"fused": 10, "reference": 2, "paper": 2}
# The fused ops are timed after 10 warm-up calls (a training loop makes thousands); the
# baselines take 1-6 s a call and vary by under 10% from their first call.
WARMUP = {"fused": 10, "reference": 0, "paper": 0}
LR = 1e-3


def _run(benchmark, impl, fn, **info):
    benchmark.group = "{op} {model} k={k} bits={bits}".format(**info)
    benchmark.extra_info.update(info, impl=impl)
    benchmark.pedantic(fn, rounds=ROUNDS[impl], iterations=1, warmup_rounds=WARMUP[impl])


def _reference_project(qb, g):
    return reference.project(qb.codes, qb.scales, qb.mins, qb.block_offsets, g, qb.bits, qb.group_size)


def _reference_reconstruct(qb, x, center):
    return reference.reconstruct(qb.codes, qb.scales, qb.mins, qb.block_offsets, x, center, qb.bits,
                                 qb.group_size, qb.num_cols)


def _huge_vector(n: int) -> torch.Tensor:
    """A D-long float32 vector on huge pages, touched: as tk.TWA holds its center and workspace."""
    return empty_huge((n,), torch.float32).zero_()


def test_copy_bandwidth(benchmark):
    """The machine's memory bandwidth: a 256 MiB tensor copy (read + write)."""
    src, dst = on_huge_pages(torch.randn(64 << 20)), on_huge_pages(torch.zeros(64 << 20))
    benchmark.group = "copy"
    benchmark.extra_info.update(op="copy", bytes=2 * src.numel() * src.element_size())
    benchmark.pedantic(dst.copy_, args=(src,), rounds=10, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model,k,bits", cases())
def test_project(benchmark, bases, model, k, bits, impl):
    qb, pb = bases(model, k, bits)
    g = torch.randn(qb.num_cols)
    vec = 4 * qb.num_cols
    fn, nbytes = {
        "fused": (lambda: tk.project(qb, g), qb.nbytes + vec),
        "reference": (lambda: _reference_project(qb, g), qb.nbytes + vec),
        "paper": (lambda: paper_project(pb, g), pb.nbytes + vec),
    }[impl]
    _run(benchmark, impl, fn, op="project", model=model, k=k, bits=bits, D=qb.num_cols, bytes=nbytes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model,k,bits", cases())
def test_reconstruct(benchmark, bases, model, k, bits, impl):
    """The fused op writes into a reused buffer, as tk.TWA's forward does (a fresh D-long
    output per call costs its page faults as well: bench/steady_step.py times that path);
    the baselines allocate their result, as their code does."""
    qb, pb = bases(model, k, bits)
    x, center, out = torch.randn(k, qb.num_blocks), _huge_vector(qb.num_cols).normal_(), _huge_vector(qb.num_cols)
    vecs = 8 * qb.num_cols  # read center, write w
    fn, nbytes = {
        "fused": (lambda: tk.reconstruct(qb, x, center, out=out), qb.nbytes + vecs),
        "reference": (lambda: _reference_reconstruct(qb, x, center), qb.nbytes + vecs),
        "paper": (lambda: paper_reconstruct(pb, x, center), pb.nbytes + vecs),
    }[impl]
    _run(benchmark, impl, fn, op="reconstruct", model=model, k=k, bits=bits, D=qb.num_cols, bytes=nbytes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model,k,bits", cases())
def test_twa_step(benchmark, bases, model, k, bits, impl):
    """One TWA step on the weights: project the gradient, step the coefficients, rebuild
    (the fused step into a reused buffer, as in test_reconstruct)."""
    qb, pb = bases(model, k, bits)
    g, x = torch.randn(qb.num_cols), torch.randn(k, qb.num_blocks)
    center, out = _huge_vector(qb.num_cols).normal_(), _huge_vector(qb.num_cols)
    vecs = 12 * qb.num_cols  # read g, read center, write w

    def fused():
        return tk.reconstruct(qb, x - LR * tk.project(qb, g), center, out=out)

    def ref():
        return _reference_reconstruct(qb, x - LR * _reference_project(qb, g), center)

    fn, nbytes = {
        "fused": (fused, 2 * qb.nbytes + vecs),
        "reference": (ref, 2 * qb.nbytes + vecs),
        "paper": (lambda: paper_twa_step(pb, g, x, center, LR), 2 * pb.nbytes + vecs),
    }[impl]
    _run(benchmark, impl, fn, op="twa_step", model=model, k=k, bits=bits, D=qb.num_cols, bytes=nbytes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", GRID["orthonormalize_ks"])
def test_orthonormalize(benchmark, k, impl):
    """Nearly collinear rows (checkpoints of one run) at ResNet-18 size."""
    d = 11_689_512
    gen = torch.Generator().manual_seed(0)
    P = torch.randn(d, generator=gen) + 1e-2 * torch.randn(k, d, generator=gen).cumsum(0)
    fn = {
        "fused": lambda: tk.orthonormalize(P),
        "reference": lambda: reference.orthonormalize(P),
        "paper": lambda: paper_gram_schmidt(P),
    }[impl]
    # CholQR2: two Gram passes read P (4kD each), two combine passes read and write (8kD each)
    _run(benchmark, impl, fn, op="orthonormalize", model="resnet18", k=k, bits="fp32", D=d, bytes=24 * k * d)


PEERS = ["torch_int8_gemv", "torch_int4_gemv", "torch_mv_fp32", "copy_D"]


@pytest.mark.parametrize("peer", PEERS)
def test_peer(benchmark, peer):
    """torch's own kernels on the same k x D matrix at batch 1, timed in the same run as the
    fused ops: its int8 GEMV (int8 codes, bfloat16 input), its int4 GEMV (groups of 128, the
    kernel torchao's int4 CPU path runs), dense float32 torch.mv, and a copy of D floats
    into touched pages. D is cut to a multiple of 1024 for the packed peers. The interleaved
    comparison in fresh processes is bench/ops_interleaved.py."""
    from shapes import MODELS

    k, d = 16, sum(MODELS["resnet18"]())
    dp = d // 1024 * 1024
    gen = torch.Generator().manual_seed(0)
    if peer == "torch_int8_gemv":
        w, s, x = on_huge_pages(torch.randint(-128, 128, (k, dp), dtype=torch.int8, generator=gen)), \
            torch.rand(k).bfloat16(), torch.randn(1, dp).bfloat16()
        fn, nbytes = (lambda: torch.ops.aten._weight_int8pack_mm(x, w, s)), k * dp + 2 * dp
    elif peer == "torch_int4_gemv":
        w = on_huge_pages(torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (k, dp), dtype=torch.int32, generator=gen), 2))
        sz, x = on_huge_pages(torch.rand(dp // 128, k, 2).bfloat16()), torch.randn(1, dp).bfloat16()
        # its scales and zeros counted, as bench/ops_interleaved.py counts them
        fn = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, 128, sz)  # noqa: E731
        nbytes = k * dp // 2 + sz.numel() * 2 + 2 * dp
    elif peer == "torch_mv_fp32":
        dense, g = on_huge_pages(torch.full((k, d), 1e-3)), torch.randn(d)
        fn, nbytes = (lambda: torch.mv(dense, g)), 4 * k * d + 4 * d
    else:
        src, dst = on_huge_pages(torch.randn(d)), on_huge_pages(torch.zeros(d))
        fn, nbytes = (lambda: dst.copy_(src)), 8 * d
    benchmark.group = f"peer {peer}"
    benchmark.extra_info.update(op="peer", impl=peer, model="resnet18", k=k, bits=peer, D=d, bytes=nbytes)
    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("op", ["project", "reconstruct"])
@pytest.mark.parametrize("bits", sorted({b for _, _, b in cases()}))
def test_in_cache(benchmark, op, bits):
    """The op on a basis small enough to stay in cache (k=16, D=2^18): the rate of the
    unpacking arithmetic alone, with no memory traffic. report.py sets the arithmetic time
    of each full-size op (elements / this rate) beside its memory time (bytes / copy)."""
    from conftest import random_packed_basis

    k, d = 16, 1 << 18
    qb = random_packed_basis(k, [d], bits)
    g, x, center, out = torch.randn(d), torch.randn(k, 1), torch.randn(d), torch.zeros(d)
    fn = (lambda: tk.project(qb, g)) if op == "project" else (lambda: tk.reconstruct(qb, x, center, out=out))
    benchmark.group = f"in-cache bits={bits}"
    benchmark.extra_info.update(op="in_cache", kernel=op, bits=bits, elements=k * d)
    benchmark.pedantic(fn, rounds=20, iterations=5, warmup_rounds=2)
