// OpenMP kernels behind the twa_kernels_cpu ops. Every loop over D is cut into tiles
// (one quantisation group for a packed basis): each thread takes a contiguous range of
// tiles, and all k rows of a run of tiles are visited while that stretch of g (in L2 for
// project, see project_run_cap) or of the output (in L1 for reconstruct, see kRunCols)
// stays in cache, so the packed basis and g stream from memory exactly once.
#include "kernels.h"

#include <omp.h>

#if defined(__x86_64__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
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

  // Where column c is (in the piece holding it, found from the hint `piece` on) and how many
  // of the bytes of c .. c + len that piece holds: the part of a later tile worth fetching.
  const void* span(int64_t c, int64_t len, int64_t piece, int64_t& bytes) const {
    while (piece + 1 < n && starts[piece + 1] <= c) ++piece;
    const int64_t elem = dtype == DType::f32 ? 4 : 2;
    bytes = (std::min(starts[piece + 1], c + len) - c) * elem;
    return static_cast<const char*>(ptrs[piece]) + (c - starts[piece]) * elem;
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

// ---- fast path: a whole group inside one block, a block of rows at a time --------------
// Rows are taken in blocks (kProjectRows in project, kAxpyRows in reconstruct, kRowBlock in
// project_int8) so that each chunk of g (or of the output) is loaded once per block and the
// rows' accumulations are independent chains, not one long FMA dependency. Chunks are
// kLanes codes of one plane; a plane is `width` bytes, a multiple of kLanes (fast_group).
// Each of the k rows is its own stream that advances one group (often one cache line) per
// tile, too little for the hardware prefetcher: fetch this many bytes ahead in every row.
constexpr int64_t kPrefetchBytes = 512;

inline void prefetch_rows(const uint8_t* const* src, int rows, int64_t bytes) {
  for (int r = 0; r < rows; ++r)
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(src[r] + kPrefetchBytes + off);
}

// A span of memory fetched a few cache lines at a time, spread over the calls of a loop, so
// that the next run's stream (its g, or its center) arrives while this run computes instead
// of in a burst of misses when the run starts.
struct LineFetcher {
  const char* next = nullptr;
  int64_t lines = 0, per_call = 0;

  void start(const void* from, int64_t bytes, int64_t calls) {
    next = static_cast<const char*>(from);
    lines = from ? (bytes + 63) / 64 : 0;
    calls = std::max<int64_t>(calls, 1);
    per_call = (lines + calls - 1) / calls;
  }
  void step() {
    for (int64_t j = 0; j < per_call && lines > 0; ++j, --lines, next += 64) __builtin_prefetch(next);
  }
};

// Group t of rows r0 .. r0 + block - 1 (fewer at the end): their code pointers, prefetched ahead.
inline int row_block(const PackedBasis& b, int64_t r0, int64_t t, int64_t gbytes, int block, const uint8_t** src) {
  const int rows = static_cast<int>(std::min<int64_t>(block, b.k - r0));
  for (int r = 0; r < rows; ++r) src[r] = b.codes + (r0 + r) * b.row_bytes + t * gbytes;
  prefetch_rows(src, rows, gbytes);
  return rows;
}

inline bool fast_group(const PackedBasis& b, int64_t len, const std::vector<Segment>& segs, int lanes) {
  return b.bits != 0 && len == b.group_size && segs.size() == 1 && (b.group_size / (8 / b.bits)) % lanes == 0;
}

// Consecutive whole-group tiles of one block are taken in runs of up to kRunCols columns,
// visited a row block at a time across the whole run. Each row is then read a run (2 KiB
// at 4 bits, group 128) at a stretch instead of one group (64 bytes), so a block's streams
// are open at a time instead of k, and the hardware prefetcher follows them. On ResNet-18
// shapes at k = 16, 4 bits (blocks of 4 rows) this made the step faster than one group at a
// time, and steadier from one process to the next (bench/steady_step.py; AMD EPYC, 2 cores;
// 2026-11-23, commit 9ee015c). The
// run's g or output (16 KiB) stays in L1 while the k rows pass over it.
constexpr int64_t kRunCols = 4096;

// The library's default group width (quant.quantize's group_size): project's run loop and
// reconstruct's group loop get a copy with it fixed at compile time (kernels_impl.h).
constexpr int64_t kDefaultGroupSize = 128;

inline int64_t run_cap(const PackedBasis& b) { return b.bits ? std::max<int64_t>(1, kRunCols / b.group_size) : 1; }

// The float project reads its run's g once per row block, not once per row, so its runs can
// be longer than reconstruct's: 32768 columns, whose g (128 KiB) stays in L2 while the row
// blocks pass over it, and each row is read 16 KiB at a stretch (4 bits). Against runs
// of 4096 columns this made project 5-11% faster at 4 bits, 7% at 2 and 5-18% at 8 on
// ResNet-18 shapes at k = 16 (AMD EPYC, 2 threads, medians of interleaved calls, 2026-12-04, commit
// 7337681; 5% at 4 bits on its AVX2 path); 16384 columns measured the same, 65536 slower.
constexpr int64_t kProjectRunCols = 32768;

inline int64_t project_run_cap(const PackedBasis& b) {
  return b.bits ? std::max<int64_t>(1, kProjectRunCols / b.group_size) : 1;
}

// project_int8 reads each row of a run as one stream, so longer runs pay: 64 KiB of codes per
// row, at most 131072 columns (the run's q, 128 KiB of int8, stays in L2 while the row
// blocks pass over it). Inside a row it fetches kInt8FetchAhead bytes ahead: a hardware
// prefetcher starts over at every 4 KiB page, and the kernel's arithmetic between loads
// leaves too few misses in flight to hide the restart. Against runs of 8 KiB that fetched
// the next row block instead, this made it 5-10% faster on ResNet-18 shapes at k = 16
// (AMD EPYC, 2 threads, medians of interleaved calls; 2026-12-04, commit 1445c4e).
constexpr int64_t kInt8RunBytes = 65536, kInt8RunCols = 131072, kInt8FetchAhead = 2048;

// project_int8 rounds a whole run of g before its dots, one stream read on the 4 KiB pages
// autograd allocates: it fetches kInt8GFetchAhead bytes ahead of the group it rounds, so that
// the misses of the next page are in flight before a hardware prefetcher would start on it.
// 1 KiB ahead made the kernel 5-14% faster at 2 bits, 4-8% at 4 and 1-9% at 8 on the Intel
// Xeon of docs/benchmarks.md (k = 16, D = 11.7M, 2 threads, bench/native/access_pattern.cpp
// built with each distance in turn, 3 interleaved runs; 2026-12-07, commit 0499ea4); 2 KiB measured
// about the same, and 4 and 8 KiB slower than none.
constexpr int64_t kInt8GFetchAhead = 1024;

// Fetch the lines of g's run (`run_bytes` long) from kInt8GFetchAhead bytes past `offset`,
// one group's worth (`group_bytes`), stopping at the run's end.
inline void prefetch_g_ahead(const float* run, int64_t offset, int64_t group_bytes, int64_t run_bytes) {
  const int64_t from = offset + kInt8GFetchAhead, to = std::min(from + group_bytes, run_bytes);
  for (int64_t o = from; o < to; o += 64) __builtin_prefetch(reinterpret_cast<const char*>(run) + o);
}

// A path whose dots read q as float32 too (dots_read_floats) keeps a quarter of the columns,
// so that its q, four bytes a column, still fits in L2 beside the codes.
inline int64_t int8_run_cap(const PackedBasis& b, bool q_as_floats) {
  const int64_t cols = q_as_floats ? kInt8RunCols / 4 : kInt8RunCols;
  return std::max<int64_t>(1, std::min(cols, kInt8RunBytes * 8 / b.bits) / b.group_size);
}

// How many tiles from t on (at most `limit`, before t_end) are whole groups inside block
// `block`; tile t must be one.
inline int64_t run_length(const PackedBasis& b, int64_t t, int64_t t_end, int64_t block, int64_t limit) {
  return std::max<int64_t>(1, std::min({limit, t_end - t, b.block_offsets[block + 1] / b.group_size - t}));
}

// project's whole groups accumulate into one lane vector per row, scaled per group, and are
// reduced to float64 every kFlushGroups groups and at the end of a run: the horizontal
// sums and double updates would otherwise cost a fifth of the work per group.
constexpr int kFlushGroups = 32;

// The most columns a float32 sum of project runs over before it goes into float64. Within a
// group the terms lo * sum(g) and scale * sum(code * g) cancel where the group's minimum lies
// far from most of its values (an outlier), so the result's rounding is relative to those
// terms, not to sum |p^ g|; float32 sums over 4,096 columns left 1.1e-6 of the terms on the
// AVX2 path, over 512 columns at most 1.4e-7 (tests/test_ops_isa.py).
constexpr int64_t kLaneColumns = 512;

// sum_j f(j) over [begin, end), in float32 pieces of kLaneColumns added in float64.
template <class Term>
inline double chunked_sum(int64_t begin, int64_t end, Term term) {
  double total = 0.0;
  for (int64_t c = begin; c < end; c += kLaneColumns) {
    const int64_t stop = std::min(end, c + kLaneColumns);
    float part = 0.f;
#pragma omp simd reduction(+ : part)
    for (int64_t j = c; j < stop; ++j) part += term(j);
    total += part;
  }
  return total;
}

// A tile cut by a block edge, or a short last group, row by row: acc[r, block] += the
// tile's terms. gt is g over the tile as float32; gsum is scratch, one sum per segment.
template <int BITS>
inline void project_tile_rows(const PackedBasis& b, int64_t t, int64_t c0, int64_t len,
                              const std::vector<Segment>& segs, const float* gt, float* cbuf,
                              std::vector<double>& gsum, double* acc) {
  gsum.assign(segs.size(), 0.0);
  if (BITS != 0) {  // sum_j lo * g[j] = lo * sum_j g[j]: one sum per segment, shared by all rows
    for (size_t s = 0; s < segs.size(); ++s)
      gsum[s] = chunked_sum(segs[s].begin, segs[s].end, [gt](int64_t j) { return gt[j]; });
  }
  for (int64_t r = 0; r < b.k; ++r) {
    const RowTile rt = row_tile<BITS>(b, r, t, c0, len, cbuf);
    double* acc_r = acc + r * b.n_blocks;
    const float* values = rt.values;
    for (size_t s = 0; s < segs.size(); ++s) {
      const double dot = chunked_sum(segs[s].begin, segs[s].end, [values, gt](int64_t j) { return values[j] * gt[j]; });
      acc_r[segs[s].block] += static_cast<double>(rt.lo) * gsum[s] + static_cast<double>(rt.scale) * dot;
    }
  }
}

// project_int8's row-by-row path (a group cut by a block edge, a short last group, or one
// too wide for int32 sums): acc[r, block] += sg * (scale * sum_j code[j] * q[j] + lo *
// sum_j q[j]) per segment, the fast path's formula. Each product is an integer of at most
// 255 * 127, so both sums are exact in int64 at any group width; summing the rounded values
// q[j] * sg in float32 instead lost the spec's tolerance on groups of 2^16 columns and up.
template <int BITS>
inline void project_tile_rows_int8(const PackedBasis& b, int64_t t, int64_t c0, int64_t len,
                                   const std::vector<Segment>& segs, const int8_t* q, float sg, float* cbuf,
                                   std::vector<int64_t>& qsums, double* acc) {
  qsums.assign(segs.size(), 0);
  for (size_t s = 0; s < segs.size(); ++s) {
    int64_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = segs[s].begin; j < segs[s].end; ++j) sum += q[j];
    qsums[s] = sum;
  }
  for (int64_t r = 0; r < b.k; ++r) {
    const RowTile rt = row_tile<BITS>(b, r, t, c0, len, cbuf);
    const float* codes = rt.values;  // the codes themselves, as floats
    for (size_t s = 0; s < segs.size(); ++s) {
      int64_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = segs[s].begin; j < segs[s].end; ++j) dot += static_cast<int32_t>(codes[j]) * q[j];
      acc[r * b.n_blocks + segs[s].block] += static_cast<double>(sg) * (static_cast<double>(rt.scale) * dot +
                                                                        static_cast<double>(rt.lo) * qsums[s]);
    }
  }
}

