"""Home Assistant MQTT discovery: one device per board with

- a status binary sensor bound to the availability (status) topic;
- per captioned camera, a caption sensor and an `image` entity showing the frame the
  caption describes (`<root>/caption/<camera>/image`, JPEG);
- per configured camera, a `text` entity to ask a question from the dashboard
  (`<root>/dashboard/<camera>/ask`) and a sensor with its answer (`.../answer`);
- per watch: boolean -> binary_sensor, enum -> sensor with device_class enum and its
  options, integer/number -> sensor (a measurement); an object format gets one such
  entity per property. A watch without a value yet shows as unknown ("None").

Every entity but the status sensor is bound to the availability topic. Home Assistant
limits a sensor's state to 255 characters, so text states are cut to 255 and the whole
message is the sensor's attributes. `removal(messages)` empties the same config topics
(what disabling discovery or deleting a watch publishes). Payloads are plain dicts;
topics come from protocol.topics.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.payloads import STATUS_OFFLINE, STATUS_ONLINE
from protocol.topics import Topics, ha_birth_topic, ha_config_topic, ha_object_id

HA_STATE_MAX_CHARS = 255
DISCOVERY_QOS = 1

# `stopped` means "not running" to Home Assistant as much as `offline` does.
_AVAILABILITY_TEMPLATE = "{{ 'online' if value == 'online' else 'offline' }}"


@dataclass(frozen=True)
class Discovery:
    topic: str
    payload: bytes  # JSON; published retained


def discovery_messages(
    topics: Topics, device_id: str, cameras: list[str], prefix: str = "homeassistant", model_name: str = "vlmd",
    sw_version: str | None = None, ask_cameras: Sequence[str] = (), watches: Iterable[tuple[str, dict]] = (),
) -> list[Discovery]:
    """Every discovery config message for this board, in publishing order. `cameras`: the
    captioned ones; `ask_cameras`: those a dashboard may ask about; `watches`: (name, format)."""
    node = ha_object_id(f"vlmd_{device_id}")
    device = {
        "identifiers": [node],
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
        messages.append(_entity(prefix, "image", node, f"frame_{camera}", {
            "name": f"{camera} frame", "image_topic": topics.caption_image(camera), "content_type": "image/jpeg",
            "icon": "mdi:cctv"}, device, availability))
    for camera in sorted(ask_cameras):
        messages.append(_entity(prefix, "text", node, f"ask_{camera}", {
            "name": f"Ask {camera}", "command_topic": topics.dashboard_ask(camera), "min": 1,
            "max": HA_STATE_MAX_CHARS, "mode": "text", "icon": "mdi:chat-question"}, device, availability))
        messages.append(_entity(prefix, "sensor", node, f"answer_{camera}", {
            "name": f"{camera} answer", "state_topic": topics.dashboard_answer(camera),
            "value_template": "{{ value_json.text[:%d] }}" % HA_STATE_MAX_CHARS,
            "json_attributes_topic": topics.dashboard_answer(camera), "icon": "mdi:chat"}, device, availability))
    for name, schema in sorted(watches, key=lambda item: item[0]):
        messages += _watch_entities(topics, prefix, node, device, availability, name, schema)
    return messages


def removal(messages: Iterable[Discovery]) -> list[Discovery]:
    """Empty retained configs on the same topics: Home Assistant removes those entities."""
    return [Discovery(message.topic, b"") for message in messages]


def _watch_entities(topics: Topics, prefix: str, node: str, device: dict, availability: dict, name: str,
                    schema: dict) -> list[Discovery]:
    state = topics.watch(name)
    if schema.get("type") == "object":
        return [_watch_entity(prefix, node, device, availability, name, state, sub, key)
                for key, sub in schema["properties"].items()]
    return [_watch_entity(prefix, node, device, availability, name, state, schema, None)]


def _watch_entity(prefix: str, node: str, device: dict, availability: dict, name: str, state: str, schema: dict,
                  key: str | None) -> Discovery:
    """One entity of a watch (of one property of an object watch); "None" = no value yet."""
    value = "value_json.value" if key is None else "value_json.value[%s]" % json.dumps(key)
    known = "value_json.value is not none"
    config: dict[str, Any] = {"name": name if key is None else f"{name} {key}", "state_topic": state,
                              "json_attributes_topic": state, "icon": "mdi:eye"}
    object_id = f"watch_{name}" if key is None else f"watch_{name}_{key}"
    if schema.get("type") == "boolean":
        config.update(payload_on="ON", payload_off="OFF",
                      value_template="{%% if %s %%}{{ 'ON' if %s else 'OFF' }}{%% else %%}None{%% endif %%}" % (known, value))
        return _entity(prefix, "binary_sensor", node, object_id, config, device, availability)
    config["value_template"] = "{{ %s if %s else None }}" % (value, known)
    if "enum" in schema:
        config.update(device_class="enum", options=list(schema["enum"]))
    else:
        config["state_class"] = "measurement"
    return _entity(prefix, "sensor", node, object_id, config, device, availability)


def _entity(prefix: str, component: str, node: str, name: str, config: dict, device: dict,
            availability: dict) -> Discovery:
    object_id = ha_object_id(name)
    body = {**config, "unique_id": f"{node}_{object_id}", "availability": [availability], "device": device}
    return Discovery(ha_config_topic(prefix, component, node, object_id), _json(body))


def birth_topic(prefix: str) -> str:
    """Home Assistant announces `online` here on start; discovery is republished then."""
    return ha_birth_topic(prefix)


def _status_sensor(topics: Topics, prefix: str, node: str, device: dict) -> Discovery:
    object_id = "status"
    config = {
        "name": "Status",
        "unique_id": f"{node}_{object_id}",
        "state_topic": topics.status(),
        "value_template": "{{ 'ON' if value == 'online' else 'OFF' }}",
        "payload_on": "ON",
        "payload_off": "OFF",
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "device": device,
    }
    return Discovery(ha_config_topic(prefix, "binary_sensor", node, object_id), _json(config))


def _caption_sensor(topics: Topics, prefix: str, node: str, device: dict, availability: dict, camera: str) -> Discovery:
    object_id = ha_object_id(f"caption_{camera}")
    config = {
        "name": f"{camera} caption",
        "unique_id": f"{node}_{object_id}",
        "state_topic": topics.caption(camera),
        "value_template": "{{ value_json.text[:%d] }}" % HA_STATE_MAX_CHARS,
        "json_attributes_topic": topics.caption(camera),
        "availability": [availability],
        "icon": "mdi:cctv",
        "device": device,
    }
    return Discovery(ha_config_topic(prefix, "sensor", node, object_id), _json(config))


def _json(config: dict) -> bytes:
    return json.dumps(config, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
