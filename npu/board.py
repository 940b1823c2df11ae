"""Compiled model directories on the board: open their graphs, read their facts, explain them.

`open_board_graphs(layout)` opens one `AxEngineSession` per graph (kept for the life of
the process, see npu/axengine_session.py). `read_graph_facts(graphs)` reads every
dimension the engine needs from the graphs themselves (hidden, layers, kv_dim, KV
capacity, prefill chunk, history groups, vocab or top-k, image tokens and size,
dtypes) and lists whatever is inconsistent between them. `inspect_model(path)` adds
the directory's pieces (embedding file size, tokenizer, chat template, special ids)
for `vlmd model inspect`; `load_board_model(path)` returns the engine's `Model`.

Nothing here hard-codes InternVL2-1B's numbers; they are what the graphs say.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from npu.layout import ModelLayout, detect_layout
from npu.session import BF16, Session, SessionError, TensorSpec, dtype_name

LAYER_INPUTS = ("K_cache", "V_cache", "indices", "input", "mask")
LAYER_OUTPUTS = ("K_cache_out", "V_cache_out", "output")
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<img>", "</img>", "<IMG_CONTEXT>")
BF16_BYTES = 2


class BoardModelError(ValueError):
    """A compiled model whose pieces cannot work together; the message names the piece."""


@dataclass
class BoardGraphs:
    vision: Session | None
    layers: list[Session]
    post: Session


@dataclass(frozen=True)
class GraphFacts:
    """Dimensions read from the graphs (never from file names or configs)."""

    hidden: int
    n_layers: int
    kv_dim: int
    kv_capacity: int
    prefill_chunk: int
    history_groups: int
    float_dtype: str  # the layers' float boundary dtype: "bfloat16" or "float32"
    vocab: int | None  # logits width; None on top-k post graphs
    post_topk: int | None
    image_tokens: int
    image_size: tuple[int, int] | None  # (height, width) of the vision input
    vision_dtype: str | None


Opener = Callable[..., Session]


def open_board_graphs(layout: ModelLayout, provider: str = "auto", device_id: int = 0,
                      opener: Opener | None = None) -> BoardGraphs:
    """Open every graph of a compiled layout; raises BoardModelError if a needed one is missing."""
    if not layout.is_compiled:
        raise BoardModelError(f"{layout.root} is a Hugging Face checkpoint: use the reference backend")
    missing = [f"{name} ({path.name})" for name, path in layout.graph_paths().items() if not path.is_file()]
    if not layout.layers or layout.post is None or missing:
        raise BoardModelError(f"{layout.root}: graphs missing: {missing or 'layers/post'};"
                              f" {'; '.join(layout.problems)}")
    if opener is None:
        from npu.axengine_session import open_session as opener
    sessions = {name: opener(path, name=name, provider=provider, device_id=device_id)
                for name, path in layout.graph_paths().items()}
    return BoardGraphs(sessions.get("vision"), [sessions[f"layer{i}"] for i in range(len(layout.layers))],
                       sessions["post"])


def _by_name(specs: list[TensorSpec]) -> dict[str, TensorSpec]:
    return {spec.name: spec for spec in specs}


def read_graph_facts(graphs: BoardGraphs) -> tuple[GraphFacts, list[str]]:
    """The model's dimensions from its graphs, and every inconsistency found between them."""
    problems: list[str] = []
    layer0 = graphs.layers[0]
    decode_in = _by_name(layer0.inputs(0))
    absent = [n for n in LAYER_INPUTS if n not in decode_in]
    absent += [n for n in LAYER_OUTPUTS if n not in _by_name(layer0.outputs(0))]
    if absent:
        raise BoardModelError(f"{layer0.name}: not an llm_build layer graph, lacks {absent}")
    if layer0.num_groups < 2:
        raise BoardModelError(f"{layer0.name}: {layer0.num_groups} shape group(s);"
                              " llm_build layers have decode + prefill")
    hidden = decode_in["input"].shape[-1]
    kv_capacity, kv_dim = decode_in["K_cache"].shape[-2:]
    if decode_in["mask"].shape[-1] != kv_capacity + 1:
        problems.append(f"{layer0.name}: decode mask {list(decode_in['mask'].shape)}"
                        f" is not capacity+1 = {kv_capacity + 1}")
    prefill_chunk = _by_name(layer0.inputs(1))["input"].shape[1]
    for layer in graphs.layers[1:]:
        same = layer.num_groups == layer0.num_groups and all(
            layer.inputs(g) == layer0.inputs(g) and layer.outputs(g) == layer0.outputs(g)
            for g in range(layer0.num_groups))
        if not same:
            problems.append(f"{layer.name}: shapes or groups differ from {layer0.name}")
    vocab, topk = _post_facts(graphs.post, hidden, problems)
    image_tokens, image_size, vision_dtype = _vision_facts(graphs.vision, hidden, problems)
    facts = GraphFacts(hidden, len(graphs.layers), kv_dim, kv_capacity, prefill_chunk, layer0.num_groups - 2,
                       dtype_name(decode_in["input"].dtype), vocab, topk, image_tokens, image_size, vision_dtype)
    return facts, problems


