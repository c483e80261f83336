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
import operator
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from twa_kernels import builder
from twa_kernels.builder import Layout
from twa_kernels._checks import flag, is_whole_number, real
from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, warn_at_caller
from twa_kernels._ops import combine_rows_op, gram_op
from twa_kernels._progress import progress_bar
from twa_kernels.columns import ColumnReader
from twa_kernels.io import (
    CheckpointError,
    Checkpoints,
    CheckpointSpec,
    resolve_checkpoints,
)
from twa_kernels.quant import (
    MAX_GROUP_SIZE,
    SUPPORTED_BITS,
    QuantizedBasis,
    block_offsets_from_sizes,
    check_basis_values,
    quantize,
)

logger = logging.getLogger(__name__)


def _independent_rows(gram: Tensor, tol: float, max_rows: int) -> tuple[list[int], Tensor]:
    """Cholesky of the Gram matrix row by row, skipping rows whose residual norm is below
    tol times their own norm, and every row once `max_rows` (the dimension, D) are kept: in
    D dimensions a further row is dependent, whatever rounding leaves of its residual.
    Returns the kept rows and the Cholesky factor of their Gram."""
    keep: list[int] = []
    factor = gram.new_zeros((0, 0))
    for i in range(gram.shape[0]):
        if len(keep) == max_rows:
            break
        norm_sq = float(gram[i, i])
        if keep:
            cross = torch.linalg.solve_triangular(factor, gram[keep, i][:, None], upper=False)[:, 0]
        else:
            cross = gram.new_zeros(0)
        residual_sq = norm_sq - float(cross @ cross)
        if norm_sq <= 0 or residual_sq < (tol * tol) * norm_sq:
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


# float32's machine epsilon: the smallest tol orthonormalize takes
_FLOAT32_RESOLUTION = 2.0**-23


def orthonormalize(P: Tensor, tol: float = 1e-6) -> Tensor:
    """Orthonormal rows Q [r, D] (float32) spanning the rows of P [k, D].

    Row i is dropped, with a warning, when its residual after removing the rows kept before
    it is below tol times its norm (a tol below 2**-23, float32's resolution, is refused: a
    smaller residual is rounding). Q[i] is Gram-Schmidt's i-th vector of the kept rows.
    P is read as float32, the kernels' type, and the Gram matrices are summed in float64:
    for rows of condition number c, Q can differ from Gram-Schmidt of a float64 P by about
    c * 6e-8 (float32's rounding of P, amplified), while its rows stay orthonormal to
    float32 rounding. Not differentiable: Q never requires grad.
    """
    if not isinstance(P, Tensor) or P.dim() != 2 or not P.is_floating_point():
        raise InvalidArgumentError(f"P must be a floating-point tensor [k, D], got {getattr(P, 'shape', type(P).__name__)}")
    if not _FLOAT32_RESOLUTION <= real("tol", tol) < 1:
        raise InvalidArgumentError(f"tol must be in [2**-23, 1), a fraction of each row's norm: P is read as float32, "
                                   f"so a residual below its resolution 2**-23 (1.2e-7) is rounding rather than a "
                                   f"direction, and 1 or more would drop every row; got {tol}")
    if P.requires_grad and torch.is_grad_enabled():
        raise InvalidArgumentError("orthonormalize is not differentiable, and P requires grad: pass P.detach(), or "
                                   "call it under torch.no_grad()")
    check_basis_values(P)
    p = P.detach().to(torch.float32).contiguous()
    keep, factor = _independent_rows(gram_op(p), tol, p.shape[1])
    dropped = sorted(set(range(P.shape[0])) - set(keep))
    if dropped:
        warn_at_caller(
            f"orthonormalize dropped {len(dropped)} of {P.shape[0]} rows as linearly dependent "
            f"(residual below tol={tol:g} of the row norm): rows {dropped[:20]}",
            RuntimeWarning)
    if not keep:
        return p.new_zeros((0, p.shape[1]))
    if len(keep) < p.shape[0]:
        p = p[keep].contiguous()
    q = _apply_inverse(factor, p)  # first CholQR pass: orthogonal up to ~cond(P)^2 * eps64
    second, failed = torch.linalg.cholesky_ex(gram_op(q))
    if failed:
        raise InvalidArgumentError(f"orthonormalize: the {len(keep)} rows kept at tol={tol:g} are too close to "
                                   "dependent to orthonormalize in float32; raise tol (the default 1e-6 keeps rows "
                                   "of condition number up to 1e6)")
    return _apply_inverse(second, q)  # second pass: orthogonal to float32 rounding


