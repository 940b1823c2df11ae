"""The inbox: frame rings with drop counts, the bounded queue, cancel, close."""

from __future__ import annotations

import threading
import time

from daemon.inbox import Inbox
from daemon.scheduler import Job


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ask(job_id: str) -> Job:
    return Job("ask", job_id, 0.0)


def test_newest_frames_are_kept_and_unused_evictions_count_as_dropped():
    inbox = Inbox(frame_history=2, clock=FakeClock(), wall_clock=lambda: 1000.0)
    for index in range(5):
        inbox.put_frame("cam", bytes([index]))
    assert [f.data for f in inbox.frames("cam", 2)] == [b"\x03", b"\x04"]
    assert inbox.frame_counts() == {"cam": {"received": 5, "dropped": 3}}
    # the two used frames leave the ring without counting as dropped
    inbox.put_frame("cam", b"\x05")
    inbox.put_frame("cam", b"\x06")
    assert inbox.frame_counts()["cam"] == {"received": 7, "dropped": 3}
    newest = inbox.frames("cam", 1)[0]
    assert (newest.seq, newest.received_ts) == (7, 1000.0)
    assert inbox.camera_views()["cam"].newest_seq == 7


def test_frames_of_unknown_camera_is_empty():
    inbox = Inbox()
    assert inbox.frames("nope", 1) == ()
    assert not inbox.has_camera("nope")


def test_queue_is_bounded_and_refuses_after_close():
    inbox = Inbox(queue_size=2)
    assert inbox.submit(ask("a")) == "queued"
    assert inbox.submit(ask("b")) == "queued"
    assert inbox.submit(ask("c")) == "busy"
    assert inbox.depth == 2
    leftovers = inbox.close()
    assert [job.job_id for job in leftovers] == ["a", "b"]
    assert inbox.submit(ask("d")) == "closed"
    assert inbox.depth == 0


def test_cancel_removes_a_queued_job_and_flags_the_running_one():
    inbox = Inbox()
    first, second = ask("first"), ask("second")
    inbox.submit(first)
    inbox.submit(second)
    assert inbox.take(first) is True
    assert inbox.running is first
    where, job = inbox.cancel("second")
    assert (where, job) == ("queued", second) and second.cancel_event.is_set()
    assert inbox.take(second) is False  # it left the queue
    where, job = inbox.cancel("first")
    assert (where, job) == ("running", first) and first.cancel_event.is_set()
    assert inbox.cancel("ghost") == ("unknown", None)


def test_wait_wakes_on_submit_from_another_thread():
    inbox = Inbox()
    timer = threading.Timer(0.05, lambda: inbox.submit(ask("x")))
    started = time.monotonic()
    timer.start()
    inbox.wait(5.0)
    timer.join()
    assert time.monotonic() - started < 2.0
    assert inbox.depth == 1


def test_producers_never_block_each_other():
    inbox = Inbox(queue_size=1000, frame_history=3)

    def produce(camera: str) -> None:
        for index in range(500):
            inbox.put_frame(camera, b"x")
            inbox.submit(ask(f"{camera}-{index}")) if index % 10 == 0 else None

    threads = [threading.Thread(target=produce, args=(f"c{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    counts = inbox.frame_counts()
    assert all(counts[f"c{n}"] == {"received": 500, "dropped": 497} for n in range(4))
    assert inbox.depth == 200


def test_all_cameras_frames_stay_within_the_byte_budget_least_recently_active_camera_first():
    clock = FakeClock()
    inbox = Inbox(frame_history=4, clock=clock, max_total_bytes=100)
    for camera in ("a", "b", "c"):
        clock.now += 1
        inbox.put_frame(camera, bytes(30))
    assert inbox.frame_bytes == 90
    clock.now += 1
    assert inbox.frames("a", 1)  # a question used camera a: b is now the least recently active
    clock.now += 1
    inbox.put_frame("d", bytes(30))  # 120 > 100: b's frames go
    assert inbox.frame_bytes == 90
    assert [len(inbox.frames(name, 4)) for name in "abcd"] == [1, 0, 1, 1]
    assert inbox.frame_counts()["b"] == {"received": 1, "dropped": 1}  # evicted unused: dropped
    # one camera alone over the budget keeps its newest frames only
    for _ in range(4):
        clock.now += 1
        inbox.put_frame("e", bytes(40))
    assert inbox.frame_bytes <= 100 and len(inbox.frames("e", 4)) == 2
    assert inbox.frames("e", 1)[0].seq == 4


def test_idle_unconfigured_cameras_expire_and_their_bytes_are_freed():
    clock = FakeClock()
    inbox = Inbox(clock=clock, max_total_bytes=1000)
    inbox.put_frame("configured", bytes(10))
    inbox.put_frame("stray", bytes(20))
    clock.now += 50
    inbox.put_frame("busy", bytes(5))
    clock.now += 20
    assert inbox.expire_cameras(60.0, keep={"configured"}) == ["stray"]
    assert sorted(inbox.camera_names()) == ["busy", "configured"] and inbox.frame_bytes == 15
    clock.now += 100
    assert inbox.expire_cameras(60.0, keep={"configured"}) == ["busy"]


def test_configured_cameras_are_evicted_after_unconfigured_ones():
    clock = FakeClock()
    inbox = Inbox(clock=clock, max_total_bytes=60)
    inbox.configured = frozenset({"door"})
    inbox.put_frame("door", bytes(30))  # the least recently active, but configured
    clock.now += 1
    inbox.put_frame("stray", bytes(30))
    clock.now += 1
    inbox.put_frame("other", bytes(30))
    assert [len(inbox.frames(name)) for name in ("door", "stray", "other")] == [1, 0, 1]
