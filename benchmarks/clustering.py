"""Per-image clustering with the paper's settings: clustermac's C++ core against the same
pipeline written with NumPy + scikit-learn, single-threaded, in one run.

Paper settings (Sec. 4.1): PCA to C dims, Eq. (2)-(3) similarity with z = 0.05 max d, NCut into
5 and 20 clusters on the features and 5 on the RGB values resized to H x W.
The reference does what a user would: sklearn PCA, NumPy distances, one
``spectral_clustering(affinity, k, assign_labels="discretize")`` call per partition.

Feature maps: EfficientNet-Lite0 activations (the package's default backbone, real ImageNet
weights) of scikit-image's bundled photos, the input resized so the map is exactly H x W; with
``--synthetic`` (or when the backbone cannot be built) maps with planted regions instead.

Also the eigensolve alone against the baseline an expert would write (the honest ratio to quote,
since scikit-learn's shift-invert ARPACK flatters us): SciPy ``eigsh(which="LA")`` for the top
K = 20 eigenvectors of the dense normalised float32 matrix D^-1/2 (S - diag S) D^-1/2, against
``clustermac.ncut_embedding(S, 20)`` on the same S (clustermac's affinity of the PCA-projected map).

Prints, per map size: medians of ``--repeats`` runs, the speed ratio, the mean NCut objective
sum_c cut(A_c, V - A_c) / assoc(A_c, V) of each partition (both evaluated on the reference
similarity matrix), the eigensolver's products, and the peak resident memory of a process
that only runs clustermac on one map.

    python benchmarks/clustering.py                      # N = 3072 (64 x 48, C = 4), N = 768 (32 x 24, C = 7)
    python benchmarks/clustering.py --sizes 48x64:4 --repeats 7 --images 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
from threadpoolctl import threadpool_limits

import clustermac
from clustermac import _core
from clustermac.bench.reference import ncut_objective

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]


def load_maps(height: int, width: int, count: int, synthetic: bool, seed: int = 0):
    """`count` (feature_map D x H x W, rgb H x W x 3) pairs."""
    if not synthetic:
        try:
            from PIL import Image
            from skimage import data

            from clustermac.backbones import default_backbone

            backbone = default_backbone(n_threads=2, max_size=32 * max(height, width))
            out = []
            for name in PHOTOS[:count]:
                image = Image.fromarray(getattr(data, name)()[..., :3])
                stride = backbone.stride
                resized = image.resize((stride * width, stride * height), Image.BILINEAR)
                features = backbone.features(resized)
                assert features.shape[1:] == (height, width), features.shape
                rgb = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
                out.append((np.ascontiguousarray(features, np.float32), np.ascontiguousarray(rgb)))
            return out, f"EfficientNet-Lite0 features of skimage photos (D = {out[0][0].shape[0]})"
        except Exception as error:
            print(f"(backbone unavailable: {error}; using synthetic maps)")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        d = 512
        yy, xx = np.mgrid[:height, :width]
        truth = np.zeros((height, width), np.int64)
        for label in range(1, 7):
            cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(3, height / 3)
            truth[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = label
        patterns = np.maximum(rng.normal(size=(7, d)), 0) * rng.uniform(0.5, 3, size=(7, 1))
        features = patterns[truth].transpose(2, 0, 1) * rng.gamma(2.0, 0.5, size=(1, height, width))
        features = np.maximum(features + 0.3 * rng.normal(size=features.shape), 0)
        rgb = rng.random((7, 3))[truth] + 0.05 * rng.normal(size=(height, width, 3))
        out.append((np.ascontiguousarray(features, np.float32), np.ascontiguousarray(rgb, np.float32)))
    return out, "synthetic maps with planted regions (D = 512)"


def bf16_available() -> bool:
    """Whether similarity_precision="bfloat16" runs here (a CPU with AVX512-BF16)."""
    try:
        clustermac.cluster_feature_map(
            np.random.default_rng(0).random((4, 6, 6), dtype=np.float32),
            n_clusters=(2,),
            similarity_precision="bfloat16",
        )
        return True
    except ValueError:
        return False


def reference_similarity(features: np.ndarray, z_ratio: float = 0.05, equal_weights: bool = False) -> np.ndarray:
    """Eq. (2)-(3); variance weights (Eq. 2) or, for RGB as clustermac does, equal weights."""
    from scipy.spatial.distance import cdist

    variance = features.var(axis=0)
    if equal_weights or not variance.sum() > 0:
        weights = np.full(features.shape[1], 1 / features.shape[1])
    else:
        weights = variance / variance.sum()
    d = cdist(features, features, metric="minkowski", p=2, w=weights)
    return np.exp(-d / (z_ratio * d.max())) ** 2


def reference_pipeline(feature_map, rgb, pca_dim, seed=0):
    """NumPy + scikit-learn, one spectral_clustering call per partition."""
    from sklearn.cluster import spectral_clustering
    from sklearn.decomposition import PCA

    d, h, w = feature_map.shape
    projected = PCA(n_components=pca_dim, random_state=seed).fit_transform(feature_map.reshape(d, -1).T)
    s = reference_similarity(projected)
    labels = [spectral_clustering(s, n_clusters=k, assign_labels="discretize", random_state=seed) for k in (5, 20)]
    s_rgb = reference_similarity(rgb.reshape(-1, 3).astype(np.float64), equal_weights=True)
    labels.append(spectral_clustering(s_rgb, n_clusters=5, assign_labels="discretize", random_state=seed))
    return labels, s, s_rgb


def expert_eigensolve(similarity: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Top-k eigenvectors of D^-1/2 (S - diag S) D^-1/2 by SciPy's eigsh(which="LA"), dense float32."""
    from scipy.sparse.linalg import eigsh

    matrix = similarity.astype(np.float32, copy=True)
    np.fill_diagonal(matrix, 0.0)
    inverse_sqrt_degree = 1.0 / np.sqrt(np.maximum(matrix.sum(axis=1), 1e-30)).astype(np.float32)
    matrix *= inverse_sqrt_degree[:, None]
    matrix *= inverse_sqrt_degree[None, :]
    start = np.random.default_rng(seed).random(matrix.shape[0]).astype(np.float32)
    _, vectors = eigsh(matrix, k=k, which="LA", v0=start)
    return vectors


