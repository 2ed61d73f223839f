// Google Benchmark microbenchmarks of the pooling core: region_mac (the paper's Eq. 4) and
// grid_mac over the R-MAC grid, at the map sizes of the paper's backbones
// (ResNet101 at 1024 px: D = 2048, 32×24 = 768 locations; VGG16: D = 512, 64×48 = 3072).
//
//   cmake -S . -B build/bench -DCLUSTERMAC_BENCHMARKS=ON
//   cmake --build build/bench --target bench_pooling
//   build/bench/bench_pooling --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "clustermac/pooling/pooling.hpp"

namespace {

struct MapShape {
  std::ptrdiff_t channels, height, width;
};

MapShape shape_for_locations(std::int64_t locations) {
  return locations == 768 ? MapShape{2048, 24, 32} : MapShape{512, 48, 64};
}

std::vector<float> random_map(const MapShape& s) {
  std::mt19937 generator(0);
  std::normal_distribution<float> normal;
  std::vector<float> data(s.channels * s.height * s.width);
  for (auto& v : data) v = std::max(0.0f, normal(generator));  // post-ReLU
  return data;
}

// Labels as the paper's clustering produces them: K clusters, here in random positions.
std::vector<std::int32_t> random_labels(std::ptrdiff_t n, int clusters) {
  std::mt19937 generator(1);
  std::uniform_int_distribution<int> pick(0, clusters - 1);
  std::vector<std::int32_t> labels(n);
  for (auto& l : labels) l = pick(generator);
  return labels;
}

void BM_region_mac(benchmark::State& state) {
  const MapShape s = shape_for_locations(state.range(0));
  const auto data = random_map(s);
  const auto labels = random_labels(s.height * s.width, static_cast<int>(state.range(1)));
  const clustermac::FeatureMapView map{data.data(), s.channels, s.height, s.width};
  for (auto _ : state) benchmark::DoNotOptimize(clustermac::region_mac(map, labels.data()));
  state.counters["locations"] = static_cast<double>(s.height * s.width);
  state.counters["channels"] = static_cast<double>(s.channels);
}
BENCHMARK(BM_region_mac)->ArgsProduct({{768, 3072}, {5, 20}})->Unit(benchmark::kMicrosecond);

void BM_grid_mac(benchmark::State& state) {
  const MapShape s = shape_for_locations(state.range(0));
  const auto data = random_map(s);
  const auto regions = clustermac::rmac_regions(s.height, s.width, 3);
  const clustermac::FeatureMapView map{data.data(), s.channels, s.height, s.width};
  for (auto _ : state)
    benchmark::DoNotOptimize(
        clustermac::grid_mac(map, regions.front().data(), static_cast<std::ptrdiff_t>(regions.size())));
  state.counters["regions"] = static_cast<double>(regions.size());
}
BENCHMARK(BM_grid_mac)->Arg(768)->Arg(3072)->Unit(benchmark::kMicrosecond);

}  // namespace
