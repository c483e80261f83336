"""A `twa fit` run's progress, kept between epochs so that an interrupted run resumes.

After every epoch rank 0 writes `.<output name>.twa-progress.pt` beside the output
directory: the run's fingerprint (its settings, the number of processes, the library's
version, and the path, size and modification time of each checkpoint file), the epochs done,
the coefficients, the optimizer's state, the losses so far, the SWA baseline, the states of
the global random number generators and of the generators and distributed samplers that
order the loaders' batches. The next run of the same config reads it and goes on after that
epoch, drawing the same batches the uninterrupted run would have drawn; a run with another
fingerprint (a changed setting or checkpoint) starts afresh and replaces it, with a warning.
The file is written whole or not at all (atomic_write), read with
torch.load(weights_only=True), which runs no code, and removed once the run's outputs are in
place or a FitError stopped the run in or after training.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from twa_kernels._random import seeded
from twa_kernels.errors import TWAKernelsError, warn_at_caller
from twa_kernels._outdir import fit_file_name
from twa_kernels.io import atomic_write, checkpoint_directory_files, torch_load_safely, verify_zip_crc

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
    loaders: list  # per loader, the state of each of its order sources (order_sources)


def progress_path(output: str | os.PathLike) -> Path:
    """Beside the output directory, which must hold nothing but the outputs (see _outdir.py)."""
    out = Path(output)
    return out.parent / fit_file_name(out.name, "progress.pt")


def _files(spec: str | os.PathLike) -> list[str]:
    """The files a checkpoint is read from: itself, or every file of a save_pretrained or
    torch.distributed.checkpoint directory (rewriting one leaves the directory's own stamp)."""
    if not os.path.isdir(spec):
        return [str(spec)]
    listed = checkpoint_directory_files(spec)
    if listed is not None:
        return [str(p) for p in listed]
    return sorted(str(p) for p in Path(spec).rglob("*") if p.is_file())


def _code_digests(settings: Any) -> list[list[str]]:
    """[module, digest of its source file] for each module an import string of the settings
    names (the model's, the loaders', the loss's) that is loaded from a file: a loader fixed
    between two runs makes the second a run of its own."""
    names: set[str] = set()
    todo = [settings]
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            todo.extend(value.values())
        elif isinstance(value, str) and value.count(":") == 1:
            names.add(value.split(":")[0])
    digests = []
    for name in sorted(names):
        path = getattr(sys.modules.get(name), "__file__", None)
        try:
            digests.append([name, hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]] if path else [name])
        except OSError:  # gone since it was imported: its code as imported is what runs
            digests.append([name])
    return digests


def fingerprint(settings: dict[str, Any], inputs: list, world_size: int, version: str, kernels: str = "") -> str:
    """The settings, the number of processes, the library's version, each checkpoint file's
    path, size and modification time, the source of the modules the settings import, and the
    kernels that run the ops (backend, instruction set, threads: each sums in its own order):
    a run with the same fingerprint trains the same TWA from the same files with the same code."""
    stamps = []
    for spec in inputs:
        if not isinstance(spec, (str, os.PathLike)):  # a state_dict given in memory: no file to stamp
            stamps.append([type(spec).__name__])
            continue
        for name in _files(spec):
            try:
                st = os.stat(name)
                stamps.append([name, st.st_size, st.st_mtime_ns])
            except (OSError, ValueError):  # gone since it was listed: the build will say so
                stamps.append([name])
    return json.dumps([settings, world_size, version, stamps, _code_digests(settings), kernels], sort_keys=True,
                      default=str)


def _what_differs(saved: object, run: str) -> str:
    """What a saved fingerprint and this run's differ in, in words."""
    try:
        (settings, world, version, stamps, code, kernels), now = json.loads(saved), json.loads(run)
    except (TypeError, ValueError):  # not one this version writes
        return "other settings or checkpoints"
    changed = [name for name, *digest in now[4] if [name, *digest] not in code]
    parts = [what for what, differs in (
        ("other settings", settings != now[0]),
        (f"another number of processes ({world} then, {now[1]} now)", world != now[1]),
        (f"another version of twa-kernels ({version})", version != now[2]),
        ("other checkpoint files (or files changed since)", stamps != now[3]),
        (f"other code in {', '.join(changed)}", bool(changed)),
        (f"other kernels ({kernels} then, {now[5]} now)", kernels != now[5])) if differs]
    return ", ".join(parts) or "other settings or checkpoints"


def order_sources(loader: object) -> list:
    """The torch.Generators and DistributedSamplers that set a loader's batch order, found
    where a DataLoader, its samplers and the library's loader wrappers keep them (instance
    attributes only: no user property runs). A DataLoader with persistent workers keeps
    state in its workers that no file holds."""
    found, seen, todo = [], set(), [loader]
    while todo:
        obj = todo.pop(0)
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Generator):
            found.append(obj)
            continue
        if isinstance(obj, DistributedSampler):
            found.append(obj)
        attrs = getattr(obj, "__dict__", {})
        todo += [attrs.get(name) for name in ("loader", "generator", "sampler", "batch_sampler")]
    return found


