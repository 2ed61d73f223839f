#include "bind_helpers.hpp"

namespace clustermac::bind {
void bind_clustering(py::module_& m) { (void)m; }
}  // namespace clustermac::bind
