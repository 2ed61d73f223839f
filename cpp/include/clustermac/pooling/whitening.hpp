// l2-normalisation and PCA-whitening of descriptor vectors, as used by R-MAC (Tolias et al.,
// ICLR 2016) and the paper's Sec. 4.2 (regional MAC → l2 → PCA-whitening → l2).
#pragma once

#include <cmath>
#include <string>
#include <utility>

#include <Eigen/Eigenvalues>

#include "clustermac/common.hpp"
#include "clustermac/linalg/dense_kernels.hpp"

namespace clustermac {

// Scales v to unit l2 norm in place (norm accumulated in double). Returns false, leaving v
// unchanged, for a zero vector: a zero vector stays zero, never NaN.
inline bool l2_normalize_in_place(float* v, std::ptrdiff_t n) {
  double squares = 0.0;
  for (std::ptrdiff_t i = 0; i < n; ++i) squares += static_cast<double>(v[i]) * v[i];
  if (!(squares > 0.0)) return false;
  const double scale = 1.0 / std::sqrt(squares);
  for (std::ptrdiff_t i = 0; i < n; ++i) v[i] = static_cast<float>(v[i] * scale);
  return true;
}

// l2_normalize as exposed to Python: NaN or Inf in `vectors` is refused (it would come out as NaN).
inline MatrixRM l2_normalize_rows(const ConstMatrixRef& vectors) {
  require_finite(vectors, "vectors");
  MatrixRM out = vectors;
  for (std::ptrdiff_t r = 0; r < out.rows(); ++r) l2_normalize_in_place(out.row(r).data(), out.cols());
  return out;
}

struct Whitening {
  VectorF mean;         // D
  MatrixRM projection;  // dim × D
};

// PCA-whitening learned from N×D vectors: centre, eigen-decompose the covariance, keep the
// top `dim` eigenvectors and scale each by (λ + shrinkage·λmax)^(-1/2). The shrinkage term
// regularises the small eigenvalues: whitening learned from a few hundred images is badly
// conditioned and, unregularised, divides noise directions by ~0. Computed in double; for N < D via the N×N Gram
// matrix, which has the same non-zero spectrum. Each eigenvector's sign is fixed so that its largest-magnitude entry is
// positive.
inline Whitening fit_pca_whitening(const ConstMatrixRef& vectors, std::ptrdiff_t dim, double shrinkage) {
  const std::ptrdiff_t n = vectors.rows(), d = vectors.cols();
  require(n >= 1 && d >= 1,
          "vectors: expected a non-empty N×D array, got " + std::to_string(n) + "×" + std::to_string(d));
  require_finite(vectors, "vectors");
  require(std::isfinite(shrinkage) && shrinkage >= 0.0,
          "shrinkage: expected a finite number >= 0, got " + std::to_string(shrinkage));
  require(dim >= 1 && dim <= std::min(n, d), "dim: expected 1 <= dim <= min(N, D) = " + std::to_string(std::min(n, d)) +
                                                 " (N=" + std::to_string(n) + " vectors of D=" + std::to_string(d) +
                                                 "), got " + std::to_string(dim));
  MatrixRMd centred = vectors.cast<double>();
  const VectorD mean = centred.colwise().mean().transpose();
  centred.rowwise() -= mean.transpose();
  const double denominator = n > 1 ? static_cast<double>(n - 1) : 1.0;
  VectorD eigenvalues;  // descending, length dim
  MatrixRMd eigenvectors(dim, d);
  if (n >= d) {
    const Eigen::MatrixXd covariance = (centred.transpose() * centred) / denominator;
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(covariance);
    require(solver.info() == Eigen::Success, "fit_pca_whitening: eigendecomposition did not converge");
    eigenvalues = solver.eigenvalues().reverse().head(dim);
    for (std::ptrdiff_t i = 0; i < dim; ++i) eigenvectors.row(i) = solver.eigenvectors().col(d - 1 - i).transpose();
  } else {
    // Gram route: (Xc Xcᵀ) u = μ u  ⇒  Xcᵀ u is a covariance eigenvector with λ = μ/(n-1).
    const Eigen::MatrixXd gram = centred * centred.transpose();
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(gram);
    require(solver.info() == Eigen::Success, "fit_pca_whitening: eigendecomposition did not converge");
    eigenvalues = (solver.eigenvalues().reverse().head(dim).array() / denominator).matrix();
    for (std::ptrdiff_t i = 0; i < dim; ++i) {
      VectorD v = centred.transpose() * solver.eigenvectors().col(n - 1 - i);
      const double norm = v.norm();
      // A zero-variance direction of the Gram matrix carries no covariance eigenvector; any unit
      // vector orthogonal to the previous ones will do, its scale comes from the shrinkage alone.
      if (norm > 1e-12 * std::max(1.0, std::sqrt(std::abs(eigenvalues[0]) * denominator))) {
        v /= norm;
      } else {
        v.setZero();
        for (std::ptrdiff_t j = 0; j < d && v.norm() == 0.0; ++j) {
          VectorD candidate = VectorD::Unit(d, j);
          for (std::ptrdiff_t k = 0; k < i; ++k)
            candidate -= eigenvectors.row(k).dot(candidate) * eigenvectors.row(k).transpose();
          if (candidate.norm() > 1e-6) v = candidate / candidate.norm();
        }
      }
      eigenvectors.row(i) = v.transpose();
    }
  }
  for (std::ptrdiff_t i = 0; i < dim; ++i) {
    std::ptrdiff_t largest = 0;
    eigenvectors.row(i).cwiseAbs().maxCoeff(&largest);
    if (eigenvectors(i, largest) < 0) eigenvectors.row(i) *= -1.0;
  }
  const double largest_eigenvalue = std::max(eigenvalues[0], 0.0);
  require(largest_eigenvalue > 0.0, "vectors: all vectors are identical (zero variance); cannot learn a whitening");
  // Directions with no variance come out as round-off (±1e-16·λmax); call them zero so that
  // shrinkage = 0 refuses them instead of scaling noise by 1e8.
  for (std::ptrdiff_t i = 0; i < dim; ++i)
    if (eigenvalues[i] < 1e-9 * largest_eigenvalue) eigenvalues[i] = 0.0;
  Whitening result;
  result.mean = mean.cast<float>();
  result.projection.resize(dim, d);
  for (std::ptrdiff_t i = 0; i < dim; ++i) {
    const double regularised = eigenvalues[i] + shrinkage * largest_eigenvalue;
    require(regularised > 0.0, "fit_pca_whitening: eigenvalue " + std::to_string(i) +
                                   " is zero and shrinkage is 0; use shrinkage > 0 or dim <= " + std::to_string(i));
    result.projection.row(i) = (eigenvectors.row(i) / std::sqrt(regularised)).cast<float>();
  }
  return result;
}

// (x − mean)·Pᵀ for each row of x (n × D; P is dim × D); no normalisation (the caller
// l2-normalises). The product is the AVX2 + FMA kernel of dense_kernels.hpp when the CPU has it:
// whitening the regional vectors of each AML box is most of R-MAC's cost in re-ranking.
inline MatrixRM whiten(const ConstMatrixRef& vectors, const float* mean, const ConstMatrixRef& projection) {
  const Eigen::Index n = vectors.rows(), d = vectors.cols(), dim = projection.rows();
  // centred^T (D × n, column-major): the right-hand side of P · centred^T.
  Eigen::MatrixXf centred_t = vectors.transpose();
  centred_t.colwise() -= Eigen::Map<const VectorF>(mean, d);
  if (projection.outerStride() != d || n == 0) return (projection * centred_t).transpose();
  Eigen::MatrixXf product;  // dim × n column-major: the n × dim result, row-major
  detail::rowmajor_times(projection.data(), dim, d, centred_t, product);
  return Eigen::Map<const MatrixRM>(product.data(), n, dim);
}

// whiten() as exposed to Python: NaN or Inf in `vectors` is refused, and so is a result that
// overflows float32 (finite but huge inputs), instead of passing NaN or inf on.
inline MatrixRM apply_whitening(const ConstMatrixRef& vectors, const ConstVectorRef& mean,
                                const ConstMatrixRef& projection) {
  require_finite(vectors, "vectors");
  MatrixRM out = whiten(vectors, mean.data(), projection);
  if (!out.allFinite())
    fail(
        "apply_whitening: the whitened vectors overflow float32 (inf or NaN); the vectors are too large for this "
        "projection, scale them down (e.g. l2-normalise them first)");
  return out;
}

}  // namespace clustermac
