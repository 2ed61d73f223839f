// Google Benchmark microbenchmarks of the clustering core at the paper's map sizes:
// N = 3072 (VGG16, 64 x 48, C = 4) and N = 768 (ResNet101, 32 x 24, C = 7).
//
//   cmake -S . -B build/bench -DCLUSTERMAC_BENCHMARKS=ON
//   cmake --build build/bench --target bench_clustering && build/bench/bench_clustering
//
// Data: a Gaussian mixture with heavy-tailed (gamma-scaled) points in C dims, which gives
// similarity matrices as dense as those of real CNN features (most entries > 1e-6).
#include <benchmark/benchmark.h>

#include <random>

#include "clustermac/clustering/affinity.hpp"
#include "clustermac/clustering/discretize.hpp"
#include "clustermac/clustering/feature_clustering.hpp"
#include "clustermac/clustering/ncut.hpp"
#include "clustermac/linalg/pca.hpp"

namespace {

using clustermac::MatrixRM;

MatrixRM mixture_points(Eigen::Index n, Eigen::Index c, unsigned seed = 0) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::gamma_distribution<float> gamma(2.0f, 0.5f);
  MatrixRM centres(8, c);
  for (Eigen::Index i = 0; i < centres.size(); ++i) centres.data()[i] = 3.0f * normal(rng);
  MatrixRM points(n, c);
  for (Eigen::Index i = 0; i < n; ++i) {
    const auto group = static_cast<Eigen::Index>(rng() % 8);
    const float scale = gamma(rng);
    for (Eigen::Index k = 0; k < c; ++k) points(i, k) = centres(group, k) + scale * normal(rng);
  }
  return points;
}

Eigen::Index dims_for(Eigen::Index n) { return n >= 3072 ? 4 : 7; }

void BM_Affinity(benchmark::State& state) {
  const Eigen::Index n = state.range(0);
  const MatrixRM points = mixture_points(n, dims_for(n));
  const clustermac::VectorF weights = clustermac::variance_weights(points);
  MatrixRM s(n, n);
  for (auto _ : state) {
    clustermac::affinity_into(points, weights, 0.05f, s.data());
    benchmark::DoNotOptimize(s.data());
  }
}

void BM_PcaProject(benchmark::State& state) {
  const Eigen::Index n = state.range(0), d = state.range(1);
  std::mt19937 rng(1);
  std::gamma_distribution<float> gamma(0.5f, 1.0f);
  MatrixRM features(n, d);
  for (Eigen::Index i = 0; i < features.size(); ++i) features.data()[i] = gamma(rng);
  for (auto _ : state) benchmark::DoNotOptimize(clustermac::pca_project(features, static_cast<int>(dims_for(n))));
}

void BM_NcutEigensolve(benchmark::State& state) {
  const Eigen::Index n = state.range(0);
  const int k = static_cast<int>(state.range(1));
  const auto normalization = state.range(2) ? clustermac::Normalization::shi : clustermac::Normalization::sym;
  MatrixRM s = clustermac::affinity(mixture_points(n, dims_for(n)), 0.05f, nullptr);
  // As cluster_feature_map does for "sym": self-loops removed in place (no per-call copy).
  const bool sym = normalization == clustermac::Normalization::sym;
  if (sym) s.diagonal().setZero();
  clustermac::EigenPairs pairs;
  for (auto _ : state) {
    benchmark::DoNotOptimize(clustermac::ncut_embedding_of(s, k, normalization, nullptr, &pairs, sym));
  }
  state.counters["vector_products"] = pairs.n_products;
  state.counters["residual"] = pairs.max_residual;
}

