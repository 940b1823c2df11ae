"""The change test captions and watches share: a frame is new enough to look at again when
the most-changed part of it differs from the last frame looked at by at least `min_change`,
and the frame as JPEG for the caption's image topic.

The test compares 32x32 RGB thumbnails: per thumbnail pixel the largest difference of its
three channels, averaged over every 4x4 window (1/64 of the frame, slid one pixel at a
time), and the most-changed window counts, / 255. A whole-frame mean could not see a small
object: a red circle on 5 % of a frame moved the mean by 0.017 (issue 21), while it fills
most of one window. Colour counts too (a grey thumbnail cannot tell red from green of the
same brightness).
`RecentFrames` keeps the last few camera frames decoded, so a frame that a question, a
caption and several watches look at is decoded and thumbnailed once; the decoded arrays
count in the frame-memory budget (#21.6): they are kept only within what `budget()`
allows (the service passes what the raw frames leave of `[frames] max_total_bytes`)."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

THUMBNAIL_SIDE = 32  # pixels; enough to see a scene change, cheap to compare
WINDOW_SIDE = 4  # thumbnail pixels: a window is 1/64 of the frame, so an object on 2 % of it fills one
IMAGE_QUALITY = 85


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    # Pillow's BILINEAR widens its support when shrinking: each thumbnail pixel averages its area
    image = Image.fromarray(rgb).convert("RGB").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)  # (32, 32, 3)


def change(current: np.ndarray, previous: np.ndarray) -> float:
    """How much the most-changed window of two thumbnails differs, 0..1 (see the module doc)."""
    difference = np.abs(current - previous).max(axis=2)  # (32, 32): the largest channel difference
    integral = np.zeros((THUMBNAIL_SIDE + 1, THUMBNAIL_SIDE + 1))  # (33, 33) summed-area table
    integral[1:, 1:] = difference.cumsum(axis=0).cumsum(axis=1)
    k = WINDOW_SIDE
    sums = integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]  # (29, 29) window sums
    return float(sums.max()) / (k * k * 255.0)


def changed(current: np.ndarray, previous: np.ndarray | None, min_change: float) -> bool:
    """True when there is no previous thumbnail or its most-changed window changed by `min_change` or more."""
    return previous is None or change(current, previous) >= min_change


def jpeg(rgb: np.ndarray) -> bytes:
    """The frame re-encoded as JPEG (frames may arrive as PNG; Home Assistant wants one type)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=IMAGE_QUALITY)
    return buffer.getvalue()


class RecentFrames:
    """The last `size` frames decoded (by the identity of their bytes, which the inbox keeps
    for a frame's life), each with its thumbnail once asked for. The arrays are read-only:
    every reader shares them. Their bytes stay within `budget()` (None: no bound), checked
    whenever a frame is decoded and at `trim()`: the oldest go first, and a frame larger
    than the whole budget is handed to its reader and not kept. Not thread-safe: the
    worker's alone."""

    def __init__(self, decode: Callable[[bytes], np.ndarray], size: int = 4,
                 budget: Callable[[], int | None] = lambda: None) -> None:
        self._decode = decode
        self._size = size
        self._budget = budget
        self._entries: list[list] = []  # [data, rgb, thumbnail or None], newest last
        self.num_decoded = 0  # frames decoded so far

    def rgb(self, data: bytes) -> np.ndarray:
        for entry in self._entries:
            if entry[0] is data:
                return entry[1]
        self.num_decoded += 1
        rgb = self._decode(data)  # raises FrameError for a bad frame: nothing is kept
        rgb.setflags(write=False)
        self._entries = [*self._entries[-(self._size - 1):], [data, rgb, None]]
        self.trim()
        return rgb

    def trim(self) -> None:
        """Forget the oldest decoded frames until the rest fit the budget."""
        budget = self._budget()
        if budget is None:
            return
        while self._entries and self.nbytes > budget:
            self._entries = self._entries[1:]  # a new list: a stats reader never sees one mid-change

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded frames (and thumbnails) kept."""
        return sum(entry[1].nbytes + (0 if entry[2] is None else entry[2].nbytes) for entry in self._entries)

    def thumbnail(self, rgb: np.ndarray) -> np.ndarray:
        for entry in self._entries:
            if entry[1] is rgb:
                if entry[2] is None:
                    entry[2] = thumbnail(rgb)
                return entry[2]
        return thumbnail(rgb)
