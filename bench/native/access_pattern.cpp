// The kernels against the same bytes moved without their work, in one process, interleaved:
// is a kernel held back by its arithmetic, by the order in which it moves memory, or by the
// bytes themselves?
//
// For each of project_int8, project and reconstruct, at 2, 4 and 8 bits:
//   kernel     the op itself (csrc/cpu/kernels.cpp, compiled in unchanged);
//   its order  the same bytes moved in the kernel's order and nothing else: per thread its
//              range of groups in the kernel's runs. The projections read g's stretch of a
//              run, then the codes a row block at a time (4 rows and 64 KiB of a row at a
//              stretch for project_int8, project's rows per block and a group of each row in
//              turn for project), fetching ahead in each row as the kernel does, then the
//              run's scales and mins. reconstruct reads, group by group, the center and
//              every row's codes, and writes the weights with streaming stores, as its last
//              pass does;
//   plain      the same number of bytes front to back, split between the threads
//              (reconstruct: its reads, then its writes with streaming stores);
//   in cache   the op's time per column on problems that stay in cache, scaled to D: two
//              problems of 32,768 and 98,304 columns per thread, each called again and
//              again, and the difference of their times per call over the difference of
//              their widths, so that what a call costs whatever its size (starting the
//              threads, their buffers) drops out. Their codes and g fit in L3 (32,768
//              columns in L2 below 8 bits). Projections only: reconstruct's streaming
//              stores would write to lines its previous call left in cache, which costs
//              more than writing to memory, so "nan" stands in its place;
//   g on huge pages  the projections and their order again with g on 2 MiB pages, as torch
//              puts a gradient when the process starts with THP_MEM_ALLOC_ENABLE=1 ("nan"
//              for reconstruct, whose center is on huge pages already);
//   group-major order  the same bytes in the order a group-major codes layout would give
//              (all k rows of a group adjacent, one stream of codes instead of a stream per
//              row), g on huge pages: what the packed format's row-major order costs.
//
// k = 16, D = 11,689,512 (ResNet-18), groups of 128, one block, codes on 2 MiB pages as the
// library's bases are, g on ordinary pages as an autograd gradient is. Each round times every
// bit width and op in turn, so that 2-bit and 4-bit times are compared within rounds.
// Arguments: rounds, threads, D. Prints one line per op and bit width: op, bits, bytes, and
// the median milliseconds of the seven over the rounds. Built and run by bench/access_pattern.py.
#include "../../csrc/cpu/kernels.cpp"

#include <sys/mman.h>

#include <chrono>
#include <cstdio>
#include <random>
#include <string>

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

template <class T>
T* on_huge_pages(size_t n) {
  const size_t huge = size_t{1} << 21, bytes = (n * sizeof(T) + huge - 1) / huge * huge;
  void* p = std::aligned_alloc(huge, bytes);
  madvise(p, bytes, MADV_HUGEPAGE);
  return static_cast<T*>(p);
}

// 64 bytes as one vector of the compiler's choosing (a zmm, or two ymm without AVX-512).
typedef uint64_t Line __attribute__((vector_size(64)));

inline void xor_load(Line& acc, const void* p) {
  Line v;
  std::memcpy(&v, p, sizeof v);
  acc ^= v;
}

inline uint64_t fold(const Line& acc) {
  uint64_t total = 0;
  for (int i = 0; i < 8; ++i) total ^= acc[i];
  return total;
}

// A projection's reads without its work, in runs of `cap` groups, fetching `ahead` bytes
// ahead in each row: returns a value so the loads are kept.
uint64_t read_in_projection_order(const twa::PackedBasis& b, const float* g, int threads, int64_t cap,
                                  int64_t ahead, int64_t rows_per_block) {
  const int64_t width = b.group_size, gbytes = width * b.bits / 8;
  uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(^ : total)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t t_begin = b.n_groups * tid / nth, t_end = b.n_groups * (tid + 1) / nth;
    Line acc = {};
    for (int64_t t = t_begin; t < t_end; t += cap) {
      const int64_t n = std::min(cap, t_end - t), span = n * gbytes;
      for (int64_t j = 0; j < n * width; j += 16) xor_load(acc, g + t * width + j);
      for (int64_t r0 = 0; r0 < b.k; r0 += rows_per_block) {
        for (int64_t off = 0; off < span; off += 64)
          for (int64_t r = r0; r < std::min(b.k, r0 + rows_per_block); ++r) {
            const uint8_t* p = b.codes + r * b.row_bytes + t * gbytes + off;
            __builtin_prefetch(p + ahead);
            xor_load(acc, p);
          }
      }
      // then the run's scales and mins, group-major, as the kernel's scaling reads them
      for (const float* table : {b.scales, b.mins})
        for (int64_t j = 0; j < n * b.k; j += 16) xor_load(acc, table + t * b.k + j);
    }
    total ^= fold(acc);
  }
  return total;
}

