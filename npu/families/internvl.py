"""The InternVL family (InternVL2, 2.5, 3 as Pulsar2 `llm_build` packages and Hugging Face
checkpoints): one vision graph output spliced over the `<IMG_CONTEXT>` rows, 1-D positions
equal to the KV row, nothing added between layers, `<img>` + N x `<IMG_CONTEXT>` + `</img>`.

Vision input in either convention the published builds use, told apart as StackFlow's
runtime does (where the 3 channels are, m5stack/StackFlow d9084ba main_vlm
src/runner/LLM.hpp): uint8 [1,H,W,3] normalised inside the graph, or float32 [1,3,H,W]
normalised on the host (AXERA's InternVL3 builds).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npu.families.base import ImageTags, ModelFamily
from npu.session import BF16, Session, dtype_name

FEATURE_DTYPES = (BF16, np.dtype(np.float32))


class InternVLFamily(ModelFamily):
    name = "internvl"
    image_tags = ImageTags("<img>", "<IMG_CONTEXT>", "</img>")

    def vision_shapes(self, vision: Session, hidden: int, problems: list[str]) -> dict[str, Any]:
        image_in, features = vision.inputs(0)[0], vision.outputs(0)[0]
        shape = image_in.shape
        if len(shape) == 4 and shape[0] == 1 and shape[3] == 3 and image_in.dtype == np.uint8:
            layout, size = "nhwc", (shape[1], shape[2])
        elif len(shape) == 4 and shape[0] == 1 and shape[1] == 3 and image_in.dtype == np.float32:
            layout, size = "nchw", (shape[2], shape[3])
        else:
            problems.append(f"vision input {image_in.describe()} is neither uint8 [1, H, W, 3] nor float32 [1, 3, H, W]")
            return {}
        if len(features.shape) != 3 or features.shape[2] != hidden:
            problems.append(f"vision output {features.describe()} is not [1, tokens, {hidden}]")
            return {}
        if features.dtype not in FEATURE_DTYPES:
            problems.append(f"vision output dtype {dtype_name(features.dtype)}: expected bfloat16 or float32")
        return {"vision_input_name": image_in.name, "vision_size": size, "image_tokens": features.shape[1],
                "vision_dtype": features.dtype, "vision_layout": layout}


INTERNVL = InternVLFamily()
