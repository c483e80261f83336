"""Iterative magnitude pruning (IMP) with weight rewinding (Frankle & Carbin 2019; Frankle et
al. 2020), the pruning used by the sparse-network stability study (McDermott & Cummings,
arXiv 2310.18769).

    masks = tk.prune.global_magnitude_masks(model, 0.2)          # one round, {name: bool}
    result = tk.prune.imp(model, train_fn, rounds=5, rate=0.2, rewind="init", out_dir="imp")
    result.masks[-1], result.sparsity[-1]                        # the last round's mask

Round 0 trains the dense model. Round r >= 1 removes `rate` of the weights that are still
kept, by magnitude of the weights round r - 1 trained (globally over all prunable tensors,
or per tensor), rewinds the kept weights to the rewind point (the initialisation, or the
weights after k optimizer steps of round 0), and trains again. After r rounds the sparsity
is 1 - (1 - rate)^r and every mask lies inside the one before it.

The prunable weights are the `weight` of every Linear, Conv and transformers Conv1D layer
(biases, embeddings and normalisation layers stay dense, as in the lottery-ticket
literature); `layers` narrows them. A weight tied to another module (an output layer that
shares an embedding's weight) is left out, with a warning: a mask held on one module would
not reach the other, which would go on computing with the pruned entries. So is a weight
computed rather than stored (weight_norm, spectral_norm, as parametrizations or as torch's
older hooks): a mask on it would not reach the tensors the layer trains. During training a
mask is a parametrization (`weight = where(mask, original, 0)`), so whatever the optimizer
does to the stored entries (momentum, Adam moments, weight decay) the network computes with
exact zeros, and when training ends the masked values are written
back: the trained weights are exactly zero where pruned. The parameter objects stay the same
throughout, so an optimizer built before or during training stays valid.

Every round writes its mask, its rewound weights and its trained weights as safetensors into
`out_dir`, then updates `imp.json` atomically; a run that is killed resumes after the last
round that finished.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from twa_kernels._progress import progress_bar
from twa_kernels._checks import check_module, integer, path_without_nul, real
from twa_kernels._random import check_seed, generator, seeded
from twa_kernels.batchnorm import batch_of_one_named, layout_named
from twa_kernels.errors import CheckpointError, InvalidArgumentError, InvalidTypeError, OutputError, warn_at_caller
from twa_kernels.geometry.evaluation import SPLIT_BATCH_FIX, classification_metric, split_batch
from twa_kernels.io import StateDict, directory_held, save_state_dict, tied_owners, write_json
from twa_kernels.layers import attention_projections, computed_weight, weight_layer_types

logger = logging.getLogger(__name__)

Masks = dict[str, Tensor]
TrainFn = Callable[[nn.Module, int], None]
_MANIFEST = "imp.json"


class PruningError(InvalidArgumentError):
    """Bad pruning input: a rate, a round count, a layer name, a train_fn or an out_dir."""


def _weight_key(name: str) -> str:
    """A layer named by its module ("features.0") or its weight ("features.0.weight"): the weight's name."""
    if name == "weight" or name.endswith(".weight"):
        return name
    return f"{name}.weight" if name else "weight"  # "" is the root module


