"""The ``head=`` option of the embedded backbone: ReLU6 (as trained) or an uncapped ReLU."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clustermac.backbones import default_backbone
from clustermac.backbones import efficientnet_lite as lite


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((256, 256))


def test_relu_head_is_the_uncapped_relu6_head(photo):
    capped, uncapped = default_backbone(n_threads=1), default_backbone(n_threads=1, head="relu")
    a, b = capped.features(photo), uncapped.features(photo)
    assert a.shape == b.shape
    assert a.max() == 6.0 and b.max() > 6.0  # the cap is reached on a real photo, and lifted
    assert b.min() >= 0.0
    # Everything before the head's activation is the same graph: ReLU6 = min(ReLU, 6) bit for bit.
    np.testing.assert_array_equal(np.minimum(b, 6.0), a)


def test_heads_have_their_own_name_and_cache_file(tmp_path):
    capped, uncapped = default_backbone(n_threads=1), default_backbone(n_threads=1, head="relu")
    assert uncapped.name == capped.name + "-relu"  # recorded in whitening/descriptor/index settings
    assert default_backbone(n_threads=1, head="relu") is uncapped  # shared per head
    relu6_path = lite.efficientnet_lite0_onnx_path(directory=tmp_path)
    relu_path = lite.efficientnet_lite0_onnx_path(directory=tmp_path, head="relu")
    assert relu6_path != relu_path and "relu" in relu_path.name and "relu" not in relu6_path.name
    assert lite.efficientnet_lite0_onnx_path(directory=tmp_path) == relu6_path  # reused, not rebuilt


@pytest.mark.parametrize("head", ["relu7", "", None])
def test_unknown_head(head, tmp_path):
    with pytest.raises(ValueError, match="head"):
        default_backbone(head=head)
    with pytest.raises(ValueError, match="head"):
        lite.efficientnet_lite0_onnx_path(directory=tmp_path, head=head)
