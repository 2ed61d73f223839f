// The bf16 path of the exact top-k search (topk.hpp): a bfloat16 candidate scan with AVX512-BF16
// (vdpbf16ps: twice the multiply-adds of a float32 FMA per instruction), then an exact float32
// re-score of the candidates with the float32 path's own kernel. It returns the float32 path's
// results bit for bit: same scores, same indices, same tie rule, same errors.
//
// Why the candidates hold the exact top k (u = 2^-24, γ = (D'+8)·u / (1 − (D'+8)·u), D' = D
// rounded up to even: no sum below has more than D' + 8 additions in a row). For a query q and a row x, let q̃, x̃ be
// their bf16 roundings, s = the float32 path's score fl32(q·x) and a = the bf16 scan's score fl(q̃·x̃) (vdpbf16ps: exact
// bf16 products, float32 sums). Then
//   |q·x − q̃·x̃| = |q·(x − x̃) + (q − q̃)·x̃| ≤ ‖q‖·‖x − x̃‖ + ‖q − q̃‖·‖x̃‖       (Cauchy–Schwarz)
//   |a − q̃·x̃|  ≤ γ·‖q̃‖·‖x̃‖ + τ,  |s − q·x| ≤ γ·‖q‖·‖x‖ + τ        (Higham, dot products)
// where τ covers denormals flushed to zero (vdpbf16ps flushes its products and sums; a float32
// path under FTZ/DAZ would too): τ ≤ 2^-120·(√D·(‖q‖ + ‖q̃‖ + ‖x̃‖ + ‖x − x̃‖) + D).
// With ‖x‖ ≤ ‖x̃‖ + ‖x − x̃‖, |a − s| ≤ ε(q, x) = α_q·‖x − x̃‖ + β_q·‖x̃‖ + c_q (bound_coefficients;
// every norm is an upper bound, rounded up, and the coefficients carry the rounding of the
// float32 arithmetic that evaluates a ± ε). Why keeping the rows with a + ε ≥ L and re-scoring
// them gives the exact top k, and what is outside the bound's reach: topk_candidates.hpp.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "clustermac/search/topk_candidates.hpp"

namespace clustermac {
namespace detail {

// ε(q, x) = alpha·‖x − x̃‖ + beta·‖x̃‖ + constant for one query (see the proof above), with the
// rounding of the float32 evaluation of a ± ε folded in: the coefficients are inflated by
// 2^-19 > the relative error of two FMAs plus 1/(1 − u), and beta carries u·|a| ≤ u·(1+γ)·‖q̃‖·‖x̃‖.
// rounded, residual: upper bounds of ‖q̃‖ and ‖q − q̃‖; query_norm: of ‖q‖.
inline BoundCoefficients bound_coefficients(double rounded, double residual, double query_norm, std::ptrdiff_t dim) {
  const double padded = static_cast<double>((dim + 1) / 2 * 2) + 8.0;
  const double gamma = padded * 0x1p-24 / (1.0 - padded * 0x1p-24);
  const double tiny = 0x1p-120 * std::sqrt(static_cast<double>(dim));
  const double alpha = query_norm * (1.0 + gamma) + tiny;
  const double beta = residual + gamma * (rounded + query_norm) + tiny + 0x1p-24 * (1.0 + gamma) * rounded;
  const double constant = tiny * (query_norm + rounded) + 0x1p-120 * static_cast<double>(dim);
  const double inflate = (1.0 + 0x1p-19) * (1.0 + 0x1p-22);  // then float rounding (≤ 2^-24)
  return {static_cast<float>(alpha * inflate), static_cast<float>(beta * inflate),
          static_cast<float>(constant * inflate)};
}

#ifdef CLUSTERMAC_SIMD_X86

// The bf16 rounding (round to nearest even; denormals become 0) of v[0 .. n), n <= 32, as 16
// words of pairs (element 2p in the low half of word p; zeros past n), adding the squares of v̄
// and of v − v̄ (exact) to the sums and clearing `finite` lanes where v has a NaN or infinity.
CLUSTERMAC_TARGET_AVX512_BF16 inline __m512i round_chunk_to_bf16(const float* v, std::ptrdiff_t n, __m512& rounded_sum,
                                                                 __m512& residual_sum, __mmask16& finite) {
  const __mmask16 low = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
  const __mmask16 high = n >= 32 ? 0xFFFF : n > 16 ? static_cast<__mmask16>((1u << (n - 16)) - 1) : 0;
  const __m512 halves[2] = {_mm512_maskz_loadu_ps(low, v), _mm512_maskz_loadu_ps(high, v + 16)};
  __m256i bits[2];
  for (int h = 0; h < 2; ++h) {
    const __m512 x = halves[h];
    finite &= _mm512_cmp_ps_mask(_mm512_sub_ps(x, x), _mm512_setzero_ps(), _CMP_EQ_OQ);
    bits[h] = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
    const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits[h]), 16));
    const __m512 residual = _mm512_sub_ps(x, back);
    rounded_sum = _mm512_fmadd_ps(back, back, rounded_sum);
    residual_sum = _mm512_fmadd_ps(residual, residual, residual_sum);
  }
  return _mm512_inserti64x4(_mm512_castsi256_si512(bits[0]), bits[1], 1);
}