def prunable_weights(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """{parameter name: module} for the weights that pruning considers: the `weight` of every
    Linear, Conv and transformers Conv1D layer, in module order, except those tied to another
    module and those computed rather than stored as a Parameter (by a parametrization, or by
    torch.nn.utils.spectral_norm's or weight_norm's hook), which are left out with a warning.
    `layers` keeps only the named ones (a module name such as "features.0" or a parameter name
    such as "features.0.weight"); naming a tied or computed weight is an error."""
    check_module(model, "the model to prune")
    found: dict[str, nn.Module] = {}
    tied: dict[str, list[str]] = {}
    computed: dict[str, tuple[str, str]] = {}  # weight_norm, spectral_norm: `weight` is computed, not a stored entry
    types = weight_layer_types()
    for name, module in model.named_modules():
        if isinstance(module, types) and isinstance(getattr(module, "weight", None), Tensor):
            key = f"{name}.weight" if name else "weight"
            if isinstance(module.weight, nn.parameter.UninitializedParameter):
                raise PruningError(f"{key} is a lazy layer's weight, which has no shape until the layer first runs; "
                                   "run one forward pass of the model first")
            others = tied_owners(model, module)
            masked = parametrize.is_parametrized(module, "weight") and all(
                isinstance(step, _Mask) for step in module.parametrizations.weight)  # apply_masks' own
            if not masked and (why := computed_weight(module)):
                computed[key] = why
            elif others:
                tied[key] = others
            else:
                found[key] = module
    if layers is None:
        if tied:
            warn_at_caller(f"pruning leaves out {sorted(tied)}: each is one Parameter with another module's "
                           f"({tied}), which a mask held on one module would not reach", UserWarning)
        for cause, fix in dict.fromkeys(computed.values()):  # one warning per cause, naming its weights
            keys = [key for key, why in computed.items() if why == (cause, fix)]
            warn_at_caller(f"pruning leaves out {keys}: each is {cause}, so a mask would not reach the weight the "
                           f"layer computes with; to prune such a layer, {fix}", UserWarning)
        if attention := attention_projections(model):
            warn_at_caller(f"pruning leaves out {attention}: nn.MultiheadAttention holds its query, key and value "
                           "projections as Parameters of its own, not in Linear layers (its out_proj is pruned)",
                           UserWarning)
        if not found:
            raise PruningError("the model has no Linear, Conv or Conv1D layer to prune" +
                               (f" that is not tied to another module (tied: {sorted(tied)})" if tied else "") +
                               (f" (left out, as warned: {sorted(computed)})" if computed else ""))
        return found
    if isinstance(layers, str):  # one name, not its characters
        layers = [layers]
    wanted = {_weight_key(name) for name in layers}
    if clash := sorted(wanted & computed.keys()):
        cause, fix = computed[clash[0]]
        raise PruningError(f"{clash[0]} is {cause}: a mask would not reach the weight the layer computes with, "
                           f"trains and saves; leave it out of layers (or masks), or {fix}")
    if clash := sorted(wanted & tied.keys()):
        raise PruningError(f"{clash[0]} is one Parameter with {tied[clash[0]]} (tied weights): a mask held on one "
                           "module would not reach the other, which would compute with the pruned entries; leave "
                           "it out of layers (or masks), or untie the weights first")
    unknown = sorted(wanted - found.keys())
    if unknown:
        raise PruningError(f"layers (or masks) {unknown} are not prunable Linear/Conv/Conv1D weights of the model; "
                           f"choose from {sorted(found)}")
    if not wanted:
        raise PruningError("layers is empty; name at least one Linear/Conv layer, or pass layers=None for all")
    return {name: module for name, module in found.items() if name in wanted}


def _count_to_prune(amount: float | int, remaining: int) -> int:
    # torch.nn.utils.prune's rule: a float is a fraction of the remaining entries (rounded
    # half to even, as Python's round), an int is a count
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise PruningError(f"amount must be a float in [0, 1] or an int count, got {amount!r}")
    if isinstance(amount, numbers.Integral):  # numpy's ints count too
        amount = int(amount)
        if amount < 0:
            raise PruningError(f"amount={amount} is a count of weights to prune and must be >= 0")
        if amount > remaining:
            raise PruningError(f"amount={amount} weights to prune, but only {remaining} are left")
        return amount
    amount = float(amount)
    if not 0.0 <= amount <= 1.0:
        raise PruningError(f"amount={amount} is a fraction and must lie in [0, 1]")
    return round(amount * remaining)


@torch.no_grad()
def global_magnitude_masks(
    model: nn.Module,
    amount: float | int,
    masks: Mapping[str, Tensor] | None = None,
    layers: Iterable[str] | None = None,
    scope: str = "global",
) -> Masks:
    """One round of magnitude pruning: {parameter name: bool mask, True = kept}.

    Removes `amount` (a fraction of the entries still kept by `masks`, or an int count) of
    the smallest-magnitude weights, ranked over all prunable tensors together (scope
    "global") or within each tensor (scope "layer"). The result lies inside `masks`, and
    keeps the masks of weights outside `layers` as they are. With
    scope "global" this is the mask of torch.nn.utils.prune.global_unstructured with
    L1Unstructured at the same amount.
    """
    if scope not in ("global", "layer"):
        raise PruningError(f"scope must be 'global' or 'layer', got {scope!r}")
    modules = prunable_weights(model, layers)
    if meta := [name for name, module in modules.items() if module.weight.is_meta]:
        raise PruningError(f"{meta[0]} is on the meta device and holds no values to rank; load the model's weights "
                           "(e.g. model.to_empty(device='cpu') and load_state_dict) before pruning")
    if masks is not None:  # a misspelt key would prune its layer from dense; a float mask would read as "keep"
        _check_bool_masks(masks)
        weights = {f"{n}.weight" if n else "weight" for n, m in model.named_modules()
                   if isinstance(getattr(m, "weight", None), Tensor)}
        if unknown := sorted(set(masks) - weights):
            raise PruningError(f"masks[{unknown[0]!r}] names no weight of the model (it has e.g. "
                               f"{sorted(weights)[:3]}); pass the masks of this model")
        if masks:  # a mask of a weight pruning leaves alone (an embedding's) would be dropped from the result
            prunable_weights(model, masks)
    prior = {}
    for name, module in modules.items():
        weight = module.weight
        mask = masks.get(name) if masks is not None else None
        if mask is None:
            mask = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        elif mask.shape != weight.shape:
            raise PruningError(f"masks[{name!r}] has shape {tuple(mask.shape)} but the weight has "
                               f"{tuple(weight.shape)}; masks must come from this model")
        # in the standard layout: a channels_last or transposed mask's reshape(-1) is a copy,
        # and the entries dropped below would be dropped from the copy alone
        prior[name] = mask.to(device=weight.device, dtype=torch.bool).contiguous()
        # NaN has no magnitude to rank: topk would keep or drop it arbitrarily
        if bad := int((~torch.isfinite(weight.detach()[prior[name]])).sum()):
            raise PruningError(f"{name} holds {bad} NaN or infinite value(s) among the entries still kept; "
                               "magnitude pruning cannot rank them. Prune a model whose training did not diverge")
    groups = [list(modules)] if scope == "global" else [[name] for name in modules]
    out = {name: mask.clone() for name, mask in prior.items()}
    for names in groups:
        # |w| over the kept entries, flattened tensor by tensor in module order (the order
        # parameters_to_vector uses), so ties break as in torch's global_unstructured
        scores = torch.cat([modules[n].weight.detach().abs().double().reshape(-1)[prior[n].reshape(-1)]
                            for n in names])
        k = _count_to_prune(amount, scores.numel())
        if k == 0:
            continue
        drop = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        drop[torch.topk(scores, k, largest=False).indices] = True
        start = 0
        for n in names:
            flat = out[n].view(-1)  # a view: the drops below land in the mask itself
            kept = flat.nonzero().squeeze(1)
            flat[kept[drop[start:start + kept.numel()]]] = False
            start += kept.numel()
    # the masks of weights outside `layers` stay as they were: dropped, the next round's
    # model would train those weights dense again
    carried = {name: mask.clone() for name, mask in (masks or {}).items() if name not in out}
    return {**carried, **out}


def _check_bool_masks(masks: Mapping[str, Tensor]) -> None:
    """Masks are bool tensors: integer or float ones would be summed, or broadcast, as values."""
    if not isinstance(masks, Mapping):
        raise PruningError(f"masks must be a mapping {{parameter name: bool mask}} (what global_magnitude_masks and "
                           f"imp return), got a {type(masks).__name__}; for a pruned model's sparsity, pass its masks")
    for name, mask in masks.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            what = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise PruningError(f"masks[{name!r}] is {what}, not a bool mask; pass mask.bool() (or the masks imp "
                               "returns)")


def sparsity(masks: Mapping[str, Tensor]) -> float:
    """The fraction of masked-out entries over all tensors of `masks` (bool masks, at least
    one element in all)."""
    _check_bool_masks(masks)
    total = sum(m.numel() for m in masks.values())
    if total == 0:  # no weights is not "all pruned"
        raise PruningError("sparsity of no masks (or only empty ones) is undefined; pass the masks of the weights")
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total


class _Mask(nn.Module):
    """weight = where(mask, original, 0): pruned entries are +0 whatever `original` holds."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, weight: Tensor) -> Tensor:
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


@contextmanager
def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Train `model` with `masks` held: inside the block each masked weight is a
    parametrization (`model.layer.weight` is the masked tensor; the stored parameter, the
    same object as before, is `model.layer.parametrizations.weight.original`). On exit the
    masked values are written back into the parameters, so pruned entries are exactly zero,
    and the model is plain again (its state_dict keys unchanged). So they are when the block
    raises: the model is left pruned, with what training gave its other entries."""
    check_module(model, "apply_masks's model")
    # every mask is checked before the first is held: a refusal leaves the model as it was
    _check_bool_masks(masks)
    modules = prunable_weights(model, masks) if masks else {}
    plan, planned = [], {}
    for name, mask in masks.items():
        module = modules[_weight_key(name)]
        if id(module) in planned:  # two masks held on one weight would apply their AND, unannounced
            raise PruningError(f"masks {planned[id(module)]!r} and {name!r} name the same weight; give one mask "
                               "per weight")
        planned[id(module)] = name
        if mask.shape != module.weight.shape:
            raise PruningError(f"masks[{name!r}] has shape {tuple(mask.shape)} but the weight has "
                               f"{tuple(module.weight.shape)}")
        if parametrize.is_parametrized(module, "weight"):
            raise PruningError(f"{name} is already parametrized; remove its parametrization before masking")
        plan.append((module, mask))
    done, entered = [], False
    try:
        for module, mask in plan:
            order = list(module._parameters)
            # laid out as the weight (empty_like keeps its strides): the masked weight of a
            # channels_last convolution stays channels_last, with no conversion at each forward
            held = torch.empty_like(module.weight, dtype=torch.bool).copy_(mask)
            parametrize.register_parametrization(module, "weight", _Mask(held))
            done.append((module, order))
        entered = True
        yield model
    finally:
        for module, order in done:  # masked values written back only once the block ran
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=entered)
            # torch registers the weight again after the bias: the parameters' order (what an
            # optimizer's state is matched by) and the state_dict's go back to the model's own
            params = module._parameters
            ordered = {name: params[name] for name in order if name in params}
            ordered.update(params)
            params.clear()
            params.update(ordered)


