"""project and reconstruct against torch's own low-bit GEMVs and a copy, interleaved, in fresh processes.

    python bench/ops_interleaved.py                    # 5 processes, 11 timed rounds each
    python bench/ops_interleaved.py --processes 1 --rounds 7

Each worker process builds ResNet-18-shaped packed bases (11.7M weights, k = 16, bits 1, 2,
4 and 8, one block per tensor, random codes) and the peers on the same k x D matrix at
batch 1: torch's int8 GEMV (aten._weight_int8pack_mm: int8 codes, bfloat16 input), its
int4 GEMV (aten._weight_int4pack_mm_for_cpu, groups of 128, the kernel torchao's int4 CPU
path runs), dense float32 torch.mv, and two copies with touched destination pages: a
256 MiB tensor (the copy bandwidth that bench/ and bench/steady_step.py measure every op
against) and one of D floats (the size of the weights), and a plain read (a float sum) of
as many bytes as project reads at 2 and at 4 bits. Every round calls every op once, in
turn, so that a drift of this shared machine hits them all alike; each op's time is the
median of its rounds. Both instruction-set paths of the C++ kernels are timed
(TWA_KERNELS_CPU_ISA=avx2 keeps a CPU with AVX-512 on the 8-lane path).

For each op it reports the median time, the bytes it must move at minimum (the packed
basis once; g read for project; center read and w written for reconstruct), GB/s and the
fraction of the 256 MiB copy's bandwidth; then the ratios the kernels are judged by:
4-bit project over torch's int8 GEMV, and 2-bit over 4-bit, for project and for
project_int8 (g rounded to int8 per group, summed as integers). Across processes: how many
reach 80% of the copy bandwidth at each bit width.

Writes bench/results/<machine>-ops-interleaved.json (stamp.machine_slug), stamped with
machine, date and commit; bench/report.py makes the docs' table of it. Its "benchmarks"
list has the layout of a pytest-benchmark run, so `python bench/report.py FILE` prints its
roofline too. No assertion on time: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

K, BITS, LR, GROUP = 16, (1, 2, 4, 8), 1e-3, 128
COPY_REFERENCE = "copy_256MiB"


def _isa(name: str):
    """Run a kernel call on one instruction-set path."""
    def wrap(fn):
        def call():
            before = os.environ.get("TWA_KERNELS_CPU_ISA")
            os.environ["TWA_KERNELS_CPU_ISA"] = name
            try:
                return fn()
            finally:
                if before is None:
                    del os.environ["TWA_KERNELS_CPU_ISA"]
                else:
                    os.environ["TWA_KERNELS_CPU_ISA"] = before
        return call
    return wrap


def worker(rounds: int, warmup: int) -> dict:
    import twa_kernels as tk
    from conftest import on_huge_pages, random_packed_basis
    from shapes import MODELS
    from twa_kernels._memory import empty_huge

    sizes = MODELS["resnet18"]()
    bases = {b: random_packed_basis(K, sizes, b) for b in BITS}
    d = bases[4].num_cols
    nb = bases[4].num_blocks
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(d, generator=gen)
    center = empty_huge((d,), torch.float32).normal_(generator=gen)
    out = empty_huge((d,), torch.float32).zero_()  # a workspace, as tk.TWA's forward writes into
    x = torch.randn(K, nb, generator=gen)

    # the peers, on the same k x D matrix (D cut to a multiple of 1024, as their packing needs)
    dp = d // 1024 * 1024
    # the peers' matrices, the copies and the plain reads on huge pages, as the kernels' basis
    w8 = on_huge_pages(torch.randint(-128, 128, (K, dp), dtype=torch.int8, generator=gen))
    s8 = torch.rand(K, generator=gen).bfloat16()
    g_bf16 = g[:dp].bfloat16()[None]
    w4 = on_huge_pages(torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (K, dp), dtype=torch.int32, generator=gen), 2))
    sz4 = on_huge_pages(torch.rand(dp // GROUP, K, 2, generator=gen).bfloat16())
    dense = on_huge_pages(torch.full((K, d), 1e-3))
    big_src, big_dst = on_huge_pages(torch.randn(64 << 20, generator=gen)), on_huge_pages(torch.zeros(64 << 20))
    src_d, dst_d = on_huge_pages(torch.randn(d, generator=gen)), on_huge_pages(torch.zeros(d))

    if tk.backend("cpu") != "cpp":
        raise SystemExit("the C++ kernels are not available here (see `twa build`): nothing to time")
    tk.project(tk.quantize(torch.randn(2, 256), bits=4), torch.randn(256))  # loads the kernels and isa()
    # the paths this CPU runs: asked for AVX-512 without it, the kernels take their AVX2 path,
    # whose rows would be labelled with a path that never ran
    paths = [isa for isa in ("avx512", "avx2") if _isa(isa)(torch.ops.twa_kernels_cpu.isa)() == isa]
    best = paths[0]
    ops: dict[str, tuple] = {}  # name -> (call, bytes, info)
    for b, qb in bases.items():
        for isa in paths:
            proj = _isa(isa)(lambda qb=qb: tk.project(qb, g))
            rec = _isa(isa)(lambda qb=qb: tk.reconstruct(qb, x, center, out=out))
            ops[f"project_{b}bit_{isa}"] = (proj, qb.nbytes + 4 * d, dict(op="project", bits=b, impl=f"fused_{isa}"))
            ops[f"reconstruct_{b}bit_{isa}"] = (rec, qb.nbytes + 8 * d,
                                               dict(op="reconstruct", bits=b, impl=f"fused_{isa}"))
            p8 = _isa(isa)(lambda qb=qb: tk.project_int8(qb, g))
            ops[f"project_int8_{b}bit_{isa}"] = (p8, qb.nbytes + 4 * d,
                                                dict(op="project_int8", bits=b, impl=f"fused_{isa}"))
    qb4 = bases[4]

    def step():
        tk.reconstruct(qb4, x - LR * tk.project(qb4, g), center, out=out)

    ops["twa_step_4bit"] = (step, 2 * qb4.nbytes + 12 * d, dict(op="twa_step", bits=4, impl="fused"))

    def step_int8():
        tk.reconstruct(qb4, x - LR * tk.project_int8(qb4, g), center, out=out)

    ops["twa_step_int8_4bit"] = (step_int8, 2 * qb4.nbytes + 12 * d, dict(op="twa_step_int8", bits=4, impl="fused"))
    ops["torch_int8_gemv"] = (lambda: torch.ops.aten._weight_int8pack_mm(g_bf16, w8, s8),
                              K * dp + 2 * dp + 2 * K, dict(op="peer", bits="int8", impl="torch_int8_gemv"))
    ops["torch_int4_gemv"] = (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(g_bf16, w4, GROUP, sz4),
                              K * dp // 2 + sz4.numel() * 2 + 2 * dp, dict(op="peer", bits="int4",
                                                                          impl="torch_int4_gemv"))
    ops["torch_mv_fp32"] = (lambda: torch.mv(dense, g), 4 * K * d + 4 * d,
                            dict(op="peer", bits="fp32", impl="torch_mv_fp32"))
    ops[COPY_REFERENCE] = (lambda: big_dst.copy_(big_src), 8 * big_src.numel(), dict(op="copy", impl="copy_256MiB"))
    ops["copy_D"] = (lambda: dst_d.copy_(src_d), 8 * d, dict(op="copy_D", impl="copy_D"))
    # a plain read of project's bytes at 2 and 4 bits (torch's float sum over a tensor that
    # size): how fast those bytes can be read at all, the floor no project can beat
    for b in (2, 4):
        nbytes = bases[b].nbytes + 4 * d
        block = on_huge_pages(torch.randn(nbytes // 4, generator=gen))
        ops[f"read_{b}bit_bytes"] = (block.sum, nbytes, dict(op="read", bits=b, impl="torch_sum"))

    isa_default = torch.ops.twa_kernels_cpu.isa()
    times: dict[str, list[float]] = {name: [] for name in ops}
    for r in range(warmup + rounds):
        for name, (call, _, _) in ops.items():
            t0 = time.perf_counter()
            call()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    copy_bw = ops[COPY_REFERENCE][1] / statistics.median(times[COPY_REFERENCE])
    rows = {}
    for name, (_, nbytes, info) in ops.items():
        median = statistics.median(times[name])
        rows[name] = dict(info, ms=median * 1e3, bytes=nbytes, GBps=nbytes / median / 1e9,
                          fraction_of_copy=nbytes / median / copy_bw, times_ms=[t * 1e3 for t in times[name]])
    ms = {name: row["ms"] for name, row in rows.items()}
    ratios = {  # on the fastest path this CPU has
        "project_4bit_over_torch_int8": ms[f"project_4bit_{best}"] / ms["torch_int8_gemv"],
        "project_2bit_over_4bit": ms[f"project_2bit_{best}"] / ms[f"project_4bit_{best}"],
        "reconstruct_2bit_over_4bit": ms[f"reconstruct_2bit_{best}"] / ms[f"reconstruct_4bit_{best}"],
        "project_int8_4bit_over_torch_int8": ms[f"project_int8_4bit_{best}"] / ms["torch_int8_gemv"],
        "project_int8_2bit_over_4bit": ms[f"project_int8_2bit_{best}"] / ms[f"project_int8_4bit_{best}"],
        "read_2bit_over_4bit_bytes": ms["read_2bit_bytes"] / ms["read_4bit_bytes"],
        "project_int8_2bit_over_read": ms[f"project_int8_2bit_{best}"] / ms["read_2bit_bytes"],
        "project_int8_4bit_over_read": ms[f"project_int8_4bit_{best}"] / ms["read_4bit_bytes"],
        "avx2_project_4bit_over_torch_int8": ms["project_4bit_avx2"] / ms["torch_int8_gemv"],
        "avx2_project_2bit_over_4bit": ms["project_2bit_avx2"] / ms["project_4bit_avx2"],
        "avx2_reconstruct_2bit_over_4bit": ms["reconstruct_2bit_avx2"] / ms["reconstruct_4bit_avx2"],
    }
    return dict(isa=isa_default, paths=paths, D=d, copy_GBps=copy_bw / 1e9, rows=rows, ratios=ratios)


def summarize(runs: list[dict]) -> dict:
    names = list(runs[0]["rows"])
    median_ms = {n: statistics.median(r["rows"][n]["ms"] for r in runs) for n in names}
    fractions = {n: [r["rows"][n]["fraction_of_copy"] for r in runs] for n in names}
    at_80 = {n: sum(f >= 0.8 for f in fractions[n]) for n in names if n.startswith(("project", "reconstruct", "twa"))}
    return dict(
        processes=len(runs),
        median_ms=median_ms,
        median_fraction_of_copy={n: statistics.median(f) for n, f in fractions.items()},
        processes_at_80pct_of_copy=at_80,
        ratios={k: [r["ratios"][k] for r in runs] for k in runs[0]["ratios"]},
        median_ratios={k: statistics.median(r["ratios"][k] for r in runs) for k in runs[0]["ratios"]},
        copy_GBps=[r["copy_GBps"] for r in runs],
    )


def as_benchmarks(runs: list[dict], summary: dict) -> list[dict]:
    """The rows, each at its median over processes, in the layout of a pytest-benchmark run,
    which bench/report.py reads."""
    out = []
    run = runs[0]
    for name, row in run["rows"].items():
        extra = dict(op=row["op"], impl=row["impl"], bytes=row["bytes"], model="resnet18", k=K,
                     bits=row.get("bits", "fp32"), D=run["D"])
        if row["op"] in ("project", "project_int8", "reconstruct", "twa_step", "twa_step_int8") and \
                row["impl"] in ("fused", f"fused_{run.get('paths', ['avx512'])[0]}"):
            extra["impl"] = "fused"  # the path this machine runs by default
        out.append(dict(name=name, extra_info=extra, stats=dict(median=summary["median_ms"][name] / 1e3)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.rounds, args.warmup)))
        return
    import stamp

    runs = []
    for i in range(args.processes):
        done = subprocess.run([sys.executable, __file__, "--worker", "--rounds", str(args.rounds), "--warmup",
                               str(args.warmup)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"worker {i + 1} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"process {i + 1} ({r['isa']}): copy {r['copy_GBps']:.1f} GB/s; "
              + "; ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()), flush=True)
    summary = summarize(runs)
    print(f"\n| op | median ms | GB/s | of copy bw | processes >= 80% of copy (of {len(runs)}) |")
    print("|---|---|---|---|---|")
    for name, ms in summary["median_ms"].items():
        gbps = runs[0]["rows"][name]["bytes"] / ms / 1e6
        print(f"| {name} | {ms:.2f} | {gbps:.1f} | {summary['median_fraction_of_copy'][name]:.0%} "
              f"| {summary['processes_at_80pct_of_copy'].get(name, '')} |")
    print()
    for k, v in summary["median_ratios"].items():
        print(f"{k}: median {v:.2f} (per process {', '.join(f'{x:.2f}' for x in summary['ratios'][k])})")
    out = Path(args.out) if args.out else HERE / "results" / f"{stamp.machine_slug()}-ops-interleaved.json"
    result = dict(stamp=stamp.stamp(), case=dict(model="resnet18", k=K, bits=list(BITS), rounds=args.rounds,
                                                  copy_reference=COPY_REFERENCE),
                  summary=summary, processes=runs, benchmarks=as_benchmarks(runs, summary))
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_result(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
