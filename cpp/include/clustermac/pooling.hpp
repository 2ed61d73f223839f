// Pooling of a CNN feature map into vectors: per-region MAC (the paper's Eq. 4), the R-MAC
// grid of Tolias et al. (ICLR 2016), and the global baselines SPoC, GeM and CroW.
//
// A feature map is D×H×W float32, row-major (the backbone's layout without the batch axis):
// channel d, row y, column x lives at data[(d·H + y)·W + x]. All functions return raw pooled
// vectors; l2-normalisation and whitening are separate steps (whitening.hpp).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "clustermac/common.hpp"
#include "clustermac/whitening.hpp"

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

// Upper bound on the number of regions a label map may name; guards against allocating a
// huge K×D output for a stray label value.
constexpr std::int32_t kMaxRegionLabel = 1 << 20;

// K = the largest of n region labels + 1 (negative labels are masked out; 0 if all are).
inline std::ptrdiff_t count_regions(const std::int32_t* labels, std::ptrdiff_t n) {
  std::int32_t max_label = -1;
  for (std::ptrdiff_t i = 0; i < n; ++i) max_label = std::max(max_label, labels[i]);
  require(max_label < kMaxRegionLabel, "labels: the largest label is " + std::to_string(max_label) +
                                           "; expected region labels 0..K-1 with K <= " +
                                           std::to_string(kMaxRegionLabel));
  return static_cast<std::ptrdiff_t>(max_label) + 1;
}

// Per-region MAC (Eq. 4): out[k, d] = max over locations with label k of X[d, location].
// K = max(labels) + 1; locations with a negative label are ignored (masked out). A label
// that names no location (an empty region) gives a zero row: after ReLU zero is the smallest
// activation, and aggregate_regions() skips zero rows instead of whitening them into noise.
inline MatrixRM region_mac(const FeatureMapView& map, const std::int32_t* labels) {
  const std::ptrdiff_t n = map.locations();
  const std::ptrdiff_t k = count_regions(labels, n);
  MatrixRM out = MatrixRM::Zero(k, map.channels);
  if (k == 0) return out;
  // Masked-out locations go to an extra slot k that is dropped. The update is a branch, not a
  // branchless max: a new maximum is rare, so the branch predicts well, whereas an
  // unconditional store makes every iteration wait for the previous one's store when
  // neighbouring locations share a label (the usual case for clusters).
  std::vector<std::int32_t> slot(n);
  std::vector<char> seen(k + 1, 0);
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    slot[i] = labels[i] >= 0 ? labels[i] : static_cast<std::int32_t>(k);
    seen[slot[i]] = 1;
  }
  const float lowest = -std::numeric_limits<float>::infinity();
  std::vector<float> best(k + 1);
  // Channel-outer loop: each channel plane is read contiguously once.
  for (std::ptrdiff_t d = 0; d < map.channels; ++d) {
    std::fill(best.begin(), best.end(), lowest);
    const float* plane = map.channel(d);
    for (std::ptrdiff_t i = 0; i < n; ++i) {
      const std::int32_t s = slot[i];
      if (plane[i] > best[s]) best[s] = plane[i];
    }
    for (std::ptrdiff_t r = 0; r < k; ++r) out(r, d) = seen[r] ? best[r] : 0.0f;
  }
  return out;
}

// Bounding box [x0, y0, x1, y1) (half-open, cells) of each region of an H×W label map, for
// ClusterMAC's "box" pooling (our variant, not the paper's: each cluster's MAC is taken over the
// rectangle that encloses it rather than over its own cells). K = max(labels) + 1; negative
// labels are ignored; a label that names no location gets the empty box [0, 0, 0, 0].
inline std::vector<std::array<std::int32_t, 4>> region_boxes(const std::int32_t* labels, std::ptrdiff_t height,
                                                             std::ptrdiff_t width) {
  const std::ptrdiff_t k = count_regions(labels, height * width);
  const std::int32_t none = std::numeric_limits<std::int32_t>::max();
  std::vector<std::array<std::int32_t, 4>> boxes(k, {none, none, -1, -1});
  for (std::ptrdiff_t y = 0; y < height; ++y)
    for (std::ptrdiff_t x = 0; x < width; ++x) {
      const std::int32_t label = labels[y * width + x];
      if (label < 0) continue;
      auto& b = boxes[label];
      b = {std::min(b[0], static_cast<std::int32_t>(x)), std::min(b[1], static_cast<std::int32_t>(y)),
           std::max(b[2], static_cast<std::int32_t>(x + 1)), std::max(b[3], static_cast<std::int32_t>(y + 1))};
    }
  for (auto& b : boxes)
    if (b[2] < 0) b = {0, 0, 0, 0};
  return boxes;
}

