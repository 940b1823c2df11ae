"""The scheduler's decisions, from plain lists and numbers (no threads, no engine)."""

from __future__ import annotations

from daemon.scheduler import CameraView, CaptionPolicy, Job, Scheduler


def ask(job_id: str, received_at: float = 0.0, deadline: float | None = None) -> Job:
    return Job("ask", job_id, received_at, deadline)


def test_questions_run_in_arrival_order_before_captions():
    scheduler = Scheduler({"cam": CaptionPolicy(enabled=True, interval_s=1.0)})
    queued = [ask("a"), ask("b")]
    decision = scheduler.decide(10.0, queued, {"cam": CameraView(newest_seq=3)})
    assert decision.ask is queued[0]
    assert decision.caption_camera is None
    assert decision.expired == ()


def test_expired_questions_are_reported_and_skipped():
    scheduler = Scheduler()
    late, fresh = ask("late", deadline=5.0), ask("fresh", deadline=50.0)
    decision = scheduler.decide(10.0, [late, fresh], {})
    assert decision.expired == (late,)
    assert decision.ask is fresh


def test_a_deadline_exactly_now_counts_as_expired():
    decision = Scheduler().decide(5.0, [ask("x", deadline=5.0)], {})
    assert [job.job_id for job in decision.expired] == ["x"]
    assert decision.ask is None


def test_caption_is_due_on_a_new_frame_then_waits_for_the_interval():
    scheduler = Scheduler({"cam": CaptionPolicy(enabled=True, interval_s=30.0)})
    first = scheduler.decide(100.0, [], {"cam": CameraView(1)})
    assert first.caption_camera == "cam"
    scheduler.caption_started("cam", 1, 100.0)
    # same frame: nothing to do, no timer either (a new frame wakes the worker)
    same = scheduler.decide(200.0, [], {"cam": CameraView(1)})
    assert same.caption_camera is None and same.wake_in is None
    # new frame before the interval: wait the rest of it
    early = scheduler.decide(110.0, [], {"cam": CameraView(2)})
    assert early.caption_camera is None
    assert early.wake_in == 20.0
    assert scheduler.decide(130.0, [], {"cam": CameraView(2)}).caption_camera == "cam"


def test_cameras_without_captions_or_frames_are_never_due():
    scheduler = Scheduler({"off": CaptionPolicy(enabled=False), "empty": CaptionPolicy(enabled=True)})
    decision = scheduler.decide(0.0, [], {"off": CameraView(5), "empty": CameraView(None)})
    assert decision.caption_camera is None and decision.wake_in is None


def test_the_camera_that_waited_longest_is_captioned_first():
    policy = CaptionPolicy(enabled=True, interval_s=10.0)
    scheduler = Scheduler({"a": policy, "b": policy})
    scheduler.caption_started("a", 1, 5.0)
    scheduler.caption_started("b", 1, 1.0)
    views = {"a": CameraView(2), "b": CameraView(2)}
    assert scheduler.decide(20.0, [], views).caption_camera == "b"


def test_claim_final_is_true_exactly_once():
    job = ask("x")
    assert job.claim_final() is True
    assert job.claim_final() is False
    assert job.finalized


def test_a_preempted_caption_is_due_again_at_once():
    scheduler = Scheduler({"cam": CaptionPolicy(enabled=True, interval_s=60.0)})
    scheduler.caption_started("cam", 4, 10.0)
    assert scheduler.decide(11.0, [], {"cam": CameraView(4)}).caption_camera is None
    scheduler.caption_preempted("cam")
    assert scheduler.decide(11.0, [], {"cam": CameraView(4)}).caption_camera == "cam"
