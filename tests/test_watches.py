"""Watches without a broker: the registry and its refusals, the due decision, the debounced
state machine, and the worker running them after questions and before captions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from daemon.inbox import Inbox
from daemon.scheduler import CameraView, CaptionPolicy, Scheduler
from daemon.home.watches import UNSET, Watch, WatchLimits, WatchRegistry, due_watch, observe
from daemon.responder import Responder, RuntimeStats
from daemon.worker import Worker, WorkerLimits
from protocol.codec import ProtocolError
from protocol.topics import Topics
from protocol.watches import WatchDefinition
from tests.fixtures_daemon import RecordingPublisher, png_bytes

pytest.importorskip("npu.engine", reason="the engine module is not importable yet")

BOOLEAN = {"type": "boolean"}


def definition(name="parcel", camera="door", question="Is there a parcel?", **fields) -> WatchDefinition:
    return WatchDefinition.model_validate({"name": name, "camera": camera, "question": question,
                                           "format": fields.pop("format", BOOLEAN), **fields})


def payload(**fields) -> bytes:
    return json.dumps({"camera": "door", "question": "Is there a parcel?", "format": BOOLEAN, **fields}).encode()


# ----------------------------------------------------------------------------- registry


def test_registry_takes_retained_definitions_and_deletes_on_empty_payloads():
    registry = WatchRegistry(known_camera=lambda camera: camera == "door")
    change = registry.apply("parcel", payload(interval_s=5.0))
    assert change.added.definition.interval_s == 5.0 and change.added.source == "mqtt"
    assert registry.apply("parcel", payload(interval_s=5.0)) is None  # the same retained message again
    assert registry.apply("parcel", payload(interval_s=7.0)).added.definition.interval_s == 7.0
    assert registry.apply("parcel", b"").deleted and registry.get("parcel") is None
    assert registry.apply("parcel", b"") is None


@pytest.mark.parametrize("body, code, message", [
    (b"{not json", "bad_json", "invalid JSON"),
    (b"[1]", "bad_json", "must be a JSON object"),
    (payload(camera="garage"), "unknown_camera", "camera: 'garage' is not configured and has sent no frame"),
    (payload(format={"enum": []}), "bad_request", "format: enum: must list at least one option"),
    (payload(format={"type": "integer", "minimum": 3, "maximum": 1}), "bad_request", "format: minimum: 3 is greater"),
    (payload(format={"type": "boolean", "pattern": "x"}), "bad_request", "format: pattern: unsupported keyword"),
    (payload(intervall_s=3), "bad_request", "intervall_s: Extra inputs are not permitted"),
    (payload(interval_s="5"), "bad_request", "interval_s: Input should be a valid number"),
    (payload(interval_s=0.5), "bad_request", "interval_s: 0.5 is below the shortest allowed, 1"),
    (payload(debounce=0), "bad_request", "debounce: Input should be greater than or equal to 1"),
    (payload(question=" "), "bad_request", "question: must not be blank"),
    (payload(name="other"), "bad_request", "name: 'other' differs from the topic's watch name 'parcel'"),
    (payload(v=2), "unsupported_version", "v: protocol version 2"),
    (json.dumps({"camera": "door", "question": "x"}).encode(), "bad_request", "format: Field required"),
])
def test_bad_watch_configs_are_refused_naming_the_field(body, code, message):
    registry = WatchRegistry(known_camera=lambda camera: camera == "door")
    with pytest.raises(ProtocolError) as refused:
        registry.apply("parcel", body)
    assert refused.value.code == code and message in refused.value.message, refused.value.message
    assert registry.watches() == []


def test_registry_limits_and_config_watches():
    registry = WatchRegistry(WatchLimits(max_watches=2), known_camera=lambda camera: True)
    registry.set_config_watches([definition("a")])
    registry.apply("b", payload())
    with pytest.raises(ProtocolError, match="watch_limits.max_watches") as refused:
        registry.apply("c", payload())
    assert refused.value.code == "limit"
    with pytest.raises(ProtocolError, match="defined in the config file"):
        registry.apply("a", payload())
    kept = registry.get("a")
    assert registry.set_config_watches([definition("a")]) == [] and registry.get("a") is kept  # unchanged: state kept
    changes = registry.set_config_watches([definition("d")])
    assert {(c.name, c.deleted) for c in changes} == {("a", True), ("d", False)}
    assert sorted(w.name for w in registry.watches()) == ["b", "d"]


# ----------------------------------------------------------------------------- decisions


def test_a_watch_is_due_on_a_new_frame_once_its_interval_passed():
    early, late = Watch(definition("early", interval_s=10.0), "config"), Watch(definition("late", interval_s=10.0), "config")
    cameras = {"door": CameraView(newest_seq=3)}
    assert due_watch(0.0, [early, late], {"door": CameraView(None)}) == (None, None)
    early.last_run_at, early.last_seq = 100.0, 2
    late.last_run_at, late.last_seq = 95.0, 2
    assert due_watch(104.0, [early, late], cameras) == (None, pytest.approx(1.0))  # late is ready at 105
    assert due_watch(106.0, [early, late], cameras)[0] is late
    assert due_watch(111.0, [early, late], cameras)[0] is late  # both due: the one waiting longest
    late.last_seq = 3
    assert due_watch(111.0, [early, late], cameras)[0] is early
    early.last_seq = 3
    assert due_watch(200.0, [early, late], cameras) == (None, None)  # no new frame: nothing is due


def test_the_state_changes_after_debounce_agreeing_answers():
    watch = Watch(definition(debounce=2), "config")
    assert observe(watch, False, 0.9, 1.0) is None and not watch.has_value
    assert observe(watch, False, 0.8, 2.0) is UNSET  # the first value: no event
    assert watch.value is False and watch.since == 2.0
    assert observe(watch, True, 0.7, 3.0) is None and watch.value is False  # one answer is not enough
    assert observe(watch, False, 0.9, 4.0) is None  # the streak is broken
    assert observe(watch, True, 0.6, 5.0) is None
    assert observe(watch, True, 0.95, 6.0) is False  # the previous value: an event
    assert watch.value is True and watch.since == 6.0 and watch.confidence == 0.95
    assert observe(watch, 1, 0.9, 7.0) is None  # 1 is not True


# ----------------------------------------------------------------------------- the worker


class TypedFakeEngine:
    """Answers a watch's question from the picture: "is it red?" (mean red channel)."""

    def __init__(self):
        self.prompts, self.options = [], []

    def forget_conversation(self, conversation_id):
        return False

    def conversation_stats(self):
        return {}

    def generate(self, prompt, options=None, should_stop=None):
        from npu.engine import DoneEvent, TokenEvent

        self.prompts.append(prompt)
        self.options.append(options)
        red = bool(prompt.images) and float(np.asarray(prompt.images[0])[..., 0].mean()) > 128
        text = "yes" if red else "no"
        yield TokenEvent(1, text, 0)
        yield DoneEvent(text, "stop", 90, 1, {"prefix_reused": False}, {"value": red, "confidence": 0.875})


