"""Blueprint: the frozen dimensions of a model, read from a Hugging Face config.json.

Three config dialects are understood:

- transformers-native InternVL (`model_type: internvl`): `text_config`, `vision_config`,
  `downsample_ratio`, `vision_feature_layer`;
- the original OpenGVLab `InternVLChatModel`: `llm_config`, `vision_config`,
  `force_image_size`, `downsample_ratio`, `select_layer`, `ps_version`, `template`;
- a text-only `Qwen2ForCausalLM` (no vision);
- transformers' `Qwen3VLForConditionalGeneration` (`model_type: qwen3_vl`): a Qwen3 decoder
  (q_norm/k_norm, no q/k/v bias) with interleaved M-RoPE (`mrope_section`) and the
  Qwen3-VL vision tower (`Qwen3VisionBlueprint`; computed in npu/reference/qwen3_vision.py).

Only plain RoPE and GELU vision/projector activations are supported (the InternVL2
family); anything else raises `BlueprintError` rather than computing something else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KIND_INTERNVL_NATIVE = "internvl-native"
KIND_INTERNVL_ORIGINAL = "internvl-original"
KIND_QWEN2 = "qwen2"
KIND_QWEN3_VL = "qwen3-vl"


class BlueprintError(ValueError):
    """A config.json this runtime cannot serve (unknown architecture or unsupported option)."""


@dataclass(frozen=True)
class VisionBlueprint:
    image_size: int  # square input side in pixels
    patch: int
    hidden: int
    n_layers: int  # layers in the checkpoint
    n_heads: int
    intermediate: int
    norm: str  # "layer_norm" | "rms_norm"
    eps: float
    qk_norm: bool
    downsample_ratio: float
    select_layer: int  # -1 = last layer's output (hidden_states index, embeddings at 0)
    ps_version: str  # "v2": InternVL2's pixel-shuffle layout
    text_hidden: int  # projector output

    def __post_init__(self) -> None:
        if self.norm not in ("layer_norm", "rms_norm"):
            raise BlueprintError(f"vision norm_type {self.norm!r} is not supported")
        whole_ratio = abs(1 / self.shuffle - self.downsample_ratio) < 1e-9
        if self.image_size % self.patch or self.grid % self.shuffle or not whole_ratio:
            raise BlueprintError(
                f"image {self.image_size} / patch {self.patch} / downsample {self.downsample_ratio}"
                " do not tile into whole tokens"
            )
        if not 1 <= self.n_layers_used <= self.n_layers:
            raise BlueprintError(f"select_layer {self.select_layer} is out of range for {self.n_layers} layers")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def shuffle(self) -> int:
        """Pixel-shuffle factor s = 1/downsample_ratio: s*s neighbouring patches become one token."""
        return round(1 / self.downsample_ratio)

    @property
    def n_image_tokens(self) -> int:
        return (self.grid // self.shuffle) ** 2

    @property
    def projector_in(self) -> int:
        return self.hidden * self.shuffle**2

    @property
    def n_layers_used(self) -> int:
        """How many encoder layers produce the selected hidden state."""
        return self.select_layer if self.select_layer >= 0 else self.n_layers + 1 + self.select_layer


@dataclass(frozen=True)
class Blueprint:
    kind: str  # KIND_*
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    vision: VisionBlueprint | None
    template: str | None  # config["template"], e.g. "Hermes-2"
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    mrope_section: tuple[int, ...] | None = None  # Qwen3-VL: frequencies per t/h/w, interleaved
    qwen3_vision: Qwen3VisionBlueprint | None = None

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def n_image_tokens(self) -> int:
        if self.qwen3_vision is not None:
            return self.qwen3_vision.n_image_tokens
        return self.vision.n_image_tokens if self.vision else 0

    @property
    def family(self) -> str:
        """The model family (npu/families/) these graphs are built as."""
        return "qwen3_vl" if self.kind == KIND_QWEN3_VL else "internvl"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Blueprint:
        """Read a config.json dict (any of the three dialects); raises BlueprintError."""
        kind = detect_kind(config)
        if kind == KIND_QWEN3_VL:
            return _qwen3_vl(config)
        if kind == KIND_INTERNVL_NATIVE:
            text, vision = config.get("text_config") or {}, _native_vision(config)
        elif kind == KIND_INTERNVL_ORIGINAL:
            text, vision = config.get("llm_config") or {}, _original_vision(config)
        else:
            text, vision = config, None
        _check_qwen2(text)
        tie = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
        n_heads = config_int(text, "num_attention_heads")
        hidden = config_int(text, "hidden_size")
        return cls(
            kind=kind,
            hidden=hidden,
            n_layers=config_int(text, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=int(text.get("num_key_value_heads") or n_heads),
            head_dim=int(text.get("head_dim") or hidden // n_heads),
            intermediate=config_int(text, "intermediate_size"),
            vocab=config_int(text, "vocab_size"),
            rope_theta=rope_theta_of(text),
            rms_eps=float(text.get("rms_norm_eps", 1e-6)),
            tie_embeddings=tie,
            vision=vision,
            template=config.get("template"),
        )


def detect_kind(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    if config.get("model_type") == "internvl" or "InternVLForConditionalGeneration" in architectures:
        return KIND_INTERNVL_NATIVE
    if "InternVLChatModel" in architectures or "llm_config" in config:
        return KIND_INTERNVL_ORIGINAL
    if config.get("model_type") == "qwen2" or "Qwen2ForCausalLM" in architectures:
        return KIND_QWEN2
    if config.get("model_type") == "qwen3_vl" or "Qwen3VLForConditionalGeneration" in architectures:
        return KIND_QWEN3_VL
    raise BlueprintError(
        f"unsupported model: model_type={config.get('model_type')!r} architectures={architectures}"
        " (expected InternVL2, Qwen2ForCausalLM or Qwen3VLForConditionalGeneration)"
    )


def _check_qwen2(text: dict[str, Any]) -> None:
    """The decoder graphs are Qwen2's: InternVL2-2B/8B (InternLM2) or -4B (Phi-3) are refused here."""
    model_type = text.get("model_type")
    architectures = text.get("architectures") or []
    if model_type not in (None, "qwen2") or any(a != "Qwen2ForCausalLM" for a in architectures):
        raise BlueprintError(
            f"language model {architectures or model_type} is not supported (only Qwen2 decoders:"
            " InternVL2-1B, InternVL2.5-1B, InternVL3-1B/2B, Qwen2)"
        )


