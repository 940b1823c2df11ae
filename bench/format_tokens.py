"""Host time per answer token of constrained decoding, per format kind, beside free decoding.

The engine runs on graphs that cost nothing at InternVL2-1B's shapes (bench/zero_cost.py)
with the real Qwen2 vocabulary (151,655 ids) and a post graph that returns one of a few
preallocated random logit rows in turn (so answers vary; nothing is computed per call).
For each format kind (boolean, integer, number, enum, a flat object of 16 numbers,
Frigate's review schema, a nested schema with $defs/$ref, arrays and anyOf) it times
whole answers, greedy, and divides by the answer tokens; free greedy decoding of the same
prompt is timed the same way. The difference is the format's own cost: one token mask
(llguidance), the allowed logits gathered, the choice. Token masks are also timed alone.

    python bench/format_tokens.py [--runs 5] [--out bench/results/format_tokens.json]
    python bench/format_tokens.py --demo [--code /path/to/a/checkout]   # issue 21's 16-number object

`--demo` runs issue 21's reproduction instead: an object of 16 `number` properties asked
of the demo model (npu/assets/demo_model) through the engine, tokens/s of the answer;
`--code` imports npu/ and protocol/ from another checkout (e.g. main, for the figure
before this change). Goal (reported, not asserted): <= 2x free decoding's host time per token.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="answers per format (the median is reported)")
    parser.add_argument("--tiny", action="store_true", help="one run, fewer formats (the smoke test)")
    parser.add_argument("--demo", action="store_true", help="issue 21's 16-number object on the demo model")
    parser.add_argument("--code", type=Path, default=None, help="import npu/ and protocol/ from this checkout")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def sixteen_numbers() -> dict:
    return {"type": "object", "properties": {f"reading_{i}": {"type": "number"} for i in range(16)}}


def demo_run(code: Path | None) -> dict:
    """Issue 21 item 4 on the demo model: tokens/s of a 16-number object answer."""
    if code is not None:
        sys.path.insert(0, str(code))
    from npu.engine import DoneEvent, Engine, GenerationOptions, Prompt  # noqa: PLC0415 - after --code
    from npu.model import DEMO_MODEL_DIR, load_model  # noqa: PLC0415
    from protocol.formats import parse_format  # noqa: PLC0415

    engine = Engine(load_model(DEMO_MODEL_DIR))
    options = GenerationOptions(max_tokens=256, format=parse_format(sixteen_numbers()))
    started = time.perf_counter()
    done = [e for e in engine.generate(Prompt("What are the readings?"), options) if isinstance(e, DoneEvent)][0]
    elapsed = time.perf_counter() - started
    free_started = time.perf_counter()
    free = [e for e in engine.generate(Prompt("What are the readings?"), GenerationOptions(max_tokens=done.completion_tokens,
                                                                                          ignore_stop=True))
            if isinstance(e, DoneEvent)][0]
    free_elapsed = time.perf_counter() - free_started
    import npu  # noqa: PLC0415

    return {"code": str(Path(npu.__file__).resolve().parents[1]), "answer_tokens": done.completion_tokens, "seconds": round(elapsed, 3),
            "tokens_per_s": round(done.completion_tokens / elapsed, 2), "finish": done.finish_reason,
            "free_tokens_per_s": round(free.completion_tokens / free_elapsed, 2), "text": done.text[:200]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.demo:
        result = demo_run(args.code)
        print(f"16-number object on the demo model ({result['code']}): {result['answer_tokens']} tokens in "
              f"{result['seconds']} s = {result['tokens_per_s']} tok/s (free decoding {result['free_tokens_per_s']} "
              f"tok/s), finish {result['finish']}")
        result["uptime"] = _uptime()
        if args.out:
            _write(args.out, result)
        return 0
    return measure_formats(args)


def measure_formats(args) -> int:
    import numpy as np  # noqa: PLC0415 - after argument parsing, like the other scripts' heavy imports

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import npu.engine.constrain as constrain  # noqa: PLC0415
    from common import machine_info, median, write_result  # noqa: PLC0415
    from npu.engine import DoneEvent, Engine, GenerationOptions, Prompt  # noqa: PLC0415
    from protocol.formats import parse_format  # noqa: PLC0415
    from tests.schemas import frigate_review_schema, nested_schema  # noqa: PLC0415
    from zero_cost import ZeroCostShape, internvl2_tokenizer, zero_cost_model  # noqa: PLC0415

    formats = {
        "boolean": {"format": parse_format({"type": "boolean"})},
        "integer": {"format": parse_format({"type": "integer", "minimum": 0, "maximum": 1000})},
        "number": {"format": parse_format({"type": "number", "minimum": -50, "maximum": 50})},
        "enum": {"format": parse_format({"enum": ["red", "green", "blue", "yellow", "white"]})},
        "object of 16 numbers": {"format": parse_format(sixteen_numbers())},
        "Frigate review schema": {"json_schema": frigate_review_schema([])},
        "nested schema": {"json_schema": nested_schema()},
    }
    if args.tiny:
        formats = {k: formats[k] for k in ("boolean", "object of 16 numbers")}
    runs = 1 if args.tiny else args.runs
    with tempfile.TemporaryDirectory() as scratch:
        model = zero_cost_model(ZeroCostShape(name="zero-cost InternVL2-1B shapes"), "bf16",
                                internvl2_tokenizer(Path(scratch) / "tokenizer"))
    rows = [np.random.default_rng(seed).standard_normal(model.post.outputs(0)[0].shape).astype(np.float32)
            .astype(model.post.outputs(0)[0].dtype) for seed in range(8)]  # (1, 1, vocab) each
    calls = iter(range(10**9))
    model.post.run = lambda feed, group=0: [rows[next(calls) % len(rows)]]
    engine = Engine(model)
    mask_seconds: list[float] = []
    allowed = constrain.Masker.allowed

    def timed_allowed(self, matcher):
        started = time.perf_counter()
        try:
            return allowed(self, matcher)
        finally:
            mask_seconds.append(time.perf_counter() - started)

    def per_token(options: GenerationOptions) -> tuple[float, int, str]:
        started = time.perf_counter()
        done = [e for e in engine.generate(Prompt("Describe the scene."), options) if isinstance(e, DoneEvent)][0]
        return (time.perf_counter() - started) / max(done.completion_tokens, 1), done.completion_tokens, done.finish_reason

    compile_ms = {}
    for name, option in formats.items():  # compile (and read the vocabulary) once, outside the timing
        started = time.perf_counter()
        engine.formats.compile(option.get("format"), "Describe the scene.", option.get("json_schema"))
        compile_ms[name] = round((time.perf_counter() - started) * 1000, 2)
    free_tokens = 200 if not args.tiny else 16
    per_token(GenerationOptions(max_tokens=free_tokens, ignore_stop=True))  # warm-up
    free = median([per_token(GenerationOptions(max_tokens=free_tokens, ignore_stop=True))[0] for _ in range(runs)])
    results = {"free greedy": {"us_per_token": round(free * 1e6, 1), "tokens": free_tokens}}
    print(f"{'free greedy':24s} {free * 1e6:9.1f} us/token  ({free_tokens} tokens)")
    constrain.Masker.allowed = timed_allowed
    try:
        for name, option in formats.items():
            mask_seconds.clear()
            measured = [per_token(GenerationOptions(max_tokens=900, **option)) for _ in range(runs)]
            seconds = median([m[0] for m in measured])
            masks = sorted(mask_seconds)
            results[name] = {"us_per_token": round(seconds * 1e6, 1), "ratio_to_free": round(seconds / free, 2),
                             "tokens": measured[0][1], "finish": measured[0][2], "compile_ms": compile_ms[name],
                             "mask_us_median": round(masks[len(masks) // 2] * 1e6, 1),
                             "mask_us_p99": round(masks[int(len(masks) * 0.99)] * 1e6, 1)}
            r = results[name]
            print(f"{name:24s} {r['us_per_token']:9.1f} us/token  {r['ratio_to_free']:5.2f}x free  "
                  f"({r['tokens']} tokens, {r['finish']}; mask {r['mask_us_median']} us median, "
                  f"{r['mask_us_p99']} us p99; compile {r['compile_ms']} ms)")
    finally:
        constrain.Masker.allowed = allowed
    result = {"machine": machine_info(None), "uptime": _uptime(), "vocab": engine.shapes.vocab, "runs": runs,
              "tiny": args.tiny, "results": results}
    print(f"wrote {write_result('format_tokens' + ('_tiny' if args.tiny else ''), result, args.out)}")
    return 0


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _write(path: Path, result: dict) -> None:
    import json  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