def _post_facts(post: Session, hidden: int, problems: list[str]) -> tuple[int | None, int | None]:
    post_in, post_out = post.inputs(0), post.outputs(0)
    if post_in[0].shape[-1] != hidden:
        problems.append(f"post input {list(post_in[0].shape)} does not match the layers' hidden {hidden}")
    ids = [spec for spec in post_out if np.issubdtype(spec.dtype, np.integer)]
    if ids:  # a --post_topk build: candidate ids (and scores) instead of logits
        return None, ids[0].shape[-1]
    return post_out[0].shape[-1], None


def _vision_facts(vision: Session | None, hidden: int, problems: list[str]):
    if vision is None:
        return 0, None, None
    image_in, features = vision.inputs(0)[0], vision.outputs(0)[0]
    if image_in.dtype != np.uint8 or len(image_in.shape) != 4 or image_in.shape[-1] != 3:
        problems.append(f"vision input {image_in.describe()} is not uint8 NHWC RGB")
    if features.shape[-1] != hidden:
        problems.append(f"vision output {list(features.shape)} does not match the layers' hidden {hidden}")
    if features.dtype not in (BF16, np.dtype(np.float32)):
        problems.append(f"vision output dtype {dtype_name(features.dtype)}: expected bfloat16 or float32")
    return features.shape[1], (image_in.shape[1], image_in.shape[2]), dtype_name(features.dtype)


def describe_graph(session: Session, path: Path | None = None) -> dict[str, Any]:
    groups = [{"group": g, "inputs": [s.describe() for s in session.inputs(g)],
               "outputs": [s.describe() for s in session.outputs(g)]} for g in range(session.num_groups)]
    return {"name": session.name, "file": path.name if path else None, "groups": groups}


def check_embeddings(layout: ModelLayout, facts: GraphFacts, problems: list[str]) -> int | None:
    """Rows of the embedding file; appends a problem when its size does not fit the graphs."""
    if layout.embeddings is None or not layout.embeddings.is_file():
        return None
    size = os.path.getsize(layout.embeddings)
    row_bytes = facts.hidden * BF16_BYTES
    if size % row_bytes:
        problems.append(f"{layout.embeddings.name}: {size} bytes is not a whole number of bf16 rows"
                        f" of hidden {facts.hidden}")
        return None
    rows = size // row_bytes
    for label, expected in (("post graph vocab", facts.vocab), ("declared vocab", layout.vocab_size)):
        if expected is not None and expected != rows:
            problems.append(f"{layout.embeddings.name}: {rows} rows x {facts.hidden} (= {size} bytes),"
                            f" {label} is {expected}")
    if layout.hidden_size is not None and layout.hidden_size != facts.hidden:
        problems.append(f"declared hidden size {layout.hidden_size} but the graphs use {facts.hidden}")
    return rows


