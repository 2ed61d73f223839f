// The f32scan path of the exact top-k search (topk.hpp), for a few queries on any CPU: a float32
// candidate scan that reads the database rows in place (row-wise dot products in registers,
// prefetching a few rows ahead, no transposed block), then the float32 path's re-score of the
// candidates (topk_candidates.hpp). It returns the float32 path's results bit for bit. With few
// queries the float32 path's cost is its block transposition, not its multiply-adds; this scan
// reads each row once, as the memory allows, and needs neither AVX512-BF16 nor AVX-512.
//
// Why |a − s| ≤ ε (u = 2^-24, γ = (D+8)·u / (1 − (D+8)·u)). For a query q and a row x of length
// D, s = the float32 path's score (one lane of a register tile: a running sum over d = 0 .. D−1
// of q_d·x_d, multiply-adds fused or not) and a = this scan's score (per-lane running sums over
// the d of one lane, L ≤ 16 lanes, then a tree of additions over the lanes) are two float32
// evaluations of q·x = Σ q_d·x_d in different orders. For any order in which every product and
// partial sum is rounded once (a fused multiply-add rounds once for both), |fl(q·x) − q·x| ≤
// γ_n·Σ|q_d·x_d| with n the largest number of roundings on the way from one product to the
// result (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1 and (3.5));
// n ≤ D for s and n ≤ (⌈D/L⌉ + 1) + log2(L) ≤ D + 8 for a (at most ⌈D/L⌉ + 1 vectors per lane
// when a partial first vector aligns the loads; lanes masked to zero add exact zeros). By
// Cauchy–Schwarz Σ|q_d·x_d| ≤ ‖q‖·‖x‖.
// Denormals: with gradual underflow a product adds at most 2^-150 (a sum that underflows is
// exact); if the thread flushes denormals (FTZ/DAZ), an input flushed to zero costs at most
// |q_d|·2^-126 or |x_d|·2^-126 and a flushed product or sum at most 2^-126, each carried by at
// most (1 + γ) ≤ 2: in all τ ≤ 2^-125·(√D·(‖q‖ + ‖x‖) + 2D + 8) ≤ 2^-120·(√D·(‖q‖ + ‖x‖) + D)
// per score. So
//   |a − s| ≤ |a − q·x| + |q·x − s| ≤ 2γ·‖q‖·‖x‖ + 2τ = ε(q, x) = β_q·‖x‖ + c_q,
// with ‖q‖ and ‖x‖ replaced by upper bounds (‖x‖ from the float32 sum of squares the scan takes
// in the same pass: norm_upper_bound), and f32scan_bound_coefficients adding the rounding of the
// float32 evaluation of a ± ε. The rest of the argument (candidates, L, re-score) is in
// topk_candidates.hpp; rows and queries of norm ≥ 2^50 are handled there too.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "clustermac/search/topk_candidates.hpp"

