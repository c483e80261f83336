"""How TWA runs over a process group: the strategies and their collectives.

Replicated: every rank holds the whole basis. `project` is linear, so each rank's backward
projects its own dL/dw and only the [k, B] coefficient gradient is averaged: one all-reduce
of k x B floats per backward (a hook on the coefficients), instead of the D floats a
data-parallel step over the model would move. Two floats more check that every rank holds
the same coefficients (Comm.all_reduce_agreed).

Sharded: rank r holds columns [c_r, c_r+1) of the codes, scales, mins and center, cut on
quantisation-group edges. Forward reconstructs the local columns and all-gathers them into
the full weight vector (as FSDP gathers its flat parameters); backward reduce-scatters dL/dw
to the column owners, projects locally and all-reduces the [k, B] partial sums. A step moves
2 x W x L + k x B (+ 2) floats, L the largest shard: 2 D + k B up to a padding of fewer than
W x group_size elements (all_gather_into_tensor needs equal chunks).

`make_strategy` picks the strategy for a TWA and hands back this rank's center and basis;
TWA registers them as its own buffers. Every rank must hold the same basis: make_strategy
all-gathers a cheap checksum of it and raises BasisMismatchError naming the ranks that differ (a basis
built sharded is checked file by file instead, see sharded_build). The collectives that
every rank joins to check and agree (`agree`, `ranks_unlike_rank0`) are in _collectives.

This module knows nothing of TWA itself: it takes and returns tensors and bases.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from twa_kernels._collectives import BasisMismatchError, check_group, gather_rows, named_on_failure
from twa_kernels._sums import float64_sums
from twa_kernels.errors import InvalidArgumentError, UsageError
from twa_kernels.ops import project, project_int8, reconstruct
from twa_kernels.quant import QuantizedBasis, basis_meta

logger = logging.getLogger(__name__)


_CHECKSUM_FIELDS = ("k", "columns", "blocks", "bits", "group_size", "codes sum", "codes weighted sum",
                    "scales sum", "mins sum", "center sum", "center weighted sum", "block offsets sum")


_EXACT_FIELDS = 5  # the metadata counts, compared exactly; the sums to a relative 1e-12

_PERIOD = 65521  # position weights of the fingerprints: position mod a prime, + 1


def training_alone() -> bool:
    """Whether this process is one of several in an initialised torch.distributed job and
    runs outside a DistributedDataParallel forward: a TWA without a process group then
    trains coefficients of its own, which no rank shares (what `process_group=dist.group.WORLD`
    evaluated before init_process_group gives: None)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return False
    return _active_ddp() is None


def _active_ddp() -> Any:
    """The DistributedDataParallel whose forward is running, or None (a private torch call)."""
    active = getattr(torch.nn.parallel.DistributedDataParallel, "_get_active_ddp_module", None)
    return None if active is None else active()


def averaged_by_ddp(parameter: Tensor) -> bool:
    """Whether a DistributedDataParallel forward is running and averages `parameter`'s
    gradient (False outside one, or without torch.distributed)."""
    if not dist.is_available() or not dist.is_initialized():
        return False
    ddp = _active_ddp()
    if ddp is None:
        return False
    synced = getattr(ddp, "_module_parameters", None)  # its parameters less those it was told to ignore
    if synced is None:
        synced = list(ddp.module.parameters())
    return any(p is parameter for p in synced)


def in_ddp_forward() -> bool:
    """Whether a DistributedDataParallel forward is running (False without torch.distributed)."""
    return dist.is_available() and dist.is_initialized() and _active_ddp() is not None


def _all_gather(out: Tensor, t: Tensor, group: Any) -> None:
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor warns); older has only the latter
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, t, group=group)


def _reduce_scatter(out: Tensor, t: Tensor, group: Any) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, t, op=dist.ReduceOp.SUM,
                                                                                  group=group)


class ShardingError(InvalidArgumentError):
    """shard=True cannot run: too many ranks for the basis, or a backend without the collectives."""


_READ_EVERY = 64  # a GPU's agreement flags are read every this many all-reduces: one host sync each


def _read_at_once(device: torch.device) -> bool:
    """Whether an agreement flag on `device` is read as soon as it is computed: on the CPU the
    collective has finished already, so reading costs nothing."""
    return device.type == "cpu"


