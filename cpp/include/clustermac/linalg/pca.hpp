// Per-image PCA of the N local D-dimensional activations (paper Sec. 3.1): projection of the
// centred features onto their top C principal directions.
//
// Only C = 4..7 directions are wanted, so no D x D covariance is formed: the block Krylov
// solver of eigensolver.hpp runs on the implicit operator X^T X (or X X^T when N < D), each
// product being two passes over the data.
#pragma once

#include <Eigen/Dense>

#include <algorithm>
#include <string>

#include "clustermac/common.hpp"
#include "clustermac/linalg/dense_kernels.hpp"
#include "clustermac/linalg/eigensolver.hpp"

namespace clustermac {

struct PcaProjection {
  MatrixRM projection;  // N x C: centred features projected onto the top C principal directions
  VectorF variances;    // C: variance of each projected column (divisor N - 1; 0 when N = 1), descending
};

// The centred features (column means removed) are a row-major array `data`, either N x D
// (`locations_are_rows`, as pca_project gets them) or D x N (a feature map's own layout), its
// rows `stride` floats apart (stride < 0: contiguous rows).
// Components beyond the rank of the data come out with zero variance and a zero column.
// Signs are fixed so that the largest-magnitude entry of each projected column is positive.
inline PcaProjection pca_of_centred(const float* data, Eigen::Index n, Eigen::Index d, bool locations_are_rows,
                                    int n_components, Eigen::Index stride = -1) {
  using Eigen::Index;
  require(n >= 1 && d >= 1, "pca_project: features must have at least one row and one column");
  require(n_components >= 1 && n_components <= d, "pca_project: n_components must be in [1, D = " + std::to_string(d) +
                                                      "], got " + std::to_string(n_components));
  // X v (N x b) and X^T y (D x b) for X the N x D centred features.
  auto times = [&](const Eigen::MatrixXf& v, Eigen::MatrixXf& out) {
    if (locations_are_rows)
      detail::rowmajor_times(data, n, d, v, out, stride);
    else
      detail::rowmajor_transpose_times(data, d, n, v, out, stride);
  };
  auto transpose_times = [&](const Eigen::MatrixXf& y, Eigen::MatrixXf& out) {
    if (locations_are_rows)
      detail::rowmajor_transpose_times(data, n, d, y, out, stride);
    else
      detail::rowmajor_times(data, d, n, y, out, stride);
  };
  PcaProjection out;
  out.projection = MatrixRM::Zero(n, n_components);
  out.variances = VectorF::Zero(n_components);
  const int wanted = static_cast<int>(std::min<Index>(n_components, std::min(n, d)));

  // A fixed small budget: a block Krylov basis of 4 blocks of C + 4 vectors, restarted at most
  // once (at most 12 passes over the data). Where the spectrum is flat the "top" directions are
  // arbitrary anyway, and chasing them would cost tens of passes.
  EigenSolverOptions options;
  options.block_size = wanted + 4;
  options.blocks_per_cycle = 4;
  options.kept_blocks = 2;
  options.tolerance = 1e-3;
  options.max_cycles = 2;
  options.dense_below = 64;
  const double divisor = n > 1 ? static_cast<double>(n - 1) : 1.0;

  if (d <= n) {
    // Covariance operator on R^D; eigenvectors are the principal directions.
    auto apply = [&](const Eigen::MatrixXf& v, Eigen::MatrixXf& av) {
      Eigen::MatrixXf scores;
      times(v, scores);
      transpose_times(scores, av);
    };
    EigenPairs pairs = top_eigenpairs(d, wanted, apply, options);
    Eigen::MatrixXf projected;
    times(pairs.vectors, projected);
    for (int c = 0; c < wanted; ++c) {
      const double value = std::max(pairs.values(c), 0.0);
      if (value <= 0.0) continue;  // beyond the rank: leave the zero column
      out.projection.col(c) = projected.col(c);
      out.variances(c) = static_cast<float>(value / divisor);
    }
  } else {
    // Gram operator on R^N; the projected column is u * sqrt(lambda).
    auto apply = [&](const Eigen::MatrixXf& v, Eigen::MatrixXf& av) {
      Eigen::MatrixXf loadings;
      transpose_times(v, loadings);
      times(loadings, av);
    };
    EigenPairs pairs = top_eigenpairs(n, wanted, apply, options);
    for (int c = 0; c < wanted; ++c) {
      const double value = std::max(pairs.values(c), 0.0);
      if (value <= 0.0) continue;
      out.projection.col(c) = pairs.vectors.col(c) * static_cast<float>(std::sqrt(value));
      out.variances(c) = static_cast<float>(value / divisor);
    }
  }
  // Zero out numerically-null components so that constant or rank-deficient features give
  // exact zeros: float products leave eigenvalue noise of ~1e-7 * lambda_max * sqrt(N), so
  // variances below 1e-6 of the largest are treated as zero.
  const float largest = out.variances.size() ? out.variances(0) : 0.0f;
  for (int c = 0; c < n_components; ++c) {
    if (out.variances(c) <= 1e-6f * largest || largest <= 0.0f) {
      out.variances(c) = 0.0f;
      out.projection.col(c).setZero();
      continue;
    }
    Index arg = 0;
    out.projection.col(c).cwiseAbs().maxCoeff(&arg);
    if (out.projection(arg, c) < 0) out.projection.col(c) *= -1.0f;
  }
  return out;
}

// PCA of N x D row-major features (N locations, D channels), as exposed to Python.
inline PcaProjection pca_project(const ConstMatrixRef& features, int n_components) {
  require_non_empty("features", "of shape (N, D)", {features.rows(), features.cols()});
  require(n_components >= 1 && n_components <= features.cols(),
          "n_components: expected 1 <= n_components <= D = " + std::to_string(features.cols()) + ", got " +
              std::to_string(n_components));
  require_finite(features, "features");
  MatrixRM centred = features;
  // Row by row in double: a column-wise reduction over the row-major array strides through memory.
  Eigen::RowVectorXd sum = Eigen::RowVectorXd::Zero(features.cols());
  for (Eigen::Index i = 0; i < features.rows(); ++i) sum += features.row(i).cast<double>();
  const Eigen::RowVectorXf mean = (sum / static_cast<double>(features.rows())).cast<float>();
  centred.rowwise() -= mean;
  return pca_of_centred(centred.data(), centred.rows(), centred.cols(), true, n_components);
}

}  // namespace clustermac
