// Dense float products used by the eigensolvers (NCut and PCA) and by the whitening, with an
// AVX2 + FMA register-tiled kernel; the portable path is Eigen's product.
#pragma once

#include <Eigen/Dense>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "clustermac/common.hpp"
#include "clustermac/simd.hpp"

namespace clustermac {
namespace detail {

#ifdef CLUSTERMAC_SIMD_X86
// out = a * v (or out += a * v with `accumulate`): a is rows x cols, v cols x width, out
// rows x width, each row-major with its rows lda / ldv / ldo floats apart. Register tiles of
// 12 accumulators (4 x 24, 6 x 16 or 8 x 8), written out with named accumulators so that the
// compiler keeps them in registers.
struct ProductOperands {
  const float* a;
  Eigen::Index lda, cols;
  const float* v;
  Eigen::Index ldv;
  float* out;
  Eigen::Index ldo;
  bool accumulate;
};

// clang-format off: the register tiles are laid out by hand, one row of accumulators a line.
#define CLUSTERMAC_FMA(acc, w, x) acc = _mm256_fmadd_ps(w, x, acc)

CLUSTERMAC_TARGET_AVX2 inline void dense_times_block_tile_4x24(const ProductOperands& p, Eigen::Index column, Eigen::Index row,
                                                               Eigen::Index row_count) {
  const float* const a = p.a;
  const float* const v = p.v;
  float* const out = p.out;
  const Eigen::Index cols = p.cols, lda = p.lda, ldv = p.ldv, ldo = p.ldo;
  const float* r0 = a + row * lda;
  const float* r1 = a + (row + std::min<Eigen::Index>(1, row_count - 1)) * lda;
  const float* r2 = a + (row + std::min<Eigen::Index>(2, row_count - 1)) * lda;
  const float* r3 = a + (row + std::min<Eigen::Index>(3, row_count - 1)) * lda;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
  __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
  if (p.accumulate) {
#define CLUSTERMAC_LOAD(r, q) _mm256_loadu_ps(out + (row + std::min<Eigen::Index>(r, row_count - 1)) * ldo + column + 8 * q)
    c00 = CLUSTERMAC_LOAD(0, 0); c01 = CLUSTERMAC_LOAD(0, 1); c02 = CLUSTERMAC_LOAD(0, 2);
    c10 = CLUSTERMAC_LOAD(1, 0); c11 = CLUSTERMAC_LOAD(1, 1); c12 = CLUSTERMAC_LOAD(1, 2);
    c20 = CLUSTERMAC_LOAD(2, 0); c21 = CLUSTERMAC_LOAD(2, 1); c22 = CLUSTERMAC_LOAD(2, 2);
    c30 = CLUSTERMAC_LOAD(3, 0); c31 = CLUSTERMAC_LOAD(3, 1); c32 = CLUSTERMAC_LOAD(3, 2);
  }
  const float* vj = v + column;
  for (Eigen::Index j = 0; j < cols; ++j, vj += ldv) {
    const __m256 x0 = _mm256_loadu_ps(vj), x1 = _mm256_loadu_ps(vj + 8), x2 = _mm256_loadu_ps(vj + 16);
    __m256 w = _mm256_broadcast_ss(r0 + j);
    CLUSTERMAC_FMA(c00, w, x0); CLUSTERMAC_FMA(c01, w, x1); CLUSTERMAC_FMA(c02, w, x2);
    w = _mm256_broadcast_ss(r1 + j);
    CLUSTERMAC_FMA(c10, w, x0); CLUSTERMAC_FMA(c11, w, x1); CLUSTERMAC_FMA(c12, w, x2);
    w = _mm256_broadcast_ss(r2 + j);
    CLUSTERMAC_FMA(c20, w, x0); CLUSTERMAC_FMA(c21, w, x1); CLUSTERMAC_FMA(c22, w, x2);
    w = _mm256_broadcast_ss(r3 + j);
    CLUSTERMAC_FMA(c30, w, x0); CLUSTERMAC_FMA(c31, w, x1); CLUSTERMAC_FMA(c32, w, x2);
  }
  const __m256 results[4][3] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22}, {c30, c31, c32}};
  for (Eigen::Index r = 0; r < row_count; ++r)
    for (int q = 0; q < 3; ++q) _mm256_storeu_ps(out + (row + r) * ldo + column + 8 * q, results[r][q]);
}

