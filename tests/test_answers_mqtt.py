"""Answers a device can act on, over a real mosquitto with the demo model: conversations
whose later turns prefill only their rows, typed answers, every kind of bad input, watches
flipping with one event per change, Home Assistant discovery of all of it, and questions
from a dashboard."""

from __future__ import annotations

import io
import json
import uuid

import pytest

from daemon.commands.demo.scenes import CAPTION_PROMPTS, draw_scene
from daemon.service import Service, load_engine
from npu.model import DEMO_MODEL_DIR
from tests.fixtures_daemon import Collector, png_bytes
from tests.test_service_mqtt import Daemon, make_config, wait_for

pytestmark = pytest.mark.broker
CAMERA = "demo"


@pytest.fixture(scope="module")
def demo_engine():
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        pytest.skip(f"the demo model is not built ({DEMO_MODEL_DIR})")
    return load_engine(make_config("mqtt://127.0.0.1:1"))


@pytest.fixture
def daemon(mosquitto, demo_engine):
    created = []

    def make(engine=None, **overrides) -> Daemon:
        # frame keys ("demo:1") start again with each service: the shared engine must forget its prefixes
        demo_engine.prefixes.clear()
        created.append(Daemon(mosquitto, engine=engine or demo_engine, **overrides))
        return created[-1]

    yield make
    for d in created:
        d.close()


def scene_png(seed: int):
    image, scene = draw_scene(seed)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), scene


def send_scene(d: Daemon, seed: int):
    data, scene = scene_png(seed)
    before = d.service.inbox.frame_counts().get(CAMERA, {}).get("received", 0)
    d.frame(CAMERA, data)
    d.wait_frames(CAMERA, before + 1)
    return scene


def final(d: Daemon, **request) -> dict:
    request_id = request.setdefault("id", "a" + uuid.uuid4().hex[:8])
    d.ask(**request)
    return d.client.answer(d.topics.answer(request_id), timeout=60)[1]


def test_a_three_turn_conversation_prefills_only_each_turns_rows(daemon):
    d = daemon()
    scene = send_scene(d, 9_000_001)
    conversation = "c-" + uuid.uuid4().hex[:6]
    first = final(d, text=CAPTION_PROMPTS[0], camera=CAMERA, conversation=conversation, max_tokens=48)
    second = final(d, text="How many shapes are there?", conversation=conversation)
    third = final(d, text="Is there a triangle?", conversation=conversation)
    assert first["text"] == scene.caption()
    for number, turn in enumerate((first, second, third), 1):
        assert turn["finish_reason"] == "stop" and turn["conversation"] == conversation and turn["turn"] == number
    for previous, turn in ((first, second), (second, third)):
        timings = turn["timings"]
        cached = previous["usage"]["prompt_tokens"] + previous["usage"]["completion_tokens"]
        assert timings["history_rows"] == cached and timings["images_encoded"] == 0
        assert timings["prefill_rows"] + timings["history_rows"] == turn["usage"]["prompt_tokens"]
        assert timings["prefill_rows"] < 20  # its own rows, not the 64 image rows and the history
    d.service.publish_stats()
    stats = json.loads(d.client.next(10, d.topics.stats()).payload)
    assert stats["conversations"]["active"] >= 1 and stats["conversations"]["max_bytes"] == 64 * 2**20
    reset = final(d, conversation=conversation, reset=True)
    assert reset["finish_reason"] == "stop" and reset["turn"] == 0 and reset["text"] == ""
    again = final(d, text="How many shapes are there?", conversation=conversation)
    assert again["turn"] == 1 and "history_rows" not in again["timings"]


def test_a_conversation_belongs_to_the_client_that_opened_it(daemon):
    """#21.3: client B naming A's conversation is refused `conversation_not_yours`, for a
    turn and for a reset alike, and A's conversation goes on untouched."""
    d = daemon()
    send_scene(d, 9_000_001)
    conversation = "c-" + uuid.uuid4().hex[:6]
    a, b = d.root + "/clients/A", d.root + "/clients/B"

    def ask(reply_to: str, **request) -> dict:
        request_id = "a" + uuid.uuid4().hex[:8]
        d.ask(id=request_id, reply_to=reply_to, conversation=conversation, **request)
        return d.client.answer(reply_to, timeout=60)[1]

    assert ask(a, text=CAPTION_PROMPTS[0], camera=CAMERA, max_tokens=48)["turn"] == 1
    turn = ask(b, text="How many shapes are there?")
    assert turn["finish_reason"] == "rejected" and turn["error"]["code"] == "conversation_not_yours"
    assert "history_rows" not in turn["timings"] and turn["usage"]["prompt_tokens"] == 0
    reset = ask(b, reset=True)
    assert reset["finish_reason"] == "rejected" and reset["error"]["code"] == "conversation_not_yours"
    second = ask(a, text="How many shapes are there?")
    assert second["finish_reason"] == "stop" and second["turn"] == 2 and second["timings"]["history_rows"] > 0


