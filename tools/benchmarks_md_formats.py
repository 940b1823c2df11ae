"""BENCHMARKS.md's constrained-decoding section (bench/format_tokens.py's results)."""

from __future__ import annotations

from benchmarks_md_common import TINY_NOTE, fmt, machine_line  # tools/, beside this script


def section_format_tokens(data: dict | None, demo: dict | None, demo_main: dict | None) -> list[str]:
    out = ["## 9. Constrained decoding: host time per answer token, per format kind", ""]
    if not data:
        out += ["Not measured: run `python bench/format_tokens.py`.", ""]
    else:
        out += [machine_line(data.get("machine")), "", f"Load when it ran: `{data.get('uptime')}`.", ""]
        if data.get("tiny"):
            out += [TINY_NOTE, ""]
        free = data["results"]["free greedy"]
        out += [f"The engine on zero-cost graphs at InternVL2-1B's shapes, the real Qwen2 vocabulary ({data['vocab']}"
                " ids), greedy; whole answers timed and divided by their tokens (median of"
                f" {data['runs']} runs). Free greedy decoding: {free['us_per_token']} us/token. Goal: <= 2x free"
                " decoding's host time per token (a board token is ~93 ms).", "",
                "| format | us/token | x free | answer tokens | finish | mask us (median) | mask us (p99) | compile ms |",
                "|---|---:|---:|---:|---|---:|---:|---:|"]
        for name, row in data["results"].items():
            if name == "free greedy":
                continue
            out.append(f"| {name} | {row['us_per_token']} | {row['ratio_to_free']} | {row['tokens']} | {row['finish']}"
                       f" | {row['mask_us_median']} | {row['mask_us_p99']} | {row['compile_ms']} |")
        out += ["", "Answers of one or two tokens carry the whole request's setup in their per-token figure; the"
                " object and schema rows are the per-token cost.", ""]
    out += ["### Issue 21's 16-number object on the demo model", ""]
    if not demo:
        return out + ["Not measured: run `python bench/format_tokens.py --demo`.", ""]
    out += ["`python bench/format_tokens.py --demo [--code CHECKOUT]`: an object of 16 `number` properties asked"
            " of npu/assets/demo_model through the engine, max_tokens 256.", "",
            "| code | answer tokens | seconds | tok/s | free decoding tok/s | load |", "|---|---:|---:|---:|---:|---|"]
    for label, run in (("before (main, hand-written trie)", demo_main), ("after (llguidance)", demo)):
        if run:
            out.append(f"| {label} | {run['answer_tokens']} | {fmt(run['seconds'], '.2f')} | {run['tokens_per_s']}"
                       f" | {run['free_tokens_per_s']} | `{run.get('uptime', '')}` |")
    return out + [""]
