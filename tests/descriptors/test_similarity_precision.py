"""The clustering's similarity precision is a fixed rule recorded with the files: float32 by
default on every CPU (not recorded, so older settings are unchanged), bfloat16 only when asked
for and then recorded in the settings, refused both ways by a whitening learned the other way."""

from __future__ import annotations

import numpy as np
import pytest

import clustermac
from clustermac.search.index_info import _extractor_keywords, extractor_from_info

MAX_SIZE = 128


@pytest.fixture
def tiny_backbone(tmp_path, pooling_model):
    path, _, _ = pooling_model(tmp_path / "tiny.onnx", 512, 16, preset="vgg16")
    return clustermac.Backbone(path, n_threads=1)


def _map_and_rgb(extractor, photo):
    return extractor.feature_map(extractor.prepare(str(photo)))


def test_float32_is_the_default_and_is_not_recorded(tiny_backbone, tmp_path, write_photos):
    names = write_photos(tmp_path / "photos", n=1, size=MAX_SIZE)
    for method in ("clustermac", "clustermac-box", "rmac"):
        ex = clustermac.Extractor(tiny_backbone, method, max_size=MAX_SIZE)
        assert ex.similarity_precision == "float32" and "similarity_precision" not in ex.settings()
    ex = clustermac.Extractor(tiny_backbone, "clustermac", max_size=MAX_SIZE)
    fmap, rgb = _map_and_rgb(ex, tmp_path / "photos" / names[0])
    expected = clustermac.cluster_feature_map(fmap, rgb, pca_dim=ex.pca_dim, similarity_precision="float32")
    for got, want in zip(ex.cluster_labels(fmap, rgb), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    # The default, clustermac-box: one 20-cluster partition of the features, no RGB partition.
    box = clustermac.Extractor(tiny_backbone, max_size=MAX_SIZE)
    (got,) = box.cluster_labels(fmap, rgb)
    np.testing.assert_array_equal(got, clustermac.cluster_feature_map(fmap, None, [20], 0, pca_dim=box.pca_dim)[0])
    with pytest.raises(ValueError, match="does not cluster"):
        clustermac.Extractor(tiny_backbone, "rmac", max_size=MAX_SIZE).cluster_labels(fmap, rgb)
    with pytest.raises(ValueError, match="similarity_precision: expected one of"):
        clustermac.Extractor(tiny_backbone, similarity_precision="auto")


def test_bfloat16_is_recorded_for_the_clustering_methods_and_rebuilt_from_the_settings(tiny_backbone):
    # Needs no bf16 CPU: nothing is clustered here.
    for method, recorded in (("clustermac", True), ("clustermac-box", True), ("rmac", False)):
        ex = clustermac.Extractor(tiny_backbone, method, max_size=MAX_SIZE, similarity_precision="bfloat16")
        settings = ex.settings()
        assert (settings.get("similarity_precision") == "bfloat16") is recorded, method
        # What an index's info rebuilds for its queries (clustermac.search.index_info).
        rebuilt = clustermac.Extractor(tiny_backbone, **_extractor_keywords(settings))
        assert rebuilt.settings() == settings


def test_a_whitening_is_refused_by_an_extractor_of_the_other_precision(tiny_backbone, tmp_path, write_photos):
    names = write_photos(tmp_path / "train", n=3, size=MAX_SIZE)
    paths = [str(tmp_path / "train" / n) for n in names]
    float_ex = clustermac.Extractor(tiny_backbone, max_size=MAX_SIZE, whitening_dim=8)
    float_ex.fit_whitening(paths, progress=False)
    float_file = tmp_path / "float32.npz"
    float_ex.save_whitening(float_file)
    bf16_ex = clustermac.Extractor(tiny_backbone, max_size=MAX_SIZE, whitening_dim=8, similarity_precision="bfloat16")
    with pytest.raises(ValueError, match="similarity_precision: file has 'float32', extractor has 'bfloat16'"):
        bf16_ex.load_whitening(float_file)
    # A whitening recorded as learned on bf16 partitions (saved without clustering: any CPU).
    bf16_ex.whitening_mean, bf16_ex.whitening_projection = float_ex.whitening_mean, float_ex.whitening_projection
    bf16_file = tmp_path / "bfloat16.npz"
    bf16_ex.save_whitening(bf16_file)
    with pytest.raises(ValueError, match="similarity_precision: file has 'bfloat16', extractor has 'float32'"):
        clustermac.Extractor(tiny_backbone, max_size=MAX_SIZE, whitening_dim=8).load_whitening(bf16_file)
    assert clustermac.Extractor(tiny_backbone, max_size=MAX_SIZE, whitening_dim=8).load_whitening(float_file)
    again = clustermac.Extractor(tiny_backbone, max_size=MAX_SIZE, whitening_dim=8, similarity_precision="bfloat16")
    assert again.load_whitening(bf16_file).is_whitened
    # R-MAC does not cluster: the clustering's precision does not concern its whitening.
    rmac = clustermac.Extractor(tiny_backbone, "rmac", max_size=MAX_SIZE, whitening_dim=8)
    rmac.fit_whitening(paths, progress=False)
    rmac.save_whitening(tmp_path / "rmac.npz")
    clustermac.Extractor(
        tiny_backbone, "rmac", max_size=MAX_SIZE, whitening_dim=8, similarity_precision="bfloat16"
    ).load_whitening(tmp_path / "rmac.npz")


@pytest.mark.bf16
def test_bfloat16_extractor_clusters_with_the_bf16_similarity(tiny_backbone, tmp_path, write_photos):
    names = write_photos(tmp_path / "photos", n=1, size=MAX_SIZE)
    ex = clustermac.Extractor(tiny_backbone, "clustermac", max_size=MAX_SIZE, similarity_precision="bfloat16")
    fmap, rgb = _map_and_rgb(ex, tmp_path / "photos" / names[0])
    expected = clustermac.cluster_feature_map(fmap, rgb, pca_dim=ex.pca_dim, similarity_precision="bfloat16")
    for got, want in zip(ex.cluster_labels(fmap, rgb), expected, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.bf16
def test_cli_records_bfloat16_and_search_describes_queries_the_same_way(tmp_path, pooling_model, write_photos, capsys):
    from clustermac.cli import main

    model, _, _ = pooling_model(tmp_path / "tiny.onnx", 512, 16, preset="vgg16")
    photos = tmp_path / "photos"
    names = write_photos(photos, n=3, size=MAX_SIZE)
    backbone = ["--backbone", str(model), "--threads", "1"]
    out = tmp_path / "d.npy"
    extract = ["extract", str(photos), "--out", str(out), "--max-size", str(MAX_SIZE), "--quiet", *backbone]
    assert main([*extract, "--similarity-precision", "bfloat16"]) == 0
    vectors, manifest = clustermac.load_descriptors(out)
    assert manifest["settings"]["similarity_precision"] == "bfloat16"
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert main(["index", str(out), "--out", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    # No --similarity-precision: the query is described as the index's images were (bfloat16), so
    # the indexed photo finds itself with a score of 1.
    assert main(["search", str(photos / names[1]), "--index", str(tmp_path / "idx"), "-k", "1", *backbone]) == 0
    _, score, name = capsys.readouterr().out.split()[:3]
    assert name == names[1] and float(score) == pytest.approx(1.0, abs=1e-5)
    # The server's path: the extractor rebuilt from the index's recorded settings.
    info = clustermac.Index.load(tmp_path / "idx").info
    rebuilt = extractor_from_info(info, backbone=clustermac.Backbone(model, n_threads=1))
    assert rebuilt.similarity_precision == "bfloat16"
