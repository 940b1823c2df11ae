"""Soak: run `vlmd serve` for N minutes under mixed load and count what came back.

Starts a private mosquitto (unless --broker is given) and `vlmd serve` as its own
process, then for the whole run publishes camera frames (two cameras, one captioned),
questions (about a camera frame, its last two frames, an inline image, or text only;
some with a deadline) and cancels (of a fifth of the questions, some right away, some
mid-answer). At the end it stops sending, waits for the outstanding finals, sends
SIGTERM and reports:

- requests sent vs finals received (lost = sent without a final; duplicates = more
  than one final for an id), finals by finish_reason, captions received;
- the daemon's RSS and thread count at the start (after a warm-up) and the end, and
  the largest RSS seen; the daemon's exit code and whether `stopped` was published.

    python bench/soak.py --minutes 30 [--model DIR | --tiny] [--broker mqtt://host:port]
    python bench/soak.py --seconds 20 --tiny --json      # the CI run (tests/test_soak_short.py)

Exit status 0 when nothing was lost or duplicated and the daemon exited 0.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="run length in minutes")
    length.add_argument("--seconds", type=float, help="run length in seconds (CI)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="model directory (default: the demo model)")
    model.add_argument("--tiny", action="store_true", help="build a tiny random InternVL checkpoint (needs torch)")
    parser.add_argument("--broker", help="mqtt://host:port (default: start a private mosquitto)")
    parser.add_argument("--rate", type=float, default=2.0, help="questions per second offered")
    parser.add_argument("--fps", type=float, default=4.0, help="frames per second per camera")
    parser.add_argument("--max-tokens", type=int, default=12, help="max_tokens of each question")
    parser.add_argument("--kv-capacity", type=int, default=320, help="KV rows (reference backend)")
    parser.add_argument("--prefill-chunk", type=int, default=32, help="prefill chunk (reference backend)")
    parser.add_argument("--drain", type=float, default=60.0, help="seconds to wait for outstanding finals")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.duration_s = args.seconds if args.seconds is not None else 60.0 * (args.minutes or 5.0)
    return args


# -- the pieces: broker, daemon, load ------------------------------------------------------


def start_broker(directory: Path) -> tuple[str, subprocess.Popen]:
    from tests.fixtures_broker import free_port, mosquitto_binary, wait_for_port

    binary = mosquitto_binary()
    if binary is None:
        raise SystemExit("soak: mosquitto is not installed; pass --broker URL")
    port = free_port()
    config = directory / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 10000\n")
    process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port("127.0.0.1", port)
    return f"mqtt://127.0.0.1:{port}", process


def model_dir(args, directory: Path) -> str | None:
    if args.model:
        return args.model
    if args.tiny:
        from tests import model_factory

        return str(model_factory.build_internvl_native(directory / "tiny").path)
    return None  # the demo model


def start_daemon(args, broker: str, device_id: str, model: str | None, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLMD_MODEL__KV_CAPACITY": str(args.kv_capacity),
           "VLMD_MODEL__PREFILL_CHUNK": str(args.prefill_chunk), "VLMD_REQUESTS__QUEUE_SIZE": "8",
           "VLMD_CAMERAS__YARD__CAPTION": "true", "VLMD_CAMERAS__YARD__INTERVAL_S": "5",
           "VLMD_CAMERAS__YARD__MAX_TOKENS": "8", "VLMD_CAMERAS__DOOR__CAPTION": "false",
           "VLMD_STATS__INTERVAL_S": "5", "VLMD_LOGGING__FORMAT": "json"}
    command = [sys.executable, "-m", "daemon.cli", "serve", "--broker", broker, "--device-id", device_id,
               "--backend", "reference", "--log-level", "warning"]
    if model:
        command += ["--model", model]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_path.open("w"), env=env)


def frame_png(rng: random.Random, size=(96, 64)) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # (H, W, 3)
    return buffer.getvalue()


class Tally:
    """What the load generator saw come back; filled on paho's thread."""

    def __init__(self, root: str):
        self.root = root
        self.lock = threading.Lock()
        self.sent: dict[str, float] = {}
        self.finals: dict[str, list[str]] = {}
        self.captions = 0
        self.statuses: list[bytes] = []
        self.first_chunk: set[str] = set()

    def on_message(self, client, userdata, message) -> None:
        topic, payload = message.topic, bytes(message.payload)
        with self.lock:
            if topic == f"{self.root}/status":
                self.statuses.append(payload)
            elif topic.startswith(f"{self.root}/caption/") and not topic.endswith("/stream"):
                self.captions += 1
            elif topic.startswith(f"{self.root}/answer/"):
                body = json.loads(payload)
                if body.get("done"):
                    self.finals.setdefault(body["id"], []).append(body["finish_reason"])
                else:
                    self.first_chunk.add(body["id"])

    def outstanding(self) -> int:
        with self.lock:
            return sum(1 for rid in self.sent if rid not in self.finals)


