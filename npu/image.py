"""Frames -> the vision graph's input: bilinear RGB resize to the graph's size, no crop.

The aspect ratio is not kept: the whole frame is stretched onto the graph's square,
as the board's pipeline does (no letterbox, no centre crop). Resampling is PIL's
bilinear filter, which also averages over the source footprint when shrinking.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_vision_input(rgb: np.ndarray, height: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB [h, w, 3] -> uint8 [1, height, width, 3] (written into `out` when given).

    Raises ValueError for anything but a non-empty uint8 array of shape [h, w, 3].
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"expected a uint8 RGB image [h, w, 3], got {rgb.dtype} {list(rgb.shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"target size {height}x{width} is empty")
    if out is None:
        out = np.empty((1, height, width, 3), np.uint8)  # (1, H, W, 3)
    elif out.shape != (1, height, width, 3) or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 [1, {height}, {width}, 3], got {out.dtype} {list(out.shape)}")
    if rgb.shape[:2] == (height, width):
        out[0] = rgb
        return out
    image = Image.fromarray(np.ascontiguousarray(rgb))  # uint8 [h, w, 3] is RGB
    out[0] = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return out
