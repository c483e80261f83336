"""`twa demo`: TWA against full training, SGD at the same budget, SWA and greedy soup on a real data set.

MNIST-1D (Greydanus 2020), generated on the spot by the mnist1d package (nothing is
downloaded): signals of length 40 in ten classes, 500 of the 4,000 training signals held out
for validation, the 1,000 test signals for testing. The setting (`DEMO`) was calibrated on
the validation split so that the head stage matters: a step schedule at a high learning
rate, where SGD stopped halfway is well short of full training. For each seed the network
trains with SGD for the full schedule, saving a checkpoint every epoch. Then, using only the
checkpoints of the first half of the epochs (the head stage of the paper): SWA averages
them; greedy soup adds them by validation accuracy; TWA-t trains their averaging
coefficients on the training set, TWA-v on the validation set, both on a 4-bit basis. Two
SGD baselines use the same epochs: SGD stopped at the head epoch, and SGD budgeted, a fresh
run whose schedule ends after the head epochs plus TWA's own (the same budget TWA uses).
Every model's BatchNorm statistics are recomputed on the training set before it is tested.
Test accuracy and loss, the epochs each method used, wall time, and (with two or more
seeds) the 95% interval of TWA-v's paired difference against each method go to a table,
results.json and accuracy.png; plane.png shows the test loss over the plane through three
head-stage checkpoints of the first seed, with SWA, TWA-v and the final SGD model placed on
it. SWA and TWA-v are saved beside the checkpoints for `twa connect` and `twa plane`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from twa_kernels._checks import integer, path_without_nul
from twa_kernels._outdir import OWNER, owner_alive, owner_tag, shown
from twa_kernels._imports import optional
from twa_kernels._progress import progress_bar
from twa_kernels._provenance import stamp
from twa_kernels.averaging import greedy_soup, uniform_average, update_bn
from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, OutputError
from twa_kernels.geometry import plane, plot_plane
from twa_kernels.io import (atomic_write, atomic_write_together, json_record, load_state_dict, save_state_dict,
                            write_json)
from twa_kernels.twa import TWA

logger = logging.getLogger(__name__)

LR_COEFFICIENTS = 0.02


@dataclass(frozen=True)
class Setting:
    """One training setup: data, network, SGD schedule, and what TWA gets."""

    train_size: int = 3500  # training signals (the validation split is always 500)
    width: int = 32  # channels of each convolution
    epochs: int = 40  # the full schedule
    lr: float = 0.05  # peak SGD learning rate
    schedule: str = "cosine"  # "cosine", "step" (lr / 10 at 50% and 75%) or "constant"
    shift: int = 0  # augmentation: random circular shift of up to this many positions
    head_fraction: float = 0.5  # TWA averages the checkpoints of this first part of the schedule
    twa_epochs: int = 3  # epochs of training TWA's coefficients

    def head_epochs(self, fraction: float | None = None) -> int:
        return max(2, round((self.head_fraction if fraction is None else fraction) * self.epochs))

    def describe(self) -> dict:
        return asdict(self)



# The demo's setting, calibrated on the validation split (experiments/claims.py calibrate,
# results/claims/calibration.json): the step schedule at a high learning rate leaves the
# head stage far from converged, so stopping there costs accuracy that averaging can win back.
DEMO = Setting(lr=0.2, schedule="step")

def mnist1d(seed: int, train_size: int = 3500) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train, validation, test) of MNIST-1D, generated locally (no download): the 4,000
    training signals in a `seed`-dependent order, the first `train_size` of them the training
    split and the last 500 the validation split; the 1,000 test signals are the test split."""
    optional("mnist1d.data", "demo", "the demo's MNIST-1D data")  # checked on every call: it names the extra
    if not 0 < train_size <= 3500:
        raise InvalidArgumentError(f"train_size must be in 1..3500 (the other 500 signals are the validation "
                                   f"split), got {train_size}")
    data = _mnist1d_signals()
    x = torch.tensor(data["x"], dtype=torch.float32)[:, None]
    y = torch.tensor(data["y"], dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    test = TensorDataset(torch.tensor(data["x_test"], dtype=torch.float32)[:, None],
                         torch.tensor(data["y_test"], dtype=torch.int64))
    # the validation split is the same whatever train_size is
    return TensorDataset(x[:train_size], y[:train_size]), TensorDataset(x[3500:], y[3500:]), test


@functools.lru_cache(maxsize=1)
def _mnist1d_signals() -> dict:
    """The generator's arrays, made once per process: the generator seeds itself, so every
    call would make the same signals, and making them takes seconds. Read-only, as they are shared."""
    generator = optional("mnist1d.data", "demo", "the demo's MNIST-1D data")
    data = generator.make_dataset(generator.get_dataset_args())
    for array in data.values():
        if hasattr(array, "flags"):
            array.flags.writeable = False
    return data


def make_model(seed: int = 0, width: int = 32) -> nn.Module:
    """A small 1-D CNN with BatchNorm (13,898 weights at width 32), initialised from torch's
    global RNG seeded with `seed`, which it leaves where those draws end: train_sgd's input
    noise draws on from there, so a run is repeatable from its seed alone."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(1, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Conv1d(width, width, 5, padding=2, stride=2), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Conv1d(width, width, 5, padding=2, stride=2), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Flatten(), nn.Linear(width * 10, 10),
    )


def batches(dataset: TensorDataset, batch_size: int, seed: int | None = None) -> DataLoader:
    """`dataset` in batches of `batch_size`, shuffled by `seed` (None: in order). The batches
    are those of `DataLoader(dataset, batch_size, shuffle=seed is not None, generator=...)`,
    in the same order, but each is one indexing of the dataset's tensors rather than a stack
    of single examples (which costs more than the small network's step)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    order = SequentialSampler(dataset) if seed is None else RandomSampler(dataset, generator=generator)
    # The loader draws a seed from its generator before the sampler's first draw, as a
    # shuffling DataLoader does: without it the order would differ from DataLoader's.
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None,
                      generator=generator)


def bn_loader(train: TensorDataset) -> DataLoader:
    """The training split in batches of 500, in order: BatchNorm statistics are recomputed on it."""
    return batches(train, 500)


def measure(seed: int, setting: Setting, state, train: TensorDataset, data: TensorDataset) -> tuple[float, float]:
    """(accuracy, loss) on `data` of the network with weights `state`, its BatchNorm
    statistics recomputed on `train` first: every method is measured this way, so an
    average's stale statistics never count against it and an SGD model's never for it."""
    model = make_model(seed, setting.width)
    model.load_state_dict(state)
    update_bn(bn_loader(train), model)
    return evaluate(model, data)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode."""
    model.eval()
    x, y = dataset.tensors
    logits = model(x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def _fit_coefficients(twa: TWA, dataset, epochs: int, seed: int, shift: int = 0) -> None:
    opt = torch.optim.AdamW(twa.parameters(), lr=LR_COEFFICIENTS, weight_decay=0.0)
    augment = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        twa.train()
        for x, y in batches(dataset, 64, seed + epoch):  # a new order each epoch, as SGD's epochs draw
            if shift:  # the same data pipeline as SGD's, as the paper trains its coefficients
                x = random_shift(x, shift, augment)
            opt.zero_grad()
            F.cross_entropy(twa(x), y).backward()
            opt.step()


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Each signal of x [n, c, length] rolled circularly by its own shift in
    -max_shift..max_shift (augmentation by random translation)."""
    length = x.shape[-1]
    shifts = torch.randint(-max_shift, max_shift + 1, (x.shape[0], 1, 1), generator=generator)
    index = (torch.arange(length).view(1, 1, -1) - shifts) % length
    return x.gather(-1, index.expand_as(x))


def _scheduler(opt: torch.optim.Optimizer, schedule: str, epochs: int):
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    if schedule == "step":  # divide by 10 at half and at three quarters of the schedule
        return torch.optim.lr_scheduler.MultiStepLR(opt, [round(epochs / 2), round(3 * epochs / 4)], 0.1)
    if schedule == "constant":
        return None
    raise InvalidArgumentError(f"schedule must be cosine, step or constant, got {schedule!r}")


def train_sgd(model: nn.Module, train, epochs: int, seed: int, ckpt_dir: Path, lr: float = 0.05,
              schedule: str = "cosine", test=None, progress: bool | None = None, noise: float = 0.0,
              shift: int = 0):
    """SGD with momentum, a checkpoint per epoch. Returns (paths, seconds per epoch, test
    accuracy per epoch). schedule "cosine" anneals to zero, "step" divides lr by 10 at 50%
    and 75% of `epochs`, "constant" keeps lr. `shift` > 0 rolls each training signal by a
    random shift of up to that many positions; `noise` adds Gaussian noise to the inputs."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = _scheduler(opt, schedule, epochs)
    augment = torch.Generator().manual_seed(seed)
    paths, seconds, curve = [], [], []
    for epoch in progress_bar(range(1, epochs + 1), enabled=progress, desc=f"seed {seed}: SGD", unit="epoch"):
        start = time.perf_counter()
        model.train()
        for x, y in batches(train, 64, seed + epoch):
            if shift:
                x = random_shift(x, shift, augment)
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


def fit_twa(seed: int, checkpoints, data, train, epochs: int, bits: int | None = 4, width: int = 32,
            shift: int = 0) -> TWA:
    """TWA over `checkpoints` on a `bits`-bit basis (None: float32), one coefficient per
    checkpoint and tensor, trained on `data`; BatchNorm statistics recomputed on `train`."""
    twa = TWA(make_model(seed, width), checkpoints, bits=bits, granularity="tensor")
    _fit_coefficients(twa, data, epochs, seed, shift)
    twa.update_bn(bn_loader(train))
    return twa


def _row(acc_loss: tuple[float, float], epochs: int, seconds: float, **extra) -> dict:
    return dict(acc=acc_loss[0], loss=acc_loss[1], epochs=epochs, seconds=seconds, **extra)


def greedy_soup_with_bn(probe: nn.Module, checkpoints: list, train: TensorDataset, val: TensorDataset,
                        seed: int) -> tuple[nn.Module, list[int]]:
    """Greedy soup by validation accuracy, in `probe`: every candidate is scored, and the soup
    returned, with its own BatchNorm statistics recomputed on `train` (as `measure` does),
    as SWA and TWA are measured (not with the mean of the checkpoints' statistics)."""

    def with_bn(state) -> nn.Module:
        probe.load_state_dict(state)
        update_bn(bn_loader(train), probe)
        return probe

    soup, chosen = greedy_soup(checkpoints, lambda state: evaluate(with_bn(state), val)[0])
    return with_bn(soup), chosen


def train_run(seed: int, setting: Setting, epochs: int, ckpt_dir: Path, progress: bool | None = None):
    """SGD from seed's initialisation under `setting`, its schedule `epochs` long. Returns
    (checkpoint paths, seconds per epoch)."""
    paths, seconds, _ = train_sgd(make_model(seed, setting.width), mnist1d(seed, setting.train_size)[0], epochs,
                                  seed, ckpt_dir, lr=setting.lr, schedule=setting.schedule, progress=progress,
                                  shift=setting.shift)
    return paths, seconds


def head_methods(seed: int, setting: Setting, paths: list[Path], epoch_seconds: list[float], head: int,
                 out_dir: Path, progress: bool | None = None, bits: int | None = 4) -> tuple[dict, dict]:
    """Every method that uses the first `head` epochs of the full run (`paths`): SGD
    stopped there, SGD with a schedule of head + TWA's epochs (the same budget as TWA), SWA,
    greedy soup, TWA-t and TWA-v. SWA and TWA-v are saved in out_dir (swa.safetensors,
    twa_v.safetensors), the budgeted run's checkpoints under it. Returns ({method: row},
    {name: saved file})."""
    train, val, test = mnist1d(seed, setting.train_size)
    head_paths, head_seconds = paths[:head], sum(epoch_seconds[:head])
    budget = head + setting.twa_epochs
    rows = {"SGD, stopped early": _row(measure(seed, setting, load_state_dict(head_paths[-1]), train, test), head,
                                       head_seconds)}
    budget_paths, budget_seconds = train_run(seed, setting, budget, out_dir / f"budget{budget}", progress)
    rows["SGD, budgeted"] = _row(measure(seed, setting, load_state_dict(budget_paths[-1]), train, test), budget,
                                 sum(budget_seconds))

    start = time.perf_counter()
    swa = uniform_average(head_paths)
    rows["SWA"] = _row(measure(seed, setting, swa, train, test), head, head_seconds + time.perf_counter() - start)
    files = dict(swa=save_state_dict(swa, out_dir / "swa.safetensors"))

    start = time.perf_counter()
    soup, chosen = greedy_soup_with_bn(make_model(seed, setting.width), head_paths, train, val, seed)
    rows["greedy soup"] = _row(evaluate(soup, test), head, head_seconds + time.perf_counter() - start,
                               ingredients=len(chosen))

    for name, data in (("TWA-t", train), ("TWA-v", val)):
        start = time.perf_counter()
        twa = fit_twa(seed, head_paths, data, train, setting.twa_epochs, bits, setting.width, setting.shift)
        rows[name] = _row(evaluate(twa, test), budget, head_seconds + time.perf_counter() - start)
        if name == "TWA-v":
            files["twa_v"] = save_state_dict(twa.averaged_state_dict(), out_dir / "twa_v.safetensors")
    return rows, files


def run_seed(seed: int, setting: Setting, out_dir: Path, progress: bool | None = None) -> dict:
    """The full run of one seed and every method at the setting's head fraction."""
    train, _, test = mnist1d(seed, setting.train_size)
    seed_dir = out_dir / f"seed{seed}"
    paths, epoch_seconds = train_run(seed, setting, setting.epochs, seed_dir, progress)
    # every epoch measured as the methods are (BatchNorm recomputed), for the figure
    measured = [measure(seed, setting, load_state_dict(p), train, test) for p in paths]
    curve = [acc for acc, _ in measured]
    head = setting.head_epochs()
    methods = {"full training": _row(measured[-1], setting.epochs, sum(epoch_seconds))}
    rows, files = head_methods(seed, setting, paths, epoch_seconds, head, seed_dir, progress)
    methods.update(rows)
    files = dict(head=[str(p) for p in paths[:head]], final=str(paths[-1]), **{k: str(v) for k, v in files.items()})
    return dict(seed=seed, head_epochs=head, curve=curve, methods=methods, files=files)


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (no scipy needed)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise InvalidArgumentError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # past 30, the Cornish-Fisher expansion around the normal quantile is good to 1e-4
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of a - b over paired seeds, its std, and the 95% t confidence interval of the
    mean (needs two or more pairs); `holds` when the interval excludes zero."""
    if len(a) != len(b) or len(a) < 2:
        raise InvalidArgumentError(f"need two or more paired values, got {len(a)} and {len(b)}")
    diffs = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    mean, std = float(diffs.mean()), float(diffs.std())
    half = t975(len(diffs) - 1) * std / len(diffs) ** 0.5
    return dict(mean=mean, std=std, ci95=[mean - half, mean + half], holds=bool(mean - half > 0 or mean + half < 0))


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per method: accuracy mean and std over seeds, mean loss, epochs, mean wall time; with
    two or more seeds also TWA-v's paired difference against it (accuracy, in points)."""
    summary = {}
    twa_v = [100 * r["methods"]["TWA-v"]["acc"] for r in runs]
    for method in runs[0]["methods"]:
        rows = [r["methods"][method] for r in runs]
        acc = torch.tensor([r["acc"] for r in rows])
        summary[method] = dict(
            acc_mean=float(acc.mean()), acc_std=float(acc.std()) if len(rows) > 1 else 0.0,
            loss_mean=sum(r["loss"] for r in rows) / len(rows), epochs=rows[0]["epochs"],
            seconds_mean=sum(r["seconds"] for r in rows) / len(rows),
        )
        if len(runs) > 1 and method != "TWA-v":
            summary[method]["twa_v_minus_this"] = paired_difference(twa_v, [100 * r["acc"] for r in rows])
    return summary


def format_table(summary: dict, n_seeds: int) -> str:
    paired = n_seeds > 1
    lines = [f"{'method':<19} {'test acc (%)':>16} {'test loss':>10} {'epochs':>7} {'wall (s)':>9}"
             + (f"   {'TWA-v minus this, 95% CI (points)':<36}" if paired else "")]
    for method, s in summary.items():
        acc = f"{100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f}" if paired else f"{100 * s['acc_mean']:.2f}"
        line = f"{method:<19} {acc:>16} {s['loss_mean']:>10.4f} {s['epochs']:>7} {s['seconds_mean']:>9.2f}"
        if paired and "twa_v_minus_this" in s:
            d = s["twa_v_minus_this"]
            line += f"   {d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
        lines.append(line)
    return "\n".join(lines)


MARKERS = {"SGD, stopped early": ("o", "0.3"), "SGD, budgeted": ("^", "tab:red"), "SWA": ("s", "tab:orange"),
           "greedy soup": ("D", "tab:purple"), "TWA-t": ("*", "tab:blue"), "TWA-v": ("*", "tab:green")}


def plot(runs: list[dict], summary: dict, path: Path) -> None:
    """Test accuracy against the epochs of SGD each method used: the full run's curve, and
    a point (mean ± std over seeds) per method; methods that used the same epochs are drawn
    slightly apart so that none hides another."""
    figure = optional("matplotlib.figure", "demo", "the demo's plot")
    epochs = len(runs[0]["curve"])
    curve = torch.tensor([r["curve"] for r in runs]).mean(0) * 100
    fig = figure.Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    ax.plot(range(1, epochs + 1), curve, color="0.3", label="SGD, full schedule (each epoch)")
    seen: dict[int, int] = {}
    for method, (marker, color) in MARKERS.items():
        s = summary[method]
        nudge = 0.25 * seen.get(s["epochs"], 0)
        seen[s["epochs"]] = seen.get(s["epochs"], 0) + 1
        ax.errorbar([s["epochs"] + nudge], [100 * s["acc_mean"]], yerr=[100 * s["acc_std"]], fmt=marker,
                    ms=12 if marker == "*" else 7, color=color, capsize=3, zorder=3,
                    label=f"{method} ({s['epochs']} epochs)")
    ax.axhline(100 * summary["full training"]["acc_mean"], color="0.6", ls="--", lw=1,
               label=f"full training ({epochs} epochs)")
    ax.axvline(runs[0]["head_epochs"], color="0.8", ls=":", lw=1)
    ax.set_xlabel("epochs of SGD used")
    ax.set_ylabel("test accuracy (%)")
    n = len(runs)
    ax.set_title(f"MNIST-1D: averaging the first {runs[0]['head_epochs']} of {epochs} epochs' checkpoints "
                 f"({n} seed{'s' if n != 1 else ''})")
    low = min(100 * s["acc_mean"] for s in summary.values())
    ax.set_ylim(max(0.0, low - 5), min(100.0, float(curve.max()) + 2))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png"))


def plane_figure(run: dict, setting: Setting, path: Path, grid: int = 21, progress: bool | None = None) -> dict:
    """The test loss over the plane through three checkpoints of the head stage (a third,
    two thirds and all of the way through it), with SWA, TWA-v and the final SGD model
    placed on it (projected, with their distance from the plane). Returns the placements."""
    seed, head = run["seed"], run["files"]["head"]
    picks = [head[max(0, round(len(head) * f) - 1)] for f in (1 / 3, 2 / 3, 1)]
    train, _, test = mnist1d(seed, setting.train_size)
    points = {"SWA": run["files"]["swa"], "TWA-v": run["files"]["twa_v"], "SGD, final": run["files"]["final"]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 14k-weight CNN: more intra-op threads only add contention
    try:
        result = plane(make_model(seed, setting.width), picks, [test.tensors], grid=grid, points=points,
                       labels=[f"epoch {Path(p).stem.split('_')[-1].lstrip('0')}" for p in picks],
                       bn_data=bn_loader(train), progress=progress)
    finally:
        torch.set_num_threads(threads)
    plot_plane(result, path, title=f"MNIST-1D test loss over the plane through three head-stage checkpoints "
                                   f"(seed {seed}; BatchNorm recomputed at every point)")
    return dict(grid=grid, points={k: p.to_dict() for k, p in result.points.items()})


# Seeds 0-2 chose the setting (experiments/claims.py calibrate: SGD alone, on the validation
# split); the demo runs the seeds after them, which the choice never saw, so its intervals
# are not those of the seeds that picked it.
FIRST_SEED = 3


def first_seed_model() -> nn.Module:
    """The demo's model for its first seed, for `twa connect/plane --config` on that seed's
    checkpoints (results/connectivity/demo_first_seed_config.yaml)."""
    return make_model(FIRST_SEED, DEMO.width)


def first_seed_train_loader() -> DataLoader:
    """The first seed's training signals in batches of 500 (BatchNorm statistics are recomputed on these)."""
    return bn_loader(mnist1d(FIRST_SEED, DEMO.train_size)[0])


def mnist1d_test_loader() -> DataLoader:
    """The 1,000 test signals of MNIST-1D (the same for every seed)."""
    return batches(mnist1d(0)[2], 500)


first_seed_test_loader = mnist1d_test_loader  # the name the config uses


def run_demo(out_dir: str | Path = "twa-demo", quick: bool = False, seeds: int | None = None,
             progress: bool | None = None, setting: Setting | None = None) -> dict:
    """Run the demo (5 seeds from FIRST_SEED on, or 1 with `quick`; the same setting either way) and write
    results.json, accuracy.png and plane.png into out_dir. `progress`: bars on standard error
    (None: only when it is a terminal). `seeds` must be a positive int and out_dir a
    directory (or a path to create); anything else is refused before anything is created."""
    setting = setting or DEMO
    n_seeds = seeds if seeds is not None else (1 if quick else 5)
    # the summary needs a seed
    integer("seeds", n_seeds, 1, "the number of seeds to run: --seeds 1 or more, or none for 5, 1 with --quick")
    seeds_run = list(range(FIRST_SEED, FIRST_SEED + n_seeds))
    out = _checked_out_dir(out_dir, seeds_run)
    for module, needed_by in (("mnist1d.data", "twa demo's data"), ("matplotlib.figure", "twa demo's figures")):
        optional(module, "demo", needed_by)  # before minutes of training, not after
    created = [d for d in (out, *out.parents) if not os.path.lexists(d)]  # removed again if the run fails
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # under a file, no permission, a read-only file system
        raise OutputError(f"out_dir (--out) {shown(out)} cannot be created ({exc.strerror or exc}); choose a "
                          "directory you can write to") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"out_dir (--out) {shown(out)} cannot be written (no write permission); choose a "
                          "directory you can write to")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    # a 14k-weight CNN in batches of 64: a second intra-op thread only adds contention, most of
    # all on cores that other work keeps busy; one thread also makes the numbers match
    # experiments/claims.py's, which runs one thread per process
    torch.set_num_threads(1)
    # every seed trains into a staging folder, and its folder replaces the earlier run's only
    # when all of the run is done: an interrupted run leaves no seed folder begun (a part of a
    # run that twa connect would read as a whole), nor an earlier run's folders half rewritten
    _remove_abandoned_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".twa-demo-stage.{owner_tag()}.", dir=out))
    try:
        try:
            run_stamp = stamp()  # the machine, date and commit of these numbers, and the one thread they ran on
            runs = [run_seed(seed, setting, staging, progress) for seed in seeds_run]
        finally:
            torch.set_num_threads(threads)
        summary = summarize(runs)
        report = dict(dataset=f"MNIST-1D ({setting.train_size} train / 500 validation / 1000 test)",
                      seeds=seeds_run,
                      setting=setting.describe(), epochs=setting.epochs, head_epochs=runs[0]["head_epochs"],
                      twa_epochs=setting.twa_epochs, bits=4, summary=summary, runs=runs)
        plot(runs, summary, staging / "accuracy.png")
        report["plane"] = plane_figure(runs[0], setting, staging / "plane.png", grid=11 if quick else 21,
                                       progress=progress)
        report["total_seconds"] = time.perf_counter() - start
        report["stamp"] = run_stamp
        for run in runs:  # results.json names the files where they will be
            run["files"] = _moved(run["files"], staging, out)
        write_json(staging / "results.json", report)
        _checked_out_dir(out, seeds_run)  # what appeared in an output's place: refused before any is replaced
        # the seed folders, then the three outputs together (results.json last of all); a
        # failure in either leaves the earlier run's folders beside the earlier run's outputs
        _replace_seed_folders(staging, out, seeds_run, then=lambda: _replace_together(staging, out))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # the folders this run made, if nothing else was put in them
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    report["table"] = format_table(summary, n_seeds)
    return report


