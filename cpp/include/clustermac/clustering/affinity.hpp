// Similarity matrix between locations, paper Eq. (2)-(3):
//   d_ij = sqrt( sum_k w_k (f_ik - f_jk)^2 ),  w_k = var_k / sum_m var_m          (2)
//   S_ij = (exp(-d_ij / z))^2 = exp(-2 d_ij / z),  z = z_ratio * max_ij d_ij      (3)
// All-equal features (max d = 0) give S = all ones: every pair is maximally similar, which is
// also the limit of Eq. (3) as the features approach each other.
#pragma once

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "clustermac/clustering/similarity_bf16.hpp"
#include "clustermac/common.hpp"
#include "clustermac/simd.hpp"

namespace clustermac {

namespace detail {
#ifdef CLUSTERMAC_SIMD_X86
// exp(x) for x <= 0 (clamped at -87, where it is ~1e-38): x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by its Taylor series to degree 7 (relative error < 1e-8 before float rounding).
CLUSTERMAC_TARGET_AVX2 inline __m256 exp_nonpositive_avx2(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2 split in two
  const __m256 rr = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// Squared distances from location i to locations j..j+7 (g is C x stride, dimension-major).
CLUSTERMAC_TARGET_AVX2 inline __m256 distance2_avx2(const float* g, Eigen::Index c, Eigen::Index stride, Eigen::Index i,
                                                    Eigen::Index j) {
  __m256 acc = _mm256_setzero_ps();
  for (Eigen::Index k = 0; k < c; ++k) {
    const __m256 diff = _mm256_sub_ps(_mm256_loadu_ps(g + k * stride + j), _mm256_set1_ps(g[k * stride + i]));
    acc = _mm256_fmadd_ps(diff, diff, acc);
  }
  return acc;
}

// g is C x stride with stride a multiple of 8 and columns [n, stride) copies of column n - 1.
CLUSTERMAC_TARGET_AVX2 inline float max_distance2_avx2(const float* g, Eigen::Index c, Eigen::Index n,
                                                       Eigen::Index stride) {
  __m256 best = _mm256_setzero_ps();
  for (Eigen::Index i = 0; i < n; ++i)
    for (Eigen::Index j = i / 8 * 8; j < stride; j += 8) best = _mm256_max_ps(best, distance2_avx2(g, c, stride, i, j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, best);
  return *std::max_element(lanes, lanes + 8);
}

// exp(scale * d) for the distances from location i to locations j..j+7.
CLUSTERMAC_TARGET_AVX2 inline __m256 similarity8_avx2(const float* g, Eigen::Index c, Eigen::Index stride,
                                                      Eigen::Index i, Eigen::Index j, __m256 scale8) {
  return exp_nonpositive_avx2(_mm256_mul_ps(_mm256_sqrt_ps(distance2_avx2(g, c, stride, i, j)), scale8));
}

// The 16-lane versions for AVX-512 CPUs: every lane does exactly the operations of the 8-lane
// functions above (the same rounding, multiply-adds and polynomial), so the values are the same bits.
CLUSTERMAC_TARGET_AVX512 inline __m512 exp_nonpositive_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  const __m512 rr = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// Squared distances from location i to locations j..j+15, only the lanes in `lanes` loaded (the rest 0).
CLUSTERMAC_TARGET_AVX512 inline __m512 distance2_avx512(const float* g, Eigen::Index c, Eigen::Index stride,
                                                        Eigen::Index i, Eigen::Index j, __mmask16 lanes) {
  __m512 acc = _mm512_setzero_ps();
  for (Eigen::Index k = 0; k < c; ++k) {
    const __m512 diff =
        _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, g + k * stride + j), _mm512_set1_ps(g[k * stride + i]));
    acc = _mm512_fmadd_ps(diff, diff, acc);
  }
  return acc;
}

// The lanes of a 16-column step that lie before `stride` (a multiple of 8): all 16, or the first 8.
inline __mmask16 lanes_before(Eigen::Index j, Eigen::Index stride) {
  return j + 16 <= stride ? __mmask16(0xFFFF) : __mmask16(0x00FF);
}

// max_distance2_avx2 16 columns at a time (a maximum: the same value in any order).
CLUSTERMAC_TARGET_AVX512 inline float max_distance2_avx512(const float* g, Eigen::Index c, Eigen::Index n,
                                                           Eigen::Index stride) {
  __m512 best = _mm512_setzero_ps();
  for (Eigen::Index i = 0; i < n; ++i)
    for (Eigen::Index j = i / 8 * 8; j < stride; j += 16) {
      const __mmask16 lanes = lanes_before(j, stride);
      best = _mm512_mask_max_ps(best, lanes, best, distance2_avx512(g, c, stride, i, j, lanes));
    }
  return _mm512_reduce_max_ps(best);
}

// Row i of Eq. (3) at columns [begin, stride): values[j - begin] = exp(scale * d_ij), 16 at a time.
CLUSTERMAC_TARGET_AVX512 inline void similarity_row_avx512(const float* g, Eigen::Index c, Eigen::Index stride,
                                                           Eigen::Index i, Eigen::Index begin, float scale,
                                                           float* values) {
  const __m512 scale16 = _mm512_set1_ps(scale);
  for (Eigen::Index j = begin; j < stride; j += 16) {
    const __mmask16 lanes = lanes_before(j, stride);
    const __m512 d = _mm512_sqrt_ps(distance2_avx512(g, c, stride, i, j, lanes));
    _mm512_mask_storeu_ps(values + j - begin, lanes, exp_nonpositive_avx512(_mm512_mul_ps(d, scale16)));
  }
}

// Row i of Eq. (3) at columns [begin, stride) with 8-lane vectors.
CLUSTERMAC_TARGET_AVX2 inline void similarity_row_avx2(const float* g, Eigen::Index c, Eigen::Index stride,
                                                       Eigen::Index i, Eigen::Index begin, float scale, float* values) {
  const __m256 scale8 = _mm256_set1_ps(scale);
  for (Eigen::Index j = begin; j < stride; j += 8)
    _mm256_storeu_ps(values + j - begin, similarity8_avx2(g, c, stride, i, j, scale8));
}

// Whether the 16-lane affinity kernels are faster than the 8-lane ones on this CPU
// (avx512_measured_faster on 32 rows of a 1024-location, 7-dimensional map; once per process).
inline bool affinity_uses_avx512() {
  static const bool faster = [] {
    constexpr Eigen::Index c = 7, stride = 1024, rows = 32;
    std::vector<float> g(c * stride), values(stride);
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = static_cast<float>((i * 7919) % 1009) * 1e-3f;
    return avx512_measured_faster([&](SimdLevel level) {
      for (Eigen::Index i = 0; i < rows; ++i) {
        if (level == kSimdAvx512)
          similarity_row_avx512(g.data(), c, stride, i, 0, -4.0f, values.data());
        else
          similarity_row_avx2(g.data(), c, stride, i, 0, -4.0f, values.data());
      }
    });
  }();
  return faster;
}

// Writes 8 floats at p: non-temporal (16-byte aligned halves) when `stream`, else ordinary.
CLUSTERMAC_TARGET_AVX2 inline void store8(float* p, __m256 value, bool stream) {
  if (stream) {
    _mm_stream_ps(p, _mm256_castps256_ps128(value));
    _mm_stream_ps(p + 4, _mm256_extractf128_ps(value, 1));
  } else {
    _mm256_storeu_ps(p, value);
  }
}

// Writes 8 values at p rounded to bf16 (16 bytes; non-temporal when `stream`).
CLUSTERMAC_TARGET_AVX2 inline void store8(std::uint16_t* p, __m256 value, bool stream) {
  const __m128i halves = bf16_from_floats_avx2(value);
  if (stream)
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), halves);
  else
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), halves);
}

