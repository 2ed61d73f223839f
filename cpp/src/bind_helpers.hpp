// Argument checking and zero-copy conversion shared by the binding files.
// Everything here only converts; the method lives in cpp/include/clustermac.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "clustermac/common.hpp"

namespace clustermac::bind {

namespace py = pybind11;

inline std::string describe(const py::array& a) {
  std::string shape = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    shape += std::to_string(a.shape(i));
    if (a.ndim() == 1 || i + 1 < a.ndim()) shape += i + 1 < a.ndim() ? ", " : ",";
  }
  shape += ")";
  return "array of dtype " + std::string(py::str(a.dtype())) + " and shape " + shape;
}

// Checks that `obj` is a C-contiguous NumPy array of dtype T with `ndim` dimensions and
// returns it without copying. Throws ValueError naming the argument otherwise.
template <typename T>
py::array_t<T, py::array::c_style> require_array(const py::handle& obj, const char* name, int ndim,
                                                 const char* expected_shape) {
  if (!py::isinstance<py::array>(obj))
    throw py::value_error(std::string(name) + ": expected a NumPy array " + expected_shape + ", got " +
                          std::string(py::str(py::type::of(obj).attr("__name__"))));
  auto a = py::reinterpret_borrow<py::array>(obj);
  const char* dtype_name = std::is_same<T, float>::value ? "float32" : "int32";
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::value_error(std::string(name) + ": expected dtype " + dtype_name + " " + expected_shape +
                          ", got " + describe(a) + " (convert with .astype(np." + dtype_name + "))");
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + ": expected a " + std::to_string(ndim) + "-D array " +
                          expected_shape + ", got " + describe(a));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + ": expected a C-contiguous array, got a strided view " +
                          "(" + describe(a) + "); pass np.ascontiguousarray(...)");
  return py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(a);
}

// Row-major Eigen view of a 2-D float32 array (no copy).
inline Eigen::Map<const MatrixRM> as_matrix(const py::array_t<float, py::array::c_style>& a) {
  return Eigen::Map<const MatrixRM>(a.data(), a.shape(0), a.shape(1));
}

// A new NumPy array that takes over an Eigen row-major matrix (moved, not copied).
template <typename Mat>
py::array_t<typename Mat::Scalar> to_numpy(Mat&& m) {
  using Plain = std::decay_t<Mat>;
  auto* owned = new Plain(std::forward<Mat>(m));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<Plain*>(p); });
  if constexpr (Plain::IsVectorAtCompileTime)
    return py::array_t<typename Mat::Scalar>({static_cast<py::ssize_t>(owned->size())}, owned->data(),
                                             free_when_done);
  static_assert(Plain::IsVectorAtCompileTime || Plain::IsRowMajor, "matrices must be row-major");
  return py::array_t<typename Mat::Scalar>({static_cast<py::ssize_t>(owned->rows()), static_cast<py::ssize_t>(owned->cols())},
                                           owned->data(), free_when_done);
}

}  // namespace clustermac::bind
