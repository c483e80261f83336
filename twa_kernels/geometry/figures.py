"""Figures of the geometry results: a contour plot of a plane and curves of interpolations.

    tk.connectivity.plot_plane(p, "plane.png", points={"SWA": swa_state, "TWA": "twa.pt"})
    tk.connectivity.plot_interpolation({"a-b": r}, "barriers.png")

matplotlib is an optional dependency (`pip install 'twa-kernels[demo]'`), imported when a
figure is drawn: it is slow to import. Figures are drawn on matplotlib's object API
(`matplotlib.figure.Figure`), never through pyplot, so a plot leaves the user's pyplot
state and backend untouched.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from twa_kernels._imports import optional
from twa_kernels.errors import InvalidArgumentError, InvalidTypeError
from twa_kernels.geometry.evaluation import Checkpoint
from twa_kernels.geometry.interpolation import Interpolation
from twa_kernels.geometry.planes import Plane
from twa_kernels.io import atomic_write

_MARKERS = ["*", "s", "D", "^", "v", "P", "X", "h"]


def _check_path(path: str | os.PathLike) -> Path:
    """`path` as a Path whose suffix matplotlib can write (none means PNG), checked before
    any drawing: an unknown format would otherwise fail in matplotlib after the work."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt:
        backend_bases = optional("matplotlib.backend_bases", "demo", "a figure")
        known = backend_bases.FigureCanvasBase.get_supported_filetypes()
        if fmt not in known:
            raise InvalidArgumentError(f"{path}: matplotlib cannot write .{fmt} figures; use one of "
                                       f"{', '.join('.' + k for k in sorted(known))}")
    return path


def _save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure atomically (io.atomic_write), in the format its suffix names."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))


