"""Qwen3-VL's vision tower in numpy, behind the graph AXERA's and M5Stack's packages ship.

`Qwen3VisionSession`: input `hidden_states` uint8 (1, grid*grid, 2*patch*patch, 3) in the
runners' patch order (npu/families/qwen3_vl.py `patchify`), normalised inside as the
compiled graph does ((x/255 - 0.5) / 0.5: AXERA-TECH/Qwen3-VL.AXERA 2e8db66
model_convert/config_u8.json calibration mean = std = 127.5, and the checkpoint's
processor's image_mean = image_std = 0.5); outputs `hidden_states_out` and
`deepstack_feature_<j>`, each float32 (tokens, text hidden) (model_convert/export.py
output_names; StackFlow d9084ba LLM.hpp `EncodeImage` reads them as float).

The computation is transformers' `Qwen3VLVisionModel` (5.x) for one image of the graph's
fixed grid: Conv3d patch embedding over (channel, temporal, y, x); the learned square
position table resized bilinearly (align_corners) to the grid, in merge-block order;
blocks of LayerNorm -> attention with 2-D rotary (h then w frequencies, repeated) ->
LayerNorm -> MLP with the config's activation (tanh GELU by default); deepstack mergers
after the configured blocks, each regrouping 2x2 patches first and then LayerNorm over
the regrouped width; the final merger's LayerNorm per patch before the regrouping;
both mergers' GELU exact. float32 throughout. Weight names live in checkpoint.py.
"""

from __future__ import annotations

import math

import numpy as np

from npu.reference import ops
from npu.reference.blueprint import Blueprint, Qwen3VisionBlueprint
from npu.reference.checkpoint import Weights
from npu.session import ShapeGroups, TensorSpec, check_feed

F32 = np.float32
OUTPUT_NAMES = ("hidden_states_out", "deepstack_feature_{}")


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """transformers' gelu_pytorch_tanh, in place."""
    inner = x * x
    inner *= F32(0.044715)
    inner += F32(1.0)
    inner *= x
    inner *= F32(math.sqrt(2.0 / math.pi))
    np.tanh(inner, out=inner)
    inner += F32(1.0)
    x *= inner
    x *= F32(0.5)
    return x


