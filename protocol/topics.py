"""Every MQTT topic string vlmd uses, and nothing else does (DESIGN §4).

`Topics(root)` builds the device's topics, parses incoming ones into a `Route`,
lists what to subscribe to, and `SPEC` says which QoS and retain flag each kind of
message is published with. Home Assistant discovery topics and the fleet's shared
subscription filter are built here too, so no other module spells a topic.

Names are validated rather than escaped: a camera name, a request id or a root that
could change how a topic is split or matched (wildcards, '/', NUL) is refused with a
`TopicError`, so a parsed topic always maps back to exactly one route.

Knows nothing of paho: QoS values are plain ints, subscriptions plain tuples.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

# A camera name is one topic level of a safe charset, so `caption/<camera>/stream`
# can never be confused with `caption/<camera>`, and the name is also usable in file
# names, logs and Home Assistant object ids without escaping.
CAMERA_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_CAMERA_RE = re.compile(CAMERA_PATTERN)

REQUEST_ID_MAX_CHARS = 128
# Characters a broker may refuse in a topic: MQTT says topics SHOULD NOT hold control
# characters or Unicode non-characters, and mosquitto enforces it by disconnecting the
# publisher ("malformed packet"), so a reply topic holding one would cost the daemon
# its connection on every retry of the QoS 1 final. Lone surrogates cannot be encoded.
_MQTT_UNSAFE_CHARS = (
    "\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(1, 17))
)
_MQTT_UNSAFE_RE = re.compile(f"[{_MQTT_UNSAFE_CHARS}]")
# Forbidden in a request id: the MQTT level separator and wildcards, and the above.
_ID_FORBIDDEN_RE = re.compile(f"[/+#{_MQTT_UNSAFE_CHARS}]")
# The same rules as JSON Schema patterns, for the published schemas.
REQUEST_ID_PATTERN = r"^[^/+#\x00-\x1f\x7f-\x9f]{1,128}$"
PUBLISH_TOPIC_PATTERN = r"^[^$+#\x00][^+#\x00]*$"
MAX_TOPIC_BYTES = 65535  # MQTT's UTF-8 string length limit

DEFAULT_ROOT_PREFIX = "vlmd"
DEFAULT_FLEET_ASK_TOPIC = "vlmd/fleet/ask"
DEFAULT_HA_PREFIX = "homeassistant"

Kind = Literal[
    "status", "frame", "ask", "answer", "answer_chunk", "caption", "caption_stream",
    "cancel", "error", "stats", "fleet_ask", "caption_image", "watch", "watch_event",
    "watch_config", "dashboard_ask", "dashboard_answer",
]


class TopicError(ValueError):
    """A topic, topic level, camera name or request id that vlmd cannot use."""


@dataclass(frozen=True)
class TopicSpec:
    """How messages of one kind are published (or what QoS to subscribe with)."""

    qos: int
    retain: bool


# Publish/subscribe QoS and retain per kind. `answer_chunk` and `answer` share the
# topic <root>/answer/<id>: deltas are cheap to lose, the final message is not.
SPEC: dict[str, TopicSpec] = {
    "status": TopicSpec(qos=1, retain=True),
    "frame": TopicSpec(qos=0, retain=False),
    "ask": TopicSpec(qos=1, retain=False),
    "fleet_ask": TopicSpec(qos=1, retain=False),
    "answer_chunk": TopicSpec(qos=0, retain=False),
    "answer": TopicSpec(qos=1, retain=False),
    "caption": TopicSpec(qos=1, retain=True),
    "caption_stream": TopicSpec(qos=0, retain=False),
    "cancel": TopicSpec(qos=1, retain=False),
    "error": TopicSpec(qos=1, retain=False),
    "stats": TopicSpec(qos=0, retain=True),
    # the frame a caption describes, as JPEG (Home Assistant's image entity shows it)
    "caption_image": TopicSpec(qos=1, retain=True),
    "watch": TopicSpec(qos=1, retain=True),
    "watch_event": TopicSpec(qos=1, retain=False),
    "watch_config": TopicSpec(qos=1, retain=True),
    # plain-text questions from a dashboard's text entity, and their answers (a sensor's state)
    "dashboard_ask": TopicSpec(qos=1, retain=False),
    "dashboard_answer": TopicSpec(qos=1, retain=True),
}


@dataclass(frozen=True)
class Route:
    """What an incoming topic means: its kind and the camera or request id it names."""

    kind: str
    camera: str | None = None
    request_id: str | None = None
    name: str | None = None  # a watch's name


# --- validators -----------------------------------------------------------------


def is_valid_camera(name: object) -> bool:
    return isinstance(name, str) and _CAMERA_RE.fullmatch(name) is not None


def check_camera(name: str) -> str:
    """Return `name` if it is a valid camera name, else raise TopicError."""
    if not is_valid_camera(name):
        raise TopicError(
            f"invalid camera name {name!r}: 1-64 characters of A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return name


def is_valid_request_id(request_id: object) -> bool:
    return (
        isinstance(request_id, str)
        and 1 <= len(request_id) <= REQUEST_ID_MAX_CHARS
        and _ID_FORBIDDEN_RE.search(request_id) is None
    )


def check_request_id(request_id: str) -> str:
    """Return `request_id` if it can be one topic level, else raise TopicError."""
    if not is_valid_request_id(request_id):
        raise TopicError(
            f"invalid request id {request_id!r}: 1-{REQUEST_ID_MAX_CHARS} characters, "
            "no '/', '+', '#' or control characters"
        )
    return request_id


def check_publish_topic(topic: str) -> str:
    """Return `topic` if a client may publish to it (no wildcards, not `$`-reserved)."""
    problem = _publish_topic_problem(topic)
    if problem:
        raise TopicError(f"invalid topic {topic!r}: {problem}")
    return topic


def _publish_topic_problem(topic: object) -> str | None:
    if not isinstance(topic, str) or not topic:
        return "must be a non-empty string"
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return f"longer than {MAX_TOPIC_BYTES} bytes"
    if "+" in topic or "#" in topic:
        return "wildcards '+' and '#' are not allowed in a publish topic"
    if "\x00" in topic:
        return "contains NUL"
    unsafe = _MQTT_UNSAFE_RE.search(topic)
    if unsafe is not None:
        return f"contains {unsafe.group()!r} (control characters and Unicode non-characters are refused by brokers)"
    if topic.startswith("$"):
        return "topics starting with '$' are reserved for the broker"
    return None


def check_root(root: str) -> str:
    """A root is a publish topic without empty levels at either end."""
    check_publish_topic(root)
    if root.startswith("/") or root.endswith("/"):
        raise TopicError(f"invalid root {root!r}: must not start or end with '/'")
    return root


def check_topic_filter(topic_filter: str) -> str:
    """Return `topic_filter` if it is a valid MQTT subscription filter."""
    if not isinstance(topic_filter, str) or not topic_filter or "\x00" in topic_filter:
        raise TopicError(f"invalid topic filter {topic_filter!r}: must be non-empty, no NUL")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise TopicError(f"invalid topic filter {topic_filter!r}: '#' must be a whole last level")
        if "+" in level and level != "+":
            raise TopicError(f"invalid topic filter {topic_filter!r}: '+' must be a whole level")
    return topic_filter


def topic_safe(name: str, fallback: str = "vlmd") -> str:
    """Map any string (a host name, say) to a valid camera-charset name: for device ids."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-_.")[:64]
    return cleaned if cleaned else fallback


