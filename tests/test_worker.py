"""The worker against a fake engine and a recording publisher (no broker, no threads
unless a test needs one): streaming, finals, errors, cancel, expiry, captions."""

from __future__ import annotations

import base64
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.inbox import Inbox
from daemon.scheduler import CaptionPolicy, Job, Reply, Scheduler
from daemon.responder import Responder, RuntimeStats
from daemon.worker import Worker, WorkerLimits
from protocol.payloads import AskRequest
from protocol.topics import Topics
from tests.fixtures_daemon import FakeEngine, RecordingPublisher, noise_png, png_bytes

pytest.importorskip("npu.engine", reason="the engine module is not importable yet")

ANSWER = "vlmd/t/answer/q1"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rig():
    class Rig:
        pass

    r = Rig()
    r.clock = Clock()
    r.engine = FakeEngine()
    r.publisher = RecordingPublisher()
    r.topics = Topics("vlmd/t")
    r.inbox = Inbox(queue_size=4, frame_history=4, clock=r.clock)
    r.scheduler = Scheduler({"cam": CaptionPolicy(enabled=True, interval_s=10.0, prompt="Describe.", max_tokens=3)})
    r.stats = RuntimeStats()
    r.responder = Responder(r.publisher, r.topics, r.stats, wall_clock=lambda: 5000.0)
    r.worker = Worker(r.engine, r.inbox, r.scheduler, r.responder, WorkerLimits(max_consecutive_failures=2), r.clock)
    return r


def make_job(rig, job_id="q1", deadline=None, frames=(), stream=True, **fields) -> Job:
    request = AskRequest.model_validate({"id": job_id, "text": fields.pop("text", "what is it?"), **fields})
    reply = Reply(rig.topics.answer(job_id), b"corr" if job_id == "q1" else None, stream)
    return Job("ask", job_id, rig.clock(), deadline, camera=request.camera, frames=tuple(frames), request=request, reply=reply)


def answer(rig, topic=ANSWER):
    messages = [m.json() for m in rig.publisher.on(topic)]
    finals = [m for m in messages if m.get("done")]
    assert len(finals) == 1, messages
    return [m for m in messages if not m.get("done")], finals[0]


def test_camera_question_streams_chunks_that_concatenate_to_the_final(rig):
    rig.inbox.put_frame("cam", png_bytes(size=(40, 30)))
    job = make_job(rig, frames=rig.inbox.frames("cam", 1), camera="cam", max_tokens=50, temperature=0.5, seed=3)
    rig.inbox.submit(job)
    assert rig.worker.step() == "ask"
    chunks, final = answer(rig)
    assert "".join(c["delta"] for c in chunks) == final["text"]
    assert [c["seq"] for c in chunks] == list(range(len(chunks))) and final["seq"] == len(chunks)
    assert final["finish_reason"] == "stop" and final["error"] is None
    assert "images=1 sizes=40x30 key=cam:1" in final["text"]
    assert final["usage"] == {"prompt_tokens": 7, "completion_tokens": 5}
    options = rig.engine.options[0]
    assert (options.max_tokens, options.temperature, options.seed) == (50, 0.5, 3)
    # every reply echoes the correlation data; chunks QoS 0, the final QoS 1
    assert {m.correlation_data for m in rig.publisher.on(ANSWER)} == {b"corr"}
    assert [m.qos for m in rig.publisher.on(ANSWER)] == [0] * len(chunks) + [1]
    assert rig.stats.outcomes["stop"] == 1 and rig.stats.last_ttft_ms == 1.5
    assert rig.inbox.running is None


def test_text_only_and_inline_image_questions(rig):
    inline = base64.b64encode(png_bytes(size=(20, 10))).decode()
    rig.inbox.submit(make_job(rig, "plain"))
    rig.inbox.submit(make_job(rig, "inline", image_b64=inline))
    rig.worker.step()
    rig.worker.step()
    _, plain = answer(rig, rig.topics.answer("plain"))
    _, inline_final = answer(rig, rig.topics.answer("inline"))
    assert plain["text"].startswith("images=0 sizes= key=None")
    assert "images=1 sizes=20x10 key=inline:" in inline_final["text"]


def test_stream_false_sends_only_the_final_and_max_tokens_gives_length(rig):
    rig.inbox.submit(make_job(rig, stream=False, max_tokens=2))
    rig.worker.step()
    chunks, final = answer(rig)
    assert chunks == [] and final["seq"] == 0
    assert final["finish_reason"] == "length" and len(final["text"].split()) == 2


def test_expired_question_is_finished_without_running(rig):
    rig.inbox.submit(make_job(rig, deadline=rig.clock() + 1.0))
    rig.clock.now += 2.0
    rig.worker.step(idle_s=0.01)
    _, final = answer(rig)
    assert final["finish_reason"] == "expired" and final["error"]["code"] == "expired"
    assert rig.engine.prompts == []


