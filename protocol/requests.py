"""A received request, validated once, with its reply path resolved once (DESIGN §4).

`receive_ask(payload, topics, max_bytes, limits, response_topic, correlation_data)`
returns either `Accepted(request, reply)`, a validated `AskRequest` (its `id` filled in
when the client sent none) and the `Reply` it is answered on, or `Refused(code, message,
request_id, reply)`, where `reply` None means `<root>/error`. The daemon receives,
journals and enqueues; it never decodes, checks or builds a reply topic itself.

The reply path is the first the request names of: the payload's `reply_to`, the MQTT 5
response topic, else `<root>/answer/<id>`; the chosen one is checked once with
`Topics.reply_problem`, for accepted requests and refusals alike, so no reply can land
on one of the daemon's own input topics. A request whose chosen path cannot be used is
refused on `<root>/error` (never on another path the client did not name).

Knows nothing of paho: the MQTT 5 properties arrive as plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from protocol import codec
from protocol.codec import ProtocolError
from protocol.payloads import AskLimits, AskRequest, CancelRequest, new_request_id
from protocol.topics import Topics


@dataclass(frozen=True)
class Reply:
    """Where a request's chunks and final go."""

    topic: str
    correlation_data: bytes | None = None  # MQTT 5 only; echoed on every reply
    stream: bool = True  # False: the final only
    retain: bool = False  # the final retained (a dashboard's answer sensor)


@dataclass(frozen=True)
class ReplyPath:
    """The topic a request's replies go to, or why the client's choice cannot be used.

    `topic` None means: publish on `<root>/error`. `problem` is set when the client
    named a reply topic vlmd must not publish to.
    """

    topic: str | None
    problem: str | None = None


@dataclass(frozen=True)
class Accepted:
    request: AskRequest  # `id` always set
    reply: Reply


@dataclass(frozen=True)
class Refused:
    code: str  # one of payloads.ERROR_CODES
    message: str
    request_id: str | None
    reply: Reply | None  # None: an ErrorMessage on <root>/error


def receive_ask(payload: bytes, topics: Topics, max_bytes: int, limits: AskLimits | None = None,
                response_topic: str | None = None, correlation_data: bytes | None = None,
                new_id: Callable[[], str] = new_request_id) -> Accepted | Refused:
    """One question from `<root>/ask` (or the fleet topic): accepted or refused, never raises."""
    try:
        request = codec.decode_ask(payload, max_bytes, limits)
    except ProtocolError as exc:
        path = refusal_path(topics, exc.request_id, exc.reply_to, exc.reply_to_given, response_topic)
        return _refused(exc.code, exc.message, exc.request_id, path, correlation_data)
    if request.id is None:
        request = request.with_id(new_id())
    path = reply_path(topics, request.id, request.reply_to, response_topic)
    if path.topic is None:
        return _refused("bad_request", path.problem, request.id, path, correlation_data)
    return Accepted(request, Reply(path.topic, correlation_data, request.stream))


def receive_cancel(payload: bytes, max_bytes: int = codec.DEFAULT_MAX_CANCEL_BYTES) -> CancelRequest | Refused:
    """One cancel: the request, or a refusal for `<root>/error` (never on the named
    request's own reply path: that request's one final must not be preempted)."""
    try:
        return codec.decode_cancel(payload, max_bytes)
    except ProtocolError as exc:
        return Refused(exc.code, exc.message, None, None)


def reply_path(topics: Topics, request_id: str | None, reply_to: object = None,
               response_topic: object = None) -> ReplyPath:
    """The first of `reply_to`, `response_topic`, `<root>/answer/<request_id>` that is
    given (not None), checked once; a missing id without either gives `<root>/error`."""
    for name, topic in (("reply_to", reply_to), ("response topic", response_topic)):
        if topic is not None:
            problem = topics.reply_problem(topic)
            return ReplyPath(None, f"{name}: {problem}") if problem else ReplyPath(topic)
    return ReplyPath(topics.answer(request_id) if request_id is not None else None)


def refusal_path(topics: Topics, request_id: str | None, reply_to: str | None, reply_to_given: bool,
                 response_topic: object = None) -> ReplyPath:
    """Where a refused request's final goes (`reply_to`: the valid one the payload held,
    `reply_to_given`: it named one at all). An invalid `reply_to` is the client's chosen
    path too: the refusal then goes to `<root>/error`, not to a path it did not name."""
    if reply_to_given and reply_to is None:
        return ReplyPath(None, "reply_to: not a topic vlmd can publish to")
    return reply_path(topics, request_id, reply_to, response_topic)


def _refused(code: str, message: str, request_id: str | None, path: ReplyPath,
             correlation_data: bytes | None) -> Refused:
    reply = None if path.topic is None else Reply(path.topic, correlation_data, stream=False)
    return Refused(code, message, request_id, reply)