inline void store_values(float* out, const float* values, Eigen::Index count) {
  std::copy(values, values + count, out);
}
inline void store_values(std::uint16_t* out, const float* values, Eigen::Index count) {
  for (Eigen::Index i = 0; i < count; ++i) out[i] = bf16_from_float(values[i]);
}

// All of Eq. (3): out[i * n + j] = exp(scale * d_ij), in panels of rows. A panel's
// values on and right of the diagonal are computed into a cached scratch buffer, copied to
// its rows, and copied transposed (8 x 8 register transposes) into the
// columns of the rows below it, in runs of a panel's height: half the square roots and
// exponentials of a row-by-row sweep, and every write a long sequential run. The mirror is
// exact: d_ij and d_ji are the same float operations on the same values ((a - b)^2 == (b - a)^2),
// so the matrix is bit-identical to a row-by-row sweep.
// `out` holds floats or bf16 values (std::uint16_t), its rows ldo values apart.
template <typename T>
CLUSTERMAC_TARGET_AVX2 inline void similarity_avx2(const float* g, Eigen::Index c, Eigen::Index n, Eigen::Index stride,
                                                   float scale, T* out, Eigen::Index ldo) {
  using Eigen::Index;
  const bool avx512 = affinity_uses_avx512();
  // A matrix far larger than the caches is written with non-temporal stores (16-byte aligned
  // pieces): ordinary stores first read every line they write.
  const bool stream = n * ldo * sizeof(T) >= (std::size_t{16} << 20) && (ldo * sizeof(T)) % 16 == 0 &&
                      reinterpret_cast<std::uintptr_t>(out) % 16 == 0;
  // Panel height: long mirrored runs pay off when the matrix streams to memory; a smaller panel
  // stays in L2 otherwise (chosen with benchmarks/bench_clustering.cpp).
  constexpr Index kMaxPanel = 128;
  const Index panel_rows = stream ? kMaxPanel : 32;
  std::vector<float> panel(static_cast<std::size_t>(panel_rows * stride));
  for (Index ib = 0; ib < n; ib += panel_rows) {
    const Index rows = std::min(panel_rows, n - ib), cols = stride - ib;  // columns ib .. stride - 1
    for (Index a = 0; a < rows; ++a) {
      float* values = panel.data() + a * cols;
      if (avx512)
        similarity_row_avx512(g, c, stride, ib + a, ib, scale, values);
      else
        similarity_row_avx2(g, c, stride, ib + a, ib, scale, values);
      T* row = out + (ib + a) * ldo + ib;
      Index j = 0;
      for (; j + 8 <= n - ib; j += 8) store8(row + j, _mm256_loadu_ps(values + j), stream);
      store_values(row + j, values + j, n - ib - j);
    }
    // Below the panel (only when it is a whole panel_rows rows, so blocks of 8 rows fit): row jb + b,
    // columns ib + ab .. ib + ab + 7 are the panel's rows ab .. ab + 7 at column jb + b.
    for (Index jb = ib + rows; jb < n; jb += 8) {
      alignas(32) float mirrored[8][kMaxPanel];  // rows jb .. jb + 7, columns ib .. ib + rows - 1
      for (Index ab = 0; ab < rows; ab += 8) {
        __m256 block[8];
        for (int q = 0; q < 8; ++q) block[q] = _mm256_loadu_ps(panel.data() + (ab + q) * cols + (jb - ib));
        transpose8x8(block);
        for (int b = 0; b < 8; ++b) _mm256_store_ps(mirrored[b] + ab, block[b]);
      }
      for (Index b = 0; b < 8 && jb + b < n; ++b)
        for (Index ab = 0; ab < rows; ab += 8)
          store8(out + (jb + b) * ldo + ib + ab, _mm256_load_ps(mirrored[b] + ab), stream);
    }
  }
  if (stream) _mm_sfence();
}
#endif
}  // namespace detail

