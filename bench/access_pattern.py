"""Where the kernels' time goes: each op against the same bytes moved without its work, in one process.

    python bench/access_pattern.py                  # 3 processes, 21 interleaved rounds each
    python bench/access_pattern.py --processes 1 --rounds 5

Compiles bench/native/access_pattern.cpp (the kernels' own source, compiled in unchanged,
with the flags of the library's build) and runs it in fresh processes. Each round times,
one after the other on the same k = 16 x D = 11.7M matrix at 2, 4 and 8 bits, for each of
project_int8, project and reconstruct: the op; a mover of the same bytes in the op's order
that does nothing else (reconstruct's writes with streaming stores, as the kernel's); a
plain front-to-back pass over as many bytes; and, for the projections, the op's time per
column on problems that fit in cache, scaled to D. The kernel over its own order is what
its arithmetic costs; its order over the plain pass is what the order costs; a pass's 2-bit
time over its 4-bit time is the lowest 2-bit / 4-bit ratio its bytes allow; and the
in-cache time over the plain pass says whether the arithmetic alone fits in the time the
bytes take: above 1.25, the op cannot reach 80% of the plain pass's bandwidth even if its
memory traffic were free. Two more columns say what the op's surroundings cost: the
projections and their order again with g on huge pages (where torch puts a gradient when
the process starts with THP_MEM_ALLOC_ENABLE=1; autograd's gradients are otherwise on 4 KiB
pages), and each op's bytes in the order a group-major codes layout would give (all k rows
of a group adjacent: one stream of codes instead of one per row; g on huge pages).

Writes bench/results/<machine>-access-pattern.json, stamped with machine, date and commit.
No assertion on time: this is a measurement.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

SOURCE = HERE / "native" / "access_pattern.cpp"
# the program's columns, in its order: milliseconds, or None where a column does not apply
COLUMNS = ("kernel_ms", "kernel_order_ms", "plain_read_ms", "kernel_in_cache_ms", "kernel_g_huge_ms",
           "kernel_order_g_huge_ms", "group_major_order_ms")


def compile_program(out_dir: Path, optimize: bool = True) -> Path:
    """The program, built with the library's own compiler flags (`optimize=False`: at -O0,
    for a quick check that it builds and runs; its times then mean nothing)."""
    from twa_kernels._build import CPU_CFLAGS

    flags = CPU_CFLAGS if optimize else ["-O0", *(f for f in CPU_CFLAGS if not f.startswith("-O"))]
    binary = out_dir / "access_pattern"
    subprocess.run(["c++", "-std=c++17", *flags, str(SOURCE), "-o", str(binary)], check=True)
    return binary


def run(binary: Path, rounds: int, threads: int, d: int | None = None) -> list[dict]:
    """One process: a row per op and bit width with the median ms of the kernel, the two passes
    and the kernel in cache (scaled to D)."""
    args = [str(binary), str(rounds), str(threads), *([str(d)] if d else [])]
    done = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600)
    rows = []
    for line in done.stdout.split("\n"):
        if line.strip():
            op, bits, nbytes, *times = line.split()
            rows.append(dict(op=op, bits=int(bits), bytes=int(nbytes),
                             **{key: None if value == "nan" else float(value) for key, value in zip(COLUMNS, times)}))
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import stamp

    with tempfile.TemporaryDirectory() as tmp:
        binary = compile_program(Path(tmp))
        runs = [run(binary, args.rounds, args.threads) for _ in range(args.processes)]
    print("| op | bits | kernel ms | its order ms | plain ms | in cache ms | kernel / its order "
          "| its order / plain | in cache / plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = []
    for i, row in enumerate(runs[0]):
        med = {key: statistics.median(r[i][key] for r in runs) if row[key] is not None else None for key in COLUMNS}
        summary.append(dict(op=row["op"], bits=row["bits"], bytes=row["bytes"], **med))
        print(f"| {row['op']} | {row['bits']} | {med['kernel_ms']:.2f} | {med['kernel_order_ms']:.2f} "
              f"| {med['plain_read_ms']:.2f} | {_ms(med['kernel_in_cache_ms'])} "
              f"| {med['kernel_ms'] / med['kernel_order_ms']:.2f} "
              f"| {med['kernel_order_ms'] / med['plain_read_ms']:.2f} "
              f"| {_ms(med['kernel_in_cache_ms'] and med['kernel_in_cache_ms'] / med['plain_read_ms'])} |")
    out = Path(args.out) if args.out else HERE / "results" / f"{stamp.machine_slug()}-access-pattern.json"
    # the C++ program runs args.threads OpenMP threads, whatever this process's torch uses
    result = dict(stamp={**stamp.stamp(), "threads": args.threads},
                  case=dict(k=16, D=11689512, group_size=128, rounds=args.rounds, threads=args.threads),
                  summary=summary, processes=runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_result(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
