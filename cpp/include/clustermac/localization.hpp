// Approximate max-pooling localisation (AML) of Tolias, Sicre & Jégou, "Particular object
// retrieval with integral max-pooling of CNN activations", ICLR 2016, Sec. 4.
//
// The MAC vector of a box R is approximated channel-wise by the generalised mean
// f_R,d = (sum_{x in R} X_d(x)^p)^(1/p) (p = 10), whose inner sums come from integral images
// in four look-ups per channel. A box is scored by the cosine between f_R and the query's MAC
// vector. The search evaluates every box whose corners lie on a grid of `step` cells (plus
// the map's far borders) and whose aspect ratio is within a factor `aspect_tolerance` of the
// query's, then refines the best box by moving one edge at a time by 1..step cells, keeping
// the best improving move, for at most `refine_iterations` rounds.
//
// Cost: re-ranking scans ~1000 maps per query, so the work per map is kept near one pass
// over its activations. The integral image is built only at grid corners (from per-block
// sums), and refinement moves are scored as the current box plus or minus the strips of
// cells an edge move adds or removes, so no full-resolution integral is ever written. All
// sums are in double: the powered values span ~25 orders of magnitude at p = 10, and the
// differences of float prefix sums would lose the small sums of boxes near large
// activations (even in double, a sum that should be 0 comes out as ±1e-14 of the channel's
// total, which the 1/p-th root lifts to a few hundredths: scores are good to ~1e-4). The
// cosine is scale-invariant, so values are divided by the map's maximum (x/max ≤ 1: no
// overflow). S^(1/p) uses a vectorised log2/exp2 approximation (relative error ~1e-5), and
// the hot loops are compiled for AVX-512, AVX2 and the baseline ISA and chosen at run time.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
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

namespace aml_detail {

#define CLUSTERMAC_ALWAYS_INLINE inline __attribute__((always_inline))

// Powered activations of a map, produced on demand for runs of cells in channel-last order.
// Either 8-bit codes H×W×D (value = code·scale; (code/255)^p, exact repeated multiplication
// for small integer p, else a 256-entry table) or a float map already powered (H×W×D).
struct PoweredCells {
  std::ptrdiff_t channels = 0, height = 0, width = 0;
  const std::uint8_t* codes = nullptr;
  const float* powered = nullptr;
  int integer_power = 0;  // 1..15: multiply; 0: table
  std::array<float, 256> table{};