CLUSTERMAC_TARGET_AVX2 inline void dense_times_block_tile_6x16(const ProductOperands& p, Eigen::Index column, Eigen::Index row,
                                                               Eigen::Index row_count) {
  const float* const a = p.a;
  const float* const v = p.v;
  float* const out = p.out;
  const Eigen::Index cols = p.cols, lda = p.lda, ldv = p.ldv, ldo = p.ldo;
  const float* r0 = a + row * lda;
  const float* r1 = a + (row + std::min<Eigen::Index>(1, row_count - 1)) * lda;
  const float* r2 = a + (row + std::min<Eigen::Index>(2, row_count - 1)) * lda;
  const float* r3 = a + (row + std::min<Eigen::Index>(3, row_count - 1)) * lda;
  const float* r4 = a + (row + std::min<Eigen::Index>(4, row_count - 1)) * lda;
  const float* r5 = a + (row + std::min<Eigen::Index>(5, row_count - 1)) * lda;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  if (p.accumulate) {
    c00 = CLUSTERMAC_LOAD(0, 0); c01 = CLUSTERMAC_LOAD(0, 1); c10 = CLUSTERMAC_LOAD(1, 0); c11 = CLUSTERMAC_LOAD(1, 1);
    c20 = CLUSTERMAC_LOAD(2, 0); c21 = CLUSTERMAC_LOAD(2, 1); c30 = CLUSTERMAC_LOAD(3, 0); c31 = CLUSTERMAC_LOAD(3, 1);
    c40 = CLUSTERMAC_LOAD(4, 0); c41 = CLUSTERMAC_LOAD(4, 1); c50 = CLUSTERMAC_LOAD(5, 0); c51 = CLUSTERMAC_LOAD(5, 1);
  }
  const float* vj = v + column;
  for (Eigen::Index j = 0; j < cols; ++j, vj += ldv) {
    const __m256 x0 = _mm256_loadu_ps(vj), x1 = _mm256_loadu_ps(vj + 8);
    __m256 w = _mm256_broadcast_ss(r0 + j);
    CLUSTERMAC_FMA(c00, w, x0); CLUSTERMAC_FMA(c01, w, x1);
    w = _mm256_broadcast_ss(r1 + j);
    CLUSTERMAC_FMA(c10, w, x0); CLUSTERMAC_FMA(c11, w, x1);
    w = _mm256_broadcast_ss(r2 + j);
    CLUSTERMAC_FMA(c20, w, x0); CLUSTERMAC_FMA(c21, w, x1);
    w = _mm256_broadcast_ss(r3 + j);
    CLUSTERMAC_FMA(c30, w, x0); CLUSTERMAC_FMA(c31, w, x1);
    w = _mm256_broadcast_ss(r4 + j);
    CLUSTERMAC_FMA(c40, w, x0); CLUSTERMAC_FMA(c41, w, x1);
    w = _mm256_broadcast_ss(r5 + j);
    CLUSTERMAC_FMA(c50, w, x0); CLUSTERMAC_FMA(c51, w, x1);
  }
  const __m256 results[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (Eigen::Index r = 0; r < row_count; ++r)
    for (int q = 0; q < 2; ++q) _mm256_storeu_ps(out + (row + r) * ldo + column + 8 * q, results[r][q]);
}

CLUSTERMAC_TARGET_AVX2 inline void dense_times_block_tile_8x8(const ProductOperands& p, Eigen::Index column, Eigen::Index row,
                                                              Eigen::Index row_count) {
  const float* const a = p.a;
  const float* const v = p.v;
  float* const out = p.out;
  const Eigen::Index cols = p.cols, lda = p.lda, ldv = p.ldv, ldo = p.ldo;
  const float* r[8];
  for (int i = 0; i < 8; ++i) r[i] = a + (row + std::min<Eigen::Index>(i, row_count - 1)) * lda;
  const float *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3], *r4 = r[4], *r5 = r[5], *r6 = r[6], *r7 = r[7];
  __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  if (p.accumulate) {
    c0 = CLUSTERMAC_LOAD(0, 0); c1 = CLUSTERMAC_LOAD(1, 0); c2 = CLUSTERMAC_LOAD(2, 0); c3 = CLUSTERMAC_LOAD(3, 0);
    c4 = CLUSTERMAC_LOAD(4, 0); c5 = CLUSTERMAC_LOAD(5, 0); c6 = CLUSTERMAC_LOAD(6, 0); c7 = CLUSTERMAC_LOAD(7, 0);
  }
  const float* vj = v + column;
  for (Eigen::Index j = 0; j < cols; ++j, vj += ldv) {
    const __m256 x = _mm256_loadu_ps(vj);
    CLUSTERMAC_FMA(c0, _mm256_broadcast_ss(r0 + j), x);
    CLUSTERMAC_FMA(c1, _mm256_broadcast_ss(r1 + j), x);
    CLUSTERMAC_FMA(c2, _mm256_broadcast_ss(r2 + j), x);
    CLUSTERMAC_FMA(c3, _mm256_broadcast_ss(r3 + j), x);
    CLUSTERMAC_FMA(c4, _mm256_broadcast_ss(r4 + j), x);
    CLUSTERMAC_FMA(c5, _mm256_broadcast_ss(r5 + j), x);
    CLUSTERMAC_FMA(c6, _mm256_broadcast_ss(r6 + j), x);
    CLUSTERMAC_FMA(c7, _mm256_broadcast_ss(r7 + j), x);
  }
  const __m256 results[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
  for (Eigen::Index i = 0; i < row_count; ++i) _mm256_storeu_ps(out + (row + i) * ldo + column, results[i]);
}
#undef CLUSTERMAC_FMA
#undef CLUSTERMAC_LOAD
// clang-format on

// out (rows x width) = a * v (or += with p.accumulate), width a multiple of 8. With
// `accumulate` the accumulators start from out: the same sums, in the same order, as one call
// over the concatenated columns of a / rows of v.
CLUSTERMAC_TARGET_AVX2 inline void dense_times_block_avx2(const ProductOperands& p, Eigen::Index rows,
                                                          Eigen::Index width) {
  Eigen::Index column = 0;
  for (; column + 24 <= width; column += 24)
    for (Eigen::Index row = 0; row < rows; row += 4)
      dense_times_block_tile_4x24(p, column, row, std::min<Eigen::Index>(4, rows - row));
  if (column + 16 <= width) {
    for (Eigen::Index row = 0; row < rows; row += 6)
      dense_times_block_tile_6x16(p, column, row, std::min<Eigen::Index>(6, rows - row));
    column += 16;
  }
  if (column < width)
    for (Eigen::Index row = 0; row < rows; row += 8)
      dense_times_block_tile_8x8(p, column, row, std::min<Eigen::Index>(8, rows - row));
}

// The same products with AVX-512 registers (16 lanes), for CPUs whose AVX-512 units do twice
// AVX2's multiply-adds per cycle (Intel server cores, AMD Zen 5). Bit-identical to the AVX2
// kernel: every output is the same chain of fused multiply-adds over j = 0, 1, ... (starting
// from 0, or from `out` with `accumulate`); only more outputs are computed at once. A tile is
// R rows x (16 Z + 8 Y) columns: Z zmm and Y (0 or 1) ymm accumulators per row, at most 24 in all.
template <int R, int Z, int Y>
CLUSTERMAC_TARGET_AVX512_FMA inline void dense_times_block_tile_avx512(const ProductOperands& p, Eigen::Index column,
                                                                       Eigen::Index row, Eigen::Index row_count) {
  static_assert(R * (Z + Y) <= 24 && Y <= 1 && Z + Y >= 1, "a tile keeps at most 24 accumulators in registers");
  const float* rows[R];
  float* outs[R];
  for (int i = 0; i < R; ++i) {
    const Eigen::Index r = row + std::min<Eigen::Index>(i, row_count - 1);
    rows[i] = p.a + r * p.lda;
    outs[i] = p.out + r * p.ldo + column;
  }
  __m512 wide[R][Z > 0 ? Z : 1];
  __m256 narrow[R];
#pragma GCC unroll 32
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
    for (int z = 0; z < Z; ++z) wide[i][z] = p.accumulate ? _mm512_loadu_ps(outs[i] + 16 * z) : _mm512_setzero_ps();
    if (Y) narrow[i] = p.accumulate ? _mm256_loadu_ps(outs[i] + 16 * Z) : _mm256_setzero_ps();
  }
  const float* vj = p.v + column;
  for (Eigen::Index j = 0; j < p.cols; ++j, vj += p.ldv) {
    __m512 x[Z > 0 ? Z : 1];
#pragma GCC unroll 4
    for (int z = 0; z < Z; ++z) x[z] = _mm512_loadu_ps(vj + 16 * z);
    const __m256 y = Y ? _mm256_loadu_ps(vj + 16 * Z) : _mm256_setzero_ps();
#pragma GCC unroll 32
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
      for (int z = 0; z < Z; ++z) wide[i][z] = _mm512_fmadd_ps(_mm512_set1_ps(rows[i][j]), x[z], wide[i][z]);
      if (Y) narrow[i] = _mm256_fmadd_ps(_mm256_set1_ps(rows[i][j]), y, narrow[i]);
    }
  }
  for (int i = 0; i < R && i < row_count; ++i) {
    for (int z = 0; z < Z; ++z) _mm512_storeu_ps(outs[i] + 16 * z, wide[i][z]);
    if (Y) _mm256_storeu_ps(outs[i] + 16 * Z, narrow[i]);
  }
}

