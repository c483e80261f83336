// project_int8: project of g rounded to int8 per quantisation group (round_group_int8), with
// the code-by-g products summed as integers. Included once per instruction set by
// kernels.cpp inside that set's namespace, which supplies TWA_ISA_FN, kRowBlock,
// dots_read_floats<BITS>(plane) (whether the dots want q as floats too),
// group_dots_int8<BITS, ROWS>(src, plane_bytes, q, q_as_floats, dots): the exact int32 sums
// over one whole group of code[r, j] * q[j] for ROWS rows, and int8_groups_per_dot(plane):
// how many consecutive groups of a row one vector of codes covers. Where that is G > 1
// (kInt8GroupedDots), grouped_dots_int8<BITS>(src, rows, plane, q, dots, k) takes G groups
// at once; round_run_int8 rounds a run of groups, and lays out q for it.
//
// Why it is faster than project: a float kernel spends an unpack, a convert and an FMA on
// every code; here one byte-wide integer dot (VNNI's vpdpbusd) takes 64 codes of a plane at
// once. The integer sums are exact, so the only rounding is the float64 scaling per group
// below, which is the same code on every instruction set.
// No include guard: it is meant to be included more than once.

template <int BITS>
TWA_ISA_FN __attribute__((always_inline)) inline void rows_dots_int8(const uint8_t* const* src, int rows, int64_t plane,
                                                                     const int8_t* q, const float* qf, int32_t* dots) {
  if (rows == kRowBlock) return group_dots_int8<BITS, kRowBlock>(src, plane, q, qf, dots);
  for (int r = 0; r < rows; ++r) group_dots_int8<BITS, 1>(src + r, plane, q, qf, dots + r);
}

// The dots of `rows` rows over a run of n groups (first: each row's first group), into
// dots[i * k + r], fetching kInt8FetchAhead bytes ahead in every row. A function of its own,
// with the dots inlined into it, so that its loop keeps the row pointers and accumulators in
// registers: inlined into project_int8_impl, the accumulators went through the stack.
template <int BITS>
TWA_ISA_FN __attribute__((noinline)) void run_dots_int8(const uint8_t* const* first, int rows, int64_t n, int64_t gbytes,
                                                        int64_t plane, int per_dot, const int8_t* q, const int8_t* q_grouped,
                                                        const float* qf, int32_t* dots, int64_t k) {
  const int64_t width = gbytes * 8 / BITS;
  const uint8_t* src[kRowBlock];
  for (int r = 0; r < rows; ++r) src[r] = first[r];
  int64_t i = 0;
  if constexpr (kInt8GroupedDots) {
    if (per_dot > 1) {  // whole chunks of per_dot groups, laid out by round_run_int8
      for (; i + per_dot <= n; i += per_dot) {
        for (int r = 0; r < rows; ++r) __builtin_prefetch(src[r] + kInt8FetchAhead);
        grouped_dots_int8<BITS>(src, rows, plane, q_grouped + i * width, dots + i * k, k);
        for (int r = 0; r < rows; ++r) src[r] += per_dot * gbytes;
      }
    }
  }
  for (; i < n; ++i) {
    for (int r = 0; r < rows; ++r)
      for (int64_t o = 0; o < gbytes; o += 64) __builtin_prefetch(src[r] + kInt8FetchAhead + o);
    rows_dots_int8<BITS>(src, rows, plane, q + i * width, qf ? qf + i * width : nullptr, dots + i * k);
    for (int r = 0; r < rows; ++r) src[r] += gbytes;
  }
}

