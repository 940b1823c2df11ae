"""The OpenAI-compatible API served over HTTP: Starlette routes on uvicorn, in a thread of the daemon.

Routes: `GET /v1/models`, `POST /v1/chat/completions` (whole, or streamed as server-sent
events in OpenAI's chunk format ending with `data: [DONE]`), `GET /healthz`. Every refusal
is OpenAI's error shape (protocol.openai.OpenAIError), logged once. `/v1/*` needs a bearer
key when `[http] api_keys_file` is set (HttpInterface.authorised: constant-time compare).

A streamed request sends its headers only when the first token (or the final) arrives, so a
request refused before answering (queue full, prompt over the KV capacity, a bad image) is a
4xx even when streamed. A client that disconnects cancels its job: a streamed response's
generator is stopped by Starlette when the client goes (its `finally` cancels), a whole one
polls for the disconnect while it waits.

`HttpServer(interface, host, port).start()` binds the socket first (port 0 = any free port;
`port` then tells the one chosen; `HttpStartError` when it cannot bind) and runs uvicorn's
event loop on a thread named vlmd-http; `stop()` ends it. The translation lives in
daemon/http/interface.py; this module only routes bytes.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from daemon.http.interface import HttpInterface, QueueSink, now_s
from daemon.logs import get_logger
from protocol import openai
from protocol.openai import OpenAIError
from protocol.payloads import AnswerChunk, AnswerFinal

log = get_logger("vlmd.http")

_DISCONNECT_POLL_S = 0.5


class HttpStartError(Exception):
    """The HTTP API cannot listen where configured (address in use, no such address)."""


def error_response(error: OpenAIError, request_id: str | None = None) -> JSONResponse:
    log.info("http request refused", status=error.status, code=error.code, param=error.param, message=error.message,
             request_id=request_id)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"the request body is {declared} bytes, the limit is {limit}", None, "payload_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise OpenAIError(413, f"the request body is more than {limit} bytes", None, "payload_too_large")
    return bytes(body)


def build_app(interface: HttpInterface) -> Starlette:
    def authorised(request: Request) -> OpenAIError | None:
        if interface.authorised(request.headers.get("authorization")):
            return None
        return OpenAIError(401, "missing or wrong API key: send Authorization: Bearer <key>", None, "invalid_api_key")

    async def healthz(request: Request) -> Response:
        healthy = interface.service.healthy and not interface.service.inbox.closed
        return JSONResponse({"status": "ok" if healthy else "unhealthy"}, status_code=200 if healthy else 503)

    async def models(request: Request) -> Response:
        if (refused := authorised(request)) is not None:
            return error_response(refused)
        return JSONResponse(openai.models_list(interface.model_id, interface.created, interface.max_model_len))

    async def chat_completions(request: Request) -> Response:
        request_id = "chatcmpl-" + uuid.uuid4().hex[:24]
        try:
            if (refused := authorised(request)) is not None:
                raise refused
            body = await _read_body(request, interface.config.max_body_bytes)
            chat = interface.parse(body, request_id)
            chat = await run_in_threadpool(interface.fetch_images, chat)
        except OpenAIError as exc:
            return error_response(exc, request_id)
        sink = QueueSink(asyncio.get_running_loop())
        job = interface.submit(chat, sink)
        created = now_s()
        first = await _first_event(request, sink, interface, job)
        if first is None:  # the client went away while waiting
            return Response(status_code=499)
        if isinstance(first, AnswerFinal) and first.finish_reason not in ("stop", "length"):
            return error_response(interface.error_for(first), request_id)
        if not chat.ask.stream:
            final = first if isinstance(first, AnswerFinal) else await _final_of(request, sink, interface, job)
            if final is None:
                return Response(status_code=499)
            if final.finish_reason not in ("stop", "length"):
                return error_response(interface.error_for(final), request_id)
            return JSONResponse(openai.completion(request_id, created, interface.model_id, final.text,
                                                  final.finish_reason, interface.usage(final)))
        return StreamingResponse(_stream(first, sink, interface, job, chat.include_usage, request_id, created),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(OpenAIError(404, f"no such endpoint: {request.method} {request.url.path}", None,
                                          "not_found"))

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return error_response(OpenAIError(405, f"{request.method} is not allowed on {request.url.path}", None,
                                          "method_not_allowed"))

    routes = [Route("/healthz", healthz), Route("/v1/models", models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})
    return app


async def _first_event(request: Request, sink: QueueSink, interface: HttpInterface, job: Any) -> Any:
    """The job's first chunk or its final; None (the job cancelled) when the client goes first."""
    while True:
        try:
            return await asyncio.wait_for(sink.queue.get(), _DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                interface.cancel(job)
                return None


async def _final_of(request: Request, sink: QueueSink, interface: HttpInterface, job: Any) -> AnswerFinal | None:
    while True:
        event = await _first_event(request, sink, interface, job)
        if event is None or isinstance(event, AnswerFinal):
            return event


async def _stream(first: Any, sink: QueueSink, interface: HttpInterface, job: Any, include_usage: bool,
                  request_id: str, created: int):
    """SSE bytes: the role, each delta, the finish reason, the usage when asked, [DONE].
    Stopped by Starlette when the client disconnects: the job is then cancelled."""
    model = interface.model_id
    finished = False
    try:
        yield openai.sse(openai.chunk(request_id, created, model, {"role": "assistant", "content": ""}))
        event = first
        while True:
            if isinstance(event, AnswerChunk):
                yield openai.sse(openai.chunk(request_id, created, model, {"content": event.delta}))
            else:
                finished = True
                if event.finish_reason in ("stop", "length"):
                    yield openai.sse(openai.chunk(request_id, created, model, {}, event.finish_reason))
                    if include_usage:
                        yield openai.sse(openai.chunk(request_id, created, model, None, None, interface.usage(event)))
                else:  # after tokens were sent an error can only be an event of its own
                    error = interface.error_for(event)
                    log.info("http stream ended by an error", status=error.status, code=error.code, request_id=request_id)
                    yield openai.sse(error.body())
                yield openai.sse("[DONE]")
                return
            event = await sink.queue.get()
    finally:
        if not finished:
            interface.cancel(job)


class HttpServer:
    """uvicorn serving `build_app(interface)` on its own thread."""

    def __init__(self, interface: HttpInterface, host: str, port: int):
        self.interface = interface
        self.host, self.port = host, port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HttpServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise HttpStartError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(build_app(self.interface), log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, server_header=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="vlmd-http",
                                        daemon=True)
        self._thread.start()
        log.info("http api listening", url=self.url, model=self.interface.model_id, keys=len(self.interface.keys))
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
