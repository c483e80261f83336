"""The baselines TWA is compared against, all streaming (the first checkpoint, kept for the
layout checks, the one being added and a float64 sum are held; never the whole set):
SWA / uniform soup, EMA over checkpoints, and greedy soup. Also the held-out split that
TWA-v trains its coefficients on, and update_bn, which every averaged or interpolated model
needs before it is evaluated.

Floating-point entries are averaged (in float64) and returned in the widest of their
checkpoints' dtypes and, given the model, the model's own (bfloat16 files averaged for a
float32 model come back in float32, whatever the files' order); other entries (integer
counters such as BatchNorm's num_batches_tracked) are taken from the last checkpoint. Recompute BatchNorm
statistics of an averaged model afterwards (update_bn, from twa_kernels.batchnorm). A NaN or Inf
in a checkpoint is refused with the file and the key. Given the model (`model=`), the
result holds exactly the model's state_dict keys, matched as TWA matches them (see
twa_kernels.io: wrapper prefixes, a LightningModule's `model.`, tied weights saved under one
of their names), or a CheckpointError names the checkpoint and the key it lacks. A wrapped
model (torch.compile, DDP) is read as the module it wraps.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, random_split

from twa_kernels._checks import real
from twa_kernels._random import generator
from twa_kernels.batchnorm import update_bn  # noqa: F401  (part of this module's API)
from twa_kernels.errors import InvalidArgumentError, InvalidTypeError
from twa_kernels.io import (
    CheckpointError,
    Checkpoints,
    StateDict,
    adapter_file_keys,
    adapter_hint,
    changed_error,
    check_finite,
    checkpoint_aliases,
    file_stamp,
    fill_tied_keys,
    iter_state_dicts,
    model_key_names,
    resolve_checkpoints,
    trainer_output_hint,
    unwrap_model,
    refuse_decorrelated_keys,
    warn_unmatched_keys,
)


def _averaged(value: Tensor) -> bool:
    """Whether an entry is averaged (real or complex floating point); the others, integer
    counters and masks, come from the last checkpoint."""
    return value.is_floating_point() or value.is_complex()


def _wide(value: Tensor) -> Tensor:
    """The entry in float64, or complex128: the sums are kept at double precision."""
    return value.to(torch.complex128 if value.is_complex() else torch.float64)


def _check_layout(reference: StateDict, state: StateDict, source: str) -> None:
    """`state` holds the first checkpoint's keys, no others, each of its shape and kind
    (floating point or not): an entry that only later checkpoints hold, or one that turns
    from float to integer, would otherwise be taken from the last checkpoint unaveraged."""
    for key, value in reference.items():
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r} that the first checkpoint has; the checkpoints "
                                  "must be saved from one model")
        if state[key].shape != value.shape:
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(state[key].shape)} but the first "
                                  f"checkpoint has {tuple(value.shape)}; the checkpoints must come from one "
                                  "architecture")
        if _averaged(state[key]) != _averaged(value) or state[key].is_complex() != value.is_complex():
            raise CheckpointError(f"{source}: key {key!r} is {state[key].dtype} but the first checkpoint's is "
                                  f"{value.dtype}; checkpoints of one model hold each entry in one kind")
    extra = [key for key in state if key not in reference]
    if extra:
        raise CheckpointError(f"{source}: key {extra[0]!r} that the first checkpoint lacks ({len(extra)} such keys); "
                              "average checkpoints of one model, or pass model= to use only the model's keys")


def _finish(total: dict[str, Tensor], last: StateDict, scale: float, dtypes: dict[str, torch.dtype]) -> StateDict:
    return {k: (total[k] * scale).to(dtypes[k]) if k in total else v.clone() for k, v in last.items()}


def _widen(dtypes: dict[str, torch.dtype], state: StateDict) -> None:
    """Promote dtypes[key] by each averaged entry's dtype: the result's dtype of that entry."""
    for key, value in state.items():
        if _averaged(value):
            dtypes[key] = _wider(dtypes[key], value.dtype) if key in dtypes else value.dtype


def _wider(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """torch's promotion, which has none for the 8-bit floats: beside another dtype they give
    way to it, and two kinds of them meet in float32."""
    if a == b:
        return a
    eight_bit = [d.is_floating_point and d.itemsize == 1 for d in (a, b)]
    if any(eight_bit):
        return torch.float32 if all(eight_bit) else (b if eight_bit[0] else a)
    return torch.promote_types(a, b)


def _model_dtypes(model: nn.Module | None) -> dict[str, torch.dtype]:
    """The dtypes of the model's averaged entries, the floor of the result's (none without one)."""
    if model is None:
        return {}
    state = unwrap_model(model).state_dict()
    return {key: value.dtype for key, value in state.items() if isinstance(value, Tensor) and _averaged(value)}


def _states(specs: list, model: nn.Module | None, warn_unmatched: bool = True, kept: StateDict | None = None):
    """(source, state) per checkpoint: finite; given the model, keyed exactly as its
    state_dict (tied names filled in), with a warning where the first checkpoint holds
    floating-point tensors the model has no place for (warn_unmatched). The model's own
    values of a PEFT model's entries that adapter files leave to it are copied into `kept`
    when first needed and read from there after: a caller that runs the model between
    passes (greedy_soup's score) passes the same `kept` to each."""
    if model is None:
        for source, state in iter_state_dicts(specs):
            check_finite(state, source)
            yield source, state
        return
    model = unwrap_model(model)
    # a module's extra state that is not a tensor (get_extra_state) is no checkpoint entry
    own = {key: value for key, value in model.state_dict().items() if isinstance(value, Tensor)}
    expected = {key: tuple(value.shape) for key, value in own.items()}
    adapters = adapter_file_keys(model)
    aliases = checkpoint_aliases(model, adapters)
    # a PEFT model's adapter files hold its adapters alone: its frozen entries (the base) that
    # the first file lacks are the model's own, and no later file may hold them
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    base = {key: value for key, value in own.items() if key not in trainable} if adapters else {}
    absent: set[str] = set()
    copy, kept = kept is not None, {} if kept is None else kept
    known = model_key_names(model) if warn_unmatched else None
    names = [*expected, *(key for keys in adapters.values() for key in keys)]
    for i, (source, state) in enumerate(iter_state_dicts(specs, names=names)):
        state = fill_tied_keys(state, aliases, source)
        if i == 0 and known is not None:
            warn_unmatched_keys({key: (value.dtype, value.shape) for key, value in state.items()}, known, source)
        elif known is not None:  # a run decorrelated part way: its later checkpoints hold R
            refuse_decorrelated_keys(state.keys(), known, source)
        if i == 0:
            absent = {key for key in base if key not in state}
            for key in absent:  # copied for a caller that runs the model between passes
                kept.setdefault(key, base[key].detach().clone() if copy else base[key])
        held = sorted(absent & state.keys())
        if held:
            raise CheckpointError(f"{source}: holds {held[0]!r}, which the first checkpoint does not (it leaves it "
                                  "to the model's own value); pass checkpoints that hold the same entries")
        state = _model_keys(state, expected, source, {key: kept[key] for key in absent}, model)
        check_finite(state, source)
        yield source, state


def _model_keys(state: StateDict, expected: dict[str, tuple[int, ...]], source: str,
                own: StateDict | None = None, model: nn.Module | None = None) -> StateDict:
    """The model's keys of `state`, each with the model's shape; the checkpoint's other
    entries are left out. `own`: the model's values of the keys the checkpoints leave to it;
    `model`, where given, lets a missing key's error name a PEFT mismatch (adapter_hint)."""
    own = own or {}
    missing = [key for key in expected if key not in state and key not in own]
    if missing:
        hint = adapter_hint(missing[0], list(state), source, model) or "was it saved from this model?"
        raise CheckpointError(f"{source}: missing key {missing[0]!r} that the model has ({len(missing)} of its "
                              f"{len(expected)} keys missing; the checkpoint has {len(state)} keys, e.g. "
                              f"{list(state)[:3]}); {hint}")
    state = {**own, **state}
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(state[key].shape)} but the model has "
                                  f"{shape}")
    return {key: state[key] for key in expected}


