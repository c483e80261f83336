"""The fused TWA step in fresh processes: is it fast from the first call, in every process?

    python bench/steady_step.py                 # 5 fresh processes + the training-step phase
    python bench/steady_step.py --processes 3 --calls 30

Each worker process builds a ResNet-18-shaped basis (11.7M weights, k = 16, 4-bit, one
block per tensor), measures the copy bandwidth (a 256 MiB tensor copy, median of 10), then
times every call of the fused step from the first one: project a gradient, step the
coefficients, reconstruct the weights into the workspace the way tk.TWA's forward does
(`_memory.Workspace`, allocated and its pages touched when the TWA is built). Loading the
compiled kernels, once per process, is timed apart on a tiny basis. It reports:

- steady: the median of calls 11..N, and its fraction of the copy bandwidth (the step's
  minimum bytes: the packed basis twice, g and center read, w written);
- first-call ratio: the slowest of calls 1..3 over steady;
- the same two against a reference copy timed right after every call (a 47 MB tensor
  copy, the size of the weights): a shared machine's speed can drift by up to 2x for seconds to
  minutes, and the interleaved copy drifts with it, so step / copy of the same moment
  shows what the step itself does.

Across processes: the median fraction, and the spread (slowest steady / fastest steady),
raw and against the interleaved copy.
Then, in one process, a ResNet-18 training step (batch 32, 32x32): plain SGD, TWA with the
workspace, the same with int8_gradients=True, and TWA with a fresh output per step, each
the median of 10 after 3 warm-ups, interleaved so that drifts of a shared machine hit all
four alike, with the minor page faults of each step, the median of each phase of a step
(forward with the loss, backward, optimizer step: TWA's reconstruct runs in the first, its
project in the second, while SGD updates the weights in the third), and a torch.profiler
table of the SGD and TWA steps' top operators (where TWA's extra time goes). Last, SGD and TWA
steps on ResNet-18's 62 tensors at 1/16 of its channels, where the kernels take microseconds:
their difference is TWA's Python and dispatch per step. On glibc the training
phase runs a second time in a process that called tk.keep_freed_memory() first (freed
memory stays in the process instead of going back to the system, as jemalloc or tcmalloc
keep it), so that page faults of memory the allocator gave back and took again are told
apart from the kernels' own time.

Writes bench/results/<machine>-steady-step.json (`--runs N` repeats the whole measurement N
times into one file) and prints the tables. No assertion on time: this is
a measurement; docs/benchmarks.md shows it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

K, BITS, LR = 16, 4, 1e-3
_PHASES = ("forward", "backward", "update")


def _copy_bandwidth() -> float:
    from conftest import on_huge_pages  # on huge pages, as the step's basis, center and workspace

    src, dst = on_huge_pages(torch.randn(64 << 20)), on_huge_pages(torch.zeros(64 << 20))
    times = []
    for _ in range(12):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times[2:])


def worker(calls: int) -> dict:
    import twa_kernels as tk
    from conftest import on_huge_pages, random_packed_basis
    from shapes import MODELS
    from twa_kernels._memory import empty_huge
    from twa_kernels._memory import Workspace

    sizes = MODELS["resnet18"]()
    qb = random_packed_basis(K, sizes, BITS)
    d = qb.num_cols
    g = torch.randn(d)  # autograd's gradient: on ordinary pages
    center = empty_huge((d,), torch.float32).normal_()  # on huge pages, as tk.TWA's center is
    x = torch.zeros(K, qb.num_blocks)
    workspace = Workspace()
    workspace.prepare(d, torch.float32, center.device)  # as tk.TWA's constructor does
    copy = _copy_bandwidth()
    # Loading the compiled kernels (a once-per-process import, not a property of the step)
    # is timed apart, on a tiny basis.
    t0 = time.perf_counter()
    tk.project(tk.quantize(torch.randn(2, 256), bits=BITS), torch.randn(256))
    load = time.perf_counter() - t0
    ref_src, ref_dst = on_huge_pages(torch.randn(d)), on_huge_pages(torch.zeros(d))  # touched before the calls
    times, copies = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        x = x - LR * tk.project(qb, g)
        out, release = workspace.take(d, torch.float32, center.device, record=False)
        tk.reconstruct(qb, x, center, out=out)
        release()
        t1 = time.perf_counter()
        ref_dst.copy_(ref_src)
        times.append(t1 - t0)
        copies.append(time.perf_counter() - t1)
    steady = statistics.median(times[10:])
    ratios = [t / c for t, c in zip(times, copies)]  # the step in units of a copy of the same moment
    steady_ratio = statistics.median(ratios[10:])
    nbytes = 2 * qb.nbytes + 12 * d
    return {
        "step_over_copy": steady_ratio,
        "first_call_ratio_vs_copy": max(ratios[:3]) / steady_ratio,
        "fraction_of_interleaved_copy": nbytes / (8 * d) / steady_ratio,
        "copy_GBps": copy / 1e9,
        "kernel_load_ms": load * 1e3,
        "steady_ms": steady * 1e3,
        "first3_ms": [t * 1e3 for t in times[:3]],
        "first_call_ratio": max(times[:3]) / steady,
        "GBps": nbytes / steady / 1e9,
        "fraction_of_copy": nbytes / steady / copy,
        "bytes": nbytes,
    }


def training_steps(rounds: int = 10, profile: bool = True) -> dict:
    import torch.nn.functional as F
    from torch.func import functional_call

    import twa_kernels as tk
    from resnet import resnet18

    torch.manual_seed(0)
    model = resnet18()
    subspace = _random_subspace(model)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 1000, (32,))
    twa = tk.TWA(model, subspace)
    twa_int8 = tk.TWA(model, subspace, int8_gradients=True)

    phase_times = {}  # name -> one [forward, backward, update] list of seconds per timed step

    def stepper(name, params, forward):
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        phase_times[name] = []

        def step(record: bool = False):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(forward(x), y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            if record:
                phase_times[name].append((t1 - t0, t2 - t1, time.perf_counter() - t2))

        return step

    steps = {
        "sgd": stepper("sgd", model.parameters(), model),
        "twa": stepper("twa", twa.parameters(), twa),
        # the gradient rounded to int8 per basis group before its projection (tk.project_int8)
        "twa_int8_gradients": stepper("twa_int8_gradients", twa_int8.parameters(), twa_int8),
        # the same TWA step with a fresh D-long output each call (the path before the workspace)
        "twa_fresh_output": stepper("twa_fresh_output", twa.parameters(),
                                    lambda inp: functional_call(model, twa.weights(), (inp,))),
    }
    times = {name: [] for name in steps}
    faults = {name: [] for name in steps}
    for r in range(rounds + 3):
        for name, step in steps.items():
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            step(record=r >= 3)
            if r >= 3:
                times[name].append(time.perf_counter() - t0)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    result = {
        "median_ms": med,
        "median_page_faults": {name: statistics.median(f) for name, f in faults.items()},
        # where a step's time goes: zero_grad + forward + loss, backward (TWA's project runs
        # in it), the optimizer's step (SGD's update of the weights; TWA's of k x B numbers)
        "median_phase_ms": {name: dict(zip(_PHASES, (statistics.median(p) * 1e3 for p in zip(*rows))))
                            for name, rows in phase_times.items()},
        "twa_overhead": med["twa"] / med["sgd"] - 1,
        "twa_int8_gradients_overhead": med["twa_int8_gradients"] / med["sgd"] - 1,
        "twa_fresh_output_overhead": med["twa_fresh_output"] / med["sgd"] - 1,
    }
    if profile:
        result["profile"] = {name: _profile(steps[name]) for name in ("sgd", "twa", "twa_int8_gradients")}
    result["small_layout"] = small_layout_steps()
    return result


def small_layout_steps(rounds: int = 200) -> dict:
    """TWA's cost per step beyond its kernels' bytes: ResNet-18's 62 tensors at 1/16 of its
    channels (45,102 weights, 10 classes, batch 2), where the kernels take microseconds and
    a step is mostly Python and dispatch. SGD and TWA steps interleaved, medians after 20."""
    import torch.nn.functional as F

    import twa_kernels as tk
    from resnet import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10, width=4)
    subspace = _random_subspace(model)
    twa = tk.TWA(model, subspace)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))

    def stepper(params, forward):
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

        def step():
            opt.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            opt.step()

        return step

    steps = {"sgd": stepper(model.parameters(), model), "twa": stepper(twa.parameters(), twa)}
    times = {name: [] for name in steps}
    for _ in range(rounds + 20):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t[20:]) * 1e3 for name, t in times.items()}
    return {"tensors": len(subspace.names), "weights": subspace.center.numel(), "median_ms": med,
            "twa_minus_sgd_ms": med["twa"] - med["sgd"]}


def _random_subspace(model: torch.nn.Module):
    """A subspace of all the model's parameters around their values, with a random k x D
    packed basis (the kernels' cost does not depend on the codes)."""
    import twa_kernels as tk
    from conftest import random_packed_basis

    params = list(model.named_parameters())
    center = torch.cat([p.detach().reshape(-1) for _, p in params])
    return tk.Subspace([n for n, _ in params], [tuple(p.shape) for _, p in params], center,
                       random_packed_basis(K, [p.numel() for _, p in params], BITS))


def _profile(step, calls: int = 3, top: int = 12) -> list[dict]:
    """Where a step's time goes: torch.profiler's top operators by self CPU time, per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / calls, "calls_per_step": e.count / calls}
            for e in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--worker", choices=["step", "train"])
    parser.add_argument("--keep-freed-memory", action="store_true", help="worker: call tk.keep_freed_memory() first")
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole measurement, one after another")
    parser.add_argument("--out", default=None, help="default: bench/results/<machine>-steady-step.json")
    args = parser.parse_args()
    if args.calls <= 10:  # the first 10 calls warm up and are not timed
        parser.error(f"--calls must be more than 10, got {args.calls}")
    if args.worker:
        if args.keep_freed_memory:
            import twa_kernels as tk

            if not tk.keep_freed_memory():
                raise SystemExit("keep_freed_memory() changed nothing on this platform")
        result = worker(args.calls) if args.worker == "step" else training_steps()
        print(json.dumps(result))
        return
    from stamp import machine_slug, stamp, write_result

    out = Path(args.out or HERE / "results" / f"{machine_slug()}-steady-step.json")
    info = stamp()
    results = []
    for i in range(args.runs):
        if args.runs > 1:
            print(f"\nrun {i + 1} of {args.runs}")
        results.append(one_run(args))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_result(out, {"suite": "steady-step", "stamp": info, "runs": results})
    print(f"wrote {out}")


def one_run(args: argparse.Namespace) -> dict:
    runs = []
    for i in range(args.processes):
        done = subprocess.run([sys.executable, __file__, "--worker", "step", "--calls", str(args.calls)],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"process {i + 1}: steady {r['steady_ms']:.1f} ms, {r['fraction_of_copy']:.0%} of copy "
              f"({r['GBps']:.1f} / {r['copy_GBps']:.1f} GB/s), first calls "
              f"{', '.join(f'{t:.1f}' for t in r['first3_ms'])} ms; {r['step_over_copy']:.2f} copies a step, "
              f"{r['fraction_of_interleaved_copy']:.0%} of the interleaved copy", flush=True)
    steadies = [r["steady_ms"] for r in runs]
    ratios = [r["step_over_copy"] for r in runs]
    summary = {
        "median_fraction_of_copy": statistics.median(r["fraction_of_copy"] for r in runs),
        "spread_slowest_over_fastest": max(steadies) / min(steadies),
        "worst_first_call_ratio": max(r["first_call_ratio"] for r in runs),
        "median_steady_ms": statistics.median(steadies),
        # against the copy timed after every call: machine drift divided out
        "median_fraction_of_interleaved_copy": statistics.median(r["fraction_of_interleaved_copy"] for r in runs),
        "spread_vs_copy": max(ratios) / min(ratios),
        "worst_first_call_ratio_vs_copy": max(r["first_call_ratio_vs_copy"] for r in runs),
    }
    train = _train_in_fresh_process()
    result = {"case": {"model": "resnet18", "k": K, "bits": BITS}, "processes": runs, "summary": summary,
              "training_step": train}
    if platform.libc_ver()[0] == "glibc":
        result["training_step_kept_heap"] = kept = _train_in_fresh_process(keep_freed_memory=True)
        kept["heap_kept_by"] = "tk.keep_freed_memory()"
    print(f"\nmedian fraction of copy bandwidth {summary['median_fraction_of_copy']:.0%} (target >= 70%); "
          f"spread {summary['spread_slowest_over_fastest']:.2f}x (target <= 1.5x); "
          f"worst first-call ratio {summary['worst_first_call_ratio']:.2f}x (target <= 1.5x)")
    print(f"against a copy timed after every call: median fraction "
          f"{summary['median_fraction_of_interleaved_copy']:.0%}, spread {summary['spread_vs_copy']:.2f}x, "
          f"worst first-call ratio {summary['worst_first_call_ratio_vs_copy']:.2f}x")
    for label, phase in (("training step", train), ("training step, heap kept", result.get("training_step_kept_heap"))):
        if phase is not None:
            _print_training(label, phase)
    return result


def _train_in_fresh_process(keep_freed_memory: bool = False) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", "train"]
                          + (["--keep-freed-memory"] if keep_freed_memory else []),
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_training(label: str, train: dict) -> None:
    med, faults = train["median_ms"], train["median_page_faults"]
    print(f"\n{label}: SGD {med['sgd']:.0f} ms, TWA {med['twa']:.0f} ms ({train['twa_overhead']:+.0%}), "
          f"TWA with int8 gradients {med['twa_int8_gradients']:.0f} ms "
          f"({train['twa_int8_gradients_overhead']:+.0%}), "
          f"TWA with a fresh output {med['twa_fresh_output']:.0f} ms ({train['twa_fresh_output_overhead']:+.0%}); "
          f"page faults per step: " + ", ".join(f"{name} {n:.0f}" for name, n in faults.items()))
    for name, phases in train.get("median_phase_ms", {}).items():
        print(f"  {name}: " + ", ".join(f"{phase} {ms:.1f} ms" for phase, ms in phases.items()))
    small = train.get("small_layout")
    if small:
        print(f"  {small['tensors']} tensors at 1/16 width ({small['weights']} weights): SGD "
              f"{small['median_ms']['sgd']:.2f} ms, TWA {small['median_ms']['twa']:.2f} ms, "
              f"TWA - SGD {small['twa_minus_sgd_ms']:+.2f} ms")
    for name, rows in train.get("profile", {}).items():
        print(f"\n{name} step, top operators by self CPU time (ms per step):")
        for row in rows:
            print(f"  {row['self_ms_per_step']:8.1f}  {row['op']}")


if __name__ == "__main__":
    main()
