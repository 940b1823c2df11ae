"""TLS and authentication against a mosquitto that requires both (issue 6, item 6).

The broker's TLS listener wants a certificate from the test CA *and* a user name and
password; the certificates are made by `openssl` (tests/fixtures_tls.py). The daemon
must connect with the right material, give up with the reason on the wrong material
(a restart cannot fix it), and never write the password or the private key to its logs.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from daemon.config import load_config
from daemon.logs import configure_logging, reset_logging
from daemon.service import Service
from tests.fixtures_daemon import Collector, FakeEngine
from tests.fixtures_tls import PASSWORD, USERNAME, other_server_certificate, start_tls_mosquitto

pytestmark = pytest.mark.broker
pytest.importorskip("npu.engine", reason="the engine module is not importable yet")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tls_broker(tmp_path, tls_material):
    broker = start_tls_mosquitto(tmp_path, tls_material)
    yield broker
    broker.stop()


@pytest.fixture
def captured_logs():
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    yield stream
    reset_logging()


def tls_config(url: str, material, tmp_path, password: str = PASSWORD, ca=None, client_cert: bool = True, **extra):
    mqtt = {"broker": url, "protocol": "5", "persistent_session": False, "username": USERNAME, "password": password,
            "reconnect_min_s": 1.0, "reconnect_max_s": 1.0,
            "tls": {"ca_file": str(ca or material.ca)}}
    if client_cert:
        mqtt["tls"].update(cert_file=str(material.client_cert), key_file=str(material.client_key))
    overrides = {"device_id": "tls" + uuid.uuid4().hex[:8], "mqtt": mqtt, "stats": {"interval_s": 3600}, **extra}
    return load_config(None, env={}, overrides=overrides)


def key_body(material) -> str:
    """A line from the middle of the client's private key: it must never be logged."""
    lines = material.client_key.read_text().splitlines()
    return lines[1]


def assert_no_secrets(text: str, material) -> None:
    assert PASSWORD not in text, "the MQTT password reached the log"
    assert key_body(material) not in text, "the private key reached the log"


def test_mutual_tls_with_password_serves_and_logs_no_secret(tls_broker, tls_material, tmp_path, captured_logs):
    config = tls_config(tls_broker.url(), tls_material, tmp_path)
    service = Service(config, engine_factory=lambda c: FakeEngine())
    client = Collector(tls_broker.broker.host, tls_broker.broker.port, [config.root + "/#"])  # plain listener
    try:
        service.start()
        assert service.client.wait_connected(15), "no TLS connection with the right CA, certificate and password"
        assert client.next(10, service.topics.status()).payload == b"online"
        client.publish(service.topics.ask(), {"id": "tls1", "text": "hello over TLS"})
        _, final = client.answer(service.topics.answer("tls1"))
        assert final["finish_reason"] == "stop"
    finally:
        service.stop(1.0)
        client.close()
    text = captured_logs.getvalue()
    assert "service started" in text and "connected" in text
    assert_no_secrets(text, tls_material)


# paho leaves the socket of a failed TLS handshake to the garbage collector, which closes
# it with a ResourceWarning; harmless (closed, not leaked), but pytest makes it an error.
PAHO_TLS_SOCKET = pytest.mark.filterwarnings("ignore:Exception ignored in.*SSLSocket:pytest.PytestUnraisableExceptionWarning")


