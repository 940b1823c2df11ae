"""The model-family seam: what differs between VLM families, in one object per family.

A `ModelFamily` answers, for one family's graphs (InternVL, Qwen3-VL, ...):

- how its vision graph is fed and read (`vision_shapes`: the input buffer's layout,
  size and name, the image-token count; `input_buffer` and `prepare_image`: a frame
  into that buffer), and what its outputs become (`image_planes`: plane 0 replaces the
  image placeholder rows of the prompt's embeddings, plane p >= 1 is what the host adds
  to the output of decoder layer `added_layers(...)[p-1]` at those rows during prefill);
- the position ids its layers are fed (`positions`: one row per `indices` row of the
  prefill graphs, for every prompt row, and the rotary position the first row after
  the prompt takes). The engine keeps the rotary position and the KV row apart: the
  KV row of a token is always the number of rows written before it, its rotary
  position is what `positions` (and, after the prompt, `next + rows since`) says;
- which decoder layer graphs, templates and stop tokens it uses, where that is not read
  from the graphs or the checkpoint (`image_tags`: the placeholder token and the tags
  around each image's block).

The engine (npu/engine/), the KV cache, the prefill plan, prefix reuse, conversations,
typed answers and the board data paths see only these answers: they never ask which
family they run. A new family is one new module here plus its registration in
npu/families/__init__.py. This module knows no sessions' internals, no MQTT, no files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from npu.image import ImagePreprocess
from npu.session import Session


@dataclass(frozen=True)
class ImageTags:
    """How the prompt marks one image: `start` + `token` x image_tokens + `end`.

    `expand_edges`: whether a chat template's own image placeholder (`token`, written
    once per image) is expanded with `start`/`end` around it (InternVL: the processor adds
    `<img>`/`</img>`), or only repeated (Qwen3-VL: the template writes the edges itself).
    `newline`: whether the built-in (non-Jinja) form puts a newline after each block.
    """

    start: str
    token: str
    end: str
    expand_edges: bool = True
    newline: bool = True


class ModelFamily:
    """The base family: the InternVL conventions every method defaults to (see internvl.py)."""

    name = "base"
    image_tags = ImageTags("<img>", "<IMG_CONTEXT>", "</img>")

    # -- vision ------------------------------------------------------------------------

    def vision_shapes(self, vision: Session, hidden: int, problems: list[str]) -> dict[str, Any]:
        """GraphShapes' vision fields read from the vision graph; problems appended, never raised."""
        raise NotImplementedError

    def input_buffer(self, shapes: Any) -> np.ndarray:
        """A zeroed vision-graph input buffer, allocated once per engine."""
        return ImagePreprocess.input_buffer(shapes.vision_layout, *shapes.vision_size)

    def prepare_image(self, preprocess: ImagePreprocess, rgb: np.ndarray, out: np.ndarray,
                      shapes: Any) -> np.ndarray:
        """Write uint8 RGB [h, w, 3] into `out` (an `input_buffer`); ValueError for a bad frame."""
        return preprocess.prepare(rgb, out)

    def image_planes(self, outputs: Sequence[np.ndarray], shapes: Any) -> list[np.ndarray]:
        """The vision graph's outputs -> planes of (image_tokens, hidden) rows: plane 0 the
        image's input rows, plane p >= 1 added after decoder layer `added_layers()[p-1]`."""
        return [np.asarray(outputs[0]).reshape(shapes.image_tokens, shapes.hidden)]

    def added_layers(self, shapes: Any) -> tuple[int, ...]:
        """Decoder layers whose outputs get a plane added at the image rows during prefill."""
        return ()

    # -- positions ---------------------------------------------------------------------

    index_rows = 1  # rows of the prefill graphs' `indices` input this family writes

    def positions(self, ids: Sequence[int], image_token_id: int | None, shapes: Any) -> tuple[np.ndarray, int]:
        """(positions uint32 (index_rows, len(ids)), the rotary position of the row after them).

        A pure function of the ids: every run of `shapes.image_tokens` `image_token_id` rows is
        one image (earlier turns' images of a conversation included). The base: 1-D
        positions equal to the row.
        """
        n = len(ids)
        return np.arange(n, dtype=np.uint32)[None, :], n

    def describe(self) -> dict[str, Any]:
        return {"family": self.name, "image_token": self.image_tags.token, "index_rows": self.index_rows}


def check_index_rows(family: ModelFamily, graph_rows: int, problems: list[str]) -> None:
    """The prefill graphs' `indices` rows must be what the family writes."""
    if graph_rows != family.index_rows:
        problems.append(f"the prefill graphs take {graph_rows} rows of indices, the {family.name} family writes"
                        f" {family.index_rows}")