template <int R, int Z, int Y>
CLUSTERMAC_TARGET_AVX512_FMA inline void dense_times_block_rows_avx512(const ProductOperands& p, Eigen::Index column,
                                                                       Eigen::Index rows) {
  for (Eigen::Index row = 0; row < rows; row += R)
    dense_times_block_tile_avx512<R, Z, Y>(p, column, row, std::min<Eigen::Index>(R, rows - row));
}

// dense_times_block_avx2 with AVX-512 tiles: 48 columns at a time, then the rest (8 to 40).
CLUSTERMAC_TARGET_AVX512_FMA inline void dense_times_block_avx512(const ProductOperands& p, Eigen::Index rows,
                                                                  Eigen::Index width) {
  Eigen::Index column = 0;
  for (; column + 48 <= width; column += 48) dense_times_block_rows_avx512<8, 3, 0>(p, column, rows);
  switch (width - column) {
    case 40:
      dense_times_block_rows_avx512<8, 2, 1>(p, column, rows);
      break;
    case 32:
      dense_times_block_rows_avx512<12, 2, 0>(p, column, rows);
      break;
    case 24:
      dense_times_block_rows_avx512<8, 1, 1>(p, column, rows);
      break;
    case 16:
      dense_times_block_rows_avx512<8, 1, 0>(p, column, rows);
      break;
    case 8:
      dense_times_block_rows_avx512<8, 0, 1>(p, column, rows);
      break;
    default:
      break;
  }
}

