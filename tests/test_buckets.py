"""Resolution buckets: the original's choice (expected values taken from it), including its tie rule."""

import pytest

from framepack_core.buckets import BUCKETS_640, nearest_bucket


@pytest.mark.parametrize("size, bucket", [
    ((480, 832), (480, 832)),     # exact
    ((1080, 1920), (480, 832)),   # 16:9 landscape
    ((1920, 1080), (832, 480)),   # portrait
    ((512, 512), (640, 608)),     # square: a tie, the original keeps the later bucket
    ((100, 10000), (416, 960)),   # extreme ratios clamp to the widest bucket
])
def test_nearest_bucket(size, bucket):
    assert nearest_bucket(*size) == bucket


def test_buckets_are_multiples_of_16_and_symmetric():
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in BUCKETS_640)
    assert {(w, h) for h, w in BUCKETS_640} == set(BUCKETS_640)


def test_other_resolutions_scale_the_buckets():
    assert nearest_bucket(480, 832, resolution=320) == (240, 416)


@pytest.mark.parametrize("args", [(0, 10), (10, -1), (10, 10, 0)])
def test_bad_sizes(args):
    with pytest.raises(ValueError, match="must be positive"):
        nearest_bucket(*args)
