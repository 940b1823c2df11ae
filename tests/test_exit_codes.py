"""`vlmd serve`'s exit codes as systemd reads them, through real processes (issue 11 item 6,
issue 16 item 6).

systemd/vlmd.service restarts on failure except for exit 78 (EX_CONFIG,
`RestartPreventExitStatus=78`, checked in tests/test_systemd_unit.py): so every
configuration or model error a restart cannot fix must exit 78 and every runtime
failure 1, each with its cause logged before "service stopped".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from daemon.config import EX_CONFIG
from tests.fixtures_tls import PASSWORD, USERNAME, start_tls_mosquitto

REPO = Path(__file__).resolve().parents[1]
PAHO_TLS_SOCKET = pytest.mark.filterwarnings("ignore:Exception ignored in.*SSLSocket:pytest.PytestUnraisableExceptionWarning")


def serve(tmp_path: Path, *argv: str, config: str | None = None, timeout: float = 90) -> tuple[int, list[dict], str]:
    """Run `vlmd serve` to its end; (exit code, JSON log lines in order, raw stderr)."""
    args = [sys.executable, "-m", "daemon.cli", "serve", *argv]
    if config is not None:
        path = tmp_path / f"vlmd-{uuid.uuid4().hex[:6]}.toml"
        path.write_text(config)
        args += ["--config", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLMD_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("NOTIFY_SOCKET", None)
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    return result.returncode, lines, result.stderr


def cause_then_stop(lines: list[dict], event: str) -> dict:
    """The log line `event`, checked to come before "service stopped"."""
    events = [line.get("event") for line in lines]
    assert event in events, events
    assert "service stopped" in events, events
    assert events.index(event) < events.index("service stopped"), events
    return lines[events.index(event)]


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr


@pytest.mark.slow
def test_axengine_backend_without_axengine_exits_78(tmp_path, axera_board_dir, mosquitto):
    """A compiled model, `--backend axengine`, and no axengine on this machine: a restart
    cannot install it, so 78, and the cause is logged first."""
    code, lines, stderr = serve(tmp_path, "--model", str(axera_board_dir), "--backend", "axengine",
                                "--broker", mosquitto.url, "--device-id", "exit78")
    assert code == EX_CONFIG, stderr
    line = cause_then_stop(lines, "cannot load the model")
    assert "axengine" in line["error"] and line["exit_code"] == EX_CONFIG
    no_traceback(stderr)


def test_hugging_face_checkpoint_on_axengine_exits_78(tmp_path, mosquitto):
    code, lines, stderr = serve(tmp_path, "--backend", "axengine", "--broker", mosquitto.url, "--device-id", "exit78b")
    assert code == EX_CONFIG, stderr
    assert "Hugging Face checkpoint" in cause_then_stop(lines, "cannot load the model")["error"]
    no_traceback(stderr)


def test_missing_model_and_bad_config_exit_78(tmp_path):
    code, _, stderr = serve(tmp_path, "--model", str(tmp_path / "no-such-model"))
    assert code == EX_CONFIG and "no such model directory" in stderr
    code, _, stderr = serve(tmp_path, config="[mqtt]\nkeepalive_s = \"30\"\n")
    assert code == EX_CONFIG and "mqtt.keepalive_s" in stderr
    no_traceback(stderr)


def test_embedded_broker_port_taken_is_a_runtime_failure_exit_1(tmp_path):
    """The port may be free after a restart: exit 1, which systemd restarts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines, stderr = serve(tmp_path, config=f'device_id = "exit1"\n[embedded_broker]\nport = {port}\n')
    assert code == 1, stderr
    assert cause_then_stop(lines, "cannot start the embedded broker")["exit_code"] == 1
    no_traceback(stderr)


def tls_config(broker, material, ca: Path, password: str, protocol: str) -> str:
    (broker.password_file.parent / "pw").write_text(password + "\n")
    return (f'device_id = "tls{uuid.uuid4().hex[:6]}"\n[mqtt]\nbroker = "{broker.url()}"\nusername = "{USERNAME}"\n'
            f'password_file = "{broker.password_file.parent / "pw"}"\nprotocol = "{protocol}"\n'
            'reconnect_min_s = 1.0\nreconnect_max_s = 1.0\n'
            f'[mqtt.tls]\nca_file = "{ca}"\ncert_file = "{material.client_cert}"\nkey_file = "{material.client_key}"\n')


@PAHO_TLS_SOCKET
@pytest.mark.broker
@pytest.mark.parametrize("protocol", ["5", "auto"])
@pytest.mark.parametrize("wrong", ["rogue_ca", "password"])
def test_tls_or_credentials_the_broker_refuses_exit_78(wrong, protocol, tmp_path, tls_material):
    """Explicit protocol and `auto` alike: an untrusted broker certificate or a refused
    password is logged with its reason and ends the daemon with 78 (no endless retries,
    no "not reachable yet" forever)."""
    broker = start_tls_mosquitto(tmp_path, tls_material)
    try:
        ca = tls_material.rogue_ca if wrong == "rogue_ca" else tls_material.ca
        password = PASSWORD if wrong == "rogue_ca" else "not-" + PASSWORD
        code, lines, stderr = serve(tmp_path, config=tls_config(broker, tls_material, ca, password, protocol))
    finally:
        broker.stop()
    assert code == EX_CONFIG, stderr
    line = cause_then_stop(lines, "stopping: the broker connection cannot work with this configuration")
    expected = "certificate not accepted" if wrong == "rogue_ca" else "Not authorized"  # mosquitto says so
    assert expected in line["reason"], line
    assert PASSWORD not in stderr
    no_traceback(stderr)
