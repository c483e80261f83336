"""GPU benchmark: project, reconstruct and a full TWA step on CUDA tensors.

Every usable GPU backend (cuda, triton) at k = 16 and 72, D = 88M (CLIP ViT-B/32) and 1B (a
20-layer, width-2048 transformer), bits 1/2/4/8; in the same run the reference backend and the
paper's P_Step path (at 88M, where they fit and finish), and a device-to-device copy as the
bandwidth roof. Times are medians of CUDA-event timings after warm-up. Writes
bench/results/<machine>-cuda-ops.json (and a copy under $OUT when set) and prints a table.

project_bf16 and reconstruct_bf16 are a bfloat16 model's: its gradient in bf16, its weights
rebuilt from a bf16 center into a bf16 buffer. In the same run, at 88M and 4 bits: other
libraries' kernels on the shape of project (bench/gpu_peers.py: torch's bf16 GEMV, torch's
int4 tinygemm, bitsandbytes' NF4 GEMV) and a torch.profiler breakdown of each backend's
kernels, which says where an op's time goes.

    python bench/gpu.py            # the whole grid (a few minutes on an H100)
    python bench/gpu.py --quick    # k=16, 88M, 4-bit only
    python bench/gpu.py --once     # one call of each op and backend, for a profiler such as ncu to wrap
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import paper_baseline as paper  # noqa: E402
from shapes import clip_vit_b32_visual_sizes  # noqa: E402
from stamp import machine_slug, stamp  # noqa: E402

from twa_kernels import _ops  # noqa: E402
from twa_kernels.quant import QuantizedBasis, block_offsets_from_sizes, packed_row_bytes  # noqa: E402

GROUP_SIZE = 128
LR = 1e-3
DEVICE = "cuda"  # a dry run of this script's logic may set "cpu" (with TRITON_INTERPRET=1 and tiny MODELS)


def transformer_1b_sizes(layers: int = 20, width: int = 2048) -> list[int]:
    """Parameter sizes of a 20-layer, width-2048 transformer stack (1,006,714,880 weights)."""
    per_layer = [width, 3 * width * width, width * width, width, 4 * width * width, 4 * width * width]
    return per_layer * layers


MODELS = {"88M": clip_vit_b32_visual_sizes, "1B": transformer_1b_sizes}


def cuda_time_ms(fn, min_reps: int = 10, min_ms: float = 300.0, warmup: int = 2) -> float:
    """Median over repeats of one call, timed with CUDA events, after warm-up calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    total = 0.0
    while len(times) < min_reps or (total < min_ms and len(times) < 200):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
        total += times[-1]
    return statistics.median(times)


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 4 GiB, counting bytes read plus written."""
    src = torch.empty(1 << 30, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def random_basis(k: int, sizes: list[int], bits: int) -> QuantizedBasis:
    """Random codes (cost does not depend on values; quantising k x 1B floats would not fit)."""
    d = sum(sizes)
    n_groups = -(-d // GROUP_SIZE)
    codes = torch.randint(0, 256, (k, packed_row_bytes(d, bits, GROUP_SIZE)), dtype=torch.uint8, device=DEVICE)
    scales = torch.rand(n_groups, k, device=DEVICE) * 1e-3
    mins = -scales * ((1 << bits) - 1) / 2
    return QuantizedBasis(codes, scales, mins, block_offsets_from_sizes(sizes, d).to(DEVICE), bits, GROUP_SIZE, d)


def ops_for(qb: QuantizedBasis):
    """project, reconstruct and a TWA step (project, coefficient step, reconstruct) on qb."""
    parts = (qb.codes, qb.scales, qb.mins, qb.block_offsets)
    d, k = qb.num_cols, qb.k
    g = torch.randn(d, device=DEVICE)
    center = torch.randn(d, device=DEVICE)
    x = torch.randn(k, qb.num_blocks, device=DEVICE)
    meta = qb.scales.numel() * 8 + qb.block_offsets.numel() * 8
    project = lambda: _ops.project_op(*parts, g, qb.bits, GROUP_SIZE)  # noqa: E731
    reconstruct = lambda: _ops.reconstruct_op(*parts, x, center, qb.bits, GROUP_SIZE, d)  # noqa: E731

    # a bfloat16 model's step: its gradient in bf16, its weights rebuilt from a bf16 center into bf16
    g_bf16, center_bf16 = g.bfloat16(), center.bfloat16()
    out_bf16 = torch.empty(d, dtype=torch.bfloat16, device=DEVICE)
    project_bf16 = lambda: _ops.project_op(*parts, g_bf16, qb.bits, GROUP_SIZE)  # noqa: E731
    reconstruct_bf16 = lambda: _ops.reconstruct_into_op(  # noqa: E731
        *parts, x, center_bf16, qb.bits, GROUP_SIZE, out_bf16)

    def step():
        return _ops.reconstruct_op(*parts, x - LR * project(), center, qb.bits, GROUP_SIZE, d)

    codes = qb.codes.numel()
    return {  # op: (callable, fewest bytes it must move)
        "project": (project, codes + meta + 4 * d),
        "reconstruct": (reconstruct, codes + meta + 8 * d),
        "twa_step": (step, 2 * (codes + meta) + 12 * d),
        "project_bf16": (project_bf16, codes + meta + 2 * d),
        "reconstruct_bf16": (reconstruct_bf16, codes + meta + 4 * d),
    }


def paper_ops(k: int, sizes: list[int], bits: int):
    d = sum(sizes)
    codes = torch.randint(0, 1 << bits, (k, d), dtype=torch.uint8, device=DEVICE)
    scales = torch.rand(len(sizes), device=DEVICE) * 1e-3
    pb = paper.PaperBasis(codes, -scales * ((1 << bits) - 1) / 2, scales, list(sizes))
    g, center = torch.randn(d, device=DEVICE), torch.randn(d, device=DEVICE)
    x = torch.randn(k, len(sizes), device=DEVICE)
    return {
        "project": (lambda: paper.paper_project(pb, g), pb.codes.numel() + 4 * d),
        "reconstruct": (lambda: paper.paper_reconstruct(pb, x, center), pb.codes.numel() + 8 * d),
        "twa_step": (lambda: paper.paper_twa_step(pb, g, x, center, LR), 2 * pb.codes.numel() + 12 * d),
    }


def set_backend(name: str) -> None:
    os.environ["TWA_KERNELS_BACKEND"] = name


def usable_backends() -> list[str]:
    names = []
    for name in ("cuda", "triton"):
        usable, why = _ops._backend_usable(name, torch.device(DEVICE))
        print(f"backend {name}: {'usable' if usable else 'not usable: ' + why}", flush=True)
        if usable:
            names.append(name)
    return names


def kernel_breakdown(fn, calls: int = 5) -> list[dict]:
    """Device time per call of each kernel that `fn` launches, by torch.profiler, largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = []
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total:
            kernels.append(dict(kernel=event.key[:120], launches_per_call=event.count / calls,
                                us_per_call=total / calls))
    return sorted(kernels, key=lambda r: -r["us_per_call"])


