"""QuantizedBasis: the packed low-bit storage of a k x D subspace basis.

Per row r and group t of `group_size` consecutive columns (the last group may be short):
lo = min, hi = max, scale = (hi - lo) / (2**bits - 1) (0 when hi == lo),
code = clamp(round((p - lo) / scale), 0, 2**bits - 1), and p^ = lo + scale * code.

Codes are packed 8 / bits to a byte. Inside a group of L columns, W = ceil(L / (8 / bits))
bytes hold 8 / bits "planes": element s * W + i sits in byte i at bit s * bits. Unpacking a
plane is then a shift and a mask over contiguous bytes, which every backend vectorises.
Group t of a row starts at byte t * group_size * bits / 8, so group_size must be a multiple
of 8. Scales and mins are stored group-major, [n_groups, k]: a kernel visiting one group for
all k rows then reads one contiguous stream of metadata instead of k strided ones.
`block_offsets` cuts the D columns into the blocks that share one coefficient.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor  # imported by torch itself: no cost
from torch._subclasses.functional_tensor import FunctionalTensor

from twa_kernels.errors import BasisLayoutError, InvalidArgumentError, InvalidTypeError, MissingKeyError
from twa_kernels._memory import empty_huge

SUPPORTED_BITS = (1, 2, 4, 8)
# The widest quantisation group. The kernels keep a group's worth of scratch per thread and
# quantize pads each row to whole groups, so a wider group only costs memory: 2**20 columns
# (4 MiB of float32 a row) is far past any use.
MAX_GROUP_SIZE = 2**20
# The stored layout of a basis (the fields below, codes packed in planes), saved in its
# state_dict's meta: a file in another format is refused by name instead of read as this
# one. Raised whenever the stored layout changes; a meta without it is format 1.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class QuantizedBasis:
    """A k x D basis, packed (bits in 1, 2, 4, 8) or dense float32 (bits None).

    A plain bundle of tensors: `state_dict()` gives tensors only, which `torch.save` writes
    and `torch.load(weights_only=True)` reads back; `from_state_dict` rebuilds the basis.
    """

    codes: Tensor  # uint8 [k, row_bytes]; float32 [k, D] when bits is None
    scales: Tensor  # float32 [n_groups, k]: group-major; [0, k] when bits is None
    mins: Tensor  # float32 [n_groups, k]: group-major; [0, k] when bits is None
    block_offsets: Tensor  # int64 [B + 1]: block b is columns block_offsets[b] .. block_offsets[b + 1]
    bits: int | None
    group_size: int
    num_cols: int

    def __post_init__(self) -> None:
        # The kernels take raw pointers and trust this layout: a basis built by hand with
        # offsets past the end or out of order would read and write out of bounds. The
        # checks are O(k + B) on metadata, never a pass over the codes; value checks
        # (finite scales) are from_state_dict's, for bases read from files.
        for name in ("bits", "group_size", "num_cols"):  # a numpy or torch integer as the int it is
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
                object.__setattr__(self, name, int(value))
        check_layout(self.codes, self.scales, self.mins, self.block_offsets, self.bits, self.group_size,
                     self.num_cols)

    @property
    def k(self) -> int:
        """Number of basis rows."""
        return self.codes.shape[0]

    @property
    def num_blocks(self) -> int:
        """Number of coefficient blocks B."""
        return self.block_offsets.numel() - 1

    @property
    def block_sizes(self) -> list[int]:
        """Number of columns in each coefficient block."""
        return self.block_offsets.diff().tolist()

    @property
    def device(self) -> torch.device:
        """The device every tensor of the basis is on."""
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes plus metadata (scales, mins, block offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins, self.block_offsets))

    def to(self, device: torch.device | str) -> QuantizedBasis:
        """The same basis with every tensor on `device` (a device only: the layout fixes
        every tensor's dtype)."""
        if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):  # a dtype among them
            raise InvalidTypeError(f"QuantizedBasis.to takes a device such as 'cpu' or 'cuda:0', got "
                                   f"{type(device).__name__} {device!r}: the layout fixes the tensors' dtypes")
        try:
            device = torch.device(device)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidArgumentError(f"QuantizedBasis.to: {device!r} is not a device torch knows ({exc}); pass "
                                       "e.g. 'cpu' or 'cuda:0'") from None
        return QuantizedBasis(
            self.codes.to(device),
            self.scales.to(device),
            self.mins.to(device),
            self.block_offsets.to(device),
            self.bits,
            self.group_size,
            self.num_cols,
        )

    def state_dict(self) -> dict[str, Tensor]:
        """The basis as plain tensors (codes, scales, mins, block_offsets and a meta tensor of
        bits, group_size, num_cols and FORMAT_VERSION), to save with `torch.save` and read
        back with `torch.load(weights_only=True)` and `QuantizedBasis.from_state_dict`."""
        meta = basis_meta(self.bits, self.group_size, self.num_cols)
        return {
            "codes": self.codes,
            "scales": self.scales,
            "mins": self.mins,
            "block_offsets": self.block_offsets,
            "meta": meta,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> QuantizedBasis:
        """Rebuild a basis from `state_dict()`'s tensors, checking every field first: the
        kernels take raw pointers, so a corrupt file must fail here, by name, not in them."""
        if not isinstance(state, Mapping):
            raise InvalidTypeError(f"QuantizedBasis.from_state_dict takes the mapping basis.state_dict() returns, got "
                                   f"{type(state).__name__}")
        missing = {"codes", "scales", "mins", "block_offsets", "meta"} - set(state)
        if missing:
            raise MissingKeyError(f"not a QuantizedBasis state_dict: missing {sorted(missing)}")
        for key in ("codes", "scales", "mins", "block_offsets", "meta"):
            if not isinstance(state[key], Tensor):
                raise InvalidArgumentError(f"basis {key!r} must be a tensor, got {type(state[key]).__name__}")
            if state[key].is_meta:  # a state_dict of a module built on the meta device
                raise InvalidArgumentError(f"basis {key!r} is on the meta device and holds no values; load the basis "
                                           "from its file, or the module's state_dict once it holds real tensors")
        meta = state["meta"]
        if meta.dtype != torch.int64 or tuple(meta.shape) not in ((3,), (4,)):
            raise InvalidArgumentError(f"basis 'meta' must be int64 [bits, group_size, num_cols, format version], got "
                                       f"{meta.dtype} {tuple(meta.shape)}")
        bits, group_size, num_cols, *version = (int(v) for v in meta.tolist())
        if version and version[0] != FORMAT_VERSION:  # three entries: written before the version entry, format 1
            raise InvalidArgumentError(f"basis meta: the basis is stored in format {version[0]}, and this version of "
                                       f"twa-kernels reads format {FORMAT_VERSION}; rebuild the basis from its "
                                       "checkpoints, or read it with the twa-kernels that wrote it")
        if bits not in (0, *SUPPORTED_BITS):
            raise InvalidArgumentError(f"basis meta: bits must be 0 (dense) or one of {SUPPORTED_BITS}, got {bits}")
        if not 0 < group_size <= MAX_GROUP_SIZE or group_size % 8:
            raise InvalidArgumentError(f"basis meta: group_size must be a positive multiple of 8 up to "
                                       f"{MAX_GROUP_SIZE}, got {group_size}")
        if num_cols <= 0:
            raise InvalidArgumentError(f"basis meta: num_cols must be positive, got {num_cols}")
        offsets = state["block_offsets"]
        if offsets.dtype not in (torch.int64, torch.int32):
            raise InvalidArgumentError(f"basis 'block_offsets' must be an integer tensor, got {offsets.dtype}")
        qb = cls(state["codes"].contiguous(), state["scales"].contiguous(), state["mins"].contiguous(),
                 offsets.to(torch.int64).contiguous(), bits or None, group_size, num_cols)
        _validate_layout(qb)
        return qb


def basis_meta(bits: int | None, group_size: int, num_cols: int) -> Tensor:
    """The 'meta' entry of a basis's state_dict: [bits (0: dense), group_size, num_cols,
    FORMAT_VERSION], int64."""
    return torch.tensor([bits or 0, group_size, num_cols, FORMAT_VERSION], dtype=torch.int64)


def packed_row_bytes(num_cols: int, bits: int, group_size: int) -> int:
    """Bytes per packed row: full groups of group_size * bits / 8 bytes, then the short tail."""
    per_byte = 8 // bits
    n_full, tail = divmod(num_cols, group_size)
    return n_full * (group_size // per_byte) + -(-tail // per_byte)


def check_layout(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, bits: int | None,
                 group_size: int, num_cols: int, columns_of: str = "num_cols") -> None:
    """Types, shapes, dtypes and devices of a basis's tensors, and the values of its block
    offsets: everything a kernel relies on for memory safety. Raises BasisLayoutError
    naming the field. `columns_of` names where num_cols came from (an op's operand), for the
    message when the offsets end elsewhere."""
    tensors = {"codes": codes, "scales": scales, "mins": mins, "block_offsets": block_offsets}
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise BasisLayoutError(f"QuantizedBasis.{name} must be a tensor, got {type(value).__name__}")
    for name, value in (("group_size", group_size), ("num_cols", num_cols)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise BasisLayoutError(f"QuantizedBasis.{name} must be an int, got {value!r}")
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS):
        raise BasisLayoutError(f"bits must be one of {SUPPORTED_BITS} or None, got {bits!r}")
    if num_cols <= 0:
        raise BasisLayoutError(f"num_cols must be positive, got {num_cols}")
    if not 0 < group_size <= MAX_GROUP_SIZE or group_size % 8:
        raise BasisLayoutError(f"group_size must be a positive multiple of 8 up to {MAX_GROUP_SIZE}, got {group_size}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise BasisLayoutError(f"the basis tensors are on several devices {sorted(map(str, devices))}; "
                               "move them together with QuantizedBasis.to(device)")
    if codes.dim() != 2 or codes.shape[0] < 1:
        raise BasisLayoutError(f"codes must be 2-D [k, ...] with k >= 1, got {tuple(codes.shape)}")
    if block_offsets.dtype != torch.int64 or block_offsets.dim() != 1 or block_offsets.numel() < 2:
        raise BasisLayoutError(f"block_offsets must be a 1-D int64 tensor with at least 2 entries, got "
                               f"{block_offsets.dtype} {tuple(block_offsets.shape)}; build it with "
                               "block_offsets_from_sizes")
    _validate_offsets(block_offsets, num_cols, columns_of)
    k = codes.shape[0]
    if bits is None:
        if codes.dtype != torch.float32 or codes.shape[1] != num_cols:
            raise BasisLayoutError(f"a dense basis must be float32 [k, {num_cols}], got {codes.dtype} "
                                   f"{tuple(codes.shape)}")
        for name, t in (("scales", scales), ("mins", mins)):
            if t.dtype != torch.float32 or tuple(t.shape) != (0, k):
                raise BasisLayoutError(f"a dense basis has empty float32 {name} [0, {k}], got {t.dtype} "
                                       f"{tuple(t.shape)}")
    else:
        n_groups = -(-num_cols // group_size)
        expected = (k, packed_row_bytes(num_cols, bits, group_size))
        if codes.dtype != torch.uint8 or tuple(codes.shape) != expected:
            raise BasisLayoutError(f"codes must be uint8 {expected}, got {codes.dtype} {tuple(codes.shape)}")
        for name, t in (("scales", scales), ("mins", mins)):
            if t.dtype != torch.float32 or tuple(t.shape) != (n_groups, k):
                raise BasisLayoutError(f"{name} must be float32 {(n_groups, k)}, got {t.dtype} {tuple(t.shape)}")
    if not all(t.is_contiguous() for t in tensors.values()):
        raise BasisLayoutError("the basis tensors must be contiguous; call .contiguous() on them")


# Offsets tensors on an accelerator whose values were checked, by id: (weak reference,
# version, num_cols). Reading them back costs a device sync there, and TWA makes a
# QuantizedBasis of its buffers every forward, so each is read once (again when written in
# place, which moves its version counter; a write through .data or .numpy() does not, and
# is not seen). Offsets in host memory are read every time: a few microseconds.
_CHECKED_OFFSETS: dict[int, tuple[weakref.ref, int, int]] = {}


def _validate_offsets(offsets: Tensor, num_cols: int, columns_of: str = "num_cols") -> None:
    if _is_traced(offsets):
        return  # no values to read under torch.compile's fake tensors; the eager call checked them
    cached = offsets.device.type != "cpu"
    seen = _CHECKED_OFFSETS.get(id(offsets)) if cached else None
    if seen is not None and seen[0]() is offsets and seen[1:] == (offsets._version, num_cols):
        return
    values = offsets.tolist() if offsets.numel() <= 4096 else None
    if values is None:
        first, last, ordered = int(offsets[0]), int(offsets[-1]), bool((offsets.diff() > 0).all())
    else:
        first, last = values[0], values[-1]
        ordered = all(b > a for a, b in zip(values, values[1:]))
    if first == 0 and last != num_cols and columns_of != "num_cols":  # an operand of another length, most likely
        raise BasisLayoutError(f"{columns_of} {num_cols} elements but the basis's block_offsets end at {last} "
                               f"columns: give one entry per basis column ({last}), or, if the offsets were edited, "
                               "rebuild them with block_offsets_from_sizes")
    if first != 0 or last != num_cols:
        raise BasisLayoutError(f"block_offsets must run from 0 to num_cols={num_cols}, got {first} to {last}")
    if not ordered:
        raise BasisLayoutError("block_offsets must increase strictly (every block holds at least one column); "
                               f"got {(values or offsets.tolist())[:8]}...; build them with block_offsets_from_sizes")
    if not cached:
        return
    if len(_CHECKED_OFFSETS) > 1024:
        _CHECKED_OFFSETS.clear()
    _CHECKED_OFFSETS[id(offsets)] = (weakref.ref(offsets), offsets._version, num_cols)


def _is_traced(t: Tensor) -> bool:
    """Whether `t` holds no values to read: torch.compile's and export's fake tensors. Any
    other subclass of Tensor has values, and they are checked."""
    return torch.compiler.is_compiling() or t.device.type == "meta" or isinstance(t, (FakeTensor, FunctionalTensor))


def _validate_layout(qb: QuantizedBasis) -> None:
    """Beyond check_layout (run when the basis was made), the values a file may have corrupted: finite dense rows,
    finite scales and mins, no negative scale."""
    if qb.bits is None:
        if not bool(torch.isfinite(qb.codes).all()):
            raise BasisLayoutError("the dense basis holds NaN or Inf: it is corrupt; rebuild it from the checkpoints")
        return
    for name in ("scales", "mins"):
        if not bool(torch.isfinite(getattr(qb, name)).all()):
            raise BasisLayoutError(f"{name} hold NaN or Inf: the basis is corrupt; rebuild it from the checkpoints")
    if bool((qb.scales < 0).any()):
        raise BasisLayoutError("scales must be >= 0 (max - min of a group): the basis is corrupt; rebuild it")
    if qb.scales.numel():  # lo + scale * (2^bits - 1), a group's largest value, must be a float32 too
        # in chunks of groups: float64 copies of the whole scales and mins would be 16x the codes at 1 bit
        rows = max(1, (1 << 20) // max(1, qb.k))
        peak = max(float((mins.double().abs() + scales.double() * (2**qb.bits - 1)).max())
                   for mins, scales in zip(qb.mins.split(rows), qb.scales.split(rows)))
        if peak > torch.finfo(torch.float32).max:
            raise BasisLayoutError(f"scales and mins give values up to {peak:.3g}, beyond float32's range: the basis "
                                   "is corrupt; rebuild it from the checkpoints")


def block_offsets_from_sizes(block_sizes: Sequence[int] | None, num_cols: int) -> Tensor:
    """int64 offsets [0, s0, s0 + s1, ..., num_cols]; None means one block of all columns."""
    if block_sizes is None:
        return torch.tensor([0, num_cols], dtype=torch.int64)
    if isinstance(block_sizes, Tensor) and not (block_sizes.is_floating_point() or block_sizes.is_complex()):
        block_sizes = block_sizes.reshape(-1).tolist()
    if isinstance(block_sizes, (str, bytes)) or not isinstance(block_sizes, Iterable):
        raise InvalidTypeError(f"block_sizes must be a sequence of ints (one per block), got "
                               f"{type(block_sizes).__name__}")
    block_sizes = list(block_sizes)
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in block_sizes):
        raise InvalidTypeError(f"block_sizes must be ints, got {list(block_sizes)[:8]}")
    sizes = [int(s) for s in block_sizes]
    if not sizes or any(s <= 0 for s in sizes):
        raise InvalidArgumentError(f"block_sizes must be positive integers, got {list(block_sizes)[:8]}")
    if sum(sizes) != num_cols:
        raise InvalidArgumentError(f"block_sizes sum to {sum(sizes)} but the basis has {num_cols} columns; they must match")
    return torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0)


def _quantize_row(p: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """One float32 row [D] -> (packed bytes, scales [n_groups], mins [n_groups])."""
    num_cols = p.numel()
    levels = (1 << bits) - 1
    per_byte = 8 // bits
    n_groups = -(-num_cols // group_size)
    # Pad the last group with its own last value: min and max are unchanged.
    padded = torch.cat([p, p[-1:].expand(n_groups * group_size - num_cols)]).view(n_groups, group_size)
    lo = padded.amin(dim=1)
    hi = padded.amax(dim=1)
    scale = (hi - lo) / levels
    if not bool(torch.isfinite(scale).all()):
        raise InvalidArgumentError("a basis row spans more than float32 can hold in one group (values near "
                                   "+-3.4e38); such weights have diverged: leave that checkpoint out")
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((padded - lo[:, None]) / safe[:, None]).clamp_(0, levels)
    codes = torch.where(scale[:, None] > 0, codes, torch.zeros_like(codes)).to(torch.uint8)

    def pack(group_codes: Tensor, length: int) -> Tensor:  # [n, length] codes -> [n, W] bytes
        width = -(-length // per_byte)
        planes = torch.zeros(group_codes.shape[0], per_byte * width, dtype=torch.uint8, device=group_codes.device)
        planes[:, :length] = group_codes[:, :length]
        planes = planes.view(-1, per_byte, width)
        packed = torch.zeros(group_codes.shape[0], width, dtype=torch.uint8, device=group_codes.device)
        for s in range(per_byte):
            packed |= planes[:, s] << (s * bits)
        return packed.reshape(-1)

    n_full, tail = divmod(num_cols, group_size)
    parts = [pack(codes[:n_full], group_size)] if n_full else []
    if tail:
        parts.append(pack(codes[n_full:], tail))
    return torch.cat(parts), scale, lo


def check_basis_values(P: Tensor) -> None:
    """Refuse a basis P [k, D] whose values cannot become a float32 basis: a meta tensor
    (no values), NaN or Inf, or magnitudes beyond float32's range (a float64 P would turn
    them into Inf when cast, or a whole row into subnormals or zeros)."""
    if P.layout != torch.strided:
        raise InvalidArgumentError(f"P is a {P.layout} tensor; a basis is built from dense rows: pass P.to_dense()")
    if P.is_meta:
        raise InvalidArgumentError("P is a meta tensor and holds no values; materialise it (e.g. "
                                   "model.to_empty(device='cpu') and load real weights) before building a basis")
    if not bool(torch.isfinite(P).all()):
        bad = int((~torch.isfinite(P)).any(dim=1).nonzero()[0])
        raise InvalidArgumentError(f"P has NaN or Inf values (first in row {bad}); a basis must be finite")
    if P.dtype == torch.float64 and P.numel():
        low, high = torch.aminmax(P)
        limit = torch.finfo(torch.float32).max
        if max(-float(low), float(high)) > limit:
            raise InvalidArgumentError(f"P has values beyond float32's range (+-{limit:.3g}), which the float32 "
                                       "basis cannot hold; rescale P")
        # a row whose largest magnitude is below float32's smallest normal number would be
        # cast to subnormals (a few bits of precision) or to zero: a wrong row, not a warning
        peak = P.abs().amax(dim=1)
        tiny = torch.finfo(torch.float32).tiny
        small = ((peak > 0) & (peak < tiny)).nonzero()
        if small.numel():
            raise InvalidArgumentError(f"P's row {int(small[0])} has magnitudes below float32's smallest normal "
                                       f"number ({tiny:.3g}), which the float32 basis would round to few bits or "
                                       "to zero; rescale P")


def check_settings(bits: int | None, group_size: int) -> tuple[int | None, int]:
    """(bits, group_size) as the layout stores them (plain ints), or InvalidArgumentError:
    bits one of SUPPORTED_BITS or None (dense float32), group_size a positive multiple of 8
    up to MAX_GROUP_SIZE."""
    # an int, not a float or bool that compares equal to one (4.0 in SUPPORTED_BITS is True)
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, numbers.Integral)
                             or bits not in SUPPORTED_BITS):
        raise InvalidArgumentError(f"bits must be one of {SUPPORTED_BITS} or None (dense float32), got {bits!r}")
    bits = None if bits is None else int(bits)  # a numpy or torch integer becomes the int the layout stores
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise InvalidArgumentError(f"group_size must be an int, got {type(group_size).__name__} {group_size!r}")
    group_size = int(group_size)
    if not 0 < group_size <= MAX_GROUP_SIZE or group_size % 8:
        raise InvalidArgumentError(f"group_size must be a positive multiple of 8 up to {MAX_GROUP_SIZE}, got "
                                   f"{group_size}")
    return bits, group_size


def quantize(
    P: Tensor,
    bits: int | None = 4,
    group_size: int = 128,
    block_sizes: Sequence[int] | None = None,
) -> QuantizedBasis:
    """Pack a basis P [k, D] into `bits` bits per element (None keeps dense float32), each
    group of `group_size` columns of a row with its own scale and minimum.

    block_sizes partitions the D columns into the blocks that share one coefficient
    (None: a single block). Rows are quantised one at a time, so the float temporaries are
    one row's; the packed rows are held and then stacked (about twice the packed basis at
    the peak).
    """
    if not isinstance(P, Tensor) or P.dim() != 2 or not P.is_floating_point():
        shape = tuple(P.shape) if isinstance(P, Tensor) else type(P).__name__
        raise InvalidArgumentError(f"P must be a floating-point tensor [k, D], got {shape}; for one row use P[None]")
    if P.shape[0] == 0 or P.shape[1] == 0:
        raise InvalidArgumentError(f"P must have at least one row and one column, got {tuple(P.shape)}")
    bits, group_size = check_settings(bits, group_size)
    check_basis_values(P)
    k, num_cols = P.shape
    offsets = block_offsets_from_sizes(block_sizes, num_cols).to(P.device)
    if bits is None:
        empty = torch.empty(0, k, dtype=torch.float32, device=P.device)
        return QuantizedBasis(P.detach().to(torch.float32).contiguous().clone(), empty, empty.clone(), offsets,
                              None, group_size, num_cols)
    rows = [_quantize_row(P[r].detach().to(torch.float32), bits, group_size) for r in range(k)]
    return stack_rows(rows, offsets, bits, group_size, num_cols)


def stack_rows(rows: list[tuple[Tensor, Tensor, Tensor]], block_offsets: Tensor, bits: int, group_size: int,
               num_cols: int) -> QuantizedBasis:
    """A QuantizedBasis from per-row (bytes, scales, mins) as `_quantize_row` makes them."""
    first = rows[0][0]
    codes = torch.stack([r[0] for r in rows], out=empty_huge((len(rows), first.numel()), first.dtype, first.device))
    scales = torch.stack([r[1] for r in rows], dim=1).contiguous()  # group-major [n_groups, k]
    mins = torch.stack([r[2] for r in rows], dim=1).contiguous()
    return QuantizedBasis(codes, scales, mins, block_offsets, bits, group_size, num_cols)


def unpack_codes(qb: QuantizedBasis, start: int = 0, stop: int | None = None) -> Tensor:
    """The integer codes of columns start..stop of a packed basis, as uint8 [k, stop - start].

    start must sit on a group edge (a multiple of group_size).
    """
    if qb.bits is None:
        raise InvalidArgumentError("a dense basis (bits=None) has no codes")
    stop = qb.num_cols if stop is None else stop
    if not 0 <= start < stop <= qb.num_cols:
        raise InvalidArgumentError(f"column range {start}..{stop} is not a non-empty range inside the basis's "
                                   f"{qb.num_cols} columns")
    if start % qb.group_size:
        raise InvalidArgumentError(f"column range {start}..{stop} starts inside a quantisation group: start must be "
                                   f"a multiple of group_size ({qb.group_size})")
    bits, per_byte, group = qb.bits, 8 // qb.bits, qb.group_size
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=qb.device).view(1, 1, per_byte, 1)

    def unpack(packed: Tensor, n_groups: int, length: int) -> Tensor:  # bytes of n_groups groups of length
        width = -(-length // per_byte)
        planes = (packed.reshape(qb.k, n_groups, 1, width) >> shifts) & ((1 << bits) - 1)
        return planes.reshape(qb.k, n_groups, per_byte * width)[:, :, :length].reshape(qb.k, -1)

    first_group, group_bytes = start // group, group // per_byte
    end_group = -(-stop // group)
    n_full = min(end_group, qb.num_cols // group) - first_group  # whole groups in range
    parts = []
    if n_full:
        lo = first_group * group_bytes
        parts.append(unpack(qb.codes[:, lo : lo + n_full * group_bytes], n_full, group))
    if first_group + n_full < end_group:  # the short last group of the row
        parts.append(unpack(qb.codes[:, (first_group + n_full) * group_bytes :], 1, qb.num_cols % group))
    return torch.cat(parts, dim=1)[:, : stop - start]


def dequantize(qb: QuantizedBasis, start: int = 0, stop: int | None = None) -> Tensor:
    """Columns start..stop of the basis as float32 [k, stop - start]: p^ = lo + scale * code.

    By default the whole basis. For a packed basis start must be a multiple of group_size.
    """
    if not isinstance(qb, QuantizedBasis):
        raise InvalidTypeError(f"dequantize takes a tk.QuantizedBasis, got {type(qb).__name__}")
    stop = qb.num_cols if stop is None else stop
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidTypeError(f"dequantize: {name} must be an int, got {type(value).__name__} {value!r}")
    start, stop = int(start), int(stop)
    if not 0 <= start < stop <= qb.num_cols:
        raise InvalidArgumentError(f"dequantize: bad column range {start}..{stop} for {qb.num_cols} columns; "
                                   "0 <= start < stop <= num_cols")
    if qb.bits is None:
        return qb.codes[:, start:stop].clone()
    codes = unpack_codes(qb, start, stop).to(torch.float32)
    group_of_col = torch.arange(start, stop, device=codes.device) // qb.group_size
    return qb.mins.T[:, group_of_col] + qb.scales.T[:, group_of_col] * codes


def round_groups_int8(g: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """g rounded to int8 per group of `group_size` columns (the basis's groups): the spec of
    project_int8's rounding, which the C++ kernel reproduces bit for bit.

    Returns (q, scales): int8 [D] and float32 [n_groups], with g^[j] = q[j] * scales[t] for j
    in group t. scale = max|g| / 127 over the group and q = round_half_even(g * (127 / max|g|)),
    both in float32, so |g^[j] - g[j]| <= scale / 2. A group whose largest magnitude is below
    127 / float32's largest value (3.7e-37), where 127 / max|g| would overflow, rounds to
    zero; a group holding a NaN or an infinity gets a
    NaN scale, so that the NaN reaches the projection instead of vanishing.
    """
    d = g.numel()
    n_groups = -(-d // group_size)
    padded = torch.zeros(n_groups * group_size, dtype=torch.float32, device=g.device)
    padded[:d] = g.reshape(-1)
    groups = padded.view(n_groups, group_size)
    finite = torch.isfinite(groups).all(dim=1)
    amax = torch.where(finite[:, None], groups.abs(), 0.0).amax(dim=1)
    # tensor / tensor: one correctly rounded division, as in C++ (a Python scalar over a
    # tensor is computed as a reciprocal times the scalar, rounded twice)
    full = torch.full_like(amax, 127.0)
    factor = full / amax
    flushed = torch.isinf(factor)  # max|g| below 127 / float32 max (zero and subnormals too)
    safe = torch.where(flushed, 1.0, amax)
    q = torch.round(groups * torch.where(flushed, 1.0, factor)[:, None])
    q[flushed | ~finite] = 0
    scales = torch.where(flushed, 0.0, safe / full)
    scales[~finite] = float("nan")
    return q.to(torch.int8).reshape(-1)[:d], scales


def unround_groups_int8(q: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """g^ = q * scale of its group, float32 [D]: the g that project_int8 projects."""
    return q.float() * scales.repeat_interleave(group_size)[: q.numel()]