// 64 bytes written around the caches where the compiler targets AVX, as reconstruct's last
// pass writes the weights.
inline void stream_line(float* dst, const Line& v) {
#if defined(__AVX__)
  __m256 halves[2];
  std::memcpy(halves, &v, sizeof v);
  _mm256_stream_ps(dst, halves[0]);
  _mm256_stream_ps(dst + 8, halves[1]);
#else
  std::memcpy(dst, &v, sizeof v);
#endif
}

// `bytes` of codes from `p`, fetched ahead as the kernels fetch a row.
inline void read_codes(Line& acc, const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(p + twa::kPrefetchBytes + off);
    xor_load(acc, p + off);
  }
}

// One group's `width` floats of g or the center read, and (where `out` is given) the
// group's weights written with streaming stores.
inline void read_group(Line& acc, const float* src, float* out, int64_t width) {
  for (int64_t j = 0; j < width; j += 16) {
    Line v;
    std::memcpy(&v, src + j, sizeof v);
    acc ^= v;
    if (out != nullptr) stream_line(out + j, acc);
  }
}

// reconstruct's traffic without its work: group by group in the kernel's runs, the group's
// scales and mins, every row's codes (fetched ahead in each row as the kernel does) and the
// center's group read, and the group's weights written with streaming stores.
uint64_t move_in_reconstruct_order(const twa::PackedBasis& b, const float* center, float* out, int threads) {
  const int64_t width = b.group_size, gbytes = width * b.bits / 8, cap = twa::run_cap(b);
  uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(^ : total)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t t_begin = b.n_groups * tid / nth, t_end = b.n_groups * (tid + 1) / nth;
    Line acc = {};
    for (int64_t t = t_begin; t < t_end; t += cap) {
      const int64_t n = std::min(cap, t_end - t);
      for (int64_t i = t; i < t + n; ++i) {
        for (const float* table : {b.scales, b.mins})  // the group's k scales and mins
          for (int64_t j = 0; j < b.k; j += 16) xor_load(acc, table + i * b.k + j);
        for (int64_t r = 0; r < b.k; ++r) read_codes(acc, b.codes + r * b.row_bytes + i * gbytes, gbytes);
        read_group(acc, center + i * width, out + i * width, width);
      }
    }
    total ^= fold(acc);
  }
#if defined(__AVX__)
  _mm_sfence();
#endif
  return total;
}

// The op's traffic in the order a group-major codes layout would give: group by group, the
// group's k rows read as one stretch (here the row-major codes' bytes, read as if they were
// laid out so, which moves the same bytes), with g's group (projections) or the center's
// group and the weights written (reconstruct), and the group's scales and mins.
uint64_t move_in_group_major_order(const twa::PackedBasis& b, const float* g_or_center, float* out, int threads) {
  const int64_t width = b.group_size, stretch = width * b.bits / 8 * b.k;
  uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(^ : total)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t t_begin = b.n_groups * tid / nth, t_end = b.n_groups * (tid + 1) / nth;
    Line acc = {};
    for (int64_t t = t_begin; t < t_end; ++t) {
      for (const float* table : {b.scales, b.mins})
        for (int64_t j = 0; j < b.k; j += 16) xor_load(acc, table + t * b.k + j);
      read_codes(acc, b.codes + t * stretch, stretch);
      read_group(acc, g_or_center + t * width, out == nullptr ? nullptr : out + t * width, width);
    }
    total ^= fold(acc);
  }
#if defined(__AVX__)
  if (out != nullptr) _mm_sfence();
#endif
  return total;
}

uint64_t read_plain(const uint8_t* p, int64_t bytes, int threads) {
  uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(^ : total)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t begin = bytes / 64 * tid / nth * 64, end = bytes / 64 * (tid + 1) / nth * 64;
    Line acc = {};
    for (int64_t off = begin; off < end; off += 64) xor_load(acc, p + off);
    total ^= fold(acc);
  }
  return total;
}

// n floats written front to back with streaming stores, split between the threads.
void write_plain(float* dst, int64_t n, int threads) {
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t begin = n / 16 * tid / nth * 16, end = n / 16 * (tid + 1) / nth * 16;
    Line v = {};
    for (int64_t j = begin; j < end; j += 16) stream_line(dst + j, v);
  }
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// kernel, its order, plain, in cache, kernel with g on huge pages, its order so, group-major order
constexpr int kColumns = 7;

// The medians of each column of `times`, in milliseconds, printed after the op and sizes.
void report(const char* op, int bits, int64_t bytes, std::vector<double> (&times)[kColumns]) {
  std::printf("%s %d %lld", op, bits, static_cast<long long>(bytes));
  for (std::vector<double>& column : times) {
    std::sort(column.begin(), column.end());
    std::printf(" %.3f", column.empty() ? std::nan("") : column[column.size() / 2] * 1e3);
  }
  std::printf("\n");
}

