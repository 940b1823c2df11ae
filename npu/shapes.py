"""Graph shapes: every dimension the engine sizes its buffers by, read from the sessions.

`read_shapes(graphs)` reads the decoder layers, the post graph and the vision graph of any
backend (anything with `.layers`, `.post` and `.vision` sessions) and cross-checks them:
all layers alike, the decode mask one wider than the cache, history groups that fit the
chunk, a post graph fed one hidden row, a vision graph whose features are hidden wide.
Every inconsistency is collected and raised at once as `ShapeError` (its `problems` list
the pieces), so `vlmd model inspect` can show them all and the engine refuses exactly
what inspect reports. Nothing is taken from file names or configs: a build's KV capacity,
prefill chunk and history lengths are what its graphs say.

This is the only place graph shapes are interpreted; board, reference and engine code
read `GraphShapes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from npu.errors import ModelError
from npu.families import family_of
from npu.families.base import check_index_rows
from npu.session import Session, TensorSpec, dtype_name

LAYER_INPUTS = ("K_cache", "V_cache", "indices", "input", "mask")
LAYER_OUTPUTS = ("K_cache_out", "V_cache_out", "output")


class ShapeError(ModelError):
    """Graphs whose shapes the engine cannot run; `problems` names each inconsistency."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class GraphShapes:
    """Everything the engine sizes its buffers by, read from the sessions."""

    n_layers: int
    hidden: int
    capacity: int  # KV cache rows
    kv_dim: int
    chunk: int  # prefill rows per graph call; 0 = decode-only build
    history_groups: dict[int, int]  # history length -> layer shape group
    first_chunk_kv_shape: tuple[int, ...]  # group 1's placeholder K/V input shape
    act_dtype: np.dtype  # layer input/output
    kv_dtype: np.dtype
    mask_dtype: np.dtype
    output_order: dict[int, tuple[int, int, int]]  # group -> indices of K_cache_out, V_cache_out, output
    post_input_name: str
    post_dtype: np.dtype
    vocab: int | None  # logits width; None on top-k post graphs
    logits_index: int | None
    topk_ids_index: int | None
    topk_values_index: int | None
    post_topk: int | None = None  # k of a top-k post graph
    vision_input_name: str | None = None
    vision_size: tuple[int, int] | None = None  # (height, width)
    image_tokens: int = 0
    vision_dtype: np.dtype | None = None  # the features' dtype
    # "nhwc": uint8 [1,H,W,3], normalised inside the graph; "nchw": float32 [1,3,H,W],
    # normalised by the host (AXERA's InternVL3 builds); "patches": uint8 [1, patches, 2*16*16, 3]
    # (Qwen3-VL, npu/families/qwen3_vl.py)
    vision_layout: str | None = None
    vision_planes: int = 1  # vision outputs that are image rows: the input, then planes added after layers
    index_rows: int = 1  # rows of the prefill graphs' `indices` (1: positions; 3: M-RoPE t/h/w)
    family: str = "internvl"  # the model family (npu/families/) these shapes were read for

    def describe(self) -> dict[str, Any]:
        """The JSON-able facts `vlmd model inspect` and the daemon's start line report."""
        return {
            "n_layers": self.n_layers, "hidden": self.hidden, "kv_dim": self.kv_dim, "kv_capacity": self.capacity,
            "prefill_chunk": self.chunk, "history_groups": len(self.history_groups),
            "history_lengths": sorted(self.history_groups), "float_dtype": dtype_name(self.act_dtype),
            "vocab": self.vocab, "post_topk": self.post_topk, "image_tokens": self.image_tokens,
            "image_size": None if self.vision_size is None else list(self.vision_size),
            "vision_dtype": None if self.vision_dtype is None else dtype_name(self.vision_dtype),
            "vision_input": {"nhwc": "uint8 NHWC", "nchw": "float32 NCHW",
                             "patches": "uint8 patches"}.get(self.vision_layout),
            "family": self.family, "index_rows": self.index_rows,
        }


def _by_name(specs: list[TensorSpec]) -> dict[str, TensorSpec]:
    return {spec.name: spec for spec in specs}


def _layer_group(layer: Session, group: int) -> tuple[dict[str, TensorSpec], tuple[int, int, int]]:
    inputs = _by_name(layer.inputs(group))
    outputs = [spec.name for spec in layer.outputs(group)]
    missing = [n for n in LAYER_INPUTS if n not in inputs] + [n for n in LAYER_OUTPUTS if n not in outputs]
    if missing:
        raise ShapeError([f"{layer.name} group {group}: not a decoder layer graph, lacks {missing}"])
    return inputs, tuple(outputs.index(n) for n in LAYER_OUTPUTS)  # type: ignore[return-value]


