"""The OpenAI chat API as vlmd speaks it: request and response models, errors in OpenAI's shape,
and the translation of a request into what the service runs (DESIGN §4, "The HTTP interface").

`parse_chat(body, limits, model_id, ...)` validates a `POST /v1/chat/completions` body once
and returns a `ChatAsk`: the options as an `AskRequest` checked by the MQTT ask's own rules
and words (protocol.codec.validate_ask: max tokens, temperature range, text length, format),
the messages as `(role, parts)` with each image part's bytes (or an allowed URL to fetch),
and the stop strings. Anything refused raises `OpenAIError(status, message, param, code)`,
whose `body()` is OpenAI's `{"error": {"message", "type", "param", "code"}}`.

What is refused, naming the field: `n` > 1, `tools` / `functions` / tool messages,
`logprobs` / `top_logprobs`, `audio` (and audio modalities or parts), images outside user
messages, http(s) image URLs whose host is not allow-listed (no server-side fetch by
default), data URIs that are not base64 JPEG/PNG/WebP, a last message that is not the
user's. Unknown fields are ignored, as OpenAI's own server does. Fields the answer does not
depend on (`user`, `presence_penalty`, ...) are accepted and ignored.

Knows nothing of HTTP servers, MQTT or the engine.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol import codec
from protocol.codec import ProtocolError
from protocol.payloads import AskLimits, AskRequest

_DATA_URI_RE = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*?);base64,", re.IGNORECASE)
IMAGE_TYPES = ("image/jpeg", "image/jpg", "image/png", "image/webp")
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class OpenAIError(Exception):
    """A request refused or failed, in OpenAI's error shape; `status` is the HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# -- request models ----------------------------------------------------------------------


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ImageUrl(_In):
    url: str
    detail: str | None = None  # "low" / "high" / "auto": one image is one tile here whatever it says


class TextPart(_In):
    type: Literal["text"]
    text: str


class ImagePart(_In):
    type: Literal["image_url"]
    image_url: ImageUrl


class OtherPart(_In):
    type: str  # input_audio, file, ...: refused, naming the part


Part = Annotated[Union[TextPart, ImagePart, OtherPart], Field(union_mode="left_to_right")]


class Message(_In):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Part] | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None


class JsonSchemaFormat(_In):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_In):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_In):
    include_usage: bool = False


class ChatCompletionRequest(_In):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    audio: Any = None
    modalities: list[str] | None = None


# -- what the service runs -----------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """An image part: its bytes (a data URI), or an allow-listed URL still to be fetched."""

    data: bytes | None = None
    url: str | None = None
    param: str = ""  # where it was, for errors


@dataclass(frozen=True)
class ChatAsk:
    """A validated chat request: options by the ask's rules, messages with their images."""

    ask: AskRequest  # id, text (the last user message's), options, format, stream
    messages: tuple[tuple[str, tuple[str | ImageRef, ...]], ...]  # (role, parts); roles system/user/assistant
    stop: tuple[str, ...]
    include_usage: bool


def parse_chat(body: bytes, limits: AskLimits, model_id: str, request_id: str, allowed_hosts: frozenset[str],
               max_image_bytes: int) -> ChatAsk:
    """Validate a chat completion request body; OpenAIError naming the field when refused."""
    try:
        obj = codec.parse_json_object(body)
    except ProtocolError as exc:
        raise OpenAIError(400, exc.message, None, "invalid_json") from None
    try:
        request = ChatCompletionRequest.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = _param(first["loc"])
        raise OpenAIError(400, codec.describe_validation_error(exc), param, "invalid_value") from None
    if request.model != model_id:
        raise OpenAIError(404, f"the model {request.model!r} does not exist; this server has {model_id!r}"
                          " (GET /v1/models)", "model", "model_not_found")
    _refuse_unsupported(request)
    messages = tuple(_message(k, m, allowed_hosts, max_image_bytes, limits) for k, m in enumerate(request.messages))
    if messages[-1][0] != "user":
        raise OpenAIError(400, "messages: the last message must be the user's (the one to answer)", "messages")
    question = "\n".join(p for p in messages[-1][1] if isinstance(p, str))
    fields: dict[str, Any] = {"id": request_id, "text": question, "stream": bool(request.stream)}
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    names = {"max_tokens": "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"}
    for name, value in (("max_tokens", max_tokens), ("temperature", request.temperature),
                        ("top_p", request.top_p), ("seed", request.seed), ("format", _format(request))):
        if value is not None:
            fields[name] = float(value) if name in ("temperature", "top_p") else value
    system = "\n".join(p for role, parts in messages if role == "system" for p in parts if isinstance(p, str))
    if system:
        fields["system"] = system
    try:
        ask = codec.validate_ask(fields, limits)
    except ProtocolError as exc:
        field = exc.message.split(":", 1)[0]
        param = {"text": "messages", "system": "messages", "format": "response_format"}.get(field, names.get(field, field))
        message = param + exc.message[len(field):] if field in names or field == "format" else exc.message
        raise OpenAIError(400, message, param, "invalid_value") from None  # the ask's words, the client's field name
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    include_usage = request.stream_options is not None and request.stream_options.include_usage
    return ChatAsk(ask, messages, stop, include_usage)


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    if request.n is not None and request.n != 1:
        raise OpenAIError(400, f"n: only one choice per request is generated (n = 1), got {request.n}", "n")
    for name in ("tools", "functions"):
        if getattr(request, name):
            raise OpenAIError(400, f"{name}: tool and function calling is not supported", name)
    for name in ("tool_choice", "function_call"):
        if getattr(request, name) not in (None, "none"):
            raise OpenAIError(400, f"{name}: tool and function calling is not supported", name)
    if request.logprobs or request.top_logprobs:
        name = "logprobs" if request.logprobs else "top_logprobs"
        raise OpenAIError(400, f"{name}: log probabilities are not returned", name)
    if request.audio is not None or "audio" in (request.modalities or ()):
        name = "audio" if request.audio is not None else "modalities"
        raise OpenAIError(400, f"{name}: audio output is not supported (text only)", name)


