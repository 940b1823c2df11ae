"""protocol/topics.py: builders, parsing, subscriptions, QoS/retain, HA and fleet topics."""

from __future__ import annotations

from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.ha_ids import ha_legacy_object_id, ha_object_id
from protocol.topics import (
    CAMERA_PATTERN,
    SPEC,
    Kind,
    Route,
    Topics,
    TopicError,
    check_publish_topic,
    check_root,
    check_topic_filter,
    ha_birth_topic,
    ha_config_topic,
    is_valid_camera,
    is_valid_request_id,
    shared_subscription,
    topic_safe,
)

ROOT = "vlmd/demo"
cameras = st.from_regex(CAMERA_PATTERN, fullmatch=True)
request_ids = st.text(
    alphabet=st.characters(blacklist_characters="/+#", blacklist_categories=("Cc", "Cs")),
    min_size=1,
    max_size=128,
)
root_levels = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)
roots = st.lists(root_levels, min_size=1, max_size=4).map("/".join)


def build(topics: Topics, route: Route) -> str:
    """The inverse of parse, for the round-trip law."""
    if route.kind == "frame":
        return topics.frame(route.camera)
    if route.kind in ("caption", "caption_stream"):
        return getattr(topics, route.kind)(route.camera)
    if route.kind == "answer":
        return topics.answer(route.request_id)
    return getattr(topics, route.kind)()


def test_builders_follow_the_design_table():
    topics = Topics(ROOT)
    assert topics.status() == "vlmd/demo/status"
    assert topics.frame("cam1") == "vlmd/demo/frame/cam1"
    assert topics.ask() == "vlmd/demo/ask"
    assert topics.answer("q-1") == "vlmd/demo/answer/q-1"
    assert topics.caption("cam1") == "vlmd/demo/caption/cam1"
    assert topics.caption_stream("cam1") == "vlmd/demo/caption/cam1/stream"
    assert topics.cancel() == "vlmd/demo/cancel"
    assert topics.error() == "vlmd/demo/error"
    assert topics.stats() == "vlmd/demo/stats"
    assert Topics.for_device("demo").root == ROOT


def test_qos_and_retain_per_design_table():
    expected = {
        "status": (1, True), "frame": (0, False), "ask": (1, False), "answer_chunk": (0, False),
        "answer": (1, False), "caption": (1, True), "caption_stream": (0, False), "cancel": (1, False),
        "error": (1, False), "stats": (0, True), "fleet_ask": (1, False), "caption_image": (1, True),
        "watch": (1, True), "watch_event": (1, False), "watch_config": (1, True), "dashboard_ask": (1, False),
        "dashboard_answer": (1, True),
    }
    assert {kind: (spec.qos, spec.retain) for kind, spec in SPEC.items()} == expected
    assert set(SPEC) == set(get_args(Kind))


@pytest.mark.parametrize(
    "topic, route",
    [
        ("vlmd/demo/status", Route("status")),
        ("vlmd/demo/ask", Route("ask")),
        ("vlmd/demo/cancel", Route("cancel")),
        ("vlmd/demo/frame/front_door", Route("frame", camera="front_door")),
        ("vlmd/demo/answer/abc", Route("answer", request_id="abc")),
        ("vlmd/demo/caption/cam.2", Route("caption", camera="cam.2")),
        ("vlmd/demo/caption/cam.2/stream", Route("caption_stream", camera="cam.2")),
    ],
)
def test_parse_routes_each_kind(topic, route):
    assert Topics(ROOT).parse(topic) == route


@pytest.mark.parametrize(
    "topic",
    [
        "vlmd/demo",  # the root itself
        "vlmd/demo/",
        "vlmd/demo2/ask",  # a sibling root sharing a prefix
        "other/demo/ask",
        "vlmd/demo/ask/extra",
        "vlmd/demo/frame",
        "vlmd/demo/frame/",
        "vlmd/demo/frame/a/b",
        "vlmd/demo/frame/-leading-dash",
        "vlmd/demo/frame/" + "x" * 65,
        "vlmd/demo/caption/cam/",
        "vlmd/demo/caption/cam/stream/x",
        "vlmd/demo/caption/cam/other",
        "vlmd/demo/caption//stream",
        "vlmd/demo/answer/",
        "vlmd/demo/answer/a/b",
        "vlmd/demo/answer/" + "x" * 129,
        "vlmd/demo/unknown",
    ],
)
def test_parse_refuses_what_is_not_ours(topic):
    assert Topics(ROOT).parse(topic) is None


