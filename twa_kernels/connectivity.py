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

__all__ = [
    "BN_MODES", "Checkpoint", "EigenResult", "Interpolation", "Metric", "Plane", "PlanePoint", "classification_metric",
    "hessian_diagonal", "interpolate", "plane", "plot_interpolation", "plot_plane", "top_eigenvalue",
]
