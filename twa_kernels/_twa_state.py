"""The hooks of a TWA's state_dict: a sharded rank records which columns it holds, and a
state is checked before load_state_dict copies any of it (a basis the kernels can read, the
same layout, finite values, the rank's own columns)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from twa_kernels.errors import InvalidArgumentError
from twa_kernels.io.keys import _not_dense_values, strip_wrapper_prefixes
from twa_kernels.quant import QuantizedBasis, basis_meta

if TYPE_CHECKING:
    from twa_kernels.twa import TWA


def _shard_identity(module: TWA) -> list[int]:
    shard = module._parallel
    return [shard.num_cols, shard.comm.world, shard.start, shard.stop]


# A sharded rank's center and basis are its own columns: its state_dict holds them under
# names of their own, "rank<r>_center", so that a save that keeps one copy of each name
# (torch.distributed.checkpoint, which takes plain tensors for the same on every rank) keeps
# every rank's, and each rank loads back its own.
PER_RANK = ("center", "basis_codes", "basis_scales", "basis_mins", "basis_block_offsets", "basis_meta",
            "shard_columns")
_RANK_KEY = re.compile(r"rank(\d+)_(" + "|".join(PER_RANK) + r")$")


def rank_key(rank: int, name: str) -> str:
    return f"rank{rank}_{name}"


def record_shard(module: TWA, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """state_dict hook of a sharded TWA: its per-rank entries under this rank's names, and
    which columns they are."""
    state[prefix + "shard_columns"] = torch.tensor(_shard_identity(module))
    rank = module._parallel.comm.rank
    for name in PER_RANK:
        if prefix + name in state:
            state[prefix + rank_key(rank, name)] = state.pop(prefix + name)


def state_entry(module: TWA, name: str) -> Tensor | None:
    """The tensor a sharded rank's state_dict holds under `name` when `name` is one of the
    names record_shard gives this rank ("rank<r>_center", ...), else None:
    torch.distributed.checkpoint's get_model_state_dict and set_model_state_dict look each
    key of a state_dict up as an attribute of its module."""
    match = _RANK_KEY.match(name)
    if not module._sharded or not match or int(match.group(1)) != module._parallel.comm.rank:
        return None
    if match.group(2) == "shard_columns":
        return torch.tensor(_shard_identity(module))
    return getattr(module, match.group(2))


def take_own_rank(module: TWA, state: dict[str, Any], prefix: str) -> None:
    """This rank's per-rank entries back under the buffers' names; a state holding other
    ranks' entries only (rank 0's file loaded on every rank) is refused by name."""
    ranks = sorted({int(m.group(1)) for key in state if key.startswith(prefix)
                    and (m := _RANK_KEY.match(key[len(prefix):]))})
    if not ranks:
        return  # a state saved before the names were per rank, or an unsharded one
    if not module._sharded:
        raise InvalidArgumentError(f"TWA state_dict: it holds the columns of rank(s) {ranks} of a sharded TWA; load "
                                   "each into the sharded TWA of that rank, or save averaged_state_dict() for a "
                                   "single process")
    rank = module._parallel.comm.rank
    if rank not in ranks:
        raise InvalidArgumentError(f"TWA state_dict: it holds the columns of rank(s) {ranks} of a sharded TWA, not "
                                   f"those of this rank ({rank}); have each rank save and load its own state_dict "
                                   "(torch.distributed.checkpoint keeps every rank's)")
    for name in PER_RANK:
        value = state.pop(prefix + rank_key(rank, name), None)
        if value is not None:
            state[prefix + name] = value
    for other in ranks:  # another rank's columns: a DCP state holds them all
        for name in PER_RANK:
            state.pop(prefix + rank_key(other, name), None)


def _check_shard(module: TWA, state: dict[str, Any], prefix: str) -> None:
    """A sharded rank's state holds its own columns only: loaded on another rank (every rank
    reading rank 0's file) it would fit the shapes and give wrong weights."""
    recorded = state.pop(prefix + "shard_columns", None)
    if recorded is None:
        return
    got = [int(v) for v in torch.as_tensor(recorded).reshape(-1).tolist()]
    if not module._sharded:
        raise InvalidArgumentError("TWA state_dict: it holds one rank's columns of a sharded TWA; load it into the "
                                   "sharded TWA of that rank, or save averaged_state_dict() for a single process")
    own = _shard_identity(module)
    if got != own:
        raise InvalidArgumentError(f"TWA state_dict: it holds columns {got[2]}..{got[3]} of {got[0]} (one of "
                                   f"{got[1]} ranks), but this rank's shard is columns {own[2]}..{own[3]} of "
                                   f"{own[0]} (one of {own[1]} ranks); have each rank save and load its own state_dict "
                                   "(on another number of ranks, load the coefficients alone: "
                                   "twa.coefficients.data.copy_(state['coefficients']))")


