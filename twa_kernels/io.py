"""Safe checkpoint reading and writing.

What a checkpoint may be:
- a state_dict (a mapping of names to tensors);
- a file: `torch.load(weights_only=True)` for .pt, .pth, .bin and Lightning's .ckpt (a
  pickle that may only hold tensors and plain containers, so a file that would run code is
  refused before any of it runs), or safetensors for .safetensors. A state_dict nested
  under "state_dict", "model" or "model_state_dict" (Lightning's .ckpt, training-loop
  dicts) is unwrapped; the file's other entries are not used;
- a Hugging Face `save_pretrained` directory: one checkpoint, read from its
  model.safetensors or pytorch_model.bin, or, when sharded, from every shard its
  model.safetensors.index.json (or pytorch_model.bin.index.json) lists.

`checkpoints` arguments take a list of those, a glob pattern, or a directory: its checkpoint
files, its save_pretrained subdirectories (an HF Trainer's checkpoint-N) and its
torch.distributed.checkpoint subdirectories, in natural name order (step=5 before
step=10). The copies that training scripts write beside their checkpoints are left out of
a directory that holds others, with a warning (name one in a list to use it): Lightning's
last.ckpt (save_last=True), the torchvision reference scripts' checkpoint.pth and timm's
last.pth.tar and model_best.pth.tar. Averaged in, each would count one checkpoint twice.
An argparse.Namespace saved beside the weights (those scripts save their arguments so) is
read as plain data; any other Python object in a file is refused.

How a checkpoint's keys are matched to the model's names:
1. The wrapper prefixes `module.` (DistributedDataParallel, DataParallel) and `_orig_mod.`
   (torch.compile) are removed from the start of every key. Two keys that become one name
   (`fc1.weight` and `module.fc1.weight`) are refused, naming both: which one is meant
   cannot be known.
2. Where the model's names are known (TWA, the baselines with `model=`, a Subspace given
   parameter_names, ColumnReader.columns), a checkpoint is also matched with one leading
   `model.` removed (then rule 1 again), and that reading is used when it finds more of the
   model's names than the keys as they are. This is a LightningModule that holds the
   network as `self.model`, whose checkpoint names the network's weights `model.<name>`,
   read for the network itself; its keys outside `model.` are then not used. A model whose
   own names start with `model.` (a Hugging Face LlamaForCausalLM) matches its own
   checkpoints as they are, and its Lightning checkpoints (`model.model.<name>`) with one
   `model.` removed. Without the model's names, keys are used as rule 1 leaves them.
Tied weights that a file holds under one of their names only (safetensors writers keep one)
are read under all of them when the model is given (see parameter_aliases). A wrapped model
(torch.compile, DistributedDataParallel, DataParallel) given as the model is read as the
module it wraps (unwrap_model), whose names its checkpoints hold under rule 1.
"""

from __future__ import annotations

import argparse
import contextlib
import glob as globlib
import json
import logging
import os
import pickle
import re
import struct
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
import safetensors.torch  # read as safetensors.torch.<name> at each call: tests swap them
from torch import Tensor, nn

try:  # the same CRC-32 as zlib's, several times faster where zlib has no folded-multiply path
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; a vendored install may lack it
    from zlib import crc32 as _crc32

from twa_kernels.errors import CheckpointError, InvalidArgumentError, InvalidTypeError, OutputError
from twa_kernels._outdir import current_umask  # module-level: tests and benches swap it

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".pth.tar")  # .pth.tar: timm
_NESTING_KEYS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")
_LIGHTNING_PREFIX = "model."
# a save_pretrained directory's weights, in the order transformers itself prefers them
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
# Copies of another checkpoint that training scripts write beside the others, by file name:
# averaged in, each would count a checkpoint twice
_COPIES = re.compile(r"last(-v\d+)?\.ckpt"  # Lightning, save_last=True: the newest
                     r"|checkpoint\.pth"  # torchvision's reference scripts: the newest
                     r"|(last|model_best)\.pth\.tar")  # timm's train.py: the newest and the best
# Python objects that a training script saves beside its weights and that safe loading may
# build as plain data (no code of theirs runs: a Namespace is an object with attributes)
_PLAIN_OBJECTS = (argparse.Namespace,)

logger = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
CheckpointSpec = Union[str, os.PathLike, Mapping[str, Tensor]]
Checkpoints = Union[str, os.PathLike, Sequence[CheckpointSpec]]


