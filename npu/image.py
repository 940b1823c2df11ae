"""Frames -> the vision graph's input: resize the whole RGB frame to the graph's size (no
crop, aspect not kept), then lay it out as the graph takes it.

Resize methods (`ImagePreprocess.resize`):

- "bicubic": PIL's bicubic filter, which averages over the source footprint when
  shrinking (antialiased). InternVL was trained on this: its `load_image` resizes a PIL
  image with `T.Resize(..., BICUBIC)`, and transformers' InternVL image processor
  (resample 3) does the same. The default.
- "bilinear": plain bilinear interpolation of the 2x2 nearest pixels, no antialiasing,
  half-pixel centres, edges clamped, in OpenCV's fixed-point arithmetic: what the board
  runtimes do (`cv::resize` with its default INTER_LINEAR in m5stack/StackFlow
  main_vlm src/runner/LLM.hpp and AXERA's ax-llm). Select it to reproduce their
  answers; it aliases on large downscales.
- "pil-bilinear": PIL's bilinear filter (antialiased), what a checkpoint whose image
  processor says resample 2 was trained on (vlmd's demo model is one).

Layouts, read from the graph (npu.shapes): uint8 NHWC [1,H,W,3], the pixels as they are
(the graph normalises them), or float32 NCHW [1,3,H,W], normalised here as InternVL's
preprocessing does: /255, minus mean, divided by std (ImageNet's unless the checkpoint's
image processor says otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_METHODS = ("bicubic", "bilinear", "pil-bilinear")
_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "pil-bilinear": Image.Resampling.BILINEAR}
# transformers' image processors name their filter by PIL's number (`resample`)
RESAMPLE_CODES = {3: "bicubic", 2: "pil-bilinear"}


def resize_rgb(rgb: np.ndarray, height: int, width: int, method: str = "bicubic") -> np.ndarray:
    """uint8 RGB [h, w, 3] -> uint8 [height, width, 3] by `method` (see the module docstring).

    Raises ValueError for anything but a non-empty uint8 array of shape [h, w, 3].
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"expected a uint8 RGB image [h, w, 3], got {rgb.dtype} {list(rgb.shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"target size {height}x{width} is empty")
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method {method!r}: expected one of {', '.join(RESIZE_METHODS)}")
    if rgb.shape[:2] == (height, width):
        return rgb
    if method == "bilinear":
        return _plain_bilinear(rgb, height, width)
    image = Image.fromarray(np.ascontiguousarray(rgb))  # uint8 [h, w, 3] is RGB
    return np.asarray(image.resize((width, height), _PIL_FILTERS[method]))


_WEIGHT_ONE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE: 11-bit fixed-point interpolation weights


def _source_positions(n_source: int, n_target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each target pixel: the lower and upper source pixel and their fixed-point weights
    (half-pixel centres; positions before the first or past the last pixel take that pixel)."""
    position = (np.arange(n_target, dtype=np.float64) + 0.5) * (n_source / n_target) - 0.5
    position = np.clip(position, 0.0, n_source - 1).astype(np.float32)
    lower = np.floor(position).astype(np.intp)
    upper = np.minimum(lower + 1, n_source - 1)
    lower_weight = np.rint((1 - (position - lower)) * _WEIGHT_ONE).astype(np.int64)
    return lower, upper, lower_weight, _WEIGHT_ONE - lower_weight


def _plain_bilinear(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """2x2 bilinear interpolation in OpenCV's INTER_LINEAR fixed-point arithmetic (11-bit
    weights, a horizontal then a vertical pass, rounded as its vectorised kernel rounds),
    so the result is the board runtimes' `cv::resize` output to within 1 on a few pixels."""
    x0, x1, wx0, wx1 = _source_positions(rgb.shape[1], width)
    y0, y1, wy0, wy1 = _source_positions(rgb.shape[0], height)

    def horizontal(source_rows: np.ndarray) -> np.ndarray:
        # only the source rows the vertical pass reads, widened after the gather: a 6000x6000
        # frame would be 864 MB as int64, these are (height, width, 3)
        picked = rgb[source_rows]  # (height, w, 3) uint8
        return picked[:, x0].astype(np.int64) * wx0[None, :, None] + \
            picked[:, x1].astype(np.int64) * wx1[None, :, None]  # (height, width, 3), scale 2^11

    top = (wy0[:, None, None] * (horizontal(y0) >> 4)) >> 16
    bottom = (wy1[:, None, None] * (horizontal(y1) >> 4)) >> 16
    return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)  # (height, width, 3)


