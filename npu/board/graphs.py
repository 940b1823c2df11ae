"""Compiled model directories on the board: open their graphs and check their pieces.

`open_board_graphs(layout)` opens one `AxEngineSession` per graph (kept for the life of
the process, see npu/board/axengine_session.py); the shapes are read from those sessions
by `npu.shapes.read_shapes`, like any backend's. Before it opens anything it checks the
free device memory (npu/board/cmm.py): against the package's `cmm_size` when it declares
one, else against the graph files' sizes, and once layer 0 is open against the files plus
every layer's IO buffers as large as layer 0's; a model that will not fit is refused
(`CmmError`, naming what holds the memory) before it half-loads. `check_embeddings` checks the board's
embedding file against them. `npu.model.load_model` assembles the engine's `Model`;
`npu.inspect` explains a directory.

Nothing here hard-codes InternVL2-1B's numbers; they are what the graphs say.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npu.board.axengine_session import is_open, open_session
from npu.board.cmm import check_fits, estimate_model_kb, read_cmm_info
from npu.board.layout import ModelLayout
from npu.board.layout_parts import read_json
from npu.embeddings import EmbeddingsError, open_table
from npu.errors import ModelError
from npu.families import DEFAULT_FAMILY, ModelFamily, family_named
from npu.families.base import ImageTags
from npu.session import Session
from npu.shapes import GraphShapes
from npu.text.chat_templates import template_for
from npu.text.jinja_template import JinjaChatTemplate
from npu.text.template import ChatTemplate
from npu.text.tokenizer import Tokenizer

class BoardModelError(ModelError):
    """A compiled model whose pieces cannot work together; the message names the piece."""


@dataclass
class BoardGraphs:
    vision: Session | None
    layers: list[Session]
    post: Session
    cmm: dict[str, Any] | None = None  # free CMM before loading, the estimate, and after (on a board)
    family: ModelFamily = DEFAULT_FAMILY  # how the graphs are fed (npu/families/)


def open_board_graphs(layout: ModelLayout, provider: str = "auto", device_id: int = 0) -> BoardGraphs:
    """Open every graph of a compiled layout; raises BoardModelError if a needed one is missing."""
    if not layout.is_compiled:
        raise BoardModelError(f"{layout.root} is a Hugging Face checkpoint: use the reference backend")
    missing = [f"{name} ({path.name})" for name, path in layout.graph_paths().items() if not path.is_file()]
    if not layout.layers or layout.post is None or missing:
        raise BoardModelError(f"{layout.root}: graphs missing: {missing or 'layers/post'};"
                              f" {'; '.join(layout.problems)}")
    paths = layout.graph_paths()
    pending = {name: path for name, path in paths.items() if not is_open(path, provider, device_id)}
    before = read_cmm_info()
    cmm: dict[str, Any] | None = None
    if pending:  # graphs already open hold their CMM already: only the rest must fit
        if layout.declared_cmm_kb:
            needed, source = layout.declared_cmm_kb, "the package's cmm_size"
        else:
            needed, source = estimate_model_kb(pending.values()), "its graph files"
        check_fits(needed, before, source)
        if "layer0" in pending and not layout.declared_cmm_kb:
            layer0 = open_session(pending.pop("layer0"), name="layer0", provider=provider, device_id=device_id)
            layers_left = sum(1 for name in pending if name.startswith("layer"))
            needed = estimate_model_kb(paths.values(), layer0.buffer_bytes * (layers_left + 1))
            source = "its graph files and layer IO buffers"
            check_fits(needed, before, source)
        cmm = {"before": before.describe() if before else None, "needed_kb": needed, "needed_from": source}
    sessions = {name: open_session(path, name=name, provider=provider, device_id=device_id)
                for name, path in paths.items()}
    after = read_cmm_info()
    if cmm is not None or after is not None:
        cmm = dict(cmm or {}, after=after.describe() if after else None)
    return BoardGraphs(sessions.get("vision"), [sessions[f"layer{i}"] for i in range(len(layout.layers))],
                       sessions["post"], cmm, family_named(layout.family))


def describe_graph(session: Session, path: Path | None = None) -> dict[str, Any]:
    groups = [{"group": g, "inputs": [s.describe() for s in session.inputs(g)],
               "outputs": [s.describe() for s in session.outputs(g)]} for g in range(session.num_groups)]
    return {"name": session.name, "file": path.name if path else None, "groups": groups}


def check_embeddings(layout: ModelLayout, shapes: GraphShapes, problems: list[str]) -> int | None:
    """Rows of the embedding file (raw bf16 .bin or .npy); appends a problem when it does not fit the graphs."""
    if layout.embeddings is None or not layout.embeddings.is_file():
        return None
    try:
        rows = open_table(layout.embeddings, shapes.hidden).shape[0]
    except EmbeddingsError as exc:
        problems.append(str(exc).replace(str(layout.embeddings), layout.embeddings.name))
        return None
    size = os.path.getsize(layout.embeddings)
    for label, expected in (("post graph vocab", shapes.vocab), ("declared vocab", layout.vocab_size)):
        if expected is not None and expected != rows:
            problems.append(f"{layout.embeddings.name}: {rows} rows x {shapes.hidden} (= {size} bytes),"
                            f" {label} is {expected}")
    if layout.hidden_size is not None and layout.hidden_size != shapes.hidden:
        problems.append(f"declared hidden size {layout.hidden_size} but the graphs use {shapes.hidden}")
    return rows


def template_config(layout: ModelLayout) -> dict[str, Any]:
    """The config ChatTemplate chooses by: the layout's config with its (possibly inferred) template."""
    return dict(layout.config, template=layout.template) if layout.template else dict(layout.config)


def layout_template(layout: ModelLayout, tokenizer: Tokenizer,
                    image_tags: ImageTags | None = None) -> ChatTemplate | JinjaChatTemplate:
    """The chat template the layout found (npu.text.chat_templates.template_for); ValueError
    when it cannot be used with this tokenizer."""
    tokenizer_config: dict[str, Any] = {}
    if layout.tokenizer_dir is not None and (layout.tokenizer_dir / "tokenizer_config.json").is_file():
        tokenizer_config = read_json(layout.tokenizer_dir / "tokenizer_config.json") or {}
    return template_for(template_config(layout), tokenizer, layout.chat_template, tokenizer_config,
                        image_tags=image_tags)
