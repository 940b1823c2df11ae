"""Wiring and the main loop: broker, MQTT client, inbox, worker thread, stats, signals.

Runtime shape (DESIGN §5):
    paho network thread --on_message--> protocol decode --> inbox
    worker thread: scheduler --> engine.generate --> Responder --> MQTT
    main thread: signals, systemd notify + watchdog, stats

`Service(config, engine_factory=..., clock=...)` is the testable unit: `start()`,
`stop(drain_timeout)`, `wait(timeout)`, `reload(config)`. `main(config)` is what
`vlmd serve` runs: it handles SIGTERM/SIGINT (stop) and SIGHUP (reload cameras and
captions); the handlers only wake the loop. It returns the exit code.
Message handlers run on paho's thread: they decode, hand over and publish refusals,
nothing slower.
"""

from __future__ import annotations

import importlib.metadata
import signal
import threading
import time
from typing import Any, Callable

import psutil

from daemon.config import Config
from daemon.ha import birth_topic, discovery_messages
from daemon.inbox import Inbox
from daemon.logs import get_logger
from daemon.mqtt import ClientSettings, Incoming, MqttClient, TlsSettings
from daemon.scheduler import CaptionPolicy, Job, Reply, Scheduler
from daemon.worker import Responder, RuntimeStats, Worker, WorkerLimits
from npu.board.cmm import read_cmm_info
from protocol import codec, payloads
from protocol.codec import ProtocolError
from protocol.topics import SPEC, TopicError, Topics, check_publish_topic

log = get_logger("vlmd.service")

EngineFactory = Callable[[Config], Any]


def load_engine(config: Config) -> Any:
    """The default engine factory: the configured model (or the demo model) on its backend."""
    from npu.engine import Engine
    from npu.model import load_model

    m = config.model
    model = load_model(
        m.path, backend=m.backend, precision=m.precision, kv_capacity=m.kv_capacity,
        prefill_chunk=m.prefill_chunk, history_groups=m.history_groups, provider=m.provider, device_id=m.device,
        data_path=m.data_path,
    )
    return Engine(model)  # Service.start logs its one "model loaded" line (Model.summary, data path included)


