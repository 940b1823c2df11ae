"""Shutdown, reload and systemd notify through the real main loop (issue 6, items 1-3).

`daemon.lifecycle.main` runs in the test's main thread with real signals (sent by a helper
thread with os.kill) and a real AF_UNIX datagram socket as NOTIFY_SOCKET, as systemd
would give it. Checked: READY after the model loads (EXTEND_TIMEOUT_USEC and STATUS
before it), WATCHDOG only while the worker makes progress or idles healthily, STOPPING
at shutdown; SIGTERM/SIGINT drain or stop the running answer, queued and late questions
get `shutdown` finals, `stopped` is retained, exit 0; SIGHUP reloads cameras and
captions without loading the model again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid

import pytest

from daemon.config import Config, load_config
from daemon.lifecycle import main
from tests.fixtures_daemon import Collector, FakeEngine, noise_png

pytestmark = pytest.mark.broker
pytest.importorskip("npu.engine", reason="the engine module is not importable yet")


class NotifySocket:
    """A bound AF_UNIX datagram socket read by a thread, as systemd reads it (a reader
    that stops reading makes senders block once its small queue is full)."""

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="vlmd-n-", dir="/tmp")  # AF_UNIX paths must be short
        self.path = f"{self.directory}/notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.received: list[tuple[float, dict]] = []
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            self.received.append((time.monotonic(), dict(line.split("=", 1) for line in data.splitlines())))

    def drain(self) -> list[tuple[float, dict]]:
        time.sleep(0.1)  # the last datagrams
        return list(self.received)

    def keys(self) -> list[str]:
        return [key for _, fields in self.drain() for key in fields]

    def close(self):
        self._closed.set()
        self._reader.join(2)
        self.sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def test_a_notify_socket_nobody_reads_cannot_hang_the_daemon(tmp_path):
    """systemd stuck or gone: sends give up after a moment instead of blocking the loop."""
    from daemon import systemd

    directory = tempfile.mkdtemp(prefix="vlmd-n-", dir="/tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(f"{directory}/notify")
    try:
        notifier = systemd.Notifier({"NOTIFY_SOCKET": f"{directory}/notify"})
        assert notifier.watchdog()
        for _ in range(5000):  # until the reader's queue is full
            started = time.monotonic()
            if not notifier.watchdog():
                break
        else:
            pytest.fail("the unread socket never filled up")
        assert time.monotonic() - started < systemd.SEND_TIMEOUT_S + 0.3
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def notify(monkeypatch):
    sock = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", sock.path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def make_config(broker_url: str, **sections) -> Config:
    data = {"device_id": "sd" + uuid.uuid4().hex[:8], "stats": {"interval_s": 3600},
            "mqtt": {"broker": broker_url, "protocol": "5", "persistent_session": False},
            "shutdown": {"drain_timeout_s": 5.0}}
    data.update(sections)
    return Config.model_validate(data)


def wait_stats(client: Collector, root: str, predicate, timeout: float = 10.0) -> dict:
    """The first stats message (the daemon publishes them every stats interval) that
    satisfies `predicate`: what the in-process daemon has received, without a handle on it."""
    deadline = time.monotonic() + timeout
    while True:
        body = json.loads(client.next(max(0.01, deadline - time.monotonic()), root + "/stats").payload)
        if predicate(body):
            return body


def wait_notified(notify: NotifySocket, predicate, timeout: float = 10.0, count: int = 1) -> None:
    """Until `count` datagrams sent to the notify socket satisfy `predicate(fields)`."""
    deadline = time.monotonic() + timeout
    while sum(bool(predicate(fields)) for _, fields in list(notify.received)) < count:
        assert time.monotonic() < deadline, "no such sd_notify message"
        time.sleep(0.01)


def in_background(fn) -> threading.Thread:
    errors: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as exc:  # reported by the test after main() returns
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors
    thread.start()
    return thread


def joined(thread: threading.Thread) -> None:
    thread.join(30)
    if thread.errors:
        raise thread.errors[0]
    assert not thread.is_alive(), "the scenario thread did not finish"


class SlowEngine(FakeEngine):
    """FakeEngine that counts how often the daemon built it."""

    built = 0

    def __init__(self, **kwargs):
        type(self).built += 1
        super().__init__(**kwargs)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_the_running_answer_and_shuts_the_queue(sig, mosquitto, notify):
    """Drain long enough: the running answer finishes normally; queued ones and one that
    arrives during the drain end `shutdown`; `stopped` retained; exit 0."""
    engine = FakeEngine(token_delay_s=0.02, extra_words=60)  # about 1.3 s
    config = make_config(mosquitto.url, stats={"interval_s": 0.05})
    root = config.root
    client = Collector(mosquitto.host, mosquitto.port, [root + "/#"])

    def scenario():
        assert client.next(20, root + "/status").payload == b"online"
        client.publish(root + "/ask", {"id": "running", "text": "long"})
        assert engine.started.wait(10)
        client.publish(root + "/ask", {"id": "queued", "text": "waits"})
        wait_stats(client, root, lambda stats: stats["queue_depth"] == 1)
        wait_notified(notify, lambda fields: "WATCHDOG" in fields, count=3)  # serving: pinged
        os.kill(os.getpid(), sig)
        wait_notified(notify, lambda fields: "STOPPING" in fields)  # the drain has begun
        client.publish(root + "/ask", {"id": "late", "text": "during the drain"})

    loaded_at = []

    def slow_load(config):
        time.sleep(0.3)  # a model load
        loaded_at.append(time.monotonic())
        return engine

    thread = in_background(scenario)
    try:
        assert main(config, engine_factory=slow_load, tick_s=0.05) == 0
        joined(thread)
        finals = {rid: client.answer(f"{root}/answer/{rid}")[1] for rid in ("running", "queued", "late")}
        assert finals["running"]["finish_reason"] == "stop" and finals["running"]["text"].endswith("w59")
        assert finals["queued"]["finish_reason"] == finals["late"]["finish_reason"] == "shutdown"
        assert finals["queued"]["error"]["code"] == "shutdown"
        assert client.next(10, root + "/status").payload == b"stopped"
    finally:
        client.close()
    ready_at = next(at for at, fields in notify.drain() if "READY" in fields)
    assert ready_at > loaded_at[0], "READY only once the model is loaded"
    keys = notify.keys()
    assert "EXTEND_TIMEOUT_USEC" in keys and keys.index("EXTEND_TIMEOUT_USEC") < keys.index("READY")
    assert "STATUS" in keys[: keys.index("READY")], "STATUS while loading the model"
    assert keys.count("WATCHDOG") >= 3 and keys.index("READY") < keys.index("WATCHDOG")
    assert keys[-1] == "STOPPING" or "STOPPING" in keys[-2:]


def test_drain_timeout_stops_the_running_answer_as_shutdown(mosquitto, notify):
    engine = FakeEngine(token_delay_s=0.05, extra_words=400)  # 20 s: far beyond the drain
    config = make_config(mosquitto.url, shutdown={"drain_timeout_s": 0.3})
    root = config.root
    client = Collector(mosquitto.host, mosquitto.port, [root + "/#"])

    def scenario():
        assert client.next(20, root + "/status").payload == b"online"
        client.publish(root + "/ask", {"id": "endless", "text": "go on"})
        assert engine.started.wait(10)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = in_background(scenario)
    try:
        started = time.monotonic()
        assert main(config, engine_factory=lambda c: engine, tick_s=0.05) == 0
        assert time.monotonic() - started < 10
        joined(thread)
        chunks, final = client.answer(f"{root}/answer/endless")
        assert final["finish_reason"] == "shutdown" and final["error"]["code"] == "shutdown"
        assert final["text"] == "".join(c["delta"] for c in chunks)  # the partial answer so far
        assert client.next(10, root + "/status").payload == b"stopped"
    finally:
        client.close()


class HangingEngine(FakeEngine):
    """Answers the first question, then hangs inside the second (a stuck NPU call)."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.hanging = threading.Event()

    def generate(self, prompt, options=None, should_stop=None):
        if prompt.text == "hang":
            self.hanging.set()
            self.release.wait(30)
        yield from super().generate(prompt, options, should_stop)


