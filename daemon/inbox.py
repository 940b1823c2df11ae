"""The hand-over point between paho's network thread and the worker.

Thread-safe and never blocking for the producer side: every method holds one lock
for a few dictionary operations. Only the worker calls `wait()`.

Holds:
- per camera, a small ring of the newest raw frames (decoded only when a job uses
  them). A frame that falls out of the ring without any job having used it counts
  as dropped. The frames of all cameras together stay within `max_total_bytes`: a new
  frame that would exceed it evicts the frames of the least recently active camera
  (a frame received or used; unconfigured cameras before the `configured` ones), or
  the oldest of its own camera's when it is alone;
  `expire_cameras` forgets cameras idle for too long;
- the bounded queue of questions (captions are not queued: the scheduler creates
  them from the frames when they are due);
- the job currently running, so `cancel` can reach it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Collection, Literal

from daemon.scheduler import CameraView, Frame, Job


@dataclass
class _CameraSlot:
    ring: deque  # of Frame, newest last, maxlen = history
    used: set = field(default_factory=set)  # seqs of ring frames some job used
    received: int = 0
    dropped: int = 0
    last_active: float = 0.0  # service clock of the last frame received or used
    num_bytes: int = 0  # of the frames in the ring


SubmitResult = Literal["queued", "busy", "closed"]
CancelResult = Literal["queued", "running", "unknown"]


class Inbox:
    """Frames, queued questions and the running job, shared by the MQTT and worker threads."""

    def __init__(
        self,
        queue_size: int = 16,
        frame_history: int = 4,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_total_bytes: int | None = None,
    ):
        if queue_size < 1 or frame_history < 1:
            raise ValueError("queue_size and frame_history must be >= 1")
        self.queue_size = queue_size
        self.frame_history = frame_history
        self.max_total_bytes = max_total_bytes  # None: no overall bound
        self.configured: frozenset[str] = frozenset()  # evicted last (a reference swap, set by the service)
        self._total_bytes = 0
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._cameras: dict[str, _CameraSlot] = {}
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False

    # -- frames (MQTT thread) -------------------------------------------------------

    def put_frame(self, camera: str, data: bytes) -> Frame:
        with self._lock:
            slot = self._cameras.get(camera)
            if slot is None:
                slot = self._cameras[camera] = _CameraSlot(ring=deque(maxlen=self.frame_history))
            slot.received += 1
            frame = Frame(camera, slot.received, data, self._wall_clock(), self._clock())
            slot.last_active = frame.received_at
            if len(slot.ring) == slot.ring.maxlen:
                self._drop_oldest(slot)
            slot.ring.append(frame)
            slot.num_bytes += len(data)
            self._total_bytes += len(data)
            self._keep_within_budget(slot)
            self._changed.notify_all()
            return frame

    def _drop_oldest(self, slot: _CameraSlot) -> None:
        evicted = slot.ring.popleft()
        slot.num_bytes -= len(evicted.data)
        self._total_bytes -= len(evicted.data)
        if evicted.seq in slot.used:
            slot.used.discard(evicted.seq)
        else:
            slot.dropped += 1

    def _keep_within_budget(self, current: _CameraSlot) -> None:
        """Evict whole least-recently-active cameras, unconfigured ones first (then the
        current camera's oldest frames, never its newest) until all frames fit
        `max_total_bytes`."""
        if self.max_total_bytes is None:
            return
        while self._total_bytes > self.max_total_bytes:
            others = [(name in self.configured, slot.last_active, name) for name, slot in self._cameras.items()
                      if slot.ring and slot is not current]
            if others:
                victim = self._cameras[min(others)[2]]
                while victim.ring:
                    self._drop_oldest(victim)
            elif len(current.ring) > 1:
                self._drop_oldest(current)
            else:
                return  # one frame is at most frames.max_bytes, which the config keeps below the budget

    def frames(self, camera: str, count: int = 1) -> tuple[Frame, ...]:
        """The newest `count` frames of `camera`, oldest first (fewer if fewer are held).

        Marks them used, so they do not count as dropped when they leave the ring.
        """
        with self._lock:
            slot = self._cameras.get(camera)
            if slot is None or count < 1:
                return ()
            picked = tuple(slot.ring)[-count:]
            slot.used.update(frame.seq for frame in picked)
            if picked:
                slot.last_active = self._clock()
            return picked

    def expire_cameras(self, idle_s: float, keep: Collection[str] = ()) -> list[str]:
        """Forget the cameras (frames and counts) not in `keep` whose last frame was
        received or used more than `idle_s` ago; returns their names."""
        with self._lock:
            cutoff = self._clock() - idle_s
            names = [name for name, slot in self._cameras.items() if name not in keep and slot.last_active < cutoff]
            for name in names:
                slot = self._cameras.pop(name)
                self._total_bytes -= slot.num_bytes
            return names

    @property
    def frame_bytes(self) -> int:
        """Bytes of every camera's kept frames together."""
        with self._lock:
            return self._total_bytes

    def has_camera(self, camera: str) -> bool:
        with self._lock:
            return camera in self._cameras

    def camera_names(self) -> list[str]:
        with self._lock:
            return list(self._cameras)

    def camera_views(self) -> dict[str, CameraView]:
        with self._lock:
            return {
                name: CameraView(slot.ring[-1].seq if slot.ring else None) for name, slot in self._cameras.items()
            }

    def frame_counts(self) -> dict[str, dict[str, int]]:
        """{camera: {"received": n, "dropped": n}} for stats."""
        with self._lock:
            return {name: {"received": s.received, "dropped": s.dropped} for name, s in self._cameras.items()}

    # -- questions (MQTT thread) -----------------------------------------------------

    def submit(self, job: Job) -> SubmitResult:
        """Queue a question; "busy" when the queue is full, "closed" after `close()`."""
        with self._lock:
            if self._closed:
                return "closed"
            if len(self._queue) >= self.queue_size:
                return "busy"
            self._queue.append(job)
            self._changed.notify_all()
            return "queued"

    def cancel(self, request_id: str, reply_topic: str | None = None) -> tuple[CancelResult, Job | None]:
        """Remove a queued job (returned, for its final) or flag the running one. With
        `reply_topic`, only a job answered on that topic: ids are unique per client, so a
        cancel from one client never reaches another's request of the same id."""
        def named(job: Job) -> bool:
            return job.job_id == request_id and (
                reply_topic is None or (job.reply is not None and job.reply.topic == reply_topic))

        with self._lock:
            for job in self._queue:
                if named(job) and job.kind == "ask":
                    self._queue.remove(job)
                    job.cancel_event.set()
                    self._changed.notify_all()
                    return "queued", job
            if self._running is not None and named(self._running):
                self._running.cancel_event.set()
                return "running", self._running
            return "unknown", None

    # -- worker side -----------------------------------------------------------------

    def queued(self) -> list[Job]:
        with self._lock:
            return list(self._queue)

    @property
    def depth(self) -> int:
        with self._lock:
            return len(self._queue)

    def take(self, job: Job, run: bool = True) -> bool:
        """Move a queued job out of the queue (and make it the running one when `run`);
        False if it left meanwhile (cancelled, or returned by `close`)."""
        with self._lock:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            if run:
                self._running = job
            return True

    def set_running(self, job: Job | None) -> None:
        with self._lock:
            self._running = job

    @property
    def running(self) -> Job | None:
        with self._lock:
            return self._running

    def wait(self, timeout: float | None) -> None:
        """Sleep until something arrives (frame, question, cancel, close) or `timeout`."""
        with self._changed:
            if self._closed:
                return
            self._changed.wait(timeout)

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def close(self) -> list[Job]:
        """Refuse new questions from now on; return (and forget) the queued ones."""
        with self._lock:
            self._closed = True
            jobs = list(self._queue)
            self._queue.clear()
            self._changed.notify_all()
            return jobs

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed
