// CUDA kernels of the packed-basis ops; see kernels.cuh for the layout and the work split.
#include "kernels.cuh"

#include <cuda_runtime.h>

#include <cstring>

#define TWA_HD __host__ __device__

namespace twa_cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kSumThreads = 256;  // threads summing one (block, row) in deterministic project
constexpr int kGramTile = 16, kGramCols = 64;
constexpr int64_t kGramSpan = 16384;

TWA_HD inline float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

TWA_HD inline uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

TWA_HD inline float load_value(const void* p, DType dtype, int64_t i) {
  if (dtype == DType::f32) return static_cast<const float*>(p)[i];
  return bits_to_float(static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16);
}

TWA_HD inline void store_value(void* p, DType dtype, int64_t i, float v) {
  if (dtype == DType::f32) {
    static_cast<float*>(p)[i] = v;
    return;
  }
  uint32_t u = float_to_bits(v);
  // bfloat16 by round-to-nearest-even, as torch rounds; NaN stays a quiet NaN.
  const uint16_t h = (v != v) ? uint16_t{0x7FC0} : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  static_cast<uint16_t*>(p)[i] = h;
}

// A code c < 2^8 as a float without an int-to-float convert (a quarter-rate instruction on
// NVIDIA GPUs): OR-ed into the mantissa of 2^23 it gives 2^23 + c, and subtracting 2^23 is exact.
TWA_HD inline float code_to_float(uint32_t code) { return bits_to_float(code | 0x4B000000u) - 8388608.f; }

// The block holding column `col`: the largest b with block_offsets[b] <= col.
TWA_HD inline int64_t block_of(const int64_t* offsets, int64_t n_blocks, int64_t col) {
  int64_t lo = 0, hi = n_blocks;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= col) lo = mid; else hi = mid;
  }
  return lo;
}

TWA_HD inline int64_t run_cols(const Basis& b) { return b.bits ? kRunGroups * b.group_size : kDenseRunCols; }

TWA_HD inline int64_t run_of(const Basis& b, int64_t col) { return col / run_cols(b); }

// ---- lanes: a warp on the GPU, a loop over 32 lanes on the host --------------------------

// Both policies are __host__ __device__ so that the run templates compile for either side;
// WarpLanes is only ever executed on the device (its host side is never called).
struct WarpLanes {
  template <class F>
  TWA_HD float sum(F f) const {
#ifdef __CUDA_ARCH__
    float v = f(static_cast<int>(threadIdx.x % kWarp));
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
#else
    return f(0);
#endif
  }
  template <class F>
  TWA_HD void each(F f) const {
#ifdef __CUDA_ARCH__
    f(static_cast<int>(threadIdx.x % kWarp));
#endif
  }
  TWA_HD bool leader() const {
#ifdef __CUDA_ARCH__
    return threadIdx.x % kWarp == 0;
#else
    return true;
#endif
  }
  TWA_HD void add(float* p, float v) const {
#ifdef __CUDA_ARCH__
    atomicAdd(p, v);
#else
    *p += v;
#endif
  }
};

struct HostLanes {
  template <class F>
  TWA_HD float sum(F f) const {
    float v = 0.f;
    for (int lane = 0; lane < kWarp; ++lane) v += f(lane);
    return v;
  }
  template <class F>
  TWA_HD void each(F f) const {
    for (int lane = 0; lane < kWarp; ++lane) f(lane);
  }
  TWA_HD bool leader() const { return true; }
  TWA_HD void add(float* p, float v) const { *p += v; }
};

// ---- project -----------------------------------------------------------------------------

