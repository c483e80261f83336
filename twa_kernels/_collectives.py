"""Collectives every rank of a process group joins together, below TWA and the sharded
build that both use them: a check of the group itself, an all-gather of one small row per
rank, a comparison with rank 0 through a digest, and `agree`, which runs one local step on
every rank and makes them all stop together, each naming the failing rank's error."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from twa_kernels.errors import InvalidTypeError, TWAKernelsError, UsageError

_T = TypeVar("_T")


class BasisMismatchError(TWAKernelsError, RuntimeError):
    """The ranks of a process group hold different bases (or centers)."""


class RankFailedError(TWAKernelsError, RuntimeError):
    """Another rank of the process group failed: the message names it and its own error."""


def check_group(group: Any) -> None:
    """torch.distributed initialised, and `group` a ProcessGroup (None: the default group),
    before any collective or checkpoint read: a wrong value found later fails one rank in the
    middle of the others' collectives."""
    if not dist.is_available() or not dist.is_initialized():
        raise UsageError("a process_group needs torch.distributed initialised: call "
                         "torch.distributed.init_process_group(...) first (torchrun sets its environment)")
    if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:  # new_group's answer outside it
        raise UsageError("this rank is not a member of the process_group (dist.new_group returned it a non-member "
                         "marker): build and train the TWA on the group's ranks only, or pass a group that holds "
                         "every rank that builds it")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise InvalidTypeError(f"process_group must be a torch.distributed ProcessGroup (dist.group.WORLD, or one "
                               f"from dist.new_group), got {type(group).__name__}")


# -- every rank leaves a failing step together ------------------------------------------------


_MESSAGE_BYTES = 2048  # of a failing rank's error message, sent to the others


# what gloo and NCCL say when a peer never came or went away (gloo's timeout is a plain
# RuntimeError, not one of torch.distributed's DistError kinds)
_PEER_TROUBLE = ("timed out", "timeout", "connection", "closed", "reset by peer", "broken pipe")


def named_on_failure(what: str, call: Callable[[], _T]) -> _T:
    """Run a collective of the library's (`what` names it). A timeout or a lost peer, most
    often one rank that waited alone, becomes UsageError saying what every rank must do
    (torch's own error, kept as the cause, names only the transport); anything else (memory
    running out, a tensor the backend refuses) is raised as it is."""
    try:
        return call()
    except RuntimeError as exc:
        text = str(exc)
        if isinstance(exc, torch.OutOfMemoryError) or not (
                isinstance(exc, dist.DistError) or any(word in text.lower() for word in _PEER_TROUBLE)):
            raise
        first = (text.strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UsageError(f"{what} across its process group failed ({first}). Every rank must make the same TWA "
                         "calls in the same order: each forward and backward, weights(), averaged_state_dict(), "
                         "and the helpers of tk.distributed and tk.decor.update. A call made on one rank alone "
                         "(under `if rank == 0:`) waits for the others until the timeout; if another rank failed, "
                         "its own error says why") from exc


_NAME_BYTES = 120  # of an exchange's name, in the row that announces it


def _all_gather(mine: Tensor, group: Any, what: str) -> list[Tensor]:
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    named_on_failure(what, lambda: dist.all_gather(table, mine, group=group))
    return [row.cpu() for row in table]


def gather_rows(mine: Tensor, group: Any, what: str) -> list[Tensor]:
    """all_gather of one small CPU tensor per rank (moved to the GPU and back under NCCL),
    announced first: every rank all-gathers a row of the same size that names the exchange
    (`what`) and its size. Ranks that reach different exchanges of the library at once
    (helpers called on some ranks only), or the same one with rows of other sizes, raise
    UsageError together, naming what each rank was doing; without it the all-gathers of
    unequal sizes meet, and gloo ends the process."""
    name = what.encode("utf-8", "replace")[:_NAME_BYTES]
    announced = torch.zeros(8 + _NAME_BYTES, dtype=torch.uint8)
    announced[:8] = torch.tensor([mine.numel() * mine.element_size()], dtype=torch.int64).view(torch.uint8)
    if name:
        announced[8 : 8 + len(name)] = torch.frombuffer(bytearray(name), dtype=torch.uint8)
    rows = _all_gather(announced, group, what)
    if any(not torch.equal(row, rows[0]) for row in rows):
        def said(row: Tensor) -> str:
            size = int(row[:8].view(torch.int64))
            return bytes(row[8:].tolist()).rstrip(b"\0").decode("utf-8", "replace") + f" ({size} bytes)"
        detail = "; ".join(f"rank {rank}: {said(row)}" for rank, row in enumerate(rows))
        raise UsageError(f"the ranks reached different exchanges of the library at once ({detail}). Every rank "
                         "must make the same TWA calls in the same order, with the same settings: a helper of "
                         "tk.distributed or a TWA built on some ranks only (under `if rank == 0:`) meets another call "
                         "on the others")
    return _all_gather(mine, group, what)


def digest(*parts: object) -> int:
    """63 bits of a SHA-256 of `parts` (bytes, or anything with a stable repr)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\0")
    return int.from_bytes(h.digest()[:8], "little") >> 1


def ranks_unlike_rank0(parts: object, group: Any, what: str) -> list[int]:
    """The ranks whose `parts` (a digest of them, all-gathered) differ from rank 0's: the
    same answer on every rank, so all of them can raise together. `what` names the check."""
    table = gather_rows(torch.tensor([digest(parts)], dtype=torch.int64), group, what)
    return [rank for rank, row in enumerate(table) if not torch.equal(row, table[0])]


def agree(work: Callable[[], _T], group: Any, what: str) -> _T:
    """Run this rank's local `work`, then learn in one all-gather whether it failed on any
    rank. A rank whose work raised re-raises its own exception; every other rank raises
    RankFailedError naming the failing ranks and their messages. A rank that fails while its
    peers go on would leave them in their next collective until the backend notices the
    closed connection, and they would report that instead of the cause; here every rank
    leaves the step together, and each reports the real error."""
    check_group(group)
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
    try:
        table = gather_rows(row, group, f"the exchange after {what}")
    except Exception:
        if error is not None:  # this rank's own failure says more than the exchange that followed
            raise error  # (that failure stays attached as its __context__)
        raise
    if error is not None:
        raise error
    failed = {rank: bytes(r[1:].tolist()).rstrip(b"\0").decode("utf-8", "replace")
              for rank, r in enumerate(table) if r[0]}
    if failed:
        detail = "; ".join(f"rank {rank}: {text}" for rank, text in failed.items())
        raise RankFailedError(f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} failed while "
                              f"{what}, so this rank stops too ({detail}). Fix the error reported there")
    return result  # type: ignore[return-value]
