"""TWA across processes on torch.distributed (gloo on CPU, NCCL on GPU).

    dist.init_process_group("nccl")                     # torchrun sets the environment
    twa = tk.TWA(model, ckpts, bits=4, process_group=dist.group.WORLD)              # replicated
    twa = tk.TWA(model, ckpts, bits=4, process_group=dist.group.WORLD, shard=True)  # sharded

Replicated: every rank holds the whole basis. `project` is linear, so each rank's backward
projects its own dL/dw and only the [k, B] coefficient gradient is averaged: one all-reduce
of k x B floats per backward (a hook on the coefficients; no host sync), instead of the D
floats a data-parallel step over the model would move.

Sharded: rank r holds columns [c_r, c_r+1) of the codes, scales, mins and center, cut on
quantisation-group edges. Forward reconstructs the local columns and all-gathers them into
the full weight vector (as FSDP gathers its flat parameters); backward reduce-scatters dL/dw
to the column owners, projects locally and all-reduces the [k, B] partial sums. A step moves
2 x W x L + k x B floats, L the largest shard: 2 D + k B up to a padding of fewer than
W x group_size elements (all_gather_into_tensor needs equal chunks).

Every rank must hold the same basis: construction all-gathers a cheap checksum of it and
raises BasisMismatchError naming the ranks that differ. A sharded build cannot compare
bases (each rank holds other columns), so it compares the files: each checkpoint's size, a
digest of its header (a zip torch file's records' CRC-32s, a safetensors header, a DCP
directory's tensors and data files) and of a few columns every rank reads, raising
CheckpointContentMismatchError naming each file whose copies differ. A rank that fails
while building (a corrupt file of its own) makes every rank stop together, each naming it
(see agree); under torchrun, `record_errors` puts each rank's own error in the job summary.

DDP over a TWA module is supported (TWA tells DDP to ignore the center and basis buffers,
so they are never broadcast); it averages the coefficient gradients itself, so leave
process_group=None under DDP.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import math
import os
import time
import traceback
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, TWAKernelsError, UsageError
from twa_kernels.io import ColumnReader, checkpoint_directory_files, resolve_checkpoints
from twa_kernels.ops import project, reconstruct
from twa_kernels.quant import QuantizedBasis, _quantize_row, block_offsets_from_sizes, quantize, stack_rows
from twa_kernels.subspace import _progress, block_sizes_for, mean_center

if TYPE_CHECKING:  # twa imports this module; no import upward at run time
    from twa_kernels.twa import TWA

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# TWA's state that is identical on every rank (replicated) or owned per rank (sharded):
# never broadcast by DDP (see DistributedDataParallel's _ddp_params_and_buffers_to_ignore)
BASIS_BUFFERS = ("center", "basis_codes", "basis_scales", "basis_mins", "basis_block_offsets", "basis_meta")

_CHECKSUM_FIELDS = ("k", "columns", "blocks", "bits", "group_size", "codes sum", "codes weighted sum",
                    "scales sum", "mins sum", "center sum", "center weighted sum", "block offsets sum")
_EXACT_FIELDS = 5  # the metadata counts, compared exactly; the sums to a relative 1e-12


def _all_gather(out: Tensor, t: Tensor, group: Any) -> None:
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor warns); older has only the latter
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, t, group=group)


def _reduce_scatter(out: Tensor, t: Tensor, group: Any) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, t, op=dist.ReduceOp.SUM,
                                                                                  group=group)


class BasisMismatchError(TWAKernelsError, RuntimeError):
    """The ranks of a process group hold different bases (or centers)."""


class ShardingError(InvalidArgumentError):
    """shard=True cannot run: too many ranks for the basis, or a backend without the collectives."""


class Comm:
    """The collectives TWA calls, on one process group, counting what each moves.

    Sizes are those of the full-size side of each collective, the convention FSDP's figures
    use: an all-reduce counts its tensor, an all-gather its output, a reduce-scatter its
    input. `bytes` maps the collective's name to the bytes counted since `reset()`.
    """

    def __init__(self, group: Any):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def _count(self, name: str, t: Tensor) -> None:
        self.bytes[name] += t.numel() * t.element_size()
        self.calls[name] += 1

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum of t over the ranks, in place."""
        self._count("all_reduce", t)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_gather_into_tensor(self, out: Tensor, t: Tensor) -> Tensor:
        self._count("all_gather", out)
        _all_gather(out, t, self.group)
        return out

    def reduce_scatter_tensor(self, out: Tensor, t: Tensor) -> Tensor:
        self._count("reduce_scatter", t)
        _reduce_scatter(out, t, self.group)
        return out


