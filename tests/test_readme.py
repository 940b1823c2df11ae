"""README.md's "MQTT in one minute" runs verbatim (issue 11 item 8): the whole block, as
written, in one bash, with the real `vlmd serve` (its embedded broker, the demo model)
and the real mosquitto clients.

The block assumes port 1883, which a shared machine may have in use; only the port
moves, through each program's own configuration (the mosquitto clients' options files
under $XDG_CONFIG_HOME, `VLMD_EMBEDDED_BROKER__PORT`), never the commands.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures_broker import free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto-clients is not installed"),
]


def minute_block() -> str:
    section = README.read_text(encoding="utf-8").split("## MQTT in one minute", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    return block


def sh_blocks(path: Path, section: str | None = None) -> list[str]:
    """The ```sh blocks of a document (of one `## ` section of it), in order."""
    text = path.read_text(encoding="utf-8")
    if section is not None:
        text = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", text, flags=re.S)


def finals_in(rows: list[str], answer_topics: tuple[str, ...] = ("/answer/",)) -> dict[str, tuple[list[str], dict]]:
    """request id -> (deltas in order, final), from `mosquitto_sub -v` rows on answer topics."""
    deltas: dict[str, list[str]] = {}
    finals: dict[str, tuple[list[str], dict]] = {}
    for row in rows:
        topic, _, payload = row.partition(" ")
        if not any(part in topic for part in answer_topics):
            continue
        body = json.loads(payload)
        if body.get("done"):
            finals[body["id"]] = (deltas.get(body["id"], []), body)
        else:
            deltas.setdefault(body["id"], []).append(body["delta"])
    return finals


def test_the_block_sets_what_a_new_user_needs():
    block = minute_block()
    assert "vlmd serve --device-id demo" in block
    assert "-T 'vlmd/demo/frame/#'" in block
    assert "localhost" not in block and "1883" not in block  # the defaults: 127.0.0.1:1883


def run_verbatim(tmp_path: Path, block: str, asked: list[str], answer_topics=("/answer/",)):
    """Run `block` in one bash as a user pastes it (the mosquitto clients and the daemon on a
    free port, through their own configuration); the subscribers' rows, once every id in
    `asked` has its final (or 180 s passed), and the daemon and subscribers ended."""
    port = free_port()
    config = tmp_path / "config"
    config.mkdir()
    for client in ("mosquitto_sub", "mosquitto_pub"):
        (config / client).write_text(f"-p {port}\n")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "XDG_CONFIG_HOME": str(config), "VLMD_EMBEDDED_BROKER__PORT": str(port),
           "VLMD_CACHE_DIR": str(tmp_path / "cache"), "LANG": "C.UTF-8"}
    output, errors = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with output.open("w") as stdout, errors.open("w") as stderr:
        shell = subprocess.Popen(["bash", "-c", block], cwd=tmp_path, env=env, stdout=stdout, stderr=stderr,
                                 start_new_session=True)
    try:
        shell.wait(180)  # the foreground commands; the two `&` jobs keep running in its session
        assert shell.returncode == 0, errors.read_text()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and \
                set(finals_in(output.read_text().splitlines(), answer_topics)) < set(asked):
            time.sleep(0.2)
    finally:
        try:
            os.killpg(shell.pid, signal.SIGTERM)  # the daemon and the subscribers, as `kill %1 %2` would
        except ProcessLookupError:
            pass
    return output.read_text().splitlines()


@pytest.mark.slow
def test_mqtt_in_one_minute_runs_verbatim(tmp_path):
    block = minute_block()
    asked = re.findall(r'"id":"(\w+)"', block)
    assert asked == ["m1", "m2"]
    rows = run_verbatim(tmp_path, block, asked)
    finals = finals_in(rows)
    assert set(finals) == set(asked), rows
    for request_id in asked:
        deltas, final = finals[request_id]
        assert final["finish_reason"] in ("stop", "length"), final
        assert "".join(deltas) == final["text"]
    assert "vlmd/demo/status online" in rows
    assert any(row.startswith("vlmd/demo/stats ") for row in rows)
    assert not [row for row in rows if row.startswith("vlmd/demo/frame/")], "frames reached the terminal"
    assert "service started" in (tmp_path / "vlmd.log").read_text()
    assert (tmp_path / "scene.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_the_docs_run_verbatim_in_the_order_a_user_pastes_them(tmp_path):
    """#21.14: the minute, README's next block, then every ```sh block of docs/protocol.md, in
    one shell with the minute's one daemon; every question asked gets a final that is not a
    refusal, each example's id is its own, and the inline image's answer reaches the
    subscriber that was started before it was asked."""
    blocks = [minute_block(), *sh_blocks(README, "Answers a device can act on"),
              *sh_blocks(REPO / "docs" / "protocol.md")]
    script = "\n".join(blocks)
    asked = [request_id for request_id in re.findall(r'"id": ?"(\w+)"', script) if request_id != "f1"]  # no fleet here
    for request_id in re.findall(r'-t vlmd/demo/cancel -m .*"id": "(\w+)"', script):
        asked.remove(request_id)  # a cancel names a question asked before it
    assert len(asked) == len(set(asked)), f"an id used by two examples: {asked}"
    rows = run_verbatim(tmp_path, script, asked, answer_topics=("/answer/", "clients/me/answers"))
    finals = finals_in(rows, ("/answer/", "clients/me/answers"))
    assert set(finals) == set(asked), (sorted(set(asked) - set(finals)), rows[-40:])
    for request_id in asked:
        final = finals[request_id][1]
        assert final["finish_reason"] in ("stop", "length"), final
    assert finals["a1"][1]["value"] is True and finals["a3"][1]["turn"] == 2
    assert finals["q3"][1]["usage"]["prompt_tokens"] > 3 * 64, "three frames, each its own image"
    assert any(row.startswith("clients/me/answers ") for row in rows), "the inline image's answer"
    assert (tmp_path / "frame.jpg").read_bytes().startswith(b"\xff\xd8")
