"""The Triton backend: launches the kernels of kernels.py for CUDA tensors, or for CPU tensors
under TRITON_INTERPRET=1 (how CI runs them without a GPU).

TRITON_INTERPRET is read when the kernels are defined, i.e. when this module is first
imported; twa_kernels imports it lazily, on the first op that picks the Triton backend.

project and the Gram pass sum over D with float atomics by default, so their last bits can
vary from run to run. Under `torch.use_deterministic_algorithms(True)` they switch to a
two-pass reduction (per-tile partial sums, then a fixed-order sum) and are bitwise
reproducible; reconstruct and combine_rows are deterministic either way.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from twa_kernels.errors import InvalidArgumentError
from twa_kernels._ops import register_kernel
from twa_kernels.backends import on_tensors_device
from twa_kernels.backends.triton import kernels

# Columns per program: at most 512, which keeps a K_CHUNK x 512 tile of unpacked values in
# registers; a group wider than that is one program's tile on its own.
TILE_COLS = 512
K_CHUNK = 16
DENSE_GROUP = 256  # a dense basis has no groups; this is just its tiling
GRAM_SPAN, GRAM_COLS, GRAM_K_BLOCK = 8192, 32, 16
COMBINE_COLS, COMBINE_ROWS = 128, 16
SUM_CHUNK = 64  # pieces summed per step in the deterministic second pass
# A group is one tile's row: at 4096 columns a kernel compiles in seconds; at 65,536 its build
# ran past 4 minutes and at 131,072 Triton refused the tile (sm_90 builds on a 2-core AMD EPYC,
# 2026-12-05)
MAX_GROUP_SIZE = 4096


def deterministic() -> bool:
    """Whether the two-pass (bitwise reproducible) reductions are in use."""
    return torch.are_deterministic_algorithms_enabled()


class _Layout:
    """Launch geometry of one basis: tiles of whole groups, the short last group separate."""

    def __init__(self, k: int, num_cols: int, bits: int, group_size: int, n_blocks: int = 1):
        if num_cols >= 2**31:
            raise InvalidArgumentError(f"the Triton kernels index columns in 32 bits, so D must be below 2^31, got {num_cols}; "
                             "use the cuda backend (TWA_KERNELS_BACKEND=cuda) for larger bases")
        if bits and group_size > MAX_GROUP_SIZE:
            raise InvalidArgumentError(f"the Triton kernels hold a whole group in one tile, so group_size must be at "
                                       f"most {MAX_GROUP_SIZE}, got {group_size}; quantize with a smaller group_size, "
                                       "or use the cuda backend (TWA_KERNELS_BACKEND=cuda)")
        self.bits = bits
        self.per_byte = 8 // bits if bits else 1
        self.group = group_size if bits else DENSE_GROUP
        self.group_bytes = self.group // self.per_byte
        self.w_block = triton.next_power_of_2(self.group_bytes)
        self.tile_groups = max(1, TILE_COLS // (self.w_block * self.per_byte))
        self.k_chunk = min(K_CHUNK, triton.next_power_of_2(k))
        if bits:
            self.n_full, self.tail = divmod(num_cols, self.group)
        else:  # dense: every "group" is full; the column mask trims the last one
            self.n_full, self.tail = triton.cdiv(num_cols, self.group), 0
        self.n_main_tiles = triton.cdiv(self.n_full, self.tile_groups)
        # the kernels compute a tile's end column and a (row, block) index in 32 bits: past
        # 2^31 they would wrap, dropping a tile or writing outside y
        if num_cols + self.tile_groups * self.group >= 2**31:
            raise InvalidArgumentError(f"the Triton kernels index columns in 32 bits, and D = {num_cols} lies within "
                                       "one tile of 2^31; use the cuda backend (TWA_KERNELS_BACKEND=cuda)")
        if (self.n_main_tiles + 1 + n_blocks) * k >= 2**31:
            raise InvalidArgumentError(f"the Triton kernels index (row, block) pairs in 32 bits, and k = {k} rows of "
                                       f"{n_blocks} blocks reach 2^31; use the cuda backend (TWA_KERNELS_BACKEND=cuda) "
                                       "or fewer blocks")

    def launches(self):
        """(first_group, n_groups, tile_base, W, L, grid) for the full groups, then the tail."""
        if self.n_full:
            yield 0, self.n_full, 0, self.group_bytes, self.group, (self.n_main_tiles,)
        if self.tail:
            yield self.n_full, 1, self.n_main_tiles, triton.cdiv(self.tail, self.per_byte), self.tail, (1,)

    def constants(self) -> dict:
        return dict(GROUP=self.group, GROUP_BYTES=self.group_bytes, BITS=self.bits, PER_BYTE=self.per_byte,
                    TILE_GROUPS=self.tile_groups, W_BLOCK=self.w_block, K_CHUNK=self.k_chunk)


def _metadata(codes: Tensor, scales: Tensor, mins: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    if bits:
        return scales.contiguous(), mins.contiguous()
    empty = codes.new_zeros(1, dtype=torch.float32)  # never read: the dense path has no metadata
    return empty, empty


@register_kernel("project", "triton")
@on_tensors_device
def project(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, g: Tensor, bits: int,
            group_size: int) -> Tensor:
    k, num_cols, n_blocks = codes.shape[0], g.numel(), block_offsets.numel() - 1
    layout = _Layout(k, num_cols, bits, group_size, n_blocks)
    codes, g, offsets = codes.contiguous(), g.contiguous(), block_offsets.contiguous()
    scales, mins = _metadata(codes, scales, mins, bits)
    row_stride = codes.shape[1]
    exact = deterministic()
    # float64 sums: a block may hold millions of tiles, too many terms for a float32 sum
    y = torch.zeros(k, n_blocks, dtype=torch.float64, device=g.device)
    partial = (torch.empty((layout.n_main_tiles + 1 + n_blocks) * k, dtype=torch.float32, device=g.device)
               if exact else y)
    for first_group, n_groups, tile_base, width, length, grid in layout.launches():
        kernels.project_tiles[grid](
            codes, scales, mins, offsets, g, y, partial, k, n_blocks, row_stride, num_cols,
            first_group, n_groups, tile_base, width, length, DETERMINISTIC=exact, **layout.constants(),
        )
    if exact:
        k_block = min(64, triton.next_power_of_2(k))
        kernels.project_sum_pieces[(n_blocks, triton.cdiv(k, k_block))](
            partial, offsets, y, k, n_blocks, layout.n_full, layout.n_main_tiles,
            TILE_COLS=layout.tile_groups * layout.group, GROUP=layout.group, CHUNK=SUM_CHUNK, K_BLOCK=k_block,
        )
    return y.to(torch.float32)


@register_kernel("reconstruct_into", "triton")
@on_tensors_device
def reconstruct_into(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, x: Tensor,
                     center: Optional[Tensor], bits: int, group_size: int, out: Tensor) -> None:
    # the kernel loads center in its dtype and stores in out's: a cast costs no pass
    num_cols = out.numel()
    k, n_blocks = codes.shape[0], block_offsets.numel() - 1
    layout = _Layout(k, num_cols, bits, group_size, n_blocks)
    codes, offsets = codes.contiguous(), block_offsets.contiguous()
    scales, mins = _metadata(codes, scales, mins, bits)
    x = x.to(torch.float32).contiguous()
    center_arg = center.contiguous() if center is not None else out
    for first_group, n_groups, _, width, length, grid in layout.launches():
        kernels.reconstruct_tiles[grid](
            codes, scales, mins, offsets, x, center_arg, out, k, n_blocks, codes.shape[1], num_cols,
            first_group, n_groups, width, length, HAS_CENTER=center is not None, **layout.constants(),
        )


@register_kernel("reconstruct", "triton")
@on_tensors_device
def reconstruct(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, x: Tensor,
                center: Optional[Tensor], bits: int, group_size: int, num_cols: int) -> Tensor:
    out = torch.empty(num_cols, dtype=center.dtype if center is not None else torch.float32, device=x.device)
    reconstruct_into(codes, scales, mins, block_offsets, x, center, bits, group_size, out)
    return out


@register_kernel("gram", "triton")
@on_tensors_device
def gram(p: Tensor) -> Tensor:
    p = p.to(torch.float32).contiguous()
    k, d = p.shape
    exact = deterministic()
    n_spans = triton.cdiv(d, GRAM_SPAN)
    grid = (n_spans, triton.cdiv(k, GRAM_K_BLOCK), triton.cdiv(k, GRAM_K_BLOCK))
    out = torch.zeros(k, k, dtype=torch.float64, device=p.device)
    partial = torch.empty(n_spans, k, k, dtype=torch.float64, device=p.device) if exact else out
    kernels.gram_pieces[grid](p, out, partial, k, d, GRAM_SPAN, K_BLOCK=GRAM_K_BLOCK, COLS=GRAM_COLS,
                              DETERMINISTIC=exact)
    return partial.sum(0) if exact else out


@register_kernel("combine_rows", "triton")
@on_tensors_device
def combine_rows(t: Tensor, p: Tensor) -> Tensor:
    t = t.to(torch.float64).contiguous()
    p = p.to(torch.float32).contiguous()
    (r, k), d = t.shape, p.shape[1]
    out = torch.empty(r, d, dtype=torch.float32, device=p.device)
    grid = (triton.cdiv(d, COMBINE_COLS), triton.cdiv(r, COMBINE_ROWS))
    kernels.combine_rows_tiles[grid](t, p, out, r, k, d, R_BLOCK=COMBINE_ROWS, COLS=COMBINE_COLS)
    return out
