"""Pydantic models of every JSON payload on the wire, each with `"v": 1` (DESIGN §4).

Inbound requests (`AskRequest`, `CancelRequest`) are validated strictly (no "5" for 5,
no 1 for true) and ignore unknown fields, so older daemons accept newer clients.
Outbound messages forbid unknown fields so a typo in the daemon fails a test, except
`Stats`, which is open for the daemon to add counters.

Limits that depend on configuration (text length, frames per question, max tokens)
are read from the validation context: `AskRequest.model_validate(obj,
context={"limits": AskLimits(...)})`; without a context the defaults apply.

The status topic carries plain strings, not JSON: `STATUS_ONLINE` and friends.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer, model_validator

from protocol.formats import FormatError, parse_format
from protocol.topics import (
    CAMERA_PATTERN,
    PUBLISH_TOPIC_PATTERN,
    REQUEST_ID_MAX_CHARS,
    REQUEST_ID_PATTERN,
    TopicError,
    check_camera,
    check_publish_topic,
    check_request_id,
)

PROTOCOL_VERSION = 1

STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"  # the last will: the daemon vanished
STATUS_STOPPED = "stopped"  # a clean exit

ErrorCode = Literal[
    "bad_json", "bad_request", "unsupported_version", "payload_too_large", "bad_image",
    "image_too_large", "unknown_camera", "no_frame", "busy", "too_long", "expired",
    "cancelled", "engine_error", "numeric_error", "shutdown", "restarted", "limit",
    "duplicate_id", "conversation_not_yours",
]
ERROR_CODES: tuple[str, ...] = get_args(ErrorCode)

# When each code happens (docs/protocol.md lists the same; a test keeps them in step).
ERROR_DESCRIPTIONS: dict[str, str] = {
    "bad_json": "the payload is not UTF-8 JSON, not a JSON object, or nested too deeply",
    "bad_request": "a field is missing, has the wrong type or is out of range (the message names it)",
    "unsupported_version": "`v` is present and is not 1",
    "payload_too_large": "the payload is larger than the configured maximum, checked before parsing",
    "bad_image": "the image is not a decodable JPEG, PNG or WebP, or image_b64 is not valid base64",
    "image_too_large": "the image has more bytes or pixels than configured (decompression bombs)",
    "unknown_camera": "the camera is not configured and has never sent a frame",
    "no_frame": "the camera has fewer frames than asked for (or none yet)",
    "busy": "the request queue is full",
    "too_long": "the prompt (text, system prompt and image tokens) does not fit the KV cache",
    "expired": "expires_ms passed before the answer was finished (queued or running)",
    "cancelled": "a cancel message named the request",
    "engine_error": "the NPU runtime failed while answering",
    "numeric_error": "the model produced NaN or infinite logits (a numeric overflow in the graphs)",
    "shutdown": "the daemon stopped before answering",
    "restarted": "the daemon restarted (after a crash) and could not answer again: the request expired meanwhile,"
                 " its camera frames were lost, or its conversation was",
    "limit": "a configured limit on conversations, turns or watches was reached (the message names it)",
    "duplicate_id": "a request with this id and reply path is queued or running and this one asks something else"
                    " (on <root>/error: the queued request keeps its reply path)",
    "conversation_not_yours": "the conversation was opened by another client (another reply path): a turn or reset"
                              " must come from the reply path that opened it",
}

FinishReason = Literal["stop", "length", "cancelled", "expired", "rejected", "failed", "shutdown"]
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)

DEFAULT_MAX_TEXT_CHARS = 4000
CONVERSATION_ID_MAX_CHARS = 64
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.001, 100.0  # or exactly 0 (greedy)
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


@dataclass(frozen=True)
class AskLimits:
    """Configured bounds an `AskRequest` is checked against (None: no bound)."""

    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    max_frames: int | None = None
    max_tokens: int | None = None


def new_request_id() -> str:
    """An id for a request that came without one: short, unique, topic-safe."""
    return uuid.uuid4().hex[:16]


def _limits(info: ValidationInfo) -> AskLimits:
    context = info.context or {}
    return context.get("limits") or AskLimits()


class _Inbound(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    v: Literal[1] = Field(1, description="Protocol version; may be omitted; anything but 1 is refused.")

    @field_validator("v", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        # JSON true == 1 in Python; a boolean version is a client bug, not version 1.
        if isinstance(value, bool):
            raise ValueError("must be the integer 1")
        return value


class _Outbound(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = Field(1, description="Protocol version.")


# Patterns are documented in the schema but checked by the validators below, whose
# messages say what is wrong in words.
RequestId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=REQUEST_ID_MAX_CHARS,
        description="Request id: one topic level.",
        json_schema_extra={"pattern": REQUEST_ID_PATTERN},
    ),
]


class AskRequest(_Inbound):
    """A question on `<root>/ask`. At most one image source: camera, camera+frames or image_b64."""

    id: RequestId | None = Field(None, description="Echoed in every reply; generated when absent.")
    text: str | None = Field(None, min_length=1, description="The question; at most max_text_chars (default 4000)."
                             " Required, except in a conversation reset.")
    camera: str | None = Field(
        None,
        description="Use this camera's newest frame (or last `frames`).",
        json_schema_extra={"pattern": f"^{CAMERA_PATTERN}$"},
    )
    image_b64: str | None = Field(
        None, min_length=1, description="Inline JPEG/PNG, base64 (a data: URL prefix is accepted)."
    )
    frames: int | None = Field(None, ge=1, description="With camera: use its last N frames, oldest first.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate; None: daemon default.")
    # Bounded so the sampler's float32 arithmetic stays finite: a penalty of 1e-300 would
    # overflow the logits and fail the request as if the NPU had (counting towards exit 1).
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 = all.")
    repetition_penalty: float = Field(
        1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, allow_inf_nan=False, description="1 = none."
    )
    seed: int | None = Field(None, ge=0, lt=2**64, description="Sampling seed, for reproducible answers.")
    stream: bool = Field(True, description="Publish chunks before the final message.")
    reply_to: str | None = Field(
        None,
        description="Publish replies here instead of <root>/answer/<id>.",
        json_schema_extra={"pattern": PUBLISH_TOPIC_PATTERN},
    )
    expires_ms: int | None = Field(None, gt=0, description="Deadline in ms after receipt; then the request ends `expired`.")
    system: str | None = Field(None, min_length=1, description="Replace the model's system prompt.")
    conversation: str | None = Field(
        None, min_length=1, max_length=CONVERSATION_ID_MAX_CHARS,
        description="A client-chosen id: earlier turns of this conversation stay in context.")
    reset: bool = Field(False, description="With conversation: forget it first (without text: only that).")
    format: dict[str, Any] | None = Field(
        None, description="Typed answer: a JSON Schema (boolean, bounded integer/number, enum of strings and a"
        " flat object of those keep their own spelling; any other schema is answered as JSON); the answer is"
        " decoded to fit it and the final adds value and confidence.")

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse_format(value)
        except FormatError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("conversation")
    @classmethod
    def _conversation_id(cls, value: str | None) -> str | None:
        if value is not None and (not value.isprintable() or not value.strip()):
            raise ValueError("must be a short printable string (no control characters, not blank)")
        return value

    @field_validator("id")
    @classmethod
    def _id_topic_safe(cls, value: str | None) -> str | None:
        return None if value is None else _topic_check(check_request_id, value)

    @field_validator("camera")
    @classmethod
    def _camera_name(cls, value: str | None) -> str | None:
        return None if value is None else _topic_check(check_camera, value)

    @field_validator("reply_to")
    @classmethod
    def _reply_topic(cls, value: str | None) -> str | None:
        return None if value is None else _topic_check(check_publish_topic, value)

    @field_validator("text", "system")
    @classmethod
    def _text_length(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must not be blank")
        limit = _limits(info).max_text_chars
        if len(value) > limit:
            raise ValueError(f"longer than {limit} characters ({len(value)})")
        return value

    @field_validator("frames")
    @classmethod
    def _frames_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_frames
        if value is not None and limit is not None and value > limit:
            raise ValueError(f"at most {limit} frames per question (asked for {value})")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature_range(cls, value: float) -> float:
        # 1e-300 is not "almost greedy" to float arithmetic: the logits overflow
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_tokens
        if value is not None and limit is not None and value > limit:
            raise ValueError(f"at most {limit} (asked for {value})")
        return value

    @model_validator(mode="after")
    def _one_image_source(self) -> AskRequest:
        if self.camera is not None and self.image_b64 is not None:
            raise ValueError("image_b64: give either camera or image_b64, not both")
        if self.frames is not None and self.camera is None:
            raise ValueError("frames: needs camera")
        if self.reset and self.conversation is None:
            raise ValueError("reset: needs conversation")
        if self.text is None and not self.reset:
            raise ValueError("text: required (only a conversation reset comes without one)")
        if self.text is None:
            asked = [name for name in ("camera", "image_b64", "format", "system") if getattr(self, name) is not None]
            if asked:
                raise ValueError(f"{asked[0]}: a reset without text asks nothing; send text too, or leave {asked[0]} out")
        return self

    @property
    def is_reset_only(self) -> bool:
        return self.reset and self.text is None

    def with_id(self, request_id: str) -> AskRequest:
        """A copy carrying `request_id` (the daemon's generated id when the client sent none)."""
        return self.model_copy(update={"id": check_request_id(request_id)})


def _topic_check(check, value: str) -> str:
    # Pydantic reports ValueError (not TopicError's subclass identity) with the field name.
    try:
        return check(value)
    except TopicError as exc:
        raise ValueError(str(exc)) from None


class CancelRequest(_Inbound):
    """On `<root>/cancel`: stop a queued or running request (its final says `cancelled`)."""

    id: RequestId = Field(description="The request to cancel.")
    reply_to: str | None = Field(None, description="The reply path the request named (its reply_to, or on MQTT 5 its"
                                 " response topic): a cancel stops only a request whose reply path it names;"
                                 " without one, only requests answered on <root>/answer/<id>.")

    @field_validator("id")
    @classmethod
    def _id_topic_safe(cls, value: str) -> str:
        return _topic_check(check_request_id, value)


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = Field(0, ge=0, description="Every prompt token, image tokens included.")
    completion_tokens: int = Field(0, ge=0, description="Generated tokens.")


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: ErrorCode
    message: str


# Free-form figures from the engine; None (JSON null) means "not measured", e.g. the
# ttft_ms of a request cancelled before its first token.
Timings = dict[str, float | int | bool | None]


class AnswerChunk(_Outbound):
    """A streamed piece of an answer on the reply topic (QoS 0: may be lost)."""

    id: str
    seq: int = Field(ge=0, description="0, 1, 2, ... per request; the final has the next seq.")
    delta: str = Field(description="New text; concatenated deltas equal the final text.")


class AnswerFinal(_Outbound):
    """The one final message every request gets, whatever happened."""

    id: str
    seq: int = Field(ge=0)
    done: Literal[True] = True
    text: str = Field("", description="The whole answer (partial when cancelled or failed).")
    finish_reason: FinishReason
    error: ErrorInfo | None = Field(None, description="Set when finish_reason is not stop/length.")
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=dict, description="ms figures, tokens/s, prefix reuse.")
    # Present only when they apply (left out of the JSON when None).
    value: Any = Field(None, description="With format: the answer as JSON (boolean, number, string or object).")
    confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="With format: probability of the value among the allowed answers.")
    conversation: str | None = Field(None, description="With conversation: its id, echoed.")
    turn: int | None = Field(None, ge=0, description="With conversation: this turn's number (1, 2, ...; 0 for a reset).")
    dropped_turns: int | None = Field(None, ge=0, description="Oldest turns dropped so that this one fits.")
    notes: list[str] | None = Field(None, description="Explanations: dropped turns, a format decoded without scores.")

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler: Any):  # no return annotation: the schema stays the model's
        data = handler(self)
        for name in _FINAL_OPTIONAL:
            if data.get(name) is None:
                data.pop(name, None)
        return data


