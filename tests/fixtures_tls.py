"""TLS material made by the `openssl` command line, and a mosquitto that requires it.

`tls_material` (session): a test CA, a server certificate for localhost / 127.0.0.1, a
client certificate and key signed by the CA, and a second ("rogue") CA that signed
nothing the broker uses. EC P-256 keys: quick to make. Skips when openssl is missing.

`start_tls_mosquitto(directory, material, ...)` starts mosquitto with two listeners: a
plain anonymous one on loopback for the test's own client, and a TLS one that wants a
client certificate from the CA and a user name and password (per-listener settings).
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures_broker import Broker, free_port, mosquitto_binary, wait_for_port

USERNAME = "board7"
PASSWORD = "pw-Zq8v!s3cr3t-never-logged"


@dataclass(frozen=True)
class TlsMaterial:
    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path


@dataclass(frozen=True)
class TlsBroker:
    broker: Broker  # .port is the plain listener
    tls_port: int
    password_file: Path

    def url(self, host: str = "localhost") -> str:
        return f"mqtts://{host}:{self.tls_port}"

    def stop(self) -> None:
        self.broker.process.terminate()
        try:
            self.broker.process.wait(5)
        except subprocess.TimeoutExpired:
            self.broker.process.kill()
            self.broker.process.wait(5)
        if self.broker.process.stderr:
            self.broker.process.stderr.close()


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _key(directory: Path, name: str) -> None:
    _openssl(directory, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name)


def _ca(directory: Path, name: str, subject: str) -> None:
    _key(directory, f"{name}.key")
    _openssl(directory, "req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
             "-subj", subject, "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")


def _signed(directory: Path, name: str, subject: str, extensions: str) -> None:
    _key(directory, f"{name}.key")
    _openssl(directory, "req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")


def make_tls_material(directory: Path) -> TlsMaterial:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (apt-get install -y openssl)")
    _ca(directory, "ca", "/CN=vlmd test CA")
    _ca(directory, "rogue", "/CN=someone else's CA")
    _signed(directory, "server", "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _signed(directory, "client", f"/CN={USERNAME}", "extendedKeyUsage=clientAuth\n")
    return TlsMaterial(directory, directory / "ca.crt", directory / "server.crt", directory / "server.key",
                       directory / "client.crt", directory / "client.key", directory / "rogue.crt")


def other_server_certificate(material: TlsMaterial, name: str) -> tuple[Path, Path]:
    """(cert, key) from the same CA for a server called `name` only."""
    _signed(material.directory, name, f"/CN={name}", f"subjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth\n")
    return material.directory / f"{name}.crt", material.directory / f"{name}.key"


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls"))


def start_tls_mosquitto(directory: Path, material: TlsMaterial, require_certificate: bool = True,
                        server: tuple[Path, Path] | None = None) -> TlsBroker:
    """mosquitto with a plain anonymous listener and a TLS + password listener (`server`:
    another (cert, key) than the material's); the caller stops it (`TlsBroker.stop`)."""
    server_cert, server_key = server or (material.server_cert, material.server_key)
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto; .ci/run does this)")
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    passwords = directory / "passwords"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), USERNAME, PASSWORD], check=True, capture_output=True)
    plain_port, tls_port = free_port(), free_port()
    log_path = directory / f"mosquitto-{tls_port}.log"
    config = directory / f"mosquitto-{tls_port}.conf"
    # per_listener_settings first: it must precede the settings it scopes. `user`: a
    # root-started mosquitto drops to its own user, which could not read the test's files.
    config.write_text(
        "per_listener_settings true\n"
        f"user {getpass.getuser()}\n"
        "persistence false\n"
        f"log_dest file {log_path}\n"
        "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        f"listener {plain_port} 127.0.0.1\n"
        "allow_anonymous true\n"
        f"listener {tls_port} 127.0.0.1\n"
        "allow_anonymous false\n"
        f"password_file {passwords}\n"
        f"cafile {material.ca}\ncertfile {server_cert}\nkeyfile {server_key}\n"
        f"require_certificate {'true' if require_certificate else 'false'}\n"
    )
    process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", plain_port)
        wait_for_port("127.0.0.1", tls_port)
    except TimeoutError:
        process.kill()
        _, err = process.communicate(timeout=5)
        raise RuntimeError(f"mosquitto did not start: {err.decode(errors='replace')}") from None
    return TlsBroker(Broker("127.0.0.1", plain_port, process, log_path), tls_port, passwords)
