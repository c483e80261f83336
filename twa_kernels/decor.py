"""Decorrelated backpropagation (DBP; Dalm, Offergeld, Ahmad, van Gerven, arXiv 2405.02385).

Every decorrelated layer keeps a d x d matrix R (a buffer, identity at the start) and feeds
its weight the decorrelated input z = R x: d = in_features for a Linear layer and
C_in * k (Conv1d) or C_in * kh * kw (Conv2d) for a convolution, whose z is R applied to each
input patch. transformers' Conv1D (GPT-2's linear layer) stores W as (in, out): d is its
input size and A = R^T W in that layout. The forward folds the two into one op, A = W R (one
matmul or one convolution with the folded kernel; the batch's patches are never
materialised), and since R is not a
parameter autograd gives dL/dW = delta z^T, exactly as if z were the input.

During a training forward each layer also keeps a random subsample of its z (a fraction
`sample_fraction` of the rows, or of the patch positions of a conv): as rows while there are
at most d of them, else summed into S = Z^T Z. After `optimizer.step()`, `update(model)`
uses X = Z^T Z / N (never formed from rows: X R = Z^T (Z R)) and applies, to every layer,

    C = X - diag(X),  v = diag(X) - 1,  R <- R - lr [(1 - kappa) C R + kappa diag(v) R]

in a few batched ops (layers grouped by d, one bmm per group), with the X matrices of all
layers all-reduced in one call under torch.distributed. The decorrelation loss is
((1 - kappa) sum C^2 + kappa sum v^2) / d^2. diag(v) R scales the rows of R: with
Sigma = E[x x^T] fixed, the rule is the gradient of that loss times Sigma^{-1} (up to the
factor 4 / d^2), hence a descent direction. The reference code's `v * R` scales the columns
instead, which is not (tests/test_decor.py checks both against autograd).

    model = tk.decor.decorrelate(model, lr=1e-4, kappa=1e-3, sample_fraction=0.1)
    opt = torch.optim.Adam(model.parameters())        # the same parameters as before
    loss_fn(model(x), y).backward(); opt.step(); tk.decor.update(model)
    plain = tk.decor.fold(model)                      # W R folded in, for inference/export
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twa_kernels._collectives import agree, named_on_failure, ranks_unlike_rank0
from twa_kernels._passes import in_statistics_pass
from twa_kernels._random import check_seed, generator
from twa_kernels._checks import check_module, flag, real
from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, TWAKernelsError, UsageError, warn_at_caller
from twa_kernels.io import tied_owners
from twa_kernels.layers import DECOR_BUFFER, NORM_HOOKS, computed_weight, transformers_conv1d

logger = logging.getLogger(__name__)

__all__ = ["DecorrelationDivergedError", "decorrelate", "decorrelated_layers", "fold", "sampling_paused", "update"]

BUFFER = DECOR_BUFFER  # the state_dict key of R is "<layer>.decor_R"

Skip = Iterable[str] | Callable[[str, nn.Module], bool] | None


class DecorrelationDivergedError(TWAKernelsError, FloatingPointError):
    """A layer's decorrelation matrix R became NaN/Inf or blew up: the decorrelation lr is
    too large for the scale of that layer's input."""


class _Sampler:
    """Where the decorrelated layers of one decorrelate() call draw their row subsamples: with
    an int seed, one private generator per device shared by those layers (made on first use);
    with None, torch's global RNG."""

    def __init__(self, seed: int | None) -> None:
        self.seed = check_seed(seed)
        self.generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self.generators:
            self.generators[key] = generator(self.seed, device)
        return self.generators[key]


def _compute_dtype(R: Tensor) -> torch.dtype:
    """The dtype sampled inputs, their sums and the R step are computed in: at least float32.
    In float16 a sum of squares overflows (and a count of 65520 rows is inf); in bfloat16
    every step smaller than 1/256 of an entry rounds away."""
    return torch.promote_types(R.dtype, torch.float32)


# the ids of the layers that open sampling_paused() blocks pause, and how many blocks pause
# each: module globals, which torch.compile guards on (a context variable breaks its graph)
_pause_counts: dict[int, int] = {}
_paused_layers: frozenset[int] = frozenset()
_pause_lock = threading.Lock()


