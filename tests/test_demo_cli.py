"""`vlmd demo --broker URL --device-id ID` explains a missing answer (issue 11 item 8): no
broker there, no daemon under that device id, or one that stopped; each in one line,
from the broker's retained status, without waiting out the answer timeout."""

from __future__ import annotations

import socket
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from daemon.cli import main

pytestmark = pytest.mark.broker


def demo(capsys, *argv) -> tuple[int, str]:
    code = main(["demo", *argv, "--timeout", "600"])  # an answer timeout would take 10 minutes
    return code, capsys.readouterr().err


def test_no_daemon_under_that_device_id(capsys, mosquitto):
    device_id = "wrong" + uuid.uuid4().hex[:6]
    code, err = demo(capsys, "--broker", mosquitto.url, "--device-id", device_id)
    assert code == 1
    assert f"no daemon serves device id '{device_id}' at {mosquitto.url}" in err
    assert f"nothing is retained on vlmd/{device_id}/status" in err
    assert f"vlmd serve --device-id {device_id}" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(("status", "said"), [(b"stopped", "was stopped"), (b"offline", "vanished without stopping")])
def test_a_daemon_that_is_not_online(capsys, mosquitto, status, said):
    device_id = "gone" + uuid.uuid4().hex[:6]
    publisher = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    publisher.connect(mosquitto.host, mosquitto.port)
    publisher.loop_start()
    topic = f"vlmd/{device_id}/status"
    try:
        publisher.publish(topic, status, qos=1, retain=True).wait_for_publish(5)
        code, err = demo(capsys, "--broker", mosquitto.url, "--device-id", device_id)
    finally:
        publisher.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)  # leave nothing retained
        publisher.disconnect()
        publisher.loop_stop()
    assert code == 1 and said in err and f"vlmd serve --device-id {device_id}" in err


def test_no_broker_there(capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, err = demo(capsys, "--broker", f"mqtt://127.0.0.1:{port}", "--device-id", "demo")
    assert code == 1
    assert f"cannot reach the broker at mqtt://127.0.0.1:{port}" in err and "vlmd serve" in err
    assert "Traceback" not in err
