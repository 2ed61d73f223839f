// The candidate machinery shared by the exact search's candidate-scan paths (topk_bf16.hpp,
// topk_f32scan.hpp): a fast scan gives each (query, row) an approximate score a and a rigorous
// bound ε with |a − s| ≤ ε, s being the float32 path's score (topk_float32.hpp); the rows that can
// be in the exact top k are kept as candidates and re-scored by the float32 kernel itself, so the
// results are the float32 path's bit for bit: same scores, same indices, same tie rule, same errors.
//
// Why the candidates hold the exact top k: lower = a − ε ≤ s ≤ upper = a + ε for every row (each
// scan proves its ε; every norm is an upper bound, rounded up, and the coefficients carry the
// rounding of the float32 arithmetic that evaluates a ± ε). Let L be the k-th largest lower bound
// of any k rows (−∞ before k are seen): at least k rows have s ≥ L, so the k-th best exact score
// s_k ≥ L. Every row of the exact top k (and every row tied with s_k, whatever its index) has
// upper ≥ s ≥ s_k ≥ L: keeping the rows with upper ≥ L keeps them all. L only grows while
// scanning, so a row dropped against an earlier L would be dropped against the final one too.
// Re-scoring the candidates with the float32 path's kernel gives each its exact s (a column's
// score does not depend on its neighbours in the block), and the top k of the candidates by
// (score descending, index ascending) is the top k of all rows.
//
// Outside the bound's reach: a row whose norm bound is ≥ 2^50 is never pruned (the scan gives it
// approximate score 0 and ε = +∞, so it is re-scored exactly, overflow and NaN included); a chunk
// with a query of norm ≥ 2^50 runs on the float32 path. A query's pending candidates are pruned
// against the current L when they reach 2k + 2048, and re-scored at once if k + 1024 remain
// (their exact scores join the query's top k as the float32 path's would). When the candidates
// of a thread's share grow past 1/8 of its scores plus 2k + 1024 per query (many ties,
// duplicates), the rest of that share is scanned in float32 (exact scores need no candidates).
// None of this changes the results, only the time.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <vector>

#include "clustermac/search/topk_float32.hpp"

