"""Idempotent request ids (issue 15.4): QoS 1 is at-least-once and a reconnecting client
retransmits what it had in flight (new packets, so the DUP flag does not show it). A
request id seen within the id window is not run again: while it runs nothing new starts,
once finished its final is published again unchanged."""

from __future__ import annotations

import json
import time

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


def test_two_clients_may_use_the_same_id(daemon):
    """#21.1: an id is unique per reply path, not across the daemon: B's q1 is not A's."""
    engine = FakeEngine(token_delay_s=0.02, extra_words=10)
    d = daemon(engine=engine)
    a, b = d.root + "/clients/A", d.root + "/clients/B"
    d.ask(id="q1", text="What colour is the sky?", stream=False, reply_to=a)
    assert d.client.answer(a, timeout=30)[1]["finish_reason"] == "stop"
    d.ask(id="q1", text="What colour is the sky?", stream=False, reply_to=b)  # same id, same text, another client
    _, final_b = d.client.answer(b, timeout=30)
    assert final_b["id"] == "q1" and final_b["finish_reason"] == "stop"
    with pytest.raises(TimeoutError):
        d.client.next(1.0, a)  # A is not answered a second time
    assert len(engine.prompts) == 2


def test_a_cancel_reaches_only_the_request_whose_reply_path_it_names(daemon):
    """#21.1 for cancels: client B's cancel of "q1" (no reply path: the default answer topic)
    neither stops client A's running q1 (reply_to clients/A) nor its queued one; A's own
    cancel, naming its reply_to, does."""
    engine = FakeEngine(token_delay_s=0.05, extra_words=60)
    d = daemon(engine=engine)
    a = d.root + "/clients/A"
    d.ask(id="q1", text="talk a lot", reply_to=a, stream=False)
    assert engine.started.wait(10)
    d.ask(id="q2", text="?", reply_to=a, stream=False)
    wait_for(lambda: d.service.inbox.depth == 1, what="q2 queued")
    for request_id in ("q1", "q2"):
        d.client.publish(d.topics.cancel(), {"id": request_id})  # another client, same ids
        d.client.publish(d.topics.cancel(), {"id": request_id, "reply_to": d.root + "/clients/B"})
    time.sleep(0.5)
    assert d.service.inbox.depth == 1 and not d.service.inbox.running.cancel_event.is_set()
    d.client.publish(d.topics.cancel(), {"id": "q2", "reply_to": a})
    d.client.publish(d.topics.cancel(), {"id": "q1", "reply_to": a})
    finals = {}
    while len(finals) < 2:
        message = json.loads(d.client.next(30, a).payload)
        finals[message["id"]] = message["finish_reason"]
    assert finals == {"q1": "cancelled", "q2": "cancelled"}
    assert len(engine.prompts) == 1


def test_a_malformed_copy_of_a_queued_id_leaves_it_alone(daemon):
    """#21.2: a refused message naming a queued request's id publishes nothing on that
    request's reply path and does not touch its journal entry: the queued request gets one
    final, and a valid repeat of it is still a retransmission."""
    engine = FakeEngine(token_delay_s=0.05, extra_words=40)
    d = daemon(engine=engine)
    reply = d.topics.answer("long3")
    d.ask(id="running", text="long", stream=False)
    assert engine.started.wait(10)
    d.ask(id="long3", text="What is it?", stream=False)
    wait_for(lambda: d.service.inbox.depth == 1, what="long3 queued")
    d.ask(id="long3", text="")  # refused (bad_request)
    error = json.loads(d.client.next(10, d.topics.error()).payload)
    assert error["code"] == "bad_request" and error["request_id"] == "long3"
    d.ask(id="long3", text="What is it?", stream=False)  # the client retransmits it
    _, final = d.client.answer(reply, timeout=60)
    assert final["finish_reason"] == "stop"
    with pytest.raises(TimeoutError):
        d.client.next(2.0, reply)  # exactly one final for long3
    assert [p.text for p in engine.prompts] == ["long", "What is it?"]


def test_the_same_id_asking_something_else_while_queued_is_refused_on_the_error_topic(daemon):
    engine = FakeEngine(token_delay_s=0.05, extra_words=40)
    d = daemon(engine=engine)
    d.ask(id="running", text="long", stream=False)
    assert engine.started.wait(10)
    d.ask(id="q2", text="How many?", stream=False)
    wait_for(lambda: d.service.inbox.depth == 1, what="q2 queued")
    d.ask(id="q2", text="Say hello.", stream=False)
    error = json.loads(d.client.next(10, d.topics.error()).payload)
    assert error["code"] == "duplicate_id" and error["request_id"] == "q2"
    _, final = d.client.answer(d.topics.answer("q2"), timeout=60)
    assert final["finish_reason"] == "stop"
    assert [p.text for p in engine.prompts] == ["long", "How many?"]


def test_an_id_asked_again_with_another_question_after_its_final_is_a_new_request(daemon):
    """#21.11: a user who follows protocol.md after the README's minute (same ids, other
    questions) gets answers to the new questions, not yesterday's finals."""
    engine = FakeEngine()
    d = daemon(engine=engine)
    reply = d.topics.answer("q1")
    d.ask(id="q1", text="How many shapes?", stream=False)
    first = d.client.answer(reply, timeout=30)[1]
    d.ask(id="q1", text="Say hello.", stream=False)
    second = d.client.answer(reply, timeout=30)[1]
    assert [p.text for p in engine.prompts] == ["How many shapes?", "Say hello."]
    assert second["finish_reason"] == "stop" and first["finish_reason"] == "stop"
    d.ask(id="q1", text="Say hello.", stream=False)  # a retransmission of the second: its final again
    assert d.client.answer(reply, timeout=30)[1] == second
    assert len(engine.prompts) == 2
