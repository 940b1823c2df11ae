"""The Qwen3-VL family: patch-major uint8 vision input, deepstack planes added after the first
decoder layers, interleaved M-RoPE positions (3 rows) in prefill, `<|image_pad|>` x N.

What the published runners feed the graphs (the facts this module encodes):

- vision input `hidden_states`, uint8 (1, grid_h * grid_w, 2 * 16 * 16, 3): the frame resized
  to the graph's size, RGB, cut into 16x16 patches ordered by 2x2 merge block (block row,
  block column, row in block, column in block), each patch's bytes as (temporal copy, y, x,
  channel) with the frame copied to both temporal slots; normalisation is inside the graph
  (m5stack/StackFlow d9084ba main_vlm/src/runner/utils/image_processor.cpp
  `Qwen2VideoProcessor`; AXERA-TECH/Qwen3-VL.AXERA 2e8db66 python/preprocess.py, the
  transpose (0, 3, 6, 4, 7, 1, 5, 8, 2); model_convert/config_u8.json: uint8 input,
  calibration mean = std = 127.5);
- outputs `hidden_states_out` then `deepstack_feature_0..2`, one row per merged token
  (model_convert/export.py output_names); the host adds deepstack feature m to the output of
  decoder layer m at the image rows during prefill only (python/infer_image.py, the
  `deepstack_visual_embeds` loop; StackFlow LLM.hpp `LLM_Qwen::Run`);
- prefill `indices` uint32 (3, chunk): M-RoPE t/h/w rows from `get_rope_index`; decode
  `indices` (1, 1) continues from max(position) + 1 while the KV row continues from the rows
  written (python/infer_image.py keeps `start_ids` and `start_indice` apart; StackFlow's
  decode loop uses one variable for both, LLM.hpp line 2343, which vlmd does not copy).

Positions (transformers' `Qwen3VLModel.get_rope_index`): text rows count on from the last
position; an image's merged grid (gh, gw) takes t = s, h = s + row, w = s + column with s the
position after the text before it, and the text after it resumes at s + max(gh, gw).

Assumed where the sources are silent: the vision graphs are square (grid_h = grid_w, as
every published build is: 384 x 384, 320 x 320); the outputs are float32 (StackFlow reads
them as float, LLM.hpp `EncodeImage`); 2-D (tokens, hidden) or 3-D (1, tokens, hidden).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from npu.families.base import ImageTags, ModelFamily
from npu.image import ImagePreprocess, resize_rgb
from npu.session import Session

TEMPORAL = 2  # temporal copies of each patch (vision_config.temporal_patch_size)
MERGE = 2  # spatial merge (vision_config.spatial_merge_size)


def patchify(rgb: np.ndarray, patch: int, out: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> `out` uint8 (1, H/p * W/p, 2*p*p, 3) in the runners' patch order."""
    h, w = rgb.shape[0] // patch, rgb.shape[1] // patch
    blocks = rgb.reshape(h // MERGE, MERGE, patch, w // MERGE, MERGE, patch, 3)  # (bh, mh, y, bw, mw, x, c)
    blocks = blocks.transpose(0, 3, 1, 4, 2, 5, 6)  # (bh, bw, mh, mw, y, x, c)
    rows = blocks.reshape(h * w, 1, patch * patch, 3)
    out[0] = np.broadcast_to(rows, (h * w, TEMPORAL, patch * patch, 3)).reshape(h * w, TEMPORAL * patch * patch, 3)
    return out


class Qwen3VLFamily(ModelFamily):
    name = "qwen3_vl"
    image_tags = ImageTags("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", expand_edges=False, newline=False)
    index_rows = 3

    def vision_shapes(self, vision: Session, hidden: int, problems: list[str]) -> dict[str, Any]:
        image_in, outputs = vision.inputs(0)[0], vision.outputs(0)
        shape = image_in.shape
        patch = math.isqrt(shape[2] // TEMPORAL) if len(shape) == 4 else 0
        side = math.isqrt(shape[1]) if len(shape) == 4 else 0
        if (len(shape) != 4 or shape[0] != 1 or shape[3] != 3 or image_in.dtype != np.uint8
                or TEMPORAL * patch * patch != shape[2] or side * side != shape[1] or side % MERGE):
            problems.append(f"vision input {image_in.describe()} is not uint8 [1, grid_h*grid_w, 2*p*p, 3] patches"
                            " of a square grid")
            return {}
        tokens = shape[1] // (MERGE * MERGE)
        for spec in outputs:
            rows = spec.shape[-2] if len(spec.shape) >= 2 else None
            if rows != tokens or spec.shape[-1] != hidden or math.prod(spec.shape) != tokens * hidden:
                problems.append(f"vision output {spec.describe()} is not [{tokens}, {hidden}] (one row per merged token)")
                return {}
        return {"vision_input_name": image_in.name, "vision_size": (side * patch, side * patch),
                "image_tokens": tokens, "vision_dtype": outputs[0].dtype, "vision_layout": "patches",
                "vision_planes": len(outputs)}

    def input_buffer(self, shapes: Any) -> np.ndarray:
        height, width = shapes.vision_size
        patch = self._patch(shapes)
        return np.zeros((1, (height // patch) * (width // patch), TEMPORAL * patch * patch, 3), np.uint8)

    def prepare_image(self, preprocess: ImagePreprocess, rgb: np.ndarray, out: np.ndarray, shapes: Any) -> np.ndarray:
        height, width = shapes.vision_size
        return patchify(resize_rgb(rgb, height, width, preprocess.resize), self._patch(shapes), out)

    def image_planes(self, outputs: Sequence[np.ndarray], shapes: Any) -> list[np.ndarray]:
        return [np.asarray(o).reshape(shapes.image_tokens, shapes.hidden) for o in outputs[:shapes.vision_planes]]

    def added_layers(self, shapes: Any) -> tuple[int, ...]:
        return tuple(range(shapes.vision_planes - 1))  # deepstack feature m after decoder layer m

    def positions(self, ids: Sequence[int], image_token_id: int | None, shapes: Any) -> tuple[np.ndarray, int]:
        n = len(ids)
        positions = np.empty((3, n), np.int64)
        tokens = shapes.image_tokens
        is_image = (np.asarray(ids) == image_token_id) if image_token_id is not None and tokens else np.zeros(n, bool)
        side = math.isqrt(tokens) if tokens else 0
        grid_r, grid_c = np.divmod(np.arange(tokens), side) if tokens else (None, None)
        row, position = 0, 0
        while row < n:
            if is_image[row]:
                if not is_image[row:row + tokens].all():
                    raise ValueError(f"an image's placeholder run at row {row} is shorter than {tokens} tokens")
                positions[0, row:row + tokens] = position
                positions[1, row:row + tokens] = position + grid_r
                positions[2, row:row + tokens] = position + grid_c
                row, position = row + tokens, position + side  # max(grid_h, grid_w) on a square grid
            else:
                positions[:, row] = position
                row, position = row + 1, position + 1
        return positions.astype(np.uint32), position

    @staticmethod
    def _patch(shapes: Any) -> int:
        height, _ = shapes.vision_size
        return height // math.isqrt(shapes.image_tokens * MERGE * MERGE)


QWEN3_VL = Qwen3VLFamily()
