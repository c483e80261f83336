"""Deep weight factorization (DWF; Kolb et al., arXiv 2502.02496): sparsity from plain weight decay.

Each chosen weight becomes an elementwise product of D factors, w = omega_1 * ... * omega_D.
Ordinary weight decay wd on the factors, (wd / 2) sum_d ||omega_d||^2, is minimised over all
factorisations of the same w by balanced factors (|omega_d| = |w|^(1/D)), where it equals
(wd * D / 2) ||w||_{2/D}^{2/D}: an L1 penalty for D = 2 (the lasso) and a sparser, non-convex
quasi-norm for D > 2. So an unchanged training loop with weight decay on the factors trains a
sparse network; `collapse` reads it out (product, then |w| < float32 eps set to zero).

    tk.factorize(model, depth=3)                      # in place; Linear/Conv weights factorised
    opt = torch.optim.SGD(tk.factor_param_groups(model, weight_decay=1e-4), lr=3 * base_lr)
    ...train...
    plain = tk.collapse(model); print(tk.sparsity_report(plain))

Mechanism: torch.nn.utils.parametrize rather than swapping the layers for factorised
subclasses: it keeps the layers' own classes and forward code (any Linear/Conv subclass,
hooks, deepcopy and torch.compile work) and gives readable state_dict keys,
`<layer>.parametrizations.weight.original0 ... original{D-1}`. bench/test_bench_factorize.py
times it against a module swap (a pre-hook writing the product into a plain attribute) on
ResNet-18. Both compute the product once per forward per layer; in two noisy runs their D = 3
SGD steps swapped order (swap 255 vs 287 ms, then 207 vs 187 ms; AMD EPYC, 2 cores,
2026-11-23, commit e935fff; results/dwf/bench*.json), so the cost is the same within noise
and the choice is for compatibility. The product is
computed when the layer reads its weight, i.e. once per forward per layer; code that reads
`layer.weight` several times per step can wrap the step in
`torch.nn.utils.parametrize.cached()`. Its gradient is one autograd function, `_Product`: the
forward multiplies in place into one output and saves only the factors (autograd's chain of
multiplies also saves its D - 2 intermediate products), and the backward builds each factor's
gradient from prefix and suffix products of the saved factors.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from twa_kernels._checks import check_module, flag, is_whole_number, real
from twa_kernels._random import generator_or_seed
from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, warn_at_caller
from twa_kernels.io import tied_owners
from twa_kernels.layers import TORCH_WEIGHT_LAYERS, attention_projections, computed_weight, weight_layer_types

logger = logging.getLogger(__name__)

#: torch's layers whose `weight` is the layer's multiplicative weight (Linear, every conv).
#: By default layers.weight_layer_types() is factorised: these, and transformers' Conv1D
#: (GPT-2's linear layer) where it is loaded.
DEFAULT_LAYERS: tuple[type[nn.Module], ...] = TORCH_WEIGHT_LAYERS
EPS = torch.finfo(torch.float32).eps


LayerSpec = Union[None, Iterable[Union[str, type]]]


class FactorizationError(InvalidArgumentError):
    """Bad input to the factorisation: a layer it cannot factorise, a depth below 2, a
    non-positive init scale, or weight decay on a weight the factorisation replaced."""


def _product(factors: tuple[Tensor, ...]) -> Tensor:
    """prod_d factors[d], left to right (one new tensor, multiplied in place)."""
    out = factors[0] * factors[1]
    for f in factors[2:]:
        out.mul_(f)
    return out


class _Product(torch.autograd.Function):
    """w = prod_d omega_d elementwise; backward from the saved factors, no saved intermediates.

    In torch.func's form (setup_context, jvp, a generated vmap rule), so the Hessian tools'
    vmap(jvp(grad)) runs through a factorised model; the backward is made of torch ops, so it
    is itself differentiable, forward or reverse."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*factors: Tensor) -> Tensor:
        return _product(factors)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def jvp(ctx, *tangents: Tensor | None) -> Tensor:
        # d(prod_j f_j) = sum_i t_i * prod_{j != i} f_j
        factors = ctx.saved_tensors
        out = None
        for i, t in enumerate(tangents):
            if t is None:
                continue
            term = t
            for j, f in enumerate(factors):
                if j != i:
                    term = term * f
            out = term if out is None else out + term
        return out if out is not None else torch.zeros_like(factors[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        factors = ctx.saved_tensors
        d = len(factors)
        if d == 2:
            return grad * factors[1], grad * factors[0]
        # grad_i = grad * prefix_i * suffix_i; suffix products built right to left once.
        suffix = [None] * d
        suffix[d - 1] = grad * factors[d - 1]
        for i in range(d - 2, 0, -1):
            suffix[i] = suffix[i + 1] * factors[i]
        grads = [suffix[1]]
        prefix = factors[0]
        for i in range(1, d - 1):
            grads.append(suffix[i + 1] * prefix)
            prefix = prefix * factors[i]
        grads.append(grad * prefix)
        return tuple(grads)


class DeepFactorization(nn.Module):
    """The parametrization w = prod_d omega_d (registered by `factorize`, one per layer).

    `right_inverse` turns a dense weight into D balanced factors (sign on the first; a zero
    entry into 0 times nonzero factors, so that it can train), which is
    how `init="keep"` factorises the current weights exactly (to the dtype's rounding: about
    1e-7 relative in float32, 1e-3 in float16, 1e-2 in bfloat16); DWF's random initialisation
    overwrites the factors afterwards.
    """

    def __init__(self, depth: int, replaced: Tensor | None = None):
        super().__init__()
        self.depth = depth
        # the dense weight this replaced, so that an optimizer still holding it can be caught
        self._replaced = weakref.ref(replaced) if replaced is not None else (lambda: None)

    def forward(self, *factors: Tensor) -> Tensor:
        """The weight: the elementwise product of the factors. Without grad mode, and under
        torch.compile, the product is plain torch ops (forward-mode AD and vmap still see
        them): the Function only saves memory in a backward, torch.compile fails on it under
        no_grad, and with grad it breaks the graph at every layer, as Dynamo cannot trace an
        autograd.Function with a jvp (torch 2.13)."""
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return _product(factors)
        return _Product.apply(*factors)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, ...]:
        """Balanced factors of `weight`: each |w|^(1/D), the first carrying its sign. A zero
        entry gets 0 in the first factor and, in the others, the mean factor magnitude of the
        tensor's nonzero entries (1 if it has none): all-zero factors would have zero gradients
        and stay zero for good (a zero-initialised bias could never train)."""
        root = weight.abs().pow(1.0 / self.depth)
        live = (weight != 0) & torch.isfinite(weight)  # a NaN among them would make the fill NaN, and 0 * NaN too
        count = live.sum()
        # summed in float32 at least: a float16 sum of a million factors overflows, and 0 * inf is NaN
        wide = root.to(torch.promote_types(root.dtype, torch.float32))
        typical = (wide * live).nan_to_num(0.0).sum() / count.clamp(min=1)
        fill = torch.where(count > 0, typical, 1.0).clamp(max=torch.finfo(root.dtype).max).to(root.dtype)
        rest = torch.where(weight == 0, fill, root)
        return (torch.sign(weight) * root,) + tuple(rest.clone() for _ in range(self.depth - 1))

    def extra_repr(self) -> str:
        """The depth, in the module's repr."""
        return f"depth={self.depth}"


def _check_depth(depth: int) -> int:
    """depth as an int (numpy's too), or a FactorizationError naming what it must be."""
    if not is_whole_number(depth) or depth < 2:
        raise FactorizationError(
            f"depth={depth!r}: DWF needs an integer depth D >= 2 (D = 2 is the lasso, D = 3 or 4 are sparser)")
    return int(depth)


def _check_eps(eps: float) -> float:
    """eps as a float (numpy's too), or a FactorizationError naming what it must be."""
    # eps^(1/D) bounds |omega| from below: a negative eps has a complex root
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 <= eps < math.inf:
        raise FactorizationError(f"eps={eps!r}: the truncation bound eps^(1/D) < |omega| needs a finite eps >= 0 "
                                 f"(the default is float32 eps, {EPS:g})")
    return float(eps)


def truncation_bounds(sigma_w: float, depth: int, eps: float = EPS) -> tuple[float, float, float]:
    """(std, low, high) of DWF's factor distribution: N(0, sigma_w^(2/D)) with
    eps^(1/D) < |omega| < min(1, (2 sigma_w)^(1/D)); eps must be finite and >= 0, and the
    band must not be empty (sigma_w above eps / 2)."""
    depth, eps = _check_depth(depth), _check_eps(eps)
    if not real("sigma_w", sigma_w) > 0:  # an infinite scale drew every factor as NaN
        raise FactorizationError(f"sigma_w={sigma_w!r}: the init scale must be a finite number > 0 (pass sigma_w= "
                                 "or init='keep')")
    std, low, high = sigma_w ** (1.0 / depth), eps ** (1.0 / depth), min(1.0, (2.0 * sigma_w) ** (1.0 / depth))
    if not low < high:  # the truncated normal has no mass: every number built on it would be meaningless
        raise FactorizationError(f"sigma_w={sigma_w!r} is below eps/2: the truncation band of depth {depth} is "
                                 "empty; pass a larger sigma_w= or a smaller eps=")
    return std, low, high


# Below this upper end of the standardised band (hi / std) the normal density is flat to
# within 5e-5 over it, and the formulas that subtract its CDF at the two ends lose digits.
_FLAT_BAND = 1e-2


def truncated_std(sigma_w: float, depth: int, eps: float = EPS) -> float:
    """The standard deviation the product of D independent DWF factors has (exact for the
    truncated normal): sigma_w times the factor by which truncation shrinks it."""
    s, lo, hi = truncation_bounds(sigma_w, depth, eps)
    a, b = lo / s, hi / s
    if b < _FLAT_BAND:
        # a band this near 0 (sigma_w far above 1, where |omega| < 1 caps it): the closed form
        # below is 1 minus nearly 1, which lost every digit (a negative std at sigma_w = 1e16).
        # The density there is 1 - z^2 / 2 to within b^4: E[z^2] from its moments, over
        # b^2 (with r = a / b), so that no power of b underflows; s * b is hi.
        r = a / b
        ratio = ((1 - r**3) / 3 - b * b * (1 - r**5) / 10) / ((1 - r) - b * b * (1 - r**3) / 6)
        return (hi * hi * ratio) ** (depth / 2.0)
    else:
        phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
        mass = math.erf(b / math.sqrt(2)) - math.erf(a / math.sqrt(2))  # P(a < |z| < b)
        second = 1.0 + 2.0 * (a * phi(a) - b * phi(b)) / mass  # E[z^2 | a < |z| < b]
    return (s * s * second) ** (depth / 2.0)


def matched_sigma(sigma_w: float, depth: int, eps: float = EPS) -> float:
    """The sigma to give DWF's truncated init so that the product's std is `sigma_w` itself
    (truncation alone leaves it at about 51%, 28%, 17% of sigma_w for D = 2, 3, 4). Bisection
    on `truncated_std`, which grows with sigma."""
    truncation_bounds(sigma_w, depth, eps)  # validates
    lo, hi = sigma_w, 1e4
    if truncated_std(hi, depth, eps) < sigma_w:  # factors capped at |omega| < 1: std <= 3^(-D/2)
        logger.warning("sigma_w=%g: no truncated DWF init of depth %d reaches that std; using the largest, %g",
                       sigma_w, depth, truncated_std(hi, depth, eps))
        return hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if truncated_std(mid, depth, eps) < sigma_w else (lo, mid)
    return hi


@torch.no_grad()
def dwf_init_(factor: Tensor, sigma_w: float, depth: int, eps: float = EPS, seed: int | None = None, *,
              generator: torch.Generator | None = None) -> Tensor:
    """Fill `factor` in place from N(0, sigma_w^(2/D)) truncated to eps^(1/D) < |x| < min(1, (2 sigma_w)^(1/D)),
    by inverting the normal CDF on the allowed band of |x| (exact, no rejection loop). An int
    `seed` draws from a private generator (torch's global RNG untouched), None from the
    global RNG; `generator=` is deprecated."""
    if not isinstance(factor, Tensor) or not factor.is_floating_point() or factor.is_meta:
        got = f"{factor.dtype} on {factor.device}" if isinstance(factor, Tensor) else type(factor).__name__
        raise FactorizationError(f"dwf_init_ fills a floating-point tensor with values in place, got {got}")
    if any(stride == 0 and size > 1 for stride, size in zip(factor.stride(), factor.shape)):  # an expanded view
        raise FactorizationError("dwf_init_ got a tensor whose elements overlap in memory (an expanded view); pass a "
                                 "tensor that owns its elements (.clone())")
    return _dwf_init(factor, sigma_w, depth, eps, generator_or_seed(seed, generator, "dwf_init_"))


@torch.no_grad()
def _dwf_init(factor: Tensor, sigma_w: float, depth: int, eps: float, generator: torch.Generator | None) -> Tensor:
    s, lo, hi = truncation_bounds(sigma_w, depth, eps)
    u = torch.rand(factor.shape, dtype=torch.float64, generator=generator)
    if hi / s < _FLAT_BAND:
        # a band near 0: the normal CDF there is 0.5 plus less than float64 keeps, so its
        # inverse gave every factor the band's lower end; erf keeps the digits near 0
        e_lo, e_hi = math.erf(lo / s / math.sqrt(2)), math.erf(hi / s / math.sqrt(2))
        mag = s * (math.sqrt(2) * torch.special.erfinv(e_lo + u * (e_hi - e_lo))).clamp_(lo / s, hi / s)
    else:
        normal = torch.distributions.Normal(0.0, 1.0)
        c_lo = normal.cdf(torch.tensor(lo / s, dtype=torch.float64))
        c_hi = normal.cdf(torch.tensor(hi / s, dtype=torch.float64))
        mag = s * torch.special.ndtri(c_lo + u * (c_hi - c_lo)).clamp_(lo / s, hi / s)
    sign = torch.randint(0, 2, factor.shape, generator=generator).to(torch.float64).mul_(2).sub_(1)
    return factor.copy_(mag * sign)


def _is_factorized(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and isinstance(
        module.parametrizations.weight[0], DeepFactorization)


def _select(model: nn.Module, layers: LayerSpec, biases: bool = False) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to factorise: default layer types, or the given names / types.
    Refuses a layer whose weight (or, with biases, bias) Parameter another module shares."""
    if layers is None:
        types = weight_layer_types()
        chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
        # a weight computed by another parametrization (weight_norm, spectral_norm) has no
        # Parameter to factorise: left out of the default choice, refused when named
        computed = {n: why for n, m in chosen if not _is_factorized(m) and (why := computed_weight(m))}
        for cause, fix in dict.fromkeys(computed.values()):  # one warning per cause, naming its layers
            names = [n for n, why in computed.items() if why == (cause, fix)]
            warn_at_caller(f"factorize leaves out {names}: each weight is {cause}, so factors would not reach the "
                           f"weight the layer computes with; to factorise such a layer, {fix}", UserWarning)
        chosen = [(n, m) for n, m in chosen if n not in computed]
        if attention := attention_projections(model):
            warn_at_caller(f"factorize leaves out {attention}: nn.MultiheadAttention holds its query, key and value "
                           "projections as Parameters of its own, not in Linear layers (its out_proj is factorised)",
                           UserWarning)
        # a weight tied to another module (an output layer sharing an embedding's) is left
        # out of the default choice; named in layers= it is refused below
        tied = {n: others for n, m in chosen if (others := tied_owners(model, m))}
        if tied and len(tied) == len(chosen):
            raise FactorizationError(f"every layer to factorise shares its weight Parameter with another module "
                                     f"(tied weights: {tied}); untie them first (give each its own nn.Parameter)")
        if tied:
            warn_at_caller(f"factorize leaves out {sorted(tied)}: each shares its weight Parameter with another "
                           f"module ({tied}); untie them to factorise them", UserWarning)
            chosen = [(n, m) for n, m in chosen if n not in tied]
    else:
        if not isinstance(layers, (str, type, Iterable)) or isinstance(layers, Mapping):
            raise FactorizationError(f"layers must be None, module names and/or nn.Module types, got "
                                     f"{type(layers).__name__} {layers!r:.80}")
        specs = [layers] if isinstance(layers, (str, type)) else list(layers)  # one name or type, not its characters
        if not specs:
            raise FactorizationError(f"layers={layers!r} names no layer to factorise; pass None for every "
                                     "Linear/Conv layer, or the names or types to factorise")
        # every name of a module used twice is found; the module itself is factorised once
        modules = dict(model.named_modules(remove_duplicate=False))
        chosen, seen = [], set()
        for spec in specs:
            if isinstance(spec, str):
                if spec not in modules:
                    raise FactorizationError(f"layers: no module named {spec!r} in the model "
                                             f"(names as in model.named_modules(), e.g. {next(iter(modules), '')!r})")
                hits = [(spec, modules[spec])]
            elif isinstance(spec, type) and issubclass(spec, nn.Module):
                hits = [(n, m) for n, m in modules.items() if isinstance(m, spec)]
            else:
                raise FactorizationError(f"layers: {spec!r} is neither a module name nor an nn.Module type")
            for name, module in hits:
                if id(module) not in seen:
                    seen.add(id(module))
                    chosen.append((name, module))
    for name, module in chosen:
        if _is_factorized(module):
            raise FactorizationError(f"layer {name!r} is already factorised; collapse it first")
        if isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter):
            raise FactorizationError(f"layer {name!r} is lazy: its weight has no shape until the layer first runs; "
                                     "run one forward pass of the model first")
        if (computed := computed_weight(module)) is not None:
            raise FactorizationError(f"layer {name!r} ({type(module).__name__}): its weight is {computed[0]}, so "
                                     f"factors would not reach the weight it computes with, trains and saves; leave "
                                     f"it out of layers=, or {computed[1]}")
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            raise FactorizationError(
                f"layer {name!r} ({type(module).__name__}) has no `weight` parameter to factorise; DWF factorises "
                f"layers whose multiplicative weight is `.weight` (Linear, Conv, Embedding, affine norms): "
                f"leave it out of layers=")
        params = ["weight"] + (["bias"] if biases and isinstance(getattr(module, "bias", None), nn.Parameter) else [])
        for pname in params:
            dtype = getattr(module, pname).dtype
            if not dtype.is_floating_point:  # complex: torch.sign has no real factor of it
                raise FactorizationError(f"layer {name or '(the model itself)'!r}.{pname} is {dtype}; DWF factorises "
                                         "real floating-point weights: leave it out of layers=")
            # a layer reused under two names is one module; another module holding the same
            # Parameter (an output layer tied to an embedding) would keep the dense tensor
            tied = tied_owners(model, module, pname)
            if tied:
                raise FactorizationError(
                    f"layer {name!r}.{pname} is one Parameter shared with {tied} (tied weights): factorising "
                    f"{name!r} would untie them silently. Untie them first (give each its own nn.Parameter), "
                    f"or pass layers= naming the layers to factorise without {[name] + tied}")
    return chosen


def factorize(model: nn.Module, depth: int = 3, layers: LayerSpec = None, biases: bool = False,
              init: str = "dwf", sigma_w: float | Callable[[nn.Module], float] | None = None,
              eps: float = EPS, seed: int | None = None, *, generator: torch.Generator | None = None) -> nn.Module:
    """Factorise the weights of `model` in place into `depth` factors each, and return it.

    layers: None for every Linear / Conv / ConvTranspose layer, or module names and/or
        module types (norm layers and Embedding are factorised only when named this way).
    biases: also factorise those layers' biases (default: they stay dense).
    init: "dwf" draws each factor from N(0, sigma_w^(2/D)) truncated to
        eps^(1/D) < |omega| < min(1, (2 sigma_w)^(1/D)) (the paper's initialisation);
        "dwf_matched" is that distribution with its sigma raised so that the product's std
        equals sigma_w (the truncation otherwise leaves the product at 51% / 28% / 17% of
        sigma_w for D = 2 / 3 / 4, which at D >= 3 can trap a deep net at w = 0);
        "keep" factorises the current weights exactly into balanced factors (to the
        rounding of the weights' dtype: float16 and bfloat16 products differ in the last bits).
    sigma_w: the layer's usual init std; None measures it from the current weight (right at
        construction that is PyTorch's default init), a callable gets the module.
    eps: the lower truncation bound above, finite and >= 0.
    A layer whose weight Parameter another module shares (tied weights, e.g. an output
    layer tied to an embedding) is left out with a warning, and refused when named in
    `layers`: factorising it would untie them. Untie them first to factorise it. So is a
    layer whose weight another parametrization computes (weight_norm, spectral_norm), and,
    unless init="keep", a frozen layer or frozen bias (requires_grad=False), whose random
    factors would never train. A lazy layer that has not run yet is refused, and so is a
    complex one. An Embedding's padding row stays zero (its first factor's row is zero: the
    row gets no gradient). On the meta device no factor is drawn (a warning): after
    `to_empty`, load a state_dict of the factorised model or draw them with `dwf_init_`.
    Train with weight decay wd on the factors (`factor_param_groups`): the penalty is then
    (wd * D / 2) ||w||_{2/D}^{2/D}. DWF wants a larger learning rate than the dense model.
    seed: an int draws every factor from one private generator (reproducible; torch's global
        RNG untouched); None draws from the global RNG. `generator=` is deprecated.
    """
    check_module(model, "factorize's model")
    flag("factorize's biases", biases)
    gen = generator_or_seed(seed, generator, "factorize")
    depth, eps = _check_depth(depth), _check_eps(eps)
    if init not in ("dwf", "dwf_matched", "keep"):
        raise FactorizationError(f"init={init!r}: use 'dwf' (the paper's random init), 'dwf_matched' (the same, "
                                 f"scaled so the product's std is sigma_w) or 'keep' (current weights)")
    targets = _select(model, layers, biases)
    frozen = [name for name, module in targets if not module.weight.requires_grad]
    if frozen and init != "keep":  # random factors that can never train would replace a frozen layer's weights
        if layers is not None:
            raise FactorizationError(f"layer {frozen[0]!r} is frozen (requires_grad=False), and init={init!r} would "
                                     "replace its weights with random factors that never train; factorise it with "
                                     "init='keep', or leave it out of layers=")
        warn_at_caller(f"factorize leaves out the frozen layers {frozen} (requires_grad=False): init={init!r} would "
                       "replace their weights with random factors that never train; init='keep' factorises them "
                       "exactly", UserWarning)
        targets = [(name, module) for name, module in targets if name not in frozen]
    if not targets:
        raise FactorizationError("no layer to factorise: the model has no Linear/Conv layer that factorize can "
                                 "reach (a warning above names any it left out; pass layers=)")

    def has_bias(module: nn.Module) -> bool:
        return biases and isinstance(getattr(module, "bias", None), nn.Parameter)

    # a frozen bias of a trainable layer: the layer's weight is factorised, its bias kept as it is
    frozen_biases = [name for name, module in targets if has_bias(module) and not module.bias.requires_grad]
    shown = [name or "(the model itself)" for name in frozen_biases]
    if frozen_biases and init != "keep":
        if layers is not None:
            raise FactorizationError(f"the bias of layer {shown[0]!r} is frozen (requires_grad=False), and "
                                     f"init={init!r} would replace it with random factors that never train; "
                                     "factorise it with init='keep', or pass biases=False")
        warn_at_caller(f"factorize leaves the frozen biases of {shown} as they are (requires_grad=False): "
                       f"init={init!r} would replace them with random factors that never train", UserWarning)
    # every scale is measured and checked before the first layer changes: an error leaves the model as it was
    plan = []
    for name, module in targets:
        names = ["weight"] + (["bias"] if has_bias(module) and (init == "keep" or name not in frozen_biases) else [])
        for pname in names:
            plan.append((module, pname, None if init == "keep" else _init_scale(name, module, pname, sigma_w, depth,
                                                                               eps, init)))
    on_meta = sorted({name for name, module in targets if module.weight.is_meta})
    if on_meta and init != "keep":
        warn_at_caller(f"the layers {on_meta[:5]} are on the meta device, which holds no values, so their factors "
                       "are not drawn: after model.to_empty(device=...), load a state_dict of the factorised model, or "
                       "draw each factor (factor_parameters(model)) with dwf_init_ (and zero an Embedding's padding "
                       "row in its first factor)", UserWarning)
    own = {id(module): (module, dict(module._parameters)) for module, _, _ in plan}  # objects and order
    added: list[tuple[nn.Module, str]] = []
    try:
        for module, pname, scale in plan:
            parametrize.register_parametrization(module, pname, DeepFactorization(depth, getattr(module, pname)),
                                                 unsafe=True)
            added.append((module, pname))
            plist = module.parametrizations[pname]
            if init != "keep" and not plist.original0.is_meta:
                for i in range(depth):
                    _dwf_init(getattr(plist, f"original{i}"), scale, depth, eps, gen)
                padding = getattr(module, "padding_idx", None) if pname == "weight" else None
                if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and padding is not None:
                    # the padding row gets no gradient: a zero factor keeps it zero, as init="keep" does
                    with torch.no_grad():
                        plist.original0[padding] = 0
    except BaseException:
        # a Ctrl-C, or memory for the factors running out: layers factorised so far would be
        # refused by a retry ("already factorised"), so each gets its own Parameters back
        for module, pname in reversed(added):
            parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
        for module, params in own.values():
            module._parameters.clear()
            module._parameters.update(params)
        raise
    logger.info("factorised %d layers into %d factors each", len(targets), depth)
    return model


def _init_scale(name: str, module: nn.Module, pname: str, sigma_w: float | Callable[[nn.Module], float] | None,
                depth: int, eps: float, init: str) -> float | None:
    """The std factorize draws a weight's factors for: sigma_w, or measured from the weight."""
    dense = getattr(module, pname)
    if dense.is_meta:  # no values to draw into (factorize warns): a number given is checked all the same
        if sigma_w is not None and not callable(sigma_w):
            try:
                truncation_bounds(sigma_w, depth, eps)
            except InvalidArgumentError as err:
                raise FactorizationError(f"layer {name!r}.{pname}: {err}") from None
        return None
    scale = sigma_w(module) if callable(sigma_w) else sigma_w
    if scale is None and dense.numel() <= 1:  # no spread to measure: std() of one value is NaN
        raise FactorizationError(f"layer {name or '(the model itself)'!r}.{pname} has {dense.numel()} element(s), "
                                 "so sigma_w cannot be measured from it; pass sigma_w= (a number, or a function of "
                                 "the module that returns one), or init='keep'")
    scale = float(dense.detach().float().std()) if scale is None else scale
    try:
        # checked here, before any layer changes, not when its factors are drawn
        truncation_bounds(scale if scale is not None else 0.0, depth, eps)
        return matched_sigma(scale, depth, eps) if init == "dwf_matched" else scale
    except InvalidArgumentError as err:  # the number checks' own errors too: named with the layer
        raise FactorizationError(f"layer {name!r}.{pname}: {err}") from None


def factor_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every factor in `model`."""
    check_module(model, "factor_parameters's model")
    out = []
    for name, module in model.named_modules():
        if _is_factorized(module):
            for pname, plist in module.parametrizations.items():
                out += [(f"{name}.{n}".lstrip("."), p) for n, p in plist.named_parameters(prefix=f"parametrizations.{pname}")]
    return out


def factor_param_groups(model: nn.Module, weight_decay: float, other_weight_decay: float = 0.0,
                        **group_options: Any) -> list[dict]:
    """Two optimizer parameter groups: the factors with `weight_decay` (the DWF penalty) and
    everything else (biases, norms, unfactorised layers) with `other_weight_decay`.
    Extra keyword options (e.g. lr) go into both groups."""
    check_module(model, "factor_param_groups's model")
    if "params" in group_options:
        raise FactorizationError("factor_param_groups puts the model's parameters into its groups itself: leave "
                                 "params= out (the other keyword options go into both groups)")
    for name, value in (("weight_decay", weight_decay), ("other_weight_decay", other_weight_decay)):
        if not real(name, value) >= 0:
            raise FactorizationError(f"{name} must be >= 0, got {value}")
    factors = factor_parameters(model)
    if not factors:
        raise FactorizationError("the model has no factorised layer: call tk.factorize(model, depth) first")
    ids = {id(p) for _, p in factors}
    others = [p for p in model.parameters() if id(p) not in ids]
    groups = [dict(params=[p for _, p in factors], weight_decay=weight_decay, **group_options)]
    if others:
        groups.append(dict(params=others, weight_decay=other_weight_decay, **group_options))
    return groups


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise FactorizationError if `optimizer` would decay (or update) a dense weight that
    `factorize` replaced (an optimizer built before factorising), or misses factors."""
    check_module(model, "check_optimizer's model")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidTypeError(f"check_optimizer takes a torch.optim.Optimizer, got {type(optimizer).__name__}; pass "
                               "the optimizer built over the factorised model's parameters")
    replaced = {}
    for name, module in model.named_modules():
        if _is_factorized(module):
            for pname, plist in module.parametrizations.items():
                dense = plist[0]._replaced()
                if dense is not None:
                    replaced[id(dense)] = f"{name}.{pname}"
    held = set()
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            held.add(id(p))
            if id(p) in replaced:
                raise FactorizationError(
                    f"optimizer param_groups[{i}] (weight_decay={group.get('weight_decay', 0)}) holds the dense "
                    f"weight {replaced[id(p)]!r} that factorize() replaced: its decay would act on a tensor the "
                    f"model no longer uses. Build the optimizer after factorize(), e.g. from "
                    f"tk.factor_param_groups(model, weight_decay)")
    # frozen factors (a frozen layer factorised with init='keep') train in no optimizer
    missing = [n for n, p in factor_parameters(model) if p.requires_grad and id(p) not in held]
    if missing:
        raise FactorizationError(f"optimizer does not hold the factors {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                                 f"build it from tk.factor_param_groups(model, weight_decay)")


@torch.no_grad()
def _check_threshold(threshold: float) -> None:
    if not real("threshold", threshold) >= 0:  # finite, as real() checks; NaN or < 0 would zero nothing
        raise FactorizationError(f"threshold={threshold!r}: |w| < threshold counts as zero, so it must be a finite "
                                 f"number >= 0 (the default is eps={EPS})")


def collapse(model: nn.Module, threshold: float = EPS) -> nn.Module:
    """A plain copy of `model`: every factorised weight replaced by its product, with
    |w| < threshold set to 0 (threshold finite and >= 0). Its state_dict loads into the
    original architecture."""
    check_module(model, "collapse's model")
    _check_threshold(threshold)  # the same rule as sparsity_report's, so the two agree
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if _is_factorized(module):
            weights = {pname: getattr(module, pname) for pname in module.parametrizations.keys()}
            # Not parametrize.remove_parametrizations: a deepcopy shares the injected
            # Parametrized<Layer> class with `model`, and removing would delete the property
            # from that shared class, breaking `model`. Restore the copy's own class instead.
            module.__class__ = module.__class__.__bases__[0]
            del module._modules["parametrizations"]
            for pname, w in weights.items():
                # trainable as the factors were: a frozen factorised weight stays frozen
                setattr(module, pname, nn.Parameter(w.detach().masked_fill(w.abs() < threshold, 0.0),
                                                    requires_grad=w.requires_grad))
            module._dwf_collapsed = tuple(weights)  # so sparsity_report counts what it counted before
    return plain


@dataclass
class SparsityReport:
    """Nonzero counts of the weights DWF sparsifies (every Linear/Conv weight and every
    factorised tensor). compression = total / nonzero."""

    rows: list[tuple[str, int, int]] = field(default_factory=list)  # (name, total, nonzero)

    @property
    def total(self) -> int:
        """Weights counted over all rows."""
        return sum(r[1] for r in self.rows)

    @property
    def nonzero(self) -> int:
        """Weights at or above the threshold, over all rows."""
        return sum(r[2] for r in self.rows)

    @property
    def sparsity(self) -> float:
        """Fraction of the weights below the threshold."""
        return 1.0 - self.nonzero / self._counted()

    @property
    def compression(self) -> float:
        """total / nonzero: how many times fewer weights a sparse format would store. A model
        whose every weight is below the threshold counts as one nonzero (compression = total),
        so that means over runs, some of which collapse to zero, stay finite."""
        return self._counted() / max(self.nonzero, 1)

    def _counted(self) -> int:
        if self.total == 0:  # no weights is not "all zero"
            raise FactorizationError("this SparsityReport counts no weights, so it has no sparsity or compression; "
                                     "make one with tk.sparsity_report(model)")
        return self.total

    def to_dict(self) -> dict:
        """Per layer and overall counts, sparsity and compression, as JSON-safe data."""
        return dict(layers={n: dict(total=t, nonzero=z, sparsity=1 - z / max(t, 1)) for n, t, z in self.rows},
                    total=self.total, nonzero=self.nonzero, sparsity=self.sparsity, compression=self.compression)

    def as_dict(self) -> dict:
        """Deprecated name of `to_dict`."""
        warn_at_caller("SparsityReport.as_dict() is deprecated: use to_dict()", DeprecationWarning)
        return self.to_dict()

    def __str__(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [7])
        lines = [f"{'layer':<{width}} {'weights':>10} {'nonzero':>10} {'sparsity':>9}"]
        for name, total, nz in self.rows + [("overall", self.total, self.nonzero)]:
            lines.append(f"{name:<{width}} {total:>10} {nz:>10} {100 * (1 - nz / max(total, 1)):>8.2f}%")
        lines.append(f"compression {self.compression:.1f}x" if self.total else "no weights counted")
        return "\n".join(lines)


@torch.no_grad()
def sparsity_report(model: nn.Module, threshold: float = EPS) -> SparsityReport:
    """Per-layer and overall sparsity of the collapsed weights (|w| < threshold counts as
    zero; NaN and Inf do not).
    It counts every Linear/Conv weight and every factorised tensor (a bias or a norm's weight
    that `factorize` replaced), on a factorised model and on its `collapse` copy alike, so the
    two reports agree; a Parameter that several layers share counts once, under its first
    name, and one tied to an embedding (a language model's output layer) not at all, as
    `factorize` and `tk.prune` leave it out. threshold is a finite number >= 0; a model with
    no weight to count is refused."""
    check_module(model, "sparsity_report's model")
    # a NaN threshold counted every weight as zero (|w| >= nan is False), so a dense layer read as fully sparse
    _check_threshold(threshold)
    types = weight_layer_types()
    report = SparsityReport()
    seen: set[int] = set()
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    for name, module in model.named_modules():
        counted = ["weight"] if isinstance(module, types) else []
        replaced = module.parametrizations.keys() if _is_factorized(module) else getattr(module, "_dwf_collapsed", ())
        counted += [pname for pname in replaced if pname not in counted]
        for pname in counted:
            # a Parameter two layers share (tied weights) is one set of weights, counted once
            stored = module.parametrizations[pname] if parametrize.is_parametrized(module, pname) else \
                getattr(module, pname)
            if id(stored) in seen:
                continue
            seen.add(id(stored))
            if any(other is not module and not isinstance(other, types) for other in owners.get(id(stored), ())):
                continue  # tied to an embedding (an LM's head): factorize and prune leave it out, so does the count
            w = getattr(module, pname)
            # not (|w| < threshold): a NaN or Inf weight of a diverged run is not a zero, which
            # |w| >= threshold (False for NaN) made it, reporting a NaN layer as all pruned
            report.rows.append((f"{name}.{pname}", w.numel(), int((~(w.abs() < threshold)).sum())))
    if report.total == 0:  # no weights is not "all zero": the report would read sparsity 1.0
        raise FactorizationError(f"{type(model).__name__} has no factorised layer and no Linear/Conv weight to count; "
                                 "pass the model whose weights tk.factorize replaced (or its tk.collapse copy)")
    return report


def dwf_lr(dense_lr: float, factor: float = 3.0) -> float:
    """The learning rate to start a DWF run from: `factor` times the dense model's tuned one
    (experiments/dwf.py's sweep measures the best factor; the paper reports 3-4x)."""
    for name, value in (("dense_lr", dense_lr), ("factor", factor)):
        if not real(name, value) > 0:
            raise InvalidArgumentError(f"{name} must be > 0, got {value}")
    return dense_lr * factor


__all__ = ["DEFAULT_LAYERS", "DeepFactorization", "FactorizationError", "SparsityReport", "check_optimizer",
           "collapse", "dwf_init_", "dwf_lr", "factor_param_groups", "factor_parameters", "factorize",
           "matched_sigma", "sparsity_report", "truncated_std", "truncation_bounds"]
