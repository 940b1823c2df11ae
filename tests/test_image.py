"""to_vision_input: PIL bilinear resize to the graph's size, RGB kept, no crop."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from npu.image import to_vision_input


def test_resize_is_bilinear_rgb_without_crop():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(300, 500, 3), dtype=np.uint8)
    out = to_vision_input(frame, 224, 224)
    assert out.shape == (1, 224, 224, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(frame).resize((224, 224), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out[0], expected)


def test_no_crop_and_channel_order_kept():
    frame = np.zeros((100, 400, 3), np.uint8)
    frame[:, :100] = (255, 0, 0)  # red strip on the left quarter
    frame[:, 300:] = (0, 0, 255)  # blue strip on the right quarter
    out = to_vision_input(frame, 64, 64)[0]
    assert tuple(out[32, 2]) == (255, 0, 0)  # stretched, not centre-cropped away
    assert tuple(out[32, 61]) == (0, 0, 255)
    assert tuple(out[32, 32]) == (0, 0, 0)


def test_same_size_is_a_copy_into_out():
    frame = np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)
    buffer = np.empty((1, 8, 6, 3), np.uint8)
    assert to_vision_input(frame, 8, 6, out=buffer) is buffer
    np.testing.assert_array_equal(buffer[0], frame)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 3), np.float32),
     np.zeros((0, 10, 3), np.uint8)],
)
def test_rejects_non_rgb_input(bad):
    with pytest.raises(ValueError, match="uint8 RGB"):
        to_vision_input(bad, 16, 16)
