"""Home Assistant MQTT discovery: one device per board with

- a status binary sensor bound to the availability (status) topic;
- per captioned camera, a caption sensor and an `image` entity showing the frame the
  caption describes (`<root>/caption/<camera>/image`, JPEG);
- per configured camera, a `text` entity to ask a question from the dashboard
  (`<root>/dashboard/<camera>/ask`) and a sensor with its answer (`.../answer`);
- per watch: boolean -> binary_sensor, enum -> sensor with device_class enum and its
  options, integer/number -> sensor (a measurement); an object format gets one such
  entity per property. A watch without a value yet shows as unknown.

Entity ids (`protocol.ha_ids.ha_object_id`) name exactly one (kind, camera or watch,
property) whatever characters the names hold, and are the same on every start; an entity
whose id an older vlmd spelt otherwise (names holding '_' or '.') has that old config
emptied (`Discovery.legacy_topic`). Every entity but the status sensor is bound to the
availability topic. Home Assistant
limits a sensor's state to 255 characters, so text states are cut to 255 and the whole
message is the sensor's attributes. `removal(messages)` empties the same config topics
(what disabling discovery or deleting a watch publishes). Payloads are plain dicts;
topics come from protocol.topics.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from protocol.ha_ids import ha_legacy_object_id, ha_object_id
from protocol.payloads import STATUS_OFFLINE, STATUS_ONLINE
from protocol.topics import Topics, ha_birth_topic, ha_config_topic

HA_STATE_MAX_CHARS = 255
DISCOVERY_QOS = 1

# `stopped` means "not running" to Home Assistant as much as `offline` does.
_AVAILABILITY_TEMPLATE = "{{ 'online' if value == 'online' else 'offline' }}"


@dataclass(frozen=True)
class Discovery:
    topic: str
    payload: bytes  # JSON; published retained
    legacy_topic: str | None = None  # where an older vlmd put this entity (to empty), when elsewhere


def discovery_messages(
    topics: Topics, device_id: str, cameras: list[str], prefix: str = "homeassistant", model_name: str = "vlmd",
    sw_version: str | None = None, ask_cameras: Sequence[str] = (), watches: Iterable[tuple[str, dict]] = (),
) -> list[Discovery]:
    """Every discovery config message for this board, in publishing order. `cameras`: the
    captioned ones; `ask_cameras`: those a dashboard may ask about; `watches`: (name, format)."""
    node = _Node(ha_object_id("vlmd", device_id), ha_legacy_object_id("vlmd", device_id))
    device = {
        "identifiers": [node.id],
        "name": f"vlmd {device_id}",
        "manufacturer": "vlmd",
        "model": model_name,
    }
    if sw_version:
        device["sw_version"] = sw_version
    availability = {
        "topic": topics.status(),
        "value_template": _AVAILABILITY_TEMPLATE,
        "payload_available": STATUS_ONLINE,
        "payload_not_available": STATUS_OFFLINE,
    }
    messages = [_status_sensor(topics, prefix, node, device)]
    for camera in sorted(cameras):
        messages.append(_caption_sensor(topics, prefix, node, device, availability, camera))
        messages.append(_entity(prefix, "image", node, ("frame", camera), {
            "name": f"{camera} frame", "image_topic": topics.caption_image(camera), "content_type": "image/jpeg",
            "icon": "mdi:cctv"}, device, availability))
    for camera in sorted(ask_cameras):
        messages.append(_entity(prefix, "text", node, ("ask", camera), {
            "name": f"Ask {camera}", "command_topic": topics.dashboard_ask(camera), "min": 1,
            "max": HA_STATE_MAX_CHARS, "mode": "text", "icon": "mdi:chat-question"}, device, availability))
        messages.append(_entity(prefix, "sensor", node, ("answer", camera), {
            "name": f"{camera} answer", "state_topic": topics.dashboard_answer(camera),
            "value_template": "{{ value_json.text[:%d] }}" % HA_STATE_MAX_CHARS,
            "json_attributes_topic": topics.dashboard_answer(camera), "icon": "mdi:chat"}, device, availability))
    for name, schema in sorted(watches, key=lambda item: item[0]):
        messages += _watch_entities(topics, prefix, node, device, availability, name, schema)
    return messages


def removal(messages: Iterable[Discovery]) -> list[Discovery]:
    """Empty retained configs on the same topics: Home Assistant removes those entities."""
    return [Discovery(message.topic, b"") for message in messages]


def removal_of(topics: Iterable[str]) -> list[Discovery]:
    """Empty retained configs on these config topics."""
    return [Discovery(topic, b"") for topic in topics]


def _watch_entities(topics: Topics, prefix: str, node: _Node, device: dict, availability: dict, name: str,
                    schema: dict) -> list[Discovery]:
    state = topics.watch(name)
    if schema.get("type") == "object":
        return [_watch_entity(prefix, node, device, availability, name, state, sub, key)
                for key, sub in schema["properties"].items()]
    return [_watch_entity(prefix, node, device, availability, name, state, schema, None)]


def _watch_entity(prefix: str, node: _Node, device: dict, availability: dict, name: str, state: str, schema: dict,
                  key: str | None) -> Discovery:
    """One entity of a watch (of one property of an object watch). No value yet shows as
    unknown: binary and numeric sensors take the state "None" as unknown; a sensor of device
    class enum keeps "None" as a string (homeassistant/components/mqtt/sensor.py
    `_update_state`, 2024.3.3), so its template fails without a value, which Home
    Assistant's MQTT sensor takes silently as "keep the state" (a new entity: unknown)."""
    value = "value_json.value" if key is None else "value_json.value[%s]" % json.dumps(key)
    known = "value_json.value is not none" if key is None else "value_json.value is not none and %s is not none" % value
    config: dict[str, Any] = {"name": name if key is None else f"{name} {key}", "state_topic": state,
                              "json_attributes_topic": state, "icon": "mdi:eye"}
    object_id = ("watch", name) if key is None else ("watch", name, key)
    if schema.get("type") == "boolean":
        config.update(payload_on="ON", payload_off="OFF",
                      value_template="{%% if %s %%}{{ 'ON' if %s else 'OFF' }}{%% else %%}None{%% endif %%}" % (known, value))
        return _entity(prefix, "binary_sensor", node, object_id, config, device, availability)
    config["value_template"] = "{{ %s if %s else None }}" % (value, known)
    if "enum" in schema:
        # `set` on an attribute of a dict is a jinja TemplateRuntimeError: no undefined is
        # touched, nothing is logged, the message is ignored (PayloadSentinel.DEFAULT)
        config["value_template"] = ("{%% if %s %%}{{ %s }}{%% else %%}{%% set value_json.no_value = 1 %%}{%% endif %%}"
                                    % (known, value))
        config.update(device_class="enum", options=list(schema["enum"]))
    else:
        config["state_class"] = "measurement"
    return _entity(prefix, "sensor", node, object_id, config, device, availability)


