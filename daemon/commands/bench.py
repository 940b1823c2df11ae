"""`vlmd bench`: how fast a model runs here, on any backend.

Per run: image encode ms, time to first token, prefill tok/s, decode tok/s, host
overhead per decode token (wall time outside the graphs: outside `session.run` on the
reference backend and pyaxengine's public path, outside libax_engine's run calls on the
zero-copy path), bytes per decode token, the greedy token ids, and the process's peak RSS.

Bytes per decode token: on a board (axengine backend) `bytes_per_token` is what the host
writes into device memory (`device`: written, flushed, invalidated; npu/board/traffic.py),
shown beside the C++ runtimes' figures at the same shapes (`cpp_runtime`) and their ratio;
on the reference backend it is the bytes handed to the graphs (what pyaxengine's run()
would memmove) plus the engine's own host copies. The JSON also names the data path and
why it is used, and the device memory (CMM) before and after loading.
Prints a table and one JSON line.
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
    parser.add_argument("--data-path", choices=("auto", "zero-copy", "public"), default="auto",
                        help="board data path (auto: zero-copy if it proves itself at load, else public)")
    parser.add_argument("--kv-capacity", type=int, default=1023, help="reference backend only")
    parser.add_argument("--prefill-chunk", type=int, default=128, help="reference backend only")
    parser.add_argument("--history-groups", type=int, default=0, help="reference backend only")
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
        self.traffic = getattr(inner, "traffic", None)  # a board session's device-memory counters

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


def _npu_seconds(model: Any) -> float | None:
    """Seconds inside libax_engine's run calls so far (zero-copy path), else None."""
    timer = getattr(model.data_path, "npu", None)
    return None if timer is None else timer.seconds


def bench_once(engine: Any, meter: Meter, prompt: Any, options: Any) -> dict[str, Any]:
    """One generation; the decode phase is measured from the first answer token to the last."""
    from npu.board.traffic import model_traffic
    from npu.engine import DoneEvent

    model = engine.model
    copied_before = engine.bytes_copied
    first: tuple | None = None
    done, tokens = None, []
    for event in engine.generate(prompt, options):
        if isinstance(event, DoneEvent):
            done = event
        else:
            tokens.append(event.token_id)
            if first is None:
                first = (time.perf_counter(), meter.snapshot(), engine.bytes_copied, model_traffic(model).copy(),
                         _npu_seconds(model))
    ended, end_meter, end_traffic, end_npu = time.perf_counter(), meter.snapshot(), model_traffic(model), \
        _npu_seconds(model)
    timings = done.timings
    steps = max(done.completion_tokens - 1, 0)
    result: dict[str, float | None] = {
        "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
        "image_ms": timings["image_ms"], "ttft_ms": timings["ttft_ms"], "prefill_ms": timings["prefill_ms"],
        "prefill_tok_s": _rate(done.prompt_tokens, timings["prefill_ms"] / 1000.0),
        "decode_tok_s": None, "host_overhead_ms_per_token": None, "bytes_per_token": None,
        "fed_bytes_per_token": None, "host_copy_bytes_per_token": None, "device_written_per_token": None,
        "device_flushed_per_token": None, "device_invalidated_per_token": None,
    }
    if first is not None and steps:
        wall = ended - first[0]
        inside = end_meter[1] - first[1][1] if end_npu is None else end_npu - first[4]
        fed = end_meter[2] - first[1][2]
        host_copies = engine.bytes_copied - first[2]
        device = end_traffic.minus(first[3]).per(steps)
        result["decode_tok_s"] = _rate(steps, wall)
        result["host_overhead_ms_per_token"] = round((wall - inside) * 1000.0 / steps, 3)
        result["fed_bytes_per_token"] = int(fed / steps)
        result["host_copy_bytes_per_token"] = int(host_copies / steps)
        if model.backend == "axengine":
            result["bytes_per_token"] = device["written"]
            result.update({f"device_{key}_per_token": value for key, value in device.items()})
        else:
            result["bytes_per_token"] = int((fed + host_copies) / steps)
    result["engine_bytes_copied"] = engine.bytes_copied - copied_before
    result["tokens"] = tokens
    return result


