"""How TWA lends its weights to the model for a forward and, where a graph records,
until its backward has consumed it (see twa.py's module docstring).

Activation checkpointing reruns parts of the forward inside the backward and reads the
weights from the model again, so a swap that ends when the forward returns (as
torch.func.functional_call's does) would rerun them at the model's own weights. Here the
model's parameter slots hold TWA's weights, as detached aliases of the same memory, for as
long as a recorded graph may still need them; what a reentrant recomputation leaves on
those aliases reaches the coefficients through LoanAnchor or a late projection.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from twa_kernels._ops import queue_after_backward
from twa_kernels.errors import UsageError


class Loan:
    """The weights of one forward that recorded a graph, as detached aliases (the same
    memory, leaves that require grad) that the model holds after that forward returned,
    for whatever reruns part of it during the backward. `key` is what they were computed
    from; `expired` is set when a later forward saw other coefficients, a basis or a
    center, after which these aliases may no longer hold the graph's weights."""

    __slots__ = ("number", "key", "aliases", "expired", "lender", "project_late", "__weakref__")

    def __init__(self, number: int, key: tuple, aliases: list[Tensor], lender: LentWeights,
                 project_late: Callable[[Sequence[Tensor | None]], None]):
        self.number, self.key, self.aliases, self.expired = number, key, aliases, False
        self.lender, self.project_late = lender, project_late

    def take_grads(self) -> list[Tensor | None] | None:
        """The gradients a reentrant recomputation left on the aliases (cleared), or None."""
        grads = [alias.grad for alias in self.aliases]
        if all(g is None for g in grads):
            return None
        for alias in self.aliases:
            alias.grad = None
        return grads


# Registrations of modules and parameters in any module of the process, counted by global
# hooks that the first LentWeights installs: while the count stands still no model has
# grown a parameter, so a lending walks its model's parameters only after the count moved.
_registrations = [0]


def _count_registration(*_: Any) -> None:
    _registrations[0] += 1


@functools.cache
def _count_registrations() -> None:
    nn.modules.module.register_module_module_registration_hook(_count_registration)
    nn.modules.module.register_module_parameter_registration_hook(_count_registration)


def same_key(a: tuple, b: tuple) -> bool:
    return a[1:] == b[1:] and a[0].shape == b[0].shape and bool(torch.equal(a[0], b[0]))


