"""A tiny random SmolVLM checkpoint (transformers' SmolVLMForConditionalGeneration), built offline.

Dimensions the tests choose (SmolVLM-256M's shape in miniature, same image-token count):
vision 128 px, patch 4 -> 32x32 patches, hidden 32, 2 layers, 4 heads, scale factor 4 (as
SmolVLM-256M: 512 / 16 = 32 patches a side, s = 4) -> 64 image tokens; text Llama hidden 64,
2 layers, 4 heads / 2 KV heads, vocabulary 49280 with the Idefics3 special tokens at their real
ids (image token 49190), untied lm_head.

The tokenizer: SmolVLM's own BPE vocabulary (SmolLM2's) ships in no package this project can
install, so `write_smolvlm_tokenizer` trains a small byte-level BPE on English phrases with the
`tokenizers` library, pads the vocabulary to 49152 entries and adds the Idefics3 tokens at the
ids SmolVLM-256M-Instruct's tokenizer gives them (<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2,
<global-img> 49152, <row_1_col_1>..<row_6_col_6> 49153..49188, <fake_token_around_image> 49189,
<image> 49190, <end_of_utterance> 49279; StackFlow d9084ba mode_smolvlm-256M-ax630c.json:
img_token_id 49190, tokens_embed_num 49280). The chat template is transformers' own SmolVLM one.

Weights: seeded, rounded to bf16 (the model keeps exactly the stored values); the token
embeddings and the connector are scaled up so the image and the words, not the biases of a
random network, decide the greedy answer (a degenerate repeat would test nothing).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 49280
BASE_VOCAB = 49152
IMAGE_TOKEN_ID = 49190
END_OF_UTTERANCE_ID = 49279
IMAGE_SIZE = 128
PATCH = 4
SCALE_FACTOR = 4
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH // SCALE_FACTOR) ** 2  # 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT_DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=VOCAB_SIZE, rms_norm_eps=1e-5, max_position_embeddings=4096,
                 rope_theta=100000.0, tie_word_embeddings=False, model_type="llama")
VISION_DIMS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   image_size=IMAGE_SIZE, patch_size=PATCH, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
EMBED_SCALE = 4.0
CONNECTOR_SCALE = 6.0
QK_SCALE = 2.5
TRAINED_VOCAB = 400  # specials + bytes + merges the BPE trainer learns; the rest are fillers
_CORPUS = [
    "What is in the image? Describe the picture in one sentence.",
    "Is there a person at the door? Yes or no. How many cars are parked outside?",
    "The image shows a red car, a small dog and a green tree on a sunny day.",
    "What colour is it? And what about the sky? Tell me more about the left side.",
    "A cat sleeps on the sofa while the window is open and the light is on.",
]


def idefics3_added_tokens() -> dict[str, int]:
    tokens = {"<global-img>": BASE_VOCAB}
    for row in range(6):
        for col in range(6):
            tokens[f"<row_{row + 1}_col_{col + 1}>"] = BASE_VOCAB + 1 + row * 6 + col
    tokens["<fake_token_around_image>"] = 49189
    tokens["<image>"] = IMAGE_TOKEN_ID
    for i in range(49191, END_OF_UTTERANCE_ID):
        tokens[f"<|reserved_special_token_{i - 49191}|>"] = i
    tokens["<end_of_utterance>"] = END_OF_UTTERANCE_ID
    return tokens


def write_smolvlm_tokenizer(directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json + chat_template.json (see module docstring)."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TRAINED_VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), BASE_VOCAB):
        vocab[f"<filler_{i}>"] = i  # unreachable by any merge: stands for SmolLM2's other entries
    added = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for t, i in {s: i for i, s in enumerate(SPECIALS)}.items()]
    added += [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
              for t, i in idefics3_added_tokens().items()]
    spec["added_tokens"] = added
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    config = {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "model_max_length": 8192, "tokenizer_class": "GPT2Tokenizer",
              "add_prefix_space": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": DEFAULT_CHAT_TEMPLATE}))


@dataclass(frozen=True)
class TinySmolVLM:
    path: Path
    torch_model: torch.nn.Module = field(repr=False)
    config: dict = field(repr=False)


def make_smolvlm(seed: int = 0) -> torch.nn.Module:
    """The float32 eager model whose bf16-rounded weights the builder saves."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    config = SmolVLMConfig(text_config=dict(TEXT_DIMS), vision_config=dict(VISION_DIMS), scale_factor=SCALE_FACTOR,
                           image_token_id=IMAGE_TOKEN_ID, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            shape = tuple(param.shape)
            value = torch.randn(shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias"):
                value = 0.1 * value
            elif len(shape) == 1:
                value = 1.0 + 0.2 * value
            elif "embed_tokens" in name:
                value = EMBED_SCALE * value
            elif "position_embedding" in name:
                value = 0.5 * value
            else:
                value = value / math.sqrt(math.prod(shape[1:]))
                if "modality_projection" in name:
                    value = CONNECTOR_SCALE * value
                elif "text_model" in name and ("q_proj" in name or "k_proj" in name):
                    value = QK_SCALE * value  # sharper attention: the answer follows particular image rows
                elif name == "lm_head.weight":
                    value[TRAINED_VOCAB:BASE_VOCAB] = 0.0  # fillers never win: answers are real words
                    value[IMAGE_TOKEN_ID + 1 : END_OF_UTTERANCE_ID] = 0.0  # nor reserved tokens
            param.copy_(value.to(torch.bfloat16).to(torch.float32))
    return model.eval()


def build_smolvlm(directory: Path, seed: int = 0) -> TinySmolVLM:
    """Checkpoint as save_pretrained writes it (bf16 safetensors) + tokenizer files in `directory`."""
    directory = Path(directory)
    model = make_smolvlm(seed)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(directory)
    write_smolvlm_tokenizer(directory)
    preprocessor = {"image_processor_type": "SmolVLMImageProcessor", "do_resize": True, "resample": 1,
                    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
                    "image_std": [0.5] * 3, "do_image_splitting": False,
                    "size": {"longest_edge": IMAGE_SIZE}, "max_image_size": {"longest_edge": IMAGE_SIZE}}
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    (directory / "processor_config.json").write_text(json.dumps({"image_seq_len": N_IMAGE_TOKENS}))
    return TinySmolVLM(directory, model, json.loads((directory / "config.json").read_text()))


def pixel_values(image_hwc_uint8: np.ndarray) -> torch.Tensor:
    """transformers' pixel_values (1, 1, 3, H, W) for one image already at the model's size:
    rescale by 1/255, then normalise with mean 0.5 and std 0.5, as SmolVLMImageProcessor does."""
    x = torch.from_numpy(np.ascontiguousarray(image_hwc_uint8)).float() * (1 / 255)
    x = (x - 0.5) / 0.5
    return x.permute(2, 0, 1)[None, None].contiguous()


def image_block(n_image_tokens: int = N_IMAGE_TOKENS) -> str:
    """What SmolVLMProcessor writes for one unsplit image (its _prompt_single_image)."""
    return "<fake_token_around_image><global-img>" + "<image>" * n_image_tokens + "<fake_token_around_image>"


def sample_image(seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """A uint8 RGB image [size, size, 3] whose content differs wholly from seed to seed
    (blocks of random colours), so answers that depend on the image differ between seeds."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, size // 8, axis=0), size // 8, axis=1)
