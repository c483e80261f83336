"""TWA: the averaging coefficients of a subspace as trainable parameters (journal version).

    twa = tk.TWA(model, checkpoints, bits=4, granularity="tensor")
    opt = torch.optim.AdamW(twa.parameters(), lr=1e-3)     # only the coefficients
    loss = F.cross_entropy(twa(x), y); loss.backward(); opt.step()
    twa.update_bn(loader); model.load_state_dict(twa.averaged_state_dict())

The weights are w = center + sum_r x[r, block] * basis[r], rebuilt every forward by the
fused `reconstruct` op (its backward is the fused `project`), and the model runs with them
through torch.func.functional_call. The coefficients start at zero: w = center, the
uniform average of the checkpoints' parameters (SWA), exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from twa_kernels.io import Checkpoints
from twa_kernels.ops import reconstruct
from twa_kernels.quant import QuantizedBasis
from twa_kernels.subspace import Subspace


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
    ):
        super().__init__()
        names = [name for name, _ in model.named_parameters()]
        if isinstance(checkpoints_or_subspace, Subspace):
            subspace = checkpoints_or_subspace
        else:
            subspace = Subspace.from_checkpoints(
                checkpoints_or_subspace, bits=bits, granularity=granularity, group_size=group_size,
                parameter_names=names, parameter_shapes=[tuple(p.shape) for p in model.parameters()],
                progress=progress)
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        for name, shape in zip(subspace.names, subspace.shapes):
            if shapes.get(name) != shape:
                raise ValueError(f"the subspace's {name!r} has shape {shape} but the model's is {shapes.get(name)}")
        self._model = [model]  # a list keeps it out of the module tree
        self.names, self.shapes = subspace.names, subspace.shapes
        self.bits, self.group_size = subspace.basis.bits, subspace.basis.group_size
        self.coefficients = nn.Parameter(torch.zeros(subspace.basis.k, subspace.basis.num_blocks))
        self.register_buffer("center", subspace.center)
        for key, value in subspace.basis.state_dict().items():
            self.register_buffer(f"basis_{key}", value)

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
        return Subspace(self.names, self.shapes, self.center, self.basis)

    # The model is held outside the module tree; device moves and train/eval reach it here.
    def _apply(self, fn, recurse=True):
        self.module._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> TWA:
        self.module.train(mode)
        return super().train(mode)

    def weights(self) -> dict[str, Tensor]:
        """The averaged weights w = center + basis^T x, by parameter name (differentiable)."""
        flat = reconstruct(self.basis, self.coefficients, self.center)
        return self.subspace.unflatten(flat)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.module, self.weights(), args, kwargs)

    @torch.no_grad()
    def averaged_state_dict(self) -> dict[str, Tensor]:
        """The model's state_dict with the averaged weights: load it into a plain model."""
        state = {k: v.clone() for k, v in self.module.state_dict().items()}
        for name, value in self.weights().items():
            state[name] = value.detach().clone().to(state[name].dtype)
        return state

    @torch.no_grad()
    def update_bn(self, loader: Iterable, call_fn: Callable[[nn.Module, Any], Any] | None = None) -> None:
        """Recompute BatchNorm statistics at the averaged weights, as
        torch.optim.swa_utils.update_bn does: reset them, then one pass in train mode with
        cumulative averaging. A batch that is a tuple or list feeds its first element,
        unless call_fn(model, batch) is given."""
        norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        momenta = {m: m.momentum for m in norms}
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        was_training = self.module.training
        self.module.train()
        weights = {k: v.detach() for k, v in self.weights().items()}
        # run through functional_call so that the averaged weights are used
        proxy = _WithWeights(self.module, weights)
        try:
            for batch in loader:
                if call_fn is not None:
                    call_fn(proxy, batch)
                else:
                    proxy(batch[0] if isinstance(batch, (list, tuple)) else batch)
        finally:
            for m in norms:
                m.momentum = momenta[m]
            self.module.train(was_training)


class _WithWeights(nn.Module):
    """`module` called with fixed replacement weights."""

    def __init__(self, module: nn.Module, weights: dict[str, Tensor]):
        super().__init__()
        self._inner, self._weights = [module], weights

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._inner[0], self._weights, args, kwargs)