namespace clustermac {
namespace detail {

// β and c of ε(q, x) = β·‖x‖ + c (alpha = 0) for a query of norm ≤ query_norm (see the proof
// above). The float32 evaluation of a ± ε: beta carries u·|a| ≤ u·(1 + γ)·‖q‖·‖x‖, the constant
// a flushed result (2^-120 > 2^-126) and u·τ; the coefficients are inflated by 2^-19 > the
// relative error of two multiply-adds plus 1/(1 − u), then rounded up to float.
inline BoundCoefficients f32scan_bound_coefficients(double query_norm, std::ptrdiff_t dim) {
  const double n = static_cast<double>(dim) + 8.0;
  const double gamma = n * 0x1p-24 / (1.0 - n * 0x1p-24);
  const double root = std::sqrt(static_cast<double>(dim));
  const double beta = 2.0 * gamma * query_norm + 2.0 * 0x1p-120 * root + 0x1p-24 * (1.0 + gamma) * query_norm;
  const double constant = 2.0 * 0x1p-120 * (root * query_norm + static_cast<double>(dim)) + 0x1p-119;
  const double inflate = (1.0 + 0x1p-19) * (1.0 + 0x1p-22);  // then float rounding (≤ 2^-24)
  return {0.0f, static_cast<float>(beta * inflate), static_cast<float>(constant * inflate)};
}

// The sum of a vector's lanes (a tree of log2(L) levels of additions, as the proof above counts).
CLUSTERMAC_ALWAYS_INLINE float sum_lanes(const Float4& v) { return (v[0] + v[2]) + (v[1] + v[3]); }
CLUSTERMAC_ALWAYS_INLINE float sum_lanes(const Float8& v) {
  const Float4 low = load<Float4>(reinterpret_cast<const float*>(&v)),
               high = load<Float4>(reinterpret_cast<const float*>(&v) + 4);
  return sum_lanes(low + high);
}
CLUSTERMAC_ALWAYS_INLINE float sum_lanes(const Float16& v) {
  const Float8 low = load<Float8>(reinterpret_cast<const float*>(&v)),
               high = load<Float8>(reinterpret_cast<const float*>(&v) + 8);
  return sum_lanes(low + high);
}

// Scores of Rows consecutive rows (`dim` floats apart) against Count queries (rows of `queries`,
// `stride` ≥ dim + 16 floats apart, zero past dim, with 16 zeros before the first) written to
// approx[t·width + i], and the rows' float32 sums of squares to squares[i]. Each query vector
// loaded serves every row. head ≥ 0: every row and query has its first 64-byte boundary `head`
// values in (Float32Scan), so the loads start there, and the partial vectors before and after are
// aligned loads with the lanes outside the row zeroed: they stay within the row's first and last
// 64-byte lines, hence within mapped pages (no split cache lines, no copies). head < 0: plain
// loads and a zero-padded copy of the last values.
template <typename Vec, int Lanes, int Rows, int Count>
CLUSTERMAC_ALWAYS_INLINE void score_rows_float32(const float* rows, std::ptrdiff_t dim, std::ptrdiff_t head,
                                                 const float* queries, std::ptrdiff_t stride, float* approx,
                                                 std::ptrdiff_t width, float* squares) {
  typedef typename Vectors<Lanes>::I IVec;
  Vec acc[Rows][Count], sums[Rows];
  for (int i = 0; i < Rows; ++i) {
    sums[i] = Vec{};
    for (int t = 0; t < Count; ++t) acc[i][t] = Vec{};
  }
  auto accumulate = [&](const Vec* x, std::ptrdiff_t d) __attribute__((always_inline)) {
    for (int i = 0; i < Rows; ++i) sums[i] += x[i] * x[i];
    for (int t = 0; t < Count; ++t) {
      const Vec q = load<Vec>(queries + t * stride + d);
      for (int i = 0; i < Rows; ++i) acc[i][t] += q * x[i];
    }
  };
  // The vectors at rows + i·dim + d with the lanes j where keep[j] == 0 zeroed (finite q · 0 adds 0).
  auto accumulate_masked = [&](std::ptrdiff_t d, const IVec& keep) __attribute__((always_inline)) {
    Vec x[Rows];
    for (int i = 0; i < Rows; ++i) x[i] = bit_cast<Vec>(bit_cast<IVec>(load<Vec>(rows + i * dim + d)) & keep);
    accumulate(x, d);
  };
  IVec lane;
  for (int j = 0; j < Lanes; ++j) lane[j] = j;
  std::ptrdiff_t d = 0;
  if (head >= 0 && head % Lanes > 0) {  // the values before the first aligned load
    d = head % Lanes;
    accumulate_masked(d - Lanes, lane >= (IVec{} + static_cast<int>(Lanes - d)));
  }
  for (; d + Lanes <= dim; d += Lanes) {
    Vec x[Rows];
    for (int i = 0; i < Rows; ++i) x[i] = load<Vec>(rows + i * dim + d);
    accumulate(x, d);
  }
  if (d < dim && head >= 0) {
    accumulate_masked(d, lane < (IVec{} + static_cast<int>(dim - d)));
  } else if (d < dim) {
    Vec x[Rows];  // the last dim − d values, zero-padded
    for (int i = 0; i < Rows; ++i) {
      x[i] = Vec{};
      std::memcpy(&x[i], rows + i * dim + d, static_cast<std::size_t>(dim - d) * sizeof(float));
    }
    accumulate(x, d);
  }
  for (int i = 0; i < Rows; ++i) {
    for (int t = 0; t < Count; ++t) approx[t * width + i] = sum_lanes(acc[i][t]);
    squares[i] = sum_lanes(sums[i]);
  }
}

// score_rows_float32 for Remaining queries, Group at a time (as many accumulators as the
// registers hold); the rows stay in L1 between groups.
template <typename Vec, int Lanes, int Rows, int Group, int Remaining>
CLUSTERMAC_ALWAYS_INLINE void score_rows_groups(const float* rows, std::ptrdiff_t dim, std::ptrdiff_t head,
                                                const float* queries, std::ptrdiff_t stride, float* approx,
                                                std::ptrdiff_t width, float* squares) {
  constexpr int Count = Remaining < Group ? Remaining : Group;
  score_rows_float32<Vec, Lanes, Rows, Count>(rows, dim, head, queries, stride, approx, width, squares);
  if constexpr (Remaining > Count)
    score_rows_groups<Vec, Lanes, Rows, Group, Remaining - Count>(rows, dim, head, queries + Count * stride, stride,
                                                                  approx + Count * width, width, squares);
}

// Approximate scores of `rows` consecutive rows (from `first`) against Queries queries, to
// approx[t·width + r], and the rows' sums of squares to squares[r]; rows up to `available` from
// `first` exist and may be prefetched. Two rows at a time: each query vector loaded serves both.
template <int Queries>
struct ScoreRowsFloat32Kernel {
  static constexpr SimdLevel widest = kSimdAvx512;
  template <SimdLevel L>
  static CLUSTERMAC_ALWAYS_INLINE void run(const float* first, std::ptrdiff_t rows, std::ptrdiff_t available,
                                           std::ptrdiff_t dim, std::ptrdiff_t head, const float* queries,
                                           std::ptrdiff_t stride, float* approx, std::ptrdiff_t width, float* squares) {
    constexpr int Lanes = lanes<L>();
    constexpr int Group = L == kSimdAvx512 ? 8 : 4;  // 2 × Group accumulators + 5 of the 32 or 16 registers
    typedef typename Vectors<Lanes>::F Vec;
    std::ptrdiff_t r = 0;
    for (; r + 2 <= rows; r += 2) {
      const float* row = first + r * dim;
      if (r + kPrefetchRows + 2 <= available)  // one pass per row is too little reading for the hardware prefetcher
        for (std::ptrdiff_t d = 0; d < 2 * dim; d += 16) __builtin_prefetch(row + kPrefetchRows * dim + d);
      score_rows_groups<Vec, Lanes, 2, Group, Queries>(row, dim, head, queries, stride, approx + r, width, squares + r);
    }
    if (r < rows)
      score_rows_groups<Vec, Lanes, 1, Group, Queries>(first + r * dim, dim, head, queries, stride, approx + r, width,
                                                       squares + r);
  }
};

// ScoreRowsFloat32Kernel<Queries> at the active SIMD level, for 1 .. kRowScanQueries queries.
template <int Queries>
void score_rows_float32(const float* first, std::ptrdiff_t rows, std::ptrdiff_t available, std::ptrdiff_t dim,
                        std::ptrdiff_t head, const float* queries, std::ptrdiff_t stride, float* approx,
                        std::ptrdiff_t width, float* squares) {
  dispatch<ScoreRowsFloat32Kernel<Queries>>(first, rows, available, dim, head, queries, stride, approx, width, squares);
}
template <std::size_t... Counts>
constexpr auto float32_row_scorers(std::index_sequence<Counts...>) {
  using Scorer = void (*)(const float*, std::ptrdiff_t, std::ptrdiff_t, std::ptrdiff_t, std::ptrdiff_t, const float*,
                          std::ptrdiff_t, float*, std::ptrdiff_t, float*);
  return std::array<Scorer, sizeof...(Counts)>{&score_rows_float32<static_cast<int>(Counts) + 1>...};
}

// The float32 scan of topk_search_chunk_candidates, for 1 .. kRowScanQueries queries (topk.hpp
// splits larger batches): approximate scores in another summation order and ‖x‖ (beta).
struct Float32Scan {
  std::ptrdiff_t n_queries, dim, stride, head;
  std::vector<float> query_buffer;  // holds query_rows
  const float* query_rows;          // n_queries × stride, zero past dim, aligned as the database rows
  std::vector<BoundCoefficients> coefficients;
  bool in_reach = true;

