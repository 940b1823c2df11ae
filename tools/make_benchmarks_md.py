"""Generate BENCHMARKS.md from the JSON the benchmark scripts wrote to bench/results/.

    python tools/make_benchmarks_md.py                      # bench/results/*.json -> BENCHMARKS.md
    python tools/make_benchmarks_md.py --capture-decode-overhead [-- --tokens 800 --sampling]

bench/decode_overhead.py prints its JSON on its last stdout line rather than writing a
file; `--capture-decode-overhead` runs it, adds the machine facts and the command, and
writes bench/results/decode_overhead.json before generating. Every figure in the page
comes from a results file; the page says which machine, date and command made it.
A missing results file becomes a "not measured" line, never an invented number.

Board figures used for the share-of-step columns: AX630C's published decode rates,
Qwen2-0.5B 10.7 tok/s and InternVL2.5-1B 10.56 tok/s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks_md_board import section_board, section_reference_ab  # tools/, beside this script
from benchmarks_md_common import TINY_NOTE, fmt, lengths, load, load_all, machine_line
from benchmarks_md_formats import section_format_tokens

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
OUTPUT = REPO / "BENCHMARKS.md"
BOARD_STEPS_MS = {"Qwen2-0.5B (10.7 tok/s)": 1000 / 10.7, "InternVL2.5-1B (10.56 tok/s)": 1000 / 10.56}
# InternVL2-1B decode graph at the board's shapes: what axengine memmoves per token (see npu/axengine_session.py).
N_LAYERS, CAPACITY, KV_DIM, HIDDEN, VOCAB, BF16_BYTES = 24, 1023, 128, 896, 151655, 2
# An assumed host memcpy rate on AX630C's Cortex-A53 cores, only to turn bytes into time; not measured.
ASSUMED_BOARD_MEMCPY_GB_S = 2.0
# ------------------------------------------------------------------ 1. decode overhead


def axengine_bytes_per_token() -> int:
    """Bytes axengine copies per decode token at InternVL2-1B's shapes (inputs memmoved in, outputs out)."""
    layer_in = 2 * CAPACITY * KV_DIM * BF16_BYTES + HIDDEN * BF16_BYTES + (CAPACITY + 1) * BF16_BYTES + 4
    layer_out = 2 * KV_DIM * BF16_BYTES + HIDDEN * BF16_BYTES
    post = HIDDEN * BF16_BYTES + VOCAB * BF16_BYTES
    return N_LAYERS * (layer_in + layer_out) + post


def section_decode(data: dict | None) -> list[str]:
    out = ["## 1. Host overhead per decode token (board path, zero-cost graphs)", ""]
    if not data:
        return out + ["Not measured: run `python tools/make_benchmarks_md.py --capture-decode-overhead`.", ""]
    rows = data["results"]
    steps = list(BOARD_STEPS_MS.items())
    out += [machine_line(data.get("machine")), "",
            "Every graph returns preallocated outputs of InternVL2-1B's real shapes without computing, so the"
            " time is the engine's own work per token (feeds, KV row writes, embedding row, post output,"
            " sampling, detokenising, the event). Goal: <= 300 us per token and <= 2x the minimum bytes.", "",
            "| precision | decoding | us/token | share of " + " | share of ".join(n for n, _ in steps)
            + " | bytes/token | minimum | x minimum |",
            "|---|---|---:|" + "---:|" * len(steps) + "---:|---:|---:|"]
    for r in rows:
        shares = " | ".join(f"{r['us_per_token'] / (ms * 1000) * 100:.2f} %" for _, ms in steps)
        mode = "sampling (T 0.7, top-k 40, top-p 0.9)" if r["sampling"] else "greedy"
        out.append(f"| {r['precision']} | {mode} | {r['us_per_token']:.1f} | {shares} | {r['bytes_per_token']:.0f}"
                   f" | {r['min_bytes_per_token']} | {r['bytes_per_token'] / r['min_bytes_per_token']:.2f} |")
    misses = [f"{r['precision']} {'sampling' if r['sampling'] else 'greedy'}" for r in rows
              if r["us_per_token"] > 300 or r["bytes_per_token"] > 2 * r["min_bytes_per_token"]]
    out += ["", "Goal: " + ("**met** by every row." if not misses else f"**missed** by {', '.join(misses)}.")]
    minimum = rows[0]["min_bytes_per_token"] if rows else 0
    ax = axengine_bytes_per_token()
    ax_ms = ax / (ASSUMED_BOARD_MEMCPY_GB_S * 1e9) * 1e3
    qwen_ms = steps[0][1]
    out += ["", "Minimum bytes = each layer's new K and V row plus the next token's embedding row (what must move"
            " for the next step to exist). The reference path above feeds the cache in place: its bytes are that"
            " minimum.", "",
            f"**axengine path (computed, not measured):** `InferenceSession.run` memmoves every fed input into its"
            f" CMM buffer on every call and returns fresh output arrays, so a decode token moves each layer's whole"
            f" K and V cache input (2 x {CAPACITY} x {KV_DIM} bf16), its mask, input and indices, and the post"
            f" graph's {VOCAB}-wide logits: {ax / 1e6:.2f} MB per token, {ax / max(minimum, 1):.0f}x the minimum"
            f" (bf16). At an assumed {ASSUMED_BOARD_MEMCPY_GB_S:.0f} GB/s host memcpy on the A53 cores that is"
            f" ~{ax_ms:.1f} ms, {ax_ms / qwen_ms * 100:.1f} % of the {qwen_ms:.1f} ms step. vlmd's zero-copy path"
            " avoids it by keeping the cache in the layers' own buffers (section 6).", ""]
    return out