// y = the threads' partial sums, added in thread order: deterministic for a thread count.
inline void sum_partials(const std::vector<double>& partial, int nt, int64_t kb, float* y) {
  for (int64_t i = 0; i < kb; ++i) {
    double sum = 0.0;
    for (int tid = 0; tid < nt; ++tid) sum += partial[static_cast<size_t>(tid) * kb + i];
    y[i] = static_cast<float>(sum);
  }
}

// One group of g rounded to int8 with its own scale (quant.round_groups_int8 is the spec):
// scale = max|g| / 127 and q[j] = round_half_even(g[j] * (127 / max|g|)), so that
// g^[j] = q[j] * scale. A group whose largest magnitude is below 127 / FLT_MAX (3.7e-37)
// rounds to zero (127 / max|g| would overflow); a group holding a NaN or an infinity gets a
// NaN scale, so the NaN reaches every row's result rather than vanishing. Elementwise and
// max operations only: the same q and scale whatever the vector width it is compiled for.
inline void round_group_int8(const float* g, int64_t len, int8_t* q, float& scale, int32_t& qsum) {
  // max |g| as the largest magnitude bit pattern: for non-negative floats the integer order
  // is the float order, and NaN and infinity are the patterns from 0x7f800000 up. One
  // integer max finds both, where a float sum probing for NaN would end every group in a
  // chain of scalar adds (the compiler keeps a float sum's order).
  uint32_t top = 0;
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < len; ++j) {
    uint32_t bits;
    std::memcpy(&bits, &g[j], sizeof bits);
    top = std::max(top, bits & 0x7fffffffu);
  }
  float amax;
  std::memcpy(&amax, &top, sizeof amax);
  // 127 / max|g| overflows below 127 / FLT_MAX (3.7e-37; zero and subnormals included): such a
  // group rounds to zero, where an infinite factor would give undefined int8 conversions
  const float inv = 127.f / amax;
  if (top >= 0x7f800000u || !(inv <= std::numeric_limits<float>::max())) {
    std::memset(q, 0, static_cast<size_t>(len));
    scale = top >= 0x7f800000u ? std::numeric_limits<float>::quiet_NaN() : 0.f;
    qsum = 0;
    return;
  }
  int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(g[j] * inv));
    q[j] = static_cast<int8_t>(v);
    sum += v;
  }
  scale = amax / 127.f;
  qsum = sum;
}

// Where group_axpy reads a group's running output and where it writes it: from `in` plus
// `add` in every column (nullptr: from `add` alone) into `out`, plus `center` at the store
// (nullptr: none), with streaming stores when `stream` (out is then the op's own output,
// aligned to a whole vector). Reconstruct's first pass over a run starts from the group's
// constant term, and its last pass adds the center and writes the weights themselves, so
// the run's output buffer is not filled first and copied out after. The center comes last,
// as in the spec, so that the rows' terms round at their own size rather than the weight's:
// started from the center, each row's add rounded at |w| (k = 16, |center| near 100: 366
// times the spec's tolerance; AMD EPYC, 2026-12-06, commit d42f4e7). Read just before its
// element is written, the center may be `out` itself.
struct AxpyIO {
  const float* in;
  float add;
  float* out;
  bool stream;
  const float* center;
};

