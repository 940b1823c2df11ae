"""The SmolVLM family (SmolVLM-256M/500M-Instruct, transformers' Idefics3 architecture) as
M5Stack's `smolvlm-*` packages and Hugging Face checkpoints hold it.

What differs from InternVL, and where it is read (cited per fact):

- image tags: one unsplit image is `<fake_token_around_image><global-img>` + 64 x `<image>` +
  `<fake_token_around_image>`, with no newline after it, written where the template puts the
  image (after "User:"): StackFlow d9084ba main_vlm/scripts/tokenizer_smolvlm-256M-ax630c.py
  `encode_vpm` (image_rows = image_cols = 0, image_seq_len 64), as transformers'
  SmolVLMProcessor writes it for an image it does not split (`_prompt_single_image`);
- the image token is `<image>`, id 49190 in SmolVLM's tokenizer (mode files' `img_token_id`);
  the vision graph's output rows replace the `<image>` rows in order (StackFlow LLM.hpp
  `Encode`: the features are copied from the first `img_token_id` row on; transformers'
  `inputs_merger`). AXERA's Python runner starts one row later (nnn112358/SmolVLM-256M-Instruct.axera
  4b0bfff python/infer_axmodel.py `image_insert_index = image_start_index + 1`), overwriting
  the closing `<fake_token_around_image>`: not copied here;
- the vision graph: uint8 NHWC [1, H, W, 3] normalised inside (mean = std = 127.5), the whole
  frame resized to H x W (StackFlow LLM.hpp `Encode`: cv::resize to the graph's size), one
  float32 [1, 64, hidden] output; positions are one row equal to the KV row; nothing is added
  between layers. These are InternVL's conventions, so the InternVL family's vision reading
  is reused as is.

The template (the checkpoint's Jinja chat template: "User:" then the image, the question,
`<end_of_utterance>`, then "Assistant:") and the stop token `<end_of_utterance>` (the
tokenizer's eos_token) come from the tokenizer files; this module only says how an image
placeholder expands. Assumed where sources are silent: M5Stack's tokenizer folder carries
the chat template SmolVLM's Hugging Face repository ships.
"""

from __future__ import annotations

from npu.families.base import ImageTags
from npu.families.internvl import InternVLFamily

IMAGE_TOKEN = "<image>"
IMAGE_START = "<fake_token_around_image><global-img>"
IMAGE_END = "<fake_token_around_image>"


class SmolVLMFamily(InternVLFamily):
    name = "smolvlm"
    image_tags = ImageTags(IMAGE_START, IMAGE_TOKEN, IMAGE_END, expand_edges=True, newline=False)


SMOLVLM = SmolVLMFamily()