def _axis_taps(size: int, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear align_corners taps of `size` targets over `side` sources: lower, upper, upper weight."""
    src = np.arange(size, dtype=F32) * F32(side - 1) / F32(max(size - 1, 1))
    lower = np.floor(src).astype(np.int64)
    frac = (src - lower).astype(F32)
    return lower, np.minimum(lower + 1, side - 1), frac


def block_order(grid: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of each patch in merge-block order (block row, block column, row, column)."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    shape = (grid // merge, merge, grid // merge, merge)
    return rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1), cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)


class Qwen3VisionEncoder:
    def __init__(self, v: Qwen3VisionBlueprint, weights: Weights) -> None:
        self.v = v
        c = v.hidden
        self.patch_w = np.ascontiguousarray(weights.f32("vision.patch.weight").reshape(c, -1).T)  # (3*2*p*p, c)
        self.patch_b = weights.f32("vision.patch.bias")
        rows, cols = block_order(v.grid, v.merge)
        self.pos = self._positions(weights.f32("vision.pos"), rows, cols)  # (patches, c)
        head_dim = c // v.n_heads
        inv_freq = (F32(1.0) / np.power(F32(v.rope_theta), np.arange(0, head_dim // 2, 2, dtype=F32) / F32(head_dim // 2)))
        angles = np.concatenate([rows[:, None] * inv_freq, cols[:, None] * inv_freq], axis=1).astype(F32)  # (n, d/2)
        self.cos, self.sin = np.cos(angles), np.sin(angles)  # rotate-half over the whole head: halves alike
        self.layers = []
        for i in range(v.depth):
            p = f"vision.layers.{i}."
            qkv = np.concatenate([weights.f32(p + f"{x}.weight") for x in "qkv"])
            self.layers.append({
                "norm1": (weights.f32(p + "norm1.weight"), weights.f32(p + "norm1.bias")),
                "norm2": (weights.f32(p + "norm2.weight"), weights.f32(p + "norm2.bias")),
                "qkv_w": np.ascontiguousarray(qkv.T), "qkv_b": np.concatenate([weights.f32(p + f"{x}.bias") for x in "qkv"]),
                "proj_w": np.ascontiguousarray(weights.f32(p + "proj.weight").T), "proj_b": weights.f32(p + "proj.bias"),
                "fc1_w": np.ascontiguousarray(weights.f32(p + "fc1.weight").T), "fc1_b": weights.f32(p + "fc1.bias"),
                "fc2_w": np.ascontiguousarray(weights.f32(p + "fc2.weight").T), "fc2_b": weights.f32(p + "fc2.bias"),
            })
        self.merger = self._merger(weights, "vision.merger.")
        self.deepstack = [self._merger(weights, f"vision.deepstack.{j}.") for j in range(len(v.deepstack))]

    def _positions(self, table: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        side, grid = self.v.pos_side, self.v.grid
        r0, r1, rf = _axis_taps(grid, side)
        c0, c1, cf = _axis_taps(grid, side)
        r0, r1, rf, c0, c1, cf = r0[rows], r1[rows], rf[rows], c0[cols], c1[cols], cf[cols]
        out = np.zeros((len(rows), table.shape[1]), F32)
        for rt, rw in ((r0, 1 - rf), (r1, rf)):
            for ct, cw in ((c0, 1 - cf), (c1, cf)):
                out += table[rt * side + ct] * (rw * cw).astype(F32)[:, None]
        return out

    @staticmethod
    def _merger(weights: Weights, p: str) -> dict[str, np.ndarray]:
        return {"norm_w": weights.f32(p + "norm.weight"), "norm_b": weights.f32(p + "norm.bias"),
                "fc1_w": np.ascontiguousarray(weights.f32(p + "fc1.weight").T), "fc1_b": weights.f32(p + "fc1.bias"),
                "fc2_w": np.ascontiguousarray(weights.f32(p + "fc2.weight").T), "fc2_b": weights.f32(p + "fc2.bias")}

    def _merge(self, x: np.ndarray, m: dict[str, np.ndarray], norm_after: bool) -> np.ndarray:
        wide = m["fc1_w"].shape[0]
        if norm_after:  # deepstack: regroup 2x2 patches, then LayerNorm over the regrouped width
            grouped = x.reshape(-1, wide)
            h = ops.layer_norm(grouped, m["norm_w"], m["norm_b"], 1e-6, out=np.empty_like(grouped))
        else:  # the final merger: LayerNorm per patch, then regroup
            h = ops.layer_norm(x, m["norm_w"], m["norm_b"], 1e-6, out=np.empty_like(x)).reshape(-1, wide)
        h = h @ m["fc1_w"] + m["fc1_b"]
        ops.gelu(h, out=h)  # exact GELU (nn.GELU())
        return h @ m["fc2_w"] + m["fc2_b"]

    def encode(self, patches: np.ndarray) -> list[np.ndarray]:
        """uint8 (patches, 2*p*p, 3) -> [merged (tokens, out_hidden), deepstack_0, ...] float32."""
        v = self.v
        n = patches.shape[0]
        pixels = patches.astype(F32) * F32(1.0 / 255.0)
        pixels -= F32(0.5)
        pixels /= F32(0.5)
        # (n, temporal*p*p, 3) -> (n, 3, temporal, p, p): Conv3d's (channel, t, y, x) order
        flat = pixels.reshape(n, v.temporal, v.patch, v.patch, 3).transpose(0, 4, 1, 2, 3).reshape(n, -1)
        x = flat @ self.patch_w + self.patch_b
        x += self.pos
        c, heads = v.hidden, v.n_heads
        d = c // heads
        features = []
        normed = np.empty_like(x)
        for index, layer in enumerate(self.layers):
            ops.layer_norm(x, *layer["norm1"], 1e-6, out=normed)
            qkv = normed @ layer["qkv_w"] + layer["qkv_b"]  # (n, 3c)
            q = np.ascontiguousarray(qkv[:, :c].reshape(n, heads, d))
            k = np.ascontiguousarray(qkv[:, c:2 * c].reshape(n, heads, d))
            vv = np.ascontiguousarray(qkv[:, 2 * c:].reshape(n, heads, d))
            ops.apply_rope_(q, self.cos, self.sin)
            ops.apply_rope_(k, self.cos, self.sin)
            x += ops.attention(q, k, vv, None) @ layer["proj_w"] + layer["proj_b"]
            ops.layer_norm(x, *layer["norm2"], 1e-6, out=normed)
            h = normed @ layer["fc1_w"] + layer["fc1_b"]
            if v.act == "gelu":
                ops.gelu(h, out=h)
            else:
                gelu_tanh(h)
            x += h @ layer["fc2_w"] + layer["fc2_b"]
            if index in v.deepstack:
                features.append(self._merge(x, self.deepstack[v.deepstack.index(index)], norm_after=True))
        return [self._merge(x, self.merger, norm_after=False), *features]


class Qwen3VisionSession(ShapeGroups):
    """The compiled vision graph's contract (one shape group), computed by `Qwen3VisionEncoder`."""

    def __init__(self, bp: Blueprint, weights: Weights) -> None:
        v = bp.qwen3_vision
        self.name = "vision"
        self.encoder = Qwen3VisionEncoder(v, weights)
        self._inputs = [[TensorSpec("hidden_states", (1, v.n_patches, v.temporal * v.patch * v.patch, 3),
                                    np.dtype(np.uint8))]]
        names = [OUTPUT_NAMES[0]] + [OUTPUT_NAMES[1].format(j) for j in range(len(v.deepstack))]
        self._outputs = [[TensorSpec(name, (v.n_image_tokens, v.out_hidden), np.dtype(F32)) for name in names]]

    def run(self, feed: dict[str, np.ndarray], group: int = 0) -> list[np.ndarray]:
        check_feed(self, feed, group)
        return self.encoder.encode(feed["hidden_states"][0])
