"""Decoded frames leave no memory behind (#21.6): after a long-lived thread (as the
worker is) decoded and resized four 6000x6000 frames and let them go, the process is
about as large as before. Measured in a child process (its RSS is its own), with the
setting `Service.start` makes and the release the worker makes when it goes idle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import gc, io, json, sys, threading
import psutil
from PIL import Image
from daemon import memory
from daemon.frames import RecentFrames
from npu.image import resize_rgb
from protocol.frames import decode_frame

took = memory.return_large_frees()
process = psutil.Process()
pngs = []
for n in range(4):
    image = Image.new("RGB", (6000, 6000), (40 * n, 90, 160))
    image.paste((250, 250, 0), (1000 + 300 * n, 1000, 3000 + 300 * n, 3000))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    pngs.append(buffer.getvalue())
del image
gc.collect()
before = process.memory_info().rss

idle, done = threading.Event(), threading.Event()

def worker():  # lives on, as the daemon's worker thread does: its arena is not given back at exit
    frames = RecentFrames(lambda data: decode_frame(data, 8_000_000, 40_000_000), budget=lambda: 0)
    for method in ("bilinear", "bicubic"):
        for data in pngs:
            resize_rgb(frames.rgb(data), 448, 448, method)
    memory.release_free_memory()  # what Worker.step does when it goes idle after decoding
    idle.set()
    done.wait(60)

thread = threading.Thread(target=worker)
thread.start()
idle.wait(600)
gc.collect()
after = process.memory_info().rss
done.set()
thread.join()
print(json.dumps({"took": took, "before": before, "after": after}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is glibc's")
def test_four_huge_frames_leave_no_memory_behind():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    if not figures["took"]:
        pytest.skip("this C library has no M_MMAP_THRESHOLD (not glibc)")
    grown = figures["after"] - figures["before"]
    assert grown < 32 * 2**20, f"{grown / 2**20:.0f} MiB stayed after four 108 MB frames were freed ({figures})"
