"""The config's shape: every section as a frozen pydantic model (`extra="forbid"`, strict
types, a description on every field) and `Config`, the whole of it.

`[http]` (the OpenAI-compatible API) is off while `listen` is empty; listening beyond
loopback without an API keys file is refused by load.py, which resolves the file.

`Config()` alone gives the defaults with `device_id`, `root` and `mqtt.client_id` filled
in. Knows nothing of files or the environment: daemon/config/load.py builds a Config from
those, daemon/config/sources.py reads them.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from daemon.config.identity import default_device_id
from daemon.scheduler import DEFAULT_MIN_CHANGE
from protocol.topics import check_camera, check_publish_topic, check_root, is_valid_camera
from protocol.watches import DEFAULT_MAX_AGE_S, WatchDefinition, WatchName

EX_CONFIG = 78  # sysexits.h: configuration error; the unit does not restart on it
CREDENTIAL_NAME = "mqtt_password"
HTTP_KEYS_CREDENTIAL = "http_api_keys"
_GROUP_BAD = re.compile(r"[/+#\x00]")


class BrokerAddress(NamedTuple):
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host[:1883]` or `mqtts://host[:8883]` -> BrokerAddress; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"broker URL must start with mqtt:// or mqtts://, got {url!r}")
    if parts.username or parts.password:
        raise ValueError("put credentials in mqtt.username / mqtt.password, not in the broker URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL takes only a host and a port, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"broker URL has a bad port: {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"broker URL has no host: {url!r}")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(parts.hostname, port or (8883 if tls else 1883), tls)


def _optional_path(value: Any) -> Any:
    return None if value == "" else value


class _Section(BaseModel):
    # strict: "30" is no integer and "yes" no bool (environment values are parsed by
    # their field's type before validation, daemon/config/sources.py env_layer); paths
    # alone take text (TOML has no path type), marked strict=False where declared.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


CameraName = Annotated[str, AfterValidator(check_camera)]  # a dict key: checked alongside the values' errors


class TlsConfig(_Section):
    ca_file: Path | None = Field(None, strict=False, description="CA bundle to verify the broker (PEM); empty = system store")
    cert_file: Path | None = Field(None, strict=False, description="client certificate (PEM) for mutual TLS")
    key_file: Path | None = Field(None, strict=False, description="client private key (PEM); its contents are never logged")
    insecure: bool = Field(False, description="skip broker host name verification (testing only)")

    _empty_is_none = field_validator("ca_file", "cert_file", "key_file", mode="before")(_optional_path)

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsConfig:
        if (self.key_file is None) != (self.cert_file is None):
            raise ValueError("cert_file and key_file go together")
        return self

    @property
    def configured(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file, self.insecure))


class MqttConfig(_Section):
    broker: str = Field("", description="mqtt://host:port or mqtts://host:port; empty = start the embedded broker")
    client_id: str = Field("", description='MQTT client id; empty = "vlmd-<device_id>"')
    username: str = Field("", description="user name for the broker; empty = anonymous")
    password: SecretStr = Field(SecretStr(""), description="password (prefer password_file); never logged")
    password_file: Path | None = Field(None, strict=False, description="file holding the password, e.g. ${CREDENTIALS_DIRECTORY}/mqtt_password")
    keepalive_s: int = Field(30, ge=5, le=65535, description="MQTT keepalive in seconds")
    protocol: Literal["auto", "3.1.1", "5"] = Field("auto", description='"auto" tries MQTT 5 then falls back to 3.1.1')
    persistent_session: bool = Field(True, description="keep the session across reconnects so QoS 1 asks survive")
    reconnect_min_s: float = Field(1.0, gt=0, description="first reconnect delay (doubles up to reconnect_max_s)")
    reconnect_max_s: float = Field(60.0, gt=0, description="longest reconnect delay")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings (mqtts:// brokers only)")

    _empty_is_none = field_validator("password_file", mode="before")(_optional_path)

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        if value:
            parse_broker_url(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.password.get_secret_value() and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if self.tls.configured and not (self.broker_address and self.broker_address.tls):
            raise ValueError("tls settings need an mqtts:// broker")
        return self

    @property
    def broker_address(self) -> BrokerAddress | None:
        """The parsed broker URL, or None for the embedded broker."""
        return parse_broker_url(self.broker) if self.broker else None

    def password_value(self) -> str | None:
        """The plain password for paho's username_pw_set, or None when unset."""
        return self.password.get_secret_value() or None


