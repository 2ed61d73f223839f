// Bindings of clustering/: affinity (Eq. 2-3), NCut, and the per-image clustering.
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <pybind11/typing.h>

#include "bind_helpers.hpp"
#include "clustermac/clustering/affinity.hpp"
#include "clustermac/clustering/discretize.hpp"
#include "clustermac/clustering/feature_clustering.hpp"
#include "clustermac/clustering/ncut.hpp"

namespace clustermac::bind {

namespace {

struct RgbListHint {
  static constexpr auto name =
      py::detail::const_name("collections.abc.Sequence[numpy.typing.NDArray[numpy.float32] | None] | None");
};

// A seed is a non-negative Python int (the core takes an unsigned 64-bit seed).
std::uint64_t checked_seed(std::int64_t seed) {
  if (seed < 0) throw py::value_error("seed: expected an integer >= 0, got " + std::to_string(seed));
  return static_cast<std::uint64_t>(seed);
}

// One image's arguments, converted while the GIL is held.
struct FeatureMapArrays {
  FloatArray feature_map;
  std::optional<FloatArray> rgb;
};

FeatureMapArrays convert_feature_map(const py::handle& feature_map, const py::handle& rgb, const std::string& where) {
  const std::string fm_name = "feature_map" + where, rgb_name = "rgb" + where;
  FeatureMapArrays input{require_array<float>(feature_map, fm_name.c_str(), 3, "of shape (D, H, W)"), std::nullopt};
  if (input.feature_map.size() == 0)
    throw py::value_error(fm_name + ": expected a non-empty array of shape (D, H, W), got " +
                          describe(input.feature_map));
  if (!rgb.is_none()) {
    auto colours = require_array<float>(rgb, rgb_name.c_str(), 3, "of shape (H, W, 3)");
    const auto h = input.feature_map.shape(1), w = input.feature_map.shape(2);
    if (colours.shape(0) != h || colours.shape(1) != w || colours.shape(2) != 3)
      throw py::value_error(rgb_name + ": expected shape (" + std::to_string(h) + ", " + std::to_string(w) +
                            ", 3) to match feature_map's H x W, got " + describe(colours));
    input.rgb = colours;
  }
  return input;
}

// The keyword arguments shared by cluster_feature_map and cluster_feature_maps, converted to
// the core's options (the arrays of a dataset-learned PCA are kept alive here).
struct ClusteringArguments {
  FeatureClusteringOptions options;
  std::optional<FloatArray> pca_mean, pca_basis;

  ClusteringArguments(const std::vector<int>& n_clusters, int rgb_clusters, int pca_dim, float z_ratio,
                      float spatial_weight, std::int64_t seed, const std::string& normalization,
                      const py::object& pca_mean_obj, const py::object& pca_basis_obj,
                      const std::string& similarity_precision) {
    options.n_clusters = n_clusters;
    options.rgb_clusters = rgb_clusters;
    options.pca_dim = pca_dim;
    options.z_ratio = z_ratio;
    options.spatial_weight = spatial_weight;
    options.seed = checked_seed(seed);
    options.normalization = parse_normalization(normalization);
    options.similarity_precision = parse_similarity_precision(similarity_precision);
    if (pca_mean_obj.is_none() != pca_basis_obj.is_none())
      throw py::value_error("pca_mean and pca_basis: give both (a dataset-learned PCA) or neither (per-image PCA)");
    if (pca_mean_obj.is_none()) return;
    pca_mean = require_array<float>(pca_mean_obj, "pca_mean", 1, "of shape (D,)");
    pca_basis = require_array<float>(pca_basis_obj, "pca_basis", 2, "of shape (D, C)");
    if (pca_basis->shape(0) != pca_mean->shape(0) || pca_basis->shape(1) < 1)
      throw py::value_error("pca_basis: expected shape (D, C) with D = len(pca_mean) = " +
                            std::to_string(pca_mean->shape(0)) + " and C >= 1, got " + describe(*pca_basis));
    if (!as_matrix(*pca_basis).allFinite() ||
        !Eigen::Map<const VectorF>(pca_mean->data(), pca_mean->shape(0)).allFinite())
      throw py::value_error("pca_mean/pca_basis contain NaN or Inf values; expected only finite numbers");
    options.pca_mean = pca_mean->data();
    options.pca_basis = pca_basis->data();
    options.pca_basis_columns = static_cast<int>(pca_basis->shape(1));
  }

