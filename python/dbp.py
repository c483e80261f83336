"""Decorrelated backpropagation (DBP) against plain backpropagation (BP) on MNIST-1D.

    python python/dbp.py [--seeds 3] [--epochs 20] [--out results/dbp] [--quick]

The DBP paper (Dalm et al., arXiv 2405.02385) reports that decorrelating every layer's input
trains CNNs to a target accuracy in fewer epochs and less wall-clock than BP. This script
checks that claim at CPU scale on MNIST-1D (generated locally): the demo's BatchNorm 1-D CNN
(twa_kernels.demo.make_model) and a 3-layer MLP, each trained with Adam by BP and by DBP
(tk.decor; the same optimizer, the same batches), over a small sweep of learning rates:
Adam's lr for both, and DBP's decorrelation lr. The configuration of each method is picked
by mean final validation accuracy; the table reports its test accuracy over the seeds.

Reported per model and method: epochs and wall-clock (training only, no evaluation) until the
mean test accuracy over the seeds first reaches a target (98% of the lower of the two
methods' best mean test accuracy, so both can reach it), the final test accuracy, and the
median time of one training step (forward, backward, optimizer step, and for DBP the R
update), measured with BP and DBP steps alternating so that both see the same load. One
thread: the models are tiny and the machine is shared; timings are medians and the
comparison is the ratio inside this run. Writes results.json and accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import twa_kernels as tk
from twa_kernels.demo import make_model, mnist1d

BATCH = 64
KAPPA = 0.5
SAMPLE_FRACTION = 0.1
ADAM_LRS = [1e-3, 3e-3]
DECOR_LRS = [1e-4, 1e-3]  # a first sweep over [1e-3, 1e-2] picked 1e-3 everywhere
OVERHEAD_STEPS = 300
TARGET_FRACTION = 0.98


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


MODELS = {"cnn": make_model, "mlp": make_mlp}


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    x, y = data.tensors
    return float((model(x).argmax(1) == y).float().mean())


def train_run(model_name: str, method: str, lr: float, decor_lr: float | None, seed: int, epochs: int,
              data) -> dict:
    """One training run; per epoch the cumulative training seconds and accuracies."""
    train, val, test = data
    model = MODELS[model_name](seed)
    if method == "dbp":
        tk.decor.decorrelate(model, lr=decor_lr, kappa=KAPPA, sample_fraction=SAMPLE_FRACTION)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # DBP's subsample draws from the global generator
    x_all, y_all = train.tensors
    seconds, steps, curve = 0.0, [], []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            xb, yb = x_all[idx], y_all[idx]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            if method == "dbp":
                decor_loss = tk.decor.update(model)
            dt = time.perf_counter() - t0
            seconds += dt
            steps.append(dt)
        curve.append(dict(seconds=seconds, val=accuracy(model, val), test=accuracy(model, test)))
    out = dict(model=model_name, method=method, lr=lr, decor_lr=decor_lr, seed=seed, curve=curve,
               step_ms_median=1e3 * statistics.median(steps))
    if method == "dbp":
        out["decor_loss_last"] = float(decor_loss)
        folded = tk.decor.fold(model)  # inference model: must score exactly like the decorrelated one
        out["folded_test"] = accuracy(folded, test)
    return out


def interleaved_step_ms(model_name: str, lr: float, decor_lr: float, train, steps: int) -> tuple[float, float]:
    """Median ms of one BP step and one DBP step (forward, backward, Adam, and for DBP the R
    update), alternating on the same batches so both see the same machine load."""
    models = {"bp": MODELS[model_name](0), "dbp": MODELS[model_name](0)}
    tk.decor.decorrelate(models["dbp"], lr=decor_lr, kappa=KAPPA, sample_fraction=SAMPLE_FRACTION)
    opts = {k: torch.optim.Adam(m.parameters(), lr=lr) for k, m in models.items()}
    x_all, y_all = train.tensors
    times: dict[str, list[float]] = {"bp": [], "dbp": []}
    for step in range(steps + 10):
        idx = torch.randint(0, len(x_all), (BATCH,), generator=torch.Generator().manual_seed(step))
        for k in ("bp", "dbp") if step % 2 else ("dbp", "bp"):
            models[k].train()
            t0 = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            F.cross_entropy(models[k](x_all[idx]), y_all[idx]).backward()
            opts[k].step()
            if k == "dbp":
                tk.decor.update(models[k])
            if step >= 10:  # warm-up
                times[k].append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times["bp"]), 1e3 * statistics.median(times["dbp"])


def configs() -> list[tuple[str, float, float | None]]:
    return [("bp", lr, None) for lr in ADAM_LRS] + [("dbp", lr, d) for lr in ADAM_LRS for d in DECOR_LRS]


def _mean_curve(runs: list[dict], key: str) -> list[float]:
    return [statistics.mean(r["curve"][e][key] for r in runs) for e in range(len(runs[0]["curve"]))]


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for model_name in MODELS:
        chosen = {}
        for method in ("bp", "dbp"):
            groups = {}
            for r in runs:
                if r["model"] == model_name and r["method"] == method:
                    groups.setdefault((r["lr"], r["decor_lr"]), []).append(r)
            # pick by final validation accuracy, mean over seeds (the test set is not used to tune)
            key = max(groups, key=lambda k: _mean_curve(groups[k], "val")[-1])
            chosen[method] = (key, groups[key])
        target = TARGET_FRACTION * min(max(_mean_curve(g, "test")) for _, g in chosen.values())
        rows = {}
        for method, ((lr, decor_lr), group) in chosen.items():
            test = _mean_curve(group, "test")
            secs = _mean_curve(group, "seconds")
            hit = next((e for e, a in enumerate(test) if a >= target), None)
            finals = [r["curve"][-1]["test"] for r in group]
            rows[method] = dict(
                lr=lr, decor_lr=decor_lr, target=target,
                epochs_to_target=None if hit is None else hit + 1,
                seconds_to_target=None if hit is None else secs[hit],
                final_test_mean=statistics.mean(finals),
                final_test_std=statistics.stdev(finals) if len(finals) > 1 else 0.0,
                best_test_mean=max(test),
                step_ms_median=statistics.median(r["step_ms_median"] for r in group),
                curve_test=test, curve_seconds=secs,
            )
        rows["dbp"]["step_overhead"] = rows["dbp"]["step_ms_median"] / rows["bp"]["step_ms_median"]
        summary[model_name] = rows
    return summary


def format_table(summary: dict, seeds: int) -> str:
    head = (f"{'model':<5} {'method':<6} {'Adam lr':>8} {'decor lr':>9} {'target':>7} {'epochs':>7} {'seconds':>8} "
            f"{'final test acc (%)':>19} {'step (ms)':>14}")
    lines = [head]
    for model_name, rows in summary.items():
        for method, s in rows.items():
            ep = "-" if s["epochs_to_target"] is None else str(s["epochs_to_target"])
            sec = "-" if s["seconds_to_target"] is None else f"{s['seconds_to_target']:.1f}"
            acc = f"{100 * s['final_test_mean']:.1f} ± {100 * s['final_test_std']:.1f}"
            step = f"{s['step_ms_interleaved']:.2f}"
            if method == "dbp":
                step += f" (x{s['step_overhead_interleaved']:.2f})"
            lines.append(f"{model_name:<5} {method.upper():<6} {s['lr']:>8g} {s['decor_lr'] or '-':>9} "
                         f"{100 * s['target']:>6.1f}% {ep:>7} {sec:>8} {acc:>19} {step:>14}")
    return "\n".join(lines) + (f"\n(mean ± std over {seeds} seeds; epochs/seconds: mean test curve first >= target; "
                                "step: median, BP and DBP steps alternating)")


def plot(runs: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(11, 4.2))
    colors = {"bp": "tab:gray", "dbp": "tab:blue"}
    for ax, (model_name, rows) in zip(axes, summary.items()):
        for method, s in rows.items():
            for r in runs:
                if (r["model"], r["method"], r["lr"], r["decor_lr"]) == (model_name, method, s["lr"], s["decor_lr"]):
                    ax.plot([c["seconds"] for c in r["curve"]], [100 * c["test"] for c in r["curve"]],
                            color=colors[method], alpha=0.25, lw=0.8)
            label = f"{method.upper()} (Adam lr {s['lr']:g}"
            label += f", decor lr {s['decor_lr']:g})" if s["decor_lr"] else ")"
            ax.plot(s["curve_seconds"], [100 * a for a in s["curve_test"]], color=colors[method], lw=2, label=label)
        ax.axhline(100 * rows["bp"]["target"], color="0.6", ls="--", lw=1, label="target")
        ax.set_xlabel("training wall-clock (s, 1 thread)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"MNIST-1D, {model_name.upper()}: DBP vs BP")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="results/dbp")
    parser.add_argument("--overhead-steps", type=int, default=OVERHEAD_STEPS,
                        help="steps of each method, alternating, for the per-step overhead")
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 3
    torch.set_num_threads(1)
    start = time.perf_counter()
    data_by_seed = {s: mnist1d(s) for s in range(args.seeds)}
    # seed-major, configurations interleaved: a change in the shared machine's load hits BP
    # and DBP runs alike
    jobs = [(m, *c, s) for m in MODELS for s in range(args.seeds) for c in configs()]
    runs = [train_run(m, method, lr, d, s, args.epochs, data_by_seed[s])
            for m, method, lr, d, s in tqdm(jobs, desc="runs")]
    summary = summarize(runs)
    for model_name, rows in summary.items():
        bp_ms, dbp_ms = interleaved_step_ms(model_name, rows["dbp"]["lr"], rows["dbp"]["decor_lr"],
                                            data_by_seed[0][0], args.overhead_steps)
        rows["bp"]["step_ms_interleaved"], rows["dbp"]["step_ms_interleaved"] = bp_ms, dbp_ms
        rows["dbp"]["step_overhead_interleaved"] = dbp_ms / bp_ms
    table = format_table(summary, args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(dataset="MNIST-1D (3500 train / 500 validation / 1000 test)", seeds=args.seeds,
                  epochs=args.epochs, batch=BATCH, kappa=KAPPA, sample_fraction=SAMPLE_FRACTION,
                  adam_lrs=ADAM_LRS, decor_lrs=DECOR_LRS, target_fraction=TARGET_FRACTION, threads=1,
                  torch=torch.__version__, summary=summary, runs=runs, table=table,
                  total_seconds=time.perf_counter() - start)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "results.json")
    plot(runs, summary, out / "accuracy.png")
    print(table)
    print(f"total {report['total_seconds']:.0f} s; wrote {out / 'results.json'} and {out / 'accuracy.png'}")
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
