// Approximate max-pooling localisation (AML) of Tolias, Sicre & Jégou, "Particular object
// retrieval with integral max-pooling of CNN activations", ICLR 2016, Sec. 4.
//
// The MAC vector of a box R is approximated channel-wise by the generalised mean
// f_R,d = (sum_{x in R} X_d(x)^p)^(1/p) (p = 10). A box is scored by the cosine between f_R
// and the query's MAC vector. The search evaluates every box whose corners lie on a grid of
// `step` cells (plus the map's far borders) and whose aspect ratio is within a factor
// `aspect_tolerance` of the query's, then refines the best box by moving one edge at a time
// by 1..step cells, keeping the best improving move, for at most `refine_iterations` rounds.
//
// Cost: re-ranking scans ~1000 maps per query, so the work per map is kept near one pass
// over its activations plus one 1/p-th root per channel and box:
//  - The map is summed once into blocks of step×step cells (the grid's cells), in float (sums
//    of non-negative values: relative error ~1e-7), in its memory order, 16 channels per
//    512-bit register on AVX-512 (the same sums as earlier versions: boxes and scores unchanged).
//  - For a pair of grid rows, the band of blocks between them is a running sum over the lower
//    row; along the band, prefix sums in double (in the same pass over the band) give every box
//    as a difference of two. A
//    channel that is 0 in a box adds exact zeros to the prefix, so its difference is exactly
//    0. (A 2-D integral image, as in Tolias' code, mixes the rows' rounding: the residue of a
//    sum that should be 0, lifted by the 1/p-th root, becomes a few percent of the channel.)
//  - Refinement scores a move as the current box's sums plus or minus the strip of cells the
//    edge move adds or removes; a removal's rounding residue is clamped at 0.
//  - S^(1/p) = exp2(log2(S)/p) from the exponent bits and two short polynomials, and for
//    p = 10 a cheaper split of the exponent by 10 with a table (relative error < 1e-5;
//    Tolias' code rounds the root to an integer code, i.e. ~1/255).
// The cosine is scale-invariant: 8-bit codes are powered as they are (code^p; the map's scale
// drops out), float maps after dividing by their maximum. The hot loops are dispatched to the
// CPU's SIMD level (simd.hpp).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "clustermac/codes/codes.hpp"
#include "clustermac/common.hpp"
#include "clustermac/pooling/whitening.hpp"
#include "clustermac/simd.hpp"