def masked_state_dict(state: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> StateDict:
    """A copy of `state` with the masked-out entries of each masked tensor set to zero. Each
    mask is a bool tensor of its entry's shape, under a key `state` has."""
    if not isinstance(state, Mapping):
        raise PruningError(f"masked_state_dict takes a state_dict (a mapping of tensors), got {type(state).__name__}")
    kinds = {type(v).__name__ for v in state.values() if not isinstance(v, Tensor)}
    if kinds:
        raise PruningError(f"masked_state_dict takes a state_dict of tensors, but it holds {sorted(kinds)}")
    _check_bool_masks(masks)
    for name, mask in masks.items():
        if name not in state:
            raise PruningError(f"masks[{name!r}] masks no entry of the state_dict (it has e.g. {list(state)[:3]})")
        if mask.shape != state[name].shape:  # a mask of another shape would broadcast, reshaping the entry
            raise PruningError(f"masks[{name!r}] has shape {tuple(mask.shape)} but the entry has "
                               f"{tuple(state[name].shape)}")
    masks = {**masks, **_masks_of_aliases(state, masks)}
    return {k: torch.where(masks[k].to(v.device), v, torch.zeros((), dtype=v.dtype)) if k in masks else v.clone()
            for k, v in state.items()}


def _masks_of_aliases(state: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The masks of the entries that are the same tensor as a masked one under another name (a
    layer used twice in a model, whose state_dict holds it once per use): masked under one
    name only, the unmasked copy would be loaded last and undo the pruning."""
    def identity(t: Tensor) -> tuple | None:
        if t.numel() == 0 or t.is_meta:
            return None
        return t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride()

    by_tensor: dict[tuple, list[str]] = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and (ident := identity(value)) is not None:
            by_tensor.setdefault(ident, []).append(key)
    out: dict[str, Tensor] = {}
    for names in by_tensor.values():
        masked = [n for n in names if n in masks]
        if not masked:
            continue
        for other in masked[1:]:
            if not torch.equal(masks[other].cpu(), masks[masked[0]].cpu()):
                raise PruningError(f"masks[{masked[0]!r}] and masks[{other!r}] differ, but the state_dict holds one "
                                   "tensor under both names; give it one mask")
        out.update({n: masks[masked[0]] for n in names if n not in masks})
    return out


def _check_sgd_options(options: Mapping[str, Any], error: type[Exception]) -> None:
    """Refuse lr, momentum or weight_decay set beside optimizer=: they configure the default SGD
    only, and the optimizer given would train without them."""
    if options.get("optimizer") is None:
        return
    defaults = inspect.signature(train_classifier).parameters
    if changed := [name for name in ("lr", "momentum", "weight_decay")
                   if name in options and options[name] != defaults[name].default]:
        raise error(f"train_classifier got optimizer= and {changed}, which set the default SGD only and would be "
                    "ignored; set them in the optimizer (e.g. optimizer=lambda params: torch.optim.AdamW(params, "
                    "lr=...)), or leave optimizer= out")


def _training_data(data: Dataset | tuple[Tensor, Tensor]) -> Dataset:
    """`data` as the map-style dataset train_classifier shuffles: a pair (x, y) of tensors, as
    tk.distill returns, becomes TensorDataset(x, y) (a DataLoader would take it for a dataset
    of two items)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise InvalidArgumentError(f"data is a pair of tensors of shapes {tuple(x.shape)} and {tuple(y.shape)}: "
                                       "as (inputs, labels) both need one entry per example along their first "
                                       "dimension")
        data = TensorDataset(x, y)
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        raise InvalidArgumentError(f"train_classifier shuffles a map-style dataset, and a {type(data).__name__} has "
                                   "no length to shuffle or schedule by; pass a Dataset with __getitem__ and __len__ "
                                   "(a TensorDataset, a list of pairs, a pair (x, y) of tensors), or give imp a "
                                   "train_fn of your own")
    if len(data) == 0:
        # an empty loader made no step at all and left the model silently untrained
        raise InvalidArgumentError(f"data is empty ({type(data).__name__} of length 0); pass a dataset with at "
                                   "least one (input, label) pair")
    return data


def train_classifier(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor],
    epochs: int = 10,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 64,
    seed: int | None = None,
    schedule: str = "cosine",
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> None:
    """The default training loop over (inputs, labels, ...) items (inputs a tensor, or any
    batch the model takes as its one argument) or mappings of the model's keyword arguments
    with a "labels" entry, as Hugging Face datasets give: cross-entropy of the model's logits (or of a Hugging Face
    ModelOutput's `.logits`), SGD with `lr`, `momentum` and `weight_decay`, or `optimizer(params)`
    (then those three are refused: set them in the optimizer), a cosine or
    constant learning rate, data shuffled by `seed` (the SGD noise; an int seeds
    the shuffling and every other draw of the training, such as dropout's, and leaves torch's
    global RNG as it was; None draws from torch's global RNG). For a model with BatchNorm
    layers, a last batch of one example is left out of each epoch. `data` may also be a pair
    (x, y) of tensors, as tk.distill's distribution_matching returns."""
    check_module(model, "train_classifier's model")
    _check_sgd_options(dict(optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay),
                       InvalidArgumentError)
    if schedule not in ("cosine", "constant"):
        raise InvalidArgumentError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    # a NaN or infinite rate trained every weight to NaN without a word
    if not real("lr", lr) > 0:
        raise InvalidArgumentError(f"lr must be > 0, got {lr}")
    for name, value in (("momentum", momentum), ("weight_decay", weight_decay)):
        if not real(name, value) >= 0:
            raise InvalidArgumentError(f"{name} must be >= 0, got {value}")
    integer("epochs", epochs, 1)
    integer("batch_size", batch_size, 1)
    if next(model.parameters(), None) is None:
        raise InvalidArgumentError(f"{type(model).__name__} has no parameters to train")
    data = _training_data(data)
    device = next(model.parameters()).device
    if optimizer is not None and not callable(optimizer):
        raise InvalidTypeError(f"train_classifier's optimizer must be a factory, params -> optimizer (e.g. lambda p: "
                               f"torch.optim.AdamW(p, lr=1e-3)), got {type(optimizer).__name__}")
    opt = (optimizer(model.parameters()) if optimizer is not None else
           torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay))
    if not isinstance(opt, torch.optim.Optimizer):
        raise InvalidTypeError(f"train_classifier's optimizer factory returned {type(opt).__name__}, not a "
                               "torch.optim.Optimizer; return the optimizer it builds (e.g. lambda p: "
                               "torch.optim.AdamW(p, lr=1e-3))")
    # a last batch of one example would stop a train-mode BatchNorm layer (torch refuses to
    # normalise one value per channel); it is left out of each epoch instead
    has_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    drop_last = has_norm and len(data) > 1 and len(data) % batch_size == 1
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator(seed), drop_last=drop_last)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader)) if schedule == "cosine"
             else None)
    model.train()
    # an int seed covers every draw of the training (dropout's too), not the order alone
    with seeded(seed), batch_of_one_named("train_classifier"):
        for _ in range(epochs):
            for batch in loader:  # (inputs, labels, ...): what follows the labels (weights, ids) is not used
                args, kwargs, labels = split_batch(batch, device)
                opt.zero_grad()
                with layout_named(model, args, kwargs, SPLIT_BATCH_FIX):
                    outputs = model(*args, **kwargs)
                classification_metric(outputs, labels)[0].backward()  # logits or a ModelOutput's
                opt.step()
                if sched is not None:
                    sched.step()