def _strip_key(key: str) -> str:
    """`key` without its leading wrapper prefixes (`module.`, `_orig_mod.`, in any order)."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _strip_names(keys: Iterable[str], source: str) -> dict[str, str]:
    """{name: stored key}: each key without its wrapper prefixes. Two keys that become one
    name are refused: which of them is the model's weight cannot be known."""
    names: dict[str, str] = {}
    for key in keys:
        name = _strip_key(key)
        if name in names:
            raise CheckpointError(f"{source}: keys {names[name]!r} and {key!r} both name {name!r} once the "
                                  f"wrapper prefixes {' / '.join(_PREFIXES)} are removed; save the state_dict of one "
                                  "model (the unwrapped module's) so that each weight is there once")
        names[name] = key
    return names


def _strip_prefixes(state: Mapping[str, Tensor], source: str = "checkpoint") -> StateDict:
    return {name: state[key] for name, key in _strip_names(state, source).items()}


def model_renaming(keys: Iterable[str], names: Iterable[str], source: str = "checkpoint") -> dict[str, str] | None:
    """Rule 2 of the module docstring. `keys` are a checkpoint's names after rule 1, `names`
    the model's: {model's name: key} when the keys are the model's names under a leading
    `model.` (and match more of them that way than as they are), else None (use the keys
    as they are)."""
    wanted = set(names)
    keys = list(keys)
    inner = [k for k in keys if k.startswith(_LIGHTNING_PREFIX)]
    if not inner or not wanted:
        return None
    renamed = _strip_names((k[len(_LIGHTNING_PREFIX):] for k in inner), source)
    renamed = {name: _LIGHTNING_PREFIX + key for name, key in renamed.items()}
    if sum(n in renamed for n in wanted) > sum(k in wanted for k in keys):
        return renamed
    return None


def match_names(state: Mapping[str, Tensor], names: Iterable[str] | None, source: str = "checkpoint") -> StateDict:
    """`state` (keys after rule 1) keyed by the model's `names` where rule 2 applies (see
    the module docstring); unchanged otherwise or when `names` is None."""
    renaming = None if names is None else model_renaming(state, names, source)
    if renaming is None:
        return dict(state)
    return {name: state[key] for name, key in renaming.items()}


def _not_dense_values(value: Tensor) -> str | None:
    """What `value` is when it holds no dense values to read or save (a meta, sparse,
    nested or quantized tensor), else None."""
    if value.is_meta:
        return "a meta tensor (no values)"
    if value.is_nested or value.is_quantized:
        return "a nested tensor" if value.is_nested else "a quantized tensor (dequantize() it)"
    return f"a {value.layout} tensor" if value.layout != torch.strided else None


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> StateDict:
    """The tensors of a loaded checkpoint: nested state_dicts unwrapped, prefixes stripped."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping) and \
            isinstance(obj.get("current_model_state"), Mapping):
        # Lightning's WeightAveraging callbacks (EMA, SWA) save the average as the state_dict
        # and the weights being trained beside it
        warnings.warn(f"{source}: a Lightning checkpoint of a WeightAveraging callback: its state_dict, which is "
                      "read, holds the callback's running average (e.g. EMA); the weights being trained are under "
                      "'current_model_state'. To average those, pass ckpt['current_model_state'] state_dicts",
                      UserWarning, stacklevel=2)
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
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: the tensor under key {key!r} ({type(key).__name__}) has no string name; "
                                  "a state_dict names each tensor by a string: save model.state_dict()")
        if kind := _not_dense_values(value):
            raise CheckpointError(f"{source}: key {key!r} is {kind}; save the model's real, dense weights "
                                  "(materialise meta tensors, .to_dense() sparse ones)")
    # values only: a state_dict of live Parameters (named_parameters(), or a file saved from
    # them) would otherwise put the averages, and the checkpoints with them, in the graph
    tensors = {k: v.detach() if v.requires_grad else v for k, v in tensors.items()}
    return _strip_prefixes(tensors, source)


def is_dcp_directory(path: str | os.PathLike) -> bool:
    """Whether `path` is a torch.distributed.checkpoint directory (it holds a .metadata file).
    Here rather than in _dcp, which imports torch.distributed.checkpoint (about a second)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def checkpoint_directory_files(path: str | os.PathLike) -> list[Path] | None:
    """The weight files of a Hugging Face save_pretrained directory: its one weights file,
    or the shards its index lists. None when `path` is not such a directory."""
    path = Path(path)
    for name in _HF_WEIGHTS:
        candidate = path / name
        if candidate.is_file():
            return _index_shards(candidate) if name.endswith(".json") else [candidate]
    return None


