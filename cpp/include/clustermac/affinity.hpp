// Similarity matrix between locations, paper Eq. (2)-(3):
//   d_ij = sqrt( sum_k w_k (f_ik - f_jk)^2 ),  w_k = var_k / sum_m var_m          (2)
//   S_ij = (exp(-d_ij / z))^2 = exp(-2 d_ij / z),  z = z_ratio * max_ij d_ij      (3)
// All-equal features (max d = 0) give S = all ones: every pair is maximally similar, which is
// also the limit of Eq. (3) as the features approach each other.
#pragma once

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <string>

#include "clustermac/common.hpp"

namespace clustermac {

// w_k = var_k / sum var (Eq. 2) from the columns of `features`. All-zero variance -> equal weights
// (they are irrelevant then: every distance is 0).
inline VectorF variance_weights(const ConstMatrixRef& features) {
  const Eigen::Index c = features.cols();
  Eigen::MatrixXd centred = features.cast<double>();
  centred.rowwise() -= centred.colwise().mean();
  Eigen::VectorXd variance = centred.colwise().squaredNorm().transpose();
  const double total = variance.sum();
  if (!(total > 0.0)) return VectorF::Constant(c, 1.0f / static_cast<float>(c));
  return (variance / total).cast<float>();
}

namespace detail {

// Writes the upper triangle (j >= i) of the squared weighted distances into `out` row by row,
// scaled features being stored dimension-major so each inner loop is one vectorised sweep.
inline float scaled_columns_max_distance2(const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>& g) {
  const Eigen::Index c = g.rows(), n = g.cols();
  float best = 0.0f;
  Eigen::ArrayXf d2(n);
  for (Eigen::Index i = 0; i < n; ++i) {
    const Eigen::Index len = n - i;
    auto acc = d2.head(len);
    acc.setZero();
    for (Eigen::Index k = 0; k < c; ++k) {
      auto row = g.row(k).segment(i, len).array();
      acc += (row - g(k, i)).square();
    }
    best = std::max(best, acc.maxCoeff());
  }
  return best;
}

}  // namespace detail

// Fills the N x N row-major buffer `out` with S of Eq. (3) for `features` (N x C) and weights
// `weights` (C, non-negative). Only the upper triangle is computed; it is then mirrored.
inline void affinity_into(const ConstMatrixRef& features, const VectorF& weights, float z_ratio, float* out) {
  using Eigen::Index;
  const Index n = features.rows(), c = features.cols();
  Eigen::Map<MatrixRM> s(out, n, n);
  // g(k, j) = sqrt(w_k) * (f_jk - mean_k): dimension-major so rows of g are contiguous.
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> g(c, n);
  const Eigen::RowVectorXf mean = features.cast<double>().colwise().mean().cast<float>();
  for (Index k = 0; k < c; ++k) {
    const float root_weight = std::sqrt(weights(k));
    g.row(k) = (features.col(k).transpose().array() - mean(k)) * root_weight;
  }
  const float max_distance = std::sqrt(detail::scaled_columns_max_distance2(g));
  if (!(max_distance > 0.0f)) {
    s.setOnes();
    return;
  }
  // exp(-2 d / z) with z = z_ratio * max d (Eq. 3).
  const float scale = -2.0f / (z_ratio * max_distance);
  for (Index i = 0; i < n; ++i) {
    const Index len = n - i;
    Eigen::Map<Eigen::ArrayXf> row(out + i * n + i, len);
    row.setZero();
    for (Index k = 0; k < c; ++k) {
      auto grow = g.row(k).segment(i, len).array();
      row += (grow - g(k, i)).square();
    }
    row = (row.sqrt() * scale).exp();
  }
  // Mirror the upper triangle in cache-sized tiles.
  constexpr Index tile = 64;
  for (Index ib = 0; ib < n; ib += tile)
    for (Index jb = 0; jb <= ib; jb += tile) {
      const Index i_end = std::min(ib + tile, n), j_end = std::min(jb + tile, n);
      for (Index i = ib; i < i_end; ++i)
        for (Index j = jb; j < std::min(j_end, i); ++j) out[i * n + j] = out[j * n + i];
    }
}

inline MatrixRM affinity(const ConstMatrixRef& features, float z_ratio, const VectorF* weights) {
  require(features.rows() >= 1 && features.cols() >= 1,
          "affinity: features must be N x C with N >= 1 and C >= 1, got " + std::to_string(features.rows()) +
              " x " + std::to_string(features.cols()));
  require_finite(features, "features");
  require(std::isfinite(z_ratio) && z_ratio > 0.0f,
          "z_ratio: expected a finite number > 0, got " + std::to_string(z_ratio));
  VectorF w;
  if (weights) {
    require(weights->size() == features.cols(), "weights: expected " + std::to_string(features.cols()) +
                                                    " values (one per feature column), got " +
                                                    std::to_string(weights->size()));
    require(weights->allFinite() && weights->minCoeff() >= 0.0f,
            "weights: expected finite non-negative values");
    w = *weights;
  } else {
    w = variance_weights(features);
  }
  MatrixRM s(features.rows(), features.rows());
  affinity_into(features, w, z_ratio, s.data());
  return s;
}

}  // namespace clustermac