# ------------------------------------------------------------------ 2. CPU vs transformers


def section_cpu(data: dict | None) -> list[str]:
    out = ["## 2. CPU: vlmd reference backend vs transformers (eager, float32)", ""]
    if not data:
        return out + ["Not measured: run `python bench/cpu_vs_transformers.py`.", ""]
    tf, vl, r, d = data["transformers"], data["vlmd"], data["ratios"], data["dims"]
    out += [machine_line(data.get("machine")), "",
            f"Random weights at InternVL2-1B's dimensions: InternViT {d['vision_layers']} layers x"
            f" {d['vision_hidden']} at {d['image_size']} px, Qwen2 {d['text_layers']} layers x {d['text_hidden']},"
            f" vocab {d['vocab']}. The same bf16-valued weights in both; vlmd precision `{data['vlmd_precision']}`;"
            f" prompt {data['prompt_tokens']} tokens (64 image tokens), {data['new_tokens']} greedy new tokens;"
            f" {data['runs']} alternating runs each, medians"
            f"{', thread CPU time' if data.get('clock') == 'thread' else ''}. Ratio > 1 means vlmd is faster."
            f" Greedy tokens agree: {data['greedy_tokens_agree']}.", "",
            "| | transformers | vlmd | ratio | goal |", "|---|---:|---:|---:|---|"]
    rows = [("image encode (ms)", "median_image_ms", "image", ">= 1.0x"),
            ("time to first token (ms)", "median_ttft_ms", "ttft", ">= 1.0x"),
            ("decode (tok/s)", "median_decode_tokens_per_s", "decode", ">= 1.5x"),
            ("RSS growth during a run (MB)", "median_rss_growth_mb", None, ""),
            ("resident model (MB)", "resident_model_mb", None, "")]
    for label, key, ratio_key, goal in rows:
        ratio = f"{r[ratio_key]:.2f}x" if ratio_key and r.get(ratio_key) else ""
        out.append(f"| {label} | {fmt(tf.get(key))} | {fmt(vl.get(key))} | {ratio} | {goal} |")
    goals = {"image": 1.0, "ttft": 1.0, "decode": 1.5}
    missed = [k for k, goal in goals.items() if (r.get(k) or 0) < goal]
    out += ["", "Goal (>= 1.0x on image encode and TTFT, >= 1.5x on decode): "
            + (f"**missed** on {', '.join(missed)}." if missed else "**met**.")]
    if data.get("tiny"):
        out += ["", TINY_NOTE]
    return out + [""]


# ------------------------------------------------------------------ 3. follow-ups


def section_followup(data: dict | None) -> list[str]:
    out = ["## 3. Follow-up questions on the same frame", ""]
    if not data:
        return out + ["Not measured: run `python bench/followup.py`.", ""]
    first, follow = data["first"], data["followup"]
    out += [machine_line(data.get("machine")), "",
            f"Reference backend, precision `{data['precision']}`, prefill chunk {data['prefill_chunk']},"
            f" history lengths {lengths(data.get('history_lengths'))}, prefix replay"
            f" `{data.get('prefix_replay', 'never')}`;"
            f" {data['runs']} frames, each with a first question and {follow['count'] // max(data['runs'], 1)}"
            " follow-ups. Goal: follow-up TTFT <= 0.2x the first.", "",
            ]
    never = data.get("followup_never")
    policy = data.get("prefix_replay", "never")
    if never:
        out += [f"| | first question | follow-up (replay `{policy}`) | follow-up (resume: replay `never`) |",
                "|---|---:|---:|---:|"]
    else:
        out += ["| | first question | follow-up |", "|---|---:|---:|"]
    for label, key in (("TTFT (ms)", "median_ttft_ms"), ("image encode (ms)", "median_image_ms"),
                       ("prefill (ms)", "median_prefill_ms"), ("prompt rows through the layers", "prefill_rows")):
        cells = [fmt(first.get(key)), fmt(follow.get(key))] + ([fmt(never.get(key))] if never else [])
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", f"Ratio: **{fmt(data['ratio'], '.3f')}x** (prefix reused in {follow['prefix_reused']} of"
            f" {follow['count']} follow-ups)"
            + (f"; resuming instead: {fmt(data.get('ratio_never'), '.3f')}x, asked alternately in the same"
               " process on the same snapshots." if never else "."),
            "", "Goal (<= 0.2x): " + ("**met**." if (data["ratio"] or 9) <= data["goal_ratio"] else "**missed**.")]
    if data.get("tiny"):
        out += ["", TINY_NOTE]
    return out + [""]


