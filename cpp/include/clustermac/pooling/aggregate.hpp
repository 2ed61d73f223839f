// The R-MAC / ClusterMAC aggregation of regional vectors into one descriptor.
#pragma once

#include "clustermac/common.hpp"
#include "clustermac/pooling/whitening.hpp"

namespace clustermac {

// The R-MAC / ClusterMAC aggregation (the paper's Sec. 4.2): each regional vector l2 →
// PCA-whiten (when a projection is given) → l2; sum → l2. Zero rows (empty regions) are
// skipped rather than whitened into −mean·Pᵀ noise. All rows zero → a zero vector.
inline VectorF aggregate_regions(const ConstMatrixRef& region_vectors, const float* mean,
                                 const ConstMatrixRef* projection) {
  const std::ptrdiff_t dim = region_vectors.cols();
  require(dim >= 1, "region_vectors: expected D >= 1 columns, got " +
                        describe_array("float32", {region_vectors.rows(), region_vectors.cols()}));
  require_finite(region_vectors, "region_vectors");
  const std::ptrdiff_t out_dim = projection ? projection->rows() : dim;
  MatrixRM kept(region_vectors.rows(), dim);
  std::ptrdiff_t count = 0;
  for (std::ptrdiff_t r = 0; r < region_vectors.rows(); ++r) {
    kept.row(count) = region_vectors.row(r);
    if (l2_normalize_in_place(kept.row(count).data(), dim)) ++count;  // zero row: empty region, skipped
  }
  MatrixRM rows;
  if (projection) {
    // All regions whitened by one matrix product (the projection is read once, not per region).
    rows = whiten(kept.topRows(count), mean, *projection);
    for (std::ptrdiff_t r = 0; r < count; ++r) l2_normalize_in_place(rows.row(r).data(), out_dim);
  } else {
    rows = kept.topRows(count);
  }
  VectorD sum = VectorD::Zero(out_dim);
  for (std::ptrdiff_t r = 0; r < count; ++r) sum += rows.row(r).transpose().cast<double>();
  const double norm = sum.norm();
  if (norm > 0.0) sum /= norm;
  return sum.cast<float>();
}

}  // namespace clustermac