// One lane's share of sum_{j in [s0, s1)} p^[r, j] * g[j]: bytes lane, lane + 32, ... of each
// group touching the segment. scale * sum(code * g) + min * sum(g) per group.
template <int BITS>
TWA_HD float packed_dot(const Basis& b, const void* g, DType g_dtype, int64_t r, int64_t s0, int64_t s1,
                        int lane) {
  constexpr int kPerByte = 8 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const int64_t G = b.group_size, group_bytes = G / kPerByte;
  const uint8_t* row = static_cast<const uint8_t*>(b.codes) + r * b.row_bytes;
  float part = 0.f;
  for (int64_t t = s0 / G; t * G < s1; ++t) {
    const int64_t first = t * G, length = (b.num_cols - first < G) ? b.num_cols - first : G;
    const int64_t width = (length + kPerByte - 1) / kPerByte;
    float code_dot = 0.f, g_sum = 0.f;
    for (int64_t i = lane; i < width; i += kWarp) {
      const uint32_t byte = row[t * group_bytes + i];
#pragma unroll
      for (int s = 0; s < kPerByte; ++s) {
        const int64_t col = first + s * width + i;
        if (s * width + i >= length || col < s0 || col >= s1) continue;
        const float gv = load_value(g, g_dtype, col);
        code_dot += code_to_float((byte >> (s * BITS)) & kMask) * gv;
        g_sum += gv;
      }
    }
    part += b.scales[t * b.k + r] * code_dot + b.mins[t * b.k + r] * g_sum;
  }
  return part;
}

TWA_HD inline float dense_dot(const Basis& b, const void* g, DType g_dtype, int64_t r, int64_t s0, int64_t s1,
                              int lane) {
  const float* row = static_cast<const float*>(b.codes) + r * b.num_cols;
  float part = 0.f;
  for (int64_t col = s0 + lane; col < s1; col += kWarp) part += row[col] * load_value(g, g_dtype, col);
  return part;
}

// Run `run` of project: per block segment and row, the lanes' sums go to y by atomics, or to
// the partial row (run + block), unique because along D each next segment advances the run,
// the block or both.
template <int BITS, class Lanes>
TWA_HD void project_run(const Basis& b, const void* g, DType g_dtype, float* y, float* partial, bool deterministic,
                        int64_t run, const Lanes& lanes) {
  const int64_t c0 = run * run_cols(b);
  const int64_t c1 = (c0 + run_cols(b) < b.num_cols) ? c0 + run_cols(b) : b.num_cols;
  for (int64_t blk = block_of(b.block_offsets, b.n_blocks, c0); blk < b.n_blocks && b.block_offsets[blk] < c1;
       ++blk) {
    const int64_t s0 = b.block_offsets[blk] > c0 ? b.block_offsets[blk] : c0;
    const int64_t s1 = b.block_offsets[blk + 1] < c1 ? b.block_offsets[blk + 1] : c1;
    for (int64_t r = 0; r < b.k; ++r) {
      const float total = lanes.sum([&](int lane) {
        if constexpr (BITS == 0) return dense_dot(b, g, g_dtype, r, s0, s1, lane);
        else return packed_dot<BITS>(b, g, g_dtype, r, s0, s1, lane);
      });
      if (!lanes.leader()) continue;
      if (deterministic) partial[(run + blk) * b.k + r] = total;
      else lanes.add(&y[r * b.n_blocks + blk], total);
    }
  }
}

// The runs holding block blk's segments: first and last (inclusive).
TWA_HD inline void runs_of_block(const Basis& b, int64_t blk, int64_t* first, int64_t* last) {
  *first = run_of(b, b.block_offsets[blk]);
  *last = run_of(b, b.block_offsets[blk + 1] - 1);
}

template <int BITS>
__global__ void project_kernel(Basis b, const void* g, DType g_dtype, float* y, float* partial, bool deterministic,
                               int64_t n_runs) {
  const int64_t run = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (run < n_runs) project_run<BITS>(b, g, g_dtype, y, partial, deterministic, run, WarpLanes{});
}

