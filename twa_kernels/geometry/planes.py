"""Loss planes through three checkpoints, or through a slice of a Subspace, on the fused
reconstruct op.

    p = tk.connectivity.plane(model, [a, b, c], data, grid=(21, 21), bits=4)
    p.loss[i, j], p.error[i, j]  # at (p.xs[j], p.ys[i]); p.points: coordinates and distances

The plane through a, b, c is a + x u + y v with (u, v) orthonormal: the rows b - a and
c - a are packed once into a QuantizedBasis (`bits`, default None = dense float32; 4
packs them to half a byte per weight) and every grid point is one call of the fused
`reconstruct` op, mapping orthonormal coordinates to the basis's coefficients through the
Cholesky factor of its Gram matrix (so the coordinates are exactly orthonormal for the
vectors the op reconstructs, quantised or not). Memory: the packed basis and one weight
vector (W + basis, plus the model's own forward). The origin a is not held: each row of
the grid reads it back into the weight vector (from its file, a chunk at a time, or from
its state_dict) and reconstructs the row's first point over it in place; each next point
is one in-place reconstruct step along x (a row of n points drifts by about n float32
roundings from direct reconstruction). A plane through a Subspace uses the subspace's
center where it is. The construction and `locate` read checkpoint files a chunk of
columns at a time (columns.ColumnReader), so no checkpoint is ever held whole; a checkpoint `a`
changed after the plane was built (a file's size, mtime or inode, or a state_dict tensor
written in place) is refused when it is read back.

The plane's two directions are (checkpoint - origin) rows of the one basis builder
(twa_kernels/builder.py), read and quantised a window at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from twa_kernels._checks import check_module, integer, is_whole_number, real
from twa_kernels import builder
from twa_kernels._memory import return_freed_memory as _return_freed_memory
from twa_kernels._progress import progress_bar
from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, warn_at_caller
from twa_kernels.geometry.evaluation import (
    Checkpoint,
    Metric,
    SameBatches,
    agreed_buffer,
    check_bn,
    check_data,
    check_masks,
    check_points,
    checkpoint_labels,
    checkpoint_source,
    classification_metric,
    evaluate,
    finite_or_none,
    fixed_buffers,
    mixed_buffers,
    parameter_device,
    preserved,
)
from twa_kernels.columns import ColumnReader
from twa_kernels.io import (CheckpointError, ModelKeys, file_stamp, model_key_names, parameter_aliases,
                            resolve_checkpoints, unwrap_model, unwrap_state_dict, warn_unmatched_keys)
from twa_kernels.ops import reconstruct
from twa_kernels.quant import (
    QuantizedBasis,
    block_offsets_from_sizes,
    check_settings,
    dequantize,
    unpack_codes,
)
from twa_kernels.subspace import Subspace

_CHUNK_GROUPS = 512  # group_size-column groups handled at a time when quantising or taking inner products:
# temporaries of ~1 MB, which the allocator reuses chunk after chunk instead of keeping tens of MB
_READ_COLUMNS = 1 << 18  # columns read from a checkpoint file at a time when building (1 MB of float32)


class PlanePoint(NamedTuple):
    """A point placed in a plane: orthonormal coordinates, and its distance from the plane."""

    x: float
    y: float
    distance: float

    def to_dict(self) -> dict[str, float]:
        """The point as JSON-safe data."""
        return dict(x=float(self.x), y=float(self.y), distance=float(self.distance))


def _open(checkpoint: Checkpoint, source: str, names: Sequence[str], shapes: Sequence[tuple[int, ...]],
          aliases: Mapping[str, Sequence[str]], known: ModelKeys | None = None) -> ColumnReader:
    """A lazy reader of one checkpoint (columns.ColumnReader: the file is read a range at a time,
    never whole), checked against the model from its metadata before anything is read: each
    parameter present (or a tied alias of it), with the model's shape and a floating-point
    dtype. Its other floating-point entries are checked finite here; the parameters are
    checked as they are read. Given the model's keys (`known`, io.model_key_names), a
    warning names the floating-point entries the model has no place for."""
    reader = ColumnReader(checkpoint, source=source, names=[*names, *(a for n in names for a in aliases.get(n, ()))])
    if known is not None:
        warn_unmatched_keys({key: (reader.dtype(key), reader.shape(key)) for key in reader.keys()}, known, source)
    present = set()
    for name, shape in zip(names, shapes):
        key = _entry_key(reader, name, shape, source, aliases.get(name, ()))
        if not reader.dtype(key).is_floating_point:
            raise CheckpointError(f"{source}: key {name!r} is {reader.dtype(key)}, not a floating-point weight")
        _check_tied_copies_agree(reader, key, [n for n in (name, *aliases.get(name, ())) if n in reader.keys()],
                                 source)
        present.add(key)
    reader.check_finite(exclude=present)
    return reader


def _check_tied_copies_agree(reader: ColumnReader, key: str, copies: Sequence[str], source: str,
                             step: int = 1 << 20) -> None:
    """A tied weight held under several names must hold one value (io.fill_tied_keys's rule,
    checked a range at a time): the plane reads `key` only, and a copy that differs, from a
    checkpoint not saved from this tying, would go unused without a word."""
    numel = math.prod(reader.shape(key))
    if reader._kind == "dcp":  # DCP reads a whole tensor per range: one range each, not one per step
        step = max(numel, 1)
    for other in copies:
        if other == key:
            continue
        same = reader.shape(other) == reader.shape(key) and reader.dtype(other) == reader.dtype(key)
        for a in range(0, numel, step) if same else ():
            b = min(numel, a + step)
            with reader._range(key, a, b) as first, reader._range(other, a, b) as second:
                if not torch.equal(first, second):
                    same = False
                    break
        if not same:
            raise CheckpointError(f"{source}: {key!r} and {other!r} are one tied weight in the model but differ in "
                                  "the checkpoint; untie them in the model, or save the checkpoint from the tied model")


def _entry_key(reader: ColumnReader, name: str, shape: tuple[int, ...], source: str,
               aliases: Sequence[str] = ()) -> str:
    """checked_entry's checks and errors, on a reader's metadata: the key holding `name`."""
    key = reader.key(name, aliases)
    if key is None:
        keys = reader.keys()
        raise CheckpointError(f"{source}: missing key {name!r} that the model has (it has {len(keys)} keys, e.g. "
                              f"{keys[:3]}); was it saved from this model?")
    if reader.shape(key) != tuple(shape):
        raise CheckpointError(f"{source}: key {name!r} has shape {reader.shape(key)} but the model's is "
                              f"{tuple(shape)}; the checkpoints must come from one architecture")
    return key


def _read_step(group_size: int) -> int:
    """Columns read from a checkpoint at a time: whole quantisation chunks, about 1 MB of float32."""
    return group_size * _CHUNK_GROUPS * max(1, _READ_COLUMNS // (group_size * _CHUNK_GROUPS))


def _stamp(spec: Checkpoint, read: Collection[str]) -> tuple:
    """What changes when a checkpoint changes: a file's (or every file of a DCP or
    save_pretrained directory's) io.file_stamp; the version counters of the state_dict
    tensors named in `read` (bumped by in-place writes; inference tensors have none, so
    in-place writes to those go unnoticed). Only the weights the origin reads count: a
    model's own state_dict() given as checkpoint a shares its BatchNorm buffers, which
    measuring the plane writes in place."""
    if isinstance(spec, Mapping):
        return tuple(None if t.is_inference() else t._version
                     for k, t in unwrap_state_dict(spec, "origin").items() if isinstance(t, Tensor) and k in read)
    if os.path.isdir(spec):  # a DCP or save_pretrained directory: every file in it
        files = sorted(entry.path for entry in os.scandir(spec) if entry.is_file())
        return tuple(file_stamp(path) for path in files)
    return file_stamp(spec)


class _Origin:
    """A plane's origin, [D] float32: a tensor held as it is (a Subspace's center, not
    copied), or checkpoint `a` read back from its file or state_dict whenever it is needed
    (a plane through checkpoints). Reading it back costs one pass over the file (from the
    page cache) per row of the grid, and saves holding D floats that are already on disk."""

    def __init__(self, tensor: Tensor | None = None, reader: ColumnReader | None = None, spec: Checkpoint | None = None,
                 layout: tuple[list[str], list[tuple[int, ...]], Mapping[str, Sequence[str]], int] | None = None):
        self.tensor, self.reader, self.layout = tensor, reader, layout
        self.read = set() if layout is None else {*layout[0], *(a for names in layout[2].values() for a in names)}
        self.stamp = None if reader is None else _stamp(spec, self.read)
        self.spec = spec

    def to(self, device: torch.device) -> _Origin:
        if self.tensor is not None:
            self.tensor = self.tensor.to(device)
        return self

    def check_unchanged(self) -> None:
        """Raise if checkpoint a changed since the plane was built (so it is finite, as
        checked then). Called once per pass over the origin, not per chunk."""
        if self.stamp is None:
            return
        try:
            stamp = _stamp(self.spec, self.read)
        except OSError as exc:
            raise CheckpointError(f"{self.reader.source}: the plane's origin can no longer be read ({exc}); it is "
                                  "read back, not copied: keep checkpoint a while you use the plane") from exc
        if stamp != self.stamp:
            raise CheckpointError(f"{self.reader.source}: the plane's origin changed since the plane was built "
                                  "(it is read back, not copied); build the plane again")

    def chunk(self, start: int, stop: int, buffer: Tensor) -> Tensor:
        """Columns start..stop of the origin ([stop - start], float32, CPU), into `buffer` if
        read; call check_unchanged() once before a pass of these."""
        if self.tensor is not None:
            return self.tensor[start:stop].cpu()
        names, shapes, aliases, _ = self.layout
        return self.reader.columns(names, shapes, start, stop, aliases, out=buffer[:stop - start], check_finite=False)

    def read_into(self, out: Tensor) -> Tensor:
        """The whole origin written into `out` ([D], on any device), a chunk at a time."""
        if self.tensor is not None:
            return out.copy_(self.tensor)
        self.check_unchanged()
        step = self.layout[3]
        buffer = torch.empty(min(step, out.numel()), dtype=torch.float32)
        for start in range(0, out.numel(), step):
            stop = min(start + step, out.numel())
            out[start:stop].copy_(self.chunk(start, stop, buffer))
        return out


class _Frame:
    """origin + sum_r c_r basis[rows[r]] for plane coordinates z = L^T c, where L L^T is the
    Gram matrix of the two (dequantised) rows: z are orthonormal coordinates of the plane."""

    def __init__(self, names, shapes, origin: _Origin, basis: QuantizedBasis, rows: tuple[int, int],
                 aliases: Mapping[str, Sequence[str]] | None = None, known: ModelKeys | None = None):
        self.names, self.shapes, self.origin, self.basis, self.rows = list(names), list(shapes), origin, basis, rows
        self.known = known  # the model's keys (io.model_key_names): a point's tensors it has no place for are named
        self.numel = basis.num_cols
        self.aliases = dict(aliases or {})  # name -> its tied names, under which a checkpoint may hold it
        self.buffers: list[dict[str, Tensor]] | None = None  # origin's buffers and the two rows' differences
        self.fixed_buffers: dict[str, Tensor] = {}  # integer and bool buffers, the same at every point
        # the build's freed windows go back to the OS before the Gram pass adds its own
        # buffers: the two would otherwise stack up into the build's peak
        _return_freed_memory()
        gram = self._inner(None)
        try:
            self.chol = torch.linalg.cholesky(gram)
        except RuntimeError:
            self.chol = None
        if self.chol is None or float(self.chol[1, 1]) ** 2 <= 1e-10 * float(gram[1, 1]) or float(gram[0, 0]) <= 0:
            raise InvalidArgumentError("the plane's two directions are (nearly) linearly dependent: the checkpoints are "
                             "collinear or equal; pick three checkpoints that are not on one line")
        _return_freed_memory()

    def _chunks(self) -> Iterator[tuple[int, int, Tensor]]:
        """(start, stop, the two rows' columns start..stop as float64 [2, stop - start] on
        the CPU), valid until the next chunk: whole chunks are dequantised into two buffers
        reused throughout, so a pass allocates no chunk-sized temporaries (those, freed and
        allocated again chunk after chunk, grew the heap by several MB)."""
        step = self.basis.group_size * _CHUNK_GROUPS
        buffers: tuple[Tensor, Tensor] | None = None
        for start in range(0, self.basis.num_cols, step):
            stop = min(start + step, self.basis.num_cols)
            if self.basis.bits is None:
                yield start, stop, self.basis.codes[list(self.rows), start:stop].double().cpu()
                continue
            if stop - start < step:  # the short last chunk: contiguous tensors of its own size
                yield start, stop, _dequantize_rows(self.basis, self.rows, start, stop).double().cpu()
                continue
            if buffers is None:
                buffers = (torch.empty(2, step, dtype=torch.float32, device=self.basis.device),
                           torch.empty(2, step, dtype=torch.float64, device=self.basis.device))
            rows32, rows64 = buffers
            _dequantize_rows_into(self.basis, self.rows, start, rows32)
            yield start, stop, rows64.copy_(rows32).cpu()

    def _inner(self, vector: Tensor | None) -> Tensor:
        """Float64 inner products of the two rows with each other ([2, 2]) or with vector ([2])."""
        out = torch.zeros((2, 2) if vector is None else (2,), dtype=torch.float64)
        for start, stop, rows in self._chunks():
            out += rows @ rows.T if vector is None else rows @ vector[start:stop].double().cpu()
        return out

    def coefficients(self, z: Sequence[float]) -> Tensor:
        """The basis coefficients [k, B] of plane coordinates z."""
        c = torch.linalg.solve_triangular(self.chol.T, torch.tensor(z, dtype=torch.float64)[:, None], upper=True)
        x = torch.zeros(self.basis.k, self.basis.num_blocks, dtype=torch.float32)
        x[self.rows[0]], x[self.rows[1]] = float(c[0]), float(c[1])
        return x

    def weights(self, z: Sequence[float], out: Tensor | None = None) -> Tensor:
        """The flat weights [D] at plane coordinates z (into `out` when given): one call of
        the fused reconstruct op, on the origin or on its copy read into `out`."""
        device = self.basis.device
        x = self.coefficients(z).to(device)
        if self.origin.tensor is not None:
            return reconstruct(self.basis, x, self.origin.tensor, out=out)
        out = self.origin.read_into(torch.empty(self.numel, dtype=torch.float32, device=device) if out is None else out)
        return reconstruct(self.basis, x, out, out=out)  # in place: each element is read before it is written

    def step(self, weights: Tensor, dz: Sequence[float]) -> Tensor:
        """Move `weights` (the flat weights at some z, in place) to z + dz: one in-place call
        of reconstruct (the map from z to weights is affine). Each step rounds once, so a row
        of n steps drifts by about n float32 roundings from its direct reconstruction."""
        return reconstruct(self.basis, self.coefficients(dz).to(weights.device), weights, out=weights)

    def center(self) -> Tensor:
        """The origin as a [D] tensor (a copy when it is read back from a checkpoint)."""
        if self.origin.tensor is not None:
            return self.origin.tensor
        return self.origin.read_into(torch.empty(self.numel, dtype=torch.float32))

    def buffers_at(self, z: Sequence[float]) -> dict[str, Tensor]:
        c = self.coefficients(z)[list(self.rows), 0].tolist()
        origin, d1, d2 = self.buffers
        return {k: origin[k] + c[0] * d1[k] + c[1] * d2[k] for k in origin}

    def locate(self, checkpoint: Checkpoint, source: str) -> PlanePoint:
        """Orthonormal coordinates of a checkpoint projected onto the plane, and its distance
        from the plane (the norm of the residual). The checkpoint is read twice, a chunk of
        columns at a time (inner products, then the residual): no copy of it is held."""
        reader = _open(checkpoint, source, self.names, self.shapes, self.aliases, self.known)
        buffer = torch.empty(min(self.basis.group_size * _CHUNK_GROUPS, self.numel), dtype=torch.float32)
        origin = torch.empty_like(buffer)

        def offsets() -> Iterator[tuple[Tensor, Tensor]]:  # (rows, checkpoint - origin) per chunk, float64
            for start, stop, rows in self._chunks():
                piece = reader.columns(self.names, self.shapes, start, stop, self.aliases, out=buffer[:stop - start])
                yield rows, piece.sub_(self.origin.chunk(start, stop, origin)).double()

        self.origin.check_unchanged()
        inner = torch.zeros(2, dtype=torch.float64)
        for rows, offset in offsets():
            inner += rows @ offset
        gram = self.chol @ self.chol.T
        c = torch.linalg.solve(gram, inner)
        z = self.chol.T @ c
        residual = sum(float(((offset - c @ rows) ** 2).sum()) for rows, offset in offsets())
        return PlanePoint(float(z[0]), float(z[1]), math.sqrt(residual))


def _dequantize_rows(basis: QuantizedBasis, rows: tuple[int, int], start: int, stop: int) -> Tensor:
    return dequantize(basis, start, stop)[list(rows)]


def _dequantize_rows_into(basis: QuantizedBasis, rows: tuple[int, int], start: int, out: Tensor) -> Tensor:
    """_dequantize_rows of whole groups start..start + out.shape[1] written into `out`
    ([2, n], float32), bit for bit: code * scale + min is the same rounded product and sum
    as dequantize's min + scale * code."""
    n, group = out.shape[1], basis.group_size
    first = start // group
    out.copy_(unpack_codes(basis, start, start + n)[list(rows)])
    view = out.view(2, n // group, group)
    view.mul_(basis.scales[first:first + n // group, list(rows)].T[:, :, None])
    view.add_(basis.mins[first:first + n // group, list(rows)].T[:, :, None])
    return out


def _frame_from_checkpoints(model: nn.Module, checkpoints: Sequence[Checkpoint], bits: int | None,
                            group_size: int, bn: str) -> tuple[_Frame, list[str]]:
    if len(checkpoints) != 3:
        raise InvalidArgumentError(f"a plane goes through exactly 3 checkpoints, got {len(checkpoints)}; for a slice of "
                         "more, build a tk.Subspace and pass it with dims=(i, j)")
    # integer parameters (a frozen index table) cannot be mixed: like integer buffers, every
    # checkpoint must hold the same value, and each point takes it (interpolate's rule)
    params = dict(model.named_parameters())
    # complex parameters are fixed too: a plane's basis holds real weights (agreed_buffer names one that differs)
    named = [(n, tuple(p.shape)) for n, p in params.items() if p.is_floating_point()]
    names, shapes = [n for n, _ in named], [s for _, s in named]
    floating = set(names)
    aliases = {n: a for n, a in parameter_aliases(model).items() if len(a) > 1 and n in floating}
    numel = sum(math.prod(s) for s in shapes)
    buffers = mixed_buffers(model, bn)
    fixed = {**{n: p for n, p in params.items() if not p.is_floating_point()}, **fixed_buffers(model)}
    labels = checkpoint_labels(checkpoints)
    known = model_key_names(model)
    step = _read_step(group_size)
    layout = builder.Layout(names, shapes, aliases)
    center, buffer_sets, fixed_sets, sources = torch.empty(numel, dtype=torch.float32), [], [], []
    dense = torch.empty(2, numel, dtype=torch.float32) if bits is None else None
    if bits is not None:  # the packed basis's tensors, filled row by row (the one builder's)
        codes, scales, mins = builder.empty_packed(2, numel, bits, group_size)
    for i, ckpt in enumerate(checkpoints):
        # each checkpoint is read a chunk of columns at a time (columns.ColumnReader): the peak is
        # the origin, the basis and one chunk, never a whole checkpoint
        label = checkpoint_source(ckpt, i)
        reader = _open(ckpt, label, names, shapes, aliases, known)
        buffer_sets.append({k: reader.tensor(_entry_key(reader, k, tuple(t.shape), label)).to(t.dtype)
                            for k, t in buffers.items()})
        fixed_sets.append({k: reader.tensor(_entry_key(reader, k, tuple(t.shape), label)).to(t.dtype)
                           for k, t in fixed.items()})
        sources.append(label)
        if i == 0:
            builder.read_columns(reader, layout, 0, center, group_size)
            origin = _Origin(reader=reader, spec=ckpt, layout=(names, shapes, aliases, step))
        elif dense is not None:
            builder.dense_row(reader, layout, center, 0, group_size, out=dense[i - 1], check_finite=True)
        else:  # written in place into the basis's tensors: no per-row copies to stack
            # the row reader is not kept in a name: it holds `center`, which must be freed
            # below, before the Gram pass, or the two add up to the build's peak
            builder.pack_row(builder.streamed_row(reader, layout, center, 0, group_size, check_finite=True), numel,
                             bits, group_size, (codes[i - 1], scales[:, i - 1], mins[:, i - 1]))
        del reader
    offsets = block_offsets_from_sizes(None, numel)
    if dense is not None:
        empty = torch.empty(0, 2, dtype=torch.float32)
        basis = QuantizedBasis(dense, empty, empty.clone(), offsets, None, group_size, numel)
    else:
        basis = QuantizedBasis(codes, scales, mins, offsets, bits, group_size, numel)
    del dense, center  # the origin is read back from checkpoint a when needed, not held
    frame = _Frame(names, shapes, origin, basis, (0, 1), aliases, known)
    if buffers:
        first = buffer_sets[0]
        frame.buffers = [first] + [{k: s[k] - first[k] for k in first} for s in buffer_sets[1:]]
    frame.fixed_buffers = {k: agreed_buffer(k, [s[k] for s in fixed_sets], sources) for k in fixed}
    return frame, labels


def _frame_from_subspace(model: nn.Module, subspace: Subspace, dims: tuple[int, int]) -> _Frame:
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for name, shape in zip(subspace.names, subspace.shapes):
        if params.get(name) != tuple(shape):
            raise InvalidArgumentError(f"the subspace's {name!r} has shape {tuple(shape)} but the model's is "
                             f"{params.get(name)}; build the subspace from this model's checkpoints")
    k = subspace.basis.k
    if callable(getattr(dims, "tolist", None)):  # a numpy array or a tensor of two rows
        dims = dims.tolist()
    if not isinstance(dims, (tuple, list)) or len(dims) != 2:
        raise InvalidTypeError(f"dims must be a pair of basis rows (i, j), got {type(dims).__name__} {dims!r}")
    rows = tuple(integer(f"dims[{n}]", d, 0, "a row of the subspace's basis") for n, d in enumerate(dims))
    if rows[0] == rows[1] or max(rows) >= k:
        raise InvalidArgumentError(f"dims must be two different basis rows in 0..{k - 1}, got {dims!r}")
    return _Frame(subspace.names, subspace.shapes, _Origin(tensor=subspace.center), subspace.basis, rows,
                  subspace.aliases, model_key_names(model))


def _axis(lo: float, hi: float, pad: float, n: int) -> list[float]:
    lo, hi = lo - pad, hi + pad
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


@dataclass
class Plane:
    """Loss and error on a grid of a plane in weight space. loss[i, j] and error[i, j] are
    at (xs[j], ys[i]), in orthonormal coordinates (the unit is one unit of weight-space
    distance). `points` are the checkpoints (or the subspace's center) and any extra
    points, each with coordinates and distance from the plane."""

    xs: list[float]
    ys: list[float]
    loss: Tensor
    error: Tensor
    points: dict[str, PlanePoint]
    anchors: list[str]
    bits: int | None
    bn: str
    frame: _Frame = field(repr=False)
    masks: dict[str, Tensor] = field(default_factory=dict, repr=False)  # as the grid's weights were masked

    def locate(self, checkpoint: Checkpoint, label: str = "point") -> PlanePoint:
        """Project a checkpoint (path or state_dict) onto the plane: coordinates and distance."""
        return self.frame.locate(checkpoint, _point_source(checkpoint, label))

    @torch.no_grad()
    def state_dict_at(self, x: float, y: float) -> dict[str, Tensor]:
        """The parameters at plane coordinates (x, y), by name (e.g. to load the grid's best
        point into the model, then update_bn): a reconstruct, masked as the grid's points are."""
        at = (real("state_dict_at's x", x), real("state_dict_at's y", y))
        if not all(abs(v) < _FLOAT32_MAX for v in at):  # the coefficients are float32
            raise InvalidArgumentError(f"state_dict_at({x!r}, {y!r}): a coordinate beyond float32's range "
                                       f"({_FLOAT32_MAX:.3g}); the grid spans {self.xs[0]:.3g}..{self.xs[-1]:.3g} "
                                       f"by {self.ys[0]:.3g}..{self.ys[-1]:.3g}")
        flat = self.frame.weights(at)
        pieces = flat.split([math.prod(s) for s in self.frame.shapes])
        weights = {name: piece.view(shape) for name, piece, shape in zip(self.frame.names, pieces, self.frame.shapes)}
        for name, mask in self.masks.items():
            weights[name].mul_(mask.to(weights[name].device))
        return weights

    def to_dict(self) -> dict[str, Any]:
        """The plane as JSON-safe data: the grid, loss and error (a NaN or infinite value as
        None), placed points, anchors, bits, bn."""
        return dict(xs=self.xs, ys=self.ys, loss=finite_or_none(self.loss.tolist()),
                    error=finite_or_none(self.error.tolist()),
                    points={k: p.to_dict() for k, p in self.points.items()}, anchors=self.anchors, bits=self.bits,
                    bn=self.bn)


def _point_source(checkpoint: Checkpoint, label: str) -> str:
    """An extra point's name in error messages: its file, or its label."""
    return str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else f"point {label!r}"


def _check_grid(grid: int | tuple[int, int], margin: float, bits: int | None,
                group_size: int = 128) -> tuple[int, int]:
    """(nx, ny) of a valid grid; the margin, bits and group size checked."""
    pair = (grid, grid) if is_whole_number(grid) else tuple(grid) if isinstance(grid, (tuple, list)) else ()
    if len(pair) != 2 or not all(is_whole_number(n) and n >= 2 for n in pair):
        raise InvalidArgumentError(f"grid must be an int or a pair of ints, at least 2 points along each axis "
                                   f"(e.g. 21 or (21, 11)), got {grid!r}")
    nx, ny = int(pair[0]), int(pair[1])
    check_points(f"grid=({nx}, {ny})", nx * ny)
    what = "margin (the share of the span added on each side; 0.2 is the default)"
    if real(what, margin) < 0:
        raise InvalidArgumentError(f"{what} must be a finite number >= 0, got {margin!r}")
    check_settings(bits, group_size)  # group_size sets the read chunk even where bits is None
    return nx, ny


def _anchored_frame(model: nn.Module, checkpoints: Sequence[Checkpoint] | Subspace, dims: tuple[int, int],
                    bits: int | None, group_size: int, bn: str,
                    labels: Sequence[str] | None) -> tuple[_Frame, list[str], dict[str, PlanePoint]]:
    """The plane's frame, its anchors' labels, and where the anchors lie in it: a, b and c of
    a checkpoint plane, or the center of a Subspace."""
    if isinstance(checkpoints, Subspace):
        if bn == "interpolate":
            raise InvalidArgumentError("bn='interpolate' mixes the checkpoints' statistics, which a Subspace does "
                                       "not hold; use bn='recompute'")
        frame, anchors = _frame_from_subspace(model, checkpoints, dims), ["center"]
        located = {"center": PlanePoint(0.0, 0.0, 0.0)}
    else:
        if not (isinstance(dims, (tuple, list)) and tuple(dims) == (0, 1)):
            raise InvalidArgumentError(f"dims={dims!r} picks two rows of a Subspace's basis; a plane through "
                                       "checkpoints is spanned by them (a towards b, then c): leave dims out, or "
                                       "pass a tk.Subspace")
        # a folder or a glob of the three, as the baselines take them; None and a lone state_dict named
        frame, anchors = _frame_from_checkpoints(model, resolve_checkpoints(checkpoints), bits, group_size, bn)
        L = frame.chol
        located = {anchors[0]: PlanePoint(0.0, 0.0, 0.0), anchors[1]: PlanePoint(float(L[0, 0]), 0.0, 0.0),
                   anchors[2]: PlanePoint(float(L[1, 0]), float(L[1, 1]), 0.0)}
    if labels is not None:
        if not isinstance(labels, (list, tuple)) or not all(isinstance(label, str) for label in labels):
            raise InvalidArgumentError(f"labels must be a list of {len(anchors)} strings, one per anchor, got "
                                       f"{labels!r}")
        if len(labels) != len(anchors):
            raise InvalidArgumentError(f"labels: {len(labels)} given for {len(anchors)} anchor point(s)")
        if len(set(labels)) != len(labels):  # the points are keyed by label: one would replace the other
            raise InvalidArgumentError(f"labels: {list(labels)} names two anchors alike; give each its own label")
        located = {new: located[old] for new, old in zip(labels, anchors)}
        anchors = list(labels)
    return frame, anchors, located


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _grid_axes(spanned: Sequence[tuple[float, float]], margin: float, nx: int,
               ny: int) -> tuple[list[float], list[float]]:
    """The grid's coordinates along x and y: the span of the points (x, y), padded on each side."""
    x_lo, x_hi = min(x for x, _ in spanned), max(x for x, _ in spanned)
    y_lo, y_hi = min(y for _, y in spanned), max(y for _, y in spanned)
    pad = margin * max(x_hi - x_lo, y_hi - y_lo)  # one pad for both axes: a thin plane still shows its sides
    xs, ys = _axis(x_lo, x_hi, pad, nx), _axis(y_lo, y_hi, pad, ny)
    if not all(abs(v) < _FLOAT32_MAX for v in (*xs, *ys)):  # the coefficients are float32
        raise InvalidArgumentError(f"margin={margin!r} puts the grid's corners at coordinates float32 cannot hold "
                                   f"({max(map(abs, (*xs, *ys))):.3g}); use a margin of a few times the span at most")
    return xs, ys


def plane(
    model: nn.Module,
    checkpoints: Sequence[Checkpoint] | Subspace,
    data: Iterable,
    grid: int | tuple[int, int] = (21, 21),
    margin: float = 0.2,
    bn: str = "recompute",
    metric: Metric = classification_metric,
    masks: Mapping[str, Tensor] | None = None,
    *,
    bits: int | None = None,
    group_size: int = 128,
    dims: tuple[int, int] = (0, 1),
    points: Mapping[str, Checkpoint] | None = None,
    labels: Sequence[str] | None = None,
    bn_data: Iterable | None = None,
    progress: bool | None = None,
) -> Plane:
    """Loss and error of `model` on a grid over the plane through three checkpoints [a, b, c]
    (origin a, first axis towards b; a folder or glob of three is taken in name order), or
    through the center of a tk.Subspace along its basis rows `dims`.

    grid is (nx, ny) or one int for both, at least 2 each; the grid spans the checkpoints
    and `points` (extra checkpoints by label, e.g. SWA and TWA: they are projected onto the
    plane and their distance from it is reported), with `margin` times the larger of the two
    spans added on each side (finite, >= 0). bits (None, or 1/2/4/8) packs the two directions of a
    checkpoint plane; None keeps them dense float32 and exact, 4 packs them into about an
    eighth of the memory, and the coordinates stay orthonormal for the quantised directions.
    A Subspace keeps its own basis. The grid adds one weight vector of model size: each row
    reads the origin back into it and each point is one in-place `reconstruct` (see the
    module docstring). bn, metric, masks and bn_data are as in interpolate (bn="interpolate"
    needs checkpoints, whose statistics it mixes). A Subspace over some of the model's
    parameters (built with parameter_names) moves those: the others keep the model's current
    values at every point, as they do in a TWA over that subspace.
    """
    check_module(model, "plane's model")
    model = unwrap_model(model)  # a compiled or DataParallel model: checkpoints name its module's keys
    check_bn(bn)
    check_data("plane's data", data)
    if bn_data is not None:
        check_data("plane's bn_data", bn_data)
    if points is not None and not isinstance(points, Mapping):
        raise InvalidTypeError(f"points must map a label to a checkpoint (e.g. {{'SWA': swa_state}}), got "
                               f"{type(points).__name__}")
    nx, ny = _check_grid(grid, margin, bits, group_size)
    device = parameter_device(model)  # before masks and checkpoints are read: a model without values is named first
    mask = check_masks(model, masks)
    frame, anchors, located = _anchored_frame(model, checkpoints, dims, bits, group_size, bn, labels)
    for label, ckpt in (points or {}).items():
        if label in located:  # it would take the anchor's place in the table, the figure and the JSON
            raise InvalidArgumentError(f"points: {label!r} is already the name of one of the plane's checkpoints "
                                       f"({', '.join(anchors)}); give the point another name")
        located[label] = frame.locate(ckpt, _point_source(ckpt, label))
    frame.origin = frame.origin.to(device)
    frame.basis = frame.basis.to(device)
    if frame.buffers is not None:  # read from the checkpoints onto the CPU
        frame.buffers = [{k: t.to(device) for k, t in part.items()} for part in frame.buffers]
    frame.fixed_buffers = {k: t.to(device) for k, t in frame.fixed_buffers.items()}
    # the grid's weights are float32; a model of another dtype gets them in its own
    own_dtypes = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    spanned = [(p.x, p.y) for p in located.values()]
    if isinstance(checkpoints, Subspace):
        # its one anchor, the center, spans nothing: the two rows' tips either side of it
        # give the grid its extent
        L = frame.chol
        tips = [(float(L[0, 0]), 0.0), (float(L[1, 0]), float(L[1, 1]))]
        spanned += tips + [(-x, -y) for x, y in tips]
    xs, ys = _grid_axes(spanned, margin, nx, ny)
    loss, error = torch.empty(ny, nx, dtype=torch.float64), torch.empty(ny, nx, dtype=torch.float64)
    # One weight vector, viewed as the parameters, is the only model-sized memory the grid
    # adds: each row starts from the origin (read back into it) plus one reconstruct, and
    # each next point of the row is one in-place step of reconstruct along x.
    flat = torch.empty(frame.numel, dtype=torch.float32, device=device)
    pieces = flat.split([math.prod(s) for s in frame.shapes])
    weights = {name: piece.view(shape) for name, piece, shape in zip(frame.names, pieces, frame.shapes)}
    cells = [(i, j) for i in range(ny) for j in range(nx)]
    bn_batches = bn_data if bn_data is not None else data
    # one shuffle of the BatchNorm data, and one of the data, for every point
    same_batches, same_data, negative = SameBatches(bn_batches), SameBatches(data), 0
    with preserved(model), torch.no_grad():
        for i, j in progress_bar(cells, enabled=progress, desc="plane", total=len(cells)):
            if j == 0:
                frame.weights((xs[0], ys[i]), out=flat)
            else:
                frame.step(flat, (xs[j] - xs[j - 1], 0.0))
            for name, m in mask.items():  # masks commute with the steps: the points stay sparse
                weights[name].mul_(m)
            point = {name: w.to(own_dtypes.get(name, w.dtype)) for name, w in weights.items()}
            if frame.buffers is not None:
                point.update(frame.buffers_at((xs[j], ys[i])))
                negative += any(bool((t < 0).any()) for name, t in point.items() if name.endswith("running_var"))
            point.update(frame.fixed_buffers)
            loss[i, j], error[i, j] = evaluate(model, point, data, metric, bn, bn_batches, same_batches, same_data)
    if negative:
        mixed = sorted({name.rsplit(".", 1)[0] for name in frame.buffers[0] if name.endswith("running_var")})
        why = ("bn='interpolate' extrapolates the statistics there; bn='recompute' measures them at every point"
               if bn == "interpolate" else f"the BatchNorm layers the model keeps in eval mode ({', '.join(mixed[:3])}) "
               "keep statistics mixed from the checkpoints, which bn='recompute' does not measure")
        warn_at_caller(f"{negative} of the plane's {len(cells)} points mix the checkpoints' BatchNorm variances to "
                       f"below zero (they lie outside the checkpoints' triangle: {why}), so their loss is NaN",
                       UserWarning)
    return Plane(xs, ys, loss, error, located, anchors, frame.basis.bits, bn, frame, mask)
