"""Checkpoints and evaluation: what interpolation and planes share.

A checkpoint is a state_dict or a path (io.load_state_dict reads every format the package
does). Every model runs through torch.func.functional_call with the weights under study:
the model's own parameters are never written, and its buffers (BatchNorm statistics) are
restored when a call returns (`preserved`).

BatchNorm, the `bn` argument. A point between two networks needs BatchNorm statistics of
its own: "recompute" (the default) re-estimates them at every point with update_bn's
semantics (reset, momentum None, one pass in train mode over `bn_data`, which defaults to
`data`); "interpolate" mixes the checkpoints' running statistics with the weights'
coefficients, as the code of McDermott & Cummings (arXiv 2310.18769) does, for comparison;
"none" uses the model's buffers as they are.

Batches. `data` yields (inputs, targets, ...) tuples or lists, whose inputs are the model's
one argument (a mapping of tensors too, moved to the device as one argument, as update_bn
and `twa fit` feed it), or mappings (Hugging Face batches), fed whole as keyword arguments
as update_bn feeds them, whose "labels" entry is the targets. The metric gets the model's
output as it is; the default, classification_metric, reads a Hugging Face ModelOutput
through its `.logits`.

Checkpoint keys are matched to the model's names as io.keys says: wrapper prefixes
(`module.`, `_orig_mod.`), a LightningModule's `model.`, tied weights under any of their
names.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from twa_kernels._checks import check_batches, check_materialized
from twa_kernels._passes import kept_modes
from twa_kernels.batchnorm import (
    NonFiniteStatisticsError, feed_batch, holds_statistics, layout_named, measured_norms, running_norms, update_bn)
from twa_kernels.errors import InvalidArgumentError, InvalidTypeError
from twa_kernels.io import (
    CheckpointError,
    StateDict,
    check_finite,
    fill_tied_keys,
    load_state_dict,
    match_names,
    model_key_names,
    parameter_aliases,
    strip_wrapper_prefixes,
    unwrap_state_dict,
    warn_unmatched_keys,
)

Checkpoint = str | os.PathLike | Mapping[str, Tensor]
Metric = Callable[[Any, Tensor], tuple[Tensor, Tensor]]
BN_MODES = ("recompute", "interpolate", "none")
_BN_STATS = ("running_mean", "running_var")


def _check_labels(logits: Tensor, targets: Tensor) -> None:
    # cross_entropy reads a [N, C, T] input as C classes of T positions, raises a bare
    # IndexError for a label out of range (a device-side assert on a GPU, which ends the
    # process's CUDA use) and skips -100 in the loss while argmax counted it an error
    if logits.dim() != 2 or not isinstance(targets, Tensor) or targets.shape != logits.shape[:1]:
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise InvalidArgumentError(f"classification_metric takes logits [N, C] and labels [N], got logits "
                                   f"{tuple(logits.shape)} and labels {shape}; for outputs of another shape "
                                   "(e.g. one prediction per token) pass a metric of your own")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise InvalidArgumentError(f"labels must be integer class ids, got {targets.dtype}")
    if targets.numel() and not bool(((targets >= 0) & (targets < logits.shape[1])).all()):
        bad = targets[(targets < 0) | (targets >= logits.shape[1])][0].item()
        raise InvalidArgumentError(f"label {bad} is not a class of these {logits.shape[1]} logits; labels must lie "
                                   f"in [0, {logits.shape[1] - 1}] (an ignored label such as -100 cannot be "
                                   "counted right or wrong)")


def classification_metric(outputs: Tensor | Any, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy, top-1 error fraction) of a batch of logits [N, C] and labels [N];
    a row holding NaN or infinity is counted wrong.
    `outputs` is the logits, or a model output that holds them as `.logits` (a Hugging Face
    ModelOutput, e.g. of a ...ForSequenceClassification model)."""
    logits = outputs if isinstance(outputs, Tensor) else getattr(outputs, "logits", None)
    if not isinstance(logits, Tensor):
        raise InvalidTypeError(f"classification_metric takes logits [N, C], or a model output with a .logits tensor "
                               f"(a Hugging Face ModelOutput), got {type(outputs).__name__}; pass a metric(outputs, "
                               "targets) -> (mean loss, error fraction) that reads this model's output")
    _check_labels(logits, targets)
    # a row whose logits are not all finite is an error: argmax takes a NaN for the largest
    # value, so weights that overflow would otherwise be right wherever the label is the NaN's index
    wrong = (logits.argmax(dim=1) != targets) | ~torch.isfinite(logits).all(dim=1)
    return F.cross_entropy(logits, targets.long()), wrong.float().mean()  # int32 labels (numpy's) too


