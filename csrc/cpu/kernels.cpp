// OpenMP kernels behind the twa_kernels_cpu ops. Every loop over D is cut into tiles
// (one quantisation group for a packed basis): each thread takes a contiguous range of
// tiles, and inside a tile all k rows are visited while the tile of g (or of the output)
// stays in L1, so the packed basis and g stream from memory exactly once.
#include "kernels.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace twa {
namespace {

constexpr int64_t kDenseTile = 512;  // columns per tile for a dense float basis
constexpr int64_t kGramTile = 256;   // columns per tile for gram / combine_rows

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, as torch's float -> bfloat16 conversion does.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// A float32 view of src[offset : offset + n]: the memory itself for float32, else a
// converted copy in buf.
inline const float* float_view(const void* src, DType dtype, int64_t offset, int64_t n, float* buf) {
  if (dtype == DType::f32) return static_cast<const float*>(src) + offset;
  const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_float(s[i]);
  return buf;
}

inline void store_floats(void* dst, DType dtype, int64_t offset, int64_t n, const float* src) {
  if (dtype == DType::f32) {
    std::memcpy(static_cast<float*>(dst) + offset, src, n * sizeof(float));
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst) + offset;
  for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
}

// Unpack the planes of one group (len codes) into floats. dst holds len + 8 floats.
template <int BITS>
inline void decode_group(const uint8_t* src, int64_t len, float* dst) {
  constexpr int kPerByte = 8 / BITS;
  constexpr unsigned kMask = (1u << BITS) - 1u;
  const int64_t width = (len + kPerByte - 1) / kPerByte;
  for (int s = 0; s < kPerByte; ++s) {
    float* d = dst + s * width;
    const int shift = s * BITS;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) d[i] = static_cast<float>((src[i] >> shift) & kMask);
  }
}

// One tile of one row, as floats: p^ = lo + scale * values.
struct RowTile {
  const float* values;
  float lo;
  float scale;
};

template <int BITS>
inline RowTile row_tile(const PackedBasis& b, int64_t r, int64_t t, int64_t c0, int64_t len, float* buf) {
  if constexpr (BITS == 0) {
    return {reinterpret_cast<const float*>(b.codes) + r * b.num_cols + c0, 0.f, 1.f};
  } else {
    decode_group<BITS>(b.codes + r * b.row_bytes + t * (b.group_size * BITS / 8), len, buf);
    const int64_t m = r * b.n_groups + t;
    return {buf, b.mins[m], b.scales[m]};
  }
}

// The part of a tile that lies in one coefficient block: tile-local [begin, end).
struct Segment {
  int64_t begin, end, block;
};

// Cuts tile [c0, c0 + len) at block edges. `block` is the block holding c0 on entry and
// the block holding c0 + len on exit, so a thread walks its tiles without searching.
inline void split_tile(const int64_t* offsets, int64_t n_blocks, int64_t c0, int64_t len, int64_t& block,
                       std::vector<Segment>& segs) {
  segs.clear();
  int64_t c = c0;
  const int64_t stop = c0 + len;
  while (c < stop) {
    while (block + 1 < n_blocks && offsets[block + 1] <= c) ++block;
    const int64_t seg_end = std::min(offsets[block + 1], stop);
    segs.push_back({c - c0, seg_end - c0, block});
    c = seg_end;
  }
}

inline int64_t block_of(const int64_t* offsets, int64_t n_blocks, int64_t col) {
  return std::upper_bound(offsets, offsets + n_blocks + 1, col) - offsets - 1;
}

inline int64_t tile_width(const PackedBasis& b) { return b.bits ? b.group_size : kDenseTile; }