// ---- 8 lanes: AVX2, or whatever the compiler targets ------------------------------------
namespace vec8 {

#define TWA_ISA_FN

// GCC/Clang vector extensions: plain C++ that the compiler maps to the widest registers
// it has (AVX2 here, NEON on Arm), with the accumulators kept in registers.
constexpr int kLanes = 8;
constexpr int kRowBlock = 4;
// project's rows per pass over a run's g (kernels_impl.h): AVX2's 16 registers hold 4 rows'
// two chains each.
constexpr int kProjectRows = 4;
// reconstruct's rows per pass over a run's output (see kernels_impl.h): 8 made reconstruct
// 10-12% faster than 4 on this path (AMD EPYC, TWA_KERNELS_CPU_ISA=avx2, 2 threads, k = 16,
// D = 11.7M; 2026-12-04, commit 9f4251c); 16 rows' codes and coefficients would not fit AVX2's 16 vector registers.
template <int BITS>
constexpr int kAxpyRows = 8;
typedef float fvec __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));

inline fvec load_vec(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store_vec(float* p, fvec v) { std::memcpy(p, &v, sizeof v); }

// Sum of the lanes, in float64.
inline double hsum(fvec v) {
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += v[l];
  return sum;
}

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
inline fvec plane8(i32x8 wide) {
  constexpr int kPerByte = 8 / BITS;
  if constexpr (BITS != 8) {
    if constexpr (S > 0) wide = wide >> (S * BITS);
    if constexpr (S + 1 < kPerByte) wide = wide & ((1 << BITS) - 1);
  }
  return __builtin_convertvector(wide, fvec);
}

// acc[S & 1] += plane S of `wide` * g[S * width + i], for every plane S: each 8 bytes are
// widened once for all their planes, and even and odd planes feed two chains.
template <int BITS, int S = 0>
inline void dot_planes(i32x8 wide, const float* g, int64_t width, fvec* acc) {
  if constexpr (S < 8 / BITS) {
    acc[S & 1] += plane8<BITS, S>(wide) * load_vec(g + S * width);
    dot_planes<BITS, S + 1>(wide, g, width, acc);
  }
}

// sums[r] = per-lane sums over `bytes` bytes of each plane of code[r, j] * g[j], for ROWS
// rows; planes lie `stride` bytes (and g `stride` floats) apart, the plane width of the
// group, of which a wide group's dots take one piece at a time. Lanes are not reduced
// here: the caller scales and accumulates whole vectors across groups.
template <int BITS, int ROWS>
inline void group_dots(const uint8_t* const* src, int64_t bytes, const float* g, fvec* sums, int64_t stride) {
  fvec acc[ROWS][2] = {};
  const uint8_t* p[ROWS];
  for (int r = 0; r < ROWS; ++r) p[r] = src[r];
  for (int64_t i = 0; i < bytes; i += kLanes) {
    for (int r = 0; r < ROWS; ++r) dot_planes<BITS>(widen8(p[r] + i), g + i, stride, acc[r]);
  }
  for (int r = 0; r < ROWS; ++r) sums[r] = acc[r][0] + acc[r][1];
}

template <int BITS, int ROWS, int S = 0>
inline void axpy_planes(const i32x8* wide, const float* a, fvec* o) {
  if constexpr (S < 8 / BITS) {
    for (int r = 0; r < ROWS; ++r) o[S] += a[r] * plane8<BITS, S>(wide[r]);
    axpy_planes<BITS, ROWS, S + 1>(wide, a, o);
  }
}

inline fvec axpy_load(const AxpyIO& io, int64_t off) {
  const fvec add = fvec{} + io.add;
  return io.in ? load_vec(io.in + off) + add : add;
}

inline void axpy_store(const AxpyIO& io, int64_t off, fvec v) {
  if (io.center) v += load_vec(io.center + off);
#if defined(__AVX__)
  if (io.stream) {
    __m256 m;
    std::memcpy(&m, &v, sizeof m);
    return _mm256_stream_ps(io.out + off, m);
  }
#endif
  store_vec(io.out + off, v);
}

// out[j] = in[j] + add + sum_r a[r] * code[r, j] (+ center[j]) over the group, for ROWS rows:
// each 8-column chunk of every plane is loaded once, and each 8 bytes of a row are widened once.
template <int BITS, int ROWS>
inline void group_axpy(const uint8_t* const* src, int64_t width, const float* a, const AxpyIO& io) {
  constexpr int kPerByte = 8 / BITS;
  const uint8_t* p[ROWS];
  for (int r = 0; r < ROWS; ++r) p[r] = src[r];
  for (int64_t i = 0; i < width; i += kLanes) {
    fvec o[kPerByte];
    for (int s = 0; s < kPerByte; ++s) o[s] = axpy_load(io, s * width + i);
    i32x8 wide[ROWS];
    for (int r = 0; r < ROWS; ++r) wide[r] = widen8(p[r] + i);
    axpy_planes<BITS, ROWS>(wide, a, o);
    for (int s = 0; s < kPerByte; ++s) axpy_store(io, s * width + i, o[s]);
  }
}

// project_int8's integer sums without integer dot instructions: the float kernels above on
// q as floats (dots_read_floats asks kernels_int8.h for them). While a group's largest
// possible sum, columns * (2^bits - 1) * 127, is below 2^24, every product and partial sum
// is an integer a float holds exactly, so the sums equal the integer ones bit for bit;
// larger groups, and planes that are not whole 8-byte chunks, take a scalar integer loop.

#if defined(__AVX2__)
// With AVX2, planes of whole 16- or 32-byte chunks at 4 bits or fewer take integer dots
// instead: vpmaddubsw multiplies each code byte (unsigned) by its q byte (signed) and adds
// neighbouring pairs into int16, the planes of a byte are added in int16, and vpmaddwd by
// ones widens the sums to int32. No int16 sum saturates: a pair is at most 2 * 15 * 127,
// and the 8 / BITS planes of a byte at most 7,620 (4 bits). Exact, like the float sums.
// Ymm takes 32 bytes of a plane at a time, Xmm 16 (a 1-bit plane of a 128-column group).
struct Ymm {
  using V = __m256i;
  static constexpr int kBytes = 32;
  static V load(const void* p) { return _mm256_loadu_si256(static_cast<const V*>(p)); }
  static V bytes_of(int v) { return _mm256_set1_epi8(static_cast<char>(v)); }
  static V words_of(int v) { return _mm256_set1_epi16(static_cast<short>(v)); }
  static V zero() { return _mm256_setzero_si256(); }
  static V masked(V v, V mask) { return _mm256_and_si256(v, mask); }
  static V shifted(V v, int by) { return _mm256_srli_epi16(v, by); }
  static V pair_dots(V codes, V q) { return _mm256_maddubs_epi16(codes, q); }
  static V add16(V a, V b) { return _mm256_add_epi16(a, b); }
  static V widened(V sums, V ones) { return _mm256_madd_epi16(sums, ones); }
  static V add32(V a, V b) { return _mm256_add_epi32(a, b); }
  static __m128i halves(V v) { return _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)); }
};
struct Xmm {
  using V = __m128i;
  static constexpr int kBytes = 16;
  static V load(const void* p) { return _mm_loadu_si128(static_cast<const V*>(p)); }
  static V bytes_of(int v) { return _mm_set1_epi8(static_cast<char>(v)); }
  static V words_of(int v) { return _mm_set1_epi16(static_cast<short>(v)); }
  static V zero() { return _mm_setzero_si128(); }
  static V masked(V v, V mask) { return _mm_and_si128(v, mask); }
  static V shifted(V v, int by) { return _mm_srli_epi16(v, by); }
  static V pair_dots(V codes, V q) { return _mm_maddubs_epi16(codes, q); }
  static V add16(V a, V b) { return _mm_add_epi16(a, b); }
  static V widened(V sums, V ones) { return _mm_madd_epi16(sums, ones); }
  static V add32(V a, V b) { return _mm_add_epi32(a, b); }
  static __m128i halves(V v) { return v; }
};

