#!/usr/bin/env bash
# The whole GPU run in one command, on a machine with a CUDA GPU, CUDA torch, Triton and nvcc:
# build the CUDA extension, run the op tests and TWA's training step on CUDA tensors for the
# cuda and Triton backends, then bench/gpu.py (JSON to bench/results/, and to $OUT when set).
# Arguments go to bench/gpu.py.
# The benchmark runs even when tests fail, so one run shows everything; the exit status is
# then the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
log_dir=${OUT:-}
status=0
"$python" -m twa_kernels build --cuda -v >"${log_dir:-/tmp}/gpu-build.log" 2>&1 || {
    status=$?
    tail -40 "${log_dir:-/tmp}/gpu-build.log"
}
tail -1 "${log_dir:-/tmp}/gpu-build.log"
workers=()
if "$python" -c "import xdist" 2>/dev/null; then
    workers=(-n 8)  # Triton compiles each kernel variant once per worker: eight share the cores well
fi
"$python" -m pytest -q -p no:cacheprovider "${workers[@]}" tests/test_ops.py tests/test_orthonormalize.py \
    tests/test_quant.py tests/test_twa_device.py 2>&1 | tee "${log_dir:-/tmp}/gpu-tests.log" | tail -40
test_status=${PIPESTATUS[0]}
[ "$status" -ne 0 ] || status=$test_status
"$python" bench/gpu.py "$@"
bench_status=$?
[ "$status" -ne 0 ] || status=$bench_status
exit "$status"
