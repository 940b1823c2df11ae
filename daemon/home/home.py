"""The service's side of dashboards and watches: Home Assistant discovery (published,
updated, removed), watch definitions arriving on `<root>/watches/<name>/config`, and
plain-text questions from a dashboard's text entity on `<root>/dashboard/<camera>/ask`.

Runs on paho's thread like every message handler: decode, hand over, publish refusals.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from daemon.home.discovery import discovery_messages, removal, removal_of
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
        # where an older vlmd spelt an entity's id otherwise (names with '_' or '.'): emptied
        legacy = sorted({m.legacy_topic for m in messages if m.legacy_topic and m.legacy_topic not in current})
        self._published = messages if ha.enabled else []
        for message in removal(gone) + removal_of(legacy) + (messages if ha.enabled else removal(messages)):
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
        """Discovery first, then (a deletion) the empty retained state: Home Assistant removes
        the entity before its state topic empties, so no template meets an empty payload. The
        watch has left the registry already, so a run of it still going publishes nothing
        after the empty state (WatchRegistry.publish_if_current)."""
        service = self.service
        log.info("watch " + ("deleted" if change.deleted else "defined"), watch=change.name)
        if service.client is not None and service.client.connected:
            self.publish_discovery()
        if change.deleted and service.responder is not None:  # its retained state goes too
            service.responder.clear_watch(change.name)
        service.inbox.wake()

    def on_dashboard_ask(self, camera: str, message: Incoming) -> None:
        """A plain-text question about `camera`; its final goes to
        <root>/dashboard/<camera>/answer (the answer sensor's state), retained for a camera
        of the config file (a bounded set: the ones discovery offers a text entity for), not
        retained for one that only sent frames, and never published for a camera that is
        neither: that refusal goes to <root>/error, so invented names leave nothing behind."""
        service = self.service
        try:
            text = codec.decode_text_question(message.payload, service.config.requests.max_text_chars)
        except ProtocolError as exc:
            service.responder.error(exc.code, exc.message, message.topic)
            return
        configured = camera in service.config.cameras
        if not configured and not service.inbox.has_camera(camera):
            service.responder.error("unknown_camera", f"camera {camera!r} is not configured and has sent no frame",
                                    message.topic)
            return
        request = payloads.AskRequest(id=payloads.new_request_id(), text=text, camera=camera, stream=False)
        # refused (no frame) on the answer topic itself, like any final
        service.submit_ask(request, Reply(service.topics.dashboard_answer(camera), None, stream=False,
                                          retain=configured))


def _version() -> str | None:
    try:
        return importlib.metadata.version("vlmd")
    except importlib.metadata.PackageNotFoundError:
        return None
