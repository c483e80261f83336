"""A small real task for the training-API tests: scikit-learn's bundled digits (1,797 8x8
images, no download), a BatchNorm MLP, and checkpoints from a short SGD run."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_splits(seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    train, val, test = slice(0, 1100), slice(1100, 1450), slice(1450, None)
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), TensorDataset(x[test], y[test])


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Linear(48, 10))


def _train_epoch(module: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader) -> None:
    """One epoch of cross-entropy training in train mode."""
    module.train()
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(module(xb), yb).backward()
        opt.step()


def train_checkpoints(train, epochs: int = 6, lr: float = 0.05, seed: int = 0) -> list[dict]:
    """SGD from scratch; the state_dict after every epoch."""
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    checkpoints = []
    for _ in range(epochs):
        _train_epoch(model, opt, loader)
        checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    return checkpoints


class SharedRuns:
    """train_checkpoints on the digits training split, each (lr, seed) run trained once and
    shared by the modules that ask for it: the first n epochs of a run are the checkpoints of
    a run of n epochs (same seeds, same batches). A run is trained to the most epochs any
    module asks for (LONGEST), in one thread, so that its bytes do not depend on which module
    asks first. Each call returns fresh copies, so a test cannot change another's."""

    LONGEST = {(0.05, 0): 8, (0.05, 1): 8, (0.01, 0): 5}

    def __init__(self) -> None:
        self._runs: dict[tuple[float, int], list[dict]] = {}
        self._train = digits_splits()[0]

    def __call__(self, epochs: int, lr: float = 0.05, seed: int = 0) -> list[dict]:
        key = (lr, seed)
        if len(self._runs.get(key, ())) < epochs:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                self._runs[key] = train_checkpoints(self._train, max(epochs, self.LONGEST.get(key, 0)), lr, seed)
            finally:
                torch.set_num_threads(threads)
        return [{k: v.clone() for k, v in state.items()} for state in self._runs[key][:epochs]]


@torch.no_grad()
def evaluate(model, dataset) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode."""
    model.eval()
    x, y = dataset.tensors
    logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train_coefficients(twa, dataset, epochs: int = 4, lr: float = 0.05, seed: int = 0) -> None:
    opt = torch.optim.AdamW(twa.parameters(), lr=lr, weight_decay=0.0)
    loader = DataLoader(dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        _train_epoch(twa, opt, loader)
