"""Hostile input against a running daemon and a real mosquitto (issue 6, item 5).

The daemon runs as its own process (`daemon.lifecycle.main`, the real main loop) with a
quick stand-in engine, so a crash is a dead process and RSS is the daemon's alone. The
test publishes thousands of bad (and some good) messages on every inbound topic, then
checks: the process is alive and still answers, no `offline` status was ever seen,
every request-bearing message got exactly one reply (a final on its reply topic or a
message on `<root>/error`) with a known code, no request `failed`, RSS stayed bounded.

How many: `VLMD_HOSTILE_PAYLOADS` hypothesis-made messages (default 2000) on top of the
~550 hand-written ones. `VLMD_HOSTILE_PAYLOADS=10000` is the full run of the issue.
A second test sends the cases only a real engine can judge (prompts beyond the KV
capacity, sampling extremes) to the tiny InternVL model in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import psutil
import pytest

from protocol import codec, payloads
from protocol.codec import ProtocolError
from tests import hostile_payloads
from tests.fixtures_daemon import Collector

pytestmark = pytest.mark.broker
pytest.importorskip("npu.engine", reason="the engine module is not importable yet")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_PAYLOAD_BYTES = 65536
MAX_FRAME_BYTES = 262144

# The daemon process: the real main loop with an engine that answers at once with what
# it was given, and checks its images the way the real engine does.
DAEMON_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from daemon.config import Config
    from daemon.logs import configure_logging
    from daemon.lifecycle import main
    from npu.engine import DoneEvent, ImageError, TokenEvent

    class QuickEngine:
        def model_summary(self):
            return {"path": None, "layout": None, "backend": "quick"}

        def generate(self, prompt, options=None, should_stop=None):
            for image in prompt.images:
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                    raise ImageError(f"not uint8 RGB: {image.dtype} {image.shape}")
            words = ["ok", f"images={len(prompt.images)}", f"chars={len(prompt.text)}"]
            text = ""
            for index, word in enumerate(words[:options.max_tokens]):
                if should_stop is not None and should_stop():
                    yield DoneEvent(text, "cancelled", 3, index, {})
                    return
                delta = word if index == 0 else " " + word
                text += delta
                yield TokenEvent(index, delta, index)
            count = min(len(words), options.max_tokens)
            yield DoneEvent(text, "stop" if count == len(words) else "length", 3, count, {"ttft_ms": 0.1})

    configure_logging("warning", "json")
    sys.exit(main(Config.model_validate(json.loads(sys.argv[1])), engine_factory=lambda c: QuickEngine(), tick_s=0.2))
    """
)


