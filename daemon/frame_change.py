"""The change test captions and watches share: a frame is new enough to look at again when
its grey 32x32 thumbnail differs from the last one looked at by at least `min_change`
(mean absolute difference / 255), and the frame as JPEG for the caption's image topic."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

THUMBNAIL_SIDE = 32  # pixels; enough to see a scene change, cheap to compare
IMAGE_QUALITY = 85


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    image = Image.fromarray(rgb).convert("L").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)  # (32, 32)


def changed(current: np.ndarray, previous: np.ndarray | None, min_change: float) -> bool:
    """True when there is no previous thumbnail or the picture changed by `min_change` or more."""
    return previous is None or float(np.abs(current - previous).mean()) / 255.0 >= min_change


def jpeg(rgb: np.ndarray) -> bytes:
    """The frame re-encoded as JPEG (frames may arrive as PNG; Home Assistant wants one type)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=IMAGE_QUALITY)
    return buffer.getvalue()