def test_bad_frame_is_rejected_not_fatal(rig):
    rig.inbox.put_frame("cam", b"\xff\xd8\xffnot really a jpeg")
    rig.inbox.submit(make_job(rig, frames=rig.inbox.frames("cam", 1), camera="cam"))
    rig.worker.step()
    _, final = answer(rig)
    assert final["finish_reason"] == "rejected" and final["error"]["code"] == "bad_image"
    assert rig.worker.healthy


def test_engine_errors_map_to_rejected_and_failed(rig):
    rig.inbox.submit(make_job(rig, "long", text="TOOLONG please"))
    rig.inbox.submit(make_job(rig, "f1", text="FAIL"))
    rig.worker.step()
    rig.worker.step()
    assert answer(rig, rig.topics.answer("long"))[1]["error"]["code"] == "too_long"
    failed = answer(rig, rig.topics.answer("f1"))[1]
    assert (failed["finish_reason"], failed["error"]["code"]) == ("failed", "engine_error")
    assert "fake NPU" in failed["error"]["message"]
    assert rig.worker.healthy  # one failure; the limit is two in a row
    rig.inbox.submit(make_job(rig, "f2", text="FAIL"))
    rig.worker.step()
    assert not rig.worker.healthy


def test_cancel_while_running_gives_cancelled_with_the_partial_text(rig):
    rig.engine.token_delay_s = 0.02
    rig.engine.extra_words = 200
    job = make_job(rig)
    rig.inbox.submit(job)
    thread = threading.Thread(target=rig.worker.step)
    thread.start()
    assert rig.engine.started.wait(5)
    deadline = time.monotonic() + 5
    while not rig.publisher.on(ANSWER) and time.monotonic() < deadline:
        time.sleep(0.005)  # wait for at least one chunk
    assert rig.inbox.cancel("q1")[0] == "running"
    thread.join(5)
    assert not thread.is_alive(), "the cancelled step did not return"
    chunks, final = answer(rig)
    assert final["finish_reason"] == "cancelled" and final["error"]["code"] == "cancelled"
    assert final["text"] == "".join(c["delta"] for c in chunks)
    assert 0 < len(final["text"].split()) < 200


def test_abort_stops_the_running_job_as_shutdown(rig):
    rig.engine.extra_words = 50
    rig.worker.abort.set()
    rig.inbox.submit(make_job(rig))
    rig.worker.step()
    assert answer(rig)[1]["finish_reason"] == "shutdown"


def test_one_final_only_even_if_asked_twice(rig):
    job = make_job(rig)
    assert rig.responder.final(job, "cancelled") is True
    assert rig.responder.final(job, "stop") is False
    assert len(rig.publisher.on(ANSWER)) == 1


def test_captions_stream_then_retain_and_skip_unchanged_frames(rig):
    caption_topic = rig.topics.caption("cam")
    rig.inbox.put_frame("cam", noise_png(1))
    assert rig.worker.step() == "caption"
    captions = rig.publisher.on(caption_topic)
    assert len(captions) == 1 and captions[0].retain and captions[0].qos == 1
    body = captions[0].json()
    stream = [m.json() for m in rig.publisher.on(rig.topics.caption_stream("cam"))]
    assert "".join(c["delta"] for c in stream) == body["text"]
    assert {c["caption_id"] for c in stream} == {body["caption_id"]}
    assert body["finish_reason"] == "length" and body["ts"] == 5000.0
    assert rig.engine.prompts[-1].text == "Describe." and rig.engine.options[-1].max_tokens == 3
    # same frame: nothing to do
    assert rig.worker.step(idle_s=0.01) == "idle"
    # an identical new frame after the interval: skipped as unchanged
    rig.clock.now += 11
    rig.inbox.put_frame("cam", noise_png(1))
    assert rig.worker.step() == "caption"
    assert len(rig.publisher.on(caption_topic)) == 1 and rig.stats.captions["skipped"] == 1
    # a different frame after the interval: captioned again
    rig.clock.now += 11
    rig.inbox.put_frame("cam", noise_png(2))
    rig.worker.step()
    assert len(rig.publisher.on(caption_topic)) == 2


def test_a_question_preempts_a_running_caption_which_is_redone_after_it(rig):
    rig.engine.token_delay_s = 0.02
    rig.scheduler.captions["cam"] = CaptionPolicy(enabled=True, interval_s=1000.0, max_tokens=100)
    rig.engine.extra_words = 100
    rig.inbox.put_frame("cam", noise_png(1))
    thread = threading.Thread(target=rig.worker.step)
    thread.start()
    assert rig.engine.started.wait(5)
    rig.inbox.submit(make_job(rig, max_tokens=1))
    thread.join(5)
    assert not thread.is_alive(), "the caption did not give way to the question"
    assert rig.publisher.on(rig.topics.caption("cam")) == [] and rig.stats.captions["preempted"] == 1
    assert rig.worker.step() == "ask"
    rig.engine.token_delay_s = 0.0
    assert rig.worker.step() == "caption"  # the same frame, without waiting out interval_s
    assert len(rig.publisher.on(rig.topics.caption("cam"))) == 1