def _index_shards(index: Path) -> list[Path]:
    """The shard files a save_pretrained index (`{"weight_map": {key: file}}`) lists."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a readable index of shards ({type(exc).__name__}: {exc}); "
                              "save the model again with save_pretrained") from exc
    shards = []
    for name in sorted(files, key=str):
        # a shard is a file beside its index: a path elsewhere would read files the
        # checkpoint does not own
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise CheckpointError(f"{index}: shard {name!r} is not a file name in {index.parent}")
        shard = index.parent / name
        if not shard.is_file():
            raise CheckpointError(f"{index}: lists shard {name}, which is missing from {index.parent}")
        shards.append(shard)
    if not shards:
        raise CheckpointError(f"{index}: lists no shards; save the model again with save_pretrained")
    return shards


def _directory_error(path: object) -> CheckpointError:
    return CheckpointError(
        f"{path}: is a directory, not a checkpoint. A checkpoint directory is a Hugging Face save_pretrained "
        f"directory: it holds {' or '.join(_HF_WEIGHTS)}. To use every checkpoint file in a directory, pass the "
        "directory itself as `checkpoints`, not inside a list")


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Read one checkpoint (a file or a save_pretrained directory) onto the CPU, safely (see
    the module docstring)."""
    path = Path(path)
    if path.is_dir():
        files = checkpoint_directory_files(path)
        if files is None and is_dcp_directory(path):
            raise CheckpointError(
                f"{path}: a torch.distributed.checkpoint directory is read column by column only (TWA with "
                "process_group= and shard=True); to read it whole, convert it once with torch.distributed."
                "checkpoint.format_utils.dcp_to_torch_save and pass the file")
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
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            tensors = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
        return _strip_prefixes(tensors, str(path))
    return unwrap_state_dict(_torch_load(path), str(path))


# Files whose CRC-32s were verified in this process, by identity and modification stamp.
_VERIFIED: set[tuple[str, int, int, int]] = set()


def verify_zip_crc(path: str | os.PathLike) -> None:
    """Check every record of a zip-format torch file against its stored CRC-32. torch's
    own zip reader never checks them, so a flipped bit in a tensor's data would otherwise
    be read as a valid weight. Stored records are read 256 KB at a time into one buffer and
    summed there (a mapping would count each stretch's pages in the process's resident
    memory until they are given back: up to a whole record at every open); zlib-ng's
    CRC-32 runs at several GB/s. Each file is checked once per process unless it changes.
    Raises CheckpointError naming the record."""
    stat = os.stat(path)
    stamp = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if stamp in _VERIFIED:
        return
    # records are summed through this buffer: no mapping's pages pile up, and at 256 KB a
    # call's overhead is far below zlib-ng's time for the bytes
    buffer = bytearray(1 << 18)
    try:
        with open(path, "rb") as file, zipfile.ZipFile(file) as archive:
            size = os.fstat(file.fileno()).st_size
            for info in archive.infolist():
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
    _VERIFIED.add(stamp)


def _torch_load(path: Path) -> object:
    if zipfile.is_zipfile(path):
        verify_zip_crc(path)
    else:
        with open(path, "rb") as f:
            head = f.read(2)
        if not head.startswith(b"\x80"):  # a legacy torch file is a pickle, which starts with PROTO
            raise CheckpointError(f"{path}: not a checkpoint at all: neither a torch zip archive nor a pickle "
                                  f"(it starts with {head!r}); check the path, or that the file was fully copied")
    return torch_load_safely(path)


def torch_load_safely(path: str | os.PathLike, *, mmap: bool = False) -> object:
    """torch.load(weights_only=True) onto the CPU, with an argparse.Namespace admitted as
    plain data; a file holding any other Python object is refused (CheckpointError) before
    any of its code runs."""
    # torch >= 2.5 scopes an allowance to a block; 2.4 reads such a file as refused
    allowed = getattr(torch.serialization, "safe_globals", None)
    try:
        with allowed(list(_PLAIN_OBJECTS)) if allowed else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise _refused(path) from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: could not be read as a torch checkpoint ({exc})") from exc


def _refused(path: object) -> CheckpointError:
    # raised while torch's refusal is handled: its message names the global it refused
    found = re.search(r"GLOBAL (\S+)", str(sys.exc_info()[1] or ""))
    what = f" ({found.group(1)})" if found else ""
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


