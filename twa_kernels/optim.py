"""SubspaceOptimizer: projected-gradient training inside a subspace (the ICLR version, P-SGD).

    sub = tk.Subspace.from_checkpoints(ckpts, bits=None, granularity="model", orthonormalize=True,
                                       parameter_names=[n for n, _ in model.named_parameters()])
    model.load_state_dict(sub.unflatten(sub.center), strict=False)   # start at the SWA point
    opt = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=1, momentum=0.9), sub)

Before every step the gradient g of the model's parameters is replaced by P^T P g, its
projection onto the span of the orthonormal basis P, computed by the fused project and
reconstruct ops; the base optimizer then steps as usual, so the weights stay in
center + span(P).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from twa_kernels.errors import InvalidArgumentError
from twa_kernels.ops import project, reconstruct
from twa_kernels.subspace import Subspace


class SubspaceOptimizer:
    """Wraps `base_optimizer`; its parameters, in order, must be the subspace's weights."""

    def __init__(self, base_optimizer: torch.optim.Optimizer, subspace: Subspace):
        if not subspace.orthonormal:
            raise InvalidArgumentError("SubspaceOptimizer needs an orthonormal basis: build the subspace with "
                             "orthonormalize=True (and granularity='model')")
        if subspace.basis.bits is not None:
            warnings.warn(f"SubspaceOptimizer: the basis is packed in {subspace.basis.bits} bits, so its rows are "
                          "orthonormal only up to their quantisation and P^T P g is not quite a projection (the "
                          "weights stay in the packed rows' span, but each step's component there is off by the "
                          "rounding); build the subspace with bits=None for the exact projection", UserWarning,
                          stacklevel=2)
        params = [p for group in base_optimizer.param_groups for p in group["params"]]
        shapes = [tuple(p.shape) for p in params]
        if shapes != subspace.shapes:
            raise InvalidArgumentError(f"the optimizer's {len(shapes)} parameters do not match the subspace's "
                             f"{len(subspace.shapes)} weights; pass model.parameters() of the model the "
                             "checkpoints came from, in the same order")
        self.base_optimizer, self.subspace, self._params = base_optimizer, subspace, params

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's parameter groups (learning-rate schedulers adjust these)."""
        return self.base_optimizer.param_groups

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Replace each parameter's gradient by its part inside the subspace."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        basis = self.subspace.basis
        projected = reconstruct(basis, project(basis, flat))
        for p, piece in zip(self._params, self.subspace.unflatten(projected).values()):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(piece)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Project the gradients into the subspace, then take the wrapped optimizer's step.
        With a closure, it is called (under grad) first and its loss returned."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self.project_gradients()
            self.base_optimizer.step()
            return loss
        self.project_gradients()
        return self.base_optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's zero_grad."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The wrapped optimizer's state (the subspace holds no state of its own)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Load the wrapped optimizer's state, as saved by `state_dict`."""
        self.base_optimizer.load_state_dict(state)
