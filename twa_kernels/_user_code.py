"""The user's code that a config names with import strings ('package.module:name'): resolved
from the working directory, called with no arguments (the model and data factories), and
the loss called on the model's outputs. A problem is a FitError naming the config key."""

from __future__ import annotations

import importlib
import inspect
import numbers
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


from twa_kernels._fit_config import FitConfig, FitError, short


def _working_directory_on_path() -> None:
    """Import strings name the user's own modules, so they are found from the working
    directory, as `python -m` does and uvicorn and gunicorn do for theirs; an installed
    console script's sys.path starts with its bin/ folder instead."""
    cwd = os.getcwd()
    if not any(os.path.abspath(entry or os.curdir) == cwd for entry in sys.path):
        sys.path.insert(0, cwd)


def import_string(spec: str, what: str = "") -> Any:
    """The object named by 'package.module:attribute', importable from the working directory
    (`what`: the config key that gave it, named in the error)."""
    key = f"{what}: " if what else ""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise FitError(f"{key}import string {short(spec)} must look like 'package.module:name'")
    module_name, attr = spec.split(":")
    _working_directory_on_path()
    try:
        module = importlib.import_module(module_name)
    except (ImportError, TypeError, ValueError) as exc:  # a relative ('.pkg') or empty module name too
        raise FitError(f"{key}unknown import string {short(spec)}: cannot import module {short(module_name)} "
                       f"({short(str(exc))[1:-1]}); check the module's name and that it is importable from the "
                       "working directory") from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise FitError(f"{key}unknown import string {short(spec)}: module {short(module_name)} has no "
                       f"{short(attr)}; check the name after the ':'") from exc
    return obj


def callable_from(spec: str, what: str) -> Callable:
    """The callable named by the import string `spec` (`what`: the config key, for the error)."""
    obj = import_string(spec, what)
    if not callable(obj):
        raise FitError(f"{what}: {short(spec)} is {type(obj).__name__}, not callable; name a function or class")
    return obj


def resolve_import_strings(config: FitConfig) -> dict[str, Callable]:
    """Every import string of `config` resolved to its callable, keyed by its config key
    (model, data.train, data.val, loss), before any is called: a misspelt data.val is named
    before the model factory runs, which may take minutes (a download, a large model)."""
    specs = {"model": config.model, **{f"data.{key}": spec for key, spec in config.data.items()},
             "loss": config.loss}
    return {key: callable_from(spec, key) for key, spec in specs.items() if spec}


def call_factory(factory: Callable, spec: str, what: str) -> Any:
    """What `factory` (resolved from the import string `spec`) returns, called with no
    arguments, as every factory of a config is; a factory that needs some is named (its own
    TypeError would be a traceback)."""
    try:
        inspect.signature(factory).bind()
    except TypeError as exc:
        raise FitError(f"{what}: {short(spec)} cannot be called without arguments ({exc}); name a function of no "
                       "arguments, in a module of your own, that builds it as you need") from None
    except ValueError:  # no signature to read (some builtins): call it and see
        pass
    return factory()


def loss_from(obj: Callable, spec: str) -> Callable:
    """The loss that `obj` (resolved from the loss import string `spec`) names: a function of
    (outputs, targets), or an nn.Module loss class (torch.nn:CrossEntropyLoss), made with its
    defaults. `twa connect` and `twa plane` take their loss from here too."""
    if isinstance(obj, type):
        if not issubclass(obj, nn.Module):
            raise FitError(f"loss: {short(spec)} is a class, not a loss; name a function of (outputs, targets) or "
                           "an nn.Module loss class such as torch.nn:CrossEntropyLoss")
        try:
            obj = obj()
        except TypeError as exc:
            raise FitError(f"loss: {short(spec)} cannot be made without arguments ({exc}); name a function of "
                           "(outputs, targets) in your own module that builds it as you need") from exc
    if not callable(obj):
        raise FitError(f"loss: {short(spec)} is a {type(obj).__name__}, not a function of (outputs, targets)")
    try:  # found now, before the model, the data and the basis are built
        inspect.signature(obj).bind(None, None)
    except TypeError as exc:
        raise FitError(f"loss: {short(spec)} cannot be called as loss(outputs, targets) ({exc}); name a loss of "
                       "two arguments, such as torch.nn.functional:cross_entropy") from None
    except ValueError:  # no signature to read (some builtins): the first call tells
        pass
    return RunLoss(obj)


