"""`tk.connectivity`, the public name of weight-space geometry: interpolation and barriers,
loss planes, sharpness and their figures. The code lives in twa_kernels.geometry, one
module per job; see that package for the API.
"""

from twa_kernels.geometry import (
    BN_MODES,
    Checkpoint,
    EigenResult,
    Interpolation,
    Metric,
    Plane,
    PlanePoint,
    classification_metric,
    hessian_diagonal,
    interpolate,
    plane,
    plot_interpolation,
    plot_plane,
    top_eigenvalue,
)

# Internals that measurement scripts read under this name. Patching them here does not
# reach the code: patch twa_kernels.geometry.planes instead.
from twa_kernels.geometry.planes import ColumnReader, _frame_from_checkpoints, _return_freed_memory  # noqa: F401

__all__ = [
    "BN_MODES", "Checkpoint", "EigenResult", "Interpolation", "Metric", "Plane", "PlanePoint", "classification_metric",
    "hessian_diagonal", "interpolate", "plane", "plot_interpolation", "plot_plane", "top_eigenvalue",
]
