"""Files written by clustermac 0.1.0 (tests/data/v0.1.0, see make_fixtures.py there) load with
today's public API and give the values 0.1.0 recorded.

Whitening files, descriptor files (desc.npy + desc.json), exact and FAISS index folders and an
8-bit feature-map store with cluster labels. The images are ten seeded 192 x 144 PNGs; the
descriptors were computed by 0.1.0 with the embedded backbone at max_size 192.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import clustermac

DATA = Path(__file__).resolve().parent / "data" / "v0.1.0"
EXPECTED = json.loads((DATA / "expected.json").read_text())
DATABASE = [DATA / "images" / f"img{i}.png" for i in range(6, 10)]  # make_fixtures.py: paths[6:]
QUERY_BOX = (20, 10, 150, 120)  # the crop-I query of make_fixtures.py, on img6
TOLERANCE = 1e-5

# Settings that are properties of the backbone, not arguments of Extractor.
NOT_ARGUMENTS = ("backbone", "feature_dim", "method", "crop")


def extractor_for(settings: dict) -> clustermac.Extractor:
    """An Extractor built from the settings 0.1.0 recorded (the default backbone)."""
    kwargs = {k: (tuple(v) if k == "n_clusters" else v) for k, v in settings.items() if k not in NOT_ARGUMENTS}
    return clustermac.Extractor(
        clustermac.default_backbone(n_threads=1), settings["method"], settings["crop"], **kwargs
    )


@pytest.mark.network
@pytest.mark.parametrize("tag", sorted(EXPECTED))
def test_whitening_file_gives_the_recorded_descriptors(tag):
    expected = EXPECTED[tag]
    extractor = extractor_for(expected["settings"])
    # Settings recorded by 0.1.0 = what this extractor reports (the same backbone included).
    assert extractor.settings() == expected["settings"]
    assert extractor.load_whitening(DATA / f"whitening_{tag}.npz") is extractor
    assert extractor.is_whitened and extractor.whitening_projection.shape == (6, 1280)
    descriptors = extractor.extract_many([str(p) for p in DATABASE], progress=False)
    np.testing.assert_allclose(descriptors, np.array(expected["descriptors"], np.float32), atol=TOLERANCE, rtol=0)
    query = extractor.extract(str(DATABASE[0]), box=QUERY_BOX)
    np.testing.assert_allclose(query, np.array(expected["query_crop_image"], np.float32), atol=TOLERANCE, rtol=0)
    # The recorded vectors are distinct unit vectors: a comparison of constants would not pass.
    assert np.allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)
    assert np.abs(descriptors[0] - descriptors[1]).max() > 0.1


@pytest.mark.network
def test_whitening_file_refuses_other_settings():
    settings = dict(EXPECTED["clustermac"]["settings"], n_clusters=[5, 20])
    with pytest.raises(ValueError, match="n_clusters"):
        extractor_for(settings).load_whitening(DATA / "whitening_clustermac.npz")
    with pytest.raises(ValueError, match="method"):
        extractor_for(EXPECTED["gem"]["settings"]).load_whitening(DATA / "whitening_rmac.npz")


def test_load_descriptors_gives_the_recorded_rows_and_names():
    vectors, manifest = clustermac.load_descriptors(DATA / "desc.npy", mmap=False)
    assert manifest["images"] == [p.name for p in DATABASE] and manifest["failed"] == {}
    settings = EXPECTED["rmac"]["settings"]
    assert manifest["settings"] == {**settings, "whitened": True, "dim": 6}
    assert vectors.shape == (4, 6) and vectors.dtype == np.float32
    # desc.npy was written with the R-MAC whitening file: its rows are the recorded R-MAC descriptors.
    np.testing.assert_allclose(vectors, np.array(EXPECTED["rmac"]["descriptors"], np.float32), atol=TOLERANCE, rtol=0)
    mapped, _ = clustermac.load_descriptors(DATA / "desc.npy")  # memory-mapped, the same rows
    np.testing.assert_array_equal(np.asarray(mapped), vectors)


def check_index(index: clustermac.Index, backend: str) -> None:
    vectors = np.array(EXPECTED["rmac"]["descriptors"], np.float32)
    names = [p.name for p in DATABASE]
    assert index.backend == backend and len(index) == 4 and index.dim == 6
    assert list(index.names) == names
    scores, indices = index.search(vectors, k=4)
    # The neighbours by brute-force cosine similarity in NumPy.
    similarity = vectors @ vectors.T
    expected_order = np.argsort(-similarity, axis=1, kind="stable")
    np.testing.assert_array_equal(indices, expected_order)
    np.testing.assert_allclose(scores, np.take_along_axis(similarity, expected_order, axis=1), atol=1e-5)
    np.testing.assert_array_equal(indices[:, 0], np.arange(4))  # each descriptor finds its own image


def test_exact_index_loads_and_finds_the_right_neighbours():
    check_index(clustermac.Index.load(DATA / "exact.index"), "exact")


def test_faiss_index_loads_and_finds_the_right_neighbours():
    pytest.importorskip("faiss")
    check_index(clustermac.Index.load(DATA / "faiss.index"), "faiss")


def test_feature_map_store_reads_back_consistent_labels_and_codes():
    store = clustermac.FeatureMapStore(DATA / "maps.cmfm")
    assert len(store) == 4 and store.names == [p.name for p in DATABASE]
    for i in range(len(store)):
        codes, labels = store.codes(i), store.labels(i)
        # 192 x 144 images at stride 32: 5 x 6 cells of 1280 channels.
        assert codes.shape == (5, 6, 1280) and codes.dtype == np.uint8
        assert codes.max() == 255 and store.scale(i) > 0  # quantised to the full 8-bit range
        # n_clusters (2, 3) on the features, then 2 RGB clusters: compact labels 0 .. K-1.
        assert [part.shape for part in labels] == [(5, 6)] * 3
        assert [int(part.max()) + 1 for part in labels] == [2, 3, 2]
        assert all(part.min() == 0 for part in labels)
        fmap = store.feature_map(i)
        np.testing.assert_array_equal(fmap, codes.transpose(2, 0, 1).astype(np.float32) * np.float32(store.scale(i)))
    # Different images, different maps.
    assert np.abs(store.feature_map(0) - store.feature_map(1)).max() > 0.1


@pytest.mark.network
def test_feature_map_store_matches_the_images_of_its_names():
    """Each stored map is the quantised feature map of the image its name says, and its labels
    are that map's clusters (recomputed with today's code)."""
    store = clustermac.FeatureMapStore(DATA / "maps.cmfm")
    extractor = extractor_for({**EXPECTED["clustermac"]["settings"], "max_size": 192})
    for i, name in enumerate(store.names):
        fmap, rgb = extractor.feature_map(extractor.prepare(str(DATA / "images" / name)))
        codes, scale = clustermac.quantize_feature_map(fmap)
        assert abs(scale - store.scale(i)) <= 1e-6 * scale
        assert np.abs(codes.transpose(1, 2, 0).astype(int) - store.codes(i).astype(int)).max() <= 1
        for stored, today in zip(store.labels(i), extractor.cluster_labels(fmap, rgb)):
            np.testing.assert_array_equal(stored, today)