def question(rng: random.Random, n: int, args, inline: bytes) -> dict:
    request = {"id": f"s{n}", "max_tokens": args.max_tokens, "stream": rng.random() < 0.7}
    kind = rng.choice(["camera", "camera", "frames", "inline", "text"])
    if kind == "camera":
        request.update(text=rng.choice(["What is in the image?", "Describe it.", "Any people?"]), camera="door")
    elif kind == "frames":
        request.update(text="What changed?", camera="door", frames=2, max_tokens=4)
    elif kind == "inline":
        request.update(text="And this one?", image_b64=base64.b64encode(inline).decode())
    else:
        request.update(text=rng.choice(["Say hello.", "Count to three.", "What is MQTT?"]))
    if rng.random() < 0.1:
        request["expires_ms"] = rng.choice([50, 2000])
    return request


def run_load(client, tally: Tally, args, rng: random.Random) -> dict:
    """Publish frames, questions and cancels until the run time is up; return counts."""
    root, end = tally.root, time.monotonic() + args.duration_s
    counts = {"frames": 0, "questions": 0, "cancels": 0}
    inline = frame_png(rng, (48, 32))
    next_frame = next_question = time.monotonic()
    pending_cancels: list[tuple[float, str]] = []
    n = 0
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_frame:
            for camera in ("door", "yard"):
                client.publish(f"{root}/frame/{camera}", frame_png(rng), qos=0)
                counts["frames"] += 1
            next_frame = now + 1.0 / args.fps
        if now >= next_question:
            request = question(rng, n, args, inline)
            with tally.lock:
                tally.sent[request["id"]] = now
            client.publish(f"{root}/ask", json.dumps(request), qos=1)
            counts["questions"] += 1
            if rng.random() < 0.2:  # cancel: at once, or a little later (likely mid-answer)
                pending_cancels.append((now + rng.choice([0.0, 0.5, 1.5]), request["id"]))
            n += 1
            next_question = now + rng.expovariate(args.rate)
        for due, request_id in [c for c in pending_cancels if c[0] <= now]:
            client.publish(f"{root}/cancel", json.dumps({"id": request_id}), qos=1)
            counts["cancels"] += 1
            pending_cancels.remove((due, request_id))
        time.sleep(0.01)
    return counts


def sample(process) -> dict:
    import psutil

    proc = psutil.Process(process.pid)
    return {"rss_mib": round(proc.memory_info().rss / 2**20, 1), "threads": proc.num_threads()}


# -- the run ---------------------------------------------------------------------------------