def load_checkpoint(checkpoint: Checkpoint, source: str, model: nn.Module | None = None) -> StateDict:
    """The checkpoint's state_dict; given `model`, its keys matched to the model's names (see
    the module docstring). A NaN or Inf in what is returned is refused, naming the
    checkpoint and the key."""
    state = unwrap_state_dict(checkpoint, source) if isinstance(checkpoint, Mapping) else load_state_dict(checkpoint)
    if model is not None:
        state = fill_tied_keys(match_names(state, model.state_dict().keys(), source), parameter_aliases(model), source)
        warn_unmatched_keys({key: (value.dtype, value.shape) for key, value in state.items()}, model_key_names(model),
                            source)
    check_finite(state, source)
    return state


def checkpoint_label(checkpoint: Checkpoint, index: int) -> str:
    """A short label for plots: the file's stem, or the checkpoint's position."""
    return printable(Path(checkpoint).stem) if isinstance(checkpoint, (str, os.PathLike)) else f"checkpoint #{index}"


def checkpoint_labels(checkpoints: Sequence[Checkpoint]) -> list[str]:
    """checkpoint_label of each, made distinct: two runs' `final.pt` are told apart by their
    folders (`run_a/final`, `run_b/final`), and by their position where those agree too.
    A table, figure or JSON keyed by label would otherwise keep one of the two."""
    stems = [checkpoint_label(c, i) for i, c in enumerate(checkpoints)]
    labels = [printable(f"{Path(c).parent.name}/{stem}") if stems.count(stem) > 1
              and isinstance(c, (str, os.PathLike)) and Path(c).parent.name else stem
              for c, stem in zip(checkpoints, stems)]
    return [f"{label} #{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def finite_or_none(values: Any) -> Any:
    """`values` (a float or nested lists of them) with NaN and infinities as None: JSON has
    no such numbers (Python writes a bare NaN that strict readers refuse), and a diverged
    point of a line or plane reads as null."""
    if isinstance(values, (list, tuple)):
        return [finite_or_none(v) for v in values]
    return values if math.isfinite(values) else None


def printable(name: str) -> str:
    """`name` as text that can be drawn and written: a file name that is not UTF-8 decodes
    to lone surrogates (Python's surrogateescape), which matplotlib and JSON refuse; they
    become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def checkpoint_source(checkpoint: Checkpoint, index: int) -> str:
    """The checkpoint's name in error messages: its path, or its position."""
    return str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else f"checkpoint #{index}"


def checked_entry(state: Mapping[str, Tensor], key: str, shape: tuple[int, ...], source: str) -> Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r} that the model has (it has {len(state)} keys, e.g. "
                              f"{list(state)[:3]}); was it saved from this model?")
    value = state[key]
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"{source}: key {key!r} has shape {tuple(value.shape)} but the model's is "
                              f"{tuple(shape)}; the checkpoints must come from one architecture")
    return value


def mixable(t: Tensor) -> bool:
    """Whether a point between checkpoints mixes this entry (floating point or complex: a
    complex number mixes as its two real parts do), or takes it as every checkpoint holds it."""
    return t.is_floating_point() or t.is_complex()


