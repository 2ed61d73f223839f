// Normalized Cut (Shi & Malik 2000) on a dense similarity matrix S (paper Eq. 3): the
// embedding is the top-k eigenvectors of a normalised affinity, mapped back by D^-1/2, and
// the partition comes from the discretisation of Yu & Shi 2003 (discretize.hpp).
//
// Two graph normalisations are offered:
//  - "shi": Shi's released Ncut code, which the paper used: P = D^-1/2 (S + 0.5 I) D^-1/2 with
//    D = rowsum(S) + 1 (its "offset" of 0.5, self-similarities kept), largest eigenpairs.
//  - "sym": as scikit-learn's spectral_clustering: self-loops dropped, P = D^-1/2 S' D^-1/2 with
//    S' = S - diag(S), D = rowsum(S').
// Default "sym": on real feature maps its partitions have a lower NCut objective and need fewer
// eigensolver products (benchmarks/clustering.py); "shi" gives more balanced partitions. Both
// are kept, to be decided by retrieval mAP.
// The operator is applied matrix-free (P V = D^-1/2 S (D^-1/2 V) + diagonal term), so S is
// read, never copied or rescaled.
#pragma once

#include <Eigen/Dense>

#include <cmath>
#include <string>

#include "clustermac/clustering/discretize.hpp"
#include "clustermac/clustering/similarity_bf16.hpp"
#include "clustermac/common.hpp"
#include "clustermac/linalg/dense_kernels.hpp"
#include "clustermac/linalg/eigensolver.hpp"

