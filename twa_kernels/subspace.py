"""Subspaces of weight space: orthonormalising a basis, and building one from checkpoints.

orthonormalize runs CholQR2: a Gram matrix accumulated in float64 (one pass over P), a
Cholesky factor that also decides which rows are dependent, one pass that applies the
inverse factor, then the same once more on the result. Two passes of CholQR with a
float64 Gram keep max|QQ^T - I| at float32 rounding for condition numbers up to ~1e6,
where the classical Gram-Schmidt of the paper's code has lost orthogonality.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import Tensor

from twa_kernels.errors import InvalidArgumentError
from twa_kernels._memory import empty_huge
from twa_kernels._ops import combine_rows_op, gram_op
from twa_kernels.io import (
    CheckpointError,
    Checkpoints,
    check_finite,
    iter_state_dicts,
    resolve_checkpoints,
)
from twa_kernels.quant import (
    SUPPORTED_BITS,
    QuantizedBasis,
    _quantize_row,
    block_offsets_from_sizes,
    quantize,
    stack_rows,
)

logger = logging.getLogger(__name__)


def _independent_rows(gram: Tensor, tol: float) -> tuple[list[int], Tensor]:
    """Cholesky of the Gram matrix row by row, skipping rows whose residual norm is below
    tol times their own norm. Returns the kept rows and the Cholesky factor of their Gram."""
    keep: list[int] = []
    factor = gram.new_zeros((0, 0))
    for i in range(gram.shape[0]):
        norm_sq = float(gram[i, i])
        if keep:
            cross = torch.linalg.solve_triangular(factor, gram[keep, i][:, None], upper=False)[:, 0]
        else:
            cross = gram.new_zeros(0)
        residual_sq = norm_sq - float(cross @ cross)
        if norm_sq <= 0 or residual_sq <= (tol * tol) * norm_sq:
            continue
        m = len(keep)
        grown = gram.new_zeros((m + 1, m + 1))
        grown[:m, :m] = factor
        grown[m, :m] = cross
        grown[m, m] = residual_sq**0.5
        factor = grown
        keep.append(i)
    return keep, factor


def _apply_inverse(factor: Tensor, p: Tensor) -> Tensor:
    eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    inverse = torch.linalg.solve_triangular(factor, eye, upper=False)
    return combine_rows_op(inverse, p)


def orthonormalize(P: Tensor, tol: float = 1e-6) -> Tensor:
    """Orthonormal rows Q [r, D] (float32) spanning the rows of P [k, D].

    Row i is dropped, with a warning, when its residual after removing the rows kept before
    it is below tol times its norm. Q[i] is Gram-Schmidt's i-th vector of the kept rows.
    """
    if not isinstance(P, Tensor) or P.dim() != 2 or not P.is_floating_point():
        raise InvalidArgumentError(f"P must be a floating-point tensor [k, D], got {getattr(P, 'shape', type(P).__name__)}")
    if not tol > 0:
        raise InvalidArgumentError(f"tol must be positive, got {tol}")
    if not bool(torch.isfinite(P).all()):
        raise InvalidArgumentError("P has NaN or Inf values; orthonormalize needs finite rows")
    p = P.detach().to(torch.float32).contiguous()
    keep, factor = _independent_rows(gram_op(p), tol)
    dropped = sorted(set(range(P.shape[0])) - set(keep))
    if dropped:
        warnings.warn(
            f"orthonormalize dropped {len(dropped)} of {P.shape[0]} rows as linearly dependent "
            f"(residual below tol={tol:g} of the row norm): rows {dropped[:20]}",
            RuntimeWarning,
            stacklevel=2,
        )
    if not keep:
        return p.new_zeros((0, p.shape[1]))
    if len(keep) < p.shape[0]:
        p = p[keep].contiguous()
    q = _apply_inverse(factor, p)  # first CholQR pass: orthogonal up to ~cond(P)^2 * eps64
    second = torch.linalg.cholesky(gram_op(q))
    return _apply_inverse(second, q)  # second pass: orthogonal to float32 rounding


_orthonormalize = orthonormalize  # from_checkpoints has an argument of that name


# ---- subspaces built from checkpoints --------------------------------------------------

_BATCHNORM_STATISTICS = ("running_mean", "running_var")


def default_parameter_names(state: dict[str, Tensor]) -> list[str]:
    """Floating-point entries of a state_dict, less BatchNorm running statistics: the
    weights a subspace spans when no model says which entries are parameters."""
    return [k for k, v in state.items() if v.is_floating_point() and not k.endswith(_BATCHNORM_STATISTICS)]


def mean_center(total: Tensor, count: int) -> Tensor:
    """The center from the float64 sum of `count` checkpoints: their mean, rounded once to
    float32, into a buffer on huge pages (every training step reads it). One rule for the
    single-process and the sharded subspace, so their centers agree bit for bit."""
    return torch.div(total, count, out=empty_huge(total.shape, torch.float32))


def check_build_args(bits: object, group_size: object, granularity: object) -> None:
    """Refuse bad subspace settings by name before any checkpoint is read."""
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS):
        raise InvalidArgumentError(f"bits must be one of {SUPPORTED_BITS} (an int) or None for a dense basis, "
                                   f"got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 8:
        raise InvalidArgumentError(f"group_size must be a positive int multiple of 8 (codes are packed in bit "
                                   f"planes of 8), got {group_size!r}; 128 is the default")
    if granularity not in ("model", "tensor") and (isinstance(granularity, bool) or not isinstance(granularity, int)
                                                   or granularity <= 0):
        raise InvalidArgumentError(f"granularity must be 'model', 'tensor' or a positive int (elements per "
                                   f"block), got {granularity!r}")


def block_sizes_for(numels: list[int], granularity: str | int) -> list[int]:
    """Coefficient blocks over the parameter tensors: "model" (one block), "tensor" (one
    per tensor) or an int N (consecutive tensors merged while the block stays within N
    elements; a tensor larger than N is a block of its own)."""
    if granularity == "model":
        return [sum(numels)]
    if granularity == "tensor":
        return list(numels)
    if isinstance(granularity, int) and not isinstance(granularity, bool) and granularity > 0:
        blocks: list[int] = []
        for n in numels:
            if blocks and blocks[-1] + n <= granularity:
                blocks[-1] += n
            else:
                blocks.append(n)
        return blocks
    raise InvalidArgumentError(f"granularity must be 'model', 'tensor' or a positive int, got {granularity!r}")


class Subspace:
    """An affine subspace of weight space: w = center + sum_r x[r, block] * basis[r].

    `names` and `shapes` say how the D = sum of numels weights map to parameter tensors.
    """

    def __init__(self, names: list[str], shapes: list[tuple[int, ...]], center: Tensor, basis: QuantizedBasis,
                 orthonormal: bool = False, aliases: dict[str, list[str]] | None = None):
        numel = sum(math.prod(s) for s in shapes)
        if center.shape != (numel,) or basis.num_cols != numel or len(names) != len(shapes):
            raise InvalidArgumentError(f"inconsistent subspace: {len(names)} names, {numel} weights, center "
                             f"{tuple(center.shape)}, basis of {basis.num_cols} columns")
        self.names, self.shapes, self.center, self.basis = list(names), [tuple(s) for s in shapes], center, basis
        self.orthonormal = orthonormal  # rows orthonormal (before quantisation): P^T P g projects g
        # name -> every state_dict name of that tensor, for tied weights (see io.parameter_aliases)
        self.aliases = {n: list(a) for n, a in (aliases or {}).items() if len(a) > 1}

    @property
    def num_weights(self) -> int:
        return self.center.numel()

    def flatten(self, state: dict[str, Tensor], source: str = "state_dict") -> Tensor:
        """The subspace's parameters of a state_dict as one float32 vector [D]. A missing key
        or a wrong shape is a CheckpointError naming the source, the key and both shapes."""
        return _flatten(state, self.names, self.shapes, source, self.aliases)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Views of a [D] vector shaped like the parameters, by name."""
        # split, not slicing: its backward is one concatenation, where each slice's backward
        # would write a full-size zero tensor
        pieces = vector.split([math.prod(shape) for shape in self.shapes])
        return {name: piece.view(shape) for name, piece, shape in zip(self.names, pieces, self.shapes)}

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Checkpoints,
        bits: int | None = 4,
        granularity: str | int = "tensor",
        group_size: int = 128,
        parameter_names: list[str] | None = None,
        parameter_shapes: list[tuple[int, ...]] | None = None,
        orthonormalize: bool = False,
        progress: bool = False,
        normalize_rows: bool = False,
        parameter_aliases: dict[str, list[str]] | None = None,
    ) -> Subspace:
        """Build the subspace spanned by k checkpoints, streaming.

        Pass 1 averages the checkpoints into the center (the SWA point). Pass 2 reads them
        again; each centred checkpoint becomes a basis row, quantised to `bits` as soon as
        it is made, so memory holds the center, one dense checkpoint and the packed rows.
        Rows keep their scale, so a coefficient step moves each block by a fraction of the
        checkpoints' own spread there; normalize_rows=True scales each row to unit norm in
        every block instead (then a step moves every block by the same absolute amount,
        which trained worse in `twa demo`: tiny blocks such as biases overshoot).
        With orthonormalize=True (the ICLR version; needs granularity="model") the rows are
        orthonormalised first, which holds all k rows dense at once.

        parameter_names selects the entries that are trainable weights (TWA passes the
        model's parameters); by default every floating-point entry but BatchNorm statistics.
        parameter_shapes, when given, are the shapes every checkpoint must have (else the
        first checkpoint's shapes are). parameter_aliases maps a name to every state_dict
        name of that tensor (tied weights; `io.parameter_aliases(model)` makes it): a checkpoint
        that holds the tensor under any of them is read. A NaN or Inf in any checkpoint is
        refused with the file and the key.
        """
        check_build_args(bits, group_size, granularity)
        if orthonormalize and granularity != "model":
            raise InvalidArgumentError("orthonormalize=True makes one orthonormal basis of whole rows: use granularity='model'")
        specs = resolve_checkpoints(checkpoints)
        if orthonormalize and len(specs) < 2:
            raise InvalidArgumentError("orthonormalize=True needs at least 2 checkpoints: the centred row of a single "
                                       "checkpoint is zero and spans nothing")
        names, total = parameter_names, None
        shapes = [tuple(s) for s in parameter_shapes] if parameter_shapes is not None else None
        aliases = {n: list(a) for n, a in (parameter_aliases or {}).items() if len(a) > 1}
        # the model's names, which checkpoint keys are matched to (io's module docstring)
        wanted = None if names is None else [*names, *(a for n in names for a in aliases.get(n, ()))]
        for source, state in _progress(iter_state_dicts(specs, wanted), len(specs), "averaging", progress):
            if names is None:
                names = default_parameter_names(state)
            if shapes is None:
                shapes = [tuple(_checked(state, n, None, source, aliases).shape) for n in names]
            vector = _flatten(state, names, shapes, source, aliases)
            if not bool(torch.isfinite(vector).all()):
                check_finite({n: _checked(state, n, None, source, aliases) for n in names}, source)
            vector = vector.double()
            total = vector if total is None else total.add_(vector)
        empty = [n for n, shape in zip(names, shapes) if math.prod(shape) == 0]
        if empty:
            raise InvalidArgumentError(f"parameter {empty[0]!r} has no elements (shape {shapes[names.index(empty[0])]}); "
                                       "leave it out of parameter_names (it holds nothing to average)")
        center = mean_center(total, len(specs))
        del total
        blocks = block_sizes_for([math.prod(s) for s in shapes], granularity)
        offsets = block_offsets_from_sizes(blocks, center.numel())
        rows = []
        for source, state in _progress(iter_state_dicts(specs, wanted), len(specs), "building basis", progress):
            row = _flatten(state, names, shapes, source, aliases) - center
            check_row_range(row, names, shapes, source)
            if normalize_rows:
                for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
                    norm = row[start:stop].norm()
                    if norm > 0:
                        row[start:stop] /= norm
            if orthonormalize or bits is None:
                rows.append(row)
            else:
                rows.append(_quantize_row(row, bits, group_size))
        if orthonormalize:
            # centred rows sum to zero (after scaling): any k - 1 of them span the subspace
            basis = quantize(_orthonormalize(torch.stack(rows[:-1] if len(rows) > 1 else rows)), bits, group_size,
                             blocks)
        elif bits is None:
            basis = quantize(torch.stack(rows), None, group_size, blocks)
        else:
            basis = stack_rows(rows, offsets, bits, group_size, center.numel())
        logger.info("subspace: %d checkpoints, %d weights, %d blocks, %s bits, basis %.1f MB", len(specs),
                    center.numel(), len(blocks), bits, basis.nbytes / 1e6)
        return cls(names, shapes, center, basis, orthonormal=orthonormalize, aliases=aliases)


