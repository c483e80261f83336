"""The fused C++/OpenMP kernels (csrc/cpu) for CPU tensors.

The library is JIT-built by twa_kernels._build the first time the cpp backend is chosen;
this module only allocates outputs and calls the registered `twa_kernels_cpu` ops, using
torch's intra-op thread count.

Large fresh outputs ask for huge pages here, when they are allocated (_memory.empty_huge),
not in the kernels: the kernels write into buffers that Python allocated, often already
touched (TWA's workspace, a caller's `out`), where advice takes effect only fault by fault;
the policy is in one place (twa_kernels/_memory.py), next to the other page hints, where
tests can watch it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from twa_kernels._memory import empty_huge
from twa_kernels._ops import register_kernel
from twa_kernels.errors import warn_at_caller

# the kernels read TWA_KERNELS_CPU_ISA themselves: "avx2" keeps a CPU with AVX-512 on the
# AVX2 path, and anything else means the default, so a misspelt value would go unnoticed
if os.environ.get("TWA_KERNELS_CPU_ISA") not in (None, "", "avx2", "avx512"):  # (empty: unset, as the kernels read it)
    warn_at_caller(f"TWA_KERNELS_CPU_ISA={os.environ['TWA_KERNELS_CPU_ISA']!r} is not a setting: 'avx2' keeps a "
                   "CPU with AVX-512 on the AVX2 kernels, 'avx512' (or unset) takes the best path the CPU has",
                   RuntimeWarning)


def _lib():
    return torch.ops.twa_kernels_cpu


@register_kernel("project", "cpp")
def project(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, g: Tensor, bits: int,
            group_size: int) -> Tensor:
    y = torch.empty(codes.shape[0], block_offsets.numel() - 1, dtype=torch.float32)
    _lib().project_out(
        codes.contiguous(), scales.contiguous(), mins.contiguous(), block_offsets.contiguous(),
        g.contiguous(), bits, group_size, torch.get_num_threads(), y,
    )
    return y


@register_kernel("project_pieces", "cpp")
def project_pieces(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, pieces: list[Tensor],
                   bits: int, group_size: int) -> Tensor:
    y = torch.empty(codes.shape[0], block_offsets.numel() - 1, dtype=torch.float32)
    _lib().project_pieces_out(
        codes.contiguous(), scales.contiguous(), mins.contiguous(), block_offsets.contiguous(),
        [p.contiguous() for p in pieces], bits, group_size, torch.get_num_threads(), y,
    )
    return y


@register_kernel("project_int8", "cpp")
def project_int8(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, pieces: list[Tensor],
                 bits: int, group_size: int) -> Tensor:
    y = torch.empty(codes.shape[0], block_offsets.numel() - 1, dtype=torch.float32)
    _lib().project_int8_pieces_out(
        codes.contiguous(), scales.contiguous(), mins.contiguous(), block_offsets.contiguous(),
        [p.contiguous() for p in pieces], bits, group_size, torch.get_num_threads(), y,
    )
    return y


@register_kernel("reconstruct_into", "cpp")
def reconstruct_into(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, x: Tensor,
                     center: Optional[Tensor], bits: int, group_size: int, out: Tensor) -> None:
    # the kernel reads center in its dtype and writes out in its own: a cast costs no pass
    _lib().reconstruct_out(
        codes.contiguous(), scales.contiguous(), mins.contiguous(), block_offsets.contiguous(),
        x.to(torch.float32).contiguous(), None if center is None else center.contiguous(),
        bits, group_size, torch.get_num_threads(), out,
    )


@register_kernel("reconstruct", "cpp")
def reconstruct(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, x: Tensor,
                center: Optional[Tensor], bits: int, group_size: int, num_cols: int) -> Tensor:
    out = empty_huge((num_cols,), center.dtype if center is not None else torch.float32)
    reconstruct_into(codes, scales, mins, block_offsets, x, center, bits, group_size, out)
    return out


@register_kernel("gram", "cpp")
def gram(p: Tensor) -> Tensor:
    out = torch.empty(p.shape[0], p.shape[0], dtype=torch.float64)
    _lib().gram_out(p.to(torch.float32).contiguous(), torch.get_num_threads(), out)
    return out


@register_kernel("combine_rows", "cpp")
def combine_rows(t: Tensor, p: Tensor) -> Tensor:
    out = empty_huge((t.shape[0], p.shape[1]), torch.float32)
    _lib().combine_rows_out(
        t.to(torch.float64).contiguous(), p.to(torch.float32).contiguous(), torch.get_num_threads(), out
    )
    return out