def _through_forward(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that changes nothing. nn.TransformerEncoderLayer's inference path
    (eval mode, no grad) reads linear1.weight and linear2.weight itself and never calls their
    forward, so it would skip R; torch takes that path only where no module of the layer has
    hooks, and this one keeps it off for layers holding a decorrelated Linear."""
    return None


class _Decor:
    """Mixin for the decorrelated Linear / Conv1d / Conv2d classes (set by class swap, so the
    module keeps its parameters, hooks and parameter names)."""

    decor_R: Tensor

    def _decor_samples(self) -> bool:
        """Whether this forward samples its inputs for the next update(): in train mode, except
        under sampling_paused(), in a BatchNorm statistics pass (update_bn), whose batches are
        no training data, and once the weight is frozen (update() keeps such a layer's R)."""
        return (self.training and self.weight.requires_grad and not in_statistics_pass()
                and id(self) not in _paused_layers)

    def _decor_init(self, d: int, lr: float, kappa: float, sample_fraction: float, max_norm: float,
                    sampler: _Sampler) -> None:
        w = self.weight
        self._decor_sampler = sampler
        self.register_buffer(BUFFER, torch.eye(d, dtype=w.dtype, device=w.device))
        self.decor_lr, self.decor_kappa = float(lr), float(kappa)
        self.decor_sample_fraction, self.decor_max_norm = float(sample_fraction), float(max_norm)
        self.decor_reset()
        if isinstance(self, nn.Linear):
            self._decor_hook = self.register_forward_pre_hook(_through_forward).id

    def _decor_remove_hook(self) -> None:
        self._forward_pre_hooks.pop(self.__dict__.pop("_decor_hook", None), None)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # inputs sampled before a load (a run stopped after a forward, then resumed in the
        # same process) were rotated by the R being replaced: the next update would fold them in
        self.decor_reset()
        super()._load_from_state_dict(*args, **kwargs)

    def decor_reset(self) -> None:
        """Forget the inputs accumulated since the last update."""
        self._decor_sum: Tensor | None = None  # S = Z^T Z over sampled rows folded in so far
        self._decor_rows: list[Tensor] = []  # sampled z not yet folded into S (at most d rows)
        self._decor_count = 0  # N: the number of sampled rows in S and _decor_rows together

    def _decor_accumulate(self, rows: Tensor) -> None:
        """rows: [n, d] sampled inputs x (before R). Keeps z = R x; once there are more rows
        than d they go into S = Z^T Z. Fewer than d rows stay as rows: update() then forms
        X R as Z^T (Z R) in O(n d^2) instead of X R in O(d^3) (a batch of 32 at 10% gives
        3 rows for a d = 4608 layer)."""
        R = self.decor_R.to(_compute_dtype(self.decor_R))
        self._decor_rows.append(rows.to(R.dtype) @ R.T)
        self._decor_count += rows.shape[0]
        if sum(z.shape[0] for z in self._decor_rows) > R.shape[0]:
            self._decor_sum = self.decor_dense_sum()
            self._decor_rows = []

    def decor_dense_sum(self) -> Tensor:
        """S = Z^T Z over everything sampled since the last update, as a d x d matrix."""
        R = self.decor_R
        dtype = _compute_dtype(R)
        s = self._decor_sum.to(dtype) if self._decor_sum is not None else torch.zeros(R.shape, dtype=dtype,
                                                                                       device=R.device)
        if self._decor_rows:
            z = torch.cat(self._decor_rows).to(dtype)
            s = torch.addmm(s, z.T, z)
        return s

    def _decor_num_samples(self, n: int) -> int:
        return n if self.decor_sample_fraction >= 1.0 else max(1, round(self.decor_sample_fraction * n))

    def _decor_pick(self, n: int, device: torch.device) -> Tensor | None:
        """Indices of the sampled rows out of n (None = all, in order)."""
        k = self._decor_num_samples(n)
        if k >= n:
            return None
        return torch.randperm(n, device=device, generator=self._decor_sampler.generator(device))[:k]

    def decor_folded_weight(self) -> Tensor:
        """A = W R in the weight's shape: what the forward convolves / multiplies with."""
        w = self.weight
        return (w.reshape(w.shape[0], -1) @ self.decor_R).view_as(w)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", decor_lr={self.decor_lr:g}, decor_kappa={self.decor_kappa:g}, "
                f"sample_fraction={self.decor_sample_fraction:g}")


class DecorLinear(_Decor, nn.Linear):
    """nn.Linear computing W (R x) as one matmul with A = W R."""

    @torch.no_grad()
    def decor_capture(self, x: Tensor) -> None:
        """Add a random subsample of this input's rows, decorrelated, to S."""
        flat = x.detach().reshape(-1, self.in_features)
        idx = self._decor_pick(flat.shape[0], flat.device)
        self._decor_accumulate(flat if idx is None else flat[idx])

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight @ self.decor_R, self.bias)
        if self._decor_samples():  # after the forward, which refuses a wrong shape first
            self.decor_capture(x)
        return out


