"""daemon.frames.RecentFrames: a camera frame that a question, a caption and several
watches look at is decoded and thumbnailed once, shared read-only; bad frames are not kept."""

from __future__ import annotations

import numpy as np
import pytest

from daemon import frames as frame_change
from daemon.frames import RecentFrames
from protocol.frames import FrameError
from tests.fixtures_daemon import png_bytes


def test_each_frame_is_decoded_and_thumbnailed_once(monkeypatch):
    decoded, thumbnails = [], []

    def decode(data: bytes) -> np.ndarray:
        decoded.append(data)
        return np.full((24, 32, 3), len(decoded) * 40, np.uint8)

    real_thumbnail = frame_change.thumbnail
    monkeypatch.setattr(frame_change, "thumbnail", lambda rgb: thumbnails.append(1) or real_thumbnail(rgb))
    frames = RecentFrames(decode, size=2)
    first, second, third = png_bytes(size=(4, 4)), png_bytes(size=(5, 5)), png_bytes(size=(6, 6))
    rgb = frames.rgb(first)
    assert frames.rgb(first) is rgb and len(decoded) == 1  # a caption and a watch on the same frame
    assert frames.thumbnail(rgb) is frames.thumbnail(rgb) and len(thumbnails) == 1
    with pytest.raises(ValueError):
        rgb[0, 0, 0] = 1  # shared by every reader: nobody may write into it
    frames.rgb(second)
    frames.rgb(third)  # size 2: the first is forgotten
    frames.rgb(first)
    assert len(decoded) == 4


def test_a_bad_frame_is_not_kept():
    calls = []

    def decode(data: bytes) -> np.ndarray:
        calls.append(data)
        raise FrameError("bad_image", "not an image")

    frames = RecentFrames(decode)
    data = b"not an image"
    for _ in range(2):
        with pytest.raises(FrameError):
            frames.rgb(data)
    assert len(calls) == 2


def test_decoded_frames_stay_within_the_budget_the_raw_frames_leave():
    """#21.6: decoded arrays count in the frame-memory budget; one larger than all of it is
    handed to its reader and not kept."""
    room = [3 * 24 * 32 * 3]  # bytes the raw frames leave: three decoded 32x24 frames

    def decode(data: bytes) -> np.ndarray:
        return np.zeros((24, 32 * len(data) // len(small), 3), np.uint8)

    small = png_bytes(size=(4, 4))
    frames = RecentFrames(decode, size=8, budget=lambda: room[0])
    kept = [frames.rgb(bytes(bytearray(small))) for _ in range(5)]
    assert frames.nbytes == 3 * kept[0].nbytes <= room[0]
    huge = frames.rgb(small * 4)  # four times as wide: beyond the whole budget
    assert huge.shape == (24, 128, 3) and frames.nbytes == 0
    room[0] = 24 * 32 * 3  # raw frames arrived and took the room
    frames.rgb(bytes(bytearray(small)))
    frames.rgb(bytes(bytearray(small)))
    assert frames.nbytes == 24 * 32 * 3
    room[0] = 0
    frames.trim()
    assert frames.nbytes == 0
