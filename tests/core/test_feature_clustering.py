"""cluster_feature_map / cluster_feature_maps on feature maps with planted regions."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import clustermac
from clustermac import _core


def test_planted_regions_recovered_by_features_and_rgb(planted_map):
    features, rgb, truth = planted_map()
    maps = clustermac.cluster_feature_map(features, rgb, n_clusters=(4,), rgb_clusters=4)
    assert len(maps) == 2
    for labels in maps:
        assert labels.shape == truth.shape and labels.dtype == np.int32
        assert adjusted_rand_score(truth.ravel(), labels.ravel()) > 0.99


def test_finite_activations_too_large_for_float_sums_are_refused(planted_map):
    features, _, _ = planted_map()
    huge = (features * np.float32(2.0**120)).astype(np.float32)  # ~1e36: a channel's float sum overflows
    assert np.isfinite(huge).all()
    with pytest.raises(ValueError, match="too large"):
        clustermac.cluster_feature_map(huge, n_clusters=(4,), rgb_clusters=0)


def test_paper_settings_shapes_and_compact_labels(planted_map):
    features, rgb, _ = planted_map(h=24, w=32, noise=0.6, seed=1)
    maps = clustermac.cluster_feature_map(features, rgb)  # (5, 20) on features + 5 on RGB
    assert len(maps) == 3
    for labels, k in zip(maps, (5, 20, 5)):
        assert labels.shape == (24, 32)
        used = np.unique(labels)
        np.testing.assert_array_equal(used, np.arange(len(used)))
        assert len(used) <= k
    assert len(clustermac.cluster_feature_map(features)) == 2
    assert len(clustermac.cluster_feature_map(features, rgb, rgb_clusters=0)) == 2


@pytest.mark.parametrize("normalization", ["shi", "sym"])
def test_equals_the_pipeline_built_from_the_parts(normalization, planted_map):
    features, _, _ = planted_map(noise=0.4, seed=2)
    d, h, w = features.shape
    projection, _ = clustermac.pca_project(np.ascontiguousarray(features.reshape(d, -1).T), 4)
    s = clustermac.affinity(projection)
    maps = clustermac.cluster_feature_map(features, n_clusters=(3, 4), seed=4, normalization=normalization)
    # One eigensolve serves both: K = 3 uses the first 3 of the 4 eigenvectors.
    embedding = clustermac.ncut_embedding(s, 4, normalization=normalization)
    for labels, k in zip(maps, (3, 4)):
        direct = _core._discretize(np.ascontiguousarray(embedding[:, :k]), seed=4)
        assert adjusted_rand_score(direct, labels.ravel()) > 0.99
    assert adjusted_rand_score(clustermac.ncut(s, 4, seed=4, normalization=normalization), maps[1].ravel()) > 0.99


def test_dataset_pca_equal_to_the_image_pca_gives_the_same_labels(planted_map):
    features, _, _ = planted_map(noise=0.5, seed=3)
    d = features.shape[0]
    x = features.reshape(d, -1).T.astype(np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = np.ascontiguousarray(vt[:4].T, np.float32)
    own = clustermac.cluster_feature_map(features, n_clusters=(5,))
    given = clustermac.cluster_feature_map(features, n_clusters=(5,), pca_mean=mean.astype(np.float32), pca_basis=basis)
    assert adjusted_rand_score(own[0].ravel(), given[0].ravel()) > 0.99


def test_repeated_pattern_shares_a_cluster_unless_space_is_weighted():
    rng = np.random.default_rng(4)
    d, h, w = 16, 16, 30
    truth = np.zeros((h, w), np.int32)
    truth[4:12, 2:8] = 1
    truth[4:12, 22:28] = 1  # the same pattern twice, far apart
    patterns = np.maximum(rng.normal(size=(2, d)) * 2, 0)
    features = np.ascontiguousarray(
        (patterns[truth].transpose(2, 0, 1) + 0.05 * rng.normal(size=(d, h, w))), np.float32
    )
    plain = clustermac.cluster_feature_map(features, n_clusters=(2,))[0]
    assert len(np.unique(plain[4:12, 2:8])) == 1 and plain[6, 4] == plain[6, 24]
    spatial = clustermac.cluster_feature_map(features, n_clusters=(3,), spatial_weight=20.0)[0]
    assert spatial[6, 4] != spatial[6, 24]


def test_tiny_and_constant_maps_give_one_region():
    one = clustermac.cluster_feature_map(np.ones((8, 1, 1), np.float32), np.ones((1, 1, 3), np.float32))
    assert len(one) == 3 and all(m.shape == (1, 1) and m[0, 0] == 0 for m in one)
    constant = clustermac.cluster_feature_map(np.full((8, 5, 6), 2.0, np.float32))
    assert all(np.all(m == 0) for m in constant)
    small = clustermac.cluster_feature_map(np.random.default_rng(0).random((8, 2, 2), dtype=np.float32))
    assert all(m.max() <= 3 for m in small)  # K = 20 lowered to N = 4


def test_deterministic_and_seed_is_used(planted_map):
    features, rgb, _ = planted_map(noise=1.0, seed=5)
    a = clustermac.cluster_feature_map(features, rgb, seed=7)
    b = clustermac.cluster_feature_map(features, rgb, seed=7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # The seed reaches the discretisation: on this noisy map other seeds cut the 20-cluster
    # partition differently (compared as partitions, so a mere relabelling would not count).
    agreement = [
        adjusted_rand_score(a[1].ravel(), clustermac.cluster_feature_map(features, rgb, seed=seed)[1].ravel())
        for seed in (8, 9)
    ]
    assert min(agreement) < 0.99, agreement


def test_batched_equals_single_calls(planted_map):
    maps = [planted_map(h=12 + i, w=14, noise=0.7, seed=i) for i in range(4)]
    features = [m[0] for m in maps]
    rgbs = [maps[0][1], None, maps[2][1], maps[3][1]]
    batched = clustermac.cluster_feature_maps(features, rgbs, n_clusters=(3, 6), n_threads=2)
    assert len(batched) == 4
    for f, rgb, result in zip(features, rgbs, batched):
        single = clustermac.cluster_feature_map(f, rgb, n_clusters=(3, 6))
        assert len(result) == len(single)
        for x, y in zip(result, single):
            np.testing.assert_array_equal(x, y)
    assert clustermac.cluster_feature_maps([]) == []


F = np.random.default_rng(0).random((6, 4, 5), dtype=np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: clustermac.cluster_feature_map(F[0]), "3-D"),
        (lambda: clustermac.cluster_feature_map(F.astype(np.float64)), "dtype float32"),
        (lambda: clustermac.cluster_feature_map(np.zeros((6, 0, 5), np.float32)), "non-empty"),
        (lambda: clustermac.cluster_feature_map(F, np.zeros((4, 4, 3), np.float32)), "rgb"),
        (lambda: clustermac.cluster_feature_map(F, n_clusters=(5, 0)), "n_clusters"),
        (lambda: clustermac.cluster_feature_map(F, n_clusters=()), "n_clusters"),
        (lambda: clustermac.cluster_feature_map(F, rgb_clusters=-1), "rgb_clusters"),
        (lambda: clustermac.cluster_feature_map(F, pca_dim=7), "pca_dim"),
        (lambda: clustermac.cluster_feature_map(F, z_ratio=-1.0), "z_ratio"),
        (lambda: clustermac.cluster_feature_map(F, spatial_weight=-1.0), "spatial_weight"),
        (lambda: clustermac.cluster_feature_map(F, normalization="ng"), "normalization"),
        (lambda: clustermac.cluster_feature_map(F, seed=-2), "seed"),
        (lambda: clustermac.cluster_feature_map(F, pca_mean=np.zeros(6, np.float32)), "pca_basis"),
        (
            lambda: clustermac.cluster_feature_map(
                F, pca_mean=np.zeros(5, np.float32), pca_basis=np.zeros((5, 2), np.float32)
            ),
            "pca_mean",
        ),
        (lambda: clustermac.cluster_feature_map(np.where(F > 0.5, np.nan, F).astype(np.float32)), "NaN"),
        (lambda: clustermac.cluster_feature_map(np.where(F > 0.5, np.inf, F).astype(np.float32)), "Inf"),
        (lambda: clustermac.cluster_feature_map(np.where(F > 0.5, -np.inf, F).astype(np.float32)), "Inf"),
        (lambda: clustermac.cluster_feature_maps([F, F[:, :, :2].copy(), "x"]), r"feature_map\[2\]"),
        (lambda: clustermac.cluster_feature_maps([F], [None, None]), "rgbs"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_portable_path_agrees_with_the_avx2_path():
    """CLUSTERMAC_NO_AVX2 forces the SSE2/Eigen code; both paths must give the same results."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np, clustermac, sys\n"
        "rng = np.random.default_rng(0)\n"
        "groups = rng.integers(0, 6, size=(17, 23))\n"
        "f = (np.maximum(rng.normal(size=(6, 32)), 0)[groups].transpose(2, 0, 1)\n"
        "     + 0.3 * rng.normal(size=(32, 17, 23))).astype(np.float32)\n"
        "p, _ = clustermac.pca_project(np.ascontiguousarray(f.reshape(32, -1).T), 4)\n"
        "s = clustermac.affinity(p)\n"
        "labels = clustermac.cluster_feature_map(f, n_clusters=(5, 6))\n"
        "np.savez(sys.argv[1], s=s, e=clustermac.ncut_embedding(s, 6), l5=labels[0], l6=labels[1])\n"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for flag in (None, "1"):
            env = dict(os.environ)
            env.pop("CLUSTERMAC_NO_AVX2", None)
            if flag:
                env["CLUSTERMAC_NO_AVX2"] = flag
            path = os.path.join(tmp, f"r{len(results)}.npz")
            subprocess.run([sys.executable, "-c", code, path], env=env, check=True)
            results.append(np.load(path))
        fast, portable = results
        np.testing.assert_array_equal(portable["s"], portable["s"].T)
        np.testing.assert_allclose(fast["s"], portable["s"], rtol=1e-5, atol=1e-7)
        q_fast, _ = np.linalg.qr(fast["e"].astype(np.float64))
        q_portable, _ = np.linalg.qr(portable["e"].astype(np.float64))
        assert np.linalg.norm(q_fast - q_portable @ (q_portable.T @ q_fast), 2) < 1e-2
        assert adjusted_rand_score(fast["l5"].ravel(), portable["l5"].ravel()) > 0.95
        assert adjusted_rand_score(fast["l6"].ravel(), portable["l6"].ravel()) > 0.95