def _natural_key(path: Path) -> list:
    """Name order with digit runs compared as numbers: step=5 before step=10."""
    parts = re.split(r"(\d+)", path.name)
    return [int(part) if i % 2 else part for i, part in enumerate(parts)]  # digits at odd positions


def _directory_checkpoints(directory: Path) -> list[Path]:
    """A directory's checkpoint files, save_pretrained and torch.distributed.checkpoint
    subdirectories, in natural order."""
    found, skipped = [], []
    for entry in directory.iterdir():
        if entry.is_dir():
            if checkpoint_directory_files(entry) is not None or is_dcp_directory(entry):
                found.append(entry)
        elif entry.name.endswith(CHECKPOINT_SUFFIXES):
            (skipped if _COPIES.fullmatch(entry.name) else found).append(entry)
    if skipped and found:
        logger.warning("%s: leaving out %s, the copy of another checkpoint that a training script writes beside "
                       "the others (Lightning's last.ckpt, torchvision's checkpoint.pth, timm's last.pth.tar and "
                       "model_best.pth.tar), which would count that checkpoint twice; pass a list of files to "
                       "choose them yourself", directory, ", ".join(p.name for p in sorted(skipped)))
    else:
        found += skipped
    return sorted(found, key=_natural_key)


def resolve_checkpoints(checkpoints: Checkpoints) -> list[CheckpointSpec]:
    """A list of state_dicts and paths from: such a list, a directory (its checkpoint files,
    save_pretrained and DCP subdirectories in natural name order; a save_pretrained
    directory is one checkpoint) or a glob pattern. An empty result is an error."""
    if checkpoints is None:
        raise InvalidTypeError("checkpoints is None: pass a list of checkpoint files or state_dicts, a directory "
                               "or a glob pattern")
    if isinstance(checkpoints, Mapping):
        raise InvalidTypeError("checkpoints is one state_dict (a mapping of names to tensors) where a list of "
                               "checkpoints was expected: pass [state_dict], or a list of several")
    if isinstance(checkpoints, (str, os.PathLike)):
        spec = str(checkpoints)
        if os.path.isdir(spec):
            if checkpoint_directory_files(spec) is not None:
                return [Path(spec)]
            found = _directory_checkpoints(Path(spec))
            where = (f"directory {spec} holds no checkpoint: no {'/'.join(CHECKPOINT_SUFFIXES)} files, no "
                     f"Hugging Face save_pretrained directories (holding {' or '.join(_HF_WEIGHTS)}) and no "
                     "torch.distributed.checkpoint directories (holding .metadata)")
        elif any(ch in spec for ch in "*?["):
            found = sorted((Path(p) for p in globlib.glob(spec)), key=_natural_key)
            where = f"glob {spec!r} matches no files"
        else:
            found, where = [Path(spec)], ""
        if not found:
            raise CheckpointError(where)
        return list(found)
    if isinstance(checkpoints, Tensor) or not isinstance(checkpoints, Iterable):
        raise InvalidTypeError(f"checkpoints must be a list of checkpoint files or state_dicts, a directory or a "
                               f"glob pattern, got {type(checkpoints).__name__}")
    items = list(checkpoints)
    if not items:
        raise CheckpointError("no checkpoints given")
    for i, item in enumerate(items):
        if not isinstance(item, (str, os.PathLike, Mapping)):
            raise InvalidTypeError(f"checkpoint #{i} is a {type(item).__name__}: each checkpoint must be a file "
                                   "path, a save_pretrained directory or a state_dict")
        if (not isinstance(item, Mapping) and os.path.isdir(item) and checkpoint_directory_files(item) is None
                and not is_dcp_directory(item)):  # DCP: read by ColumnReader
            raise _directory_error(item)
    return items


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


