// Regions of a feature map: the R-MAC grid of Tolias et al. and the bounding boxes of labelled
// regions (clusters). Boxes are [x0, y0, x1, y1), half-open, in feature-map cells.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "clustermac/common.hpp"

namespace clustermac {

// Upper bound on the number of regions a label map may name; guards against allocating a
// huge K×D output for a stray label value.
constexpr std::int32_t kMaxRegionLabel = 1 << 20;

// K = the largest of n region labels + 1 (negative labels are masked out; 0 if all are).
inline std::ptrdiff_t count_regions(const std::int32_t* labels, std::ptrdiff_t n) {
  std::int32_t max_label = -1;
  for (std::ptrdiff_t i = 0; i < n; ++i) max_label = std::max(max_label, labels[i]);
  require(max_label < kMaxRegionLabel,
          "labels: the largest label is " + std::to_string(max_label) +
              "; expected region labels 0..K-1 with K <= " + std::to_string(kMaxRegionLabel));
  return static_cast<std::ptrdiff_t>(max_label) + 1;
}

// The most memory a regional pooling (region_mac, grid_mac and their 8-bit-code versions) may
// allocate for its K×D float32 output: 1 GiB, checked before allocating. K = max(labels) + 1
// counts every label up to the largest, so one stray label (2**20 − 1 on a VGG16 map) would
// otherwise ask for gigabytes of zero rows.
constexpr std::int64_t kMaxRegionOutputBytes = std::int64_t{1} << 30;

// Refuses a `rows` × `channels` float32 output larger than kMaxRegionOutputBytes. `function` names
// the call, `rows_are` says where the row count comes from ("labels.max() + 1").
inline void require_region_output(std::int64_t rows, std::int64_t channels, const std::string& function,
                                  const std::string& rows_are) {
  const std::int64_t values = checked_multiply(rows, channels, function);
  if (values <= kMaxRegionOutputBytes / 4) return;
  std::ostringstream text;
  text.precision(3);
  text << function << ": K = " << rows << " rows (" << rows_are << ") × D = " << channels << " channels would need "
       << static_cast<double>(values) * 4.0 / double(std::int64_t{1} << 30)
       << " GiB of float32 output; the limit is 1 GiB (K · D <= " << kMaxRegionOutputBytes / 4 << ")";
  fail(text.str());
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
// Limits: 1 <= height, width <= kMaxRmacSide (the coordinates are int32) and
// 1 <= levels <= kMaxRmacLevels (at most ~10^5 regions).
constexpr std::int64_t kMaxRmacSide = std::numeric_limits<std::int32_t>::max();
constexpr std::int64_t kMaxRmacLevels = 64;

inline std::vector<std::array<std::int32_t, 4>> rmac_regions(std::int64_t height, std::int64_t width,
                                                             std::int64_t levels) {
  require(height >= 1 && width >= 1, "rmac_regions: height and width must be >= 1, got height=" +
                                         std::to_string(height) + ", width=" + std::to_string(width));
  require(levels >= 1, "rmac_regions: levels must be >= 1, got " + std::to_string(levels));
  require(height <= kMaxRmacSide && width <= kMaxRmacSide,
          "rmac_regions: height and width must be <= " + std::to_string(kMaxRmacSide) +
              " (2**31 - 1: region coordinates are int32), got height=" + std::to_string(height) +
              ", width=" + std::to_string(width));
  require(levels <= kMaxRmacLevels, "rmac_regions: levels must be <= " + std::to_string(kMaxRmacLevels) +
                                        " (Tolias et al. use 3), got " + std::to_string(levels));
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
  for (int l = 1; l <= static_cast<int>(levels); ++l) {
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

}  // namespace clustermac
