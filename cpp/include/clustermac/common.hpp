// Shared types and small utilities of the clustermac core. No Python in here.
#pragma once

#include <Eigen/Dense>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace clustermac {

// Row-major float32 matrices: the layout NumPy hands us without a copy.
using MatrixRM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixRMd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using VectorF = Eigen::VectorXf;
using VectorD = Eigen::VectorXd;
using VectorI = Eigen::Matrix<std::int32_t, Eigen::Dynamic, 1>;
using ConstMatrixRef = Eigen::Ref<const MatrixRM>;
using ConstVectorRef = Eigen::Ref<const VectorF>;

// The vector instruction set the hand-vectorised kernels use, chosen once at run time (the
// package is built for portable x86-64; each kernel is also compiled for AVX2 and AVX-512):
// 2 = AVX-512F, 1 = AVX2 + FMA, 0 = the baseline. The environment variables
// CLUSTERMAC_NO_AVX512 (at most AVX2) and CLUSTERMAC_NO_AVX2 (baseline) cap it, so that the
// tests can check that every path gives the same results.
enum SimdLevel { kSimdBaseline = 0, kSimdAvx2 = 1, kSimdAvx512 = 2 };

inline SimdLevel simd_level() {
  static const SimdLevel level = [] {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
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

// Invalid arguments are std::invalid_argument (pybind11 turns it into ValueError).
[[noreturn]] inline void fail(const std::string& message) { throw std::invalid_argument(message); }

inline void require(bool condition, const std::string& message) {
  if (!condition) fail(message);
}

template <typename Derived>
inline bool all_finite(const Eigen::DenseBase<Derived>& m) {
  return m.derived().allFinite();
}

inline void require_finite(const ConstMatrixRef& m, const std::string& name) {
  if (!m.allFinite())
    fail(name + " contains NaN or Inf values; expected only finite numbers");
}

// Runs fn(i) for i in [0, n) on up to n_threads threads (n_threads <= 0: hardware
// concurrency). The first exception thrown by any task is rethrown on the caller's thread.
template <typename Fn>
void parallel_for(std::ptrdiff_t n, int n_threads, Fn&& fn) {
  if (n <= 0) return;
  int hw = static_cast<int>(std::thread::hardware_concurrency());
  if (n_threads <= 0) n_threads = hw > 0 ? hw : 1;
  n_threads = static_cast<int>(std::min<std::ptrdiff_t>(n_threads, n));
  if (n_threads == 1) {
    for (std::ptrdiff_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<std::ptrdiff_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&]() {
    for (;;) {
      std::ptrdiff_t i = next.fetch_add(1);
      if (i >= n) return;
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next.store(n);  // stop handing out work
      }
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(n_threads - 1);
  for (int t = 1; t < n_threads; ++t) threads.emplace_back(worker);
  worker();
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace clustermac
