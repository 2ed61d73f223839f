// Zero-copy conversion of arguments and results, shared by the binding files. Everything here
// only converts (types, dimensions, layout); values are validated by the core, once.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "clustermac/common.hpp"

namespace clustermac::bind {

namespace py = pybind11;

// An argument taken as any Python object (converted and checked in the binding, so that a wrong
// type gives a ValueError naming the argument) whose type in the signature, and so in the
// generated stubs, is Hint::name.
template <typename Hint>
struct Typed {
  py::object value;
  operator const py::object&() const { return value; }
};
struct FloatArrayHint {
  static constexpr auto name = py::detail::const_name("numpy.typing.NDArray[numpy.float32]");
};
struct OptionalFloatArrayHint {
  static constexpr auto name = py::detail::const_name("numpy.typing.NDArray[numpy.float32] | None");
};
struct Int32ArrayHint {
  static constexpr auto name = py::detail::const_name("numpy.typing.NDArray[numpy.int32]");
};
struct CodesHint {
  static constexpr auto name = py::detail::const_name("numpy.typing.NDArray[numpy.uint8]");
};
struct BoxHint {
  static constexpr auto name = py::detail::const_name("collections.abc.Sequence[typing.SupportsInt] | None");
};
struct FloatOrNoneHint {
  static constexpr auto name = py::detail::const_name("float | None");
};
struct IntOrNoneHint {
  static constexpr auto name = py::detail::const_name("int | None");
};
using FloatArrayArg = Typed<FloatArrayHint>;
using OptionalFloatArrayArg = Typed<OptionalFloatArrayHint>;
using Int32ArrayArg = Typed<Int32ArrayHint>;
using CodesArg = Typed<CodesHint>;
using BoxArg = Typed<BoxHint>;
using FloatOrNoneArg = Typed<FloatOrNoneHint>;
using IntOrNoneArg = Typed<IntOrNoneHint>;

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
  if (!a.dtype().equal(py::dtype::of<T>()))  // equal, not is: unpickled dtypes are equal copies
    throw py::value_error(std::string(name) + ": expected dtype " + dtype_name + " " + expected_shape + ", got " +
                          describe(a) + " (convert with .astype(np." + dtype_name + "))");
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + ": expected a " + std::to_string(ndim) + "-D array " + expected_shape +
                          ", got " + describe(a));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + ": expected a C-contiguous array, got a strided view " + "(" +
                          describe(a) + "); pass np.ascontiguousarray(...)");
  return py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(a);
}

using FloatArray = py::array_t<float, py::array::c_style>;

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
    return py::array_t<typename Mat::Scalar>({static_cast<py::ssize_t>(owned->size())}, owned->data(), free_when_done);
  static_assert(Plain::IsVectorAtCompileTime || Plain::IsRowMajor, "matrices must be row-major");
  return py::array_t<typename Mat::Scalar>(
      {static_cast<py::ssize_t>(owned->rows()), static_cast<py::ssize_t>(owned->cols())}, owned->data(),
      free_when_done);
}

// A new NumPy array of the given shape that takes over a vector's storage.
inline py::array_t<float> to_numpy(VectorF&& v, std::vector<py::ssize_t> shape) {
  auto* owned = new VectorF(std::move(v));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<VectorF*>(p); });
  return py::array_t<float>(shape, owned->data(), free_when_done);
}

