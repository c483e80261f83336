"""One module per backend; importing a module registers its kernels with twa_kernels._ops.

Each module has one function per op it implements (an op a backend lacks falls back as
twa_kernels/_ops.py says), named after it, taking the op's arguments in the
order of its schema in twa_kernels/_ops.py (the packed basis as codes, scales, mins,
block_offsets, bits and group_size); what each op computes is documented there and in
docs/design.md ("Math of each op"). Users call the ops (twa_kernels.ops), never these.

reference.py is the executable spec (plain torch, float64 accumulation). The TWA papers'
own code paths, the baseline that benchmarks beat, are not a backend: bench/paper_baseline.py.
"""

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch


def on_tensors_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run a kernel wrapper with its first tensor argument's GPU as the current
    device, since CUDA and Triton kernels launch on the current device, not the tensors'."""

    @functools.wraps(fn)
    def wrapper(*args):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return fn(*args)

    return wrapper
