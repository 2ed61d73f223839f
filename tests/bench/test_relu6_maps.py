"""bench.pipeline.relu6_feature_maps: one uncapped backbone pass gives the ReLU6 maps bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import clustermac
from clustermac.bench.pipeline import DatasetFeatureMaps, compute_feature_maps, relu6_feature_maps
from clustermac.descriptors import Extractor

pytestmark = pytest.mark.network  # runs the embedded backbone


@pytest.fixture
def photos(tmp_path, write_photos):
    return [str(tmp_path / name) for name in write_photos(tmp_path, n=3, size=200)]


def _maps(head: str, photos: list[str], scales=(1.0,)) -> list:
    backbone = clustermac.default_backbone(n_threads=1, head=head)
    return compute_feature_maps(Extractor(backbone, "mac", scales=scales), photos, progress=False)


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 0.5)])
def test_capping_the_uncapped_maps_gives_the_relu6_pass(photos, scales):
    uncapped, relu6 = _maps("relu", photos, scales), _maps("relu6", photos, scales)
    # The uncapped head really goes above the cap (else the test could not fail).
    first = uncapped[0] if scales == (1.0,) else uncapped[0][0]
    assert float(first[0].max()) > 6.0
    maps = DatasetFeatureMaps(uncapped[:2], uncapped[2:], {"image": [uncapped[0], None]}, seconds=1.5)
    capped = relu6_feature_maps(maps)
    assert capped.seconds == 1.5 and capped.queries["image"][1] is None
    expected = {"database": relu6[:2], "whitening": relu6[2:], "image": [relu6[0]]}
    got = {"database": capped.database, "whitening": capped.whitening, "image": capped.queries["image"][:1]}
    for name, items in expected.items():
        for want, have in zip(items, got[name]):
            pairs = [(want, have)] if scales == (1.0,) else list(zip(want, have))
            for (want_map, want_rgb), (have_map, have_rgb) in pairs:
                assert have_map.dtype == want_map.dtype == np.float16
                assert np.array_equal(have_map, want_map), name  # bit for bit
                assert have_rgb is not None and np.array_equal(have_rgb, want_rgb)
    # The input is left as it was.
    assert float(first[0].max()) > 6.0
