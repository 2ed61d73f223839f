// Bindings of search.hpp (exact top-k) and localization.hpp (AML): check and convert,
// release the GIL, call the core.
#include <pybind11/stl.h>

#include "bind_helpers.hpp"
#include "clustermac/localization.hpp"
#include "clustermac/search.hpp"
#include "clustermac/whitening.hpp"

namespace clustermac::bind {

namespace {

using FloatArray = py::array_t<float, py::array::c_style>;

AmlParams make_params(double p, int step, double aspect_tolerance, const py::object& query_aspect, int refine_iterations) {
  AmlParams params;
  params.p = p;
  params.step = step;
  params.aspect_tolerance = aspect_tolerance;
  if (!query_aspect.is_none()) {
    params.query_aspect = query_aspect.cast<double>();
    if (!(params.query_aspect > 0.0))
      throw py::value_error("query_aspect: expected None or a finite number > 0 (width / height), got " +
                            std::to_string(params.query_aspect));
  }
  params.refine_iterations = refine_iterations;
  check_aml_params(params);
  return params;
}

// The l2-normalised query; a zero or non-finite query is refused (no box can match it).
VectorF unit_query(const py::object& obj, py::ssize_t channels) {
  auto query = require_array<float>(obj, "query_vector", 1, "of shape (D,)");
  if (query.shape(0) != channels)
    throw py::value_error("query_vector: expected length D = " + std::to_string(channels) +
                          " (the feature map's channels), got " + describe(query));
  VectorF q = Eigen::Map<const VectorF>(query.data(), channels);
  if (!q.allFinite()) throw py::value_error("query_vector contains NaN or Inf values; expected only finite numbers");
  if (!l2_normalize_in_place(q.data(), q.size()))
    throw py::value_error("query_vector is all zeros; expected the query's (non-zero) MAC vector");
  return q;
}

py::tuple box_result(const AmlResult& r) {
  py::array_t<std::int32_t> box(4);
  for (int i = 0; i < 4; ++i) box.mutable_at(i) = r.box[i];
  return py::make_tuple(box, r.score);
}

}  // namespace

void bind_search(py::module_& m) {
  m.def(
      "topk_search",
      [](const py::object& database_obj, const py::object& queries_obj, std::int64_t k, int n_threads) {
        auto database = require_array<float>(database_obj, "database", 2, "of shape (N, D)");
        auto queries = require_array<float>(queries_obj, "queries", 2, "of shape (Q, D)");
        if (queries.shape(1) != database.shape(1))
          throw py::value_error("queries: expected D = " + std::to_string(database.shape(1)) +
                                " columns (the database's), got " + describe(queries));
        if (database.shape(0) < 1) throw py::value_error("database: expected at least one row, got " + describe(database));
        SearchResult result;
        {
          py::gil_scoped_release release;
          result = topk_search(database.data(), database.shape(0), queries.data(), queries.shape(0), database.shape(1), k,
                               n_threads);
        }
        return py::make_tuple(to_numpy(std::move(result.scores)), to_numpy(std::move(result.indices)));
      },
      py::arg("database"), py::arg("queries"), py::arg("k"), py::arg("n_threads") = 0,
      R"doc(Exact top-k dot-product search (cosine similarity for l2-normalised vectors).

database: float32 N×D, C-contiguous (a np.memmap works and is streamed block by block);
queries: float32 Q×D; 1 <= k <= N; n_threads <= 0 uses every core. Returns (scores float32
Q×k sorted descending, indices int64 Q×k), ties broken by the smaller database index. Memory
beyond the inputs is O(threads·Q·256) floats. The GIL is released.)doc");

  m.def(
      "aml_localize",
      [](const py::object& feature_map_obj, const py::object& query_obj, double p, int step, double aspect_tolerance,
         int refine_iterations, const py::object& query_aspect) {
        auto fmap = require_array<float>(feature_map_obj, "feature_map", 3, "of shape (D, H, W)");
        const py::ssize_t channels = fmap.shape(0), height = fmap.shape(1), width = fmap.shape(2);
        if (channels < 1 || height < 1 || width < 1)
          throw py::value_error("feature_map: expected a non-empty D×H×W array, got " + describe(fmap));
        const AmlParams params = make_params(p, step, aspect_tolerance, query_aspect, refine_iterations);
        const VectorF query = unit_query(query_obj, channels);
        AmlResult result;
        {
          py::gil_scoped_release release;
          const float* data = fmap.data();
          const std::ptrdiff_t count = channels * height * width;
          for (std::ptrdiff_t i = 0; i < count; ++i) {
            if (!std::isfinite(data[i])) fail("feature_map contains NaN or Inf values; expected only finite numbers");
            if (data[i] < 0.0f) fail("feature_map has negative values; AML expects non-negative (post-ReLU) activations");
          }
          result = aml_localize(data, channels, height, width, query.data(), params);
        }
        return box_result(result);
      },
      py::arg("feature_map"), py::arg("query_vector"), py::arg("p") = 10.0, py::arg("step") = 3,
      py::arg("aspect_tolerance") = 1.1, py::arg("refine_iterations") = 5, py::arg("query_aspect") = py::none(),
      R"doc(Approximate max-pooling localisation (AML, Tolias et al. ICLR 2016).

Finds the box of a non-negative float32 D×H×W feature map whose generalised-mean vector
(sum x^p)^(1/p) has the highest cosine with ``query_vector`` (float32 D, e.g. the query's MAC).
Boxes with corners on a grid of ``step`` cells (plus the far borders) are searched exhaustively,
restricted, when ``query_aspect`` (query width / height) is given, to aspect ratios within a
factor ``aspect_tolerance`` of it; the best box is then refined by moving one edge by 1..step
cells at a time for up to ``refine_iterations`` rounds. Returns (box int32 [x0, y0, x1, y1)
half-open in cells, score float).)doc");

  m.def(
      "aml_localize_codes",
      [](const py::object& codes_obj, const py::object& query_obj, double p, int step, double aspect_tolerance,
         int refine_iterations, const py::object& query_aspect) {
        auto codes = checked_codes(codes_obj);
        const py::ssize_t height = codes.shape(0), width = codes.shape(1), channels = codes.shape(2);
        if (channels < 1 || height < 1 || width < 1)
          throw py::value_error("codes: expected a non-empty H×W×D array, got " + describe(codes));
        const AmlParams params = make_params(p, step, aspect_tolerance, query_aspect, refine_iterations);
        const VectorF query = unit_query(query_obj, channels);
        AmlResult result;
        {
          py::gil_scoped_release release;
          result = aml_localize_codes(codes.data(), height, width, channels, query.data(), params);
        }
        return box_result(result);
      },
      py::arg("codes"), py::arg("query_vector"), py::arg("p") = 10.0, py::arg("step") = 3,
      py::arg("aspect_tolerance") = 1.1, py::arg("refine_iterations") = 5, py::arg("query_aspect") = py::none(),
      "aml_localize on an 8-bit quantised feature map stored channel-last (uint8 H×W×D codes, value = code·scale; "
      "the scale cancels in the cosine). Used by clustermac.rerank on its compact feature-map store.");

  m.def(
      "dequantize_codes",
      [](const py::object& codes_obj, const py::object& box_obj, double scale) {
        auto codes = checked_codes(codes_obj);
        const py::ssize_t height = codes.shape(0), width = codes.shape(1), channels = codes.shape(2);
        const std::array<std::int32_t, 4> box = checked_box(box_obj, width, height);
        if (!std::isfinite(scale) || scale < 0.0)
          throw py::value_error("scale: expected a finite number >= 0, got " + std::to_string(scale));
        py::array_t<float> out({channels, static_cast<py::ssize_t>(box[3] - box[1]), static_cast<py::ssize_t>(box[2] - box[0])});
        float* target = out.mutable_data();
        {
          py::gil_scoped_release release;
          dequantize_codes(codes.data(), width, channels, box, static_cast<float>(scale), target);
        }
        return out;
      },
      py::arg("codes"), py::arg("box") = py::none(), py::arg("scale") = 1.0,
      "Dequantise channel-last uint8 codes (H×W×D) inside box [x0, y0, x1, y1) (None: everything) to a float32 "
      "D×h×w map, value = code·scale.");
}

}  // namespace clustermac::bind