template <int BITS>
void project_impl(const PackedBasis& b, const void* g, DType g_dtype, float* y, int num_threads) {
  const int64_t width = tile_width(b);
  const int64_t n_tiles = (b.num_cols + width - 1) / width;
  const int64_t kb = b.k * b.n_blocks;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n_tiles)));
  std::vector<double> partial(static_cast<size_t>(nt) * kb, 0.0);

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t t_begin = n_tiles * tid / nth, t_end = n_tiles * (tid + 1) / nth;
    double* acc = partial.data() + static_cast<size_t>(tid) * kb;
    std::vector<float> gbuf(width + 8), cbuf(width + 8), gsum;
    std::vector<Segment> segs;
    int64_t block = block_of(b.block_offsets, b.n_blocks, t_begin * width);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * width, len = std::min(width, b.num_cols - c0);
      const float* gt = float_view(g, g_dtype, c0, len, gbuf.data());
      split_tile(b.block_offsets, b.n_blocks, c0, len, block, segs);
      gsum.assign(segs.size(), 0.f);
      if (BITS != 0) {  // sum_j lo * g[j] = lo * sum_j g[j]: one sum per segment, shared by all rows
        for (size_t s = 0; s < segs.size(); ++s) {
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = segs[s].begin; j < segs[s].end; ++j) sum += gt[j];
          gsum[s] = sum;
        }
      }
      for (int64_t r = 0; r < b.k; ++r) {
        const RowTile rt = row_tile<BITS>(b, r, t, c0, len, cbuf.data());
        double* acc_r = acc + r * b.n_blocks;
        for (size_t s = 0; s < segs.size(); ++s) {
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t j = segs[s].begin; j < segs[s].end; ++j) dot += rt.values[j] * gt[j];
          acc_r[segs[s].block] += static_cast<double>(rt.lo) * gsum[s] + static_cast<double>(rt.scale) * dot;
        }
      }
    }
  }
  // Partials are summed in thread order: results are deterministic for a thread count.
  for (int64_t i = 0; i < kb; ++i) {
    double sum = 0.0;
    for (int tid = 0; tid < nt; ++tid) sum += partial[static_cast<size_t>(tid) * kb + i];
    y[i] = static_cast<float>(sum);
  }
}

template <int BITS>
void reconstruct_impl(const PackedBasis& b, const float* x, const void* center, DType center_dtype, void* out,
                      DType out_dtype, int num_threads) {
  const int64_t width = tile_width(b);
  const int64_t n_tiles = (b.num_cols + width - 1) / width;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n_tiles)));

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t t_begin = n_tiles * tid / nth, t_end = n_tiles * (tid + 1) / nth;
    std::vector<float> obuf(width + 8), cbuf(width + 8), ctmp(width + 8);
    std::vector<Segment> segs;
    int64_t block = block_of(b.block_offsets, b.n_blocks, t_begin * width);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * width, len = std::min(width, b.num_cols - c0);
      float* o = obuf.data();
      if (center) {
        const float* ct = float_view(center, center_dtype, c0, len, ctmp.data());
        std::memcpy(o, ct, len * sizeof(float));
      } else {
        std::fill(o, o + len, 0.f);
      }
      split_tile(b.block_offsets, b.n_blocks, c0, len, block, segs);
      if (BITS != 0) {  // sum_r lo[r] * x[r, b] is one constant per segment
        for (const Segment& s : segs) {
          float base = 0.f;
          for (int64_t r = 0; r < b.k; ++r) base += b.mins[r * b.n_groups + t] * x[r * b.n_blocks + s.block];
#pragma omp simd
          for (int64_t j = s.begin; j < s.end; ++j) o[j] += base;
        }
      }
      for (int64_t r = 0; r < b.k; ++r) {
        const RowTile rt = row_tile<BITS>(b, r, t, c0, len, cbuf.data());
        for (const Segment& s : segs) {
          const float a = rt.scale * x[r * b.n_blocks + s.block];
#pragma omp simd
          for (int64_t j = s.begin; j < s.end; ++j) o[j] += a * rt.values[j];
        }
      }
      store_floats(out, out_dtype, c0, len, o);
    }
  }
}

}  // namespace

