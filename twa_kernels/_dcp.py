"""Reading torch.distributed.checkpoint (DCP) directories without running code from them.

A DCP directory's `.metadata` is a pickle, and DCP's own `FileSystemReader.read_metadata`
unpickles it with plain `pickle.load`: a hostile `.metadata` runs whatever it names. Here it
is read with an unpickler that resolves only DCP's metadata classes, torch's dtypes, layouts,
memory formats and `torch.Size`, paths and plain containers, refusing any other global
before anything is called; the result is then checked field by field.

Loading goes through DCP's `load` with a reader that hands it this already-checked metadata
(it never unpickles `.metadata` again) and a planner that refuses non-tensor items (DCP loads
those with `torch.load(weights_only=False)`). Tensors themselves are read by DCP with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import stat
import warnings
import zipfile
from typing import Any

import torch
from torch import Tensor

from twa_kernels.errors import CheckpointError, MissingDependencyError
from twa_kernels.io.keys import _NESTING_KEYS  # unwrapped as a loaded torch file's are
from twa_kernels.io.read import FileVersionCache, _StorageScan, _storage_dtype  # (a pickle's storages, read inertly)

# DCP's tutorial saves {"app": AppState(model, optimizer)}, whose state_dict is {"model": ...,
# "optim": ...}: "app" is a nesting key of DCP directories only (in a torch file it may be
# any entry beside the weights)
_DCP_NESTING_KEYS = (*_NESTING_KEYS, "app")

try:  # torch.distributed, and with it DCP, is a build option of torch (USE_DISTRIBUTED)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )
except ImportError as exc:
    raise MissingDependencyError(
        f"reading a torch.distributed.checkpoint directory needs torch.distributed, which this torch "
        f"({torch.__version__}) was built without; install a torch build with distributed support") from exc

METADATA_FILE = ".metadata"
# A transformed item (DCP's compression extensions) may hold far fewer bytes than its
# tensor; a claim beyond this many times its stored bytes is refused before it is allocated
_MAX_EXPANSION = 1024

# module -> the names a DCP .metadata may resolve there. Everything listed is a plain data
# class, an enum, torch.Size, a path class or a container: calling it builds a value and
# runs nothing else. Older torch kept TensorProperties in torch.distributed._shard.
_ALLOWED_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.distributed._shard.sharded_tensor.metadata": frozenset({"TensorProperties", "MEM_FORMAT_ENCODING"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset"}),
}
# torch.float32 and its kind are values (not callable): resolved from torch's own namespace
_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only _ALLOWED_GLOBALS and torch's dtype-like values."""

    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(vars(torch).get(name), _TORCH_VALUE_TYPES):
            return vars(torch)[name]
        raise CheckpointError(
            f"{self.source}: refused. This DCP metadata file names the Python global {module}.{name}, which is not "
            "one of torch.distributed.checkpoint's metadata classes, so unpickling it could run code; nothing from it "
            "was run. Re-save the checkpoint with torch.distributed.checkpoint.save from a trusted process")

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.source}: refused. DCP metadata holds no persistent references, and this "
                              "file has one; re-save the checkpoint with torch.distributed.checkpoint.save")


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The Metadata of DCP directory `path`, read without running code (see the module
    docstring) and checked: CheckpointError naming the file for anything else."""
    source = os.path.join(os.fspath(path), METADATA_FILE)
    try:
        with open(source, "rb") as f:
            metadata = _MetadataUnpickler(f, source).load()
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{source}: could not be read ({exc})") from exc
    except Exception as exc:  # truncated, garbled, or an allowed class given bad arguments
        raise CheckpointError(f"{source}: not a readable DCP metadata file ({type(exc).__name__}: {exc}); "
                              "re-save the checkpoint with torch.distributed.checkpoint.save") from exc
    _check(metadata, source, os.fspath(path))
    return metadata


def _check(metadata: Any, source: str, directory: str) -> None:
    """Every field that tensor loading relies on has the type DCP gives it, and every data
    file lies inside the checkpoint directory and holds the bytes the metadata gives it.
    Sizes are checked against the bytes on disk before anything is allocated from them:
    a metadata file of a few KB may claim tensors of any size."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{source}: not a valid DCP metadata file ({what}); re-save the checkpoint with "
                               "torch.distributed.checkpoint.save")

    def is_size(value: Any) -> bool:
        return isinstance(value, torch.Size) and all(isinstance(v, int) and v >= 0 for v in value)

    if not isinstance(metadata, Metadata):
        raise bad(f"it holds a {type(metadata).__name__}, not a Metadata")
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise bad("state_dict_metadata is not a dict")
    for key, entry in entries.items():
        if not isinstance(key, str):
            raise bad(f"key {key!r} is not a string")
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not isinstance(entry, TensorStorageMetadata):
            raise bad(f"entry {key!r} is a {type(entry).__name__}")
        props = getattr(entry, "properties", None)
        if not isinstance(props, TensorProperties) or not isinstance(getattr(props, "dtype", None), torch.dtype):
            raise bad(f"entry {key!r} has no tensor dtype")
        if not is_size(getattr(entry, "size", None)):
            raise bad(f"entry {key!r} has no valid size")
        chunks = getattr(entry, "chunks", None)
        if not isinstance(chunks, list) or not all(
                isinstance(c, ChunkStorageMetadata) and is_size(getattr(c, "offsets", None))
                and is_size(getattr(c, "sizes", None)) for c in chunks):
            raise bad(f"entry {key!r} has invalid chunks")
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise bad("storage_data is not a dict")
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(getattr(index, "fqn", None), str):
            raise bad(f"storage index {index!r}")
        path = getattr(info, "relative_path", None)
        if (not isinstance(path, str) or not path or os.path.isabs(path) or "/" in path or "\\" in path
                or path in (".", "..")):
            raise bad(f"data file {path!r} of {index.fqn!r} is not a file name inside the checkpoint directory")
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
            raise bad(f"the byte range of {index.fqn!r} is not two non-negative integers")
        descriptors = getattr(info, "transform_descriptors", None)
        if descriptors is not None and not (isinstance(descriptors, (list, tuple))
                                            and all(isinstance(d, str) for d in descriptors)):
            raise bad(f"the transforms of {index.fqn!r} are not strings")
    _check_data_files(storage, source, directory)
    for key, entry in entries.items():
        if isinstance(entry, TensorStorageMetadata):
            _check_chunk_entries(key, entry, storage, bad)
            _check_stored_bytes(key, entry, storage, bad)
            _check_tiling(key, entry, bad)
    storage_meta = getattr(metadata, "storage_meta", None)
    if storage_meta is not None and not isinstance(storage_meta, StorageMeta):
        raise bad("storage_meta is not a StorageMeta")


