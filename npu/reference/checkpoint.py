"""Hugging Face checkpoints -> canonical numpy weights. The only module that knows HF names.

`load_checkpoint(directory)` reads config.json (-> `Blueprint`) and the safetensors
files (one `model.safetensors`, or shards listed in `model.safetensors.index.json`),
memory-mapped: tensors stay on disk in their stored dtype (bf16 as
`ml_dtypes.bfloat16`) until a caller converts them.

Both InternVL namings map to one canonical set, as do text-only Qwen2 checkpoints:

    embed [vocab, hidden]          lm_head [vocab, hidden] (= embed when tied)   norm [hidden]
    layers.{i}.attn_norm / mlp_norm [hidden]
    layers.{i}.{q,k,v}.weight [out, hidden], .bias [out]   layers.{i}.o.weight [hidden, q_dim]
    layers.{i}.{gate,up}.weight [intermediate, hidden]     layers.{i}.down.weight [hidden, intermediate]
    vision.cls [C]   vision.pos [grid*grid+1, C]   vision.patch.weight [C, 3, p, p], .bias [C]
    vision.layers.{i}.{norm1,norm2}.weight/.bias  {q,k,v,proj,fc1,fc2}.weight/.bias  ls1, ls2 [C]
    vision.layers.{i}.{q_norm,k_norm}.weight (qk-norm models)   vision.post_norm.weight/.bias (optional)
    projector.norm.weight/.bias   projector.fc1.weight/.bias   projector.fc2.weight/.bias

Linear weights keep the HF [out, in] layout. The original fused vision `attn.qkv` is split
into q, k, v rows (views, no copy). Unknown tensor names are an error, so a renamed
checkpoint fails loudly instead of running with a missing piece.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from npu.reference.blueprint import Blueprint

_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded (files, names or shapes), with the reason."""


