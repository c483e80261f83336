"""Tables from the benchmark results: one run's roofline, and the docs' tables from bench/results.

    python bench/report.py RUN.json [OUT.json]   # roofline table of one pytest-benchmark run
    python bench/report.py --print               # the docs' tables, from bench/results/*.json
    python bench/report.py --write               # rewrite them in README.md, docs/benchmarks.md and docs/design.md
    python bench/report.py --check               # exit 1 if the docs' tables differ from --print

Roofline: for every (op, model, k, bits) the fused kernel's median time, its speed-up over
the reference and over the paper's code path (all timed in the same run), the bytes the op
must move, the achieved GB/s and the fraction of the copy bandwidth measured in that run.
"arithmetic ms" is the time the unpacking arithmetic alone takes (k * D elements at the
rate measured on a cache-resident basis, test_in_cache) and "memory ms" the time the
bytes take at copy bandwidth: the larger one says what bounds the op.

Docs' tables: each sits in a Markdown file between `<!-- report:NAME -->` and
`<!-- /report:NAME -->`, and is generated from the results files of bench/results
(`<machine>-ops.json`, `<machine>-ops-interleaved.json`, `<machine>-steady-step.json`,
`<machine>-distributed-step.json`, `<machine>-builder-memory.json`, and bench/gpu.py's
`<machine>-cuda-ops.json`),
each stamped with the machine, date, commit and torch version it came from.
"""

from __future__ import annotations

import difflib
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def build_report(run: dict) -> dict:
    medians: dict[tuple, dict[str, float]] = defaultdict(dict)
    info: dict[tuple, dict] = {}
    copy_bw = None
    in_cache_rate: dict[tuple[str, str], float] = {}  # (kernel, bits) -> elements per second
    train_steps: dict[str, float] = {}  # impl -> median seconds of one ResNet-18 training step
    peers: dict[str, tuple[float, int]] = {}  # torch peer -> (median seconds, bytes)
    for bench in run["benchmarks"]:
        extra, median = bench.get("extra_info", {}), bench["stats"]["median"]
        if "op" not in extra:  # another suite's benchmark in the same run (decor, factorize)
            continue
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
    return dict(stamp=run.get("stamp"), machine=run.get("machine_info", {}), datetime=run.get("datetime"),
                copy_GBps=copy_bw / 1e9, rows=rows, train_step=train, peers=peer_rows)


def _num(x: float, spec: str, suffix: str = "") -> str:
    """`x` formatted, or "-" where the run did not measure it (NaN)."""
    return "-" if x != x else f"{x:{spec}}{suffix}"