def _entity(prefix: str, component: str, node: _Node, parts: tuple[str, ...], config: dict, device: dict,
            availability: dict) -> Discovery:
    object_id = ha_object_id(*parts)
    body = {**config, "unique_id": f"{node.id}_{object_id}", "availability": [availability], "device": device}
    return _discovery(prefix, component, node, parts, body)


def _discovery(prefix: str, component: str, node: _Node, parts: tuple[str, ...], body: dict) -> Discovery:
    topic = ha_config_topic(prefix, component, node.id, ha_object_id(*parts))
    legacy = ha_config_topic(prefix, component, node.legacy, ha_legacy_object_id(*parts))
    return Discovery(topic, _json(body), legacy if legacy != topic else None)


class _Node(NamedTuple):
    """The board's Home Assistant node id, and the one an older vlmd gave it."""

    id: str
    legacy: str


def birth_topic(prefix: str) -> str:
    """Home Assistant announces `online` here on start; discovery is republished then."""
    return ha_birth_topic(prefix)


def _status_sensor(topics: Topics, prefix: str, node: _Node, device: dict) -> Discovery:
    parts = ("status",)
    object_id = ha_object_id(*parts)
    config = {
        "name": "Status",
        "unique_id": f"{node.id}_{object_id}",
        "state_topic": topics.status(),
        "value_template": "{{ 'ON' if value == 'online' else 'OFF' }}",
        "payload_on": "ON",
        "payload_off": "OFF",
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "device": device,
    }
    return _discovery(prefix, "binary_sensor", node, parts, config)


def _caption_sensor(topics: Topics, prefix: str, node: _Node, device: dict, availability: dict, camera: str) -> Discovery:
    parts = ("caption", camera)
    object_id = ha_object_id(*parts)
    config = {
        "name": f"{camera} caption",
        "unique_id": f"{node.id}_{object_id}",
        "state_topic": topics.caption(camera),
        "value_template": "{{ value_json.text[:%d] }}" % HA_STATE_MAX_CHARS,
        "json_attributes_topic": topics.caption(camera),
        "availability": [availability],
        "icon": "mdi:cctv",
        "device": device,
    }
    return _discovery(prefix, "sensor", node, parts, config)


def _json(config: dict) -> bytes:
    return json.dumps(config, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
