"""Passes that run a model in train mode for something other than training.

update_bn runs the model in train mode so that its BatchNorm layers measure their
statistics; layers that learn from the inputs they see in train mode (tk.decor's, which
sample inputs for their next update) must not take those batches as training data. This
module sits below both, so the BatchNorm code marks the pass without knowing which layers
read the mark.

The mark is a module-level flag, process-wide: torch.compile guards on a module global
(a context variable or a thread-local would break its graph at every layer that reads it),
and a flag, unlike the count of open passes, gives it two states to compile for. A
statistics pass in one thread therefore also pauses such layers in another thread's
training while it runs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import nn

_open_passes = 0
_measuring = False  # _open_passes > 0, the one value a compiled forward reads
_lock = threading.Lock()


@contextlib.contextmanager
def statistics_pass() -> Iterator[None]:
    """Inside the block, train-mode forwards are a normalisation statistics pass."""
    global _open_passes, _measuring
    with _lock:
        _open_passes += 1
        _measuring = True
    try:
        yield
    finally:
        with _lock:
            _open_passes -= 1
            _measuring = _open_passes > 0


def in_statistics_pass() -> bool:
    """Whether a statistics pass (see statistics_pass) is running."""
    return _measuring


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Every submodule's train/eval mode as it was before the block, after it: a pass puts
    the model in train or eval mode, and model.train(flag) sets one mode on every
    submodule, which would undo a layer the model keeps in eval mode (a frozen BatchNorm)."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
