"""The worker: one loop on its own thread that runs jobs on the engine and streams them.

Each turn reads top to bottom: ask the scheduler, finish expired questions, run one
question or one caption (or sleep until something arrives), record progress for the
watchdog. Every job leaves through `Responder.final` (questions) or a retained caption,
so each request gets exactly one final whatever the engine does.

Knows the engine only by its interface (`generate(prompt, options, should_stop)`
yielding token events then one done event, errors with a `.code`), so tests drive it
with a fake engine. Knows MQTT only through a `Publisher`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
from pydantic import ValidationError

from daemon.frame_change import changed, jpeg, thumbnail
from daemon.inbox import Inbox
from daemon.logs import get_logger, log_context
from daemon.scheduler import CaptionPolicy, Frame, Job, Scheduler
from daemon.watches import REQUEST_ERROR_CODES, WatchRegistry, WatchRunner
from protocol import codec, frames as frame_codec, payloads
from protocol.topics import SPEC, Topics

log = get_logger("vlmd.worker")


class Publisher(Protocol):
    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, correlation_data: bytes | None = None
    ) -> None: ...


@dataclass(frozen=True)
class WorkerLimits:
    default_max_tokens: int = 256
    frame_max_bytes: int = 8_000_000
    frame_max_pixels: int = 40_000_000
    max_consecutive_failures: int = 3


@dataclass
class RuntimeStats:
    """Counters the stats message reports; written by the worker and the MQTT thread."""

    outcomes: Counter = field(default_factory=Counter)  # finish_reason -> count
    captions: Counter = field(default_factory=Counter)  # "done" / "skipped" / "failed"
    last_ttft_ms: float | None = None
    last_decode_tokens_per_s: float | None = None
    conversations: dict | None = None  # the engine's conversation store, after the last question
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, outcome: str) -> None:
        with self.lock:
            self.outcomes[outcome] += 1

    def count_caption(self, outcome: str) -> None:
        with self.lock:
            self.captions[outcome] += 1

    def timings(self, timings: dict) -> None:
        with self.lock:
            self.last_ttft_ms = timings.get("ttft_ms", self.last_ttft_ms)
            self.last_decode_tokens_per_s = timings.get("decode_tokens_per_s", self.last_decode_tokens_per_s)


class Responder:
    """Formats and publishes chunks and finals; the only place a final is sent."""

    def __init__(self, publisher: Publisher, topics: Topics, stats: RuntimeStats, wall_clock=time.time):
        self.publisher = publisher
        self.topics = topics
        self.stats = stats
        self.wall_clock = wall_clock

    def chunk(self, job: Job, seq: int, delta: str) -> None:
        """Publish one chunk (QoS 0, may be lost anyway); failures are logged, never raised."""
        self._send(job, payloads.AnswerChunk(id=job.job_id, seq=seq, delta=_utf8_safe(delta)), "answer_chunk")

    def final(
        self,
        job: Job,
        finish_reason: str,
        *,
        text: str = "",
        seq: int = 0,
        error: tuple[str, str] | None = None,
        usage: tuple[int, int] = (0, 0),
        timings: dict | None = None,
        extra: dict | None = None,
    ) -> bool:
        """Publish the job's one final; False (and nothing sent) if it already had one."""
        if not job.claim_final():
            return False
        fields = dict(  # text from a runtime may hold what JSON cannot (lone surrogates)
            id=job.job_id, seq=seq, text=_utf8_safe(text), finish_reason=finish_reason,
            error=None if error is None else {"code": error[0], "message": _utf8_safe(error[1])},
            usage={"prompt_tokens": usage[0], "completion_tokens": usage[1]},
        )
        try:
            message = payloads.AnswerFinal(**fields, timings=timings or {}, **(extra or {}))
        except ValidationError:  # odd timings or fields from an engine must not cost the client its final
            log.exception("timings or typed fields refused by the final's schema", timings=repr(timings),
                          extra=repr(extra))
            message = payloads.AnswerFinal(**fields)
        sent = self._send(job, message, "answer")
        self.stats.count(finish_reason if sent else "unpublished")
        log.info("final", request_id=job.job_id, finish_reason=finish_reason, error=error and error[0], sent=sent)
        return True

    def error(self, code: str, message: str, topic: str, request_id: str | None = None) -> None:
        """A problem with a message that has no reply path: to <root>/error."""
        body = payloads.ErrorMessage(code=code, message=_utf8_safe(message), topic=_utf8_safe(topic),
                                     request_id=request_id, ts=self.wall_clock())
        spec = SPEC["error"]
        try:
            self.publisher.publish(self.topics.error(), codec.encode(body), spec.qos, spec.retain)
        except Exception:  # the caller is paho's thread or the worker: neither may die of it
            log.exception("error message not published", code=code)

    def _send(self, job: Job, message: Any, kind: str) -> bool:
        """Publish on the job's reply path; False (logged) when it could not be sent.

        Never raises: a broken connection or an unencodable payload must neither kill
        the worker nor count as an engine failure (which could make vlmd exit).
        """
        spec = SPEC[kind]
        reply = job.reply
        try:
            assert reply is not None, "asks always carry a reply path"
            retain = spec.retain or (reply.retain and kind == "answer")  # a dashboard sensor keeps its last answer
            self.publisher.publish(reply.topic, codec.encode(message), spec.qos, retain, reply.correlation_data)
            return True
        except Exception:
            log.exception("reply not published", request_id=job.job_id, kind=kind)
            return False


