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
#include <initializer_list>
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

// Invalid arguments are std::invalid_argument (pybind11 turns it into ValueError).
[[noreturn]] inline void fail(const std::string& message) { throw std::invalid_argument(message); }

inline void require(bool condition, const std::string& message) {
  if (!condition) fail(message);
}

// "array of dtype float32 and shape (2, 3)": how messages describe an argument.
inline std::string describe_array(const char* dtype, std::initializer_list<std::ptrdiff_t> shape) {
  std::string text = std::string("array of dtype ") + dtype + " and shape (";
  std::size_t i = 0;
  for (std::ptrdiff_t extent : shape) {
    text += std::to_string(extent);
    if (shape.size() == 1 || i + 1 < shape.size()) text += i + 1 < shape.size() ? ", " : ",";
    ++i;
  }
  return text + ")";
}

// A non-empty float32 array argument.
inline void require_non_empty(const char* name, const char* expected, std::initializer_list<std::ptrdiff_t> shape) {
  for (std::ptrdiff_t extent : shape)
    if (extent == 0)
      fail(std::string(name) + ": expected a non-empty array " + expected + ", got " +
           describe_array("float32", shape));
}

inline void require_finite(const ConstMatrixRef& m, const std::string& name) {
  if (!m.allFinite()) fail(name + " contains NaN or Inf values; expected only finite numbers");
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
