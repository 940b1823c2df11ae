"""The prompt's rows as the layers take them: where the engine meets the model family.

`PromptRows(family, shapes)` holds, for every cache row, allocated once:

- `planes` (capacity, planes, hidden): plane 0 is the row's layer-0 input (its token's
  embedding, or an image's feature row); plane p >= 1 is what the host adds to the output
  of decoder layer `added_layers[p-1]` while that row is prefilled (the family's
  per-layer image features, e.g. Qwen3-VL's deepstack; InternVL has one plane);
  `embeds` is plane 0 (a view);
- `rope` (index_rows, capacity + chunk): each row's rotary position(s), from
  `family.positions(ids, ...)` for the prompt and one more per row after it (a chunk's
  padding rows read past the capacity).

A token's KV row is always the cache position (npu/engine/kv_cache.py); its rotary
position is `rope[:, row]`, so the two are kept apart whatever the family does (after a
Qwen3-VL image the position advances by less than the rows). Positions are recomputed
from the whole prompt's ids each request, a pure function of them, so follow-ups,
replays and later conversation turns resume at the right position.

Bookkeeping only: no sessions, no cache; the engine (npu/engine/core.py) fills and feeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from npu.families.base import ModelFamily
from npu.shapes import GraphShapes


class PromptRows:
    def __init__(self, family: ModelFamily, shapes: GraphShapes) -> None:
        self.family, self.shapes = family, shapes
        self.added_layers = family.added_layers(shapes) if shapes.vision_size is not None else ()
        s = shapes
        self.planes = np.zeros((s.capacity, 1 + len(self.added_layers), s.hidden), s.act_dtype)
        self.embeds = self.planes[:, 0]  # (capacity, hidden), a view
        self._has_added = np.zeros(s.capacity, bool)  # rows whose added planes are not all zero
        self.rope = np.zeros((s.index_rows, s.capacity + max(s.chunk, 1)), np.uint32)

    def set_positions(self, ids: Sequence[int], image_token_id: int | None) -> None:
        """The prompt's rotary positions (as the family says), then one more per later row."""
        positions, after = self.family.positions(ids, image_token_id, self.shapes)
        n = positions.shape[1]
        self.rope[:, :n] = positions
        self.rope[:, n:] = np.arange(after, after + self.rope.shape[1] - n, dtype=np.uint32)

    def text_rows(self, start: int, end: int) -> None:
        """Rows start..end-1 hold text: nothing is added after any layer (plane 0 is filled by the caller)."""
        self.planes[start:end, 1:] = 0
        self._has_added[start:end] = False

    def put(self, rows: np.ndarray | slice, planes: np.ndarray) -> None:
        """Stored rows with all their planes ((n, planes, hidden): a prefix snapshot's, a turn's images)."""
        self.planes[rows] = planes
        self._has_added[rows] = bool(self.added_layers)

    def put_image(self, rows: np.ndarray, outputs: Sequence[np.ndarray]) -> int:
        """One image's vision outputs, as the family reads them, into its rows; returns the values copied."""
        image_planes = self.family.image_planes(outputs, self.shapes)  # each (image_tokens, hidden)
        for p, plane in enumerate(image_planes):
            self.planes[rows, p] = plane
        self._has_added[rows] = len(image_planes) > 1
        return sum(plane.size for plane in image_planes)

    def added(self, row: int, num_rows: int) -> dict[int, np.ndarray] | None:
        """{layer: (num_rows, hidden)} to add after that layer for rows row.., or None when nothing is."""
        if not self.added_layers or not self._has_added[row:row + num_rows].any():
            return None
        return {layer: self.planes[row:row + num_rows, p + 1] for p, layer in enumerate(self.added_layers)}

    def describe(self) -> dict[str, Any]:
        return {"planes": self.planes.shape[1], "added_layers": list(self.added_layers), "index_rows": self.rope.shape[0]}