def unheld_order(loader: object) -> str | None:
    """Why the progress file may not hold all that sets `loader`'s batch order (so a resumed
    run may draw other batches than the uninterrupted one), or None where it does: a list of
    batches, or a DataLoader over a map-style data set whose samplers are torch's own."""
    while type(loader).__module__.startswith("twa_kernels.") and "loader" in vars(loader):
        loader = vars(loader)["loader"]  # the library's own wrappers (a rank's share, a batch count)
    if isinstance(loader, (list, tuple)):
        return None
    if not isinstance(loader, DataLoader):
        return f"a {type(loader).__name__}, which may keep random state of its own"
    if loader.persistent_workers:
        return "a DataLoader with persistent workers, which keep random state of their own"
    if isinstance(loader.dataset, IterableDataset):
        return "a DataLoader over an IterableDataset, which may keep random state of its own"
    if any(_is_generator(value) for value in getattr(loader.dataset, "__dict__", {}).values()):
        return f"a DataLoader over a {type(loader.dataset).__name__} that holds a random generator of its own"
    samplers, sampler = [], loader.batch_sampler
    while sampler is not None and sampler not in samplers:  # a batch sampler's sampler, and so on
        samplers.append(sampler)
        sampler = vars(sampler).get("sampler") if hasattr(sampler, "__dict__") else None
    for sampler in samplers + [loader.sampler]:
        if sampler is not None and not (type(sampler).__module__.startswith("torch.utils.data")
                                        or type(sampler).__module__.startswith("twa_kernels.")):
            return f"a DataLoader with a {type(sampler).__name__}, which may keep random state of its own"
    return None


def _numpy_random() -> Any:
    """numpy.random where numpy is imported (torch imports it when it is installed), else None."""
    return getattr(sys.modules.get("numpy"), "random", None)


@contextlib.contextmanager
def seeded_everywhere(seed: int) -> Iterator[None]:
    """torch's, Python's and numpy's global RNGs seeded with `seed` for the body (a run's
    factories and loaders draw from any of them: shuffling, augmentation), their states
    restored afterwards."""
    saved = rng_states()
    random.seed(seed)
    numpy_random = _numpy_random()
    if numpy_random is not None:
        numpy_random.seed(seed % (1 << 32))  # numpy takes seeds below 2**32
    try:
        with seeded(seed):  # torch's, CUDA's included
            yield
    finally:
        set_rng_states(saved)


def _is_generator(value: object) -> bool:
    """A torch.Generator or a numpy one (numpy.random.Generator, RandomState)."""
    if isinstance(value, torch.Generator):
        return True
    numpy_random = _numpy_random()
    return numpy_random is not None and isinstance(value, (numpy_random.Generator, numpy_random.RandomState))


def loader_states(loaders: list) -> list:
    """Per loader, each order source's state: a generator's bytes, a sampler's epoch."""
    return [[s.get_state() if isinstance(s, torch.Generator) else int(s.epoch) for s in order_sources(loader)]
            for loader in loaders]


def set_loader_states(loaders: list, states: list) -> None:
    """Put each loader's order sources back as they were after the saved epoch; a ValueError
    where the loaders are not built as they were."""
    if len(states) != len(loaders):
        raise ValueError("another set of loaders than the saved run's")
    for loader, saved in zip(loaders, states):
        sources = order_sources(loader)
        kinds = [isinstance(s, torch.Generator) for s in sources]
        if kinds != [isinstance(v, Tensor) for v in saved]:
            raise ValueError("a loader built with other generators or samplers than the saved run's")
        for source, value in zip(sources, saved):
            if isinstance(source, torch.Generator):
                source.set_state(value)
            else:
                source.set_epoch(int(value))