LAYOUT = "parameter_layout"


Shapes = Sequence[tuple[str, Sequence[int]]]


def layout_record(averaged: Shapes, frozen: Shapes) -> Tensor:
    """The parameters a TWA's coefficients, center, basis columns and pinned values belong
    to, in their order, with their shapes, as the UTF-8 bytes of a JSON record (a uint8
    tensor, so that every format that saves a state_dict keeps it). Names lose the wrapper
    prefixes torch.compile and DDP put on them."""
    record = {"averaged": [[strip_wrapper_prefixes(n), list(s)] for n, s in averaged],
              "frozen": [[strip_wrapper_prefixes(n), list(s)] for n, s in frozen]}
    return torch.tensor(list(json.dumps(record, separators=(",", ":")).encode()), dtype=torch.uint8)


def _read_layout(value: object) -> dict[str, list]:
    try:
        record = json.loads(bytes(torch.as_tensor(value).reshape(-1).to(torch.uint8).tolist()).decode())
        if isinstance(record, dict) and all(isinstance(record.get(k), list) for k in ("averaged", "frozen")):
            return record
    except (ValueError, TypeError, RuntimeError):  # not UTF-8, not JSON, not a tensor of bytes
        pass
    raise InvalidArgumentError(f"TWA state_dict: its {LAYOUT!r} is not a record twa-kernels writes; load the "
                               "state_dict() of a TWA built the same way")


def _check_layout(module: TWA, state: dict[str, Any], prefix: str) -> None:
    """The state's parameters are this TWA's, in the same order: a model whose layers are
    registered in another order has the same shapes and column count, and its layers would
    take each other's center, basis columns and coefficients. A state saved without the
    record (by an earlier version) is taken as it is."""
    if prefix + LAYOUT not in state:
        state[prefix + LAYOUT] = getattr(module, LAYOUT)
        return
    saved, own = _read_layout(state[prefix + LAYOUT]), _read_layout(getattr(module, LAYOUT))
    for kind in ("averaged", "frozen"):
        theirs, ours = saved[kind], own[kind]
        at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        if at == len(theirs) == len(ours):
            continue
        shown = (lambda entries: f"{entries[at][0]!r} {tuple(entries[at][1])}" if at < len(entries) else "none")
        raise InvalidArgumentError(
            f"TWA state_dict: it was saved from a TWA over other parameters: its {kind} parameter {at} is "
            f"{shown(theirs)} where this TWA's is {shown(ours)} ({len(theirs)} and {len(ours)} {kind} parameters); "
            "its coefficients and basis columns would go to other weights. Build the TWA over the same model (the "
            f"same parameters, registered in the same order); if they are the same parameters under other names, "
            f"delete the state's {LAYOUT!r} entry before loading it")
    state[prefix + LAYOUT] = getattr(module, LAYOUT)  # this TWA's own bytes (the same record)


def _kind(t: Tensor) -> str:
    return ("complex" if t.is_complex() else "floating-point" if t.is_floating_point()
            else "bool" if t.dtype == torch.bool else "integer")


def _check_kinds(module: TWA, state: dict[str, Any], prefix: str) -> None:
    """Each of the module's own entries in `state` a dense tensor of the same kind of number
    (an integer center or complex coefficients would be cast silently by the copy, and a
    list or a sparse tensor would fail inside it after other entries were copied)."""
    for name, own in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if prefix + name not in state:
            continue
        value = state[prefix + name]
        if not isinstance(value, Tensor):
            raise InvalidArgumentError(f"TWA state_dict: {name!r} is a {type(value).__name__}, not a tensor; load "
                                       "the state_dict() of a TWA built the same way")
        if not own.is_meta and (what := _not_dense_values(value)):
            raise InvalidArgumentError(f"TWA state_dict: {name!r} is {what}, not a dense tensor of values; load the "
                                       "state_dict() of a TWA built the same way")
        if _kind(value) != _kind(own):
            raise InvalidArgumentError(f"TWA state_dict: {name!r} holds {_kind(value)} values ({value.dtype}) where "
                                       f"this TWA keeps {_kind(own)} ones ({own.dtype}); load the state_dict() of a "
                                       "TWA built the same way")


