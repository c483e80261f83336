"""Decorrelated backpropagation (DBP) against plain backpropagation (BP) on MNIST-1D.

    python -m experiments.dbp [sweep] [--seeds 3] [--epochs 20] [--out results/dbp] [--quick]
    python -m experiments.dbp fair [--jobs 2] [--out results/dbp]      # fair.json, fair.png

`sweep` (the default) is the first comparison, described below; `fair` is the protocol
described at `fair_protocol` (a larger MNIST-1D, full grids tuned per method, covariance
from at least twice each layer's input width, 5 seeds).

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

import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import twa_kernels as tk
from experiments.common import accuracy, make_mlp, parser, pyplot, save_figure, stamp, write_report
from twa_kernels.demo import make_model, mnist1d

BATCH = 64
KAPPA = 0.5
SAMPLE_FRACTION = 0.1
ADAM_LRS = [1e-3, 3e-3]
DECOR_LRS = [1e-4, 1e-3]  # a first sweep over [1e-3, 1e-2] picked 1e-3 everywhere
OVERHEAD_STEPS = 300
TARGET_FRACTION = 0.98


MODELS = {"cnn": make_model, "mlp": make_mlp}


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
    plt = pyplot()
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
    save_figure(fig, path)


# ---- the fair protocol ------------------------------------------------------------------------
#
# MNIST-1D drawn at 12,500 signals (9,000 train / 1,000 validation / 2,500 test), the BN CNN
# and the MLP, 20 epochs of Adam at batch 256. Every decorrelated layer estimates its input
# covariance from at least ROWS_FACTOR x d rows per R update: a convolution samples that many
# patch positions of its batch, a Linear layer takes the whole batch, and where one batch has
# fewer than 2d rows the update runs every k steps over the k batches' rows (k the same for all
# layers of the model). Grids: Adam lr for BP and DBP separately; for DBP also the
# decorrelation lr and kappa. Selection on one seed (0) by validation: BP by its peak
# validation accuracy, DBP by the epochs it needs to reach that peak (then by its own peak).
# The chosen configurations then run on 5 fresh seeds (1-5), same data, same batch orders.

ROWS_FACTOR = 2
FAIR_SIZES = {
    "full": dict(num_samples=12500, train=9000, val=1000, epochs=20, select_epochs=20, batch=256,
                 adam_lrs=[1e-3, 3e-3, 1e-2], decor_lrs=[3e-4, 1e-3, 3e-3, 1e-2], kappas=[0.01, 0.5],
                 seeds=[1, 2, 3, 4, 5], overhead_cycles=60, projection=dict(batch=256, size=224)),
    "tiny": dict(num_samples=5000, train=512, val=200, epochs=2, select_epochs=2, batch=64,
                 adam_lrs=[3e-3], decor_lrs=[1e-3], kappas=[0.01], seeds=[1, 2], overhead_cycles=3,
                 projection=dict(batch=8, size=32)),
}
SELECT_SEED = 0


def _fair_data(cfg: dict):
    from experiments.common import mnist1d as mnist1d_sized

    return mnist1d_sized(0, cfg["train"], cfg["val"], cfg["num_samples"])


def covariance_plan(model: nn.Module, x: Tensor, rows_factor: int = ROWS_FACTOR, full_batch_linear: bool = True
                    ) -> tuple[dict[str, dict], int]:
    """Per Linear/Conv layer of `model` (plain, not yet decorrelated) for a batch `x`: its input
    width d, the rows one batch offers (batch x output positions), the sample fraction that
    gives rows_factor x d of them (Linear layers: the whole batch), and the number k of steps
    whose rows one R update needs to reach rows_factor x d in every layer."""
    shapes: dict[str, torch.Size] = {}
    layers = {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d)}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: shapes.__setitem__(n, out.shape))
             for n, m in layers.items()]
    was_training = model.training
    with torch.no_grad():
        model.eval()(x)
    model.train(was_training)
    for h in hooks:
        h.remove()
    plan, every = {}, 1
    for name, m in layers.items():
        d, cout = m.weight[0].numel(), m.weight.shape[0]
        positions = shapes[name].numel() // cout
        want = rows_factor * d
        if isinstance(m, nn.Linear) and full_batch_linear:
            fraction = 1.0
        else:
            fraction = min(1.0, (want + 0.25) / positions)  # rounds to `want` rows
        rows = positions if fraction >= 1.0 else max(1, round(fraction * positions))
        plan[name] = dict(d=d, positions=positions, fraction=fraction, rows_per_step=rows)
        every = max(every, math.ceil(want / rows))
    for row in plan.values():
        row["rows_per_update"] = row["rows_per_step"] * every
    return plan, every


def decorrelate_by_plan(model: nn.Module, plan: dict[str, dict], lr: float, kappa: float) -> nn.Module:
    """tk.decor.decorrelate, one layer at a time, each with its planned sample fraction."""
    for name, row in plan.items():
        tk.decor.decorrelate(model, lr=lr, kappa=kappa, sample_fraction=row["fraction"],
                             skip=lambda n, m, name=name: n != name)
    return model


def fair_run(model_name: str, method: str, lr: float, decor_lr: float | None, kappa: float | None, seed: int,
             epochs: int, cfg: dict) -> dict:
    """One run: per epoch the cumulative training seconds and the validation and test accuracy.
    A decorrelation that diverges ends the run (the remaining epochs score 0)."""
    train, val, test = _fair_data(cfg)
    batch = cfg["batch"]
    model = MODELS[model_name](seed)
    every, diverged = 1, None
    x_all, y_all = train.tensors
    if method == "dbp":
        plan, every = covariance_plan(model, x_all[:batch])
        decorrelate_by_plan(model, plan, decor_lr, kappa)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the covariance subsample draws from the global generator
    seconds, step, curve = 0.0, 0, []
    for _ in range(epochs):
        if diverged is None:
            model.train()
            order = torch.randperm(len(x_all), generator=gen)
            for i in range(0, len(order) - batch + 1, batch):  # whole batches only
                idx = order[i:i + batch]
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
                loss.backward()
                opt.step()
                step += 1
                if method == "dbp" and step % every == 0:
                    try:
                        tk.decor.update(model)
                    except tk.decor.DecorrelationDivergedError as err:
                        diverged = str(err).split(";")[0]
                        break
                seconds += time.perf_counter() - t0
                if not math.isfinite(loss.item()):
                    diverged = "non-finite loss"
                    break
        if diverged is None:
            curve.append(dict(seconds=seconds, val=accuracy(model, val), test=accuracy(model, test)))
        else:
            curve.append(dict(seconds=seconds, val=0.0, test=0.0))
    return dict(model=model_name, method=method, lr=lr, decor_lr=decor_lr, kappa=kappa, seed=seed,
                update_every=every, steps=step, diverged=diverged, curve=curve)


def _one_thread() -> None:
    torch.set_num_threads(1)


def _map(jobs: list[tuple], workers: int) -> list[dict]:
    if workers <= 1:
        return [fair_run(*job) for job in tqdm(jobs, desc="runs", leave=False)]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread) as pool:
        return list(tqdm(pool.imap(_star_run, jobs), total=len(jobs), desc="runs", leave=False))


def _star_run(job: tuple) -> dict:
    return fair_run(*job)


def seconds_to(curve: list[dict], epochs: int | None) -> float:
    """A run's training seconds to the end of epoch `epochs` (1-based); None (the target never
    reached): one epoch past the end, at the mean time of the epochs it trained (a run that
    diverged stops counting seconds there, so its later epochs would make its mean small)."""
    if epochs is not None:
        return curve[epochs - 1]["seconds"]
    trained = next((e + 1 for e in range(len(curve) - 1, 0, -1) if curve[e]["seconds"] > curve[e - 1]["seconds"]), 1)
    return curve[-1]["seconds"] / trained * (len(curve) + 1)


def epochs_to(curve: list[float], target: float) -> int | None:
    """The first epoch (1-based) whose value is >= target, or None."""
    return next((e + 1 for e, v in enumerate(curve) if v >= target - 1e-12), None)


def select(runs: list[dict]) -> dict:
    """Per model, from the selection seed's runs: BP's config by peak validation accuracy;
    DBP's by the epochs it takes to reach that peak, then by its own peak."""
    chosen = {}
    for model_name in MODELS:
        bp = [r for r in runs if r["model"] == model_name and r["method"] == "bp"]
        dbp = [r for r in runs if r["model"] == model_name and r["method"] == "dbp"]
        best_bp = max(bp, key=lambda r: max(c["val"] for c in r["curve"]))
        target = max(c["val"] for c in best_bp["curve"])

        def key(r):
            hit = epochs_to([c["val"] for c in r["curve"]], target)
            return (hit if hit is not None else math.inf, -max(c["val"] for c in r["curve"]))

        best_dbp = min(dbp, key=key)
        grid = [dict(method=r["method"], lr=r["lr"], decor_lr=r["decor_lr"], kappa=r["kappa"],
                     peak_val=max(c["val"] for c in r["curve"]), final_val=r["curve"][-1]["val"],
                     epochs_to_bp_peak=epochs_to([c["val"] for c in r["curve"]], target), diverged=r["diverged"])
                for r in bp + dbp]
        chosen[model_name] = dict(
            bp=dict(lr=best_bp["lr"]), dbp=dict(lr=best_dbp["lr"], decor_lr=best_dbp["decor_lr"],
                                                 kappa=best_dbp["kappa"]),
            bp_peak_val=target, grid=grid)
    return chosen


