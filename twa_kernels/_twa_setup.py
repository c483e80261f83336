"""What a TWA is built from, checked before it holds anything: the settings given beside
a built subspace, the model's trainable parameters, the subspace (given, or built from the
checkpoints), that it fits the model, and the values the frozen parameters are pinned to."""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Any

import torch
from torch import Tensor, nn

from twa_kernels import _collectives
from twa_kernels.batchnorm import measured_norms, running_norms
from twa_kernels.columns import ColumnReader
from twa_kernels.errors import CheckpointError, InvalidArgumentError, warn_at_caller
from twa_kernels.io import (Checkpoints, changed_error, model_key_names, parameter_aliases,
                            refuse_decorrelated_keys, resolve_checkpoints, warn_unmatched_keys)
from twa_kernels.quant import block_offsets_from_sizes
from twa_kernels.sharded_build import build_shard
from twa_kernels.subspace import Subspace, block_sizes_for, check_build_args


class DefaultInt(int):
    """A default argument that `is` tells apart from the same number passed explicitly:
    TWA refuses a setting given beside a built subspace, and only one that was given."""
    __repr__ = int.__repr__  # the signature shows the number


class DefaultStr(str):
    """As DefaultInt, for a string default."""
    __repr__ = str.__repr__


def given_settings(**settings: Any) -> tuple[set[str], dict[str, Any]]:
    """The names of the settings passed explicitly, and every setting as a plain value."""
    given = {name for name, value in settings.items() if not isinstance(value, (DefaultInt, DefaultStr))}
    plain = {name: int(value) if isinstance(value, DefaultInt) else str(value) if isinstance(value, DefaultStr)
             else value for name, value in settings.items()}
    return given, plain


def averaged(param: nn.Parameter) -> bool:
    """Whether TWA averages `param` in the subspace: it trains and holds values. The others
    are pinned (see pinned_values); a parameter with no elements (an empty cluster of
    AdaptiveLogSoftmaxWithLoss), having nothing to average, is pinned like them (its key
    must be in every checkpoint)."""
    return param.requires_grad and param.numel() > 0


