"""A `twa fit` run's progress, kept between epochs so that an interrupted run resumes.

After every epoch rank 0 writes `.<output name>.twa-progress.pt` beside the output
directory: the run's fingerprint (its settings, and each checkpoint's path, size and
modification time), the epochs done, the coefficients, the optimizer's state, the losses so
far, the SWA baseline and the states of the global random number generators. The next run
of the same config reads it and goes on after that epoch, drawing the same batches the
uninterrupted run would have drawn; a run with another fingerprint (a changed setting or
checkpoint) starts afresh and replaces it, with a warning. The file is written whole or not
at all (atomic_write), read with torch.load(weights_only=True), which runs no code, and
removed once the run's outputs are in place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from twa_kernels.errors import TWAKernelsError
from twa_kernels.io import atomic_write, torch_load_safely

_FORMAT = 1


@dataclasses.dataclass
class Progress:
    """What a run had done after `epochs_done` epochs."""

    epochs_done: int
    coefficients: Tensor
    optimizer: dict
    losses: list[float]
    val_loss_at_swa: float | None
    bytes_per_step: int
    rng: dict


def progress_path(output: str | os.PathLike) -> Path:
    """Beside the output directory, which must hold nothing but the outputs (see _outdir.py)."""
    out = Path(output)
    return out.parent / f".{out.name}.twa-progress.pt"


def fingerprint(settings: dict[str, Any], inputs: list) -> str:
    """The settings and each checkpoint's path, size and modification time: a run with the
    same fingerprint trains the same TWA from the same files."""
    stamps = []
    for spec in inputs:
        try:
            st = os.stat(spec)
            stamps.append([str(spec), st.st_size, st.st_mtime_ns])
        except (OSError, TypeError):  # a state_dict given in memory: no file to stamp
            stamps.append([type(spec).__name__])
    return json.dumps([settings, stamps], sort_keys=True, default=str)


def rng_states() -> dict:
    """torch's, Python's and numpy's global generator states, as tensors and numbers only
    (what torch.load(weights_only=True) reads back)."""
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = dict(torch=torch.get_rng_state(), python=[version, torch.tensor(internal), gauss])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    numpy_random = getattr(sys.modules.get("numpy"), "random", None)
    if numpy_random is not None:
        kind, keys, pos, has_gauss, cached = numpy_random.get_state()
        states["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy_random = getattr(sys.modules.get("numpy"), "random", None)
    if numpy_random is not None and "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        numpy_random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def save(path: Path, run: str, progress: Progress) -> None:
    """Write the progress file; a failure to write it (a full disk) is a warning, not the
    end of the run, which loses only the chance to resume."""
    state = dict(format=_FORMAT, fingerprint=run, **dataclasses.asdict(progress))
    state["losses"] = torch.tensor(progress.losses, dtype=torch.float64)
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, TWAKernelsError) as exc:
        warnings.warn(f"twa fit: could not write its progress to {path} ({exc}); an interrupted run will start "
                      "afresh", UserWarning, stacklevel=2)


def load(path: Path, run: str) -> Progress | None:
    """The progress of an earlier run of the same fingerprint, or None (with a warning when
    a file is there but cannot be used)."""
    if not path.is_file():
        return None
    try:
        state = torch_load_safely(path)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("not a progress file of this version of twa-kernels")
        if state.get("fingerprint") != run:
            warnings.warn(f"twa fit: {path} holds the progress of a run with other settings or checkpoints; this run "
                          "starts afresh and replaces it", UserWarning, stacklevel=2)
            return None
        fields = {f.name: state[f.name] for f in dataclasses.fields(Progress)}
        fields["losses"] = [float(v) for v in fields["losses"].tolist()]
        return Progress(**fields)
    except (OSError, KeyError, ValueError, AttributeError, TypeError, RuntimeError, TWAKernelsError) as exc:
        warnings.warn(f"twa fit: cannot resume from {path} ({type(exc).__name__}: {exc}); this run starts afresh "
                      "and replaces it", UserWarning, stacklevel=2)
        return None


def remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # an unremovable file only costs the next run a fingerprint check
        pass
