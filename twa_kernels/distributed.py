"""TWA across processes on torch.distributed (gloo on CPU, NCCL on GPU).

    dist.init_process_group("nccl")                     # torchrun sets the environment
    twa = tk.TWA(model, ckpts, bits=4, process_group=dist.group.WORLD)              # replicated
    twa = tk.TWA(model, ckpts, bits=4, process_group=dist.group.WORLD, shard=True)  # sharded

Replicated mode averages only the [k, B] coefficient gradient over the ranks (one
all-reduce per backward); sharded mode gives each rank its own columns of the basis and
center and gathers the weights (twa_kernels/sharding.py says how, and what a step moves).
A sharded basis is built from each rank's columns alone (twa_kernels/sharded_build.py),
and the ranks check that they read the same files. A rank that fails while building makes
every rank stop together, each naming its error (_collectives.agree); under torchrun,
`record_errors` puts each rank's own error in the job summary.

This module holds what a user calls around TWA on a process group (init_from_environment,
split_loader, update_bn and all_reduce_metrics over the ranks, comm_bytes, record_errors)
and re-exports the public names of the modules above and of _collectives.

DDP over a TWA module is supported (TWA tells DDP to ignore the center and basis buffers,
so they are never broadcast); it averages the coefficient gradients itself, so leave
process_group=None under DDP.
"""

from __future__ import annotations

import datetime
import functools
import logging
import numbers
import os
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import (DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler,
                              SequentialSampler, Subset, SubsetRandomSampler)

from twa_kernels._checks import check_module
from twa_kernels._random import check_seed
from twa_kernels.batchnorm import NoBatchesError, holds_statistics, is_norm, measured_norms, warn_unreached
from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, UsageError, warn_at_caller
from twa_kernels.io import write_json
from twa_kernels.sharded_build import (  # noqa: F401  (public names of tk.distributed)
    CheckpointContentMismatchError,
    CheckpointListMismatchError,
    ShardedSubspace,
    build_shard,
)
from twa_kernels._collectives import (  # noqa: F401  (public names of tk.distributed)
    BasisMismatchError,
    RankFailedError,
    agree,
    check_group,
    gather_rows,
    ranks_unlike_rank0,
)
from twa_kernels._collectives import named_on_failure
from twa_kernels.sharding import (  # noqa: F401  (public names of tk.distributed)
    Comm,
    ShardingError,
    basis_checksum,
    check_same_basis,
    local_blocks,
    shard_columns,
    slice_basis,
)
from twa_kernels.twa import BASIS_BUFFERS, TWA  # noqa: F401  (BASIS_BUFFERS: public name of tk.distributed)