OUTPUTS = ("accuracy.png", "plane.png", "results.json")
# what a seed's folder holds: its epochs, the budget run's folder of epochs, SWA and TWA-v
# (named for their head stage by versions of 2026-12-02), and a desktop's folder notes
_SEED_ENTRY = re.compile(r"epoch_\d+\.safetensors|(swa|twa_v)(_head\d+)?\.safetensors|budget\d+|\.DS_Store")
_BUDGET_ENTRY = re.compile(r"epoch_\d+\.safetensors")


def _replace_seed_folders(staging: Path, out: Path, seeds: list[int], then: Callable[[], None]) -> None:
    """Put each seed's folder from `staging` in place of the earlier run's in `out`, the
    earlier ones moved into `staging` (removed with it), and call `then` (which puts the
    outputs in place). A failure part-way (a folder that cannot be moved, a full disk in
    `then`, a Ctrl-C) puts every earlier folder back and raises, so that the earlier run's
    outputs never sit beside this run's folders."""
    done: list[tuple[Path, Path, Path | None]] = []  # (new folder's place, its staged place, the earlier one's)
    try:
        for seed in seeds:
            final, new = out / f"seed{seed}", staging / f"seed{seed}"
            earlier = staging / f"replaced-seed{seed}" if os.path.lexists(final) else None
            done.append((final, new, earlier))
            if earlier is not None:
                os.replace(final, earlier)
            os.replace(new, final)
        then()
    except BaseException as exc:
        for final, new, earlier in reversed(done):
            with contextlib.suppress(OSError):
                if os.path.lexists(final) and not os.path.lexists(new):
                    os.replace(final, new)
                if earlier is not None and os.path.lexists(earlier):
                    os.replace(earlier, final)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(f"out_dir (--out) {shown(out)}: a seed folder could not be put in place of the earlier "
                              f"run's ({exc.strerror or exc}); the earlier run's folders and outputs are as they "
                              "were: check the folder's permissions, or choose another --out") from exc
        raise


