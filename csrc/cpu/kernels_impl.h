// The bodies of project and reconstruct, included once per instruction set by kernels.cpp
// inside that set's namespace. The namespace supplies TWA_ISA_FN (the target attribute its
// functions are compiled with), kLanes, kProjectRows, kAxpyRows, the lane vector fvec with
// load_vec and hsum, and group_dots / group_axpy, the whole-group inner loops. Everything
// else (tiles, runs, segments, the row-by-row path for cut groups) is the same code on
// every instruction set, so every path sums the same terms
// in the same order apart from the lane width, the number of FMA chains per row (project's
// 8-row blocks on AVX-512 keep one), the order of a horizontal sum, and AVX-512's
// reconstruct at 1 and 2 bits, which adds several rows' terms through one table lookup
// (group_axpy_2bit_pairs, group_axpy_1bit_quads) and so rounds differently.
// No include guard: it is meant to be included more than once.

// group_axpy for `rows` rows (at most kAxpyRows): one whole block of kAxpyRows, else blocks of
// 8 and 4, then single rows, the first of them from io.in and the rest from io.out, the last
// adding io.center. Only a whole block may stream its stores (io.stream), since the others
// read io.out back.
// A whole block of 128-column groups (the default width) gets a copy of the loop with the
// width fixed, unrolled: 3-7% faster at 2 bits (AMD EPYC, k = 16, D = 11.7M, interleaved;
// 2026-12-04, commit 5ea4f74).
template <int BITS>
TWA_ISA_FN inline void rows_axpy(const uint8_t* const* src, int rows, int64_t gbytes, const float* a, AxpyIO io) {
  if (rows == kAxpyRows<BITS>) {
    constexpr int64_t kDefaultGroupBytes = kDefaultGroupSize * BITS / 8;
    if (gbytes == kDefaultGroupBytes) return group_axpy<BITS, kAxpyRows<BITS>>(src, kDefaultGroupBytes, a, io);
    return group_axpy<BITS, kAxpyRows<BITS>>(src, gbytes, a, io);
  }
  int r = 0;
  const float* center = io.center;
  // the io of the sub-block of n rows from r: the center only where it is the last
  const auto part = [&](int n) { return AxpyIO{io.in, io.add, io.out, io.stream, r + n == rows ? center : nullptr}; };
  const auto then_in_place = [&io]() { io = AxpyIO{io.out, 0.f, io.out, false, nullptr}; };
  if constexpr (kAxpyRows<BITS> > 8) {
    for (; r + 8 <= rows; r += 8, then_in_place()) group_axpy<BITS, 8>(src + r, gbytes, a + r, part(8));
  }
  for (; r + 4 <= rows; r += 4, then_in_place()) group_axpy<BITS, 4>(src + r, gbytes, a + r, part(4));
  for (; r < rows; ++r, then_in_place()) group_axpy<BITS, 1>(src + r, gbytes, a + r, part(1));
}

