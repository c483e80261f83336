// OpenMP kernels behind the twa_kernels_cpu ops. Every loop over D is cut into tiles
// (one quantisation group for a packed basis): each thread takes a contiguous range of
// tiles, and all k rows of a tile (or of a run of tiles, see kRunCols) are visited while
// that stretch of g (or of the output) stays in L1, so the packed basis and g stream from
// memory exactly once.
#include "kernels.h"

#include <omp.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <vector>

namespace twa {
namespace {

// No page advice here: outputs are allocated in Python, which asks for huge pages before
// their first touch (twa_kernels/backends/cpu.py, twa_kernels/_memory.py).
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

// g as consecutive pieces (a model's per-tensor gradients, read where autograd left
// them): piece i holds columns starts[i] .. starts[i + 1]. A thread walks its tiles in
// order, so the piece holding a tile's first column is found by stepping forward.
struct Pieces {
  const void* const* ptrs;
  const int64_t* starts;  // n + 1 entries, 0 ... num_cols
  int64_t n;
  DType dtype;

  int64_t piece_of(int64_t col) const {
    return std::upper_bound(starts, starts + n + 1, col) - starts - 1;
  }

  // g[c0 : c0 + len] as float32: the memory itself when one float32 piece holds it all,
  // else converted or gathered into buf. `piece` is the hint kept by the caller.
  const float* tile(int64_t c0, int64_t len, int64_t& piece, float* buf) const {
    while (piece + 1 < n && starts[piece + 1] <= c0) ++piece;
    if (c0 + len <= starts[piece + 1]) return float_view(ptrs[piece], dtype, c0 - starts[piece], len, buf);
    int64_t c = c0, p = piece;
    while (c < c0 + len) {
      while (starts[p + 1] <= c) ++p;
      const int64_t m = std::min(starts[p + 1], c0 + len) - c;
      const float* src = float_view(ptrs[p], dtype, c - starts[p], m, buf + (c - c0));
      if (src != buf + (c - c0)) std::memcpy(buf + (c - c0), src, m * sizeof(float));
      c += m;
    }
    return buf;
  }
};

inline void store_floats(void* dst, DType dtype, int64_t offset, int64_t n, const float* src) {
  if (dtype == DType::f32) {
    float* d = static_cast<float*>(dst) + offset;
#if defined(__AVX__)
    // The output is written once and not read back here: streaming stores skip the read
    // a normal store does to own the cache line, a third of reconstruct's memory traffic.
    if (reinterpret_cast<uintptr_t>(d) % 32 == 0 && n % 8 == 0) {
      for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(d + i, _mm256_loadu_ps(src + i));
      return;
    }
#endif
    std::memcpy(d, src, n * sizeof(float));
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
    const int64_t m = t * b.k + r;
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

// ---- fast path: a whole group inside one block, 4 rows at a time -----------------------
// Rows are taken in fours so that each 8-lane chunk of g (or of the output) is loaded once
// per four rows and the four accumulations are independent chains, not one long FMA
// dependency. Chunks are 8 codes of one plane; a plane is `width` bytes, a multiple of 8.
constexpr int kRowBlock = 4;
constexpr int kLanes = 8;
// Each of the k rows is its own stream that advances one group (often one cache line) per
// tile, too little for the hardware prefetcher: fetch this many bytes ahead in every row.
constexpr int64_t kPrefetchBytes = 512;

inline void prefetch_rows(const uint8_t* const* src, int rows, int64_t bytes) {
  for (int r = 0; r < rows; ++r)
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(src[r] + kPrefetchBytes + off);
}

// GCC/Clang vector extensions: plain C++ that the compiler maps to the widest registers
// it has (AVX2 here, NEON on Arm), with the accumulators kept in registers.
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

// 8 codes of one plane as floats: zero-extend the bytes, shift the plane down, mask.
inline i32x8 widen8(const uint8_t* src) {
#if defined(__AVX2__)
  // GCC lowers the generic byte -> int32 conversion to scalar inserts; one vpmovzxbd instead.
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  i32x8 wide;
  std::memcpy(&wide, &w, sizeof wide);
  return wide;
#else
  u8x8 raw;
  std::memcpy(&raw, src, sizeof raw);
  return __builtin_convertvector(raw, i32x8);
#endif
}

// Plane S of 8 codes already widened to int32 lanes: shift it down and, except for the
// top plane (whose shift leaves nothing above it), mask.
template <int BITS, int S>
inline f32x8 plane8(i32x8 wide) {
  constexpr int kPerByte = 8 / BITS;
  if constexpr (BITS != 8) {
    if constexpr (S > 0) wide = wide >> (S * BITS);
    if constexpr (S + 1 < kPerByte) wide = wide & ((1 << BITS) - 1);
  }
  return __builtin_convertvector(wide, f32x8);
}

// acc[2r + (S & 1)] += plane S of `wide` * g[S * width + i], for every plane S: each 8
// bytes are widened once for all their planes, and even and odd planes feed two chains.
template <int BITS, int S = 0>
inline void dot_planes(i32x8 wide, const float* g, int64_t width, f32x8* acc) {
  if constexpr (S < 8 / BITS) {
    acc[S & 1] += plane8<BITS, S>(wide) * load8(g + S * width);
    dot_planes<BITS, S + 1>(wide, g, width, acc);
  }
}

// sums[r] = per-lane sums over the group of code[r, j] * g[j], for ROWS rows. Lanes are
// not reduced here: the caller scales and accumulates whole vectors across groups.
template <int BITS, int ROWS>
inline void group_dots(const uint8_t* const* src, int64_t width, const float* g, f32x8* sums) {
  f32x8 acc[ROWS][2] = {};
  const uint8_t* p[ROWS];
  for (int r = 0; r < ROWS; ++r) p[r] = src[r];
  for (int64_t i = 0; i < width; i += kLanes) {
    for (int r = 0; r < ROWS; ++r) dot_planes<BITS>(widen8(p[r] + i), g + i, width, acc[r]);
  }
  for (int r = 0; r < ROWS; ++r) sums[r] = acc[r][0] + acc[r][1];
}

template <int BITS, int ROWS, int S = 0>
inline void axpy_planes(const i32x8* wide, const float* a, f32x8* o) {
  if constexpr (S < 8 / BITS) {
    for (int r = 0; r < ROWS; ++r) o[S] += a[r] * plane8<BITS, S>(wide[r]);
    axpy_planes<BITS, ROWS, S + 1>(wide, a, o);
  }
}

// out[j] += sum_r a[r] * code[r, j] over the group, for ROWS rows: each 8-column chunk of
// every plane is loaded once, and each 8 bytes of a row are widened once.
template <int BITS, int ROWS>
inline void group_axpy(const uint8_t* const* src, int64_t width, const float* a, float* out) {
  constexpr int kPerByte = 8 / BITS;
  const uint8_t* p[ROWS];
  for (int r = 0; r < ROWS; ++r) p[r] = src[r];
  for (int64_t i = 0; i < width; i += kLanes) {
    f32x8 o[kPerByte];
    for (int s = 0; s < kPerByte; ++s) o[s] = load8(out + s * width + i);
    i32x8 wide[ROWS];
    for (int r = 0; r < ROWS; ++r) wide[r] = widen8(p[r] + i);
    axpy_planes<BITS, ROWS>(wide, a, o);
    for (int s = 0; s < kPerByte; ++s) store8(out + s * width + i, o[s]);
  }
}

// Group t of rows r0 .. r0 + 3 (fewer at the end): their code pointers, prefetched ahead.
inline int row_block(const PackedBasis& b, int64_t r0, int64_t t, int64_t gbytes, const uint8_t** src) {
  const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, b.k - r0));
  for (int r = 0; r < rows; ++r) src[r] = b.codes + (r0 + r) * b.row_bytes + t * gbytes;
  prefetch_rows(src, rows, gbytes);
  return rows;
}

inline bool fast_group(const PackedBasis& b, int64_t len, const std::vector<Segment>& segs) {
  return b.bits != 0 && len == b.group_size && segs.size() == 1 && (b.group_size / (8 / b.bits)) % kLanes == 0;
}

// Consecutive whole-group tiles of one block are taken in runs of up to kRunCols columns,
// visited four rows at a time across the whole run. Each row is then read a run (2 KiB
// at 4 bits, group 128) at a stretch instead of one group (64 bytes), so 4 memory streams
// are open at a time instead of k, and the hardware prefetcher follows them. On ResNet-18
// shapes at k = 16, 4 bits this made the step 20-30% faster than one group at a time,
// and steadier from one process to the next (bench/steady_step.py). The run's g or output
// (16 KiB) stays in L1 while the k rows pass over it.
constexpr int64_t kRunCols = 4096;

inline int64_t run_cap(const PackedBasis& b) { return b.bits ? std::max<int64_t>(1, kRunCols / b.group_size) : 1; }

// How many tiles from t on (at most `limit`, before t_end) are whole groups inside block
// `block`; tile t must be one.
inline int64_t run_length(const PackedBasis& b, int64_t t, int64_t t_end, int64_t block, int64_t limit) {
  return std::max<int64_t>(1, std::min({limit, t_end - t, b.block_offsets[block + 1] / b.group_size - t}));
}

// Sum of the 8 lanes, in float64.
inline double hsum(f32x8 v) {
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += v[l];
  return sum;
}

// Whole-group tiles accumulate into one 8-lane vector per row, scaled per group, and are
// reduced to float64 only when the block changes or every kFlushGroups groups: the
// horizontal sums and double updates would otherwise cost a fifth of the work per group.
constexpr int kFlushGroups = 32;

template <int BITS>
void project_impl(const PackedBasis& b, const Pieces& g, float* y, int num_threads) {
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
    std::vector<float> gbuf(run_cap(b) * width + 8), cbuf(width + 8), gsum;
    std::vector<Segment> segs;
    std::vector<f32x8> lanes(static_cast<size_t>(b.k));  // the fast path's pending sums, one per row
    std::vector<f32x8> gsums(static_cast<size_t>(run_cap(b)));  // per group of a run: lane sums of g
    int64_t lanes_block = -1, lanes_groups = 0;
    auto flush = [&]() {
      if (lanes_block < 0) return;
      for (int64_t r = 0; r < b.k; ++r) {
        acc[r * b.n_blocks + lanes_block] += hsum(lanes[r]);
        lanes[r] = f32x8{};
      }
      lanes_block = -1;
      lanes_groups = 0;
    };
    int64_t block = block_of(b.block_offsets, b.n_blocks, t_begin * width);
    int64_t piece = g.piece_of(t_begin * width);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * width, len = std::min(width, b.num_cols - c0);
      split_tile(b.block_offsets, b.n_blocks, c0, len, block, segs);
      if constexpr (BITS != 0) {
        if (fast_group(b, len, segs)) {
          if (segs[0].block != lanes_block || lanes_groups == kFlushGroups) flush();
          lanes_block = segs[0].block;
          const int64_t n = run_length(b, t, t_end, lanes_block, std::min(run_cap(b), kFlushGroups - lanes_groups));
          lanes_groups += n;
          const float* gr = g.tile(c0, n * width, piece, gbuf.data());
          // sum_j lo * g[j] = lo * sum_j g[j]: one lane-sum per g tile, shared by all rows
          f32x8* gs = gsums.data();
          for (int64_t i = 0; i < n; ++i) {
            gs[i] = f32x8{};
            for (int64_t j = 0; j < width; j += kLanes) gs[i] += load8(gr + i * width + j);
          }
          const int64_t gbytes = b.group_size * BITS / 8;
          for (int64_t r0 = 0; r0 < b.k; r0 += kRowBlock) {
            for (int64_t i = 0; i < n; ++i) {
              const uint8_t* src[kRowBlock];
              const int rows = row_block(b, r0, t + i, gbytes, src);
              const float* gt = gr + i * width;
              f32x8 dots[kRowBlock];
              if (rows == kRowBlock) {
                group_dots<BITS, kRowBlock>(src, gbytes, gt, dots);
              } else {
                for (int r = 0; r < rows; ++r) group_dots<BITS, 1>(src + r, gbytes, gt, dots + r);
              }
              const float* mins = b.mins + (t + i) * b.k + r0;
              const float* scales = b.scales + (t + i) * b.k + r0;
              for (int r = 0; r < rows; ++r) lanes[r0 + r] += mins[r] * gs[i] + scales[r] * dots[r];
            }
          }
          t += n - 1;
          continue;
        }
      }
      const float* gt = g.tile(c0, len, piece, gbuf.data());
      gsum.assign(segs.size(), 0.f);
      if (BITS != 0) {  // as above, one sum per segment
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
    flush();
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
    std::vector<float> obuf(run_cap(b) * width + 8), cbuf(width + 8), ctmp(run_cap(b) * width + 8), xb(b.k);
    std::vector<Segment> segs;
    int64_t block = block_of(b.block_offsets, b.n_blocks, t_begin * width), xb_block = -1;
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * width, len = std::min(width, b.num_cols - c0);
      float* o = obuf.data();
      split_tile(b.block_offsets, b.n_blocks, c0, len, block, segs);
      if constexpr (BITS != 0) {
        if (fast_group(b, len, segs)) {
          // one block's coefficients, gathered once per block: x is [k, n_blocks]
          if (segs[0].block != xb_block) {
            xb_block = segs[0].block;
            for (int64_t r = 0; r < b.k; ++r) xb[r] = x[r * b.n_blocks + xb_block];
          }
          const int64_t n = run_length(b, t, t_end, xb_block, run_cap(b));
          const float* ct = center ? float_view(center, center_dtype, c0, n * width, ctmp.data()) : nullptr;
          for (int64_t i = 0; i < n; ++i) {
            const float* mins = b.mins + (t + i) * b.k;
            float base = 0.f;  // sum_r lo[r] * x[r, b]: one constant for the whole group
            for (int64_t r = 0; r < b.k; ++r) base += mins[r] * xb[r];
            float* oi = o + i * width;
            if (ct) {  // o = center + base in one pass
              const float* ci = ct + i * width;
#pragma omp simd
              for (int64_t j = 0; j < width; ++j) oi[j] = ci[j] + base;
            } else {
              std::fill(oi, oi + width, base);
            }
          }
          const int64_t gbytes = b.group_size * BITS / 8;
          for (int64_t r0 = 0; r0 < b.k; r0 += kRowBlock) {
            for (int64_t i = 0; i < n; ++i) {
              const uint8_t* src[kRowBlock];
              const int rows = row_block(b, r0, t + i, gbytes, src);
              const float* scales = b.scales + (t + i) * b.k + r0;
              float a[kRowBlock];
              for (int r = 0; r < rows; ++r) a[r] = scales[r] * xb[r0 + r];
              if (rows == kRowBlock) {
                group_axpy<BITS, kRowBlock>(src, gbytes, a, o + i * width);
              } else {
                for (int r = 0; r < rows; ++r) group_axpy<BITS, 1>(src + r, gbytes, a + r, o + i * width);
              }
            }
          }
          store_floats(out, out_dtype, c0, n * width, o);
          t += n - 1;
          continue;
        }
      }
      // a tile cut by a block edge, or a short last group: row by row
      if (center) {
        const float* ct = float_view(center, center_dtype, c0, len, ctmp.data());
        std::memcpy(o, ct, len * sizeof(float));
      } else {
        std::fill(o, o + len, 0.f);
      }
      if (BITS != 0) {  // sum_r lo[r] * x[r, b] is one constant per segment
        for (const Segment& s : segs) {
          float base = 0.f;
          for (int64_t r = 0; r < b.k; ++r) base += b.mins[t * b.k + r] * x[r * b.n_blocks + s.block];
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
#if defined(__AVX__)
    _mm_sfence();  // make this thread's streaming stores visible before the region ends
#endif
  }
}

}  // namespace

int project_pieces(const PackedBasis& b, const void* const* pieces, const int64_t* starts, int64_t n_pieces,
                   DType g_dtype, float* y, int num_threads) {
  const Pieces g{pieces, starts, n_pieces, g_dtype};
  switch (b.bits) {
    case 0: project_impl<0>(b, g, y, num_threads); return 0;
    case 1: project_impl<1>(b, g, y, num_threads); return 0;
    case 2: project_impl<2>(b, g, y, num_threads); return 0;
    case 4: project_impl<4>(b, g, y, num_threads); return 0;
    case 8: project_impl<8>(b, g, y, num_threads); return 0;
    default: return -1;
  }
}

int project(const PackedBasis& b, const void* g, DType g_dtype, float* y, int num_threads) {
  const int64_t starts[2] = {0, b.num_cols};
  return project_pieces(b, &g, starts, 1, g_dtype, y, num_threads);
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
