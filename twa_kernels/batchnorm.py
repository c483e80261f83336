"""Recomputing BatchNorm statistics at given weights, as torch.optim.swa_utils.update_bn
does: what every averaged or interpolated model needs before it is evaluated (TWA, the
baselines, the geometry tools)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from twa_kernels.errors import InvalidArgumentError


def running_norms(model: nn.Module) -> dict[str, nn.Module]:
    """The BatchNorm layers of `model` that keep running statistics, by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def has_running_statistics(model: nn.Module) -> bool:
    """Whether `model` holds BatchNorm running statistics, which averaged weights make stale."""
    return bool(running_norms(model))


def _feed(model: Callable[..., Any], batch: Any) -> None:
    """Run `model` on a batch as loaders give them: (inputs, targets, ...) feeds the inputs,
    a mapping of keyword arguments (transformers' batches) is unpacked."""
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise InvalidArgumentError("update_bn: the loader yielded an empty tuple; a batch is (inputs, ...), a "
                                       "mapping of keyword arguments or the inputs themselves (or pass call_fn)")
        model(batch[0])
    elif isinstance(batch, Mapping):
        model(**batch)
    else:
        model(batch)


@torch.no_grad()
def update_bn(loader: Iterable, model: nn.Module, call_fn: Callable[[nn.Module, Any], Any] | None = None,
              weights: Mapping[str, Tensor] | None = None, *, allow_empty: bool = False) -> None:
    """Recompute `model`'s BatchNorm statistics, as torch.optim.swa_utils.update_bn does:
    reset them, then one pass over `loader` in train mode with cumulative averaging
    (momentum None), so every batch counts equally. A batch that is a tuple or list feeds
    its first element, a mapping (a Hugging Face batch) its items as keyword arguments,
    unless call_fn(model, batch) is given. With `weights` (parameter
    tensors by name) the pass runs at those weights through functional_call, leaving the
    model's own parameters untouched; only its BatchNorm buffers change. A key that names
    none of the model's parameters or buffers, or a tensor of another shape, is refused
    before anything changes. Every submodule's train/eval mode is as it was after.

    A loader that yields no batches (empty, or a generator already used up) raises
    InvalidArgumentError. Then, and when the pass fails, the statistics are left as they
    were, not reset to mean 0 and variance 1 (or half-measured) as if they had been measured.
    `allow_empty` is for one rank of a distributed pass, whose share may be empty: no batches
    then leave the statistics reset with a batch count of zero, which the all-reduce of
    distributed.all_reduce_bn_statistics weighs as nothing."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    if weights is not None:
        weights = _model_weights(model, weights)
    momenta = {m: m.momentum for m in norms}
    saved = {m: {k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    modes = {m: m.training for m in model.modules()}
    model.train()
    runner = model if weights is None else _WithWeights(model, weights)
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
        for m, training in modes.items():  # model.train(flag) would set one mode on every submodule
            m.training = training


def _model_weights(model: nn.Module, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`weights` keyed by `model`'s names, each the shape of the model's tensor, or an error
    naming the first key that is not: functional_call would drop an unknown key silently
    (the statistics then measured at the model's own weights) and fail deep in a forward on
    a wrong shape."""
    if not isinstance(weights, Mapping):
        raise InvalidArgumentError(f"update_bn: weights must be a mapping of tensors by name, got "
                                   f"{type(weights).__name__}")
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    for key, value in weights.items():
        if key not in own:
            raise InvalidArgumentError(f"update_bn: weights[{key!r}] names no parameter or buffer of the model "
                                       f"(it has e.g. {list(own)[:3]}); key the weights by the model's own names "
                                       "(a DDP or torch.compile wrapper prefixes them with 'module.' or '_orig_mod.': "
                                       "pass the wrapped module, or its names)")
        if not isinstance(value, Tensor) or value.shape != own[key].shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise InvalidArgumentError(f"update_bn: weights[{key!r}] is {got} but the model's tensor has shape "
                                       f"{tuple(own[key].shape)}")
    return dict(weights)


class _WithWeights(nn.Module):
    """`module` called with fixed replacement weights (a list keeps it out of the module tree)."""

    def __init__(self, module: nn.Module, weights: dict[str, Tensor]):
        super().__init__()
        self._inner, self._weights = [module], weights

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._inner[0], self._weights, args, kwargs)


__all__ = ["update_bn"]
