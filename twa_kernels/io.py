"""Safe checkpoint reading and writing.

Checkpoints are read with `torch.load(weights_only=True)` (.pt, .pth, .bin: a pickle that
may only hold tensors and plain containers, so a file that would run code is refused
before any of it runs) or safetensors (.safetensors). A state_dict nested under "state_dict"
or "model" is unwrapped, and the `module.` (DataParallel/DDP) and `_orig_mod.`
(torch.compile) key prefixes are stripped.
"""

from __future__ import annotations

import glob as globlib
import os
import pickle
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_NESTING_KEYS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")

StateDict = dict[str, Tensor]
CheckpointSpec = Union[str, os.PathLike, Mapping[str, Tensor]]
Checkpoints = Union[str, os.PathLike, Sequence[CheckpointSpec]]


class CheckpointError(ValueError):
    """A checkpoint could not be read, or does not match the model."""


def _strip_prefixes(state: Mapping[str, Tensor]) -> StateDict:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> StateDict:
    """The tensors of a loaded checkpoint: nested state_dicts unwrapped, prefixes stripped."""
    for _ in range(3):
        if isinstance(obj, Mapping):
            nested = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
            if nested is None:
                break
            obj = nested
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: not a state_dict (got {type(obj).__name__}); save model.state_dict()")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{source}: holds no tensors; save model.state_dict()")
    return _strip_prefixes(tensors)


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Read one checkpoint file onto the CPU, safely (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _strip_prefixes(load_file(str(path), device="cpu"))
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused. It holds Python objects that safe loading (weights_only=True) does not run; "
            "if you trust it, load it yourself and re-save only model.state_dict()"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: could not be read as a torch checkpoint ({exc})") from exc
    return unwrap_state_dict(obj, str(path))


def resolve_checkpoints(checkpoints: Checkpoints) -> list[CheckpointSpec]:
    """A list of state_dicts and file paths from: such a list, a directory (its checkpoint
    files in name order) or a glob pattern. An empty result is an error."""
    if isinstance(checkpoints, (str, os.PathLike)):
        spec = str(checkpoints)
        if os.path.isdir(spec):
            found = sorted(p for p in Path(spec).iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
            where = f"directory {spec} has no {'/'.join(CHECKPOINT_SUFFIXES)} files"
        elif any(ch in spec for ch in "*?["):
            found = sorted(Path(p) for p in globlib.glob(spec))
            where = f"glob {spec!r} matches no files"
        else:
            found, where = [Path(spec)], ""
        if not found:
            raise CheckpointError(where)
        return list(found)
    items = list(checkpoints)
    if not items:
        raise CheckpointError("no checkpoints given")
    return items


def iter_state_dicts(checkpoints: Sequence[CheckpointSpec]) -> Iterator[tuple[str, StateDict]]:
    """(name, state_dict) for each checkpoint, loading files one at a time."""
    for i, item in enumerate(checkpoints):
        if isinstance(item, Mapping):
            yield f"checkpoint #{i}", unwrap_state_dict(item, f"checkpoint #{i}")
        else:
            yield str(item), load_state_dict(item)


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every state_dict name of each parameter of `model`, keyed by the name
    named_parameters() gives it (its first). A tied weight (an embedding shared with the
    output layer) is one tensor under several names: one row segment of a subspace, and
    every one of its names in a state_dict."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {names[0]: names for names in groups.values()}


def fill_tied_keys(state: StateDict, aliases: Mapping[str, Sequence[str]]) -> StateDict:
    """`state` with every name of a tied tensor present: a checkpoint that holds it under
    one name only (safetensors writers keep one) gets the others from it."""
    out = dict(state)
    for names in aliases.values():
        present = next((n for n in names if n in out), None)
        if present is not None:
            for name in names:
                out.setdefault(name, out[present])
    return out


def check_finite(state: Mapping[str, Tensor], source: str, keys: Sequence[str] | None = None) -> None:
    """Refuse a checkpoint whose floating-point entries (or just `keys`) hold NaN or Inf,
    naming the file and the key: averaged in, one bad value would spoil every result."""
    for key in state if keys is None else keys:
        value = state[key]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source}: key {key!r} holds {bad} NaN or Inf value(s) of {value.numel()}; "
                                  "leave this checkpoint out (a diverged step?) or repair it")


def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Write a state_dict as .safetensors or with torch.save, atomically: a crash leaves
    either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        # clone: safetensors refuses tensors that share memory (tied weights, views)
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp)
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
