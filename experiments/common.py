"""What the experiment scripts share: the repository root, the MLP, accuracy, the
command-line parser, confidence intervals, figure and JSON writing, and the provenance stamp.

Every script runs from the repository root as `python -m experiments.<name>` and writes
under results/<name>/.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from twa_kernels.demo import t975
from twa_kernels.errors import InvalidArgumentError
from twa_kernels.io import atomic_write, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"


def make_mlp(seed: int, widths: Sequence[int] = (40, 128, 128, 10)) -> nn.Module:
    """A ReLU MLP through `widths` (the first is the input size), seeded; flattens its input."""
    if len(widths) < 2:
        raise InvalidArgumentError(f"widths needs an input and an output size, got {list(widths)}")
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, batch: int = 4096) -> float:
    """Top-1 accuracy of `model` in eval mode on a TensorDataset (x, y)."""
    model.eval()
    x, y = data.tensors
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / max(1, len(x))


def mnist1d(split_seed: int = 0, train_size: int = 9000, val_size: int = 1000, num_samples: int = 12500
            ) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train, validation, test) of MNIST-1D drawn with the mnist1d generator at `num_samples`
    signals (its default split: 80% for training, 20% for test; 12,500 gives 10,000 and
    2,500). The training pool is shuffled by `split_seed`, then cut into `train_size`
    training and `val_size` validation signals. The generated set is cached in the temp dir."""
    import tempfile

    cache = Path(tempfile.gettempdir()) / f"twa-mnist1d-{num_samples}.pt"
    data = None
    if cache.is_file():
        try:
            data = torch.load(cache, weights_only=True)  # a file in a shared folder: tensors only
        except (OSError, RuntimeError, EOFError):
            data = None
    if data is None:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = num_samples
        raw = make_dataset(args)  # deterministic: the generator seeds itself
        data = {k: torch.as_tensor(raw[k]) for k in ("x", "y", "x_test", "y_test")}
        atomic_write(cache, lambda tmp: torch.save(data, tmp))
    x, y = data["x"].float()[:, None], data["y"].long()
    if train_size + val_size > len(x):
        raise InvalidArgumentError(f"train_size + val_size = {train_size + val_size} > the {len(x)} training signals "
                                   f"of {num_samples} samples")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    x, y = x[order], y[order]
    test = TensorDataset(data["x_test"].float()[:, None], data["y_test"].long())
    return (TensorDataset(x[:train_size], y[:train_size]),
            TensorDataset(x[train_size:train_size + val_size], y[train_size:train_size + val_size]), test)


def parser(doc: str | None, results: str) -> argparse.ArgumentParser:
    """An ArgumentParser showing the module docstring, with --out defaulting to results/<results>."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS / results, help="output folder (default: %(default)s)")
    return p


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std and the 95% Student-t interval of the mean (None with one value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise InvalidArgumentError("mean_ci needs at least one value")
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return dict(mean=mean, std=0.0, ci95=None, n=1)
    std = statistics.stdev(vals)
    half = t975(len(vals) - 1) * std / math.sqrt(len(vals))
    return dict(mean=mean, std=std, ci95=[mean - half, mean + half], n=len(vals))


def paired_p_value(mean: float, std: float, n: int) -> float:
    """Two-sided p-value of a paired t-test from the differences' mean, standard deviation
    (n - 1 in the denominator, as paired_difference gives them) and count."""
    from scipy import stats  # the experiments' only use of scipy (installed with scikit-learn)

    if n < 2:
        raise InvalidArgumentError(f"a paired t-test needs two or more pairs, got {n}")
    if std == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * stats.t.sf(abs(mean) / (std / math.sqrt(n)), n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values for a family of tests, in their given order:
    the i-th smallest is multiplied by (m - i + 1), kept no smaller than the one before,
    capped at 1. Below alpha after adjustment keeps the family-wise error rate at alpha."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: p_values[j])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (the format from the suffix) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
    finally:
        plt.close(fig)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_RUN_STAMP: dict = {}


def stamp() -> dict:
    """Machine, date, commit and software (bench/stamp.py's stamp(), loaded by path) as they
    were at this process's first call, which each experiment makes when it starts: a commit
    made, or a file edited, while a run goes on is not the code that ran. "written" is when
    this call was made."""
    if not _RUN_STAMP:
        _RUN_STAMP.update(_machine_stamp())
    return {**_RUN_STAMP, "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _machine_stamp() -> dict:
    """bench/stamp.py's stamp() as it reads now."""
    spec = importlib.util.spec_from_file_location("_bench_stamp", ROOT / "bench" / "stamp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.stamp()


def write_report(path: str | Path, report: dict) -> Path:
    """Write a results JSON atomically, with the run's provenance stamp under "stamp"."""
    return write_json(path, {**report, "stamp": stamp()})


__all__ = ["RESULTS", "ROOT", "accuracy", "holm", "make_mlp", "mean_ci", "mnist1d", "paired_p_value", "parser",
           "pyplot", "save_figure", "stamp", "write_report"]
