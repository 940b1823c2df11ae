"""A loaded model: its sessions, embeddings, tokenizer and chat template, and their shapes.

`load_model(path, ...)` recognises the directory (npu/layout.py) and builds the
sessions with the requested backend:

- a Hugging Face checkpoint (config.json + safetensors) runs on the reference backend
  (npu/reference.py); its embeddings are exported once to the board's raw bf16 format
  into vlmd's cache directory (npu/embeddings.py), so both backends read tokens alike;
- a compiled layout (Pulsar2 output, M5Stack package, vlmd.toml) runs on axengine
  (npu/board.py); it needs a board or an AXCL card.

`read_shapes(model)` reads every dimension the engine needs from the sessions
themselves and raises ModelError naming the graph when they disagree. Nothing here
knows MQTT or the engine's run state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from npu.session import Session, TensorSpec, dtype_name

LAYER_INPUTS = ("K_cache", "V_cache", "indices", "input", "mask")
LAYER_OUTPUTS = ("K_cache_out", "V_cache_out", "output")
DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo_model"
BACKENDS = ("auto", "reference", "axengine")
PRECISIONS = ("bf16", "fp32")


class ModelError(ValueError):
    """A model that cannot be loaded or whose graphs disagree; the message says which part."""


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
    vision_input_name: str | None = None
    vision_size: tuple[int, int] | None = None  # (height, width)
    image_tokens: int = 0
    vision_dtype: np.dtype | None = None


def _by_name(specs: list[TensorSpec]) -> dict[str, TensorSpec]:
    return {spec.name: spec for spec in specs}


def _layer_group(layer: Session, group: int) -> tuple[dict[str, TensorSpec], tuple[int, int, int]]:
    inputs = _by_name(layer.inputs(group))
    outputs = [spec.name for spec in layer.outputs(group)]
    missing = [n for n in LAYER_INPUTS if n not in inputs] + [n for n in LAYER_OUTPUTS if n not in outputs]
    if missing:
        raise ModelError(f"{layer.name} group {group}: not a decoder layer graph, lacks {missing}")
    return inputs, tuple(outputs.index(n) for n in LAYER_OUTPUTS)  # type: ignore[return-value]


def read_shapes(model: Any) -> GraphShapes:
    """Read and cross-check the dimensions of `model.layers`, `model.post`, `model.vision`."""
    layers = list(model.layers)
    if not layers:
        raise ModelError("the model has no decoder layer graphs")
    layer0 = layers[0]
    for layer in layers[1:]:
        same = layer.num_groups == layer0.num_groups and all(
            layer.inputs(g) == layer0.inputs(g) and layer.outputs(g) == layer0.outputs(g)
            for g in range(layer0.num_groups))
        if not same:
            raise ModelError(f"{layer.name}: shape groups differ from {layer0.name}")
    decode, order0 = _layer_group(layer0, 0)
    _, _, hidden = decode["input"].shape
    _, capacity, kv_dim = decode["K_cache"].shape
    if decode["mask"].shape != (1, 1, capacity + 1):
        raise ModelError(f"{layer0.name}: decode mask {list(decode['mask'].shape)}, expected [1, 1, {capacity + 1}]")
    output_order = {0: order0}
    chunk, history, first_kv = 0, {}, ()
    for group in range(1, layer0.num_groups):
        inputs, output_order[group] = _layer_group(layer0, group)
        rows = inputs["input"].shape[1]
        if group == 1:
            chunk, first_kv = rows, inputs["K_cache"].shape
            continue
        history_len = inputs["K_cache"].shape[1]
        if rows != chunk or inputs["mask"].shape != (1, chunk, history_len + chunk):
            raise ModelError(f"{layer0.name} group {group}: input {list(inputs['input'].shape)} / mask"
                             f" {list(inputs['mask'].shape)} do not fit chunk {chunk} after {history_len} rows")
        history[history_len] = group
    post = _post_shapes(model.post, hidden)
    vision = _vision_shapes(model.vision, hidden) if model.vision is not None else {}
    return GraphShapes(
        n_layers=len(layers), hidden=hidden, capacity=capacity, kv_dim=kv_dim, chunk=chunk,
        history_groups=history, first_chunk_kv_shape=tuple(first_kv), act_dtype=decode["input"].dtype,
        kv_dtype=decode["K_cache"].dtype, mask_dtype=decode["mask"].dtype, output_order=output_order,
        **post, **vision)


def _post_shapes(post: Session, hidden: int) -> dict[str, Any]:
    post_in = post.inputs(0)[0]
    if post_in.shape != (1, 1, hidden):
        raise ModelError(f"post input {post_in.describe()} does not take one row of hidden {hidden}")
    outputs = post.outputs(0)
    ints = [i for i, s in enumerate(outputs) if np.issubdtype(s.dtype, np.integer)]
    floats = [i for i, s in enumerate(outputs) if not np.issubdtype(s.dtype, np.integer)]
    shapes: dict[str, Any] = {"post_input_name": post_in.name, "post_dtype": post_in.dtype,
                              "vocab": None, "logits_index": None, "topk_ids_index": None, "topk_values_index": None}
    if ints:  # a top-k build: candidate ids (and their scores) instead of logits
        shapes["topk_ids_index"] = ints[0]
        shapes["topk_values_index"] = floats[0] if floats else None
    elif floats:
        shapes["logits_index"] = floats[0]
        shapes["vocab"] = outputs[floats[0]].shape[-1]
    else:
        raise ModelError("the post graph has no outputs")
    return shapes


def _vision_shapes(vision: Session, hidden: int) -> dict[str, Any]:
    image_in, features = vision.inputs(0)[0], vision.outputs(0)[0]
    if image_in.dtype != np.uint8 or len(image_in.shape) != 4 or image_in.shape[0] != 1 or image_in.shape[3] != 3:
        raise ModelError(f"vision input {image_in.describe()} is not uint8 [1, H, W, 3]")
    if len(features.shape) != 3 or features.shape[2] != hidden:
        raise ModelError(f"vision output {features.describe()} is not [1, tokens, {hidden}]")
    return {"vision_input_name": image_in.name, "vision_size": (image_in.shape[1], image_in.shape[2]),
            "image_tokens": features.shape[1], "vision_dtype": features.dtype}


@dataclass
class Model:
    """The pieces the engine runs. `vision` is None for text-only models."""

    vision: Session | None
    layers: list[Session]
    post: Session
    embeddings: Any  # npu.embeddings.Embeddings (or anything with lookup(ids, out))
    tokenizer: Any  # npu.tokenizer.Tokenizer
    template: Any  # npu.template.ChatTemplate
    name: str = "model"
    backend: str = "reference"
    precision: str | None = None
    source: Path | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def shapes(self) -> GraphShapes:
        return read_shapes(self)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for logs and `vlmd model inspect`."""
        s = self.shapes()
        return {
            "name": self.name, "source": str(self.source) if self.source else None, "backend": self.backend,
            "precision": self.precision, "template": getattr(self.template, "name", None),
            "layers": s.n_layers, "hidden": s.hidden, "kv_capacity": s.capacity, "kv_dim": s.kv_dim,
            "prefill_chunk": s.chunk, "history_lengths": sorted(s.history_groups),
            "dtype": dtype_name(s.act_dtype), "vocab": s.vocab, "post_topk": s.topk_ids_index is not None,
            "vision": None if self.vision is None else {
                "size": list(s.vision_size), "image_tokens": s.image_tokens, "dtype": dtype_name(s.vision_dtype)},
            "notes": list(self.notes),
        }


