"""The service core: one inbox, one worker, one responder, the journal and the stats, and
the interfaces requests come in through.

Runtime shape (DESIGN §5):
    interface (MQTT: paho's network thread) --decode--> Service.submit_ask / put_frame / cancel --> inbox
    worker thread: scheduler --> engine.generate --> Responder --> the interface's publisher
    main thread (daemon.lifecycle): signals, systemd notify + watchdog, stats

Every interface plugs in the same way: it decodes what arrives with protocol/ and calls
`submit_ask(request, reply)` (dedupe by the journal's id window, frames pinned, journaled,
enqueued), `put_frame(camera, data)`, `cancel(request_id)` or `refuse(refused, topic)`; it
never schedules or runs the engine itself. MQTT is daemon.mqtt.interface.MqttInterface.

`Service(config, engine_factory=..., clock=...)` is the testable unit: `start()`,
`stop(drain_timeout)`, `wait(timeout)`, `reload(config)`. The process main loop that runs
it (signals, systemd, exit codes) is daemon.lifecycle.main, which imports this module and
never the other way round. Knows nothing of MQTT topics or paho beyond the interface it starts.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import psutil

from daemon import memory, settings
from daemon.config import Config
from daemon.http import HttpInterface, HttpServer
from daemon.home.home import Home
from daemon.home.watches import WatchLimits, WatchRegistry
from daemon.inbox import Inbox
from daemon.journal.journal import Journal, Recovery, open_journal, request_digest, request_key
from daemon.journal.recovery import Restarted, revive
from daemon.logs import get_logger
from daemon.mqtt.interface import MqttInterface
from daemon.responder import Responder, RuntimeStats
from daemon.scheduler import Job, Scheduler
from daemon.worker import Worker
from npu.board.cmm import read_cmm_info
from npu.engine import Engine
from npu.engine.conversation import ConversationLimits
from npu.model import load_model
from protocol import payloads
from protocol.requests import Refused, Reply
from protocol.topics import Topics

log = get_logger("vlmd.service")

EngineFactory = Callable[[Config], Any]


def load_engine(config: Config) -> Any:
    """The default engine factory: the configured model (or the demo model) on its backend."""
    m, c = config.model, config.conversations
    model = load_model(
        m.path, backend=m.backend, precision=m.precision, kv_capacity=m.kv_capacity,
        prefill_chunk=m.prefill_chunk, history_groups=m.history_groups, provider=m.provider, device_id=m.device,
        data_path=m.data_path, resize=None if m.resize == "auto" else m.resize, sampling=m.sampling.overrides(),
    )
    limits = ConversationLimits(max_conversations=c.max_conversations, max_per_owner=c.max_per_client,
                                max_turns=c.max_turns,
                                max_tokens=c.max_tokens or None, idle_s=c.idle_s, max_bytes=c.max_bytes,
                                answer_room=c.answer_room)
    return Engine(model, conversation_limits=limits)  # Service.start logs its one "model loaded" line


class Service:
    """One running daemon. Not restartable: build a new one after `stop()`."""

    def __init__(self, config: Config, engine_factory: EngineFactory = load_engine, clock=time.monotonic, wall_clock=time.time):
        self.config = config
        self.engine_factory = engine_factory
        self.clock, self.wall_clock = clock, wall_clock
        self.topics = settings.topics(config)
        self.inbox = Inbox(config.requests.queue_size, config.frames.history, clock, wall_clock,
                           max_total_bytes=config.frames.max_total_bytes)
        self.inbox.configured = frozenset(config.cameras)
        self.scheduler = Scheduler(settings.caption_policies(config))
        self.watches = WatchRegistry(WatchLimits(config.watch_limits.max_watches, config.watch_limits.min_interval_s),
                                     known_camera=lambda camera: camera in self.config.cameras
                                     or self.inbox.has_camera(camera))
        self.watches.set_config_watches(config.watches)
        self.home = Home(self)
        self._num_camera_refusals = 0
        self.stats = RuntimeStats()
        self.limits = settings.ask_limits(config)
        self.mqtt = MqttInterface(self)
        self.worker: Worker | None = None
        self.responder: Responder | None = None
        self.http: HttpServer | None = None  # the OpenAI-compatible API, when [http] listen is set
        self._worker_stop = threading.Event()
        self._worker_thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.started_at = clock()
        self._next_stats = 0.0
        self.model_facts: dict = {}  # Engine.model_summary(), once loaded
        self.journal = Journal(None)  # the id window only, until start() opens the file
        self._recovery: Recovery | None = None  # owed by an earlier run: settled on the first connection

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the interfaces' connections (the embedded broker when none is configured),
        load the engine, open the journal, start the worker."""
        if not memory.return_large_frees():
            log.info("large frees are not returned to the system here (not glibc): memory may stay above the budget")
        engine = self.engine_factory(self.config)
        self.model_facts = engine.model_summary()
        log.info("model loaded", **self.model_facts)  # one line: what this daemon runs
        self.journal = open_journal(self.config, os.environ, self.wall_clock)
        self._recovery = self.journal.recover()
        url = self.mqtt.open()
        self.responder = Responder(self.mqtt.client, self.topics, self.stats, self.wall_clock, self.journal)
        self.worker = Worker(
            engine, self.inbox, self.scheduler, self.responder, settings.worker_limits(self.config), self.clock,
            watches=self.watches,
        )
        self._worker_thread = threading.Thread(
            target=self.worker.run, args=(self._worker_stop,), name="vlmd-worker", daemon=True
        )
        self._worker_thread.start()
        if self.config.http.address is not None:
            self.http = HttpServer(HttpInterface(self), *self.config.http.address).start()
        self.mqtt.start()
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
        if self.http is not None:
            self.http.stop()
        self.mqtt.stop()
        self.journal.close()
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
    def client(self):
        """The MQTT client (None before start)."""
        return self.mqtt.client

    @property
    def broker(self):
        """The embedded broker, when one was started."""
        return self.mqtt.broker

    @property
    def fatal_error(self) -> str | None:
        """Why the broker connection can never work with this config (TLS, credentials), else None."""
        return self.client.fatal_error if self.client is not None else None

    @property
    def broker_url(self) -> str:
        return self.client.settings.url if self.client is not None else ""

    def reload(self, config: Config) -> str:
        """Apply `config`'s cameras (caption settings, source topics) without touching
        the model or the connection; other changed sections (device id, root, fleet:
        the subscriptions stay on the running root) are logged as needing a restart and
        ignored. Returns a one-line summary. Raises TopicError (nothing applied) when
        the new source topics cannot be used."""
        # the running root and fleet topic, the new camera sources; validated before anything changes
        topics = Topics(self.topics.root, settings.frame_sources(config), self.topics.fleet_ask_topic)
        old_sources, new_sources = set(self.topics.frame_sources), set(topics.frame_sources)
        ignored = [name for name in Config.model_fields if name not in ("cameras", "watches")
                   and getattr(config, name) != getattr(self.config, name)]
        if ignored:
            log.warning("reload: these settings need a restart and were left as they are", sections=ignored)
        # each a single reference swap: the paho and worker threads see old or new, never half
        self.config = self.config.model_copy(update={"cameras": config.cameras, "watches": config.watches})
        for change in self.watches.set_config_watches(config.watches):
            self.home.watch_changed(change)
        self.topics = topics
        if self.responder is not None:
            self.responder.topics = topics
        self.scheduler.captions = settings.caption_policies(config)
        self.inbox.configured = frozenset(config.cameras)
        self.mqtt.resubscribe_frames(old_sources, new_sources)
        captioned = sum(c.caption for c in config.cameras.values())
        summary = f"reloaded: {len(config.cameras)} camera(s), {captioned} captioned"
        log.info("reload", cameras=sorted(config.cameras), captioned=captioned, restart_needed=ignored or None)
        self.inbox.wake()  # a caption may be due now
        return summary

    def _expire_cameras(self) -> None:
        expired = self.inbox.expire_cameras(self.config.frames.unknown_camera_idle_s, keep=self.config.cameras)
        if expired:
            log.info("idle unconfigured cameras forgotten", cameras=expired[:10], count=len(expired))

    def tick(self) -> None:
        """Main-loop duties: forget idle unconfigured cameras, publish stats when due."""
        self._expire_cameras()
        now = self.clock()
        if now >= self._next_stats and self.mqtt.connected:
            self._next_stats = now + self.config.stats.interval_s
            self.publish_stats()

    def publish_stats(self) -> None:
        self.mqtt.publish_stats(self.stats_message())

    def stats_due_now(self) -> None:
        """Publish stats at the next tick (after every (re)connect)."""
        self._next_stats = 0.0

    def stats_message(self) -> payloads.Stats:
        with self.stats.lock:
            outcomes = dict(self.stats.outcomes)
            by_interface = {name: dict(counts) for name, counts in self.stats.by_interface.items()}
            captions = dict(self.stats.captions)
            ttft, tok_s = self.stats.last_ttft_ms, self.stats.last_decode_tokens_per_s
            conversations = self.stats.conversations
        runner = self.worker.watch_runner if self.worker is not None else None
        watches = {"defined": len(self.watches.watches()), **(dict(runner.counts) if runner is not None else {})}
        cmm = read_cmm_info()  # the board's device memory (None off a board)
        return payloads.Stats(
            ts=self.wall_clock(), uptime_s=max(0.0, self.clock() - self.started_at), queue_depth=self.inbox.depth,
            frames=self.inbox.frame_counts(), requests=outcomes, last_ttft_ms=ttft,
            last_decode_tokens_per_s=tok_s, rss_bytes=psutil.Process().memory_info().rss, captions=captions,
            running=self.inbox.running is not None, frame_bytes=self.inbox.frame_bytes,
            decoded_frame_bytes=self.worker.decoded_frame_bytes if self.worker is not None else 0,
            cmm=cmm.describe() if cmm is not None else None, model=self.model_facts or None,
            conversations=conversations, watches=watches, interfaces=by_interface,
        )

    # -- what interfaces call (MQTT on paho's thread: never block, never raise) ----------

    def settle_recovery(self) -> None:
        """Once, at the first connection: what an earlier run owed (its finals need a broker)."""
        if self._recovery is None:
            return
        recovery, self._recovery = self._recovery, None
        try:
            self._settle(recovery)
        except Exception:  # what is owed must not cost the connection its subscriptions
            log.exception("journal recovery failed")

    def put_frame(self, camera: str, data: bytes) -> None:
        """A camera's frame: kept as its newest (decoded only when a job uses it)."""
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
        self._expire_cameras()  # only for a new name: idle ones make room
        unconfigured = sum(name not in cameras for name in self.inbox.camera_names())
        if unconfigured < self.config.frames.max_cameras:
            return True
        self._num_camera_refusals += 1
        if self._num_camera_refusals & (self._num_camera_refusals - 1) == 0:  # 1, 2, 4, 8...: no log flood
            log.warning("frame from one camera too many, dropped", camera=camera, limit=self.config.frames.max_cameras,
                        refused_so_far=self._num_camera_refusals)
        return False

    def submit_ask(self, request: payloads.AskRequest, reply: Reply, redelivered: bool = False,
                   topic: str | None = None) -> None:
        """A validated question with its reply path: not run again when its id was seen
        (`_seen`), its frames pinned (or refused), journaled, enqueued; exactly one final
        is owed from here on."""
        now, wall_now = self.clock(), self.wall_clock()
        if self._seen(request, reply, redelivered, topic or self.topics.ask()):
            return
        deadline = None if request.expires_ms is None else now + request.expires_ms / 1000.0
        job = Job("ask", request.id, now, deadline, camera=request.camera, request=request, reply=reply)
        if request.camera is not None and not self._pin_frames(job, request):
            return
        expires_ts = None if request.expires_ms is None else wall_now + request.expires_ms / 1000.0
        self.journal.accepted(job, wall_now, expires_ts)
        self._enqueue(job)

    def submit_job(self, job: Job) -> None:
        """A job an interface built with its own reply sink (HTTP): enqueued as any question,
        not journaled (its client's connection does not outlive the process); a full queue or a
        closed inbox gives its final at once."""
        self._enqueue(job)

    def _enqueue(self, job: Job) -> None:
        result = self.inbox.submit(job)
        if result == "busy":
            self._final(job, "rejected", ("busy", f"the request queue is full ({self.inbox.queue_size} waiting)"))
        elif result == "closed":
            self._final(job, "shutdown", ("shutdown", payloads.ERROR_DESCRIPTIONS["shutdown"]))

    def _seen(self, request: payloads.AskRequest, reply: Reply, redelivered: bool, topic: str) -> bool:
        """A request seen within the id window is not run again (QoS 1 is at-least-once,
        and reconnecting clients retransmit): the same id on the same reply path with the
        same content; still running, nothing; finished, its final again. The same id and
        path asking something else while the first is queued or running is refused on
        <root>/error: its own reply path and journal entry are the first one's."""
        request_id = request.id
        seen = self.journal.lookup(request_key(request_id, reply.topic, reply.correlation_data), request_digest(request))
        if seen is None:
            return False
        if seen == "conflict":
            log.info("request id in use by another request of this client: refused", request_id=request_id)
            self.responder.error("duplicate_id", payloads.ERROR_DESCRIPTIONS["duplicate_id"], topic, request_id)
            return True
        log.info("request id seen before: not run again", request_id=request_id, redelivered=redelivered,
                 state="in progress" if seen == "in_progress" else "finished")
        if seen != "in_progress":
            self.responder.republish(seen)
        return True

    def _settle(self, recovery: Recovery) -> None:
        """What an earlier run owed: its unacknowledged finals again, its unanswered
        requests run again or failed as `restarted`."""
        for final in recovery.unacknowledged:
            self.responder.republish(final)
        now, wall_now = self.clock(), self.wall_clock()
        for pending in recovery.pending:
            revived = revive(pending, self.inbox, self.limits, now, wall_now)
            if isinstance(revived, Restarted):
                self._final(revived.job, "failed", ("restarted", revived.why))
            else:
                self._enqueue(revived)
        log.info("journal recovered", republished=len(recovery.unacknowledged), pending=len(recovery.pending),
                 discarded_bytes=recovery.discarded_bytes)

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

    def refuse(self, refused: Refused, topic: str) -> None:
        """A refused ask: a final `rejected` where the client listens, else <root>/error."""
        log.info("ask refused", code=refused.code, message=refused.message, request_id=refused.request_id)
        reply = refused.reply
        if reply is None or (refused.request_id is not None and self.journal.in_progress(
                request_key(refused.request_id, reply.topic, reply.correlation_data))):
            # a malformed copy of a queued or running request must not give it a second final
            self.responder.error(refused.code, refused.message, topic, refused.request_id)
            return
        job = Job("ask", refused.request_id or payloads.new_request_id(), self.clock(), reply=refused.reply)
        self._final(job, "rejected", (refused.code, refused.message))

    def cancel(self, request_id: str, reply_topic: str | None = None) -> None:
        """Cancel a request; with `reply_topic`, only the one answered there (the client's own)."""
        where, job = self.inbox.cancel(request_id, reply_topic)
        log.info("cancel", request_id=request_id, where=where)
        if where == "queued":
            self._final(job, "cancelled", ("cancelled", "cancelled while queued"))

    def _final(self, job: Job, reason: str, error: tuple[str, str]) -> None:
        self.responder.final(job, reason, error=error)