def measure_overhead(model_name: str, lr: float, decor_lr: float, kappa: float, cfg: dict, cycles: int
                     ) -> dict:
    """Milliseconds per training step of BP and DBP (forward, backward, Adam, and for DBP its
    share of the R update), timed over whole update cycles of k steps, BP and DBP cycles
    alternating on the same batches in one thread; medians over `cycles` cycles."""
    train, _, _ = _fair_data(cfg)
    batch = cfg["batch"]
    x_all, y_all = train.tensors
    models = {"bp": MODELS[model_name](0), "dbp": MODELS[model_name](0)}
    plan, every = covariance_plan(models["dbp"], x_all[:batch])
    decorrelate_by_plan(models["dbp"], plan, decor_lr, kappa)
    opts = {k: torch.optim.Adam(m.parameters(), lr=lr) for k, m in models.items()}
    times: dict[str, list[float]] = {"bp": [], "dbp": []}
    gen = torch.Generator().manual_seed(0)
    for cycle in range(cycles + 3):
        idx = [torch.randint(0, len(x_all), (batch,), generator=gen) for _ in range(every)]
        for k in ("bp", "dbp") if cycle % 2 else ("dbp", "bp"):
            models[k].train()
            t0 = time.perf_counter()
            for i in idx:
                opts[k].zero_grad(set_to_none=True)
                F.cross_entropy(models[k](x_all[i]), y_all[i]).backward()
                opts[k].step()
            if k == "dbp":
                tk.decor.update(models[k])
            if cycle >= 3:  # warm-up
                times[k].append((time.perf_counter() - t0) / every)
    bp_ms, dbp_ms = (1e3 * statistics.median(times[k]) for k in ("bp", "dbp"))
    return dict(bp_step_ms=bp_ms, dbp_step_ms=dbp_ms, ratio=dbp_ms / bp_ms, update_every=every, plan=plan,
                threads=torch.get_num_threads())