# ------------------------------------------------------------------ 6. board data path


def section_device_traffic(data: dict | None) -> list[str]:
    out = ["## 6. Board data path: bytes per decode token, public run() vs zero-copy", ""]
    if not data:
        return out + ["Not measured: run `python bench/device_traffic.py`.", ""]
    out += [machine_line(data.get("machine")), "",
            "The engine through `AxEngineSession` on the axengine stand-in (which follows pyaxengine 3554448: one"
            " CMM buffer per input, separate host and device bytes, flush and invalidate), with graphs of the real"
            f" shapes that compute nothing; {data['tokens']} decode tokens per run. Written / flushed / invalidated"
            " are vlmd's counters (the stand-in's own counters agree: columns `= stand-in`). The C++ figures are"
            " computed from StackFlow's main_vlm (d9084ba) and ax-llm (c26dcbb) at the same shapes: they write into"
            " uncached input buffers (so nothing to flush) and copy the whole decode mask every token. Host us/token:"
            " the process's CPU time per token in runs whose NPU and cache calls return at once (what remains is"
            " host work; CPU time, so other jobs on a shared machine count less). Goals: zero-copy"
            " bytes written <= 2x the C++ runtime's; host <= 300 us/token.", "",
            "| shapes | path | written B/token | flushed | invalidated | = stand-in | written vs C++ | host us/token |",
            "|---|---|---:|---:|---:|---|---:|---:|"]
    misses = []
    for name, result in data["results"].items():
        cpp = result["cpp_runtime"]
        for path in ("public", "zero-copy"):
            r = result[path]
            same = r["flushed"] == r["standin_flushed"] and r["invalidated"] == r["standin_invalidated"]
            ratio = r["written"] / cpp["stackflow"]["written"]
            out.append(f"| {name} (capacity {result['shapes']['kv_capacity']}) | {path} | {r['written']:,} |"
                       f" {r['flushed']:,} | {r['invalidated']:,} | {'yes' if same else '**no**'} | {ratio:.2f}x |"
                       f" {fmt(r['host_us_per_token'])} |")
            if path == "zero-copy" and (ratio > 2 or r["host_us_per_token"] > 300):
                misses.append(f"{name} ({'bytes' if ratio > 2 else 'host time'})")
        for runtime, label in (("stackflow", "C++ StackFlow main_vlm"), ("ax-llm", "C++ ax-llm")):
            c = cpp[runtime]
            out.append(f"| {name} | {label} | {c['written']:,} | {c['flushed']:,} | {c['invalidated']:,} | | 1.00x | |"
                       if runtime == "stackflow" else
                       f"| {name} | {label} | {c['written']:,} | {c['flushed']:,} | {c['invalidated']:,} | | | |")
    out += ["", "Goal: " + ("**met** by the zero-copy path at every shape." if not misses else
                            f"**missed**: {', '.join(misses)}.")]
    if "tiny" in data["results"]:
        out += ["", TINY_NOTE]
    return out + [""]


# ------------------------------------------------------------------ 4. MQTT, 5. optimisations