// The R-MAC grid of Tolias, Sicre & Jégou, "Particular object retrieval with integral
// max-pooling of CNN activations", ICLR 2016, Sec. 3 (their rmac_regions.m): at level
// l = 1..levels, square regions of side wl = floor(2·min(H,W)/(l+1)); along the long side the
// number of regions at level 1 is the m in {2..7} whose overlap 1 - (max-min)/((m-1)·min)
// is closest to 40 %, and level l has (l - 1 + m) of them; the short side has l. Regions
// are spread uniformly with integer offsets floor(wl2 + i·b) - wl2, wl2 = floor(wl/2 - 1).
// Rows are [x0, y0, x1, y1), half-open, in feature-map cells. No extra global region.
inline std::vector<std::array<std::int32_t, 4>> rmac_regions(std::int64_t height, std::int64_t width, int levels) {
  require(height >= 1 && width >= 1, "rmac_regions: height and width must be >= 1, got height=" +
                                         std::to_string(height) + ", width=" + std::to_string(width));
  require(levels >= 1, "rmac_regions: levels must be >= 1, got " + std::to_string(levels));
  const double overlap = 0.4;
  const double short_side = static_cast<double>(std::min(height, width));
  const double long_side = static_cast<double>(std::max(height, width));
  int best_step = 0;  // index into steps {2..7}
  double best_error = std::numeric_limits<double>::infinity();
  for (int i = 0; i < 6; ++i) {
    const double b = (long_side - short_side) / static_cast<double>(i + 1);  // steps[i] - 1 = i + 1
    const double error = std::abs((short_side * short_side - short_side * b) / (short_side * short_side) - overlap);
    if (error < best_error) {  // strict: the first minimum wins, as MATLAB's min
      best_error = error;
      best_step = i;
    }
  }
  // Extra regions along the long side (Tolias' Wd / Hd: the 1-based index of the chosen step).
  const int extra_w = width > height ? best_step + 1 : 0;
  const int extra_h = height > width ? best_step + 1 : 0;
  std::vector<std::array<std::int32_t, 4>> regions;
  for (int l = 1; l <= levels; ++l) {
    const auto side = static_cast<std::int64_t>(std::floor(2.0 * short_side / (l + 1)));
    if (side == 0) continue;  // level finer than the map: no region
    const double half = std::floor(side / 2.0 - 1.0);
    auto offsets = [&](std::int64_t extent, int extra) {
      const int count = l + extra;
      const double b = count > 1 ? static_cast<double>(extent - side) / (count - 1) : 0.0;
      std::vector<std::int64_t> out;
      for (int i = 0; i < count; ++i) out.push_back(static_cast<std::int64_t>(std::floor(half + i * b) - half));
      return out;
    };
    for (std::int64_t y0 : offsets(height, extra_h))
      for (std::int64_t x0 : offsets(width, extra_w))
        regions.push_back({static_cast<std::int32_t>(x0), static_cast<std::int32_t>(y0),
                           static_cast<std::int32_t>(x0 + side), static_cast<std::int32_t>(y0 + side)});
  }
  return regions;
}

