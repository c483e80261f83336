"""Dataset distillation by distribution matching (Zhao & Bilen, "Dataset Condensation with
Distribution Matching", WACV 2023).

    x_syn, y_syn = tk.distill.distribution_matching(train, ipc=10, out="distilled.safetensors")

A few synthetic examples per class (`ipc`), initialised from randomly chosen real ones, are
learned so that, under a randomly initialised network, the mean embedding of each class's
synthetic examples matches the mean embedding of its real examples. Every iteration draws a
fresh network, so the synthetic set matches the real class distributions in many random
feature spaces at once, with no bi-level optimisation: each step costs one forward and
backward pass, which is what makes it cheap enough for CPU-scale studies. The paper also
applies differentiable Siamese augmentation to images; that is left out here (any
augmentation can be put inside a custom `embed` network).

Inputs are 1-D signals ([N, L] or [N, C, L]) or images ([N, C, H, W]); the default embedding
network is the paper's ConvNet (conv 3, instance norm, ReLU, average pooling, repeated up to
3 times) in 1-D or 2-D to match. The distilled set has the real data's shape (per example)
and dtype, and its labels the real labels' dtype.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterator
from typing import Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from twa_kernels._checks import integer
from twa_kernels._passes import kept_modes
from twa_kernels._progress import progress_bar
from twa_kernels._random import check_seed, derived_seed, generator, seeded
from twa_kernels.errors import InvalidArgumentError, InvalidTypeError
from twa_kernels.io import check_output_file, load_state_dict, save_state_dict

logger = logging.getLogger(__name__)

Data = Union[Dataset, tuple[Tensor, Tensor]]


class DistillError(InvalidArgumentError):
    """Bad distillation input: the data, ipc, or the embedding network."""


def _tensors(dataset: Data) -> tuple[Tensor, Tensor]:
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) < 2:
            raise DistillError(f"the TensorDataset holds {len(dataset.tensors)} tensor(s); distillation needs inputs "
                               "and their class labels: TensorDataset(x, y)")
        x, y = dataset.tensors[:2]
    elif isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(isinstance(t, Tensor) for t in dataset):
        x, y = dataset
    else:  # a generic map-style dataset of (x, y) pairs: small enough to distill, small enough to stack
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__") or isinstance(dataset, (str, dict)):
            raise DistillError(f"the dataset must be a TensorDataset, a pair (x, y) of tensors, or a map-style "
                               f"dataset of (input, label) pairs, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise DistillError("the dataset is empty; pass at least one example per class")
        items = [dataset[i] for i in range(len(dataset))]
        for i, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise DistillError(f"dataset[{i}] is {type(item).__name__}"
                                   f"{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}; "
                                   "items must be (input, label) pairs, or pass the tensors (x, y)")
        inputs = []
        for i, item in enumerate(items):
            try:
                inputs.append(torch.as_tensor(item[0]))
            except (TypeError, ValueError, RuntimeError) as exc:  # a PIL image, a file name, a ragged list
                raise DistillError(f"dataset[{i}]'s input is a {type(item[0]).__name__}, which is not an array of "
                                   "numbers; give the dataset a transform that returns a tensor (for images, "
                                   "torchvision's ToTensor) first") from exc
        if odd := next((i for i, t in enumerate(inputs) if t.shape != inputs[0].shape), None):
            raise DistillError(f"dataset[{odd}]'s input has shape {tuple(inputs[odd].shape)} but dataset[0]'s has "
                               f"{tuple(inputs[0].shape)}; distillation stacks the inputs, so give them one shape "
                               "(resize or pad them first)")
        x = torch.stack(inputs)
        labels = []
        for i, item in enumerate(items):
            label = _class_id(item[1])
            if label is None:  # a class name, None, several values, or a float (int() would round 0.9 to 0)
                raise DistillError(f"dataset[{i}]'s label is a {type(item[1]).__name__} ({str(item[1])[:40]!r}), not "
                                   "an integer class id; map the classes to 0, 1, ... first")
            labels.append(label)
        y = torch.as_tensor(labels)
    if not x.is_floating_point():
        raise DistillError(f"inputs have dtype {x.dtype}; distillation learns them by gradient descent, so "
                           f"convert them to a floating-point dtype first (e.g. x.float() / 255)")
    if x.dim() not in (2, 3, 4):
        raise DistillError(f"inputs have shape {tuple(x.shape)}; expected 1-D signals [N, L] or [N, C, L], "
                           f"or images [N, C, H, W]")
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point():
        raise DistillError(f"labels must be integer class ids of shape [{len(x)}], got {tuple(y.shape)} {y.dtype}")
    if len(x) == 0:
        raise DistillError("the dataset is empty; pass at least one example per class")
    if 0 in x.shape[1:]:
        raise DistillError(f"inputs have shape {tuple(x.shape)}: an example with no values has nothing to distill")
    _check_finite(x, "the inputs")
    return x, y


def _class_id(label: object) -> int | None:
    """A map-style dataset item's label as an int, if it is one: a Python or numpy integer,
    a one-element integer tensor or array, or the digits of one ("3"). None for anything
    else, floats included, as a tensor of float labels is refused."""
    if isinstance(label, Tensor):
        whole = label.numel() == 1 and not (label.is_floating_point() or label.is_complex())
        return int(label) if whole else None
    if isinstance(label, numbers.Integral):  # bool included, as an integer tensor's would be
        return int(label)
    if isinstance(label, str) and label.isascii() and label.isdigit():  # a class id read from text ("3")
        return int(label)
    dtype = getattr(label, "dtype", None)  # a numpy array of one integer
    if getattr(dtype, "kind", None) in ("i", "u", "b") and getattr(label, "size", 0) == 1:
        return int(label.item())
    return None


def _check_finite(x: Tensor, what: str) -> None:
    # one NaN spreads through the class mean into every synthetic example of its class
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise DistillError(f"{what} hold {bad} NaN/Inf value(s) of {x.numel()}; drop or repair those examples first")


def _synthetic(x: Tensor, y: Tensor, x_syn: Tensor, y_syn: Tensor) -> Tensor:
    """Check a synthetic set against the real data; returns the real classes, which y_syn
    must cover exactly (a class mean over no examples is 0/0)."""
    if not isinstance(x_syn, Tensor) or not isinstance(y_syn, Tensor):
        raise DistillError(f"x_syn and y_syn must be tensors, got {type(x_syn).__name__} and {type(y_syn).__name__}")
    if x_syn.shape[1:] != x.shape[1:] or not x_syn.is_floating_point():
        raise DistillError(f"x_syn has shape {tuple(x_syn.shape)} {x_syn.dtype}; the real examples are "
                           f"{tuple(x.shape[1:])} floating point: pass a set distilled from this data")
    if y_syn.dim() != 1 or len(y_syn) != len(x_syn) or y_syn.is_floating_point():
        raise DistillError(f"y_syn must be integer labels of shape [{len(x_syn)}] (one per row of x_syn), got "
                           f"{tuple(y_syn.shape)} {y_syn.dtype}")
    _check_finite(x_syn, "x_syn")
    classes, syn_classes = torch.unique(y), torch.unique(y_syn)
    if not torch.equal(classes, syn_classes.to(classes.device)):
        raise DistillError(f"y_syn has classes {syn_classes.tolist()} but the data has {classes.tolist()}; the "
                           f"synthetic set needs examples of every real class and of no other")
    return classes


def _as_channels(x: Tensor) -> Tensor:
    return x.unsqueeze(1) if x.dim() == 2 else x  # [N, L] -> [N, 1, L]


class ConvEmbedding(nn.Module):
    """The distribution-matching paper's ConvNet without its classifier: `depth` blocks of
    conv 3x3 (or 3), instance norm, ReLU and 2x average pooling; the flattened features.
    No deeper than the input allows: each pooling halves every spatial side, so an input
    with a side of 1 gets one block without pooling."""

    def __init__(self, channels: int, spatial: tuple[int, ...], width: int = 128, depth: int = 3):
        super().__init__()
        conv, pool = (nn.Conv1d, nn.AvgPool1d) if len(spatial) == 1 else (nn.Conv2d, nn.AvgPool2d)
        pools = min(depth, int(math.log2(min(spatial))))  # each halves every spatial side
        layers: list[nn.Module] = []
        for i in range(max(1, pools)):
            layers += [conv(channels if i == 0 else width, width, 3, padding=1),
                       nn.GroupNorm(width, width, affine=True), nn.ReLU()] + ([pool(2)] if i < pools else [])
        self.features = nn.Sequential(*layers, nn.Flatten())

    def forward(self, x: Tensor) -> Tensor:
        """The flattened features of a batch of images [N, C, H, W]."""
        return self.features(x)


def default_embedding(x: Tensor, width: int = 128, depth: int = 3) -> Callable[[], nn.Module]:
    """A factory of ConvEmbedding networks for inputs shaped like `x` ([N, L], [N, C, L] or [N, C, H, W]).
    Inputs with one position per example ([N, 1], [N, C, 1], [N, C, 1, 1]) are refused: the
    network's instance norm makes each channel of one position a constant, so nothing would
    be learned."""
    integer("default_embedding's width", width, 1)
    integer("default_embedding's depth", depth, 1)
    shape = _as_channels(x).shape
    if math.prod(shape[2:]) == 1:
        fix = ("pass the C values as one signal of length C, x.reshape(len(x), 1, -1), or "
               if math.prod(shape[1:]) > 1 else "")
        raise DistillError(f"inputs have shape {tuple(x.shape)}: one position per example, where the default "
                           "embedding's instance norm (GroupNorm with a group per channel) outputs a constant, so "
                           f"the synthetic examples would get no gradient and never change; {fix}pass embed= a "
                           "network that does not normalise over positions (e.g. an MLP)")
    return lambda: ConvEmbedding(shape[1], tuple(shape[2:]), width, depth).to(device=x.device, dtype=x.dtype)


def _fresh(embed: Callable[[], nn.Module], seed: int | None) -> nn.Module:
    # a new random network: `embed` draws from the global RNG, so an int seed forks it and
    # leaves the caller's state as it was; None draws from it
    if isinstance(embed, nn.Module):  # a network, called as a factory, would be run on no input
        raise DistillError(f"embed must be a factory that builds a fresh random network on each call, got a "
                           f"{type(embed).__name__} instance; pass e.g. lambda: {type(embed).__name__}(...)")
    if not callable(embed):
        raise DistillError(f"embed must be a factory that builds a fresh random network, got {type(embed).__name__}")
    with seeded(seed):
        net = embed()
    if not isinstance(net, nn.Module):
        raise DistillError(f"embed() must build an nn.Module, got {type(net).__name__}")
    return net  # (run in train mode by the callers, and given back in its own modes)


@contextlib.contextmanager
def _embedding(net: nn.Module) -> Iterator[None]:
    """`net` in train mode, with no gradient to its parameters (the synthetic set's alone: a
    weight gradient would cost the memory of every layer's input), for the block; after it,
    a network the factory shares is given back with its own modes and flags."""
    flags = [(p, p.requires_grad) for p in net.parameters()]
    with kept_modes(net):
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            net.train()
            yield
        finally:
            for p, wanted in flags:
                p.requires_grad_(wanted)


def _class_means(net: nn.Module, x: Tensor, y: Tensor, classes: Tensor) -> Tensor:
    inputs = _as_channels(x)
    # in the dtype of the network's weights (a float32 network over float64 data); the
    # network itself is left as its factory built it (a shared one, one of complex weights)
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
    if dtype is not None and inputs.is_floating_point() and inputs.dtype != dtype:
        inputs = inputs.to(dtype)
    emb = net(inputs)
    if not isinstance(emb, Tensor):
        raise InvalidTypeError(f"embed() built a network that returns {type(emb).__name__}, not a tensor of "
                               "embeddings; wrap it to return one (for a Hugging Face model, e.g. its "
                               ".pooler_output or .last_hidden_state.mean(1))")
    if emb.dim() < 2 or emb.shape[0] != len(x):
        raise DistillError(f"embed() built a network that returns shape {tuple(emb.shape)} for {len(x)} examples; "
                           "it must return [examples, features...] (one embedding per example, the batch first)")
    emb = emb.flatten(1)
    index = (y[:, None] == classes[None]).float().argmax(1)  # position of each label in `classes`
    sums = torch.zeros(len(classes), emb.shape[1], dtype=emb.dtype, device=emb.device).index_add_(0, index, emb)
    counts = torch.bincount(index, minlength=len(classes)).to(emb.dtype)
    return sums / counts[:, None]


def _check_ipc(ipc: int, y: Tensor) -> tuple[Tensor, Tensor]:
    classes, counts = torch.unique(y, return_counts=True)
    integer("ipc", ipc, 1, "synthetic examples per class", DistillError)
    smallest = int(counts.argmin())
    if ipc > int(counts[smallest]):
        raise DistillError(f"ipc={ipc} is larger than the smallest class (class {int(classes[smallest])} has "
                           f"{int(counts[smallest])} examples); use ipc <= {int(counts.min())}, since the synthetic "
                           f"examples start from distinct real ones")
    return classes, counts


def distribution_matching(
    dataset: Data,
    ipc: int = 10,
    iterations: int = 1000,
    lr: float = 1.0,
    momentum: float = 0.5,
    batch_real: int = 256,
    embed: Callable[[], nn.Module] | None = None,
    seed: int | None = None,
    out: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Distill `dataset` to `ipc` examples per class; returns (x_syn, y_syn), classes in
    ascending order, `ipc` rows each.

    Each iteration draws a fresh network from `embed` (a factory; default: the paper's
    ConvNet for the data's shape; either network gets 1-D signals with a channel
    dimension, [N, L] data as [N, 1, L]) and, for every class, up to
    `batch_real` real examples, then takes an SGD step (`lr`, `momentum`: the paper's 1.0
    and 0.5) on the synthetic examples to reduce
    sum_c || mean emb(real_c) - mean emb(syn_c) ||^2. `out` saves {"x": x_syn, "y": y_syn}
    as safetensors (atomically; read back with `load_distilled`). An int `seed` makes the
    run reproducible and leaves torch's global RNG as it was; None draws from the global RNG.

    Refused with DistillError: an empty dataset, inputs holding NaN/Inf, inputs of one
    position per example under the default embedding (see default_embedding), iterations or
    batch_real that are not ints (>= 0 and >= 1), lr not finite and > 0 or momentum not
    finite and >= 0, and a run whose synthetic set diverges to NaN/Inf (nothing is saved).
    """
    x, y = _tensors(dataset)
    classes, _ = _check_ipc(ipc, y)
    integer("iterations", iterations, 0, "SGD steps on the synthetic set", DistillError)
    integer("batch_real", batch_real, 1, "real examples per class drawn each iteration", DistillError)
    real_numbers = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (lr, momentum))
    if not (real_numbers and 0 < lr < math.inf and 0 <= momentum < math.inf):
        raise DistillError(f"lr must be finite and > 0 and momentum finite and >= 0, got lr={lr!r}, "
                           f"momentum={momentum!r} (the paper's are 1.0 and 0.5)")
    lr, momentum = float(lr), float(momentum)  # numpy's floats too
    if out is not None:  # checked before the run, not after it
        check_output_file(out, example="distilled.safetensors")
    embed = embed if embed is not None else default_embedding(x)
    gen = generator(seed)
    members = [torch.nonzero(y == c).squeeze(1) for c in classes]
    start = torch.cat([m[torch.randperm(len(m), generator=gen)[:ipc]] for m in members])
    x_syn = x[start].detach().clone().requires_grad_(True)
    y_syn = y[start].clone()
    opt = torch.optim.SGD([x_syn], lr=lr, momentum=momentum)

    bar = progress_bar(range(iterations), enabled=progress, desc=f"distribution matching (ipc {ipc})")
    for it in bar:
        net = _fresh(embed, None if seed is None else derived_seed(seed, it + 1))
        pick = torch.cat([m[torch.randperm(len(m), generator=gen)[:batch_real]] for m in members])
        # the forwards run in train mode (the paper embeds in it; GroupNorm keeps no running
        # statistics): an embedding with dropout draws there, from a stream of the seed's own
        with seeded(None if seed is None else derived_seed(seed, it + 1, 1)), _embedding(net):
            with torch.no_grad():
                target = _class_means(net, x[pick], y[pick], classes)
            loss = (target - _class_means(net, x_syn, y_syn, classes)).pow(2).sum()
            opt.zero_grad()
            try:  # the synthetic set's gradient alone: a tensor the embedding uses unregistered gets none
                (x_syn.grad,) = torch.autograd.grad(loss, [x_syn], retain_graph=True)
            except RuntimeError as exc:
                if "use_reentrant" not in str(exc):
                    raise
                loss.backward()  # a reentrant checkpoint in the embedding takes only this
            loss = loss.detach()  # (the graph, kept for that retry, goes)
        opt.step()
        if it % 50 == 0:
            if hasattr(bar, "set_postfix"):  # a bar, not the bare range
                bar.set_postfix(loss=f"{loss.item():.4g}")
            logger.debug("distribution matching iteration %d: loss %.6g", it, loss.item())
    x_syn = x_syn.detach()
    if not bool(torch.isfinite(x_syn).all()):  # diverged: refuse rather than save it
        raise DistillError(f"the synthetic set became NaN/Inf at lr={lr:g}: the steps diverged; lower lr (it "
                           f"depends on the data's scale){'; nothing was saved' if out is not None else ''}")
    if out is not None:
        save_state_dict({"x": x_syn, "y": y_syn}, out)
    return x_syn, y_syn


