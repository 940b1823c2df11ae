"""The engine on a simulated AX630C: published graph times plus the host work measured for real.

For each build in the cost table (bench/board_costs.toml: InternVL2-1B 224, InternVL2.5-1B
364, InternVL3-1B 448 and SmolVLM-256M/500M 512 as M5Stack/AXERA build them on the AX630C;
bench/board_costs_ax650.toml: Qwen3-VL-2B 384 and SmolVLM-256M 512 on the AX650N), the real
engine runs on graphs that cost nothing at that build's shapes (bench/zero_cost.py), each wrapped so that every call
adds its published time (npu.engine.costs) to a simulated clock instead of sleeping. A
question's simulated time is the engine's measured wall time (its own host work: image
resize, feeds, cache writes, sampling; graphs free) plus the clock's graph time, so the
figures do not depend on this machine's load beyond the host part, which is reported apart.

The engine gets the same table as its prices (`Engine(prices=...)`), so its follow-up
choice between resuming at the snapshot's end (prefilled at that offset) and replaying from
an earlier chunk start is made by the model the clock charges. Each frame: a first question, then every follow-up asked
under each replay policy in turn (auto, never = resume, always = replay).

    python bench/board_sim.py [--costs bench/board_costs.toml] [--builds NAME,...] [--runs 3]
                              [--tokens 8] [--precision bf16] [--out FILE]

Prints a table and writes bench/results/board_sim.json (or --out). Goal: follow-up TTFT
<= 0.2x the first question's for the shipped InternVL2.5/3 builds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)
from followup import FIRST_QUESTION, FOLLOW_UPS  # noqa: E402
from zero_cost import ZeroCostShape, internvl2_tokenizer, zero_cost_model  # noqa: E402

from npu.engine import DoneEvent, Engine, GenerationOptions, Prompt, TokenEvent  # noqa: E402
from npu.engine.costs import BoardCosts, BuildCosts  # noqa: E402
from npu.model import Model  # noqa: E402
from npu.shapes import read_shapes  # noqa: E402

COSTS = common.REPO / "bench" / "board_costs.toml"
POLICIES = ("auto", "never", "always")
GOAL_RATIO = 0.2
GOAL_BUILDS = ("internvl2_5-1b-364", "internvl3-1b-448")  # the shipped InternVL2.5/3 shapes the goal is for
FRAME = (480, 640)  # a camera frame, resized by the engine to the build's image size


class SimulatedClock:
    """Seconds of graph time the board would have spent."""

    def __init__(self) -> None:
        self.seconds = 0.0


class PricedSession:
    """A session whose every run also charges its published time to the clock."""

    def __init__(self, session, clock: SimulatedClock, seconds_by_group: dict[int, float]):
        self._session, self._clock, self._seconds = session, clock, seconds_by_group
        self.name, self.num_groups = session.name, session.num_groups
        self.inputs, self.outputs = session.inputs, session.outputs

    def run(self, feed, group=0):
        self._clock.seconds += self._seconds[group]
        return self._session.run(feed, group)


def simulated_model(model: Model, costs: BuildCosts, clock: SimulatedClock) -> tuple[Model, dict[int, float]]:
    """`model` with every session priced from `costs`; also the stack prices the engine plans with."""
    prices = costs.stack_prices(read_shapes(model))
    per_layer = {group: seconds / len(model.layers) for group, seconds in prices.items()}
    layers = [PricedSession(layer, clock, per_layer) for layer in model.layers]
    vision = PricedSession(model.vision, clock, {0: costs.vision_s}) if model.vision is not None else None
    post = PricedSession(model.post, clock, {0: costs.post_s})
    priced = Model(vision, layers, post, model.embeddings, model.tokenizer, model.template, name=model.name,
                   backend="simulated " + costs.board, precision=model.precision, family=model.family)
    return priced, prices


def ask(engine: Engine, clock: SimulatedClock, text: str, image, key: str, tokens: int) -> dict:
    """One question; host (wall) and graph (clock) milliseconds up to the first token and after."""
    start_graph, first_graph = clock.seconds, None
    for event in engine.generate(Prompt(text, images=[image], image_key=key),
                                 GenerationOptions(max_tokens=tokens, ignore_stop=True)):
        if isinstance(event, TokenEvent) and first_graph is None:
            first_graph = clock.seconds
        elif isinstance(event, DoneEvent):
            done = event
    t = done.timings
    graph_ttft = (first_graph - start_graph) * 1e3
    graph_decode = (clock.seconds - first_graph) * 1e3
    steps = done.completion_tokens - 1
    return {"host_ttft_ms": t["ttft_ms"], "graph_ttft_ms": graph_ttft, "ttft_ms": t["ttft_ms"] + graph_ttft,
            "decode_tokens_per_s": steps / ((t["decode_ms"] + graph_decode) / 1e3) if steps else None,
            "host_decode_ms_per_token": t["decode_ms"] / steps if steps else None,
            "prefix_reused": t["prefix_reused"], "prefill_rows": t["prefill_rows"], "prompt_tokens": done.prompt_tokens}


def measure_build(costs: BuildCosts, args, tokenizer_dir: Path) -> dict:
    b = costs.shape
    shape = ZeroCostShape(kv_capacity=b.kv_capacity, prefill_chunk=b.prefill_chunk, history_lengths=b.history_lengths,
                          image_size=b.image_size, image_tokens=b.image_tokens, template=b.template, name=b.name,
                          family=b.family, n_layers=b.n_layers, hidden=b.hidden, kv_dim=b.kv_dim, vocab=b.vocab)
    clock = SimulatedClock()
    model, prices = simulated_model(zero_cost_model(shape, args.precision, tokenizer_dir), costs, clock)
    # the snapshot follow-ups are measured: the same question asked under each policy must not reuse the last ask's rows
    engine = Engine(model, prefix_replay="auto", prices=prices, reuse_cached_rows=False)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (*FRAME, 3), dtype=np.uint8) for _ in range(args.runs + 1)]
    ask(engine, clock, FIRST_QUESTION, frames[-1], "warm-up", 2)
    firsts, follow_ups = [], {policy: [] for policy in POLICIES}
    for run in range(args.runs):
        key = f"frame:{run}"
        firsts.append(ask(engine, clock, FIRST_QUESTION, frames[run], key, args.tokens))
        for question in FOLLOW_UPS:
            for policy in POLICIES:
                engine.prefix_replay = policy
                follow_ups[policy].append(ask(engine, clock, question, frames[run], key, args.tokens))
        engine.prefix_replay = "auto"
    first = _summary(firsts)
    result = {"build": b.name, "model": b.model, "shipped": b.shipped, "goal_applies": b.name in GOAL_BUILDS, "shape": {
        "image_size": b.image_size, "image_tokens": b.image_tokens, "kv_capacity": b.kv_capacity,
        "prefill_chunk": b.prefill_chunk, "history_lengths": list(b.history_lengths), "source": b.source},
        "prices_ms": {str(g): round(s * 1e3, 3) for g, s in sorted(prices.items())},
        "vision_ms": costs.vision_s * 1e3, "post_ms": costs.post_s * 1e3, "first": first, "followup": {},
        "all_runs": {"first": firsts, **follow_ups}}
    for policy in POLICIES:
        summary = _summary(follow_ups[policy])
        summary["ratio"] = round(summary["median_ttft_ms"] / first["median_ttft_ms"], 3)
        result["followup"][policy] = summary
    return result


def _summary(runs: list[dict]) -> dict:
    keys = ("ttft_ms", "host_ttft_ms", "graph_ttft_ms", "decode_tokens_per_s", "host_decode_ms_per_token",
            "prefill_rows", "prompt_tokens")
    out = {f"median_{k}": common.median(r[k] for r in runs) for k in keys}
    out["prefix_reused"] = sum(bool(r["prefix_reused"]) for r in runs)
    out["count"] = len(runs)
    return out


def table(result: dict) -> str:
    lines = [f"{'build':22s} {'first TTFT ms':>14s} {'host ms':>8s} {'tok/s':>6s}   follow-up TTFT ms (ratio)"
             f" auto / resume / replay"]
    for r in result["builds"]:
        first, follow = r["first"], r["followup"]
        cells = " / ".join(f"{follow[p]['median_ttft_ms']:.0f} ({follow[p]['ratio']:.3f})" for p in POLICIES)
        lines.append(f"{r['build']:22s} {first['median_ttft_ms']:14.1f} {first['median_host_ttft_ms']:8.1f}"
                     f" {first['median_decode_tokens_per_s']:6.2f}   {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--costs", type=Path, default=COSTS, help="the cost table (TOML)")
    parser.add_argument("--builds", default=None, help="comma-separated build names (default: every build)")
    parser.add_argument("--runs", type=int, default=3, help="frames, each with a first question and follow-ups")
    parser.add_argument("--tokens", type=int, default=8, help="answer tokens per question")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/board_sim.json)")
    args = parser.parse_args(argv)
    board = BoardCosts.load(args.costs)
    names = args.builds.split(",") if args.builds else list(board.shapes)
    with tempfile.TemporaryDirectory(prefix="vlmd-board-sim-") as scratch:
        tokenizers = {family: internvl2_tokenizer(Path(scratch) / family, family)
                      for family in {board.shapes[name].family for name in names}}
        builds = [measure_build(board.build(name), args, tokenizers[board.shapes[name].family]) for name in names]
    machine = common.machine_info(threads=None)  # host work only: no BLAS
    result = {"benchmark": "board_sim", "board": board.board, "machine": machine, "costs": board.rows,
              "costs_file": str(Path(args.costs).resolve().relative_to(common.REPO)) if Path(args.costs).resolve()
              .is_relative_to(common.REPO) else str(args.costs),
              "runs": args.runs, "followups": len(FOLLOW_UPS), "tokens": args.tokens, "precision": args.precision,
              "goal_ratio": GOAL_RATIO, "builds": builds}
    print(table(result))
    print(f"wrote {common.write_result('board_sim', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
