"""The prefill planner: which graph group fills which cache rows, what a plan costs, and
the masks the prefill groups are fed with.

Pure functions of the shapes (no sessions, no cache): the engine executes the plan,
`npu.engine.prefix` prices alternative plans for a follow-up with `plan_seconds`.
"""

from __future__ import annotations

import numpy as np

from npu.shapes import GraphShapes
from npu.session import MASK_BLOCKED


def plan_prefill(start: int, end: int, chunk: int, history: dict[int, int]) -> list[tuple[int, int, int]]:
    """Graph calls that fill cache rows start..end-1, as (group, first_row, num_rows).

    Group 1 (when `chunk` > 0) takes the chunk at row 0; a history group takes the chunk
    at row s when its history length (a key of `history`) is s; any other row goes
    alone through the decode group 0.
    """
    steps: list[tuple[int, int, int]] = []
    row = start
    while row < end:
        size = min(chunk, end - row)
        if chunk and row == 0:
            steps.append((1, 0, size))
        elif chunk and row in history:
            steps.append((history[row], row, size))
        else:
            size = 1
            steps.append((0, row, 1))
        row += size
    return steps


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
    """(1, chunk, history_len + chunk): every history column open, then a causal block."""
    chunk = shapes.chunk
    mask = np.zeros((1, chunk, history_len + chunk), shapes.mask_dtype)  # (1, chunk, history + chunk)
    blocked = np.triu(np.ones((chunk, chunk), bool), k=1)  # (chunk, chunk) future columns
    mask[0, :, history_len:][blocked] = MASK_BLOCKED
    return mask
