"""CPU: vlmd's reference backend against transformers eager float32, same model, same process.

What a user would otherwise run on a development machine is transformers'
`InternVLForConditionalGeneration.generate` in float32 with eager attention. This
script builds one random-weight checkpoint at InternVL2-1B's real dimensions
(InternViT-300M at 224 px, Qwen2-0.5B; see bench/common.py `Dims`), saves it as bf16,
keeps the float32 torch model holding exactly those values, loads the same files
with vlmd's reference backend, and then alternates runs (transformers, vlmd,
transformers, vlmd, ...) of the same prompt, image and greedy decode of
`--tokens` new tokens. Both libraries get the same number of threads.

Per run, by the script's clock around each library's calls (`--clock wall`, or `thread`:
the calling thread's CPU time, for 1-thread runs on a shared machine): image encode ms,
time to first token (image + prefill + first token), decode tokens/s, and how much the
process RSS grew during the run; once: resident memory
each loaded model added. Medians over `--runs` pairs, and the ratios
(transformers time / vlmd time, vlmd tok/s / transformers tok/s: above 1 = vlmd faster).

    python bench/cpu_vs_transformers.py [--runs 5] [--tokens 32] [--threads 2] [--clock wall|thread] [--tiny]

Prints a table and writes bench/results/cpu_vs_transformers.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: pins BLAS threads before numpy/torch load)

QUESTION = "Describe this image in detail: the objects, their colours and where they are."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="measured runs per backend (alternating)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per run (greedy, stop tokens ignored)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads = BLAS threads")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="vlmd reference precision (fp32 computes what transformers fp32 does)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="reuse this random checkpoint directory (built by an earlier run with --keep)")
    parser.add_argument("--keep", type=Path, default=None, help="build the checkpoint here and keep it")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="thread: CPU time of the calling thread (with --threads 1 every computation runs on it),"
                             " which other processes disturb far less than wall time")
    parser.add_argument("--tiny", action="store_true", help="miniature dims (smoke test, seconds)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<name>.json)")
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread needs --threads 1 (other threads' work would not be counted)")
    return args


CLOCK = common.now  # set by measure(): time.perf_counter or time.thread_time


class TimingStreamer:
    """A transformers streamer that records when each new token arrives (the prompt comes first)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(CLOCK())
        self.tokens.extend(int(t) for t in value.reshape(-1))

    def end(self) -> None:
        pass


def run_transformers(model, input_ids, pixel_values, tokens: int) -> dict:
    import torch

    with torch.inference_mode():
        started = CLOCK()
        model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-1,
                                 vision_feature_select_strategy="default")
        image_ms = (CLOCK() - started) * 1e3
        streamer = TimingStreamer()
        with common.PeakRss() as rss:
            started = CLOCK()
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           pixel_values=pixel_values, max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, streamer=streamer)
    t = streamer.times
    decode_s = t[-1] - t[0]
    return {"image_ms": image_ms, "ttft_ms": (t[0] - started) * 1e3,
            "decode_tokens_per_s": (len(t) - 1) / decode_s if decode_s > 0 else None,
            "rss_growth_mb": rss.grew / 2**20, "tokens": streamer.tokens}


class TimedVision:
    """The engine's vision session, timed with CLOCK (the engine's own timings are wall time)."""

    def __init__(self, session) -> None:
        self._session, self.seconds = session, 0.0
        self.name, self.num_groups = session.name, session.num_groups
        self.inputs, self.outputs = session.inputs, session.outputs

    def run(self, feed, group=0):
        started = CLOCK()
        try:
            return self._session.run(feed, group)
        finally:
            self.seconds += CLOCK() - started


def run_vlmd(engine, prompt, tokens: int, vision: TimedVision) -> dict:
    """Image encode, TTFT and decode rate by CLOCK around the engine (as for transformers);
    `vision` is the engine's timed vision session."""
    from npu.engine import DoneEvent, GenerationOptions

    options = GenerationOptions(max_tokens=tokens, ignore_stop=True)
    ids: list[int] = []
    times: list[float] = []
    vision.seconds = 0.0
    with common.PeakRss() as rss:
        started = CLOCK()
        for event in engine.generate(prompt, options):
            if isinstance(event, DoneEvent):
                done = event
            else:
                times.append(CLOCK())
                ids.append(event.token_id)
    decode_s = times[-1] - times[0]
    return {"image_ms": vision.seconds * 1e3, "ttft_ms": (times[0] - started) * 1e3,
            "decode_tokens_per_s": (len(times) - 1) / decode_s if decode_s > 0 else None,
            "prefill_ms": done.timings["prefill_ms"], "rss_growth_mb": rss.grew / 2**20, "tokens": ids}


def pixel_values(image):
    import numpy as np
    import torch

    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    x = (image.astype(np.float32) / 255.0 - mean) / std  # (h, w, 3)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))  # (1, 3, h, w)


def summarise(runs: list[dict]) -> dict:
    keys = ("image_ms", "ttft_ms", "decode_tokens_per_s", "rss_growth_mb")
    return {f"median_{k}": common.median(r[k] for r in runs) for k in keys}


