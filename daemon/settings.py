"""What each part of the running daemon is built with, read from the config.

Plain functions from `Config` to the parts' own settings types, so the service wires
parts together without spelling out their fields: topics, caption policies, worker
limits, ask limits and the MQTT client settings.
"""

from __future__ import annotations

from daemon.config import CameraConfig, Config
from daemon.mqtt.connection import ClientSettings, TlsSettings
from daemon.scheduler import CaptionPolicy
from daemon.worker import WorkerLimits
from protocol.payloads import AskLimits
from protocol.topics import Topics


def topics(config: Config) -> Topics:
    return Topics(config.root, frame_sources(config), config.fleet.ask_topic if config.fleet.enabled else None)


def frame_sources(config: Config) -> dict[str, str]:
    """{extra source topic: camera} of the cameras that name one."""
    return {c.topic: name for name, c in config.cameras.items() if c.topic}


def caption_policies(config: Config) -> dict[str, CaptionPolicy]:
    return {name: _caption_policy(camera) for name, camera in config.cameras.items()}


def _caption_policy(camera: CameraConfig) -> CaptionPolicy:
    return CaptionPolicy(camera.caption, camera.interval_s, camera.prompt, camera.max_tokens, camera.min_change)


def worker_limits(config: Config) -> WorkerLimits:
    return WorkerLimits(
        default_max_tokens=config.requests.default_max_tokens, frame_max_bytes=config.frames.max_bytes,
        frame_max_pixels=config.frames.max_pixels, max_consecutive_failures=config.shutdown.max_consecutive_failures,
    )


def ask_limits(config: Config) -> AskLimits:
    requests = config.requests
    return AskLimits(max_text_chars=requests.max_text_chars, max_frames=min(requests.max_frames, config.frames.history),
                     max_tokens=requests.max_tokens_limit)


def client_settings(config: Config, url: str, protocol: str) -> ClientSettings:
    m = config.mqtt
    tls = m.tls
    return ClientSettings(
        url=url, client_id=m.client_id, username=m.username, password=m.password_value() or "",
        keepalive_s=m.keepalive_s, protocol=protocol, persistent_session=m.persistent_session,
        reconnect_min_s=m.reconnect_min_s, reconnect_max_s=m.reconnect_max_s,
        tls=TlsSettings(str(tls.ca_file or ""), str(tls.cert_file or ""), str(tls.key_file or ""), tls.insecure),
    )
