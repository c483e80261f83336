"""A subspace built from this rank's columns only (TWA(..., shard=True)).

Each rank reads columns [c_r, c_r+1) of every checkpoint (columns.ColumnReader), so no rank
holds a whole checkpoint, and gets the same center and basis columns, bit for bit, as the
single-process build. A sharded build cannot compare bases (each rank holds other
columns), so it compares the files: each checkpoint's size, a digest of its header (a zip
torch file's records' CRC-32s, a safetensors header, a DCP directory's tensors and data
files) and of a few columns every rank reads, raising CheckpointContentMismatchError naming
each file whose copies differ. Every local step runs under _collectives.agree.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from twa_kernels import builder
from twa_kernels._progress import progress_bar
from twa_kernels.builder import Layout
from twa_kernels.columns import ColumnReader
from twa_kernels.io import checkpoint_directory_files, is_dcp_directory, resolve_checkpoints
from twa_kernels.io.read import is_torch_zip
from twa_kernels.quant import QuantizedBasis, block_offsets_from_sizes
from twa_kernels._collectives import BasisMismatchError, agree, digest, gather_rows, ranks_unlike_rank0
from twa_kernels.sharding import local_blocks, shard_columns
from twa_kernels.subspace import block_sizes_for


class CheckpointListMismatchError(BasisMismatchError):
    """The ranks were given different checkpoint lists."""


class CheckpointContentMismatchError(CheckpointListMismatchError):
    """The ranks were given the same checkpoint paths, but some of the files differ."""


@dataclass
class ShardedSubspace:
    """This rank's columns [start, stop) of a subspace: the local center and basis, and the
    global layout (num_cols D, num_blocks B; local blocks are global blocks [b_lo, b_hi))."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    center: Tensor
    basis: QuantizedBasis
    start: int
    stop: int
    b_lo: int
    b_hi: int
    num_cols: int
    num_blocks: int
    aliases: dict[str, list[str]]
    source_stamps: list[tuple | None] | None = None  # as Subspace.source_stamps


def _same_checkpoint_lists(specs: list, group: Any) -> None:
    """All-gather a digest of the checkpoint list (paths, or state_dict count) and raise
    CheckpointListMismatchError naming the ranks whose list differs from rank 0's."""
    text = "\n".join(str(s) if not isinstance(s, Mapping) else f"<state_dict {i}>" for i, s in enumerate(specs))
    fingerprint = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
    table = gather_rows(torch.tensor([fingerprint, len(specs)], dtype=torch.int64), group,
                        "the check of the ranks' checkpoint lists")
    bad = [r for r, row in enumerate(table) if not torch.equal(row, table[0])]
    if bad:
        raise CheckpointListMismatchError(
            f"ranks {bad} were given a different checkpoint list from rank 0's ({len(specs)} here): pass every "
            "rank the same files in the same order")


def _same_build_settings(settings: tuple, group: Any) -> None:
    """All-gather a digest of the build settings (bits, granularity, group_size, the names
    and shapes) and raise BasisMismatchError on every rank when a rank's differ from rank
    0's: a shard quantised another way trains silently wrong, and a different group size
    lays the shards out differently, so the first collective over them would abort."""
    bad = ranks_unlike_rank0(settings, group, "the check of the ranks' build settings")
    if bad:
        raise BasisMismatchError(
            f"ranks {bad} were given other build settings than rank 0 (bits, granularity, group_size or the model's "
            f"parameter names and shapes; here bits={settings[0]!r}, granularity={settings[1]!r}, "
            f"group_size={settings[2]!r}): build the TWA with the same arguments on every rank")


_SAMPLE_WINDOWS, _SAMPLE_COLUMNS = 4, 64  # the columns every rank reads of every checkpoint, to compare