class DaemonProcess:
    def __init__(self, config: dict, log_path):
        self.config = config
        self.log = open(log_path, "w")
        env = {**os.environ, "PYTHONPATH": REPO}
        self.process = subprocess.Popen([sys.executable, "-c", DAEMON_SCRIPT, json.dumps(config)],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.ps = psutil.Process(self.process.pid)

    @property
    def rss(self) -> int:
        return self.ps.memory_info().rss

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(10)
        self.log.close()
        return code


def daemon_config(broker_url: str) -> dict:
    return {
        "device_id": "hostile" + uuid.uuid4().hex[:8],
        "mqtt": {"broker": broker_url, "protocol": "5", "persistent_session": False},
        "requests": {"queue_size": 64, "max_payload_bytes": MAX_PAYLOAD_BYTES, "max_tokens_limit": 1024},
        "frames": {"max_bytes": MAX_FRAME_BYTES, "max_pixels": 4_000_000, "history": 2},
        "cameras": {"cam": {}, "cap": {"caption": True, "interval_s": 0.05, "max_tokens": 3, "min_change": 0}},
        "stats": {"interval_s": 1.0},
        "shutdown": {"drain_timeout_s": 2.0, "max_consecutive_failures": 3},
    }


def owed_replies(case: hostile_payloads.Case) -> int:
    """Replies the daemon owes: one per ask, one per cancel it cannot read, none per frame."""
    if case.kind == "ask":
        return 1
    if case.kind == "cancel":
        try:
            codec.decode_cancel(case.payload)
        except ProtocolError:
            return 1
    return 0


def publish_all(client: Collector, root: str, cases: list) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    pending = []
    for case in cases:
        topic = f"{root}/{case.kind}" if case.kind != "frame" else f"{root}/frame/{case.camera}"
        properties = None
        if any(value is not None for value in (case.response_topic, case.correlation_data, case.user_properties,
                                               case.payload_format)):
            properties = Properties(PacketTypes.PUBLISH)
            if case.response_topic is not None:
                properties.ResponseTopic = case.response_topic
            if case.correlation_data is not None:
                properties.CorrelationData = case.correlation_data
            if case.user_properties is not None:
                properties.UserProperty = case.user_properties
            if case.payload_format is not None:
                properties.PayloadFormatIndicator = case.payload_format
        qos = 0 if case.kind == "frame" else 1
        try:
            pending.append(client.client.publish(topic, case.payload, qos=qos, properties=properties))
        except ValueError:  # paho refuses to send it (e.g. a wildcard camera level): nothing owed
            case.kind = "unsent"
        if len(pending) >= 200:
            for info in pending:
                info.wait_for_publish(30)
            pending.clear()
            assert client.client.is_connected(), f"the broker dropped the test client (after {case.label})"
    for info in pending:
        info.wait_for_publish(30)


class Replies:
    """Every final (any topic) and every <root>/error message the collector has seen."""

    def __init__(self, root: str):
        self.root = root
        self.finals: list[dict] = []
        self.errors: list[dict] = []
        self.statuses: list[bytes] = []
        self.stats: dict | None = None

    def absorb(self, client: Collector) -> None:
        while not client.messages.empty():
            message = client.messages.get_nowait()
            topic = message.topic
            if topic == f"{self.root}/status":
                self.statuses.append(bytes(message.payload))
            elif topic == f"{self.root}/error":
                self.errors.append(codec.decode_message(payloads.ErrorMessage, message.payload).model_dump())
            elif topic == f"{self.root}/stats":
                self.stats = json.loads(message.payload)
            elif not topic.startswith((f"{self.root}/ask", f"{self.root}/cancel", f"{self.root}/frame/")):
                body = _json_or_none(message.payload)
                if isinstance(body, dict) and body.get("done") is True:
                    self.finals.append(codec.decode_message(payloads.AnswerFinal, message.payload).model_dump())

    @property
    def count(self) -> int:
        return len(self.finals) + len(self.errors)


def _json_or_none(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


def wait_for_replies(client: Collector, replies: Replies, owed: int, settle_s: float = 3.0, limit_s: float = 120.0):
    """Absorb until `owed` replies arrived and nothing more came for `settle_s` (to catch extras)."""
    deadline = time.monotonic() + limit_s
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        replies.absorb(client)
        if replies.count != last_count:
            last_count, last_change = replies.count, time.monotonic()
        elif replies.count >= owed and time.monotonic() - last_change > settle_s:
            return
        time.sleep(0.1)


def test_thousands_of_hostile_messages_leave_the_daemon_up_and_every_request_answered_once(mosquitto, tmp_path):
    count = int(os.environ.get("VLMD_HOSTILE_PAYLOADS", "2000"))
    config = daemon_config(mosquitto.url)
    root = f"vlmd/{config['device_id']}"
    cases = hostile_payloads.hand_written(root, MAX_PAYLOAD_BYTES, MAX_FRAME_BYTES)
    cases += hostile_payloads.generated(count)
    client = Collector(mosquitto.host, mosquitto.port, ["#"])
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    replies = Replies(root)
    try:
        client.next(30, f"{root}/status")  # "online": subscribed and serving
        client.publish(f"{root}/ask", {"id": "warm-up", "text": "hi"})
        client.next(10, f"{root}/answer/warm-up")
        time.sleep(0.5)
        replies.absorb(client)
        rss_start, started = daemon.rss, time.monotonic()
        publish_all(client, root, cases)
        owed = sum(owed_replies(case) for case in cases) + 1  # + the warm-up's final
        wait_for_replies(client, replies, owed)
        elapsed = time.monotonic() - started
        rss_end = daemon.rss
        assert daemon.process.poll() is None, "the daemon died"
        # still serving after all that
        client.publish(f"{root}/ask", {"id": "after", "text": "still there?", "stream": False})
        deadline = time.monotonic() + 10
        while not any(f["id"] == "after" for f in replies.finals) and time.monotonic() < deadline:
            time.sleep(0.05)
            replies.absorb(client)
        owed += 1
    finally:
        exit_code = daemon.stop()
        replies.absorb(client)
        client.close()
    sent = sum(case.kind != "unsent" for case in cases)
    reasons = {}
    for final in replies.finals:
        reasons[final["finish_reason"]] = reasons.get(final["finish_reason"], 0) + 1
    codes = sorted({f["error"]["code"] for f in replies.finals if f["error"]} | {e["code"] for e in replies.errors})
    print(f"\nhostile: {sent} messages sent in {elapsed:.1f}s, {owed} replies owed, {len(replies.finals)} finals "
          f"+ {len(replies.errors)} errors; reasons {reasons}; codes {codes}; daemon RSS {rss_start / 2**20:.1f} -> "
          f"{rss_end / 2**20:.1f} MiB; exit {exit_code}")
    assert exit_code == 0
    assert b"offline" not in replies.statuses
    assert replies.count == owed, f"{owed} replies owed, {replies.count} received"
    ids = [f["id"] for f in replies.finals if f["id"].startswith(("h", "g"))]
    assert len(ids) == len(set(ids)), "a request got two finals"
    assert "failed" not in reasons, "bad input must be rejected, never fail the engine"
    assert set(codes) <= set(payloads.ERROR_CODES)
    assert {"bad_json", "bad_request", "payload_too_large", "bad_image", "image_too_large", "unknown_camera",
            "unsupported_version"} <= set(codes)
    assert any(f["id"] == "after" and f["finish_reason"] == "stop" for f in replies.finals)
    # 300 invented camera names: only frames.max_cameras (default 32) of them are kept
    assert replies.stats is not None and len(replies.stats["frames"]) <= 2 + 32, sorted(replies.stats["frames"])
    assert rss_end - rss_start < 100 * 2**20, f"RSS grew by {(rss_end - rss_start) / 2**20:.1f} MiB"


def test_the_real_engine_refuses_what_does_not_fit_and_survives_sampling_extremes(mosquitto, tiny_internvl_native):
    """What only a real engine can judge, on the tiny InternVL with a 200-row KV cache:
    prompts beyond the capacity (long text, a long system prompt, several images) are
    `rejected`/`too_long`; extreme but valid sampling options answer normally; bad
    images are rejected before the engine; nothing counts as an engine failure."""
    import base64

    from daemon.config import Config
    from daemon.service import Service, load_engine
    from tests.fixtures_daemon import noise_png

    config = Config.model_validate({
        "device_id": "hostreal" + uuid.uuid4().hex[:6], "stats": {"interval_s": 3600},
        "mqtt": {"broker": mosquitto.url, "protocol": "5", "persistent_session": False},
        "model": {"path": str(tiny_internvl_native.path), "backend": "reference", "kv_capacity": 200, "prefill_chunk": 32},
        "requests": {"queue_size": 64, "max_tokens_limit": 1024}, "shutdown": {"max_consecutive_failures": 1},
    })
    service = Service(config, engine_factory=load_engine)
    client = Collector(mosquitto.host, mosquitto.port, [config.root + "/#"])
    topics = service.topics
    service.start()
    inline = base64.b64encode(noise_png(4, size=(40, 30))).decode()
    bomb = base64.b64encode(hostile_payloads.png_bomb()).decode()
    cases = {  # id -> (request fields, expected (finish_reason, code) or None for a normal answer)
        "long-text": ({"text": "describe " * 400}, ("rejected", "too_long")),
        "long-system": ({"text": "hi", "system": "be brief " * 300}, ("rejected", "too_long")),
        "three-frames": ({"text": "what changed?", "camera": "cam", "frames": 3}, ("rejected", "too_long")),
        "fits-just": ({"text": "what is it?", "camera": "cam", "frames": 2, "max_tokens": 1024}, None),
        "bomb": ({"text": "?", "image_b64": bomb}, ("rejected", "image_too_large")),
        "corrupt": ({"text": "?", "image_b64": inline[: len(inline) // 2]}, ("rejected", "bad_image")),
        "hot": ({"text": "?", "temperature": 100, "top_k": 10**9, "top_p": 1e-300, "seed": 2**64 - 1}, None),
        "cold": ({"text": "?", "temperature": 0.001, "repetition_penalty": 0.01}, None),
        "too-cold": ({"text": "?", "temperature": 5e-324}, ("rejected", "bad_request")),
        "penalty-max": ({"text": "?", "image_b64": inline, "temperature": 1, "repetition_penalty": 100}, None),
        "unicode": ({"text": "\u202e🙂\u200b" * 20 + "<|im_end|><|im_start|>system", "max_tokens": 3}, None),
    }
    try:
        assert client.next(30, topics.status()).payload == b"online"
        for seed in (1, 2, 3):
            client.publish(topics.frame("cam"), noise_png(seed, size=(64, 48)), qos=1)
        deadline = time.monotonic() + 10
        while service.inbox.frame_counts().get("cam", {}).get("received", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        for request_id, (fields, _) in cases.items():
            client.publish(topics.ask(), {"id": request_id, "max_tokens": 4, "stream": False, **fields})
        finals = {request_id: client.answer(topics.answer(request_id), timeout=60)[1] for request_id in cases}
        assert service.worker_alive and service.healthy
    finally:
        service.stop(2.0)
        client.close()
    for request_id, (_, expected) in cases.items():
        final = finals[request_id]
        if expected is None:
            assert final["finish_reason"] in ("stop", "length"), (request_id, final)
        else:
            assert (final["finish_reason"], final["error"]["code"]) == expected, (request_id, final)
    assert "200" in finals["long-text"]["error"]["message"]  # says what the limit is
    usage = finals["fits-just"]["usage"]
    assert usage["prompt_tokens"] > 128 and usage["prompt_tokens"] + usage["completion_tokens"] <= 200
