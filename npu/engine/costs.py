"""A board's published time per graph call, as prices the engine and the benchmarks share.

`BoardCosts.load(path)` reads a cost table (bench/board_costs.toml: one row per build and
call kind, each with its source or its derivation); `costs.build(name)` gives that build's
`BuildCosts`:

- `vision_s`, `post_s`: one call of the vision graph, of the post graph;
- `decode_stack_s`: one decode step through the layer stack (the published token time
  less one post call);
- `chunk_stack_s(history)`: one prefill call through the layer stack that reads
  `history` cache rows (the published prefill time less one post call, plus the
  table's per-history-row increment);
- `stack_prices(shapes)`: {shape group: seconds per layer-stack call} for a model's
  groups, which is what `Engine(model, prices=...)` plans follow-ups with and what
  bench/board_sim.py charges, so both agree by construction.

Pure data: no sessions, no clock.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npu.shapes import GraphShapes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CALL_KINDS = ("vision", "decode_token", "post", "prefill_ttft", "history_row")


class CostTableError(ValueError):
    """A cost table that lacks a price, repeats one, or names an unknown build or call."""


@dataclass(frozen=True)
class BuildShape:
    """A build's graph shapes as its runners and packages show them (the table's [[build]])."""

    name: str
    model: str
    image_size: int
    image_tokens: int
    template: str
    kv_capacity: int
    prefill_chunk: int
    history_lengths: tuple[int, ...]
    source: str
    shipped: bool = True  # False: a build nobody ships, priced to show what a rebuild would give
    # the language model's dimensions (Qwen2-0.5B's unless the build says) and the model family
    family: str = "internvl"
    n_layers: int = 24
    hidden: int = 896
    kv_dim: int = 128
    vocab: int = 151655


@dataclass(frozen=True)
class BuildCosts:
    """Seconds per graph call of one build on one board."""

    board: str
    shape: BuildShape
    vision_s: float
    post_s: float
    decode_stack_s: float
    chunk_rows: int
    chunk_ttft_s: float  # one prefill call + post, as published
    history_row_s: float

    def chunk_stack_s(self, history: int) -> float:
        """One prefill call through the layer stack against `history` cache rows."""
        return self.chunk_ttft_s - self.post_s + self.history_row_s * history

    def stack_prices(self, shapes: GraphShapes) -> dict[int, float]:
        """Seconds per layer-stack call for every shape group of `shapes`."""
        if shapes.chunk and shapes.chunk != self.chunk_rows:
            raise CostTableError(f"{self.shape.name}: priced for {self.chunk_rows}-row prefill calls,"
                                 f" the model's chunk is {shapes.chunk}")
        prices = {0: self.decode_stack_s}
        if shapes.chunk:
            prices[1] = self.chunk_stack_s(0)
            for history, group in shapes.history_groups.items():
                prices[group] = self.chunk_stack_s(history)
        return prices


class BoardCosts:
    """Every build's prices from one table; `rows` keeps the table's rows for reports."""

    def __init__(self, board: str, shapes: dict[str, BuildShape], rows: list[dict[str, Any]]):
        self.board, self.shapes, self.rows = board, shapes, rows

    @classmethod
    def load(cls, path: str | Path) -> "BoardCosts":
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        shapes = {}
        for entry in data.get("build", []):
            shape = BuildShape(**{**entry, "history_lengths": tuple(entry.get("history_lengths", ()))})
            shapes[shape.name] = shape
        rows = list(data.get("cost", []))
        for row in rows:
            if row.get("build") not in shapes:
                raise CostTableError(f"{path}: cost row for unknown build {row.get('build')!r}")
            if row.get("call") not in CALL_KINDS:
                raise CostTableError(f"{path}: unknown call {row.get('call')!r} (one of {', '.join(CALL_KINDS)})")
        return cls(str(data.get("board", "board")), shapes, rows)

    def build(self, name: str) -> BuildCosts:
        if name not in self.shapes:
            raise CostTableError(f"no build {name!r} in the cost table (has {', '.join(self.shapes)})")
        found: dict[str, dict[str, Any]] = {}
        for row in self.rows:
            if row["build"] == name:
                if row["call"] in found:
                    raise CostTableError(f"{name}: two rows price {row['call']}")
                found[row["call"]] = row
        missing = [kind for kind in CALL_KINDS if kind not in found]
        if missing:
            raise CostTableError(f"{name}: no price for {', '.join(missing)}")
        ms = {kind: float(row["ms"]) / 1000.0 for kind, row in found.items()}
        prefill, history = found["prefill_ttft"], found["history_row"]
        if history.get("rows", prefill.get("rows")) != prefill.get("rows"):
            raise CostTableError(f"{name}: history_row is priced for another chunk size than prefill_ttft")
        return BuildCosts(self.board, self.shapes[name], vision_s=ms["vision"], post_s=ms["post"],
                          decode_stack_s=ms["decode_token"] - ms["post"], chunk_rows=int(prefill["rows"]),
                          chunk_ttft_s=ms["prefill_ttft"], history_row_s=ms["history_row"])
