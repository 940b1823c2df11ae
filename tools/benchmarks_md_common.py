"""Helpers every section of BENCHMARKS.md uses (tools/make_benchmarks_md.py and its parts)."""

from __future__ import annotations

import json
from pathlib import Path

TINY_NOTE = "_Tiny dims (smoke run): figures say nothing about real speed._"
LOADED = 2.5  # 1-minute load average above which a run is flagged as taken on a busy machine


def load(results: Path, name: str) -> dict | list | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_all(results: Path, prefix: str) -> list[dict]:
    """Every `<prefix>*.json` (variants such as `followup_chunk32.json`), base name first."""
    paths = sorted(results.glob(f"{prefix}*.json"), key=lambda p: (p.stem != prefix, p.stem))
    return [json.loads(p.read_text()) for p in paths]


def fmt(value, spec: str = ".1f", empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def machine_line(machine: dict | None) -> str:
    if not machine:
        return "_Machine not recorded._"
    threads = f" {machine['threads']} threads," if machine.get("threads") else ""
    load = machine.get("load_average_1m") or 0
    line = (f"Machine: {machine.get('cpu')}, {machine.get('nproc')} cores,{threads}"
            f" numpy {machine.get('numpy')} ({machine.get('numpy_blas')}), torch {machine.get('torch')};"
            f" load average at start {load}; {machine.get('date_utc')}.  \n")
    if load > LOADED:
        line += (f"**Loaded machine** (load {load} on {machine.get('nproc')} cores, shared with other jobs):"
                 " absolute figures are pessimistic and noisy; ratios taken alternating in one process are"
                 " what to read.  \n")
    return line + f"Command: `{machine.get('command')}`"


def lengths(lengths: list[int] | None) -> str:
    if not lengths:
        return "none"
    if len(lengths) <= 4:
        return ", ".join(map(str, lengths))
    return f"{lengths[0]}, {lengths[1]}, ..., {lengths[-1]} ({len(lengths)} groups)"
