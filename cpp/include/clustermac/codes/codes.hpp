// 8-bit feature-map codes: a feature map stored channel-last as uint8 with value = code·scale
// (scale >= 0), as the feature-map store keeps them for re-ranking.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>

#include "clustermac/common.hpp"

namespace clustermac {

// A non-owning view of channel-last 8-bit codes: cell (y, x), channel d at data[(y·W + x)·D + d].
struct CodesView {
  const std::uint8_t* data;
  std::ptrdiff_t height, width, channels;
};

namespace detail {

inline std::string corners_text(const std::int32_t* b) {
  return "[" + std::to_string(b[0]) + ", " + std::to_string(b[1]) + ", " + std::to_string(b[2]) + ", " +
         std::to_string(b[3]) + ")";
}

inline void check_codes_not_empty(const CodesView& codes) {
  require(codes.height >= 1 && codes.width >= 1 && codes.channels >= 1,
          "codes: expected a non-empty H×W×D array, got " +
              describe_array("uint8", {codes.height, codes.width, codes.channels}));
}

// A non-empty box [x0, y0, x1, y1) inside the map.
inline void check_box(const std::array<std::int32_t, 4>& box, std::ptrdiff_t width, std::ptrdiff_t height) {
  require(0 <= box[0] && box[0] < box[2] && box[2] <= width && 0 <= box[1] && box[1] < box[3] && box[3] <= height,
          "box: expected 0 <= x0 < x1 <= " + std::to_string(width) + " and 0 <= y0 < y1 <= " + std::to_string(height) +
              ", got " + corners_text(box.data()));
}

inline void check_scale(double scale) {
  require(std::isfinite(scale) && scale >= 0.0, "scale: expected a finite number >= 0, got " + std::to_string(scale));
}

// The checks shared by the kernels on 8-bit codes: a non-empty map, a non-empty box inside it,
// a scale that keeps 255·scale a finite float.
inline void check_codes_box_scale(const CodesView& codes, const std::array<std::int32_t, 4>& box, double scale) {
  check_codes_not_empty(codes);
  check_box(box, codes.width, codes.height);
  check_scale(scale);
  require(std::isfinite(255.0f * static_cast<float>(scale)),
          "scale: expected a finite number >= 0 (with 255·scale finite in float32), got " +
              std::to_string(static_cast<float>(scale)));
}

}  // namespace detail

// Dequantises the box [x0, y0, x1, y1) of channel-last 8-bit codes (H×W×D) into a float D×h×w
// map (value = code·scale), the layout the pooling functions take; `box` null: the whole map.
// Cells are handled 16 at a time so that each channel plane receives a contiguous run of writes.
inline VectorF dequantize_codes(const CodesView& view, const std::array<std::int32_t, 4>* whole_or_box,
                                double scale_in) {
  const std::array<std::int32_t, 4> box = whole_or_box
                                              ? *whole_or_box
                                              : std::array<std::int32_t, 4>{0, 0, static_cast<std::int32_t>(view.width),
                                                                            static_cast<std::int32_t>(view.height)};
  if (whole_or_box) detail::check_box(box, view.width, view.height);
  detail::check_scale(scale_in);
  const std::uint8_t* codes = view.data;
  const std::ptrdiff_t width = view.width, channels = view.channels;
  const float scale = static_cast<float>(scale_in);
  const std::ptrdiff_t box_width = box[2] - box[0], box_height = box[3] - box[1];
  const std::ptrdiff_t plane = box_width * box_height;
  VectorF result(channels * plane);
  float* out = result.data();
  constexpr std::ptrdiff_t kTile = 16;
  for (std::ptrdiff_t y = 0; y < box_height; ++y)
    for (std::ptrdiff_t x0 = 0; x0 < box_width; x0 += kTile) {
      const std::ptrdiff_t count = std::min(kTile, box_width - x0);
      const std::uint8_t* source = codes + ((box[1] + y) * width + box[0] + x0) * channels;
      float* target = out + y * box_width + x0;
      for (std::ptrdiff_t d = 0; d < channels; ++d)
        for (std::ptrdiff_t j = 0; j < count; ++j)
          target[d * plane + j] = static_cast<float>(source[j * channels + d]) * scale;
    }
  return result;
}

}  // namespace clustermac
