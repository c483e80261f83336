"""Weight-space geometry: linear interpolation and barriers, loss planes, sharpness.

    r = tk.connectivity.interpolate(model, a, b, data, steps=11, bn="recompute")
    r.alphas, r.loss, r.error, r.loss_barrier, r.error_barrier      # error in [0, 1]
    p = tk.connectivity.plane(model, [a, b, c], data, grid=(21, 21), bits=4)
    tk.connectivity.plot_plane(p, "plane.png", points={"SWA": swa_state, "TWA": "twa.pt"})
    diag = tk.connectivity.hessian_diagonal(model, loss_fn, data, samples=1000)
    value, trace, converged = tk.connectivity.top_eigenvalue(model, loss_fn, data)

`a`, `b`, `c` are state_dicts or checkpoint paths; `data` is a re-iterable of (x, y)
batches or of mappings fed as keyword arguments with a "labels" entry (Hugging Face
batches), a DataLoader or a list. The public name is `tk.connectivity`; this package
holds one module per job:

- evaluation: checkpoints, the metric, BatchNorm handling (`bn`) and evaluation at given
  weights, which the others share;
- interpolation: `interpolate` and its barriers;
- planes: `plane` through three checkpoints or a Subspace slice, and its packed directions;
- sharpness: `hessian_diagonal` (Hutchinson) and `top_eigenvalue` (power iteration);
- figures: `plot_plane` and `plot_interpolation`.

Data flows one way: evaluation <- interpolation, planes, sharpness <- figures.
"""

from twa_kernels.geometry.evaluation import BN_MODES, Checkpoint, Metric, classification_metric
from twa_kernels.geometry.figures import plot_interpolation, plot_plane
from twa_kernels.geometry.interpolation import Interpolation, interpolate
from twa_kernels.geometry.planes import Plane, PlanePoint, plane
from twa_kernels.geometry.sharpness import EigenResult, hessian_diagonal, top_eigenvalue

__all__ = [
    "BN_MODES", "Checkpoint", "EigenResult", "Interpolation", "Metric", "Plane", "PlanePoint", "classification_metric",
    "hessian_diagonal", "interpolate", "plane", "plot_interpolation", "plot_plane", "top_eigenvalue",
]
