// Approximate max-pooling localisation (AML) of Tolias, Sicre & Jégou, "Particular object
// retrieval with integral max-pooling of CNN activations", ICLR 2016, Sec. 4.
//
// The MAC vector of a box R is approximated channel-wise by the generalised mean
// f_R,d = (sum_{x in R} X_d(x)^p)^(1/p) (their Eq. 5; p = 10), whose inner sums come from
// integral images of X^p in four look-ups per channel. A box is scored by the cosine between
// f_R and the query's MAC vector. The box search evaluates every box whose corners lie on a
// grid of `step` cells (plus the map's far borders) and whose aspect ratio is within a factor
// `aspect_tolerance` of the query's, then refines the best box by moving one edge at a time
// by 1..step cells, keeping the best improving move, for at most `refine_iterations` rounds.
//
// The cosine is scale-invariant in X, so the map is divided by its maximum before the power:
// X^p then lies in [0, 1] and cannot overflow. Integral images are kept in double: with p = 10
// a float integral would lose the small sums of boxes next to large activations.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "clustermac/common.hpp"

namespace clustermac {

struct AmlParams {
  double p = 10.0;
  int step = 3;
  double aspect_tolerance = 1.1;
  double query_aspect = 0.0;  // width / height of the query; <= 0: no aspect constraint
  int refine_iterations = 5;
};

struct AmlResult {
  std::array<std::int32_t, 4> box;  // [x0, y0, x1, y1), feature-map cells
  double score;
};

namespace aml_detail {

// Integral images of the powered map, layout [(y·(W+1) + x)·D + d]: the D sums of one corner
// are contiguous, so a box's D sums are four vector loads.
struct PowerIntegral {
  std::ptrdiff_t channels = 0, height = 0, width = 0;
  std::vector<double> sums;
  const double* corner(std::ptrdiff_t x, std::ptrdiff_t y) const { return sums.data() + (y * (width + 1) + x) * channels; }
};

// Builds the integral image from powered[d][y][x] (already X^p): row by row, the running
// row sum plus the integral row above.
inline void build_integral(const float* powered, std::ptrdiff_t channels, std::ptrdiff_t height, std::ptrdiff_t width,
                           PowerIntegral& out) {
  out.channels = channels;
  out.height = height;
  out.width = width;
  out.sums.assign((height + 1) * (width + 1) * channels, 0.0);
  std::vector<double> row_sum(channels);
  for (std::ptrdiff_t y = 0; y < height; ++y) {
    std::fill(row_sum.begin(), row_sum.end(), 0.0);
    for (std::ptrdiff_t x = 0; x < width; ++x) {
      const double* above = out.corner(x + 1, y);
      double* here = out.sums.data() + ((y + 1) * (width + 1) + x + 1) * channels;
      const float* cell = powered + y * width + x;
      for (std::ptrdiff_t d = 0; d < channels; ++d) {
        row_sum[d] += cell[d * height * width];
        here[d] = above[d] + row_sum[d];
      }
    }
  }
}

class BoxScorer {
 public:
  BoxScorer(const PowerIntegral& integral, const float* unit_query, double p)
      : integral_(integral), query_(unit_query, integral.channels), inverse_p_(static_cast<float>(1.0 / p)),
        sums_(integral.channels) {}

  // Cosine between the query and the generalised-mean vector of box [x0, x1) × [y0, y1).
  double score(std::ptrdiff_t x0, std::ptrdiff_t y0, std::ptrdiff_t x1, std::ptrdiff_t y1) {
    const std::ptrdiff_t n = integral_.channels;
    Eigen::Map<const Eigen::ArrayXd> a(integral_.corner(x1, y1), n), b(integral_.corner(x0, y1), n),
        c(integral_.corner(x1, y0), n), e(integral_.corner(x0, y0), n);
    // Clipped at a tiny positive value: round-off can leave -0 or negatives; log(0) is avoided.
    sums_ = ((a - b) - (c - e)).cast<float>().max(1e-30f);
    sums_ = (sums_.log() * inverse_p_).exp();  // S^(1/p), vectorised
    const double norm = std::sqrt(static_cast<double>(sums_.matrix().squaredNorm()));
    if (!(norm > 0.0)) return 0.0;
    return static_cast<double>(query_.dot(sums_.matrix())) / norm;
  }