def _check_data_files(storage: dict, source: str, directory: str) -> None:
    """Each data file the metadata names is a regular file (a FIFO would block its reader
    for ever) that holds every byte range the metadata gives inside it, and no two items
    share a byte: the stored-bytes bound (_check_stored_bytes) counts each item's range, so
    a few KB of metadata pointing many chunks at one range would claim a tensor that size
    again and again, which the tiling check and the readers allocate."""
    sizes: dict[str, int] = {}
    ranges: dict[str, list[tuple[int, int, str]]] = {}
    for index, info in storage.items():
        name = info.relative_path
        if name not in sizes:
            try:
                status = os.stat(os.path.join(directory, name))
            except OSError as exc:
                raise CheckpointError(f"{source}: the data file {name} of {index.fqn!r} could not be read ({exc}); "
                                      "the checkpoint is incomplete: restore it or re-save it") from None
            if not stat.S_ISREG(status.st_mode):
                raise CheckpointError(f"{source}: the data file {name} of {index.fqn!r} is not a regular file; "
                                      "restore the checkpoint or re-save it")
            sizes[name] = status.st_size
        if info.offset + info.length > sizes[name]:
            raise CheckpointError(f"{source}: the data of {index.fqn!r} lies past the end of {name} "
                                  f"({sizes[name]} bytes); the checkpoint is truncated: restore it or re-save it")
        ranges.setdefault(name, []).append((info.offset, info.length, index.fqn))
    for name, spans in ranges.items():  # DCP writes each item after the last: their ranges never meet
        spans.sort()
        for (start, length, first), (next_start, _, second) in zip(spans, spans[1:]):
            if next_start < start + length:
                raise CheckpointError(f"{source}: the data of {first!r} and of {second!r} share bytes of {name}, "
                                      "which a save never writes; the metadata is corrupt or was altered: restore "
                                      "the checkpoint or re-save it")


