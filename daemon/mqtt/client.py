"""The paho-mqtt 2.x client wrapper: connect, reconnect, subscribe in on_connect, publish.

Contract:
- `start()` returns at once; paho's network thread connects and reconnects with
  exponential backoff (`reconnect_min_s` .. `reconnect_max_s`).
- Every successful CONNACK calls `on_connected()` (the service subscribes and
  publishes `online` there, so both survive a reconnect). A refused CONNACK is logged
  with its reason and is not a connection.
- The last will is `offline` on the status topic, retained.
- `persistent_session`: MQTT 3.1.1 clean_session=False, MQTT 5 clean_start=False plus
  a session expiry, so QoS 1 questions sent while vlmd was away are delivered.
- Callbacks never block and never raise into paho: handler errors are logged.
- Manual acknowledgements (paho `manual_ack=True`): a QoS 1 message is acknowledged
  (PUBACK) only after `on_message` returned, i.e. after the service journaled it, and
  also when the handler failed (an unacknowledged message would hold one of the
  broker's in-flight slots for this session until a reconnect).
- `publish(..., on_delivered=fn)` calls `fn()` once the broker acknowledged that QoS 1
  message (on paho's thread or the publishing one; never twice, never for a dropped
  message).
- `protocol="auto"` probes the broker with a bare MQTT 5 connection and uses 3.1.1 when
  the broker refuses it or hangs up (the embedded amqtt broker speaks 3.1.1 only); a
  broker that is not up yet is probed again with backoff before the real connection.
- Every failed attempt is logged with its reason (refused, unresolvable, timed out, the
  CONNACK's reason code) and the delay before the next one. Failures a retry cannot fix
  end the attempts and set `fatal_error` (the service then exits 78): a TLS failure
  (certificate not trusted, wrong host, handshake refused, TLS to a plain port) and a
  CONNACK refusing who we are (bad user name or password, not authorised, banned,
  client id not valid, protocol version).
- Two clients with one client id take the session from each other whenever one
  connects: after `TAKEOVER_COUNT` connections the broker ended (MQTT 5 "Session taken
  over", or the socket closed, as 3.1.1 and some brokers' MQTT 5 do) and at once let us
  back in, within `TAKEOVER_WINDOW_S`, a warning says so, naming the client id.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.mqtt.connection import (FATAL_REFUSALS, VERSION_REFUSALS, ClientSettings, Incoming, describe_connect_error,
                                    is_tls_failure, no_delay, parse_broker_url)
from daemon.logs import get_logger

log = get_logger("vlmd.mqtt")

SESSION_EXPIRY_S = 3600  # MQTT 5: how long the broker keeps our session (and queued asks) while we are away
PROBE_TIMEOUT_S = 5.0
TAKEOVER_COUNT, TAKEOVER_WINDOW_S = 3, 300.0


class MqttClient:
    """One broker connection; thread-safe `publish`, callbacks run on paho's thread."""

    def __init__(
        self,
        settings: ClientSettings,
        will: tuple[str, bytes, int, bool],
        on_message: Callable[[Incoming], None],
        on_connected: Callable[[], None],
    ):
        self.settings = settings
        self.address = parse_broker_url(settings.url)
        self._will = will
        self._on_message = on_message
        self._on_connected = on_connected
        self._connected = threading.Event()
        self.num_connects = 0
        self.session_present = False  # as the last CONNACK said
        self.protocol = settings.protocol
        self._client: paho.Client | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a late connect from the probe thread vs stop()
        self.fatal_error: str | None = None  # set once: why connecting can never work
        self._num_failures = 0  # connection attempts failed since the last CONNACK
        self._connected_at = 0.0
        self._takeovers: deque[float] = deque(maxlen=TAKEOVER_COUNT)
        self._takeover_warned_at = -TAKEOVER_WINDOW_S
        self._attempt_reported = False  # this connection attempt's failure was logged already
        self._takeover_reason: str | None = None  # why the broker last ended a connection of ours
        self._socket_error: OSError | None = None  # what paho's read or write last failed with
        # Delivery callbacks: held across client.publish() and the registration of its mid,
        # so an acknowledgement that arrives in between is matched by the publisher itself;
        # paho's thread only ever tries it (it calls on_publish holding paho's own lock).
        self._delivery_lock = threading.Lock()
        self._awaiting: dict[int, Callable[[], None]] = {}
        self._acknowledged: deque[int] = deque()  # mids paho reported, not yet matched

    @property
    def is_v5(self) -> bool:
        return self.protocol == "5"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> None:
        """Connect in the background; with "auto", probe the broker's protocol first."""
        if self.protocol == "auto":
            probed = self._probe_v5()
            if probed is None:  # not up yet: keep probing on a helper thread, then connect
                threading.Thread(target=self._probe_then_connect, name="vlmd-mqtt-probe", daemon=True).start()
                return
            self._choose(probed)
        self._connect(self._build(self.protocol))

    def _choose(self, v5: bool) -> None:
        self.protocol = "5" if v5 else "3.1.1"
        log.info("mqtt protocol chosen", protocol=self.protocol)

    def _probe_then_connect(self) -> None:
        delay = self.settings.reconnect_min_s
        while not self._stopping.wait(delay) and self.fatal_error is None:
            probed = self._probe_v5(retry_in_s=min(2 * delay, self.settings.reconnect_max_s))
            if probed is not None:
                with self._lock:
                    if not self._stopping.is_set():
                        self._choose(probed)
                        self._connect(self._build(self.protocol))
                return
            delay = min(2 * delay, self.settings.reconnect_max_s)

    def _connect(self, client: paho.Client) -> None:
        self._client = client
        kwargs = {}
        if self.is_v5:
            kwargs["clean_start"] = not self.settings.persistent_session
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S if self.settings.persistent_session else 0
            kwargs["properties"] = props
        client.connect_async(self.address.host, self.address.port, self.settings.keepalive_s, **kwargs)
        client.loop_start()

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, correlation_data: bytes | None = None,
        on_delivered: Callable[[], None] | None = None,
    ) -> paho.MQTTMessageInfo | None:
        client = self._client
        if client is None:  # not started, or stopped: a late final during shutdown
            log.info("not connected, message dropped", topic=topic)
            return None
        properties = None
        if self.is_v5 and correlation_data is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation_data
        with self._delivery_lock:
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            queued = info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN)  # NO_CONN: sent on reconnect
            if on_delivered is not None and qos > 0 and queued:
                self._awaiting[info.mid] = on_delivered
            delivered = self._match_acknowledged()
        if not queued:
            log.warning("publish failed", topic=topic, rc=paho.error_string(info.rc))
        _call_each(delivered)
        return info

    def _match_acknowledged(self) -> list[Callable[[], None]]:
        """Callbacks of the acknowledged mids (call with `_delivery_lock` held)."""
        delivered = []
        while self._acknowledged:
            callback = self._awaiting.pop(self._acknowledged.popleft(), None)
            if callback is not None:  # None: QoS 0, or a message nobody waits for
                delivered.append(callback)
        return delivered

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acknowledged.append(mid)
        if self._delivery_lock.acquire(blocking=False):  # else its holder matches it before releasing
            try:
                delivered = self._match_acknowledged()
            finally:
                self._delivery_lock.release()
            _call_each(delivered)

    def subscribe(self, subscriptions: list[tuple[str, int]]) -> None:
        client = self._client
        if client is not None and subscriptions:
            client.subscribe(subscriptions)

    def unsubscribe(self, topic_filters: list[str]) -> None:
        client = self._client
        if client is not None and topic_filters:
            client.unsubscribe(topic_filters)

    def stop(self, last: tuple[str, bytes, int, bool] | None = None, timeout: float = 5.0) -> None:
        """Publish `last` (the `stopped` status), wait for it, disconnect cleanly (no will).

        `publish` keeps working until the disconnect: a question paho delivers (and
        acknowledges) meanwhile still gets its `shutdown` final out, ahead of the
        DISCONNECT; one the broker sends later is kept for the persistent session.
        """
        with self._lock:  # after this, the probe thread (if any) connects nothing
            self._stopping.set()
            client = self._client
        if client is None:
            return
        if last is not None and self.connected:
            info = client.publish(last[0], last[1], qos=last[2], retain=last[3])
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish the final status", error=str(exc))
        self._connected.clear()  # a disconnect we asked for is not worth a warning
        client.disconnect()
        client.loop_stop()
        with self._lock:
            self._client = None

    # -- paho wiring ------------------------------------------------------------------

    def _build(self, protocol: str) -> paho.Client:
        version = paho.MQTTv5 if protocol == "5" else paho.MQTTv311
        session_kwargs = {} if protocol == "5" else {"clean_session": not self.settings.persistent_session}
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.settings.client_id, protocol=version, manual_ack=True,
            **session_kwargs,
        )
        if self.settings.username:
            client.username_pw_set(self.settings.username, self.settings.password or None)
        if self.address.tls:
            tls = self.settings.tls
            client.tls_set(ca_certs=tls.ca_file or None, certfile=tls.cert_file or None, keyfile=tls.key_file or None)
            client.tls_insecure_set(tls.insecure)
        topic, payload, qos, retain = self._will
        client.will_set(topic, payload, qos=qos, retain=retain)
        client.reconnect_delay_set(
            max(1, round(self.settings.reconnect_min_s)), max(1, round(self.settings.reconnect_max_s))
        )
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_socket_open = self._socket_opened
        client.enable_logger(_SocketErrorRecorder(self))  # only its errors: debug lines stay unformatted
        return client

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if reason_code.is_failure:
                self._connected.clear()
                self._attempt_reported = True
                reason = str(reason_code)
                if reason in FATAL_REFUSALS:
                    self._give_up(client, f"the broker refused the connection: {reason}")
                else:
                    log.error("broker refused the connection", reason=reason, broker=self.settings.url,
                              retry_in_s=self._next_delay())
                return
            self.num_connects += 1
            if self._takeover_reason is not None and self._num_failures == 0:
                self._note_takeover(self._takeover_reason)
            self._takeover_reason = None
            self._num_failures = 0
            self._connected_at = time.monotonic()
            self.session_present = bool(flags.session_present)
            self._connected.set()
            log.info("connected", broker=self.settings.url, protocol=self.protocol, session_present=flags.session_present)
            self._on_connected()
        except Exception:
            log.exception("on_connect handler failed")

    def _handle_connect_fail(self, client, userdata) -> None:
        """paho calls this inside its `except OSError:` around the connection attempt, so
        the exception being handled is the reason (paho passes none)."""
        try:
            self._attempt_reported = True
            error = sys.exc_info()[1]
            reason = describe_connect_error(error, self.address.host)
            if is_tls_failure(error):
                self._give_up(client, f"TLS with the broker failed: {reason}")
                return
            log.warning("cannot connect to the broker", reason=reason, broker=self.settings.url,
                        retry_in_s=self._next_delay())
        except Exception:
            log.exception("on_connect_fail handler failed")

    def _next_delay(self) -> float:
        """The wait paho takes before its next attempt (its own doubling backoff)."""
        self._num_failures += 1
        first = max(1, round(self.settings.reconnect_min_s))
        return float(min(first * 2 ** (self._num_failures - 1), max(1, round(self.settings.reconnect_max_s))))

    def _give_up(self, client, reason: str) -> None:
        self.fatal_error = reason
        log.error("cannot connect to the broker, not retrying: a restart cannot fix this", reason=reason,
                  broker=self.settings.url)
        if client is not None:
            client.disconnect()  # ends paho's reconnect loop (no socket: state DISCONNECTED)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if not was_connected:
            self._closed_before_connack()
            return
        log.warning("disconnected", reason=str(reason_code))
        # The broker ended it (not our own DISCONNECT): a takeover if the next attempt gets
        # straight back in (a restarting broker refuses it first), see _handle_connect.
        self._takeover_reason = str(reason_code) if reason_code.is_failure else None

    def _socket_opened(self, client, userdata, sock) -> None:
        self._attempt_reported, self._socket_error = False, None  # a new attempt
        no_delay(client, userdata, sock)

    def _closed_before_connack(self) -> None:
        """The connection ended before any CONNACK: e.g. a TLS 1.3 broker refusing our client
        certificate after the handshake (an alert on the first read)."""
        if self._attempt_reported or self.fatal_error is not None or self._stopping.is_set():
            return
        self._attempt_reported = True
        error = self._socket_error
        reason = describe_connect_error(error, self.address.host) if error else "closed without a reason"
        if is_tls_failure(error):
            self._give_up(self._client, f"TLS with the broker failed: {reason}")
        else:
            log.warning("the broker closed the connection before accepting it", reason=reason,
                        broker=self.settings.url, retry_in_s=self._next_delay())

    def _note_takeover(self, reason: str) -> None:
        """A takeover: the broker ended our connection (a DISCONNECT "Session taken over" on
        newer MQTT 5 brokers, a closed socket on 3.1.1 and mosquitto 2.0.11) and let us
        straight back in, which a broker restarting does not. Several within the window
        are a fight over the client id, said once per window."""
        now = time.monotonic()
        self._takeovers.append(now)
        recent = len(self._takeovers) == TAKEOVER_COUNT and now - self._takeovers[0] <= TAKEOVER_WINDOW_S
        if not recent or now - self._takeover_warned_at < TAKEOVER_WINDOW_S:
            return
        self._takeover_warned_at = now
        log.warning(f"the broker ended our connection {TAKEOVER_COUNT} times within {TAKEOVER_WINDOW_S:.0f} s:"
                    " another client probably uses the same client id (two boards with one device_id?);"
                    " give each board its own device_id or mqtt.client_id", client_id=self.settings.client_id,
                    broker=self.settings.url, last_reason=reason)

    def _handle_message(self, client, userdata, message) -> None:
        try:
            props = getattr(message, "properties", None)
            response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
            correlation = getattr(props, "CorrelationData", None) if props is not None else None
            self._on_message(Incoming(message.topic, bytes(message.payload), response_topic or None, correlation,
                                      bool(message.dup)))
        except Exception:
            log.exception("message handler failed", topic=getattr(message, "topic", "?"))
        finally:
            if message.qos > 0:  # after the handler (the journal write): a crash before this is redelivered
                client.ack(message.mid, message.qos)

    def _probe_v5(self, retry_in_s: float | None = None) -> bool | None:
        """Connect once with MQTT 5: True if the broker accepts it, False if it refuses the
        version, None if it cannot be reached yet or never will (TLS: `fatal_error` set)."""
        result: dict[str, bool] = {}
        done = threading.Event()
        probe = paho.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=paho.MQTTv5)
        if self.settings.username:
            probe.username_pw_set(self.settings.username, self.settings.password or None)
        if self.address.tls:
            tls = self.settings.tls
            probe.tls_set(ca_certs=tls.ca_file or None, certfile=tls.cert_file or None, keyfile=tls.key_file or None)
            probe.tls_insecure_set(tls.insecure)

        def on_connect(client, userdata, flags, reason_code, properties):
            result["v5"] = not reason_code.is_failure or reason_code.getName() not in VERSION_REFUSALS
            done.set()

        def on_disconnect(client, userdata, flags, reason_code, properties):
            result.setdefault("v5", False)  # hung up before any CONNACK: an MQTT 3.1.1-only broker
            done.set()

        probe.on_connect, probe.on_disconnect = on_connect, on_disconnect
        try:
            probe.connect(self.address.host, self.address.port, keepalive=10)
        except OSError as exc:
            reason = describe_connect_error(exc, self.address.host)
            if is_tls_failure(exc):
                self._give_up(None, f"TLS with the broker failed: {reason}")
            else:
                log.warning("broker not reachable yet; will probe its protocol again", reason=reason,
                            broker=self.settings.url, retry_in_s=retry_in_s or self.settings.reconnect_min_s)
            return None
        probe.loop_start()
        done.wait(PROBE_TIMEOUT_S)
        probe.disconnect()
        probe.loop_stop()
        return result.get("v5", False)


class _SocketErrorRecorder(logging.Logger):
    """paho's logger, kept apart from the process's logging: it remembers the OSError that
    paho logs a failed socket read or write with (it logs inside its `except`, so the
    exception is at hand) and drops everything else."""

    def __init__(self, owner: MqttClient):
        super().__init__("vlmd.mqtt.paho", logging.ERROR)
        self.propagate = False
        self._owner = owner

    def handle(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            self._owner._socket_error = error


def _call_each(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # a journal that cannot write must not break paho's thread
            log.exception("delivery callback failed")