  // Powered values of cells (y, x) .. (y, x + count - 1), channel-last: a pointer into the
  // powered map, or into `scratch` (count·D floats) for codes.
  CLUSTERMAC_ALWAYS_INLINE const float* cells(std::ptrdiff_t y, std::ptrdiff_t x, std::ptrdiff_t count, float* scratch) const {
    const std::ptrdiff_t first = (y * width + x) * channels, n = count * channels;
    if (powered) return powered + first;
    const std::uint8_t* c = codes + first;
    if (integer_power == 10) {  // Tolias' p: x^10 = ((x^2)^2)^2 · x^2
      for (std::ptrdiff_t i = 0; i < n; ++i) {
        const float v = static_cast<float>(c[i]) * (1.0f / 255.0f);
        const float v2 = v * v, v4 = v2 * v2, v8 = v4 * v4;
        scratch[i] = v8 * v2;
      }
    } else if (integer_power > 0) {
      for (std::ptrdiff_t i = 0; i < n; ++i) scratch[i] = static_cast<float>(c[i]) * (1.0f / 255.0f);
      std::vector<float> base(scratch, scratch + n);
      for (std::ptrdiff_t i = 0; i < n; ++i) scratch[i] = 1.0f;
      for (int e = integer_power; e > 0; e >>= 1) {
        if (e & 1)
          for (std::ptrdiff_t i = 0; i < n; ++i) scratch[i] *= base[i];
        for (std::ptrdiff_t i = 0; i < n; ++i) base[i] *= base[i];
      }
    } else {
      for (std::ptrdiff_t i = 0; i < n; ++i) scratch[i] = table[c[i]];
    }
    return scratch;
  }
};

CLUSTERMAC_ALWAYS_INLINE void accumulate(double* acc, const float* values, std::ptrdiff_t n) {
  for (std::ptrdiff_t i = 0; i < n; ++i) acc[i] += static_cast<double>(values[i]);
}

typedef float Float4 __attribute__((vector_size(16), aligned(4)));
typedef float Float8 __attribute__((vector_size(32), aligned(4)));
typedef float Float16 __attribute__((vector_size(64), aligned(4)));
typedef std::int32_t Int4 __attribute__((vector_size(16), aligned(4)));
typedef std::int32_t Int8 __attribute__((vector_size(32), aligned(4)));
typedef std::int32_t Int16 __attribute__((vector_size(64), aligned(4)));

// s^(1/p) for s >= 0 (0 for s == 0): exp2(log2(s)/p). log2 from the exponent bits plus the
// series 2/ln2·(z + z^3/3 + z^5/5), z = (m-1)/(m+1), with the mantissa m reduced to
// [sqrt(1/2), sqrt(2)) so |z| < 0.172; exp2 of y as 2^round(y)·e^(t), |t| <= ln2/2, by the
// Taylor series to degree 5. Relative error ~1e-5: plenty to rank boxes.
template <typename VecF, typename VecI>
CLUSTERMAC_ALWAYS_INLINE VecF root(VecF s, float inverse_p) {
  const VecF tiny = VecF{} + 1e-37f;
  const VecF x = s > tiny ? s : tiny;
  const VecI bits = reinterpret_cast<const VecI&>(x);
  VecI exponent = (bits >> 23) - 127;
  VecI mantissa_bits = (bits & 0x007FFFFF) | 0x3F800000;
  VecF m = reinterpret_cast<const VecF&>(mantissa_bits);
  const auto high = m > 1.41421356f;
  m = high ? m * 0.5f : m;
  exponent = high ? exponent + 1 : exponent;
  // 1/(m+1) for m+1 in [1.707, 2.415): linear first guess (error < 2 %), two Newton steps
  // (error < 1e-7), cheaper than a vector division.
  const VecF denominator = m + 1.0f;
  VecF reciprocal = 0.9927f - 0.24264f * denominator;
  reciprocal = reciprocal * (2.0f - denominator * reciprocal);
  reciprocal = reciprocal * (2.0f - denominator * reciprocal);
  const VecF z = (m - 1.0f) * reciprocal, z2 = z * z;
  const VecF series = z * (1.0f + z2 * (1.0f / 3 + z2 * (1.0f / 5)));
  const VecF y = (__builtin_convertvector(exponent, VecF) + 2.8853900817779268f * series) * inverse_p;  // 2/ln 2
  // 2^y = 2^n · e^(t), n = round(y), t = (y - n)·ln 2
  const VecF shifted = y + (VecF{} + 0.5f);
  VecI n = __builtin_convertvector(shifted, VecI);  // truncation toward zero ...
  n = __builtin_convertvector(n, VecF) > shifted ? n - 1 : n;  // ... made floor: n = floor(y + 1/2)
  const VecF t = (y - __builtin_convertvector(n, VecF)) * 0.69314718055994531f;
  const VecF e = 1.0f + t * (1.0f + t * (0.5f + t * (1.0f / 6 + t * (1.0f / 24 + t * (1.0f / 120)))));
  VecI scale_bits = (n + 127) << 23;
  scale_bits = n < -126 ? VecI{} : scale_bits;  // below the float range: 0
  const VecF result = e * reinterpret_cast<const VecF&>(scale_bits);
  return s > 0.0f ? result : VecF{};
}

// Cosine between the unit query and f = S^(1/p), S = a - b given in double; `scratch` holds
// D floats.
template <typename VecF, typename VecI, int Lanes>
CLUSTERMAC_ALWAYS_INLINE double box_cosine(const double* __restrict a, const double* __restrict b,
                                           const float* __restrict query, std::ptrdiff_t n, float inverse_p,
                                           float* __restrict scratch) {
  for (std::ptrdiff_t i = 0; i < n; ++i) scratch[i] = static_cast<float>(a[i] - b[i]);
  VecF dot{}, squares{};
  std::ptrdiff_t i = 0;
  for (; i + Lanes <= n; i += Lanes) {
    VecF s, q;
    std::memcpy(&s, scratch + i, sizeof(VecF));
    std::memcpy(&q, query + i, sizeof(VecF));
    const VecF f = root<VecF, VecI>(s, inverse_p);
    dot += f * q;
    squares += f * f;
  }
  double total_dot = 0.0, total_squares = 0.0;
  for (int l = 0; l < Lanes; ++l) {
    total_dot += dot[l];
    total_squares += squares[l];
  }
  for (; i < n; ++i) {
    const double f = scratch[i] > 0.0f ? std::pow(static_cast<double>(scratch[i]), static_cast<double>(inverse_p)) : 0.0;
    total_dot += f * query[i];
    total_squares += f * f;
  }
  return total_squares > 0.0 ? total_dot / std::sqrt(total_squares) : 0.0;
}

inline std::vector<std::ptrdiff_t> grid_positions(std::ptrdiff_t extent, int step) {
  std::vector<std::ptrdiff_t> positions;
  for (std::ptrdiff_t v = 0; v < extent; v += step) positions.push_back(v);
  positions.push_back(extent);
  return positions;
}

template <typename VecF, typename VecI, int Lanes>
CLUSTERMAC_ALWAYS_INLINE AmlResult localize(const PoweredCells& cells, const float* unit_query, const AmlParams& params) {
  const std::ptrdiff_t channels = cells.channels, height = cells.height, width = cells.width;
  const float inverse_p = static_cast<float>(1.0 / params.p);
  const auto xs = grid_positions(width, params.step), ys = grid_positions(height, params.step);
  const std::ptrdiff_t gw = static_cast<std::ptrdiff_t>(xs.size()), gh = static_cast<std::ptrdiff_t>(ys.size());
  std::vector<float> scratch(std::max(width, height) * channels), score_scratch(channels);

  // Integral image at grid corners: grid[(j·gw + i)·D + d] = sum of cells x < xs[i], y < ys[j].
  // Built from per-block sums, one pass over the cells, row by row.
  std::vector<double> grid(gw * gh * channels, 0.0), band((gw - 1) * channels);
  for (std::ptrdiff_t j = 0; j + 1 < gh; ++j) {
    std::fill(band.begin(), band.end(), 0.0);
    for (std::ptrdiff_t y = ys[j]; y < ys[j + 1]; ++y) {
      const float* row = cells.cells(y, 0, width, scratch.data());
      for (std::ptrdiff_t i = 0; i + 1 < gw; ++i)
        for (std::ptrdiff_t x = xs[i]; x < xs[i + 1]; ++x) accumulate(band.data() + i * channels, row + x * channels, channels);
    }
    // grid row j+1 = grid row j + running sum of this band's blocks.
    const double* above = grid.data() + j * gw * channels;
    double* here = grid.data() + (j + 1) * gw * channels;
    for (std::ptrdiff_t d = 0; d < channels; ++d) here[d] = 0.0;
    for (std::ptrdiff_t i = 1; i < gw; ++i) {
      const double* left = here + (i - 1) * channels;
      const double* block = band.data() + (i - 1) * channels;
      double* out = here + i * channels;
      for (std::ptrdiff_t d = 0; d < channels; ++d) out[d] = left[d] + block[d];
    }
    for (std::ptrdiff_t k = 0; k < gw * channels; ++k) here[k] += above[k];
  }
  auto corner = [&](std::ptrdiff_t i, std::ptrdiff_t j) { return grid.data() + (j * gw + i) * channels; };

  // Aspect constraint query_aspect/t <= w/h <= query_aspect·t, tested by multiplication (it is
  // checked for every one of the ~35k grid boxes of a VGG16 map).
  const bool constrained = params.query_aspect > 0.0;
  const double widest = params.query_aspect * params.aspect_tolerance * (1.0 + 1e-12);
  const double narrowest = params.query_aspect / params.aspect_tolerance * (1.0 - 1e-12);
  auto aspect_ok = [&](std::ptrdiff_t w, std::ptrdiff_t h) {
    return !constrained || (w <= widest * h && w >= narrowest * h);
  };

  AmlResult best{{0, 0, static_cast<std::int32_t>(width), static_cast<std::int32_t>(height)}, -2.0};
  bool found = false;
  // For each pair of grid rows (j0, j1), the band sums band[i] = grid(i, j1) - grid(i, j0) are
  // formed once; every box between those rows is then band[i1] - band[i0]: two loads per
  // channel instead of four, from a band that stays in cache.
  std::vector<double> band_sums(gw * channels);
  for (std::ptrdiff_t j0 = 0; j0 < gh; ++j0)
    for (std::ptrdiff_t j1 = j0 + 1; j1 < gh; ++j1) {
      bool band_ready = false;
      for (std::ptrdiff_t i0 = 0; i0 < gw; ++i0)
        for (std::ptrdiff_t i1 = i0 + 1; i1 < gw; ++i1) {
          if (!aspect_ok(xs[i1] - xs[i0], ys[j1] - ys[j0])) continue;
          if (!band_ready) {
            const double* top = corner(0, j0);
            const double* bottom = corner(0, j1);
            for (std::ptrdiff_t k = 0; k < gw * channels; ++k) band_sums[k] = bottom[k] - top[k];
            band_ready = true;
          }
          const double s = box_cosine<VecF, VecI, Lanes>(band_sums.data() + i1 * channels, band_sums.data() + i0 * channels,
                                                         unit_query, channels, inverse_p, score_scratch.data());
          if (s > best.score) {
            best = {{static_cast<std::int32_t>(xs[i0]), static_cast<std::int32_t>(ys[j0]), static_cast<std::int32_t>(xs[i1]),
                     static_cast<std::int32_t>(ys[j1])},
                    s};
            found = true;
          }
        }
    }
  // The sums S of the best box (whole map when no grid box meets the aspect constraint).
  std::vector<double> best_sums(channels), zero(channels, 0.0);
  {
    std::array<std::ptrdiff_t, 4> at{0, 0, gw - 1, gh - 1};
    if (found) {
      at[0] = std::find(xs.begin(), xs.end(), best.box[0]) - xs.begin();
      at[1] = std::find(ys.begin(), ys.end(), best.box[1]) - ys.begin();
      at[2] = std::find(xs.begin(), xs.end(), best.box[2]) - xs.begin();
      at[3] = std::find(ys.begin(), ys.end(), best.box[3]) - ys.begin();
    }
    const double *a = corner(at[2], at[3]), *b = corner(at[0], at[3]), *c = corner(at[2], at[1]), *e = corner(at[0], at[1]);
    for (std::ptrdiff_t d = 0; d < channels; ++d) best_sums[d] = (a[d] - b[d]) - (c[d] - e[d]);
    if (!found)
      best.score = box_cosine<VecF, VecI, Lanes>(best_sums.data(), zero.data(), unit_query, channels, inverse_p,
                                                 score_scratch.data());
  }

  // Refinement: a move of one edge by delta adds (or removes) |delta| whole columns or rows of
  // the current box's extent; their sums, accumulated line by line, give every candidate.
  const int step = params.step;
  std::vector<double> strip(channels), candidate_sums(channels), best_candidate_sums(channels);
  for (int iteration = 0; iteration < params.refine_iterations; ++iteration) {
    AmlResult candidate = best;
    const std::array<std::int32_t, 4> box = best.box;
    for (int edge = 0; edge < 4; ++edge) {
      const bool vertical = edge == 0 || edge == 2;  // x0 or x1: moving it adds/removes columns
      for (int direction = -1; direction <= 1; direction += 2) {
        std::fill(strip.begin(), strip.end(), 0.0);
        for (int delta = 1; delta <= step; ++delta) {
          std::array<std::int32_t, 4> moved = box;
          moved[edge] += direction * delta;
          if (moved[0] < 0 || moved[1] < 0 || moved[2] > width || moved[3] > height || moved[0] >= moved[2] ||
              moved[1] >= moved[3])
            break;
          // The line of cells entering or leaving with this delta: inside the box when the
          // edge moves inwards, just outside when it moves outwards.
          const bool grows = (edge < 2) == (direction < 0);
          const std::int32_t line = edge < 2 ? (grows ? box[edge] - delta : box[edge] + delta - 1)
                                             : (grows ? box[edge] + delta - 1 : box[edge] - delta);
          if (vertical) {
            for (std::int32_t y = box[1]; y < box[3]; ++y)
              accumulate(strip.data(), cells.cells(y, line, 1, scratch.data()), channels);
          } else {
            const float* row = cells.cells(line, box[0], box[2] - box[0], scratch.data());
            for (std::int32_t x = 0; x < box[2] - box[0]; ++x) accumulate(strip.data(), row + x * channels, channels);
          }
          if (!aspect_ok(moved[2] - moved[0], moved[3] - moved[1])) continue;
          for (std::ptrdiff_t d = 0; d < channels; ++d)
            candidate_sums[d] = grows ? best_sums[d] + strip[d] : best_sums[d] - strip[d];
          const double s = box_cosine<VecF, VecI, Lanes>(candidate_sums.data(), zero.data(), unit_query, channels, inverse_p,
                                                         score_scratch.data());
          if (s > candidate.score) {
            candidate = {moved, s};
            best_candidate_sums = candidate_sums;
          }
        }
      }
    }
    if (!(candidate.score > best.score)) break;
    best = candidate;
    best_sums = best_candidate_sums;
  }
  return best;
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CLUSTERMAC_AML_DISPATCH 1
__attribute__((target("avx512f"))) inline AmlResult localize_avx512(const PoweredCells& c, const float* q, const AmlParams& p) {
  return localize<Float16, Int16, 16>(c, q, p);
}
__attribute__((target("avx2,fma"))) inline AmlResult localize_avx2(const PoweredCells& c, const float* q, const AmlParams& p) {
  return localize<Float8, Int8, 8>(c, q, p);
}
#endif
inline AmlResult localize_baseline(const PoweredCells& c, const float* q, const AmlParams& p) {
  return localize<Float4, Int4, 4>(c, q, p);
}

inline AmlResult localize_dispatch(const PoweredCells& cells, const float* unit_query, const AmlParams& params) {
#ifdef CLUSTERMAC_AML_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return localize_avx512(cells, unit_query, params);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return localize_avx2(cells, unit_query, params);
#endif
  return localize_baseline(cells, unit_query, params);
}

}  // namespace aml_detail

// AML on a non-negative float map D×H×W (powered and transposed to channel-last here).
// `unit_query` is the l2-normalised query MAC vector (D).
inline AmlResult aml_localize(const float* map, std::ptrdiff_t channels, std::ptrdiff_t height, std::ptrdiff_t width,
                              const float* unit_query, const AmlParams& params) {
  check_aml_params(params);
  const std::ptrdiff_t n = height * width;
  float largest = 0.0f;
  for (std::ptrdiff_t i = 0; i < channels * n; ++i) largest = std::max(largest, map[i]);
  std::vector<float> powered(channels * n, 0.0f);
  if (largest > 0.0f)
    for (std::ptrdiff_t d = 0; d < channels; ++d)
      for (std::ptrdiff_t i = 0; i < n; ++i)
        powered[i * channels + d] =
            static_cast<float>(std::pow(std::max(0.0, static_cast<double>(map[d * n + i]) / largest), params.p));
  aml_detail::PoweredCells cells;
  cells.channels = channels;
  cells.height = height;
  cells.width = width;
  cells.powered = powered.data();
  return aml_detail::localize_dispatch(cells, unit_query, params);
}

// AML on 8-bit codes stored channel-last, H×W×D (value = code·scale; the scale cancels in
// the cosine, so it is not needed).
inline AmlResult aml_localize_codes(const std::uint8_t* codes, std::ptrdiff_t height, std::ptrdiff_t width,
                                    std::ptrdiff_t channels, const float* unit_query, const AmlParams& params) {
  check_aml_params(params);
  aml_detail::PoweredCells cells;
  cells.channels = channels;
  cells.height = height;
  cells.width = width;
  cells.codes = codes;
  const double rounded = std::round(params.p);
  if (rounded == params.p && rounded >= 1.0 && rounded <= 15.0) {
    cells.integer_power = static_cast<int>(rounded);  // (1/255)^15 is still a normal float
  } else {
    for (int c = 0; c < 256; ++c) cells.table[c] = static_cast<float>(std::pow(c / 255.0, params.p));
  }
  return aml_detail::localize_dispatch(cells, unit_query, params);
}

// Dequantises the box [x0, y0, x1, y1) of channel-last 8-bit codes (H×W×D) into a float D×h×w
// map (value = code·scale), the layout the pooling functions take. Cells are handled 16 at a
// time so that each channel plane receives a contiguous run of writes.
inline void dequantize_codes(const std::uint8_t* codes, std::ptrdiff_t width, std::ptrdiff_t channels,
                             const std::array<std::int32_t, 4>& box, float scale, float* out) {
  const std::ptrdiff_t box_width = box[2] - box[0], box_height = box[3] - box[1];
  const std::ptrdiff_t plane = box_width * box_height;
  constexpr std::ptrdiff_t kTile = 16;
  for (std::ptrdiff_t y = 0; y < box_height; ++y)
    for (std::ptrdiff_t x0 = 0; x0 < box_width; x0 += kTile) {
      const std::ptrdiff_t count = std::min(kTile, box_width - x0);
      const std::uint8_t* source = codes + ((box[1] + y) * width + box[0] + x0) * channels;
      float* target = out + y * box_width + x0;
      for (std::ptrdiff_t d = 0; d < channels; ++d)
        for (std::ptrdiff_t j = 0; j < count; ++j) target[d * plane + j] = static_cast<float>(source[j * channels + d]) * scale;
    }
}

}  // namespace clustermac
