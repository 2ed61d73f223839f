// The compiled module clustermac._core: one registration function per folder of the core.
#include <pybind11/pybind11.h>

#include <string>

#include "clustermac/clustering/affinity.hpp"
#include "clustermac/linalg/dense_kernels.hpp"
#include "clustermac/simd.hpp"

namespace clustermac::bind {
void bind_linalg(pybind11::module_& m);      // bind_linalg.cpp: PCA
void bind_clustering(pybind11::module_& m);  // bind_clustering.cpp: affinity, NCut, per-image clustering
void bind_pooling(pybind11::module_& m);     // bind_pooling.cpp: MAC, R-MAC grid, SPoC/GeM/CroW, whitening
void bind_codes(pybind11::module_& m);       // bind_codes.cpp: pooling and dequantisation of 8-bit codes
void bind_search(pybind11::module_& m);      // bind_search.cpp: top-k search, AML localisation
}  // namespace clustermac::bind

PYBIND11_MODULE(_core, m) {
  m.doc() = "clustermac C++ core: Normalized-Cut clustering of CNN activations, pooling, whitening, search.";
  m.def(
      "simd_level", [] { return std::string(clustermac::simd_level_name(clustermac::simd_level())); },
      R"doc(The instruction set the vectorised kernels use in this process: "avx512", "avx2" or "scalar".

Chosen once from the CPU's features, capped by the environment variables CLUSTERMAC_NO_AVX512
(at most "avx2") and CLUSTERMAC_NO_AVX2 ("scalar"); "scalar" also when the module was built
with CLUSTERMAC_NO_SIMD_DISPATCH or for a CPU other than x86-64.)doc");
  m.def(
      "kernel_choices",
      [] {
        pybind11::dict out;
#ifdef CLUSTERMAC_SIMD_X86
        if (clustermac::simd_at_least(clustermac::kSimdAvx2)) {
          out["dense_products"] = clustermac::detail::dense_products_use_avx512() ? "avx512" : "avx2";
          out["affinity"] = clustermac::detail::affinity_uses_avx512() ? "avx512" : "avx2";
        }
#endif
        return out;
      },
      R"doc(The registers each kernel with an AVX-512 and an AVX2 version uses in this process, by name.

The two versions give the same bits; which one runs is decided by timing both once per process on
a small piece of work (at the kernel's first use, or here), not from the CPU flag alone.
"dense_products": the eigensolvers' and whitening's dense products; "affinity": the similarity of
Eq. (3). Every value is "avx2" under CLUSTERMAC_NO_AVX512; empty below AVX2.)doc");
  clustermac::bind::bind_linalg(m);
  clustermac::bind::bind_clustering(m);
  clustermac::bind::bind_pooling(m);
  clustermac::bind::bind_codes(m);
  clustermac::bind::bind_search(m);
}
