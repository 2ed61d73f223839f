"""The Extractor against plain NumPy references, on a deterministic stand-in backbone.

The stand-in turns an image into a D×H×W map by averaging stride×stride blocks of the RGB
values and mixing them through a fixed random ReLU layer, so the tests control exactly which
locations an object occupies.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import clustermac
from clustermac import Extractor, _core, extract_folder, load_descriptors
from clustermac.descriptors import _activation_box


class BlockBackbone:
    """Stride-8 block means of the RGB image, mixed into D channels by a fixed ReLU layer."""

    def __init__(self, dim: int = 32, stride: int = 8, seed: int = 0, name: str = "block-test"):
        rng = np.random.default_rng(seed)
        self.weights = rng.normal(size=(dim, 3)).astype(np.float32)
        self.bias = rng.normal(size=(dim, 1)).astype(np.float32)
        self.dim, self.stride, self.name, self.max_size = dim, stride, name, 256
        self.calls = 0

    def features(self, image: Image.Image) -> np.ndarray:
        self.calls += 1
        a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        h, w = a.shape[0] // self.stride, a.shape[1] // self.stride
        if h < 1 or w < 1:
            raise ValueError(f"image of {a.shape[1]}×{a.shape[0]} px is smaller than the stride {self.stride}")
        blocks = a[: h * self.stride, : w * self.stride].reshape(h, self.stride, w, self.stride, 3).mean(axis=(1, 3))
        mixed = self.weights @ blocks.reshape(-1, 3).T + self.bias
        return np.ascontiguousarray(np.maximum(mixed, 0).reshape(self.dim, h, w), dtype=np.float32)


def scene(seed: int, size=(160, 224)) -> np.ndarray:
    """A textured background with a few coloured rectangles."""
    rng = np.random.default_rng(seed)
    img = (rng.random((size[0] // 16, size[1] // 16, 3)) * 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.NEAREST)).copy()
    for _ in range(3):
        y, x = rng.integers(0, size[0] - 40), rng.integers(0, size[1] - 40)
        img[y : y + 40, x : x + 40] = rng.integers(0, 255, 3)
    return img


def l2(v):
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.where(n > 0, v / np.where(n > 0, n, 1), 0)


def test_mac_and_global_methods_match_numpy():
    bb = BlockBackbone()
    img = scene(1)
    fmap = bb.features(Image.fromarray(img))
    mac = Extractor(bb, "mac").extract(img)
    np.testing.assert_allclose(mac, l2(fmap.reshape(bb.dim, -1).max(axis=1)), rtol=1e-5, atol=1e-6)
    gem = Extractor(bb, "gem").extract(img)
    reference = np.mean(np.maximum(fmap, 1e-6).reshape(bb.dim, -1) ** 3, axis=1) ** (1 / 3)
    np.testing.assert_allclose(gem, l2(reference), rtol=1e-4, atol=1e-5)
    for method in ("spoc", "crow"):
        v = Extractor(bb, method).extract(img)
        assert v.shape == (bb.dim,) and abs(np.linalg.norm(v) - 1) < 1e-5


def test_rmac_matches_numpy_reference_with_whitening():
    bb = BlockBackbone()
    ex = Extractor(bb, "rmac")
    ex.fit_whitening([scene(s) for s in range(10, 20)], progress=False)
    img = scene(2)
    fmap = bb.features(Image.fromarray(img))
    regions = _core.rmac_regions(fmap.shape[1], fmap.shape[2], 3)
    vectors = np.stack([fmap[:, y0:y1, x0:x1].reshape(bb.dim, -1).max(axis=1) for x0, y0, x1, y1 in regions])
    whitened = l2((l2(vectors) - ex.whitening_mean) @ ex.whitening_projection.T)
    expected = l2(whitened.sum(axis=0))
    np.testing.assert_allclose(ex.extract(img), expected, rtol=1e-4, atol=1e-5)


def test_clustermac_matches_core_functions():
    bb = BlockBackbone()
    ex = Extractor(bb, "clustermac", pca_dim=4)
    img = scene(3)
    pil = Image.fromarray(img)
    fmap = bb.features(pil)
    rgb = np.asarray(pil.resize((fmap.shape[2], fmap.shape[1]), Image.BILINEAR), dtype=np.float32)
    labels = clustermac.cluster_feature_map(fmap, rgb=rgb, n_clusters=(5, 20), rgb_clusters=5, pca_dim=4)
    assert len(labels) == 3
    vectors = []
    for lab in labels:
        for k in range(lab.max() + 1):
            mask = lab == k
            vectors.append(fmap[:, mask].max(axis=1) if mask.any() else np.zeros(bb.dim, np.float32))
    vectors = l2(np.stack(vectors))
    expected = l2(vectors.sum(axis=0))
    np.testing.assert_allclose(ex.extract(img), expected, rtol=1e-4, atol=1e-5)


def test_clustermac_with_grid_regions_adds_the_rmac_squares():
    bb = BlockBackbone()
    img = scene(3)
    fmap = bb.features(Image.fromarray(img))
    plain = Extractor(bb, "clustermac")
    both = Extractor(bb, "clustermac", add_grid_regions=True)
    regions = _core.rmac_regions(fmap.shape[1], fmap.shape[2], 3)
    grid = np.stack([fmap[:, y0:y1, x0:x1].reshape(bb.dim, -1).max(axis=1) for x0, y0, x1, y1 in regions])
    np.testing.assert_array_equal(
        both.regional_vectors(fmap, None), np.concatenate([grid, plain.regional_vectors(fmap, None)])
    )
    assert both.settings()["add_grid_regions"] and not plain.settings()["add_grid_regions"]


def test_crop_modes_on_a_planted_box():
    bb = BlockBackbone()
    img = scene(4)
    box = (40, 24, 136, 104)  # multiples of the stride: crop I and crop X see the same cells
    crop_i = Extractor(bb, "mac", crop="image").extract(img, box=box)
    crop_x = Extractor(bb, "mac", crop="activations").extract(img, box=box)
    fmap = bb.features(Image.fromarray(img))
    inside = fmap[:, 24 // 8 : 104 // 8, 40 // 8 : 136 // 8]
    np.testing.assert_allclose(crop_x, l2(inside.reshape(bb.dim, -1).max(axis=1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(crop_i, crop_x, rtol=1e-5, atol=1e-6)
    whole = Extractor(bb, "mac").extract(img)
    assert not np.allclose(whole, crop_x)


def test_activation_box_covers_at_least_one_cell():
    assert _activation_box((0, 0, 3, 3), 8, 10, 10) == (0, 0, 1, 1)
    assert _activation_box((70, 70, 80, 80), 8, 10, 10) == (8, 8, 10, 10)
    assert _activation_box((79, 79, 80, 80), 8, 10, 10) == (9, 9, 10, 10)


def test_box_outside_the_image_is_refused():
    ex = Extractor(BlockBackbone(), "mac")
    with pytest.raises(ValueError, match="box"):
        ex.extract(scene(5), box=(10, 10, 400, 100))


def test_whitening_save_load_and_refusal(tmp_path):
    bb = BlockBackbone()
    ex = Extractor(bb, "clustermac", pca_dim=3)
    ex.fit_whitening([scene(s) for s in range(30, 38)], progress=False)
    path = tmp_path / "w.npz"
    ex.save_whitening(path)
    again = Extractor(bb, "clustermac", pca_dim=3).load_whitening(path)
    img = scene(6)
    np.testing.assert_array_equal(ex.extract(img), again.extract(img))
    with pytest.raises(ValueError, match="method"):
        Extractor(bb, "rmac").load_whitening(path)
    # The default extractor (clustermac-box) says how to keep using a whitening of the earlier default.
    with pytest.raises(ValueError, match=r"or describe with method='clustermac' \(--method clustermac\)"):
        Extractor(bb).load_whitening(path)
    with pytest.raises(ValueError, match="pca_dim") as other:
        Extractor(bb, "clustermac", pca_dim=4).load_whitening(path)
    assert "describe with method" not in str(other.value)  # only when the method differs
    with pytest.raises(ValueError, match="backbone"):
        Extractor(BlockBackbone(name="other"), "clustermac", pca_dim=3).load_whitening(path)
    with pytest.raises(ValueError, match="pca_dim"):
        Extractor(bb, "clustermac", pca_dim=4).load_whitening(path)
    with pytest.raises(ValueError, match="cluster_pooling"):
        Extractor(bb, "clustermac", pca_dim=3, cluster_pooling="box").load_whitening(path)
    # A file written before cluster_pooling was saved holds the paper's "mask" pooling.
    with np.load(path) as data:
        arrays = dict(data)
    meta = json.loads(bytes(arrays["meta"]).decode())
    del meta["settings"]["cluster_pooling"]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(tmp_path / "older.npz", **arrays)
    older = Extractor(bb, "clustermac", pca_dim=3).load_whitening(tmp_path / "older.npz")
    assert older.cluster_pooling == "mask"
    np.testing.assert_array_equal(older.extract(img), ex.extract(img))  # the same whitening, the same descriptor
    with pytest.raises(ValueError, match="cluster_pooling"):
        Extractor(bb, "clustermac", pca_dim=3, cluster_pooling="box").load_whitening(tmp_path / "older.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a whitening")
    with pytest.raises(ValueError, match="junk.npz"):
        Extractor(bb, "clustermac").load_whitening(tmp_path / "junk.npz")


def test_dataset_pca_for_clustering_is_learned_and_used():
    bb = BlockBackbone()
    ex = Extractor(bb, "clustermac", pca_dim=3, clustering_pca="dataset")
    with pytest.raises(RuntimeError, match="fit_whitening"):
        ex.extract(scene(7))
    # 12 × 16 maps: fewer locations than the per-image sample, so the PCA sees every location.
    training = [scene(s, size=(96, 128)) for s in range(40, 46)]
    ex.fit_whitening(training, progress=False)
    assert ex.pca_basis.shape == (bb.dim, 3)
    # Learned: the mean and the top-3 principal axes of all the training locations (NumPy SVD).
    local = np.concatenate([bb.features(Image.fromarray(img)).reshape(bb.dim, -1).T for img in training]).astype(
        np.float64
    )
    np.testing.assert_allclose(ex.pca_mean, local.mean(axis=0), rtol=1e-5, atol=1e-6)
    _, _, vt = np.linalg.svd(local - local.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(np.abs(np.sum(ex.pca_basis * vt[:3].T, axis=0)), 1.0, atol=1e-4)
    v = ex.extract(scene(7))
    assert abs(np.linalg.norm(v) - 1) < 1e-5
    # Used: another basis (the three weakest axes) gives other clusters, hence another descriptor.
    ex.pca_basis = np.ascontiguousarray(vt[-3:].T, dtype=np.float32)
    assert np.abs(ex.extract(scene(7)) - v).max() > 1e-3


def test_extract_many_equals_extract_and_keeps_order():
    bb = BlockBackbone()
    ex = Extractor(bb, "clustermac")
    images = [scene(s) for s in range(50, 57)]
    many = ex.extract_many(images, progress=False)
    for i, img in enumerate(images):
        np.testing.assert_array_equal(many[i], ex.extract(img))


def test_extract_folder_skips_corrupt_files_and_resumes(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for s in range(6):
        Image.fromarray(scene(60 + s)).save(folder / f"img{s}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    bb = BlockBackbone()
    out = tmp_path / "desc.npy"
    manifest = extract_folder(Extractor(bb, "rmac"), folder, out, progress=False)
    assert "broken.jpg" in manifest["failed"]
    vectors, loaded = load_descriptors(out)
    assert loaded["images"] == [f"img{s}.png" for s in range(6)]
    assert vectors.shape == (6, bb.dim)
    first = np.array(vectors)
    # A second run gives bit-identical descriptors.
    extract_folder(Extractor(bb, "rmac"), folder, out, progress=False)
    np.testing.assert_array_equal(np.load(out), first)


def test_extract_folder_resumes_from_finished_chunks(tmp_path, monkeypatch):
    import clustermac.descriptors.store as store

    monkeypatch.setattr(store, "CHUNK_SIZE", 2)
    folder = tmp_path / "photos"
    folder.mkdir()
    for s in range(5):
        Image.fromarray(scene(70 + s)).save(folder / f"img{s}.png")
    bb = BlockBackbone()
    out = tmp_path / "desc.npy"
    ex = Extractor(bb, "mac")

    # Interrupt the run after the first chunk.
    original = ex.iter_extract
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(ex, "iter_extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_folder(ex, folder, out, progress=False)
    assert not out.exists()
    parts = tmp_path / "desc.npy.parts"
    assert (parts / "chunk_000000.json").is_file()
    monkeypatch.setattr(ex, "iter_extract", original)
    bb.calls = 0
    extract_folder(ex, folder, out, progress=False)
    assert bb.calls == 3  # only the images of the two unfinished chunks
    vectors, manifest = load_descriptors(out)
    assert manifest["settings"]["method"] == "mac"
    fresh = Extractor(BlockBackbone(), "mac").extract_many(
        [str(folder / n) for n in manifest["images"]], progress=False
    )
    np.testing.assert_array_equal(np.asarray(vectors), fresh)
    assert not parts.exists()
    on_disk = json.loads((tmp_path / "desc.json").read_text())
    assert on_disk["images"] == [f"img{s}.png" for s in range(5)] and not on_disk["failed"]
    assert on_disk["settings"] == manifest["settings"] and on_disk["settings"]["dim"] == bb.dim


def test_bad_arguments():
    bb = BlockBackbone()
    with pytest.raises(ValueError, match="method"):
        Extractor(bb, "vlad")
    with pytest.raises(ValueError, match="crop"):
        Extractor(bb, "mac", crop="both")
    with pytest.raises(ValueError, match="boxes"):
        Extractor(bb, "mac").extract_many([scene(1)], boxes=[None, None], progress=False)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_rgb_at_feature_resolution_matches_a_plain_resize(mode):
    from clustermac.descriptors.extractor import rgb_at_feature_resolution

    pixels = np.random.default_rng(3).integers(0, 256, (70, 90, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    expected = np.asarray(image.convert("RGB").resize((9, 7), Image.BILINEAR)).astype(np.float32)
    result = rgb_at_feature_resolution(image, 7, 9)
    assert result.dtype == np.float32 and result.shape == (7, 9, 3)
    np.testing.assert_array_equal(result, expected)
    assert image.mode == mode  # the caller's image is left as it was