class Service:
    """One running daemon. Not restartable: build a new one after `stop()`."""

    def __init__(self, config: Config, engine_factory: EngineFactory = load_engine, clock=time.monotonic, wall_clock=time.time):
        self.config = config
        self.engine_factory = engine_factory
        self.clock, self.wall_clock = clock, wall_clock
        self.topics = _topics(config)
        self.inbox = Inbox(config.requests.queue_size, config.frames.history, clock, wall_clock)
        self.scheduler = Scheduler({name: _caption_policy(c) for name, c in config.cameras.items()})
        self._num_camera_refusals = 0
        self.stats = RuntimeStats()
        self.limits = payloads.AskLimits(
            max_text_chars=config.requests.max_text_chars, max_frames=min(config.requests.max_frames, config.frames.history),
            max_tokens=config.requests.max_tokens_limit,
        )
        self.broker: Any = None  # the embedded broker, when one was started
        self.client: MqttClient | None = None
        self.worker: Worker | None = None
        self.responder: Responder | None = None
        self._worker_stop = threading.Event()
        self._worker_thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.started_at = clock()
        self._next_stats = 0.0
        self.model_facts: dict = {}  # Engine.model_summary(), once loaded

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the broker (if none is configured), load the engine, connect, start the worker."""
        url, protocol = self._broker_url()
        engine = self.engine_factory(self.config)
        self.model_facts = engine.model_summary()
        log.info("model loaded", **self.model_facts)  # one line: what this daemon runs
        self.client = MqttClient(
            self._client_settings(url, protocol),
            will=(self.topics.status(), payloads.STATUS_OFFLINE.encode(), SPEC["status"].qos, SPEC["status"].retain),
            on_message=self._on_message,
            on_connected=self._on_connected,
        )
        self.responder = Responder(self.client, self.topics, self.stats, self.wall_clock)
        self.worker = Worker(
            engine, self.inbox, self.scheduler, self.responder, _worker_limits(self.config), self.clock
        )
        self._worker_thread = threading.Thread(
            target=self.worker.run, args=(self._worker_stop,), name="vlmd-worker", daemon=True
        )
        self._worker_thread.start()
        self.client.start()
        log.info("service started", root=self.topics.root, broker=url)

    def stop(self, drain_timeout: float | None = None) -> None:
        """Finish queued questions as `shutdown`, let the running job end (up to
        `drain_timeout`, then stop it as `shutdown`), publish `stopped`, disconnect."""
        if self._stopped.is_set():
            return
        drain = self.config.shutdown.drain_timeout_s if drain_timeout is None else drain_timeout
        for job in self.inbox.close():
            self._final(job, "shutdown", ("shutdown", payloads.ERROR_DESCRIPTIONS["shutdown"]))
        self._worker_stop.set()
        self.inbox.wake()
        if self._worker_thread is not None:
            self._worker_thread.join(drain)
            if self._worker_thread.is_alive() and self.worker is not None:
                self.worker.abort.set()
                self._worker_thread.join(10.0)
        if self.client is not None:
            status = (self.topics.status(), payloads.STATUS_STOPPED.encode(), SPEC["status"].qos, SPEC["status"].retain)
            self.client.stop(last=status)
        if self.broker is not None:
            self.broker.stop()
        self._stopped.set()
        log.info("service stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """True once stopped (or the worker gave up after repeated engine failures)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopped.is_set():
            if not self.worker_alive:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._stopped.wait(0.2 if left is None else min(0.2, left))
        return True

    @property
    def worker_alive(self) -> bool:
        return self._worker_thread is not None and self._worker_thread.is_alive()

    @property
    def healthy(self) -> bool:
        return self.worker is not None and self.worker.healthy

    @property
    def fatal_error(self) -> str | None:
        """Why the broker connection can never work with this config (TLS, credentials), else None."""
        return self.client.fatal_error if self.client is not None else None

    @property
    def broker_url(self) -> str:
        return self.client.settings.url if self.client is not None else ""

    def reload(self, config: Config) -> str:
        """Apply `config`'s cameras (caption settings, source topics) without touching
        the model or the connection; other changed sections are logged as needing a
        restart and ignored. Returns a one-line summary. Raises TopicError (nothing
        applied) when the new source topics cannot be used."""
        topics = _topics(config)  # validates before anything changes
        old_sources, new_sources = set(self.topics.frame_sources), set(topics.frame_sources)
        ignored = [name for name in Config.model_fields if name != "cameras"
                   and getattr(config, name) != getattr(self.config, name)]
        if ignored:
            log.warning("reload: these settings need a restart and were left as they are", sections=ignored)
        # each a single reference swap: the paho and worker threads see old or new, never half
        self.config = self.config.model_copy(update={"cameras": config.cameras})
        self.topics = topics
        if self.responder is not None:
            self.responder.topics = topics
        self.scheduler.captions = {name: _caption_policy(c) for name, c in config.cameras.items()}
        if self.client is not None:
            self.client.unsubscribe(sorted(old_sources - new_sources))
            self.client.subscribe([(topic, SPEC["frame"].qos) for topic in sorted(new_sources - old_sources)])
            if self.client.connected:
                self._publish_discovery()
        captioned = sum(c.caption for c in config.cameras.values())
        summary = f"reloaded: {len(config.cameras)} camera(s), {captioned} captioned"
        log.info("reload", cameras=sorted(config.cameras), captioned=captioned, restart_needed=ignored or None)
        self.inbox.wake()  # a caption may be due now
        return summary

    def tick(self) -> None:
        """Main-loop duties: publish stats when due."""
        now = self.clock()
        if now >= self._next_stats and self.client is not None and self.client.connected:
            self._next_stats = now + self.config.stats.interval_s
            self.publish_stats()

    def publish_stats(self) -> None:
        message = self.stats_message()
        spec = SPEC["stats"]
        self.client.publish(self.topics.stats(), codec.encode(message), spec.qos, spec.retain)

    def stats_message(self) -> payloads.Stats:
        with self.stats.lock:
            outcomes = dict(self.stats.outcomes)
            captions = dict(self.stats.captions)
            ttft, tok_s = self.stats.last_ttft_ms, self.stats.last_decode_tokens_per_s
        cmm = read_cmm_info()  # the board's device memory (None off a board)
        return payloads.Stats(
            ts=self.wall_clock(), uptime_s=max(0.0, self.clock() - self.started_at), queue_depth=self.inbox.depth,
            frames=self.inbox.frame_counts(), requests=outcomes, last_ttft_ms=ttft,
            last_decode_tokens_per_s=tok_s, rss_bytes=psutil.Process().memory_info().rss, captions=captions,
            running=self.inbox.running is not None, cmm=cmm.describe() if cmm is not None else None,
            model=self.model_facts or None,
        )

    # -- broker and client settings ---------------------------------------------------

    def _broker_url(self) -> tuple[str, str]:
        if self.config.mqtt.broker:
            return self.config.mqtt.broker, self.config.mqtt.protocol
        from daemon.broker import EmbeddedBroker

        embedded = self.config.embedded_broker
        self.broker = EmbeddedBroker(embedded.host, embedded.port).start()
        log.info("embedded broker started", url=self.broker.url)
        return self.broker.url, "3.1.1"  # amqtt speaks MQTT 3.1.1 only

    def _client_settings(self, url: str, protocol: str) -> ClientSettings:
        m = self.config.mqtt
        tls = m.tls
        return ClientSettings(
            url=url, client_id=m.client_id, username=m.username, password=m.password_value() or "",
            keepalive_s=m.keepalive_s, protocol=protocol, persistent_session=m.persistent_session,
            reconnect_min_s=m.reconnect_min_s, reconnect_max_s=m.reconnect_max_s,
            tls=TlsSettings(str(tls.ca_file or ""), str(tls.cert_file or ""), str(tls.key_file or ""), tls.insecure),
        )

    # -- paho thread: handlers (never block, never raise: MqttClient logs what escapes) --

    def _on_connected(self) -> None:
        subscriptions = self.topics.subscriptions()
        if self.config.fleet.enabled:
            if self.client.is_v5:
                subscriptions.append(self.topics.fleet_subscription(self.config.fleet.group))
            else:
                log.warning("fleet mode needs MQTT 5 shared subscriptions; the broker speaks 3.1.1")
        if self.config.home_assistant.enabled:
            subscriptions.append((birth_topic(self.config.home_assistant.discovery_prefix), 1))
        self.client.subscribe(subscriptions)
        spec = SPEC["status"]
        self.client.publish(self.topics.status(), payloads.STATUS_ONLINE.encode(), spec.qos, spec.retain)
        self._publish_discovery()
        self._next_stats = 0.0  # fresh stats soon after every (re)connect

    def _publish_discovery(self) -> None:
        ha = self.config.home_assistant
        if not ha.enabled:
            return
        cameras = [name for name, camera in self.config.cameras.items() if camera.caption]
        messages = discovery_messages(
            self.topics, self.config.device_id, cameras, ha.discovery_prefix, sw_version=_version()
        )
        for message in messages:
            self.client.publish(message.topic, message.payload, 1, True)

    def _on_message(self, message: Incoming) -> None:
        if self.config.home_assistant.enabled and message.topic == birth_topic(self.config.home_assistant.discovery_prefix):
            if message.payload == b"online":
                self._publish_discovery()
            return
        route = self.topics.parse(message.topic)
        if route is None:
            return
        if route.kind == "frame":
            self._on_frame(route.camera, message.payload)
        elif route.kind in ("ask", "fleet_ask"):
            self._on_ask(message)
        elif route.kind == "cancel":
            self._on_cancel(message)

    def _on_frame(self, camera: str, data: bytes) -> None:
        if not data:
            return  # an empty retained message clears a topic; it is not a frame
        if len(data) > self.config.frames.max_bytes:
            log.warning("frame too large, dropped", camera=camera, size=len(data), limit=self.config.frames.max_bytes)
            return
        if not self._camera_allowed(camera):
            return
        self.inbox.put_frame(camera, data)

    def _camera_allowed(self, camera: str) -> bool:
        """Frames of configured cameras always; of others up to `frames.max_cameras`
        of them, so a publisher inventing camera names cannot grow memory without bound."""
        cameras = self.config.cameras
        if camera in cameras or self.inbox.has_camera(camera):
            return True
        unconfigured = sum(name not in cameras for name in self.inbox.camera_names())  # only for a new name
        if unconfigured < self.config.frames.max_cameras:
            return True
        self._num_camera_refusals += 1
        if self._num_camera_refusals & (self._num_camera_refusals - 1) == 0:  # 1, 2, 4, 8...: no log flood
            log.warning("frame from one camera too many, dropped", camera=camera, limit=self.config.frames.max_cameras,
                        refused_so_far=self._num_camera_refusals)
        return False

    def _on_ask(self, message: Incoming) -> None:
        now = self.clock()
        try:
            request = codec.decode_ask(message.payload, self.config.requests.max_payload_bytes, self.limits)
        except ProtocolError as exc:
            self._refuse(message, exc)
            return
        if request.id is None:
            request = request.with_id(payloads.new_request_id())
        reply = Reply(
            topic=request.reply_to or _usable(message.response_topic) or self.topics.answer(request.id),
            correlation_data=message.correlation_data, stream=request.stream,
        )
        deadline = None if request.expires_ms is None else now + request.expires_ms / 1000.0
        job = Job("ask", request.id, now, deadline, camera=request.camera, request=request, reply=reply)
        if self._is_input_topic(reply.topic):  # replies there would come back to us as input
            job.reply = Reply(self.topics.answer(request.id), message.correlation_data, stream=False)
            self._final(job, "rejected", ("bad_request", f"reply_to: {reply.topic!r} is one of vlmd's input topics"))
            return
        if request.camera is not None and not self._pin_frames(job, request):
            return
        result = self.inbox.submit(job)
        if result == "busy":
            self._final(job, "rejected", ("busy", f"the request queue is full ({self.inbox.queue_size} waiting)"))
        elif result == "closed":
            self._final(job, "shutdown", ("shutdown", payloads.ERROR_DESCRIPTIONS["shutdown"]))

    def _is_input_topic(self, topic: str) -> bool:
        route = self.topics.parse(topic)
        return route is not None and route.kind in ("ask", "fleet_ask", "cancel", "frame")

    def _pin_frames(self, job: Job, request: payloads.AskRequest) -> bool:
        """Attach the camera frames the question is about; refuse it when there are none."""
        camera, wanted = request.camera, request.frames or 1
        if camera not in self.config.cameras and not self.inbox.has_camera(camera):
            self._final(job, "rejected", ("unknown_camera", f"camera {camera!r} is not configured and has sent no frame"))
            return False
        frames = self.inbox.frames(camera, wanted)
        if len(frames) < wanted:
            self._final(job, "rejected", ("no_frame", f"camera {camera!r} has {len(frames)} frame(s), the question needs {wanted}"))
            return False
        job.frames = frames
        return True

    def _refuse(self, message: Incoming, exc: ProtocolError) -> None:
        """A refused ask: a final `rejected` where the client listens, else <root>/error."""
        default = self.topics.answer(exc.request_id) if exc.request_id else None
        topic = exc.reply_to or _usable(message.response_topic) or default
        log.info("ask refused", code=exc.code, message=exc.message, request_id=exc.request_id)
        if topic is None:
            self.responder.error(exc.code, exc.message, message.topic, exc.request_id)
            return
        job = Job("ask", exc.request_id or payloads.new_request_id(), self.clock(),
                  reply=Reply(topic, message.correlation_data, stream=False))
        self._final(job, "rejected", (exc.code, exc.message))

    def _on_cancel(self, message: Incoming) -> None:
        try:
            request = codec.decode_cancel(message.payload)
        except ProtocolError as exc:
            self.responder.error(exc.code, exc.message, message.topic)
            return
        where, job = self.inbox.cancel(request.id)
        log.info("cancel", request_id=request.id, where=where)
        if where == "queued":
            self._final(job, "cancelled", ("cancelled", "cancelled while queued"))

    def _final(self, job: Job, reason: str, error: tuple[str, str]) -> None:
        self.responder.final(job, reason, error=error)