def mixed_buffers(model: nn.Module, bn: str) -> dict[str, Tensor]:
    """The model's floating-point buffers that a point of a line or plane mixes from the
    checkpoints, by name: every one its state_dict holds but the BatchNorm statistics that
    `bn` measures ("recompute": the layers update_bn measures; a layer that model.train()
    leaves in eval mode keeps the checkpoints' statistics) or takes from the model ("none").
    Non-persistent buffers (a rotary embedding's inv_freq) are in no checkpoint: the model's
    own are used."""
    persistent = model.state_dict().keys()
    measured = set(measured_norms(model)) if bn == "recompute" else set()
    own_statistics = {f"{name}.{stat}" if name else stat for name, m in running_norms(model).items()
                      if bn == "none" or name in measured for stat in _BN_STATS}
    return {name: buf for name, buf in model.named_buffers()
            if name in persistent and mixable(buf) and name not in own_statistics}


def fixed_buffers(model: nn.Module) -> dict[str, Tensor]:
    """The model's integer and bool buffers that its state_dict holds (a channel permutation,
    a token map), but BatchNorm's batch counts: a point takes them from the checkpoints,
    which must agree on them (they cannot be mixed)."""
    persistent = model.state_dict().keys()
    return {name: buf for name, buf in model.named_buffers()
            if name in persistent and not mixable(buf) and not name.endswith("num_batches_tracked")}


def agreed_buffer(name: str, values: Sequence[Tensor], sources: Sequence[str]) -> Tensor:
    """The one value of an integer or bool buffer (or parameter) that every checkpoint holds,
    or a CheckpointError naming the first that differs."""
    for value, source in zip(values[1:], sources[1:]):
        if not torch.equal(value, values[0]):
            if value.is_complex():  # only a plane fixes these: its basis holds real weights
                raise CheckpointError(f"{source}: the complex parameter {name!r} differs from the one in "
                                      f"{sources[0]}, and a plane's basis holds real weights only: "
                                      "tk.connectivity.interpolate mixes complex ones, or give the model real "
                                      "parameters (two real tensors, or a real one viewed with torch.view_as_complex)")
            raise CheckpointError(f"{source}: the integer entry {name!r} ({values[0].dtype}) differs from the one in "
                                  f"{sources[0]}; integer and bool buffers and parameters cannot be mixed: save the "
                                  "checkpoints with the same values")
    return values[0]