_FINAL_OPTIONAL = ("value", "confidence", "conversation", "turn", "dropped_turns", "notes")


class Caption(_Outbound):
    """The latest caption of a camera, retained on `<root>/caption/<camera>`."""

    camera: str
    caption_id: str = Field(description="Matches the chunks on caption/<camera>/stream.")
    text: str
    ts: float = Field(description="Unix seconds when the caption was finished.")
    frame_ts: float = Field(description="Unix seconds when the captioned frame was received.")
    finish_reason: FinishReason
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=dict)


class CaptionChunk(_Outbound):
    """A streamed piece of a caption on `<root>/caption/<camera>/stream`."""

    camera: str
    caption_id: str
    seq: int = Field(ge=0)
    delta: str


class ErrorMessage(_Outbound):
    """On `<root>/error`: a message that was refused and carried no usable reply path."""

    code: ErrorCode
    message: str
    topic: str = Field(description="The topic the refused message arrived on.")
    request_id: str | None = None
    ts: float = Field(description="Unix seconds.")


class FrameCounts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    received: int = Field(0, ge=0)
    dropped: int = Field(0, ge=0, description="Replaced by a newer frame before any job used them.")


class Stats(_Outbound):
    """Retained on `<root>/stats` every stats interval. Open to extra counters."""

    model_config = ConfigDict(extra="allow")

    ts: float
    uptime_s: float = Field(ge=0)
    queue_depth: int = Field(ge=0)
    frames: dict[str, FrameCounts] = Field(default_factory=dict, description="Per camera.")
    requests: dict[str, int] = Field(default_factory=dict, description="Finished requests by finish_reason.")
    last_ttft_ms: float | None = None
    last_decode_tokens_per_s: float | None = None
    rss_bytes: int | None = None
    model: dict[str, str | int | None] | None = Field(
        None, description="The loaded model, as logged at start: path, layout, backend, provider, precision,"
        " template, kv_capacity, prefill_chunk, image_tokens, data_path, data_path_reason.")