template <int BITS, int ROWS, class W>
inline void dots_maddubs(const uint8_t* const* src, int64_t plane, const int8_t* q, int32_t* dots) {
  using V = typename W::V;
  constexpr int kPerByte = 8 / BITS;
  const V mask = W::bytes_of((1 << BITS) - 1), ones = W::words_of(1);
  V acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = W::zero();
  for (int64_t i = 0; i < plane; i += W::kBytes) {
    V qv[kPerByte];
    for (int s = 0; s < kPerByte; ++s) qv[s] = W::load(q + s * plane + i);
    for (int r = 0; r < ROWS; ++r) {
      const V bytes = W::load(src[r] + i);
      V sum = W::pair_dots(W::masked(bytes, mask), qv[0]);
      for (int s = 1; s < kPerByte; ++s)  // a 16-bit shift: what crosses into a byte is masked off
        sum = W::add16(sum, W::pair_dots(W::masked(W::shifted(bytes, s * BITS), mask), qv[s]));
      acc[r] = W::add32(acc[r], W::widened(sum, ones));
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    const __m128i x = W::halves(acc[r]);
    const __m128i y = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4e));
    dots[r] = _mm_cvtsi128_si32(_mm_add_epi32(y, _mm_shuffle_epi32(y, 0xb1)));
  }
}
#endif

// Whether the dots of a group of `plane` bytes per plane read q as floats.
template <int BITS>
inline bool dots_read_floats([[maybe_unused]] int64_t plane) {
#if defined(__AVX2__)
  if (BITS <= 4 && plane % 16 == 0) return false;  // dots_maddubs
#endif
  return true;
}

template <int BITS, int ROWS>
inline void group_dots_int8(const uint8_t* const* src, int64_t plane, const int8_t* q, const float* qf,
                            int32_t* dots) {
#if defined(__AVX2__)
  if constexpr (BITS <= 4) {
    if (plane % 32 == 0) return dots_maddubs<BITS, ROWS, Ymm>(src, plane, q, dots);
    if (!dots_read_floats<BITS>(plane)) return dots_maddubs<BITS, ROWS, Xmm>(src, plane, q, dots);
  }
#endif
  const int64_t largest = plane * (8 / BITS) * ((1 << BITS) - 1) * 127;
  if (plane % kLanes == 0 && largest < (int64_t{1} << 24)) {
    fvec sums[ROWS];
    group_dots<BITS, ROWS>(src, plane, qf, sums, plane);
    for (int r = 0; r < ROWS; ++r) dots[r] = static_cast<int32_t>(hsum(sums[r]));
    return;
  }
  constexpr int kPerByte = 8 / BITS;
  constexpr unsigned kMask = (1u << BITS) - 1u;
  for (int r = 0; r < ROWS; ++r) {
    int32_t sum = 0;
    for (int s = 0; s < kPerByte; ++s)
      for (int64_t i = 0; i < plane; ++i) sum += static_cast<int32_t>((src[r][i] >> (s * BITS)) & kMask) * q[s * plane + i];
    dots[r] = sum;
  }
}

// One group per dot call: 8-float vectors gain nothing from reading several narrow groups.
inline int int8_groups_per_dot(int64_t) { return 1; }
constexpr bool kInt8GroupedDots = false;

// A run of n groups of g rounded, q group after group (groups_per_dot is always 1 here).
inline void round_run_int8(const float* g, int64_t n, int64_t width, int64_t, int, int8_t* q, int8_t*, float* scale,
                           int32_t* qsum) {
  const int64_t group_bytes = width * static_cast<int64_t>(sizeof(float));
  for (int64_t i = 0; i < n; ++i) {
    prefetch_g_ahead(g, i * group_bytes, group_bytes, n * group_bytes);
    round_group_int8(g + i * width, width, &q[i * width], scale[i], qsum[i]);
  }
}
template <int BITS>  // declared for kernels_int8.h's discarded branch; never defined, never called
void grouped_dots_int8(const uint8_t* const*, int, int64_t, const int8_t*, int32_t*, int64_t);

#include "kernels_impl.h"
#include "kernels_int8.h"

#undef TWA_ISA_FN
}  // namespace vec8

// ---- 16 lanes: AVX-512, chosen at run time ----------------------------------------------
// Compiled whatever the compiler's default target (an AVX2-only -march included), through
// target attributes, and called only when the CPU reports AVX-512 (cpu_has_avx512).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TWA_HAVE_AVX512 1
namespace vec16 {

#define TWA_ISA_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

constexpr int kLanes = 16;
// project's rows per pass over a run's g (kernels_impl.h), one chain of FMAs each. Against
// 4 rows with two chains each, 8 made project 0-5% faster at 2 bits, 3-6% at 4 and 2-8% at
// 8 (AMD EPYC, 2 threads, k = 16, D = 11.7M, interleaved calls; 2026-12-04, commit 4e7cd57):
// each g vector loaded feeds twice the rows.
constexpr int kProjectRows = 8;
// reconstruct's rows per pass over a run's output (see kernels_impl.h). Against 4, 16 rows
// made it 35% faster at 1 bit, 20% at 2 bits and 12% at 4 (AMD EPYC, 2 threads, k = 16,
// D = 11.7M, medians of interleaved calls; 2026-12-04, commit 6ce2c5e); 8-bit codes take 8, since 16 rows of them
// need more than the 32 registers.
template <int BITS>
constexpr int kAxpyRows = BITS == 8 ? 8 : 16;
typedef float fvec __attribute__((vector_size(64)));

TWA_ISA_FN inline fvec load_vec(const float* p) { return _mm512_loadu_ps(p); }

// The 16 lanes summed in float64 as a tree (8 + 8, then halves): a chain of 16 dependent
// adds, once a group in project, took a tenth of its time.
TWA_ISA_FN inline double hsum(fvec v) {
  const __m512d wide = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)),
                                     _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
  const __m256d four = _mm256_add_pd(_mm512_castpd512_pd256(wide), _mm512_extractf64x4_pd(wide, 1));
  const __m128d two = _mm_add_pd(_mm256_castpd256_pd128(four), _mm256_extractf128_pd(four, 1));
  return _mm_cvtsd_f64(_mm_add_sd(two, _mm_unpackhi_pd(two, two)));
}

// 16 code bytes, one per int32 lane.
TWA_ISA_FN inline __m512i widen16(const uint8_t* src) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}

TWA_ISA_FN inline __m512 axpy_load(const AxpyIO& io, int64_t off) {
  const __m512 add = _mm512_set1_ps(io.add);
  return io.in ? _mm512_add_ps(_mm512_loadu_ps(io.in + off), add) : add;
}

TWA_ISA_FN inline void axpy_store(const AxpyIO& io, int64_t off, __m512 v) {
  if (io.center) v = _mm512_add_ps(v, _mm512_loadu_ps(io.center + off));
  if (io.stream) return _mm512_stream_ps(io.out + off, v);
  _mm512_storeu_ps(io.out + off, v);
}

// The float value of code number SUB inside a 4-bit index i, for BITS-bit codes.
template <int BITS, int SUB>
constexpr float table_entry(int i) {
  return static_cast<float>((i >> (SUB * BITS)) & ((1 << BITS) - 1));
}

template <int BITS, int SUB>
struct CodeTable {
  static constexpr float kValues[16] = {
      table_entry<BITS, SUB>(0),  table_entry<BITS, SUB>(1),  table_entry<BITS, SUB>(2),  table_entry<BITS, SUB>(3),
      table_entry<BITS, SUB>(4),  table_entry<BITS, SUB>(5),  table_entry<BITS, SUB>(6),  table_entry<BITS, SUB>(7),
      table_entry<BITS, SUB>(8),  table_entry<BITS, SUB>(9),  table_entry<BITS, SUB>(10), table_entry<BITS, SUB>(11),
      table_entry<BITS, SUB>(12), table_entry<BITS, SUB>(13), table_entry<BITS, SUB>(14), table_entry<BITS, SUB>(15)};
};

