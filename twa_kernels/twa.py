"""TWA: the averaging coefficients of a subspace as trainable parameters (journal version).

    twa = tk.TWA(model, checkpoints, bits=4, granularity="tensor")
    opt = torch.optim.AdamW(twa.parameters(), lr=1e-3)     # only the coefficients
    loss = F.cross_entropy(twa(x), y); loss.backward(); opt.step()
    twa.update_bn(loader); model.load_state_dict(twa.averaged_state_dict())

The weights are w = center + sum_r x[r, block] * basis[r], rebuilt every forward by the
fused `reconstruct` op (its backward is the fused `project`), and the model runs with them
through torch.func.functional_call. The coefficients start at zero: w = center, the
uniform average of the checkpoints' parameters (SWA), exactly.

The center, the basis and the coefficients stay float32 whatever the model's dtype; the
forward writes the weights in the model's dtype (bfloat16 models get bfloat16 weights from
the kernel itself, no extra pass) into a workspace the module reuses, so a training step
allocates no D-long buffer. Tied weights (one tensor under several names) are one row
segment of the basis, and every name gets the averaged value in averaged_state_dict().
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from twa_kernels.errors import InvalidArgumentError
from twa_kernels import distributed
from twa_kernels._memory import empty_huge
from twa_kernels.averaging import update_bn
from twa_kernels.io import Checkpoints, parameter_aliases, unwrap_model
from twa_kernels.ops import reconstruct, reconstruct_into, reconstruct_pieces
from twa_kernels.quant import QuantizedBasis
from twa_kernels.subspace import Subspace, check_build_args

# dtypes the kernels write directly; other model dtypes (float16) get float32 weights cast once
_KERNEL_OUTPUT_DTYPES = (torch.float32, torch.bfloat16)


class TWA(nn.Module):
    """Trainable Weight Averaging over `checkpoints_or_subspace` for `model`.

    `model` supplies the architecture and the buffers (BatchNorm statistics); it is held,
    not registered, so `twa.parameters()` are the coefficients alone and the model's own
    weights are never touched until you load `averaged_state_dict()` into it. The state
    (coefficients, basis, center) is in `state_dict()`, loadable with weights_only=True.
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoints_or_subspace: Checkpoints | Subspace,
        bits: int | None = 4,
        granularity: str | int = "tensor",
        group_size: int = 128,
        progress: bool = False,
        process_group: Any = None,
        shard: bool = False,
    ):
        super().__init__()
        check_build_args(bits, group_size, granularity)
        if shard and process_group is None:
            raise InvalidArgumentError("shard=True splits the basis across a process group: pass process_group= too")
        model = unwrap_model(model)  # a compiled or DDP-wrapped model: its checkpoints name the inner module's weights
        names = [name for name, _ in model.named_parameters()]
        aliases = parameter_aliases(model)
        if isinstance(checkpoints_or_subspace, Subspace):
            subspace = checkpoints_or_subspace
        elif shard:  # each rank reads its own columns of the checkpoints only
            subspace = distributed.build_shard(
                checkpoints_or_subspace, process_group, names, [tuple(p.shape) for p in model.parameters()],
                bits=bits, granularity=granularity, group_size=group_size, aliases=aliases, progress=progress)
        else:
            def build() -> Subspace:
                return Subspace.from_checkpoints(
                    checkpoints_or_subspace, bits=bits, granularity=granularity, group_size=group_size,
                    parameter_names=names, parameter_shapes=[tuple(p.shape) for p in model.parameters()],
                    progress=progress, parameter_aliases=aliases)
            # under a process group, a rank that fails here takes every rank down with its error
            subspace = build() if process_group is None else distributed.agree(build, process_group,
                                                                                 "building its subspace")
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        for name, shape in zip(subspace.names, subspace.shapes):
            if shapes.get(name) != shape:
                raise InvalidArgumentError(f"the subspace's {name!r} has shape {shape} but the model's is {shapes.get(name)}")
        self._model = [model]  # a list keeps it out of the module tree
        self.names, self.shapes = subspace.names, subspace.shapes
        self.aliases = {n: a for n, a in aliases.items() if len(a) > 1}
        self.bits, self.group_size = subspace.basis.bits, subspace.basis.group_size
        self.coefficients = nn.Parameter(torch.zeros(subspace.basis.k, subspace.basis.num_blocks))
        self.register_buffer("center", subspace.center.float())
        for key, value in subspace.basis.state_dict().items():
            self.register_buffer(f"basis_{key}", value)
        self._workspace = _Workspace()
        # DDP over a TWA must never broadcast the basis (identical, or sharded, on every rank)
        self._ddp_params_and_buffers_to_ignore = list(distributed.BASIS_BUFFERS)
        self._dist = None if process_group is None else distributed.attach(self, process_group, shard, subspace)
        if self._dist is None or not self._dist.shard:
            # allocated (and its pages touched) now, so the first training step does not pay for it
            self._workspace.prepare(self.center.numel(), self._forward_dtype(), self.center.device)
        self._register_load_state_dict_pre_hook(_check_loaded_state, with_module=True)

    @property
    def module(self) -> nn.Module:
        """The wrapped model."""
        return self._model[0]

    @property
    def basis(self) -> QuantizedBasis:
        return QuantizedBasis(self.basis_codes, self.basis_scales, self.basis_mins, self.basis_block_offsets,
                              self.bits, self.group_size, self.center.numel())

    @property
    def subspace(self) -> Subspace:
        return Subspace(self.names, self.shapes, self.center, self.basis, aliases=self.aliases)

    # The model is held outside the module tree; device moves and train/eval reach it here.
    # A dtype cast (twa.to(torch.bfloat16), twa.half()) reaches the model only: the center,
    # the basis metadata and the coefficients stay float32, as the kernels need.
    def _apply(self, fn, recurse=True):
        self.module._apply(fn, recurse)
        super()._apply(fn, recurse)
        for name in ("center", "basis_scales", "basis_mins"):
            if getattr(self, name).dtype != torch.float32:
                setattr(self, name, getattr(self, name).float())
        if self.bits is None and self.basis_codes.dtype != torch.float32:
            self.basis_codes = self.basis_codes.float()
        if self.coefficients.dtype != torch.float32:
            self.coefficients.data = self.coefficients.data.float()
        self._workspace = _Workspace()
        if getattr(self, "_dist", None) is None or not self._dist.shard:
            self._workspace.prepare(self.center.numel(), self._forward_dtype(), self.center.device)
        return self

    def train(self, mode: bool = True) -> TWA:
        self.module.train(mode)
        return super().train(mode)

    def _parameter_dtypes(self) -> dict[str, torch.dtype]:
        params = dict(self.module.named_parameters())
        return {name: params[name].dtype for name in self.names}

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

    def weights(self) -> dict[str, Tensor]:
        """The averaged weights w = center + basis^T x by parameter name, each in its
        parameter's dtype (differentiable; fresh tensors, safe to keep)."""
        if self._dist is not None and self._dist.shard:  # this rank holds some columns: gather
            flat = self._dist.reconstruct(self)
        else:
            flat = reconstruct(self.basis, self.coefficients, self.center)
        return self._typed(flat, self._parameter_dtypes())

    def _forward_weights(self) -> dict[str, Tensor]:
        """weights(), written into the reused workspace: only forward() hands these to the
        model, which keeps them no longer than its graph."""
        if torch.compiler.is_compiling() or (self._dist is not None and self._dist.shard):
            return self.weights()
        dtypes = self._parameter_dtypes()
        dtype = self._forward_dtype(dtypes)
        record = torch.is_grad_enabled() and self.coefficients.requires_grad
        workspace = self._workspace
        out, release = workspace.take(self.center.numel(), dtype, self.center.device, record)
        if not record:
            flat = reconstruct_into(self.basis, self.coefficients, self.center, out)
            release()
            return self._typed(flat, dtypes)
        # one view of the workspace per tensor; the backward projects their gradients where
        # autograd leaves them (no D-long gradient is gathered), then frees the workspace
        sizes = [math.prod(shape) for shape in self.shapes]
        pieces = reconstruct_pieces(self.basis, self.coefficients, self.center, out, sizes, release)
        return {name: piece.view(shape) if piece.dtype == dtypes[name] else piece.view(shape).to(dtypes[name])
                for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.module, self._forward_weights(), args, kwargs)

    @torch.no_grad()
    def averaged_state_dict(self) -> dict[str, Tensor]:
        """The model's state_dict with the averaged weights, in the model's dtypes: load it
        into a plain model. Every name of a tied weight gets the averaged value."""
        state = {k: v.clone() for k, v in self.module.state_dict().items()}
        for name, value in self.weights().items():
            for key in self.aliases.get(name, [name]):
                if key in state:
                    state[key] = value.detach().to(state[key].dtype).clone()
        return state

    @torch.no_grad()
    def update_bn(self, loader: Iterable, call_fn: Callable[[nn.Module, Any], Any] | None = None) -> None:
        """Recompute BatchNorm statistics at the averaged weights, as
        torch.optim.swa_utils.update_bn does: reset them, then one pass in train mode with
        cumulative averaging. A batch that is a tuple or list feeds its first element,
        unless call_fn(model, batch) is given (see twa_kernels.averaging.update_bn)."""
        update_bn(loader, self.module, call_fn, weights={k: v.detach() for k, v in self.weights().items()})


