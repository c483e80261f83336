// The packed basis as the CPU and CUDA kernels read it: raw pointers into the tensors of a
// QuantizedBasis, in the layout of docs/design.md ("Packed format") and twa_kernels/quant.py.
// Plain data without torch or CUDA types, so the host compiler, nvcc and both bindings share
// it; csrc/basis_binding.h fills it from tensors and checks them.
#pragma once

#include <cstdint>

namespace twa {

enum class DType : int { f32 = 0, bf16 = 1 };

struct PackedBasis {
  const uint8_t* codes = nullptr;          // uint8 [k, row_bytes]; bits == 0: float32 [k, num_cols]
  const float* scales = nullptr;           // float32 [n_groups, k]: group-major (unused when bits == 0)
  const float* mins = nullptr;             // float32 [n_groups, k] (unused when bits == 0)
  const int64_t* block_offsets = nullptr;  // int64 [n_blocks + 1], 0 ... num_cols
  int64_t k = 0, num_cols = 0, row_bytes = 0, n_groups = 0, n_blocks = 0;
  int bits = 0;  // 1, 2, 4, 8; 0 = dense float32 basis
  int64_t group_size = 0;
};

}  // namespace twa