def _check_chunk_entries(key: str, entry: TensorStorageMetadata, storage: dict, bad: Any) -> None:
    """Each chunk of a tensor lies inside it and has a data file entry."""
    size = tuple(entry.size)
    for chunk in entry.chunks:
        start, extent = tuple(chunk.offsets), tuple(chunk.sizes)
        if len(start) != len(size) or len(extent) != len(size) or any(
                o + n > d for o, n, d in zip(start, extent, size)):
            raise bad(f"a chunk of {key!r} at {list(start)} of size {list(extent)} lies outside its size {list(size)}")
        if MetadataIndex(key, chunk.offsets) not in storage:
            raise bad(f"the chunk of {key!r} at {list(start)} has no data file entry")


def _check_stored_bytes(key: str, entry: TensorStorageMetadata, storage: dict, bad: Any) -> None:
    """Each chunk stores at least its bytes (a transformed one, _MAX_EXPANSION times fewer):
    readers allocate a tensor, or a whole model's center, from the sizes the metadata
    claims, before any data is read."""
    for chunk in entry.chunks:
        info = storage[MetadataIndex(key, chunk.offsets)]
        claimed = math.prod(chunk.sizes) * entry.properties.dtype.itemsize
        stored = info.length * (_MAX_EXPANSION if info.transform_descriptors else 1)
        if claimed > stored + (1 << 10):  # torch.save's framing of a tiny chunk outweighs its bytes
            raise bad(f"the chunk of {key!r} at {list(chunk.offsets)} claims {claimed} bytes but stores "
                      f"{info.length}")


def state_dict_keys(metadata: Metadata) -> list[tuple[str, str]]:
    """The stored keys of a checked Metadata's tensors that make up the model's state_dict,
    each given as the key it had there: {"model": state_dict, "optim": ...} saved with DCP is
    read as its state_dict (as a torch file nesting it is), and a flat state_dict as it is.

    DCP joins nested keys with dots, so "model.fc.weight" may be the weight "fc.weight" of a
    nested state_dict or a flat state_dict's own "model.fc.weight" (a Hugging Face model's).
    The save's planner_data records which: each stored key's path in the saved object.
    Without it (a save with flatten_state_dict=False, which cannot nest), keys are as stored.
    Returns (key in the state_dict, stored key) pairs."""
    entries = tensor_entries(metadata)
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    paths = {key: paths[key] for key in entries if isinstance(paths.get(key), tuple) and paths[key]}
    if len(paths) < len(entries):
        return [(key, key) for key in entries]
    prefix: tuple = ()
    for _ in range(3):  # unwrap up to three nestings, the first nesting key found at each
        depth = len(prefix)
        nested = next((k for k in _DCP_NESTING_KEYS
                       if any(len(p) > depth + 1 and p[:depth] == prefix and p[depth] == k for p in paths.values())),
                      None)
        if nested is None:
            break
        prefix += (nested,)
    depth = len(prefix)
    return [(str(path[depth]), key) for key, path in paths.items() if len(path) == depth + 1 and path[:depth] == prefix]


