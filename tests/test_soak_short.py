"""The soak (bench/soak.py) run short in CI: `vlmd serve` on the tiny InternVL model
under mixed frames, questions, captions and cancels for ~10 s. Every request must end
with exactly one final, the daemon must exit 0 after SIGTERM, and its RSS and thread
count must not run away. The long run is `python bench/soak.py --minutes 30 --tiny`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow]
pytest.importorskip("npu.engine", reason="the engine module is not importable yet")

REPO = Path(__file__).resolve().parents[1]


def test_short_soak_loses_no_request(mosquitto, tiny_internvl_native):
    command = [sys.executable, str(REPO / "bench" / "soak.py"), "--seconds", "10", "--json", "--rate", "3",
               "--model", str(tiny_internvl_native.path), "--broker", mosquitto.url, "--drain", "30"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report; stderr:\n{done.stderr[-3000:]}"
    report = json.loads(lines[-1])
    print(f"\nsoak 10 s: {json.dumps({k: v for k, v in report.items() if k != 'daemon_log_tail'})}")
    assert report["requests_sent"] >= 10
    assert report["lost"] == 0 and report["duplicated"] == 0, report
    assert report["finals_received"] == report["requests_sent"]
    assert report["exit_code"] == 0 and report["stopped_published"] and not report["offline_seen"]
    assert report["captions"] >= 1
    assert {"stop", "length"} & set(report["finish_reasons"])
    assert report["end"]["threads"] <= report["start"]["threads"] + 2
    assert report["end"]["rss_peak_mib"] - report["start"]["rss_mib"] < 150
    assert done.returncode == 0