  // head: the values of every database row before its first 64-byte boundary when all rows have
  // the same alignment (D a multiple of 16, float-aligned data), else −1; the query rows are copied
  // with that alignment, after 16 zeros.
  Float32Scan(const float* database, const float* queries, std::ptrdiff_t n_queries_, std::ptrdiff_t dim_)
      : n_queries(n_queries_), dim(dim_), stride((dim_ + 15) / 16 * 16 + 16), coefficients(n_queries_) {
    require(n_queries >= 1 && n_queries <= kRowScanQueries, "Float32Scan: 1 .. 16 queries at a time");
    const auto address = reinterpret_cast<std::uintptr_t>(database);
    const bool alike = dim % 16 == 0 && address % 4 == 0;
    const std::ptrdiff_t offset = alike ? address / 4 % 16 : 0;  // floats past a 64-byte boundary
    head = alike ? (16 - offset) % 16 : -1;
    query_buffer.assign(n_queries * stride + 48, 0.0f);
    const auto buffer = reinterpret_cast<std::uintptr_t>(query_buffer.data());
    float* rows = query_buffer.data() + (16 - buffer / 4 % 16) % 16 + 16 + offset;
    query_rows = rows;
    for (std::ptrdiff_t q = 0; q < n_queries && in_reach; ++q) {
      const double query_norm = norm_upper_bound(queries + q * dim, dim);
      in_reach = query_norm < kMaxBoundedNorm;
      std::copy(queries + q * dim, queries + (q + 1) * dim, rows + q * stride);
      coefficients[q] = f32scan_bound_coefficients(query_norm, dim);
    }
  }
  Float32Scan(const Float32Scan&) = delete;  // query_rows points into query_buffer