def tensor_entries(metadata: Metadata) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each tensor entry of a checked Metadata, by its stored key."""
    return {key: (tuple(entry.size), entry.properties.dtype)
            for key, entry in metadata.state_dict_metadata.items() if isinstance(entry, TensorStorageMetadata)}


class CheckedReader(FileSystemReader):
    """DCP's FileSystemReader, given metadata already read by read_metadata: DCP's load asks
    the reader for the metadata, and this one never unpickles the file again."""

    def __init__(self, path: str | os.PathLike, metadata: Metadata):
        super().__init__(path)
        self._checked_metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self._checked_metadata
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader does
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that a non-tensor item (which DCP would load with
    torch.load(weights_only=False)) is refused."""

    def __init__(self, source: str):
        super().__init__()
        self.source = source

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CheckpointError(f"{self.source}: refused to load the non-tensor item {read_item.dest_index.fqn!r} "
                              "(DCP stores such items as pickles, which could run code)")


def _check_tiling(key: str, entry: TensorStorageMetadata, bad: Any) -> None:
    """The chunks of a tensor (each inside it, _check_chunk_entries) do not overlap and cover
    it: DCP's load fills only what the chunks name, and the rest of the tensor would be
    whatever memory held before. Called once the chunks' bytes are known to be on disk
    (_check_stored_bytes), which bounds the element map below by the checkpoint's size."""
    size = tuple(entry.size)
    boxes = [(tuple(chunk.offsets), tuple(chunk.sizes)) for chunk in entry.chunks]
    covered = sum(math.prod(extent) for _, extent in boxes)
    if covered != math.prod(size):
        overlap = False
    elif len(boxes) <= 4096:  # pairwise: a handful of chunks, one per saving rank
        overlap = any(all(a0 < b0 + bn and b0 < a0 + an for a0, an, b0, bn in zip(a[0], a[1], b[0], b[1]))
                      for i, a in enumerate(boxes) for b in boxes[i + 1:] if math.prod(a[1]) and math.prod(b[1]))
    else:  # as many elements as the tensor: they overlap exactly where some element is left uncovered
        seen = torch.zeros(size, dtype=torch.bool)
        for start, extent in boxes:
            seen[tuple(slice(o, o + n) for o, n in zip(start, extent))] = True
        overlap = not bool(seen.all())
    if covered != math.prod(size) or overlap:
        raise bad(f"the chunks of {key!r} cover {covered} of its {math.prod(size)} elements"
                  f"{' and overlap' if overlap else ''}; every element must come from exactly one chunk")


class _FileSlice(io.RawIOBase):
    """Bytes offset..offset + length of an open file, as a seekable file of their own."""

    def __init__(self, fd: int, offset: int, length: int):
        super().__init__()
        self._fd, self._offset, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        data = os.pread(self._fd, n, self._offset + self._pos) if n else b""
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


# the (offset, length) of the items whose CRCs were checked in this process, by file and its
# (size, mtime, inode, ctime)
_VERIFIED = FileVersionCache()