def parameter_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters; a model without any has no weights to move
    along a line or a plane, and one whose tensors hold no values yet (meta, lazy) cannot
    be run: both are named."""
    first = next(model.parameters(), None)
    if first is None:
        raise InvalidArgumentError(f"{type(model).__name__} has no parameters: there are no weights to interpolate, "
                                   "project or differentiate; pass the network whose checkpoints these are")
    check_materialized(model, type(model).__name__)
    return first.device


# Points of a line or a plane: each is one evaluation of the model over the data, and the
# results are held in memory, so counts past this are refused up front (a line of 10**11
# alphas was allocated before the first evaluation, until the process was killed).
MAX_POINTS = 10**6


def check_points(what: str, count: int) -> None:
    """Refuse more than MAX_POINTS evaluation points, naming the argument to lower."""
    if count > MAX_POINTS:
        raise InvalidArgumentError(f"{what} asks for {count:,} points, each a full evaluation of the model on the "
                                   f"data; at most {MAX_POINTS:,} are taken (a few dozen draw a smooth curve)")


def check_data(what: str, data: object) -> None:
    """Refuse anything but an iterable of batches where `what` ("interpolate's data") belongs:
    None failed in a loop deep inside, a tensor would be read one example at a time."""
    check_batches(what, data, "(inputs, targets) batches")


def check_bn(bn: str) -> None:
    if bn not in BN_MODES:
        raise InvalidArgumentError(f"bn must be one of {BN_MODES}, got {bn!r}")


def check_masks(model: nn.Module, masks: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """The masks by the parameters' named_parameters() names, cast to their dtype and device.
    A tied parameter's mask may be given under any of its names (io.parameter_aliases);
    masks given under two of them must agree."""
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise InvalidTypeError(f"masks must map parameter names to masks (as tk.prune gives them), got "
                               f"{type(masks).__name__}")
    params = dict(model.named_parameters())
    canonical = {alias: name for name, aliases in parameter_aliases(model).items() for alias in aliases}
    out: dict[str, Tensor] = {}
    given: dict[str, str] = {}
    for key, mask in masks.items():
        # masks of a compiled or DDP-wrapped model carry its wrapper's prefix; the model is read unwrapped
        name = canonical.get(key, canonical.get(strip_wrapper_prefixes(key)))
        if name is None:
            raise InvalidArgumentError(f"mask for {key!r}: the model has no such parameter (e.g. {list(params)[:3]})")
        if not isinstance(mask, Tensor):
            raise InvalidTypeError(f"mask for {key!r} must be a tensor of 0s and 1s, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise InvalidArgumentError(f"mask for {key!r} has shape {tuple(mask.shape)} but the parameter's is "
                             f"{tuple(params[name].shape)}")
        if mask.is_complex():  # multiplied into real weights, its imaginary part would be dropped
            raise InvalidArgumentError(f"mask for {key!r} is {mask.dtype}; pass a bool mask (tk.prune's masks are)")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            # a mask multiplies the weights: a NaN spoils every point, another value rescales them
            raise InvalidArgumentError(f"mask for {key!r} holds values other than 0 and 1; pass a bool mask "
                                       "(tk.prune's masks are)")
        mask = mask.to(device=params[name].device, dtype=params[name].dtype)
        if name in out and not torch.equal(out[name], mask):
            raise InvalidArgumentError(f"masks for {given[name]!r} and {key!r} differ, but both names are one tied "
                                       "tensor; give one mask for it, under either name")
        out[name], given[name] = mask, given.get(name, key)
    return out


# what the error for a batch the model's forward does not take, fed as split_batch reads it, says to do
SPLIT_BATCH_FIX = ("yield (inputs, targets) batches, whose inputs are fed as one argument, or mappings of the "
                   "forward's keyword arguments with a 'labels' entry, which the forward must take too (as Hugging "
                   "Face models do)")


def split_batch(batch: Any, device: torch.device) -> tuple[tuple[Any, ...], dict[str, Any], Tensor]:
    """(args, kwargs, targets) of one batch, on `device` (see the module docstring): an
    (inputs, targets, ...) tuple or list gives ((inputs,), {}, targets), inputs that are a
    mapping of tensors included (one argument, its tensors moved); a mapping gives ((), the
    whole mapping, its "labels"), as update_bn feeds them. Targets carry the batch
    dimension (batches are weighted by its size)."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        inputs, targets = batch[0], batch[1]
        if isinstance(inputs, Mapping) or callable(getattr(inputs, "to", None)):
            args, kwargs = (_on_device(inputs, device),), {}
        else:
            raise InvalidArgumentError(f"a batch's inputs are a {type(inputs).__name__}; data must yield (inputs, "
                                       "targets) batches whose inputs are a tensor or a mapping of tensors, "
                                       "or mappings of keyword arguments with a 'labels' tensor (Hugging Face batches)")
    elif isinstance(batch, Mapping):
        if not isinstance(batch.get("labels"), Tensor):
            raise InvalidArgumentError(f"a mapping batch is fed to the model as keyword arguments and its 'labels' "
                                       f"tensor is the targets; this one has none (keys {list(batch)}): add the "
                                       "targets under 'labels', or yield (inputs, targets) tuples")
        args, kwargs = (), _on_device(batch, device)
        targets = kwargs["labels"]
    else:
        raise InvalidArgumentError(f"data must yield (inputs, targets) batches, or mappings of keyword arguments "
                                   f"with a 'labels' tensor (Hugging Face batches), got {type(batch).__name__}")
    if not isinstance(targets, Tensor) or targets.dim() == 0:
        got = "a 0-d tensor" if isinstance(targets, Tensor) else type(targets).__name__
        raise InvalidArgumentError(f"a batch's targets must be a tensor with a batch dimension, got {got}; give one "
                                   "example as a batch of one (x[None], y[None]), or batch the data with a DataLoader")
    return args, kwargs, targets.to(device)