# matching_loss's networks are a stream of their own, apart from the networks a run at the
# same seed is optimised on (iteration t's come from derived_seed(seed, t + 1)). torch's CPU
# generator keys on a seed's low 32 bits only, so the offset lies there: half of that range
# away, the two streams meet only after 2**31 iterations.
_EVALUATION_STREAM = 1 << 31


@torch.no_grad()
def matching_loss(dataset: Data, x_syn: Tensor, y_syn: Tensor, nets: int = 20, seed: int | None = None,
                  embed: Callable[[], nn.Module] | None = None) -> float:
    """The distribution-matching loss of a synthetic set against all of `dataset`, averaged
    over `nets` fresh random networks: how well it matches in feature spaces it was not
    optimised on. Compare two sets with the same int `seed` (the same networks, none of them
    one that `distribution_matching` at that seed trains on; torch's global RNG is left as
    it was); None draws the networks from the global RNG. `y_syn` must
    hold every class of the data and no other, one label per row of `x_syn`; nets >= 1.
    `x_syn` is cast to the data's dtype and device (a float64 set against float32 data is
    measured in float32), as the networks are built for the data."""
    check_seed(seed)
    integer("nets", nets, 1, "random networks to average over", DistillError)
    x, y = _tensors(dataset)
    classes = _synthetic(x, y, x_syn, y_syn)
    x_syn = x_syn.to(device=x.device, dtype=x.dtype)  # the networks take the data's dtype: measured in it
    embed = embed if embed is not None else default_embedding(x)
    total = 0.0
    for i in range(nets):
        net = _fresh(embed, None if seed is None else derived_seed(seed, _EVALUATION_STREAM + i))
        with seeded(None if seed is None else derived_seed(seed, _EVALUATION_STREAM + i, 1)), _embedding(net), \
                torch.no_grad():  # (dropout's draws from the seed's stream)
            total += float((_class_means(net, x, y, classes) - _class_means(net, x_syn, y_syn, classes)).pow(2).sum())
    return total / nets


def load_distilled(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """(x, y) of a distilled set saved by `distribution_matching(..., out=path)`."""
    state = load_state_dict(path)
    missing = {"x", "y"} - set(state)
    if missing:
        raise DistillError(f"{path}: not a distilled set (missing {sorted(missing)}); write one with "
                           f"distribution_matching(..., out=path)")
    return state["x"], state["y"]


__all__ = ["ConvEmbedding", "DistillError", "default_embedding", "distribution_matching", "load_distilled",
           "matching_loss"]
