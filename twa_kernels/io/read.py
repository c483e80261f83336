"""Reading checkpoints safely: no code in a file runs, and damage is refused where the format can show it.

.pt, .pth, .bin, .ckpt and .pth.tar files are read by torch.load(weights_only=True): a
pickle that may only hold tensors and plain containers, so a file that would run code is
refused before any of it runs. An argparse.Namespace saved beside the weights (torchvision's
and timm's training scripts save their arguments so) is read as plain data; any other
Python object is refused. Every record of a zip-format file is checked against its CRC-32
first. .safetensors files are read by safetensors. Keys are then matched as io.keys says.
A .safetensors file and a legacy (not zip) torch file store no checksum, so a flipped bit
in their tensor data reads as a valid value; damage to their structure is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pickle
import re
import struct
import sys
import threading
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import safetensors.torch  # read as safetensors.torch.<name> at each call: tests swap them
import torch
from torch import Tensor

try:  # the same CRC-32 as zlib's, several times faster where zlib has no folded-multiply path
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; a vendored install may lack it
    from zlib import crc32 as _crc32

from twa_kernels._checks import path_without_nul
from twa_kernels.errors import CheckpointError, InvalidTypeError
from twa_kernels.io.files import CheckpointSpec, _directory_error, checkpoint_directory_files, is_dcp_directory
from twa_kernels.io.keys import StateDict, _not_dense_values, _strip_prefixes, match_names, unwrap_state_dict

ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of a zip archive's first record

# Python objects that a training script saves beside its weights and that safe loading may
# build as plain data (no code of theirs runs: a Namespace is an object with attributes)
_PLAIN_OBJECTS = (argparse.Namespace,)


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Read one checkpoint (a file or a save_pretrained directory) onto the CPU, safely (see
    the module docstring)."""
    if isinstance(path, (list, tuple)):
        raise InvalidTypeError(f"load_state_dict reads one checkpoint, got a {type(path).__name__}; for several, "
                               "iterate over them, or use twa_kernels.io.iter_state_dicts(checkpoints)")
    if isinstance(path, Mapping):
        raise InvalidTypeError("load_state_dict reads a checkpoint from its path, and got a mapping: a state_dict "
                               "is loaded already; use it as it is")
    path_without_nul(path, "the checkpoint path", CheckpointError)
    if not os.fspath(path):
        raise CheckpointError("the checkpoint path is empty; pass the file or directory to read")
    path = Path(path)
    if path.is_dir():
        files = checkpoint_directory_files(path)
        if files is None and is_dcp_directory(path):
            raise CheckpointError(
                f"{path}: a torch.distributed.checkpoint directory is read column by column, by tk.TWA only (in "
                "one process or over a process group); for the averaging baselines and other readers, convert it "
                "once with torch.distributed.checkpoint.format_utils.dcp_to_torch_save and pass the file")
        if files is None:
            raise _directory_error(path)
        if len(files) == 1:
            return load_state_dict(files[0])
        state: StateDict = {}
        where: dict[str, Path] = {}
        for shard in files:
            for key, value in load_state_dict(shard).items():
                if key in state:
                    raise CheckpointError(f"{path}: key {key!r} is in two shards, {where[key].name} and "
                                          f"{shard.name}; save the model again with save_pretrained")
                state[key], where[key] = value, shard
        return state
    if not path.is_file():
        if os.path.islink(path) and not os.path.exists(path):  # exists() follows the link
            raise CheckpointError(f"{path}: a symbolic link to nothing (its target is missing, or it loops); point "
                                  "it at the checkpoint file")
        raise CheckpointError(f"{path}: no such checkpoint file" if not os.path.exists(path) else
                              f"{path}: not a regular file (a pipe or a device?); pass a checkpoint file")
    if path.suffix == ".safetensors":
        refuse_torch_zip_as_safetensors(path)
        try:
            tensors = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
        if not tensors:  # as for a torch file: averaged with others, it would give an empty result
            raise CheckpointError(f"{path}: holds no tensors; save model.state_dict()")
        for key, value in tensors.items():
            if kind := _not_dense_values(value):
                raise CheckpointError(f"{path}: key {key!r} is {kind}")
        return _strip_prefixes(tensors, str(path))
    return unwrap_state_dict(_torch_load(path), str(path))