@pytest.fixture
def rig():
    class Rig:
        pass

    r = Rig()
    r.now = [100.0]
    clock = lambda: r.now[0]  # noqa: E731
    r.engine, r.publisher, r.topics = TypedFakeEngine(), RecordingPublisher(), Topics("vlmd/t")
    r.inbox = Inbox(queue_size=4, frame_history=4, clock=clock)
    r.scheduler = Scheduler({"door": CaptionPolicy(enabled=True, interval_s=1.0, max_tokens=3)})
    r.responder = Responder(r.publisher, r.topics, RuntimeStats(), wall_clock=lambda: 5000.0 + r.now[0])
    r.registry = WatchRegistry(known_camera=lambda camera: True)
    r.registry.set_config_watches([definition("red", question="Is it red?", interval_s=5.0, debounce=1)])
    r.worker = Worker(r.engine, r.inbox, r.scheduler, r.responder, WorkerLimits(), clock, watches=r.registry)
    return r


def states(rig):
    return [m.json() for m in rig.publisher.on(rig.topics.watch("red"))]


def events(rig):
    return [m.json() for m in rig.publisher.on(rig.topics.watch_event("red"))]


def test_the_worker_runs_watches_after_questions_and_before_captions(rig):
    rig.inbox.put_frame("door", png_bytes((20, 20, 20)))
    assert rig.worker.step() == "watch"  # before the caption that is also due
    prompt, options = rig.engine.prompts[-1], rig.engine.options[-1]
    assert prompt.text == "Is it red?" and prompt.image_key == "door:1" and prompt.system is None  # the captions' key
    assert options.format == BOOLEAN
    assert rig.worker.step() == "caption"
    assert rig.engine.prompts[-1].image_key == "door:1"  # same frame, same key: the KV prefix is shared
    [state] = states(rig)
    assert state == {"v": 1, "name": "red", "camera": "door", "value": False, "confidence": 0.875, "since": 5100.0,
                     "updated": 5100.0, "frame_ts": state["frame_ts"]}
    assert rig.publisher.on(rig.topics.watch("red"))[0].retain


def test_a_watch_flips_with_one_event_per_change_and_skips_unchanged_frames(rig):
    pictures = [(20, 20, 20), (20, 20, 20), (230, 20, 20), (20, 20, 20)]
    for picture in pictures:
        rig.inbox.put_frame("door", png_bytes(picture))
        rig.now[0] += 10.0  # the interval has passed each time
        assert rig.worker.step() == "watch"
    assert [s["value"] for s in states(rig)] == [False, True, False]  # the repeated frame was not asked about
    assert [(e["previous"], e["value"]) for e in events(rig)] == [(False, True), (True, False)]
    assert rig.worker.watch_runner.counts == {"answered": 3, "unchanged": 1, "failed": 0, "changes": 2}
    assert rig.worker.step() == "caption"  # no new frame: the watch is not due again


def test_a_question_waiting_goes_before_a_due_watch(rig):
    from daemon.scheduler import Job
    from protocol.payloads import AskRequest
    from protocol.requests import Reply

    rig.inbox.put_frame("door", png_bytes((20, 20, 20)))
    request = AskRequest.model_validate({"id": "q1", "text": "hello"})
    rig.inbox.submit(Job("ask", "q1", rig.now[0], request=request, reply=Reply(rig.topics.answer("q1"))))
    assert rig.worker.step() == "ask"
    assert rig.worker.step() == "watch"
