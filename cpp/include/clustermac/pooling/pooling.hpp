// Pooling of a float CNN feature map into vectors: per-region MAC (the paper's Eq. 4), MAC over
// rectangles (R-MAC's regional vectors), and the global baselines SPoC, GeM and CroW.
//
// A feature map is D×H×W float32, row-major (the backbone's layout without the batch axis):
// channel d, row y, column x lives at data[(d·H + y)·W + x]. All functions return raw pooled
// vectors; l2-normalisation and whitening are separate steps (aggregate.hpp, whitening.hpp).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "clustermac/common.hpp"
#include "clustermac/pooling/regions.hpp"
#include "clustermac/simd.hpp"

namespace clustermac {

// A non-owning view of a D×H×W feature map.
struct FeatureMapView {
  const float* data;
  std::ptrdiff_t channels, height, width;
  std::ptrdiff_t locations() const { return height * width; }
  const float* channel(std::ptrdiff_t d) const { return data + d * height * width; }
};

// True when no value is NaN or ±Inf: an all-ones exponent field. Written as an integer
// OR-reduction, which compilers vectorise (an isfinite loop with an early exit is scalar and
// cost as much as the pooling itself on a VGG16 map).
inline bool all_finite_values(const float* data, std::ptrdiff_t n) {
  std::uint32_t non_finite = 0;
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    std::uint32_t bits;
    std::memcpy(&bits, data + i, sizeof bits);
    non_finite |= static_cast<std::uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
  }
  return non_finite == 0;
}

inline void require_feature_map(const FeatureMapView& map, const std::string& name) {
  require(map.channels >= 1 && map.height >= 1 && map.width >= 1,
          name + ": expected a non-empty D×H×W feature map, got shape (" + std::to_string(map.channels) + ", " +
              std::to_string(map.height) + ", " + std::to_string(map.width) + ")");
  if (!all_finite_values(map.data, map.channels * map.locations()))
    fail(name + " contains NaN or Inf values; expected only finite numbers");
}

// A pooled vector whose sums overflowed float32 (a finite map with huge values) is an error, not a
// silent inf: the caller's l2-normalisation would turn it into NaN.
inline void require_pooled_finite(const VectorF& pooled, const char* function) {
  for (Eigen::Index d = 0; d < pooled.size(); ++d)
    if (!std::isfinite(pooled[d]))
      fail(std::string(function) + ": channel " + std::to_string(d) +
           " overflows float32 (its weighted sum is beyond 3.4e38); the feature map's values are too large, "
           "scale them down");
}

namespace detail {

// One channel of region_mac: best[s] = max over locations with slot s of that channel, scanning the
// locations in order; a value replaces the best only when it is strictly greater, so among equal
// values (+0 and -0) the first one stays. The AVX2 version below follows the same rule lane by lane,
// so every path gives the same bits.
inline void region_max_scalar(const FeatureMapView& map, const std::int32_t* slot, std::ptrdiff_t channel,
                              std::ptrdiff_t slots, float* best) {
  std::fill(best, best + slots, -std::numeric_limits<float>::infinity());
  const float* plane = map.channel(channel);
  // A branch, not a branchless max: a new maximum is rare, so the branch predicts well, whereas an
  // unconditional store makes every iteration wait for the previous one's store when
  // neighbouring locations share a label (the usual case for clusters).
  for (std::ptrdiff_t i = 0; i < map.locations(); ++i) {
    const std::int32_t s = slot[i];
    if (plane[i] > best[s]) best[s] = plane[i];
  }
}

#ifdef CLUSTERMAC_SIMD_X86
// 8 channels at a time: 8 locations of the 8 channel planes are loaded (contiguous) and transposed
// in registers, so that each register holds one location's 8 channels; each location then updates
// its slot's running maxima, kept in a register while consecutive locations share a slot.
// best is slots x 8.
CLUSTERMAC_TARGET_AVX2 inline void region_max_avx2(const FeatureMapView& map, const std::int32_t* slot,
                                                   std::ptrdiff_t first, std::ptrdiff_t slots, float* best) {
  const std::ptrdiff_t n = map.locations();
  for (std::ptrdiff_t s = 0; s < slots; ++s) _mm256_storeu_ps(best + 8 * s, _mm256_set1_ps(-INFINITY));
  const float* plane[8];
  for (int c = 0; c < 8; ++c) plane[c] = map.channel(first + c);
  std::int32_t current = slot[0];
  __m256 running = _mm256_loadu_ps(best + 8 * current);
  __m256 tile[8];
  for (std::ptrdiff_t i = 0; i < n; i += 8) {
    const std::ptrdiff_t count = std::min<std::ptrdiff_t>(8, n - i);
    if (count == 8) {
      for (int c = 0; c < 8; ++c) tile[c] = _mm256_loadu_ps(plane[c] + i);
      transpose8x8(tile);
    } else {
      for (std::ptrdiff_t j = 0; j < count; ++j)
        tile[j] = _mm256_setr_ps(plane[0][i + j], plane[1][i + j], plane[2][i + j], plane[3][i + j], plane[4][i + j],
                                 plane[5][i + j], plane[6][i + j], plane[7][i + j]);
    }
    for (std::ptrdiff_t j = 0; j < count; ++j) {
      if (slot[i + j] != current) {
        _mm256_storeu_ps(best + 8 * current, running);
        current = slot[i + j];
        running = _mm256_loadu_ps(best + 8 * current);
      }
      running = _mm256_blendv_ps(running, tile[j], _mm256_cmp_ps(tile[j], running, _CMP_GT_OQ));
    }
  }
  _mm256_storeu_ps(best + 8 * current, running);
}
#endif

}  // namespace detail

