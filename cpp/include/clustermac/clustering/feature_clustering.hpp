// The paper's whole per-image clustering (Sec. 3.1-3.2 and 4.1): PCA of the D x H x W
// activations to C dims, the similarity of Eq. (2)-(3), NCut into each requested number of
// clusters from ONE eigensolve (the top-5 eigenvectors are the first 5 of the top 20), and
// optionally NCut of the image's RGB values resized to H x W.
#pragma once

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "clustermac/clustering/affinity.hpp"
#include "clustermac/clustering/discretize.hpp"
#include "clustermac/clustering/ncut.hpp"
#include "clustermac/common.hpp"
#include "clustermac/linalg/pca.hpp"

namespace clustermac {

struct FeatureClusteringOptions {
  std::vector<int> n_clusters{5, 20};
  int rgb_clusters = 5;
  int pca_dim = 4;
  float z_ratio = 0.05f;
  float spatial_weight = 0.0f;
  std::uint64_t seed = 0;
  Normalization normalization = Normalization::sym;  // see ncut.hpp for why
  SimilarityPrecision similarity_precision = SimilarityPrecision::float32;
  const float* pca_mean = nullptr;   // D, or null for the per-image PCA
  const float* pca_basis = nullptr;  // D x pca_basis_columns row-major, or null
  int pca_basis_columns = 0;
};

// Validation shared by the single and batched entry points (no data access).
inline void check_feature_clustering_options(const FeatureClusteringOptions& o, Eigen::Index channels) {
  require(!o.n_clusters.empty(), "n_clusters: expected at least one number of clusters, got an empty tuple");
  for (int k : o.n_clusters) require(k >= 1, "n_clusters: every entry must be >= 1, got " + std::to_string(k));
  require(o.rgb_clusters >= 0,
          "rgb_clusters: expected >= 0 (0 disables the RGB partition), got " + std::to_string(o.rgb_clusters));
  if (!o.pca_basis)
    require(o.pca_dim >= 1 && o.pca_dim <= channels,
            "pca_dim: expected 1 <= pca_dim <= D = " + std::to_string(channels) + ", got " + std::to_string(o.pca_dim));
  require_z_ratio(o.z_ratio);
  require(std::isfinite(o.spatial_weight) && o.spatial_weight >= 0.0f,
          "spatial_weight: expected a finite number >= 0, got " + std::to_string(o.spatial_weight));
  require(o.similarity_precision != SimilarityPrecision::bfloat16 || simd_has_avx512_bf16(),
          "similarity_precision=\"bfloat16\" needs a CPU with AVX512-BF16 (and the environment variable "
          "CLUSTERMAC_NO_BF16 unset); use \"float32\"");
}

namespace detail {

// Number of distinct rows of `features` (exact comparison): no partition can separate
// identical locations, so K is capped at this count.
inline Eigen::Index count_distinct_rows(const MatrixRM& features, Eigen::Index stop_at) {
  const Eigen::Index n = features.rows(), c = features.cols();
  std::vector<Eigen::Index> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), Eigen::Index{0});
  std::sort(order.begin(), order.end(), [&](Eigen::Index a, Eigen::Index b) {
    for (Eigen::Index k = 0; k < c; ++k)
      if (features(a, k) != features(b, k)) return features(a, k) < features(b, k);
    return false;
  });
  Eigen::Index distinct = n > 0 ? 1 : 0;
  for (Eigen::Index i = 1; i < n && distinct < stop_at; ++i)
    if (features.row(order[i]) != features.row(order[i - 1])) ++distinct;
  return distinct;
}

// Features scaled by sqrt(w_k) (Eq. 2), optionally extended by the two spatial coordinates.
// The spatial term is spatial_weight * (sum_k w_k var_k)^(1/2) * position / max(H, W): with
// spatial_weight = 1, crossing the whole image costs about one weighted feature standard deviation.
inline MatrixRM weighted_features(const MatrixRM& features, Eigen::Index height, Eigen::Index width,
                                  float spatial_weight) {
  const Eigen::Index n = features.rows(), c = features.cols();
  const VectorF w = variance_weights(features);
  const bool spatial = spatial_weight > 0.0f;
  MatrixRM out(n, c + (spatial ? 2 : 0));
  for (Eigen::Index k = 0; k < c; ++k) out.col(k) = features.col(k) * std::sqrt(w(k));
  if (spatial) {
    Eigen::MatrixXd centred = out.leftCols(c).cast<double>();
    centred.rowwise() -= centred.colwise().mean();
    const double spread = std::sqrt(centred.squaredNorm() / std::max<double>(1.0, static_cast<double>(n - 1)));
    const double unit = spatial_weight * (spread > 0 ? spread : 1.0) / static_cast<double>(std::max(height, width));
    for (Eigen::Index y = 0; y < height; ++y)
      for (Eigen::Index x = 0; x < width; ++x) {
        out(y * width + x, c) = static_cast<float>(unit * static_cast<double>(y));
        out(y * width + x, c + 1) = static_cast<float>(unit * static_cast<double>(x));
      }
  }
  return out;
}