def _sample_patches(module: nn.Module, x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
                    dilation: tuple[int, ...]) -> Tensor:
    """Random input patches of a conv as rows [n, C_in * prod(kernel)], in the weight's
    (C, kh, kw) order, gathered by index arithmetic: only the sampled patches are built.
    x: [B, C, H, W] after padding; 1-D convs come in with H = 1 and kernel (1, k)."""
    b, c, h, w = x.shape
    kh, kw = kernel
    ho = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    n = b * ho * wo
    idx = module._decor_pick(n, x.device)
    if idx is None:
        idx = torch.arange(n, device=x.device)
    # one gather from the flat input: patch start (image, top row, left column) + the
    # kernel's offsets (channel, kernel row, kernel column), in the weight's order
    img, pos = idx // (ho * wo), idx % (ho * wo)
    start = img * (c * h * w) + (pos // wo) * (stride[0] * w) + (pos % wo) * stride[1]
    ar = lambda n: torch.arange(n, device=x.device)  # noqa: E731
    offsets = (ar(c)[:, None, None] * (h * w) + ar(kh)[None, :, None] * (dilation[0] * w)
               + ar(kw)[None, None, :] * dilation[1]).reshape(-1)
    return x.reshape(-1)[start[:, None] + offsets]


def _padded(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    pad = module._reversed_padding_repeated_twice
    if module.padding_mode == "zeros":
        return F.pad(x, pad) if any(pad) else x
    return F.pad(x, pad, mode=module.padding_mode)


class DecorConv2d(_Decor, nn.Conv2d):
    """nn.Conv2d computing W (R patch) as one convolution with the folded kernel W R."""

    @torch.no_grad()
    def decor_capture(self, x: Tensor) -> None:
        """Add a random subsample of this input's patches, decorrelated, to S."""
        xb = x.detach() if x.dim() == 4 else x.detach()[None]
        self._decor_accumulate(_sample_patches(self, _padded(self, xb), self.kernel_size, self.stride, self.dilation))

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_forward(x, self.decor_folded_weight(), self.bias)
        if self._decor_samples():  # after the forward, which refuses a wrong shape first
            self.decor_capture(x)
        return out


class DecorConv1d(_Decor, nn.Conv1d):
    """nn.Conv1d computing W (R patch) as one convolution with the folded kernel W R."""

    @torch.no_grad()
    def decor_capture(self, x: Tensor) -> None:
        """Add a random subsample of this input's patches, decorrelated, to S (as a 2-D conv of height 1)."""
        xb = x.detach() if x.dim() == 3 else x.detach()[None]
        self._decor_accumulate(_sample_patches(self, _padded(self, xb)[:, :, None], (1, self.kernel_size[0]),
                                               (1, self.stride[0]), (1, self.dilation[0])))

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_forward(x, self.decor_folded_weight(), self.bias)
        if self._decor_samples():  # after the forward, which refuses a wrong shape first
            self.decor_capture(x)
        return out


_DECOR = {nn.Linear: DecorLinear, nn.Conv1d: DecorConv1d, nn.Conv2d: DecorConv2d}
_PLAIN = {v: k for k, v in _DECOR.items()}


def _decor_transposed_linear(conv1d: type[nn.Module]) -> type[nn.Module]:
    """The decorrelated class of transformers' Conv1D (GPT-2's linear layer, y = x W + b with
    W stored (in, out)), made once and registered beside the others. With z = R x per row,
    y = x R^T W + b: the folded weight is R^T W, in the layer's own layout."""
    if conv1d in _DECOR:
        return _DECOR[conv1d]

    class DecorTransposedLinear(_Decor, conv1d):
        """transformers' Conv1D computing (x R^T) W as one matmul with the folded R^T W."""

        @torch.no_grad()
        def decor_capture(self, x: Tensor) -> None:
            """Add a random subsample of this input's rows, decorrelated, to S."""
            flat = x.detach().reshape(-1, self.weight.shape[0])
            idx = self._decor_pick(flat.shape[0], flat.device)
            self._decor_accumulate(flat if idx is None else flat[idx])

        def decor_folded_weight(self) -> Tensor:
            return self.decor_R.T @ self.weight

        def forward(self, x: Tensor) -> Tensor:
            out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.decor_folded_weight())
            if self._decor_samples():  # after the forward, which refuses a wrong shape first
                self.decor_capture(x)
            return out.view(*x.shape[:-1], out.shape[-1])

    DecorTransposedLinear.__qualname__ = "DecorTransposedLinear"  # found by pickle through __getattr__ below
    _DECOR[conv1d], _PLAIN[DecorTransposedLinear] = DecorTransposedLinear, conv1d
    return DecorTransposedLinear


def __getattr__(name: str) -> type[nn.Module]:
    """`twa_kernels.decor.DecorTransposedLinear`, made on first use from transformers' Conv1D,
    so that a whole decorrelated GPT-2 saved with torch.save(model) loads in a new process.
    Only this attribute imports transformers; the rest of the module never does."""
    if name == "DecorTransposedLinear":
        from transformers.pytorch_utils import Conv1D

        return _decor_transposed_linear(Conv1D)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _input_size(module: nn.Module) -> int:
    """d of a layer's R: in_features, C_in * prod(kernel), or a Conv1D's rows (it stores (in, out))."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return module.weight[0].numel()
    return module.weight.shape[0]


def _skipper(skip: Skip) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip):
        return skip
    names = {skip} if isinstance(skip, str) else set(skip)  # one name, not its letters
    # a name skips that module and everything inside it
    return lambda name, module: any(name == s or name.startswith(s + ".") for s in names)


def decorrelate(model: nn.Module, lr: float = 1e-4, kappa: float = 1e-3, sample_fraction: float = 0.1,
                skip: Skip = None, max_norm: float = 1e4, seed: int | None = None) -> nn.Module:
    """Make every nn.Linear, nn.Conv1d and nn.Conv2d of `model`, and transformers' Conv1D
    (GPT-2's linear layer), decorrelating, in place.

    The layers keep their parameters (the same Parameter objects, under the same names), so an
    optimizer built before, and checkpoints of the plain model (load with strict=False, or
    fold first), still fit; each gains a buffer `decor_R` (identity). The first layer, which
    sees the raw input, is decorrelated too, as in the paper.

    lr: step size of the R update; kappa in [0, 1]: weight of the unit-variance (whitening)
    term against decorrelation; sample_fraction in (0, 1]: share of each batch's rows (conv:
    patch positions) that feed the update; skip: qualified module names of the model (a name
    skips its submodules too, a layer used under several names is skipped by any of them,
    and a name that names no module is refused) or a predicate (name, module) -> bool; max_norm: update() raises
    DecorrelationDivergedError when ||R||_F / sqrt(d) of a layer exceeds it; seed: an int
    draws the subsamples of every layer from one private generator (reproducible; torch's
    global RNG untouched), None from torch's global RNG.

    Subclasses of Linear/Conv (e.g. MultiheadAttention's out_proj, whose weight the attention
    reads directly) are left alone, and so, with a warning, is a layer whose weight is computed
    rather than held as a Parameter (a parametrization, or torch.nn.utils.spectral_norm's or
    weight_norm's hook). Grouped, transposed and 3-D convolutions are refused:
    skip them by name. So is a layer whose weight Parameter another module shares (tied
    weights, e.g. an output layer tied to an embedding): fold() would write W R into the
    weight the others read. Untie it, or skip it and every layer tied to it. A decorrelated
    Linear carries a forward pre-hook that changes nothing: it keeps nn.TransformerEncoderLayer
    off its fused inference path, which reads linear1/linear2's weights without R.
    """
    # every setting is checked before the first layer changes class: a refusal leaves the model as it was
    check_module(model, "decor.decorrelate's model")
    lr, kappa, sample_fraction = real("lr", lr), real("kappa", kappa), real("sample_fraction", sample_fraction)
    max_norm = real("max_norm", max_norm)
    if not 0.0 < sample_fraction <= 1.0:
        raise InvalidArgumentError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
    if not 0.0 <= kappa <= 1.0:
        raise InvalidArgumentError(f"kappa must be in [0, 1], got {kappa}")
    if not lr > 0.0:
        raise InvalidArgumentError(f"lr must be positive, got {lr}")
    if not max_norm > 0.0:
        raise InvalidArgumentError(f"max_norm must be a finite positive number (the divergence bound on "
                                   f"||R||_F / sqrt(d), 1 at the start), got {max_norm}")
    sampler = _Sampler(seed)
    if skip is not None and not callable(skip):  # a misspelt name would decorrelate the layer it meant to skip
        skip = [skip] if isinstance(skip, str) else list(skip) if isinstance(skip, Iterable) else None
        if skip is None or not all(isinstance(name, str) for name in skip):
            raise InvalidTypeError("skip must be a module name, a list of names, or a callable (name, module) -> "
                                   "bool that says which modules to leave alone")
        modules = dict(model.named_modules(remove_duplicate=False))
        for name in skip:
            if name not in modules:
                raise InvalidArgumentError(f"skip: no module named {name!r} in the model (names as in "
                                           f"model.named_modules(), e.g. {[n for n in modules if n][:3]})")
    skipped = _skipper(skip)
    # a module the model holds under two names (one layer called twice) is left alone if
    # either name is skipped: named_modules() below gives it under its first name only
    left_alone = {id(m) for name, m in model.named_modules(remove_duplicate=False) if skipped(name, m)}
    todo, frozen = [], []
    conv1d = transformers_conv1d()
    if conv1d is not None:  # a model may hold transformers' Conv1D only where transformers loaded it
        _decor_transposed_linear(conv1d)
    supported = (nn.Linear, nn.Conv1d, nn.Conv2d) + ((conv1d,) if conv1d is not None else ())
    computed: dict[tuple[str, str], list[str]] = {}
    for name, module in model.named_modules():
        if id(module) in left_alone or isinstance(module, _Decor):
            continue
        label = name or "<root>"
        if isinstance(module, (nn.modules.conv._ConvTransposeNd, nn.Conv3d)):
            raise InvalidArgumentError(f"layer {label!r} ({type(module).__name__}) cannot be decorrelated: transposed and 3-D "
                             f"convolutions are not supported; pass skip=[{name!r}]")
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and isinstance(module, (nn.Linear, nn.Conv1d,
                                                                                      nn.Conv2d)):
            raise InvalidArgumentError(f"layer {label!r} is lazy and not initialised yet: run one forward before "
                                       "decorrelate()")
        if isinstance(module, supported) and (why := computed_weight(module)) is not None:
            computed.setdefault(why, []).append(label)
            continue
        if type(module) not in _DECOR:
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                logger.info("decorrelate: leaving %r alone (%s is a subclass of a supported layer)", label,
                            type(module).__name__)
            continue
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) or isinstance(module.weight,
                                                                             nn.parameter.UninitializedParameter):
            raise InvalidArgumentError(f"layer {label!r} is lazy and not initialised yet: run one forward before decorrelate()")
        if not module.weight.requires_grad:
            # R would keep moving while the frozen W cannot follow it: the layer's output would drift
            logger.info("decorrelate: leaving %r alone (its weight is frozen)", label)
            frozen.append(label)
            continue
        if module.weight.is_meta:
            raise InvalidArgumentError(f"layer {label!r} is on the meta device: its R would have no values, and "
                                       "to_empty() leaves it uninitialised; decorrelate the model once it holds real "
                                       "weights (after to_empty() and load_state_dict())")
        if module.weight.numel() == 0:
            raise InvalidArgumentError(f"layer {label!r} has a weight with no entries {tuple(module.weight.shape)}: "
                                       f"nothing to decorrelate; pass skip=[{name!r}]")
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
            raise InvalidArgumentError(f"layer {label!r} has groups={module.groups}: grouped convolutions are not supported; "
                             f"pass skip=[{name!r}]")
        todo.append((name, module))
    for (cause, fix), labels in computed.items():  # fold() would write W R where the next forward overwrites it
        warn_at_caller(f"decorrelate leaves out {labels}: each weight is {cause}, so R and fold() would not reach "
                       f"the tensors the layer trains and saves; to decorrelate such a layer, {fix}", UserWarning)
    if not todo and any(isinstance(m, _Decor) for m in model.modules()):
        raise InvalidArgumentError("no layer to decorrelate: every supported layer of the model is decorrelated "
                                   "already (decorrelate() ran on it); train it as it is, or decorrelate the plain copy "
                                   "that fold(model) returns")
    if not todo and frozen:
        raise InvalidArgumentError(f"no layer to decorrelate: every supported layer is frozen (requires_grad=False: "
                                   f"{frozen[:5]}{' ...' if len(frozen) > 5 else ''}), and R would move while a frozen "
                                   "weight cannot follow it; unfreeze the layers to decorrelate")
    if not todo:
        raise InvalidArgumentError(f"no layer to decorrelate: the model has no nn.Linear, nn.Conv1d, nn.Conv2d or "
                                   f"transformers Conv1D outside skip={skip!r}")
    _refuse_tied(model, todo, "untie them (give each its own nn.Parameter) before decorrelate(), or pass skip={names}")
    converted: list[tuple[nn.Module, type]] = []
    try:
        for _, module in todo:
            d = _input_size(module)
            converted.append((module, type(module)))
            module.__class__ = _DECOR[type(module)]
            module._decor_init(d, lr, kappa, sample_fraction, max_norm, sampler)
    except BaseException:
        # R of a large layer may not fit in memory, or a Ctrl-C comes: a layer left of the new
        # class without R would fail every forward, and look decorrelated to a retry
        for module, plain in converted:
            _undo_decorrelation(module, plain)
        raise
    logger.info("decorrelate: %d layers", len(todo))
    return model


def _undo_decorrelation(module: nn.Module, plain: type) -> None:
    """The layer as decorrelate() found it: its own class, without R or the decor settings."""
    if isinstance(module, _Decor):
        module._decor_remove_hook()
    module.__class__ = plain
    module._buffers.pop(BUFFER, None)
    for name in [n for n in vars(module) if n.startswith(("_decor", "decor_"))]:
        delattr(module, name)


@contextlib.contextmanager
def sampling_paused(model: nn.Module) -> Iterator[None]:
    """Inside the block the decorrelated layers of `model` sample no inputs, in train mode too:
    a pass that runs the model in train mode for another purpose leaves the inputs pending for
    the next update(), R and the sampling generators exactly as they were (update_bn's
    BatchNorm pass does this for every model by itself). The pause holds in every thread of
    the process (torch.compile reads it as a module global); a copy of the model made inside
    the block is not paused."""
    check_module(model, "decor.sampling_paused's model")
    # held by id, not on the layers: a copy made inside the block (an EMA copy, a saved
    # model) samples as usual; counted, so blocks may end in any order
    ids = [id(m) for m in model.modules() if isinstance(m, _Decor)]
    _count_pauses(ids, +1)
    try:
        yield
    finally:
        _count_pauses(ids, -1)


def _count_pauses(ids: list[int], change: int) -> None:
    global _paused_layers
    with _pause_lock:
        for key in ids:
            _pause_counts[key] = _pause_counts.get(key, 0) + change
            if _pause_counts[key] <= 0:
                del _pause_counts[key]
        _paused_layers = frozenset(_pause_counts)


def _refuse_tied(model: nn.Module, layers: list[tuple[str, nn.Module]], fix: str) -> None:
    """Refuse layers whose weight Parameter another module also holds: fold() writes W R into
    that one tensor, so the other modules (or a second fold through it) would read a changed
    weight. A module reused under two names is one module, not a tie."""
    for name, module in layers:
        others = tied_owners(model, module)
        if others:
            label = name or "<root>"
            raise InvalidArgumentError(f"layer {label!r} shares its weight Parameter with {others} (tied weights), "
                                       f"which folding W R into it would change too: "
                                       f"{fix.format(names=[label] + others)}")


def decorrelated_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every decorrelated layer of `model`, in module order."""
    check_module(model, "decor.decorrelated_layers's model")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _Decor)]