class LentWeights:
    """Lends a model TWA's weights: puts them into its parameter slots (every name of a
    tied weight) and gives the model's own Parameter objects back when nothing needs the
    loan any more. A forward lends its weights for as long as it runs; one that records a
    graph keeps them lent, as a Loan, until a backward has consumed the graph (or the
    graph is freed), because activation checkpointing reruns parts of the forward inside
    the backward and reads the weights from the model again. While loans are pending the
    model holds the newest one's."""

    def __init__(self, model: nn.Module, slot_names: list[list[str]], pinned_from: int | None = None):
        """slot_names: every name of each tensor lent, the trained ones first, then from
        `pinned_from` on the frozen parameters' pinned values."""
        def slot(name: str) -> tuple[nn.Module, str]:
            prefix, _, attr = name.rpartition(".")
            return model.get_submodule(prefix), attr

        self.slots = [[slot(name) for name in names] for names in slot_names]
        self.slot_names = slot_names
        # every (parent, child name, child) link from the model down to a slot's module: a
        # module replaced after TWA was built would hold the model's own weights unseen
        links: dict[tuple[int, str], tuple[nn.Module, str, nn.Module, str]] = {}
        for name in (name for names in slot_names for name in names):
            parent, path = model, ""
            for part in name.split(".")[:-1]:
                child = parent._modules[part]
                path = f"{path}.{part}" if path else part
                links[(id(parent), part)] = (parent, part, child, path)
                parent = child
        self.links = list(links.values())
        _count_registrations()
        self.root, self.registrations_seen = model, _registrations[0]
        self.pinned_from = len(slot_names) if pinned_from is None else pinned_from
        self.own: list[list[Any]] | None = None  # the model's Parameters while it holds others
        self.loans: dict[int, weakref.ref] = {}  # pending, oldest first
        self.holder: int | None = None  # the loan whose aliases the slots hold outside a forward
        self.in_slots_since: set[int] = set()  # loans whose aliases the slots held (loans_with_grads)
        self.releases: dict[int, Callable[[], None]] = {}  # called when the loan of that number ends
        self.opened = 0
        self.depth = 0  # forwards running: the slots are theirs
        self.forward_lock = threading.RLock()  # one forward at a time (claimed)
        # the threads themselves, not their ids, which a new thread may take over from an ended one
        self.blocks: list[threading.Thread] = []  # the thread of each averaged_model() block open
        self.block_ended = threading.Condition(self.forward_lock)
        self.loan_threads: dict[int, threading.Thread] = {}  # the thread that opened each pending loan

    def __getstate__(self) -> dict[str, Any]:
        """A copy (copy.deepcopy, torch.save of the module) starts with no pending graph: the
        loans belong to the original's graphs, and a copy sharing them would mark them
        expired at its own forwards (and weak references cannot be pickled)."""
        return {**self.__dict__, "loans": {}, "holder": None, "in_slots_since": set(), "releases": {}, "depth": 0,
                "loan_threads": {}, "forward_lock": None, "block_ended": None, "blocks": []}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy saved before these existed has neither
        self.__dict__.update({"holder": None, "in_slots_since": set(), "releases": {}, "slot_names": None,
                              "loan_threads": {}, "blocks": [], **state})
        self.forward_lock = threading.RLock()  # a lock cannot be copied or pickled
        self.block_ended = threading.Condition(self.forward_lock)
        self._give_back()  # the copied model holds its own (copied) Parameters, not the original's loan

    @property
    def pending(self) -> bool:
        return bool(self.loans)

    def own_dtypes(self, start: int, stop: int) -> list[torch.dtype]:
        """The dtypes of the model's own Parameters in slots start..stop-1, lent or not."""
        if self.own is not None:
            return [own[0].dtype for own in self.own[start:stop]]
        try:
            return [slots[0][0]._parameters[slots[0][1]].dtype for slots in self.slots[start:stop]]
        except (KeyError, AttributeError):  # a parameter deleted, or set to None
            self.check_parameters()
            raise

    def check_parameters(self) -> None:
        """Refuse a model that lost a parameter TWA lends (deleted, or set to None) after
        TWA was built: its weights would have no slot to go to."""
        for i, slots in enumerate(self.slots):
            for j, (module, attr) in enumerate(slots):
                if not isinstance(module._parameters.get(attr), Tensor):
                    name = repr(self.slot_names[i][j]) if self.slot_names else f"{type(module).__name__}.{attr}"
                    if attr in getattr(module, "parametrizations", {}):  # moved into parametrizations.<attr>.original
                        raise UsageError(f"a parametrization (weight_norm, spectral_norm, orthogonal, ...) was "
                                         f"registered on the model's parameter {name} after TWA was built, so TWA's "
                                         "weights for it have nowhere to go; register parametrizations before "
                                         "building the TWA (its checkpoints then hold the parametrization's "
                                         "parameters), or build a new TWA over the model as it is now")
                    raise UsageError(f"the model's parameter {name} was removed (deleted or set to None) after TWA "
                                     "was built, so TWA's weights for it have nowhere to go; put it back, or build "
                                     "a new TWA over the model as it is now")

    def check_structure(self) -> None:
        """Refuse a model whose submodules holding TWA's weights were replaced after TWA was
        built: the new module would run at its own weights, untrained, without an error."""
        for parent, name, child, path in self.links:
            if parent._modules.get(name) is not child:
                raise UsageError(f"the model's submodule {path!r} was replaced after TWA was built, so TWA's "
                                 "weights would not reach it; build TWA once the model has its final structure "
                                 "(replace or wrap its modules first)")

    def check_parameters_held(self, training: bool = False) -> None:
        """Refuse a model that gained a parameter after TWA was built (a module added or
        given a new parameter), or whose frozen parameter now requires grad: TWA lends it
        no weights, so it would train outside the subspace, or not at all, and be exported
        as it is, without an error. And, for a forward that trains the coefficients
        (`training`), one whose averaged parameter was frozen since: they would go on
        training it (a model frozen for inference, coefficients and all, is no such case)."""
        root = getattr(self, "root", None)  # a copy pickled before these existed has neither
        pinned_from = getattr(self, "pinned_from", len(self.slots))
        for i in range(pinned_from if training else 0):
            module, attr = self.slots[i][0]
            own = self.own[i][0] if self.own is not None else module._parameters.get(attr)
            if isinstance(own, Tensor) and not own.requires_grad:
                raise UsageError(f"the model's parameter {self.slot_names[i][0]!r} was trainable when TWA was built, "
                                 "so the subspace spans it and the coefficients train it, and it is frozen now "
                                 "(requires_grad False): it would go on training; make it trainable again "
                                 "(requires_grad_(True)), or build a new TWA over the model as it is now")
        for i in range(pinned_from, len(self.slots)):
            module, attr = self.slots[i][0]
            own = self.own[i][0] if self.own is not None else module._parameters.get(attr)
            if isinstance(own, Tensor) and own.requires_grad and own.numel():  # an empty one has nothing to train
                raise UsageError(f"the model's parameter {self.slot_names[i][0]!r} was frozen when TWA was built, "
                                 "so TWA holds it at its pinned value, and it requires grad now: it would not "
                                 "train; freeze it again (requires_grad_(False)), or build a new TWA over the "
                                 "model as it is now")
        if root is None or _registrations[0] == self.registrations_seen:
            return
        held = {(id(module), attr) for slots in self.slots for module, attr in slots}
        for prefix, module in root.named_modules():
            for attr, param in module._parameters.items():
                if isinstance(param, Tensor) and (id(module), attr) not in held:
                    name = f"{prefix}.{attr}" if prefix else attr
                    raise UsageError(f"the model's parameter {name!r} was added after TWA was built, so the "
                                     "subspace does not span it: it would train outside it (or stay at its "
                                     "initial value), and averaged_state_dict() would export it as it is; build "
                                     "TWA once the model has its final structure")
        self.registrations_seen = _registrations[0]

    def _put(self, tensors: Sequence[Tensor]) -> None:
        if self.own is None:
            try:
                own = [[module._parameters[attr] for module, attr in slots] for slots in self.slots]
            except KeyError:
                self.check_parameters()
                raise
            if not all(isinstance(p, nn.Parameter) for params in own for p in params):
                self.check_parameters()
                # another TWA's loan: taken as the model's own, its weights would stay in the
                # model after both loans ended
                raise UsageError("the model holds weights another TWA over it lent for a forward whose graph has "
                                 "not run backward yet; call backward on (or free) that TWA's outputs first, or "
                                 "build each TWA on its own copy of the model (copy.deepcopy(model))")
            self.own = own
        for slots, tensor in zip(self.slots, tensors):
            for module, attr in slots:
                module._parameters[attr] = tensor

    def _give_back(self) -> None:
        self.holder = None
        if self.own is not None:
            for slots, own in zip(self.slots, self.own):
                for (module, attr), param in zip(slots, own):
                    module._parameters[attr] = param
            self.own = None

    def live(self) -> list[Loan]:
        return [loan for loan in (ref() for ref in list(self.loans.values())) if loan is not None]

    def _newest_first(self) -> Iterator[Loan]:
        for ref in reversed(list(self.loans.values())):
            loan = ref()
            if loan is not None:
                yield loan

    def _settle(self) -> None:
        """Outside a forward: the model holds the newest pending loan, else its own weights."""
        if self.depth:
            return
        newest = next(self._newest_first(), None)
        if newest is not None:
            self._put(newest.aliases)
            self.holder = newest.number
            self.in_slots_since.add(self.holder)
        else:
            self._give_back()

    def open(self, key: tuple, aliases: list[Tensor], project_late: Callable[[Sequence[Tensor | None]], None],
             release: Callable[[], None] | None = None) -> Loan:
        """A new pending loan of `aliases`; `release` is called when it ends (its graph
        consumed by a backward, or freed)."""
        self.opened += 1
        number = self.opened
        loan = Loan(number, key, aliases, self, project_late)
        self.loans[number] = weakref.ref(loan, lambda _: self._closed(number))  # a freed graph ends its loan
        self.loan_threads[number] = threading.current_thread()
        if release is not None:
            self.releases[number] = release
        return loan

    def close(self, loan: Loan) -> None:
        self._closed(loan.number)
        # the graph may outlive its loan (a loss kept for logging): the aliases, a D-long
        # copy of the weights where the forward could not use the workspace, go now
        loan.aliases, loan.key = [], None

    def _closed(self, number: int) -> None:
        self.in_slots_since.discard(number)
        self.loan_threads.pop(number, None)
        release = self.releases.pop(number, None)
        if release is not None:
            release()
        if self.loans.pop(number, None) is not None:
            self._settle()

    def loans_with_grads(self, own: Loan | None = None) -> list[Loan]:
        """The pending loans whose aliases may hold gradients, for a backward through `own`'s
        graph. Aliases are read only from the model's slots: by a recomputation inside a
        backward, which reads the loans the slots held since the last call, or by the
        caller's own code between a forward and the next (a penalty over
        model.parameters()), whose graph is the one of that forward's loan, `own`. So a
        backward need not look at every pending loan (hundreds of graphs kept for logging
        made each step slower)."""
        numbers = self.in_slots_since | ({own.number} if own is not None else set())
        self.in_slots_since = {self.holder} if self.holder is not None else set()  # it may get more
        return [loan for loan in (self.loans[n]() for n in sorted(numbers) if n in self.loans) if loan is not None]

    def expire_other_than(self, key: tuple) -> None:
        """A forward at other weights than a pending loan's: that loan's graph can no longer
        be recomputed at its own weights (the model will hold others, and its workspace may
        be written), so its backward will refuse."""
        # the loans not expired yet are the newest ones (a forward at other weights expires
        # every older loan at once), so the walk stops at the first expired one
        for loan in self._newest_first():
            if loan.expired:
                break
            if not same_key(loan.key, key):
                loan.expired = True

    def reset(self) -> None:
        """Give the model its own Parameters now; every pending loan expires."""
        for loan in self.live():
            loan.expired = True
        self.loans.clear()  # (their weak references go, so _closed() runs for none of them)
        self.loan_threads.clear()
        self.releases.clear()  # a workspace a pending graph held is replaced at the next forward
        self.in_slots_since.clear()
        self._give_back()

    @contextmanager
    def claimed(self, block: bool = False) -> Iterator[None]:
        """The model for one forward of this thread (or, `block`, for entering or leaving an
        averaged_model() block), for the length of the block. The model's slots hold one set
        of weights at a time: forwards from several threads wait for each other, and one
        that finds another thread's graph not yet backpropagated, or an averaged_model()
        block of another thread open, is refused (that backward or block reads the slots
        this forward writes); a block waits for another thread's to end (each is short: a
        generate() call of a server's request). A backward's recomputation runs on
        autograd's own threads (CUDA) and is no forward of another thread."""
        if torch._C._current_graph_task_id() != -1:
            yield
            return
        with self.forward_lock:  # (reentrant: a forward inside averaged_model() of the same thread)
            me = threading.current_thread()  # (a thread started outside Python gets one that stays alive)
            while block and any(t is not me and t.is_alive() for t in self.blocks):
                self.block_ended.wait(timeout=1.0)  # (a block's thread that ended without leaving it is seen)
            if any(t is not me and t.is_alive() for t in self.blocks):
                raise UsageError("this TWA's model is inside an averaged_model() block (or a generate() call) of "
                                 "another thread, and holds the block's weights for it: a forward here would change "
                                 "them under that block. Run the forward in the block's own thread, or after the "
                                 "block; or give each thread its own TWA (copy.deepcopy(twa))")
            # (a copy: a graph freed on another thread ends its loan, and its entry, meanwhile)
            if any(t is not me and t.is_alive() and n in self.loans for n, t in list(self.loan_threads.items())):
                raise UsageError("this TWA's model holds the weights of a forward in another thread whose graph is "
                                 "not yet backpropagated: the model holds one set of weights at a time, so this "
                                 "forward would change what that backward reads. Give each thread its own TWA "
                                 "(copy.deepcopy(twa)), or hold a lock from each forward to the end of its backward "
                                 "(forwards under torch.no_grad() need none)")
            yield

    def end_block(self, thread: threading.Thread) -> None:
        """Take the record of an averaged_model() block of `thread` (called under forward_lock),
        and wake the blocks waiting for it."""
        self.blocks.remove(thread)
        self.block_ended.notify_all()

    @contextmanager
    def lending(self, weights: Sequence[Tensor], loan: Loan | None = None):
        """The model holds `weights` inside; after, a new loan's aliases or what it held before.
        Nested in another lending (a forward inside `averaged_model()`), it gives the outer
        block its weights back: they stayed the inner forward's, graph and all."""
        outer = [module._parameters[attr] for (module, attr), *_ in self.slots] if self.depth else None
        self.depth += 1
        try:
            self.check_structure()
            if self.depth == 1:  # a nested forward's model holds the outer one's weights
                self.check_parameters_held(training=loan is not None)
            self._put(weights)
            yield
        except BaseException:
            if loan is not None:  # a failed forward's graph is never backpropagated
                self.close(loan)
            raise
        finally:
            self.depth -= 1
            if outer is not None:
                self._put(outer)
            self._settle()

    def hold_with(self, out: Any, loan: Loan) -> None:
        """Keep `loan` pending as long as the graph of the model's output lives, and have
        every backward pass from it end with project_left_over(). A model that uses its
        weights only inside reentrant checkpoints records no use of them outside: the
        output's graph is then all that reaches the recomputation."""
        for node in _graph_nodes(out):
            node.register_prehook(functools.partial(self._on_backward_start, loan))  # the node holds the loan

    def tie(self, out: Any, loan: Loan, token: Tensor) -> Any:
        """The model's output with each of its tensors that carries a graph passed through
        OutputTie to the loan's anchor token (a tensor, or tuples, lists and mappings of them,
        as a Hugging Face ModelOutput; lists and mutable mappings are changed in place). Every
        backward from the output then reaches the anchor, also where the weights are used
        only inside reentrant checkpoints and no use of them is recorded outside: the anchor
        adds what the recomputations left on the aliases through autograd, where
        DistributedDataParallel sees it (hold_with's projection after the backward comes
        after DDP's average). A tensor that appears twice is tied once, and a view is rebuilt
        as the same view of its tied base, so in-place changes through one reach the others'
        gradients. The tied tensors are new graph nodes: a gradient of one output with respect
        to another computed from it inside the model (torch.autograd.grad, retain_grad) no
        longer passes between them. Tensors in tuples and mappings that cannot be rebuilt are
        held by hold_with() as outside DDP; tensors inside other objects (a dataclass) are
        neither tied nor held, inside DDP or outside it."""
        tied: dict[int, Tensor] = {}

        def tie_base(base: Tensor) -> Tensor:
            if id(base) not in tied:
                tied[id(base)] = OutputTie.apply(token, base)
            return tied[id(base)]

        def tie_one(t: Tensor) -> Tensor:
            if t.grad_fn is None:  # a leaf (an input handed back): no graph of the weights to reach
                return t
            base = t._base
            if base is not None and base.grad_fn is None:  # a view of a leaf: no graph of the weights either
                return t
            # as_strided rebuilds a view's geometry only: not another dtype (view_as_real) or a conj/neg bit
            if base is None or base.dtype != t.dtype or base.is_conj() != t.is_conj() or base.is_neg() != t.is_neg():
                return tie_base(t)
            if id(t) not in tied:
                tied[id(t)] = tie_base(base).as_strided(t.size(), t.stride(), t.storage_offset())
            return tied[id(t)]

        out = _map_tensors(out, tie_one)
        self.hold_with(out, loan)  # the tied tensors' nodes hold the loan, and so do what could not be rebuilt
        return out

    def _on_backward_start(self, loan: Loan, grad_outputs: Any) -> None:
        if loan.expired:
            self.refuse()
        queue_after_backward(functools.partial(self.project_left_over, loan))

    def refuse(self) -> None:
        """Raise for a backward whose loan expired, dropping what recomputations left."""
        for loan in self.live():
            loan.take_grads()
        raise UsageError(
            "the coefficients (or the basis or center) changed after this graph's forward, and a later forward "
            "ran at the new ones before this backward: a recomputation inside it (activation checkpointing) "
            "would not see this graph's weights. Call backward before changing the coefficients (an optimizer "
            "step), or run this forward again")

    def project_left_over(self, own: Loan | None = None) -> None:
        """Project what reentrant recomputations left on any pending aliases after the
        graphs' own projections ran (or where the graph has none: its weights were used
        only inside reentrant checkpoints)."""
        for loan in self.loans_with_grads(own):
            grads = loan.take_grads()
            if grads is not None:
                loan.project_late(grads)

    def after_backward(self, ctx: Any) -> None:
        """At the end of a backward pass through a loan's anchor: project_left_over(), and
        end the loan if the pass freed its graph (a retained one may be recomputed again)."""
        self.project_left_over(ctx.loan)
        try:
            ctx.saved_tensors
        except RuntimeError:  # released: this graph will not be backpropagated again
            self.close(ctx.loan)


