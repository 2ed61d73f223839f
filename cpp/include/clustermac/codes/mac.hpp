// Regional maxima straight from 8-bit codes, for re-ranking (Tolias et al. ICLR 2016, Sec. 5):
// R-MAC's grid and ClusterMAC's clusters inside an AML box of a stored map. Rounding a product
// by a non-negative float is monotone, so the MAC of Eq. 4, max_i(code_i·scale), equals
// (max_i code_i)·scale exactly: the max runs on the bytes (no dequantised crop is written) and
// only the result is converted to float, bit-identical to the float pooling on the crop.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "clustermac/codes/codes.hpp"
#include "clustermac/common.hpp"
#include "clustermac/pooling/regions.hpp"
#include "clustermac/simd.hpp"

namespace clustermac {

namespace detail {

// best[d] = max(best[d], cell[d]) for d < n. Its own function so that __restrict applies (the
// vectoriser otherwise adds an aliasing check), and written without std::max, whose
// reference-returning form GCC 12 leaves scalar at the baseline ISA.
CLUSTERMAC_ALWAYS_INLINE void max_into(std::uint8_t* __restrict best, const std::uint8_t* __restrict cell,
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
// its rows' maxima.
struct GridMacCodesKernel {
  static constexpr SimdLevel widest = kSimdAvx2;  // no AVX-512 variant: it measured slower on the byte max
  template <SimdLevel>
  static CLUSTERMAC_ALWAYS_INLINE void run(const CodesView& codes, const std::array<std::int32_t, 4>& box,
                                           const std::int32_t* regions, std::ptrdiff_t n_regions, float scale,
                                           float* out) {
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
        for (std::ptrdiff_t y = other[1]; y < other[3]; ++y)
          max_into(best, row_maxima.data() + (y - first_row) * channels, channels);
        float* row = out + s * channels;
        for (std::ptrdiff_t d = 0; d < channels; ++d) row[d] = static_cast<float>(best[d]) * scale;
        done[s] = 1;
      }
    }
  }
};

// running(l, ·) = max over the box's cells labelled l of their D codes, then out = running·scale.
// The cells of one box row are contiguous, and each update is one contiguous D-byte max (the shape
// max_into vectorises). Neighbouring cells usually share a cluster, so consecutive updates hit the
// same scratch row, which stays in L1. running starts at 0: codes >= 0, and a cluster with no cell
// in the box must give a zero row, as region_mac gives an empty region.
struct RegionMacCodesKernel {
  static constexpr SimdLevel widest = kSimdAvx2;  // as GridMacCodesKernel
  template <SimdLevel>
  static CLUSTERMAC_ALWAYS_INLINE void run(const CodesView& codes, const std::int32_t* labels,
                                           const std::array<std::int32_t, 4>& box, std::ptrdiff_t n_labels, float scale,
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
};

}  // namespace detail

// grid_mac(dequantize_codes(codes, box, scale), regions), bit for bit, without the crop:
// regions are [x0, y0, x1, y1) relative to `box` (as rmac_regions(box height, box width) gives
// them). Returns float32 n_regions × D.
inline MatrixRM grid_mac_codes(const CodesView& codes, const std::array<std::int32_t, 4>& box,
                               const std::int32_t* regions, std::ptrdiff_t n_regions, double scale) {
  detail::check_codes_box_scale(codes, box, scale);
  const std::int32_t box_width = box[2] - box[0], box_height = box[3] - box[1];
  for (std::ptrdiff_t r = 0; r < n_regions; ++r) {
    const std::int32_t* region = regions + 4 * r;
    if (!(region[0] >= 0 && region[1] >= 0 && region[0] < region[2] && region[1] < region[3] &&
          region[2] <= box_width && region[3] <= box_height))
      fail("regions: row " + std::to_string(r) + " = " + detail::corners_text(region) +
           " is empty or outside the box; expected 0 <= x0 < x1 <= " + std::to_string(box_width) +
           " and 0 <= y0 < y1 <= " + std::to_string(box_height) + " (coordinates relative to the box)");
  }
  require_region_output(n_regions, codes.channels, "grid_mac_codes", "one per region");
  MatrixRM out(n_regions, codes.channels);
  dispatch<detail::GridMacCodesKernel>(codes, box, regions, n_regions, static_cast<float>(scale), out.data());
  return out;
}

// Per-cluster MAC inside `box` from 8-bit codes: labels is the WHOLE H×W label map (clusters
// 0..K-1, negative = masked out), box [x0, y0, x1, y1) in cells. Returns float32 K×D with
// K = max(labels over the whole map) + 1, so every box of one image gives the same rows; row k is
// the max of code·scale over the box's cells labelled k, or zero if cluster k has no cell in the
// box. Equal bit for bit to region_mac(dequantize_codes(codes, box, scale), the labels' crop)
// padded with zero rows up to K.
inline MatrixRM region_mac_codes(const CodesView& codes, const std::int32_t* labels,
                                 const std::array<std::int32_t, 4>& box, double scale) {
  detail::check_codes_box_scale(codes, box, scale);
  // K comes from the whole map, not the box: the rows of every box of one image line up.
  const std::ptrdiff_t n_labels = count_regions(labels, codes.height * codes.width);
  require_region_output(n_labels, codes.channels, "region_mac_codes", "labels.max() + 1; use compact labels 0..K-1");
  MatrixRM out(n_labels, codes.channels);
  if (n_labels == 0) return out;
  std::vector<std::uint8_t> running(static_cast<std::size_t>(n_labels * codes.channels), 0);
  dispatch<detail::RegionMacCodesKernel>(codes, labels, box, n_labels, static_cast<float>(scale), running.data(),
                                         out.data());
  return out;
}

}  // namespace clustermac