namespace clustermac {

struct AmlParams {
  double p = 10.0;
  int step = 3;
  double aspect_tolerance = 1.1;
  std::optional<double> query_aspect;  // width / height of the query; none: no aspect constraint
  int refine_iterations = 5;
};

struct AmlResult {
  std::array<std::int32_t, 4> box;  // [x0, y0, x1, y1), feature-map cells
  double score;
};

inline void check_aml_params(const AmlParams& params) {
  require(std::isfinite(params.p) && params.p > 0.0,
          "p: expected a finite number > 0, got " + std::to_string(params.p));
  require(params.step >= 1, "step: expected an integer >= 1, got " + std::to_string(params.step));
  require(std::isfinite(params.aspect_tolerance) && params.aspect_tolerance >= 1.0,
          "aspect_tolerance: expected a finite number >= 1, got " + std::to_string(params.aspect_tolerance));
  require(!params.query_aspect || (std::isfinite(*params.query_aspect) && *params.query_aspect > 0.0),
          "query_aspect: expected None or a finite number > 0 (width / height), got " +
              std::to_string(params.query_aspect.value_or(0.0)));
  require(params.refine_iterations >= 0,
          "refine_iterations: expected an integer >= 0, got " + std::to_string(params.refine_iterations));
}

namespace detail {

// s^(1/p) for s >= 0 (0 for s == 0): exp2(log2(s)/p). log2(s) = e + log2(m) from the exponent
// bits e and the mantissa m in [1, 2), log2(m) by a degree-5 polynomial in m - 1 (error
// 1.5e-5, divided by p on the way); exp2(y) = 2^n·2^f, n = round(y), f in [-1/2, 1/2], 2^f by
// a degree-4 polynomial (relative error 3.6e-6), 2^n added to the exponent bits.
// Coefficients: least squares at 200 Chebyshev nodes. Denormal s (< 1.2e-38) come out within
// a factor 2^(1/p) of their root.
template <int Lanes>
CLUSTERMAC_ALWAYS_INLINE typename Vectors<Lanes>::F root(typename Vectors<Lanes>::F s, float inverse_p) {
  typedef typename Vectors<Lanes>::F VecF;
  typedef typename Vectors<Lanes>::I VecI;
  const VecI bits = bit_cast<VecI>(s);
  const VecF exponent = __builtin_convertvector(bits >> 23, VecF);  // biased by 127, sign bit 0
  const VecF t = bit_cast<VecF>((bits & 0x007FFFFF) | 0x3F800000) - 1.0f;
  const VecF log2_mantissa =
      (1.439093e-05f - 127.0f) +
      t * (1.44159208f + t * (-0.707253434f + t * (0.411561482f + t * (-0.189832447f + t * 0.0439286278f))));
  VecF y = (exponent + log2_mantissa) * inverse_p;
  y = y > -125.0f ? y : VecF{} - 125.0f;  // keeps 2^n a normal float
  // Adding 1.5·2^23 rounds y to an integer n held in the low mantissa bits.
  const VecF shifted = y + 12582912.0f;
  const VecF f = y - (shifted - 12582912.0f);
  const VecF power_f = 1.00000008f + f * (0.693121034f + f * (0.240221074f + f * (0.0559220356f + f * 0.0096760371f)));
  const VecI result = bit_cast<VecI>(power_f) + (bit_cast<VecI>(shifted) << 23);  // the low bits of shifted are n
  return s > 0.0f ? bit_cast<VecF>(result) : VecF{};
}

// s^(1/10) for s >= 0 (0 for s == 0), Tolias' p, in fewer operations than root(): with the
// biased exponent e = 10q + r (r in 0..9) and the mantissa m in [1, 2),
// s^(1/10) = 2^q · 2^(r/10 - 12.7) · m^(1/10): a 10-entry table looked up by a register
// permutation, a degree-4 polynomial for m^(1/10) (relative error 5.8e-6, coefficients by
// least squares at 400 Chebyshev nodes), and q added to the exponent bits.
template <int Lanes>
CLUSTERMAC_ALWAYS_INLINE typename Vectors<Lanes>::F tenth_root(typename Vectors<Lanes>::F s) {
  typedef typename Vectors<Lanes>::F VecF;
  typedef typename Vectors<Lanes>::I VecI;
  constexpr float kTable[16] = {0.000150286183f, 0.000161072743f, 0.000172633492f, 0.000185023995f, 0.000198303808f,
                                0.000212536759f, 0.000227791258f, 0.000244140625f, 0.000261663443f, 0.000280443934f};
  const VecI bits = bit_cast<VecI>(s);
  const VecI e = bits >> 23;       // 0..255 (sign bit 0)
  const VecI q = (e * 205) >> 11;  // floor(e / 10) for e < 1029
  const VecI r = e - q * 10;
  const VecF t = bit_cast<VecF>((bits & 0x007FFFFF) | 0x3F800000) - 1.0f;
  const VecF root_m =
      1.00000578f + t * (0.0996895091f + t * (-0.0422198273f + t * (0.0190421548f + t * -0.00474850794f)));
  VecF table_r;
  if constexpr (Lanes == 16) {
    table_r = __builtin_shuffle(load<VecF>(kTable), r);
  } else {
    const VecF low = load<VecF>(kTable), high = load<VecF>(kTable + Lanes);
    table_r = Lanes == 8 ? __builtin_shuffle(low, high, r) : VecF{};
    if constexpr (Lanes == 4)
      for (int l = 0; l < Lanes; ++l) table_r[l] = kTable[r[l]];
  }
  const VecI result = bit_cast<VecI>(root_m * table_r) + (q << 23);
  return s > 0.0f ? bit_cast<VecF>(result) : VecF{};
}

// dot += f·query and squares += f·f for f = S^(1/p) of the sums S(i) of channels 0 .. n − 1, Lanes
// at a time (tenth_root for p = 10); returns the first channel not added (n rounded down to Lanes).
// Two vectors' roots are taken per step: each root is a long chain of dependent operations, and two
// independent chains overlap where one would stall. They are still added in channel order, so dot
// and squares are the same sums as one vector at a time.
template <int Lanes, bool Tenth, typename VectorSums>
CLUSTERMAC_ALWAYS_INLINE std::ptrdiff_t add_roots(VectorSums sums, const float* __restrict query, std::ptrdiff_t n,
                                                  float inverse_p, typename Vectors<Lanes>::F& dot,
                                                  typename Vectors<Lanes>::F& squares) {
  typedef typename Vectors<Lanes>::F VecF;
  auto root_of = [&](std::ptrdiff_t i) __attribute__((always_inline)) {
    return Tenth ? tenth_root<Lanes>(sums(i)) : root<Lanes>(sums(i), inverse_p);
  };
  auto add = [&](const VecF& f, std::ptrdiff_t i) __attribute__((always_inline)) {
    dot += f * load<VecF>(query + i);
    squares += f * f;
  };
  std::ptrdiff_t i = 0;
  for (; i + 2 * Lanes <= n; i += 2 * Lanes) {
    const VecF first = root_of(i), second = root_of(i + Lanes);
    add(first, i);
    add(second, i + Lanes);
  }
  for (; i + Lanes <= n; i += Lanes) add(root_of(i), i);
  return i;
}

// The cosine from the lane sums of add_roots over channels 0 .. first - 1, and the channels
// first .. n - 1 one by one (`sum(i)` gives channel i's sum).
template <int Lanes, typename ScalarSum>
CLUSTERMAC_ALWAYS_INLINE double finish_cosine(const typename Vectors<Lanes>::F& dot,
                                              const typename Vectors<Lanes>::F& squares, ScalarSum sum,
                                              const float* __restrict query, std::ptrdiff_t first, std::ptrdiff_t n,
                                              float inverse_p) {
  double total_dot = 0.0, total_squares = 0.0;
  for (int l = 0; l < Lanes; ++l) {
    total_dot += dot[l];
    total_squares += squares[l];
  }
  for (std::ptrdiff_t i = first; i < n; ++i) {
    const double s = sum(i);
    const double f = s > 0.0 ? std::pow(s, static_cast<double>(inverse_p)) : 0.0;
    total_dot += f * query[i];
    total_squares += f * f;
  }
  return total_squares > 0.0 ? total_dot / std::sqrt(total_squares) : 0.0;
}

// Cosine between the unit query and f = S^(1/p), S[i] = sums(i) for i = 0 .. n-1: `sums(i)`
// gives Lanes values from i on (a vector), `sum(i)` one value.
template <int Lanes, typename VectorSums, typename ScalarSum>
CLUSTERMAC_ALWAYS_INLINE double cosine_of_roots(VectorSums sums, ScalarSum sum, const float* __restrict query,
                                                std::ptrdiff_t n, float inverse_p) {
  typedef typename Vectors<Lanes>::F VecF;
  VecF dot{}, squares{};
  const std::ptrdiff_t i = inverse_p == 0.1f ? add_roots<Lanes, true>(sums, query, n, inverse_p, dot, squares)
                                             : add_roots<Lanes, false>(sums, query, n, inverse_p, dot, squares);
  return finish_cosine<Lanes>(dot, squares, sum, query, i, n, inverse_p);
}

// The cosine of a box whose sums are given in float.
template <int Lanes>
CLUSTERMAC_ALWAYS_INLINE double box_cosine(const float* __restrict sums, const float* __restrict query,
                                           std::ptrdiff_t n, float inverse_p) {
  typedef typename Vectors<Lanes>::F VecF;
  return cosine_of_roots<Lanes>([&](std::ptrdiff_t i) { return load<VecF>(sums + i); },
                                [&](std::ptrdiff_t i) { return static_cast<double>(sums[i]); }, query, n, inverse_p);
}

// The cosine of a box whose sums are a - b, in double.
template <int Lanes>
CLUSTERMAC_ALWAYS_INLINE double box_cosine(const double* __restrict a, const double* __restrict b,
                                           const float* __restrict query, std::ptrdiff_t n, float inverse_p) {
  typedef typename Vectors<Lanes>::F VecF;
  typedef typename Vectors<Lanes>::D VecD;
  return cosine_of_roots<Lanes>(
      [&](std::ptrdiff_t i) { return __builtin_convertvector(load<VecD>(a + i) - load<VecD>(b + i), VecF); },
      [&](std::ptrdiff_t i) { return static_cast<double>(static_cast<float>(a[i] - b[i])); }, query, n, inverse_p);
}

template <int Lanes>
CLUSTERMAC_ALWAYS_INLINE void add_into(float* __restrict acc, const float* __restrict values, std::ptrdiff_t n) {
  typedef typename Vectors<Lanes>::F VecF;
  std::ptrdiff_t i = 0;
  for (; i + Lanes <= n; i += Lanes) store(acc + i, load<VecF>(acc + i) + load<VecF>(values + i));
  for (; i < n; ++i) acc[i] += values[i];
}

// The floats of v as doubles. Inside target("avx2") code GCC 12 turns __builtin_convertvector from
// 4 floats to 4 doubles into two 128-bit conversions and an insert; the 256-bit level (Lanes == 8,
// code that runs only on CPUs with AVX2) uses the one 256-bit instruction. Same values.
template <int Lanes, typename VecF>
CLUSTERMAC_ALWAYS_INLINE auto widen_to_double(VecF v) {
  typedef typename Vectors<static_cast<int>(sizeof(VecF) / sizeof(float))>::D VecD;
#ifdef CLUSTERMAC_SIMD_X86
  if constexpr (Lanes == 8 && sizeof(VecF) == 4 * sizeof(float)) {
    VecD out;
    asm("vcvtps2pd %1, %0" : "=x"(out) : "x"(v));
    return out;
  }
#endif
  return __builtin_convertvector(v, VecD);
}

// One pass over a band of `count` blocks of D channels: band[k·D + d] += row[k·D + d] (float), and
// prefix[(k + 1)·D + d] = prefix[k·D + d] + band[k·D + d] in double, prefix[d] = 0.
template <int Lanes>
CLUSTERMAC_ALWAYS_INLINE void add_row_and_prefix_sums(float* __restrict band, const float* __restrict row,
                                                      std::ptrdiff_t count, std::ptrdiff_t channels,
                                                      double* __restrict prefix) {
  // Half-width float vectors, so that their doubles fill one register (a double vector of two
  // registers goes through the stack): the same sums, element by element.
  constexpr int kWidth = Lanes >= 8 ? Lanes / 2 : Lanes;
  typedef typename Vectors<kWidth>::F VecF;
  typedef typename Vectors<kWidth>::D VecD;
  std::fill(prefix, prefix + channels, 0.0);
  for (std::ptrdiff_t k = 0; k < count; ++k) {
    float* __restrict b = band + k * channels;
    const float* __restrict r = row + k * channels;
    const double* __restrict before = prefix + k * channels;
    double* __restrict after = prefix + (k + 1) * channels;
    std::ptrdiff_t d = 0;
    if constexpr (Lanes == 8) {  // the 256-bit level: 8 floats per register, their doubles in two
      typedef typename Vectors<8>::F Vec8;
      for (; d + 8 <= channels; d += 8) {
        const Vec8 sum = load<Vec8>(b + d) + load<Vec8>(r + d);
        store(b + d, sum);
        store(after + d,
              load<VecD>(before + d) + widen_to_double<Lanes>(__builtin_shufflevector(sum, sum, 0, 1, 2, 3)));
        store(after + d + 4,
              load<VecD>(before + d + 4) + widen_to_double<Lanes>(__builtin_shufflevector(sum, sum, 4, 5, 6, 7)));
      }
    }
    for (; d + kWidth <= channels; d += kWidth) {
      const VecF sum = load<VecF>(b + d) + load<VecF>(r + d);
      store(b + d, sum);
      store(after + d, load<VecD>(before + d) + widen_to_double<Lanes>(sum));
    }
    for (; d < channels; ++d) {
      b[d] += r[d];
      after[d] = before[d] + static_cast<double>(b[d]);
    }
  }
}

// out = float(a - b), computed in double.
CLUSTERMAC_ALWAYS_INLINE void difference(const double* __restrict a, const double* __restrict b, std::ptrdiff_t n,
                                         float* __restrict out) {
  for (std::ptrdiff_t i = 0; i < n; ++i) out[i] = static_cast<float>(a[i] - b[i]);
}

// How the activations of a map are powered: a float map already powered, 8-bit codes to the
// 10th power by multiplication (Tolias' p), or 8-bit codes through a 256-entry table.
enum class Powering { floats, codes_power_ten, codes_table };

// Powered activations of a map, channel-last (H×W×D): either 8-bit codes (code^10 by
// multiplication for Tolias' p = 10, else (code/255)^p from a 256-entry table) or a float map
// already powered. Cells are addressed by the offset of their first channel, (y·W + x)·D.
struct PoweredCells {
  std::ptrdiff_t channels = 0, height = 0, width = 0;
  const std::uint8_t* codes = nullptr;
  const float* powered = nullptr;
  bool power_ten = false;
  std::array<float, 256> table{};