def test_questions_go_before_a_due_caption(rig):
    rig.inbox.put_frame("cam", noise_png(1))
    rig.inbox.submit(make_job(rig))
    assert rig.worker.step() == "ask"
    assert rig.worker.step() == "caption"


class ScriptedEngine:
    """Yields the given deltas as tokens, then a done event with their concatenation."""

    def __init__(self, deltas):
        self.deltas = deltas

    def generate(self, prompt, options=None, should_stop=None):
        from npu.engine import DoneEvent, TokenEvent

        for index, delta in enumerate(self.deltas):
            yield TokenEvent(index, delta, index)
        yield DoneEvent("".join(self.deltas), "stop", 1, len(self.deltas), {})


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=6), max_size=12))
def test_streamed_deltas_concatenate_to_the_final_text(deltas):
    publisher = RecordingPublisher()
    topics = Topics("vlmd/p")
    inbox = Inbox()
    responder = Responder(publisher, topics, RuntimeStats())
    worker = Worker(ScriptedEngine(deltas), inbox, Scheduler(), responder)
    request = AskRequest.model_validate({"id": "h", "text": "?"})
    inbox.submit(Job("ask", "h", 0.0, request=request, reply=Reply(topics.answer("h"))))
    worker.step()
    bodies = [m.json() for m in publisher.messages]
    chunks, final = bodies[:-1], bodies[-1]
    assert final["done"] and "".join(c["delta"] for c in chunks) == final["text"] == "".join(deltas)
    assert [c["seq"] for c in chunks] == list(range(len(chunks))) and final["seq"] == len(chunks)
    assert all(c["delta"] for c in chunks)  # empty deltas are not sent


class FailingEngine(ScriptedEngine):
    """Yields its deltas as tokens, then fails the way an NPU runtime error does."""

    def generate(self, prompt, options=None, should_stop=None):
        from npu.engine import EngineError, TokenEvent

        for index, delta in enumerate(self.deltas):
            yield TokenEvent(index, delta, index)
        error = EngineError("AX_ENGINE_RunSync failed mid-answer")
        error.prompt_tokens = 42  # what the real engine sets once the prompt is tokenised
        raise error


def test_a_failure_mid_answer_gives_the_next_seq_and_the_text_and_usage_so_far(rig):
    worker = Worker(FailingEngine(["A ", "", "red ", "car"]), rig.inbox, Scheduler(), rig.responder,
                    WorkerLimits(max_consecutive_failures=2), rig.clock)
    rig.inbox.submit(make_job(rig))
    worker.step()
    chunks, final = answer(rig)
    assert [c["seq"] for c in chunks] == [0, 1, 2]  # the empty delta is not sent
    assert (final["finish_reason"], final["error"]["code"]) == ("failed", "engine_error")
    assert final["seq"] == 3 and final["text"] == "A red car" == "".join(c["delta"] for c in chunks)
    assert final["usage"] == {"prompt_tokens": 42, "completion_tokens": 4}


def test_request_errors_are_refusals_that_never_count_toward_the_failure_limit(rig):
    worker = Worker(FakeEngine(greedy_only=True), rig.inbox, Scheduler(), rig.responder,
                    WorkerLimits(max_consecutive_failures=2), rig.clock)
    for n in range(3):  # more than the limit: a client must not be able to stop the daemon
        rig.inbox.submit(make_job(rig, f"s{n}", temperature=0.7) if n != 1 else make_job(rig, f"s{n}",
                                                                                          repetition_penalty=1.3))
        worker.step()
        _, final = answer(rig, rig.topics.answer(f"s{n}"))
        assert (final["finish_reason"], final["error"]["code"]) == ("rejected", "bad_request")
        assert "greedy" in final["error"]["message"]
    assert worker.consecutive_failures == 0 and worker.healthy


def test_a_numeric_error_fails_the_request_with_its_own_code_and_counts(rig):
    rig.inbox.submit(make_job(rig, text="NAN please"))
    rig.worker.step()
    chunks, final = answer(rig)
    assert (final["finish_reason"], final["error"]["code"]) == ("failed", "numeric_error")
    assert final["text"] == "half" and final["seq"] == len(chunks) == 1
    assert rig.worker.consecutive_failures == 1


class CaptionLosingPublisher(RecordingPublisher):
    """The broker connection breaks whenever a caption is published."""

    def publish(self, topic, payload, qos, retain, correlation_data=None, on_delivered=None):
        if "/caption/" in topic:
            raise OSError("socket gone")
        super().publish(topic, payload, qos, retain, correlation_data, on_delivered)


def test_captions_go_through_the_responder_and_a_lost_connection_is_no_engine_failure(rig):
    publisher = CaptionLosingPublisher()
    responder = Responder(publisher, rig.topics, rig.stats, wall_clock=lambda: 5000.0)
    worker = Worker(rig.engine, rig.inbox, rig.scheduler, responder, WorkerLimits(max_consecutive_failures=1), rig.clock)
    rig.inbox.put_frame("cam", noise_png(1))
    assert worker.step() == "caption"
    assert worker.consecutive_failures == 0 and worker.healthy
    assert rig.stats.captions["done"] == 1
