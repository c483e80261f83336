// The thin binding: registers the raw-pointer CPU kernels of csrc/cpu as torch.library
// ops in the `twa_kernels_cpu` namespace. Outputs are allocated in Python and passed in,
// so this file needs only the small torch.library header. The user-facing ops, their
// fake impls and autograd live in twa_kernels/_ops.py and call these.
#include <torch/library.h>

#include <string>
#include <vector>

#include "basis_binding.h"
#include "cpu/kernels.h"

namespace {

using twa_binding::float_dtype;

void check_cpu_contiguous(const at::Tensor& t, const char* name) { twa_binding::check_on(t, name, c10::DeviceType::CPU); }

// The basis checked and its block offsets copied into `offsets`, which the basis then points
// at: the kernels walk their columns by the offsets, and an `out` over the offsets tensor
// that changed them while they run would send that walk out of bounds.
twa::PackedBasis make_basis(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                            const at::Tensor& block_offsets, int64_t bits, int64_t group_size, int64_t num_cols,
                            std::vector<int64_t>& offsets) {
  auto b = twa_binding::make_basis(codes, scales, mins, block_offsets, bits, group_size, num_cols,
                                   c10::DeviceType::CPU);
  offsets.assign(b.block_offsets, b.block_offsets + b.n_blocks + 1);
  b.block_offsets = offsets.data();
  // The last line of defence for memory safety (QuantizedBasis validates its layout when
  // it is made): every offset in order and inside [0, num_cols]. O(B), B being small.
  TORCH_CHECK(offsets[0] == 0 && offsets[b.n_blocks] == num_cols, "block_offsets must run from 0 to ", num_cols);
  for (int64_t i = 0; i < b.n_blocks; ++i) {
    TORCH_CHECK(offsets[i] < offsets[i + 1], "block_offsets must increase strictly; entry ", i + 1, " is ",
                offsets[i + 1], " after ", offsets[i]);
  }
  return b;
}

void project_out(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                 const at::Tensor& block_offsets, const at::Tensor& g, int64_t bits, int64_t group_size,
                 int64_t num_threads, const at::Tensor& y) {
  check_cpu_contiguous(g, "g");
  std::vector<int64_t> offsets;
  const twa::PackedBasis b = make_basis(codes, scales, mins, block_offsets, bits, group_size, g.numel(), offsets);
  check_cpu_contiguous(y, "y");
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.numel() == b.k * b.n_blocks, "y must be float32 [k, n_blocks]");
  const int status =
      twa::project(b, g.data_ptr(), float_dtype(g, "g"), y.data_ptr<float>(), static_cast<int>(num_threads));
  TORCH_CHECK(status == 0, "project: unsupported bits ", bits);
}

// The pieces of g as pointers and column starts, all of one float dtype.
struct PiecePointers {
  std::vector<const void*> ptrs;
  std::vector<int64_t> starts{0};
};

PiecePointers piece_pointers(at::TensorList pieces, const char* op) {
  TORCH_CHECK(!pieces.empty(), op, ": pieces is empty");
  PiecePointers out;
  for (size_t i = 0; i < pieces.size(); ++i) {
    check_cpu_contiguous(pieces[i], "pieces[i]");
    TORCH_CHECK(pieces[i].scalar_type() == pieces[0].scalar_type(), op, ": piece ", i, " is ",
                pieces[i].scalar_type(), " but piece 0 is ", pieces[0].scalar_type(), "; pass one dtype");
    out.ptrs.push_back(pieces[i].data_ptr());
    out.starts.push_back(out.starts.back() + pieces[i].numel());
  }
  return out;
}

using PiecesKernel = int (*)(const twa::PackedBasis&, const void* const*, const int64_t*, int64_t, twa::DType,
                             float*, int);

void run_pieces(PiecesKernel kernel, const char* op, const at::Tensor& codes, const at::Tensor& scales,
                const at::Tensor& mins, const at::Tensor& block_offsets, at::TensorList pieces, int64_t bits,
                int64_t group_size, int64_t num_threads, const at::Tensor& y) {
  const PiecePointers g = piece_pointers(pieces, op);
  std::vector<int64_t> offsets;
  const twa::PackedBasis b =
      make_basis(codes, scales, mins, block_offsets, bits, group_size, g.starts.back(), offsets);
  check_cpu_contiguous(y, "y");
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.numel() == b.k * b.n_blocks, "y must be float32 [k, n_blocks]");
  const int status = kernel(b, g.ptrs.data(), g.starts.data(), static_cast<int64_t>(g.ptrs.size()),
                            float_dtype(pieces[0], "pieces"), y.data_ptr<float>(), static_cast<int>(num_threads));
  TORCH_CHECK(status == 0, op, ": unsupported bits ", bits);
}

void project_pieces_out(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                        const at::Tensor& block_offsets, at::TensorList pieces, int64_t bits, int64_t group_size,
                        int64_t num_threads, const at::Tensor& y) {
  run_pieces(&twa::project_pieces, "project_pieces", codes, scales, mins, block_offsets, pieces, bits, group_size,
             num_threads, y);
}