def config_int(section: dict[str, Any], key: str) -> int:
    """`section[key]` as an int; BlueprintError naming the key when config.json lacks it."""
    if key not in section:
        raise BlueprintError(f"config.json lacks {key!r}")
    return int(section[key])


def rope_theta_of(text: dict[str, Any]) -> float:
    """The text model's RoPE base; BlueprintError for any RoPE but the plain one."""
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise BlueprintError(f"RoPE type {rope_type!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", text.get("rope_theta", 10000.0)))


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise BlueprintError(f"non-square {what} {list(value)} is not supported")
        value = value[0]
    return int(value)


def _check_gelu(*acts: str | None) -> None:
    for act in acts:
        if act not in (None, "gelu"):
            raise BlueprintError(f"activation {act!r} is not supported in the vision path (only exact gelu)")


def _native_vision(config: dict[str, Any]) -> VisionBlueprint:
    v = config.get("vision_config") or {}
    text_hidden = config_int(config.get("text_config") or {}, "hidden_size")
    _check_gelu(v.get("hidden_act"), config.get("projector_hidden_act"))
    layer = config.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise BlueprintError(f"vision_feature_layer {layer!r}: only a single layer is supported")
    if config.get("vision_feature_select_strategy", "default") != "default":
        raise BlueprintError("only vision_feature_select_strategy 'default' (drop CLS) is supported")
    return VisionBlueprint(
        image_size=_square(v.get("image_size", 448), "image_size"),
        patch=_square(v.get("patch_size", 14), "patch_size"),
        hidden=config_int(v, "hidden_size"),
        n_layers=config_int(v, "num_hidden_layers"),
        n_heads=config_int(v, "num_attention_heads"),
        intermediate=config_int(v, "intermediate_size"),
        norm=v.get("norm_type", "layer_norm"),
        eps=float(v.get("layer_norm_eps", 1e-6)),
        qk_norm=bool(v.get("use_qk_norm", False)),
        downsample_ratio=float(config.get("downsample_ratio", 0.5)),
        select_layer=layer,
        ps_version="v2",
        text_hidden=text_hidden,
    )


def _original_vision(config: dict[str, Any]) -> VisionBlueprint:
    v = config.get("vision_config") or {}
    text_hidden = config_int(config.get("llm_config") or {}, "hidden_size")
    _check_gelu(v.get("hidden_act"))
    ps_version = config.get("ps_version", "v1")
    if ps_version != "v2":
        raise BlueprintError(f"ps_version {ps_version!r} is not supported (InternVL2 uses 'v2')")
    size = config.get("force_image_size") or v.get("image_size", 448)
    return VisionBlueprint(
        image_size=_square(size, "image_size"),
        patch=_square(v.get("patch_size", 14), "patch_size"),
        hidden=config_int(v, "hidden_size"),
        n_layers=config_int(v, "num_hidden_layers"),
        n_heads=config_int(v, "num_attention_heads"),
        intermediate=config_int(v, "intermediate_size"),
        norm=v.get("norm_type", "rms_norm"),
        eps=float(v.get("layer_norm_eps", 1e-6)),
        qk_norm=bool(v.get("qk_normalization", False)),
        downsample_ratio=float(config.get("downsample_ratio", 0.5)),
        select_layer=int(config.get("select_layer", -1)),
        ps_version=ps_version,
        text_hidden=text_hidden,
    )