def ratios(tf: dict, vlmd: dict) -> dict:
    def div(a, b):
        return round(a / b, 3) if a and b else None

    return {"image": div(tf["median_image_ms"], vlmd["median_image_ms"]),
            "ttft": div(tf["median_ttft_ms"], vlmd["median_ttft_ms"]),
            "decode": div(vlmd["median_decode_tokens_per_s"], tf["median_decode_tokens_per_s"])}


def load_both(args, checkpoint: Path, dims: common.Dims):
    """(torch model, vlmd engine, resident MB each added)."""
    import torch

    from npu.engine import Engine
    from npu.model import load_model

    before = common.rss_bytes()
    if args.checkpoint is None:
        torch_model = common.build_checkpoint(checkpoint, dims)
    else:
        from transformers import InternVLForConditionalGeneration

        torch_model = InternVLForConditionalGeneration.from_pretrained(
            checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    gc.collect()
    after_torch = common.rss_bytes()
    # every run pays its image and prefill, as transformers' runs do: no reuse of the last run's rows
    engine = Engine(load_model(checkpoint, backend="reference", precision=args.precision), reuse_cached_rows=False)
    gc.collect()
    after_vlmd = common.rss_bytes()
    return torch_model, engine, (after_torch - before) / 2**20, (after_vlmd - after_torch) / 2**20


def measure(args, checkpoint: Path, dims: common.Dims) -> dict:
    import time

    import torch

    global CLOCK
    CLOCK = time.thread_time if args.clock == "thread" else time.perf_counter

    from npu.engine import Prompt

    torch.set_num_threads(args.threads)
    torch_model, engine, torch_mb, vlmd_mb = load_both(args, checkpoint, dims)
    image = common.random_image(0, dims.image_size)
    prompt = Prompt(QUESTION, images=[image])  # no image_key: every run is a first question
    ids = engine.model.template.encode_prompt(QUESTION, 1, engine.shapes.image_tokens).ids
    input_ids = torch.tensor([ids], dtype=torch.long)
    pixels = pixel_values(image)
    run_transformers(torch_model, input_ids, pixels, 4)  # warm-up: first-call allocations, lazy imports
    vision = engine.model.vision = TimedVision(engine.model.vision)  # the engine reads model.vision per call
    run_vlmd(engine, prompt, 4, vision)
    tf_runs, vlmd_runs = [], []
    for index in range(args.runs):
        tf_runs.append(run_transformers(torch_model, input_ids, pixels, args.tokens))
        vlmd_runs.append(run_vlmd(engine, prompt, args.tokens, vision))
        print(f"run {index + 1}/{args.runs}: transformers ttft {tf_runs[-1]['ttft_ms']:.0f} ms,"
              f" vlmd ttft {vlmd_runs[-1]['ttft_ms']:.0f} ms", file=sys.stderr)
    tf, vlmd = summarise(tf_runs), summarise(vlmd_runs)
    tf["resident_model_mb"], vlmd["resident_model_mb"] = torch_mb, vlmd_mb
    agree = _agreeing_prefix(tf_runs[0]["tokens"], vlmd_runs[0]["tokens"])
    variant = f"{args.threads} thread(s) each, vlmd {args.precision}" + (", thread CPU time" if args.clock == "thread" else "")
    return {"benchmark": "cpu_vs_transformers", "variant": variant, "clock": args.clock,
            "machine": common.machine_info(args.threads),
            "dims": dataclasses.asdict(dims), "tiny": args.tiny, "vlmd_precision": args.precision,
            "prompt_tokens": len(ids), "new_tokens": args.tokens, "runs": args.runs,
            "transformers": tf, "vlmd": vlmd, "ratios": ratios(tf, vlmd),
            "greedy_tokens_agree": f"{agree}/{args.tokens}",
            "all_runs": {"transformers": [_strip(r) for r in tf_runs], "vlmd": [_strip(r) for r in vlmd_runs]}}


def _agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _strip(run: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in run.items() if k != "tokens"}


def table(result: dict) -> str:
    tf, vl, r = result["transformers"], result["vlmd"], result["ratios"]

    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    rows = [("image encode ms", "median_image_ms", "image"), ("TTFT ms", "median_ttft_ms", "ttft"),
            ("decode tok/s", "median_decode_tokens_per_s", "decode"),
            ("RSS growth per run MB", "median_rss_growth_mb", None), ("resident model MB", "resident_model_mb", None)]
    lines = [f"{'':24s} {'transformers':>13s} {'vlmd':>10s} {'ratio':>7s}"]
    for label, key, ratio_key in rows:
        ratio = fmt(r.get(ratio_key), ".2f") + "x" if ratio_key and r.get(ratio_key) else ""
        lines.append(f"{label:24s} {fmt(tf[key]):>13s} {fmt(vl[key]):>10s} {ratio:>7s}")
    lines.append(f"prompt {result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, {result['runs']} runs"
                 f" each; greedy tokens agree {result['greedy_tokens_agree']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return common.run_on_checkpoint(parse_args(argv), "cpu_vs_transformers", measure, table)


if __name__ == "__main__":
    sys.exit(main())
