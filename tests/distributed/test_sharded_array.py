"""ShardedArray (several row blocks seen as one N×D array) against NumPy on the concatenation."""

import numpy as np
import pytest

from clustermac.distributed import ShardedArray


@pytest.fixture
def arrays():
    rng = np.random.default_rng(3)
    parts = [rng.standard_normal((n, 5)).astype(np.float32) for n in (4, 0, 1, 7, 3)]
    return ShardedArray(parts, 5), np.concatenate(parts)


@pytest.mark.parametrize(
    "key",
    [0, 3, 4, 5, 14, -1, -15, np.int64(6), slice(None), slice(2, 9), slice(3, 4), slice(9, 2), slice(None, None, 3),
     slice(13, 1, -2), slice(-5, None), [0, 14, 5, 5, 2], np.array([-1, 3, 12], np.int32), np.array([], np.int64)],
)  # fmt: skip
def test_rows_equal_numpy(arrays, key):
    sharded, reference = arrays
    result = sharded[key]
    assert isinstance(result, np.ndarray) and result.dtype == np.float32
    np.testing.assert_array_equal(result, reference[key])


def test_boolean_rows_columns_whole_array_and_chunks(arrays):
    sharded, reference = arrays
    mask = np.arange(15) % 4 == 1
    np.testing.assert_array_equal(sharded[mask], reference[mask])
    np.testing.assert_array_equal(sharded[[1, 8], 2:4], reference[[1, 8], 2:4])
    np.testing.assert_array_equal(sharded[7, 1], reference[7, 1])
    assert sharded.shape == (15, 5) and len(sharded) == 15 and sharded.dtype == np.float32 and sharded.ndim == 2
    np.testing.assert_array_equal(np.asarray(sharded), reference)
    assert np.asarray(sharded, dtype=np.float64).dtype == np.float64
    chunks = list(sharded.iter_chunks(6))
    assert [len(c) for c in chunks] == [6, 6, 3]
    np.testing.assert_array_equal(np.concatenate(chunks), reference)
    assert len(sharded.parts) == 4  # the empty part is dropped


def test_bad_indices_and_parts_are_refused(arrays):
    sharded, _ = arrays
    for key in (15, -16, [0, 15], np.array([True, False])):
        with pytest.raises(IndexError):
            sharded[key]
    with pytest.raises(IndexError):
        sharded[np.array([0.5])]
    with pytest.raises(IndexError):
        sharded[1, 2, 3]
    with pytest.raises(ValueError, match="rows"):
        next(sharded.iter_chunks(0))
    with pytest.raises(ValueError, match="expected"):
        ShardedArray([np.zeros((2, 3), np.float32)], 5)
    empty = ShardedArray([], 5)
    assert empty.shape == (0, 5) and np.asarray(empty).shape == (0, 5) and list(empty.iter_chunks(4)) == []
    assert empty[2:9].shape == (0, 5) and empty[np.array([], np.int64)].shape == (0, 5)