class HttpConfig(_Section):
    listen: str = Field("", description='"HOST:PORT" for the OpenAI-compatible API (port 0 = any free port); empty = off')
    api_keys_file: Path | None = Field(None, strict=False, description="file of API keys, one a line (e.g. ${CREDENTIALS_DIRECTORY}/http_api_keys); required unless listen is a loopback address")
    model_name: str = Field("", description="the model id clients name (GET /v1/models); empty = the model directory's name")
    image_url_hosts: list[str] = Field(default_factory=list, description="host names whose http(s) image URLs vlmd may fetch; empty = none (data: URIs only)")
    max_body_bytes: int = Field(32_000_000, gt=0, description="largest request body (base64 images included)")
    fetch_timeout_s: float = Field(10.0, gt=0, description="timeout of one allowed image URL fetch")

    _empty_is_none = field_validator("api_keys_file", mode="before")(_optional_path)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            parse_listen(value)
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen) if self.listen else None


def parse_listen(value: str) -> tuple[str, int]:
    """("host", port) of "HOST:PORT" ("[::1]:8000" for IPv6); ValueError naming the problem."""
    host, colon, port = value.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f'listen must be "HOST:PORT" with a port of 0-65535, got {value!r}')
    return host.removeprefix("[").removesuffix("]"), int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class EmbeddedBrokerConfig(_Section):
    host: str = Field("127.0.0.1", min_length=1, description="address the embedded broker listens on")
    port: int = Field(1883, ge=0, le=65535, description="port of the embedded broker; 0 = any free port")


class SamplingConfig(_Section):
    temperature: float | None = Field(None, ge=0, description="default temperature when a request gives none; empty = the package's (else 0, greedy)")
    top_k: int | None = Field(None, ge=0, description="default top-k; empty = the package's (else 0, off)")
    top_p: float | None = Field(None, gt=0, le=1, description="default top-p; empty = the package's (else 1, off)")
    repetition_penalty: float | None = Field(None, gt=0, description="default repetition penalty; empty = the package's (else 1, off)")

    # an effective config written back as TOML keeps an unset default as "" (TOML has no null)
    _empty_is_none = field_validator("temperature", "top_k", "top_p", "repetition_penalty", mode="before")(_optional_path)

    def overrides(self) -> dict[str, float | int]:
        """The defaults this config sets (over the package's sampling defaults)."""
        return {name: value for name, value in self.model_dump().items() if value is not None}


class ModelConfig(_Section):
    path: Path | None = Field(None, strict=False, description="model directory (or an M5Stack mode_<model>.json); empty = the demo model shipped with vlmd")
    backend: Literal["auto", "reference", "axengine"] = Field("auto", description="auto: axengine when the model is compiled, else reference")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="reference backend dtype at graph boundaries")
    provider: Literal["auto", "AxEngineExecutionProvider", "AXCLRTExecutionProvider"] = Field("auto", description="axengine execution provider")
    device: int = Field(0, ge=0, description="AXCL card index (PCIe cards)")
    data_path: Literal["auto", "zero-copy", "public"] = Field(
        "auto", description="how compiled graphs are fed: zero-copy (the KV cache in the NPU's buffers, one row per"
        " token), public (pyaxengine's run()), auto (zero-copy if it proves itself at load, else public)")
    kv_capacity: int = Field(1023, gt=0, description="KV cache rows (reference backend only)")
    prefill_chunk: int = Field(128, gt=0, description="prefill chunk length (reference backend only)")
    history_groups: int = Field(0, ge=0, description="extra prefill groups with history (reference backend only)")
    resize: Literal["auto", "bicubic", "bilinear", "pil-bilinear"] = Field("auto", description="how frames are resized to the vision graph: auto = as the checkpoint's image processor says, else InternVL's bicubic; bilinear = the board runtimes' plain cv::resize")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="sampling defaults for requests that give none (over the package's mode file / post_config.json)")

    _empty_is_none = field_validator("path", mode="before")(_optional_path)


class RequestsConfig(_Section):
    queue_size: int = Field(16, gt=0, description="questions waiting at most; more are rejected")
    default_max_tokens: int = Field(256, gt=0, description="max_tokens when a request gives none")
    max_tokens_limit: int = Field(1024, gt=0, description="largest max_tokens a request may ask for")
    max_text_chars: int = Field(4000, gt=0, description="longest question text")
    max_frames: int = Field(4, gt=0, description="most frames one question may ask for")
    max_payload_bytes: int = Field(8_000_000, gt=0, description="largest ask payload (inline images included)")

    @model_validator(mode="after")
    def _limits(self) -> RequestsConfig:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must be <= max_tokens_limit")
        return self


