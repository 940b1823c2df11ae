"""Every discovery config a running daemon publishes, checked by Home Assistant's own MQTT
code (tools/check_ha_discovery.py, run by a Python with the `homeassistant` package: set
VLMD_HA_PYTHON, default /work/venv-ha/bin/python; skipped without one): each passes its
platform's DISCOVERY_SCHEMA with no key dropped, and each watch entity's template shows
unknown before a value (issue 21: an enum watch showed "None") and the value after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from protocol import codec
from protocol.watches import WatchState
from tests.fixtures_daemon import Collector

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HA_PYTHON = Path(os.environ.get("VLMD_HA_PYTHON", "/work/venv-ha/bin/python"))
TOOL = Path(__file__).resolve().parents[1] / "tools" / "check_ha_discovery.py"

WATCHES = [
    {"name": "parcel", "camera": "front_door", "question": "?", "format": {"type": "boolean"}},
    {"name": "colour", "camera": "front_door", "question": "?", "format": {"enum": ["red", "blue"]}},
    {"name": "people", "camera": "front.door", "question": "?", "format": {"type": "integer", "minimum": 0, "maximum": 9}},
    {"name": "level", "camera": "front.door", "question": "?", "format": {"type": "number", "minimum": 0, "maximum": 1}},
    {"name": "car.state", "camera": "front.door", "question": "?", "format": {"type": "object", "properties": {
        "open": {"type": "boolean"}, "colour": {"enum": ["red", "blue"]}, "count": {"type": "integer"}}}},
]
# (watch, property) -> (value without a value yet, a value and how Home Assistant shows it)
SAMPLES = {
    ("parcel", None): (True, "ON"), ("colour", None): ("blue", "blue"), ("people", None): (3, "3"),
    ("level", None): (0.25, "0.25"), ("car.state", "open"): (False, "OFF"), ("car.state", "colour"): ("red", "red"),
    ("car.state", "count"): (2, "2"),
}


def ha_python() -> Path:
    if not HA_PYTHON.is_file():
        pytest.skip(f"no Python with the homeassistant package at {HA_PYTHON} (set VLMD_HA_PYTHON)")
    probe = subprocess.run([str(HA_PYTHON), "-c", "import homeassistant.components.mqtt.sensor"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{HA_PYTHON} cannot import Home Assistant's MQTT platforms: {probe.stderr.decode()[-300:]}")
    return HA_PYTHON


def state(name: str, camera: str, value) -> str:
    return codec.encode(WatchState(name=name, camera=camera, value=value, confidence=None if value is None else 0.9,
                                   since=None if value is None else 1.0, updated=2.0, frame_ts=1.5)).decode()


def test_every_discovery_config_passes_home_assistants_own_schemas(daemon, mosquitto):
    python = ha_python()
    prefix = "ha" + uuid.uuid4().hex[:6]
    d = daemon(cameras={"front.door": {"caption": True}, "front_door": {"caption": True}}, watches=WATCHES,
               home_assistant={"enabled": True, "discovery_prefix": prefix})
    configs = retained_configs(mosquitto, prefix)
    assert len(configs) == 1 + 2 * 4 + 4 + 3
    states = {}
    for watch in WATCHES:
        topic = d.topics.watch(watch["name"])
        if watch["format"].get("type") == "object":
            full = {key: SAMPLES[(watch["name"], key)][0] for key in watch["format"]["properties"]}
        else:
            full = SAMPLES[(watch["name"], None)][0]
        states[topic] = [state(watch["name"], watch["camera"], None), state(watch["name"], watch["camera"], full)]
    request = {"prefix": prefix, "configs": [{"topic": t, "payload": p} for t, p in configs.items()], "states": states}
    run = subprocess.run([str(python), str(TOOL)], input=json.dumps(request), capture_output=True, text=True,
                         timeout=300)
    result = json.loads(run.stdout or "{}")
    sys.stdout.write(json.dumps(result, indent=1) + "\n")  # shown with -s: what Home Assistant made of each
    assert result and run.returncode == 0, run.stderr[-2000:]
    report = result["configs"]
    assert {topic for topic, item in report.items() if not item["ok"]} == set()
    for topic, item in report.items():
        # an MQTT sensor's schema knows `options` only in later releases (home-assistant/core
        # issue 123224, 2024.7.4 still without); before, an enum sensor takes any state: kept
        # for the releases that show the options
        allowed = {"options"} if json.loads(configs[topic]).get("device_class") == "enum" else set()
        assert set(item["dropped"]) <= allowed, (result["homeassistant"], topic, item["dropped"])
    components = {item["component"] for item in report.values()}
    assert components == {"binary_sensor", "sensor", "text", "image"}
    watch_entities = {}
    for topic, item in report.items():
        body = json.loads(configs[topic])
        if body.get("state_topic", "").startswith(d.topics.watch("x")[:-1]):
            watch_entities[body["name"]] = item
    assert len(watch_entities) == len(SAMPLES)
    for (name, key), (_, shown) in SAMPLES.items():
        watch = next(w for w in WATCHES if w["name"] == name)
        before, after = states[d.topics.watch(name)]
        item = watch_entities[name if key is None else f"{name} {key}"]
        enum = "enum" in (watch["format"] if key is None else watch["format"]["properties"][key])
        # unknown: "None" is unknown to binary and numeric sensors; an enum sensor ignores the message
        assert item["rendered"][before] == ("IGNORED" if enum else "None"), (name, key, item)
        assert item["rendered"][after] == shown, (name, key, item)


def retained_configs(mosquitto, prefix: str, wait: float = 2.0) -> dict[str, str]:
    client = Collector(mosquitto.host, mosquitto.port, [prefix + "/#"])
    configs = {}
    try:
        while True:
            try:
                message = client.next(wait)
            except TimeoutError:
                return configs
            if message.payload:
                configs[message.topic] = message.payload.decode()
    finally:
        client.close()