def _moved(files: Any, staging: Path, out: Path) -> Any:
    """`files` (paths, and lists and dicts of them) with the staging folder's paths in `out`."""
    if isinstance(files, dict):
        return {key: _moved(value, staging, out) for key, value in files.items()}
    if isinstance(files, list):
        return [_moved(value, staging, out) for value in files]
    path = Path(files)
    return str(out / path.relative_to(staging)) if path.is_relative_to(staging) else files


def _remove_abandoned_staging(out: Path) -> None:
    """Remove the staging folders of demos that were killed (SIGKILL, a crash) before they
    could clean up: those whose process is gone."""
    for entry in out.glob(".twa-demo-stage.*"):
        tag = entry.name.split(".")[2]
        if re.fullmatch(OWNER, tag) and not owner_alive(tag):
            shutil.rmtree(entry, ignore_errors=True)


def _replace_together(staging: Path, out: Path) -> None:
    """Put the staged outputs in place of out's (io.atomic_write_together): each first
    copied whole beside the file it replaces (through a symlink where one stands, with the
    old file's mode) and flushed to disk, then all renamed into place, results.json last (it
    names the run the figures belong to), so that a full disk stops the run before any
    output changes. Only a rename that fails part-way (no full disk does: the bytes are
    written by then) would leave the outputs before it replaced, which its error says."""
    atomic_write_together({out / name: functools.partial(shutil.copyfile, staging / name) for name in OUTPUTS})


