"""Roofline report from a pytest-benchmark JSON: python bench/report.py RUN.json [OUT.json]

For every (op, model, k, bits) it gives the fused kernel's median time, its speed-up over
the reference and over the paper's code path (all timed in the same run), the bytes the op
must move, the achieved GB/s and the fraction of the copy bandwidth measured in that run.
"arithmetic ms" is the time the unpacking arithmetic alone takes (k * D elements at the
rate measured on a cache-resident basis, test_in_cache) and "memory ms" the time the
bytes take at copy bandwidth: the larger one says what bounds the op.
It prints a Markdown table and writes the rows as JSON (default: beside RUN.json).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def build_report(run: dict) -> dict:
    medians: dict[tuple, dict[str, float]] = defaultdict(dict)
    info: dict[tuple, dict] = {}
    copy_bw = None
    in_cache_rate: dict[tuple[str, str], float] = {}  # (kernel, bits) -> elements per second
    train_steps: dict[str, float] = {}  # impl -> median seconds of one ResNet-18 training step
    peers: dict[str, tuple[float, int]] = {}  # torch peer -> (median seconds, bytes)
    for bench in run["benchmarks"]:
        extra, median = bench["extra_info"], bench["stats"]["median"]
        if extra["op"] == "copy":
            copy_bw = extra["bytes"] / median
            continue
        if extra["op"] == "train_step":
            train_steps[extra["impl"]] = median
            continue
        if extra["op"] == "peer":  # torch's kernels on the same matrix (test_peer)
            peers[extra["impl"]] = (median, extra["bytes"])
            continue
        if extra["op"] == "in_cache":
            in_cache_rate[(extra["kernel"], str(extra["bits"]))] = extra["elements"] / median
            continue
        key = (extra["op"], extra["model"], extra["k"], str(extra["bits"]))
        medians[key][extra["impl"]] = median
        if extra["impl"] == "fused":
            info[key] = extra
    if copy_bw is None:
        raise SystemExit("the run has no copy benchmark (test_copy_bandwidth); rerun the whole bench suite")
    rows = []
    for key, times in medians.items():
        if "fused" not in times:
            continue
        op, model, k, bits = key
        fused = times["fused"]
        achieved = info[key]["bytes"] / fused
        # Where the time goes: the unpacking arithmetic at its in-cache rate, and the bytes
        # at copy bandwidth. A TWA step runs both kernels.
        kernels = ["project", "reconstruct"] if op == "twa_step" else [op]
        rates = [in_cache_rate.get((kern, bits)) for kern in kernels]
        arith = sum(k * info[key]["D"] / r for r in rates) if all(rates) else float("nan")
        rows.append(dict(
            arithmetic_ms=arith * 1e3, memory_ms=info[key]["bytes"] / copy_bw * 1e3,
            op=op, model=model, k=k, bits=bits, D=info[key]["D"], fused_ms=fused * 1e3,
            reference_ms=times.get("reference", float("nan")) * 1e3, paper_ms=times.get("paper", float("nan")) * 1e3,
            speedup_vs_reference=times.get("reference", float("nan")) / fused,
            speedup_vs_paper=times.get("paper", float("nan")) / fused,
            bytes=info[key]["bytes"], achieved_GBps=achieved / 1e9, fraction_of_copy_bw=achieved / copy_bw,
        ))
    train = None
    if "sgd" in train_steps:
        sgd = train_steps["sgd"]
        train = {impl: dict(step_ms=t * 1e3, overhead_over_sgd=t / sgd - 1) for impl, t in train_steps.items()}
    peer_rows = [dict(peer=name, ms=t * 1e3, bytes=b, achieved_GBps=b / t / 1e9, fraction_of_copy_bw=b / t / copy_bw)
                 for name, (t, b) in peers.items()]
    return dict(machine=run.get("machine_info", {}), datetime=run.get("datetime"), copy_GBps=copy_bw / 1e9, rows=rows,
                train_step=train, peers=peer_rows)


def markdown(report: dict) -> str:
    lines = [
        f"Copy bandwidth measured in the same run: {report['copy_GBps']:.1f} GB/s.",
        "",
        "| op | model | k | bits | fused ms | reference ms | paper ms | vs reference | vs paper | GB/s "
        "| of copy bw | arithmetic ms | memory ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['op']} | {r['model']} | {r['k']} | {r['bits']} | {r['fused_ms']:.1f} | {r['reference_ms']:.0f} "
            f"| {r['paper_ms']:.0f} | {r['speedup_vs_reference']:.1f}x | {r['speedup_vs_paper']:.1f}x "
            f"| {r['achieved_GBps']:.1f} | {r['fraction_of_copy_bw']:.0%} | {r['arithmetic_ms']:.1f} "
            f"| {r['memory_ms']:.1f} |"
        )
    if report.get("peers"):
        lines += ["", "| torch peer, same matrix | ms | GB/s | of copy bw |", "|---|---|---|---|"]
        for r in report["peers"]:
            lines.append(f"| {r['peer']} | {r['ms']:.1f} | {r['achieved_GBps']:.1f} | {r['fraction_of_copy_bw']:.0%} |")
    if report.get("train_step"):
        lines += ["", "| ResNet-18 training step | ms | overhead over SGD |", "|---|---|---|"]
        for impl, r in report["train_step"].items():
            lines.append(f"| {impl} | {r['step_ms']:.0f} | {r['overhead_over_sgd']:+.0%} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    run_path = Path(argv[0])
    out_path = Path(argv[1]) if len(argv) > 1 else run_path.with_name(run_path.stem + "-roofline.json")
    report = build_report(json.loads(run_path.read_text()))
    out_path.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    print(f"\nwritten: {out_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