def classification_train_fn(data: Dataset | tuple[Tensor, Tensor], epochs: int = 10, seed: int | None = None,
                            **kwargs: Any) -> TrainFn:
    """A train_fn for `imp`: `train_classifier(model, data, epochs, seed=seed, **kwargs)` in
    every round (with an int seed, the same data order each round, as IMP usually does;
    None shuffles from torch's global RNG). A keyword train_classifier does not take, or lr,
    momentum or weight_decay beside optimizer=, is refused here, before imp writes anything."""
    check_seed(seed)
    # a misspelt option would otherwise surface as a TypeError only once round 0 runs, after imp wrote its files
    allowed = [name for name in inspect.signature(train_classifier).parameters if name not in
               ("model", "data", "epochs", "seed")]
    if unknown := sorted(set(kwargs) - set(allowed)):
        raise PruningError(f"classification_train_fn got {unknown}, which train_classifier does not take; its "
                           f"options are {allowed}")
    _check_sgd_options(kwargs, PruningError)
    data = _training_data(data)  # refused here, before imp writes anything

    def train_fn(model: nn.Module, round: int) -> None:
        train_classifier(model, data, epochs=epochs, seed=seed, **kwargs)

    return train_fn


@contextmanager
def _capture_after_steps(model: nn.Module, steps: int) -> Iterator[dict]:
    """Snapshot model.state_dict() after the `steps`-th optimizer.step() on the model's
    parameters (any torch.optim optimizer: a global step hook, so any training loop works)."""
    ids = {id(p) for p in model.parameters()}
    holder: dict = {"count": 0}

    def hook(opt: torch.optim.Optimizer, args, kwargs) -> None:
        if not any(id(p) in ids for group in opt.param_groups for p in group["params"]):
            return
        holder["count"] += 1
        if holder["count"] == steps:
            holder["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield holder
    finally:
        handle.remove()


def _clone_state(model: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _shapes(state: Mapping[str, Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


@dataclass
class IMPResult:
    """What `imp` found. Round 0 is the dense model (all-True masks)."""

    out_dir: Path
    masks: list[Masks]
    sparsity: list[float]
    rewind: str | int
    files: list[dict[str, str]] = field(default_factory=list)

    def rewound(self, round: int) -> StateDict:
        """The weights round `round` started training from (the rewind point, masked)."""
        return _read_round(self.out_dir / self.files[self._round(round)]["rewound"])

    def trained(self, round: int) -> StateDict:
        """The weights after round `round`'s training (exactly zero where pruned)."""
        return _read_round(self.out_dir / self.files[self._round(round)]["trained"])

    def _round(self, round: int) -> int:
        # a negative index would read a round from the end, which is not what "round -1" means
        if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round < len(self.files):
            raise PruningError(f"round must be an int from 0 to {len(self.files) - 1} (the rounds this run "
                               f"finished), got {round!r}")
        return round

    def rewind_state(self) -> StateDict:
        """The unmasked rewind point: the initialisation or the weights after k steps."""
        return _read_round(self.out_dir / "rewind.safetensors")

    def to_dict(self) -> dict[str, Any]:
        """The run as JSON-safe data: the directory, the rewind point, each round's sparsity
        and files (relative to out_dir). The masks themselves are in those files."""
        return dict(out_dir=str(self.out_dir), rewind=self.rewind, sparsity=[float(s) for s in self.sparsity],
                    files=[dict(f) for f in self.files])


def _check_args(rounds: int, rate: float, rewind: str | int, scope: str) -> None:
    integer("rounds", rounds, 1, "pruning rounds after the dense round 0", PruningError)
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 < rate < 1.0:
        raise PruningError(f"rate must lie in (0, 1): the fraction of the remaining weights removed per round, "
                           f"got {rate!r}")
    if not (rewind == "init" or (isinstance(rewind, int) and not isinstance(rewind, bool) and rewind >= 0)):
        raise PruningError(f"rewind must be 'init' or a step count k >= 0 (the weights after k optimizer steps "
                           f"of round 0), got {rewind!r}")
    if scope not in ("global", "layer"):
        raise PruningError(f"scope must be 'global' or 'layer', got {scope!r}")


def _start_over(out: Path) -> str:
    return f"delete {str(out)!r} to start the run over, or pass a fresh out_dir"


def _read_manifest(path: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """imp.json of an earlier run, checked: the same settings (else PruningError), and a
    round count that its sparsity and file lists match (else CheckpointError)."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {why}, so it is not the resume state imp() writes; {_start_over(path.parent)}")

    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise corrupt(f"cannot be read as JSON ({exc})") from exc
    except RecursionError:  # imp() writes a flat object: nesting this deep is not its file
        raise corrupt("is nested too deeply to be read as JSON") from None
    if not isinstance(manifest, dict):
        raise corrupt(f"holds a JSON {type(manifest).__name__}, not an object")
    for key, value in settings.items():
        if manifest.get(key) != value:
            raise PruningError(f"{path.parent} holds an IMP run with {key}={manifest.get(key)!r}, but this call has "
                               f"{value!r}; resume with the same model and settings, or use a new out_dir")
    done, files, fractions = manifest.get("done"), manifest.get("files"), manifest.get("sparsity")
    if isinstance(done, bool) or not isinstance(done, int) or not isinstance(files, list) or \
            not isinstance(fractions, list):
        raise corrupt("'done' is not an int or 'files' / 'sparsity' are not lists")
    if not (done + 1 == len(files) == len(fractions)):
        raise corrupt(f"'done'={done} needs {done + 1} rounds, but it lists {len(files)} round files and "
                      f"{len(fractions)} sparsities")
    kinds = ("mask", "rewound", "trained")
    for entry in files:  # plain names inside out_dir, nothing that reaches outside it
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and Path(entry[k]).name == entry[k]
                                                  and entry[k] not in ("", ".", "..") for k in kinds):
            raise corrupt(f"round file entry {entry!r} is not {{{', '.join(kinds)}}} -> file name")
    return manifest


def _read_round(path: Path) -> StateDict:
    """A file imp() wrote, keyed as written: the keys of the model's own state_dict, which
    load_state_dict would unwrap (a DataParallel or compiled model's `module.`/`_orig_mod.`)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return safetensors.torch.load_file(str(path))
    except (OSError, safetensors.SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot be read as the safetensors file imp() writes ({exc})") from exc


def _round_file(path: Path, shapes: Mapping[str, list[int]], mask: bool) -> StateDict:
    """A round file of an earlier run, checked against what imp() writes: exactly the keys and
    shapes of `shapes`, bool masks, finite weights. A file that passed would otherwise change
    the next round's pruning or the weights it rewinds to without any error."""
    state = _read_round(path)
    missing, extra = [k for k in shapes if k not in state], sorted(k for k in state if k not in shapes)
    if missing or extra:
        raise CheckpointError(f"{path}: lacks the keys {missing}" if missing else f"{path}: holds keys {extra} "
                              f"that this run does not have")
    for key, want in shapes.items():
        value = state[key]
        if list(value.shape) != list(want):
            raise CheckpointError(f"{path}: {key!r} has shape {tuple(value.shape)}, but this run's is {tuple(want)}")
        if mask and value.dtype != torch.bool:
            raise CheckpointError(f"{path}: mask {key!r} is {value.dtype}, not the torch.bool mask imp() writes")
        if not mask and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: {key!r} holds NaN or Inf")
    return state


def _resume(out: Path, settings: dict, model: nn.Module) -> tuple[dict, list[Masks], StateDict | None]:
    """The manifest, masks and rewind state of an earlier run with these settings in `out`
    (the model loaded with its last trained round), or a fresh start's."""
    manifest_path = out / _MANIFEST
    if not manifest_path.exists():
        return dict(settings, done=-1, sparsity=[], files=[]), [], None
    manifest = _read_manifest(manifest_path, settings)
    rewind_state = None
    shapes = settings["shapes"]
    mask_shapes = {name: list(m.weight.shape) for name, m in prunable_weights(model, settings["layers"]).items()}
    try:
        masks = [_round_file(out / f["mask"], mask_shapes, mask=True) for f in manifest["files"]]
        if manifest["done"] >= 0:
            trained = _round_file(out / manifest["files"][-1]["trained"], shapes, mask=False)
            rewind_state = _round_file(out / "rewind.safetensors", shapes, mask=False)
            model.load_state_dict(trained)  # once every file passed: a refused resume leaves the model alone
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; the IMP run cannot resume: {_start_over(out)}") from exc
    if manifest["done"] >= 0:
        # the settings above are checked; what train_fn does (its epochs, its seed) cannot be
        warn_at_caller(f"tk.prune.imp: resuming the run in {str(out)!r} after round {manifest['done']}, whose rounds "
                       "are the earlier run's files; train_fn must train as it did then (imp cannot check it), or "
                       f"{_start_over(out)}", UserWarning)
    return manifest, masks, rewind_state


def imp(
    model: nn.Module,
    train_fn: TrainFn,
    rounds: int,
    rate: float = 0.2,
    rewind: str | int = "init",
    out_dir: str | os.PathLike = "imp",
    scope: str = "global",
    layers: Iterable[str] | None = None,
    progress: bool | None = None,
) -> IMPResult:
    """Iterative magnitude pruning with rewinding; see the module docstring.

    `rounds` counts the prunings after the dense round 0: round r trains with a mask that
    leaves (1 - rate)^r of the prunable weights (`rounds + 1` trainings in all). `scope`
    "global" ranks all prunable weights together, "layer" each tensor on its own; `layers`
    keeps only the named ones of `prunable_weights(model)`. Each round's files are written
    under `out_dir`; `progress` shows a bar (None: where stderr is a terminal).

    `train_fn(model, round)` trains `model` in place (round 0 dense, then with the round's
    mask held by `apply_masks`); `classification_train_fn` gives one. `rewind` is "init" or
    k: the state after the k-th `optimizer.step()` of round 0 (counted over any torch.optim
    optimizer holding the model's parameters). Rewinding restores the whole state_dict
    (BatchNorm statistics too) and zeroes the pruned weights. `model` ends holding the last
    round's trained weights. With files of an earlier run with the same settings in
    `out_dir`, the run resumes after its last finished round; an `out_dir` that cannot be a
    directory raises OutputError, an unreadable or inconsistent imp.json (or a round file it
    names) CheckpointError, and different settings PruningError.
    """
    check_module(model, "imp's model")
    _check_args(rounds, rate, rewind, scope)
    rate = float(rate)  # numpy's floats too; the settings are written as JSON
    if not callable(train_fn):  # checked before round 0's files are written
        raise PruningError(f"train_fn must be callable as train_fn(model, round), got {type(train_fn).__name__}; "
                           "tk.prune.classification_train_fn(data) gives one")
    path_without_nul(out_dir, "imp's out_dir", OutputError)
    names = list(prunable_weights(model, layers))
    if meta := [name for name, t in model.state_dict().items() if t.is_meta]:  # before out_dir is made
        raise PruningError(f"{meta[0]} is on the meta device and holds no values to train, prune or save; load the "
                           "model's weights (e.g. model.to_empty(device='cpu') and load_state_dict) before imp")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file at out_dir or above it, no permission, a read-only file system
        raise OutputError(f"out_dir {str(out)!r} cannot be made a directory ({exc.strerror or exc}); pass an "
                          f"out_dir that is a directory or does not exist yet") from exc
    # one run at a time: a second one would write its rounds over this one's and mix them
    with directory_held(out, "tk.prune.imp run"):
        settings = dict(rate=rate, rewind=rewind, scope=scope, layers=names, shapes=_shapes(model.state_dict()))
        manifest_path = out / _MANIFEST
        init = _clone_state(model)
        manifest, masks, rewind_state = _resume(out, settings, model)
        for r in progress_bar(range(manifest["done"] + 1, rounds + 1), enabled=progress, desc="IMP", unit="round",
                              leave=True):
            written: list[Path] = []
            try:
                rewind_state = _imp_round(model, train_fn, r, out, names, settings, init, masks, rewind_state, rewind,
                                          scope, written)
                files = {kind: f"round_{r:02d}_{kind}.safetensors" for kind in ("mask", "rewound", "trained")}
                finished = {**manifest, "done": r, "sparsity": [*manifest["sparsity"], sparsity(masks[-1])],
                            "files": [*manifest["files"], files]}
                write_json(manifest_path, finished)
                manifest = finished
            except BaseException:
                # a round that did not finish leaves nothing: the model as after the last finished
                # round, read back from its file (round 0: as it came, so that imp() run again here
                # starts from the same init), and none of the round's files, unless imp.json names
                # them (an interruption after its rename)
                del masks[manifest["done"] + 1:]
                with contextlib.suppress(Exception):
                    model.load_state_dict(init if r == 0 else _read_round(out / manifest["files"][-1]["trained"]))
                if not _manifest_names_round(manifest_path, r):
                    for path in written:
                        with contextlib.suppress(OSError):
                            path.unlink()
                raise
            logger.info("IMP round %d: sparsity %.4f", r, manifest["sparsity"][-1])
        if manifest["done"] > rounds:  # an earlier run went further: report the rounds asked for
            model.load_state_dict(_read_round(out / manifest["files"][rounds]["trained"]))
        keep = rounds + 1
        return IMPResult(out, masks[:keep], manifest["sparsity"][:keep], rewind, manifest["files"][:keep])


def _manifest_names_round(path: Path, r: int) -> bool:
    """Whether the imp.json at `path` records round `r` as done."""
    try:
        return json.loads(path.read_text()).get("done", -1) >= r
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def _imp_round(model: nn.Module, train_fn: Callable[[nn.Module, int], Any], r: int, out: Path, names: list[str],
               settings: dict[str, Any], init: dict[str, Tensor], masks: list[dict[str, Tensor]],
               rewind_state: dict[str, Tensor] | None, rewind: str | int, scope: str,
               written: list[Path]) -> dict[str, Tensor] | None:
    """IMP's round `r`: prune (round 0: no mask), rewind, train under the mask and save the
    round's files, each added to `written` as its write begins. Appends the round's mask to
    `masks` and returns the rewind state (set by round 0)."""
    if r == 0:
        mask = {n: torch.ones(m.weight.shape, dtype=torch.bool, device=m.weight.device)
                for n, m in prunable_weights(model, names).items()}
        start = init
    else:
        mask = global_magnitude_masks(model, settings["rate"], masks=masks[-1], layers=names, scope=scope)
        # a layer used twice is one tensor under two names: rewind_state's copies no longer
        # share it, so the model's own state_dict tells which entries the mask covers too
        start = masked_state_dict(rewind_state, {**mask, **_masks_of_aliases(model.state_dict(), mask)})
    model.load_state_dict(start)

    def save(state: Mapping[str, Tensor], name: str) -> None:
        written.append(out / name)  # before the write: one cut short may have replaced an earlier run's file
        save_state_dict(state, out / name)

    save(mask, f"round_{r:02d}_mask.safetensors")
    save(start, f"round_{r:02d}_rewound.safetensors")
    capture_steps = rewind if r == 0 and isinstance(rewind, int) and rewind > 0 else 0
    layers_before = prunable_weights(model, names)
    with apply_masks(model, mask if r > 0 else {}), _capture_after_steps(model, capture_steps) as captured:
        train_fn(model, r)
    trained = _clone_state(model)
    for key, shape in settings["shapes"].items():
        if key not in trained or list(trained[key].shape) != shape:
            got = tuple(trained[key].shape) if key in trained else "missing"
            raise PruningError(f"train_fn changed the model in round {r}: {key!r} was {tuple(shape)}, is now "
                               f"{got}; train_fn must train the weights in place, not replace layers")
    replaced = [n for n, m in prunable_weights(model, names).items() if m is not layers_before.get(n)]
    if replaced:  # a new layer of the same shape would hold weights no mask ever reached
        raise PruningError(f"train_fn replaced the layer of {replaced[0]} in round {r}; train_fn must train the "
                           "model's own layers in place, which the masks are held on")
    if r == 0:
        if capture_steps and "state" not in captured:
            raise PruningError(f"rewind={rewind}, but round 0 made only {captured['count']} optimizer steps; "
                               f"rewind to an earlier step or train longer")
        rewind_state = captured["state"] if capture_steps else init
        save(rewind_state, "rewind.safetensors")
    save(trained, f"round_{r:02d}_trained.safetensors")
    masks.append(mask)
    return rewind_state


__all__ = [
    "IMPResult",
    "PruningError",
    "apply_masks",
    "classification_train_fn",
    "global_magnitude_masks",
    "imp",
    "masked_state_dict",
    "prunable_weights",
    "sparsity",
    "train_classifier",
]
