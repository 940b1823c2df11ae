"""The service's side of dashboards and watches: Home Assistant discovery (published,
updated, removed), watch definitions arriving on `<root>/watches/<name>/config`, and
plain-text questions from a dashboard's text entity on `<root>/dashboard/<camera>/ask`.

Runs on paho's thread like every message handler: decode, hand over, publish refusals.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from daemon.home.discovery import discovery_messages, removal
from daemon.logs import get_logger
from daemon.mqtt.connection import Incoming
from daemon.home.watches import Change
from protocol import codec, payloads
from protocol.codec import ProtocolError
from protocol.requests import Reply

log = get_logger("vlmd.home")


class Home:
    """Discovery, watch configs and dashboard questions for one `daemon.service.Service`."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self._published: list = []  # the discovery configs published last (to remove what went away)

    def publish_discovery(self) -> None:
        """Every entity's config, and empty configs for those that went away; with discovery
        disabled, empty configs for all of them (which removes them from Home Assistant)."""
        service = self.service
        config, ha = service.config, service.config.home_assistant
        captioned = [name for name, camera in config.cameras.items() if camera.caption]
        messages = discovery_messages(
            service.topics, config.device_id, captioned, ha.discovery_prefix, sw_version=_version(),
            ask_cameras=sorted(config.cameras), watches=[(w.name, w.definition.format) for w in service.watches.watches()],
        )
        current = {message.topic for message in messages}
        gone = [message for message in self._published if message.topic not in current]
        self._published = messages if ha.enabled else []
        for message in removal(gone) + (messages if ha.enabled else removal(messages)):
            service.client.publish(message.topic, message.payload, 1, True)

    def on_watch_config(self, name: str, message: Incoming) -> None:
        try:
            change = self.service.watches.apply(name, message.payload)
        except ProtocolError as exc:
            log.info("watch config refused", watch=name, code=exc.code, message=exc.message)
            self.service.responder.error(exc.code, exc.message, message.topic)
            return
        if change is not None:
            self.watch_changed(change)

    def watch_changed(self, change: Change) -> None:
        service = self.service
        log.info("watch " + ("deleted" if change.deleted else "defined"), watch=change.name)
        if change.deleted and service.responder is not None:  # its retained state goes too
            service.responder.clear_watch(change.name)
        if service.client is not None and service.client.connected:
            self.publish_discovery()
        service.inbox.wake()

    def on_dashboard_ask(self, camera: str, message: Incoming) -> None:
        """A plain-text question about `camera`; its final is retained on
        <root>/dashboard/<camera>/answer (the answer sensor's state)."""
        service = self.service
        try:
            text = codec.decode_text_question(message.payload, service.config.requests.max_text_chars)
        except ProtocolError as exc:
            service.responder.error(exc.code, exc.message, message.topic)
            return
        request = payloads.AskRequest(id=payloads.new_request_id(), text=text, camera=camera, stream=False)
        # refused (no frame, unknown camera) on the answer topic itself, like any final
        service.submit_ask(request, Reply(service.topics.dashboard_answer(camera), None, stream=False, retain=True))

def _version() -> str | None:
    try:
        return importlib.metadata.version("vlmd")
    except importlib.metadata.PackageNotFoundError:
        return None
