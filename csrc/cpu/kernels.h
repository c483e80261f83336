// Fused CPU kernels for twa-kernels, on raw pointers (no torch headers, so this file
// compiles in a second and can be unit-built on its own). The math is fixed by
// docs/design.md ("Math of each op"); twa_kernels/backends/reference.py is the executable spec.
//
// Packed layout (see twa_kernels/quant.py): row r of the basis is cut into groups of
// `group_size` columns; group t starts at byte t * group_size / cpb of the row, where
// cpb = 8 / bits codes share a byte. Inside a group of L columns, W = ceil(L / cpb)
// bytes hold cpb "planes": element s * W + i sits in byte i at bit s * bits. Planes
// make unpacking a contiguous shift-and-mask loop that the compiler vectorises.
#pragma once
#include <cstdint>

#include "../packed_basis.h"

namespace twa {

// Each of the ops below returns 0, or -1 for a bits value outside {0, 1, 2, 4, 8}.
// y[r, b] = sum_{j in block b} p^[r, j] * g[j]; y is float32 [k, n_blocks].
int project(const PackedBasis& basis, const void* g, DType g_dtype, float* y, int num_threads);

// project of g given as consecutive pieces, each read in place: piece i is pieces[i] and
// holds columns starts[i] .. starts[i + 1] (starts has n_pieces + 1 entries, 0 ...
// num_cols); all pieces have dtype g_dtype. Same result as project of their concatenation.
int project_pieces(const PackedBasis& basis, const void* const* pieces, const int64_t* starts, int64_t n_pieces,
                   DType g_dtype, float* y, int num_threads);

// project_pieces of g^, g rounded to int8 per quantisation group: g^[j] = q[j] * scale_t with
// scale_t = max_{j in group t} |g[j]| / 127 (twa_kernels/quant.py, round_groups_int8, is
// the spec). Returns 0, or -1 for bits outside {1, 2, 4, 8} (a dense basis has no groups).
int project_int8_pieces(const PackedBasis& basis, const void* const* pieces, const int64_t* starts,
                        int64_t n_pieces, DType g_dtype, float* y, int num_threads);

// out[j] = center[j] + sum_r p^[r, j] * x[r, block(j)]; x is float32 [k, n_blocks].
// center may be null (taken as zero); out has dtype out_dtype.
int reconstruct(const PackedBasis& basis, const float* x, const void* center, DType center_dtype,
                 void* out, DType out_dtype, int num_threads);

// The instruction set project and reconstruct run a packed basis on now: "avx512" (the
// 16-lane kernels, when the CPU has AVX-512 F/BW/VL/DQ, for group planes of whole 16-byte
// chunks, unless TWA_KERNELS_CPU_ISA=avx2), else "avx2", or "generic" (the 8-lane kernels
// as the compiler's target builds them).
const char* cpu_isa();

// The instruction set project_int8 runs on now: "avx512-vnni" (when the CPU has AVX-512
// VNNI, unless TWA_KERNELS_CPU_ISA=avx2), else "avx2" (AVX2's byte dots at 1-4 bits for
// group planes of whole 16-byte chunks, the float kernels on q otherwise) or "generic".
const char* cpu_int8_isa();

// gram[i, l] = sum_j p[i, j] * p[l, j], accumulated in float64. p is float32 [k, d].
void gram(const float* p, int64_t k, int64_t d, double* gram, int num_threads);

// q[i, j] = sum_l t[i, l] * p[l, j], accumulated in float64. t is float64 [r, k].
void combine_rows(const double* t, int64_t r, const float* p, int64_t k, int64_t d, float* q,
                  int num_threads);

}  // namespace twa