@pytest.mark.parametrize("schema, check", [
    ({"type": "boolean"}, lambda v: isinstance(v, bool)),
    ({"enum": ["red", "green", "blue", "yellow", "white"]}, lambda v: v in ("red", "green", "blue", "yellow", "white")),
    ({"type": "integer", "minimum": 0, "maximum": 9}, lambda v: type(v) is int and 0 <= v <= 9),
    ({"type": "number", "minimum": -1, "maximum": 1.5}, lambda v: isinstance(v, (int, float)) and -1 <= v <= 1.5),
    ({"type": "object", "properties": {"circle": {"type": "boolean"}, "count": {"type": "integer", "minimum": 1,
                                                                             "maximum": 3}}},
     lambda v: list(v) == ["circle", "count"] and isinstance(v["circle"], bool) and 1 <= v["count"] <= 3),
])
def test_typed_answers_over_mqtt_always_parse(daemon, schema, check):
    d = daemon()
    send_scene(d, 9_000_002)
    answer = final(d, text="Is there a circle?", camera=CAMERA, format=schema)
    assert answer["finish_reason"] == "stop" and check(answer["value"]), answer
    assert 0.0 <= answer["confidence"] <= 1.0
    assert json.loads(answer["text"]) == answer["value"] if schema.get("type") in ("object", "integer", "number") \
        else answer["text"].lower().startswith(("y", "n")) or answer["text"] == answer["value"]


def test_any_json_schema_over_mqtt_answers_json_that_validates(daemon):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "additionalProperties": False, "required": ["shapes", "count"],
              "properties": {"shapes": {"type": "array", "minItems": 1, "maxItems": 3,
                                        "items": {"enum": ["circle", "square", "triangle", "star"]}},
                             "count": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]}}}
    d = daemon()
    send_scene(d, 9_000_002)
    answer = final(d, text="Which shapes are there?", camera=CAMERA, format=schema, max_tokens=64)
    assert answer["finish_reason"] == "stop", answer
    jsonschema.validate(answer["value"], schema)
    assert json.loads(answer["text"]) == answer["value"] and 0.0 <= answer["confidence"] <= 1.0


@pytest.mark.parametrize("request_fields, code, message", [
    # a JSON Schema keyword the engine cannot compile: refused by the engine, named in the final
    ({"format": {"type": "object", "properties": {"x": {"not": {"type": "string"}}}}}, "bad_request",
     'format: Unimplemented keys: ["not"]'),
    ({"format": {"type": ["string", "text"]}}, "bad_request", "format: type: 'text' is not a JSON Schema type"),
    ({"format": {"enum": []}}, "bad_request", "format: enum: must list at least one option"),
    ({"format": {"type": "integer", "minimum": 5, "maximum": 1}}, "bad_request",
     "format: minimum: 5 is greater than maximum 1"),
    ({"format": "boolean"}, "bad_request", "format: must be a JSON object"),
    ({"conversation": "two\nlines"}, "bad_request", "conversation: must be a short printable string"),
    ({"conversation": "x" * 65}, "bad_request", "conversation: String should have at most 64 characters"),
    ({"conversation": 7}, "bad_request", "conversation: Input should be a valid string"),
    ({"reset": True}, "bad_request", "reset: needs conversation"),
    ({"format": {"type": "integer", "minimum": 100000, "maximum": 999999}, "max_tokens": 3}, "too_long",
     "the shortest answer of this format takes 6 tokens but only 3 are left"),
])
def test_bad_input_gets_a_rejected_final_naming_the_field(daemon, request_fields, code, message):
    d = daemon()
    answer = final(d, text="Is there a circle?", **request_fields)
    assert answer["finish_reason"] == "rejected" and answer["error"]["code"] == code, answer
    assert message in answer["error"]["message"], answer["error"]["message"]


def test_conversation_limits_refuse_naming_the_limit(mosquitto):
    config = make_config(mosquitto.url, conversations={"max_conversations": 1, "max_turns": 2})
    d = Daemon(mosquitto, engine=load_engine(config), conversations={"max_conversations": 1, "max_turns": 2})
    try:
        assert final(d, text="Describe the image.", conversation="one")["turn"] == 1
        refused = final(d, text="Describe the image.", conversation="two")
        assert refused["finish_reason"] == "rejected" and refused["error"]["code"] == "limit"
        assert "max_conversations" in refused["error"]["message"]
        assert final(d, text="And now?", conversation="one")["turn"] == 2
        refused = final(d, text="And then?", conversation="one")
        assert refused["error"]["code"] == "limit" and "max_turns" in refused["error"]["message"]
        refused = final(d, text="And then?", conversation="one", system="Be brief.")
        assert refused["error"]["code"] == "limit"  # the turn limit is checked first
    finally:
        d.close()