# --- the device's topics ---------------------------------------------------------


class Topics:
    """The topics of one device under `root` (by default `vlmd/<device_id>`).

    `frame_sources` maps extra source topics (exact topics, e.g. a Frigate snapshot
    topic) to the camera whose frames they carry. `fleet_ask_topic`, when given, is
    parsed as kind `fleet_ask`; subscribe to it with `fleet_subscription(group)`.
    """

    def __init__(
        self,
        root: str,
        frame_sources: Mapping[str, str] | None = None,
        fleet_ask_topic: str | None = None,
    ) -> None:
        self.root = check_root(root)
        self._prefix = root + "/"
        self.frame_sources: dict[str, str] = {}
        for topic, camera in (frame_sources or {}).items():
            self.frame_sources[self._foreign(topic, "frame source")] = check_camera(camera)
        self.fleet_ask_topic = self._foreign(fleet_ask_topic, "fleet ask") if fleet_ask_topic else None
        if self.fleet_ask_topic in self.frame_sources:
            raise TopicError(f"topic {fleet_ask_topic!r} is both a frame source and the fleet ask topic")

    def _foreign(self, topic: str, what: str) -> str:
        """An extra input topic must not shadow one of the root's own topics."""
        check_publish_topic(topic)
        if topic.startswith(self._prefix) and _parse_relative(topic[len(self._prefix):]) is not None:
            raise TopicError(f"{what} topic {topic!r} is one of vlmd's own topics under {self.root!r}")
        return topic

    @classmethod
    def for_device(cls, device_id: str, **kwargs) -> Topics:
        return cls(f"{DEFAULT_ROOT_PREFIX}/{check_camera(device_id)}", **kwargs)

    # builders
    def status(self) -> str:
        return self._prefix + "status"

    def frame(self, camera: str) -> str:
        return self._prefix + "frame/" + check_camera(camera)

    def ask(self) -> str:
        return self._prefix + "ask"

    def answer(self, request_id: str) -> str:
        return self._prefix + "answer/" + check_request_id(request_id)

    def caption(self, camera: str) -> str:
        return self._prefix + "caption/" + check_camera(camera)

    def caption_stream(self, camera: str) -> str:
        return self.caption(camera) + "/stream"

    def caption_image(self, camera: str) -> str:
        return self.caption(camera) + "/image"

    def watch(self, name: str) -> str:
        return self._prefix + "watch/" + check_camera(name)

    def watch_event(self, name: str) -> str:
        return self.watch(name) + "/event"

    def watch_config(self, name: str) -> str:
        return self._prefix + "watches/" + check_camera(name) + "/config"

    def dashboard_ask(self, camera: str) -> str:
        return self._prefix + "dashboard/" + check_camera(camera) + "/ask"

    def dashboard_answer(self, camera: str) -> str:
        return self._prefix + "dashboard/" + check_camera(camera) + "/answer"

    def cancel(self) -> str:
        return self._prefix + "cancel"

    def error(self) -> str:
        return self._prefix + "error"

    def stats(self) -> str:
        return self._prefix + "stats"

    # filters, for clients and tests
    def answer_filter(self) -> str:
        return self._prefix + "answer/+"

    def caption_filter(self) -> str:
        return self._prefix + "caption/+"

    def frame_filter(self) -> str:
        return self._prefix + "frame/+"

    def watch_config_filter(self) -> str:
        return self._prefix + "watches/+/config"

    def dashboard_ask_filter(self) -> str:
        return self._prefix + "dashboard/+/ask"

    def subscriptions(self) -> list[tuple[str, int]]:
        """What the daemon subscribes to on its own root: [(topic_filter, qos)].

        The fleet subscription is separate (`fleet_subscription`): it needs MQTT 5.
        """
        subs = [
            (self.frame_filter(), SPEC["frame"].qos),
            (self.ask(), SPEC["ask"].qos),
            (self.cancel(), SPEC["cancel"].qos),
            (self.watch_config_filter(), SPEC["watch_config"].qos),
            (self.dashboard_ask_filter(), SPEC["dashboard_ask"].qos),
        ]
        subs += [(topic, SPEC["frame"].qos) for topic in self.frame_sources]
        return subs

    def fleet_subscription(self, group: str) -> tuple[str, int]:
        """The MQTT 5 shared subscription `$share/<group>/<fleet ask topic>`."""
        if self.fleet_ask_topic is None:
            raise TopicError("no fleet ask topic configured")
        return shared_subscription(group, self.fleet_ask_topic), SPEC["fleet_ask"].qos

    def is_input(self, topic: str) -> bool:
        """True for a topic the daemon consumes. A request's reply topic must not be one:
        answers published to `<root>/cancel` would cancel requests, to `ask` would loop."""
        route = self.parse(topic)
        return route is not None and route.kind in _INPUT_KINDS

    def reply_problem(self, topic: object) -> str | None:
        """Why vlmd must not publish a client's replies on `topic`, or None when it may.

        The one check for every topic vlmd publishes to on a client's behalf (a
        `reply_to`, an MQTT 5 response topic): a valid publish topic that is not one of
        the daemon's own input topics (a final there would become a frame, a cancel or
        a question).
        """
        problem = _publish_topic_problem(topic)
        if problem is not None:
            return f"{_shown(topic)} {problem}"
        if self.is_input(topic):
            return f"{_shown(topic)} is one of vlmd's input topics (replies there would come back as input)"
        return None

    def parse(self, topic: str) -> Route | None:
        """Route an incoming topic, or None when it is not one of ours (or malformed)."""
        if topic in self.frame_sources:
            return Route("frame", camera=self.frame_sources[topic])
        if self.fleet_ask_topic is not None and topic == self.fleet_ask_topic:
            return Route("fleet_ask")
        if not topic.startswith(self._prefix):
            return None
        return _parse_relative(topic[len(self._prefix):])


