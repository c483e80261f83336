"""twa-kernels: Trainable Weight Averaging with fused low-bit subspace kernels.

    import twa_kernels as tk
    qb = tk.quantize(P, bits=4, group_size=128)     # P: [k, D] basis
    y = tk.project(qb, g)                            # [k, B]
    y = tk.project_int8(qb, g)                       # the same, g rounded to int8 per group
    w = tk.reconstruct(qb, x, center)                # [D]
    Q = tk.orthonormalize(P)                         # orthonormal rows
    tk.backend("cpu")                                # "cpp" | "triton" | "cuda" | "reference"
"""

from twa_kernels import errors
from twa_kernels.errors import TWAKernelsError
from twa_kernels._ops import backend
from twa_kernels.backends import cpu as _cpu  # noqa: F401  (registers the cpp kernels)
from twa_kernels.backends import reference as _reference  # noqa: F401  (registers the spec)
from twa_kernels.ops import project, project_int8, reconstruct
from twa_kernels.quant import QuantizedBasis, dequantize, quantize
from twa_kernels.subspace import Subspace, orthonormalize
from twa_kernels.twa import TWA
from twa_kernels import distributed  # tk.distributed: TWA across processes
from twa_kernels.optim import SubspaceOptimizer
from twa_kernels.averaging import ema_average, greedy_soup, split_holdout, uniform_average, update_bn
from twa_kernels.io import CheckpointError, load_state_dict, save_state_dict
from twa_kernels import connectivity
from twa_kernels import prune, distill
from twa_kernels import decor  # tk.decor: decorrelated backpropagation
from twa_kernels import factorization
from twa_kernels.factorization import check_optimizer, collapse, factor_param_groups, factorize, sparsity_report
from twa_kernels._memory import keep_freed_memory
from twa_kernels._deprecated import alias_module as _alias_module

# `twa_kernels.factorize` is the function; the module is `twa_kernels.factorization`. The
# module path of the same name imports, with a warning, for code written against it.
_alias_module("twa_kernels.factorize", factorization)

__version__ = "0.1.0"

__all__ = [
    # companion methods and tools, one module each
    "connectivity",
    "decor",
    "distill",
    "distributed",
    "factorization",
    "prune",
    "check_optimizer",
    "collapse",
    "factor_param_groups",
    "factorize",
    "sparsity_report",
    # TWA
    "CheckpointError",
    "TWAKernelsError",
    "errors",
    "QuantizedBasis",
    "Subspace",
    "SubspaceOptimizer",
    "TWA",
    "ema_average",
    "greedy_soup",
    "load_state_dict",
    "save_state_dict",
    "split_holdout",
    "uniform_average",
    "update_bn",
    "keep_freed_memory",
    "backend",
    "dequantize",
    "orthonormalize",
    "project",
    "project_int8",
    "quantize",
    "reconstruct",
]
