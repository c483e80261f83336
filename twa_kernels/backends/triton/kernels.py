"""Triton kernels for the packed-basis ops (layout: twa_kernels/quant.py).

A program owns a tile of TILE_GROUPS consecutive groups for all k rows (visited K_CHUNK
rows at a time). The bytes of a tile are unpacked at once into a [K_CHUNK, PER_BYTE,
TILE_BYTES] block: axis 1 is the plane (the shift), so column = group * GROUP + plane * W +
byte. Codes become floats by the exponent trick: OR-ing a code c < 2^8 into the mantissa of
2^23 gives the float 2^23 + c, and subtracting 2^23 from it is exact, so an OR and a full-rate
add replace the quarter-rate int-to-float convert. (Folding the 2^23 into the group minimum
would save the add but cancel catastrophically: lo - 2^23 * scale loses half a step.)

The short last group of a row has a narrower plane width W, so it is launched separately
with the same kernel (runtime W and group length L). Dense bases (BITS == 0) read float32
rows and skip the metadata.

Blocks: a tile usually lies inside one coefficient block; where it crosses block edges the
kernels loop over the blocks it touches, masking columns. project sums each (tile, block)
piece either with atomics into y, or (DETERMINISTIC) into a partial row `tile + block`,
unique because along D each next piece advances the tile, the block or both; a second pass
then sums a block's pieces in a fixed order. Both sum into float64: a block may hold
millions of tiles, and float32 atomics over that many same-signed pieces lose the spec's
accuracy (each add rounds by half an ulp of the running sum).
"""

from __future__ import annotations

import triton
import triton.language as tl

_MANTISSA_ONE = tl.constexpr(8388608.0)  # 2^23: the float whose mantissa holds an 8-bit code unchanged


@triton.jit
def _first_block(offsets, n_blocks, col):
    """The block holding column `col`: the largest b with offsets[b] <= col (binary search)."""
    lo = 0
    hi = n_blocks
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(offsets + mid) <= col:
            lo = mid
        else:
            hi = mid
    return lo


@triton.jit
def _tile(pid, first_group, n_groups, num_cols, W, L,
          GROUP: tl.constexpr, PER_BYTE: tl.constexpr, TILE_GROUPS: tl.constexpr, W_BLOCK: tl.constexpr):
    """Program pid's tile: per lane its byte and group; per (plane, lane) its column and mask."""
    lane = tl.arange(0, TILE_GROUPS * W_BLOCK)
    byte = lane % W_BLOCK
    group = first_group + pid * TILE_GROUPS + lane // W_BLOCK
    tile_ok = group < first_group + n_groups
    col_lo = (first_group + pid * TILE_GROUPS) * GROUP
    col_hi = tl.minimum(col_lo + TILE_GROUPS * GROUP, num_cols)
    plane = tl.arange(0, PER_BYTE)
    col = group[None, :] * GROUP + plane[:, None] * W + byte[None, :]  # [PER_BYTE, TILE_GROUPS * W_BLOCK]
    col_ok = tile_ok[None, :] & (byte[None, :] < W) & (plane[:, None] * W + byte[None, :] < L) & (col < num_cols)
    return byte, group, tile_ok, col_lo, col_hi, col, col_ok


@triton.jit
def _tile_values(codes, scales, mins, k, row_stride, rows, group, byte, tile_ok, col, col_ok, W,
                 GROUP_BYTES: tl.constexpr, BITS: tl.constexpr, PER_BYTE: tl.constexpr):
    """Dequantised basis values [K_CHUNK, PER_BYTE, TILE_BYTES] of `rows` in the tile, 0 where masked."""
    row_ok = rows < k
    if BITS == 0:
        ptr = codes + rows[:, None, None].to(tl.int64) * row_stride + col[None, :, :]
        values = tl.load(ptr, mask=row_ok[:, None, None] & col_ok[None, :, :], other=0.0)
    else:
        plane = tl.arange(0, PER_BYTE)
        ptr = codes + rows[:, None].to(tl.int64) * row_stride + group[None, :].to(tl.int64) * GROUP_BYTES + byte[None, :]
        packed = tl.load(ptr, mask=row_ok[:, None] & tile_ok[None, :] & (byte[None, :] < W), other=0).to(tl.int32)
        code = (packed[:, None, :] >> (plane[None, :, None] * BITS)) & ((1 << BITS) - 1)
        as_float = (code | 0x4B000000).to(tl.float32, bitcast=True)  # == 2^23 + code, exactly
        meta = group[None, :].to(tl.int64) * k + rows[:, None]
        meta_ok = row_ok[:, None] & tile_ok[None, :]
        scale = tl.load(scales + meta, mask=meta_ok, other=0.0)[:, None, :]
        low = tl.load(mins + meta, mask=meta_ok, other=0.0)[:, None, :]
        values = scale * (as_float - _MANTISSA_ONE) + low
        values = tl.where(row_ok[:, None, None] & col_ok[None, :, :], values, 0.0)
    return values


