"""Which files and directories are checkpoints.

What a checkpoint may be:
- a state_dict (a mapping of names to tensors);
- a file: .pt, .pth, .bin, Lightning's .ckpt and timm's .pth.tar (read by
  torch.load(weights_only=True), see io.read), or .safetensors;
- a Hugging Face `save_pretrained` directory: one checkpoint, read from its
  model.safetensors or pytorch_model.bin, or, when sharded, from every shard its
  model.safetensors.index.json (or pytorch_model.bin.index.json) lists;
- a torch.distributed.checkpoint directory (it holds .metadata), read column by column
  (see columns.ColumnReader).

`checkpoints` arguments take a list of those, a glob pattern, or a directory: its checkpoint
files, its save_pretrained subdirectories (an HF Trainer's checkpoint-N) and its
torch.distributed.checkpoint subdirectories, in natural name order (step=5 before
step=10). The copies that training scripts write beside their checkpoints are left out of
a directory that holds others, with a warning (name one in a list to use it): Lightning's
last.ckpt (save_last=True), the torchvision reference scripts' checkpoint.pth and timm's
last.pth.tar and model_best.pth.tar, each of which would count one checkpoint twice, and
timm's mid-epoch recovery-E-B.pth.tar and unfinished tmp.pth.tar, which are not points of
the run's epoch trajectory.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from twa_kernels._checks import path_without_nul
from twa_kernels._outdir import FIT_FILE
from twa_kernels.errors import CheckpointError, InvalidTypeError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".pth.tar")  # .pth.tar: timm
# a save_pretrained directory's weights, in the order transformers itself prefers them, then
# a PEFT adapter's (peft's save_pretrained writes the adapter weights alone)
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
# Files that training scripts write beside their checkpoints, by file name: copies of another
# checkpoint, which averaged in would count it twice, and timm's mid-epoch and unfinished
# files, which are not points of the epoch trajectory
_COPIES = re.compile(r"last(-v\d+)?\.ckpt"  # Lightning, save_last=True: the newest
                     r"|checkpoint\.pth"  # torchvision's reference scripts: the newest
                     r"|(last|model_best)\.pth\.tar"  # timm's train.py: the newest and the best
                     r"|recovery-\d+-\d+\.pth\.tar"  # timm: mid-epoch, every --recovery-interval batches
                     r"|(recovery_)?tmp\.pth\.tar")  # timm: a save it had not finished

logger = logging.getLogger(__name__)

CheckpointSpec = Union[str, os.PathLike, Mapping[str, Tensor]]
Checkpoints = Union[str, os.PathLike, Sequence[CheckpointSpec]]


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


# A save_pretrained index maps each key to its shard: about 100 bytes a key, so a model of a
# million tensors stays under 128 MiB; a larger "index" is not one, and is not read into memory
_MAX_INDEX_BYTES = 128 << 20


def _index_shards(index: Path) -> list[Path]:
    """The shard files a save_pretrained index (`{"weight_map": {key: file}}`) lists."""
    try:
        if index.stat().st_size > _MAX_INDEX_BYTES:
            raise ValueError(f"it is {index.stat().st_size} bytes, more than an index of any model "
                             f"({_MAX_INDEX_BYTES >> 20} MiB)")
        weight_map = json.loads(index.read_text())["weight_map"]
        files = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a readable index of shards ({type(exc).__name__}: {exc}); "
                              "save the model again with save_pretrained") from exc
    except RecursionError:  # save_pretrained writes a flat weight_map: nesting this deep is not an index
        raise CheckpointError(f"{index}: not a valid index of shards (its JSON is nested too deeply to read); "
                              "save the model again with save_pretrained") from None
    shards = []
    for name in sorted(files, key=str):
        # a shard is a file beside its index: a path elsewhere would read files the
        # checkpoint does not own
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise CheckpointError(f"{index}: shard {name!r} is not a file name in {index.parent}")
        shard = index.parent / name
        if not os.path.lexists(shard):
            raise CheckpointError(f"{index}: lists shard {name}, which is missing from {index.parent}")
        if not shard.is_file():
            raise CheckpointError(f"{index}: lists shard {name}, which in {index.parent} is not a regular file (a "
                                  "directory, a pipe, a device or a broken link); put the shard's file there")
        shards.append(shard)
    if not shards:
        raise CheckpointError(f"{index}: lists no shards; save the model again with save_pretrained")
    return shards


def _directory_error(path: object) -> CheckpointError:
    if _unfinished_save(Path(str(path))):
        return CheckpointError(
            f"{path}: a checkpoint whose save did not finish: it holds torch.distributed.checkpoint data files "
            "without their .metadata, or a save_pretrained config.json without weights; save it again, or leave it "
            "out")
    return CheckpointError(
        f"{path}: is a directory, not a checkpoint. A checkpoint directory is a Hugging Face save_pretrained "
        f"directory: it holds {' or '.join(_HF_WEIGHTS)}. To use every checkpoint file in a directory, pass the "
        "directory itself as `checkpoints`, not inside a list")


def _unfinished_save(entry: Path) -> bool:
    """Whether a subdirectory that is not a checkpoint holds the start of one: DCP data
    files (.distcp) or a Hugging Face config.json, without what completes them."""
    try:
        return any(child.name.endswith(".distcp") or child.name == "config.json" for child in entry.iterdir())
    except OSError:
        return False


def _relative_to_cwd(spec: str) -> str:
    """For a message about a relative path that names nothing: where it was looked for (a
    config's paths are read from the working directory, not from the config's folder)."""
    return "" if os.path.isabs(spec) else f" (looked for from the working directory {os.getcwd()})"


def _natural_key(path: Path) -> list:
    """Name order with digit runs compared as numbers: step=5 before step=10."""
    parts = re.split(r"(\d+)", path.name)
    return [int(part) if i % 2 else part for i, part in enumerate(parts)]  # digits at odd positions


def _directory_checkpoints(directory: Path) -> list[Path]:
    """A directory's checkpoint files, save_pretrained and torch.distributed.checkpoint
    subdirectories, in natural order (the library's own files left out)."""
    found, skipped, unfinished, unread = [], [], [], []
    for entry in directory.iterdir():
        if FIT_FILE.match(entry.name):
            continue
        if entry.is_dir():
            if checkpoint_directory_files(entry) is not None or is_dcp_directory(entry):
                found.append(entry)
            elif _unfinished_save(entry):
                unfinished.append(entry)
            elif entry.name.endswith(CHECKPOINT_SUFFIXES):  # named as a checkpoint, holding none read here
                unread.append(entry)
        elif entry.name.endswith(CHECKPOINT_SUFFIXES):
            (skipped if _COPIES.fullmatch(entry.name) else found).append(entry)
    if unfinished:  # a save killed part way (the newest checkpoint, typically): the average has one fewer
        logger.warning("%s: leaving out %s, whose save did not finish (torch.distributed.checkpoint data files "
                       "without their .metadata, or a save_pretrained config.json without weights); the average "
                       "uses the %d complete checkpoints: save that one again to include it", directory,
                       ", ".join(p.name for p in sorted(unfinished)), len(found))
    if unread:
        logger.warning("%s: leaving out %s, folders named like checkpoint files that hold no checkpoint this library "
                       "reads (a DeepSpeed checkpoint is such a folder: convert it to one file with Lightning's "
                       "convert_zero_checkpoint_to_fp32_state_dict or DeepSpeed's zero_to_fp32.py)", directory,
                       ", ".join(p.name for p in sorted(unread)))
    if skipped and found:
        logger.warning("%s: leaving out %s, which a training script writes beside its checkpoints: copies that "
                       "would count a checkpoint twice (Lightning's last.ckpt, torchvision's checkpoint.pth, timm's "
                       "last.pth.tar and model_best.pth.tar) or timm's mid-epoch recovery-*.pth.tar and unfinished "
                       "tmp.pth.tar; pass a list of files to choose them yourself", directory,
                       ", ".join(p.name for p in sorted(skipped)))
    else:
        found += skipped
    stems: dict[str, Path] = {}
    for path in found:  # epoch_4.pt beside its converted epoch_4.safetensors: one checkpoint, counted twice
        if path.is_file():
            stem = next(path.name[: -len(s)] for s in CHECKPOINT_SUFFIXES if path.name.endswith(s))
            if stem in stems:
                raise CheckpointError(f"{directory}: {stems[stem].name} and {path.name} look like one checkpoint in "
                                      "two formats, which would count twice; pass a glob of one format, e.g. "
                                      f"'{directory / ('*' + path.name[len(stem):])}'")
            stems[stem] = path
    return sorted(found, key=_natural_key)


def resolve_checkpoints(checkpoints: Checkpoints) -> list[CheckpointSpec]:
    """A list of state_dicts and paths from: such a list (a glob in it gives its files), a
    directory (its checkpoint files, save_pretrained and DCP subdirectories in natural name
    order; a save_pretrained directory is one checkpoint) or a glob pattern. An empty result
    is an error, and so is a file listed twice in a list; a directory's or glob's links to a
    file it already gives, and copies of one (the same bytes), are left out, with a warning."""
    if checkpoints is None:
        raise InvalidTypeError("checkpoints is None: pass a list of checkpoint files or state_dicts, a directory "
                               "or a glob pattern")
    if isinstance(checkpoints, Mapping):
        raise InvalidTypeError("checkpoints is one state_dict (a mapping of names to tensors) where a list of "
                               "checkpoints was expected: pass [state_dict], or a list of several")
    if isinstance(checkpoints, (str, os.PathLike)):
        path_without_nul(checkpoints, "the checkpoint path", CheckpointError)
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
            where = f"glob {spec!r} matches no files{_relative_to_cwd(spec)}"
        else:
            if not os.path.lexists(spec):  # before the count of checkpoints is judged
                raise CheckpointError(f"{spec}: no such checkpoint file, directory or glob match"
                                      f"{_relative_to_cwd(spec)}")
            found, where = [Path(spec)], ""
        if not found:
            raise CheckpointError(where)
        return _each_file_once(found)
    if isinstance(checkpoints, Tensor) or not isinstance(checkpoints, Iterable):
        raise InvalidTypeError(f"checkpoints must be a list of checkpoint files or state_dicts, a directory or a "
                               f"glob pattern, got {type(checkpoints).__name__}")
    items = []
    for i, item in enumerate(checkpoints):
        if not isinstance(item, (str, os.PathLike, Mapping)):
            raise InvalidTypeError(f"checkpoint #{i} is a {type(item).__name__}: each checkpoint must be a file "
                                   "path, a save_pretrained directory or a state_dict")
        if not isinstance(item, Mapping):
            path_without_nul(item, f"checkpoint #{i}", CheckpointError)
        if not isinstance(item, Mapping) and not os.path.exists(item) and any(ch in str(item) for ch in "*?["):
            found = sorted((Path(p) for p in globlib.glob(str(item))), key=_natural_key)  # a glob in a list
            if not found:
                raise CheckpointError(f"glob {str(item)!r} (checkpoint #{i}) matches no files"
                                      f"{_relative_to_cwd(str(item))}")
            items += found
            continue
        if (not isinstance(item, Mapping) and os.path.isdir(item) and checkpoint_directory_files(item) is None
                and not is_dcp_directory(item)):  # DCP: read by ColumnReader
            raise _directory_error(item)
        items.append(item)
    if not items:
        raise CheckpointError("no checkpoints given: pass the checkpoints to average, as paths, a "
                              "directory or glob of them, or state_dicts")
    _check_listed_once(items)
    return items


def trainer_output_hint(checkpoints: object) -> str:
    """"" or, when `checkpoints` is a transformers Trainer output directory (its final
    save_pretrained weights beside checkpoint-* folders), advice to pass those folders: read
    as given, it is one checkpoint. A list of that one directory (as a glob resolves to)
    is read as the directory."""
    if isinstance(checkpoints, (list, tuple)) and len(checkpoints) == 1:
        checkpoints = checkpoints[0]
    if not isinstance(checkpoints, (str, os.PathLike)) or not os.path.isdir(checkpoints):
        return ""
    runs = sorted(p.name for p in Path(checkpoints).iterdir() if p.is_dir() and p.name.startswith("checkpoint-"))
    if not runs:
        return ""
    return (f"; {checkpoints} is one save_pretrained checkpoint itself, beside {len(runs)} checkpoint-* "
            f"folders: pass those, e.g. the glob '{Path(checkpoints) / 'checkpoint-*'}'")


def _identity(path: CheckpointSpec) -> tuple:
    """What names one file whatever path reaches it: its device and inode (a symbolic or a
    hard link to it has the same), or its resolved path where it cannot be stat'ed."""
    try:
        info = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", info.st_dev, info.st_ino)


def _each_file_once(found: list[Path]) -> list[Path]:
    """A directory's or a glob's files, a file that several of them reach (a link such as
    latest.pt -> epoch_9.pt) kept once, with a warning: counted twice, it would weigh double
    in every average. The name kept is the one that is not a symbolic link (the target, in
    its place in the order), else the first in natural order."""
    groups: dict[tuple, list[Path]] = {}
    for path in found:
        groups.setdefault(_identity(path), []).append(path)
    chosen = {id(next((p for p in paths if not p.is_symlink()), paths[0])) for paths in groups.values()}
    kept = [path for path in found if id(path) in chosen]
    dropped = [f"{path.name} (the same file as {next(p for p in groups[_identity(path)] if id(p) in chosen).name})"
               for path in found if id(path) not in chosen]
    if dropped:
        logger.warning("leaving out %s: a link to a checkpoint already counted would count it twice; pass a list "
                       "of files to choose them yourself", ", ".join(dropped))
    return _without_copies(kept)


_SAMPLES, _SAMPLE_BYTES = 8, 4096


def _sample(path: Path, size: int) -> bytes | None:
    """A few blocks spread over the file (its end included): checkpoints of one run share
    their size and headers, and differ in nearly every block of their weights."""
    try:
        with open(path, "rb") as file:
            blocks = []
            for i in range(_SAMPLES):
                file.seek(max(0, size * (i + 1) // _SAMPLES - _SAMPLE_BYTES))
                blocks.append(file.read(_SAMPLE_BYTES))
            return b"".join(blocks)
    except OSError:  # unreadable here: the read says so, by name
        return None


def _digest(path: Path) -> bytes | None:
    """A hash of the whole file (None where it cannot be read: the read says so, by name)."""
    digest = hashlib.blake2b(digest_size=32)
    try:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.digest()


def _without_copies(found: list[Path]) -> list[Path]:
    """`found` less the files whose bytes repeat another's (a `last.pt` copied from the newest
    epoch), with a warning: counted twice, it would weigh double in every average.
    Only files of one size are sampled at a few blocks, and only those alike there are read
    whole, each once (checkpoints of a frozen backbone can differ in few blocks)."""
    by_size: dict[int, list[Path]] = {}
    for path in found:
        if path.is_file():  # save_pretrained and DCP directories: a copy of one is a new save
            by_size.setdefault(path.stat().st_size, []).append(path)
    copies: dict[int, Path] = {}  # id of a copy -> the file it repeats
    for size, paths in by_size.items():
        if len(paths) < 2:
            continue
        by_sample: dict[bytes, list[Path]] = {}
        for path in paths:
            if (sample := _sample(path, size)) is not None:
                by_sample.setdefault(sample, []).append(path)
        for alike in by_sample.values():
            same: dict[bytes, list[Path]] = {}
            for path in alike if len(alike) > 1 else ():
                if (digest := _digest(path)) is not None:
                    same.setdefault(digest, []).append(path)
            for group in same.values():
                # the one whose name numbers it (step=10.pt, not last.pt) is kept, in its place in
                # the order: the alias sorts elsewhere and would move the newest epoch (EMA's
                # weights, TWA's rows); else the first in `found`'s order
                kept = next((path for path in group if re.search(r"\d", path.name)), group[0])
                copies.update({id(path): kept for path in group if path is not kept})
    if copies:
        logger.warning("leaving out %s: a copy of a checkpoint already counted would count it twice; pass a list of "
                       "files to choose them yourself", ", ".join(f"{p.name} (the same bytes as {copies[id(p)].name})"
                                                                for p in found if id(p) in copies))
    return [path for path in found if id(path) not in copies]


def _check_listed_once(items: list[CheckpointSpec]) -> None:
    """A file listed twice (overlapping globs, a glob and one of its files, a symbolic or
    hard link to it) would count twice in every average; refused, by its position in the list."""
    seen: dict[tuple, int] = {}
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            continue
        key = _identity(item)
        if key in seen:
            raise CheckpointError(f"{item} is listed twice (checkpoints #{seen[key]} and #{i}): it would count "
                                  "twice in the average; list each checkpoint once")
        seen[key] = i
    _check_not_one_live_state(items)


def _check_not_one_live_state(items: list[CheckpointSpec]) -> None:
    """State_dicts that all hold the same tensors in memory are one state: most often
    `checkpoints.append(model.state_dict())` in a loop, whose entries are the model's live
    weights, so every one is the last. Averaged, they gave the last weights as if they were
    the run's average; refused. (A state_dict repeated among others is the caller's
    weighting, and fine-tunes sharing a frozen backbone's tensors are distinct states.)"""
    if len(items) < 2 or not all(isinstance(item, Mapping) for item in items):
        return
    try:
        memory = [frozenset((v.device.type, v.untyped_storage().data_ptr()) for v in item.values()
                            if isinstance(v, Tensor) and v.numel() and v.layout == torch.strided
                            and v.device.type != "meta") for item in items]
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage (DTensor): no check
        return
    if memory[0] and all(m == memory[0] for m in memory[1:]):
        raise CheckpointError(f"the {len(items)} state_dicts hold the same tensors in memory, so they are one state "
                              "(model.state_dict() returns the model's live weights, which later steps change); "
                              "keep a copy at each checkpoint: {k: v.clone() for k, v in model.state_dict().items()}")
