"""`vlmd model inspect`: explain a model directory of any layout, and name every problem.

`inspect_model(path)` reports the layout and its files, every graph's shape groups, the
shapes the engine would read (npu.shapes), the embedding rows, the tokenizer's special
ids, the chat template and where it came from (config.json `template`, the checkpoint's
Jinja chat template, or the family a package's name implies), the package's sampling
defaults and image preprocessing, and a list of problems (empty: the engine would load it).
For compiled graphs it also reports the installed pyaxengine (version, shape groups,
libax_engine version), the device memory (free before and after loading, the model's
estimate) and the data path the engine would use, with the reason. A Hugging Face checkpoint is inspected through the reference graphs the
reference backend would build from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from npu.board.data_path import select_data_path
from npu.board.graphs import BoardGraphs, check_embeddings, describe_graph, layout_template, open_board_graphs
from npu.board.layout import ModelLayout, detect_layout
from npu.embeddings import cached_embeddings_path
from npu.errors import ModelError
from npu.families import family_named
from npu.image import ImagePreprocess
from npu.model import DEMO_MODEL_DIR, load_part
from npu.reference import build_reference_sessions
from npu.reference.idefics3 import is_idefics3_config
from npu.reference.smolvlm_graphs import build_smolvlm_sessions
from npu.shapes import GraphShapes, ShapeError, read_shapes
from npu.text.tokenizer import Tokenizer

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<img>", "</img>", "<IMG_CONTEXT>")


def inspect_model(path: str | Path, provider: str = "auto", device_id: int = 0,
                  precision: str = "bf16", data_path: str = "auto") -> dict[str, Any]:
    """Everything `vlmd model inspect` prints, as a JSON-able dict; `problems` empty means consistent."""
    layout = detect_layout(path)
    problems = list(layout.problems)
    report: dict[str, Any] = {"path": str(layout.root), "layout": layout.kind, "notes": list(layout.notes),
                              "demo_model": _is_demo_model(layout.root),
                              "template": layout.template or ("chat_template" if layout.chat_template else None),
                              "template_source": layout.template_source, "files": _files(layout),
                              "sampling_defaults": dict(layout.sampling), "sampling_source": layout.sampling_source,
                              "image_preprocess": _preprocess(layout)}
    try:
        graphs = load_part("checkpoint graphs", layout.root, _reference_graphs, layout, precision) \
            if layout.kind == "hf" else load_part("board", layout.root, open_board_graphs, layout, provider, device_id)
    except ModelError as exc:
        report["problems"] = problems + [f"graphs not opened: {exc}"]
        return report
    paths = layout.graph_paths()
    shown = [graphs.vision] if graphs.vision is not None else []
    report["graphs"] = [describe_graph(s, paths.get(s.name)) for s in shown + [graphs.layers[0], graphs.post]]
    try:
        shapes = read_shapes(graphs)  # the engine's own reading: inspect refuses what the engine would
    except ShapeError as exc:
        report["problems"] = problems + [f"the engine would refuse these graphs: {p}" for p in exc.problems]
        return report
    report["facts"] = shapes.describe()
    if layout.is_compiled:
        report["runtime"] = graphs.layers[0].runtime.describe()
        report["cmm"] = graphs.cmm
        try:
            report["data_path"] = select_data_path(graphs.layers, graphs.post, shapes, data_path).describe()
        except ModelError as exc:
            problems.append(str(exc))
    else:
        report["data_path"] = {"data_path": "host", "reason": "reference backend: no device memory"}
    rows = check_embeddings(layout, shapes, problems) if layout.is_compiled else shapes.vocab
    report["embedding_rows"] = rows
    report["embeddings"] = _embeddings_report(layout, shapes, rows)
    report["tokenizer"] = tokenizer_report(layout, shapes, rows, problems)
    if report["tokenizer"].get("template"):  # the template the engine would use, inferred ones included
        report["template"] = report["tokenizer"]["template"]
    report["problems"] = problems
    return report


def _is_demo_model(root: Path) -> bool:
    try:
        return Path(root).resolve() == DEMO_MODEL_DIR.resolve()
    except OSError:
        return False


def _embeddings_report(layout: ModelLayout, shapes: GraphShapes, rows: int | None) -> dict[str, Any]:
    """Where the token embeddings come from: the package's bf16 file, or (a checkpoint) its
    weights, exported once into vlmd's cache on the first load."""
    if layout.is_compiled:
        file = str(layout.embeddings) if layout.embeddings is not None else None
        return {"file": file, "rows": rows, "hidden": shapes.hidden, "source": "the package's bf16 file"}
    cached = cached_embeddings_path(layout.root)
    return {"file": str(cached), "rows": rows, "hidden": shapes.hidden,
            "source": "exported from the checkpoint's weights" + (" (cached)" if cached.is_file() else
                                                                   " on the first load")}


