"""Idempotent request ids (issue 15.4): QoS 1 is at-least-once and a reconnecting client
retransmits what it had in flight (new packets, so the DUP flag does not show it). A
request id seen within the id window is not run again: while it runs nothing new starts,
once finished its final is published again unchanged."""

from __future__ import annotations

import json

import pytest

from tests.fixtures_daemon import FakeEngine, wait_for

pytestmark = pytest.mark.broker


def test_a_retransmitted_id_runs_once_and_gets_the_same_final_again(daemon):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    engine = FakeEngine(token_delay_s=0.02, extra_words=40)
    d = daemon(engine=engine)
    reply = d.topics.answer("dup")
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = b"\x07corr"
    ask = {"id": "dup", "text": "tell me", "stream": False}
    d.client.publish(d.topics.ask(), ask, properties=props)
    assert engine.started.wait(10)
    for _ in range(3):  # a client stuck reconnecting re-sends what it had in flight
        d.client.publish(d.topics.ask(), ask, properties=props)
    first = d.client.next(30, reply)
    assert json.loads(first.payload)["finish_reason"] == "stop"
    with pytest.raises(TimeoutError):
        d.client.next(1.0, reply)  # the three copies sent while it ran got nothing of their own
    d.client.publish(d.topics.ask(), ask, properties=props)  # once finished: the same final again
    again = d.client.next(10, reply)
    assert again.payload == first.payload and again.properties.CorrelationData == b"\x07corr"
    assert len(engine.prompts) == 1
    assert d.service.stats.outcomes["stop"] == 1


def test_a_refused_id_may_be_asked_again(daemon):
    engine = FakeEngine(token_delay_s=0.02, extra_words=40)
    d = daemon(engine=engine, requests={"queue_size": 1})
    d.ask(id="running", text="long", stream=False)
    assert engine.started.wait(10)
    d.ask(id="waiting", text="?", stream=False)
    wait_for(lambda: d.service.inbox.depth == 1, what="the queued question")
    d.ask(id="retry", text="?", stream=False)
    assert d.client.answer(d.topics.answer("retry"))[1]["error"]["code"] == "busy"
    for request_id in ("running", "waiting"):
        d.client.answer(d.topics.answer(request_id), timeout=30)
    d.ask(id="retry", text="?", stream=False)  # a retry after `busy` is a new attempt, not a duplicate
    assert d.client.answer(d.topics.answer("retry"), timeout=30)[1]["finish_reason"] == "stop"
    assert len(engine.prompts) == 3