def tied_owners(model: nn.Module, module: nn.Module, attribute: str = "weight") -> list[str]:
    """The names of the other modules of `model` that hold `module`'s Parameter `attribute`
    (tied weights, e.g. an output layer tied to an embedding). A module reused under two
    names is one module, not a tie; the root module is named "<root>"."""
    target = getattr(module, attribute)
    return [name or "<root>" for name, other in model.named_modules(remove_duplicate=False)
            if other is not module and any(p is target for p in other.parameters(recurse=False))]


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every state_dict name of each parameter of `model`, keyed by the name
    named_parameters() gives it (its first). A tied weight (an embedding shared with the
    output layer) is one tensor under several names: one row segment of a subspace, and
    every one of its names in a state_dict."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {names[0]: names for names in groups.values()}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a wrapper holds, whose names a checkpoint's keys are matched to:
    torch.compile's OptimizedModule (`_orig_mod`) and DistributedDataParallel / DataParallel
    (`.module`) are unwrapped, however nested. A model sharded by FSDP2's fully_shard is
    refused: its parameters are shards, not the weights a checkpoint holds."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            break
    if _is_fully_sharded(model):
        raise InvalidArgumentError(
            "the model is sharded by FSDP2 (fully_shard): its parameters are shards of the weights. Pass an "
            "unsharded model of the same architecture, and TWA(..., process_group=pg, shard=True) to split the "
            "subspace across ranks instead")
    return model


def _is_compiled(model: nn.Module) -> bool:
    # torch.compile imports torch._dynamo: where it is not imported, nothing is compiled
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return dynamo is not None and isinstance(model, dynamo.OptimizedModule)


def _is_fully_sharded(model: nn.Module) -> bool:
    # as for compile: a model is sharded only where FSDP is imported (importing it costs ~25 MB)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_type = getattr(fsdp, "FSDPModule", None)
    return module_type is not None and any(isinstance(m, module_type) for m in model.modules())


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


def finite(value: Tensor) -> Tensor:
    """torch.isfinite, also for the 8-bit float types it does not take (float8_e4m3fn)."""
    return torch.isfinite(value.float() if value.element_size() == 1 else value)


def check_finite(state: Mapping[str, Tensor], source: str, keys: Sequence[str] | None = None) -> None:
    """Refuse a checkpoint whose floating-point entries (or just `keys`) hold NaN or Inf,
    naming the file and the key: averaged in, one bad value would spoil every result."""
    for key in state if keys is None else keys:
        value = state[key]
        if value.is_floating_point() and not bool(finite(value).all()):
            raise _non_finite(source, key, int((~finite(value)).sum()), value.numel())


def _non_finite(source: str, key: str, bad: int, numel: int) -> CheckpointError:
    return CheckpointError(f"{source}: key {key!r} holds {bad} NaN or Inf value(s) of {numel}; "
                           "leave this checkpoint out (a diverged step?) or repair it")


def _default_file_mode() -> int:
    """The mode open() gives a new file under the current umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file through `write(temporary_path)`, then move it into place: a crash, a
    full disk or an exception leaves the old file (or none), never half of one, and no
    temporary file. The new file gets the old one's mode, or the umask's as open() would
    give it. An unwritable location is an OutputError naming the path."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file path such as {path / 'averaged.safetensors'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o7777 if path.exists() else _default_file_mode()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; choose a writable location") from exc
    try:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc} (the previous file, if any, is "
                          "unchanged); free space or choose another location") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | os.PathLike, obj: Any, *, allow_nan: bool = True) -> Path:
    """Write `obj` as indented JSON, atomically (see atomic_write). allow_nan=False refuses
    NaN and infinities (ValueError, nothing written) instead of writing them as the bare
    NaN / Infinity that strict JSON readers reject."""
    text = json.dumps(obj, indent=1, allow_nan=allow_nan)  # before the write: a refusal leaves nothing
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Write a state_dict as .safetensors or with torch.save, atomically (see atomic_write):
    a crash leaves either the old file or the new one, never half of one."""
    if not isinstance(state, Mapping):
        raise InvalidTypeError(f"state must be a mapping of names to tensors, got {type(state).__name__}")
    if not state:
        raise InvalidArgumentError(f"{path}: the state_dict to save is empty; pass the tensors to save")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise InvalidTypeError(f"state[{key!r}] is {type(value).__name__}: a state_dict to save holds tensors "
                                   "under string names only; leave other entries out")
        if kind := _not_dense_values(value):
            raise InvalidArgumentError(f"state[{key!r}] is {kind}; save real, dense tensors (materialise meta "
                                       "tensors, .to_dense() sparse ones)")
    if Path(path).suffix == ".safetensors" and "__metadata__" in state:
        raise InvalidArgumentError(f"{path}: a .safetensors file cannot hold a tensor named '__metadata__' (the "
                                   "format reserves that name for its header); rename it or save as .pt")
    # clone: safetensors refuses tensors that share memory (tied weights, views)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    if Path(path).suffix == ".safetensors":
        return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp))
    return atomic_write(path, lambda tmp: torch.save(tensors, tmp))