def _pairing_modulus(world: int) -> int:
    """The largest m for which W m^2 stays an integer that float32 holds exactly (2^24)."""
    return max(2, math.isqrt((1 << 24) // world))


def _hash(values: Tensor, modulus: int) -> Tensor:
    """A hash in [0, modulus) of the float32 bit patterns of `values`, by position, computed
    where they are (no host sync); equal values give equal hashes on every rank."""
    bits = values.detach().float().contiguous().view(torch.int32).reshape(-1).to(torch.int64) % _PERIOD
    positions = torch.arange(1, bits.numel() + 1, device=bits.device) % _PERIOD
    return (bits * positions).sum() % modulus


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
        self._disagreed: Tensor | None = None  # whether some checked all-reduce since the last read disagreed
        self._unread = 0  # checked all-reduces since that read

    def __deepcopy__(self, memo: dict[int, Any]) -> Comm:
        """A copy (copy.deepcopy of a TWA, AveragedModel) runs its collectives on the same
        process group, which cannot be copied, with counts of its own."""
        return Comm(self.group)

    def __getstate__(self) -> dict[str, Any]:
        raise UsageError("a TWA built with a process_group holds that torch.distributed group, which cannot be "
                         "pickled (torch.save of the module, multiprocessing): save twa.state_dict() on every rank, "
                         "or averaged_state_dict() for a plain model, and build the TWA anew to load it")

    def _count(self, name: str, t: Tensor) -> None:
        self.bytes[name] += t.numel() * t.element_size()
        self.calls[name] += 1

    def reset(self) -> None:
        """Zero the byte and call counts."""
        self.bytes.clear()
        self.calls.clear()

    def all_reduce_agreed(self, t: Tensor, agreed: Tensor) -> Tensor:
        """Sum of t (a floating tensor; t itself is left as it is) over the ranks, checked
        that every rank holds the same `agreed` (the coefficients a gradient belongs to).

        The n-th all-reduce of each rank pairs with the others' n-th, whatever step each
        made it for: ranks that run different numbers of backwards per optimizer step would
        average gradients of different steps, step apart and train different coefficients
        without a word. Two numbers ride along: h and h^2, h a hash of `agreed` below
        `_pairing_modulus`. The sums equal W h and W h^2 on every rank exactly when every
        rank's h is h (a sum of squares at W times the squared mean means no spread), so
        every rank raises the same UsageError together. The verdict is read on the host at
        once for CPU tensors. A GPU's is gathered on the device and read every
        `_READ_EVERY` all-reduces and at check_agreement(), each read a host sync (a
        mismatch there shows up to that many steps late, and the backward seldom waits)."""
        wide = torch.float64 if t.dtype == torch.float64 else torch.float32  # W h^2 is exact in either
        h = _hash(agreed, _pairing_modulus(self.world)).to(wide)
        check = torch.stack([h, h * h])
        buffer = torch.cat([t.reshape(-1).to(wide), check])
        self._count("all_reduce", buffer)
        named_on_failure("TWA's all-reduce", lambda: dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group))
        disagreed = (buffer[-2:] != check * self.world).any()
        self._disagreed = disagreed if self._disagreed is None else self._disagreed | disagreed
        self._unread += 1
        if _read_at_once(buffer.device) or self._unread >= _READ_EVERY:
            self.check_agreement()
        return buffer[:-2].view(t.shape).to(t.dtype)

    def check_agreement(self) -> None:
        """Raise UsageError if an all-reduce since the last read found the ranks holding
        different coefficients (all_reduce_agreed); a host sync where the flags are on a GPU.
        TWA calls it when it leaves training (eval()) and in averaged_state_dict()."""
        disagreed, self._disagreed, self._unread = self._disagreed, None, 0
        if disagreed is not None and bool(disagreed):
            raise UsageError("the ranks of this TWA averaged a gradient over coefficients that differ from rank to "
                             "rank: they ran different numbers of backwards per optimizer step (gradient "
                             "accumulation, or a skipped batch, on some ranks only), or changed the coefficients "
                             "on some ranks only, so each would now train on its own; run the same backwards and "
                             "steps on every rank (give every rank the same number of batches: DistributedSampler "
                             "and tk.distributed.split_loader pad to that)")

    def all_gather_into_tensor(self, out: Tensor, t: Tensor) -> Tensor:
        """Every rank's t, in rank order, into out (world size times t's length)."""
        self._count("all_gather", out)
        named_on_failure("TWA's all-gather", lambda: _all_gather(out, t, self.group))
        return out

    def reduce_scatter_tensor(self, out: Tensor, t: Tensor) -> Tensor:
        """This rank's chunk of the sum of t over the ranks, into out."""
        self._count("reduce_scatter", t)
        named_on_failure("TWA's reduce-scatter", lambda: _reduce_scatter(out, t, self.group))
        return out


def make_strategy(group: Any, shard: bool, center: Tensor, basis: QuantizedBasis,
          local: tuple[int, int, int, int] | None = None) -> Replicated | Sharded:
    """The strategy for a TWA over `group`. `center` and `basis` are the whole subspace's,
    or, when `local` = (num_cols, num_blocks, b_lo, b_hi) is given, this rank's columns of
    a sharded build already (shards differ by design: no basis checksum then). The
    strategy's `center` and `basis` are what this rank holds."""
    check_group(group)
    if local is not None:
        return Sharded(group, center, basis, local)
    check_same_basis(center, basis, group)
    return Sharded(group, center, basis) if shard else Replicated(group, center, basis)


# -- the start-up check --------------------------------------------------------------------


@torch.no_grad()
def basis_checksum(center: Tensor, qb: QuantizedBasis) -> Tensor:
    """A float64 fingerprint of (center, basis): the layout and plain and position-weighted
    sums of the codes, scales, mins and center, summed a chunk at a time (a few MB of
    float64, whatever D). Reordered checkpoints or a different bits, group_size or
    granularity change it."""
    codes_sum = torch.zeros((), dtype=torch.float64, device=qb.device)
    codes_weighted = torch.zeros_like(codes_sum)
    for r in range(qb.k):
        sums = float64_sums(qb.codes[r], _PERIOD)
        codes_sum += sums[0]
        codes_weighted += sums[2] * (r + 1)
    center_sums = float64_sums(center, _PERIOD)
    values = [torch.tensor(float(v), dtype=torch.float64, device=qb.device)
              for v in (qb.k, qb.num_cols, qb.num_blocks, qb.bits or 0, qb.group_size)]
    values += [codes_sum, codes_weighted, float64_sums(qb.scales)[0], float64_sums(qb.mins)[0], center_sums[0],
               center_sums[2], qb.block_offsets.double().sum()]
    return torch.stack(values)


def check_same_basis(center: Tensor, qb: QuantizedBasis, group: Any) -> None:
    """Raise BasisMismatchError on every rank when some rank's (center, basis) differs from
    rank 0's. One all-gather of 12 float64 per rank; every rank sees the same table, so
    every rank raises (no rank is left waiting in a later collective)."""
    mine = basis_checksum(center, qb)
    table = gather_rows(mine.cpu(), group, "the check of the ranks' bases")
    ref = table[0]
    bad: dict[int, list[str]] = {}
    for rank, row in enumerate(table[1:], start=1):
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


@torch.no_grad()
def check_same_values(names: Sequence[str], values: Sequence[Tensor], group: Any, what: str) -> None:
    """Raise BasisMismatchError on every rank when some rank's `values` (TWA's pinned frozen
    parameters) differ from rank 0's: one all-gather of a plain and a position-weighted
    float64 sum of each, compared to 1e-9 (summation order may differ between machines)."""
    def fingerprint(value: Tensor) -> list[Tensor]:
        sums = float64_sums(value, _PERIOD)
        return [sums[0], sums[2]]

    mine = torch.stack([part.cpu() for value in values for part in fingerprint(value)]
                       or [torch.zeros((), dtype=torch.float64)])
    table = gather_rows(mine, group, f"the check of {what}")
    bad = {rank: sorted({names[i // 2] for i in (~torch.isclose(row, table[0], rtol=1e-9, atol=0)).nonzero()
                         .flatten().tolist()}) for rank, row in enumerate(table[1:], start=1)}
    bad = {rank: differ for rank, differ in bad.items() if differ}
    if bad:
        detail = "; ".join(f"rank {r}: {', '.join(differ)}" for r, differ in bad.items())
        raise BasisMismatchError(f"{what} differ across ranks: ranks {sorted(bad)} differ from rank 0 ({detail}). "
                                 "Every rank must read the same checkpoints, in the same order")


# -- replicated mode ------------------------------------------------------------------------


class Replicated:
    """Every rank holds the whole basis; the coefficient gradient of each backward is averaged
    over the group by one all-reduce of [k, B] floats (`average_gradient`, which TWA hooks
    on its coefficients)."""

    shard = False

    def __init__(self, group: Any, center: Tensor, basis: QuantizedBasis):
        self.comm = Comm(group)
        self.center, self.basis, self.num_blocks = center, basis, basis.num_blocks

    def average_gradient(self, grad: Tensor, coefficients: Tensor) -> Tensor:
        """The mean over the ranks of `grad`, the gradient of `coefficients` (checked to be
        the same on every rank). A tensor hook sees each backward's gradient before it is
        accumulated into .grad, so gradient accumulation over several backwards averages
        each of them once."""
        return self.comm.all_reduce_agreed(grad, coefficients).div_(self.comm.world)


def gradient_averaging_hook(strategy: Replicated, coefficients: Tensor) -> Callable[[Tensor], Tensor]:
    """`strategy.average_gradient` as a tensor hook that holds the strategy weakly. The hook
    lives on the coefficients, and so does every optimizer over them: a bound method there
    would keep the strategy, and through it the process group, alive after the TWA is gone,
    and a group still held when destroy_process_group() runs stops its threads only during
    interpreter exit, which can abort the process."""
    held, averaged = weakref.ref(strategy), weakref.ref(coefficients)  # the hook lives on the coefficients

    def average(grad: Tensor) -> Tensor:
        alive, of = held(), averaged()
        if alive is None or of is None:
            raise UsageError("a backward reached the coefficients of a replicated TWA that no longer exists, so "
                             "their gradient cannot be averaged over the ranks; keep the TWA until the last "
                             "backward through it")
        return alive.average_gradient(grad, of)

    return average


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
        "meta": basis_meta(qb.bits, qb.group_size, stop - start)})
    return sliced, b_lo, b_hi


