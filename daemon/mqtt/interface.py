"""The MQTT interface: where questions, frames, cancels, watch definitions and dashboard
questions come in over MQTT, and the connection's duties (subscriptions, `online`, the
last will, discovery, stats) are kept.

It owns the client (and the embedded broker when no broker is configured), and only
translates: each message is decoded by protocol/ and handed to the service core
(`Service.submit_ask`, `put_frame`, `cancel`, `refuse`) or to Home Assistant's side
(daemon.home.home.Home). Replies leave through the service's Responder, whose publisher
is this interface's client. Handlers run on paho's network thread: they never block and
never raise (MqttClient logs what escapes).

Knows nothing of the engine, the scheduler or the journal's file.
"""

from __future__ import annotations

from typing import Any

from daemon.config import Config
from daemon.home.discovery import birth_topic
from daemon.logs import get_logger
from daemon.mqtt.broker import EmbeddedBroker
from daemon.mqtt.client import MqttClient
from daemon.mqtt.connection import Incoming
from daemon import settings
from protocol import codec, payloads
from protocol.requests import Refused, receive_ask, receive_cancel
from protocol.topics import SPEC

log = get_logger("vlmd.mqtt")


class MqttInterface:
    """MQTT for one `daemon.service.Service`: `open()` (broker and client built, not yet
    connected), `start()` (connect in the background), `stop()`."""

    name = "mqtt"

    def __init__(self, service: Any) -> None:
        self.service = service
        self.broker: EmbeddedBroker | None = None  # the embedded broker, when one was started
        self.client: MqttClient | None = None

    # -- lifecycle --------------------------------------------------------------------

    def open(self) -> str:
        """Start the embedded broker when none is configured and build the client; returns the broker URL."""
        config: Config = self.service.config
        url, protocol = self._broker_url(config)
        topics = self.service.topics
        self.client = MqttClient(
            settings.client_settings(config, url, protocol),
            will=(topics.status(), payloads.STATUS_OFFLINE.encode(), SPEC["status"].qos, SPEC["status"].retain),
            on_message=self.on_message,
            on_connected=self.on_connected,
        )
        return url

    def start(self) -> None:
        assert self.client is not None, "open() first"
        self.client.start()

    def stop(self) -> None:
        """Publish `stopped` (retained, replacing the last will's `offline`), disconnect, stop the broker."""
        if self.client is not None:
            spec = SPEC["status"]
            self.client.stop(last=(self.service.topics.status(), payloads.STATUS_STOPPED.encode(), spec.qos, spec.retain))
        if self.broker is not None:
            self.broker.stop()

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.connected

    def _broker_url(self, config: Config) -> tuple[str, str]:
        if config.mqtt.broker:
            return config.mqtt.broker, config.mqtt.protocol
        embedded = config.embedded_broker
        self.broker = EmbeddedBroker(embedded.host, embedded.port).start()
        log.info("embedded broker started", url=self.broker.url)
        return self.broker.url, "3.1.1"  # amqtt speaks MQTT 3.1.1 only

    # -- what the service asks of the connection ---------------------------------------

    def publish_stats(self, message: payloads.Stats) -> None:
        spec = SPEC["stats"]
        self.client.publish(self.service.topics.stats(), codec.encode(message), spec.qos, spec.retain)

    def resubscribe_frames(self, old_sources: set[str], new_sources: set[str]) -> None:
        """After a reload: frame source topics that went away and the new ones."""
        if self.client is None:
            return
        self.client.unsubscribe(sorted(old_sources - new_sources))
        self.client.subscribe([(topic, SPEC["frame"].qos) for topic in sorted(new_sources - old_sources)])
        if self.client.connected:
            self.service.home.publish_discovery()

    # -- paho thread: handlers ---------------------------------------------------------

    def on_connected(self) -> None:
        service, config = self.service, self.service.config
        service.settle_recovery()  # before any message of this connection is handled
        subscriptions = service.topics.subscriptions()
        if config.fleet.enabled:
            if self.client.is_v5:
                subscriptions.append(service.topics.fleet_subscription(config.fleet.group))
            else:
                log.warning("fleet mode needs MQTT 5 shared subscriptions; the broker speaks 3.1.1")
        if config.home_assistant.enabled:
            subscriptions.append((birth_topic(config.home_assistant.discovery_prefix), 1))
        self.client.subscribe(subscriptions)
        spec = SPEC["status"]
        self.client.publish(service.topics.status(), payloads.STATUS_ONLINE.encode(), spec.qos, spec.retain)
        service.home.publish_discovery()
        service.stats_due_now()  # fresh stats soon after every (re)connect

    def on_message(self, message: Incoming) -> None:
        service, config = self.service, self.service.config
        if config.home_assistant.enabled and message.topic == birth_topic(config.home_assistant.discovery_prefix):
            if message.payload == b"online":
                service.home.publish_discovery()
            return
        route = service.topics.parse(message.topic)
        if route is None:
            return
        if route.kind == "frame":
            service.put_frame(route.camera, message.payload)
        elif route.kind in ("ask", "fleet_ask"):
            self._on_ask(message)
        elif route.kind == "cancel":
            self._on_cancel(message)
        elif route.kind == "watch_config":
            service.home.on_watch_config(route.name, message)
        elif route.kind == "dashboard_ask":
            service.home.on_dashboard_ask(route.camera, message)

    def _on_ask(self, message: Incoming) -> None:
        """Decode (protocol.requests validates and resolves the reply path), then the service
        journals and enqueues. The PUBACK goes out after this returns (MqttClient), so a
        crash before the journal write makes the broker deliver the question again."""
        service = self.service
        received = receive_ask(message.payload, service.topics, service.config.requests.max_payload_bytes,
                               service.limits, message.response_topic, message.correlation_data)
        if isinstance(received, Refused):
            service.refuse(received, message.topic)
            return
        service.submit_ask(received.request, received.reply, redelivered=message.redelivered, topic=message.topic)

    def _on_cancel(self, message: Incoming) -> None:
        request = receive_cancel(message.payload)
        if isinstance(request, Refused):
            self.service.responder.error(request.code, request.message, message.topic)
            return
        # A cancel names the request's reply path as the ask did (reply_to, else the response
        # topic, else the default answer topic): another client's request of the same id is
        # never reached (#21.1).
        reply_topic = request.reply_to or message.response_topic or self.service.topics.answer(request.id)
        self.service.cancel(request.id, reply_topic)
