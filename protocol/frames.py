"""Frame decoding: JPEG/PNG/WebP bytes -> RGB uint8 array, refusing what a board cannot afford.

Frames arrive as raw bytes and are decoded only when a job uses one, so a frame is
judged in this order, each step cheap before the next costly one:

1. its byte size against `max_bytes`;
2. its format and dimensions, read from the header by `probe_frame` (our own few
   lines, not Pillow), against JPEG/PNG/WebP and `max_pixels`: a 20000x20000 "bomb" of a
   few kilobytes is refused here, before any pixel buffer exists;
3. the pixels, decoded by Pillow; a truncated or corrupt file is `bad_image`.

The result is `(H, W, 3) uint8` RGB with the EXIF orientation applied (cameras and
phones store rotated sensors' frames unrotated and say so in EXIF), alpha dropped,
and 16-bit grey scaled to 8 bits.

Errors are `FrameError(code, message)` with code `bad_image` or `image_too_large`;
nothing else escapes, Pillow's own decompression-bomb error and warning included.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct

import numpy as np
from PIL import Image, ImageOps

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
# JPEG start-of-frame markers carry the dimensions: C0-CF except DHT (C4), JPG (C8), DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and RST0-7 (SOI/EOI handled by the caller).
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_DATA_URL_RE = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)


class FrameError(ValueError):
    """A frame vlmd will not use. `code` is `bad_image` or `image_too_large`."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def probe_frame(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; format is "PNG", "JPEG" or "WEBP".

    Raises FrameError("bad_image") for anything else or a header it cannot read.
    """
    if data.startswith(PNG_SIGNATURE):
        return ("PNG", *_png_size(data))
    if data.startswith(JPEG_SOI):
        return ("JPEG", *_jpeg_size(data))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("WEBP", *_webp_size(data))
    raise FrameError("bad_image", "not a JPEG, PNG or WebP image (only those formats are accepted)")


def _webp_size(data: bytes) -> tuple[int, int]:
    """The first chunk's size fields (the WebP container spec): lossy VP8, lossless VP8L, extended VP8X."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = (v & 0x3FFF for v in struct.unpack("<HH", data[26:30]))
    elif chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8X" and len(data) >= 30:
        width, height = int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    else:
        raise FrameError("bad_image", "WebP without a readable VP8/VP8L/VP8X header (truncated or corrupt)")
    if width == 0 or height == 0:
        raise FrameError("bad_image", f"WebP with an empty size {width}x{height}")
    return width, height


def _png_size(data: bytes) -> tuple[int, int]:
    # The first chunk must be IHDR: length (4) "IHDR" width (4) height (4).
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise FrameError("bad_image", "PNG without an IHDR header")
    width, height = struct.unpack(">II", data[16:24])
    if width == 0 or height == 0:
        raise FrameError("bad_image", f"PNG with an empty size {width}x{height}")
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Walk the marker segments up to the first start-of-frame."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:  # stray bytes between segments: skip them, as decoders do
            pos += 1
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (_JPEG_SOS, _JPEG_EOI):
            break
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            if width == 0 or height == 0:
                raise FrameError("bad_image", f"JPEG with an unsupported size {width}x{height}")
            return width, height
        if length < 2:
            raise FrameError("bad_image", f"corrupt JPEG: segment length {length} at byte {pos}")
        pos += 2 + length
    raise FrameError("bad_image", "JPEG without a frame header (truncated or corrupt)")


def decode_frame(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode a JPEG, PNG or WebP frame to a (H, W, 3) uint8 RGB array. Raises FrameError."""
    if len(data) > max_bytes:
        raise FrameError("image_too_large", f"image is {len(data)} bytes, the limit is {max_bytes}")
    _, width, height = probe_frame(data)
    _check_pixels(width, height, max_pixels)
    try:
        return _decode_pixels(data, max_pixels)
    except FrameError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Only reachable when max_pixels is above Pillow's own limit.
        raise FrameError("image_too_large", f"image refused by the decoder: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt input
        raise FrameError("bad_image", f"cannot decode image: {type(exc).__name__}: {exc}") from None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise FrameError(
            "image_too_large", f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}"
        )


def _decode_pixels(data: bytes, max_pixels: int) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["JPEG", "PNG", "WEBP"]) as image:
        _check_pixels(*image.size, max_pixels)  # the decoder's view, in case it differs
        image.load()
        # in place: without an Orientation tag exif_transpose returns a copy (Pillow's ImageOps
        # docs), a second full-size image while the frame is decoded (144 MB at 6000x6000)
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8; 16-bit grey keeps its top 8 bits."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I"):
        grey = np.asarray(image)  # (H, W) uint16 or int32 holding 16-bit values
        grey8 = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)  # (H, W)
        return np.repeat(grey8[:, :, None], 3, axis=2)  # (H, W, 3)
    rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise FrameError("bad_image", f"decoder returned shape {rgb.shape}")
    return rgb


def decode_b64_image(text: str, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode an inline image: base64 (standard or URL-safe, padding optional,
    whitespace ignored, a `data:image/...;base64,` prefix allowed) of a JPEG or PNG."""
    return decode_frame(b64_image_bytes(text, max_bytes), max_bytes, max_pixels)


def b64_image_bytes(text: str, max_bytes: int) -> bytes:
    """The raw bytes of an inline image, size-checked before decoding. Raises FrameError."""
    body = _DATA_URL_RE.sub("", text.strip(), count=1)
    compact = "".join(body.split())
    if len(compact) * 3 // 4 > max_bytes + 2:
        raise FrameError("image_too_large", f"image_b64 decodes to more than {max_bytes} bytes")
    try:
        raw = compact.encode("ascii")
        raw = raw.translate(None, b"=").replace(b"-", b"+").replace(b"_", b"/")
        raw += b"=" * (-len(raw) % 4)
        return base64.b64decode(raw, validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise FrameError("bad_image", f"image_b64 is not valid base64: {exc}") from None