// Per-region MAC (Eq. 4): out[k, d] = max over locations with label k of X[d, location].
// K = max(labels) + 1; locations with a negative label are ignored (masked out). A label
// that names no location (an empty region) gives a zero row: after ReLU zero is the smallest
// activation, and aggregate_regions() skips zero rows instead of whitening them into noise.
// Channels go 8 at a time on AVX2 (and AVX-512) CPUs, the rest one by one; every path gives the same bits.
inline MatrixRM region_mac(const FeatureMapView& map, const std::int32_t* labels) {
  require_feature_map(map, "feature_map");
  const std::ptrdiff_t n = map.locations();
  const std::ptrdiff_t k = count_regions(labels, n);
  require_region_output(k, map.channels, "region_mac", "labels.max() + 1; use compact labels 0..K-1");
  MatrixRM out = MatrixRM::Zero(k, map.channels);
  if (k == 0) return out;
  // Masked-out locations go to an extra slot k that is dropped.
  std::vector<std::int32_t> slot(n);
  std::vector<char> seen(k + 1, 0);
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    slot[i] = labels[i] >= 0 ? labels[i] : static_cast<std::int32_t>(k);
    seen[slot[i]] = 1;
  }
  const std::ptrdiff_t slots = k + 1;
  std::vector<float> best(static_cast<std::size_t>(slots * 8));  // slots x 8 channels, or slots x 1
  auto write = [&](std::ptrdiff_t first, std::ptrdiff_t count) {
    for (std::ptrdiff_t r = 0; r < k; ++r)
      if (seen[r])
        for (std::ptrdiff_t c = 0; c < count; ++c) out(r, first + c) = best[r * count + c];
  };
  std::ptrdiff_t d = 0;
#ifdef CLUSTERMAC_SIMD_X86
  if (simd_at_least(kSimdAvx2))
    for (; d + 8 <= map.channels; d += 8) {
      detail::region_max_avx2(map, slot.data(), d, slots, best.data());
      write(d, 8);
    }
#endif
  for (; d < map.channels; ++d) {
    detail::region_max_scalar(map, slot.data(), d, slots, best.data());
    write(d, 1);
  }
  return out;
}