def plot_plane(result: Plane, path: str | os.PathLike, points: Mapping[str, Checkpoint] | None = None,
               value: str = "loss", title: str | None = None) -> Path:
    """A contour PNG of `value` ("loss" or "error") over the plane, with the plane's
    checkpoints as black dots and every extra point (those given to plane() and `points`
    here, projected onto the plane) marked and labelled with its distance from the plane."""
    figure = optional("matplotlib.figure", "demo", "plot_plane()")
    colors = optional("matplotlib.colors", "demo", "plot_plane()")
    axes_grid = optional("mpl_toolkits.axes_grid1", "demo", "plot_plane()")
    if not isinstance(result, Plane):
        raise InvalidTypeError(f"plot_plane takes the result of tk.connectivity.plane(...), got "
                               f"{type(result).__name__}; for interpolations use plot_interpolation")
    if value not in ("loss", "error"):
        raise InvalidArgumentError(f"value must be 'loss' or 'error', got {value!r}")
    path = _check_path(path)
    located = dict(result.points)
    for label, ckpt in (points or {}).items():
        if label in located:  # it would move that point's dot and label to its own place
            raise InvalidArgumentError(f"points: {label!r} is already the name of one of the plane's points "
                                       f"({', '.join(located)}); give the point another name")
        located[label] = result.locate(ckpt, label)
    values = (result.loss if value == "loss" else 100 * result.error).numpy()
    finite = values[np.isfinite(values)]  # a diverged corner (NaN, inf) is left blank
    if not finite.size:
        uncounted = value == "error" and bool(np.isnan(values).all() and np.isfinite(result.loss.numpy()).any())
        raise InvalidArgumentError(
            "the plane's metric counts no errors (its error is NaN everywhere): draw value='loss'" if uncounted else
            f"every point of the plane has a NaN or infinite {value}, so there is nothing to draw: the weights "
            "overflow there (a smaller margin, or checkpoints with finite, moderate weights)")
    grid = np.ma.masked_invalid(values)
    aspect = (result.ys[-1] - result.ys[0]) / max(result.xs[-1] - result.xs[0], 1e-12)
    fig = figure.Figure(figsize=(7.0, min(9.0, max(3.6, 5.6 * aspect + 2.4))))
    ax = fig.subplots()
    positive = finite[finite > 0]
    log = value == "loss" and positive.size and positive.max() / positive.min() > 5
    if log:  # loss spans decades over a plane: log-spaced levels resolve the basin
        levels = np.geomspace(positive.min(), finite.max(), 25)
        grid = grid.clip(min=positive.min())
        filled = ax.contourf(result.xs, result.ys, grid, levels=levels, norm=colors.LogNorm(), cmap="viridis")
    else:
        low, top = finite.min(), finite.max()
        # a constant plane still needs 25 rising levels, whatever its scale (1e-12 vanishes next to 1e5)
        levels = np.linspace(low, low + max(top - low, abs(top) * 1e-6, 1e-12), 25)
        filled = ax.contourf(result.xs, result.ys, grid, levels=levels, cmap="viridis")
    ax.contour(result.xs, result.ys, grid, levels=levels[::3], colors="white", linewidths=0.5, alpha=0.6)
    ax.set_aspect("equal", adjustable="box")
    bar = fig.colorbar(filled, cax=axes_grid.make_axes_locatable(ax).append_axes("right", size="3%", pad=0.1))
    ticks = levels[::4]
    bar.set_ticks(ticks)
    bar.set_ticklabels([f"{t:.3g}" for t in ticks])
    bar.ax.minorticks_off()
    bar.set_label("loss" if value == "loss" else "error (%)")
    extra = 0
    for label, p in located.items():
        if label in result.anchors:
            ax.scatter([p.x], [p.y], color="black", s=40, zorder=3)
            ax.annotate(label, (p.x, p.y), textcoords="offset points", xytext=(6, 6), fontsize=9, color="white")
        else:
            marker = _MARKERS[extra % len(_MARKERS)]
            extra += 1
            ax.scatter([p.x], [p.y], marker=marker, s=160 if marker == "*" else 70, color=f"C{extra}",
                       edgecolor="white", zorder=4, label=f"{label} (distance from plane {p.distance:.3g})")
    if extra:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=1 if extra < 3 else 2,
                  frameon=False)
    ax.set_xlabel("x (weight-space distance)")
    ax.set_ylabel("y (weight-space distance)")
    ax.set_title(textwrap.fill(title or f"{value} over the plane through {', '.join(result.anchors)}", 60),
                 fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_interpolation(results: Mapping[str, Interpolation], path: str | os.PathLike,
                       title: str | None = None) -> Path:
    """Loss and error (%) against alpha for one or more interpolations, labelled by key."""
    figure = optional("matplotlib.figure", "demo", "plot_interpolation()")
    if isinstance(results, Interpolation):
        raise InvalidTypeError("plot_interpolation takes a mapping of labels to interpolations, got one "
                               "Interpolation; pass {'a to b': result}")
    if not isinstance(results, Mapping) or not all(isinstance(r, Interpolation) for r in results.values()):
        raise InvalidTypeError(f"plot_interpolation takes {{label: tk.connectivity.interpolate(...)}}, got "
                               f"{type(results).__name__}" + (" holding other values" if isinstance(results, Mapping)
                                                              else ""))
    if not results:
        raise InvalidArgumentError("plot_interpolation needs at least one interpolation, got none: pass "
                                   "{label: tk.connectivity.interpolate(...)}")
    path = _check_path(path)
    fig = figure.Figure(figsize=(9, 3.6))
    left, right = fig.subplots(1, 2)
    for label, r in results.items():
        left.plot(r.alphas, r.loss, marker="o", ms=3, label=f"{label} (barrier {r.loss_barrier:.3f})")
        right.plot(r.alphas, [100 * e for e in r.error], marker="o", ms=3,
                   label=f"{label} (barrier {100 * r.error_barrier:.2f} pts)")
    for ax, name in ((left, "loss"), (right, "error (%)")):
        ax.set_xlabel("alpha: (1 - alpha) a + alpha b")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)