template <int BITS, int SUB>
TWA_ISA_FN inline __m512 code_table() {
  return _mm512_loadu_ps(CodeTable<BITS, SUB>::kValues);
}

// Plane S of 16 code bytes (one per int32 lane) as floats. vpermps reads only the low 4
// bits of each lane as its index, so a 16-entry table of code values masks and converts in
// one instruction where shift, mask and convert took three: a 4-bit nibble holds one
// 4-bit code, two 2-bit codes or four 1-bit codes, each with its own table.
template <int BITS, int S>
TWA_ISA_FN inline __m512 plane16(__m512i wide) {
  if constexpr (BITS == 8) {
    return _mm512_cvtepi32_ps(wide);
  } else {
    constexpr int kPerNibble = 4 / BITS;
    constexpr int kShift = (S / kPerNibble) * 4;
    const __m512i idx = kShift ? _mm512_srli_epi32(wide, kShift) : wide;
    return _mm512_permutexvar_ps(idx, code_table<BITS, S % kPerNibble>());
  }
}

template <int BITS, int CHAINS, int S = 0>
TWA_ISA_FN inline void dot_planes(__m512i wide, const __m512* gv, __m512* acc) {
  if constexpr (S < 8 / BITS) {
    acc[S % CHAINS] = _mm512_fmadd_ps(plane16<BITS, S>(wide), gv[S], acc[S % CHAINS]);
    dot_planes<BITS, CHAINS, S + 1>(wide, gv, acc);
  }
}

// As vec8::group_dots, 16 codes of a plane at a time. Fewer than 8 rows keep two chains per
// row (8-bit codes have one plane, so two chunks are taken per step for them); 8 rows are
// 8 chains already, enough to cover the FMA's latency. Against two chains per row, one made
// the 8-row blocks 1-3% faster at 4 bits and 7-13% at 8, the same at 2 (AMD EPYC, 2 threads,
// k = 16, D = 11.7M, interleaved calls; 2026-12-04, commit 4e7cd57).
template <int BITS, int ROWS>
TWA_ISA_FN inline void group_dots(const uint8_t* const* src, int64_t bytes, const float* g, fvec* sums,
                                  int64_t stride) {
  constexpr int kPerByte = 8 / BITS;
  constexpr int kChains = ROWS >= 8 ? 1 : 2;
  __m512 acc[ROWS][kChains];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < kChains; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t i = 0;
  if constexpr (kPerByte == 1 && kChains == 2) {
    for (; i + 2 * kLanes <= bytes; i += 2 * kLanes) {
      const __m512 g0 = _mm512_loadu_ps(g + i), g1 = _mm512_loadu_ps(g + i + kLanes);
      for (int r = 0; r < ROWS; ++r) {
        acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(widen16(src[r] + i)), g0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(widen16(src[r] + i + kLanes)), g1, acc[r][1]);
      }
    }
  }
  for (; i < bytes; i += kLanes) {
    __m512 gv[kPerByte];
    for (int s = 0; s < kPerByte; ++s) gv[s] = _mm512_loadu_ps(g + s * stride + i);
    for (int r = 0; r < ROWS; ++r) dot_planes<BITS, kChains>(widen16(src[r] + i), gv, acc[r]);
  }
  for (int r = 0; r < ROWS; ++r) sums[r] = kChains == 2 ? _mm512_add_ps(acc[r][0], acc[r][kChains - 1]) : acc[r][0];
}

template <int BITS, int ROWS, int S = 0>
TWA_ISA_FN inline void axpy_planes(const __m512i* wide, const __m512* a, __m512* o) {
  if constexpr (S < 8 / BITS) {
    for (int r = 0; r < ROWS; ++r) o[S] = _mm512_fmadd_ps(plane16<BITS, S>(wide[r]), a[r], o[S]);
    axpy_planes<BITS, ROWS, S + 1>(wide, a, o);
  }
}

// group_axpy of 2-bit codes, rows in pairs: one lookup adds both rows' terms. A pair's two
// codes of a column make a 4-bit index c1 + 4 * c2 into a 16-entry table of
// a1 * c1 + a2 * c2, built once per group; a byte of each row holds four columns' codes,
// and two bitwise selects put the pair's indices for columns 0 and 2 of each byte in one
// byte and those for columns 1 and 3 in another (low and high nibble). A lookup and an add
// per 16 codes and pair replace two lookups and two FMAs.
template <int ROWS>
TWA_ISA_FN inline void group_axpy_2bit_pairs(const uint8_t* const* src, int64_t width, const float* a,
                                             const AxpyIO& io) {
  static constexpr float kFirst[16] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
  static constexpr float kSecond[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
  constexpr int kPairs = ROWS / 2;
  __m512 table[kPairs];
  for (int p = 0; p < kPairs; ++p)
    table[p] = _mm512_fmadd_ps(_mm512_set1_ps(a[2 * p + 1]), _mm512_loadu_ps(kSecond),
                               _mm512_mul_ps(_mm512_set1_ps(a[2 * p]), _mm512_loadu_ps(kFirst)));
  const __m128i first_bits = _mm_set1_epi8(0x33);  // bits 0-1 and 4-5: the first row's codes
  for (int64_t i = 0; i < width; i += kLanes) {
    __m512 o[4];
    for (int s = 0; s < 4; ++s) o[s] = axpy_load(io, s * width + i);
    for (int p = 0; p < kPairs; ++p) {
      const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[2 * p] + i));
      const __m128i b2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[2 * p + 1] + i));
      // 0xCA: first ? second : third, bit by bit
      const __m512i even = _mm512_cvtepu8_epi32(_mm_ternarylogic_epi32(first_bits, b1, _mm_slli_epi16(b2, 2), 0xCA));
      const __m512i odd = _mm512_cvtepu8_epi32(_mm_ternarylogic_epi32(first_bits, _mm_srli_epi16(b1, 2), b2, 0xCA));
      o[0] = _mm512_add_ps(o[0], _mm512_permutexvar_ps(even, table[p]));
      o[1] = _mm512_add_ps(o[1], _mm512_permutexvar_ps(odd, table[p]));
      o[2] = _mm512_add_ps(o[2], _mm512_permutexvar_ps(_mm512_srli_epi32(even, 4), table[p]));
      o[3] = _mm512_add_ps(o[3], _mm512_permutexvar_ps(_mm512_srli_epi32(odd, 4), table[p]));
    }
    for (int s = 0; s < 4; ++s) axpy_store(io, s * width + i, o[s]);
  }
}

