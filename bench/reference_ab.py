"""The reference backend's kernels, a git revision against the working tree, in one process.

Loads npu/reference/{ops,vision,graphs}.py as they are at `--base` (default main) beside the
working tree's, builds both sets of graphs on the same random InternVL2-1B-sized checkpoint
(bench/common.py), and alternates base and working tree: the InternViT encode at 224, one
decoder layer's 128-row prefill chunk and its decode step (at 128 cached rows). Both sides
get the same images and inputs; their outputs are compared (max abs difference).

    python bench/reference_ab.py --checkpoint DIR [--base main] [--runs 8] [--threads 1]

Times are thread CPU time with one thread (less disturbed by other processes than wall
time), wall time otherwise; min and median over `--runs` alternations. Prints a table and
writes bench/results/reference_ab.json (or --out).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: pins BLAS threads before numpy/torch load)

MODULES = ("ops", "vision", "graphs")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse this random checkpoint directory")
    parser.add_argument("--keep", type=Path, default=None, help="build the checkpoint here and keep it")
    parser.add_argument("--base", default="main", help="git revision to compare the working tree with")
    parser.add_argument("--runs", type=int, default=8, help="alternations of base and working tree")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads")
    parser.add_argument("--tiny", action="store_true", help="miniature dims (smoke test, seconds)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<name>.json)")
    return parser.parse_args(argv)


def base_modules(revision: str, scratch: Path) -> dict:
    """npu.reference's ops, vision and graphs as they are at `revision`, wired to each other."""
    loaded = {}
    for name in MODULES:
        source = subprocess.run(["git", "show", f"{revision}:npu/reference/{name}.py"], cwd=common.REPO,
                                capture_output=True, text=True, check=True).stdout
        path = scratch / f"base_{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"base_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
        loaded[name] = module
    # Each imported the working tree's siblings: point them at the base's.
    loaded["vision"].ops = loaded["ops"]
    loaded["graphs"].ops = loaded["ops"]
    loaded["graphs"].VisionEncoder = loaded["vision"].VisionEncoder
    return loaded


def layer_feeds(layer, rng):
    """Inputs of the first prefill chunk (group 1) and of a decode step after 128 rows (group 0)."""
    import numpy as np

    feeds = {}
    for group in (1, 0):
        specs = {s.name: s for s in layer.inputs(group)}
        rows = specs["input"].shape[1]
        feed = {name: np.zeros(spec.shape, spec.dtype) for name, spec in specs.items()}
        feed["input"][...] = rng.standard_normal(specs["input"].shape)
        if group == 1:
            feed["indices"][0] = np.arange(rows)
            feed["mask"][0][np.triu(np.ones((rows, rows), bool), k=1)] = -65536.0
        else:
            cached = min(128, specs["K_cache"].shape[1] - 1)
            feed["K_cache"][0, :cached] = rng.standard_normal((cached, specs["K_cache"].shape[2]))
            feed["V_cache"][0, :cached] = rng.standard_normal((cached, specs["V_cache"].shape[2]))
            feed["indices"][0, 0] = cached
            feed["mask"][0, 0, cached:-1] = -65536.0
        feeds[group] = feed
    return feeds


def measure(args, checkpoint: Path, dims: common.Dims) -> dict:
    import numpy as np

    from npu.reference import build_reference_sessions
    from npu.reference.checkpoint import load_checkpoint

    if args.checkpoint is None:
        common.build_checkpoint(checkpoint, dims)
    blueprint, weights = load_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix="vlmd-ab-") as scratch:
        base = base_modules(args.base, Path(scratch))
    sides = {"base": base["graphs"].build_reference_sessions((blueprint, weights), precision="fp32"),
             "tree": build_reference_sessions((blueprint, weights), precision="fp32")}
    rng = np.random.default_rng(0)
    image = common.random_image(0, dims.image_size)
    feeds = layer_feeds(sides["tree"].layers[0], rng)
    cases = {
        "vision encode": lambda g: g.vision.run({"input": image[None]}, 0)[0],
        "layer prefill (128 rows)": lambda g: g.layers[0].run(feeds[1], 1)[2],
        "layer decode step": lambda g: g.layers[0].run(feeds[0], 0)[2],
    }
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    results = {}
    for case, run in cases.items():
        outputs = {side: np.array(run(graphs), copy=True) for side, graphs in sides.items()}  # warm-up too
        times = {side: [] for side in sides}
        for _ in range(args.runs):
            for side, graphs in sides.items():
                started = clock()
                run(graphs)
                times[side].append((clock() - started) * 1e3)
        summary = {side: {"min_ms": round(min(t), 3), "median_ms": round(common.median(t), 3)} for side, t in times.items()}
        summary["speedup_min"] = round(summary["base"]["min_ms"] / summary["tree"]["min_ms"], 3)
        summary["speedup_median"] = round(summary["base"]["median_ms"] / summary["tree"]["median_ms"], 3)
        summary["max_abs_difference"] = float(np.abs(outputs["base"] - outputs["tree"]).max())
        results[case] = summary
        print(f"{case}: base {summary['base']}, tree {summary['tree']}", file=sys.stderr)
    return {"benchmark": "reference_ab", "machine": common.machine_info(args.threads), "base": args.base,
            "clock": "thread CPU time" if args.threads == 1 else "wall", "runs": args.runs, "tiny": args.tiny,
            "results": results}


def table(result: dict) -> str:
    lines = [f"base {result['base']} vs working tree, {result['clock']}, {result['runs']} alternations",
             f"{'':26s} {'base min':>9s} {'tree min':>9s} {'speedup':>8s} {'(median)':>8s} {'max |diff|':>11s}"]
    for case, r in result["results"].items():
        lines.append(f"{case:26s} {r['base']['min_ms']:9.2f} {r['tree']['min_ms']:9.2f} {r['speedup_min']:8.3f}"
                     f" {r['speedup_median']:8.3f} {r['max_abs_difference']:11.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return common.run_on_checkpoint(parse_args(argv), "reference_ab", measure, table)


if __name__ == "__main__":
    sys.exit(main())
