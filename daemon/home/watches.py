"""Watches: standing typed questions per camera, answered on changed frames, with a
retained state that flips after `debounce` agreeing answers and an event per change.

- `WatchRegistry` holds the watches of the config file (`[[watches]]`) and of retained
  MQTT messages (`<root>/watches/<name>/config`; an empty payload deletes one), checks
  them (known camera, limits) and is shared by the MQTT thread and the worker (a lock).
- `due_watch(now, watches, cameras)` decides which watch answers next (pure): one whose
  camera has a frame it has not looked at and whose `interval_s` has passed, the one
  waiting longest first. The worker asks it after questions and before captions.
- `observe(watch, value, ...)` is the state machine (pure): the value changes after
  `debounce` agreeing answers in a row; the first value after a start sets the state
  without an event (there was nothing to change from).
- `WatchRunner.step(now)` runs one due watch: the captions' change test (a frame that did
  not change is not asked about), the question with its format on the engine (same image
  key and system as captions and questions on that frame, so the image's KV prefix is
  shared), then the retained state and, on a change, the event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.frames import changed, thumbnail
from daemon.logs import get_logger
from daemon.scheduler import CameraView
from npu.engine import DoneEvent, GenerationOptions, Prompt, RequestError
from protocol.codec import ProtocolError
from protocol.frames import FrameError
from protocol.watches import WatchDefinition, WatchEvent, WatchState, decode_watch

log = get_logger("vlmd.watches")


@dataclass
class Watch:
    """One watch and what it has seen."""

    definition: WatchDefinition  # name always set
    source: str  # "config" | "mqtt"
    value: Any = None
    has_value: bool = False
    since: float | None = None  # wall clock
    confidence: float | None = None
    candidate: Any = None
    num_agreeing: int = 0
    last_run_at: float | None = None  # service clock of the last look at a frame
    last_seq: int | None = None
    thumbnail: np.ndarray | None = None  # of the last frame answered

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def camera(self) -> str:
        return self.definition.camera


@dataclass(frozen=True)
class WatchLimits:
    max_watches: int = 16
    min_interval_s: float = 1.0


@dataclass
class Change:
    """What `WatchRegistry.apply` did: the watch added or replaced, or the name deleted."""

    name: str
    added: Watch | None = None
    deleted: bool = False


class WatchRegistry:
    """Every watch by name; thread-safe (one short lock)."""

    def __init__(self, limits: WatchLimits = WatchLimits(), known_camera: Callable[[str], bool] = lambda _: True):
        self.limits = limits
        self.known_camera = known_camera
        self._watches: dict[str, Watch] = {}
        self._lock = threading.Lock()

    def watches(self) -> list[Watch]:
        with self._lock:
            return list(self._watches.values())

    def get(self, name: str) -> Watch | None:
        with self._lock:
            return self._watches.get(name)

    def set_config_watches(self, definitions: Iterable[WatchDefinition]) -> list[Change]:
        """The config file's watches (start and reload): replaces the previous ones; a watch
        whose definition did not change keeps its state."""
        changes = []
        with self._lock:
            wanted = {d.name: d for d in definitions}
            for name, watch in list(self._watches.items()):
                if watch.source == "config" and name not in wanted:
                    del self._watches[name]
                    changes.append(Change(name, deleted=True))
            for name, definition in wanted.items():
                current = self._watches.get(name)
                if current is None or current.definition != definition:
                    self._watches[name] = Watch(definition, "config")
                    changes.append(Change(name, added=self._watches[name]))
        return changes

    def apply(self, name: str, payload: bytes) -> Change | None:
        """A retained message on `<root>/watches/<name>/config`. Raises ProtocolError (for
        <root>/error) when it cannot be applied; None when nothing changed."""
        with self._lock:
            current = self._watches.get(name)
        if current is not None and current.source == "config":
            raise ProtocolError("bad_request", f"watch {name!r} is defined in the config file; change it there"
                                               " (or pick another name)")
        if not payload:
            with self._lock:
                removed = self._watches.pop(name, None)
            return Change(name, deleted=True) if removed is not None else None
        definition = decode_watch(payload, name)
        self.check(definition)
        with self._lock:
            current = self._watches.get(name)
            if current is not None and current.definition == definition:
                return None  # the same retained message again (a reconnect)
            if current is None and len(self._watches) >= self.limits.max_watches:
                raise ProtocolError("limit", f"there are already {len(self._watches)} watches, the limit"
                                             " (watch_limits.max_watches)")
            self._watches[name] = Watch(definition, "mqtt")
            return Change(name, added=self._watches[name])

    def check(self, definition: WatchDefinition) -> None:
        if not self.known_camera(definition.camera):
            raise ProtocolError("unknown_camera", f"camera: {definition.camera!r} is not configured and has sent no"
                                                  " frame (list it under [cameras] so that watches on it survive a restart)")
        if definition.interval_s < self.limits.min_interval_s:
            raise ProtocolError("bad_request", f"interval_s: {definition.interval_s:g} is below the shortest allowed,"
                                               f" {self.limits.min_interval_s:g} (watch_limits.min_interval_s)")


def due_watch(now: float, watches: Iterable[Watch], cameras: Mapping[str, CameraView]) -> tuple[Watch | None, float | None]:
    """The watch to answer now (longest waiting first), else None and the seconds until one
    may be due (None: only a new frame can make one due)."""
    due: list[tuple[float, str, Watch]] = []
    wake_in: float | None = None
    for watch in watches:
        view = cameras.get(watch.camera)
        if view is None or view.newest_seq is None or view.newest_seq == watch.last_seq:
            continue
        ready_at = now if watch.last_run_at is None else watch.last_run_at + watch.definition.interval_s
        if ready_at <= now:
            due.append((ready_at, watch.name, watch))
        else:
            wake_in = ready_at - now if wake_in is None else min(wake_in, ready_at - now)
    if due:
        return min(due, key=lambda item: item[:2])[2], None
    return None, wake_in


def observe(watch: Watch, value: Any, confidence: float | None, now: float) -> Any | None:
    """Count one answer; returns the previous value when the state just changed (a
    `_Unset` marker for the first value), else None. `now` is the wall clock."""
    if watch.has_value and _same(value, watch.value):
        watch.candidate, watch.num_agreeing = None, 0
        watch.confidence = confidence
        return None
    if watch.num_agreeing and _same(value, watch.candidate):
        watch.num_agreeing += 1
    else:
        watch.candidate, watch.num_agreeing = value, 1
    if watch.num_agreeing < watch.definition.debounce:
        return None
    previous = watch.value if watch.has_value else UNSET
    watch.value, watch.has_value, watch.since, watch.confidence = value, True, now, confidence
    watch.candidate, watch.num_agreeing = None, 0
    return previous


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b  # True is not 1


@dataclass
class WatchRunner:
    """Runs due watches on the worker's engine and publishes their states and events."""

    registry: WatchRegistry
    engine: Any
    inbox: Any
    responder: Any  # daemon.responder.Responder: publishes the states and events
    decode: Callable[[bytes], np.ndarray]
    thumbnail: Callable[[np.ndarray], np.ndarray] = thumbnail
    min_change: Callable[[str], float] = lambda camera: 0.02
    max_tokens: int = 64
    should_stop: Callable[[], bool] = lambda: False
    counts: dict[str, int] = field(default_factory=lambda: {"answered": 0, "unchanged": 0, "failed": 0, "changes": 0})

    def step(self, now: float) -> bool:
        """Answer one due watch; False when none was due."""
        watch, _ = due_watch(now, self.registry.watches(), self.inbox.camera_views())
        if watch is None:
            return False
        frames = self.inbox.frames(watch.camera, 1)
        if not frames:
            return False
        frame = frames[-1]
        watch.last_run_at, watch.last_seq = now, frame.seq
        try:
            rgb = self.decode(frame.data)
        except FrameError as exc:
            log.warning("watch frame rejected", watch=watch.name, code=exc.code)
            self.counts["failed"] += 1
            return True
        picture = self.thumbnail(rgb)
        if not changed(picture, watch.thumbnail, self.min_change(watch.camera)):
            self.counts["unchanged"] += 1
            return True
        done = self._answer(watch, frame, rgb)
        if done is not None:
            watch.thumbnail = picture
            self._publish(watch, done.extra["value"], done.extra.get("confidence"), frame.received_ts)
        return True

    def _answer(self, watch: Watch, frame: Any, rgb: np.ndarray) -> Any | None:
        definition = watch.definition
        prompt = Prompt(text=definition.question, images=[rgb], image_key=f"{watch.camera}:{frame.seq}", system=None)
        options = GenerationOptions(max_tokens=self.max_tokens, format=definition.format)
        try:
            for event in self.engine.generate(prompt, options, should_stop=self.should_stop):
                if isinstance(event, DoneEvent):
                    if event.finish_reason == "stop" and "value" in event.extra:
                        self.counts["answered"] += 1
                        return event
                    log.info("watch answer not finished", watch=watch.name, finish_reason=event.finish_reason)
                    return None
        except RequestError as exc:  # what the watch asks, not the engine: logged, never a failure
            log.warning("watch refused by the engine", watch=watch.name, code=exc.code, error=exc.message)
            self.counts["failed"] += 1
        return None

    def _publish(self, watch: Watch, value: Any, confidence: float | None, frame_ts: float) -> None:
        now = self.responder.wall_clock()
        previous = observe(watch, value, confidence, now)
        event = None
        if previous is not None and previous is not UNSET:
            self.counts["changes"] += 1
            event = WatchEvent(name=watch.name, camera=watch.camera, value=watch.value, previous=previous,
                               confidence=confidence, ts=now, frame_ts=frame_ts)
            log.info("watch changed", watch=watch.name, value=watch.value, previous=previous)
        state = WatchState(name=watch.name, camera=watch.camera, value=watch.value, confidence=watch.confidence,
                           since=watch.since, updated=now, frame_ts=frame_ts)
        self.responder.watch(state, event)