// The rows per block of project's row blocks on the path the library takes on this CPU.
int64_t project_rows_per_block() {
#if defined(TWA_HAVE_AVX512)
  if (twa::cpu_has_avx512()) return twa::vec16::kProjectRows;
#endif
  return twa::vec8::kProjectRows;
}

// A basis of the same k and bit width over `cols` columns, its codes random, with its g,
// center and output: a problem that stays in cache.
struct SmallCase {
  std::vector<uint8_t> codes;
  std::vector<float> scales, mins, g, center, out;
  std::vector<int64_t> offsets;
  twa::PackedBasis b;

  SmallCase(int64_t k, int64_t group, int bits, int64_t cols, std::mt19937& rng)
      : offsets{0, cols} {
    const int64_t n_groups = cols / group, row_bytes = n_groups * group * bits / 8;
    codes.resize(k * row_bytes);
    for (uint8_t& c : codes) c = static_cast<uint8_t>(rng());
    scales.assign(n_groups * k + 16, 1e-3f), mins.assign(n_groups * k + 16, -1e-3f);
    g.resize(cols), center.resize(cols), out.resize(cols);
    for (int64_t j = 0; j < cols; ++j) g[j] = center[j] = std::normal_distribution<float>()(rng);
    b.codes = codes.data(), b.scales = scales.data(), b.mins = mins.data(), b.block_offsets = offsets.data();
    b.k = k, b.num_cols = cols, b.row_bytes = row_bytes, b.n_groups = n_groups, b.n_blocks = 1;
    b.bits = bits, b.group_size = group;
  }
};