class RunLoss:
    """A run's own handle on its loss: call_loss records on it that the loss took a batch, so
    a later failure is that batch's. A module-level function (cross_entropy) that took one in
    an earlier run says nothing about this one."""

    def __init__(self, fn: Callable):
        self.fn, self.took_a_batch = fn, False

    def __call__(self, outputs: Any, targets: Any) -> Any:
        return self.fn(outputs, targets)


def call_loss(loss_fn: Callable, outputs: Any, targets: Any, spec: str) -> torch.Tensor:
    """loss_fn(outputs, targets), one number; a loss that cannot take this model's outputs and
    these targets (class labels given to a regression loss, say) is named with both shapes."""
    try:
        loss = loss_fn(outputs, targets)
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError, KeyError) as exc:
        def shape(value: Any) -> str:
            return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
        # a loss that took earlier batches takes this kind of output: this batch made it fail
        took_a_batch = isinstance(loss_fn, RunLoss) and loss_fn.took_a_batch
        if took_a_batch:
            fix = "it took earlier batches, so look at this batch's values"
        elif isinstance(exc, AttributeError) and isinstance(outputs, torch.Tensor):
            fix = (f"the model returns a tensor {shape(outputs)}, which has no such attribute: take the outputs "
                   "as they are (not .logits or .loss)")
        elif hasattr(outputs, "logits"):  # a transformers ModelOutput, say
            fix = (f"the model returns a {type(outputs).__name__}: name a loss that takes its .logits, e.g. a "
                   "function (outputs, targets) returning cross_entropy(outputs.logits, targets)")
        elif getattr(loss_fn, "fn", loss_fn) is torch.nn.functional.cross_entropy:
            fix = ("cross_entropy takes logits [batch, classes] and class labels [batch] (or logits [batch, "
                   "classes, ...] and labels [batch, ...]); name a loss that takes these")
        else:
            fix = "name a loss that takes them, such as torch.nn.functional:cross_entropy for class labels"
        raise FitError(f"loss: {short(spec)} failed on the model's outputs {shape(outputs)} and the targets "
                       f"{shape(targets)}: {type(exc).__name__}: {short(str(exc))[1:-1]}; {fix}") from exc
    if loss is None and getattr(outputs, "loss", False) is None:  # a transformers ModelOutput, say
        raise FitError(f"loss: {short(spec)} returned None; if it returns the model's outputs.loss, that is None in "
                       f"a {type(outputs).__name__} of a model called without the targets, as twa fit calls model(x): "
                       "compute the loss from outputs.logits and the targets")
    if isinstance(loss_fn, RunLoss):
        loss_fn.took_a_batch = True
    return _one_number(loss, spec)


def _one_number(loss: Any, spec: str) -> torch.Tensor:
    """The loss of one batch, which must be one number (a tensor of one element)."""
    if isinstance(loss, numbers.Number):  # float(loss), loss.item(), a NumPy number: the graph is gone
        raise FitError(f"loss: {short(spec)} returned a {type(loss).__name__}, which carries no gradient to "
                       "the coefficients; return the loss tensor itself (no float() or .item())")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise FitError(f"loss: {short(spec)} returned {short(shape)}, not one number; a loss reduced over the "
                       "batch (reduction='mean') is what the coefficients train on")
    return loss


def trainable_loss(loss: torch.Tensor, spec: str) -> torch.Tensor:
    """The loss of a training batch, which must carry the gradient back to the coefficients."""
    if not loss.requires_grad:
        raise FitError(f"loss: {short(spec)} returned a value that does not require grad, so the coefficients "
                       "cannot train on it (computed under torch.no_grad(), detached, or rebuilt with "
                       "torch.tensor(...)); return the loss computed from the outputs as they are")
    return loss
