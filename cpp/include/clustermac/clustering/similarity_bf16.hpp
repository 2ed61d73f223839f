// The NCut similarity stored in bfloat16, and its block product with VDPBF16PS (AVX-512 BF16).
//
// Why: the eigensolver's products with the N x N similarity are most of cluster_feature_map's
// cost; VDPBF16PS does twice the multiply-adds per cycle of FP32 FMA and bf16 halves the memory
// traffic. bf16 keeps 8 significant bits: a product's relative error (~2e-3) is below the
// eigensolver's stopping residual of 1e-2 (ncut.hpp). Used when simd_has_avx512_bf16().
#pragma once

#include <Eigen/Dense>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "clustermac/common.hpp"
#include "clustermac/linalg/dense_kernels.hpp"
#include "clustermac/simd.hpp"

namespace clustermac {

// How cluster_feature_map stores the N x N similarity for the eigensolver (similarity_bf16.hpp).
// A fixed rule, never the CPU's flags: float32 unless bfloat16 is asked for, because the two give
// different partitions (and so different descriptors) and a choice made from the CPU would make
// the same image give different descriptors on different machines. bfloat16 is recorded in the
// settings that travel with the files (Extractor(similarity_precision=...)); on the machines
// measured it is not even reliably faster (README, "Similarity precision and clustering speed").
enum class SimilarityPrecision { float32, bfloat16 };

inline SimilarityPrecision parse_similarity_precision(const std::string& name) {
  if (name == "float32") return SimilarityPrecision::float32;
  if (name == "bfloat16") return SimilarityPrecision::bfloat16;
  if (name == "auto")
    fail(
        "similarity_precision: \"auto\" was removed (it chose bfloat16 from the CPU's flags, which changed "
        "the partitions from one CPU to another); pass \"float32\" (the default) or \"bfloat16\"");
  fail("similarity_precision: expected \"float32\" or \"bfloat16\", got \"" + name + "\"");
}

// An n x n similarity, row-major bf16 bits with rows ld (even) values apart; columns
// [n, ld) are zero.
struct SimilarityBf16 {
  Eigen::Index n = 0, ld = 0;
  std::vector<std::uint16_t> values;

  // Keeps the allocation; zeroes only the padding columns.
  void resize(Eigen::Index size) {
    n = size;
    ld = detail::padded_leading_dimension(size);  // a multiple of 16
    values.resize(static_cast<std::size_t>(n * ld));
    for (Eigen::Index i = 0; i < n; ++i) std::fill(row(i) + n, row(i) + ld, std::uint16_t{0});
  }
  std::uint16_t* row(Eigen::Index i) { return values.data() + i * ld; }
  const std::uint16_t* row(Eigen::Index i) const { return values.data() + i * ld; }
};

// float -> bf16 rounded to the nearest (ties to even); finite input.
inline std::uint16_t bf16_from_float(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(bits >> 16);
}

inline float float_from_bf16(std::uint16_t h) {
  const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

namespace detail {

#ifdef CLUSTERMAC_SIMD_X86
// 8 floats -> 8 bf16 (round to nearest, ties to even), with AVX2 integer operations.
CLUSTERMAC_TARGET_AVX2 inline __m128i bf16_from_floats_avx2(__m256 x) {
  __m256i bits = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  // Pack the 32-bit lanes to 16 bits (within each 128-bit half), then join the halves.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
  return _mm256_castsi256_si128(packed);
}

// out (rows x W, row-major, W = 16 Z + 8 Y) = S rows [row, row + row_count) times the columns
// whose bf16 pairs are `pairs`: pairs[(j / 2) * W + c] holds V[j][c] (low half) and
// V[j + 1][c] (high half), so that VDPBF16PS against a broadcast of S[i][j], S[i][j + 1] adds
// both terms. R rows at a time, R (Z + Y) accumulators.
template <int R, int Z, int Y>
CLUSTERMAC_TARGET_AVX512_BF16 inline void bf16_tile(const SimilarityBf16& s, const std::uint32_t* pairs,
                                                    Eigen::Index row, Eigen::Index row_count, float* out) {
  constexpr int W = 16 * Z + 8 * Y;
  __m512 wide[R][Z > 0 ? Z : 1];
  __m256 narrow[R];
  const std::uint16_t* rows[R];
  for (int r = 0; r < R; ++r) {
    for (int z = 0; z < Z; ++z) wide[r][z] = _mm512_setzero_ps();
    narrow[r] = _mm256_setzero_ps();
    rows[r] = s.row(row + std::min<Eigen::Index>(r, row_count - 1));
  }
  const Eigen::Index pair_count = (s.n + 1) / 2;  // an odd n's last pair ends in a zero padding column
  for (Eigen::Index jp = 0; jp < pair_count; ++jp) {
    const std::uint32_t* v = pairs + jp * W;
    __m512bh v_wide[Z > 0 ? Z : 1];
    __m256bh v_narrow{};
    for (int z = 0; z < Z; ++z) v_wide[z] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(v + 16 * z));
    if (Y) v_narrow = reinterpret_cast<__m256bh>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * Z)));
    for (int r = 0; r < R; ++r) {
      std::uint32_t pair;
      std::memcpy(&pair, rows[r] + 2 * jp, 4);
      const __m512i a = _mm512_set1_epi32(static_cast<int>(pair));
      for (int z = 0; z < Z; ++z) wide[r][z] = _mm512_dpbf16_ps(wide[r][z], reinterpret_cast<__m512bh>(a), v_wide[z]);
      if (Y) narrow[r] = _mm256_dpbf16_ps(narrow[r], reinterpret_cast<__m256bh>(_mm512_castsi512_si256(a)), v_narrow);
    }
  }
  for (int r = 0; r < R && r < row_count; ++r) {
    for (int z = 0; z < Z; ++z) _mm512_storeu_ps(out + (row + r) * W + 16 * z, wide[r][z]);
    if (Y) _mm256_storeu_ps(out + (row + r) * W + 16 * Z, narrow[r]);
  }
}

