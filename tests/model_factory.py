"""Tiny random-weight checkpoints for tests, built deterministically and offline.

Three checkpoint flavours, all bf16 safetensors with the real InternVL2-1B tokenizer
files beside them (tests.tokenizer_files):

- `build_internvl_native(dir)`: transformers-native `InternVLForConditionalGeneration`
  as `save_pretrained` writes it, plus `"template": "Hermes-2"` in config.json;
- `build_internvl_original(dir)`: the same weights under the names OpenGVLab's
  `InternVLChatModel` repositories ship (fused vision qkv, ls1/ls2, mlp1.0/1/3,
  language_model.model.*), sharded in two files with model.safetensors.index.json,
  and an original-style config.json (`llm_config`, `force_image_size`, ...);
- `build_qwen2_text(dir)`: a text-only `Qwen2ForCausalLM`.

`make_internvl(seed)` returns the unsaved float32 model the InternVL builders start from.

Every returned `TinyModel.torch_model` is float32 in eval mode with eager attention,
and its parameters are exactly the bf16 values stored on disk, so a float32 reference
built from the checkpoint must match it to float32 rounding. Norm weights, biases,
layer scales, the CLS token and position embeddings are perturbed away from their
1/0 initial values so a mis-mapped tensor changes the output.

Dimensions (InternVL2-1B's shape in miniature): vision 224 px, patch 14, hidden 32,
2 layers, 4 heads, downsample 0.5 -> 64 image tokens; text hidden 64, 2 layers,
4 heads / 2 KV heads (GQA, head_dim 16, kv_dim 32), vocab 151655, tied embeddings.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

try:  # the dev extra's torch; README's torch-free run must still collect (#21.15): builders skip
    import torch
    from safetensors.torch import save_file
except ModuleNotFoundError as missing:
    torch = save_file = None
    TORCH_MISSING = (f"{missing.name} is not installed: the tiny test checkpoints are built with torch"
                     " (pip install -e '.[dev]' installs it)")
else:
    TORCH_MISSING = None

from tests.model_dims import (  # noqa: F401  (re-exported: callers use model_factory.IMAGE_SIZE etc.)
    DOWNSAMPLE,
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    IMAGENET_MEAN,
    IMAGENET_STD,
    N_IMAGE_TOKENS,
    PATCH,
    TEMPLATE,
    random_image,
)
from tests.tokenizer_files import (
    INTERNVL2_5_ADDED_TOKENS, INTERNVL2_5_VOCAB_SIZE, INTERNVL2_ADDED_TOKENS, INTERNVL2_VOCAB_SIZE,
    write_internvl2_tokenizer,
)



def require_torch() -> None:
    """Skip the calling test (with the reason) when torch is not installed."""
    if TORCH_MISSING is not None:
        pytest.skip(TORCH_MISSING)


TEXT_DIMS = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=INTERNVL2_VOCAB_SIZE,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
ROPE_THETA = 1000000.0
VISION_DIMS = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=IMAGE_SIZE,
    patch_size=PATCH,
    attention_bias=True,
    norm_type="layer_norm",
    layer_norm_eps=1e-6,
    hidden_act="gelu",
    use_mean_pooling=True,
)


@dataclass(frozen=True)
class Family:
    """What a model family changes in a checkpoint: its tokenizer's added tokens (and so the
    vocabulary and the image token id) and InternVL's `template` name."""

    name: str
    vocab_size: int
    added_tokens: dict[str, int]
    template: str

    @property
    def image_token_id(self) -> int:
        return self.added_tokens["<IMG_CONTEXT>"]


FAMILIES = {
    "internvl2": Family("internvl2", INTERNVL2_VOCAB_SIZE, INTERNVL2_ADDED_TOKENS, "Hermes-2"),
    # InternVL2.5 and InternVL3 (both Qwen2.5-based, template internvl2_5)
    "internvl2_5": Family("internvl2_5", INTERNVL2_5_VOCAB_SIZE, INTERNVL2_5_ADDED_TOKENS, "internvl2_5"),
}


def family_of(model: torch.nn.Module) -> Family:
    """The family of a model made by `make_internvl` (told by its vocabulary)."""
    return next(f for f in FAMILIES.values() if f.vocab_size == model.config.text_config.vocab_size)


