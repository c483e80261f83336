"""Which modules are weight layers: those whose `weight` multiplies their input.

torch's Linear and convolutions, and transformers' Conv1D, the linear layer of GPT-2 and
its kin, which stores its weight as (in, out), the transpose of Linear's. Methods that act
on weights elementwise (pruning masks, factorisations) treat all of them alike; a method
that needs the layout (decorrelation) checks for Conv1D itself.
"""

from __future__ import annotations

import sys

from torch import nn

TORCH_WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


def transformers_conv1d() -> type[nn.Module] | None:
    """transformers' Conv1D class where transformers has loaded it (a model holding one has),
    else None: nothing here imports transformers."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def weight_layer_types() -> tuple[type[nn.Module], ...]:
    """Linear, every convolution, and transformers' Conv1D where it is loaded."""
    conv1d = transformers_conv1d()
    return TORCH_WEIGHT_LAYERS + ((conv1d,) if conv1d is not None else ())