def run_peers(d: int, ks: list[int], timeout_s: int = 120) -> list[dict]:
    """bench/gpu_peers.py's rows, each peer in its own process; a peer that fails leaves a row saying why."""
    rows = []
    script = Path(__file__).parent / "gpu_peers.py"
    for peer in ("torch-bf16", "torch-int4pack", "bitsandbytes-nf4"):
        try:
            done = subprocess.run([sys.executable, str(script), peer, str(d), *map(str, ks)], capture_output=True,
                                  text=True, timeout=timeout_s)
            out, err, code = done.stdout, done.stderr, done.returncode
        except subprocess.TimeoutExpired as timeout:
            out, err, code = timeout.stdout or "", f"timed out after {timeout_s} s", None
            out = out.decode() if isinstance(out, bytes) else out
        got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        rows += got
        if code != 0:
            done_ks = {r["k"] for r in got}
            for k in ks:
                if k not in done_ks:
                    rows.append(dict(impl=peer, k=k, error=err.strip().splitlines()[-1:] or [f"exit {code}"]))
            print(f"peer {peer}: exit {code}: {err.strip()[-600:]}", flush=True)
    return rows


def once(backends: list[str]) -> None:
    """One call of each op per backend at k=16, 88M, 4-bit (after one warm-up), nothing timed."""
    ops = ops_for(random_basis(16, MODELS["88M"](), 4))
    for name in backends:
        set_backend(name)
        for fn, _ in ops.values():
            fn()
            fn()
    torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k=16, 88M, 4-bit only")
    parser.add_argument("--once", action="store_true", help="one call of each op and backend, nothing timed")
    parser.add_argument("--no-peers", action="store_true", help="skip other libraries' kernels")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/<machine>-cuda-ops.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.once:
        once(usable_backends())
        return 0
    device = torch.cuda.get_device_name()
    name = f"{machine_slug(gpu=True)}-cuda-ops{'-quick' if args.quick else ''}.json"
    out = Path(args.out or Path(__file__).parent / "results" / name)
    copy = copy_bandwidth_gbps()
    print(f"{device}: device-to-device copy {copy:.0f} GB/s (read + write)", flush=True)
    backends = usable_backends()
    ks, models, bit_widths = ([16], ["88M"], [4]) if args.quick else ([16, 72], ["88M", "1B"], [4, 1, 2, 8])
    report = dict(stamp=stamp(), device=device, copy_gbps=copy, group_size=GROUP_SIZE, backends=backends, rows=[],
                  failures=[], profile=[])
    rows = report["rows"]

    def save() -> None:  # after every case, so a run stopped partway keeps what it measured
        text = json.dumps(report, indent=1)
        out.write_text(text)
        if os.environ.get("OUT"):
            (Path(os.environ["OUT"]) / out.name).write_text(text)

    def record(op, impl, k, model, bits, ms, nbytes, **extra):
        gbps = nbytes / ms / 1e6
        rows.append(dict(op=op, impl=impl, k=k, model=model, d=sum(MODELS[model]()), bits=bits, ms=ms, bytes=nbytes,
                         gbps=gbps, fraction_of_copy=gbps / copy, **extra))
        print(f"{op:12s} {impl:16s} k={k:3d} D={model:4s} {bits}-bit  {ms:9.3f} ms  {gbps:7.0f} GB/s  "
              f"{gbps / copy:6.1%} of copy", flush=True)

    def attempt(what: str, fn) -> None:  # one failing case (out of memory, say) must not end the run
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - recorded and printed, the grid goes on
            report["failures"].append(dict(case=what, error=f"{type(error).__name__}: {error}"[:2000]))
            print(f"FAILED {what}:\n{traceback.format_exc()[-2000:]}", flush=True)
            torch.cuda.empty_cache()

    for model in models:
        sizes = MODELS[model]()
        for k in ks:
            for bits in bit_widths:
                d = sum(sizes)
                # codes, scales and mins, and about five float32 vectors of D (g, center, outputs)
                need = k * packed_row_bytes(d, bits, GROUP_SIZE) + 8 * k * -(-d // GROUP_SIZE) + 20 * d
                free = torch.cuda.mem_get_info()[0]
                if need > 0.85 * free:
                    print(f"skip k={k} D={model} {bits}-bit: needs {need / 2**30:.0f} GiB, {free / 2**30:.0f} free")
                    continue
                attempt(f"k={k} D={model} {bits}-bit", lambda: measure_case(record, report, backends, k, model, bits))
                torch.cuda.empty_cache()
                if model == "88M":  # where it fits and finishes
                    attempt(f"paper k={k} D={model} {bits}-bit", lambda: measure_paper(record, k, model, bits))
                    torch.cuda.empty_cache()
                save()
        if model == "88M" and 4 in bit_widths and not args.no_peers:
            for row in run_peers(sum(sizes), ks):
                if "error" in row:
                    report["failures"].append(dict(case=f"{row['impl']} k={row['k']}", error=row["error"]))
                    continue
                extra = {key: row[key] for key in row if key not in ("op", "impl", "k", "ms", "bytes")}
                record(row["op"], row["impl"], row["k"], model, 4, row["ms"], row["bytes"], **extra)
            save()
    os.environ.pop("TWA_KERNELS_BACKEND", None)
    save()
    print(f"\nwritten: {out}")
    print_summary(rows)
    return 1 if report["failures"] else 0


def measure_case(record, report: dict, backends: list[str], k: int, model: str, bits: int) -> None:
    """Every backend's ops on one basis; at 88M also their agreement, the baselines and a profile."""
    sizes = MODELS[model]()
    qb = random_basis(k, sizes, bits)
    ops = ops_for(qb)
    for name in backends:
        set_backend(name)
        for op, (fn, nbytes) in ops.items():
            record(op, name, k, model, bits, cuda_time_ms(fn), nbytes)
        if model == "88M" and bits == 4 and DEVICE == "cuda":
            for op in ("project", "reconstruct", "twa_step"):
                report["profile"].append(dict(op=op, impl=name, k=k, model=model, bits=bits,
                                              kernels=kernel_breakdown(ops[op][0])))
    if len(backends) == 2 and model == "88M":  # the two backends must agree
        rel = []
        for op in ("project", "reconstruct"):
            set_backend("cuda")
            a = ops[op][0]()
            set_backend("triton")
            b = ops[op][0]()
            rel.append(float((a - b).norm() / b.norm()))
            del a, b
        report.setdefault("agreement", []).append(dict(k=k, model=model, bits=bits, max_rel_difference=max(rel)))
        print(f"  cuda vs triton: relative difference {max(rel):.2e}" + ("" if max(rel) < 1e-4 else "  MISMATCH"),
              flush=True)
    if model == "88M":  # baselines where they fit and finish
        set_backend("reference")
        for op in ("project", "twa_step"):
            fn, nbytes = ops[op]
            record(op, "reference", k, model, bits, cuda_time_ms(fn, min_reps=1, min_ms=0, warmup=1), nbytes)


def measure_paper(record, k: int, model: str, bits: int) -> None:
    """The paper's P_Step path on a basis of its own (one byte a code)."""
    for op, (fn, nbytes) in paper_ops(k, MODELS[model](), bits).items():
        record(op, "paper", k, model, bits, cuda_time_ms(fn, min_reps=3, min_ms=0, warmup=1), nbytes)


def print_summary(rows: list[dict]) -> None:
    """The 4-bit rows at 88M: each backend's and peer's GB/s and speed-up over the paper's P_Step."""
    paper_ms = {(r["op"], r["k"], r["model"], r["bits"]): r["ms"] for r in rows if r["impl"] == "paper"}
    print("\nop           impl             k   D     bits  ms        GB/s  of copy  x paper")
    for r in rows:
        if r["impl"] in ("paper", "reference") or r["bits"] != 4 or r["model"] != "88M":
            continue
        base = paper_ms.get((r["op"], r["k"], r["model"], r["bits"]))
        speedup = f"{base / r['ms']:7.1f}" if base else "      -"
        print(f"{r['op']:12s} {r['impl']:16s} {r['k']:3d} {r['model']:5s} {r['bits']:4d}  {r['ms']:8.3f}  "
              f"{r['gbps']:5.0f}  {r['fraction_of_copy']:6.1%}  {speedup}")


if __name__ == "__main__":
    sys.exit(main())