# A centred value beyond this cannot be quantised: a group's max - min would overflow
# float32. No trained weight comes near it; a checkpoint that does has diverged.
_ROW_LIMIT = torch.finfo(torch.float32).max / 2


def check_row_range(row: Tensor, names: list[str], shapes: list[tuple[int, ...]], source: str,
                    start: int = 0) -> None:
    """Refuse a basis row (checkpoint - center, columns start.. of the flattened weights)
    holding a value float32 cannot quantise, naming the checkpoint and the key."""
    bad = ~(row.abs() <= _ROW_LIMIT)  # NaN and Inf count as bad too
    if not bool(bad.any()):
        return
    column = start + int(bad.nonzero()[0])
    offset = 0
    for name, shape in zip(names, shapes):
        offset += math.prod(shape)
        if column < offset:
            break
    raise CheckpointError(f"{source}: key {name!r} lies more than {_ROW_LIMIT:.2g} from the checkpoints' "
                          "average (an overflowing, diverged checkpoint?); leave this checkpoint out or repair it")


def _checked(state: dict[str, Tensor], name: str, shape: tuple[int, ...] | None, source: str,
             aliases: dict[str, list[str]] | None = None) -> Tensor:
    _check_tied_agree(state, name, source, aliases)
    if name not in state:
        # a tied weight may be saved under another of its names only (safetensors writers
        # drop all but one name of a shared tensor)
        name = next((a for a in (aliases or {}).get(name, ()) if a in state), name)
    if name not in state:
        also = [a for a in (aliases or {}).get(name, ()) if a != name]
        raise CheckpointError(f"{source}: missing key {name!r}{f' (or its tied names {also})' if also else ''} "
                              f"(it has {len(state)} keys, e.g. {list(state)[:3]}); was it saved from the same model?")
    value = state[name]
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"{source}: key {name!r} has shape {tuple(value.shape)} but the model has "
                              f"{tuple(shape)}")
    if not value.is_floating_point():
        raise CheckpointError(f"{source}: key {name!r} is {value.dtype}, not a floating-point weight")
    return value