def _not_the_demos(folder: Path) -> Path | None:
    """An entry of an earlier seed folder (or of its budget folder) that the demo does not
    write, or None: replacing the folder would delete it."""
    for entry in folder.iterdir():
        if not _SEED_ENTRY.fullmatch(entry.name) or entry.name.startswith("budget") != entry.is_dir():
            return entry
        if entry.is_dir():
            stranger = next((e for e in entry.iterdir() if not _BUDGET_ENTRY.fullmatch(e.name) or not e.is_file()),
                            None)
            if stranger is not None:
                return stranger
    return None


def _a_demo_record(path: Path) -> bool:
    """Whether `path` holds the results.json a demo wrote (its data set, runs and summary)."""
    record = json_record(path)
    return record is not None and {"dataset", "runs", "summary"} <= record.keys()


def _checked_out_dir(out_dir: str | Path, seeds: Sequence[int] = ()) -> Path:
    """out_dir as a Path, refused (OutputError) before any work where the demo's outputs
    could not be written: a NUL byte, a file, a name too long, a directory in the place of
    an output, or anything but a directory in the place of a seed's folder (a file, or a
    symbolic link, which the new folder would replace rather than write through). Nothing
    the demo did not write is replaced or deleted: a seed folder holding other files, a
    results.json of another program, or a figure beside no demo record is refused too."""
    if not isinstance(out_dir, (str, os.PathLike)) or isinstance(os.fspath(out_dir), bytes):
        raise InvalidTypeError(f"out_dir must be a directory path (str or pathlib.Path), got {type(out_dir).__name__}")
    path_without_nul(out_dir, "out_dir (--out)", OutputError)
    out = Path(out_dir)
    try:
        if out.exists() and not out.is_dir():
            raise OutputError(f"out_dir (--out) {shown(out)} is a file, not a directory; the demo writes several "
                              "files into a directory: give a directory path (it is created if missing)")
        for name in OUTPUTS:
            if (out / name).is_dir():
                raise OutputError(f"out_dir (--out) {shown(out)} holds a directory named {name}, where the demo "
                                  "writes that file: rename or remove it, or choose another --out")
        for seed in seeds:
            folder = out / f"seed{seed}"
            if os.path.lexists(folder) and (folder.is_symlink() or not folder.is_dir()):
                kind = "a symbolic link" if folder.is_symlink() else "a file"
                raise OutputError(f"out_dir (--out) {shown(out)} holds {kind} named seed{seed}, where the demo puts "
                                  f"seed {seed}'s checkpoint folder in place of an earlier run's: rename or remove "
                                  "it, or choose another --out")
            if folder.is_dir() and (stranger := _not_the_demos(folder)):
                raise OutputError(f"out_dir (--out) {shown(out)}: {shown(stranger)} is not a file the demo writes, "
                                  f"and seed{seed}'s folder is replaced whole by this run's: move it out, or choose "
                                  "another --out")
        # the demo writes its three outputs together, results.json last: figures beside no
        # record of the demo's are another program's
        record = out / "results.json"
        if record.exists() and not _a_demo_record(record) or not record.exists() and any(
                (out / name).exists() for name in OUTPUTS):
            theirs = record if record.exists() else next(out / name for name in OUTPUTS if (out / name).exists())
            raise OutputError(f"out_dir (--out) {shown(out)}: {shown(theirs)} is not an earlier demo's output (no "
                              "demo results.json beside it), and the demo would replace it: move it, or choose "
                              "another --out")
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        fix = "a shorter path" if exc.errno == errno.ENAMETOOLONG else "a directory you can read and write"
        raise OutputError(f"out_dir (--out) {shown(out)} cannot be used ({exc.strerror or exc}); choose {fix}") \
            from exc
    return out


__all__ = ["DEMO", "Setting", "paired_difference", "run_demo"]
