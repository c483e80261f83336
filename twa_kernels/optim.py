"""SubspaceOptimizer: projected-gradient training inside a subspace (the ICLR version, P-SGD).

    sub = tk.Subspace.from_checkpoints(ckpts, bits=None, granularity="model", orthonormalize=True,
                                       parameter_names=[n for n, _ in model.named_parameters()])
    model.load_state_dict(sub.unflatten(sub.center), strict=False)   # start at the SWA point
    opt = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=1, momentum=0.9), sub)

Before every step the gradient g of the model's parameters is replaced by P^T P g, its
projection onto the span of the orthonormal basis P, computed by the fused project and
reconstruct ops; the base optimizer then steps as usual. SGD (with or without momentum,
without weight decay) steps along a linear function of those projected gradients, so its
step is already inside the span. Any other step (Adam's per-entry scaling, weight decay)
is projected too: the weights move by P^T P of the step the base optimizer took. Either
way the weights stay in center + span(P).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from twa_kernels.errors import InvalidArgumentError
from twa_kernels.ops import project, reconstruct
from twa_kernels.subspace import Subspace

# Relative distance from center + span(P) above which the starting weights are reported:
# float32 rounding of an in-span point leaves ~1e-7, a point off the subspace leaves ~1.
_OFF_SUBSPACE = 1e-4


def _steps_inside_span(optimizer: torch.optim.Optimizer) -> bool:
    """True when each step is linear in the gradients it has seen, so projecting them suffices."""
    return type(optimizer) is torch.optim.SGD and all(
        float(group.get("weight_decay", 0) or 0) == 0 for group in optimizer.param_groups)


class SubspaceOptimizer(torch.optim.Optimizer):
    """Wraps `base_optimizer`; its parameters, in order, must be the subspace's weights.

    It is a torch Optimizer whose `param_groups` and `state` are the wrapped one's, read
    through at every access (also after either's load_state_dict), so learning-rate
    schedulers and Lightning's `configure_optimizers` take it as they are.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, subspace: Subspace):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise InvalidArgumentError(f"SubspaceOptimizer wraps a torch.optim.Optimizer, got "
                                       f"{type(base_optimizer).__name__}")
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
        frozen = [name for name, p in zip(subspace.names, params) if not p.requires_grad]
        if frozen:
            raise InvalidArgumentError(f"{len(frozen)} of the optimizer's parameters do not require grad "
                                       f"(first: {frozen[0]!r}), but the subspace spans them, so its steps would "
                                       "move them; build the subspace from the trainable parameters only")
        # Optimizer.__init__ sets up the hooks and the step patching that schedulers and
        # profilers rely on; the groups and state it makes are dropped for the wrapped
        # optimizer's own (the properties below)
        super().__init__(params, dict(base_optimizer.defaults))
        del self.__dict__["_own_param_groups"], self.__dict__["_own_state"]
        self.base_optimizer, self.subspace, self._params = base_optimizer, subspace, params
        if subspace.basis.bits is None:
            self._warn_if_off_subspace()

    # The groups and state are read from the wrapped optimizer at every access, not held:
    # its load_state_dict (a resume) replaces both objects, and a scheduler writing into a
    # copy held here would no longer reach the optimizer that steps.
    @property
    def param_groups(self) -> list[dict]:
        base = self.__dict__.get("base_optimizer")
        return base.param_groups if base is not None else self.__dict__["_own_param_groups"]

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        if "base_optimizer" in self.__dict__:
            self.base_optimizer.param_groups = groups
        else:  # Optimizer.__init__'s own list, dropped once it returns
            self.__dict__["_own_param_groups"] = groups

    @property
    def state(self) -> dict:
        base = self.__dict__.get("base_optimizer")
        return base.state if base is not None else self.__dict__["_own_state"]

    @state.setter
    def state(self, state: dict) -> None:
        if "base_optimizer" in self.__dict__:
            self.base_optimizer.state = state
        else:
            self.__dict__["_own_state"] = state

    def __getstate__(self) -> dict:
        return self.__dict__.copy()  # Optimizer's own keeps only defaults, state and groups

    def _flat_weights(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in self._params])

    def _in_span(self, flat: Tensor) -> Tensor:
        basis = self.subspace.basis
        return reconstruct(basis, project(basis, flat))

    @torch.no_grad()
    def _warn_if_off_subspace(self) -> None:
        offset = self._flat_weights() - self.subspace.center.to(torch.float32)
        size = float(offset.norm())
        if size == 0:
            return
        outside = float((offset - self._in_span(offset)).norm()) / size
        if outside > _OFF_SUBSPACE:
            warnings.warn(f"SubspaceOptimizer: {outside:.2g} of the model's distance from the subspace's center "
                          "lies outside the subspace, so its steps move parallel to it without reaching it; load "
                          "the center first: model.load_state_dict(sub.unflatten(sub.center), strict=False)",
                          UserWarning, stacklevel=3)

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Replace each parameter's gradient by its part inside the subspace."""
        for name, p in zip(self.subspace.names, self._params):
            if p.grad is not None and p.grad.is_sparse:
                raise InvalidArgumentError(f"parameter {name!r} has a sparse gradient, which SubspaceOptimizer "
                                           "cannot project; use a dense gradient (sparse=False on the embedding)")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        for p, piece in zip(self._params, self.subspace.unflatten(self._in_span(flat)).values()):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(piece)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Project the gradients into the subspace, take the wrapped optimizer's step, and
        project that step when the optimizer is not plain SGD. A closure is handed to the
        wrapped optimizer with the projection after each of its calls (LBFGS calls it
        several times a step), and the loss it returns is returned."""
        if closure is None:
            self.project_gradients()
            take_step = self.base_optimizer.step
        else:
            def projected_closure() -> Tensor:
                loss = closure()
                self.project_gradients()
                return loss

            def take_step() -> Tensor | None:
                return self.base_optimizer.step(projected_closure)
        if _steps_inside_span(self.base_optimizer):
            return take_step()
        with torch.no_grad():
            before = self._flat_weights()
        result = take_step()
        with torch.no_grad():
            moved = before + self._in_span(self._flat_weights() - before)
            for p, piece in zip(self._params, self.subspace.unflatten(moved).values()):
                p.copy_(piece)
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's zero_grad."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The wrapped optimizer's state (the subspace holds no state of its own)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Load the wrapped optimizer's state, as saved by `state_dict`."""
        self.base_optimizer.load_state_dict(state)