// Whether the AVX-512 tiles are faster than the AVX2 ones on this CPU (avx512_measured_faster on a
// 512 x 512 by 24-column product, the NCut operator's shape; measured once per process).
inline bool dense_products_use_avx512() {
  static const bool faster = [] {
    constexpr Eigen::Index n = 512, width = 24;
    std::vector<float> a(n * n), v(n * width), out(n * width);
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>((i * 7919) % 1009) * 1e-3f;
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>((i * 104729) % 997) * 1e-3f;
    const ProductOperands p{a.data(), n, n, v.data(), width, out.data(), width, false};
    return avx512_measured_faster([&](SimdLevel level) {
      if (level == kSimdAvx512)
        dense_times_block_avx512(p, n, width);
      else
        dense_times_block_avx2(p, n, width);
    });
  }();
  return faster;
}

// out (rows x width) = a * v (or += with p.accumulate), width a multiple of 8, on a CPU with at
// least AVX2: the AVX-512 tiles where they measured faster (the same bits as the AVX2 ones).
inline void dense_times_block(const ProductOperands& p, Eigen::Index rows, Eigen::Index width) {
  if (dense_products_use_avx512())
    dense_times_block_avx512(p, rows, width);
  else
    dense_times_block_avx2(p, rows, width);
}
#endif