  Powering powering() const {
    return powered ? Powering::floats : power_ten ? Powering::codes_power_ten : Powering::codes_table;
  }
  std::ptrdiff_t offset(std::ptrdiff_t y, std::ptrdiff_t x) const { return (y * width + x) * channels; }
};

// The powered value at `index` (a cell's offset plus a channel).
template <Powering Mode>
CLUSTERMAC_ALWAYS_INLINE float powered_value(const PoweredCells& cells, std::ptrdiff_t index) {
  if constexpr (Mode == Powering::floats) {
    return cells.powered[index];
  } else if constexpr (Mode == Powering::codes_power_ten) {  // code^10 = ((c^2)^2)^2 · c^2 <= 1.2e24
    const float v = static_cast<float>(cells.codes[index]);
    const float v2 = v * v, v4 = v2 * v2, v8 = v4 * v4;
    return v8 * v2;
  } else {
    return cells.table[cells.codes[index]];
  }
}

// Lanes 8-bit codes from p on, as floats. GCC turns __builtin_convertvector from bytes into
// element-by-element code, so the 256- and 512-bit levels use the zero-extending conversion
// instructions directly (this code runs only on CPUs of that level).
template <int Lanes>
CLUSTERMAC_ALWAYS_INLINE typename Vectors<Lanes>::F codes_to_floats(const std::uint8_t* p) {
  typedef typename Vectors<Lanes>::F VecF;
  VecF v;
#ifdef CLUSTERMAC_SIMD_X86
  if constexpr (Lanes == 16) {
    asm("vpmovzxbd %1, %0\n\tvcvtdq2ps %0, %0" : "=v"(v) : "m"(*reinterpret_cast<const char (*)[16]>(p)));
    return v;
  } else if constexpr (Lanes == 8) {
    asm("vpmovzxbd %1, %0\n\tvcvtdq2ps %0, %0" : "=x"(v) : "m"(*reinterpret_cast<const char (*)[8]>(p)));
    return v;
  }
#endif
  for (int l = 0; l < Lanes; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}

// The Lanes powered values from `index` on, with the same arithmetic as powered_value.
template <int Lanes, Powering Mode>
CLUSTERMAC_ALWAYS_INLINE typename Vectors<Lanes>::F powered_values(const PoweredCells& cells, std::ptrdiff_t index) {
  typedef typename Vectors<Lanes>::F VecF;
  if constexpr (Mode == Powering::floats) {
    return load<VecF>(cells.powered + index);
  } else if constexpr (Mode == Powering::codes_power_ten) {
    const VecF v = codes_to_floats<Lanes>(cells.codes + index);
    const VecF v2 = v * v, v4 = v2 * v2, v8 = v4 * v4;
    VecF power = v8 * v2;
#ifdef CLUSTERMAC_SIMD_X86
    // The AVX-512 level is compiled without GCC's "fma" flag, so this sum was never fused with the
    // product (earlier versions summed in 256-bit registers, which cannot fuse without it); 512-bit
    // code would fuse it. Kept apart: the same sums, the same boxes and scores as before.
    if constexpr (Lanes == 16) asm("" : "+v"(power));
#endif
    return power;
  } else {
    VecF out;
    for (int l = 0; l < Lanes; ++l) out[l] = cells.table[cells.codes[index + l]];
    return out;
  }
}

// acc[d] += the powered value of channel d of the cell at `offset`, for every channel; with First,
// acc[d] = 0 + that value (the same sum as adding it to a zeroed acc, without reading acc).
template <int Lanes, Powering Mode, bool First = false>
CLUSTERMAC_ALWAYS_INLINE void add_cell(float* __restrict acc, const PoweredCells& cells, std::ptrdiff_t offset) {
  typedef typename Vectors<Lanes>::F VecF;
  const std::ptrdiff_t channels = cells.channels;
  if (Lanes == 16 && channels % Lanes != 0) {
    // A plain loop, which the compiler vectorises (and fuses) as in earlier versions: the same
    // sums for any D. (With D a multiple of 16, the 512-bit code below gives those sums too.)
    for (std::ptrdiff_t d = 0; d < channels; ++d)
      acc[d] = (First ? 0.0f : acc[d]) + powered_value<Mode>(cells, offset + d);
    return;
  }
  std::ptrdiff_t d = 0;
  for (; d + Lanes <= channels; d += Lanes)
    store(acc + d, (First ? VecF{} : load<VecF>(acc + d)) + powered_values<Lanes, Mode>(cells, offset + d));
  for (; d < channels; ++d) acc[d] = (First ? 0.0f : acc[d]) + powered_value<Mode>(cells, offset + d);
}

// Block sums: blocks[(by·blocks_x + bx)·D + d] = sum of channel d over the cells of block
// (bx, by), [xs[bx], xs[bx+1]) × [ys[by], ys[by+1]), added row by row, left to right (the map
// is read once, in its memory order).
template <int Lanes, Powering Mode>
CLUSTERMAC_ALWAYS_INLINE void block_sums(const PoweredCells& cells, const std::vector<std::ptrdiff_t>& xs,
                                         const std::vector<std::ptrdiff_t>& ys, float* __restrict blocks) {
  const std::ptrdiff_t channels = cells.channels;
  const std::ptrdiff_t blocks_x = static_cast<std::ptrdiff_t>(xs.size()) - 1;
  for (std::ptrdiff_t by = 0; by + 1 < static_cast<std::ptrdiff_t>(ys.size()); ++by)
    for (std::ptrdiff_t y = ys[by]; y < ys[by + 1]; ++y)
      for (std::ptrdiff_t bx = 0; bx < blocks_x; ++bx) {
        float* block = blocks + (by * blocks_x + bx) * channels;
        std::ptrdiff_t x = xs[bx];
        if (y == ys[by]) add_cell<Lanes, Mode, true>(block, cells, cells.offset(y, x++));  // the block's first cell
        for (; x < xs[bx + 1]; ++x) add_cell<Lanes, Mode>(block, cells, cells.offset(y, x));
      }
}

inline std::vector<std::ptrdiff_t> grid_positions(std::ptrdiff_t extent, int step) {
  std::vector<std::ptrdiff_t> positions;
  for (std::ptrdiff_t v = 0; v < extent; v += step) positions.push_back(v);
  positions.push_back(extent);
  return positions;
}

template <int Lanes, Powering Mode>
CLUSTERMAC_ALWAYS_INLINE AmlResult localize(const PoweredCells& cells, const float* unit_query,
                                            const AmlParams& params) {
  const std::ptrdiff_t channels = cells.channels, height = cells.height, width = cells.width;
  const float inverse_p = static_cast<float>(1.0 / params.p);
  const auto xs = grid_positions(width, params.step), ys = grid_positions(height, params.step);
  const std::ptrdiff_t blocks_x = static_cast<std::ptrdiff_t>(xs.size()) - 1,
                       blocks_y = static_cast<std::ptrdiff_t>(ys.size()) - 1;

  std::unique_ptr<float[]> blocks(new float[blocks_y * blocks_x * channels]);  // every value set by block_sums
  block_sums<Lanes, Mode>(cells, xs, ys, blocks.get());

  // Aspect constraint query_aspect/t <= w/h <= query_aspect·t, tested by multiplication.
  const bool constrained = params.query_aspect.has_value();
  const double query_aspect = params.query_aspect.value_or(0.0);
  const double widest = query_aspect * params.aspect_tolerance * (1.0 + 1e-12);
  const double narrowest = query_aspect / params.aspect_tolerance * (1.0 - 1e-12);
  auto too_narrow = [&](std::ptrdiff_t w, std::ptrdiff_t h) { return constrained && w < narrowest * h; };
  auto too_wide = [&](std::ptrdiff_t w, std::ptrdiff_t h) { return constrained && w > widest * h; };

  AmlResult best{{0, 0, static_cast<std::int32_t>(width), static_cast<std::int32_t>(height)}, -2.0};
  std::vector<float> best_sums(channels, 0.0f), band(blocks_x * channels), sums(channels);
  bool found = false;
  // Boxes [xs[i0], xs[i1]) × [ys[j0], ys[j1]). band[bx] = sum of blocks (bx, j0 .. j1 - 1), a
  // running sum over j1; prefix[i] = sum of band[0 .. i - 1] in double, and a box's sums are
  // prefix[i1] - prefix[i0]. A channel that is 0 in the box adds exact zeros to the prefix,
  // so its difference is exactly 0.
  std::vector<double> prefix((blocks_x + 1) * channels);
  auto aspect_ok = [&](std::ptrdiff_t w, std::ptrdiff_t h) { return !too_narrow(w, h) && !too_wide(w, h); };
  for (std::ptrdiff_t j0 = 0; j0 < blocks_y; ++j0) {
    std::fill(band.begin(), band.end(), 0.0f);
    for (std::ptrdiff_t j1 = j0 + 1; j1 <= blocks_y; ++j1) {
      const float* row = blocks.get() + (j1 - 1) * blocks_x * channels;
      const std::ptrdiff_t h = ys[j1] - ys[j0];
      bool any_box = false;  // a grid box of this band within the aspect tolerance
      for (std::ptrdiff_t i0 = 0; i0 < blocks_x && !any_box; ++i0)
        for (std::ptrdiff_t i1 = i0 + 1; i1 <= blocks_x && !any_box; ++i1) any_box = aspect_ok(xs[i1] - xs[i0], h);
      if (!any_box) {
        add_into<Lanes>(band.data(), row, blocks_x * channels);
        continue;
      }
      add_row_and_prefix_sums<Lanes>(band.data(), row, blocks_x, channels, prefix.data());
      for (std::ptrdiff_t i0 = 0; i0 < blocks_x; ++i0)
        for (std::ptrdiff_t i1 = i0 + 1; i1 <= blocks_x && !too_wide(xs[i1] - xs[i0], h); ++i1) {
          if (too_narrow(xs[i1] - xs[i0], h)) continue;
          const double* right = prefix.data() + i1 * channels;
          const double* left = prefix.data() + i0 * channels;
          const double s = box_cosine<Lanes>(right, left, unit_query, channels, inverse_p);
          if (s > best.score) {
            best = {{static_cast<std::int32_t>(xs[i0]), static_cast<std::int32_t>(ys[j0]),
                     static_cast<std::int32_t>(xs[i1]), static_cast<std::int32_t>(ys[j1])},
                    s};
            difference(right, left, channels, best_sums.data());
            found = true;
          }
        }
    }
  }
  if (!found) {  // no grid box meets the aspect constraint: start from the whole map
    std::fill(best_sums.begin(), best_sums.end(), 0.0f);
    for (std::ptrdiff_t k = 0; k < blocks_y * blocks_x; ++k)
      add_into<Lanes>(best_sums.data(), blocks.get() + k * channels, channels);
    best.score = box_cosine<Lanes>(best_sums.data(), unit_query, channels, inverse_p);
  }

  // Refinement: a move of one edge by delta adds (or removes) |delta| whole columns or rows of
  // the current box's extent; their sums, accumulated line by line, give every candidate.
  const int step = params.step;
  std::vector<float> strip(channels), candidate_sums(channels), best_candidate_sums(channels);
  for (int iteration = 0; iteration < params.refine_iterations; ++iteration) {
    AmlResult candidate = best;
    const std::array<std::int32_t, 4> box = best.box;
    for (int edge = 0; edge < 4; ++edge) {
      const bool vertical = edge == 0 || edge == 2;  // x0 or x1: moving it adds/removes columns
      for (int direction = -1; direction <= 1; direction += 2) {
        std::fill(strip.begin(), strip.end(), 0.0f);
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
              add_cell<Lanes, Mode>(strip.data(), cells, cells.offset(y, line));
          } else {
            for (std::int32_t x = box[0]; x < box[2]; ++x)
              add_cell<Lanes, Mode>(strip.data(), cells, cells.offset(line, x));
          }
          if (!aspect_ok(moved[2] - moved[0], moved[3] - moved[1])) continue;
          for (std::ptrdiff_t d = 0; d < channels; ++d)
            candidate_sums[d] = grows ? best_sums[d] + strip[d] : std::max(0.0f, best_sums[d] - strip[d]);
          const double s = box_cosine<Lanes>(candidate_sums.data(), unit_query, channels, inverse_p);
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

struct LocalizeKernel {
  static constexpr SimdLevel widest = kSimdAvx512;
  template <SimdLevel L>
  static CLUSTERMAC_ALWAYS_INLINE AmlResult run(const PoweredCells& cells, const float* unit_query,
                                                const AmlParams& params) {
    switch (cells.powering()) {
      case Powering::floats:
        return localize<lanes<L>(), Powering::floats>(cells, unit_query, params);
      case Powering::codes_power_ten:
        return localize<lanes<L>(), Powering::codes_power_ten>(cells, unit_query, params);
      default:
        return localize<lanes<L>(), Powering::codes_table>(cells, unit_query, params);
    }
  }
};

}  // namespace detail

namespace detail {

// The l2-normalised query; a zero or non-finite query is refused (no box can match it).
inline VectorF unit_query(const float* query, std::ptrdiff_t channels) {
  VectorF q = Eigen::Map<const VectorF>(query, channels);
  require(q.allFinite(), "query_vector contains NaN or Inf values; expected only finite numbers");
  require(l2_normalize_in_place(q.data(), q.size()),
          "query_vector is all zeros; expected the query's (non-zero) MAC vector");
  return q;
}

}  // namespace detail

// AML on a non-negative float map D×H×W (powered and transposed to channel-last here); `query`
// is the query's MAC vector (D values, normalised here).
inline AmlResult aml_localize(const float* map, std::ptrdiff_t channels, std::ptrdiff_t height, std::ptrdiff_t width,
                              const float* query, const AmlParams& params) {
  require(channels >= 1 && height >= 1 && width >= 1,
          "feature_map: expected a non-empty D×H×W array, got " + describe_array("float32", {channels, height, width}));
  check_aml_params(params);
  const VectorF unit_query = detail::unit_query(query, channels);
  const std::ptrdiff_t n = height * width;
  for (std::ptrdiff_t i = 0; i < channels * n; ++i) {
    if (!std::isfinite(map[i])) fail("feature_map contains NaN or Inf values; expected only finite numbers");
    if (map[i] < 0.0f) fail("feature_map has negative values; AML expects non-negative (post-ReLU) activations");
  }
  float largest = 0.0f;
  for (std::ptrdiff_t i = 0; i < channels * n; ++i) largest = std::max(largest, map[i]);
  std::vector<float> powered(channels * n, 0.0f);
  if (largest > 0.0f)
    for (std::ptrdiff_t d = 0; d < channels; ++d)
      for (std::ptrdiff_t i = 0; i < n; ++i)
        powered[i * channels + d] =
            static_cast<float>(std::pow(std::max(0.0, static_cast<double>(map[d * n + i]) / largest), params.p));
  detail::PoweredCells cells;
  cells.channels = channels;
  cells.height = height;
  cells.width = width;
  cells.powered = powered.data();
  return dispatch<detail::LocalizeKernel>(cells, unit_query.data(), params);
}

// AML on 8-bit codes stored channel-last, H×W×D (value = code·scale; the scale cancels in
// the cosine, so it is not needed).
inline AmlResult aml_localize_codes(const CodesView& codes, const float* query, const AmlParams& params) {
  detail::check_codes_not_empty(codes);
  check_aml_params(params);
  const VectorF unit_query = detail::unit_query(query, codes.channels);
  detail::PoweredCells cells;
  cells.channels = codes.channels;
  cells.height = codes.height;
  cells.width = codes.width;
  cells.codes = codes.data;
  cells.power_ten = params.p == 10.0;
  if (!cells.power_ten)
    for (int c = 0; c < 256; ++c) cells.table[c] = static_cast<float>(std::pow(c / 255.0, params.p));
  return dispatch<detail::LocalizeKernel>(cells, unit_query.data(), params);
}

}  // namespace clustermac