def _fold(checkpoints: Checkpoints, update: Callable[[dict[str, Tensor], StateDict], None],
          model: nn.Module | None = None):
    """Stream the checkpoints: float64 copies of the first one's floating-point entries,
    then update(accumulator, state) for each later one. Returns (accumulator, last, count,
    the result's dtype of each averaged entry)."""
    specs = resolve_checkpoints(checkpoints)
    if len(specs) == 1 and (hint := trainer_output_hint(checkpoints)):  # an average of the final weights alone
        raise CheckpointError(f"1 checkpoint ({specs[0]}): its average is itself{hint}")
    acc: dict[str, Tensor] = {}
    dtypes = _model_dtypes(model)
    first = last = None
    for source, state in _states(specs, model):
        _widen(dtypes, state)
        if first is None:
            first = state
            acc = {k: _wide(v).clone() for k, v in state.items() if _averaged(v)}
        else:
            _check_layout(first, state, source)
            update(acc, state)
        last = state
    return acc, last, len(specs), dtypes


def uniform_average(checkpoints: Checkpoints, model: nn.Module | None = None) -> StateDict:
    """SWA / uniform soup: the mean of every floating-point entry over the checkpoints,
    summed in float64 and returned in the widest of the checkpoints' (and the model's) dtypes
    of that entry; integer and bool entries (BatchNorm's num_batches_tracked) are the last
    checkpoint's."""

    def add(acc: dict[str, Tensor], state: StateDict) -> None:
        for k in acc:
            acc[k] += _wide(state[k])

    total, last, count, dtypes = _fold(checkpoints, add, model)
    return _finish(total, last, 1.0 / count, dtypes)


