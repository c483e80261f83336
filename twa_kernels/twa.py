"""TWA: the averaging coefficients of a subspace as trainable parameters (journal version).

    twa = tk.TWA(model, checkpoints, bits=4, granularity="tensor")
    opt = torch.optim.AdamW(twa.parameters(), lr=0.02, weight_decay=0.0)  # only the coefficients
    loss = F.cross_entropy(twa(x), y); loss.backward(); opt.step()
    twa.update_bn(loader); model.load_state_dict(twa.averaged_state_dict())

The weights are w = center + sum_r x[r, block] * basis[r], rebuilt every forward by the
fused `reconstruct` op (its backward is the fused `project`). The coefficients start at
zero: w = center, the uniform average of the checkpoints' parameters (SWA), exactly.

How the weights reach the model: each forward puts them into the model's parameter slots
(`module._parameters[name]`, as torch.func.functional_call does) and runs the model. A
forward that records a graph leaves them there, as detached aliases of the same memory,
until a backward has consumed that graph (or the graph is freed): a model that recomputes
part of its forward during the backward, with activation checkpointing
(torch.utils.checkpoint with either `use_reentrant`, a Hugging Face model after
`gradient_checkpointing_enable()`, or `activation_checkpointing_enable()` in transformers 5), then recomputes at TWA's weights, and the gradients
that a reentrant recompute leaves on those aliases are added to the coefficients' own.
After the backward the model holds its own Parameter objects again, unchanged and with no
`.grad`; between a forward and its backward, `model.weight` is TWA's weight. A tensor that
views one of TWA's weights (a model output that is part of one, detached) holds its values
until the next forward, which may write the same memory. Changing the
coefficients while an earlier graph is still waiting for its backward and then running
another forward makes that earlier backward raise UsageError (its recomputation would no
longer see its own weights). Under torch.compile the forward goes through functional_call,
and the compiled graph holds its recomputation itself.

The center, the basis and the coefficients stay float32 whatever the model's dtype; the
forward writes the weights in the model's dtype (bfloat16 models get bfloat16 weights from
the kernel itself, no extra pass) into a workspace the module reuses, so a training step
allocates no D-long buffer. Under glibc each backward's weight gradients are held until
the next backward's (see _memory.gradients_to_hold), as .grad holds SGD's between steps, so
that malloc reuses their memory instead of giving it back and faulting it in again;
evaluation (eval(), or a forward that records no graph) lets them go. Tied weights (one
tensor under several names) are one row segment of the basis, and every name gets the
averaged value in averaged_state_dict().

Frozen parameters (requires_grad=False: a frozen backbone, integer tensors), and parameters
with no elements, are kept out of the subspace, because a quantisation group spanning a
frozen and a trained tensor would move the frozen one. Each is pinned to its checkpoint
value: the checkpoints' mean summed in float64, which is exactly the value when they agree,
as a frozen tensor's do (integer ones must agree; floating-point ones that differ, trained
in the run and frozen only for the TWA, get a warning). TWA holds the pinned values as
buffers (`frozen_<i>`, names in `frozen_names`) and lends them to the model with the
averaged weights.
"""

from __future__ import annotations

import copy
import math
import reprlib
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call

from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, MissingKeyError, UsageError, warn_at_caller
from twa_kernels._transformers import TransformersFacade
from twa_kernels import _collectives, sharding
from twa_kernels._checks import check_module
from twa_kernels._memory import Workspace
from twa_kernels._sums import float64_sums
from twa_kernels._twa_setup import (DefaultInt, DefaultStr, averaged, check_model_fits,
                                    given_settings, pinned_values, subspace_for, trainable_parameters)
from twa_kernels._twa_state import LAYOUT, check_loaded_state, layout_record, record_shard, state_entry, take_own_rank
from twa_kernels.batchnorm import has_running_statistics, running_norms, update_bn
from twa_kernels.lending import LentWeights, LoanAnchor, keeping_buffers, release_with_graph, same_key
from twa_kernels.io import (Checkpoints, checkpoint_aliases, parameter_aliases, resolve_checkpoints,
                            strip_wrapper_prefixes, unwrap_model)
from twa_kernels.ops import project, project_int8, reconstruct, reconstruct_into, reconstruct_pieces
from twa_kernels.quant import QuantizedBasis, dequantize
from twa_kernels.sharded_build import ShardedSubspace
from twa_kernels.subspace import Subspace, checked_build_args, warn_if_one_point

# TWA's state that is identical on every rank (replicated) or owned per rank (sharded):
# never broadcast by DDP (see DistributedDataParallel's _ddp_params_and_buffers_to_ignore)
BASIS_BUFFERS = ("center", "basis_codes", "basis_scales", "basis_mins", "basis_block_offsets", "basis_meta")
# the basis's integer buffers, which no training changes: written only by building and
# loading the TWA. (An average of them, as AveragedModel(use_buffers=True) takes, truncates.)
_FIXED_BASIS = ("basis_codes", "basis_block_offsets", "basis_meta")
# the buffers the weights are computed from, beside the coefficients (a weights key's stamp)
_WEIGHTS_FROM = ("center", "basis_codes", "basis_scales", "basis_mins")

# dtypes the kernels write directly; other model dtypes (float16) get float32 weights cast once
_KERNEL_OUTPUT_DTYPES = (torch.float32, torch.bfloat16)


_FROZEN_CHANGED_FIX = (
    "the TWA holds the one copy of each frozen parameter, which is now changed, so its outputs, weights(), "
    "averaged_state_dict() and state_dict() would no longer hold the checkpoints' values, and it refuses them. To "
    "keep the trained coefficients, build a TWA again from the same checkpoints and copy them into it "
    "(new.coefficients.data.copy_(twa.coefficients)), or load a state_dict() saved before the change; make such "
    "changes on a model of your own (model.load_state_dict(twa.averaged_state_dict())) or out of place")


def _refuse_state_with_changed_frozen(module: TWA, state: dict, prefix: str, local_metadata: dict) -> None:
    module._check_frozen_unchanged()  # (a state_dict hook: a saved state would carry the changed values)


def _refuse_inference_mode(what: str, fix: str) -> None:
    """UsageError under torch.inference_mode: the tensors a TWA made there (its coefficients,
    center and basis) record neither gradients nor versions, so it could never train."""
    if torch.is_inference_mode_enabled():
        raise UsageError(f"{what} under torch.inference_mode() would give it tensors that can never be trained "
                         f"(they record no gradients or versions); {fix}, and use inference_mode for evaluating it")