@dataclass
class Weights:
    """Canonical name -> array in its stored dtype (read-only, usually a memory map)."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray | None:
        return self.tensors.get(name)

    def f32(self, name: str) -> np.ndarray:
        """A float32 copy of one tensor."""
        return np.array(self.tensors[name], dtype=np.float32)  # always a copy, converted once

    def names(self) -> list[str]:
        return sorted(self.tensors)


# ---------------------------------------------------------------- safetensors


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map one .safetensors file: name -> read-only array view (bf16 as ml_dtypes)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if raw.size < 8:
        raise CheckpointError(f"{path}: not a safetensors file (too short)")
    header_len = int(raw[:8].view("<u8")[0])
    try:
        header = json.loads(bytes(raw[8 : 8 + header_len]))
    except ValueError as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    data = raw[8 + header_len :]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data.size:
            raise CheckpointError(f"{path}: tensor {name} lies outside the file (truncated download?)")
        out[name] = data[begin:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, shards in index order."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{directory}: no .safetensors weights (pytorch .bin checkpoints are not supported)")
    return found


# ---------------------------------------------------------------- name mapping

_TEXT = [
    (r"embed_tokens\.weight", "embed"),
    (r"norm\.weight", "norm"),
    (r"layers\.(\d+)\.input_layernorm\.weight", "layers.{0}.attn_norm"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{0}.mlp_norm"),
    (r"layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)", "layers.{0}.{1}.{2}"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "layers.{0}.{1}.weight"),
    (r"layers\.(\d+)\.self_attn\.([qk]_norm)\.weight", "layers.{0}.{1}"),  # Qwen3
]
# Qwen3VLForConditionalGeneration's vision tower (transformers' Qwen3VLVisionModel names).
_VISION_QWEN3 = [
    (r"patch_embed\.proj\.(weight|bias)", "vision.patch.{0}"),
    (r"pos_embed\.weight", "vision.pos"),
    (r"blocks\.(\d+)\.(norm[12])\.(weight|bias)", "vision.layers.{0}.{1}.{2}"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", "vision.layers.{0}.{1}.{2}"),
    (r"blocks\.(\d+)\.mlp\.linear_(fc[12])\.(weight|bias)", "vision.layers.{0}.{1}.{2}"),
    (r"merger\.norm\.(weight|bias)", "vision.merger.norm.{0}"),
    (r"merger\.linear_(fc[12])\.(weight|bias)", "vision.merger.{0}.{1}"),
    (r"deepstack_merger_list\.(\d+)\.norm\.(weight|bias)", "vision.deepstack.{0}.norm.{1}"),
    (r"deepstack_merger_list\.(\d+)\.linear_(fc[12])\.(weight|bias)", "vision.deepstack.{0}.{1}.{2}"),
]
_VISION_NATIVE = [
    (r"embeddings\.cls_token", "vision.cls"),
    (r"embeddings\.position_embeddings", "vision.pos"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", "vision.patch.{0}"),
    (r"encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", "vision.layers.{0}.{1}.{2}"),
    (r"encoder\.layer\.(\d+)\.attention\.projection_layer\.(weight|bias)", "vision.layers.{0}.proj.{1}"),
    (r"encoder\.layer\.(\d+)\.attention\.([qk]_norm)\.weight", "vision.layers.{0}.{1}.weight"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", "vision.layers.{0}.norm1.{1}"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", "vision.layers.{0}.norm2.{1}"),
    (r"encoder\.layer\.(\d+)\.lambda_([12])", "vision.layers.{0}.ls{1}"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", "vision.layers.{0}.{1}.{2}"),
    (r"layernorm\.(weight|bias)", "vision.post_norm.{0}"),
]
_VISION_ORIGINAL = [
    (r"embeddings\.class_embedding", "vision.cls"),
    (r"embeddings\.position_embedding", "vision.pos"),
    (r"embeddings\.patch_embedding\.(weight|bias)", "vision.patch.{0}"),
    (r"encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)", "vision.layers.{0}.qkv.{1}"),
    (r"encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)", "vision.layers.{0}.proj.{1}"),
    (r"encoder\.layers\.(\d+)\.attn\.([qk]_norm)\.weight", "vision.layers.{0}.{1}.weight"),
    (r"encoder\.layers\.(\d+)\.(norm[12])\.(weight|bias)", "vision.layers.{0}.{1}.{2}"),
    (r"encoder\.layers\.(\d+)\.(ls[12])", "vision.layers.{0}.{1}"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", "vision.layers.{0}.{1}.{2}"),
]
_PROJECTOR_NATIVE = [
    (r"layer_norm\.(weight|bias)", "projector.norm.{0}"),
    (r"linear_([12])\.(weight|bias)", "projector.fc{0}.{1}"),
]
_PROJECTOR_ORIGINAL = [
    (r"0\.(weight|bias)", "projector.norm.{0}"),
    (r"1\.(weight|bias)", "projector.fc1.{0}"),
    (r"3\.(weight|bias)", "projector.fc2.{0}"),
]
# (HF prefix, rule table); the first prefix that matches decides. `None` = ignore.
_PREFIXES = [
    ("model.language_model.", _TEXT),
    ("language_model.model.", _TEXT),
    ("model.visual.", _VISION_QWEN3),
    ("model.vision_tower.", _VISION_NATIVE),
    ("vision_tower.", _VISION_NATIVE),
    ("model.multi_modal_projector.", _PROJECTOR_NATIVE),
    ("multi_modal_projector.", _PROJECTOR_NATIVE),
    ("vision_model.", _VISION_ORIGINAL),
    ("mlp1.", _PROJECTOR_ORIGINAL),
    ("model.", _TEXT),
]
_LM_HEAD = ("lm_head.weight", "language_model.lm_head.weight")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


def canonical_name(hf_name: str) -> str | None:
    """The canonical name for one HF tensor name, or None when no rule knows it."""
    if hf_name in _LM_HEAD:
        return "lm_head"
    for prefix, rules in _PREFIXES:
        if hf_name.startswith(prefix):
            rest = hf_name[len(prefix) :]
            for pattern, template in rules:
                match = re.fullmatch(pattern, rest)
                if match:
                    return template.format(*match.groups())
            return None
    return None


def _add_tensor(weights: dict[str, np.ndarray], name: str, array: np.ndarray) -> None:
    if name.endswith(".qkv.weight") or name.endswith(".qkv.bias"):
        # InternViT's fused projection: rows are [q; k; v], each a third.
        stem, kind = name.rsplit(".qkv.", 1)
        third = array.shape[0] // 3
        for i, part in enumerate("qkv"):
            weights[f"{stem}.{part}.{kind}"] = array[i * third : (i + 1) * third]
        return
    if name == "vision.cls":
        array = array.reshape(-1)  # (1, 1, C) -> (C,)
    elif name == "vision.pos":
        array = array.reshape(-1, array.shape[-1])  # (1, N+1, C) -> (N+1, C)
    weights[name] = array


def load_weights(files: list[Path]) -> Weights:
    """Memory-map and rename every tensor of `files`; unknown names raise CheckpointError."""
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
                _add_tensor(tensors, name, array)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8])
        raise CheckpointError(f"{len(unknown)} tensor names not understood (first: {shown})")
    if "lm_head" not in tensors and "embed" in tensors:
        tensors["lm_head"] = tensors["embed"]  # tied embeddings
    return Weights(tensors)


def expected_shapes(bp: Blueprint) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, optional) canonical names -> shapes for a blueprint."""
    h, kv, q = bp.hidden, bp.kv_dim, bp.q_dim
    req: dict[str, tuple[int, ...]] = {"embed": (bp.vocab, h), "lm_head": (bp.vocab, h), "norm": (h,)}
    opt: dict[str, tuple[int, ...]] = {}
    for i in range(bp.n_layers):
        p = f"layers.{i}."
        req.update({p + "attn_norm": (h,), p + "mlp_norm": (h,), p + "o.weight": (h, q)})
        req.update({p + "q.weight": (q, h), p + "k.weight": (kv, h), p + "v.weight": (kv, h)})
        if bp.qk_norm:  # Qwen3: per-head q/k norms, no q/k/v biases
            req.update({p + "q_norm": (bp.head_dim,), p + "k_norm": (bp.head_dim,)})
        else:
            req.update({p + "q.bias": (q,), p + "k.bias": (kv,), p + "v.bias": (kv,)})
        req.update({p + "gate.weight": (bp.intermediate, h), p + "up.weight": (bp.intermediate, h)})
        req[p + "down.weight"] = (h, bp.intermediate)
        opt[p + "o.bias"] = (h,)
    if bp.vision is not None:
        _vision_shapes(bp, req, opt)
    if bp.qwen3_vision is not None:
        _qwen3_vision_shapes(bp.qwen3_vision, req)
    return req, opt


