"""Weight-space geometry at CPU scale: barriers on MNIST-1D, sharpness of SWA against SGD,
and the memory of a 21x21 loss plane on ResNet-18 shapes.

    python -m experiments.connectivity barriers|sharpness|memory|all [--out results/connectivity]

barriers   the demo's CNN, trained with SGD from two seeds (15 epochs, cosine): the barrier
           of a model with itself, of nearby epochs of one run, of the start and end of the
           head stage, and of the two independent runs; BatchNorm recomputed at every alpha
           (update_bn) and, for comparison, interpolated as McDermott & Cummings' code does.
sharpness  the dominant Hessian eigenvalue (power iteration) of the training loss at the
           final SGD model and at SWA over the head-stage checkpoints, and the mean of
           Hutchinson's Hessian diagonal (an estimate of trace / P).
memory     a 21x21 plane through three ResNet-18 checkpoints (11.7M weights) on files, in
           a fresh process per setting: peak resident memory above the process's own before
           the call (the model's forward included), against 2x one model's weights plus the
           packed basis; the model's own forward measured alone; building the plane alone from .pt files, from
           .safetensors files, and from .pt files through one mapping kept to the end.

Writes <out>/connectivity.json and <out>/barriers.png and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from experiments.common import ROOT, save_figure, stamp, write_report


# ---- barriers --------------------------------------------------------------------------------


# train_sgd shuffles epoch e of seed s with seed s + e: runs of seeds 0 and 1 would share 14
# of 15 batch orders, so each run's orders start this far apart
_ORDER_SEEDS_APART = 1000


def _trained_runs(work: Path, seeds=(0, 1), epochs: int = 15) -> dict[int, list[Path]]:
    from twa_kernels.demo import make_model, mnist1d, train_sgd

    runs = {}
    for seed in seeds:
        train, _, _ = mnist1d(0)  # one data split for both runs: only the initialisation and batch orders differ
        paths, _, _ = train_sgd(make_model(seed), train, epochs, _ORDER_SEEDS_APART * seed, work / f"seed{seed}",
                                lr=0.05)
        runs[seed] = paths
    return runs


def barriers(work: Path) -> dict:
    from torch.utils.data import DataLoader

    from twa_kernels import connectivity as C
    from twa_kernels.demo import make_model, mnist1d

    runs = _trained_runs(work)
    train, _, test = mnist1d(0)
    data, bn_data = [test.tensors], DataLoader(train, batch_size=500)
    a = runs[0]
    pairs = {
        "itself (epoch 15)": (a[-1], a[-1]),
        "epochs 14 and 15": (a[-2], a[-1]),
        "epochs 3 and 9 (head stage)": (a[2], a[8]),
        "two seeds, epoch 15": (a[-1], runs[1][-1]),
    }
    out = {}
    for name, (x, y) in pairs.items():
        for bn in ("recompute", "interpolate"):
            r = C.interpolate(make_model(0), x, y, data, steps=11, bn=bn, bn_data=bn_data)
            out[f"{name} | {bn}"] = r.to_dict()
    return out


def barrier_table(results: dict) -> str:
    lines = [f"{'pair':<30} {'BatchNorm':<12} {'loss barrier':>12} {'error barrier (pts)':>20} "
             f"{'loss at 0 / 0.5 / 1':>22}"]
    for key, r in results.items():
        name, bn = key.split(" | ")
        mid = r["loss"][len(r["loss"]) // 2]
        lines.append(f"{name:<30} {bn:<12} {r['loss_barrier']:>12.4f} {100 * r['error_barrier']:>20.2f} "
                     f"{r['loss'][0]:>8.3f} / {mid:.3f} / {r['loss'][-1]:.3f}")
    return "\n".join(lines)


def plot_barriers(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({k.split(" | ")[0] for k in results}, key=list(k.split(" | ")[0] for k in results).index)
    for i, name in enumerate(names):
        for bn, style in (("recompute", "-"), ("interpolate", "--")):
            r = results[f"{name} | {bn}"]
            label = f"{name}, BN {bn}"
            left.plot(r["alphas"], r["loss"], style, color=f"C{i}", marker="o", ms=3, label=label)
            right.plot(r["alphas"], [100 * e for e in r["error"]], style, color=f"C{i}", marker="o", ms=3)
    left.set_ylabel("test loss")
    right.set_ylabel("test error (%)")
    for ax in (left, right):
        ax.set_xlabel("alpha: (1 - alpha) a + alpha b")
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.legend(fontsize=7)
    fig.suptitle("MNIST-1D CNN: linear interpolation between checkpoints (solid: BatchNorm recomputed, "
                 "dashed: interpolated as in the study's code)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


# ---- sharpness -------------------------------------------------------------------------------


def sharpness(work: Path) -> dict:
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from twa_kernels import connectivity as C
    from twa_kernels.averaging import uniform_average
    from twa_kernels.demo import make_model, mnist1d
    from twa_kernels.io import load_state_dict

    runs = work / "seed0"
    paths = sorted(runs.glob("epoch_*.safetensors"))
    if len(paths) < 15:
        paths = _trained_runs(work, seeds=(0,))[0]
    train, _, _ = mnist1d(0)
    data = [(train.tensors[0][:1000], train.tensors[1][:1000])]
    models = {"SGD, final (epoch 15)": load_state_dict(paths[-1]), "SGD, epoch 9": load_state_dict(paths[8]),
              "SWA of epochs 1-9": uniform_average(paths[:9])}
    out = {}
    for name, state in models.items():
        model = make_model(0)
        model.load_state_dict(state)
        torch.optim.swa_utils.update_bn(DataLoader(train, batch_size=500), model)
        top = C.top_eigenvalue(model, F.cross_entropy, data, iters=100, tol=1e-4, seed=0)
        diag = C.hessian_diagonal(model, F.cross_entropy, data, samples=200, chunk=50, seed=0)
        numel = sum(t.numel() for t in diag.values())
        with torch.no_grad():
            model.eval()
            loss = float(F.cross_entropy(model(data[0][0]), data[0][1]))
        out[name] = dict(top_eigenvalue=top.value, iterations=len(top.trace), converged=top.converged,
                         mean_diagonal=float(sum(t.sum() for t in diag.values()) / numel), train_loss=loss)
    return out


def sharpness_table(results: dict) -> str:
    lines = [f"{'model':<24} {'train loss':>10} {'top eigenvalue':>15} {'(iters)':>8} {'mean diag H':>12}"]
    for name, r in results.items():
        lines.append(f"{name:<24} {r['train_loss']:>10.4f} {r['top_eigenvalue']:>15.3f} {r['iterations']:>8d} "
                     f"{r['mean_diagonal']:>12.3e}")
    return "\n".join(lines)


# ---- memory ----------------------------------------------------------------------------------

_CHILD = r"""
import gc, json, re, sys, tempfile, time
from pathlib import Path
import torch
from resnet import resnet18  # bench/ is on the child's PYTHONPATH
from safetensors.torch import save_file
from twa_kernels import connectivity as C
from twa_kernels import io
from twa_kernels._memory import return_freed_memory
from twa_kernels.geometry import planes
from twa_kernels import columns
from twa_kernels.columns import ColumnReader

