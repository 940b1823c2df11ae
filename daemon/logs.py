"""Logging for vlmd: structlog, JSON lines off a terminal, readable lines on one.

Contract:
- `configure_logging(level, fmt, stream)` once at start (again to reconfigure; it
  replaces only the handler it installed). `fmt="auto"` picks console when `stream` is a
  terminal, JSON lines otherwise (systemd's journal, pipes, files).
- Library loggers (paho, amqtt, ...) go through the same handler and format.
- `get_logger(name)` anywhere, also at import time: loggers resolve lazily.
- `log_context(request_id=..., camera=...)` binds fields to every line logged inside
  the `with` block *in the current thread / context* (structlog contextvars). The worker
  wraps each job in it; callbacks on other threads bind their own.
- Secrets never reach the output: values of keys that look like secrets are replaced by
  `<redacted>` and pydantic `SecretStr` values render as `**********`.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

REDACTED = "<redacted>"
_SECRET_WORDS = ("password", "passwd", "secret", "authorization", "credential")
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
# Chatty libraries: their INFO lines (per connection, per state change) drown ours.
_QUIET_LIBRARIES = {"amqtt": logging.WARNING, "transitions": logging.WARNING, "websockets": logging.WARNING}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# Logger levels as they were before the first configure_logging, for reset_logging.
_saved_levels: dict[str, int] = {}


def _is_secret_key(key: Any) -> bool:
    """A key naming a secret: it contains a secret word anywhere, or one of its words is a
    token ("token", "access_token", "apitoken"); "tokens" counts text tokens (image_tokens,
    max_tokens), never a credential."""
    lowered = str(key).lower()
    return any(word in lowered for word in _SECRET_WORDS) or any(
        word.endswith("token") for word in _WORD_SPLIT.split(lowered))


class _VlmdHandler(logging.StreamHandler):
    """Marks the handler configure_logging installed, so it can replace exactly it."""


def redact_secrets(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: blank the values of secret-looking keys (any nesting level 1)."""
    for key, value in event_dict.items():
        if _is_secret_key(key) and value not in (None, ""):
            event_dict[key] = REDACTED
        elif isinstance(value, dict):
            event_dict[key] = {k: (REDACTED if _is_secret_key(k) else v) for k, v in value.items()}
    return event_dict


def _shared_processors() -> list:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
        structlog.processors.StackInfoRenderer(),
    ]


def wants_json(fmt: str, stream: TextIO) -> bool:
    """'json' / 'console' as asked; 'auto' = JSON unless `stream` is a terminal."""
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"log format must be auto, json or console, got {fmt!r}")
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (isatty and isatty())
    return fmt == "json"


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to `stream` (default: stderr) in one format."""
    if level not in _LEVELS:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, got {level!r}")
    stream = sys.stderr if stream is None else stream
    if wants_json(fmt, stream):
        renderer: Any = structlog.processors.JSONRenderer()
        final = [structlog.processors.format_exc_info, renderer]
    else:
        final = [structlog.dev.ConsoleRenderer(colors=bool(getattr(stream, "isatty", lambda: False)()))]
    handler = _VlmdHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_shared_processors(),
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        )
    )
    root = logging.getLogger()
    if not _saved_levels:
        _saved_levels.update({name: logging.getLogger(name).level for name in ("", *_QUIET_LIBRARIES)})
    for old in [h for h in root.handlers if isinstance(h, _VlmdHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    for name, quiet_level in _QUIET_LIBRARIES.items():
        logging.getLogger(name).setLevel(max(quiet_level, _LEVELS[level]))
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *_shared_processors(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # loggers made at import must follow a later reconfigure
    )


def reset_logging() -> None:
    """Undo configure_logging (tests): our handler, logger levels, structlog defaults."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _VlmdHandler)]:
        root.removeHandler(old)
    for name, level in _saved_levels.items():
        logging.getLogger(name).setLevel(level)
    _saved_levels.clear()
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def get_logger(name: str | None = None, **fields: Any) -> Any:
    """A structlog logger (lazy: fine at import time), with `fields` bound."""
    logger = structlog.get_logger(name)
    return logger.bind(**fields) if fields else logger


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Bind fields (e.g. request_id, camera) to every log line inside the block.

    None values are skipped, so `log_context(request_id=rid, camera=job.camera)` works
    for jobs without a camera. Nesting restores the outer values on exit.
    """
    bound = {key: value for key, value in fields.items() if value is not None}
    with structlog.contextvars.bound_contextvars(**bound):
        yield
