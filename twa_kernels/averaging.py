"""The baselines TWA is compared against, all streaming (one checkpoint in memory at a time):
SWA / uniform soup, EMA over checkpoints, and greedy soup. Also the held-out split that
TWA-v trains its coefficients on, and update_bn, which every averaged or interpolated model
needs before it is evaluated.

Floating-point entries are averaged (in float64); other entries (integer counters such as
BatchNorm's num_batches_tracked) are taken from the last checkpoint. Recompute BatchNorm
statistics of an averaged model afterwards (torch.optim.swa_utils.update_bn). A NaN or Inf
in a checkpoint is refused with the file and the key. Given the model (`model=`), the
result holds exactly the model's state_dict keys, matched as TWA matches them (see
twa_kernels.io: wrapper prefixes, a LightningModule's `model.`, tied weights saved under one
of their names), or a CheckpointError names the checkpoint and the key it lacks. A wrapped
model (torch.compile, DDP) is read as the module it wraps.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import Dataset, Subset, random_split

from twa_kernels._random import generator
from twa_kernels.errors import InvalidArgumentError
from twa_kernels.io import (
    CheckpointError,
    Checkpoints,
    StateDict,
    check_finite,
    fill_tied_keys,
    iter_state_dicts,
    parameter_aliases,
    resolve_checkpoints,
    unwrap_model,
)


def _check_layout(reference: StateDict, state: StateDict, source: str) -> None:
    for key, value in reference.items():
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r} that the first checkpoint has")
        if state[key].shape != value.shape:
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(state[key].shape)} but the first "
                                  f"checkpoint has {tuple(value.shape)}")


def _finish(total: dict[str, Tensor], last: StateDict, scale: float) -> StateDict:
    return {k: (total[k] * scale).to(v.dtype) if k in total else v.clone() for k, v in last.items()}


def _states(specs: list, model: nn.Module | None):
    """(source, state) per checkpoint: finite; given the model, keyed exactly as its
    state_dict (tied names filled in)."""
    if model is None:
        for source, state in iter_state_dicts(specs):
            check_finite(state, source)
            yield source, state
        return
    model = unwrap_model(model)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    aliases = parameter_aliases(model)
    for source, state in iter_state_dicts(specs, names=expected):
        state = _model_keys(fill_tied_keys(state, aliases), expected, source)
        check_finite(state, source)
        yield source, state


def _model_keys(state: StateDict, expected: dict[str, tuple[int, ...]], source: str) -> StateDict:
    """The model's keys of `state`, each with the model's shape; the checkpoint's other
    entries are left out."""
    missing = [key for key in expected if key not in state]
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r} that the model has ({len(missing)} of its "
                              f"{len(expected)} keys missing; the checkpoint has {len(state)} keys, e.g. "
                              f"{list(state)[:3]}); was it saved from this model?")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(state[key].shape)} but the model has "
                                  f"{shape}")
    return {key: state[key] for key in expected}


def _fold(checkpoints: Checkpoints, update: Callable[[dict[str, Tensor], StateDict], None],
          model: nn.Module | None = None):
    """Stream the checkpoints: float64 copies of the first one's floating-point entries,
    then update(accumulator, state) for each later one. Returns (accumulator, last, count)."""
    specs = resolve_checkpoints(checkpoints)
    acc: dict[str, Tensor] = {}
    first = last = None
    for source, state in _states(specs, model):
        if first is None:
            first = state
            acc = {k: v.double().clone() for k, v in state.items() if v.is_floating_point()}
        else:
            _check_layout(first, state, source)
            update(acc, state)
        last = state
    return acc, last, len(specs)


def uniform_average(checkpoints: Checkpoints, model: nn.Module | None = None) -> StateDict:
    """SWA / uniform soup: the mean of every floating-point entry over the checkpoints."""

    def add(acc: dict[str, Tensor], state: StateDict) -> None:
        for k in acc:
            acc[k] += state[k].double()

    total, last, count = _fold(checkpoints, add, model)
    return _finish(total, last, 1.0 / count)


def ema_average(checkpoints: Checkpoints, decay: float = 0.9, model: nn.Module | None = None) -> StateDict:
    """Exponential moving average over the checkpoints in order: w <- decay * w + (1 - decay) * ckpt."""
    if not 0.0 <= decay < 1.0:
        raise InvalidArgumentError(f"decay must be in [0, 1), got {decay}")

    def blend(acc: dict[str, Tensor], state: StateDict) -> None:
        for k in acc:
            acc[k].mul_(decay).add_(state[k].double(), alpha=1.0 - decay)

    avg, last, _ = _fold(checkpoints, blend, model)
    return _finish(avg, last, 1.0)


def greedy_soup(
    checkpoints: Checkpoints, score: Callable[[StateDict], float], model: nn.Module | None = None
) -> tuple[StateDict, list[int]]:
    """Greedy soup (Wortsman et al. 2022): rank checkpoints by `score` (higher is better,
    e.g. held-out accuracy), then add each in turn to the running average while the
    average's score does not drop. Returns the soup and the indices it holds. Every score
    must be a finite real number (a one-element tensor is read as its value): a NaN would
    rank anywhere, so it is refused, naming the checkpoint, as is None."""
    specs = resolve_checkpoints(checkpoints)
    scores = []
    first = None
    for i, (source, state) in enumerate(_states(specs, model)):
        if first is None:
            first = state
        else:
            _check_layout(first, state, source)
        scores.append((_real_score(score(state), f"checkpoint {i} ({source})"), i))
    order = [i for _, i in sorted(scores, key=lambda t: -t[0])]
    best_score = scores[order[0]][0]  # the first ingredient's own score, whatever the ties
    chosen = [order[0]]
    total: dict[str, Tensor] | None = None
    last: StateDict | None = None
    for i in order:
        _, state = next(_states([specs[i]], model))
        if total is None:
            total = {k: v.double().clone() for k, v in state.items() if v.is_floating_point()}
            last = state
            continue
        candidate_total = {k: total[k] + state[k].double() for k in total}
        candidate = _finish(candidate_total, state, 1.0 / (len(chosen) + 1))
        candidate_score = _real_score(score(candidate), f"the soup of checkpoints {[*chosen, i]}")
        if candidate_score >= best_score:
            total, last, best_score = candidate_total, state, candidate_score
            chosen.append(i)
    return _finish(total, last, 1.0 / len(chosen)), chosen


def _real_score(value: Any, what: str) -> float:
    """`value` as a finite float, or an error naming `what` was scored: NaN compares false
    with everything, so a NaN score would silently reorder the soup."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidArgumentError(f"greedy_soup: the score of {what} is {value!r}; score must return a finite "
                                   "real number (higher is better), e.g. held-out accuracy")
    return float(value)