// ROWS rows from r0 over a run of n whole groups from group t: acc[r * n_blocks] += the sum
// over the run of scale[r, group] * (the group's dot of row r with g), for each row r of the
// block. A function of its own, with the dots inlined into it, so that the rows' lane sums
// stay in registers across the run instead of going through memory once a group; they are
// reduced to float64 every kFlushGroups groups.
// GROUP is the group width when it is known at compile time (0: read from the basis). The
// default width, 128 columns, gets a copy of its own: a group is then a fixed number of
// vector steps (2 at 2 bits, 4 at 4), the group loop unrolls with its prefetches, and the
// loop bookkeeping that a run-time width leaves around every group goes. On the AMD EPYC
// (k = 16, D = 11.7M, 2 threads, interleaved calls; 2026-12-04, commit 37cfada) this made project 9-14% faster at 1 and 2
// bits and 3% at 4; 8-bit codes keep the run-time width, which measured 5% faster for them.
template <int BITS, int ROWS, int64_t GROUP = 0>
TWA_ISA_FN __attribute__((noinline)) void run_dots(const PackedBasis& b, int64_t r0, int64_t t, int64_t n, const float* g,
                                                   double* acc, LineFetcher& next_g) {
  if constexpr (GROUP == 0 && BITS < 8) {
    if (b.group_size == kDefaultGroupSize) return run_dots<BITS, ROWS, kDefaultGroupSize>(b, r0, t, n, g, acc, next_g);
  }
  const int64_t width = GROUP ? GROUP : b.group_size, gbytes = width * BITS / 8;
  const uint8_t* src[ROWS];
  row_block(b, r0, t, gbytes, ROWS, src);  // the caller has ROWS rows from r0
  if (GROUP == 0 && width > kLaneColumns) {
    // a wide group: its dots in pieces of kLaneColumns columns (piece bytes of every plane),
    // each scaled and added in float64, as the float32 lanes would lose the spec's accuracy
    const int64_t piece = kLaneColumns / (8 / BITS);  // plane bytes: a multiple of kLanes
    for (int64_t i = 0; i < n; ++i) {
      const float* scales = b.scales + (t + i) * b.k + r0;
      for (int64_t c = 0; c < gbytes; c += piece) {
        const uint8_t* at[ROWS];
        for (int r = 0; r < ROWS; ++r) at[r] = src[r] + c;
        fvec dots[ROWS];
        group_dots<BITS, ROWS>(at, std::min(piece, gbytes - c), g + i * width + c, dots, gbytes);
        for (int r = 0; r < ROWS; ++r) acc[(r0 + r) * b.n_blocks] += static_cast<double>(scales[r]) * hsum(dots[r]);
      }
      for (int r = 0; r < ROWS; ++r) src[r] += gbytes;
      next_g.step();
    }
    return;
  }
  fvec sums[ROWS];
  for (int r = 0; r < ROWS; ++r) sums[r] = fvec{};
  for (int64_t i0 = 0; i0 < n; i0 += kFlushGroups) {
    const int64_t i1 = std::min<int64_t>(n, i0 + kFlushGroups);
    for (int64_t i = i0; i < i1; ++i) {
      fvec dots[ROWS];
      group_dots<BITS, ROWS>(src, gbytes, g + i * width, dots, gbytes);
      const float* scales = b.scales + (t + i) * b.k + r0;
      for (int r = 0; r < ROWS; ++r) {
        sums[r] += scales[r] * dots[r];
        src[r] += gbytes;
      }
      prefetch_rows(src, ROWS, gbytes);  // ahead of the next group, as row_block did for this one
      next_g.step();
    }
    for (int r = 0; r < ROWS; ++r) {
      acc[(r0 + r) * b.n_blocks] += hsum(sums[r]);
      sums[r] = fvec{};
    }
  }
}

// How many row blocks project passes over a run with: kProjectRows rows at a time, then 4,
// then one.
constexpr int64_t project_passes(int64_t k) {
  const int64_t rest = k % kProjectRows;
  return k / kProjectRows + (kProjectRows > 4 ? rest / 4 + rest % 4 : rest);
}

