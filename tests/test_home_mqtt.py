"""Watches, dashboards and Home Assistant discovery over a real mosquitto (issue 21): a
watch deleted while it runs stays deleted, its entity goes before its state, dashboard
asks about invented cameras leave nothing retained, names that used to share one Home
Assistant id get one each. The engine is a stand-in whose typed answer waits on a gate,
so "while it runs" is a fact of the test, not a timing."""

from __future__ import annotations

import json
import threading
import uuid

import pytest

from npu.engine import DoneEvent, TokenEvent
from daemon.service import Service
from tests.fixtures_daemon import Collector, FakeEngine, make_config, png_bytes, wait_for

pytestmark = pytest.mark.broker


class GatedTypedEngine(FakeEngine):
    """A typed answer (`true`) that waits on `gate` after its first token; plain prompts
    are FakeEngine's."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.typed_started = threading.Event()

    def generate(self, prompt, options=None, should_stop=None):
        if options is None or options.format is None:
            yield from super().generate(prompt, options, should_stop)
            return
        self.prompts.append(prompt)
        yield TokenEvent(1, "yes", 0)
        self.typed_started.set()
        self.gate.wait(30)
        yield DoneEvent("yes", "stop", 90, 1, {}, {"value": True, "confidence": 0.9})


def retained(mosquitto, topics: list[str], wait: float = 1.5) -> dict[str, bytes]:
    """What a fresh subscriber gets at once: the retained messages (empty ones are none)."""
    client = Collector(mosquitto.host, mosquitto.port, topics)
    found = {}
    try:
        while True:
            try:
                message = client.next(wait)
            except TimeoutError:
                return found
            found[message.topic] = message.payload
    finally:
        client.close()


def test_a_watch_deleted_while_it_runs_is_not_resurrected(daemon, mosquitto):
    engine = GatedTypedEngine()
    d = daemon(engine=engine, cameras={"door": {}})
    d.frame("door", png_bytes((230, 20, 20)))
    d.wait_frames("door", 1)
    name = "w" + uuid.uuid4().hex[:6]
    d.client.publish(d.topics.watch_config(name), {"camera": "door", "question": "Red?", "format": {"type": "boolean"},
                                                    "debounce": 1}, retain=True)
    assert engine.typed_started.wait(10)
    d.client.publish(d.topics.watch_config(name), b"", retain=True)  # deleted while it runs
    wait_for(lambda: d.service.watches.get(name) is None, what="the deletion")
    assert d.client.next(10, d.topics.watch(name)).payload == b""
    engine.gate.set()
    wait_for(lambda: d.service.worker.watch_runner.counts["answered"] == 1, what="the run to end")
    d.ask(id="after", text="hello")  # the worker's next turn: the run's publishing is over by then
    d.client.answer(d.topics.answer("after"))
    assert retained(mosquitto, [d.topics.watch(name)]) == {}  # no state came back


def test_a_deleted_watch_loses_its_entity_before_its_state(daemon):
    """Home Assistant removes the entity first, so its templates never meet the empty state
    (issue 21: `Erroneous JSON`, `'value_json' is undefined`)."""
    prefix = "ha" + uuid.uuid4().hex[:6]
    d = daemon(cameras={"door": {}}, home_assistant={"enabled": True, "discovery_prefix": prefix})
    name = "w" + uuid.uuid4().hex[:6]
    config_topic = f"{prefix}/binary_sensor/vlmd_{d.config.device_id}/watch_{name}/config"
    watcher = Collector(d.client.client.host, d.client.client.port, [config_topic, d.topics.watch(name)])
    try:
        d.client.publish(d.topics.watch_config(name), {"camera": "door", "question": "Red?",
                                                        "format": {"type": "boolean"}}, retain=True)
        assert json.loads(watcher.next(10).payload)["state_topic"] == d.topics.watch(name)
        d.client.publish(d.topics.watch_config(name), b"", retain=True)
        order = [watcher.next(10) for _ in range(2)]
        assert [(m.topic, m.payload) for m in order] == [(config_topic, b""), (d.topics.watch(name), b"")]
    finally:
        watcher.close()


def test_dashboard_asks_about_invented_cameras_leave_nothing_retained(daemon, mosquitto):
    d = daemon(cameras={"door": {}})
    for index in range(40):
        d.client.publish(d.topics.dashboard_ask(f"ghost{index}"), b"Anyone there?")
    errors = [json.loads(d.client.next(10, d.topics.error()).payload) for _ in range(40)]
    assert {e["code"] for e in errors} == {"unknown_camera"}
    assert errors[0]["topic"] == d.topics.dashboard_ask("ghost0")
    assert retained(mosquitto, [d.root + "/dashboard/#"]) == {}
    # a camera that only sent frames is answered, not retained; a configured one is retained
    d.frame("yard", png_bytes())
    d.wait_frames("yard", 1)
    d.client.publish(d.topics.dashboard_ask("yard"), b"What is there?")
    assert json.loads(d.client.next(10, d.topics.dashboard_answer("yard")).payload)["finish_reason"] == "stop"
    d.frame("door", png_bytes())
    d.wait_frames("door", 1)
    d.client.publish(d.topics.dashboard_ask("door"), b"What is there?")
    assert json.loads(d.client.next(10, d.topics.dashboard_answer("door")).payload)["finish_reason"] == "stop"
    assert set(retained(mosquitto, [d.root + "/dashboard/#"])) == {d.topics.dashboard_answer("door")}


COLLIDING_WATCHES = [
    {"name": "a.b", "camera": "front.door", "question": "?", "format": {"type": "boolean"}},
    {"name": "a_b", "camera": "front_door", "question": "?", "format": {"type": "boolean"}},
    {"name": "p", "camera": "front_door", "question": "?",
     "format": {"type": "object", "properties": {"q_r": {"type": "boolean"}}}},
    {"name": "p_q", "camera": "front_door", "question": "?",
     "format": {"type": "object", "properties": {"r": {"type": "boolean"}}}},
]


def test_names_that_shared_a_home_assistant_id_get_one_each_and_keep_it(daemon, mosquitto):
    prefix = "ha" + uuid.uuid4().hex[:6]
    sections = dict(cameras={"front.door": {"caption": True}, "front_door": {"caption": True}},
                    watches=COLLIDING_WATCHES, home_assistant={"enabled": True, "discovery_prefix": prefix})
    d = daemon(**sections)
    configs = {topic: json.loads(body) for topic, body in retained(mosquitto, [prefix + "/#"]).items()}
    # status; per camera caption, frame, ask, answer; 4 watch entities
    assert len(configs) == 1 + 2 * 4 + 4
    assert len({c["unique_id"] for c in configs.values()}) == len(configs)
    assert {c["name"] for c in configs.values() if c["name"].startswith(("a", "p"))} == {"a.b", "a_b", "p q_r",
                                                                                         "p_q r"}
    d.close()
    publisher = Collector(mosquitto.host, mosquitto.port, [prefix + "/#"])
    try:  # clear them all, so that what follows comes from the restarted daemon
        for topic in configs:
            publisher.publish(topic, b"", retain=True)
    finally:
        publisher.close()
    again = Service(make_config(mosquitto.url, device_id=d.config.device_id, **sections),
                    engine_factory=lambda config: d.engine)
    again.start()  # a restart: the same ids
    try:
        assert again.client.wait_connected(10)
        wait_for(lambda: len(retained(mosquitto, [prefix + "/#"], wait=0.5)) == len(configs), what="discovery")
        assert {t: json.loads(b) for t, b in retained(mosquitto, [prefix + "/#"]).items()} == configs
    finally:
        again.stop(2.0)


def test_an_upgrade_empties_the_configs_an_older_vlmd_left_under_colliding_ids(daemon, mosquitto):
    prefix = "ha" + uuid.uuid4().hex[:6]
    device_id = "t" + uuid.uuid4().hex[:8]
    old_topic = f"{prefix}/sensor/vlmd_{device_id}/caption_front_door/config"  # how vlmd spelt it before
    publisher = Collector(mosquitto.host, mosquitto.port, [prefix + "/nothing"])
    try:
        publisher.publish(old_topic, b'{"name":"front_door caption","state_topic":"x"}', retain=True)
    finally:
        publisher.close()
    daemon(device_id=device_id, cameras={"front_door": {"caption": True}},
           home_assistant={"enabled": True, "discovery_prefix": prefix})
    wait_for(lambda: old_topic not in retained(mosquitto, [prefix + "/#"], wait=0.5), what="the old config to go")