@contextmanager
def keeping_buffers(model: nn.Module) -> Iterator[None]:
    """The model's buffers that a cast or a move inside (`model.to(torch.bfloat16)`) put in
    another dtype or on another device, back as they were on exit: left, BatchNorm's
    statistics or a rotary embedding's frequencies would stay rounded to the block's dtype.
    A buffer the model itself replaces in its dtype and device (a dynamic rotary embedding
    registering longer frequencies, with attributes that match them) stays, and so does one
    changed in place; what a cast copy took in place during the block goes with it."""
    kept = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()
            if buffer is not None]
    try:
        yield
    finally:
        for module, name, buffer in kept:
            now = module._buffers.get(name)
            if now is not None and now is not buffer and (now.dtype, now.device) != (buffer.dtype, buffer.device):
                module._buffers[name] = buffer


class LoanAnchor(torch.autograd.Function):
    """Identity on the weights a recording forward hands the model, and an empty token that
    OutputTie joins to the model's output. Its backward runs once every use of those weights
    in the graph has given its gradient, and after the reentrant recomputations of that
    backward (it is the graph's oldest node, which autograd runs last among those ready): it
    adds what those recomputations left on the loan's aliases, refuses a graph whose loan
    expired, and at the end of the pass lets the lender end the loan."""

    @staticmethod
    def forward(ctx, loan, *weights):
        ctx.loan = loan
        # released with the graph's saved tensors: tells a consumed graph from a retained one
        ctx.save_for_backward(weights[0].new_empty(0))
        ctx.set_materialize_grads(False)
        return (weights[0].new_empty(0), *weights)

    @staticmethod
    def backward(ctx, token_grad, *grads):
        loan = ctx.loan
        lender = loan.lender
        if loan.expired:
            lender.refuse()
        grads = list(grads)
        for other in lender.loans_with_grads(loan):
            left = other.take_grads()
            if left is not None:
                grads = [g if extra is None else extra if g is None else g + extra for g, extra in zip(grads, left)]
        queue_after_backward(lambda: lender.after_backward(ctx))
        return (None, *grads)


