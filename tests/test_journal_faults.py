"""Exactly one final across the daemon's own death (issue 15.3): real mosquitto, real
daemon processes (the main loop `vlmd serve` runs, with a slow stand-in engine), SIGKILL.

- killed while answering with questions queued: after a restart each one gets exactly
  one final (text and inline-image questions are answered again, a camera question
  fails as `restarted`: its frame died with the process);
- killed in the middle of a journal write (the test hook in daemon/journal/file.py):
  the restart reads the journal up to its last whole record and the broker, which never
  got the PUBACK, delivers the question again;
- a second restart does not publish the recovery finals again;
- the broker down while the daemon recovers: the recovery finals go out when it is back.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from daemon.config import Config
from tests.fixtures_daemon import Collector, png_bytes
from tests.test_faults import SessionClient, persistent_mosquitto, stop_broker

pytestmark = pytest.mark.broker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMON = textwrap.dedent(
    """
    import json, sys
    from daemon.config import Config
    from daemon.logs import configure_logging
    from daemon.lifecycle import main
    from tests.fixtures_daemon import FakeEngine
    configure_logging("info", "json")
    config = Config.model_validate(json.loads(sys.argv[1]))
    engine = FakeEngine(token_delay_s=float(sys.argv[2]), extra_words=30)
    sys.exit(main(config, engine_factory=lambda c: engine, tick_s=0.1))
    """
)


class DaemonProcess:
    """One run of the daemon; its log (JSON lines) is kept per run."""

    def __init__(self, config: Config, log_path, token_delay_s: float = 0.05, kill_at: str | None = None):
        env = {**os.environ, "PYTHONPATH": REPO}
        env.pop("VLMD_TEST_JOURNAL_KILL_AT", None)
        if kill_at is not None:
            env["VLMD_TEST_JOURNAL_KILL_AT"] = kill_at
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-c", DAEMON, config.model_dump_json(), str(token_delay_s)],
                                        stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def kill(self) -> int:
        self.process.send_signal(signal.SIGKILL)
        return self.close()

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.close()

    def close(self) -> int:
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(10)
        self._log.close()
        return code

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]


def kill_left_running(*runs: DaemonProcess | None) -> None:
    for run in runs:
        if run is not None and run.process.poll() is None:
            run.kill()


def config_for(broker_url: str, journal_dir, **sections) -> Config:
    data = {"device_id": "jf" + uuid.uuid4().hex[:8], "stats": {"interval_s": 3600},
            "mqtt": {"broker": broker_url, "protocol": "3.1.1", "persistent_session": True, "keepalive_s": 5,
                     "reconnect_min_s": 1.0, "reconnect_max_s": 1.0},
            "journal": {"directory": str(journal_dir)}, "shutdown": {"drain_timeout_s": 1.0}}
    data.update(sections)
    return Config.model_validate(data)


def wait_online(port: int, root: str, timeout: float = 30.0) -> None:
    watcher = Collector("127.0.0.1", port, [root + "/status"], v5=False)
    try:
        deadline = time.monotonic() + timeout
        while watcher.next(max(0.01, deadline - time.monotonic()), root + "/status").payload != b"online":
            pass
    finally:
        watcher.close()


def collect_finals(asker: SessionClient, ids: set[str], timeout: float, settle_s: float = 2.0) -> dict[str, list[dict]]:
    """Finals per id until every id has one, then `settle_s` more to catch duplicates."""
    found: dict[str, list[dict]] = {}
    deadline = time.monotonic() + timeout
    while not ids <= set(found) and time.monotonic() < deadline:
        for request_id, finals in asker.finals(1, timeout=0.5).items():
            found.setdefault(request_id, []).extend(finals)
    for request_id, finals in asker.finals(10**6, timeout=settle_s).items():
        found.setdefault(request_id, []).extend(finals)
    return found


def test_sigkill_while_answering_then_two_restarts_give_each_request_exactly_one_final(mosquitto, tmp_path):
    config = config_for(mosquitto.url, tmp_path / "journal")
    root = config.root
    asker = SessionClient(mosquitto.port, [f"{root}/answer/#"])
    first = DaemonProcess(config, tmp_path / "first.log")
    second = third = None
    try:
        wait_online(mosquitto.port, root)
        inline = base64.b64encode(png_bytes(size=(20, 10))).decode()
        asker.client.publish(f"{root}/frame/cam", png_bytes(size=(8, 8)), qos=1)
        asker.publish(f"{root}/ask", {"id": "q0", "text": "the running one"})
        for n in (1, 2):
            asker.publish(f"{root}/ask", {"id": f"q{n}", "text": "queued", "stream": False})
        asker.publish(f"{root}/ask", {"id": "q3", "text": "inline", "image_b64": inline, "stream": False})
        asker.publish(f"{root}/ask", {"id": "q4", "text": "camera", "camera": "cam", "stream": False})
        asker.wait_for(f"{root}/answer/q0", None)  # a chunk: q0 is being answered, the rest wait
        assert first.kill() == -signal.SIGKILL
        second = DaemonProcess(config, tmp_path / "second.log")
        ids = {"q0", "q1", "q2", "q3", "q4"}
        finals = collect_finals(asker, ids, timeout=60)
        time.sleep(1.0)  # the broker's PUBACKs for those finals reach the journal
        assert second.kill() == -signal.SIGKILL
        third = DaemonProcess(config, tmp_path / "third.log")
        wait_online(mosquitto.port, root)
        again = asker.finals(10**6, timeout=3.0)  # nothing owed any more
        assert third.terminate() == 0
    finally:
        kill_left_running(first, second, third)
        asker.close()
    assert set(finals) == ids, finals
    assert all(len(found) == 1 for found in finals.values()), {k: len(v) for k, v in finals.items()}
    for request_id in ("q0", "q1", "q2", "q3"):
        assert finals[request_id][0]["finish_reason"] == "stop", finals[request_id]
    assert "sizes=20x10" in finals["q3"][0]["text"]  # the inline image came back from the journal
    camera = finals["q4"][0]
    assert (camera["finish_reason"], camera["error"]["code"]) == ("failed", "restarted")
    assert "restarted" in camera["error"]["message"] and "frames" in camera["error"]["message"]
    assert again == {}, f"the third run published again: {again}"
    recovered = [e for e in second.events() if e.get("event") == "journal recovered"]
    assert recovered and recovered[0]["pending"] == 5


def test_sigkill_in_the_middle_of_a_journal_write_is_recovered(mosquitto, tmp_path):
    config = config_for(mosquitto.url, tmp_path / "journal")
    root = config.root
    asker = SessionClient(mosquitto.port, [f"{root}/answer/#"])
    first = DaemonProcess(config, tmp_path / "first.log", token_delay_s=0.0, kill_at="torn")
    second = None
    try:
        wait_online(mosquitto.port, root)
        asker.publish(f"{root}/ask", {"id": "before", "text": "answered before the crash", "stream": False})
        assert set(asker.finals(1, timeout=20)) == {"before"}
        asker.publish(f"{root}/ask", {"id": "torn", "text": "journaled halfway", "stream": False})
        assert first.close() == -signal.SIGKILL  # the hook: half a record, then SIGKILL
        journal = tmp_path / "journal" / f"{config.device_id}.journal"
        size_at_crash = journal.stat().st_size
        second = DaemonProcess(config, tmp_path / "second.log", token_delay_s=0.0)
        finals = collect_finals(asker, {"torn"}, timeout=30)
        assert second.terminate() == 0
    finally:
        kill_left_running(first, second)
        asker.close()
    assert set(finals) == {"torn"} and len(finals["torn"]) == 1, finals  # "before" is not answered again
    assert finals["torn"][0]["finish_reason"] == "stop"
    events = second.events()
    cut = [e for e in events if e.get("event") == "request journal: a torn or corrupt tail was cut off"]
    assert cut and 0 < cut[0]["bytes"] < size_at_crash
    redelivered = [e for e in events if e.get("request_id") == "torn" and e.get("event") == "final"]
    assert len(redelivered) == 1  # the broker delivered it again: it was never acknowledged


def test_broker_down_during_recovery_the_finals_go_out_when_it_is_back(tmp_path):
    broker = persistent_mosquitto(tmp_path)
    config = config_for(broker.url, tmp_path / "journal")
    root = config.root
    asker = SessionClient(broker.port, [f"{root}/answer/#"])
    first = DaemonProcess(config, tmp_path / "first.log")
    second = None
    try:
        wait_online(broker.port, root)
        asker.publish(f"{root}/ask", {"id": "running", "text": "long"})
        asker.publish(f"{root}/ask", {"id": "waiting", "text": "queued", "stream": False})
        asker.wait_for(f"{root}/answer/running", None)
        assert first.kill() == -signal.SIGKILL
        stop_broker(broker)  # SIGTERM: mosquitto saves the sessions
        second = DaemonProcess(config, tmp_path / "second.log")
        time.sleep(2.0)  # the daemon starts and retries a broker that is not there
        assert second.process.poll() is None
        broker = persistent_mosquitto(tmp_path, port=broker.port)
        finals = collect_finals(asker, {"running", "waiting"}, timeout=60)
        assert second.terminate() == 0
    finally:
        kill_left_running(first, second)
        asker.close()
        stop_broker(broker)
    assert set(finals) == {"running", "waiting"} and all(len(f) == 1 for f in finals.values()), finals
    assert {f[0]["finish_reason"] for f in finals.values()} == {"stop"}
