"""Typed answers and conversations of the demo model, measured over MQTT.

    python tools/eval_typed_answers.py [--scenes 50] [--seed 9000000] [--model DIR]
                                       [--broker mqtt://HOST:PORT] [--json OUT] [--min-accuracy 0]

Starts a private mosquitto on a free port (or uses --broker; the embedded broker when no
mosquitto binary is installed) and vlmd's daemon in this process on the model, then for
every scene drawn by daemon/commands/demo/scenes.py from held-out seeds publishes the scene as a camera
frame and asks, each as an ordinary MQTT client would:

- boolean: "Is there a <kind>?" with {"type": "boolean"} (the kind drawn at random, so
  about half are absent);
- enum: "What colour is the <kind>?" with {"enum": the five colours}, for a kind the scene
  shows once (scenes without one are left out of this measure);
- integer: "How many shapes are there?" with {"type": "integer", "minimum": 0, "maximum": 9};
- a three-turn conversation: the caption (with the camera frame), then "How many shapes
  are there?" and one colour or presence question without an image, each answer compared
  with the scene, and each later turn's prefill_rows beside its prompt_tokens.

"parsed" means the final has a value of the format's type within its bounds and options
(always, by construction); "right" compares it with the scene. Prints one line per
wrong answer and a JSON summary (also written to --json); exits 1 when a typed answer did
not parse or a typed measure is below --min-accuracy.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon.commands.demo import scenes  # noqa: E402

HELD_OUT_SEED = 9_000_000  # the training never draws these (tools/eval_demo_model.py)
CAMERA = "eval"
BOOLEAN = {"type": "boolean"}
COLOURS = {"enum": list(scenes.COLOURS)}
COUNT = {"type": "integer", "minimum": 0, "maximum": 9}
CAPTION_PROMPT = "Describe the image shortly."
TIMEOUT_S = 120.0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    broker = None
    if args.broker:
        url = args.broker
    elif shutil.which("mosquitto"):
        broker = _Mosquitto()
        url = broker.url
    else:
        url = ""  # the daemon starts its embedded broker
    service = _start_daemon(url, args.model)
    client = _Client(service.broker_url, service.topics)
    try:
        results = _measure(service, client, args.scenes, args.seed)
    finally:
        client.close()
        service.stop(drain_timeout=2.0)
        if broker is not None:
            broker.stop()
    summary = _summary(results, args, url or service.broker_url)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    typed = [summary[name] for name in ("boolean", "enum", "integer")]
    failed = any(m["parsed"] < m["n"] or m["right_pct"] < args.min_accuracy for m in typed)
    return 1 if failed else 0


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--model", default=None, help="model directory (default: the demo model)")
    parser.add_argument("--broker", default=None, help="an MQTT broker to use instead of a private mosquitto")
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument("--min-accuracy", type=float, default=0.0, help="exit 1 below this % on a typed measure")
    return parser.parse_args(argv)


def _measure(service, client, num_scenes: int, first_seed: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {"boolean": [], "enum": [], "integer": [], "conversation": []}
    for index in range(num_scenes):
        seed = first_seed + index
        image, scene = scenes.draw_scene(seed)
        rng = random.Random(seed)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        received = service.inbox.frame_counts().get(CAMERA, {}).get("received", 0)
        client.publish(service.topics.frame(CAMERA), buffer.getvalue())
        _wait(lambda: service.inbox.frame_counts().get(CAMERA, {}).get("received", 0) > received, "the frame")
        kinds = [shape.kind for shape in scene.shapes]
        kind = rng.choice(scenes.KINDS)
        final = client.ask({"text": f"Is there a {kind}?", "camera": CAMERA, "format": BOOLEAN})
        results["boolean"].append(_typed(seed, final, BOOLEAN, kind in kinds))
        unique = [k for k in kinds if kinds.count(k) == 1]
        if unique:
            wanted = rng.choice(unique)
            shape = next(s for s in scene.shapes if s.kind == wanted)
            final = client.ask({"text": f"What colour is the {shape.kind}?", "camera": CAMERA, "format": COLOURS})
            results["enum"].append(_typed(seed, final, COLOURS, shape.colour))
        final = client.ask({"text": "How many shapes are there?", "camera": CAMERA, "format": COUNT})
        results["integer"].append(_typed(seed, final, COUNT, len(scene.shapes)))
        results["conversation"].append(_conversation(client, seed, scene, rng))
    return results


def _typed(seed: int, final: dict, schema: dict, truth) -> dict:
    value = final.get("value")
    row = {"seed": seed, "question": final.get("_question"), "text": final.get("text"), "value": value,
           "truth": truth, "confidence": final.get("confidence"), "finish_reason": final["finish_reason"],
           "parsed": _fits(value, schema), "right": _fits(value, schema) and value == truth and type(value) is type(truth)}
    if not row["right"]:
        print(f"wrong  seed {seed}: {row['question']!r} -> {row['text']!r} (value {value!r}, expected {truth!r})",
              file=sys.stderr)
    return row


def _fits(value, schema: dict) -> bool:
    if "enum" in schema:
        return isinstance(value, str) and value in schema["enum"]
    if schema["type"] == "boolean":
        return isinstance(value, bool)
    return isinstance(value, int) and not isinstance(value, bool) and schema["minimum"] <= value <= schema["maximum"]


def _conversation(client, seed: int, scene, rng: random.Random) -> dict:
    conversation = f"scene-{seed}"
    kinds = [shape.kind for shape in scene.shapes]
    unique = [k for k in kinds if kinds.count(k) == 1]
    if unique:
        wanted = rng.choice(unique)
        shape = next(s for s in scene.shapes if s.kind == wanted)
        third, third_truth = f"What colour is the {shape.kind}?", shape.colour
    else:
        kind = rng.choice(scenes.KINDS)
        third, third_truth = f"Is there a {kind}?", "yes" if kind in kinds else "no"
    asked = [({"text": CAPTION_PROMPT, "camera": CAMERA}, scene.caption()),
             ({"text": "How many shapes are there?"}, scenes.NUMBERS[len(scene.shapes)]),
             ({"text": third}, third_truth)]
    turns = []
    for request, truth in asked:
        final = client.ask({**request, "conversation": conversation, "max_tokens": 48})
        timings = final.get("timings", {})
        turns.append({"question": request["text"], "answer": final["text"], "truth": truth,
                      "right": final["text"].strip().lower() == truth, "turn": final.get("turn"),
                      "prompt_tokens": final["usage"]["prompt_tokens"], "prefill_rows": timings.get("prefill_rows"),
                      "history_rows": timings.get("history_rows"), "images_encoded": timings.get("images_encoded")})
        if not turns[-1]["right"]:
            print(f"wrong  seed {seed} turn {len(turns)}: {request['text']!r} -> {final['text']!r} "
                  f"(expected {truth!r})", file=sys.stderr)
    client.ask({"conversation": conversation, "reset": True})
    return {"seed": seed, "turns": turns}


def _summary(results: dict[str, list[dict]], args, url: str) -> dict:
    summary: dict = {"scenes": args.scenes, "first_seed": args.seed, "model": args.model or "demo model",
                     "broker": url, "load_average": os.getloadavg()}
    for name in ("boolean", "enum", "integer"):
        rows = results[name]
        right = sum(row["right"] for row in rows)
        confidences = [row["confidence"] for row in rows if row["confidence"] is not None]
        summary[name] = {"n": len(rows), "parsed": sum(row["parsed"] for row in rows), "right": right,
                         "right_pct": round(100.0 * right / max(len(rows), 1), 1),
                         "mean_confidence": round(sum(confidences) / max(len(confidences), 1), 3)}
    conversations = results["conversation"]
    per_turn = []
    for number in range(3):
        turns = [c["turns"][number] for c in conversations]
        per_turn.append({
            "turn": number + 1, "n": len(turns), "right": sum(t["right"] for t in turns),
            "right_pct": round(100.0 * sum(t["right"] for t in turns) / max(len(turns), 1), 1),
            "mean_prompt_tokens": round(sum(t["prompt_tokens"] for t in turns) / max(len(turns), 1), 1),
            "mean_prefill_rows": round(sum(t["prefill_rows"] or 0 for t in turns) / max(len(turns), 1), 1),
            "prefill_only_own_rows": sum(t["history_rows"] is not None and t["prefill_rows"] + t["history_rows"]
                                         == t["prompt_tokens"] and t["history_rows"] > 0 for t in turns),
            "images_encoded": sum(t["images_encoded"] or 0 for t in turns)})
    summary["conversation"] = per_turn
    summary["conversation_all_turns_right"] = sum(all(t["right"] for t in c["turns"]) for c in conversations)
    return summary


def _wait(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"eval_typed_answers: timed out waiting for {what}")
        time.sleep(0.01)


def _start_daemon(url: str, model: str | None):
    from daemon.config import load_config
    from daemon.logs import configure_logging
    from daemon.service import Service

    configure_logging("warning", "console", sys.stderr)

    overrides = {"device_id": "eval", "mqtt": {"broker": url, "protocol": "3.1.1"}, "logging": {"level": "warning"},
                 "embedded_broker": {"host": "127.0.0.1", "port": 0}, "requests": {"queue_size": 64}}
    if model:
        overrides["model"] = {"path": model}
    service = Service(load_config(None, env={}, overrides=overrides))
    service.start()
    if not service.client.wait_connected(30):
        raise SystemExit("eval_typed_answers: the daemon did not connect to the broker")
    return service


class _Mosquitto:
    """A private mosquitto on a free loopback port (no retained state shared with anything)."""

    def __init__(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.directory = tempfile.mkdtemp(prefix="vlmd-eval-")
        config = Path(self.directory) / "mosquitto.conf"
        config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
        self.process = subprocess.Popen(["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("eval_typed_answers: mosquitto did not start") from None
                time.sleep(0.05)
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


class _Client:
    """Publishes frames and asks; waits for each ask's final (MQTT 3.1.1, no streaming)."""

    def __init__(self, url: str, topics):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from daemon.config import parse_broker_url

        address = parse_broker_url(url)
        self.topics = topics
        self._finals: dict[str, dict] = {}
        self._done = threading.Condition()
        self._count = 0
        self._client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        subscribed = threading.Event()
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.answer_filter(), qos=1)
        self._client.on_subscribe = lambda *a: subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(address.host, address.port)
        self._client.loop_start()
        if not subscribed.wait(10):
            raise SystemExit("eval_typed_answers: could not subscribe")

    def publish(self, topic: str, payload: bytes) -> None:
        self._client.publish(topic, payload, qos=1).wait_for_publish(10)

    def ask(self, request: dict) -> dict:
        self._count += 1
        request_id = f"eval-{self._count}"
        self.publish(self.topics.ask(), json.dumps({"id": request_id, "stream": False, **request}).encode())
        deadline = time.monotonic() + TIMEOUT_S
        with self._done:
            while request_id not in self._finals:
                if not self._done.wait(max(deadline - time.monotonic(), 0)) and time.monotonic() > deadline:
                    raise SystemExit(f"eval_typed_answers: no final for {request} within {TIMEOUT_S:.0f}s")
            final = self._finals.pop(request_id)
        final["_question"] = request.get("text")
        return final

    def _on_message(self, client, userdata, message) -> None:
        body = json.loads(message.payload)
        if body.get("done"):
            with self._done:
                self._finals[body["id"]] = body
                self._done.notify_all()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


if __name__ == "__main__":
    raise SystemExit(main())
