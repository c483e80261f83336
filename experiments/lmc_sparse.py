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

Writes results/lmc_sparse/results.json, lmc_sparse.png (accuracy and barrier against
sparsity), plane_*.png and interpolation.png, and prints the table. IMP's per-round files go
to --work (default: a folder in the temp dir; resumable: a killed run picks up where it
stopped). --quick writes everything under the work folder, nothing in results/.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

import twa_kernels as tk
from experiments.common import accuracy, pyplot, save_figure, write_report
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


def main(argv: list[str] | None = None) -> dict:
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
    parser.add_argument("--out", default="results/lmc_sparse")
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