_orthonormalize = orthonormalize  # from_checkpoints has an argument of that name


# ---- subspaces built from checkpoints --------------------------------------------------

_BATCHNORM_STATISTICS = ("running_mean", "running_var")


def check_build_args(bits: object, group_size: object, granularity: object) -> None:
    """Refuse bad subspace settings by name before any checkpoint is read (numpy's ints
    are ints here, as quantize takes them)."""
    if bits is not None and (not is_whole_number(bits) or bits not in SUPPORTED_BITS):
        raise InvalidArgumentError(f"bits must be one of {SUPPORTED_BITS} (an int) or None for a dense basis, "
                                   f"got {bits!r}")
    if not is_whole_number(group_size) or not 0 < group_size <= MAX_GROUP_SIZE or group_size % 8:
        raise InvalidArgumentError(f"group_size must be a positive int multiple of 8 (codes are packed in bit "
                                   f"planes of 8) up to {MAX_GROUP_SIZE}, got {group_size!r}; 128 is the default")
    if granularity not in ("model", "tensor") and (not is_whole_number(granularity) or granularity <= 0):
        raise InvalidArgumentError(f"granularity must be 'model', 'tensor' or a positive int (elements per "
                                   f"block), got {granularity!r}")


def checked_build_args(bits: object, group_size: object, granularity: object) -> tuple[int | None, int, str | int]:
    """(bits, group_size, granularity) checked (check_build_args), numpy's ints as Python's."""
    check_build_args(bits, group_size, granularity)
    return (None if bits is None else int(bits)), int(group_size), (
        granularity if isinstance(granularity, str) else int(granularity))


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


def _check_aliases(aliases: object) -> None:
    """Refuse anything but {name: [every state_dict name of that tensor]} (or None), as
    io.parameter_aliases(model) makes it."""
    if aliases is None:
        return
    if not isinstance(aliases, Mapping) or not all(
            isinstance(name, str) and isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)
            for name, names in aliases.items()):
        raise InvalidTypeError(f"parameter aliases must map each name to a list of its state_dict names "
                               f"(io.parameter_aliases(model) makes them), got {type(aliases).__name__} "
                               f"{aliases!r:.80}")


