"""Follow-up questions: time to first token of a second question on the same frame vs the first.

The engine keeps a KV snapshot of the image + system prompt prefix keyed by the
prompt's `image_key`; a follow-up on the same key skips the vision graph and either
runs only its own question rows (one decode-group call each) or, when the engine's
measured graph times say it is cheaper, replays the prefix from the last chunk
boundary through a prefill group (`Engine(prefix_replay=...)`). This script loads vlmd's
reference backend on a random checkpoint at InternVL2-1B's dimensions (bench/common.py),
and for each run asks a first question about a fresh frame, then `--followups`
different questions about the same frame. It reports the median TTFT of both kinds,
their ratio (goal <= 0.2), where the time went (image, prefill) and how many prompt
rows each kind ran through the layers.

    python bench/followup.py [--runs 5] [--threads 2] [--tiny] [--checkpoint DIR]
                             [--prefill-chunk 32 --history-groups 30] [--replay auto|never|always]
                             [--compare-replay]

Prints a table and writes bench/results/followup.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: pins BLAS threads before numpy/torch load)

FIRST_QUESTION = "Describe this image in detail."
FOLLOW_UPS = ("Is there a person in the picture?", "What colour is the largest object?",
              "How many vehicles can you see, and where are they?")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="frames (one first question + follow-ups each)")
    parser.add_argument("--followups", type=int, default=len(FOLLOW_UPS), choices=range(1, len(FOLLOW_UPS) + 1))
    parser.add_argument("--tokens", type=int, default=4, help="answer tokens per question (TTFT is what counts)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                        help="reference precision (bf16 = the board's dtypes at graph boundaries)")
    parser.add_argument("--prefill-chunk", type=int, default=128, help="rows per prefill graph call")
    parser.add_argument("--history-groups", type=int, default=0,
                        help="prefill groups for later chunks (as llm_build's history groups)")
    parser.add_argument("--replay", choices=("auto", "never", "always"), default="auto",
                        help="the engine's prefix_replay policy for follow-ups")
    parser.add_argument("--compare-replay", action="store_true",
                        help="also ask every follow-up resuming (replay never), alternating, for an A/B")
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse this checkpoint directory")
    parser.add_argument("--keep", type=Path, default=None, help="build the checkpoint here and keep it")
    parser.add_argument("--tiny", action="store_true", help="miniature dims (smoke test, seconds)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<name>.json)")
    return parser.parse_args(argv)


def ask(engine, text: str, image, key: str, tokens: int) -> dict:
    from npu.engine import DoneEvent, GenerationOptions, Prompt

    prompt = Prompt(text, images=[image], image_key=key)
    for event in engine.generate(prompt, GenerationOptions(max_tokens=tokens, ignore_stop=True)):
        if isinstance(event, DoneEvent):
            done = event
    t = done.timings
    return {"ttft_ms": t["ttft_ms"], "image_ms": t["image_ms"], "prefill_ms": t["prefill_ms"],
            "prefix_reused": t["prefix_reused"], "prompt_tokens": done.prompt_tokens, "prefill_rows": t["prefill_rows"]}


def measure(args, checkpoint: Path, dims: common.Dims) -> dict:
    from npu.engine import Engine
    from npu.model import load_model

    if args.checkpoint is None:
        common.build_checkpoint(checkpoint, dims)  # the torch model is not needed here: dropped at once
    model = load_model(checkpoint, backend="reference", precision=args.precision,
                       prefill_chunk=args.prefill_chunk, history_groups=args.history_groups)
    engine = Engine(model, prefix_replay=args.replay, reuse_cached_rows=False)  # the snapshot follow-up is measured
    # With --compare-replay every follow-up is asked twice, resuming ("never") then under
    # --replay, on the same snapshot: an A/B of the policy within one process.
    policies = ("never", args.replay) if args.compare_replay else (args.replay,)
    warm = common.random_image(99, dims.image_size)
    ask(engine, FIRST_QUESTION, warm, "warm-up", 2)
    for policy in policies:
        engine.prefix_replay = policy
        ask(engine, FOLLOW_UPS[0], warm, "warm-up", 2)
    firsts, follow_ups = [], {policy: [] for policy in policies}
    for run in range(args.runs):
        image, key = common.random_image(run, dims.image_size), f"frame:{run}"
        firsts.append(ask(engine, FIRST_QUESTION, image, key, args.tokens))
        for question in FOLLOW_UPS[: args.followups]:
            for policy in policies:
                engine.prefix_replay = policy
                follow_ups[policy].append(ask(engine, question, image, key, args.tokens))
        print(f"run {run + 1}/{args.runs}: first {firsts[-1]['ttft_ms']:.0f} ms, follow-up "
              + ", ".join(f"{p} {follow_ups[p][-1]['ttft_ms']:.0f} ms" for p in policies), file=sys.stderr)
    first = _summary(firsts)
    first["prefill_rows"] = common.median(r["prefill_rows"] for r in firsts)
    result = {"benchmark": "followup", "machine": common.machine_info(args.threads), "dims": dataclasses.asdict(dims),
              "tiny": args.tiny, "precision": args.precision, "runs": args.runs, "prefill_chunk": engine.shapes.chunk,
              "history_lengths": sorted(engine.shapes.history_groups), "prefix_replay": args.replay,
              "variant": (f"prefill chunk {engine.shapes.chunk}, {len(engine.shapes.history_groups)} history groups,"
                          f" replay {args.replay}, {args.threads} thread(s)"),
              "first": first, "goal_ratio": 0.2, "all_runs": {"first": firsts}}
    for policy in policies:
        follow = _summary(follow_ups[policy])
        follow["prefill_rows"] = common.median(r["prefill_rows"] for r in follow_ups[policy])
        ratio = follow["median_ttft_ms"] / first["median_ttft_ms"] if first["median_ttft_ms"] else None
        suffix = "" if policy == args.replay else f"_{policy}"
        result[f"followup{suffix}"] = follow
        result[f"ratio{suffix}"] = round(ratio, 3) if ratio else None
        result["all_runs"][f"followup{suffix}"] = follow_ups[policy]
    return result


def _summary(runs: list[dict]) -> dict:
    out = {f"median_{k}": common.median(r[k] for r in runs) for k in ("ttft_ms", "image_ms", "prefill_ms")}
    out["prefix_reused"] = sum(bool(r["prefix_reused"]) for r in runs)
    out["count"] = len(runs)
    return out


def table(result: dict) -> str:
    first, follow = result["first"], result["followup"]
    lines = [f"{'':22s} {'first question':>15s} {'follow-up':>10s}"]
    for label, key in (("TTFT ms", "median_ttft_ms"), ("  image ms", "median_image_ms"),
                       ("  prefill ms", "median_prefill_ms"), ("prompt rows run", "prefill_rows")):
        lines.append(f"{label:22s} {first[key]:15.1f} {follow[key]:10.1f}")
    lines.append(f"prefix reused {follow['prefix_reused']}/{follow['count']} follow-ups;"
                 f" ratio {result['ratio']} (goal <= {result['goal_ratio']})")
    if "followup_never" in result:
        never = result["followup_never"]
        lines.append(f"resuming instead (replay never): TTFT {never['median_ttft_ms']:.1f} ms,"
                     f" {never['prefill_rows']} rows, ratio {result['ratio_never']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return common.run_on_checkpoint(parse_args(argv), "followup", measure, table)


if __name__ == "__main__":
    sys.exit(main())
