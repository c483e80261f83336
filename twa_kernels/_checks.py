"""Argument checks the methods share: a number where a number belongs, a model where a
model belongs, a path the OS can take."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, TWAKernelsError


def real(name: str, value: object, *, finite: bool = True) -> float:
    """`value` as a float, or a named error: InvalidTypeError for anything but a real number
    (a bool, None or a string included), InvalidArgumentError for NaN (and, when `finite`,
    an infinity), which every range check would otherwise let through or misreport."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if math.isnan(number) or (finite and math.isinf(number)):
        raise InvalidArgumentError(f"{name} must be a finite number, got {number}")
    return number


def is_whole_number(value: object) -> bool:
    """Whether `value` is an int (numpy's included), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value: object, low: int, meaning: str = "",
            error: type[TWAKernelsError] | None = None) -> int:
    """`value` if it is an int of at least `low`: InvalidTypeError for anything but an int
    (a bool, a float such as 2.0 included), InvalidArgumentError below `low`; a method with
    an error class of its own passes it as `error`, raised for both. `meaning` says what the
    number counts, in the message."""
    said = f" ({meaning})" if meaning else ""
    if not is_whole_number(value):
        raise (error or InvalidTypeError)(f"{name} must be an int >= {low}{said}, got {type(value).__name__} "
                                          f"{value!r}")
    if value < low:
        raise (error or InvalidArgumentError)(f"{name} must be an int >= {low}{said}, got {value}")
    return int(value)


def flag(name: str, value: object) -> bool:
    """`value` if it is True or False, else InvalidTypeError: a string such as "no", or 0.5,
    would read as true and turn the option on."""
    if not isinstance(value, bool):
        raise InvalidTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def path_without_nul(path: str | os.PathLike, what: str, error: type[TWAKernelsError] = InvalidArgumentError) -> None:
    """Refuse a path holding a NUL byte, which no OS call takes (Python raises a bare
    ValueError from whichever call meets it first), naming `what` the path is for; and
    anything but a str or os.PathLike of one (InvalidTypeError)."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise InvalidTypeError(f"{what} must be a path (str or pathlib.Path), got {type(path).__name__}")
    text = os.fspath(path)
    if ("\0" if isinstance(text, str) else b"\0") in text:
        raise error(f"{what} {text!r} holds a NUL byte (\\0), which no file name can; remove it from the path")


def check_module(value: object, what: str) -> None:
    """Refuse anything but an nn.Module where `what` (e.g. "decor.update's model") belongs:
    a bare AttributeError would come from deep inside instead."""
    if not isinstance(value, nn.Module):
        raise InvalidTypeError(f"{what} must be an nn.Module, got {type(value).__name__}")


def check_batches(what: str, data: object, batches: str = "batches") -> None:
    """Refuse anything but an iterable of batches where `what` ("update_bn's loader")
    belongs: None fails in a loop deep inside, and a tensor, a string or a mapping would be
    read one element or key at a time."""
    if not isinstance(data, Iterable) or isinstance(data, (Tensor, str, Mapping)):
        raise InvalidTypeError(f"{what} must be an iterable of {batches} (a DataLoader, or a list of them), got "
                               f"{type(data).__name__}")


def check_materialized(model: nn.Module, what: str) -> None:
    """Refuse a model with a parameter or buffer that holds no values yet: one on the meta
    device, or a lazy layer's before its first forward (torch's errors for either come
    from deep inside, after other state has changed). `what` names the caller."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise InvalidArgumentError(f"{what}: the model's {name!r} is on the meta device, which holds no values to "
                                       "run; build the model on a real device (or to_empty() and load its weights)")
        if nn.parameter.is_lazy(tensor):
            raise InvalidArgumentError(f"{what}: the model's {name!r} belongs to a lazy layer, which has no shape "
                                       "until it first runs; run one forward pass of the model on a batch first")
