"""SmolVLM's compiled graphs in numpy: vision (SigLIP-like tower + connector), Llama layers, post.

What the published packages hold (sources cited per fact):

- vision graph (StackFlow d9084ba `main_vlm/models/mode_smolvlm-256M-ax630c.json`:
  `SmolVLM-256M-Instruct_vision_nhwc.axmodel`; `runner/LLM.hpp` reads the input's height and
  width from `vShape[1]`, `vShape[2]`, memcpys resized RGB uint8 HWC into input 0 and reads
  output 0 as float32): input `pixel_values` uint8 NHWC [1, H, W, 3], normalised inside the
  graph ((x - 127.5) / 127.5: calibration mean/std 127.5 in the AXERA export's
  `model_convert/config.json`, nnn112358/SmolVLM-256M-Instruct.axera 4b0bfff); output
  `last_hidden_state` float32 [1, n_image_tokens, text_hidden]: the tower, its
  post-layernorm AND the connector (pixel shuffle + projection), as the export moves the
  connector into the vision model (`modeling_idefics3_export.py` forward_export, same commit;
  names from its `export.py`).
- layer i (`llama_p128_l%d_together.axmodel`, mode files above): `K_cache`, `V_cache`, `indices`,
  `input`, `mask` -> `K_cache_out`, `V_cache_out`, `output`, in the same shape groups as every
  llm_build package. `indices` is one row of positions, uint32 [1, chunk] in prefill and [1, 1]
  in decode: StackFlow runs these packages with its `LLM` runner (main.cpp: the vision file
  is named under `filename_vpm_resampler_axmodedl`, and the default encoder name holds "vpm"),
  which reads the chunk from `get_input(prefill_grpid, "indices").vShape[1]` (LLM.hpp `Init`),
  so the prefill indices are 2-D; AXERA's SmolVLM runner feeds (1, prefill_len) and (1, 1)
  (nnn112358/SmolVLM-256M-Instruct.axera 4b0bfff python/infer_axmodel.py).
- post (`llama_post.axmodel`): final RMSNorm + lm_head.

Inside the vision graph (transformers 5.25 `models/smolvlm/modeling_smolvlm.py`): 16x16 (patch)
conv -> + position embedding (ids by transformers' bucketized fractional coordinates, the
identity for a full square image, computed the same way here) -> encoder layers (LayerNorm,
MHA with biases, residual; LayerNorm, fc1, tanh GELU, fc2, residual) -> post LayerNorm ->
pixel shuffle (view (h, w/s, C s), swap, reshape (w/s, h/s, C s^2), swap back) -> Linear without
bias. Everything float32 inside; the precision only sets the layer and post boundaries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from npu.families import ModelFamily
from npu.families.smolvlm import SMOLVLM
from npu.reference import ops
from npu.reference.checkpoint import Weights
from npu.reference.graphs import (
    PRECISIONS, LayerSession, PostSession, ReferenceGraphs, ReferenceSession, _history_lengths, _layer_groups,
)
from npu.reference.idefics3 import SmolVisionBlueprint, SmolVLMBlueprint, load_idefics3_checkpoint
from npu.session import TensorSpec

F32 = np.float32
U32 = np.dtype(np.uint32)
VISION_INPUT = "pixel_values"
VISION_OUTPUT = "last_hidden_state"
_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """transformers' gelu_pytorch_tanh in float32, in place."""
    inner = x * x
    inner *= F32(0.044715)
    inner += F32(1.0)
    inner *= x
    inner *= F32(_GELU_C)
    np.tanh(inner, out=inner)
    inner += F32(1.0)
    x *= F32(0.5)
    x *= inner
    return x


def patch_position_ids(side: int) -> np.ndarray:
    """The position-embedding rows transformers picks for a full side x side patch grid.

    SmolVLMVisionEmbeddings bucketizes fractional coordinates i * (1/side) (float32) against
    boundaries arange(1/side, 1, 1/side); done here with the same float32 values.
    """
    step = np.float32(1.0) / np.float32(side)
    count = math.ceil((1.0 - 1.0 / side) / (1.0 / side))
    boundaries = (1.0 / side + np.arange(count, dtype=np.float64) * (1.0 / side)).astype(F32)
    coords = np.minimum(np.arange(side, dtype=F32) * step, F32(1.0 - 1e-6))
    buckets = np.searchsorted(boundaries, coords, side="right")  # torch.bucketize(right=True)
    return (buckets[:, None] * side + buckets[None, :]).reshape(-1)  # (side*side,)


