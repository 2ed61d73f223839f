// Bindings of search/: exact top-k search and AML localisation (on float maps and on 8-bit codes).
#include <algorithm>
#include <array>
#include <map>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

#include "bind_helpers.hpp"
#include "clustermac/search/aml.hpp"
#include "clustermac/search/topk.hpp"

namespace clustermac::bind {

namespace {

// The query vector, of length D = `channels`.
FloatArray checked_query(const py::handle& obj, py::ssize_t channels) {
  auto query = require_array<float>(obj, "query_vector", 1, "of shape (D,)");
  if (query.shape(0) != channels)
    throw py::value_error("query_vector: expected length D = " + std::to_string(channels) +
                          " (the feature map's channels), got " + describe(query));
  return query;
}

// The two AML entry points share their keywords: `localize(map, query, params)` is the core call,
// `channels(map)` the map's D.
template <typename Map, typename Convert, typename Channels, typename Localize>
void def_aml(py::module_& m, const char* name, const char* map_name, Convert convert, Channels channels,
             Localize localize, const char* doc) {
  m.def(
      name,
      [convert, channels, localize](const Map& map_obj, const FloatArrayArg& query_obj, double p, int step,
                                    double aspect_tolerance, int refine_iterations,
                                    const FloatOrNoneArg& query_aspect) {
        const auto map = convert(map_obj);
        const FloatArray query = checked_query(query_obj, channels(map));
        AmlParams params;
        params.p = p;
        params.step = step;
        params.aspect_tolerance = aspect_tolerance;
        params.refine_iterations = refine_iterations;
        if (!query_aspect.value.is_none())
          params.query_aspect =
              number_argument(query_aspect.value, "query_aspect", "a number (width / height) or None");
        AmlResult result;
        {
          py::gil_scoped_release release;
          result = localize(map, query.data(), params);
        }
        py::array_t<std::int32_t> box(4);
        for (int i = 0; i < 4; ++i) box.mutable_at(i) = result.box[i];
        return std::make_tuple(box, result.score);
      },
      py::arg(map_name), py::arg("query_vector"), py::arg("p") = 10.0, py::arg("step") = 3,
      py::arg("aspect_tolerance") = 1.1, py::arg("refine_iterations") = 5, py::arg("query_aspect") = py::none(), doc);
}

}  // namespace

// The values of topk_search's `path`, in the order of SearchPath.
const std::array<std::string, 4> kPathNames = {"auto", "float32", "bf16", "f32scan"};

// topk_search's result: (scores, indices), and the details when asked for.
using SearchArrays = std::tuple<py::array_t<float>, py::array_t<std::int64_t>>;
using SearchOutput = std::variant<SearchArrays, std::tuple<py::array_t<float>, py::array_t<std::int64_t>, py::dict>>;

// The name of an "auto" slot: the query count "1" .. "16", or "more".
std::string slot_name(std::size_t slot) {
  return slot == detail::AutoSearchPaths::kManyQueries ? "more" : std::to_string(slot);
}

void bind_search(py::module_& m) {
  m.def(
      "auto_search_paths",
      [] {
        py::dict out;
        decltype(detail::chosen_auto_search_paths()) chosen;
        {
          py::gil_scoped_release release;  // another thread may hold the choices' lock while it times
          chosen = detail::chosen_auto_search_paths();
        }
        for (std::size_t slot = 1; slot < chosen.size(); ++slot)
          if (chosen[slot] != SearchPath::kAuto)
            out[py::str(slot_name(slot))] = kPathNames[static_cast<int>(chosen[slot])];
        return out;
      },
      R"doc(The paths topk_search's "auto" has chosen in this process: {slot: path}, slot "1" .. "16"
(that many queries in a chunk) or "more", path "float32", "f32scan" or "bf16". Slots not searched
yet (or searched only with k > N/8, which always takes float32) are absent.)doc");
  m.def(
      "preset_auto_search_paths",
      [](const std::map<std::string, std::string>& choices) {
        std::vector<std::string> accepted;
        py::gil_scoped_release release;  // as in auto_search_paths
        for (const auto& [slot_text, path_text] : choices) {
          std::size_t slot = 0;
          for (std::size_t s = 1; s <= detail::AutoSearchPaths::kManyQueries; ++s)
            if (slot_name(s) == slot_text) slot = s;
          const auto named = std::find(kPathNames.begin() + 1, kPathNames.end(), path_text);
          if (slot == 0 || named == kPathNames.end()) continue;
          if (detail::preset_auto_search_path(slot, static_cast<SearchPath>(named - kPathNames.begin())))
            accepted.push_back(slot_text);
        }
        return accepted;
      },
      py::arg("choices"),
      R"doc(Take "auto" choices timed by an earlier process on this kind of CPU ({slot: path}, as
auto_search_paths gives them) instead of timing again: every path gives the same results, so this
changes only how long the first search of each batch size takes. A slot already chosen in this
process keeps its choice; an unknown slot or path, or one this CPU cannot take there (bf16 without
AVX512-BF16, f32scan for "more"), is skipped. Returns the slots taken.)doc");
  m.def(
      "topk_search",
      [](const FloatArrayArg& database_obj, const FloatArrayArg& queries_obj, std::int64_t k, std::int64_t n_threads,
         const std::string& path, bool return_details) -> SearchOutput {
        auto database = require_array<float>(database_obj, "database", 2, "of shape (N, D)");
        auto queries = require_array<float>(queries_obj, "queries", 2, "of shape (Q, D)");
        if (queries.shape(1) != database.shape(1))
          throw py::value_error("queries: expected D = " + std::to_string(database.shape(1)) +
                                " columns (the database's), got " + describe(queries));
        if (database.shape(0) < 1)
          throw py::value_error("database: expected at least one row, got " + describe(database));
        const auto named = std::find(kPathNames.begin(), kPathNames.end(), path);
        if (named == kPathNames.end())
          throw py::value_error("path: expected \"auto\", \"float32\", \"bf16\" or \"f32scan\", got \"" + path + "\"");
        const auto search_path = static_cast<SearchPath>(named - kPathNames.begin());
        SearchResult result;
        {
          py::gil_scoped_release release;
          result = topk_search(database.data(), database.shape(0), queries.data(), queries.shape(0), database.shape(1),
                               k, n_threads, search_path);
        }
        auto scores = to_numpy(std::move(result.scores));
        auto indices = to_numpy(std::move(result.indices));
        if (!return_details) return std::make_tuple(scores, indices);
        py::dict details;
        std::string used;  // the paths that searched the query chunks, e.g. "bf16" or "bf16+f32scan"
        for (std::size_t p = 1; p < kPathNames.size(); ++p)
          if (result.chunks[p] > 0) used += (used.empty() ? "" : "+") + kPathNames[p];
        details["path"] = used.empty() ? kPathNames[1] : used;
        details["candidates_rescored"] = result.candidates_rescored;
        return std::make_tuple(scores, indices, details);
      },
      py::arg("database"), py::arg("queries"), py::arg("k"), py::arg("n_threads") = 0, py::arg("path") = "auto",
      py::arg("return_details") = false,
      R"doc(Exact top-k dot-product search (cosine similarity for l2-normalised vectors).

database: float32 N×D, C-contiguous (a np.memmap works and is streamed block by block);
queries: float32 Q×D; 1 <= k <= N; n_threads <= 0 uses every core, and more threads than the
hardware has (os.cpu_count()) are capped at that number; the result does not depend on
n_threads. Returns (scores float32 Q×k sorted descending, indices int64 Q×k), ties broken by the
smaller database index. Memory beyond the inputs is O(threads·Q·256) floats. The GIL is released.
path: "float32" scores every row in float32 (a register-tiled kernel over transposed blocks);
"f32scan" scans the rows in place in float32, up to 16 queries at a time, with a rigorous bound on
the gap to the float32 kernel's score; "bf16" (CPUs with AVX512-BF16 only, else ValueError) scans
in bfloat16 with a rigorous error bound; both scans re-score their candidates with the float32
kernel, so every path returns the same bits as "float32". "auto" (default) picks, when k <= N/8,
the path that a one-off timing in this process (tens of ms of thread CPU time, at the first
search of each batch size up to 16 and at the first larger one) found fastest; else float32.
clustermac.Index.search keeps those choices on disk per kind of CPU (clustermac.search.path_cache),
so that later processes take them without timing (preset_auto_search_paths).
return_details=True adds a third item: {"path": the path used ("float32", "bf16", "f32scan", or
several joined by "+" when query chunks used different ones), "candidates_rescored": rows the scan
paths re-scored in float32, summed over queries}.
Errors: NaN or Inf in database or queries → ValueError naming the row; a returned score that
overflows float32 (vectors far from unit norm) → ValueError (only the k returned scores of each
query are checked, so a NaN score outside them is skipped silently); the system refusing to
start a thread → RuntimeError (n_threads=1 runs on the calling thread only).)doc");

