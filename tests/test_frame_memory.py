"""Frame memory has an overall bound (issue 16.8): a byte budget across all cameras with
least-recently-active eviction, and unconfigured cameras that go quiet are forgotten."""

from __future__ import annotations

import time

import pytest

from daemon.config import ConfigError, load_config
from tests.fixtures_daemon import noise_png

pytestmark = pytest.mark.broker


def test_frames_of_many_cameras_stay_within_the_budget_and_idle_strangers_make_room(daemon):
    frame = noise_png(1, size=(16, 16))
    d = daemon(cameras={"door": {}},
               frames={"max_bytes": 4 * len(frame), "max_total_bytes": 5 * len(frame), "history": 4,
                       "max_cameras": 2, "unknown_camera_idle_s": 0.5})
    for n in range(4):
        d.frame("door", noise_png(n, size=(16, 16)))
    d.wait_frames("door", 4)
    for name in ("x1", "x2", "x3"):  # x3: one stranger too many while x1 and x2 are fresh
        d.frame(name, frame)
    d.wait_frames("x2", 1)
    d.ask(id="sync", text="?", stream=False)  # ordered after the frames: they have all been handled
    d.client.answer(d.topics.answer("sync"))
    assert sorted(d.service.inbox.camera_names()) == ["door", "x1", "x2"]
    assert d.service.inbox.frame_bytes <= 5 * len(frame)
    time.sleep(0.6)  # x1 and x2 go idle (the expiry is what is tested: no event to wait on)
    d.frame("x3", frame)
    d.wait_frames("x3", 1)
    assert "x3" in d.service.inbox.camera_names() and "x1" not in d.service.inbox.camera_names()
    d.ask(id="door", text="?", camera="door", frames=1, stream=False)
    assert "key=door:" in d.client.answer(d.topics.answer("door"))[1]["text"]
    d.service.tick()
    stats = d.service.stats_message()
    assert stats.frame_bytes == d.service.inbox.frame_bytes <= 5 * len(frame)


def test_the_budget_must_hold_one_frame(tmp_path):
    path = tmp_path / "vlmd.toml"
    path.write_text("[frames]\nmax_bytes = 1000\nmax_total_bytes = 999\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    assert "max_total_bytes" in str(error.value.issues[0]) and "one frame must fit" in str(error.value.issues[0])