class FileVersionCache:
    """What a check once found about a file, kept for the file's current version only: an
    entry is stored under the file's real path with the version's stamp, a new version
    replaces it, and beyond `paths` files the least recently used is dropped. A process that
    reads a file a trainer keeps rewriting (last.pt), or many files, keeps a bounded record."""

    def __init__(self, paths: int = 1024):
        self._entries: OrderedDict[str, tuple[object, object]] = OrderedDict()
        self._paths = paths
        self._lock = threading.Lock()  # (readers may run in several threads)

    def get(self, path: str, stamp: object) -> object | None:
        """The entry stored for `path` at version `stamp`, or None."""
        with self._lock:
            entry = self._entries.get(path)
            if entry is None or entry[0] != stamp:
                return None
            self._entries.move_to_end(path)
            return entry[1]

    def put(self, path: str, stamp: object, value: object) -> None:
        with self._lock:
            self._entries[path] = (stamp, value)
            self._entries.move_to_end(path)
            while len(self._entries) > self._paths:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


# Files whose CRC-32s were verified in this process, with the size of each record's data:
# {record name: bytes}; and files whose storages were found to be their records
# (_check_storage_records). Each is keyed by _checked_stamp.
_VERIFIED = FileVersionCache()
_RECORDS_CHECKED = FileVersionCache()


def file_stamp(path: str | os.PathLike) -> tuple[str, int, int, int]:
    """A file's identity and modification stamp: a file seen before and unchanged since."""
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino


def changed_error(source: object, when: str, fix: str) -> CheckpointError:
    """The error for a checkpoint whose file_stamp moved between two reads of one job (a
    file still being written, or replaced): `when` says between which, `fix` what to do."""
    return CheckpointError(f"{source}: changed {when} (its size, modification time or inode moved); {fix} once it "
                           "is no longer being written, or from a copy")


def _checked_stamp(path: str | os.PathLike) -> tuple[str, int, int, int, int]:
    """file_stamp and the change time, which no program can set back: the key of a check
    done once per file (a copy that restores the modification time, `rsync --inplace -t`,
    leaves size, mtime and inode as they were). Not for telling a rewrite apart from a file
    whose metadata changed (a chmod moves the change time too)."""
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns


def verify_zip_crc(path: str | os.PathLike) -> dict[str, int]:
    """Check every record of a zip-format torch file against its stored CRC-32. torch's
    own zip reader never checks them, so a flipped bit in a tensor's data would otherwise
    be read as a valid weight. Stored records are read 256 KB at a time into one buffer and
    summed there (a mapping would count each stretch's pages in the process's resident
    memory until they are given back: up to a whole record at every open); zlib-ng's
    CRC-32 runs at several GB/s. Each file is checked once per process unless it changes.
    Raises CheckpointError naming the record. Returns each record's size: {name: bytes}."""
    stamp = _checked_stamp(path)
    if (verified := _VERIFIED.get(stamp[0], stamp)) is not None:
        return verified  # type: ignore[return-value]
    spans: dict[str, int] = {}
    # records are summed through this buffer: no mapping's pages pile up, and at 256 KB a
    # call's overhead is far below zlib-ng's time for the bytes
    buffer = bytearray(1 << 18)
    try:
        with open(path, "rb") as file, zipfile.ZipFile(file) as archive:
            size = os.fstat(file.fileno()).st_size
            for info in archive.infolist():
                if info.filename in spans:  # torch reads the first copy of a name and zipfile the last
                    raise zipfile.BadZipFile(f"record {info.filename!r} is in the archive twice")
                spans[info.filename] = info.file_size
                if info.compress_type != zipfile.ZIP_STORED:  # not what torch writes: let zipfile check it
                    with archive.open(info) as record:
                        while record.read(len(buffer)):
                            pass
                    continue
                head = info.header_offset
                header = os.pread(file.fileno(), 30, head)
                if header[:4] != b"PK\x03\x04":
                    raise zipfile.BadZipFile(f"record {info.filename!r} has no local header")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                start = head + 30 + name_len + extra_len
                end = start + info.compress_size
                if end > size:
                    raise zipfile.BadZipFile(f"record {info.filename!r} runs past the end of the file")
                crc, view = 0, memoryview(buffer)
                for a in range(start, end, len(buffer)):
                    got = os.preadv(file.fileno(), [view[:min(end - a, len(buffer))]], a)
                    if got <= 0:
                        raise zipfile.BadZipFile(f"record {info.filename!r} is cut short")
                    crc = _crc32(view[:got], crc)
                    if got < min(end - a, len(buffer)):
                        raise zipfile.BadZipFile(f"record {info.filename!r} is cut short")
                if crc != info.CRC:
                    raise zipfile.BadZipFile(f"Bad CRC-32 for record {info.filename!r}")
    except (zipfile.BadZipFile, ValueError, OSError, struct.error) as exc:
        raise CheckpointError(f"{path}: corrupt ({exc}); the file was damaged after it was written: "
                              "restore it from a good copy or save it again") from exc
    _VERIFIED.put(stamp[0], stamp, spans)
    return spans