def read_shapes(graphs: Any) -> GraphShapes:
    """Read and cross-check `graphs.layers`, `graphs.post`, `graphs.vision`; ShapeError lists
    every problem found. The vision graph and the `indices` rows are read as the model's
    family (`graphs.family`, npu/families/) says."""
    family = family_of(graphs)
    layers = list(graphs.layers)
    if not layers:
        raise ShapeError(["the model has no decoder layer graphs"])
    problems: list[str] = []
    layer0 = layers[0]
    for layer in layers[1:]:
        same = layer.num_groups == layer0.num_groups and all(
            layer.inputs(g) == layer0.inputs(g) and layer.outputs(g) == layer0.outputs(g)
            for g in range(layer0.num_groups))
        if not same:
            problems.append(f"{layer.name}: shapes or groups differ from {layer0.name}")
    decode, order0 = _layer_group(layer0, 0)
    _, _, hidden = decode["input"].shape
    _, capacity, kv_dim = decode["K_cache"].shape
    if decode["mask"].shape != (1, 1, capacity + 1):
        problems.append(f"{layer0.name}: decode mask {list(decode['mask'].shape)}, expected [1, 1, {capacity + 1}]")
    output_order = {0: order0}
    chunk, history, first_kv, index_rows = 0, {}, (), 1
    for group in range(1, layer0.num_groups):
        inputs, output_order[group] = _layer_group(layer0, group)
        rows = inputs["input"].shape[1]
        if group == 1:
            chunk, first_kv = rows, inputs["K_cache"].shape
            index_rows = inputs["indices"].shape[0] if len(inputs["indices"].shape) == 2 else 1
            check_index_rows(family, index_rows, problems)
            continue
        history_len = inputs["K_cache"].shape[1]
        if history_len > capacity:
            problems.append(f"{layer0.name} group {group}: history of {history_len} rows exceeds the"
                            f" {capacity}-row KV cache")
        if rows != chunk or inputs["mask"].shape != (1, chunk, history_len + chunk):
            problems.append(f"{layer0.name} group {group}: input {list(inputs['input'].shape)} / mask"
                            f" {list(inputs['mask'].shape)} do not fit chunk {chunk} after {history_len} rows")
        if history_len in history:
            problems.append(f"{layer0.name} groups {history[history_len]} and {group} both have {history_len} history rows")
        history[history_len] = group
    post = _post_shapes(graphs.post, hidden, problems)
    vision = family.vision_shapes(graphs.vision, hidden, problems) if graphs.vision is not None else {}
    if problems:
        raise ShapeError(problems)
    return GraphShapes(
        n_layers=len(layers), hidden=hidden, capacity=capacity, kv_dim=kv_dim, chunk=chunk,
        history_groups=history, first_chunk_kv_shape=tuple(first_kv), act_dtype=decode["input"].dtype,
        kv_dtype=decode["K_cache"].dtype, mask_dtype=decode["mask"].dtype, output_order=output_order,
        index_rows=index_rows, family=family.name, **post, **vision)


def _post_shapes(post: Session, hidden: int, problems: list[str]) -> dict[str, Any]:
    post_in = post.inputs(0)[0]
    if post_in.shape != (1, 1, hidden):
        problems.append(f"post input {post_in.describe()} does not take one row of hidden {hidden}")
    outputs = post.outputs(0)
    ints = [i for i, s in enumerate(outputs) if np.issubdtype(s.dtype, np.integer)]
    floats = [i for i, s in enumerate(outputs) if not np.issubdtype(s.dtype, np.integer)]
    shapes: dict[str, Any] = {"post_input_name": post_in.name, "post_dtype": post_in.dtype, "vocab": None,
                              "logits_index": None, "topk_ids_index": None, "topk_values_index": None}
    if ints:  # a --post_topk build: candidate ids (and their scores) instead of logits
        shapes["topk_ids_index"] = ints[0]
        shapes["topk_values_index"] = floats[0] if floats else None
        shapes["post_topk"] = outputs[ints[0]].shape[-1]
    elif floats:
        shapes["logits_index"] = floats[0]
        shapes["vocab"] = outputs[floats[0]].shape[-1]
    else:
        problems.append("the post graph has no outputs")
    return shapes