int project(const PackedBasis& b, const void* g, DType g_dtype, float* y, int num_threads) {
  switch (b.bits) {
    case 0: project_impl<0>(b, g, g_dtype, y, num_threads); return 0;
    case 1: project_impl<1>(b, g, g_dtype, y, num_threads); return 0;
    case 2: project_impl<2>(b, g, g_dtype, y, num_threads); return 0;
    case 4: project_impl<4>(b, g, g_dtype, y, num_threads); return 0;
    case 8: project_impl<8>(b, g, g_dtype, y, num_threads); return 0;
    default: return -1;
  }
}

int reconstruct(const PackedBasis& b, const float* x, const void* center, DType center_dtype, void* out,
                DType out_dtype, int num_threads) {
  switch (b.bits) {
    case 0: reconstruct_impl<0>(b, x, center, center_dtype, out, out_dtype, num_threads); return 0;
    case 1: reconstruct_impl<1>(b, x, center, center_dtype, out, out_dtype, num_threads); return 0;
    case 2: reconstruct_impl<2>(b, x, center, center_dtype, out, out_dtype, num_threads); return 0;
    case 4: reconstruct_impl<4>(b, x, center, center_dtype, out, out_dtype, num_threads); return 0;
    case 8: reconstruct_impl<8>(b, x, center, center_dtype, out, out_dtype, num_threads); return 0;
    default: return -1;
  }
}

void gram(const float* p, int64_t k, int64_t d, double* out, int num_threads) {
  const int64_t n_tiles = (d + kGramTile - 1) / kGramTile;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n_tiles)));
  const size_t kk = static_cast<size_t>(k * k);
  std::vector<double> partial(static_cast<size_t>(nt) * kk, 0.0);

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t t_begin = n_tiles * tid / nth, t_end = n_tiles * (tid + 1) / nth;
    double* acc = partial.data() + tid * kk;
    std::vector<double> buf(static_cast<size_t>(k) * kGramTile);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * kGramTile, len = std::min(kGramTile, d - c0);
      for (int64_t i = 0; i < k; ++i) {  // fp32 products are exact in fp64
        const float* src = p + i * d + c0;
        double* dst = buf.data() + i * kGramTile;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) dst[j] = src[j];
      }
      for (int64_t i = 0; i < k; ++i) {
        const double* pi = buf.data() + i * kGramTile;
        for (int64_t l = 0; l <= i; ++l) {
          const double* pl = buf.data() + l * kGramTile;
          double dot = 0.0;
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j < len; ++j) dot += pi[j] * pl[j];
          acc[i * k + l] += dot;
        }
      }
    }
  }
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t l = 0; l <= i; ++l) {
      double sum = 0.0;
      for (int tid = 0; tid < nt; ++tid) sum += partial[tid * kk + i * k + l];
      out[i * k + l] = sum;
      out[l * k + i] = sum;
    }
  }
}

void combine_rows(const double* t, int64_t r, const float* p, int64_t k, int64_t d, float* q, int num_threads) {
  const int64_t n_tiles = (d + kGramTile - 1) / kGramTile;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n_tiles)));

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t t_begin = n_tiles * tid / nth, t_end = n_tiles * (tid + 1) / nth;
    std::vector<double> buf(static_cast<size_t>(k) * kGramTile), acc(kGramTile);
    for (int64_t tt = t_begin; tt < t_end; ++tt) {
      const int64_t c0 = tt * kGramTile, len = std::min(kGramTile, d - c0);
      for (int64_t l = 0; l < k; ++l) {
        const float* src = p + l * d + c0;
        double* dst = buf.data() + l * kGramTile;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) dst[j] = src[j];
      }
      for (int64_t i = 0; i < r; ++i) {
        std::fill(acc.begin(), acc.begin() + len, 0.0);
        for (int64_t l = 0; l < k; ++l) {
          const double a = t[i * k + l];
          const double* pl = buf.data() + l * kGramTile;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) acc[j] += a * pl[j];
        }
        float* dst = q + i * d + c0;
        for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<float>(acc[j]);
      }
    }
  }
}

}  // namespace twa