_INPUT_KINDS = frozenset({"frame", "ask", "fleet_ask", "cancel", "watch_config", "dashboard_ask"})


def _shown(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, for error messages about client input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SINGLE_LEVEL_KINDS = frozenset({"status", "ask", "cancel", "error", "stats"})


def _parse_relative(rest: str) -> Route | None:
    """Parse what follows `<root>/`; each branch checks the exact shape it expects."""
    if rest in _SINGLE_LEVEL_KINDS:
        return Route(rest)
    head, _, tail = rest.partition("/")
    if head == "frame" and is_valid_camera(tail):
        return Route("frame", camera=tail)
    if head == "answer" and is_valid_request_id(tail):
        return Route("answer", request_id=tail)
    if head == "caption":
        camera, _, suffix = tail.partition("/")
        if not is_valid_camera(camera):
            return None
        if suffix == "" and "/" not in tail:
            return Route("caption", camera=camera)
        if suffix == "stream":
            return Route("caption_stream", camera=camera)
        if suffix == "image":
            return Route("caption_image", camera=camera)
        return None
    name, _, suffix = tail.partition("/")
    if not is_valid_camera(name):
        return None
    if head == "watch":
        return Route("watch", name=name) if "/" not in tail else Route("watch_event", name=name) if suffix == "event" \
            else None
    if head == "watches" and suffix == "config":
        return Route("watch_config", name=name)
    if head == "dashboard" and suffix in ("ask", "answer"):
        return Route("dashboard_" + suffix, camera=name)
    return None


def shared_subscription(group: str, topic_filter: str) -> str:
    """`$share/<group>/<filter>`: the broker hands each message to one group member."""
    if not group or any(c in group for c in "/+#\x00"):
        raise TopicError(f"invalid share group {group!r}: non-empty, no '/', '+', '#' or NUL")
    return f"$share/{group}/{check_topic_filter(topic_filter)}"


# --- Home Assistant MQTT discovery -----------------------------------------------

_HA_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
def ha_config_topic(prefix: str, component: str, node_id: str, object_id: str) -> str:
    """`<prefix>/<component>/<node_id>/<object_id>/config` (ids must already be HA-safe)."""
    check_publish_topic(prefix)
    for part in (component, node_id, object_id):
        if not _HA_ID_RE.fullmatch(part):
            raise TopicError(f"invalid Home Assistant id {part!r}: use ha_object_id()")
    return f"{prefix}/{component}/{node_id}/{object_id}/config"


def ha_birth_topic(prefix: str) -> str:
    """Home Assistant publishes `online` here when it starts: republish discovery then."""
    return f"{check_publish_topic(prefix)}/status"
