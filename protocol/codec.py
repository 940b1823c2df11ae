"""Bytes <-> payload models, with every failure turned into one `ProtocolError`.

Decoding runs in the MQTT network thread, so it is bounded before it starts: the
payload size is checked before anything is parsed, deep nesting is caught (the json
module recurses), and non-finite numbers are refused. Errors keep the request's id and
reply topic whenever they can be recovered, so a client waiting on its answer topic
gets a final `rejected` message instead of silence.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from protocol.payloads import AskLimits, AskRequest, CancelRequest
from protocol.topics import TopicError, check_publish_topic, is_valid_request_id

ModelT = TypeVar("ModelT", bound=BaseModel)

DEFAULT_MAX_CANCEL_BYTES = 4096
# How far into an oversized or broken payload we look for `"id": "..."`.
_ID_SCAN_BYTES = 4096
_ID_SCAN_RE = re.compile(r'"id"\s*:\s*"([^"\\]{1,128})"')


class ProtocolError(Exception):
    """A refused message: an error code from payloads.ERROR_CODES and a readable message.

    `request_id` and `reply_to` are set when the payload carried valid ones, so the
    refusal can be answered on the request's own reply topic. `reply_to_given` says the
    payload named a reply topic at all (valid or not): then no other reply path may be
    used instead of it (see protocol.requests.reply_path).
    """

    def __init__(self, code: str, message: str, request_id: str | None = None, reply_to: str | None = None,
                 reply_to_given: bool = False):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.reply_to = reply_to
        self.reply_to_given = reply_to_given or reply_to is not None


def encode(model: BaseModel) -> bytes:
    """Compact UTF-8 JSON (non-ASCII text kept as is, not \\u-escaped)."""
    return model.model_dump_json().encode("utf-8")


def decode_ask(payload: bytes, max_bytes: int, limits: AskLimits | None = None) -> AskRequest:
    """Parse and validate a question. Raises ProtocolError; never anything else."""
    return _decode_request(AskRequest, payload, max_bytes, limits or AskLimits())


def decode_cancel(payload: bytes, max_bytes: int = DEFAULT_MAX_CANCEL_BYTES) -> CancelRequest:
    """Parse and validate a cancel message. Raises ProtocolError; never anything else.

    The error never carries a request id or reply topic: the id in a cancel names
    another request, whose one final must not be preempted by the cancel's refusal.
    """
    try:
        return _decode_request(CancelRequest, payload, max_bytes, AskLimits())
    except ProtocolError as exc:
        exc.request_id = exc.reply_to = None
        exc.reply_to_given = False
        raise


def decode_message(model_cls: type[ModelT], payload: bytes | str) -> ModelT:
    """Parse one of vlmd's outbound messages (for clients and tests). Raises ProtocolError."""
    obj = parse_json_object(payload.encode("utf-8") if isinstance(payload, str) else payload)
    try:
        return model_cls.model_validate(obj)
    except ValidationError as exc:
        raise ProtocolError("bad_request", describe_validation_error(exc)) from None


def _decode_request(model_cls: type[ModelT], payload: bytes, max_bytes: int, limits: AskLimits) -> ModelT:
    if len(payload) > max_bytes:
        raise ProtocolError(
            "payload_too_large",
            f"payload is {len(payload)} bytes, the limit is {max_bytes}",
            request_id=_scan_request_id(payload),
        )
    try:
        obj = parse_json_object(payload)
    except ProtocolError as exc:
        exc.request_id, exc.reply_to, exc.reply_to_given = _recover_reply_path(payload)
        raise
    return _validate(model_cls, obj, limits)


def validate_ask(obj: dict[str, Any], limits: AskLimits | None = None) -> AskRequest:
    """Check an already parsed question by the wire's rules (ranges, limits, messages).

    For entry points that take a question without MQTT (`vlmd ask`), so both refuse the
    same values with the same words. Raises ProtocolError; never anything else.
    """
    return _validate(AskRequest, obj, limits or AskLimits())


def _validate(model_cls: type[ModelT], obj: dict[str, Any], limits: AskLimits) -> ModelT:
    request_id, reply_to = _reply_path(obj)
    given = obj.get("reply_to") is not None
    try:
        _check_version(obj, request_id, reply_to)
        return model_cls.model_validate(obj, context={"limits": limits})
    except ValidationError as exc:
        raise ProtocolError("bad_request", describe_validation_error(exc), request_id, reply_to, given) from None
    except ProtocolError as exc:
        exc.reply_to_given = given
        raise


def parse_json_object(payload: bytes) -> dict[str, Any]:
    """UTF-8 JSON text whose top level is an object, else ProtocolError("bad_json")."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("bad_json", f"payload is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ProtocolError("bad_json", "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, huge integers, NaN/Infinity
        raise ProtocolError("bad_json", f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", f"payload must be a JSON object, got {type(obj).__name__}")
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _reply_path(obj: dict[str, Any]) -> tuple[str | None, str | None]:
    """The id and reply_to of a parsed object, each only if it is valid on its own."""
    request_id = obj.get("id")
    request_id = request_id if is_valid_request_id(request_id) else None
    try:
        reply_to = check_publish_topic(obj.get("reply_to"))
    except TopicError:
        reply_to = None
    return request_id, reply_to


def _check_version(obj: dict[str, Any], request_id: str | None, reply_to: str | None) -> None:
    if "v" not in obj:
        return  # a missing version means version 1
    version = obj["v"]
    if type(version) is int and version == 1:
        return
    if type(version) is int:
        raise ProtocolError(
            "unsupported_version", f"protocol version {version} is not supported (this daemon speaks 1)",
            request_id, reply_to,
        )
    raise ProtocolError("bad_request", f"v: must be the integer 1, got {version!r}", request_id, reply_to)


def _recover_reply_path(payload: bytes) -> tuple[str | None, str | None, bool]:
    """The top-level id and reply_to of a payload that is JSON once its invalid UTF-8
    bytes are replaced (a value holding a replaced byte is not used: it is not what the
    client sent); for anything else the best-effort scan."""
    try:
        obj = json.loads(payload.decode("utf-8", errors="replace"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return _scan_request_id(payload), None, False
    if not isinstance(obj, dict):
        return None, None, False
    request_id, reply_to = _reply_path(obj)
    if request_id is not None and "\ufffd" in request_id:
        request_id = None
    if reply_to is not None and "\ufffd" in reply_to:
        reply_to = None
    return request_id, reply_to, obj.get("reply_to") is not None


def _scan_request_id(payload: bytes) -> str | None:
    """Best effort: an `"id": "..."` near the start of a payload we could not parse."""
    head = payload[:_ID_SCAN_BYTES].decode("utf-8", errors="ignore")
    match = _ID_SCAN_RE.search(head)
    if match and is_valid_request_id(match.group(1)):
        return match.group(1)
    return None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming its field: `text: String should have ...` (checks
    across fields have no location; their messages start with the field they blame)."""
    parts = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)


def decode_text_question(payload: bytes, max_chars: int) -> str:
    """A plain-text question (a dashboard's text entity on `<root>/dashboard/<camera>/ask`):
    UTF-8, not blank, at most `max_chars`. Raises ProtocolError."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("bad_request", f"the question is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise ProtocolError("bad_request", "the question is empty")
    if len(text) > max_chars:
        raise ProtocolError("bad_request", f"the question is longer than {max_chars} characters ({len(text)})")
    return text.strip()
