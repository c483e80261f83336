"""The library's one family of errors.

Every exception twa-kernels raises on purpose derives from `TWAKernelsError` and from the
builtin it stands in for, so `except twa_kernels.TWAKernelsError` catches all of them and
existing `except ValueError` / `except OSError` code keeps working. Each message names the
problem and the fix.

Method-specific errors (FitError, PruningError, ...) live beside their method and derive
from these. This module imports nothing from the package: every other module may use it.
"""

from __future__ import annotations


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