def tokenizer_report(layout: ModelLayout, facts: GraphFacts, rows: int | None,
                     problems: list[str]) -> dict[str, Any]:
    """Special ids from the tokenizer, the chat template, and the image-token count check."""
    if layout.tokenizer_dir is None:
        return {}
    from npu.template import ChatTemplate
    from npu.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_dir(layout.tokenizer_dir)
    except (OSError, ValueError) as exc:
        problems.append(f"tokenizer in {layout.tokenizer_dir} unusable: {exc}")
        return {}
    special = {token: tokenizer.token_id(token) for token in SPECIAL_TOKENS}
    report: dict[str, Any] = {"dir": str(layout.tokenizer_dir), "special_ids": special}
    top = max((i for i in special.values() if i is not None), default=None)
    if rows is not None and top is not None and top >= rows:
        problems.append(f"tokenizer id {top} is past the embedding file's {rows} rows")
    image_id = special["<IMG_CONTEXT>"]
    if layout.image_context_id is not None and layout.image_context_id != image_id:
        problems.append(f"the package declares image token id {layout.image_context_id}, the tokenizer has {image_id}")
    if layout.template is None and facts.image_tokens:
        problems.append("no chat template for a vision model: " + layout.template_source)
    try:
        template = ChatTemplate.from_checkpoint(_template_config(layout), tokenizer)
    except ValueError as exc:
        problems.append(str(exc))
        return report
    report["template"] = template.name
    report["stop_ids"] = sorted(template.stop_ids)
    if facts.image_tokens:
        prompt = template.render("?", 1, facts.image_tokens)
        count = tokenizer.encode(prompt).count(image_id) if image_id is not None else 0
        report["image_context_tokens"] = count
        if count != facts.image_tokens:
            problems.append(f"the prompt carries {count} <IMG_CONTEXT> tokens,"
                            f" the vision graph yields {facts.image_tokens} rows")
    return report


def _template_config(layout: ModelLayout) -> dict[str, Any]:
    """The config ChatTemplate chooses by: the layout's config with its (possibly inferred) template."""
    return dict(layout.config, template=layout.template) if layout.template else dict(layout.config)


def inspect_model(path: str | Path, provider: str = "auto", device_id: int = 0, opener: Opener | None = None,
                  precision: str = "bf16") -> dict[str, Any]:
    """Everything `vlmd model inspect` prints, as a JSON-able dict; `problems` empty means consistent."""
    layout = detect_layout(path)
    problems = list(layout.problems)
    report: dict[str, Any] = {"path": str(layout.root), "layout": layout.kind, "notes": list(layout.notes),
                              "template": layout.template, "template_source": layout.template_source,
                              "files": _files(layout)}
    try:
        graphs = _reference_graphs(layout, precision) if layout.kind == "hf" else \
            open_board_graphs(layout, provider, device_id, opener)
        facts, graph_problems = read_graph_facts(graphs)
    except (BoardModelError, SessionError, OSError) as exc:
        report["problems"] = problems + [f"graphs not opened: {exc}"]
        return report
    problems += graph_problems
    from npu.model import ModelError, read_shapes

    try:
        read_shapes(graphs)  # the engine's own checks, so inspect refuses what the engine would
    except ModelError as exc:
        problems.append(f"the engine would refuse these graphs: {exc}")
    paths = layout.graph_paths()
    shown = [graphs.vision] if graphs.vision is not None else []
    report["graphs"] = [describe_graph(s, paths.get(s.name)) for s in shown + [graphs.layers[0], graphs.post]]
    report["facts"] = asdict(facts)
    rows = check_embeddings(layout, facts, problems) if layout.is_compiled else facts.vocab
    report["embedding_rows"] = rows
    report["tokenizer"] = tokenizer_report(layout, facts, rows, problems)
    report["problems"] = problems
    return report


def _files(layout: ModelLayout) -> dict[str, str | None]:
    def name(path: Path | None) -> str | None:
        if path is None:
            return None
        return str(path.relative_to(layout.root) if path.is_relative_to(layout.root) else path)

    files = {graph: name(path) for graph, path in layout.graph_paths().items() if not graph.startswith("layer")}
    if layout.layers:
        files["layers"] = f"{name(layout.layers[0])} .. {name(layout.layers[-1])} ({len(layout.layers)})"
    files.update(embeddings=name(layout.embeddings), tokenizer=name(layout.tokenizer_dir))
    return files


