"""The one progress bar: off when standard error is not a terminal, on when forced, off when False."""

from __future__ import annotations

import inspect
import io
import sys

import pytest
from tqdm import tqdm

import twa_kernels as tk
from twa_kernels import demo, fit
from twa_kernels._progress import progress_bar, progress_enabled


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("enabled, tty, shown", [(None, False, False), (None, True, True), (True, False, True),
                                                 (True, True, True), (False, True, False), (False, False, False)])
def test_progress_bar_follows_the_rule(monkeypatch, enabled, tty, shown):
    stream = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    items = [1, 2, 3]
    bar = progress_bar(items, enabled=enabled, desc="work", unit="step")
    assert list(bar) == items
    assert isinstance(bar, tqdm) is shown
    assert progress_enabled(enabled) is shown
    assert ("work" in stream.getvalue()) is shown  # the bar went to standard error, or nothing did


def test_progress_bar_off_for_a_stderr_without_isatty(monkeypatch):
    monkeypatch.setattr(sys, "stderr", object())
    assert progress_bar(range(2), desc="x") == range(2)


def test_public_progress_options_default_to_none():
    # every public progress option passes None through: bars follow the terminal rule
    functions = [tk.Subspace.from_checkpoints, tk.TWA.__init__, tk.connectivity.interpolate, tk.connectivity.plane,
                 tk.connectivity.hessian_diagonal, tk.connectivity.top_eigenvalue, tk.prune.imp,
                 tk.distill.distribution_matching, tk.distributed.build_shard, fit.run_fit, demo.run_demo]
    for function in functions:
        assert inspect.signature(function).parameters["progress"].default is None, function.__qualname__
