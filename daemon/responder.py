"""The only place replies leave the daemon: chunks, finals, captions, error messages.

`Responder` formats each message, publishes it through a `Publisher` (MqttClient is
one) and never raises: a lone surrogate from a runtime becomes U+FFFD, timings the
schema refuses are dropped, a publish error is logged and counted as "unpublished" (it
is not an engine failure). Each job gets at most one final (`Job.claim_final`). With a
journal, every final is journaled before it is published and marked delivered when the
broker acknowledges it; `republish` sends a journaled final again, byte for byte.
`RuntimeStats` holds the counters the stats message reports.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from pydantic import ValidationError

from daemon.journal.journal import FinalRecord, Journal, request_digest
from daemon.logs import get_logger
from daemon.scheduler import Frame, Job
from npu.engine import DoneEvent
from protocol import codec, payloads
from protocol.topics import SPEC, Topics
from protocol.watches import WatchEvent, WatchState

log = get_logger("vlmd.responder")


class Publisher(Protocol):
    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, correlation_data: bytes | None = None,
        on_delivered: Callable[[], None] | None = None,
    ) -> None: ...


@dataclass
class RuntimeStats:
    """Counters the stats message reports; written by the worker and the MQTT thread."""

    outcomes: Counter = field(default_factory=Counter)  # finish_reason -> count
    by_interface: dict = field(default_factory=dict)  # interface ("mqtt", "http") -> Counter of finish_reason
    captions: Counter = field(default_factory=Counter)  # "done" / "skipped" / "failed"
    last_ttft_ms: float | None = None
    last_decode_tokens_per_s: float | None = None
    conversations: dict | None = None  # the engine's conversation store, after the last question
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, outcome: str, interface: str = "mqtt") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            self.by_interface.setdefault(interface, Counter())[outcome] += 1

    def count_caption(self, outcome: str) -> None:
        with self.lock:
            self.captions[outcome] += 1

    def timings(self, timings: dict) -> None:
        with self.lock:
            self.last_ttft_ms = timings.get("ttft_ms", self.last_ttft_ms)
            self.last_decode_tokens_per_s = timings.get("decode_tokens_per_s", self.last_decode_tokens_per_s)


class Responder:
    """Formats and publishes chunks and finals; the only place a final is sent. With a
    `journal`, every final is journaled before it is published and marked delivered when
    the broker acknowledges it."""

    def __init__(self, publisher: Publisher, topics: Topics, stats: RuntimeStats, wall_clock=time.time,
                 journal: Journal | None = None):
        self.publisher = publisher
        self.topics = topics
        self.stats = stats
        self.wall_clock = wall_clock
        self.journal = journal

    def chunk(self, job: Job, seq: int, delta: str) -> None:
        """Publish one chunk (QoS 0, may be lost anyway); failures are logged, never raised."""
        message = payloads.AnswerChunk(id=job.job_id, seq=seq, delta=_utf8_safe(delta))
        if job.sink is not None:
            self._to_sink(job, message, "chunk")
            return
        self._send(job, message, "answer_chunk")

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
        """Publish the job's one final; False (and nothing sent) if it already had one.
        `extra`: the fields a typed answer or a conversation adds (DoneEvent.extra)."""
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
        if job.sink is not None:  # an HTTP client: neither journaled nor published
            sent = self._to_sink(job, message, "final")
        else:
            sent = self._send(job, message, "answer", finish_reason)
        self.stats.count(finish_reason if sent else "unpublished", job.interface)
        log.info("final", request_id=job.job_id, finish_reason=finish_reason, error=error and error[0], sent=sent)
        return True

    def republish(self, final: FinalRecord) -> None:
        """A recorded final again, byte for byte (a retransmitted id, or one the broker never acknowledged)."""
        spec = SPEC["answer"]
        try:
            self.publisher.publish(final.topic, final.payload, spec.qos, spec.retain, final.correlation_data,
                                   on_delivered=self._delivered_callback(final))
        except Exception:
            log.exception("final not republished", request_id=final.request_id)
        log.info("final republished", request_id=final.request_id, finish_reason=final.finish_reason)

    def _delivered_callback(self, final: FinalRecord) -> Callable[[], None] | None:
        journal, key = self.journal, final.key
        return None if journal is None else lambda: journal.delivered(key)

    def caption_chunk(self, camera: str, caption_id: str, seq: int, delta: str) -> None:
        """One streamed piece of a caption on caption/<camera>/stream (QoS 0)."""
        chunk = payloads.CaptionChunk(camera=camera, seq=seq, delta=_utf8_safe(delta), caption_id=caption_id)
        self._publish(self.topics.caption_stream(camera), chunk, "caption_stream")

    def caption(self, camera: str, caption_id: str, frame: Frame, event: DoneEvent, image: bytes | None = None) -> None:
        """A finished caption, retained on caption/<camera>; the frame it describes (JPEG)
        retained on caption/<camera>/image first."""
        self.stats.timings(event.timings)
        self.stats.count_caption("done")
        caption = payloads.Caption(
            camera=camera, caption_id=caption_id, text=_utf8_safe(event.text), ts=self.wall_clock(),
            frame_ts=frame.received_ts, finish_reason=event.finish_reason,
            usage={"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens},
            timings=event.timings,
        )
        if image is not None:
            self._publish_bytes(self.topics.caption_image(camera), image, "caption_image")
        self._publish(self.topics.caption(camera), caption, "caption")

    def watch(self, state: WatchState, event: WatchEvent | None = None) -> None:
        """A watch's retained state; its event first when the value changed (a client that
        sees the new state has had the event)."""
        if event is not None:
            self._publish(self.topics.watch_event(event.name), event, "watch_event")
        self._publish(self.topics.watch(state.name), state, "watch")

    def clear_watch(self, name: str) -> None:
        """An empty retained message: a deleted watch leaves no state behind."""
        self._publish_bytes(self.topics.watch(name), b"", "watch")

    def _publish(self, topic: str, message: Any, kind: str) -> None:
        self._publish_bytes(topic, codec.encode(message), kind)

    def _publish_bytes(self, topic: str, payload: bytes, kind: str) -> None:
        spec = SPEC[kind]
        try:
            self.publisher.publish(topic, payload, spec.qos, spec.retain)
        except Exception:  # the caller is paho's thread or the worker: neither may die of it
            log.exception("message not published", kind=kind, topic=topic)

    def error(self, code: str, message: str, topic: str, request_id: str | None = None) -> None:
        """A problem with a message that has no reply path: to <root>/error."""
        body = payloads.ErrorMessage(code=code, message=_utf8_safe(message), topic=_utf8_safe(topic),
                                     request_id=request_id, ts=self.wall_clock())
        self._publish(self.topics.error(), body, "error")

    def _to_sink(self, job: Job, message: Any, kind: str) -> bool:
        try:
            getattr(job.sink, kind)(message)
            return True
        except Exception:  # a client gone away must not cost the worker anything
            log.exception("reply not delivered", request_id=job.job_id, kind=kind, interface=job.interface)
            return False

    def _send(self, job: Job, message: Any, kind: str, finish_reason: str | None = None) -> bool:
        """Publish on the job's reply path (a final: journaled first); False (logged)
        when it could not be sent.

        Never raises: a broken connection or an unencodable payload must neither kill
        the worker nor count as an engine failure (which could make vlmd exit).
        """
        spec = SPEC[kind]
        reply = job.reply
        try:
            assert reply is not None, "asks always carry a reply path"
            payload = codec.encode(message)
            if finish_reason is None:
                self.publisher.publish(reply.topic, payload, spec.qos, spec.retain, reply.correlation_data)
                return True
            record = FinalRecord(job.job_id, reply.topic, payload, reply.correlation_data, finish_reason)
            if self.journal is not None:
                self.journal.final(record, None if job.request is None else request_digest(job.request))
            retain = spec.retain or reply.retain  # a dashboard's answer sensor keeps its last answer
            self.publisher.publish(reply.topic, payload, spec.qos, retain, reply.correlation_data,
                                   on_delivered=self._delivered_callback(record))
            return True
        except Exception:
            log.exception("reply not published", request_id=job.job_id, kind=kind)
            return False


def _utf8_safe(text: str) -> str:
    """`text` with lone surrogates (which no UTF-8 encoder accepts) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