def resnet18_projection(batch: int = 256, size: int = 224) -> dict:
    """DBP's extra flops per training step on ResNet-18 (bench/resnet.py, 1000 classes) at
    `batch` x 3 x size x size, relative to BP's forward + backward (3x the forward's
    multiply-adds of the Linear/Conv layers), for two covariance rules: ROWS_FACTOR x d rows
    per update (Linear: the whole batch, accumulated over k steps) and 10% of each layer's rows
    every step. Extra flops per step: the fold A = W R and its gradient (4 C_out d^2), z = R x
    for the sampled rows (2 n d^2), S += Z^T Z where the rows of an update exceed d (2 n d^2),
    and the R update per k steps (2 d^3 from S, or 4 N d^2 + 2 N^2 d from N <= d rows)."""
    import importlib.util

    from experiments.common import ROOT

    spec = importlib.util.spec_from_file_location("_bench_resnet", ROOT / "bench" / "resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.device("meta"):  # shapes only: nothing is allocated or computed
        model = module.resnet18(1000)
        plan, _ = covariance_plan(model, torch.zeros(1, 3, size, size))
    out = {}
    for rule in (f"{ROWS_FACTOR}d rows", "10% of rows"):
        bp = extra = 0.0
        layers = []
        for name, row in plan.items():
            m = model.get_submodule(name)
            d, cout = row["d"], m.weight.shape[0]
            positions = row["positions"] * batch
            if rule == "10% of rows":
                k, n = 1, max(1, round(0.1 * positions))
            else:
                k = math.ceil(ROWS_FACTOR * d / batch) if isinstance(m, nn.Linear) else 1
                n = positions if isinstance(m, nn.Linear) else min(positions, ROWS_FACTOR * d)
            rows = n * k
            bp_l = 3 * 2 * positions * cout * d
            cov = 2 * n * d * d + (2 * n * d * d if rows > d else 0)
            upd = (2 * d ** 3 if rows > d else 4 * rows * d * d + 2 * rows * rows * d) / k
            ex = 4 * cout * d * d + cov + upd
            bp += bp_l
            extra += ex
            layers.append(dict(layer=name, d=d, c_out=cout, positions=positions, rows_per_step=n, update_every=k,
                               bp_flops=bp_l, extra_flops=ex))
        out[rule] = dict(bp_gflops=bp / 1e9, extra_gflops=extra / 1e9, overhead=extra / bp, layers=layers)
    return dict(batch=batch, size=size, rules=out)


def fair_summary(runs: list[dict], chosen: dict, seeds: list[int], overhead: dict) -> dict:
    from experiments.common import mean_ci

    out = {}
    for model_name in MODELS:
        by = {m: sorted((r for r in runs if r["model"] == model_name and r["method"] == m), key=lambda r: r["seed"])
              for m in ("bp", "dbp")}
        val = {m: [[c["val"] for c in r["curve"]] for r in by[m]] for m in by}
        mean_val = {m: [statistics.fmean(v[e] for v in val[m]) for e in range(len(val[m][0]))] for m in val}
        target = max(mean_val["bp"])
        per_seed = []
        for b, d in zip(by["bp"], by["dbp"]):
            bv, dv = [c["val"] for c in b["curve"]], [c["val"] for c in d["curve"]]
            peak = max(bv)
            per_seed.append(dict(seed=b["seed"], bp_peak_val=peak, bp_epochs=epochs_to(bv, peak),
                                 dbp_epochs=epochs_to(dv, peak), bp_final_test=b["curve"][-1]["test"],
                                 dbp_final_test=d["curve"][-1]["test"], bp_seconds=b["curve"][-1]["seconds"],
                                 dbp_seconds=d["curve"][-1]["seconds"], dbp_diverged=d["diverged"]))
        reached = [p for p in per_seed if p["dbp_epochs"] is not None]
        ratio = overhead[model_name]["ratio"]
        row = dict(
            chosen=chosen[model_name]["bp"] | {"dbp": chosen[model_name]["dbp"]},
            target_mean_curve=target,
            epochs_mean_curve=dict(bp=epochs_to(mean_val["bp"], target), dbp=epochs_to(mean_val["dbp"], target)),
            per_seed=per_seed,
            dbp_reached_bp_peak=f"{len(reached)}/{len(per_seed)}",
            final_test=dict(bp=mean_ci([p["bp_final_test"] for p in per_seed]),
                            dbp=mean_ci([p["dbp_final_test"] for p in per_seed]),
                            dbp_minus_bp=mean_ci([p["dbp_final_test"] - p["bp_final_test"] for p in per_seed])),
            mean_val_curve=mean_val,
            mean_test_curve={m: [statistics.fmean(r["curve"][e]["test"] for r in by[m])
                                 for e in range(len(by[m][0]["curve"]))] for m in by},
            step_overhead_measured=ratio,
        )
        # a seed where DBP never reaches BP's peak counts as reaching it one epoch after the end
        # (in BP's favour); how many were counted so is recorded
        horizon = len(by["bp"][0]["curve"]) + 1
        dbp_ep = [p["dbp_epochs"] if p["dbp_epochs"] is not None else horizon for p in per_seed]
        row["censored_seeds"] = len(per_seed) - len(reached)
        row["epochs_saved"] = mean_ci([p["bp_epochs"] - e for p, e in zip(per_seed, dbp_ep)])
        row["epoch_ratio"] = mean_ci([e / p["bp_epochs"] for p, e in zip(per_seed, dbp_ep)])
        # wall-clock to the target from each run's own training seconds (a miss: one epoch past
        # the end at that run's mean epoch time, as for the epochs), so that the interval
        # carries the timing's variation from run to run as well as the epochs'
        for p, b, d in zip(per_seed, by["bp"], by["dbp"]):
            p["bp_seconds_to_peak"] = seconds_to(b["curve"], p["bp_epochs"])
            p["dbp_seconds_to_peak"] = seconds_to(d["curve"], p["dbp_epochs"])
        row["wallclock_ratio"] = mean_ci([p["dbp_seconds_to_peak"] / p["bp_seconds_to_peak"] for p in per_seed])
        # secondary: the same from the step costs measured apart, taken as exact
        row["wallclock_ratio_projected"] = mean_ci([ratio * e / p["bp_epochs"] for p, e in zip(per_seed, dbp_ep)])
        # secondary: one target shared by all seeds (the peak of BP's mean validation curve), each
        # method's epochs to it per seed, censored the same way (defined after the primary)
        shared = {m: [epochs_to(v, target) or horizon for v in val[m]] for m in ("bp", "dbp")}
        row["secondary_shared_target"] = dict(
            target=target, bp_epochs=shared["bp"], dbp_epochs=shared["dbp"],
            censored=dict(bp=sum(epochs_to(v, target) is None for v in val["bp"]),
                          dbp=sum(epochs_to(v, target) is None for v in val["dbp"])),
            epochs_saved=mean_ci([b - d for b, d in zip(shared["bp"], shared["dbp"])]))
        out[model_name] = row
    return out


def fair_verdict(summary: dict, projection: dict) -> tuple[str, str]:
    """From the 95% intervals of each model's epochs saved (to BP's peak) and wall-clock ratio
    (DBP / BP, from the runs' own seconds). The claim is both, on every model:
    holds: every interval is on the claim's side (epochs saved > 0, ratio < 1);
    does not hold: some interval is on the other side (more epochs, or slower);
    partly: some are on the claim's side and none on the other;
    not shown: every interval includes no difference."""
    parts, shown, against = [], [], []
    for model_name, row in summary.items():
        es, wr = row.get("epochs_saved"), row.get("wallclock_ratio")
        for interval, better_above, no_difference in ((es, True, 0.0), (wr, False, 1.0)):
            ci = interval["ci95"] if interval else None
            shown.append(bool(ci) and (ci[0] > no_difference if better_above else ci[1] < no_difference))
            against.append(bool(ci) and (ci[1] < no_difference if better_above else ci[0] > no_difference))
        wp = row["wallclock_ratio_projected"]
        ft = row["final_test"]
        ep = (f"DBP reached BP's peak validation accuracy in {row['dbp_reached_bp_peak']} seeds; epochs to it "
              f"saved {es['mean']:.1f} [{es['ci95'][0]:.1f}, {es['ci95'][1]:.1f}] (BP {statistics.fmean(p['bp_epochs'] for p in row['per_seed']):.1f} "
              f"epochs on average); wall-clock ratio {wr['mean']:.2f} [{wr['ci95'][0]:.2f}, {wr['ci95'][1]:.2f}] "
              f"(projected from the step costs: {wp['mean']:.2f} [{wp['ci95'][0]:.2f}, {wp['ci95'][1]:.2f}])")
        d = ft["dbp_minus_bp"]
        sec = row["secondary_shared_target"]["epochs_saved"]
        ep += (f" (secondary, one shared target: {sec['mean']:.1f} [{sec['ci95'][0]:.1f}, {sec['ci95'][1]:.1f}] "
               "epochs saved)")
        parts.append(f"{model_name.upper()}: {ep}; final test accuracy BP {100 * ft['bp']['mean']:.2f}%, "
                     f"DBP {100 * ft['dbp']['mean']:.2f}%, difference {100 * d['mean']:+.2f} "
                     f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}] points")
    if all(shown):
        verdict = "holds"
    elif any(against):
        verdict = "does not hold"
    elif any(shown):
        verdict = "partly"
    else:
        verdict = "not shown"
    proj = projection["rules"][f"{ROWS_FACTOR}d rows"]["overhead"]
    summary_line = ("; ".join(parts) + f" (95% t-intervals over {len(next(iter(summary.values()))['per_seed'])} "
                    f"seeds). FLOP-projected step overhead at ResNet-18, {projection['size']}x{projection['size']}, "
                    f"batch {projection['batch']}: +{100 * proj:.1f}% "
                    f"({ROWS_FACTOR}d rows), +{100 * projection['rules']['10% of rows']['overhead']:.1f}% (10% of rows).")
    return verdict, summary_line