@triton.jit
def project_tiles(codes, scales, mins, offsets, g, y, partial, k, n_blocks, row_stride, num_cols,
                  first_group, n_groups, tile_base, W, L,
                  GROUP: tl.constexpr, GROUP_BYTES: tl.constexpr, BITS: tl.constexpr, PER_BYTE: tl.constexpr,
                  TILE_GROUPS: tl.constexpr, W_BLOCK: tl.constexpr, K_CHUNK: tl.constexpr,
                  DETERMINISTIC: tl.constexpr):
    """Pass 1 of project: each program sums its tile's products per (row, block)."""
    pid = tl.program_id(0)
    byte, group, tile_ok, col_lo, col_hi, col, col_ok = _tile(pid, first_group, n_groups, num_cols, W, L, GROUP,
                                                              PER_BYTE, TILE_GROUPS, W_BLOCK)
    gv = tl.load(g + col, mask=col_ok, other=0.0).to(tl.float32)
    b_first = _first_block(offsets, n_blocks, col_lo)
    for r0 in range(0, k, K_CHUNK):
        rows = r0 + tl.arange(0, K_CHUNK)
        values = _tile_values(codes, scales, mins, k, row_stride, rows, group, byte, tile_ok, col, col_ok, W,
                              GROUP_BYTES, BITS, PER_BYTE)
        products = values * gv[None, :, :]
        b = b_first
        block_lo = tl.load(offsets + b)
        # usually once: a tile seldom crosses a block edge (bounded by the blocks there are,
        # whatever the offsets hold: they are checked once per version on a GPU)
        while (block_lo < col_hi) & (b < n_blocks):
            block_hi = tl.load(offsets + b + 1)
            in_block = (col >= block_lo) & (col < block_hi)
            sums = tl.sum(tl.sum(tl.where(in_block[None, :, :], products, 0.0), axis=2), axis=1)
            if DETERMINISTIC:
                tl.store(partial + (tile_base + pid + b).to(tl.int64) * k + rows, sums, mask=rows < k)
            else:
                tl.atomic_add(y + rows * n_blocks + b, sums.to(tl.float64), mask=rows < k)
            b += 1
            block_lo = block_hi


