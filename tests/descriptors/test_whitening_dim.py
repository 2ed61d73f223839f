"""Dimension reduction learned with the whitening: `fit-whitening --dim`, recorded in the file and taken
by whoever loads it; an explicitly different dimension is refused."""

from __future__ import annotations

import numpy as np
import pytest

import clustermac
from clustermac.cli import main


def test_fit_whitening_dim_is_recorded_and_used_by_extract(tmp_path, pooling_model, write_photos):
    model, _, _ = pooling_model(tmp_path / "tiny.onnx", 512, 16, preset="vgg16")
    write_photos(tmp_path / "train", n=5, size=128)
    names = write_photos(tmp_path / "photos", n=3, size=128)
    common = ["--backbone", str(model), "--method", "rmac", "--max-size", "128", "--threads", "1"]
    w = tmp_path / "w.npz"
    assert main(["fit-whitening", str(tmp_path / "train"), "--out", str(w), "--dim", "16", "--quiet", *common]) == 0
    out = tmp_path / "d.npy"
    assert (
        main(["extract", str(tmp_path / "photos"), "--out", str(out), "--whitening", str(w), "--quiet", *common]) == 0
    )
    vectors, manifest = clustermac.load_descriptors(out)
    assert vectors.shape == (len(names), 16) and manifest["settings"]["whitening_dim"] == 16
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    backbone = clustermac.Backbone(model, n_threads=1)
    loaded = clustermac.Extractor(backbone, "rmac", max_size=128).load_whitening(w)
    assert (
        loaded.dim == 16 and loaded.whitening_projection.shape == (16, 512) and loaded.settings()["whitening_dim"] == 16
    )
    np.testing.assert_allclose(loaded.extract(str(tmp_path / "photos" / names[0])), vectors[0], atol=1e-5)
    with pytest.raises(ValueError, match="whitening_dim: file has 16, extractor has 8"):
        clustermac.Extractor(backbone, "rmac", max_size=128, whitening_dim=8).load_whitening(w)
    # Without --dim: as many dimensions as the training vectors allow.
    full = tmp_path / "full.npz"
    assert main(["fit-whitening", str(tmp_path / "train"), "--out", str(full), "--quiet", *common]) == 0
    assert clustermac.Extractor(backbone, "rmac", max_size=128).load_whitening(full).dim > 16
