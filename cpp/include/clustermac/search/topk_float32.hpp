// The float32 path of the exact top-k search (topk.hpp): the database is read in blocks of
// kBlockRows rows, each transposed and scored by a small register-tiled kernel dispatched to the
// CPU's SIMD level (simd.hpp); the top-k selection is a threshold test against each query's
// current k-th best followed by a heap update, about one comparison per score. The same kernel
// re-scores the bf16 path's candidates (topk_bf16.hpp), so both paths give the same bits.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "clustermac/common.hpp"
#include "clustermac/simd.hpp"

namespace clustermac {

// The paths of the exact search (topk.hpp); kAuto chooses among the others.
enum class SearchPath { kAuto, kFloat32, kBf16, kFloat32Scan };

struct SearchResult {
  MatrixRM scores;                                                                       // Q × k, descending
  Eigen::Matrix<std::int64_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> indices;  // Q × k
  std::array<std::int64_t, 4> chunks{};  // query chunks searched on each path, indexed by SearchPath
  std::int64_t candidates_rescored = 0;  // rows the scan paths re-scored in float32, all queries
};

namespace detail {

constexpr int kQueryTile = 6;               // queries per register tile
constexpr std::ptrdiff_t kBlockRows = 256;  // database rows per block (transposed block ~ D KB)

// The packed layouts the scoring kernel reads, both in the order it reads them (so that each tile
// streams two contiguous arrays, which the hardware prefetches, instead of rows 1-2 KB apart):
//  - a block of database rows transposed into strips of kStrip rows: strip s holds, for d = 0 ..
//    dim-1, the d-th value of its kStrip rows (dim × kStrip floats); row r is lane r % kStrip of
//    strip r / kStrip (pack_rows, pack_block);
//  - the queries in tiles of kQueryTile: tile t holds, for d = 0 .. dim-1, the d-th value of its
//    kQueryTile queries (padded_queries_buffer).
// Only where the operands sit changes, not the arithmetic: each score is the same chain of
// multiply-adds over d = 0, 1, ... as with the plain layouts, so the scores keep their bits.
constexpr std::ptrdiff_t kStrip = 16;

// Scores for a tile of kQueryTile queries × (2·lanes) database columns starting at column j:
// out[i][c] = sum_d query[i][d] · row[j + c][d].
template <typename Vec, int Lanes>
CLUSTERMAC_ALWAYS_INLINE void score_tile(const float* tile, std::ptrdiff_t dim, const float* block, std::ptrdiff_t j,
                                         float* out, std::ptrdiff_t out_stride) {
  static_assert(kStrip % Lanes == 0, "a vector of lanes never straddles two strips");
  const float* column0 = block + (j / kStrip) * dim * kStrip + j % kStrip;
  const float* column1 = block + ((j + Lanes) / kStrip) * dim * kStrip + (j + Lanes) % kStrip;
  Vec acc[kQueryTile][2];
  for (int i = 0; i < kQueryTile; ++i) acc[i][0] = acc[i][1] = Vec{};
  for (std::ptrdiff_t d = 0; d < dim; ++d) {
    Vec x0, x1;
    std::memcpy(&x0, column0 + d * kStrip, sizeof(Vec));
    std::memcpy(&x1, column1 + d * kStrip, sizeof(Vec));
    for (int i = 0; i < kQueryTile; ++i) {
      const float q = tile[d * kQueryTile + i];
      acc[i][0] += q * x0;
      acc[i][1] += q * x1;
    }
  }
  for (int i = 0; i < kQueryTile; ++i) {
    std::memcpy(out + i * out_stride, &acc[i][0], sizeof(Vec));
    std::memcpy(out + i * out_stride + Lanes, &acc[i][1], sizeof(Vec));
  }
}

// scores (padded_queries × width, row-major) = queries · block^T, from the packed layouts above.
// padded_queries is a multiple of kQueryTile, width a multiple of kWidthMultiple.
struct ScoreBlockKernel {
  static constexpr SimdLevel widest = kSimdAvx512;
  template <SimdLevel L>
  static CLUSTERMAC_ALWAYS_INLINE void run(const float* packed_queries, std::ptrdiff_t padded_queries,
                                           std::ptrdiff_t dim, const float* block, std::ptrdiff_t width,
                                           float* scores) {
    constexpr int Lanes = lanes<L>();
    typedef typename Vectors<Lanes>::F Vec;
    for (std::ptrdiff_t j = 0; j < width; j += 2 * Lanes)
      for (std::ptrdiff_t i = 0; i < padded_queries; i += kQueryTile)
        score_tile<Vec, Lanes>(packed_queries + i * dim, dim, block, j, scores + i * width + j, width);
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

// One query's scores s[0 .. rows) of database rows row0 .. offered to its top k in row order, each
// only if it reaches the current threshold. Most scores do not, so they are tested Lanes at a time
// and only a vector with one at or above the threshold goes score by score. The threshold never
// falls, so a score below it at the vector's test stays below: the same offers as a test per score.
struct OfferScoresKernel {
  static constexpr SimdLevel widest = kSimdAvx2;
  template <SimdLevel L>
  static CLUSTERMAC_ALWAYS_INLINE void run(const float* s, std::ptrdiff_t rows, std::int64_t row0, TopK& top) {
    constexpr int Lanes = lanes<L>();
    typedef typename Vectors<Lanes>::F Vec;
    float threshold = top.threshold();
    auto offer = [&](std::ptrdiff_t r) {
      if (s[r] >= threshold) {
        top.offer(s[r], row0 + r);
        threshold = top.threshold();
      }
    };
    std::ptrdiff_t r0 = 0;
    for (; r0 + Lanes <= rows; r0 += Lanes)
      if (any_lane(load<Vec>(s + r0) >= (Vec{} + threshold)))
        for (int lane = 0; lane < Lanes; ++lane) offer(r0 + lane);
    for (; r0 < rows; ++r0) offer(r0);
  }
};

// A row-major rows × cols matrix transposed into out (cols × width, columns rows .. width zero).
// The copy goes kTransposeDims columns at a time over all the rows, so that it writes a few
// lines of out in sequence rather than one value to each of cols lines per row (which left the
// search of a few queries waiting on stores).
constexpr std::ptrdiff_t kTransposeDims = 8;
template <typename T>
inline void transpose_rows(const T* in, std::ptrdiff_t rows, std::ptrdiff_t cols, std::ptrdiff_t width, T* out) {
  for (std::ptrdiff_t c0 = 0; c0 < cols; c0 += kTransposeDims) {
    const std::ptrdiff_t c1 = std::min(cols, c0 + kTransposeDims);
    for (std::ptrdiff_t r = 0; r < rows; ++r)
      for (std::ptrdiff_t c = c0; c < c1; ++c) out[c * width + r] = in[r * cols + c];
  }
  for (std::ptrdiff_t c = 0; c < cols; ++c) std::fill(out + c * width + rows, out + (c + 1) * width, T{});
}

// `rows` rows of `dim` floats (given by row(r), a pointer to row r) packed into kStrip-row strips
// (see kStrip), zero rows from `rows` up to `width` (a multiple of kStrip).
template <typename RowPointer>
inline void pack_rows(RowPointer row, std::ptrdiff_t rows, std::ptrdiff_t dim, std::ptrdiff_t width, float* block) {
  for (std::ptrdiff_t first = 0; first < width; first += kStrip) {
    float* strip = block + first * dim;
    const std::ptrdiff_t count = std::clamp<std::ptrdiff_t>(rows - first, 0, kStrip);
    if (count < kStrip) std::fill(strip, strip + dim * kStrip, 0.0f);
    for (std::ptrdiff_t lane = 0; lane < count; ++lane) {
      const float* values = row(first + lane);
      for (std::ptrdiff_t d = 0; d < dim; ++d) strip[d * kStrip + lane] = values[d];
    }
  }
}

// Rows row0 .. row0 + rows of the database packed into block (dim × width floats, see kStrip),
// checking that they are finite.
inline void pack_block(const float* database, std::ptrdiff_t row0, std::ptrdiff_t rows, std::ptrdiff_t dim,
                       std::ptrdiff_t width, float* block) {
  const float* first = database + row0 * dim;
  pack_rows([&](std::ptrdiff_t r) { return first + r * dim; }, rows, dim, width, block);
  bool finite = true;
  for (std::ptrdiff_t i = 0; i < dim * width; ++i) finite &= std::isfinite(block[i]);
  if (finite) return;
  for (std::ptrdiff_t r = 0; r < rows; ++r)
    for (std::ptrdiff_t d = 0; d < dim; ++d)
      if (!std::isfinite(first[r * dim + d]))
        fail("database: row " + std::to_string(row0 + r) + " contains NaN or Inf; expected only finite numbers");
}

inline std::ptrdiff_t padded_width(std::ptrdiff_t rows) {
  return (rows + kWidthMultiple - 1) / kWidthMultiple * kWidthMultiple;
}

// Exact float32 scores of rows row0 .. row0 + rows against every query, offered to their heaps.
inline void scan_block_float32(const float* database, std::ptrdiff_t row0, std::ptrdiff_t rows,
                               const float* query_buffer, std::ptrdiff_t n_queries, std::ptrdiff_t dim, float* block_t,
                               float* scores, std::vector<TopK>& hits) {
  const std::ptrdiff_t padded_queries = (n_queries + kQueryTile - 1) / kQueryTile * kQueryTile;
  const std::ptrdiff_t width = padded_width(rows);
  pack_block(database, row0, rows, dim, width, block_t);
  dispatch<ScoreBlockKernel>(query_buffer, padded_queries, dim, block_t, width, scores);
  for (std::ptrdiff_t q = 0; q < n_queries; ++q) dispatch<OfferScoresKernel>(scores + q * width, rows, row0, hits[q]);
}

// Empty heaps of capacity k, one per query.
inline std::vector<TopK> empty_heaps(std::ptrdiff_t n_queries, std::ptrdiff_t k) {
  std::vector<TopK> hits(n_queries);
  for (auto& h : hits) {
    h.k = static_cast<std::size_t>(k);
    h.heap.reserve(k);
  }
  return hits;
}

// The top k of one query's hits (the union of its per-thread heaps), written to row `row` of result.
inline void write_top_k(std::vector<Hit>& merged, std::ptrdiff_t k, SearchResult& result, std::ptrdiff_t row) {
  // A NaN score (inf − inf inside a dot product) is never offered, so a query can come up
  // short of k hits; an infinite one ranks first or last. Only the k returned scores are
  // checked, which keeps the search itself free of extra passes.
  if (static_cast<std::ptrdiff_t>(merged.size()) < k)
    fail("topk_search: query " + std::to_string(row) +
         " has NaN scores: its dot products overflow float32; the vectors are too large (l2-normalise them)");
  std::partial_sort(merged.begin(), merged.begin() + k, merged.end(), better);
  for (std::ptrdiff_t j = 0; j < k; ++j) {
    if (!std::isfinite(merged[j].score))
      fail("topk_search: the score of query " + std::to_string(row) + " with database row " +
           std::to_string(merged[j].index) + " is " + format_number(merged[j].score) +
           ": the dot product overflows float32; the vectors are too large (l2-normalise them)");
    result.scores(row, j) = merged[j].score;
    result.indices(row, j) = merged[j].index;
  }
}

// The queries packed in tiles of kQueryTile (see kStrip), padded with zero queries to a multiple of
// kQueryTile: tile t starts at t·kQueryTile·dim.
inline std::vector<float> padded_queries_buffer(const float* queries, std::ptrdiff_t n_queries, std::ptrdiff_t dim) {
  const std::ptrdiff_t padded_queries = (n_queries + kQueryTile - 1) / kQueryTile * kQueryTile;
  std::vector<float> buffer(padded_queries * dim, 0.0f);
  for (std::ptrdiff_t q = 0; q < n_queries; ++q) {
    float* tile = buffer.data() + q / kQueryTile * kQueryTile * dim;
    for (std::ptrdiff_t d = 0; d < dim; ++d) tile[d * kQueryTile + q % kQueryTile] = queries[q * dim + d];
  }
  return buffer;
}

// Database blocks and the contiguous share of them that each thread scans.
struct BlockShares {
  std::ptrdiff_t n_blocks, n_shares;
  BlockShares(std::ptrdiff_t n_database, std::int64_t n_threads)
      : n_blocks((n_database + kBlockRows - 1) / kBlockRows),
        n_shares(std::max<std::ptrdiff_t>(1, std::min<std::ptrdiff_t>(effective_threads(n_threads), n_blocks))) {}
  std::ptrdiff_t first_block(std::ptrdiff_t share) const { return n_blocks * share / n_shares; }
  std::ptrdiff_t end_block(std::ptrdiff_t share) const { return n_blocks * (share + 1) / n_shares; }
};

// Score buffers of one thread: a transposed block and its scores for every (padded) query.
struct BlockBuffers {
  std::vector<float> block_t, scores;
  BlockBuffers(std::ptrdiff_t n_queries, std::ptrdiff_t dim)
      : block_t(dim * padded_width(kBlockRows)),
        scores((n_queries + kQueryTile - 1) / kQueryTile * kQueryTile * padded_width(kBlockRows)) {}
};

// One chunk of queries against the whole database, in float32; results go to rows first_row..
inline void topk_search_chunk(const float* database, std::ptrdiff_t n_database, const float* queries,
                              std::ptrdiff_t n_queries, std::ptrdiff_t dim, std::ptrdiff_t k, std::int64_t n_threads,
                              SearchResult& result, std::ptrdiff_t first_row) {
  const std::vector<float> query_buffer = padded_queries_buffer(queries, n_queries, dim);
  const BlockShares shares(n_database, n_threads);
  std::vector<std::vector<TopK>> share_hits(shares.n_shares);
  parallel_for(shares.n_shares, static_cast<int>(shares.n_shares), [&](std::ptrdiff_t share) {
    std::vector<TopK>& hits = share_hits[share] = empty_heaps(n_queries, k);
    BlockBuffers buffers(n_queries, dim);
    for (std::ptrdiff_t b = shares.first_block(share); b < shares.end_block(share); ++b) {
      const std::ptrdiff_t row0 = b * kBlockRows;
      scan_block_float32(database, row0, std::min(kBlockRows, n_database - row0), query_buffer.data(), n_queries, dim,
                         buffers.block_t.data(), buffers.scores.data(), hits);
    }
  });
  for (std::ptrdiff_t q = 0; q < n_queries; ++q) {
    std::vector<Hit> merged;
    merged.reserve(k * shares.n_shares);
    for (auto& share : share_hits) merged.insert(merged.end(), share[q].heap.begin(), share[q].heap.end());
    write_top_k(merged, k, result, first_row + q);
  }
}

// Queries are searched in chunks of at most this many, so that the per-thread score buffers
// and heaps stay bounded however many queries are given at once; with a large k (a full
// ranking asks for k = N) the chunk shrinks so that a thread's heaps hold at most
// kHitsPerChunk hits (128 MB).
constexpr std::ptrdiff_t kQueryChunk = 4096;
constexpr std::ptrdiff_t kHitsPerChunk = std::ptrdiff_t(1) << 23;

}  // namespace detail

}  // namespace clustermac
