"""Writes the files in this folder with clustermac 0.1.0 (commit bfb8e7d, before the redesign).

They are checked in so that later versions prove they still load what 0.1.0 wrote and give
the same descriptors from it (tests/test_legacy_files.py). Run once, with that version
installed: ``python tests/data/v0.1.0/make_fixtures.py``. Do not re-run with a newer version.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

import clustermac

HERE = Path(__file__).resolve().parent
MAX_SIZE = 192  # 6×4 feature maps at the embedded backbone's stride of 32
WHITENING_DIM = 6


def make_images() -> list[Path]:
    """Ten small smooth RGB images, seeded, as PNG (lossless, so every decoder agrees)."""
    folder = HERE / "images"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(2026)
    paths = []
    for i in range(10):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((192, 144), Image.BILINEAR)
        path = folder / f"img{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def main() -> None:
    paths = make_images()
    train, database = paths[:7], paths[6:]
    expected = {}
    for method, options in (
        ("clustermac", {}),
        ("rmac", {}),
        ("gem", {}),
        ("clustermac", {"cluster_pooling": "box", "n_clusters": (3,), "add_grid_regions": True}),
    ):
        ex = clustermac.Extractor(
            method=method,
            max_size=MAX_SIZE,
            whitening_dim=WHITENING_DIM,
            n_clusters=options.pop("n_clusters", (2, 3)),
            rgb_clusters=2,
            **options,
        )
        ex.fit_whitening([str(p) for p in train], progress=False)
        tag = method + ("_box_grid" if ex.cluster_pooling == "box" else "")
        ex.save_whitening(HERE / f"whitening_{tag}.npz")
        expected[tag] = {
            "settings": ex.settings(),
            "descriptors": ex.extract_many([str(p) for p in database], progress=False).tolist(),
            "query_crop_image": ex.extract(str(database[0]), box=(20, 10, 150, 120)).tolist(),
        }
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1))

    # Descriptor files of `clustermac extract` (desc.npy + desc.json).
    ex = clustermac.Extractor(method="rmac", max_size=MAX_SIZE, whitening_dim=WHITENING_DIM)
    ex.load_whitening(HERE / "whitening_rmac.npz")
    clustermac.extract_folder(ex, HERE / "images", HERE / "desc.npy", progress=False, names=[p.name for p in database])
    shutil.rmtree(HERE / "desc.npy.parts", ignore_errors=True)

    vectors, manifest = clustermac.load_descriptors(HERE / "desc.npy", mmap=False)
    index = clustermac.Index(vectors.shape[1])
    index.add(vectors, manifest["images"])
    index.save(HERE / "exact.index")
    faiss_index = clustermac.Index(vectors.shape[1], backend="faiss", faiss_factory="Flat")
    faiss_index.add(vectors, manifest["images"])
    faiss_index.save(HERE / "faiss.index")

    # An 8-bit feature-map store with cluster labels.
    ex = clustermac.Extractor(method="clustermac", max_size=MAX_SIZE, n_clusters=(2, 3), rgb_clusters=2)
    with clustermac.FeatureMapStoreWriter(HERE / "maps.cmfm") as writer:
        for p in database:
            fmap, rgb = ex.feature_map(ex.prepare(str(p)))
            writer.add(fmap, p.name, labels=ex.cluster_labels(fmap, rgb))


if __name__ == "__main__":
    main()