def _qwen3_vl(config: dict[str, Any]) -> Blueprint:
    """Qwen3VLForConditionalGeneration: its text_config and vision_config."""
    text = config.get("text_config") or {}
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    section = params.get("mrope_section")
    if params.get("rope_type", "default") != "default" or not section:
        raise BlueprintError(f"Qwen3-VL RoPE {params}: expected the default type with an mrope_section")
    if text.get("attention_bias"):
        raise BlueprintError("Qwen3-VL with attention biases is not supported")
    n_heads, hidden = config_int(text, "num_attention_heads"), config_int(text, "hidden_size")
    head_dim = int(text.get("head_dim") or hidden // n_heads)
    if sum(section) != head_dim // 2:
        raise BlueprintError(f"mrope_section {section} does not cover head_dim/2 = {head_dim // 2} frequencies")
    return Blueprint(
        kind=KIND_QWEN3_VL, hidden=hidden, n_layers=config_int(text, "num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=int(text.get("num_key_value_heads") or n_heads), head_dim=head_dim,
        intermediate=config_int(text, "intermediate_size"), vocab=config_int(text, "vocab_size"),
        rope_theta=float(params.get("rope_theta", text.get("rope_theta", 10000.0))),
        rms_eps=float(text.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        vision=None, template=config.get("template"), qk_norm=True, mrope_section=tuple(int(x) for x in section),
        qwen3_vision=qwen3_vision_blueprint(config.get("vision_config") or {}, hidden),
    )


# The side of the square image the reference vision graph takes: the M5Stack packages' 384
# (StackFlow d9084ba mode_qwen3-vl-2B-Int4-*.json vision_config.height/width), or less when the
# checkpoint's learned position grid covers less (tiny test checkpoints).
QWEN3_VL_IMAGE_SIDE = 384


@dataclass(frozen=True)
class Qwen3VisionBlueprint:
    hidden: int
    depth: int
    n_heads: int
    intermediate: int
    out_hidden: int  # the text model's hidden size
    patch: int
    merge: int
    temporal: int
    pos_side: int  # the learned position grid is pos_side x pos_side
    deepstack: tuple[int, ...]  # vision blocks whose output feeds a deepstack merger
    act: str  # the blocks' MLP activation: "gelu_pytorch_tanh" or "gelu"
    rope_theta: float
    image_size: int  # the graph's square input side in pixels

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    @property
    def n_image_tokens(self) -> int:
        return self.n_patches // (self.merge * self.merge)


def qwen3_vision_blueprint(vision: dict[str, Any], text_hidden: int) -> Qwen3VisionBlueprint:
    patch, merge = int(vision.get("patch_size", 16)), int(vision.get("spatial_merge_size", 2))
    n_pos = int(vision.get("num_position_embeddings", 2304))
    pos_side = int(round(n_pos**0.5))
    if pos_side * pos_side != n_pos:
        raise BlueprintError(f"num_position_embeddings {n_pos} is not a square grid")
    step = patch * merge
    side = min(QWEN3_VL_IMAGE_SIDE, pos_side * patch) // step * step
    act = vision.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu"):
        raise BlueprintError(f"Qwen3-VL vision activation {act!r} is not supported")
    rope = vision.get("rope_parameters") or {}
    if int(vision.get("temporal_patch_size", 2)) != 2 or side < step:
        raise BlueprintError("Qwen3-VL vision needs temporal_patch_size 2 and a position grid of at least one block")
    if int(vision.get("out_hidden_size", text_hidden)) != text_hidden:
        raise BlueprintError("the vision out_hidden_size must equal the text hidden_size")
    return Qwen3VisionBlueprint(
        hidden=config_int(vision, "hidden_size"), depth=config_int(vision, "depth"), n_heads=config_int(vision, "num_heads"),
        intermediate=config_int(vision, "intermediate_size"), out_hidden=text_hidden, patch=patch, merge=merge,
        temporal=2, pos_side=pos_side, deepstack=tuple(int(i) for i in vision.get("deepstack_visual_indexes", ())),
        act=act, rope_theta=float(rope.get("rope_theta", 10000.0)), image_size=side)