// Channel-last uint8 codes (H, W, D), C-contiguous, returned without copying.
inline py::array_t<std::uint8_t, py::array::c_style> checked_codes(const py::object& codes_obj) {
  if (!py::isinstance<py::array>(codes_obj))
    throw py::value_error("codes: expected a uint8 NumPy array of shape (H, W, D) (channel-last 8-bit codes), got " +
                          std::string(py::str(py::type::of(codes_obj).attr("__name__"))));
  auto as_array = py::reinterpret_borrow<py::array>(codes_obj);
  if (!as_array.dtype().equal(py::dtype::of<std::uint8_t>()))
    throw py::value_error("codes: expected dtype uint8 of shape (H, W, D) (channel-last 8-bit codes), got " +
                          describe(as_array));
  if (as_array.ndim() != 3)
    throw py::value_error("codes: expected a 3-D array of shape (H, W, D), got " + describe(as_array));
  if (!(as_array.flags() & py::array::c_style))
    throw py::value_error("codes: expected a C-contiguous array, got a strided view (" + describe(as_array) +
                          "); pass np.ascontiguousarray(...)");
  return py::reinterpret_borrow<py::array_t<std::uint8_t, py::array::c_style>>(as_array);
}

// An integer argument given as any Python object (dim=3.5 would otherwise surface as pybind11's
// "Unable to cast"): Python ints and anything with __index__ (NumPy integers); a float, a string
// or an int beyond 64 bits is a ValueError naming the argument.
inline std::int64_t integer_argument(const py::handle& obj, const char* name, const char* expected) {
  PyObject* index = PyNumber_Index(obj.ptr());
  if (!index) {
    PyErr_Clear();
    throw py::value_error(std::string(name) + ": expected " + expected + ", got " +
                          std::string(py::str(py::type::of(obj).attr("__name__"))) + " " +
                          std::string(py::str(py::repr(obj))));
  }
  const py::int_ value = py::reinterpret_steal<py::int_>(index);
  const long long result = PyLong_AsLongLong(value.ptr());
  if (result == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string(name) + ": expected " + expected + " that fits in 64 bits, got " +
                          std::string(py::str(value)));
  }
  return result;
}

// A real-number argument given as any Python object: int, float or anything with __float__ (NumPy
// scalars); otherwise a ValueError naming the argument.
inline double number_argument(const py::handle& obj, const char* name, const char* expected) {
  const double value = PyFloat_AsDouble(obj.ptr());
  if (value == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string(name) + ": expected " + expected + ", got " +
                          std::string(py::str(py::type::of(obj).attr("__name__"))) + " " +
                          std::string(py::str(py::repr(obj))));
  }
  return value;
}

// A box [x0, y0, x1, y1) (4 integers; checked against the map by the core), or nullopt for None.
// Values beyond int32 are clamped, so that the core still refuses them.
inline std::optional<std::array<std::int32_t, 4>> optional_box(const py::object& box_obj) {
  if (box_obj.is_none()) return std::nullopt;
  std::vector<std::int64_t> values;
  try {
    values = box_obj.cast<std::vector<std::int64_t>>();
  } catch (const py::cast_error&) {
    throw py::value_error("box: expected 4 integers [x0, y0, x1, y1) or None, got " +
                          std::string(py::str(py::repr(box_obj))));
  }
  if (values.size() != 4)
    throw py::value_error("box: expected 4 values [x0, y0, x1, y1), got " + std::to_string(values.size()));
  std::array<std::int32_t, 4> box;
  for (int i = 0; i < 4; ++i)
    box[i] = static_cast<std::int32_t>(std::clamp<std::int64_t>(values[i], std::numeric_limits<std::int32_t>::min(),
                                                                std::numeric_limits<std::int32_t>::max()));
  return box;
}

// The box, or the whole width × height map for None.
inline std::array<std::int32_t, 4> box_or_whole_map(const py::object& box_obj, py::ssize_t width, py::ssize_t height) {
  const auto box = optional_box(box_obj);
  return box ? *box
             : std::array<std::int32_t, 4>{0, 0, static_cast<std::int32_t>(width), static_cast<std::int32_t>(height)};
}

}  // namespace clustermac::bind

namespace pybind11::detail {
template <typename Hint>
struct type_caster<clustermac::bind::Typed<Hint>> {
  PYBIND11_TYPE_CASTER(clustermac::bind::Typed<Hint>, Hint::name);
  bool load(handle src, bool) {
    value.value = reinterpret_borrow<object>(src);
    return true;
  }
};
}  // namespace pybind11::detail
