"""The one progress bar of the package.

Every public function or method that can show progress takes `progress: bool | None = None`
and passes it here as `enabled`: None shows a bar only when standard error is a terminal (so
logs, pipes and CI stay free of bar redraws), True always shows one, False never does.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm

from twa_kernels.errors import InvalidTypeError


def progress_enabled(enabled: bool | None) -> bool:
    """Whether a bar shows for `enabled` (None: only when standard error is a terminal);
    anything but True, False or None is refused (progress="no" would show one)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise InvalidTypeError(f"progress must be True, False or None (a bar only on a terminal), got "
                               f"{type(enabled).__name__} {enabled!r}")
    if enabled is None:
        isatty = getattr(sys.stderr, "isatty", None)
        # a replaced stderr (a logger, a notebook capture) may lack isatty or be closed
        try:
            return bool(isatty and isatty())
        except ValueError:
            return False
    return bool(enabled)


def progress_bar(iterable: Iterable, *, enabled: bool | None = None, desc: str, total: int | None = None,
                 unit: str = "it", leave: bool = False) -> Iterable:
    """`iterable`, wrapped in a tqdm bar on standard error when `progress_enabled(enabled)`,
    else returned as it is (no tqdm object, no overhead). `leave=False` clears the bar
    when it finishes, so nested and repeated bars do not pile up."""
    if not progress_enabled(enabled):
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr)
