// Discretisation of a continuous NCut embedding into K clusters (Yu & Shi, "Multiclass
// spectral clustering", ICCV 2003), as used by Shi's released Ncut code: rows are normalised
// to the unit sphere, then labels = argmax of the rows of V R, alternating the discrete
// labels and the best orthogonal rotation R (an SVD, Procrustes) until the objective stops
// changing or 20 iterations have been done.
#pragma once

#include <Eigen/Dense>
#include <Eigen/SVD>

#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "clustermac/common.hpp"

namespace clustermac {

// Maps the labels in use to 0..m-1 keeping their order (so no label value is left empty).
inline int relabel_compactly(VectorI& labels) {
  if (labels.size() == 0) return 0;
  const int max_label = labels.maxCoeff();
  std::vector<int> new_label(static_cast<std::size_t>(max_label) + 1, -1);
  for (Eigen::Index i = 0; i < labels.size(); ++i) new_label[labels(i)] = 0;
  int next = 0;
  for (auto& value : new_label)
    if (value == 0) value = next++;
  for (Eigen::Index i = 0; i < labels.size(); ++i) labels(i) = new_label[labels(i)];
  return next;
}

// `embedding` is N x K (K >= 2). Returns labels in [0, K); clusters that end up with no member
// are removed by compact relabelling, so the result may use fewer than K labels.
inline VectorI discretize(const Eigen::MatrixXd& embedding, std::uint64_t seed) {
  using Eigen::Index;
  const Index n = embedding.rows(), k = embedding.cols();
  VectorI labels = VectorI::Zero(n);
  if (n == 0 || k <= 1) return labels;

  // Columns to equal norm, then rows to unit length (zero rows stay zero). Row-major: every
  // step below works row by row.
  MatrixRMd v = embedding;
  for (Index c = 0; c < k; ++c) {
    const double norm = v.col(c).norm();
    if (norm > 0) v.col(c) /= norm;
  }
  for (Index i = 0; i < n; ++i) {
    const double norm = v.row(i).norm();
    if (norm > 0) v.row(i) /= norm;
  }

  // Initial rotation: a random row, then greedily the rows most orthogonal to those chosen.
  std::mt19937_64 rng(seed);
  Eigen::MatrixXd rotation(k, k);
  rotation.col(0) = v.row(static_cast<Index>(rng() % static_cast<std::uint64_t>(n))).transpose();
  Eigen::VectorXd accumulated = Eigen::VectorXd::Zero(n);
  for (Index j = 1; j < k; ++j) {
    accumulated += (v * rotation.col(j - 1)).cwiseAbs();
    Index arg = 0;
    accumulated.minCoeff(&arg);
    rotation.col(j) = v.row(arg).transpose();
  }

  double last_objective = 0.0;
  const int max_iterations = 20;
  for (int iteration = 0;; ++iteration) {
    const MatrixRMd rotated = v * rotation;
    for (Index i = 0; i < n; ++i) {
      Index arg = 0;
      rotated.row(i).maxCoeff(&arg);
      labels(i) = static_cast<std::int32_t>(arg);
    }
    // M = X_discrete^T V: row c is the sum of the embedding rows labelled c.
    Eigen::MatrixXd summed = Eigen::MatrixXd::Zero(k, k);
    for (Index i = 0; i < n; ++i) summed.row(labels(i)) += v.row(i);
    Eigen::JacobiSVD<Eigen::MatrixXd> svd(summed, Eigen::ComputeFullU | Eigen::ComputeFullV);
    const double objective = 2.0 * (static_cast<double>(n) - svd.singularValues().sum());
    if (std::abs(objective - last_objective) < std::numeric_limits<double>::epsilon() || iteration >= max_iterations)
      break;
    last_objective = objective;
    rotation = svd.matrixV() * svd.matrixU().transpose();
  }
  relabel_compactly(labels);
  return labels;
}

}  // namespace clustermac