def _reference_graphs(layout: ModelLayout, precision: str) -> BoardGraphs:
    from npu.reference import build_reference_sessions

    built = build_reference_sessions(layout.root, precision=precision)
    return BoardGraphs(built.vision, list(built.layers), built.post)


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of `inspect_model`'s report."""
    lines = [f"model     {report['path']}", f"layout    {report['layout']}"]
    lines += [f"          {note}" for note in report.get("notes", [])]
    lines.append(f"template  {report.get('template')} ({report.get('template_source')})")
    lines += [f"file      {key:<10} {value}" for key, value in report.get("files", {}).items()]
    for graph in report.get("graphs", []):
        lines.append(f"graph     {graph['name']}" + (f"  [{graph['file']}]" if graph["file"] else ""))
        for group in graph["groups"]:
            lines.append(f"  group {group['group']}  in:  " + ", ".join(group["inputs"]))
            lines.append("           out: " + ", ".join(group["outputs"]))
    facts = report.get("facts")
    if facts:
        lines.append(f"layers    {facts['n_layers']} (layer1.. same groups as layer0)")
        lines.append(f"hidden {facts['hidden']}  kv_dim {facts['kv_dim']}  KV capacity {facts['kv_capacity']}"
                     f"  prefill chunk {facts['prefill_chunk']}  history groups {facts['history_groups']}")
        lines.append(f"dtype {facts['float_dtype']}  vocab {facts['vocab']}  post top-k {facts['post_topk']}"
                     f"  image tokens {facts['image_tokens']}  image size {facts['image_size']}"
                     f"  vision dtype {facts['vision_dtype']}")
        lines.append(f"embedding rows {report.get('embedding_rows')}")
    tokenizer = report.get("tokenizer") or {}
    if tokenizer:
        lines.append(f"tokenizer {tokenizer['dir']}")
        lines.append("special   " + ", ".join(f"{k}={v}" for k, v in tokenizer["special_ids"].items()))
        if "image_context_tokens" in tokenizer:
            lines.append(f"image     {tokenizer['image_context_tokens']} <IMG_CONTEXT> tokens in a one-image prompt")
        if "stop_ids" in tokenizer:
            lines.append(f"stop ids  {tokenizer['stop_ids']}")
    problems = report.get("problems", [])
    lines.append("problems  none" if not problems else f"problems  {len(problems)}:")
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def load_board_model(path: str | Path, provider: str = "auto", device_id: int = 0, opener: Opener | None = None):
    """The engine's `Model` for a compiled directory; BoardModelError lists every inconsistency."""
    from npu.embeddings import Embeddings
    from npu.model import Model
    from npu.template import ChatTemplate
    from npu.tokenizer import Tokenizer

    layout = detect_layout(path)
    graphs = open_board_graphs(layout, provider, device_id, opener)
    facts, problems = read_graph_facts(graphs)
    problems = list(layout.problems) + problems
    rows = check_embeddings(layout, facts, problems)
    if rows is None or layout.tokenizer_dir is None:
        problems.append("the model needs its embedding file and tokenizer files")
    if problems:
        raise BoardModelError(f"{layout.root}: " + "; ".join(problems) + f" (see `vlmd model inspect {layout.root}`)")
    tokenizer = Tokenizer.from_dir(layout.tokenizer_dir)
    template = ChatTemplate.from_checkpoint(_template_config(layout), tokenizer)
    embeddings = Embeddings(layout.embeddings, rows, facts.hidden)
    notes = layout.notes + (f"template {template.name}: {layout.template_source}",)
    return Model(graphs.vision, graphs.layers, graphs.post, embeddings, tokenizer, template, name=layout.root.name,
                 backend="axengine", precision="bf16" if facts.float_dtype == "bfloat16" else "fp32",
                 source=layout.root, notes=notes)