namespace clustermac {

enum class Normalization { shi, sym };

inline Normalization parse_normalization(const std::string& name) {
  if (name == "shi") return Normalization::shi;
  if (name == "sym") return Normalization::sym;
  fail("normalization: expected \"shi\" or \"sym\", got \"" + name + "\"");
}

namespace detail {

// result (n x b, column-major) = s (n x n row-major, symmetric) * (scale .* v).
inline void similarity_times_block(const Eigen::Ref<const MatrixRM>& s, const Eigen::VectorXf& scale,
                                   const Eigen::MatrixXf& v, Eigen::MatrixXf& result) {
#ifdef CLUSTERMAC_SIMD_X86
  const Eigen::Index n = s.rows(), b = v.cols();
  if (simd_at_least(kSimdAvx2) && s.outerStride() == n) {
    const Eigen::Index width = (b + 7) / 8 * 8;
    MatrixRM packed = MatrixRM::Zero(n, width);
    packed.leftCols(b) = scale.asDiagonal() * v;
    MatrixRM product(n, width);
    dense_times_block(ProductOperands{s.data(), n, n, packed.data(), width, product.data(), width, false}, n, width);
    result = product.leftCols(b);
    return;
  }
#endif
  Eigen::MatrixXf scaled = scale.asDiagonal() * v;
  result.noalias() = s * scaled;
}

}  // namespace detail

// Eigensolver settings for NCut, chosen with benchmarks/bench_clustering.cpp and
// benchmarks/clustering.py: the partitions' NCut objective stops changing long before the
// eigenpairs reach a tight residual, so the solve is capped at the fewest cycles whose
// partitions matched converged ones ("shi" converges more slowly and gets more). Block sizes
// are multiples of 8, the width of the AVX2 product kernel.
inline EigenSolverOptions ncut_solver_options(int n_vectors, Normalization normalization) {
  EigenSolverOptions options;
  options.block_size = (n_vectors + 3 + 7) / 8 * 8;
  const bool few = options.block_size <= 8;
  options.blocks_per_cycle = few ? 8 : 6;
  options.kept_blocks = few ? 4 : 3;
  options.tolerance = 1e-2;
  if (normalization == Normalization::sym)
    options.max_cycles = few ? 3 : 2;
  else
    options.max_cycles = 4;
  options.dense_below = 200;
  return options;
}

namespace detail {

// The NCut embedding of a similarity given by its row sums `degree` and its product
// `multiply(scale, V, out)`: out = S (scale .* V). See ncut_embedding_of.
template <typename Multiply>
Eigen::MatrixXd ncut_embedding_from(const Eigen::VectorXd& degree, Multiply&& multiply, int n_vectors,
                                    Normalization normalization, const EigenSolverOptions* options_override,
                                    EigenPairs* diagnostics) {
  using Eigen::Index;
  const Index n = degree.size();
  Eigen::VectorXf inv_sqrt_degree(n), diagonal_term = Eigen::VectorXf::Zero(n);
  for (Index i = 0; i < n; ++i) {
    const double d = normalization == Normalization::shi ? degree(i) + 1.0 : degree(i);
    const double inv = d > 0 ? 1.0 / std::sqrt(d) : 0.0;
    inv_sqrt_degree(i) = static_cast<float>(inv);
    // Shi: + 0.5 D^-1, the offset on the diagonal (D >= 1 there, so no cancellation).
    if (normalization == Normalization::shi) diagonal_term(i) = static_cast<float>(0.5 * inv * inv);
  }
  auto apply = [&](const Eigen::MatrixXf& v, Eigen::MatrixXf& pv) {
    multiply(inv_sqrt_degree, v, pv);
    pv = inv_sqrt_degree.asDiagonal() * pv;
    if (normalization == Normalization::shi) pv += diagonal_term.asDiagonal() * v;
  };
  const EigenSolverOptions options =
      options_override ? *options_override : ncut_solver_options(n_vectors, normalization);
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

}  // namespace detail

// Top `n_vectors` generalised eigenvectors D^-1/2 u of the NCut problem for the N x N
// symmetric non-negative similarity `s` (row-major, not checked here). Columns have unit
// l2 norm; the sign of each column makes its largest-magnitude entry positive.
//
// "sym" needs S without its diagonal, and it must be removed from the matrix, not subtracted
// after the product: an isolated location (all similarities ~1e-7 but S_ii = 1) has a tiny
// degree, and subtracting its self term in float afterwards cancels catastrophically. With
// `diagonal_is_zero` false the function works on a copy with the diagonal zeroed (the bindings'
// case, whose S belongs to the caller); cluster_feature_map zeroes its own workspace instead.
inline Eigen::MatrixXd ncut_embedding_of(const Eigen::Ref<const MatrixRM>& s, int n_vectors,
                                         Normalization normalization,
                                         const EigenSolverOptions* options_override = nullptr,
                                         EigenPairs* diagnostics = nullptr, bool diagonal_is_zero = false) {
  if (normalization == Normalization::sym && !diagonal_is_zero && s.diagonal().cwiseAbs().maxCoeff() > 0.0f) {
    MatrixRM without_self = s;
    without_self.diagonal().setZero();
    return ncut_embedding_of(without_self, n_vectors, normalization, options_override, diagnostics, true);
  }
  // Float row sums (vectorised, one pass over S): relative error ~1e-7 * sqrt(N), far below the
  // solver tolerance. For "sym" the diagonal is zero here, so this is rowsum(S - diag S).
  const Eigen::VectorXd degree = s.rowwise().sum().cast<double>();
  auto multiply = [&](const Eigen::VectorXf& scale, const Eigen::MatrixXf& v, Eigen::MatrixXf& out) {
    detail::similarity_times_block(s, scale, v, out);
  };
  return detail::ncut_embedding_from(degree, multiply, n_vectors, normalization, options_override, diagnostics);
}

// The same for a similarity stored in bf16 (similarity_bf16.hpp), whose diagonal the caller has
// already zeroed for "sym".
inline Eigen::MatrixXd ncut_embedding_of(const SimilarityBf16& s, int n_vectors, Normalization normalization) {
  auto multiply = [&](const Eigen::VectorXf& scale, const Eigen::MatrixXf& v, Eigen::MatrixXf& out) {
    bf16_similarity_times_block(s, scale, v, out);
  };
  return detail::ncut_embedding_from(bf16_row_sums(s), multiply, n_vectors, normalization, nullptr, nullptr);
}

// Checks that `s` is a usable similarity matrix (square, finite, non-negative, symmetric).
inline void check_similarity(const Eigen::Ref<const MatrixRM>& s) {
  using Eigen::Index;
  const Index n = s.rows();
  require(n >= 1 && s.cols() == n, "affinity: expected a square N x N matrix with N >= 1, got " +
                                       std::to_string(s.rows()) + " x " + std::to_string(s.cols()));
  require_finite(s, "affinity");
  require(s.minCoeff() >= 0.0f,
          "affinity: expected non-negative similarities, got a minimum of " + std::to_string(s.minCoeff()));
  const float tolerance = 1e-5f * std::max(s.maxCoeff(), 1e-30f);
  constexpr Index tile = 64;
  for (Index ib = 0; ib < n; ib += tile)
    for (Index jb = 0; jb <= ib; jb += tile)
      for (Index i = ib; i < std::min(ib + tile, n); ++i)
        for (Index j = jb; j < std::min(std::min(jb + tile, n), i); ++j)
          if (std::abs(s(i, j) - s(j, i)) > tolerance)
            fail("affinity: expected a symmetric matrix, but affinity[" + std::to_string(i) + ", " + std::to_string(j) +
                 "] = " + std::to_string(s(i, j)) + " differs from affinity[" + std::to_string(j) + ", " +
                 std::to_string(i) + "] = " + std::to_string(s(j, i)));
}

// The NCut embedding as exposed to Python: checks the arguments, then ncut_embedding_of on the
// similarity as given (float32) or rounded to bf16.
inline Eigen::MatrixXd ncut_embedding(const Eigen::Ref<const MatrixRM>& s, int n_vectors, Normalization normalization,
                                      SimilarityPrecision precision) {
  require_non_empty("affinity", "of shape (N, N)", {s.rows(), s.cols()});
  require_locations(s.rows(), "affinity");
  const bool bf16 = precision == SimilarityPrecision::bfloat16;
  require(!bf16 || simd_has_avx512_bf16(),
          "similarity_precision=\"bfloat16\" needs a CPU with AVX512-BF16 (and the environment variable "
          "CLUSTERMAC_NO_BF16 unset); use \"float32\"");
  require(n_vectors >= 1 && n_vectors <= s.rows(), "n_vectors: expected 1 <= n_vectors <= N = " +
                                                       std::to_string(s.rows()) + ", got " + std::to_string(n_vectors));
  check_similarity(s);
  if (bf16) return ncut_embedding_of(bf16_similarity(s, normalization == Normalization::sym), n_vectors, normalization);
  return ncut_embedding_of(s, n_vectors, normalization);
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

// NCut labels as exposed to Python: checks the arguments, then ncut_labels_of.
inline VectorI ncut(const Eigen::Ref<const MatrixRM>& s, int n_clusters, std::uint64_t seed,
                    Normalization normalization) {
  require_non_empty("affinity", "of shape (N, N)", {s.rows(), s.cols()});
  require_locations(s.rows(), "affinity");
  require(n_clusters >= 1 && n_clusters <= s.rows(),
          "n_clusters: expected 1 <= n_clusters <= N = " + std::to_string(s.rows()) +
              " (the number of rows of affinity), got " + std::to_string(n_clusters));
  check_similarity(s);
  return ncut_labels_of(s, n_clusters, seed, normalization);
}

}  // namespace clustermac
