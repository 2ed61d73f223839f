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
// float32 arithmetic that evaluates a ± ε). So lower = a − ε ≤ s ≤ upper = a + ε for every row.
// Let L be the k-th largest lower bound of any k rows (−∞ before k are seen): at least k rows
// have s ≥ L, so the k-th best exact score s_k ≥ L. Every row of the exact top k (and every row
// tied with s_k, whatever its index) has upper ≥ s ≥ s_k ≥ L: keeping the rows with upper ≥ L
// keeps them all. L only grows while scanning, so a row dropped against an earlier L would be
// dropped against the final one too. Re-scoring the candidates with the float32 path's kernel
// gives each its exact s (a column's score does not depend on its neighbours in the block), and
// the top k of the candidates by (score descending, index ascending) is the top k of all rows.
//
// Outside the bound's reach: a row whose norm bound is ≥ 2^50 is never pruned (its bf16 columns
// are zero and its ε is +∞, so it is re-scored exactly, overflow and NaN included); a chunk with
// a query of norm ≥ 2^50 runs on the float32 path. A query's pending candidates are pruned
// against the current L when they reach 2k + 2048, and re-scored at once if k + 1024 remain
// (their exact scores join the query's top k as the float32 path's would). When the candidates
// of a thread's share grow past 1/8 of its scores plus 2k + 1024 per query (many ties,
// duplicates), the rest of that share is scanned in float32 (exact scores need no candidates).
// None of this changes the results, only the time.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "clustermac/search/topk_float32.hpp"