def status(key):
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

torch.set_num_threads(1)
bits, grid = {bits!r}, {grid!r}
torch.manual_seed(0)
model = resnet18()
numel = sum(p.numel() for p in model.parameters())
work = Path(tempfile.mkdtemp())
paths, safetensors = [], []
for i in range(3):
    state = {{k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}}
    paths.append(work / f"ckpt{{i}}.pt")
    safetensors.append(work / f"ckpt{{i}}.safetensors")
    torch.save(state, paths[-1])
    save_file(state, safetensors[-1])
    del state
gc.collect()
data = [(torch.randn(2, 3, 32, 32), torch.tensor([1, 7]))]
# not the plane's memory: the kernels' library (about 130 MB of code mapped at the first call)
import twa_kernels as tk
from twa_kernels.batchnorm import update_bn
tk.reconstruct(tk.quantize(torch.ones(2, 64), bits, 64), torch.ones(2, 1))
return_freed_memory()
def forward():
    update_bn(data, model)
    with torch.no_grad():
        model.eval()(data[0][0])
# the model's own working memory for one point (BatchNorm pass and evaluation), from a trimmed heap
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
forward()
forward_bytes = status("VmHWM") - before
gc.collect()
return_freed_memory()
def build_peak(files):
    # the construction alone (streaming the three files into the origin and the packed directions)
    gc.collect()
    return_freed_memory()
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    frame, _ = planes._frame_from_checkpoints(model, files, bits, 128, False)
    peak = status("VmHWM") - before
    del frame
    gc.collect()
    return_freed_memory()
    return peak
