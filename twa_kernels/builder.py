"""The one basis builder: checkpoints -> center and packed basis rows, streaming over columns.

Every subspace in the library is built here: the single-process `Subspace.from_checkpoints`
(columns 0..D), the sharded build (this rank's columns) and a plane's two directions
(checkpoint a as origin instead of the mean, geometry/planes.py). A checkpoint is read through columns.ColumnReader
a window of columns at a time (about 1 MB of float32), and each row is centred, checked and
quantised window by window straight into the basis's preallocated tensors, so memory holds
the center, the packed basis and one window, never a whole checkpoint or a dense row (a
dense row is held only where the caller needs one: a dense basis, row normalisation, or
orthonormalisation). Windows end on quantisation-group edges and groups are independent,
so the bytes are those of quantising each whole row at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from twa_kernels._memory import empty_huge
from twa_kernels.errors import CheckpointError
from twa_kernels.columns import ColumnReader
from twa_kernels.io import Checkpoints, CheckpointSpec, changed_error, trainer_output_hint
from twa_kernels.quant import QuantizedBasis, _quantize_row, packed_row_bytes

_READ_COLUMNS = 1 << 18  # a window of about 1 MB of float32 per read (at least _CHUNK_GROUPS groups)
_CHUNK_GROUPS = 256  # groups quantised at once: temporaries of one chunk, not of a row

# A centred value beyond this cannot be quantised: a group's max - min would overflow
# float32. No trained weight comes near it; a checkpoint that does has diverged.
_ROW_LIMIT = torch.finfo(torch.float32).max / 2

Progress = Callable[[Sequence[Any], str], Any]


class Layout:
    """The weights a subspace spans: `names` flattened in order with `shapes`, `aliases`
    mapping a name to every state_dict name of a tied tensor, and the model's names that
    checkpoint keys are matched to (io's `model.` rule)."""

    def __init__(self, names: Sequence[str], shapes: Sequence[tuple[int, ...]],
                 aliases: Mapping[str, Sequence[str]] | None = None, match_names: Sequence[str] | None = None):
        self.names, self.shapes = list(names), [tuple(s) for s in shapes]
        self.aliases = {n: list(a) for n, a in (aliases or {}).items() if len(a) > 1}
        self.match_names = None if match_names is None else list(match_names)
        self.num_cols = sum(math.prod(s) for s in self.shapes)
        self._stamps: dict[int, tuple | None] = {}  # each checkpoint's files as the first pass found them

    def open(self, spec: CheckpointSpec, index: int) -> ColumnReader:
        """A reader of checkpoint `index`; CheckpointError when its files changed since an
        earlier pass of this build opened it (the center would be one state's, the rows another's)."""
        reader = ColumnReader(spec, index, names=self.match_names)
        first = self._stamps.setdefault(index, reader.stamp)
        if first != reader.stamp:
            raise changed_error(reader.source, "between the passes of the build", "build")
        return reader

    def stamps(self, count: int) -> list[tuple | None]:
        """The stamp each of `count` checkpoints' files had when this build first opened
        them (None for a state_dict, or one not opened): a later reader compares its own."""
        return [self._stamps.get(index) for index in range(count)]

    def name_of_column(self, column: int) -> str:
        offset = 0
        for name, shape in zip(self.names, self.shapes):
            offset += math.prod(shape)
            if column < offset:
                return name
        return self.names[-1]


def require_two_checkpoints(specs: Sequence[CheckpointSpec], checkpoints: Checkpoints) -> None:
    """Refuse fewer than 2 checkpoints for a subspace: the centred row of a single checkpoint
    is zero, and a TWA over it could only return that checkpoint."""
    if len(specs) >= 2:
        return
    hint = trainer_output_hint(checkpoints)
    source = "a state_dict" if isinstance(specs[0], Mapping) else str(specs[0])
    raise CheckpointError(f"1 checkpoint ({source}): a subspace needs at least 2, since the centred row of one "
                          f"checkpoint is zero and spans nothing{hint}")


def windows(start: int, stop: int, group_size: int) -> Iterator[tuple[int, int]]:
    """(a, b) windows covering start..stop, each starting on a group edge (relative to
    `start`, which sits on one): about 1 MB of float32 for groups of up to 1024 columns,
    _CHUNK_GROUPS whole groups for wider ones."""
    step = group_size * _CHUNK_GROUPS * max(1, _READ_COLUMNS // (group_size * _CHUNK_GROUPS))
    for a in range(start, stop, step):
        yield a, min(a + step, stop)


def check_range(window: Tensor, layout: Layout, source: str, start: int) -> None:
    """Refuse centred values (columns start.. of a row) that float32 cannot quantise,
    naming the checkpoint and the key. Checked a window at a time: a whole dense row's
    .abs() and masks would add 1.25x the row's bytes to the build's peak."""
    flat = window.reshape(-1)
    for a in range(0, flat.numel(), _READ_COLUMNS):
        bad = ~(flat[a:a + _READ_COLUMNS].abs() <= _ROW_LIMIT)  # NaN and Inf count as bad too
        if bool(bad.any()):
            name = layout.name_of_column(start + a + int(bad.nonzero()[0]))
            raise CheckpointError(f"{source}: key {name!r} lies more than {_ROW_LIMIT:.2g} from the checkpoints' "
                                  "average, or holds a value float32 cannot (over 3.4e38, as a float64 checkpoint "
                                  "can): an overflowing, diverged checkpoint? The basis is float32: leave this "
                                  "checkpoint out or repair it")


def check_tied(reader: ColumnReader, layout: Layout) -> None:
    """A tied weight is one tensor: a checkpoint holding two of its names with different
    values was not saved from this model's tying, and taking either would be wrong."""
    for name in layout.names:
        present = [n for n in layout.aliases.get(name, ()) if reader.key(n) == n]
        if len(present) < 2:
            continue
        first = reader.tensor(present[0])
        for other in present[1:]:
            value = reader.tensor(other)
            if value.shape == first.shape and torch.equal(value, first):
                continue
            diff = ((value.double() - first.double()).abs().max().item() if value.shape == first.shape
                    else f"shapes {tuple(first.shape)} and {tuple(value.shape)}")
            raise CheckpointError(f"{reader.source}: {present[0]!r} and {other!r} are one tied weight in the model "
                                  f"but differ in the checkpoint (largest difference {diff}); untie them in the "
                                  "model, or save the checkpoint from the tied model")


def read_columns(reader: ColumnReader, layout: Layout, start: int, out: Tensor, group_size: int,
                 check_finite: bool = True, add: bool = False) -> Tensor:
    """Columns start..start + out.numel() of the checkpoint into `out` (added with add=True),
    a window at a time."""
    for a, b in windows(start, start + out.numel(), group_size):
        reader.columns(layout.names, layout.shapes, a, b, layout.aliases, out=out[a - start:b - start], add=add,
                       check_finite=check_finite)
    return out


def mean_center(total: Tensor, count: int) -> Tensor:
    """The center from the float64 sum of `count` checkpoints: their mean, rounded once to
    float32, into a buffer on huge pages (every training step reads it). One rule for every
    build, so the single-process and sharded centers agree bit for bit."""
    # divided in place, then rounded by the copy: torch.div(total, count, out=float32) gives
    # the same values but allocates a float64 temporary the size of `total` first
    return empty_huge(total.shape, torch.float32).copy_(total.div_(count))


def average(specs: Sequence[CheckpointSpec], layout: Layout, start: int, stop: int, group_size: int,
            progress: Progress, on_reader: Callable[[int, ColumnReader], None] | None = None) -> Tensor:
    """Pass 1: the float32 mean of columns start..stop over the checkpoints, summed in
    float64. Each checkpoint is checked finite and its tied names equal as it is read;
    `on_reader(i, reader)` sees each reader first (the sharded build fingerprints it)."""
    total = torch.zeros(stop - start, dtype=torch.float64)
    for i, spec in enumerate(progress(specs, "averaging")):
        reader = layout.open(spec, i)
        if on_reader is not None:
            on_reader(i, reader)
        check_tied(reader, layout)
        read_columns(reader, layout, start, total, group_size, add=True)
    center = mean_center(total, len(specs))
    return center


def dense_row(reader: ColumnReader, layout: Layout, origin: Tensor, start: int, group_size: int,
              out: Tensor | None = None, check_finite: bool = False) -> Tensor:
    """The row (checkpoint - origin) over columns start..start + origin.numel(), dense
    float32, checked quantisable (and, with check_finite, finite by io's error: a
    checkpoint not read by an averaging pass first)."""
    out = torch.empty_like(origin) if out is None else out
    read_columns(reader, layout, start, out, group_size, check_finite=check_finite).sub_(origin)
    check_range(out, layout, reader.source, start)
    return out


def pack_row(row: Tensor | Callable[[int, int], Tensor], num_cols: int, bits: int, group_size: int,
             out: tuple[Tensor, Tensor, Tensor]) -> None:
    """Quantise a row into `out` = (codes [row_bytes], scales [n_groups], mins [n_groups]),
    _CHUNK_GROUPS groups at a time; `row` is the dense row or a function giving its
    columns a..b (read on demand: no dense row is held)."""
    codes, scales, mins = out
    piece = group_size * _CHUNK_GROUPS
    for a, b in windows(0, num_cols, group_size):
        window = row[a:b] if isinstance(row, Tensor) else row(a, b)
        for i in range(0, b - a, piece):
            packed, scale, low = _quantize_row(window[i:i + piece], bits, group_size)
            byte, group = packed_row_bytes(a + i, bits, group_size), (a + i) // group_size
            codes[byte:byte + packed.numel()] = packed
            scales[group:group + scale.numel()] = scale
            mins[group:group + low.numel()] = low


def streamed_row(reader: ColumnReader, layout: Layout, origin: Tensor, start: int, group_size: int,
                 check_finite: bool = False) -> Callable[[int, int], Tensor]:
    """Columns a..b (relative to `start`) of (checkpoint - origin), read when asked for
    (checked finite with check_finite, as dense_row)."""
    first_window = next(iter(windows(0, origin.numel(), group_size)))[1]
    buffer = torch.empty(min(origin.numel(), first_window), dtype=torch.float32)

    def window(a: int, b: int) -> Tensor:
        part = buffer[:b - a]
        reader.columns(layout.names, layout.shapes, start + a, start + b, layout.aliases, out=part,
                       check_finite=check_finite)
        part.sub_(origin[a:b])
        check_range(part, layout, reader.source, start + a)
        return part

    return window


def empty_packed(k: int, num_cols: int, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The tensors of a k-row packed basis, to be filled row by row (codes on huge pages:
    every training step streams them)."""
    n_groups = -(-num_cols // group_size)
    codes = empty_huge((k, packed_row_bytes(num_cols, bits, group_size)), torch.uint8)
    return codes, torch.empty(n_groups, k, dtype=torch.float32), torch.empty(n_groups, k, dtype=torch.float32)


def build_basis(specs: Sequence[CheckpointSpec], layout: Layout, center: Tensor, start: int, block_offsets: Tensor,
                bits: int | None, group_size: int, progress: Progress,
                row_transform: Callable[[Tensor], None] | None = None) -> QuantizedBasis:
    """Pass 2: one row per checkpoint, (checkpoint - center) over columns start..start +
    center.numel(), packed into `bits` (None: dense float32). `row_transform`, when given,
    rescales each dense row in place before it is packed (row normalisation), which holds
    one dense row; without it a packed row is read and quantised window by window."""
    num_cols, k = center.numel(), len(specs)
    if bits is None:
        rows = torch.empty(k, num_cols, dtype=torch.float32)
        for i, spec in enumerate(progress(specs, "building basis")):
            dense_row(layout.open(spec, i), layout, center, start, group_size, out=rows[i])
            if row_transform is not None:
                row_transform(rows[i])
        empty = torch.empty(0, k, dtype=torch.float32)
        return QuantizedBasis(rows, empty, empty.clone(), block_offsets, None, group_size, num_cols)
    codes, scales, mins = empty_packed(k, num_cols, bits, group_size)
    for i, spec in enumerate(progress(specs, "building basis")):
        reader = layout.open(spec, i)
        if row_transform is not None:
            row: Tensor | Callable[[int, int], Tensor] = dense_row(reader, layout, center, start, group_size)
            row_transform(row)
        else:
            row = streamed_row(reader, layout, center, start, group_size)
        pack_row(row, num_cols, bits, group_size, (codes[i], scales[:, i], mins[:, i]))
    return QuantizedBasis(codes, scales, mins, block_offsets, bits, group_size, num_cols)
