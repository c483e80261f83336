// Checks shared by the CPU and CUDA bindings: a packed basis's tensors against the layout of
// twa_kernels/quant.py, filled into the raw-pointer struct both kernels read
// (twa::PackedBasis, packed_basis.h). Only the device the tensors must be on differs;
// reading block_offsets' values needs a CPU tensor, so that check stays with the CPU.
#pragma once

#include <torch/library.h>

#include "packed_basis.h"

namespace twa_binding {

inline void check_on(const at::Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, name, " must be a ", c10::DeviceTypeName(device, /*lower_case=*/true),
              " tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline twa::DType float_dtype(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kFloat) return twa::DType::f32;
  if (t.scalar_type() == at::kBFloat16) return twa::DType::bf16;
  TORCH_CHECK(false, name, " must be float32 or bfloat16, got ", t.scalar_type());
}

inline twa::PackedBasis make_basis(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                 const at::Tensor& block_offsets, int64_t bits, int64_t group_size, int64_t num_cols,
                 c10::DeviceType device) {
  check_on(codes, "codes", device);
  check_on(block_offsets, "block_offsets", device);
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) >= 1, "codes must be 2-D [k, ...] with k >= 1, got ", codes.sizes());
  TORCH_CHECK(block_offsets.scalar_type() == at::kLong && block_offsets.dim() == 1 && block_offsets.numel() >= 2,
              "block_offsets must be a 1-D int64 tensor with at least 2 entries");
  twa::PackedBasis b;
  b.codes = static_cast<const uint8_t*>(codes.data_ptr());
  b.block_offsets = block_offsets.data_ptr<int64_t>();
  b.k = codes.size(0);
  b.num_cols = num_cols;
  b.row_bytes = codes.size(1);
  b.n_blocks = block_offsets.numel() - 1;
  b.group_size = group_size;
  b.bits = static_cast<int>(bits);
  if (bits == 0) {
    TORCH_CHECK(codes.scalar_type() == at::kFloat && codes.size(1) == num_cols,
                "a dense basis must be float32 [k, ", num_cols, "]");
    return b;
  }
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "bits must be 0, 1, 2, 4 or 8, got ", bits);
  // at most quant.MAX_GROUP_SIZE: the kernels allocate a group's worth of scratch per thread
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0 && group_size <= (int64_t{1} << 20),
              "group_size must be a positive multiple of 8 up to 2**20, got ", group_size);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "packed codes must be uint8");
  check_on(scales, "scales", device);
  check_on(mins, "mins", device);
  TORCH_CHECK(scales.device() == codes.device() && mins.device() == codes.device(),
              "scales and mins must be on the device of codes, ", codes.device());
  b.n_groups = (num_cols + group_size - 1) / group_size;
  const int64_t per_byte = 8 / bits, last = num_cols - (b.n_groups - 1) * group_size;
  TORCH_CHECK(b.row_bytes == (b.n_groups - 1) * (group_size / per_byte) + (last + per_byte - 1) / per_byte,
              "codes has ", b.row_bytes, " bytes per row, which does not fit ", num_cols, " columns at ", bits,
              " bits");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && mins.scalar_type() == at::kFloat &&
                  scales.numel() == b.k * b.n_groups && mins.numel() == b.k * b.n_groups,
              "scales and mins must be float32 [n_groups, k]");
  b.scales = scales.data_ptr<float>();
  b.mins = mins.data_ptr<float>();
  return b;
}

}  // namespace twa_binding