// w_k = var_k / sum var (Eq. 2) from the columns of `features`. All-zero variance -> equal weights
// (they are irrelevant then: every distance is 0).
inline VectorF variance_weights(const ConstMatrixRef& features) {
  const Eigen::Index c = features.cols();
  Eigen::MatrixXd centred = features.cast<double>();
  centred.rowwise() -= centred.colwise().mean();
  Eigen::VectorXd variance = centred.colwise().squaredNorm().transpose();
  const double total = variance.sum();
  if (!(total > 0.0)) return VectorF::Constant(c, 1.0f / static_cast<float>(c));
  return (variance / total).cast<float>();
}

namespace detail {

// Largest squared distance between columns of g (C x N, dimension-major so each inner loop is
// one vectorised sweep over a row of g).
inline float scaled_columns_max_distance2(
    const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>& g) {
  const Eigen::Index c = g.rows(), n = g.cols();
  float best = 0.0f;
  Eigen::ArrayXf d2(n);
  for (Eigen::Index i = 0; i < n; ++i) {
    const Eigen::Index len = n - i;
    auto acc = d2.head(len);
    acc.setZero();
    for (Eigen::Index k = 0; k < c; ++k) {
      auto row = g.row(k).segment(i, len).array();
      acc += (row - g(k, i)).square();
    }
    best = std::max(best, acc.maxCoeff());
  }
  return best;
}

}  // namespace detail

