"""The embedded amqtt broker, exercised with real paho 2.x clients over loopback TCP."""

from __future__ import annotations

import gc
import queue
import socket
import time
import warnings

import paho.mqtt.client as mqtt
import pytest

from daemon.mqtt.broker import BrokerStartError, EmbeddedBroker


@pytest.fixture(scope="module")
def broker():
    embedded = EmbeddedBroker("127.0.0.1", 0).start()
    yield embedded
    embedded.stop()


def _client(broker: EmbeddedBroker, client_id: str, will: tuple[str, bytes] | None = None, clean: bool = True):
    """A connected, looping paho client whose messages land in `client.inbox`."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=clean)
    client.inbox = queue.Queue()
    connected = queue.Queue()
    client.on_message = lambda _c, _u, msg: client.inbox.put((msg.topic, msg.payload, msg.qos, msg.retain))
    client.on_connect = lambda _c, _u, _f, reason, _p: connected.put(reason)
    client.on_subscribe = lambda _c, _u, mid, reasons, _p: connected.put(("suback", mid, reasons))
    client.on_disconnect = lambda _c, _u, _f, reason, _p: connected.put(("disconnected", reason))
    if will:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.connect(broker.host, broker.port, keepalive=10)
    client.loop_start()
    reason = connected.get(timeout=5)
    assert not reason.is_failure, reason
    client.acks = connected
    return client


def _subscribe(client, topic: str, qos: int) -> None:
    _, mid = client.subscribe(topic, qos)
    kind, ack_mid, reasons = client.acks.get(timeout=5)
    assert (kind, ack_mid) == ("suback", mid)
    assert reasons[0].value == qos  # granted QoS


def _close(*clients) -> None:
    """Clean DISCONNECT: wait until paho has sent it before stopping its loop."""
    for client in clients:
        client.disconnect()
        while client.acks.get(timeout=5)[0] != "disconnected":
            pass
        client.loop_stop()


def test_start_reports_url_and_accepts_connections(broker):
    assert broker.running
    assert broker.port > 0
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    with socket.create_connection((broker.host, broker.port), timeout=2):
        pass


@pytest.mark.parametrize("qos", [0, 1])
def test_publish_subscribe(broker, qos):
    sub = _client(broker, f"sub-{qos}")
    pub = _client(broker, f"pub-{qos}")
    try:
        _subscribe(sub, f"t/{qos}/#", qos)
        info = pub.publish(f"t/{qos}/a", b"\x00payload", qos=qos)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
        assert sub.inbox.get(timeout=5) == (f"t/{qos}/a", b"\x00payload", qos, False)
    finally:
        _close(sub, pub)


def test_retained_message_reaches_late_subscriber_and_can_be_cleared(broker):
    pub = _client(broker, "pub-retained")
    try:
        pub.publish("r/status", b"online", qos=1, retain=True).wait_for_publish(timeout=5)
        late = _client(broker, "late")
        _subscribe(late, "r/status", 1)
        assert late.inbox.get(timeout=5) == ("r/status", b"online", 1, True)
        _close(late)
        pub.publish("r/status", b"", qos=1, retain=True).wait_for_publish(timeout=5)  # clears it
        later = _client(broker, "later")
        _subscribe(later, "r/status", 1)
        with pytest.raises(queue.Empty):
            later.inbox.get(timeout=0.5)
        _close(later)
    finally:
        _close(pub)


def test_last_will_on_abrupt_disconnect(broker):
    watcher = _client(broker, "watcher")
    doomed = _client(broker, "doomed", will=("w/status", b"offline"))
    try:
        _subscribe(watcher, "w/status", 1)
        doomed.loop_stop()
        doomed.socket().close()  # no DISCONNECT packet: the broker must send the will
        topic, payload, _qos, _retain = watcher.inbox.get(timeout=10)
        assert (topic, payload) == ("w/status", b"offline")
    finally:
        _close(watcher)


def test_clean_disconnect_sends_no_will(broker):
    watcher = _client(broker, "watcher2")
    polite = _client(broker, "polite", will=("w2/status", b"offline"))
    try:
        _subscribe(watcher, "w2/status", 1)
        _close(polite)
        try:
            unexpected = watcher.inbox.get(timeout=0.7)
        except queue.Empty:
            unexpected = None
        assert unexpected is None
    finally:
        _close(watcher)


def test_port_in_use_is_a_clear_error(broker):
    with pytest.raises(BrokerStartError, match=r"already in use.*--broker"):
        EmbeddedBroker("127.0.0.1", broker.port).start()


def test_stop_closes_the_port_and_is_idempotent():
    embedded = EmbeddedBroker("127.0.0.1", 0).start()
    port = embedded.port
    embedded.stop()
    embedded.stop()
    assert not embedded.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_stop_with_connected_clients_is_quick():
    with EmbeddedBroker("127.0.0.1", 0) as embedded:
        client = _client(embedded, "still-here")
        started = time.monotonic()
    assert time.monotonic() - started < 5
    client.loop_stop()


def test_retained_messages_go_only_to_matching_subscribers(broker):
    """amqtt 0.12 replays retained messages for every client's filters on CONNECT."""
    pub = _client(broker, "pub-only-mine")
    other = _client(broker, "other-subscriber")
    try:
        _subscribe(other, "theirs/#", 1)
        pub.publish("theirs/state", b"x", qos=1, retain=True).wait_for_publish(timeout=5)
        assert other.inbox.get(timeout=5)[0] == "theirs/state"
        newcomer = _client(broker, "newcomer")
        _subscribe(newcomer, "mine/#", 1)
        with pytest.raises(queue.Empty):
            newcomer.inbox.get(timeout=0.5)
        _close(newcomer)
    finally:
        _close(pub, other)


def _unclosed_sockets_collected() -> list[str]:
    """What a garbage collection now reports as unclosed sockets (ResourceWarning texts)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_port_probe_leaves_no_open_socket(broker):
    # Sockets an earlier test left for the collector are not this test's business (one such
    # pair, both ends in-process, made this test fail once in CI): collect them first, and
    # afterwards look only for sockets on the broker's own port.
    _unclosed_sockets_collected()
    with socket.create_connection((broker.host, broker.port), timeout=2):
        pass
    time.sleep(0.3)  # let the broker notice the EOF
    ours = [text for text in _unclosed_sockets_collected() if f"'{broker.host}', {broker.port})" in text]
    assert not ours, ours  # an unclosed server socket for the probe's connection


def test_mqtt5_connect_is_refused_so_clients_can_fall_back(broker):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="v5", protocol=mqtt.MQTTv5)
    results = queue.Queue()
    client.on_connect = lambda _c, _u, _f, reason, _p: results.put(reason)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        reason = results.get(timeout=5)
        assert reason.is_failure and "protocol version" in str(reason).lower()
    finally:
        client.loop_stop()
        client.socket() and client.socket().close()
