"""Connection failures are never silent (issue 16 item 6) and client-id fights are named
(issue 16 item 9): real sockets, a real mosquitto, the daemon's own client and main loop.

- explicit protocol: a refused or unresolvable broker is logged with its reason and the
  delay before the next attempt (paho's on_connect_fail, which passes no reason: vlmd
  reads the exception paho is handling);
- READY goes to systemd at the first CONNACK, or after the bounded wait with a STATUS
  saying the broker is not connected yet;
- two clients with one client id: after repeated takeovers, one warning naming the id.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from daemon.config import Config
from daemon.mqtt.client import TAKEOVER_COUNT, MqttClient
from daemon.mqtt.connection import ClientSettings, wait_until
from daemon.lifecycle import main
from daemon.service import Service
from tests.fixtures_broker import free_port, start_mosquitto
from tests.fixtures_daemon import FakeEngine
from tests.test_shutdown import NotifySocket

WILL = ("vlmd/t/status", b"offline", 1, True)


@pytest.fixture
def logs(json_logs):
    return json_logs


def client_for(url: str, protocol: str = "5", client_id: str | None = None) -> MqttClient:
    settings = ClientSettings(url=url, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}", protocol=protocol,
                              persistent_session=False, reconnect_min_s=1.0, reconnect_max_s=2.0)
    return MqttClient(settings, will=WILL, on_message=lambda m: None, on_connected=lambda: None)


def events_named(lines: list[dict], event: str) -> list[dict]:
    return [line for line in lines if line.get("event") == event]


def closed_port() -> int:
    with socket.socket() as probe:  # bound then closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def attempts_logged(logs, url: str, protocol: str, event: str, count: int = 1, timeout: float = 15) -> tuple[list, MqttClient]:
    """Start a client at `url`, wait for `count` log lines `event`, stop it; (those lines, client)."""
    client = client_for(url, protocol)
    client.start()
    try:
        assert wait_until(lambda: len(events_named(logs(), event)) >= count, timeout), f"no {event!r} logged"
    finally:
        client.stop()
    return events_named(logs(), event), client


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_refused_broker_is_logged_with_reason_and_backoff(logs, protocol):
    lines, client = attempts_logged(logs, f"mqtt://127.0.0.1:{closed_port()}", protocol,
                                    "cannot connect to the broker", count=2)
    first, second = lines[:2]
    assert "connection refused" in first["reason"]
    assert (first["retry_in_s"], second["retry_in_s"]) == (1.0, 2.0)  # doubling, up to reconnect_max_s
    assert client.fatal_error is None  # a broker may come up later: keep trying


def test_unresolvable_broker_is_logged_with_its_host_name(logs):
    lines, _ = attempts_logged(logs, "mqtt://no-such-broker.invalid:1883", "5", "cannot connect to the broker")
    assert "cannot resolve the host name 'no-such-broker.invalid'" in lines[0]["reason"]


def test_auto_protocol_says_why_the_broker_is_not_reachable(logs):
    lines, _ = attempts_logged(logs, f"mqtt://127.0.0.1:{closed_port()}", "auto",
                               "broker not reachable yet; will probe its protocol again")
    assert "connection refused" in lines[0]["reason"] and lines[0]["retry_in_s"] > 0


def config_for(url: str) -> Config:
    return Config.model_validate({"device_id": "rd" + uuid.uuid4().hex[:8], "stats": {"interval_s": 3600},
                                  "mqtt": {"broker": url, "protocol": "5", "persistent_session": False,
                                           "reconnect_min_s": 1.0, "reconnect_max_s": 1.0}})


def run_main_until_ready(monkeypatch, config: Config, **options) -> tuple[list, int]:
    """main() in the test's thread (signals need it) with a NOTIFY_SOCKET; SIGTERM once READY came."""
    notify = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    try:
        return run_main_in_thread_until(notify, config, lambda n: any("READY" in f for _, f in n.received), **options)
    finally:
        notify.close()


def run_main_in_thread_until(notify: NotifySocket, config: Config, done, **options) -> tuple[list, int]:
    """main() in the test's thread (signals need it); a helper SIGTERMs it once done(notify)."""
    import os
    import signal

    def stopper():
        wait_until(lambda: done(notify), 30)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stopper, daemon=True).start()
    code = main(config, engine_factory=lambda c: FakeEngine(), tick_s=0.05, **options)
    return notify.drain(), code


