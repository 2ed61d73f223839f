// The R-MAC / ClusterMAC aggregation of regional vectors into one descriptor.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "clustermac/common.hpp"
#include "clustermac/pooling/whitening.hpp"

namespace clustermac {

// The R-MAC / ClusterMAC aggregation (the paper's Sec. 4.2) of G groups of regional vectors at
// once: the rows of `region_vectors` are the groups' rows one group after the other
// (group_sizes[g] rows for group g). Per group: each regional vector l2 → PCA-whiten (when a
// projection is given) → l2; sum → l2. Zero rows (empty regions) are skipped rather than
// whitened into −mean·Pᵀ noise; a group whose rows are all zero gives a zero row. The rows of
// every group are whitened by one matrix product: re-ranking aggregates the regions of many
// boxes, and one product reads the projection once for all of them.
inline MatrixRM aggregate_region_groups(const ConstMatrixRef& region_vectors, const std::int64_t* group_sizes,
                                        std::ptrdiff_t groups, const float* mean, const ConstMatrixRef* projection) {
  const std::ptrdiff_t dim = region_vectors.cols();
  require(dim >= 1, "region_vectors: expected D >= 1 columns, got " +
                        describe_array("float32", {region_vectors.rows(), region_vectors.cols()}));
  require_finite(region_vectors, "region_vectors");
  std::int64_t total = 0;
  for (std::ptrdiff_t g = 0; g < groups; ++g) {
    require(group_sizes[g] >= 0, "group_sizes: expected counts >= 0, got " + std::to_string(group_sizes[g]) +
                                     " for group " + std::to_string(g));
    total += group_sizes[g];
  }
  require(total == region_vectors.rows(), "group_sizes: expected counts adding up to the " +
                                              std::to_string(region_vectors.rows()) +
                                              " rows of region_vectors, they add up to " + std::to_string(total));
  const std::ptrdiff_t out_dim = projection ? projection->rows() : dim;
  MatrixRM kept(region_vectors.rows(), dim);
  std::vector<std::ptrdiff_t> kept_group(region_vectors.rows());  // the group of each kept row
  std::ptrdiff_t count = 0, row = 0;
  for (std::ptrdiff_t g = 0; g < groups; ++g)
    for (std::int64_t r = 0; r < group_sizes[g]; ++r, ++row) {
      kept.row(count) = region_vectors.row(row);
      kept_group[count] = g;
      if (l2_normalize_in_place(kept.row(count).data(), dim)) ++count;  // zero row: empty region, skipped
    }
  MatrixRM rows;
  if (projection) {
    rows = whiten(kept.topRows(count), mean, *projection);
    for (std::ptrdiff_t r = 0; r < count; ++r) l2_normalize_in_place(rows.row(r).data(), out_dim);
  } else {
    rows = kept.topRows(count);
  }
  MatrixRM out(groups, out_dim);
  std::ptrdiff_t r = 0;
  for (std::ptrdiff_t g = 0; g < groups; ++g) {
    VectorD sum = VectorD::Zero(out_dim);
    for (; r < count && kept_group[r] == g; ++r) sum += rows.row(r).transpose().cast<double>();
    const double norm = sum.norm();
    if (norm > 0.0) sum /= norm;
    out.row(g) = sum.cast<float>().transpose();
  }
  return out;
}

// The aggregation of one group of K regional vectors into one descriptor.
inline VectorF aggregate_regions(const ConstMatrixRef& region_vectors, const float* mean,
                                 const ConstMatrixRef* projection) {
  const std::int64_t rows = region_vectors.rows();
  return aggregate_region_groups(region_vectors, &rows, 1, mean, projection).row(0).transpose();
}

}  // namespace clustermac
