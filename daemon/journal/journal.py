"""The request journal: exactly one final per request across a crash, and idempotent ids.

Every accepted request is written here before the broker gets its PUBACK (the MQTT
handler runs synchronously and MqttClient acknowledges after it returns), with what it
needs to run again: the validated request (inline image included), its reply path
(topic, MQTT 5 correlation data, stream flag), when it was received and when it expires,
and the references of the camera frames it pinned. Every final is written before it is
published, and marked delivered when the broker acknowledges it (QoS 1).

At start `recover()` reads the file back (up to its last whole record) and says what is
owed: requests accepted without a final (the service runs them again or fails them as
`restarted`) and finals that were not acknowledged (published again, byte for byte).

The same records are the id window (#15.4, #21): a request is known by its `RequestKey`,
(id, reply topic, MQTT 5 correlation data), so ids belong to the client that chose them
(two clients asking "q1" are two requests), and by a digest of its content. Within
`id_window_s` a repeat with the same key and the same digest is a retransmission and is
not run again; `lookup` says whether it is still in progress or which final to
republish. The same key with other content is `"conflict"` while the first is queued or
running (refused where it cannot touch the first: never on its reply path, never in its
entry) and a new request once the first has its final. Finals that invite a retry
(`rejected`, `shutdown`) leave the window once delivered. Memory and file stay bounded: entries leave the window after
`id_window_s` or beyond `id_window_max`, and the file is compacted (rewritten with only
the live records) once it is larger than `compact_bytes` and twice its live records. A
request whose record would push the live journal beyond `max_bytes` is journaled without
its inline image (after a crash it fails as `restarted`).

`Journal(None, ...)` keeps the id window in memory only (`[journal] enabled = false`,
or a journal file that cannot be opened).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from daemon.config import Config
from daemon.journal.file import RecordFile, StoredRecord, encode_record
from daemon.logs import get_logger
from daemon.scheduler import Job
from protocol.requests import Reply

log = get_logger("vlmd.journal")

RETRY_INVITED = frozenset({"rejected", "shutdown"})  # finals that do not hold their id in the window

RequestKey = tuple[str, str, "bytes | None"]  # (request id, reply topic, correlation data): one client's request


def request_key(request_id: str, topic: str, correlation_data: bytes | None) -> RequestKey:
    return (request_id, topic, correlation_data)


def request_digest(request: Any) -> str:
    """What a request asks, as a short hash of its validated fields (key order and
    whitespace of the JSON the client sent do not matter): a retransmission has the same."""
    fields = request.model_dump(mode="json", exclude_none=True)
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class JournalLimits:
    max_bytes: int = 64_000_000
    compact_bytes: int = 4_000_000
    id_window_s: float = 600.0
    id_window_max: int = 2000


@dataclass(frozen=True)
class FinalRecord:
    """A final exactly as it was (or will be) published."""

    request_id: str
    topic: str
    payload: bytes
    correlation_data: bytes | None
    finish_reason: str

    @property
    def key(self) -> RequestKey:
        return request_key(self.request_id, self.topic, self.correlation_data)


@dataclass(frozen=True)
class PendingAsk:
    """A request accepted by an earlier run that never got a final."""

    request_id: str
    reply: Reply
    received_ts: float  # wall clock
    expires_ts: float | None  # wall clock
    request: dict[str, Any]  # AskRequest fields as JSON (validate again before running)
    frames: list[dict[str, Any]]  # [{"camera", "seq", "received_ts"}] it was asked about
    image_dropped: bool  # the inline image did not fit the journal


@dataclass
class Recovery:
    pending: list[PendingAsk] = field(default_factory=list)
    unacknowledged: list[FinalRecord] = field(default_factory=list)
    discarded_bytes: int = 0  # a torn or corrupt tail that was cut off


@dataclass
class _Entry:
    ask_span: tuple[int, int] | None = None  # its acceptance record in the file
    final: FinalRecord | None = None
    delivered: bool = False
    finished_ts: float = 0.0  # wall clock of the final
    digest: str | None = None  # request_digest of what was asked (None: a refusal, or unknown)


Seen = Literal["in_progress", "conflict"] | FinalRecord | None


class Journal:
    """Thread-safe: the MQTT thread accepts and looks up, the worker records finals, the
    network thread marks deliveries."""

    def __init__(self, path: Path | None, limits: JournalLimits = JournalLimits(), wall_clock=time.time,
                 kill_at: str | None = None):
        self.limits = limits
        self.wall_clock = wall_clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[RequestKey, _Entry] = OrderedDict()  # oldest first
        self._file = RecordFile(path, kill_at) if path is not None else None
        self.path = path

    # -- start ------------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Read the file back; what an earlier run left owed. Compacts the file."""
        recovery = Recovery()
        if self._file is None:
            return recovery
        with self._lock:
            records, recovery.discarded_bytes = self._file.read()
            asks: dict[RequestKey, StoredRecord] = {}
            for record in records:
                self._replay(record, asks)
            for key, entry in self._entries.items():
                if entry.final is None and key in asks:
                    recovery.pending.append(_pending(asks[key].body))
                elif entry.final is not None and not entry.delivered:
                    recovery.unacknowledged.append(entry.final)
            self._prune(self.wall_clock())
            self._compact()
        if recovery.discarded_bytes:
            log.warning("request journal: a torn or corrupt tail was cut off", bytes=recovery.discarded_bytes,
                        path=str(self.path))
        return recovery

    def _replay(self, record: StoredRecord, asks: dict[RequestKey, StoredRecord]) -> None:
        body, request_id = record.body, record.body.get("id")
        if not isinstance(request_id, str):
            return
        key = request_key(request_id, str(body.get("topic", "")), _unb64(body.get("corr")))
        digest = body.get("digest") if isinstance(body.get("digest"), str) else None
        kind = body.get("k")
        if kind == "ask":
            self._entries[key] = _Entry(ask_span=(record.offset, record.size), digest=digest)
            self._entries.move_to_end(key)
            asks[key] = record
        elif kind == "final":
            entry = self._entries.setdefault(key, _Entry())
            entry.final, entry.finished_ts = _final_from(body), float(body.get("ts", 0.0))
            entry.delivered, entry.ask_span, entry.digest = False, None, digest
            asks.pop(key, None)
        elif kind == "delivered":
            if "topic" not in body:  # written before ids were scoped to their reply path
                key = next((k for k in self._entries if k[0] == request_id), key)
            if key in self._entries:
                self._entries[key].delivered = True

    # -- the request path ----------------------------------------------------------------

    def lookup(self, key: RequestKey, digest: str | None = None) -> Seen:
        """For a request with this key asking `digest` (None: whatever it asks):
        "in_progress" (the same request, accepted, no final yet), "conflict" (another
        request of this key is queued or running), the final to republish (the same
        request, finished), or None (new: never seen, a refusal that invites a retry, or
        other content after the first's final)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            same = digest is None or entry.digest is None or entry.digest == digest
            if entry.final is None:
                return "in_progress" if same else "conflict"
            if not same or (entry.delivered and entry.final.finish_reason in RETRY_INVITED):
                return None
            return entry.final

    def in_progress(self, key: RequestKey) -> bool:
        """True while the request of this key is accepted and has no final yet."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.final is None

    def accepted(self, job: Job, received_ts: float, expires_ts: float | None) -> None:
        """Record an accepted question (before it is acknowledged to the broker)."""
        request = job.request.model_dump(mode="json", exclude_none=True)
        digest = request_digest(job.request)
        body = {"k": "ask", "id": job.job_id, "topic": job.reply.topic, "corr": _b64(job.reply.correlation_data),
                "stream": job.reply.stream, "retain": job.reply.retain, "ts": received_ts, "expires": expires_ts,
                "request": request, "digest": digest,
                "frames": [{"camera": f.camera, "seq": f.seq, "received_ts": f.received_ts} for f in job.frames]}
        key = request_key(job.job_id, job.reply.topic, job.reply.correlation_data)
        with self._lock:
            entry = self._entries[key] = _Entry(digest=digest)  # other content after a final: a new request
            self._entries.move_to_end(key)
            if self._file is None:
                return
            if "image_b64" in request and self._live_bytes() + len(request["image_b64"]) > self.limits.max_bytes:
                del request["image_b64"]
                body["image_dropped"] = True
                log.warning("request journal full: inline image not journaled", request_id=job.job_id)
            entry.ask_span = self._append(body, kill_marker=job.job_id)  # None: not written (logged)

    def final(self, record: FinalRecord, digest: str | None = None) -> None:
        """Record a final before it is published (`digest`: what its request asked, when known)."""
        key = record.key
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
            self._entries.move_to_end(key)
            if digest is not None:
                entry.digest = digest
            body = {"k": "final", "id": record.request_id, "topic": record.topic, "corr": _b64(record.correlation_data),
                    "payload": record.payload.decode("utf-8"), "finish": record.finish_reason, "ts": self.wall_clock(),
                    "digest": entry.digest}
            entry.final, entry.finished_ts, entry.delivered, entry.ask_span = record, body["ts"], False, None
            self._append(body)
            self._maintain()

    def delivered(self, key: RequestKey) -> None:
        """The broker acknowledged the final of the request `key`."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.final is None or entry.delivered:
                return
            entry.delivered = True
            self._append(_delivered_body(key))
            self._maintain()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    @property
    def num_entries(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- bounds ---------------------------------------------------------------------------

    def _append(self, body: dict[str, Any], kill_marker: str | None = None) -> tuple[int, int] | None:
        if self._file is None:
            return None
        try:
            return self._file.append(body, kill_marker)
        except OSError as exc:  # a full tmpfs must not cost the request its answer
            log.error("request journal write failed", error=str(exc), path=str(self.path))
            return None

    def _maintain(self) -> None:
        self._prune(self.wall_clock())
        if self._file is not None and self._file.size > self.limits.compact_bytes and \
                self._file.size > 2 * self._live_bytes():
            self._compact()

    def _prune(self, now: float) -> None:
        """Forget delivered finals past the window (by age, then by count)."""
        cutoff = now - self.limits.id_window_s
        for key in [k for k, e in self._entries.items() if _done(e) and
                    (e.finished_ts < cutoff or e.final.finish_reason in RETRY_INVITED)]:
            del self._entries[key]
        done = [k for k, e in self._entries.items() if _done(e)]
        for key in done[: max(0, len(done) - self.limits.id_window_max)]:
            del self._entries[key]

    def _live_bytes(self) -> int:
        return sum(e.ask_span[1] for e in self._entries.values() if e.ask_span) + \
            sum(len(e.final.payload) + 200 for e in self._entries.values() if e.final)

    def _compact(self) -> None:
        """Rewrite the file with the live records only: open asks, finals, deliveries."""
        if self._file is None:
            return
        plan: list[tuple[RequestKey, str, bytes]] = []  # (request key, kind, encoded record)
        for key, entry in self._entries.items():
            if entry.final is None and entry.ask_span is not None:
                plan.append((key, "ask", self._file.read_span(*entry.ask_span)))
            elif entry.final is not None:
                plan.append((key, "final", encode_record(_final_body(entry))))
                if entry.delivered:
                    plan.append((key, "delivered", encode_record(_delivered_body(key))))
        try:
            spans = self._file.rewrite(record for _, _, record in plan)
        except OSError as exc:
            log.error("request journal compaction failed", error=str(exc), path=str(self.path))
            return
        for (key, kind, _), span in zip(plan, spans):
            if kind == "ask":
                self._entries[key].ask_span = span


def _done(entry: _Entry) -> bool:
    return entry.final is not None and entry.delivered


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes | None:
    return base64.b64decode(text) if isinstance(text, str) else None


def _final_from(body: dict[str, Any]) -> FinalRecord:
    return FinalRecord(body["id"], str(body.get("topic", "")), str(body.get("payload", "")).encode("utf-8"),
                       _unb64(body.get("corr")), str(body.get("finish", "")))


def _final_body(entry: _Entry) -> dict[str, Any]:
    final = entry.final
    return {"k": "final", "id": final.request_id, "topic": final.topic, "corr": _b64(final.correlation_data),
            "payload": final.payload.decode("utf-8"), "finish": final.finish_reason, "ts": entry.finished_ts,
            "digest": entry.digest}


def _delivered_body(key: RequestKey) -> dict[str, Any]:
    return {"k": "delivered", "id": key[0], "topic": key[1], "corr": _b64(key[2])}


def _pending(body: dict[str, Any]) -> PendingAsk:
    reply = Reply(str(body.get("topic", "")), _unb64(body.get("corr")), bool(body.get("stream", True)),
                  bool(body.get("retain", False)))
    expires = body.get("expires")
    return PendingAsk(body["id"], reply, float(body.get("ts", 0.0)), None if expires is None else float(expires),
                      dict(body.get("request") or {}), list(body.get("frames") or []), bool(body.get("image_dropped")))


def journal_path(directory: Path | None, device_id: str, env: Mapping[str, str]) -> Path:
    """`<directory>/<device_id>.journal`; without a directory the systemd runtime
    directory ($RUNTIME_DIRECTORY, its first entry), else $XDG_STATE_HOME/vlmd, else
    ~/.local/state/vlmd. The device id is one topic level of a safe charset."""
    if directory is None:
        runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
        state = env.get("XDG_STATE_HOME", "")
        if runtime:
            directory = Path(runtime)
        else:
            directory = (Path(state) if state else Path.home() / ".local" / "state") / "vlmd"
    return directory / f"{device_id}.journal"


KILL_AT_ENV = "VLMD_TEST_JOURNAL_KILL_AT"  # the test hook (daemon/journal/file.py): a request id


def open_journal(config: Config, env: Mapping[str, str], wall_clock=time.time) -> Journal:
    """The configured journal; an in-memory one (the id window only) when disabled or
    when the file cannot be opened (logged: the daemon still starts)."""
    settings = config.journal
    limits = JournalLimits(settings.max_bytes, settings.compact_bytes, settings.id_window_s, settings.id_window_max)
    if not settings.enabled:
        return Journal(None, limits, wall_clock)
    path = journal_path(settings.directory, config.device_id, env)
    try:
        journal = Journal(path, limits, wall_clock, kill_at=env.get(KILL_AT_ENV) or None)
    except OSError as exc:
        log.error("request journal not available: requests are not kept across a crash", error=str(exc))
        return Journal(None, limits, wall_clock)
    log.info("request journal", path=str(path))
    return journal
