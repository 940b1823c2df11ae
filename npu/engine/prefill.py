"""The prefill planner: which graph group fills which cache rows, what a plan costs, and
the masks the prefill groups are fed with.

A build's prefill groups (read from the graphs by `npu.shapes`): group 1 takes a chunk
with no history (its K/V inputs are placeholders), each history group g >= 2 takes a
chunk against the first `history_len(g)` cache rows. As StackFlow's InternVL runtime
(`LLM_CTX::SetKVCache`/`Run`, m5stack/StackFlow projects/llm_framework/main_vlm) and
AXERA's newer runtimes do, a chunk that starts at cache row r goes through the group
with the smallest history that holds those r rows, and the history columns r.. of its
mask are blocked. So prefill works at any offset: a follow-up resumes right after its
snapshot, and builds whose histories grow in steps of 512 still prefill every chunk.
Rows past the longest history plus one chunk go one by one through the decode group.

Pure functions of the shapes (no sessions, no cache): the engine executes the plan,
`npu.engine.prefix` prices alternative plans for a follow-up with `plan_seconds`.
"""

from __future__ import annotations

import bisect

import numpy as np

from npu.session import MASK_BLOCKED
from npu.shapes import GraphShapes


def plan_prefill(start: int, end: int, chunk: int, history: dict[int, int]) -> list[tuple[int, int, int]]:
    """Graph calls that fill cache rows start..end-1, as (group, first_row, num_rows).

    With `chunk` > 0: the chunk at row 0 goes through group 1; a chunk at row r > 0
    through the group of the smallest history length (a key of `history`) >= r; rows
    no history can hold go alone through the decode group 0 (as every row does on a
    decode-only build).
    """
    lengths = sorted(history)
    steps: list[tuple[int, int, int]] = []
    row = start
    while row < end:
        size = min(chunk, end - row)
        group = _chunk_group(row, chunk, lengths, history)
        if group is None:
            size, group = 1, 0
        steps.append((group, row, size))
        row += size
    return steps


def _chunk_group(row: int, chunk: int, lengths: list[int], history: dict[int, int]) -> int | None:
    if not chunk:
        return None
    if row == 0:
        return 1
    at = bisect.bisect_left(lengths, row)
    return history[lengths[at]] if at < len(lengths) else None


def plan_seconds(shapes: GraphShapes, start: int, end: int, stack_seconds: dict[int, float]) -> float | None:
    """Predicted seconds to prefill rows start..end-1, pricing each graph call with
    `stack_seconds[group]` (seconds per layer-stack call); None if a group is unmeasured."""
    total = 0.0
    for group, _, _ in plan_prefill(start, end, shapes.chunk, shapes.history_groups):
        if group not in stack_seconds:
            return None
        total += stack_seconds[group]
    return total


def chunk_mask(shapes: GraphShapes, history_len: int) -> np.ndarray:
    """(1, chunk, history_len + chunk): every history column blocked, then a causal block.

    `open_history` opens the history columns a chunk may attend to before each call.
    """
    chunk = shapes.chunk
    mask = np.full((1, chunk, history_len + chunk), MASK_BLOCKED, shapes.mask_dtype)  # (1, chunk, history + chunk)
    causal = np.tril(np.ones((chunk, chunk), bool))  # (chunk, chunk) own and earlier rows
    mask[0, :, history_len:][causal] = 0
    return mask


def open_history(mask: np.ndarray, history_len: int, cached_rows: int) -> None:
    """Open the history columns 0..cached_rows-1 of a `chunk_mask`, block the rest of the
    history (rows the cache does not hold yet, or holds for a later position)."""
    if not 0 <= cached_rows <= history_len:
        raise ValueError(f"{cached_rows} cached rows do not fit a history of {history_len}")
    mask[0, :, :cached_rows] = 0
    mask[0, :, cached_rows:history_len] = MASK_BLOCKED