def watch_config(d: Daemon, name: str, body) -> None:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    d.client.publish(d.topics.watch_config(name), payload, retain=True)


def test_bad_watch_configs_are_reported_on_the_error_topic(daemon):
    d = daemon(cameras={CAMERA: {}})
    name = "w" + uuid.uuid4().hex[:6]
    cases = [(b"{oops", "bad_json", "invalid JSON"),
             ({"camera": "nowhere", "question": "Is there a circle?", "format": {"type": "boolean"}}, "unknown_camera",
              "camera: 'nowhere' is not configured"),
             ({"camera": CAMERA, "question": "Is there a circle?", "format": {"enum": []}}, "bad_request",
              "format: enum: must list at least one option"),
             ({"camera": CAMERA, "question": "Is there a circle?"}, "bad_request", "format: Field required"),
             ({"camera": CAMERA, "question": "?", "format": {"type": "boolean"}, "every": 5}, "bad_request",
              "every: Extra inputs are not permitted")]
    try:
        for body, code, message in cases:
            watch_config(d, name, body)
            error = json.loads(d.client.next(10, d.topics.error()).payload)
            assert error["code"] == code and message in error["message"], error
            assert error["topic"] == d.topics.watch_config(name)
        assert d.service.watches.get(name) is None
    finally:
        watch_config(d, name, b"")


def test_a_watch_flips_false_true_false_with_one_event_per_change(daemon):
    """The demo's scenes: without a circle, with two, without again (the demo model reads
    them right); each change of value gives one event, and the state stays retained."""
    d = daemon(cameras={CAMERA: {}})
    name = "circle-" + uuid.uuid4().hex[:6]
    no_circle, circles = 100, 102  # scenes vlmd demo uses (daemon/commands/demo/ _scene_seed)
    assert all(s.kind != "circle" for s in draw_scene(no_circle)[1].shapes)
    assert sum(s.kind == "circle" for s in draw_scene(circles)[1].shapes) == 2
    send_scene(d, no_circle)
    watch_config(d, name, {"camera": CAMERA, "question": "Is there a circle?", "format": {"type": "boolean"},
                           "interval_s": 1.0, "debounce": 1})
    try:
        seen = [json.loads(d.client.next(60, d.topics.watch(name)).payload)]
        for seed in (circles, no_circle):
            send_scene(d, seed)
            wait_for(lambda: d.service.watches.get(name).last_seq == d.service.inbox.camera_views()[CAMERA].newest_seq,
                     timeout=60, what="the watch to look at the new frame")
            seen.append(json.loads(d.client.next(60, d.topics.watch(name)).payload))
        assert [s["value"] for s in seen] == [False, True, False]
        events = [json.loads(d.client.next(10, d.topics.watch_event(name)).payload) for _ in range(2)]
        assert [(e["previous"], e["value"]) for e in events] == [(False, True), (True, False)]
        with pytest.raises(TimeoutError):
            d.client.next(1, d.topics.watch_event(name))  # one event per change, no more
        late = Collector(d.client.client.host, d.client.client.port, [d.topics.watch(name)])
        try:
            retained = json.loads(late.next(10).payload)
            assert retained["value"] is False and retained["name"] == name and retained["camera"] == CAMERA
            assert set(retained) == {"v", "name", "camera", "value", "confidence", "since", "updated", "frame_ts"}
        finally:
            late.close()
    finally:
        watch_config(d, name, b"")
    wait_for(lambda: d.service.watches.get(name) is None, what="the watch to be deleted")
    d.client.next(10, d.topics.watch(name))  # the empty retained message that clears the state
    late = Collector(d.client.client.host, d.client.client.port, [d.topics.watch(name)])
    try:
        with pytest.raises(TimeoutError):
            late.next(1.0)  # no retained state left
    finally:
        late.close()


