"""A loaded model: its sessions, embeddings, tokenizer and chat template, and their shapes.

`load_model(path, ...)` recognises the directory (npu/board/layout.py) and builds the
sessions with the requested backend:

- a Hugging Face checkpoint (config.json + safetensors) runs on the reference backend
  (npu/reference/); its embeddings are exported once to the board's raw bf16 format
  into vlmd's cache directory (npu/embeddings.py), so both backends read tokens alike;
- a compiled layout (Pulsar2 output, M5Stack package, vlmd.toml) runs on axengine
  (npu/board/); it needs a board or an AXCL card. Its graphs are opened only if they fit
  in the free device memory, and its data path (zero-copy or pyaxengine's public run(),
  npu/board/data_path.py) is chosen here: `Model.data_path`.

The shapes are read from the sessions by `npu.shapes.read_shapes` (re-exported here).
What the package says besides its graphs goes with them: the chat template it defines,
its image preprocessing (`Model.preprocess`: resize method, mean/std) and its sampling
defaults (`Model.sampling_defaults`: StackFlow mode-file and AXERA post_config.json
values, which callers apply when a request gives none). Nothing here knows MQTT or the
engine's run state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from npu.board.data_path import DATA_PATHS, select_data_path
from npu.board.graphs import BoardModelError, check_embeddings, layout_template, open_board_graphs
from npu.board.layout import ModelLayout, detect_layout
from npu.embeddings import Embeddings, cached_embeddings_file
from npu.errors import ModelError
from npu.families import DEFAULT_FAMILY, ModelFamily
from npu.image import RESIZE_METHODS, ImagePreprocess
from npu.reference import build_reference_sessions
from npu.reference.idefics3 import is_idefics3_config
from npu.reference.smolvlm_graphs import build_smolvlm_sessions
from npu.session import Session, dtype_name
from npu.shapes import GraphShapes, ShapeError, read_shapes
from npu.text.jinja_template import JinjaChatTemplate
from npu.text.template import ChatTemplate
from npu.text.tokenizer import Tokenizer

__all__ = ["BACKENDS", "DATA_PATHS", "DEMO_MODEL_DIR", "PRECISIONS", "GraphShapes", "Model", "ModelError", "ShapeError",
           "load_part", "load_model", "read_shapes"]

T = TypeVar("T")
DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo_model"
BACKENDS = ("auto", "reference", "axengine")
PRECISIONS = ("bf16", "fp32")


@dataclass
class Model:
    """The pieces the engine runs. `vision` is None for text-only models."""

    vision: Session | None
    layers: list[Session]
    post: Session
    embeddings: Any  # npu.embeddings.Embeddings (or anything with lookup(ids, out))
    tokenizer: Tokenizer
    template: ChatTemplate | JinjaChatTemplate
    name: str = "model"
    backend: str = "reference"
    precision: str | None = None
    source: Path | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    # The board data path (npu/board/data_path.py): the engine asks it for KV storage and a
    # layer stack; None on the reference backend (host arrays, sessions' run).
    data_path: Any = None
    cmm: dict[str, Any] | None = None  # device memory before/after loading and the estimate (boards)
    preprocess: ImagePreprocess = field(default_factory=ImagePreprocess)
    # GenerationOptions fields to use when a request gives none (the package's, then config's)
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    template_source: str = ""
    layout: str | None = None  # "hf", "axera", "m5stack", "manifest" (npu.board.layout)
    provider: str | None = None  # the axengine execution provider; None on the reference backend
    family: ModelFamily = DEFAULT_FAMILY  # what differs per model family (npu/families/)

    def shapes(self) -> GraphShapes:
        return read_shapes(self)

    def summary(self) -> dict[str, str | int | None]:
        """The facts `vlmd serve` logs at start and publishes in its stats, flat and JSON-able."""
        s, path = self.shapes(), self._data_path()
        return {"path": str(self.source) if self.source else None, "layout": self.layout, "backend": self.backend,
                "provider": self.provider, "precision": self.precision, "template": self.template.name,
                "kv_capacity": s.capacity, "prefill_chunk": s.chunk, "image_tokens": s.image_tokens,
                "data_path": path["data_path"], "data_path_reason": path["reason"]}

    def _data_path(self) -> dict[str, Any]:
        return self.data_path.describe() if self.data_path is not None else \
            {"data_path": "host", "reason": f"{self.backend} backend: no device memory"}

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for logs and `vlmd model inspect`."""
        s = self.shapes()
        return {
            "name": self.name, "family": self.family.name, "source": str(self.source) if self.source else None,
            "layout": self.layout,
            "backend": self.backend, "provider": self.provider,
            "precision": self.precision, "template": getattr(self.template, "name", None),
            "template_source": self.template_source, "sampling_defaults": dict(self.sampling_defaults),
            "resize": self.preprocess.resize,
            "layers": s.n_layers, "hidden": s.hidden, "kv_capacity": s.capacity, "kv_dim": s.kv_dim,
            "prefill_chunk": s.chunk, "history_lengths": sorted(s.history_groups),
            "dtype": dtype_name(s.act_dtype), "vocab": s.vocab, "post_topk": s.topk_ids_index is not None,
            "vision": None if self.vision is None else {
                "size": list(s.vision_size), "image_tokens": s.image_tokens, "dtype": dtype_name(s.vision_dtype),
                "input": s.vision_layout},
            "data_path": self._data_path(), "cmm": self.cmm, "notes": list(self.notes),
        }