def _check_tied_agree(state: dict[str, Tensor], name: str, source: str,
                      aliases: dict[str, list[str]] | None) -> None:
    """A tied weight is one tensor: a checkpoint holding two of its names with different
    values was not saved from this model's tying, and taking either silently would be wrong."""
    present = [n for n in (aliases or {}).get(name, ()) if n in state]
    first = state[present[0]] if present else None
    for other in present[1:]:
        value = state[other]
        if value is first or (value.shape == first.shape and torch.equal(value, first)):
            continue
        diff = ((value.double() - first.double()).abs().max().item() if value.shape == first.shape
                else f"shapes {tuple(first.shape)} and {tuple(value.shape)}")
        raise CheckpointError(f"{source}: {present[0]!r} and {other!r} are one tied weight in the model but differ "
                              f"in the checkpoint (largest difference {diff}); untie them in the model, or save "
                              "the checkpoint from the tied model")


def _flatten(state: dict[str, Tensor], names: list[str], shapes: list[tuple[int, ...]], source: str,
             aliases: dict[str, list[str]] | None = None) -> Tensor:
    parts = [_checked(state, name, shape, source, aliases) for name, shape in zip(names, shapes)]
    return torch.cat([p.reshape(-1).to(torch.float32) for p in parts])


def _progress(items, total: int, what: str, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=what, unit="ckpt")
