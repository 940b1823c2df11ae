"""Faults (issue 6, item 4): the broker dies mid-answer, the NPU fails mid-request,
failures repeat, the daemon is SIGKILLed.

Rule checked throughout: no request ends without exactly one final.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from daemon.config import Config
from daemon.mqtt.connection import wait_until
from daemon.service import Service, load_engine
from tests.fixtures_broker import start_mosquitto
from tests.fixtures_daemon import Collector, FakeEngine

pytestmark = pytest.mark.broker
pytest.importorskip("npu.engine", reason="the engine module is not importable yet")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SessionClient:
    """An asking client with a persistent session (3.1.1 clean_session=False) and QoS 1,
    as the issue asks: what the broker queued for it while it was away arrives later."""

    def __init__(self, port: int, topics: list[str]):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: queue.Queue = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="asker-" + uuid.uuid4().hex[:8],
                                  protocol=paho.MQTTv311, clean_session=False)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, body: dict) -> None:
        self.client.publish(topic, json.dumps(body), qos=1)

    def wait_for(self, topic: str, payload: bytes | None, timeout: float = 10.0) -> None:
        """Until `payload` (None: any message) arrives on `topic`; other messages are dropped."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self.messages.get(timeout=0.2)
            except queue.Empty:
                continue
            if message.topic == topic and (payload is None or message.payload == payload):
                return
        raise TimeoutError(f"no {payload!r} on {topic} within {timeout}s")

    def finals(self, count: int, timeout: float) -> dict[str, list[dict]]:
        """Collect until `count` finals arrived (or timeout): {request id: [finals]}."""
        found: dict[str, list[dict]] = {}
        deadline = time.monotonic() + timeout
        while sum(map(len, found.values())) < count and time.monotonic() < deadline:
            try:
                message = self.messages.get(timeout=0.2)
            except queue.Empty:
                continue
            if message.topic.endswith("/status"):
                continue
            body = json.loads(message.payload)
            if body.get("done"):
                found.setdefault(body["id"], []).append(body)
        return found

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def persistent_mosquitto(directory, port=None):
    # autosave every second: a SIGKILLed broker comes back with the sessions it had
    extra = f"persistence true\npersistence_location {directory}/\nautosave_interval 1\n"
    return start_mosquitto(directory, port=port, extra_config=extra)


def stop_broker(broker, sig=signal.SIGTERM) -> None:
    if broker.process.poll() is None:
        broker.process.send_signal(sig)
    broker.process.wait(10)
    if broker.process.stderr:
        broker.process.stderr.close()


def config_for(url: str, reconnect_s: tuple[float, float] = (1.0, 2.0), **sections) -> Config:
    data = {"device_id": "fault" + uuid.uuid4().hex[:8], "stats": {"interval_s": 3600},
            "mqtt": {"broker": url, "protocol": "3.1.1", "persistent_session": True, "reconnect_min_s": reconnect_s[0],
                     "reconnect_max_s": reconnect_s[1]},
            "shutdown": {"drain_timeout_s": 2.0}}
    data.update(sections)
    return Config.model_validate(data)


def test_broker_killed_and_restarted_mid_answer_loses_nothing(tmp_path):
    broker = persistent_mosquitto(tmp_path)
    engine = FakeEngine(token_delay_s=0.04, extra_words=80)  # about 3 s per answer
    # The daemon retries every 10 s, the asker every second: after the restart the asker
    # is back (and publishes) long before the daemon, even on a loaded machine.
    config = config_for(broker.url, reconnect_s=(10.0, 10.0))
    root = config.root
    service = Service(config, engine_factory=lambda c: engine)
    asker = SessionClient(broker.port, [f"{root}/answer/#", f"{root}/status"])
    service.start()
    try:
        assert service.client.wait_connected(10)
        asker.wait_for(f"{root}/status", b"online")  # published after subscribing: the daemon listens
        asker.publish(f"{root}/ask", {"id": "mid", "text": "a long answer"})
        asker.publish(f"{root}/ask", {"id": "queued", "text": "waits behind it", "stream": False})
        assert engine.started.wait(10)
        # SIGKILL loses what mosquitto has not saved: wait for an autosave that has both sessions
        saved_after, database = time.time(), tmp_path / "mosquitto.db"
        assert wait_until(lambda: database.exists() and database.stat().st_mtime > saved_after, 10)
        assert service.inbox.running is not None  # "mid" is still streaming
        stop_broker(broker, signal.SIGKILL)
        # both answers finish while the broker is down: their QoS 1 finals wait in paho
        assert wait_until(lambda: len(engine.prompts) == 2 and not service.inbox.running, 15)
        assert not service.client.connected
        broker = persistent_mosquitto(tmp_path, port=broker.port)
        # published while the daemon is still away: the broker keeps it for its session
        while asker.client.is_connected() is False:
            time.sleep(0.05)
        assert not service.client.connected
        asker.publish(f"{root}/ask", {"id": "while-away", "text": "are you back?", "stream": False})
        finals = asker.finals(3, timeout=30)
    finally:
        service.stop(1.0)
        asker.close()
        stop_broker(broker)
    assert service.client.num_connects >= 2 and service.client.session_present
    assert sorted(finals) == ["mid", "queued", "while-away"], finals
    assert all(len(found) == 1 for found in finals.values()), "a request got two finals"
    assert finals["mid"][0]["finish_reason"] == "stop" and finals["mid"][0]["text"].endswith("w79")
    assert finals["while-away"][0]["finish_reason"] == "stop"


