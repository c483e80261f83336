"""The CUDA C++ kernels (csrc/cuda) for CUDA tensors.

The extension is JIT-built by twa_kernels._build the first time the cuda backend is chosen
(it needs a CUDA build of torch and nvcc); this module allocates outputs and scratch and
calls the registered `twa_kernels_cuda` ops on the current stream. Like the Triton backend,
project and the Gram pass use float atomics unless `torch.use_deterministic_algorithms(True)`
selects their two-pass reduction.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from twa_kernels._ops import register_kernel
from twa_kernels.backends import on_tensors_device


def _lib():
    return torch.ops.twa_kernels_cuda


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@register_kernel("project", "cuda")
@on_tensors_device
def project(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, g: Tensor, bits: int,
            group_size: int) -> Tensor:
    k, n_blocks = codes.shape[0], block_offsets.numel() - 1
    exact = torch.are_deterministic_algorithms_enabled()
    # float64 sums: a block may hold millions of runs, too many terms for a float32 sum
    y = torch.zeros(k, n_blocks, dtype=torch.float64, device=g.device)
    scratch = _lib().project_scratch(k, g.numel(), n_blocks, bits, group_size) if exact else 0
    partial = torch.empty(scratch, dtype=torch.float32, device=g.device)
    _lib().project_out(codes.contiguous(), scales.contiguous(), mins.contiguous(), block_offsets.contiguous(),
                       g.contiguous(), bits, group_size, exact, _stream(g.device), y, partial)
    return y.to(torch.float32)


@register_kernel("reconstruct_into", "cuda")
@on_tensors_device
def reconstruct_into(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, x: Tensor,
                     center: Optional[Tensor], bits: int, group_size: int, out: Tensor) -> None:
    # the kernel reads center in its dtype and writes out in its own: a cast costs no pass
    _lib().reconstruct_out(codes.contiguous(), scales.contiguous(), mins.contiguous(), block_offsets.contiguous(),
                           x.to(torch.float32).contiguous(), None if center is None else center.contiguous(),
                           bits, group_size, _stream(x.device), out)


@register_kernel("reconstruct", "cuda")
@on_tensors_device
def reconstruct(codes: Tensor, scales: Tensor, mins: Tensor, block_offsets: Tensor, x: Tensor,
                center: Optional[Tensor], bits: int, group_size: int, num_cols: int) -> Tensor:
    out = torch.empty(num_cols, dtype=center.dtype if center is not None else torch.float32, device=x.device)
    reconstruct_into(codes, scales, mins, block_offsets, x, center, bits, group_size, out)
    return out


@register_kernel("gram", "cuda")
@on_tensors_device
def gram(p: Tensor) -> Tensor:
    p = p.to(torch.float32).contiguous()
    k, d = p.shape
    exact = torch.are_deterministic_algorithms_enabled()
    out = torch.zeros(k, k, dtype=torch.float64, device=p.device)
    partial = torch.empty(_lib().gram_scratch(k, d) if exact else 0, dtype=torch.float64, device=p.device)
    _lib().gram_out(p, exact, _stream(p.device), out, partial)
    return out


@register_kernel("combine_rows", "cuda")
@on_tensors_device
def combine_rows(t: Tensor, p: Tensor) -> Tensor:
    out = torch.empty(t.shape[0], p.shape[1], dtype=torch.float32, device=p.device)
    _lib().combine_rows_out(t.to(torch.float64).contiguous(), p.to(torch.float32).contiguous(),
                            _stream(p.device), out)
    return out
