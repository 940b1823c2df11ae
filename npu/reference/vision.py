"""InternViT + pixel shuffle + projector in numpy: the computation behind the vision graph.

`VisionEncoder.forward(image)` takes one uint8 RGB image [H, W, 3] at the graph's size
and returns the projected image tokens [n_image_tokens, text_hidden] in float32:

    pixels/255, ImageNet mean/std -> 14x14 patch embedding (conv as a matmul) -> CLS +
    position embeddings -> encoder layers (norm1, MHA, ls1, residual; norm2, GELU MLP,
    ls2, residual) -> hidden state `select_layer` without CLS -> pixel shuffle
    (InternVL2's v2 layout) -> LayerNorm, Linear, GELU, Linear.

Weights are converted to float32 and pre-transposed once, at construction.
"""

from __future__ import annotations

import numpy as np

from npu.reference import ops
from npu.reference.blueprint import Blueprint
from npu.reference.checkpoint import Weights

F32 = np.float32
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=F32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=F32)
PROJECTOR_EPS = 1e-5  # nn.LayerNorm's default, used by both InternVL projectors


def _linear(weights: Weights, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(W^T as float32 [in, out], bias float32 [out] or None)."""
    w = np.ascontiguousarray(weights.f32(name + ".weight").T)
    bias = weights.get(name + ".bias")
    return w, None if bias is None else np.asarray(bias, dtype=F32)


def _optional(weights: Weights, name: str) -> np.ndarray | None:
    value = weights.get(name)
    return None if value is None else np.asarray(value, dtype=F32)


class _VisionLayer:
    def __init__(self, weights: Weights, prefix: str):
        q_w, q_b = _linear(weights, prefix + "q")
        k_w, k_b = _linear(weights, prefix + "k")
        v_w, v_b = _linear(weights, prefix + "v")
        self.qkv_w = np.concatenate([q_w, k_w, v_w], axis=1)  # (C, 3C)
        biases = [b if b is not None else np.zeros(q_w.shape[1], F32) for b in (q_b, k_b, v_b)]
        self.qkv_b = np.concatenate(biases)  # (3C,)
        self.proj_w, self.proj_b = _linear(weights, prefix + "proj")
        self.fc1_w, self.fc1_b = _linear(weights, prefix + "fc1")
        self.fc2_w, self.fc2_b = _linear(weights, prefix + "fc2")
        self.norm1 = (weights.f32(prefix + "norm1.weight"), _optional(weights, prefix + "norm1.bias"))
        self.norm2 = (weights.f32(prefix + "norm2.weight"), _optional(weights, prefix + "norm2.bias"))
        self.q_norm = _optional(weights, prefix + "q_norm.weight")
        self.k_norm = _optional(weights, prefix + "k_norm.weight")
        self.ls1 = weights.f32(prefix + "ls1")
        self.ls2 = weights.f32(prefix + "ls2")


class VisionEncoder:
    """The vision graph's computation for one blueprint (see module docstring)."""

    def __init__(self, blueprint: Blueprint, weights: Weights):
        if blueprint.vision is None:
            raise ValueError("text-only blueprint has no vision encoder")
        self.bp = v = blueprint.vision
        c = v.hidden
        self.patch_w = np.ascontiguousarray(weights.f32("vision.patch.weight").reshape(c, -1).T)  # (3*p*p, C)
        self.patch_b = weights.f32("vision.patch.bias")
        self.cls = weights.f32("vision.cls")  # (C,)
        self.pos = weights.f32("vision.pos")  # (grid*grid + 1, C)
        self.layers = [_VisionLayer(weights, f"vision.layers.{i}.") for i in range(v.n_layers_used)]
        use_post_norm = "vision.post_norm.weight" in weights and v.n_layers_used == v.n_layers
        self.post_norm = (
            (weights.f32("vision.post_norm.weight"), _optional(weights, "vision.post_norm.bias"))
            if use_post_norm else None
        )
        self.proj_norm = (weights.f32("projector.norm.weight"), weights.f32("projector.norm.bias"))
        self.proj_fc1 = _linear(weights, "projector.fc1")
        self.proj_fc2 = _linear(weights, "projector.fc2")
        n = v.grid * v.grid + 1
        self._tokens = np.empty((n, c), F32)  # (1 + patches, C) residual stream
        self._normed = np.empty((n, c), F32)  # (1 + patches, C)
        self._qkv = np.empty((n, 3 * c), F32)  # (1 + patches, 3C)
        self._mlp = np.empty((n, v.intermediate), F32)  # (1 + patches, intermediate)

    def forward(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB [H, W, 3] at the graph's size -> float32 [n_image_tokens, text_hidden] (fresh array)."""
        x = self._tokens
        x[0] = self.cls
        np.matmul(self._patches(image), self.patch_w, out=x[1:])
        x[1:] += self.patch_b
        x += self.pos
        for layer in self.layers:
            self._layer(layer, x)
        if self.post_norm is not None:
            ops.norm("layer_norm", x, *self.post_norm, self.bp.eps, out=x)
        return self._project(self._pixel_shuffle(x[1:]))

    def _patches(self, image: np.ndarray) -> np.ndarray:
        """Normalised pixels as conv patches: (grid*grid, 3*p*p) in (channel, ky, kx) order."""
        p, g = self.bp.patch, self.bp.grid
        pixels = image.astype(F32)  # (H, W, 3)
        pixels /= F32(255.0)
        pixels -= IMAGENET_MEAN
        pixels /= IMAGENET_STD
        patches = pixels.reshape(g, p, g, p, 3).transpose(0, 2, 4, 1, 3)  # (gy, gx, 3, ky, kx)
        return patches.reshape(g * g, 3 * p * p)

    def _layer(self, layer: _VisionLayer, x: np.ndarray) -> None:
        v = self.bp
        n, c = x.shape
        normed = ops.norm(v.norm, x, *layer.norm1, v.eps, out=self._normed)
        np.matmul(normed, layer.qkv_w, out=self._qkv)
        self._qkv += layer.qkv_b
        q, k, val = self._qkv[:, :c], self._qkv[:, c : 2 * c], self._qkv[:, 2 * c :]
        if layer.q_norm is not None:
            ops.rms_norm(q, layer.q_norm, v.eps, out=q)
            ops.rms_norm(k, layer.k_norm, v.eps, out=k)
        d = c // v.n_heads
        heads = (n, v.n_heads, d)
        context = ops.attention(q.reshape(heads), k.reshape(heads), val.reshape(heads), None)  # (n, C)
        attn = np.matmul(context, layer.proj_w, out=self._normed)
        attn += layer.proj_b
        attn *= layer.ls1
        x += attn
        normed = ops.norm(v.norm, x, *layer.norm2, v.eps, out=self._normed)
        hidden = np.matmul(normed, layer.fc1_w, out=self._mlp)
        ops.gelu(hidden, out=hidden, bias=layer.fc1_b)
        out = np.matmul(hidden, layer.fc2_w, out=self._normed)
        out += layer.fc2_b
        out *= layer.ls2
        x += out

    def _pixel_shuffle(self, patches: np.ndarray) -> np.ndarray:
        """InternVL2 (ps_version v2) pixel shuffle of (grid*grid, C) -> (n_image_tokens, C*s*s)."""
        g, s = self.bp.grid, self.bp.shuffle
        c = patches.shape[-1]
        x = patches.reshape(g, g // s, c * s)  # (rows, cols/s, C*s): s neighbours along a row
        x = x.transpose(1, 0, 2).reshape(g // s, g // s, c * s * s)  # (cols/s, rows/s, C*s*s)
        x = x.transpose(1, 0, 2)  # v2: back to (rows/s, cols/s, C*s*s)
        return np.ascontiguousarray(x).reshape(-1, c * s * s)

    def _project(self, tokens: np.ndarray) -> np.ndarray:
        ops.layer_norm(tokens, *self.proj_norm, PROJECTOR_EPS, out=tokens)
        w1, b1 = self.proj_fc1
        hidden = tokens @ w1  # (n_image_tokens, text_hidden)
        ops.gelu(hidden, out=hidden, bias=b1)
        w2, b2 = self.proj_fc2
        out = hidden @ w2  # (n_image_tokens, text_hidden)
        out += b2
        return out