def _default_group(process_group: torch.distributed.ProcessGroup | None) -> torch.distributed.ProcessGroup | None:
    dist = torch.distributed
    if process_group is not None:
        if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
            raise InvalidTypeError(f"process_group must be a torch.distributed ProcessGroup (dist.group.WORLD, or one "
                                   f"from dist.new_group) or None, got {type(process_group).__name__}")
        return process_group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _all_reduce(layers: list[tuple[str, nn.Module]], group) -> tuple[list[Tensor], Tensor]:
    """Every layer's S and sample count summed across the group in one flattened all_reduce
    (a layer that saw no input contributes zeros): the global S of each layer and the global
    counts. The layers keep their own samples until the update is applied, so a step that
    stops before (refused, or interrupted) leaves each rank its own, and a retry sums them once."""
    ref = layers[0][1].decor_R
    dtype = functools.reduce(torch.promote_types, (_compute_dtype(m.decor_R) for _, m in layers))
    parts = [m.decor_dense_sum().to(device=ref.device, dtype=dtype).reshape(-1) for _, m in layers]
    counts = torch.tensor([float(m._decor_count) for _, m in layers], dtype=dtype, device=ref.device)
    flat = torch.cat(parts + [counts])
    named_on_failure("decor.update's all-reduce", lambda: torch.distributed.all_reduce(flat, group=group))
    sums, offset = [], 0
    for (_, m), p in zip(layers, parts):
        sums.append(flat[offset:offset + p.numel()].view_as(m.decor_R).to(device=m.decor_R.device,
                                                                           dtype=_compute_dtype(m.decor_R)))
        offset += p.numel()
    return sums, flat[offset:]