@PAHO_TLS_SOCKET
@pytest.mark.parametrize("wrong", ["password", "no_client_certificate", "rogue_ca"])
def test_wrong_credentials_are_fatal_with_their_reason(wrong, tls_broker, tls_material, tmp_path, captured_logs):
    """A retry with the same credentials cannot work: the client stops trying and names
    the reason (`vlmd serve` then exits 78: tests/test_exit_codes.py)."""
    kwargs = {"password": "not-" + PASSWORD} if wrong == "password" else {}
    if wrong == "no_client_certificate":
        kwargs["client_cert"] = False
    if wrong == "rogue_ca":
        kwargs["ca"] = tls_material.rogue_ca
    config = tls_config(tls_broker.url(), tls_material, tmp_path, **kwargs)
    service = Service(config, engine_factory=lambda c: FakeEngine())
    try:
        service.start()
        assert not service.client.wait_connected(3), f"connected despite the wrong {wrong}"
        assert service.client.num_connects == 0
        from daemon.mqtt.connection import wait_until

        assert wait_until(lambda: service.fatal_error is not None, 10), f"the wrong {wrong} was retried forever"
    finally:
        service.stop(0.5)
    text = captured_logs.getvalue()
    expected = {"password": "refused the connection: Not authorized", "rogue_ca": "certificate not accepted",
                "no_client_certificate": "TLS with the broker failed"}[wrong]
    assert expected in service.fatal_error and expected in text
    assert_no_secrets(text, tls_material)


@PAHO_TLS_SOCKET
def test_host_name_is_verified_unless_insecure(tls_material, tmp_path, captured_logs):
    """A certificate from the right CA for another host: refused, unless tls.insecure."""
    broker = start_tls_mosquitto(tmp_path, tls_material, server=other_server_certificate(tls_material, "elsewhere.invalid"))
    services = {}
    try:
        for insecure in (False, True):
            config = tls_config(broker.url(), tls_material, tmp_path)
            config = config.model_copy(update={"mqtt": config.mqtt.model_copy(
                update={"tls": config.mqtt.tls.model_copy(update={"insecure": insecure})})})
            services[insecure] = Service(config, engine_factory=lambda c: FakeEngine())
            services[insecure].start()
        assert services[True].client.wait_connected(15), "insecure skips the host name check"
        assert not services[False].client.connected, "a certificate for another host was accepted"
    finally:
        for service in services.values():
            service.stop(0.5)
        broker.stop()
    assert_no_secrets(captured_logs.getvalue(), tls_material)


def test_vlmd_serve_from_a_config_file_over_mutual_tls(tls_broker, tls_material, tmp_path):
    """The real entry point: TOML config with TLS files and a password file, debug logs;
    the password and key appear nowhere in its output, and SIGTERM exits 0."""
    device_id = "tlsserve" + uuid.uuid4().hex[:6]
    (tmp_path / "mqtt_password").write_text(PASSWORD + "\n")
    config_file = tmp_path / "vlmd.toml"
    config_file.write_text(
        f'device_id = "{device_id}"\n'
        "[mqtt]\n"
        f'broker = "{tls_broker.url()}"\nusername = "{USERNAME}"\npassword_file = "mqtt_password"\n'
        'protocol = "auto"\n'
        "[mqtt.tls]\n"
        f'ca_file = "{tls_material.ca}"\ncert_file = "{tls_material.client_cert}"\nkey_file = "{tls_material.client_key}"\n'
        "[stats]\ninterval_s = 0.5\n"
    )
    script = ("import sys; from daemon.config import load_config; from daemon.logs import configure_logging; "
              "from daemon.lifecycle import main; from tests.fixtures_daemon import FakeEngine; "
              "config = load_config(sys.argv[1]); configure_logging('debug', 'json'); "
              "sys.exit(main(config, engine_factory=lambda c: FakeEngine(), tick_s=0.1))")
    env = {**os.environ, "PYTHONPATH": REPO}
    process = subprocess.Popen([sys.executable, "-c", script, str(config_file)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    client = Collector(tls_broker.broker.host, tls_broker.broker.port, [f"vlmd/{device_id}/#"])
    try:
        assert client.next(30, f"vlmd/{device_id}/status").payload == b"online"
        client.publish(f"vlmd/{device_id}/ask", {"id": "s1", "text": "hi", "stream": False})
        assert client.answer(f"vlmd/{device_id}/answer/s1")[1]["finish_reason"] == "stop"
        client.next(10, f"vlmd/{device_id}/stats")
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
        client.close()
    assert process.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(line.get("event") == "connected" for line in lines)
    assert_no_secrets(out + err, tls_material)
    assert PASSWORD not in tls_broker.broker.log_path.read_text()