def fair_plot(summary: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(summary), figsize=(11, 4.2))
    colors = {"bp": "tab:gray", "dbp": "tab:blue"}
    for ax, (model_name, row) in zip(axes, summary.items()):
        for m in ("bp", "dbp"):
            curve = row["mean_val_curve"][m]
            ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], color=colors[m], lw=2,
                    label=f"{m.upper()} (validation, mean of seeds)")
            ax.plot(range(1, len(curve) + 1), [100 * v for v in row["mean_test_curve"][m]], color=colors[m],
                    lw=1, ls="--", label=f"{m.upper()} (test)")
        ax.axhline(100 * row["target_mean_curve"], color="0.6", ls=":", lw=1, label="BP's peak (validation)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"MNIST-1D {model_name.upper()}: DBP vs BP, tuned separately")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def grid_edge_notes(chosen: dict, protocol: dict) -> list[str]:
    """A note for every chosen value that lies on the edge of its grid."""
    notes = []
    for model_name, c in chosen.items():
        for method, key, grid in (("bp", "lr", "adam_lrs"), ("dbp", "lr", "adam_lrs"), ("dbp", "decor_lr", "decor_lrs")):
            value = c[method][key]
            if value is not None and value in (min(protocol[grid]), max(protocol[grid])) and len(protocol[grid]) > 1:
                notes.append(f"{model_name} {method.upper()}: chosen {key} {value:g} is on the edge of its grid "
                             f"{protocol[grid]}")
    return notes


def resummarize(out: Path) -> dict:
    """Tables, verdict and summary of `out`/fair.json recomputed from the runs it stores."""
    import json

    report = json.loads((out / "fair.json").read_text())
    # the runs' own provenance stays; the new stamp says when the summary was recomputed
    report.setdefault("run_stamp", report.pop("stamp", None))
    chosen = {m: {k: v for k, v in c.items()} for m, c in report["selection"].items()}
    summary = fair_summary(report["runs"], chosen, report["seeds"], report["step_overhead"])
    verdict, line = fair_verdict(summary, report["resnet18_projection"])
    report.update(table=summary, verdict=verdict, summary=line,
                  notes=grid_edge_notes(report["selection"], report["protocol"]))
    write_report(out / "fair.json", report)
    fair_plot(summary, out / "fair.png")
    print(f"verdict: {verdict}\n{line}")
    return report


def fair_main(argv: list[str] | None = None) -> dict:
    p = parser("DBP against BP under the fair protocol (see experiments/dbp.py).", "dbp")
    p.add_argument("--size", choices=sorted(FAIR_SIZES), default="full")
    p.add_argument("--jobs", type=int, default=2, help="worker processes of one thread each")
    p.add_argument("--resummarize", action="store_true",
                   help="recompute the tables, verdict and summary of an existing fair.json from its runs")
    args = p.parse_args(argv)
    if args.resummarize:
        return resummarize(args.out)
    cfg = FAIR_SIZES[args.size]
    start = time.perf_counter()
    torch.set_num_threads(1)
    _fair_data(cfg)  # generate (and cache) once before the workers start
    grid = [(m, "bp", lr, None, None) for m in MODELS for lr in cfg["adam_lrs"]]
    grid += [(m, "dbp", lr, d, k) for m in MODELS for lr in cfg["adam_lrs"] for d in cfg["decor_lrs"]
             for k in cfg["kappas"]]
    selection = _map([(*g, SELECT_SEED, cfg["select_epochs"], cfg) for g in grid], args.jobs)
    chosen = select(selection)
    jobs = []
    for seed in cfg["seeds"]:
        for m in MODELS:
            c = chosen[m]
            jobs.append((m, "bp", c["bp"]["lr"], None, None, seed, cfg["epochs"], cfg))
            jobs.append((m, "dbp", c["dbp"]["lr"], c["dbp"]["decor_lr"], c["dbp"]["kappa"], seed, cfg["epochs"], cfg))
    runs = _map(jobs, args.jobs)
    overhead = {m: measure_overhead(m, chosen[m]["dbp"]["lr"], chosen[m]["dbp"]["decor_lr"], chosen[m]["dbp"]["kappa"],
                                    cfg, cfg["overhead_cycles"]) for m in MODELS}
    projection = resnet18_projection(**cfg["projection"])
    summary = fair_summary(runs, chosen, cfg["seeds"], overhead)
    verdict, line = fair_verdict(summary, projection)
    train, val, test = _fair_data(cfg)
    protocol = dict(
        size=args.size, dataset=f"MNIST-1D generated at {cfg['num_samples']} signals: {len(train)} train / "
                                f"{len(val)} validation / {len(test)} test", models=dict(
            cnn="twa_kernels.demo.make_model (1-D CNN with BatchNorm, width 32)", mlp="MLP 40-128-128-10"),
        optimizer="Adam", batch=cfg["batch"], epochs=cfg["epochs"], select_epochs=cfg["select_epochs"],
        adam_lrs=cfg["adam_lrs"], decor_lrs=cfg["decor_lrs"], kappas=cfg["kappas"],
        cov_rows=f">= {ROWS_FACTOR} x d per R update (conv: sampled patch positions; Linear: the whole batch, "
                 "accumulated over k steps when one batch is short)",
        cov_rows_factor=ROWS_FACTOR,
        cov_plan={m: dict(update_every=overhead[m]["update_every"], layers=overhead[m]["plan"]) for m in MODELS},
        selection=f"seed {SELECT_SEED}, validation: BP by peak accuracy; DBP by epochs to BP's peak, then peak",
        evaluation_seeds=cfg["seeds"], target="each seed's BP peak validation accuracy",
        confidence="95% Student-t intervals over seeds (paired by seed where a difference)",
        threads_per_process=1, processes=args.jobs,
        deviations=["MNIST-1D and two small models instead of the paper's CIFAR-10/ImageNet ResNets",
                    "wall-clock: each run's own training seconds on this CPU, one thread per run and "
                    f"{args.jobs} runs at a time; the step costs measured apart give the secondary projection",
                    "the ResNet-18 overhead is a flop count, not a measurement"])
    report = dict(protocol=protocol, seeds=cfg["seeds"], selection=chosen, table=summary,
                  step_overhead={m: {k: v for k, v in o.items() if k != "plan"} for m, o in overhead.items()},
                  resnet18_projection=projection, verdict=verdict, summary=line,
                  notes=grid_edge_notes(chosen, protocol),
                  runs=[{k: v for k, v in r.items()} for r in runs], total_seconds=time.perf_counter() - start)
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out / "fair.json", report)
    fair_plot(summary, args.out / "fair.png")
    print(f"verdict: {verdict}\n{line}\n{report['total_seconds']:.0f} s; wrote {args.out / 'fair.json'}")
    return report


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    stamp()  # the run's provenance, as it starts (experiments.common.stamp)
    if argv and argv[0] == "fair":
        return fair_main(argv[1:])
    if argv and argv[0] == "sweep":
        argv = argv[1:]
    parser_ = parser(__doc__, "dbp")
    parser_.add_argument("--seeds", type=int, default=3)
    parser_.add_argument("--epochs", type=int, default=20)
    parser_.add_argument("--overhead-steps", type=int, default=OVERHEAD_STEPS,
                        help="steps of each method, alternating, for the per-step overhead")
    parser_.add_argument("--quick", action="store_true", help="1 seed, 3 epochs: a smoke run")
    args = parser_.parse_args(argv)
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
    write_report(out / "results.json", report)
    plot(runs, summary, out / "accuracy.png")
    print(table)
    print(f"total {report['total_seconds']:.0f} s; wrote {out / 'results.json'} and {out / 'accuracy.png'}")
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