def load_model(path: str | Path | None = None, backend: str = "auto", precision: str = "bf16",
               kv_capacity: int = 1023, prefill_chunk: int = 128, history_groups: int = 0,
               provider: str = "auto", device_id: int = 0, history_lengths: Sequence[int] | None = None,
               resize: str | None = None, sampling: dict[str, Any] | None = None, data_path: str = "auto") -> Model:
    """Load the model at `path` (None: the demo model shipped with vlmd).

    `kv_capacity`, `prefill_chunk` and `history_groups` (or explicit `history_lengths`)
    shape the reference graphs of a Hugging Face checkpoint (as `llm_build` options
    would); compiled graphs carry their own. `provider` picks the axengine execution
    provider; `device_id` the AXCL card; `data_path` ("auto", "zero-copy", "public") how
    compiled graphs are fed. `resize` overrides how frames are resized
    (npu.image.RESIZE_METHODS; None: as the checkpoint's image processor says, else
    InternVL's bicubic); `sampling` overrides the package's sampling defaults.
    """
    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if data_path not in DATA_PATHS:
        raise ModelError(f"unknown data path {data_path!r}: use one of {', '.join(DATA_PATHS)}")
    if resize is not None and resize not in RESIZE_METHODS:
        raise ModelError(f"unknown resize method {resize!r}: use one of {', '.join(RESIZE_METHODS)}")
    if path is None:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ModelError(f"no --model given and the demo model is not installed at {DEMO_MODEL_DIR}:"
                             " pass --model DIR (a Hugging Face InternVL2 checkpoint or a board model directory)")
        path = DEMO_MODEL_DIR
    layout = load_part("layout", path, detect_layout, path)
    if layout.kind == "hf":
        if backend == "axengine":
            raise ModelError(f"{layout.root} is a Hugging Face checkpoint: axengine runs compiled .axmodel graphs;"
                             " use backend 'reference' (or convert it with Pulsar2)")
        model = _load_reference(layout, precision, kv_capacity, prefill_chunk, history_groups, history_lengths)
    elif backend == "reference":
        raise ModelError(f"{layout.root} holds compiled graphs ({layout.kind} layout): the reference backend needs"
                         " the Hugging Face checkpoint; use backend 'axengine' on a board")
    else:
        model = _load_board(layout, provider, device_id, data_path)
    model.preprocess = _preprocess(layout, resize)
    model.sampling_defaults = {**layout.sampling, **(sampling or {})}
    model.template_source = layout.template_source
    if layout.sampling:
        model.notes += (f"sampling defaults {layout.sampling} from {layout.sampling_source}",)
    return model


def _preprocess(layout: ModelLayout, resize: str | None) -> ImagePreprocess:
    if layout.image_processor:
        return ImagePreprocess.from_image_processor(layout.image_processor, resize)
    if resize is not None:
        return ImagePreprocess(resize, source="configured")
    return ImagePreprocess()


