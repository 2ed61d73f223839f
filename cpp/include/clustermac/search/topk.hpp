// Exact top-k dot-product (cosine, for l2-normalised vectors) search, blocked over database
// rows so that memory stays bounded whatever the database size (it may be memory-mapped).
//
// The scores of a block come from a small register-tiled kernel dispatched to the CPU's SIMD
// level (simd.hpp); the top-k selection is a threshold test against each query's current k-th
// best followed by a heap update, about one comparison per score.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "clustermac/common.hpp"
#include "clustermac/simd.hpp"

namespace clustermac {

struct SearchResult {
  MatrixRM scores;                                                                       // Q × k, descending
  Eigen::Matrix<std::int64_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> indices;  // Q × k
};

namespace detail {

constexpr int kQueryTile = 6;               // queries per register tile
constexpr std::ptrdiff_t kBlockRows = 256;  // database rows per block (transposed block ~ D KB)

// Scores for a tile of kQueryTile queries × (2·lanes) database columns:
// out[i][j] = sum_d query[i][d] · block_t[d][j]; block_t is the block transposed (D × width).
template <typename Vec, int Lanes>
CLUSTERMAC_ALWAYS_INLINE void score_tile(const float* queries, std::ptrdiff_t dim, const float* block_t,
                                         std::ptrdiff_t width, float* out, std::ptrdiff_t out_stride) {
  Vec acc[kQueryTile][2];
  for (int i = 0; i < kQueryTile; ++i) acc[i][0] = acc[i][1] = Vec{};
  for (std::ptrdiff_t d = 0; d < dim; ++d) {
    Vec x0, x1;
    std::memcpy(&x0, block_t + d * width, sizeof(Vec));
    std::memcpy(&x1, block_t + d * width + Lanes, sizeof(Vec));
    for (int i = 0; i < kQueryTile; ++i) {
      const float q = queries[i * dim + d];
      acc[i][0] += q * x0;
      acc[i][1] += q * x1;
    }
  }
  for (int i = 0; i < kQueryTile; ++i) {
    std::memcpy(out + i * out_stride, &acc[i][0], sizeof(Vec));
    std::memcpy(out + i * out_stride + Lanes, &acc[i][1], sizeof(Vec));
  }
}

// scores (padded_queries × width) = queries (padded_queries × dim) · block_t (dim × width).
// padded_queries is a multiple of kQueryTile, width a multiple of kWidthMultiple.
struct ScoreBlockKernel {
  static constexpr SimdLevel widest = kSimdAvx512;
  template <SimdLevel L>
  static CLUSTERMAC_ALWAYS_INLINE void run(const float* queries, std::ptrdiff_t padded_queries, std::ptrdiff_t dim,
                                           const float* block_t, std::ptrdiff_t width, float* scores) {
    constexpr int Lanes = lanes<L>();
    typedef typename Vectors<Lanes>::F Vec;
    for (std::ptrdiff_t j = 0; j < width; j += 2 * Lanes)
      for (std::ptrdiff_t i = 0; i < padded_queries; i += kQueryTile)
        score_tile<Vec, Lanes>(queries + i * dim, dim, block_t + j, width, scores + i * width + j, width);
  }
};

// Block width must be a multiple of 2·16 so that every kernel variant tiles it exactly.
constexpr std::ptrdiff_t kWidthMultiple = 32;

// A query's current top k as a heap whose front is the worst kept hit (lowest score; among
// equal scores the larger index, since ties go to the smaller index).
struct Hit {
  float score;
  std::int64_t index;
};
inline bool better(const Hit& a, const Hit& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

struct TopK {
  std::vector<Hit> heap;  // std heap ordered by `better`: front = worst
  std::size_t k = 0;
  void offer(float score, std::int64_t index) {
    if (heap.size() < k) {
      heap.push_back({score, index});
      std::push_heap(heap.begin(), heap.end(), better);
    } else if (better({score, index}, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = {score, index};
      std::push_heap(heap.begin(), heap.end(), better);
    }
  }
  // Scores at or below this cannot enter (only valid once full; equal scores come from later
  // indices within one scan, which lose the tie).
  float threshold() const { return heap.size() < k ? -std::numeric_limits<float>::infinity() : heap.front().score; }
};

// One chunk of queries against the whole database; results go to rows first_row.. of `result`.
inline void topk_search_chunk(const float* database, std::ptrdiff_t n_database, const float* queries,
                              std::ptrdiff_t n_queries, std::ptrdiff_t dim, std::ptrdiff_t k, std::int64_t n_threads,
                              SearchResult& result, std::ptrdiff_t first_row) {
  const std::ptrdiff_t padded_queries = (n_queries + kQueryTile - 1) / kQueryTile * kQueryTile;
  std::vector<float> query_buffer(padded_queries * dim, 0.0f);
  std::copy(queries, queries + n_queries * dim, query_buffer.begin());

  const std::ptrdiff_t n_blocks = (n_database + kBlockRows - 1) / kBlockRows;
  const std::ptrdiff_t n_shares =
      std::max<std::ptrdiff_t>(1, std::min<std::ptrdiff_t>(effective_threads(n_threads), n_blocks));
  std::vector<std::vector<TopK>> share_hits(n_shares);

  parallel_for(n_shares, static_cast<int>(n_shares), [&](std::ptrdiff_t share) {
    std::vector<TopK>& hits = share_hits[share];
    hits.assign(n_queries, TopK{});
    for (auto& h : hits) {
      h.k = static_cast<std::size_t>(k);
      h.heap.reserve(k);
    }
    const std::ptrdiff_t width_max = (kBlockRows + kWidthMultiple - 1) / kWidthMultiple * kWidthMultiple;
    std::vector<float> block_t(dim * width_max);
    std::vector<float> scores(padded_queries * width_max);
    const std::ptrdiff_t first_block = n_blocks * share / n_shares, end_block = n_blocks * (share + 1) / n_shares;
    for (std::ptrdiff_t b = first_block; b < end_block; ++b) {
      const std::ptrdiff_t row0 = b * kBlockRows, rows = std::min(kBlockRows, n_database - row0);
      const std::ptrdiff_t width = (rows + kWidthMultiple - 1) / kWidthMultiple * kWidthMultiple;
      // Transpose the block (zero-padded to `width` columns) and check it is finite.
      std::fill(block_t.begin(), block_t.begin() + dim * width, 0.0f);
      for (std::ptrdiff_t r = 0; r < rows; ++r) {
        const float* row = database + (row0 + r) * dim;
        bool finite = true;
        for (std::ptrdiff_t d = 0; d < dim; ++d) {
          finite &= std::isfinite(row[d]);
          block_t[d * width + r] = row[d];
        }
        if (!finite)
          fail("database: row " + std::to_string(row0 + r) + " contains NaN or Inf; expected only finite numbers");
      }
      dispatch<ScoreBlockKernel>(query_buffer.data(), padded_queries, dim, block_t.data(), width, scores.data());
      for (std::ptrdiff_t q = 0; q < n_queries; ++q) {
        const float* s = scores.data() + q * width;
        TopK& top = hits[q];
        float threshold = top.threshold();
        for (std::ptrdiff_t r = 0; r < rows; ++r) {
          if (s[r] >= threshold) {
            top.offer(s[r], row0 + r);
            threshold = top.threshold();
          }
        }
      }
    }
  });

  for (std::ptrdiff_t q = 0; q < n_queries; ++q) {
    std::vector<Hit> merged;
    merged.reserve(k * n_shares);
    for (auto& share : share_hits) merged.insert(merged.end(), share[q].heap.begin(), share[q].heap.end());
    // A NaN score (inf − inf inside a dot product) is never offered, so a query can come up
    // short of k hits; an infinite one ranks first or last. Only the k returned scores are
    // checked, which keeps the search itself free of extra passes.
    if (static_cast<std::ptrdiff_t>(merged.size()) < k)
      fail("topk_search: query " + std::to_string(first_row + q) +
           " has NaN scores: its dot products overflow float32; the vectors are too large (l2-normalise them)");
    std::partial_sort(merged.begin(), merged.begin() + k, merged.end(), better);
    for (std::ptrdiff_t j = 0; j < k; ++j) {
      if (!std::isfinite(merged[j].score))
        fail("topk_search: the score of query " + std::to_string(first_row + q) + " with database row " +
             std::to_string(merged[j].index) + " is " + format_number(merged[j].score) +
             ": the dot product overflows float32; the vectors are too large (l2-normalise them)");
      result.scores(first_row + q, j) = merged[j].score;
      result.indices(first_row + q, j) = merged[j].index;
    }
  }
}

// Queries are searched in chunks of at most this many, so that the per-thread score buffers
// and heaps stay bounded however many queries are given at once; with a large k (a full
// ranking asks for k = N) the chunk shrinks so that a thread's heaps hold at most
// kHitsPerChunk hits (128 MB).
constexpr std::ptrdiff_t kQueryChunk = 4096;
constexpr std::ptrdiff_t kHitsPerChunk = std::ptrdiff_t(1) << 23;

}  // namespace detail

// Exact top-k of database · queryᵀ for every query: scores sorted descending, ties broken by
// the smaller database index. The database (N×D, row-major, possibly memory-mapped) is read
// in blocks of kBlockRows rows; each of n_threads threads (<= 0: all cores; capped at max_threads())
// scans a contiguous share of the rows with its own O(min(Q, kQueryChunk)·kBlockRows) score buffer
// and per-query heaps, which are merged at the end: the result does not depend on the thread count.
// A non-finite database value raises std::invalid_argument naming its row; so does a returned
// score that overflowed float32 (only the top k are checked).
inline SearchResult topk_search(const float* database, std::ptrdiff_t n_database, const float* queries,
                                std::ptrdiff_t n_queries, std::ptrdiff_t dim, std::ptrdiff_t k,
                                std::int64_t n_threads) {
  using namespace detail;
  require(dim >= 1, "topk_search: vectors must have at least one dimension");
  require(k >= 1 && k <= n_database,
          "k: expected 1 <= k <= N = " + std::to_string(n_database) + " (database rows), got " + std::to_string(k));
  for (std::ptrdiff_t i = 0; i < n_queries * dim; ++i)
    if (!std::isfinite(queries[i]))
      fail("queries: row " + std::to_string(i / dim) + " contains NaN or Inf; expected only finite numbers");
  SearchResult result;
  result.scores.resize(n_queries, k);
  result.indices.resize(n_queries, k);
  const std::ptrdiff_t chunk = std::max<std::ptrdiff_t>(kQueryTile, std::min(kQueryChunk, kHitsPerChunk / k));
  for (std::ptrdiff_t first = 0; first < n_queries; first += chunk)
    topk_search_chunk(database, n_database, queries + first * dim, std::min(chunk, n_queries - first), dim, k,
                      n_threads, result, first);
  return result;
}

}  // namespace clustermac