def attach(twa: TWA, process_group: Any, shard: bool, built: Any = None) -> Replicated | Sharded:
    """Called by TWA's constructor: check that every rank holds the same basis, then set up
    the replicated gradient hook or cut the basis into this rank's shard. `built` is what
    the TWA was built from: a ShardedSubspace (build_shard) is this rank's shard already."""
    if not dist.is_available() or not dist.is_initialized():
        raise UsageError("TWA(process_group=...) needs torch.distributed initialised: call "
                           "torch.distributed.init_process_group(...) first (torchrun sets its environment)")
    if isinstance(built, ShardedSubspace):  # built from this rank's columns: shards differ by design
        return Sharded(twa, process_group, built)
    check_same_basis(twa.center, twa.basis, process_group)
    return Sharded(twa, process_group) if shard else Replicated(twa, process_group)


def comm_bytes(twa: nn.Module) -> dict[str, int]:
    """Bytes moved by `twa`'s own collectives since the last reset, by collective name
    (empty for a single-process TWA). Reset with `reset_comm_bytes(twa)`."""
    state = getattr(twa, "_dist", None)
    return dict(state.comm.bytes) if state is not None else {}


def reset_comm_bytes(twa: nn.Module) -> None:
    state = getattr(twa, "_dist", None)
    if state is not None:
        state.comm.reset()


# -- the start-up check --------------------------------------------------------------------


@torch.no_grad()
def basis_checksum(center: Tensor, qb: QuantizedBasis) -> Tensor:
    """A float64 fingerprint of (center, basis): the layout and plain and position-weighted
    sums of the codes, scales, mins and center. Rows are summed one at a time, so the
    temporary memory is one row in float64. Reordered checkpoints or a different bits,
    group_size or granularity change it."""
    def weighted(row: Tensor) -> Tensor:
        weights = torch.arange(row.numel(), device=row.device, dtype=torch.float64).remainder_(65521).add_(1)
        return (row.reshape(-1).double() * weights).sum()

    codes_sum = torch.zeros((), dtype=torch.float64, device=qb.device)
    codes_weighted = torch.zeros_like(codes_sum)
    for r in range(qb.k):
        row = qb.codes[r]
        codes_sum += row.double().sum()
        codes_weighted += weighted(row) * (r + 1)
    values = [torch.tensor(float(v), dtype=torch.float64, device=qb.device)
              for v in (qb.k, qb.num_cols, qb.num_blocks, qb.bits or 0, qb.group_size)]
    values += [codes_sum, codes_weighted, qb.scales.double().sum(), qb.mins.double().sum(),
               center.double().sum(), weighted(center), qb.block_offsets.double().sum()]
    return torch.stack(values)


def check_same_basis(center: Tensor, qb: QuantizedBasis, group: Any) -> None:
    """Raise BasisMismatchError on every rank when some rank's (center, basis) differs from
    rank 0's. One all-gather of 12 float64 per rank; every rank sees the same table, so
    every rank raises (no rank is left waiting in a later collective)."""
    mine = basis_checksum(center, qb)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    ref = table[0].cpu()
    bad: dict[int, list[str]] = {}
    for rank, row in enumerate(table[1:], start=1):
        row = row.cpu()
        exact = ~torch.eq(row[:_EXACT_FIELDS], ref[:_EXACT_FIELDS])
        close = ~torch.isclose(row[_EXACT_FIELDS:], ref[_EXACT_FIELDS:], rtol=1e-12, atol=0)
        differs = torch.cat([exact, close]).nonzero().flatten().tolist()
        if differs:
            bad[rank] = [_CHECKSUM_FIELDS[i] for i in differs]
    if bad:
        detail = "; ".join(f"rank {r}: {', '.join(fields)}" for r, fields in bad.items())
        raise BasisMismatchError(
            f"the TWA basis differs across ranks: ranks {sorted(bad)} differ from rank 0 ({detail}). Every rank "
            "must build it from the same checkpoints in the same order with the same bits, group_size and "
            "granularity, or load one saved TWA/Subspace file")


