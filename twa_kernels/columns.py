"""Element ranges of a checkpoint's tensors, read without loading it (ColumnReader).

Every streaming reader of the library goes through ColumnReader: the one basis builder,
the sharded build, planes, and the frozen parameters' pinned values. It reads files as
twa_kernels.io reads them (the same formats, key matching and checks), a range at a time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import safetensors  # read as safetensors.safe_open at each call: tests swap it
from torch import Tensor

from twa_kernels._memory import drop_pages as _drop_pages  # module-level: tests and benches swap it
from twa_kernels.errors import CheckpointError, InvalidArgumentError
from twa_kernels.io import (
    CheckpointSpec,
    changed_error,
    checkpoint_directory_files,
    file_stamp,
    finite,
    is_dcp_directory,
    load_state_dict,
    model_renaming,
    torch_load_safely,
    unwrap_state_dict,
    verify_zip_crc,
)
from twa_kernels.io.files import _directory_error
from twa_kernels.io.keys import _PACKED_FLOATS, _strip_names, adapter_hint
from twa_kernels.io.read import (FileVersionCache, _non_finite_error, is_torch_zip, refuse_torch_zip_as_safetensors,
                                 zip_maps_as_stored)

logger = logging.getLogger(__name__)
# the files (at their current version) whose note that they are loaded whole was given
_LOADED_WHOLE_NOTED = FileVersionCache()

# -- reading ranges of a checkpoint without loading it ------------------------------------

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _stamp(files: Sequence[Path]) -> tuple | None:
    """Each file's io.read stamp (size, modification time, inode), or None for no files (a
    state_dict)."""
    if not files:
        return None
    stamps = []
    for path in files:
        try:
            stamps.append(file_stamp(path))
        except OSError:  # gone: a stamp no later one equals
            stamps.append((str(path), None))
    return tuple(stamps)


class ColumnReader:
    """Element ranges of one checkpoint's tensors, and column ranges of its flattened
    weights, read without holding the checkpoint in memory.

    `spec` is a state_dict (sliced in place), a .safetensors file (lazy slices through
    safe_open: the whole leading-dimension rows around a range), a torch.save file
    (torch.load(mmap=True, weights_only=True): only the pages a range touches are read) or a
    torch.distributed.checkpoint directory (DCP's own reader, one whole tensor at a time; the
    last one is kept, so reading a tensor in consecutive ranges reads it once) or a Hugging
    Face save_pretrained directory (each key read from the shard that holds it, by that
    file's own reader; no shard is read until one of its keys is). Keys are matched as io.keys
    says: rule 1 always, rule 2 with the model's `names` (given here, or
    at the first columns(), whose names are the model's parameters), and a name's
    `aliases` (its tied names, see parameter_aliases) stand in for it.

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
                 resident_bytes: int = 4 << 20, names: Iterable[str] | None = None):
        self.source = source or (f"checkpoint #{index}" if isinstance(spec, Mapping) else str(spec))
        self.resident_bytes = resident_bytes
        self._spec, self._kind, self._open_state = spec, "memory", None
        self._read_since_open = 0
        self._cached: tuple[str, Tensor] | None = None  # DCP: the last tensor read
        # by name (as load_state_dict names it): the key stored in the file, and (shape, dtype)
        self._raw: dict[str, str] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._parts: dict[str, ColumnReader] = {}  # a save_pretrained directory: the reader of each key's file
        self._matched = False
        if isinstance(spec, Mapping):
            self._open_state = unwrap_state_dict(spec, self.source)
            self._describe(self._open_state)
        elif is_dcp_directory(spec):
            # a torch.distributed.checkpoint directory (what FSDP users save); its metadata is a
            # pickle, read by _dcp without running code, and DCP's load is handed that copy.
            # _dcp imports torch.distributed.checkpoint (about a second): only a DCP read pays for it
            from twa_kernels import _dcp

            self._kind = "dcp"
            metadata = _dcp.read_metadata(spec)
            self._open_state = _dcp.CheckedReader(str(spec), metadata)
            entries = _dcp.tensor_entries(metadata)
            unwrapped = dict(_dcp.state_dict_keys(metadata))
            for name, key in _strip_names(unwrapped, self.source).items():
                self._raw[name], self._meta[name] = unwrapped[key], entries[unwrapped[key]]
            if not self._raw:
                raise CheckpointError(f"{spec}: this DCP checkpoint holds no tensors of a state_dict; save "
                                      "{'model': model.state_dict()} or model.state_dict() with "
                                      "torch.distributed.checkpoint.save")
        elif os.path.isdir(spec):
            self._open_directory(spec)
        elif not os.path.isfile(spec):
            raise CheckpointError(f"{spec}: no such checkpoint file" if not os.path.exists(spec) else
                                  f"{spec}: not a regular file (a pipe or a device?); pass a checkpoint file")
        elif str(spec).endswith(".safetensors"):
            self._kind = "safetensors"
            handle = self._handle()
            for name, key in _strip_names(handle.keys(), self.source).items():
                part = handle.get_slice(key)
                shape, stored = tuple(part.get_shape()), part.get_dtype()
                try:
                    dtype = _SAFETENSORS_DTYPES.get(stored) or (part[0:0] if shape else handle.get_tensor(key)).dtype
                except Exception as exc:  # a type safetensors stores but torch cannot view (F4: packed nibbles)
                    raise CheckpointError(f"{self.source}: key {key!r} is stored as {stored}, which cannot be read "
                                          f"as one value per element ({exc}); save the weights dequantized, as "
                                          "float32, bfloat16 or float16") from exc
                if dtype in _PACKED_FLOATS:
                    raise CheckpointError(f"{self.source}: key {key!r} is {dtype} (values packed several to a "
                                          "byte, which cannot be averaged); save the weights dequantized")
                self._raw[name], self._meta[name] = key, (shape, dtype)
            if not self._raw:  # as load_state_dict says: averaged with others, it would give an empty result
                raise CheckpointError(f"{self.source}: holds no tensors; save model.state_dict()")
        else:
            self._kind = "mmap"
            self._describe(self._handle())
        # the files read, and their size, modification time and inode now: a file written
        # while it is read (a trainer saving over last.pt) would give a mix of two states
        self._files = self._files_read()
        self.stamp = _stamp(self._files)
        if names is not None:
            self.match(names)

    def _files_read(self) -> list[Path]:
        if isinstance(self._spec, Mapping):
            return []
        if self._kind == "dcp":
            return sorted(p for p in Path(self._spec).iterdir() if p.is_file())
        if self._kind == "directory":
            return sorted({Path(part._spec) for part in self._parts.values()})
        return [Path(self._spec)]

    def check_unchanged(self) -> None:
        """CheckpointError when a file of this checkpoint changed since the reader opened it:
        what was read before and what would be read after are two states of it."""
        if self.stamp is not None and _stamp(self._files) != self.stamp:
            raise changed_error(self.source, "while it was being read", "read it")

    def _open_directory(self, spec: str | os.PathLike) -> None:
        """A save_pretrained directory: one reader per weights file, opened lazily."""
        files = checkpoint_directory_files(spec)
        if files is None:
            raise _directory_error(spec)
        self._kind = "directory"
        for path in files:
            part = ColumnReader(path, source=f"{self.source}/{path.name}", resident_bytes=self.resident_bytes)
            part._open_state = None if part._kind != "memory" else part._open_state  # reopened at its first read
            for name in part.keys():
                if name in self._parts:
                    raise CheckpointError(f"{spec}: key {name!r} is in two shards, "
                                          f"{Path(self._parts[name]._spec).name} and {path.name}; save the model "
                                          "again with save_pretrained")
                self._parts[name], self._raw[name], self._meta[name] = part, name, part._meta[name]

    def match(self, names: Iterable[str]) -> None:
        """Name the checkpoint's tensors by the model's `names` where rule 2 of the module
        docstring applies. Once: later calls change nothing."""
        if self._matched:
            return
        self._matched = True
        renaming = model_renaming(self._raw, names, self.source)
        if renaming is not None:
            self._raw = {name: self._raw[key] for name, key in renaming.items()}
            self._meta = {name: self._meta[key] for name, key in renaming.items()}

    def _describe(self, tensors: Mapping[str, Tensor]) -> None:
        self._raw = {k: k for k in tensors}
        self._meta = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}

    def _handle(self) -> Any:
        """The open file: a safe_open handle, or the mmap'd tensors of a torch file."""
        if self._open_state is not None:
            return self._open_state
        if self._kind == "safetensors":
            refuse_torch_zip_as_safetensors(self._spec)
            try:
                self._open_state = safetensors.safe_open(str(self._spec), framework="pt", device="cpu")
            except Exception as exc:
                raise CheckpointError(f"{self._spec}: not a readable safetensors file ({exc})") from exc
        elif not (is_torch_zip(self._spec) and zipfile.is_zipfile(self._spec)) or not zip_maps_as_stored(self._spec):
            # a legacy torch file, or a zip torch cannot map as it is: load it whole, once (a
            # file that is neither, or a zip cut short, is refused by the load, before the warning)
            self._open_state, self._kind = load_state_dict(self._spec), "memory"
            stamp = file_stamp(self._spec)
            if not _LOADED_WHOLE_NOTED.get(stamp[0], stamp):  # a build reads each file in several passes: said once
                _LOADED_WHOLE_NOTED.put(stamp[0], stamp, True)
                logger.warning("%s: not a zip-format torch file as torch.save writes it (a legacy file, compressed "
                               "records or another byte order), so it cannot be read lazily; loading it whole "
                               "(re-save it with torch.save(model.state_dict()) to stream it)", self._spec)
        else:
            verify_zip_crc(self._spec)
            self._open_state = unwrap_state_dict(torch_load_safely(self._spec, mmap=True), self.source)
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
        if self._kind == "directory":
            key = self._raw[name]
            with self._parts[key]._range(key, a, b) as value:
                yield value
            return
        if self._kind in ("safetensors", "mmap", "dcp"):  # read from the file now, not from memory
            self.check_unchanged()
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
                from twa_kernels import _dcp  # heavy, as above

                self._cached = None
                self._cached = key, _dcp.load_tensor(self._open_state, key, shape, dtype, self.source)
            return self._cached[1].reshape(-1)[a:b], False
        handle = self._handle()
        if self._kind != "safetensors":
            stored = handle[key]
            # a view of the mapping only if contiguous (reshape copies otherwise) and the file's
            # own storage, which torch maps as not resizable: an expanded view made whole lives
            # in a heap allocation (resizable), whose pages are not the file's to give back
            mapped = (self._kind == "mmap" and stored.is_contiguous()
                      and not stored.untyped_storage().resizable())
            return stored.reshape(-1)[a:b], mapped
        if not shape:
            return handle.get_tensor(key).reshape(-1)[a:b], False
        row = math.prod(shape[1:])
        r0, r1 = (a // row, -(-b // row)) if row else (0, 0)
        return handle.get_slice(key)[r0:r1].reshape(-1)[a - r0 * row: b - r0 * row], False

    def _checked_key(self, name: str, shape: Sequence[int], aliases: Sequence[str]) -> str:
        key = self.key(name, aliases)
        if key is None:
            keys = self.keys()
            raise CheckpointError(f"{self.source}: missing key {name!r} (it has {len(keys)} keys, e.g. {keys[:3]}); "
                                  f"{adapter_hint(name, keys, self.source) or 'was it saved from the same model?'}")
        got = self.shape(key)
        if got != tuple(shape):
            raise CheckpointError(f"{self.source}: key {name!r} has shape {got} but the model has {tuple(shape)}")
        if not self.dtype(key).is_floating_point:
            raise CheckpointError(f"{self.source}: key {name!r} is {self.dtype(key)}, not a floating-point weight")
        return key

    def read(self, name: str, shape: tuple[int, ...], a: int, b: int,
             aliases: Mapping[str, Sequence[str]] | None = None) -> Tensor:
        """Elements a..b of the flattened tensor `name`, as a new float32 tensor (always a copy)."""
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
                bad += int((~finite(value)).sum())
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
                    ok = bool(finite(value).all())
                if not ok:
                    raise _non_finite_error(self.source, key, self._count_non_finite(key), n)

    def columns(self, names: Sequence[str], shapes: Sequence[tuple[int, ...]], start: int, stop: int,
                aliases: Mapping[str, Sequence[str]] | None = None, out: Tensor | None = None,
                add: bool = False, check_finite: bool = True) -> Tensor:
        """Columns start..stop of the weights `names` flattened in order, checked finite (the
        error of io.check_finite) unless check_finite=False (a range read again, already
        checked: the check is most of the cost of a read from the page cache): written into
        `out` (a new float32 tensor by default), or added to it with add=True, one tensor's
        piece at a time, so the temporary memory is at most one piece."""
        if not self._matched:
            self.match([*names, *(a for n in names for a in (aliases or {}).get(n, ()))])
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
                    ok = not check_finite or bool(finite(piece).all())
                    if ok:
                        piece = piece.to(torch.float32)  # float32 values whatever `out` is, as Subspace takes them
                        target = out[offset + a - start: offset + b - start]
                        target.add_(piece) if add else target.copy_(piece)
                if not ok:
                    raise _non_finite_error(self.source, name, self._count_non_finite(key), n)
            offset += n
            if offset >= stop:
                break
        return out
