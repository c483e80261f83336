// project_int8 against reads of the same bytes, in one process, interleaved: is the kernel
// held back by its arithmetic or by the order in which it reads memory?
//
//   kernel    project_int8 itself (csrc/cpu/kernels.cpp, compiled in unchanged);
//   its order the same bytes read in the kernel's order and nothing else: per thread its
//             range of groups, per run g's stretch, then the codes 4 rows at a time, 64 KiB
//             of a row at a stretch, fetching 2 KiB ahead in each row as the kernel does,
//             then the run's scales and mins;
//   plain     the same number of bytes read front to back, split between the threads.
//
// k = 16, D = 11,689,512 (ResNet-18), groups of 128, one block, codes on 2 MiB pages as the
// library's bases are, g on ordinary pages as an autograd gradient is. Arguments: rounds,
// threads, D. Prints one line per bit width: bits, bytes, and the median milliseconds of
// the three over the rounds. Built and run by bench/access_pattern.py.
#include "../../csrc/cpu/kernels.cpp"

#include <sys/mman.h>

#include <chrono>
#include <cstdio>
#include <random>

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

// The kernel's reads without its work: returns a value so the loads are kept.
uint64_t read_in_kernel_order(const twa::PackedBasis& b, const float* g, int threads) {
  const int64_t width = b.group_size, gbytes = width * b.bits / 8, rows_per_block = 4;
  const int64_t cap = twa::int8_run_cap(b, false);  // the kernel's own run length, in groups
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
          for (int64_t r = r0; r < r0 + rows_per_block; ++r) {
            const uint8_t* p = b.codes + r * b.row_bytes + t * gbytes + off;
            __builtin_prefetch(p + twa::kInt8FetchAhead);
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

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 21, threads = argc > 2 ? std::atoi(argv[2]) : 2;
  const int64_t k = 16, group = 128, d = argc > 3 ? std::atoll(argv[3]) : 11689512;
  std::mt19937 rng(0);
  const int64_t n_groups = (d + group - 1) / group;
  std::vector<float> g(n_groups * group, 0.f);  // padded to whole groups: the order reader reads whole runs
  for (int64_t j = 0; j < d; ++j) g[j] = std::normal_distribution<float>()(rng);
  uint64_t sink = 0;
  for (int bits : {2, 4, 8}) {
    const int64_t row_bytes = n_groups * group * bits / 8;
    const int64_t bytes = k * row_bytes + 4 * d + 2 * 4 * n_groups * k;  // codes, g, scales and mins
    uint8_t* codes = on_huge_pages<uint8_t>(k * row_bytes);
    for (int64_t i = 0; i < k * row_bytes; ++i) codes[i] = static_cast<uint8_t>(rng());
    uint8_t* flat = on_huge_pages<uint8_t>(bytes);
    std::memset(flat, 1, bytes);
    std::vector<float> scales(n_groups * k + 16, 1e-3f), mins(n_groups * k + 16, -1e-3f);  // + a vector's overrun
    std::vector<int64_t> offsets = {0, d};
    twa::PackedBasis b;
    b.codes = codes, b.scales = scales.data(), b.mins = mins.data(), b.block_offsets = offsets.data();
    b.k = k, b.num_cols = d, b.row_bytes = row_bytes, b.n_groups = n_groups, b.n_blocks = 1, b.bits = bits;
    b.group_size = group;
    std::vector<float> y(k);
    const void* pieces[1] = {g.data()};
    const int64_t starts[2] = {0, d};
    std::vector<double> times[3];
    for (int r = 0; r < rounds + 2; ++r) {
      double t0 = now();
      twa::project_int8_pieces(b, pieces, starts, 1, twa::DType::f32, y.data(), threads);
      const double t1 = now();
      sink ^= read_in_kernel_order(b, g.data(), threads);
      const double t2 = now();
      sink ^= read_plain(flat, bytes, threads);
      const double t3 = now();
      if (r < 2) continue;  // warm-up
      times[0].push_back(t1 - t0), times[1].push_back(t2 - t1), times[2].push_back(t3 - t2);
    }
    double median[3];
    for (int i = 0; i < 3; ++i) {
      std::sort(times[i].begin(), times[i].end());
      median[i] = times[i][times[i].size() / 2] * 1e3;
    }
    std::printf("%d %lld %.3f %.3f %.3f\n", bits, static_cast<long long>(bytes), median[0], median[1], median[2]);
    std::free(codes);
    std::free(flat);
  }
  volatile uint64_t keep = sink;  // the reads have a use
  (void)keep;
  return 0;
}
