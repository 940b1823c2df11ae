"""sd_notify against real AF_UNIX datagram sockets (path and abstract), and the watchdog policy."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from daemon.systemd import Notifier, Watchdog


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    """A bound datagram socket standing in for systemd; yields (NOTIFY_SOCKET value, socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
        value = address
    else:
        name = f"vlmd-test-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        value = "@" + name
    sock.settimeout(2)
    yield value, sock
    sock.close()


def _received(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def _nothing_waiting(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        sock.recv(4096)
    except (BlockingIOError, TimeoutError):
        return True
    return False


def test_messages_arrive(notify_socket):
    value, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": value})
    assert notifier.enabled
    assert notifier.ready(status="serving")
    assert _received(sock) == {"READY": "1", "STATUS": "serving"}
    assert notifier.extend_timeout(90)
    assert _received(sock) == {"EXTEND_TIMEOUT_USEC": "90000000"}
    assert notifier.status("loading model")
    assert _received(sock) == {"STATUS": "loading model"}
    assert notifier.watchdog()
    assert _received(sock) == {"WATCHDOG": "1"}
    assert notifier.stopping()
    assert _received(sock) == {"STOPPING": "1"}


def test_not_under_systemd_is_a_silent_noop():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert Watchdog(notifier).tick(True) is False


def test_environment_read_at_construction_not_import(monkeypatch, notify_socket):
    value, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert Notifier().status("from os.environ")
    assert _received(sock) == {"STATUS": "from os.environ"}


def test_vanished_socket_is_reported_not_raised(tmp_path, caplog):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1  # once, not per call


def test_multiline_field_is_refused(notify_socket):
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket[0]})
    with pytest.raises(ValueError, match="one line"):
        notifier.status("two\nlines")


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, None),  # another process's watchdog
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env, interval):
    assert Notifier({"NOTIFY_SOCKET": "/run/x", **env}).watchdog_interval_s == interval


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_pings_only_when_healthy_and_due(notify_socket):
    value, sock = notify_socket
    clock = FakeClock()
    watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "4000000"}), clock=clock)
    assert watchdog.enabled and watchdog.interval_s == 2.0
    assert watchdog.seconds_until_due() == 0.0
    assert watchdog.tick(True)
    assert _received(sock) == {"WATCHDOG": "1"}
    clock.now += 1.0
    assert not watchdog.tick(True)  # not due yet
    assert watchdog.seconds_until_due() == pytest.approx(1.0)
    clock.now += 5.0
    assert not watchdog.tick(False)  # due, but the worker is stuck: no ping
    assert _nothing_waiting(sock)
    assert watchdog.tick(True)
    assert _received(sock) == {"WATCHDOG": "1"}


def test_watchdog_disabled_without_watchdog_usec(notify_socket):
    watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": notify_socket[0]}))
    assert not watchdog.enabled
    assert watchdog.tick(True) is False
    assert watchdog.seconds_until_due() is None
