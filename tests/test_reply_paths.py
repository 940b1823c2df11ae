"""One reply-topic check for every path that publishes on a client's behalf (issue 16.1).

Accepted questions, refusals and MQTT 5 response topics all resolve their reply path
through protocol.requests, so no reply, not even a refusal, can land on one of the
daemon's own input topics (where it would become a frame, a cancel or a question).
A refusal whose reply path is unusable goes to <root>/error.
"""

from __future__ import annotations

import json

import pytest

from protocol.requests import ReplyPath, refusal_path, reply_path
from protocol.topics import Topics
from tests.fixtures_daemon import FakeEngine

TOPICS = Topics("vlmd/dev", frame_sources={"frigate/front/snapshot": "front"}, fleet_ask_topic="vlmd/fleet/ask")


@pytest.mark.parametrize("topic", ["vlmd/dev/ask", "vlmd/dev/cancel", "vlmd/dev/frame/front", "frigate/front/snapshot",
                                   "vlmd/fleet/ask", "a/+/b", "#", "$SYS/x", "", "a\x01b", 5])
def test_no_reply_path_may_be_an_input_or_unpublishable_topic(topic):
    for path in (reply_path(TOPICS, "q1", reply_to=topic), reply_path(TOPICS, "q1", response_topic=topic),
                 refusal_path(TOPICS, "q1", topic, True)):
        assert path.topic is None and path.problem, path


def test_the_first_given_path_is_the_one_used_and_checked():
    assert reply_path(TOPICS, "q1") == ReplyPath("vlmd/dev/answer/q1")
    assert reply_path(TOPICS, None) == ReplyPath(None)
    assert reply_path(TOPICS, "q1", "me/x", "me/y") == ReplyPath("me/x")
    assert reply_path(TOPICS, "q1", None, "me/y") == ReplyPath("me/y")
    # a bad first choice is not replaced by a later one the client did not pick
    assert reply_path(TOPICS, "q1", "vlmd/dev/cancel", "me/y").topic is None
    # an invalid reply_to the codec could not keep still counts as the client's choice
    assert refusal_path(TOPICS, "q1", None, True).topic is None
    assert refusal_path(TOPICS, "q1", None, False, "me/y") == ReplyPath("me/y")


@pytest.mark.broker
def test_refusals_never_publish_into_the_daemons_input_topics(daemon):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    engine = FakeEngine(token_delay_s=0.05, extra_words=200)
    d = daemon(engine=engine, cameras={"front": {}})
    topics = d.topics
    d.ask(id="running", text="talk for a while", stream=False)
    assert engine.started.wait(10)
    # refused (no text), each naming an input topic as its reply path
    d.ask(id="b", reply_to=topics.frame("front"))
    d.ask(id="c", reply_to=topics.cancel(), **{"text": ""})
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topics.cancel()
    d.client.publish(topics.ask(), {"id": "d"}, properties=props)
    # accepted otherwise, but the reply path is an input topic
    d.ask(id="e", text="?", reply_to=topics.ask())
    errors = {}
    for _ in range(4):
        body = json.loads(d.client.next(10, topics.error()).payload)
        errors[body["request_id"]] = body
    assert sorted(errors) == ["b", "c", "d", "e"]
    assert {body["code"] for body in errors.values()} == {"bad_request"}
    assert "input topics" in errors["b"]["message"] or "input topics" in errors["e"]["message"]
    final = d.client.answer(topics.answer("running"), timeout=30)[1]
    assert final["finish_reason"] == "stop", "a refusal cancelled another client's request"
    assert not d.service.inbox.has_camera("front"), "a refusal became camera front's frame"
    assert len(engine.prompts) == 1  # "e" never ran
    for topic in (topics.frame("front"), topics.cancel()):
        with pytest.raises(TimeoutError):
            d.client.next(0.5, topic)  # the test client published nothing there itself


@pytest.mark.broker
def test_mqtt5_property_abuse_is_answered_or_refused(daemon):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    d = daemon()
    topics = d.topics

    def ask(body, **props):
        properties = Properties(PacketTypes.PUBLISH)
        for name, value in props.items():
            setattr(properties, name, value)
        d.client.publish(topics.ask(), body, properties=properties)

    for n, topic in enumerate(["a/+/b", "#", "$SYS/x", "$share/g/t"]):  # mosquitto passes these on
        ask({"id": f"rt{n}", "text": "?", "stream": False}, ResponseTopic=topic)
    refused = {}
    for _ in range(4):
        body = json.loads(d.client.next(10, topics.error()).payload)
        refused[body["request_id"]] = body
    assert sorted(refused) == ["rt0", "rt1", "rt2", "rt3"]
    assert all("response topic" in body["message"] for body in refused.values())
    corr = bytes(range(256)) * 255 + b"x" * 255  # 65535 bytes: the most MQTT allows
    ask({"id": "corr", "text": "?", "stream": False}, CorrelationData=corr)
    message = d.client.next(10, topics.answer("corr"))
    assert message.properties.CorrelationData == corr and json.loads(message.payload)["finish_reason"] == "stop"
    ask({"id": "props", "text": "?", "stream": False},
        UserProperty=[(f"k{i}", "v" * 20) for i in range(2000)] + [("reply_to", topics.cancel())])
    assert d.client.answer(topics.answer("props"))[1]["finish_reason"] == "stop"
    ask(b'{"meta": {"id": "nested"}, "id": "liar", "text": "caf\xe9"}', PayloadFormatIndicator=1)
    lie = d.client.answer(topics.answer("liar"))[1]  # the top-level id, not the nested one
    assert (lie["finish_reason"], lie["error"]["code"]) == ("rejected", "bad_json")
    assert d.service.worker_alive and d.service.healthy
