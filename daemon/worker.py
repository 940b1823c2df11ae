"""The worker: one loop on its own thread that runs jobs on the engine and streams them.

Each turn reads top to bottom: ask the scheduler, finish expired questions, run one
question, one watch or one caption (or sleep until something arrives), record progress for
the watchdog. A question that arrives while a watch or a caption runs stops it at its next
token; the watch or caption is due again once no question waits (its state untouched). Every job leaves through `Responder.final` (questions) or a retained caption,
so each request gets exactly one final whatever the engine does.

Knows the engine only by its interface (`npu.engine.EngineLike`: `generate(prompt,
options, should_stop)` yielding TokenEvents then one DoneEvent), so tests drive it with
a fake engine. Errors are told apart by type: a `RequestError` (too long, bad image,
options the model cannot honour) is a refusal (`rejected`); anything else the engine
raises is a failure (`failed`) and counts toward `max_consecutive_failures`. Knows MQTT
only through a `Publisher`, and publishes only through the `Responder`.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from daemon import memory
from daemon.frames import RecentFrames, changed, jpeg
from daemon.inbox import Inbox
from daemon.logs import get_logger, log_context
from daemon.responder import Responder
from daemon.scheduler import CaptionPolicy, Frame, Job, Scheduler
from daemon.home.watches import WatchRegistry, WatchRunner
from npu.engine import DoneEvent, EngineError, EngineLike, GenerationOptions, Prompt, RequestError
from npu.text.messages import IMAGE, ChatMessage
from protocol import frames as frame_codec

log = get_logger("vlmd.worker")


@dataclass(frozen=True)
class WorkerLimits:
    default_max_tokens: int = 256
    frame_max_bytes: int = 8_000_000
    frame_max_pixels: int = 40_000_000
    max_consecutive_failures: int = 3


class Worker:
    """Runs one job at a time: `run(stop)` on a thread, or `step()` from a test."""

    def __init__(
        self,
        engine: EngineLike,
        inbox: Inbox,
        scheduler: Scheduler,
        responder: Responder,
        limits: WorkerLimits = WorkerLimits(),
        clock: Callable[[], float] = time.monotonic,
        watches: WatchRegistry | None = None,
    ):
        self.engine = engine
        self.inbox = inbox
        self.scheduler = scheduler
        self.responder = responder
        self.limits = limits
        self.clock = clock
        self.abort = threading.Event()  # set at shutdown: the running job stops as `shutdown`
        self.last_progress = clock()  # service clock of the last step or token, for the watchdog
        self.consecutive_failures = 0
        self._thumbnails: dict[str, np.ndarray] = {}  # camera -> (32, 32, 3) float32 of the last caption
        self._captioned_at: dict[str, float] = {}  # camera -> service clock of the last caption (max_age_s)
        # camera frames: decoded once for every reader, within what the raw frames leave of the budget
        self._frames = RecentFrames(self._decode, budget=self._decoded_budget)
        self._decoded_at_release = 0  # RecentFrames.num_decoded when free memory was last released
        self.watch_runner = None if watches is None else WatchRunner(
            watches, engine, inbox, responder, self._frames.rgb, self._frames.thumbnail,
            min_change=lambda camera: self.scheduler.captions.get(camera, CaptionPolicy()).min_change,
            max_tokens=limits.default_max_tokens, should_stop=self.abort.is_set, preempt=self._question_waits)

    def _decoded_budget(self) -> int | None:
        limit = self.inbox.max_total_bytes
        return None if limit is None else max(0, limit - self.inbox.frame_bytes)

    @property
    def decoded_frame_bytes(self) -> int:
        """Bytes of the decoded frames the worker keeps (they count in `[frames] max_total_bytes`)."""
        return self._frames.nbytes

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
            self._frames.trim()  # raw frames that arrived meanwhile may have used the budget's room
            if self._frames.num_decoded != self._decoded_at_release:  # what decoding left free goes back
                self._decoded_at_release = self._frames.num_decoded
                memory.release_free_memory()
            self.inbox.wait(idle_s if decision.wake_in is None else min(idle_s, decision.wake_in))
        return "idle"

    # -- questions -------------------------------------------------------------------

    def _run_ask(self, job: Job) -> None:
        progress = _Progress()
        try:  # inbox.take() made it the running job
            if job.cancel_event.is_set():
                self.responder.final(job, "cancelled", error=("cancelled", "cancelled before it started"))
                return
            if job.request.reset and not self._reset(job):
                return
            prompt = self._ask_prompt(job) if job.chat is None else self._chat_prompt(job.chat)
            stop = () if job.chat is None else job.chat.stop
            self._generate(job, prompt, self._ask_options(job.request, stop), progress)
        except frame_codec.FrameError as exc:
            self.responder.final(job, "rejected", error=(exc.code, str(exc.message)))
        except RequestError as exc:  # what was asked, not the engine: never counts as a failure
            self.responder.final(job, "rejected", error=(exc.code, exc.message))
        except Exception as exc:  # the engine failed (or a bug): counts toward max_consecutive_failures
            self._engine_failure(job, exc, progress)
        finally:
            self.inbox.set_running(None)

    def _ask_prompt(self, job: Job) -> Prompt:
        request = job.request
        if job.frames:
            images = [self._frames.rgb(frame.data) for frame in job.frames]
            image_key = f"{job.camera}:" + ",".join(str(frame.seq) for frame in job.frames)
        elif request.image_b64:
            data = frame_codec.b64_image_bytes(request.image_b64, self.limits.frame_max_bytes)
            images = [self._decode(data)]
            image_key = "inline:" + hashlib.sha256(data).hexdigest()[:32]
        else:
            images, image_key = [], None
        return Prompt(text=request.text, images=images, image_key=image_key, system=request.system,
                      conversation=request.conversation, conversation_owner=self._owner(job))

    def _owner(self, job: Job) -> str:
        """Who asks, for the conversations it opens (#21.3): the reply path the client
        named (reply_to or MQTT 5 response topic); "" for every client that named none
        (their replies go to `<root>/answer/<id>`, one topic per request, no identity)."""
        topic = job.reply.topic if job.reply is not None else ""
        return "" if topic == self.responder.topics.answer(job.job_id) else topic

    def _chat_prompt(self, chat: Any) -> Prompt:
        """A whole chat (protocol.openai.ChatAsk): its messages in order, each image part decoded
        by the frames' rules (a bad one is refused naming where it was)."""
        images, messages = [], []
        for role, parts in chat.messages:
            converted = []
            for part in parts:
                if isinstance(part, str):
                    converted.append(part)
                    continue
                try:
                    images.append(self._decode(part.data))
                except frame_codec.FrameError as exc:
                    raise frame_codec.FrameError(exc.code, f"{part.param}: {exc.message}") from None
                converted.append(IMAGE)
            messages.append(ChatMessage(role, tuple(converted)))
        return Prompt(text=chat.ask.text, images=images, messages=tuple(messages))

    def _reset(self, job: Job) -> bool:
        """Forget the request's conversation; True when a question follows in the same request."""
        forgotten = self.engine.forget_conversation(job.request.conversation, owner=self._owner(job))
        log.info("conversation reset", conversation=job.request.conversation, existed=forgotten)
        if job.request.text is not None:
            return True
        self.responder.final(job, "stop", extra={"conversation": job.request.conversation, "turn": 0})
        return False

    def _ask_options(self, request: Any, stop: tuple[str, ...] = ()) -> GenerationOptions:
        values = {
            "max_tokens": request.max_tokens or self.limits.default_max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "repetition_penalty": request.repetition_penalty,
            "seed": request.seed,
            "format": request.format,
            "stop": stop or None,
        }
        # The model's sampling defaults (its package's, then config's) stand in for the fields
        # the request did not send.
        defaults = getattr(getattr(self.engine, "model", None), "sampling_defaults", None) or {}
        sent = getattr(request, "model_fields_set", values.keys())
        values.update({k: v for k, v in defaults.items() if k in values and k not in sent})
        return GenerationOptions(**{k: v for k, v in values.items() if v is not None})

    def _generate(self, job: Job, prompt: Prompt, options: GenerationOptions, progress: _Progress) -> None:
        """Stream the engine's tokens to the job's reply topic and publish its final;
        `progress` keeps what was sent, for a failure's final."""
        stopped_for: list[str] = []
        should_stop = self._stop_check(job, stopped_for)
        for event in self.engine.generate(prompt, options, should_stop=should_stop):
            self.last_progress = self.clock()
            if isinstance(event, DoneEvent):
                reason = stopped_for[0] if event.finish_reason == "cancelled" and stopped_for else event.finish_reason
                error = None if reason in ("stop", "length") else (reason, _STOP_MESSAGES.get(reason, reason))
                self.responder.stats.timings(event.timings)
                if job.request.conversation is not None:  # engines without conversations need no such method
                    self.responder.stats.conversations = self.engine.conversation_stats()
                self.responder.final(
                    job, reason, text=event.text, seq=progress.seq, error=error,
                    usage=(event.prompt_tokens, event.completion_tokens), timings=event.timings, extra=event.extra,
                )
                self.consecutive_failures = 0
                return
            progress.pieces.append(event.delta)
            progress.num_tokens += 1
            streamed = job.reply.stream if job.reply is not None else job.sink is not None and job.request.stream
            if event.delta and streamed:
                self.responder.chunk(job, progress.seq, event.delta)
                progress.seq += 1
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

    def _engine_failure(self, job: Job, exc: Exception, progress: _Progress) -> None:
        log.error("engine failed", request_id=job.job_id, error=str(exc), exc_type=type(exc).__name__)
        self.consecutive_failures += 1
        engine_error = isinstance(exc, EngineError)
        code = exc.code if engine_error else "engine_error"
        prompt_tokens = exc.prompt_tokens if engine_error else 0
        # the protocol's final after chunks 0..n-1: seq n, the text and usage so far
        self.responder.final(job, "failed", error=(code, str(exc) or type(exc).__name__),
                             text="".join(progress.pieces), seq=progress.seq, usage=(prompt_tokens, progress.num_tokens))

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
            rgb = self._frames.rgb(frame.data)
        except frame_codec.FrameError as exc:
            log.warning("caption frame rejected", camera=camera, code=exc.code)
            self.responder.stats.count_caption("failed")
            return
        picture = self._frames.thumbnail(rgb)
        fresh = now - self._captioned_at.get(camera, -math.inf) < policy.max_age_s
        if fresh and not changed(picture, self._thumbnails.get(camera), policy.min_change):
            self.responder.stats.count_caption("skipped")
            return
        if self._caption(camera, frame, rgb, policy):
            self._thumbnails[camera], self._captioned_at[camera] = picture, now

    def _caption(self, camera: str, frame: Frame, rgb: np.ndarray, policy: CaptionPolicy) -> bool:
        """Stream one caption; True when it finished and was retained."""
        prompt = Prompt(text=policy.prompt, images=[rgb], image_key=f"{camera}:{frame.seq}", system=None)
        options = GenerationOptions(max_tokens=policy.max_tokens)
        caption_id = f"{camera}-{frame.seq}"
        seq = 0
        try:
            # a question arriving mid-caption goes first: the caption is dropped and redone after it
            should_stop = lambda: self.abort.is_set() or self._question_waits()  # noqa: E731
            for event in self.engine.generate(prompt, options, should_stop=should_stop):
                self.last_progress = self.clock()
                if isinstance(event, DoneEvent):
                    return self._caption_done(camera, frame, caption_id, event, rgb)
                if event.delta:
                    self.responder.caption_chunk(camera, caption_id, seq, event.delta)
                    seq += 1
        except Exception as exc:
            log.error("caption failed", camera=camera, error=str(exc), exc_type=type(exc).__name__)
            self.responder.stats.count_caption("failed")
            if not isinstance(exc, RequestError):  # a caption prompt too long for the model is not the NPU's fault
                self.consecutive_failures += 1
        return False

    def _caption_done(self, camera: str, frame: Frame, caption_id: str, event: DoneEvent, rgb: np.ndarray) -> bool:
        if event.finish_reason not in ("stop", "length"):  # the retained caption stays as it was
            if not self.abort.is_set():
                self.scheduler.caption_preempted(camera)
                self.responder.stats.count_caption("preempted")
            return False
        self.consecutive_failures = 0
        self.responder.caption(camera, caption_id, frame, event, image=jpeg(rgb))
        log.info("caption", camera=camera, frame_seq=frame.seq, chars=len(event.text))
        return True

    def _question_waits(self) -> bool:
        """A queued question stops a running watch or caption at its next token."""
        return self.inbox.depth > 0

    def _decode(self, data: bytes) -> np.ndarray:
        return frame_codec.decode_frame(data, self.limits.frame_max_bytes, self.limits.frame_max_pixels)


@dataclass
class _Progress:
    """What a question has streamed so far: the failure final repeats it."""

    seq: int = 0  # next chunk number
    pieces: list[str] = field(default_factory=list)  # every delta, sent or empty
    num_tokens: int = 0


_STOP_MESSAGES = {
    "cancelled": "cancelled by a request on the cancel topic",
    "expired": "expires_ms passed while the answer was being generated",
    "shutdown": "the daemon is shutting down",
}