def time_eigensolves(feature_map: np.ndarray, pca_dim: int, normalization: str, repeats: int) -> tuple[float, float]:
    """(clustermac ncut_embedding K = 20, SciPy eigsh LA K = 20): median seconds on the same affinity."""
    d = feature_map.shape[0]
    projected = clustermac.pca_project(np.ascontiguousarray(feature_map.reshape(d, -1).T), pca_dim)[0]
    similarity = _core.affinity(projected)
    ours, expert = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        clustermac.ncut_embedding(similarity, 20, normalization=normalization)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        expert_eigensolve(similarity, 20)
        expert.append(time.perf_counter() - start)
    return float(np.median(ours)), float(np.median(expert))


def peak_memory_mb(feature_map, rgb, pca_dim) -> tuple[float, float]:
    """(peak RSS of a process running one cluster_feature_map call, same process before the call).

    The child loads only the compiled module (not the clustermac package, whose other parts
    import heavy libraries), so the figure is the clustering's own footprint plus NumPy."""
    import importlib.util

    locations = importlib.util.find_spec("clustermac").submodule_search_locations
    core_path = next(
        os.path.join(d, f)
        for d in locations
        if os.path.isdir(d)
        for f in sorted(os.listdir(d))
        if f.startswith("_core.") and f.endswith((".so", ".pyd"))
    )
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "f.npy"), feature_map)
        np.save(os.path.join(tmp, "rgb.npy"), rgb)
        code = (
            "import importlib.util, numpy as np\n"
            f"spec = importlib.util.spec_from_file_location('clustermac._core', {core_path!r})\n"
            "core = importlib.util.module_from_spec(spec); spec.loader.exec_module(core)\n"
            f"f = np.load({os.path.join(tmp, 'f.npy')!r}); rgb = np.load({os.path.join(tmp, 'rgb.npy')!r})\n"
            # VmHWM (peak RSS of this process image): ru_maxrss would carry the parent's peak
            # across fork + exec.
            "hwm = lambda: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "before = hwm()\n"
            f"core.cluster_feature_map(f, rgb, pca_dim={pca_dim})\n"
            "print(before, hwm())\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[1]) / 1024, float(out[0]) / 1024


def cpu_model() -> str:
    """The CPU's model name (lscpu), for the printed note."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


TIMING_CHILD = """
import sys, time, numpy as np, clustermac
maps = np.load(sys.argv[1]); pca_dim = int(sys.argv[2]); count = len(maps.files) // 2
clustermac.cluster_feature_map(maps["f0"], maps["r0"], pca_dim=pca_dim)  # warm-up
for i in range(count):
    start = time.perf_counter()
    clustermac.cluster_feature_map(maps[f"f{i}"], maps[f"r{i}"], pca_dim=pca_dim, similarity_precision="float32")
    print(time.perf_counter() - start)
"""


def compare_builds(maps, pca_dim: int, baseline_python: str, repeats: int) -> None:
    """cluster_feature_map (float32, single-threaded) per map in three processes run in turn, `repeats`
    rounds: this build, this build capped at AVX2, and `baseline_python`'s build (main's). Medians."""
    runs = {
        "this build": (sys.executable, {}),
        "this build, AVX2 cap": (sys.executable, {"CLUSTERMAC_NO_AVX512": "1"}),
        "baseline build": (baseline_python, {}),
    }
    times: dict[str, list[list[float]]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "maps.npz")
        np.savez(path, **{f"f{i}": f for i, (f, _) in enumerate(maps)}, **{f"r{i}": r for i, (_, r) in enumerate(maps)})
        for _ in range(repeats):
            for name, (python, extra) in runs.items():
                env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
                if python == baseline_python:  # its own installed clustermac, not a worktree's
                    env.pop("PYTHONPATH", None)
                command = [python, "-c", TIMING_CHILD, path, str(pca_dim)]
                out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.split()
                times[name].append([float(t) for t in out])
    medians = {name: float(np.median(np.array(t))) for name, t in times.items()}
    base = medians["baseline build"]
    print(
        "  same-run comparison (float32, medians of every map x round): "
        + ", ".join(f"{name} {m * 1e3:.1f} ms ({base / m:.2f}x of the baseline)" for name, m in medians.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="48x64:4,24x32:7", help="HxW:C list (default: %(default)s)")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--normalization", default="sym", choices=["shi", "sym"])
    parser.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bfloat16"],
        help="similarity_precision of cluster_feature_map (default: %(default)s; the other one is timed too "
        "when the CPU has AVX512-BF16)",
    )
    parser.add_argument(
        "--baseline-python",
        default=None,
        help="also time cluster_feature_map in this interpreter (e.g. one with main's build installed), "
        "interleaved with this build and with this build capped at AVX2 (CLUSTERMAC_NO_AVX512=1)",
    )
    args = parser.parse_args()
    bf16 = bf16_available()
    print(f"similarity_precision={args.precision}; this CPU {'has' if bf16 else 'lacks'} AVX512-BF16")
    print(f"CPU: {cpu_model()}; simd level {_core.simd_level()}; load average {os.getloadavg()[0]:.1f}")

    with threadpool_limits(1):
        # Warm-up (imports, first-call set-up) so that neither side is timed cold.
        warm_map = np.random.default_rng(0).random((16, 8, 8), dtype=np.float32)
        warm_rgb = np.random.default_rng(1).random((8, 8, 3), dtype=np.float32)
        reference_pipeline(warm_map, warm_rgb, 4)
        clustermac.cluster_feature_map(warm_map, warm_rgb)
        for spec in args.sizes.split(","):
            size, pca_dim = spec.split(":")
            height, width = (int(v) for v in size.split("x"))
            pca_dim = int(pca_dim)
            maps, source = load_maps(height, width, args.images, args.synthetic)
            n = height * width
            print(f"\n== N = {n} ({height} x {width}), C = {pca_dim}: {source}, {len(maps)} maps")
            ours_t, ref_t, objectives, given_pca_t, float32_t, eig_t = [], [], [], [], [], []
            for index, (feature_map, rgb) in enumerate(maps):
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    ours = clustermac.cluster_feature_map(
                        feature_map,
                        rgb,
                        pca_dim=pca_dim,
                        normalization=args.normalization,
                        similarity_precision=args.precision,
                    )
                    times.append(time.perf_counter() - start)
                ours_t.append(np.median(times))
                # The other similarity precision too, when the CPU has bfloat16.
                other = "float32" if args.precision == "bfloat16" else "bfloat16"
                float_note = ""
                if bf16:
                    times = []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        clustermac.cluster_feature_map(
                            feature_map,
                            rgb,
                            pca_dim=pca_dim,
                            normalization=args.normalization,
                            similarity_precision=other,
                        )
                        times.append(time.perf_counter() - start)
                    float32_t.append(np.median(times))
                    float_note = f", {other} similarity {float32_t[-1] * 1e3:.1f} ms"
                # The same with a given PCA (as with a dataset-learned one): clustering alone.
                d = feature_map.shape[0]
                flat = np.ascontiguousarray(feature_map.reshape(d, -1).T)
                mean = flat.mean(axis=0)
                _, _, vt = np.linalg.svd(flat[:: max(1, len(flat) // 512)] - mean, full_matrices=False)
                basis = np.ascontiguousarray(vt[:pca_dim].T, np.float32)
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    clustermac.cluster_feature_map(
                        feature_map,
                        rgb,
                        pca_mean=mean,
                        pca_basis=basis,
                        normalization=args.normalization,
                        similarity_precision=args.precision,
                    )
                    times.append(time.perf_counter() - start)
                given_pca_t.append(np.median(times))
                times = []
                for _ in range(args.reference_repeats):
                    start = time.perf_counter()
                    theirs, s, s_rgb = reference_pipeline(feature_map, rgb, pca_dim)
                    times.append(time.perf_counter() - start)
                ref_t.append(np.median(times))
                eig_t.append(time_eigensolves(feature_map, pca_dim, args.normalization, args.repeats))
                row = []
                for a, b, sim in zip(ours, theirs, (s, s, s_rgb)):  # K = 5, K = 20, RGB K = 5
                    row.append((ncut_objective(sim, a.ravel()), ncut_objective(sim, b)))
                objectives.append(row)
                stats = _core._ncut_solver_statistics(
                    _core.affinity(
                        clustermac.pca_project(
                            np.ascontiguousarray(feature_map.reshape(feature_map.shape[0], -1).T), pca_dim
                        )[0]
                    ),
                    20,
                    args.normalization,
                )
                print(
                    f"  map {index}: ours {ours_t[-1] * 1e3:7.1f} ms "
                    f"({given_pca_t[-1] * 1e3:.1f} ms with a given PCA{float_note}), "
                    f"reference {ref_t[-1] * 1e3:7.1f} ms; K=20 eigensolve ours {eig_t[-1][0] * 1e3:.1f} ms, "
                    f"SciPy eigsh LA {eig_t[-1][1] * 1e3:.1f} ms; "
                    f"K=20 solve: {stats['n_products']} vector products, residual {stats['max_residual']:.1e}; "
                    "objective ours/ref "
                    + ", ".join(f"{k} {o:.3f}/{r:.3f}" for k, (o, r) in zip(("K=5", "K=20", "RGB"), row))
                )
            objectives = np.array(objectives)
            ours_median, ref_median = np.median(ours_t), np.median(ref_t)
            print(
                f"  median per image: clustermac {ours_median * 1e3:.1f} ms, NumPy + scikit-learn "
                f"{ref_median * 1e3:.1f} ms, ratio {ref_median / ours_median:.1f}x; clustermac with a given "
                f"PCA (clustering only) {np.median(given_pca_t) * 1e3:.1f} ms"
                + (f"; with a {other} similarity {np.median(float32_t) * 1e3:.1f} ms" if float32_t else "")
            )
            eig = np.median(np.array(eig_t), axis=0)
            print(
                f"  K=20 eigensolve alone: clustermac ncut_embedding {eig[0] * 1e3:.1f} ms, SciPy eigsh(which='LA') "
                f"on the dense normalised float32 matrix {eig[1] * 1e3:.1f} ms, ratio {eig[1] / eig[0]:.1f}x"
            )
            for j, name in enumerate(("K=5 features", "K=20 features", "K=5 RGB")):
                print(
                    f"  mean NCut objective {name}: clustermac {objectives[:, j, 0].mean():.3f}, "
                    f"scikit-learn {objectives[:, j, 1].mean():.3f}"
                )
            if args.baseline_python:
                compare_builds(maps, pca_dim, args.baseline_python, args.repeats)
            peak, before = peak_memory_mb(*maps[0], pca_dim)
            print(
                f"  peak RSS of one cluster_feature_map call: {peak:.0f} MB (process before the call: {before:.0f} MB)"
            )


if __name__ == "__main__":
    main()