def n_image_tokens(image_size: int) -> int:
    return int((image_size // PATCH) ** 2 * DOWNSAMPLE**2)


@dataclass(frozen=True)
class TinyModel:
    """A tiny checkpoint on disk and the float32 torch model holding the same weights."""

    path: Path
    naming: str  # "native" | "original" | "qwen2"
    torch_model: torch.nn.Module = field(repr=False)
    config: dict = field(repr=False)  # the config.json written to `path`

    @property
    def has_vision(self) -> bool:
        return self.naming != "qwen2"

    @property
    def n_image_tokens(self) -> int:
        return N_IMAGE_TOKENS if self.has_vision else 0


def pixel_values(images_nhwc_uint8: np.ndarray) -> torch.Tensor:
    """transformers' `pixel_values` (float32 NCHW, ImageNet-normalised) for uint8 NHWC RGB images."""
    require_torch()
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc_uint8)).float() / 255.0  # (n, h, w, 3)
    x = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return x.permute(0, 3, 1, 2).contiguous()  # (n, 3, h, w)


# ---------------------------------------------------------------- weight init


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter with seeded values of a useful scale, then round to bf16."""
    gen = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            shape = tuple(param.shape)
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("lambda_1", "lambda_2"):
                value = 0.5 + 0.2 * randn(shape)
            elif leaf == "bias":
                value = 0.1 * randn(shape)
            elif len(shape) == 1:  # LayerNorm / RMSNorm weights
                value = 1.0 + 0.2 * randn(shape)
            elif leaf in ("cls_token", "position_embeddings"):
                value = 0.5 * randn(shape)
            elif "embed_tokens" in name:
                value = randn(shape)
            else:  # Linear / Conv2d weights: keep activations near unit scale
                fan_in = math.prod(shape[1:])
                value = randn(shape) / math.sqrt(fan_in)
            param.copy_(value.to(torch.bfloat16).to(torch.float32))


def _finish(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    _perturb_(model, seed)
    model.tie_weights()
    return model.eval()


def _internvl_config(family: Family = FAMILIES["internvl2"], image_size: int = IMAGE_SIZE, **vision_overrides):
    from transformers import InternVLConfig

    text = dict(TEXT_DIMS, model_type="qwen2", rope_theta=ROPE_THETA, vocab_size=family.vocab_size)
    return InternVLConfig(
        vision_config=dict(VISION_DIMS, image_size=image_size, **vision_overrides),
        text_config=text,
        downsample_ratio=DOWNSAMPLE,
        image_token_id=family.image_token_id,
        image_seq_length=n_image_tokens(image_size),
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )


def make_internvl(seed: int, family: str = "internvl2", image_size: int = IMAGE_SIZE, **vision_overrides) -> torch.nn.Module:
    """The float32 eager InternVL model the builders save, before any bf16 rounding.

    The same seed gives the same weights (perturbed as the module docstring says);
    `family` picks the vocabulary (FAMILIES), `image_size` the vision input (224, 364,
    448: 64, 169, 256 image tokens); `vision_overrides` change VISION_DIMS (e.g.
    norm_type, use_qk_norm). Tests that need to alter the weights before saving
    (tests/test_parity.py) start from this.
    """
    require_torch()
    from transformers import InternVLForConditionalGeneration

    config = _internvl_config(FAMILIES[family], image_size, **vision_overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(InternVLForConditionalGeneration(config), seed)


def _make_qwen2(seed: int) -> torch.nn.Module:
    require_torch()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**TEXT_DIMS, rope_theta=ROPE_THETA)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(Qwen2ForCausalLM(config), seed)


# ---------------------------------------------------------------- writers


def _save_pretrained_bf16(model: torch.nn.Module, directory: Path, template: str = TEMPLATE) -> dict:
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["template"] = template
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return config


def build_internvl_native(directory: Path, seed: int = 0, family: str = "internvl2", image_size: int = IMAGE_SIZE,
                          **vision_overrides) -> TinyModel:
    """Transformers-native InternVL checkpoint (as `save_pretrained` writes it) in `directory`,
    with its family's tokenizer and `template`."""
    directory = Path(directory)
    model = make_internvl(seed, family, image_size, **vision_overrides)
    config = _save_pretrained_bf16(model, directory, FAMILIES[family].template)
    write_internvl2_tokenizer(directory, FAMILIES[family].added_tokens)
    return TinyModel(directory, "native", model, config)


