// Python bindings of the clustering core: PCA, affinity (Eq. 2-3), NCut, per-image clustering.
// Thin: check and convert the arguments, release the GIL, call cpp/include/clustermac.
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bind_helpers.hpp"
#include "clustermac/affinity.hpp"
#include "clustermac/feature_clustering.hpp"
#include "clustermac/ncut.hpp"
#include "clustermac/pca.hpp"

namespace clustermac::bind {

namespace {

using FloatArray = py::array_t<float, py::array::c_style>;

void check_seed(std::int64_t seed) {
  if (seed < 0) throw py::value_error("seed: expected an integer >= 0, got " + std::to_string(seed));
}

void require_nonempty(const py::array& a, const char* name, const char* expected) {
  if (a.size() == 0)
    throw py::value_error(std::string(name) + ": expected a non-empty array " + expected + ", got " + describe(a));
}

// One image's arguments, checked and converted while the GIL is held.
struct FeatureMapInput {
  FloatArray feature_map;
  std::optional<FloatArray> rgb;
};

FeatureMapInput check_feature_map(const py::handle& feature_map, const py::handle& rgb, const std::string& where) {
  const std::string fm_name = "feature_map" + where, rgb_name = "rgb" + where;
  FeatureMapInput input{require_array<float>(feature_map, fm_name.c_str(), 3, "of shape (D, H, W)"), std::nullopt};
  require_nonempty(input.feature_map, fm_name.c_str(), "of shape (D, H, W)");
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

struct PcaArguments {
  std::optional<FloatArray> mean, basis;
};

PcaArguments check_pca_arguments(const py::object& pca_mean, const py::object& pca_basis,
                                 FeatureClusteringOptions& options) {
  PcaArguments args;
  if (pca_mean.is_none() != pca_basis.is_none())
    throw py::value_error("pca_mean and pca_basis: give both (a dataset-learned PCA) or neither (per-image PCA)");
  if (pca_mean.is_none()) return args;
  args.mean = require_array<float>(pca_mean, "pca_mean", 1, "of shape (D,)");
  args.basis = require_array<float>(pca_basis, "pca_basis", 2, "of shape (D, C)");
  if (args.basis->shape(0) != args.mean->shape(0) || args.basis->shape(1) < 1)
    throw py::value_error("pca_basis: expected shape (D, C) with D = len(pca_mean) = " +
                          std::to_string(args.mean->shape(0)) + " and C >= 1, got " + describe(*args.basis));
  if (!as_matrix(*args.basis).allFinite() ||
      !Eigen::Map<const VectorF>(args.mean->data(), args.mean->shape(0)).allFinite())
    throw py::value_error("pca_mean/pca_basis contain NaN or Inf values; expected only finite numbers");
  options.pca_mean = args.mean->data();
  options.pca_basis = args.basis->data();
  options.pca_basis_columns = static_cast<int>(args.basis->shape(1));
  return args;
}

FeatureClusteringOptions make_options(const std::vector<int>& n_clusters, int rgb_clusters, int pca_dim,
                                      float z_ratio, float spatial_weight, std::int64_t seed,
                                      const std::string& normalization, const std::string& similarity_precision) {
  check_seed(seed);
  FeatureClusteringOptions options;
  options.n_clusters = n_clusters;
  options.rgb_clusters = rgb_clusters;
  options.pca_dim = pca_dim;
  options.z_ratio = z_ratio;
  options.spatial_weight = spatial_weight;
  options.seed = static_cast<std::uint64_t>(seed);
  options.normalization = parse_normalization(normalization);
  options.similarity_precision = parse_similarity_precision(similarity_precision);
  return options;
}

void check_against_map(const FeatureClusteringOptions& options, const PcaArguments& pca, const FloatArray& map,
                       const std::string& where) {
  const auto d = map.shape(0);
  if (pca.mean && pca.mean->shape(0) != d)
    throw py::value_error("pca_mean: expected length D = " + std::to_string(d) + " (channels of feature_map" +
                          where + "), got " + describe(*pca.mean));
  check_feature_clustering_options(options, d);
}

py::list to_label_maps(std::vector<VectorI>&& labels, py::ssize_t height, py::ssize_t width) {
  py::list out;
  for (auto& l : labels) {
    auto array = to_numpy(std::move(l));
    out.append(array.reshape({height, width}));
  }
  return out;
}

}  // namespace

void bind_clustering(py::module_& m) {
  m.def(
      "pca_project",
      [](const py::object& features, int n_components) {
        auto a = require_array<float>(features, "features", 2, "of shape (N, D)");
        require_nonempty(a, "features", "of shape (N, D)");
        if (n_components < 1 || n_components > a.shape(1))
          throw py::value_error("n_components: expected 1 <= n_components <= D = " + std::to_string(a.shape(1)) +
                                ", got " + std::to_string(n_components));
        PcaProjection result;
        {
          py::gil_scoped_release release;
          result = pca_project(as_matrix(a), n_components);
        }
        return py::make_tuple(to_numpy(std::move(result.projection)), to_numpy(std::move(result.variances)));
      },
      py::arg("features"), py::arg("n_components"),
      R"doc(Projection of N x D float32 features onto their top principal components (paper Sec. 3.1).

Returns (projection float32 N x C, variances float32 C): the centred features projected on the
top C = n_components principal directions, and the variance of each projected column
(divisor N - 1; 0 when N = 1), in descending order. Components beyond the rank of the data
have zero variance and a zero column. The sign of each column is fixed so that its
largest-magnitude entry is positive. Solved by a block Krylov eigensolver on the implicit
covariance (or Gram) operator with a fixed budget of passes over the data, so no D x D
eigendecomposition is formed: accurate for leading components separated by clear variance gaps
(as in CNN activations); within a flat part of the spectrum the directions are approximate.)doc");

  m.def(
      "affinity",
      [](const py::object& features, float z_ratio, const py::object& weights) {
        auto a = require_array<float>(features, "features", 2, "of shape (N, C)");
        require_nonempty(a, "features", "of shape (N, C)");
        std::optional<VectorF> w;
        if (!weights.is_none()) {
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
result is all ones.)doc");

  m.def(
      "ncut_embedding",
      [](const py::object& affinity_matrix, int n_vectors, const std::string& normalization,
         const std::string& similarity_precision) {
        auto a = require_array<float>(affinity_matrix, "affinity", 2, "of shape (N, N)");
        require_nonempty(a, "affinity", "of shape (N, N)");
        const Normalization norm = parse_normalization(normalization);
        const bool bf16 = parse_similarity_precision(similarity_precision) == SimilarityPrecision::bfloat16;
        if (bf16 && !cpu_has_avx512_bf16())
          throw py::value_error("similarity_precision=\"bfloat16\" needs a CPU with AVX512-BF16 (and the environment "
                                "variable CLUSTERMAC_NO_BF16 unset); use \"float32\"");
        if (n_vectors < 1 || n_vectors > a.shape(0))
          throw py::value_error("n_vectors: expected 1 <= n_vectors <= N = " + std::to_string(a.shape(0)) +
                                ", got " + std::to_string(n_vectors));
        Eigen::MatrixXd embedding;
        {
          py::gil_scoped_release release;
          check_similarity(as_matrix(a));
          if (bf16)
            embedding = ncut_embedding_of(bf16_similarity(as_matrix(a), norm == Normalization::sym), n_vectors, norm);
          else
            embedding = ncut_embedding_of(as_matrix(a), n_vectors, norm);
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
D = rowsum(S) + 1. On real CNN feature maps "sym" reaches a 2-4x lower NCut objective at K = 5
and needs fewer eigensolver iterations; "shi" gives somewhat more balanced partitions.
The eigensolver (block Krylov, thick restarts) runs on a fixed budget with a loose residual
tolerance (1e-2): enough for partitions whose NCut objective matches converged eigenvectors'
(measured on real feature maps), not for eigenvectors to many digits when eigenvalues are close. Returned columns are
D^-1/2 u scaled to unit l2 norm, signed so that each column's largest-magnitude entry is positive.
similarity_precision="bfloat16" rounds the affinity to bf16 first and runs the eigensolver's
products with AVX512-BF16 (see cluster_feature_map); "float32" (default) or "auto" keep it as
given.)doc");

  m.def(
      "ncut",
      [](const py::object& affinity_matrix, int n_clusters, std::int64_t seed, const std::string& normalization) {
        auto a = require_array<float>(affinity_matrix, "affinity", 2, "of shape (N, N)");
        require_nonempty(a, "affinity", "of shape (N, N)");
        const Normalization norm = parse_normalization(normalization);
        if (n_clusters < 1 || n_clusters > a.shape(0))
          throw py::value_error("n_clusters: expected 1 <= n_clusters <= N = " + std::to_string(a.shape(0)) +
                                " (the number of rows of affinity), got " + std::to_string(n_clusters));
        check_seed(seed);
        VectorI labels;
        {
          py::gil_scoped_release release;
          check_similarity(as_matrix(a));
          labels = ncut_labels_of(as_matrix(a), n_clusters, static_cast<std::uint64_t>(seed), norm);
        }
        return to_numpy(std::move(labels));
      },
      py::arg("affinity"), py::arg("n_clusters"), py::arg("seed") = 0, py::arg("normalization") = "sym",
      R"doc(Normalized-Cut partition (int32 labels of length N) of a similarity matrix into n_clusters.

Embedding as in ncut_embedding, then the discretisation of Yu & Shi 2003 (random initial row
from `seed`, greedy orthogonal rows, SVD rotation updates, at most 20 iterations). Labels are
compact: when the discretisation leaves a cluster empty (fewer separable groups than
n_clusters), the remaining labels are renumbered 0..m-1 with m < n_clusters. n_clusters must be
in [1, N]; n_clusters = 1 gives all zeros. Same input and seed give the same labels.)doc");

  // Not public API: the eigensolver's settings and statistics, for benchmarks/clustering.py
  // and the tests of the tolerance.
  m.def(
      "_ncut_solver_statistics",
      [](const py::object& affinity_matrix, int n_vectors, const std::string& normalization, int block_size,
         int blocks_per_cycle, double tolerance, int max_cycles, int kept_blocks) {
        auto a = require_array<float>(affinity_matrix, "affinity", 2, "of shape (N, N)");
        require_nonempty(a, "affinity", "of shape (N, N)");
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
      py::arg("blocks_per_cycle") = 0, py::arg("tolerance") = 0.0, py::arg("max_cycles") = 0, py::arg("kept_blocks") = 0);

  m.def(
      "_discretize",
      [](const py::object& embedding, std::int64_t seed) {
        auto a = require_array<float>(embedding, "embedding", 2, "of shape (N, K)");
        require_nonempty(a, "embedding", "of shape (N, K)");
        check_seed(seed);
        if (!as_matrix(a).allFinite()) throw py::value_error("embedding contains NaN or Inf values");
        Eigen::MatrixXd e = as_matrix(a).cast<double>();
        VectorI labels;
        {
          py::gil_scoped_release release;
          labels = discretize(e, static_cast<std::uint64_t>(seed));
        }
        return to_numpy(std::move(labels));
      },
      py::arg("embedding"), py::arg("seed") = 0,
      "Yu & Shi 2003 discretisation of an N x K embedding (not public API; used by the tests).");

  m.def(
      "cluster_feature_map",
      [](const py::object& feature_map, const py::object& rgb, const std::vector<int>& n_clusters, int rgb_clusters,
         int pca_dim, float z_ratio, float spatial_weight, std::int64_t seed, const std::string& normalization,
         const py::object& pca_mean, const py::object& pca_basis, const std::string& similarity_precision) {
        FeatureMapInput input = check_feature_map(feature_map, rgb, "");
        FeatureClusteringOptions options =
            make_options(n_clusters, rgb_clusters, pca_dim, z_ratio, spatial_weight, seed, normalization,
                         similarity_precision);
        PcaArguments pca = check_pca_arguments(pca_mean, pca_basis, options);
        check_against_map(options, pca, input.feature_map, "");
        const auto d = input.feature_map.shape(0), h = input.feature_map.shape(1), w = input.feature_map.shape(2);
        std::vector<VectorI> labels;
        {
          py::gil_scoped_release release;
          labels = cluster_feature_map(input.feature_map.data(), d, h, w, input.rgb ? input.rgb->data() : nullptr,
                                       options);
        }
        return to_label_maps(std::move(labels), h, w);
      },
      py::arg("feature_map"), py::arg("rgb") = py::none(), py::arg("n_clusters") = std::vector<int>{5, 20},
      py::arg("rgb_clusters") = 5, py::arg("pca_dim") = 4, py::arg("z_ratio") = 0.05f,
      py::arg("spatial_weight") = 0.0f, py::arg("seed") = 0, py::arg("normalization") = "sym",
      py::arg("pca_mean") = py::none(), py::arg("pca_basis") = py::none(), py::arg("similarity_precision") = "auto",
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
ncut_embedding. The N x N similarity workspace (38 MB at N = 3072) is kept per thread between
calls when N <= 4096, to avoid page-faulting a fresh one for every image.
similarity_precision: how that similarity is stored for the eigensolver. "float32"; "bfloat16"
(CPUs with AVX512-BF16: the eigensolver's products at about half the cost, 8 significant bits
per similarity); "auto" (default) takes bfloat16 for N >= 2048 locations when the CPU has it
(N = 3072: 125 -> 88 ms per image here, partitions as good by the NCut objective), float32
otherwise. The environment variable CLUSTERMAC_NO_BF16 makes "auto" always float32.)doc");

  m.def(
      "cluster_feature_maps",
      [](const py::list& feature_maps, const py::object& rgbs, const std::vector<int>& n_clusters, int rgb_clusters,
         int pca_dim, float z_ratio, float spatial_weight, std::int64_t seed, const std::string& normalization,
         const py::object& pca_mean, const py::object& pca_basis, int n_threads, const std::string& similarity_precision) {
        const std::size_t count = feature_maps.size();
        py::list rgb_list;
        if (!rgbs.is_none()) {
          if (!py::isinstance<py::list>(rgbs) && !py::isinstance<py::tuple>(rgbs))
            throw py::value_error("rgbs: expected a list of H x W x 3 arrays (or None)");
          rgb_list = py::list(rgbs);
          if (rgb_list.size() != count)
            throw py::value_error("rgbs: expected " + std::to_string(count) + " entries (one per feature map), got " +
                                  std::to_string(rgb_list.size()));
        }
        FeatureClusteringOptions options =
            make_options(n_clusters, rgb_clusters, pca_dim, z_ratio, spatial_weight, seed, normalization,
                         similarity_precision);
        PcaArguments pca = check_pca_arguments(pca_mean, pca_basis, options);
        std::vector<FeatureMapInput> inputs;
        inputs.reserve(count);
        for (std::size_t i = 0; i < count; ++i) {
          const std::string where = "[" + std::to_string(i) + "]";
          const py::object rgb = rgbs.is_none() ? py::object(py::none()) : py::object(rgb_list[i]);
          inputs.push_back(check_feature_map(feature_maps[i], rgb, where));
          check_against_map(options, pca, inputs.back().feature_map, where);
        }
        std::vector<std::vector<VectorI>> results(count);
        {
          py::gil_scoped_release release;
          parallel_for(static_cast<std::ptrdiff_t>(count), n_threads, [&](std::ptrdiff_t i) {
            const auto& in = inputs[static_cast<std::size_t>(i)];
            results[static_cast<std::size_t>(i)] =
                cluster_feature_map(in.feature_map.data(), in.feature_map.shape(0), in.feature_map.shape(1),
                                    in.feature_map.shape(2), in.rgb ? in.rgb->data() : nullptr, options);
          });
        }
        py::list out;
        for (std::size_t i = 0; i < count; ++i)
          out.append(to_label_maps(std::move(results[i]), inputs[i].feature_map.shape(1), inputs[i].feature_map.shape(2)));
        return out;
      },
      py::arg("feature_maps"), py::arg("rgbs") = py::none(), py::arg("n_clusters") = std::vector<int>{5, 20},
      py::arg("rgb_clusters") = 5, py::arg("pca_dim") = 4, py::arg("z_ratio") = 0.05f,
      py::arg("spatial_weight") = 0.0f, py::arg("seed") = 0, py::arg("normalization") = "sym",
      py::arg("pca_mean") = py::none(), py::arg("pca_basis") = py::none(), py::arg("n_threads") = 0,
      py::arg("similarity_precision") = "auto",
      R"doc(cluster_feature_map for a list of feature maps on a thread pool (GIL released).

rgbs: None or a list with one H x W x 3 array (or None) per map. n_threads <= 0 uses all
hardware threads. Returns one list of label maps per input, in input order; all inputs are
checked before any work starts.)doc");
}

}  // namespace clustermac::bind