class FramesConfig(_Section):
    max_bytes: int = Field(8_000_000, gt=0, description="largest frame payload accepted")
    max_pixels: int = Field(40_000_000, gt=0, description="largest decoded frame (width x height)")
    history: int = Field(4, gt=0, description="raw frames kept per camera; the newest answers `camera` questions")
    max_cameras: int = Field(32, gt=0, description="unconfigured cameras whose frames are kept; frames from more are dropped (memory stays bounded)")
    max_total_bytes: int = Field(256_000_000, gt=0, description="bytes of kept frames of all cameras together, raw and decoded; beyond it the least recently active camera's frames are evicted, and decoded ones are kept only within what the raw ones leave (sized for a 4 GB board)")
    unknown_camera_idle_s: float = Field(600.0, gt=0, description="an unconfigured camera that sent no frame and had none used for this long is forgotten")

    @model_validator(mode="after")
    def _budget(self) -> FramesConfig:
        if self.max_total_bytes < self.max_bytes:
            raise ValueError("max_total_bytes must be >= max_bytes (one frame must fit)")
        return self


class CameraConfig(_Section):
    topic: str = Field("", description="extra source topic for this camera's frames, e.g. frigate/front_door/snapshot")
    caption: bool = Field(False, description="caption this camera's frames periodically")
    interval_s: float = Field(30.0, gt=0, description="seconds between captions")
    prompt: str = Field("Describe the image in one sentence.", min_length=1, description="caption question")
    max_tokens: int = Field(64, gt=0, description="caption length limit in tokens")
    min_change: float = Field(DEFAULT_MIN_CHANGE, ge=0, le=1, description="skip a caption (and a watch's answer) when the"
                              " frame changed less: the most-changed 1/64 of the frame, mean largest channel difference / 255")
    max_age_s: float = Field(DEFAULT_MAX_AGE_S, gt=0, description="caption a new frame anyway when the caption is this"
                             " old (seconds), even if the frame looks unchanged")

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return check_publish_topic(value) if value else value  # an exact topic, no wildcards


class ConversationsConfig(_Section):
    max_conversations: int = Field(8, gt=0, description="conversations kept at once; a new one beyond is refused (limit)")
    max_per_client: int = Field(4, gt=0, description="conversations one client (reply path) may hold at once; a new one beyond is refused (limit)")
    max_turns: int = Field(16, gt=0, description="turns one conversation may have; more are refused until it is reset")
    max_tokens: int = Field(0, ge=0, description="KV cache rows one conversation may fill (old turns are dropped to fit); 0 = the whole cache")
    idle_s: float = Field(600.0, gt=0, description="a conversation idle this long is forgotten")
    max_bytes: int = Field(64 * 2**20, gt=0, description="memory for parked conversations (KV snapshots and image features)")
    answer_room: int = Field(128, gt=0, description="rows kept free for an answer (at most its max_tokens) before old turns are dropped")


class WatchConfig(WatchDefinition):
    """One `[[watches]]` entry: a standing typed question about a configured camera."""

    name: WatchName = Field(description="the watch's name: its topics are <root>/watch/<name>[/event]")


class WatchLimitsConfig(_Section):
    max_watches: int = Field(16, gt=0, description="watches at most, config file and MQTT together; more are refused")
    min_interval_s: float = Field(1.0, gt=0, description="the shortest interval_s a watch may have")


class StatsConfig(_Section):
    interval_s: float = Field(30.0, gt=0, description="seconds between retained stats messages")


class HomeAssistantConfig(_Section):
    enabled: bool = Field(False, description="publish Home Assistant MQTT discovery")
    discovery_prefix: str = Field("homeassistant", description="Home Assistant discovery topic prefix")

    _prefix = field_validator("discovery_prefix")(check_root)


class FleetConfig(_Section):
    enabled: bool = Field(False, description="also take questions from the fleet's shared subscription (MQTT 5)")
    group: str = Field("vlmd", description="shared subscription group name ($share/<group>/...)")
    ask_topic: str = Field("vlmd/fleet/ask", description="topic the fleet's questions are published on")

    _ask = field_validator("ask_topic")(check_publish_topic)

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        if not value or _GROUP_BAD.search(value):
            raise ValueError("group must be one topic level (no '/', '+', '#')")
        return value


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="least severe level logged")
    format: Literal["auto", "json", "console"] = Field("auto", description="auto: console on a terminal, JSON lines otherwise")


