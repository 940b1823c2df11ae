"""SIGKILL a busy `vlmd serve` at random moments, restart it, and count the finals.

Issue 15's check by hand: a private mosquitto on loopback, `vlmd serve` (the shipped demo
model on the reference backend, the request journal in a temporary directory) as its
own process, and one asking client with a persistent session that publishes questions
all the time (text, inline image, camera; frames for the camera twice a second), also
while the daemon is down. Each round waits a random time once the daemon is online,
SIGKILLs it, starts it again at once and waits until every question that had no final
at the moment of the kill has one. After the last round the load stops, the remaining
finals are awaited and the daemon gets SIGTERM.

Reported: requests sent, finals received, requests with exactly one final, lost
(none), duplicated (more than one; `differing` counts those whose finals were not
byte-identical), finals by finish_reason and error code; per round the questions owed
at the kill, seconds from the restart to `online` and to the last owed final
(recovery latency), and the machine load.

    python bench/sigkill_rounds.py [--rounds 20] [--rate 6] [--seed 0] [--json] [--out FILE]

Bounded: each round waits at most --round-timeout seconds for its owed finals, the
drain at most --drain. Exit status 0 when every request got exactly one final.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.soak import frame_png, start_broker, wait_for  # noqa: E402  (the same broker and frames)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="SIGKILL + restart rounds")
    parser.add_argument("--rate", type=float, default=6.0, help="questions per second offered")
    parser.add_argument("--min-up", type=float, default=0.5, help="shortest wait before a kill, seconds online")
    parser.add_argument("--max-up", type=float, default=4.0, help="longest wait before a kill")
    parser.add_argument("--max-tokens", type=int, default=24, help="max_tokens of each question")
    parser.add_argument("--round-timeout", type=float, default=90.0, help="most seconds a round waits for its owed finals")
    parser.add_argument("--drain", type=float, default=120.0, help="seconds to wait for the last finals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    return parser.parse_args(argv)


class Asker:
    """The client: persistent session, QoS 1 questions, every final kept (on paho's thread)."""

    def __init__(self, host: str, port: int, root: str):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.root = root
        self.lock = threading.Lock()
        self.sent: dict[str, float] = {}  # id -> monotonic time published
        self.finals: dict[str, list[bytes]] = {}  # id -> every final payload received
        self.onlines: list[float] = []  # monotonic times `online` was seen
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="asker-" + uuid.uuid4().hex[:8],
                                  protocol=paho.MQTTv311, clean_session=False)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(f"{root}/answer/#", 1), (f"{root}/status", 1)])
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        now, payload = time.monotonic(), bytes(message.payload)
        with self.lock:
            if message.topic == f"{self.root}/status":
                if payload == b"online":
                    self.onlines.append(now)
                return
            body = json.loads(payload)
            if body.get("done"):
                self.finals.setdefault(body["id"], []).append(payload)

    def ask(self, request: dict) -> None:
        with self.lock:
            self.sent[request["id"]] = time.monotonic()
        self.client.publish(f"{self.root}/ask", json.dumps(request), qos=1)

    def unanswered(self) -> set[str]:
        with self.lock:
            return {rid for rid in self.sent if rid not in self.finals}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def load(asker: Asker, args, stop: threading.Event, rng: random.Random) -> None:
    """Questions at `rate` per second and two frames a second, until `stop`."""
    inline = base64.b64encode(frame_png(rng, (48, 32))).decode()
    n, next_frame = 0, 0.0
    while not stop.is_set():
        if time.monotonic() >= next_frame:
            asker.client.publish(f"{asker.root}/frame/door", frame_png(rng), qos=0)
            next_frame = time.monotonic() + 0.5
        request = {"id": f"k{n}", "max_tokens": args.max_tokens, "stream": rng.random() < 0.5}
        kind = rng.random()
        if kind < 0.2:
            request.update(text="What is in the image?", camera="door")
        elif kind < 0.4:
            request.update(text="And this one?", image_b64=inline)
        else:
            request.update(text=rng.choice(["Say hello.", "Count to three.", "What is a circle?"]))
        asker.ask(request)
        n += 1
        stop.wait(rng.expovariate(args.rate))


def start_daemon(broker: str, device_id: str, journal_dir: Path, log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLMD_JOURNAL__DIRECTORY": str(journal_dir),
           "VLMD_MQTT__PROTOCOL": "3.1.1", "VLMD_MQTT__KEEPALIVE_S": "5", "VLMD_MQTT__RECONNECT_MAX_S": "2",
           "VLMD_REQUESTS__QUEUE_SIZE": "256", "VLMD_STATS__INTERVAL_S": "3600", "VLMD_LOGGING__FORMAT": "json"}
    env.pop("VLMD_TEST_JOURNAL_KILL_AT", None)
    command = [sys.executable, "-m", "daemon.cli", "serve", "--broker", broker, "--device-id", device_id,
               "--backend", "reference", "--log-level", "warning"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)


