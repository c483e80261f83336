"""Passes that run a model in train mode for something other than training.

update_bn runs the model in train mode so that its BatchNorm layers measure their
statistics; layers that learn from the inputs they see in train mode (tk.decor's, which
sample inputs for their next update) must not take those batches as training data. The
flag is a context variable, so a pass in one thread leaves training in another alone, and
this module sits below both: the BatchNorm code sets it without knowing which layers read it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_measuring_statistics = contextvars.ContextVar("twa_kernels_measuring_statistics", default=False)


@contextlib.contextmanager
def statistics_pass() -> Iterator[None]:
    """Inside the block, train-mode forwards are a normalisation statistics pass."""
    token = _measuring_statistics.set(True)
    try:
        yield
    finally:
        _measuring_statistics.reset(token)


def in_statistics_pass() -> bool:
    """Whether the current forward belongs to a statistics pass (see statistics_pass)."""
    return _measuring_statistics.get()
