"""Hostile inputs for vlmd's inbound topics: hand-written cases and hypothesis-made ones.

A `Case` is one message to publish: which inbound topic (`ask`, `cancel`, `frame`), the
payload bytes, optional MQTT 5 properties, and how many outputs (finals on a reply
topic or messages on `<root>/error`) the daemon owes for it. tests/test_hostile.py
sends them at a running daemon; bench and other tests may reuse them.
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

ASK_FIELDS = ("v", "id", "text", "camera", "image_b64", "frames", "max_tokens", "temperature", "top_p", "top_k",
              "repetition_penalty", "seed", "stream", "reply_to", "expires_ms", "system")


@dataclass
class Case:
    kind: str  # "ask" | "cancel" | "frame"
    payload: bytes
    camera: str = ""  # frames: the topic level after frame/
    response_topic: str | None = None  # MQTT 5 property on asks
    correlation_data: bytes | None = None
    user_properties: list[tuple[str, str]] | None = None  # MQTT 5
    payload_format: int | None = None  # MQTT 5 Payload Format Indicator (1 claims UTF-8)
    label: str = ""


# -- images ---------------------------------------------------------------------------


def png(size=(16, 12), mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (size[1], size[0]), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(size=(16, 12), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 90).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(side: int = 20000) -> bytes:
    """A real decompression bomb: a 1-bit side x side PNG of zeros, about 50 kB on the
    wire, 400 megapixels (1.2 GB as RGB) when decoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed 1-bit pixels
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def jpeg_huge_header() -> bytes:
    """A JPEG whose frame header claims 65000 x 65000 pixels."""
    data = bytearray(jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def bad_images() -> dict[str, bytes]:
    good_png, good_jpeg = png(), jpeg()
    corrupt_png = bytearray(good_png)
    corrupt_png[40:60] = b"\xff" * 20
    return {
        "truncated_png": good_png[: len(good_png) // 2],
        "corrupt_png": bytes(corrupt_png),
        "truncated_jpeg": good_jpeg[: len(good_jpeg) // 3],
        "corrupt_jpeg": good_jpeg[:200] + bytes(range(256)) * 4,
        "header_only_png": good_png[:33],
        "zero_size_png": good_png[:16] + b"\x00" * 8 + good_png[24:],
        "jpeg_no_sof": b"\xff\xd8\xff\xd9",
        "gif": b"GIF89a" + b"\x00" * 20,
        "png_bomb": png_bomb(),
        "jpeg_huge_header": jpeg_huge_header(),
        "random": bytes(random.Random(1).randrange(256) for _ in range(500)),
    }


def odd_good_images() -> dict[str, bytes]:
    """Unusual but valid images: each must be answered normally."""
    return {"png_1x1": png((1, 1)), "png_grey16": png((8, 8), "I;16"), "png_rgba": png((9, 7), "RGBA"),
            "png_palette": png((5, 5), "P"), "jpeg_cmyk": jpeg((8, 8), "CMYK"), "jpeg_grey": jpeg((8, 8), "L")}


# -- hand-written cases -------------------------------------------------------------------


def _ask(label: str, body, **extra) -> Case:
    payload = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=extra.pop("ascii", True)).encode()
    return Case("ask", payload, label=label, **extra)


def hand_written(root: str, max_payload_bytes: int, max_frame_bytes: int) -> list[Case]:
    """Every class of bad input named in the hardening issue, each as a few cases."""
    cases: list[Case] = []
    n = iter(range(10**9))

    def rid() -> str:
        return f"h{next(n)}"

    raw = [b"", b"{", b"nul", b"\xff\xfe\x00", b"{'a': 1}", b"[1, 2]", b'"text"', b"1e999999", b"NaN", b"null",
           b'{"id": "x", "text": "t"} trailing', b'{"text": "t", "text": 5}', b"\xef\xbb\xbf{\"text\": \"bom\"}",
           b'{"text": "\xc0\xaf overlong"}', b'{"text": "\xed\xa0\x80 cesu"}', b'{"id": "\xff", "text": "x"}',
           b'{"text": Infinity}', b'{"text": "x", "max_tokens": -Infinity}', b"[" * 10000, b"{\"a\":" * 5000,
           b"[" * 1_000_000, b'{"id": "deep", "text": "x", "n": ' + b"[" * 5000 + b"]" * 5000 + b"}"]
    cases += [_ask(f"raw{i}", body) for i, body in enumerate(raw)]
    huge = "x" * (max_payload_bytes + 10)
    cases += [
        _ask("huge_text_with_id", {"id": rid(), "text": huge}),
        _ask("huge_no_id", {"text": huge}),
        _ask("huge_id_late", {"pad": huge, "id": rid(), "text": "x"}),
        _ask("long_text", {"id": rid(), "text": "y" * 4001}),
        _ask("wide_json", b"{" + b",".join(b'"k%d": %d' % (i, i) for i in range(5000)) + b', "text": "x"}'),
    ]
    odd_text = ["\u202eevil\u202c", "\u200b\u200d\ufeff", "🙂" * 1000, "\x00nul", "a\u0085b", "\U0010fffd",
                "e\u0301" * 300, "ﷺ" * 100, "\ud800", "\udfff lone", " \t\n ", "", "\u3000"]
    for i, text in enumerate(odd_text):
        cases.append(_ask(f"text{i}", {"id": rid(), "text": text, "max_tokens": 3}))
        cases.append(_ask(f"text_utf8_{i}", {"id": rid(), "text": text, "max_tokens": 3}, ascii=False)
                     if "\ud800" not in text and "\udfff" not in text else _ask(f"text_esc{i}", {"id": rid(), "text": text}))
    odd_ids = ["", "a/b", "#", "+", "x" * 129, "a\x01", "a\u0085", "a\uffff", "a\ufdd0", "a\U0001fffe", "\ud800",
               5, None, [], {"a": 1}, True, "é" * 128, "🙂" * 128, " ", "../..", "$SYS"]
    cases += [_ask(f"id{i}", {"id": value, "text": "x"}) for i, value in enumerate(odd_ids)]
    options = [("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 10**30), ("max_tokens", 1.5),
               ("max_tokens", "3"), ("max_tokens", True), ("temperature", -1), ("temperature", 1e308),
               ("temperature", 5e-324), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("top_p", 1e-300),
               ("top_k", -1), ("top_k", 10**30), ("top_k", 2.5), ("repetition_penalty", 0),
               ("repetition_penalty", 1e-300), ("repetition_penalty", 1e300), ("seed", -1), ("seed", 2**64),
               ("seed", 2**64 - 1), ("seed", 1.5), ("stream", "yes"), ("stream", 1), ("expires_ms", 0),
               ("expires_ms", -1), ("expires_ms", 1), ("expires_ms", 10**30), ("v", 2), ("v", True), ("v", "1"),
               ("v", 1.0), ("system", ""), ("system", " "), ("system", "s" * 5000), ("frames", 0),
               ("frames", 100), ("image_b64", ""), ("image_b64", "!!!!"), ("image_b64", "data:image/png;base64,"),
               ("camera", ""), ("camera", "a/b"), ("camera", "bad name"), ("camera", "nope"), ("camera", 5),
               ("reply_to", f"{root}/ask"), ("reply_to", f"{root}/cancel"), ("reply_to", f"{root}/frame/cam"),
               ("reply_to", "$SYS/x"), ("reply_to", "a/+/b"), ("reply_to", "#"), ("reply_to", ""),
               ("reply_to", "a\x01b"), ("reply_to", "a\uffffb"), ("reply_to", "a\u0085b"), ("reply_to", "\ud800"),
               ("reply_to", "x" * 70000), ("reply_to", 5), ("reply_to", "hostile/replies/ok")]
    cases += [_ask(f"opt_{key}_{i}", {"id": rid(), "text": "x", key: value}) for i, (key, value) in enumerate(options)]
    cases += [
        _ask("camera_and_image", {"id": rid(), "text": "x", "camera": "cam", "image_b64": "AAAA"}),
        _ask("frames_without_camera", {"id": rid(), "text": "x", "frames": 2}),
        _ask("unknown_camera", {"id": rid(), "text": "x", "camera": "garage"}),
        _ask("no_text", {"id": rid()}),
    ]
    for name, data in {**bad_images(), **odd_good_images()}.items():
        encoded = base64.b64encode(data).decode()
        cases.append(_ask(f"b64_{name}", {"id": rid(), "text": "x", "image_b64": encoded, "max_tokens": 3}))
        cases.append(_ask(f"b64url_{name}", {"id": rid(), "text": "x", "max_tokens": 3,
                                              "image_b64": "data:image/png;base64," + base64.urlsafe_b64encode(data).decode()}))
        cases.append(Case("frame", data, camera="cam", label=f"frame_{name}"))
        cases.append(_ask(f"cam_after_{name}", {"id": rid(), "text": "x", "camera": "cam", "max_tokens": 3}))
        cases.append(_ask(f"cam2_after_{name}", {"id": rid(), "text": "x", "camera": "cam", "frames": 2}))
    big_frame = b"\x89PNG\r\n\x1a\n" + b"\x00" * (max_frame_bytes + 1)
    cases += [Case("frame", big_frame, camera="cam", label="frame_over_limit"),
              Case("frame", b"", camera="cam", label="frame_empty"),
              _ask("cam_after_big", {"id": rid(), "text": "x", "camera": "cam"})]
    cases += [Case("frame", png((4, 4), seed=i), camera=f"x{i}", label="many_cameras") for i in range(300)]
    cases += [Case("frame", png((4, 4)), camera=name, label="odd_camera_level")
              for name in ("bad name", "ü", "a/b", "-x", "x" * 65, "")]
    # MQTT 5 response topics (a broker refuses wildcards and control characters itself)
    cases += [_ask(f"rt{i}", {"id": rid(), "text": "x", "stream": False}, response_topic=topic, correlation_data=corr)
              for i, (topic, corr) in enumerate([(f"{root}/ask", None), (f"{root}/cancel", b"c"), ("hostile/rt/ok", b"\x00" * 65000),
                                                 ("hostile/rt/é", None), (f"{root}/frame/cam", None)])]
    # MQTT 5 property abuse: the broker passes these on (mosquitto 2 forwards wildcard and
    # $-prefixed response topics); each must be answered or refused, never crash the daemon
    cases += [_ask(f"rt_bad{i}", {"id": rid(), "text": "x", "stream": False}, response_topic=topic)
              for i, topic in enumerate(["a/+/b", "#", "+", "$SYS/x", "$share/g/t", "x/#"])]
    cases += [_ask("corr_max", {"id": rid(), "text": "x", "stream": False}, correlation_data=bytes(range(256)) * 255 + b"x" * 255),
              _ask("corr_max_refused", {"id": rid()}, correlation_data=b"\xff" * 65535),
              _ask("user_props_bulk", {"id": rid(), "text": "x", "stream": False},
                   user_properties=[(f"k{i}", "v" * 20) for i in range(2000)]),
              _ask("user_props_odd", {"id": rid(), "text": "x", "stream": False},
                   user_properties=[("id", "other"), ("reply_to", f"{root}/cancel"), ("", ""), ("é" * 100, "v")]),
              _ask("format_lie", b'{"id": "' + rid().encode() + b'", "text": "\xff\xfe"}', payload_format=1),
              _ask("format_lie_nested", b'{"x": {"id": "nested"}, "id": "' + rid().encode() + b'", "text": "\xff"}',
                   payload_format=1),
              _ask("format_binary_json", {"id": rid(), "text": "x", "stream": False}, payload_format=0)]
    cancels = [b"", b"{", b"[]", b"null", b'{"id": 5}', b'{"id": ""}', b'{"id": "a/b"}', b'{"id": "x' + b"y" * 5000 + b'"}',
               b'{"v": 2, "id": "h1"}', b'{"id": "h2"}', b'{"id": "never-seen"}', b"[" * 100000, b"\xff"]
    cases += [Case("cancel", body, label=f"cancel{i}") for i, body in enumerate(cancels)]
    return cases


# -- hypothesis-made cases ------------------------------------------------------------------

_json_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
              | st.text(max_size=40))
_json = st.recursive(_json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                     max_leaves=12)
_field_values = {
    "text": st.text(min_size=0, max_size=60) | _json,
    "camera": st.sampled_from(["cam", "cap", "nope", "x1"]) | st.text(max_size=10) | _json,
    "image_b64": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=20),
    "frames": st.integers(-3, 8) | _json,
    "max_tokens": st.integers(-5, 2000) | _json,
    "temperature": st.floats(-1, 200, allow_nan=False) | _json,
    "top_p": st.floats(-0.5, 1.5, allow_nan=False),
    "top_k": st.integers(-3, 10**6),
    "repetition_penalty": st.floats(-1, 200, allow_nan=False),
    "seed": st.integers(-5, 2**65),
    "stream": st.booleans() | _json,
    "reply_to": st.sampled_from(["hostile/r", "a/+/b", "$x"]) | st.text(max_size=12),
    "expires_ms": st.integers(-5, 10**7),
    "system": st.text(max_size=20),
    "v": st.sampled_from([1, 2, "1", None, True]),
}


@st.composite
def ask_objects(draw) -> dict:
    keys = draw(st.lists(st.sampled_from(ASK_FIELDS), unique=True, max_size=6))
    obj = {key: draw(_field_values.get(key, _json)) for key in keys if key != "id"}
    if draw(st.booleans()):
        obj["text"] = draw(st.text(min_size=1, max_size=30))
    obj.update(draw(st.dictionaries(st.text(max_size=6), _json, max_size=2)))
    return obj


def _collect(strategy, count: int, seed: int) -> list:
    found: list = []

    @settings(max_examples=count, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(strategy)
    def draw(value):
        found.append(value)

    draw()
    return found[:count]


def generated(count: int, seed: int = 0) -> list[Case]:
    """`count` hypothesis-made cases: JSON objects with ask fields (40%, each with a
    unique id in 3 of 4), raw bytes on ask (20%), cancels (20%) and frames (20%)."""
    num_objects, num_raw, num_cancel = count * 2 // 5, count // 5, count // 5
    num_frames = count - num_objects - num_raw - num_cancel
    cases: list[Case] = []
    for i, obj in enumerate(_collect(ask_objects(), num_objects, seed)):
        if i % 4:
            obj = {"id": f"g{i}", **obj}
        cases.append(Case("ask", json.dumps(obj, ensure_ascii=bool(i % 2)).encode("utf-8", "surrogatepass"),
                          label="hyp_json"))
    cases += [Case("ask", data, label="hyp_bytes") for data in _collect(st.binary(max_size=200), num_raw, seed)]
    cancel = st.binary(max_size=60) | _json.map(lambda v: json.dumps(v).encode()) | st.text(max_size=20).map(
        lambda t: json.dumps({"id": t}).encode("utf-8", "surrogatepass"))
    cases += [Case("cancel", data, label="hyp_cancel") for data in _collect(cancel, num_cancel, seed)]
    frame = st.binary(max_size=300) | st.binary(max_size=200).map(lambda b: png()[:40] + b)
    cameras = ["cam", "cap"]
    cases += [Case("frame", data, camera=cameras[i % 2], label="hyp_frame")
              for i, data in enumerate(_collect(frame, num_frames, seed))]
    random.Random(seed).shuffle(cases)
    return cases
