"""Which modules are weight layers (those whose `weight` multiplies their input), and which
of their weights are computed rather than stored.

torch's Linear and convolutions, and transformers' Conv1D, the linear layer of GPT-2 and
its kin, which stores its weight as (in, out), the transpose of Linear's. Methods that act
on weights elementwise (pruning masks, factorisations) treat all of them alike; a method
that needs the layout (decorrelation) checks for Conv1D itself.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm  # the hook-based forms torch still ships
from torch.nn.utils.weight_norm import WeightNorm

# The buffer a decorrelated layer (twa_kernels.decor) holds its R in: the layer computes
# with W R, never with its stored W alone. Its name is part of the checkpoint format.
from twa_kernels.io.keys import DECOR_BUFFER  # noqa: F401  (re-exported for decor and the methods)

# torch.nn.utils.spectral_norm and weight_norm: forward pre-hooks that write `weight` before each forward
NORM_HOOKS = (SpectralNorm, WeightNorm)

TORCH_WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


def transformers_conv1d() -> type[nn.Module] | None:
    """transformers' Conv1D class where transformers has loaded it (a model holding one has),
    else None: nothing here imports transformers."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def weight_layer_types() -> tuple[type[nn.Module], ...]:
    """Linear, every convolution, and transformers' Conv1D where it is loaded."""
    conv1d = transformers_conv1d()
    return TORCH_WEIGHT_LAYERS + ((conv1d,) if conv1d is not None else ())


# The parametrizations of this package's methods (by class name: this module sits below
# them), with how each is undone.
_OWN_PARAMETRIZATIONS = {
    "_Mask": ("masked by tk.prune.apply_masks, which computes it from the stored entries",
              "leave the apply_masks block first"),
    "DeepFactorization": ("the product of tk.factorize's factors",
                          "collapse the factors first (model = tk.collapse(model))"),
}


def computed_weight(module: nn.Module, name: str = "weight") -> tuple[str, str] | None:
    """(why, fix) when the weight the layer computes with is not `module.<name>` held as an
    nn.Parameter, else None: a parametrization's output, a tensor that
    torch.nn.utils.spectral_norm's or weight_norm's forward pre-hook writes before every forward
    (from weight_orig, or weight_g and weight_v), a plain buffer or attribute, or a decorrelated
    layer's W, which it multiplies by R in every forward. Methods that act on the stored weight
    (masks, factors, W R) would not reach the weight such a layer computes with, trains or
    saves. `why` completes "its weight is ..."."""
    if name == "weight" and DECOR_BUFFER in module._buffers:
        return ("multiplied by the layer's decorrelation matrix R in every forward (twa_kernels.decor)",
                "fold R into the weights first (model = tk.decor.fold(model))")
    if parametrize.is_parametrized(module, name):
        kinds = {type(step).__name__ for step in module.parametrizations[name]}
        if kinds & _OWN_PARAMETRIZATIONS.keys():  # this package's: undone by its own call
            kind = sorted(kinds & _OWN_PARAMETRIZATIONS.keys())[0]
            return _OWN_PARAMETRIZATIONS[kind]
        return ("computed by a parametrization (weight_norm, spectral_norm) from the tensors the state_dict holds",
                f"remove it first (torch.nn.utils.parametrize.remove_parametrizations(layer, {name!r}))")
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, SpectralNorm) and hook.name == name:
            return (f"computed by torch.nn.utils.spectral_norm's hook from {name}_orig before every forward",
                    "remove the hook first (torch.nn.utils.remove_spectral_norm(layer)), or use "
                    "torch.nn.utils.parametrizations.spectral_norm and leave the layer out")
        if isinstance(hook, WeightNorm) and hook.name == name:
            return (f"computed by torch.nn.utils.weight_norm's hook from {name}_g and {name}_v before every forward",
                    "remove the hook first (torch.nn.utils.remove_weight_norm(layer)), or use "
                    "torch.nn.utils.parametrizations.weight_norm and leave the layer out")
    value = getattr(module, name, None)
    if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
        kind = "a buffer" if name in module._buffers else "a plain tensor attribute"
        return f"{kind}, not an nn.Parameter", "make it an nn.Parameter first"
    return None


def attention_projections(model: nn.Module) -> list[str]:
    """The names of nn.MultiheadAttention's query, key and value projection weights, which it
    holds as Parameters of its own instead of in Linear layers (its out_proj is a Linear):
    methods that take weight layers leave them out, and say so."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if isinstance(getattr(module, attr, None), nn.Parameter):
                    names.append(f"{name}.{attr}" if name else attr)
    return names