__all__ = [
    # around a TWA on a process group
    "init_from_environment", "split_for_evaluation", "split_loader", "update_bn", "all_reduce_bn_statistics",
    "all_reduce_metrics",
    "comm_bytes", "reset_comm_bytes", "record_errors", "ignore_twa_buffers_in_ddp",
    # the errors ranks raise
    "BasisMismatchError", "CheckpointListMismatchError", "CheckpointContentMismatchError", "RankFailedError",
    "ShardingError",
    # the pieces sharded mode is made of (twa_kernels/sharding.py, sharded_build.py)
    "BASIS_BUFFERS", "Comm", "ShardedSubspace", "agree", "basis_checksum", "build_shard", "check_same_basis",
    "local_blocks", "shard_columns", "slice_basis",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


def comm_bytes(twa: nn.Module) -> dict[str, int]:
    """Bytes moved by `twa`'s own collectives since the last reset, by collective name
    (empty for a single-process TWA, or any other module). Reset with `reset_comm_bytes(twa)`."""
    parallel = getattr(twa, "parallel", None)
    return dict(parallel.comm.bytes) if parallel is not None else {}


def reset_comm_bytes(twa: nn.Module) -> None:
    """Set the counters `comm_bytes(twa)` reports back to zero (nothing for a
    single-process TWA, or any other module)."""
    parallel = getattr(twa, "parallel", None)
    if parallel is not None:
        parallel.comm.reset()


# -- BatchNorm statistics and metrics over the union of the ranks' data ----------------------


@torch.no_grad()
def ignore_twa_buffers_in_ddp(module: nn.Module) -> list[str]:
    """Tell DDP to leave alone the center and basis of every TWA inside `module`, and
    return their names. DDP reads the ignore list of the module it wraps, and that one only:
    a TWA wrapped directly sets its own, but one held by another module (a LightningModule's
    self.twa) would have DDP broadcast its whole center and basis from rank 0 before every
    forward. Call it on the module DDP wraps once its TWAs exist (in a LightningModule's
    __init__, on self)."""
    check_module(module, "ignore_twa_buffers_in_ddp's module")
    if isinstance(module, TWA):
        return list(module._ddp_params_and_buffers_to_ignore)
    names = [f"{prefix}.{name}" for prefix, sub in module.named_modules() if isinstance(sub, TWA) and prefix
             for name in sub._ddp_params_and_buffers_to_ignore]
    if not names:
        raise InvalidArgumentError(f"{type(module).__name__} holds no TWA: nothing for DDP to ignore; call it "
                                   "after the module has made its TWA")
    ignored = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    module._ddp_params_and_buffers_to_ignore = ignored + [n for n in names if n not in ignored]
    return names


def all_reduce_bn_statistics(model: nn.Module, process_group: Any = None, frozen_norms: Iterable[str] = ()) -> int:
    """After each rank ran update_bn (cumulative averaging: momentum None) over its own
    batches, make every BatchNorm's running stats those of one process over all batches:
    the per-rank stats weighted by their batch counts, summed in one all-reduce of
    2 x channels + 1 floats per layer. Ranks with no batches count zero. The layers update_bn
    keeps (in eval mode after model.train(), or named in frozen_norms, as given to it) are
    left as they are. Returns the most batches any measured BatchNorm saw over all ranks
    (0: none, and the statistics are unchanged)."""
    check_module(model, "all_reduce_bn_statistics's model")
    check_group(process_group)
    # a refused argument (a misspelt frozen_norms) on one rank stops every rank with its
    # reason, instead of leaving the others in the all-gather below until the timeout
    measured = agree(lambda: _measured_bn(model, frozen_norms), process_group, "checking the BatchNorm layers")
    # the ranks agree on the layers first (every rank joins, with layers or without): one
    # all-reduce over layouts that differ would pair with another rank's next collective
    layout = [(name, m.running_mean.numel()) for name, m in measured.items()]
    differ = ranks_unlike_rank0(layout, process_group, "update_bn's check of the BatchNorm layers")
    if differ:
        raise InvalidArgumentError(f"all_reduce_bn_statistics: ranks {differ} measure other BatchNorm layers than "
                                   f"rank 0 (here {[name for name, _ in layout][:6]}); give every rank the same model "
                                   "and the same frozen_norms")
    norms = list(measured.values())
    if not norms:
        return 0
    parts = []
    for m in norms:
        n = m.num_batches_tracked.to(torch.float64)
        parts += [m.running_mean.double() * n, m.running_var.double() * n, n.reshape(1)]
    flat = torch.cat(parts)
    named_on_failure("the all-reduce of the BatchNorm statistics",
                     lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group))
    offset, most = 0, 0
    for m in norms:
        c = m.running_mean.numel()
        total, count = flat[offset : offset + c], flat[offset + 2 * c]
        if count > 0:
            m.running_mean.copy_(total / count)
            m.running_var.copy_(flat[offset + c : offset + 2 * c] / count)
            m.num_batches_tracked.fill_(int(count))
        most = max(most, int(count))
        offset += 2 * c + 1
    return most


def _measured_bn(model: nn.Module, frozen_norms: Iterable[str]) -> dict[str, nn.Module]:
    """The BatchNorm layers update_bn measures, by name: neither kept in eval mode nor
    frozen, and tracking running statistics."""
    return {name: m for name, m in measured_norms(model, frozen_norms).items() if holds_statistics(m)}


