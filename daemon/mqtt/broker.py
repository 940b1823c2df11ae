"""The embedded MQTT broker: zero-setup runs with no broker configured.

Contract:
- `EmbeddedBroker(host, port)`; `start()` returns once the broker accepts TCP
  connections on `url` (`mqtt://host:port`) or raises `BrokerStartError` with a message
  a user can act on (port in use: use another port or point --broker at a real broker).
- `port=0` picks a free port; read it back from `.port` / `.url` after `start()`.
- `stop()` closes it (idempotent); also a context manager.
- amqtt speaks MQTT 3.1.1 only: the daemon's `protocol = "auto"` falls back to 3.1.1.
  Anonymous clients only, no persistence: a development and single-board convenience,
  not a replacement for mosquitto in a fleet.

amqtt is asyncio; it runs on its own event loop in a daemon thread so the rest of vlmd
stays synchronous. Its logging is chatty (a line per packet with its default plugins),
so only the anonymous-auth plugin is loaded and its loggers are kept at WARNING.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from typing import Any

LOG = logging.getLogger(__name__)
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
_FREE_PORT_ATTEMPTS = 5


class _DropStartupTraceback(logging.Filter):
    """amqtt logs a traceback when binding fails; start() raises a clearer error instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Broker startup failed")


_STARTUP_FILTER = _DropStartupTraceback()


class BrokerStartError(RuntimeError):
    """The embedded broker could not start; the message says why and what to do."""


class EmbeddedBroker:
    """An amqtt broker on a background thread, listening on host:port (TCP, MQTT 3.1.1)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883):
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> EmbeddedBroker:
        """Start and wait until connections are accepted; BrokerStartError otherwise."""
        if self.running:
            raise BrokerStartError("embedded broker already running")
        logging.getLogger("amqtt").setLevel(max(logging.WARNING, logging.getLogger("amqtt").getEffectiveLevel()))
        logging.getLogger("transitions").setLevel(logging.WARNING)
        logging.getLogger("amqtt.broker").addFilter(_STARTUP_FILTER)  # a no-op when already added
        want_free_port = self.port == 0
        for _ in range(_FREE_PORT_ATTEMPTS if want_free_port else 1):
            if want_free_port:
                self.port = _free_port(self.host)
            try:
                self._start_once()
                LOG.info("embedded MQTT broker listening on %s", self.url)
                return self
            except _PortTaken:
                if not want_free_port:
                    raise BrokerStartError(
                        f"cannot start the embedded broker: {self.host}:{self.port} is already in use. "
                        "Another broker is probably running there: pass --broker mqtt://HOST:PORT "
                        "(or set mqtt.broker) to use it, or choose another [embedded_broker] port."
                    ) from None
        raise BrokerStartError(f"cannot find a free port for the embedded broker on {self.host}")

    def stop(self) -> None:
        """Disconnect clients and close the listener; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                future.result(timeout=_STOP_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - stopping must not raise into shutdown paths
                LOG.warning("embedded broker did not shut down cleanly: %s", exc)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=_STOP_TIMEOUT_S)
        self._loop = self._thread = self._broker = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- internals -------------------------------------------------------------------

    def _start_once(self) -> None:
        started = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run, args=(loop, started, failure), name="vlmd-broker", daemon=True)
        thread.start()
        if not started.wait(_START_TIMEOUT_S):
            raise BrokerStartError(f"embedded broker did not start within {_START_TIMEOUT_S:.0f}s")
        if failure:
            thread.join(timeout=_STOP_TIMEOUT_S)
            if _is_address_in_use(failure[0]):
                raise _PortTaken()
            raise BrokerStartError(f"cannot start the embedded broker on {self.host}:{self.port}: {failure[0]}") from failure[0]
        self._loop, self._thread = loop, thread

    def _run(self, loop: asyncio.AbstractEventLoop, started: threading.Event, failure: list[BaseException]) -> None:
        """Thread body: start the broker, report, then serve until stop() stops the loop."""
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # noqa: BLE001 - handed to start() in the caller's thread
                failure.append(exc)
                return
            finally:
                started.set()
            loop.run_forever()
        finally:
            _close_loop(loop)

    async def _serve(self) -> None:
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # Only anonymous auth: the default packet and event loggers log every packet.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = _make_broker(config)
        await self._broker.start()

    async def _shutdown(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()


def _make_broker(config: dict) -> Any:
    from amqtt.broker import Broker  # heavy: only when the embedded broker is used

    class _FixedBroker(Broker):
        """Two amqtt 0.12 defects fixed where they show: see each method."""

        async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
            # On CONNECT amqtt replays retained messages for *every* filter any client
            # subscribed to; only the session's own subscriptions may receive them.
            subscribers = self._subscriptions.get(subscription[0], [])
            if any(other.client_id == session.client_id for other, _qos in subscribers):
                await super()._publish_retained_messages_for_subscription(subscription, session)

        async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str) -> None:
            # A connection that never sent CONNECT (a port probe, a health check) keeps
            # its socket open until garbage collection; close it when the session ends.
            try:
                await super().stream_connected(reader, writer, listener_name)
            finally:
                writer.close()

    return _FixedBroker(config)


class _PortTaken(Exception):
    pass


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _is_address_in_use(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what amqtt left running so no 'task was destroyed' warning escapes."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
