"""MQTT path against a real mosquitto: frame ingest rate and RSS, question latency, chunk cost.

Starts a private mosquitto on a free loopback port and vlmd's `Service` in this process
with an engine that costs nothing (it yields `--tokens` tokens at once and reports its
own TTFT), so what is measured is the daemon and the broker:

1. frames: a paho client publishes `--frame-kb` KB JPEGs round-robin to `--cameras`
   cameras at each offered rate of `--rates` (frames/s; `max` = as fast as the client
   can) for `--seconds` each; reported: frames/s the service received (its inbox
   counters) and this process's RSS at the start, end and peak of each phase;
2. latency: `--asks` questions one after another; for each, the time from publishing
   the question to receiving its first answer chunk, minus the engine's own TTFT
   (p50, p99), and the time per token from the first chunk to the final (chunk publish
   overhead per token, measured at the subscriber).

Goals (reported, not asserted): >= 1000 frames/s with flat RSS; <= 5 ms p50 added latency.

    python bench/mqtt_path.py [--rates 120,500,1000,2000,max] [--seconds 5] [--asks 200] [--tiny]

Prints a table and writes bench/results/mqtt_path.json (or --out).
"""

from __future__ import annotations

import argparse
import io
import json
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.insert(0, str(common.REPO))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="120,500,1000,2000,max", help="offered frames/s per phase ('max' = flat out)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per frame-rate phase")
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--frame-kb", type=int, default=50, help="JPEG size in KB (approximate)")
    parser.add_argument("--asks", type=int, default=200, help="questions for the latency measurement")
    parser.add_argument("--tokens", type=int, default=64, help="answer tokens per question")
    parser.add_argument("--nodelay", action="store_true",
                        help="mosquitto `set_tcp_nodelay true` (its default leaves Nagle's algorithm on)")
    parser.add_argument("--daemon-nagle", action="store_true",
                        help="leave Nagle's algorithm on in the daemon's client (the behaviour before the fix)")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="Python's GIL switch interval (default 5 ms) for this process")
    parser.add_argument("--tiny", action="store_true", help="a few seconds in all (smoke test)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.rates, args.seconds, args.asks, args.tokens = "120,max", 0.5, 10, 8
    return args


class ZeroCostEngine:
    """The engine interface with no model: `tokens` tokens at once; TTFT measured like the real one."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.ttft_ms: dict[str, float] = {}  # question text -> engine TTFT

    def model_summary(self) -> dict:
        return {"path": None, "layout": None, "backend": "zero-cost"}

    def generate(self, prompt, options=None, should_stop=None):
        from npu.engine import DoneEvent, TokenEvent

        started = time.perf_counter()
        count = min(self.tokens, options.max_tokens if options else self.tokens)
        ttft = None
        for index in range(count):
            if ttft is None:
                ttft = (time.perf_counter() - started) * 1e3
                self.ttft_ms[prompt.text] = ttft
            yield TokenEvent(1000 + index, f" w{index}", index)
        text = "".join(f" w{i}" for i in range(count))
        yield DoneEvent(text, "length", 7, count, {"ttft_ms": round(ttft or 0.0, 3)})


def jpeg_of_size(kilobytes: int) -> bytes:
    """A noise JPEG close to `kilobytes` KB (noise barely compresses, so size tracks pixels)."""
    import numpy as np
    from PIL import Image

    side = 64
    while True:
        pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)  # (side, side, 3)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=70)
        if buffer.tell() >= kilobytes * 1024 or side > 4096:
            return buffer.getvalue()
        side += 16


def paho_client(host: str, port: int, on_message=None):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.max_queued_messages_set(0)
    # The benchmark's own clients send without Nagle's delay, so only the daemon's path is measured.
    client.on_socket_open = lambda c, u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if on_message is not None:
        client.on_message = on_message
    client.connect(host, port)
    client.loop_start()
    return client


def measure_frames(service, broker, args, frame_path: Path) -> list[dict]:
    """One phase per offered rate; the publisher is a child process, so this process's RSS
    is the service's (and a publisher's unsent queue is not counted against it)."""
    prefix = service.topics.frame("cam0")[: -len("cam0")]  # the builder's frame topic, camera left off

    def received() -> int:
        return sum(c.get("received", 0) for c in service.inbox.frame_counts().values())

    phases = []
    for rate_text in args.rates.split(","):
        samples: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(samples, stop), daemon=True)
        before, rss_before = received(), common.rss_bytes()
        sampler.start()
        done = subprocess.run([sys.executable, __file__, "--publish", broker.host, str(broker.port), prefix,
                               str(args.cameras), rate_text.strip(), str(args.seconds), str(frame_path)],
                              capture_output=True, text=True, check=True)
        sent, send_s = json.loads(done.stdout.strip().splitlines()[-1])
        _wait_until(lambda: received() - before >= sent, timeout=5.0)
        stop.set()
        sampler.join()
        got = received() - before
        phases.append({"offered_fps": rate_text.strip(), "published_fps": round(sent / send_s, 1),
                       # over the publisher's window: the drain afterwards is the service catching up
                       "received_fps": round(got / send_s, 1), "frames_sent": sent, "frames_received": got,
                       "rss_start_mb": round(rss_before / 2**20, 1), "rss_end_mb": round(common.rss_bytes() / 2**20, 1),
                       "rss_peak_mb": round(max(samples, default=rss_before) / 2**20, 1)})
        print(f"frames offered {rate_text.strip():>5s}/s: received {phases[-1]['received_fps']:8.1f}/s,"
              f" RSS {phases[-1]['rss_start_mb']} -> {phases[-1]['rss_end_mb']} MB", file=sys.stderr)
    return phases


def publish_frames(host: str, port: int, prefix: str, cameras: int, rate_text: str, seconds: float,
                   frame_path: Path) -> None:
    """Child process: publish the frame round-robin at `rate_text`/s ("max": flat out); print [sent, seconds]."""
    frame = Path(frame_path).read_bytes()
    rate = None if rate_text == "max" else float(rate_text)
    client = paho_client(host, port)
    topics = [f"{prefix}cam{i}" for i in range(cameras)]
    started = time.perf_counter()
    sent = 0
    while (now := time.perf_counter()) - started < seconds:
        if rate is not None and sent >= rate * (now - started):
            time.sleep(0.0005)
            continue
        client.publish(topics[sent % len(topics)], frame, qos=0)
        sent += 1
    elapsed = time.perf_counter() - started
    client.disconnect()  # queued frames are flushed first
    client.loop_stop()
    print(json.dumps([sent, elapsed]))


def _sample_rss(samples: list[int], stop: threading.Event) -> None:
    while not stop.wait(0.05):
        samples.append(common.rss_bytes())


def _wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)


def measure_latency(service, engine: ZeroCostEngine, host: str, port: int, args) -> dict:
    arrivals: queue.Queue = queue.Queue()
    listener = paho_client(host, port, on_message=lambda c, u, m: arrivals.put((time.perf_counter(), m.payload)))
    # Every answer topic: the builder refuses "+" as an id, so swap the id level for the wildcard.
    listener.subscribe(service.topics.answer("x").rsplit("/", 1)[0] + "/+", qos=1)
    time.sleep(0.3)  # the SUBACK: answers published before it would be missed
    asker = paho_client(host, port)
    added, per_token = [], []
    for index in range(args.asks):
        text = f"question {index} {uuid.uuid4().hex[:6]}"
        sent = time.perf_counter()
        asker.publish(service.topics.ask(), json.dumps({"id": f"q{index}", "text": text,
                                                        "max_tokens": args.tokens}), qos=1)
        first = final = None
        while final is None:
            arrived, payload = arrivals.get(timeout=10)
            body = json.loads(payload)
            if body.get("id") != f"q{index}":
                continue
            first = first if first is not None else arrived
            final = arrived if body.get("done") else None
        added.append((first - sent) * 1e3 - engine.ttft_ms.get(text, 0.0))
        per_token.append((final - first) * 1e6 / max(args.tokens - 1, 1))
    listener.loop_stop()
    asker.loop_stop()
    return {"asks": args.asks, "tokens": args.tokens,
            "added_latency_ms_p50": round(_percentile(added, 50), 3),
            "added_latency_ms_p99": round(_percentile(added, 99), 3),
            "chunk_us_per_token_p50": round(_percentile(per_token, 50), 1),
            "chunk_us_per_token_p99": round(_percentile(per_token, 99), 1)}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run(args) -> dict:
    from daemon.config import Config
    from daemon.service import Service
    from tests.fixtures_broker import start_mosquitto

    from daemon.logs import configure_logging

    configure_logging("warning")  # a log line per request would be measured too
    if args.daemon_nagle:  # the daemon as it was before it set TCP_NODELAY (before/after figure)
        import daemon.mqtt.client

        daemon.mqtt.client.no_delay = lambda client, userdata, sock: None
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    engine = ZeroCostEngine(args.tokens)
    with tempfile.TemporaryDirectory(prefix="vlmd-mqtt-bench-") as scratch:
        broker = start_mosquitto(Path(scratch), extra_config="set_tcp_nodelay true\n" if args.nodelay else "")
        try:
            config = Config.model_validate({
                "device_id": "bench" + uuid.uuid4().hex[:6], "logging": {"level": "warning"},
                "mqtt": {"broker": broker.url, "protocol": "3.1.1", "persistent_session": False},
                "stats": {"interval_s": 3600}, "requests": {"queue_size": 64}})
            service = Service(config, engine_factory=lambda c: engine)
            service.start()
            if not service.client.wait_connected(10):
                raise RuntimeError("the service did not connect to mosquitto")
            frame = jpeg_of_size(args.frame_kb)
            frame_path = Path(scratch) / "frame.jpg"
            frame_path.write_bytes(frame)
            frames = measure_frames(service, broker, args, frame_path)
            latency = measure_latency(service, engine, broker.host, broker.port, args)
            service.stop(2.0)
        finally:
            broker.process.terminate()  # the mosquitto this script started, by its own handle
            broker.process.wait(timeout=10)
            if broker.process.stderr:
                broker.process.stderr.close()
    return {"benchmark": "mqtt_path", "machine": common.machine_info(None), "tiny": args.tiny,
            "variant": ("mosquitto set_tcp_nodelay true" if args.nodelay else "mosquitto defaults (Nagle on)")
            + (", daemon client with Nagle (before the fix)" if args.daemon_nagle else ""),
            "broker_tcp_nodelay": args.nodelay,
            "frame_bytes": len(frame), "cameras": args.cameras, "seconds_per_phase": args.seconds,
            "frames": frames, "latency": latency,
            "goals": {"frames_per_s": 1000, "added_latency_ms_p50": 5.0}}


def table(result: dict) -> str:
    lines = [f"{'offered/s':>10s} {'published/s':>12s} {'received/s':>11s} {'RSS start':>10s} {'end':>7s} {'peak':>7s}"]
    for p in result["frames"]:
        lines.append(f"{p['offered_fps']:>10s} {p['published_fps']:12.1f} {p['received_fps']:11.1f}"
                     f" {p['rss_start_mb']:10.1f} {p['rss_end_mb']:7.1f} {p['rss_peak_mb']:7.1f}")
    lat = result["latency"]
    lines.append(f"added latency p50 {lat['added_latency_ms_p50']} ms, p99 {lat['added_latency_ms_p99']} ms;"
                 f" chunk path {lat['chunk_us_per_token_p50']} us/token (p99 {lat['chunk_us_per_token_p99']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--publish"]:
        host, port, prefix, cameras, rate, seconds, path = argv[1:8]
        publish_frames(host, int(port), prefix, int(cameras), rate, float(seconds), Path(path))
        return 0
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    name = "mqtt_path_tiny" if args.tiny else "mqtt_path"
    print(f"wrote {common.write_result(name, result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
