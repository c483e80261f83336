"""Other libraries' kernels on the shape of project, for bench/gpu.py: the peers it is measured against.

project is y = B g with B of k x D: a GEMV with k outputs and a reduction of length D. The peers
compute that same product with their own storage of B:

- torch-bf16: B dense in bf16 through torch.mv (cuBLAS), and its transpose product through
  torch.addmv for reconstruct: the unquantised roof, two bytes a weight.
- torch-int4pack: torch._weight_int4pack_mm, the tinygemm kernel behind torchao's int4
  weight-only layout (4-bit codes, a bf16 scale and zero per group of 128).
- bitsandbytes-nf4: bitsandbytes' 4-bit GEMV (matmul_4bit on one row, as Linear4bit runs it),
  NF4 codes with a float32 absmax per block of 128.

    python bench/gpu_peers.py PEER D K [K ...]     # one JSON line per k on stdout

bench/gpu.py runs each peer in a process of its own, so that a peer failing at these sizes (a
32-bit index past 2**31, say) cannot poison the benchmark's own CUDA context. Every timing comes
with the relative error of the peer's output against a float32 product of the same dequantised
weights, so a peer that runs fast but wrong is seen as wrong.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu import DEVICE, cuda_time_ms  # noqa: E402

GROUP = 128
CHUNK = 1 << 22  # columns per step of the float32 reference, so it never holds k x D floats


def chunked_reference(k: int, d: int, weights, x: torch.Tensor) -> torch.Tensor:
    """sum over column chunks of weights(start, stop) @ x[start:stop], in float32."""
    y = torch.zeros(k, device=DEVICE)
    for start in range(0, d, CHUNK):
        stop = min(d, start + CHUNK)
        y += weights(start, stop) @ x[start:stop].float()
    return y


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float().reshape(-1) - want.reshape(-1)).norm() / want.norm())


def torch_bf16(k: int, d: int) -> list[dict]:
    w = torch.randn(k, d, dtype=torch.bfloat16, device=DEVICE)
    g = torch.randn(d, dtype=torch.bfloat16, device=DEVICE)
    coef = torch.randn(k, dtype=torch.bfloat16, device=DEVICE)
    center = torch.randn(d, dtype=torch.bfloat16, device=DEVICE)
    want = chunked_reference(k, d, lambda a, b: w[:, a:b].float(), g)
    project_error = relative_error(torch.mv(w, g), want)
    sample = torch.randint(0, d, (4096,), device=DEVICE)  # reconstruct checked on sampled columns
    got = torch.addmv(center, w.t(), coef)[sample]
    reconstruct_error = relative_error(got, center[sample].float() + w[:, sample].float().t() @ coef.float())
    return [
        dict(op="project", ms=cuda_time_ms(lambda: torch.mv(w, g)), bytes=2 * k * d + 2 * d + 2 * k,
             rel_error=project_error),
        dict(op="reconstruct", ms=cuda_time_ms(lambda: torch.addmv(center, w.t(), coef)), bytes=2 * k * d + 4 * d,
             rel_error=reconstruct_error),
    ]


def torch_int4pack(k: int, d: int) -> list[dict]:
    d = -(-d // 1024) * 1024  # the tinygemm layout wants whole tiles of the reduction dimension
    q = torch.randint(0, 16, (k, d), dtype=torch.uint8, device=DEVICE)
    packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), 8)
    scales = (torch.rand(d // GROUP, k, device=DEVICE) * 1e-2 + 1e-3).bfloat16()
    zeros = (torch.randn(d // GROUP, k, device=DEVICE) * 1e-2).bfloat16()
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).contiguous()
    x = torch.randn(1, d, dtype=torch.bfloat16, device=DEVICE)

    def dequantised(a: int, b: int) -> torch.Tensor:  # w = (q - 8) * scale + zero, per group
        s = scales[a // GROUP : b // GROUP].float().t().repeat_interleave(GROUP, dim=1)
        z = zeros[a // GROUP : b // GROUP].float().t().repeat_interleave(GROUP, dim=1)
        return (q[:, a:b].float() - 8) * s + z

    fn = lambda: torch._weight_int4pack_mm(x, packed, GROUP, scales_and_zeros)  # noqa: E731
    error = relative_error(fn(), chunked_reference(k, d, dequantised, x[0]))
    del q
    return [dict(op="project", ms=cuda_time_ms(fn), bytes=k * d // 2 + scales_and_zeros.numel() * 2 + 2 * d + 2 * k,
                 rel_error=error, d_padded=d)]


def bitsandbytes_nf4(k: int, d: int) -> list[dict]:
    import bitsandbytes as bnb

    w = torch.randn(k, d, dtype=torch.bfloat16, device=DEVICE)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=GROUP, quant_type="nf4")
    del w
    x = torch.randn(1, d, dtype=torch.bfloat16, device=DEVICE)
    fn = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)  # noqa: E731
    dense = bnb.functional.dequantize_4bit(packed, state)
    error = relative_error(fn(), chunked_reference(k, d, lambda a, b: dense[:, a:b].float(), x[0]))
    del dense
    return [dict(op="project", ms=cuda_time_ms(fn), bytes=packed.numel() + 4 * k * d // GROUP + 2 * d + 2 * k,
                 rel_error=error, version=bnb.__version__)]


PEERS = {"torch-bf16": torch_bf16, "torch-int4pack": torch_int4pack, "bitsandbytes-nf4": bitsandbytes_nf4}


def main(argv: list[str]) -> int:
    peer, d, ks = argv[0], int(argv[1]), [int(k) for k in argv[2:]]
    for k in ks:  # one line per k as soon as it is measured: a failure at a larger k keeps the smaller
        for row in PEERS[peer](k, d):
            print(json.dumps(dict(row, impl=peer, k=k)), flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