def test_watchdog_pings_while_idle_and_stops_while_the_worker_is_stuck(mosquitto, notify):
    engine = HangingEngine()
    config = make_config(mosquitto.url, shutdown={"drain_timeout_s": 0.2})
    root = config.root
    client = Collector(mosquitto.host, mosquitto.port, [root + "/#"])
    marks: dict[str, float] = {}

    def scenario():
        assert client.next(20, root + "/status").payload == b"online"
        time.sleep(0.6)  # idle and healthy: pings
        client.publish(root + "/ask", {"id": "stuck", "text": "hang"})
        assert engine.hanging.wait(10)
        marks["stuck"] = time.monotonic()
        time.sleep(1.5)  # stall limit 0.5 s: pings stop after it
        marks["kill"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        engine.release.set()

    thread = in_background(scenario)
    try:
        assert main(config, engine_factory=lambda c: engine, tick_s=0.05, stall_s=0.5) == 0
        joined(thread)
        assert client.answer(f"{root}/answer/stuck")[1]["finish_reason"] == "shutdown"
    finally:
        engine.release.set()
        client.close()
    pings = [at for at, fields in notify.drain() if "WATCHDOG" in fields]
    assert len([at for at in pings if at < marks["stuck"]]) >= 3
    late = [at for at in pings if marks["stuck"] + 0.5 + 0.15 < at < marks["kill"]]
    assert not late, f"{len(late)} watchdog pings while the worker was stuck"


def test_sighup_reloads_cameras_and_captions_without_reloading_the_model(mosquitto, notify, tmp_path):
    SlowEngine.built = 0
    engine_holder = {}

    def factory(config):
        engine_holder["engine"] = SlowEngine(token_delay_s=0.01, extra_words=30)
        return engine_holder["engine"]

    device_id = "hup" + uuid.uuid4().hex[:8]
    root = f"vlmd/{device_id}"
    config_file = tmp_path / "vlmd.toml"
    base = (f'device_id = "{device_id}"\n[mqtt]\nbroker = "{mosquitto.url}"\nprotocol = "5"\n'
            "persistent_session = false\n[stats]\ninterval_s = 0.05\n")
    config_file.write_text(base + "[cameras.a]\ncaption = false\n")
    source = f"ext-{uuid.uuid4().hex[:6]}/b/snapshot"
    client = Collector(mosquitto.host, mosquitto.port, [root + "/#", source])

    def scenario():
        assert client.next(20, root + "/status").payload == b"online"
        client.publish(root + "/frame/a", noise_png(1), qos=1)
        client.publish(root + "/ask", {"id": "across", "text": "spans the reload"})
        wait_stats(client, root, lambda stats: stats["running"])
        config_file.write_text(base + "[cameras.a]\ncaption = true\ninterval_s = 0.1\nmax_tokens = 3\nmin_change = 0\n"
                               f'[cameras.b]\ntopic = "{source}"\n')
        os.kill(os.getpid(), signal.SIGHUP)
        caption = client.next(10, root + "/caption/a")
        assert b'"camera":"a"' in caption.payload
        client.publish(source, noise_png(2, size=(20, 10)), qos=1)
        wait_stats(client, root, lambda stats: stats["frames"].get("b", {}).get("received") == 1)
        client.publish(root + "/ask", {"id": "from-b", "text": "?", "camera": "b", "stream": False})
        engine_holder["from_b"] = client.answer(root + "/answer/from-b")[1]
        config_file.write_text(base + "[cameras.a]\ncaption = maybe\n")  # a broken file: kept the old config
        os.kill(os.getpid(), signal.SIGHUP)
        wait_notified(notify, lambda fields: "reload failed" in fields.get("STATUS", ""))
        client.publish(root + "/ask", {"id": "still", "text": "?", "stream": False})
        engine_holder["still"] = client.answer(root + "/answer/still")[1]
        os.kill(os.getpid(), signal.SIGTERM)

    thread = in_background(scenario)
    try:
        config = load_config(config_file, env={})
        assert main(config, engine_factory=factory, tick_s=0.05, reload_config=lambda: load_config(config_file, env={})) == 0
        joined(thread)
        assert client.answer(root + "/answer/across")[1]["finish_reason"] == "stop"
    finally:
        client.close()
    assert SlowEngine.built == 1, "SIGHUP must not reload the model"
    assert "sizes=20x10" in engine_holder["from_b"]["text"], engine_holder["from_b"]
    assert engine_holder["still"]["finish_reason"] == "stop"
    statuses = [fields.get("STATUS", "") for _, fields in notify.drain()]
    assert any("reload" in status for status in statuses)
