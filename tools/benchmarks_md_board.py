"""BENCHMARKS.md sections 7 (simulated AX630C, bench/board_sim.py) and 8 (reference kernels
A/B, bench/reference_ab.py); tools/make_benchmarks_md.py assembles the page."""

from __future__ import annotations

from benchmarks_md_common import TINY_NOTE, lengths, machine_line


# ------------------------------------------------------------------ 7. simulated board


def _cost_rows(data: dict) -> list[str]:
    out = ["| build | call | ms | source | derivation |", "|---|---|---:|---|---|"]
    for row in data["costs"]:
        call = row["call"] + (f" ({row['rows']} rows)" if "rows" in row else "")
        out.append(f"| {row['build']} | {call} | {row['ms']} | {row['source'] or '(none)'} |"
                   f" {row['derivation'] or '-'} |")
    return out


def _build_line(b: dict) -> str:
    prices, shape = b["prices_ms"], b["shape"]
    chunks = [prices[g] for g in sorted(prices, key=int) if g != "0"]
    chunk = (f"prefill call {chunks[0]:.2f}" + (f" to {chunks[-1]:.2f} ms (history {shape['history_lengths'][-1]}"
             " rows)" if len(chunks) > 1 else " ms")) if chunks else "no prefill groups"
    prefill_ms = b["first"]["median_graph_ttft_ms"] - b["vision_ms"]
    return (f"- {b['build']}: {b['model']}; {shape['image_size']} px, {shape['image_tokens']} image tokens, KV"
            f" capacity {shape['kv_capacity']}. Per layer-stack call: decode {prices['0']:.2f} ms, {chunk}; vision"
            f" {b['vision_ms']:.1f} ms, post {b['post_ms']:.2f} ms. First question: {b['first']['median_prompt_tokens']:.0f}"
            f" prompt rows, {prefill_ms:.0f} ms of prefill + post after the image. Shape read from: {shape['source']}.")


def section_board(data: dict | None) -> list[str]:
    out = ["## 7. Simulated AX630C: TTFT, decode and follow-ups per build", ""]
    if not data:
        return out + ["Not measured: run `python bench/board_sim.py`.", ""]
    goal = data["goal_ratio"]
    out += [machine_line(data.get("machine")), "",
            f"The real engine on graphs that cost nothing at each build's shapes; every graph call adds its"
            f" {data['board']} time from `{data['costs_file']}` to a simulated clock (no sleeping), and the"
            f" engine plans follow-ups with the same prices (`Engine(prices=...)`). Simulated time = graph time +"
            f" the host work measured here (this x86 machine, not the board's Cortex-A53: see the host column)."
            f" {data['runs']} frames (640x480, resized by the engine), each with a first question and"
            f" {data['followups']} follow-ups asked under each replay policy; {data['tokens']} answer tokens,"
            f" precision `{data['precision']}`; medians. Goal: follow-up TTFT <= {goal}x the first question's"
            f" for the shipped InternVL2.5/3 builds.", "",
            "| build | chunk / history groups | first TTFT ms (host ms) | decode tok/s | follow-up TTFT ms:"
            " auto (ratio) | resume | replay | auto ran rows | goal |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for b in data["builds"]:
        first, follow, shape = b["first"], b["followup"], b["shape"]
        history = lengths(shape["history_lengths"])
        auto = follow["auto"]
        if b["goal_applies"]:
            verdict = "**met**" if auto["ratio"] <= goal else "**missed**"
        else:
            verdict = "-" if b["shipped"] else "(not shipped)"
        out.append(f"| {b['build']}{'' if b['shipped'] else ' (hypothetical)'} | {shape['prefill_chunk']} / {history}"
                   f" | {first['median_ttft_ms']:.0f} ({first['median_host_ttft_ms']:.1f})"
                   f" | {first['median_decode_tokens_per_s']:.2f} | {auto['median_ttft_ms']:.0f}"
                   f" ({auto['ratio']:.3f}) | {follow['never']['median_ttft_ms']:.0f} ({follow['never']['ratio']:.3f})"
                   f" | {follow['always']['median_ttft_ms']:.0f} ({follow['always']['ratio']:.3f})"
                   f" | {auto['median_prefill_rows']:.0f} of {auto['median_prompt_tokens']:.0f} | {verdict} |")
    out += ["", "Resume = continue at the snapshot's end (rows that do not start a chunk go one by one through the"
            " decode graph); replay = restore up to the last chunk boundary before it and prefill the rest in"
            " chunk calls; auto = the cheaper of the two by the engine's prices. Build shapes and where they were"
            " read:", ""]
    out += [_build_line(b) for b in data["builds"]]
    out += ["", "The cost table (edit `bench/board_costs.toml`, then rerun):", "", *_cost_rows(data)]
    return out + [""]


# ------------------------------------------------------------------ 8. reference kernels A/B


def section_reference_ab(data: dict | None) -> list[str]:
    out = ["## 8. Reference kernels: a git revision against the working tree", ""]
    if not data:
        return out + ["Not measured: run `python bench/reference_ab.py`.", ""]
    out += [machine_line(data.get("machine")), "",
            f"npu/reference/{{ops,vision,graphs}}.py at `{data['base']}` and in the working tree, built on the same"
            f" random InternVL2-1B-sized checkpoint, alternated {data['runs']} times in one process ({data['clock']};"
            " fp32). Speed-up = base time / working-tree time.", "",
            "| case | base min ms | tree min ms | speed-up (min) | speed-up (median) | max abs difference |",
            "|---|---:|---:|---:|---:|---:|"]
    for case, r in data["results"].items():
        out.append(f"| {case} | {r['base']['min_ms']:.2f} | {r['tree']['min_ms']:.2f} | {r['speedup_min']:.3f}"
                   f" | {r['speedup_median']:.3f} | {r['max_abs_difference']:.2e} |")
    if data.get("tiny"):
        out += ["", TINY_NOTE]
    return out + [""]