template <int BITS>
TWA_ISA_FN void project_impl(const PackedBasis& b, const Pieces& g, float* y, int num_threads) {
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
    // g of a run where it is not one float32 piece; left uninitialised, so that its pages
    // are never touched where g is read in place
    std::unique_ptr<float[]> gbuf(new float[project_run_cap(b) * width + 8]);
    std::vector<float> cbuf(width + 8);
    std::vector<double> gsum;
    std::vector<double> min_terms(static_cast<size_t>(b.k));  // a run's min terms, row by row
    std::vector<Segment> segs;
    int64_t block = block_of(b.block_offsets, b.n_blocks, t_begin * width);
    int64_t piece = g.piece_of(t_begin * width);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * width, len = std::min(width, b.num_cols - c0);
      split_tile(b.block_offsets, b.n_blocks, c0, len, block, segs);
      if constexpr (BITS != 0) {
        if (fast_group(b, len, segs, kLanes)) {
          const int64_t blk = segs[0].block;
          const int64_t n = run_length(b, t, t_end, blk, project_run_cap(b));
          const float* gr = g.tile(c0, n * width, piece, gbuf.get());
          // sum_j lo * g[j] = lo * sum_j g[j]: one sum of g per group, shared by all rows, and
          // the k rows' min terms of a group are one pass over its k mins (stored group-major)
          std::fill(min_terms.begin(), min_terms.end(), 0.0);
          for (int64_t i = 0; i < n; ++i) {
            double gsum_i = 0.0;
            for (int64_t j0 = 0; j0 < width; j0 += kLaneColumns) {  // float lanes, float64 every kLaneColumns
              fvec gs{};
              for (int64_t j = j0; j < std::min(width, j0 + kLaneColumns); j += kLanes) gs += load_vec(gr + i * width + j);
              gsum_i += hsum(gs);
            }
            const float* mins = b.mins + (t + i) * b.k;
#pragma omp simd
            for (int64_t r = 0; r < b.k; ++r) min_terms[r] += static_cast<double>(mins[r]) * gsum_i;
          }
          for (int64_t r = 0; r < b.k; ++r) acc[r * b.n_blocks + blk] += min_terms[r];
          // the next run's g, fetched while the row blocks pass over this run's
          LineFetcher next_g;
          if (t + n < t_end) {
            int64_t bytes = 0;
            const void* from = g.span(c0 + n * width, std::min(n, t_end - t - n) * width, piece, bytes);
            next_g.start(from, bytes, project_passes(b.k) * n);
          }
          // blocks of kProjectRows rows, then of 4, then single rows
          int64_t r0 = 0;
          for (; r0 + kProjectRows <= b.k; r0 += kProjectRows)
            run_dots<BITS, kProjectRows>(b, r0, t, n, gr, acc + blk, next_g);
          if constexpr (kProjectRows > 4) {
            for (; r0 + 4 <= b.k; r0 += 4) run_dots<BITS, 4>(b, r0, t, n, gr, acc + blk, next_g);
          }
          for (; r0 < b.k; ++r0) run_dots<BITS, 1>(b, r0, t, n, gr, acc + blk, next_g);
          t += n - 1;
          continue;
        }
      }
      project_tile_rows<BITS>(b, t, c0, len, segs, g.tile(c0, len, piece, gbuf.get()), cbuf.data(), gsum, acc);
    }
  }
  sum_partials(partial, nt, kb, y);
}