def load_part(part: str, where: Any, load: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Load one part of a model; any failure becomes one ModelError naming the part.

    This is the load boundary: layouts, checkpoints, sessions, tokenizers (tokenizers
    raises bare Exceptions), templates and embedding files each fail in their own way,
    and every caller (`vlmd serve`, `ask`, `bench`, `check`) prints one line for them.
    """
    try:
        return load(*args, **kwargs)
    except ModelError as exc:
        if exc.part is None:
            exc.part = part
        raise
    except Exception as exc:  # the boundary: whatever a part raises, the caller gets one ModelError
        reason = str(exc) or type(exc).__name__
        if not isinstance(exc, (ValueError, OSError, RuntimeError)):
            reason = f"{type(exc).__name__}: {reason}"
        raise ModelError(f"{where}: {part}: {reason}", part=part) from exc


def _load_reference(layout: ModelLayout, precision: str, kv_capacity: int, prefill_chunk: int,
                    history_groups: int, history_lengths: Sequence[int] | None) -> Model:
    root = Path(layout.root)
    build = build_smolvlm_sessions if is_idefics3_config(layout.config) else build_reference_sessions
    built = load_part("checkpoint graphs", root, build, root, precision=precision,
                      kv_capacity=kv_capacity, prefill_chunk=prefill_chunk, history_groups=history_groups,
                      history_lengths=history_lengths)
    tokenizer = load_part("tokenizer", root, Tokenizer.from_dir, root)
    template = load_part("template", root, layout_template, layout, tokenizer, built.family.image_tags)
    embeddings_file = load_part("embeddings", root, cached_embeddings_file, root)
    embeddings = load_part("embeddings", root, Embeddings, embeddings_file, built.blueprint.vocab, built.blueprint.hidden)
    return Model(built.vision, list(built.layers), built.post, embeddings, tokenizer, template,
                 name=root.name, backend="reference", precision=precision, source=root,
                 notes=tuple(layout.notes) + (f"template {template.name}: {layout.template_source}",), layout=layout.kind,
                 family=built.family)


def _load_board(layout: ModelLayout, provider: str, device_id: int, data_path: str) -> Model:
    """The engine's `Model` for a compiled directory; BoardModelError lists every inconsistency."""
    graphs = load_part("board", layout.root, open_board_graphs, layout, provider, device_id)  # axengine, graphs
    problems = list(layout.problems)
    try:
        shapes = read_shapes(graphs)
    except ShapeError as exc:
        raise BoardModelError(f"{layout.root}: graphs: {exc} (see `vlmd model inspect {layout.root}`)",
                              part="graphs") from None
    rows = check_embeddings(layout, shapes, problems)
    if rows is None or layout.tokenizer_dir is None:
        problems.append("the model needs its embedding file and tokenizer files")
    if problems:
        raise BoardModelError(f"{layout.root}: " + "; ".join(problems) + f" (see `vlmd model inspect {layout.root}`)",
                              part="layout")
    tokenizer = load_part("tokenizer", layout.tokenizer_dir, Tokenizer.from_dir, layout.tokenizer_dir)
    template = load_part("template", layout.root, layout_template, layout, tokenizer, graphs.family.image_tags)
    embeddings = load_part("embeddings", layout.embeddings, Embeddings, layout.embeddings, rows, shapes.hidden)
    notes = layout.notes + (f"template {template.name}: {layout.template_source}",)
    path = load_part("data path", layout.root, select_data_path, graphs.layers, graphs.post, shapes, data_path)
    return Model(graphs.vision, graphs.layers, getattr(path, "post", None) or graphs.post, embeddings, tokenizer,
                 template, name=layout.root.name, backend="axengine",
                 precision="bf16" if dtype_name(shapes.act_dtype) == "bfloat16" else "fp32",
                 source=layout.root, notes=notes, data_path=path, cmm=graphs.cmm, layout=layout.kind,
                 provider=getattr(graphs.post, "provider", None), family=graphs.family)  # AxEngineSession.provider: what axengine chose