class OutputTie(torch.autograd.Function):
    """Identity on one tensor of a model's output, joined to its loan's anchor token (see
    LentWeights.tie): the anchor is then part of every backward from the output."""

    @staticmethod
    def forward(ctx, token, t):
        ctx.token = (token.dtype, token.device)
        ctx.set_materialize_grads(False)
        # the same memory and version counter, but not a view: autograd refuses in-place
        # changes to a view made inside a custom Function, and callers mask logits in place
        return t.detach()

    @staticmethod
    def backward(ctx, grad):
        # a defined (empty) gradient puts the anchor on its own device's queue: autograd
        # orders by age within a queue only, and the anchor must run after the recomputations
        dtype, device = ctx.token
        return torch.zeros(0, dtype=dtype, device=device), grad


def _map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """`value` with fn applied to each tensor in it: a tensor, or tuples, lists and mappings
    of them; lists and mutable mappings (a Hugging Face ModelOutput) are changed in place,
    so that the object the model returned keeps its type and its other contents."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, MutableMapping):
        for key, item in list(value.items()):
            mapped = _map_tensors(item, fn)
            if mapped is not item:
                value[key] = mapped
        return value
    if isinstance(value, list):
        value[:] = [_map_tensors(item, fn) for item in value]
        return value
    if isinstance(value, tuple):
        items = [_map_tensors(item, fn) for item in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        try:
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        except TypeError:  # a tuple type built another way: left untied
            return value
    return value


def _graph_nodes(out: Any) -> list:
    """The graph nodes of the tensors in a model's output, and of their bases: an in-place
    change through a view gives the view a new node, and the graph from it reaches the
    base's node as it was, not the view's."""
    owners = [u for t in _tensors(out) for u in (t, t._base) if u is not None]
    return list({id(u.grad_fn): u.grad_fn for u in owners if u.grad_fn is not None}.values())


class _ReleasedAfterBackward:
    """A graph node's pre-hook that changes nothing but has `release` called once: at the
    end of the first backward pass that reaches the node, or when the last node holding
    the hook is freed, whichever comes first. (A graph kept for a second backward, with
    retain_graph=True, meets the next forward's write to the buffer as PyTorch's in-place
    error: the write moves the weights' version.)"""

    def __init__(self, release: Callable[[], None]):
        self._release = weakref.finalize(self, release)  # (calling a finalizer runs it once)
        self._queued = False  # a plain flag: compiled autograd traces this hook

    def __call__(self, grad_outputs: Any) -> None:
        if not self._queued:
            self._queued = True
            queue_after_backward(self._release)


def release_with_graph(out: Any, release: Callable[[], None]) -> None:
    """Call `release` once a backward pass has run through the graph recorded into the
    model's output, or the graph is freed (at once where the output carries none): the
    graph may have saved the weights whose buffer `release` frees, as it does for a TWA with
    frozen coefficients whose model passes gradients to its inputs (a critic, a teacher)."""
    nodes = _graph_nodes(out)
    if not nodes:
        release()
        return
    holder = _ReleasedAfterBackward(release)
    for node in nodes:
        node.register_prehook(holder)


def _tensors(value: Any) -> Iterable[Tensor]:
    """The tensors in a model's output: a tensor, or tuples, lists and mappings of them
    (a Hugging Face ModelOutput is a mapping)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