@pytest.mark.bf16
def test_bf16_similarity_recovers_planted_regions_only_when_asked_for(planted_map):
    features, rgb, truth = planted_map(h=48, w=48, noise=0.3, seed=3)  # N = 2304: once "auto" chose bf16 here
    maps = {
        p: clustermac.cluster_feature_map(features, rgb, n_clusters=(4,), rgb_clusters=4, similarity_precision=p)
        for p in ("bfloat16", "float32")
    }
    for precision, labels in maps.items():
        for partition in labels:
            assert adjusted_rand_score(truth.ravel(), partition.ravel()) > 0.99, precision
    # The default is float32 on every CPU, this one (which has AVX512-BF16) included.
    default = clustermac.cluster_feature_map(features, rgb, n_clusters=(4,), rgb_clusters=4)
    batched = clustermac.cluster_feature_maps([features], [rgb], n_clusters=(4,), rgb_clusters=4, n_threads=1)[0]
    for got, got_batched, f32 in zip(default, batched, maps["float32"], strict=True):
        np.testing.assert_array_equal(got, f32)
        np.testing.assert_array_equal(got_batched, f32)


def test_similarity_precision_is_a_fixed_rule_auto_is_refused_and_bf16_needs_the_cpu(planted_map):
    import os
    import subprocess
    import sys

    features = planted_map()[0]
    for name in ("auto", "fp16"):
        with pytest.raises(ValueError, match="similarity_precision"):
            clustermac.cluster_feature_map(features, similarity_precision=name)
    with pytest.raises(ValueError, match='"auto" was removed'):
        clustermac.cluster_feature_maps([features], similarity_precision="auto")
    code = (
        "import numpy as np, clustermac\n"
        "rng = np.random.default_rng(0)\n"
        "f = rng.random((8, 48, 45), dtype=np.float32)\n"
        "try:\n"
        "    clustermac.cluster_feature_map(f, n_clusters=(3,), similarity_precision='bfloat16')\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    env = dict(os.environ, CLUSTERMAC_NO_BF16="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    assert "AVX512-BF16" in out and "float32" in out