builds = dict(pt=build_peak(paths), safetensors=build_peak(safetensors))
# for comparison: a .pt file read through one mapping whose pages are never given back
# (neither madvise nor reopening): touched file pages count in RSS
drop_pages = columns._drop_pages
planes.ColumnReader, columns._drop_pages = (lambda spec, **kw: ColumnReader(spec, **kw, resident_bytes=1 << 62)), (lambda v: False)
builds["pt, mapping kept"] = build_peak(paths)
planes.ColumnReader, columns._drop_pages = ColumnReader, drop_pages
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
start = time.perf_counter()
result = C.plane(model, paths, data, grid=grid, bits=bits)
seconds = time.perf_counter() - start
peak = status("VmHWM")
basis = result.frame.basis.nbytes
print(json.dumps(dict(bits=bits, grid=grid, weights=numel, model_bytes=4 * numel, basis_bytes=basis,
                      rss_before=before, forward_bytes=forward_bytes, build_peak=builds, peak_extra=peak - before, bound=2 * 4 * numel + basis, seconds=seconds,
                      loss_range=[float(result.loss.min()), float(result.loss.max())])))
"""


def memory(grid: int = 21) -> list[dict]:
    out = []
    for bits in (None, 4):
        code = _CHILD.format(bits=bits, grid=grid)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "bench"), str(ROOT), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=3600,
                              env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory child (bits={bits}) failed:\n{done.stderr[-3000:]}")
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def memory_table(results: list[dict]) -> str:
    mb = 1e6
    lines = [f"{'directions':<11} {'W':>6} {'basis':>6} {'2W+basis':>9} {'build .pt':>10} {'.safetensors':>13} "
             f"{'.pt, map kept':>14} {'plane peak':>11} {'/ bound':>8} {'forward':>8} {'peak - fwd':>11} "
             f"{'s / point':>10}   (MB)"]
    for r in results:
        build, fwd = r["build_peak"], r["forward_bytes"]
        lines.append(f"{('dense' if r['bits'] is None else str(r['bits']) + '-bit'):<11} "
                     f"{r['model_bytes'] / mb:>6.1f} {r['basis_bytes'] / mb:>6.1f} {r['bound'] / mb:>9.1f} "
                     f"{build['pt'] / mb:>10.1f} {build['safetensors'] / mb:>13.1f} "
                     f"{build['pt, mapping kept'] / mb:>14.1f} {r['peak_extra'] / mb:>11.1f} "
                     f"{r['peak_extra'] / r['bound']:>8.2f} {fwd / mb:>8.1f} {(r['peak_extra'] - fwd) / mb:>11.1f} "
                     f"{r['seconds'] / r['grid'] ** 2:>10.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["barriers", "sharpness", "memory", "all"])
    parser.add_argument("--out", default=str(ROOT / "results" / "connectivity"))
    parser.add_argument("--grid", type=int, default=21, help="memory: points per axis of the ResNet-18 plane")
    args = parser.parse_args()
    stamp()  # the run's provenance, as it starts (experiments.common.stamp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "connectivity.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    # each section keeps the provenance of the run that measured it; "stamp" is the last run's
    run_stamps = report.setdefault("run_stamps", {})
    for section in ("barriers", "sharpness", "memory"):
        if section in report and section not in run_stamps and "stamp" in report:
            run_stamps[section] = report["stamp"]
    torch.set_num_threads(1)  # small models on a shared machine: one thread is the fastest
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.what in ("barriers", "all"):
            start = time.perf_counter()
            report["barriers"] = barriers(work)
            run_stamps["barriers"] = stamp()
            print(barrier_table(report["barriers"]), f"\n({time.perf_counter() - start:.0f}s)\n")
            plot_barriers(report["barriers"], out / "barriers.png")
        if args.what in ("sharpness", "all"):
            report["sharpness"] = sharpness(work)
            run_stamps["sharpness"] = stamp()
            print(sharpness_table(report["sharpness"]), "\n")
        if args.what in ("memory", "all"):
            report["memory"] = memory(args.grid)
            run_stamps["memory"] = stamp()
            print(memory_table(report["memory"]), "\n")
    write_report(report_path, report)  # with the machine, date and commit
    print(f"written: {report_path}" + (f", {out / 'barriers.png'}" if "barriers" in report else ""))


if __name__ == "__main__":
    main()
