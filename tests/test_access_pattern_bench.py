"""bench/access_pattern.py compiles the kernels' own source with its movers and runs: kept
from rotting between the runs that measure with it. It says nothing about speed."""

import importlib.util
import math
from pathlib import Path

import pytest

import twa_kernels
from twa_kernels._build import cpu_kernels_available

REPO = Path(twa_kernels.__file__).resolve().parent.parent


def _load_bench():
    spec = importlib.util.spec_from_file_location("access_pattern", REPO / "bench" / "access_pattern.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not cpu_kernels_available(), reason="no C++ compiler for the CPU kernels")
def test_the_program_builds_and_reports_each_bit_width(tmp_path):
    bench = _load_bench()
    binary = bench.compile_program(tmp_path, optimize=False)
    d = 50_000  # not a multiple of the group size: a short last group
    rows = bench.run(binary, rounds=1, threads=2, d=d)
    ops = ["project_int8", "project", "reconstruct"]
    assert [(row["op"], row["bits"]) for row in rows] == [(op, bits) for bits in (2, 4, 8) for op in ops]
    for row in rows:
        row_bytes = -(-d // 128) * 128 * row["bits"] // 8
        reads = 16 * row_bytes + 4 * d + 2 * 4 * 16 * -(-d // 128)  # codes, g or center, scales, mins
        assert row["bytes"] == reads + (4 * d if row["op"] == "reconstruct" else 0)  # and the weights written
        assert min(row["kernel_ms"], row["kernel_order_ms"], row["plain_read_ms"]) > 0
        # the projections' time per column in cache, a difference of two timings (noise can
        # take it below zero in one round on a busy machine); reconstruct's streaming stores
        # make its own no guide, so it has none
        if row["op"] == "reconstruct":
            assert row["kernel_in_cache_ms"] is None
        else:
            assert isinstance(row["kernel_in_cache_ms"], float) and math.isfinite(row["kernel_in_cache_ms"])
        # g on huge pages: the projections only (reconstruct's center is on huge pages already)
        g_huge = (row["kernel_g_huge_ms"], row["kernel_order_g_huge_ms"])
        assert g_huge == (None, None) if row["op"] == "reconstruct" else min(g_huge) > 0
        assert row["group_major_order_ms"] > 0