  // The core input for one converted map; its D must match a dataset PCA's.
  FeatureMapInput input(const FeatureMapArrays& arrays, const std::string& where) const {
    const auto d = arrays.feature_map.shape(0);
    if (pca_mean && pca_mean->shape(0) != d)
      throw py::value_error("pca_mean: expected length D = " + std::to_string(d) + " (channels of feature_map" + where +
                            "), got " + describe(*pca_mean));
    return {arrays.feature_map.data(), d, arrays.feature_map.shape(1), arrays.feature_map.shape(2),
            arrays.rgb ? arrays.rgb->data() : nullptr};
  }
};

// The shared keywords, in their order after the leading (feature_map, rgb) arguments.
auto clustering_keywords() {
  return std::make_tuple(py::arg("n_clusters") = std::vector<int>{5, 20}, py::arg("rgb_clusters") = 5,
                         py::arg("pca_dim") = 4, py::arg("z_ratio") = 0.05f, py::arg("spatial_weight") = 0.0f,
                         py::arg("seed") = 0, py::arg("normalization") = "sym", py::arg("pca_mean") = py::none(),
                         py::arg("pca_basis") = py::none());
}

using LabelMaps = py::typing::List<py::array_t<std::int32_t>>;

// Clusters converted maps (GIL released) and returns one list of H x W label maps per map.
py::typing::List<LabelMaps> cluster_maps(const std::vector<FeatureMapArrays>& arrays,
                                         const std::vector<FeatureMapInput>& inputs,
                                         const FeatureClusteringOptions& options, std::int64_t n_threads) {
  std::vector<std::vector<VectorI>> results;
  {
    py::gil_scoped_release release;
    results = cluster_feature_maps(inputs, options, n_threads);
  }
  py::typing::List<LabelMaps> out;
  for (std::size_t i = 0; i < results.size(); ++i) {
    LabelMaps maps;
    for (auto& labels : results[i])
      maps.append(
          to_numpy(std::move(labels)).reshape({arrays[i].feature_map.shape(1), arrays[i].feature_map.shape(2)}));
    out.append(maps);
  }
  return out;
}

}  // namespace

void bind_clustering(py::module_& m) {
  m.def(
      "affinity",
      [](const FloatArrayArg& features, float z_ratio, const OptionalFloatArrayArg& weights) {
        auto a = require_array<float>(features, "features", 2, "of shape (N, C)");
        std::optional<VectorF> w;
        if (!weights.value.is_none()) {
          auto wa = require_array<float>(weights, "weights", 1, "of shape (C,)");
          w = Eigen::Map<const VectorF>(wa.data(), wa.shape(0));
        }
        MatrixRM s;
        {
          py::gil_scoped_release release;
          s = affinity(as_matrix(a), z_ratio, w ? &*w : nullptr);
        }
        return to_numpy(std::move(s));
      },
      py::arg("features"), py::arg("z_ratio") = 0.05f, py::arg("weights") = py::none(),
      R"doc(Dense N x N float32 similarity of the paper's Eq. (2)-(3).

d_ij = sqrt(sum_k w_k (f_ik - f_jk)^2) with w_k = var_k / sum_m var_m computed from the columns of
`features` when `weights` is None (else the given non-negative weights, used as is);
S_ij = exp(-d_ij / z)^2 with z = z_ratio * max d. When all features are equal (max d = 0) the
result is all ones. Limits (ValueError): N <= 65,536 locations (the N x N result takes 16 GiB
there); z_ratio >= 1e-8 (below it exp(-2 d / z) underflows float32 for all but near-identical
locations).)doc");

  m.def(
      "ncut_embedding",
      [](const FloatArrayArg& affinity_matrix, int n_vectors, const std::string& normalization,
         const std::string& similarity_precision) {
        auto a = require_array<float>(affinity_matrix, "affinity", 2, "of shape (N, N)");
        const Normalization norm = parse_normalization(normalization);
        const SimilarityPrecision precision = parse_similarity_precision(similarity_precision);
        Eigen::MatrixXd embedding;
        {
          py::gil_scoped_release release;
          embedding = ncut_embedding(as_matrix(a), n_vectors, norm, precision);
        }
        return to_numpy(MatrixRM(embedding.cast<float>()));
      },
      py::arg("affinity"), py::arg("n_vectors"), py::arg("normalization") = "sym",
      py::arg("similarity_precision") = "float32",
      R"doc(Top `n_vectors` Normalized-Cut eigenvectors (float32 N x n_vectors) of a similarity matrix.

The affinity must be square, finite, non-negative and symmetric. normalization="sym" (default,
as scikit-learn's spectral_clustering): self-loops dropped, eigenvectors u of
P = D^-1/2 (S - diag S) D^-1/2 with D = rowsum(S - diag S), largest eigenvalues first; "shi"
(Shi's released Ncut code, which the paper used): P = D^-1/2 (S + 0.5 I) D^-1/2 with
D = rowsum(S) + 1. On real CNN feature maps "sym" reaches a lower NCut objective and needs fewer
eigensolver iterations; "shi" gives somewhat more balanced partitions.
The eigensolver (block Krylov, thick restarts) runs on a fixed budget with a loose residual
tolerance (1e-2): enough for partitions whose NCut objective matches converged eigenvectors',
not for eigenvectors to many digits when eigenvalues are close. Returned columns are
D^-1/2 u scaled to unit l2 norm, signed so that each column's largest-magnitude entry is positive.
similarity_precision="bfloat16" rounds the affinity to bf16 first and runs the eigensolver's
products with AVX512-BF16 (see cluster_feature_map); "float32" (default) keeps it as given. N <= 65,536 (ValueError above).)doc");

  m.def(
      "ncut",
      [](const FloatArrayArg& affinity_matrix, int n_clusters, std::int64_t seed, const std::string& normalization) {
        auto a = require_array<float>(affinity_matrix, "affinity", 2, "of shape (N, N)");
        const Normalization norm = parse_normalization(normalization);
        const std::uint64_t checked = checked_seed(seed);
        VectorI labels;
        {
          py::gil_scoped_release release;
          labels = ncut(as_matrix(a), n_clusters, checked, norm);
        }
        return to_numpy(std::move(labels));
      },
      py::arg("affinity"), py::arg("n_clusters"), py::arg("seed") = 0, py::arg("normalization") = "sym",
      R"doc(Normalized-Cut partition (int32 labels of length N) of a similarity matrix into n_clusters.

Embedding as in ncut_embedding, then the discretisation of Yu & Shi 2003 (random initial row
from `seed`, greedy orthogonal rows, SVD rotation updates, at most 20 iterations). Labels are
compact: when the discretisation leaves a cluster empty (fewer separable groups than
n_clusters), the remaining labels are renumbered 0..m-1 with m < n_clusters. n_clusters must be
in [1, N]; n_clusters = 1 gives all zeros. Same input and seed give the same labels.
N <= 65,536 (ValueError above).)doc");

  // Not public API: the eigensolver's settings and statistics, for benchmarks/clustering.py
  // and the tests of the tolerance.
  m.def(
      "_ncut_solver_statistics",
      [](const FloatArrayArg& affinity_matrix, int n_vectors, const std::string& normalization, int block_size,
         int blocks_per_cycle, double tolerance, int max_cycles, int kept_blocks) {
        auto a = require_array<float>(affinity_matrix, "affinity", 2, "of shape (N, N)");
        require_non_empty("affinity", "of shape (N, N)", {a.shape(0), a.shape(1)});
        require_locations(a.shape(0), "affinity");
        const Normalization norm = parse_normalization(normalization);
        if (n_vectors < 1 || n_vectors > a.shape(0))
          throw py::value_error("n_vectors: expected 1 <= n_vectors <= N, got " + std::to_string(n_vectors));
        EigenSolverOptions options = ncut_solver_options(n_vectors, norm);
        if (block_size > 0) options.block_size = block_size;
        if (blocks_per_cycle > 0) options.blocks_per_cycle = blocks_per_cycle;
        if (tolerance > 0) options.tolerance = tolerance;
        if (max_cycles > 0) options.max_cycles = max_cycles;
        if (kept_blocks > 0) options.kept_blocks = kept_blocks;
        EigenPairs pairs;
        Eigen::MatrixXd embedding;
        {
          py::gil_scoped_release release;
          embedding = ncut_embedding_of(as_matrix(a), n_vectors, norm, &options, &pairs);
        }
        py::dict out;
        out["embedding"] = to_numpy(MatrixRM(embedding.cast<float>()));
        out["eigenvalues"] = to_numpy(VectorF(pairs.values.cast<float>()));
        out["n_products"] = pairs.n_products;
        out["n_cycles"] = pairs.n_cycles;
        out["converged"] = pairs.converged;
        out["max_residual"] = pairs.max_residual;
        return out;
      },
      py::arg("affinity"), py::arg("n_vectors"), py::arg("normalization") = "sym", py::arg("block_size") = 0,
      py::arg("blocks_per_cycle") = 0, py::arg("tolerance") = 0.0, py::arg("max_cycles") = 0,
      py::arg("kept_blocks") = 0,
      "NCut eigensolver statistics with overridden settings (not public API; for benchmarks and tests).");

  m.def(
      "_discretize",
      [](const FloatArrayArg& embedding, std::int64_t seed) {
        auto a = require_array<float>(embedding, "embedding", 2, "of shape (N, K)");
        require_non_empty("embedding", "of shape (N, K)", {a.shape(0), a.shape(1)});
        const std::uint64_t checked = checked_seed(seed);
        if (!as_matrix(a).allFinite()) throw py::value_error("embedding contains NaN or Inf values");
        Eigen::MatrixXd e = as_matrix(a).cast<double>();
        VectorI labels;
        {
          py::gil_scoped_release release;
          labels = discretize(e, checked);
        }
        return to_numpy(std::move(labels));
      },
      py::arg("embedding"), py::arg("seed") = 0,
      "Yu & Shi 2003 discretisation of an N x K embedding (not public API; used by the tests).");

  std::apply(
      [&](auto... keywords) {
        m.def(
            "cluster_feature_map",
            [](const FloatArrayArg& feature_map, const OptionalFloatArrayArg& rgb, const std::vector<int>& n_clusters,
               int rgb_clusters, int pca_dim, float z_ratio, float spatial_weight, std::int64_t seed,
               const std::string& normalization, const OptionalFloatArrayArg& pca_mean,
               const OptionalFloatArrayArg& pca_basis, const std::string& similarity_precision) {
              const ClusteringArguments args(n_clusters, rgb_clusters, pca_dim, z_ratio, spatial_weight, seed,
                                             normalization, pca_mean, pca_basis, similarity_precision);
              const std::vector<FeatureMapArrays> arrays{convert_feature_map(feature_map, rgb, "")};
              const std::vector<FeatureMapInput> inputs{args.input(arrays[0], "")};
              return LabelMaps(cluster_maps(arrays, inputs, args.options, 1)[0]);
            },
            py::arg("feature_map"), py::arg("rgb") = py::none(), keywords...,
            py::arg("similarity_precision") = "float32",
            R"doc(The paper's per-image clustering: list of int32 H x W label maps.

feature_map: float32 D x H x W activations; rgb: float32 H x W x 3 image resized to H x W, or None.
Steps: PCA of the N = H*W local D-vectors to pca_dim dims (or, when pca_mean (D,) and
pca_basis (D, C) are given, (x - pca_mean) @ pca_basis; pca_dim is then ignored), similarity of
Eq. (2)-(3) with w_k from the variances of the projected features, NCut (see `ncut`) into each
entry of n_clusters, all sharing one eigensolve; then, if rgb is given and rgb_clusters > 0,
an NCut of the RGB values (plain l2 colour distance, same z_ratio) into rgb_clusters.
Returns one map per entry of n_clusters, then the RGB map. A K larger than the number of
distinct locations is lowered to it (a 1 x 1 map, or constant features, give one region);
labels are compact 0..m-1. spatial_weight > 0 appends the pixel position, scaled so that
spatial_weight = 1 makes crossing the whole map cost about one weighted feature standard
deviation (the ablation of the paper's Fig. 6). normalization: "sym" (default) or "shi", see
ncut_embedding. The N x N similarity workspace is kept per thread between calls when
N <= 4096, to avoid page-faulting a fresh one for every image.
similarity_precision: how that similarity is stored for the eigensolver: "float32" (default,
on every CPU) or "bfloat16" (only when asked for; CPUs with AVX512-BF16, else ValueError: the
eigensolver's products with VDPBF16PS, 8 significant bits per similarity). The two give
different partitions, so the choice never depends on the CPU; Extractor records "bfloat16" in
its settings.
Limits (ValueError): N = H*W <= 65,536 locations (the N x N float32 similarity takes 16 GiB
there); z_ratio >= 1e-8 (see affinity).)doc");

        m.def(
            "cluster_feature_maps",
            [](const py::typing::List<FloatArrayArg>& feature_maps, const Typed<RgbListHint>& rgbs_arg,
               const std::vector<int>& n_clusters, int rgb_clusters, int pca_dim, float z_ratio, float spatial_weight,
               std::int64_t seed, const std::string& normalization, const OptionalFloatArrayArg& pca_mean,
               const OptionalFloatArrayArg& pca_basis, std::int64_t n_threads,
               const std::string& similarity_precision) {
              const py::object& rgbs = rgbs_arg;
              const std::size_t count = feature_maps.size();
              py::list rgb_list;
              if (!rgbs.is_none()) {
                if (!py::isinstance<py::list>(rgbs) && !py::isinstance<py::tuple>(rgbs))
                  throw py::value_error("rgbs: expected a list of H x W x 3 arrays (or None)");
                rgb_list = py::list(rgbs);
                if (rgb_list.size() != count)
                  throw py::value_error("rgbs: expected " + std::to_string(count) +
                                        " entries (one per feature map), got " + std::to_string(rgb_list.size()));
              }
              const ClusteringArguments args(n_clusters, rgb_clusters, pca_dim, z_ratio, spatial_weight, seed,
                                             normalization, pca_mean, pca_basis, similarity_precision);
              std::vector<FeatureMapArrays> arrays;
              std::vector<FeatureMapInput> inputs;
              arrays.reserve(count);
              for (std::size_t i = 0; i < count; ++i) {
                const std::string where = "[" + std::to_string(i) + "]";
                const py::object rgb = rgbs.is_none() ? py::object(py::none()) : py::object(rgb_list[i]);
                arrays.push_back(convert_feature_map(feature_maps[i], rgb, where));
                inputs.push_back(args.input(arrays.back(), where));
              }
              return cluster_maps(arrays, inputs, args.options, n_threads);
            },
            py::arg("feature_maps"), py::arg("rgbs") = py::none(), keywords..., py::arg("n_threads") = 0,
            py::arg("similarity_precision") = "float32",
            R"doc(cluster_feature_map for a list of feature maps on a thread pool (GIL released).

rgbs: None or a list with one H x W x 3 array (or None) per map. n_threads <= 0 uses all
hardware threads, and more than the hardware has (os.cpu_count()) are capped at that number;
the labels do not depend on n_threads. Returns one list of label maps per input, in input order;
all inputs are checked (including N = H*W <= 65,536 per map) before any work starts. The system
refusing to start a thread raises RuntimeError (n_threads=1 runs on the calling thread only).)doc");
      },
      clustering_keywords());
}

}  // namespace clustermac::bind
