"""Every exception class the package defines belongs to the one family of library errors."""

import importlib
import inspect
import pkgutil

import pytest
import torch

import twa_kernels as tk
from twa_kernels.errors import TWAKernelsError


def _package_exception_classes() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(tk.__path__, "twa_kernels."):
        if info.name.endswith("__main__") or ".triton" in info.name:
            continue  # __main__ runs the CLI; the Triton backend needs Triton (checked in its own tests)
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found.append(cls)
    return found


def test_the_package_defines_exception_classes():
    names = {cls.__name__ for cls in _package_exception_classes()}
    assert {"CheckpointError", "FitError", "BuildError", "BasisMismatchError"} <= names


@pytest.mark.parametrize("cls", _package_exception_classes(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_library_error_derives_from_the_base_and_a_builtin(cls):
    assert issubclass(cls, TWAKernelsError)
    builtin_bases = [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (object, BaseException, Exception)]
    assert builtin_bases or cls is TWAKernelsError, f"{cls.__name__} should also derive from the builtin it replaces"


def test_a_bad_argument_is_both_a_library_error_and_a_value_error():
    with pytest.raises(TWAKernelsError) as info:
        tk.quantize(torch.zeros(2, 8), bits=3)
    assert isinstance(info.value, ValueError)