// Calls op `op` of the library on `b` with its g, center and output.
void call_op(int op, const twa::PackedBasis& b, const float* g, const float* center, float* out, const float* x,
             float* y, int threads) {
  const void* pieces[1] = {g};
  const int64_t starts[2] = {0, b.num_cols};
  if (op == 0) twa::project_int8_pieces(b, pieces, starts, 1, twa::DType::f32, y, threads);
  if (op == 1) twa::project(b, g, twa::DType::f32, y, threads);
  if (op == 2) twa::reconstruct(b, x, center, twa::DType::f32, out, twa::DType::f32, threads);
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 21, threads = argc > 2 ? std::atoi(argv[2]) : 2;
  const int64_t k = 16, group = 128, d = argc > 3 ? std::atoll(argv[3]) : 11689512;
  std::mt19937 rng(0);
  const int64_t n_groups = (d + group - 1) / group, padded = n_groups * group;
  // padded to whole groups: the readers read whole runs
  std::vector<float> g(padded, 0.f);
  for (int64_t j = 0; j < d; ++j) g[j] = std::normal_distribution<float>()(rng);
  float* center = on_huge_pages<float>(padded);  // as tk.TWA's center and weights workspace are
  float* out = on_huge_pages<float>(padded);
  for (int64_t j = 0; j < padded; ++j) center[j] = g[j];
  std::memset(out, 0, padded * sizeof(float));
  std::vector<float> x(k, 0.01f);
  float* g_huge = on_huge_pages<float>(padded);  // the same gradient where THP_MEM_ALLOC_ENABLE=1 puts it
  std::memcpy(g_huge, g.data(), padded * sizeof(float));
  // every bit width's basis at once, so that a round times all of them and a drift of a shared
  // machine hits the 2-bit and 4-bit passes alike
  const int widths[3] = {2, 4, 8};
  struct Case {
    uint8_t* codes;
    uint8_t* flat;  // as many bytes as reconstruct reads, for the plain passes
    std::vector<float> scales, mins;
    twa::PackedBasis b;
  } cases[3];
  std::vector<int64_t> offsets = {0, d};
  for (int w = 0; w < 3; ++w) {
    Case& c = cases[w];
    const int64_t row_bytes = n_groups * group * widths[w] / 8;
    const int64_t reads = k * row_bytes + 4 * d + 2 * 4 * n_groups * k;  // codes, g or center, scales and mins
    c.codes = on_huge_pages<uint8_t>(k * row_bytes);
    for (int64_t i = 0; i < k * row_bytes; ++i) c.codes[i] = static_cast<uint8_t>(rng());
    c.flat = on_huge_pages<uint8_t>(reads);
    std::memset(c.flat, 1, reads);
    c.scales.assign(n_groups * k + 16, 1e-3f), c.mins.assign(n_groups * k + 16, -1e-3f);  // + a vector's overrun
    c.b.codes = c.codes, c.b.scales = c.scales.data(), c.b.mins = c.mins.data(), c.b.block_offsets = offsets.data();
    c.b.k = k, c.b.num_cols = d, c.b.row_bytes = row_bytes, c.b.n_groups = n_groups, c.b.n_blocks = 1;
    c.b.bits = widths[w], c.b.group_size = group;
  }
  std::vector<float> y(k);
  const char* ops[3] = {"project_int8", "project", "reconstruct"};
  // the in-cache problems: 32,768 and 98,304 columns per thread, called kCacheCalls times a round
  constexpr int kCacheCalls = 8;
  const int64_t narrow_cols = int64_t{32768} * threads, wide_cols = int64_t{98304} * threads;
  std::vector<SmallCase> narrow, wide;
  for (int w = 0; w < 3; ++w) {
    narrow.emplace_back(k, group, widths[w], narrow_cols, rng);
    wide.emplace_back(k, group, widths[w], wide_cols, rng);
  }
  std::vector<double> times[3][3][kColumns];  // [bit width][op][column, as kColumns lists them]
  uint64_t sink = 0;
  for (int r = 0; r < rounds + 2; ++r) {
    for (int w = 0; w < 3; ++w) {
      const twa::PackedBasis& b = cases[w].b;
      const int64_t reads = k * b.row_bytes + 4 * d + 2 * 4 * n_groups * k;
      for (int op = 0; op < 3; ++op) {
        const double t0 = now();
        call_op(op, b, g.data(), center, out, x.data(), y.data(), threads);
        const double t1 = now();
        if (op == 0) sink ^= read_in_projection_order(b, g.data(), threads, twa::int8_run_cap(b, false),
                                                      twa::kInt8FetchAhead, 4);
        if (op == 1) sink ^= read_in_projection_order(b, g.data(), threads, twa::project_run_cap(b),
                                                      twa::kPrefetchBytes, project_rows_per_block());
        if (op == 2) sink ^= move_in_reconstruct_order(b, center, out, threads);
        const double t2 = now();
        sink ^= read_plain(cases[w].flat, reads, threads);
        if (op == 2) write_plain(out, padded, threads);
        const double t3 = now();
        if (op == 2) {
          sink ^= move_in_group_major_order(b, center, out, threads);
          const double t4 = now();
          if (r < 2) continue;  // warm-up
          times[w][op][0].push_back(t1 - t0), times[w][op][1].push_back(t2 - t1), times[w][op][2].push_back(t3 - t2);
          times[w][op][6].push_back(t4 - t3);  // reconstruct: no in-cache time (see the top of this file)
          continue;
        }
        call_op(op, b, g_huge, center, out, x.data(), y.data(), threads);
        const double t4 = now();
        if (op == 0) sink ^= read_in_projection_order(b, g_huge, threads, twa::int8_run_cap(b, false),
                                                      twa::kInt8FetchAhead, 4);
        if (op == 1) sink ^= read_in_projection_order(b, g_huge, threads, twa::project_run_cap(b),
                                                      twa::kPrefetchBytes, project_rows_per_block());
        const double t5 = now();
        sink ^= move_in_group_major_order(b, g_huge, nullptr, threads);
        const double t6 = now();
        if (r >= 2)
          for (int c : {4, 5, 6}) times[w][op][c].push_back(c == 4 ? t4 - t3 : c == 5 ? t5 - t4 : t6 - t5);
        double per_call[2];
        for (int size = 0; size < 2; ++size) {
          SmallCase& s = size ? wide[w] : narrow[w];
          call_op(op, s.b, s.g.data(), s.center.data(), s.out.data(), x.data(), y.data(), threads);  // into cache
          const double start = now();
          for (int i = 0; i < kCacheCalls; ++i)
            call_op(op, s.b, s.g.data(), s.center.data(), s.out.data(), x.data(), y.data(), threads);
          per_call[size] = (now() - start) / kCacheCalls;
        }
        const double in_cache = (per_call[1] - per_call[0]) / (wide_cols - narrow_cols) * padded;
        if (r < 2) continue;  // warm-up
        times[w][op][0].push_back(t1 - t0), times[w][op][1].push_back(t2 - t1), times[w][op][2].push_back(t3 - t2);
        times[w][op][3].push_back(in_cache);
      }
    }
  }
  for (int w = 0; w < 3; ++w) {
    const int64_t reads = k * cases[w].b.row_bytes + 4 * d + 2 * 4 * n_groups * k;
    for (int op = 0; op < 3; ++op) report(ops[op], widths[w], op == 2 ? reads + 4 * d : reads, times[w][op]);
    std::free(cases[w].codes);
    std::free(cases[w].flat);
  }
  std::free(center);
  std::free(out);
  std::free(g_huge);
  volatile uint64_t keep = sink;  // the reads have a use
  (void)keep;
  return 0;
}