def load_model(path: str | Path | None = None, backend: str = "auto", precision: str = "bf16",
               kv_capacity: int = 1023, prefill_chunk: int = 128, history_groups: int = 0,
               provider: str = "auto", device_id: int = 0) -> Model:
    """Load the model at `path` (None: the demo model shipped with vlmd).

    `kv_capacity`, `prefill_chunk` and `history_groups` shape the reference graphs of a
    Hugging Face checkpoint (as `llm_build` options would); compiled graphs carry their
    own. `provider` picks the axengine execution provider; `device_id` the AXCL card.
    """
    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if path is None:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ModelError(f"no --model given and the demo model is not installed at {DEMO_MODEL_DIR}:"
                             " pass --model DIR (a Hugging Face InternVL2 checkpoint or a board model directory)")
        path = DEMO_MODEL_DIR
    from npu.layout import LayoutError, detect_layout

    try:
        layout = detect_layout(path)
    except LayoutError as exc:
        raise ModelError(str(exc)) from exc
    if layout.kind == "hf":
        if backend == "axengine":
            raise ModelError(f"{layout.root} is a Hugging Face checkpoint: axengine runs compiled .axmodel graphs;"
                             " use backend 'reference' (or convert it with Pulsar2)")
        return _load_reference(layout, precision, kv_capacity, prefill_chunk, history_groups)
    if backend == "reference":
        raise ModelError(f"{layout.root} holds compiled graphs ({layout.kind} layout): the reference backend needs"
                         " the Hugging Face checkpoint; use backend 'axengine' on a board")
    return _load_board(layout, provider, device_id)


def _load_reference(layout: Any, precision: str, kv_capacity: int, prefill_chunk: int,
                    history_groups: int) -> Model:
    from npu.embeddings import Embeddings, cached_embeddings_file
    from npu.reference import build_reference_sessions
    from npu.template import ChatTemplate
    from npu.tokenizer import Tokenizer

    root = Path(layout.root)
    built = build_reference_sessions(root, precision=precision, kv_capacity=kv_capacity,
                                     prefill_chunk=prefill_chunk, history_groups=history_groups)
    tokenizer = Tokenizer.from_dir(root)
    template = ChatTemplate.from_checkpoint(layout.config, tokenizer)
    embeddings = Embeddings(cached_embeddings_file(root), built.blueprint.vocab, built.blueprint.hidden)
    return Model(built.vision, list(built.layers), built.post, embeddings, tokenizer, template,
                 name=root.name, backend="reference", precision=precision, source=root,
                 notes=tuple(layout.notes))


def _load_board(layout: Any, provider: str, device_id: int) -> Model:
    from npu.board import load_board_model
    from npu.session import SessionError

    try:
        return load_board_model(layout.root, provider=provider, device_id=device_id)
    except SessionError as exc:  # axengine missing, or a graph it refused to open
        raise ModelError(f"{layout.root}: {exc}") from exc


