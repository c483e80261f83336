"""The library's one family of errors, and the one way it warns.

Every exception twa-kernels raises on purpose derives from `TWAKernelsError` and from the
builtin it stands in for, so `except twa_kernels.TWAKernelsError` catches all of them and
existing `except ValueError` / `except OSError` code keeps working. Each message names the
problem and the fix.

Method-specific errors (FitError, PruningError, ...) live beside their method and derive
from these. Warnings go through `warn_at_caller`, so each points at the user's line. This
module imports nothing from the package: every other module may use it.
"""

from __future__ import annotations

import os
import sys
import warnings

# frames skipped when a warning looks for the user's line: the library's own, and those of the
# frameworks that call it (a module's __call__, no_grad's wrapper, a Trainer running a callback)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_FRAMEWORKS = ("torch", "lightning", "pytorch_lightning", "transformers", "accelerate", "peft")


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message, category)` located at the first frame outside twa-kernels and
    the frameworks that call it: the user's line, whichever path of the library warned.
    (Where no such frame exists, as in `twa fit`, the line that called the library.)"""
    skipped = (_PACKAGE_DIR,) + tuple(os.path.dirname(os.path.abspath(file)) + os.sep for name in _FRAMEWORKS
                                      if isinstance(file := getattr(sys.modules.get(name), "__file__", None), str))
    if sys.version_info >= (3, 12):  # Python's own way; it also skips importlib's frames as stacklevel does
        warnings.warn(message, category, skip_file_prefixes=skipped)
        return
    # stacklevel counts frames as Python does: those of the import system (a warning raised
    # while a module is imported) are passed over without being counted
    frame, level = sys._getframe(1), 2  # stacklevel 2: this function's caller
    while frame is not None and frame.f_code.co_filename.startswith(skipped):
        frame = frame.f_back
        while frame is not None and _is_import_system(frame.f_code.co_filename):
            frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)


def _is_import_system(filename: str) -> bool:
    return "importlib" in filename and "_bootstrap" in filename  # the test of Python's warnings module


class TWAKernelsError(Exception):
    """Base class of every error twa-kernels raises on purpose."""


class InvalidArgumentError(TWAKernelsError, ValueError):
    """An argument's value is not allowed: the message names it and what is allowed."""


class InvalidTypeError(TWAKernelsError, TypeError):
    """An argument has the wrong type: the message names it and the type expected."""


class BasisLayoutError(InvalidArgumentError):
    """A QuantizedBasis whose tensors do not fit its own layout (shapes, dtypes, block
    offsets): the kernels take raw pointers, so it is refused before any of them runs."""


class CheckpointError(TWAKernelsError, ValueError):
    """A checkpoint could not be read, is corrupt, or does not match the model."""


class OutputError(TWAKernelsError, OSError):
    """An output location cannot be written (a file where a directory belongs, no
    permission, a read-only or full file system)."""


class BuildError(TWAKernelsError, RuntimeError):
    """The C++ or CUDA kernels could not be compiled or loaded."""


class MissingKeyError(TWAKernelsError, KeyError):
    """A mapping lacks an entry the library needs (a basis state_dict without 'codes')."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(TWAKernelsError, RuntimeError):
    """The backend asked for cannot run these tensors (not built, wrong device, no Triton)."""


class UsageError(TWAKernelsError, RuntimeError):
    """A call made in the wrong order or state (an update before any forward, a
    distributed call before torch.distributed is initialised)."""


class ModelMethodMissingError(UsageError, AttributeError):
    """A method of the wrapped model that a wrapper hands on (a TWA's generate(),
    get_input_embeddings(), activation checkpointing), which that model lacks. Also an
    AttributeError, so `hasattr(wrapper, name)` is False where it is for the model."""


class MissingDependencyError(TWAKernelsError, ImportError):
    """An optional dependency that a call needs is not installed: the message names the
    extra that brings it (`pip install 'twa-kernels[demo]'`)."""