// Deterministic second pass: one thread block per (block, row); a fixed split over threads
// and a fixed tree make the sum the same on every run.
__global__ void sum_pieces_kernel(Basis b, const float* partial, float* y) {
  __shared__ float sums[kSumThreads];
  const int64_t blk = blockIdx.x, r = blockIdx.y;
  int64_t first, last;
  runs_of_block(b, blk, &first, &last);
  float v = 0.f;
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

// Run `run` of reconstruct: lane i of the warp owns byte i (and i + 32, ...) of each group, so
// it writes the 8 / bits columns stored in that byte, summing over all k rows.
template <int BITS, class Lanes>
TWA_HD void reconstruct_run(const Basis& b, const float* x, const void* center, DType center_dtype, void* out,
                            DType out_dtype, int64_t run, const Lanes& lanes) {
  const int64_t c0 = run * run_cols(b);
  const int64_t c1 = (c0 + run_cols(b) < b.num_cols) ? c0 + run_cols(b) : b.num_cols;
  if constexpr (BITS == 0) {
    lanes.each([&](int lane) {
      const float* codes = static_cast<const float*>(b.codes);
      int64_t blk = block_of(b.block_offsets, b.n_blocks, c0);
      for (int64_t col = c0 + lane; col < c1; col += kWarp) {
        while (b.block_offsets[blk + 1] <= col) ++blk;
        float acc = center ? load_value(center, center_dtype, col) : 0.f;
        for (int64_t r = 0; r < b.k; ++r) acc += codes[r * b.num_cols + col] * x[r * b.n_blocks + blk];
        store_value(out, out_dtype, col, acc);
      }
    });
  } else {
    constexpr int kPerByte = 8 / BITS;
    constexpr uint32_t kMask = (1u << BITS) - 1u;
    const int64_t G = b.group_size, group_bytes = G / kPerByte;
    for (int64_t t = c0 / G; t * G < c1; ++t) {
      const int64_t first = t * G, length = (b.num_cols - first < G) ? b.num_cols - first : G;
      const int64_t width = (length + kPerByte - 1) / kPerByte;
      const int64_t blk0 = block_of(b.block_offsets, b.n_blocks, first);
      const bool one_block = b.block_offsets[blk0 + 1] >= first + length;  // the usual case
      lanes.each([&](int lane) {
        for (int64_t i = lane; i < width; i += kWarp) {
          int64_t blk[kPerByte];
#pragma unroll
          for (int s = 0; s < kPerByte; ++s) {
            blk[s] = blk0;
            if (!one_block && s * width + i < length) {
              while (b.block_offsets[blk[s] + 1] <= first + s * width + i) ++blk[s];
            }
          }
          float acc[kPerByte] = {};
          for (int64_t r = 0; r < b.k; ++r) {
            const uint32_t byte = static_cast<const uint8_t*>(b.codes)[r * b.row_bytes + t * group_bytes + i];
            const float scale = b.scales[t * b.k + r], low = b.mins[t * b.k + r];
#pragma unroll
            for (int s = 0; s < kPerByte; ++s) {
              const float coeff = x[r * b.n_blocks + blk[s]];
              acc[s] += (low + scale * code_to_float((byte >> (s * BITS)) & kMask)) * coeff;
            }
          }
#pragma unroll
          for (int s = 0; s < kPerByte; ++s) {
            if (s * width + i >= length) continue;
            const int64_t col = first + s * width + i;
            store_value(out, out_dtype, col, acc[s] + (center ? load_value(center, center_dtype, col) : 0.f));
          }
        }
      });
    }
  }
}

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
  static int run(const Basis& b, const void* g, DType g_dtype, float* y, float* partial, bool deterministic,
                 cudaStream_t stream) {
    const int64_t n_runs = num_runs(b);
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
    const unsigned grid = static_cast<unsigned>((n_runs + kWarpsPerBlock - 1) / kWarpsPerBlock);
    reconstruct_kernel<BITS><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(b, x, center, center_dtype, out, out_dtype,
                                                                          n_runs);
    return static_cast<int>(cudaGetLastError());
  }
};

Basis make_basis(const void* codes, const float* scales, const float* mins, const int64_t* block_offsets, int64_t k,
                 int64_t num_cols, int64_t row_bytes, int64_t n_blocks, int64_t group_size, int bits) {
  Basis b{codes, scales, mins, block_offsets, k, num_cols, row_bytes, 0, n_blocks, group_size, bits};
  b.n_groups = bits ? (num_cols + group_size - 1) / group_size : 0;
  return b;
}

template <int BITS>
void emulate_project_bits(const Basis& b, const void* g, DType g_dtype, float* y, float* partial,
                          bool deterministic) {
  for (int64_t run = 0; run < num_runs(b); ++run)
    project_run<BITS>(b, g, g_dtype, y, partial, deterministic, run, HostLanes{});
  if (!deterministic) return;
  for (int64_t blk = 0; blk < b.n_blocks; ++blk) {
    int64_t first, last;
    runs_of_block(b, blk, &first, &last);
    for (int64_t r = 0; r < b.k; ++r) {
      float v = 0.f;
      for (int64_t run = first; run <= last; ++run) v += partial[(run + blk) * b.k + r];
      y[r * b.n_blocks + blk] = v;
    }
  }
}

