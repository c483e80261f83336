"""Safe checkpoint reading and writing.

Checkpoints are read with `torch.load(weights_only=True)` (.pt, .pth, .bin: a pickle that
may only hold tensors and plain containers, so a file that would run code is refused
before any of it runs) or safetensors (.safetensors). A state_dict nested under "state_dict"
or "model" is unwrapped, and the `module.` (DataParallel/DDP) and `_orig_mod.`
(torch.compile) key prefixes are stripped.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import logging
import math
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from twa_kernels.errors import CheckpointError, InvalidArgumentError
from twa_kernels._memory import drop_pages as _drop_pages  # module-level: tests and benches swap it

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_NESTING_KEYS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")

logger = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
CheckpointSpec = Union[str, os.PathLike, Mapping[str, Tensor]]
Checkpoints = Union[str, os.PathLike, Sequence[CheckpointSpec]]


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


def _strip_key(key: str) -> str:
    return next(iter(_strip_prefixes({key: None})))


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
    return unwrap_state_dict(_torch_load(path), str(path))


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused(path) from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: could not be read as a torch checkpoint ({exc})") from exc


def _refused(path: object) -> CheckpointError:
    return CheckpointError(f"{path}: refused. It holds Python objects that safe loading (weights_only=True) does "
                           "not run; if you trust it, load it yourself and re-save only model.state_dict()")


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
            raise _non_finite(source, key, int((~torch.isfinite(value)).sum()), value.numel())


def _non_finite(source: str, key: str, bad: int, numel: int) -> CheckpointError:
    return CheckpointError(f"{source}: key {key!r} holds {bad} NaN or Inf value(s) of {numel}; "
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


# -- reading ranges of a checkpoint without loading it ------------------------------------

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class ColumnReader:
    """Element ranges of one checkpoint's tensors, and column ranges of its flattened
    weights, read without holding the checkpoint in memory.

    `spec` is a state_dict (sliced in place), a .safetensors file (lazy slices through
    safe_open: the whole leading-dimension rows around a range), a torch.save file
    (torch.load(mmap=True, weights_only=True): only the pages a range touches are read) or a
    torch.distributed.checkpoint directory (DCP's own reader, one whole tensor at a time; the
    last one is kept, so reading a tensor in consecutive ranges reads it once). Keys are
    matched as load_state_dict matches them (nesting unwrapped, `module.` / `_orig_mod.`
    stripped), and a name's `aliases` (its tied names, see parameter_aliases) stand in for it.

    Memory: a mapped file's pages count in the process's resident memory once touched, and
    stay there while the mapping lives, so reading a whole checkpoint through one mapping
    would end up holding all of it. The reader gives the pages of each range back once it
    is consumed (madvise MADV_DONTNEED: the mapping is private and never written, so the
    pages are simply read again from the file if touched again). Where that is not possible
    (no madvise, a non-contiguous stored tensor, a safetensors handle), it drops its mapping
    or handle after every `resident_bytes` read and reopens it on the next read. Either
    way, reading a checkpoint range by range holds a few MB of it, not all of it. A legacy
    (non-zip) torch file cannot be mapped: it is loaded whole, with a warning.
    """

    def __init__(self, spec: CheckpointSpec, index: int = 0, *, source: str | None = None,
                 resident_bytes: int = 4 << 20):
        self.source = source or (f"checkpoint #{index}" if isinstance(spec, Mapping) else str(spec))
        self.resident_bytes = resident_bytes
        self._spec, self._kind, self._open_state = spec, "memory", None
        self._read_since_open = 0
        self._cached: tuple[str, Tensor] | None = None  # DCP: the last tensor read
        # by name (as load_state_dict names it): the key stored in the file, and (shape, dtype)
        self._raw: dict[str, str] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if isinstance(spec, Mapping):
            self._open_state = unwrap_state_dict(spec, self.source)
            self._describe(self._open_state)
        elif os.path.isdir(spec) and os.path.isfile(os.path.join(spec, ".metadata")):
            # a torch.distributed.checkpoint directory (what FSDP users save); its metadata is a
            # pickle, read by _dcp without running code, and DCP's load is handed that copy
            from twa_kernels import _dcp

            self._kind = "dcp"
            metadata = _dcp.read_metadata(spec)
            self._open_state = _dcp.CheckedReader(str(spec), metadata)
            for key, meta in _dcp.tensor_entries(metadata).items():
                name = _strip_dcp_prefix(key)
                self._raw[name], self._meta[name] = key, meta
        elif not os.path.isfile(spec):
            raise CheckpointError(f"{spec}: no such checkpoint file")
        elif str(spec).endswith(".safetensors"):
            self._kind = "safetensors"
            handle = self._handle()
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                part = handle.get_slice(key)
                shape, name = tuple(part.get_shape()), part.get_dtype()
                dtype = _SAFETENSORS_DTYPES.get(name) or (part[0:0] if shape else handle.get_tensor(key)).dtype
                self._raw[_strip_key(key)], self._meta[_strip_key(key)] = key, (shape, dtype)
        else:
            self._kind = "mmap"
            self._describe(self._handle())

    def _describe(self, tensors: Mapping[str, Tensor]) -> None:
        self._raw = {k: k for k in tensors}
        self._meta = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}

    def _handle(self) -> Any:
        """The open file: a safe_open handle, or the mmap'd tensors of a torch file."""
        if self._open_state is not None:
            return self._open_state
        if self._kind == "safetensors":
            from safetensors import safe_open

            try:
                self._open_state = safe_open(str(self._spec), framework="pt", device="cpu")
            except Exception as exc:
                raise CheckpointError(f"{self._spec}: not a readable safetensors file ({exc})") from exc
        elif not zipfile.is_zipfile(self._spec):  # a legacy torch file cannot be mapped: load it whole, once
            logger.warning("%s: not a zip-format torch file, so it cannot be read lazily; loading it whole "
                           "(re-save it with torch.save(model.state_dict()) to stream it)", self._spec)
            self._open_state, self._kind = load_state_dict(self._spec), "memory"
        else:
            try:
                obj = torch.load(self._spec, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as exc:
                raise _refused(self._spec) from exc
            except Exception as exc:
                raise CheckpointError(f"{self._spec}: could not be read as a torch checkpoint ({exc})") from exc
            self._open_state = unwrap_state_dict(obj, self.source)
        self._read_since_open = 0
        return self._open_state

    def _release(self, value: Tensor, mapped: bool) -> None:
        """A range was consumed: give its file pages back (see the class docstring)."""
        if mapped and _drop_pages(value):
            return
        if self._kind in ("safetensors", "mmap"):
            self._read_since_open += value.numel() * value.element_size()
            if self._read_since_open >= self.resident_bytes:
                self._open_state = None

    @contextlib.contextmanager
    def _range(self, name: str, a: int, b: int) -> Iterator[Tensor]:
        """Elements a..b of the flattened tensor `name` (one of keys()), in its own dtype,
        valid inside the `with` block only: its pages are given back when it ends."""
        value, mapped = self._slice(name, a, b)
        try:
            yield value
        finally:
            self._release(value, mapped)

    def keys(self) -> list[str]:
        """The names of the checkpoint's tensors (as load_state_dict would name them)."""
        return list(self._raw)

    def key(self, name: str, aliases: Sequence[str] = ()) -> str | None:
        """`name` if the checkpoint has it, else the first of its tied `aliases` it has, else None."""
        return next((n for n in (name, *aliases) if n in self._raw), None)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of tensor `key` (one of keys()), from the file's metadata alone."""
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of tensor `key`, from the file's metadata alone."""
        return self._meta[key][1]

    def _slice(self, name: str, a: int, b: int) -> tuple[Tensor, bool]:
        """(elements a..b of the flattened tensor `name`, whether they are a view of a mapped
        file); use _range, which gives the pages back."""
        (shape, dtype), key = self._meta[name], self._raw[name]
        if self._kind == "dcp":
            if self._cached is None or self._cached[0] != key:
                from twa_kernels import _dcp

                self._cached = None
                self._cached = key, _dcp.load_tensor(self._open_state, key, shape, dtype, self.source)
            return self._cached[1].reshape(-1)[a:b], False
        handle = self._handle()
        if self._kind != "safetensors":
            stored = handle[key]
            # a view of the mapping only if contiguous (reshape copies otherwise)
            return stored.reshape(-1)[a:b], self._kind == "mmap" and stored.is_contiguous()
        if not shape:
            return handle.get_tensor(key).reshape(-1)[a:b], False
        row = math.prod(shape[1:])
        r0, r1 = (a // row, -(-b // row)) if row else (0, 0)
        return handle.get_slice(key)[r0:r1].reshape(-1)[a - r0 * row: b - r0 * row], False

    def _checked_key(self, name: str, shape: Sequence[int], aliases: Sequence[str]) -> str:
        key = self.key(name, aliases)
        if key is None:
            raise CheckpointError(f"{self.source}: missing key {name!r}; was it saved from the same model?")
        got = self.shape(key)
        if got != tuple(shape):
            raise CheckpointError(f"{self.source}: key {name!r} has shape {got} but the model has {tuple(shape)}")
        if not self.dtype(key).is_floating_point:
            raise CheckpointError(f"{self.source}: key {name!r} is {self.dtype(key)}, not a floating-point weight")
        return key

    def read(self, name: str, shape: tuple[int, ...], a: int, b: int,
             aliases: Mapping[str, Sequence[str]] | None = None) -> Tensor:
        """Elements a..b of the flattened tensor `name`, as float32 (a view where it can be)."""
        key = self._checked_key(name, shape, (aliases or {}).get(name, ()))
        with self._range(key, a, b) as value:
            return value.to(torch.float32, copy=True)

    def tensor(self, name: str, aliases: Sequence[str] = ()) -> Tensor:
        """The whole tensor `name` (or a tied alias), a copy in its own dtype: for small
        entries such as BatchNorm statistics. KeyError if absent."""
        key = self.key(name, aliases)
        if key is None:
            raise KeyError(name)
        shape = self.shape(key)
        with self._range(key, 0, math.prod(shape)) as value:
            return value.clone().reshape(shape)

    def _count_non_finite(self, key: str, step: int = 1 << 20) -> int:
        n, bad = math.prod(self.shape(key)), 0
        for a in range(0, n, step):
            with self._range(key, a, min(a + step, n)) as value:
                bad += int((~torch.isfinite(value)).sum())
        return bad

    def check_finite(self, keys: Sequence[str] | None = None, *, exclude: Iterable[str] = (),
                     step: int = 1 << 20) -> None:
        """io.check_finite of the floating-point tensors `keys` (default: all but `exclude`),
        range by range."""
        skip = set(exclude)
        for key in (k for k in (self._meta if keys is None else keys) if k not in skip):
            shape, dtype = self._meta[key]
            if not dtype.is_floating_point:
                continue
            n = math.prod(shape)
            for a in range(0, n, step):
                with self._range(key, a, min(a + step, n)) as value:
                    finite = bool(torch.isfinite(value).all())
                if not finite:
                    raise _non_finite(self.source, key, self._count_non_finite(key), n)

    def columns(self, names: Sequence[str], shapes: Sequence[tuple[int, ...]], start: int, stop: int,
                aliases: Mapping[str, Sequence[str]] | None = None, out: Tensor | None = None,
                add: bool = False, check_finite: bool = True) -> Tensor:
        """Columns start..stop of the weights `names` flattened in order, checked finite (the
        error of io.check_finite) unless check_finite=False (a range read again, already
        checked: the check is most of the cost of a read from the page cache): written into
        `out` (a new float32 tensor by default), or added to it with add=True, one tensor's
        piece at a time, so the temporary memory is at most one piece."""
        if out is None:
            out = torch.empty(stop - start, dtype=torch.float32)
        if out.numel() != stop - start:
            raise InvalidArgumentError(f"out has {out.numel()} elements for columns {start}..{stop}")
        offset = 0
        for name, shape in zip(names, shapes):
            n = math.prod(shape)
            a, b = max(start, offset) - offset, min(stop, offset + n) - offset
            if a < b:
                key = self._checked_key(name, shape, (aliases or {}).get(name, ()))
                with self._range(key, a, b) as piece:
                    finite = not check_finite or bool(torch.isfinite(piece).all())
                    if finite:
                        piece = piece.to(torch.float32)  # float32 values whatever `out` is, as Subspace takes them
                        target = out[offset + a - start: offset + b - start]
                        target.add_(piece) if add else target.copy_(piece)
                if not finite:
                    raise _non_finite(self.source, name, self._count_non_finite(key), n)
            offset += n
            if offset >= stop:
                break
        return out


def _strip_dcp_prefix(key: str) -> str:
    """A DCP key without the nesting prefix of {"model": state_dict} or {"state_dict": ...}
    and the DDP / compile prefixes."""
    for nest in ("model.", "state_dict.", "model_state_dict."):
        if key.startswith(nest):
            key = key[len(nest):]
            break
    return _strip_key(key)
