"""SubspaceOptimizer: projected-gradient training inside a subspace (the ICLR version, P-SGD).

    sub = tk.Subspace.from_checkpoints(ckpts, bits=None, granularity="model", orthonormalize=True,
                                       parameter_names=[n for n, _ in model.named_parameters()])
    model.load_state_dict(sub.unflatten(sub.center), strict=False)   # start at the SWA point
    opt = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=1, momentum=0.9), sub)

Before every step the gradient g of the model's parameters is replaced by P^T P g, its
projection onto the span of the orthonormal basis P, computed by the fused project and
reconstruct ops; the base optimizer then steps as usual. SGD (with or without momentum,
without weight decay, every group at the same settings) steps along one linear function
of those projected gradients, so its step is already inside the span, as long as its
momentum buffers hold only such gradients (not state it brought along, or what a step with
weight decay left). A state loaded with load_state_dict is tested: with a dense basis and
float32 or float64 weights, momentum in the span lets a resumed run step as the run that
saved it did; anything else is projected. Any other step (Adam's per-entry scaling, weight
decay) is projected too: the weights move by P^T P of the step the base optimizer took,
added to each weight in its own dtype. Either way the weights stay in center + span(P);
16-bit weights (float16, bfloat16) over a dense basis are put back at their rounding of the
nearest point of it after every step (no fast path for SGD, and a second projection where
other weights are float32 or float64), so they stay off it by one rounding, where the
roundings of step after step would add up; a step of zero may then move them once, by a
rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, UsageError, warn_at_caller
from twa_kernels.io import unwrap_model
from twa_kernels.ops import project, reconstruct
from twa_kernels.subspace import Subspace

# Relative distance from center + span(P) above which the starting weights are reported:
# float32 rounding of an in-span point leaves ~1e-7, a point off the subspace leaves ~1.
_OFF_SUBSPACE = 1e-4

# weights whose every step is rounded visibly (a bfloat16 step of 1e-3 moves a weight of 1 by
# 0 or 2^-7): SubspaceOptimizer puts them back onto the subspace after each step
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# SGD's settings that scale a parameter's step: one step moves every parameter by the same
# linear map of its gradients only when the groups agree on all of them
_SGD_STEP_SETTINGS = ("lr", "momentum", "dampening", "nesterov", "maximize")


def _steps_inside_span(optimizer: torch.optim.Optimizer) -> bool:
    """True when each step is one linear map of the gradients seen, the same for every
    parameter, so projecting the gradients suffices: plain SGD without weight decay whose
    groups share their step settings (per-group learning rates move each group by its own
    multiple of the projected gradient, which leaves the span)."""
    groups = optimizer.param_groups
    if type(optimizer) is not torch.optim.SGD or any(float(g.get("weight_decay", 0) or 0) != 0 for g in groups):
        return False
    return all(len({float(g[key]) if key == "lr" else g.get(key) for g in groups}) == 1
               for key in _SGD_STEP_SETTINGS)


def _parameters_by_weight(base_optimizer: torch.optim.Optimizer, subspace: Subspace,
                          model: nn.Module | None) -> list[nn.Parameter]:
    """The optimizer's parameters in the order of the subspace's weights: matched by name
    through `model`, or through the names the optimizer holds (built from
    named_parameters()), else by position in a single group. Across several groups the
    position says nothing (two layers of one shape can be swapped unseen): names are needed."""
    groups = base_optimizer.param_groups
    params = [p for group in groups for p in group["params"]]
    if model is not None:
        names_of = {id(p): name for name, p in unwrap_model(model).named_parameters()}
        named = [(names_of.get(id(p)), p) for p in params]
        stranger = sum(name is None for name, _ in named)
        if stranger:
            raise InvalidArgumentError(f"{stranger} of the optimizer's parameters are not parameters of `model`; "
                                       "pass the model whose parameters the optimizer trains")
    elif all("param_names" in group for group in groups):
        named = [(name, p) for group in groups for name, p in zip(group["param_names"], group["params"])]
    elif len(groups) > 1:
        raise InvalidArgumentError(f"the optimizer has {len(groups)} parameter groups, so which subspace weight each "
                                   "parameter is cannot be told from its position; pass model=model, or build the "
                                   "optimizer from model.named_parameters()")
    else:
        if [tuple(p.shape) for p in params] != subspace.shapes:  # frozen ones never step: a subspace may leave them out
            params = [p for p in params if p.requires_grad]
        shapes = [tuple(p.shape) for p in params]
        if shapes != subspace.shapes:
            raise InvalidArgumentError(f"the optimizer's {len(shapes)} trainable parameters do not match the "
                                       f"subspace's {len(subspace.shapes)} weights; pass the parameters of the model "
                                       "the checkpoints came from, in the same order, or pass model=model to "
                                       "match them by name")
        return params
    by_name = dict(named)
    spanned = set(subspace.names)
    missing = [name for name in subspace.names if name not in by_name]
    # a frozen parameter the subspace leaves out never steps (it gets no gradient)
    extra = [name for name, p in named if name not in spanned and p.requires_grad]
    if missing or extra or len(by_name) != len(named):
        raise InvalidArgumentError(f"the optimizer's parameters are not the subspace's weights by name (missing: "
                                   f"{missing[:3]}, not spanned: {extra[:3]}); give the optimizer exactly the "
                                   "parameters the subspace spans, named as the model names them")
    ordered = [by_name[name] for name in subspace.names]
    wrong = next((name for name, p, shape in zip(subspace.names, ordered, subspace.shapes)
                  if tuple(p.shape) != shape), None)
    if wrong is not None:
        raise InvalidArgumentError(f"the optimizer's parameter {wrong!r} has shape {tuple(by_name[wrong].shape)} but "
                                   f"the subspace's has {subspace.shapes[subspace.names.index(wrong)]}")
    return ordered


class SubspaceOptimizer(torch.optim.Optimizer):
    """Wraps `base_optimizer`, whose trainable parameters must be the subspace's weights
    (frozen ones it leaves out may be there too): matched by name through `model` or the
    optimizer's own parameter names (an optimizer built from model.named_parameters()), else
    in order in a single parameter group, where a start off the subspace is refused if
    several weights share one shape (it may be a swap).

    It is a torch Optimizer whose `param_groups` and `state` are the wrapped one's, read
    through at every access (also after either's load_state_dict), so learning-rate
    schedulers and Lightning's `configure_optimizers` take it as they are.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, subspace: Subspace, model: nn.Module | None = None):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            what = (f"the class {base_optimizer.__name__}; pass an instance, e.g. "
                    f"{base_optimizer.__name__}(model.parameters(), lr=...)" if isinstance(base_optimizer, type)
                    else type(base_optimizer).__name__)
            raise InvalidTypeError(f"SubspaceOptimizer wraps a torch.optim.Optimizer instance, got {what}")
        if not isinstance(subspace, Subspace):
            raise InvalidTypeError(f"SubspaceOptimizer needs a tk.Subspace (center and basis), got "
                                   f"{type(subspace).__name__}; build one with tk.Subspace.from_checkpoints(...)")
        if not subspace.orthonormal:
            raise InvalidArgumentError("SubspaceOptimizer needs an orthonormal basis: build the subspace with "
                                       "orthonormalize=True (and granularity='model')")
        if subspace.basis.bits is not None:
            warn_at_caller(f"SubspaceOptimizer: the basis is packed in {subspace.basis.bits} bits, so its rows are "
                           "orthonormal only up to their quantisation and P^T P g is not quite a projection (the "
                           "weights stay in the packed rows' span, but each step's component there is off by the "
                           "rounding); build the subspace with bits=None for the exact projection", UserWarning)
        if model is not None and not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"model must be the nn.Module the optimizer trains, got {type(model).__name__}")
        params = _parameters_by_weight(base_optimizer, subspace, model)
        frozen = [name for name, p in zip(subspace.names, params) if not p.requires_grad]
        if frozen:
            raise InvalidArgumentError(f"{len(frozen)} of the optimizer's parameters do not require grad "
                                       f"(first: {frozen[0]!r}), but the subspace spans them, so its steps would "
                                       "move them; build the subspace from the trainable parameters only")
        device = subspace.center.device
        elsewhere = next((name for name, p in zip(subspace.names, params) if p.device != device), None)
        if elsewhere is not None:
            where = params[subspace.names.index(elsewhere)].device
            raise InvalidArgumentError(f"the parameter {elsewhere!r} is on {where} but the subspace is on {device}; "
                                       + ("load the model's weights first (to_empty() and load_state_dict())"
                                          if where.type == "meta" else "build the subspace on the model's device"))
        # Optimizer.__init__ sets up the hooks and the step patching that schedulers and
        # profilers rely on; the groups and state it makes are dropped for the wrapped
        # optimizer's own (the properties below)
        super().__init__(params, dict(base_optimizer.defaults))
        del self.__dict__["_own_param_groups"], self.__dict__["_own_state"]
        self.base_optimizer, self.subspace, self._params = base_optimizer, subspace, params
        # plain SGD's steps need no projection only while its momentum buffers lie in the span:
        # state it brings along (a resumed run, an optimizer that trained before) or that a
        # projected step left (weight decay's w * p) may not
        self._state_in_span = not base_optimizer.state
        if subspace.basis.bits is None:
            # matched by position alone, two weights of one shape may have been swapped
            by_position = model is None and not all("param_names" in g for g in base_optimizer.param_groups)
            self._check_on_subspace(by_position and len(set(subspace.shapes)) < len(subspace.shapes))

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

    def add_param_group(self, param_group: dict) -> None:
        """Refused once wrapped: the subspace spans the weights it was built with, and a new
        group's parameters would train unprojected."""
        if "base_optimizer" not in self.__dict__:  # Optimizer.__init__'s own groups
            return super().add_param_group(param_group)
        raise UsageError("SubspaceOptimizer trains exactly the weights its subspace spans; a parameter group added "
                         "now would train outside it. Build the subspace over those weights too, and wrap an "
                         "optimizer that holds every group")

    def __getstate__(self) -> dict:
        return self.__dict__.copy()  # Optimizer's own keeps only defaults, state and groups

    def _flat_weights(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in self._params])

    def _in_span(self, flat: Tensor) -> Tensor:
        basis = self.subspace.basis
        return reconstruct(basis, project(basis, flat))

    def _center_as_held(self) -> Tensor:
        """The center as the parameters hold it, rounded to each one's dtype: a bfloat16 model
        loaded at the center is off it by that rounding alone, which is no distance to report."""
        pieces = torch.split(self.subspace.center, [p.numel() for p in self._params])
        return torch.cat([c.to(p.dtype).to(torch.float32) for c, p in zip(pieces, self._params)])

    @torch.no_grad()
    def _check_on_subspace(self, order_unknown: bool = False) -> None:
        """Warn when the model's weights lie off the subspace. With `order_unknown` (unnamed
        parameters matched by position, several weights of one shape) that is refused: two
        swapped layers look exactly so, and every step would then move the wrong weights."""
        held = self._center_as_held()
        offset = self._flat_weights() - held
        size = float(offset.norm())
        if size == 0:
            return
        # A 16-bit weight at a point x of the subspace holds x rounded (off by e_w, at most half
        # an eps of each value), and the offset is taken from the center rounded alike (off
        # by e_c): what lies outside is (I - P^T P)(e_w - e_c), whose norm is at most
        # |e_w| + |e_c|. Within that it is no distance. (A bound over all weights: a swap of
        # two layers far smaller than the rest can hide in the rest's rounding.)
        rounding = math.sqrt(sum(float((p.detach().float() * (torch.finfo(p.dtype).eps / 2)).square().sum())
                                 for p in self._params)) + float((held - self.subspace.center).norm())
        outside = float((offset - self._in_span(offset)).norm())
        if outside <= rounding:
            return
        outside /= size
        if outside > _OFF_SUBSPACE and order_unknown:
            raise InvalidArgumentError(
                f"SubspaceOptimizer: {outside:.2g} of the model's distance from the subspace's center lies outside "
                "the subspace, and its parameters were matched to the subspace's weights by position, with several "
                "weights of one shape: they may be matched in another order, and each step would move the wrong "
                "weights. Pass model=model (or build the optimizer from model.named_parameters()) to match them by "
                "name, and load a point of the subspace first: model.load_state_dict(sub.unflatten(sub.center), "
                "strict=False)")
        if outside > _OFF_SUBSPACE:
            warn_at_caller(f"SubspaceOptimizer: {outside:.2g} of the model's distance from the subspace's center "
                           "lies outside the subspace, so its steps move parallel to it without reaching it; load "
                           "the center first: model.load_state_dict(sub.unflatten(sub.center), strict=False)",
                           UserWarning)

    def _momentum_buffers(self) -> list[Tensor | None]:
        return [self.base_optimizer.state.get(p, {}).get("momentum_buffer") for p in self._params]

    def _versions(self) -> tuple[list[int], list[tuple[int, int] | None]]:
        """The parameters' version counters, and each momentum buffer's identity and version."""
        return ([p._version for p in self._params],
                [None if b is None else (id(b), b._version) for b in self._momentum_buffers()])

    def _changed_since(self, versions: tuple[list[int], list[tuple[int, int] | None]]) -> tuple[bool, bool]:
        """(whether a parameter changed, whether a momentum buffer did) since _versions()."""
        params, buffers = self._versions()
        return params != versions[0], buffers != versions[1]

    @torch.no_grad()
    def _return_to_subspace(self) -> None:
        """Remove the part of the weights' distance from the center that lies outside the
        span, in each weight's own dtype; weights already on the subspace (up to float32
        rounding) are left exactly as they are."""
        offset = self._flat_weights() - self._center_as_held()
        outside = offset - self._in_span(offset)
        if float(outside.norm()) <= _OFF_SUBSPACE * float(offset.norm()):
            return
        for p, piece in zip(self._params, self.subspace.unflatten(outside).values()):
            p.sub_(piece.to(p.dtype))

    @torch.no_grad()
    def _snap_low_precision(self) -> None:
        """Put each 16-bit weight at its rounding of center + P^T P (w - center), computed in
        float32. Each step adds a projected step to a weight that was rounded before: left
        alone, the roundings add up off the subspace (to several times one rounding after a
        few hundred steps, and SGD's steps, inside the span, are rounded off it too); snapped,
        the weights are off it by the last rounding only."""
        offset = self._flat_weights() - self.subspace.center
        on = self.subspace.unflatten(self.subspace.center + self._in_span(offset)).values()
        for p, piece in zip(self._params, on):
            if p.dtype in _LOW_PRECISION:
                p.copy_(piece.to(p.dtype))

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Replace each parameter's gradient by its part inside the subspace."""
        for name, p in zip(self.subspace.names, self._params):
            if not p.requires_grad:  # frozen after wrapping: given a projected gradient, it would move
                raise UsageError(f"parameter {name!r} no longer requires grad, but the subspace spans it and each "
                                 "step moves every weight it spans; build the subspace and the optimizer over the "
                                 "trainable parameters only")
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
        project that step unless the optimizer is plain SGD whose momentum is known to lie in
        the span. A closure is handed to the wrapped optimizer with the projection after each
        of its calls (LBFGS calls it several times a step), and the loss it returns is
        returned."""
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
        # (one unpickled from an earlier twa-kernels version has no flag: its steps are projected)
        # (with a quantized basis P^T P is not quite a projection: applied to the whole offset at
        # every step it would scale it up step after step, so such a subspace is not snapped to)
        low_precision = self.subspace.basis.bits is None and any(p.dtype in _LOW_PRECISION for p in self._params)
        if getattr(self, "_state_in_span", False) and _steps_inside_span(self.base_optimizer) and not low_precision:
            versions = self._versions()
            try:
                return take_step()
            except BaseException:
                # SGD on CPU steps parameter by parameter: one cut short (an error, Ctrl-C) may
                # have moved some weights and not others, off the subspace. Nothing was copied
                # beforehand, to keep this path free; the tensors' version counters tell what
                # changed. Moved weights go back onto the subspace, and momentum buffers that
                # changed (perhaps some only) count as outside the span from now on; a step that
                # changed nothing leaves everything as it was
                weights_moved, buffers_changed = self._changed_since(versions)
                if any(group.get("fused") for group in self.base_optimizer.param_groups):
                    # the fused kernel bumps no version counter: anything may have changed
                    weights_moved = buffers_changed = True
                if weights_moved or buffers_changed:
                    self._state_in_span = False
                if weights_moved:
                    self._return_to_subspace()
                raise
        with torch.no_grad():
            before = [p.detach().clone() for p in self._params]
        try:
            result = take_step()
            with torch.no_grad():
                if not (low_precision and all(p.dtype in _LOW_PRECISION for p in self._params)):
                    # the step projected in float32, added to each weight in its own dtype (in
                    # float32, a float64 model's small steps would be rounded away with its weights)
                    step = torch.cat([(p.detach() - b).reshape(-1).to(torch.float32)
                                      for p, b in zip(self._params, before)])
                    for p, b, piece in zip(self._params, before,
                                           self.subspace.unflatten(self._in_span(step)).values()):
                        p.copy_(b + piece.to(p.dtype))
                if low_precision:
                    # (with every weight 16-bit, putting the stepped weights back onto the subspace
                    # is the projection of the step: one projection does both)
                    self._snap_low_precision()
        except BaseException:
            # a step cut short (an error, Ctrl-C) before its projection would leave the weights
            # off the subspace for good: they go back to where the step began
            with torch.no_grad():
                for p, b in zip(self._params, before):
                    p.copy_(b)
            raise
        finally:
            self._state_in_span = False  # the wrapped optimizer's buffers may hold unprojected steps
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
        self._state_in_span = self._loaded_state_in_span()

    @torch.no_grad()
    def _loaded_state_in_span(self) -> bool:
        """Whether loaded state lets plain SGD step without projection: momentum buffers in
        the span up to float32 rounding, as a run that stepped so leaves them. Its resumed
        steps then take the same path as the run that saved it did, and repeat its numbers
        exactly; taking the projected path instead rounded them differently. Other state (or
        a quantised basis, whose P^T P is not a projection to test against) is projected."""
        if not self.base_optimizer.state:
            return True
        if self.subspace.basis.bits is not None or not _steps_inside_span(self.base_optimizer):
            return False
        buffers = self._momentum_buffers()
        if any(set(self.base_optimizer.state.get(p, {})) - {"momentum_buffer"} for p in self._params):
            return False
        flat = torch.cat([torch.zeros(p.numel(), dtype=torch.float32, device=p.device) if b is None
                          else b.reshape(-1).to(torch.float32) for p, b in zip(self._params, buffers)])
        size = float(flat.norm())
        if size == 0:
            return True
        if size != size or size == float("inf"):
            return False
        return float((flat - self._in_span(flat)).norm()) / size <= _OFF_SUBSPACE