def _torch_load(path: Path) -> object:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:  # no permission, or not a regular file that can be read
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions") from exc
    if head == ZIP_MAGIC:  # torch.load tells its two formats apart by the first bytes too
        if not zipfile.is_zipfile(path):  # a zip's first record, but no directory at its end
            raise CheckpointError(f"{path}: cut short: it starts as a zip archive (a torch.save file) but its end, "
                                  "the zip directory, is missing; the file was not fully written or copied: "
                                  "restore it from a good copy or save it again")
        verify_zip_crc(path)
    elif not head.startswith(b"\x80"):  # a legacy torch file is a pickle, which starts with PROTO
        raise CheckpointError(f"{path}: not a checkpoint at all: neither a torch zip archive nor a pickle "
                              f"(it starts with {head!r}); check the path, or that the file was fully copied")
    return torch_load_safely(path)


def refuse_torch_zip_as_safetensors(path: str | os.PathLike) -> None:
    """Name a torch.save file given a .safetensors name, which the safetensors reader would
    call a bad header."""
    if is_torch_zip(path):
        raise CheckpointError(f"{path}: a torch.save file named .safetensors; rename it to .pt, or save it with "
                              "tk.save_state_dict(state, path), which writes the format its suffix names")


def is_torch_zip(path: str | os.PathLike) -> bool:
    """Whether a file is in torch.save's zip format, told as torch.load tells it: by its
    first record's signature. zipfile.is_zipfile looks for a zip directory near the end,
    which the tensor bytes of a legacy (pickle) torch file may happen to hold."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == ZIP_MAGIC
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions") from exc


def torch_load_safely(path: str | os.PathLike, *, mmap: bool = False) -> object:
    """torch.load(weights_only=True) onto the CPU, with an argparse.Namespace admitted as
    plain data; a file holding any other Python object is refused (CheckpointError) before
    any of its code runs."""
    # torch >= 2.5 scopes an allowance to a block (2.4 reads such a file as refused); one
    # the caller made already is left alone, since leaving the block would take it away
    allowed = getattr(torch.serialization, "safe_globals", None)
    made = set(torch.serialization.get_safe_globals()) if allowed else set()
    extra = [obj for obj in _PLAIN_OBJECTS if obj not in made]
    try:
        with allowed(extra) if allowed and extra else contextlib.nullcontext():
            if mmap:
                _check_storage_records(path)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise _refused(path) from exc
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: could not be read as a torch checkpoint ({exc}); the file is truncated or "
                              "corrupt, or not a checkpoint: restore it from a good copy or save it again") from exc


class _Inert:
    """What the storage scan builds for every global a pickle names: no code of the file's
    runs, whatever it calls, builds or appends to."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass


