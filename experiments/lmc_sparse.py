"""Sparse networks found with distilled data, and their stability to SGD noise (McDermott &
Cummings, arXiv 2310.18769), at CPU scale.

The claim: iterative magnitude pruning (IMP) run on a distilled data set (a small synthetic
summary of the training set) finds masks whose sparse networks, retrained on the real data
from the rewound weights, are more stable to SGD noise than the dense network or than the
masks real-data IMP finds (two trainings with different data orders end linearly
mode-connected: a small error barrier between them), and match real-data IMP's accuracy
while the pruning itself reads far fewer training points.

The run: MNIST-1D (3,500 training signals, 1,000 test signals; generated locally) and the
demo's 1-D CNN with BatchNorm, for each seed:
  * real IMP: `rounds` rounds of global magnitude pruning at `rate`, each round trained on
    the real data, rewound to the initialisation;
  * distilled IMP: the same, with every IMP round trained on a distribution-matching
    distillation of the training set at 10 and at 50 examples per class;
  * at every sparsity, from the rewound weights and the mask, two copies trained on the
    real data with data-order seeds A and B (real IMP's own round is its copy A): test
    accuracy of copy A, and the instability, the test-error barrier along the line between
    the copies (tk.connectivity.interpolate, masks held, BatchNorm recomputed at each point);
  * for seed 0 at one sparsity, a third copy (seed C) and the test-loss plane through the
    three.
All methods share the initialisation, so the dense level (round 0) is one measurement.

    python -m experiments.lmc_sparse          # 3 seeds, 12-16 minutes on 2 cores
    python -m experiments.lmc_sparse --quick                             # 1 seed, 2 rounds: a smoke run
    python -m experiments.lmc_sparse fair [--seeds 8] [--jobs 2]   # the calibration first: fair.json, fair.png

`fair` first calibrates (see `calibrate`): it looks for a width, learning rate and
augmentation at which both the dense network and a real-data IMP ticket rewound to
initialisation are unstable (error barrier >= 2 points between two data orders), the regime
where the claim can show. Without such a setting it records the sweep and stops.

Writes results/lmc_sparse/results.json (once the calibration finds such a setting; the sweep
alone goes to fair.json and fair.png), lmc_sparse.png (accuracy and barrier against
sparsity), plane_*.png and interpolation.png, and prints the table. IMP's per-round files go
to --work (default: a folder in the temp dir; resumable: a killed run picks up where it
stopped). --quick writes everything under the work folder, nothing in results/.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

import twa_kernels as tk
from experiments.common import (RESULTS, accuracy, mnist1d as mnist1d_cached, parser, pyplot, save_figure, stamp,
                                write_report)
from twa_kernels.demo import make_model, mnist1d

METHODS = ("real", "distilled ipc 10", "distilled ipc 50")
SEED_A, SEED_B, SEED_C = 1, 2, 3  # data-order seeds of the copies (offset per seed)


def batches(dataset: TensorDataset, size: int, limit: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = dataset.tensors
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def clone(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def state_accuracy(model: nn.Module, state: dict, test: TensorDataset) -> float:
    model.load_state_dict(state)
    return accuracy(model, test)


def train_copy(model: nn.Module, start: dict, mask: dict, train: TensorDataset, epochs: int, seed: int) -> dict:
    """The sparse network from `start` under `mask`, trained on the real data with data order `seed`."""
    model.load_state_dict(start)
    with tk.prune.apply_masks(model, mask if tk.prune.sparsity(mask) > 0 else {}):
        tk.prune.train_classifier(model, train, epochs=epochs, seed=seed)
    return clone(model)


def run_seed(seed: int, args: argparse.Namespace, work: Path, bar: tqdm) -> dict:
    train, _, test = mnist1d(seed)
    model = make_model(seed)
    eval_data, bn_data = batches(test, 1000), batches(train, 500, limit=2000)
    seeds = {k: 100 * seed + s for k, s in (("A", SEED_A), ("B", SEED_B), ("C", SEED_C))}

    found, points, distill_seconds = {}, {}, {}
    start = time.perf_counter()
    found["real"] = tk.prune.imp(make_model(seed), tk.prune.classification_train_fn(train, args.epochs, seeds["A"]),
                                 rounds=args.rounds, rate=args.rate, rewind="init", out_dir=work / f"seed{seed}/real")
    points["real"] = len(train)
    bar.update(1)
    for ipc in (10, 50):
        name = f"distilled ipc {ipc}"
        path = work / f"seed{seed}/distilled_ipc{ipc}.safetensors"
        t0 = time.perf_counter()
        if path.exists():
            x_syn, y_syn = tk.distill.load_distilled(path)
        else:
            x_syn, y_syn = tk.distill.distribution_matching(
                train, ipc=ipc, iterations=args.dm_iterations, lr=1.0, batch_real=64, seed=seed, out=path,
                embed=tk.distill.default_embedding(train.tensors[0], width=64))
        distill_seconds[name] = time.perf_counter() - t0
        syn = TensorDataset(x_syn, y_syn)
        # about args.syn_steps SGD steps of batch 50 per IMP round on the distilled set
        epochs = max(1, round(args.syn_steps / math.ceil(len(syn) / 50)))
        found[name] = tk.prune.imp(make_model(seed), tk.prune.classification_train_fn(syn, epochs, seeds["A"],
                                                                                     batch_size=50),
                                   rounds=args.rounds, rate=args.rate, rewind="init",
                                   out_dir=work / f"seed{seed}/ipc{ipc}")
        points[name] = len(syn)
        bar.update(1)
    find_seconds = time.perf_counter() - start

    rows = {name: [] for name in METHODS}
    dense = None
    curves = {}
    for name in METHODS:
        result = found[name]
        for r, mask in enumerate(result.masks):
            if r == 0 and dense is not None:  # the dense level is shared: same init, no mask
                rows[name].append(dict(dense, points=points[name]))
                continue
            start_state = result.rewound(r)
            a = found["real"].trained(r) if name == "real" else train_copy(model, start_state, mask, train,
                                                                           args.epochs, seeds["A"])
            b = train_copy(model, start_state, mask, train, args.epochs, seeds["B"])
            line = tk.connectivity.interpolate(model, a, b, eval_data, steps=args.steps, bn="recompute",
                                               masks=mask, bn_data=bn_data)
            row = dict(round=r, sparsity=result.sparsity[r], acc_a=state_accuracy(model, a, test),
                       acc_b=state_accuracy(model, b, test), error_barrier=line.error_barrier,
                       loss_barrier=line.loss_barrier, curve=line.to_dict(), points=points[name])
            rows[name].append(row)
            if r == 0:
                dense = {k: v for k, v in row.items() if k != "points"}
            if seed == 0 and r == args.plane_round:
                curves[name] = (line, start_state, mask, a, b)
            bar.update(1)

    planes = {}
    if seed == 0 and args.plane_round <= args.rounds:
        for name, (line, start_state, mask, a, b) in curves.items():
            c = train_copy(model, start_state, mask, train, args.epochs, seeds["C"])
            planes[name] = tk.connectivity.plane(model, [a, b, c], eval_data, grid=(args.grid, args.grid),
                                                 bn="recompute", masks=mask, bn_data=bn_data,
                                                 labels=["copy A", "copy B", "copy C"])
            bar.update(1)
    return dict(seed=seed, rows=rows, find_seconds=find_seconds, distill_seconds=distill_seconds,
                planes=planes, lines={k: v[0] for k, v in curves.items()})


def summarize(runs: list[dict]) -> dict:
    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    summary = {}
    for name in METHODS:
        levels = []
        for r in range(len(runs[0]["rows"][name])):
            rows = [run["rows"][name][r] for run in runs]
            acc, acc_std = stats([row["acc_a"] for row in rows])
            barrier, barrier_std = stats([row["error_barrier"] for row in rows])
            loss_barrier, _ = stats([row["loss_barrier"] for row in rows])
            levels.append(dict(round=r, sparsity=rows[0]["sparsity"], acc=acc, acc_std=acc_std,
                               error_barrier=barrier, error_barrier_std=barrier_std, loss_barrier=loss_barrier,
                               points=rows[0]["points"]))
        summary[name] = levels
    return summary


def format_table(summary: dict, n_seeds: int) -> str:
    pm = "±" if n_seeds > 1 else ""
    lines = ["| mask found with | sparsity (%) | test accuracy (%) | error barrier (points) | loss barrier | "
             "training points used to find the mask |", "|---|---|---|---|---|---|"]
    for name, levels in summary.items():
        for s in levels:
            acc = f"{100 * s['acc']:.2f}" + (f" {pm} {100 * s['acc_std']:.2f}" if pm else "")
            bar = f"{100 * s['error_barrier']:.2f}" + (f" {pm} {100 * s['error_barrier_std']:.2f}" if pm else "")
            points = "-" if s["round"] == 0 else f"{s['points']:,}"
            label = "dense (no mask)" if s["round"] == 0 else name
            if s["round"] == 0 and name != METHODS[0]:
                continue  # one dense row: it is the same measurement for every method
            lines.append(f"| {label} | {100 * s['sparsity']:.1f} | {acc} | {bar} | {s['loss_barrier']:.4f} | {points} |")
    return "\n".join(lines)


def plot(summary: dict, n_seeds: int, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"real": "tab:blue", "distilled ipc 10": "tab:orange", "distilled ipc 50": "tab:green"}
    for name, levels in summary.items():
        s = [100 * lv["sparsity"] for lv in levels]
        for ax, key in zip(axes, ("acc", "error_barrier")):
            mean = [100 * lv[key] for lv in levels]
            std = [100 * lv[f"{key}_std"] for lv in levels]
            ax.errorbar(s, mean, yerr=std, marker="o", capsize=3, color=colors[name],
                        label=f"IMP on {name} data" if name == "real" else f"IMP on {name}")
    axes[0].set_ylabel("test accuracy of the retrained sparse net (%)")
    axes[1].set_ylabel("test-error barrier between two data orders (points)")
    axes[1].axhline(0, color="0.7", lw=1)
    for ax in axes:
        ax.set_xlabel("sparsity (%)")
        ax.legend(fontsize=8)
    fig.suptitle(f"MNIST-1D, 1-D CNN, IMP rewound to init, retrained on real data ({n_seeds} seeds, mean ± std)")
    fig.tight_layout()
    save_figure(fig, path)


# ---- the fair protocol: calibration ------------------------------------------------------------

CAL_SIZES = {
    "full": dict(widths=[32, 64], lrs=[0.05, 0.2, 0.5], shifts=[0, 4], epochs=15, batch=64, weight_decay=5e-4,
                 momentum=0.9, imp_rounds=4, rate=0.2, imp_settings=2, steps=11, seed=0, train_size=3500),
    "tiny": dict(widths=[8], lrs=[0.1], shifts=[0, 2], epochs=1, batch=128, weight_decay=5e-4, momentum=0.9,
                 imp_rounds=1, rate=0.2, imp_settings=1, steps=3, seed=0, train_size=256),
}
UNSTABLE = 0.02  # an error barrier of 2 points


def train_augmented(model: nn.Module, data: TensorDataset, epochs: int, lr: float, seed: int, shift: int,
                    batch: int, weight_decay: float, momentum: float) -> None:
    """SGD with momentum, a per-step cosine schedule, data order `seed`, and each batch's
    signals rolled by a random shift in -shift..shift (none at 0)."""
    from twa_kernels.demo import random_shift

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    x, y = data.tensors
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            xb = random_shift(x[idx], shift, gen) if shift else x[idx]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), y[idx]).backward()
            opt.step()
            sched.step()


def _train_fn(setting: dict, cfg: dict, data: TensorDataset, seed: int):
    def train_fn(model: nn.Module, round: int) -> None:
        train_augmented(model, data, cfg["epochs"], setting["lr"], seed, setting["shift"], cfg["batch"],
                        cfg["weight_decay"], cfg["momentum"])
    return train_fn


def _copy(model: nn.Module, start: dict, mask: dict, train_fn) -> dict:
    model.load_state_dict(start)
    with tk.prune.apply_masks(model, mask if mask and tk.prune.sparsity(mask) > 0 else {}):
        train_fn(model, 0)
    return clone(model)


def _barrier(model: nn.Module, a: dict, b: dict, mask: dict | None, val: TensorDataset, train: TensorDataset,
             steps: int) -> dict:
    line = tk.connectivity.interpolate(model, a, b, batches(val, 1000), steps=steps, bn="recompute",
                                       masks=mask or None, bn_data=batches(train, 500, limit=2000))
    return dict(error_barrier=line.error_barrier, loss_barrier=line.loss_barrier,
                acc_a=state_accuracy(model, a, val), acc_b=state_accuracy(model, b, val))


def calibration_point(kind: str, setting: dict, cfg: dict) -> dict:
    """kind "dense": two copies from one initialisation, data orders A and B; kind "imp": real
    IMP (tk.prune.imp, rewound to init) for imp_rounds rounds at `rate`, its last ticket trained
    with order A (IMP's own round) and B. Barriers on the validation split."""
    torch.set_num_threads(1)
    train, val, _ = mnist1d_cached(cfg["seed"], cfg["train_size"], 500, 5000)  # the demo's split sizes
    seed = cfg["seed"]
    model = make_model(seed, setting["width"])
    init = clone(model)
    fa, fb = (_train_fn(setting, cfg, train, 100 * seed + s) for s in (SEED_A, SEED_B))
    t0 = time.perf_counter()
    if kind == "dense":
        a, b = _copy(model, init, {}, fa), _copy(model, init, {}, fb)
        row = _barrier(model, a, b, None, val, train, cfg["steps"])
        sparsity = 0.0
    else:
        with tempfile.TemporaryDirectory() as work:
            result = tk.prune.imp(make_model(seed, setting["width"]), fa, rounds=cfg["imp_rounds"], rate=cfg["rate"],
                                  rewind="init", out_dir=work)
            r = cfg["imp_rounds"]
            mask = result.masks[r]
            a = result.trained(r)
            b = _copy(model, result.rewound(r), mask, fb)
            row = _barrier(model, a, b, mask, val, train, cfg["steps"])
            sparsity = result.sparsity[r]
    return dict(kind=kind, **setting, sparsity=sparsity, seconds=time.perf_counter() - t0, **row)


def _star_point(job):
    return calibration_point(*job)


def _map(jobs: list[tuple], workers: int) -> list[dict]:
    if workers <= 1:
        return [_star_point(j) for j in tqdm(jobs, desc="calibration", leave=False)]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return list(tqdm(pool.imap(_star_point, jobs), total=len(jobs), desc="calibration", leave=False))


def calibrate(cfg: dict, workers: int) -> dict:
    """The dense barrier at every (width, lr, shift); then real IMP's ticket barrier at the
    imp_settings settings with the largest dense barriers among those >= UNSTABLE."""
    settings = [dict(width=w, lr=lr, shift=sh) for w in cfg["widths"] for lr in cfg["lrs"] for sh in cfg["shifts"]]
    dense = _map([("dense", st, cfg) for st in settings], workers)
    unstable = sorted((r for r in dense if r["error_barrier"] >= UNSTABLE), key=lambda r: -r["error_barrier"])
    picked = [dict(width=r["width"], lr=r["lr"], shift=r["shift"]) for r in unstable[:cfg["imp_settings"]]]
    imp_rows = _map([("imp", st, cfg) for st in picked], workers) if picked else []
    found = [r for r in imp_rows if r["error_barrier"] >= UNSTABLE]
    return dict(dense=dense, imp=imp_rows, found=[dict(width=r["width"], lr=r["lr"], shift=r["shift"]) for r in found])


def calibration_plot(cal: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    labels = [f"w{r['width']} lr{r['lr']:g} s{r['shift']}" for r in cal["dense"]]
    ax.bar(range(len(labels)), [100 * r["error_barrier"] for r in cal["dense"]], color="tab:gray", label="dense")
    for r in cal["imp"]:
        i = next(j for j, d in enumerate(cal["dense"]) if (d["width"], d["lr"], d["shift"]) ==
                 (r["width"], r["lr"], r["shift"]))
        ax.scatter([i], [100 * r["error_barrier"]], color="tab:red", zorder=3,
                   label=f"real IMP ticket at init ({100 * r['sparsity']:.0f}% sparse)")
    ax.axhline(100 * UNSTABLE, color="0.5", ls=":", lw=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("validation error barrier (points)")
    ax.set_title("Calibration: instability of two data orders from one initialisation")
    handles, names = ax.get_legend_handles_labels()
    ax.legend(dict(zip(names, handles)).values(), dict(zip(names, handles)).keys(), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ---- the fair protocol: stability of sparse networks at the calibrated setting -----------------

FULL_SIZES = {
    # distillation and distilled-data training are cut to fit 30 minutes on 2 cores: 1,000
    # matching iterations and 500 steps per IMP round (the paper's scale is 5-20k and ~2,000)
    "full": dict(seeds=[0, 1, 2], rounds=10, rate=0.2, measure=[0, 4, 9], ipcs=[10, 50], dm_iterations=1000,
                 dm_batch_real=64, syn_steps=500, syn_batch=256, steps=11),
    "tiny": dict(seeds=[0, 1], rounds=2, rate=0.2, measure=[0, 1], ipcs=[2], dm_iterations=5, dm_batch_real=16,
                 syn_steps=5, syn_batch=32, steps=3),
}
SEED_COPY = (11, 12)  # data-order seeds of the two copies (fresh: IMP's own round used SEED_A)


class _ShiftEmbedding(nn.Module):
    """A distillation embedding that first rolls each input by a random shift (augmentation
    inside the matching, seeded when the network is drawn)."""

    def __init__(self, inner: nn.Module, shift: int):
        super().__init__()
        self.inner, self.shift = inner, shift
        self.gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31 - 1, ())))

    def forward(self, x):
        from twa_kernels.demo import random_shift

        return self.inner(random_shift(x, self.shift, self.gen) if self.shift else x)


def _weights_only_start(result, round_: int, init: dict, prunable: set[str]) -> dict:
    """The start of round `round_` when only the Linear/Conv weights are rewound (masked
    initial values) and everything else (BatchNorm parameters and statistics, biases) keeps
    the previous round's trained values."""
    if round_ == 0:
        return dict(init)
    prev, start = result.trained(round_ - 1), result.rewound(round_)
    return {k: (start[k] if k in prunable else prev[k]) for k in start}


def full_job(method: str, seed: int, setting: dict, cal: dict, full: dict, work: str) -> dict:
    """One seed and one mask source ("real" or "ipc N"): IMP, then at each measured round two
    copies trained on the real data from the rewound start (both rewinding treatments), and
    their error and loss barriers on the test split."""
    torch.set_num_threads(1)
    train, _, test = mnist1d_cached(seed, cal["train_size"], 500, 5000)
    model = make_model(seed, setting["width"])
    init = clone(model)
    prunable = {f"{n}.weight" for n in tk.prune.prunable_weights(model)}
    out = dict(method=method, seed=seed)
    t0 = time.perf_counter()
    if method == "real":
        fn = _train_fn(setting, cal, train, 100 * seed + SEED_A)
        data_points = len(train)
    else:
        ipc = int(method.split()[1])
        x_syn, y_syn = tk.distill.distribution_matching(
            train, ipc=ipc, iterations=full["dm_iterations"], batch_real=full["dm_batch_real"], seed=seed,
            embed=lambda: _ShiftEmbedding(tk.distill.default_embedding(train.tensors[0], width=64)(), setting["shift"]))
        syn = TensorDataset(x_syn, y_syn)
        batch = min(full["syn_batch"], len(syn))
        epochs = max(1, round(full["syn_steps"] / math.ceil(len(syn) / batch)))
        syn_cal = dict(cal, epochs=epochs, batch=batch)
        fn = _train_fn(setting, syn_cal, syn, 100 * seed + SEED_A)
        dense = make_model(seed, setting["width"])
        fn(dense, 0)  # the distilled set's own check: a dense net trained on it alone
        out["dense_on_distilled_test_acc"] = accuracy(dense, test)
        out["distill_seconds"] = time.perf_counter() - t0
        data_points = len(syn)
    result = tk.prune.imp(make_model(seed, setting["width"]), fn, rounds=full["rounds"] - 1, rate=full["rate"],
                          rewind="init", out_dir=Path(work) / f"seed{seed}-{method.replace(' ', '')}")
    copy_a, copy_b = (_train_fn(setting, cal, train, 100 * seed + s) for s in SEED_COPY)
    eval_data, bn_data = batches(test, 1000), batches(train, 500, limit=2000)
    rows = []
    for r in full["measure"]:
        if method != "real" and r == 0:
            continue  # the dense level: same initialisation, no mask; measured once, under "real"
        mask = result.masks[r]
        for treatment in ("whole state", "weights only"):
            if r == 0 and treatment == "weights only":  # at round 0 both treatments start from the init
                rows.append(dict(rows[-1], rewind=treatment))
                continue
            start = result.rewound(r) if treatment == "whole state" else _weights_only_start(result, r, init, prunable)
            a, b = _copy(model, start, mask, copy_a), _copy(model, start, mask, copy_b)
            line = tk.connectivity.interpolate(model, a, b, eval_data, steps=full["steps"], bn="recompute",
                                               masks=mask if r else None, bn_data=bn_data)
            rows.append(dict(round=r, sparsity=result.sparsity[r], rewind=treatment,
                             acc_a=state_accuracy(model, a, test), acc_b=state_accuracy(model, b, test),
                             error_barrier=line.error_barrier, loss_barrier=line.loss_barrier))
    return dict(out, rows=rows, points=data_points, seconds=time.perf_counter() - t0)


def _star_full(job):
    return full_job(*job)


def run_full(setting: dict, cal: dict, full: dict, workers: int, work: str) -> list[dict]:
    methods = ["real"] + [f"ipc {i}" for i in full["ipcs"]]
    jobs = [(m, s, setting, cal, full, work) for s in full["seeds"] for m in methods]
    if workers <= 1:
        return [_star_full(j) for j in tqdm(jobs, desc="lmc", leave=False)]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return list(tqdm(pool.imap(_star_full, jobs), total=len(jobs), desc="lmc", leave=False))


def full_tables(results: list[dict], full: dict) -> dict:
    """Per method, round and rewinding treatment: accuracy and barriers (mean, 95% CI over
    seeds), and per distilled method the paired (by seed) barrier difference against real IMP."""
    from experiments.common import mean_ci

    dense = {(res["seed"], row["rewind"]): row for res in results if res["method"] == "real" for row in res["rows"]
             if row["round"] == 0}
    table, diffs = {}, {}
    for method in sorted({r["method"] for r in results}):
        for r in full["measure"]:
            for treatment in ("whole state", "weights only"):
                rows = {res["seed"]: row for res in results if res["method"] == method for row in res["rows"]
                        if row["round"] == r and row["rewind"] == treatment}
                if r == 0:
                    rows = {s: row for (s, t), row in dense.items() if t == treatment}
                if not rows:
                    continue
                key = f"{method} | round {r} | {treatment}"
                table[key] = dict(sparsity=next(iter(rows.values()))["sparsity"],
                                  acc=mean_ci([x["acc_a"] for x in rows.values()]),
                                  error_barrier=mean_ci([x["error_barrier"] for x in rows.values()]),
                                  loss_barrier=mean_ci([x["loss_barrier"] for x in rows.values()]))
                if method != "real" and r > 0:
                    real = {res["seed"]: row for res in results if res["method"] == "real" for row in res["rows"]
                            if row["round"] == r and row["rewind"] == treatment}
                    seeds = sorted(set(real) & set(rows))
                    if len(seeds) >= 2:
                        diffs[key + " minus real"] = mean_ci([rows[s]["error_barrier"] - real[s]["error_barrier"]
                                                              for s in seeds])
                        d0 = [rows[s]["error_barrier"] - dense[(s, treatment)]["error_barrier"] for s in seeds
                              if (s, treatment) in dense]
                        if len(d0) >= 2:
                            diffs[key + " minus dense"] = mean_ci(d0)
    return dict(table=table, paired_error_barrier=diffs)


def full_verdict(tables: dict) -> str:
    """The paper's claim is stability: a distilled-data mask whose copies are linearly
    connected (an error barrier below UNSTABLE) where real IMP's tickets are not. holds: at
    some measured sparsity, a distilled-data mask's barrier interval lies below UNSTABLE and
    real IMP's above it, under both rewinding treatments; partly: so under one of them; does
    not hold: under neither. Less unstable than real IMP's while still unstable (a paired
    interval below zero, barriers far above UNSTABLE) is reported beside the verdict, not as
    the claim."""
    t = tables["table"]

    def ci(key: str) -> list[float] | None:
        return (t.get(key) or {}).get("error_barrier", {}).get("ci95")

    stable_where_real_is_not = set()
    for key in t:
        method, rnd, treatment = key.split(" | ")
        if method == "real" or rnd == "round 0":
            continue
        mine, real = ci(key), ci(f"real | {rnd} | {treatment}")
        if mine and real and mine[1] < UNSTABLE and real[0] > UNSTABLE:
            stable_where_real_is_not.add(treatment)
    return {2: "holds", 1: "partly"}.get(len(stable_where_real_is_not), "does not hold")


def full_summary_line(tables: dict) -> str:
    """The paired error-barrier differences of full_tables, one clause each."""
    parts = [f"{k}: {100 * v['mean']:+.2f} [{100 * v['ci95'][0]:+.2f}, {100 * v['ci95'][1]:+.2f}] points"
             for k, v in tables["paired_error_barrier"].items()]
    return "Error-barrier differences (95% t-intervals over seeds): " + "; ".join(parts)


def resummarize(out: Path) -> dict:
    """Tables, verdict and summary of `out`/fair.json recomputed from its per-seed results
    under today's rule; the run's own stamp is kept as run_stamp."""
    import json

    report = json.loads((out / "fair.json").read_text())
    if "results" not in report:
        raise SystemExit(f"{out / 'fair.json'} holds no stability runs (calibration only): nothing to resummarize")
    report.setdefault("run_stamp", report.pop("stamp", None))
    tables = full_tables(report["results"], dict(measure=report["protocol"]["measured_rounds"]))
    report.update(tables=tables, verdict=full_verdict(tables), summary=full_summary_line(tables))
    write_report(out / "fair.json", report)
    print(f"verdict: {report['verdict']}\n{report['summary']}")
    return report


def fair_main(argv: list[str] | None = None) -> dict:
    p = parser("Sparse-network stability on distilled data: calibration first (see experiments/lmc_sparse.py).",
               "lmc_sparse")
    p.add_argument("--size", choices=sorted(CAL_SIZES), default="full")
    p.add_argument("--jobs", type=int, default=2, help="worker processes of one thread each")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds of the stability runs (default: the size's, 3 for full); about 5 minutes each on "
                        "2 cores")
    p.add_argument("--reuse-calibration", action="store_true",
                   help="take the calibration from the existing fair.json instead of running it again")
    p.add_argument("--calibration-only", action="store_true",
                   help="stop after the calibration (then --reuse-calibration runs the rest)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "twa-lmc-fair"),
                   help="IMP rounds (resumable)")
    p.add_argument("--resummarize", action="store_true",
                   help="recompute the tables, verdict and summary of an existing fair.json from its runs")
    args = p.parse_args(argv)
    if args.resummarize:
        return resummarize(args.out)
    cfg, full = CAL_SIZES[args.size], FULL_SIZES[args.size]
    if args.seeds is not None:
        if args.seeds < 2:
            p.error("--seeds must be at least 2: the verdict needs intervals over seeds")
        full = dict(full, seeds=list(range(args.seeds)))
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    if args.reuse_calibration:
        import json

        cal = json.loads((args.out / "fair.json").read_text())["calibration"]
    else:
        cal = calibrate(cfg, args.jobs)
    protocol = dict(
        size=args.size,
        dataset=f"MNIST-1D ({cfg['train_size']} train / 500 validation / 1000 test; calibration barriers on the "
                "validation split, the stability runs' on the test split)",
        model="twa_kernels.demo.make_model (3 conv layers with BatchNorm) at each width",
        training=f"SGD momentum {cfg['momentum']}, weight decay {cfg['weight_decay']}, cosine per step, "
                 f"{cfg['epochs']} epochs, batch {cfg['batch']}; augmentation: random circular shift of up to "
                 "`shift` samples",
        calibration=dict(grid=dict(widths=cfg["widths"], lrs=cfg["lrs"], shifts=cfg["shifts"]),
                         unstable_if=f"error barrier >= {100 * UNSTABLE:g} points",
                         imp=dict(rounds=cfg["imp_rounds"], rate=cfg["rate"], rewind="init (whole state)",
                                  settings=f"the {cfg['imp_settings']} settings with the largest dense barrier "
                                           ">= 2 points"), seed=cfg["seed"]),
        barrier=f"tk.connectivity.interpolate, {cfg['steps']} points, BatchNorm recomputed on 2000 training signals",
        processes=args.jobs, threads_per_process=1)
    report = dict(protocol=protocol, calibration=cal)
    if cal["found"] and args.calibration_only:
        report.update(seeds=[cfg["seed"]], verdict=None, summary=f"calibration only; settings found: {cal['found']}")
    elif not cal["found"]:
        best_d = max(cal["dense"], key=lambda r: r["error_barrier"])
        report.update(seeds=[cfg["seed"]], verdict="not testable at this scale", summary=(
            f"No setting in the calibration sweep makes both barriers >= 2 points: the largest dense barrier is "
            f"{100 * best_d['error_barrier']:.2f} points (width {best_d['width']}, lr {best_d['lr']:g}, shift "
            f"{best_d['shift']})" + ("" if not cal["imp"] else "; real-IMP ticket barriers at init " + ", ".join(
                f"{100 * r['error_barrier']:.2f}" for r in cal["imp"]) + " points") +
            " (one seed per setting: the sweep decides only whether the claim can be tested here)."))
    else:
        found = {(f["width"], f["lr"], f["shift"]) for f in cal["found"]}
        setting = max((r for r in cal["imp"] if (r["width"], r["lr"], r["shift"]) in found),
                      key=lambda r: r["error_barrier"])
        setting = dict(width=setting["width"], lr=setting["lr"], shift=setting["shift"])
        results = run_full(setting, cfg, full, args.jobs, args.work)
        tables = full_tables(results, full)
        verdict = full_verdict(tables)
        protocol.update(stage="calibration, then the stability runs", setting=setting, rounds=full["rounds"],
                        prune_fraction=full["rate"], measured_rounds=full["measure"],
                        distillation=f"distribution matching (tk.distill), {full['dm_iterations']} iterations, "
                                     f"shift augmentation inside the embedding, ipc {full['ipcs']}",
                        distilled_training=f"about {full['syn_steps']} SGD steps per IMP round, batch "
                                           f"{full['syn_batch']}, shift augmentation",
                        copies=f"two fresh data-order seeds {list(SEED_COPY)}, trained on the real data",
                        rewinding=["whole state (tk.prune.imp)", "weights only (Linear/Conv weights rewound; "
                                   "BatchNorm and biases keep the previous round's values)"],
                        setting_rule="among the calibrated settings where both barriers are >= 2 points, the one "
                                     "with the largest real-IMP barrier",
                        deviations=["MNIST-1D, a 1-D CNN and distribution matching instead of CIFAR-10, ResNets and "
                                    "IDC gradient matching",
                                    f"{full['dm_iterations']} distribution-matching iterations and {full['syn_steps']} "
                                    "steps per distilled IMP round (the 30-minute budget on 2 cores)",
                                    "no Hessian-diagonal figure"])
        report.update(seeds=full["seeds"], results=results, tables=tables, verdict=verdict,
                      summary=full_summary_line(tables))
    report["total_seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out / "fair.json", report)
    calibration_plot(cal, args.out / "fair.png")
    print(f"verdict: {report['verdict']}\n{report['summary']}\n{report['total_seconds']:.0f} s; "
          f"wrote {args.out / 'fair.json'}")
    return report


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    stamp()  # the run's provenance, as it starts (experiments.common.stamp)
    if argv and argv[0] == "fair":
        return fair_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="pruning rounds after the dense round 0")
    parser.add_argument("--rate", type=float, default=0.4, help="fraction of the remaining weights pruned per round")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each training on the real data")
    parser.add_argument("--syn-steps", type=int, default=300, help="SGD steps of each IMP round on distilled data")
    parser.add_argument("--dm-iterations", type=int, default=300, help="distribution-matching iterations")
    parser.add_argument("--steps", type=int, default=11, help="points on each interpolation line")
    parser.add_argument("--plane-round", type=int, default=4, help="the IMP round whose loss planes are drawn")
    parser.add_argument("--grid", type=int, default=13, help="plane grid points per side")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the model and batches are tiny: one thread is about as fast, and "
                             "does not fight other jobs for cores)")
    parser.add_argument("--out", default=str(RESULTS / "lmc_sparse"))
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "twa-lmc-sparse"),
                        help="IMP rounds and distilled sets (resumable)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, short training: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.rounds, args.epochs, args.dm_iterations, args.syn_steps = 1, 2, 3, 30, 60
        args.plane_round, args.grid, args.steps = 2, 5, 5
        args.work += "-quick"
        args.out = str(Path(args.work) / "results")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    per_seed = 3 + 3 * args.rounds + 1 + (3 if args.plane_round <= args.rounds else 0)
    with tqdm(total=args.seeds * per_seed - (3 if args.plane_round <= args.rounds else 0) * (args.seeds - 1),
              desc="lmc_sparse", unit="step") as bar:
        runs = [run_seed(seed, args, work, bar) for seed in range(args.seeds)]
    summary = summarize(runs)
    seconds = time.perf_counter() - start

    first = runs[0]
    for name, result in first["planes"].items():
        slug = name.replace("distilled ipc ", "ipc")
        tk.connectivity.plot_plane(result, out / f"plane_{slug}.png", value="loss",
                                   title=f"test loss, IMP on {name}{' data' if name == 'real' else ''}, "
                                         f"sparsity {100 * first['rows'][name][args.plane_round]['sparsity']:.0f}%")
    if first["lines"]:
        tk.connectivity.plot_interpolation(first["lines"], out / "interpolation.png",
                                           title=f"seed 0, round {args.plane_round}: copy A to copy B")
    plot(summary, args.seeds, out / "lmc_sparse.png")
    table = format_table(summary, args.seeds)
    report = dict(
        claim="IMP on distilled data finds masks more stable to SGD noise than the dense net or real-data IMP "
              "(McDermott & Cummings, arXiv 2310.18769)",
        dataset="MNIST-1D (3500 train / 1000 test)", model="twa_kernels.demo.make_model (1-D CNN, BatchNorm)",
        config={k: v for k, v in vars(args).items() if k not in ("out", "work")},
        rewind="init", bn="recompute (update_bn on 2000 training signals at every point)",
        summary=summary,
        runs=[dict(seed=r["seed"], rows=r["rows"], find_seconds=r["find_seconds"],
                   distill_seconds=r["distill_seconds"]) for r in runs],
        planes={name: p.to_dict() for name, p in first["planes"].items()},
        total_seconds=seconds, table=table,
    )
    write_report(out / "results.json", report)
    print(table)
    print(f"\n{args.seeds} seeds, {seconds:.0f} s; results in {out}/")
    return report


if __name__ == "__main__":
    main()