namespace detail {

// out(r, d) = max over region r of channel d, for the channels from `first` on. Element-wise
// maxima down the rows (vectorises; a running scalar max would not), then one short reduction
// across the columns; both keep the earlier value unless the new one is strictly greater
// (std::max), so among equal values (+0 and -0) the first stays, as in grid_max_avx2.
struct GridMacKernel {
  static constexpr SimdLevel widest = kSimdAvx512;
  template <SimdLevel>
  static CLUSTERMAC_ALWAYS_INLINE void run(const FeatureMapView& map, const std::int32_t* regions,
                                           std::ptrdiff_t n_regions, std::ptrdiff_t first, MatrixRM& out) {
    std::vector<float> column_max(map.width);
    for (std::ptrdiff_t d = first; d < map.channels; ++d) {
      const float* plane = map.channel(d);
      for (std::ptrdiff_t r = 0; r < n_regions; ++r) {
        const std::int32_t* box = regions + 4 * r;
        float* cm = column_max.data();
        const std::ptrdiff_t span = box[2] - box[0];
        const float* first_row = plane + static_cast<std::ptrdiff_t>(box[1]) * map.width + box[0];
        for (std::ptrdiff_t x = 0; x < span; ++x) cm[x] = first_row[x];
        for (std::int32_t y = box[1] + 1; y < box[3]; ++y) {
          const float* row = plane + static_cast<std::ptrdiff_t>(y) * map.width + box[0];
          for (std::ptrdiff_t x = 0; x < span; ++x) cm[x] = std::max(cm[x], row[x]);
        }
        float best = cm[0];
        for (std::ptrdiff_t x = 1; x < span; ++x) best = std::max(best, cm[x]);
        out(r, d) = best;
      }
    }
  }
};

#ifdef CLUSTERMAC_SIMD_X86
// GridMacKernel for 8 channels at a time (channels first .. first + 7): their planes are transposed
// once, 8 locations at a time in registers, into `cells` (N x 8, each location's 8 channels
// together, 8·N floats: L1-sized for the usual maps); each box is then one register per location.
// Lane by lane it keeps GridMacKernel's order and rule: down each column first, then across the
// columns, a value replacing the maximum only when strictly greater (_mm256_max_ps(new, old)
// returns old on equality), so both give the same bits.
CLUSTERMAC_TARGET_AVX2 inline void grid_max_avx2(const FeatureMapView& map, const std::int32_t* regions,
                                                 std::ptrdiff_t n_regions, std::ptrdiff_t first, float* cells,
                                                 MatrixRM& out) {
  const std::ptrdiff_t n = map.locations(), width = map.width;
  const float* plane[8];
  for (int c = 0; c < 8; ++c) plane[c] = map.channel(first + c);
  std::ptrdiff_t i = 0;
  __m256 tile[8];
  for (; i + 8 <= n; i += 8) {
    for (int c = 0; c < 8; ++c) tile[c] = _mm256_loadu_ps(plane[c] + i);
    transpose8x8(tile);
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(cells + 8 * (i + j), tile[j]);
  }
  for (; i < n; ++i)
    for (int c = 0; c < 8; ++c) cells[8 * i + c] = plane[c][i];
  for (std::ptrdiff_t r = 0; r < n_regions; ++r) {
    const std::int32_t* box = regions + 4 * r;
    __m256 best = _mm256_setzero_ps();
    for (std::ptrdiff_t x = box[0]; x < box[2]; ++x) {
      const float* cell = cells + 8 * (static_cast<std::ptrdiff_t>(box[1]) * width + x);
      __m256 column = _mm256_loadu_ps(cell);
      for (std::int32_t y = box[1] + 1; y < box[3]; ++y) {
        cell += 8 * width;
        column = _mm256_max_ps(_mm256_loadu_ps(cell), column);
      }
      best = x == box[0] ? column : _mm256_max_ps(column, best);
    }
    _mm256_storeu_ps(&out(r, first), best);
  }
}
#endif

}  // namespace detail

// MAC over each rectangular region [x0, y0, x1, y1) (R-MAC's regional vectors). Channels go 8 at a
// time on AVX2 (and AVX-512) CPUs, the rest one by one; every path gives the same bits.
inline MatrixRM grid_mac(const FeatureMapView& map, const std::int32_t* regions, std::ptrdiff_t n_regions) {
  require_feature_map(map, "feature_map");
  for (std::ptrdiff_t r = 0; r < n_regions; ++r) {
    const std::int32_t* box = regions + 4 * r;
    if (!(box[0] >= 0 && box[1] >= 0 && box[0] < box[2] && box[1] < box[3] && box[2] <= map.width &&
          box[3] <= map.height))
      fail("regions: row " + std::to_string(r) + " = [" + std::to_string(box[0]) + ", " + std::to_string(box[1]) +
           ", " + std::to_string(box[2]) + ", " + std::to_string(box[3]) +
           ") is empty or outside the feature map; expected 0 <= x0 < x1 <= " + std::to_string(map.width) +
           " and 0 <= y0 < y1 <= " + std::to_string(map.height));
  }
  require_region_output(n_regions, map.channels, "grid_mac", "one per region");
  MatrixRM out(n_regions, map.channels);
  std::ptrdiff_t first = 0;
#ifdef CLUSTERMAC_SIMD_X86
  if (simd_at_least(kSimdAvx2) && map.channels >= 8) {
    std::vector<float> cells(static_cast<std::size_t>(8 * map.locations()));
    for (; first + 8 <= map.channels; first += 8)
      detail::grid_max_avx2(map, regions, n_regions, first, cells.data(), out);
  }
#endif
  if (first < map.channels) dispatch<detail::GridMacKernel>(map, regions, n_regions, first, out);
  return out;
}