def ema_average(checkpoints: Checkpoints, decay: float = 0.9, model: nn.Module | None = None) -> StateDict:
    """Exponential moving average over the checkpoints in order: w <- decay * w + (1 - decay) * ckpt.
    Given `model`, the result holds its keys and dtypes, as for every average here."""
    if not 0.0 <= real("decay", decay) < 1.0:
        raise InvalidArgumentError(f"decay must be in [0, 1), got {decay}")

    def blend(acc: dict[str, Tensor], state: StateDict) -> None:
        for k in acc:
            acc[k].mul_(decay).add_(_wide(state[k]), alpha=1.0 - decay)

    avg, last, _, dtypes = _fold(checkpoints, blend, model)
    return _finish(avg, last, 1.0, dtypes)


def greedy_soup(
    checkpoints: Checkpoints, score: Callable[[StateDict], float], model: nn.Module | None = None
) -> tuple[StateDict, list[int]]:
    """Greedy soup (Wortsman et al. 2022): rank checkpoints by `score` (higher is better,
    e.g. held-out accuracy), then add each in turn to the running average while the
    average's score does not drop. Returns the soup and the indices it holds. Every score
    must be a finite real number (a one-element tensor is read as its value): a NaN would
    rank anywhere, so it is refused, naming the checkpoint, as is None. Averaged entries
    come back in the widest of all the checkpoints' (and the model's) dtypes, the soup
    scored at each step included; integer entries are those of the last checkpoint added.
    `score` gets copies of in-memory checkpoints, so one that writes into what it is given
    changes neither the caller's state_dicts nor the soup."""
    if not callable(score):
        raise InvalidTypeError(f"greedy_soup's score must be a function of a state_dict returning a number (higher "
                               f"is better, e.g. held-out accuracy), got {type(score).__name__}")
    specs = resolve_checkpoints(checkpoints)
    stamps = [None if isinstance(spec, Mapping) else file_stamp(spec) for spec in specs]
    scores = []
    dtypes = _model_dtypes(model)
    first = None
    kept: StateDict = {}  # the model's own values a PEFT model's adapter files leave to it, before any score
    for i, (source, state) in enumerate(_states(specs, model, kept=kept)):
        _widen(dtypes, state)
        if first is None:
            first = state
        else:
            _check_layout(first, state, source)
        # a score that writes into what it is given (a load with assign=True, then update_bn or
        # training) gets a copy of an in-memory state_dict: the caller's and the soup's stay
        scored = {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()} \
            if isinstance(specs[i], Mapping) else {**state, **{k: state[k].clone() for k in kept}}
        scores.append((_real_score(score(scored), f"checkpoint {i} ({source})"), i))
    order = [i for _, i in sorted(scores, key=lambda t: -t[0])]
    best_score = scores[order[0]][0]  # the first ingredient's own score, whatever the ties
    chosen = [order[0]]
    total: dict[str, Tensor] | None = None
    last: StateDict | None = None
    for i in order:
        if stamps[i] is not None and file_stamp(specs[i]) != stamps[i]:  # scored as one state, souped as another
            raise changed_error(specs[i], "since it was scored", "build the soup")
        _, state = next(_states([specs[i]], model, warn_unmatched=False, kept=kept))  # the scoring pass warned
        if total is None:
            total = {k: _wide(v).clone() for k, v in state.items() if _averaged(v)}
            last = state
            continue
        candidate_total = {k: total[k] + _wide(state[k]) for k in total}
        candidate = _finish(candidate_total, state, 1.0 / (len(chosen) + 1), dtypes)
        candidate_score = _real_score(score(candidate), f"the soup of checkpoints {[*chosen, i]}")
        if candidate_score >= best_score:
            total, last, best_score = candidate_total, state, candidate_score
            chosen.append(i)
    return _finish(total, last, 1.0 / len(chosen), dtypes), chosen


