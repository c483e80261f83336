"""Optional dependencies: imported where a feature starts, with an error that names the extra
to install when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from twa_kernels.errors import MissingDependencyError


def optional(name: str, extra: str, needed_by: str) -> ModuleType:
    """Import `name` from the optional extra `extra` (matplotlib, mnist1d), or raise
    MissingDependencyError saying what needs it and how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing = (exc.name or name).partition(".")[0]  # mnist1d itself needs matplotlib
        raise MissingDependencyError(
            f"{needed_by} needs {missing}, which is not installed: "
            f"pip install 'twa-kernels[{extra}]'") from exc
