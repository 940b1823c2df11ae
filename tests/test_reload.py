"""Reload (SIGHUP) changes camera sources only (issue 16.3): the topic root, device id and
fleet topic stay those of the running connection, whose subscriptions do not move."""

from __future__ import annotations

import uuid

import pytest

from tests.fixtures_daemon import make_config, png_bytes

pytestmark = pytest.mark.broker


def test_a_reload_that_changes_device_id_root_and_fleet_keeps_serving_the_running_root(daemon, mosquitto):
    d = daemon(cameras={"a": {}})
    old_root = d.root
    source = f"ext-{uuid.uuid4().hex[:6]}/b/snapshot"
    new = make_config(mosquitto.url, device_id="renamed" + uuid.uuid4().hex[:6], root="elsewhere/x",
                      fleet={"enabled": True, "ask_topic": "fleet-" + uuid.uuid4().hex[:6] + "/ask"},
                      cameras={"a": {}, "b": {"topic": source}})
    summary = d.service.reload(new)
    assert "2 camera(s)" in summary
    assert d.service.topics.root == old_root and d.service.topics.fleet_ask_topic is None
    assert d.service.topics.frame_sources == {source: "b"}
    # the running root still answers: asks, cancels and frames are not dropped as unknown
    d.ask(id="after", text="still there?", stream=False)
    assert d.client.answer(f"{old_root}/answer/after")[1]["finish_reason"] == "stop"
    d.client.publish(source, png_bytes(size=(20, 10)), qos=0)
    d.wait_frames("b", 1)
    d.frame("a", png_bytes(size=(8, 6)))
    d.wait_frames("a", 1)
    d.ask(id="cam-a", text="?", camera="a", stream=False)
    assert "sizes=8x6" in d.client.answer(f"{old_root}/answer/cam-a")[1]["text"]