def build_qwen2_text(directory: Path, seed: int = 2) -> TinyModel:
    """Text-only Qwen2ForCausalLM checkpoint in `directory` (no vision)."""
    directory = Path(directory)
    model = _make_qwen2(seed)
    config = _save_pretrained_bf16(model, directory)
    write_internvl2_tokenizer(directory)
    return TinyModel(directory, "qwen2", model, config)


def original_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights (an InternVLForConditionalGeneration) under InternVLChatModel names, bf16."""
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    n_vision = model.config.vision_config.num_hidden_layers
    vt, vm = "model.vision_tower.", "vision_model."
    out[vm + "embeddings.class_embedding"] = sd[vt + "embeddings.cls_token"]
    out[vm + "embeddings.position_embedding"] = sd[vt + "embeddings.position_embeddings"]
    for kind in ("weight", "bias"):
        out[vm + f"embeddings.patch_embedding.{kind}"] = sd[vt + f"embeddings.patch_embeddings.projection.{kind}"]
    for i in range(n_vision):
        src, dst = f"{vt}encoder.layer.{i}.", f"{vm}encoder.layers.{i}."
        renames = {"attention.projection_layer": "attn.proj", "layernorm_before": "norm1",
                   "layernorm_after": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
                   "attention.q_norm": "attn.q_norm", "attention.k_norm": "attn.k_norm"}
        for kind in ("weight", "bias"):
            if src + f"attention.q_proj.{kind}" in sd:
                out[dst + f"attn.qkv.{kind}"] = torch.cat([sd[src + f"attention.{p}_proj.{kind}"] for p in "qkv"])
            for old, new in renames.items():
                if src + f"{old}.{kind}" in sd:  # rms norms have no bias
                    out[dst + f"{new}.{kind}"] = sd[src + f"{old}.{kind}"]
        out[dst + "ls1"] = sd[src + "lambda_1"]
        out[dst + "ls2"] = sd[src + "lambda_2"]
    proj = "model.multi_modal_projector."
    for index, name in (("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2")):
        for kind in ("weight", "bias"):
            out[f"mlp1.{index}.{kind}"] = sd[f"{proj}{name}.{kind}"]
    for key, value in sd.items():
        if key.startswith("model.language_model."):
            out["language_model.model." + key[len("model.language_model.") :]] = value
    return out


def original_config(model: torch.nn.Module) -> dict:
    """The InternVLChatModel-style config.json (`llm_config`, `force_image_size`, `template`, ...)
    of a model made by `make_internvl`, as OpenGVLab's repositories (and AXERA's copies) ship it."""
    vision_config, family = model.config.vision_config, family_of(model)
    llm = dict(TEXT_DIMS, architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
               rope_theta=ROPE_THETA, torch_dtype="bfloat16", use_sliding_window=False, vocab_size=family.vocab_size)
    image_size = vision_config.image_size[0] if isinstance(vision_config.image_size, (list, tuple)) \
        else vision_config.image_size
    vision = dict(
        architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=vision_config.hidden_size,
        num_hidden_layers=vision_config.num_hidden_layers, num_attention_heads=vision_config.num_attention_heads,
        intermediate_size=vision_config.intermediate_size, image_size=image_size, patch_size=PATCH,
        num_channels=3, hidden_act="gelu", norm_type=vision_config.norm_type, layer_norm_eps=1e-6, qkv_bias=True,
        qk_normalization=vision_config.use_qk_norm, use_flash_attn=False, drop_path_rate=0.0, initializer_factor=1.0,
    )
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "llm_config": llm,
        "vision_config": vision, "force_image_size": image_size, "downsample_ratio": DOWNSAMPLE,
        "select_layer": -1, "ps_version": "v2", "template": family.template, "dynamic_image_size": False,
        "use_thumbnail": False, "max_dynamic_patch": 1, "min_dynamic_patch": 1, "torch_dtype": "bfloat16",
    }


def _write_sharded(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Two shards (embeddings alone, the rest) plus model.safetensors.index.json."""
    first = {k: v for k, v in tensors.items() if "embed_tokens" in k}
    second = {k: v for k, v in tensors.items() if k not in first}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, part in zip(names, (first, second)):
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_internvl_original(directory: Path, seed: int = 0, model: torch.nn.Module | None = None) -> TinyModel:
    """The native model's weights (same seed -> same weights) under InternVLChatModel names, sharded."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else make_internvl(seed)
    _write_sharded(original_state_dict(model), directory)
    config = original_config(model)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_internvl2_tokenizer(directory, family_of(model).added_tokens)
    return TinyModel(directory, "original", model, config)
