"""Tiny random-weight Qwen3-VL checkpoints (transformers' Qwen3VLForConditionalGeneration), offline.

`build_qwen3_vl(dir, seed)` writes what `save_pretrained` writes (bf16 safetensors,
config.json), the Qwen2 vocabulary with Qwen3-VL's added tokens (tests.tokenizer_files),
a preprocessor_config.json (bicubic, mean = std = 0.5, patch 16, merge 2, temporal 2) and a
chat template of vlmd's own in Qwen3-VL's form (ChatML turns, each image as
`<|vision_start|><|image_pad|><|vision_end|>` before the text).

Dimensions: vision 32 wide, 4 blocks, 2 heads, patch 16, learned position grid 7 x 7 (so
the 96 px graph's 6 x 6 patch grid resizes it bilinearly), deepstack after blocks 0, 2, 3;
text 64 wide, 3 layers, 4 heads / 2 KV heads of 16, M-RoPE sections [2, 3, 3]. Weights
are perturbed as tests/model_factory.py does; the embeddings are untied from lm_head (tied
ones make a random model repeat its last input token) and the text's embeddings (EMBED_SCALE)
and the mergers' outputs (IMAGE_GAIN) scaled so that the text and the 9 image tokens both
steer the greedy answer (tests/test_qwen3_vl.py checks two images answer differently).

`oracle_greedy(model, ids, images, n)`: transformers' greedy answer, recomputing the whole
sequence each step (its own get_rope_index every time: no cache, no rope delta), with
pixel_values made by transformers' PIL image processor (Qwen2VLImageProcessorPil, no
torchvision) from the images resized as vlmd resizes them.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from npu.image import resize_rgb
from tests.tokenizer_files import QWEN3_VL_ADDED_TOKENS, QWEN3_VL_VOCAB_SIZE, write_internvl2_tokenizer

IMAGE_SIDE = 96
PATCH = 16
N_IMAGE_TOKENS = (IMAGE_SIDE // PATCH // 2) ** 2  # 9
IMAGE_TOKEN_ID = QWEN3_VL_ADDED_TOKENS["<|image_pad|>"]
EMBED_SCALE = 4.0
IMAGE_GAIN = 6.0  # the mergers' output weights: image rows as loud as the text's
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for part in message.content %}"
    "{%- if part.type == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'text' %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyQwen3VL:
    path: Path
    torch_model: torch.nn.Module = field(repr=False)
    config: dict = field(repr=False)


def make_qwen3_vl(seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=128, vocab_size=QWEN3_VL_VOCAB_SIZE, rms_norm_eps=1e-6,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=49,
                           deepstack_visual_indexes=[0, 2, 3]),
        image_token_id=IMAGE_TOKEN_ID, video_token_id=QWEN3_VL_ADDED_TOKENS["<|video_pad|>"],
        vision_start_token_id=QWEN3_VL_ADDED_TOKENS["<|vision_start|>"],
        vision_end_token_id=QWEN3_VL_ADDED_TOKENS["<|vision_end|>"], tie_word_embeddings=False)
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            shape, leaf = tuple(param.shape), name.rsplit(".", 1)[-1]
            value = torch.randn(shape, generator=gen)
            if leaf == "bias":
                value = 0.1 * value
            elif len(shape) == 1:  # LayerNorm / RMSNorm weights
                value = 1.0 + 0.2 * value
            elif "embed_tokens" in name:
                value = EMBED_SCALE * value / math.sqrt(shape[1])
            elif "pos_embed" in name:
                value = 0.5 * value
            else:
                value = value / math.sqrt(math.prod(shape[1:]))
                if "merger" in name and "linear_fc2" in name:
                    value = IMAGE_GAIN * value
            param.copy_(value.to(torch.bfloat16).to(torch.float32))
    return model.eval()


def build_qwen3_vl(directory: Path, seed: int = 0) -> TinyQwen3VL:
    directory = Path(directory)
    model = make_qwen3_vl(seed)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    write_internvl2_tokenizer(directory, QWEN3_VL_ADDED_TOKENS)
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "resample": 3, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "patch_size": PATCH, "merge_size": 2, "temporal_patch_size": 2}))
    return TinyQwen3VL(directory, model, config)


def pixel_values(images: list[np.ndarray], resize: str = "bicubic") -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' (pixel_values, image_grid_thw) for RGB images, resized to the graph's side first."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(do_resize=False, image_mean=[0.5] * 3, image_std=[0.5] * 3, patch_size=PATCH,
                                         merge_size=2, temporal_patch_size=2)
    resized = [resize_rgb(image, IMAGE_SIDE, IMAGE_SIDE, resize) for image in images]
    out = processor(resized, return_tensors="pt")
    return out["pixel_values"].float(), out["image_grid_thw"]


@torch.no_grad()
def oracle_greedy(model: torch.nn.Module, ids: list[int], images: list[np.ndarray], n: int) -> list[int]:
    """The greedy continuation of `ids` (images' placeholders included) by transformers."""
    kwargs = {}
    if images:
        kwargs["pixel_values"], kwargs["image_grid_thw"] = pixel_values(images)
    ids = list(ids)
    answer = []
    for _ in range(n):
        tensor = torch.tensor([ids])
        types = (tensor == IMAGE_TOKEN_ID).int()
        logits = model(input_ids=tensor, mm_token_type_ids=types, use_cache=False, **kwargs).logits[0, -1]
        token = int(torch.argmax(logits))
        answer.append(token)
        ids.append(token)
    return answer