@triton.jit
def project_sum_pieces(partial, offsets, y, k, n_blocks, n_full_groups, n_main_tiles,
                       TILE_COLS: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, K_BLOCK: tl.constexpr):
    """Pass 2 of deterministic project: y[:, b] = the sum of block b's pieces, tile by tile."""
    b = tl.program_id(0)
    rows = tl.program_id(1) * K_BLOCK + tl.arange(0, K_BLOCK)
    first_col = tl.load(offsets + b)
    last_col = tl.load(offsets + b + 1) - 1
    tail_start = n_full_groups * GROUP  # the short last group is tile n_main_tiles
    # clamped to the tiles there are, whatever the offsets hold
    t_first = tl.maximum(tl.where(first_col >= tail_start, n_main_tiles, first_col // TILE_COLS), 0)
    t_last = tl.minimum(tl.where(last_col >= tail_start, n_main_tiles, last_col // TILE_COLS), n_main_tiles)
    acc = tl.zeros([K_BLOCK], dtype=tl.float64)
    for t0 in range(t_first, t_last + 1, CHUNK):
        tiles = t0 + tl.arange(0, CHUNK)
        ok = (tiles <= t_last)[:, None] & (rows < k)[None, :]
        pieces = tl.load(partial + (tiles + b).to(tl.int64)[:, None] * k + rows[None, :], mask=ok, other=0.0)
        acc += tl.sum(pieces.to(tl.float64), axis=0)
    tl.store(y + rows * n_blocks + b, acc, mask=rows < k)


@triton.jit
def reconstruct_tiles(codes, scales, mins, offsets, x, center, out, k, n_blocks, row_stride, num_cols,
                      first_group, n_groups, W, L,
                      GROUP: tl.constexpr, GROUP_BYTES: tl.constexpr, BITS: tl.constexpr, PER_BYTE: tl.constexpr,
                      TILE_GROUPS: tl.constexpr, W_BLOCK: tl.constexpr, K_CHUNK: tl.constexpr,
                      HAS_CENTER: tl.constexpr):
    """out[j] = center[j] + sum_r p^[r, j] * x[r, block(j)] over one tile of columns."""
    pid = tl.program_id(0)
    byte, group, tile_ok, col_lo, col_hi, col, col_ok = _tile(pid, first_group, n_groups, num_cols, W, L, GROUP,
                                                              PER_BYTE, TILE_GROUPS, W_BLOCK)
    # The block of each column; a tile inside one block (the usual case) skips the loop.
    b_first = _first_block(offsets, n_blocks, col_lo)
    block = tl.zeros([PER_BYTE, TILE_GROUPS * W_BLOCK], dtype=tl.int32) + b_first
    b = b_first + 1
    edge = tl.load(offsets + b)
    while (edge < col_hi) & (b < n_blocks):  # bounded, as in project
        block += (col >= edge).to(tl.int32)
        b += 1
        edge = tl.load(offsets + b)
    acc = tl.zeros([PER_BYTE, TILE_GROUPS * W_BLOCK], dtype=tl.float32)
    for r0 in range(0, k, K_CHUNK):
        rows = r0 + tl.arange(0, K_CHUNK)
        values = _tile_values(codes, scales, mins, k, row_stride, rows, group, byte, tile_ok, col, col_ok, W,
                              GROUP_BYTES, BITS, PER_BYTE)
        if b == b_first + 1:  # one coefficient per row for the whole tile
            row_coeff = tl.load(x + rows * n_blocks + b_first, mask=rows < k, other=0.0)
            acc += tl.sum(values * row_coeff[:, None, None], axis=0)
        else:  # gather each column's coefficient
            ok = (rows < k)[:, None, None] & col_ok[None, :, :]
            col_coeff = tl.load(x + rows[:, None, None] * n_blocks + block[None, :, :], mask=ok, other=0.0)
            acc += tl.sum(values * col_coeff, axis=0)
    if HAS_CENTER:
        acc += tl.load(center + col, mask=col_ok, other=0.0).to(tl.float32)
    _store_rounded(out, col, acc, col_ok)


@triton.jit
def _store_rounded(out, index, value, mask):
    """out[index] = float32 `value` in out's dtype, a bfloat16 rounded to nearest even in integer
    steps as the CPU kernels round it: a cast leaves the rounding to the compiler (Triton's
    interpreter truncates)."""
    if out.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 0x40
        half = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, quiet_nan, rounded).to(tl.uint16)
        tl.store(out + index, half.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out + index, value.to(out.dtype.element_ty), mask=mask)


@triton.jit
def gram_pieces(p, out, partial, k, d, span,
                K_BLOCK: tl.constexpr, COLS: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """p p^T in float64 over one span of columns, for one (K_BLOCK x K_BLOCK) block of the result."""
    pid = tl.program_id(0)
    ri = tl.program_id(1) * K_BLOCK + tl.arange(0, K_BLOCK)
    rj = tl.program_id(2) * K_BLOCK + tl.arange(0, K_BLOCK)
    acc = tl.zeros([K_BLOCK, K_BLOCK], dtype=tl.float64)
    start = pid.to(tl.int64) * span  # int64: past 2^31 columns an int32 product wraps
    stop = tl.minimum(start + span, d)
    for c0 in range(start, stop, COLS):
        cols = c0 + tl.arange(0, COLS)
        ok = cols < stop
        a = tl.load(p + ri[:, None].to(tl.int64) * d + cols[None, :], mask=(ri < k)[:, None] & ok[None, :], other=0.0)
        b = tl.load(p + rj[:, None].to(tl.int64) * d + cols[None, :], mask=(rj < k)[:, None] & ok[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float64)[:, None, :] * b.to(tl.float64)[None, :, :], axis=2)
    ok = (ri < k)[:, None] & (rj < k)[None, :]
    if DETERMINISTIC:
        tl.store(partial + pid.to(tl.int64) * k * k + ri[:, None] * k + rj[None, :], acc, mask=ok)
    else:
        tl.atomic_add(out + ri[:, None] * k + rj[None, :], acc, mask=ok)


@triton.jit
def combine_rows_tiles(t, p, out, r, k, d, R_BLOCK: tl.constexpr, COLS: tl.constexpr):
    """out = t @ p for float64 t [r, k] and float32 p [k, d], accumulated in float64."""
    # int64 columns, and a row pointer stepped by d: the int32 product i * d wraps past 2^31
    cols = tl.program_id(0).to(tl.int64) * COLS + tl.arange(0, COLS)
    rows = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    acc = tl.zeros([R_BLOCK, COLS], dtype=tl.float64)
    row = p
    for i in range(0, k):
        pv = tl.load(row + cols, mask=cols < d, other=0.0).to(tl.float64)
        tv = tl.load(t + rows * k + i, mask=rows < r, other=0.0)
        acc += tv[:, None] * pv[None, :]
        row += d
    ok = (rows < r)[:, None] & (cols < d)[None, :]
    tl.store(out + rows[:, None].to(tl.int64) * d + cols[None, :], acc.to(tl.float32), mask=ok)
