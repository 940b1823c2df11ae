"""A real mosquitto broker on a free loopback port, one per test session.

Skips with a reason when the binary is missing locally; `.ci/run` installs it, so in
CI these tests always run.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


def _sets_user(config_text: str) -> bool:
    return any(line.split()[:1] == ["user"] for line in config_text.splitlines())


def start_mosquitto(directory: Path, port: int | None = None, extra_config: str = "") -> Broker:
    """Start mosquitto with an own config in `directory`; the caller terminates it."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto; .ci/run does this)")
    port = port or free_port()
    config = directory / f"mosquitto-{port}.conf"
    log_path = directory / f"mosquitto-{port}.log"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        # mosquitto started as root drops to its own user, which cannot write our temp dirs
        + ("" if _sets_user(extra_config) else f"user {getpass.getuser()}\n")
        + "allow_anonymous true\n"
        "persistence false\n"
        f"log_dest file {log_path}\n"
        "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        "max_queued_messages 10000\n"
        + extra_config
    )
    process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port)
    except TimeoutError:
        process.kill()
        _, err = process.communicate(timeout=5)
        raise RuntimeError(f"mosquitto did not start: {err.decode(errors='replace')}") from None
    return Broker("127.0.0.1", port, process, log_path)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory) -> Broker:
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.process.terminate()
    try:
        broker.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        broker.process.kill()
    if broker.process.stderr:
        broker.process.stderr.close()