// The bf16 rounding of `dim` floats written as (dim + 1) / 2 pair words to out[p·stride], and the
// float32 sums of squares of v̄ and v − v̄. Returns false if v has a NaN or an infinity.
CLUSTERMAC_TARGET_AVX512_BF16 inline bool round_to_bf16_pairs(const float* v, std::ptrdiff_t dim, std::uint32_t* out,
                                                              std::ptrdiff_t stride, float& rounded_squares,
                                                              float& residual_squares) {
  __m512 rounded_sum = _mm512_setzero_ps(), residual_sum = _mm512_setzero_ps();
  __mmask16 finite = 0xFFFF;
  alignas(64) std::uint32_t words[16];
  for (std::ptrdiff_t d0 = 0; d0 < dim; d0 += 32) {
    const std::ptrdiff_t n = std::min<std::ptrdiff_t>(32, dim - d0);
    _mm512_store_si512(words, round_chunk_to_bf16(v + d0, n, rounded_sum, residual_sum, finite));
    for (std::ptrdiff_t p = 0; p < (n + 1) / 2; ++p) out[(d0 / 2 + p) * stride] = words[p];
  }
  rounded_squares = _mm512_reduce_add_ps(rounded_sum);
  residual_squares = _mm512_reduce_add_ps(residual_sum);
  return finite == 0xFFFF;
}

// Few queries: each row is rounded and scored in registers, with no transposed block (whose
// scattered writes cost more than the scores when there is little to score). Writes the Queries
// approximate scores of the row to approx[t·width] and the sums of squares as above.
template <int Queries>
CLUSTERMAC_TARGET_AVX512_BF16 inline bool score_row_bf16(const float* v, std::ptrdiff_t dim,
                                                         const std::uint32_t* query_pairs, std::ptrdiff_t pairs,
                                                         float* approx, std::ptrdiff_t width, float& rounded_squares,
                                                         float& residual_squares) {
  __m512 rounded_sum = _mm512_setzero_ps(), residual_sum = _mm512_setzero_ps();
  __mmask16 finite = 0xFFFF;
  __m512 acc[Queries];
  for (int t = 0; t < Queries; ++t) acc[t] = _mm512_setzero_ps();
  for (std::ptrdiff_t d0 = 0; d0 < dim; d0 += 32) {
    const std::ptrdiff_t n = std::min<std::ptrdiff_t>(32, dim - d0), n_pairs = (n + 1) / 2;
    const __m512bh x = reinterpret_cast<__m512bh>(round_chunk_to_bf16(v + d0, n, rounded_sum, residual_sum, finite));
    const __mmask16 words = n_pairs >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n_pairs) - 1);
    for (int t = 0; t < Queries; ++t) {
      const __m512i q = _mm512_maskz_loadu_epi32(words, query_pairs + t * pairs + d0 / 2);
      acc[t] = _mm512_dpbf16_ps(acc[t], reinterpret_cast<__m512bh>(q), x);
    }
  }
  for (int t = 0; t < Queries; ++t) approx[t * width] = _mm512_reduce_add_ps(acc[t]);
  rounded_squares = _mm512_reduce_add_ps(rounded_sum);
  residual_squares = _mm512_reduce_add_ps(residual_sum);
  return finite == 0xFFFF;
}

