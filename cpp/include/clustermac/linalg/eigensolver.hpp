// Largest eigenpairs of a symmetric operator given only as a block product V -> A V.
//
// Used for the Normalized-Cut embedding (paper Sec. 3.2, Shi & Malik 2000) and for the
// per-image PCA (Sec. 3.1). The method is a restarted block Krylov iteration with
// Rayleigh-Ritz: each cycle builds the basis [X, A X, A^2 X, ...] of `blocks_per_cycle`
// blocks from the current Ritz block X, orthonormalised in full, and restarts from the
// best Ritz vectors. Why blocks: the NCut operator is a dense N x N matrix that does
// not fit in cache, so a product with a block of b vectors costs little more memory
// traffic than a product with one vector (one pass over the matrix either way).
#pragma once

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>

#include "clustermac/common.hpp"
#include "clustermac/linalg/dense_kernels.hpp"

namespace clustermac {

struct EigenSolverOptions {
  int block_size = 0;        // b: 0 -> k + max(3, k / 4)
  int blocks_per_cycle = 4;  // basis of blocks_per_cycle * b vectors at most
  int kept_blocks = 0;       // Ritz vectors kept at a restart, in blocks (0: half the basis)
  double tolerance = 1e-4;   // stop when ||A x - theta x|| <= tolerance * max|theta| for the k wanted pairs
  int max_cycles = 60;       // restart cycles before giving up (the best Ritz pairs are returned)
  int dense_below = 200;     // operators of this dimension or less are solved densely
  std::uint64_t seed = 0;    // start block (the solver is deterministic for a given seed)
};

struct EigenPairs {
  VectorD values;           // k largest eigenvalues, descending
  Eigen::MatrixXf vectors;  // n x k orthonormal eigenvectors (column-major)
  int n_products = 0;       // block products with A (counted in vectors)
  int n_cycles = 0;
  bool converged = false;
  double max_residual = 0.0;
};

namespace detail {

// Uniform in [-1, 1) from raw mt19937_64 output: identical on every platform, unlike
// std::uniform_real_distribution.
inline float uniform_pm1(std::mt19937_64& rng) {
  return static_cast<float>(static_cast<double>(rng() >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

// Orthonormalises column `col` of `basis` against columns [0, col) by classical Gram-Schmidt
// applied twice (enough for float orthogonality). A column that is (numerically) inside the
// span of the earlier ones is replaced by a random vector, so the basis never degenerates.
inline void orthonormalise_column(Eigen::Ref<Eigen::MatrixXf> basis, Eigen::Index col, std::mt19937_64& rng) {
  const Eigen::Index n = basis.rows();
  for (int attempt = 0; attempt < 4; ++attempt) {
    auto v = basis.col(col);
    const float norm_before = v.norm();
    for (int pass = 0; pass < 2 && col > 0; ++pass) {
      Eigen::VectorXf coefficients = basis.leftCols(col).transpose() * v;
      v.noalias() -= basis.leftCols(col) * coefficients;
    }
    const float norm_after = v.norm();
    if (norm_after > 1e-4f * norm_before && norm_after > 1e-30f) {
      v /= norm_after;
      return;
    }
    for (Eigen::Index i = 0; i < n; ++i) basis(i, col) = uniform_pm1(rng);
  }
  // Only reachable when col >= n (no room left): keep a zero column; its Ritz value is 0.
  basis.col(col).setZero();
}

// Orthonormalises columns [begin, begin + count) of `basis` against columns [0, begin) and
// among themselves. The projection against the earlier columns is done as two block
// products (classical Gram-Schmidt twice, as GEMMs); the few columns within the block go one by one.
inline void orthonormalise_block(Eigen::Ref<Eigen::MatrixXf> basis, Eigen::Index begin, Eigen::Index count,
                                 std::mt19937_64& rng) {
  auto block = basis.middleCols(begin, count);
  const Eigen::VectorXf norms_before = block.colwise().norm().transpose();
  if (begin > 0) {
    // The first `begin` columns (column-major, n x begin) are a row-major begin x n array with
    // rows basis.outerStride() floats apart.
    const Eigen::Index n = basis.rows(), ld = basis.outerStride();
    Eigen::MatrixXf current, coefficients, projection;
    for (int pass = 0; pass < 2; ++pass) {
      current = block;
      rowmajor_times(basis.data(), begin, n, current, coefficients, ld);               // Q^T B
      rowmajor_transpose_times(basis.data(), begin, n, coefficients, projection, ld);  // Q (Q^T B)
      block -= projection;
    }
  }
  for (Eigen::Index c = 0; c < count; ++c) {
    auto v = block.col(c);
    for (int pass = 0; pass < 2 && c > 0; ++pass) {
      Eigen::VectorXf coefficients = block.leftCols(c).transpose() * v;
      v.noalias() -= block.leftCols(c) * coefficients;
    }
    const float norm = v.norm();
    if (norm > 1e-4f * norms_before(c) && norm > 1e-30f)
      v /= norm;
    else
      orthonormalise_column(basis, begin + c, rng);  // dependent column: replaced by a random one
  }
}

}  // namespace detail

// k largest eigenpairs of the symmetric n x n operator `apply(const MatrixXf& V, MatrixXf& AV)`.
template <typename Apply>
EigenPairs top_eigenpairs(Eigen::Index n, int k, Apply&& apply, const EigenSolverOptions& options = {}) {
  using Eigen::Index;
  require(n >= 1, "top_eigenpairs: the operator dimension must be at least 1");
  require(k >= 1 && k <= n,
          "top_eigenpairs: need 1 <= k <= n, got k = " + std::to_string(k) + ", n = " + std::to_string(n));
  EigenPairs result;
  std::mt19937_64 rng(options.seed ^ 0x9E3779B97F4A7C15ull);

  int block = options.block_size > 0 ? options.block_size : k + std::max(3, k / 4);
  block = std::max(block, k);
  const int blocks_per_cycle = std::max(2, options.blocks_per_cycle);

  // Small operators: form the matrix with one product and diagonalise it in double.
  if (n <= options.dense_below || static_cast<Index>(block) * blocks_per_cycle >= n) {
    Eigen::MatrixXf identity = Eigen::MatrixXf::Identity(n, n);
    Eigen::MatrixXf dense(n, n);
    apply(identity, dense);
    Eigen::MatrixXd symmetric = dense.cast<double>();
    symmetric = 0.5 * (symmetric + symmetric.transpose()).eval();
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(symmetric);
    result.values = solver.eigenvalues().reverse().head(k);
    result.vectors = solver.eigenvectors().rowwise().reverse().leftCols(k).cast<float>();
    result.n_products = static_cast<int>(n);
    result.converged = true;
    return result;
  }

  const Index m = static_cast<Index>(block) * blocks_per_cycle;
  // Thick restart: keep this many Ritz vectors (with their known products) across cycles.
  const Index keep = std::clamp<Index>(
      options.kept_blocks > 0 ? static_cast<Index>(options.kept_blocks) * block : m / 2, block, m - block);
  // Q (orthonormal basis) and A Q, n x m column-major with a padded leading dimension (see
  // detail::padded_leading_dimension: Q y and (A Q) y walk down their columns).
  const Index ld = detail::padded_leading_dimension(n);
  Eigen::MatrixXf basis_storage(ld, m), basis_product_storage(ld, m);
  auto basis = basis_storage.topRows(n);
  auto basis_product = basis_product_storage.topRows(n);
  Eigen::MatrixXf block_in(n, block), block_out(n, block);

  // Start block: the all-ones vector (the start vector of Shi's Ncut code) plus random vectors.
  basis.col(0).setOnes();
  for (Index j = 1; j < block; ++j)
    for (Index i = 0; i < n; ++i) basis(i, j) = detail::uniform_pm1(rng);
  detail::orthonormalise_block(basis, 0, block, rng);
  block_in = basis.leftCols(block);
  apply(block_in, block_out);
  result.n_products += block;
  basis_product.leftCols(block) = block_out;
  Index filled = block;
  // The block that seeds the next extension: A * (last block) in plain Krylov steps, the
  // residuals of the wanted Ritz vectors right after a restart (both span the same
  // direction that the kept Ritz vectors leave the subspace in).
  Eigen::MatrixXf next_block = basis_product.leftCols(block);

  // H = Q^T A Q, kept across restarts: after one, its kept block is diag(Ritz values), so only
  // the columns of new blocks are computed.
  Eigen::MatrixXd projected = Eigen::MatrixXd::Zero(m, m);
  Index known = 0;  // columns [0, known) of `projected` are up to date
  for (int cycle = 0; cycle < options.max_cycles; ++cycle) {
    result.n_cycles = cycle + 1;
    while (filled + block <= m) {
      basis.middleCols(filled, block) = next_block;
      detail::orthonormalise_block(basis, filled, block, rng);
      block_in = basis.middleCols(filled, block);
      apply(block_in, block_out);
      result.n_products += block;
      basis_product.middleCols(filled, block) = block_out;
      next_block = block_out;
      filled += block;
    }
    // Rayleigh-Ritz on the basis.
    // Column-major n x filled basis == row-major filled x n array (rows ld floats apart): Q^T (A Q_new) and Q y below
    // go through the same dense kernel as the operator.
    Eigen::MatrixXf new_products = basis_product.middleCols(known, filled - known), fresh_f;
    detail::rowmajor_times(basis.data(), filled, n, new_products, fresh_f, ld);
    const Eigen::MatrixXd fresh = fresh_f.cast<double>();
    projected.block(0, known, filled, filled - known) = fresh;
    projected.block(known, 0, filled - known, filled) = fresh.transpose();
    // Diagonalised in float when the tolerance allows it (faster); float round-off limits the
    // attainable residual to ~1e-4 with clustered eigenvalues, so tight tolerances use double.
    Eigen::MatrixXd h = projected.topLeftCorner(filled, filled);
    h = 0.5 * (h + h.transpose()).eval();
    const Index kept = std::min<Index>(keep, filled);
    Eigen::VectorXd ritz_values;
    Eigen::MatrixXf small;
    if (options.tolerance >= 1e-3) {
      Eigen::SelfAdjointEigenSolver<Eigen::MatrixXf> solver(h.cast<float>());
      ritz_values = solver.eigenvalues().reverse().head(kept).cast<double>();
      small = solver.eigenvectors().rowwise().reverse().leftCols(kept);
    } else {
      Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(h);
      ritz_values = solver.eigenvalues().reverse().head(kept);
      small = solver.eigenvectors().rowwise().reverse().leftCols(kept).cast<float>();
    }
    // The wanted block first: enough to test convergence; the rest only when restarting.
    Eigen::MatrixXf ritz(n, kept), ritz_product(n, kept), part;
    const Eigen::MatrixXf wanted_small = small.leftCols(block);
    detail::rowmajor_transpose_times(basis.data(), filled, n, wanted_small, part, ld);
    ritz.leftCols(block) = part;
    detail::rowmajor_transpose_times(basis_product.data(), filled, n, wanted_small, part, ld);
    ritz_product.leftCols(block) = part;

    double scale = std::max(std::abs(ritz_values(0)), std::abs(ritz_values(kept - 1)));
    scale = std::max(scale, 1e-30);
    Eigen::MatrixXf residual(n, block);
    double max_residual = 0.0;
    for (Index i = 0; i < block; ++i) {
      residual.col(i) = ritz_product.col(i) - static_cast<float>(ritz_values(i)) * ritz.col(i);
      if (i < k) max_residual = std::max(max_residual, static_cast<double>(residual.col(i).norm()) / scale);
    }
    result.max_residual = max_residual;
    result.values = ritz_values.head(k);
    result.vectors = ritz.leftCols(k);
    if (max_residual <= options.tolerance) {
      result.converged = true;
      break;
    }
    if (cycle + 1 == options.max_cycles) break;
    // Thick restart: the kept Ritz vectors and their products (A Q y, no new product).
    if (kept > block) {
      const Eigen::MatrixXf rest_small = small.rightCols(kept - block);
      detail::rowmajor_transpose_times(basis.data(), filled, n, rest_small, part, ld);
      ritz.rightCols(kept - block) = part;
      detail::rowmajor_transpose_times(basis_product.data(), filled, n, rest_small, part, ld);
      ritz_product.rightCols(kept - block) = part;
    }
    basis.leftCols(kept) = ritz;
    basis_product.leftCols(kept) = ritz_product;
    projected.topLeftCorner(kept, kept) = ritz_values.asDiagonal();
    filled = kept;
    known = kept;
    next_block = residual;
  }
  return result;
}

}  // namespace clustermac