template <int BITS>
void emulate_reconstruct_bits(const Basis& b, const float* x, const void* center, DType center_dtype, void* out,
                              DType out_dtype) {
  for (int64_t run = 0; run < num_runs(b); ++run)
    reconstruct_run<BITS>(b, x, center, center_dtype, out, out_dtype, run, HostLanes{});
}

}  // namespace

int64_t run_columns(const Basis& b) { return run_cols(b); }

int64_t num_runs(const Basis& b) { return (b.num_cols + run_cols(b) - 1) / run_cols(b); }

int64_t project_partial_floats(const Basis& b) { return (num_runs(b) + b.n_blocks) * b.k; }

int project(const Basis& b, const void* g, DType g_dtype, float* y, float* partial, bool deterministic,
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
  const unsigned tiles = static_cast<unsigned>((k + kGramTile - 1) / kGramTile);
  const int64_t spans = gram_spans(d);
  gram_kernel<<<dim3(static_cast<unsigned>(spans), tiles, tiles), dim3(kGramTile, kGramTile), 0, s>>>(
      p, k, d, out, partial, deterministic);
  if (deterministic) {
    const unsigned blocks = static_cast<unsigned>((k * k + 255) / 256);
    gram_sum_kernel<<<blocks, 256, 0, s>>>(partial, k, spans, out);
  }
  return static_cast<int>(cudaGetLastError());
}

int combine_rows(const double* t, const float* p, int64_t r, int64_t k, int64_t d, float* out, void* stream) {
  const dim3 grid(static_cast<unsigned>((d + 255) / 256), static_cast<unsigned>(r));
  combine_rows_kernel<<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(t, p, k, d, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace twa_cuda

extern "C" void twa_cuda_emulate_project(const void* codes, const float* scales, const float* mins,
                                         const int64_t* block_offsets, int64_t k, int64_t num_cols,
                                         int64_t row_bytes, int64_t n_blocks, int64_t group_size, int bits,
                                         const void* g, int g_dtype, float* y, float* partial, int deterministic) {
  using namespace twa_cuda;
  const Basis b = make_basis(codes, scales, mins, block_offsets, k, num_cols, row_bytes, n_blocks, group_size, bits);
  const auto dt = static_cast<DType>(g_dtype);
  switch (bits) {
    case 0: emulate_project_bits<0>(b, g, dt, y, partial, deterministic != 0); break;
    case 1: emulate_project_bits<1>(b, g, dt, y, partial, deterministic != 0); break;
    case 2: emulate_project_bits<2>(b, g, dt, y, partial, deterministic != 0); break;
    case 4: emulate_project_bits<4>(b, g, dt, y, partial, deterministic != 0); break;
    case 8: emulate_project_bits<8>(b, g, dt, y, partial, deterministic != 0); break;
    default: break;
  }
}

extern "C" void twa_cuda_emulate_reconstruct(const void* codes, const float* scales, const float* mins,
                                             const int64_t* block_offsets, int64_t k, int64_t num_cols,
                                             int64_t row_bytes, int64_t n_blocks, int64_t group_size, int bits,
                                             const float* x, const void* center, int center_dtype, void* out,
                                             int out_dtype) {
  using namespace twa_cuda;
  const Basis b = make_basis(codes, scales, mins, block_offsets, k, num_cols, row_bytes, n_blocks, group_size, bits);
  const auto ct = static_cast<DType>(center_dtype), ot = static_cast<DType>(out_dtype);
  switch (bits) {
    case 0: emulate_reconstruct_bits<0>(b, x, center, ct, out, ot); break;
    case 1: emulate_reconstruct_bits<1>(b, x, center, ct, out, ot); break;
    case 2: emulate_reconstruct_bits<2>(b, x, center, ct, out, ot); break;
    case 4: emulate_reconstruct_bits<4>(b, x, center, ct, out, ot); break;
    case 8: emulate_reconstruct_bits<8>(b, x, center, ct, out, ot); break;
    default: break;
  }
}