# -- replicated mode ------------------------------------------------------------------------


class Replicated:
    """Every rank holds the whole basis; the coefficient gradient of each backward is averaged
    over the group by one all-reduce of [k, B] floats, in a hook on the coefficients."""

    shard = False

    def __init__(self, twa: TWA, group: Any):
        self.comm = Comm(group)
        # a tensor hook sees this backward's gradient before it is accumulated into .grad, so
        # gradient accumulation over several backwards averages each of them once
        twa.coefficients.register_hook(self._average)

    def _average(self, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # the graph may still hold the incoming tensor
        return self.comm.all_reduce(grad).div_(self.comm.world)


# -- sharded mode ---------------------------------------------------------------------------


def shard_columns(num_cols: int, group_size: int, world: int) -> list[int]:
    """Column edges c_0 = 0 < c_1 < ... < c_W = num_cols, on group edges, as even as groups
    allow. A world larger than the number of groups is a ShardingError."""
    n_groups = -(-num_cols // group_size)
    if world > n_groups:
        raise ShardingError(f"shard=True over {world} ranks, but the basis has only {n_groups} quantisation groups "
                            f"of {group_size} columns ({num_cols} columns): use at most {n_groups} ranks, a smaller "
                            "group_size, or shard=False")
    return [min(num_cols, (r * n_groups // world) * group_size) for r in range(world + 1)]


def local_blocks(offsets: Tensor, start: int, stop: int) -> tuple[Tensor, int, int]:
    """The blocks (global offsets `offsets`) that columns start..stop touch: their offsets
    clipped to the range and made local, and their global indices [b_lo, b_hi)."""
    b_lo = int(torch.searchsorted(offsets, torch.tensor(start), right=True)) - 1
    b_hi = int(torch.searchsorted(offsets, torch.tensor(stop), right=False))
    return offsets[b_lo : b_hi + 1].clamp(start, stop) - start, b_lo, b_hi


def slice_basis(qb: QuantizedBasis, start: int, stop: int) -> tuple[QuantizedBasis, int, int]:
    """Columns start..stop of `qb` (start on a group edge) as a basis of their own, and the
    global indices [b_lo, b_hi) of the blocks they touch. A block that straddles start or
    stop keeps its coefficient; its local part is a block of the slice."""
    if start % qb.group_size or not 0 <= start < stop <= qb.num_cols:
        raise InvalidArgumentError(f"bad column range {start}..{stop} for {qb.num_cols} columns in groups of {qb.group_size}")
    local_offsets, b_lo, b_hi = local_blocks(qb.block_offsets.cpu(), start, stop)
    local_offsets = local_offsets.to(qb.block_offsets.device)
    g0, g1 = start // qb.group_size, -(-stop // qb.group_size)
    if qb.bits is None:
        codes = qb.codes[:, start:stop]
    else:
        group_bytes = qb.group_size * qb.bits // 8
        end = None if stop == qb.num_cols else g1 * group_bytes  # the row's short last group goes with the last rank
        codes = qb.codes[:, g0 * group_bytes : end]
    scales, mins = (qb.scales, qb.mins) if qb.bits is None else (qb.scales[g0:g1], qb.mins[g0:g1])
    sliced = QuantizedBasis.from_state_dict({
        "codes": codes.contiguous().clone(), "scales": scales.contiguous().clone(), "mins": mins.contiguous().clone(),
        "block_offsets": local_offsets,
        "meta": torch.tensor([qb.bits or 0, qb.group_size, stop - start], dtype=torch.int64)})
    return sliced, b_lo, b_hi


def _probe(comm: Comm, device: torch.device) -> None:
    """Run the sharded mode's two collectives once on one element per rank, so that a backend
    that lacks them fails here, by name, and not in the first backward."""
    backend = dist.get_backend(comm.group)
    try:
        out = torch.zeros(comm.world, device=device)
        _all_gather(out, torch.ones(1, device=device), comm.group)
        _reduce_scatter(torch.zeros(1, device=device), out, comm.group)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        raise ShardingError(f"shard=True needs an all-gather and a reduce-scatter into flat tensors, which the "
                            f"{backend!r} backend cannot run on {device} ({exc}); use shard=False (replicated "
                            "mode) or a backend that has them (NCCL on GPU, gloo on CPU)") from exc


class Sharded:
    """This rank's columns of the basis and center (the TWA's buffers become the shard), and
    the gather / reduce-scatter that turn them into full weights and back."""

    shard = True

    def __init__(self, twa: TWA, group: Any, piece: ShardedSubspace | None = None):
        self.comm = Comm(group)
        qb = twa.basis
        if piece is None:
            self.num_cols, self.num_blocks = qb.num_cols, qb.num_blocks
        else:
            self.num_cols, self.num_blocks = piece.num_cols, piece.num_blocks
        edges = shard_columns(self.num_cols, qb.group_size, self.comm.world)
        _probe(self.comm, qb.device)
        self.sizes = [b - a for a, b in zip(edges[:-1], edges[1:])]
        self.chunk = max(self.sizes)  # every rank's slot in the gathered buffer
        self.start, self.stop = edges[self.comm.rank], edges[self.comm.rank + 1]
        if piece is not None:  # the buffers hold this rank's columns already; the coefficients are global
            local, self.b_lo, self.b_hi = qb, piece.b_lo, piece.b_hi
            twa.coefficients = nn.Parameter(torch.zeros(qb.k, self.num_blocks, device=qb.device))
        else:
            local, self.b_lo, self.b_hi = slice_basis(qb, self.start, self.stop)
            with torch.no_grad():
                twa.center = twa.center[self.start : self.stop].clone()
                for key, value in local.state_dict().items():
                    setattr(twa, f"basis_{key}", value.to(qb.device))
        logger.info("TWA shard: rank %d of %d holds columns %d..%d and blocks %d..%d (basis %.1f MB)",
                    self.comm.rank, self.comm.world, self.start, self.stop, self.b_lo, self.b_hi, local.nbytes / 1e6)

    @property
    def padding(self) -> int:
        """Elements of padding in each gathered / reduce-scattered buffer: W x L - D."""
        return self.chunk * self.comm.world - self.num_cols

    def reconstruct(self, twa: TWA) -> Tensor:
        """The full weight vector [D] (float32), differentiable in twa.coefficients."""
        return _GatherReconstruct.apply(twa.coefficients, twa.basis, twa.center, self)

    def unpad(self, gathered: Tensor) -> Tensor:
        if not self.padding:
            return gathered
        rows = gathered.view(self.comm.world, self.chunk)
        return torch.cat([rows[r, :n] for r, n in enumerate(self.sizes)])

    def pad(self, flat: Tensor) -> Tensor:
        if not self.padding:
            return flat.contiguous()
        out = flat.new_zeros(self.comm.world, self.chunk)
        for r, (piece, n) in enumerate(zip(flat.split(self.sizes), self.sizes)):
            out[r, :n] = piece
        return out.view(-1)


class _GatherReconstruct(torch.autograd.Function):
    """w = all_gather(center_r + basis_r^T x[:, blocks_r]); dL/dx = all_reduce(project_r(
    reduce_scatter(dL/dw) / W)): the sharded forward and its backward."""

    @staticmethod
    def forward(ctx, x: Tensor, qb: QuantizedBasis, center: Tensor, shard: Sharded) -> Tensor:
        ctx.qb, ctx.shard = qb, shard
        comm = shard.comm
        mine = torch.zeros(shard.chunk, dtype=torch.float32, device=center.device)
        reconstruct(qb, x[:, shard.b_lo : shard.b_hi], center, out=mine[: shard.stop - shard.start])
        gathered = torch.empty(shard.chunk * comm.world, dtype=torch.float32, device=center.device)
        return shard.unpad(comm.all_gather_into_tensor(gathered, mine))

    @staticmethod
    def backward(ctx, grad_w: Tensor):
        shard, qb = ctx.shard, ctx.qb
        comm = shard.comm
        mine = torch.empty(shard.chunk, dtype=torch.float32, device=grad_w.device)
        comm.reduce_scatter_tensor(mine, shard.pad(grad_w.float()))
        local = project(qb, mine[: shard.stop - shard.start].div_(comm.world))
        grad_x = torch.zeros(local.shape[0], shard.num_blocks, dtype=torch.float32, device=grad_w.device)
        grad_x[:, shard.b_lo : shard.b_hi] = local  # straddling blocks: partial sums, added by the all-reduce
        return comm.all_reduce(grad_x), None, None, None


# -- BatchNorm statistics and metrics over the union of the ranks' data ----------------------


@torch.no_grad()
def all_reduce_bn_statistics(model: nn.Module, process_group: Any = None) -> None:
    """After each rank ran update_bn (cumulative averaging: momentum None) over its own
    batches, make every BatchNorm's running stats those of one process over all batches:
    the per-rank stats weighted by their batch counts, summed in one all-reduce of
    2 x channels + 1 floats per layer. Ranks with no batches count zero."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    parts = []
    for m in norms:
        n = m.num_batches_tracked.to(torch.float64)
        parts += [m.running_mean.double() * n, m.running_var.double() * n, n.reshape(1)]
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    offset = 0
    for m in norms:
        c = m.running_mean.numel()
        total, count = flat[offset : offset + c], flat[offset + 2 * c]
        if count > 0:
            m.running_mean.copy_(total / count)
            m.running_var.copy_(flat[offset + c : offset + 2 * c] / count)
            m.num_batches_tracked.fill_(int(count))
        offset += 2 * c + 1


def update_bn(twa: TWA, loader: Iterable, process_group: Any = None,
              call_fn: Callable[[nn.Module, Any], Any] | None = None) -> None:
    """TWA.update_bn over the union of every rank's `loader` (each rank passes its own
    shard of the data): a local pass at the averaged weights, then one all-reduce of the
    statistics. Equal to one process running update_bn over all the ranks' batches."""
    group = process_group if process_group is not None else getattr(getattr(twa, "_dist", None), "comm", None)
    group = group.group if isinstance(group, Comm) else group
    twa.update_bn(loader, call_fn)
    all_reduce_bn_statistics(twa.module, group)


def all_reduce_metrics(sums: Mapping[str, float | Tensor], process_group: Any = None) -> dict[str, float]:
    """Sums over the ranks of per-rank metric sums (loss sums, correct counts, sample counts):
    one all-reduce in float64. Divide afterwards: {"correct": c, "count": n} -> c / n."""
    keys = list(sums)
    values = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend(process_group) == "nccl":
        values = values.cuda()
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=process_group)
    return dict(zip(keys, values.tolist()))


# -- building a sharded subspace from this rank's columns only ----------------------------


class CheckpointListMismatchError(BasisMismatchError):
    """The ranks were given different checkpoint lists."""


class CheckpointContentMismatchError(CheckpointListMismatchError):
    """The ranks were given the same checkpoint paths, but some of the files differ."""


class RankFailedError(TWAKernelsError, RuntimeError):
    """Another rank of the process group failed: the message names it and its own error."""


_MESSAGE_BYTES = 2048  # of a failing rank's error message, sent to the others


def _gather_rows(mine: Tensor, group: Any) -> list[Tensor]:
    """all_gather of one small CPU tensor per rank (moved to the GPU and back under NCCL)."""
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    return [row.cpu() for row in table]


def agree(work: Callable[[], _T], group: Any, what: str) -> _T:
    """Run this rank's local `work`, then learn in one all-gather whether it failed on any
    rank. A rank whose work raised re-raises its own exception; every other rank raises
    RankFailedError naming the failing ranks and their messages. A rank that fails while its
    peers go on would leave them in their next collective until the backend notices the
    closed connection, and they would report that instead of the cause; here every rank
    leaves the step together, and each reports the real error."""
    if not dist.is_available() or not dist.is_initialized():
        raise UsageError("a process_group needs torch.distributed initialised: call "
                         "torch.distributed.init_process_group(...) first (torchrun sets its environment)")
    error: Exception | None = None
    result = None
    try:
        result = work()
    except Exception as exc:  # reported to the peers below, then raised again here
        error = exc
    row = torch.zeros(1 + _MESSAGE_BYTES, dtype=torch.uint8)
    if error is not None:
        text = f"{type(error).__name__}: {error}".encode("utf-8", "replace")[:_MESSAGE_BYTES]
        row[0] = 1
        row[1 : 1 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    table = _gather_rows(row, group)
    if error is not None:
        raise error
    failed = {rank: bytes(r[1:].tolist()).rstrip(b"\0").decode("utf-8", "replace")
              for rank, r in enumerate(table) if r[0]}
    if failed:
        detail = "; ".join(f"rank {rank}: {text}" for rank, text in failed.items())
        raise RankFailedError(f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} failed while "
                              f"{what}, so this rank stops too ({detail}). Fix the error reported there")
    return result  # type: ignore[return-value]


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


def _quantize_in_chunks(row: Tensor, bits: int, group_size: int, groups_per_chunk: int = 256):
    """_quantize_row over whole groups at a time: the same bytes, scales and mins (groups are
    independent and a chunk ends on a group edge) with temporaries of one chunk, not ~5 rows."""
    step = group_size * groups_per_chunk
    parts = [_quantize_row(row[i : i + step], bits, group_size) for i in range(0, row.numel(), step)]
    return tuple(torch.cat([p[j] for p in parts]) for j in range(3))


def _same_checkpoint_lists(specs: list, group: Any) -> None:
    """All-gather a digest of the checkpoint list (paths, or state_dict count) and raise
    CheckpointListMismatchError naming the ranks whose list differs from rank 0's."""
    text = "\n".join(str(s) if not isinstance(s, Mapping) else f"<state_dict {i}>" for i, s in enumerate(specs))
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
    table = _gather_rows(torch.tensor([digest, len(specs)], dtype=torch.int64), group)
    bad = [r for r, row in enumerate(table) if not torch.equal(row, table[0])]
    if bad:
        raise CheckpointListMismatchError(
            f"ranks {bad} were given a different checkpoint list from rank 0's ({len(specs)} here): pass every "
            "rank the same files in the same order")


_SAMPLE_WINDOWS, _SAMPLE_COLUMNS = 4, 64  # the columns every rank reads of every checkpoint, to compare


def _digest(*parts: object) -> int:
    """63 bits of a SHA-256 of `parts` (bytes, or anything with a stable repr)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\0")
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _file_fingerprint(spec: Any) -> tuple[int, int]:
    """(size in bytes, digest of the file's header) of a checkpoint file or DCP directory,
    from its metadata alone; (0, 0) for an in-memory state_dict. The header of a zip torch
    file holds a CRC-32 of every record, so it covers the whole content; a safetensors
    header names the tensors, their dtypes, shapes and offsets; a DCP directory's, its
    tensors and data files (not its save id, which differs between two saves of one state)."""
    if isinstance(spec, Mapping):
        return 0, 0
    path = os.fspath(spec)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, ".metadata")):
        # a save_pretrained directory: the fingerprints of its weight files, by relative name
        parts = [(os.path.relpath(f, path), *_file_fingerprint(f)) for f in checkpoint_directory_files(path) or []]
        return sum(size for _, size, _ in parts), _digest(sorted(parts))
    if os.path.isdir(path):
        from twa_kernels import _dcp

        metadata = _dcp.read_metadata(path)
        files = sorted({info.relative_path for info in metadata.storage_data.values()})
        sizes = [os.path.getsize(os.path.join(path, f)) if os.path.isfile(os.path.join(path, f)) else -1 for f in files]
        layout = sorted((k, tuple(shape), str(dtype)) for k, (shape, dtype) in _dcp.tensor_entries(metadata).items())
        places = sorted((i.fqn, tuple(i.offset or ()), d.relative_path, d.offset, d.length)
                        for i, d in metadata.storage_data.items())
        return sum(sizes), _digest(layout, places, files, sizes)
    size = os.path.getsize(path)
    if zipfile.is_zipfile(path):
        # record names start with the file's name at save time, and the serialization id
        # identifies a save, not the weights: both left out
        with zipfile.ZipFile(path) as archive:
            records = sorted((i.filename.split("/", 1)[-1], i.CRC, i.file_size) for i in archive.infolist()
                             if not i.filename.endswith(".data/serialization_id"))
        return size, _digest(records)
    with open(path, "rb") as f:
        head = f.read(8)
        if path.endswith(".safetensors") and len(head) == 8:
            header = f.read(min(int.from_bytes(head, "little"), 100 << 20))
            try:  # the tensors' entries; __metadata__ is free text a writer may fill differently
                entries = json.loads(header)
                entries.pop("__metadata__", None)
                return size, _digest(sorted((k, repr(v)) for k, v in entries.items()))
            except (ValueError, AttributeError):  # not JSON: ColumnReader has refused it already
                return size, _digest(header)
        head += f.read(64 << 10)
    return size, _digest(head)


def _content_sample(reader: ColumnReader, names: list[str], shapes: list[tuple[int, ...]], num_cols: int,
                    aliases: dict[str, list[str]]) -> int:
    """Digest of the same few columns of a checkpoint on every rank (_SAMPLE_WINDOWS windows
    of _SAMPLE_COLUMNS, spread over the model): two copies of a path that hold different
    weights (another epoch, another run) differ there, whatever their headers say."""
    h = hashlib.sha256()
    width = min(_SAMPLE_COLUMNS, num_cols)
    for j in range(_SAMPLE_WINDOWS):
        a = min(j * num_cols // _SAMPLE_WINDOWS, num_cols - width)
        values = reader.columns(names, shapes, a, a + width, aliases, check_finite=False)
        h.update(values.numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _same_checkpoint_contents(specs: list, prints: list[tuple[int, int, int]], group: Any) -> None:
    """All-gather each checkpoint's (size, header digest, sample digest) and raise
    CheckpointContentMismatchError naming each file that differs from rank 0's copy, on
    which ranks and how. Replicated mode compares the whole bases; sharded mode cannot (each
    rank holds other columns), so it compares the files."""
    table = _gather_rows(torch.tensor(prints, dtype=torch.int64).reshape(-1), group)
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
                aliases: dict[str, list[str]] | None = None, progress: bool = False) -> ShardedSubspace:
    """Subspace.from_checkpoints for this rank's columns only: each checkpoint is read for
    columns [c_r, c_r+1) alone (see io.ColumnReader), so no rank holds a whole checkpoint. The
    result equals the single-process subspace's columns bit for bit (the center is the same
    float64 mean, and quantisation groups never cross a shard edge). Rank 0 shows progress."""
    if dist.get_rank(process_group) != 0:
        progress = False
    # every local step runs under agree(): a rank that fails there (an unreadable or corrupt
    # file of its own) makes every rank stop with its error, not wait in the next collective
    specs = agree(lambda: resolve_checkpoints(checkpoints), process_group, "resolving its checkpoints")
    _same_checkpoint_lists(specs, process_group)
    aliases = {n: list(a) for n, a in (aliases or {}).items() if len(a) > 1}
    shapes = [tuple(s) for s in shapes]
    numels = [math.prod(s) for s in shapes]
    num_cols = sum(numels)
    edges = shard_columns(num_cols, group_size, dist.get_world_size(process_group))
    start, stop = edges[dist.get_rank(process_group)], edges[dist.get_rank(process_group) + 1]

    def average() -> tuple[Tensor, list[tuple[int, int, int]]]:
        total, prints = torch.zeros(stop - start, dtype=torch.float64), []
        for i, spec in enumerate(_progress(specs, len(specs), "averaging (shard)", progress)):
            reader = ColumnReader(spec, i)
            prints.append((*_file_fingerprint(spec), _content_sample(reader, names, shapes, num_cols, aliases)))
            reader.columns(names, shapes, start, stop, aliases, out=total, add=True)
        return total, prints

    total, prints = agree(average, process_group, "reading its checkpoints")
    _same_checkpoint_contents(specs, prints, process_group)
    center = mean_center(total, len(specs))
    del total
    offsets = block_offsets_from_sizes(block_sizes_for(numels, granularity), num_cols)
    local_offsets, b_lo, b_hi = local_blocks(offsets, start, stop)

    def build() -> QuantizedBasis:
        rows = []
        for i, spec in enumerate(_progress(specs, len(specs), "building basis (shard)", progress)):
            row = ColumnReader(spec, i).columns(names, shapes, start, stop, aliases).sub_(center)
            rows.append(row if bits is None else _quantize_in_chunks(row, bits, group_size))
        if bits is None:
            return quantize(torch.stack(rows), None, group_size, local_offsets.diff().tolist())
        return stack_rows(rows, local_offsets, bits, group_size, stop - start)

    basis = agree(build, process_group, "building its shard of the basis")
    return ShardedSubspace(list(names), shapes, center, basis, start, stop, b_lo, b_hi, num_cols,
                           offsets.numel() - 1, aliases)


# -- running under torchrun -----------------------------------------------------------------


def init_from_environment(timeout_s: float = 300.0) -> Any:
    """The default process group when torchrun (or any launcher setting WORLD_SIZE > 1) started
    this process, initialised if it is not yet: NCCL with CUDA (device LOCAL_RANK), else gloo,
    with a timeout, so a rank that fails ends the others' collectives instead of hanging
    them. None in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.group.WORLD


# how much later than its failure a follow-on failure is dated: more than the time between
# the failing rank's error and its record, so the cause stays the earliest under any load
_FOLLOW_ON_DELAY_S = 5


def _after_a_peer(exc: BaseException) -> bool:
    """Whether `exc` only follows another rank's failure: that rank's error was sent here
    (RankFailedError), or a collective lost its connection to a rank that had gone away."""
    if isinstance(exc, RankFailedError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def record_errors(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Decorate an entry point that torchrun starts: an exception leaving `fn` is written to
    the error file torchrun names in TORCHELASTIC_ERROR_FILE (the JSON that
    torch.distributed.elastic's @record writes), so the job's summary shows each rank's own
    error, not a bare exit code. torchrun's "Root Cause" is the earliest record; a rank that
    failed only because a peer failed first (_after_a_peer) dates its record a few seconds
    later, so the peer's own error is named as the cause. Outside torchrun it changes nothing."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> _T:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            path = os.environ.get("TORCHELASTIC_ERROR_FILE")
            if path:
                _write_error_file(path, exc)
            raise
    return wrapper


def _write_error_file(path: str, exc: BaseException) -> None:
    stamp = int(time.time()) + (_FOLLOW_ON_DELAY_S if _after_a_peer(exc) else 0)
    data = {"message": {"message": f"{type(exc).__name__}: {exc}",
                        "extraInfo": {"py_callstack": "".join(traceback.format_exception(exc)),
                                      "timestamp": str(stamp)}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError as err:  # the error being raised matters more than its record
        logger.warning("could not write the torchrun error file %s: %s", path, err)


def split_loader(loader: Iterable, process_group: Any) -> Iterable:
    """This rank's share of `loader`, with the same number of batches on every rank (a rank
    with one batch more would wait forever in its extra all-reduce). A DataLoader over a
    map-style dataset is rebuilt with a DistributedSampler (shuffled if the loader was; it
    pads by repeating samples); another sized iterable keeps every W-th batch, len // W of
    them. An unsized iterable is refused."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    if isinstance(loader, DataLoader) and loader.batch_size is not None and hasattr(loader.dataset, "__getitem__"):
        sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank,
                                     shuffle=isinstance(loader.sampler, RandomSampler), seed=0)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn, drop_last=loader.drop_last)
    if not hasattr(loader, "__len__"):
        raise InvalidTypeError(f"under torch.distributed a data loader must be a DataLoader or have a length, got "
                        f"{type(loader).__name__}; return a torch.utils.data.DataLoader from the data factory")
    per_rank = len(loader) // world
    return _Strided(loader, rank, world, per_rank)


class _Strided:
    """Batches rank, rank + W, ... of a sized iterable, `count` of them."""

    def __init__(self, loader: Iterable, rank: int, world: int, count: int):
        self.loader, self.rank, self.world, self.count = loader, rank, world, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        taken = 0
        for i, batch in enumerate(self.loader):
            if taken == self.count:
                return
            if i % self.world == self.rank:
                taken += 1
                yield batch