class Subspace:
    """An affine subspace of weight space: w = center + sum_r x[r, block] * basis[r].

    `names` and `shapes` say how the D = sum of numels weights map to parameter tensors.
    `orthonormal` records that the rows were orthonormalised (so P^T P g projects g), and
    `aliases` maps a name to every state_dict name of that tensor (tied weights;
    `io.parameter_aliases(model)` makes it).
    """

    def __init__(self, names: list[str], shapes: list[tuple[int, ...]], center: Tensor, basis: QuantizedBasis,
                 orthonormal: bool = False, aliases: dict[str, list[str]] | None = None):
        names, shapes = _checked_layout(names, shapes)
        _check_aliases(aliases)
        if shapes is None:
            raise InvalidArgumentError("a Subspace needs the shapes of its weights, one per name")
        if not isinstance(center, Tensor) or not isinstance(basis, QuantizedBasis):
            raise InvalidArgumentError(f"a Subspace takes a center Tensor and a QuantizedBasis, got "
                                       f"{type(center).__name__} and {type(basis).__name__}")
        if not center.is_floating_point() or center.is_meta or center.device != basis.device:
            raise InvalidArgumentError(f"a Subspace's center must be a floating-point tensor with values on the "
                                       f"basis's device ({basis.device}), got {center.dtype} on {center.device}")
        numel = sum(math.prod(s) for s in shapes)
        if center.shape != (numel,) or basis.num_cols != numel:
            raise InvalidArgumentError(f"inconsistent subspace: {len(names)} names, {numel} weights, center "
                             f"{tuple(center.shape)}, basis of {basis.num_cols} columns")
        self.names, self.shapes, self.center, self.basis = names, shapes, center, basis
        # rows orthonormal (before quantisation): P^T P g projects g
        self.orthonormal = flag("orthonormal", orthonormal)
        # name -> every state_dict name of that tensor, for tied weights (see io.parameter_aliases)
        self.aliases = {n: list(a) for n, a in (aliases or {}).items() if len(a) > 1}
        # the stamps of the checkpoint files the build read (from_checkpoints sets them): a
        # later read of the same files (TWA's frozen parameters) checks it sees that state
        self.source_stamps: list[tuple | None] | None = None

    @property
    def num_weights(self) -> int:
        """D, the number of weights (columns) the subspace spans."""
        return self.center.numel()

    def flatten(self, state: dict[str, Tensor], source: str = "state_dict") -> Tensor:
        """The subspace's parameters of a state_dict as one float32 vector [D]. A missing key
        or a wrong shape is a CheckpointError naming the source, the key and both shapes."""
        return _flatten(state, self.names, self.shapes, source, self.aliases)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Views of a [D] vector shaped like the parameters, by name."""
        if not isinstance(vector, Tensor) or tuple(vector.shape) != (self.num_weights,):
            got = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
            raise InvalidArgumentError(f"unflatten takes a vector of the subspace's {self.num_weights} weights, "
                                       f"got {got}")
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
        progress: bool | None = None,
        normalize_rows: bool = False,
        parameter_aliases: dict[str, list[str]] | None = None,
        span: str = "affine",
    ) -> Subspace:
        """Build the subspace spanned by k checkpoints, streaming.

        `bits` is the width of the stored basis codes (1, 2, 4 or 8; None keeps it dense in float32),
        quantised in groups of `group_size` columns, each with its own scale and minimum.
        `granularity` sets the coefficient blocks: "model" (one set of k coefficients), "tensor"
        (one per parameter tensor) or an int N (consecutive tensors merged while a block stays
        within N weights). `progress` shows a bar (None: only where stderr is a terminal).

        Pass 1 averages the checkpoints into the center (the SWA point). Pass 2 reads them
        again; each centred checkpoint becomes a basis row, read and quantised to `bits` a
        window of columns at a time by the one builder (twa_kernels/builder.py), so memory
        holds the center and the packed rows, never a whole checkpoint (one dense row with
        normalize_rows). Files, state_dicts, save_pretrained and DCP directories are read
        alike, through columns.ColumnReader.
        Rows keep their scale, so a coefficient step moves each block by a fraction of the
        checkpoints' own spread there; normalize_rows=True scales each row to unit norm in
        every block instead (then a step moves every block by the same absolute amount,
        which trained worse in `twa demo`: tiny blocks such as biases overshoot).
        With orthonormalize=True (the ICLR version; needs granularity="model") the rows are
        orthonormalised first, which holds all k rows dense at once. The subspace is the
        checkpoints' affine hull (center + span of the centred rows: k - 1 directions, as the
        journal version's code builds it); span="linear" (with orthonormalize=True) adds the
        center's own direction, for the linear span of the checkpoints that the ICLR code
        orthonormalises: k directions, one of which rescales the weights.

        parameter_names selects the entries that are trainable weights (TWA passes the
        model's parameters); by default every floating-point entry but BatchNorm statistics.
        parameter_shapes, when given, are the shapes every checkpoint must have (else the
        first checkpoint's shapes are). parameter_aliases maps a name to every state_dict
        name of that tensor (tied weights; `io.parameter_aliases(model)` makes it): a checkpoint
        that holds the tensor under any of them is read. A NaN or Inf in any checkpoint is
        refused with the file and the key.
        """
        bits, group_size, granularity = checked_build_args(bits, group_size, granularity)
        flag("orthonormalize", orthonormalize), flag("normalize_rows", normalize_rows)
        _check_aliases(parameter_aliases)
        if orthonormalize and granularity != "model":
            raise InvalidArgumentError("orthonormalize=True makes one orthonormal basis of whole rows: use granularity='model'")
        if span not in ("affine", "linear"):
            raise InvalidArgumentError(f"span must be 'affine' (center + the centred checkpoints' span) or 'linear' "
                                       f"(the checkpoints' own span), got {span!r}")
        if span == "linear" and not orthonormalize:
            raise InvalidArgumentError("span='linear' is the ICLR version's basis: pass orthonormalize=True (and "
                                       "granularity='model') with it; TWA's coefficients train around the center, "
                                       "in the affine hull")
        specs = resolve_checkpoints(checkpoints)
        builder.require_two_checkpoints(specs, checkpoints)
        aliases = {n: list(a) for n, a in (parameter_aliases or {}).items() if len(a) > 1}
        names, shapes = _names_and_shapes(specs[0], parameter_names, parameter_shapes, aliases)
        # the model's names, which checkpoint keys are matched to (io.keys)
        layout = Layout(names, shapes, aliases, [*names, *(a for n in names for a in aliases.get(n, ()))])
        steps = lambda items, what: progress_bar(items, enabled=progress, desc=what, total=len(items), unit="ckpt")  # noqa: E731
        center = builder.average(specs, layout, 0, layout.num_cols, group_size, steps)
        blocks = block_sizes_for([math.prod(s) for s in shapes], granularity)
        offsets = block_offsets_from_sizes(blocks, center.numel())

        def unit_blocks(row: Tensor) -> None:
            for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
                norm = row[start:stop].norm()
                if norm > 0:
                    row[start:stop] /= norm

        transform = unit_blocks if normalize_rows else None
        if orthonormalize:
            dense = builder.build_basis(specs, layout, center, 0, offsets, None, group_size, steps, transform)
            # centred rows sum to zero, so any k - 1 of them span the subspace (one row scaled
            # by a number each, as normalize_rows does with one block, keep that span)
            rows = dense.codes[:-1] if dense.k > 1 else dense.codes
            if span == "linear":  # with the center's direction, the checkpoints themselves are in the span
                rows = torch.cat([center.reshape(1, -1).to(rows.dtype), rows])
            orthonormal = _orthonormalize(rows)
            if orthonormal.shape[0] == 0:  # quantize's own message would name an empty P
                raise InvalidArgumentError(f"the {len(specs)} checkpoints span no direction (each holds the center's "
                                           "weights), so there is nothing to orthonormalize; pass checkpoints that "
                                           "differ")
            basis = quantize(orthonormal, bits, group_size, blocks)
        else:
            basis = builder.build_basis(specs, layout, center, 0, offsets, bits, group_size, steps, transform)
            warn_if_one_point(basis)
        logger.info("subspace: %d checkpoints, %d weights, %d blocks, %s bits, basis %.1f MB", len(specs),
                    center.numel(), len(blocks), bits, basis.nbytes / 1e6)
        subspace = cls(names, shapes, center, basis, orthonormal=orthonormalize, aliases=aliases)
        subspace.source_stamps = layout.stamps(len(specs))
        return subspace


def warn_if_one_point(basis: QuantizedBasis) -> None:
    """Warn when every row of the basis is zero (a group's value is code * scale + min): the
    checkpoints were all the same weights, and the coefficients have nothing to move."""
    zero = (not bool(basis.codes.any())) if basis.bits is None else not (bool(basis.scales.any()) or
                                                                         bool(basis.mins.any()))
    if zero:
        warn_at_caller("every checkpoint holds the same weights, so the subspace is that one point and the "
                       "coefficients have no direction to train; pass checkpoints that differ (is one state_dict "
                       "listed several times?)", UserWarning)


def _names_and_shapes(first_spec: CheckpointSpec, names: list[str] | None, shapes: list[tuple[int, ...]] | None,
                      aliases: dict[str, list[str]]) -> tuple[list[str], list[tuple[int, ...]]]:
    """The names and shapes of the weights a subspace spans: as given, or what the first
    checkpoint holds (without a model to say which entries are parameters, its
    floating-point ones less BatchNorm's statistics). A weight with no elements is refused."""
    if shapes is not None and names is None:
        raise InvalidArgumentError("parameter_shapes needs parameter_names, which say the entry each shape is for")
    if names is not None:
        names, shapes = _checked_layout(names, shapes)
        if not names:
            raise InvalidArgumentError("parameter_names is empty: name the weights to average (TWA passes the "
                                       "model's trainable parameters), or pass None for every floating-point entry")
    if names is None or shapes is None:  # from the first checkpoint's metadata
        first = ColumnReader(first_spec, 0, names=names)
        names = names if names is not None else [k for k in first.keys() if first.dtype(k).is_floating_point
                                                 and not k.endswith(_BATCHNORM_STATISTICS)]
        if not names:  # else an empty layout, named later as a block of no columns
            raise CheckpointError(f"{first.source} holds no real floating-point weight to average (integer, bool "
                                  "and complex entries are not averaged); pass checkpoints of a model's weights")
        keys = {n: first.key(n, aliases.get(n, ())) for n in names}
        missing = [n for n, key in keys.items() if key is None]
        if missing:
            raise CheckpointError(f"{first.source}: missing key {missing[0]!r}; was it saved from the same model?")
        shapes = [first.shape(keys[n]) for n in names]
    empty = [n for n, shape in zip(names, shapes) if math.prod(shape) == 0]
    if empty:
        raise InvalidArgumentError(f"parameter {empty[0]!r} has no elements (shape {shapes[names.index(empty[0])]}); "
                                   "it holds nothing to average: leave it out of parameter_names (TWA leaves "
                                   "such parameters out by itself)")
    return names, shapes


def _checked_layout(names: object, shapes: object) -> tuple[list[str], list[tuple[int, ...]] | None]:
    """Names as a list of distinct strings, and shapes (when given) as one tuple of
    non-negative ints per name: a layout the flat vector can be cut by."""
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise InvalidArgumentError(f"parameter names must be a list of strings, got {names!r:.80}")
    names = list(names)  # once: a generator would be used up by the check below
    if not all(isinstance(n, str) for n in names):
        raise InvalidArgumentError(f"parameter names must be a list of strings, got {names!r:.80}")
    if len(set(names)) < len(names):
        repeated = next(n for i, n in enumerate(names) if n in names[:i])
        raise InvalidArgumentError(f"parameter name {repeated!r} appears more than once; name each weight once")
    if shapes is None:
        return names, None
    try:
        shapes = [tuple(operator.index(d) for d in s) for s in shapes]
    except TypeError:
        raise InvalidArgumentError(f"shapes must be sequences of ints, one per name, got {shapes!r:.80}") from None
    if len(shapes) != len(names):
        raise InvalidArgumentError(f"{len(names)} parameter names but {len(shapes)} shapes; give one shape per name")
    negative = [n for n, s in zip(names, shapes) if any(d < 0 for d in s)]
    if negative:
        raise InvalidArgumentError(f"parameter {negative[0]!r} has a negative size in its shape "
                                   f"{shapes[names.index(negative[0])]}")
    return names, shapes


def _checked(state: dict[str, Tensor], name: str, shape: tuple[int, ...] | None, source: str,
             aliases: dict[str, list[str]] | None = None) -> Tensor:
    if name not in state:
        # a tied weight may be saved under another of its names only (safetensors writers
        # drop all but one name of a shared tensor)
        name = next((a for a in (aliases or {}).get(name, ()) if a in state), name)
    if name not in state:
        also = [a for a in (aliases or {}).get(name, ()) if a != name]
        raise CheckpointError(f"{source}: missing key {name!r}{f' (or its tied names {also})' if also else ''} "
                              f"(it has {len(state)} keys, e.g. {list(state)[:3]}); was it saved from the same model?")
    value = state[name]
    if not isinstance(value, Tensor):
        raise CheckpointError(f"{source}: key {name!r} holds a {type(value).__name__}, not a tensor")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"{source}: key {name!r} has shape {tuple(value.shape)} but the model has "
                              f"{tuple(shape)}")
    if not value.is_floating_point():
        raise CheckpointError(f"{source}: key {name!r} is {value.dtype}, not a floating-point weight")
    return value


def _flatten(state: dict[str, Tensor], names: list[str], shapes: list[tuple[int, ...]], source: str,
             aliases: dict[str, list[str]] | None = None) -> Tensor:
    if not isinstance(state, Mapping):
        raise InvalidArgumentError(f"flatten takes a state_dict (a mapping of names to tensors), got "
                                   f"{type(state).__name__}")
    parts = [_checked(state, name, shape, source, aliases) for name, shape in zip(names, shapes)]
    return torch.cat([p.reshape(-1).to(torch.float32) for p in parts])