namespace detail {

// What the kernels of Eq. (3) need: g(k, j) = sqrt(w_k) * (f_jk - mean_k), dimension-major so
// rows of g are contiguous, with `stride` >= N columns (for the AVX2 kernels a whole number of
// 8-lane vectors, the extra columns copies of the last location); and the exponent's scale
// -2 / (z_ratio * max d), 0 when every distance is 0 (S = all ones).
struct SimilarityInputs {
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> g;
  Eigen::Index stride = 0;
  float scale = 0.0f;
};

inline SimilarityInputs similarity_inputs(const ConstMatrixRef& features, const VectorF& weights, float z_ratio,
                                          bool vector_padding) {
  using Eigen::Index;
  const Index n = features.rows(), c = features.cols();
  SimilarityInputs in;
  in.stride = vector_padding ? (n + 7) / 8 * 8 : n;
  in.g.resize(c, in.stride);
  const Eigen::RowVectorXf mean = features.cast<double>().colwise().mean().cast<float>();
  for (Index k = 0; k < c; ++k) {
    const float root_weight = std::sqrt(weights(k));
    in.g.row(k).head(n) = (features.col(k).transpose().array() - mean(k)) * root_weight;
    for (Index j = n; j < in.stride; ++j) in.g(k, j) = in.g(k, n - 1);
  }
  float max_distance2 = 0.0f;
#ifdef CLUSTERMAC_SIMD_X86
  if (vector_padding)
    max_distance2 = affinity_uses_avx512() ? max_distance2_avx512(in.g.data(), c, n, in.stride)
                                           : max_distance2_avx2(in.g.data(), c, n, in.stride);
#endif
  if (!vector_padding) max_distance2 = scaled_columns_max_distance2(in.g);
  const float max_distance = std::sqrt(max_distance2);
  // exp(-2 d / z) with z = z_ratio * max d (Eq. 3).
  in.scale = max_distance > 0.0f ? -2.0f / (z_ratio * max_distance) : 0.0f;
  return in;
}

}  // namespace detail

// The smallest z_ratio accepted. S_ij = exp(-2 t / z_ratio) for a pair at t = d_ij / max d; below
// 1e-8 it underflows float32 (exp(-87.3) = 1.18e-38, the smallest normal float) for every pair
// with t > 43.7 · z_ratio = 4.4e-7, i.e. for all but locations equal to about float32's relative
// precision (2^-24 = 6e-8): the matrix would be underflow noise (at 1e-40 even its diagonal).
constexpr float kMinZRatio = 1e-8f;