def update_bn(loader: Iterable, twa: TWA, process_group: Any = None,
              call_fn: Callable[[nn.Module, Any], Any] | None = None, *, frozen_norms: Iterable[str] = ()) -> int:
    """TWA.update_bn over the union of every rank's `loader` (each rank passes its own
    shard of the data): a local pass at the averaged weights, then one all-reduce of the
    statistics. Equal to one process running update_bn over all the ranks' batches
    (SyncBatchNorm layers included: each rank measures its own batches, merged after).
    `twa` may be wrapped in DistributedDataParallel. A pass that fails on one rank stops
    every rank with the reason, each with its statistics as they were. Returns the number
    of batches this rank's pass fed the model.

    The argument order is torch.optim.swa_utils.update_bn's (loader, model), as
    tk.update_bn's; the former order (twa, loader, ...) still works, with a DeprecationWarning."""
    if isinstance(loader, TWA) and not isinstance(twa, TWA):
        warn_at_caller("distributed.update_bn(twa, loader, ...) is deprecated: pass the loader first, "
                       "update_bn(loader, twa, process_group), as torch.optim.swa_utils.update_bn does",
                       DeprecationWarning)
        loader, twa = twa, loader
    if isinstance(twa, nn.parallel.DistributedDataParallel) and isinstance(twa.module, TWA):
        twa = twa.module
    if not isinstance(twa, TWA):
        raise InvalidTypeError(f"distributed.update_bn(loader, twa, ...) takes a TWA as its second argument, got "
                               f"{type(twa).__name__}; for a plain model use tk.update_bn(loader, model) and then "
                               "distributed.all_reduce_bn_statistics(model, process_group)")
    if process_group is None and twa.parallel is not None:
        process_group = twa.parallel.comm.group
    check_group(process_group)
    frozen_norms = [frozen_norms] if isinstance(frozen_norms, str) else list(frozen_norms)  # read three times below
    norms = [m for m in twa.module.modules() if is_norm(m)]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in norms]
    measured_at = twa._statistics_measured_at()  # where the saved statistics were measured, if they were

    def restore() -> None:  # the statistics, and what they were measured at, as before the call
        for m, buffers in zip(norms, saved):
            for k, b in buffers.items():
                getattr(m, k).copy_(b)
        twa._mark_statistics_measured(measured_at)

    def local_pass() -> int:  # a rank whose share is empty still joins the all-reduce, contributing nothing
        return twa._update_bn_here(loader, call_fn, allow_empty=True, frozen_norms=frozen_norms)

    try:  # a rank whose pass fails stops every rank here, not in the all-reduce below
        fed = agree(local_pass, process_group, "recomputing BatchNorm statistics")
        # every rank joins, with BatchNorm layers or without: their layouts are compared first
        batches = all_reduce_bn_statistics(twa.module, process_group, frozen_norms)
        if batches == 0 and _measured_bn(twa.module, frozen_norms):  # the same on every rank
            # no layer saw a batch: either no loader yielded one, or no layer was reached (below)
            batches = int(all_reduce_metrics({"fed": fed}, process_group)["fed"])
            if batches == 0:
                raise NoBatchesError("distributed.update_bn: no rank's loader yielded a batch, so there are no "
                                     "statistics to measure (they are left as they were); pass each rank its "
                                     "share of the training data, as a list or DataLoader that is not used up")
    except BaseException:  # a Ctrl-C too: one rank's share alone is no statistics to keep
        restore()
        raise
    # a layer no rank's pass reached measured nothing: it keeps its statistics, as in one process
    measured = _measured_bn(twa.module, frozen_norms)
    unreached = [name for name, m in measured.items() if int(m.num_batches_tracked) == 0]
    if unreached:
        buffers_of = dict(zip(norms, saved))
        for name in unreached:
            for k, b in buffers_of[measured[name]].items():
                getattr(measured[name], k).copy_(b)
        warn_unreached(unreached, batches)
    twa._mark_statistics_measured(twa._weights_key())  # the merged statistics, not this rank's pass's
    return fed


