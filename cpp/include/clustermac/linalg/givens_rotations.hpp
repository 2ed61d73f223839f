// Givens rotations of float column pairs in SIMD registers, for Eigen's symmetric eigensolver.
//
// Eigen 3.4's SelfAdjointEigenSolver<MatrixXf> accumulates its eigenvectors by applying one
// plane rotation per QR-step position to two columns of Q, and for this Map-based call it picks
// its non-vectorised path: one float at a time, the hottest loop of the Rayleigh-Ritz step of the
// NCut eigensolver (a 144 x 144 matrix for 20 clusters; perf, N = 768). Eigen lets a user
// specialise its internal selector; the specialisation below keeps Eigen's arithmetic exactly,
//   x' = c x + s y,   y' = (-s) x + c y,
// a product, a product, a sum, each rounded to float (no fused multiply-add), and only does it
// 8 columns' entries at a time. Every result is therefore bit for bit Eigen's own, so the
// partitions and descriptors do not change (tests/core/test_givens_rotations.py).
//
// Two guards keep that promise:
//  - the products go through an empty asm statement before the sum, so that the compiler cannot
//    fuse them into an FMA inside the AVX2 (+ FMA) function;
//  - the specialisation exists only when the build's baseline has no FMA (the portable x86-64
//    build): with -march=native Eigen's own scalar code may be contracted, and it is then left as is.
// It must be visible before Eigen instantiates the selector, so common.hpp includes this header
// right after <Eigen/Dense>.
#pragma once

#include <Eigen/Dense>

#include "clustermac/simd.hpp"

#if defined(CLUSTERMAC_SIMD_X86) && !defined(__FMA__) && EIGEN_VERSION_AT_LEAST(3, 4, 0) && \
    !EIGEN_VERSION_AT_LEAST(3, 4, 90)
#define CLUSTERMAC_VECTOR_GIVENS 1
#endif

namespace clustermac {
namespace detail {

// x[i], y[i] <- c x[i] + s y[i], (-s) x[i] + c y[i] for i < size, both arrays contiguous.
struct RotateColumnPair {
  // AVX2 at most: columns of ~150 floats gain little from wider registers, and no AVX-512 kernel is
  // picked here from the CPU flag alone.
  static constexpr SimdLevel widest = kSimdAvx2;

  template <typename V>
  CLUSTERMAC_ALWAYS_INLINE static V rounded(V v) {
#ifdef CLUSTERMAC_SIMD_X86
    __asm__("" : "+v"(v));  // the product is rounded to float here: no fused multiply-add
#endif
    return v;
  }

  template <SimdLevel L>
  CLUSTERMAC_ALWAYS_INLINE static Eigen::Index run(float* x, float* y, Eigen::Index size, float c, float s) {
    using F = typename Vectors<lanes<L>()>::F;
    constexpr int W = lanes<L>();
    const F vc = F{} + c, vs = F{} + s, vminus_s = F{} - s;
    Eigen::Index i = 0;
    for (; i + W <= size; i += W) {
      const F xi = load<F>(x + i), yi = load<F>(y + i);
      store(x + i, rounded(vc * xi) + rounded(vs * yi));
      store(y + i, rounded(vminus_s * xi) + rounded(vc * yi));
    }
    return i;  // the remaining entries are left to the caller
  }
};

// The whole pair: full registers by the kernel, the rest as Eigen's scalar loop writes it.
inline void rotate_column_pair(float* x, Eigen::Index incrx, float* y, Eigen::Index incry, Eigen::Index size, float c,
                               float s) {
  Eigen::Index done = 0;
  if (incrx == 1 && incry == 1) done = dispatch<RotateColumnPair>(x, y, size, c, s);
  for (Eigen::Index i = done; i < size; ++i) {
    const float xi = x[i * incrx], yi = y[i * incry];
    x[i * incrx] = c * xi + s * yi;
    y[i * incry] = -s * xi + c * yi;
  }
}

}  // namespace detail
}  // namespace clustermac

#ifdef CLUSTERMAC_VECTOR_GIVENS
namespace Eigen {
namespace internal {

// The selector Eigen 3.4 uses for float rotations of dynamic-size, unaligned column pairs (the
// eigenvector update of SelfAdjointEigenSolver<MatrixXf>).
template <>
struct apply_rotation_in_the_plane_selector<float, float, Dynamic, 0, false> {
  static void run(float* x, Index incrx, float* y, Index incry, Index size, float c, float s) {
    clustermac::detail::rotate_column_pair(x, incrx, y, incry, size, c, s);
  }
};

}  // namespace internal
}  // namespace Eigen
#endif