def run(args) -> dict:
    rng = random.Random(args.seed)
    directory = Path(tempfile.mkdtemp(prefix="vlmd-sigkill-"))
    broker_process = daemon = asker = None
    stop = threading.Event()
    report: dict = {"rounds": [], "load_average_1m_start": round(os.getloadavg()[0], 2), "nproc": os.cpu_count(),
                    "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "command": " ".join(["python", "bench/sigkill_rounds.py", *sys.argv[1:]])}
    log = open(directory / "daemon.log", "w")  # noqa: SIM115 (every run appends to it)
    try:
        broker, broker_process = start_broker(directory)
        host, port = broker.removeprefix("mqtt://").split(":")
        device_id = "kill" + uuid.uuid4().hex[:6]
        asker = Asker(host, int(port), f"vlmd/{device_id}")
        daemon = start_daemon(broker, device_id, directory / "journal", log)
        if not wait_for(lambda: asker.onlines, 180.0):
            raise RuntimeError("vlmd serve did not come online")
        loader = threading.Thread(target=load, args=(asker, args, stop, rng), daemon=True)
        loader.start()
        for number in range(args.rounds):
            time.sleep(rng.uniform(args.min_up, args.max_up))
            owed = asker.unanswered()
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(30)
            onlines_before = len(asker.onlines)
            restarted_at = time.monotonic()
            daemon = start_daemon(broker, device_id, directory / "journal", log)
            answered = wait_for(lambda: not owed & asker.unanswered(), args.round_timeout)
            finished_at = time.monotonic()
            wait_for(lambda: len(asker.onlines) > onlines_before, 30.0)
            online = next((t for t in asker.onlines[onlines_before:]), None)
            report["rounds"].append({
                "round": number + 1, "owed_at_kill": len(owed), "all_owed_answered": answered,
                "online_s": None if online is None else round(online - restarted_at, 2),
                "recovery_s": round(finished_at - restarted_at, 2) if answered else None,
                "load_average_1m": round(os.getloadavg()[0], 2)})
            if not args.json:
                r = report["rounds"][-1]
                print(f"round {r['round']:2d}: {r['owed_at_kill']:3d} owed at the kill, online after {r['online_s']} s, "
                      f"all owed answered after {r['recovery_s']} s (load {r['load_average_1m']})", flush=True)
        stop.set()
        loader.join(10)
        wait_for(lambda: not asker.unanswered(), args.drain)
        time.sleep(2.0)  # late duplicates, if any
        daemon.send_signal(signal.SIGTERM)
        report["exit_code"] = daemon.wait(60)
        report["journal_bytes"] = sum(p.stat().st_size for p in (directory / "journal").glob("*.journal"))
        report.update(summarise(asker))
    finally:
        stop.set()
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        if asker is not None:
            asker.close()
        if broker_process is not None:
            broker_process.terminate()
            broker_process.wait(10)
        log.close()
        report["daemon_log_errors"] = _errors(directory / "daemon.log")
        shutil.rmtree(directory, ignore_errors=True)
    return report


def summarise(asker: Asker) -> dict:
    with asker.lock:
        sent = list(asker.sent)
        finals = {rid: list(asker.finals.get(rid, [])) for rid in sent}
    reasons: dict[str, int] = {}
    codes: dict[str, int] = {}
    for found in finals.values():
        for payload in found:
            body = json.loads(payload)
            reasons[body["finish_reason"]] = reasons.get(body["finish_reason"], 0) + 1
            if body.get("error"):
                codes[body["error"]["code"]] = codes.get(body["error"]["code"], 0) + 1
    duplicated = [rid for rid, found in finals.items() if len(found) > 1]
    return {
        "requests_sent": len(sent), "finals_received": sum(map(len, finals.values())),
        "exactly_one_final": sum(len(found) == 1 for found in finals.values()),
        "lost": sum(not found for found in finals.values()), "duplicated": len(duplicated),
        "duplicated_ids": duplicated[:10], "differing": sum(len(set(finals[rid])) > 1 for rid in duplicated),
        "finish_reasons": reasons, "error_codes": codes,
    }


def _errors(path: Path) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line[:300] for line in lines if '"level": "error"' in line][:10]


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    rounds = report["rounds"]
    recoveries = [r["recovery_s"] for r in rounds if r["recovery_s"] is not None]
    onlines = [r["online_s"] for r in rounds if r["online_s"] is not None]
    report["recovery_s"] = {"median": statistics.median(recoveries) if recoveries else None,
                            "max": max(recoveries) if recoveries else None}
    report["online_s"] = {"median": statistics.median(onlines) if onlines else None,
                          "max": max(onlines) if onlines else None}
    report["ok"] = report.get("lost") == 0 and report.get("duplicated") == 0 and len(recoveries) == len(rounds)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{len(rounds)} rounds: {report.get('requests_sent')} requests sent, {report.get('finals_received')} finals "
              f"received, {report.get('exactly_one_final')} with exactly one, lost {report.get('lost')}, duplicated "
              f"{report.get('duplicated')} (differing {report.get('differing')}); reasons {report.get('finish_reasons')}; "
              f"codes {report.get('error_codes')}")
        print(f"restart -> online: median {report['online_s']['median']} s, max {report['online_s']['max']} s; "
              f"restart -> every owed final: median {report['recovery_s']['median']} s, max "
              f"{report['recovery_s']['max']} s; journal {report.get('journal_bytes')} bytes at the end; exit "
              f"{report.get('exit_code')}; load {report['load_average_1m_start']} at the start ({report['nproc']} CPUs)")
        for line in report["daemon_log_errors"]:
            print("daemon error:", line)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