def pixel_shuffle(x: np.ndarray, scale: int) -> np.ndarray:
    """SmolVLMConnector.pixel_shuffle of (seq, C) patches -> (seq / s^2, C s^2), same view order.

    It amounts to: each s x s block of patches one token, tokens row-major, channels in
    (row in block, column in block, C) order (tests/test_smolvlm_reference.py checks both).
    """
    seq, c = x.shape
    side = math.isqrt(seq)
    y = x.reshape(side, side // scale, c * scale)  # (h, w/s, C s)
    y = y.transpose(1, 0, 2).reshape(side // scale, side // scale, c * scale * scale)  # (w/s, h/s, C s^2)
    y = y.transpose(1, 0, 2)  # (h/s, w/s, C s^2)
    return np.ascontiguousarray(y).reshape(-1, c * scale * scale)


def _linear(weights: Weights, name: str) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(weights.f32(name + ".weight").T), weights.f32(name + ".bias")


class SmolVisionEncoder:
    """uint8 RGB [H, W, 3] at the graph's size -> float32 [n_image_tokens, text_hidden]."""

    def __init__(self, v: SmolVisionBlueprint, weights: Weights):
        self.bp = v
        c = v.hidden
        self.patch_w = np.ascontiguousarray(weights.f32("svision.patch.weight").reshape(c, -1).T)  # (3*p*p, C)
        self.patch_b = weights.f32("svision.patch.bias")
        self.pos = weights.f32("svision.pos")[patch_position_ids(v.grid)]  # (grid*grid, C)
        self.layers = []
        for i in range(v.n_layers):
            p = f"svision.layers.{i}."
            qkv = [_linear(weights, p + x) for x in "qkv"]
            self.layers.append({
                "qkv_w": np.concatenate([w for w, _ in qkv], axis=1),  # (C, 3C)
                "qkv_b": np.concatenate([b for _, b in qkv]),  # (3C,)
                "proj": _linear(weights, p + "proj"), "fc1": _linear(weights, p + "fc1"),
                "fc2": _linear(weights, p + "fc2"),
                "norm1": (weights.f32(p + "norm1.weight"), weights.f32(p + "norm1.bias")),
                "norm2": (weights.f32(p + "norm2.weight"), weights.f32(p + "norm2.bias")),
            })
        self.post_norm = (weights.f32("svision.post_norm.weight"), weights.f32("svision.post_norm.bias"))
        self.connector = np.ascontiguousarray(weights.f32("connector.weight").T)  # (C s^2, text_hidden)
        n = v.grid * v.grid
        self._normed = np.empty((n, c), F32)  # (patches, C)

    def forward(self, image: np.ndarray) -> np.ndarray:
        pixels = image.astype(F32) * F32(1 / 255)  # transformers' rescale, then normalise with 0.5 / 0.5
        pixels -= F32(0.5)
        pixels /= F32(0.5)
        v = self.bp
        p, g = v.patch, v.grid
        patches = pixels.reshape(g, p, g, p, 3).transpose(0, 2, 4, 1, 3).reshape(g * g, 3 * p * p)  # (c, ky, kx)
        x = patches @ self.patch_w  # (patches, C)
        x += self.patch_b
        x += self.pos
        for layer in self.layers:
            self._layer(layer, x)
        ops.layer_norm(x, *self.post_norm, v.eps, out=x)
        return pixel_shuffle(x, v.scale_factor) @ self.connector  # (n_image_tokens, text_hidden)

    def _layer(self, layer: dict, x: np.ndarray) -> None:
        v = self.bp
        n, c = x.shape
        normed = ops.layer_norm(x, *layer["norm1"], v.eps, out=self._normed)
        qkv = normed @ layer["qkv_w"]  # (patches, 3C)
        qkv += layer["qkv_b"]
        heads = (n, v.n_heads, c // v.n_heads)
        q, k, val = (qkv[:, i * c : (i + 1) * c].reshape(heads) for i in range(3))
        context = ops.attention(q, k, val, None)  # (patches, C)
        w, b = layer["proj"]
        x += context @ w + b
        normed = ops.layer_norm(x, *layer["norm2"], v.eps, out=self._normed)
        w1, b1 = layer["fc1"]
        hidden = gelu_tanh(normed @ w1 + b1)  # (patches, intermediate)
        w2, b2 = layer["fc2"]
        x += hidden @ w2 + b2


class SmolVisionSession(ReferenceSession):
    def __init__(self, bp: SmolVLMBlueprint, weights: Weights):
        v = bp.vision
        self.encoder = SmolVisionEncoder(v, weights)
        image = TensorSpec(VISION_INPUT, (1, v.image_size, v.image_size, 3), np.dtype(np.uint8))
        features = TensorSpec(VISION_OUTPUT, (1, v.n_image_tokens, v.text_hidden), np.dtype(F32))
        super().__init__("vision", [[image]], [[features]])

    def _compute(self, feed, group, outputs):
        outputs[0][0] = self.encoder.forward(feed[VISION_INPUT][0])


class SmolVLMGraphs(ReferenceGraphs):
    """Reference graphs of a SmolVLM checkpoint: the SmolVLM family (npu/families/smolvlm.py)."""

    @property
    def family(self) -> ModelFamily:
        return SMOLVLM


def build_smolvlm_sessions(
    source: str | Path | tuple[SmolVLMBlueprint, Weights],
    precision: str = "bf16",
    kv_capacity: int = 1023,
    prefill_chunk: int = 128,
    history_groups: int = 0,
    history_lengths: Sequence[int] | None = None,
    placeholder: str = "hidden",
) -> SmolVLMGraphs:
    """Reference graphs of a SmolVLM checkpoint with the published packages' names and shapes.

    Groups as `build_reference_sessions`: 0 decode, 1 first chunk, then one per history
    length (`history_lengths`, or `history_groups` of them: chunk, 2 * chunk, ...).
    `blueprint` is the text decoder's; the vision one is `graphs.vision.encoder.bp`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {sorted(PRECISIONS)}")
    if placeholder not in ("hidden", "kv_dim"):
        raise ValueError(f"placeholder {placeholder!r}: expected 'hidden' or 'kv_dim'")
    lengths = _history_lengths(prefill_chunk, history_groups, history_lengths, kv_capacity)
    bp, weights = source if isinstance(source, tuple) else load_idefics3_checkpoint(Path(source))
    io = PRECISIONS[precision]
    groups = _layer_groups(bp.text, kv_capacity, prefill_chunk, lengths, placeholder)
    layers = [LayerSession(bp.text, weights, i, io, groups) for i in range(bp.text.n_layers)]
    return SmolVLMGraphs(bp.text, SmolVisionSession(bp, weights), layers, PostSession(bp.text, weights, io), precision)