def _version() -> str | None:
    try:
        return importlib.metadata.version("vlmd")
    except importlib.metadata.PackageNotFoundError:
        return None


def _usable(response_topic: str | None) -> str | None:
    """An MQTT 5 response topic we can publish to, else None (then the default applies)."""
    if response_topic is None:
        return None
    try:
        return check_publish_topic(response_topic)
    except TopicError:
        log.info("unusable response topic ignored", response_topic=response_topic)
        return None


def _topics(config: Config) -> Topics:
    return Topics(
        config.root,
        frame_sources={c.topic: name for name, c in config.cameras.items() if c.topic},
        fleet_ask_topic=config.fleet.ask_topic if config.fleet.enabled else None,
    )


def _caption_policy(camera) -> CaptionPolicy:
    return CaptionPolicy(camera.caption, camera.interval_s, camera.prompt, camera.max_tokens, camera.min_change)


def _worker_limits(config: Config) -> WorkerLimits:
    return WorkerLimits(
        default_max_tokens=config.requests.default_max_tokens, frame_max_bytes=config.frames.max_bytes,
        frame_max_pixels=config.frames.max_pixels, max_consecutive_failures=config.shutdown.max_consecutive_failures,
    )


# -- the process main loop --------------------------------------------------------------


def main(config: Config, engine_factory: EngineFactory = load_engine, **options: Any) -> int:
    """What `vlmd serve` runs; see daemon/lifecycle.py (signals, sd_notify, watchdog, reload)."""
    from daemon.lifecycle import run

    return run(config, engine_factory, **options)