def _probe(comm: Comm, device: torch.device) -> None:
    """Run the sharded mode's two collectives once on one element per rank, so that a backend
    that lacks them fails here, by name, and not in the first backward."""
    backend = dist.get_backend(comm.group)
    try:
        out = torch.zeros(comm.world, dtype=torch.float32, device=device)
        _all_gather(out, torch.ones(1, dtype=torch.float32, device=device), comm.group)
        _reduce_scatter(torch.zeros(1, dtype=torch.float32, device=device), out, comm.group)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        raise ShardingError(f"shard=True needs an all-gather and a reduce-scatter into flat tensors, which the "
                            f"{backend!r} backend cannot run on {device} ({exc}); use shard=False (replicated "
                            "mode) or a backend that has them (NCCL on GPU, gloo on CPU)") from exc


class Sharded:
    """This rank's columns of the basis and center, and the gather / reduce-scatter that
    turn them into full weights and back. The coefficients stay global [k, num_blocks]."""

    shard = True

    def __init__(self, group: Any, center: Tensor, basis: QuantizedBasis,
                 local: tuple[int, int, int, int] | None = None):
        self.comm = Comm(group)
        if local is None:
            self.num_cols, self.num_blocks = basis.num_cols, basis.num_blocks
        else:
            self.num_cols, self.num_blocks = local[0], local[1]
        edges = shard_columns(self.num_cols, basis.group_size, self.comm.world)
        _probe(self.comm, basis.device)
        self.sizes = [b - a for a, b in zip(edges[:-1], edges[1:])]
        self.chunk = max(self.sizes)  # every rank's slot in the gathered buffer
        self.start, self.stop = edges[self.comm.rank], edges[self.comm.rank + 1]
        if local is not None:  # built from this rank's columns already
            self.center, self.basis, (self.b_lo, self.b_hi) = center, basis, local[2:]
        else:
            self.basis, self.b_lo, self.b_hi = slice_basis(basis, self.start, self.stop)
            self.basis = self.basis.to(basis.device)
            self.center = center[self.start : self.stop].clone()
        logger.info("TWA shard: rank %d of %d holds columns %d..%d and blocks %d..%d (basis %.1f MB)",
                    self.comm.rank, self.comm.world, self.start, self.stop, self.b_lo, self.b_hi,
                    self.basis.nbytes / 1e6)

    @property
    def padding(self) -> int:
        """Elements of padding in each gathered / reduce-scattered buffer: W x L - D."""
        return self.chunk * self.comm.world - self.num_cols

    def reconstruct(self, coefficients: Tensor, basis: QuantizedBasis, center: Tensor,
                    int8_gradients: bool = False) -> Tensor:
        """The full weight vector [D] (float32) from this rank's `basis` and `center`,
        differentiable in `coefficients` (through project_int8 when `int8_gradients`: the
        shard edges fall on group edges, so each rank rounds whole groups)."""
        return _GatherReconstruct.apply(coefficients, basis, center, self, int8_gradients)

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
    def forward(ctx, x: Tensor, qb: QuantizedBasis, center: Tensor, shard: Sharded, int8_gradients: bool) -> Tensor:
        ctx.qb, ctx.shard, ctx.project = qb, shard, project_int8 if int8_gradients else project
        ctx.coefficients = x.detach()  # shares x's storage: what the backward's gradient belongs to
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
        local = ctx.project(qb, mine[: shard.stop - shard.start].div_(comm.world))
        grad_x = torch.zeros(local.shape[0], shard.num_blocks, dtype=torch.float32, device=grad_w.device)
        grad_x[:, shard.b_lo : shard.b_hi] = local  # straddling blocks: partial sums, added by the all-reduce
        return comm.all_reduce_agreed(grad_x, ctx.coefficients), None, None, None, None
