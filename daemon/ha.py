"""Home Assistant MQTT discovery: one device per board, a caption sensor per camera and
a status binary sensor bound to the availability (status) topic.

Home Assistant limits a sensor's state to 255 characters, so the state is the caption
cut to 255 and the whole caption message (full text, timestamps, timings) is the
sensor's attributes. Payloads are plain dicts; topics come from protocol.topics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

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
    sw_version: str | None = None,
) -> list[Discovery]:
    """Every discovery config message for this board, in publishing order."""
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
    return messages


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
