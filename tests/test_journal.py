"""The request journal on its own (issue 15.1, 15.4): records read back up to the last
whole one, what a restart owes, the id window, compaction and the size bound."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.config import Config
from daemon.inbox import Inbox
from daemon.journal.journal import (
    FinalRecord, Journal, JournalLimits, journal_path, open_journal, request_digest, request_key,
)
from daemon.journal.file import MAGIC, JournalFileError, encode_record, read_records
from daemon.journal.recovery import Restarted, revive
from daemon.scheduler import Frame, Job
from protocol.payloads import AskLimits, AskRequest
from protocol.requests import Reply


class WallClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def journals():
    """`journals(path, ...)` opens a Journal that is closed after the test."""
    opened = []

    def open_one(*args, **kwargs) -> Journal:
        opened.append(Journal(*args, **kwargs))
        return opened[-1]

    yield open_one
    for journal in opened:
        journal.close()


def ask_job(request_id: str, corr: bytes | None = b"\x00c", frames=(), **fields) -> Job:
    request = AskRequest.model_validate({"id": request_id, "text": "what is it?", **fields})
    return Job("ask", request_id, 0.0, camera=request.camera, frames=tuple(frames), request=request,
               reply=Reply(f"clients/{request_id}", corr, stream=True))


def final(request_id: str, reason: str = "stop") -> FinalRecord:
    payload = ('{"v":1,"id":"%s","done":true,"finish_reason":"%s","text":"é"}' % (request_id, reason)).encode()
    return FinalRecord(request_id, f"clients/{request_id}", payload, b"\x00c", reason)


def key(request_id: str):
    """The key of the request `ask_job(request_id)` builds: its id on its reply path."""
    return request_key(request_id, f"clients/{request_id}", b"\x00c")


def test_a_restart_owes_unanswered_requests_and_unacknowledged_finals(tmp_path, journals):
    path = tmp_path / "dev.journal"
    clock = WallClock()
    journal = journals(path, wall_clock=clock)
    assert journal.recover().pending == []
    frame = Frame("cam", 3, b"jpeg", 999_999.5, 1.0)
    journal.accepted(ask_job("done"), clock.now, None)
    journal.final(final("done"))
    journal.delivered(key("done"))
    journal.accepted(ask_job("in-flight"), clock.now, None)
    journal.final(final("in-flight"))  # published, never acknowledged
    journal.accepted(ask_job("queued", image_b64="aGVsbG8="), clock.now, clock.now + 5.0)
    journal.accepted(ask_job("camera", camera="cam", frames=[frame]), clock.now, None)
    journal.close()

    again = journals(path, wall_clock=clock)
    recovery = again.recover()
    assert recovery.discarded_bytes == 0
    assert [f.request_id for f in recovery.unacknowledged] == ["in-flight"]
    assert recovery.unacknowledged[0] == final("in-flight")  # byte for byte
    pending = {p.request_id: p for p in recovery.pending}
    assert sorted(pending) == ["camera", "queued"]
    queued = pending["queued"]
    assert queued.reply == Reply("clients/queued", b"\x00c", True)
    assert queued.request["image_b64"] == "aGVsbG8=" and queued.expires_ts == clock.now + 5.0
    assert pending["camera"].frames == [{"camera": "cam", "seq": 3, "received_ts": 999_999.5}]
    # the id window survives the restart too
    assert again.lookup(key("done")) == final("done") and again.lookup(key("queued")) == "in_progress"
    assert again.lookup(key("never")) is None


def test_revived_requests_run_again_unless_expired_or_their_frames_are_gone(tmp_path, journals):
    clock = WallClock()
    journal = journals(tmp_path / "dev.journal", wall_clock=clock)
    journal.recover()
    journal.accepted(ask_job("inline", image_b64="aGVsbG8=", max_tokens=7), clock.now, clock.now + 60)
    journal.accepted(ask_job("late"), clock.now, clock.now + 1)
    journal.accepted(ask_job("camera", camera="cam", frames=[Frame("cam", 3, b"x", 5.0, 1.0)]), clock.now, None)
    journal.close()
    clock.now += 10
    recovery = journals(tmp_path / "dev.journal", wall_clock=clock).recover()
    revived = {p.request_id: revive(p, Inbox(), AskLimits(), 50.0, clock.now) for p in recovery.pending}
    inline = revived["inline"]
    assert isinstance(inline, Job) and inline.request.max_tokens == 7 and inline.request.image_b64 == "aGVsbG8="
    assert inline.reply.correlation_data == b"\x00c" and inline.deadline == pytest.approx(50.0 + 50)
    assert isinstance(revived["late"], Restarted) and "expired" in revived["late"].why
    assert isinstance(revived["camera"], Restarted) and "frames" in revived["camera"].why


def test_a_torn_last_record_is_cut_off_and_the_journal_goes_on(tmp_path, journals):
    path = tmp_path / "dev.journal"
    journal = journals(path)
    journal.recover()
    journal.accepted(ask_job("whole"), 1.0, None)
    journal.close()
    torn = encode_record({"k": "ask", "id": "torn", "request": {"text": "x" * 100}})
    with open(path, "ab") as file:
        file.write(torn[: len(torn) // 2])  # what a SIGKILL mid-write leaves
    again = journals(path)
    recovery = again.recover()
    assert [p.request_id for p in recovery.pending] == ["whole"]
    assert recovery.discarded_bytes == len(torn) // 2
    again.final(final("whole"))
    again.close()
    assert journals(path).recover().unacknowledged == [final("whole")]


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.text("abc", min_size=1, max_size=5), min_size=1, max_size=8), cut=st.integers(0, 10**6),
       flip=st.booleans())
def test_reading_any_cut_or_damaged_journal_gives_a_prefix_of_its_records(ids, cut, flip):
    bodies = [{"k": "delivered", "id": request_id, "n": n} for n, request_id in enumerate(ids)]
    data = bytearray(MAGIC + b"".join(encode_record(body) for body in bodies))
    cut = cut % (len(data) + 1)
    damaged = data[:cut]
    if flip and cut > len(MAGIC) + 8:
        damaged[cut - 1] ^= 0xFF  # a corrupted byte in the last record read
    records, end = read_records(bytes(damaged))
    assert [r.body for r in records] == bodies[: len(records)]
    assert end <= len(damaged) and (end == 0 or end >= len(MAGIC))


def test_a_file_that_is_not_a_journal_starts_an_empty_one(tmp_path, journals):
    path = tmp_path / "dev.journal"
    path.write_bytes(b"\x00garbage that is no journal")
    journal = journals(path)
    recovery = journal.recover()
    assert recovery.pending == [] and recovery.discarded_bytes > 0
    assert path.read_bytes() == MAGIC


def test_the_id_window_forgets_by_age_and_count_and_lets_refusals_be_retried(tmp_path, journals):
    clock = WallClock()
    journal = journals(tmp_path / "dev.journal", JournalLimits(id_window_s=60, id_window_max=3), wall_clock=clock)
    journal.recover()
    for n in range(5):
        journal.accepted(ask_job(f"r{n}"), clock.now, None)
        journal.final(final(f"r{n}"))
        journal.delivered(key(f"r{n}"))
    assert [journal.lookup(key(f"r{n}")) is None for n in range(5)] == [True, True, False, False, False]
    journal.final(final("busy", reason="rejected"))
    assert journal.lookup(key("busy")) == final("busy", "rejected")  # not yet delivered: still owed
    journal.delivered(key("busy"))
    assert journal.lookup(key("busy")) is None  # a retry of a refused request runs
    clock.now += 61
    journal.final(final("fresh"))
    assert journal.lookup(key("r4")) is None and journal.lookup(key("fresh")) == final("fresh")
    journal.accepted(ask_job("running"), clock.now, None)
    clock.now += 10**6
    journal.final(final("later"))
    assert journal.lookup(key("running")) == "in_progress", "a request without a final is never forgotten"


def test_compaction_keeps_the_file_bounded_and_the_live_records(tmp_path, journals):
    path = tmp_path / "dev.journal"
    journal = journals(path, JournalLimits(compact_bytes=20_000, id_window_max=10))
    journal.recover()
    journal.accepted(ask_job("open", image_b64="QUJD" * 500), 1.0, None)
    sizes = []
    for n in range(400):
        journal.accepted(ask_job(f"q{n}"), 1.0, None)
        journal.final(final(f"q{n}"))
        journal.delivered(key(f"q{n}"))
        sizes.append(path.stat().st_size)
    assert max(sizes) < 60_000 and sizes[-1] < 60_000
    journal.close()
    again = journals(path)
    recovery = again.recover()
    assert [p.request_id for p in recovery.pending] == ["open"]
    assert recovery.pending[0].request["image_b64"] == "QUJD" * 500
    assert again.lookup(key("q399")) == final("q399") and again.lookup(key("q0")) is None


def test_an_inline_image_beyond_the_bound_is_not_journaled_and_fails_after_a_crash(tmp_path, journals):
    path = tmp_path / "dev.journal"
    journal = journals(path, JournalLimits(max_bytes=10_000))
    journal.recover()
    journal.accepted(ask_job("small", image_b64="QUJD" * 100), 1.0, None)
    journal.accepted(ask_job("big", image_b64="QUJD" * 5000), 1.0, None)
    journal.close()
    pending = {p.request_id: p for p in journals(path).recover().pending}
    assert not pending["small"].image_dropped and pending["big"].image_dropped
    assert "image_b64" not in pending["big"].request
    assert "too large" in revive(pending["big"], Inbox(), AskLimits(), 0.0, 1.0).why


def test_one_journal_file_one_daemon(tmp_path, capsys, journals):
    path = tmp_path / "dev.journal"
    first = journals(path)
    with pytest.raises(JournalFileError, match="another vlmd"):
        journals(path)
    config = Config.model_validate({"device_id": "dev", "journal": {"directory": str(tmp_path)}})
    fallback = open_journal(config, {})
    assert fallback.path is None  # the daemon still starts, with the id window in memory
    first.close()
    second = open_journal(config, {})
    assert second.path == path
    second.close()


def test_the_default_place_is_the_runtime_directory_then_the_state_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert journal_path(None, "dev", {"RUNTIME_DIRECTORY": "/run/vlmd:/run/other"}) == \
        tmp_path.__class__("/run/vlmd/dev.journal")
    assert journal_path(None, "dev", {"XDG_STATE_HOME": "/state"}) == tmp_path.__class__("/state/vlmd/dev.journal")
    assert journal_path(None, "dev", {}) == tmp_path / ".local/state/vlmd/dev.journal"
    assert journal_path(tmp_path / "j", "dev", {"RUNTIME_DIRECTORY": "/run/vlmd"}) == tmp_path / "j/dev.journal"


def test_writes_are_cheap_enough_for_the_mqtt_thread(tmp_path, journals):
    """Not a timing assertion: prints what one accepted + final + delivered costs here."""
    journal = journals(tmp_path / "dev.journal")
    journal.recover()
    started = time.perf_counter()
    for n in range(200):
        journal.accepted(ask_job(f"t{n}"), 1.0, None)
        journal.final(final(f"t{n}"))
        journal.delivered(key(f"t{n}"))
    print(f"\njournal: {(time.perf_counter() - started) / 200 * 1e6:.0f} us per request (3 records)")


def test_an_id_belongs_to_its_reply_path_and_a_repeat_must_ask_the_same(tmp_path, journals):
    """#21.1/#21.11: the window is keyed by (id, reply topic, correlation data) and
    compares what was asked; it survives a restart that way too."""
    clock = WallClock()
    path = tmp_path / "dev.journal"
    journal = journals(path, wall_clock=clock)
    journal.recover()
    a = ask_job("q1")
    journal.accepted(a, clock.now, None)
    other_client = request_key("q1", "clients/B", b"\x00c")
    assert journal.lookup(other_client, request_digest(a.request)) is None, "another client's q1 is its own"
    assert journal.lookup(key("q1"), request_digest(a.request)) == "in_progress"
    other_question = AskRequest.model_validate({"id": "q1", "text": "Say hello."})
    assert journal.lookup(key("q1"), request_digest(other_question)) == "conflict"
    journal.final(final("q1"), request_digest(a.request))
    journal.delivered(key("q1"))
    journal.close()
    again = journals(path, wall_clock=clock)
    assert again.recover().pending == []
    assert again.lookup(key("q1"), request_digest(a.request)) == final("q1"), "a retransmission: the same final"
    assert again.lookup(key("q1"), request_digest(other_question)) is None, "after its final: a new request"
    assert again.lookup(request_key("q1", "clients/q1", b"other"), request_digest(a.request)) is None
    assert again.in_progress(key("q1")) is False


def test_a_recovered_conversation_turn_fails_restarted_saying_its_history_is_gone(tmp_path, journals):
    """#21.5: the conversation lived in memory; its turn is not answered as turn 1 in silence."""
    clock = WallClock()
    journal = journals(tmp_path / "dev.journal", wall_clock=clock)
    journal.recover()
    journal.accepted(ask_job("turn2", conversation="c1"), clock.now, None)
    journal.accepted(ask_job("fresh", conversation="c2", reset=True), clock.now, None)
    journal.close()
    recovery = journals(tmp_path / "dev.journal", wall_clock=clock).recover()
    revived = {p.request_id: revive(p, Inbox(), AskLimits(), 50.0, clock.now) for p in recovery.pending}
    assert isinstance(revived["turn2"], Restarted) and "conversation 'c1' was lost" in revived["turn2"].why
    assert isinstance(revived["fresh"], Job), "a reset with its question needs no history"