namespace clustermac {
namespace detail {

constexpr double kMaxBoundedNorm = 0x1p50;      // larger norms are not pruned (see above)
constexpr std::ptrdiff_t kPrefetchRows = 8;     // rows ahead that the row scans prefetch
constexpr std::ptrdiff_t kRowScanQueries = 16;  // up to this many queries, the scans score row by row

// Upper bound of √(Σ t²) from its float32 evaluation `sum` over `terms` squares (any order,
// FMA or not: relative error ≤ γ_terms; squares flushed to zero: ≤ 2^-126 each), rounded up to float.
inline float norm_upper_bound(float sum, std::ptrdiff_t terms) {
  const double n = static_cast<double>(terms) + 8.0;
  const double gamma = n * 0x1p-24 / (1.0 - n * 0x1p-24);
  const double bound = std::sqrt((static_cast<double>(sum) + n * 0x1p-126) / (1.0 - gamma)) * (1.0 + 0x1p-40);
  return static_cast<float>(bound * (1.0 + 0x1p-22));  // float rounding is ≤ 2^-24 relative
}

// Upper bound of ‖v‖ for a float vector (double sums: relative error ≤ (dim + 1)·2^-53).
inline double norm_upper_bound(const float* v, std::ptrdiff_t dim) {
  double squares = 0.0;
  for (std::ptrdiff_t d = 0; d < dim; ++d) squares += static_cast<double>(v[d]) * v[d];
  return std::sqrt(squares + static_cast<double>(dim) * 0x1p-1000) * (1.0 + static_cast<double>(dim + 2) * 0x1p-50);
}

// ε(q, x) = alpha·m_x + beta·n_x + constant for one query, where m_x and n_x are two norms of the
// row that the scan provides (bf16: ‖x − x̃‖ and ‖x̃‖; float32 scan: 0 and ‖x‖).
struct BoundCoefficients {
  float alpha, beta, constant;
};

// Test hook: the environment variable CLUSTERMAC_TEST_SEARCH_BOUND_SCALE multiplies every ε (read
// once per process; 1 when unset). Only the tests set it, to 0, to show that a bound too small
// loses rows of the exact top k, i.e. that the tests comparing the paths can fail.
inline float bound_scale() {
  static const float scale = [] {
    const char* value = std::getenv("CLUSTERMAC_TEST_SEARCH_BOUND_SCALE");
    return value ? std::strtof(value, nullptr) : 1.0f;
  }();
  return scale;
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

// Re-scores the pending candidates of query q (in its tile of the packed query_buffer, see kStrip)
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
    pack_rows([&](std::ptrdiff_t r) { return database + rows[first + r] * dim; }, count, dim, width, block_t);
    dispatch<ScoreBlockKernel>(tile, kQueryTile, dim, block_t, width, tile_scores);
    const float* s = tile_scores + q % kQueryTile * width;
    for (std::ptrdiff_t r = 0; r < count; ++r)
      if (s[r] >= top.threshold()) top.offer(s[r], rows[first + r]);
  }
  return static_cast<std::int64_t>(rows.size());
}

// The rows of one scored block whose upper bound reaches the query's L, added to its candidates.
// approx: the rows' approximate scores; alpha_norms, beta_norms: their m_x and n_x (all three
// padded to a multiple of 16; values past `rows` are ignored). It runs once per query and 16 rows
// (62M times for 1,000 queries against 1M rows), so the common case, no candidate among the 16,
// must cost a compare and a branch: AVX-512 with mask registers (collect_candidates_avx512), the
// other levels with vector extensions (CollectCandidatesKernel).
struct CollectCandidatesKernel {
  static constexpr SimdLevel widest = kSimdAvx2;
  template <SimdLevel L>
  static CLUSTERMAC_ALWAYS_INLINE void run(const float* approx, const float* alpha_norms, const float* beta_norms,
                                           std::ptrdiff_t rows, std::int64_t row0, const BoundCoefficients& c,
                                           QueryCandidates& query) {
    constexpr int Lanes = lanes<L>();
    typedef typename Vectors<Lanes>::F Vec;
    typedef typename Vectors<Lanes>::I IVec;
    const Vec alpha = Vec{} + c.alpha, beta = Vec{} + c.beta, constant = Vec{} + c.constant;
    for (std::ptrdiff_t r0 = 0; r0 < rows; r0 += Lanes) {
      const Vec eps = alpha * load<Vec>(alpha_norms + r0) + (beta * load<Vec>(beta_norms + r0) + constant);
      const Vec a = load<Vec>(approx + r0);
      const Vec upper = a + eps;
      const IVec hits = upper >= (Vec{} + query.bound());
      if (!any_lane(hits)) continue;
      const std::ptrdiff_t n = std::min<std::ptrdiff_t>(Lanes, rows - r0);
      for (int lane = 0; lane < n; ++lane)
        if (hits[lane] && upper[lane] >= query.bound()) query.add(row0 + r0 + lane, a[lane] - eps[lane], upper[lane]);
    }
  }
};

#ifdef CLUSTERMAC_SIMD_X86
CLUSTERMAC_TARGET_AVX512 inline void collect_candidates_avx512(const float* approx, const float* alpha_norms,
                                                               const float* beta_norms, std::ptrdiff_t rows,
                                                               std::int64_t row0, const BoundCoefficients& c,
                                                               QueryCandidates& query) {
  const __m512 alpha = _mm512_set1_ps(c.alpha), beta = _mm512_set1_ps(c.beta), constant = _mm512_set1_ps(c.constant);
  alignas(64) float lower[16], upper[16];
  for (std::ptrdiff_t r0 = 0; r0 < rows; r0 += 16) {
    const std::ptrdiff_t n = std::min<std::ptrdiff_t>(16, rows - r0);
    const __mmask16 valid = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
    const __m512 eps = _mm512_fmadd_ps(alpha, _mm512_loadu_ps(alpha_norms + r0),
                                       _mm512_fmadd_ps(beta, _mm512_loadu_ps(beta_norms + r0), constant));
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
#endif

inline void collect_candidates(const float* approx, const float* alpha_norms, const float* beta_norms,
                               std::ptrdiff_t rows, std::int64_t row0, const BoundCoefficients& c,
                               QueryCandidates& query) {
#ifdef CLUSTERMAC_SIMD_X86
  if (simd_at_least(kSimdAvx512))
    return collect_candidates_avx512(approx, alpha_norms, beta_norms, rows, row0, c, query);
#endif
  dispatch<CollectCandidatesKernel>(approx, alpha_norms, beta_norms, rows, row0, c, query);
}

// A scan for topk_search_chunk_candidates: constructed from (database, queries, n_queries, dim)
// of the chunk, it provides
//   bool in_reach;                                    false: a query norm ≥ 2^50 (float32 path)
//   std::vector<BoundCoefficients> coefficients;      one per query
//   struct Buffers { explicit Buffers(const Scan&); } one per thread
//   void score_block(database, n_database, row0, rows, width, Buffers&, approx, alpha_norms, beta_norms) const;
// score_block writes the approximate scores of rows row0 .. row0 + rows to approx[q·width + r]
// and their norms to alpha_norms[r], beta_norms[r]; a row beyond the bound's reach gets scores 0,
// beta norm +∞ and alpha norm 0; a row with NaN or Inf raises the float32 path's error.

// One chunk of queries against the whole database, scanned by Scan then re-scored; results go to
// rows first_row.. of `result`, identical to topk_search_chunk's. Adds the number of candidates
// re-scored in float32 to *candidates_rescored; returns false if the chunk ran on the float32
// path instead (a query norm beyond the bound's reach).
template <typename Scan>
inline bool topk_search_chunk_candidates(const float* database, std::ptrdiff_t n_database, const float* queries,
                                         std::ptrdiff_t n_queries, std::ptrdiff_t dim, std::ptrdiff_t k,
                                         std::int64_t n_threads, SearchResult& result, std::ptrdiff_t first_row,
                                         std::int64_t* candidates_rescored) {
  const Scan scan(database, queries, n_queries, dim);
  if (!scan.in_reach) {
    topk_search_chunk(database, n_database, queries, n_queries, dim, k, n_threads, result, first_row);
    return false;
  }
  std::vector<BoundCoefficients> coefficients = scan.coefficients;
  for (BoundCoefficients& c : coefficients) {
    const float scale = bound_scale();  // 1 unless a test breaks the bound on purpose
    c = {c.alpha * scale, c.beta * scale, c.constant * scale};
  }
  const std::vector<float> query_buffer = padded_queries_buffer(queries, n_queries, dim);
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
    typename Scan::Buffers scan_buffers(scan);
    std::vector<float> tile_scores(kQueryTile * width_max), alpha_norms(width_max), beta_norms(width_max);
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
      scan.score_block(database, n_database, row0, rows, width, scan_buffers, buffers.scores.data(), alpha_norms.data(),
                       beta_norms.data());
      for (std::ptrdiff_t q = 0; q < n_queries; ++q) {
        QueryCandidates& query = candidates[q];
        const std::size_t before = query.pending.size();
        collect_candidates(buffers.scores.data() + q * width, alpha_norms.data(), beta_norms.data(), rows, row0,
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
}

}  // namespace detail
}  // namespace clustermac
