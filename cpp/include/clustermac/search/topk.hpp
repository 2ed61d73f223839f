// Exact top-k dot-product (cosine, for l2-normalised vectors) search, blocked over database
// rows so that memory stays bounded whatever the database size (it may be memory-mapped).
//
// Two paths give the same bits: float32 (topk_float32.hpp: a register-tiled float32 kernel) and,
// on CPUs with AVX512-BF16, bf16 (topk_bf16.hpp: a bfloat16 candidate scan with a rigorous error
// bound, then the candidates re-scored by the float32 kernel). Because their results are
// identical, "auto" may choose by timing: see choose_path.
#pragma once

#include <chrono>
#include <cstdint>
#include <ctime>
#include <string>
#include <vector>

#include "clustermac/search/topk_bf16.hpp"

namespace clustermac {

enum class SearchPath { kAuto, kFloat32, kBf16 };

namespace detail {

// CPU seconds of the calling thread (wall-clock seconds where that clock is missing): the
// calibration below runs on the calling thread, and CPU time ignores the time other processes
// take the core away, which would otherwise decide the choice on a loaded machine.
inline double thread_seconds() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec now;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now) == 0) return static_cast<double>(now.tv_sec) + 1e-9 * now.tv_nsec;
#endif
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Seconds for one single-threaded search of `queries` against `database` on one path.
inline double time_path(const std::vector<float>& database, const std::vector<float>& queries, std::ptrdiff_t dim,
                        bool bf16) {
  const std::ptrdiff_t n = static_cast<std::ptrdiff_t>(database.size()) / dim;
  const std::ptrdiff_t q = static_cast<std::ptrdiff_t>(queries.size()) / dim, k = 10;
  SearchResult result;
  result.scores.resize(q, k);
  result.indices.resize(q, k);
  std::int64_t rescored = 0;
  const double start = thread_seconds();
  if (bf16)
    topk_search_chunk_bf16(database.data(), n, queries.data(), q, dim, k, 1, result, 0, &rescored);
  else
    topk_search_chunk(database.data(), n, queries.data(), q, dim, k, 1, result, 0);
  return thread_seconds() - start;
}

// Whether the bf16 path searches faster than the float32 path on this CPU: timed once per
// process at first use (48 queries × 16384 rows × 512 dims, 32 MB, more than the caches hold,
// as a search database is; the two paths alternating, best of 3 each in thread CPU time, about
// 0.1 s in all), on pseudo-random vectors. Both paths give the same results, so the timing
// changes only speed. (With 4096 rows × 256 dims the data stayed in cache and the timing picked
// float32, which searches 1M rows 1.6× slower on the AMD EPYC.)
inline bool bf16_measured_faster() {
  static const bool faster = [] {
    if (!simd_has_avx512_bf16()) return false;
    const std::ptrdiff_t dim = 512;
    std::vector<float> database(16384 * dim), queries(48 * dim);
    std::uint32_t state = 12345u;
    auto uniform = [&state] {
      state = state * 1664525u + 1013904223u;
      return static_cast<float>(state >> 8) * 0x1p-23f - 1.0f;
    };
    for (float& v : database) v = uniform();
    for (float& v : queries) v = uniform();
    double float32 = 1e30, bf16 = 1e30;
    for (int repeat = 0; repeat < 3; ++repeat) {
      float32 = std::min(float32, time_path(database, queries, dim, false));
      bf16 = std::min(bf16, time_path(database, queries, dim, true));
    }
    return bf16 < float32;
  }();
  return faster;
}

// The path of a search: "auto" takes bf16 where the CPU has it, k is small against N (else most
// rows are candidates) and the timing above found it faster; otherwise float32. The batch size is
// not a criterion: on the AMD EPYC the bf16 path also won for 1 and 8 queries (benchmarks/search.py).
inline bool use_bf16(SearchPath path, std::ptrdiff_t n_database, std::ptrdiff_t k) {
  if (path == SearchPath::kFloat32) return false;
  if (path == SearchPath::kBf16) return true;
  return simd_has_avx512_bf16() && 8 * k <= n_database && bf16_measured_faster();
}

}  // namespace detail

// Exact top-k of database · queryᵀ for every query: scores sorted descending, ties broken by
// the smaller database index. The database (N×D, row-major, possibly memory-mapped) is read
// in blocks of kBlockRows rows; each of n_threads threads (<= 0: all cores; capped at max_threads())
// scans a contiguous share of the rows with its own O(min(Q, kQueryChunk)·kBlockRows) score buffer
// and per-query heaps, which are merged at the end: the result does not depend on the thread count.
// path: float32, bf16 (std::invalid_argument without AVX512-BF16) or auto; all give the same bits.
// A non-finite database value raises std::invalid_argument naming its row; so does a returned
// score that overflowed float32 (only the top k are checked).
inline SearchResult topk_search(const float* database, std::ptrdiff_t n_database, const float* queries,
                                std::ptrdiff_t n_queries, std::ptrdiff_t dim, std::ptrdiff_t k, std::int64_t n_threads,
                                SearchPath path = SearchPath::kAuto) {
  using namespace detail;
  require(dim >= 1, "topk_search: vectors must have at least one dimension");
  require(k >= 1 && k <= n_database,
          "k: expected 1 <= k <= N = " + std::to_string(n_database) + " (database rows), got " + std::to_string(k));
  require(path != SearchPath::kBf16 || simd_has_avx512_bf16(),
          "path: \"bf16\" needs a CPU with AVX512-BF16 (and CLUSTERMAC_NO_BF16 unset); use \"auto\" or \"float32\"");
  for (std::ptrdiff_t i = 0; i < n_queries * dim; ++i)
    if (!std::isfinite(queries[i]))
      fail("queries: row " + std::to_string(i / dim) + " contains NaN or Inf; expected only finite numbers");
  SearchResult result;
  result.scores.resize(n_queries, k);
  result.indices.resize(n_queries, k);
  const std::ptrdiff_t chunk = std::max<std::ptrdiff_t>(kQueryTile, std::min(kQueryChunk, kHitsPerChunk / k));
  for (std::ptrdiff_t first = 0; first < n_queries; first += chunk) {
    const std::ptrdiff_t count = std::min(chunk, n_queries - first);
    if (use_bf16(path, n_database, k))
      result.bf16_chunks += topk_search_chunk_bf16(database, n_database, queries + first * dim, count, dim, k,
                                                   n_threads, result, first, &result.candidates_rescored);
    else
      topk_search_chunk(database, n_database, queries + first * dim, count, dim, k, n_threads, result, first);
  }
  return result;
}

}  // namespace clustermac