def check_loaded_state(module: TWA, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Before load_state_dict copies anything: the incoming basis must be valid (the kernels
    take raw pointers) and match this module's layout, and the center, the coefficients and the
    frozen parameters' pinned values must be finite, and a sharded rank's state must be its
    own columns. Raises a ValueError naming the field, and leaves the module untouched."""
    take_own_rank(module, state, prefix)
    from_a_shard = prefix + "shard_columns" in state  # _check_shard takes the record out
    _check_shard(module, state, prefix)
    _check_layout(module, state, prefix)
    _check_kinds(module, state, prefix)
    fields = {key[len(prefix) + len("basis_"):]: value for key, value in state.items()
              if key.startswith(prefix + "basis_")}
    if fields:
        try:
            loaded = QuantizedBasis.from_state_dict(fields)
        except (KeyError, ValueError) as exc:
            raise InvalidArgumentError(f"TWA state_dict: the basis is invalid: {exc}") from exc
        whole = module._sharded and module._parallel.comm.world > 1 and not from_a_shard
        if whole and loaded.num_cols == module._parallel.num_cols:
            raise InvalidArgumentError(f"TWA state_dict: it holds all {loaded.num_cols} columns of an unsharded TWA, "
                                       f"but this TWA is sharded over {module._parallel.comm.world} ranks and holds "
                                       f"columns {module._parallel.start}..{module._parallel.stop}; load each rank's "
                                       "own state_dict() into a TWA sharded the same way, or build this one with "
                                       "shard=False to load a whole state")
        if (loaded.bits, loaded.group_size, loaded.num_cols) != (module.bits, module.group_size,
                                                                  module.center.numel()):
            raise InvalidArgumentError(f"TWA state_dict: its basis has bits={loaded.bits}, group_size={loaded.group_size}, "
                             f"{loaded.num_cols} columns, but this TWA has bits={module.bits}, group_size="
                             f"{module.group_size}, {module.center.numel()} columns; build the TWA the same way")
        if state[prefix + "basis_meta"].numel() == 3:  # saved before the meta held the format version
            state[prefix + "basis_meta"] = basis_meta(loaded.bits, loaded.group_size, loaded.num_cols)
        # the same block count with other boundaries passes every shape check, yet every
        # coefficient would scale other columns than the ones it was trained for
        own_offsets = [int(v) for v in module.basis_block_offsets.tolist()]
        if [int(v) for v in loaded.block_offsets.tolist()] != own_offsets:
            shown = [int(v) for v in loaded.block_offsets[:8].tolist()]
            raise InvalidArgumentError(f"TWA state_dict: its basis_block_offsets {shown}"
                                       f"{'...' if loaded.block_offsets.numel() > 8 else ''} differ from this TWA's "
                                       f"{own_offsets[:8]}{'...' if len(own_offsets) > 8 else ''}: it was saved from "
                                       "a TWA with another granularity or model; build the TWA the same way")
    for name in ("center", "coefficients", *(f"frozen_{i}" for i in range(len(module.frozen_names)))):
        value, own = state.get(prefix + name), getattr(module, name)
        if isinstance(value, Tensor) and value.shape != own.shape:
            raise InvalidArgumentError(f"TWA state_dict: {name!r} has shape {tuple(value.shape)} but this TWA's is "
                                       f"{tuple(own.shape)}; it was saved from a TWA built with other checkpoints, "
                                       "bits or granularity: build this one the same way")
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InvalidArgumentError(f"TWA state_dict: {name!r} holds NaN or Inf; load an earlier, finite state")
    # load_state_dict(..., assign=True) installs the given tensors themselves: one of another
    # dtype would change the arithmetic (bfloat16 coefficients) or reach the kernels as a type
    # they refuse (a float64 center, int32 offsets), and a strided one as a layout they refuse;
    # each is cast and laid out as the copy without assign does
    for name, own in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        value = state.get(prefix + name)
        same_kind = isinstance(value, Tensor) and value.is_floating_point() == own.is_floating_point()
        if same_kind and (value.dtype != own.dtype or not value.is_contiguous()):
            state[prefix + name] = value.to(own.dtype).contiguous()
