// Shared types and small utilities of the clustermac core. No Python in here.
#pragma once

#include <Eigen/Dense>

// Before any use of Eigen's solvers: vectorised float Givens rotations with Eigen's own arithmetic.
#include "clustermac/linalg/givens_rotations.hpp"

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
#include <system_error>
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

// A number for a message: "%g"-style (1e-40, 0.05, 3.4e+38), so that tiny or huge values do not
// print as "0.000000" the way std::to_string does.
inline std::string format_number(double value) {
  std::ostringstream text;
  text << value;
  return text.str();
}

// a * b for non-negative sizes, or fail(what + ...) when the product does not fit in 64 bits.
inline std::int64_t checked_multiply(std::int64_t a, std::int64_t b, const std::string& what) {
  std::int64_t product = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &product))
    fail(what + ": the size " + std::to_string(a) + " × " + std::to_string(b) + " does not fit in 64 bits");
  return product;
}

// The most locations (N = H·W) per map that the clustering functions (affinity, NCut,
// cluster_feature_map) accept: their N×N float32 similarity needs 16 GiB at N = 65,536.
constexpr std::int64_t kMaxLocations = 65536;

// Refuses more than kMaxLocations locations; `what` names the argument ("features: N = ...").
inline void require_locations(std::int64_t n, const std::string& what) {
  if (n <= kMaxLocations) return;
  const double gib = static_cast<double>(n) * static_cast<double>(n) * 4.0 / double(std::int64_t{1} << 30);
  std::ostringstream text;
  text.precision(3);
  text << what << ": N = " << n << " locations is more than the limit of " << kMaxLocations
       << " per map (its N×N float32 similarity would need " << gib
       << " GiB); use a smaller feature map (fewer H×W cells)";
  fail(text.str());
}

// The most threads any function of the core runs: the hardware concurrency
// (std::thread::hardware_concurrency(), the number of online CPUs; 1 if unknown). More threads
// than cores cannot make a CPU-bound loop faster, and each one costs a stack and per-thread
// buffers.
inline int max_threads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(std::min<unsigned>(hw, 1u << 16)) : 1;
}

// The number of threads used for a request of n_threads: <= 0 means max_threads(), anything
// larger is capped at it. Takes 64 bits so that any Python int the bindings pass is capped, not
// refused.
inline int effective_threads(std::int64_t n_threads) {
  const int cap = max_threads();
  return n_threads <= 0 ? cap : static_cast<int>(std::min<std::int64_t>(n_threads, cap));
}

// Raised (as std::runtime_error, a Python RuntimeError) when the operating system refuses to
// start a worker thread (std::system_error: a limit on processes, threads or memory).
class ThreadStartError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Runs fn(i) for i in [0, n) on up to effective_threads(n_threads) threads (n_threads <= 0: all
// hardware threads; more than that is capped). The first exception thrown by any task is
// rethrown on the caller's thread. If a thread cannot be started, the threads already started
// stop taking work and are joined, and ThreadStartError is thrown: never std::terminate.
// Which thread runs which i never changes a result: each fn(i) must write only its own outputs.
template <typename Fn>
void parallel_for(std::ptrdiff_t n, std::int64_t n_threads, Fn&& fn) {
  if (n <= 0) return;
  const int threads_wanted = static_cast<int>(std::min<std::ptrdiff_t>(effective_threads(n_threads), n));
  if (threads_wanted == 1) {
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
  threads.reserve(threads_wanted - 1);
  for (int t = 1; t < threads_wanted; ++t) {
    try {
      threads.emplace_back(worker);
    } catch (...) {
      next.store(n);  // the threads already running finish their current task and stop
      for (auto& started : threads) started.join();
      try {
        throw;
      } catch (const std::system_error& e) {
        throw ThreadStartError("could not start worker thread " + std::to_string(t) + " of " +
                               std::to_string(threads_wanted - 1) + " (" + e.what() +
                               "): the system's limit on threads, processes or memory is reached; free "
                               "resources or pass n_threads=1 to run on the calling thread only");
      }
    }
  }
  worker();
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace clustermac
