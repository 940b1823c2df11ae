"""The HTTP interface's half that knows the service: what a chat request becomes, and how its
replies come back to the client's request.

`HttpInterface(service)` turns a validated chat (protocol.openai.ChatAsk) into a `Job` for
the service's one inbox (the same queue, scheduler order and limits as MQTT questions:
`interface="http"` only changes where the replies go and how stats count them) and gives
the job a `QueueSink`: the Responder hands the sink each chunk and the one final, and the
sink passes them to the client's event loop. A client that goes away cancels its job (a
queued one gets its final `cancelled` at once; a running one stops before the next graph
call). It never tokenises, schedules or decodes: the worker runs the job as any other.

Knows nothing of Starlette or uvicorn (daemon/http/server.py serves it).
"""

from __future__ import annotations

import asyncio
import hmac
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from daemon.config import read_api_keys
from daemon.logs import get_logger
from daemon.scheduler import Job
from protocol import openai
from protocol.openai import ChatAsk, ImageRef, OpenAIError
from protocol.payloads import AnswerChunk, AnswerFinal

log = get_logger("vlmd.http")

# The final's error code -> (HTTP status, OpenAI error code) when no token was sent yet.
_STATUS = {"too_long": (400, "context_length_exceeded"), "bad_image": (400, "invalid_image"),
           "image_too_large": (400, "image_too_large"), "bad_request": (400, "invalid_value"),
           "limit": (400, "limit"), "busy": (429, "rate_limit_exceeded"), "shutdown": (503, "shutdown"),
           "expired": (408, "expired"), "cancelled": (499, "cancelled")}


class QueueSink:
    """A job's replies into an asyncio queue of the server's loop (thread-safe); never blocks."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def chunk(self, message: AnswerChunk) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, message)

    def final(self, message: AnswerFinal) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, message)


class HttpInterface:
    """Chats in, jobs to the service's inbox, replies back through a sink."""

    def __init__(self, service: Any):
        self.service = service
        config = service.config.http
        self.config = config
        self.keys = [key.encode("utf-8") for key in read_api_keys(config.api_keys_file)] if config.api_keys_file else []
        facts = service.model_facts or {}
        self.model_id = config.model_name or model_id(facts.get("path"))
        self.max_model_len = int(facts.get("kv_capacity") or 0)
        self.created = int(service.wall_clock())
        self.allowed_hosts = frozenset(config.image_url_hosts)

    # -- checks ---------------------------------------------------------------------------

    def authorised(self, header: str | None) -> bool:
        """True when no key is configured, or the bearer key matches one (constant time, every key compared)."""
        if not self.keys:
            return True
        scheme, _, given = (header or "").partition(" ")
        given_bytes = given.strip().encode("utf-8")
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given_bytes, key)
        return scheme.lower() == "bearer" and matched

    def parse(self, body: bytes, request_id: str) -> ChatAsk:
        return openai.parse_chat(body, self.service.limits, self.model_id, request_id, self.allowed_hosts,
                                 self.service.config.frames.max_bytes)

    def fetch_images(self, chat: ChatAsk) -> ChatAsk:
        """The chat with every allow-listed image URL fetched (blocking: run it off the event loop)."""
        if not any(isinstance(p, ImageRef) and p.url for _, parts in chat.messages for p in parts):
            return chat
        messages = tuple((role, tuple(self._fetched(p) if isinstance(p, ImageRef) and p.url else p for p in parts))
                         for role, parts in chat.messages)
        return replace(chat, messages=messages)

    def _fetched(self, ref: ImageRef) -> ImageRef:
        limit = self.service.config.frames.max_bytes
        try:
            with urllib.request.urlopen(ref.url, timeout=self.config.fetch_timeout_s) as response:  # noqa: S310 (allow-listed hosts only)
                data = response.read(limit + 1)
        except (OSError, ValueError) as exc:
            raise OpenAIError(400, f"{ref.param}: could not fetch the image: {exc}", ref.param, "invalid_image") from None
        if len(data) > limit:
            raise OpenAIError(400, f"{ref.param}: the image is more than {limit} bytes", ref.param, "image_too_large")
        return ImageRef(data=data, param=ref.param)

    # -- jobs -----------------------------------------------------------------------------

    def submit(self, chat: ChatAsk, sink: QueueSink) -> Job:
        """Queue the chat as a job (a full queue or a closed inbox gives its final at once)."""
        job = Job("ask", chat.ask.id, self.service.clock(), request=chat.ask, sink=sink, interface="http", chat=chat)
        self.service.submit_job(job)
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: a queued job ends `cancelled` now, a running one at its next graph call."""
        if job.finalized:
            return
        job.cancel_event.set()  # also reaches a job between the queue and the worker's start
        log.info("http client gone: cancelling", request_id=job.job_id)
        self.service.cancel(job.job_id)

    def retry_after(self) -> str:
        """Seconds a refused client should wait: about one answer per queued question."""
        last = self.service.stats.last_ttft_ms or 1000.0
        return str(max(1, round(self.service.inbox.depth * max(last, 1000.0) / 1000.0)))

    # -- replies --------------------------------------------------------------------------

    def error_for(self, final: AnswerFinal) -> OpenAIError:
        """What a final that is not an answer becomes for a client that has had no token yet."""
        code = final.error.code if final.error is not None else final.finish_reason
        message = final.error.message if final.error is not None else final.finish_reason
        status, openai_code = _STATUS.get(code, (500, code))
        param = message.split(":", 1)[0] if status == 400 and message.startswith("messages[") else None
        if code == "too_long":
            param = "messages"
        elif status == 400 and message.startswith("format:"):  # the engine refused the schema it was given
            param = "response_format"
        headers = {"Retry-After": self.retry_after()} if status == 429 else None
        return OpenAIError(status, message, param, openai_code, headers)

    def usage(self, final: AnswerFinal) -> dict[str, Any]:
        cached = int((final.timings or {}).get("cached_rows", 0) or 0)
        return openai.usage(final.usage.prompt_tokens, final.usage.completion_tokens, cached)


def model_id(path: str | None) -> str:
    """A stable model name from where the model was loaded: its directory's name, or for an
    M5Stack mode file (mode_<model>.json) the model it names."""
    if not path:
        return "model"
    source = Path(path)
    if source.suffix == ".json":
        return source.stem.removeprefix("mode_")
    return source.name


def now_s() -> int:
    return int(time.time())
