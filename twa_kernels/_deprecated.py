"""Old import paths that keep working, each with a DeprecationWarning, until the release
after 0.1.0 removes them."""

from __future__ import annotations

import sys
import types
from typing import Any

from twa_kernels.errors import warn_at_caller


class _MovedModule(types.ModuleType):
    """Stands in sys.modules for a module that moved: every attribute read is forwarded to
    the new module, with a DeprecationWarning that names it."""

    def __init__(self, old: str, new: types.ModuleType) -> None:
        super().__init__(old, f"Moved to {new.__name__}.")
        self._new = new

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        warn_at_caller(f"{self.__name__} is deprecated: import {name!r} from {self._new.__name__}",
                       DeprecationWarning)
        return getattr(self._new, name)


def alias_module(old: str, new: types.ModuleType) -> None:
    """Make `from <old> import x` give `new.x` (warning), without binding `old`'s last part
    as an attribute of its package: registered in sys.modules only, so a package attribute of
    that name (a function, say) keeps its meaning."""
    sys.modules[old] = _MovedModule(old, new)