class _StorageScan(pickle.Unpickler):
    """Reads a torch pickle only for the storages it declares: (key, storage class name,
    element count) for each. Every global becomes an inert class of its name."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, encoding="utf-8")
        self.declared: list[tuple[str, str, int]] = []

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Inert,), {"_module": module})

    def persistent_load(self, pid: object) -> _Inert:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], type)
                and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        self.declared.append((str(pid[2]), pid[1].__name__, pid[4]))
        return _Inert()


def _storage_dtype(path: str | os.PathLike, kind: str) -> torch.dtype:
    """The dtype of torch's storage class `kind` (FloatStorage: float32), as torch.load finds it."""
    if kind == "UntypedStorage":
        return torch.uint8
    storage = getattr(torch, kind, None) if kind.endswith("Storage") and not kind.startswith("_") else None
    with warnings.catch_warnings():  # a typed storage class warns that it is deprecated when asked
        warnings.simplefilter("ignore")
        dtype = getattr(storage, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{path}: damaged, or not a torch checkpoint (its pickle declares a storage of "
                              f"unknown type {kind!r}); restore the file or save it again")
    return dtype


def zip_maps_as_stored(path: str | os.PathLike) -> bool:
    """Whether a zip torch file's records can be mapped and read in place, as torch.save
    writes them: every record stored uncompressed, in this machine's byte order. torch reads
    a compressed record or a foreign byte order correctly only when it loads the file whole:
    a mapping would hand out the compressed bytes, or byte-swap pages that are then dropped
    and read again unswapped (see _memory.drop_pages)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist()):
                return False
            order = next((n for n in archive.namelist() if n.endswith("/byteorder")), None)
            return order is None or archive.read(order).decode("ascii", "replace").strip() == sys.byteorder
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: damaged, or not a torch checkpoint ({exc}); restore the file or save it "
                              "again with torch.save(model.state_dict(), path)") from exc


def _check_storage_records(path: str | os.PathLike) -> None:
    """Refuse a zip torch file where a storage its pickle declares is not exactly one of its
    data records. A mapped load (torch.load(mmap=True)) takes the size from the pickle and
    never compares it with the record's, so a pickle that declares more bytes would have the
    next records' bytes read as weights; the plain load refuses that, and so does this, before
    the file is mapped. Only the pickle is read, and none of its globals is looked up. Each
    file is checked once per process unless it changes."""
    spans = verify_zip_crc(path)
    stamp = _checked_stamp(path)
    if _RECORDS_CHECKED.get(stamp[0], stamp):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            # torch names the records after the first one's folder: <folder>/data.pkl, <folder>/data/<key>
            names = archive.namelist()
            prefix = names[0].split("/")[0] + "/" if names else ""
            if prefix + "data.pkl" not in spans:
                raise zipfile.BadZipFile(f"it has no {prefix}data.pkl record")
            scan = _StorageScan(io.BytesIO(archive.read(prefix + "data.pkl")))
            scan.load()
    except Exception as exc:  # whatever a damaged pickle makes the scan trip on
        raise CheckpointError(f"{path}: damaged, or not a torch checkpoint ({exc}); restore the file or save it "
                              "again with torch.save(model.state_dict(), path)") from exc
    for key, kind, numel in scan.declared:
        declared = numel * _storage_dtype(path, kind).itemsize
        held = spans.get(f"{prefix}data/{key}")
        if held != declared:
            holds = "is missing" if held is None else f"holds {held} bytes"
            raise CheckpointError(f"{path}: corrupt (its pickle declares {declared} bytes for storage {key!r}, whose "
                                  f"record {holds}); the file was damaged or altered after it was written: "
                                  "restore it from a good copy or save it again")
    _RECORDS_CHECKED.put(stamp[0], stamp, True)


def _names_a_missing_global(name: str) -> bool:
    """Whether `name` (module.attribute) cannot be found among the modules already imported:
    a pickle cut short inside a name ("torch.FloatSt"). Nothing is imported to find out."""
    module, _, attribute = name.rpartition(".")
    return module in sys.modules and not hasattr(sys.modules[module], attribute.split(".")[0])


# torch.save's legacy (non-zip) format opens with this number, pickled as a LONG1 opcode
_LEGACY_TORCH_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _pickle_protocol(path: object) -> tuple[int, str] | None:
    """(protocol, kind) of a file whose pickle is of protocol 4 or 5, which torch's safe
    loader cannot read, else None. kind: "zip" (torch.save's format, its data.pkl),
    "legacy" (torch.save's legacy format) or "plain" (pickle.dump's)."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            kind = "plain"
            if head.startswith(b"PK\x03\x04"):  # torch.save's zip: the pickle is its data.pkl record
                kind = "zip"
                f.seek(0)
                with zipfile.ZipFile(f) as archive:
                    pickles = [n for n in archive.namelist() if n.rpartition("/")[2] == "data.pkl"]
                    if len(pickles) != 1:
                        return None
                    with archive.open(pickles[0]) as record:
                        head = record.read(2)
    except (OSError, TypeError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError):
        return None  # a file-like object, gone since, or a damaged zip: the caller's message says so
    if len(head) < 2 or head[0] != 0x80 or head[1] not in (4, 5):
        return None
    return head[1], ("legacy" if kind == "plain" and _LEGACY_TORCH_MAGIC in head else kind)


def _refused(path: object) -> CheckpointError:
    # raised while torch's refusal is handled: its message names the global it refused, or
    # what its unpickler could not read
    message = re.sub(r"\s+", " ", str(sys.exc_info()[1] or ""))
    found = re.search(r"GLOBAL (\S+)", message)
    if found is None and (opened := _pickle_protocol(path)) is not None:
        # torch's safe unpickler stops at the first frame of protocol 4 and 5, before any
        # global it would refuse: the file is whole, and what it holds was not run
        protocol, kind = opened
        what = {"zip": f"a torch.save file saved at pickle_protocol={protocol}",
                "legacy": f"a torch.save file in the legacy format at pickle_protocol={protocol}",
                "plain": f"a plain Python pickle (protocol {protocol}, as pickle.dump writes it), not a torch.save "
                         "file"}[kind]
        return CheckpointError(f"{path}: refused. It is {what}, which safe loading (weights_only=True) does not "
                               "read; if you trust it, load it yourself and re-save the state_dict with "
                               "torch.save(state_dict, path) at its default settings, or tk.save_state_dict")
    if found is None or _names_a_missing_global(found.group(1)):
        detail = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", message)
        why = found.group(1) + " does not exist" if found else (detail.group(1) if detail else "unreadable pickle")
        return CheckpointError(f"{path}: damaged, or not a torch checkpoint: its pickle could not be read ({why}); "
                               "restore the file or save it again with torch.save(model.state_dict(), path)")
    what = f" ({found.group(1)})"
    if str(path).endswith(".ckpt"):
        # Lightning stores hyper_parameters and callback states beside the weights; a class
        # among them (a dataclass, a config object) is a Python object that safe loading refuses
        return CheckpointError(
            f"{path}: refused. This Lightning checkpoint holds Python objects{what} beside its weights (its "
            "hyper_parameters or callback states), which safe loading (weights_only=True) does not run. Call "
            "save_hyperparameters() with plain values (numbers, strings, lists, dicts); or, if you trust the "
            "file, re-save its weights alone: torch.save(torch.load(path, weights_only=False)['state_dict'], "
            "new_path)")
    return CheckpointError(f"{path}: refused. It holds Python objects{what} that safe loading (weights_only=True) "
                           "does not run; if you trust it, load it yourself and re-save only model.state_dict()")


def iter_state_dicts(checkpoints: Sequence[CheckpointSpec],
                     names: Iterable[str] | None = None) -> Iterator[tuple[str, StateDict]]:
    """(name, state_dict) for each checkpoint, loading files one at a time. With the model's
    `names`, keys are matched to them as the module docstring says."""
    names = None if names is None else list(names)
    for i, item in enumerate(checkpoints):
        if isinstance(item, Mapping):
            source = f"checkpoint #{i}"
            state = unwrap_state_dict(item, source)
        else:
            source, state = str(item), load_state_dict(item)
        yield source, match_names(state, names, source)


def finite(value: Tensor) -> Tensor:
    """torch.isfinite, also for the 8-bit float types it does not take (float8_e4m3fn)."""
    return torch.isfinite(value.float() if value.element_size() == 1 else value)


def check_finite(state: Mapping[str, Tensor], source: str, keys: Sequence[str] | None = None) -> None:
    """Refuse a checkpoint whose floating-point or complex entries (or just `keys`) hold NaN or Inf,
    naming the file and the key: averaged in, one bad value would spoil every result."""
    for key in state if keys is None else keys:
        value = state[key]
        if (value.is_floating_point() or value.is_complex()) and not bool(finite(value).all()):
            raise _non_finite_error(source, key, int((~finite(value)).sum()), value.numel())


def _non_finite_error(source: str, key: str, bad: int, numel: int) -> CheckpointError:
    return CheckpointError(f"{source}: key {key!r} holds {bad} NaN or Inf value(s) of {numel}; "
                           "leave this checkpoint out (a diverged step?) or repair it")
