"""An Open WebUI-style chat about one image on a simulated AX630C: each turn sends the whole
history again (system, the image and the first question, every answer and later question), as
Open WebUI and the `openai` library do, through the engine's chat-messages prompt. Automatic
prefix reuse keeps the rows the cache already holds, so a later turn prefills only its answer
and question rows.

The board is bench/board_sim.py's: graphs that cost nothing at each build's shapes, every call
charged its published time (bench/board_costs.toml) on a simulated clock, plus the engine's own
host work measured for real. TTFT per turn = host ms + graph ms up to the first token.

    python bench/chat_turns.py [--builds NAME,...] [--runs 3] [--tokens 16] [--title-between] [--out FILE]

`--title-between` sends, after each answer, a text-only request as Open WebUI's title generation
does: it takes the cache, and the chat's rows come back from where the engine parked them.

Prints a table and writes bench/results/chat_turns.json. Goal (#22): turn 2 TTFT <= 0.2x turn 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)
from board_sim import COSTS, FRAME, GOAL_BUILDS, SimulatedClock, simulated_model  # noqa: E402
from zero_cost import ZeroCostShape, internvl2_tokenizer, zero_cost_model  # noqa: E402

from npu.engine import DoneEvent, Engine, GenerationOptions, Prompt, TokenEvent  # noqa: E402
from npu.engine.costs import BoardCosts  # noqa: E402
from npu.text.messages import IMAGE, ChatMessage  # noqa: E402

SYSTEM = "You are a helpful assistant."
QUESTIONS = ("Describe this image in detail.", "Is there a person in the picture?", "What colour is the car?")
GOAL_RATIO = 0.2
TITLE_PROMPT = "Generate a concise, 3-5 word title for this chat:\n"


def turn(engine: Engine, clock: SimulatedClock, messages: tuple, image, tokens: int) -> dict:
    start_graph, first_graph = clock.seconds, None
    for event in engine.generate(Prompt("", images=[image.copy()], messages=messages),  # decoded again each turn
                                 GenerationOptions(max_tokens=tokens, ignore_stop=True)):
        if isinstance(event, TokenEvent) and first_graph is None:
            first_graph = clock.seconds
        elif isinstance(event, DoneEvent):
            done = event
    t = done.timings
    graph_ttft = (first_graph - start_graph) * 1e3
    return {"ttft_ms": t["ttft_ms"] + graph_ttft, "host_ttft_ms": t["ttft_ms"], "graph_ttft_ms": graph_ttft,
            "prompt_tokens": done.prompt_tokens, "cached_rows": t["cached_rows"], "prefill_rows": t["prefill_rows"],
            "images_encoded": t["images_encoded"], "text": done.text}


def chat(engine: Engine, clock: SimulatedClock, image, tokens: int, title_between: bool = False) -> list[dict]:
    messages: tuple = (ChatMessage("system", (SYSTEM,)), ChatMessage("user", (IMAGE, QUESTIONS[0])))
    turns = []
    for question in QUESTIONS[1:] + (None,):
        turns.append(turn(engine, clock, messages, image, tokens))
        if title_between:
            title = (ChatMessage("user", (TITLE_PROMPT + turns[-1]["text"],)),)
            list(engine.generate(Prompt("", messages=title), GenerationOptions(max_tokens=tokens)))
        if question is not None:
            messages += (ChatMessage("assistant", (turns[-1]["text"],)), ChatMessage("user", (question,)))
    return turns


def measure_build(costs, args, tokenizer_dir: Path) -> dict:
    b = costs.shape
    shape = ZeroCostShape(kv_capacity=b.kv_capacity, prefill_chunk=b.prefill_chunk, history_lengths=b.history_lengths,
                          image_size=b.image_size, image_tokens=b.image_tokens, template=b.template, name=b.name)
    clock = SimulatedClock()
    model, prices = simulated_model(zero_cost_model(shape, args.precision, tokenizer_dir), costs, clock)
    engine = Engine(model, prices=prices)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (*FRAME, 3), dtype=np.uint8) for _ in range(args.runs + 1)]
    chat(engine, clock, frames[-1], 2)  # warm-up
    runs = [chat(engine, clock, frames[run], args.tokens, args.title_between) for run in range(args.runs)]
    turns = []
    for k in range(len(QUESTIONS)):
        row = {key: common.median(r[k][key] for r in runs)
               for key in ("ttft_ms", "host_ttft_ms", "graph_ttft_ms", "prompt_tokens", "cached_rows", "prefill_rows")}
        row["ratio"] = round(row["ttft_ms"] / common.median(r[0]["ttft_ms"] for r in runs), 3)
        turns.append(row)
    return {"build": b.name, "model": b.model, "goal_applies": b.name in GOAL_BUILDS, "turns": turns,
            "all_runs": [[{k: v for k, v in t.items() if k != "text"} for t in r] for r in runs]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--costs", type=Path, default=COSTS, help="the cost table (TOML)")
    parser.add_argument("--builds", default=None, help="comma-separated build names (default: every build)")
    parser.add_argument("--runs", type=int, default=3, help="chats, each about its own image")
    parser.add_argument("--tokens", type=int, default=16, help="answer tokens per turn")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--title-between", action="store_true", help="a title request after every answer")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/chat_turns.json)")
    args = parser.parse_args(argv)
    board = BoardCosts.load(args.costs)
    names = args.builds.split(",") if args.builds else list(board.shapes)
    with tempfile.TemporaryDirectory(prefix="vlmd-chat-turns-") as scratch:
        tokenizer_dir = internvl2_tokenizer(Path(scratch) / "tokenizer")
        builds = [measure_build(board.build(name), args, tokenizer_dir) for name in names]
    print(f"{'build':22s} " + "   ".join(f"turn {k + 1} TTFT ms (ratio, cached/prompt)" for k in range(len(QUESTIONS))))
    for r in builds:
        cells = "   ".join(f"{t['ttft_ms']:9.1f} ({t['ratio']:.3f}, {t['cached_rows']:.0f}/{t['prompt_tokens']:.0f})"
                           for t in r["turns"])
        print(f"{r['build']:22s} {cells}")
    result = {"benchmark": "chat_turns", "board": board.board, "machine": common.machine_info(threads=None),
              "runs": args.runs, "tokens": args.tokens, "precision": args.precision, "goal_ratio": GOAL_RATIO,
              "title_between": args.title_between,
              "builds": builds}
    print(f"wrote {common.write_result('chat_turns', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
