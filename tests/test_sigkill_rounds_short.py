"""bench/sigkill_rounds.py run short: two rounds of SIGKILL at a random moment of a busy
`vlmd serve` (the demo model), each followed by a restart. No request may end without a
final, and none with two different ones. (A kill in the moment between publishing a
final and the broker's acknowledgement of it makes the restart publish the same bytes
again: QoS 1 is at-least-once, so an identical repeat is allowed; docs/protocol.md.)
The full run is `python bench/sigkill_rounds.py --rounds 20`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def test_two_sigkill_rounds_lose_and_duplicate_nothing(mosquitto):
    del mosquitto  # the script starts its own private broker; this skips where mosquitto is missing
    command = [sys.executable, str(REPO / "bench" / "sigkill_rounds.py"), "--rounds", "2", "--rate", "2",
               "--max-up", "2", "--json", "--seed", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report; stderr:\n{done.stderr[-3000:]}"
    report = json.loads(lines[-1])
    print(f"\nsigkill rounds: {json.dumps({k: v for k, v in report.items() if k != 'rounds'})}")
    assert report["requests_sent"] >= 2 and len(report["rounds"]) == 2
    assert report["lost"] == 0 and report["differing"] == 0, report
    assert report["exactly_one_final"] + report["duplicated"] == report["requests_sent"]
    assert report["exit_code"] == 0 and done.returncode == 0
