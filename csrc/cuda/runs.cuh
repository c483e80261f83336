// The run code of the packed-basis CUDA kernels, written once as __host__ __device__
// templates over a "lanes" policy (see kernels.cuh): kernels.cu instantiates it with the warp
// on the device, and emulate.cu, built only into the test library, with a loop over 32 lanes
// on the host. Both therefore run the very same index arithmetic.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels.cuh"

#define TWA_HD __host__ __device__

namespace twa_cuda::detail {

constexpr int kWarp = 32;

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
  // bfloat16 by round-to-nearest-even, as torch rounds; a NaN stays a quiet NaN with its sign
  // and payload's high bits, as the CPU and Triton kernels keep it.
  const uint16_t h = ((u & 0x7FFFFFFFu) > 0x7F800000u) ? static_cast<uint16_t>((u >> 16) | 0x40u)
                                                       : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
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
  // The lanes' values summed in their own type (float, or double for a packed project).
  template <class F>
  TWA_HD auto sum(F f) const -> decltype(f(0)) {
#ifdef __CUDA_ARCH__
    auto v = f(static_cast<int>(threadIdx.x % kWarp));
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
  TWA_HD void add(double* p, double v) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 600
    atomicAdd(p, v);
#elif defined(__CUDA_ARCH__)  // no float64 atomicAdd before sm_60: a compare-and-swap loop
    auto* word = reinterpret_cast<unsigned long long*>(p);
    unsigned long long seen = *word, expected;
    do {
      expected = seen;
      seen = atomicCAS(word, expected, __double_as_longlong(__longlong_as_double(expected) + v));
    } while (seen != expected);
#else
    *p += v;
#endif
  }
};

struct HostLanes {
  template <class F>
  TWA_HD auto sum(F f) const -> decltype(f(0)) {
    decltype(f(0)) v = 0;
    for (int lane = 0; lane < kWarp; ++lane) v += f(lane);
    return v;
  }
  template <class F>
  TWA_HD void each(F f) const {
    for (int lane = 0; lane < kWarp; ++lane) f(lane);
  }
  TWA_HD bool leader() const { return true; }
  TWA_HD void add(double* p, double v) const { *p += v; }
};

// ---- project -----------------------------------------------------------------------------

// Each code is dequantised before its product, rounded as the spec rounds it (the product,
// then the sum: dequantized()), so a lane sums the spec's own p^ times g. Summing code * g and
// g apart and scaling after, the two terms cancel where a group's minimum lies far from its
// other values (an outlier), which came to 200-2,000 times the tolerance over groups of
// 1,024-8,192 columns. A lane sums kFlushCodes products in float32 and then adds them to a
// float64 sum, and the lanes' sums are added in float64: a float32 chain rounds each add
// relative to its running sum (an outlier's term, or a 2^20-column group's total). With an
// outlier of -1000 the error grew with the chain, 0.45, 0.93 and 1.9 times the tolerance at
// 16, 32 and 64 codes (host emulation of this code, whose host build adds without fused
// multiply-adds: 1-8 bits, groups of 1,024-8,192 columns; Intel Xeon, 2026-12-07, commit
// 17acdea). What the float64 adds cost on a GPU, one per 16 codes, is unmeasured: where
// float64 runs at 1/64 of float32's rate they may take as long as the float32 work
// (bench/gpu_run.sh times project against a copy).
constexpr int kFlushCodes = 16;

// lo + scale * code as the spec's dequantize computes it: the product rounded, then the sum.
// A fused multiply-add (what the compiler makes of `lo + scale * code` on the device) rounds
// once, and in a group whose lo is an outlier the two differ by up to half an ulp of lo.
TWA_HD inline float dequantized(float scale, float code, float low) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(__fmul_rn(scale, code), low);
#else
  const float product = scale * code;
  return product + low;
#endif
}

// One lane's share of sum_{j in [s0, s1)} p^[r, j] * g[j]: bytes lane, lane + 32, ... of each
// group touching the segment.
template <int BITS>
TWA_HD double packed_dot(const Basis& b, const void* g, DType g_dtype, int64_t r, int64_t s0, int64_t s1,
                        int lane) {
  constexpr int kPerByte = 8 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  constexpr int kFlushBytes = kFlushCodes / kPerByte;
  const int64_t G = b.group_size, group_bytes = G / kPerByte;
  const uint8_t* row = b.codes + r * b.row_bytes;
  double part = 0.0;
  for (int64_t t = s0 / G; t * G < s1; ++t) {
    const int64_t first = t * G, length = (b.num_cols - first < G) ? b.num_cols - first : G;
    const int64_t width = (length + kPerByte - 1) / kPerByte;
    const float scale = b.scales[t * b.k + r], low = b.mins[t * b.k + r];
    float dot = 0.f;
    int steps = 0;
    for (int64_t i = lane; i < width; i += kWarp) {
      const uint32_t byte = row[t * group_bytes + i];
#pragma unroll
      for (int s = 0; s < kPerByte; ++s) {
        const int64_t col = first + s * width + i;
        if (s * width + i >= length || col < s0 || col >= s1) continue;
        dot += dequantized(scale, code_to_float((byte >> (s * BITS)) & kMask), low) * load_value(g, g_dtype, col);
      }
      if (++steps == kFlushBytes) {
        part += dot;
        dot = 0.f;
        steps = 0;
      }
    }
    part += dot;
  }
  return part;
}