def test_home_assistant_discovery_for_watches_frames_and_dashboard_questions(daemon, mosquitto):
    prefix = "ha" + uuid.uuid4().hex[:6]
    watches = [
        {"name": "parcel", "camera": "porch", "question": "Is there a parcel?", "format": {"type": "boolean"}},
        {"name": "colour", "camera": "porch", "question": "What colour is the car?",
         "format": {"enum": ["red", "blue"]}},
        {"name": "people", "camera": "porch", "question": "How many people?",
         "format": {"type": "integer", "minimum": 0, "maximum": 9}},
        {"name": "door", "camera": "porch", "question": "How is the door?",
         "format": {"type": "object", "properties": {"open": {"type": "boolean"}, "people": {"type": "integer"}}}},
    ]
    d = daemon(home_assistant={"enabled": True, "discovery_prefix": prefix}, cameras={"porch": {"caption": True}},
               watches=watches)
    node = f"vlmd_{d.config.device_id}"
    configs = retained_configs(mosquitto, prefix)
    entity = lambda component, object_id: configs[f"{prefix}/{component}/{node}/{object_id}/config"]  # noqa: E731
    parcel = entity("binary_sensor", "watch_parcel")
    assert parcel["state_topic"] == d.topics.watch("parcel") and parcel["payload_on"] == "ON"
    assert entity("sensor", "watch_colour")["device_class"] == "enum"
    assert entity("sensor", "watch_colour")["options"] == ["red", "blue"]
    assert entity("sensor", "watch_people")["state_class"] == "measurement"
    assert "open" in entity("binary_sensor", "watch_door_open")["value_template"]
    assert entity("sensor", "watch_door_people")["state_topic"] == d.topics.watch("door")
    image = entity("image", "frame_porch")
    assert image["image_topic"] == d.topics.caption_image("porch") and image["content_type"] == "image/jpeg"
    text = entity("text", "ask_porch")
    assert text["command_topic"] == d.topics.dashboard_ask("porch")
    assert entity("sensor", "answer_porch")["state_topic"] == d.topics.dashboard_answer("porch")
    for key, body in configs.items():
        if not key.endswith("/status/config"):
            assert body["availability"][0]["topic"] == d.topics.status(), key
    assert len(configs) == 1 + 2 + 2 + 5  # status; caption and frame; text and answer; 5 watch entities
    d.close()
    # the same daemon with discovery disabled: every config is emptied (Home Assistant removes them)
    config = make_config(mosquitto.url, device_id=d.config.device_id, cameras={"porch": {"caption": True}},
                         watches=watches, home_assistant={"enabled": False, "discovery_prefix": prefix})
    again = Service(config, engine_factory=lambda c: d.engine)
    again.start()
    try:
        assert again.client.wait_connected(10)
        wait_for(lambda: not retained_configs(mosquitto, prefix, wait=1.0), what="the configs to be removed")
    finally:
        again.stop(2.0)


def retained_configs(mosquitto, prefix: str, wait: float = 3.0) -> dict[str, dict]:
    """The retained discovery configs under `prefix` (a fresh subscriber gets them all)."""
    client = Collector(mosquitto.host, mosquitto.port, [prefix + "/#"])
    configs = {}
    try:
        while True:
            try:
                message = client.next(wait)
            except TimeoutError:
                return configs
            if message.payload:
                configs[message.topic] = json.loads(message.payload)
    finally:
        client.close()


def test_a_dashboard_question_is_answered_on_its_sensor_topic(daemon):
    d = daemon(cameras={CAMERA: {"caption": True, "interval_s": 3600.0}})
    scene = send_scene(d, 9_000_003)
    d.client.publish(d.topics.dashboard_ask(CAMERA), CAPTION_PROMPTS[0].encode())
    answer = json.loads(d.client.next(60, d.topics.dashboard_answer(CAMERA)).payload)
    assert answer["done"] and answer["text"] == scene.caption()
    image = d.client.next(60, d.topics.caption_image(CAMERA)).payload  # the caption's frame, for the image entity
    assert image[:3] == b"\xff\xd8\xff"
    late = Collector(d.client.client.host, d.client.client.port,
                     [d.topics.dashboard_answer(CAMERA), d.topics.caption_image(CAMERA)])
    try:  # both retained: the sensor and the image entity show them after a restart of Home Assistant
        assert {late.next(10).topic for _ in range(2)} == {d.topics.dashboard_answer(CAMERA),
                                                            d.topics.caption_image(CAMERA)}
    finally:
        late.close()
    d.client.publish(d.topics.dashboard_ask(CAMERA), b"\xff\xfe")
    error = json.loads(d.client.next(10, d.topics.error()).payload)
    assert error["code"] == "bad_request" and "not valid UTF-8" in error["message"]
    d.client.publish(d.topics.dashboard_ask("nowhere"), b"Anyone there?")
    refused = json.loads(d.client.next(10, d.topics.error()).payload)  # never a retained answer (#21)
    assert refused["code"] == "unknown_camera" and refused["topic"] == d.topics.dashboard_ask("nowhere")


def test_watches_from_the_config_file_are_checked_at_load(mosquitto):
    from daemon.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"watches\[0\]\.camera: 'gate' is not configured under \[cameras\]"):
        load_config(None, env={}, overrides={"watches": [{"name": "a", "camera": "gate", "question": "?",
                                                           "format": {"type": "boolean"}}]})
    service = Service(make_config(mosquitto.url, cameras={"gate": {}}, watches=[
        {"name": "a", "camera": "gate", "question": "Open?", "format": {"type": "boolean"}}]),
        engine_factory=lambda config: None)
    assert [w.name for w in service.watches.watches()] == ["a"]
    assert png_bytes()  # the fixtures module stays importable here
