"""What an MQTT connection is made of and how its failures read: the client's settings,
a received message, broker URLs, the CONNACK refusals a retry cannot fix, and failed
attempts described in words. No sockets of its own; daemon/mqtt/client.py uses these.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable

from daemon.config import BrokerAddress
from daemon.config import parse_broker_url as config_parse_broker_url

# CONNACK refusals that name a setting of ours: retrying with the same settings cannot work.
FATAL_REFUSALS = frozenset({
    "Bad user name or password", "Not authorized", "Bad authentication method", "Banned",
    "Client identifier not valid", "Unsupported protocol version",
})
VERSION_REFUSALS = frozenset({"Unsupported protocol version", "Protocol error", "Malformed packet"})


class MqttError(RuntimeError):
    """A broker URL or setting vlmd cannot use."""


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host[:port]` (default 1883) or `mqtts://host[:port]` (default 8883)."""
    try:
        return config_parse_broker_url(url)
    except ValueError as exc:
        raise MqttError(str(exc)) from None


@dataclass(frozen=True)
class TlsSettings:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    insecure: bool = False


@dataclass(frozen=True)
class ClientSettings:
    url: str
    client_id: str
    username: str = ""
    password: str = ""
    keepalive_s: int = 30
    protocol: str = "auto"  # "auto" | "3.1.1" | "5"
    persistent_session: bool = True
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    tls: TlsSettings = TlsSettings()


@dataclass(frozen=True)
class Incoming:
    """One received message, with the MQTT 5 reply properties when present."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    redelivered: bool = False  # the broker's DUP flag: sent before, never acknowledged


def is_tls_failure(error: BaseException | None) -> bool:
    """A TLS error that the same settings will meet again (not a connection cut mid-handshake)."""
    return isinstance(error, ssl.SSLError) and not isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError))


def describe_connect_error(error: BaseException | None, host: str) -> str:
    """A failed connection attempt in words: what a person fixes it by."""
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host name {host!r} ({error.strerror})"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (nothing listens on that port?)"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {error.verify_message or error.reason}"
    if isinstance(error, ssl.SSLError):
        return f"{error.reason or error}" + (f" ({error.library})" if error.library else "")
    if isinstance(error, (TimeoutError, socket.timeout)):
        return "timed out"
    if error is None:
        return "unknown reason"
    return f"{type(error).__name__}: {error}"


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate` until true or `timeout`; for callers that have no event to wait on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def no_delay(client, userdata, sock) -> None:
    """Send small packets (answer chunks, PUBACKs) at once: with Nagle's algorithm on, each
    waits for the previous one's ACK, which the peer delays by up to 40 ms (measured in
    bench/mqtt_path.py: ~40 ms added per question, ~3 ms per streamed token)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (websockets): nothing to tune
        pass