// A leading dimension (distance between rows, in floats) for rows of n floats that avoids
// cache-set conflicts: n rounded up to a 64-byte line, plus 64 floats when that is a multiple
// of 1 KB (rows exactly 1 KB apart all map to the same L1 sets).
inline Eigen::Index padded_leading_dimension(Eigen::Index n) {
  const Eigen::Index lines = (n + 15) / 16 * 16;
  return lines % 256 == 0 ? lines + 64 : lines;
}

// A rows x cols row-major array whose rows are lda floats apart, for Eigen.
inline Eigen::Map<const MatrixRM, 0, Eigen::OuterStride<>> strided_rows(const float* m, Eigen::Index rows,
                                                                        Eigen::Index cols, Eigen::Index lda) {
  return {m, rows, cols, Eigen::OuterStride<>(lda)};
}

// result (rows x b, column-major) = m * b_in, m a rows x cols row-major array (rows lda floats
// apart; lda < 0: cols), b_in cols x b.
inline void rowmajor_times(const float* m, Eigen::Index rows, Eigen::Index cols, const Eigen::MatrixXf& b_in,
                           Eigen::MatrixXf& result, Eigen::Index lda = -1) {
  if (lda < 0) lda = cols;
#ifdef CLUSTERMAC_SIMD_X86
  if (simd_at_least(kSimdAvx2)) {
    const Eigen::Index b = b_in.cols();
    const Eigen::Index width = (b + 7) / 8 * 8;
    MatrixRM packed = MatrixRM::Zero(cols, width);
    packed.leftCols(b) = b_in;
    MatrixRM product(rows, width);
    dense_times_block(ProductOperands{m, lda, cols, packed.data(), width, product.data(), width, false}, rows, width);
    result = product.leftCols(b);
    return;
  }
#endif
  result.noalias() = strided_rows(m, rows, cols, lda) * b_in;
}

// result (cols x b, column-major) = m^T * b_in, m a rows x cols row-major array (rows lda floats
// apart; lda < 0: cols), b_in rows x b.
// As result^T (b x cols, row-major) = b_in^T (b x rows: b_in's column-major storage) * m.
inline void rowmajor_transpose_times(const float* m, Eigen::Index rows, Eigen::Index cols, const Eigen::MatrixXf& b_in,
                                     Eigen::MatrixXf& result, Eigen::Index lda = -1) {
  if (lda < 0) lda = cols;
#ifdef CLUSTERMAC_SIMD_X86
  if (simd_at_least(kSimdAvx2)) {
    const Eigen::Index b = b_in.cols();
    result.resize(cols, b);
    const Eigen::Index width = cols / 8 * 8;
    // result's column-major storage is result^T row-major with stride cols.
    // Blocks of 128 rows, so that each strip of columns stays in the L2 cache. The kernel
    // accumulates block after block in the order of one sweep, so the result is bit-identical to
    // the unblocked one (and to rowmajor_times on the transposed layout).
    constexpr Eigen::Index row_block = 128;
    for (Eigen::Index first = 0; width > 0 && first < rows; first += row_block) {
      const Eigen::Index count = std::min(row_block, rows - first);
      const MatrixRM packed = b_in.middleRows(first, count).transpose();  // b x count, contiguous
      dense_times_block(
          ProductOperands{packed.data(), count, count, m + first * lda, lda, result.data(), cols, first > 0}, b, width);
    }
    if (width < cols)
      result.bottomRows(cols - width).noalias() =
          strided_rows(m, rows, cols, lda).rightCols(cols - width).transpose() * b_in;
    return;
  }
#endif
  result.noalias() = strided_rows(m, rows, cols, lda).transpose() * b_in;
}

}  // namespace detail
}  // namespace clustermac