class _Workspace:
    """The reused buffer of TWA's forward, the weights it writes. It is handed out again
    only after the backward of the forward that filled it has run (or at once when no
    graph was recorded); while a graph still needs it, the next forward gets a fresh
    buffer, which then becomes the workspace. So a second forward before the first backward
    works, and a backward through a retained graph after an overwrite raises PyTorch's
    in-place error (the write bumps the version counter) instead of using wrong weights."""

    def __init__(self):
        self.buffer: Tensor | None = None
        self.busy = False
        self.generation = 0

    def take(self, numel: int, dtype: torch.dtype, device: torch.device,
             record: bool) -> tuple[Tensor, Callable[[], None]]:
        """(buffer, release): the weights' buffer, and the call that frees it for reuse."""
        buffer = self.buffer
        if buffer is None or self.busy or buffer.dtype != dtype or buffer.device != device or buffer.numel() != numel:
            # huge pages asked for first, then touched here by a parallel fill, once, not
            # by the kernel's first write (page faults made a fresh output cost 2-3x)
            self.buffer = buffer = empty_huge((numel,), dtype, device).zero_()
            self.generation += 1
        self.busy = record
        generation = self.generation
        return buffer, lambda: self._release(generation)

    def prepare(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate the weights' buffer ahead of the first forward."""
        self.take(numel, dtype, device, record=False)

    def _release(self, generation: int) -> None:
        if generation == self.generation:  # a late backward of a replaced buffer frees nothing
            self.busy = False


def _check_loaded_state(module: TWA, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Before load_state_dict copies anything: the incoming basis must be valid (the kernels
    take raw pointers) and match this module's layout, and the center and coefficients must be
    finite. Raises a ValueError naming the field, and leaves the module untouched."""
    fields = {key[len(prefix) + len("basis_"):]: value for key, value in state.items()
              if key.startswith(prefix + "basis_")}
    if fields:
        try:
            loaded = QuantizedBasis.from_state_dict(fields)
        except (KeyError, ValueError) as exc:
            raise InvalidArgumentError(f"TWA state_dict: the basis is invalid: {exc}") from exc
        if (loaded.bits, loaded.group_size, loaded.num_cols) != (module.bits, module.group_size,
                                                                  module.center.numel()):
            raise InvalidArgumentError(f"TWA state_dict: its basis has bits={loaded.bits}, group_size={loaded.group_size}, "
                             f"{loaded.num_cols} columns, but this TWA has bits={module.bits}, group_size="
                             f"{module.group_size}, {module.center.numel()} columns; build the TWA the same way")
    for name in ("center", "coefficients"):
        value, own = state.get(prefix + name), getattr(module, name)
        if isinstance(value, Tensor) and value.shape != own.shape:
            raise InvalidArgumentError(f"TWA state_dict: {name!r} has shape {tuple(value.shape)} but this TWA's is "
                                       f"{tuple(own.shape)}; it was saved from a TWA built with other checkpoints, "
                                       "bits or granularity: build this one the same way")
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InvalidArgumentError(f"TWA state_dict: {name!r} holds NaN or Inf; load an earlier, finite state")