def soak(args) -> dict:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from daemon.config import parse_broker_url

    rng = random.Random(args.seed)
    directory = Path(tempfile.mkdtemp(prefix="vlmd-soak-"))
    broker_process = None
    daemon = client = None
    report: dict = {"duration_s": args.duration_s}
    try:
        broker = args.broker
        if broker is None:
            broker, broker_process = start_broker(directory)
        device_id = "soak" + uuid.uuid4().hex[:6]
        tally = Tally(f"vlmd/{device_id}")
        address = parse_broker_url(broker)
        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        client.on_message = tally.on_message
        client.max_queued_messages_set(0)
        client.connect(address.host, address.port)
        client.subscribe(f"{tally.root}/#", qos=1)
        client.loop_start()
        daemon = start_daemon(args, broker, device_id, model_dir(args, directory), directory / "daemon.log")
        wait_online(tally, daemon, 180.0)
        client.publish(f"{tally.root}/ask", json.dumps({"id": "warm-up", "text": "hi", "max_tokens": 2}), qos=1)
        wait_for(lambda: "warm-up" in tally.finals, 120.0)
        report["start"] = sample(daemon)
        peak = [report["start"]["rss_mib"]]
        sampler_stop = threading.Event()
        sampler = threading.Thread(target=_sample_peak, args=(daemon, peak, sampler_stop), daemon=True)
        sampler.start()
        report["sent"] = run_load(client, tally, args, rng)
        wait_for(lambda: tally.outstanding() == 0, args.drain)
        report["end"] = sample(daemon)
        sampler_stop.set()
        report["end"]["rss_peak_mib"] = max(peak)
        daemon.send_signal(signal.SIGTERM)
        report["exit_code"] = daemon.wait(60)
        wait_for(lambda: b"stopped" in tally.statuses, 10.0)
        report.update(summarise(tally))
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        if client is not None:
            client.loop_stop()
            client.disconnect()
        if broker_process is not None:
            broker_process.terminate()
            broker_process.wait(10)
        report["daemon_log_tail"] = _tail(directory / "daemon.log")
        shutil.rmtree(directory, ignore_errors=True)
    return report


def _sample_peak(daemon, peak: list, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        if daemon.poll() is not None:
            return
        peak.append(sample(daemon)["rss_mib"])


def wait_online(tally: Tally, daemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while b"online" not in tally.statuses:
        if daemon.poll() is not None:
            raise RuntimeError(f"vlmd serve exited with {daemon.returncode} before it came online")
        if time.monotonic() > deadline:
            raise RuntimeError("vlmd serve did not come online")
        time.sleep(0.1)


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)
    return predicate()


def summarise(tally: Tally) -> dict:
    with tally.lock:
        sent = [rid for rid in tally.sent]
        lost = [rid for rid in sent if rid not in tally.finals]
        duplicated = [rid for rid, found in tally.finals.items() if len(found) > 1]
        reasons: dict[str, int] = {}
        for rid in sent:
            for reason in tally.finals.get(rid, []):
                reasons[reason] = reasons.get(reason, 0) + 1
        return {"requests_sent": len(sent), "finals_received": sum(len(tally.finals.get(r, [])) for r in sent),
                "lost": len(lost), "lost_ids": lost[:20], "duplicated": len(duplicated), "finish_reasons": reasons,
                "captions": tally.captions, "stopped_published": b"stopped" in tally.statuses,
                "offline_seen": b"offline" in tally.statuses}


def _tail(path: Path, lines: int = 5) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def main(argv=None) -> int:
    args = parse_args(argv)
    report = soak(args)
    ok = report.get("lost") == 0 and report.get("duplicated") == 0 and report.get("exit_code") == 0
    report["ok"] = ok
    if args.json:
        print(json.dumps(report))
    else:
        start, end = report.get("start", {}), report.get("end", {})
        print(f"soak {args.duration_s:.0f} s: {report.get('requests_sent')} requests sent, "
              f"{report.get('finals_received')} finals received, lost {report.get('lost')}, "
              f"duplicated {report.get('duplicated')}; reasons {report.get('finish_reasons')}; "
              f"captions {report.get('captions')}; frames {report.get('sent', {}).get('frames')}")
        print(f"daemon RSS {start.get('rss_mib')} -> {end.get('rss_mib')} MiB (peak {end.get('rss_peak_mib')}), "
              f"threads {start.get('threads')} -> {end.get('threads')}, exit {report.get('exit_code')}, "
              f"stopped published: {report.get('stopped_published')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
