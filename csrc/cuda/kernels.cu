// CUDA kernels of the packed-basis ops; see kernels.cuh for the layout and the work split,
// and runs.cuh for the run code they share with the host emulation (emulate.cu).
#include "kernels.cuh"

#include <cuda_runtime.h>

#include "runs.cuh"

namespace twa_cuda {
namespace {

using namespace detail;

constexpr int kWarpsPerBlock = 8;
constexpr int kSumThreads = 256;  // threads summing one (block, row) in deterministic project
constexpr int kGramTile = 16, kGramCols = 64;
constexpr int64_t kGramSpan = 16384;

// ---- project -----------------------------------------------------------------------------

template <int BITS>
__global__ void project_kernel(Basis b, const void* g, DType g_dtype, double* y, float* partial, bool deterministic,
                               int64_t n_runs) {
  const int64_t run = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (run < n_runs) project_run<BITS>(b, g, g_dtype, y, partial, deterministic, run, WarpLanes{});
}

// Deterministic second pass: one thread block per (block, row); a fixed split over threads
// and a fixed tree make the sum the same on every run. Summed in float64, as the atomics are.
__global__ void sum_pieces_kernel(Basis b, const float* partial, double* y) {
  __shared__ double sums[kSumThreads];
  const int64_t blk = blockIdx.x, r = blockIdx.y;
  int64_t first, last;
  runs_of_block(b, blk, &first, &last);
  double v = 0.0;
  for (int64_t run = first + threadIdx.x; run <= last; run += kSumThreads) v += partial[(run + blk) * b.k + r];
  sums[threadIdx.x] = v;
  __syncthreads();
  for (int width = kSumThreads / 2; width > 0; width /= 2) {
    if (static_cast<int>(threadIdx.x) < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) y[r * b.n_blocks + blk] = sums[0];
}

// ---- reconstruct ---------------------------------------------------------------------------

template <int BITS>
__global__ void reconstruct_kernel(Basis b, const float* x, const void* center, DType center_dtype, void* out,
                                   DType out_dtype, int64_t n_runs) {
  const int64_t run = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (run < n_runs) reconstruct_run<BITS>(b, x, center, center_dtype, out, out_dtype, run, WarpLanes{});
}

// ---- orthonormalize's passes ---------------------------------------------------------------

// p p^T over one span of columns for a 16 x 16 tile of the result, accumulated in float64.
__global__ void gram_kernel(const float* p, int64_t k, int64_t d, double* out, double* partial, bool deterministic) {
  __shared__ float rows_i[kGramTile][kGramCols + 1];
  __shared__ float rows_j[kGramTile][kGramCols + 1];
  const int ti = threadIdx.y, tj = threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kGramTile + ti;
  const int64_t j = static_cast<int64_t>(blockIdx.z) * kGramTile + tj;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kGramSpan;
  const int64_t stop = (start + kGramSpan < d) ? start + kGramSpan : d;
  double acc = 0.0;
  for (int64_t c0 = start; c0 < stop; c0 += kGramCols) {
    for (int e = ti * kGramTile + tj; e < kGramTile * kGramCols; e += kGramTile * kGramTile) {
      const int row = e / kGramCols, c = e % kGramCols;
      const int64_t ri = static_cast<int64_t>(blockIdx.y) * kGramTile + row;
      const int64_t rj = static_cast<int64_t>(blockIdx.z) * kGramTile + row;
      const bool in = c0 + c < stop;
      rows_i[row][c] = (in && ri < k) ? p[ri * d + c0 + c] : 0.f;
      rows_j[row][c] = (in && rj < k) ? p[rj * d + c0 + c] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kGramCols; ++c) acc += static_cast<double>(rows_i[ti][c]) * rows_j[tj][c];
    __syncthreads();
  }
  if (i >= k || j >= k) return;
  if (deterministic) partial[static_cast<int64_t>(blockIdx.x) * k * k + i * k + j] = acc;
  else atomicAdd(&out[i * k + j], acc);
}

__global__ void gram_sum_kernel(const double* partial, int64_t k, int64_t n_spans, double* out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= k * k) return;
  double v = 0.0;
  for (int64_t s = 0; s < n_spans; ++s) v += partial[s * k * k + e];
  out[e] = v;
}

__global__ void combine_rows_kernel(const double* t, const float* p, int64_t k, int64_t d, float* out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r = blockIdx.y;
  if (col >= d) return;
  double acc = 0.0;
  for (int64_t i = 0; i < k; ++i) acc += t[r * k + i] * static_cast<double>(p[i * d + col]);
  out[r * d + col] = static_cast<float>(acc);
}

template <template <int> class Launch, class... Args>
int dispatch_bits(int bits, Args&&... args) {
  switch (bits) {
    case 0: return Launch<0>::run(args...);
    case 1: return Launch<1>::run(args...);
    case 2: return Launch<2>::run(args...);
    case 4: return Launch<4>::run(args...);
    case 8: return Launch<8>::run(args...);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

template <int BITS>
struct LaunchProject {
  static int run(const Basis& b, const void* g, DType g_dtype, double* y, float* partial, bool deterministic,
                 cudaStream_t stream) {
    const int64_t n_runs = num_runs(b);
    if (n_runs == 0 || b.k == 0) return 0;  // nothing to sum, and a grid of zero blocks is a launch error
    const unsigned grid = static_cast<unsigned>((n_runs + kWarpsPerBlock - 1) / kWarpsPerBlock);
    project_kernel<BITS><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(b, g, g_dtype, y, partial, deterministic,
                                                                        n_runs);
    if (deterministic) {
      sum_pieces_kernel<<<dim3(static_cast<unsigned>(b.n_blocks), static_cast<unsigned>(b.k)), kSumThreads, 0,
                          stream>>>(b, partial, y);
    }
    return static_cast<int>(cudaGetLastError());
  }
};

template <int BITS>
struct LaunchReconstruct {
  static int run(const Basis& b, const float* x, const void* center, DType center_dtype, void* out,
                 DType out_dtype, cudaStream_t stream) {
    const int64_t n_runs = num_runs(b);
    if (n_runs == 0) return 0;  // no columns to write
    const unsigned grid = static_cast<unsigned>((n_runs + kWarpsPerBlock - 1) / kWarpsPerBlock);
    reconstruct_kernel<BITS><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(b, x, center, center_dtype, out, out_dtype,
                                                                          n_runs);
    return static_cast<int>(cudaGetLastError());
  }
};

}  // namespace

int64_t num_runs(const Basis& b) { return (b.num_cols + run_cols(b) - 1) / run_cols(b); }

int64_t project_partial_floats(const Basis& b) { return (num_runs(b) + b.n_blocks) * b.k; }

int project(const Basis& b, const void* g, DType g_dtype, double* y, float* partial, bool deterministic,
            void* stream) {
  return dispatch_bits<LaunchProject>(b.bits, b, g, g_dtype, y, partial, deterministic,
                                      static_cast<cudaStream_t>(stream));
}

int reconstruct(const Basis& b, const float* x, const void* center, DType center_dtype, void* out, DType out_dtype,
                void* stream) {
  return dispatch_bits<LaunchReconstruct>(b.bits, b, x, center, center_dtype, out, out_dtype,
                                          static_cast<cudaStream_t>(stream));
}

int64_t gram_spans(int64_t d) { return (d + kGramSpan - 1) / kGramSpan; }

int gram(const float* p, int64_t k, int64_t d, double* out, double* partial, bool deterministic, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (k == 0) return 0;  // an empty result; a grid of zero blocks is a launch error
  const unsigned tiles = static_cast<unsigned>((k + kGramTile - 1) / kGramTile);
  const int64_t spans = gram_spans(d);
  if (spans > 0) {  // no columns: the sums are the zeros out holds (or the sum pass writes)
    gram_kernel<<<dim3(static_cast<unsigned>(spans), tiles, tiles), dim3(kGramTile, kGramTile), 0, s>>>(
        p, k, d, out, partial, deterministic);
  }
  if (deterministic) {
    const unsigned blocks = static_cast<unsigned>((k * k + 255) / 256);
    gram_sum_kernel<<<blocks, 256, 0, s>>>(partial, k, spans, out);
  }
  return static_cast<int>(cudaGetLastError());
}

int combine_rows(const double* t, const float* p, int64_t r, int64_t k, int64_t d, float* out, void* stream) {
  if (r == 0 || d == 0) return 0;  // an empty result
  const dim3 grid(static_cast<unsigned>((d + 255) / 256), static_cast<unsigned>(r));
  combine_rows_kernel<<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(t, p, k, d, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace twa_cuda