def _qwen3_vision_shapes(v, req: dict) -> None:
    c, wide = v.hidden, v.hidden * v.merge * v.merge
    req.update({"vision.patch.weight": (c, 3, v.temporal, v.patch, v.patch), "vision.patch.bias": (c,),
                "vision.pos": (v.pos_side * v.pos_side, c)})
    for i in range(v.depth):
        p = f"vision.layers.{i}."
        for name in ("q", "k", "v", "proj"):
            req.update({p + name + ".weight": (c, c), p + name + ".bias": (c,)})
        req.update({p + "fc1.weight": (v.intermediate, c), p + "fc1.bias": (v.intermediate,),
                    p + "fc2.weight": (c, v.intermediate), p + "fc2.bias": (c,)})
        for norm in ("norm1", "norm2"):
            req.update({p + norm + ".weight": (c,), p + norm + ".bias": (c,)})
    for p, norm_width in [("vision.merger.", c)] + [(f"vision.deepstack.{j}.", wide) for j in range(len(v.deepstack))]:
        req.update({p + "norm.weight": (norm_width,), p + "norm.bias": (norm_width,), p + "fc1.weight": (wide, wide),
                    p + "fc1.bias": (wide,), p + "fc2.weight": (v.out_hidden, wide), p + "fc2.bias": (v.out_hidden,)})


def _vision_shapes(bp: Blueprint, req: dict, opt: dict) -> None:
    v = bp.vision
    c = v.hidden
    req.update({"vision.cls": (c,), "vision.pos": (v.grid * v.grid + 1, c)})
    req.update({"vision.patch.weight": (c, 3, v.patch, v.patch), "vision.patch.bias": (c,)})
    opt.update({"vision.post_norm.weight": (c,), "vision.post_norm.bias": (c,)})
    for i in range(v.n_layers):
        p = f"vision.layers.{i}."
        for name in ("q", "k", "v", "proj"):
            req[p + name + ".weight"] = (c, c)
            opt[p + name + ".bias"] = (c,)
        req.update({p + "fc1.weight": (v.intermediate, c), p + "fc2.weight": (c, v.intermediate)})
        req.update({p + "fc1.bias": (v.intermediate,), p + "fc2.bias": (c,), p + "ls1": (c,), p + "ls2": (c,)})
        req.update({p + "norm1.weight": (c,), p + "norm2.weight": (c,)})
        table = req if v.norm == "layer_norm" else opt
        table.update({p + "norm1.bias": (c,), p + "norm2.bias": (c,)})
        table = req if v.qk_norm else opt
        table.update({p + "q_norm.weight": (c,), p + "k_norm.weight": (c,)})
    d = v.projector_in
    req.update({"projector.norm.weight": (d,), "projector.norm.bias": (d,)})
    req.update({"projector.fc1.weight": (v.text_hidden, d), "projector.fc1.bias": (v.text_hidden,)})
    req.update({"projector.fc2.weight": (v.text_hidden, v.text_hidden), "projector.fc2.bias": (v.text_hidden,)})


def check_weights(bp: Blueprint, weights: Weights) -> None:
    """Raise CheckpointError unless every required tensor is present with its shape, and nothing else."""
    required, optional = expected_shapes(bp)
    problems = [f"missing {name}" for name in sorted(required) if name not in weights]
    for name in weights.names():
        want = required.get(name, optional.get(name))
        if want is None:
            problems.append(f"unexpected {name}")
        elif tuple(weights[name].shape) != want:
            problems.append(f"{name} has shape {list(weights[name].shape)}, config says {list(want)}")
    if problems:
        raise CheckpointError(f"checkpoint does not match its config.json: {'; '.join(problems[:8])}")


def read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
    return json.loads(path.read_text())


def load_checkpoint(directory: Path) -> tuple[Blueprint, Weights]:
    """Blueprint and canonical weights of a HF checkpoint directory (see module docstring)."""
    blueprint = Blueprint.from_config(read_config(directory))
    weights = load_weights(checkpoint_files(Path(directory)))
    check_weights(blueprint, weights)
    return blueprint, weights