// SPoC (Babenko & Lempitsky, ICCV 2015): sum pooling weighted by a Gaussian centre prior.
// Location (x, y) has its centre at (x + 0.5, y + 0.5); the map centre is (W/2, H/2);
// sigma is one third of the distance from the centre to the closest border, min(H, W)/6.
inline VectorF spoc_pool(const FeatureMapView& map) {
  require_feature_map(map, "feature_map");
  const double sigma = std::min(map.height, map.width) / 6.0;
  std::vector<double> weight(map.locations());
  for (std::ptrdiff_t y = 0; y < map.height; ++y)
    for (std::ptrdiff_t x = 0; x < map.width; ++x) {
      const double dy = y + 0.5 - map.height / 2.0, dx = x + 0.5 - map.width / 2.0;
      weight[y * map.width + x] = std::exp(-(dx * dx + dy * dy) / (2.0 * sigma * sigma));
    }
  VectorF out(map.channels);
  for (std::ptrdiff_t d = 0; d < map.channels; ++d) {
    const float* plane = map.channel(d);
    double sum = 0.0;
    for (std::ptrdiff_t i = 0; i < map.locations(); ++i) sum += weight[i] * plane[i];
    out[d] = static_cast<float>(sum);
  }
  require_pooled_finite(out, "spoc_pool");
  return out;
}

// GeM (Radenović et al., TPAMI 2018): (mean_i max(x_i, eps)^p)^(1/p) per channel, eps = 1e-6
// as in their code. Computed as m·(mean (x/m)^p)^(1/p) with m the channel maximum, so that a
// large p cannot overflow.
inline VectorF gem_pool(const FeatureMapView& map, double p) {
  require_feature_map(map, "feature_map");
  require(std::isfinite(p) && p > 0.0, "gem_pool: p must be a finite number > 0, got " + std::to_string(p));
  const double eps = 1e-6;
  VectorF out(map.channels);
  for (std::ptrdiff_t d = 0; d < map.channels; ++d) {
    const float* plane = map.channel(d);
    double m = eps;
    for (std::ptrdiff_t i = 0; i < map.locations(); ++i) m = std::max(m, static_cast<double>(plane[i]));
    double sum = 0.0;
    for (std::ptrdiff_t i = 0; i < map.locations(); ++i)
      sum += std::pow(std::max(static_cast<double>(plane[i]), eps) / m, p);
    out[d] = static_cast<float>(m * std::pow(sum / map.locations(), 1.0 / p));
  }
  return out;
}

// CroW (Kalantidis, Mellina & Osindero, ECCV Workshops 2016), with their parameters a = 2,
// b = 2: spatial weights alpha = (S / ||S||_a)^(1/b), S the channel-summed map (negative sums
// clipped to 0); channel weights beta_k = log(sum_j Q_j / (eps + Q_k)), Q_k the proportion of
// non-zero locations of channel k, eps = 1e-6 (channels with Q_k = 0 pool to 0 anyway).
// out_k = beta_k · sum_i alpha_i X_k,i. An all-zero map gives a zero vector.
inline VectorF crow_pool(const FeatureMapView& map) {
  require_feature_map(map, "feature_map");
  const std::ptrdiff_t n = map.locations();
  std::vector<double> spatial(n, 0.0);
  for (std::ptrdiff_t d = 0; d < map.channels; ++d) {
    const float* plane = map.channel(d);
    for (std::ptrdiff_t i = 0; i < n; ++i) spatial[i] += plane[i];
  }
  double norm = 0.0;
  for (auto& s : spatial) {
    s = std::max(s, 0.0);
    norm += s * s;
  }
  norm = std::sqrt(norm);
  for (auto& s : spatial) s = norm > 0.0 ? std::sqrt(s / norm) : 0.0;
  std::vector<double> nonzero(map.channels);
  double nonzero_sum = 0.0;
  for (std::ptrdiff_t d = 0; d < map.channels; ++d) {
    const float* plane = map.channel(d);
    std::ptrdiff_t count = 0;
    for (std::ptrdiff_t i = 0; i < n; ++i) count += plane[i] != 0.0f;
    nonzero[d] = static_cast<double>(count) / n;
    nonzero_sum += nonzero[d];
  }
  VectorF out(map.channels);
  for (std::ptrdiff_t d = 0; d < map.channels; ++d) {
    const float* plane = map.channel(d);
    double sum = 0.0;
    for (std::ptrdiff_t i = 0; i < n; ++i) sum += spatial[i] * plane[i];
    const double channel_weight = nonzero_sum > 0.0 ? std::log(nonzero_sum / (1e-6 + nonzero[d])) : 0.0;
    out[d] = static_cast<float>(channel_weight * sum);
  }
  require_pooled_finite(out, "crow_pool");
  return out;
}

}  // namespace clustermac