class TWA(TransformersFacade, nn.Module):
    """Trainable Weight Averaging over `checkpoints_or_subspace` for `model`.

    `model` supplies the architecture and the buffers (BatchNorm statistics); it is held,
    not registered, so `twa.parameters()` are the coefficients alone. The model's own
    Parameters are never written and never get a `.grad`: a forward lends the model TWA's
    weights until its backward is done (see the module docstring), then gives its own
    back, and they change only when you load `averaged_state_dict()` into it. The state
    (coefficients, basis, center) is in `state_dict()`, loadable with weights_only=True.

    `bits`, `granularity`, `group_size` and `progress` build the subspace as
    `Subspace.from_checkpoints` does; given a Subspace, they come from it. `process_group`
    trains over the ranks of a torch.distributed group, each rank holding the whole basis,
    or, with `shard=True`, its own columns of it (docs/distributed.md).

    `int8_gradients=True` projects each weight gradient rounded to int8 per basis group
    (`tk.project_int8`, a packed basis only), so the coefficients' gradient moves from the
    float one by at most project_int8's bound. Whether that is faster depends on the CPU and
    the bit width (on some, only at 1 bit; docs/benchmarks.md).
    Replicated ranks round their own gradients, sharded ranks the reduce-scattered mean.
    A compiled forward (torch.compile) of a replicated or single-process TWA projects in
    float32.
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoints_or_subspace: Checkpoints | Subspace,
        bits: int | None = DefaultInt(4),
        granularity: str | int = DefaultStr("tensor"),
        group_size: int = DefaultInt(128),
        progress: bool | None = None,
        process_group: Any = None,
        shard: bool = False,
        int8_gradients: bool = False,
    ):
        super().__init__()
        _refuse_inference_mode("TWA(...)", "build the TWA outside it")
        given, settings = given_settings(bits=bits, granularity=granularity, group_size=group_size)
        bits, granularity, group_size = settings["bits"], settings["granularity"], settings["group_size"]
        check_module(model, "TWA's model (the network the checkpoints were saved from)")
        if shard and process_group is None:
            raise InvalidArgumentError("shard=True splits the basis across a process group: pass process_group= too")
        if process_group is not None:
            _collectives.check_group(process_group)
        wrapper, model = model, unwrap_model(model)  # compiled or DDP-wrapped: checkpoints name the inner one's
        if model is not wrapper:
            warn_at_caller(f"TWA holds the model inside the {type(wrapper).__name__} it was given (`._orig_mod` of "
                           "torch.compile, `.module` of DDP, DataParallel or AveragedModel) and runs it as it is, "
                           "without the wrapper: averaged_state_dict() has that inner model's keys, so load it into "
                           "the inner model. To compile, compile the TWA (torch.compile(twa)); to train across "
                           "processes, wrap the TWA in DDP or pass process_group=", UserWarning)

        def check_args() -> list[tuple[str, nn.Parameter]]:
            return trainable_parameters(model, bits, granularity, group_size, int8_gradients)
        # under a process group, arguments refused on one rank stop every rank here, rather
        # than leaving the others in the build's collectives until the timeout
        trainable = check_args() if process_group is None else _collectives.agree(check_args, process_group,
                                                                                  "checking its arguments")
        bits, group_size, granularity = checked_build_args(bits, group_size, granularity)  # numpy's ints as ints
        if process_group is not None:  # settings that differ would pair unlike collectives, or mix bases
            # a model cast to another dtype on one rank built, and trained on gradients of that rank's
            # precision (compared per parameter, shown as the set of dtypes)
            dtypes = [str(p.dtype).removeprefix("torch.") for _, p in trainable]
            settings = dict(shard=shard, bits=bits, granularity=granularity, group_size=group_size,
                            int8_gradients=int8_gradients, parameter_dtypes=sorted(set(dtypes)))
            unlike = _collectives.ranks_unlike_rank0([*sorted(settings.items()), dtypes], process_group,
                                                      "TWA's check of the ranks' settings")
            if unlike:
                raise _collectives.BasisMismatchError(
                    f"ranks {unlike} were given other build settings than rank 0 ({', '.join(settings)}; here "
                    f"{', '.join(f'{k}={v!r}' for k, v in settings.items())}): build the TWA with the same arguments "
                    "on every rank")
        aliases = parameter_aliases(model)
        # the keys checkpoints hold the parameters under: also a PEFT adapter file's, which drop
        # the adapter's name (and hold no frozen base weight: those keep the model's values)
        read_as = checkpoint_aliases(model)
        if not isinstance(checkpoints_or_subspace, Subspace):
            # once, for the build and the pins alike: a generator (Path.glob) is read once, a
            # directory is listed once (and its notes, such as a last.ckpt left out, said once)
            given_checkpoints = checkpoints_or_subspace
            checkpoints_or_subspace = (resolve_checkpoints(given_checkpoints) if process_group is None else
                                       # a rank that cannot list its files stops every rank, naming why
                                       _collectives.agree(lambda: resolve_checkpoints(given_checkpoints),
                                                          process_group, "resolving its checkpoints"))
        subspace = subspace_for(checkpoints_or_subspace, trainable, read_as, process_group, shard, given,
                                bits=bits, granularity=granularity, group_size=group_size, progress=progress)
        frozen = [(n, p) for n, p in model.named_parameters() if not averaged(p)]

        def check_and_pin() -> list[Tensor]:
            check_model_fits(model, subspace, frozen, int8_gradients)
            valued = [name for name, p in frozen if p.numel()]  # an empty one has no value to differ
            if isinstance(checkpoints_or_subspace, Subspace) and valued:
                warn_at_caller(f"TWA built from a Subspace pins the model's {len(valued)} frozen parameter(s) (e.g. "
                               f"{valued[0]!r}) to the model's own values, which a Subspace does not hold; load "
                               "the checkpoints' values into the model first if they differ", UserWarning)
            return pinned_values(model, frozen, None if isinstance(checkpoints_or_subspace, Subspace)
                                 else checkpoints_or_subspace, read_as, subspace.source_stamps,
                                 adapters_only=read_as != aliases)
        # under a process group, a rank whose model does not fit fails every rank with its error
        pinned = check_and_pin() if process_group is None else _collectives.agree(check_and_pin, process_group,
                                                                                   "checking its model")
        if process_group is not None:  # the basis is checked below; a frozen backbone must match as well
            sharding.check_same_values([n for n, _ in frozen], pinned, process_group,
                                       "the values of the model's frozen parameters")
        self._model = [model]  # a list keeps it out of the module tree
        self._share_transformers_config(model)
        self.names, self.shapes = subspace.names, subspace.shapes
        self.frozen_names = [n for n, _ in frozen]
        for i, value in enumerate(pinned):
            self.register_buffer(f"frozen_{i}", value)
        self.aliases = {n: a for n, a in aliases.items() if len(a) > 1}
        self.bits, self.group_size = subspace.basis.bits, subspace.basis.group_size
        self.orthonormal = bool(getattr(subspace, "orthonormal", False))  # a sharded build never orthonormalises
        self.int8_gradients = int8_gradients
        center, basis, num_blocks = subspace.center.float(), subspace.basis, subspace.basis.num_blocks
        if not isinstance(subspace, ShardedSubspace):
            warn_if_one_point(basis)
        self._parallel: sharding.Replicated | sharding.Sharded | None = None
        if process_group is not None:
            local = ((subspace.num_cols, subspace.num_blocks, subspace.b_lo, subspace.b_hi)
                     if isinstance(subspace, ShardedSubspace) else None)
            self._parallel = sharding.make_strategy(process_group, shard, center, basis, local)
            center, basis, num_blocks = self._parallel.center, self._parallel.basis, self._parallel.num_blocks
        self.coefficients = nn.Parameter(torch.zeros(basis.k, num_blocks, dtype=torch.float32, device=basis.device))
        self._averaged: list[Tensor] = []  # the coefficients Parameter whose gradient is averaged
        self._alone_checked = False  # whether a training forward looked for a job it is not part of
        self._keep_gradient_averaged()
        # a subspace made under torch.inference_mode holds tensors that record no versions
        self.register_buffer("center", center.clone() if center.is_inference() else center)
        for key, value in basis.state_dict().items():
            self.register_buffer(f"basis_{key}", value.clone() if value.is_inference() else value)
        # which parameters the state belongs to, checked when a state is loaded
        self.register_buffer(LAYOUT, layout_record(list(zip(self.names, self.shapes)),
                                                   [(n, p.shape) for n, p in frozen]).to(center.device))
        self._workspace = Workspace()
        self._lent = LentWeights(model, [aliases.get(name, [name]) for name in self.names + self.frozen_names],
                                 pinned_from=len(self.names))
        # DDP over a TWA must never broadcast the basis (identical, or sharded, on every rank)
        self._ddp_params_and_buffers_to_ignore = [*BASIS_BUFFERS, LAYOUT]
        if not self._sharded:
            # allocated (and its pages touched) now, so the first training step does not pay for it
            self._workspace.prepare(self.center.numel(), self._forward_dtype(), self.center.device)
        # (the weights update_bn last measured statistics at, a copy of the statistics it measured)
        self._bn_key: tuple | None = None
        self._mark_basis_loaded()
        self._register_load_state_dict_pre_hook(check_loaded_state, with_module=True)
        self._register_state_dict_hook(_refuse_state_with_changed_frozen)
        if self._sharded:  # which columns this rank's state holds, checked when it is loaded
            self._register_state_dict_hook(record_shard)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # a sharded rank's per-rank state_dict names, which DCP's get/set_model_state_dict
            # look up as attributes; checked only after nn.Module's own lookup has missed
            if name.startswith("rank") and (entry := state_entry(self, name)) is not None:
                return entry
            raise

    @property
    def parallel(self) -> sharding.Replicated | sharding.Sharded | None:
        """How this TWA runs over its process group (None in one process): the strategy,
        with its collectives' byte counts in `.comm.bytes` (reset with `.comm.reset()`)
        and, when sharded, this rank's columns `.start`..`.stop`."""
        return self._parallel

    @property
    def _sharded(self) -> bool:
        return getattr(self, "_parallel", None) is not None and self._parallel.shard

    @property
    def module(self) -> nn.Module:
        """The wrapped model."""
        return self._model[0]

    @property
    def basis(self) -> QuantizedBasis:
        """The packed basis, as a QuantizedBasis over this module's buffers (no copy)."""
        return QuantizedBasis(self.basis_codes, self.basis_scales, self.basis_mins, self.basis_block_offsets,
                              self.bits, self.group_size, self.center.numel())

    @property
    def subspace(self) -> Subspace:
        """The subspace the coefficients live in: names, shapes, center and basis (a
        sharded TWA holds only its rank's columns of them, and refuses)."""
        if self._sharded and self._parallel.comm.world > 1:
            raise UsageError(f"twa.subspace: this TWA is sharded over {self._parallel.comm.world} ranks and holds "
                             f"only columns {self._parallel.start}..{self._parallel.stop} of the center and basis; "
                             "for the weights call averaged_state_dict() (on every rank), or build the TWA with "
                             "shard=False to hold the whole subspace")
        return Subspace(self.names, self.shapes, self.center, self.basis, orthonormal=self.orthonormal,
                        aliases=self.aliases)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """nn.Module.load_state_dict, with a state that lacks some of this TWA's keys (every
        basis_* tensor, say) refused under strict=True by a MissingKeyError naming them, before
        anything is copied. The pre-hook cannot tell: torch hands it strict=True always."""
        if not isinstance(state_dict, Mapping):
            raise InvalidTypeError(f"TWA.load_state_dict takes a state_dict (a mapping of names to tensors, as "
                                   f"TWA.state_dict() returns), got {type(state_dict).__name__}")
        changed = self.__dict__.pop("_frozen_changed", None)  # (this TWA's own keys: no export, not refused)
        try:
            own_state = self.state_dict(keep_vars=True)  # (a subclass's too)
        finally:
            if changed:
                self.__dict__["_frozen_changed"] = changed
        own_keys = set(own_state)
        if state_dict and own_keys.isdisjoint(state_dict):
            # the state of a wrapped TWA: torch.compile's `_orig_mod.`, DDP's `module.` before every key
            unwrapped = {strip_wrapper_prefixes(key): value for key, value in state_dict.items()}
            if len(unwrapped) == len(state_dict) and not own_keys.isdisjoint(unwrapped):
                state_dict = unwrapped
            else:  # strict=False would load nothing, and say nothing
                raise InvalidArgumentError(f"TWA state_dict: none of its keys {sorted(state_dict)[:6]} is this TWA's "
                                           f"({sorted(own_keys)[:6]}); load the state_dict() of a TWA built the same "
                                           "way (a model's own state goes to twa.module)")
        if strict:  # torch would copy every entry it can and raise only after
            # a sharded rank's entries by the buffers' names, in both (see _twa_state.PER_RANK)
            incoming = dict(state_dict)
            take_own_rank(self, incoming, "")
            take_own_rank(self, own_state, "")
            # (a state saved before the parameters' record was kept is taken without it)
            own = [key for key in own_state if key not in ("shard_columns", LAYOUT)]
            missing = [key for key in own if key not in incoming]
            if missing:
                raise MissingKeyError(f"TWA state_dict: missing {missing}; load the whole state_dict() of a TWA built "
                                      "the same way, or pass strict=False to keep this TWA's own values for them")
            unexpected = [key for key in incoming if key not in own_state and key != "shard_columns"]
            if unexpected:
                raise InvalidArgumentError(f"TWA state_dict: unexpected keys {unexpected[:8]}; load the state_dict() "
                                           "of a TWA (a model's own state goes to twa.module), or pass strict=False "
                                           "to ignore them")
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:  # a new coefficients Parameter: its gradient averaged from now, compiled forward or not
            self._keep_gradient_averaged()
        return result

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        errors_before = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._mark_basis_loaded()
        # a TWA whose frozen parameters the model changed in place is whole again once a state
        # brings all of them (through this TWA, a module holding it or a compiled wrapper)
        if (self.__dict__.get("_frozen_changed") and len(error_msgs) == errors_before
                and all(f"{prefix}frozen_{i}" in state_dict for i in range(len(self.frozen_names)))):
            del self.__dict__["_frozen_changed"]

    # The model is held outside the module tree; device moves and train/eval reach it here.
    # A dtype cast (twa.to(torch.bfloat16), twa.half()) reaches the model only: the center,
    # the basis metadata and the coefficients stay float32, as the kernels need, and the frozen
    # parameters' values keep the dtype the model had when the TWA was built.
    def _apply(self, fn, recurse=True):
        _refuse_inference_mode("Moving or casting a TWA (.to, .cuda, .half)", "move or cast it outside it")
        self._lent.reset()  # the model's own Parameters are the ones to move or cast
        self.module._apply(fn, recurse)
        # the center, the basis and the coefficients stay float32 whatever .half() or .to(dtype)
        # asks: cast there and back they would come back rounded, so they only change device
        kept = ["center", "basis_scales", "basis_mins"] + (["basis_codes"] if self.bits is None else [])
        # the frozen parameters' checkpoint values too: _pinned casts them to the model's dtype
        kept += [f"frozen_{i}" for i in range(len(self.frozen_names))]
        exact = {name: getattr(self, name) for name in kept}
        gradient = None if self.coefficients.grad is None else self.coefficients.grad.detach()  # its own storage
        coefficients = self.coefficients.data
        super()._apply(fn, recurse)
        for name, value in exact.items():
            moved = getattr(self, name)
            if moved.dtype != value.dtype:
                setattr(self, name, value.to(moved.device))
        if self.coefficients.dtype != coefficients.dtype:
            self.coefficients.data = coefficients.to(self.coefficients.device)
        grad = self.coefficients.grad
        if gradient is not None and grad is not None and grad.dtype != gradient.dtype:
            # nn.Module._apply casts the gradient with its parameter: a float64 gradient on float32
            # coefficients would break the optimizer's next step, and .half() there and back round it
            self.coefficients.grad = gradient.to(grad.device)
        self._workspace = Workspace()
        if not self._sharded:
            self._workspace.prepare(self.center.numel(), self._forward_dtype(), self.center.device)
        self._mark_basis_loaded()
        return self

    def train(self, mode: bool = True) -> TWA:
        """nn.Module.train; leaving training also releases the gradients held for reuse, and
        reads the ranks' agreement flags still on a GPU (Comm.check_agreement)."""
        if not mode and hasattr(self, "_workspace"):  # no backward soon reuses the held gradients' memory
            self._workspace.drop_gradients()
        if not mode and getattr(self, "_parallel", None) is not None:  # an evaluation: the ranks agreed so far?
            self._parallel.comm.check_agreement()
        self.module.train(mode)
        return super().train(mode)

    def _parameter_dtypes(self) -> dict[str, torch.dtype]:
        # from the model's own parameter slots: walking the module tree (named_parameters)
        # twice a forward would be a large part of TWA's Python per step (docs/design.md)
        return dict(zip(self.names, self._lent.own_dtypes(0, len(self.names))))

    def _typed(self, flat: Tensor, dtypes: dict[str, torch.dtype]) -> dict[str, Tensor]:
        """The [D] vector's pieces by name, each in its parameter's dtype."""
        pieces = {name: piece.view(shape) for name, piece, shape in
                  zip(self.names, flat.split([math.prod(s) for s in self.shapes]), self.shapes)}
        return {name: piece if piece.dtype == dtypes[name] else piece.to(dtypes[name])
                for name, piece in pieces.items()}

    def _forward_dtype(self, dtypes: dict[str, torch.dtype] | None = None) -> torch.dtype:
        """The model's dtype where the kernels write it, else float32 (cast per piece)."""
        kinds = set((dtypes or self._parameter_dtypes()).values())
        return kinds.pop() if len(kinds) == 1 and kinds <= set(_KERNEL_OUTPUT_DTYPES) else torch.float32

    def _pinned(self) -> list[Tensor]:
        """The frozen parameters' values, in the order of self.frozen_names, each in its
        parameter's dtype (the model cast on its own, as the trainable weights follow it)."""
        if not self.frozen_names:
            return []
        dtypes = self._lent.own_dtypes(len(self.names), len(self.names) + len(self.frozen_names))
        # detached: the model's own `.data =` (a cast inside averaged_model()) replaces what its
        # slot holds, not the TWA's buffer; an in-place change is caught by _keeping_frozen
        return [value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value.detach()
                for value, dtype in zip(self._frozen_values(), dtypes)]

    def _frozen_values(self) -> list[Tensor]:
        return [getattr(self, f"frozen_{i}") for i in range(len(self.frozen_names))]

    @contextmanager
    def _keeping_frozen(self, during: str, every: bool = False) -> Iterator[None]:
        """Raise UsageError after a block that changed a frozen parameter in place: the TWA
        holds one copy of each, handed to the model uncopied (a copy per forward would double
        a frozen backbone's memory traffic), so the change would last, silently. A forward
        looks at the values of those whose version moved; `every` looks at all of them, also
        one changed through `.data`, which moves no version (PEFT merges adapters so), at the
        cost of one pass over the frozen weights."""
        if not self.frozen_names:
            yield
            return
        self._check_frozen_unchanged()
        values = self._frozen_values()
        prints = self.__dict__.setdefault("_frozen_prints", {})  # index -> (storage, version, fingerprint)
        for i, value in enumerate(values):
            if prints.get(i, (None, None))[:2] != (value.data_ptr(), value._version):  # new, or changed since
                prints[i] = (value.data_ptr(), value._version, float64_sums(value))
        yield
        changed = []
        for i, (name, value) in enumerate(zip(self.frozen_names, values)):
            if value._version == prints[i][1] and not every:
                continue
            # a version moves with any in-place op, also one that writes the same values (an
            # Embedding's max_norm over rows within it): the values decide
            now = float64_sums(value)
            if torch.equal(now, prints[i][2]):
                prints[i] = (value.data_ptr(), value._version, now)
            else:
                changed.append(name)
        if changed:
            # kept: the next forward would otherwise take the changed values as the TWA's own
            self.__dict__["_frozen_changed"] = changed
            cause = ("(a frozen nn.Embedding(max_norm=...) renormalises the rows it looks up: set its max_norm to "
                     "None, or renormalise those rows in the checkpoints before building the TWA)"
                     if during == "during the forward" else
                     "(PEFT's merge_and_unload() adds the adapters into the base weights)")
            raise UsageError(f"the model changed its frozen parameter(s) {reprlib.repr(changed)} in place {during} "
                             f"{cause}: " + _FROZEN_CHANGED_FIX)

    def _check_frozen_unchanged(self) -> None:
        """UsageError once a frozen parameter was found changed in place: this TWA's outputs,
        weights and state would carry the changed values as the checkpoints'."""
        if changed := self.__dict__.get("_frozen_changed"):
            raise UsageError(f"this TWA's frozen parameter(s) {reprlib.repr(changed)} were changed in place by the "
                             "model (the error raised then said where): " + _FROZEN_CHANGED_FIX)

    def weights(self) -> dict[str, Tensor]:
        """The averaged weights w = center + basis^T x by parameter name, each in its
        parameter's dtype (differentiable; fresh tensors, safe to keep), and the frozen
        parameters' pinned values (views of the TWA's own copy: clone one before changing it)."""
        self._check_frozen_unchanged()
        self._check_basis_unchanged()
        if self._sharded:  # this rank holds some columns: gather
            flat = self._parallel.reconstruct(self.coefficients, self.basis, self.center, self.int8_gradients)
        else:
            flat = reconstruct(self.basis, self.coefficients, self.center)
        return self._named(flat)

    def _named(self, flat: Tensor) -> dict[str, Tensor]:
        """The weights vector's pieces by parameter name in their dtypes, and the frozen
        parameters' pinned values."""
        return {**self._typed(flat, self._parameter_dtypes()), **dict(zip(self.frozen_names, self._pinned()))}

    def _transformable_weights(self) -> dict[str, Tensor]:
        """weights() in plain torch ops, for forward under a torch.func transform: the basis
        dequantised whole (k x D floats, held for the backward), summed in float32."""
        if self._sharded:
            raise UsageError("a sharded TWA cannot run under a torch.func transform (its forward gathers the weights "
                             "across ranks); use a replicated one, or loss.backward()")
        self._check_basis_unchanged()
        basis = self.basis
        columns = torch.arange(basis.num_cols, device=self.center.device)
        blocks = torch.bucketize(columns, basis.block_offsets[1:-1], right=True)
        # index_select, not indexing: vmap over forward-mode AD (a vectorised Hessian) has no rule for index_put
        return self._named(self.center + (dequantize(basis) * self.coefficients.index_select(1, blocks)).sum(0))

    def _forward_weights(self, dtypes: dict[str, torch.dtype]) -> tuple[list[Tensor], Callable[[], None] | None]:
        """weights() in the order of self.names, written into the reused workspace: only
        forward() hands these to the model, which keeps them no longer than its graph. And
        the call that frees the workspace when the graph is freed without a backward (None
        where nothing waits for it)."""
        if self._sharded:
            weights = self.weights()
            return [weights[name] for name in self.names], None
        dtype = self._forward_dtype(dtypes)
        # with gradients on, the model's graph may save the weights (to pass gradients to its
        # inputs) even where the coefficients take none: the buffer stays taken until the caller
        # releases it, and a second forward before the backward gets one of its own
        graph = torch.is_grad_enabled()
        workspace = self._workspace
        out, release = workspace.take(self.center.numel(), dtype, self.center.device, graph)
        if not (graph and self.coefficients.requires_grad):
            flat = reconstruct_into(self.basis, self.coefficients, self.center, out)
            typed = self._typed(flat, dtypes)
            if not graph:
                release()
            return [typed[name] for name in self.names], release if graph else None
        # one view of the workspace per tensor; the backward projects their gradients where
        # autograd leaves them (on the CPU, without gathering a D-long gradient), then frees the workspace
        pieces = reconstruct_pieces(self.basis, self.coefficients, self.center, out, self.shapes, release,
                                    int8_gradients=self.int8_gradients, hold=workspace.hold_gradients)
        return [piece if piece.dtype == dtypes[name] else piece.to(dtypes[name])
                for name, piece in zip(self.names, pieces)], release

    def _weights_key(self, dtypes: dict[str, torch.dtype] | None = None) -> tuple:
        """What the weights are computed from: equal keys give equal weights."""
        return (self.coefficients.detach().clone(), self._forward_dtype(dtypes), self._stamp(_WEIGHTS_FROM))

    def _stamp(self, names: Sequence[str]) -> tuple:
        """The storage and version of the named buffers: which values of them a check saw."""
        return tuple((getattr(self, name).data_ptr(), getattr(self, name)._version) for name in names)

    def _fixed_basis_sample(self) -> list[Tensor]:
        """The block offsets and layout record whole, and 4,096 of the codes evenly spaced:
        what an average of the integer buffers truncates changes most of their values."""
        codes = self.basis_codes.reshape(-1)
        count = min(codes.numel(), 4096)
        # (integer steps: linspace in float32 rounds past the end beyond 2^24 codes)
        at = torch.arange(count, device=codes.device) * (codes.numel() - 1) // max(count - 1, 1)
        return [codes[at].clone(), self.basis_block_offsets.clone(), self.basis_meta.clone()]

    def _mark_basis_loaded(self) -> None:
        self.__dict__["_basis_as_loaded"] = (self._stamp(_FIXED_BASIS), self._fixed_basis_sample())

    def _check_basis_unchanged(self) -> None:
        """UsageError where the basis's integer buffers hold other values than when the TWA
        was built or loaded: what averages buffers (AveragedModel(twa, use_buffers=True))
        truncates them, and the weights would be computed from a damaged basis. Writes of
        the same values (AveragedModel keeps a copy's buffers in step so) pass."""
        loaded = self.__dict__.get("_basis_as_loaded")
        if loaded is None or torch.compiler.is_compiling():
            return
        stamp = self._stamp(_FIXED_BASIS)
        if loaded[0] == stamp:
            return
        if all(torch.equal(was, now) for was, now in zip(loaded[1], self._fixed_basis_sample())):
            self.__dict__["_basis_as_loaded"] = (stamp, loaded[1])
            return
        raise UsageError("the TWA's basis (its integer codes) was changed in place since it was built or loaded, by "
                         "something other than load_state_dict: AveragedModel(twa, use_buffers=True) averages every "
                         "buffer, and an average of integer codes truncates them. Use AveragedModel(twa) (it averages "
                         "the coefficients) and measure its statistics with averaged.module.update_bn(loader). A "
                         "state loaded into twa.state_dict()'s own tensors (torch.distributed.checkpoint's load) is "
                         "taken with twa.load_state_dict(state) after it")

    def _statistics(self) -> list[Tensor]:
        """The model's running statistics (BatchNorm's, and InstanceNorm's that it tracks)."""
        return [b for m in running_norms(self.module).values() for b in m.buffers(recurse=False)]

    def _mark_statistics_measured(self, weights_key: tuple | None) -> None:
        """Record that the model's statistics, as they are now (a copy: they are small), were
        measured at the weights of `weights_key` (_weights_key; None: at no weights this TWA
        knows of). Compared by value: loading the same values back (a load of the export into
        the model) keeps them measured, as it should."""
        self._bn_key = None if weights_key is None else (weights_key, [b.detach().clone() for b in self._statistics()])

    def _statistics_measured_at(self) -> tuple | None:
        """The weights key the model's statistics were measured at, while they hold the
        values measured then; None once anything has changed them (a train-mode forward, a
        pass of another update_bn at other weights, a load of other values)."""
        if self._bn_key is None:
            return None
        now, then = self._statistics(), self._bn_key[1]
        if len(now) != len(then) or not all(a.shape == b.shape and torch.equal(b.to(device=a.device, dtype=a.dtype), a)
                                            for a, b in zip(now, then)):
            return None
        return self._bn_key[0]

    def _keep_gradient_averaged(self) -> None:
        """Replicated ranks average the coefficients' gradient through a hook on their
        Parameter; a Parameter that replaced it (load_state_dict(..., assign=True)) gets
        the hook too, or each rank would train on its own gradient."""
        if not self.coefficients.requires_grad:  # frozen (a snapshot): hooked when it trains again
            return
        if isinstance(self._parallel, sharding.Replicated) and not (
                self._averaged and self._averaged[0] is self.coefficients):
            self.coefficients.register_hook(sharding.gradient_averaging_hook(self._parallel, self.coefficients))
            self._averaged = [self.coefficients]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # a copy's tensors are new storages, so the key update_bn left names none of them:
        # whether it held for the subspace as copied is said here, and the copy's own set by it
        key = state.get("_bn_key")
        state["_bn_key_held"] = key is not None and key[0][2] == self._stamp(_WEIGHTS_FROM)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        held = state.pop("_bn_key_held", False)
        super().__setstate__(state)
        if held:  # the statistics were measured at the copy's weights, as at the original's
            (coefficients, dtype, _), statistics = self._bn_key
            self._bn_key = ((coefficients, dtype, self._stamp(_WEIGHTS_FROM)), statistics)
        elif state.get("_bn_key") is not None:
            self._bn_key = None
        if LAYOUT not in self._buffers:  # a TWA pickled before its state held the record
            frozen = [(name, self._buffers[f"frozen_{i}"].shape) for i, name in enumerate(self.frozen_names)]
            self.register_buffer(LAYOUT, layout_record(list(zip(self.names, self.shapes)), frozen).to(
                self.center.device))
            self._ddp_params_and_buffers_to_ignore = [*BASIS_BUFFERS, LAYOUT]
        self._mark_basis_loaded()
        if _refuse_state_with_changed_frozen not in self._state_dict_hooks.values():  # pickled by an earlier version
            self._register_state_dict_hook(_refuse_state_with_changed_frozen)
        # a copy's coefficients (copy.deepcopy, AveragedModel) carry no gradient hook: it gets
        # one here, or each rank's copy would train on its own gradient (a compiled forward
        # never reaches the eager path that registers it)
        self._averaged = []
        self._keep_gradient_averaged()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model at the averaged weights center + basis^T coefficients; the
        backward gives the coefficients their gradient."""
        if torch.jit.is_tracing():
            raise UsageError("torch.jit.trace cannot trace a TWA (its forward lends the weights to the model in "
                             "place): compile it with torch.compile(twa), or trace a plain model holding the "
                             "averaged weights (model.load_state_dict(twa.averaged_state_dict()))")
        if torch.compiler.is_compiling():
            if self.is_activation_checkpointing:
                # functional_call puts the model's own Parameters back when it returns: a graph
                # break inside a checkpointed block leaves that block to eager code, whose
                # recomputation in the backward then read them instead of the averaged weights
                # (coefficient gradients 20-80% off, without a word). Such a model runs eagerly,
                # with the weights lent until its backward.
                return self._lent_forward(args, kwargs)
            # an embedding's sparse gradient cannot pass back through the weights' views in a
            # compiled graph ("reshape is not implemented for sparse tensors"), and it would be
            # densified to be projected anyway: such layers are traced with dense gradients, and
            # keep their own setting outside the call
            sparse = [m for m in self.module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
            for m in sparse:
                m.sparse = False
            try:
                return functional_call(self.module, self.weights(), args, kwargs)
            finally:
                for m in sparse:
                    m.sparse = True
        if _transform_active() or fwAD.unpack_dual(self.coefficients).tangent is not None:
            # under a torch.func transform (grad, vmap, jvp) or forward-mode AD: neither
            # transforms the autograd.Functions that lend the weights, nor functorch a custom
            # op's registered autograd, so the weights are computed in plain torch ops
            return functional_call(self.module, self._transformable_weights(), args, kwargs)
        return self._run_lent(self.module, args, kwargs)

    # torch.compiler.disable, importing dynamo (1.7 s) at the first call instead of at `import twa_kernels`
    @torch._disable_dynamo
    def _lent_forward(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        return self._run_lent(self.module, args, kwargs)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call `fn(*args, **kwargs)` while the wrapped model holds the averaged weights, as
        forward does for the model's own forward: for a loss computed by another method of the
        model (a LightningModule's `training_step`, `model.compute_loss(batch)`). What `fn`
        computes from the model is differentiable in the coefficients, and the backward of
        what it returns gives them their gradient, as after forward. `fn` must not keep a
        reference to the weights past its return. Not for use inside a torch.compile'd
        function: compile the TWA's forward instead."""
        if torch.compiler.is_compiling():
            raise UsageError("TWA.run() cannot be compiled: it lends the weights to the model in place; compile the "
                             "TWA itself (torch.compile(twa)) and call its forward")
        if not callable(fn):
            raise InvalidArgumentError(f"TWA.run() calls fn with the averaged weights in the model; got a "
                                       f"{type(fn).__name__}, which is not callable")
        return self._run_lent(fn, args, kwargs)

    def _run_lent(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """fn(*args, **kwargs) with the weights lent to the model (see the module docstring)."""
        with self._lent.claimed():
            return self._run_lent_claimed(fn, args, kwargs)

    def _run_lent_claimed(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        self._check_basis_unchanged()
        self._keep_gradient_averaged()
        if self._parallel is None and torch.is_grad_enabled() and not self._alone_checked:
            self._alone_checked = True  # once, at the first forward that trains
            if sharding.training_alone():
                warn_at_caller(f"this process is one of {torch.distributed.get_world_size()} in a torch.distributed "
                               "job, but the TWA has no process_group and is not inside DistributedDataParallel: "
                               "each rank trains coefficients of its own. Build the TWA after init_process_group "
                               "with process_group=dist.group.WORLD (before it, that name is None), or wrap it in "
                               "DDP; ignore this warning if each rank is meant to train alone", UserWarning)
        # inside a DDP forward, whether DDP averages the coefficients (once per forward: it walks DDP's parameters)
        ddp_averages = self._parallel is None and sharding.averaged_by_ddp(self.coefficients)
        if (self._parallel is None and not ddp_averages and torch.is_grad_enabled()
                and self.coefficients.requires_grad and sharding.in_ddp_forward()):
            raise UsageError("this TWA runs inside a DistributedDataParallel forward, but its coefficients are not "
                             "among the Parameters DDP was built over, so each rank would train its own (replaced "
                             "after DDP was built, by load_state_dict(..., assign=True)?). Load without assign=True, "
                             "or wrap the TWA in DDP after loading; a TWA that trains alone inside another model's "
                             "DDP forward takes process_group=")
        if (self._parallel is not None and not self.__dict__.get("_told_averaged_twice")
                and sharding.averaged_by_ddp(self.coefficients)):
            self._told_averaged_twice = True  # once: the numbers are right, the traffic doubled
            warn_at_caller("this TWA averages its coefficients' gradient over its process_group itself, and the "
                           "DistributedDataParallel it runs in averages them again: each backward all-reduces "
                           "them twice (with the same result), and the TWA's own all-reduce ignores ddp.no_sync(). "
                           "Build the TWA without process_group= to let DDP average them, or leave DDP out",
                           UserWarning)
        lent = self._lent
        dtypes = self._parameter_dtypes()
        key = self._weights_key(dtypes) if lent.pending or torch.is_grad_enabled() else None
        if lent.pending:
            lent.expire_other_than(key)
        (weights, release), pinned = self._forward_weights(dtypes), self._pinned()
        if not any(w.requires_grad for w in weights):
            try:
                with lent.lending(weights + pinned), self._keeping_frozen("during the forward"):
                    out = fn(*args, **kwargs)
            except BaseException:
                if release is not None:
                    release()
                raise
            if release is not None:  # the coefficients take no gradient; the model's inputs may
                release_with_graph(out, release)
            return out
        # a graph freed without a backward (an evaluation that forgot torch.no_grad()) frees
        # the workspace with its loan; otherwise every such forward took a fresh D-long buffer
        loan = lent.open(key, [w.detach().requires_grad_() for w in weights] + pinned, self._project_late, release)
        token, *weights = LoanAnchor.apply(loan, *weights)
        with lent.lending(weights + pinned, loan):
            try:
                with self._keeping_frozen("during the forward"):
                    out = fn(*args, **kwargs)
            except RuntimeError as exc:
                _name_an_in_place_change(exc)
                raise
            # inside DDP the output is tied to the anchor, so that what a reentrant recomputation
            # leaves reaches the coefficients through autograd, before DDP averages them
            if ddp_averages:
                return lent.tie(out, loan, token)
            lent.hold_with(out, loan)
        return out

    @contextmanager
    def averaged_model(self) -> Iterator[nn.Module]:
        """The wrapped model holding the averaged weights, for the length of the block: for
        calls that go to the model itself instead of through this module's forward, such as
        transformers' `generate()`. Outside the block (and outside a forward) the model holds
        its own parameters, the values it was built with. The weights are computed once on
        entry, detached: nothing inside the block gives the coefficients a gradient.

            with twa.averaged_model() as model:
                tokens = model.generate(prompt, max_new_tokens=20)

        What the block does to the model lasts for the block: a cast (`model.to(torch.bfloat16)`)
        or a move is undone on exit, for its parameters and buffers alike. A frozen parameter
        changed in place there (merging adapters into it) raises UsageError on exit, since the
        TWA holds its one copy, and the TWA refuses its outputs from then on. The
        block's weights are plain tensors, not Parameters, and leave with the block: to keep
        the average as a model of its own (to copy, torch.export, torch.compile or script it),
        load `averaged_state_dict()` into a fresh one rather than using this one (a model
        compiled inside the block runs at the model's own weights after it).
        """
        # The model is claimed to put the weights in and to take them out again, and the block
        # recorded as this thread's, which refuses other threads' forwards until it ends (they
        # would change the block's weights) and has other threads' blocks wait; not claimed for
        # the block itself, which may end on another thread than it began on
        lent_weights, held, thread = self._lent, ExitStack(), threading.current_thread()
        with lent_weights.claimed(block=True):
            with torch.no_grad():
                weights = self.weights()
            lent = [weights[name] for name in self.names + self.frozen_names]
            with held:  # (left at once if one of them fails)
                held.enter_context(keeping_buffers(self.module))
                held.enter_context(lent_weights.lending(lent))
                held.enter_context(self._keeping_frozen("inside averaged_model()", every=True))
                held = held.pop_all()
            lent_weights.blocks.append(thread)
        try:
            yield self.module
        except BaseException:
            with lent_weights.forward_lock:
                lent_weights.end_block(thread)
                if not held.__exit__(*sys.exc_info()):
                    raise
        else:
            with lent_weights.forward_lock:
                lent_weights.end_block(thread)
                held.__exit__(None, None, None)

    def _project_late(self, grads: Sequence[Tensor | None]) -> None:
        """Add to coefficients.grad the projection of gradients that a reentrant
        recomputation left on the lent weights after the graph's own projection ran."""
        if self._sharded:
            raise UsageError("a reentrant activation-checkpointing recomputation gave weight gradients that the "
                             "sharded TWA's own backward did not reduce across ranks; use torch.utils.checkpoint "
                             "with use_reentrant=False (gradient_checkpointing_kwargs={'use_reentrant': False})")
        with torch.no_grad():
            flat = self.center.new_zeros(self.center.numel())
            for segment, grad in zip(flat.split([math.prod(s) for s in self.shapes]), grads):
                if grad is not None:
                    segment.copy_((grad.to_dense() if grad.layout != torch.strided else grad).reshape(-1))
            late = (project_int8 if self.int8_gradients else project)(self.basis, flat).to(self.coefficients.dtype)
            if self._parallel is not None:  # replicated: averaged over the ranks like the graph's own gradient
                late = self._parallel.average_gradient(late, self.coefficients)
            if self.coefficients.grad is None:
                self.coefficients.grad = late
            else:
                self.coefficients.grad += late

    @torch.no_grad()
    def averaged_state_dict(self) -> dict[str, Tensor]:
        """The model's state_dict with the averaged weights, in the model's dtypes: load it
        into a plain model. Every name of a tied weight gets the averaged value. A model
        with BatchNorm statistics gets a warning unless update_bn ran at these weights: the
        statistics in the result are the model's own, measured at other weights. So does a
        forward's graph that has not run its backward: the model holds that forward's weights
        until it does, and gets its own back then, undoing a load into it in between."""
        if not self._lent.depth:  # the export of a model that changed since the build would be wrong
            self._lent.check_structure()
            self._lent.check_parameters_held()
        if self._parallel is not None:  # coefficients that ranks trained apart would be exported as one
            self._parallel.comm.check_agreement()
        if has_running_statistics(self.module):
            measured_at = self._statistics_measured_at()
            if measured_at is None or not same_key(measured_at, self._weights_key()):
                call = "tk.distributed.update_bn(loader, twa)" if self._parallel is not None else "twa.update_bn(loader)"
                warn_at_caller("averaged_state_dict(): the model's BatchNorm statistics were not measured at these "
                               f"averaged weights; call {call} first, or the exported model normalises with "
                               "statistics of other weights", RuntimeWarning)
        if self._lent.pending and not self._lent.depth:
            # a graph kept from a step interrupted between forward and backward (a notebook keeps
            # its traceback), or losses kept with their graphs: the model holds that forward's
            # weights until the graph runs backward or is freed, and then gets its own back
            warn_at_caller("averaged_state_dict(): a forward's graph has not run its backward yet, so until it does "
                           "(or is freed) the model holds that forward's weights, and a model.load_state_dict() of "
                           "this state now would be undone then; run the backward, or free the graph (del the loss "
                           "and outputs; after an interrupted step in IPython or Jupyter, the kept traceback holds "
                           "it: `import sys; sys.last_traceback = None`) before loading it", RuntimeWarning)
        # a module's extra state (get_extra_state) may be any object: copied as it is
        state = {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                 for k, v in self.module.state_dict().items()}
        weights = self.weights()
        broken = next((name for name, value in weights.items()
                       if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)
        if broken is not None:  # a diverged run: its export would load NaN into a working model
            raise InvalidArgumentError(f"averaged_state_dict(): the averaged weight {broken!r} holds NaN or Inf (the "
                                       "coefficients diverged, or grew past the weights' range); train again with a "
                                       "lower lr, or load_state_dict a TWA state saved before it diverged")
        for name, value in weights.items():
            for key in self.aliases.get(name, [name]):
                if key in state:
                    state[key] = value.detach().to(state[key].dtype).clone()
        return state

    @torch.no_grad()
    def update_bn(self, loader: Iterable, call_fn: Callable[[nn.Module, Any], Any] | None = None, *,
                  allow_empty: bool = False, frozen_norms: Iterable[str] = ()) -> int:
        """Recompute BatchNorm statistics at the averaged weights, as
        torch.optim.swa_utils.update_bn does: reset them, then one pass in train mode with
        cumulative averaging. A batch that is a tuple or list feeds its first element, a
        mapping its items as keyword arguments, unless call_fn(model, batch) is given: it gets
        the wrapped model holding the averaged weights, so any of its methods may run the
        batch (see twa_kernels.batchnorm.update_bn, also for frozen_norms, the BatchNorm layers
        that keep their statistics, and allow_empty, which distributed.update_bn passes for a
        rank whose share is empty). Returns the number of batches the pass fed the model.

        A TWA built with a process_group is refused: each rank would measure its own batches
        alone. tk.distributed.update_bn(loader, twa) measures them over every rank's."""
        if self._parallel is not None:
            raise UsageError("this TWA trains across processes (built with process_group=...), so its BatchNorm "
                             "statistics must be measured over every rank's batches, not this rank's alone: call "
                             "tk.distributed.update_bn(loader, twa) on every rank, each with its own share of the "
                             "data")
        return self._update_bn_here(loader, call_fn, allow_empty=allow_empty, frozen_norms=frozen_norms)

    @torch.no_grad()
    def _update_bn_here(self, loader: Iterable, call_fn: Callable[[nn.Module, Any], Any] | None = None, *,
                        allow_empty: bool = False, frozen_norms: Iterable[str] = ()) -> int:
        """update_bn's pass over this process's batches (distributed.update_bn's local part)."""
        before = self._statistics_measured_at()
        try:
            with self.averaged_model() as model:
                fed = update_bn(loader, model, call_fn, allow_empty=allow_empty, frozen_norms=frozen_norms)
        except BaseException:  # update_bn put the statistics back as they were: so is where they were measured
            self._mark_statistics_measured(before)
            raise
        self._mark_statistics_measured(self._weights_key())
        return fed




_PEEK_TRANSFORMS = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)


def _transform_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp) is running this call."""
    return _PEEK_TRANSFORMS is not None and _PEEK_TRANSFORMS() is not None


def _name_an_in_place_change(exc: RuntimeError) -> None:
    """Raise UsageError from autograd's refusal of an in-place change to a lent weight (a
    view of the one reconstructed buffer), which names neither the weight nor a fix."""
    if "is a view" in str(exc) and "modified inplace" in str(exc):
        raise UsageError("the model changed one of its weights in place during the forward "
                         "(nn.Embedding(max_norm=...) renormalises its rows in place; a hook or forward may clamp_ "
                         "or copy_ into a weight): "
                         "under TWA the weights are the average center + basis^T coefficients, computed anew at "
                         "every forward, so an in-place change has nothing to keep it; remove it (for Embedding, "
                         "max_norm=None) or apply it out of place") from exc