namespace pooling_detail {

// out(r, d) = max over region r of channel d, for channels [first, last). Element-wise maxima
// down the rows (vectorises; a running scalar max would not), then one short reduction
// across the columns.
inline __attribute__((always_inline)) void grid_mac_channels(const FeatureMapView& map, const std::int32_t* regions,
                                                            std::ptrdiff_t n_regions, MatrixRM& out) {
  std::vector<float> column_max(map.width);
  for (std::ptrdiff_t d = 0; d < map.channels; ++d) {
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

// The same loop compiled for wider vector units, chosen at run time (the portable build
// targets the baseline ISA only): R-MAC rows are 16–48 cells, a few vectors at most.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
__attribute__((target("avx512f"))) inline void grid_mac_avx512(const FeatureMapView& map, const std::int32_t* regions,
                                                                std::ptrdiff_t n, MatrixRM& out) {
  grid_mac_channels(map, regions, n, out);
}
__attribute__((target("avx2"))) inline void grid_mac_avx2(const FeatureMapView& map, const std::int32_t* regions,
                                                           std::ptrdiff_t n, MatrixRM& out) {
  grid_mac_channels(map, regions, n, out);
}
#endif

inline void grid_mac_dispatch(const FeatureMapView& map, const std::int32_t* regions, std::ptrdiff_t n, MatrixRM& out) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (simd_level() >= kSimdAvx512) return grid_mac_avx512(map, regions, n, out);
  if (simd_level() >= kSimdAvx2) return grid_mac_avx2(map, regions, n, out);
#endif
  grid_mac_channels(map, regions, n, out);
}

}  // namespace pooling_detail

// MAC over each rectangular region [x0, y0, x1, y1) (R-MAC's regional vectors).
inline MatrixRM grid_mac(const FeatureMapView& map, const std::int32_t* regions, std::ptrdiff_t n_regions) {
  for (std::ptrdiff_t r = 0; r < n_regions; ++r) {
    const std::int32_t* box = regions + 4 * r;
    if (!(box[0] >= 0 && box[1] >= 0 && box[0] < box[2] && box[1] < box[3] && box[2] <= map.width &&
          box[3] <= map.height))
      fail("regions: row " + std::to_string(r) + " = [" + std::to_string(box[0]) + ", " + std::to_string(box[1]) +
           ", " + std::to_string(box[2]) + ", " + std::to_string(box[3]) +
           ") is empty or outside the feature map; expected 0 <= x0 < x1 <= " + std::to_string(map.width) +
           " and 0 <= y0 < y1 <= " + std::to_string(map.height));
  }
  MatrixRM out(n_regions, map.channels);
  pooling_detail::grid_mac_dispatch(map, regions, n_regions, out);
  return out;
}

// SPoC (Babenko & Lempitsky, ICCV 2015): sum pooling weighted by a Gaussian centre prior.
// Location (x, y) has its centre at (x + 0.5, y + 0.5); the map centre is (W/2, H/2);
// sigma is one third of the distance from the centre to the closest border, min(H, W)/6.
inline VectorF spoc_pool(const FeatureMapView& map) {
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
  return out;
}

// GeM (Radenović et al., TPAMI 2018): (mean_i max(x_i, eps)^p)^(1/p) per channel, eps = 1e-6
// as in their code. Computed as m·(mean (x/m)^p)^(1/p) with m the channel maximum, so that a
// large p cannot overflow.
inline VectorF gem_pool(const FeatureMapView& map, double p) {
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
  return out;
}

// The R-MAC / ClusterMAC aggregation (the paper's Sec. 4.2): each regional vector l2 →
// PCA-whiten (when a projection is given) → l2; sum → l2. Zero rows (empty regions) are
// skipped rather than whitened into −mean·Pᵀ noise. All rows zero → a zero vector.
inline VectorF aggregate_regions(const ConstMatrixRef& region_vectors, const float* mean, const ConstMatrixRef* projection) {
  const std::ptrdiff_t dim = region_vectors.cols();
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

// --- R-MAC regional maxima straight from 8-bit codes (AML re-ranking) --------------------------
// Re-ranking (Tolias et al. ICLR 2016, Sec. 5) computes R-MAC inside the AML box of each of the
// top 1000 database maps, which are stored as channel-last 8-bit codes with value = code·scale,
// scale >= 0. Rounding the product by a non-negative float is monotone, so the regional max of
// Eq. 4, max_i(code_i·scale), equals (max_i code_i)·scale exactly: the max runs on the bytes (no
// dequantised crop is written) and only the K×D result is converted to float. The result is
// bit-identical to grid_mac() on dequantize_codes()' crop.

// A non-owning view of channel-last 8-bit codes: cell (y, x), channel d at data[(y·W + x)·D + d].
struct CodesView {
  const std::uint8_t* data;
  std::ptrdiff_t height, width, channels;
};

namespace pooling_detail {

// best[d] = max(best[d], cell[d]) for d < n. Its own function so that __restrict applies (the
// vectoriser otherwise adds an aliasing check), and written without std::max, whose
// reference-returning form GCC 12 leaves scalar at the baseline ISA.
inline __attribute__((always_inline)) void max_into(std::uint8_t* __restrict best, const std::uint8_t* __restrict cell,
                                                    std::ptrdiff_t n) {
  for (std::ptrdiff_t d = 0; d < n; ++d) {
    const std::uint8_t a = best[d], b = cell[d];
    best[d] = a > b ? a : b;
  }
}

// out(r, ·) = scale · max over the cells of region r (relative to `box`) of their D codes. The
// running max is a contiguous D-byte row updated with one byte-wise max per cell, the shape GCC
// vectorises (16/32/64 channels per instruction); codes >= 0, so 0 is a neutral start.
// Regions that share their columns [x0, x1) (R-MAC's grid: the regions of one grid column) share
// the work: each row's max over those columns is taken once, then each region takes the max of
// its rows' maxima (on a 60×48 box, 11.6k instead of 17.7k cell visits).
inline __attribute__((always_inline)) void grid_mac_codes_kernel(const CodesView& codes,
                                                                 const std::array<std::int32_t, 4>& box,
                                                                 const std::int32_t* regions, std::ptrdiff_t n_regions,
                                                                 float scale, float* out) {
  const std::ptrdiff_t channels = codes.channels;
  std::vector<std::uint8_t> running(channels);
  std::uint8_t* best = running.data();
  std::vector<std::uint8_t> row_maxima;  // (y - first_row)·D: the max of row y over the shared columns
  std::vector<char> done(n_regions, 0);
  for (std::ptrdiff_t r = 0; r < n_regions; ++r) {
    if (done[r]) continue;
    const std::int32_t* region = regions + 4 * r;
    const std::ptrdiff_t x0 = box[0] + region[0], x1 = box[0] + region[2];
    // The rows spanned by every region with these columns.
    std::ptrdiff_t first_row = region[1], end_row = region[3];
    for (std::ptrdiff_t s = r; s < n_regions; ++s)
      if (regions[4 * s] == region[0] && regions[4 * s + 2] == region[2]) {
        first_row = std::min<std::ptrdiff_t>(first_row, regions[4 * s + 1]);
        end_row = std::max<std::ptrdiff_t>(end_row, regions[4 * s + 3]);
      }
    row_maxima.assign((end_row - first_row) * channels, std::uint8_t{0});
    for (std::ptrdiff_t y = first_row; y < end_row; ++y) {
      // The cells of one region row are contiguous: (x1 - x0)·D bytes.
      std::uint8_t* row_best = row_maxima.data() + (y - first_row) * channels;
      const std::uint8_t* cell = codes.data + ((box[1] + y) * codes.width + x0) * channels;
      for (std::ptrdiff_t x = x0; x < x1; ++x, cell += channels) max_into(row_best, cell, channels);
    }
    for (std::ptrdiff_t s = r; s < n_regions; ++s) {
      const std::int32_t* other = regions + 4 * s;
      if (other[0] != region[0] || other[2] != region[2]) continue;
      std::fill(best, best + channels, std::uint8_t{0});
      for (std::ptrdiff_t y = other[1]; y < other[3]; ++y) max_into(best, row_maxima.data() + (y - first_row) * channels, channels);
      float* row = out + s * channels;
      for (std::ptrdiff_t d = 0; d < channels; ++d) row[d] = static_cast<float>(best[d]) * scale;
      done[s] = 1;
    }
  }
}

// AVX2 only: on the R-MAC grid of a whole 64×48×512 map, measured here (AMD EPYC, Zen 4) with a
// standalone loop, the baseline SSE2 build took 174 µs, AVX2 150 µs and AVX-512BW 191 µs (a
// 512-byte row is 8 zmm vectors, and Zen 4 splits them in two), so no AVX-512 variant.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
__attribute__((target("avx2"))) inline void grid_mac_codes_avx2(const CodesView& codes,
                                                                const std::array<std::int32_t, 4>& box,
                                                                const std::int32_t* regions, std::ptrdiff_t n,
                                                                float scale, float* out) {
  grid_mac_codes_kernel(codes, box, regions, n, scale, out);
}
#endif

inline void grid_mac_codes_dispatch(const CodesView& codes, const std::array<std::int32_t, 4>& box,
                                    const std::int32_t* regions, std::ptrdiff_t n, float scale, float* out) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (simd_level() >= kSimdAvx2) return grid_mac_codes_avx2(codes, box, regions, n, scale, out);
#endif
  grid_mac_codes_kernel(codes, box, regions, n, scale, out);
}

inline std::string corners_text(const std::int32_t* b) {
  return "[" + std::to_string(b[0]) + ", " + std::to_string(b[1]) + ", " + std::to_string(b[2]) + ", " +
         std::to_string(b[3]) + ")";
}

// The checks shared by the kernels on 8-bit codes: a non-empty map, a non-empty box inside it,
// a scale that keeps 255·scale a finite float.
inline void check_codes_box_scale(const CodesView& codes, const std::array<std::int32_t, 4>& box, float scale) {
  require(codes.height >= 1 && codes.width >= 1 && codes.channels >= 1,
          "codes: expected a non-empty H×W×D array, got shape (" + std::to_string(codes.height) + ", " +
              std::to_string(codes.width) + ", " + std::to_string(codes.channels) + ")");
  require(box[0] >= 0 && box[1] >= 0 && box[0] < box[2] && box[1] < box[3] && box[2] <= codes.width &&
              box[3] <= codes.height,
          "box: " + pooling_detail::corners_text(box.data()) + " is empty or outside the map; expected 0 <= x0 < x1 <= " +
              std::to_string(codes.width) + " and 0 <= y0 < y1 <= " + std::to_string(codes.height));
  require(std::isfinite(scale) && scale >= 0.0f && std::isfinite(255.0f * scale),
          "scale: expected a finite number >= 0 (with 255·scale finite in float32), got " + std::to_string(scale));
}

}  // namespace pooling_detail

// grid_mac(dequantize_codes(codes, box, scale), regions), bit for bit, without the crop:
// regions are [x0, y0, x1, y1) relative to `box` (as rmac_regions(box height, box width) gives
// them). Returns float32 n_regions × D.
inline MatrixRM grid_mac_codes(const CodesView& codes, const std::array<std::int32_t, 4>& box,
                               const std::int32_t* regions, std::ptrdiff_t n_regions, float scale) {
  pooling_detail::check_codes_box_scale(codes, box, scale);
  const std::int32_t box_width = box[2] - box[0], box_height = box[3] - box[1];
  for (std::ptrdiff_t r = 0; r < n_regions; ++r) {
    const std::int32_t* region = regions + 4 * r;
    if (!(region[0] >= 0 && region[1] >= 0 && region[0] < region[2] && region[1] < region[3] &&
          region[2] <= box_width && region[3] <= box_height))
      fail("regions: row " + std::to_string(r) + " = " + pooling_detail::corners_text(region) +
           " is empty or outside the box; expected 0 <= x0 < x1 <= " + std::to_string(box_width) +
           " and 0 <= y0 < y1 <= " + std::to_string(box_height) + " (coordinates relative to the box)");
  }
  MatrixRM out(n_regions, codes.channels);
  pooling_detail::grid_mac_codes_dispatch(codes, box, regions, n_regions, scale, out.data());
  return out;
}

// --- ClusterMAC regional maxima straight from 8-bit codes (AML re-ranking) ---------------------
// Re-ranking with ClusterMAC re-scores each top database image with the descriptor computed inside
// its AML box. The image's clusters come from Normalized Cut on the whole map (computed once and
// stored beside the codes), so inside the box region k is cluster k ∩ box, and its MAC (Eq. 4) is
// the max of code·scale over those cells. As for grid_mac_codes, scaling by scale >= 0 is monotone:
// the max runs on the bytes, into a K×D uint8 scratch, and only that is converted to float, which
// is bit-identical to region_mac() on dequantize_codes()' crop with the cropped labels. Measured
// here (one thread, 48×64×512 codes, 20 clusters, whole-map box): 0.03 ms warm / 0.05 ms with cold
// caches, against 2.8 / 3.0 ms for region_mac(dequantize_codes(...)).

namespace pooling_detail {

// running(l, ·) = max over the box's cells labelled l of their D codes, then out = running·scale.
// The cells of one box row are contiguous, and each update is one contiguous D-byte max (the shape
// max_into vectorises). Neighbouring cells usually share a cluster, so consecutive updates hit the
// same scratch row, which stays in L1. running starts at 0: codes >= 0, and a cluster with no cell
// in the box must give a zero row, as region_mac gives an empty region.
inline __attribute__((always_inline)) void region_mac_codes_kernel(const CodesView& codes, const std::int32_t* labels,
                                                                   const std::array<std::int32_t, 4>& box,
                                                                   std::ptrdiff_t n_labels, float scale,
                                                                   std::uint8_t* running, float* out) {
  const std::ptrdiff_t channels = codes.channels;
  for (std::ptrdiff_t y = box[1]; y < box[3]; ++y) {
    const std::uint8_t* cell = codes.data + (y * codes.width + box[0]) * channels;
    const std::int32_t* label_row = labels + y * codes.width;
    for (std::ptrdiff_t x = box[0]; x < box[2]; ++x, cell += channels) {
      const std::int32_t label = label_row[x];
      if (label >= 0) max_into(running + label * channels, cell, channels);  // negative: masked out
    }
  }
  const std::ptrdiff_t n = n_labels * channels;
  for (std::ptrdiff_t i = 0; i < n; ++i) out[i] = static_cast<float>(running[i]) * scale;
}

// AVX2 for the same reason as grid_mac_codes_avx2 (the byte max is the whole cost).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
__attribute__((target("avx2"))) inline void region_mac_codes_avx2(const CodesView& codes, const std::int32_t* labels,
                                                                  const std::array<std::int32_t, 4>& box,
                                                                  std::ptrdiff_t n_labels, float scale,
                                                                  std::uint8_t* running, float* out) {
  region_mac_codes_kernel(codes, labels, box, n_labels, scale, running, out);
}
#endif

inline void region_mac_codes_dispatch(const CodesView& codes, const std::int32_t* labels,
                                      const std::array<std::int32_t, 4>& box, std::ptrdiff_t n_labels, float scale,
                                      std::uint8_t* running, float* out) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (simd_level() >= kSimdAvx2) return region_mac_codes_avx2(codes, labels, box, n_labels, scale, running, out);
#endif
  region_mac_codes_kernel(codes, labels, box, n_labels, scale, running, out);
}

}  // namespace pooling_detail

// Per-cluster MAC inside `box` from 8-bit codes: labels is the WHOLE H×W label map (clusters
// 0..K-1, negative = masked out), box [x0, y0, x1, y1) in cells. Returns float32 K×D with
// K = max(labels over the whole map) + 1, so every box of one image gives the same rows; row k is
// the max of code·scale over the box's cells labelled k, or zero if cluster k has no cell in the
// box. Equal bit for bit to region_mac(dequantize_codes(codes, box, scale), the labels' crop)
// padded with zero rows up to K.
inline MatrixRM region_mac_codes(const CodesView& codes, const std::int32_t* labels,
                                 const std::array<std::int32_t, 4>& box, float scale) {
  pooling_detail::check_codes_box_scale(codes, box, scale);
  // K comes from the whole map, not the box: the rows of every box of one image line up.
  const std::ptrdiff_t n_labels = count_regions(labels, codes.height * codes.width);
  MatrixRM out(n_labels, codes.channels);
  if (n_labels == 0) return out;
  std::vector<std::uint8_t> running(static_cast<std::size_t>(n_labels * codes.channels), 0);
  pooling_detail::region_mac_codes_dispatch(codes, labels, box, n_labels, scale, running.data(), out.data());
  return out;
}

}  // namespace clustermac
