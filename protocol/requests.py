"""Where a request's replies go: one resolution, one check, for every path.

`reply_path(topics, request_id, reply_to, response_topic)` picks the first reply path
the client gave (the payload's `reply_to`, then the MQTT 5 response topic), else
`<root>/answer/<id>`, and checks the chosen one once with `Topics.reply_problem`. An
accepted question and a refusal use the same function, so neither can publish into the
daemon's own input topics. Knows nothing of paho: the response topic is a plain string.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.topics import Topics


@dataclass(frozen=True)
class ReplyPath:
    """The topic a request's replies go to, or why the client's choice cannot be used.

    `topic` None means: publish on `<root>/error` (no usable reply path). `problem` is
    set when the client named a reply topic that vlmd must not publish to: the request
    is then refused (`bad_request`) on `<root>/error`, never on some other topic the
    client did not ask for.
    """

    topic: str | None
    problem: str | None = None


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
