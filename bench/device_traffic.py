"""Device-memory traffic and host time per decode token: pyaxengine's public run() vs vlmd's zero-copy path.

Both paths run the real engine through `AxEngineSession` on the axengine stand-in
(tests/axengine_standin, which follows pyaxengine 3554448: one CMM buffer per input,
host and device copies, flush/invalidate), with synthetic graphs of a real model's
shapes that compute nothing. Per decode token it reports what the host writes into
device memory, flushes and invalidates (vlmd's counters, cross-checked against the
stand-in's), beside the C++ runtimes' figures computed from the same shapes
(npu/board/traffic.py: StackFlow main_vlm d9084ba, ax-llm c26dcbb), and the host
microseconds per token: the process's CPU time per token in further runs whose library
calls (the NPU run, flush, invalidate) return at once, so what is left is the host's own work (vlmd's and
pyaxengine's Python, memmoves and copies; on a board the library calls add the NPU's time
and the kernel's cache maintenance, which the byte counts stand for).

Shapes (`--shapes`):
- internvl2-1b: 24 layers, hidden 896, kv_dim 128, KV capacity 1023, prefill chunk 128,
  no history groups, vocab 151655 (M5Stack internvl2-1B-ax630c: qwen2_p128 layers);
- internvl3-1b: 24 layers, hidden 896, kv_dim 128, KV capacity 2047, chunk 128, 8 history
  groups (histories 128 .. 1024), vocab 151674 (AXERA's InternVL3-1B build).

    python bench/device_traffic.py [--tokens 64] [--shapes internvl2-1b internvl3-1b] [--tiny]

Goals (reported, not asserted): zero-copy bytes written per token <= 2x the C++ runtime's;
host time <= 300 us per token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "axengine_standin")]

from bench.common import machine_info, write_result  # noqa: E402

SHAPES = {
    "internvl2-1b": dict(n_layers=24, hidden=896, kv_dim=128, kv_capacity=1023, prefill_chunk=128, history_groups=0,
                         vocab=151655),
    "internvl3-1b": dict(n_layers=24, hidden=896, kv_dim=128, kv_capacity=2047, prefill_chunk=128, history_groups=8,
                         vocab=151674),
    "tiny": dict(n_layers=2, hidden=64, kv_dim=32, kv_capacity=159, prefill_chunk=32, history_groups=1, vocab=512),
}


class RowEmbeddings:
    """A small table indexed modulo its size: one row copied per lookup, like the mmap reader."""

    def __init__(self, hidden: int) -> None:
        import numpy as np

        from npu.session import BF16

        self.table = np.random.default_rng(1).standard_normal((4096, hidden)).astype(BF16)  # (4096, hidden)

    def lookup(self, ids, out) -> None:
        import numpy as np

        np.take(self.table, np.asarray(ids) % len(self.table), axis=0, out=out)


def build_model(directory: Path, dims: dict, data_path: str, tokenizer_dir: Path):
    """A Model of synthetic stand-in graphs, opened like a board package (sessions shared by both paths)."""
    from npu.board.axengine_session import open_session
    from npu.board.data_path import select_data_path
    from npu.model import Model
    from npu.shapes import read_shapes
    from npu.text.template import ChatTemplate
    from npu.text.tokenizer import Tokenizer

    synthetic = {k: dims[k] for k in ("hidden", "kv_dim", "kv_capacity", "prefill_chunk", "history_groups", "vocab")}
    names = [f"layer{i}" for i in range(dims["n_layers"])] + ["post"]
    sessions = {}
    for name in names:
        path = directory / f"{name}.axmodel"
        path.write_text(json.dumps({"format": "vlmd-axengine-standin/1", "graph": name, "synthetic": synthetic}))
        sessions[name] = open_session(path, name=name, provider="axengine")
    layers, post = [sessions[n] for n in names[:-1]], sessions["post"]
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    template = ChatTemplate.from_checkpoint({"template": "Hermes-2"}, tokenizer)
    model = Model(None, layers, post, RowEmbeddings(dims["hidden"]), tokenizer, template, name="synthetic",
                  backend="axengine", precision="bf16")
    path = select_data_path(layers, post, read_shapes(model), data_path)
    model.data_path, model.post = path, getattr(path, "post", None) or post
    return model


class NullLibraries:
    """While active, libax_engine's run and libax_sys's cache maintenance return at once (for host timing)."""

    NAMES = {"sys_lib": ("AX_SYS_MflushCache", "AX_SYS_MinvalidateCache"),
             "engine_lib": ("AX_ENGINE_RunGroupIOSync", "AX_ENGINE_RunSyncV2")}

    def __enter__(self):
        import importlib

        capi = importlib.import_module("axengine._axe_capi")
        self._patched = [(getattr(capi, lib), name) for lib, names in self.NAMES.items() for name in names]
        for lib, name in self._patched:
            setattr(lib, name, lambda *args: 0)
        return self

    def __exit__(self, *exc):
        for lib, name in self._patched:
            delattr(lib, name)  # back to the class's emulation


def measure(model, tokens: int) -> dict:
    """One generation; per-token figures between the first and the last answer token."""
    import axengine

    from npu.board.traffic import model_traffic
    from npu.engine import DoneEvent, Engine, GenerationOptions, Prompt

    engine, stats = Engine(model), axengine.STATS
    first = None
    for event in engine.generate(Prompt("Describe the image."), GenerationOptions(max_tokens=tokens, ignore_stop=True)):
        if first is None:
            first = (time.perf_counter(), model_traffic(model).copy(), time.process_time(), stats.cache_op_seconds,
                     stats.bytes_flushed, stats.bytes_invalidated, stats.bytes_in)
        if isinstance(event, DoneEvent):
            steps = event.completion_tokens - 1
    wall, cpu = time.perf_counter() - first[0], time.process_time() - first[2]
    traffic = model_traffic(model).minus(first[1]).per(steps)
    cache_ops = stats.cache_op_seconds - first[3]
    return {"steps": steps, **traffic,
            "standin_flushed": (stats.bytes_flushed - first[4]) // steps,
            "standin_invalidated": (stats.bytes_invalidated - first[5]) // steps,
            "standin_memmoved": (stats.bytes_in - first[6]) // steps,
            "cache_op_emulation_us_per_token": round(cache_ops / steps * 1e6, 1),
            "wall_us_per_token": round(wall / steps * 1e6, 1), "cpu_us_per_token": round(cpu / steps * 1e6, 1)}


def run_shapes(name: str, tokens: int, scratch: Path, tokenizer_dir: Path) -> dict:
    from npu.board.traffic import cpp_decode_traffic

    dims = SHAPES[name]
    directory = scratch / name
    directory.mkdir()
    result = {"shapes": dims, "cpp_runtime": {
        runtime: cpp_decode_traffic(dims["n_layers"], dims["hidden"], dims["kv_capacity"], dims["kv_dim"],
                                    dims["vocab"], runtime).per(1) for runtime in ("stackflow", "ax-llm")}}
    for path in ("public", "zero-copy"):
        model = build_model(directory, dims, path, tokenizer_dir)
        measure(model, 8)  # warm-up
        counted = measure(model, tokens)  # bytes, with the emulation that checks every flush and invalidate
        with NullLibraries():
            timed = min((measure(model, tokens) for _ in range(5)), key=lambda r: r["cpu_us_per_token"])
        # CPU time of this process: on a shared machine it leaves out the time other jobs had the cores
        best = dict(counted, host_us_per_token=timed["cpu_us_per_token"], host_wall_us_per_token=timed["wall_us_per_token"],
                    emulated_wall_us_per_token=counted["wall_us_per_token"])
        for key in ("wall_us_per_token", "cpu_us_per_token", "cache_op_emulation_us_per_token"):
            del best[key]
        result[path] = dict(best, data_path=model.data_path.describe())
        print(f"{name:13s} {path:9s} written {best['written']:>10,} B  flushed {best['flushed']:>10,} B"
              f"  invalidated {best['invalidated']:>10,} B  host {best['host_us_per_token']:8.1f} us/token")
    cpp = result["cpp_runtime"]["stackflow"]
    print(f"{name:13s} C++ (StackFlow) written {cpp['written']:>10,} B  flushed {cpp['flushed']:>10,} B"
          f"  invalidated {cpp['invalidated']:>10,} B")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="answer tokens per measured run")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["internvl2-1b", "internvl3-1b"])
    parser.add_argument("--tiny", action="store_true", help="miniature shapes only (smoke test; figures mean nothing)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default bench/results/device_traffic.json)")
    args = parser.parse_args(argv)
    shapes = ["tiny"] if args.tiny else args.shapes
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        os.environ.setdefault("VLMD_AX_PROC", str(scratch))  # a board: the NPU is here (no mem_cmm_info: unchecked)
        from tests.tokenizer_files import write_internvl2_tokenizer

        tokenizer_dir = write_internvl2_tokenizer(scratch / "tokenizer")
        results = {name: run_shapes(name, args.tokens, scratch, tokenizer_dir) for name in shapes}
    if args.tiny and args.out is None:
        return 0
    path = write_result("device_traffic", {"machine": machine_info(None), "tokens": args.tokens, "results": results}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
