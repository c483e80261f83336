"""Recomputing BatchNorm statistics at given weights, as torch.optim.swa_utils.update_bn
does: what every averaged or interpolated model needs before it is evaluated (TWA, the
baselines, the geometry tools)."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from twa_kernels._checks import check_batches, check_materialized, check_module, flag
from twa_kernels._passes import kept_modes, statistics_pass
from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, warn_at_caller
from twa_kernels.io.keys import parameter_aliases


def is_norm(module: nn.Module) -> bool:
    """Whether update_bn deals with `module`: a BatchNorm layer (SyncBatchNorm included), or
    an InstanceNorm layer that tracks running statistics (torch's track none by default)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats


def holds_statistics(norm: nn.Module) -> bool:
    """Whether a norm layer holds running statistics: a layer built with them whose
    running_mean was set to None normalises with each batch's, as one built without."""
    return norm.track_running_stats and norm.running_mean is not None


def running_norms(model: nn.Module) -> dict[str, nn.Module]:
    """The norm layers of `model` (is_norm) that hold running statistics, by name."""
    return {name: m for name, m in model.named_modules() if is_norm(m) and holds_statistics(m)}


def has_running_statistics(model: nn.Module) -> bool:
    """Whether `model` holds BatchNorm (or InstanceNorm) running statistics, which averaged
    weights make stale."""
    return bool(running_norms(model))


# what update_bn's error for a batch layout the model does not take tells its caller to do
CALL_FN_FIX = ("pass call_fn, a function (model, batch) that runs the model on a batch, e.g. "
               "call_fn=lambda m, b: m(*b[:-1]) or call_fn=lambda m, b: m(b['image'])")


def feed_batch(model: Callable[..., Any], batch: Any, fix: str = CALL_FN_FIX) -> None:
    """Run `model` on a batch as loaders give them: (inputs, targets, ...) feeds the inputs
    as one argument (a mapping of them too, as `twa fit` feeds its model), a mapping of
    keyword arguments (transformers' batches) is unpacked. A TypeError of a call whose
    arguments the model's forward does not take is an InvalidArgumentError naming the
    batch's layout and `fix`, the caller's way to feed it."""
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise InvalidArgumentError("update_bn: the loader yielded an empty tuple; a batch is (inputs, ...), a "
                                       "mapping of keyword arguments or the inputs themselves (or pass call_fn)")
        args, kwargs, how = (batch[0],), {}, f"its first element alone (of a {type(batch).__name__} of {len(batch)})"
    elif isinstance(batch, Mapping):
        args, kwargs, how = (), dict(batch), f"keyword arguments {sorted(map(str, batch))[:6]}"
    else:
        args, kwargs, how = (batch,), {}, "one argument"
    with layout_named(model, args, kwargs, fix, how):
        model(*args, **kwargs)


@contextmanager
def layout_named(model: Callable[..., Any], args: tuple, kwargs: dict[str, Any], fix: str,
                 how: str | None = None) -> Iterator[None]:
    """Around a call of `model` on (args, kwargs) taken from a batch: a TypeError of a call
    whose arguments its forward does not take becomes an InvalidArgumentError naming how the
    batch was fed and `fix`; one raised inside the forward goes through as it is."""
    try:
        yield
    except TypeError as exc:
        if _takes(model, args, kwargs):
            raise  # raised inside the forward: the model's own error
        how = how or (f"keyword arguments {sorted(map(str, kwargs))[:6]}" if kwargs else "one argument")
        raise InvalidArgumentError(f"a batch was fed to the model as {how}, which its forward does not take "
                                   f"({exc}); {fix}") from exc


def _takes(model: Callable[..., Any], args: tuple, kwargs: dict) -> bool:
    """Whether the model's forward binds these arguments (True where its signature cannot be
    read: nothing then says the layout is at fault). Asked after a TypeError only, as hooks,
    decorators and a __call__ of its own may take what the signature does not."""
    try:
        signature = inspect.signature(model.forward if isinstance(model, nn.Module) else model)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return False
    return True


_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class NoBatchesError(InvalidArgumentError):
    """update_bn's loader (on every rank, across processes) yielded no batch to measure on."""


class NonFiniteStatisticsError(InvalidArgumentError):
    """update_bn measured NaN or inf statistics (a batch held NaN or inf, or the activations
    overflowed); the statistics were left as they were."""


def measured_norms(model: nn.Module, frozen_norms: Iterable[str] = ()) -> dict[str, nn.Module]:
    """The BatchNorm layers that update_bn measures, by name: those that `model.train()`
    puts in train mode and `frozen_norms` does not name (an unknown name is refused).
    Every submodule's train/eval mode is as it was after."""
    check_module(model, "measured_norms's model")
    named = {name: m for name, m in model.named_modules() if is_norm(m)}
    if isinstance(frozen_norms, Iterable) and not isinstance(frozen_norms, (str, Mapping)):
        frozen = list(frozen_norms)
    elif isinstance(frozen_norms, str):
        frozen = [frozen_norms]
    else:
        raise InvalidTypeError(f"update_bn: frozen_norms takes the names of BatchNorm layers (a list of str, or one "
                               f"str), got {type(frozen_norms).__name__}")
    unknown = [name for name in frozen if name not in named]
    if unknown:
        raise InvalidArgumentError(f"update_bn: frozen_norms names {unknown[0]!r}, which is not a norm layer "
                                   f"of the model (it has e.g. {list(named)[:3]})")
    with kept_modes(model):
        model.train()
        return {name: m for name, m in named.items() if m.training and name not in frozen}


@torch.no_grad()
def update_bn(loader: Iterable, model: nn.Module, call_fn: Callable[[nn.Module, Any], Any] | None = None,
              weights: Mapping[str, Tensor] | None = None, *, allow_empty: bool = False,
              frozen_norms: Iterable[str] = ()) -> int:
    """Recompute `model`'s BatchNorm statistics, as torch.optim.swa_utils.update_bn does:
    reset them, then one pass over `loader` in train mode with cumulative averaging
    (momentum None), so every batch counts equally. InstanceNorm layers that track running
    statistics are recomputed the same way. An input with no rows leaves a layer's
    statistics as they were rather than counting as a batch. A batch that is a tuple or
    list feeds its first element as one argument, a mapping (a Hugging Face batch) its items
    as keyword arguments, unless call_fn(model, batch) is given.
    Decorrelated layers (tk.decor) sample nothing during the pass: the inputs they hold for
    the next decor.update(), and their R, are as they were. With `weights` (tensors by
    name, in the model's dtypes and on its device; any one name of a tied weight will do)
    the model holds those weights for the pass (call_fn gets the model itself) and its own
    after, untouched; only its BatchNorm buffers change. The statistics in `weights` (a
    whole averaged state_dict holds them) of the layers the pass measures are left out:
    they are what it measures, into the model's buffers, and `weights` is not changed; a
    kept layer (below) normalises with its statistics in `weights`, if any. A key that
    names none of the model's parameters or buffers, or a tensor of another shape, dtype or
    device, is refused before anything changes. Every submodule's train/eval mode is as it
    was after.

    A BatchNorm layer that `model.train()` leaves in eval mode (a model whose train() keeps
    a frozen backbone's statistics, as detection models' norm_eval does), and the layers
    named in `frozen_norms`, run in eval mode with their statistics as they are, which the
    pass neither resets nor changes: the layers after them are measured on the activations
    the model computes when it trains.

    A loader that yields no batches (empty, or a generator already used up) raises
    InvalidArgumentError, and statistics that come out NaN or inf (a batch holding NaN or
    inf, activations that overflow) NonFiniteStatisticsError. Then, and when the pass fails,
    the statistics are left as they were, not reset to mean 0 and variance 1 (or
    half-measured) as if they had been measured.
    `allow_empty` is for one rank of a distributed pass, whose share may be empty: no batches
    then leave the statistics reset with a batch count of zero, which the all-reduce of
    distributed.all_reduce_bn_statistics weighs as nothing, and so does a layer that saw no
    rows (distributed.update_bn keeps the statistics of a layer no rank reached).

    Returns the number of batches the pass fed the model (0 where the model has no layer to
    measure: the loader is not read then)."""
    check_module(model, "update_bn's model")
    flag("update_bn's allow_empty", allow_empty)
    check_batches("update_bn's loader", loader)
    if call_fn is not None and not callable(call_fn):
        device = isinstance(call_fn, (torch.device, str))  # swa_utils.update_bn(loader, model, device)
        raise InvalidTypeError(f"update_bn's call_fn must be a callable(model, batch) or None, got "
                               f"{type(call_fn).__name__} {call_fn!r}"
                               + ("; torch.optim.swa_utils.update_bn takes a device there, this one does not: move "
                                  "the model and the batches to the device yourself" if device else ""))
    named = {name: m for name, m in model.named_modules() if is_norm(m)}
    if not named:
        for outer in (model, getattr(model, "module", None)):  # a TWA, or a DDP wrapper around one
            if callable(getattr(outer, "averaged_model", None)):  # a TWA holds its model outside its module tree
                call = "twa.update_bn(loader)" if outer is model else "wrapper.module.update_bn(loader)"
                raise InvalidTypeError(f"update_bn got a {type(model).__name__}, whose model is not one of its "
                                       f"submodules; call the TWA's own method: {call}, or "
                                       "tk.distributed.update_bn(loader, twa) across processes")
        return 0
    measured = measured_norms(model, frozen_norms)
    check_materialized(model, "update_bn")
    if weights is not None:
        weights = _model_weights(model, weights, measured)
    if not measured:  # every layer keeps its statistics
        return 0
    with kept_modes(model):  # model.train(flag) sets one mode on every submodule
        return _measure(loader, model, call_fn, weights, named, measured, allow_empty)


def _measure(loader: Iterable, model: nn.Module, call_fn: Callable[[nn.Module, Any], Any] | None,
             weights: Mapping[str, Tensor] | None, named: Mapping[str, nn.Module],
             measured: Mapping[str, nn.Module], allow_empty: bool) -> int:
    """update_bn's pass over `loader`, its arguments checked; the caller restores the modes."""
    model.train()
    for name, m in named.items():  # the kept layers normalise with their statistics, as in training
        if name not in measured:
            m.train(False)
    # A SyncBatchNorm layer takes this process's batches alone, as BatchNorm does: its
    # forward in train mode would join a collective once per batch, which ranks with uneven
    # shares never pair up; distributed.all_reduce_bn_statistics merges the ranks after.
    local = [m for m in measured.values() if isinstance(m, nn.SyncBatchNorm) and "forward" not in vars(m)]
    for m in local:
        m.forward = types.MethodType(nn.modules.batchnorm._BatchNorm.forward, m)
    norms = [m for m in measured.values() if holds_statistics(m)]
    momenta = {m: m.momentum for m in norms}
    # every measured layer's buffers: one without statistics (running_mean set to None) still
    # counts its batches in train mode, which the pass must not leave changed
    saved = {m: {k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in measured.values()}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    hooks = [h for m in norms for h in _count_batches(m)]
    count = 0
    try:
        # layers that learn from train-mode inputs (tk.decor's) leave these alone
        with statistics_pass(), batch_of_one_named("update_bn"), _holding(model, weights or {}):
            for batch in loader:
                if call_fn is not None:
                    call_fn(model, batch)
                else:
                    feed_batch(model, batch)
                count += 1
        if count == 0 and not allow_empty:
            fix = ("it is an iterator (a generator?), which an earlier pass may have used up: pass a re-iterable "
                   "such as a list or a DataLoader" if isinstance(loader, Iterator) else "pass a non-empty loader")
            raise NoBatchesError(f"update_bn: the loader yielded no batches, so there are no statistics to "
                                       f"measure (they are left as they were); {fix}")
        # a layer the pass never reached (used by a training_step, not by forward) was reset
        # and measured nothing: it keeps its statistics, and the caller is told how to reach it.
        # One rank of a distributed pass (allow_empty) leaves it reset with a count of 0, which
        # the all-reduce weighs as nothing; distributed.update_bn keeps the statistics of a
        # layer that no rank reached.
        unreached = {name: m for name, m in measured.items() if holds_statistics(m) and count
                     and int(m.num_batches_tracked) == 0 and not allow_empty}
        for m in [*unreached.values(), *(m for m in measured.values() if not holds_statistics(m))]:
            _restore(m, saved[m])
        # one NaN or inf anywhere in one batch makes a layer's statistics NaN, and every
        # output of the model after it: refused, the statistics left as they were
        if broken := [name for name, m in measured.items() if holds_statistics(m) and name not in unreached
                      and not all(bool(torch.isfinite(b).all()) for b in (m.running_mean, m.running_var))]:
            raise NonFiniteStatisticsError(
                f"update_bn: the statistics measured for the norm layer(s) {broken[:5]} are not finite (NaN or "
                "inf), so every output after them would be too; they are left as they were. A batch holds NaN or "
                "inf values, or the model's weights or activations overflow (in 16-bit?): check the batches with "
                "torch.isfinite, and the weights the pass ran at")
        if unreached:
            warn_unreached(list(unreached), count)
    except BaseException:
        for m in measured.values():  # no batch, or a failure mid-pass: the old statistics, not reset or partial ones
            _restore(m, saved[m])
        raise
    finally:
        for hook in hooks:
            hook.remove()
        for m in local:
            del m.forward
        for m in norms:
            m.momentum = momenta[m]
    return count


def _restore(norm: nn.Module, buffers: Mapping[str, Tensor]) -> None:
    for k, b in buffers.items():
        getattr(norm, k).copy_(b)


def warn_unreached(names: list[str], count: int) -> None:
    """Name the norm layers a pass over `count` batches never reached, which keep the
    statistics they had."""
    warn_at_caller(f"update_bn: the norm layer(s) {names[:5]} saw none of the {count} batches (the pass runs the "
                   "model's forward, which does not reach them, or reaches them with no rows), so they keep the "
                   "statistics they had; pass call_fn(model, batch) that runs the model as it trains (for the "
                   "Lightning callback, update_bn=function(module, batch))", RuntimeWarning)


@contextmanager
def batch_of_one_named(what: str) -> Iterator[None]:
    """torch's bare ValueError for a batch of one example in a train-mode BatchNorm layer,
    as the library's error naming the fix."""
    try:
        yield
    except ValueError as exc:
        if "Expected more than 1 value per channel" not in str(exc):
            raise
        raise InvalidArgumentError(
            f"{what}: a batch of one example reached a BatchNorm layer in train mode, which cannot normalise one "
            "value per channel; use batches of two or more (DataLoader(..., drop_last=True) leaves out a last "
            "batch of one)") from exc


def _model_weights(model: nn.Module, weights: Mapping[str, Tensor], norms: Mapping[str, nn.Module]
                   ) -> dict[str, Tensor]:
    """`weights` keyed by `model`'s names, each of the model's tensor's shape, dtype and
    device, or an error naming the first key that is not (an unknown key would leave the
    model's own tensor in place, the statistics then measured at its weights). Every name
    of a tied weight gets the value given for any of them (copies given under two names
    must agree). The statistics of the `norms` measured are left out: held by the model
    during the pass they would be what it updates, from their own batch count on, and the
    model's reset ones would stay unmeasured. A kept layer's are used as given."""
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
        if value.is_meta or value.device != own[key].device or value.dtype != own[key].dtype:
            raise InvalidArgumentError(f"update_bn: weights[{key!r}] is {value.dtype} on {value.device} but the "
                                       f"model's tensor is {own[key].dtype} on {own[key].device}; pass weights with "
                                       f"values, in the model's dtypes and on its device (value.to(...))")
    measured = set(norms.values())  # every name of each: a layer registered twice has its statistics under both
    statistics = {f"{name}.{stat}" if name else stat for name, m in model.named_modules(remove_duplicate=False)
                  if m in measured for stat in _STATISTICS}
    held = {key: value for key, value in weights.items() if key not in statistics}
    for names in parameter_aliases(model).values():
        given = [name for name in names if name in held]
        if len(names) < 2 or not given:
            continue
        for name in given[1:]:
            if not torch.equal(held[name], held[given[0]]):
                raise InvalidArgumentError(f"update_bn: weights[{given[0]!r}] and weights[{name!r}] differ, but the "
                                           "model ties them (one tensor); give one value for the tied weight")
        held.update(dict.fromkeys(names, held[given[0]]))
    return held


def _count_batches(norm: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that make `norm`'s pass a cumulative average over the inputs that have rows:
    an input with none (an empty batch, or a branch no example took) leaves the layer's
    statistics as they were, where BatchNorm would count it as a batch of mean 0. An
    InstanceNorm layer reads momentum None as 0 and would not update at all: the hooks
    count its batches and give the k-th the weight 1 / k."""
    before: list[dict[str, Tensor]] = []
    instance = isinstance(norm, nn.modules.instancenorm._InstanceNorm)

    def pre(module: nn.Module, args: tuple) -> None:
        empty = bool(args) and isinstance(args[0], Tensor) and args[0].numel() == 0
        before.append({k: b.clone() for k, b in module.named_buffers(recurse=False)} if empty else {})
        if instance and not empty:
            module.num_batches_tracked += 1
            module.momentum = 1.0 / float(module.num_batches_tracked)

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        for k, b in before.pop().items():
            getattr(module, k).copy_(b)

    return [norm.register_forward_pre_hook(pre), norm.register_forward_hook(post)]


@contextmanager
def _holding(model: nn.Module, weights: Mapping[str, Tensor]) -> Iterator[None]:
    """`model` holding `weights` in its parameter and buffer slots for the block, its own
    tensors put back after, so that call_fn gets the model itself (functional_call would
    hand it a wrapper) and activation checkpointing reruns at the same weights."""
    slots = []
    try:
        for name, value in weights.items():
            prefix, _, attr = name.rpartition(".")
            module = model.get_submodule(prefix)
            table = module._parameters if attr in module._parameters else module._buffers
            slots.append((table, attr, table[attr]))
            table[attr] = value
        yield
    finally:
        for table, attr, own in reversed(slots):
            table[attr] = own


__all__ = ["NoBatchesError", "NonFiniteStatisticsError", "measured_norms", "update_bn"]