def _file_fingerprint(spec: Any) -> tuple[int, int]:
    """(size in bytes, digest of the file's header) of a checkpoint file or DCP directory,
    from its metadata alone; (0, 0) for an in-memory state_dict. The header of a zip torch
    file holds a CRC-32 of every record, so it covers the whole content; a safetensors
    header names the tensors, their dtypes, shapes and offsets; a DCP directory's, its
    tensors and data files (not its save id, which differs between two saves of one state)."""
    if isinstance(spec, Mapping):
        return 0, 0
    path = os.fspath(spec)
    if os.path.isdir(path) and not is_dcp_directory(path):
        # a save_pretrained directory: the fingerprints of its weight files, by relative name
        parts = [(os.path.relpath(f, path), *_file_fingerprint(f)) for f in checkpoint_directory_files(path) or []]
        return sum(size for _, size, _ in parts), digest(sorted(parts))
    if os.path.isdir(path):
        # _dcp imports torch.distributed.checkpoint (about a second): only a DCP directory pays for it
        from twa_kernels import _dcp

        metadata = _dcp.read_metadata(path)
        files = sorted({info.relative_path for info in metadata.storage_data.values()})
        sizes = [os.path.getsize(os.path.join(path, f)) if os.path.isfile(os.path.join(path, f)) else -1 for f in files]
        layout = sorted((k, tuple(shape), str(dtype)) for k, (shape, dtype) in _dcp.tensor_entries(metadata).items())
        places = sorted((i.fqn, tuple(i.offset or ()), d.relative_path, d.offset, d.length)
                        for i, d in metadata.storage_data.items())
        return sum(sizes), digest(layout, places, files, sizes)
    size = os.path.getsize(path)
    if is_torch_zip(path):
        # record names start with the file's name at save time, and the serialization id
        # identifies a save, not the weights: both left out
        with zipfile.ZipFile(path) as archive:
            records = sorted((i.filename.split("/", 1)[-1], i.CRC, i.file_size) for i in archive.infolist()
                             if not i.filename.endswith(".data/serialization_id"))
        return size, digest(records)
    with open(path, "rb") as f:
        head = f.read(8)
        if path.endswith(".safetensors") and len(head) == 8:
            header = f.read(min(int.from_bytes(head, "little"), 100 << 20))
            try:  # the tensors' entries; __metadata__ is free text a writer may fill differently
                entries = json.loads(header)
                entries.pop("__metadata__", None)
                return size, digest(sorted((k, repr(v)) for k, v in entries.items()))
            except (ValueError, AttributeError, RecursionError):  # not JSON: ColumnReader has refused it already
                return size, digest(header)
        head += f.read(64 << 10)
    return size, digest(head)


