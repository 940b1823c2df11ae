"""systemd/vlmd.service: `systemd-analyze verify` accepts it, and it keeps the promises
the daemon relies on (notify, watchdog, no restart on a bad config, credentials)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import EX_CONFIG, load_config

SYSTEMD_DIR = Path(__file__).resolve().parents[1] / "systemd"
UNIT = SYSTEMD_DIR / "vlmd.service"
EXEC_PATH = "/opt/vlmd/venv/bin/vlmd"


def directives(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of the unit (comments skipped), values per key in order."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_settings_the_daemon_relies_on():
    unit = directives(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["ExecStart"][0].startswith(f"{EXEC_PATH} serve --config /etc/vlmd/vlmd.toml")
    assert int(unit["WatchdogSec"][0]) > 0
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == [str(EX_CONFIG)]
    assert unit["User"] == ["vlmd"]
    assert unit["LoadCredential"] == ["mqtt_password:/etc/vlmd/mqtt_password"]
    assert "PrivateDevices" not in unit  # would hide the NPU device nodes
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    # the request journal's default home survives a restart (not a reboot)
    assert unit["RuntimeDirectory"] == ["vlmd"] and unit["RuntimeDirectoryPreserve"] == ["restart"]


def test_every_setting_has_a_reason():
    """Each group of settings in [Service] is introduced by a comment saying why."""
    in_service = False
    previous = ""
    for line in UNIT.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            in_service = stripped == "[Service]"
        elif in_service and stripped and not stripped.startswith("#"):
            assert previous.startswith("#") or "=" in previous, f"no reason given above: {stripped}"
        previous = stripped


def test_device_access_is_documented_but_left_commented():
    text = UNIT.read_text()
    assert "#DevicePolicy=closed" in text and "#DeviceAllow=" in text
    assert "DeviceAllow" not in directives(text)


def test_example_config_passes_check_config():
    load_config(SYSTEMD_DIR / "vlmd.toml", {})


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (apt-get install -y systemd; .ci/run does this)")
    # verify insists that ExecStart exists: point a copy at a real executable.
    unit = tmp_path / "vlmd.service"
    unit.write_text(UNIT.read_text().replace(EXEC_PATH, sys.executable))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "vlmd.service" in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert complaints == []  # unknown keys and bad values are only warnings: fail on them too


def test_verify_catches_a_broken_unit(tmp_path):
    """Guards the test above: a typo must produce a complaint."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (apt-get install -y systemd; .ci/run does this)")
    unit = tmp_path / "vlmd.service"
    unit.write_text(UNIT.read_text().replace(EXEC_PATH, sys.executable).replace("WatchdogSec=", "WatchdogSecs="))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert "WatchdogSecs" in result.stdout + result.stderr