template <int BITS>
TWA_ISA_FN void reconstruct_impl(const PackedBasis& b, const float* x, const void* center, DType center_dtype, void* out,
                      DType out_dtype, int num_threads) {
  const int64_t width = tile_width(b);
  const int64_t n_tiles = (b.num_cols + width - 1) / width;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n_tiles)));

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t t_begin = n_tiles * tid / nth, t_end = n_tiles * (tid + 1) / nth;
    std::vector<float> obuf(run_cap(b) * width + 8), cbuf(width + 8), ctmp(run_cap(b) * width + 8), xb(b.k),
        bases(run_cap(b));
    std::vector<Segment> segs;
    int64_t block = block_of(b.block_offsets, b.n_blocks, t_begin * width), xb_block = -1;
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * width, len = std::min(width, b.num_cols - c0);
      float* o = obuf.data();
      split_tile(b.block_offsets, b.n_blocks, c0, len, block, segs);
      if constexpr (BITS != 0) {
        if (fast_group(b, len, segs, kLanes)) {
          // one block's coefficients, gathered once per block: x is [k, n_blocks]
          if (segs[0].block != xb_block) {
            xb_block = segs[0].block;
            for (int64_t r = 0; r < b.k; ++r) xb[r] = x[r * b.n_blocks + xb_block];
          }
          const int64_t n = run_length(b, t, t_end, xb_block, run_cap(b));
          const float* ct = center ? float_view(center, center_dtype, c0, n * width, ctmp.data()) : nullptr;
          // sum_r lo[r] * x[r, b]: one constant for the whole group, summed in float64 (float32
          // over a few hundred rows lost the spec's tolerance where the terms cancel)
          for (int64_t i = 0; i < n; ++i) {
            const float* mins = b.mins + (t + i) * b.k;
            double base = 0.0;
#pragma omp simd reduction(+ : base)
            for (int64_t r = 0; r < b.k; ++r) base += static_cast<double>(mins[r]) * xb[r];
            bases[i] = static_cast<float>(base);
          }
          // The rows pass over the run's output in blocks of kAxpyRows, the fewest passes the
          // registers allow; a block of the k % kAxpyRows rows left over goes first, so that
          // the last pass is a whole block. The first pass starts from base, the last adds the
          // center and writes the weights themselves where they are float32 and aligned to a
          // vector, with streaming stores, as it finishes each group (the run's output buffer
          // holds the groups between passes). Meanwhile the next run's center is fetched a
          // few lines per group: the memory traffic is spread over the arithmetic instead of
          // coming in bursts between runs.
          const int64_t gbytes = b.group_size * BITS / 8;
          const int64_t first_rows = b.k % kAxpyRows<BITS> ? b.k % kAxpyRows<BITS> : kAxpyRows<BITS>;
          const int64_t passes = 1 + (b.k - first_rows) / kAxpyRows<BITS>;
          LineFetcher next_center;
          if (center && t + n < t_end) {
            const int64_t elem = center_dtype == DType::f32 ? 4 : 2;
            next_center.start(static_cast<const char*>(center) + (c0 + n * width) * elem,
                              std::min(n, t_end - t - n) * width * elem, passes * n);
          }
          float* weights = out_dtype == DType::f32 ? static_cast<float*>(out) + c0 : nullptr;
          if (reinterpret_cast<uintptr_t>(weights) % (kLanes * sizeof(float)) != 0) weights = nullptr;
          for (int64_t r0 = 0, rows = first_rows; r0 < b.k; r0 += rows, rows = kAxpyRows<BITS>) {
            const bool first_pass = r0 == 0, last_pass = r0 + rows == b.k;
            for (int64_t i = 0; i < n; ++i) {
              const uint8_t* src[kAxpyRows<BITS>];
              row_block(b, r0, t + i, gbytes, static_cast<int>(rows), src);
              const float* scales = b.scales + (t + i) * b.k + r0;
              float a[kAxpyRows<BITS>];
              for (int r = 0; r < rows; ++r) a[r] = scales[r] * xb[r0 + r];
              const bool direct = last_pass && weights && rows == kAxpyRows<BITS>;
              const AxpyIO io{first_pass ? nullptr : o + i * width, first_pass ? bases[i] : 0.f,
                              direct ? weights + i * width : o + i * width, direct,
                              last_pass && ct ? ct + i * width : nullptr};
              rows_axpy<BITS>(src, static_cast<int>(rows), gbytes, a, io);
              next_center.step();
              if (last_pass && !direct) store_floats(out, out_dtype, c0 + i * width, width, o + i * width);
            }
          }
          t += n - 1;
          continue;
        }
      }
      // a tile cut by a block edge, or a short last group: row by row, the center added last
      std::fill(o, o + len, 0.f);
      if (BITS != 0) {  // sum_r lo[r] * x[r, b] is one constant per segment
        for (const Segment& s : segs) {
          double sum = 0.0;
          for (int64_t r = 0; r < b.k; ++r)
            sum += static_cast<double>(b.mins[t * b.k + r]) * x[r * b.n_blocks + s.block];
          const float base = static_cast<float>(sum);
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
      if (center) {
        const float* ct = float_view(center, center_dtype, c0, len, ctmp.data());
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) o[j] += ct[j];
      }
      store_floats(out, out_dtype, c0, len, o);
    }
#if defined(__AVX__)
    _mm_sfence();  // make this thread's streaming stores visible before the region ends
#endif
  }
}

