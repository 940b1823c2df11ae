"""`vlmd bench`: how fast a model runs here, on any backend.

Per run: image encode ms, time to first token, prefill tok/s, decode tok/s, host
overhead per decode token (wall time outside `session.run`), bytes handed to the
sessions per decode token (axengine copies every fed input into NPU memory on every
call, so this is the copy traffic a decode step costs) plus the engine's own host
copies (embedding rows, new K/V rows, casts), and the process's peak RSS. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

HELP = "measure image encode, TTFT, prefill and decode speed, host overhead and copies per token"
DEFAULT_PROMPT = "Describe the image in detail."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", help="model directory (default: the demo model)")
    parser.add_argument("--image", metavar="FILE", help="JPEG/PNG to describe (default: a synthetic image)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="question to ask")
    parser.add_argument("--runs", type=int, default=3, help="timed runs (after one warm-up run)")
    parser.add_argument("--max-tokens", type=int, default=32, help="answer tokens per run (stop tokens ignored)")
    parser.add_argument("--backend", choices=("auto", "reference", "axengine"), default="auto")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="reference backend only")
    parser.add_argument("--provider", default="auto", help="axengine provider: auto, axengine, axclrt")
    parser.add_argument("--kv-capacity", type=int, default=1023, help="reference backend only")
    parser.add_argument("--prefill-chunk", type=int, default=128, help="reference backend only")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")


@dataclass
class Meter:
    """Time spent inside session.run and bytes fed to it, across every metered session."""

    calls: int = 0
    run_s: float = 0.0
    bytes_fed: int = 0

    def snapshot(self) -> tuple[int, float, int]:
        return self.calls, self.run_s, self.bytes_fed


class MeteredSession:
    """A Session that counts its calls, the time inside them and the bytes fed (same contract)."""

    def __init__(self, inner: Any, meter: Meter) -> None:
        self._inner, self._meter = inner, meter
        self.name, self.num_groups = inner.name, inner.num_groups

    def inputs(self, group: int = 0):
        return self._inner.inputs(group)

    def outputs(self, group: int = 0):
        return self._inner.outputs(group)

    def run(self, feed: dict[str, np.ndarray], group: int = 0) -> list[np.ndarray]:
        started = time.perf_counter()
        try:
            return self._inner.run(feed, group)
        finally:
            self._meter.run_s += time.perf_counter() - started
            self._meter.calls += 1
            self._meter.bytes_fed += sum(array.nbytes for array in feed.values())


def metered(model: Any, meter: Meter) -> Any:
    """A copy of `model` whose sessions report to `meter`."""
    vision = None if model.vision is None else MeteredSession(model.vision, meter)
    return replace(model, vision=vision, layers=[MeteredSession(s, meter) for s in model.layers],
                   post=MeteredSession(model.post, meter))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def bench_once(engine: Any, meter: Meter, prompt: Any, options: Any) -> dict[str, float | None]:
    """One generation; the decode phase is measured from the first answer token to the last."""
    from npu.engine import DoneEvent

    copied_before = engine.bytes_copied
    first: tuple[float, tuple[int, float, int], int] | None = None
    done = None
    for event in engine.generate(prompt, options):
        if isinstance(event, DoneEvent):
            done = event
        elif first is None:
            first = (time.perf_counter(), meter.snapshot(), engine.bytes_copied)
    ended, end_meter = time.perf_counter(), meter.snapshot()
    timings = done.timings
    steps = max(done.completion_tokens - 1, 0)
    result: dict[str, float | None] = {
        "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
        "image_ms": timings["image_ms"], "ttft_ms": timings["ttft_ms"], "prefill_ms": timings["prefill_ms"],
        "prefill_tok_s": _rate(done.prompt_tokens, timings["prefill_ms"] / 1000.0),
        "decode_tok_s": None, "host_overhead_ms_per_token": None, "bytes_per_token": None,
        "fed_bytes_per_token": None, "host_copy_bytes_per_token": None,
    }
    if first is not None and steps:
        wall = ended - first[0]
        inside = end_meter[1] - first[1][1]
        fed = end_meter[2] - first[1][2]
        host_copies = engine.bytes_copied - first[2]
        result["decode_tok_s"] = _rate(steps, wall)
        result["host_overhead_ms_per_token"] = round((wall - inside) * 1000.0 / steps, 3)
        result["fed_bytes_per_token"] = int(fed / steps)
        result["host_copy_bytes_per_token"] = int(host_copies / steps)
        result["bytes_per_token"] = int((fed + host_copies) / steps)
    result["engine_bytes_copied"] = engine.bytes_copied - copied_before
    return result


def _rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 2) if count and seconds > 0 else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric field over the runs."""
    summary: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        if not values:
            summary[key] = None
        elif all(isinstance(v, int) for v in values):
            summary[key] = int(np.median(values))
        else:
            summary[key] = round(float(np.median(values)), 3)
    return summary