// The N x N similarity workspace, reused across calls: float, or bf16 when asked for
// (similarity_precision "bfloat16", CPUs with AVX512-BF16; similarity_bf16.hpp); only the one in
// use is kept.
struct SimilarityWorkspace {
  bool use_bf16 = false;
  MatrixRM dense;
  SimilarityBf16 bf16;

  void release() {
    dense.resize(0, 0);
    bf16 = SimilarityBf16{};
  }
};

// NCut partitions of `weighted` (already scaled, so weights are all ones) into each of
// `n_clusters`, sharing one eigensolve.
inline std::vector<VectorI> partitions_of(const MatrixRM& weighted, const std::vector<int>& n_clusters, float z_ratio,
                                          std::uint64_t seed, Normalization normalization,
                                          SimilarityWorkspace& buffer) {
  const Eigen::Index n = weighted.rows();
  const Eigen::Index distinct = count_distinct_rows(weighted, n);
  std::vector<int> effective(n_clusters.size());
  int most = 1;
  for (std::size_t i = 0; i < n_clusters.size(); ++i) {
    effective[i] = static_cast<int>(std::min<Eigen::Index>(n_clusters[i], distinct));
    most = std::max(most, effective[i]);
  }
  std::vector<VectorI> out;
  if (most <= 1) {
    for (std::size_t i = 0; i < n_clusters.size(); ++i) out.push_back(VectorI::Zero(n));
    return out;
  }
  // "sym" drops self-loops: zero the workspace's diagonal rather than copy it (see ncut.hpp).
  const bool zero_diagonal = normalization == Normalization::sym;
  Eigen::MatrixXd embedding;
  if (buffer.use_bf16) {
    buffer.dense.resize(0, 0);
    affinity_into(weighted, VectorF::Ones(weighted.cols()), z_ratio, buffer.bf16);
    if (zero_diagonal)
      for (Eigen::Index i = 0; i < n; ++i) buffer.bf16.row(i)[i] = 0;
    embedding = ncut_embedding_of(buffer.bf16, most, normalization);
  } else {
    buffer.bf16 = SimilarityBf16{};
    buffer.dense.resize(n, n);
    affinity_into(weighted, VectorF::Ones(weighted.cols()), z_ratio, buffer.dense.data());
    if (zero_diagonal) buffer.dense.diagonal().setZero();
    embedding = ncut_embedding_of(buffer.dense, most, normalization, nullptr, nullptr, zero_diagonal);
  }
  for (int k : effective) {
    if (k <= 1)
      out.push_back(VectorI::Zero(n));
    else
      out.push_back(discretize(embedding.leftCols(k), seed));
  }
  return out;
}

}  // namespace detail

