"""A dependency-free sd_notify client and the watchdog policy of the main loop.

Contract:
- `Notifier(env)` reads NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID from `env`
  (default os.environ) when constructed. Not under systemd (no NOTIFY_SOCKET) every
  method is a no-op returning False. An `@` socket name is Linux's abstract namespace.
- `ready()`, `stopping()`, `status(text)`, `extend_timeout(seconds)` (while the model
  loads: keeps TimeoutStartSec from killing a slow load), `watchdog()`; each returns
  True when the datagram was sent. Send errors are logged once and never raised: the
  daemon must not die because systemd went away, nor hang because it stopped reading
  (a send gives up after SEND_TIMEOUT_S).
- `Notifier.watchdog_interval_s`: how often to ping (half of WatchdogSec), or None.
- `Watchdog(notifier).tick(healthy)`: call it from the main loop every iteration with
  "the worker is alive and progressing (or idle and healthy)"; it pings at most once per
  interval and never while unhealthy, so a stuck worker gets the unit restarted.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

LOG = logging.getLogger(__name__)
SEND_TIMEOUT_S = 0.2  # per datagram; the loop sends one per watchdog interval at most


class Notifier:
    """Sends sd_notify datagrams to $NOTIFY_SOCKET (if any)."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = _watchdog_interval(env)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str | None = None) -> bool:
        fields = {"READY": "1"}
        if status:
            fields["STATUS"] = status
        return self.notify(**fields)

    def stopping(self, status: str | None = None) -> bool:
        fields = {"STOPPING": "1"}
        if status:
            fields["STATUS"] = status
        return self.notify(**fields)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before the start (or stop) timeout fires."""
        return self.notify(EXTEND_TIMEOUT_USEC=str(max(1, int(seconds * 1_000_000))))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG="1")

    def notify(self, **fields: str) -> bool:
        """Send `KEY=value` lines in one datagram; False when disabled or it failed."""
        if self.address is None:
            return False
        for key, value in fields.items():
            if "\n" in value or "=" in key:
                raise ValueError(f"sd_notify field {key!r} must be one line")
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # a reader that stopped reading fills its queue and would block the main
                # loop (and its shutdown) forever: give up after a moment instead
                sock.settimeout(SEND_TIMEOUT_S)
                sock.connect(self.address)
                sock.sendall(message)
        except OSError as exc:
            if not self._warned:  # systemd gone or socket unreadable: say it once
                LOG.warning("sd_notify to %r failed: %s", self.address, exc)
                self._warned = True
            return False
        return True


class Watchdog:
    """Pings the systemd watchdog only while the caller reports healthy progress."""

    def __init__(self, notifier: Notifier, clock: Callable[[], float] = time.monotonic):
        self.notifier = notifier
        self.interval_s = notifier.watchdog_interval_s
        self._clock = clock
        self._last_ping: float | None = None

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled and self.interval_s is not None

    def tick(self, worker_alive_and_progressing: bool) -> bool:
        """Ping if healthy and the interval has passed; True when a ping was sent."""
        if not self.enabled or not worker_alive_and_progressing:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self.interval_s:
            return False
        self._last_ping = now
        return self.notifier.watchdog()

    def seconds_until_due(self) -> float | None:
        """How long the main loop may sleep before the next tick is due (None: never)."""
        if not self.enabled:
            return None
        if self._last_ping is None:
            return 0.0
        return max(0.0, self._last_ping + self.interval_s - self._clock())


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace: leading NUL, no file
    if value.startswith("/"):
        return value
    LOG.warning("ignoring NOTIFY_SOCKET %r: not a path or an abstract socket name", value)
    return None  # vsock (vsock:CID:PORT) notify sockets are not supported


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds (systemd's advice), if the watchdog is ours."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (e.g. we were started by a wrapper)
    return int(usec) / 2 / 1_000_000
