// Normalized Cut (Shi & Malik 2000) on a dense similarity matrix S (paper Eq. 3): the
// embedding is the top-k eigenvectors of a normalised affinity, mapped back by D^-1/2, and
// the partition comes from the discretisation of Yu & Shi 2003 (discretize.hpp).
//
// Two graph normalisations are offered:
//  - "shi": Shi's released Ncut code, which the paper used: P = D^-1/2 (S + 0.5 I) D^-1/2 with
//    D = rowsum(S) + 1 (its "offset" of 0.5, self-similarities kept), largest eigenpairs.
//  - "sym": as scikit-learn's spectral_clustering: self-loops dropped, P = D^-1/2 S' D^-1/2 with
//    S' = S - diag(S), D = rowsum(S').
// The operator is applied matrix-free (P V = D^-1/2 S (D^-1/2 V) + diagonal term), so S is
// read, never copied or rescaled.
#pragma once

#include <Eigen/Dense>

#include <cmath>
#include <string>

#include "clustermac/common.hpp"
#include "clustermac/discretize.hpp"
#include "clustermac/eigensolver.hpp"

namespace clustermac {

enum class Normalization { shi, sym };

inline Normalization parse_normalization(const std::string& name) {
  if (name == "shi") return Normalization::shi;
  if (name == "sym") return Normalization::sym;
  fail("normalization: expected \"shi\" or \"sym\", got \"" + name + "\"");
}

// Eigensolver settings for NCut, chosen with benchmarks/bench_clustering.cpp and
// benchmarks/clustering.py (see the comments there for the measurements).
inline EigenSolverOptions ncut_solver_options(int n_vectors) {
  EigenSolverOptions options;
  options.block_size = n_vectors + 5;
  options.blocks_per_cycle = 6;
  options.kept_blocks = 3;
  options.tolerance = 1e-2;
  options.max_cycles = 4;
  options.dense_below = 200;
  return options;
}

// Top `n_vectors` generalised eigenvectors D^-1/2 u of the NCut problem for the N x N
// symmetric non-negative similarity `s` (row-major, not checked here). Columns have unit
// l2 norm; the sign of each column makes its largest-magnitude entry positive.
inline Eigen::MatrixXd ncut_embedding_of(const Eigen::Ref<const MatrixRM>& s, int n_vectors,
                                         Normalization normalization,
                                         const EigenSolverOptions* options_override = nullptr,
                                         EigenPairs* diagnostics = nullptr) {
  using Eigen::Index;
  const Index n = s.rows();
  Eigen::VectorXd degree = s.cast<double>().rowwise().sum();
  Eigen::VectorXf inv_sqrt_degree(n), diagonal_term(n);
  for (Index i = 0; i < n; ++i) {
    const double self = s(i, i);
    const double d = normalization == Normalization::shi ? degree(i) + 1.0 : degree(i) - self;
    const double inv = d > 0 ? 1.0 / std::sqrt(d) : 0.0;
    inv_sqrt_degree(i) = static_cast<float>(inv);
    // Shi: + 0.5 D^-1 (the offset on the diagonal); sym: - S_ii D^-1 (self-loop removed).
    diagonal_term(i) = static_cast<float>((normalization == Normalization::shi ? 0.5 : -self) * inv * inv);
  }
  auto apply = [&](const Eigen::MatrixXf& v, Eigen::MatrixXf& pv) {
    Eigen::MatrixXf scaled = inv_sqrt_degree.asDiagonal() * v;
    pv.noalias() = s * scaled;
    pv = inv_sqrt_degree.asDiagonal() * pv;
    pv += diagonal_term.asDiagonal() * v;
  };
  const EigenSolverOptions options = options_override ? *options_override : ncut_solver_options(n_vectors);
  EigenPairs pairs = top_eigenpairs(n, n_vectors, apply, options);
  Eigen::MatrixXd embedding = inv_sqrt_degree.cast<double>().asDiagonal() * pairs.vectors.cast<double>();
  for (Index c = 0; c < embedding.cols(); ++c) {
    const double norm = embedding.col(c).norm();
    if (norm > 0) embedding.col(c) /= norm;
    Index arg = 0;
    embedding.col(c).cwiseAbs().maxCoeff(&arg);
    if (embedding(arg, c) < 0) embedding.col(c) *= -1.0;
  }
  if (diagnostics) *diagnostics = std::move(pairs);
  return embedding;
}

// Checks that `s` is a usable similarity matrix (square, finite, non-negative, symmetric).
inline void check_similarity(const Eigen::Ref<const MatrixRM>& s) {
  using Eigen::Index;
  const Index n = s.rows();
  require(n >= 1 && s.cols() == n, "affinity: expected a square N x N matrix with N >= 1, got " +
                                       std::to_string(s.rows()) + " x " + std::to_string(s.cols()));
  require_finite(s, "affinity");
  require(s.minCoeff() >= 0.0f, "affinity: expected non-negative similarities, got a minimum of " +
                                    std::to_string(s.minCoeff()));
  const float tolerance = 1e-5f * std::max(s.maxCoeff(), 1e-30f);
  constexpr Index tile = 64;
  for (Index ib = 0; ib < n; ib += tile)
    for (Index jb = 0; jb <= ib; jb += tile)
      for (Index i = ib; i < std::min(ib + tile, n); ++i)
        for (Index j = jb; j < std::min(std::min(jb + tile, n), i); ++j)
          if (std::abs(s(i, j) - s(j, i)) > tolerance)
            fail("affinity: expected a symmetric matrix, but affinity[" + std::to_string(i) + ", " +
                 std::to_string(j) + "] = " + std::to_string(s(i, j)) + " differs from affinity[" +
                 std::to_string(j) + ", " + std::to_string(i) + "] = " + std::to_string(s(j, i)));
}

// Labels in [0, m) with m <= n_clusters: NCut into n_clusters groups. Groups the
// discretisation leaves empty are dropped by compact relabelling (so m < n_clusters can
// happen when the data has fewer separable groups); n_clusters = 1 gives all zeros.
inline VectorI ncut_labels_of(const Eigen::Ref<const MatrixRM>& s, int n_clusters, std::uint64_t seed,
                              Normalization normalization) {
  const Eigen::Index n = s.rows();
  if (n_clusters <= 1) return VectorI::Zero(n);
  return discretize(ncut_embedding_of(s, n_clusters, normalization), seed);
}

}  // namespace clustermac