inline void require_z_ratio(float z_ratio) {
  require(std::isfinite(z_ratio) && z_ratio > 0.0f,
          "z_ratio: expected a finite number > 0, got " + std::to_string(z_ratio));
  require(z_ratio >= kMinZRatio,
          "z_ratio: " + format_number(z_ratio) +
              " is too small (the limit is 1e-8): z = z_ratio · max d makes exp(-2 d / z) underflow float32 "
              "(below 1.18e-38) for every pair of locations farther apart than 43.7 · z_ratio · max d, so "
              "the similarity would be underflow noise; the paper uses 0.05");
}

// Fills the N x N row-major buffer `out` with S of Eq. (3) for `features` (N x C) and weights
// `weights` (C, non-negative). Portable path: the upper triangle, then mirrored.
inline void affinity_into(const ConstMatrixRef& features, const VectorF& weights, float z_ratio, float* out) {
  using Eigen::Index;
  const Index n = features.rows(), c = features.cols();
#ifdef CLUSTERMAC_SIMD_X86
  if (simd_at_least(kSimdAvx2)) {
    const detail::SimilarityInputs in = detail::similarity_inputs(features, weights, z_ratio, true);
    detail::similarity_avx2(in.g.data(), c, n, in.stride, in.scale, out, n);
    return;
  }
#endif
  const detail::SimilarityInputs in = detail::similarity_inputs(features, weights, z_ratio, false);
  for (Index i = 0; i < n; ++i) {
    const Index len = n - i;
    Eigen::Map<Eigen::ArrayXf> row(out + i * n + i, len);
    row.setZero();
    for (Index k = 0; k < c; ++k) {
      auto grow = in.g.row(k).segment(i, len).array();
      row += (grow - in.g(k, i)).square();
    }
    row = (row.sqrt() * in.scale).exp();
  }
  // Mirror the upper triangle in cache-sized tiles.
  constexpr Index tile = 64;
  for (Index ib = 0; ib < n; ib += tile)
    for (Index jb = 0; jb <= ib; jb += tile) {
      const Index i_end = std::min(ib + tile, n), j_end = std::min(jb + tile, n);
      for (Index i = ib; i < i_end; ++i)
        for (Index j = jb; j < std::min(j_end, i); ++j) out[i * n + j] = out[j * n + i];
    }
}

// S of Eq. (3) in bfloat16 (see similarity_bf16.hpp), for CPUs with AVX2 (the caller checks
// simd_has_avx512_bf16(), which implies it).
inline void affinity_into(const ConstMatrixRef& features, const VectorF& weights, float z_ratio, SimilarityBf16& out) {
  out.resize(features.rows());
#ifdef CLUSTERMAC_SIMD_X86
  require(simd_at_least(kSimdAvx2), "bf16 similarity: the CPU lacks AVX2");
  const detail::SimilarityInputs in = detail::similarity_inputs(features, weights, z_ratio, true);
  detail::similarity_avx2(in.g.data(), features.cols(), out.n, in.stride, in.scale, out.values.data(), out.ld);
#else
  (void)weights;
  (void)z_ratio;
  fail("bf16 similarity: needs an x86-64 CPU with AVX2");
#endif
}

inline MatrixRM affinity(const ConstMatrixRef& features, float z_ratio, const VectorF* weights) {
  require_non_empty("features", "of shape (N, C)", {features.rows(), features.cols()});
  require_locations(features.rows(), "features");
  require_finite(features, "features");
  require_z_ratio(z_ratio);
  VectorF w;
  if (weights) {
    require(weights->size() == features.cols(), "weights: expected " + std::to_string(features.cols()) +
                                                    " values (one per feature column), got " +
                                                    std::to_string(weights->size()));
    require(weights->allFinite() && weights->minCoeff() >= 0.0f, "weights: expected finite non-negative values");
    w = *weights;
  } else {
    w = variance_weights(features);
  }
  MatrixRM s(features.rows(), features.rows());
  affinity_into(features, w, z_ratio, s.data());
  return s;
}

}  // namespace clustermac