def trainable_parameters(model: nn.Module, bits: int | None, granularity: str | int, group_size: int,
                         int8_gradients: bool) -> list[tuple[str, nn.Parameter]]:
    """The model's parameters TWA averages (see `averaged`), once the build
    settings and the model are known to be usable: a model on the meta device, with lazy
    layers or with nothing to train is refused, and gradient hooks that TWA cannot run are
    named in a warning."""
    check_build_args(bits, group_size, granularity)
    if not isinstance(int8_gradients, bool):
        raise InvalidArgumentError(f"int8_gradients must be True or False, got {int8_gradients!r}")
    # Frozen parameters (requires_grad=False: a frozen backbone, integer tensors) and empty ones
    # are not averaged in the subspace: they are pinned to their checkpoint value (see pinned_values).
    meta = next((name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise InvalidArgumentError(f"the model's {meta!r} is on the meta device, which holds no values: TWA "
                                   "lends the model weights and runs it; build the model on a real device "
                                   "(or model.to_empty(device=...) and load a checkpoint into it)")
    lazy = next((name for name, t in [*model.named_parameters(), *model.named_buffers()]
                 if nn.parameter.is_lazy(t)), None)
    if lazy is not None:
        raise InvalidArgumentError(f"the model's {lazy!r} belongs to a lazy layer (LazyLinear, LazyConv...), "
                                   "which has no shape until it first runs; run one forward pass of the "
                                   "model on a batch before building TWA")
    trainable = [(name, p) for name, p in model.named_parameters() if averaged(p)]
    hooked = [name for name, p in trainable if p._backward_hooks or p._post_accumulate_grad_hooks]
    if hooked:  # TWA's weights are other tensors: a hook on the model's Parameter never runs
        warn_at_caller(f"the model's parameter(s) {hooked[:5]} have gradient hooks (register_hook, "
                       "register_post_accumulate_grad_hook), which TWA's forward does not run: it lends the "
                       "model other tensors and trains the coefficients; mask or scale the loss instead, or "
                       "freeze the parameter (requires_grad=False) to keep it at its checkpoint value",
                       UserWarning)
    if next(model.parameters(), None) is None:
        raise InvalidArgumentError(f"the model ({type(model).__name__}) has no parameters, so TWA has nothing "
                                   "to average; pass the network the checkpoints were saved from")
    if not trainable:
        raise InvalidArgumentError("every parameter of the model has requires_grad=False or no elements, so TWA "
                                   "has nothing to average; set requires_grad=True on the parameters to train")
    return trainable


def check_settings_of(subspace: Subspace, numels: list[int], given: set[str], bits: int | None,
                      granularity: str | int, group_size: int) -> None:
    """A setting given beside a built subspace (`given`: passed, even at TWA's default value)
    must be the subspace's own: it cannot change how that basis was built, and taking it
    silently would train at another bit width than the one asked for."""
    basis = subspace.basis
    if "bits" in given and bits != basis.bits:
        raise InvalidArgumentError(f"bits={bits!r} was given with a subspace built with bits={basis.bits!r}; bits "
                                   "applies when TWA builds from checkpoints: rebuild the subspace with it, or drop it")
    if "group_size" in given and basis.bits is not None and group_size != basis.group_size:
        raise InvalidArgumentError(f"group_size={group_size!r} was given with a subspace built with group_size="
                                   f"{basis.group_size}; rebuild the subspace with it, or drop it")
    if "granularity" in given and not torch.equal(
            block_offsets_from_sizes(block_sizes_for(numels, granularity), sum(numels)), basis.block_offsets.cpu()):
        raise InvalidArgumentError(f"granularity={granularity!r} was given with a subspace of {basis.num_blocks} "
                                   "blocks in another layout; rebuild the subspace with it, or drop it")


def subspace_for(source: Checkpoints | Subspace, trainable: list[tuple[str, nn.Parameter]],
                 aliases: dict[str, list[str]], process_group: Any, shard: bool, given: set[str],
                 **build_args: Any) -> Subspace:
    """The subspace TWA trains in: the one given (whose settings must match the `given`
    ones), or one built from checkpoints for the `trainable` parameters (this rank's
    columns only when sharded)."""
    names, shapes = [n for n, _ in trainable], [tuple(p.shape) for _, p in trainable]
    if isinstance(source, Subspace):
        def check() -> Subspace:
            if not bool(torch.isfinite(source.center).all()):  # from_checkpoints checks its own
                raise InvalidArgumentError("the subspace's center holds NaN or Inf, so every averaged weight would; "
                                           "build it from finite checkpoints")
            check_settings_of(source, [math.prod(s) for s in shapes], given, build_args["bits"],
                              build_args["granularity"], build_args["group_size"])
            return source
        # under a process group, a subspace refused on one rank stops every rank with the reason
        return check() if process_group is None else _collectives.agree(check, process_group, "checking its subspace")
    if shard:  # each rank reads its own columns of the checkpoints only
        return build_shard(source, process_group, names, shapes, aliases=aliases, **build_args)

    def build() -> Subspace:
        with warnings.catch_warnings():  # TWA warns of a one-point subspace itself, at the caller's line
            warnings.filterwarnings("ignore", message="every checkpoint holds the same weights")
            return Subspace.from_checkpoints(source, parameter_names=names, parameter_shapes=shapes,
                                             parameter_aliases=aliases, **build_args)
    # under a process group, a rank that fails here takes every rank down with its error
    return build() if process_group is None else _collectives.agree(build, process_group, "building its subspace")


def check_model_fits(model: nn.Module, subspace: Subspace, frozen: list[tuple[str, nn.Parameter]],
                      int8_gradients: bool) -> None:
    """The subspace spans exactly the trainable parameters of `model`, in their shapes, and
    int8_gradients has groups to round in."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    alias_of = {alias: names[0] for names in parameter_aliases(model).values() for alias in names[1:]}
    for name, shape in zip(subspace.names, subspace.shapes):
        if name in alias_of:  # a tied weight's second name, which named_parameters() does not give
            raise InvalidArgumentError(
                f"the subspace spans {name!r} and the model ties it to {alias_of[name]!r}: one tensor, which the "
                "subspace would hold twice; build the subspace over the model's parameter names, "
                "Subspace.from_checkpoints(..., parameter_names=[n for n, _ in model.named_parameters()]), or "
                "pass the checkpoints to tk.TWA, which does")
        if name not in shapes:
            raise InvalidArgumentError(f"the subspace spans {name!r}, which is no parameter of the model (it has "
                                       f"e.g. {list(shapes)[:3]}); build the subspace over the model's parameter "
                                       "names (parameter_names=...), or pass the checkpoints to tk.TWA")
        if shapes[name] != shape:
            raise InvalidArgumentError(f"the subspace's {name!r} has shape {shape} but the model's is {shapes[name]}")
    frozen_names, spanned = {n for n, _ in frozen}, set(subspace.names)
    unspanned = [name for name in shapes if name not in frozen_names and name not in spanned]
    if unspanned:
        raise InvalidArgumentError(f"the subspace does not span {len(unspanned)} trainable parameter(s) of the model "
                                   f"(first: {unspanned[0]!r}), which TWA would leave unaveraged while training "
                                   "them; build the subspace over every trainable parameter, or freeze these "
                                   "(requires_grad_(False)) so TWA keeps their current values")
    trained_frozen = sorted(set(subspace.names) & frozen_names)
    if trained_frozen:
        raise InvalidArgumentError(f"the subspace spans {trained_frozen[0]!r}, which has requires_grad=False in the "
                                   "model, so TWA would move a frozen parameter; build the subspace without it "
                                   "(Subspace.from_checkpoints(..., parameter_names=[...]))")
    if int8_gradients and subspace.basis.bits is None:
        raise InvalidArgumentError("int8_gradients=True rounds the weight gradient per basis group, and a "
                                   "dense basis (bits=None) has no groups; use bits 1, 2, 4 or 8, or "
                                   "int8_gradients=False")


def _buffers_to_compare(model: nn.Module) -> dict[str, Tensor]:
    """The model's floating-point buffers that its checkpoints hold, aside from the
    statistics of the BatchNorm layers that train in train mode (update_bn recomputes
    those): TWA averages parameters and runs the model with its own buffers, so weights
    trained beside other values of these (a decorrelation matrix decor_R, a learned-then-
    frozen scale, the statistics of a BatchNorm layer the model keeps in eval mode, as a
    frozen backbone's) meet the wrong ones."""
    running = running_norms(model)
    measured = measured_norms(model) if running else {}  # model.train() is called only where it tells something
    norms = tuple(f"{name}." if name else "" for name in measured if name in running)
    persistent = model.state_dict().keys()
    return {name: b for name, b in model.named_buffers() if name in persistent and b.is_floating_point()
            and not any(name.startswith(n) and "." not in name[len(n):] for n in norms)}


def _warn_buffers_differ(differ: dict[str, str]) -> None:
    """differ: {buffer name: the first checkpoint holding another value of it}."""
    name, source = next(iter(differ.items()))
    warn_at_caller(f"{source} holds other values of the model's buffer {name!r} than the model "
                   f"({len(differ)} buffer(s) differ: {sorted(differ)[:5]}); TWA averages parameters only and runs "
                   "the model with its own buffers. Load the buffers the weights were trained with into the model "
                   "first; a decorrelated model (decor_R) is averaged as fold()ed copies", UserWarning)


def pinned_values(model: nn.Module, frozen: list[tuple[str, nn.Parameter]], checkpoints: Checkpoints | None,
                  aliases: dict[str, list[str]], stamps: list[tuple | None] | None = None,
                  adapters_only: bool = False) -> list[Tensor]:
    """The value each frozen parameter keeps under TWA: its checkpoint value. Floating-point
    ones are the checkpoints' mean, summed in float64, so checkpoints that agree (as a frozen
    tensor's do) give their value exactly; integer ones must agree. Without checkpoints (TWA
    built from a Subspace) the model's own values. Whole tensors are read, one at a time.
    The same pass compares the checkpoints' buffers with the model's (_buffers_to_compare)
    and warns where they differ, and the first checkpoint's floating-point tensors that the
    model has no place for are named in a warning (io.warn_unmatched_keys). `stamps` are
    the files' stamps when the subspace was built from them: a file rewritten since would
    pin values of another state than the basis's. With `adapters_only` (a PEFT model, whose
    adapter files hold the adapters alone) a frozen parameter that no checkpoint holds keeps
    the model's own value."""
    if checkpoints is None:
        return [p.detach().clone() for _, p in frozen]
    buffers = _buffers_to_compare(model)
    specs = resolve_checkpoints(checkpoints)
    all_names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    totals: list[Tensor | None] = [None] * len(frozen)
    absent: set[str] = set()  # frozen parameters the checkpoints leave to the model (adapters_only)
    differ: dict[str, str] = {}
    first_digests: dict[str, int] = {}  # a frozen float parameter's first value, by its CRC
    varied: list[str] = []  # frozen float parameters whose checkpoints disagree
    known = model_key_names(model)
    for i, spec in enumerate(specs):
        reader = ColumnReader(spec, i, names=all_names)
        if i == 0:  # a model built smaller than the checkpoints' would train on their first layers
            warn_unmatched_keys({key: (reader.dtype(key), reader.shape(key)) for key in reader.keys()}, known,
                                reader.source)
        else:  # a run decorrelated part way: its later checkpoints hold R
            refuse_decorrelated_keys(reader.keys(), known, reader.source)
        if not frozen and not buffers:
            continue
        if stamps is not None and stamps[i] is not None and reader.stamp != stamps[i]:
            raise changed_error(reader.source, "after the subspace was built from it, so its frozen parameters "
                                "would come from another state than the basis", "build")
        for name, own in buffers.items():
            key = reader.key(name, aliases.get(name, ()))  # VeRA's projections are under their adapter-file key
            if name in differ or key is None or reader.shape(key) != tuple(own.shape):
                continue
            if not torch.equal(reader.tensor(key).to(device=own.device, dtype=own.dtype), own):
                differ[name] = reader.source
        for j, (name, param) in enumerate(frozen):
            key = reader.key(name, aliases.get(name, ()))
            if key is None and adapters_only and i == 0:
                absent.add(name)  # the base model's weight: an adapter file does not hold it
            if name in absent:
                if key is not None:
                    raise CheckpointError(f"{reader.source}: holds the frozen parameter {name!r}, which the first "
                                          "checkpoint does not; pass checkpoints that hold the same entries")
                continue
            if key is None:
                raise CheckpointError(f"{reader.source}: missing key {name!r} (a frozen parameter of the model, "
                                      "pinned to its checkpoint value); was it saved from the same model?")
            if reader.shape(key) != tuple(param.shape):  # before reading: the file's claim may be huge
                raise CheckpointError(f"{reader.source}: key {name!r} has shape {reader.shape(key)} but the model's "
                                      f"frozen parameter has {tuple(param.shape)}")
            value = reader.tensor(key)
            if value.is_floating_point() != param.is_floating_point():  # it would pin a float to an integer's value
                raise CheckpointError(f"{reader.source}: the frozen parameter {name!r} is stored as {value.dtype}, but "
                                      f"the model's is {param.dtype}; save it with the model's kind of dtype")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{reader.source}: the frozen parameter {name!r} holds NaN or Inf, and TWA "
                                      "would pin it to that; use finite checkpoints")
            if value.is_floating_point():
                # in the parameter's own dtype, on the host: values that agree in another stored
                # dtype agree, and a state_dict on a GPU is read too
                own = value.detach().to(device="cpu", dtype=param.dtype).contiguous()
                digest = zlib.crc32(own.reshape(-1).view(torch.uint8).numpy())
                if first_digests.setdefault(name, digest) != digest and name not in varied:
                    varied.append(name)
                totals[j] = value.double() if totals[j] is None else totals[j].add_(value.double())
            elif totals[j] is None:
                totals[j] = value
            elif not torch.equal(totals[j], value):
                raise CheckpointError(f"{reader.source}: the frozen integer parameter {name!r} differs from the first "
                                      "checkpoint's; integer tensors cannot be averaged: make them agree")
    if differ:
        _warn_buffers_differ(differ)
    if varied:
        warn_at_caller(f"frozen parameters {varied[:5]}{' and more' if len(varied) > 5 else ''} differ between the "
                       "checkpoints, so they were trained in the run, but TWA pins each to the checkpoints' mean and "
                       "trains none of them; set requires_grad=True on them before building the TWA to train them "
                       "in the subspace (or pass checkpoints in which they agree)", UserWarning)
    return [p.detach().clone() if t is None else (t / len(specs) if t.is_floating_point() else t).to(
        dtype=p.dtype, device=p.device) for t, (_, p) in zip(totals, frozen)]
