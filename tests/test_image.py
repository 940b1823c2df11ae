"""Frames -> vision inputs (npu/image.py), each resize method against an implementation it
must equal that is not the code under test:

- "bicubic" and "pil-bilinear": transformers' InternVL image processor (GotOcr2, PIL
  backend) with resample 3 / 2, which is how InternVL checkpoints are fed in transformers;
- "bilinear": OpenCV's `cv2.resize` INTER_LINEAR, the call the board runtimes make
  (StackFlow main_vlm LLM.hpp, ax-llm), and a per-pixel Python reference of its formula;
- the float32 NCHW layout: the same processor's normalised `pixel_values`.
"""

from __future__ import annotations

import numpy as np
import pytest

try:  # the dev extra's; README's torch-free run skips the one test that needs it (#21.15)
    import cv2
except ModuleNotFoundError:
    cv2 = None

from npu.image import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess, resize_rgb, to_vision_input

SIZES = [((300, 500), (224, 224)), ((480, 640), (448, 448)), ((120, 90), (364, 364)), ((13, 17), (7, 5))]


def frame(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def transformers_pixels(rgb: np.ndarray, height: int, width: int, resample: int, normalise: bool) -> np.ndarray:
    """transformers' InternVL image processor on one RGB frame: float32 (3, H, W); skips the
    calling test, saying why, where transformers (the dev extra) is not installed."""
    pytest.importorskip("transformers", reason="the oracle is transformers' image processor (the dev extra)")
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    processor = GotOcr2ImageProcessorPil(size={"height": height, "width": width}, resample=resample,
                                         crop_to_patches=False, do_rescale=normalise, do_normalize=normalise,
                                         image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    return np.asarray(processor(rgb, return_tensors="np")["pixel_values"][0], np.float32)


@pytest.mark.parametrize("source, target", SIZES)
@pytest.mark.parametrize("method, resample", [("bicubic", 3), ("pil-bilinear", 2)])
def test_pil_filters_resize_as_transformers_internvl_processor(source, target, method, resample):
    rgb = frame(1, *source)
    ours = resize_rgb(rgb, *target, method)
    theirs = transformers_pixels(rgb, *target, resample, normalise=False)  # (3, H, W), values 0..255
    np.testing.assert_array_equal(ours.transpose(2, 0, 1).astype(np.float32), theirs)


@pytest.mark.parametrize("source, target", SIZES)
def test_float32_nchw_input_is_normalised_as_transformers_does(source, target):
    rgb = frame(2, *source)
    out = ImagePreprocess().prepare(rgb, ImagePreprocess.input_buffer("nchw", *target))
    assert out.shape == (1, 3, *target) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], transformers_pixels(rgb, *target, 3, normalise=True), rtol=0, atol=2e-6)