// score_row_bf16 for 1 .. kRowScanQueries queries.
template <std::size_t... Counts>
constexpr auto row_scorers(std::index_sequence<Counts...>) {
  using Scorer = bool (*)(const float*, std::ptrdiff_t, const std::uint32_t*, std::ptrdiff_t, float*, std::ptrdiff_t,
                          float&, float&);
  return std::array<Scorer, sizeof...(Counts)>{&score_row_bf16<static_cast<int>(Counts) + 1>...};
}
inline bool score_row_bf16(std::ptrdiff_t n_queries, const float* v, std::ptrdiff_t dim,
                           const std::uint32_t* query_pairs, std::ptrdiff_t pairs, float* approx, std::ptrdiff_t width,
                           float& rounded_squares, float& residual_squares) {
  static constexpr auto scorers = row_scorers(std::make_index_sequence<kRowScanQueries>());
  return scorers[n_queries - 1](v, dim, query_pairs, pairs, approx, width, rounded_squares, residual_squares);
}

// Approximate scores (padded_queries × width) = queries (padded_queries × pairs, bf16 pairs) ·
// block (pairs × width, bf16 pairs); the float32 kernel's tiling: kQueryTile queries × 32 columns.
CLUSTERMAC_TARGET_AVX512_BF16 inline void score_block_bf16(const std::uint32_t* queries, std::ptrdiff_t padded_queries,
                                                           std::ptrdiff_t pairs, const std::uint32_t* block,
                                                           std::ptrdiff_t width, float* scores) {
  for (std::ptrdiff_t j = 0; j < width; j += 32)
    for (std::ptrdiff_t i = 0; i < padded_queries; i += kQueryTile) {
      __m512 acc[kQueryTile][2];
      for (int t = 0; t < kQueryTile; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
      const std::uint32_t* q = queries + i * pairs;
      for (std::ptrdiff_t p = 0; p < pairs; ++p) {
        const __m512bh x0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(block + p * width + j));
        const __m512bh x1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(block + p * width + j + 16));
        for (int t = 0; t < kQueryTile; ++t) {
          const __m512bh qt = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(q[t * pairs + p])));
          acc[t][0] = _mm512_dpbf16_ps(acc[t][0], qt, x0);
          acc[t][1] = _mm512_dpbf16_ps(acc[t][1], qt, x1);
        }
      }
      for (int t = 0; t < kQueryTile; ++t) {
        _mm512_storeu_ps(scores + (i + t) * width + j, acc[t][0]);
        _mm512_storeu_ps(scores + (i + t) * width + j + 16, acc[t][1]);
      }
    }
}

// The bf16 scan of topk_search_chunk_candidates: approximate scores fl(q̃·x̃) and the norms
// ‖x − x̃‖ (alpha), ‖x̃‖ (beta) of each row. Up to kRowScanQueries queries, each row is rounded and
// scored in registers, prefetching a few rows ahead; with more, the rows are rounded into a
// row-major buffer, transposed a few columns at a time and scored by register tiles.
struct Bf16Scan {
  std::ptrdiff_t n_queries, dim, pairs, padded_queries;
  std::vector<std::uint32_t> query_pairs;  // padded_queries × pairs
  std::vector<BoundCoefficients> coefficients;
  bool in_reach = true;

  Bf16Scan(const float* /*database*/, const float* queries, std::ptrdiff_t n_queries_, std::ptrdiff_t dim_)
      : n_queries(n_queries_),
        dim(dim_),
        pairs((dim_ + 1) / 2),
        padded_queries((n_queries_ + kQueryTile - 1) / kQueryTile * kQueryTile),
        query_pairs(padded_queries * pairs, 0u),
        coefficients(n_queries_) {
    for (std::ptrdiff_t q = 0; q < n_queries && in_reach; ++q) {
      const double query_norm = norm_upper_bound(queries + q * dim, dim);
      in_reach = query_norm < kMaxBoundedNorm;
      float rounded_squares, residual_squares;
      round_to_bf16_pairs(queries + q * dim, dim, query_pairs.data() + q * pairs, 1, rounded_squares, residual_squares);
      coefficients[q] = bound_coefficients(norm_upper_bound(rounded_squares, dim),
                                           norm_upper_bound(residual_squares, dim), query_norm, dim);
    }
  }

