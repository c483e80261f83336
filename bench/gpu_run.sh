#!/usr/bin/env bash
# The whole GPU run in one command, on a machine with a CUDA GPU, CUDA torch, Triton and nvcc:
# build the CUDA extension, run the op tests on CUDA tensors for the cuda and Triton backends,
# then bench/gpu.py (JSON to bench/results/, and to $OUT when set). Arguments go to bench/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
"$python" -m twa_kernels build --cuda
"$python" -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_orthonormalize.py tests/test_quant.py
"$python" bench/gpu.py "$@"