def reference_linear(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """cv::resize INTER_LINEAR for uint8 written out per pixel: half-pixel centres, clamped
    edges, 11-bit weights, the vectorised kernel's rounding."""
    def taps(n_src: int, n_dst: int, i: int) -> tuple[int, int, int]:
        f = np.float32((i + 0.5) * (n_src / n_dst) - 0.5)
        s = int(np.floor(f))
        frac = np.float32(f - s)
        if s < 0:
            s, frac = 0, np.float32(0)
        if s >= n_src - 1:
            s, frac = n_src - 1, np.float32(0)
        weight = int(np.rint((1 - frac) * 2048))
        return s, min(s + 1, n_src - 1), weight

    out = np.zeros((height, width, 3), np.uint8)
    for y in range(height):
        y0, y1, wy = taps(rgb.shape[0], height, y)
        for x in range(width):
            x0, x1, wx = taps(rgb.shape[1], width, x)
            for c in range(3):
                top = int(rgb[y0, x0, c]) * wx + int(rgb[y0, x1, c]) * (2048 - wx)
                bottom = int(rgb[y1, x0, c]) * wx + int(rgb[y1, x1, c]) * (2048 - wx)
                value = (((wy * (top >> 4)) >> 16) + (((2048 - wy) * (bottom >> 4)) >> 16) + 2) >> 2
                out[y, x, c] = min(max(value, 0), 255)
    return out


@pytest.mark.parametrize("source, target", [((13, 17), (7, 5)), ((9, 6), (20, 15)), ((40, 30), (40, 31))])
def test_plain_bilinear_follows_the_formula(source, target):
    rgb = frame(3, *source)
    np.testing.assert_array_equal(resize_rgb(rgb, *target, "bilinear"), reference_linear(rgb, *target))


@pytest.mark.parametrize("source, target", SIZES + [((1080, 1920), (448, 448)), ((448, 448), (224, 224))])
def test_plain_bilinear_is_what_the_board_runtimes_cv_resize_gives(source, target):
    if cv2 is None:
        pytest.skip("opencv-python-headless is not installed (the dev extra)")
    rgb = frame(4, *source)
    ours = resize_rgb(rgb, *target, "bilinear").astype(np.int16)
    theirs = cv2.resize(rgb, (target[1], target[0]), interpolation=cv2.INTER_LINEAR).astype(np.int16)
    difference = np.abs(ours - theirs)
    # OpenCV rounds a row's last few pixels with its scalar kernel: off by one there at most
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_plain_bilinear_aliases_where_the_antialiased_filters_average():
    stripes = np.zeros((80, 80, 3), np.uint8)
    stripes[:, np.arange(80) % 5 < 2] = 255  # bright columns 0-1 of every 5, shrunk 5x
    plain = resize_rgb(stripes, 16, 16, "bilinear")
    assert plain.max() == 0  # every sample falls on a dark column: the stripes vanish
    for method in ("bicubic", "pil-bilinear"):
        assert 60 < resize_rgb(stripes, 16, 16, method).mean() < 150, method  # about 2/5 of 255


def test_no_crop_and_channel_order_kept():
    frame_ = np.zeros((100, 400, 3), np.uint8)
    frame_[:, :100] = (255, 0, 0)  # red strip on the left quarter
    frame_[:, 300:] = (0, 0, 255)  # blue strip on the right quarter
    for method in ("bicubic", "bilinear", "pil-bilinear"):
        out = to_vision_input(frame_, 64, 64, resize=method)[0]
        assert tuple(out[32, 2]) == (255, 0, 0), method  # stretched, not centre-cropped away
        assert tuple(out[32, 61]) == (0, 0, 255), method
        assert tuple(out[32, 32]) == (0, 0, 0), method


def test_same_size_is_a_copy_into_out():
    frame_ = np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)
    buffer = np.empty((1, 8, 6, 3), np.uint8)
    assert to_vision_input(frame_, 8, 6, out=buffer) is buffer
    np.testing.assert_array_equal(buffer[0], frame_)


def test_preprocess_from_an_image_processor_config():
    assert ImagePreprocess.from_image_processor({"resample": 2}).resize == "pil-bilinear"
    assert ImagePreprocess.from_image_processor({"resample": 3, "image_mean": [0.5] * 3}).mean == (0.5, 0.5, 0.5)
    assert ImagePreprocess.from_image_processor({}).resize == "bicubic"
    assert ImagePreprocess.from_image_processor({"resample": 2}, resize="bilinear").resize == "bilinear"
    with pytest.raises(ValueError, match="resize method"):
        ImagePreprocess("area")
    with pytest.raises(ValueError, match="not a vision input buffer"):
        ImagePreprocess().prepare(frame(0, 4, 4), np.zeros((1, 4, 4, 3), np.float32))


@pytest.mark.parametrize(
    "bad",
    [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 3), np.float32),
     np.zeros((0, 10, 3), np.uint8)],
)
def test_rejects_non_rgb_input(bad):
    with pytest.raises(ValueError, match="uint8 RGB"):
        to_vision_input(bad, 16, 16)
