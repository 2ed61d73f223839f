// Bindings of linalg/: the per-image PCA.
#include <tuple>

#include "bind_helpers.hpp"
#include "clustermac/linalg/pca.hpp"

namespace clustermac::bind {

void bind_linalg(py::module_& m) {
  m.def(
      "pca_project",
      [](const FloatArrayArg& features, int n_components) {
        auto a = require_array<float>(features, "features", 2, "of shape (N, D)");
        PcaProjection result;
        {
          py::gil_scoped_release release;
          result = pca_project(as_matrix(a), n_components);
        }
        return std::make_tuple(to_numpy(std::move(result.projection)), to_numpy(std::move(result.variances)));
      },
      py::arg("features"), py::arg("n_components"),
      R"doc(Projection of N x D float32 features onto their top principal components (paper Sec. 3.1).

Returns (projection float32 N x C, variances float32 C): the centred features projected on the
top C = n_components principal directions, and the variance of each projected column
(divisor N - 1; 0 when N = 1), in descending order. Components beyond the rank of the data
have zero variance and a zero column. The sign of each column is fixed so that its
largest-magnitude entry is positive. Solved by a block Krylov eigensolver on the implicit
covariance (or Gram) operator with a fixed budget of passes over the data, so no D x D
eigendecomposition is formed: accurate for leading components separated by clear variance gaps
(as in CNN activations); within a flat part of the spectrum the directions are approximate.)doc");
}

}  // namespace clustermac::bind
