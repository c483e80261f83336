// CUDA kernels for the packed-basis ops, on raw pointers: no torch headers, so nvcc compiles
// this in seconds. The layout is twa_kernels/quant.py's: per row, groups of group_size columns;
// inside a group of L columns, W = ceil(L / (8 / bits)) bytes hold 8 / bits planes, column
// s * W + i in byte i at bit s * bits; scales and mins are group-major [n_groups, k].
//
// Work is split into runs of whole groups; one warp owns a run for all k rows. The run's
// code is written once as __host__ __device__ templates over a "lanes" policy: on the GPU the
// policy is the warp (a lane's partial sums are combined with shuffles), on the host it loops
// over the 32 lanes (runs.cuh). The host instantiation is what emulate.cu's
// `twa_cuda_emulate_*` expose in the test library, so CI, which has nvcc but no GPU, runs the
// very index arithmetic of these kernels against the reference.
#pragma once

#include <cstdint>

#include "../packed_basis.h"

namespace twa_cuda {

// The CPU kernels' struct and dtype tags: one definition of the packed basis for both.
using Basis = twa::PackedBasis;
using DType = twa::DType;

// Groups per run (a dense basis is cut into runs of kDenseRunCols columns).
constexpr int64_t kRunGroups = 16;
constexpr int64_t kDenseRunCols = 2048;

int64_t num_runs(const Basis& b);
// Floats of scratch project needs in deterministic mode: one partial per (run + block, row).
int64_t project_partial_floats(const Basis& b);

// Launchers: enqueue on `stream` (a cudaStream_t) and return a cudaError_t (0 = success).
// project's y is float64 [k, n_blocks], zeroed by the caller unless deterministic.
int project(const Basis& b, const void* g, DType g_dtype, double* y, float* partial, bool deterministic,
            void* stream);
// center (may be null) and out each have their own dtype: a bfloat16 model's weights are
// written from a float32 center as they are stored.
int reconstruct(const Basis& b, const float* x, const void* center, DType center_dtype, void* out, DType out_dtype,
                void* stream);
// out (float64 [k, k]) must be zeroed by the caller unless deterministic; partial holds
// gram_spans(d) * k * k doubles.
int64_t gram_spans(int64_t d);
int gram(const float* p, int64_t k, int64_t d, double* out, double* partial, bool deterministic, void* stream);
int combine_rows(const double* t, const float* p, int64_t r, int64_t k, int64_t d, float* out, void* stream);

}  // namespace twa_cuda