class FlakySession:
    """A layer session that fails its `fail_at`-th decode call once (a stand-in for an
    NPU runtime error), delegating everything else to the real session."""

    def __init__(self, session, fail_at: int):
        self._session = session
        self.fail_at = fail_at
        self.decode_calls = 0
        self.armed = False

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run(self, feed, group=0):
        from npu.session import SessionError

        if self.armed and group == 0:
            self.decode_calls += 1
            if self.decode_calls == self.fail_at:
                self.armed = False
                raise SessionError("AX_ENGINE_RunSync failed: 0x800b (injected)")
        return self._session.run(feed, group)


def test_engine_error_mid_request_fails_it_resets_and_serves_the_next(mosquitto, tiny_internvl_native):
    from npu.engine import Engine
    from npu.model import load_model

    flaky: list[FlakySession] = []

    def flaky_engine(config: Config):
        m = config.model
        model = load_model(m.path, backend="reference", precision="bf16", kv_capacity=m.kv_capacity,
                           prefill_chunk=m.prefill_chunk)
        flaky.append(FlakySession(model.layers[0], fail_at=30))  # prompt rows go by chunks: 30 is mid-answer
        model.layers[0] = flaky[0]
        return Engine(model)

    model = {"path": str(tiny_internvl_native.path), "kv_capacity": 256, "prefill_chunk": 32}
    config = config_for(mosquitto.url, model=model, shutdown={"max_consecutive_failures": 2})
    config = config.model_copy(update={"mqtt": config.mqtt.model_copy(update={"persistent_session": False})})
    service = Service(config, engine_factory=flaky_engine)
    client = Collector(mosquitto.host, mosquitto.port, [config.root + "/#"], v5=False)
    service.start()
    ask = {"text": "Tell me a story about the sea.", "max_tokens": 60, "temperature": 0}
    try:
        assert client.next(30, service.topics.status()).payload == b"online"
        client.publish(service.topics.ask(), {"id": "before", **ask})
        before = client.answer(service.topics.answer("before"), timeout=60)[1]
        flaky[0].armed = True
        client.publish(service.topics.ask(), {"id": "broken", **ask})
        chunks, broken = client.answer(service.topics.answer("broken"), timeout=60)
        assert service.worker.consecutive_failures == 1
        client.publish(service.topics.ask(), {"id": "after", **ask})
        after = client.answer(service.topics.answer("after"), timeout=60)[1]
    finally:
        service.stop(1.0)
        client.close()
    assert broken["finish_reason"] == "failed" and broken["error"]["code"] == "engine_error"
    assert "0x800b" in broken["error"]["message"]
    assert chunks, "the failure came mid-answer, after some tokens were streamed"
    assert before["usage"]["completion_tokens"] > 30, "the answer must outlast the injected failure"
    # the cache was reset: the next request gives exactly the undisturbed answer
    assert after["finish_reason"] == before["finish_reason"] and after["text"] == before["text"]
    assert service.worker.consecutive_failures == 0 and service.healthy


FAILING_DAEMON = textwrap.dedent(
    """
    import json, sys
    from daemon.config import Config
    from daemon.lifecycle import main
    from tests.fixtures_daemon import FakeEngine
    sys.exit(main(Config.model_validate(json.loads(sys.argv[1])), engine_factory=lambda c: FakeEngine(), tick_s=0.1))
    """
)


