// The CUDA kernels' run code executed serially on the host, for tests on machines without a
// GPU: the same templates (runs.cuh) with the host lanes policy. Built only into the test
// library (twa_kernels._build.build_cuda_kernels), never into the shipped extension.
#include "kernels.cuh"
#include "runs.cuh"

namespace twa_cuda {
namespace {

using namespace detail;

Basis make_basis(const void* codes, const float* scales, const float* mins, const int64_t* block_offsets, int64_t k,
                 int64_t num_cols, int64_t row_bytes, int64_t n_blocks, int64_t group_size, int bits) {
  Basis b;
  b.codes = static_cast<const uint8_t*>(codes);
  b.scales = scales;
  b.mins = mins;
  b.block_offsets = block_offsets;
  b.k = k;
  b.num_cols = num_cols;
  b.row_bytes = row_bytes;
  b.n_groups = bits ? (num_cols + group_size - 1) / group_size : 0;
  b.n_blocks = n_blocks;
  b.group_size = group_size;
  b.bits = bits;
  return b;
}

template <int BITS>
void emulate_project_bits(const Basis& b, const void* g, DType g_dtype, double* y, float* partial,
                          bool deterministic) {
  for (int64_t run = 0; run < num_runs(b); ++run)
    project_run<BITS>(b, g, g_dtype, y, partial, deterministic, run, HostLanes{});
  if (!deterministic) return;
  for (int64_t blk = 0; blk < b.n_blocks; ++blk) {
    int64_t first, last;
    runs_of_block(b, blk, &first, &last);
    for (int64_t r = 0; r < b.k; ++r) {
      double v = 0.0;
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
}  // namespace twa_cuda

// y (float64 [k, n_blocks]) must be zeroed.
extern "C" void twa_cuda_emulate_project(const void* codes, const float* scales, const float* mins,
                                         const int64_t* block_offsets, int64_t k, int64_t num_cols,
                                         int64_t row_bytes, int64_t n_blocks, int64_t group_size, int bits,
                                         const void* g, int g_dtype, double* y, float* partial, int deterministic) {
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