def _feed(model: Callable[..., Any], batch: Any) -> None:
    """Run `model` on a batch as loaders give them: (inputs, targets, ...) feeds the inputs,
    a mapping of keyword arguments (transformers' batches) is unpacked."""
    if isinstance(batch, (list, tuple)):
        model(batch[0])
    elif isinstance(batch, Mapping):
        model(**batch)
    else:
        model(batch)


def split_holdout(dataset: Dataset, fraction: float = 0.1, seed: int | None = None) -> tuple[Subset, Subset]:
    """(train, held_out): a random split of `dataset` (an int `seed` reproduces it and leaves
    torch's global RNG untouched; None draws from the global RNG).

    TWA-t trains the coefficients on the training data: right for checkpoints of one run,
    where it finishes training early (the head stage) or refines SWA (the tail). TWA-v
    trains them on held-out data: right when the models already fit their training data
    (fine-tuned copies, model soups), where training loss no longer tells them apart.
    """
    if not 0.0 < fraction < 1.0:
        raise InvalidArgumentError(f"fraction must be in (0, 1), got {fraction}")
    held = max(1, round(len(dataset) * fraction))
    if held >= len(dataset):
        raise InvalidArgumentError(f"a dataset of {len(dataset)} items is too small to hold out {fraction:.0%}")
    train, held_out = random_split(dataset, [len(dataset) - held, held], generator=generator(seed))
    return train, held_out


@torch.no_grad()
def update_bn(loader: Iterable, model: nn.Module, call_fn: Callable[[nn.Module, Any], Any] | None = None,
              weights: Mapping[str, Tensor] | None = None, *, allow_empty: bool = False) -> None:
    """Recompute `model`'s BatchNorm statistics, as torch.optim.swa_utils.update_bn does:
    reset them, then one pass over `loader` in train mode with cumulative averaging
    (momentum None), so every batch counts equally. A batch that is a tuple or list feeds
    its first element, a mapping (a Hugging Face batch) its items as keyword arguments,
    unless call_fn(model, batch) is given. With `weights` (parameter
    tensors by name) the pass runs at those weights through functional_call, leaving the
    model's own parameters untouched; only its BatchNorm buffers change.

    A loader that yields no batches (empty, or a generator already used up) raises
    InvalidArgumentError. Then, and when the pass fails, the statistics are left as they
    were, not reset to mean 0 and variance 1 (or half-measured) as if they had been measured.
    `allow_empty` is for one rank of a distributed pass, whose share may be empty: no batches
    then leave the statistics reset with a batch count of zero, which the all-reduce of
    distributed.all_reduce_bn_statistics weighs as nothing."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    saved = {m: {k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    runner = model if weights is None else _WithWeights(model, dict(weights))
    count = 0
    try:
        for batch in loader:
            if call_fn is not None:
                call_fn(runner, batch)
            else:
                _feed(runner, batch)
            count += 1
        if count == 0 and not allow_empty:
            fix = ("it is an iterator (a generator?), which an earlier pass may have used up: pass a re-iterable "
                   "such as a list or a DataLoader" if isinstance(loader, Iterator) else "pass a non-empty loader")
            raise InvalidArgumentError(f"update_bn: the loader yielded no batches, so there are no statistics to "
                                       f"measure (they are left as they were); {fix}")
    except BaseException:
        for m in norms:  # no batch, or a failure mid-pass: the old statistics, not reset or partial ones
            for k, b in saved[m].items():
                getattr(m, k).copy_(b)
        raise
    finally:
        for m in norms:
            m.momentum = momenta[m]
        model.train(was_training)


class _WithWeights(nn.Module):
    """`module` called with fixed replacement weights (a list keeps it out of the module tree)."""

    def __init__(self, module: nn.Module, weights: dict[str, Tensor]):
        super().__init__()
        self._inner, self._weights = [module], weights

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._inner[0], self._weights, args, kwargs)


__all__ = ["ema_average", "greedy_soup", "split_holdout", "uniform_average", "update_bn"]