def _on_device(inputs: Any, device: torch.device) -> Any:
    """A model's inputs on `device`: a tensor (or a PackedSequence, or a mapping with a .to
    such as transformers' BatchEncoding) moved by its own .to, another mapping's tensors
    moved into a dict (one argument, as update_bn and `twa fit` feed it, or keyword
    arguments; one already there is left as it is), anything else as it is."""
    if callable(getattr(inputs, "to", None)):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        if all(v.device == device for v in inputs.values() if isinstance(v, Tensor)):
            return inputs
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return inputs


# the geometry tools take no call_fn: a model that needs its batch fed otherwise is wrapped
_WRAP_FIX = ("wrap the model in a module whose forward takes a batch's first element (or a mapping's entries as "
             "keyword arguments) and runs it")


def fed_on(device: torch.device) -> Callable[[nn.Module, Any], None]:
    """An update_bn call_fn that feeds a batch as update_bn would, its inputs on `device`
    first, as the evaluation after the pass reads them (split_batch): a model on a GPU
    takes a loader's CPU batches in both."""

    def feed(model: nn.Module, batch: Any) -> None:
        if isinstance(batch, (list, tuple)) and batch:
            batch = (_on_device(batch[0], device), *batch[1:])  # the rest is not fed: left where it is
        else:
            batch = _on_device(batch, device)
        feed_batch(model, batch, _WRAP_FIX)

    return feed


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore the model's buffers and train/eval mode on exit: BatchNorm recomputation
    writes the buffers, and callers must get their model back as it was."""
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    with kept_modes(model):  # per submodule: a frozen BatchNorm in eval mode stays so
        try:
            yield
        finally:
            with torch.no_grad():
                for name, buf in model.named_buffers():
                    buf.copy_(saved[name])


class SameBatches:
    """Every pass over a shuffling loader draws the batches of the first: the random state
    its order comes from (torch's global CPU generator, the GPUs' when CUDA is in use, and
    the generators the loader and its samplers hold) is taken once and put back before each
    pass. Recomputed at every point of a line or plane, BatchNorm statistics from a new
    shuffle each time made the barrier of a model with itself nonzero. The caller's random
    state is as it was after each pass."""

    def __init__(self, data: Iterable):
        found: dict[int, torch.Generator] = {}
        for holder in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None),
                       getattr(getattr(data, "batch_sampler", None), "sampler", None)):
            generator = getattr(holder, "generator", None)
            if isinstance(generator, torch.Generator):
                found[id(generator)] = generator
        self._generators = list(found.values())
        self._states = [g.get_state() for g in self._generators]
        self._cpu = torch.get_rng_state()
        # dropout on a GPU draws from its own generators: a pass in train mode (BatchNorm's)
        # drew other masks at every point, as a new shuffle did on the CPU
        self._cuda = ([torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())]
                      if torch.cuda.is_available() and torch.cuda.is_initialized() else [])

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        callers = [g.get_state() for g in self._generators]
        with torch.random.fork_rng(devices=list(range(len(self._cuda))), device_type="cuda"):
            torch.set_rng_state(self._cpu)
            for device, state in enumerate(self._cuda):
                torch.cuda.set_rng_state(state, device)
            for generator, state in zip(self._generators, self._states):
                generator.set_state(state)
            try:
                yield
            finally:
                for generator, state in zip(self._generators, callers):
                    generator.set_state(state)


@torch.no_grad()
def evaluate(model: nn.Module, weights: dict[str, Tensor], data: Iterable, metric: Metric, bn: str,
             bn_data: Iterable, same_batches: SameBatches | None = None,
             same_data: SameBatches | None = None) -> tuple[float, float]:
    """Mean loss and error over `data` at `weights` (parameters and perhaps buffers by name);
    with `same_batches` (made once per line or plane from bn_data), every point's BatchNorm
    pass sees the same batches, and with `same_data` (from data) every point's evaluation: a
    shuffled order sums the same losses in another order, off in the last bits."""
    if bn == "recompute":
        with same_batches.replayed() if same_batches is not None else contextlib.nullcontext():
            try:
                update_bn(bn_data, model, fed_on(next(iter(weights.values())).device), weights=weights)
            except NonFiniteStatisticsError:
                # a point where the model diverges (outputs that overflow): it is scored with
                # the statistics it measured, NaN, as its outputs then are (a classifier's
                # error counts every NaN row wrong), and the callers report the point diverged
                for norm in measured_norms(model).values():
                    if holds_statistics(norm):  # one normalising with each batch's has none to spoil
                        norm.running_mean.fill_(math.nan)
                        norm.running_var.fill_(math.nan)
    model.eval()
    with same_data.replayed() if same_data is not None else contextlib.nullcontext():
        return _mean_metric(model, weights, data, metric)


def _numbers(result: object) -> tuple[float, float]:
    """A metric's (mean loss, error fraction) as two floats, or an error saying what it must
    return: a loss per example, or None, failed in float() with torch's or Python's words."""
    try:
        loss, error = result
        return float(loss), float(error)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidArgumentError(f"the metric returned {type(result).__name__} {result!r:.80}: metric(outputs, "
                                   "targets) must return (mean loss, error fraction), two numbers (or one-element "
                                   "tensors) for the batch") from exc


def _mean_metric(model: nn.Module, weights: dict[str, Tensor], data: Iterable, metric: Metric) -> tuple[float, float]:
    device = next(iter(weights.values())).device
    loss_sum = error_sum = 0.0
    count = batches = uncounted = 0  # uncounted: batches whose error is NaN
    for batch in data:
        args, kwargs, y = split_batch(batch, device)
        n = len(y)
        if n == 0:  # weighs nothing; its metric would be the mean of nothing, NaN
            continue
        with layout_named(model, args, kwargs, SPLIT_BATCH_FIX):
            outputs = functional_call(model, weights, args, kwargs)
        loss, error = _numbers(metric(outputs, y))
        loss_sum, error_sum, count = loss_sum + loss * n, error_sum + error * n, count + n
        batches, uncounted = batches + 1, uncounted + math.isnan(error)
    if count == 0:
        raise InvalidArgumentError("data yielded no batches (or only empty ones); pass a re-iterable (a DataLoader "
                                   "or a list of (x, y) batches), "
                                   "not a generator, which is empty after its first pass")
    # NaN at every batch: a metric that counts no errors (a regression loss, a language
    # model's) says so; at some batches only, the error of the rest would be lost unseen
    if 0 < uncounted < batches:
        raise InvalidArgumentError(f"the metric's error is NaN at {uncounted} of {batches} batches: return NaN for "
                                   "the error at every batch (a metric that counts no errors) or at none (a batch "
                                   "with nothing to count, e.g. every label ignored, counts 0 errors of 0)")
    if not uncounted and not -1e-6 <= error_sum / count <= 1 + 1e-6:
        raise InvalidArgumentError(f"the metric's error is {error_sum / count:g}, outside [0, 1]: metric(outputs, targets) "
                         "must return (mean loss, error fraction), or NaN for the error where it counts none")
    return loss_sum / count, error_sum / count
