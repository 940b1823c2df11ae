"""Daemon test helpers: a fake engine with the real engine's interface, a recording
publisher, a PNG maker, an MQTT test client that collects messages, and `json_logs`.

The fake engine uses npu.engine's own Prompt, GenerationOptions and events, so the
worker is tested against the real value types; it answers with a description of what it
was given (number of images, their sizes, the image key) so tests can check wiring.
"""

from __future__ import annotations

import io
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from daemon.config import Config
from daemon.service import Service
from npu.engine import DoneEvent, EngineError, NumericError, PromptTooLong, TokenEvent, UnsupportedOptions


@pytest.fixture
def json_logs():
    """vlmd's logs as JSON lines into memory (debug and up); call it for the lines so far."""
    from daemon.logs import configure_logging, reset_logging

    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    reset_logging()


def png_bytes(colour=(200, 30, 30), size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeEngine:
    """Streams a deterministic answer word by word; `token_delay_s` makes it slow.

    Prompts whose text starts with "FAIL" raise EngineError, "TOOLONG" PromptTooLong,
    "NAN" NumericError; with `greedy_only` (a post graph without scores) sampling options
    raise UnsupportedOptions, as the real engine does, before any token.
    """

    SUMMARY = {"path": "/fake/model", "layout": "hf", "backend": "fake", "provider": None, "precision": "fp32",
               "template": "Hermes-2", "kv_capacity": 1023, "prefill_chunk": 128, "image_tokens": 64}

    def model_summary(self) -> dict:
        return dict(self.SUMMARY)

    def __init__(self, token_delay_s: float = 0.0, extra_words: int = 0, greedy_only: bool = False):
        self.token_delay_s = token_delay_s
        self.extra_words = extra_words
        self.greedy_only = greedy_only
        self.prompts: list = []
        self.options: list = []
        self.started = threading.Event()  # set when a generation starts

    def forget_conversation(self, conversation_id: str, owner: str | None = None) -> bool:
        return False

    def conversation_stats(self) -> dict:
        return {}

    def generate(self, prompt, options=None, should_stop=None):
        should_stop = should_stop or (lambda: False)
        self.prompts.append(prompt)
        self.options.append(options)
        self.started.set()
        if self.greedy_only and options is not None and not options.is_plain_greedy:
            raise UnsupportedOptions("this model's post graph returns token ids without scores: only greedy decoding")
        if prompt.text.startswith("FAIL"):
            raise EngineError("the fake NPU fell over")
        if prompt.text.startswith("TOOLONG"):
            raise PromptTooLong("prompt needs 5000 tokens, the cache holds 1023")
        if prompt.text.startswith("NAN"):
            yield TokenEvent(1000, "half", 0)
            raise NumericError("the model produced a non-finite logit (nan) for token 17")
        sizes = ",".join(f"{image.shape[1]}x{image.shape[0]}" for image in prompt.images)
        words = [f"images={len(prompt.images)}", f"sizes={sizes}", f"key={prompt.image_key}", "café", "ünïcödé"]
        words += [f"w{n}" for n in range(self.extra_words)]
        max_tokens = options.max_tokens if options is not None else 256
        text = ""
        for index, word in enumerate(words[:max_tokens]):
            if should_stop():
                yield DoneEvent(text, "cancelled", 7, index, {"ttft_ms": 1.0})
                return
            time.sleep(self.token_delay_s)
            delta = word if index == 0 else " " + word
            text += delta
            yield TokenEvent(1000 + index, delta, index)
        reason = "length" if len(words) > max_tokens else "stop"
        count = min(len(words), max_tokens)
        yield DoneEvent(text, reason, 7, count, {"ttft_ms": 1.5, "decode_tokens_per_s": 100.0, "prefix_reused": False})


@dataclass
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation_data: bytes | None = None

    def json(self) -> dict:
        return json.loads(self.payload)


@dataclass
class RecordingPublisher:
    messages: list[Published] = field(default_factory=list)

    def publish(self, topic, payload, qos, retain, correlation_data=None, on_delivered=None):
        self.messages.append(Published(topic, payload, qos, retain, correlation_data))
        if on_delivered is not None:  # a broker that acknowledges at once
            on_delivered()

    def on(self, topic: str) -> list[Published]:
        return [m for m in self.messages if m.topic == topic]


class Collector:
    """A paho test client that queues every message it receives (MQTT 5 or 3.1.1)."""

    def __init__(self, host: str, port: int, topics: list[str], v5: bool = True):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: queue.Queue = queue.Queue()
        self._held: list = []  # received but not yet asked for
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5 if v5 else paho.MQTTv311)
        subscribed = threading.Event()
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.connect(host, port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("test client could not subscribe")

    def publish(self, topic: str, payload, qos: int = 1, retain: bool = False, properties=None):
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties).wait_for_publish(5)

    def next(self, timeout: float = 10.0, topic: str | None = None):
        """The next message (on `topic` if given; others stay buffered for later calls)."""
        for index, message in enumerate(self._held):
            if topic is None or message.topic == topic:
                return self._held.pop(index)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message on {topic or 'any topic'} within {timeout}s")
            try:
                message = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if topic is None or message.topic == topic:
                return message
            self._held.append(message)

    def answer(self, topic: str, timeout: float = 10.0) -> tuple[list[dict], dict]:
        """Collect chunks on `topic` until the final: (chunks, final)."""
        chunks = []
        while True:
            body = json.loads(self.next(timeout, topic).payload)
            if body.get("done"):
                return chunks, body
            chunks.append(body)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- a started daemon on a real broker --------------------------------------------------


def make_config(broker_url: str, **overrides) -> Config:
    device_id = "t" + uuid.uuid4().hex[:10]
    data = {
        "device_id": device_id,
        "mqtt": {"broker": broker_url, "protocol": "5", "persistent_session": False},
        "stats": {"interval_s": 3600},
        "shutdown": {"drain_timeout_s": 2.0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return Config.model_validate(data)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def wait_frames(service: Service, camera: str, count: int) -> None:
    received = lambda: service.inbox.frame_counts().get(camera, {}).get("received", 0)  # noqa: E731
    wait_for(lambda: received() >= count, what=f"{count} frame(s) from {camera}")


class Daemon:
    """A started Service plus a test client subscribed to everything under its root."""

    def __init__(self, broker, engine=None, v5=True, clock=time.monotonic, **overrides):
        self.engine = engine or FakeEngine()
        self.config = make_config(broker.url, **overrides)
        self.service = Service(self.config, engine_factory=lambda config: self.engine, clock=clock)
        self.root = self.config.root
        self.topics = self.service.topics
        self.client = Collector(broker.host, broker.port, [self.root + "/#"], v5=v5)
        self.service.start()
        assert self.service.client.wait_connected(10)
        assert self.client.next(10, self.topics.status()).payload == b"online"

    def ask(self, **request):
        self.client.publish(self.topics.ask(), request)

    def frame(self, camera: str, data: bytes) -> None:
        self.client.publish(self.topics.frame(camera), data, qos=0)

    def wait_frames(self, camera: str, count: int) -> None:
        wait_frames(self.service, camera, count)

    def close(self) -> None:
        self.service.stop(2.0)
        self.client.close()


@pytest.fixture
def daemon(mosquitto):
    """Make started Daemons on the session mosquitto: `daemon(engine=..., **config sections)`."""
    created = []

    def make(**kwargs) -> Daemon:
        created.append(Daemon(mosquitto, **kwargs))
        return created[-1]

    yield make
    for d in created:
        d.close()