def _message(k: int, message: Message, allowed_hosts: frozenset[str], max_image_bytes: int,
             limits: AskLimits) -> tuple[str, tuple[str | ImageRef, ...]]:
    where = f"messages[{k}]"
    if message.role in ("tool", "function") or message.tool_calls or message.function_call:
        raise OpenAIError(400, f"{where}: tool and function messages are not supported", where)
    role = "system" if message.role == "developer" else message.role
    content = message.content
    if content is None:
        raise OpenAIError(400, f"{where}.content: required", f"{where}.content")
    if isinstance(content, str):
        content = [TextPart(type="text", text=content)]
    parts: list[str | ImageRef] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if isinstance(part, TextPart):
            if len(part.text) > limits.max_text_chars:
                raise OpenAIError(400, f"{at}.text: longer than {limits.max_text_chars} characters ({len(part.text)})",
                                  f"{at}.text")
            parts.append(part.text)
        elif isinstance(part, ImagePart):
            if role != "user":
                raise OpenAIError(400, f"{at}: images go in user messages only", at)
            parts.append(image_ref(part.image_url.url, f"{at}.image_url.url", allowed_hosts, max_image_bytes))
        else:
            raise OpenAIError(400, f"{at}: content parts of type {part.type!r} are not supported (text and image_url"
                              " only)", f"{at}.type")
    return role, tuple(parts)


def image_ref(url: str, param: str, allowed_hosts: frozenset[str], max_bytes: int) -> ImageRef:
    """A data URI's bytes, or an allow-listed http(s) URL; OpenAIError for anything else."""
    if url[:5].lower() == "data:":
        match = _DATA_URI_RE.match(url[:256])
        if match is None:
            raise OpenAIError(400, f"{param}: a data URI must be base64 (data:image/jpeg;base64,...)", param)
        media_type = match.group("type").lower()
        if media_type not in IMAGE_TYPES:
            raise OpenAIError(400, f"{param}: {media_type or 'no media type'} is not an image vlmd reads (JPEG, PNG"
                              " or WebP)", param)
        encoded = url[match.end():]
        if len(encoded) // 4 * 3 > max_bytes:
            raise OpenAIError(400, f"{param}: the image is more than {max_bytes} bytes", param, "image_too_large")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise OpenAIError(400, f"{param}: the data URI is not valid base64", param, "bad_image") from None
        if not data:
            raise OpenAIError(400, f"{param}: the data URI holds no image", param, "bad_image")
        return ImageRef(data=data, param=param)
    parsed = urlsplit(url)
    if parsed.scheme in ("http", "https"):
        if (parsed.hostname or "") in allowed_hosts:
            return ImageRef(url=url, param=param)
        raise OpenAIError(400, f"{param}: vlmd does not fetch image URLs ({parsed.hostname!r} is not in [http]"
                          " image_url_hosts): send the image as a data URI (data:image/jpeg;base64,...)", param)
    raise OpenAIError(400, f"{param}: an image must be a data URI (data:image/jpeg;base64,...)", param)


def _format(request: ChatCompletionRequest) -> dict[str, Any] | None:
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise OpenAIError(400, "response_format.json_schema.schema: required for type json_schema",
                          "response_format.json_schema.schema")
    return response_format.json_schema.schema_


def _param(location: tuple) -> str | None:
    parts = [f"[{part}]" if isinstance(part, int) else f".{part}" for part in location
             if not (isinstance(part, str) and part[:1].isupper() or "[" in str(part))]
    text = "".join(parts).lstrip(".")
    return text or None


# -- responses ------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion(completion_id: str, created: int, model: str, text: str, finish_reason: str,
               usage_fields: dict[str, Any]) -> dict[str, Any]:
    """A whole (non-streamed) chat completion."""
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage_fields}


def chunk(completion_id: str, created: int, model: str, delta: dict[str, Any] | None,
          finish_reason: str | None = None, usage_fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed chunk; `delta` None gives the usage-only chunk (no choices)."""
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                                  "finish_reason": finish_reason}]}
    if usage_fields is not None:
        body["usage"] = usage_fields
    return body


def sse(body: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` for the end)."""
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode("utf-8")


def models_list(model_id: str, created: int, max_model_len: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "vlmd",
                                        "max_model_len": max_model_len}]}