 private:
  const PowerIntegral& integral_;
  Eigen::Map<const VectorF> query_;
  float inverse_p_;
  Eigen::ArrayXf sums_;
};

inline std::vector<std::ptrdiff_t> grid_positions(std::ptrdiff_t extent, int step) {
  std::vector<std::ptrdiff_t> positions;
  for (std::ptrdiff_t v = 0; v < extent; v += step) positions.push_back(v);
  positions.push_back(extent);
  return positions;
}

}  // namespace aml_detail

inline void check_aml_params(const AmlParams& params) {
  require(std::isfinite(params.p) && params.p > 0.0, "p: expected a finite number > 0, got " + std::to_string(params.p));
  require(params.step >= 1, "step: expected an integer >= 1, got " + std::to_string(params.step));
  require(std::isfinite(params.aspect_tolerance) && params.aspect_tolerance >= 1.0,
          "aspect_tolerance: expected a finite number >= 1, got " + std::to_string(params.aspect_tolerance));
  require(std::isfinite(params.query_aspect) && params.query_aspect >= 0.0,
          "query_aspect: expected None or a finite number > 0 (width / height), got " + std::to_string(params.query_aspect));
  require(params.refine_iterations >= 0,
          "refine_iterations: expected an integer >= 0, got " + std::to_string(params.refine_iterations));
}

// AML on already powered values (X/max(X))^p, layout D×H×W; `unit_query` is the l2-normalised
// query MAC vector (D). The integral image lives in `workspace`, reused across calls.
inline AmlResult aml_localize_powered(const float* powered, std::ptrdiff_t channels, std::ptrdiff_t height,
                                      std::ptrdiff_t width, const float* unit_query, const AmlParams& params,
                                      aml_detail::PowerIntegral& workspace) {
  using namespace aml_detail;
  build_integral(powered, channels, height, width, workspace);
  BoxScorer scorer(workspace, unit_query, params.p);
  const bool constrained = params.query_aspect > 0.0;
  const double log_query_aspect = constrained ? std::log(params.query_aspect) : 0.0;
  const double log_tolerance = std::log(params.aspect_tolerance) + 1e-12;
  auto aspect_ok = [&](std::ptrdiff_t w, std::ptrdiff_t h) {
    return !constrained || std::abs(std::log(static_cast<double>(w) / h) - log_query_aspect) <= log_tolerance;
  };

  AmlResult best{{0, 0, static_cast<std::int32_t>(width), static_cast<std::int32_t>(height)}, -2.0};
  bool found = false;
  const auto xs = grid_positions(width, params.step), ys = grid_positions(height, params.step);
  for (std::size_t i0 = 0; i0 < xs.size(); ++i0)
    for (std::size_t i1 = i0 + 1; i1 < xs.size(); ++i1)
      for (std::size_t j0 = 0; j0 < ys.size(); ++j0)
        for (std::size_t j1 = j0 + 1; j1 < ys.size(); ++j1) {
          if (!aspect_ok(xs[i1] - xs[i0], ys[j1] - ys[j0])) continue;
          const double s = scorer.score(xs[i0], ys[j0], xs[i1], ys[j1]);
          if (s > best.score) {
            best = {{static_cast<std::int32_t>(xs[i0]), static_cast<std::int32_t>(ys[j0]),
                     static_cast<std::int32_t>(xs[i1]), static_cast<std::int32_t>(ys[j1])},
                    s};
            found = true;
          }
        }
  // No grid box meets the aspect constraint (tiny map, extreme query): start from the whole map.
  if (!found) best.score = scorer.score(0, 0, width, height);

  for (int iteration = 0; iteration < params.refine_iterations; ++iteration) {
    AmlResult candidate = best;
    for (int edge = 0; edge < 4; ++edge)
      for (int delta = -params.step; delta <= params.step; ++delta) {
        if (delta == 0) continue;
        std::array<std::int32_t, 4> box = best.box;
        box[edge] += delta;
        if (box[0] < 0 || box[1] < 0 || box[2] > width || box[3] > height || box[0] >= box[2] || box[1] >= box[3])
          continue;
        if (!aspect_ok(box[2] - box[0], box[3] - box[1])) continue;
        const double s = scorer.score(box[0], box[1], box[2], box[3]);
        if (s > candidate.score) candidate = {box, s};
      }
    if (!(candidate.score > best.score)) break;
    best = candidate;
  }
  return best;
}

// Powers a float D×H×W map: (max(x, 0) / max(X))^p. An all-zero map stays zero.
inline std::vector<float> power_map(const float* map, std::ptrdiff_t count, double p) {
  float largest = 0.0f;
  for (std::ptrdiff_t i = 0; i < count; ++i) largest = std::max(largest, map[i]);
  std::vector<float> powered(count, 0.0f);
  if (largest > 0.0f)
    for (std::ptrdiff_t i = 0; i < count; ++i)
      powered[i] = static_cast<float>(std::pow(std::max(0.0, static_cast<double>(map[i]) / largest), p));
  return powered;
}

// Powers an 8-bit quantised map (value = code · scale): the scale cancels in the cosine, so
// (code/255)^p comes from a 256-entry table.
inline std::vector<float> power_codes(const std::uint8_t* codes, std::ptrdiff_t count, double p) {
  std::array<float, 256> table;
  for (int c = 0; c < 256; ++c) table[c] = static_cast<float>(std::pow(c / 255.0, p));
  std::vector<float> powered(count);
  for (std::ptrdiff_t i = 0; i < count; ++i) powered[i] = table[codes[i]];
  return powered;
}

}  // namespace clustermac
