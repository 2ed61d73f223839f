#include "bind_helpers.hpp"

namespace clustermac::bind {
void bind_pooling(py::module_& m) { (void)m; }
}  // namespace clustermac::bind