void project_int8_pieces_out(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                             const at::Tensor& block_offsets, at::TensorList pieces, int64_t bits,
                             int64_t group_size, int64_t num_threads, const at::Tensor& y) {
  run_pieces(&twa::project_int8_pieces, "project_int8", codes, scales, mins, block_offsets, pieces, bits,
             group_size, num_threads, y);
}

void reconstruct_out(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                     const at::Tensor& block_offsets, const at::Tensor& x, const std::optional<at::Tensor>& center,
                     int64_t bits, int64_t group_size, int64_t num_threads, const at::Tensor& out) {
  check_cpu_contiguous(out, "out");
  std::vector<int64_t> offsets;
  const twa::PackedBasis b = make_basis(codes, scales, mins, block_offsets, bits, group_size, out.numel(), offsets);
  check_cpu_contiguous(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() == b.k * b.n_blocks, "x must be float32 [k, n_blocks]");
  const void* center_ptr = nullptr;
  twa::DType center_dtype = twa::DType::f32;
  if (center.has_value()) {
    check_cpu_contiguous(*center, "center");
    TORCH_CHECK(center->numel() == b.num_cols, "center must have ", b.num_cols, " elements");
    center_ptr = center->data_ptr();
    center_dtype = float_dtype(*center, "center");
  }
  const int status = twa::reconstruct(b, x.data_ptr<float>(), center_ptr, center_dtype, out.data_ptr(),
                                      float_dtype(out, "out"), static_cast<int>(num_threads));
  TORCH_CHECK(status == 0, "reconstruct: unsupported bits ", bits);
}

void gram_out(const at::Tensor& p, int64_t num_threads, const at::Tensor& out) {
  check_cpu_contiguous(p, "p");
  check_cpu_contiguous(out, "out");
  TORCH_CHECK(p.dim() == 2 && p.scalar_type() == at::kFloat, "p must be float32 [k, d]");
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.numel() == p.size(0) * p.size(0), "out must be float64 [k, k]");
  twa::gram(p.data_ptr<float>(), p.size(0), p.size(1), out.data_ptr<double>(), static_cast<int>(num_threads));
}

void combine_rows_out(const at::Tensor& t, const at::Tensor& p, int64_t num_threads, const at::Tensor& out) {
  check_cpu_contiguous(t, "t");
  check_cpu_contiguous(p, "p");
  check_cpu_contiguous(out, "out");
  TORCH_CHECK(p.dim() == 2 && p.scalar_type() == at::kFloat, "p must be float32 [k, d]");
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kDouble && t.size(1) == p.size(0), "t must be float64 [r, k]");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.numel() == t.size(0) * p.size(1), "out must be float32 [r, d]");
  twa::combine_rows(t.data_ptr<double>(), t.size(0), p.data_ptr<float>(), p.size(0), p.size(1),
                    out.data_ptr<float>(), static_cast<int>(num_threads));
}

std::string isa() { return twa::cpu_isa(); }

std::string int8_isa() { return twa::cpu_int8_isa(); }

}  // namespace

TORCH_LIBRARY(twa_kernels_cpu, m) {
  m.def(
      "project_out(Tensor codes, Tensor scales, Tensor mins, Tensor block_offsets, Tensor g, int bits, "
      "int group_size, int num_threads, Tensor(a!) y) -> ()");
  m.def(
      "project_pieces_out(Tensor codes, Tensor scales, Tensor mins, Tensor block_offsets, Tensor[] pieces, "
      "int bits, int group_size, int num_threads, Tensor(a!) y) -> ()");
  m.def(
      "project_int8_pieces_out(Tensor codes, Tensor scales, Tensor mins, Tensor block_offsets, Tensor[] pieces, "
      "int bits, int group_size, int num_threads, Tensor(a!) y) -> ()");
  m.def(
      "reconstruct_out(Tensor codes, Tensor scales, Tensor mins, Tensor block_offsets, Tensor x, Tensor? center, "
      "int bits, int group_size, int num_threads, Tensor(a!) out) -> ()");
  m.def("gram_out(Tensor p, int num_threads, Tensor(a!) out) -> ()");
  m.def("combine_rows_out(Tensor t, Tensor p, int num_threads, Tensor(a!) out) -> ()");
  // which kernels project and reconstruct run now (cpu/kernels.h, cpu_isa)
  m.def("isa() -> str", &isa);
  m.def("int8_isa() -> str", &int8_isa);
}

TORCH_LIBRARY_IMPL(twa_kernels_cpu, CPU, m) {
  m.impl("project_out", &project_out);
  m.impl("project_pieces_out", &project_pieces_out);
  m.impl("project_int8_pieces_out", &project_int8_pieces_out);
  m.impl("reconstruct_out", &reconstruct_out);
  m.impl("gram_out", &gram_out);
  m.impl("combine_rows_out", &combine_rows_out);
}
