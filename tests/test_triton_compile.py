"""The Triton kernels compile for real GPUs (sm_90 and sm_80), without one.

The interpreter that the op tests use runs the kernels as NumPy and accepts code the
compiler rejects (a plain global in a kernel, say). Here every kernel, in each variant the
launchers use, goes through Triton's full compiler down to a cubin for Hopper, and the main
ones for Ampere. Runs in a subprocess: the test run sets TRITON_INTERPRET=1, and Triton
reads it when the kernels are defined.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import twa_kernels

REPO = Path(twa_kernels.__file__).resolve().parent.parent

COMPILE_ALL = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from twa_kernels.backends import triton as backend
from twa_kernels.backends.triton import kernels

POINTERS = {"codes": "*u8", "scales": "*fp32", "mins": "*fp32", "offsets": "*i64", "g": "*fp32", "y": "*fp64",
            "partial": "*fp32", "x": "*fp32", "p": "*fp32", "t": "*fp64"}

def compile_kernel(fn, arch, constants, **types):
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        else:
            signature[name] = types.get(name, POINTERS.get(name, "i32"))
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants), target=GPUTarget("cuda", arch, 32))
    return 1

count = 0
for bits in (0, 1, 2, 4, 8):
    layout = backend._Layout(72, 1000003, bits, 128).constants()
    codes = "*fp32" if bits == 0 else "*u8"
    for arch in ((90, 80) if bits == 4 else (90,)):
        for exact in (False, True):
            count += compile_kernel(kernels.project_tiles, arch, dict(layout, DETERMINISTIC=exact), codes=codes)
        for out in ("*fp32", "*bf16"):
            count += compile_kernel(kernels.reconstruct_tiles, arch, dict(layout, HAS_CENTER=True), codes=codes,
                                    center=out, out=out)
        count += compile_kernel(kernels.reconstruct_tiles, arch, dict(layout, HAS_CENTER=False), codes=codes,
                                center="*fp32", out="*fp32")
    count += compile_kernel(kernels.project_tiles, 90, dict(layout, DETERMINISTIC=False), codes=codes, g="*bf16")
count += compile_kernel(kernels.project_sum_pieces, 90, dict(TILE_COLS=512, GROUP=128, CHUNK=64, K_BLOCK=64))
for exact in (False, True):
    count += compile_kernel(kernels.gram_pieces, 90, dict(K_BLOCK=16, COLS=32, DETERMINISTIC=exact),
                            out="*fp64", partial="*fp64")
count += compile_kernel(kernels.combine_rows_tiles, 90, dict(R_BLOCK=16, COLS=128), out="*fp32")
print("compiled", count)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernels_compile_for_hopper_and_ampere():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_ALL], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["compiled", "39"]


@pytest.mark.parametrize("k, num_cols, n_blocks, named", [
    (16, 2**31 - 100, 1, "lies within one tile of 2\\^31"),
    (64, 1 << 20, 2**25 + 2**20, "index \\(row, block\\) pairs in 32 bits"),
])
def test_sizes_whose_32_bit_indices_would_wrap_are_refused_before_a_launch(k, num_cols, n_blocks, named):
    # a tile's end column, or row * n_blocks, computed in int32 wrapped: the last tile was
    # dropped (0.0 for its sum) or y was written out of bounds
    from twa_kernels.backends.triton import _Layout
    from twa_kernels.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=named):
        _Layout(k, num_cols, 4, 128, n_blocks)
    _Layout(k, 1 << 20, 4, 128, 1 << 10)  # an ordinary size