template <int BITS>
TWA_ISA_FN void project_int8_impl(const PackedBasis& b, const Pieces& g, float* y, int num_threads) {
  const int64_t width = b.group_size;  // a tile is one quantisation group
  const int64_t n_tiles = b.n_groups;
  const int64_t kb = b.k * b.n_blocks;
  const int64_t gbytes = width * BITS / 8, plane = width / (8 / BITS);
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n_tiles)));
  std::vector<double> partial(static_cast<size_t>(nt) * kb, 0.0);

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t t_begin = n_tiles * tid / nth, t_end = n_tiles * (tid + 1) / nth;
    double* acc = partial.data() + static_cast<size_t>(tid) * kb;
    const bool floats = dots_read_floats<BITS>(plane);
    const int64_t cap = int8_run_cap(b, floats);
    // the run's buffers are written before they are read: left uninitialised, the pages of
    // those a run never needs (gbuf, for g read in place) are never touched
    std::unique_ptr<float[]> gbuf(new float[cap * width + 8]);
    std::vector<float> cbuf(width + 8), scale(cap);
    std::vector<int64_t> qsums;
    // a group's largest possible int32 sum, columns * (2^bits - 1) * 127, must fit: wider
    // groups (past 66,311 columns at 8 bits) take the row-by-row path below, with int64 sums
    const bool int32_sums = width * ((int64_t{1} << BITS) - 1) * 127 < (int64_t{1} << 31);
    std::unique_ptr<int8_t[]> q(new int8_t[cap * width]);
    std::unique_ptr<float[]> qf(floats ? new float[cap * width + 8] : nullptr);
    std::vector<int32_t> qsum(cap), dots(cap * b.k);
    const int per_dot = int8_groups_per_dot(plane);
    std::unique_ptr<int8_t[]> q_grouped(per_dot > 1 ? new int8_t[cap * width] : nullptr);
    std::vector<double> run(b.k);
    std::vector<Segment> segs;
    int64_t block = block_of(b.block_offsets, b.n_blocks, t_begin * width);
    int64_t piece = g.piece_of(t_begin * width);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * width, len = std::min(width, b.num_cols - c0);
      split_tile(b.block_offsets, b.n_blocks, c0, len, block, segs);
      if (len == width && segs.size() == 1 && int32_sums) {  // whole groups of one block, a run at a time
        const int64_t blk = segs[0].block;
        const int64_t n = run_length(b, t, t_end, blk, cap);
        const float* gr = g.tile(c0, n * width, piece, gbuf.get());
        round_run_int8(gr, n, width, plane, per_dot, q.get(), q_grouped.get(), scale.data(), qsum.data());
        if (floats) {
#pragma omp simd
          for (int64_t j = 0; j < n * width; ++j) qf[j] = q[j];
        }
        // The integer dots of every row and group of the run, group-major like scales and mins,
        // kRowBlock rows at a time; each row's codes are read as one stream of n * gbytes bytes.
        for (int64_t r0 = 0; r0 < b.k; r0 += kRowBlock) {
          const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, b.k - r0));
          const uint8_t* src[kRowBlock];
          for (int r = 0; r < rows; ++r) src[r] = b.codes + (r0 + r) * b.row_bytes + t * gbytes;
          run_dots_int8<BITS>(src, rows, n, gbytes, plane, per_dot, q.get(), q_grouped.get(), qf.get(), dots.data() + r0,
                              b.k);
        }
        // sum_j (lo + s * code_j) * q_j * sg = sg * (s * dot + lo * sum_j q_j), per row, in float64
        for (int64_t r = 0; r < b.k; ++r) run[r] = 0.0;
        for (int64_t i = 0; i < n; ++i) {
          const float* scales = b.scales + (t + i) * b.k;
          const float* mins = b.mins + (t + i) * b.k;
          const int32_t* d = &dots[i * b.k];
          const double sg = scale[i], qs = qsum[i];
#pragma omp simd
          for (int64_t r = 0; r < b.k; ++r)
            run[r] += sg * (static_cast<double>(scales[r]) * d[r] + static_cast<double>(mins[r]) * qs);
        }
        for (int64_t r = 0; r < b.k; ++r) acc[r * b.n_blocks + blk] += run[r];
        t += n - 1;
        continue;
      }
      // a group cut by a block edge, a short last group, or one too wide for int32 sums: row by
      // row, with int64 sums
      const float* gt = g.tile(c0, len, piece, gbuf.get());
      float sg;
      int32_t qs;
      round_group_int8(gt, len, q.get(), sg, qs);
      project_tile_rows_int8<BITS>(b, t, c0, len, segs, q.get(), sg, cbuf.data(), qsums, acc);
    }
  }
  sum_partials(partial, nt, kb, y);
}