def _stacked(tensors: list[Tensor]) -> Tensor:
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)  # one layer: a view, no copy


def _group_step(mods: list[nn.Module], n: Tensor, sums: list[Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
    """The new R [G, d, d], the loss [G] and whether each layer's sampled inputs were finite
    [G] (a NaN or Inf among them makes the diagonal of X non-finite) of a group of layers of
    equal d, from their S matrices `sums`, or (None) from their sampled rows.

    (1 - k) C R + k diag(v) R = (1 - k) X R + diag(k v - (1 - k) diag X) R, so
    R_new = diag(1 - lr (k v - (1 - k) diag X)) R - lr (1 - k) X R: one row scaling of R and
    one batched matmul accumulated into it (the matrices are d x d, up to 4608^2 in a ResNet,
    so every pass over them counts). X R comes from S (one bmm) or, with fewer rows than d,
    as Z^T (Z R) without forming X. ||X||_F^2 - ||diag X||^2 = sum C^2 gives the loss.
    """
    R = _stacked([m.decor_R for m in mods])
    R = R.to(_compute_dtype(R))
    d, dtype, device = R.shape[-1], R.dtype, R.device
    n = n.to(dtype)
    inv_n = 1 / n.clamp(min=1)
    lr = torch.tensor([m.decor_lr for m in mods], dtype=dtype, device=device) * (n > 0)  # no input: no step
    kappa = torch.tensor([m.decor_kappa for m in mods], dtype=dtype, device=device)
    coef = -lr * (1 - kappa) * inv_n  # the weight of S R (or Z^T Z R) in R_new
    if sums is None:
        Z = _stacked([torch.cat(m._decor_rows) if len(m._decor_rows) > 1 else m._decor_rows[0]
                      for m in mods]).to(dtype)
        diag = Z.square().sum(1) * inv_n[:, None]
        gram = torch.bmm(Z, Z.transpose(1, 2))  # [G, n, n]: ||Z^T Z||_F = ||Z Z^T||_F
        fro2 = gram.square().sum((1, 2)) * inv_n ** 2
        left, right = Z.transpose(1, 2), torch.bmm(Z, R).mul_(coef[:, None, None])  # [G, d, n], [G, n, d]
    else:
        S = _stacked(sums).to(dtype)
        diag = torch.diagonal(S, dim1=1, dim2=2) * inv_n[:, None]
        fro2 = S.square().sum((1, 2)) * inv_n ** 2
        left, right = S * coef[:, None, None], R
    v = diag - 1
    rows = 1 - lr[:, None] * (kappa[:, None] * v - (1 - kappa)[:, None] * diag)
    new = torch.baddbmm(R * rows[:, :, None], left, right)
    off2 = (fro2 - diag.square().sum(1)).clamp(min=0)
    return new, ((1 - kappa) * off2 + kappa * v.square().sum(1)) / d ** 2, torch.isfinite(diag).all(1)


# the layers each model's ranks agreed on, by process group: checked again only when they change
_agreed_layouts: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


@torch.no_grad()
def update(model: nn.Module, process_group: torch.distributed.ProcessGroup | None = None, check: bool = True) -> Tensor:
    """Update every decorrelation matrix R of `model` from the inputs its layers sampled
    since the last update (the last training forward, or several under gradient
    accumulation); call it after optimizer.step(). Returns the mean decorrelation loss over
    the updated layers (of the R before this step) as a 0-d tensor, with no host sync.

    Layers of equal d are updated together with one bmm. Under torch.distributed
    (process_group, or the default group when one is initialised) the S matrices and sample
    counts of all layers are summed across ranks in one all_reduce, so every rank computes
    the same X (that of the global batch) and keeps an identical R. The ranks' layers are
    compared before the first update's all-reduce (and after they change), not at every step.

    check: one combined test of all new R (a single host sync) for NaN/Inf or
    ||R||_F / sqrt(d) > max_norm, raising DecorrelationDivergedError with the layer and a
    smaller lr, and leaving every R as it was. check=False skips the sync.
    """
    check_module(model, "decor.update's model")
    flag("decor.update's check", check)
    group = _default_group(process_group)
    layers = decorrelated_layers(model)
    if frozen := [(name, m) for name, m in layers if not m.weight.requires_grad]:
        # R moving under a W that cannot follow it would change what the layer computes, which
        # is why decorrelate() leaves frozen layers alone; one frozen later keeps its R as it is
        for _, m in frozen:
            m.decor_reset()  # its samples are not used: kept, they would pile up
        warn_at_caller(f"decor.update: the weights of decorrelated layers {[name for name, _ in frozen][:5]} are "
                       "frozen (requires_grad=False), so their R are left as they are; fold() the model to keep "
                       "them as plain layers", UserWarning)  # past torch.no_grad's wrapper
        layers = [(name, m) for name, m in layers if m.weight.requires_grad]
    all_frozen = bool(frozen) and not layers
    if group is None:
        layers = [(n, m) for n, m in layers if m._decor_count > 0]
    layout = None if group is None else (id(group), tuple((name, m.decor_R.shape[0], str(m.decor_R.dtype))
                                                          for name, m in layers))
    first = group is not None and _agreed_layouts.get(model) != layout
    if first:
        # the ranks agree on the layers before the first all-reduce (and after a rank's
        # layers change): one over other layouts would pair with another rank's collective,
        # or abort the process inside gloo. Once agreed, a step costs the all-reduce alone.
        if differ := ranks_unlike_rank0(layout[1], group, "decor.update's check of the decorrelated layers"):
            raise InvalidArgumentError(f"decor.update: ranks {differ} hold other decorrelated layers than rank 0 "
                                       f"(here {[name for name, _ in layers][:6]}); decorrelate the same model with "
                                       "the same skip= (and freeze the same layers) on every rank")
    if all_frozen:  # every decorrelated layer frozen (on every rank: their layers agreed above)
        if first:
            _agreed_layouts[model] = layout
        return torch.zeros((), dtype=torch.float64, device=frozen[0][1].decor_R.device)

    def check_samples() -> None:
        if not layers:
            raise UsageError("decor.update: no decorrelated layer sampled an input since the last update (no "
                             "training-mode forward, or forwards of empty batches); call update() after a forward "
                             "of a batch in model.train() (and decorrelate() the model first)")
        for name, m in layers:
            if m._decor_rows and m._decor_rows[0].device != m.decor_R.device:
                raise UsageError(f"decor.update: layer {name!r} moved to {m.decor_R.device} after its inputs were "
                                 f"sampled on {m._decor_rows[0].device}; call update() before moving the model")

    if first:  # a rank whose layers are refused stops every rank with the reason
        agree(check_samples, group, "checking its decorrelated layers")
        _agreed_layouts[model] = layout
    else:
        check_samples()
    for _, m in layers:
        if m._decor_sum is not None and m._decor_rows:  # rows sampled after the last fold into S count too
            m._decor_sum, m._decor_rows = m.decor_dense_sum(), []
    if group is not None:  # the global S of every layer (each keeps its own samples until the end)
        sums, counts = _all_reduce(layers, group)
    else:
        sums = [m._decor_sum for _, m in layers]  # None where a layer holds few rows
        counts = torch.tensor([float(m._decor_count) for _, m in layers], dtype=torch.float64,
                              device=layers[0][1].decor_R.device)

    # one group per (d, dtype, device) and path: S (one bmm X R), or few rows (Z^T (Z R))
    groups: dict[tuple, list[int]] = {}
    for i, (_, m) in enumerate(layers):
        R = m.decor_R
        rows = sum(z.shape[0] for z in m._decor_rows) if sums[i] is None else None
        groups.setdefault((R.shape[0], R.dtype, R.device, rows), []).append(i)

    losses, norms, finite_inputs, order, new_rs = [], [], [], [], []
    home = counts.device  # the per-layer results meet here; each group computes on its own layers' device
    for (d, dtype, device, rows), idx in groups.items():
        n = counts[idx].to(device=device)  # float64 or float32: the step casts it to its dtype
        new, loss, finite = _group_step([layers[i][1] for i in idx], n,
                                        None if rows is not None else [sums[i] for i in idx])
        losses.append((loss if group is None else torch.where(n > 0, loss, torch.zeros_like(loss))).to(home))
        norms.append((torch.linalg.matrix_norm(new).to(torch.float64) / math.sqrt(d)).to(home))
        finite_inputs.append(finite.to(home))
        order += idx
        new_rs.append(new)
    if any(m.decor_R.dtype in (torch.float16, torch.bfloat16) for _, m in layers):
        warn_at_caller("decor.update: the decorrelation matrices R are stored in 16-bit floats (the model was cast), "
                       "which round away steps below about 1/256 (bfloat16) or 1/2048 (float16) of an entry, so R "
                       "barely moves at small lr; keep the model in float32 and train under torch.autocast",
                       UserWarning)  # past torch.no_grad's wrapper

    if check:
        norm = torch.cat(norms)
        limits = torch.tensor([layers[i][1].decor_max_norm for i in order], dtype=torch.float64, device=norm.device)
        bad = ~torch.isfinite(norm) | (norm > limits)
        if bool(bad.any()):  # the one host sync of an update
            j = int(bad.nonzero()[0, 0])
            name, m = layers[order[j]]
            if not bool(torch.cat(finite_inputs)[j]):
                for _, layer in layers:  # samples holding NaN would fail every later update too
                    layer.decor_reset()
                raise DecorrelationDivergedError(
                    f"the inputs layer {name!r} sampled since the last update hold NaN or Inf, so its decorrelation "
                    f"matrix R cannot be updated (it is left as before this update, as is every R, and the samples "
                    f"are dropped); check the data and the layers before it (a lower learning rate, of the network "
                    f"or of decorrelation, may help if those diverged)")
            # the samples are kept: update(model) again after lowering the rate takes the same step
            raise DecorrelationDivergedError(
                f"decorrelation matrix R of layer {name!r} diverged (||R||_F/sqrt(d) = {float(norm[j]):.3g}, limit "
                f"{m.decor_max_norm:g}) at decorrelation lr={m.decor_lr:g}; R is left as before this update and the "
                f"sampled inputs are kept. Lower it, e.g. set layer.decor_lr = {m.decor_lr / 10:g} on every layer "
                f"of tk.decor.decorrelated_layers(model), and call update(model) again")
    for _, m in layers:
        m.decor_reset()
    for idx, new in zip((groups[k] for k in groups), new_rs):
        for i, r in zip(idx, new.unbind(0)):
            layers[i][1].decor_R.copy_(r)
    if group is None:
        return torch.cat(losses).mean()
    total = torch.cat(losses)
    return total.sum() / (counts > 0).sum().clamp(min=1)


def _deepcopy(model: nn.Module) -> nn.Module:
    """copy.deepcopy of `model`, also where torch.nn.utils.spectral_norm's or weight_norm's hook
    left its computed weight in the module (a tensor with a history, which deepcopy refuses):
    the copy gets it detached, and its own hook recomputes it before every forward."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            value = getattr(m, hook.name, None) if isinstance(hook, NORM_HOOKS) else None
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except RuntimeError as exc:  # a tensor with a history held outside those hooks
        raise InvalidArgumentError(f"decor.fold copies the model, and copy.deepcopy refused it ({exc}); a module "
                                   "keeps a tensor computed with gradients as an attribute: detach it, or run the "
                                   "model once under torch.no_grad() before fold()") from exc


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose decorrelated layers are plain nn.Linear / nn.Conv1d /
    nn.Conv2d with W R folded into their weights (no R, no per-forward fold): for inference
    and export. Its state_dict loads into the original (never decorrelated) architecture.
    A weight that torch.nn.utils.spectral_norm's or weight_norm's hook computed in a forward
    is copied detached (the copy's hook recomputes it); any other module attribute that
    deepcopy refuses is named in an InvalidArgumentError.
    A decorrelated layer whose weight another module shares (tied after decorrelate()) is
    refused: folding would change the weight the others read."""
    check_module(model, "decor.fold's model")
    _refuse_tied(model, decorrelated_layers(model), "untie them (give each its own nn.Parameter) before "
                                                     "decorrelate(), or skip {names} there")
    parametrized = [name or "<root>" for name, m in decorrelated_layers(model)
                    if torch.nn.utils.parametrize.is_parametrized(m, "weight")]
    if parametrized:  # its weight is computed: W R written into it would be lost, and the layer has no plain class
        raise InvalidArgumentError(f"decor.fold: the decorrelated layers {parametrized[:5]} compute their weight "
                                   "through a parametrization (prune.apply_masks held, tk.factorize, weight_norm), "
                                   "which W R cannot be written into; leave apply_masks, tk.collapse(model) or "
                                   "remove the parametrization first")
    out = _deepcopy(model)
    for _, m in decorrelated_layers(out):
        m.weight.copy_(m.decor_folded_weight())
        m._decor_remove_hook()
        del m._buffers[BUFFER]
        for attr in ("decor_lr", "decor_kappa", "decor_sample_fraction", "decor_max_norm", "_decor_sum",
                     "_decor_rows", "_decor_count", "_decor_sampler"):
            m.__dict__.pop(attr, None)
        m.__class__ = _PLAIN[type(m)]
    return out