namespace clustermac {
namespace detail {

constexpr double kMaxBoundedNorm = 0x1p50;   // larger norms are not pruned (see above)
constexpr std::ptrdiff_t kPrefetchRows = 8;  // rows ahead that the row scan prefetches

// Upper bound of √(Σ t²) from its float32 evaluation `sum` over `terms` squares (any order,
// FMA or not: relative error ≤ γ_terms; squares flushed to zero: ≤ 2^-126 each), rounded up to float.
inline float norm_upper_bound(float sum, std::ptrdiff_t terms) {
  const double n = static_cast<double>(terms) + 8.0;
  const double gamma = n * 0x1p-24 / (1.0 - n * 0x1p-24);
  const double bound = std::sqrt((static_cast<double>(sum) + n * 0x1p-126) / (1.0 - gamma)) * (1.0 + 0x1p-40);
  return static_cast<float>(bound * (1.0 + 0x1p-22));  // float rounding is ≤ 2^-24 relative
}

// ε(q, x) = alpha·‖x − x̃‖ + beta·‖x̃‖ + constant for one query (see the proof above), with the
// rounding of the float32 evaluation of a ± ε folded in: the coefficients are inflated by
// 2^-19 > the relative error of two FMAs plus 1/(1 − u), and beta carries u·|a| ≤ u·(1+γ)·‖q̃‖·‖x̃‖.
struct BoundCoefficients {
  float alpha, beta, constant;
};

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

// One query's candidates within a thread's share: (row, upper bound) pairs, and the k largest
// lower bounds seen (a min-heap: front = the k-th largest, L, once k are in).
struct Candidate {
  std::int64_t index;
  float upper;
};
struct QueryCandidates {
  std::vector<Candidate> pending;
  std::vector<float> lowers;
  std::size_t k = 0;
  float bound() const { return lowers.size() < k ? -std::numeric_limits<float>::infinity() : lowers.front(); }
  // Drops the candidates whose upper bound fell below L as L grew.
  void drop_below_bound() {
    const float b = bound();
    pending.erase(std::remove_if(pending.begin(), pending.end(), [b](const Candidate& c) { return c.upper < b; }),
                  pending.end());
  }
  void add(std::int64_t index, float lower, float upper) {
    pending.push_back({index, upper});
    if (lowers.size() < k) {
      lowers.push_back(lower);
      std::push_heap(lowers.begin(), lowers.end(), std::greater<float>());
    } else if (lower > lowers.front()) {
      std::pop_heap(lowers.begin(), lowers.end(), std::greater<float>());
      lowers.back() = lower;
      std::push_heap(lowers.begin(), lowers.end(), std::greater<float>());
    }
  }
};

// Re-scores the pending candidates of query q (its row in query_buffer, padded to kQueryTile)
// with upper >= bound, exactly as the float32 path scores them, and offers them to `top`;
// block_t holds dim × padded_width(kBlockRows) floats, tile_scores kQueryTile times that width.
// Returns how many rows it re-scored.
inline std::int64_t rescore_candidates(const float* database, const float* query_buffer, std::ptrdiff_t q,
                                       std::ptrdiff_t dim, float bound, std::vector<Candidate>& pending, float* block_t,
                                       float* tile_scores, TopK& top) {
  std::vector<std::int64_t> rows;
  rows.reserve(pending.size());
  for (const Candidate& c : pending)
    if (c.upper >= bound) rows.push_back(c.index);
  pending.clear();
  const float* tile = query_buffer + q / kQueryTile * kQueryTile * dim;
  for (std::size_t first = 0; first < rows.size(); first += kBlockRows) {
    const std::ptrdiff_t count = std::min<std::ptrdiff_t>(kBlockRows, rows.size() - first);
    const std::ptrdiff_t width = padded_width(count);
    std::fill(block_t, block_t + dim * width, 0.0f);
    for (std::ptrdiff_t r = 0; r < count; ++r) {
      const float* row = database + rows[first + r] * dim;
      for (std::ptrdiff_t d = 0; d < dim; ++d) block_t[d * width + r] = row[d];
    }
    dispatch<ScoreBlockKernel>(tile, kQueryTile, dim, block_t, width, tile_scores);
    const float* s = tile_scores + q % kQueryTile * width;
    for (std::ptrdiff_t r = 0; r < count; ++r)
      if (s[r] >= top.threshold()) top.offer(s[r], rows[first + r]);
  }
  return static_cast<std::int64_t>(rows.size());
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
constexpr std::ptrdiff_t kRowScanQueries = 16;
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

// The rows of one scored block whose upper bound reaches the query's L, added to its candidates.
// rounded_norms, residual_norms: the rows' upper bounds of ‖x̃‖ and ‖x − x̃‖ (multiples of 16 long).
CLUSTERMAC_TARGET_AVX512_BF16 inline void collect_candidates(const float* approx, const float* rounded_norms,
                                                             const float* residual_norms, std::ptrdiff_t rows,
                                                             std::int64_t row0, const BoundCoefficients& c,
                                                             QueryCandidates& query) {
  const __m512 alpha = _mm512_set1_ps(c.alpha), beta = _mm512_set1_ps(c.beta), constant = _mm512_set1_ps(c.constant);
  alignas(64) float lower[16], upper[16];
  for (std::ptrdiff_t r0 = 0; r0 < rows; r0 += 16) {
    const std::ptrdiff_t n = std::min<std::ptrdiff_t>(16, rows - r0);
    const __mmask16 valid = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
    const __m512 rounded = _mm512_loadu_ps(rounded_norms + r0), residual = _mm512_loadu_ps(residual_norms + r0);
    const __m512 eps = _mm512_fmadd_ps(alpha, residual, _mm512_fmadd_ps(beta, rounded, constant));
    const __m512 a = _mm512_loadu_ps(approx + r0);
    const __m512 up = _mm512_add_ps(a, eps);
    __mmask16 hits = _mm512_mask_cmp_ps_mask(valid, up, _mm512_set1_ps(query.bound()), _CMP_GE_OQ);
    if (!hits) continue;
    _mm512_store_ps(upper, up);
    _mm512_store_ps(lower, _mm512_sub_ps(a, eps));
    for (; hits; hits &= hits - 1) {
      const int lane = __builtin_ctz(hits);
      if (upper[lane] >= query.bound()) query.add(row0 + r0 + lane, lower[lane], upper[lane]);
    }
  }
}

#endif  // CLUSTERMAC_SIMD_X86

// Upper bound of ‖v‖ for a float vector (double sums: relative error ≤ (dim + 1)·2^-53).
inline double norm_upper_bound(const float* v, std::ptrdiff_t dim) {
  double squares = 0.0;
  for (std::ptrdiff_t d = 0; d < dim; ++d) squares += static_cast<double>(v[d]) * v[d];
  return std::sqrt(squares + static_cast<double>(dim) * 0x1p-1000) * (1.0 + static_cast<double>(dim + 2) * 0x1p-50);
}

// One chunk of queries against the whole database on the bf16 path (needs simd_has_avx512_bf16());
// results go to rows first_row.. of `result`, identical to topk_search_chunk's. Adds the number
// of candidates re-scored in float32 to *candidates_rescored; returns false if the chunk ran on
// the float32 path instead (a query norm beyond the bound's reach, or no x86 SIMD build).
inline bool topk_search_chunk_bf16(const float* database, std::ptrdiff_t n_database, const float* queries,
                                   std::ptrdiff_t n_queries, std::ptrdiff_t dim, std::ptrdiff_t k,
                                   std::int64_t n_threads, SearchResult& result, std::ptrdiff_t first_row,
                                   std::int64_t* candidates_rescored) {
#ifdef CLUSTERMAC_SIMD_X86
  const std::ptrdiff_t pairs = (dim + 1) / 2;
  const std::ptrdiff_t padded_queries = (n_queries + kQueryTile - 1) / kQueryTile * kQueryTile;
  const std::vector<float> query_buffer = padded_queries_buffer(queries, n_queries, dim);
  std::vector<std::uint32_t> query_pairs(padded_queries * pairs, 0u);
  std::vector<BoundCoefficients> coefficients(n_queries);
  for (std::ptrdiff_t q = 0; q < n_queries; ++q) {
    const double query_norm = norm_upper_bound(queries + q * dim, dim);
    if (!(query_norm < kMaxBoundedNorm)) {  // outside the bound's reach: the float32 path
      topk_search_chunk(database, n_database, queries, n_queries, dim, k, n_threads, result, first_row);
      return false;
    }
    float rounded_squares, residual_squares;
    round_to_bf16_pairs(queries + q * dim, dim, query_pairs.data() + q * pairs, 1, rounded_squares, residual_squares);
    coefficients[q] = bound_coefficients(norm_upper_bound(rounded_squares, dim),
                                         norm_upper_bound(residual_squares, dim), query_norm, dim);
  }

  const BlockShares shares(n_database, n_threads);
  std::vector<std::vector<TopK>> share_hits(shares.n_shares);
  std::vector<std::vector<QueryCandidates>> share_candidates(shares.n_shares);
  std::vector<std::int64_t> share_rescored(shares.n_shares, 0);
  const std::ptrdiff_t width_max = padded_width(kBlockRows);
  const std::ptrdiff_t cap = 2 * k + 2048;  // pending candidates of a query before they are pruned
  parallel_for(shares.n_shares, static_cast<int>(shares.n_shares), [&](std::ptrdiff_t share) {
    std::vector<TopK>& hits = share_hits[share] = empty_heaps(n_queries, k);
    std::vector<QueryCandidates>& candidates = share_candidates[share];
    candidates.assign(n_queries, QueryCandidates{});
    for (auto& c : candidates) c.k = static_cast<std::size_t>(k);
    BlockBuffers buffers(n_queries, dim);
    std::vector<float> tile_scores(kQueryTile * width_max);
    std::vector<std::uint32_t> block(pairs * width_max), row_pairs(kBlockRows * pairs);
    std::vector<float> rounded_norms(width_max), residual_norms(width_max);
    std::int64_t collected = 0, scanned = 0;
    bool exact = false;  // too many candidates: the rest of the share in float32
    for (std::ptrdiff_t b = shares.first_block(share); b < shares.end_block(share); ++b) {
      const std::ptrdiff_t row0 = b * kBlockRows, rows = std::min(kBlockRows, n_database - row0);
      if (exact) {
        scan_block_float32(database, row0, rows, query_buffer.data(), n_queries, dim, buffers.block_t.data(),
                           buffers.scores.data(), hits);
        continue;
      }
      const std::ptrdiff_t width = padded_width(rows);
      const bool by_rows = n_queries <= kRowScanQueries;
      for (std::ptrdiff_t r = 0; r < rows; ++r) {
        float rounded_squares, residual_squares;
        const float* row = database + (row0 + r) * dim;
        if (by_rows &&
            row0 + r + kPrefetchRows < n_database)  // the row scan reads too little per row for the prefetcher
          for (std::ptrdiff_t d = 0; d < dim; d += 16) __builtin_prefetch(row + kPrefetchRows * dim + d);
        const bool finite =
            by_rows ? score_row_bf16(n_queries, row, dim, query_pairs.data(), pairs, buffers.scores.data() + r, width,
                                     rounded_squares, residual_squares)
                    : round_to_bf16_pairs(row, dim, row_pairs.data() + r * pairs, 1, rounded_squares, residual_squares);
        if (!finite)
          fail("database: row " + std::to_string(row0 + r) + " contains NaN or Inf; expected only finite numbers");
        rounded_norms[r] = norm_upper_bound(rounded_squares, dim);
        residual_norms[r] = norm_upper_bound(residual_squares, dim);
        if (!(static_cast<double>(rounded_norms[r]) + residual_norms[r] < kMaxBoundedNorm)) {
          // Never pruned: approximate score 0 and ε = +∞ (residual 0: no ∞·0 in ε).
          for (std::ptrdiff_t p = 0; p < pairs && !by_rows; ++p) row_pairs[r * pairs + p] = 0u;
          for (std::ptrdiff_t q = 0; q < n_queries && by_rows; ++q) buffers.scores[q * width + r] = 0.0f;
          rounded_norms[r] = std::numeric_limits<float>::infinity();
          residual_norms[r] = 0.0f;
        }
      }
      if (!by_rows) {
        transpose_rows(row_pairs.data(), rows, pairs, width, block.data());  // sequential writes
        score_block_bf16(query_pairs.data(), padded_queries, pairs, block.data(), width, buffers.scores.data());
      }
      for (std::ptrdiff_t q = 0; q < n_queries; ++q) {
        QueryCandidates& query = candidates[q];
        const std::size_t before = query.pending.size();
        collect_candidates(buffers.scores.data() + q * width, rounded_norms.data(), residual_norms.data(), rows, row0,
                           coefficients[q], query);
        collected += static_cast<std::int64_t>(query.pending.size() - before);
        if (static_cast<std::ptrdiff_t>(query.pending.size()) >= cap) {
          query.drop_below_bound();
          if (static_cast<std::ptrdiff_t>(query.pending.size()) >= cap / 2)  // still many: re-score them now
            share_rescored[share] +=
                rescore_candidates(database, query_buffer.data(), q, dim, query.bound(), query.pending,
                                   buffers.block_t.data(), tile_scores.data(), hits[q]);
        }
      }
      scanned += rows;
      exact = collected > n_queries * (2 * k + 1024 + scanned / 8);
    }
  });

  // The final L of each query (the k-th largest lower bound of all shares), then the last re-score.
  std::vector<float> bounds(n_queries, -std::numeric_limits<float>::infinity());
  for (std::ptrdiff_t q = 0; q < n_queries; ++q) {
    std::vector<float> lowers;
    for (auto& share : share_candidates) lowers.insert(lowers.end(), share[q].lowers.begin(), share[q].lowers.end());
    if (static_cast<std::ptrdiff_t>(lowers.size()) >= k) {
      std::nth_element(lowers.begin(), lowers.begin() + (k - 1), lowers.end(), std::greater<float>());
      bounds[q] = lowers[k - 1];
    }
  }
  parallel_for(shares.n_shares, static_cast<int>(shares.n_shares), [&](std::ptrdiff_t share) {
    std::vector<float> block_t(dim * width_max), tile_scores(kQueryTile * width_max);
    for (std::ptrdiff_t q = 0; q < n_queries; ++q)
      share_rescored[share] +=
          rescore_candidates(database, query_buffer.data(), q, dim, bounds[q], share_candidates[share][q].pending,
                             block_t.data(), tile_scores.data(), share_hits[share][q]);
  });
  for (std::int64_t count : share_rescored) *candidates_rescored += count;
  for (std::ptrdiff_t q = 0; q < n_queries; ++q) {
    std::vector<Hit> merged;
    merged.reserve(k * shares.n_shares);
    for (auto& share : share_hits) merged.insert(merged.end(), share[q].heap.begin(), share[q].heap.end());
    write_top_k(merged, k, result, first_row + q);
  }
  return true;
#else
  (void)candidates_rescored;
  topk_search_chunk(database, n_database, queries, n_queries, dim, k, n_threads, result, first_row);
  return false;
#endif
}

}  // namespace detail
}  // namespace clustermac
