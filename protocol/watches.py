"""Watches on the wire: a standing typed question's definition, its retained state, its events.

A watch is defined by a `[[watches]]` entry of the config file or by a retained JSON
message on `<root>/watches/<name>/config` (an empty payload deletes it); both are a
`WatchDefinition`. Its value is retained on `<root>/watch/<name>` (`WatchState`) and
each change is announced on `<root>/watch/<name>/event` (`WatchEvent`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocol.codec import ProtocolError, describe_validation_error, parse_json_object
from protocol.formats import FormatError, parse_flat_format
from protocol.payloads import _Outbound
from protocol.topics import CAMERA_PATTERN, TopicError, check_camera

DEFAULT_MAX_WATCH_BYTES = 16_384
# Seconds after which a watch (and a caption) asks again although the frame looks unchanged:
# what the change test cannot see (a change below its threshold) is seen within this time.
DEFAULT_MAX_AGE_S = 600.0
MAX_WATCH_QUESTION_CHARS = 1000

WatchName = Annotated[str, Field(description="One topic level: 1-64 of A-Z a-z 0-9 _ . -",
                                  json_schema_extra={"pattern": f"^{CAMERA_PATTERN}$"})]


class WatchDefinition(BaseModel):
    """A standing typed question about a camera. Unknown fields are refused: a typo in a
    standing definition must not pass unnoticed."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    v: Literal[1] = Field(1, description="Protocol version; may be omitted.")
    name: WatchName | None = Field(None, description="On MQTT: the topic's name (optional; must match it).")
    camera: str = Field(description="The camera whose frames it watches.",
                        json_schema_extra={"pattern": f"^{CAMERA_PATTERN}$"})
    question: str = Field(min_length=1, max_length=MAX_WATCH_QUESTION_CHARS,
                          description="The question, e.g. 'Is there a parcel at the door?'")
    format: dict[str, Any] = Field(description="The answer's format, as in ask: boolean, number, enum or flat object.")
    interval_s: float = Field(10.0, gt=0, le=86400, allow_inf_nan=False,
                              description="Seconds between two answers at least; answered only on changed frames"
                                          " (and while debounce answers do not yet agree).")
    debounce: int = Field(2, ge=1, le=100, description="Agreeing answers in a row that change the state.")
    max_age_s: float = Field(DEFAULT_MAX_AGE_S, gt=0, le=7 * 86400, allow_inf_nan=False,
                             description="Seconds after which a new frame is answered even if it looks unchanged.")

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        try:
            return parse_flat_format(value)
        except FormatError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("name", "camera")
    @classmethod
    def _topic_level(cls, value: str | None) -> str | None:
        try:
            return None if value is None else check_camera(value)
        except TopicError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("question")
    @classmethod
    def _question(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class WatchState(_Outbound):
    """Retained on `<root>/watch/<name>`: the watch's current value."""

    name: str
    camera: str
    value: Any = Field(description="The current value (JSON); null until `debounce` answers first agree.")
    confidence: float | None = Field(None, ge=0.0, le=1.0, description="Of the latest answer.")
    since: float | None = Field(description="Unix seconds when the value became what it is (null: no value yet).")
    updated: float = Field(description="Unix seconds of the latest answer.")
    frame_ts: float = Field(description="Unix seconds when the latest answered frame was received.")


class WatchEvent(_Outbound):
    """On `<root>/watch/<name>/event` when the value changes."""

    name: str
    camera: str
    value: Any = Field(description="The new value.")
    previous: Any = Field(description="The value before.")
    confidence: float | None = Field(None, ge=0.0, le=1.0, description="Of the answer that settled it.")
    ts: float = Field(description="Unix seconds of the change.")
    frame_ts: float = Field(description="Unix seconds when the frame that settled it was received.")


def decode_watch(payload: bytes, name: str, max_bytes: int = DEFAULT_MAX_WATCH_BYTES) -> WatchDefinition:
    """A watch definition from `<root>/watches/<name>/config`. Raises ProtocolError (an
    empty payload is a deletion and never reaches here)."""
    if len(payload) > max_bytes:
        raise ProtocolError("payload_too_large", f"watch config is {len(payload)} bytes, the limit is {max_bytes}")
    obj = parse_json_object(payload)
    if "v" in obj and (type(obj["v"]) is not int or obj["v"] != 1):
        raise ProtocolError("unsupported_version", f"v: protocol version {obj['v']!r} is not supported (1 is)")
    try:
        definition = WatchDefinition.model_validate(obj)
    except ValidationError as exc:
        raise ProtocolError("bad_request", describe_validation_error(exc)) from None
    if definition.name is not None and definition.name != name:
        raise ProtocolError("bad_request", f"name: {definition.name!r} differs from the topic's watch name {name!r}")
    return definition.model_copy(update={"name": name})