def all_reduce_metrics(sums: Mapping[str, float | Tensor], process_group: Any = None) -> dict[str, float]:
    """Sums over the ranks of per-rank metric sums (loss sums, correct counts, sample counts):
    one all-reduce in float64. Divide afterwards: {"correct": c, "count": n} -> c / n.
    Every rank must pass the same keys (in any order): values are summed key by key. The
    ranks first agree on that (two small all-gathers), so a rank whose metrics are refused
    or named otherwise stops every rank with the reason, rather than hanging the others or
    summing one rank's "loss" into another's "count"."""
    check_group(process_group)

    def local_values() -> tuple[list[str], Tensor]:
        if not isinstance(sums, Mapping) or not all(isinstance(k, str) for k in sums):
            raise InvalidTypeError(f"all_reduce_metrics takes a mapping of metric names to sums, got "
                                   f"{type(sums).__name__}")
        keys = sorted(sums)  # one order on every rank, whatever order each built its dict in
        for key in keys:
            value = sums[key]
            if isinstance(value, Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InvalidTypeError(f"all_reduce_metrics: {key!r} is {type(value).__name__}; each metric must be "
                                       "a number or a one-element tensor (sums per rank, divided after the reduction)")
        return keys, torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)

    keys, values = agree(local_values, process_group, "checking its metrics")
    differ = ranks_unlike_rank0(keys, process_group, "all_reduce_metrics' check of the metric names")
    if differ:
        raise InvalidArgumentError(f"all_reduce_metrics: ranks {differ} passed other metric names than rank 0 (here "
                                   f"{keys}); pass every rank the same keys")
    if dist.get_backend(process_group) == "nccl":
        values = values.cuda()
    named_on_failure("all_reduce_metrics' all-reduce",
                     lambda: dist.all_reduce(values, op=dist.ReduceOp.SUM, group=process_group))
    return dict(zip(keys, values.tolist()))


# -- running under torchrun -----------------------------------------------------------------


def init_from_environment(timeout_s: float = 300.0) -> Any:
    """The default process group when torchrun (or any launcher setting WORLD_SIZE > 1) started
    this process, initialised if it is not yet: NCCL with CUDA (device LOCAL_RANK), else gloo,
    with a timeout, so a rank that fails ends the others' collectives instead of hanging
    them. None in a single process. A process group already initialised (by any launcher or
    init_method) is the answer when it has more than one rank."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD if dist.get_world_size() > 1 else None
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.strip().isdigit():
        raise UsageError(f"the environment variable WORLD_SIZE is {world!r}, not a number of processes; launch "
                         "with torchrun, which sets it, or unset it to run in one process")
    if int(world) <= 1:
        return None
    if not dist.is_initialized():
        # env:// rendezvous reads these; a launcher that set WORLD_SIZE alone gets a ValueError there
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise UsageError(f"WORLD_SIZE is {world} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                             "not set; launch with torchrun (which sets them all), set them by hand, or unset "
                             "WORLD_SIZE to run in one process")
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
    try:  # whole or not at all: torchrun reads it once this process has ended
        write_json(path, data)
    except OSError as err:  # the error being raised matters more than its record
        logger.warning("could not write the torchrun error file %s: %s", path, err)


def _drawn_from(loader: DataLoader) -> tuple[Dataset, bool] | None:
    """The samples a batching DataLoader over a map-style dataset draws, as a dataset, and
    whether it shuffles them, where ranks can split them exactly: a sequential or plain
    random sampler draws the whole dataset, a SubsetRandomSampler its indices (a train or
    validation split of one dataset). None for any other sampler (weighted, with
    replacement, or custom)."""
    sampler = loader.sampler
    if isinstance(sampler, SequentialSampler):
        return loader.dataset, False
    whole = getattr(sampler, "_num_samples", None) is None  # num_samples not given: one pass over the dataset
    if isinstance(sampler, RandomSampler) and not sampler.replacement and whole:
        return loader.dataset, True
    if isinstance(sampler, SubsetRandomSampler):
        return Subset(loader.dataset, list(sampler.indices)), True
    return None


def _batches_map_style(loader: Iterable) -> bool:
    """Whether `loader` is a DataLoader that batches a map-style dataset through a sampler."""
    return (isinstance(loader, DataLoader) and loader.batch_size is not None
            and not isinstance(loader.dataset, IterableDataset))


def _sized(loader: Iterable) -> int:
    """len(loader), or InvalidTypeError for a loader without one (a DataLoader over an
    IterableDataset without __len__ has the method but raises TypeError)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidTypeError(f"under torch.distributed a data loader must be a DataLoader over a map-style dataset "
                               f"or have a length, got a {type(loader).__name__} without one; return a "
                               "torch.utils.data.DataLoader over a map-style dataset (or give the iterable a __len__) "
                               "from the data factory") from None


