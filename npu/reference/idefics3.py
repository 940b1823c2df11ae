"""SmolVLM / Idefics3 checkpoints -> a blueprint and canonical numpy weights.

The only place the Hugging Face names of SmolVLM checkpoints live (transformers'
`SmolVLMForConditionalGeneration`, model_type "smolvlm", and `Idefics3ForConditionalGeneration`,
model_type "idefics3": both write `model.text_model.*`, `model.vision_model.*`,
`model.connector.modality_projection.proj.weight` and `lm_head.weight`).

`load_idefics3_checkpoint(dir)` returns `(SmolVLMBlueprint, Weights)`. The text decoder is a
Llama; its canonical names are checkpoint.py's (`embed`, `layers.{i}.q.weight`, ...) so the
shared `LayerSession` and `PostSession` run it; Llama has no q/k/v biases, so zero biases are
added (exact: adding 0.0 changes no float). The vision side's canonical names:

    svision.patch.weight [C, 3, p, p], .bias [C]    svision.pos [grid*grid, C]
    svision.layers.{i}.{norm1,norm2}.weight/.bias   {q,k,v,proj,fc1,fc2}.weight/.bias
    svision.post_norm.weight/.bias                  connector.weight [text_hidden, C*s*s] (no bias)

Refused (BlueprintError): RoPE scaling, a text model that is not Llama, a vision activation
other than tanh GELU, non-square images. Unknown, missing or mis-shaped tensors are
CheckpointError, as for InternVL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from npu.reference.blueprint import Blueprint, BlueprintError, config_int, rope_theta_of
from npu.reference.checkpoint import CheckpointError, Weights, checkpoint_files, read_config, read_safetensors

KIND_SMOLVLM = "smolvlm"
MODEL_TYPES = ("smolvlm", "idefics3")


@dataclass(frozen=True)
class SmolVisionBlueprint:
    """SigLIP-like tower + pixel shuffle + a bias-free projection (transformers' SmolVLMConnector)."""

    image_size: int
    patch: int
    hidden: int
    n_layers: int
    n_heads: int
    intermediate: int
    eps: float
    scale_factor: int  # pixel shuffle: s*s neighbouring patches become one token
    text_hidden: int

    def __post_init__(self) -> None:
        if self.image_size % self.patch or self.grid % self.scale_factor or self.hidden % self.n_heads:
            raise BlueprintError(
                f"image {self.image_size} / patch {self.patch} / scale factor {self.scale_factor}"
                " do not tile into whole tokens"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def n_image_tokens(self) -> int:
        return (self.grid // self.scale_factor) ** 2

    @property
    def connector_in(self) -> int:
        return self.hidden * self.scale_factor**2


@dataclass(frozen=True)
class SmolVLMBlueprint:
    text: Blueprint  # kind "smolvlm", vision None: the Llama decoder the layer graphs run
    vision: SmolVisionBlueprint
    image_token_id: int

    @property
    def n_image_tokens(self) -> int:
        return self.vision.n_image_tokens

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SmolVLMBlueprint:
        """Read a SmolVLM/Idefics3 config.json dict; raises BlueprintError."""
        if not is_idefics3_config(config):
            raise BlueprintError(f"not a SmolVLM/Idefics3 config (model_type={config.get('model_type')!r})")
        text = config.get("text_config") or {}
        if text.get("model_type", "llama") != "llama":
            raise BlueprintError(f"text model {text.get('model_type')!r} is not supported (SmolVLM's is Llama)")
        if text.get("attention_bias") or text.get("mlp_bias"):
            raise BlueprintError("Llama with attention or MLP biases is not supported")
        n_heads = config_int(text, "num_attention_heads")
        hidden = config_int(text, "hidden_size")
        tie = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
        text_bp = Blueprint(
            kind=KIND_SMOLVLM, hidden=hidden, n_layers=config_int(text, "num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=int(text.get("num_key_value_heads") or n_heads),
            head_dim=int(text.get("head_dim") or hidden // n_heads),
            intermediate=config_int(text, "intermediate_size"), vocab=config_int(text, "vocab_size"),
            rope_theta=rope_theta_of(text), rms_eps=float(text.get("rms_norm_eps", 1e-6)),
            tie_embeddings=tie, vision=None, template=None,
        )
        v = config.get("vision_config") or {}
        if v.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise BlueprintError(f"vision activation {v.get('hidden_act')!r} is not supported (only gelu_pytorch_tanh)")
        vision = SmolVisionBlueprint(
            image_size=int(v.get("image_size", 512)), patch=int(v.get("patch_size", 16)),
            hidden=config_int(v, "hidden_size"), n_layers=config_int(v, "num_hidden_layers"),
            n_heads=config_int(v, "num_attention_heads"), intermediate=config_int(v, "intermediate_size"),
            eps=float(v.get("layer_norm_eps", 1e-6)), scale_factor=int(config.get("scale_factor", 2)),
            text_hidden=hidden,
        )
        return cls(text=text_bp, vision=vision, image_token_id=config_int(config, "image_token_id"))


def is_idefics3_config(config: dict[str, Any]) -> bool:
    architectures = config.get("architectures") or []
    return config.get("model_type") in MODEL_TYPES or any(
        a in ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration") for a in architectures
    )


# ---------------------------------------------------------------- names

_RULES = [
    (r"model\.text_model\.embed_tokens\.weight", "embed"),
    (r"model\.text_model\.norm\.weight", "norm"),
    (r"model\.text_model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{0}.attn_norm"),
    (r"model\.text_model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{0}.mlp_norm"),
    (r"model\.text_model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", "layers.{0}.{1}.weight"),
    (r"model\.text_model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "layers.{0}.{1}.weight"),
    (r"lm_head\.weight", "lm_head"),
    (r"model\.vision_model\.embeddings\.patch_embedding\.(weight|bias)", "svision.patch.{0}"),
    (r"model\.vision_model\.embeddings\.position_embedding\.weight", "svision.pos"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)",
     "svision.layers.{0}.{1}.{2}"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "svision.layers.{0}.proj.{1}"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", "svision.layers.{0}.norm{1}.{2}"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", "svision.layers.{0}.{1}.{2}"),
    (r"model\.vision_model\.post_layernorm\.(weight|bias)", "svision.post_norm.{0}"),
    (r"model\.connector\.modality_projection\.proj\.weight", "connector.weight"),
]
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


def canonical_name(hf_name: str) -> str | None:
    for pattern, template in _RULES:
        match = re.fullmatch(pattern, hf_name)
        if match:
            return template.format(*match.groups())
    return None


def expected_shapes(bp: SmolVLMBlueprint) -> dict[str, tuple[int, ...]]:
    t, v = bp.text, bp.vision
    h, kv, q, c = t.hidden, t.kv_dim, t.q_dim, v.hidden
    shapes: dict[str, tuple[int, ...]] = {"embed": (t.vocab, h), "lm_head": (t.vocab, h), "norm": (h,)}
    for i in range(t.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm": (h,), p + "mlp_norm": (h,), p + "o.weight": (h, q)})
        shapes.update({p + "q.weight": (q, h), p + "k.weight": (kv, h), p + "v.weight": (kv, h)})
        shapes.update({p + "gate.weight": (t.intermediate, h), p + "up.weight": (t.intermediate, h)})
        shapes[p + "down.weight"] = (h, t.intermediate)
    shapes.update({"svision.patch.weight": (c, 3, v.patch, v.patch), "svision.patch.bias": (c,)})
    shapes.update({"svision.pos": (v.grid * v.grid, c), "svision.post_norm.weight": (c,), "svision.post_norm.bias": (c,)})
    for i in range(v.n_layers):
        p = f"svision.layers.{i}."
        for name in ("q", "k", "v", "proj"):
            shapes.update({p + name + ".weight": (c, c), p + name + ".bias": (c,)})
        shapes.update({p + "fc1.weight": (v.intermediate, c), p + "fc1.bias": (v.intermediate,)})
        shapes.update({p + "fc2.weight": (c, v.intermediate), p + "fc2.bias": (c,)})
        for norm in ("norm1", "norm2"):
            shapes.update({p + norm + ".weight": (c,), p + norm + ".bias": (c,)})
    shapes["connector.weight"] = (v.text_hidden, v.connector_in)
    return shapes


def load_idefics3_weights(files: list[Path], bp: SmolVLMBlueprint) -> Weights:
    """Memory-map, rename and check every tensor; zero q/k/v biases added for the shared layer graph."""
    tensors: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for path in files:
        for hf_name, array in read_safetensors(path).items():
            if _IGNORED.fullmatch(hf_name):
                continue
            name = canonical_name(hf_name)
            if name is None:
                unknown.append(hf_name)
            else:
                tensors[name] = array
    if unknown:
        raise CheckpointError(f"{len(unknown)} tensor names not understood (first: {', '.join(sorted(unknown)[:8])})")
    if "lm_head" not in tensors and "embed" in tensors:
        tensors["lm_head"] = tensors["embed"]  # tied embeddings
    want = expected_shapes(bp)
    problems = [f"missing {name}" for name in sorted(want) if name not in tensors]
    for name, array in sorted(tensors.items()):
        if name not in want:
            problems.append(f"unexpected {name}")
        elif tuple(array.shape) != want[name]:
            problems.append(f"{name} has shape {list(array.shape)}, config says {list(want[name])}")
    if problems:
        raise CheckpointError(f"checkpoint does not match its config.json: {'; '.join(problems[:8])}")
    t = bp.text
    for i in range(t.n_layers):
        for part, width in (("q", t.q_dim), ("k", t.kv_dim), ("v", t.kv_dim)):
            tensors[f"layers.{i}.{part}.bias"] = np.zeros(width, np.float32)  # Llama: no bias
    return Weights(tensors)


def load_idefics3_checkpoint(directory: Path) -> tuple[SmolVLMBlueprint, Weights]:
    """Blueprint and canonical weights of a SmolVLM/Idefics3 checkpoint directory."""
    blueprint = SmolVLMBlueprint.from_config(read_config(directory))
    return blueprint, load_idefics3_weights(checkpoint_files(Path(directory)), blueprint)
