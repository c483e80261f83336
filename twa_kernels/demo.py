"""`twa demo`: TWA against full training, SWA and greedy soup on a real data set.

MNIST-1D (Greydanus 2020), generated on the spot by the mnist1d package: 4,000 training
and 1,000 test signals of length 40 in ten classes; nothing is downloaded. For each seed a
small network trains with SGD for the full schedule, saving a checkpoint every epoch.
Then, using only the checkpoints of the first 60% of the epochs (the head stage of the
paper): SWA averages them; TWA-t trains their averaging coefficients on the training set,
TWA-v on the held-out validation set, both on a 4-bit basis; greedy soup adds them by
validation accuracy. Test accuracy and loss, the epochs each method used, and wall time
go to a table, results.json and accuracy.png; plane.png shows the test loss over the plane
through three head-stage checkpoints of the first seed, with SWA, TWA-v and the final SGD
model placed on it. SWA and TWA-v are saved beside the checkpoints (swa.safetensors,
twa_v.safetensors) for `twa connect` and `twa plane`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from twa_kernels.averaging import greedy_soup, uniform_average
from twa_kernels.io import load_state_dict, save_state_dict
from twa_kernels.twa import TWA

logger = logging.getLogger(__name__)

HEAD_FRACTION = 0.6
LR_COEFFICIENTS = 0.02


def mnist1d(seed: int) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train, validation, test) of MNIST-1D, generated locally (no download): 4,000 training
    signals split 3,500 / 500 by `seed`, and the 1,000 test signals."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())  # deterministic: the generator seeds itself
    x = torch.tensor(data["x"], dtype=torch.float32)[:, None]
    y = torch.tensor(data["y"], dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    test = TensorDataset(torch.tensor(data["x_test"], dtype=torch.float32)[:, None],
                         torch.tensor(data["y_test"], dtype=torch.int64))
    return TensorDataset(x[:3500], y[:3500]), TensorDataset(x[3500:], y[3500:]), test


def make_model(seed: int = 0) -> nn.Module:
    """A small 1-D CNN (about 26k weights) with BatchNorm."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(1, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Conv1d(32, 32, 5, padding=2, stride=2), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Conv1d(32, 32, 5, padding=2, stride=2), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 10, 10),
    )


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode."""
    model.eval()
    x, y = dataset.tensors
    logits = model(x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def _loader(dataset, seed: int, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=64, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def _fit_coefficients(twa: TWA, dataset, epochs: int, seed: int) -> None:
    opt = torch.optim.AdamW(twa.parameters(), lr=LR_COEFFICIENTS, weight_decay=0.0)
    for _ in range(epochs):
        twa.train()
        for x, y in _loader(dataset, seed):
            opt.zero_grad()
            F.cross_entropy(twa(x), y).backward()
            opt.step()


def train_sgd(model: nn.Module, train, epochs: int, seed: int, ckpt_dir: Path, lr: float = 0.05,
              schedule: str = "cosine", test=None, progress: bool = False, noise: float = 0.0):
    """SGD with momentum, a checkpoint per epoch. Returns (paths, seconds per epoch, test
    accuracy per epoch). schedule "cosine" anneals to zero, "constant" keeps lr."""
    from tqdm import tqdm

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs) if schedule == "cosine" else None
    paths, seconds, curve = [], [], []
    for epoch in tqdm(range(1, epochs + 1), desc=f"seed {seed}: SGD", unit="epoch", disable=not progress,
                      leave=False):
        start = time.perf_counter()
        model.train()
        for x, y in _loader(train, seed + epoch):
            if noise:
                x = x + noise * torch.randn_like(x)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if sched is not None:
            sched.step()
        seconds.append(time.perf_counter() - start)
        paths.append(save_state_dict(model.state_dict(), ckpt_dir / f"epoch_{epoch:03d}.safetensors"))
        if test is not None:
            curve.append(evaluate(model, test)[0])
    return paths, seconds, curve


def fit_twa(seed: int, checkpoints, data, train, epochs: int) -> TWA:
    """TWA on a 4-bit basis over `checkpoints`, coefficients trained on `data`, BN updated on `train`."""
    twa = TWA(make_model(seed), checkpoints, bits=4, granularity="tensor")
    _fit_coefficients(twa, data, epochs, seed)
    twa.update_bn(_loader(train, seed, shuffle=False))
    return twa


def greedy_soup_with_bn(probe: nn.Module, checkpoints: list, train: TensorDataset, val: TensorDataset,
                        seed: int) -> tuple[nn.Module, list[int]]:
    """Greedy soup by validation accuracy, in `probe`: every candidate is scored, and the soup
    returned, with its own BatchNorm statistics recomputed on `train`, as SWA and TWA are
    measured (not with the mean of the checkpoints' statistics)."""

    def with_bn(state) -> nn.Module:
        probe.load_state_dict(state)
        torch.optim.swa_utils.update_bn(_loader(train, seed, shuffle=False), probe)
        return probe

    soup, chosen = greedy_soup(checkpoints, lambda state: evaluate(with_bn(state), val)[0])
    return with_bn(soup), chosen


def run_seed(seed: int, epochs: int, twa_epochs: int, out_dir: Path, progress: bool) -> dict:
    train, val, test = mnist1d(seed)
    model = make_model(seed)
    paths, epoch_seconds, curve = train_sgd(model, train, epochs, seed, out_dir / f"seed{seed}", test=test,
                                            progress=progress)
    head = max(2, round(HEAD_FRACTION * epochs))
    head_paths, head_seconds = paths[:head], sum(epoch_seconds[:head])
    results = {"full training": dict(zip(("acc", "loss"), evaluate(model, test)), epochs=epochs,
                                     seconds=sum(epoch_seconds))}

    early = make_model(seed)  # what stopping SGD at the head epoch gives
    early.load_state_dict(load_state_dict(head_paths[-1]))
    results["SGD, stopped early"] = dict(zip(("acc", "loss"), evaluate(early, test)), epochs=head,
                                         seconds=head_seconds)

    start = time.perf_counter()
    swa = make_model(seed)
    swa.load_state_dict(uniform_average(head_paths))
    torch.optim.swa_utils.update_bn(_loader(train, seed, shuffle=False), swa)
    files = dict(head=[str(p) for p in head_paths], final=str(paths[-1]),
                 swa=str(save_state_dict(swa.state_dict(), out_dir / f"seed{seed}" / "swa.safetensors")))
    results["SWA"] = dict(zip(("acc", "loss"), evaluate(swa, test)), epochs=head,
                          seconds=head_seconds + time.perf_counter() - start)

    for name, data in (("TWA-t", train), ("TWA-v", val)):
        start = time.perf_counter()
        twa = fit_twa(seed, head_paths, data, train, twa_epochs)
        if name == "TWA-v":
            files["twa_v"] = str(save_state_dict(twa.averaged_state_dict(), out_dir / f"seed{seed}" / "twa_v.safetensors"))
        results[name] = dict(zip(("acc", "loss"), evaluate(twa, test)), epochs=head + twa_epochs,
                             seconds=head_seconds + time.perf_counter() - start)

    start = time.perf_counter()
    probe, chosen = greedy_soup_with_bn(make_model(seed), head_paths, train, val, seed)
    results["greedy soup"] = dict(zip(("acc", "loss"), evaluate(probe, test)), epochs=head,
                                  seconds=head_seconds + time.perf_counter() - start, ingredients=len(chosen))
    return dict(seed=seed, head_epochs=head, curve=curve, methods=results, files=files)


def summarize(runs: list[dict]) -> dict[str, dict[str, float]]:
    summary = {}
    for method in runs[0]["methods"]:
        rows = [r["methods"][method] for r in runs]
        acc = torch.tensor([r["acc"] for r in rows])
        summary[method] = dict(
            acc_mean=float(acc.mean()), acc_std=float(acc.std()) if len(rows) > 1 else 0.0,
            loss_mean=sum(r["loss"] for r in rows) / len(rows), epochs=rows[0]["epochs"],
            seconds_mean=sum(r["seconds"] for r in rows) / len(rows),
        )
    return summary


def format_table(summary: dict, n_seeds: int) -> str:
    lines = [f"{'method':<19} {'test acc (%)':>16} {'test loss':>10} {'epochs':>7} {'wall (s)':>9}"]
    for method, s in summary.items():
        acc = f"{100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f}" if n_seeds > 1 else f"{100 * s['acc_mean']:.2f}"
        lines.append(f"{method:<19} {acc:>16} {s['loss_mean']:>10.4f} {s['epochs']:>7} {s['seconds_mean']:>9.2f}")
    return "\n".join(lines)


def plot(runs: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = len(runs[0]["curve"])
    curve = torch.tensor([r["curve"] for r in runs]).mean(0) * 100
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(range(1, epochs + 1), curve, color="0.3", label="SGD, full schedule")
    markers = {"SGD, stopped early": ("o", "0.3"), "SWA": ("s", "tab:orange"), "TWA-t": ("*", "tab:blue"), "TWA-v": ("*", "tab:green"),
               "greedy soup": ("D", "tab:purple")}
    for method, (marker, color) in markers.items():
        s = summary[method]
        ax.scatter([s["epochs"]], [100 * s["acc_mean"]], marker=marker, s=140 if marker == "*" else 60, color=color,
                   label=f"{method} ({s['epochs']} epochs)", zorder=3)
    ax.axhline(100 * summary["full training"]["acc_mean"], color="0.6", ls="--", lw=1, label="full training, final")
    ax.axvline(runs[0]["head_epochs"], color="0.8", ls=":", lw=1)
    ax.set_xlabel("epochs of training used")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MNIST-1D: averaging the first {runs[0]['head_epochs']} of {epochs} epochs' checkpoints "
                 f"({len(runs)} seeds)")
    low = min(100 * s["acc_mean"] for s in summary.values())
    ax.set_ylim(max(0.0, low - 4), min(100.0, float(curve.max()) + 2))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plane_figure(run: dict, path: Path, grid: int = 21, progress: bool = False) -> dict:
    """The test loss over the plane through three checkpoints of the head stage (a third,
    two thirds and all of the way through it), with SWA, TWA-v and the final SGD model
    placed on it (projected, with their distance from the plane). Returns the placements."""
    from twa_kernels.connectivity import plane, plot_plane

    seed, head = run["seed"], run["files"]["head"]
    picks = [head[max(0, round(len(head) * f) - 1)] for f in (1 / 3, 2 / 3, 1)]
    train, _, test = mnist1d(seed)
    points = {"SWA": run["files"]["swa"], "TWA-v": run["files"]["twa_v"], "SGD, final": run["files"]["final"]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 26k-weight CNN: more intra-op threads only add contention (10x slower on 2 busy cores)
    try:
        result = plane(make_model(seed), picks, [test.tensors], grid=grid, points=points,
                       labels=[f"epoch {Path(p).stem.split('_')[-1].lstrip('0')}" for p in picks],
                       bn_data=DataLoader(train, batch_size=500), progress=progress)
    finally:
        torch.set_num_threads(threads)
    plot_plane(result, path, title=f"MNIST-1D test loss over the plane through three head-stage checkpoints "
                                   f"(seed {seed}; BatchNorm recomputed at every point)")
    return dict(grid=grid, points={k: p._asdict() for k, p in result.points.items()})


def seed0_model() -> nn.Module:
    """The demo's model for seed 0, for `twa connect/plane --config` on the demo's checkpoints."""
    return make_model(0)


def seed0_train_loader() -> DataLoader:
    """Seed 0's 3,500 training signals in batches of 500 (BatchNorm statistics are recomputed on these)."""
    return DataLoader(mnist1d(0)[0], batch_size=500)


def seed0_test_loader() -> DataLoader:
    """The 1,000 test signals of MNIST-1D."""
    return DataLoader(mnist1d(0)[2], batch_size=500)


def run_demo(out_dir: str | Path = "twa-demo", quick: bool = False, seeds: int | None = None,
             progress: bool = True) -> dict:
    """Run the demo and write results.json, accuracy.png and plane.png into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_seeds = seeds if seeds is not None else (1 if quick else 5)
    epochs, twa_epochs = (15, 2) if quick else (30, 3)
    start = time.perf_counter()
    runs = [run_seed(seed, epochs, twa_epochs, out, progress) for seed in range(n_seeds)]
    summary = summarize(runs)
    report = dict(dataset="MNIST-1D (3500 train / 500 validation / 1000 test)", seeds=n_seeds,
                  epochs=epochs, head_epochs=runs[0]["head_epochs"], twa_epochs=twa_epochs, bits=4,
                  summary=summary, runs=runs)
    plot(runs, summary, out / "accuracy.png")
    report["plane"] = plane_figure(runs[0], out / "plane.png", grid=11 if quick else 21, progress=progress)
    report["total_seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(report, indent=1))
    report["table"] = format_table(summary, n_seeds)
    return report


__all__ = ["run_demo"]
