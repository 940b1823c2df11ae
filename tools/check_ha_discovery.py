"""Check vlmd's Home Assistant discovery with Home Assistant's own MQTT code.

Run with a Python that has the `homeassistant` package (not vlmd's: it pins its own
pydantic, aiohttp... so it lives in a venv of its own, e.g.
`python3 -m venv /work/venv-ha && /work/venv-ha/bin/pip install --no-deps homeassistant==2024.3.3`
plus its requirements without the bluetooth ones; see tests/test_ha_schemas.py).

Reads one JSON object on stdin:
  {"prefix": "homeassistant",
   "configs": [{"topic": ".../config", "payload": "<the retained JSON>"}, ...],
   "states": {"<state topic>": ["<a payload published there>", ...]}}
and writes one JSON report on stdout, {"homeassistant": its version, "configs": {...}}:
per config topic, what Home Assistant's discovery
would do with it, as its mqtt integration does (homeassistant/components/mqtt/discovery.py
`async_start`: the topic matcher, supported components, abbreviations expanded, then
mixins.py `async_setup_entity_entry_helper`: the platform's DISCOVERY_SCHEMA):
  {"<topic>": {"component", "ok": bool, "error": str | None, "dropped": [keys the schema
   removed as unknown], "rendered": {"<state payload>": "<value_template's output>" or
   "IGNORED" (the render failed silently: the entity keeps its state, as a sensor does with
   PayloadSentinel.DEFAULT)}}}

Imports nothing of vlmd: it is a bridge between two environments.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from typing import Any

from homeassistant.components.mqtt import binary_sensor, image, sensor, text
from homeassistant.components.mqtt.abbreviations import ABBREVIATIONS, DEVICE_ABBREVIATIONS
from homeassistant.components.mqtt.discovery import SUPPORTED_COMPONENTS, TOPIC_MATCHER
from homeassistant.components.mqtt.models import MqttValueTemplate, PayloadSentinel
from homeassistant.const import __version__ as HA_VERSION
from homeassistant.core import HomeAssistant
from homeassistant.helpers import template

SCHEMAS = {"binary_sensor": binary_sensor.DISCOVERY_SCHEMA, "sensor": sensor.DISCOVERY_SCHEMA,
           "text": text.DISCOVERY_SCHEMA, "image": image.DISCOVERY_SCHEMA}


def expand(payload: dict[str, Any]) -> dict[str, Any]:
    """Abbreviated keys to their long names, as discovery does before validating."""
    expanded = {ABBREVIATIONS.get(key, key): value for key, value in payload.items()}
    if isinstance(expanded.get("device"), dict):
        expanded["device"] = {DEVICE_ABBREVIATIONS.get(k, k): v for k, v in expanded["device"].items()}
    for availability in expanded.get("availability") or []:
        if isinstance(availability, dict):
            for key in list(availability):
                availability[ABBREVIATIONS.get(key, key)] = availability.pop(key)
    expanded["platform"] = "mqtt"
    return expanded


def check(hass: HomeAssistant, prefix: str, topic: str, raw: str, states: dict[str, list[str]]) -> dict[str, Any]:
    match = TOPIC_MATCHER.match(topic.replace(f"{prefix}/", "", 1))
    if match is None:
        return {"component": None, "ok": False, "error": "illegal discovery topic", "dropped": [], "rendered": {}}
    component = match.group("component")
    report: dict[str, Any] = {"component": component, "ok": False, "error": None, "dropped": [], "rendered": {}}
    if component not in SUPPORTED_COMPONENTS or component not in SCHEMAS:
        report["error"] = f"component {component} not checked"
        return report
    payload = expand(json.loads(raw))
    try:
        config = SCHEMAS[component](dict(payload))
    except Exception as exc:  # voluptuous.Invalid and friends: the entity would not be created
        report["error"] = f"{type(exc).__name__}: {exc}"
        return report
    report["ok"] = True
    report["dropped"] = sorted(key for key in payload if key not in config and key != "platform")
    value_template = config.get("value_template")
    if value_template is not None and config.get("state_topic") in states:
        value_template.hass = hass
        render = MqttValueTemplate(value_template, hass=hass).async_render_with_possible_json_value
        for state in states[config["state_topic"]]:
            rendered = render(state, PayloadSentinel.DEFAULT)
            report["rendered"][state] = "IGNORED" if rendered is PayloadSentinel.DEFAULT else str(rendered)
    return report


async def main() -> int:
    request = json.load(sys.stdin)
    config_dir = tempfile.mkdtemp(prefix="vlmd-ha-")
    hass = HomeAssistant(config_dir)
    try:
        report = {item["topic"]: check(hass, request.get("prefix", "homeassistant"), item["topic"], item["payload"],
                                       request.get("states", {}))
                  for item in request["configs"]}
    finally:
        await hass.async_stop(force=True)
        shutil.rmtree(config_dir, ignore_errors=True)
    json.dump({"homeassistant": HA_VERSION, "configs": report}, sys.stdout, indent=1, sort_keys=True)
    return 0 if all(item["ok"] for item in report.values()) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
