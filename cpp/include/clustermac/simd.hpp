// The one SIMD vocabulary of the core: the instruction-set levels, the run-time choice among
// them, the target attributes, the vector types, and the dispatch of a kernel to its level.
//
// The package is built for portable x86-64; the hot kernels are compiled again for AVX2 + FMA
// and AVX-512F and one version is chosen at run time. Two ways to write a kernel:
//  - generic: a struct with `template <SimdLevel L> static R run(...)` (always inline), written
//    with the vector types Vectors<lanes<L>()>; dispatch<Kernel>(...) runs it compiled for the
//    active level (capped at Kernel::widest);
//  - intrinsics: functions marked CLUSTERMAC_TARGET_AVX2 (or _AVX512_BF16), called only when
//    simd_at_least(kSimdAvx2) (or simd_has_avx512_bf16()).
// CLUSTERMAC_NO_SIMD_DISPATCH (compile time) keeps every kernel at the baseline; the environment
// variables CLUSTERMAC_NO_AVX512 and CLUSTERMAC_NO_AVX2 cap the level at run time, so that the
// tests can check that every path gives the same results.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>

#if !defined(CLUSTERMAC_NO_SIMD_DISPATCH) && (defined(__GNUC__) || defined(__clang__)) && \
    (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define CLUSTERMAC_SIMD_X86 1
#endif

#define CLUSTERMAC_ALWAYS_INLINE inline __attribute__((always_inline))
#define CLUSTERMAC_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define CLUSTERMAC_TARGET_AVX512 __attribute__((target("avx512f")))
#define CLUSTERMAC_TARGET_AVX512_FMA __attribute__((target("avx512f,avx2,fma")))
#define CLUSTERMAC_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bf16,avx512vl")))

namespace clustermac {

// 2 = AVX-512F, 1 = AVX2 + FMA, 0 = the baseline.
enum SimdLevel { kSimdBaseline = 0, kSimdAvx2 = 1, kSimdAvx512 = 2 };

// The level the kernels use, chosen once per process: the CPU's, capped by the environment.
inline SimdLevel simd_level() {
  static const SimdLevel level = [] {
#ifdef CLUSTERMAC_SIMD_X86
    if (std::getenv("CLUSTERMAC_NO_AVX2")) return kSimdBaseline;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return kSimdBaseline;
    if (std::getenv("CLUSTERMAC_NO_AVX512") || !__builtin_cpu_supports("avx512f")) return kSimdAvx2;
    return kSimdAvx512;
#else
    return kSimdBaseline;
#endif
  }();
  return level;
}

inline const char* simd_level_name(SimdLevel level) {
  return level == kSimdAvx512 ? "avx512" : level == kSimdAvx2 ? "avx2" : "scalar";
}

inline bool simd_at_least(SimdLevel level) { return simd_level() >= level; }

// AVX512-BF16 and AVX512-VL on top of the AVX-512 level; CLUSTERMAC_NO_BF16 turns it off.
inline bool simd_has_avx512_bf16() {
  static const bool available = [] {
#ifdef CLUSTERMAC_SIMD_X86
    return simd_level() >= kSimdAvx512 && !std::getenv("CLUSTERMAC_NO_BF16") && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("avx512vl");
#else
    return false;
#endif
  }();
  return available;
}

namespace detail {

// GCC / Clang vector extensions (element-wise operators; unaligned element access).
typedef float Float4 __attribute__((vector_size(16), aligned(4)));
typedef float Float8 __attribute__((vector_size(32), aligned(4)));
typedef float Float16 __attribute__((vector_size(64), aligned(4)));
typedef std::int32_t Int4 __attribute__((vector_size(16), aligned(4)));
typedef std::int32_t Int8 __attribute__((vector_size(32), aligned(4)));
typedef std::int32_t Int16 __attribute__((vector_size(64), aligned(4)));
typedef double Double4 __attribute__((vector_size(32), aligned(8)));
typedef double Double8 __attribute__((vector_size(64), aligned(8)));
typedef double Double16 __attribute__((vector_size(128), aligned(8)));

// The vector types of one register width: Lanes floats, int32s and doubles.
template <int Lanes>
struct Vectors;
template <>
struct Vectors<4> {
  typedef Float4 F;
  typedef Int4 I;
  typedef Double4 D;
};
template <>
struct Vectors<8> {
  typedef Float8 F;
  typedef Int8 I;
  typedef Double8 D;
};
template <>
struct Vectors<16> {
  typedef Float16 F;
  typedef Int16 I;
  typedef Double16 D;
};

// Float lanes of a level's registers.
template <SimdLevel L>
constexpr int lanes() {
  return L == kSimdAvx512 ? 16 : L == kSimdAvx2 ? 8 : 4;
}

template <typename V, typename T>
CLUSTERMAC_ALWAYS_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
CLUSTERMAC_ALWAYS_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename To, typename From>
CLUSTERMAC_ALWAYS_INLINE To bit_cast(const From& v) {
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// Whether any lane of a comparison's result (lanes 0 or −1) is set: the lanes OR-ed into 4, then
// into one (a few instructions at every level, rather than a branch per lane).
template <typename IVec>
CLUSTERMAC_ALWAYS_INLINE bool any_lane(const IVec& mask) {
  constexpr int kLanes = static_cast<int>(sizeof(IVec) / sizeof(std::int32_t));
  Int4 any = load<Int4>(reinterpret_cast<const std::int32_t*>(&mask));
  for (int j = 4; j < kLanes; j += 4) any |= load<Int4>(reinterpret_cast<const std::int32_t*>(&mask) + j);
  return (any[0] | any[1]) | (any[2] | any[3]);
}

#ifdef CLUSTERMAC_SIMD_X86
// r[a] lane b <- r[b] lane a: the transpose of the 8 x 8 block held in r[0..7].
CLUSTERMAC_TARGET_AVX2 inline void transpose8x8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int q = 0; q < 4; ++q) {
    t[2 * q] = _mm256_unpacklo_ps(r[2 * q], r[2 * q + 1]);
    t[2 * q + 1] = _mm256_unpackhi_ps(r[2 * q], r[2 * q + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int q = 0; q < 4; ++q) {
    r[q] = _mm256_permute2f128_ps(u[q], u[q + 4], 0x20);
    r[q + 4] = _mm256_permute2f128_ps(u[q], u[q + 4], 0x31);
  }
}
#endif

// Kernel::run<L> compiled for level L (Kernel::run must be always inline).
#ifdef CLUSTERMAC_SIMD_X86
template <typename Kernel, typename... Args>
CLUSTERMAC_TARGET_AVX512 decltype(auto) run_avx512(Args&&... args) {
  return Kernel::template run<kSimdAvx512>(std::forward<Args>(args)...);
}
template <typename Kernel, typename... Args>
CLUSTERMAC_TARGET_AVX2 decltype(auto) run_avx2(Args&&... args) {
  return Kernel::template run<kSimdAvx2>(std::forward<Args>(args)...);
}
#endif
template <typename Kernel, typename... Args>
decltype(auto) run_baseline(Args&&... args) {
  return Kernel::template run<kSimdBaseline>(std::forward<Args>(args)...);
}

}  // namespace detail

// Whether a kernel's AVX-512 version runs faster than its AVX2 version on this CPU, measured rather
// than assumed from the CPU flag (some AVX-512 units are two 256-bit halves, some lower the clock):
// `run(level)` does a small representative piece of the kernel's work at that level; each level is
// timed 5 times, alternating, and the faster minimum wins. The two versions give the same bits, so
// the choice changes only the speed. Callers keep the answer in a function-local static (once per
// kernel and process, ~1 ms); false when the active level is below AVX-512 (CLUSTERMAC_NO_AVX512).
template <typename Run>
bool avx512_measured_faster(Run&& run) {
  if (!simd_at_least(kSimdAvx512)) return false;
  using Clock = std::chrono::steady_clock;
  double best_avx512 = std::numeric_limits<double>::infinity(), best_avx2 = best_avx512;
  for (int round = 0; round < 5; ++round) {
    const auto start = Clock::now();
    run(kSimdAvx512);
    const auto middle = Clock::now();
    run(kSimdAvx2);
    const auto end = Clock::now();
    best_avx512 = std::min(best_avx512, std::chrono::duration<double>(middle - start).count());
    best_avx2 = std::min(best_avx2, std::chrono::duration<double>(end - middle).count());
  }
  return best_avx512 < best_avx2;
}

// Runs Kernel::run<L>(args...) for L = the active level, at most Kernel::widest.
template <typename Kernel, typename... Args>
decltype(auto) dispatch(Args&&... args) {
#ifdef CLUSTERMAC_SIMD_X86
  const SimdLevel level = simd_level() < Kernel::widest ? simd_level() : Kernel::widest;
  if (level == kSimdAvx512) return detail::run_avx512<Kernel>(std::forward<Args>(args)...);
  if (level == kSimdAvx2) return detail::run_avx2<Kernel>(std::forward<Args>(args)...);
#endif
  return detail::run_baseline<Kernel>(std::forward<Args>(args)...);
}

}  // namespace clustermac
