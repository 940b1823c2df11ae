"""Exact streams (issue 11 item 5): for every finish reason the streamed deltas, joined,
are exactly the final `text`, through the engine and through the worker's MQTT final.

The rule, the same everywhere (docs/protocol.md, "Streaming"): a character the answer
stopped inside (cut by max_tokens, a stop token, a cancel, an expiry) is held back by the
detokenizer and dropped from `text`; `text` never ends in a U+FFFD that no delta carried.

Answers are forced token by token through the engine's exact fake graphs (tests/test_engine.py)
with the real InternVL2 byte-level tokenizer: multi-byte characters split into their bytes,
cut at every position.
"""

from __future__ import annotations

import json
import threading
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import Config
from daemon.service import Service
from npu.engine import DoneEvent, Engine, GenerationOptions, Prompt, TokenEvent
from tests.fixtures_daemon import Collector
from tests.test_engine import F32, N_LAYERS, FakeEmbeddings, FakeLayer, FakeModel, FakePost
from tests.tokenizer_files import write_internvl2_tokenizer
from npu.text.template import ChatTemplate
from npu.text.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
CHARACTERS = "aZ é€漢字😀ü\n"  # 1-, 2-, 3- and 4-byte UTF-8
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class GatedPost(FakePost):
    """FakePost that can hold call number `gate_at` until `release` is set (a cancel
    arriving while the NPU computes that token)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate_at: int | None = None
        self.waiting, self.release = threading.Event(), threading.Event()

    def run(self, feed, group=0):
        if self.calls == self.gate_at:
            self.waiting.set()
            self.release.wait(30)
        return super().run(feed, group)


class SummarisedModel(FakeModel):
    def summary(self) -> dict:
        return {"path": None, "layout": "fake", "backend": "fake"}


@pytest.fixture(scope="module")
def model():
    directory = write_internvl2_tokenizer(__import__("tempfile").mkdtemp(prefix="vlmd-streams-"))
    tokenizer = Tokenizer.from_dir(directory)
    template = ChatTemplate.from_checkpoint({"template": "Hermes-2"}, tokenizer)
    layers = [FakeLayer(i, 96, 16, (), F32) for i in range(N_LAYERS)]
    post = GatedPost(tokenizer.vocab_size, F32)
    return SummarisedModel(None, layers, post, FakeEmbeddings(), tokenizer, template)


def byte_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` as single-byte tokens: every multi-byte character split across tokens."""
    by_byte = {tokenizer.token_bytes(i): i for i in range(256) if len(tokenizer.token_bytes(i)) == 1}
    return [by_byte[bytes([b])] for b in text.encode("utf-8")]


def check_exact(tokenizer: Tokenizer, emitted: list[int], deltas: list[str], text: str) -> None:
    assert "".join(deltas) == text  # the law
    assert REPLACEMENT not in text  # the answers here are valid text: a U+FFFD is a dropped tail leaking
    decoded = tokenizer.decode(emitted)
    assert decoded in (text, text + REPLACEMENT)  # at most the cut character is missing


answers = st.text(alphabet=st.sampled_from(CHARACTERS), min_size=1, max_size=5)


@SETTINGS
@given(text=answers, data=st.data(), finish=st.sampled_from(["length", "stop", "cancelled"]))
def test_engine_text_is_the_joined_deltas_for_every_finish_reason(model, text, data, finish):
    engine = Engine(model)
    ids = byte_ids(model.tokenizer, text)
    cut = data.draw(st.integers(0 if finish == "cancelled" else 1, len(ids)), label="cut")
    forced = list(ids)
    if finish == "stop":
        forced = ids[:cut] + [min(model.template.stop_ids)]
    model.post.calls, model.post.forced, model.post.gate_at = 0, dict(enumerate(forced)), None
    received: list[TokenEvent] = []
    options = GenerationOptions(max_tokens=cut if finish == "length" else len(ids) + 1)
    events = engine.generate(Prompt("go"), options, should_stop=lambda: finish == "cancelled" and len(received) >= cut)
    done = None
    for event in events:
        if isinstance(event, TokenEvent):
            received.append(event)
        else:
            done = event
    assert isinstance(done, DoneEvent) and done.finish_reason == finish
    emitted = [e.token_id for e in received]
    assert emitted == ids[:cut] and done.completion_tokens == cut
    check_exact(model.tokenizer, emitted, [e.delta for e in received], done.text)


@pytest.fixture(scope="module")
def daemon(model, mosquitto):
    config = Config.model_validate({"device_id": "exact" + uuid.uuid4().hex[:6], "stats": {"interval_s": 3600},
                                    "mqtt": {"broker": mosquitto.url, "protocol": "5", "persistent_session": False}})
    service = Service(config, engine_factory=lambda c: Engine(model))
    service.start()
    client = Collector(mosquitto.host, mosquitto.port, [service.topics.answer_filter()])
    assert service.client.wait_connected(10)
    yield service, client
    client.close()
    service.stop(1.0)


@pytest.mark.broker
@SETTINGS
@given(text=answers, data=st.data(), finish=st.sampled_from(["length", "stop", "cancelled"]))
def test_mqtt_final_text_is_the_joined_chunks_for_every_finish_reason(model, daemon, text, data, finish):
    """Through the worker and the broker: chunks as a client receives them, joined, equal the
    final's text; a cancel arrives while the NPU computes token `cut` (that token still
    streams, the next graph call sees the cancel)."""
    service, client = daemon
    ids = byte_ids(model.tokenizer, text)
    cut = data.draw(st.integers(1, len(ids)), label="cut")
    forced = ids[:cut] + [min(model.template.stop_ids)] if finish == "stop" else list(ids)
    post = model.post
    post.waiting.clear(), post.release.clear()
    post.calls, post.forced = 0, dict(enumerate(forced))
    post.gate_at = cut - 1 if finish == "cancelled" else None
    request_id = uuid.uuid4().hex[:12]
    max_tokens = cut if finish == "length" else len(ids) + 1
    client.publish(service.topics.ask(), {"id": request_id, "text": "go", "max_tokens": max_tokens})
    if finish == "cancelled":
        assert post.waiting.wait(30), "the gated token was never computed"
        client.publish(service.topics.cancel(), {"id": request_id})
        running = service.inbox.running
        assert running is not None and running.job_id == request_id
        assert running.cancel_event.wait(10), "the cancel did not reach the running job"
        post.release.set()
    chunks, final = client.answer(service.topics.answer(request_id), timeout=30)
    assert final["finish_reason"] == finish, final
    assert [chunk["seq"] for chunk in chunks] == list(range(len(chunks)))
    check_exact(model.tokenizer, ids[:cut], [chunk["delta"] for chunk in chunks], final["text"])
    assert final["usage"]["completion_tokens"] == cut