@pytest.mark.broker
def test_ready_waits_for_the_first_connack(monkeypatch, tmp_path):
    """No READY while the broker is down; READY once it is up and the CONNACK came."""
    port = free_port()
    started: dict = {}

    def start_broker_later():
        time.sleep(2.5)
        started["at"] = time.monotonic()
        started["broker"] = start_mosquitto(tmp_path, port=port)

    threading.Thread(target=start_broker_later, daemon=True).start()
    try:
        received, code = run_main_until_ready(monkeypatch, config_for(f"mqtt://127.0.0.1:{port}"), ready_wait_s=60.0)
    finally:
        if "broker" in started:
            started["broker"].process.terminate()
            started["broker"].process.wait(5)
            started["broker"].process.stderr.close()
    assert code == 0
    ready = [(at, fields) for at, fields in received if "READY" in fields]
    assert ready, "READY never sent"
    assert ready[0][0] >= started["at"], "READY before the broker was even up"
    assert "not connected" not in ready[0][1].get("STATUS", "")


def test_ready_after_the_bounded_wait_says_the_broker_is_not_connected(monkeypatch):
    received, code = run_main_until_ready(monkeypatch, config_for(f"mqtt://127.0.0.1:{closed_port()}"),
                                          ready_wait_s=1.0)
    assert code == 0
    (status,) = [fields["STATUS"] for _, fields in received if "READY" in fields]
    assert "broker not connected yet" in status


@pytest.mark.broker
def test_repeated_session_takeovers_are_named_once(logs, mosquitto):
    """Another client connecting with our client id (two boards, one device_id): the broker
    ends our connection each time (mosquitto 2.0.11 closes the socket; newer ones send
    DISCONNECT "Session taken over"); after TAKEOVER_COUNT of them, one warning."""
    client_id = f"vlmd-twin-{uuid.uuid4().hex[:6]}"
    ours = client_for(mosquitto.url, "5", client_id)
    ours.start()
    try:
        assert ours.wait_connected(10)
        for _ in range(TAKEOVER_COUNT + 1):
            assert wait_until(lambda: ours.connected, 10)
            twin = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
            twin.connect(mosquitto.host, mosquitto.port)
            twin.loop_start()
            assert wait_until(lambda: not ours.connected, 10), "the broker did not take our session over"
            twin.disconnect()
            twin.loop_stop()
    finally:
        ours.stop()
    assert len(events_named(logs(), "disconnected")) == TAKEOVER_COUNT + 1
    warnings = [line for line in logs() if "another client probably uses the same client id" in line.get("event", "")]
    assert len(warnings) == 1 and warnings[0]["client_id"] == client_id


@pytest.mark.broker
def test_a_restarting_broker_is_no_fight(logs, tmp_path):
    """Connections lost to broker restarts (the next attempt is refused) are not takeovers."""
    port = free_port()
    broker = start_mosquitto(tmp_path, port=port)
    ours = client_for(f"mqtt://127.0.0.1:{port}", "5")
    ours.start()
    try:
        for _ in range(TAKEOVER_COUNT + 1):
            assert wait_until(lambda: ours.connected, 20)
            refused = len(events_named(logs(), "cannot connect to the broker"))
            broker.process.terminate()
            broker.process.wait(5)
            broker.process.stderr.close()
            assert wait_until(lambda: len(events_named(logs(), "cannot connect to the broker")) > refused, 10)
            broker = start_mosquitto(tmp_path, port=port)
    finally:
        ours.stop()
        broker.process.terminate()
        broker.process.wait(5)
        broker.process.stderr.close()
    assert not [line for line in logs() if "same client id" in line.get("event", "")]


@pytest.mark.broker
def test_a_single_takeover_is_no_fight(logs, mosquitto):
    client_id = f"vlmd-once-{uuid.uuid4().hex[:6]}"
    ours = client_for(mosquitto.url, "5", client_id)
    ours.start()
    try:
        assert ours.wait_connected(10)
        twin = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        twin.connect(mosquitto.host, mosquitto.port)
        twin.loop_start()
        assert wait_until(lambda: not ours.connected, 10)
        twin.disconnect()
        twin.loop_stop()
        assert wait_until(lambda: ours.connected, 10)
    finally:
        ours.stop()
    assert not [line for line in logs() if "same client id" in line.get("event", "")]


def test_service_exposes_the_fatal_reason():
    service = Service(config_for("mqtt://127.0.0.1:1"), engine_factory=lambda c: FakeEngine())
    assert service.fatal_error is None  # not started: nothing known yet
