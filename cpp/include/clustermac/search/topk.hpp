// Exact top-k dot-product (cosine, for l2-normalised vectors) search, blocked over database
// rows so that memory stays bounded whatever the database size (it may be memory-mapped).
//
// Three paths give the same bits: float32 (topk_float32.hpp: a register-tiled float32 kernel over
// transposed blocks); f32scan (topk_f32scan.hpp: for up to 16 queries at a time, a float32 scan of
// the rows in place, in another summation order, with a rigorous error bound) and, on CPUs with
// AVX512-BF16, bf16 (topk_bf16.hpp: a bfloat16 candidate scan with a rigorous error bound); both
// scans keep every row that can be in the exact top k and re-score those candidates with the
// float32 kernel (topk_candidates.hpp). Because their results are identical, "auto" may choose
// by timing: see auto_path.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <mutex>
#include <string>
#include <vector>

#include "clustermac/search/topk_bf16.hpp"
#include "clustermac/search/topk_f32scan.hpp"

namespace clustermac {

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

// One chunk of queries on one path (not kAuto); returns whether it ran on that path (a scan
// path runs a chunk whose query norms are beyond its bound's reach on the float32 path).
inline bool search_chunk_on(SearchPath path, const float* database, std::ptrdiff_t n_database, const float* queries,
                            std::ptrdiff_t n_queries, std::ptrdiff_t dim, std::ptrdiff_t k, std::int64_t n_threads,
                            SearchResult& result, std::ptrdiff_t first_row) {
  if (path == SearchPath::kBf16)
    return topk_search_chunk_bf16(database, n_database, queries, n_queries, dim, k, n_threads, result, first_row,
                                  &result.candidates_rescored);
  if (path == SearchPath::kFloat32Scan)
    return topk_search_chunk_f32scan(database, n_database, queries, n_queries, dim, k, n_threads, result, first_row,
                                     &result.candidates_rescored);
  topk_search_chunk(database, n_database, queries, n_queries, dim, k, n_threads, result, first_row);
  return true;
}

// Pseudo-random vectors for the timings below: 16384 rows × 512 dims (32 MB, more than the
// caches hold but the L3 of some CPUs, as a search database is) and 48 queries.
struct CalibrationData {
  static constexpr std::ptrdiff_t kDim = 512;
  std::vector<float> database, queries;
  CalibrationData() : database(16384 * kDim), queries(48 * kDim) {
    std::uint32_t state = 12345u;
    auto uniform = [&state] {
      state = state * 1664525u + 1013904223u;
      return static_cast<float>(state >> 8) * 0x1p-23f - 1.0f;
    };
    for (float& v : database) v = uniform();
    for (float& v : queries) v = uniform();
  }
};

// The fastest of `paths` for a single-threaded search of the first n_queries calibration queries
// (top 10): the paths alternating, best of 3 each in thread CPU time.
inline SearchPath fastest_path(const std::vector<SearchPath>& paths, std::ptrdiff_t n_queries) {
  const CalibrationData data;  // 32 MB, freed after the timing
  const std::ptrdiff_t dim = CalibrationData::kDim, n = static_cast<std::ptrdiff_t>(data.database.size()) / dim;
  std::vector<double> best(paths.size(), 1e30);
  SearchResult result;
  result.scores.resize(n_queries, 10);
  result.indices.resize(n_queries, 10);
  for (int repeat = 0; repeat < 3; ++repeat)
    for (std::size_t i = 0; i < paths.size(); ++i) {
      const double start = thread_seconds();
      search_chunk_on(paths[i], data.database.data(), n, data.queries.data(), n_queries, dim, 10, 1, result, 0);
      best[i] = std::min(best[i], thread_seconds() - start);
    }
  return paths[std::min_element(best.begin(), best.end()) - best.begin()];
}

// The choices of "auto": slot n (1 .. kRowScanQueries) for a chunk of n queries, the last slot for
// more; kAuto until timed (or preset from a cache, preset_auto_search_path).
struct AutoSearchPaths {
  std::mutex mutex;
  std::array<SearchPath, kRowScanQueries + 2> chosen{};
  static constexpr std::size_t kManyQueries = kRowScanQueries + 1;
};

inline AutoSearchPaths& auto_search_paths() {
  static AutoSearchPaths paths;
  return paths;
}

// The paths "auto" may choose among for a slot on this CPU.
inline std::vector<SearchPath> auto_path_candidates(std::size_t slot) {
  std::vector<SearchPath> paths = {SearchPath::kFloat32};
  if (simd_has_avx512_bf16()) paths.push_back(SearchPath::kBf16);
  if (slot != AutoSearchPaths::kManyQueries) paths.push_back(SearchPath::kFloat32Scan);
  return paths;
}

// The path "auto" takes for a chunk of n_queries queries, from timings on this CPU made once per
// process at first use (or preset from an earlier process's timings on this kind of CPU), all
// paths giving the same results (so the timing, and the cache, change only speed):
//  - more than kRowScanQueries queries: bf16 where the CPU has it and it times faster than float32
//    at 48 queries (≈ 0.1–0.2 s once; with 4096 rows × 256 dims the data stayed in cache and the
//    timing picked float32, which searches 1M rows 1.6× slower on the AMD EPYC), else float32;
//  - 1 .. kRowScanQueries queries: the fastest of float32, f32scan and bf16 (where the CPU has
//    it) timed at that many queries (each count timed once, ≈ 20–60 ms).
// The scan paths need k small against N (else most rows are candidates): k ≤ N/8.
inline SearchPath auto_path(std::ptrdiff_t n_queries, std::ptrdiff_t n_database, std::ptrdiff_t k) {
  if (8 * k > n_database) return SearchPath::kFloat32;
  AutoSearchPaths& state = auto_search_paths();
  const std::size_t slot =
      n_queries <= kRowScanQueries ? static_cast<std::size_t>(n_queries) : AutoSearchPaths::kManyQueries;
  const std::lock_guard<std::mutex> lock(state.mutex);
  if (state.chosen[slot] == SearchPath::kAuto) {
    const std::vector<SearchPath> paths = auto_path_candidates(slot);
    state.chosen[slot] = paths.size() == 1 ? paths[0] : fastest_path(paths, std::min<std::ptrdiff_t>(n_queries, 48));
  }
  return state.chosen[slot];
}

// A copy of the choices of "auto" so far (kAuto where a slot is not chosen yet).
inline std::array<SearchPath, kRowScanQueries + 2> chosen_auto_search_paths() {
  AutoSearchPaths& state = auto_search_paths();
  const std::lock_guard<std::mutex> lock(state.mutex);
  return state.chosen;
}

// Takes `path` for `slot` (see AutoSearchPaths) instead of timing it, unless the slot is already
// chosen in this process. Returns false, changing nothing, when `path` is not one "auto" may choose
// there on this CPU (bf16 without AVX512-BF16, f32scan for more than kRowScanQueries queries).
inline bool preset_auto_search_path(std::size_t slot, SearchPath path) {
  if (slot < 1 || slot > AutoSearchPaths::kManyQueries) return false;
  const std::vector<SearchPath> paths = auto_path_candidates(slot);
  if (std::find(paths.begin(), paths.end(), path) == paths.end()) return false;
  AutoSearchPaths& state = auto_search_paths();
  const std::lock_guard<std::mutex> lock(state.mutex);
  if (state.chosen[slot] == SearchPath::kAuto) state.chosen[slot] = path;
  return true;
}

}  // namespace detail