  struct Buffers {
    std::vector<float> squares;
    explicit Buffers(const Float32Scan&) : squares(kBlockRows) {}
  };

  void score_block(const float* database, std::ptrdiff_t n_database, std::ptrdiff_t row0, std::ptrdiff_t rows,
                   std::ptrdiff_t width, Buffers& buffers, float* approx, float* zero_norms, float* row_norms) const {
    static constexpr auto scorers = float32_row_scorers(std::make_index_sequence<kRowScanQueries>());
    scorers[n_queries - 1](database + row0 * dim, rows, n_database - row0, dim, head, query_rows, stride, approx, width,
                           buffers.squares.data());
    for (std::ptrdiff_t r = 0; r < rows; ++r) {
      const float sum = buffers.squares[r];
      if (!std::isfinite(sum)) {  // a NaN or an infinity in the row, or only squares beyond float32
        const float* row = database + (row0 + r) * dim;
        for (std::ptrdiff_t d = 0; d < dim; ++d)
          if (!std::isfinite(row[d]))
            fail("database: row " + std::to_string(row0 + r) + " contains NaN or Inf; expected only finite numbers");
      }
      zero_norms[r] = 0.0f;
      row_norms[r] = std::isfinite(sum) ? norm_upper_bound(sum, dim) : std::numeric_limits<float>::infinity();
      if (!(row_norms[r] < kMaxBoundedNorm)) {  // never pruned: approximate score 0 and ε = +∞
        for (std::ptrdiff_t q = 0; q < n_queries; ++q) approx[q * width + r] = 0.0f;
        row_norms[r] = std::numeric_limits<float>::infinity();
      }
    }
  }
};

// One chunk of 1 .. kRowScanQueries queries against the whole database on the f32scan path;
// results go to rows first_row.. of `result`, identical to topk_search_chunk's. Adds the number
// of candidates re-scored in float32 to *candidates_rescored; returns false if the chunk ran on
// the float32 path instead (a query norm beyond the bound's reach).
inline bool topk_search_chunk_f32scan(const float* database, std::ptrdiff_t n_database, const float* queries,
                                      std::ptrdiff_t n_queries, std::ptrdiff_t dim, std::ptrdiff_t k,
                                      std::int64_t n_threads, SearchResult& result, std::ptrdiff_t first_row,
                                      std::int64_t* candidates_rescored) {
  return topk_search_chunk_candidates<Float32Scan>(database, n_database, queries, n_queries, dim, k, n_threads, result,
                                                   first_row, candidates_rescored);
}

}  // namespace detail
}  // namespace clustermac