  struct Buffers {
    std::vector<std::uint32_t> block, row_pairs;
    explicit Buffers(const Bf16Scan& scan)
        : block(scan.pairs * padded_width(kBlockRows)), row_pairs(kBlockRows * scan.pairs) {}
  };

  void score_block(const float* database, std::ptrdiff_t n_database, std::ptrdiff_t row0, std::ptrdiff_t rows,
                   std::ptrdiff_t width, Buffers& buffers, float* approx, float* residual_norms,
                   float* rounded_norms) const {
    const bool by_rows = n_queries <= kRowScanQueries;
    for (std::ptrdiff_t r = 0; r < rows; ++r) {
      float rounded_squares, residual_squares;
      const float* row = database + (row0 + r) * dim;
      if (by_rows && row0 + r + kPrefetchRows < n_database)  // the row scan reads too little per row for the prefetcher
        for (std::ptrdiff_t d = 0; d < dim; d += 16) __builtin_prefetch(row + kPrefetchRows * dim + d);
      const bool finite = by_rows ? score_row_bf16(n_queries, row, dim, query_pairs.data(), pairs, approx + r, width,
                                                   rounded_squares, residual_squares)
                                  : round_to_bf16_pairs(row, dim, buffers.row_pairs.data() + r * pairs, 1,
                                                        rounded_squares, residual_squares);
      if (!finite)
        fail("database: row " + std::to_string(row0 + r) + " contains NaN or Inf; expected only finite numbers");
      rounded_norms[r] = norm_upper_bound(rounded_squares, dim);
      residual_norms[r] = norm_upper_bound(residual_squares, dim);
      if (!(static_cast<double>(rounded_norms[r]) + residual_norms[r] < kMaxBoundedNorm)) {
        // Never pruned: approximate score 0 and ε = +∞ (residual 0: no ∞·0 in ε).
        for (std::ptrdiff_t p = 0; p < pairs && !by_rows; ++p) buffers.row_pairs[r * pairs + p] = 0u;
        for (std::ptrdiff_t q = 0; q < n_queries && by_rows; ++q) approx[q * width + r] = 0.0f;
        rounded_norms[r] = std::numeric_limits<float>::infinity();
        residual_norms[r] = 0.0f;
      }
    }
    if (!by_rows) {
      transpose_rows(buffers.row_pairs.data(), rows, pairs, width, buffers.block.data());  // sequential writes
      score_block_bf16(query_pairs.data(), padded_queries, pairs, buffers.block.data(), width, approx);
    }
  }
};

#endif  // CLUSTERMAC_SIMD_X86

// One chunk of queries against the whole database on the bf16 path (needs simd_has_avx512_bf16());
// results go to rows first_row.. of `result`, identical to topk_search_chunk's. Adds the number
// of candidates re-scored in float32 to *candidates_rescored; returns false if the chunk ran on
// the float32 path instead (a query norm beyond the bound's reach, or no x86 SIMD build).
inline bool topk_search_chunk_bf16(const float* database, std::ptrdiff_t n_database, const float* queries,
                                   std::ptrdiff_t n_queries, std::ptrdiff_t dim, std::ptrdiff_t k,
                                   std::int64_t n_threads, SearchResult& result, std::ptrdiff_t first_row,
                                   std::int64_t* candidates_rescored) {
#ifdef CLUSTERMAC_SIMD_X86
  return topk_search_chunk_candidates<Bf16Scan>(database, n_database, queries, n_queries, dim, k, n_threads, result,
                                                first_row, candidates_rescored);
#else
  (void)candidates_rescored;
  topk_search_chunk(database, n_database, queries, n_queries, dim, k, n_threads, result, first_row);
  return false;
#endif
}

}  // namespace detail
}  // namespace clustermac