// Exact top-k of database · queryᵀ for every query: scores sorted descending, ties broken by
// the smaller database index. The database (N×D, row-major, possibly memory-mapped) is read
// in blocks of kBlockRows rows; each of n_threads threads (<= 0: all cores; capped at max_threads())
// scans a contiguous share of the rows with its own O(min(Q, kQueryChunk)·kBlockRows) score buffer
// and per-query heaps, which are merged at the end: the result does not depend on the thread count.
// path: float32, f32scan (chunks of at most kRowScanQueries queries), bf16 (std::invalid_argument
// without AVX512-BF16) or auto; all give the same bits.
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
  std::ptrdiff_t chunk = std::max<std::ptrdiff_t>(kQueryTile, std::min(kQueryChunk, kHitsPerChunk / k));
  if (path == SearchPath::kFloat32Scan) chunk = std::min(chunk, kRowScanQueries);
  for (std::ptrdiff_t first = 0; first < n_queries; first += chunk) {
    const std::ptrdiff_t count = std::min(chunk, n_queries - first);
    const SearchPath chosen = path == SearchPath::kAuto ? auto_path(count, n_database, k) : path;
    if (search_chunk_on(chosen, database, n_database, queries + first * dim, count, dim, k, n_threads, result, first))
      ++result.chunks[static_cast<int>(chosen)];
    else
      ++result.chunks[static_cast<int>(SearchPath::kFloat32)];
  }
  return result;
}

}  // namespace clustermac
