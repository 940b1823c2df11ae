"""Host overhead of one decode step at InternVL2-1B's shapes, with graphs that cost nothing.

Every session returns preallocated outputs of the real shapes (24 layers, hidden 896,
KV cache 1023 x 128, vocab 151655) without computing, so the time measured is the
engine's own: feed bookkeeping, KV row writes, the embedding row, the post output,
sampling, detokenising and the event. Bytes copied per token are read from the
engine's counters (`Engine.bytes_copied`) and printed beside the physical minimum:
the new K and V row of every layer plus the next token's embedding row.

    python bench/decode_overhead.py [--tokens 800] [--precision bf16|fp32] [--sampling]

Goal (reported, not asserted): <= 300 us per token and <= 2x the minimum bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


from npu.engine import DoneEvent, Engine, GenerationOptions, Prompt
from npu.model import Model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zero_cost import ZeroCostShape, internvl2_tokenizer, zero_cost_model  # noqa: E402  (bench/ is not a package)

# InternVL2-1B's real shapes: 24 layers, hidden 896, KV cache 1023 x 128, vocab 151655, chunk 128.
SHAPE = ZeroCostShape(name="zero-cost InternVL2-1B shapes")


@dataclass
class Result:
    precision: str
    sampling: bool
    tokens: int
    us_per_token: float
    bytes_per_token: float
    min_bytes_per_token: int

    def line(self) -> str:
        mode = "sampling" if self.sampling else "greedy"
        return (f"{self.precision:5s} {mode:8s}  {self.us_per_token:7.1f} us/token   {self.bytes_per_token:9.0f} B/token"
                f"   minimum {self.min_bytes_per_token} B/token ({self.bytes_per_token / self.min_bytes_per_token:.2f}x)")


def build_model(precision: str, tokenizer_dir: Path) -> Model:
    return zero_cost_model(SHAPE, precision, tokenizer_dir)


def measure(engine: Engine, tokens: int, sampling: bool) -> Result:
    options = GenerationOptions(max_tokens=tokens, ignore_stop=True,
                                **({"temperature": 0.7, "top_k": 40, "top_p": 0.9, "seed": 0} if sampling else {}))
    first_at = first_bytes = None
    for event in engine.generate(Prompt("Describe the image."), options):
        if first_at is None:
            first_at, first_bytes = time.perf_counter(), engine.bytes_copied
        if isinstance(event, DoneEvent):
            elapsed, copied = time.perf_counter() - first_at, engine.bytes_copied - first_bytes
            steps = event.completion_tokens - 1
    s = engine.shapes
    minimum = s.n_layers * 2 * s.kv_dim * s.kv_dtype.itemsize + s.hidden * s.act_dtype.itemsize
    return Result(engine.model.precision, sampling, steps, elapsed / steps * 1e6, copied / steps, minimum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=800, help="answer tokens per run (< 1023 - prompt)")
    parser.add_argument("--precision", choices=("bf16", "fp32", "both"), default="both")
    parser.add_argument("--sampling", action="store_true", help="also measure temperature/top-p sampling")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer directory (default: the InternVL2 files assembled by tests/tokenizer_files.py)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = args.tokenizer
        if tokenizer_dir is None:
            tokenizer_dir = internvl2_tokenizer(Path(scratch) / "tokenizer")
        results = []
        for precision in (("bf16", "fp32") if args.precision == "both" else (args.precision,)):
            engine = Engine(build_model(precision, tokenizer_dir))
            measure(engine, 16, False)  # warm-up
            for sampling in ((False, True) if args.sampling else (False,)):
                best = min((measure(engine, args.tokens, sampling) for _ in range(3)), key=lambda r: r.us_per_token)
                results.append(best)
                print(best.line())
    print(json.dumps([r.__dict__ for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