def _files(layout: ModelLayout) -> dict[str, str | None]:
    def name(path: Path | None) -> str | None:
        if path is None:
            return None
        if path == layout.root:  # a checkpoint keeps its tokenizer beside its weights
            return "(the model directory)"
        return str(path.relative_to(layout.root) if path.is_relative_to(layout.root) else path)

    files = {graph: name(path) for graph, path in layout.graph_paths().items() if not graph.startswith("layer")}
    if layout.layers:
        files["layers"] = f"{name(layout.layers[0])} .. {name(layout.layers[-1])} ({len(layout.layers)})"
    embeddings = name(layout.embeddings) if layout.is_compiled else "(exported from the checkpoint's weights)"
    files.update(embeddings=embeddings, tokenizer=name(layout.tokenizer_dir))
    return files


def _preprocess(layout: ModelLayout) -> dict[str, Any]:
    preprocess = (ImagePreprocess.from_image_processor(layout.image_processor) if layout.image_processor
                  else ImagePreprocess())
    return {"resize": preprocess.resize, "mean": list(preprocess.mean), "std": list(preprocess.std),
            "source": preprocess.source}


def _reference_graphs(layout: ModelLayout, precision: str) -> BoardGraphs:
    build = build_smolvlm_sessions if is_idefics3_config(layout.config) else build_reference_sessions
    built = build(layout.root, precision=precision)
    return BoardGraphs(built.vision, list(built.layers), built.post, family=built.family)