def section_mqtt(data: dict | None) -> list[str]:
    out = ["## 4. MQTT path against mosquitto", ""]
    if not data:
        return out + ["Not measured: run `python bench/mqtt_path.py`.", ""]
    lat, goals = data["latency"], data["goals"]
    out += [machine_line(data.get("machine")), "",
            f"vlmd's `Service` with an engine that costs nothing, a private mosquitto"
            f" ({data.get('variant', '')}); {data['cameras']} cameras, {data['frame_bytes'] / 1024:.0f} KB JPEG"
            f" frames from a separate publisher process, {data['seconds_per_phase']} s per offered rate; RSS is the"
            f" service's process. Goals: >= {goals['frames_per_s']} frames/s with flat RSS, <="
            f" {goals['added_latency_ms_p50']} ms p50 added latency.", "",
            "| offered frames/s | published/s | received/s | lost | RSS start MB | RSS end MB | RSS peak MB |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for p in data["frames"]:
        out.append(f"| {p['offered_fps']} | {p['published_fps']:.0f} | {p['received_fps']:.0f} |"
                   f" {p['frames_sent'] - p['frames_received']} | {p['rss_start_mb']} | {p['rss_end_mb']} |"
                   f" {p['rss_peak_mb']} |")
    out += ["", f"Question -> first chunk, minus the engine's TTFT, over {lat['asks']} questions of {lat['tokens']}"
            f" tokens: p50 **{lat['added_latency_ms_p50']} ms**, p99 {lat['added_latency_ms_p99']} ms."
            f" Chunk path per token (first chunk to final, at the subscriber): p50"
            f" {lat['chunk_us_per_token_p50']} us, p99 {lat['chunk_us_per_token_p99']} us."]
    best = max(data["frames"], key=lambda p: p["received_fps"])
    flat = all(p["rss_end_mb"] - p["rss_start_mb"] <= 0.05 * p["rss_start_mb"] for p in data["frames"])
    frames_ok = best["received_fps"] >= goals["frames_per_s"] and flat
    latency_ok = lat["added_latency_ms_p50"] <= goals["added_latency_ms_p50"]
    out += ["", f"Goals: frames {'**met**' if frames_ok else '**missed**'} (best {best['received_fps']:.0f}/s, RSS"
            f" {'flat' if flat else 'growing'} within 5 %); added latency {'**met**' if latency_ok else '**missed**'}."]
    if data.get("tiny"):
        out += ["", TINY_NOTE]
    return out + [""]


def section_optimisations(data: list | None) -> list[str]:
    out = ["## 5. Profiles and fixes", ""]
    if not data:
        return out + ["No optimisation recorded yet.", ""]
    out += ["Each row: what a profile showed, the change, the figure before and after (same script).", "",
            "| where | profile showed | change | figure | before | after |", "|---|---|---|---|---:|---:|"]
    for row in data:
        out.append(f"| {row['where']} | {row['finding']} | {row['change']} | {row['metric']} | {row['before']}"
                   f" | {row['after']} |")
    return out + [""]


def _each(section, runs: list[dict]) -> list[str]:
    """A section per results file; the heading is written once, variants get a subheading."""
    if not runs:
        return section(None)
    lines = section(runs[0])
    for data in runs[1:]:
        body = section(data)[2:]  # without the heading
        lines += [f"### Variant: {data.get('variant') or data['machine'].get('command')}", "", *body]
    return lines


def render(results: Path = RESULTS) -> str:
    lines = ["# Benchmarks", "",
             "Generated by `python tools/make_benchmarks_md.py` from `bench/results/*.json`; do not edit by hand."
             " How to run each script and what it measures: bench/README.md.", ""]
    lines += section_decode(load(results, "decode_overhead"))
    lines += _each(section_cpu, load_all(results, "cpu_vs_transformers"))
    lines += _each(section_followup, load_all(results, "followup"))
    lines += _each(section_mqtt, load_all(results, "mqtt_path"))
    lines += section_optimisations(load(results, "optimisations"))
    lines += section_device_traffic(load(results, "device_traffic"))
    lines += _each(section_board, load_all(results, "board_sim"))
    lines += _each(section_reference_ab, load_all(results, "reference_ab"))
    lines += section_format_tokens(load(results, "format_tokens"), load(results, "format_tokens_demo"),
                                   load(results, "format_tokens_demo_main"))
    return "\n".join(lines).rstrip() + "\n"


def capture_decode_overhead(argv: list[str], results: Path = RESULTS) -> Path:
    """Run bench/decode_overhead.py, keep its JSON line, add machine facts, write it."""
    sys.path.insert(0, str(REPO / "bench"))
    import common  # noqa: PLC0415 - bench/ is not a package

    command = [sys.executable, str(REPO / "bench" / "decode_overhead.py"), *argv]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    printed = done.stdout.strip().splitlines()
    print("\n".join(printed[:-1]))
    machine = common.machine_info(threads=None)  # host-side work: BLAS threads play no part
    machine["command"] = " ".join(["python bench/decode_overhead.py", *argv])
    return common.write_result("decode_overhead", {"benchmark": "decode_overhead", "machine": machine,
                                                   "results": json.loads(printed[-1])},
                               results / "decode_overhead.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture-decode-overhead", action="store_true",
                        help="run bench/decode_overhead.py first (arguments after -- go to it)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory of the scripts' JSON")
    args, rest = parser.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.capture_decode_overhead:
        print(f"wrote {capture_decode_overhead(rest, args.results)}")
    elif rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    args.output.write_text(render(args.results))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