def _content_sample(reader: ColumnReader, names: list[str], shapes: list[tuple[int, ...]], num_cols: int,
                    aliases: dict[str, list[str]]) -> int:
    """Digest of the same columns of a checkpoint on every rank: _SAMPLE_WINDOWS windows of
    _SAMPLE_COLUMNS spread over the model, the first _SAMPLE_COLUMNS of every tensor and the
    model's last ones. Two copies of a path that hold different weights (another epoch,
    another run, one tensor replaced) differ there, whatever their headers say; a copy that
    differs only in columns outside these windows is not seen."""
    h = hashlib.sha256()
    width = min(_SAMPLE_COLUMNS, num_cols)
    windows = {min(j * num_cols // _SAMPLE_WINDOWS, num_cols - width) for j in range(_SAMPLE_WINDOWS)}
    windows.add(num_cols - width)
    start = 0
    for shape in shapes:  # a window at the start of each tensor: one replaced tensor shows
        windows.add(min(start, num_cols - width))
        start += math.prod(shape)
    for a in sorted(windows):
        values = reader.columns(names, shapes, a, a + width, aliases, check_finite=False)
        h.update(values.numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _same_checkpoint_contents(specs: list, prints: list[tuple[int, int, int]], group: Any) -> None:
    """All-gather each checkpoint's (size, header digest, sample digest) and raise
    CheckpointContentMismatchError naming each file that differs from rank 0's copy, on
    which ranks and how. Replicated mode compares the whole bases; sharded mode cannot (each
    rank holds other columns), so it compares the files."""
    table = gather_rows(torch.tensor(prints, dtype=torch.int64).reshape(-1), group,
                        "the check of the ranks' checkpoint files")
    ref = table[0].view(len(specs), 3)
    what = ("size", "header", "sampled weights")
    problems = []
    for i, spec in enumerate(specs):
        differ: dict[int, list[str]] = {}
        for rank, row in enumerate(table[1:], start=1):
            fields = [what[j] for j in range(3) if row.view(len(specs), 3)[i, j] != ref[i, j]]
            if fields:
                differ[rank] = fields
        if differ:
            name = str(spec) if not isinstance(spec, Mapping) else f"state_dict #{i}"
            problems.append(f"{name} (" + "; ".join(f"rank {r}: {', '.join(f)}" for r, f in differ.items()) + ")")
    if problems:
        raise CheckpointContentMismatchError(
            f"the ranks were given the same checkpoint paths, but these differ from rank 0's copy: "
            f"{', '.join(problems)}. Every rank must read the very same files: copy rank 0's checkpoints to every "
            "node, or put them on a shared file system")


@torch.no_grad()
def build_shard(checkpoints: Any, process_group: Any, names: list[str], shapes: list[tuple[int, ...]],
                bits: int | None = 4, granularity: str | int = "tensor", group_size: int = 128,
                aliases: dict[str, list[str]] | None = None, progress: bool | None = None) -> ShardedSubspace:
    """Subspace.from_checkpoints for this rank's columns only: each checkpoint is read for
    columns [c_r, c_r+1) alone (see columns.ColumnReader), so no rank holds a whole checkpoint. The
    result equals the single-process subspace's columns bit for bit (the center is the same
    float64 mean, and quantisation groups never cross a shard edge). Rank 0 shows progress."""
    if dist.get_rank(process_group) != 0:
        progress = False
    # every local step runs under agree(): a rank that fails there (an unreadable or corrupt
    # file of its own) makes every rank stop with its error, not wait in the next collective
    def resolve() -> list:
        specs = resolve_checkpoints(checkpoints)
        builder.require_two_checkpoints(specs, checkpoints)
        return specs

    specs = agree(resolve, process_group, "resolving its checkpoints")
    _same_checkpoint_lists(specs, process_group)
    aliases = {n: list(a) for n, a in (aliases or {}).items() if len(a) > 1}
    shapes = [tuple(s) for s in shapes]
    _same_build_settings((bits, granularity, group_size, tuple(names), tuple(shapes)), process_group)
    numels = [math.prod(s) for s in shapes]
    num_cols = sum(numels)
    edges = shard_columns(num_cols, group_size, dist.get_world_size(process_group))
    start, stop = edges[dist.get_rank(process_group)], edges[dist.get_rank(process_group) + 1]

    layout = Layout(names, shapes, aliases, [*names, *(a for n in names for a in aliases.get(n, ()))])
    steps = lambda items, what: progress_bar(items, enabled=progress, desc=f"{what} (shard)",  # noqa: E731
                                             total=len(items), unit="ckpt")
    prints: list[tuple[int, int, int]] = []

    def fingerprint(i: int, reader: ColumnReader) -> None:
        prints.append((*_file_fingerprint(specs[i]), _content_sample(reader, names, shapes, num_cols, aliases)))

    center = agree(lambda: builder.average(specs, layout, start, stop, group_size, steps, fingerprint),
                   process_group, "reading its checkpoints")
    _same_checkpoint_contents(specs, prints, process_group)
    offsets = block_offsets_from_sizes(block_sizes_for(numels, granularity), num_cols)
    local_offsets, b_lo, b_hi = local_blocks(offsets, start, stop)

    def build() -> QuantizedBasis:
        return builder.build_basis(specs, layout, center, start, local_offsets, bits, group_size, steps)

    basis = agree(build, process_group, "building its shard of the basis")
    return ShardedSubspace(list(names), shapes, center, basis, start, stop, b_lo, b_hi, num_cols,
                           offsets.numel() - 1, aliases, layout.stamps(len(specs)))