// group_axpy of 1-bit codes, rows in fours, the same way: a column's four codes make the
// index c1 + 2 c2 + 4 c3 + 8 c4 into a table of a1 c1 + ... + a4 c4. A byte of each row
// holds eight columns; shifts and three bitwise selects gather, for columns m and m + 4
// of each byte (m = 0 .. 3), the four rows' bits into one byte's low and high nibble.
template <int ROWS>
TWA_ISA_FN inline void group_axpy_1bit_quads(const uint8_t* const* src, int64_t width, const float* a,
                                             const AxpyIO& io) {
  constexpr int kQuads = ROWS / 4;
  static constexpr float kBit[4][16] = {
      {0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1},
      {0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1},
      {0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1},
      {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1}};
  __m512 table[kQuads];
  for (int q = 0; q < kQuads; ++q) {
    table[q] = _mm512_mul_ps(_mm512_set1_ps(a[4 * q]), _mm512_loadu_ps(kBit[0]));
    for (int r = 1; r < 4; ++r)
      table[q] = _mm512_fmadd_ps(_mm512_set1_ps(a[4 * q + r]), _mm512_loadu_ps(kBit[r]), table[q]);
  }
  const __m128i row0 = _mm_set1_epi8(0x11), rows01 = _mm_set1_epi8(0x33), rows012 = _mm_set1_epi8(0x77);
  for (int64_t i = 0; i < width; i += kLanes) {
    __m512 o[8];
    for (int s = 0; s < 8; ++s) o[s] = axpy_load(io, s * width + i);
    for (int q = 0; q < kQuads; ++q) {
      __m128i b[4];
      for (int r = 0; r < 4; ++r) b[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[4 * q + r] + i));
      // bit r of the index comes from row r's bit m, moved to bit r (and m + 4 to r + 4):
      // a shift by m - r; bits a 16-bit shift carries across bytes fall outside the masks
      const auto moved = [&](int r, int m) {
        const int by = m - r;
        return by > 0 ? _mm_srli_epi16(b[r], by) : by < 0 ? _mm_slli_epi16(b[r], -by) : b[r];
      };
      for (int m = 0; m < 4; ++m) {
        // 0xCA: first ? second : third, bit by bit
        __m128i z = _mm_ternarylogic_epi32(row0, moved(0, m), moved(1, m), 0xCA);
        z = _mm_ternarylogic_epi32(rows01, z, moved(2, m), 0xCA);
        z = _mm_ternarylogic_epi32(rows012, z, moved(3, m), 0xCA);
        const __m512i idx = _mm512_cvtepu8_epi32(z);
        o[m] = _mm512_add_ps(o[m], _mm512_permutexvar_ps(idx, table[q]));
        o[m + 4] = _mm512_add_ps(o[m + 4], _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table[q]));
      }
    }
    for (int s = 0; s < 8; ++s) axpy_store(io, s * width + i, o[s]);
  }
}

template <int BITS, int ROWS>
TWA_ISA_FN inline void group_axpy(const uint8_t* const* src, int64_t width, const float* a, const AxpyIO& io) {
  if constexpr (BITS == 2 && ROWS % 2 == 0) return group_axpy_2bit_pairs<ROWS>(src, width, a, io);
  if constexpr (BITS == 1 && ROWS % 4 == 0) return group_axpy_1bit_quads<ROWS>(src, width, a, io);
  constexpr int kPerByte = 8 / BITS;
  __m512 av[ROWS];
  for (int r = 0; r < ROWS; ++r) av[r] = _mm512_set1_ps(a[r]);
  for (int64_t i = 0; i < width; i += kLanes) {
    __m512 o[kPerByte];
    for (int s = 0; s < kPerByte; ++s) o[s] = axpy_load(io, s * width + i);
    __m512i wide[ROWS];
    for (int r = 0; r < ROWS; ++r) wide[r] = widen16(src[r] + i);
    axpy_planes<BITS, ROWS>(wide, av, o);
    for (int s = 0; s < kPerByte; ++s) axpy_store(io, s * width + i, o[s]);
  }
}

#include "kernels_impl.h"

#undef TWA_ISA_FN
}  // namespace vec16
#endif

// ---- AVX-512 VNNI: project_int8's integer dots, chosen at run time -------------------------
#if defined(TWA_HAVE_AVX512)
namespace vnni {

#define TWA_ISA_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))

constexpr int kRowBlock = 4;
template <int BITS>
inline bool dots_read_floats(int64_t) { return false; }  // vpdpbusd reads q as bytes

// vpdpbusd multiplies 4 unsigned code bytes by 4 signed q bytes and adds the 4 products to
// an int32 lane: a vector of a plane's codes per instruction. Planes are read W bytes at a
// time, W = 64, 32 or 16 (zmm, ymm, xmm), the widest that divides the plane: a 128-column
// group has 64-byte planes at 4 bits but 32-byte planes at 2 bits and 16-byte ones at 1
// bit, and a half-empty zmm would cost as much as a full one. Any other plane width goes 64
// bytes at a time with masked loads, whose missing bytes read as zero codes and add nothing.
template <int W>
struct Bytes;  // the vector of W bytes and its operations

template <>
struct Bytes<64> {
  using V = __m512i;
  TWA_ISA_FN static V load(const void* p, __mmask64) { return _mm512_loadu_si512(p); }
  TWA_ISA_FN static V zero() { return _mm512_setzero_si512(); }
  TWA_ISA_FN static V fill(uint8_t b) { return _mm512_set1_epi8(static_cast<char>(b)); }
  TWA_ISA_FN static V shift(V v, int n) { return _mm512_srli_epi16(v, n); }
  TWA_ISA_FN static V mask(V v, V m) { return _mm512_and_si512(v, m); }
  TWA_ISA_FN static V dot(V acc, V codes, V q) { return _mm512_dpbusd_epi32(acc, codes, q); }
  TWA_ISA_FN static __m256i halve(V v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  }
  TWA_ISA_FN static __m512i wide(V v) { return v; }
};

struct MaskedBytes : Bytes<64> {  // planes of any width: a masked load reads zeros past the plane
  TWA_ISA_FN static V load(const void* p, __mmask64 m) { return _mm512_maskz_loadu_epi8(m, p); }
};

template <>
struct Bytes<32> {
  using V = __m256i;
  TWA_ISA_FN static V load(const void* p, __mmask64) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  TWA_ISA_FN static V zero() { return _mm256_setzero_si256(); }
  TWA_ISA_FN static V fill(uint8_t b) { return _mm256_set1_epi8(static_cast<char>(b)); }
  TWA_ISA_FN static V shift(V v, int n) { return _mm256_srli_epi16(v, n); }
  TWA_ISA_FN static V mask(V v, V m) { return _mm256_and_si256(v, m); }
  TWA_ISA_FN static V dot(V acc, V codes, V q) { return _mm256_dpbusd_epi32(acc, codes, q); }
  TWA_ISA_FN static __m256i halve(V v) { return v; }
  TWA_ISA_FN static __m512i wide(V v) { return _mm512_zextsi256_si512(v); }
};

template <>
struct Bytes<16> {
  using V = __m128i;
  TWA_ISA_FN static V load(const void* p, __mmask64) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
  TWA_ISA_FN static V zero() { return _mm_setzero_si128(); }
  TWA_ISA_FN static V fill(uint8_t b) { return _mm_set1_epi8(static_cast<char>(b)); }
  TWA_ISA_FN static V shift(V v, int n) { return _mm_srli_epi16(v, n); }
  TWA_ISA_FN static V mask(V v, V m) { return _mm_and_si128(v, m); }
  TWA_ISA_FN static V dot(V acc, V codes, V q) { return _mm_dpbusd_epi32(acc, codes, q); }
  TWA_ISA_FN static __m256i halve(V v) { return _mm256_zextsi128_si256(v); }
  TWA_ISA_FN static __m512i wide(V v) { return _mm512_zextsi128_si512(v); }
};

template <int BITS, int ROWS, typename B, int W>
TWA_ISA_FN __attribute__((always_inline)) inline void dots_by(const uint8_t* const* src, int64_t plane, const int8_t* q, int32_t* dots) {
  using V = typename B::V;
  constexpr int kPerByte = 8 / BITS;
  const V mask = B::fill(static_cast<uint8_t>((1u << BITS) - 1u));
  V acc[ROWS];
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r) acc[r] = B::zero();
  for (int64_t i = 0; i < plane; i += W) {
    const __mmask64 m = plane - i >= 64 ? ~__mmask64{0} : (__mmask64{1} << (plane - i)) - 1;
    V qv[kPerByte];
#pragma GCC unroll 8
    for (int s = 0; s < kPerByte; ++s) qv[s] = B::load(q + s * plane + i, m);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const V bytes = B::load(src[r] + i, m);
#pragma GCC unroll 8
      for (int s = 0; s < kPerByte; ++s) {
        V codes = bytes;
        if constexpr (BITS != 8) {
          // no byte shift exists: shift 16-bit words and mask off what the high byte let in
          if (s > 0) codes = B::shift(codes, s * BITS);
          codes = B::mask(codes, mask);
        }
        acc[r] = B::dot(acc[r], codes, qv[s]);
      }
    }
  }
  if constexpr (ROWS == 4) {
    // the 4 rows' lane sums at once: interleave rows a, b and c, d and add (each 16-byte lane
    // then holds a b a b and c d c d pair sums), interleave those and add (a b c d), then add
    // the 16-byte lanes. Unpacks and adds are single instructions, where a horizontal add
    // is several.
    const __m512i a = B::wide(acc[0]), b = B::wide(acc[1]), c = B::wide(acc[2]), d = B::wide(acc[3]);
    const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dots),
                     _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
  } else {
    for (int r = 0; r < ROWS; ++r) {
      const __m256i h = B::halve(acc[r]);
      const __m128i x = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
      const __m128i y = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4e));
      dots[r] = _mm_cvtsi128_si32(_mm_add_epi32(y, _mm_shuffle_epi32(y, 0xb1)));
    }
  }
}

