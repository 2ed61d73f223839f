// The compiled module clustermac._core. Each binding file registers one unit of the core.
#include <pybind11/pybind11.h>

namespace clustermac::bind {
void bind_clustering(pybind11::module_& m);  // bind_clustering.cpp: PCA, affinity, NCut
void bind_pooling(pybind11::module_& m);     // bind_pooling.cpp: region MAC, R-MAC grid, whitening
void bind_search(pybind11::module_& m);      // bind_search.cpp: top-k search, AML localisation
}  // namespace clustermac::bind

PYBIND11_MODULE(_core, m) {
  m.doc() = "clustermac C++ core: Normalized-Cut clustering of CNN activations, pooling, whitening, search.";
  clustermac::bind::bind_clustering(m);
  clustermac::bind::bind_pooling(m);
  clustermac::bind::bind_search(m);
}