TWA_HD inline float dense_dot(const Basis& b, const void* g, DType g_dtype, int64_t r, int64_t s0, int64_t s1,
                              int lane) {
  const float* row = reinterpret_cast<const float*>(b.codes) + r * b.num_cols;
  float part = 0.f;
  for (int64_t col = s0 + lane; col < s1; col += kWarp) part += row[col] * load_value(g, g_dtype, col);
  return part;
}

// Run `run` of project: per block segment and row, the lanes' sums go to y by float64
// atomics, or to the partial row (run + block), unique because along D each next segment
// advances the run, the block or both. y is float64 because a block may hold millions of
// runs: float32 atomics over 3.4M runs whose terms share a sign came to hundreds of times
// the spec's tolerance, each add rounding by half an ulp of a large running sum.
template <int BITS, class Lanes>
TWA_HD void project_run(const Basis& b, const void* g, DType g_dtype, double* y, float* partial, bool deterministic,
                        int64_t run, const Lanes& lanes) {
  const int64_t c0 = run * run_cols(b);
  const int64_t c1 = (c0 + run_cols(b) < b.num_cols) ? c0 + run_cols(b) : b.num_cols;
  for (int64_t blk = block_of(b.block_offsets, b.n_blocks, c0); blk < b.n_blocks && b.block_offsets[blk] < c1;
       ++blk) {
    const int64_t s0 = b.block_offsets[blk] > c0 ? b.block_offsets[blk] : c0;
    const int64_t s1 = b.block_offsets[blk + 1] < c1 ? b.block_offsets[blk + 1] : c1;
    for (int64_t r = 0; r < b.k; ++r) {
      const double total = lanes.sum([&](int lane) {
        if constexpr (BITS == 0) return dense_dot(b, g, g_dtype, r, s0, s1, lane);
        else return packed_dot<BITS>(b, g, g_dtype, r, s0, s1, lane);
      });
      if (!lanes.leader()) continue;
      if (deterministic) partial[(run + blk) * b.k + r] = static_cast<float>(total);
      else lanes.add(&y[r * b.n_blocks + blk], total);
    }
  }
}

// The runs holding block blk's segments: first and last (inclusive).
TWA_HD inline void runs_of_block(const Basis& b, int64_t blk, int64_t* first, int64_t* last) {
  // clamped to the runs there are: offsets edited on the device after their check must not
  // send a read of the scratch past its end
  const int64_t runs = (b.num_cols + run_cols(b) - 1) / run_cols(b);
  const auto clamp = [runs](int64_t run) { return run < 0 ? 0 : (run >= runs ? runs - 1 : run); };
  *first = clamp(run_of(b, b.block_offsets[blk]));
  *last = clamp(run_of(b, b.block_offsets[blk + 1] - 1));
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
      const float* codes = reinterpret_cast<const float*>(b.codes);
      int64_t blk = block_of(b.block_offsets, b.n_blocks, c0);
      for (int64_t col = c0 + lane; col < c1; col += kWarp) {
        while (blk + 1 < b.n_blocks && b.block_offsets[blk + 1] <= col) ++blk;  // bounded: offsets may be edited
        float acc = 0.f;  // the center comes last, as in the spec: the rows' terms round at their own size
        for (int64_t r = 0; r < b.k; ++r) acc += codes[r * b.num_cols + col] * x[r * b.n_blocks + blk];
        store_value(out, out_dtype, col, acc + (center ? load_value(center, center_dtype, col) : 0.f));
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
              while (blk[s] + 1 < b.n_blocks && b.block_offsets[blk[s] + 1] <= first + s * width + i) ++blk[s];
            }
          }
          float acc[kPerByte] = {};
          for (int64_t r = 0; r < b.k; ++r) {
            const uint32_t byte = b.codes[r * b.row_bytes + t * group_bytes + i];
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

}  // namespace twa_cuda::detail