def test_frame_sources_and_fleet_topic_are_routed():
    topics = Topics(ROOT, frame_sources={"frigate/front/snapshot": "front"}, fleet_ask_topic="vlmd/fleet/ask")
    assert topics.parse("frigate/front/snapshot") == Route("frame", camera="front")
    assert topics.parse("frigate/back/snapshot") is None
    assert topics.parse("vlmd/fleet/ask") == Route("fleet_ask")
    assert topics.subscriptions() == [
        ("vlmd/demo/frame/+", 0), ("vlmd/demo/ask", 1), ("vlmd/demo/cancel", 1), ("vlmd/demo/watches/+/config", 1),
        ("vlmd/demo/dashboard/+/ask", 1), ("frigate/front/snapshot", 0),
    ]
    assert topics.fleet_subscription("boards") == ("$share/boards/vlmd/fleet/ask", 1)


def test_input_topics_are_known():
    topics = Topics(ROOT, frame_sources={"frigate/front/snapshot": "front"}, fleet_ask_topic="vlmd/fleet/ask")
    for topic in ["vlmd/demo/ask", "vlmd/demo/cancel", "vlmd/demo/frame/x", "frigate/front/snapshot", "vlmd/fleet/ask"]:
        assert topics.is_input(topic), topic
    for topic in ["vlmd/demo/answer/q1", "vlmd/demo/caption/x", "vlmd/demo/status", "clients/me", "vlmd/demo/ask/x"]:
        assert not topics.is_input(topic), topic


def test_fleet_subscription_needs_a_fleet_topic():
    with pytest.raises(TopicError, match="fleet"):
        Topics(ROOT).fleet_subscription("g")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"root": "vlmd/+/x"}, {"root": "vlmd/#"}, {"root": "/vlmd"}, {"root": "vlmd/"}, {"root": ""},
        {"root": "$SYS/x"}, {"root": ROOT, "frame_sources": {"a/+": "cam"}},
        {"root": ROOT, "frame_sources": {"a/b": "bad/cam"}}, {"root": ROOT, "fleet_ask_topic": "f/#"},
        {"root": ROOT, "frame_sources": {"vlmd/demo/ask": "cam"}}, {"root": ROOT, "fleet_ask_topic": "vlmd/demo/ask"},
    ],
)
def test_invalid_construction_is_refused(kwargs):
    with pytest.raises(TopicError):
        Topics(**kwargs)


@pytest.mark.parametrize("camera", ["", "a/b", "+", "#", "-x", "é", "a b", "x" * 65])
def test_invalid_camera_names_cannot_build_topics(camera):
    with pytest.raises(TopicError, match="camera"):
        Topics(ROOT).frame(camera)


@pytest.mark.parametrize("request_id", ["", "a/b", "a+b", "a#", "a\x00b", "a\nb", "x" * 129])
def test_invalid_request_ids_cannot_build_topics(request_id):
    assert not is_valid_request_id(request_id)
    with pytest.raises(TopicError, match="request id"):
        Topics(ROOT).answer(request_id)


def test_request_ids_may_be_any_other_unicode():
    assert Topics(ROOT).parse(Topics(ROOT).answer("frage-ü-問")) == Route("answer", request_id="frage-ü-問")


@settings(deadline=None)
@given(root=roots, camera=cameras, request_id=request_ids)
def test_build_parse_round_trip(root, camera, request_id):
    topics = Topics(root)
    for topic, route in [
        (topics.frame(camera), Route("frame", camera=camera)),
        (topics.caption(camera), Route("caption", camera=camera)),
        (topics.caption_stream(camera), Route("caption_stream", camera=camera)),
        (topics.answer(request_id), Route("answer", request_id=request_id)),
        (topics.ask(), Route("ask")),
        (topics.status(), Route("status")),
    ]:
        assert topics.parse(topic) == route


@settings(deadline=None)
@given(suffix=st.text(max_size=40))
def test_parse_never_raises_and_inverts_build(suffix):
    topics = Topics(ROOT)
    route = topics.parse(ROOT + "/" + suffix)
    if route is not None:
        assert build(topics, route) == ROOT + "/" + suffix


