"""protocol/frames.py: JPEG/PNG/WebP decoding, limits, decompression bombs, modes, EXIF."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from protocol import frames
from protocol.frames import FrameError, b64_image_bytes, decode_b64_image, decode_frame, probe_frame

MB = 1_000_000
LIMIT_PIXELS = 40_000_000


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking 1-bit PNG header claiming width x height, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return frames.PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 header is patched to claim width x height."""
    data = bytearray(encode(Image.new("RGB", (8, 8), (1, 2, 3)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def scene(width: int = 40, height: int = 30) -> Image.Image:
    """Green field with a red 10x10 block in the top-left corner."""
    image = Image.new("RGB", (width, height), (0, 200, 0))
    image.paste((255, 0, 0), (0, 0, 10, 10))
    return image


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decodes_jpeg_and_png_to_rgb(fmt):
    rgb = decode_frame(encode(scene(), fmt), MB, LIMIT_PIXELS)
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb[20, 30].astype(int) - (0, 200, 0)).max() <= 8
    assert np.abs(rgb[2, 2].astype(int) - (255, 0, 0)).max() <= 8
    assert probe_frame(encode(scene(), fmt)) == (fmt, 40, 30)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_bad_images(fmt):
    with pytest.raises(FrameError) as exc:
        decode_frame(encode(scene(), fmt), MB, LIMIT_PIXELS)
    assert exc.value.code == "bad_image" and "JPEG, PNG or WebP" in exc.value.message


@pytest.mark.parametrize("data", [b"", b"hello", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00"])
def test_garbage_is_a_bad_image(data):
    with pytest.raises(FrameError) as exc:
        decode_frame(data, MB, LIMIT_PIXELS)
    assert exc.value.code == "bad_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_bad(fmt):
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), fmt)
    with pytest.raises(FrameError) as exc:
        decode_frame(data[: len(data) * 2 // 3], MB, LIMIT_PIXELS)
    assert exc.value.code == "bad_image"


def test_stray_bytes_between_jpeg_segments_are_tolerated():
    data = encode(scene(), "JPEG")
    table = data.index(b"\xff\xdb")  # the first quantisation table segment
    padded = data[:table] + b"\x00\x12" + data[table:]
    assert probe_frame(padded) == ("JPEG", 40, 30)
    assert decode_frame(padded, MB, LIMIT_PIXELS).shape == (30, 40, 3)


def test_corrupt_png_crc_is_bad():
    data = bytearray(encode(scene(), "PNG"))
    data[40] ^= 0xFF  # inside the IDAT: its CRC no longer matches
    with pytest.raises(FrameError) as exc:
        decode_frame(bytes(data), MB, LIMIT_PIXELS)
    assert exc.value.code == "bad_image"


def test_byte_limit_is_checked_first():
    data = encode(scene(), "PNG")
    assert decode_frame(data, len(data), LIMIT_PIXELS).shape == (30, 40, 3)
    with pytest.raises(FrameError) as exc:
        decode_frame(data, len(data) - 1, LIMIT_PIXELS)
    assert exc.value.code == "image_too_large" and "bytes" in exc.value.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_pixel_limit_is_exact(fmt):
    data = encode(scene(), fmt)
    assert decode_frame(data, MB, 40 * 30).shape == (30, 40, 3)
    with pytest.raises(FrameError) as exc:
        decode_frame(data, MB, 40 * 30 - 1)
    assert exc.value.code == "image_too_large" and "40x30" in exc.value.message


@pytest.mark.parametrize("bomb", [png_bomb(20000, 20000), jpeg_with_size(60000, 60000)], ids=["png", "jpeg"])
def test_decompression_bomb_is_refused_from_the_header(bomb, monkeypatch):
    assert len(bomb) < 4096
    # Proof that no pixel is decoded: Pillow is never even asked to open the file.
    monkeypatch.setattr(frames.Image, "open", lambda *a, **k: pytest.fail("Pillow opened a bomb"))
    start = time.perf_counter()
    with pytest.raises(FrameError) as exc:
        decode_frame(bomb, MB, LIMIT_PIXELS)
    assert time.perf_counter() - start < 0.05
    assert exc.value.code == "image_too_large"


@pytest.mark.parametrize("size", [(20000, 20000), (10000, 10000)], ids=["pillow-error", "pillow-warning"])
def test_pillow_bomb_checks_never_escape(size):
    # With a pixel limit above Pillow's own, Pillow's DecompressionBombError (and its
    # warning, an error under this suite's filterwarnings) must still become FrameError.
    with pytest.raises(FrameError) as exc:
        decode_frame(png_bomb(*size), MB, 10**12)
    assert exc.value.code == "image_too_large"


@pytest.mark.parametrize(
    "make, fmt, expected",
    [
        (lambda: Image.new("L", (4, 3), 100), "PNG", (100, 100, 100)),
        (lambda: Image.new("LA", (4, 3), (100, 7)), "PNG", (100, 100, 100)),
        (lambda: Image.new("RGBA", (4, 3), (10, 20, 30, 0)), "PNG", (10, 20, 30)),
        (lambda: Image.new("RGB", (4, 3), (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG", (10, 20, 30)),
        (lambda: Image.new("1", (4, 3), 1), "PNG", (255, 255, 255)),
        (lambda: Image.new("I;16", (4, 3), 0x8040), "PNG", (0x80, 0x80, 0x80)),
        (lambda: Image.new("RGB", (4, 3), (10, 20, 30)).convert("CMYK"), "JPEG", (10, 20, 30)),
        (lambda: Image.new("L", (4, 3), 100), "JPEG", (100, 100, 100)),
    ],
    ids=["L", "LA", "RGBA", "P", "1", "I;16", "CMYK-jpeg", "L-jpeg"],
)
def test_every_mode_becomes_rgb(make, fmt, expected):
    rgb = decode_frame(encode(make(), fmt), MB, LIMIT_PIXELS)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - expected).max() <= 4


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(scene(40, 30), "JPEG", exif=exif.tobytes(), quality=95)
    assert probe_frame(data) == ("JPEG", 40, 30)
    rgb = decode_frame(data, MB, LIMIT_PIXELS)
    assert rgb.shape == (40, 30, 3)  # portrait now
    assert rgb[2:8, 22:28, 0].mean() > 200  # the red corner moved to the top right
    assert rgb[2:8, 2:8, 0].mean() < 50


def test_base64_variants():
    data = encode(scene(), "PNG")
    standard = base64.b64encode(data).decode()
    variants = [
        standard,
        "data:image/png;base64," + standard,
        base64.urlsafe_b64encode(data).decode().rstrip("="),
        "\n".join(standard[i:i + 76] for i in range(0, len(standard), 76)),
    ]
    for text in variants:
        assert b64_image_bytes(text, MB) == data
        assert decode_b64_image(text, MB, LIMIT_PIXELS).shape == (30, 40, 3)


@pytest.mark.parametrize("text", ["not base64!", "A", "é" * 8, "data:image/png;base64,@@@@"])
def test_invalid_base64_is_a_bad_image(text):
    with pytest.raises(FrameError) as exc:
        decode_b64_image(text, MB, LIMIT_PIXELS)
    assert exc.value.code == "bad_image"


def test_base64_size_is_checked_before_decoding():
    with pytest.raises(FrameError) as exc:
        b64_image_bytes("A" * 4_000_000, MB)
    assert exc.value.code == "image_too_large"
    raw = bytes(range(256)) * 4
    assert b64_image_bytes(base64.b64encode(raw).decode(), len(raw)) == raw


VALID = [encode(scene(16, 12), "PNG"), encode(scene(16, 12), "JPEG")]


@settings(max_examples=150, deadline=None)
@given(which=st.sampled_from(VALID), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=6),
       cut=st.integers(0, 10**6))
def test_mutated_images_only_ever_raise_frame_error(which, flips, cut):
    data = bytearray(which)
    for position, mask in flips:
        data[position % len(data)] ^= mask
    data = bytes(data[: max(1, cut % (len(data) + 1))])
    try:
        rgb = decode_frame(data, MB, 10_000)
    except FrameError as exc:
        assert exc.code in ("bad_image", "image_too_large")
    else:
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


@pytest.mark.parametrize("options", [{"lossless": True}, {"quality": 80}, {"quality": 80, "exif": b"Exif\x00\x00"}])
def test_webp_frames_are_probed_and_decoded(options):
    """The OpenAI API's clients send WebP data URIs too (#22): lossy VP8, lossless VP8L, extended VP8X."""
    buffer = io.BytesIO()
    Image.new("RGB", (321, 123), (10, 200, 30)).save(buffer, format="WEBP", **options)
    data = buffer.getvalue()
    assert probe_frame(data) == ("WEBP", 321, 123)
    rgb = decode_frame(data, 10**7, 10**7)
    assert rgb.shape == (123, 321, 3) and abs(int(rgb[60, 160, 1]) - 200) < 8
    with pytest.raises(FrameError) as truncated:
        decode_frame(data[:len(data) // 2], 10**7, 10**7)
    assert truncated.value.code == "bad_image"


def test_a_webp_header_claiming_a_huge_canvas_is_refused_before_decoding():
    header = b"RIFF" + (30).to_bytes(4, "little") + b"WEBPVP8X" + (10).to_bytes(4, "little") + bytes(4)
    bomb = header + (19999).to_bytes(3, "little") + (19999).to_bytes(3, "little")
    with pytest.raises(FrameError) as refused:
        decode_frame(bomb, 10**7, 40_000_000)
    assert refused.value.code == "image_too_large"