// `feature_map` is D x H x W row-major (channels first), `rgb` H x W x 3 or null. Returns one
// H*W label vector (row-major H x W) per entry of n_clusters, then one for RGB if requested.
// K larger than the number of distinct locations is lowered to that number (a 1 x 1 map gives
// one region); labels are compact (0..m-1, no empty label).
namespace detail {

// cluster_feature_map without the checks of the options.
inline std::vector<VectorI> cluster_checked_feature_map(const float* feature_map, Eigen::Index channels,
                                                        Eigen::Index height, Eigen::Index width, const float* rgb,
                                                        const FeatureClusteringOptions& options) {
  using Eigen::Index;
  const Index n = height * width;
  // Activations as an N x D column-major matrix == the D x N row-major feature map, no copy.
  Eigen::Map<const Eigen::MatrixXf> activations(feature_map, n, channels);
  auto require_finite_map = [&] {
    require(activations.allFinite(), "feature_map contains NaN or Inf values; expected only finite numbers");
  };

  MatrixRM projected;
  if (options.pca_basis) {
    require_finite_map();
    Eigen::Map<const MatrixRM> basis(options.pca_basis, channels, options.pca_basis_columns);
    Eigen::Map<const Eigen::RowVectorXf> mean(options.pca_mean, channels);
    projected = (activations.rowwise() - mean) * basis;
  } else {
    // Centred into a per-thread buffer kept between calls (no page faults for every image), each
    // channel's mean from a vectorised float sum of its N contiguous values. A NaN or Inf makes
    // its channel's float sum non-finite, so the finiteness check needs no pass of its own. A finite map whose sum
    // overflows (values ~1e35) is refused too: the PCA's float products would overflow on it. Each channel's N values
    // are padded to a leading dimension that keeps the PCA's products clear of cache-set conflicts
    // (detail::padded_leading_dimension).
    thread_local Eigen::MatrixXf centred_storage;
    const Index ld = detail::padded_leading_dimension(n);
    centred_storage.resize(ld, channels);
    auto centred = centred_storage.topRows(n);
    for (Index d = 0; d < channels; ++d) {
      const float mean = activations.col(d).sum() / static_cast<float>(n);
      if (!std::isfinite(mean)) {
        require_finite_map();
        fail("feature_map: channel " + std::to_string(d) +
             " has values too large for float32 sums (they overflow); "
             "scale the activations down");
      }
      centred.col(d) = activations.col(d).array() - mean;
    }
    // Column-major N x D is the D x N row-major layout of the feature map.
    projected = pca_of_centred(centred.data(), n, channels, false, options.pca_dim, ld).projection;
    if (centred_storage.size() > Index{4} * 1024 * 1024) centred_storage.resize(0, 0);  // keep at most 16 MB
  }

  // The N x N similarity workspace is kept per thread between calls up to 64 MB of floats
  // (N <= 4096), so that a fresh buffer's page faults are not paid for every image.
  thread_local detail::SimilarityWorkspace kept_buffer;
  detail::SimilarityWorkspace local_buffer;
  const bool keep_workspace = n * n <= Index{16} * 1024 * 1024;
  detail::SimilarityWorkspace& buffer = keep_workspace ? kept_buffer : local_buffer;
  if (!keep_workspace) kept_buffer.release();
  buffer.use_bf16 = options.similarity_precision == SimilarityPrecision::bfloat16;
  std::vector<VectorI> labels =
      detail::partitions_of(detail::weighted_features(projected, height, width, options.spatial_weight),
                            options.n_clusters, options.z_ratio, options.seed, options.normalization, buffer);
  if (rgb && options.rgb_clusters > 0) {
    Eigen::Map<const MatrixRM> colours(rgb, n, 3);
    require(colours.allFinite(), "rgb contains NaN or Inf values; expected only finite numbers");
    // RGB channels are commensurate: plain l2 distance in colour space (w_k = 1/3 each).
    MatrixRM weighted = colours / std::sqrt(3.0f);
    auto rgb_labels = detail::partitions_of(weighted, {options.rgb_clusters}, options.z_ratio, options.seed,
                                            options.normalization, buffer);
    labels.push_back(std::move(rgb_labels.front()));
  }
  return labels;
}

}  // namespace detail

inline std::vector<VectorI> cluster_feature_map(const float* feature_map, Eigen::Index channels, Eigen::Index height,
                                                Eigen::Index width, const float* rgb,
                                                const FeatureClusteringOptions& options) {
  check_feature_clustering_options(options, channels);
  require_locations(std::int64_t{height} * width, "feature_map");
  return detail::cluster_checked_feature_map(feature_map, channels, height, width, rgb, options);
}

// One feature map of a batch: D x H x W floats and, or null, its H x W x 3 RGB image.
struct FeatureMapInput {
  const float* feature_map;
  Eigen::Index channels, height, width;
  const float* rgb;
};

// cluster_feature_map for each input on up to n_threads threads (<= 0: all; capped at
// max_threads(), the hardware concurrency); every input is checked before any work starts.
inline std::vector<std::vector<VectorI>> cluster_feature_maps(const std::vector<FeatureMapInput>& inputs,
                                                              const FeatureClusteringOptions& options,
                                                              std::int64_t n_threads) {
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    check_feature_clustering_options(options, inputs[i].channels);
    require_locations(std::int64_t{inputs[i].height} * inputs[i].width,
                      inputs.size() == 1 ? std::string("feature_map") : "feature_maps[" + std::to_string(i) + "]");
  }
  std::vector<std::vector<VectorI>> results(inputs.size());
  parallel_for(static_cast<std::ptrdiff_t>(inputs.size()), n_threads, [&](std::ptrdiff_t i) {
    const FeatureMapInput& in = inputs[static_cast<std::size_t>(i)];
    results[static_cast<std::size_t>(i)] =
        detail::cluster_checked_feature_map(in.feature_map, in.channels, in.height, in.width, in.rgb, options);
  });
  return results;
}

}  // namespace clustermac