def _real_score(value: Any, what: str) -> float:
    """`value` as a finite float, or an error naming `what` was scored: NaN compares false
    with everything, so a NaN score would silently reorder the soup."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidArgumentError(f"greedy_soup: the score of {what} is {value!r}; score must return a finite "
                                   "real number (higher is better), e.g. held-out accuracy")
    return float(value)


def split_holdout(dataset: Dataset, fraction: float = 0.1, seed: int | None = None) -> tuple[Subset, Subset]:
    """(train, held_out): a random split of `dataset`, `fraction` of it held out (an int
    `seed` reproduces it and leaves torch's global RNG untouched; None draws from the global
    RNG).

    TWA-t trains the coefficients on the training data: right for checkpoints of one run,
    where it finishes training early (the head stage) or refines SWA (the tail). TWA-v
    trains them on held-out data: right when the models already fit their training data
    (fine-tuned copies, model soups), where training loss no longer tells them apart.
    """
    if not 0.0 < real("fraction", fraction) < 1.0:
        raise InvalidArgumentError(f"fraction must be in (0, 1), got {fraction}")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__") or isinstance(dataset, Mapping):
        raise InvalidTypeError(f"split_holdout splits a map-style dataset by index, and a {type(dataset).__name__} "
                               "has no length or indexing; pass a Dataset with __getitem__ and __len__ (a "
                               "TensorDataset, a list)")
    held = max(1, round(len(dataset) * fraction))
    if held >= len(dataset):
        raise InvalidArgumentError(f"a dataset of {len(dataset)} items is too small to hold out {fraction:.0%}")
    train, held_out = random_split(dataset, [len(dataset) - held, held], generator=generator(seed))
    return train, held_out


__all__ = ["ema_average", "greedy_soup", "split_holdout", "uniform_average", "update_bn"]