template <int BITS, int ROWS>
TWA_ISA_FN __attribute__((always_inline)) inline void group_dots_int8(const uint8_t* const* src, int64_t plane, const int8_t* q, const float*,
                                      int32_t* dots) {
  if (plane % 64 == 0) return dots_by<BITS, ROWS, Bytes<64>, 64>(src, plane, q, dots);
  if (plane % 32 == 0) return dots_by<BITS, ROWS, Bytes<32>, 32>(src, plane, q, dots);
  if (plane % 16 == 0) return dots_by<BITS, ROWS, Bytes<16>, 16>(src, plane, q, dots);
  dots_by<BITS, ROWS, MaskedBytes, 64>(src, plane, q, dots);
}

// Planes of 16 or 32 bytes (a 128-column group at 1 or 2 bits) fill a zmm only when it
// holds G = 64 / plane consecutive groups of one row, whose codes are contiguous; q is laid
// out to match as it is rounded (round_run_int8). The accumulator's 16-byte lanes then
// belong to one group each (G = 4) or in pairs (G = 2), and are summed per group at the end. Against one xmm or
// ymm per group, this is G times fewer loads and dots for the same bytes, and the sums of 4
// rows by G groups leave through one transpose instead of a horizontal add per row and group.
inline int int8_groups_per_dot(int64_t plane) { return plane == 16 ? 4 : plane == 32 ? 2 : 1; }
constexpr bool kInt8GroupedDots = true;

template <int BITS, int G, int ROWS>
TWA_ISA_FN inline void grouped_dots(const uint8_t* const* src, const int8_t* q, int32_t* dots, int64_t k) {
  constexpr int kPerByte = 8 / BITS;
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1u << BITS) - 1u));
  __m512i qv[kPerByte];
  for (int s = 0; s < kPerByte; ++s) qv[s] = _mm512_loadu_si512(q + s * 64);
  __m512i acc[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    const __m512i bytes = _mm512_loadu_si512(src[r]);
    acc[r] = _mm512_setzero_si512();
    for (int s = 0; s < kPerByte; ++s) {
      __m512i codes = bytes;
      if constexpr (BITS != 8) {
        if (s > 0) codes = _mm512_srli_epi16(codes, s * BITS);
        codes = _mm512_and_si512(codes, mask);
      }
      acc[r] = _mm512_dpbusd_epi32(acc[r], codes, qv[s]);
    }
  }
  if constexpr (ROWS == 4) {
    // a 4 x 4 transpose-and-add inside every 16-byte lane: lane i then holds the lane sums
    // of rows 0..3, and (G = 2) adding the neighbouring lane gives a group's
    const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[0], acc[1]), _mm512_unpackhi_epi32(acc[0], acc[1]));
    const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[2], acc[3]), _mm512_unpackhi_epi32(acc[2], acc[3]));
    __m512i sums = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
    if constexpr (G == 2) {
      sums = _mm512_add_epi32(sums, _mm512_shuffle_i32x4(sums, sums, _MM_SHUFFLE(2, 3, 0, 1)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dots), _mm512_extracti32x4_epi32(sums, 0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dots + k), _mm512_extracti32x4_epi32(sums, 2));
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dots), _mm512_extracti32x4_epi32(sums, 0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dots + k), _mm512_extracti32x4_epi32(sums, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dots + 2 * k), _mm512_extracti32x4_epi32(sums, 2));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dots + 3 * k), _mm512_extracti32x4_epi32(sums, 3));
    }
  } else {  // rows left over at the end of k, one at a time
    for (int r = 0; r < ROWS; ++r) {
      __m512i v = _mm512_add_epi32(acc[r], _mm512_shuffle_epi32(acc[r], _MM_PERM_CDAB));
      v = _mm512_add_epi32(v, _mm512_shuffle_epi32(v, _MM_PERM_BADC));  // every element: its lane's sum
      if constexpr (G == 2) v = _mm512_add_epi32(v, _mm512_shuffle_i32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
      alignas(64) int32_t out[16];
      _mm512_store_si512(out, v);
      for (int g = 0; g < G; ++g) dots[g * k + r] = out[g * 16 / G];
    }
  }
}

// round_group_int8 for a group of a multiple of 16 values, 16 per vector, giving the same q,
// scale and sum: the same integer max over magnitude bits, the same reciprocal, and one
// conversion in the current rounding mode (what nearbyint rounds in) where the compiler
// emits a round and a truncating conversion and packs bytes with two shuffles. Sub-plane s
// of the group (its values s * plane .. s * plane + plane - 1) goes to q + s * groups * plane:
// q group after group for groups = 1 (plane = len), and for groups = G > 1 the layout
// grouped_dots reads, sub-plane s of the chunk's group number `i` at (s * G + i) * plane,
// with q pointing at the chunk plus i * plane. Written there at once, q needs no second pass
// to be rearranged; two nested loops place it without a division per vector.
TWA_ISA_FN inline void round_group_int8_x16(const float* g, int64_t len, int8_t* q, int64_t plane, int groups,
                                            float& scale, int32_t& qsum) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __m512i top = _mm512_setzero_si512();
  for (int64_t j = 0; j < len; j += 16)
    top = _mm512_max_epu32(top, _mm512_and_si512(_mm512_loadu_si512(g + j), magnitude));
  const uint32_t bits = _mm512_reduce_max_epu32(top);
  float amax;
  std::memcpy(&amax, &bits, sizeof amax);
  const int64_t stride = groups * plane;
  const float factor = 127.f / amax;
  if (bits >= 0x7f800000u || !(factor <= std::numeric_limits<float>::max())) {  // as round_group_int8
    for (int64_t s = 0; s < len / plane; ++s) std::memset(q + s * stride, 0, static_cast<size_t>(plane));
    scale = bits >= 0x7f800000u ? std::numeric_limits<float>::quiet_NaN() : 0.f;
    qsum = 0;
    return;
  }
  const __m512 inv = _mm512_set1_ps(factor);
  __m512i sum = _mm512_setzero_si512();
  if (plane % 64 == 0) {
    // 64 values at a time: two saturating packs (exact, |q| <= 127) leave 4-byte pieces
    // interleaved by 16-byte lane, and one permute puts them in order for a single store
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int64_t s = 0; s < len / plane; ++s)
      for (int64_t j = 0; j < plane; j += 64) {
        const float* x = g + s * plane + j;
        __m512i r[4];
        for (int u = 0; u < 4; ++u) {
          r[u] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * u), inv));
          sum = _mm512_add_epi32(sum, r[u]);
        }
        const __m512i bytes = _mm512_packs_epi16(_mm512_packs_epi32(r[0], r[1]), _mm512_packs_epi32(r[2], r[3]));
        _mm512_storeu_si512(q + s * stride + j, _mm512_permutexvar_epi32(order, bytes));
      }
  } else {
    for (int64_t s = 0; s < len / plane; ++s)
      for (int64_t j = 0; j < plane; j += 16) {
        const __m512i rounded = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(g + s * plane + j), inv));
        sum = _mm512_add_epi32(sum, rounded);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + s * stride + j), _mm512_cvtepi32_epi8(rounded));
      }
  }
  scale = amax / 127.f;
  qsum = _mm512_reduce_add_epi32(sum);
}