def _rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 2) if count and seconds > 0 else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric field over the runs."""
    summary: dict[str, Any] = {"tokens": runs[0]["tokens"]}
    for key in runs[0]:
        if key == "tokens":
            continue
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
            ("bytes moved/token", summary["bytes_per_token"])]
    if info["backend"] == "axengine":
        cpp = info["cpp_runtime"]["stackflow"]
        rows += [("  written to device", summary["device_written_per_token"]),
                 ("  flushed", summary["device_flushed_per_token"]),
                 ("  invalidated", summary["device_invalidated_per_token"]),
                 ("  C++ runtime (StackFlow)", f"written {cpp['written']}, flushed {cpp['flushed']},"
                                               f" invalidated {cpp['invalidated']}"),
                 ("  written vs C++", info.get("written_vs_cpp")),
                 ("data path", f"{info['data_path']['data_path']}: {info['data_path']['reason']}")]
        cmm = (info.get("cmm") or {}).get("after")
        if cmm:
            rows.append(("CMM free MB", f"{cmm['remain_kb'] // 1024} of {cmm['total_kb'] // 1024}"))
    else:
        # the reference backend reads the fed arrays in place: this row is what axengine's run() would copy
        rows += [("  fed to graphs (read in place)", summary["fed_bytes_per_token"]),
                 ("  host copies", summary["host_copy_bytes_per_token"])]
    rows.append(("peak RSS MB", info["peak_rss_mb"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {'-' if value is None else value}" for name, value in rows)


def _cpp_comparison(shapes: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """The C++ runtimes' bytes per decode token at these shapes, and how this run compares."""
    from npu.board.traffic import cpp_decode_traffic

    vocab = shapes.vocab if shapes.vocab is not None else shapes.post_topk
    cpp = {name: cpp_decode_traffic(shapes.n_layers, shapes.hidden, shapes.capacity, shapes.kv_dim, vocab,
                                    name).per(1) for name in ("stackflow", "ax-llm")}
    written = summary["device_written_per_token"]
    ratio = None if written is None else round(written / cpp["stackflow"]["written"], 3)
    return {"cpp_runtime": cpp, "written_vs_cpp": ratio}


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
                           kv_capacity=args.kv_capacity, prefill_chunk=args.prefill_chunk,
                           history_groups=args.history_groups, data_path=args.data_path)
    except (ModelError, ValueError, OSError) as exc:
        print(f"vlmd bench: {exc}", file=sys.stderr)
        return 2
    meter = Meter()
    engine = Engine(metered(model, meter), reuse_cached_rows=False)  # every run pays vision + prefill
    image = load_image(args.image, engine.shapes.vision_size)
    options = GenerationOptions(max_tokens=args.max_tokens, ignore_stop=True)
    results = []
    try:
        for index in range(args.runs + 1):  # run 0 warms caches and is not reported
            # No image key and no reuse of the cache's rows: every run pays vision + prefill.
            prompt = Prompt(args.prompt, images=[image] if image is not None else [], image_key=None)
            result = bench_once(engine, meter, prompt, options)
            if index:
                results.append(result)
    except EngineError as exc:
        print(f"vlmd bench: {exc}", file=sys.stderr)
        return 1
    summary = summarize(results)
    facts = model.describe()
    info = {"model": str(model.source or model.name), "backend": model.backend, "runs": args.runs,
            "peak_rss_mb": round(peak_rss_mb(), 1), "data_path": facts["data_path"], "cmm": facts["cmm"]}
    if model.backend == "axengine":
        info.update(_cpp_comparison(engine.shapes, summary))
    if not args.json:
        print(format_table(summary, info))
    print(json.dumps({"bench": summary, **info, "per_run": results}))
    return 0
