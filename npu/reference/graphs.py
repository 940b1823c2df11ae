"""ReferenceSession: the compiled graphs (vision, decoder layer i, post) in numpy.

`build_reference_sessions(...)` turns a Hugging Face checkpoint into sessions with
exactly the names, shapes, groups and dtypes of a Pulsar2 `llm_build` package
(docs/internals.md "Graph shapes"):

- vision, in either convention of the published builds: `input` uint8 NHWC [1,H,W,3]
  normalised inside the graph (InternVL2/2.5 builds), or `image` float32 NCHW
  [1,3,H,W] already normalised with ImageNet mean/std (AXERA's InternVL3 builds, whose
  runners feed {"image": pixel_values}); -> `output` [1, n_image_tokens, hidden] in the
  precision's dtype or float32;
- layer i: `K_cache`, `V_cache`, `indices` (uint32), `input`, `mask` ->
  `K_cache_out`, `V_cache_out`, `output`; group 0 decode, group 1 a chunk without
  history (placeholder K/V inputs, fed zeros, never read: [1,1,hidden] as AXERA's
  builds declare them, or [1,1,kv_dim]), groups g >= 2 a chunk against the first
  `history_lengths[g-2]` cache rows (Pulsar2's `--last_kv_cache_len` list: 128, 256, ...
  or steps of 512), mask [1, chunk, history + chunk];
- post: `input` [1,1,hidden] -> `output` [1,1,vocab] logits (final RMSNorm + lm_head).

Precision "fp32": float32 at every float boundary, matches transformers to float32
rounding. Precision "bf16": the board's dtypes (bf16 at every float boundary, mask
included); inside a graph both compute in float32 with the checkpoint's values.

K/V rows are post-RoPE, as the board's caches hold them. Attention skips key columns
that the mask blocks (<= -1e4) for every query row: their softmax weight is exactly 0
in float32 once any column is open, so skipping is exact; a row with no open column
falls back to the full softmax over every column, as the mask semantics say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npu.families import ModelFamily, family_named
from npu.reference import ops
from npu.reference.blueprint import Blueprint
from npu.reference.checkpoint import Weights, load_checkpoint
from npu.reference.qwen3_vision import Qwen3VisionSession
from npu.reference.vision import VisionEncoder
from npu.session import BF16, Session, ShapeGroups, TensorSpec, check_feed

F32 = np.float32
U32 = np.dtype(np.uint32)
PRECISIONS = {"bf16": BF16, "fp32": np.dtype(F32)}
_SKIP_BELOW = -1.0e4  # a mask value at or below this contributes exactly 0 after softmax


class ReferenceSession(ShapeGroups):
    """A numpy graph behind the Session interface; `run` validates every feed strictly."""

    def __init__(self, name: str, inputs: list[list[TensorSpec]], outputs: list[list[TensorSpec]]):
        self.name = name
        self._inputs, self._outputs = inputs, outputs
        self._buffers = [[np.empty(s.shape, s.dtype) for s in group] for group in outputs]

    def run(self, feed: dict[str, np.ndarray], group: int = 0) -> list[np.ndarray]:
        check_feed(self, feed, group)
        outputs = self._buffers[group]
        self._compute(feed, group, outputs)
        return list(outputs)

    def _compute(self, feed: dict[str, np.ndarray], group: int, outputs: list[np.ndarray]) -> None:
        raise NotImplementedError


VISION_INPUTS = ("uint8_nhwc", "float32_nchw")


class VisionSession(ReferenceSession):
    def __init__(self, blueprint: Blueprint, weights: Weights, io_dtype: np.dtype, vision_input: str = "uint8_nhwc",
                 output_dtype: np.dtype | None = None):
        if vision_input not in VISION_INPUTS:
            raise ValueError(f"vision_input {vision_input!r}: expected one of {VISION_INPUTS}")
        v = blueprint.vision
        self.encoder = VisionEncoder(blueprint, weights)
        self.normalised = vision_input == "float32_nchw"
        size = v.image_size
        image = (TensorSpec("image", (1, 3, size, size), np.dtype(F32)) if self.normalised
                 else TensorSpec("input", (1, size, size, 3), np.dtype(np.uint8)))
        features = TensorSpec("output", (1, v.n_image_tokens, v.text_hidden), output_dtype or io_dtype)
        super().__init__("vision", [[image]], [[features]])

    def _compute(self, feed, group, outputs):
        if self.normalised:
            outputs[0][0] = self.encoder.forward_normalised(feed["image"][0].transpose(1, 2, 0))  # (H, W, 3)
        else:
            outputs[0][0] = self.encoder.forward(feed["input"][0])


class PostSession(ReferenceSession):
    def __init__(self, blueprint: Blueprint, weights: Weights, io_dtype: np.dtype):
        self.eps = blueprint.rms_eps
        self.norm = weights.f32("norm")
        self.lm_head = np.ascontiguousarray(weights["lm_head"], dtype=F32)  # (vocab, hidden)
        self._x = np.empty((1, blueprint.hidden), F32)  # (1, hidden)
        self._logits = np.empty(blueprint.vocab, F32)  # (vocab,)
        hidden = TensorSpec("input", (1, 1, blueprint.hidden), io_dtype)
        logits = TensorSpec("output", (1, 1, blueprint.vocab), io_dtype)
        super().__init__("post", [[hidden]], [[logits]])

    def _compute(self, feed, group, outputs):
        self._x[...] = feed["input"][0]
        ops.rms_norm(self._x, self.norm, self.eps, out=self._x)
        np.matmul(self.lm_head, self._x[0], out=self._logits)
        outputs[0][0, 0] = self._logits


@dataclass(frozen=True)
class _GroupShape:
    n: int  # query rows (1 for decode, chunk for prefill)
    n_hist: int  # history key rows fed as K_cache (0 for the first chunk: its K/V input is a placeholder)
    cache_rows: int  # K_cache rows in the graph's input
    cache_width: int  # K_cache row width: kv_dim, or the placeholder's width


def _layer_groups(bp: Blueprint, capacity: int, chunk: int, history_lengths: list[int],
                  placeholder: str) -> list[_GroupShape]:
    width = bp.hidden if placeholder == "hidden" else bp.kv_dim
    groups = [_GroupShape(1, capacity, capacity, bp.kv_dim), _GroupShape(chunk, 0, 1, width)]
    groups += [_GroupShape(chunk, length, length, bp.kv_dim) for length in history_lengths]
    return groups


class LayerSession(ReferenceSession):
    """Qwen2 decoder layer `index` with decode, first-chunk and history groups."""

    def __init__(self, bp: Blueprint, weights: Weights, index: int, io_dtype: np.dtype, groups: list[_GroupShape]):
        self.bp = bp
        p = f"layers.{index}."
        qkv_w = [weights.f32(p + f"{x}.weight") for x in "qkv"]
        self.qkv_w = np.ascontiguousarray(np.concatenate(qkv_w).T)  # (hidden, q_dim + 2 * kv_dim)
        self.qkv_b = (np.concatenate([weights.f32(p + f"{x}.bias") for x in "qkv"]) if p + "q.bias" in weights
                      else np.zeros(bp.q_dim + 2 * bp.kv_dim, F32))  # (q_dim + 2 * kv_dim,); Qwen3 has none
        # Qwen3: RMSNorm over each head of q and k before RoPE
        self.q_norm = weights.f32(p + "q_norm") if bp.qk_norm else None
        self.k_norm = weights.f32(p + "k_norm") if bp.qk_norm else None
        self.o_w = np.ascontiguousarray(weights.f32(p + "o.weight").T)  # (q_dim, hidden)
        self.o_b = weights.f32(p + "o.bias") if p + "o.bias" in weights else None
        gate_up = np.concatenate([weights.f32(p + "gate.weight"), weights.f32(p + "up.weight")])
        self.gate_up_w = np.ascontiguousarray(gate_up.T)  # (hidden, 2 * intermediate)
        self.down_w = np.ascontiguousarray(weights.f32(p + "down.weight").T)  # (intermediate, hidden)
        self.attn_norm, self.mlp_norm = weights.f32(p + "attn_norm"), weights.f32(p + "mlp_norm")
        self.shapes = groups
        n_positions = max(g.n_hist + g.n for g in groups)
        self.inv_freq = ops.rope_inv_freq(bp.rope_theta, bp.head_dim)
        self.rope_cos, self.rope_sin = ops.rope_cos_sin(np.arange(n_positions), self.inv_freq)  # (positions, half)
        n_max = max(g.n for g in groups)
        keys_max = max(g.n_hist + g.n for g in groups)
        self._x = np.empty((n_max, bp.hidden), F32)  # (rows, hidden) residual stream
        self._normed = np.empty((n_max, bp.hidden), F32)  # (rows, hidden)
        self._qkv = np.empty((n_max, bp.q_dim + 2 * bp.kv_dim), F32)  # (rows, q_dim + 2 kv_dim)
        self._gate_up = np.empty((n_max, 2 * bp.intermediate), F32)  # (rows, 2 * intermediate)
        self._keys = np.empty((keys_max, bp.kv_dim), F32)  # (open key rows, kv_dim)
        self._values = np.empty((keys_max, bp.kv_dim), F32)  # (open key rows, kv_dim)
        super().__init__(f"layer{index}", *self._specs(io_dtype))

    def _specs(self, io: np.dtype) -> tuple[list[list[TensorSpec]], list[list[TensorSpec]]]:
        kv, h = self.bp.kv_dim, self.bp.hidden
        inputs, outputs = [], []
        for g in self.shapes:
            inputs.append([
                TensorSpec("K_cache", (1, g.cache_rows, g.cache_width), io),
                TensorSpec("V_cache", (1, g.cache_rows, g.cache_width), io),
                TensorSpec("indices", (3 if self.bp.mrope_section and g.n > 1 else 1, g.n), U32),
                TensorSpec("input", (1, g.n, h), io),
                TensorSpec("mask", (1, g.n, g.n_hist + g.n), io),
            ])
            outputs.append([
                TensorSpec("K_cache_out", (1, g.n, kv), io),
                TensorSpec("V_cache_out", (1, g.n, kv), io),
                TensorSpec("output", (1, g.n, h), io),
            ])
        return inputs, outputs

    def _rope(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (n, half) for `indices` (rows, n): one row of positions, or M-RoPE's t/h/w rows
        interleaved across frequencies (frequency j takes h when j % 3 == 1 and j < 3 * section[1],
        w when j % 3 == 2 and j < 3 * section[2], else t: transformers' Qwen3-VL text rotary)."""
        rows = [self._rope_row(row) for row in indices]
        if len(rows) == 1:
            return rows[0]
        cos, sin = rows[0][0].copy(), rows[0][1].copy()
        for axis, offset in ((1, 1), (2, 2)):
            take = slice(offset, 3 * self.bp.mrope_section[axis], 3)
            cos[:, take], sin[:, take] = rows[axis][0][:, take], rows[axis][1][:, take]
        return cos, sin

    def _rope_row(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if int(positions.max()) < len(self.rope_cos):
            return self.rope_cos[positions], self.rope_sin[positions]
        return ops.rope_cos_sin(positions, self.inv_freq)

    def _compute(self, feed, group, outputs):
        bp, shape = self.bp, self.shapes[group]
        n = shape.n
        x, normed, qkv = self._x[:n], self._normed[:n], self._qkv[:n]
        x[...] = feed["input"][0]
        ops.rms_norm(x, self.attn_norm, bp.rms_eps, out=normed)
        np.matmul(normed, self.qkv_w, out=qkv)
        qkv += self.qkv_b
        q = qkv[:, : bp.q_dim].reshape(n, bp.n_heads, bp.head_dim)
        k = qkv[:, bp.q_dim : bp.q_dim + bp.kv_dim].reshape(n, bp.n_kv_heads, bp.head_dim)
        v = qkv[:, bp.q_dim + bp.kv_dim :].reshape(n, bp.n_kv_heads, bp.head_dim)
        if self.q_norm is not None:
            ops.rms_norm(q, self.q_norm, bp.rms_eps, out=q)
            ops.rms_norm(k, self.k_norm, bp.rms_eps, out=k)
        cos, sin = self._rope(feed["indices"])
        ops.apply_rope_(q, cos, sin)
        ops.apply_rope_(k, cos, sin)
        k_out, v_out, hidden_out = outputs
        k_out[0] = k.reshape(n, bp.kv_dim)
        v_out[0] = v.reshape(n, bp.kv_dim)
        context = self._attend(q, k, v, feed, shape)  # (n, q_dim)
        attn = np.matmul(context, self.o_w, out=normed)
        if self.o_b is not None:
            attn += self.o_b
        x += attn
        self._mlp(x, n)
        hidden_out[0] = x

    def _attend(self, q, k, v, feed, shape: _GroupShape) -> np.ndarray:
        """Attention of the new rows over open history rows + the new rows, mask added."""
        bp = self.bp
        mask = feed["mask"][0].astype(F32)  # (n, n_hist + n)
        is_open = mask > _SKIP_BELOW
        if is_open.any(axis=1).all():
            columns = np.flatnonzero(is_open.any(axis=0))
        else:
            columns = np.arange(mask.shape[1])
        hist = columns[columns < shape.n_hist]
        new = columns[columns >= shape.n_hist] - shape.n_hist
        m = len(hist) + len(new)
        keys, values = self._keys[:m], self._values[:m]
        _gather_rows(feed["K_cache"][0], hist, keys[: len(hist)])
        _gather_rows(feed["V_cache"][0], hist, values[: len(hist)])
        keys[len(hist) :] = k.reshape(shape.n, bp.kv_dim)[new]
        values[len(hist) :] = v.reshape(shape.n, bp.kv_dim)[new]
        heads = (m, bp.n_kv_heads, bp.head_dim)
        sub_mask = mask if m == mask.shape[1] else mask[:, columns]
        return ops.attention(q, keys.reshape(heads), values.reshape(heads), sub_mask)

    def _mlp(self, x: np.ndarray, n: int) -> None:
        inter = self.bp.intermediate
        normed = ops.rms_norm(x, self.mlp_norm, self.bp.rms_eps, out=self._normed[:n])
        gate_up = np.matmul(normed, self.gate_up_w, out=self._gate_up[:n])
        hidden = ops.silu_mul(gate_up[:, :inter], gate_up[:, inter:])
        x += np.matmul(hidden, self.down_w, out=normed)


def _gather_rows(source: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[:] = source[rows] as float32; a contiguous run of rows is copied as one slice."""
    if len(rows) == 0:
        return
    first, last = int(rows[0]), int(rows[-1])
    if last - first + 1 == len(rows):
        out[...] = source[first : last + 1]
    else:
        out[...] = source[rows]


@dataclass
class ReferenceGraphs:
    """Every graph of a model package: `vision` is None for a text-only model."""

    blueprint: Blueprint
    vision: Session | None
    layers: list[Session]
    post: Session
    precision: str

    @property
    def family(self) -> ModelFamily:
        return family_named(self.blueprint.family)


def build_reference_sessions(
    source: str | Path | tuple[Blueprint, Weights],
    precision: str = "bf16",
    kv_capacity: int = 1023,
    prefill_chunk: int = 128,
    history_groups: int = 0,
    history_lengths: Sequence[int] | None = None,
    placeholder: str = "hidden",
    vision_input: str = "uint8_nhwc",
    vision_output: str | None = None,
) -> ReferenceGraphs:
    """Reference graphs for a checkpoint directory or an already loaded (blueprint, weights).

    `kv_capacity` cache rows (decode mask has kv_capacity + 1 slots), prefill chunks of
    `prefill_chunk` rows, and history groups g >= 2 whose histories are
    `history_lengths` (increasing), or, without it, `history_groups` groups with
    histories chunk, 2*chunk, ... (a classic llm_build). `placeholder` shapes group 1's
    K/V inputs [1,1,hidden] ("hidden", as AXERA builds) or [1,1,kv_dim] ("kv_dim").
    `vision_input` is "uint8_nhwc" or "float32_nchw"; `vision_output` "bf16"/"fp32" (None:
    the precision's dtype). Raises ValueError for a bad combination.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {sorted(PRECISIONS)}")
    if kv_capacity < 1 or prefill_chunk < 1 or history_groups < 0:
        raise ValueError("kv_capacity and prefill_chunk must be >= 1, history_groups >= 0")
    if placeholder not in ("hidden", "kv_dim"):
        raise ValueError(f"placeholder {placeholder!r}: expected 'hidden' or 'kv_dim'")
    if vision_output is not None and vision_output not in PRECISIONS:
        raise ValueError(f"vision_output {vision_output!r}: expected one of {sorted(PRECISIONS)}")
    lengths = _history_lengths(prefill_chunk, history_groups, history_lengths, kv_capacity)
    blueprint, weights = source if isinstance(source, tuple) else load_checkpoint(Path(source))
    io = PRECISIONS[precision]
    groups = _layer_groups(blueprint, kv_capacity, prefill_chunk, lengths, placeholder)
    vision = None
    if blueprint.qwen3_vision is not None:
        vision = Qwen3VisionSession(blueprint, weights)
    elif blueprint.vision is not None:
        vision = VisionSession(blueprint, weights, io, vision_input, vision_output and PRECISIONS[vision_output])
    layers = [LayerSession(blueprint, weights, i, io, groups) for i in range(blueprint.n_layers)]
    return ReferenceGraphs(blueprint, vision, layers, PostSession(blueprint, weights, io), precision)


def _history_lengths(chunk: int, history_groups: int, history_lengths: Sequence[int] | None,
                     capacity: int) -> list[int]:
    lengths = [chunk * g for g in range(1, history_groups + 1)] if history_lengths is None else list(history_lengths)
    if any(b <= a for a, b in zip(lengths, lengths[1:])) or any(length < 1 for length in lengths):
        raise ValueError(f"history lengths {lengths} must be positive and increasing")
    if max(lengths, default=0) + chunk > capacity:
        raise ValueError(f"a chunk of {chunk} rows after {max(lengths)} history rows exceeds the {capacity}-row cache")
    return lengths