// A run of n groups of g rounded: groups in whole chunks of G = groups_per_dot straight into
// q_grouped's layout (G > 1), the others into q group after group, where rows_dots_int8
// reads them. Widths that are not a multiple of 16 (no chunks then) take round_group_int8.
TWA_ISA_FN inline void round_run_int8(const float* g, int64_t n, int64_t width, int64_t plane, int groups_per_dot,
                                      int8_t* q, int8_t* q_grouped, float* scale, int32_t* qsum) {
  const int64_t in_chunks = groups_per_dot > 1 ? n / groups_per_dot * groups_per_dot : 0;
  const int64_t group_bytes = width * static_cast<int64_t>(sizeof(float));
  for (int64_t i = 0; i < n; ++i) {
    const float* gi = g + i * width;
    prefetch_g_ahead(g, i * group_bytes, group_bytes, n * group_bytes);
    if (width % 16 != 0)
      round_group_int8(gi, width, &q[i * width], scale[i], qsum[i]);
    else if (i < in_chunks)
      round_group_int8_x16(gi, width, &q_grouped[i / groups_per_dot * groups_per_dot * width + i % groups_per_dot * plane],
                           plane, groups_per_dot, scale[i], qsum[i]);
    else
      round_group_int8_x16(gi, width, &q[i * width], width, 1, scale[i], qsum[i]);
  }
}

template <int BITS>
TWA_ISA_FN inline void grouped_dots_int8(const uint8_t* const* src, int rows, int64_t plane, const int8_t* q,
                                        int32_t* dots, int64_t k) {
  if (plane == 16) {
    if (rows == kRowBlock) return grouped_dots<BITS, 4, kRowBlock>(src, q, dots, k);
    for (int r = 0; r < rows; ++r) grouped_dots<BITS, 4, 1>(src + r, q, dots + r, k);
  } else {
    if (rows == kRowBlock) return grouped_dots<BITS, 2, kRowBlock>(src, q, dots, k);
    for (int r = 0; r < rows; ++r) grouped_dots<BITS, 2, 1>(src + r, q, dots + r, k);
  }
}

#include "kernels_int8.h"

#undef TWA_ISA_FN
}  // namespace vnni
#endif

bool cpu_has_avx512() {
#if defined(TWA_HAVE_AVX512)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

// TWA_KERNELS_CPU_ISA=avx2 keeps a CPU with AVX-512 on the 8-lane path, the one an
// AVX2-only CPU runs (tests compare both paths; benchmarks time both). Read at every
// call, so a process can switch.
bool wants_avx512() {
  if (!cpu_has_avx512()) return false;
  const char* env = std::getenv("TWA_KERNELS_CPU_ISA");
  return !(env && std::strcmp(env, "avx2") == 0);
}

bool cpu_has_avx512_vnni() {
#if defined(TWA_HAVE_AVX512)
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

// project_int8 on VNNI's integer dots, unless TWA_KERNELS_CPU_ISA=avx2 asks for the
// 8-lane path (the one a CPU without VNNI runs).
bool use_vnni() { return cpu_has_avx512_vnni() && wants_avx512(); }

// The 16-lane path for a packed basis whose group planes are whole 16-byte chunks.
bool use_avx512(const PackedBasis& b) {
  return b.bits != 0 && (b.group_size / (8 / b.bits)) % 16 == 0 && wants_avx512();
}

// What the 8-lane kernels were compiled for.
const char* eight_lane_isa() {
#if defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

}  // namespace

const char* cpu_isa() { return wants_avx512() ? "avx512" : eight_lane_isa(); }

const char* cpu_int8_isa() { return use_vnni() ? "avx512-vnni" : eight_lane_isa(); }

int project_int8_pieces(const PackedBasis& b, const void* const* pieces, const int64_t* starts, int64_t n_pieces,
                        DType g_dtype, float* y, int num_threads) {
  const Pieces g{pieces, starts, n_pieces, g_dtype};
#if defined(TWA_HAVE_AVX512)
  if (use_vnni()) {
    switch (b.bits) {
      case 1: vnni::project_int8_impl<1>(b, g, y, num_threads); return 0;
      case 2: vnni::project_int8_impl<2>(b, g, y, num_threads); return 0;
      case 4: vnni::project_int8_impl<4>(b, g, y, num_threads); return 0;
      case 8: vnni::project_int8_impl<8>(b, g, y, num_threads); return 0;
      default: return -1;
    }
  }
#endif
  switch (b.bits) {
    case 1: vec8::project_int8_impl<1>(b, g, y, num_threads); return 0;
    case 2: vec8::project_int8_impl<2>(b, g, y, num_threads); return 0;
    case 4: vec8::project_int8_impl<4>(b, g, y, num_threads); return 0;
    case 8: vec8::project_int8_impl<8>(b, g, y, num_threads); return 0;
    default: return -1;
  }
}

int project_pieces(const PackedBasis& b, const void* const* pieces, const int64_t* starts, int64_t n_pieces,
                   DType g_dtype, float* y, int num_threads) {
  const Pieces g{pieces, starts, n_pieces, g_dtype};
#if defined(TWA_HAVE_AVX512)
  if (use_avx512(b)) {
    switch (b.bits) {
      case 1: vec16::project_impl<1>(b, g, y, num_threads); return 0;
      case 2: vec16::project_impl<2>(b, g, y, num_threads); return 0;
      case 4: vec16::project_impl<4>(b, g, y, num_threads); return 0;
      case 8: vec16::project_impl<8>(b, g, y, num_threads); return 0;
      default: return -1;
    }
  }
#endif
  switch (b.bits) {
    case 0: vec8::project_impl<0>(b, g, y, num_threads); return 0;
    case 1: vec8::project_impl<1>(b, g, y, num_threads); return 0;
    case 2: vec8::project_impl<2>(b, g, y, num_threads); return 0;
    case 4: vec8::project_impl<4>(b, g, y, num_threads); return 0;
    case 8: vec8::project_impl<8>(b, g, y, num_threads); return 0;
    default: return -1;
  }
}

int project(const PackedBasis& b, const void* g, DType g_dtype, float* y, int num_threads) {
  const int64_t starts[2] = {0, b.num_cols};
  return project_pieces(b, &g, starts, 1, g_dtype, y, num_threads);
}

int reconstruct(const PackedBasis& b, const float* x, const void* center, DType center_dtype, void* out,
                DType out_dtype, int num_threads) {
#if defined(TWA_HAVE_AVX512)
  if (use_avx512(b)) {
    switch (b.bits) {
      case 1: vec16::reconstruct_impl<1>(b, x, center, center_dtype, out, out_dtype, num_threads); return 0;
      case 2: vec16::reconstruct_impl<2>(b, x, center, center_dtype, out, out_dtype, num_threads); return 0;
      case 4: vec16::reconstruct_impl<4>(b, x, center, center_dtype, out, out_dtype, num_threads); return 0;
      case 8: vec16::reconstruct_impl<8>(b, x, center, center_dtype, out, out_dtype, num_threads); return 0;
      default: return -1;
    }
  }
#endif
  switch (b.bits) {
    case 0: vec8::reconstruct_impl<0>(b, x, center, center_dtype, out, out_dtype, num_threads); return 0;
    case 1: vec8::reconstruct_impl<1>(b, x, center, center_dtype, out, out_dtype, num_threads); return 0;
    case 2: vec8::reconstruct_impl<2>(b, x, center, center_dtype, out, out_dtype, num_threads); return 0;
    case 4: vec8::reconstruct_impl<4>(b, x, center, center_dtype, out, out_dtype, num_threads); return 0;
    case 8: vec8::reconstruct_impl<8>(b, x, center, center_dtype, out, out_dtype, num_threads); return 0;
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
