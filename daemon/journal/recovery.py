"""What a restarted daemon owes: the journal's pending requests become jobs again or
`restarted` finals (DESIGN §5, issue 15).

A request accepted by the previous run without a final is run again when it has not
expired, still validates, and its inputs are still there: text-only and inline-image
questions always are (the image is in the journal, unless it was too large for it);
camera questions only when the frames they pinned are still held, which after a process
restart they are not (the frame store lives in memory). A later turn of a conversation
is not run again either: the conversation's earlier turns and KV rows lived in the
engine's memory, and answering the turn without them would answer another question
(#21.5); a `reset` (with or without a question) needs no history and runs. Everything
else ends `failed` with code `restarted` and a message that says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from daemon.inbox import Inbox
from daemon.journal.journal import PendingAsk
from daemon.scheduler import Frame, Job
from protocol.codec import describe_validation_error
from protocol.payloads import AskLimits, AskRequest


@dataclass(frozen=True)
class Restarted:
    """A pending request that cannot run again: its final says why."""

    job: Job
    why: str


def revive(pending: PendingAsk, inbox: Inbox, limits: AskLimits, now: float, wall_now: float) -> Job | Restarted:
    """The job to run again for `pending` (service clock `now`, wall clock `wall_now`), or why not."""
    received_at = now - max(0.0, wall_now - pending.received_ts)
    deadline = None if pending.expires_ts is None else received_at + (pending.expires_ts - pending.received_ts)
    job = Job("ask", pending.request_id, received_at, deadline, reply=pending.reply)
    if deadline is not None and now >= deadline:
        return Restarted(job, "the daemon restarted and the request expired meanwhile")
    if pending.image_dropped:
        return Restarted(job, "the daemon restarted; the inline image was too large to keep in the request journal")
    try:
        job.request = AskRequest.model_validate(pending.request, context={"limits": limits})
    except ValidationError as exc:
        return Restarted(job, f"the daemon restarted and the request no longer validates: {describe_validation_error(exc)}")
    job.camera = job.request.camera
    if job.request.conversation is not None and not job.request.reset:
        return Restarted(job, f"the daemon restarted and conversation {job.request.conversation!r} was lost with it"
                              " (conversations live in memory): reset it, or ask again to start it over at turn 1")
    if pending.frames:
        frames = _held_frames(inbox, pending.frames)
        if frames is None:
            return Restarted(job, "the daemon restarted and the camera frames the question was about are gone")
        job.frames = frames
    return job


def _held_frames(inbox: Inbox, refs: list[dict]) -> tuple[Frame, ...] | None:
    """The pinned frames, if the frame store still holds every one of them."""
    found = []
    for ref in refs:
        held = [frame for frame in inbox.frames(str(ref.get("camera")), inbox.frame_history)
                if frame.seq == ref.get("seq") and frame.received_ts == ref.get("received_ts")]
        if not held:
            return None
        found.append(held[0])
    return tuple(found)
