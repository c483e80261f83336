// The thin binding of the CUDA kernels (csrc/cuda) as torch.library ops in the
// `twa_kernels_cuda` namespace. Like the CPU binding, outputs and scratch are allocated in
// Python; the CUDA stream comes in as an integer (torch.cuda.current_stream().cuda_stream),
// so this file needs neither CUDA nor c10/cuda headers and compiles with the host compiler.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "basis_binding.h"
#include "cuda/kernels.cuh"

namespace {

using twa_binding::float_dtype;

void check_cuda_contiguous(const at::Tensor& t, const char* name, const at::Tensor& like) {
  twa_binding::check_on(t, name, c10::DeviceType::CUDA);
  // the kernels launch on `like`'s GPU (each op sets it current: a DeviceGuard): a pointer into
  // another GPU's memory would be read there
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the kernel runs on ", like.device());
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

void check_status(int status, const char* op) {
  TORCH_CHECK(status == 0, op, ": CUDA kernel launch failed with cudaError ", status);
}

twa_cuda::Basis make_basis(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                           const at::Tensor& block_offsets, int64_t bits, int64_t group_size, int64_t num_cols) {
  return twa_binding::make_basis(codes, scales, mins, block_offsets, bits, group_size, num_cols,
                                 c10::DeviceType::CUDA);
}

int64_t project_scratch(int64_t k, int64_t num_cols, int64_t n_blocks, int64_t bits, int64_t group_size) {
  twa_cuda::Basis b;
  b.k = k;
  b.num_cols = num_cols;
  b.n_blocks = n_blocks;
  b.group_size = group_size;
  b.bits = static_cast<int>(bits);
  return twa_cuda::project_partial_floats(b);
}

void project_out(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                 const at::Tensor& block_offsets, const at::Tensor& g, int64_t bits, int64_t group_size,
                 bool deterministic, int64_t stream, const at::Tensor& y, const at::Tensor& partial) {
  check_cuda_contiguous(g, "g", codes);
  const c10::DeviceGuard on_device(codes.device());  // a direct call from another current GPU
  const twa_cuda::Basis b = make_basis(codes, scales, mins, block_offsets, bits, group_size, g.numel());
  check_cuda_contiguous(y, "y", codes);
  TORCH_CHECK(y.scalar_type() == at::kDouble && y.numel() == b.k * b.n_blocks, "y must be float64 [k, n_blocks]");
  if (deterministic) {
    check_cuda_contiguous(partial, "partial", codes);
    TORCH_CHECK(partial.scalar_type() == at::kFloat && partial.numel() >= twa_cuda::project_partial_floats(b),
                "partial must hold project_scratch() float32 values");
  }
  check_status(twa_cuda::project(b, g.data_ptr(), float_dtype(g, "g"), y.data_ptr<double>(),
                                 deterministic ? partial.data_ptr<float>() : nullptr, deterministic,
                                 as_stream(stream)),
               "project");
}

void reconstruct_out(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                     const at::Tensor& block_offsets, const at::Tensor& x, const std::optional<at::Tensor>& center,
                     int64_t bits, int64_t group_size, int64_t stream, const at::Tensor& out) {
  check_cuda_contiguous(out, "out", codes);
  const c10::DeviceGuard on_device(codes.device());
  const twa_cuda::Basis b = make_basis(codes, scales, mins, block_offsets, bits, group_size, out.numel());
  check_cuda_contiguous(x, "x", codes);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() == b.k * b.n_blocks, "x must be float32 [k, n_blocks]");
  const void* center_ptr = nullptr;
  twa_cuda::DType center_dtype = twa_cuda::DType::f32;
  if (center.has_value()) {
    check_cuda_contiguous(*center, "center", codes);
    TORCH_CHECK(center->numel() == b.num_cols, "center must have ", b.num_cols, " elements");
    center_ptr = center->data_ptr();
    center_dtype = float_dtype(*center, "center");
  }
  check_status(twa_cuda::reconstruct(b, x.data_ptr<float>(), center_ptr, center_dtype, out.data_ptr(),
                                     float_dtype(out, "out"), as_stream(stream)),
               "reconstruct");
}

void gram_out(const at::Tensor& p, bool deterministic, int64_t stream, const at::Tensor& out,
              const at::Tensor& partial) {
  check_cuda_contiguous(p, "p", p);
  check_cuda_contiguous(out, "out", p);
  const c10::DeviceGuard on_device(p.device());
  TORCH_CHECK(p.dim() == 2 && p.scalar_type() == at::kFloat, "p must be float32 [k, d]");
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.numel() == p.size(0) * p.size(0), "out must be float64 [k, k]");
  if (deterministic) {
    check_cuda_contiguous(partial, "partial", p);
    TORCH_CHECK(partial.scalar_type() == at::kDouble &&
                    partial.numel() >= twa_cuda::gram_spans(p.size(1)) * p.size(0) * p.size(0),
                "partial must hold gram_scratch() float64 values");
  }
  check_status(twa_cuda::gram(p.data_ptr<float>(), p.size(0), p.size(1), out.data_ptr<double>(),
                              deterministic ? partial.data_ptr<double>() : nullptr, deterministic, as_stream(stream)),
               "gram");
}

int64_t gram_scratch(int64_t k, int64_t d) { return twa_cuda::gram_spans(d) * k * k; }

void combine_rows_out(const at::Tensor& t, const at::Tensor& p, int64_t stream, const at::Tensor& out) {
  check_cuda_contiguous(t, "t", p);
  check_cuda_contiguous(p, "p", p);
  check_cuda_contiguous(out, "out", p);
  const c10::DeviceGuard on_device(p.device());
  TORCH_CHECK(p.dim() == 2 && p.scalar_type() == at::kFloat, "p must be float32 [k, d]");
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kDouble && t.size(1) == p.size(0), "t must be float64 [r, k]");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.numel() == t.size(0) * p.size(1), "out must be float32 [r, d]");
  check_status(twa_cuda::combine_rows(t.data_ptr<double>(), p.data_ptr<float>(), t.size(0), p.size(0), p.size(1),
                                      out.data_ptr<float>(), as_stream(stream)),
               "combine_rows");
}

}  // namespace

TORCH_LIBRARY(twa_kernels_cuda, m) {
  m.def("project_scratch(int k, int num_cols, int n_blocks, int bits, int group_size) -> int");
  m.def(
      "project_out(Tensor codes, Tensor scales, Tensor mins, Tensor block_offsets, Tensor g, int bits, "
      "int group_size, bool deterministic, int stream, Tensor(a!) y, Tensor(b!) partial) -> ()");
  m.def(
      "reconstruct_out(Tensor codes, Tensor scales, Tensor mins, Tensor block_offsets, Tensor x, Tensor? center, "
      "int bits, int group_size, int stream, Tensor(a!) out) -> ()");
  m.def("gram_scratch(int k, int d) -> int");
  m.def("gram_out(Tensor p, bool deterministic, int stream, Tensor(a!) out, Tensor(b!) partial) -> ()");
  m.def("combine_rows_out(Tensor t, Tensor p, int stream, Tensor(a!) out) -> ()");
  // Sizes only (no tensor arguments): they run without a device.
  m.impl("project_scratch", &project_scratch);
  m.impl("gram_scratch", &gram_scratch);
}

TORCH_LIBRARY_IMPL(twa_kernels_cuda, CUDA, m) {
  m.impl("project_out", &project_out);
  m.impl("reconstruct_out", &reconstruct_out);
  m.impl("gram_out", &gram_out);
  m.impl("combine_rows_out", &combine_rows_out);
}