def _shuffle_seed(loader: DataLoader, seed: int | None, group: Any) -> int:
    """The seed of split_loader's shuffled order: `seed`, else rank 0's draw from the loader's
    own generator (DataLoader(generator=...)) or torch's global RNG, sent to every rank so
    that they agree on one order and split it, as they must."""
    if seed is not None:
        return check_seed(seed)
    source = getattr(loader.sampler, "generator", None)
    drawn = torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=source)
    # rank 0's (through the GPU under NCCL)
    return int(gather_rows(drawn, group, "split_loader's draw of the shared seed")[0])


def _local_shape(loader: Iterable, seed: int | None = None) -> tuple[int, ...]:
    """What the ranks must agree on before splitting a loader: (samples its sampler draws,
    batch size, drop_last, whether it shuffles, a digest of the indices a
    SubsetRandomSampler draws from, split_loader's seed) for a batching DataLoader over a
    map-style dataset, else (len(loader), 0, ...). Ranks that differ in any of them split
    different draws: some samples are seen twice, others never."""
    unset = -1  # no subset
    if _batches_map_style(loader):
        drawn = _drawn_from(loader)
        samples = len(drawn[0]) if drawn is not None else len(loader.dataset)
        shuffles = drawn[1] if drawn is not None else isinstance(loader.sampler, RandomSampler)
        subset = unset
        if drawn is not None and isinstance(drawn[0], Subset):  # the indices in order: positions are split
            subset = zlib.crc32(torch.as_tensor(list(drawn[0].indices), dtype=torch.int64).numpy().tobytes())
        # whether a seed was given to shuffle with (None: rank 0 draws one for every rank), and
        # which, as an int64; a loader that does not shuffle never uses it
        given = (0, 0) if seed is None or not shuffles else (1, seed - 2**64 if seed >= 2**63 else seed)
        return samples, loader.batch_size, int(loader.drop_last), int(shuffles), subset, *given
    return _sized(loader), 0, 0, 0, unset, 0, 0


def _check_same_data(loader: Iterable, process_group: Any, who: str, seed: int | None = None) -> None:
    """Every rank passes the same whole loader, which the split then shares out: a rank
    given its own share (pre-sharded files) would split it again, and a count of batches
    that differs left the others waiting in a collective until the timeout, which then
    named no cause. One all-gather of each rank's sizes, sampling and seed; ranks that
    differ stop every rank."""
    mine = agree(lambda: _local_shape(loader, seed), process_group, f"measuring the loader given to {who}")
    table = gather_rows(torch.tensor(mine, dtype=torch.int64), process_group, f"{who}'s check of the loaders")
    if all(torch.equal(row, table[0]) for row in table):
        return

    def described(row: Tensor) -> str:
        samples, batch, drop_last, shuffles, subset, seeded, seed = row.tolist()
        what = (f"{samples} samples in batches of {batch}{', drop_last' if drop_last else ''}"
                f"{', shuffled' if shuffles else ''}{f', a subset with index digest {subset}' if subset >= 0 else ''}"
                if batch else f"{samples} batches")
        return what + (f", seed={seed}" if seeded else "")  # (a seed of 2**63 or more as its int64 wrap)
    detail = "; ".join(f"rank {rank}: {described(row)}" for rank, row in enumerate(table))
    raise UsageError(f"{who}: the ranks were given other data ({detail}). It splits one dataset over the ranks "
                     "itself, so every rank must pass the same whole loader, sampled the same way, and the same "
                     "seed (in twa fit, data.train and data.val return the whole dataset on every rank), not a "
                     "share or an order of its own")