def tokenizer_report(layout: ModelLayout, shapes: GraphShapes, rows: int | None,
                     problems: list[str]) -> dict[str, Any]:
    """Special ids from the tokenizer, the chat template, and the image-token count check."""
    if layout.tokenizer_dir is None:
        return {}
    try:
        tokenizer = load_part("tokenizer", layout.tokenizer_dir, Tokenizer.from_dir, layout.tokenizer_dir)
    except ModelError as exc:
        problems.append(f"unusable: {exc}")
        return {}
    family = family_named(layout.family)
    image_token = family.image_tags.token
    special = {token: tokenizer.token_id(token) for token in dict.fromkeys((*SPECIAL_TOKENS, image_token))}
    report: dict[str, Any] = {"dir": str(Path(layout.tokenizer_dir).resolve()), "special_ids": special}
    top = max((i for i in special.values() if i is not None), default=None)
    if rows is not None and top is not None and top >= rows:
        problems.append(f"tokenizer id {top} is past the embedding file's {rows} rows")
    image_id = special[image_token]  # <IMG_CONTEXT>, <|image_pad|>, <image>: the family's
    report["family"], report["image_token"] = family.name, image_token
    if layout.image_context_id is not None and layout.image_context_id != image_id:
        problems.append(f"the package declares image token id {layout.image_context_id}, the tokenizer has {image_id}")
    if layout.template is None and layout.chat_template is None and shapes.image_tokens:
        problems.append("no chat template for a vision model: " + layout.template_source)
    try:
        template = load_part("template", layout.root, layout_template, layout, tokenizer, family.image_tags)
    except ModelError as exc:
        problems.append(str(exc))
        return report
    report["template"] = template.name
    report["stop_ids"] = sorted(template.stop_ids)
    if shapes.image_tokens:
        prompt = template.render("?", 1, shapes.image_tokens)
        count = tokenizer.encode(prompt).count(image_id) if image_id is not None else 0
        report["image_context_tokens"] = count
        if count != shapes.image_tokens:
            problems.append(f"the prompt carries {count} {family.image_tags.token} tokens,"
                            f" the vision graph yields {shapes.image_tokens} rows")
    return report


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of `inspect_model`'s report."""
    demo = "  (the demo model shipped with vlmd)" if report.get("demo_model") else ""
    lines = [f"model     {report['path']}{demo}", f"layout    {report['layout']}"]
    lines += [f"          {note}" for note in report.get("notes", [])]
    lines.append(f"template  {report.get('template')} ({report.get('template_source')})")
    if report.get("sampling_defaults"):
        lines.append(f"sampling  {report['sampling_defaults']} ({report.get('sampling_source')})")
    preprocess = report.get("image_preprocess") or {}
    if preprocess:
        lines.append(f"images    resize {preprocess['resize']}, mean {preprocess['mean']}, std {preprocess['std']}"
                     f" ({preprocess['source']})")
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
                     f"  prefill chunk {facts['prefill_chunk']}  history groups {facts['history_groups']}"
                     + (f" {facts['history_lengths']}" if facts.get("history_lengths") else ""))
        lines.append(f"dtype {facts['float_dtype']}  vocab {facts['vocab']}  post top-k {facts['post_topk']}"
                     f"  image tokens {facts['image_tokens']}  image size {_size(facts['image_size'])}"
                     f"  vision dtype {facts['vision_dtype']}  vision input {facts.get('vision_input')}")
        lines.append(f"embedding rows {report.get('embedding_rows')}")
    embeddings = report.get("embeddings")
    if embeddings:
        lines.append(f"embeddings {embeddings['file']}  ({embeddings['rows']} x {embeddings['hidden']} bf16,"
                     f" {embeddings['source']})")
    lines += _board_lines(report)
    tokenizer = report.get("tokenizer") or {}
    if tokenizer:
        lines.append(f"tokenizer {tokenizer['dir']}")
        lines.append("special   " + ", ".join(f"{k}={v}" for k, v in tokenizer["special_ids"].items()))
        if "image_context_tokens" in tokenizer:
            token = tokenizer.get("image_token", "<IMG_CONTEXT>")
            lines.append(f"image     {tokenizer['image_context_tokens']} {token} tokens in a one-image prompt"
                         f" ({tokenizer.get('family', 'internvl')} family)")
        if "stop_ids" in tokenizer:
            lines.append(f"stop ids  {tokenizer['stop_ids']}")
    problems = report.get("problems", [])
    lines.append("problems  none" if not problems else f"problems  {len(problems)}:")
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def _size(size: list[int] | None) -> str:
    return "none" if size is None else f"{size[0]}x{size[1]}"


def _board_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    runtime = report.get("runtime")
    if runtime:
        lines.append(f"runtime   pyaxengine {runtime['pyaxengine'] or 'unknown'}  shape groups {runtime['shape_groups']}"
                     f"  libax_engine {runtime['engine_version'] or 'unknown'}  providers {runtime['providers']}")
    cmm = report.get("cmm") or {}
    if cmm.get("after") or cmm.get("before"):
        free = cmm.get("before") or cmm["after"]
        needed = f"  model needs ~{cmm['needed_kb'] // 1024} MiB ({cmm['needed_from']})" if "needed_kb" in cmm else ""
        after = f"  free after loading {cmm['after']['remain_kb'] // 1024} MiB" if cmm.get("after") else ""
        lines.append(f"cmm       total {free['total_kb'] // 1024} MiB  free before {free['remain_kb'] // 1024} MiB"
                     f"{needed}{after}")
    path = report.get("data_path")
    if path:
        lines.append(f"data path {path['data_path']}: {path['reason']}")
    return lines


def _size(size: list[int] | None) -> str:
    return "none" if size is None else f"{size[0]}x{size[1]}"