def format_table(summary: dict[str, Any], info: dict[str, Any]) -> str:
    rows = [("model", info["model"]), ("backend", info["backend"]), ("runs", info["runs"]),
            ("prompt tokens", summary["prompt_tokens"]), ("answer tokens", summary["completion_tokens"]),
            ("image encode ms", summary["image_ms"]), ("TTFT ms", summary["ttft_ms"]),
            ("prefill tok/s", summary["prefill_tok_s"]), ("decode tok/s", summary["decode_tok_s"]),
            ("host overhead ms/token", summary["host_overhead_ms_per_token"]),
            ("bytes moved/token", summary["bytes_per_token"]),
            # axengine copies every fed input into its buffers on each run; the reference
            # backend reads the same arrays in place, so there this row is an upper bound
            ("  fed to graphs" + ("" if info["backend"] == "axengine" else " (read in place)"),
             summary["fed_bytes_per_token"]),
            ("  host copies", summary["host_copy_bytes_per_token"]), ("peak RSS MB", info["peak_rss_mb"])]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {'-' if value is None else value}" for name, value in rows)


def load_image(path: str | None, size: tuple[int, int] | None) -> np.ndarray | None:
    if size is None:
        return None
    if path is None:  # a deterministic synthetic frame with structure
        height, width = size
        yy, xx = np.mgrid[0:height, 0:width]
        return np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)  # (H, W, 3)
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8


def run(args: argparse.Namespace) -> int:
    from npu.engine import Engine, EngineError, GenerationOptions, Prompt
    from npu.model import ModelError, load_model

    if args.runs < 1 or args.max_tokens < 2:
        print("vlmd bench: --runs must be >= 1 and --max-tokens >= 2", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model, backend=args.backend, precision=args.precision, provider=args.provider,
                           kv_capacity=args.kv_capacity, prefill_chunk=args.prefill_chunk)
    except (ModelError, ValueError, OSError) as exc:
        print(f"vlmd bench: {exc}", file=sys.stderr)
        return 2
    meter = Meter()
    engine = Engine(metered(model, meter))
    image = load_image(args.image, engine.shapes.vision_size)
    options = GenerationOptions(max_tokens=args.max_tokens, ignore_stop=True)
    results = []
    try:
        for index in range(args.runs + 1):  # run 0 warms caches and is not reported
            # A fresh image key per run: no prefix reuse, every run pays vision + prefill.
            prompt = Prompt(args.prompt, images=[image] if image is not None else [], image_key=None)
            result = bench_once(engine, meter, prompt, options)
            if index:
                results.append(result)
    except EngineError as exc:
        print(f"vlmd bench: {exc}", file=sys.stderr)
        return 1
    summary = summarize(results)
    info = {"model": str(model.source or model.name), "backend": model.backend, "runs": args.runs,
            "peak_rss_mb": round(peak_rss_mb(), 1)}
    if not args.json:
        print(format_table(summary, info))
    print(json.dumps({"bench": summary, **info, "per_run": results}))
    return 0