def split_loader(loader: Iterable, process_group: Any, seed: int | None = None) -> Iterable:
    """This rank's share of `loader`, with the same number of batches on every rank (a rank
    with one batch more would wait forever in its extra all-reduce). A DataLoader over a
    map-style dataset is rebuilt with a DistributedSampler over the samples its sampler
    draws (the whole dataset, or a SubsetRandomSampler's indices; shuffled if the loader
    was; it pads by repeating samples); any other sampler is replaced, with a warning.
    Another sized iterable (a DataLoader over an IterableDataset with a length included)
    keeps every W-th batch, len // W of them. An unsized iterable is refused. A shuffled
    order is drawn anew at every pass from `seed` (None: from a seed rank 0 draws from the
    loader's generator or torch's global RNG, so torch.manual_seed governs it as it does a
    plain DataLoader's)."""
    check_group(process_group)
    check_seed(seed)
    _check_same_data(loader, process_group, "split_loader", seed)
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    if _batches_map_style(loader):
        drawn = _drawn_from(loader)
        if drawn is None:
            warn_at_caller(f"split_loader: the DataLoader's {type(loader.sampler).__name__} is replaced by a "
                           "DistributedSampler over the whole dataset (shuffled or not); to keep its sampling, shard "
                           "the data yourself", UserWarning)
            drawn = loader.dataset, isinstance(loader.sampler, RandomSampler)
        dataset, shuffle = drawn
        sampler = _EveryPassSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle,
                                    seed=_shuffle_seed(loader, seed, process_group) if shuffle else 0)
        return DataLoader(dataset, sampler=sampler, **_loading_settings(loader))
    return _Strided(loader, rank, world, _sized(loader) // world)


def _loading_settings(loader: DataLoader) -> dict[str, Any]:
    """How `loader` makes its batches, for a loader rebuilt over another sampler or subset:
    everything but what it draws (workers and their setup, pinning, timeouts, prefetching)."""
    settings = dict(batch_size=loader.batch_size, drop_last=loader.drop_last, collate_fn=loader.collate_fn,
                    num_workers=loader.num_workers, pin_memory=loader.pin_memory, timeout=loader.timeout,
                    worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
                    generator=loader.generator, pin_memory_device=loader.pin_memory_device)
    if loader.num_workers > 0:  # DataLoader refuses these without workers
        settings.update(persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor)
    if hasattr(loader, "in_order"):  # torch 2.6 and later
        settings["in_order"] = loader.in_order
    return settings


def split_for_evaluation(loader: Iterable, process_group: Any = None) -> Iterable:
    """This rank's share of an evaluation loader, every sample (or batch) exactly once over
    the ranks: the shares may differ by one, which an evaluation whose forward has no
    collective allows (a replicated TWA's; a sharded TWA's forward gathers, and needs
    split_loader's equal shares). split_loader's DistributedSampler repeats samples to even
    the shares out, and its stride over another iterable drops the last len % W batches: a
    loss over either differs from one process's. A DataLoader over a map-style dataset gets
    samples rank, rank + W, ... of what its sampler draws (the whole dataset, or a
    SubsetRandomSampler's indices), in order, batched as before (with drop_last=True, of the
    samples one process keeps: all but the last len % batch_size of the draw); a sampler
    whose draws cannot be split so (weighted, with replacement, custom) is refused. Another
    sized iterable gets its batches rank, rank + W, ...."""
    check_group(process_group)
    _check_same_data(loader, process_group, "split_for_evaluation")
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    if _batches_map_style(loader):
        drawn = _drawn_from(loader)
        if drawn is None:
            raise InvalidArgumentError(
                f"split_for_evaluation: the DataLoader's {type(loader.sampler).__name__} draws samples that cannot "
                "be split over the ranks so that each is evaluated once; evaluate a DataLoader over "
                "torch.utils.data.Subset(dataset, indices) instead")
        dataset, _ = drawn
        kept, settings = len(dataset), _loading_settings(loader)
        if loader.drop_last and loader.batch_size:
            # one process drops its last partial batch: the ranks share the samples it keeps,
            # every one of them, in batches of their own (each rank's last may be partial)
            kept -= kept % loader.batch_size
            settings["drop_last"] = False
        return DataLoader(Subset(dataset, range(rank, kept, world)), **settings)
    return _Strided(loader, rank, world, len(range(rank, _sized(loader), world)))


class _EveryPassSampler(DistributedSampler):
    """A DistributedSampler that moves to its next epoch at every pass, so that each epoch
    is shuffled anew, as a plain shuffled DataLoader is, and alike on every rank (every rank
    makes the same passes). A DistributedSampler left alone repeats its first order."""

    def __iter__(self):
        order = super().__iter__()  # the indices of this epoch, already drawn
        self.set_epoch(self.epoch + 1)
        return order


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