@settings(deadline=None)
@given(name=st.text(max_size=100))
def test_topic_safe_always_gives_a_valid_name(name):
    assert is_valid_camera(topic_safe(name))


def test_publish_topic_and_filter_checks():
    assert check_publish_topic("a/b/c") == "a/b/c"
    for bad in ["", "a/+", "a/#", "$SYS/x", "a\x00"]:
        with pytest.raises(TopicError):
            check_publish_topic(bad)
    assert check_root("site/vlmd/x") == "site/vlmd/x"
    assert check_topic_filter("a/+/c/#") == "a/+/c/#"
    for bad in ["a/#/c", "a/b+", "a#", ""]:
        with pytest.raises(TopicError):
            check_topic_filter(bad)


def test_shared_subscription():
    assert shared_subscription("g1", "vlmd/fleet/ask") == "$share/g1/vlmd/fleet/ask"
    for group in ["", "a/b", "a+", "#"]:
        with pytest.raises(TopicError):
            shared_subscription(group, "x")


def test_home_assistant_topics():
    assert ha_config_topic("homeassistant", "sensor", "vlmd_demo", "cam_1_caption") == (
        "homeassistant/sensor/vlmd_demo/cam_1_caption/config"
    )
    assert ha_object_id("caption", "porch") == "caption_porch"  # plain names: as before issue 21
    assert ha_object_id("caption", "front_door") == "caption_front_door__" + _digest("caption", "front_door")
    assert ha_legacy_object_id("caption", "cam.1 x") == "caption_cam_1_x"
    assert ha_birth_topic("homeassistant") == "homeassistant/status"
    with pytest.raises(TopicError):
        ha_config_topic("homeassistant", "sensor", "vlmd.demo", "x")


def test_watch_caption_image_and_dashboard_topics_round_trip():
    topics = Topics(ROOT)
    assert topics.parse(topics.watch("parcel")) == Route("watch", name="parcel")
    assert topics.parse(topics.watch_event("parcel")) == Route("watch_event", name="parcel")
    assert topics.parse(topics.watch_config("parcel")) == Route("watch_config", name="parcel")
    assert topics.parse(topics.caption_image("front")) == Route("caption_image", camera="front")
    assert topics.parse(topics.dashboard_ask("front")) == Route("dashboard_ask", camera="front")
    assert topics.parse(topics.dashboard_answer("front")) == Route("dashboard_answer", camera="front")
    for wrong in ("watch/parcel/x", "watches/parcel", "watches/parcel/config/x", "watch/a b", "caption/front/image/x",
                  "dashboard/front", "dashboard/front/ask/x"):
        assert topics.parse(f"{ROOT}/{wrong}") is None, wrong
    assert topics.is_input(topics.watch_config("parcel")) and topics.is_input(topics.dashboard_ask("front"))
    assert not topics.is_input(topics.watch("parcel"))
    with pytest.raises(TopicError):
        topics.watch("a/b")


def _digest(*parts: str) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:10]


@pytest.mark.parametrize("a, b", [
    (("caption", "front.door"), ("caption", "front_door")),
    (("watch", "a.b"), ("watch", "a_b")),
    (("watch", "p", "q_r"), ("watch", "p_q", "r")),
    (("watch", "a.b"), ("watch", "a", "b")),
    (("vlmd", "board.1"), ("vlmd", "board_1")),
])
def test_home_assistant_ids_of_names_that_used_to_collide_differ(a, b):
    """Issue 21: these pairs mapped to one discovery topic and unique_id."""
    assert ha_object_id(*a) != ha_object_id(*b)
    assert ha_legacy_object_id(*a) == ha_legacy_object_id(*b)  # what they collided on


ha_parts = st.lists(st.one_of(cameras, st.text(min_size=0, max_size=12)), min_size=1, max_size=3)


@given(ha_parts, ha_parts)
def test_home_assistant_ids_are_injective_safe_and_stable(a, b):
    for parts in (a, b):
        object_id = ha_object_id(*parts)
        assert ha_config_topic("homeassistant", "sensor", "vlmd_x", object_id)  # a valid id
        assert object_id == ha_object_id(*parts)  # the same on every call (and start: no salt)
    if a != b:
        assert ha_object_id(*a) != ha_object_id(*b)