def rng_states(one_device: bool = False) -> dict:
    """torch's, Python's and numpy's global generator states, as tensors and numbers only
    (what torch.load(weights_only=True) reads back). CUDA's for every device, or with
    `one_device` for this process's own (a rank's, under torchrun: rank 0's file then gives
    each rank the state of its own device rather than device 0's)."""
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = dict(torch=torch.get_rng_state(), python=[version, torch.tensor(internal), gauss])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state() if one_device else torch.cuda.get_rng_state_all()
    numpy_random = _numpy_random()
    if numpy_random is not None:
        kind, keys, pos, has_gauss, cached = numpy_random.get_state()
        states["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    return states


def set_rng_states(states: dict) -> None:
    """Put back what rng_states() saved."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    if "cuda" in states and torch.cuda.is_available():
        if isinstance(states["cuda"], Tensor):
            torch.cuda.set_rng_state(states["cuda"])
        else:
            torch.cuda.set_rng_state_all(states["cuda"])
    numpy_random = _numpy_random()
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
        warn_at_caller(f"twa fit: could not write its progress to {path} ({exc}); an interrupted run will start "
                       "afresh", UserWarning)


def load(path: Path, run: str) -> Progress | None:
    """The progress of an earlier run of the same fingerprint, or None (with a warning when
    a file is there but cannot be used)."""
    if not path.is_file():
        return None
    try:
        verify_zip_crc(path)  # torch reads a flipped bit in a tensor as a valid value: a wrong point to resume at
        state = torch_load_safely(path)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("not a progress file of this version of twa-kernels")
        if state.get("fingerprint") != run:
            differs = _what_differs(state.get("fingerprint"), run)
            warn_at_caller(f"twa fit: {path} holds the progress of a run with {differs}; this run starts afresh "
                           "and replaces it", UserWarning)
            return None
        fields = {f.name: state[f.name] for f in dataclasses.fields(Progress)}
        _check_fields(fields)
        fields["losses"] = [float(v) for v in fields["losses"].tolist()]
        return Progress(**fields)
    except (OSError, KeyError, ValueError, AttributeError, TypeError, RuntimeError, TWAKernelsError) as exc:
        warn_at_caller(f"twa fit: cannot resume from {path} ({type(exc).__name__}: {exc}); this run starts afresh "
                       "and replaces it", UserWarning)
        return None


def _check_fields(fields: dict[str, Any]) -> None:
    """Raise ValueError where a field is not what save() writes: a file edited by hand (or
    by anything else) would otherwise fail later with a raw error at every rerun, or resume
    with a value no run had."""
    def integer(value: object) -> bool:
        return type(value) is int and value >= 0  # (a bool is no count of epochs or bytes)

    coefficients, losses, val_loss = fields["coefficients"], fields["losses"], fields["val_loss_at_swa"]
    problems = [
        ("epochs_done", not integer(fields["epochs_done"])),
        ("bytes_per_step", not integer(fields["bytes_per_step"])),
        ("coefficients", not (isinstance(coefficients, Tensor) and coefficients.is_floating_point())),
        # (an infinite loss with finite gradients leaves the coefficients finite: a run goes on)
        ("losses", not (isinstance(losses, Tensor) and losses.dim() == 1 and losses.is_floating_point())),
        ("val_loss_at_swa", val_loss is not None and not (type(val_loss) is float and math.isfinite(val_loss))),
        ("optimizer", not (isinstance(fields["optimizer"], dict)
                           and {"state", "param_groups"} <= fields["optimizer"].keys())),
        ("rng", not isinstance(fields["rng"], dict)),
        ("loaders", not isinstance(fields["loaders"], list)),
    ]
    wrong = [name for name, bad in problems if bad]
    if wrong:
        raise ValueError(f"its {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not what twa fit writes")


def check_saved_optimizer(saved: dict, fresh: dict, optimizer: torch.optim.Optimizer,
                          optimizer_args: dict[str, Any]) -> None:
    """ValueError where the progress file's optimizer state `saved` (beside `fresh`, the
    state_dict of `optimizer` before any step) is not one this config's run can have left:
    settings other than the config's (it would train at them unannounced), a value that is
    not finite, or state that does not step with the coefficients (which failed at the
    first step of every rerun). Tried on copies, so nothing real changes."""
    def same(a: object, b: object) -> bool:
        if isinstance(a, Tensor) or isinstance(b, Tensor):
            return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
        return type(a) is type(b) and a == b

    if not all(isinstance(group, dict) for group in saved["param_groups"]):
        raise ValueError("its optimizer's param_groups are not what twa fit writes")
    values = [v for per in saved["state"].values() if isinstance(per, dict) for v in per.values()]
    if any(isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in values):
        raise ValueError("its optimizer's state holds a value that is not finite")
    stand_ins = [p.detach().clone().requires_grad_(True) for group in optimizer.param_groups for p in group["params"]]
    for stand_in in stand_ins:
        stand_in.grad = torch.zeros_like(stand_in)
    trial = type(optimizer)(stand_ins, **optimizer_args)
    trial.load_state_dict(copy.deepcopy(saved))
    # the settings as loading leaves them: one the file lacks (a newer torch's) is torch's default
    # there, which must be the config's too
    for loaded, own in zip(trial.param_groups, fresh["param_groups"]):
        differs = [key for key in own if key != "params" and (key not in loaded or not same(loaded[key], own[key]))]
        if differs:
            raise ValueError(f"its optimizer's settings {', '.join(differs)} are not the config's")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial.step()


def remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # an unremovable file only costs the next run a fingerprint check
        pass