def markdown(report: dict) -> str:
    lines = [
        f"Copy bandwidth measured in the same run: {report['copy_GBps']:.1f} GB/s, a 256 MiB copy timed once "
        "before the ops (\"of copy bw\" divides by it; one copy can land in memory faster or slower than the "
        "ops', so bench/ops_interleaved.py, which times a copy beside every call in fresh processes, measures the "
        "fractions more reliably).",
        "",
        "| op | model | k | bits | fused ms | reference ms | paper ms | vs reference | vs paper | GB/s "
        "| of copy bw | arithmetic ms | memory ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['op']} | {r['model']} | {r['k']} | {r['bits']} | {r['fused_ms']:.1f} | {_num(r['reference_ms'], '.0f')} "
            f"| {_num(r['paper_ms'], '.0f')} | {_num(r['speedup_vs_reference'], '.1f', 'x')} | {_num(r['speedup_vs_paper'], '.1f', 'x')} "
            f"| {r['achieved_GBps']:.1f} | {r['fraction_of_copy_bw']:.0%} | {_num(r['arithmetic_ms'], '.1f')} "
            f"| {_num(r['memory_ms'], '.1f')} |"
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


# ---- the docs' tables ---------------------------------------------------------------------

def stamp_line(stamp: dict | None, slug: str = "") -> str:
    """'AMD EPYC (AVX2, FMA), 2 logical cores, 2 threads, torch 2.13.0+cpu; 2026-11-23, commit cafb196'.
    Where the stamp has no CPU model, the file name's machine slug stands in, marked as such."""
    s = stamp or {}
    machine = s.get("gpu") or s.get("cpu") or (f"{slug} (CPU model not recorded)" if slug else "CPU model not recorded")
    if s.get("cpu_features") and not s.get("gpu"):
        machine += f" ({', '.join(f.upper() for f in s['cpu_features'])})"
    parts = [machine]
    if s.get("logical_cores"):
        parts.append(f"{s['logical_cores']} logical cores")
    if s.get("threads"):
        parts.append(f"{s['threads']} thread{'s' if s['threads'] != 1 else ''}")
    parts.append(f"torch {s['torch']}" if s.get("torch") else "torch version not recorded")
    return f"{', '.join(parts)}; {date_and_commit(s)}"


def date_and_commit(stamp: dict | None) -> str:
    """'2026-11-23, commit cafb196', saying so where the tree had local changes or a field is
    missing."""
    s = stamp or {}
    date = s["datetime"][:10] if s.get("datetime") else "date not recorded"
    if s.get("commit"):
        commit = f"commit {s['commit'][:7]}" + (" with local changes" if s.get("clean") is False else "")
    else:
        commit = "commit not recorded"
    return f"{date}, {commit}"


def _files(suite: str) -> list[Path]:
    """The results files of one suite, newest stamp first (an undated file last). `*-ops.json`
    also matches `<gpu>-cuda-ops.json`, another section's suite: those are left out."""
    longer = [other for other in SECTIONS if other != suite and other.endswith(f"-{suite}")]
    paths = sorted(p for p in RESULTS.glob(f"*-{suite}.json")
                   if not any(p.name.endswith(f"-{other}.json") for other in longer))
    return sorted(paths, key=lambda p: (json.loads(p.read_text()).get("stamp") or {}).get("datetime") or "",
                  reverse=True)


def _slug(path: Path, suite: str) -> str:
    return path.name[: -len(f"-{suite}.json")]


def _link(path: Path, page: Path) -> str:
    return Path(*[".."] * (len(page.relative_to(REPO).parts) - 1), path.relative_to(REPO)).as_posix()


def _ms(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def headline(page: Path) -> str:
    """One TWA step and its two kernels at k = 16, 4 bits on ResNet-18 shapes, newest ops run."""
    for path in _files("ops"):  # the newest run that has the headline case
        report = build_report(json.loads(path.read_text()))
        rows = {(r["op"], r["bits"]): r for r in report["rows"] if r["model"] == "resnet18" and r["k"] == 16}
        if ("twa_step", "4") in rows:
            break
    else:
        return "No ops results with a TWA step at k = 16, 4 bits in bench/results yet."
    # no fraction of copy bandwidth here: this run timed its copy once, and on a shared machine
    # one copy can land in memory faster or slower than the ops' (see _interleaved_fractions)
    lines = ["| op (ResNet-18 shapes, k = 16) | fused ms | reference ms | paper's code ms | vs paper |",
             "|---|---:|---:|---:|---:|"]
    for op, bits, label in (("project", "4", "project, 4-bit"), ("reconstruct", "4", "reconstruct, 4-bit"),
                            ("twa_step", "4", "**TWA step, 4-bit**"), ("orthonormalize", "fp32", "orthonormalize")):
        r = rows.get((op, bits))
        if r is None:
            continue
        lines.append(f"| {label} | {_ms(r['fused_ms'])} | {_num(r['reference_ms'], '.0f')} | {_num(r['paper_ms'], '.0f')} "
                     f"| {_num(r['speedup_vs_paper'], '.1f', 'x')} |")
    lines += ["", f"{stamp_line(report['stamp'], _slug(path, 'ops'))}; medians ([JSON]({_link(path, page)}))."
                  + _interleaved_fractions(_slug(path, "ops"), page)]
    return "\n".join(lines)


def _interleaved_fractions(slug: str, page: Path) -> str:
    """The headline ops' fractions of copy bandwidth in the newest interleaved run on the same
    machine, where each op is timed against a copy beside it in fresh processes: a copy timed
    once can land in memory that is faster or slower than the ops' (on a shared machine the
    same copy ran at 35 and at 60 GB/s), which tips a single run's fractions either way."""
    for path in _files("ops-interleaved"):
        if _slug(path, "ops-interleaved") != slug:
            continue
        d = json.loads(path.read_text())
        fractions, best = d["summary"]["median_fraction_of_copy"], d["processes"][0].get("paths", ["avx512"])[0]
        names = (f"project_4bit_{best}", f"reconstruct_4bit_{best}", "twa_step_4bit")
        if not all(name in fractions for name in names):
            continue
        when = date_and_commit(d.get("stamp"))
        docs = REPO / "docs" / "benchmarks.md"
        link = ("" if page == docs else _link(docs, page)) + "#against-torchs-own-kernels"
        return (f" Timed against a copy beside each call, in {d['summary']['processes']} fresh processes "
                f"([interleaved runs]({link}), {when}), the 4-bit project reaches {fractions[names[0]]:.0%} of the copy "
                f"bandwidth, reconstruct {fractions[names[1]]:.0%} and the step {fractions[names[2]]:.0%}.")
    return ""


def ops(page: Path) -> str:
    out = []
    for path in _files("ops"):
        report = build_report(json.loads(path.read_text()))
        grid = (report["machine"] or {}).get("grid", "not recorded")
        out += [f"**{stamp_line(report['stamp'], _slug(path, 'ops'))}**, grid `{grid}` ([JSON]({_link(path, page)}))", "",
                markdown(report), ""]
    return "\n".join(out).strip() or "No ops results in bench/results yet."


# bench/ops_interleaved.py's rows, in the order the table shows them
_PEER_LABELS = {"torch_int8_gemv": "torch int8 GEMV (`_weight_int8pack_mm`)",
                "torch_int4_gemv": "torch int4 GEMV (`_weight_int4pack_mm_for_cpu`)",
                "torch_mv_fp32": "torch.mv, float32", "copy_256MiB": "copy, 256 MiB", "copy_D": "copy, D floats",
                "read_2bit_bytes": "plain read of 2-bit project's bytes (float sum)",
                "read_4bit_bytes": "plain read of 4-bit project's bytes (float sum)"}


def ops_interleaved(page: Path) -> str:
    """Each kernel against torch's own GEMVs and a copy, timed in turn in fresh processes."""
    out = []
    for path in _files("ops-interleaved"):
        d = json.loads(path.read_text())
        s, n = d["summary"], d["summary"]["processes"]
        out += [f"**{stamp_line(d.get('stamp'), _slug(path, 'ops-interleaved'))}**; {n} fresh processes, "
                f"{d['case']['rounds']} interleaved rounds each, k = {d['case']['k']}, ResNet-18 shapes "
                f"([JSON]({_link(path, page)}))", "",
                f"| op | median ms | GB/s | of copy bandwidth | processes at >= 80% of copy (of {n}) |",
                "|---|---:|---:|---:|---:|"]
        names = [name for name in s["median_ms"] if name not in _PEER_LABELS] + \
                [name for name in _PEER_LABELS if name in s["median_ms"]]
        for name in names:
            ms, nbytes = s["median_ms"][name], d["processes"][0]["rows"][name]["bytes"]
            label = _PEER_LABELS.get(name, name.replace("_", " "))
            out.append(f"| {label} | {ms:.1f} | {nbytes / ms / 1e6:.1f} | {s['median_fraction_of_copy'][name]:.0%} "
                       f"| {s['processes_at_80pct_of_copy'].get(name, '-')} |")
        ratios = s["ratios"]
        best = d["processes"][0].get("paths", ["avx512"])[0]  # files from before "paths" ran AVX-512
        out += ["", f"| target ({'AVX-512' if best == 'avx512' else 'AVX2'} path) | per process | holds in |",
                "|---|---|---|"]
        for key, label, bound in (("project_4bit_over_torch_int8", "4-bit project <= 0.8 x torch's int8 GEMV", 0.8),
                                  ("project_2bit_over_4bit", "2-bit project <= 0.75 x 4-bit", 0.75),
                                  ("reconstruct_2bit_over_4bit", "2-bit reconstruct <= 0.75 x 4-bit", 0.75),
                                  ("project_int8_4bit_over_torch_int8",
                                   "4-bit project_int8 <= 0.8 x torch's int8 GEMV", 0.8),
                                  ("project_int8_2bit_over_4bit", "2-bit project_int8 <= 0.75 x 4-bit", 0.75)):
            if key not in ratios:  # a file from before project_int8
                continue
            values = ratios[key]
            out.append(f"| {label} | {', '.join(f'{v:.2f}' for v in values)} "
                       f"| {sum(v <= bound for v in values)} of {len(values)} |")
        floors = [(key, label) for key, label in (
            ("read_2bit_over_4bit_bytes", "plain read: 2-bit bytes / 4-bit bytes (the lowest 2-bit / 4-bit ratio)"),
            ("project_int8_2bit_over_read", "2-bit project_int8 / plain read of its bytes"),
            ("project_int8_4bit_over_read", "4-bit project_int8 / plain read of its bytes")) if key in ratios]
        if floors:  # absent in files from before the plain reads
            out += ["", "| time ratio against a plain read | per process |", "|---|---|"]
            out += [f"| {label} | {', '.join(f'{v:.2f}' for v in ratios[key])} |" for key, label in floors]
        out.append("")
    return "\n".join(out).strip() or "No interleaved ops results in bench/results yet."


def access_pattern(page: Path) -> str:
    """Each op against the same bytes moved in its own order and front to back and against
    itself in cache, and the 2-bit / 4-bit ratios of the four."""
    out = []
    for path in _files("access-pattern"):
        d = json.loads(path.read_text())
        runs, case = d["processes"], d["case"]
        ops = list(dict.fromkeys(row.get("op", "project_int8") for row in d["summary"]))  # older files: one op
        out += [f"**{stamp_line(d.get('stamp'), _slug(path, 'access-pattern'))}**; {len(runs)} fresh processes, "
                f"{case['rounds']} interleaved rounds each, k = {case['k']}, D = {case['D']:,} "
                f"([JSON]({_link(path, page)}))", "",
                "| op | bits | MB | kernel ms | its order ms | plain ms | in cache ms "
                "| kernel / its order, per process | its order / plain, per process | in cache / plain |",
                "|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
        for i, row in enumerate(d["summary"]):
            per = [r[i] for r in runs]
            kernel = ", ".join(f"{r['kernel_ms'] / r['kernel_order_ms']:.2f}" for r in per)
            order = ", ".join(f"{r['kernel_order_ms'] / r['plain_read_ms']:.2f}" for r in per)
            in_cache = row.get("kernel_in_cache_ms")  # reconstruct and older files: not measured
            cached = ("-", "-") if in_cache is None else (f"{in_cache:.2f}", f"{in_cache / row['plain_read_ms']:.2f}")
            out.append(f"| {row.get('op', 'project_int8')} | {row['bits']} | {row['bytes'] / 1e6:.0f} "
                       f"| {row['kernel_ms']:.2f} | {row['kernel_order_ms']:.2f} | {row['plain_read_ms']:.2f} "
                       f"| {cached[0]} | {kernel} | {order} | {cached[1]} |")
        out += ["", "| op | 2-bit / 4-bit time: kernel | its order | plain | in cache |", "|---|---:|---:|---:|---:|"]
        for op in ops:
            at = {row["bits"]: row for row in d["summary"] if row.get("op", "project_int8") == op}
            if 2 in at and 4 in at:
                ratios = [f"{at[2][key] / at[4][key]:.2f}" if at[2].get(key) and at[4].get(key) else "-"
                          for key in ("kernel_ms", "kernel_order_ms", "plain_read_ms", "kernel_in_cache_ms")]
                out.append(f"| {op} | " + " | ".join(ratios) + " |")
        if any(row.get("group_major_order_ms") for row in d["summary"]):  # files from before these columns lack it
            out += ["", "| op | bits | plain ms | group-major order ms, g huge | its order ms, g huge | its order ms "
                    "| kernel ms, g huge | kernel ms | plain / kernel, g huge |", "|---|---:|" + "---:|" * 7]
            for row in d["summary"]:
                cells = [row.get(key) for key in ("plain_read_ms", "group_major_order_ms", "kernel_order_g_huge_ms",
                                                  "kernel_order_ms", "kernel_g_huge_ms", "kernel_ms")]
                best = row.get("kernel_g_huge_ms") or row["kernel_ms"]  # reconstruct: its center is huge already
                out.append(f"| {row['op']} | {row['bits']} | " + " | ".join(_cell(c) for c in cells)
                           + f" | {row['plain_read_ms'] / best:.0%} |")
        out.append("")
    return "\n".join(out).strip() or "No access-pattern results in bench/results yet."


def _cell(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f}"


def steady_step(page: Path) -> str:
    out = []
    for path in _files("steady-step"):
        data = json.loads(path.read_text())
        runs = data["runs"]
        int8 = all("twa_int8_gradients_overhead" in r["training_step"] for r in runs)  # absent in older files
        kept = all("training_step_kept_heap" in r for r in runs)  # glibc only, and absent in older files
        out += [f"**{stamp_line(data.get('stamp'), _slug(path, 'steady-step'))}**; "
                f"{f'{len(runs)} runs one after another' if len(runs) > 1 else '1 run'} ([JSON]({_link(path, page)}))", "",
                "| run | steady ms, per process | median fraction of copy | spread | worst first-call ratio "
                "| spread against the copy | training step: SGD / TWA |" + (" TWA, int8 gradients |" if int8 else "")
                + (" page faults per step, SGD / TWA | heap kept: SGD / TWA | heap kept, int8 gradients |" if kept else ""),
                "|---|---|---|---|---|---|---|" + ("---|" if int8 else "") + ("---|---|---|" if kept else "")]
        for i, r in enumerate(runs, 1):
            steady = [p["steady_ms"] for p in r["processes"]]
            s, t = r["summary"], r["training_step"]
            row = (f"| {i} | {min(steady):.1f}-{max(steady):.1f} | {s['median_fraction_of_copy']:.0%} "
                   f"| {s['spread_slowest_over_fastest']:.2f}x | {s['worst_first_call_ratio']:.2f}x "
                   f"| {s['spread_vs_copy']:.2f}x | {_sgd_twa(t)} |")
            if int8:
                row += f" {t['median_ms']['twa_int8_gradients']:.0f} ms, {t['twa_int8_gradients_overhead']:+.0%} |"
            if kept:
                k, faults = r["training_step_kept_heap"], t["median_page_faults"]
                row += (f" {faults['sgd']:.0f} / {faults['twa']:.0f} | {_sgd_twa(k)} "
                        f"| {k['median_ms']['twa_int8_gradients']:.0f} ms, {k['twa_int8_gradients_overhead']:+.0%} |")
            out.append(row)
        out += _phase_rows(runs, "training_step_kept_heap" if kept else "training_step")
        frac = [r["summary"]["median_fraction_of_copy"] for r in runs]
        spread = [r["summary"]["spread_slowest_over_fastest"] for r in runs]
        first = [r["summary"]["worst_first_call_ratio"] for r in runs]
        n = len(runs)

        def held(values, ok):
            return sum(ok(v) for v in values)

        def overhead(label, phase, key):
            over = [r[phase][key] for r in runs]
            return (f"| {label} | {held(over, lambda v: v <= 0.08)} of {n} "
                    f"(median {statistics.median(over):+.0%}, {min(over):+.0%} to {max(over):+.0%}) |")

        out += ["", "| target | holds in |", "|---|---|",
                f"| median fraction of copy bandwidth >= 70% | {held(frac, lambda v: v >= 0.7)} of {n} runs "
                f"({min(frac):.0%}-{max(frac):.0%}) |",
                f"| slowest process within 1.5x of the fastest | {held(spread, lambda v: v <= 1.5)} of {n} "
                f"({min(spread):.2f}-{max(spread):.2f}x) |",
                f"| first 3 calls within 1.5x of the steady state | {held(first, lambda v: v <= 1.5)} of {n} "
                f"({min(first):.2f}-{max(first):.2f}x) |",
                overhead("TWA's training step at most +8% over SGD's", "training_step", "twa_overhead")]
        if int8:
            out.append(overhead("the same with int8_gradients=True", "training_step", "twa_int8_gradients_overhead"))
        if kept:
            out.append(overhead("TWA's training step at most +8% over SGD's, heap kept", "training_step_kept_heap",
                                "twa_overhead"))
            out.append(overhead("the same with int8_gradients=True, heap kept", "training_step_kept_heap",
                                "twa_int8_gradients_overhead"))
        out.append("")
    return "\n".join(out).strip() or "No steady-step results in bench/results yet."


def _phase_rows(runs: list[dict], phase: str) -> list[str]:
    """Each run's SGD and TWA step split into forward, backward and optimizer step (absent
    in older files): where TWA's overhead goes."""
    if not all("median_phase_ms" in r[phase] for r in runs):
        return []
    heading = "heap kept, " if phase == "training_step_kept_heap" else ""
    small = all("small_layout" in r[phase] for r in runs)  # absent in older files
    rows = ["", f"| run | {heading}forward, SGD / TWA ms | backward, SGD / TWA ms | optimizer step, SGD / TWA ms |"
            + (" 1/16 width, SGD / TWA ms |" if small else ""),
            "|---|---|---|---|" + ("---|" if small else "")]
    for i, r in enumerate(runs, 1):
        sgd, twa = r[phase]["median_phase_ms"]["sgd"], r[phase]["median_phase_ms"]["twa"]
        row = f"| {i} | " + " | ".join(f"{sgd[p]:.1f} / {twa[p]:.1f}" for p in ("forward", "backward", "update")) + " |"
        if small:
            ms = r[phase]["small_layout"]["median_ms"]
            row += f" {ms['sgd']:.2f} / {ms['twa']:.2f} |"
        rows.append(row)
    return rows


def _sgd_twa(train: dict) -> str:
    return f"{train['median_ms']['sgd']:.0f} / {train['median_ms']['twa']:.0f} ms, {train['twa_overhead']:+.0%}"


def distributed_step(page: Path) -> str:
    out = []
    for path in _files("distributed-step"):
        d = json.loads(path.read_text())
        tables = d["bytes_per_step"]
        models = list(tables)
        schemes = list(tables[models[0]])
        out += [f"**{stamp_line(d.get('stamp'), _slug(path, 'distributed-step'))}**; {d['world']} gloo processes, k = {d['k']}, {d['bits']}-bit, "
                f"one block per tensor ([JSON]({_link(path, page)}))", "",
                "| bytes per step and rank | " + " | ".join(models) + " |",
                "|---|" + "---:|" * len(models)]
        for scheme in schemes:
            out.append(f"| {scheme} | " + " | ".join(f"{tables[m][scheme]:,}" for m in models) + " |")
        out += ["", "| ResNet-18 shapes, one TWA step | seconds (median) | bytes per step and rank, measured |",
                "|---|---:|---:|"]
        for mode, m in d["measured"].items():
            out.append(f"| {mode} | {m['seconds']:.3f} | {m['bytes']:,} |")
        out.append("")
    return "\n".join(out).strip() or "No distributed-step results in bench/results yet."


_GPU_IMPLS = {"cuda": "cuda backend", "triton": "triton backend", "torch-bf16": "torch bf16 GEMV (cuBLAS, dense)",
              "torch-int4pack": "torch int4 GEMV (`_weight_int4pack_mm`, tinygemm)",
              "bitsandbytes-nf4": "bitsandbytes NF4 GEMV (`matmul_4bit`)", "reference": "reference backend",
              "paper": "paper's code path"}

_GPU_OPS = ("project", "reconstruct", "twa_step", "project_bf16", "reconstruct_bf16")


def cuda_ops(page: Path) -> str:
    """bench/gpu.py: each backend and peer at D = 88M, 4 bits; the grid's fractions of copy; the profile."""
    out = []
    for path in _files("cuda-ops"):
        d = json.loads(path.read_text())
        rows = d["rows"]
        paper = {(r["op"], r["k"]): r["ms"] for r in rows if r["impl"] == "paper" and r["model"] == "88M"
                 and r["bits"] == 4}
        out += [f"**{stamp_line(d.get('stamp'), _slug(path, 'cuda-ops'))}**; device-to-device copy "
                f"{d['copy_gbps']:.0f} GB/s (read + write) in the same run; medians of CUDA-event timings "
                f"([JSON]({_link(path, page)}))", "",
                "| op, D = 88M, 4-bit | k | implementation | ms | GB/s | of copy | vs paper |",
                "|---|---:|---|---:|---:|---:|---:|"]
        order = list(_GPU_IMPLS)
        head = sorted((r for r in rows if r["model"] == "88M" and r["bits"] == 4),
                      key=lambda r: (_GPU_OPS.index(r["op"]) if r["op"] in _GPU_OPS else len(_GPU_OPS), r["k"],
                                     order.index(r["impl"]) if r["impl"] in order else len(order)))
        for r in head:
            base = paper.get((r["op"], r["k"])) if r["impl"] != "paper" else None
            speedup = f"{base / r['ms']:.0f}x" if base else "-"
            label = _GPU_IMPLS.get(r["impl"], r["impl"])
            if r.get("rel_error") is not None:
                label += f" (error {r['rel_error']:.0e})"
            out.append(f"| {r['op']} | {r['k']} | {label} | {r['ms']:.3f} | {r['gbps']:.0f} | "
                       f"{r['fraction_of_copy']:.0%} | {speedup} |")
        grid = defaultdict(dict)
        for r in rows:
            if r["impl"] in ("cuda", "triton"):
                grid[(r["model"], r["k"], r["bits"])][(r["op"], r["impl"])] = r
        columns = [(op, impl) for op in _GPU_OPS for impl in ("cuda", "triton")]
        out += ["", "Every case of the grid, as a fraction of the copy bandwidth (ms in brackets):", "",
                "| D | k | bits | " + " | ".join(f"{op} {impl}" for op, impl in columns) + " |",
                "|---|---:|---:|" + "---:|" * len(columns)]
        for (model, k, bits), cells in sorted(grid.items(), key=lambda kv: (kv[0][0] != "88M", kv[0][1], kv[0][2])):
            out.append(f"| {model} | {k} | {bits} | " + " | ".join(
                f"{cells[c]['fraction_of_copy']:.0%} ({cells[c]['ms']:.2f})" if c in cells else "-" for c in columns)
                + " |")
        if d.get("profile"):
            out += ["", "Where the time goes (torch.profiler, D = 88M, 4-bit; device time per call):", "",
                    "| op | k | backend | kernels: us per call (launches) |", "|---|---:|---|---|"]
            for prof in d["profile"]:
                kernels = "; ".join(f"`{kern['kernel'][:40]}` {kern['us_per_call']:.0f} ({kern['launches_per_call']:g})"
                                    for kern in prof["kernels"][:4])
                out.append(f"| {prof['op']} | {prof['k']} | {prof['impl']} | {kernels} |")
        if d.get("failures"):
            out += ["", "Cases that failed in this run:", ""]
            out += [f"- {f['case']}: {str(f['error'])[:200]}" for f in d["failures"]]
        out.append("")
    return "\n".join(out).strip() or "bench/results holds no GPU results (bench/gpu_run.sh writes them)."


def builder_memory(page: Path) -> str:
    """Peak memory growth of a subspace build (bench/builder_memory.py), newest run."""
    paths = _files("builder-memory")
    if not paths:
        return "No builder-memory results in bench/results yet."
    run = json.loads(paths[0].read_text())
    rows, mb = run["rows"], lambda x: f"{x:.1f}"
    first = rows[0]
    plane = next((r for r in rows if r["case"].startswith("plane")), None)
    lines = [f"Peak memory growth of a build, k = {run['k']} checkpoints ({run['checkpoint']}, "
             f"{first['w_mb'] / 4:.1f}M weights), {run['bits']}-bit basis (W = {mb(first['w_mb'])} MB "
             f"one dense checkpoint; basis {mb(first['basis_mb'])} MB"
             + (f", a plane's {mb(plane['basis_mb'])} MB" if plane else "") + "), measured by "
             f"`python bench/builder_memory.py` in fresh processes ([JSON]({_link(paths[0], page)}): "
             f"{stamp_line(run['stamp'], _slug(paths[0], 'builder-memory'))}):",
             "", "| caller | peak growth |", "|---|---|"]
    for i, r in enumerate(rows):
        ratio = r["peak_mb"] / (r["w_mb"] + r["basis_mb"])
        lines.append(f"| {r['case']} | {r['peak_mb']:.0f} MB ({ratio:.2f} x{' (W + basis)' if i == 0 else ''}) |")
    return "\n".join(lines)


SECTIONS = {"headline": headline, "ops": ops, "ops-interleaved": ops_interleaved, "access-pattern": access_pattern,
            "steady-step": steady_step, "distributed-step": distributed_step, "cuda-ops": cuda_ops,
            "builder-memory": builder_memory}
PAGES = {"README.md": ["headline"], "docs/design.md": ["builder-memory"],
         "docs/benchmarks.md": ["headline", "ops", "ops-interleaved", "access-pattern", "steady-step",
                                "distributed-step", "cuda-ops"]}


def render(text: str, page: Path) -> str:
    """`text` with every report section present in it regenerated."""
    for name, make in SECTIONS.items():
        pattern = re.compile(rf"(<!-- report:{name} -->\n).*?(<!-- /report:{name} -->)", re.S)
        if pattern.search(text):
            body = make(page)
            text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def check_pages(write: bool) -> list[str]:
    """The pages whose tables differ from the results (rewritten when `write`)."""
    stale = []
    for rel, names in PAGES.items():
        page = REPO / rel
        text = original = page.read_text()
        for name in names:  # each section whole and once: a lost closing marker let --check pass
            opening = re.compile(rf"<!-- report:{name} -->[ \t\r]*\n")
            counts = len(opening.findall(text)), text.count(f"<!-- /report:{name} -->")
            if counts != (1, 1):
                raise SystemExit(f"{rel}: the section {name} must open with <!-- report:{name} --> on a line of "
                                 f"its own and close with <!-- /report:{name} -->, once each; found {counts[0]} "
                                 f"and {counts[1]}")
            text = opening.sub(f"<!-- report:{name} -->\n", text)
        new = render(text, page)
        if new != original:
            stale.append(rel)
            if write:
                page.write_text(new)
            else:
                sys.stdout.writelines(difflib.unified_diff(original.splitlines(True), new.splitlines(True), rel, rel))
    return stale


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "--print":
        for name, make in SECTIONS.items():
            print(f"<!-- report:{name} -->\n{make(REPO / 'docs' / 'benchmarks.md')}\n<!-- /report:{name} -->\n")
        return 0
    if argv[0] in ("--write", "--check"):
        stale = check_pages(write=argv[0] == "--write")
        verb = "rewrote" if argv[0] == "--write" else "out of date (run python bench/report.py --write)"
        print(f"{verb}: {', '.join(stale)}" if stale else "the docs' tables match bench/results")
        return 1 if stale and argv[0] == "--check" else 0
    run_path = Path(argv[0])
    out_path = Path(argv[1]) if len(argv) > 1 else run_path.with_name(run_path.stem + "-roofline.json")
    report = build_report(json.loads(run_path.read_text()))
    from twa_kernels.io import write_json  # the package's atomic write (torch, not needed by --check)

    write_json(out_path, report)  # whole or not at all, flushed, in the umask's mode
    print(stamp_line(report["stamp"]) + "\n")
    print(markdown(report))
    print(f"\nwritten: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
