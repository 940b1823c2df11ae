"""Which job runs next: a pure decision over plain dataclasses, no threads, no MQTT.

Rules (DESIGN §5, the runtime issue):
- questions before captions; questions in arrival order;
- a queued question whose deadline (`expires_ms` after receipt) has passed is
  reported as expired, never run;
- a camera's caption is due when captions are on for it, it has a frame newer than
  the last one captioned, and `interval_s` has passed since its last caption attempt;
  among due cameras the one that waited longest goes first;
- a question that arrives while a caption runs stops the caption (the worker's
  should_stop); that caption is due again as soon as no question waits.

The scheduler keeps only caption bookkeeping (last attempt time and frame per camera).
Everything else is passed in, so `decide()` can be tested with lists and numbers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol, Sequence

from protocol.requests import Reply  # noqa: F401  (re-exported: Job.reply is one)
from protocol.watches import DEFAULT_MAX_AGE_S

# The change test's default threshold (daemon.frames): of the most-changed 1/64 of
# the frame, 13 levels of 255; an object on 2 % of the frame against its background is
# far above it, a re-encoded or slightly noisy frame of a still scene far below.
DEFAULT_MIN_CHANGE = 0.05

JobKind = Literal["ask", "caption"]


@dataclass(frozen=True)
class Frame:
    """Raw bytes of one received frame; decoded only when a job uses it."""

    camera: str
    seq: int  # per camera, starts at 1
    data: bytes
    received_ts: float  # wall clock (unix seconds), for captions' frame_ts
    received_at: float  # service clock, for ages


class ReplySink(Protocol):
    """Where a job's replies go instead of MQTT (an HTTP client's stream): the Responder
    hands it each chunk and the one final, already formatted as the wire's messages."""

    def chunk(self, message: Any) -> None: ...  # payloads.AnswerChunk

    def final(self, message: Any) -> None: ...  # payloads.AnswerFinal


@dataclass
class Job:
    """One unit of work for the engine. Gets exactly one final (see `claim_final`)."""

    kind: JobKind
    job_id: str  # the request id for asks, "caption-<camera>-<n>" for captions
    received_at: float  # service clock
    deadline: float | None = None  # service clock; None = never expires
    camera: str | None = None
    frames: tuple[Frame, ...] = ()  # pinned at receipt (asks) or at scheduling (captions)
    request: Any = None  # protocol AskRequest for asks
    reply: Reply | None = None
    sink: ReplySink | None = None  # replies go here, not to MQTT (reply is then None)
    interface: str = "mqtt"  # which interface asked: stats count outcomes by it
    chat: Any = None  # a whole chat (HTTP): protocol.openai.ChatAsk, its images' bytes fetched
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    _final_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _finalized: bool = field(default=False, repr=False)

    def claim_final(self) -> bool:
        """True exactly once: the caller that gets True publishes the final."""
        with self._final_lock:
            if self._finalized:
                return False
            self._finalized = True
            return True

    @property
    def finalized(self) -> bool:
        return self._finalized

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass(frozen=True)
class CaptionPolicy:
    """Per-camera caption settings (from config `[cameras.<name>]`)."""

    enabled: bool = False
    interval_s: float = 30.0
    prompt: str = "Describe the image in one sentence."
    max_tokens: int = 64
    min_change: float = DEFAULT_MIN_CHANGE  # a frame that changed less is not captioned again...
    max_age_s: float = DEFAULT_MAX_AGE_S  # ...unless the caption is this old


@dataclass(frozen=True)
class CameraView:
    """What the scheduler needs to know about a camera's frames."""

    newest_seq: int | None


@dataclass(frozen=True)
class Decision:
    expired: tuple[Job, ...] = ()  # queued asks to finish as `expired`
    ask: Job | None = None  # the question to run now
    caption_camera: str | None = None  # or: the camera to caption now
    wake_in: float | None = None  # seconds until something may become due; None = on input only


class Scheduler:
    """Decides the next job; remembers when each camera was last captioned."""

    def __init__(self, captions: Mapping[str, CaptionPolicy] | None = None):
        self.captions: dict[str, CaptionPolicy] = dict(captions or {})
        self._last_attempt: dict[str, float] = {}  # camera -> service clock
        self._last_seq: dict[str, int] = {}  # camera -> frame seq last captioned

    def decide(self, now: float, queued: Sequence[Job], cameras: Mapping[str, CameraView]) -> Decision:
        expired = tuple(job for job in queued if job.expired(now))
        waiting = [job for job in queued if not job.expired(now)]
        if waiting:
            return Decision(expired=expired, ask=waiting[0])
        camera, wake_in = self._due_caption(now, cameras)
        return Decision(expired=expired, caption_camera=camera, wake_in=wake_in)

    def caption_started(self, camera: str, frame_seq: int, now: float) -> None:
        """Record an attempt (run or skipped as unchanged): the next one waits interval_s."""
        self._last_attempt[camera] = now
        self._last_seq[camera] = frame_seq

    def caption_preempted(self, camera: str) -> None:
        """A caption gave way to a question: due again as soon as no question waits."""
        self._last_attempt.pop(camera, None)
        self._last_seq.pop(camera, None)

    def _due_caption(self, now: float, cameras: Mapping[str, CameraView]) -> tuple[str | None, float | None]:
        due: list[tuple[float, str]] = []
        wake_in: float | None = None
        for camera, policy in self.captions.items():
            view = cameras.get(camera)
            if not policy.enabled or view is None or view.newest_seq is None:
                continue
            if self._last_seq.get(camera) == view.newest_seq:
                continue  # nothing new to describe; a new frame wakes the worker
            last = self._last_attempt.get(camera)
            ready_at = now if last is None else last + policy.interval_s
            if ready_at <= now:
                due.append((ready_at, camera))
            else:
                wake_in = ready_at - now if wake_in is None else min(wake_in, ready_at - now)
        if due:
            return min(due)[1], None
        return None, wake_in