class Worker:
    """Runs one job at a time: `run(stop)` on a thread, or `step()` from a test."""

    def __init__(
        self,
        engine: Any,
        inbox: Inbox,
        scheduler: Scheduler,
        responder: Responder,
        limits: WorkerLimits = WorkerLimits(),
        clock: Callable[[], float] = time.monotonic,
        watches: WatchRegistry | None = None,
    ):
        from npu.engine import GenerationOptions, Prompt  # the engine's own value types

        self._prompt_type, self._options_type = Prompt, GenerationOptions
        self.engine = engine
        self.inbox = inbox
        self.scheduler = scheduler
        self.responder = responder
        self.limits = limits
        self.clock = clock
        self.abort = threading.Event()  # set at shutdown: the running job stops as `shutdown`
        self.last_progress = clock()  # service clock of the last step or token, for the watchdog
        self.consecutive_failures = 0
        self._thumbnails: dict[str, np.ndarray] = {}  # camera -> (32, 32) float32 of the last caption
        self.watch_runner = None if watches is None else WatchRunner(
            watches, engine, inbox, responder, self._decode, Prompt, GenerationOptions,
            min_change=lambda camera: self.scheduler.captions.get(camera, CaptionPolicy()).min_change,
            max_tokens=limits.default_max_tokens, should_stop=self.abort.is_set)

    @property
    def healthy(self) -> bool:
        return self.consecutive_failures < self.limits.max_consecutive_failures

    def run(self, stop: threading.Event, idle_s: float = 1.0) -> None:
        while not stop.is_set() and self.healthy:
            try:
                self.step(idle_s)
            except Exception:  # a bug in one turn must not kill the loop silently
                log.exception("worker step failed")
                self.consecutive_failures += 1

    def step(self, idle_s: float = 1.0) -> str:
        """One turn; returns what it did: "ask", "watch", "caption" or "idle"."""
        self.last_progress = now = self.clock()
        decision = self.scheduler.decide(now, self.inbox.queued(), self.inbox.camera_views())
        for job in decision.expired:
            if self.inbox.take(job, run=False):
                self.responder.final(job, "expired", error=("expired", "the request expired before it could run"))
        if decision.ask is not None and self.inbox.take(decision.ask):
            with log_context(request_id=decision.ask.job_id, camera=decision.ask.camera):
                self._run_ask(decision.ask)
            return "ask"
        if self.watch_runner is not None and self.watch_runner.step(now):  # after questions, before captions
            return "watch"
        if decision.caption_camera is not None:
            with log_context(camera=decision.caption_camera):
                self._run_caption(decision.caption_camera, now)
            return "caption"
        if not decision.expired:
            self.inbox.wait(idle_s if decision.wake_in is None else min(idle_s, decision.wake_in))
        return "idle"

    # -- questions -------------------------------------------------------------------

    def _run_ask(self, job: Job) -> None:
        try:  # inbox.take() made it the running job
            if job.cancel_event.is_set():
                self.responder.final(job, "cancelled", error=("cancelled", "cancelled before it started"))
                return
            if job.request.reset and not self._reset(job):
                return
            prompt = self._ask_prompt(job)
            self._generate(job, prompt, self._ask_options(job.request))
        except frame_codec.FrameError as exc:
            self.responder.final(job, "rejected", error=(exc.code, str(exc.message)))
        except Exception as exc:  # the engine's errors carry .code; anything else is a failure
            self._engine_failure(job, exc)
        finally:
            self.inbox.set_running(None)

    def _ask_prompt(self, job: Job) -> Any:
        request = job.request
        if job.frames:
            images = [self._decode(frame.data) for frame in job.frames]
            image_key = f"{job.camera}:" + ",".join(str(frame.seq) for frame in job.frames)
        elif request.image_b64:
            data = frame_codec.b64_image_bytes(request.image_b64, self.limits.frame_max_bytes)
            images = [self._decode(data)]
            image_key = "inline:" + hashlib.sha256(data).hexdigest()[:32]
        else:
            images, image_key = [], None
        return self._prompt_type(text=request.text, images=images, image_key=image_key, system=request.system,
                                 conversation=request.conversation)

    def _reset(self, job: Job) -> bool:
        """Forget the request's conversation; True when a question follows in the same request."""
        forgotten = self.engine.forget_conversation(job.request.conversation)
        log.info("conversation reset", conversation=job.request.conversation, existed=forgotten)
        if job.request.text is not None:
            return True
        self.responder.final(job, "stop", extra={"conversation": job.request.conversation, "turn": 0})
        return False

    def _ask_options(self, request: Any) -> Any:
        values = {
            "max_tokens": request.max_tokens or self.limits.default_max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "repetition_penalty": request.repetition_penalty,
            "seed": request.seed,
            "format": request.format,
        }
        return self._options_type(**{k: v for k, v in values.items() if v is not None})

    def _generate(self, job: Job, prompt: Any, options: Any) -> None:
        """Stream the engine's tokens to the job's reply topic and publish its final."""
        stopped_for: list[str] = []
        should_stop = self._stop_check(job, stopped_for)
        seq = 0
        for event in self.engine.generate(prompt, options, should_stop=should_stop):
            self.last_progress = self.clock()
            if hasattr(event, "finish_reason"):
                reason = stopped_for[0] if event.finish_reason == "cancelled" and stopped_for else event.finish_reason
                error = None if reason in ("stop", "length") else (reason, _STOP_MESSAGES.get(reason, reason))
                self.responder.stats.timings(event.timings)
                self.responder.stats.conversations = getattr(getattr(self.engine, "conversations", None), "stats",
                                                             dict)()
                self.responder.final(
                    job, reason, text=event.text, seq=seq, error=error,
                    usage=(event.prompt_tokens, event.completion_tokens), timings=event.timings,
                    extra=getattr(event, "extra", None),
                )
                self.consecutive_failures = 0
                return
            if event.delta and job.reply is not None and job.reply.stream:
                self.responder.chunk(job, seq, event.delta)
                seq += 1
        raise RuntimeError("the engine ended without a done event")

    def _stop_check(self, job: Job, stopped_for: list[str]) -> Callable[[], bool]:
        # a deadline holds while running too (docs/protocol.md): a late answer is of no use
        def should_stop() -> bool:
            if not stopped_for:
                if self.abort.is_set():
                    stopped_for.append("shutdown")
                elif job.cancel_event.is_set():
                    stopped_for.append("cancelled")
                elif job.expired(self.clock()):
                    stopped_for.append("expired")
            return bool(stopped_for)

        return should_stop

    def _engine_failure(self, job: Job, exc: Exception) -> None:
        code = getattr(exc, "code", None)
        if code in REQUEST_ERROR_CODES:
            self.responder.final(job, "rejected", error=(code, str(exc)))
            return
        log.error("engine failed", request_id=job.job_id, error=str(exc), exc_type=type(exc).__name__)
        self.consecutive_failures += 1
        self.responder.final(job, "failed", error=("engine_error", str(exc) or type(exc).__name__))

    # -- captions --------------------------------------------------------------------

    def _run_caption(self, camera: str, now: float) -> None:
        policy = self.scheduler.captions.get(camera)
        if policy is None:  # removed by a reload since the scheduler chose it
            return
        frames = self.inbox.frames(camera, 1)
        if not frames:
            return
        frame = frames[-1]
        self.scheduler.caption_started(camera, frame.seq, now)
        try:
            rgb = self._decode(frame.data)
        except frame_codec.FrameError as exc:
            log.warning("caption frame rejected", camera=camera, code=exc.code)
            self.responder.stats.count_caption("failed")
            return
        picture = thumbnail(rgb)
        if not changed(picture, self._thumbnails.get(camera), policy.min_change):
            self.responder.stats.count_caption("skipped")
            return
        if self._caption(camera, frame, rgb, policy):
            self._thumbnails[camera] = picture

    def _caption(self, camera: str, frame: Frame, rgb: np.ndarray, policy: CaptionPolicy) -> bool:
        """Stream one caption; True when it finished and was retained."""
        prompt = self._prompt_type(text=policy.prompt, images=[rgb], image_key=f"{camera}:{frame.seq}", system=None)
        options = self._options_type(max_tokens=policy.max_tokens)
        caption_id = f"{camera}-{frame.seq}"
        stream = self.responder.topics.caption_stream(camera)
        spec = SPEC["caption_stream"]
        seq = 0
        try:
            # a question arriving mid-caption goes first: the caption is dropped and redone after it
            should_stop = lambda: self.abort.is_set() or self.inbox.depth > 0  # noqa: E731
            for event in self.engine.generate(prompt, options, should_stop=should_stop):
                self.last_progress = self.clock()
                if hasattr(event, "finish_reason"):
                    return self._caption_done(camera, frame, caption_id, event, rgb)
                if event.delta:
                    chunk = payloads.CaptionChunk(camera=camera, seq=seq, delta=event.delta, caption_id=caption_id)
                    self.responder.publisher.publish(stream, codec.encode(chunk), spec.qos, spec.retain)
                    seq += 1
        except Exception as exc:
            log.error("caption failed", camera=camera, error=str(exc), exc_type=type(exc).__name__)
            self.responder.stats.count_caption("failed")
            if getattr(exc, "code", None) not in ("too_long", "bad_image"):
                self.consecutive_failures += 1
        return False

    def _caption_done(self, camera: str, frame: Frame, caption_id: str, event: Any, rgb: np.ndarray) -> bool:
        if event.finish_reason not in ("stop", "length"):  # the retained caption stays as it was
            if not self.abort.is_set():
                self.scheduler.caption_preempted(camera)
                self.responder.stats.count_caption("preempted")
            return False
        self.consecutive_failures = 0
        self.responder.stats.timings(event.timings)
        self.responder.stats.count_caption("done")
        caption = payloads.Caption(
            camera=camera, caption_id=caption_id, text=event.text, ts=self.responder.wall_clock(), frame_ts=frame.received_ts,
            finish_reason=event.finish_reason,
            usage={"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens},
            timings=event.timings,
        )
        spec, image = SPEC["caption"], SPEC["caption_image"]
        self.responder.publisher.publish(self.responder.topics.caption_image(camera), jpeg(rgb), image.qos, image.retain)
        self.responder.publisher.publish(self.responder.topics.caption(camera), codec.encode(caption), spec.qos, spec.retain)
        log.info("caption", camera=camera, frame_seq=frame.seq, chars=len(event.text))
        return True

    def _decode(self, data: bytes) -> np.ndarray:
        return frame_codec.decode_frame(data, self.limits.frame_max_bytes, self.limits.frame_max_pixels)


_STOP_MESSAGES = {
    "cancelled": "cancelled by a request on the cancel topic",
    "expired": "expires_ms passed while the answer was being generated",
    "shutdown": "the daemon is shutting down",
}


def _utf8_safe(text: str) -> str:
    """`text` with lone surrogates (which no UTF-8 encoder accepts) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")