class JournalConfig(_Section):
    enabled: bool = Field(True, description="journal accepted requests so a crash still gives each one final")
    directory: Path | None = Field(None, strict=False, description="empty = $RUNTIME_DIRECTORY (systemd RuntimeDirectory=), else $XDG_STATE_HOME/vlmd, else ~/.local/state/vlmd")
    max_bytes: int = Field(64_000_000, gt=0, description="live journal bound; an inline image that would pass it is not journaled (after a crash that request fails as restarted)")
    compact_bytes: int = Field(4_000_000, gt=0, description="rewrite the file with its live records once it is larger than this and twice its live records")
    id_window_s: float = Field(600.0, gt=0, description="a request id seen this recently is not run again: its final is republished")
    id_window_max: int = Field(2000, gt=0, description="most finished request ids remembered")

    _empty_is_none = field_validator("directory", mode="before")(_optional_path)


class ShutdownConfig(_Section):
    drain_timeout_s: float = Field(10.0, ge=0, description="seconds to let the running job finish on stop")
    max_consecutive_failures: int = Field(3, gt=0, description="engine failures in a row before the daemon exits")


class Config(_Section):
    device_id: str = Field("", description="this board's id in topics and the MQTT client id; empty = <host name>-<last 6 hex digits of the primary interface's MAC> (unique per board)")
    root: str = Field("", description='topic root; empty = "vlmd/<device_id>"')
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="broker connection")
    embedded_broker: EmbeddedBrokerConfig = Field(default_factory=EmbeddedBrokerConfig, description="used when mqtt.broker is empty")
    model: ModelConfig = Field(default_factory=ModelConfig, description="model directory and backend")
    requests: RequestsConfig = Field(default_factory=RequestsConfig, description="limits on questions")
    frames: FramesConfig = Field(default_factory=FramesConfig, description="limits on camera frames")
    cameras: dict[CameraName, CameraConfig] = Field(default_factory=dict, description="per-camera captions and source topics")
    conversations: ConversationsConfig = Field(default_factory=ConversationsConfig, description="limits on conversations")
    watches: list[WatchConfig] = Field(default_factory=list, description="standing typed questions ([[watches]] entries)")
    watch_limits: WatchLimitsConfig = Field(default_factory=WatchLimitsConfig, description="limits on watches")
    stats: StatsConfig = Field(default_factory=StatsConfig, description="stats publishing")
    home_assistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig, description="Home Assistant discovery")
    fleet: FleetConfig = Field(default_factory=FleetConfig, description="fleet-wide shared questions")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="log level and format")
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig, description="stopping and giving up")
    journal: JournalConfig = Field(default_factory=JournalConfig, description="the request journal (exactly one final across a crash)")
    http: HttpConfig = Field(default_factory=HttpConfig, description="the OpenAI-compatible HTTP API (off unless listen is set)")

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        # Same charset as camera names: one topic level, safe in logs and HA object ids.
        if value and not is_valid_camera(value):
            raise ValueError("device_id must be 1-64 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit")
        return value

    @field_validator("root")
    @classmethod
    def _root(cls, value: str) -> str:
        return check_root(value) if value else value

    @model_validator(mode="after")
    def _watches_fit(self) -> Config:
        names = [watch.name for watch in self.watches]
        for index, watch in enumerate(self.watches):
            if names.index(watch.name) != index:
                raise ValueError(f"watches[{index}].name: {watch.name!r} is used by an earlier watch")
            if watch.camera not in self.cameras:
                raise ValueError(f"watches[{index}].camera: {watch.camera!r} is not configured under [cameras]")
            if watch.interval_s < self.watch_limits.min_interval_s:
                raise ValueError(f"watches[{index}].interval_s: below watch_limits.min_interval_s"
                                 f" ({self.watch_limits.min_interval_s:g})")
        if len(self.watches) > self.watch_limits.max_watches:
            raise ValueError(f"watches: {len(self.watches)} entries, more than watch_limits.max_watches"
                             f" ({self.watch_limits.max_watches})")
        return self

    @model_validator(mode="after")
    def _fill_defaults(self) -> Config:
        # Frozen models: fill derived defaults through __dict__ during validation.
        device_id = self.device_id or default_device_id()
        self.__dict__["device_id"] = device_id
        self.__dict__["root"] = self.root or f"vlmd/{device_id}"
        if not self.mqtt.client_id:  # copy: a caller's MqttConfig instance stays untouched
            self.__dict__["mqtt"] = self.mqtt.model_copy(update={"client_id": f"vlmd-{device_id}"})
        return self