void BM_SimilarityTimesBlock(benchmark::State& state) {
  const Eigen::Index n = state.range(0), b = state.range(1);
  const MatrixRM s = clustermac::affinity(mixture_points(n, 4), 0.05f, nullptr);
  const Eigen::MatrixXf v = Eigen::MatrixXf::Random(n, b);
  const Eigen::VectorXf scale = Eigen::VectorXf::Ones(n);
  Eigen::MatrixXf out(n, b);
  for (auto _ : state) {
    clustermac::detail::similarity_times_block(s, scale, v, out);
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["GFLOPs"] =
      benchmark::Counter(2.0 * n * n * b, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

// The same product with the similarity stored in bfloat16 (AVX512-BF16; skipped without it).
void BM_SimilarityTimesBlockBf16(benchmark::State& state) {
  if (!clustermac::simd_has_avx512_bf16()) {
    state.SkipWithError("the CPU lacks AVX512-BF16");
    return;
  }
  const Eigen::Index n = state.range(0), b = state.range(1);
  const clustermac::SimilarityBf16 s =
      clustermac::bf16_similarity(clustermac::affinity(mixture_points(n, 4), 0.05f, nullptr), false);
  const Eigen::MatrixXf v = Eigen::MatrixXf::Random(n, b);
  const Eigen::VectorXf scale = Eigen::VectorXf::Ones(n);
  Eigen::MatrixXf out(n, b);
  for (auto _ : state) {
    clustermac::bf16_similarity_times_block(s, scale, v, out);
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["GFLOPs"] =
      benchmark::Counter(2.0 * n * n * b, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

void BM_NcutEigensolveBf16(benchmark::State& state) {
  if (!clustermac::simd_has_avx512_bf16()) {
    state.SkipWithError("the CPU lacks AVX512-BF16");
    return;
  }
  const Eigen::Index n = state.range(0);
  const int k = static_cast<int>(state.range(1));
  const clustermac::SimilarityBf16 s =
      clustermac::bf16_similarity(clustermac::affinity(mixture_points(n, dims_for(n)), 0.05f, nullptr), true);
  for (auto _ : state) benchmark::DoNotOptimize(clustermac::ncut_embedding_of(s, k, clustermac::Normalization::sym));
}

void BM_Discretize(benchmark::State& state) {
  const Eigen::Index n = state.range(0);
  const int k = static_cast<int>(state.range(1));
  const MatrixRM s = clustermac::affinity(mixture_points(n, dims_for(n)), 0.05f, nullptr);
  const Eigen::MatrixXd embedding = clustermac::ncut_embedding_of(s, k, clustermac::Normalization::sym);
  for (auto _ : state) benchmark::DoNotOptimize(clustermac::discretize(embedding, 0));
}

// The paper's whole per-image clustering (PCA to C, K = 5 and 20 on features, K = 5 on RGB) of
// a D x H x W map with planted regions (D = 512 as VGG16 at N = 3072, 2048 as ResNet101 at 768).
void BM_ClusterFeatureMap(benchmark::State& state) {
  const Eigen::Index d = state.range(0), h = state.range(1), w = state.range(2);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  MatrixRM patterns(6, d);
  for (Eigen::Index i = 0; i < patterns.size(); ++i) patterns.data()[i] = std::max(0.0f, normal(rng));
  std::vector<float> map(static_cast<std::size_t>(d * h * w)), rgb(static_cast<std::size_t>(h * w * 3));
  for (Eigen::Index y = 0; y < h; ++y)
    for (Eigen::Index x = 0; x < w; ++x) {
      const Eigen::Index region = (y * 3 / h) * 2 + (x * 2 / w);
      for (Eigen::Index c = 0; c < d; ++c)
        map[static_cast<std::size_t>((c * h + y) * w + x)] = std::max(0.0f, patterns(region, c) + 0.5f * normal(rng));
      for (int c = 0; c < 3; ++c)
        rgb[static_cast<std::size_t>((y * w + x) * 3 + c)] =
            0.1f * static_cast<float>(region + c) + 0.05f * normal(rng);
    }
  clustermac::FeatureClusteringOptions options;
  options.pca_dim = h * w >= 3072 ? 4 : 7;
  for (auto _ : state)
    benchmark::DoNotOptimize(clustermac::cluster_feature_map(map.data(), d, h, w, rgb.data(), options));
}

}  // namespace

BENCHMARK(BM_ClusterFeatureMap)->Args({512, 48, 64})->Args({2048, 24, 32})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Affinity)->Arg(768)->Arg(3072)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_PcaProject)->Args({768, 2048})->Args({3072, 512})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SimilarityTimesBlock)
    ->Args({3072, 1})
    ->Args({3072, 8})
    ->Args({3072, 24})
    ->Args({768, 24})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_NcutEigensolve)
    ->Args({768, 20, 0})
    ->Args({768, 5, 0})
    ->Args({3072, 20, 0})
    ->Args({3072, 5, 0})
    ->Args({3072, 20, 1})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SimilarityTimesBlockBf16)
    ->Args({3072, 8})
    ->Args({3072, 24})
    ->Args({768, 24})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_NcutEigensolveBf16)->Args({3072, 20})->Args({3072, 5})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Discretize)->Args({768, 20})->Args({3072, 5})->Args({3072, 20})->Unit(benchmark::kMillisecond);
