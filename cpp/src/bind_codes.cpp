// Bindings of codes/: pooling and dequantisation of 8-bit channel-last feature-map codes.
#include "bind_helpers.hpp"
#include "clustermac/codes/codes.hpp"
#include "clustermac/codes/mac.hpp"

namespace clustermac::bind {

namespace {

CodesView codes_view(const py::array_t<std::uint8_t, py::array::c_style>& codes) {
  return CodesView{codes.data(), codes.shape(0), codes.shape(1), codes.shape(2)};
}

}  // namespace

void bind_codes(py::module_& m) {
  m.def(
      "grid_mac_codes",
      [](const CodesArg& codes_obj, const BoxArg& box_obj, const Int32ArrayArg& regions_obj, double scale) {
        auto codes = checked_codes(codes_obj);
        const CodesView view = codes_view(codes);
        const std::array<std::int32_t, 4> box = box_or_whole_map(box_obj, view.width, view.height);
        auto regions = require_array<std::int32_t>(regions_obj, "regions", 2, "of shape (R, 4)");
        if (regions.shape(1) != 4)
          throw py::value_error("regions: expected shape (R, 4) with rows [x0, y0, x1, y1), got " + describe(regions));
        MatrixRM out;
        {
          py::gil_scoped_release release;
          out = grid_mac_codes(view, box, regions.data(), regions.shape(0), scale);
        }
        return to_numpy(std::move(out));
      },
      py::arg("codes"), py::arg("box"), py::arg("regions"), py::arg("scale"),
      R"doc(R-MAC's regional MAC inside a box, computed on 8-bit codes.

codes: uint8 H×W×D, channel-last, C-contiguous (value = code·scale, as FeatureMapStore keeps
them). box: [x0, y0, x1, y1) in cells, or None for the whole map. regions: int32 R×4 rows
[x0, y0, x1, y1) relative to the box, e.g. rmac_regions(box height, box width). scale: finite,
>= 0. Returns float32 R×D equal bit for bit to
grid_mac(dequantize_codes(codes, box, scale), regions): the max is taken on the codes (scaling
by scale >= 0 is monotone) and only the result is converted to float. An R×D output above
1 GiB (R·D > 2**28) raises ValueError before allocating.)doc");

  m.def(
      "region_mac_codes",
      [](const CodesArg& codes_obj, const Int32ArrayArg& labels_obj, const BoxArg& box_obj, double scale) {
        auto codes = checked_codes(codes_obj);
        const CodesView view = codes_view(codes);
        auto labels = require_array<std::int32_t>(labels_obj, "labels", 2, "of shape (H, W)");
        if (labels.shape(0) != view.height || labels.shape(1) != view.width)
          throw py::value_error("labels: expected shape (" + std::to_string(view.height) + ", " +
                                std::to_string(view.width) +
                                ") to match the codes' (H, W) (the whole map's labels), got " + describe(labels));
        const std::array<std::int32_t, 4> box = box_or_whole_map(box_obj, view.width, view.height);
        MatrixRM out;
        {
          py::gil_scoped_release release;
          out = region_mac_codes(view, labels.data(), box, scale);
        }
        return to_numpy(std::move(out));
      },
      py::arg("codes"), py::arg("labels"), py::arg("box"), py::arg("scale"),
      R"doc(ClusterMAC's per-cluster MAC inside a box, computed on 8-bit codes.

codes: uint8 H×W×D, channel-last, C-contiguous (value = code·scale, as FeatureMapStore keeps
them). labels: int32 H×W, the WHOLE map's cluster labels 0..K-1 (negative = masked out).
box: [x0, y0, x1, y1) in cells, or None for the whole map. scale: finite, >= 0. Returns float32
K×D with K = labels.max() + 1 over the whole map (0 rows if every label is negative): row k is
the max of code·scale over the box's cells labelled k, a zero row if cluster k has no cell in the
box. Equal bit for bit to region_mac(dequantize_codes(codes, box, scale), labels[y0:y1, x0:x1])
padded with zero rows up to K. Limits (ValueError, as region_mac): K <= 2**20 and the K×D
float32 output at most 1 GiB (K·D <= 2**28), checked before allocating.)doc");

  m.def(
      "dequantize_codes",
      [](const CodesArg& codes_obj, const BoxArg& box_obj, double scale) {
        auto codes = checked_codes(codes_obj);
        const CodesView view = codes_view(codes);
        const std::optional<std::array<std::int32_t, 4>> box = optional_box(box_obj);
        VectorF out;
        {
          py::gil_scoped_release release;
          out = dequantize_codes(view, box ? &*box : nullptr, scale);
        }
        const std::array<std::int32_t, 4> extent = box_or_whole_map(box_obj, view.width, view.height);
        return to_numpy(std::move(out),
                        {view.channels, py::ssize_t(extent[3] - extent[1]), py::ssize_t(extent[2] - extent[0])});
      },
      py::arg("codes"), py::arg("box") = py::none(), py::arg("scale") = 1.0,
      "Dequantise channel-last uint8 codes (H×W×D) inside box [x0, y0, x1, y1) (None: everything) to a float32 "
      "D×h×w map, value = code·scale.");
}

}  // namespace clustermac::bind