def _verify_chunks(reader: CheckedReader, key: str, source: str) -> None:
    """Before anything is allocated for tensor `key`: each of its chunks lies inside its
    data file, and each stored record matches its CRC-32. DCP writes
    a chunk as torch.save's zip format, whose CRCs torch's reader never checks, so a
    flipped bit would otherwise be read as a weight."""
    metadata = reader._checked_metadata
    entry = metadata.state_dict_metadata.get(key)
    if not isinstance(entry, TensorStorageMetadata):
        return  # not a tensor: the planner refuses to load it
    for chunk in entry.chunks:
        info = metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        path = os.path.join(reader.path, info.relative_path)
        transformed = bool(info.transform_descriptors)
        try:
            # O_NONBLOCK: a FIFO put in the file's place after read_metadata opens at once
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
                status = os.fstat(file.fileno())
                if not stat.S_ISREG(status.st_mode):
                    raise CheckpointError(f"{source}: the data file {info.relative_path} of {key!r} is not a regular "
                                          "file; restore the checkpoint or re-save it")
                if info.offset + info.length > status.st_size:
                    raise CheckpointError(f"{source}: the chunk of {key!r} at {list(chunk.offsets)} lies past the "
                                          f"end of {info.relative_path} ({status.st_size} bytes); the checkpoint is "
                                          "truncated")
                # (ctime too: a copy that puts the modification time back is a new version)
                real = os.path.realpath(path)
                version = (status.st_size, status.st_mtime_ns, status.st_ino, status.st_ctime_ns)
                verified: set | None = _VERIFIED.get(real, version)  # type: ignore[assignment]
                if transformed or (verified is not None and (info.offset, info.length) in verified):
                    continue  # a transformed item is not a zip record: DCP's transform checks its own framing
                with zipfile.ZipFile(io.BufferedReader(_FileSlice(file.fileno(), info.offset, info.length))) as zf:
                    for record in zf.infolist():
                        with zf.open(record) as stream:  # zipfile compares the CRC-32 at the end
                            while stream.read(1 << 18):
                                pass
                    _check_stored_dtype(zf, key, entry.properties.dtype, f"{source}: {info.relative_path}")
                if verified is None:
                    verified = set()
                    _VERIFIED.put(real, version, verified)
                verified.add((info.offset, info.length))
        except CheckpointError:
            raise
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
            raise CheckpointError(f"{source}: the stored chunk of {key!r} at {list(chunk.offsets)} in "
                                  f"{info.relative_path} is damaged ({exc}); restore the file or re-save the "
                                  "checkpoint") from None


def _check_stored_dtype(record: zipfile.ZipFile, key: str, dtype: torch.dtype, source: str) -> None:
    """The chunk stored in `record` (torch.save's zip format) holds `dtype`, the dtype the
    metadata gives its tensor: DCP's load copies a stored chunk into a tensor of the
    metadata's dtype, so a stored float32 chunk under a float16 entry would be rounded
    without a word. Only the chunk's pickle is read, with none of its globals looked up."""
    pickles = [name for name in record.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
    try:
        scan = _StorageScan(io.BytesIO(record.read(pickles[0]))) if len(pickles) == 1 else None
        if scan is not None:
            scan.load()
    except Exception as exc:  # garbled: torch.load would refuse it too
        raise CheckpointError(f"{source}: the stored chunk of {key!r} is not a torch tensor record ({exc}); "
                              "restore the file or re-save the checkpoint") from None
    kinds = {kind for _, kind, _ in scan.declared} if scan is not None else set()
    stored = {_storage_dtype(source, kind) for kind in kinds}
    if stored != {dtype}:
        found = ", ".join(sorted(str(d) for d in stored)) or "no tensor storage"
        raise CheckpointError(f"{source}: the chunk of {key!r} stores {found} but the checkpoint's metadata gives "
                              f"it {dtype}; the checkpoint's files do not belong together: restore it or re-save it")


def load_tensor(reader: CheckedReader, key: str, shape: tuple[int, ...], dtype: torch.dtype,
                source: str) -> Tensor:
    """The whole tensor `key` (a tensor entry of the reader's metadata), read by DCP's load
    in this process alone, once its chunks are checked (_verify_chunks). `source` names
    the checkpoint in errors."""
    _verify_chunks(reader, key, source)
    value = torch.empty(shape, dtype=dtype)  # DCP fills the tensors it is given
    try:
        with warnings.catch_warnings():  # load(no_dist=True) warns that it runs in one process: intended
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({key: value}, storage_reader=reader, planner=_TensorsOnlyPlanner(source), no_dist=True)
    except CheckpointException as exc:  # DCP wraps what failed (a BaseException): surface the cause
        causes = [pair[0] for pair in exc.failures.values()]
        ours = next((c for c in causes if isinstance(c, CheckpointError)), None)
        if ours is not None:
            raise ours from None
        detail = "; ".join(f"{type(c).__name__}: {c}" for c in causes) or str(exc)
        raise CheckpointError(f"{source}: could not read tensor {key!r} of this DCP checkpoint ({detail})") from None
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{source}: could not read tensor {key!r} of this DCP checkpoint "
                              f"({type(exc).__name__}: {exc})") from exc
    return value