def run_daemon(config: Config) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.Popen([sys.executable, "-c", FAILING_DAEMON, config.model_dump_json()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def test_consecutive_failures_exit_1_but_a_success_resets_the_count(mosquitto):
    config = config_for(mosquitto.url, shutdown={"max_consecutive_failures": 3, "drain_timeout_s": 1.0})
    root = config.root
    client = Collector(mosquitto.host, mosquitto.port, [root + "/#"], v5=False)
    process = run_daemon(config)
    try:
        assert client.next(30, root + "/status").payload == b"online"
        # two failures, a success, two failures: never three in a row, so it stays up
        for n, text in enumerate(["FAIL a", "FAIL b", "fine", "FAIL c", "FAIL d"]):
            client.publish(root + "/ask", {"id": f"r{n}", "text": text, "stream": False})
            expected = "stop" if text == "fine" else "failed"
            assert client.answer(f"{root}/answer/r{n}")[1]["finish_reason"] == expected
        assert process.poll() is None
        client.publish(root + "/ask", {"id": "r5", "text": "FAIL e", "stream": False})
        client.publish(root + "/ask", {"id": "r6", "text": "queued behind the last straw", "stream": False})
        assert client.answer(f"{root}/answer/r5")[1]["finish_reason"] == "failed"
        assert process.wait(30) == 1, "systemd restarts the unit only on a failure exit"
        assert client.next(10, root + "/status").payload == b"stopped"
        # r6 got a `shutdown` final if it arrived before the exit; else the broker kept
        # it for the persistent session and the restarted daemon (systemd) answers it
        try:
            r6 = client.answer(f"{root}/answer/r6", timeout=3)[1]["finish_reason"]
        except TimeoutError:
            restarted = run_daemon(config)
            try:
                r6 = client.answer(f"{root}/answer/r6", timeout=30)[1]["finish_reason"]
            finally:
                restarted.send_signal(signal.SIGTERM)
                restarted.communicate(timeout=30)
        assert r6 in ("shutdown", "stop")
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)
        client.close()


def test_sigkill_mid_answer_leaves_offline_and_a_restart_comes_back_online(mosquitto):
    config = config_for(mosquitto.url, mqtt={"broker": mosquitto.url, "protocol": "3.1.1", "keepalive_s": 5,
                                             "persistent_session": True})
    root = config.root
    client = Collector(mosquitto.host, mosquitto.port, [root + "/#"], v5=False)
    process = run_daemon(config)
    try:
        assert client.next(30, root + "/status").payload == b"online"
        client.publish(root + "/ask", {"id": "k1", "text": "hello"})
        client.answer(f"{root}/answer/k1")
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        assert client.next(20, root + "/status").payload == b"offline"  # the will, at once: the socket closed
        restarted = run_daemon(config)
        try:
            assert client.next(30, root + "/status").payload == b"online"
            client.publish(root + "/ask", {"id": "k2", "text": "back?", "stream": False})
            assert client.answer(f"{root}/answer/k2")[1]["finish_reason"] == "stop"
            restarted.send_signal(signal.SIGTERM)
            assert restarted.wait(30) == 0
            assert client.next(10, root + "/status").payload == b"stopped"
        finally:
            if restarted.poll() is None:
                restarted.kill()
            restarted.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)
        client.close()


# -- the final itself must never be what fails ------------------------------------------


class OddEngine(FakeEngine):
    """Ends with text no JSON encoder accepts (a lone surrogate) and timings the schema
    refuses: what a buggy runtime might hand back."""

    def generate(self, prompt, options=None, should_stop=None):
        from npu.engine import DoneEvent, TokenEvent

        yield TokenEvent(1, "half \ud800", 0)
        yield DoneEvent("half \ud800", "stop", 3, 1, {"ttft_ms": object()})


class FlakyPublisher:
    """Records like RecordingPublisher; raises on the first `fail_count` finals."""

    def __init__(self, fail_count: int):
        from tests.fixtures_daemon import RecordingPublisher

        self.recorded = RecordingPublisher()
        self.fail_count = fail_count

    def publish(self, topic, payload, qos, retain, correlation_data=None, on_delivered=None):
        if qos == 1 and self.fail_count > 0:
            self.fail_count -= 1
            raise OSError("socket gone")
        self.recorded.publish(topic, payload, qos, retain, correlation_data, on_delivered)


def worker_rig(engine, publisher):
    from daemon.inbox import Inbox
    from daemon.scheduler import Scheduler
    from daemon.responder import Responder, RuntimeStats
    from daemon.worker import Worker, WorkerLimits
    from protocol.topics import Topics

    topics = Topics("vlmd/f")
    inbox = Inbox(queue_size=4, frame_history=2)
    responder = Responder(publisher, topics, RuntimeStats())
    worker = Worker(engine, inbox, Scheduler({}), responder, WorkerLimits(max_consecutive_failures=2))
    return topics, inbox, worker


def submit(inbox, topics, request_id: str, **fields) -> None:
    from daemon.scheduler import Job, Reply
    from protocol.payloads import AskRequest

    request = AskRequest.model_validate({"id": request_id, "text": "q", **fields})
    inbox.submit(Job("ask", request_id, time.monotonic(), request=request, reply=Reply(topics.answer(request_id))))


def test_a_final_that_cannot_be_encoded_is_still_sent():
    from tests.fixtures_daemon import RecordingPublisher

    publisher = RecordingPublisher()
    topics, inbox, worker = worker_rig(OddEngine(), publisher)
    submit(inbox, topics, "odd")
    worker.step(idle_s=0.01)
    finals = [m.json() for m in publisher.on(topics.answer("odd")) if m.qos == 1]
    assert len(finals) == 1 and finals[0]["finish_reason"] == "stop"
    assert finals[0]["text"] == "half \ufffd"
    assert worker.consecutive_failures == 0


def test_a_publish_error_never_escapes_the_worker_nor_counts_as_an_engine_failure():
    publisher = FlakyPublisher(fail_count=2)
    topics, inbox, worker = worker_rig(FakeEngine(), publisher)
    for request_id in ("p1", "p2", "p3"):
        submit(inbox, topics, request_id, stream=False)
    for _ in range(3):
        worker.step(idle_s=0.01)  # must not raise
        assert worker.consecutive_failures == 0 and worker.healthy
    finals = [m.json() for m in publisher.recorded.messages if m.qos == 1]
    assert [f["id"] for f in finals] == ["p3"]  # p1, p2: the broker connection failed; logged, not fatal