  def_aml<FloatArrayArg>(
      m, "aml_localize", "feature_map",
      [](const FloatArrayArg& obj) { return require_array<float>(obj, "feature_map", 3, "of shape (D, H, W)"); },
      [](const FloatArray& map) { return map.shape(0); },
      [](const FloatArray& map, const float* query, const AmlParams& params) {
        return aml_localize(map.data(), map.shape(0), map.shape(1), map.shape(2), query, params);
      },
      R"doc(Approximate max-pooling localisation (AML, Tolias et al. ICLR 2016).

Finds the box of a non-negative float32 D×H×W feature map whose generalised-mean vector
(sum x^p)^(1/p) has the highest cosine with ``query_vector`` (float32 D, e.g. the query's MAC).
Boxes with corners on a grid of ``step`` cells (plus the far borders) are searched exhaustively,
restricted, when ``query_aspect`` (query width / height) is given, to aspect ratios within a
factor ``aspect_tolerance`` of it; the best box is then refined by moving one edge by 1..step
cells at a time for up to ``refine_iterations`` rounds. Returns (box int32 [x0, y0, x1, y1)
half-open in cells, score float).)doc");

  def_aml<CodesArg>(
      m, "aml_localize_codes", "codes", [](const CodesArg& obj) { return checked_codes(obj); },
      [](const py::array_t<std::uint8_t, py::array::c_style>& codes) { return codes.shape(2); },
      [](const py::array_t<std::uint8_t, py::array::c_style>& codes, const float* query, const AmlParams& params) {
        return aml_localize_codes(CodesView{codes.data(), codes.shape(0), codes.shape(1), codes.shape(2)}, query,
                                  params);
      },
      "aml_localize on an 8-bit quantised feature map stored channel-last (uint8 H×W×D codes, value = code·scale; "
      "the scale cancels in the cosine). Used by clustermac.rerank on its compact feature-map store.");
}

}  // namespace clustermac::bind