@dataclass(frozen=True)
class ImagePreprocess:
    """How frames become vision-graph inputs: the resize method and, for float32 NCHW
    graphs, the normalisation (per-channel mean and std of pixels scaled to 0..1)."""

    resize: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = "InternVL's preprocessing (bicubic, ImageNet mean/std)"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"resize method {self.resize!r}: expected one of {', '.join(RESIZE_METHODS)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean {self.mean} / std {self.std}: expected three values each, std > 0")

    @staticmethod
    def input_buffer(layout: str, height: int, width: int) -> np.ndarray:
        """A zeroed vision-graph input: uint8 (1, H, W, 3) for "nhwc", float32 (1, 3, H, W) for "nchw"."""
        if layout == "nchw":
            return np.zeros((1, 3, height, width), np.float32)  # (1, 3, H, W)
        if layout == "nhwc":
            return np.zeros((1, height, width, 3), np.uint8)  # (1, H, W, 3)
        raise ValueError(f"vision layout {layout!r}: expected 'nhwc' or 'nchw'")

    def prepare(self, rgb: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Write uint8 RGB [h, w, 3] into `out` (an `input_buffer`): resized, and for a
        float32 NCHW buffer normalised; returns `out`. ValueError for a non-RGB frame."""
        if out.dtype == np.uint8 and out.ndim == 4 and out.shape[3] == 3:
            out[0] = resize_rgb(rgb, out.shape[1], out.shape[2], self.resize)
        elif out.dtype == np.float32 and out.ndim == 4 and out.shape[1] == 3:
            resized = resize_rgb(rgb, out.shape[2], out.shape[3], self.resize)  # (H, W, 3) uint8
            channels = out[0]  # (3, H, W)
            np.copyto(channels, resized.transpose(2, 0, 1))
            channels /= np.float32(255.0)  # divided, as InternVL's ToTensor and the reference graph do
            channels -= np.asarray(self.mean, np.float32)[:, None, None]
            channels /= np.asarray(self.std, np.float32)[:, None, None]
        else:
            raise ValueError(f"not a vision input buffer: {out.dtype} {list(out.shape)}")
        return out

    @classmethod
    def from_image_processor(cls, config: dict, resize: str | None = None,
                             source: str = "preprocessor_config.json") -> ImagePreprocess:
        """From a transformers image processor config (`resample`, `image_mean`, `image_std`;
        absent keys: InternVL's); an explicit `resize` wins over the config's filter."""
        method = resize or RESAMPLE_CODES.get(config.get("resample"), "bicubic")
        return cls(method, tuple(config.get("image_mean") or IMAGENET_MEAN),
                   tuple(config.get("image_std") or IMAGENET_STD), source)


def to_vision_input(rgb: np.ndarray, height: int, width: int, out: np.ndarray | None = None,
                    resize: str = "bicubic") -> np.ndarray:
    """uint8 RGB [h, w, 3] -> uint8 [1, height, width, 3] (written into `out` when given)."""
    if out is None:
        out = ImagePreprocess.input_buffer("nhwc", height, width)
    elif out.shape != (1, height, width, 3) or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 [1, {height}, {width}, 3], got {out.dtype} {list(out.shape)}")
    return ImagePreprocess(resize).prepare(rgb, out)