template <int R, int Z, int Y>
inline void bf16_times_pairs(const SimilarityBf16& s, const std::uint32_t* pairs, float* out) {
  for (Eigen::Index row = 0; row < s.n; row += R)
    bf16_tile<R, Z, Y>(s, pairs, row, std::min<Eigen::Index>(R, s.n - row), out);
}
#endif

}  // namespace detail

// result (n x b, column-major) = S * (scale .* v). Columns go in groups of 24, 16 or 8 (one
// sweep over S each), as bf16 pairs; b is padded to a multiple of 8 with zero columns.
// Needs simd_has_avx512_bf16().
inline void bf16_similarity_times_block(const SimilarityBf16& s, const Eigen::VectorXf& scale, const Eigen::MatrixXf& v,
                                        Eigen::MatrixXf& result) {
  using Eigen::Index;
  const Index n = s.n, b = v.cols();
  require(simd_has_avx512_bf16(), "bf16 similarity product: the CPU lacks AVX512-BF16");
  result.resize(n, b);
#ifdef CLUSTERMAC_SIMD_X86
  const Index pair_count = (n + 1) / 2;
  std::vector<std::uint32_t> pairs;
  std::vector<float> product;
  for (Index first = 0; first < b; first += 24) {
    const Index group = std::min<Index>(24, (b - first + 7) / 8 * 8), used = std::min(group, b - first);
    // scale .* v for this group, row-major and padded with zero rows and columns, so that each
    // pair of rows becomes `group` contiguous pairs.
    MatrixRM scaled = MatrixRM::Zero(2 * pair_count, group);
    scaled.topLeftCorner(n, used) = scale.asDiagonal() * v.middleCols(first, used);
    pairs.resize(static_cast<std::size_t>(pair_count * group));
    for (Index jp = 0; jp < pair_count; ++jp)
      for (Index c = 0; c < group; ++c)
        pairs[static_cast<std::size_t>(jp * group + c)] =
            static_cast<std::uint32_t>(bf16_from_float(scaled(2 * jp, c))) |
            (static_cast<std::uint32_t>(bf16_from_float(scaled(2 * jp + 1, c))) << 16);
    product.resize(static_cast<std::size_t>(n * group));
    if (group == 24)
      detail::bf16_times_pairs<8, 1, 1>(s, pairs.data(), product.data());
    else if (group == 16)
      detail::bf16_times_pairs<12, 1, 0>(s, pairs.data(), product.data());
    else
      detail::bf16_times_pairs<12, 0, 1>(s, pairs.data(), product.data());
    result.middleCols(first, used) = Eigen::Map<const MatrixRM>(product.data(), n, group).leftCols(used);
  }
#else
  (void)scale;
  (void)v;
#endif
}

// A float similarity rounded to bf16, its diagonal zeroed when `zero_diagonal`.
inline SimilarityBf16 bf16_similarity(const Eigen::Ref<const MatrixRM>& s, bool zero_diagonal) {
  SimilarityBf16 out;
  out.resize(s.rows());
  for (Eigen::Index i = 0; i < out.n; ++i)
    for (Eigen::Index j = 0; j < out.n; ++j) out.row(i)[j] = zero_diagonal && i == j ? 0 : bf16_from_float(s(i, j));
  return out;
}

namespace detail {
#ifdef CLUSTERMAC_SIMD_X86
// Sum of the first `count` (a multiple of 8) bf16 values at `row`, in 8 float lanes.
CLUSTERMAC_TARGET_AVX2 inline float bf16_sum_avx2(const std::uint16_t* row, Eigen::Index count) {
  __m256 total = _mm256_setzero_ps();
  for (Eigen::Index j = 0; j < count; j += 8) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j));
    total = _mm256_add_ps(total, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16)));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, total);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}
#endif
}  // namespace detail

// Row sums of S (the NCut degrees); the padding columns are zero and add nothing.
inline Eigen::VectorXd bf16_row_sums(const SimilarityBf16& s) {
  Eigen::VectorXd sums(s.n);
  for (Eigen::Index i = 0; i < s.n; ++i) {
#ifdef CLUSTERMAC_SIMD_X86
    sums(i) = detail::bf16_sum_avx2(s.row(i), s.ld);
#else
    float total = 0.0f;
    for (Eigen::Index j = 0; j < s.n; ++j) total += float_from_bf16(s.row(i)[j]);
    sums(i) = total;
#endif
  }
  return sums;
}

}  // namespace clustermac
